//! The real agent server (the `osb-agent` binary with `--listen unix://...`) driven
//! through real ttrpc: the typed client, the raw ttrpc client, and hand-made bytes on
//! the socket. Each test starts its own agent as a child process and kills it by pid
//! when the test ends (pass or fail).
#![cfg(feature = "server")]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use osb_agent::client::{Client, Code, Endpoint, Error, ExecSpec, ProcessId, User};
use osb_agent::proto::agent::{CopyFileRequest, ReadStreamRequest};
use protobuf::Message;

const TIMEOUT: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!("osb-agent-test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An agent process listening on a Unix socket; killed (by pid) on drop.
struct Agent {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(&["--init-pid", "0"], None)
    }

    /// Starts the agent with `args`; `workload_fd` (a pipe's read end) becomes fd 3.
    fn start_with(args: &[&str], workload_fd: Option<i32>) -> Agent {
        let dir = TempDir::new("srv");
        let socket = dir.0.join("agent.sock");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_osb-agent"));
        cmd.arg("--listen").arg(format!("unix://{}", socket.display())).args(args).stdin(Stdio::null());
        if let Some(fd) = workload_fd {
            // SAFETY: dup2 between fork and exec is async-signal-safe.
            unsafe {
                cmd.pre_exec(move || {
                    if fd == 3 {
                        // dup2 onto itself would keep close-on-exec.
                        libc::fcntl(3, libc::F_SETFD, 0);
                    } else if libc::dup2(fd, 3) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().expect("start osb-agent");
        let agent = Agent { child, socket, _dir: dir };
        let start = Instant::now();
        while UnixStream::connect(&agent.socket).is_err() {
            assert!(start.elapsed() < TIMEOUT, "the agent did not start listening");
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    fn client(&self) -> Client {
        Client::connect(&self.endpoint(), TIMEOUT).expect("connect to the agent")
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn threads(&self) -> usize {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
    }

    /// The agent is still running (did not crash).
    fn assert_alive(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "the agent died");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spec(args: &[&str]) -> ExecSpec {
    ExecSpec { timeout: Some(Duration::from_secs(30)), ..ExecSpec::new(args.iter().copied()) }
}

fn code_of(r: Result<impl std::fmt::Debug, Error>) -> Code {
    match r {
        Err(e) => e.code().unwrap_or_else(|| panic!("not a status: {e}")),
        Ok(v) => panic!("expected an error status, got {v:?}"),
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn health_and_version() {
    let agent = Agent::start();
    let client = agent.client();
    assert!(client.check().unwrap());
    let v = client.version().unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.grpc_version, "0.0.1");
}

#[test]
fn exec_output_stdin_and_exit_codes() {
    let agent = Agent::start();
    let client = agent.client();

    let out = client.exec(&spec(&["echo", "hello", "world"]), b"").unwrap();
    assert_eq!(out, osb_agent::client::ExecOutput { code: 0, stdout: b"hello world\n".to_vec(), stderr: vec![] });

    // stdin round trip, larger than a pipe buffer and several WriteStdin chunks.
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let out = client.exec(&spec(&["cat"]), &input).unwrap();
    assert_eq!(out.code, 0);
    assert!(out.stdout == input, "cat returned {} bytes of {}", out.stdout.len(), input.len());

    let out = client.exec(&spec(&["sh", "-c", "echo out; echo err >&2; exit 7"]), b"").unwrap();
    assert_eq!((out.code, &out.stdout[..], &out.stderr[..]), (7, &b"out\n"[..], &b"err\n"[..]));

    // Environment and working directory.
    let mut s = spec(&["sh", "-c", "echo $FOO:$PWD:$HOME"]);
    s.env = vec!["FOO=bar".into()];
    s.cwd = "/tmp".into();
    assert_eq!(client.exec(&s, b"").unwrap().stdout, b"bar:/tmp:/root\n");

    // A missing program is an error status, not a process.
    assert_eq!(code_of(client.exec(&spec(&["/no/such/program"]), b"")), Code::NOT_FOUND);
    assert_eq!(code_of(client.exec(&spec(&[]), b"")), Code::INVALID_ARGUMENT);
}

#[test]
fn stdin_writes_and_close() {
    let agent = Agent::start();
    let client = agent.client();
    let id = client.start(&spec(&["cat"])).unwrap();
    assert_eq!(client.write_stdin(&id, b"abc").unwrap(), 3);
    assert_eq!(client.read_stream(&id, true, 100).unwrap().unwrap(), b"abc");
    client.close_stdin(&id).unwrap();
    assert_eq!(client.read_stream(&id, true, 100).unwrap(), None);
    assert_eq!(client.read_stream(&id, false, 100).unwrap(), None);
    assert_eq!(code_of(client.write_stdin(&id, b"x")), Code::FAILED_PRECONDITION);
    assert_eq!(client.wait(&id).unwrap(), 0);
    // Waited for and drained: the entry is gone.
    assert_eq!(code_of(client.wait(&id)), Code::NOT_FOUND);
}

#[test]
fn ids_duplicate_unknown_and_signals() {
    let agent = Agent::start();
    let client = agent.client();
    let mut s = spec(&["sleep", "1000"]);
    s.exec_id = "sleeper".into();
    let id = client.start(&s).unwrap();
    assert_eq!(code_of(client.start(&s)), Code::ALREADY_EXISTS);

    let unknown = ProcessId { container_id: "osb".into(), exec_id: "nope".into() };
    assert_eq!(code_of(client.wait(&unknown)), Code::NOT_FOUND);
    assert_eq!(code_of(client.signal(&unknown, 9)), Code::NOT_FOUND);
    assert_eq!(code_of(client.read_stream(&unknown, true, 10)), Code::NOT_FOUND);
    assert_eq!(code_of(client.close_stdin(&unknown)), Code::NOT_FOUND);
    assert_eq!(code_of(client.signal(&id, 1000)), Code::INVALID_ARGUMENT);

    // A bounded wait times out on the agent's side.
    assert_eq!(code_of(client.wait_timeout(&id, Duration::from_millis(300))), Code::DEADLINE_EXCEEDED);
    client.signal(&id, libc::SIGKILL).unwrap();
    assert_eq!(client.wait(&id).unwrap(), 128 + libc::SIGKILL);

    let term = client.start(&spec(&["sleep", "1000"])).unwrap();
    client.signal(&term, libc::SIGTERM).unwrap();
    assert_eq!(client.wait(&term).unwrap(), 128 + libc::SIGTERM);
    // Signalling an exited process is not an error.
    client.signal(&term, libc::SIGTERM).unwrap();

    // An empty exec id signals every process of the container.
    let mut a = spec(&["sleep", "1000"]);
    a.container_id = "box".into();
    let (a, b) = (client.start(&a).unwrap(), client.start(&a).unwrap());
    client.signal(&ProcessId { container_id: "box".into(), exec_id: String::new() }, libc::SIGKILL).unwrap();
    assert_eq!(client.wait(&a).unwrap(), 137);
    assert_eq!(client.wait(&b).unwrap(), 137);
}

#[test]
fn tty_exec_and_resize() {
    let agent = Agent::start();
    let client = agent.client();
    let mut s = spec(&["sh", "-c", "stty size; echo $0 >&2"]);
    s.tty = true;
    s.tty_size = Some((24, 80));
    let out = client.exec(&s, b"").unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.code, 0);
    assert!(text.contains("24 80"), "{text:?}");
    assert!(text.contains("sh"), "stderr goes to the terminal too: {text:?}");
    assert!(out.stderr.is_empty());

    let mut s = spec(&["sh", "-c", "read line; stty size"]);
    s.tty = true;
    let id = client.start(&s).unwrap();
    client.resize_tty(&id, 50, 132).unwrap();
    client.write_stdin(&id, b"go\n").unwrap();
    let mut output = Vec::new();
    while let Some(chunk) = client.read_stream(&id, true, 1024).unwrap() {
        output.extend(chunk);
    }
    assert_eq!(client.read_stream(&id, false, 1024).unwrap(), None);
    assert_eq!(client.wait(&id).unwrap(), 0);
    let text = String::from_utf8_lossy(&output);
    assert!(text.contains("50 132"), "{text:?}");

    let plain = client.start(&spec(&["sleep", "1000"])).unwrap();
    assert_eq!(code_of(client.resize_tty(&plain, 10, 10)), Code::FAILED_PRECONDITION);
    client.signal(&plain, 9).unwrap();
}

#[test]
fn user_and_groups() {
    if !is_root() {
        testkit::skip!("user_and_groups", "needs root to switch users");
        return;
    }
    let agent = Agent::start();
    let client = agent.client();
    let mut s = spec(&["id"]);
    s.user = User { uid: 65534, gid: 65534, additional_gids: vec![4242], username: String::new() };
    let text = String::from_utf8(client.exec(&s, b"").unwrap().stdout).unwrap();
    assert!(text.starts_with("uid=65534") && text.contains("gid=65534"), "{text}");
    assert!(text.contains("4242"), "{text}");

    let mut s = spec(&["id", "-u"]);
    s.user.username = "nobody".into();
    assert_eq!(client.exec(&s, b"").unwrap().stdout, b"65534\n");
    s.user.username = "no-such-user-here".into();
    assert_eq!(code_of(client.exec(&s, b"")), Code::INVALID_ARGUMENT);
}

#[test]
fn copy_file_chunks_temp_rename_and_refusals() {
    use std::os::unix::fs::PermissionsExt;
    let agent = Agent::start();
    let client = agent.client();
    let dir = TempDir::new("copy");

    let data: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
    let local = dir.0.join("local.bin");
    std::fs::write(&local, &data).unwrap();
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o640)).unwrap();
    let dest = dir.0.join("new/sub/dir/file.bin");
    client.copy_file(&local, dest.to_str().unwrap(), 0, 0).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), data);
    assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, 0o640);
    assert!(!dir.0.join("new/sub/dir/.file.bin.osb-copy").exists());

    // Chunk by chunk: nothing at the destination until the last chunk arrives.
    let target = dir.0.join("partial.txt");
    let chunk = |offset: usize, bytes: &[u8]| CopyFileRequest { dir_mode: 0o755, ..file_chunk(&target, 10, offset, bytes) };
    let svc = client.agent_service();
    let ctx = || ttrpc::context::with_duration(TIMEOUT);
    svc.copy_file(ctx(), &chunk(0, b"01234")).unwrap();
    assert!(!target.exists());
    assert!(dir.0.join(".partial.txt.osb-copy").exists());
    svc.copy_file(ctx(), &chunk(5, b"56789")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"0123456789");
    assert!(!dir.0.join(".partial.txt.osb-copy").exists());
    // Past file_size, or a later chunk without a copy in progress.
    assert_eq!(code_of(svc.copy_file(ctx(), &chunk(8, b"xyz")).map_err(Error::from)), Code::INVALID_ARGUMENT);
    assert_eq!(code_of(svc.copy_file(ctx(), &chunk(5, b"x")).map_err(Error::from)), Code::FAILED_PRECONDITION);

    // Empty files, directories and symlinks.
    let empty = dir.0.join("empty");
    client.copy_bytes(b"", empty.to_str().unwrap(), 0o600, 0, 0).unwrap();
    assert_eq!(std::fs::read(&empty).unwrap(), b"");
    let mut mkdir = chunk(0, b"");
    mkdir.path = dir.0.join("a-dir").to_str().unwrap().into();
    mkdir.file_mode = 0o040750;
    mkdir.file_size = 0;
    svc.copy_file(ctx(), &mkdir).unwrap();
    assert!(dir.0.join("a-dir").is_dir());
    let mut link = chunk(0, b"a-dir");
    link.path = dir.0.join("a-link").to_str().unwrap().into();
    link.file_mode = 0o120777;
    link.file_size = 5;
    svc.copy_file(ctx(), &link).unwrap();
    assert_eq!(std::fs::read_link(dir.0.join("a-link")).unwrap(), Path::new("a-dir"));

    // Relative paths and `..` are refused.
    let escape = format!("{}/../escape", dir.0.display());
    for bad in [escape.as_str(), "relative/path", "/"] {
        assert_eq!(code_of(client.copy_bytes(b"x", bad, 0o644, 0, 0)), Code::INVALID_ARGUMENT, "{bad}");
    }
    assert!(!dir.0.parent().unwrap().join("escape").exists());
}

/// A raw ttrpc request through the `ttrpc` crate's client.
fn raw_request(client: &Client, service: &str, method: &str) -> Result<ttrpc::Response, ttrpc::Error> {
    let mut req = ttrpc::Request::new();
    req.service = service.into();
    req.method = method.into();
    req.timeout_nano = TIMEOUT.as_nanos() as i64;
    client.raw().request(req)
}

#[test]
fn unknown_methods_are_unimplemented() {
    let agent = Agent::start();
    let client = agent.client();
    for (service, method, message) in [
        ("grpc.AgentService", "CreateContainer", "method CreateContainer"),
        ("grpc.AgentService", "NoSuchMethod", "method NoSuchMethod"),
        ("grpc.NoSuchService", "Check", "service grpc.NoSuchService"),
    ] {
        match raw_request(&client, service, method) {
            Err(ttrpc::Error::RpcStatus(s)) => {
                assert_eq!(s.code(), Code::UNIMPLEMENTED);
                assert_eq!(s.code() as i32, 12);
                assert_eq!(s.message, message);
            }
            other => panic!("{service}/{method}: {other:?}"),
        }
    }
    // The connection still serves.
    assert!(client.check().unwrap());
}

// ---- byte-level ttrpc ----

fn frame(length: u32, stream_id: u32, kind: u8, flags: u8) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&length.to_be_bytes());
    b.extend_from_slice(&stream_id.to_be_bytes());
    b.push(kind);
    b.push(flags);
    b
}

/// Reads one frame: (stream id, type, flags, payload).
fn read_frame(s: &mut UnixStream) -> (u32, u8, u8, Vec<u8>) {
    let mut head = [0u8; 10];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes(head[..4].try_into().unwrap());
    let stream = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).unwrap();
    (stream, head[8], head[9], payload)
}

fn raw_stream(agent: &Agent) -> UnixStream {
    let s = UnixStream::connect(&agent.socket).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

/// grpc.Health/Check as ttrpc Request bytes, encoded by hand:
/// service (1) "grpc.Health", method (2) "Check", payload (3) empty.
fn check_request_bytes() -> Vec<u8> {
    let mut p = vec![0x0a, 11];
    p.extend_from_slice(b"grpc.Health");
    p.extend_from_slice(&[0x12, 5]);
    p.extend_from_slice(b"Check");
    p.extend_from_slice(&[0x1a, 0]);
    p
}

fn status_of(payload: &[u8]) -> (Code, String) {
    let res = ttrpc::Response::parse_from_bytes(payload).unwrap();
    let status = res.status.clone().unwrap_or_default();
    (status.code(), status.message)
}

#[test]
fn frames_match_the_ttrpc_spec_byte_for_byte() {
    let agent = Agent::start();
    let mut s = raw_stream(&agent);
    let payload = check_request_bytes();
    let mut req = frame(payload.len() as u32, 1, 1, 0);
    req.extend_from_slice(&payload);
    s.write_all(&req).unwrap();

    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(
        reply,
        [
            0, 0, 0, 6, // length, big endian
            0, 0, 0, 1, // stream id, big endian
            2, // type: response
            0, // flags
            0x0a, 0x00, // Response.status (1): Status { code: OK }
            0x12, 0x02, 0x08, 0x01, // Response.payload (2): HealthCheckResponse { status: SERVING }
        ]
    );
}

#[test]
fn oversized_malformed_and_garbage_frames() {
    let mut agent = Agent::start();
    let mut s = raw_stream(&agent);

    // Over ttrpc's 4 MiB: discarded and answered RESOURCE_EXHAUSTED, as Go's ttrpc does.
    let len = (4 << 20) + 1;
    let mut big = frame(len, 1, 1, 0);
    big.resize(10 + len as usize, 0xee);
    s.write_all(&big).unwrap();
    let (stream, kind, _, payload) = read_frame(&mut s);
    assert_eq!((stream, kind), (1, 2));
    let (code, message) = status_of(&payload);
    assert_eq!(code, Code::RESOURCE_EXHAUSTED);
    assert!(message.contains("exceed maximum message size"), "{message}");

    // An undecodable envelope: INVALID_ARGUMENT.
    let mut bad = frame(3, 3, 1, 0);
    bad.extend_from_slice(&[0xff, 0xff, 0xff]);
    s.write_all(&bad).unwrap();
    let (stream, _, _, payload) = read_frame(&mut s);
    assert_eq!((stream, status_of(&payload).0), (3, Code::INVALID_ARGUMENT));

    // An even (server-side) stream id, and a re-used one: INVALID_ARGUMENT.
    let payload = check_request_bytes();
    for id in [4u32, 3] {
        let mut f = frame(payload.len() as u32, id, 1, 0);
        f.extend_from_slice(&payload);
        s.write_all(&f).unwrap();
        let (stream, _, _, reply) = read_frame(&mut s);
        assert_eq!((stream, status_of(&reply).0), (id, Code::INVALID_ARGUMENT));
    }

    // A well-formed request whose payload is garbage for its method.
    let mut req = vec![0x0a, 11];
    req.extend_from_slice(b"grpc.Health");
    req.extend_from_slice(&[0x12, 5]);
    req.extend_from_slice(b"Check");
    req.extend_from_slice(&[0x1a, 2, 0xff, 0xff]);
    let mut f = frame(req.len() as u32, 5, 1, 0);
    f.extend_from_slice(&req);
    s.write_all(&f).unwrap();
    let (stream, _, _, reply) = read_frame(&mut s);
    assert_eq!(stream, 5);
    // ttrpc's generated handler fails to decode it: INTERNAL, naming the unmarshalling.
    let (code, message) = status_of(&reply);
    assert_eq!(code, Code::INTERNAL, "{message}");
    assert!(message.starts_with("ttrpc: error unmarshalling payload: "), "{message}");

    // A frame of a type that is neither request nor data is ignored: the next
    // answer on the connection is the one to the request after it.
    let mut odd = frame(3, 9, 0x54, 0);
    odd.extend_from_slice(b"xyz");
    s.write_all(&odd).unwrap();

    // The same connection still answers a good request.
    let mut f = frame(payload.len() as u32, 11, 1, 0);
    f.extend_from_slice(&payload);
    s.write_all(&f).unwrap();
    let (stream, _, _, reply) = read_frame(&mut s);
    assert_eq!((stream, status_of(&reply).0), (11, Code::OK));

    // Plain garbage on another connection. An HTTP request read as a ttrpc
    // header claims a payload of 0x47455420 ("GET ") bytes, over the limit:
    // the agent discards what follows, meets the end of the stream and closes
    // the connection without a word (no reply, no reset, no wait).
    let mut g = raw_stream(&agent);
    g.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    g.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let read = g.read_to_end(&mut rest);
    assert!(matches!(read, Ok(0)), "the agent must close the garbage connection at once, got {read:?} after {rest:?}");
    drop(g);
    // A connection that ends inside a header or payload.
    let mut h = raw_stream(&agent);
    h.write_all(&frame(100, 1, 1, 0)[..7]).unwrap();
    drop(h);

    agent.assert_alive();
    assert!(agent.client().check().unwrap());
}

#[test]
fn vanished_client_does_not_leak_a_blocked_read() {
    let mut agent = Agent::start();
    let client = agent.client();
    let id = client.start(&spec(&["sleep", "1000"])).unwrap();
    let baseline = agent.threads();

    // A second client blocks in ReadStdout (sleep prints nothing), then vanishes.
    let mut s = raw_stream(&agent);
    let req = ReadStreamRequest { container_id: id.container_id.clone(), exec_id: id.exec_id.clone(), len: 1024, ..Default::default() };
    let mut r = ttrpc::Request::new();
    r.service = "grpc.AgentService".into();
    r.method = "ReadStdout".into();
    r.payload = req.write_to_bytes().unwrap();
    let payload = r.write_to_bytes().unwrap();
    let mut f = frame(payload.len() as u32, 1, 1, 0);
    f.extend_from_slice(&payload);
    s.write_all(&f).unwrap();
    wait_until("the blocked read to start", || agent.threads() > baseline);
    drop(s);
    wait_until("the blocked read to end", || agent.threads() <= baseline);

    // The process is unaffected.
    client.signal(&id, libc::SIGKILL).unwrap();
    assert_eq!(client.wait(&id).unwrap(), 137);
    agent.assert_alive();
}

#[test]
fn concurrent_execs_all_complete() {
    let agent = Agent::start();
    let shared = agent.client();
    let threads: Vec<_> = (0..20)
        .map(|i| {
            // Half share one connection, half have their own.
            let client = if i % 2 == 0 { shared.clone() } else { agent.client() };
            std::thread::spawn(move || {
                let out = client.exec(&spec(&["sh", "-c", &format!("sleep 0.2; echo {i}; echo e{i} >&2; exit {}", i % 5)]), b"").unwrap();
                assert_eq!(out.stdout, format!("{i}\n").into_bytes());
                assert_eq!(out.stderr, format!("e{i}\n").into_bytes());
                assert_eq!(out.code, i % 5);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(shared.check().unwrap());
}

#[test]
fn resources_and_guest_details() {
    let agent = Agent::start();
    let client = agent.client();
    let res = client.resources().unwrap();
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    assert_eq!(res.cpus_online, osb_agent::resources::count_cpu_list(&online));
    // SAFETY: sysconf has no preconditions.
    let nproc = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    assert_eq!(i64::from(res.cpus_online), nproc as i64);
    assert!(res.mem_total_bytes > 0 && res.mem_available_bytes <= res.mem_total_bytes);
    let text = client.metrics().unwrap();
    assert!(text.contains(&format!("osb_guest_cpus_online {}", res.cpus_online)), "{text}");

    let details = client.guest_details().unwrap();
    let expected = std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes").map(|s| u64::from_str_radix(s.trim(), 16).unwrap()).unwrap_or(0);
    assert_eq!(details.mem_block_size_bytes, expected);
    assert_eq!(details.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!details.init_daemon);
    assert_eq!(details.support_mem_hotplug_probe, Path::new("/sys/devices/system/memory/probe").exists());
    // Bad times are refused before the clock is touched.
    let req = osb_agent::proto::agent::SetGuestDateTimeRequest { Sec: 1, Usec: 5_000_000, ..Default::default() };
    let r = client.agent_service().set_guest_date_time(ttrpc::context::with_duration(TIMEOUT), &req);
    assert_eq!(code_of(r.map_err(Error::from)), Code::INVALID_ARGUMENT);
}

#[test]
fn workload_events_and_destroy_sandbox() {
    // The "workload" and the "init" are sleeps of this test; the agent learns of the
    // workload through the event pipe and signals the "init" on DestroySandbox.
    let mut workload = Command::new("sleep").arg("1000").spawn().unwrap();
    let mut init = Command::new("sleep").arg("1000").spawn().unwrap();
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let init_pid = init.id().to_string();
    let agent = Agent::start_with(&["--workload-fd", "3", "--init-pid", &init_pid], Some(fds[0]));
    // SAFETY: the read end now lives in the agent; the write end is ours.
    unsafe { libc::close(fds[0]) };
    let mut events = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let client = agent.client();
    let w = ProcessId { container_id: "workload".into(), exec_id: String::new() };

    assert_eq!(code_of(client.wait_timeout(&w, Duration::from_millis(100))), Code::NOT_FOUND);
    writeln!(events, "{{\"event\":\"started\",\"pid\":{}}}", workload.id()).unwrap();
    wait_until("the started event", || client.wait_timeout(&w, Duration::from_millis(50)).is_err_and(|e| e.code() == Some(Code::DEADLINE_EXCEEDED)));
    assert_eq!(code_of(client.read_stream(&w, true, 10)), Code::FAILED_PRECONDITION);
    client.signal(&w, libc::SIGTERM).unwrap();
    let status = workload.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGTERM));
    writeln!(events, "{{\"event\":\"exited\",\"pid\":{},\"code\":143}}", workload.id()).unwrap();
    let waiter = {
        let client = client.clone();
        let w = w.clone();
        std::thread::spawn(move || client.wait(&w))
    };
    assert_eq!(waiter.join().unwrap().unwrap(), 143);
    assert_eq!(client.wait(&WorkloadAlias::id()).unwrap(), 143);

    // DestroySandbox kills exec'd processes and signals "init" with SIGUSR2.
    let id = client.start(&spec(&["sleep", "1000"])).unwrap();
    client.destroy_sandbox().unwrap();
    assert_eq!(client.wait(&id).unwrap(), 137);
    let status = init.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGUSR2));
}

/// The workload's other name: exec id "workload".
struct WorkloadAlias;

impl WorkloadAlias {
    fn id() -> ProcessId {
        ProcessId { container_id: "workload".into(), exec_id: "workload".into() }
    }
}

#[test]
fn hybrid_vsock_handshake() {
    let agent = Agent::start();
    let dir = TempDir::new("hv");
    let hv = dir.0.join("hv.sock");
    let listener = UnixListener::bind(&hv).unwrap();
    let target = agent.socket.clone();
    // A stand-in for the VMM's hybrid vsock socket: answers CONNECT 1024 with OK and
    // then relays bytes to the agent; any other port gets an error line.
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let target = target.clone();
            std::thread::spawn(move || {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while conn.read_exact(&mut b).is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line != b"CONNECT 1024" {
                    let _ = conn.write_all(b"ERR unknown port\n");
                    return;
                }
                conn.write_all(b"OK 1073741824\n").unwrap();
                let agent = UnixStream::connect(target).unwrap();
                let (mut a1, mut c1) = (agent.try_clone().unwrap(), conn.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut c1, &mut a1));
                let (mut a2, mut c2) = (agent, conn);
                let _ = std::io::copy(&mut a2, &mut c2);
            });
        }
    });
    let endpoint = Endpoint::HybridVsock { path: hv.clone(), port: 1024 };
    let client = Client::connect(&endpoint, TIMEOUT).unwrap();
    assert!(client.check().unwrap());
    assert_eq!(client.exec(&spec(&["echo", "via hvsock"]), b"").unwrap().stdout, b"via hvsock\n");

    let wrong = Endpoint::HybridVsock { path: hv, port: 9 };
    match Client::connect(&wrong, TIMEOUT) {
        Err(Error::Handshake { reply, .. }) => assert_eq!(reply, "ERR unknown port"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("connected to a port nobody listens on"),
    }
}

#[test]
fn copy_file_keeps_setuid_bits() {
    use std::os::unix::fs::PermissionsExt;
    if !is_root() {
        eprintln!("SKIP: copy_file_keeps_setuid_bits: needs root to chown");
        return;
    }
    let agent = Agent::start();
    let client = agent.client();
    let dir = TempDir::new("suid");
    // chown(2) clears S_ISUID/S_ISGID on a regular file (even to the same owner,
    // even as root): the mode must be set after the owner.
    for mode in [0o4755, 0o2755, 0o6750] {
        let dest = dir.0.join(format!("prog-{mode:o}"));
        client.copy_bytes(b"#!/bin/sh\n", dest.to_str().unwrap(), mode, 0, 0).unwrap();
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o7777, mode, "{}", dest.display());
    }
    // A setgid directory keeps its bit too.
    let req = CopyFileRequest { path: dir.0.join("shared").to_str().unwrap().into(), file_mode: libc::S_IFDIR | 0o2775, uid: 0, gid: 0, ..Default::default() };
    client.agent_service().copy_file(ttrpc::context::with_duration(TIMEOUT), &req).unwrap();
    assert_eq!(std::fs::metadata(dir.0.join("shared")).unwrap().permissions().mode() & 0o7777, 0o2775);
}

#[test]
fn copy_file_with_a_missing_middle_chunk_is_not_renamed() {
    let agent = Agent::start();
    let client = agent.client();
    let dir = TempDir::new("hole");
    let target = dir.0.join("holey.bin");
    let temp = dir.0.join(".holey.bin.osb-copy");
    let chunk = |offset: usize, bytes: &[u8]| file_chunk(&target, 9, offset, bytes);
    let svc = client.agent_service();
    let ctx = || ttrpc::context::with_duration(TIMEOUT);
    // Chunks 0 and 2 of 3: the last one reaches file_size, but bytes 3..6 never came.
    svc.copy_file(ctx(), &chunk(0, b"abc")).unwrap();
    svc.copy_file(ctx(), &chunk(6, b"ghi")).unwrap();
    assert!(!target.exists(), "a file with a hole was renamed into place: {:?}", std::fs::read(&target));
    assert!(temp.exists());
    // The missing chunk completes it.
    svc.copy_file(ctx(), &chunk(3, b"def")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"abcdefghi");
    assert!(!temp.exists());

    // Overlapping and repeated chunks count each byte once; a chunk for a copy that
    // changed its size is refused.
    svc.copy_file(ctx(), &chunk(0, b"ABCD")).unwrap();
    svc.copy_file(ctx(), &chunk(2, b"CD")).unwrap();
    svc.copy_file(ctx(), &chunk(6, b"GHI")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"abcdefghi");
    let mut resized = chunk(4, b"EF");
    resized.file_size = 12;
    assert_eq!(code_of(svc.copy_file(ctx(), &resized).map_err(Error::from)), Code::INVALID_ARGUMENT);
    svc.copy_file(ctx(), &chunk(4, b"EF")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"ABCDEFGHI");
}

#[test]
fn copy_file_does_not_follow_symlinked_parents() {
    const KEEP: u32 = u32::MAX; // -1: leave the owner alone
    let agent = Agent::start();
    let client = agent.client();
    let dir = TempDir::new("symparent");
    let outside = dir.0.join("outside");
    let root = dir.0.join("root");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(&root).unwrap();
    // A guest process planted a link in a directory the host copies into.
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    for dest in ["link/file", "link/new/sub/file"] {
        let dest = root.join(dest);
        let r = client.copy_bytes(b"secret", dest.to_str().unwrap(), 0o644, KEEP, KEEP);
        match r {
            Err(Error::Status { code, message }) => {
                assert_eq!(code, Code::FAILED_PRECONDITION, "{message}");
                assert!(message.contains("symbolic link"), "{message}");
                assert!(message.contains("link"), "{message}");
            }
            other => panic!("{}: {other:?}", dest.display()),
        }
    }
    // A directory and a symlink through the link are refused too.
    let mkdir =
        CopyFileRequest { path: root.join("link/made").to_str().unwrap().into(), file_mode: libc::S_IFDIR | 0o755, uid: -1, gid: -1, ..Default::default() };
    let svc = client.agent_service();
    assert_eq!(code_of(svc.copy_file(ttrpc::context::with_duration(TIMEOUT), &mkdir).map_err(Error::from)), Code::FAILED_PRECONDITION);
    // A directory copied onto the link itself does not chmod the link's target.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
    let onto = CopyFileRequest { path: root.join("link").to_str().unwrap().into(), file_mode: libc::S_IFDIR | 0o777, uid: -1, gid: -1, ..Default::default() };
    assert!(svc.copy_file(ttrpc::context::with_duration(TIMEOUT), &onto).is_err());
    assert_eq!(std::fs::metadata(&outside).unwrap().permissions().mode() & 0o7777, 0o700);
    let names: Vec<_> = std::fs::read_dir(&outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.is_empty(), "written through the link: {names:?}");
    // The same copy to the real directory works.
    client.copy_bytes(b"fine", root.join("real/file").to_str().unwrap(), 0o644, KEEP, KEEP).unwrap();
    assert_eq!(std::fs::read(root.join("real/file")).unwrap(), b"fine");
}

/// Holds every exec of one file inside execve(2) until released: a fanotify
/// FAN_OPEN_EXEC_PERM mark on it (needs CAP_SYS_ADMIN). Dropping the gate
/// closes the group, which lets pending execs through.
struct ExecGate {
    fd: std::os::fd::OwnedFd,
}

impl ExecGate {
    fn new(file: &Path) -> std::io::Result<ExecGate> {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        // SAFETY: plain fanotify_init.
        let fd = unsafe { libc::fanotify_init(libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC, (libc::O_RDONLY | libc::O_CLOEXEC) as u32) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned here.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let path = std::ffi::CString::new(file.as_os_str().as_bytes()).unwrap();
        // SAFETY: path is NUL-terminated.
        let rc =
            unsafe { libc::fanotify_mark(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::FAN_MARK_ADD, libc::FAN_OPEN_EXEC_PERM, libc::AT_FDCWD, path.as_ptr()) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(ExecGate { fd })
    }

    /// Blocks until a process is held in execve of the file; the event's fd.
    fn held(&self) -> i32 {
        let mut ev = std::mem::MaybeUninit::<libc::fanotify_event_metadata>::uninit();
        let size = std::mem::size_of::<libc::fanotify_event_metadata>();
        // SAFETY: ev is writable for `size` bytes.
        let n = unsafe { libc::read(std::os::fd::AsRawFd::as_raw_fd(&self.fd), ev.as_mut_ptr().cast(), size) };
        assert_eq!(n, size as isize, "fanotify read: {}", std::io::Error::last_os_error());
        // SAFETY: the kernel filled a whole event.
        let ev = unsafe { ev.assume_init() };
        assert!(ev.mask & libc::FAN_OPEN_EXEC_PERM != 0);
        ev.fd
    }

    /// Lets the exec held at `event_fd` go on.
    fn release(&self, event_fd: i32) {
        let res = libc::fanotify_response { fd: event_fd, response: libc::FAN_ALLOW };
        let size = std::mem::size_of::<libc::fanotify_response>();
        // SAFETY: res is a valid fanotify_response of that size.
        let n = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&self.fd), (&res as *const libc::fanotify_response).cast(), size) };
        assert_eq!(n, size as isize, "fanotify write: {}", std::io::Error::last_os_error());
        // SAFETY: the event's descriptor is ours to close.
        unsafe { libc::close(event_fd) };
    }
}

#[test]
fn a_slow_exec_does_not_stall_other_calls() {
    if !is_root() {
        eprintln!("SKIP: a_slow_exec_does_not_stall_other_calls: fanotify needs root");
        return;
    }
    let agent = Agent::start();
    let client = agent.client();
    let other = client.start(&spec(&["sleep", "1000"])).unwrap();
    let dir = TempDir::new("gate");
    let gated = dir.0.join("gated-true");
    std::fs::copy("/bin/true", &gated).unwrap();
    let gate = ExecGate::new(&gated).expect("fanotify (needs CAP_SYS_ADMIN)");

    let mut slow = spec(&[gated.to_str().unwrap()]);
    slow.exec_id = "slow".into();
    let exec = {
        let client = agent.client();
        let slow = slow.clone();
        std::thread::spawn(move || client.exec(&slow, b""))
    };
    // The agent's child is now inside execve: the agent sits in its spawn.
    let event = gate.held();

    let mut quick = agent.client();
    quick.set_timeout(Duration::from_secs(5));
    let during =
        (quick.signal(&other, 0), quick.start(&slow).map_err(|e| e.code()), quick.wait_timeout(&other, Duration::from_millis(10)).map_err(|e| e.code()));
    gate.release(event);
    let (signalled, duplicate, waited) = during;
    signalled.expect("SignalProcess while another exec is being spawned");
    // The id being spawned is taken already.
    assert_eq!(duplicate, Err(Some(Code::ALREADY_EXISTS)));
    assert_eq!(waited, Err(Some(Code::DEADLINE_EXCEEDED)));

    assert_eq!(exec.join().unwrap().unwrap().code, 0);
    client.signal(&other, libc::SIGKILL).unwrap();
    assert_eq!(client.wait(&other).unwrap(), 137);
}

#[test]
fn idle_connections_do_not_lock_out_a_new_client() {
    let mut agent = Agent::start();
    // The oldest connection has a call in flight: it is busy, not idle.
    let busy = agent.client();
    let id = busy.start(&spec(&["sleep", "1000"])).unwrap();
    let baseline = agent.threads();
    let waiter = {
        let busy = busy.clone();
        let id = id.clone();
        std::thread::spawn(move || busy.wait(&id))
    };
    wait_until("the WaitProcess call to start", || agent.threads() > baseline);

    // Far more idle connections than the agent serves at once.
    let cap = osb_agent::server::rpc::Limits::default().max_connections;
    let idle: Vec<UnixStream> = (0..200.max(cap + 1)).map(|_| UnixStream::connect(&agent.socket).unwrap()).collect();
    let fresh = agent.client();
    assert!(fresh.check().expect("health check of a new client"));
    // The busy connection was not the one to go.
    assert!(busy.check().unwrap());
    busy.signal(&id, libc::SIGKILL).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 137);
    drop(idle);
    agent.assert_alive();
}

/// VmHWM (peak resident memory) of `pid`, in bytes.
fn peak_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).unwrap().trim().trim_end_matches("kB").trim().parse().unwrap();
    kib * 1024
}

#[test]
fn bytes_in_flight_are_bounded() {
    let agent = Agent::start();
    let client = agent.client();
    // A process that never reads its stdin: each WriteStdin holds its data until
    // the call's deadline.
    let id = client.start(&spec(&["sleep", "1000"])).unwrap();
    let limits = osb_agent::server::rpc::Limits::default();
    let before = peak_rss(agent.pid());

    const REQUESTS: usize = 32;
    let req = osb_agent::proto::agent::WriteStreamRequest {
        container_id: id.container_id.clone(),
        exec_id: id.exec_id.clone(),
        data: vec![0x5a; 4_000_000],
        ..Default::default()
    };
    let mut r = ttrpc::Request::new();
    r.service = "grpc.AgentService".into();
    r.method = "WriteStdin".into();
    r.timeout_nano = Duration::from_secs(2).as_nanos() as i64;
    r.payload = req.write_to_bytes().unwrap();
    let payload = std::sync::Arc::new(r.write_to_bytes().unwrap());
    assert!(payload.len() <= limits.max_frame);
    // Each on a connection of its own, all at once: 128 MB of requests.
    let senders: Vec<_> = (0..REQUESTS)
        .map(|_| {
            let mut s = UnixStream::connect(&agent.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
            let payload = payload.clone();
            std::thread::spawn(move || {
                let mut f = frame(payload.len() as u32, 1, 1, 0);
                f.extend_from_slice(&payload);
                s.write_all(&f).unwrap();
                let (stream, _, _, reply) = read_frame(&mut s);
                (stream, status_of(&reply).0)
            })
        })
        .collect();
    for s in senders {
        // Every request is served (waits for room rather than failing).
        assert_eq!(s.join().unwrap(), (1, Code::DEADLINE_EXCEEDED));
    }
    let grown = peak_rss(agent.pid()).saturating_sub(before);
    // A request is in memory about twice (its frame and the decoded message).
    let bound = 2 * limits.max_inflight_bytes as u64 + (16 << 20);
    assert!(grown <= bound, "the agent's peak memory grew by {} MiB for {REQUESTS} requests of 4 MB (bound {} MiB)", grown >> 20, bound >> 20);
    client.signal(&id, libc::SIGKILL).unwrap();
    assert_eq!(client.wait(&id).unwrap(), 137);
}

/// One CopyFile chunk of a regular file (mode 0644, owner unchanged) of `size` bytes.
fn file_chunk(target: &Path, size: i64, offset: usize, bytes: &[u8]) -> CopyFileRequest {
    CopyFileRequest {
        path: target.to_str().unwrap().to_string(),
        file_size: size,
        file_mode: 0o100644,
        uid: -1,
        gid: -1,
        offset: offset as i64,
        data: bytes.to_vec(),
        ..Default::default()
    }
}
