//! CopyFile with Kata's semantics: the host sends a file in chunks (path, file_size,
//! file_mode, dir_mode, uid, gid, offset, data); the agent writes them to a temporary
//! file beside the destination and renames it into place with the chunk that reaches
//! `file_size`. Parent directories are created with `dir_mode`. A `file_mode` with
//! S_IFDIR makes a directory, with S_IFLNK a symbolic link to the target in `data`.
//!
//! Unlike Kata (which only accepts paths below /run/kata-containers) any absolute path
//! in the guest is accepted, but never a relative one or one with `..` components.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use ttrpc::Code;

use super::call::{io_status, status};
use super::sys;
use crate::proto::agent::CopyFileRequest;

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;
const S_IFLNK: u32 = libc::S_IFLNK;
const S_IFREG: u32 = libc::S_IFREG;

/// The destination, checked: absolute, no `..`, not `/`.
pub fn checked_path(path: &str) -> ttrpc::Result<PathBuf> {
    let bad = |why: &str| {
        status(
            Code::INVALID_ARGUMENT,
            format!("CopyFile path {path:?}: {why}"),
        )
    };
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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.osb-copy"))
}

fn owner(id: i32) -> u32 {
    // -1 (as in chown(2)) leaves the owner alone.
    if id < 0 {
        u32::MAX
    } else {
        id as u32
    }
}

pub fn copy_file(req: &CopyFileRequest) -> ttrpc::Result<()> {
    let path = checked_path(&req.path)?;
    let (uid, gid) = (owner(req.uid), owner(req.gid));
    let mode = req.file_mode & 0o7777;
    if let Some(parent) = path.parent() {
        if !parent.is_dir() {
            let dir_mode = if req.dir_mode == 0 {
                0o755
            } else {
                req.dir_mode & 0o7777
            };
            DirBuilder::new()
                .recursive(true)
                .mode(dir_mode)
                .create(parent)
                .map_err(|e| io_status(&format!("create {}", parent.display()), &e))?;
        }
    }
    match req.file_mode & S_IFMT {
        S_IFDIR => {
            match DirBuilder::new().mode(mode).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
                Err(e) => return Err(io_status(&format!("mkdir {}", path.display()), &e)),
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_status(&format!("chmod {}", path.display()), &e))?;
            sys::lchown(&path, uid, gid)
                .map_err(|e| io_status(&format!("chown {}", path.display()), &e))
        }
        S_IFLNK => {
            let target = std::str::from_utf8(&req.data)
                .map_err(|_| status(Code::INVALID_ARGUMENT, "symbolic link target is not UTF-8"))?;
            if path
                .symlink_metadata()
                .is_ok_and(|m| m.file_type().is_symlink())
            {
                std::fs::remove_file(&path)
                    .map_err(|e| io_status(&format!("unlink {}", path.display()), &e))?;
            }
            std::os::unix::fs::symlink(target, &path)
                .map_err(|e| io_status(&format!("symlink {}", path.display()), &e))?;
            sys::lchown(&path, uid, gid)
                .map_err(|e| io_status(&format!("chown {}", path.display()), &e))
        }
        0 | S_IFREG => copy_chunk(req, &path, mode, uid, gid),
        other => Err(status(
            Code::INVALID_ARGUMENT,
            format!("CopyFile of file type {:o} is not supported", other),
        )),
    }
}

fn copy_chunk(
    req: &CopyFileRequest,
    path: &Path,
    mode: u32,
    uid: u32,
    gid: u32,
) -> ttrpc::Result<()> {
    let size = u64::try_from(req.file_size)
        .map_err(|_| status(Code::INVALID_ARGUMENT, "negative file_size"))?;
    let offset =
        u64::try_from(req.offset).map_err(|_| status(Code::INVALID_ARGUMENT, "negative offset"))?;
    let end = offset
        .checked_add(req.data.len() as u64)
        .filter(|end| *end <= size)
        .ok_or_else(|| {
            status(
                Code::INVALID_ARGUMENT,
                format!(
                    "chunk at offset {offset} of {} bytes runs past file_size {size}",
                    req.data.len()
                ),
            )
        })?;
    let temp = temp_path(path);
    let mut open = OpenOptions::new();
    open.write(true).mode(0o600).custom_flags(libc::O_NOFOLLOW);
    if offset == 0 {
        // The first chunk starts a new copy (and discards a stale one).
        open.create(true).truncate(true);
    }
    let file = open.open(&temp).map_err(|e| {
        if offset > 0 && e.kind() == std::io::ErrorKind::NotFound {
            status(
                Code::FAILED_PRECONDITION,
                format!(
                    "chunk at offset {offset} for {} but no copy in progress (send offset 0 first)",
                    path.display()
                ),
            )
        } else {
            io_status(&format!("open {}", temp.display()), &e)
        }
    })?;
    file.write_all_at(&req.data, offset)
        .map_err(|e| io_status(&format!("write {}", temp.display()), &e))?;
    if end < size {
        return Ok(());
    }
    let written = file.metadata().map_err(|e| io_status("stat", &e))?.len();
    if written != size {
        // A chunk is missing (chunks came out of order): wait for it.
        return Ok(());
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_status(&format!("chmod {}", temp.display()), &e))?;
    sys::lchown(&temp, uid, gid)
        .map_err(|e| io_status(&format!("chown {}", temp.display()), &e))?;
    drop(file);
    std::fs::rename(&temp, path)
        .map_err(|e| io_status(&format!("rename to {}", path.display()), &e))
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
        assert_eq!(
            temp_path(Path::new("/a/b.txt")),
            PathBuf::from("/a/.b.txt.osb-copy")
        );
    }
}
