//! Adding files from the host to the tree (`--add SRC:DEST[:MODE]`), the way
//! init, agent and configuration files get into a guest image.
//!
//! Added entries are owned by root and take the mtime given by the caller
//! (the build's SOURCE_DATE_EPOCH), never the host file's, so an image built
//! from the same inputs on another machine is identical.

use std::fs;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{Body, Content, InodeIdx, Metadata, RelPath, Tree};

#[derive(Debug, thiserror::Error)]
pub enum HostAddError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot add {path}: {what} files are not supported")]
    Unsupported { path: PathBuf, what: &'static str },
    #[error("cannot add at {dest}: {source}")]
    Dest { dest: String, source: super::LayerError },
    #[error("cannot add the root directory itself; give a destination below /")]
    Root,
}

/// The layer number entries added from the host are recorded with: above every
/// image layer, so nothing hides them.
pub const HOST_LAYER: u32 = u32::MAX;

impl Tree {
    /// Adds `src` (a file, symlink or whole directory) at `dest`. `mode`
    /// overrides the permission bits of `src` itself (not of a directory's
    /// children). Parent directories are created `0755 root:root` as needed;
    /// symlinked parents are followed inside the root, as for layers.
    pub fn add_host_path(&mut self, src: &Path, dest: &RelPath, mode: Option<u32>, mtime: i64) -> Result<(), HostAddError> {
        let (parent, name) = dest.split_last().ok_or(HostAddError::Root)?;
        let shown = dest.to_string();
        let dir = self.resolve_dir(&parent, &shown, HOST_LAYER).map_err(|source| HostAddError::Dest { dest: shown.clone(), source })?;
        self.add_host_entry(src, dir, name, mode, mtime)
    }

    fn add_host_entry(&mut self, src: &Path, dir: InodeIdx, name: &[u8], mode: Option<u32>, mtime: i64) -> Result<(), HostAddError> {
        let read_err = |source| HostAddError::Read { path: src.to_path_buf(), source };
        let md = fs::symlink_metadata(src).map_err(read_err)?;
        let ft = md.file_type();
        let perm = mode.unwrap_or(md.permissions().mode() & 0o7777);
        let meta = Metadata::new(perm, 0, 0, mtime);
        let body = if ft.is_file() {
            Body::File(Content::Host { path: src.to_path_buf(), len: md.len() })
        } else if ft.is_symlink() {
            let target = fs::read_link(src).map_err(read_err)?;
            Body::Symlink(std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str()).to_vec())
        } else if ft.is_dir() {
            self.put(dir, name, meta, Body::Dir(Default::default()), HOST_LAYER);
            let idx = self.dir_entries(dir).and_then(|e| e.get(name)).expect("just added").inode;
            let mut children: Vec<_> = fs::read_dir(src).map_err(read_err)?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>().map_err(read_err)?;
            children.sort();
            for child in children {
                let child_name = std::os::unix::ffi::OsStrExt::as_bytes(child.as_os_str()).to_vec();
                self.add_host_entry(&src.join(&child), idx, &child_name, None, mtime)?;
            }
            return Ok(());
        } else if ft.is_fifo() {
            Body::Fifo
        } else {
            let what = if ft.is_socket() { "socket" } else { "device" };
            // Device nodes come from image layers; copying the host's own
            // would make the output depend on the build machine.
            return Err(HostAddError::Unsupported { path: src.to_path_buf(), what });
        };
        self.put(dir, name, meta, body, HOST_LAYER);
        Ok(())
    }

    /// Adds a file whose content is given in memory (a generated config).
    pub fn add_bytes(&mut self, dest: &RelPath, data: Vec<u8>, mode: u32, mtime: i64) -> Result<(), HostAddError> {
        let (parent, name) = dest.split_last().ok_or(HostAddError::Root)?;
        let shown = dest.to_string();
        let dir = self.resolve_dir(&parent, &shown, HOST_LAYER).map_err(|source| HostAddError::Dest { dest: shown.clone(), source })?;
        self.put(dir, name, Metadata::new(mode, 0, 0, mtime), Body::File(Content::Inline(Arc::from(data))), HOST_LAYER);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn adds_files_dirs_and_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("d")).unwrap();
        fs::write(tmp.path().join("d/b"), "bee").unwrap();
        fs::write(tmp.path().join("d/a"), "ay").unwrap();
        std::os::unix::fs::symlink("a", tmp.path().join("d/link")).unwrap();
        fs::write(tmp.path().join("init"), "#!init").unwrap();

        let mut tree = Tree::new();
        tree.add_host_path(&tmp.path().join("init"), &RelPath::parse_user("/sbin/init").unwrap(), Some(0o755), 7).unwrap();
        tree.add_host_path(&tmp.path().join("d"), &RelPath::parse_user("/opt/d").unwrap(), None, 7).unwrap();
        tree.add_bytes(&RelPath::parse_user("etc/x.json").unwrap(), b"{}".to_vec(), 0o600, 7).unwrap();

        let names: Vec<String> = tree.walk().into_iter().map(|(p, _)| String::from_utf8(p).unwrap()).collect();
        assert_eq!(names, ["", "etc", "etc/x.json", "opt", "opt/d", "opt/d/a", "opt/d/b", "opt/d/link", "sbin", "sbin/init"]);
        let init = tree.inode(tree.lookup(&RelPath::parse_user("sbin/init").unwrap()).unwrap());
        assert_eq!((init.meta.mode, init.meta.uid, init.meta.mtime), (0o755, 0, 7));
        let Body::File(c) = &init.body else { panic!("not a file") };
        let mut s = String::new();
        tree.open_content(c).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "#!init");
        assert!(tree.add_host_path(&tmp.path().join("nope"), &RelPath::parse_user("x").unwrap(), None, 0).is_err());
        assert!(matches!(tree.add_host_path(tmp.path(), &RelPath::root(), None, 0), Err(HostAddError::Root)));
    }

    #[test]
    fn remove_drops_subtrees() {
        let mut tree = Tree::new();
        tree.add_bytes(&RelPath::parse_user("a/b/c").unwrap(), vec![], 0o644, 0).unwrap();
        tree.add_bytes(&RelPath::parse_user("a/d").unwrap(), vec![], 0o644, 0).unwrap();
        assert!(tree.remove(&RelPath::parse_user("a/b").unwrap()));
        assert!(!tree.remove(&RelPath::parse_user("a/b").unwrap()));
        assert_eq!(tree.stats().entries, 3);
    }

    #[test]
    fn remove_follows_symlinked_parents_but_not_the_last_name() {
        // Debian's merged /usr: /bin -> usr/bin.
        let mut tree = Tree::new();
        tree.add_bytes(&RelPath::parse_user("usr/bin/ls").unwrap(), vec![], 0o755, 0).unwrap();
        tree.add_bytes(&RelPath::parse_user("usr/bin/cat").unwrap(), vec![], 0o755, 0).unwrap();
        let usr = tree.lookup(&RelPath::parse_user("usr").unwrap()).unwrap();
        tree.put(usr, b"up", Metadata::new(0o777, 0, 0, 0), Body::Symlink(b"../../..".to_vec()), HOST_LAYER);
        tree.put(InodeIdx::ROOT, b"bin", Metadata::new(0o777, 0, 0, 0), Body::Symlink(b"usr/bin".to_vec()), HOST_LAYER);
        let path = |p: &str| RelPath::parse_user(p).unwrap();
        assert!(tree.remove(&path("/bin/ls")));
        assert!(tree.lookup(&path("usr/bin/ls")).is_none(), "/bin/ls is /usr/bin/ls");
        assert!(!tree.remove(&path("/bin/ls")));
        assert!(!tree.remove(&path("/nonexistent")));
        assert!(!tree.remove(&path("/bin/cat/x")), "a file is no parent");
        // `..` at the root stays there.
        assert!(tree.remove(&path("/usr/up/bin/cat")));
        assert!(tree.lookup(&path("usr/bin/cat")).is_none());
        // The last name is not followed: removing /bin removes the link.
        assert!(tree.remove(&path("/bin")));
        assert!(tree.lookup(&path("bin")).is_none() && tree.lookup(&path("usr/bin")).is_some());
    }
}
