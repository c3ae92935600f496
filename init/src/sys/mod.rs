//! The narrow door to the kernel.
//!
//! Everything PID 1 does to the machine during boot and shutdown (mounts, root
//! switching, console, hostname, power) goes through [`Sys`], so the order of
//! those steps and their error handling are unit-tested on the host against
//! the recording double in `record.rs`. [`Linux`] is the real implementation;
//! `linux.rs` and `proc.rs` are the only places that make raw syscalls.

use std::io;
use std::time::Duration;

mod linux;
pub mod proc;
#[cfg(test)]
pub(crate) mod record;

pub use linux::Linux;

/// `mount(2)` flags we use (the kernel's `MS_*` values, `c_ulong` in libc:
/// the same as u64 on 64-bit targets only).
#[allow(clippy::unnecessary_cast)]
pub mod flags {
    pub const RDONLY: u64 = libc::MS_RDONLY as u64;
    pub const NOSUID: u64 = libc::MS_NOSUID as u64;
    pub const NODEV: u64 = libc::MS_NODEV as u64;
    pub const NOEXEC: u64 = libc::MS_NOEXEC as u64;
    pub const REMOUNT: u64 = libc::MS_REMOUNT as u64;
    pub const MOVE: u64 = libc::MS_MOVE as u64;
    pub const RELATIME: u64 = libc::MS_RELATIME as u64;
}

/// One `mount(2)` call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount<'a> {
    pub source: &'a str,
    pub target: &'a str,
    /// Empty for `MS_MOVE` and remounts.
    pub fstype: &'a str,
    pub flags: u64,
    /// The filesystem options string; empty for none.
    pub data: &'a str,
}

impl std::fmt::Display for Mount<'_> {
    /// `SOURCE on TARGET (FSTYPE)`: how error messages name a mount.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.flags & flags::MOVE != 0 {
            return write!(f, "move {} to {}", self.source, self.target);
        }
        write!(f, "mount {} on {}", self.source, self.target)?;
        if !self.fstype.is_empty() {
            write!(f, " ({}", self.fstype)?;
            if !self.data.is_empty() {
                write!(f, ", {}", self.data)?;
            }
            write!(f, ")")?;
        }
        Ok(())
    }
}

/// How the machine ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Power {
    Off,
    Reboot,
}

/// A child's end, as `waitpid` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reaped {
    pub pid: i32,
    /// The raw wait status.
    pub status: i32,
}

/// The shell convention for a raw wait status: the exit code, or 128 + the
/// signal number when the process was killed by a signal.
pub fn exit_code(status: i32) -> i32 {
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// The syscalls behind boot and shutdown. Paths are absolute, or relative to
/// the current directory after a `chdir`, exactly as the kernel sees them.
pub trait Sys {
    fn mount(&mut self, mount: &Mount) -> io::Result<()>;
    /// `umount2`; `detach` is `MNT_DETACH` (lazy).
    fn umount(&mut self, target: &str, detach: bool) -> io::Result<()>;
    fn mkdir(&mut self, path: &str, mode: u32) -> io::Result<()>;
    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()>;
    fn chdir(&mut self, path: &str) -> io::Result<()>;
    fn chroot(&mut self, path: &str) -> io::Result<()>;
    /// Whether `path` names anything (without following a final symlink).
    fn exists(&mut self, path: &str) -> bool;
    fn read_file(&mut self, path: &str) -> io::Result<String>;
    /// The kernel's log buffer as it stands (`klogctl` READ_ALL: nothing
    /// consumed, nothing blocks).
    fn kernel_log(&mut self) -> io::Result<String>;
    /// Opens `path` read-write (no controlling tty) as fds 0, 1 and 2.
    fn open_console(&mut self, path: &str) -> io::Result<()>;
    fn sethostname(&mut self, name: &str) -> io::Result<()>;
    /// Brings the loopback interface up.
    fn loopback_up(&mut self) -> io::Result<()>;
    /// Mixes `seed` into the kernel's pool and credits it (RNDADDENTROPY).
    fn add_entropy(&mut self, seed: &[u8]) -> io::Result<()>;
    fn sleep(&mut self, duration: Duration);
    /// `kill(-1, signal)`: every process but PID 1 (and kernel threads).
    fn kill_all(&mut self, signal: i32) -> io::Result<()>;
    /// Reaps one ended child without blocking: `Ok(None)` when children are
    /// left but none has ended, `Err(ECHILD)` when there are none.
    fn reap(&mut self) -> io::Result<Option<Reaped>>;
    fn sync(&mut self);
    /// `reboot(2)`; returns only on failure (or in doubles).
    fn reboot(&mut self, how: Power) -> io::Result<()>;
}

/// Whether an error is the given errno.
pub fn is_errno(err: &io::Error, errno: i32) -> bool {
    err.raw_os_error() == Some(errno)
}

pub use libc::{EBUSY, ECHILD, EEXIST, EINVAL, ENOENT, ENXIO, EROFS, SIGINT, SIGKILL, SIGTERM};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell_convention() {
        // Raw wait statuses: exit code in bits 8-15, terminating signal in 0-6.
        let check = |status: i32, code: i32| assert_eq!(exit_code(status), code, "status {status:#x}");
        check(0, 0);
        check(3 << 8, 3);
        check(255 << 8, 255);
        check(libc::SIGKILL, 137);
        check(libc::SIGTERM, 143);
        check(libc::SIGSEGV | 0x80, 139); // with a core dump
    }

    #[test]
    fn mounts_name_themselves() {
        let m = Mount { source: "/dev/vda1", target: "/.osb/root", fstype: "ext4", flags: 0, data: "dax" };
        assert_eq!(m.to_string(), "mount /dev/vda1 on /.osb/root (ext4, dax)");
        let m = Mount { source: "/dev", target: "/.osb/root/dev", fstype: "", flags: flags::MOVE, data: "" };
        assert_eq!(m.to_string(), "move /dev to /.osb/root/dev");
    }
}
