//! Walking to a directory the way a guest process cannot redirect: from `/`, one
//! `openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)` per component, so a symbolic link a
//! guest process planted anywhere on the way is refused instead of followed out of the
//! intended tree. Shared by the agent's CopyFile (the destination's parents) and the
//! storage calls (mount points).

use std::ffi::{CStr, CString, OsStr};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why [`open_dirs`] stopped, and at which prefix of the path (`walked`).
#[derive(Debug)]
pub enum WalkError {
    /// `walked` is a symbolic link.
    Symlink(PathBuf),
    /// `walked` exists and is not a directory.
    NotDir(PathBuf),
    /// A system call failed on `walked` (`op`: "open" or "mkdir"), or the path is not
    /// one to walk (relative, `..`, a NUL byte).
    Io { op: &'static str, walked: PathBuf, error: io::Error },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::Symlink(w) => write!(f, "{} is a symbolic link", w.display()),
            WalkError::NotDir(w) => write!(f, "{} is not a directory", w.display()),
            WalkError::Io { op, walked, error } => write!(f, "{op} {}: {error}", walked.display()),
        }
    }
}

impl std::error::Error for WalkError {}

fn open_at(dir: Option<&OwnedFd>, name: &CStr, flags: i32) -> io::Result<OwnedFd> {
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    loop {
        // SAFETY: name is NUL-terminated; the descriptor returned is new and owned here.
        let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, 0) };
        if fd >= 0 {
            // SAFETY: fd was just opened.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn is_symlink(dir: &OwnedFd, name: &CStr) -> bool {
    // SAFETY: stat is plain old data; all-zero is valid.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: name is NUL-terminated and st is writable.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFLNK
}

fn invalid(walked: &Path, why: &str) -> WalkError {
    WalkError::Io { op: "open", walked: walked.to_path_buf(), error: io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()) }
}

/// Opens the directory `path` (absolute) as an `O_PATH` descriptor, making each
/// missing component with `mode`. Unless `follow`, no component may be a symbolic
/// link: it is refused ([`WalkError::Symlink`]), never resolved. With `follow` the
/// image's own links (`/var/run -> /run`) are taken, as at boot.
pub fn open_dirs(path: &Path, mode: u32, follow: bool) -> Result<OwnedFd, WalkError> {
    let nofollow = if follow { 0 } else { libc::O_NOFOLLOW };
    let flags = libc::O_PATH | libc::O_DIRECTORY | nofollow;
    let mut walked = PathBuf::from("/");
    if !path.is_absolute() {
        return Err(invalid(path, "not an absolute path"));
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(invalid(path, "\"..\" is not allowed"));
    }
    let mut dir = open_at(None, c"/", libc::O_PATH | libc::O_DIRECTORY).map_err(|error| WalkError::Io { op: "open", walked: walked.clone(), error })?;
    for component in path.components() {
        let name: &OsStr = match component {
            Component::RootDir | Component::CurDir => continue,
            Component::Normal(name) => name,
            Component::ParentDir | Component::Prefix(_) => return Err(invalid(path, "\"..\" is not allowed")),
        };
        walked.push(name);
        let name = CString::new(name.as_bytes()).map_err(|_| invalid(&walked, "holds a NUL byte"))?;
        let mut made = false;
        dir = loop {
            match open_at(Some(&dir), &name, flags) {
                Ok(next) => break next,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) && !made => {
                    // SAFETY: dir is an open directory and name is NUL-terminated.
                    if unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) } < 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(WalkError::Io { op: "mkdir", walked, error: e });
                        }
                    }
                    made = true;
                }
                // O_PATH|O_NOFOLLOW|O_DIRECTORY on a symbolic link: ENOTDIR (or ELOOP).
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTDIR | libc::ELOOP)) => {
                    return Err(if is_symlink(&dir, &name) { WalkError::Symlink(walked) } else { WalkError::NotDir(walked) });
                }
                Err(error) => return Err(WalkError::Io { op: "open", walked, error }),
            }
        };
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_make_directories_and_refuse_links() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().canonicalize().unwrap();
        let deep = base.join("a/b/c");
        open_dirs(&deep, 0o750, false).unwrap();
        assert!(deep.is_dir());
        std::os::unix::fs::symlink(base.join("a"), base.join("link")).unwrap();
        std::fs::write(base.join("file"), "").unwrap();
        let err = open_dirs(&base.join("link/b"), 0o755, false).unwrap_err();
        assert!(matches!(&err, WalkError::Symlink(w) if *w == base.join("link")), "{err}");
        open_dirs(&base.join("link/b"), 0o755, true).unwrap();
        let err = open_dirs(&base.join("file/x"), 0o755, false).unwrap_err();
        assert!(matches!(&err, WalkError::NotDir(w) if *w == base.join("file")), "{err}");
        // Refused before anything is made.
        for bad in ["relative/x", "/osb-dirwalk-test/../b"] {
            let err = open_dirs(Path::new(bad), 0o755, false).unwrap_err().to_string();
            assert!(err.contains("absolute") || err.contains(".."), "{bad}: {err}");
        }
        assert!(!Path::new("/osb-dirwalk-test").exists());
    }
}
