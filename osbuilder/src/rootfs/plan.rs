//! The layout plan every format writer reads.
//!
//! A [`Tree`] is an arena whose indices say nothing about order, and hard
//! links are two names for one arena slot. Writers need more than that, and
//! need it settled before the first byte is written (so errors come before
//! output, and so two-phase writers can reserve every range): a stable inode
//! numbering, the link count of every inode, which name of a hard-linked file
//! comes last in the walk (cpio puts the data there), and a directory-by-
//! directory view with each directory's parent (`..`), its sorted children and
//! what they add up to. [`Plan::new`] computes all of it in one sorted
//! depth-first walk; writers then map [`PlanIno`] to their own numbers (cpio
//! from 1, ext4 from its first non-reserved inode, erofs by offset).
//!
//! The plan borrows names from the tree instead of copying them, and
//! [`Plan::walk_paths`] hands out full paths from one reused buffer, so
//! planning a 100,000-entry tree allocates per directory, not per name.

use std::collections::btree_map;

use super::{Body, Dentry, InodeIdx, Tree};

type ChildIter<'t> = btree_map::Iter<'t, Vec<u8>, Dentry>;

/// An inode's number in the plan: dense, from 0 (the root), in the order the
/// sorted depth-first walk first reaches each inode (so the initrd's cpio
/// inode numbers, plan number + 1, are what they always were).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PlanIno(u32);

impl PlanIno {
    pub const ROOT: PlanIno = PlanIno(0);

    pub fn index(self) -> usize {
        self.0 as usize
    }

    pub fn get(self) -> u32 {
        self.0
    }

    /// The inode at position `i` of [`Plan::inodes`] (every position below
    /// its length is one: the numbers are dense).
    pub fn from_index(i: usize) -> PlanIno {
        PlanIno(u32::try_from(i).expect("plan positions fit u32"))
    }
}

/// Index of a directory in [`Plan::dirs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DirIdx(u32);

impl DirIdx {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// One inode of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedInode {
    /// Where the inode lives in the tree.
    pub idx: InodeIdx,
    /// The link count a filesystem records: the number of names for
    /// non-directories, 2 plus the number of subdirectories for directories.
    pub nlink: u32,
    /// The position, in [`Plan::walk_paths`] order, of this inode's last name
    /// (0 for the root, which has no name).
    pub last_name: u64,
    /// The directory's entry in [`Plan::dirs`], for directories.
    pub dir: Option<DirIdx>,
}

/// A name in a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanEntry<'t> {
    pub name: &'t [u8],
    pub ino: PlanIno,
}

/// One directory with its sorted children.
#[derive(Clone, Debug)]
pub struct PlannedDir<'t> {
    pub ino: PlanIno,
    /// The directory's parent (`..`); the root is its own parent.
    pub parent: PlanIno,
    /// Children in byte order of their names (no `.` or `..`).
    pub entries: Vec<PlanEntry<'t>>,
    /// How many of the children are directories.
    pub subdirs: u32,
    /// The sum of the children's name lengths.
    pub name_bytes: u64,
}

/// Errors that make a tree unplannable.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the tree has more than 4 billion inodes")]
    TooManyInodes,
    #[error("/{path} has more than 4 billion links")]
    TooManyLinks { path: String },
    #[error("directory /{path} is reachable under two names; directories cannot be hard links")]
    DirectoryLinkedTwice { path: String },
}

/// Totals over the planned inodes (each hard-linked inode counted once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanTotals {
    /// Names in the tree, the root excluded.
    pub names: u64,
    pub dirs: u64,
    pub files: u64,
    pub symlinks: u64,
    /// Devices, fifos and sockets.
    pub special: u64,
    pub file_bytes: u64,
    /// Bytes of symlink targets.
    pub symlink_bytes: u64,
    pub with_xattrs: u64,
}

/// The settled shape of a tree; see the module documentation.
#[derive(Debug)]
pub struct Plan<'t> {
    tree: &'t Tree,
    inodes: Vec<PlannedInode>,
    dirs: Vec<PlannedDir<'t>>,
    totals: PlanTotals,
}

impl<'t> Plan<'t> {
    pub fn new(tree: &'t Tree) -> Result<Self, PlanError> {
        let mut plan = Plan { tree, inodes: Vec::new(), dirs: Vec::new(), totals: PlanTotals::default() };
        // Arena slot -> plan number, filled as the walk first reaches each inode.
        let mut ino_of: Vec<Option<PlanIno>> = vec![None; tree.inodes.len()];
        let root = plan.number(InodeIdx::ROOT, &mut ino_of)?;
        // Depth-first with an explicit stack of (directory, its remaining
        // children): deep trees cannot overflow the thread's stack.
        let mut stack = vec![plan.open_dir(root, root)?];
        let mut seq = 0u64;
        while let Some((dir, children)) = stack.last_mut() {
            let dir = *dir;
            let Some((name, dentry)) = children.next() else {
                stack.pop();
                continue;
            };
            seq += 1;
            let child = plan.number(dentry.inode, &mut ino_of)?;
            let is_dir = matches!(tree.inode(dentry.inode).body, Body::Dir(_));
            let parent = &mut plan.dirs[dir.index()];
            parent.entries.push(PlanEntry { name: name.as_slice(), ino: child });
            parent.name_bytes += name.len() as u64;
            let parent_ino = parent.ino;
            if is_dir {
                parent.subdirs += 1;
                let p = &mut plan.inodes[parent_ino.index()];
                p.nlink = p.nlink.saturating_add(1);
                if plan.inodes[child.index()].dir.is_some() {
                    return Err(PlanError::DirectoryLinkedTwice { path: plan.path_of_seq(seq) });
                }
                plan.inodes[child.index()].last_name = seq;
                stack.push(plan.open_dir(child, parent_ino)?);
            } else {
                let planned = &mut plan.inodes[child.index()];
                planned.last_name = seq;
                match planned.nlink.checked_add(1) {
                    Some(n) => planned.nlink = n,
                    None => return Err(PlanError::TooManyLinks { path: plan.path_of_seq(seq) }),
                }
            }
        }
        plan.totals.names = seq;
        Ok(plan)
    }

    /// Numbers `idx` if the walk has not reached it before.
    fn number(&mut self, idx: InodeIdx, ino_of: &mut [Option<PlanIno>]) -> Result<PlanIno, PlanError> {
        if let Some(ino) = ino_of[idx.index()] {
            return Ok(ino);
        }
        let ino = PlanIno(u32::try_from(self.inodes.len()).map_err(|_| PlanError::TooManyInodes)?);
        ino_of[idx.index()] = Some(ino);
        self.inodes.push(PlannedInode { idx, nlink: 0, last_name: 0, dir: None });
        let inode = self.tree.inode(idx);
        let t = &mut self.totals;
        match &inode.body {
            Body::Dir(_) => t.dirs += 1,
            Body::File(content) => {
                t.files += 1;
                t.file_bytes += content.len();
            }
            Body::Symlink(target) => {
                t.symlinks += 1;
                t.symlink_bytes += target.len() as u64;
            }
            _ => t.special += 1,
        }
        if !inode.meta.xattrs.is_empty() {
            t.with_xattrs += 1;
        }
        Ok(ino)
    }

    /// Starts directory `ino`: its entry in `dirs`, and its children to walk.
    #[allow(clippy::type_complexity)]
    fn open_dir(&mut self, ino: PlanIno, parent: PlanIno) -> Result<(DirIdx, ChildIter<'t>), PlanError> {
        let tree = self.tree;
        let Body::Dir(children) = &tree.inode(self.inodes[ino.index()].idx).body else { unreachable!("open_dir on a directory") };
        let dir = DirIdx(u32::try_from(self.dirs.len()).map_err(|_| PlanError::TooManyInodes)?);
        self.dirs.push(PlannedDir { ino, parent, entries: Vec::with_capacity(children.len()), subdirs: 0, name_bytes: 0 });
        let planned = &mut self.inodes[ino.index()];
        planned.dir = Some(dir);
        planned.nlink = 2;
        Ok((dir, children.iter()))
    }

    /// The path of the name at walk position `seq` (for error messages only).
    fn path_of_seq(&self, seq: u64) -> String {
        let mut found = String::new();
        self.walk_paths(|path, s, _| {
            if s == seq {
                found = String::from_utf8_lossy(path).into_owned();
            }
        });
        found
    }

    pub fn tree(&self) -> &'t Tree {
        self.tree
    }

    /// Every inode, indexed by [`PlanIno::index`].
    pub fn inodes(&self) -> &[PlannedInode] {
        &self.inodes
    }

    pub fn inode(&self, ino: PlanIno) -> &PlannedInode {
        &self.inodes[ino.index()]
    }

    /// The tree's inode behind a plan number.
    pub fn tree_inode(&self, ino: PlanIno) -> &'t super::Inode {
        self.tree.inode(self.inodes[ino.index()].idx)
    }

    /// Every directory, the root first, in the order the walk opens them.
    pub fn dirs(&self) -> &[PlannedDir<'t>] {
        &self.dirs
    }

    pub fn dir(&self, dir: DirIdx) -> &PlannedDir<'t> {
        &self.dirs[dir.index()]
    }

    pub fn totals(&self) -> PlanTotals {
        self.totals
    }

    /// The first path of `ino` in walk order (no leading `/`), for error
    /// messages: a whole walk, so only on the error path.
    pub fn path_of(&self, ino: PlanIno) -> String {
        let mut found = None;
        self.walk_paths(|path, _, i| {
            if i == ino && found.is_none() {
                found = Some(String::from_utf8_lossy(path).into_owned());
            }
        });
        found.unwrap_or_default()
    }

    /// Calls `visit(path, seq, ino)` for every name in sorted depth-first
    /// order (a directory before its children), starting with the root as
    /// the empty path at position 0. `path` has no leading `/` and lives in
    /// one buffer reused between calls.
    pub fn walk_paths(&self, mut visit: impl FnMut(&[u8], u64, PlanIno)) {
        visit(b"", 0, PlanIno::ROOT);
        let mut seq = 0u64;
        let mut path = Vec::with_capacity(256);
        let root_dir = self.inodes[0].dir.expect("the root is a directory");
        // (directory, next child, path length before this directory's names)
        let mut stack = vec![(root_dir, 0usize, 0usize)];
        while let Some((dir, pos, base)) = stack.last_mut() {
            let Some(entry) = self.dirs[dir.index()].entries.get(*pos) else {
                stack.pop();
                continue;
            };
            *pos += 1;
            let base = *base;
            path.truncate(base);
            if base > 0 {
                path.push(b'/');
            }
            path.extend_from_slice(entry.name);
            seq += 1;
            visit(&path, seq, entry.ino);
            let planned = &self.inodes[entry.ino.index()];
            if let Some(sub) = planned.dir.filter(|_| planned.last_name == seq) {
                let len = path.len();
                stack.push((sub, 0, len));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::RelPath;

    fn tree() -> Tree {
        let mut tree = Tree::new();
        let p = |s: &str| RelPath::parse_user(s).unwrap();
        tree.add_bytes(&p("/b/two"), b"22".to_vec(), 0o644, 0).unwrap();
        tree.add_bytes(&p("/a/one"), b"1".to_vec(), 0o644, 0).unwrap();
        tree.add_bytes(&p("/a/sub/deep"), b"333".to_vec(), 0o600, 0).unwrap();
        // A hard link: /b/link names /a/one's inode.
        let one = tree.lookup(&p("a/one")).unwrap();
        let b = tree.lookup(&p("b")).unwrap();
        tree.dir_entries_mut(b).unwrap().insert(b"link".to_vec(), Dentry { inode: one, layer: 0 });
        tree
    }

    #[test]
    fn numbering_links_and_directories() {
        let tree = tree();
        let plan = Plan::new(&tree).unwrap();
        let mut walked = Vec::new();
        plan.walk_paths(|path, seq, ino| walked.push((String::from_utf8(path.to_vec()).unwrap(), seq, ino.get())));
        let expected = [("", 0, 0), ("a", 1, 1), ("a/one", 2, 2), ("a/sub", 3, 3), ("a/sub/deep", 4, 4), ("b", 5, 5), ("b/link", 6, 2), ("b/two", 7, 6)];
        let expected: Vec<_> = expected.iter().map(|(p, s, i)| (p.to_string(), *s, *i)).collect();
        assert_eq!(walked, expected);
        // The same order as the tree's own walk.
        let names: Vec<_> = tree.walk().into_iter().map(|(p, _)| String::from_utf8(p).unwrap()).collect();
        assert_eq!(names, walked.iter().map(|w| w.0.clone()).collect::<Vec<_>>());

        let one = plan.inode(PlanIno(2));
        assert_eq!((one.nlink, one.last_name, one.dir), (2, 6, None), "hard link: two names, data on the last");
        let root = plan.inode(PlanIno::ROOT);
        assert_eq!(root.nlink, 4, "2 + subdirectories a and b");
        let a = plan.dir(plan.inode(PlanIno(1)).dir.unwrap());
        assert_eq!((a.parent, a.subdirs, a.name_bytes, a.entries.len()), (PlanIno::ROOT, 1, 6, 2));
        let sub = plan.dir(plan.inode(PlanIno(3)).dir.unwrap());
        assert_eq!(sub.parent, PlanIno(1), "`..` of a/sub is a");
        assert_eq!(plan.dirs()[0].ino, PlanIno::ROOT);
        assert_eq!(plan.dirs()[0].parent, PlanIno::ROOT, "the root is its own parent");
        let t = plan.totals();
        assert_eq!((t.names, t.dirs, t.files, t.file_bytes), (7, 4, 3, 6), "{t:?}");
    }

    #[test]
    fn a_directory_reached_twice_is_refused() {
        let mut tree = tree();
        let a = tree.lookup(&RelPath::parse_user("a").unwrap()).unwrap();
        let b = tree.lookup(&RelPath::parse_user("b").unwrap()).unwrap();
        tree.dir_entries_mut(b).unwrap().insert(b"again".to_vec(), Dentry { inode: a, layer: 0 });
        let err = Plan::new(&tree).unwrap_err();
        assert!(matches!(&err, PlanError::DirectoryLinkedTwice { path } if path == "b/again"), "{err}");
    }

    #[test]
    fn deep_trees_do_not_recurse() {
        // Deeper than any path a layer could name: built directly.
        let mut tree = Tree::new();
        let mut dir = InodeIdx::ROOT;
        for _ in 0..5000 {
            tree.put(dir, b"d", crate::rootfs::Metadata::implicit_dir(), Body::Dir(Default::default()), 0);
            dir = tree.dir_entries(dir).unwrap()[&b"d".to_vec()].inode;
        }
        let deep_len = 5000 * 2 - 1;
        let plan = Plan::new(&tree).unwrap();
        let mut deepest = 0;
        plan.walk_paths(|path, _, _| deepest = deepest.max(path.len()));
        assert_eq!(deepest, deep_len);
        assert_eq!(plan.totals().dirs, 5001);
    }
}
