//! Real rtnetlink tests of `osb_agent::net`, checked against iproute2 (`ip -j`) as oracle.
//!
//! Each test moves its own thread into a fresh network namespace (`unshare(CLONE_NEWNET)`
//! affects only the calling thread; sockets it opens and processes it spawns live in the new
//! namespace, and the namespace disappears with the thread), so the host is never touched.
//! libtest runs every test on a thread of its own. Needs root (CAP_SYS_ADMIN) and `ip`; without
//! them the tests record a skip (testkit::skip, listed by `cargo xtask test`) and check nothing.

use std::io;
use std::process::Command;

use osb_agent::net::{self, Addr, Family, IfaceUpdate, RouteEntry};

// ---- namespace and iproute2 helpers ----

/// Moves this thread into a new, empty network namespace. False, with the skip recorded
/// (testkit::skip), when that is not possible here.
fn fresh_netns(test: &str) -> bool {
    if Command::new("ip").arg("-V").output().is_err() {
        testkit::skip!(test, "iproute2 `ip` not found (ci/setup.sh installs iproute2)");
        return false;
    }
    // SAFETY: plain syscall.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        testkit::skip!(test, "unshare(CLONE_NEWNET): {} (needs root)", io::Error::last_os_error());
        return false;
    }
    true
}

fn ip(args: &str) -> String {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn ip_json(args: &str) -> Json {
    parse_json(&ip(&format!("-j {args}")))
}

/// A link with a carrier: a dummy if the kernel has the driver, else one end of a veth pair
/// (the peer `NAMEp` brought up).
fn add_link(name: &str, mac: &str) {
    let dummy = Command::new("ip").args(["link", "add", name, "type", "dummy"]).output().unwrap();
    if !dummy.status.success() {
        ip(&format!("link add {name} type veth peer name {name}p"));
        ip(&format!("link set {name}p up"));
    }
    ip(&format!("link set {name} address {mac}"));
}

fn v4(a: &str, len: u8) -> Addr {
    Addr { family: Family::V4, address: a.into(), prefix_len: len }
}

fn v6(a: &str, len: u8) -> Addr {
    Addr { family: Family::V6, address: a.into(), prefix_len: len }
}

fn route(dest: &str, gw: &str, dev: &str, scope: u8, family: Family) -> RouteEntry {
    RouteEntry { dest: dest.into(), gateway: gw.into(), device: dev.into(), source: String::new(), scope, family }
}

/// (local, prefixlen) of every address `ip` shows on a device.
fn oracle_addrs(dev: &str) -> Vec<(String, u8)> {
    let j = ip_json(&format!("addr show dev {dev}"));
    let mut v = Vec::new();
    for a in j.idx(0).get("addr_info").arr() {
        v.push((a.get("local").str().to_string(), a.get("prefixlen").num() as u8));
    }
    v.sort();
    v
}

fn oracle_link(dev: &str) -> Json {
    ip_json(&format!("link show dev {dev}")).idx(0).clone()
}

/// Routes `ip` shows for a family in the main table, as "dst|gateway|dev|scope".
fn oracle_routes(family: &str) -> Vec<String> {
    let mut v: Vec<String> = ip_json(&format!("{family} route show table main"))
        .arr()
        .iter()
        .filter(|r| r.get("type").opt_str().is_none_or(|t| t == "unicast"))
        .map(|r| {
            format!(
                "{}|{}|{}|{}",
                r.get("dst").str(),
                r.get("gateway").opt_str().unwrap_or(""),
                r.get("dev").opt_str().unwrap_or(""),
                r.get("scope").opt_str().unwrap_or("global")
            )
        })
        .collect();
    v.sort();
    v
}

/// The interface without its IPv6 link-local addresses.
fn no_ll(mut i: net::Iface) -> net::Iface {
    i.addrs.retain(|a| !a.address.starts_with("fe80:"));
    i
}

fn has_v4_route(list: &[RouteEntry], dest: &str, gw: &str, dev: &str) -> bool {
    list.iter().any(|r| r.family == Family::V4 && r.dest == dest && r.gateway == gw && r.device == dev)
}

// ---- tests ----

#[test]
fn list_matches_ip_link_and_addr() {
    if !fresh_netns("list_matches_ip_link_and_addr") {
        return;
    }
    add_link("tst0", "02:11:22:33:44:55");
    ip("addr add 10.9.0.5/24 dev tst0");
    let list = net::list_interfaces().unwrap();
    let lo = list.iter().find(|i| i.name == "lo").expect("lo listed");
    assert_eq!(lo.index, 1);
    let t = list.iter().find(|i| i.name == "tst0").expect("tst0 listed");
    assert_eq!(t.mac, "02:11:22:33:44:55");
    assert!(!t.up);
    assert_eq!(t.addrs, vec![v4("10.9.0.5", 24)]);

    // Every interface agrees with iproute2.
    let links = ip_json("link show");
    assert_eq!(links.arr().len(), list.len());
    for l in links.arr() {
        let name = l.get("ifname").str();
        let ours = list.iter().find(|i| i.name == name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(ours.index as f64, l.get("ifindex").num(), "{name}");
        assert_eq!(ours.mtu as f64, l.get("mtu").num(), "{name}");
        assert_eq!(ours.mac, l.get("address").opt_str().unwrap_or(""), "{name}");
        let up = l.get("flags").arr().iter().any(|f| f.str() == "UP");
        assert_eq!(ours.up, up, "{name}");
        let mut addrs: Vec<_> = ours.addrs.iter().map(|a| (a.address.clone(), a.prefix_len)).collect();
        addrs.sort();
        assert_eq!(addrs, oracle_addrs(name), "{name}");
    }
}

#[test]
fn update_sets_mtu_addresses_and_up_then_replaces_addresses() {
    if !fresh_netns("update_sets_mtu_addresses_and_up_then_replaces_addresses") {
        return;
    }
    add_link("tst0", "02:11:22:33:44:66");
    ip("addr add 10.99.0.7/16 dev tst0"); // stale, must go

    let want = IfaceUpdate { name: "tst0".into(), mtu: Some(1400), addrs: vec![v4("10.20.0.2", 24), v6("fd00:20::2", 64)], up: true, ..Default::default() };
    let got = net::update_interface(&want).unwrap();
    assert_eq!(got.name, "tst0");
    assert_eq!(got.mtu, 1400);
    assert!(got.up);
    let ours: Vec<_> = got.addrs.iter().filter(|a| !a.address.starts_with("fe80:")).cloned().collect();
    assert_eq!(ours.len(), 2, "{:?}", got.addrs);
    assert!(ours.contains(&v4("10.20.0.2", 24)) && ours.contains(&v6("fd00:20::2", 64)), "{ours:?}");
    // (IPv6 link-local addresses come and go with the carrier, asynchronously: compare without.)
    let listed = net::list_interfaces().unwrap().into_iter().find(|i| i.name == "tst0").unwrap();
    assert_eq!(no_ll(listed), no_ll(got.clone()));

    // The oracle.
    let link = oracle_link("tst0");
    assert_eq!(link.get("mtu").num(), 1400.0);
    assert!(link.get("flags").arr().iter().any(|f| f.str() == "UP"));
    let addrs = oracle_addrs("tst0");
    assert!(addrs.contains(&("10.20.0.2".into(), 24)), "{addrs:?}");
    assert!(addrs.contains(&("fd00:20::2".into(), 64)), "{addrs:?}");
    assert!(!addrs.iter().any(|(a, _)| a == "10.99.0.7"), "stale address kept: {addrs:?}");
    // No DAD: the IPv6 address is usable at once, not tentative.
    let j = ip_json("addr show dev tst0");
    let a6 = j.idx(0).get("addr_info").arr().iter().find(|a| a.get("local").str() == "fd00:20::2").unwrap().clone();
    assert!(a6.get("tentative").opt_bool() != Some(true), "tentative: {a6:?}");

    // Same update again: idempotent.
    assert_eq!(no_ll(net::update_interface(&want).unwrap()), no_ll(got));

    // Replace: only the new address remains (link-local IPv6 is kernel-managed and stays).
    let got2 = net::update_interface(&IfaceUpdate { name: "tst0".into(), addrs: vec![v4("10.20.0.3", 24)], up: true, ..Default::default() }).unwrap();
    assert_eq!(got2.mtu, 1400, "mtu None leaves it alone");
    let non_ll: Vec<_> = got2.addrs.iter().filter(|a| !a.address.starts_with("fe80:")).cloned().collect();
    assert_eq!(non_ll, vec![v4("10.20.0.3", 24)]);
    let addrs = oracle_addrs("tst0");
    assert!(!addrs.iter().any(|(a, _)| a == "10.20.0.2" || a == "fd00:20::2"), "{addrs:?}");
    assert!(addrs.contains(&("10.20.0.3".into(), 24)), "{addrs:?}");

    // Down.
    let got3 = net::update_interface(&IfaceUpdate { name: "tst0".into(), addrs: vec![v4("10.20.0.3", 24)], up: false, ..Default::default() }).unwrap();
    assert!(!got3.up);
    assert!(!oracle_link("tst0").get("flags").arr().iter().any(|f| f.str() == "UP"));
}

#[test]
fn update_by_mac_renames() {
    if !fresh_netns("update_by_mac_renames") {
        return;
    }
    add_link("tst0", "02:aa:bb:cc:dd:ee");
    ip("link set tst0 up");
    let got = net::update_interface(&IfaceUpdate {
        name: "eth0".into(),
        mac: "02:AA:BB:CC:DD:EE".into(),
        mtu: Some(1450),
        addrs: vec![v4("172.16.5.2", 30)],
        up: true,
    })
    .unwrap();
    assert_eq!(got.name, "eth0");
    assert_eq!(got.mac, "02:aa:bb:cc:dd:ee");
    assert!(got.up);
    let link = oracle_link("eth0");
    assert_eq!(link.get("mtu").num(), 1450.0);
    assert_eq!(oracle_addrs("eth0").first(), Some(&("172.16.5.2".to_string(), 30)));
}

#[test]
fn update_routes_adds_replaces_and_leaves_other_devices_alone() {
    if !fresh_netns("update_routes_adds_replaces_and_leaves_other_devices_alone") {
        return;
    }
    add_link("tst0", "02:11:22:33:44:77");
    add_link("tst1", "02:11:22:33:44:88");
    net::update_interface(&IfaceUpdate { name: "tst0".into(), addrs: vec![v4("10.20.0.2", 24), v6("fd00:20::2", 64)], up: true, ..Default::default() })
        .unwrap();
    ip("link set tst1 up");
    ip("addr add 10.50.0.2/24 dev tst1");
    ip("route add 10.51.0.0/16 via 10.50.0.1 dev tst1");
    ip("route add 10.77.0.0/16 via 10.20.0.1 dev tst0"); // stale, must go

    // Gateway route listed first: the link route it needs must still be added before it.
    let want = vec![
        route("default", "10.30.0.1", "tst0", 0, Family::V4),
        route("10.30.0.0/24", "", "tst0", 253, Family::V4),
        route("", "fd00:20::1", "tst0", 0, Family::V6),
    ];
    let after = net::update_routes(&want).unwrap();
    assert!(has_v4_route(&after, "", "10.30.0.1", "tst0"), "{after:#?}");
    assert!(after.iter().any(|r| r.dest == "10.30.0.0/24" && r.device == "tst0" && r.scope == 253 && r.gateway.is_empty()), "{after:#?}");
    assert!(after.iter().any(|r| r.family == Family::V6 && r.dest.is_empty() && r.gateway == "fd00:20::1"), "{after:#?}");
    assert!(!after.iter().any(|r| r.dest == "10.77.0.0/16"), "stale route kept: {after:#?}");
    // Kernel routes of the addresses stay, other devices are untouched.
    assert!(has_v4_route(&after, "10.20.0.0/24", "", "tst0"), "{after:#?}");
    assert!(has_v4_route(&after, "10.51.0.0/16", "10.50.0.1", "tst1"), "{after:#?}");
    assert_eq!(after, net::list_routes().unwrap());

    let r4 = oracle_routes("-4");
    for want in ["default|10.30.0.1|tst0|global", "10.30.0.0/24||tst0|link", "10.20.0.0/24||tst0|link", "10.51.0.0/16|10.50.0.1|tst1|global"] {
        assert!(r4.contains(&want.to_string()), "{want} not in {r4:#?}");
    }
    assert!(!r4.iter().any(|r| r.starts_with("10.77.0.0/16")), "{r4:#?}");
    let r6 = oracle_routes("-6");
    assert!(r6.contains(&"default|fd00:20::1|tst0|global".to_string()), "{r6:#?}");
    // Our list shows exactly what iproute2 shows for IPv4.
    let mut ours4: Vec<String> = after
        .iter()
        .filter(|r| r.family == Family::V4)
        .map(|r| {
            let scope = match r.scope {
                0 => "global",
                253 => "link",
                254 => "host",
                _ => "?",
            };
            let dst = if r.dest.is_empty() { "default" } else { &r.dest };
            format!("{dst}|{}|{}|{scope}", r.gateway, r.device)
        })
        .collect();
    ours4.sort();
    assert_eq!(ours4, r4);

    // Same list again: nothing changes.
    assert_eq!(net::update_routes(&want).unwrap(), after);

    // Replacing the list deletes the routes no longer wanted on tst0.
    let after2 = net::update_routes(&[route("10.40.0.0/16", "10.20.0.1", "tst0", 0, Family::V4)]).unwrap();
    assert!(has_v4_route(&after2, "10.40.0.0/16", "10.20.0.1", "tst0"), "{after2:#?}");
    assert!(!after2.iter().any(|r| r.device == "tst0" && (r.dest.is_empty() || r.dest == "10.30.0.0/24")), "{after2:#?}");
    assert!(has_v4_route(&after2, "10.51.0.0/16", "10.50.0.1", "tst1"), "{after2:#?}");
    let r4 = oracle_routes("-4");
    assert!(!r4.iter().any(|r| r.starts_with("default") || r.starts_with("10.30.0.0/24")), "{r4:#?}");
    assert!(r4.contains(&"10.40.0.0/16|10.20.0.1|tst0|global".to_string()), "{r4:#?}");
    // IPv6 default was on tst0 and not in the new list: gone.
    assert!(!oracle_routes("-6").iter().any(|r| r.starts_with("default")));
}

#[test]
fn large_dumps_span_several_datagrams() {
    if !fresh_netns("large_dumps_span_several_datagrams") {
        return;
    }
    add_link("tst0", "02:11:22:33:44:aa");
    ip("link set tst0 up");
    // 300 addresses of one subnet (the first primary, the rest its secondaries) and 3000
    // routes: each dump is far larger than one netlink datagram.
    let mut batch = String::new();
    for i in 0..300 {
        batch += &format!("addr add 10.20.{}.{}/16 dev tst0\n", 1 + i / 250, 1 + i % 250);
    }
    for i in 0..3000 {
        batch += &format!("route add 10.{}.{}.0/24 via 10.20.0.254 dev tst0\n", 100 + i / 256, i % 256);
    }
    let path = std::env::temp_dir().join(format!("osb-net-batch-{}", std::process::id()));
    std::fs::write(&path, batch).unwrap();
    ip(&format!("-batch {}", path.display()));
    let _ = std::fs::remove_file(&path);

    let t = net::list_interfaces().unwrap().into_iter().find(|i| i.name == "tst0").unwrap();
    assert_eq!(no_ll(t).addrs.len(), 300);
    assert_eq!(oracle_addrs("tst0").iter().filter(|(a, _)| !a.starts_with("fe80")).count(), 300);
    let routes = net::list_routes().unwrap();
    let r4: Vec<_> = routes.iter().filter(|r| r.family == Family::V4).collect();
    assert_eq!(r4.len(), oracle_routes("-4").len());
    assert_eq!(r4.iter().filter(|r| r.gateway == "10.20.0.254").count(), 3000);

    // Replacing them all: deleting the primary takes the secondaries along, which must not
    // fail the update; the routes through the removed subnet go with it.
    let got = net::update_interface(&IfaceUpdate { name: "tst0".into(), addrs: vec![v4("10.21.0.2", 24)], up: true, ..Default::default() }).unwrap();
    assert_eq!(no_ll(got).addrs, vec![v4("10.21.0.2", 24)]);
    let after = net::update_routes(&[route("", "10.21.0.1", "tst0", 0, Family::V4)]).unwrap();
    let r4: Vec<_> = after.iter().filter(|r| r.family == Family::V4 && r.device == "tst0").collect();
    assert_eq!(r4.len(), 2, "{r4:#?}"); // the default route and the kernel's 10.21.0.0/24
}

#[test]
fn errors_name_the_culprit() {
    if !fresh_netns("errors_name_the_culprit") {
        return;
    }
    add_link("tst0", "02:11:22:33:44:99");
    ip("link set tst0 up");
    ip("addr add 10.20.0.2/24 dev tst0");

    // Unknown interface, by name and by MAC.
    let e = net::update_interface(&IfaceUpdate { name: "nope0".into(), up: true, ..Default::default() }).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("nope0"), "{e}");
    assert_eq!(net::errno(&e), Some(libc::ENODEV));
    let e = net::update_interface(&IfaceUpdate { mac: "02:00:00:00:00:01".into(), ..Default::default() }).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("02:00:00:00:00:01"), "{e}");
    let e = net::update_routes(&[route("", "10.20.0.1", "nope0", 0, Family::V4)]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("nope0"), "{e}");

    // Bad input is rejected before anything changes.
    let e = net::update_interface(&IfaceUpdate {
        name: "tst0".into(),
        mtu: Some(1300),
        addrs: vec![v4("10.20.0.9", 24), v4("10.0.0.300", 24)],
        up: true,
        ..Default::default()
    })
    .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(net::errno(&e), Some(libc::EINVAL));
    assert!(e.to_string().contains("10.0.0.300") && e.to_string().contains("tst0"), "{e}");
    assert_eq!(oracle_link("tst0").get("mtu").num(), 1500.0);
    assert_eq!(oracle_addrs("tst0").iter().filter(|(a, _)| !a.starts_with("fe80")).count(), 1);
    for bad in [v6("10.0.0.1", 24), v4("10.0.0.1", 33)] {
        let e = net::update_interface(&IfaceUpdate { name: "tst0".into(), addrs: vec![bad], ..Default::default() }).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
    let e = net::update_routes(&[route("10.1.0.0/24", "not-an-ip", "tst0", 0, Family::V4)]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("not-an-ip"), "{e}");

    // A gateway not on any link: the kernel's errno, with the route named.
    let e = net::update_routes(&[route("", "192.0.2.1", "tst0", 0, Family::V4)]).unwrap_err();
    assert_eq!(net::errno(&e), Some(libc::ENETUNREACH), "{e}");
    assert_eq!(e.kind(), io::ErrorKind::NetworkUnreachable);
    let msg = e.to_string();
    assert!(msg.contains("unreachable") && msg.contains("192.0.2.1") && msg.contains("tst0"), "{msg}");
    eprintln!("gateway error reads: {msg}");

    // A kernel rejection of a change (host bits set in a destination).
    let e = net::update_routes(&[route("10.20.0.5/16", "", "tst0", 253, Family::V4)]).unwrap_err();
    assert_eq!(net::errno(&e), Some(libc::EINVAL), "{e}");
    assert!(e.to_string().contains("10.20.0.5/16"), "{e}");
}

// ---- a minimal JSON reader for `ip -j` output ----

#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

static NULL: Json = Json::Null;

impl Json {
    fn get(&self, k: &str) -> &Json {
        match self {
            Json::Obj(v) => v.iter().find(|(n, _)| n == k).map(|(_, j)| j).unwrap_or(&NULL),
            _ => &NULL,
        }
    }
    fn idx(&self, i: usize) -> &Json {
        match self {
            Json::Arr(v) => v.get(i).unwrap_or(&NULL),
            _ => &NULL,
        }
    }
    fn arr(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => &[],
        }
    }
    fn opt_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    fn str(&self) -> &str {
        self.opt_str().unwrap_or_else(|| panic!("not a string: {self:?}"))
    }
    fn num(&self) -> f64 {
        match self {
            Json::Num(n) => *n,
            _ => panic!("not a number: {self:?}"),
        }
    }
    fn opt_bool(&self) -> Option<bool> {
        match self {
            Json::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

fn parse_json(s: &str) -> Json {
    let b = s.as_bytes();
    let mut i = 0;
    let v = value(b, &mut i);
    ws(b, &mut i);
    assert_eq!(i, b.len(), "trailing JSON: {s}");
    v
}

fn ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn value(b: &[u8], i: &mut usize) -> Json {
    ws(b, i);
    match b[*i] {
        b'{' => {
            *i += 1;
            let mut v = Vec::new();
            loop {
                ws(b, i);
                if b[*i] == b'}' {
                    *i += 1;
                    return Json::Obj(v);
                }
                let Json::Str(k) = value(b, i) else { panic!("object key") };
                ws(b, i);
                assert_eq!(b[*i], b':');
                *i += 1;
                v.push((k, value(b, i)));
                ws(b, i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'[' => {
            *i += 1;
            let mut v = Vec::new();
            loop {
                ws(b, i);
                if b[*i] == b']' {
                    *i += 1;
                    return Json::Arr(v);
                }
                v.push(value(b, i));
                ws(b, i);
                if b[*i] == b',' {
                    *i += 1;
                }
            }
        }
        b'"' => {
            *i += 1;
            let mut s = Vec::new();
            while b[*i] != b'"' {
                if b[*i] == b'\\' {
                    *i += 1;
                    match b[*i] {
                        b'n' => s.push(b'\n'),
                        b't' => s.push(b'\t'),
                        b'u' => {
                            let h = std::str::from_utf8(&b[*i + 1..*i + 5]).unwrap();
                            let c = char::from_u32(u32::from_str_radix(h, 16).unwrap()).unwrap_or('?');
                            s.extend_from_slice(c.to_string().as_bytes());
                            *i += 4;
                        }
                        c => s.push(c),
                    }
                } else {
                    s.push(b[*i]);
                }
                *i += 1;
            }
            *i += 1;
            Json::Str(String::from_utf8(s).unwrap())
        }
        b't' => {
            *i += 4;
            Json::Bool(true)
        }
        b'f' => {
            *i += 5;
            Json::Bool(false)
        }
        b'n' => {
            *i += 4;
            Json::Null
        }
        _ => {
            let st = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            Json::Num(std::str::from_utf8(&b[st..*i]).unwrap().parse().unwrap())
        }
    }
}

#[test]
fn json_reader_reads_ip_output_shapes() {
    let j = parse_json(r#"[{"ifindex":1,"flags":["UP"],"x":null,"t":true,"s":"a\"b\u0041"}]"#);
    assert_eq!(j.idx(0).get("ifindex").num(), 1.0);
    assert_eq!(j.idx(0).get("flags").arr()[0].str(), "UP");
    assert_eq!(j.idx(0).get("s").str(), "a\"bA");
    assert_eq!(j.idx(0).get("t").opt_bool(), Some(true));
}
