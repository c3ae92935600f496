//! A fault-injecting HTTP/1.1 proxy for registry tests.
//!
//! [`FaultProxy::start`] listens on a free 127.0.0.1 port and forwards every
//! request to one upstream (a registry server). A client is pointed at
//! [`FaultProxy::addr`] as if it were the registry. [`Rule`]s added with
//! [`FaultProxy::add`] pick requests by method and a substring of the
//! request target (path and query) and inject a [`Fault`] on the chosen
//! occurrences; every request is logged as a [`Seen`] with its status and
//! body byte counts, so a test can check what really crossed the wire.
//!
//! ```ignore
//! let reg = Registry::start();
//! let proxy = FaultProxy::start(&reg.addr());
//! let drop = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(300_000)));
//! // ... push through proxy.addr() ...
//! assert_eq!(proxy.fired(drop), 1);
//! assert_eq!(proxy.request_body_bytes(Some("PATCH"), "/blobs/uploads/"), 300_000 + size);
//! ```
//!
//! # Rules
//!
//! A rule counts the requests that match it (method equal, if given, and
//! `path_contains` a substring of the target), whether or not it or another
//! rule fires on them, and applies its fault to matching occurrences `nth`
//! to `nth + times - 1` (1-based; by default the first only; [`Rule::always`]
//! for every one from `nth` on). When two rules would apply to one request,
//! the one added first does; the other's occurrence passes unharmed.
//! [`FaultProxy::fired`] counts the requests on which a rule's fault took
//! effect: a truncation, flip or drop whose offset lies beyond the body does
//! not fire (the request is forwarded intact and its [`Seen::note`] says
//! why).
//!
//! A rule sees only the requests that arrive after it was added.
//!
//! Faults ([`Fault`]):
//! - `DropAfterRequestBytes(n)`: forwards the request head and the first `n`
//!   bytes of the request body (payload bytes; chunk framing is forwarded as
//!   is and not counted), then half-closes the upstream connection, waits (at
//!   most 5 s) for the upstream to answer and close, and closes the client
//!   connection without answering. The upstream so sees a short body and a
//!   client disconnect, and has finished handling it by the time the client
//!   sees its connection fail. Does not fire when the body has `n` bytes or
//!   fewer (a chunked body's terminating chunk counts as more).
//! - `DropResponse`: forwards the whole request, waits for the upstream's
//!   response head (so the upstream has handled the request) and closes the
//!   client connection without relaying it: the request took effect but the
//!   client cannot know.
//! - `Respond { status, headers, body }`: answered by the proxy, never
//!   forwarded; a request body is read and discarded first (a client that
//!   sent `Expect: 100-continue` gets the answer at once and the connection
//!   closes). [`Fault::status`] and [`Fault::too_many_requests`] build the
//!   common ones. `Content-Length` is added unless given.
//! - `Stall(d)`: holds the request `d` (the body unread) before forwarding.
//! - `StallForever`: never forwards or answers; reads and discards what the
//!   client sends until it closes the connection (or the proxy is dropped).
//! - `TruncateResponse(n)`: relays the response head and the first `n` body
//!   bytes, then closes the client connection (the head, with its
//!   `Content-Length`, is unchanged, so the client sees a short body).
//! - `StallResponseAfter(n)`: relays the response head and the first `n`
//!   body bytes, then sends nothing more and keeps the connection open until
//!   the client closes it (or the proxy is dropped): a transfer that hangs
//!   midway, with part of the body already received.
//! - `FlipResponseByte(i)`: inverts (XOR 0xff) the response body byte at
//!   payload offset `i`.
//! - `RespondHuge { len, declare }`: answered by the proxy, never forwarded:
//!   200 with a JSON content type and `len` bytes of spaces, streamed in
//!   64 KiB writes, with `Content-Length: len` when `declare` (else delimited
//!   by closing the connection); the writing stops when the client goes
//!   away, and `response_body_bytes` says how far it got. A registry that
//!   sends a manifest nobody should buffer.
//!
//! # Forwarding
//!
//! One thread per client connection; each request goes to the upstream on a
//! fresh connection with `Connection: close` (hop-by-hop `Connection`,
//! `Keep-Alive`, `Proxy-Connection` and `Expect` headers dropped; an
//! `Expect: 100-continue` is answered by the proxy itself). Everything else,
//! `Host` included, goes as the client sent it, so the registry builds its
//! `Location` URLs from the proxy's address and uploads keep going through
//! the proxy (checked by the self-tests). Request and response bodies are
//! delimited by `Content-Length` or `Transfer-Encoding: chunked` (forwarded
//! as is, payload bytes counted), responses also by the connection closing;
//! HEAD, 1xx, 204 and 304 responses have no body. The client connection is
//! kept open between requests (HTTP/1.1 keep-alive) unless the client asked
//! to close, the response was delimited by close, or a fault cut it. A
//! first byte that cannot start a request line (a TLS hello) closes the
//! connection at once, so clients that try HTTPS first fall back to HTTP.
//!
//! # Log
//!
//! [`FaultProxy::requests`] returns every request seen, in arrival order. A
//! request is logged when its head is read; request body bytes are counted
//! as the upstream takes them, before the response is read, and the status,
//! response bytes and a fired fault are recorded before they reach the
//! client, so once a client has seen a response or a fault, the log already
//! holds it. Only the note on a fault that did not apply (a body too short
//! to cut or flip) is added after the response went out.
//! `request_body_bytes` counts payload bytes forwarded upstream,
//! `response_body_bytes` payload bytes written to the client; `status` is
//! the status the client was sent (`None`: it got no answer).
//!
//! Dropping the proxy stops the listener (joined), shuts down every client
//! and upstream socket and wakes stalled requests, so no thread outlives it
//! for long or keeps the test process alive.
//!
//! # docker-registry 2.8 and a dropped PATCH
//!
//! Observed with Debian bookworm's docker-registry 2.8.2+ds1 through this
//! proxy and pinned by `proxy_drop_mid_patch_shows_how_the_registry_treats_a_partial_upload`
//! and `registry_resumes_an_upload_only_when_no_byte_of_the_failed_patch_arrived`
//! in harness_selftest.rs. Upload URLs are
//! `http://HOST/v2/REPO/blobs/uploads/UUID?_state=TOKEN`, HOST being the
//! request's `Host`; TOKEN is an HMAC-signed {name, UUID, offset, start
//! time}, and every request on a session is refused unless the offset in its
//! TOKEN equals the size the session holds on disk.
//!
//! - A PATCH cut after N > 0 body bytes (Content-Length or chunked): the
//!   registry keeps the N bytes (the session's data file grows by N; it logs
//!   `client disconnected during blob PATCH ... copied=N` and answers 499 to
//!   the dead connection), but the session is lost: GET, PATCH and PUT on it
//!   answer **404 with code `BLOB_UPLOAD_INVALID`** (no `Range`, no
//!   `Docker-Upload-UUID`; logged as `upload resumed at wrong offest: SIZE !=
//!   OFFSET`), with the Location of the last successful response as with any
//!   earlier one: no TOKEN the registry issued carries the new size. Without
//!   `_state` it is 404 `BLOB_UPLOAD_INVALID` too ("invalid secret"). So
//!   continuing from an offset is impossible; the client must start over with
//!   a new POST (and re-send the whole blob).
//! - The same when the whole PATCH arrived but the answer was lost
//!   ([`Fault::DropResponse`]): the session moved to a TOKEN the client never
//!   saw, and the one it has answers 404 `BLOB_UPLOAD_INVALID`.
//! - A PATCH cut before its first body byte leaves the session intact: GET on
//!   the last Location answers **204** with `Range: 0-(SIZE-1)`,
//!   `Docker-Upload-UUID: UUID` and `Location` equal to that last Location
//!   (same TOKEN); a PATCH of the rest on it answers 202 with the new
//!   `Range`, and `PUT LOCATION&digest=sha256:...` answers 201 with the right
//!   `Docker-Content-Digest`; the blob then reads back intact.
//! - Each successful PATCH answer carries a new TOKEN, and only the newest
//!   works: a request with an older one answers 404 `BLOB_UPLOAD_INVALID`,
//!   but does not harm the session (the newest still answers 204).
//! - `Content-Range` on a PATCH is not checked: the bytes are appended
//!   whatever it says. An empty session reports `Range: 0-0`, as does one
//!   holding a single byte.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest request or response head accepted (request line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Copy buffer size.
const BUF: usize = 64 * 1024;
/// Read and write timeout on upstream connections, so a wedged upstream
/// fails a test instead of hanging it.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a dropped request waits for the upstream's reaction.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// What a [`Rule`] does to the requests it picks. See the module doc.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward the first N request body bytes, then disconnect both sides.
    DropAfterRequestBytes(u64),
    /// Forward the request, then close the client connection instead of
    /// relaying the response.
    DropResponse,
    /// Answer this instead of forwarding.
    Respond { status: u16, headers: Vec<(String, String)>, body: String },
    /// Hold the request this long, then forward it.
    Stall(Duration),
    /// Never forward or answer; wait for the client to give up.
    StallForever,
    /// Relay only the first N response body bytes, then close.
    TruncateResponse(u64),
    /// Relay only the first N response body bytes, then hang.
    StallResponseAfter(u64),
    /// Invert the response body byte at this offset.
    FlipResponseByte(u64),
    /// Answer 200 with `len` body bytes, declared in `Content-Length` or not.
    RespondHuge { len: u64, declare: bool },
}

impl Fault {
    /// `Respond` with `status`, no extra headers and an empty body.
    pub fn status(status: u16) -> Fault {
        Fault::Respond { status, headers: Vec::new(), body: String::new() }
    }

    /// `Respond` 429 with `Retry-After: SECS` and a registry-style error body.
    pub fn too_many_requests(retry_after_secs: u32) -> Fault {
        Fault::Respond {
            status: 429,
            headers: vec![("Retry-After".into(), retry_after_secs.to_string()), ("Content-Type".into(), "application/json".into())],
            body: r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"injected by FaultProxy"}]}"#.into(),
        }
    }
}

/// Identifies a rule added to a proxy (its position in adding order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub usize);

/// Which requests get a fault. See the module doc for counting.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Request method to match exactly ("PATCH"); `None` matches any.
    pub method: Option<String>,
    /// Substring of the request target (path and query) to match; "" matches any.
    pub path_contains: String,
    /// The first matching occurrence the fault applies to (1-based).
    pub nth: u32,
    /// How many consecutive matching occurrences, from `nth` on, it applies to.
    pub times: u32,
    pub fault: Fault,
}

impl Rule {
    /// A rule applying `fault` to the first request matching `method` and
    /// `path_contains`.
    pub fn new(method: Option<&str>, path_contains: &str, fault: Fault) -> Rule {
        Rule { method: method.map(str::to_string), path_contains: path_contains.to_string(), nth: 1, times: 1, fault }
    }

    /// Applies from the `n`th matching request (1-based) instead of the first.
    pub fn nth(mut self, n: u32) -> Rule {
        assert!(n >= 1, "Rule::nth is 1-based");
        self.nth = n;
        self
    }

    /// Applies to `n` consecutive matching requests.
    pub fn times(mut self, n: u32) -> Rule {
        self.times = n;
        self
    }

    /// Applies to every matching request from `nth` on.
    pub fn always(self) -> Rule {
        self.times(u32::MAX)
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method) && target.contains(&self.path_contains)
    }

    fn applies_to(&self, occurrence: u32) -> bool {
        occurrence >= self.nth && u64::from(occurrence) < u64::from(self.nth) + u64::from(self.times)
    }
}

/// One request as the proxy saw and handled it.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub method: String,
    /// The request target as sent: path and query.
    pub path: String,
    pub request_headers: Vec<(String, String)>,
    /// When the request head was read, from the proxy's start.
    pub arrived: Duration,
    /// Status sent to the client; `None` if it got no answer.
    pub status: Option<u16>,
    /// Response headers as sent to the client (the proxy's own `Connection`
    /// header left out).
    pub response_headers: Vec<(String, String)>,
    /// Request body payload bytes forwarded upstream.
    pub request_body_bytes: u64,
    /// Response body payload bytes written to the client.
    pub response_body_bytes: u64,
    /// The rule whose fault took effect on this request.
    pub rule: Option<RuleId>,
    pub fault: Option<Fault>,
    /// What went differently from a plain exchange (faults, errors on
    /// either side, the upstream's reaction to a drop).
    pub note: Option<String>,
}

impl Seen {
    /// A request header's value (first of that name, case-insensitive).
    pub fn request_header(&self, name: &str) -> Option<&str> {
        header(&self.request_headers, name)
    }

    /// A response header's value (first of that name, case-insensitive).
    pub fn response_header(&self, name: &str) -> Option<&str> {
        header(&self.response_headers, name)
    }

    fn add_note(&mut self, text: impl Into<String>) {
        let text = text.into();
        self.note = Some(match self.note.take() {
            Some(old) => format!("{old}; {text}"),
            None => text,
        });
    }
}

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.status.map_or("-".to_string(), |s| s.to_string());
        write!(f, "{} {} -> {status} (request body {} B, response body {} B)", self.method, self.path, self.request_body_bytes, self.response_body_bytes)?;
        if let Some(fault) = &self.fault {
            write!(f, " [{fault:?}]")?;
        }
        if let Some(note) = &self.note {
            write!(f, " ({note})")?;
        }
        Ok(())
    }
}

struct RuleState {
    rule: Rule,
    matched: u32,
    fired: u32,
}

#[derive(Default)]
struct State {
    rules: Vec<RuleState>,
    seen: Vec<Seen>,
    /// Requests forgotten by `clear_requests`: `seen[i]` is request number
    /// `cleared + i`, so exchanges in flight keep updating the right entry.
    cleared: usize,
    /// Open sockets per client connection, shut down when the proxy drops.
    sockets: HashMap<u64, Vec<TcpStream>>,
    next_conn: u64,
}

impl State {
    /// Request number `idx`, unless it was cleared from the log.
    fn entry(&mut self, idx: usize) -> Option<&mut Seen> {
        idx.checked_sub(self.cleared).and_then(|i| self.seen.get_mut(i))
    }
}

struct Shared {
    upstream: SocketAddr,
    started: Instant,
    stop: AtomicBool,
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the log from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps `d`; false if the proxy stopped meanwhile.
    fn sleep(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        let mut st = self.lock();
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            st = self.wake.wait_timeout(st, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Remembers a socket of connection `conn` for shutdown on drop (at
    /// once if the proxy is already stopping).
    fn track(&self, conn: u64, s: &TcpStream) {
        let Ok(clone) = s.try_clone() else { return };
        let mut st = self.lock();
        if self.stopped() {
            let _ = clone.shutdown(Shutdown::Both);
        }
        st.sockets.entry(conn).or_default().push(clone);
    }

    fn untrack(&self, conn: u64) {
        self.lock().sockets.remove(&conn);
    }

    /// Logs a new request and picks the fault to apply, if any.
    fn begin(&self, method: &str, target: &str, headers: &[(String, String)]) -> (usize, Option<(RuleId, Fault)>) {
        let mut st = self.lock();
        let mut chosen = None;
        for (i, r) in st.rules.iter_mut().enumerate() {
            if r.rule.matches(method, target) {
                r.matched += 1;
                if chosen.is_none() && r.rule.applies_to(r.matched) {
                    chosen = Some((RuleId(i), r.rule.fault.clone()));
                }
            }
        }
        let arrived = self.started.elapsed();
        st.seen.push(Seen { method: method.to_string(), path: target.to_string(), request_headers: headers.to_vec(), arrived, ..Seen::default() });
        (st.cleared + st.seen.len() - 1, chosen)
    }

    /// Updates request number `idx`, unless it was cleared from the log.
    fn update(&self, idx: usize, f: impl FnOnce(&mut Seen)) {
        if let Some(seen) = self.lock().entry(idx) {
            f(seen);
        }
    }

    /// Records that `rule`'s fault took effect on request `idx`.
    fn fire(&self, idx: usize, rule: RuleId, fault: &Fault) {
        let mut st = self.lock();
        st.rules[rule.0].fired += 1;
        if let Some(seen) = st.entry(idx) {
            seen.rule = Some(rule);
            seen.fault = Some(fault.clone());
        }
    }
}

/// The proxy. See the module doc.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    listener: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy on a free 127.0.0.1 port forwarding to `upstream`
    /// ("127.0.0.1:PORT").
    pub fn start(upstream: &str) -> FaultProxy {
        let upstream = upstream.to_socket_addrs().ok().and_then(|mut a| a.next()).unwrap_or_else(|| panic!("FaultProxy: bad upstream address {upstream:?}"));
        let listener = TcpListener::bind("127.0.0.1:0").expect("FaultProxy: bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared =
            Arc::new(Shared { upstream, started: Instant::now(), stop: AtomicBool::new(false), state: Mutex::new(State::default()), wake: Condvar::new() });
        let sh = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("fault-proxy-listener".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if sh.stopped() {
                        break;
                    }
                    let Ok(client) = conn else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let id = {
                        let mut st = sh.lock();
                        st.next_conn += 1;
                        st.next_conn
                    };
                    sh.track(id, &client);
                    let sh2 = Arc::clone(&sh);
                    let spawned = std::thread::Builder::new().name(format!("fault-proxy-conn-{id}")).spawn(move || {
                        serve_connection(&sh2, id, client);
                        sh2.untrack(id);
                    });
                    if spawned.is_err() {
                        sh.untrack(id);
                    }
                }
            })
            .expect("FaultProxy: spawn listener thread");
        FaultProxy { addr, shared, listener: Some(handle) }
    }

    /// "127.0.0.1:PORT", where clients connect.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Adds a rule; later requests are matched against it.
    pub fn add(&self, rule: Rule) -> RuleId {
        let mut st = self.shared.lock();
        st.rules.push(RuleState { rule, matched: 0, fired: 0 });
        RuleId(st.rules.len() - 1)
    }

    /// On how many requests the rule's fault took effect.
    pub fn fired(&self, id: RuleId) -> u32 {
        self.shared.lock().rules[id.0].fired
    }

    /// How many requests matched the rule so far (fired or not).
    pub fn matched(&self, id: RuleId) -> u32 {
        self.shared.lock().rules[id.0].matched
    }

    /// Every request seen so far, in arrival order.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Forgets the log (rules and their counts stay).
    pub fn clear_requests(&self) {
        let mut st = self.shared.lock();
        st.cleared += st.seen.len();
        st.seen.clear();
    }

    /// The logged requests with this method (`None`: any) whose target
    /// contains `path_contains`.
    pub fn matching(&self, method: Option<&str>, path_contains: &str) -> Vec<Seen> {
        self.shared.lock().seen.iter().filter(|s| method.is_none_or(|m| m == s.method) && s.path.contains(path_contains)).cloned().collect()
    }

    /// How many logged requests match.
    pub fn count(&self, method: Option<&str>, path_contains: &str) -> usize {
        self.matching(method, path_contains).len()
    }

    /// Request body bytes forwarded upstream by the matching requests.
    pub fn request_body_bytes(&self, method: Option<&str>, path_contains: &str) -> u64 {
        self.matching(method, path_contains).iter().map(|s| s.request_body_bytes).sum()
    }

    /// Response body bytes written to clients by the matching requests.
    pub fn response_body_bytes(&self, method: Option<&str>, path_contains: &str) -> u64 {
        self.matching(method, path_contains).iter().map(|s| s.response_body_bytes).sum()
    }

    /// The log, one request a line, for assertion messages.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.shared.lock().seen.iter().enumerate() {
            out.push_str(&format!("{i:3} {s}\n"));
        }
        out
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let st = self.shared.lock();
            for s in st.sockets.values().flatten() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.shared.wake.notify_all();
        // Wake the blocking accept; the listener sees the flag and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP/1.1 framing
// ---------------------------------------------------------------------------

/// A message head: the start line and the headers, in order.
struct Head {
    start: String,
    headers: Vec<(String, String)>,
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
}

/// Whether a comma-separated header (Connection, Transfer-Encoding) lists `token`.
fn has_token(headers: &[(String, String)], name: &str, token: &str) -> bool {
    headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case(name)).flat_map(|(_, v)| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line (up to LF) of at most `limit` bytes.
fn read_line_limited(r: &mut dyn BufRead, limit: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a message"));
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if line.len() > limit {
            return Err(invalid("line too long"));
        }
        if done {
            return Ok(line);
        }
    }
}

/// Reads a head of at most [`MAX_HEAD`] bytes: `Ok(None)` on a clean end of
/// stream before it.
fn read_head(r: &mut dyn BufRead) -> io::Result<Option<Head>> {
    // Blank lines before a request line are allowed (RFC 9112 2.2).
    loop {
        let buf = r.fill_buf()?;
        match buf.first() {
            None => return Ok(None),
            Some(b'\r' | b'\n') => r.consume(1),
            Some(_) => break,
        }
    }
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let line = read_line_limited(r, MAX_HEAD - total)?;
        total += line.len();
        let text = String::from_utf8(line).map_err(|_| invalid("non-UTF-8 message head"))?;
        let text = text.trim_end_matches(['\r', '\n']).to_string();
        if text.is_empty() {
            break;
        }
        lines.push(text);
    }
    let mut lines = lines.into_iter();
    let start = lines.next().unwrap_or_default();
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some(Head { start, headers }))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

fn content_length(headers: &[(String, String)]) -> io::Result<Option<u64>> {
    header(headers, "content-length").map(|v| v.trim().parse().map_err(|_| invalid(format!("bad Content-Length {v:?}")))).transpose()
}

fn is_chunked(headers: &[(String, String)]) -> io::Result<bool> {
    match header(headers, "transfer-encoding") {
        None => Ok(false),
        Some(v) if v.rsplit(',').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked")) => Ok(true),
        Some(v) => Err(invalid(format!("unsupported Transfer-Encoding {v:?}"))),
    }
}

fn request_framing(headers: &[(String, String)]) -> io::Result<Framing> {
    if is_chunked(headers)? {
        return Ok(Framing::Chunked);
    }
    Ok(match content_length(headers)? {
        Some(0) | None => Framing::Empty,
        Some(n) => Framing::Length(n),
    })
}

fn response_framing(method: &str, status: u16, headers: &[(String, String)]) -> io::Result<Framing> {
    if method == "HEAD" || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if is_chunked(headers)? {
        return Ok(Framing::Chunked);
    }
    Ok(match content_length(headers)? {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::UntilClose,
    })
}

fn status_of(start: &str) -> io::Result<u16> {
    start.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| invalid(format!("bad status line {start:?}")))
}

/// Which side of a copy failed.
#[derive(Debug)]
enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

impl fmt::Display for CopyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CopyError::Read(e) => write!(f, "reading: {e}"),
            CopyError::Write(e) => write!(f, "writing: {e}"),
        }
    }
}

/// How a body copy ended.
#[derive(Debug, Default)]
struct Copied {
    /// Payload bytes copied.
    payload: u64,
    /// False when stopped at `limit` with more of the body to come.
    complete: bool,
    /// Whether the byte at `flip` was inverted.
    flipped: bool,
}

/// Options of [`copy_body`].
#[derive(Default)]
struct CopyOpts {
    /// Stop once this many payload bytes are copied and more would follow.
    limit: Option<u64>,
    /// Payload offset of a byte to invert on the way.
    flip: Option<u64>,
    /// Write the payload only, without chunk framing (a client decoding).
    decode: bool,
    /// Call `progress` before writing each piece (else after).
    count_first: bool,
}

/// Copies one message body from `src` to `dst`, chunk framing as is (or
/// dropped with `decode`), calling `progress` with each payload piece's
/// length and whether it holds the flipped byte.
fn copy_body(src: &mut dyn BufRead, dst: &mut dyn Write, framing: Framing, opts: &CopyOpts, progress: &mut dyn FnMut(u64, bool)) -> Result<Copied, CopyError> {
    let mut out = Copied::default();
    let mut buf = vec![0u8; BUF];
    let at_limit = |copied: u64| opts.limit.is_some_and(|l| copied >= l);
    // Copies `len` payload bytes (None: until end of stream); false if
    // stopped at the limit.
    let mut payload = |src: &mut dyn BufRead, dst: &mut dyn Write, len: Option<u64>, out: &mut Copied| -> Result<bool, CopyError> {
        let mut left = len;
        loop {
            if left == Some(0) {
                return Ok(true);
            }
            let mut want = BUF as u64;
            if let Some(l) = left {
                want = want.min(l);
            }
            if let Some(l) = opts.limit {
                if out.payload >= l {
                    if len.is_some() {
                        return Ok(false);
                    }
                    // Until close: only more data makes it a cut.
                    let more = !src.fill_buf().map_err(CopyError::Read)?.is_empty();
                    return Ok(!more);
                }
                want = want.min(l - out.payload);
            }
            let n = src.read(&mut buf[..want as usize]).map_err(CopyError::Read)?;
            if n == 0 {
                if len.is_none() {
                    return Ok(true);
                }
                return Err(CopyError::Read(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in a body")));
            }
            let mut flipped = false;
            if let Some(f) = opts.flip {
                if f >= out.payload && f < out.payload + n as u64 {
                    buf[(f - out.payload) as usize] ^= 0xff;
                    out.flipped = true;
                    flipped = true;
                }
            }
            if opts.count_first {
                progress(n as u64, flipped);
            }
            dst.write_all(&buf[..n]).map_err(CopyError::Write)?;
            if !opts.count_first {
                progress(n as u64, flipped);
            }
            out.payload += n as u64;
            if let Some(l) = left.as_mut() {
                *l -= n as u64;
            }
        }
    };
    match framing {
        Framing::Empty => out.complete = true,
        Framing::Length(n) => out.complete = payload(src, dst, Some(n), &mut out)?,
        Framing::UntilClose => out.complete = payload(src, dst, None, &mut out)?,
        Framing::Chunked => loop {
            if at_limit(out.payload) {
                break;
            }
            let line = read_line_limited(src, 4096).map_err(CopyError::Read)?;
            let text = String::from_utf8_lossy(&line);
            let size_hex = text.trim_end().split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_hex, 16).map_err(|_| CopyError::Read(invalid(format!("bad chunk size line {text:?}"))))?;
            if !opts.decode {
                dst.write_all(&line).map_err(CopyError::Write)?;
            }
            if size == 0 {
                // Trailer section, up to an empty line.
                loop {
                    let t = read_line_limited(src, MAX_HEAD).map_err(CopyError::Read)?;
                    if !opts.decode {
                        dst.write_all(&t).map_err(CopyError::Write)?;
                    }
                    if t == b"\r\n" || t == b"\n" {
                        break;
                    }
                }
                out.complete = true;
                break;
            }
            if !payload(src, dst, Some(size), &mut out)? {
                break;
            }
            let crlf = read_line_limited(src, 2).map_err(CopyError::Read)?;
            if crlf != b"\r\n" && crlf != b"\n" {
                return Err(CopyError::Read(invalid("chunk data not followed by CRLF")));
            }
            if !opts.decode {
                dst.write_all(&crlf).map_err(CopyError::Write)?;
            }
        },
    }
    dst.flush().map_err(CopyError::Write)?;
    Ok(out)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Injected",
    }
}

fn write_head(w: &mut dyn Write, start: &str, headers: &[(String, String)], close: bool) -> io::Result<()> {
    let mut head = format!("{start}\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    w.write_all(head.as_bytes())?;
    w.flush()
}

const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "expect"];

fn end_to_end(headers: &[(String, String)]) -> Vec<(String, String)> {
    headers.iter().filter(|(k, _)| !HOP_BY_HOP.iter().any(|h| k.eq_ignore_ascii_case(h))).cloned().collect()
}

// ---------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------

fn serve_connection(sh: &Shared, conn: u64, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::with_capacity(BUF, read_half);
    let mut writer = client;
    loop {
        if sh.stopped() {
            break;
        }
        // Something that cannot start a request line (a TLS ClientHello
        // from a client trying HTTPS first): close so it falls back.
        match reader.fill_buf() {
            Ok([b, ..]) if b.is_ascii_alphabetic() || *b == b'\r' || *b == b'\n' => {}
            _ => break,
        }
        let head = match read_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) | Err(_) => break,
        };
        match exchange(sh, conn, &mut reader, &mut writer, head) {
            Ok(true) => continue,
            Ok(false) | Err(_) => break,
        }
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// Answers 502 for a request the upstream could not take, noting why;
/// the client connection closes.
fn bad_gateway(sh: &Shared, idx: usize, client_out: &mut TcpStream, note: String) -> io::Result<bool> {
    sh.update(idx, |s| {
        s.status = Some(502);
        s.add_note(note);
    });
    write_head(client_out, "HTTP/1.1 502 Bad Gateway", &[("Content-Length".into(), "0".into())], true)?;
    Ok(false)
}

/// Handles one request; true if the client connection stays open.
fn exchange(sh: &Shared, conn: u64, client_in: &mut BufReader<TcpStream>, client_out: &mut TcpStream, head: Head) -> io::Result<bool> {
    let mut parts = head.start.split_whitespace();
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => (m.to_string(), t.to_string(), v.to_string()),
        _ => {
            let _ = client_out.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return Ok(false);
        }
    };
    let (idx, fault) = sh.begin(&method, &target, &head.headers);
    let framing = match request_framing(&head.headers) {
        Ok(f) => f,
        Err(e) => {
            sh.update(idx, |s| {
                s.status = Some(400);
                s.add_note(format!("bad request framing: {e}"));
            });
            let _ = client_out.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            return Ok(false);
        }
    };
    let client_keep = version == "HTTP/1.1" && !has_token(&head.headers, "connection", "close");
    let expects_continue = framing != Framing::Empty && header(&head.headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));

    // Faults that decide before anything is forwarded.
    let mut drop_after = None;
    let mut drop_response = false;
    let mut truncate = None;
    let mut stall_after_truncate = false;
    let mut flip = None;
    if let Some((rule, f)) = &fault {
        match f {
            Fault::Respond { status, headers, body } => {
                sh.fire(idx, *rule, f);
                let mut keep = client_keep;
                if expects_continue {
                    keep = false;
                } else if framing != Framing::Empty {
                    let drained = copy_body(client_in, &mut io::sink(), framing, &CopyOpts::default(), &mut |_, _| {});
                    if let Err(e) = drained {
                        sh.update(idx, |s| s.add_note(format!("client body {e}")));
                        return Ok(false);
                    }
                }
                let mut hs = headers.clone();
                if header(&hs, "content-length").is_none() {
                    hs.push(("Content-Length".into(), body.len().to_string()));
                }
                let body_bytes = if method == "HEAD" { &[][..] } else { body.as_bytes() };
                sh.update(idx, |s| {
                    s.status = Some(*status);
                    s.response_headers = hs.clone();
                    s.response_body_bytes = body_bytes.len() as u64;
                    s.add_note("answered by the proxy");
                });
                write_head(client_out, &format!("HTTP/1.1 {status} {}", reason(*status)), &hs, !keep)?;
                client_out.write_all(body_bytes)?;
                client_out.flush()?;
                return Ok(keep);
            }
            Fault::RespondHuge { len, declare } => {
                sh.fire(idx, *rule, f);
                if framing != Framing::Empty {
                    let _ = copy_body(client_in, &mut io::sink(), framing, &CopyOpts::default(), &mut |_, _| {});
                }
                let mut hs = vec![("Content-Type".to_string(), "application/vnd.oci.image.manifest.v1+json".to_string())];
                if *declare {
                    hs.push(("Content-Length".into(), len.to_string()));
                }
                sh.update(idx, |s| {
                    s.status = Some(200);
                    s.response_headers = hs.clone();
                    s.add_note("answered by the proxy");
                });
                write_head(client_out, "HTTP/1.1 200 OK", &hs, true)?;
                let spaces = [b' '; BUF];
                let mut sent = 0u64;
                while sent < *len && !sh.stopped() {
                    let n = (*len - sent).min(BUF as u64) as usize;
                    if client_out.write_all(&spaces[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                    // Kept current, so the log shows how far it got while it still runs.
                    if sent % (1 << 20) < BUF as u64 {
                        sh.update(idx, |s| s.response_body_bytes = sent);
                    }
                }
                let _ = client_out.flush();
                sh.update(idx, |s| s.response_body_bytes = sent);
                return Ok(false);
            }
            Fault::StallForever => {
                sh.fire(idx, *rule, f);
                let secs = swallow_until_closed(client_in);
                sh.update(idx, |s| s.add_note(format!("stalled forever; the client closed after {secs:.1} s")));
                return Ok(false);
            }
            Fault::Stall(d) => {
                sh.fire(idx, *rule, f);
                if !sh.sleep(*d) {
                    return Ok(false);
                }
            }
            Fault::DropAfterRequestBytes(n) => drop_after = Some(*n),
            Fault::DropResponse => drop_response = true,
            Fault::TruncateResponse(n) => truncate = Some(*n),
            Fault::StallResponseAfter(n) => {
                truncate = Some(*n);
                stall_after_truncate = true;
            }
            Fault::FlipResponseByte(i) => flip = Some(*i),
        }
    }

    if expects_continue {
        client_out.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        client_out.flush()?;
    }
    let upstream = match TcpStream::connect_timeout(&sh.upstream, Duration::from_secs(5)) {
        Ok(u) => u,
        Err(e) => return bad_gateway(sh, idx, client_out, format!("cannot connect upstream: {e}")),
    };
    sh.track(conn, &upstream);
    let _ = upstream.set_nodelay(true);
    let _ = upstream.set_read_timeout(Some(UPSTREAM_TIMEOUT));
    let _ = upstream.set_write_timeout(Some(UPSTREAM_TIMEOUT));
    let mut up_out = upstream.try_clone()?;
    let mut up_in = BufReader::with_capacity(BUF, upstream);

    // Request head and body.
    let mut body_done = framing == Framing::Empty;
    let mut upstream_broken = false;
    if let Err(e) = write_head(&mut up_out, &head.start, &end_to_end(&head.headers), true) {
        sh.update(idx, |s| s.add_note(format!("upstream request head: {e}")));
        upstream_broken = true;
    } else if framing != Framing::Empty {
        let opts = CopyOpts { limit: drop_after, ..CopyOpts::default() };
        let result = copy_body(client_in, &mut up_out, framing, &opts, &mut |n, _| sh.update(idx, |s| s.request_body_bytes += n));
        match result {
            Ok(c) if c.complete => body_done = true,
            Ok(c) => {
                // The drop: the upstream sees a short body and EOF.
                let (rule, f) = fault.as_ref().expect("a limit comes from a drop rule");
                sh.fire(idx, *rule, f);
                let _ = up_out.shutdown(Shutdown::Write);
                let _ = up_in.get_ref().set_read_timeout(Some(DROP_WAIT));
                let reaction = match read_head(&mut up_in) {
                    Ok(Some(h)) => {
                        let _ = copy_body(&mut up_in, &mut io::sink(), Framing::UntilClose, &CopyOpts::default(), &mut |_, _| {});
                        format!("upstream then answered {:?}", h.start)
                    }
                    Ok(None) => "upstream closed without answering".to_string(),
                    Err(e) => format!("upstream: {e}"),
                };
                let _ = up_out.shutdown(Shutdown::Both);
                sh.update(idx, |s| s.add_note(format!("dropped after {} request body bytes; {reaction}", c.payload)));
                return Ok(false);
            }
            Err(CopyError::Read(e)) => {
                sh.update(idx, |s| s.add_note(format!("client request body: {e}")));
                let _ = up_out.shutdown(Shutdown::Both);
                return Ok(false);
            }
            Err(CopyError::Write(e)) => {
                // The upstream may have answered early (an error): relay it.
                sh.update(idx, |s| s.add_note(format!("upstream request body: {e}")));
                upstream_broken = true;
            }
        }
    }
    if let (Some(n), true) = (drop_after, body_done) {
        sh.update(idx, |s| s.add_note(format!("not dropped: the body ended within {n} bytes")));
    }

    // Response head (1xx interim responses skipped: Expect was not forwarded).
    let resp = loop {
        match read_head(&mut up_in) {
            Ok(Some(h)) => match status_of(&h.start) {
                Ok(s) if (100..200).contains(&s) => continue,
                Ok(s) => break Ok((h, s)),
                Err(e) => break Err(e),
            },
            Ok(None) => break Err(io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed without answering")),
            Err(e) => break Err(e),
        }
    };
    let (rhead, status) = match resp {
        Ok(r) => r,
        Err(e) => {
            let why = if upstream_broken { "upstream failed" } else { "bad upstream response" };
            sh.update(idx, |s| {
                s.status = Some(502);
                s.add_note(format!("{why}: {e}"));
            });
            write_head(client_out, "HTTP/1.1 502 Bad Gateway", &[("Content-Length".into(), "0".into())], true)?;
            return Ok(false);
        }
    };
    if drop_response {
        let (rule, f) = fault.as_ref().expect("drop_response comes from a rule");
        sh.fire(idx, *rule, f);
        sh.update(idx, |s| s.add_note(format!("upstream answered {:?}; not relayed", rhead.start)));
        let _ = up_out.shutdown(Shutdown::Both);
        let _ = client_out.shutdown(Shutdown::Both);
        return Ok(false);
    }
    let rframing = match response_framing(&method, status, &rhead.headers) {
        Ok(f) => f,
        Err(e) => return bad_gateway(sh, idx, client_out, format!("bad upstream response framing: {e}")),
    };
    let close = !client_keep || !body_done || rframing == Framing::UntilClose || truncate.is_some();
    let rheaders = end_to_end(&rhead.headers);
    sh.update(idx, |s| {
        s.status = Some(status);
        s.response_headers = rheaders.clone();
    });
    write_head(client_out, &rhead.start, &rheaders, close)?;

    // Response body.
    let opts = CopyOpts { limit: truncate, flip, count_first: true, ..CopyOpts::default() };
    // A flip is recorded before the piece holding it goes out.
    let result = copy_body(&mut up_in, client_out, rframing, &opts, &mut |n, flipped| {
        sh.update(idx, |s| s.response_body_bytes += n);
        if let (true, Some((rule, f))) = (flipped, &fault) {
            sh.fire(idx, *rule, f);
            sh.update(idx, |s| s.add_note(format!("response byte {} inverted", flip.unwrap_or_default())));
        }
    });
    match result {
        Ok(c) if !c.complete => {
            let (rule, f) = fault.as_ref().expect("a limit comes from a truncate rule");
            sh.fire(idx, *rule, f);
            if stall_after_truncate {
                client_out.flush()?;
                let _ = up_out.shutdown(Shutdown::Both);
                let secs = swallow_until_closed(client_in);
                sh.update(idx, |s| s.add_note(format!("stalled after {} response bytes; the client closed after {secs:.1} s", c.payload)));
                return Ok(false);
            }
            sh.update(idx, |s| s.add_note(format!("response truncated after {} bytes", c.payload)));
            let _ = client_out.shutdown(Shutdown::Both);
            Ok(false)
        }
        Ok(c) => {
            if let Some((_, f)) = &fault {
                match f {
                    Fault::FlipResponseByte(_) if c.flipped => {}
                    Fault::FlipResponseByte(i) => {
                        sh.update(idx, |s| s.add_note(format!("not flipped: the body has {} bytes, offset {i}", c.payload)));
                    }
                    Fault::TruncateResponse(n) | Fault::StallResponseAfter(n) => {
                        sh.update(idx, |s| s.add_note(format!("not truncated: the body has {} bytes, limit {n}", c.payload)));
                    }
                    _ => {}
                }
            }
            Ok(!close)
        }
        Err(e) => {
            sh.update(idx, |s| s.add_note(format!("response body {e}")));
            Ok(false)
        }
    }
}

// ---------------------------------------------------------------------------
// A small client for tests that speak HTTP by hand
// ---------------------------------------------------------------------------

/// A response read by [`read_response`] or [`http`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body payload (chunked bodies decoded).
    pub body: Vec<u8>,
    /// False when the connection ended before the body did.
    pub complete: bool,
}

impl HttpResponse {
    /// A header's value (first of that name, case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

/// Reads one response (interim 1xx ones skipped) to a request of `method`.
/// A body cut short gives `complete: false`, not an error.
pub fn read_response(r: &mut dyn BufRead, method: &str) -> io::Result<HttpResponse> {
    let (head, status) = loop {
        let head = read_head(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no response"))?;
        let status = status_of(&head.start)?;
        if !(100..200).contains(&status) {
            break (head, status);
        }
    };
    let framing = response_framing(method, status, &head.headers)?;
    let mut body = Vec::new();
    let opts = CopyOpts { decode: true, ..CopyOpts::default() };
    let complete = match copy_body(r, &mut body, framing, &opts, &mut |_, _| {}) {
        Ok(c) => c.complete,
        Err(CopyError::Read(_)) => false,
        Err(CopyError::Write(e)) => return Err(e),
    };
    Ok(HttpResponse { status, headers: head.headers, body, complete })
}

/// Splits "http://HOST:PORT/path?query" into ("HOST:PORT", "/path?query").
pub fn split_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("http://").unwrap_or_else(|| panic!("not an http:// URL: {url:?}"));
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    }
}

/// One request on a fresh connection to the URL's host ("http://HOST:PORT/…"),
/// with `Host` set to it, `Connection: close`, the given headers and `body`
/// (with a `Content-Length` unless `headers` has one or a
/// `Transfer-Encoding`, in which case `body` must already be framed), and a
/// 30 s read timeout. Errors when the connection fails before a response head
/// arrives.
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> io::Result<HttpResponse> {
    let (host, target) = split_url(url);
    let mut s = TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let framed = headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding"));
    if !framed && (!body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH")) {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut data = req.into_bytes();
    data.extend_from_slice(body);
    // A failed write (the peer cut us off) still leaves an answer to read,
    // if the peer sent one.
    let written = s.write_all(&data);
    let mut r = BufReader::new(s);
    match read_response(&mut r, method) {
        Ok(resp) => Ok(resp),
        Err(e) => Err(written.err().unwrap_or(e)),
    }
}

/// Swallows whatever the client sends until it closes (or the proxy's drop
/// shuts the socket down); returns how many seconds that took.
fn swallow_until_closed(client_in: &mut impl Read) -> f64 {
    let started = Instant::now();
    let mut sink = [0u8; BUF];
    while let Ok(n) = client_in.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    started.elapsed().as_secs_f64()
}
