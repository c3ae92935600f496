//! Applying an OCI layer (a tar stream) to the tree.
//!
//! Semantics follow the OCI image spec's changeset rules: entries replace what
//! lower layers had at the same path, directories merge, `.wh.NAME` deletes
//! `NAME` from lower layers and `.wh..wh..opq` hides everything lower layers put
//! in its directory. Neither touches what the same layer put there, in any
//! entry order: a lower directory this layer put something into stays, with
//! only that (as umoci unpacks it). A whiteout whose parent is missing is a
//! no-op. The `tar` crate parses headers (long names, PAX records); its
//! `unpack` is never used: entries are applied to the model, not the host.
//!
//! Symlinks in parents are followed inside the tree the way the kernel and
//! containerd resolve them under a root: a `..` at the root stays at the root,
//! so no walk can leave it. Hostile input is refused with an error naming the
//! entry: absolute names, `..` in names, hard links to missing targets, and
//! absurd header values.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use tar::EntryType;

use super::path::{PathError, RelPath};
use super::{Body, Dentry, Inode, InodeIdx, Metadata, Tree};

/// How many symlinks one lookup may traverse, as in the kernel (ELOOP).
const MAX_SYMLINK_HOPS: usize = 40;
/// The longest symlink target Linux accepts.
const MAX_SYMLINK_TARGET: usize = 4095;
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read the layer's tar stream: {0}")]
    Read(#[source] std::io::Error),
    #[error("cannot read entry {path:?}: {source}")]
    Entry { path: String, source: std::io::Error },
    #[error("entry {path:?}: {source}")]
    Path { path: String, source: PathError },
    #[error("entry {path:?}: parent {parent} is a {kind}, not a directory")]
    ParentNotDir { path: String, parent: String, kind: &'static str },
    #[error("entry {path:?}: too many levels of symlinks")]
    SymlinkLoop { path: String },
    #[error("hard link {path:?} points at {target:?}, which does not exist in the image")]
    HardLinkMissing { path: String, target: String },
    #[error("hard link {path:?} points at {target:?}, which is a directory")]
    HardLinkToDir { path: String, target: String },
    #[error("hard link {path:?} has no target")]
    HardLinkNoTarget { path: String },
    #[error("entry {path:?}: {what} {value} is out of range")]
    Absurd { path: String, what: &'static str, value: String },
    #[error("entry {path:?}: unsupported tar entry type {kind:?}")]
    UnsupportedType { path: String, kind: EntryType },
    #[error("cannot spool file data of {path:?}: {source}")]
    Spool { path: String, source: std::io::Error },
    #[error("cannot create a spool file: {0}")]
    SpoolCreate(#[source] std::io::Error),
}

/// What applying one layer did, for progress reports and the build manifest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerStats {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub bytes_spooled: u64,
}

impl Tree {
    /// Applies one uncompressed layer tar stream as layer number `layer`
    /// (numbers must increase from one call to the next). File data is spooled
    /// into a temporary file in `spool_dir`.
    pub fn apply_layer(
        &mut self,
        tar_stream: impl Read,
        layer: u32,
        spool_dir: Option<&Path>,
    ) -> Result<LayerStats, LayerError> {
        let mut spool = self.spools_mut().create(spool_dir).map_err(LayerError::SpoolCreate)?;
        let mut stats = LayerStats::default();
        let mut archive = tar::Archive::new(tar_stream);
        for entry in archive.entries().map_err(LayerError::Read)? {
            let mut entry = entry.map_err(LayerError::Read)?;
            let raw_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let err_entry = |source| LayerError::Entry { path: shown.clone(), source };
            let header = parse_header(&mut entry, &shown)?;
            let path = RelPath::parse_layer(&raw_path)
                .map_err(|source| LayerError::Path { path: shown.clone(), source })?;
            stats.entries += 1;

            // Whiteouts and opaque markers delete; they never appear in the tree.
            if let Some(name) = path.file_name() {
                if name == OPAQUE_MARKER {
                    let (parent, _) = path.split_last().expect("has a name");
                    if let Some(dir) = self.existing_dir(&parent) {
                        self.hide_lower(dir, layer);
                    }
                    stats.opaque_dirs += 1;
                    continue;
                }
                if name.starts_with(b".wh..wh.") {
                    // AUFS bookkeeping (.wh..wh.plnk, .wh..wh.aufs): not content.
                    continue;
                }
                if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                    let (parent, _) = path.split_last().expect("has a name");
                    // `hidden` is part of an already validated name (no `/`,
                    // no NUL, short); only the dot names remain to refuse.
                    if hidden == b"." || hidden == b".." || hidden.is_empty() {
                        return Err(LayerError::Path {
                            path: shown.clone(),
                            source: PathError::DotDot(shown.clone()),
                        });
                    }
                    // Nothing to hide under a parent that is not there
                    // (umoci does not make one either).
                    if let Some(dir) = self.existing_dir(&parent) {
                        self.white_out(dir, hidden, layer);
                    }
                    stats.whiteouts += 1;
                    continue;
                }
            }

            let kind = entry.header().entry_type();
            let body = match kind {
                EntryType::Directory => {
                    if path.is_root() {
                        self.inode_mut(InodeIdx::ROOT).meta = header.meta;
                        continue;
                    }
                    Body::Dir(BTreeMap::new())
                }
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    let len = entry.size();
                    let content = spool
                        .append(&mut entry, len)
                        .map_err(|source| LayerError::Spool { path: shown.clone(), source })?;
                    stats.bytes_spooled += len;
                    Body::File(content)
                }
                EntryType::Symlink => {
                    let target = entry.link_name_bytes().map(|t| t.into_owned()).unwrap_or_default();
                    if target.is_empty() || target.len() > MAX_SYMLINK_TARGET || target.contains(&0) {
                        return Err(absurd(&shown, "symlink target length", target.len()));
                    }
                    Body::Symlink(target)
                }
                EntryType::Link => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| t.into_owned())
                        .ok_or_else(|| LayerError::HardLinkNoTarget { path: shown.clone() })?;
                    let target_path = RelPath::parse_layer(&target)
                        .map_err(|source| LayerError::Path { path: shown.clone(), source })?;
                    let inode = self.resolve_hard_link(&target_path, &shown, layer)?;
                    if path.is_root() {
                        return Err(LayerError::HardLinkToDir { path: shown, target: target_path.to_string() });
                    }
                    let (parent, name) = path.split_last().expect("not root");
                    let dir = self.resolve_dir(&parent, &shown, layer)?;
                    self.dir_entries_mut(dir)
                        .expect("resolved a directory")
                        .insert(name.to_vec(), Dentry { inode, layer });
                    continue;
                }
                EntryType::Char | EntryType::Block => {
                    let major = entry.header().device_major().map_err(err_entry)?.unwrap_or(0);
                    let minor = entry.header().device_minor().map_err(err_entry)?.unwrap_or(0);
                    if kind == EntryType::Char {
                        Body::CharDevice { major, minor }
                    } else {
                        Body::BlockDevice { major, minor }
                    }
                }
                EntryType::Fifo => Body::Fifo,
                EntryType::XGlobalHeader => continue,
                other => return Err(LayerError::UnsupportedType { path: shown, kind: other }),
            };
            if path.is_root() {
                return Err(LayerError::ParentNotDir {
                    path: shown,
                    parent: "/".into(),
                    kind: body.kind_name(),
                });
            }
            let (parent, name) = path.split_last().expect("not root");
            let dir = self.resolve_dir(&parent, &shown, layer)?;
            self.put(dir, name, header.meta, body, layer);
        }
        stats.bytes_spooled = spool.finish().map_err(LayerError::SpoolCreate)?;
        Ok(stats)
    }

    /// Places an entry in a directory: an existing directory merges with a new
    /// directory entry (metadata replaced, children kept), anything else is
    /// replaced whole.
    pub(crate) fn put(&mut self, dir: InodeIdx, name: &[u8], meta: Metadata, body: Body, layer: u32) {
        let existing = self.dir_entries(dir).and_then(|e| e.get(name)).copied();
        if let (Some(old), Body::Dir(_)) = (existing, &body) {
            if matches!(self.inode(old.inode).body, Body::Dir(_)) {
                self.inode_mut(old.inode).meta = meta;
                self.dir_entries_mut(dir)
                    .expect("directory")
                    .insert(name.to_vec(), Dentry { inode: old.inode, layer });
                return;
            }
        }
        let inode = self.push_inode(Inode { meta, body });
        self.dir_entries_mut(dir).expect("directory").insert(name.to_vec(), Dentry { inode, layer });
    }

    /// `.wh.NAME` in `dir`: hides what lower layers put at `name`. An entry
    /// this layer made stays; a directory keeps what this layer put in it,
    /// whichever layer made the directory itself.
    fn white_out(&mut self, dir: InodeIdx, name: &[u8], layer: u32) {
        let Some(dentry) = self.dir_entries(dir).and_then(|e| e.get(name)).copied() else { return };
        let holds_this_layer = self.is_dir(dentry.inode) && self.hide_lower(dentry.inode, layer);
        if dentry.layer < layer && !holds_this_layer {
            self.dir_entries_mut(dir).expect("a directory").remove(name);
        }
    }

    /// Opaque directory: drops every entry below `dir` that a lower layer
    /// made, except lower directories this layer put something into (tar
    /// order is free, and a layer may add `d/sub/new` without listing
    /// `d/sub`). Returns whether anything is left in `dir`.
    fn hide_lower(&mut self, dir: InodeIdx, layer: u32) -> bool {
        // Every directory below `dir`, parents first (no recursion: trees
        // made through symlinks can be deeper than any one path) ...
        let mut dirs = vec![dir];
        let mut next = 0;
        while let Some(&cur) = dirs.get(next) {
            next += 1;
            let entries = self.dir_entries(cur).expect("directories only");
            dirs.extend(entries.values().map(|d| d.inode).filter(|&i| self.is_dir(i)));
        }
        // ... then pruned children first, so a lower directory is dropped
        // exactly when nothing of this layer is left in it.
        for &cur in dirs.iter().rev() {
            let entries = self.dir_entries(cur).expect("directories only");
            let hidden: Vec<Vec<u8>> = entries
                .iter()
                .filter(|(_, d)| d.layer < layer && self.dir_entries(d.inode).is_none_or(BTreeMap::is_empty))
                .map(|(name, _)| name.clone())
                .collect();
            let entries = self.dir_entries_mut(cur).expect("directories only");
            for name in hidden {
                entries.remove(&name);
            }
        }
        self.dir_entries(dir).is_some_and(|e| !e.is_empty())
    }

    fn is_dir(&self, idx: InodeIdx) -> bool {
        matches!(self.inode(idx).body, Body::Dir(_))
    }

    /// The directory at `path` (symlinks followed), if it exists.
    pub(super) fn existing_dir(&self, path: &RelPath) -> Option<InodeIdx> {
        self.lookup_following(path).filter(|&idx| self.is_dir(idx))
    }

    /// Finds (creating as needed) the directory at `path`, following symlinks in
    /// the tree the way the kernel would inside a chroot: `..` at the root
    /// stays at the root.
    pub(crate) fn resolve_dir(&mut self, path: &RelPath, shown: &str, layer: u32) -> Result<InodeIdx, LayerError> {
        let mut hops = 0;
        self.resolve_dir_from(InodeIdx::ROOT, &mut Vec::new(), path.components(), shown, layer, &mut hops)
    }

    fn resolve_dir_from<'a>(
        &mut self,
        start: InodeIdx,
        stack: &mut Vec<InodeIdx>,
        components: impl Iterator<Item = &'a [u8]>,
        shown: &str,
        layer: u32,
        hops: &mut usize,
    ) -> Result<InodeIdx, LayerError> {
        // `stack` holds the ancestors of `cur` so that `..` inside a symlink
        // target can climb; an empty stack means `cur` is the root.
        let mut cur = start;
        for name in components {
            let existing = self.dir_entries(cur).expect("walking directories").get(name).copied();
            match existing {
                None => {
                    let inode = self.push_inode(Inode {
                        meta: Metadata::implicit_dir(),
                        body: Body::Dir(BTreeMap::new()),
                    });
                    self.dir_entries_mut(cur).expect("directory").insert(name.to_vec(), Dentry { inode, layer });
                    stack.push(cur);
                    cur = inode;
                }
                Some(d) => match &self.inode(d.inode).body {
                    Body::Dir(_) => {
                        stack.push(cur);
                        cur = d.inode;
                    }
                    Body::Symlink(target) => {
                        *hops += 1;
                        if *hops > MAX_SYMLINK_HOPS {
                            return Err(LayerError::SymlinkLoop { path: shown.to_string() });
                        }
                        let target = target.clone();
                        cur = self.follow_symlink(cur, stack, &target, shown, layer, hops)?;
                    }
                    other => {
                        return Err(LayerError::ParentNotDir {
                            path: shown.to_string(),
                            parent: String::from_utf8_lossy(name).into_owned(),
                            kind: other.kind_name(),
                        })
                    }
                },
            }
        }
        Ok(cur)
    }

    fn follow_symlink(
        &mut self,
        link_dir: InodeIdx,
        stack: &mut Vec<InodeIdx>,
        target: &[u8],
        shown: &str,
        layer: u32,
        hops: &mut usize,
    ) -> Result<InodeIdx, LayerError> {
        let mut cur = link_dir;
        if target.starts_with(b"/") {
            stack.clear();
            cur = InodeIdx::ROOT;
        }
        for comp in target.split(|&b| b == b'/') {
            match comp {
                b"" | b"." => {}
                // The root is its own parent, as in the kernel.
                b".." => cur = stack.pop().unwrap_or(InodeIdx::ROOT),
                name => {
                    cur = self.resolve_dir_from(cur, stack, std::iter::once(name), shown, layer, hops)?;
                }
            }
        }
        Ok(cur)
    }

    /// Resolves a hard link's target: parents may go through symlinks (inside
    /// the root), the last component is taken as is and must exist.
    fn resolve_hard_link(&mut self, target: &RelPath, shown: &str, layer: u32) -> Result<InodeIdx, LayerError> {
        let missing = || LayerError::HardLinkMissing { path: shown.to_string(), target: target.to_string() };
        let (parent, name) = target.split_last().ok_or_else(|| LayerError::HardLinkToDir {
            path: shown.to_string(),
            target: "/".into(),
        })?;
        // Look the parent up without creating anything: a link to a missing
        // path must not leave invented directories behind.
        if self.lookup_following(&parent).is_none() {
            return Err(missing());
        }
        let dir = self.resolve_dir(&parent, shown, layer)?;
        let inode = self.dir_entries(dir).and_then(|e| e.get(name)).ok_or_else(missing)?.inode;
        if matches!(self.inode(inode).body, Body::Dir(_)) {
            return Err(LayerError::HardLinkToDir { path: shown.to_string(), target: target.to_string() });
        }
        Ok(inode)
    }

    /// Like [`Tree::lookup`] but following symlinks in every component (`..`
    /// at the root stays there); `None` when missing or looping.
    fn lookup_following(&self, path: &RelPath) -> Option<InodeIdx> {
        let mut stack = Vec::new();
        let mut hops = 0;
        let mut pending: Vec<Vec<u8>> = path.components().rev().map(<[u8]>::to_vec).collect();
        let mut cur = InodeIdx::ROOT;
        while let Some(name) = pending.pop() {
            match name.as_slice() {
                b"" | b"." => continue,
                b".." => {
                    cur = stack.pop().unwrap_or(InodeIdx::ROOT);
                    continue;
                }
                _ => {}
            }
            let d = *self.dir_entries(cur)?.get(&name)?;
            match &self.inode(d.inode).body {
                Body::Symlink(target) => {
                    hops += 1;
                    if hops > MAX_SYMLINK_HOPS {
                        return None;
                    }
                    if target.starts_with(b"/") {
                        stack.clear();
                        cur = InodeIdx::ROOT;
                    }
                    pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
                }
                _ => {
                    stack.push(cur);
                    cur = d.inode;
                }
            }
        }
        Some(cur)
    }
}

struct ParsedHeader {
    meta: Metadata,
}

/// Reads ownership, mode, mtime and xattrs, letting PAX records override the
/// ustar fields (PAX carries large ids and sub-second or negative times).
fn parse_header<R: Read>(entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<ParsedHeader, LayerError> {
    let err_entry = |source| LayerError::Entry { path: shown.to_string(), source };
    let header = entry.header();
    let mode = header.mode().map_err(err_entry)?;
    let mut uid = header.uid().map_err(err_entry)?;
    let mut gid = header.gid().map_err(err_entry)?;
    let mut mtime = header.mtime().map_err(err_entry)? as i64;
    let mut xattrs = BTreeMap::new();
    if let Some(pax) = entry.pax_extensions().map_err(err_entry)? {
        for ext in pax {
            let ext = ext.map_err(err_entry)?;
            let key = ext.key_bytes();
            let value = ext.value_bytes();
            let number = || std::str::from_utf8(value).ok().map(str::trim);
            match key {
                b"uid" => uid = number().and_then(|v| v.parse().ok()).ok_or_else(|| absurd(shown, "PAX uid", lossy(value)))?,
                b"gid" => gid = number().and_then(|v| v.parse().ok()).ok_or_else(|| absurd(shown, "PAX gid", lossy(value)))?,
                b"mtime" => {
                    // "1700000000.123456789": keep whole seconds (floor, also for negatives).
                    let v = number().ok_or_else(|| absurd(shown, "PAX mtime", lossy(value)))?;
                    let secs = v.parse::<f64>().map_err(|_| absurd(shown, "PAX mtime", v))?;
                    if !secs.is_finite() || secs.abs() > 1e15 {
                        return Err(absurd(shown, "PAX mtime", v));
                    }
                    mtime = secs.floor() as i64;
                }
                _ => {
                    if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                        xattrs.insert(name.to_vec(), value.to_vec());
                    }
                }
            }
        }
    }
    let uid = u32::try_from(uid).ok().filter(|&u| u != u32::MAX).ok_or_else(|| absurd(shown, "uid", uid))?;
    let gid = u32::try_from(gid).ok().filter(|&g| g != u32::MAX).ok_or_else(|| absurd(shown, "gid", gid))?;
    if mode & !0o177_777 != 0 {
        return Err(absurd(shown, "mode", format!("{mode:o}")));
    }
    let mut meta = Metadata::new(mode, uid, gid, mtime);
    meta.xattrs = xattrs;
    Ok(ParsedHeader { meta })
}

fn absurd(path: &str, what: &'static str, value: impl ToString) -> LayerError {
    LayerError::Absurd { path: path.to_string(), what, value: value.to_string() }
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a tar layer by hand, entry by entry, so tests can craft inputs
    /// no well-behaved tool would write.
    struct LayerBuilder {
        builder: tar::Builder<Vec<u8>>,
    }

    impl LayerBuilder {
        fn new() -> Self {
            LayerBuilder { builder: tar::Builder::new(Vec::new()) }
        }

        fn header(kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_000);
            h
        }

        /// Writes a raw name into the header bypassing the tar crate's checks
        /// (it refuses `..` and absolute paths, which is what we want to test).
        fn raw(mut self, mut h: tar::Header, name: &str, link: Option<&str>, data: &[u8]) -> Self {
            {
                let gnu = h.as_gnu_mut().unwrap();
                gnu.name = [0; 100];
                gnu.name[..name.len()].copy_from_slice(name.as_bytes());
                if let Some(link) = link {
                    gnu.linkname = [0; 100];
                    gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
                }
            }
            h.set_cksum();
            self.builder.append(&h, data).unwrap();
            self
        }

        fn dir(self, name: &str) -> Self {
            self.dir_mode(name, 0o755)
        }
        fn dir_mode(self, name: &str, mode: u32) -> Self {
            self.raw(Self::header(EntryType::Directory, mode, 0), name, None, b"")
        }
        fn file(self, name: &str, data: &str) -> Self {
            self.raw(Self::header(EntryType::Regular, 0o644, data.len() as u64), name, None, data.as_bytes())
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.raw(Self::header(EntryType::Symlink, 0o777, 0), name, Some(target), b"")
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.raw(Self::header(EntryType::Link, 0o644, 0), name, Some(target), b"")
        }
        fn build(self) -> Vec<u8> {
            self.builder.into_inner().unwrap()
        }
    }

    fn apply(tree: &mut Tree, layer: u32, tar: Vec<u8>) -> Result<LayerStats, LayerError> {
        tree.apply_layer(&tar[..], layer, None)
    }

    /// The tree as sorted `path kind` lines, file contents inline.
    fn listing(tree: &Tree) -> Vec<String> {
        tree.walk()
            .into_iter()
            .skip(1)
            .map(|(path, idx)| {
                let path = String::from_utf8_lossy(&path).into_owned();
                match &tree.inode(idx).body {
                    Body::File(c) => {
                        let mut s = String::new();
                        tree.open_content(c).unwrap().read_to_string(&mut s).unwrap();
                        format!("{path}={s}")
                    }
                    Body::Symlink(t) => format!("{path}->{}", String::from_utf8_lossy(t)),
                    Body::Dir(_) => format!("{path}/"),
                    other => format!("{path} {}", other.kind_name()),
                }
            })
            .collect()
    }

    #[test]
    fn later_layers_replace_and_merge() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().dir("etc").file("etc/a", "1").file("etc/b", "2").build()).unwrap();
        apply(&mut tree, 1, LayerBuilder::new().file("etc/a", "new").dir("etc").file("etc/c", "3").build()).unwrap();
        assert_eq!(listing(&tree), ["etc/", "etc/a=new", "etc/b=2", "etc/c=3"]);
    }

    #[test]
    fn whiteouts_delete_lower_entries_only() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().file("a", "1").dir("d").file("d/x", "x").file("keep", "k").build())
            .unwrap();
        let stats = apply(
            &mut tree,
            1,
            LayerBuilder::new().file(".wh.a", "").file("./.wh.d", "").file("b", "new").file(".wh.b", "").build(),
        )
        .unwrap();
        assert_eq!(stats.whiteouts, 3);
        // `b` came from this same layer, so its whiteout does not hide it.
        assert_eq!(listing(&tree), ["b=new", "keep=k"]);
    }

    #[test]
    fn opaque_dir_hides_lower_but_keeps_same_layer() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().file("d/old", "o").file("d/sub/deep", "x").file("other", "y").build())
            .unwrap();
        apply(
            &mut tree,
            1,
            LayerBuilder::new().file("d/new", "n").dir("d/sub").file("d/sub/fresh", "f").file("d/.wh..wh..opq", "").build(),
        )
        .unwrap();
        assert_eq!(listing(&tree), ["d/", "d/new=n", "d/sub/", "d/sub/fresh=f", "other=y"]);
    }

    /// A lower layer's `d/` with `sub/` (0711, holding `old`) and `keep`,
    /// then one layer with `upper`'s entries applied on top.
    fn over_lower(upper: LayerBuilder) -> Tree {
        let mut tree = Tree::new();
        let lower = LayerBuilder::new().dir("d").dir_mode("d/sub", 0o711).file("d/sub/old", "o").file("d/keep", "k").file("top", "t");
        apply(&mut tree, 0, lower.build()).unwrap();
        apply(&mut tree, 1, upper.build()).unwrap();
        tree
    }

    fn mode_of(tree: &Tree, path: &str) -> u32 {
        tree.inode(tree.lookup(&RelPath::parse_user(path).unwrap()).expect(path)).meta.mode
    }

    #[test]
    fn same_layer_content_under_a_lower_dir_survives_an_opaque_marker_in_either_order() {
        // The layer puts `d/sub/new` into the lower `d/sub` without listing
        // `d/sub` itself: the marker hides only what lower layers put in `d`.
        let after = over_lower(LayerBuilder::new().file("d/sub/new", "n").file("d/.wh..wh..opq", ""));
        assert_eq!(listing(&after), ["d/", "d/sub/", "d/sub/new=n", "top=t"]);
        assert_eq!(mode_of(&after, "d/sub"), 0o711, "the lower d/sub stays, as umoci keeps it");
        // Marker first: `d/sub` goes, then `d/sub/new` brings an implicit one.
        let before = over_lower(LayerBuilder::new().file("d/.wh..wh..opq", "").file("d/sub/new", "n"));
        assert_eq!(listing(&before), ["d/", "d/sub/", "d/sub/new=n", "top=t"]);
        assert_eq!(mode_of(&before, "d/sub"), 0o755);
    }

    #[test]
    fn whiteout_of_a_dir_keeps_what_the_same_layer_put_in_it() {
        let after = over_lower(LayerBuilder::new().file("d/sub/new", "n").file("d/.wh.sub", ""));
        assert_eq!(listing(&after), ["d/", "d/keep=k", "d/sub/", "d/sub/new=n", "top=t"]);
        assert_eq!(mode_of(&after, "d/sub"), 0o711);
        let before = over_lower(LayerBuilder::new().file("d/.wh.sub", "").file("d/sub/new", "n"));
        assert_eq!(listing(&before), ["d/", "d/keep=k", "d/sub/", "d/sub/new=n", "top=t"]);
        assert_eq!(mode_of(&before, "d/sub"), 0o755);
        // A directory the layer redeclares still loses its lower entries.
        let redeclared = over_lower(LayerBuilder::new().dir("d/sub").file("d/.wh.sub", ""));
        assert_eq!(listing(&redeclared), ["d/", "d/keep=k", "d/sub/", "top=t"]);
    }

    #[test]
    fn whiteouts_under_a_missing_parent_invent_nothing() {
        let tree = over_lower(
            LayerBuilder::new().file("no/such/.wh.x", "").file("nodir/.wh..wh..opq", "").file("top/.wh.x", ""),
        );
        assert_eq!(listing(&tree), ["d/", "d/keep=k", "d/sub/", "d/sub/old=o", "top=t"]);
    }

    #[test]
    fn symlinks_climbing_past_the_root_stop_at_the_root() {
        // As the kernel and containerd resolve them (umoci puts `lnk/x` at `/etc/x`).
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().symlink("lnk", "../../../../etc").symlink("abs", "/../../srv").build())
            .unwrap();
        apply(&mut tree, 1, LayerBuilder::new().file("lnk/x", "x").file("abs/y", "y").build()).unwrap();
        assert_eq!(listing(&tree), ["abs->/../../srv", "etc/", "etc/x=x", "lnk->../../../../etc", "srv/", "srv/y=y"]);
        // A hard link's target and a whiteout's parent resolve the same way.
        let mut tree2 = Tree::new();
        apply(&mut tree2, 0, LayerBuilder::new().file("top", "t").dir("d").symlink("d/up", "../../..").build()).unwrap();
        apply(&mut tree2, 1, LayerBuilder::new().hardlink("d/h", "d/up/top").file("d/up/.wh.top", "").build()).unwrap();
        assert_eq!(listing(&tree2), ["d/", "d/h=t", "d/up->../../.."]);
        // A target that climbs out and back in lands inside too.
        let mut tree3 = Tree::new();
        apply(&mut tree3, 0, LayerBuilder::new().symlink("a", "b/../../../c").dir("b").file("a/x", "x").build()).unwrap();
        assert_eq!(listing(&tree3), ["a->b/../../../c", "b/", "c/", "c/x=x"]);
    }

    #[test]
    fn file_replaces_dir_and_dir_replaces_file() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().file("d/x", "x").file("f", "1").build()).unwrap();
        apply(&mut tree, 1, LayerBuilder::new().file("d", "now a file").dir("f").build()).unwrap();
        assert_eq!(listing(&tree), ["d=now a file", "f/"]);
    }

    #[test]
    fn hard_links_share_an_inode_across_layers() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().file("bin/a", "data").build()).unwrap();
        apply(&mut tree, 1, LayerBuilder::new().hardlink("bin/b", "bin/a").hardlink("c", "./bin/a").build()).unwrap();
        let a = tree.lookup(&RelPath::parse_user("bin/a").unwrap()).unwrap();
        assert_eq!(tree.lookup(&RelPath::parse_user("bin/b").unwrap()), Some(a));
        assert_eq!(tree.lookup(&RelPath::parse_user("c").unwrap()), Some(a));
        assert_eq!(tree.stats().hard_links, 2);
    }

    #[test]
    fn parents_through_symlinks_stay_inside() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().dir("usr/lib").symlink("lib", "usr/lib").symlink("abs", "/usr").build())
            .unwrap();
        apply(&mut tree, 1, LayerBuilder::new().file("lib/x.so", "so").file("abs/y", "y").build()).unwrap();
        assert_eq!(listing(&tree), ["abs->/usr", "lib->usr/lib", "usr/", "usr/lib/", "usr/lib/x.so=so", "usr/y=y"]);
    }

    fn check_rejected(layers: Vec<Vec<u8>>, expected: &str) {
        let mut tree = Tree::new();
        let mut result = Ok(LayerStats::default());
        for (i, layer) in layers.into_iter().enumerate() {
            result = apply(&mut tree, i as u32, layer);
            if result.is_err() {
                break;
            }
        }
        let err = result.expect_err(expected).to_string();
        assert!(err.contains(expected), "error {err:?} should mention {expected:?}");
    }

    #[test]
    fn hostile_layers_are_rejected() {
        check_rejected(vec![LayerBuilder::new().file("../evil", "x").build()], "`..`");
        check_rejected(vec![LayerBuilder::new().file("a/../../evil", "x").build()], "`..`");
        check_rejected(vec![LayerBuilder::new().file("/etc/passwd", "x").build()], "absolute");
        check_rejected(vec![LayerBuilder::new().symlink("loop", "loop").file("loop/x", "x").build()], "too many levels");
        check_rejected(vec![LayerBuilder::new().hardlink("h", "missing").build()], "does not exist");
        check_rejected(vec![LayerBuilder::new().hardlink("h", "../../etc/shadow").build()], "`..`");
        check_rejected(vec![LayerBuilder::new().hardlink("h", "/etc/shadow").build()], "absolute");
        check_rejected(vec![LayerBuilder::new().dir("d").hardlink("h", "d").build()], "is a directory");
        check_rejected(vec![LayerBuilder::new().file("f", "x").file("f/child", "y").build()], "not a directory");
        check_rejected(vec![LayerBuilder::new().file(".wh...", "").build()], "`..`");
    }

    #[test]
    fn absurd_header_values_are_rejected() {
        let mut h = LayerBuilder::header(EntryType::Regular, 0o644, 0);
        h.set_uid(u64::from(u32::MAX) + 5);
        check_rejected(vec![LayerBuilder::new().raw(h, "f", None, b"").build()], "uid");
        // A header claiming more data than the stream holds.
        let mut tar = LayerBuilder::new().file("f", "abc").build();
        tar.truncate(512 + 1);
        check_rejected(vec![tar], "f");
    }

    #[test]
    fn hard_link_to_missing_does_not_invent_directories() {
        let mut tree = Tree::new();
        let err = apply(&mut tree, 0, LayerBuilder::new().hardlink("h", "no/such/file").build()).unwrap_err();
        assert!(matches!(err, LayerError::HardLinkMissing { .. }));
        assert!(listing(&tree).is_empty());
    }

    #[test]
    fn pax_overrides_and_xattrs() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o4755);
        h.set_size(2);
        builder
            .append_pax_extensions([
                ("uid", &b"100000"[..]),
                ("gid", &b"100001"[..]),
                ("mtime", &b"1700000000.5"[..]),
                ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
            ])
            .unwrap();
        builder.append_data(&mut h, "bin/ping", &b"hi"[..]).unwrap();
        let mut tree = Tree::new();
        apply(&mut tree, 0, builder.into_inner().unwrap()).unwrap();
        let idx = tree.lookup(&RelPath::parse_user("bin/ping").unwrap()).unwrap();
        let meta = &tree.inode(idx).meta;
        assert_eq!((meta.mode, meta.uid, meta.gid, meta.mtime), (0o4755, 100_000, 100_001, 1_700_000_000));
        assert_eq!(meta.xattrs.get(&b"security.capability"[..]).map(Vec::as_slice), Some(&b"\x01\x00\x00\x02"[..]));
    }
}
