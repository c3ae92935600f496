//! The raw syscalls the server makes, each behind a small safe function.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Retries `f` while it fails with EINTR.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller keeps open.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// read(2) on a (non-blocking) descriptor.
pub fn read(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// write(2) on a (non-blocking) descriptor.
pub fn write(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// poll(2); `timeout` None blocks. Returns the number of ready entries.
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as libc::c_int);
    // SAFETY: fds is a valid, exclusively borrowed array of pollfd of that length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    match check(n) {
        Ok(n) => Ok(n as usize),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(e) => Err(e),
    }
}

/// A new pseudo-terminal: (master, slave), both close-on-exec.
pub fn openpty() -> io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = check(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: master is a fresh descriptor owned here.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    // SAFETY: grantpt/unlockpt on the pty master just opened.
    check(unsafe { libc::grantpt(master.as_raw_fd()) })?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(master.as_raw_fd()) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: name is a writable buffer of the length passed.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into name.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_owned();
    let slave = retry(|| {
        // SAFETY: path is a valid NUL-terminated string.
        check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })
    })?;
    // SAFETY: slave is a fresh descriptor owned here.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

pub fn set_winsize(fd: BorrowedFd<'_>, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize struct from the pointer.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// kill(2); ESRCH is reported as an error for the caller to judge.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// A listening AF_VSOCK socket on `cid` (VMADDR_CID_ANY: any) and `port`.
pub fn vsock_listen(cid: u32, port: u32, backlog: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2).
    let fd = check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh socket owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: addr is a valid sockaddr_vm of the size passed.
    check(unsafe {
        libc::bind(fd.as_raw_fd(), &addr as *const libc::sockaddr_vm as *const libc::sockaddr, std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t)
    })?;
    // SAFETY: listen on the socket just bound.
    check(unsafe { libc::listen(fd.as_raw_fd(), backlog) })?;
    Ok(fd)
}

/// accept4(2) with SOCK_CLOEXEC on an AF_VSOCK listener: the connection and the
/// peer's CID.
pub fn accept_vsock(listener: BorrowedFd<'_>) -> io::Result<(OwnedFd, u32)> {
    retry(|| {
        // SAFETY: sockaddr_vm is plain old data; all-zero is valid.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
        // SAFETY: addr and len are valid for writes of the sizes given.
        let fd =
            check(unsafe { libc::accept4(listener.as_raw_fd(), &mut addr as *mut libc::sockaddr_vm as *mut libc::sockaddr, &mut len, libc::SOCK_CLOEXEC) })?;
        // SAFETY: accept4 returned a new descriptor owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if addr.svm_family != libc::AF_VSOCK as libc::sa_family_t {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "accept on a vsock listener returned no vsock address"));
        }
        Ok((fd, addr.svm_cid))
    })
}

/// recv(2) on a blocking socket; 0 at end of stream.
pub fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for writes of buf.len() bytes.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

/// send(2) without SIGPIPE.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    retry(|| {
        // SAFETY: buf is valid for reads of buf.len() bytes.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
}

pub fn shutdown(fd: RawFd) {
    // SAFETY: shutdown on a descriptor the caller keeps open; errors are irrelevant.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// SO_SNDTIMEO: a send blocked this long fails with EAGAIN.
pub fn set_send_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval { tv_sec: timeout.as_secs() as libc::time_t, tv_usec: timeout.subsec_micros() as libc::suseconds_t };
    // SAFETY: tv is a valid timeval of the size passed.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// clock_settime(CLOCK_REALTIME).
pub fn set_realtime(sec: i64, nsec: i64) -> io::Result<()> {
    let ts = libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec as libc::c_long };
    // SAFETY: ts is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

pub fn ignore_sigpipe() {
    // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

/// How a reaped child ended: its exit status, or 128 + the signal that killed it.
pub fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        255
    }
}

/// Blocks until child `pid` has ended without reaping it (waitid WNOWAIT), so the
/// pid cannot be reused while the caller records the exit.
pub fn wait_exited_nowait(pid: i32) -> io::Result<()> {
    retry(|| {
        // SAFETY: siginfo_t is plain old data; all-zero is valid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: info is a valid, writable siginfo_t.
        check(unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) })?;
        Ok(())
    })
}

/// Reaps child `pid`; its wait status.
pub fn reap(pid: i32) -> io::Result<libc::c_int> {
    retry(|| {
        let mut status = 0;
        // SAFETY: status is a valid, writable int.
        check(unsafe { libc::waitpid(pid, &mut status, 0) })?;
        Ok(status)
    })
}

/// openat(2) of `name` in `dir` (or, with `dir` None, an absolute `name`); the
/// result is close-on-exec.
pub fn openat(dir: Option<BorrowedFd<'_>>, name: &std::ffi::CStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let dir = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    let fd = retry(|| {
        // SAFETY: name is NUL-terminated; mode is read only with O_CREAT.
        check(unsafe { libc::openat(dir, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })
    })?;
    // SAFETY: openat returned a new descriptor owned here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// mkdirat(2).
pub fn mkdirat(dir: BorrowedFd<'_>, name: &std::ffi::CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })?;
    Ok(())
}

/// unlinkat(2) of a non-directory.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) })?;
    Ok(())
}

/// renameat(2) within one directory.
pub fn renameat(dir: BorrowedFd<'_>, from: &std::ffi::CStr, to: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: both names are NUL-terminated.
    check(unsafe { libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr()) })?;
    Ok(())
}

/// symlinkat(2): `name` in `dir` pointing at `target`.
pub fn symlinkat(target: &std::ffi::CStr, dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: both strings are NUL-terminated.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })?;
    Ok(())
}

/// fchownat(2) with AT_SYMLINK_NOFOLLOW (u32::MAX leaves an id alone).
pub fn lchownat(dir: BorrowedFd<'_>, name: &std::ffi::CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: name is NUL-terminated.
    check(unsafe { libc::fchownat(dir.as_raw_fd(), name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(())
}

/// fstatat(2) with AT_SYMLINK_NOFOLLOW: (file type bits, device, inode).
pub fn lstatat(dir: BorrowedFd<'_>, name: &std::ffi::CStr) -> io::Result<(u32, u64, u64)> {
    // SAFETY: stat is plain old data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated and st is writable.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok((st.st_mode & libc::S_IFMT, st.st_dev, st.st_ino))
}

/// Makes glibc's malloc serve allocations of `threshold` bytes and more with mmap
/// and give them back with munmap on free. By default the threshold grows to the
/// largest block freed, after which multi-MiB request buffers come from per-thread
/// arenas and their memory stays with the agent (measured: a peak three times the
/// bytes ever in flight).
pub fn unmap_large_allocations(threshold: usize) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc parameter; a fixed value also turns
    // off the dynamic adjustment.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, threshold.min(i32::MAX as usize) as libc::c_int);
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = threshold;
}
