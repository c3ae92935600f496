//! The real [`Sys`]: thin wrappers over libc.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use super::{Mount, Power, Reaped, Sys};

/// The running kernel.
#[derive(Debug, Default)]
pub struct Linux;

/// A path or string as a C string; an interior NUL is an invalid-input error.
pub(crate) fn cstr(s: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

/// Maps a libc return value (-1 = failure, errno set) to a result.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// NULL for an empty string, else the C string's pointer.
fn opt_ptr(s: &Option<CString>) -> *const libc::c_char {
    s.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

fn non_empty(s: &str) -> io::Result<Option<CString>> {
    if s.is_empty() {
        Ok(None)
    } else {
        cstr(s).map(Some)
    }
}

impl Sys for Linux {
    fn mount(&mut self, m: &Mount) -> io::Result<()> {
        let source = non_empty(m.source)?;
        let target = cstr(m.target)?;
        let fstype = non_empty(m.fstype)?;
        let data = non_empty(m.data)?;
        // SAFETY: every pointer is NULL or a NUL-terminated string that
        // outlives the call; `data` is a string, as the filesystems we mount
        // expect.
        check(unsafe { libc::mount(opt_ptr(&source), target.as_ptr(), opt_ptr(&fstype), m.flags as libc::c_ulong, opt_ptr(&data) as *const libc::c_void) })?;
        Ok(())
    }

    fn umount(&mut self, target: &str, detach: bool) -> io::Result<()> {
        let target = cstr(target)?;
        let flags = if detach { libc::MNT_DETACH } else { 0 };
        // SAFETY: `target` is NUL-terminated and outlives the call.
        check(unsafe { libc::umount2(target.as_ptr(), flags) })?;
        Ok(())
    }

    fn mkdir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let path = cstr(path)?;
        // SAFETY: `path` is NUL-terminated and outlives the call.
        check(unsafe { libc::mkdir(path.as_ptr(), mode as libc::mode_t) })?;
        Ok(())
    }

    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
        std::os::unix::fs::symlink(target, link)
    }

    fn chdir(&mut self, path: &str) -> io::Result<()> {
        std::env::set_current_dir(path)
    }

    fn chroot(&mut self, path: &str) -> io::Result<()> {
        std::os::unix::fs::chroot(path)
    }

    fn exists(&mut self, path: &str) -> bool {
        std::fs::symlink_metadata(path).is_ok()
    }

    fn read_file(&mut self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn kernel_log(&mut self) -> io::Result<String> {
        const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
        const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
        // SAFETY: SIZE_BUFFER takes no buffer (NULL, length 0).
        let size = check(unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; size.max(0) as usize];
        // SAFETY: the pointer and length describe `buf`, which the kernel
        // fills with at most that many bytes.
        let n = check(unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), buf.len() as libc::c_int) })?;
        buf.truncate(n as usize);
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    fn open_console(&mut self, path: &str) -> io::Result<()> {
        let path = cstr(path)?;
        // SAFETY: `path` is NUL-terminated; the returned fd is ours.
        let fd = check(unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NOCTTY) })?;
        for target in 0..3 {
            if fd != target {
                // SAFETY: both are plain fd numbers; dup2 replaces `target`
                // (a standard stream nobody else owns in PID 1).
                check(unsafe { libc::dup2(fd, target) })?;
            }
        }
        if fd > 2 {
            // SAFETY: `fd` is ours and no longer needed: 0-2 are its copies.
            unsafe { libc::close(fd) };
        }
        Ok(())
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        // SAFETY: the pointer and length describe `name`'s bytes.
        check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
        Ok(())
    }

    fn loopback_up(&mut self) -> io::Result<()> {
        // SAFETY: plain socket creation; the fd is closed below.
        let sock = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: ifreq is plain data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: `req` is a valid ifreq naming "lo"; SIOCGIFFLAGS fills its
        // flags member, which we then read and write back with IFF_UP.
        let result = unsafe {
            check(libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
                req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
                check(libc::ioctl(sock, libc::SIOCSIFFLAGS, &req))
            })
        };
        // SAFETY: `sock` is ours.
        unsafe { libc::close(sock) };
        result.map(drop)
    }

    fn add_entropy(&mut self, seed: &[u8]) -> io::Result<()> {
        // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
        const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
        let mut info = Vec::with_capacity(8 + seed.len() + 3);
        info.extend_from_slice(&((seed.len() * 8) as i32).to_ne_bytes());
        info.extend_from_slice(&(seed.len() as i32).to_ne_bytes());
        info.extend_from_slice(seed);
        info.resize(8 + seed.len().div_ceil(4) * 4, 0);
        let file = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
        // SAFETY: `info` is a complete rand_pool_info: two ints then
        // buf_size bytes (padded to whole u32s), alive for the call.
        check(unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&file), RNDADDENTROPY, info.as_ptr()) })?;
        Ok(())
    }

    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration)
    }

    fn kill_all(&mut self, signal: i32) -> io::Result<()> {
        // SAFETY: kill takes no pointers.
        check(unsafe { libc::kill(-1, signal) })?;
        Ok(())
    }

    fn reap(&mut self) -> io::Result<Option<Reaped>> {
        super::proc::reap_any()
    }

    fn sync(&mut self) {
        // SAFETY: sync takes no arguments.
        unsafe { libc::sync() }
    }

    fn reboot(&mut self, how: Power) -> io::Result<()> {
        let cmd = match how {
            Power::Off => libc::RB_POWER_OFF,
            Power::Reboot => libc::RB_AUTOBOOT,
        };
        // SAFETY: reboot takes no pointers; on success it does not return.
        check(unsafe { libc::reboot(cmd) })?;
        Ok(())
    }
}
