//! The guest side: the agent server (cargo feature `server`).
//!
//! `osb-init` starts it as `/proc/self/exe` with argv[0] `osb-agent` and calls
//! [`main`]. It listens on AF_VSOCK (any CID) and serves `grpc.AgentService`,
//! `grpc.Health` and our `grpc.StorageService` ([`storage`]) over ttrpc (see [`rpc`] for the transport and its limits),
//! to the host (CID 2) only unless `--allow-cid` says otherwise.
//!
//! Options:
//! - `--port N`: vsock port (default 1024);
//! - `--listen unix:///path` or `--listen vsock://CID:PORT` (CID -1: any): listen
//!   there instead (the host tests use a Unix socket);
//! - `--allow-cid CID|any`: the vsock peer served (default 2, the host; a Unix
//!   socket serves anyone who can open it);
//! - `--workload-fd N`: read init's workload events (JSON lines) from fd N;
//! - `--init-pid N`: the pid DestroySandbox sends SIGUSR2 to (default 1; 0: none);
//! - `--boot-stamps NAME=US,...`: init's boot stamps (`CLOCK_BOOTTIME` in
//!   microseconds at each of its start-up steps), reported with the agent's
//!   own `agent` (its first instruction) and `listen` in the metrics as
//!   `osb_boot_stamp_seconds{stamp="NAME"}`.

pub mod call;
pub mod copy;
pub mod events;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod guest;
pub mod netmap;
pub mod passwd;
pub mod process;
pub mod rpc;
pub mod service;
pub mod storage;
pub mod sys;

use std::ffi::OsString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::proto::{agent_ttrpc, health_ttrpc, storage_ttrpc};

/// The vsock port the agent listens on unless told otherwise.
pub const DEFAULT_PORT: u32 = 1024;
/// Processes (running or not yet collected) the agent keeps at once.
pub const MAX_PROCESSES: usize = 256;

/// Where to listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Vsock { cid: u32, port: u32 },
    Unix(PathBuf),
}

/// The parsed command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    pub listen: ListenAddr,
    pub peers: rpc::Peers,
    pub workload_fd: Option<i32>,
    pub init_pid: i32,
    pub boot_stamps: Vec<(String, u64)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            listen: ListenAddr::Vsock { cid: libc::VMADDR_CID_ANY, port: DEFAULT_PORT },
            peers: rpc::Peers::default(),
            workload_fd: None,
            init_pid: 1,
            boot_stamps: Vec::new(),
        }
    }
}

const USAGE: &str = "usage: osb-agent [--port N | --listen unix:///PATH | --listen vsock://CID:PORT] [--allow-cid CID|any] [--workload-fd N] [--init-pid N] [--boot-stamps NAME=US,...]";

fn parse_listen(s: &str) -> Result<ListenAddr, String> {
    if let Some(path) = s.strip_prefix("unix://") {
        if path.is_empty() {
            return Err(format!("--listen {s:?}: empty socket path"));
        }
        return Ok(ListenAddr::Unix(PathBuf::from(path)));
    }
    if let Some(rest) = s.strip_prefix("vsock://") {
        let (cid, port) = rest.split_once(':').ok_or_else(|| format!("--listen {s:?}: expected vsock://CID:PORT"))?;
        let cid = if cid == "-1" { libc::VMADDR_CID_ANY } else { cid.parse().map_err(|_| format!("--listen {s:?}: bad CID"))? };
        let port = port.parse().map_err(|_| format!("--listen {s:?}: bad port"))?;
        return Ok(ListenAddr::Vsock { cid, port });
    }
    Err(format!("--listen {s:?}: use unix:///PATH or vsock://CID:PORT"))
}

/// At most this many boot stamps are kept from the command line.
const MAX_STAMPS: usize = 16;

/// `init=712345,mounted=713002`: distinct names of `[a-z_]` (not the
/// agent's own `agent` and `listen`), microsecond values.
fn parse_stamps(s: &str) -> Result<Vec<(String, u64)>, String> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for kv in s.split(',').filter(|kv| !kv.is_empty()) {
        let bad = || format!("--boot-stamps: {kv:?} is not NAME=MICROSECONDS");
        let (name, us) = kv.split_once('=').ok_or_else(bad)?;
        if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
            return Err(bad());
        }
        if name == "agent" || name == "listen" || out.iter().any(|(n, _)| n == name) {
            return Err(format!("--boot-stamps: {name:?} is given twice or is the agent's own"));
        }
        out.push((name.to_string(), us.parse().map_err(|_| bad())?));
    }
    if out.len() > MAX_STAMPS {
        return Err(format!("--boot-stamps: {} stamps, at most {MAX_STAMPS}", out.len()));
    }
    Ok(out)
}

/// Parses the arguments after argv[0] (a leading `agent` word is skipped, for an
/// `osb-init agent ...` invocation).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut opts = Options::default();
    let mut it = args.iter().peekable();
    if it.peek().map(|a| a.as_str()) == Some("agent") {
        it.next();
    }
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (arg.as_str(), None),
        };
        let mut value = || inline.clone().or_else(|| it.next().cloned()).ok_or_else(|| format!("{flag} needs a value"));
        match flag {
            "--port" => {
                let port = value()?;
                let port = port.parse().map_err(|_| format!("--port {port:?} is not a port number"))?;
                opts.listen = ListenAddr::Vsock { cid: libc::VMADDR_CID_ANY, port };
            }
            "--listen" => opts.listen = parse_listen(&value()?)?,
            "--allow-cid" => opts.peers = rpc::Peers::parse(&value()?).map_err(|e| format!("--allow-cid {e}"))?,
            "--workload-fd" => {
                let fd = value()?;
                opts.workload_fd = Some(fd.parse().ok().filter(|n: &i32| *n >= 0).ok_or_else(|| format!("--workload-fd {fd:?} is not a descriptor number"))?);
            }
            "--init-pid" => {
                let pid = value()?;
                opts.init_pid = pid.parse().ok().filter(|n: &i32| *n >= 0).ok_or_else(|| format!("--init-pid {pid:?} is not a pid"))?;
            }
            // Diagnostics only: a bad value is dropped, never a reason not to serve.
            "--boot-stamps" => {
                opts.boot_stamps = parse_stamps(&value()?).unwrap_or_else(|e| {
                    eprintln!("osb-agent: warning: {e}; no boot stamps");
                    Vec::new()
                })
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(opts)
}

/// Runs the agent with `args` (argv including argv[0]); returns the exit code.
pub fn main<I, S>(args: I) -> i32
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let started = boottime_us();
    let args: Vec<String> = args.into_iter().skip(1).map(|a| a.into().to_string_lossy().into_owned()).collect();
    let mut opts = match parse_args(&args) {
        Ok(opts) => opts,
        Err(msg) => {
            eprintln!("osb-agent: {msg}");
            return 2;
        }
    };
    opts.boot_stamps.push(("agent".into(), started));
    match run(&opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("osb-agent: {e}");
            1
        }
    }
}

/// Takes over descriptor `fd` (inherited from init), close-on-exec from now on.
fn adopt_fd(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_GETFD only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; sets FD_CLOEXEC so exec'd processes do not inherit it.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open and nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Serves until the listener fails.
pub fn run(opts: &Options) -> std::io::Result<()> {
    sys::ignore_sigpipe();
    // Request frames over this are mmap'd: their memory goes back to the guest
    // as soon as a request is done (see rpc::Limits::max_inflight_bytes).
    sys::unmap_large_allocations(rpc::SMALL_FRAME * 8);
    let table = Arc::new(process::Table::new(MAX_PROCESSES));
    let storages = Arc::new(storage::Storages::default());
    if let Some(fd) = opts.workload_fd {
        match adopt_fd(fd) {
            Ok(fd) => events::spawn_reader(fd, table.workload(), storages.clone())?,
            Err(e) => eprintln!("osb-agent: --workload-fd {fd}: {e}; no workload events"),
        }
    }
    let agent = service::Agent {
        table,
        sysfs: guest::Sysfs::default(),
        on_destroy: if opts.init_pid > 0 { service::OnDestroy::Signal(opts.init_pid) } else { service::OnDestroy::Nothing },
        etc: PathBuf::from("/etc"),
        copies: copy::Copies::default(),
    };
    let dispatcher = rpc::Dispatcher::new([
        agent_ttrpc::create_agent_service(Arc::new(agent)),
        health_ttrpc::create_health(Arc::new(service::Health)),
        storage_ttrpc::create_storage_service(Arc::new(storage::Service(storages))),
    ]);
    let listener = match &opts.listen {
        ListenAddr::Unix(path) => {
            // A socket file left by an earlier run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            let l = std::os::unix::net::UnixListener::bind(path).map_err(|e| std::io::Error::new(e.kind(), format!("listen on {}: {e}", path.display())))?;
            set_ready(&opts.boot_stamps);
            eprintln!("osb-agent: listening on unix://{}", path.display());
            rpc::Listener::Unix(l)
        }
        ListenAddr::Vsock { cid, port } => {
            let fd = sys::vsock_listen(*cid, *port, 128).map_err(|e| std::io::Error::new(e.kind(), format!("listen on vsock port {port}: {e}")))?;
            let up = set_ready(&opts.boot_stamps);
            eprintln!("osb-agent: listening on vsock port {port} for {} (guest uptime {up:.2}s)", opts.peers);
            rpc::Listener::vsock(fd, opts.peers)
        }
    };
    rpc::serve(listener, dispatcher, rpc::Limits::default())
}

/// The boot stamps (init's, then `agent` and `listen`), set once listening.
static STAMPS: std::sync::OnceLock<Vec<(String, u64)>> = std::sync::OnceLock::new();

/// Records `listen` now beside the other stamps; returns the uptime in seconds.
fn set_ready(stamps: &[(String, u64)]) -> f64 {
    let now = boottime_us();
    let mut all = stamps.to_vec();
    all.push(("listen".into(), now));
    let _ = STAMPS.set(all);
    now as f64 / 1e6
}

/// `CLOCK_BOOTTIME` (what `/proc/uptime` reads, unrounded) in microseconds.
fn boottime_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// The agent's own gauges, appended to the resource report: its resident
/// memory and when it became ready.
pub(crate) fn agent_metrics() -> String {
    let rss_kib: u64 = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("VmRSS:").and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())))
        .unwrap_or(0);
    let stamps = STAMPS.get().map(Vec::as_slice).unwrap_or_default();
    let ready = stamps.iter().find(|(n, _)| n == "listen").map_or(0.0, |(_, us)| *us as f64 / 1e6);
    let mut out = format!(
        "# HELP osb_agent_rss_bytes Resident memory of the agent process.\n# TYPE osb_agent_rss_bytes gauge\nosb_agent_rss_bytes {}\n\
         # HELP osb_agent_ready_uptime_seconds Guest uptime when the agent started listening.\n# TYPE osb_agent_ready_uptime_seconds gauge\nosb_agent_ready_uptime_seconds {ready:.6}\n\
         # HELP osb_guest_uptime_seconds Guest uptime (CLOCK_BOOTTIME) when this report was made.\n# TYPE osb_guest_uptime_seconds gauge\nosb_guest_uptime_seconds {:.6}\n\
         # HELP osb_boot_stamp_seconds Guest uptime at each start-up step of init and the agent.\n# TYPE osb_boot_stamp_seconds gauge\n",
        rss_kib * 1024,
        boottime_us() as f64 / 1e6
    );
    for (name, us) in stamps {
        out.push_str(&format!("osb_boot_stamp_seconds{{stamp=\"{name}\"}} {:.6}\n", *us as f64 / 1e6));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn command_lines() {
        let d = Options::default();
        assert_eq!(parse_args(&[]).unwrap(), d);
        assert_eq!(
            parse_args(&args("--port 2000 --workload-fd 3")).unwrap(),
            Options { listen: ListenAddr::Vsock { cid: libc::VMADDR_CID_ANY, port: 2000 }, workload_fd: Some(3), ..d.clone() }
        );
        assert_eq!(
            parse_args(&args("agent --listen=unix:///tmp/a.sock --init-pid 0")).unwrap(),
            Options { listen: ListenAddr::Unix("/tmp/a.sock".into()), init_pid: 0, ..d.clone() }
        );
        assert_eq!(d.peers, rpc::Peers::Cid(libc::VMADDR_CID_HOST));
        assert_eq!(parse_args(&args("--allow-cid any")).unwrap().peers, rpc::Peers::Any);
        assert_eq!(parse_args(&args("--allow-cid=3")).unwrap().peers, rpc::Peers::Cid(3));
        assert_eq!(parse_args(&args("--listen vsock://-1:1024")).unwrap().listen, ListenAddr::Vsock { cid: libc::VMADDR_CID_ANY, port: 1024 });
        let many: Vec<String> = (0..=MAX_STAMPS).map(|i| format!("{}=1", "s".repeat(i + 1))).collect();
        assert!(parse_stamps(&many.join(",")).unwrap_err().contains("at most 16"));
        assert_eq!(parse_args(&args("--boot-stamps init=5,spawn=17")).unwrap().boot_stamps, [("init".to_string(), 5), ("spawn".to_string(), 17)]);
        // A bad value costs the stamps, not the agent.
        for bad in ["x", "Init=1", "a=-1", "a=1,b", "a=1,a=2", "listen=3", &many.join(",")] {
            assert!(parse_stamps(bad).is_err(), "{bad}");
            assert_eq!(parse_args(&["--boot-stamps".into(), bad.to_string()]).unwrap().boot_stamps, [], "{bad}");
        }
        for bad in ["--port", "--port x", "--bogus", "--listen tcp://x", "--workload-fd -1", "--allow-cid", "--allow-cid host", "--help"] {
            assert!(parse_args(&args(bad)).is_err(), "{bad}");
        }
    }
}
