//! dm-verity: the sha256 hash tree over a filesystem, in veritysetup's
//! on-disk format (hash format version 1: every digest is
//! `sha256(salt || block)`; 4 KiB data and hash blocks; no superblock, as
//! Kata formats it with `veritysetup format --no-superblock`).
//!
//! Hand-written: no crate generates dm-verity hash trees (see the crate
//! notes); the format is small and `veritysetup verify` is the oracle the
//! tests hold it to.
//!
//! The tree, as the kernel reads it (drivers/md/dm-verity-target.c and
//! Documentation/admin-guide/device-mapper/verity.rst): level 0 holds one
//! digest per data block, 128 digests per 4 KiB hash block; level *i + 1*
//! holds one digest per hash block of level *i*; the last block of every
//! level is zero-padded. The levels stop at the first one that fits in one
//! block, and the root hash is the digest of that block. On disk the levels
//! are stored top level first, leaf level last, each starting on a block.
//!
//! [`VerityTap`] sits between a filesystem writer and its sink: the bytes
//! pass through unchanged while every data block is hashed (holes from
//! [`Sink::zeros`] cost one cached digest per block). Only the leaf digests
//! are kept (32 bytes per 4 KiB, 1/128 of the filesystem); [`VerityTap::finish`]
//! builds the upper levels from them and returns the whole hash area.

use std::io;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::table::Guid;
use super::{Sink, ZEROS};

/// Data and hash block size (the only one we write, Kata's).
pub const BLOCK: u64 = 4096;
/// Bytes of salt, derived from the disk seed.
pub const SALT_LEN: usize = 32;
const DIGEST_LEN: usize = 32;
/// Digests per hash block (4096 / 32).
const PER_BLOCK: u64 = BLOCK / DIGEST_LEN as u64;
const BLOCK_USIZE: usize = BLOCK as usize;

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("the verity data area is {0} bytes, not a whole number of 4 KiB blocks")]
    Unaligned(u64),
    #[error("the filesystem writer produced {found} blocks of 4 KiB but {expected} were planned for the hash tree")]
    BlockCount { expected: u64, found: u64 },
    #[error("the filesystem is empty; dm-verity needs at least one data block")]
    Empty,
}

/// Hash blocks per level, leaf level (the kernel's level 0) first. Empty
/// for a single data block: its digest is the root hash itself.
pub fn level_blocks(data_blocks: u64) -> Vec<u64> {
    let mut levels = Vec::new();
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(PER_BLOCK);
        levels.push(n);
    }
    levels
}

/// Size of the hash area for `data_blocks` data blocks: what the hash
/// partition must hold (known before anything is written).
pub fn hash_area_bytes(data_blocks: u64) -> u64 {
    level_blocks(data_blocks).iter().sum::<u64>() * BLOCK
}

/// The salt for a disk: 32 bytes derived from the disk's seed with a fixed
/// label, so the same inputs give the same tree.
pub fn derive_salt(seed: &[u8; 32]) -> [u8; SALT_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(b"osbuilder dm-verity salt\0");
    hasher.update(seed);
    hasher.finalize().into()
}

fn salted(salt: &[u8]) -> Sha256 {
    let mut hasher = Sha256::new();
    hasher.update(salt);
    hasher
}

/// The finished tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerityTree {
    pub root_hash: [u8; DIGEST_LEN],
    pub salt: [u8; SALT_LEN],
    pub data_blocks: u64,
    /// Every hash block, top level first, as the hash device holds them.
    pub hash_area: Vec<u8>,
    /// Time spent hashing (leaves as the data passed, then the upper
    /// levels), for the report and the bench.
    pub hash_time: Duration,
}

impl VerityTree {
    /// GPT partition GUID of the data partition, as systemd-repart sets it
    /// and systemd's image dissection looks for it: the first 128 bits of
    /// the root hash, taken as the UUID's text-order bytes unchanged (no
    /// version or variant bits are forced, or the match would fail).
    pub fn data_partition_guid(&self) -> Guid {
        Guid(self.root_hash[..16].try_into().expect("16 of 32 bytes"))
    }

    /// GPT partition GUID of the hash partition: the last 128 bits.
    pub fn hash_partition_guid(&self) -> Guid {
        Guid(self.root_hash[DIGEST_LEN - 16..].try_into().expect("16 of 32 bytes"))
    }

    /// Kata's `kernel_verity_params` string.
    pub fn kata_params(&self) -> String {
        format!(
            "root_hash={},salt={},data_blocks={},data_block_size={BLOCK},hash_block_size={BLOCK}",
            hex::encode(self.root_hash),
            hex::encode(self.salt),
            self.data_blocks
        )
    }

    /// The `dm-mod.create=` argument for a read-only verity device over
    /// `data_dev` with the hash tree at the start of `hash_dev` (what Kata's
    /// runtime builds from `kernel_verity_params`).
    pub fn dm_mod_create(&self, data_dev: &str, hash_dev: &str) -> String {
        let sectors = self.data_blocks * (BLOCK / 512);
        format!(
            "dm-mod.create=\"dm-verity,,,ro,0 {sectors} verity 1 {data_dev} {hash_dev} {BLOCK} {BLOCK} {} 0 sha256 {} {}\"",
            self.data_blocks,
            hex::encode(self.root_hash),
            hex::encode(self.salt)
        )
    }
}

/// A sink that hashes every 4 KiB block passing through it into the leaf
/// level of a dm-verity tree, and forwards the bytes to `inner`.
pub struct VerityTap<S> {
    inner: S,
    salt: [u8; SALT_LEN],
    /// `sha256(salt)` so far: cloned for every block.
    base: Sha256,
    /// Digest of an all-zero block, for holes.
    zero_digest: [u8; DIGEST_LEN],
    /// Bytes of a block not yet complete (always fewer than 4096).
    partial: Vec<u8>,
    /// Level 0: one digest per data block.
    leaves: Vec<u8>,
    expected_blocks: u64,
    hash_time: Duration,
}

impl<S: Sink> VerityTap<S> {
    /// A tap for a data area of `expected_blocks` blocks (the size the
    /// hash partition was planned for).
    pub fn new(inner: S, salt: [u8; SALT_LEN], expected_blocks: u64) -> Self {
        let base = salted(&salt);
        let zero_digest = base.clone().chain_update(&ZEROS[..BLOCK_USIZE]).finalize().into();
        let leaves = Vec::with_capacity(usize::try_from(expected_blocks.saturating_mul(DIGEST_LEN as u64)).unwrap_or(0));
        VerityTap { inner, salt, base, zero_digest, partial: Vec::with_capacity(BLOCK_USIZE), leaves, expected_blocks, hash_time: Duration::ZERO }
    }

    fn blocks(&self) -> u64 {
        (self.leaves.len() / DIGEST_LEN) as u64
    }

    /// Builds the upper levels and returns the inner sink with the tree.
    pub fn finish(self) -> Result<(S, VerityTree), VerityError> {
        let found = self.blocks();
        if !self.partial.is_empty() {
            return Err(VerityError::Unaligned(found * BLOCK + self.partial.len() as u64));
        }
        if found == 0 {
            return Err(VerityError::Empty);
        }
        if found != self.expected_blocks {
            return Err(VerityError::BlockCount { expected: self.expected_blocks, found });
        }
        let t = Instant::now();
        let (root_hash, hash_area) = build_levels(&self.base, self.leaves);
        let hash_time = self.hash_time + t.elapsed();
        Ok((self.inner, VerityTree { root_hash, salt: self.salt, data_blocks: found, hash_area, hash_time }))
    }
}

/// From the leaf digests: the root hash and the hash area (top level first).
fn build_levels(base: &Sha256, leaves: Vec<u8>) -> ([u8; DIGEST_LEN], Vec<u8>) {
    if leaves.len() == DIGEST_LEN {
        // One data block: no hash blocks, its digest is the root.
        return (leaves[..].try_into().expect("one digest"), Vec::new());
    }
    // Each level padded to whole blocks, leaf level first.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut current = leaves;
    loop {
        current.resize(current.len().next_multiple_of(BLOCK_USIZE), 0);
        let next: Vec<u8> = current.chunks_exact(BLOCK_USIZE).flat_map(|b| <[u8; DIGEST_LEN]>::from(base.clone().chain_update(b).finalize())).collect();
        let top = current.len() == BLOCK_USIZE;
        levels.push(current);
        if top {
            let root = next[..].try_into().expect("one digest for one block");
            let mut area = Vec::with_capacity(levels.iter().map(Vec::len).sum());
            for level in levels.iter().rev() {
                area.extend_from_slice(level);
            }
            return (root, area);
        }
        current = next;
    }
}

impl<S: Sink> Sink for VerityTap<S> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        let t = Instant::now();
        self.absorb(buf);
        self.hash_time += t.elapsed();
        Ok(())
    }

    fn zeros(&mut self, len: u64) -> io::Result<()> {
        self.inner.zeros(len)?;
        let t = Instant::now();
        self.absorb_zeros(len);
        self.hash_time += t.elapsed();
        Ok(())
    }

    fn position(&self) -> u64 {
        self.inner.position()
    }
}

impl<S> VerityTap<S> {
    fn hash_block(&mut self, block: &[u8]) {
        debug_assert_eq!(block.len(), BLOCK_USIZE);
        let digest = self.base.clone().chain_update(block).finalize();
        self.leaves.extend_from_slice(&digest);
    }

    fn absorb(&mut self, buf: &[u8]) {
        let mut rest = buf;
        if !self.partial.is_empty() {
            let take = (BLOCK_USIZE - self.partial.len()).min(rest.len());
            self.partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if !self.flush_partial() {
                return;
            }
        }
        let mut chunks = rest.chunks_exact(BLOCK_USIZE);
        for block in &mut chunks {
            self.hash_block(block);
        }
        self.partial.extend_from_slice(chunks.remainder());
    }

    /// Hashes the partial block once it is whole (keeping its buffer);
    /// false while it still waits for bytes.
    fn flush_partial(&mut self) -> bool {
        if self.partial.len() < BLOCK_USIZE {
            return false;
        }
        let block = std::mem::take(&mut self.partial);
        self.hash_block(&block);
        self.partial = block;
        self.partial.clear();
        true
    }

    fn absorb_zeros(&mut self, len: u64) {
        let mut left = len;
        if !self.partial.is_empty() {
            let take = (BLOCK_USIZE - self.partial.len()).min(usize::try_from(left).unwrap_or(usize::MAX));
            self.partial.resize(self.partial.len() + take, 0);
            left -= take as u64;
            if !self.flush_partial() {
                return;
            }
        }
        for _ in 0..left / BLOCK {
            self.leaves.extend_from_slice(&self.zero_digest);
        }
        self.partial.resize((left % BLOCK) as usize, 0);
    }
}

/// A sink that keeps nothing: for hashing a filesystem without writing it
/// (the GPT pre-pass, whose partition GUIDs come from the root hash).
#[derive(Default)]
pub struct NullSink {
    pos: u64,
}

impl Sink for NullSink {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.pos += buf.len() as u64;
        Ok(())
    }
    fn zeros(&mut self, len: u64) -> io::Result<()> {
        self.pos += len;
        Ok(())
    }
    fn position(&self) -> u64 {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::StreamSink;
    use std::process::Command;

    const SALT: [u8; SALT_LEN] = [0x5a; SALT_LEN];

    /// Deterministic data with zero blocks mixed in: block `i` is zero when
    /// `i % 5 == 3`.
    fn data(blocks: u64) -> Vec<u8> {
        let mut out = vec![0u8; (blocks * BLOCK) as usize];
        let mut x: u32 = 0x1234_5678;
        for (i, block) in out.chunks_exact_mut(BLOCK_USIZE).enumerate() {
            if i % 5 == 3 {
                continue;
            }
            for b in block.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
        }
        out
    }

    /// Feeds `bytes` in awkward pieces, writing zero runs through `zeros`.
    fn tap(bytes: &[u8], expected: u64) -> VerityTree {
        let mut tap = VerityTap::new(StreamSink::new(Vec::new()), SALT, expected);
        let mut i = 0;
        let mut step = 1usize;
        while i < bytes.len() {
            let end = (i + step).min(bytes.len());
            let piece = &bytes[i..end];
            if piece.iter().all(|&b| b == 0) {
                tap.zeros(piece.len() as u64).unwrap();
            } else {
                tap.write_all(piece).unwrap();
            }
            i = end;
            step = (step * 7 + 1000) % 20000 + 1;
        }
        let (inner, tree) = tap.finish().unwrap();
        assert_eq!(inner.into_inner(), bytes, "the tap passes the bytes through");
        tree
    }

    fn veritysetup(args: &[&str]) -> String {
        let out = Command::new("veritysetup").args(args).output().unwrap_or_else(|e| panic!("veritysetup runs (install cryptsetup-bin): {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "veritysetup {args:?}: {text}");
        text
    }

    /// Our tree against `veritysetup format --no-superblock` on the same
    /// data: the same root hash and byte-identical hash area; and
    /// `veritysetup verify` accepts ours.
    #[test]
    fn matches_veritysetup_format() {
        let dir = tempfile::tempdir().unwrap();
        // 1 block, 2 blocks, exactly one hash block, one more, two levels
        // exactly full, three levels.
        for blocks in [1u64, 2, 127, 128, 129, 1000, 16384, 16385] {
            let bytes = data(blocks);
            let tree = tap(&bytes, blocks);
            assert_eq!(tree.data_blocks, blocks);
            assert_eq!(tree.hash_area.len() as u64, hash_area_bytes(blocks), "{blocks} blocks");
            let data_path = dir.path().join(format!("data-{blocks}"));
            let theirs = dir.path().join(format!("hash-theirs-{blocks}"));
            let ours = dir.path().join(format!("hash-ours-{blocks}"));
            std::fs::write(&data_path, &bytes).unwrap();
            std::fs::write(&ours, &tree.hash_area).unwrap();
            let salt = hex::encode(SALT);
            let d = data_path.to_str().unwrap();
            // Our parameters, as veritysetup spells them.
            let params = ["--no-superblock", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096", "--salt", &salt];
            let text = veritysetup(&[&["format"][..], &params, &[d, theirs.to_str().unwrap()]].concat());
            let root = text.lines().find_map(|l| l.strip_prefix("Root hash:")).unwrap_or_else(|| panic!("{text}")).trim();
            assert_eq!(root, hex::encode(tree.root_hash), "{blocks} blocks: root hash");
            let theirs_bytes = std::fs::read(&theirs).unwrap();
            assert_eq!(theirs_bytes.len(), tree.hash_area.len(), "{blocks} blocks: hash area size");
            assert!(theirs_bytes == tree.hash_area, "{blocks} blocks: hash areas differ");
            veritysetup(&[&["verify"][..], &params, &[d, ours.to_str().unwrap(), root]].concat());
        }
    }

    #[test]
    fn a_flipped_byte_changes_the_root_and_verify_fails() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = data(300);
        let tree = tap(&bytes, 300);
        bytes[200 * BLOCK_USIZE + 17] ^= 1;
        assert_ne!(tap(&bytes, 300).root_hash, tree.root_hash);
        let d = dir.path().join("data");
        let h = dir.path().join("hash");
        std::fs::write(&d, &bytes).unwrap();
        std::fs::write(&h, &tree.hash_area).unwrap();
        let out = Command::new("veritysetup")
            .args(["verify", "--no-superblock", "--salt", &hex::encode(SALT)])
            .arg(&d)
            .arg(&h)
            .arg(hex::encode(tree.root_hash))
            .output()
            .unwrap();
        assert!(!out.status.success(), "veritysetup verify must reject tampered data");
    }

    #[test]
    fn sizes_and_levels() {
        assert_eq!(level_blocks(1), Vec::<u64>::new());
        assert_eq!(level_blocks(2), [1]);
        assert_eq!(level_blocks(128), [1]);
        assert_eq!(level_blocks(129), [2, 1]);
        assert_eq!(level_blocks(16385), [129, 2, 1]);
        // 1 GiB of data: 2048 leaf blocks + 16 + 1.
        assert_eq!(hash_area_bytes(262144), (2048 + 16 + 1) * BLOCK);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let mut t = VerityTap::new(NullSink::default(), SALT, 2);
        t.write_all(&[1; 4096]).unwrap();
        t.zeros(100).unwrap();
        assert!(matches!(t.finish(), Err(VerityError::Unaligned(4196))));
        let mut t = VerityTap::new(NullSink::default(), SALT, 2);
        t.zeros(3 * BLOCK).unwrap();
        assert!(matches!(t.finish(), Err(VerityError::BlockCount { expected: 2, found: 3 })));
        assert!(matches!(VerityTap::new(NullSink::default(), SALT, 0).finish(), Err(VerityError::Empty)));
    }

    #[test]
    fn guids_params_and_salt() {
        let mut tree = VerityTree { root_hash: [0; 32], salt: SALT, data_blocks: 10, hash_area: Vec::new(), hash_time: Duration::ZERO };
        for (i, b) in tree.root_hash.iter_mut().enumerate() {
            *b = i as u8;
        }
        assert_eq!(tree.data_partition_guid().to_string(), "00010203-0405-0607-0809-0a0b0c0d0e0f");
        assert_eq!(tree.hash_partition_guid().to_string(), "10111213-1415-1617-1819-1a1b1c1d1e1f");
        let root = hex::encode(tree.root_hash);
        let salt = hex::encode(SALT);
        assert_eq!(tree.kata_params(), format!("root_hash={root},salt={salt},data_blocks=10,data_block_size=4096,hash_block_size=4096"));
        assert_eq!(
            tree.dm_mod_create("/dev/vda1", "/dev/vda2"),
            format!("dm-mod.create=\"dm-verity,,,ro,0 80 verity 1 /dev/vda1 /dev/vda2 4096 4096 10 0 sha256 {root} {salt}\"")
        );
        assert_eq!(derive_salt(&[1; 32]), derive_salt(&[1; 32]));
        assert_ne!(derive_salt(&[1; 32]), derive_salt(&[2; 32]));
    }
}
