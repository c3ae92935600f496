//! Pure encoders for ext4's on-disk structures, from the kernel's
//! `Documentation/filesystems/ext4` and `fs/ext4/ext4.h`: superblock, group
//! descriptor, inode, extent tree nodes, directory entries and htree nodes,
//! xattr entries, and the jbd2 superblock. Each takes plain values and
//! returns bytes with its checksum filled in; none allocates a block.

use super::csum::{crc32c_parts, crc32c_raw};

pub const BLOCK_SIZE: u64 = 4096;
pub const BLOCK: usize = BLOCK_SIZE as usize;
pub const BLOCKS_PER_GROUP: u64 = 32768;
pub const INODE_SIZE: usize = 256;
/// Bytes of the inode past the 128-byte base that this writer uses.
pub const EXTRA_ISIZE: usize = 32;
pub const DESC_SIZE: usize = 64;
pub const LOG_GROUPS_PER_FLEX: u32 = 4;
pub const GROUPS_PER_FLEX: u64 = 1 << LOG_GROUPS_PER_FLEX;
pub const FIRST_INO: u32 = 11;
pub const ROOT_INO: u32 = 2;
pub const JOURNAL_INO: u32 = 8;
pub const LOST_FOUND_INO: u32 = 11;
/// The longest initialized extent.
pub const MAX_EXTENT_LEN: u64 = 32768;
/// Extent entries in one tree block: (4096 - 12 header - 4 tail) / 12.
pub const EXTENTS_PER_BLOCK: usize = (BLOCK - 12 - 4) / 12;
/// Extent entries in the inode's `i_block`.
pub const EXTENTS_IN_INODE: usize = 4;

pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const COMPAT_EXT_ATTR: u32 = 0x8;
pub const COMPAT_DIR_INDEX: u32 = 0x20;
pub const INCOMPAT_FILETYPE: u32 = 0x2;
pub const INCOMPAT_EXTENTS: u32 = 0x40;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_FLEX_BG: u32 = 0x200;
pub const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
pub const RO_COMPAT_LARGE_FILE: u32 = 0x2;
pub const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub const RO_COMPAT_DIR_NLINK: u32 = 0x20;
pub const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

pub const INODE_FLAG_INDEX: u32 = 0x1000;
pub const INODE_FLAG_EXTENTS: u32 = 0x8_0000;

pub const BG_INODE_ZEROED: u16 = 0x4;

/// The directory file type (`EXT4_FT_DIR`) of the entries the writer makes
/// itself; the tree's come from [`crate::rootfs::Body::dirent_type`].
pub const FT_DIR: u8 = 2;

/// Bytes of a leaf directory block usable for entries: the last 12 hold the
/// checksum tail.
pub const DIR_LEAF_SPACE: usize = BLOCK - 12;
/// Index entries in the htree root (after `.`, `..`, the root info and the
/// count/limit, minus one slot for the dx tail).
pub const DX_ROOT_LIMIT: usize = (BLOCK - 32) / 8 - 1;
/// Index entries in an interior htree node.
pub const DX_NODE_LIMIT: usize = (BLOCK - 8) / 8 - 1;

pub const XATTR_MAGIC: u32 = 0xEA02_0000;
pub const JBD2_MAGIC: u32 = 0xC03B_3998;

fn put16(buf: &mut [u8], off: usize, v: u16) {
    buf[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put32_be(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

/// Seconds as ext4 stores them: the low 32 bits, and the two epoch bits of
/// the `_extra` field (nanoseconds zero).
pub fn encode_time(secs: i64) -> (u32, u32) {
    let lo = secs as u32;
    let epoch = ((secs - i64::from(lo as i32)) >> 32) as u32 & 3;
    (lo, epoch)
}

/// Everything the superblock records, in plain values.
#[derive(Clone, Debug)]
pub struct SuperblockFields {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub r_blocks_count: u64,
    pub free_blocks_count: u64,
    pub free_inodes_count: u32,
    pub inodes_per_group: u32,
    /// mkfs, write and last-check time.
    pub time: i64,
    pub uuid: [u8; 16],
    pub label: [u8; 16],
    pub hash_seed: [u32; 4],
    /// `s_jnl_blocks`: the journal inode's `i_block` words, then its size.
    pub journal_blocks: Option<[u32; 17]>,
    pub block_group_nr: u16,
}

/// The 1024-byte superblock with its checksum.
pub fn encode_superblock(f: &SuperblockFields) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    put32(&mut b, 0x0, f.inodes_count);
    put32(&mut b, 0x4, f.blocks_count as u32);
    put32(&mut b, 0x8, f.r_blocks_count as u32);
    put32(&mut b, 0xC, f.free_blocks_count as u32);
    put32(&mut b, 0x10, f.free_inodes_count);
    put32(&mut b, 0x14, 0); // s_first_data_block: 0 with 4 KiB blocks
    put32(&mut b, 0x18, 2); // s_log_block_size: 1024 << 2
    put32(&mut b, 0x1C, 2); // s_log_cluster_size
    put32(&mut b, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x28, f.inodes_per_group);
    let (time, time_hi) = (f.time as u32, (f.time >> 32) as u8);
    put32(&mut b, 0x2C, 0); // s_mtime: never mounted
    put32(&mut b, 0x30, time); // s_wtime
    put16(&mut b, 0x34, 0); // s_mnt_count
    put16(&mut b, 0x36, 0xFFFF); // s_max_mnt_count: -1, no forced checks
    put16(&mut b, 0x38, 0xEF53);
    put16(&mut b, 0x3A, 1); // s_state: clean
    put16(&mut b, 0x3C, 1); // s_errors: continue
    put32(&mut b, 0x40, time); // s_lastcheck
    put32(&mut b, 0x48, 0); // s_creator_os: Linux
    put32(&mut b, 0x4C, 1); // s_rev_level: dynamic
    put32(&mut b, 0x54, FIRST_INO);
    put16(&mut b, 0x58, INODE_SIZE as u16);
    put16(&mut b, 0x5A, f.block_group_nr);
    let mut compat = COMPAT_EXT_ATTR | COMPAT_DIR_INDEX;
    if f.journal_blocks.is_some() {
        compat |= COMPAT_HAS_JOURNAL;
    }
    put32(&mut b, 0x5C, compat);
    put32(&mut b, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG);
    put32(
        &mut b,
        0x64,
        RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_HUGE_FILE | RO_COMPAT_DIR_NLINK | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_METADATA_CSUM,
    );
    b[0x68..0x78].copy_from_slice(&f.uuid);
    b[0x78..0x88].copy_from_slice(&f.label);
    if let Some(jnl) = &f.journal_blocks {
        put32(&mut b, 0xE0, JOURNAL_INO);
        for (i, w) in jnl.iter().enumerate() {
            put32(&mut b, 0x10C + 4 * i, *w);
        }
        b[0xFD] = 1; // s_jnl_backup_type: EXT3_JNL_BACKUP_BLOCKS
    }
    for (i, w) in f.hash_seed.iter().enumerate() {
        put32(&mut b, 0xEC + 4 * i, *w);
    }
    b[0xFC] = 1; // s_def_hash_version: half_md4
    put16(&mut b, 0xFE, DESC_SIZE as u16);
    put32(&mut b, 0x100, 0x000C); // s_default_mount_opts: user_xattr, acl
    put32(&mut b, 0x108, time); // s_mkfs_time
    put32(&mut b, 0x150, (f.blocks_count >> 32) as u32);
    put32(&mut b, 0x154, (f.r_blocks_count >> 32) as u32);
    put32(&mut b, 0x158, (f.free_blocks_count >> 32) as u32);
    put16(&mut b, 0x15C, EXTRA_ISIZE as u16);
    put16(&mut b, 0x15E, EXTRA_ISIZE as u16);
    put32(&mut b, 0x160, 0x2); // s_flags: EXT2_FLAGS_UNSIGNED_HASH
    b[0x174] = LOG_GROUPS_PER_FLEX as u8;
    b[0x175] = 1; // s_checksum_type: crc32c
    put32(&mut b, 0x268, LOST_FOUND_INO); // s_lpf_ino
    b[0x274] = time_hi; // s_wtime_hi
    b[0x276] = time_hi; // s_mkfs_time_hi
    b[0x277] = time_hi; // s_lastcheck_hi
    let csum = crc32c_raw(!0, &b[..0x3FC]);
    put32(&mut b, 0x3FC, csum);
    b
}

/// One block group's descriptor, in plain values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupDesc {
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub used_dirs: u32,
    pub flags: u16,
    pub itable_unused: u32,
    pub block_bitmap_csum: u32,
    pub inode_bitmap_csum: u32,
}

/// The 64-byte descriptor of group `group` with its checksum.
pub fn encode_group_desc(d: &GroupDesc, group: u32, fs_seed: u32) -> [u8; DESC_SIZE] {
    let mut b = [0u8; DESC_SIZE];
    put32(&mut b, 0x0, d.block_bitmap as u32);
    put32(&mut b, 0x4, d.inode_bitmap as u32);
    put32(&mut b, 0x8, d.inode_table as u32);
    put16(&mut b, 0xC, d.free_blocks as u16);
    put16(&mut b, 0xE, d.free_inodes as u16);
    put16(&mut b, 0x10, d.used_dirs as u16);
    put16(&mut b, 0x12, d.flags);
    put16(&mut b, 0x18, d.block_bitmap_csum as u16);
    put16(&mut b, 0x1A, d.inode_bitmap_csum as u16);
    put16(&mut b, 0x1C, d.itable_unused as u16);
    put32(&mut b, 0x20, (d.block_bitmap >> 32) as u32);
    put32(&mut b, 0x24, (d.inode_bitmap >> 32) as u32);
    put32(&mut b, 0x28, (d.inode_table >> 32) as u32);
    put16(&mut b, 0x2C, (d.free_blocks >> 16) as u16);
    put16(&mut b, 0x2E, (d.free_inodes >> 16) as u16);
    put16(&mut b, 0x30, (d.used_dirs >> 16) as u16);
    put16(&mut b, 0x32, (d.itable_unused >> 16) as u16);
    put16(&mut b, 0x38, (d.block_bitmap_csum >> 16) as u16);
    put16(&mut b, 0x3A, (d.inode_bitmap_csum >> 16) as u16);
    let csum = crc32c_parts(fs_seed, &[&group.to_le_bytes(), &b]);
    put16(&mut b, 0x1E, csum as u16);
    b
}

/// An inode in plain values; `time` is used for atime, ctime, mtime and crtime.
#[derive(Clone, Debug)]
pub struct InodeFields {
    /// File type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub time: i64,
    pub links: u16,
    /// Blocks of 512 bytes, data and metadata.
    pub sectors: u64,
    pub flags: u32,
    pub block: [u8; 60],
    pub file_acl: u64,
    /// The in-inode xattr area (after the extra fields), empty or exactly
    /// `INODE_SIZE - 128 - EXTRA_ISIZE` bytes starting with the magic.
    pub inline_xattrs: Vec<u8>,
}

/// The 256-byte inode `ino` with its checksum (generation 0).
pub fn encode_inode(f: &InodeFields, ino: u32, fs_seed: u32) -> [u8; INODE_SIZE] {
    let mut b = [0u8; INODE_SIZE];
    let (t, t_extra) = encode_time(f.time);
    put16(&mut b, 0x0, f.mode);
    put16(&mut b, 0x2, f.uid as u16);
    put32(&mut b, 0x4, f.size as u32);
    put32(&mut b, 0x8, t);
    put32(&mut b, 0xC, t);
    put32(&mut b, 0x10, t);
    put16(&mut b, 0x18, f.gid as u16);
    put16(&mut b, 0x1A, f.links);
    put32(&mut b, 0x1C, f.sectors as u32);
    put32(&mut b, 0x20, f.flags);
    b[0x28..0x64].copy_from_slice(&f.block);
    put32(&mut b, 0x68, f.file_acl as u32);
    put32(&mut b, 0x6C, (f.size >> 32) as u32);
    put16(&mut b, 0x74, (f.sectors >> 32) as u16);
    put16(&mut b, 0x76, (f.file_acl >> 32) as u16);
    put16(&mut b, 0x78, (f.uid >> 16) as u16);
    put16(&mut b, 0x7A, (f.gid >> 16) as u16);
    put16(&mut b, 0x80, EXTRA_ISIZE as u16);
    put32(&mut b, 0x84, t_extra);
    put32(&mut b, 0x88, t_extra);
    put32(&mut b, 0x8C, t_extra);
    put32(&mut b, 0x90, t);
    put32(&mut b, 0x94, t_extra);
    let xattr_at = 128 + EXTRA_ISIZE;
    if !f.inline_xattrs.is_empty() {
        b[xattr_at..].copy_from_slice(&f.inline_xattrs);
    }
    let csum = crc32c_raw(super::csum::inode_seed(fs_seed, ino, 0), &b);
    put16(&mut b, 0x7C, csum as u16);
    put16(&mut b, 0x82, (csum >> 16) as u16);
    b
}

/// A leaf extent: `len` blocks from logical `logical` at physical `start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub len: u16,
    pub start: u64,
}

/// An interior extent-tree entry: the subtree from logical `logical` lives in block `child`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtentIndex {
    pub logical: u32,
    pub child: u64,
}

/// The 12-byte extent header.
pub fn encode_extent_header(buf: &mut [u8], entries: u16, max: u16, depth: u16) {
    put16(buf, 0, 0xF30A);
    put16(buf, 2, entries);
    put16(buf, 4, max);
    put16(buf, 6, depth);
    put32(buf, 8, 0);
}

pub fn encode_extent(buf: &mut [u8], e: &Extent) {
    put32(buf, 0, e.logical);
    put16(buf, 4, e.len);
    put16(buf, 6, (e.start >> 32) as u16);
    put32(buf, 8, e.start as u32);
}

pub fn encode_extent_index(buf: &mut [u8], e: &ExtentIndex) {
    put32(buf, 0, e.logical);
    put32(buf, 4, e.child as u32);
    put16(buf, 8, (e.child >> 32) as u16);
    put16(buf, 10, 0);
}

/// Either kind of extent-tree entry, to encode one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentEntry {
    Leaf(Extent),
    Index(ExtentIndex),
}

impl ExtentEntry {
    pub fn logical(&self) -> u32 {
        match self {
            ExtentEntry::Leaf(e) => e.logical,
            ExtentEntry::Index(e) => e.logical,
        }
    }
}

/// Encodes an extent node (header then entries) into `buf` (60 bytes for
/// the inode's root, a whole block otherwise); `depth` 0 holds leaves.
pub fn encode_extent_node(buf: &mut [u8], entries: &[ExtentEntry], depth: u16) {
    let max = (buf.len() - 12) / 12;
    debug_assert!(entries.len() <= max);
    encode_extent_header(buf, entries.len() as u16, max as u16, depth);
    for (i, entry) in entries.iter().enumerate() {
        let at = &mut buf[12 + 12 * i..24 + 12 * i];
        match entry {
            ExtentEntry::Leaf(e) => encode_extent(at, e),
            ExtentEntry::Index(e) => encode_extent_index(at, e),
        }
    }
}

/// Fills the checksum tail of an extent tree block of inode `ino`.
pub fn seal_extent_block(block: &mut [u8], ino_seed: u32) {
    let tail = 12 + 12 * EXTENTS_PER_BLOCK;
    let csum = crc32c_raw(ino_seed, &block[..tail]);
    put32(block, tail, csum);
}

/// The length of a directory entry holding a `name_len`-byte name.
pub fn dirent_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Writes a directory entry at the start of `buf`; `rec_len` may exceed
/// the entry's own length (the rest of the block, for the last entry).
pub fn encode_dirent(buf: &mut [u8], ino: u32, rec_len: usize, name: &[u8], file_type: u8) {
    put32(buf, 0, ino);
    put16(buf, 4, rec_len as u16);
    buf[6] = name.len() as u8;
    buf[7] = file_type;
    buf[8..8 + name.len()].copy_from_slice(name);
}

/// Writes the 12-byte checksum tail of a leaf directory block.
pub fn seal_dir_leaf(block: &mut [u8], ino_seed: u32) {
    let at = DIR_LEAF_SPACE;
    put32(block, at, 0);
    put16(block, at + 4, 12);
    block[at + 6] = 0;
    block[at + 7] = 0xDE;
    let csum = crc32c_raw(ino_seed, &block[..at]);
    put32(block, at + 8, csum);
}

/// The htree root block: `.`, `..`, the root info and the index entries
/// (`entries[0].0` is ignored: the first entry covers hash 0).
pub fn encode_dx_root(block: &mut [u8], ino: u32, parent: u32, levels: u8, entries: &[(u32, u32)], ino_seed: u32) {
    encode_dirent(&mut block[0..], ino, 12, b".", FT_DIR);
    encode_dirent(&mut block[12..], parent, BLOCK - 12, b"..", FT_DIR);
    put32(block, 24, 0);
    block[28] = 1; // hash version: half_md4 (the superblock says unsigned)
    block[29] = 8; // info length
    block[30] = levels;
    block[31] = 0;
    encode_dx_entries(block, 32, DX_ROOT_LIMIT, entries, ino_seed);
}

/// An interior htree node.
pub fn encode_dx_node(block: &mut [u8], entries: &[(u32, u32)], ino_seed: u32) {
    put32(block, 0, 0);
    put16(block, 4, BLOCK as u16);
    block[6] = 0;
    block[7] = 0;
    encode_dx_entries(block, 8, DX_NODE_LIMIT, entries, ino_seed);
}

fn encode_dx_entries(block: &mut [u8], at: usize, limit: usize, entries: &[(u32, u32)], ino_seed: u32) {
    debug_assert!(!entries.is_empty() && entries.len() <= limit);
    put16(block, at, limit as u16);
    put16(block, at + 2, entries.len() as u16);
    put32(block, at + 4, entries[0].1);
    for (i, (hash, child)) in entries.iter().enumerate().skip(1) {
        put32(block, at + 8 * i, *hash);
        put32(block, at + 8 * i + 4, *child);
    }
    let tail = at + 8 * limit;
    put32(block, tail, 0);
    put32(block, tail + 4, 0);
    let csum = crc32c_parts(ino_seed, &[&block[..at + 8 * entries.len()], &block[tail..tail + 8]]);
    put32(block, tail + 4, csum);
}

/// An extended attribute ready to be placed: namespace index, name suffix
/// and the value as ext4 stores it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct XattrEntry {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

impl XattrEntry {
    /// Bytes of the entry itself (without its value).
    pub fn entry_len(&self) -> usize {
        (16 + self.name.len() + 3) & !3
    }

    pub fn value_len(&self) -> usize {
        (self.value.len() + 3) & !3
    }
}

/// Lays out entries (in the given order) and values in `area`; values go at
/// the end of the area, growing down; offsets count from `value_base`.
/// Returns false when they do not fit (leaving 4 zero bytes after the last
/// entry).
fn encode_xattr_entries(area: &mut [u8], entries_at: usize, value_base: usize, entries: &[XattrEntry], with_hash: bool) -> bool {
    let table: usize = entries.iter().map(|e| e.entry_len()).sum::<usize>() + 4;
    let values: usize = entries.iter().map(|e| e.value_len()).sum();
    if entries_at + table + values > area.len() {
        return false;
    }
    let mut at = entries_at;
    let mut value_end = area.len();
    for e in entries {
        value_end -= e.value_len();
        area[value_end..value_end + e.value.len()].copy_from_slice(&e.value);
        area[at] = e.name.len() as u8;
        area[at + 1] = e.index;
        put16(area, at + 2, if e.value.is_empty() { 0 } else { (value_end - value_base) as u16 });
        put32(area, at + 4, 0);
        put32(area, at + 8, e.value.len() as u32);
        let hash = if with_hash { super::hash::xattr_entry_hash(&e.name, &e.value) } else { 0 };
        put32(area, at + 12, hash);
        area[at + 16..at + 16 + e.name.len()].copy_from_slice(&e.name);
        at += e.entry_len();
    }
    true
}

/// Bytes of the in-inode xattr area.
pub const INLINE_XATTR_SPACE: usize = INODE_SIZE - 128 - EXTRA_ISIZE;

/// The in-inode xattr area (magic, entries, values), or `None` when the
/// entries do not fit. In-inode entries carry no hash, as the kernel writes them.
pub fn encode_inline_xattrs(entries: &[XattrEntry]) -> Option<Vec<u8>> {
    let mut area = vec![0u8; INLINE_XATTR_SPACE];
    put32(&mut area, 0, XATTR_MAGIC);
    encode_xattr_entries(&mut area, 4, 4, entries, false).then_some(area)
}

/// An xattr block without its checksum (which depends on where it lands),
/// or `None` when the entries do not fit one block. `entries` must be
/// sorted as the kernel searches them (index, name length, name).
pub fn encode_xattr_block(entries: &[XattrEntry], refcount: u32) -> Option<Vec<u8>> {
    let mut block = vec![0u8; BLOCK];
    put32(&mut block, 0, XATTR_MAGIC);
    put32(&mut block, 4, refcount);
    put32(&mut block, 8, 1);
    if !encode_xattr_entries(&mut block, 32, 0, entries, true) {
        return None;
    }
    let hash = super::hash::xattr_block_hash(entries.iter().map(|e| super::hash::xattr_entry_hash(&e.name, &e.value)));
    put32(&mut block, 0xC, hash);
    Some(block)
}

/// Fills in the checksum of an xattr block placed at `block_no`.
pub fn seal_xattr_block(block: &mut [u8], block_no: u64, fs_seed: u32) {
    put32(block, 0x10, 0);
    let csum = crc32c_parts(fs_seed, &[&block_no.to_le_bytes(), block]);
    put32(block, 0x10, csum);
}

/// The jbd2 superblock (v2, 64-bit block tags, checksum v3) of an empty,
/// clean internal journal of `blocks` blocks.
pub fn encode_journal_superblock(blocks: u32, uuid: &[u8; 16]) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    put32_be(&mut b, 0x0, JBD2_MAGIC);
    put32_be(&mut b, 0x4, 4); // JBD2_SUPERBLOCK_V2
    put32_be(&mut b, 0xC, BLOCK as u32);
    put32_be(&mut b, 0x10, blocks);
    put32_be(&mut b, 0x14, 1); // s_first
    put32_be(&mut b, 0x18, 1); // s_sequence
    put32_be(&mut b, 0x28, 0x2 | 0x10); // incompat: 64bit, csum v3
    b[0x30..0x40].copy_from_slice(uuid);
    put32_be(&mut b, 0x40, 1); // s_nr_users
    b[0x50] = 4; // s_checksum_type: crc32c
    let csum = crc32c_raw(!0, &b);
    put32_be(&mut b, 0xFC, csum);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_2038_use_the_epoch_bits() {
        assert_eq!(encode_time(0), (0, 0));
        assert_eq!(encode_time(0x7fff_ffff), (0x7fff_ffff, 0));
        // 2^31 is stored as the negative i32 plus one epoch.
        assert_eq!(encode_time(1 << 31), (0x8000_0000, 1));
        assert_eq!(encode_time((1 << 32) + 5), (5, 1));
    }

    #[test]
    fn superblock_checksum_covers_the_fields() {
        let f = SuperblockFields {
            inodes_count: 16,
            blocks_count: 1 << 33,
            r_blocks_count: 0,
            free_blocks_count: 10,
            free_inodes_count: 5,
            inodes_per_group: 16,
            time: 1,
            uuid: [1; 16],
            label: [0; 16],
            hash_seed: [1, 2, 3, 4],
            journal_blocks: None,
            block_group_nr: 0,
        };
        let b = encode_superblock(&f);
        assert_eq!(&b[0x38..0x3A], &[0x53, 0xEF]);
        assert_eq!(u32::from_le_bytes(b[0x150..0x154].try_into().unwrap()), 2, "blocks_count_hi");
        let csum = u32::from_le_bytes(b[0x3FC..].try_into().unwrap());
        assert_eq!(csum, crc32c_raw(!0, &b[..0x3FC]));
        let other = encode_superblock(&SuperblockFields { block_group_nr: 1, ..f });
        assert_ne!(&other[0x3FC..], &b[0x3FC..]);
    }

    #[test]
    fn inode_fields_and_checksum() {
        let f = InodeFields {
            mode: 0o100644,
            uid: 0x12345,
            gid: 0x23456,
            size: 5 << 32,
            time: 100,
            links: 1,
            sectors: 8,
            flags: INODE_FLAG_EXTENTS,
            block: [0; 60],
            file_acl: 0,
            inline_xattrs: Vec::new(),
        };
        let b = encode_inode(&f, 12, 7);
        assert_eq!(&b[2..4], &0x2345u16.to_le_bytes());
        assert_eq!(&b[0x78..0x7A], &1u16.to_le_bytes(), "uid high half");
        assert_eq!(&b[0x6C..0x70], &5u32.to_le_bytes(), "size high half");
        let mut zeroed = b;
        zeroed[0x7C..0x7E].fill(0);
        zeroed[0x82..0x84].fill(0);
        let csum = crc32c_raw(super::super::csum::inode_seed(7, 12, 0), &zeroed);
        assert_eq!(&b[0x7C..0x7E], &(csum as u16).to_le_bytes());
        assert_eq!(&b[0x82..0x84], &((csum >> 16) as u16).to_le_bytes());
    }

    #[test]
    fn extent_nodes() {
        let mut root = [0u8; 60];
        let e = Extent { logical: 3, len: 2, start: (1 << 32) + 9 };
        encode_extent_node(&mut root, &[ExtentEntry::Leaf(e)], 0);
        assert_eq!(&root[..8], &[0x0A, 0xF3, 1, 0, 4, 0, 0, 0]);
        assert_eq!(&root[12..24], &[3, 0, 0, 0, 2, 0, 1, 0, 9, 0, 0, 0]);
        let mut block = vec![0u8; BLOCK];
        encode_extent_node(&mut block, &[ExtentEntry::Index(ExtentIndex { logical: 0, child: 77 })], 1);
        assert_eq!(u16::from_le_bytes([block[4], block[5]]) as usize, EXTENTS_PER_BLOCK);
        seal_extent_block(&mut block, 5);
        assert_eq!(&block[4092..], &crc32c_raw(5, &block[..4092]).to_le_bytes());
    }

    #[test]
    fn dirents_and_dx_nodes() {
        assert_eq!((dirent_len(1), dirent_len(4), dirent_len(5)), (12, 12, 16));
        let mut block = vec![0u8; BLOCK];
        encode_dx_root(&mut block, 2, 2, 0, &[(0, 1), (0x100, 2)], 9);
        let limit_at = 32;
        assert_eq!(u16::from_le_bytes([block[limit_at], block[limit_at + 1]]) as usize, DX_ROOT_LIMIT);
        assert_eq!(u16::from_le_bytes([block[limit_at + 2], block[limit_at + 3]]), 2);
        let tail = 32 + 8 * DX_ROOT_LIMIT;
        assert_eq!(tail + 8, BLOCK, "the dx tail ends the block");
        let mut leaf = vec![0u8; BLOCK];
        encode_dirent(&mut leaf, 12, DIR_LEAF_SPACE, b"x", 1);
        seal_dir_leaf(&mut leaf, 3);
        assert_eq!(&leaf[DIR_LEAF_SPACE + 4..DIR_LEAF_SPACE + 8], &[12, 0, 0, 0xDE]);
    }

    #[test]
    fn xattr_areas() {
        let cap = XattrEntry { index: 6, name: b"capability".to_vec(), value: vec![1; 20] };
        let area = encode_inline_xattrs(std::slice::from_ref(&cap)).unwrap();
        assert_eq!(area.len(), INLINE_XATTR_SPACE);
        assert_eq!(area[4], 10, "name length");
        assert_eq!(area[5], 6, "security index");
        let offs = u16::from_le_bytes([area[6], area[7]]) as usize;
        assert_eq!(&area[4 + offs..4 + offs + 20], &[1; 20][..]);
        let big = XattrEntry { index: 1, name: b"big".to_vec(), value: vec![2; 100] };
        assert!(encode_inline_xattrs(std::slice::from_ref(&big)).is_none());
        let mut block = encode_xattr_block(&[big], 1).unwrap();
        seal_xattr_block(&mut block, 42, 5);
        assert_eq!(&block[0x8..0xC], &1u32.to_le_bytes(), "h_blocks");
    }

    #[test]
    fn journal_superblock() {
        let b = encode_journal_superblock(1024, &[3; 16]);
        assert_eq!(&b[..4], &JBD2_MAGIC.to_be_bytes());
        let mut zeroed = b;
        zeroed[0xFC..0x100].fill(0);
        assert_eq!(&b[0xFC..0x100], &crc32c_raw(!0, &zeroed).to_be_bytes());
    }
}
