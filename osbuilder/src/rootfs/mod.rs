//! The in-memory model of a guest root filesystem.
//!
//! Every output format (cpio today; tar, ext4 and erofs next) is written from this
//! one model, so it records everything those formats can carry: the kind of each
//! entry, its permission bits, owner, mtime, xattrs and, for regular files, a
//! reference to where the bytes live. Nothing is unpacked onto the host, so
//! ownership, device nodes and setuid bits are exact without root.
//!
//! The tree is an arena of inodes with directories mapping names to inode
//! indices, so hard links are two names for one inode, as on a real filesystem.
//! Directory entries are kept in a `BTreeMap` keyed by the raw name bytes: every
//! walk is in sorted order, which is what makes outputs reproducible.

mod content;
mod host;
mod layer;
mod path;
mod plan;
mod tarstream;

use std::collections::BTreeMap;

pub use content::{default_spool_dir, Content, ContentReader, SpoolWriter};
pub use host::HostAddError;
pub use layer::{Intake, LayerError, LayerStats, Limits, MAX_XATTR_BYTES, RATIO_FLOOR};
pub use path::{excerpt, PathError, RelPath};
pub use plan::{DirIdx, Plan, PlanEntry, PlanError, PlanIno, PlanTotals, PlannedDir, PlannedInode};

/// Index of an inode in a [`Tree`]'s arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeIdx(u32);

impl InodeIdx {
    pub const ROOT: InodeIdx = InodeIdx(0);

    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Ownership, permissions and times of an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Permission bits including setuid, setgid and sticky (`0o7777`); the file
    /// type lives in [`Body`].
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch; may be negative in hostile or odd images.
    pub mtime: i64,
    /// Extended attributes by full name (`security.capability`, `user.foo`).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Metadata {
    pub fn new(mode: u32, uid: u32, gid: u32, mtime: i64) -> Self {
        Metadata { mode: mode & 0o7777, uid, gid, mtime, xattrs: BTreeMap::new() }
    }

    /// The metadata of a directory the builder had to invent (a parent that a
    /// layer or `--add` did not list): `0755 root:root`, mtime 0 (clamped later).
    pub fn implicit_dir() -> Self {
        Metadata::new(0o755, 0, 0, 0)
    }
}

/// What an inode is, with its kind-specific payload.
#[derive(Clone, Debug)]
pub enum Body {
    Dir(BTreeMap<Vec<u8>, Dentry>),
    File(Content),
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl Body {
    pub fn kind_name(&self) -> &'static str {
        match self {
            Body::Dir(_) => "directory",
            Body::File(_) => "regular file",
            Body::Symlink(_) => "symlink",
            Body::CharDevice { .. } => "character device",
            Body::BlockDevice { .. } => "block device",
            Body::Fifo => "fifo",
            Body::Socket => "socket",
        }
    }

    /// The directory-entry file type Linux filesystems store (`FT_*` of
    /// `include/linux/fs_types.h`, the same numbers in ext4 and erofs).
    pub fn dirent_type(&self) -> u8 {
        match self {
            Body::File(_) => 1,
            Body::Dir(_) => 2,
            Body::CharDevice { .. } => 3,
            Body::BlockDevice { .. } => 4,
            Body::Fifo => 5,
            Body::Socket => 6,
            Body::Symlink(_) => 7,
        }
    }

    /// The `S_IFMT` bits of this kind.
    pub fn file_type_bits(&self) -> u32 {
        match self {
            Body::Dir(_) => libc::S_IFDIR,
            Body::File(_) => libc::S_IFREG,
            Body::Symlink(_) => libc::S_IFLNK,
            Body::CharDevice { .. } => libc::S_IFCHR,
            Body::BlockDevice { .. } => libc::S_IFBLK,
            Body::Fifo => libc::S_IFIFO,
            Body::Socket => libc::S_IFSOCK,
        }
    }
}

/// A name in a directory: the inode it points at, and the layer that created it
/// (whiteouts and opaque markers only hide entries of lower layers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    pub inode: InodeIdx,
    pub layer: u32,
}

#[derive(Clone, Debug)]
pub struct Inode {
    pub meta: Metadata,
    pub body: Body,
}

/// The whole guest root: an arena of inodes, index 0 being `/`.
#[derive(Debug)]
pub struct Tree {
    inodes: Vec<Inode>,
    spools: content::Spools,
    /// What the layers applied so far used of their limits.
    usage: layer::Usage,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    pub fn new() -> Self {
        let root = Inode { meta: Metadata::implicit_dir(), body: Body::Dir(BTreeMap::new()) };
        Tree { inodes: vec![root], spools: content::Spools::default(), usage: layer::Usage::default() }
    }

    pub fn inode(&self, idx: InodeIdx) -> &Inode {
        &self.inodes[idx.index()]
    }

    pub fn inode_mut(&mut self, idx: InodeIdx) -> &mut Inode {
        &mut self.inodes[idx.index()]
    }

    pub(crate) fn push_inode(&mut self, inode: Inode) -> InodeIdx {
        let idx = InodeIdx(u32::try_from(self.inodes.len()).expect("more than 4 billion inodes"));
        self.inodes.push(inode);
        idx
    }

    pub fn root(&self) -> &Inode {
        self.inode(InodeIdx::ROOT)
    }

    pub(crate) fn dir_entries(&self, idx: InodeIdx) -> Option<&BTreeMap<Vec<u8>, Dentry>> {
        match &self.inode(idx).body {
            Body::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    pub(crate) fn dir_entries_mut(&mut self, idx: InodeIdx) -> Option<&mut BTreeMap<Vec<u8>, Dentry>> {
        match &mut self.inode_mut(idx).body {
            Body::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    /// Looks a path up without following any symlink (the path is as stored in
    /// the tree). Returns `None` when a component is missing or not a directory.
    pub fn lookup(&self, path: &RelPath) -> Option<InodeIdx> {
        let mut cur = InodeIdx::ROOT;
        for name in path.components() {
            cur = self.dir_entries(cur)?.get(name)?.inode;
        }
        Some(cur)
    }

    /// Opens a regular file's content for reading.
    pub fn open_content(&self, content: &Content) -> std::io::Result<ContentReader> {
        self.spools.open(content)
    }

    /// The runs of `block`-sized blocks of a file that hold a non-zero byte
    /// (`(first block, count)`): disk writers leave the rest as holes, so
    /// sparse files stay sparse whatever the host filesystem did with them.
    pub fn data_runs(&self, content: &Content, block: u64) -> std::io::Result<Vec<(u64, u64)>> {
        content::data_runs(&self.spools.open(content)?, block)
    }

    pub(crate) fn spools_mut(&mut self) -> &mut content::Spools {
        &mut self.spools
    }

    /// Every name in the tree in sorted depth-first order (a directory before
    /// its children), with the inode it names. The root itself is the empty path.
    pub fn walk(&self) -> Vec<(Vec<u8>, InodeIdx)> {
        let mut out = vec![(Vec::new(), InodeIdx::ROOT)];
        self.walk_into(InodeIdx::ROOT, &mut Vec::new(), &mut out);
        out
    }

    fn walk_into(&self, dir: InodeIdx, prefix: &mut Vec<u8>, out: &mut Vec<(Vec<u8>, InodeIdx)>) {
        let Some(entries) = self.dir_entries(dir) else { return };
        for (name, dentry) in entries {
            let len = prefix.len();
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(name);
            out.push((prefix.clone(), dentry.inode));
            if matches!(self.inode(dentry.inode).body, Body::Dir(_)) {
                self.walk_into(dentry.inode, prefix, out);
            }
            prefix.truncate(len);
        }
    }

    /// Removes `path` (and everything below it). Returns whether it existed.
    /// See [`Tree::remove_all`].
    pub fn remove(&mut self, path: &RelPath) -> bool {
        self.remove_all(&[path]) == [true]
    }

    /// Removes every path of `paths` (and everything below each), telling
    /// for each whether it existed. Parents are resolved inside the tree as
    /// for layers and `--add` (Debian's `/bin -> usr/bin` makes `/bin/ls`
    /// `/usr/bin/ls`); the last name is not followed, so a symlink goes, not
    /// what it points at. All paths are resolved before anything is removed,
    /// so removing `/bin` does not change where `/bin/ls` leads.
    pub fn remove_all(&mut self, paths: &[&RelPath]) -> Vec<bool> {
        let found: Vec<Option<(InodeIdx, &[u8])>> = paths
            .iter()
            .map(|path| {
                let (parent, name) = path.split_last()?;
                let dir = self.existing_dir(&parent)?;
                self.dir_entries(dir)?.contains_key(name).then_some((dir, name))
            })
            .collect();
        for &(dir, name) in found.iter().flatten() {
            self.dir_entries_mut(dir).expect("a directory").remove(name);
        }
        found.iter().map(Option::is_some).collect()
    }

    /// Sums what the tree holds: entries by kind and file bytes.
    pub fn stats(&self) -> TreeStats {
        let mut stats = TreeStats::default();
        let mut seen = std::collections::HashSet::new();
        for (_, idx) in self.walk() {
            stats.entries += 1;
            if !seen.insert(idx) {
                stats.hard_links += 1;
                continue;
            }
            match &self.inode(idx).body {
                Body::File(c) => {
                    stats.files += 1;
                    stats.file_bytes += c.len();
                }
                Body::Dir(_) => stats.dirs += 1,
                Body::Symlink(_) => stats.symlinks += 1,
                _ => stats.special += 1,
            }
            if !self.inode(idx).meta.xattrs.is_empty() {
                stats.with_xattrs += 1;
            }
        }
        stats
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub entries: u64,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    pub special: u64,
    pub hard_links: u64,
    pub file_bytes: u64,
    pub with_xattrs: u64,
}
