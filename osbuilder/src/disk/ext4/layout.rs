//! The layout phase: inode numbers, directory shapes, xattr placement, the
//! filesystem geometry, and every block range, before any byte is written.

use std::collections::HashMap;

use sha2::{Digest as _, Sha256};

use super::format::*;
use super::hash::dx_hash;
use super::{Ext4Error, Ext4Options, Ext4Size, Ext4Summary, Headroom};
use crate::rootfs::{Body, DirIdx, Plan, PlanIno};

/// A filesystem block number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockNo(pub u64);

impl BlockNo {
    pub fn byte_offset(self) -> u64 {
        self.0 * BLOCK_SIZE
    }
}

/// An ext4 inode number (1-based; 2 is the root).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InodeNo(pub u32);

/// A block group number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupNo(pub u32);

/// Where an inode's contents come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// Inodes 1 and 3 to 10 other than the journal: all zeros.
    Reserved,
    Journal,
    /// lost+found made by the writer (the tree has none).
    LostFound,
    Plan(PlanIno),
}

/// How an inode's `i_block` is filled.
#[derive(Clone, Debug, Default)]
pub enum BlockMap {
    #[default]
    Empty,
    /// Raw `i_block` bytes: fast symlinks and device numbers.
    Raw([u8; 60]),
    /// An extent tree over `extents`; `tree` holds the tree blocks, the
    /// bottom level first, and `depth` is the root's depth.
    Extents { extents: Vec<Extent>, tree: Vec<BlockNo>, depth: u16 },
}

/// Where an inode's xattrs live.
#[derive(Clone, Debug, Default)]
pub enum XattrPlace {
    #[default]
    None,
    Inline(Vec<u8>),
    /// An index into [`Layout::xattr_blocks`].
    Block(u32),
}

/// Everything the inode table records for one inode.
#[derive(Clone, Debug)]
pub struct InodeLayout {
    pub source: Source,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub time: i64,
    pub links: u16,
    pub size: u64,
    pub flags: u32,
    pub map: BlockMap,
    /// Blocks this inode owns (data, tree, xattr block).
    pub blocks: u64,
    pub xattrs: XattrPlace,
    /// For directories: an index into [`Layout::dirs`].
    pub dir: Option<u32>,
}

/// The shape of a directory's blocks.
#[derive(Clone, Debug)]
pub enum DirShape {
    /// Entries in item order; `starts[i]` is the first item of block `i`
    /// (block 0 also holds `.` and `..`).
    Linear { starts: Vec<u32> },
    /// Block 0 is the root, then `nodes` interior nodes, then the leaves.
    Htree { order: Vec<u32>, leaf_starts: Vec<u32>, leaf_hashes: Vec<u32>, nodes: u32 },
    /// lost+found: `.` and `..` and empty blocks.
    Empty { blocks: u32 },
}

/// A directory's entries and block shape. Items are the plan directory's
/// entries in order, then (for the root, when the writer makes lost+found)
/// one item for lost+found.
#[derive(Clone, Debug)]
pub struct DirLayout {
    pub ino: InodeNo,
    pub parent: InodeNo,
    pub plan_dir: Option<DirIdx>,
    pub lost_found_item: bool,
    pub shape: DirShape,
}

impl DirLayout {
    pub fn n_blocks(&self) -> u64 {
        match &self.shape {
            DirShape::Linear { starts } => starts.len() as u64,
            DirShape::Htree { leaf_starts, nodes, .. } => 1 + u64::from(*nodes) + leaf_starts.len() as u64,
            DirShape::Empty { blocks } => u64::from(*blocks),
        }
    }
}

/// One shared xattr block.
#[derive(Clone, Debug)]
pub struct XattrBlock {
    pub entries: Vec<XattrEntry>,
    pub refcount: u32,
    pub block: BlockNo,
}

/// What the write phase emits over one block range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceKind {
    /// A superblock (primary or backup) and the group descriptor table.
    Super(GroupNo),
    BlockBitmap(GroupNo),
    InodeBitmap(GroupNo),
    InodeTable(GroupNo),
    /// The journal superblock, then zeros.
    Journal,
    /// Blocks of a directory from logical block `logical`.
    Dir {
        ino: InodeNo,
        logical: u64,
    },
    /// File data (or a slow symlink's target) from logical block `logical`.
    Data {
        ino: InodeNo,
        logical: u64,
    },
    /// Extent tree blocks from index `first` of the inode's tree.
    Tree {
        ino: InodeNo,
        first: u32,
    },
    Xattr(u32),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start: BlockNo,
    pub len: u64,
    pub kind: PieceKind,
}

/// The block group geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub blocks: u64,
    pub groups: u32,
    pub inodes_per_group: u32,
    pub itable_blocks: u64,
    pub gdt_blocks: u64,
}

impl Geometry {
    /// Computes the geometry for `blocks` blocks and at least `inodes`
    /// inodes, or `None` when the inodes cannot fit the groups.
    fn new(blocks: u64, inodes: u64) -> Option<Geometry> {
        let groups = blocks.div_ceil(BLOCKS_PER_GROUP).max(1);
        let gdt_blocks = (groups * DESC_SIZE as u64).div_ceil(BLOCK_SIZE);
        let per_block = (BLOCK / INODE_SIZE) as u64;
        let ipg = inodes.div_ceil(groups).div_ceil(per_block).max(1) * per_block;
        let itable_blocks = ipg / per_block;
        // A flex group's bitmaps and inode tables live in its first group.
        let cap = (BLOCKS_PER_GROUP - 1 - gdt_blocks - 2 * GROUPS_PER_FLEX) / GROUPS_PER_FLEX;
        if itable_blocks > cap || ipg > 8 * BLOCK as u64 || groups > u64::from(u32::MAX) {
            return None;
        }
        if ipg * groups >= u64::from(u32::MAX) {
            return None;
        }
        Some(Geometry { blocks, groups: groups as u32, inodes_per_group: ipg as u32, itable_blocks, gdt_blocks })
    }

    /// The most inodes a group can hold (bounded by the inode bitmap and by
    /// a flex group's inode tables fitting in its first group), for a
    /// filesystem of about `inodes` inodes.
    fn max_inodes_per_group(inodes: u64) -> u64 {
        let groups_guess = inodes.div_ceil(8 * BLOCK as u64).max(1);
        let gdt_blocks = (groups_guess * 4 * DESC_SIZE as u64).div_ceil(BLOCK_SIZE);
        let cap = (BLOCKS_PER_GROUP - 1 - gdt_blocks - 2 * GROUPS_PER_FLEX) / GROUPS_PER_FLEX;
        (cap * (BLOCK / INODE_SIZE) as u64).min(8 * BLOCK as u64)
    }

    pub fn group_start(&self, g: u32) -> u64 {
        u64::from(g) * BLOCKS_PER_GROUP
    }

    pub fn group_len(&self, g: u32) -> u64 {
        (self.blocks - self.group_start(g)).min(BLOCKS_PER_GROUP)
    }

    pub fn inodes(&self) -> u64 {
        u64::from(self.inodes_per_group) * u64::from(self.groups)
    }

    /// Blocks of the superblock copy and descriptor table at the start of `g`.
    pub fn super_blocks(&self, g: u32) -> u64 {
        if has_super(g) {
            1 + self.gdt_blocks
        } else {
            0
        }
    }

    /// Groups whose metadata group `leader` holds (itself included), or 0
    /// when `leader` does not lead a flex group.
    pub fn flex_members(&self, leader: u32) -> u32 {
        if u64::from(leader) % GROUPS_PER_FLEX != 0 {
            return 0;
        }
        (self.groups - leader).min(GROUPS_PER_FLEX as u32)
    }

    /// Where group `g`'s block bitmap, inode bitmap and inode table are.
    pub fn group_metadata(&self, g: u32) -> (BlockNo, BlockNo, BlockNo) {
        let leader = g - g % GROUPS_PER_FLEX as u32;
        let m = u64::from(self.flex_members(leader));
        let i = u64::from(g - leader);
        let base = self.group_start(leader) + self.super_blocks(leader);
        (BlockNo(base + i), BlockNo(base + m + i), BlockNo(base + 2 * m + i * self.itable_blocks))
    }

    /// Metadata blocks at the start of group `g`.
    fn head_blocks(&self, g: u32) -> u64 {
        self.super_blocks(g) + u64::from(self.flex_members(g)) * (2 + self.itable_blocks)
    }

    /// Blocks all group metadata takes.
    pub fn overhead(&self) -> u64 {
        (0..self.groups).map(|g| self.head_blocks(g)).sum()
    }

    /// Whether every group holds its own head, with a block to spare in
    /// the last one.
    fn fits(&self) -> bool {
        (0..self.groups).all(|g| self.head_blocks(g) < self.group_len(g))
    }
}

/// Whether group `g` has a superblock backup (sparse_super: 0, 1 and the
/// powers of 3, 5 and 7).
pub fn has_super(g: u32) -> bool {
    if g <= 1 {
        return true;
    }
    [3u32, 5, 7].iter().any(|&base| {
        let mut p = base;
        while p < g {
            match p.checked_mul(base) {
                Some(n) => p = n,
                None => return false,
            }
        }
        p == g
    })
}

/// The journal size mke2fs picks for a filesystem of `blocks` blocks, never
/// below jbd2's 1024-block minimum.
pub fn default_journal_blocks(blocks: u64) -> u64 {
    match blocks {
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    }
}

/// A first-fit block allocator over the space group metadata leaves free.
struct Allocator {
    /// Free ranges `(start, end)` in block order.
    free: Vec<(u64, u64)>,
    cursor: usize,
}

impl Allocator {
    fn new(geo: &Geometry) -> Self {
        let mut free = Vec::new();
        for g in 0..geo.groups {
            let start = geo.group_start(g) + geo.head_blocks(g);
            let end = geo.group_start(g) + geo.group_len(g);
            if start < end {
                free.push((start, end));
            }
        }
        Allocator { free, cursor: 0 }
    }

    /// `n` blocks in as few runs as the metadata allows.
    fn alloc(&mut self, mut n: u64) -> Option<Vec<(BlockNo, u64)>> {
        let mut out = Vec::new();
        while n > 0 {
            let range = self.free.get_mut(self.cursor)?;
            let take = n.min(range.1 - range.0);
            out.push((BlockNo(range.0), take));
            range.0 += take;
            n -= take;
            if range.0 == range.1 {
                self.cursor += 1;
            }
        }
        Some(out)
    }

    /// `n` contiguous blocks, first fit.
    fn alloc_contiguous(&mut self, n: u64) -> Option<BlockNo> {
        let i = (self.cursor..self.free.len()).find(|&i| self.free[i].1 - self.free[i].0 >= n)?;
        let start = self.free[i].0;
        self.free[i].0 += n;
        Some(BlockNo(start))
    }

    fn free_blocks(&self) -> u64 {
        self.free[self.cursor.min(self.free.len())..].iter().map(|r| r.1 - r.0).sum()
    }
}

/// The whole layout.
#[derive(Debug)]
pub struct Layout {
    pub geo: Geometry,
    pub image_bytes: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u32; 4],
    pub fs_seed: u32,
    pub label: [u8; 16],
    pub label_text: Option<String>,
    pub time: i64,
    pub reserved_blocks: u64,
    pub free_blocks: u64,
    pub free_inodes: u64,
    pub journal: Option<(BlockNo, u64)>,
    /// Inodes 1 to the last used one, indexed by number - 1.
    pub inodes: Vec<InodeLayout>,
    pub dirs: Vec<DirLayout>,
    pub xattr_blocks: Vec<XattrBlock>,
    /// Every range the write phase emits, sorted by start.
    pub pieces: Vec<Piece>,
    /// Per group: free blocks, used directories.
    pub group_free_blocks: Vec<u32>,
    pub group_used_dirs: Vec<u32>,
    /// Used block ranges, sorted and merged, for the block bitmaps.
    pub used: Vec<(u64, u64)>,
    /// Plan inode -> ext4 inode number.
    pub ino_of: Vec<InodeNo>,
}

/// The path of a plan inode, for error messages.
pub fn path_of(plan: &Plan, ino: PlanIno) -> String {
    plan.path_of(ino)
}

fn derive(seed: &[u8; 32], what: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(seed);
    h.update(what.as_bytes());
    h.finalize().into()
}

/// The ext4 file type of a tree body.
pub fn file_type(body: &Body) -> u8 {
    body.dirent_type()
}

/// Splits a full xattr name into ext4's namespace index and suffix.
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    const PREFIXES: [(&[u8], u8); 6] =
        [(b"user.", 1), (b"system.posix_acl_access", 2), (b"system.posix_acl_default", 3), (b"trusted.", 4), (b"security.", 6), (b"system.", 7)];
    PREFIXES.iter().find(|(p, _)| name.starts_with(p)).map(|(p, i)| (*i, &name[p.len()..]))
}

/// Converts a POSIX ACL from the VFS xattr format (version 2, 8-byte
/// entries) to ext4's (version 1, 4-byte entries unless they name a user or
/// group).
pub fn acl_to_ext4(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() < 4 || !(value.len() - 4).is_multiple_of(8) || u32::from_le_bytes(value[..4].try_into().ok()?) != 2 {
        return None;
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in value[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        match tag {
            // USER_OBJ, GROUP_OBJ, MASK, OTHER: no id.
            0x01 | 0x04 | 0x10 | 0x20 => out.extend_from_slice(&e[..4]),
            // USER, GROUP: with the id.
            0x02 | 0x08 => out.extend_from_slice(e),
            _ => return None,
        }
    }
    Some(out)
}

/// A directory item: name, inode number and file type.
pub struct Item<'a> {
    pub name: &'a [u8],
    pub ino: InodeNo,
    pub file_type: u8,
}

/// The items of a directory, in item order.
pub fn dir_items<'a>(plan: &'a Plan, dir: &DirLayout, ino_of: &[InodeNo]) -> Vec<Item<'a>> {
    let mut items: Vec<Item<'a>> = match dir.plan_dir {
        Some(d) => {
            plan.dir(d).entries.iter().map(|e| Item { name: e.name, ino: ino_of[e.ino.index()], file_type: file_type(&plan.tree_inode(e.ino).body) }).collect()
        }
        None => Vec::new(),
    };
    if dir.lost_found_item {
        items.push(Item { name: b"lost+found", ino: InodeNo(LOST_FOUND_INO), file_type: FT_DIR });
    }
    items
}

/// Packs items into linear blocks; returns each block's first item.
fn pack_linear(items: &[Item]) -> Vec<u32> {
    let mut starts = vec![0u32];
    let mut used = 24; // `.` and `..`
    for (i, item) in items.iter().enumerate() {
        let len = dirent_len(item.name.len());
        if used + len > DIR_LEAF_SPACE {
            starts.push(i as u32);
            used = 0;
        }
        used += len;
    }
    starts
}

/// Sorts items by hash and packs them into htree leaves; returns the order,
/// each leaf's first position and its index hash (with the collision bit
/// when the leaf continues the previous leaf's hash).
fn pack_htree(items: &[Item], seed: &[u32; 4]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let hashes: Vec<u32> = items.iter().map(|i| dx_hash(i.name, seed).0).collect();
    let mut order: Vec<u32> = (0..items.len() as u32).collect();
    order.sort_by(|&a, &b| hashes[a as usize].cmp(&hashes[b as usize]).then_with(|| items[a as usize].name.cmp(items[b as usize].name)));
    let mut leaf_starts = vec![0u32];
    let mut leaf_hashes = vec![0u32];
    let mut used = 0;
    for (pos, &i) in order.iter().enumerate() {
        let len = dirent_len(items[i as usize].name.len());
        if used + len > DIR_LEAF_SPACE {
            let h = hashes[i as usize];
            let prev = hashes[order[pos - 1] as usize];
            leaf_starts.push(pos as u32);
            leaf_hashes.push(if h == prev { h | 1 } else { h });
            used = 0;
        }
        used += len;
    }
    (order, leaf_starts, leaf_hashes)
}

/// Extent-tree blocks per level (the bottom first) for `n` extents.
pub fn tree_shape(n: usize) -> Vec<usize> {
    let mut levels = Vec::new();
    let mut count = n;
    while count > EXTENTS_IN_INODE {
        count = count.div_ceil(EXTENTS_PER_BLOCK);
        levels.push(count);
    }
    levels
}

/// Maps logical runs onto physical runs as extents of at most 32768 blocks.
fn map_extents(runs: &[(u64, u64)], phys: &[(BlockNo, u64)]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut p = phys.iter().copied();
    let mut cur = p.next();
    for &(mut logical, mut n) in runs {
        while n > 0 {
            let (start, avail) = cur.expect("as many physical blocks as logical ones");
            let len = n.min(avail).min(MAX_EXTENT_LEN);
            out.push(Extent { logical: logical as u32, len: len as u16, start: start.0 });
            logical += len;
            n -= len;
            cur = if avail == len { p.next() } else { Some((BlockNo(start.0 + len), avail - len)) };
        }
    }
    out
}

/// An upper bound of the extents `blocks` blocks in `runs` can need.
fn extents_bound(runs: &[(u64, u64)]) -> usize {
    let blocks: u64 = runs.iter().map(|r| r.1).sum();
    let split: u64 = runs.iter().map(|r| r.1.div_ceil(MAX_EXTENT_LEN)).sum();
    // Each run of group metadata the allocation crosses adds one extent.
    (split + 2 * blocks.div_ceil(BLOCKS_PER_GROUP) + 1) as usize
}

/// What an inode needs before blocks are placed.
enum Demand {
    None,
    /// Data blocks in logical runs.
    Runs(Vec<(u64, u64)>),
    /// Directory blocks (logical 0..n).
    Dir(u64),
}

impl Layout {
    pub fn new(plan: &Plan, opts: &Ext4Options) -> Result<Layout, Ext4Error> {
        if !(0.0..=50.0).contains(&opts.reserved_percent) {
            return Err(Ext4Error::ReservedPercent(opts.reserved_percent));
        }
        let mut label = [0u8; 16];
        if let Some(text) = &opts.label {
            if text.len() > 16 {
                return Err(Ext4Error::LabelTooLong { label: text.clone(), len: text.len() });
            }
            label[..text.len()].copy_from_slice(text.as_bytes());
        }
        let mut uuid: [u8; 16] = derive(&opts.seed, "ext4 uuid")[..16].try_into().expect("16 bytes");
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let seed_bytes = derive(&opts.seed, "ext4 htree hash seed");
        let hash_seed: [u32; 4] = std::array::from_fn(|i| u32::from_le_bytes(seed_bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")));
        let fs_seed = super::csum::fs_seed(&uuid);
        let epoch = opts.source_date_epoch.max(0);
        let clamp = |t: i64| t.min(epoch).max(0);

        // Inode numbers: the root is 2, lost+found 11, the rest from 12.
        let tree = plan.tree();
        let root_dir = plan.dir(plan.inode(PlanIno::ROOT).dir.expect("the root is a directory"));
        let tree_lost_found = root_dir.entries.iter().find(|e| e.name == b"lost+found" && matches!(plan.tree_inode(e.ino).body, Body::Dir(_))).map(|e| e.ino);
        if tree_lost_found.is_none() && root_dir.entries.iter().any(|e| e.name == b"lost+found") {
            return Err(Ext4Error::LostFoundNotDirectory);
        }
        let n_plan = plan.inodes().len() as u64;
        let others = n_plan - 1 - u64::from(tree_lost_found.is_some());
        let last_ino = u64::from(LOST_FOUND_INO) + others;
        if last_ino >= u64::from(u32::MAX) {
            return Err(Ext4Error::TooManyInodes { inodes: last_ino });
        }
        // The plan hands out its numbers only through directory entries.
        let mut plan_inos = vec![PlanIno::ROOT; n_plan as usize];
        for dir in plan.dirs() {
            for e in &dir.entries {
                plan_inos[e.ino.index()] = e.ino;
            }
        }
        let plan_ino = |i: usize| plan_inos[i];
        let mut ino_of = Vec::with_capacity(n_plan as usize);
        let mut next = LOST_FOUND_INO + 1;
        for i in 0..plan.inodes().len() {
            let ino = if i == 0 {
                InodeNo(ROOT_INO)
            } else if tree_lost_found.map(|l| l.index()) == Some(i) {
                InodeNo(LOST_FOUND_INO)
            } else {
                next += 1;
                InodeNo(next - 1)
            };
            ino_of.push(ino);
        }

        let reserved = |source| InodeLayout {
            source,
            mode: 0,
            uid: 0,
            gid: 0,
            time: 0,
            links: 0,
            size: 0,
            flags: 0,
            map: BlockMap::Empty,
            blocks: 0,
            xattrs: XattrPlace::None,
            dir: None,
        };
        let mut inodes: Vec<InodeLayout> = (1..=last_ino).map(|_| reserved(Source::Reserved)).collect();
        let mut demands: Vec<Demand> = (1..=last_ino).map(|_| Demand::None).collect();
        let mut dirs = Vec::new();
        let mut xattr_blocks: Vec<XattrBlock> = Vec::new();
        let mut xattr_shared: HashMap<Vec<XattrEntry>, u32> = HashMap::new();

        // The journal inode.
        let journal_blocks = |blocks: u64| if opts.journal { default_journal_blocks(blocks) } else { 0 };
        if opts.journal {
            let j = &mut inodes[JOURNAL_INO as usize - 1];
            *j = InodeLayout { mode: 0o100600, links: 1, time: epoch, flags: INODE_FLAG_EXTENTS, ..reserved(Source::Journal) };
        }

        // lost+found, when the tree has none: four blocks, like mke2fs.
        if tree_lost_found.is_none() {
            let d = dirs.len() as u32;
            dirs.push(DirLayout {
                ino: InodeNo(LOST_FOUND_INO),
                parent: InodeNo(ROOT_INO),
                plan_dir: None,
                lost_found_item: false,
                shape: DirShape::Empty { blocks: 4 },
            });
            let lf = &mut inodes[LOST_FOUND_INO as usize - 1];
            *lf = InodeLayout {
                mode: 0o040700,
                links: 2,
                time: epoch,
                flags: INODE_FLAG_EXTENTS,
                size: 4 * BLOCK_SIZE,
                dir: Some(d),
                ..reserved(Source::LostFound)
            };
            demands[LOST_FOUND_INO as usize - 1] = Demand::Dir(4);
        }

        for (i, planned) in plan.inodes().iter().enumerate() {
            let ino = ino_of[i];
            let tree_inode = tree.inode(planned.idx);
            let meta = &tree_inode.meta;
            let path = || path_of(plan, plan_ino(i));
            let mut links = planned.nlink;
            let mut layout = InodeLayout {
                mode: (tree_inode.body.file_type_bits() | (meta.mode & 0o7777)) as u16,
                uid: meta.uid,
                gid: meta.gid,
                time: clamp(meta.mtime),
                flags: 0,
                ..reserved(Source::Plan(plan_ino(i)))
            };
            let mut demand = Demand::None;
            match &tree_inode.body {
                Body::Dir(_) => {
                    let d = planned.dir.expect("directories have a plan entry");
                    let pdir = plan.dir(d);
                    // A dirent's name length is one byte: a longer name would be cut.
                    if let Some(e) = pdir.entries.iter().find(|e| e.name.len() > 255) {
                        return Err(Ext4Error::NameTooLong { path: path_of(plan, e.ino), len: e.name.len() });
                    }
                    let lost_found_item = i == 0 && tree_lost_found.is_none();
                    if lost_found_item {
                        links += 1;
                    }
                    let mut dir = DirLayout {
                        ino,
                        parent: ino_of[pdir.parent.index()],
                        plan_dir: Some(d),
                        lost_found_item,
                        shape: DirShape::Linear { starts: Vec::new() },
                    };
                    let items = dir_items(plan, &dir, &ino_of);
                    let starts = pack_linear(&items);
                    if starts.len() > 1 {
                        let (order, leaf_starts, leaf_hashes) = pack_htree(&items, &hash_seed);
                        let leaves = leaf_starts.len();
                        let nodes = if leaves <= DX_ROOT_LIMIT {
                            0
                        } else if leaves.div_ceil(DX_NODE_LIMIT) <= DX_ROOT_LIMIT {
                            leaves.div_ceil(DX_NODE_LIMIT) as u32
                        } else {
                            return Err(Ext4Error::DirectoryTooLarge { path: path(), entries: items.len() });
                        };
                        dir.shape = DirShape::Htree { order, leaf_starts, leaf_hashes, nodes };
                        layout.flags |= INODE_FLAG_INDEX;
                    } else {
                        dir.shape = DirShape::Linear { starts };
                    }
                    let n = dir.n_blocks();
                    layout.size = n * BLOCK_SIZE;
                    layout.flags |= INODE_FLAG_EXTENTS;
                    layout.dir = Some(dirs.len() as u32);
                    dirs.push(dir);
                    demand = Demand::Dir(n);
                    // dir_nlink: a directory with too many subdirectories counts 1.
                    if links > 65000 {
                        links = 1;
                    }
                }
                Body::File(content) => {
                    let size = content.len();
                    if size > (u64::from(u32::MAX)) * BLOCK_SIZE {
                        return Err(Ext4Error::FileTooLarge { path: path(), size });
                    }
                    let runs = tree.data_runs(content, BLOCK_SIZE).map_err(|source| Ext4Error::ReadContent { path: path(), source })?;
                    layout.size = size;
                    layout.flags |= INODE_FLAG_EXTENTS;
                    demand = Demand::Runs(runs);
                }
                Body::Symlink(target) => {
                    layout.size = target.len() as u64;
                    if target.len() >= BLOCK {
                        return Err(Ext4Error::SymlinkTooLong { path: path(), len: target.len() });
                    }
                    if target.len() < 60 {
                        let mut raw = [0u8; 60];
                        raw[..target.len()].copy_from_slice(target);
                        layout.map = BlockMap::Raw(raw);
                    } else {
                        layout.flags |= INODE_FLAG_EXTENTS;
                        demand = Demand::Runs(vec![(0, 1)]);
                    }
                }
                Body::CharDevice { major, minor } | Body::BlockDevice { major, minor } => {
                    let mut raw = [0u8; 60];
                    if *major < 256 && *minor < 256 {
                        raw[..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
                    } else {
                        let new = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                        raw[4..8].copy_from_slice(&new.to_le_bytes());
                    }
                    layout.map = BlockMap::Raw(raw);
                }
                Body::Fifo | Body::Socket => {}
            }
            if !matches!(tree_inode.body, Body::Dir(_)) && links > 65000 {
                return Err(Ext4Error::TooManyLinks { path: path(), links });
            }
            layout.links = links as u16;

            if !meta.xattrs.is_empty() {
                let mut entries = Vec::with_capacity(meta.xattrs.len());
                for (name, value) in &meta.xattrs {
                    let shown = || String::from_utf8_lossy(name).into_owned();
                    let (index, suffix) = xattr_index(name).ok_or_else(|| Ext4Error::XattrNamespace { path: path(), name: shown() })?;
                    let value = if index == 2 || index == 3 {
                        acl_to_ext4(value).ok_or_else(|| Ext4Error::BadAcl { path: path(), name: shown() })?
                    } else {
                        value.clone()
                    };
                    if suffix.len() > 255 || value.len() > 4000 {
                        return Err(Ext4Error::XattrTooLong { path: path(), name: shown() });
                    }
                    entries.push(XattrEntry { index, name: suffix.to_vec(), value });
                }
                entries.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
                if let Some(area) = encode_inline_xattrs(&entries) {
                    layout.xattrs = XattrPlace::Inline(area);
                } else {
                    if encode_xattr_block(&entries, 1).is_none() {
                        let needed = 36 + entries.iter().map(|e| e.entry_len() + e.value_len()).sum::<usize>();
                        return Err(Ext4Error::XattrsTooLarge { path: path(), needed });
                    }
                    let idx = match xattr_shared.get(&entries) {
                        Some(&idx) if xattr_blocks[idx as usize].refcount < 1024 => idx,
                        _ => {
                            let idx = xattr_blocks.len() as u32;
                            xattr_blocks.push(XattrBlock { entries: entries.clone(), refcount: 0, block: BlockNo(0) });
                            xattr_shared.insert(entries, idx);
                            idx
                        }
                    };
                    xattr_blocks[idx as usize].refcount += 1;
                    layout.xattrs = XattrPlace::Block(idx);
                    layout.blocks += 1;
                }
            }
            let slot = ino.0 as usize - 1;
            inodes[slot] = layout;
            demands[slot] = demand;
        }

        // Blocks the allocator must find, with an upper bound for extent-tree blocks.
        let mut data_blocks: u64 = xattr_blocks.len() as u64;
        for d in &demands {
            let (blocks, bound) = match d {
                Demand::None => continue,
                Demand::Runs(runs) => (runs.iter().map(|r| r.1).sum::<u64>(), extents_bound(runs)),
                Demand::Dir(n) => (*n, extents_bound(&[(0, *n)])),
            };
            data_blocks += blocks + tree_shape(bound).iter().sum::<usize>() as u64;
        }
        let used_inodes = last_ino;
        let slack_inodes = used_inodes / 16 + 32;

        let geo_for = |blocks: u64, inodes: u64| -> Option<Geometry> {
            let geo = Geometry::new(blocks, inodes)?;
            let need = geo.overhead() + data_blocks + journal_blocks(blocks);
            (need <= blocks && geo.fits()).then_some(geo)
        };
        // The least size whose geometry holds everything plus `extra` free
        // blocks (and the reserved blocks): grow until the need stops growing.
        let auto_size = |extra: u64, inodes: u64| -> Result<Geometry, Ext4Error> {
            let mut blocks = data_blocks + extra;
            // Enough groups for the inodes (a group holds at most `max_ipg`).
            let max_ipg = Geometry::max_inodes_per_group(inodes);
            let min_groups = inodes.div_ceil(max_ipg).max(1);
            blocks = blocks.max((min_groups - 1) * BLOCKS_PER_GROUP + 1);
            for _ in 0..200 {
                let Some(geo) = Geometry::new(blocks, inodes) else {
                    // The groups cannot hold the inodes: add one.
                    blocks = blocks.div_ceil(BLOCKS_PER_GROUP) * BLOCKS_PER_GROUP + 1;
                    continue;
                };
                let mut need = geo.overhead() + data_blocks + journal_blocks(blocks) + extra;
                need += (need as f64 * opts.reserved_percent / (100.0 - opts.reserved_percent)).ceil() as u64;
                // The last group must hold its own metadata and a block more.
                let last = geo.groups - 1;
                need = need.max(geo.group_start(last) + geo.head_blocks(last) + 1);
                if need <= blocks && geo.fits() {
                    return Ok(geo);
                }
                blocks = need.max(blocks + 1);
            }
            Err(Ext4Error::TooManyBlocks { blocks })
        };

        let (geo, image_bytes) = match opts.size {
            Ext4Size::Auto { headroom } => {
                let base = auto_size(0, used_inodes + slack_inodes)?;
                let used = base.blocks;
                let extra = match headroom {
                    Headroom::Bytes(b) => b.div_ceil(BLOCK_SIZE),
                    Headroom::Percent(p) => (used * u64::from(p)).div_ceil(100),
                };
                let inodes = used_inodes + slack_inodes + extra * BLOCK_SIZE / 16384;
                let geo = auto_size(extra, inodes)?;
                (geo, geo.blocks * BLOCK_SIZE)
            }
            Ext4Size::Fixed(bytes) => {
                if bytes % BLOCK_SIZE != 0 {
                    return Err(Ext4Error::SizeNotBlockMultiple { given: bytes });
                }
                let too_small = || -> Ext4Error {
                    let needed = auto_size(0, used_inodes).map(|g| g.blocks * BLOCK_SIZE).unwrap_or(u64::MAX);
                    Ext4Error::TooSmall { needed: needed.max(bytes + BLOCK_SIZE), given: bytes }
                };
                let total = bytes / BLOCK_SIZE;
                // Drop a last group too short to hold its own metadata.
                let mut blocks = total;
                if let Some(g) = Geometry::new(blocks, used_inodes) {
                    let last = g.groups - 1;
                    if last > 0 && g.head_blocks(last) + 1 >= g.group_len(last) {
                        blocks = g.group_start(last);
                    }
                }
                // As many inodes as mke2fs would give the free space, then
                // fewer until the content fits.
                let free_guess = blocks.saturating_sub(data_blocks + journal_blocks(blocks));
                let ratio_inodes = free_guess * BLOCK_SIZE / (16384 + INODE_SIZE as u64);
                let candidates = [used_inodes + slack_inodes + ratio_inodes, used_inodes + slack_inodes, used_inodes];
                let geo = candidates.iter().find_map(|&n| geo_for(blocks, n)).ok_or_else(too_small)?;
                (geo, bytes)
            }
        };
        if geo.blocks >= 1 << 48 {
            return Err(Ext4Error::TooManyBlocks { blocks: geo.blocks });
        }

        let mut layout = Layout {
            geo,
            image_bytes,
            uuid,
            hash_seed,
            fs_seed,
            label,
            label_text: opts.label.clone(),
            time: epoch,
            reserved_blocks: (geo.blocks as f64 * opts.reserved_percent / 100.0) as u64,
            free_blocks: 0,
            free_inodes: 0,
            journal: None,
            inodes,
            dirs,
            xattr_blocks,
            pieces: Vec::new(),
            group_free_blocks: Vec::new(),
            group_used_dirs: Vec::new(),
            used: Vec::new(),
            ino_of,
        };
        layout.place(demands, journal_blocks(geo.blocks)).ok_or_else(|| Ext4Error::TooSmall { needed: image_bytes + BLOCK_SIZE, given: image_bytes })?;
        Ok(layout)
    }

    /// Places group metadata, the journal and every inode's blocks;
    /// `None` when the space runs out.
    fn place(&mut self, demands: Vec<Demand>, journal_blocks: u64) -> Option<()> {
        let geo = self.geo;
        let mut pieces = Vec::new();
        for g in 0..geo.groups {
            let group = GroupNo(g);
            if has_super(g) {
                pieces.push(Piece { start: BlockNo(geo.group_start(g)), len: geo.super_blocks(g), kind: PieceKind::Super(group) });
            }
            let (bb, ib, it) = geo.group_metadata(g);
            pieces.push(Piece { start: bb, len: 1, kind: PieceKind::BlockBitmap(group) });
            pieces.push(Piece { start: ib, len: 1, kind: PieceKind::InodeBitmap(group) });
            pieces.push(Piece { start: it, len: geo.itable_blocks, kind: PieceKind::InodeTable(group) });
        }
        let mut alloc = Allocator::new(&geo);
        if journal_blocks > 0 {
            let start = alloc.alloc_contiguous(journal_blocks)?;
            self.journal = Some((start, journal_blocks));
            pieces.push(Piece { start, len: journal_blocks, kind: PieceKind::Journal });
            let extents = map_extents(&[(0, journal_blocks)], &[(start, journal_blocks)]);
            let j = &mut self.inodes[JOURNAL_INO as usize - 1];
            j.size = journal_blocks * BLOCK_SIZE;
            j.blocks = journal_blocks;
            j.map = BlockMap::Extents { extents, tree: Vec::new(), depth: 0 };
        }
        let mut xattr_placed = vec![false; self.xattr_blocks.len()];
        for (slot, demand) in demands.into_iter().enumerate() {
            let ino = InodeNo(slot as u32 + 1);
            let (runs, is_dir) = match demand {
                Demand::None => (Vec::new(), false),
                Demand::Runs(runs) => (runs, false),
                Demand::Dir(n) => (vec![(0, n)], true),
            };
            let inode = &mut self.inodes[slot];
            if inode.source == Source::Journal {
                continue;
            }
            if inode.flags & INODE_FLAG_EXTENTS != 0 {
                let n: u64 = runs.iter().map(|r| r.1).sum();
                let phys = alloc.alloc(n)?;
                let extents = map_extents(&runs, &phys);
                // One piece per extent: extents break at every logical hole
                // and physical jump.
                for e in &extents {
                    let logical = u64::from(e.logical);
                    let kind = if is_dir { PieceKind::Dir { ino, logical } } else { PieceKind::Data { ino, logical } };
                    pieces.push(Piece { start: BlockNo(e.start), len: u64::from(e.len), kind });
                }
                let shape = tree_shape(extents.len());
                let n_tree: usize = shape.iter().sum();
                let mut tree = Vec::with_capacity(n_tree);
                if n_tree > 0 {
                    let mut first = 0u32;
                    for (start, len) in alloc.alloc(n_tree as u64)? {
                        pieces.push(Piece { start, len, kind: PieceKind::Tree { ino, first } });
                        tree.extend((0..len).map(|i| BlockNo(start.0 + i)));
                        first += len as u32;
                    }
                }
                inode.blocks += n + n_tree as u64;
                inode.map = BlockMap::Extents { extents, tree, depth: shape.len() as u16 };
            }
            if let XattrPlace::Block(idx) = inode.xattrs {
                if !xattr_placed[idx as usize] {
                    xattr_placed[idx as usize] = true;
                    let (start, _) = alloc.alloc(1)?[0];
                    self.xattr_blocks[idx as usize].block = start;
                    pieces.push(Piece { start, len: 1, kind: PieceKind::Xattr(idx) });
                }
            }
        }
        pieces.sort_by_key(|p| p.start);
        debug_assert!(pieces.windows(2).all(|w| w[0].start.0 + w[0].len <= w[1].start.0), "pieces overlap");

        // Block bitmaps: every piece is used space.
        let mut used: Vec<(u64, u64)> = Vec::new();
        for p in &pieces {
            match used.last_mut() {
                Some(last) if last.1 == p.start.0 => last.1 += p.len,
                _ => used.push((p.start.0, p.start.0 + p.len)),
            }
        }
        let mut group_free = vec![0u32; geo.groups as usize];
        for g in 0..geo.groups {
            let (gs, ge) = (geo.group_start(g), geo.group_start(g) + geo.group_len(g));
            let in_use: u64 = used.iter().map(|&(s, e)| e.min(ge).saturating_sub(s.max(gs))).sum();
            group_free[g as usize] = (geo.group_len(g) - in_use) as u32;
        }
        let mut used_dirs = vec![0u32; geo.groups as usize];
        for (slot, inode) in self.inodes.iter().enumerate() {
            if inode.mode & 0o170000 == 0o040000 {
                used_dirs[slot / geo.inodes_per_group as usize] += 1;
            }
        }
        self.free_blocks = group_free.iter().map(|&f| u64::from(f)).sum();
        debug_assert_eq!(self.free_blocks, alloc.free_blocks());
        self.free_inodes = geo.inodes() - self.inodes.len() as u64;
        self.group_free_blocks = group_free;
        self.group_used_dirs = used_dirs;
        self.used = used;
        self.pieces = pieces;
        Some(())
    }

    pub fn summary(&self) -> Ext4Summary {
        let u = &self.uuid;
        let uuid =
            format!("{}-{}-{}-{}-{}", hex::encode(&u[0..4]), hex::encode(&u[4..6]), hex::encode(&u[6..8]), hex::encode(&u[8..10]), hex::encode(&u[10..16]));
        Ext4Summary {
            uuid,
            blocks: self.geo.blocks,
            free_blocks: self.free_blocks,
            inodes: self.geo.inodes(),
            free_inodes: self.free_inodes,
            block_groups: u64::from(self.geo.groups),
            journal_blocks: self.journal.map_or(0, |j| j.1),
            label: self.label_text.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let with: Vec<u32> = (0..50).filter(|&g| has_super(g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27, 49]);
    }

    #[test]
    fn geometry_packs_flex_metadata() {
        let geo = Geometry::new(40 * BLOCKS_PER_GROUP, 40 * 64).unwrap();
        assert_eq!((geo.groups, geo.inodes_per_group, geo.itable_blocks, geo.gdt_blocks), (40, 64, 4, 1));
        // Group 17's metadata lives in group 16 (no superblock there).
        let (bb, ib, it) = geo.group_metadata(17);
        assert_eq!(bb.0, 16 * BLOCKS_PER_GROUP + 1);
        assert_eq!(ib.0, 16 * BLOCKS_PER_GROUP + 16 + 1);
        assert_eq!(it.0, 16 * BLOCKS_PER_GROUP + 32 + 4);
        // The last flex group has 8 members.
        assert_eq!(geo.flex_members(32), 8);
        assert_eq!(geo.flex_members(33), 0);
        assert!(geo.fits());
    }

    #[test]
    fn extents_split_at_runs_metadata_and_length() {
        let runs = [(0, 3), (10, 40000)];
        let phys = [(BlockNo(100), 2), (BlockNo(200), 40001)];
        let ext = map_extents(&runs, &phys);
        let got: Vec<_> = ext.iter().map(|e| (e.logical, e.len, e.start)).collect();
        assert_eq!(got, vec![(0, 2, 100), (2, 1, 200), (10, 32768, 201), (32778, 7232, 201 + 32768)]);
        assert!(extents_bound(&runs) >= ext.len());
        assert_eq!(tree_shape(4), Vec::<usize>::new());
        assert_eq!(tree_shape(5), vec![1]);
        assert_eq!(tree_shape(4 * 340 + 1), vec![5, 1]);
    }

    #[test]
    fn acls_shrink_to_the_ext4_format() {
        let mut vfs = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [(1u16, 6u16, u32::MAX), (2, 4, 1000), (4, 4, u32::MAX), (0x10, 4, u32::MAX), (0x20, 0, u32::MAX)] {
            vfs.extend_from_slice(&tag.to_le_bytes());
            vfs.extend_from_slice(&perm.to_le_bytes());
            vfs.extend_from_slice(&id.to_le_bytes());
        }
        let ext4 = acl_to_ext4(&vfs).unwrap();
        assert_eq!(ext4.len(), 4 + 4 + 8 + 4 + 4 + 4);
        assert_eq!(&ext4[..4], &1u32.to_le_bytes());
        assert_eq!(&ext4[8..16], &[2, 0, 4, 0, 0xe8, 3, 0, 0]);
        assert!(acl_to_ext4(&[1, 0, 0, 0]).is_none(), "version 1 is not the VFS format");
    }

    #[test]
    fn journal_sizes_follow_mke2fs() {
        assert_eq!(default_journal_blocks(1000), 1024);
        assert_eq!(default_journal_blocks(300_000), 8192);
        assert_eq!(default_journal_blocks(1 << 30), 262144);
    }
}
