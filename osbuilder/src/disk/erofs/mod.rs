//! An erofs image from a layout plan, uncompressed or LZ4-compressed.
//!
//! Written by hand from the kernel's `Documentation/filesystems/erofs.rst`
//! and `fs/erofs/erofs_fs.h`: no crate writes general erofs images (the
//! composefs crate's writer targets composefs metadata images only).
//!
//! Two phases like the ext4 writer. [`layout`] settles every inode (compact
//! 32-byte inodes where uid, gid, link count, size and mtime allow, else
//! extended 64-byte ones), its xattrs (inline, or shared when two or more
//! inodes carry the same one), its data layout and every block address; LZ4
//! compression happens here, on every core, because the metadata in front of
//! the data must know where each compressed file ends. [`ErofsLayout::write`]
//! then streams the image in block order into a [`Sink`].
//!
//! Data layouts: small files, symlinks and directory tails are packed inline
//! after their inode (unless `inline_data` is off, as for DAX, where only
//! plain files map directly), larger files are flat runs of blocks, files with
//! holes are chunk-based (a block map whose holes cost nothing), and with
//! compression every file larger than a block that shrinks is cut into
//! 4 KiB physical clusters with full lcluster indexes.
//!
//! The UUID is derived from [`ErofsOptions::seed`], every mtime is clamped to
//! [`ErofsOptions::source_date_epoch`], and the build time is the tree's most
//! common mtime: identical inputs give identical bytes.

mod compress;
mod format;
mod layout;
mod write;

use std::io;

use sha2::{Digest as _, Sha256};

pub use compress::Compression;

use crate::disk::Sink;
use crate::rootfs::Plan;

#[derive(Clone, Debug)]
pub struct ErofsOptions {
    pub compression: Compression,
    /// Pack file tails inline after their inodes. Off for DAX images: the
    /// kernel maps only plain (block-aligned) files directly.
    pub inline_data: bool,
    /// A fixed image size (a multiple of 4096); `None`: exactly what the
    /// content needs (erofs is read-only, there is no headroom to leave).
    pub size: Option<u64>,
    pub source_date_epoch: i64,
    pub seed: [u8; 32],
    /// At most 15 bytes.
    pub label: Option<String>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ErofsSummary {
    pub uuid: String,
    pub blocks: u64,
    pub inodes: u64,
    pub compression: Compression,
    /// Files stored as LZ4 physical clusters.
    pub compressed_files: u64,
    /// Files, directories and symlinks whose last block is packed inline.
    pub inline_tails: u64,
    pub metadata_blocks: u64,
    pub label: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ErofsError {
    #[error(
        "the erofs image needs at least {needed} bytes but the fixed size is {given} bytes; give a size of at least {needed} bytes or leave the size automatic"
    )]
    TooSmall { needed: u64, given: u64 },
    #[error("the fixed size {given} is not a multiple of 4096 bytes; round it to whole 4 KiB blocks")]
    SizeNotBlockMultiple { given: u64 },
    #[error("volume label {label:?} is {len} bytes; erofs labels hold at most 15 bytes, shorten it")]
    LabelTooLong { label: String, len: usize },
    #[error("the tree has {inodes} inodes, more than erofs numbers; split the image")]
    TooManyInodes { inodes: u64 },
    #[error("the image would be {blocks} blocks of 4 KiB, more than erofs addresses (2^32)")]
    TooManyBlocks { blocks: u64 },
    #[error("/{path}: a name of {len} bytes; erofs names hold at most 255 bytes")]
    NameTooLong { path: String, len: usize },
    #[error("/{path}: the inode and its extended attributes need more than one 4 KiB block; drop some attributes")]
    XattrsTooLarge { path: String },
    #[error("/{path}: extended attribute {name:?} is in no namespace erofs stores (user., trusted., security., system.posix_acl_*); drop it")]
    XattrNamespace { path: String, name: String },
    #[error("/{path}: extended attribute {name:?} has a name longer than 255 bytes after its prefix or a value longer than 65535 bytes; drop it")]
    XattrTooLong { path: String, name: String },
    #[error("cannot read /{path}: {source}")]
    ReadContent { path: String, source: io::Error },
    #[error("/{path} changed while the image was written (expected {expected} bytes); build from a stable tree")]
    ContentChanged { path: String, expected: u64 },
    #[error("cannot write the erofs image: {0}")]
    Write(#[source] io::Error),
}

/// The settled image.
#[derive(Debug)]
pub struct ErofsLayout {
    inner: layout::Layout,
    opts: ErofsOptions,
}

/// Lays out (and, if asked, compresses) the image for `plan`.
pub fn layout(plan: &Plan, opts: &ErofsOptions) -> Result<ErofsLayout, ErofsError> {
    Ok(ErofsLayout { inner: layout::Layout::new(plan, opts)?, opts: opts.clone() })
}

impl ErofsLayout {
    pub fn size_bytes(&self) -> u64 {
        self.inner.image_bytes
    }

    pub fn summary(&self) -> ErofsSummary {
        let l = &self.inner;
        ErofsSummary {
            uuid: format_uuid(&l.uuid),
            blocks: l.image_bytes / format::BLOCK as u64,
            inodes: l.inodes.len() as u64,
            compression: self.opts.compression,
            compressed_files: l.compressed_files,
            inline_tails: l.inline_tails,
            metadata_blocks: l.meta_end / format::BLOCK as u64,
            label: self.opts.label.clone(),
        }
    }

    /// Streams the image into `sink`, which ends at exactly [`Self::size_bytes`].
    pub fn write(&self, plan: &Plan, sink: &mut dyn Sink) -> Result<(), ErofsError> {
        write::write(&self.inner, plan, sink)
    }
}

fn derive_uuid(seed: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(b"osbuilder erofs uuid");
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    u[6] = (u[6] & 0x0f) | 0x40; // version 4 layout, derived not random
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

fn format_uuid(u: &[u8; 16]) -> String {
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests;
