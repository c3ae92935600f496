//! Applying an OCI layer (a tar stream) to the tree.
//!
//! Semantics follow the OCI image spec's changeset rules: entries replace what
//! lower layers had at the same path, directories merge, `.wh.NAME` deletes
//! `NAME` from lower layers and `.wh..wh..opq` hides everything lower layers put
//! in its directory. Neither touches what the same layer put there, in any
//! entry order: a lower directory this layer put something into stays, with
//! only that (as umoci unpacks it). A whiteout whose parent is missing is a
//! no-op. [`super::tarstream`] frames the stream (the `tar` crate's typed
//! headers parse the fields; its `unpack` is never used: entries are applied
//! to the model, not the host).
//!
//! Symlinks in parents are followed inside the tree the way the kernel and
//! containerd resolve them under a root: a `..` at the root stays at the root,
//! so no walk can leave it. Hostile input is refused with an error naming the
//! entry (through [`excerpt`], so at most a couple of hundred bytes of it):
//! absolute names, `..` in names, hard links to missing targets, and absurd
//! header values. [`Limits`] bound what an image's layers may make a build
//! hold, each judged before the bytes it concerns are read: file data (sparse
//! files by their declared size), entries, names and PAX records, directory
//! depth, and the size of one header record.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use tar::EntryType;

use super::path::{excerpt, PathError, RelPath, NAME_MAX};
use super::tarstream::{TarEntry, TarStream};
use super::{Body, Dentry, Inode, InodeIdx, Metadata, Tree};

/// Bounds on what one image's layers may make a build hold. Every one is
/// checked from a header before the bytes it concerns are read, so memory
/// stays at a few hundred MiB whatever the input: one header record, the
/// tree's entries (each a name of at most 255 bytes, a symlink target of at
/// most 4095, xattrs of at most [`MAX_XATTR_BYTES`]), and I/O buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// File data of all layers together, sparse files counted at their
    /// declared size (what the outputs will have to hold).
    pub max_spool_bytes: u64,
    /// Entries of all layers together (whiteouts included).
    pub max_entries: u64,
    /// Bytes of names, link targets and PAX records (xattrs among them) of
    /// all layers together: what the tree holds besides file data, so the
    /// model's memory is bounded by bytes and not only by the entry count.
    pub max_metadata_bytes: u64,
    /// Levels of an entry's path (`a/b/c` is 3), counted where it lands:
    /// symlinks in its parents can put it deeper than its name says.
    pub max_path_depth: usize,
    /// One extension record: a PAX header, a GNU long name or link, a GNU
    /// sparse map.
    pub max_header_bytes: u64,
    /// Uncompressed bytes per compressed byte of a layer, once past
    /// [`RATIO_FLOOR`] (checked by the decompressing reader in `oci`).
    pub max_ratio: u64,
}

/// Uncompressed bytes a layer may produce before [`Limits::max_ratio`] applies:
/// small layers of zeros compress better than any ratio worth refusing.
pub const RATIO_FLOOR: u64 = 64 << 20;

/// The most xattr bytes (names and values) one entry may carry: Linux's
/// XATTR_SIZE_MAX for one value, and more than ext4 or erofs can store.
pub const MAX_XATTR_BYTES: usize = 64 << 10;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_spool_bytes: 64 << 30,
            max_entries: 2_000_000,
            max_metadata_bytes: 256 << 20,
            max_path_depth: 1024,
            max_header_bytes: 1 << 20,
            max_ratio: 1000,
        }
    }
}

/// How layers are taken in: the limits, and where file data is spooled.
#[derive(Clone, Debug, Default)]
pub struct Intake {
    pub limits: Limits,
    /// `None`: [`super::default_spool_dir`].
    pub spool_dir: Option<PathBuf>,
}

/// What an image's layers have used of the [`Limits`] so far.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Usage {
    pub(crate) limits: Limits,
    spooled_bytes: u64,
    entries: u64,
    metadata_bytes: u64,
}

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
    /// A numeric header field that does not parse (the tar crate's message
    /// would quote the field's raw bytes).
    #[error("entry {path:?}: the header's {field} field is not a number")]
    BadField { path: String, field: &'static str },
    #[error("entry {path:?}: a symlink with an empty target")]
    SymlinkEmpty { path: String },
    #[error("entry {path:?}: symlink target {target:?} contains a NUL byte")]
    SymlinkNul { path: String, target: String },
    #[error("entry {path:?}: {source}")]
    Path { path: String, source: PathError },
    #[error("entry {path:?}: parent {parent:?} is a {kind}, not a directory")]
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
    #[error("malformed tar stream at byte {offset} of the layer: {reason}")]
    Malformed { offset: u64, reason: String },
    #[error("{what} at byte {offset} of the layer is {size} bytes, over the {limit}-byte limit for one header record (raise it with --max-header-bytes)")]
    HeaderTooLarge { what: &'static str, offset: u64, size: u64, limit: u64 },
    #[error("entry {path:?}: a file of {size} bytes would bring the image's file data to {total} bytes, over the limit of {limit} (raise it with --max-spool-bytes)")]
    SpoolLimit { path: String, size: u64, total: u64, limit: u64 },
    #[error("entry {path:?}: the image holds more than {limit} entries (raise the limit with --max-entries)")]
    TooManyEntries { path: String, limit: u64 },
    #[error("entry {path:?}: the image's names, link targets and PAX records exceed {limit} bytes (raise the limit with --max-metadata-bytes)")]
    TooMuchMetadata { path: String, limit: u64 },
    #[error("entry {path:?} lies {depth} levels deep, over the limit of {limit} (raise it with --max-path-depth)")]
    TooDeep { path: String, depth: usize, limit: usize },
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
    /// (numbers must increase from one call to the next), within
    /// `intake.limits` counted over every layer applied to this tree. File
    /// data is spooled into a temporary file in `intake.spool_dir`.
    pub fn apply_layer(&mut self, tar_stream: impl Read, layer: u32, intake: &Intake) -> Result<LayerStats, LayerError> {
        self.usage.limits = intake.limits;
        let mut spool = self.spools_mut().create(intake.spool_dir.as_deref()).map_err(LayerError::SpoolCreate)?;
        let mut stats = LayerStats::default();
        let mut stream = TarStream::new(tar_stream, intake.limits.max_header_bytes);
        while let Some(entry) = stream.next_entry()? {
            let shown = excerpt(&entry.path);
            self.usage.entries += 1;
            if self.usage.entries > self.usage.limits.max_entries {
                return Err(LayerError::TooManyEntries { path: shown, limit: self.usage.limits.max_entries });
            }
            let metadata = entry.path.len() as u64
                + entry.link.as_ref().map_or(0, |l| l.len() as u64)
                + entry.pax.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum::<u64>();
            self.usage.metadata_bytes += metadata;
            if self.usage.metadata_bytes > self.usage.limits.max_metadata_bytes {
                return Err(LayerError::TooMuchMetadata { path: shown, limit: self.usage.limits.max_metadata_bytes });
            }
            let header = parse_header(&entry, &shown)?;
            let path = RelPath::parse_layer(&entry.path).map_err(|source| LayerError::Path { path: shown.clone(), source })?;
            self.check_depth(path.len(), &shown)?;
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
                        return Err(LayerError::Path { path: shown.clone(), source: PathError::DotDot(shown.clone()) });
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

            let kind = entry.header.entry_type();
            let body = match kind {
                EntryType::Directory => {
                    if path.is_root() {
                        self.inode_mut(InodeIdx::ROOT).meta = header.meta;
                        continue;
                    }
                    Body::Dir(BTreeMap::new())
                }
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    let len = entry.sparse.as_ref().map_or(entry.size, |s| s.real_size);
                    self.claim_spool(len, &shown)?;
                    let spooled = match &entry.sparse {
                        Some(map) => spool.append_sparse(&mut stream, &map.segments, map.real_size),
                        None => spool.append(&mut stream, len),
                    };
                    let content = spooled.map_err(|source| LayerError::Spool { path: shown.clone(), source })?;
                    Body::File(content)
                }
                EntryType::Symlink => {
                    let target = entry.link.clone().unwrap_or_default();
                    if target.is_empty() {
                        return Err(LayerError::SymlinkEmpty { path: shown });
                    }
                    if target.contains(&0) {
                        return Err(LayerError::SymlinkNul { path: shown, target: excerpt(&target) });
                    }
                    if target.len() > MAX_SYMLINK_TARGET {
                        return Err(absurd(&shown, "symlink target length", target.len()));
                    }
                    Body::Symlink(target)
                }
                EntryType::Link => {
                    let target = entry.link.clone().ok_or_else(|| LayerError::HardLinkNoTarget { path: shown.clone() })?;
                    let target_path = RelPath::parse_layer(&target).map_err(|source| LayerError::Path { path: shown.clone(), source })?;
                    let inode = self.resolve_hard_link(&target_path, &shown, layer)?;
                    if path.is_root() {
                        return Err(LayerError::HardLinkToDir { path: shown, target: excerpt(target_path.to_string().as_bytes()) });
                    }
                    let (parent, name) = path.split_last().expect("not root");
                    let dir = self.resolve_parent(&parent, &shown, layer)?;
                    self.dir_entries_mut(dir).expect("resolved a directory").insert(name.to_vec(), Dentry { inode, layer });
                    continue;
                }
                EntryType::Char | EntryType::Block => {
                    let major = entry.header.device_major().map_err(bad_field(&shown, "device major"))?.unwrap_or(0);
                    let minor = entry.header.device_minor().map_err(bad_field(&shown, "device minor"))?.unwrap_or(0);
                    if kind == EntryType::Char {
                        Body::CharDevice { major, minor }
                    } else {
                        Body::BlockDevice { major, minor }
                    }
                }
                EntryType::Fifo => Body::Fifo,
                other => return Err(LayerError::UnsupportedType { path: shown, kind: other }),
            };
            if path.is_root() {
                return Err(LayerError::ParentNotDir { path: shown, parent: "/".into(), kind: body.kind_name() });
            }
            let (parent, name) = path.split_last().expect("not root");
            let dir = self.resolve_parent(&parent, &shown, layer)?;
            self.put(dir, name, header.meta, body, layer);
        }
        stats.bytes_spooled = spool.finish().map_err(LayerError::SpoolCreate)?;
        Ok(stats)
    }

    /// Counts a file of `len` bytes against [`Limits::max_spool_bytes`]
    /// before any of it is read.
    fn claim_spool(&mut self, len: u64, shown: &str) -> Result<(), LayerError> {
        let limit = self.usage.limits.max_spool_bytes;
        let total = self.usage.spooled_bytes.saturating_add(len);
        if total > limit {
            return Err(LayerError::SpoolLimit { path: shown.to_string(), size: len, total, limit });
        }
        self.usage.spooled_bytes = total;
        Ok(())
    }

    fn check_depth(&self, depth: usize, shown: &str) -> Result<(), LayerError> {
        let limit = self.usage.limits.max_path_depth;
        if depth > limit {
            return Err(LayerError::TooDeep { path: shown.to_string(), depth, limit });
        }
        Ok(())
    }

    /// Resolves the directory an entry goes into, checking the entry's depth
    /// there (symlinks in the parent can put it deeper than its name says).
    fn resolve_parent(&mut self, parent: &RelPath, shown: &str, layer: u32) -> Result<InodeIdx, LayerError> {
        let mut stack = Vec::new();
        let mut hops = 0;
        let dir = self.resolve_dir_from(InodeIdx::ROOT, &mut stack, parent.components(), shown, layer, &mut hops)?;
        self.check_depth(stack.len() + 1, shown)?;
        Ok(dir)
    }

    /// Places an entry in a directory: an existing directory merges with a new
    /// directory entry (metadata replaced, children kept), anything else is
    /// replaced whole.
    pub(crate) fn put(&mut self, dir: InodeIdx, name: &[u8], meta: Metadata, body: Body, layer: u32) {
        let existing = self.dir_entries(dir).and_then(|e| e.get(name)).copied();
        if let (Some(old), Body::Dir(_)) = (existing, &body) {
            if matches!(self.inode(old.inode).body, Body::Dir(_)) {
                self.inode_mut(old.inode).meta = meta;
                self.dir_entries_mut(dir).expect("directory").insert(name.to_vec(), Dentry { inode: old.inode, layer });
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
                    // A parsed path's names are bounded already; a symlink target's are
                    // not, and the kernel would refuse to make such a name (ENAMETOOLONG).
                    if name.len() > NAME_MAX {
                        return Err(LayerError::Path { path: shown.to_string(), source: PathError::NameTooLong { path: excerpt(name), len: name.len() } });
                    }
                    self.check_depth(stack.len() + 1, shown)?;
                    let inode = self.push_inode(Inode { meta: Metadata::implicit_dir(), body: Body::Dir(BTreeMap::new()) });
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
                    other => return Err(LayerError::ParentNotDir { path: shown.to_string(), parent: excerpt(name), kind: other.kind_name() }),
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
        let missing = || LayerError::HardLinkMissing { path: shown.to_string(), target: excerpt(target.to_string().as_bytes()) };
        let (parent, name) = target.split_last().ok_or_else(|| LayerError::HardLinkToDir { path: shown.to_string(), target: "/".into() })?;
        // Look the parent up without creating anything: a link to a missing
        // path must not leave invented directories behind.
        if self.lookup_following(&parent).is_none() {
            return Err(missing());
        }
        let dir = self.resolve_dir(&parent, shown, layer)?;
        let inode = self.dir_entries(dir).and_then(|e| e.get(name)).ok_or_else(missing)?.inode;
        if matches!(self.inode(inode).body, Body::Dir(_)) {
            return Err(LayerError::HardLinkToDir { path: shown.to_string(), target: excerpt(target.to_string().as_bytes()) });
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
fn parse_header(entry: &TarEntry, shown: &str) -> Result<ParsedHeader, LayerError> {
    let header = &entry.header;
    let mode = header.mode().map_err(bad_field(shown, "mode"))?;
    // A PAX record replaces the header field, which then need not parse.
    let mut uid = None;
    let mut gid = None;
    let mut mtime = None;
    let mut xattrs = BTreeMap::new();
    let mut xattr_bytes = 0;
    for (key, value) in &entry.pax {
        let value = value.as_slice();
        let number = || std::str::from_utf8(value).ok().map(str::trim);
        match key.as_slice() {
            b"uid" => uid = Some(number().and_then(|v| v.parse().ok()).ok_or_else(|| absurd(shown, "PAX uid", lossy(value)))?),
            b"gid" => gid = Some(number().and_then(|v| v.parse().ok()).ok_or_else(|| absurd(shown, "PAX gid", lossy(value)))?),
            b"mtime" => {
                // "1700000000.123456789": keep whole seconds (floor, also for negatives).
                let v = number().ok_or_else(|| absurd(shown, "PAX mtime", lossy(value)))?;
                let secs = v.parse::<f64>().map_err(|_| absurd(shown, "PAX mtime", lossy(value)))?;
                if !secs.is_finite() || secs.abs() > 1e15 {
                    return Err(absurd(shown, "PAX mtime", lossy(value)));
                }
                mtime = Some(secs.floor() as i64);
            }
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    xattr_bytes += name.len() + value.len();
                    if xattr_bytes > MAX_XATTR_BYTES {
                        return Err(absurd(shown, "total xattr size", format!("over {MAX_XATTR_BYTES} bytes")));
                    }
                    xattrs.insert(name.to_vec(), value.to_vec());
                }
            }
        }
    }
    let uid: u64 = match uid {
        Some(uid) => uid,
        None => header.uid().map_err(bad_field(shown, "uid"))?,
    };
    let gid: u64 = match gid {
        Some(gid) => gid,
        None => header.gid().map_err(bad_field(shown, "gid"))?,
    };
    let mtime = match mtime {
        Some(mtime) => mtime,
        None => header.mtime().map_err(bad_field(shown, "mtime"))? as i64,
    };
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

/// A numeric header field that does not parse, named without its bytes (the
/// tar crate's message quotes them raw).
fn bad_field(path: &str, field: &'static str) -> impl FnOnce(std::io::Error) -> LayerError {
    let path = path.to_string();
    move |_| LayerError::BadField { path, field }
}

/// A header value for a message: an excerpt with control characters escaped,
/// so a hostile value cannot drive the terminal it is printed on.
fn lossy(bytes: &[u8]) -> String {
    excerpt(bytes).escape_debug().to_string()
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
        tree.apply_layer(&tar[..], layer, &Intake::default())
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
        apply(&mut tree, 0, LayerBuilder::new().file("a", "1").dir("d").file("d/x", "x").file("keep", "k").build()).unwrap();
        let stats = apply(&mut tree, 1, LayerBuilder::new().file(".wh.a", "").file("./.wh.d", "").file("b", "new").file(".wh.b", "").build()).unwrap();
        assert_eq!(stats.whiteouts, 3);
        // `b` came from this same layer, so its whiteout does not hide it.
        assert_eq!(listing(&tree), ["b=new", "keep=k"]);
    }

    #[test]
    fn opaque_dir_hides_lower_but_keeps_same_layer() {
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().file("d/old", "o").file("d/sub/deep", "x").file("other", "y").build()).unwrap();
        apply(&mut tree, 1, LayerBuilder::new().file("d/new", "n").dir("d/sub").file("d/sub/fresh", "f").file("d/.wh..wh..opq", "").build()).unwrap();
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
        let tree = over_lower(LayerBuilder::new().file("no/such/.wh.x", "").file("nodir/.wh..wh..opq", "").file("top/.wh.x", ""));
        assert_eq!(listing(&tree), ["d/", "d/keep=k", "d/sub/", "d/sub/old=o", "top=t"]);
    }

    #[test]
    fn symlinks_climbing_past_the_root_stop_at_the_root() {
        // As the kernel and containerd resolve them (umoci puts `lnk/x` at `/etc/x`).
        let mut tree = Tree::new();
        apply(&mut tree, 0, LayerBuilder::new().symlink("lnk", "../../../../etc").symlink("abs", "/../../srv").build()).unwrap();
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
        apply(&mut tree, 0, LayerBuilder::new().dir("usr/lib").symlink("lib", "usr/lib").symlink("abs", "/usr").build()).unwrap();
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
        check_rejected(vec![LayerBuilder::new().symlink("l", "").build()], "a symlink with an empty target");
        // A name no parsed path can hold, made through a symlink's target.
        // (The tar crate writes the long target as a GNU long link.)
        let mut b = LayerBuilder::new();
        let mut h = LayerBuilder::header(EntryType::Symlink, 0o777, 0);
        b.builder.append_link(&mut h, "l", "x".repeat(300)).unwrap();
        check_rejected(vec![b.file("l/f", "x").build()], "component of 300 bytes, over the limit of 255");
    }

    #[test]
    fn absurd_header_values_are_rejected() {
        let mut h = LayerBuilder::header(EntryType::Regular, 0o644, 0);
        h.set_uid(u64::from(u32::MAX) + 5);
        check_rejected(vec![LayerBuilder::new().raw(h, "f", None, b"").build()], "uid");
        // A header claiming more data than the stream holds: the entry's
        // data is short, named with both counts.
        let mut tar = LayerBuilder::new().file("f", "abc").build();
        tar.truncate(512 + 1);
        let err = apply(&mut Tree::new(), 0, tar).unwrap_err();
        assert!(matches!(&err, LayerError::Spool { path, source } if path == "f" && source.kind() == std::io::ErrorKind::UnexpectedEof), "{err:?}");
        assert_eq!(err.to_string(), "cannot spool file data of \"f\": expected 3 bytes of file data, got 1");
        // A stream that ends inside a header block.
        let mut tar = LayerBuilder::new().file("f", "abc").build();
        tar.truncate(100);
        let err = apply(&mut Tree::new(), 0, tar).unwrap_err();
        assert!(matches!(&err, LayerError::Malformed { offset: 0, reason } if reason == "the archive ends inside a header"), "{err:?}");
        assert_eq!(err.to_string(), "malformed tar stream at byte 0 of the layer: the archive ends inside a header");
    }

    #[test]
    fn hard_link_to_missing_does_not_invent_directories() {
        let mut tree = Tree::new();
        let err = apply(&mut tree, 0, LayerBuilder::new().hardlink("h", "no/such/file").build()).unwrap_err();
        assert!(matches!(err, LayerError::HardLinkMissing { .. }));
        assert!(listing(&tree).is_empty());
    }

    /// A GNU sparse header: `segments` of `(offset, data)` in a file of `real_size`.
    fn sparse_entry(name: &str, real_size: u64, segments: &[(u64, &[u8])]) -> Vec<u8> {
        fn num<const N: usize>(v: u64) -> [u8; N] {
            let mut f = [0u8; N];
            f[0] = 0x80;
            f[N - 8..].copy_from_slice(&v.to_be_bytes());
            f
        }
        let stored: usize = segments.iter().map(|(_, d)| d.len()).sum();
        let mut h = LayerBuilder::header(EntryType::GNUSparse, 0o644, stored as u64);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.realsize = num(real_size);
        for (slot, (offset, data)) in gnu.sparse.iter_mut().zip(segments) {
            slot.offset = num(*offset);
            slot.numbytes = num(data.len() as u64);
        }
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        for (_, data) in segments {
            tar.extend_from_slice(data);
        }
        tar.resize(tar.len().next_multiple_of(512) + 1024, 0);
        tar
    }

    #[test]
    fn sparse_files_are_spooled_with_holes_not_zeros() {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = ([b'a'; 512], [b'b'; 512]);
        let tar = sparse_entry("s", 10 << 20, &[(0, &a), (8 << 20, &b)]);
        let spool_dir = tempfile::tempdir().unwrap();
        let mut tree = Tree::new();
        let intake = Intake { spool_dir: Some(spool_dir.path().to_path_buf()), ..Intake::default() };
        tree.apply_layer(&tar[..], 0, &intake).unwrap();
        let idx = tree.lookup(&RelPath::parse_user("s").unwrap()).unwrap();
        let Body::File(content) = tree.inode(idx).body.clone() else { panic!("a file") };
        let mut bytes = Vec::new();
        tree.open_content(&content).unwrap().read_to_end(&mut bytes).unwrap();
        let mut want = vec![0u8; 10 << 20];
        want[..512].copy_from_slice(&a);
        want[8 << 20..(8 << 20) + 512].copy_from_slice(&b);
        assert!(bytes == want, "the sparse file reads back as its segments and zeros");
        // The spool holds the two segments, not 10 MiB of zeros.
        let super::super::Content::Extent { file, .. } = content else { panic!("spooled") };
        let allocated = tree.spools_mut().file(file).metadata().unwrap().blocks() * 512;
        assert!(allocated < 1 << 20, "{allocated} bytes allocated for 1 KiB of data");

        // Declared sizes are judged before a byte is read, across layers.
        let small = Intake { limits: Limits { max_spool_bytes: 15 << 20, ..Limits::default() }, ..Intake::default() };
        let mut tree = Tree::new();
        tree.apply_layer(&tar[..], 0, &small).unwrap();
        let err = tree.apply_layer(&sparse_entry("t", 10 << 20, &[])[..], 1, &small).unwrap_err();
        assert!(matches!(err, LayerError::SpoolLimit { size, total, .. } if size == 10 << 20 && total == 20 << 20), "{err}");
        // Segments past the declared size are malformed, not spooled.
        let bad = sparse_entry("u", 1024, &[(4096, &a)]);
        assert!(matches!(Tree::new().apply_layer(&bad[..], 0, &Intake::default()), Err(LayerError::Malformed { .. })));
    }

    #[test]
    fn header_records_are_judged_by_their_declared_size() {
        // A GNU long name over the limit, a PAX record with a newline in a
        // binary xattr value (parsed by its length, not by lines).
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = LayerBuilder::header(EntryType::Regular, 0o644, 0);
        builder.append_data(&mut h, "d/".repeat(100) + "f", &b""[..]).unwrap();
        let tar = builder.into_inner().unwrap();
        let tight = Intake { limits: Limits { max_header_bytes: 100, ..Limits::default() }, ..Intake::default() };
        let err = Tree::new().apply_layer(&tar[..], 0, &tight).unwrap_err();
        assert!(matches!(err, LayerError::HeaderTooLarge { what: "a GNU long name record", offset: 0, size: 202, limit: 100 }), "{err}");
        Tree::new().apply_layer(&tar[..], 0, &Intake::default()).unwrap();

        let mut builder = tar::Builder::new(Vec::new());
        builder.append_pax_extensions([("SCHILY.xattr.user.bin", &b"one\ntwo\n"[..])]).unwrap();
        let mut h = LayerBuilder::header(EntryType::Regular, 0o644, 0);
        builder.append_data(&mut h, "f", &b""[..]).unwrap();
        let mut tree = Tree::new();
        tree.apply_layer(&builder.into_inner().unwrap()[..], 0, &Intake::default()).unwrap();
        let idx = tree.lookup(&RelPath::parse_user("f").unwrap()).unwrap();
        assert_eq!(tree.inode(idx).meta.xattrs.get(&b"user.bin"[..]).map(Vec::as_slice), Some(&b"one\ntwo\n"[..]));
    }

    #[test]
    fn names_targets_and_xattrs_count_against_one_metadata_budget() {
        // Each entry is small and under every other limit; together their
        // names, link targets and xattrs pass the budget (counted across layers).
        let layer = |prefix: &str| {
            let mut builder = tar::Builder::new(Vec::new());
            for i in 0..10 {
                builder.append_pax_extensions([("SCHILY.xattr.user.pad", &[b'x'; 100][..])]).unwrap();
                let mut h = LayerBuilder::header(EntryType::Symlink, 0o777, 0);
                builder.append_link(&mut h, format!("{prefix}{i:02}"), "t".repeat(50)).unwrap();
            }
            builder.into_inner().unwrap()
        };
        // Per entry: a 3-byte name, 50 bytes of target, 21 + 100 of PAX record.
        let per_entry = 3 + 50 + "SCHILY.xattr.user.pad".len() as u64 + 100;
        let budget = Intake { limits: Limits { max_metadata_bytes: 15 * per_entry, ..Limits::default() }, ..Intake::default() };
        let mut tree = Tree::new();
        tree.apply_layer(&layer("a")[..], 0, &budget).unwrap();
        let err = tree.apply_layer(&layer("b")[..], 1, &budget).unwrap_err();
        assert!(matches!(&err, LayerError::TooMuchMetadata { path, limit } if path == "b05" && *limit == 15 * per_entry), "{err}");
        assert!(err.to_string().contains("--max-metadata-bytes"), "{err}");
        let mut tree = Tree::new();
        tree.apply_layer(&layer("a")[..], 0, &Intake::default()).unwrap();
        tree.apply_layer(&layer("b")[..], 1, &Intake::default()).unwrap();
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

    /// PAX values are bytes: a NUL inside a `linkpath` is named as a NUL, and
    /// a value of escape sequences is shown escaped.
    #[test]
    fn pax_values_with_nul_or_control_bytes_are_named_escaped() {
        let pax_then = |records: &[(&str, &[u8])], kind: EntryType| {
            let mut builder = tar::Builder::new(Vec::new());
            builder.append_pax_extensions(records.iter().map(|(k, v)| (*k, *v))).unwrap();
            let mut h = LayerBuilder::header(kind, 0o777, 0);
            builder.append_data(&mut h, "l", &b""[..]).unwrap();
            builder.into_inner().unwrap()
        };
        let err = apply(&mut Tree::new(), 0, pax_then(&[("linkpath", b"f\0../x")], EntryType::Symlink)).unwrap_err();
        assert_eq!(err.to_string(), r#"entry "l": symlink target "f\0../x" contains a NUL byte"#);
        let err = apply(&mut Tree::new(), 0, pax_then(&[("uid", b"\x1b[2J")], EntryType::Regular)).unwrap_err();
        assert_eq!(err.to_string(), r#"entry "l": PAX uid \u{1b}[2J is out of range"#);
    }
}
