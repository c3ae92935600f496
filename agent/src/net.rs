//! Network configuration over rtnetlink, synchronous: what Kata's ListInterfaces,
//! UpdateInterface, ListRoutes and UpdateRoutes need (a pod's eth0: addresses, MTU, link
//! state, routes).
//!
//! Hand-written on purpose rather than built on `netlink-packet-route` + `netlink-sys`: in a
//! static, size-optimised, fat-LTO build (the `guest` profile), a small program that only dumps
//! links, addresses and routes with those crates (0.34 / 0.9) was ~540 KiB larger than the
//! same program without them, because decoding any message links in the decoders of every
//! attribute the crate knows (tc, bridge, link-info kinds, ...). This file speaks the few
//! messages and attributes it needs over a raw `AF_NETLINK` socket with `libc` and costs a
//! few tens of KiB.
//!
//! Protocol handling: every change is sent with `NLM_F_ACK` and its ack (`NLMSG_ERROR` with
//! error 0) is awaited and checked; dumps are read until `NLMSG_DONE` across multi-part
//! (`NLM_F_MULTI`) datagrams of any size (peeked with `MSG_TRUNC`), a dump the kernel marks
//! interrupted (`NLM_F_DUMP_INTR`) is retried, attributes are walked with 4-byte alignment.
//! Kernel errors become `io::Error`s whose kind follows the errno, whose text names the
//! interface or route and includes the kernel's extended-ack message when it gives one; the
//! errno itself is available through [`errno`].

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub family: Family,
    pub address: String,
    pub prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    pub index: u32,
    pub mtu: u32,
    /// "aa:bb:cc:dd:ee:ff", lowercase; "" if the link has no hardware address.
    pub mac: String,
    pub up: bool,
    pub addrs: Vec<Addr>,
}

#[derive(Debug, Clone, Default)]
pub struct IfaceUpdate {
    /// The interface to change, by name; if `mac` is non-empty the interface is found by MAC
    /// instead and renamed to `name` when `name` is non-empty and differs.
    pub name: String,
    pub mac: String,
    pub mtu: Option<u32>,
    /// Replaces all addresses of the interface (IPv6 link-local fe80::/10 addresses, which the
    /// kernel manages, are kept unless listed otherwise).
    pub addrs: Vec<Addr>,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEntry {
    /// "" (or "default" on input) for a default route, else "10.0.0.0/24"; an address without
    /// a prefix length is taken as a host route on input.
    pub dest: String,
    pub gateway: String,
    pub device: String,
    pub source: String,
    pub scope: u8,
    pub family: Family,
}

/// The error inside the `io::Error`s of this module: the errno and a message naming what
/// failed.
#[derive(Debug)]
pub struct NetError {
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for NetError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for NetError {}

/// The errno behind an error of this module (EINVAL for rejected input, ENODEV for an unknown
/// interface), or of any OS error.
pub fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error().or_else(|| e.get_ref()?.downcast_ref::<NetError>().map(|n| n.errno))
}

fn os_err(errno: i32, context: &str, kernel_msg: Option<&str>) -> io::Error {
    let os = io::Error::from_raw_os_error(errno);
    let kind = if errno == libc::ENODEV { io::ErrorKind::NotFound } else { os.kind() };
    let mut message = format!("{context}: {os}");
    if let Some(m) = kernel_msg.filter(|m| !m.is_empty()) {
        message.push_str(" (kernel: ");
        message.push_str(m);
        message.push(')');
    }
    io::Error::new(kind, NetError { errno, message })
}

fn last_os_err(context: &str) -> io::Error {
    os_err(io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO), context, None)
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NetError { errno: libc::EINVAL, message })
}

fn not_found(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, NetError { errno: libc::ENODEV, message })
}

// ---- protocol constants (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, ...) ----

const NLMSG_HDRLEN: usize = 16;
const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP_INTR: u16 = 0x10;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
// Flags of an NLMSG_ERROR message.
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFF_UP: u32 = 1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_F_NODAD: u8 = 0x02;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RTA_TABLE: u16 = 15;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_KERNEL: u8 = 2;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RTM_F_CLONED: u32 = 0x200;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

const IFNAMSIZ: usize = 16;

// ---- byte helpers ----

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_ne_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn put_attr(b: &mut Vec<u8>, ty: u16, data: &[u8]) {
    b.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(data);
    b.resize(align4(b.len()), 0);
}

fn put_ip(b: &mut Vec<u8>, ty: u16, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => put_attr(b, ty, &a.octets()),
        IpAddr::V6(a) => put_attr(b, ty, &a.octets()),
    }
}

/// Iterates the attributes (type without the NESTED/BYTEORDER bits, payload) of a buffer.
struct Attrs<'a>(&'a [u8]);

impl<'a> Iterator for Attrs<'a> {
    type Item = (u16, &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        if b.len() < 4 {
            return None;
        }
        let len = u16_at(b, 0) as usize;
        if len < 4 || len > b.len() {
            self.0 = &[];
            return None;
        }
        let ty = u16_at(b, 2) & 0x3fff;
        self.0 = &b[align4(len).min(b.len())..];
        Some((ty, &b[4..len]))
    }
}

fn ip_from(family: u8, d: &[u8]) -> Option<IpAddr> {
    match family {
        AF_INET if d.len() >= 4 => Some(IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3]))),
        AF_INET6 if d.len() >= 16 => {
            let o: [u8; 16] = d[..16].try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

fn cstr(d: &[u8]) -> String {
    let end = d.iter().position(|&c| c == 0).unwrap_or(d.len());
    String::from_utf8_lossy(&d[..end]).into_owned()
}

fn fmt_mac(d: &[u8]) -> String {
    let mut s = String::with_capacity(d.len() * 3);
    for (i, b) in d.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push_str(&format!("{b:02x}"));
    }
    s
}

fn family_of(ip: &IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

fn af(f: Family) -> u8 {
    match f {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    }
}

fn max_prefix(f: Family) -> u8 {
    match f {
        Family::V4 => 32,
        Family::V6 => 128,
    }
}

// ---- the socket ----

struct Sock {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

/// A reply message: type, flags, payload (after the netlink header).
type Msg = (u16, Vec<u8>);

impl Sock {
    fn open() -> io::Result<Sock> {
        // SAFETY: plain syscalls on a descriptor we own; the pointers passed are to live locals.
        unsafe {
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE);
            if fd < 0 {
                return Err(last_os_err("open rtnetlink socket"));
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let one: libc::c_int = 1;
            for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
                // Best effort: older kernels lack them; errors are then reported without text.
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    &one as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            if libc::bind(fd.as_raw_fd(), &sa as *const libc::sockaddr_nl as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t)
                < 0
            {
                return Err(last_os_err("bind rtnetlink socket"));
            }
            Ok(Sock { fd, seq: 0, buf: vec![0; 32 * 1024] })
        }
    }

    fn send(&mut self, ty: u16, flags: u16, body: &[u8], what: &str) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        // SAFETY: sendto with a valid buffer and address.
        unsafe {
            let mut sa: libc::sockaddr_nl = std::mem::zeroed();
            sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            loop {
                let r = libc::sendto(
                    self.fd.as_raw_fd(),
                    m.as_ptr() as *const libc::c_void,
                    m.len(),
                    0,
                    &sa as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                );
                if r >= 0 {
                    return Ok(self.seq);
                }
                if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                    return Err(last_os_err(&format!("{what}: send netlink request")));
                }
            }
        }
    }

    /// Receives one datagram into self.buf (grown to fit it); returns its length.
    fn recv(&mut self, what: &str) -> io::Result<usize> {
        loop {
            // SAFETY: recv into our own buffer of the given length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr() as *mut libc::c_void, self.buf.len(), libc::MSG_PEEK | libc::MSG_TRUNC) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(last_os_err(&format!("{what}: receive netlink reply")));
            }
            if n as usize > self.buf.len() {
                self.buf.resize(n as usize, 0);
            }
            // SAFETY: as above.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), self.buf.as_mut_ptr() as *mut libc::c_void, self.buf.len(), 0) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(last_os_err(&format!("{what}: receive netlink reply")));
            }
            return Ok(n as usize);
        }
    }

    /// Sends a request and reads its replies until the ack (no NLM_F_DUMP in `flags`) or
    /// NLMSG_DONE (a dump). Returns the reply messages and whether the kernel marked the
    /// dump interrupted.
    fn request(&mut self, ty: u16, flags: u16, body: &[u8], what: &str) -> io::Result<(Vec<Msg>, bool)> {
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let flags = flags | NLM_F_REQUEST | if dump { 0 } else { NLM_F_ACK };
        let seq = self.send(ty, flags, body, what)?;
        let mut out = Vec::new();
        let mut intr = false;
        loop {
            let n = self.recv(what)?;
            let data = &self.buf[..n];
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32_at(data, off) as usize;
                if len < NLMSG_HDRLEN || off + len > n {
                    return Err(os_err(libc::EBADMSG, &format!("{what}: malformed netlink reply"), None));
                }
                let mty = u16_at(data, off + 4);
                let mflags = u16_at(data, off + 6);
                let mseq = u32_at(data, off + 8);
                let payload = &data[off + NLMSG_HDRLEN..off + len];
                off += align4(len);
                if mseq != seq {
                    continue; // stale reply to an earlier request
                }
                match mty {
                    NLMSG_NOOP => {}
                    NLMSG_ERROR => {
                        if payload.len() < 4 {
                            return Err(os_err(libc::EBADMSG, &format!("{what}: short netlink error"), None));
                        }
                        let err = u32_at(payload, 0) as i32;
                        if err == 0 {
                            return Ok((out, intr));
                        }
                        let msg = ext_ack_msg(payload, mflags);
                        return Err(os_err(-err, what, msg.as_deref()));
                    }
                    NLMSG_DONE => {
                        if payload.len() >= 4 && (u32_at(payload, 0) as i32) < 0 {
                            let err = -(u32_at(payload, 0) as i32);
                            return Err(os_err(err, what, ext_ack_msg_done(payload, mflags).as_deref()));
                        }
                        return Ok((out, intr));
                    }
                    NLMSG_OVERRUN => {
                        return Err(os_err(libc::ENOBUFS, &format!("{what}: netlink overrun"), None));
                    }
                    _ => {
                        intr |= mflags & NLM_F_DUMP_INTR != 0;
                        out.push((mty, payload.to_vec()));
                    }
                }
            }
        }
    }

    /// A change request: sent with NLM_F_ACK, succeeds when the kernel acks it.
    fn change(&mut self, ty: u16, flags: u16, body: &[u8], what: &str) -> io::Result<()> {
        self.request(ty, flags, body, what).map(|_| ())
    }

    /// A dump, retried when the kernel reports it was interrupted by a concurrent change.
    fn dump(&mut self, ty: u16, body: &[u8], what: &str) -> io::Result<Vec<Msg>> {
        let mut tries = 0;
        loop {
            let (msgs, intr) = self.request(ty, NLM_F_DUMP, body, what)?;
            tries += 1;
            if !intr || tries >= 5 {
                return Ok(msgs);
            }
        }
    }
}

/// The kernel's extended-ack text of an NLMSG_ERROR payload: error, original header (and
/// original payload unless capped), then TLVs.
fn ext_ack_msg(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NLMSG_HDRLEN {
        return None;
    }
    let mut off = 4 + NLMSG_HDRLEN;
    if flags & NLM_F_CAPPED == 0 {
        off = 4 + align4(u32_at(payload, 4) as usize);
    }
    let tlvs = payload.get(off..)?;
    Attrs(tlvs).find(|(t, _)| *t == NLMSGERR_ATTR_MSG).map(|(_, d)| cstr(d))
}

/// The same for an NLMSG_DONE carrying an error: error, then TLVs.
fn ext_ack_msg_done(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    Attrs(payload.get(4..)?).find(|(t, _)| *t == NLMSGERR_ATTR_MSG).map(|(_, d)| cstr(d))
}

// ---- messages ----

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut b = vec![0u8; 16]; // family AF_UNSPEC, pad, type 0
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

fn ifaddrmsg(family: u8, prefix_len: u8, flags: u8, index: u32) -> Vec<u8> {
    let mut b = vec![family, prefix_len, flags, 0];
    b.extend_from_slice(&index.to_ne_bytes());
    b
}

fn list_ifaces(s: &mut Sock) -> io::Result<Vec<Iface>> {
    let mut out = Vec::new();
    for (ty, m) in s.dump(RTM_GETLINK, &ifinfomsg(0, 0, 0), "list interfaces")? {
        if ty != RTM_NEWLINK || m.len() < 16 {
            continue;
        }
        let mut i = Iface { name: String::new(), index: u32_at(&m, 4), mtu: 0, mac: String::new(), up: u32_at(&m, 8) & IFF_UP != 0, addrs: Vec::new() };
        for (t, d) in Attrs(&m[16..]) {
            match t {
                IFLA_IFNAME => i.name = cstr(d),
                IFLA_MTU if d.len() >= 4 => i.mtu = u32_at(d, 0),
                IFLA_ADDRESS => i.mac = fmt_mac(d),
                _ => {}
            }
        }
        out.push(i);
    }
    for (ty, m) in s.dump(RTM_GETADDR, &ifaddrmsg(0, 0, 0, 0), "list addresses")? {
        if ty != RTM_NEWADDR || m.len() < 8 {
            continue;
        }
        let (family, prefix_len, index) = (m[0], m[1], u32_at(&m, 4));
        let (mut local, mut address) = (None, None);
        for (t, d) in Attrs(&m[8..]) {
            match t {
                IFA_LOCAL => local = ip_from(family, d),
                IFA_ADDRESS => address = ip_from(family, d),
                _ => {}
            }
        }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS the peer's on point-to-point
        // links (IPv6 without a peer reports IFA_ADDRESS only).
        let (Some(ip), Some(i)) = (local.or(address), out.iter_mut().find(|i| i.index == index)) else {
            continue;
        };
        i.addrs.push(Addr { family: family_of(&ip), address: ip.to_string(), prefix_len });
    }
    Ok(out)
}

/// Lists the interfaces with their addresses.
pub fn list_interfaces() -> io::Result<Vec<Iface>> {
    list_ifaces(&mut Sock::open()?)
}

fn parse_addr(a: &Addr, ifname: &str) -> io::Result<(IpAddr, u8)> {
    let ip: IpAddr = a.address.trim().parse().map_err(|_| invalid(format!("interface {ifname:?}: invalid IP address {:?}", a.address)))?;
    if family_of(&ip) != a.family {
        return Err(invalid(format!("interface {ifname:?}: address {ip} is not of family {:?}", a.family)));
    }
    if a.prefix_len > max_prefix(a.family) {
        return Err(invalid(format!("interface {ifname:?}: invalid prefix length /{} for {ip}", a.prefix_len)));
    }
    Ok((ip, a.prefix_len))
}

fn is_v6_link_local(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80)
}

fn addrs_of(i: &Iface) -> Vec<(IpAddr, u8)> {
    i.addrs.iter().filter_map(|a| Some((a.address.parse().ok()?, a.prefix_len))).collect()
}

/// Configures one interface (Kata's UpdateInterface): optional rename (when found by MAC),
/// MTU, the exact set of addresses, link up or down. Returns the interface afterwards.
pub fn update_interface(want: &IfaceUpdate) -> io::Result<Iface> {
    let label = if want.mac.is_empty() { format!("{:?}", want.name) } else { format!("with MAC {}", want.mac) };
    if want.name.is_empty() && want.mac.is_empty() {
        return Err(invalid("interface update names neither an interface nor a MAC".into()));
    }
    if want.name.len() >= IFNAMSIZ || want.name.contains(['/', ' ', '\0']) {
        return Err(invalid(format!("invalid interface name {:?}", want.name)));
    }
    let mut wanted = Vec::new();
    for a in &want.addrs {
        wanted.push(parse_addr(a, if want.name.is_empty() { &want.mac } else { &want.name })?);
    }

    let mut s = Sock::open()?;
    let cur = list_ifaces(&mut s)?
        .into_iter()
        .find(|i| if want.mac.is_empty() { i.name == want.name } else { i.mac.eq_ignore_ascii_case(want.mac.trim()) })
        .ok_or_else(|| not_found(format!("interface {label} not found")))?;
    let index = cur.index;
    let mut name = cur.name.clone();

    if !want.mac.is_empty() && !want.name.is_empty() && want.name != cur.name {
        // The kernel refuses to rename a running interface: take it down first.
        if cur.up {
            s.change(RTM_NEWLINK, 0, &ifinfomsg(index, 0, IFF_UP), &format!("set interface {name:?} down"))?;
        }
        let mut m = ifinfomsg(index, 0, 0);
        let mut n = want.name.as_bytes().to_vec();
        n.push(0);
        put_attr(&mut m, IFLA_IFNAME, &n);
        s.change(RTM_NEWLINK, 0, &m, &format!("rename interface {name:?} to {:?}", want.name))?;
        name = want.name.clone();
    }

    // MTU before addresses: IPv6 addresses need an MTU of at least 1280.
    if let Some(mtu) = want.mtu.filter(|&m| m != cur.mtu) {
        let mut m = ifinfomsg(index, 0, 0);
        put_attr(&mut m, IFLA_MTU, &mtu.to_ne_bytes());
        s.change(RTM_NEWLINK, 0, &m, &format!("set MTU {mtu} on interface {name:?}"))?;
    }

    for (ip, len) in addrs_of(&cur) {
        if wanted.contains(&(ip, len)) || is_v6_link_local(&ip) {
            continue;
        }
        let mut m = ifaddrmsg(af(family_of(&ip)), len, 0, index);
        put_ip(&mut m, IFA_LOCAL, ip);
        match s.change(RTM_DELADDR, 0, &m, &format!("delete address {ip}/{len} from interface {name:?}")) {
            // Already gone (deleting a primary IPv4 address can take its secondaries along).
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => {}
            r => r?,
        }
    }

    // Re-read: deletions may have removed more than was asked.
    let present = list_ifaces(&mut s)?.into_iter().find(|i| i.index == index).map(|i| addrs_of(&i)).unwrap_or_default();
    for &(ip, len) in &wanted {
        if present.contains(&(ip, len)) {
            continue;
        }
        // No duplicate address detection for IPv6: the address is usable at once (the host
        // side has assigned it to this guest).
        let flags = if ip.is_ipv6() { IFA_F_NODAD } else { 0 };
        let mut m = ifaddrmsg(af(family_of(&ip)), len, flags, index);
        put_ip(&mut m, IFA_LOCAL, ip);
        put_ip(&mut m, IFA_ADDRESS, ip);
        if let IpAddr::V4(a) = ip {
            if len < 31 {
                let brd = u32::from(a) | (u32::MAX >> len);
                put_attr(&mut m, IFA_BROADCAST, &brd.to_be_bytes());
            }
        }
        s.change(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &m, &format!("add address {ip}/{len} to interface {name:?}"))?;
    }

    let flags = if want.up { IFF_UP } else { 0 };
    let state = if want.up { "up" } else { "down" };
    s.change(RTM_NEWLINK, 0, &ifinfomsg(index, flags, IFF_UP), &format!("set interface {name:?} {state}"))?;

    list_ifaces(&mut s)?.into_iter().find(|i| i.index == index).ok_or_else(|| not_found(format!("interface {name:?} vanished during its update")))
}

// ---- routes ----

struct RawRoute {
    entry: RouteEntry,
    oif: u32,
    protocol: u8,
    /// The rtmsg and attributes as dumped: sent back as is to delete the route.
    msg: Vec<u8>,
}

fn dump_routes(s: &mut Sock, ifaces: &[Iface]) -> io::Result<Vec<RawRoute>> {
    let mut out = Vec::new();
    for (ty, m) in s.dump(RTM_GETROUTE, &[0u8; 12], "list routes")? {
        if ty != RTM_NEWROUTE || m.len() < 12 {
            continue;
        }
        let (fam, dst_len, mut table, protocol, scope, rtype) = (m[0], m[1], m[4] as u32, m[5], m[6], m[7]);
        let family = match fam {
            AF_INET => Family::V4,
            AF_INET6 => Family::V6,
            _ => continue,
        };
        if rtype != RTN_UNICAST || u32_at(&m, 8) & RTM_F_CLONED != 0 {
            continue;
        }
        let (mut dst, mut gw, mut src, mut oif) = (None, None, None, 0);
        for (t, d) in Attrs(&m[12..]) {
            match t {
                RTA_DST => dst = ip_from(fam, d),
                RTA_GATEWAY => gw = ip_from(fam, d),
                RTA_PREFSRC => src = ip_from(fam, d),
                RTA_OIF if d.len() >= 4 => oif = u32_at(d, 0),
                RTA_TABLE if d.len() >= 4 => table = u32_at(d, 0),
                _ => {}
            }
        }
        if table != RT_TABLE_MAIN as u32 {
            continue;
        }
        let dest = match (dst_len, dst) {
            (0, _) => String::new(),
            (_, Some(d)) => format!("{d}/{dst_len}"),
            (_, None) => continue,
        };
        let show = |ip: Option<IpAddr>| ip.map(|i| i.to_string()).unwrap_or_default();
        let device = ifaces.iter().find(|i| i.index == oif).map(|i| i.name.clone()).unwrap_or_default();
        out.push(RawRoute { entry: RouteEntry { dest, gateway: show(gw), device, source: show(src), scope, family }, oif, protocol, msg: m });
    }
    Ok(out)
}

/// Lists the main table's unicast routes, IPv4 and IPv6.
pub fn list_routes() -> io::Result<Vec<RouteEntry>> {
    let mut s = Sock::open()?;
    let ifaces = list_ifaces(&mut s)?;
    Ok(dump_routes(&mut s, &ifaces)?.into_iter().map(|r| r.entry).collect())
}

/// "default via 10.0.0.1 dev eth0", as `ip route` shows it, for messages.
fn describe(r: &RouteEntry) -> String {
    let mut s = if r.dest.is_empty() || r.dest == "default" { "default".to_string() } else { r.dest.clone() };
    if !r.gateway.is_empty() {
        s += &format!(" via {}", r.gateway);
    }
    if !r.device.is_empty() {
        s += &format!(" dev {}", r.device);
    }
    if !r.source.is_empty() {
        s += &format!(" src {}", r.source);
    }
    s
}

struct Want {
    entry: RouteEntry, // normalised: canonical addresses, "" for default
    dst: Option<(IpAddr, u8)>,
    gw: Option<IpAddr>,
    src: Option<IpAddr>,
    oif: u32,
}

fn parse_ip_of(s: &str, f: Family, what: &str, route: &str) -> io::Result<Option<IpAddr>> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    let ip: IpAddr = s.trim().parse().map_err(|_| invalid(format!("route {route}: invalid {what} address {s:?}")))?;
    if family_of(&ip) != f {
        return Err(invalid(format!("route {route}: {what} {ip} is not of family {f:?}")));
    }
    Ok(Some(ip))
}

fn parse_route(r: &RouteEntry, ifaces: &[Iface]) -> io::Result<Want> {
    let route = describe(r);
    if r.device.is_empty() {
        return Err(invalid(format!("route {route}: no device given")));
    }
    let oif =
        ifaces.iter().find(|i| i.name == r.device).map(|i| i.index).ok_or_else(|| not_found(format!("route {route}: interface {:?} not found", r.device)))?;
    let dest = r.dest.trim();
    let dst = if dest.is_empty() || dest == "default" {
        None
    } else {
        let (a, len) = match dest.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (dest, None),
        };
        let ip = parse_ip_of(a, r.family, "destination", &route)?.ok_or_else(|| invalid(format!("route {route}: invalid destination {dest:?}")))?;
        let len = match len {
            None => max_prefix(r.family),
            Some(l) => l
                .parse::<u8>()
                .ok()
                .filter(|&l| l <= max_prefix(r.family))
                .ok_or_else(|| invalid(format!("route {route}: invalid prefix length in {dest:?}")))?,
        };
        if len == 0 {
            None
        } else {
            Some((ip, len))
        }
    };
    let gw = parse_ip_of(&r.gateway, r.family, "gateway", &route)?;
    let src = parse_ip_of(&r.source, r.family, "source", &route)?;
    let show = |ip: Option<IpAddr>| ip.map(|i| i.to_string()).unwrap_or_default();
    let entry = RouteEntry {
        dest: dst.map(|(ip, l)| format!("{ip}/{l}")).unwrap_or_default(),
        gateway: show(gw),
        device: r.device.clone(),
        source: show(src),
        scope: r.scope,
        family: r.family,
    };
    Ok(Want { entry, dst, gw, src, oif })
}

/// Route identity for comparing wanted with present routes: the kernel reports every IPv6
/// route with universe scope whatever scope it was added with, so scope counts for IPv4 only.
fn same_route(a: &RouteEntry, b: &RouteEntry) -> bool {
    a.family == b.family
        && a.dest == b.dest
        && a.gateway == b.gateway
        && a.device == b.device
        && a.source == b.source
        && (a.family == Family::V6 || a.scope == b.scope)
}

/// Kata's UpdateRoutes: makes the main-table routes of the devices named in `routes` equal to
/// the list (routes the kernel made itself, protocol "kernel", e.g. a connected subnet's, are
/// kept), adding link-scope routes before gateway routes. Devices not named are untouched.
/// Returns the routes afterwards, as [`list_routes`].
pub fn update_routes(routes: &[RouteEntry]) -> io::Result<Vec<RouteEntry>> {
    let mut s = Sock::open()?;
    let ifaces = list_ifaces(&mut s)?;
    let mut wants = Vec::new();
    for r in routes {
        wants.push(parse_route(r, &ifaces)?);
    }
    let devices: HashSet<u32> = wants.iter().map(|w| w.oif).collect();
    let present = dump_routes(&mut s, &ifaces)?;

    for p in &present {
        if !devices.contains(&p.oif) || p.protocol == RTPROT_KERNEL || wants.iter().any(|w| same_route(&w.entry, &p.entry)) {
            continue;
        }
        match s.change(RTM_DELROUTE, 0, &p.msg, &format!("delete route {}", describe(&p.entry))) {
            Err(e) if errno(&e) == Some(libc::ESRCH) => {} // already gone
            r => r?,
        }
    }

    // Routes without a gateway (the link routes gateways are reached by) first.
    let mut order: Vec<&Want> = wants.iter().filter(|w| w.gw.is_none()).collect();
    order.extend(wants.iter().filter(|w| w.gw.is_some()));
    for w in order {
        if present.iter().any(|p| same_route(&w.entry, &p.entry)) {
            continue;
        }
        let fam = af(w.entry.family);
        let (dst_len, dst) = w.dst.map_or((0, None), |(ip, l)| (l, Some(ip)));
        let mut m = vec![fam, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, w.entry.scope, RTN_UNICAST];
        m.extend_from_slice(&0u32.to_ne_bytes());
        if let Some(d) = dst {
            put_ip(&mut m, RTA_DST, d);
        }
        if let Some(g) = w.gw {
            put_ip(&mut m, RTA_GATEWAY, g);
        }
        if let Some(src) = w.src {
            put_ip(&mut m, RTA_PREFSRC, src);
        }
        put_attr(&mut m, RTA_OIF, &w.oif.to_ne_bytes());
        s.change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &m, &format!("add route {}", describe(&w.entry)))?;
    }

    let ifaces = list_ifaces(&mut s)?;
    Ok(dump_routes(&mut s, &ifaces)?.into_iter().map(|r| r.entry).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attrs_walk_with_padding() {
        let mut b = Vec::new();
        put_attr(&mut b, 3, b"eth0\0");
        put_attr(&mut b, 4, &1500u32.to_ne_bytes());
        assert_eq!(b.len(), 12 + 8);
        let v: Vec<_> = Attrs(&b).collect();
        assert_eq!(v, vec![(3, &b"eth0\0"[..]), (4, &1500u32.to_ne_bytes()[..])]);
        // A truncated attribute ends the walk instead of panicking.
        assert_eq!(Attrs(&b[..10]).count(), 1);
    }

    #[test]
    fn ext_ack_text_is_found() {
        // error -22, capped original header, then a MSG TLV.
        let mut p = (-22i32).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0u8; 16]);
        put_attr(&mut p, NLMSGERR_ATTR_MSG, b"Nexthop has invalid gateway\0");
        assert_eq!(ext_ack_msg(&p, NLM_F_CAPPED | NLM_F_ACK_TLVS).as_deref(), Some("Nexthop has invalid gateway"));
        assert_eq!(ext_ack_msg(&p, NLM_F_CAPPED), None);
    }

    #[test]
    fn route_input_is_normalised() {
        let ifaces = vec![Iface { name: "eth0".into(), index: 2, mtu: 1500, mac: String::new(), up: true, addrs: vec![] }];
        let r = |dest: &str, gw: &str, fam| RouteEntry {
            dest: dest.into(),
            gateway: gw.into(),
            device: "eth0".into(),
            source: String::new(),
            scope: 0,
            family: fam,
        };
        let w = parse_route(&r("default", "10.0.0.1", Family::V4), &ifaces).unwrap();
        assert_eq!(w.entry.dest, "");
        assert_eq!(w.oif, 2);
        let w = parse_route(&r("0.0.0.0/0", "", Family::V4), &ifaces).unwrap();
        assert!(w.dst.is_none());
        let w = parse_route(&r("2001:db8:0::/64", "", Family::V6), &ifaces).unwrap();
        assert_eq!(w.entry.dest, "2001:db8::/64");
        let w = parse_route(&r("10.1.2.3", "", Family::V4), &ifaces).unwrap();
        assert_eq!(w.entry.dest, "10.1.2.3/32");
        let e = parse_route(&r("10.0.0.0/33", "", Family::V4), &ifaces).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = parse_route(&r("", "fe80::1", Family::V4), &ifaces).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let mut bad = r("", "10.0.0.1", Family::V4);
        bad.device = "eth9".into();
        let e = parse_route(&bad, &ifaces).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("\"eth9\""), "{e}");
        assert_eq!(errno(&e), Some(libc::ENODEV));
    }
}
