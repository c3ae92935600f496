//! The on-disk structures of erofs, encoded little-endian exactly as the
//! kernel's `fs/erofs/erofs_fs.h` defines them. Pure functions: no I/O.

pub const BLOCK: usize = 4096;
pub const BLOCK_BITS: u8 = 12;
pub const SUPER_OFFSET: usize = 1024;
pub const SUPER_SIZE: usize = 128;
pub const MAGIC: u32 = 0xE0F5_E1E2;
/// Inode slots are 32 bytes: a nid is an offset from the metadata area / 32.
pub const SLOT: u64 = 32;
pub const COMPACT_INODE: usize = 32;
pub const EXTENDED_INODE: usize = 64;
pub const XATTR_IBODY_HEADER: usize = 12;
pub const DIRENT: usize = 12;
/// The map header (8 bytes) and the reserved slot after it that precede the
/// full (non-compact) lcluster indexes.
pub const FULL_INDEX_HEAD: usize = 16;
pub const LCLUSTER_INDEX: usize = 8;
/// A chunk index: advise, device id, block address.
pub const CHUNK_INDEX: usize = 8;
/// `i_u` of a chunk-based inode: 4 KiB chunks (no extra chunk bits), indexes.
pub const CHUNK_FORMAT_INDEXES: u32 = 0x20;

pub const COMPAT_SB_CHKSUM: u32 = 0x1;
pub const COMPAT_MTIME: u32 = 0x2;
/// LZ4 data sits at the end of its physical cluster, zeros before it.
pub const INCOMPAT_ZERO_PADDING: u32 = 0x1;
pub const INCOMPAT_CHUNKED_FILE: u32 = 0x4;

/// `i_format` data layouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum DataLayout {
    FlatPlain = 0,
    CompressedFull = 1,
    FlatInline = 2,
    ChunkBased = 4,
}

/// Logical cluster types of the full index.
pub const LCLUSTER_PLAIN: u16 = 0;
pub const LCLUSTER_HEAD1: u16 = 1;
pub const LCLUSTER_NONHEAD: u16 = 2;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// The fields of `struct erofs_super_block` we set (the rest are zero).
#[derive(Clone, Debug, Default)]
pub struct Superblock {
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub blocks: u32,
    pub meta_blkaddr: u32,
    pub xattr_blkaddr: u32,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
}

/// The 128-byte superblock with a zero checksum (see [`seal_superblock`]).
pub fn encode_superblock(sb: &Superblock) -> [u8; SUPER_SIZE] {
    let mut b = [0u8; SUPER_SIZE];
    put32(&mut b, 0, MAGIC);
    put32(&mut b, 8, sb.feature_compat);
    b[12] = BLOCK_BITS;
    b[13] = 0; // sb_extslots
    put16(&mut b, 14, sb.root_nid);
    put64(&mut b, 16, sb.inos);
    put64(&mut b, 24, sb.build_time);
    put32(&mut b, 32, 0); // build_time_nsec
    put32(&mut b, 36, sb.blocks);
    put32(&mut b, 40, sb.meta_blkaddr);
    put32(&mut b, 44, sb.xattr_blkaddr);
    b[48..64].copy_from_slice(&sb.uuid);
    b[64..80].copy_from_slice(&sb.volume_name);
    put32(&mut b, 80, sb.feature_incompat);
    // u1 (available_compr_algs / lz4_max_distance): 0 = LZ4's default 64 KiB
    // window; no COMPR_CFGS, so the kernel reads it as lz4_max_distance.
    b
}

/// Fills in the superblock checksum: crc32c (seed `!0`, no final inversion,
/// as the kernel's `crc32c()`) over block 0 from the superblock to the end,
/// with the checksum field zero. `block0` is the whole first block.
pub fn seal_superblock(block0: &mut [u8]) {
    debug_assert_eq!(block0.len(), BLOCK);
    put32(block0, SUPER_OFFSET + 4, 0);
    let crc = !crc32c::crc32c_append(0, &block0[SUPER_OFFSET..]);
    put32(block0, SUPER_OFFSET + 4, crc);
}

/// An inode's fields before encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InodeHead {
    pub compact: bool,
    pub layout: DataLayout,
    pub xattr_icount: u16,
    /// Type and permission bits.
    pub mode: u16,
    pub nlink: u32,
    pub size: u64,
    /// `raw_blkaddr`, `compressed_blocks`, `rdev` or the chunk format.
    pub i_u: u32,
    pub ino: u32,
    pub uid: u32,
    pub gid: u32,
    /// Extended inodes only: compact ones take the superblock's build time.
    pub mtime: i64,
}

impl InodeHead {
    pub fn len(&self) -> usize {
        if self.compact {
            COMPACT_INODE
        } else {
            EXTENDED_INODE
        }
    }
}

/// Appends the 32- or 64-byte on-disk inode.
pub fn encode_inode(h: &InodeHead, out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + h.len(), 0);
    let b = &mut out[at..];
    let format = ((h.layout as u16) << 1) | u16::from(!h.compact);
    put16(b, 0, format);
    put16(b, 2, h.xattr_icount);
    put16(b, 4, h.mode);
    if h.compact {
        debug_assert!(h.nlink <= u16::MAX as u32 && h.size <= u32::MAX as u64);
        debug_assert!(h.uid <= u16::MAX as u32 && h.gid <= u16::MAX as u32);
        put16(b, 6, h.nlink as u16);
        put32(b, 8, h.size as u32);
        put32(b, 16, h.i_u);
        put32(b, 20, h.ino);
        put16(b, 24, h.uid as u16);
        put16(b, 26, h.gid as u16);
    } else {
        put64(b, 8, h.size);
        put32(b, 16, h.i_u);
        put32(b, 20, h.ino);
        put32(b, 24, h.uid);
        put32(b, 28, h.gid);
        put64(b, 32, h.mtime as u64);
        put32(b, 40, 0); // mtime_nsec: the tree keeps whole seconds
        put32(b, 44, h.nlink);
    }
}

/// The `rdev` encoding of `i_u` for device inodes (the kernel's
/// `new_encode_dev`).
pub fn encode_rdev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

/// The size of one xattr entry (header, name, value, padded to 4).
pub fn xattr_entry_len(name: &[u8], value: &[u8]) -> usize {
    (4 + name.len() + value.len()).next_multiple_of(4)
}

/// Appends one xattr entry: `index` is the short-prefix index, `name` the
/// rest of the name after the prefix.
pub fn encode_xattr_entry(index: u8, name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    let at = out.len();
    out.push(name.len() as u8);
    out.push(index);
    out.extend_from_slice(&(value.len() as u16).to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(value);
    out.resize(at + xattr_entry_len(name, value), 0);
}

/// Starts an inline xattr body: the 12-byte header and the shared ids.
pub fn encode_xattr_ibody_header(shared: &[u32], out: &mut Vec<u8>) {
    out.extend_from_slice(&0u32.to_le_bytes()); // h_name_filter: no filter
    out.push(shared.len() as u8);
    out.extend_from_slice(&[0; 7]);
    for id in shared {
        out.extend_from_slice(&id.to_le_bytes());
    }
}

/// `i_xattr_icount` for an inline xattr body of `len` bytes (0 for none).
pub fn xattr_icount(len: usize) -> u16 {
    if len == 0 {
        0
    } else {
        debug_assert!(len >= XATTR_IBODY_HEADER && len.is_multiple_of(4));
        ((len - XATTR_IBODY_HEADER) / 4 + 1) as u16
    }
}

/// One directory block: dirents, then the names they point at. `entries`
/// must fit (see [`dirents_fit`]); the block is `used` bytes long (a full
/// block is padded with zeros by the caller).
pub fn encode_dir_block(entries: &[(&[u8], u64, u8)], out: &mut Vec<u8>) {
    let at = out.len();
    let mut nameoff = entries.len() * DIRENT;
    for (name, nid, ft) in entries {
        out.extend_from_slice(&nid.to_le_bytes());
        out.extend_from_slice(&(nameoff as u16).to_le_bytes());
        out.push(*ft);
        out.push(0);
        nameoff += name.len();
    }
    for (name, _, _) in entries {
        out.extend_from_slice(name);
    }
    debug_assert_eq!(out.len() - at, nameoff);
}

/// The 8-byte map header of a compressed inode (LZ4 heads, 4 KiB logical
/// clusters, no big pclusters) followed by the reserved 8 bytes.
pub fn encode_full_index_head(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; FULL_INDEX_HEAD]);
}

/// One full lcluster index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lcluster {
    /// An extent starts `clusterofs` bytes into this lcluster; its physical
    /// cluster (one block) is at `blkaddr`, LZ4-compressed or stored plain.
    Head { compressed: bool, clusterofs: u16, blkaddr: u32 },
    /// Inside an extent: `back` lclusters to its head, `ahead` to the next
    /// head (or past the end of the file).
    NonHead { back: u16, ahead: u16 },
}

pub fn encode_lcluster(l: Lcluster, out: &mut Vec<u8>) {
    match l {
        Lcluster::Head { compressed, clusterofs, blkaddr } => {
            let advise = if compressed { LCLUSTER_HEAD1 } else { LCLUSTER_PLAIN };
            out.extend_from_slice(&advise.to_le_bytes());
            out.extend_from_slice(&clusterofs.to_le_bytes());
            out.extend_from_slice(&blkaddr.to_le_bytes());
        }
        Lcluster::NonHead { back, ahead } => {
            out.extend_from_slice(&LCLUSTER_NONHEAD.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&back.to_le_bytes());
            out.extend_from_slice(&ahead.to_le_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_sizes_and_format_bits() {
        let mut h = InodeHead {
            compact: true,
            layout: DataLayout::FlatInline,
            xattr_icount: 0,
            mode: 0o100644,
            nlink: 1,
            size: 5,
            i_u: 0,
            ino: 7,
            uid: 0,
            gid: 0,
            mtime: 0,
        };
        let mut v = Vec::new();
        encode_inode(&h, &mut v);
        assert_eq!(v.len(), 32);
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), 2 << 1);
        h.compact = false;
        h.mtime = -1;
        v.clear();
        encode_inode(&h, &mut v);
        assert_eq!(v.len(), 64);
        assert_eq!(u16::from_le_bytes([v[0], v[1]]), (2 << 1) | 1);
        assert_eq!(&v[32..40], &u64::MAX.to_le_bytes(), "negative times wrap as the kernel reads them");
    }

    #[test]
    fn rdev_matches_new_encode_dev() {
        assert_eq!(encode_rdev(1, 3), 0x103);
        assert_eq!(encode_rdev(8, 0x12345), 0x45 | (8 << 8) | (0x12300 << 12));
    }

    #[test]
    fn xattr_body_counts_in_four_byte_units() {
        let mut v = Vec::new();
        encode_xattr_ibody_header(&[3], &mut v);
        encode_xattr_entry(6, b"capability", &[1; 20], &mut v);
        assert_eq!(v.len(), 12 + 4 + 36);
        assert_eq!(xattr_icount(v.len()), 1 + (4 + 36) / 4);
        assert_eq!(xattr_icount(0), 0);
    }
}
