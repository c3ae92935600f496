//! An ext4 filesystem image from a layout plan, without mounting anything.
//!
//! Two phases, like `object`'s ELF writer. [`layout`] reads the plan (and
//! each file's data runs), sizes the filesystem, and reserves every block
//! range: group metadata, the journal, directory and htree blocks, extent
//! tree blocks, xattr blocks and file data; a too-small fixed size fails
//! here, before any output. [`Ext4Layout::write`] then streams the image in
//! strictly increasing offset order into a [`Sink`], checking (in debug
//! builds) that every range starts where the layout put it. Unused space,
//! the journal body and file holes go through [`Sink::zeros`], so a seekable
//! sink leaves them as holes.
//!
//! The result: 4 KiB blocks, 256-byte inodes, features `has_journal ext_attr
//! dir_index filetype extents 64bit flex_bg sparse_super large_file
//! huge_file dir_nlink extra_isize metadata_csum`, every checksum filled in.
//! Everything random in mke2fs (UUIDs, the htree hash seed) is derived from
//! [`Ext4Options::seed`] and every timestamp is clamped to
//! [`Ext4Options::source_date_epoch`], so identical inputs give identical bytes.

mod csum;
mod format;
mod hash;
mod layout;
mod write;

use std::io;

pub use layout::{BlockNo, GroupNo, InodeNo};

use crate::disk::Sink;
use crate::rootfs::Plan;

/// How to build the filesystem.
#[derive(Clone, Debug)]
pub struct Ext4Options {
    pub size: Ext4Size,
    /// Blocks reserved for root, in percent of all blocks (0 to 50).
    pub reserved_percent: f64,
    /// Every timestamp is clamped to this; it is also the mkfs and write time.
    pub source_date_epoch: i64,
    /// Where the UUID, the htree hash seed and the journal UUID come from.
    pub seed: [u8; 32],
    /// The volume label, at most 16 bytes.
    pub label: Option<String>,
    /// Whether to create an internal journal.
    pub journal: bool,
}

/// The size of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ext4Size {
    /// What the content and all metadata need, plus `headroom` free space.
    Auto { headroom: Headroom },
    /// Exactly this many bytes (a multiple of 4096).
    Fixed(u64),
}

/// Free space beyond what the content needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Headroom {
    Bytes(u64),
    /// Percent of the blocks the content and metadata use.
    Percent(u32),
}

/// What the filesystem looks like, for the CLI and the build manifest.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Ext4Summary {
    pub uuid: String,
    pub blocks: u64,
    pub free_blocks: u64,
    pub inodes: u64,
    pub free_inodes: u64,
    pub block_groups: u64,
    pub journal_blocks: u64,
    pub label: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error(
        "the filesystem needs at least {needed} bytes but the fixed size is {given} bytes; give a size of at least {needed} bytes or use an automatic size"
    )]
    TooSmall { needed: u64, given: u64 },
    #[error("the fixed size {given} is not a multiple of 4096 bytes; round it to whole 4 KiB blocks")]
    SizeNotBlockMultiple { given: u64 },
    #[error("the reserved percentage {0} is outside 0 to 50")]
    ReservedPercent(f64),
    #[error("volume label {label:?} is {len} bytes; ext4 labels hold at most 16 bytes, shorten it")]
    LabelTooLong { label: String, len: usize },
    #[error("the tree has {inodes} inodes; ext4 holds fewer than 2^32, split the image")]
    TooManyInodes { inodes: u64 },
    #[error("the filesystem would be {blocks} blocks of 4 KiB, more than ext4 can address")]
    TooManyBlocks { blocks: u64 },
    #[error("/{path} is {size} bytes; ext4 with 4 KiB blocks holds files up to 16 TiB")]
    FileTooLarge { path: String, size: u64 },
    #[error("/{path} has {links} names; ext4 allows at most 65000 hard links to a file")]
    TooManyLinks { path: String, links: u32 },
    #[error("/{path}: the symlink target is {len} bytes; ext4 holds targets up to 4095 bytes")]
    SymlinkTooLong { path: String, len: usize },
    #[error("/{path}: a name of {len} bytes; ext4 names hold at most 255 bytes")]
    NameTooLong { path: String, len: usize },
    #[error("/{path}: the directory has {entries} entries, more than a two-level htree indexes; split it")]
    DirectoryTooLarge { path: String, entries: usize },
    #[error("/{path}: the extended attributes need {needed} bytes, more than one 4 KiB xattr block holds; drop some of them")]
    XattrsTooLarge { path: String, needed: usize },
    #[error("/{path}: extended attribute {name:?} is in no namespace ext4 stores (user., trusted., security., system.); drop it")]
    XattrNamespace { path: String, name: String },
    #[error("/{path}: extended attribute {name:?} has a name longer than 255 bytes or a value longer than 4000 bytes; drop it")]
    XattrTooLong { path: String, name: String },
    #[error("/{path}: {name} is not a valid POSIX ACL (version 2, 8-byte entries); fix or drop it")]
    BadAcl { path: String, name: String },
    #[error("/lost+found is not a directory; e2fsck needs it to be one, remove or replace it in the tree")]
    LostFoundNotDirectory,
    #[error("cannot read /{path}: {source}")]
    ReadContent { path: String, source: io::Error },
    #[error("/{path} changed while the image was written (expected {expected} bytes); build from a stable tree")]
    ContentChanged { path: String, expected: u64 },
    #[error("cannot write the ext4 image: {0}")]
    Write(#[source] io::Error),
}

/// The settled image: every block range reserved, nothing written yet.
#[derive(Debug)]
pub struct Ext4Layout {
    inner: layout::Layout,
}

/// Sizes the filesystem for `plan` and reserves every block range.
pub fn layout(plan: &Plan, opts: &Ext4Options) -> Result<Ext4Layout, Ext4Error> {
    Ok(Ext4Layout { inner: layout::Layout::new(plan, opts)? })
}

impl Ext4Layout {
    /// The image size in bytes (a multiple of 4096).
    pub fn size_bytes(&self) -> u64 {
        self.inner.image_bytes
    }

    pub fn summary(&self) -> Ext4Summary {
        self.inner.summary()
    }

    /// Streams the image into `sink`, which ends at exactly [`Self::size_bytes`].
    /// `plan` must be the plan the layout was made from.
    pub fn write(&self, plan: &Plan, sink: &mut dyn Sink) -> Result<(), Ext4Error> {
        write::write(&self.inner, plan, sink)
    }
}

#[cfg(test)]
mod tests;
