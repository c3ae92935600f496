//! The host side: a typed client for the guest agent.
//!
//! It speaks ttrpc (the `ttrpc` crate's synchronous client) over one of three
//! transports:
//! - a hybrid-vsock Unix socket (Firecracker, Cloud Hypervisor, vhost-device-vsock):
//!   connect, write `CONNECT <port>\n`, read a line starting with `OK`, then the stream
//!   is the guest connection;
//! - AF_VSOCK (`cid`, `port`) when the host has vhost-vsock;
//! - a plain Unix socket (an agent run on the host with `--listen unix://...`).
//!
//! Every unary call carries a timeout (sent to the agent as ttrpc's `timeout_nano`
//! and enforced locally). Stream reads and waits are the exception: they block until
//! the process produces output or ends, because a client-side timeout on a read would
//! lose the data the agent read for it; [`ExecSpec::timeout`] bounds them instead by
//! killing the process.

use std::fmt;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::proto::agent::{
    CloseStdinRequest, CopyFileRequest, DestroySandboxRequest, ExecProcessRequest, GetMetricsRequest, GuestDetailsRequest, ListInterfacesRequest,
    ListRoutesRequest, OnlineCPUMemRequest, ReadStreamRequest, SetGuestDateTimeRequest, SignalProcessRequest, TtyWinResizeRequest, UpdateInterfaceRequest,
    UpdateRoutesRequest, WaitProcessRequest, WriteStreamRequest,
};
use crate::proto::agent_ttrpc::AgentServiceClient;
use crate::proto::health::{health_check_response::ServingStatus, CheckRequest};
use crate::proto::health_ttrpc::HealthClient;
use crate::proto::oci;
use crate::proto::storage::{ListStoragesRequest, MountStorageRequest, MountStorageResponse, Storage, StorageState, UnmountStorageRequest};
use crate::proto::storage_ttrpc::StorageServiceClient;
use crate::proto::types;
use crate::resources::Resources;

pub use ttrpc::Code;

/// The vsock port the agent listens on by default.
pub const DEFAULT_PORT: u32 = 1024;
/// The timeout of unary calls unless [`Client::set_timeout`] changes it.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes asked for per ReadStdout/ReadStderr call.
pub const READ_CHUNK: u32 = 16 * 1024; // the agent answers at most this much (see server::process::MAX_READ)
/// Bytes sent per CopyFile/WriteStdin call (well under ttrpc's 4 MiB frame limit).
pub const WRITE_CHUNK: usize = 1 << 20;

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path`: a Unix socket that is the agent connection itself.
    Unix(PathBuf),
    /// `hvsock:///path:PORT`: a hybrid-vsock Unix socket of a VMM; the client writes
    /// `CONNECT PORT\n` and expects `OK ...`.
    HybridVsock { path: PathBuf, port: u32 },
    /// `vsock://CID:PORT`: AF_VSOCK.
    Vsock { cid: u32, port: u32 },
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Endpoint, String> {
        let port_of = |p: &str| p.parse::<u32>().map_err(|_| format!("bad port {p:?} in {s:?}"));
        if let Some(path) = s.strip_prefix("unix://") {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("hvsock://") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(|| format!("{s:?} lacks the port: hvsock:///path/to/socket:PORT"))?;
            return Ok(Endpoint::HybridVsock { path: PathBuf::from(path), port: port_of(port)? });
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| format!("{s:?} lacks the port: vsock://CID:PORT"))?;
            let cid = cid.parse::<u32>().map_err(|_| format!("bad CID {cid:?} in {s:?}"))?;
            return Ok(Endpoint::Vsock { cid, port: port_of(port)? });
        }
        Err(format!("unknown agent address {s:?}: use unix:///PATH, hvsock:///PATH:PORT or vsock://CID:PORT"))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix://{}", path.display()),
            Endpoint::HybridVsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// What went wrong talking to the agent.
#[derive(Debug)]
pub enum Error {
    /// Could not reach the agent's socket.
    Connect { endpoint: String, source: std::io::Error },
    /// The hybrid-vsock handshake failed (the VMM did not answer `OK`).
    Handshake { endpoint: String, reply: String },
    /// The agent answered a ttrpc error status.
    Status { code: Code, message: String },
    /// No answer within the call's timeout.
    Timeout(String),
    /// The ttrpc transport failed (connection lost, undecodable reply).
    Transport(String),
    /// A local file or stream failed.
    Io(std::io::Error),
    /// The agent's answer did not make sense.
    Protocol(String),
}

impl Error {
    /// The ttrpc status code when the agent answered one; DEADLINE_EXCEEDED also
    /// when the answer did not come in time.
    pub fn code(&self) -> Option<Code> {
        match self {
            Error::Status { code, .. } => Some(*code),
            Error::Timeout(_) => Some(Code::DEADLINE_EXCEEDED),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Connect { endpoint, source } => {
                write!(f, "connect to the agent at {endpoint}: {source}")
            }
            Error::Handshake { endpoint, reply } => {
                write!(f, "hybrid vsock handshake with {endpoint} failed (reply {reply:?}): is the guest up and the agent listening on that port?")
            }
            Error::Status { code, message } => write!(f, "agent answered {code:?}: {message}"),
            Error::Timeout(msg) => write!(f, "no answer from the agent in time: {msg}"),
            Error::Transport(msg) => write!(f, "ttrpc transport: {msg}"),
            Error::Io(e) => write!(f, "{e}"),
            Error::Protocol(msg) => write!(f, "unexpected answer from the agent: {msg}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Connect { source, .. } => Some(source),
            Error::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<ttrpc::Error> for Error {
    fn from(e: ttrpc::Error) -> Error {
        match e {
            ttrpc::Error::RpcStatus(status) => Error::Status { code: status.code(), message: status.message },
            // The sync client reports its local deadline this way.
            ttrpc::Error::Others(msg) if msg.contains("timeout") => Error::Timeout(msg),
            other => Error::Transport(other.to_string()),
        }
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Opens a stream to the agent (before ttrpc starts on it).
pub fn connect_stream(endpoint: &Endpoint, timeout: Duration) -> Result<OwnedFd> {
    let connect_err = |source| Error::Connect { endpoint: endpoint.to_string(), source };
    match endpoint {
        Endpoint::Unix(path) => Ok(UnixStream::connect(path).map_err(connect_err)?.into()),
        Endpoint::HybridVsock { path, port } => {
            let mut stream = UnixStream::connect(path).map_err(connect_err)?;
            stream.set_read_timeout(Some(timeout)).map_err(connect_err)?;
            stream.set_write_timeout(Some(timeout)).map_err(connect_err)?;
            stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(connect_err)?;
            // Byte by byte: whatever follows the newline belongs to ttrpc.
            let mut line = Vec::new();
            let mut byte = [0u8; 1];
            while line.len() < 256 {
                match stream.read(&mut byte) {
                    Ok(0) => break,
                    Ok(_) if byte[0] == b'\n' => break,
                    Ok(_) => line.push(byte[0]),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(connect_err(e)),
                }
            }
            let reply = String::from_utf8_lossy(&line).into_owned();
            if !reply.starts_with("OK") {
                return Err(Error::Handshake { endpoint: endpoint.to_string(), reply });
            }
            stream.set_read_timeout(None).map_err(connect_err)?;
            stream.set_write_timeout(None).map_err(connect_err)?;
            Ok(stream.into())
        }
        Endpoint::Vsock { cid, port } => vsock_connect(*cid, *port).map_err(connect_err),
    }
}

fn vsock_connect(cid: u32, port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    loop {
        // SAFETY: addr is a valid sockaddr_vm and the length is its size.
        let rc = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_vm as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return Ok(fd);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The user a process runs as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Resolved in the guest's /etc/passwd when `uid` and `gid` are both 0.
    pub username: String,
}

/// A process to start in the guest.
#[derive(Clone, Debug, Default)]
pub struct ExecSpec {
    /// The argv; `args[0]` is looked up in the guest's PATH unless it holds a slash.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries (the agent adds PATH and HOME when missing).
    pub env: Vec<String>,
    /// Working directory in the guest (default `/`).
    pub cwd: String,
    pub user: User,
    /// Run on a pseudo-terminal: stdout carries the terminal output, stderr is empty.
    pub tty: bool,
    /// Initial terminal size (rows, columns).
    pub tty_size: Option<(u16, u16)>,
    /// Container id (default `osb`).
    pub container_id: String,
    /// Exec id (default: generated, unique within this client).
    pub exec_id: String,
    /// Kill the process (SIGKILL) when it runs longer than this.
    pub timeout: Option<Duration>,
}

impl ExecSpec {
    /// A spec running `args` as root in `/`.
    pub fn new<S: Into<String>>(args: impl IntoIterator<Item = S>) -> ExecSpec {
        ExecSpec { args: args.into_iter().map(Into::into).collect(), ..ExecSpec::default() }
    }
}

/// A process started in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub container_id: String,
    pub exec_id: String,
}

/// What a finished process left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; 128 + signal when killed by a signal.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Kata's `Health.Version` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub grpc_version: String,
    pub agent_version: String,
}

/// `GetGuestDetails` in plain types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestDetails {
    pub mem_block_size_bytes: u64,
    pub support_mem_hotplug_probe: bool,
    pub agent_version: String,
    pub init_daemon: bool,
    pub device_handlers: Vec<String>,
    pub storage_handlers: Vec<String>,
    pub supports_seccomp: bool,
}

/// A connection to the agent.
#[derive(Clone)]
pub struct Client {
    agent: AgentServiceClient,
    health: HealthClient,
    storage: StorageServiceClient,
    raw: ttrpc::Client,
    timeout: Duration,
}

/// Numbers generated exec ids (unique within this host process).
static NEXT_EXEC: AtomicU64 = AtomicU64::new(1);

impl Client {
    /// Connects to the agent at `endpoint`; `timeout` applies to the connection
    /// handshake and to every unary call.
    pub fn connect(endpoint: &Endpoint, timeout: Duration) -> Result<Client> {
        let fd = connect_stream(endpoint, timeout)?;
        Client::from_fd(fd, timeout)
    }

    /// Retries [`Client::connect`] plus a health check until they succeed or
    /// `total` has passed (for a guest that is still booting).
    pub fn connect_retry(endpoint: &Endpoint, timeout: Duration, total: Duration) -> Result<Client> {
        let start = Instant::now();
        loop {
            let attempt = Client::connect(endpoint, timeout).and_then(|client| {
                client.check()?;
                Ok(client)
            });
            match attempt {
                Ok(client) => return Ok(client),
                Err(e) if start.elapsed() >= total => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Speaks ttrpc on an already connected stream.
    pub fn from_fd(fd: OwnedFd, timeout: Duration) -> Result<Client> {
        let raw_fd = fd.into_raw_fd();
        // ttrpc's client owns the descriptor from here on (it closes it on drop).
        let raw = ttrpc::Client::new(raw_fd).map_err(|e| {
            // SAFETY: on failure the descriptor was not taken over; close it.
            drop(unsafe { OwnedFd::from_raw_fd(raw_fd) });
            Error::from(e)
        })?;
        Ok(Client {
            agent: AgentServiceClient::new(raw.clone()),
            health: HealthClient::new(raw.clone()),
            storage: StorageServiceClient::new(raw.clone()),
            raw,
            timeout,
        })
    }

    /// Changes the timeout of unary calls.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The underlying ttrpc client (to call methods this type has no helper for).
    pub fn raw(&self) -> &ttrpc::Client {
        &self.raw
    }

    /// The generated client of `grpc.AgentService`.
    pub fn agent_service(&self) -> &AgentServiceClient {
        &self.agent
    }

    fn ctx(&self) -> ttrpc::context::Context {
        ttrpc::context::with_duration(self.timeout)
    }

    fn ctx_unbounded() -> ttrpc::context::Context {
        ttrpc::context::Context::default()
    }

    /// `grpc.Health/Check`: true when the agent is serving.
    pub fn check(&self) -> Result<bool> {
        let res = self.health.check(self.ctx(), &CheckRequest::new())?;
        Ok(res.status.enum_value() == Ok(ServingStatus::SERVING))
    }

    /// `grpc.Health/Version`.
    pub fn version(&self) -> Result<Version> {
        let res = self.health.version(self.ctx(), &CheckRequest::new())?;
        Ok(Version { grpc_version: res.grpc_version, agent_version: res.agent_version })
    }

    /// `GetGuestDetails` (asks for the memory block size and hotplug probe support).
    pub fn guest_details(&self) -> Result<GuestDetails> {
        let req = GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() };
        let res = self.agent.get_guest_details(self.ctx(), &req)?;
        let details = res.agent_details.clone().unwrap_or_default();
        Ok(GuestDetails {
            mem_block_size_bytes: res.mem_block_size_bytes,
            support_mem_hotplug_probe: res.support_mem_hotplug_probe,
            agent_version: details.version,
            init_daemon: details.init_daemon,
            device_handlers: details.device_handlers,
            storage_handlers: details.storage_handlers,
            supports_seccomp: details.supports_seccomp,
        })
    }

    /// `GetMetrics`: the guest resource report as Prometheus text.
    pub fn metrics(&self) -> Result<String> {
        Ok(self.agent.get_metrics(self.ctx(), &GetMetricsRequest::new())?.metrics)
    }

    /// The guest resource report, parsed.
    pub fn resources(&self) -> Result<Resources> {
        Resources::from_prometheus(&self.metrics()?).map_err(Error::Protocol)
    }

    /// `ExecProcess`: starts `spec` and returns its ids (stdin stays open).
    pub fn start(&self, spec: &ExecSpec) -> Result<ProcessId> {
        let id = ProcessId {
            container_id: if spec.container_id.is_empty() { "osb".to_string() } else { spec.container_id.clone() },
            exec_id: if spec.exec_id.is_empty() {
                format!("exec-{}-{}", std::process::id(), NEXT_EXEC.fetch_add(1, Ordering::Relaxed))
            } else {
                spec.exec_id.clone()
            },
        };
        let mut process = oci::Process {
            Terminal: spec.tty,
            Args: spec.args.clone(),
            Env: spec.env.clone(),
            Cwd: if spec.cwd.is_empty() { "/".to_string() } else { spec.cwd.clone() },
            ..Default::default()
        };
        process.User = protobuf::MessageField::some(oci::User {
            UID: spec.user.uid,
            GID: spec.user.gid,
            AdditionalGids: spec.user.additional_gids.clone(),
            Username: spec.user.username.clone(),
            ..Default::default()
        });
        if let Some((rows, cols)) = spec.tty_size {
            process.ConsoleSize = protobuf::MessageField::some(oci::Box { Height: u32::from(rows), Width: u32::from(cols), ..Default::default() });
        }
        let req = ExecProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            process: protobuf::MessageField::some(process),
            ..Default::default()
        };
        self.agent.exec_process(self.ctx(), &req)?;
        Ok(id)
    }

    /// Runs `spec` to completion with `stdin` as its input (then closed) and
    /// collects its exit status and output.
    pub fn exec(&self, spec: &ExecSpec, stdin: &[u8]) -> Result<ExecOutput> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let code = self.exec_streaming(spec, std::io::Cursor::new(stdin.to_vec()), &mut stdout, &mut stderr)?;
        Ok(ExecOutput { code, stdout, stderr })
    }

    /// Runs `spec`, copying `stdin` to the process (closing its stdin at EOF) and its
    /// output to `stdout` and `stderr` as it arrives; returns the exit status.
    ///
    /// `stdin` is copied on a thread of its own that is not waited for: a source that
    /// blocks (a terminal) does not hold up the return once the process has ended.
    pub fn exec_streaming<R, W, E>(&self, spec: &ExecSpec, stdin: R, stdout: W, stderr: E) -> Result<i32>
    where
        R: Read + Send + 'static,
        W: Write + Send,
        E: Write + Send,
    {
        let id = self.start(spec)?;
        let watchdog = spec.timeout.map(|limit| Watchdog::start(self.clone(), id.clone(), limit));
        {
            let client = self.clone();
            let id = id.clone();
            // Errors end the copy: the process may exit without reading its input.
            std::thread::spawn(move || client.copy_input(&id, stdin));
        }
        let result = std::thread::scope(|scope| {
            let err = scope.spawn(|| {
                if spec.tty {
                    Ok(()) // a terminal has one stream: stdout
                } else {
                    self.copy_output(&id, false, stderr)
                }
            });
            let out = self.copy_output(&id, true, stdout);
            let err = err.join().unwrap_or_else(|_| Err(Error::Protocol("stderr reader panicked".into())));
            let code = self.wait(&id);
            out?;
            err?;
            code
        });
        if let Some(w) = watchdog {
            w.stop();
        }
        result
    }

    fn copy_output<W: Write>(&self, id: &ProcessId, stdout: bool, mut sink: W) -> Result<()> {
        loop {
            match self.read_stream(id, stdout, READ_CHUNK) {
                Ok(Some(chunk)) => {
                    sink.write_all(&chunk)?;
                    sink.flush()?;
                }
                Ok(None) => return Ok(()),
                // The process entry is gone: nothing more to read.
                Err(Error::Status { code: Code::NOT_FOUND, .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn copy_input<R: Read>(&self, id: &ProcessId, mut source: R) -> Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            self.write_stdin(id, &buf[..n])?;
        }
        self.close_stdin(id)
    }

    /// One `ReadStdout` (`stdout` true) or `ReadStderr` call of at most `len` bytes;
    /// `None` at end of stream. Blocks until data or EOF.
    pub fn read_stream(&self, id: &ProcessId, stdout: bool, len: u32) -> Result<Option<Vec<u8>>> {
        let req = ReadStreamRequest { container_id: id.container_id.clone(), exec_id: id.exec_id.clone(), len, ..Default::default() };
        let res = if stdout { self.agent.read_stdout(Self::ctx_unbounded(), &req) } else { self.agent.read_stderr(Self::ctx_unbounded(), &req) };
        match res {
            Ok(res) if res.data.is_empty() => Ok(None),
            Ok(res) => Ok(Some(res.data)),
            Err(e) => {
                let e = Error::from(e);
                if is_eof(&e) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `WriteStdin` of all of `data` (in chunks); returns the bytes written.
    pub fn write_stdin(&self, id: &ProcessId, data: &[u8]) -> Result<usize> {
        let mut written = 0;
        for chunk in data.chunks(WRITE_CHUNK) {
            let req = WriteStreamRequest { container_id: id.container_id.clone(), exec_id: id.exec_id.clone(), data: chunk.to_vec(), ..Default::default() };
            let res = self.agent.write_stdin(Self::ctx_unbounded(), &req)?;
            written += res.len as usize;
            if (res.len as usize) < chunk.len() {
                break;
            }
        }
        Ok(written)
    }

    /// `CloseStdin`.
    pub fn close_stdin(&self, id: &ProcessId) -> Result<()> {
        let req = CloseStdinRequest { container_id: id.container_id.clone(), exec_id: id.exec_id.clone(), ..Default::default() };
        self.agent.close_stdin(self.ctx(), &req)?;
        Ok(())
    }

    /// `WaitProcess`: blocks until the process ends; its exit status.
    pub fn wait(&self, id: &ProcessId) -> Result<i32> {
        self.wait_with(id, Self::ctx_unbounded())
    }

    /// `WaitProcess` bounded by `timeout` (the agent answers DEADLINE_EXCEEDED).
    pub fn wait_timeout(&self, id: &ProcessId, timeout: Duration) -> Result<i32> {
        self.wait_with(id, ttrpc::context::with_duration(timeout))
    }

    fn wait_with(&self, id: &ProcessId, ctx: ttrpc::context::Context) -> Result<i32> {
        let req = WaitProcessRequest { container_id: id.container_id.clone(), exec_id: id.exec_id.clone(), ..Default::default() };
        Ok(self.agent.wait_process(ctx, &req)?.status)
    }

    /// `SignalProcess`; an empty exec id signals every process of the container.
    pub fn signal(&self, id: &ProcessId, signal: i32) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            signal: u32::try_from(signal).map_err(|_| Error::Protocol(format!("bad signal {signal}")))?,
            ..Default::default()
        };
        self.agent.signal_process(self.ctx(), &req)?;
        Ok(())
    }

    /// `TtyWinResize`.
    pub fn resize_tty(&self, id: &ProcessId, rows: u16, columns: u16) -> Result<()> {
        let req = TtyWinResizeRequest {
            container_id: id.container_id.clone(),
            exec_id: id.exec_id.clone(),
            row: u32::from(rows),
            column: u32::from(columns),
            ..Default::default()
        };
        self.agent.tty_win_resize(self.ctx(), &req)?;
        Ok(())
    }

    /// Copies the local file `local` to `guest_path` (absolute) with the local file's
    /// permission bits, owned by `uid`:`gid`; parents are created with mode 0755.
    pub fn copy_file(&self, local: &Path, guest_path: &str, uid: u32, gid: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let mut file = std::fs::File::open(local)?;
        let meta = file.metadata()?;
        let mode = meta.permissions().mode() & 0o7777;
        self.copy_from(&mut file, meta.len(), guest_path, mode, uid, gid)
    }

    /// Copies `data` to `guest_path` with permission bits `mode`.
    pub fn copy_bytes(&self, data: &[u8], guest_path: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
        self.copy_from(&mut &data[..], data.len() as u64, guest_path, mode, uid, gid)
    }

    /// `CopyFile` of `size` bytes from `source`, in chunks; the agent writes a
    /// temporary file and renames it into place after the last chunk.
    pub fn copy_from<R: Read>(&self, source: &mut R, size: u64, guest_path: &str, mode: u32, uid: u32, gid: u32) -> Result<()> {
        let file_size = i64::try_from(size).map_err(|_| Error::Protocol("file too large".into()))?;
        let mut offset: u64 = 0;
        let mut buf = vec![0u8; WRITE_CHUNK.min(size as usize).max(1)];
        loop {
            let want = (size - offset).min(buf.len() as u64) as usize;
            let mut got = 0;
            while got < want {
                match source.read(&mut buf[got..want]) {
                    Ok(0) => {
                        return Err(Error::Io(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("source ended after {} of {size} bytes", offset + got as u64),
                        )))
                    }
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let req = CopyFileRequest {
                path: guest_path.to_string(),
                file_size,
                file_mode: mode,
                dir_mode: 0o755,
                uid: uid as i32,
                gid: gid as i32,
                offset: offset as i64,
                data: buf[..want].to_vec(),
                ..Default::default()
            };
            self.agent.copy_file(self.ctx(), &req)?;
            offset += want as u64;
            if offset >= size {
                return Ok(());
            }
        }
    }

    /// `SetGuestDateTime` to `time`.
    pub fn set_time(&self, time: SystemTime) -> Result<()> {
        let since = time.duration_since(UNIX_EPOCH).map_err(|_| Error::Protocol("time before 1970".into()))?;
        let req = SetGuestDateTimeRequest { Sec: since.as_secs() as i64, Usec: i64::from(since.subsec_micros()), ..Default::default() };
        self.agent.set_guest_date_time(self.ctx(), &req)?;
        Ok(())
    }

    /// `OnlineCPUMem`: online CPUs until `nb_cpus` are online (0: leave CPUs), and
    /// every offline memory block unless `cpu_only`.
    pub fn online_cpu_mem(&self, nb_cpus: u32, cpu_only: bool, wait: bool) -> Result<()> {
        let req = OnlineCPUMemRequest { wait, nb_cpus, cpu_only, ..Default::default() };
        self.agent.online_cpu_mem(self.ctx(), &req)?;
        Ok(())
    }

    /// `DestroySandbox`: kills every exec'd process and powers the guest off.
    pub fn destroy_sandbox(&self) -> Result<()> {
        self.agent.destroy_sandbox(self.ctx(), &DestroySandboxRequest::new())?;
        Ok(())
    }

    /// `ListInterfaces`.
    pub fn list_interfaces(&self) -> Result<Vec<types::Interface>> {
        Ok(self.agent.list_interfaces(self.ctx(), &ListInterfacesRequest::new())?.Interfaces)
    }

    /// `UpdateInterface`: the interface as the agent left it.
    pub fn update_interface(&self, interface: types::Interface) -> Result<types::Interface> {
        let req = UpdateInterfaceRequest { interface: protobuf::MessageField::some(interface), ..Default::default() };
        Ok(self.agent.update_interface(self.ctx(), &req)?)
    }

    /// `ListRoutes`.
    pub fn list_routes(&self) -> Result<Vec<types::Route>> {
        Ok(self.agent.list_routes(self.ctx(), &ListRoutesRequest::new())?.Routes)
    }

    /// `UpdateRoutes`: the routing table as the agent left it.
    pub fn update_routes(&self, routes: Vec<types::Route>) -> Result<Vec<types::Route>> {
        let req = UpdateRoutesRequest {
            routes: protobuf::MessageField::some(crate::proto::agent::Routes { Routes: routes, ..Default::default() }),
            ..Default::default()
        };
        Ok(self.agent.update_routes(self.ctx(), &req)?.Routes)
    }

    /// `StorageService/MountStorage`: the device and type mounted. The call's timeout
    /// is stretched by the device wait the options ask for (`x-osb.wait=`).
    pub fn mount_storage(&self, storage: Storage) -> Result<MountStorageResponse> {
        let wait = storage
            .options
            .iter()
            .flat_map(|o| o.split(','))
            .find_map(|o| o.strip_prefix("x-osb.wait=").and_then(|v| v.parse::<f64>().ok()))
            .filter(|w| w.is_finite() && *w >= 0.0)
            .map_or(crate::volume::DEFAULT_DEVICE_WAIT, |w| Duration::from_secs_f64(w.min(3600.0)));
        let req = MountStorageRequest { storage: protobuf::MessageField::some(storage), ..Default::default() };
        Ok(self.storage.mount_storage(ttrpc::context::with_duration(self.timeout + wait), &req)?)
    }

    /// `StorageService/UnmountStorage`.
    pub fn unmount_storage(&self, mount_point: &str, detach: bool) -> Result<()> {
        let req = UnmountStorageRequest { mount_point: mount_point.to_owned(), detach, ..Default::default() };
        self.storage.unmount_storage(self.ctx(), &req)?;
        Ok(())
    }

    /// `StorageService/ListStorages`.
    pub fn list_storages(&self) -> Result<Vec<StorageState>> {
        Ok(self.storage.list_storages(self.ctx(), &ListStoragesRequest::new())?.storages)
    }
}

/// Kata's agent (and ours) answers a read at end of stream with an INTERNAL error
/// status whose message says "eof" ("read meet eof", "eof").
fn is_eof(e: &Error) -> bool {
    match e {
        Error::Status { code, message } => *code == Code::INTERNAL && message.to_ascii_lowercase().contains("eof"),
        _ => false,
    }
}

/// Kills a process that outlives its time limit.
struct Watchdog {
    stop: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl Watchdog {
    fn start(client: Client, id: ProcessId, limit: Duration) -> Watchdog {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(limit) {
                let _ = client.signal(&id, libc::SIGKILL);
            }
        });
        Watchdog { stop, thread }
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print() {
        for (text, endpoint) in [
            ("unix:///run/a.sock", Endpoint::Unix("/run/a.sock".into())),
            ("hvsock:///tmp/hv.sock:1024", Endpoint::HybridVsock { path: "/tmp/hv.sock".into(), port: 1024 }),
            ("vsock://3:1024", Endpoint::Vsock { cid: 3, port: 1024 }),
        ] {
            assert_eq!(text.parse::<Endpoint>().unwrap(), endpoint);
            assert_eq!(endpoint.to_string(), text);
        }
        for bad in ["tcp://1.2.3.4:5", "vsock://3", "vsock://x:1", "hvsock:///a"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn eof_statuses() {
        let status = |code, message: &str| Error::Status { code, message: message.into() };
        assert!(is_eof(&status(Code::INTERNAL, "read meet eof")));
        assert!(is_eof(&status(Code::INTERNAL, "\"eof\"")));
        assert!(!is_eof(&status(Code::NOT_FOUND, "no such process")));
        assert!(!is_eof(&status(Code::INTERNAL, "broken")));
        assert!(!is_eof(&Error::Transport("socket".into())));
    }
}
