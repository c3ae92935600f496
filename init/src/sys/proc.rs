//! Processes and signals: the signalfd main loop's pieces, pipes, and the
//! steps a child takes between fork and exec.
//!
//! The `child_*` functions run in a forked child (`Command::pre_exec`): they
//! make only async-signal-safe syscalls and allocate nothing.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::linux::check;
use super::Reaped;

pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// `waitpid(-1, WNOHANG)`: see [`super::Sys::reap`].
pub fn reap_any() -> io::Result<Option<Reaped>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out-pointer for the call.
    let pid = check(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) })?;
    Ok((pid > 0).then_some(Reaped { pid, status }))
}

/// Sleeps until a signal arrives, forever: where PID 1 parks when it has
/// nothing left to do (it must never exit).
pub fn park() -> ! {
    loop {
        // SAFETY: pause takes no arguments.
        unsafe { libc::pause() };
    }
}

/// Blocks `signals` for the calling thread (the whole process when it is
/// single-threaded): they stay pending until read from a signalfd. PID 1
/// blocks them first thing, since unblocked signals without a handler are
/// dropped for it. Returns the set.
pub fn block_signals(signals: &[i32]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t for these calls.
    unsafe {
        libc::sigemptyset(&mut set);
        for &signal in signals {
            libc::sigaddset(&mut set, signal);
        }
    }
    // SAFETY: `set` is initialised; the old mask is not wanted.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(set)
}

/// The signals PID 1 handles, blocked and read from a signalfd.
pub struct SignalFd {
    fd: OwnedFd,
}

impl SignalFd {
    /// Blocks `signals` for the calling thread (and so for the whole
    /// process when it is single-threaded) and opens a signalfd for them.
    pub fn new(signals: &[i32]) -> io::Result<SignalFd> {
        let set = block_signals(signals)?;
        // SAFETY: `set` is initialised; -1 asks for a new fd, which we own.
        let fd = check(unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) })?;
        // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
        Ok(SignalFd { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Waits up to `timeout` (forever when `None`) for signals and returns
    /// those pending, with the sender's pid; empty on timeout.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<(i32, i32)>> {
        let millis = timeout.map_or(-1, |t| t.as_millis().clamp(0, i32::MAX as u128) as i32);
        let mut pollfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        match check(unsafe { libc::poll(&mut pollfd, 1, millis) }) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Vec::new()),
            Err(e) => return Err(e),
        }
        let mut signals = Vec::new();
        loop {
            // SAFETY: signalfd_siginfo is plain data; all-zero is valid.
            let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
            let size = std::mem::size_of::<libc::signalfd_siginfo>();
            // SAFETY: reads at most `size` bytes into `info`.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n != size as isize {
                break; // EAGAIN: drained
            }
            signals.push((info.ssi_signo as i32, info.ssi_pid as i32));
        }
        Ok(signals)
    }
}

/// A pipe `(read, write)`, both close-on-exec; the write end non-blocking so a
/// reader that stops reading can never block PID 1.
pub fn event_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 returns, which we own.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: both fds were just created and are owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_SETFL on an fd we own.
    check(unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) })?;
    Ok((read, write))
}

/// Writes all of `bytes` to a non-blocking fd or fails (a full pipe is an
/// error, not a wait).
pub fn write_all_nonblocking(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe `bytes`.
        let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// In a forked child: an empty signal mask and default dispositions for the
/// signals PID 1 handles, so the program starts as a shell would start it.
pub fn child_reset_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid; the old mask is not wanted.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    for signal in [libc::SIGPIPE, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD] {
        // SAFETY: SIG_DFL is a valid disposition for these signals.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    Ok(())
}

/// In a forked child: a new session, with fd 0 as its controlling terminal
/// when it is one (best effort: a console that is not a tty is fine).
pub fn child_new_session(take_tty: bool) -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() })?;
    if take_tty {
        // SAFETY: TIOCSCTTY takes an int argument (0: do not steal).
        unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
    }
    Ok(())
}

/// In a forked child: drops to `uid`/`gid` with exactly `groups` as the
/// supplementary groups (in the order setgroups, setgid, setuid).
pub fn child_set_ids(uid: u32, gid: u32, groups: &[u32]) -> io::Result<()> {
    // SAFETY: the pointer and length describe `groups`.
    check(unsafe { libc::setgroups(groups.len(), groups.as_ptr()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setgid(gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setuid(uid) })?;
    Ok(())
}

/// In a forked child: makes `fd` available as `target`, inherited across exec.
pub fn child_install_fd(fd: RawFd, target: RawFd) -> io::Result<()> {
    if fd == target {
        // dup2 would keep FD_CLOEXEC: clear it instead.
        // SAFETY: F_SETFD on an fd this process holds.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) })?;
    } else {
        // SAFETY: dup2 on fd numbers; the new `target` has FD_CLOEXEC clear.
        check(unsafe { libc::dup2(fd, target) })?;
    }
    Ok(())
}

pub fn is_root() -> bool {
    uid() == 0
}

pub fn uid() -> u32 {
    // SAFETY: getuid cannot fail.
    unsafe { libc::getuid() }
}

pub fn gid() -> u32 {
    // SAFETY: getgid cannot fail.
    unsafe { libc::getgid() }
}

/// Blocks until `pid` ends; returns its raw wait status.
pub fn wait_for(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer for the call.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}
