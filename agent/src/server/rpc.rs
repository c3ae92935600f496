//! The ttrpc server transport: framing, dispatch and limits.
//!
//! The `ttrpc` crate's generated service bindings (`create_agent_service`,
//! `create_health`) are reused as they are, but not its sync `Server`, because that
//! server answers an unknown method with INVALID_ARGUMENT where containerd's Go ttrpc
//! (the protocol's reference) answers UNIMPLEMENTED, and it has no bound on
//! connections or in-flight requests. This loop follows the Go server:
//!
//! - a frame is a 10-byte header (length u32 BE, stream id u32 BE, type u8, flags u8)
//!   and a protobuf payload; payloads over 4 MiB are discarded and answered
//!   RESOURCE_EXHAUSTED ("message length N exceed maximum message size of 4194304");
//! - requests (type 1) need an odd stream id larger than the last one, else
//!   INVALID_ARGUMENT; data frames (type 3) for a stream that is not open are
//!   answered INVALID_ARGUMENT; other types are ignored;
//! - an undecodable request envelope is INVALID_ARGUMENT; an unknown service or
//!   method is UNIMPLEMENTED ("service X" / "method Y").
//!
//! Each request runs on a thread of its own, so blocking calls (ReadStdout,
//! WaitProcess) never starve the others; the number of connections and of requests
//! in flight is capped (RESOURCE_EXHAUSTED past the cap). When a client goes away,
//! its handlers see the connection's cancel channel disconnect and return.
//!
//! Idle connections cannot lock a new client out: at the connection cap, the
//! connection idle longest (no request in flight or being read) is shut down to make
//! room; only when every connection is busy is the new one closed.
//!
//! The bytes in flight are bounded too, not only the count (512 requests of 4 MiB
//! would be 2 GiB): a frame over [`SMALL_FRAME`] takes its length from a budget
//! shared by all connections ([`Limits::max_inflight_bytes`]) before its payload is
//! read, and gives it back when its handler returns. A frame that does not fit waits
//! (its connection's reader stops reading, so the client's writes block: backpressure)
//! rather than failing. Small frames (ReadStdout, WaitProcess, Health, ...) never
//! wait, so a budget held by writes to a stuck process cannot starve the reads that
//! would unstick it; the count cap bounds them (512 x 16 KiB). A request is in memory
//! about twice while it runs (its envelope and its decoded message).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use ttrpc::proto::{MessageHeader, MESSAGE_HEADER_LENGTH, MESSAGE_TYPE_DATA, MESSAGE_TYPE_REQUEST, MESSAGE_TYPE_RESPONSE};
use ttrpc::{Code, MethodHandler, Request, Response, TtrpcContext};

use super::sys;

/// Frames up to this size are not counted against [`Limits::max_inflight_bytes`].
pub const SMALL_FRAME: usize = 16 * 1024;

/// Limits of the transport.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame payload accepted (ttrpc's own limit: 4 MiB).
    pub max_frame: usize,
    /// Connections served at once; past it a new one replaces the connection idle
    /// longest, or is closed right after accept when none is idle.
    pub max_connections: usize,
    /// Requests in flight on one connection.
    pub max_inflight_per_connection: usize,
    /// Requests in flight on all connections together.
    pub max_inflight: usize,
    /// Bytes of frames over [`SMALL_FRAME`] in flight on all connections together;
    /// a frame that does not fit waits for room.
    pub max_inflight_bytes: usize,
    /// A response write blocked this long (client not reading) closes the connection.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_frame: ttrpc::proto::MESSAGE_LENGTH_MAX,
            max_connections: 64,
            max_inflight_per_connection: 128,
            max_inflight: 512,
            max_inflight_bytes: 16 << 20,
            write_timeout: Duration::from_secs(30),
        }
    }
}

type Methods = HashMap<String, Box<dyn MethodHandler + Send + Sync>>;

/// The registered methods, by `/service/method` path.
pub struct Dispatcher {
    methods: Methods,
    services: HashSet<String>,
}

impl Dispatcher {
    pub fn new(services: impl IntoIterator<Item = Methods>) -> Dispatcher {
        let mut methods = Methods::new();
        for service in services {
            methods.extend(service);
        }
        let services = methods.keys().filter_map(|path| path.trim_start_matches('/').split_once('/')).map(|(service, _)| service.to_string()).collect();
        Dispatcher { methods, services }
    }

    /// The handler of `service`/`method`, or the UNIMPLEMENTED status Go's ttrpc
    /// answers.
    fn lookup(&self, service: &str, method: &str) -> Result<&(dyn MethodHandler + Send + Sync), ttrpc::Status> {
        if let Some(handler) = self.methods.get(&format!("/{service}/{method}")) {
            return Ok(handler.as_ref());
        }
        let message = if self.services.contains(service) { format!("method {method}") } else { format!("service {service}") };
        Err(ttrpc::get_status(Code::UNIMPLEMENTED, message))
    }
}

/// Which vsock peers may connect (`--allow-cid`).
///
/// Any guest process may open an AF_VSOCK socket; where the guest kernel has vsock
/// loopback (or answers its own CID) it would reach the agent, which runs as root and
/// starts processes. So by default only the host, CID 2, is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Only this CID.
    Cid(u32),
    /// Every peer.
    Any,
}

impl Default for Peers {
    fn default() -> Peers {
        Peers::Cid(libc::VMADDR_CID_HOST)
    }
}

impl Peers {
    /// `any` or a CID.
    pub fn parse(s: &str) -> Result<Peers, String> {
        if s == "any" {
            return Ok(Peers::Any);
        }
        s.parse().map(Peers::Cid).map_err(|_| format!("{s:?} is neither a vsock CID nor \"any\""))
    }

    /// A connection from `cid` may be served.
    pub fn allows(self, cid: u32) -> bool {
        match self {
            Peers::Any => true,
            Peers::Cid(allowed) => cid == allowed,
        }
    }
}

impl std::fmt::Display for Peers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peers::Any => f.write_str("any CID"),
            Peers::Cid(cid) => write!(f, "CID {cid}"),
        }
    }
}

/// Where connections come from.
pub enum Listener {
    /// Host tests: every connection is served (the socket file's mode guards it).
    Unix(std::os::unix::net::UnixListener),
    Vsock {
        fd: OwnedFd,
        peers: Peers,
        refused: AtomicU64,
    },
}

impl Listener {
    pub fn vsock(fd: OwnedFd, peers: Peers) -> Listener {
        Listener::Vsock { fd, peers, refused: AtomicU64::new(0) }
    }

    /// The next connection to serve; None for one that was refused (and closed).
    fn accept(&self) -> std::io::Result<Option<OwnedFd>> {
        match self {
            Listener::Unix(l) => l.accept().map(|(stream, _)| Some(stream.into())),
            Listener::Vsock { fd, peers, refused } => {
                let (conn, cid) = sys::accept_vsock(fd.as_fd())?;
                Ok(admit_peer(*peers, conn, cid, refused))
            }
        }
    }
}

/// The accept filter of the vsock listener: `conn` from `cid`, or None (the
/// connection is closed) when `peers` does not allow it.
fn admit_peer(peers: Peers, conn: OwnedFd, cid: u32, refused: &AtomicU64) -> Option<OwnedFd> {
    if peers.allows(cid) {
        return Some(conn);
    }
    if worth_telling(refused) {
        eprintln!(
            "osb-agent: refused a connection from vsock CID {cid}: only {peers} may connect (--allow-cid, osb.agent.allow_cid=) ({} so far)",
            refused.load(Ordering::Relaxed)
        );
    }
    None
}

/// Counts a resource and gives it back on drop.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        let mut current = counter.load(Ordering::SeqCst);
        loop {
            if current >= max {
                return None;
            }
            match counter.compare_exchange(current, current + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Some(Slot(counter.clone())),
                Err(now) => current = now,
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The bytes of request frames the agent holds at once.
struct ByteBudget {
    used: Mutex<usize>,
    freed: Condvar,
    max: usize,
}

/// Bytes taken from the budget; given back on drop.
struct Bytes {
    budget: Arc<ByteBudget>,
    n: usize,
}

impl ByteBudget {
    fn new(max: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget { used: Mutex::new(0), freed: Condvar::new(), max })
    }

    /// Waits until `n` more bytes fit (a frame larger than the whole budget
    /// waits until nothing else is in flight), then takes them.
    fn take(self: &Arc<Self>, n: usize) -> Bytes {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + n > self.max {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += n;
        Bytes { budget: self.clone(), n }
    }
}

impl Drop for Bytes {
    fn drop(&mut self) {
        let mut used = self.budget.used.lock().unwrap_or_else(|e| e.into_inner());
        *used -= self.n;
        self.budget.freed.notify_all();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Counts an event that may repeat often; true for the 1st, 2nd, 4th, 8th ... time,
/// when it is worth a console line.
fn worth_telling(count: &AtomicU64) -> bool {
    (count.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
}

#[derive(Default)]
struct Open {
    next_id: u64,
    conns: HashMap<u64, Arc<Conn>>,
}

/// The connections being served: the cap, and the choice of one to close for a
/// new client.
struct Connections {
    max: usize,
    open: Mutex<Open>,
    evicted: AtomicU64,
}

/// A connection's place in [`Connections`]; given back on drop.
struct Registered {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.connections.open).conns.remove(&self.id);
    }
}

impl Connections {
    /// Registers `conn`. At the cap, the connection idle longest is shut down (its
    /// reader sees the end of the stream and its threads end) and forgotten to make
    /// room; None when every connection has a request in flight.
    fn admit(self: &Arc<Self>, conn: &Arc<Conn>) -> Option<Registered> {
        let mut open = lock(&self.open);
        if open.conns.len() >= self.max {
            let (since, id) = open.conns.iter().filter_map(|(id, c)| c.idle_since().map(|since| (since, *id))).min()?;
            if let Some(idle) = open.conns.remove(&id) {
                sys::shutdown(idle.raw());
            }
            if worth_telling(&self.evicted) {
                eprintln!(
                    "osb-agent: {} connections open; closed the one idle for {:.1?} for a new client ({} so far)",
                    self.max,
                    since.elapsed(),
                    self.evicted.load(Ordering::Relaxed)
                );
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        open.conns.insert(id, conn.clone());
        Some(Registered { connections: self.clone(), id })
    }
}

struct Shared {
    dispatcher: Dispatcher,
    limits: Limits,
    connections: Arc<Connections>,
    inflight: Arc<AtomicUsize>,
    bytes: Arc<ByteBudget>,
}

/// Accepts and serves connections until the listener fails for good.
pub fn serve(listener: Listener, dispatcher: Dispatcher, limits: Limits) -> std::io::Result<()> {
    let shared = Arc::new(Shared {
        dispatcher,
        connections: Arc::new(Connections { max: limits.max_connections, open: Mutex::default(), evicted: AtomicU64::new(0) }),
        inflight: Arc::new(AtomicUsize::new(0)),
        bytes: ByteBudget::new(limits.max_inflight_bytes),
        limits,
    });
    let mut consecutive_errors = 0u32;
    loop {
        let fd = match listener.accept() {
            Ok(Some(fd)) => {
                consecutive_errors = 0;
                fd
            }
            Ok(None) => {
                consecutive_errors = 0;
                continue;
            }
            Err(e) => {
                // EMFILE, ENOBUFS, ECONNABORTED ...: wait and go on; give up only on a
                // listener that keeps failing.
                consecutive_errors += 1;
                if consecutive_errors > 600 {
                    return Err(e);
                }
                eprintln!("osb-agent: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let conn = Arc::new(Conn::new(fd));
        let Some(registered) = shared.connections.admit(&conn) else {
            eprintln!("osb-agent: too many connections, all busy; closing a new one");
            continue; // dropping conn closes it
        };
        let shared = shared.clone();
        let spawned = std::thread::Builder::new().name("ttrpc-conn".into()).stack_size(256 * 1024).spawn(move || serve_connection(conn, shared, registered));
        if let Err(e) = spawned {
            eprintln!("osb-agent: cannot start a connection thread: {e}");
        }
    }
}

/// One accepted connection, shared by its reader, writer and handlers.
struct Conn {
    fd: OwnedFd,
    /// Requests of this connection in flight.
    inflight: Arc<AtomicUsize>,
    /// A frame is being read and dispatched.
    reading: AtomicBool,
    /// When a request last came or a handler last finished.
    last_active: Mutex<Instant>,
}

impl Conn {
    fn new(fd: OwnedFd) -> Conn {
        Conn { fd, inflight: Arc::new(AtomicUsize::new(0)), reading: AtomicBool::new(false), last_active: Mutex::new(Instant::now()) }
    }

    fn touch(&self) {
        *lock(&self.last_active) = Instant::now();
    }

    /// Since when the connection has been idle: no request in flight or being read.
    fn idle_since(&self) -> Option<Instant> {
        let busy = self.reading.load(Ordering::SeqCst) || self.inflight.load(Ordering::SeqCst) > 0;
        (!busy).then(|| *lock(&self.last_active))
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Fills `buf` completely; false at a clean end of stream before the first byte.
    fn read_full(&self, buf: &mut [u8]) -> std::io::Result<bool> {
        let mut got = 0;
        while got < buf.len() {
            let n = sys::recv(self.raw(), &mut buf[got..])?;
            if n == 0 {
                if got == 0 {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            got += n;
        }
        Ok(true)
    }

    fn discard(&self, mut len: usize) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        while len > 0 {
            let want = len.min(buf.len());
            if !self.read_full(&mut buf[..want])? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            len -= want;
        }
        Ok(())
    }

    fn write_all(&self, mut buf: &[u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            let n = sys::send(self.raw(), buf)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    fn write_frame(&self, header: &MessageHeader, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(MESSAGE_HEADER_LENGTH + payload.len());
        frame.extend_from_slice(&encode_header(header));
        frame.extend_from_slice(payload);
        self.write_all(&frame)
    }
}

/// The 10 header bytes of a frame.
pub fn encode_header(h: &MessageHeader) -> [u8; MESSAGE_HEADER_LENGTH] {
    let mut b = [0u8; MESSAGE_HEADER_LENGTH];
    b[..4].copy_from_slice(&h.length.to_be_bytes());
    b[4..8].copy_from_slice(&h.stream_id.to_be_bytes());
    b[8] = h.type_;
    b[9] = h.flags;
    b
}

pub fn decode_header(b: &[u8; MESSAGE_HEADER_LENGTH]) -> MessageHeader {
    MessageHeader { length: u32::from_be_bytes([b[0], b[1], b[2], b[3]]), stream_id: u32::from_be_bytes([b[4], b[5], b[6], b[7]]), type_: b[8], flags: b[9] }
}

type ResponseSender = mpsc::Sender<(MessageHeader, Vec<u8>)>;

/// Queues a response carrying only `status` for `stream_id`.
fn send_status(tx: &ResponseSender, stream_id: u32, code: Code, message: impl Into<String>) {
    let mut res = Response::new();
    res.set_status(ttrpc::get_status(code, message.into()));
    send_response(tx, stream_id, &res);
}

fn send_response(tx: &ResponseSender, stream_id: u32, res: &Response) {
    let payload = match res.write_to_bytes() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("osb-agent: cannot encode a ttrpc response: {e}");
            return;
        }
    };
    let header = MessageHeader { length: payload.len() as u32, stream_id, type_: MESSAGE_TYPE_RESPONSE, flags: 0 };
    let _ = tx.send((header, payload));
}

fn serve_connection(conn: Arc<Conn>, shared: Arc<Shared>, connection_slot: Registered) {
    if let Err(e) = sys::set_send_timeout(conn.raw(), shared.limits.write_timeout) {
        eprintln!("osb-agent: SO_SNDTIMEO: {e}");
    }
    let (res_tx, res_rx) = mpsc::channel::<(MessageHeader, Vec<u8>)>();
    // The writer owns the connection slot: the connection counts until every
    // handler has answered (or failed to) and the socket is closed.
    let writer_conn = conn.clone();
    let writer = std::thread::Builder::new().name("ttrpc-write".into()).stack_size(128 * 1024).spawn(move || {
        let _slot = connection_slot;
        let mut broken = false;
        for (header, payload) in res_rx {
            if broken {
                continue; // drain so handlers never block on a dead client
            }
            if let Err(e) = writer_conn.write_frame(&header, &payload) {
                eprintln!("osb-agent: write to a client failed ({e}); closing the connection");
                sys::shutdown(writer_conn.raw());
                broken = true;
            }
        }
    });
    if let Err(e) = writer {
        eprintln!("osb-agent: cannot start a writer thread: {e}");
        return;
    }
    // Dropping cancel_tx (when this reader returns) tells blocked handlers that the
    // client is gone.
    let (cancel_tx, cancel_rx) = crossbeam_channel::bounded::<()>(0);
    let conn_ctx = Arc::new(ttrpc::ConnectionContext::default());
    let mut last_stream_id = 0u32;
    loop {
        conn.reading.store(false, Ordering::SeqCst);
        let mut head = [0u8; MESSAGE_HEADER_LENGTH];
        match conn.read_full(&mut head) {
            Ok(true) => {}
            Ok(false) => break,
            Err(_) => break,
        }
        conn.reading.store(true, Ordering::SeqCst);
        conn.touch();
        let header = decode_header(&head);
        let len = header.length as usize;
        if len > shared.limits.max_frame {
            // As Go's ttrpc: skip the payload and answer on that stream.
            if conn.discard(len).is_err() {
                break;
            }
            send_status(
                &res_tx,
                header.stream_id,
                Code::RESOURCE_EXHAUSTED,
                format!("message length {len} exceed maximum message size of {}", shared.limits.max_frame),
            );
            continue;
        }
        // Room for the payload first: this is where a client sending more than the
        // budget holds is slowed down.
        let bytes = (len > SMALL_FRAME).then(|| shared.bytes.take(len));
        let mut payload = vec![0u8; len];
        match conn.read_full(&mut payload) {
            Ok(true) => {}
            Ok(false) if len == 0 => {}
            _ => break,
        }
        match header.type_ {
            MESSAGE_TYPE_REQUEST => {}
            MESSAGE_TYPE_DATA => {
                // No streaming method is registered: no stream is ever open.
                send_status(&res_tx, header.stream_id, Code::INVALID_ARGUMENT, "StreamID is no longer active");
                continue;
            }
            _ => continue,
        }
        if header.stream_id % 2 != 1 {
            send_status(&res_tx, header.stream_id, Code::INVALID_ARGUMENT, "StreamID must be odd for client initiated streams");
            continue;
        }
        if header.stream_id <= last_stream_id {
            send_status(&res_tx, header.stream_id, Code::INVALID_ARGUMENT, "StreamID cannot be re-used and must increment");
            continue;
        }
        last_stream_id = header.stream_id;
        let parsed = Request::parse_from_bytes(&payload);
        drop(payload); // the request holds its own copy
        let req = match parsed {
            Ok(req) => req,
            Err(e) => {
                send_status(&res_tx, header.stream_id, Code::INVALID_ARGUMENT, format!("bad ttrpc request: {e}"));
                continue;
            }
        };
        if let Err(status) = shared.dispatcher.lookup(&req.service, &req.method) {
            let mut res = Response::new();
            res.set_status(status);
            send_response(&res_tx, header.stream_id, &res);
            continue;
        }
        let Some(conn_slot) = Slot::take(&conn.inflight, shared.limits.max_inflight_per_connection) else {
            send_status(&res_tx, header.stream_id, Code::RESOURCE_EXHAUSTED, "too many requests in flight on this connection");
            continue;
        };
        let Some(global_slot) = Slot::take(&shared.inflight, shared.limits.max_inflight) else {
            send_status(&res_tx, header.stream_id, Code::RESOURCE_EXHAUSTED, "too many requests in flight");
            continue;
        };
        let ctx = TtrpcContext {
            fd: conn.raw(),
            cancel_rx: cancel_rx.clone(),
            mh: header,
            res_tx: res_tx.clone(),
            metadata: ttrpc::context::from_pb(&req.metadata),
            timeout_nano: req.timeout_nano,
            conn_ctx: conn_ctx.clone(),
        };
        let handler_shared = shared.clone();
        let handler_conn = conn.clone();
        let error_tx = res_tx.clone();
        let stream_id = header.stream_id;
        let spawned = std::thread::Builder::new().name("ttrpc-call".into()).stack_size(256 * 1024).spawn(move || {
            let _slots = (conn_slot, global_slot, bytes);
            let handler = match handler_shared.dispatcher.lookup(&req.service, &req.method) {
                Ok(h) => h,
                Err(_) => return,
            };
            if let Err(e) = handler.handler(ctx, req) {
                // The generated handler fails before answering only when the
                // payload does not decode (Go's ttrpc: INTERNAL).
                let (code, message) = match e {
                    ttrpc::Error::RpcStatus(s) => (s.code(), s.message),
                    other => (Code::INTERNAL, format!("ttrpc: error unmarshalling payload: {other}")),
                };
                send_status(&error_tx, stream_id, code, message);
            }
            // Before the slots go: a connection that was just answered is not
            // the one idle longest.
            handler_conn.touch();
        });
        if let Err(e) = spawned {
            send_status(&res_tx, stream_id, Code::RESOURCE_EXHAUSTED, format!("cannot start a handler thread: {e}"));
        }
    }
    drop(cancel_tx);
    // res_tx drops here; the writer ends once every running handler has answered.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_peers() {
        let host = Peers::default();
        assert_eq!(host, Peers::Cid(2));
        assert!(host.allows(libc::VMADDR_CID_HOST));
        // Loopback, the guest's own CID, another guest, the wildcard: refused.
        for cid in [libc::VMADDR_CID_LOCAL, 3, 4, libc::VMADDR_CID_ANY] {
            assert!(!host.allows(cid), "{cid}");
        }
        assert!(Peers::Cid(3).allows(3) && !Peers::Cid(3).allows(2));
        assert!(Peers::Any.allows(1) && Peers::Any.allows(2));
        assert_eq!(Peers::parse("any"), Ok(Peers::Any));
        assert_eq!(Peers::parse("7"), Ok(Peers::Cid(7)));
        for bad in ["", "-1", "host", "2,3"] {
            assert!(Peers::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_vsock_filter_closes_refused_connections() {
        let refused = AtomicU64::new(0);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(admit_peer(Peers::default(), theirs.into(), 1, &refused).is_none());
        // The refused connection was closed: the peer reads the end of the stream.
        let mut byte = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &ours, &mut byte).unwrap(), 0);
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        let (_ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(admit_peer(Peers::default(), theirs.into(), 2, &refused).is_some());
        assert_eq!(refused.load(Ordering::Relaxed), 1);
    }
}
