//! Processes started by ExecProcess, and the workload init reports about.
//!
//! Each process runs in the guest root in a session of its own, with pipes for
//! stdin/stdout/stderr or one pseudo-terminal. Output is never buffered by the
//! agent: ReadStdout reads the pipe itself, so a process whose output nobody reads
//! blocks on a full pipe instead of growing the agent's memory.
//!
//! Every child gets a reaper thread that waits for exactly its pid (waitid with
//! WNOWAIT, then waitpid under the process lock), so the agent never reaps a pid
//! someone else waits for, and a signal is never sent to a pid that was reaped and
//! reused.
//!
//! ExecProcess takes its id under the table lock (as "starting") and spawns
//! without it: the fork and exec may take long, and every call needs the table.
//!
//! An entry leaves the table once it has exited, been waited for and had its output
//! read to the end; an exited entry nobody waits for, or whose output nobody reads
//! after the wait, is dropped later (see [`Table::collect_garbage`]).

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ttrpc::Code;

use super::call::{io_status, status, Call};
use super::sys;

/// The container id under which the workload (init's child) is visible.
pub const WORKLOAD_CONTAINER: &str = "workload";
/// Largest read answered by one ReadStdout/ReadStderr. Small on purpose:
/// rust-vmm's vhost-device-vsock (0.3) stalls a guest-to-host stream after
/// a response near 64 KiB (rust-vmm/vhost-device#494); 16 KiB answers
/// moved 30 MB without a stall in our tests, at ~3.6 MB/s under TCG.
pub const MAX_READ: usize = 16 * 1024;
/// Read size when the request asks for 0 bytes.
pub const DEFAULT_READ: usize = MAX_READ;
/// An exited process nobody waits for is dropped after this long.
const UNWAITED_TTL: Duration = Duration::from_secs(600);
/// A waited-for process whose output nobody reads to the end is dropped after this long.
const UNDRAINED_TTL: Duration = Duration::from_secs(60);
/// The status recorded when a child was reaped by someone else.
const LOST_STATUS: i32 = 255;

type Key = (String, String);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What ExecProcess asked for, checked and resolved.
#[derive(Clone, Debug)]
pub struct SpawnSpec {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub tty: bool,
    pub tty_size: Option<(u16, u16)>,
}

/// One output stream of a process: the read end of a pipe or the pty master.
struct Stream {
    fd: OwnedFd,
    eof: AtomicBool,
}

#[derive(Default)]
struct State {
    exit: Option<i32>,
    exited_at: Option<Instant>,
    waited_at: Option<Instant>,
}

/// A process started by ExecProcess.
pub struct Proc {
    key: Key,
    pid: i32,
    tty: bool,
    stdin: Mutex<Option<OwnedFd>>,
    stdout: Stream,
    stderr: Option<Stream>,
    state: Mutex<State>,
    exited: Condvar,
}

impl Proc {
    fn drained(&self) -> bool {
        self.stdout.eof.load(Ordering::SeqCst) && self.stderr.as_ref().is_none_or(|s| s.eof.load(Ordering::SeqCst))
    }
}

#[derive(Default)]
struct WorkloadState {
    known: bool,
    pid: Option<i32>,
    exit: Option<i32>,
}

/// The workload as reported by init on the workload pipe.
#[derive(Default)]
pub struct Workload {
    state: Mutex<WorkloadState>,
    changed: Condvar,
}

impl Workload {
    pub fn started(&self, pid: i32) {
        let mut st = lock(&self.state);
        *st = WorkloadState { known: true, pid: Some(pid), exit: None };
        self.changed.notify_all();
    }

    pub fn exited(&self, pid: i32, code: i32) {
        let mut st = lock(&self.state);
        if st.pid.is_none() || st.pid == Some(pid) {
            *st = WorkloadState { known: true, pid: Some(pid), exit: Some(code) };
            self.changed.notify_all();
        }
    }

    fn known(&self) -> bool {
        lock(&self.state).known
    }
}

/// A process a request names.
pub enum Target {
    Exec(Arc<Proc>),
    Workload,
}

/// All processes the agent knows.
impl Proc {
    /// Blocks until the process has exited (or the call is cancelled) and
    /// returns its state, locked.
    fn wait_exited(&self, call: &Call<'_>) -> ttrpc::Result<MutexGuard<'_, State>> {
        let mut st = lock(&self.state);
        while st.exit.is_none() {
            call.check()?;
            st = self.exited.wait_timeout(st, call.tick()).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(st)
    }
}

/// The table proper, behind one lock.
#[derive(Default)]
struct Procs {
    map: HashMap<Key, Arc<Proc>>,
    /// Ids whose ExecProcess is spawning: taken, but not in `map` yet (the spawn
    /// runs without the lock).
    starting: HashSet<Key>,
}

/// An id in [`Procs::starting`]; given back on drop, whatever the spawn did.
struct Reservation<'a> {
    procs: &'a Mutex<Procs>,
    key: Key,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        lock(self.procs).starting.remove(&self.key);
    }
}

pub struct Table {
    procs: Mutex<Procs>,
    workload: Arc<Workload>,
    max_processes: usize,
}

fn eof_status() -> ttrpc::Error {
    // What Kata's agent answers at end of stream.
    status(Code::INTERNAL, "read meet eof")
}

fn workload_stdio() -> ttrpc::Error {
    status(Code::FAILED_PRECONDITION, "the workload's stdio goes to the console; exec a process to talk to")
}

fn is_workload(container_id: &str, exec_id: &str) -> bool {
    container_id == WORKLOAD_CONTAINER && (exec_id.is_empty() || exec_id == WORKLOAD_CONTAINER)
}

impl Table {
    pub fn new(max_processes: usize) -> Table {
        Table { procs: Mutex::new(Procs::default()), workload: Arc::new(Workload::default()), max_processes }
    }

    pub fn workload(&self) -> Arc<Workload> {
        self.workload.clone()
    }

    /// The process `container_id`/`exec_id` names, or NOT_FOUND.
    pub fn get(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<Target> {
        if is_workload(container_id, exec_id) && self.workload.known() {
            return Ok(Target::Workload);
        }
        let key = (container_id.to_string(), exec_id.to_string());
        match lock(&self.procs).map.get(&key) {
            Some(p) => Ok(Target::Exec(p.clone())),
            None => Err(status(Code::NOT_FOUND, format!("no process with container id {container_id:?} and exec id {exec_id:?}"))),
        }
    }

    /// Every exec'd process of `container_id`.
    fn of_container(&self, container_id: &str) -> Vec<Arc<Proc>> {
        lock(&self.procs).map.values().filter(|p| p.key.0 == container_id).cloned().collect()
    }

    /// Drops entries nobody will ask about any more.
    fn collect_garbage(procs: &mut HashMap<Key, Arc<Proc>>) {
        let now = Instant::now();
        procs.retain(|_, p| {
            let st = lock(&p.state);
            match (st.exited_at, st.waited_at) {
                (Some(_), Some(waited)) => !p.drained() && now.duration_since(waited) < UNDRAINED_TTL,
                (Some(exited), None) => now.duration_since(exited) < UNWAITED_TTL,
                _ => true,
            }
        });
    }

    /// Removes `p` when it has exited, been waited for and drained.
    fn maybe_remove(&self, p: &Arc<Proc>) {
        let done = lock(&p.state).waited_at.is_some() && p.drained();
        if done {
            let procs = &mut lock(&self.procs).map;
            if procs.get(&p.key).is_some_and(|q| Arc::ptr_eq(q, p)) {
                procs.remove(&p.key);
            }
        }
    }

    /// ExecProcess.
    pub fn exec(&self, container_id: &str, exec_id: &str, spec: SpawnSpec) -> ttrpc::Result<()> {
        if container_id.is_empty() || exec_id.is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "container_id and exec_id must not be empty"));
        }
        if container_id.len() > 256 || exec_id.len() > 256 {
            return Err(status(Code::INVALID_ARGUMENT, "container_id and exec_id are limited to 256 bytes"));
        }
        if spec.args.is_empty() || spec.args[0].is_empty() {
            return Err(status(Code::INVALID_ARGUMENT, "process.Args is empty"));
        }
        let key = (container_id.to_string(), exec_id.to_string());
        let reservation = self.reserve(key.clone())?;
        // The spawn runs without the table lock: a fork and an exec can take long
        // (a big environment, a slow filesystem, an exec held by a security module),
        // and every other call needs the table.
        let proc = Arc::new(spawn(key.clone(), &spec)?);
        start_reaper(proc.clone())?;
        lock(&self.procs).map.insert(key, proc);
        drop(reservation);
        Ok(())
    }

    /// Checks that `key` is free and room is left, and takes it for a spawn.
    fn reserve(&self, key: Key) -> ttrpc::Result<Reservation<'_>> {
        let (container_id, exec_id) = (&key.0, &key.1);
        let mut guard = lock(&self.procs);
        let table = &mut *guard;
        if table.map.contains_key(&key) || table.starting.contains(&key) || (is_workload(container_id, exec_id) && self.workload.known()) {
            return Err(status(Code::ALREADY_EXISTS, format!("a process with container id {container_id:?} and exec id {exec_id:?} exists")));
        }
        let procs = &mut table.map;
        Self::collect_garbage(procs);
        if procs.len() + table.starting.len() >= self.max_processes {
            // Make room by forgetting the oldest exited process, if any.
            let oldest = procs.iter().filter_map(|(k, p)| lock(&p.state).exited_at.map(|t| (t, k.clone()))).min();
            match oldest {
                Some((_, k)) => {
                    procs.remove(&k);
                }
                None => return Err(status(Code::RESOURCE_EXHAUSTED, format!("{} processes are running; wait for some first", procs.len()))),
            }
        }
        table.starting.insert(key.clone());
        Ok(Reservation { procs: &self.procs, key })
    }

    /// SignalProcess; an empty exec id signals every process of the container.
    pub fn signal(&self, container_id: &str, exec_id: &str, signal: u32) -> ttrpc::Result<()> {
        let signal = i32::try_from(signal).ok().filter(|s| *s <= 64).ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("bad signal number {signal}")))?;
        if exec_id.is_empty() && !is_workload(container_id, exec_id) {
            let procs = self.of_container(container_id);
            if procs.is_empty() {
                return Err(status(Code::NOT_FOUND, format!("no process in container {container_id:?}")));
            }
            for p in procs {
                signal_proc(&p, signal)?;
            }
            return Ok(());
        }
        match self.get(container_id, exec_id)? {
            Target::Exec(p) => signal_proc(&p, signal),
            Target::Workload => {
                let st = lock(&self.workload.state);
                match (st.pid, st.exit) {
                    (Some(pid), None) => match sys::kill(pid, signal) {
                        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(io_status("kill the workload", &e)),
                        _ => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
        }
    }

    /// WaitProcess: the exit status once the process has ended.
    pub fn wait(&self, call: &Call<'_>, container_id: &str, exec_id: &str) -> ttrpc::Result<i32> {
        match self.get(container_id, exec_id)? {
            Target::Workload => {
                let mut st = lock(&self.workload.state);
                loop {
                    if let Some(code) = st.exit {
                        return Ok(code);
                    }
                    call.check()?;
                    st = self.workload.changed.wait_timeout(st, call.tick()).unwrap_or_else(|e| e.into_inner()).0;
                }
            }
            Target::Exec(p) => {
                let code = {
                    let mut st = p.wait_exited(call)?;
                    st.waited_at.get_or_insert_with(Instant::now);
                    st.exit.expect("wait_exited returns an exited state")
                };
                self.maybe_remove(&p);
                Ok(code)
            }
        }
    }

    /// ReadStdout (`stdout`) or ReadStderr: up to `len` bytes, blocking until there
    /// is output; at end of stream the error status Kata's agent answers.
    pub fn read(&self, call: &Call<'_>, container_id: &str, exec_id: &str, stdout: bool, len: u32) -> ttrpc::Result<Vec<u8>> {
        let p = match self.get(container_id, exec_id)? {
            Target::Exec(p) => p,
            Target::Workload => return Err(workload_stdio()),
        };
        let stream = match (stdout, &p.stderr) {
            (true, _) => &p.stdout,
            (false, Some(stderr)) => stderr,
            (false, None) => {
                // A terminal has no stderr: answer EOF once the process has ended.
                drop(p.wait_exited(call)?);
                return Err(status(Code::INTERNAL, "eof"));
            }
        };
        let len = match len as usize {
            0 => DEFAULT_READ,
            n => n.min(MAX_READ),
        };
        let mut buf = vec![0u8; len];
        loop {
            if stream.eof.load(Ordering::SeqCst) {
                return Err(eof_status());
            }
            match sys::read(stream.fd.as_fd(), &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    buf.truncate(n);
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    call.wait_fd(stream.fd.as_fd(), libc::POLLIN)?;
                }
                // A pty master reads EIO once every slave descriptor is closed.
                Err(e) if p.tty && e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => return Err(io_status("read the process output", &e)),
            }
        }
        stream.eof.store(true, Ordering::SeqCst);
        self.maybe_remove(&p);
        Err(eof_status())
    }

    /// WriteStdin: writes all of `data`; the number of bytes written.
    pub fn write(&self, call: &Call<'_>, container_id: &str, exec_id: &str, data: &[u8]) -> ttrpc::Result<u32> {
        let p = match self.get(container_id, exec_id)? {
            Target::Exec(p) => p,
            Target::Workload => return Err(workload_stdio()),
        };
        let stdin = lock(&p.stdin);
        let Some(fd) = stdin.as_ref() else {
            return Err(status(Code::FAILED_PRECONDITION, "stdin of the process is closed"));
        };
        let mut written = 0;
        while written < data.len() {
            match sys::write(fd.as_fd(), &data[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    call.wait_fd(fd.as_fd(), libc::POLLOUT)?;
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => return Err(status(Code::FAILED_PRECONDITION, "the process closed its stdin (broken pipe)")),
                Err(e) => return Err(io_status("write to the process's stdin", &e)),
            }
        }
        Ok(written as u32)
    }

    /// CloseStdin: closes the pipe, or sends end-of-file (^D) on a terminal.
    pub fn close_stdin(&self, container_id: &str, exec_id: &str) -> ttrpc::Result<()> {
        let p = match self.get(container_id, exec_id)? {
            Target::Exec(p) => p,
            Target::Workload => return Err(workload_stdio()),
        };
        let mut stdin = lock(&p.stdin);
        if p.tty {
            if let Some(fd) = stdin.as_ref() {
                let _ = sys::write(fd.as_fd(), &[4]); // VEOF
            }
        }
        *stdin = None;
        Ok(())
    }

    /// TtyWinResize.
    pub fn resize(&self, container_id: &str, exec_id: &str, rows: u32, cols: u32) -> ttrpc::Result<()> {
        let p = match self.get(container_id, exec_id)? {
            Target::Exec(p) => p,
            Target::Workload => return Err(workload_stdio()),
        };
        if !p.tty {
            return Err(status(Code::FAILED_PRECONDITION, "the process has no terminal"));
        }
        let rows = u16::try_from(rows).map_err(|_| status(Code::INVALID_ARGUMENT, "row out of range"))?;
        let cols = u16::try_from(cols).map_err(|_| status(Code::INVALID_ARGUMENT, "column out of range"))?;
        sys::set_winsize(p.stdout.fd.as_fd(), rows, cols).map_err(|e| io_status("TIOCSWINSZ", &e))
    }

    /// Kills every exec'd process (and its process group).
    pub fn kill_all(&self) {
        let procs: Vec<Arc<Proc>> = lock(&self.procs).map.values().cloned().collect();
        for p in procs {
            let st = lock(&p.state);
            if st.exit.is_none() {
                let _ = sys::kill(-p.pid, libc::SIGKILL);
                let _ = sys::kill(p.pid, libc::SIGKILL);
            }
        }
    }

    /// Number of entries (for tests and limits).
    pub fn len(&self) -> usize {
        lock(&self.procs).map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn signal_proc(p: &Proc, signal: i32) -> ttrpc::Result<()> {
    // Under the state lock the reaper cannot reap the pid, so it is still ours.
    let st = lock(&p.state);
    if st.exit.is_some() {
        return Ok(());
    }
    match sys::kill(p.pid, signal) {
        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(io_status("kill", &e)),
        _ => Ok(()),
    }
}

fn start_reaper(p: Arc<Proc>) -> ttrpc::Result<()> {
    let pid = p.pid;
    let reaper = p.clone();
    let spawned = std::thread::Builder::new().name("osb-reap".into()).stack_size(64 * 1024).spawn(move || {
        let p = reaper;
        let waited = sys::wait_exited_nowait(p.pid);
        let mut st = lock(&p.state);
        let code = match waited.and_then(|()| sys::reap(p.pid)) {
            Ok(wait_status) => sys::exit_code(wait_status),
            Err(e) => {
                eprintln!("osb-agent: waiting for pid {}: {e}", p.pid);
                LOST_STATUS
            }
        };
        st.exit = Some(code);
        st.exited_at = Some(Instant::now());
        p.exited.notify_all();
    });
    if let Err(e) = spawned {
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::reap(pid);
        return Err(status(Code::RESOURCE_EXHAUSTED, format!("cannot start a reaper thread: {e}")));
    }
    Ok(())
}

/// PATH for processes whose environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

fn spawn(key: Key, spec: &SpawnSpec) -> ttrpc::Result<Proc> {
    let mut cmd = Command::new(&spec.args[0]);
    cmd.args(&spec.args[1..]);
    cmd.env_clear();
    let mut has_path = false;
    for entry in &spec.env {
        match entry.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                has_path |= k == "PATH";
                cmd.env(k, v);
            }
            _ => return Err(status(Code::INVALID_ARGUMENT, format!("environment entry {entry:?} is not KEY=VALUE"))),
        }
    }
    if !has_path {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.current_dir(if spec.cwd.is_empty() { "/" } else { &spec.cwd });

    let pty_master = if spec.tty {
        let (master, slave) = sys::openpty().map_err(|e| io_status("open a pseudo-terminal", &e))?;
        if let Some((rows, cols)) = spec.tty_size {
            sys::set_winsize(master.as_fd(), rows, cols).map_err(|e| io_status("TIOCSWINSZ", &e))?;
        }
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| io_status("dup", &e));
        cmd.stdin(Stdio::from(dup(&slave)?));
        cmd.stdout(Stdio::from(dup(&slave)?));
        cmd.stderr(Stdio::from(slave));
        Some(master)
    } else {
        cmd.stdin(Stdio::piped());
        cmd.stdout(Stdio::piped());
        cmd.stderr(Stdio::piped());
        None
    };

    let groups: Vec<libc::gid_t> = spec.groups.clone();
    let (uid, gid, tty) = (spec.uid, spec.gid, spec.tty);
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe syscalls on data prepared before the fork (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getuid() != 0 {
                // An unprivileged agent (host tests) can only run as itself.
                if uid != libc::getuid() || gid != libc::getgid() {
                    return Err(std::io::Error::from_raw_os_error(libc::EPERM));
                }
                return Ok(());
            }
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0 || libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        let code = match e.kind() {
            std::io::ErrorKind::NotFound => Code::NOT_FOUND,
            std::io::ErrorKind::PermissionDenied => Code::PERMISSION_DENIED,
            _ => Code::INTERNAL,
        };
        status(code, format!("start {:?}: {e}", spec.args[0]))
    })?;
    // The slave descriptors (if any) live in `cmd`: close them now, so the master
    // reads EIO when the process's side is gone.
    drop(cmd);
    let pid = child.id() as i32;

    let (stdin_fd, stdout_stream, stderr_stream) = match pty_master {
        Some(master) => {
            let writer = master.try_clone().map_err(|e| io_status("dup", &e))?;
            (Some(writer), master, None)
        }
        None => {
            let stdin = child.stdin.take().map(OwnedFd::from);
            let stdout = child.stdout.take().map(OwnedFd::from);
            let stderr = child.stderr.take().map(OwnedFd::from);
            let Some(stdout) = stdout else {
                return Err(status(Code::INTERNAL, "spawned process has no stdout pipe"));
            };
            (stdin, stdout, stderr)
        }
    };
    // `child` is dropped without waiting: the reaper thread owns the wait.
    drop(child);
    for fd in stdin_fd.iter().chain([&stdout_stream]).chain(stderr_stream.iter()) {
        sys::set_nonblocking(fd.as_fd()).map_err(|e| io_status("O_NONBLOCK", &e))?;
    }
    Ok(Proc {
        key,
        pid,
        tty,
        stdin: Mutex::new(stdin_fd),
        stdout: Stream { fd: stdout_stream, eof: AtomicBool::new(false) },
        stderr: stderr_stream.map(|fd| Stream { fd, eof: AtomicBool::new(false) }),
        state: Mutex::new(State::default()),
        exited: Condvar::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids() {
        assert!(is_workload("workload", ""));
        assert!(is_workload("workload", "workload"));
        assert!(!is_workload("workload", "x"));
        assert!(!is_workload("osb", ""));
    }

    #[test]
    fn workload_events() {
        let w = Workload::default();
        assert!(!w.known());
        w.started(10);
        assert!(w.known());
        w.exited(11, 3); // another pid: ignored
        assert_eq!(lock(&w.state).exit, None);
        w.exited(10, 3);
        assert_eq!(lock(&w.state).exit, Some(3));
        w.started(12); // restarted
        assert_eq!(lock(&w.state).exit, None);
    }
}
