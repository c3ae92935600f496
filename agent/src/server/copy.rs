//! CopyFile with Kata's semantics: the host sends a file in chunks (path, file_size,
//! file_mode, dir_mode, uid, gid, offset, data); the agent writes them to a temporary
//! file beside the destination and renames it into place once every byte of
//! `[0, file_size)` has arrived (chunks may come in any order after the first, at
//! offset 0, which starts the copy). Parent directories are created with `dir_mode`.
//! A `file_mode` with S_IFDIR makes a directory, with S_IFLNK a symbolic link to the
//! target in `data`. The owner is set before the mode: chown(2) clears S_ISUID and
//! S_ISGID.
//!
//! Unlike Kata (which only accepts paths below /run/kata-containers) any absolute path
//! in the guest is accepted, but never a relative one or one with `..` components.
//! The agent runs as root and guest processes may own directories on the way, so the
//! path is walked one component at a time from `/` without following symbolic links
//! (openat with O_NOFOLLOW): a symlink among the parents is refused with
//! FAILED_PRECONDITION, and everything after the walk happens relative to the parent
//! directory it opened.
//!
//! A copy in progress lives in [`Copies`]: the open temporary file, its directory
//! and the byte ranges received so far. Chunks are handled one at a time.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use ttrpc::Code;

use super::call::{io_status, status};
use super::sys;
use crate::dirwalk::{open_dirs, WalkError};
use crate::proto::agent::CopyFileRequest;

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_IFREG: u32 = libc::S_IFREG;

/// Copies in progress at once; a new one past this drops the least recently
/// touched (and removes its temporary file).
pub const MAX_COPIES: usize = 64;
/// Disjoint byte ranges one copy may hold (chunks that touch merge into one).
pub const MAX_RANGES: usize = 4096;
/// The destination, checked: absolute, no `..`, not `/`.
pub fn checked_path(path: &str) -> ttrpc::Result<PathBuf> {
    let bad = |why: &str| status(Code::INVALID_ARGUMENT, format!("CopyFile path {path:?}: {why}"));
    if path.contains('\0') {
        return Err(bad("contains a NUL byte"));
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(bad("must be absolute"));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(bad("must not contain \"..\""));
    }
    if p.file_name().is_none() {
        return Err(bad("names no file"));
    }
    Ok(p.components().collect())
}

/// The temporary name a copy to `path` is written under.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    path.with_file_name(format!(".{name}.osb-copy"))
}

/// An owner id as CopyFile sends it: -1 (as in chown(2)) leaves it alone.
fn owner(id: i32) -> Option<u32> {
    u32::try_from(id).ok()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn cstring(name: &std::ffi::OsStr) -> ttrpc::Result<CString> {
    // checked_path refused NUL bytes already.
    CString::new(name.as_bytes()).map_err(|_| status(Code::INVALID_ARGUMENT, "NUL in a path"))
}

/// Sorted, disjoint, non-touching half-open byte ranges: what a copy has received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Adds `[start, end)`, merging what it overlaps or touches; false (and no
    /// change) when that would make more than [`MAX_RANGES`] ranges.
    pub fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let first = self.0.partition_point(|&(_, e)| e < start);
        let mut last = first;
        let (mut s, mut e) = (start, end);
        while last < self.0.len() && self.0[last].0 <= end {
            s = s.min(self.0[last].0);
            e = e.max(self.0[last].1);
            last += 1;
        }
        if first == last && self.0.len() >= MAX_RANGES {
            return false;
        }
        self.0.splice(first..last, [(s, e)]);
        true
    }

    /// Every byte of `[0, size)` is in.
    pub fn covers(&self, size: u64) -> bool {
        size == 0 || self.0.first().is_some_and(|&(s, e)| s == 0 && e >= size)
    }
}

/// A regular file being copied.
struct Partial {
    size: u64,
    /// The destination's parent, as the walk opened it.
    dir: OwnedFd,
    name: CString,
    temp: CString,
    file: File,
    received: Ranges,
    touched: Instant,
}

impl Partial {
    /// The temporary name still names the file this copy writes.
    fn temp_is_ours(&self) -> bool {
        let Ok(meta) = self.file.metadata() else {
            return false;
        };
        sys::lstatat(self.dir.as_fd(), &self.temp).is_ok_and(|(kind, dev, ino)| kind == S_IFREG && dev == meta.dev() && ino == meta.ino())
    }

    /// Abandons the copy and removes its temporary file.
    fn discard(self) {
        if self.temp_is_ours() {
            let _ = sys::unlinkat(self.dir.as_fd(), &self.temp);
        }
    }

    /// Owner, then mode (chown clears S_ISUID/S_ISGID), then the rename.
    fn finish(self, path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> ttrpc::Result<()> {
        let temp_path = temp_path(path);
        let done =
            std::os::unix::fs::fchown(&self.file, uid, gid)
                .map_err(|e| io_status(&format!("chown {}", temp_path.display()), &e))
                .and_then(|()| {
                    self.file.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io_status(&format!("chmod {}", temp_path.display()), &e))
                })
                .and_then(|()| {
                    if self.temp_is_ours() {
                        Ok(())
                    } else {
                        Err(status(Code::ABORTED, format!("{} was replaced during the copy", temp_path.display())))
                    }
                })
                .and_then(|()| sys::renameat(self.dir.as_fd(), &self.temp, &self.name).map_err(|e| io_status(&format!("rename to {}", path.display()), &e)));
        if done.is_err() {
            self.discard();
        }
        done
    }
}

/// The copies in progress, by destination.
#[derive(Default)]
pub struct Copies {
    partial: Mutex<HashMap<PathBuf, Partial>>,
}

impl Copies {
    pub fn copy_file(&self, req: &CopyFileRequest) -> ttrpc::Result<()> {
        let path = checked_path(&req.path)?;
        let (uid, gid) = (owner(req.uid), owner(req.gid));
        let mode = req.file_mode & 0o7777;
        match req.file_mode & S_IFMT {
            S_IFDIR => {
                let (dir, name) = open_parent(&path, req.dir_mode)?;
                make_dir(&dir, &name, &path, mode, uid, gid)
            }
            S_IFLNK => {
                let target = std::str::from_utf8(&req.data)
                    .ok()
                    .and_then(|t| CString::new(t).ok())
                    .ok_or_else(|| status(Code::INVALID_ARGUMENT, "symbolic link target is not UTF-8 without NUL"))?;
                let (dir, name) = open_parent(&path, req.dir_mode)?;
                make_symlink(&dir, &name, &path, &target, uid, gid)
            }
            0 | S_IFREG => self.chunk(req, &path, mode, uid, gid),
            other => Err(status(Code::INVALID_ARGUMENT, format!("CopyFile of file type {:o} is not supported", other))),
        }
    }

    fn chunk(&self, req: &CopyFileRequest, path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> ttrpc::Result<()> {
        let size = u64::try_from(req.file_size).map_err(|_| status(Code::INVALID_ARGUMENT, "negative file_size"))?;
        let offset = u64::try_from(req.offset).map_err(|_| status(Code::INVALID_ARGUMENT, "negative offset"))?;
        let end = offset
            .checked_add(req.data.len() as u64)
            .filter(|end| *end <= size)
            .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("chunk at offset {offset} of {} bytes runs past file_size {size}", req.data.len())))?;
        let mut copies = lock(&self.partial);
        if offset == 0 {
            // The first chunk starts a new copy (and discards a stale one).
            if let Some(stale) = copies.remove(path) {
                stale.discard();
            }
            if copies.len() >= MAX_COPIES {
                let oldest = copies.iter().min_by_key(|(_, p)| p.touched).map(|(k, _)| k.clone());
                if let Some(p) = oldest.and_then(|k| copies.remove(&k)) {
                    p.discard();
                }
            }
            copies.insert(path.to_path_buf(), start_copy(path, size, req.dir_mode)?);
        }
        let Some(p) = copies.get_mut(path) else {
            return Err(status(
                Code::FAILED_PRECONDITION,
                format!("chunk at offset {offset} for {} but no copy in progress (send offset 0 first)", path.display()),
            ));
        };
        if p.size != size {
            return Err(status(Code::INVALID_ARGUMENT, format!("chunk for {} says file_size {size}; the copy in progress has {}", path.display(), p.size)));
        }
        p.touched = Instant::now();
        p.file.write_all_at(&req.data, offset).map_err(|e| io_status(&format!("write {}", temp_path(path).display()), &e))?;
        if !p.received.insert(offset, end) {
            if let Some(p) = copies.remove(path) {
                p.discard();
            }
            return Err(status(Code::RESOURCE_EXHAUSTED, format!("copy to {} abandoned: more than {MAX_RANGES} separate pieces", path.display())));
        }
        if !p.received.covers(size) {
            // Some bytes have not come yet: wait for their chunks.
            return Ok(());
        }
        let p = copies.remove(path).expect("the copy is in the table");
        drop(copies);
        p.finish(path, mode, uid, gid)
    }
}

/// Opens the parent of `path` and the temporary file of a new copy in it
/// (a leftover of that name is replaced, never written through).
fn start_copy(path: &Path, size: u64, dir_mode: u32) -> ttrpc::Result<Partial> {
    let (dir, name) = open_parent(path, dir_mode)?;
    let temp_path = temp_path(path);
    let temp = cstring(temp_path.file_name().expect("a temp name"))?;
    match sys::unlinkat(dir.as_fd(), &temp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_status(&format!("remove {}", temp_path.display()), &e)),
    }
    let file = sys::openat(Some(dir.as_fd()), &temp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW, 0o600)
        .map_err(|e| io_status(&format!("create {}", temp_path.display()), &e))?;
    Ok(Partial { size, dir, name, temp, file: File::from(file), received: Ranges::default(), touched: Instant::now() })
}

/// Walks to the parent of `path` from `/` one component at a time, creating missing
/// directories with `dir_mode` (0: 0755) and following no symbolic link; returns the
/// open parent and the last component.
fn open_parent(path: &Path, dir_mode: u32) -> ttrpc::Result<(OwnedFd, CString)> {
    let dir_mode = if dir_mode == 0 { 0o755 } else { dir_mode & 0o7777 };
    let refuse = |walked: &Path, what: &str| status(Code::FAILED_PRECONDITION, format!("CopyFile path {}: {} {what}", path.display(), walked.display()));
    let dir = open_dirs(path.parent().unwrap_or(Path::new("/")), dir_mode, false).map_err(|e| match e {
        WalkError::Symlink(w) => refuse(&w, "is a symbolic link; CopyFile follows no links in the guest (give the path it resolves to)"),
        WalkError::NotDir(w) => refuse(&w, "is not a directory"),
        WalkError::Io { op: "mkdir", walked, error } => io_status(&format!("create {}", walked.display()), &error),
        WalkError::Io { walked, error, .. } => io_status(&format!("open {}", walked.display()), &error),
    })?;
    let name = cstring(path.file_name().expect("checked_path names a file"))?;
    Ok((dir, name))
}

/// The refusal of a path whose component `walked` is a symlink or no directory.
fn not_a_directory(parent: &OwnedFd, name: &CStr, path: &Path, walked: &Path) -> ttrpc::Error {
    let what = match sys::lstatat(parent.as_fd(), name) {
        Ok((S_IFLNK, _, _)) => "is a symbolic link; CopyFile follows no links in the guest (give the path it resolves to)",
        _ => "is not a directory",
    };
    status(Code::FAILED_PRECONDITION, format!("CopyFile path {}: {} {what}", path.display(), walked.display()))
}

/// S_IFDIR: the directory `name` in `dir` (kept if it exists), owner then mode.
fn make_dir(dir: &OwnedFd, name: &CStr, path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> ttrpc::Result<()> {
    match sys::mkdirat(dir.as_fd(), name, mode) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(io_status(&format!("mkdir {}", path.display()), &e)),
    }
    let fd = sys::openat(Some(dir.as_fd()), name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTDIR | libc::ELOOP) => not_a_directory(dir, name, path, path),
        _ => io_status(&format!("open {}", path.display()), &e),
    })?;
    let made = File::from(fd);
    std::os::unix::fs::fchown(&made, uid, gid).map_err(|e| io_status(&format!("chown {}", path.display()), &e))?;
    made.set_permissions(std::fs::Permissions::from_mode(mode)).map_err(|e| io_status(&format!("chmod {}", path.display()), &e))
}

/// S_IFLNK: `name` in `dir` becomes a link to `target` (replacing a link).
fn make_symlink(dir: &OwnedFd, name: &CStr, path: &Path, target: &CStr, uid: Option<u32>, gid: Option<u32>) -> ttrpc::Result<()> {
    if matches!(sys::lstatat(dir.as_fd(), name), Ok((S_IFLNK, _, _))) {
        sys::unlinkat(dir.as_fd(), name).map_err(|e| io_status(&format!("unlink {}", path.display()), &e))?;
    }
    sys::symlinkat(target, dir.as_fd(), name).map_err(|e| io_status(&format!("symlink {}", path.display()), &e))?;
    sys::lchownat(dir.as_fd(), name, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)).map_err(|e| io_status(&format!("chown {}", path.display()), &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(checked_path("/etc/x").unwrap(), PathBuf::from("/etc/x"));
        assert_eq!(checked_path("/etc//./x").unwrap(), PathBuf::from("/etc/x"));
        for bad in ["etc/x", "/etc/../x", "/..", "/", "", "/a\0b"] {
            assert!(checked_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(temp_path(Path::new("/a/b.txt")), PathBuf::from("/a/.b.txt.osb-copy"));
    }

    #[test]
    fn ranges_merge_and_cover() {
        let mut r = Ranges::default();
        assert!(r.covers(0) && !r.covers(1));
        assert!(r.insert(6, 9));
        assert!(r.insert(0, 3));
        assert!(r.insert(2, 2)); // empty
        assert_eq!(r.0, [(0, 3), (6, 9)]);
        assert!(!r.covers(9), "a hole at 3..6");
        assert!(r.insert(3, 4)); // touches the first
        assert_eq!(r.0, [(0, 4), (6, 9)]);
        assert!(r.insert(1, 7)); // bridges both
        assert_eq!(r.0, [(0, 9)]);
        assert!(r.covers(9));

        let mut many = Ranges::default();
        for i in 0..MAX_RANGES as u64 {
            assert!(many.insert(2 * i, 2 * i + 1));
        }
        assert!(!many.insert(u64::MAX - 1, u64::MAX), "one range too many");
        assert!(many.insert(1, 2), "a piece that merges is always taken");
        assert_eq!(many.0.len(), MAX_RANGES - 1);
    }
}
