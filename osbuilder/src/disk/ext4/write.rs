//! The write phase: the layout's pieces in block order, with zeros (holes
//! on a seekable sink) between them.

use std::io;

use super::csum::{crc32c_raw, inode_seed};
use super::format::*;
use super::layout::{dir_items, path_of, BlockMap, DirLayout, DirShape, GroupNo, InodeLayout, InodeNo, Item, Layout, PieceKind, Source, XattrPlace};
use super::Ext4Error;
use crate::disk::Sink;
use crate::rootfs::{Body, ContentReader, Plan};

/// Buffers small writes into large ones; short runs of zeros are written
/// as bytes, long ones become holes.
struct Out<'s> {
    sink: &'s mut dyn Sink,
    base: u64,
    buf: Vec<u8>,
}

const OUT_BUF: usize = 4 << 20;
const HOLE_MIN: u64 = 64 << 10;

impl<'s> Out<'s> {
    fn new(sink: &'s mut dyn Sink) -> Self {
        let base = sink.position();
        Out { sink, base, buf: Vec::with_capacity(OUT_BUF) }
    }

    /// The offset of the next byte from the start of the image.
    fn position(&self) -> u64 {
        self.sink.position() - self.base + self.buf.len() as u64
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.sink.write_all(&self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.buf.len() + bytes.len() > OUT_BUF {
            self.flush()?;
            if bytes.len() >= OUT_BUF {
                return self.sink.write_all(bytes);
            }
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn zeros(&mut self, len: u64) -> io::Result<()> {
        if len >= HOLE_MIN {
            self.flush()?;
            return self.sink.zeros(len);
        }
        if self.buf.len() + len as usize > OUT_BUF {
            self.flush()?;
        }
        self.buf.resize(self.buf.len() + len as usize, 0);
        Ok(())
    }

    /// Appends `len` bytes that `fill` reads into place.
    fn fill(&mut self, len: usize, fill: impl FnOnce(&mut [u8]) -> io::Result<()>) -> io::Result<()> {
        if self.buf.len() + len > OUT_BUF {
            self.flush()?;
        }
        let at = self.buf.len();
        self.buf.resize(at + len, 0);
        fill(&mut self.buf[at..])
    }
}

/// Streams the image described by `layout` into `sink`.
pub fn write(layout: &Layout, plan: &Plan, sink: &mut dyn Sink) -> Result<(), Ext4Error> {
    let mut w = Writer { layout, plan, out: Out::new(sink), gdt: Vec::new(), dir_cache: None };
    w.run()
}

struct Writer<'a, 's> {
    layout: &'a Layout,
    plan: &'a Plan<'a>,
    out: Out<'s>,
    /// The encoded group descriptor table (the same in every copy).
    gdt: Vec<u8>,
    /// The items of the directory written last (a directory's blocks may
    /// come in several pieces).
    dir_cache: Option<(InodeNo, Vec<Item<'a>>)>,
}

impl<'a, 's> Writer<'a, 's> {
    fn run(&mut self) -> Result<(), Ext4Error> {
        let layout = self.layout;
        self.gdt = self.encode_gdt();
        for piece in &layout.pieces {
            let at = piece.start.byte_offset();
            let pos = self.out.position();
            debug_assert!(pos <= at, "piece {piece:?} starts before the write position {pos}");
            self.out.zeros(at - pos).map_err(Ext4Error::Write)?;
            match piece.kind {
                PieceKind::Super(g) => self.write_super(g)?,
                PieceKind::BlockBitmap(g) => {
                    let bitmap = self.block_bitmap(g);
                    self.out.write(&bitmap).map_err(Ext4Error::Write)?;
                }
                PieceKind::InodeBitmap(g) => {
                    let bitmap = self.inode_bitmap(g);
                    self.out.write(&bitmap).map_err(Ext4Error::Write)?;
                }
                PieceKind::InodeTable(g) => self.write_inode_table(g)?,
                PieceKind::Journal => {
                    let jsb = encode_journal_superblock(piece.len as u32, &layout.uuid);
                    self.out.write(&jsb).map_err(Ext4Error::Write)?;
                    self.out.zeros(piece.len * BLOCK_SIZE - jsb.len() as u64).map_err(Ext4Error::Write)?;
                }
                PieceKind::Dir { ino, logical } => {
                    for b in logical..logical + piece.len {
                        let block = self.dir_block(ino, b);
                        self.out.write(&block).map_err(Ext4Error::Write)?;
                    }
                }
                PieceKind::Data { ino, logical } => self.write_data(ino, logical, piece.len)?,
                PieceKind::Tree { ino, first } => {
                    let inode = self.inode(ino);
                    let (_, blocks) = encode_tree(&inode.map, inode_seed(layout.fs_seed, ino.0, 0));
                    for block in &blocks[first as usize..first as usize + piece.len as usize] {
                        self.out.write(block).map_err(Ext4Error::Write)?;
                    }
                }
                PieceKind::Xattr(idx) => {
                    let x = &layout.xattr_blocks[idx as usize];
                    let mut block = encode_xattr_block(&x.entries, x.refcount).expect("the layout checked that it fits");
                    seal_xattr_block(&mut block, x.block.0, layout.fs_seed);
                    self.out.write(&block).map_err(Ext4Error::Write)?;
                }
            }
            debug_assert_eq!(self.out.position(), at + piece.len * BLOCK_SIZE, "piece {piece:?} has the wrong length");
        }
        let pos = self.out.position();
        self.out.zeros(layout.image_bytes - pos).map_err(Ext4Error::Write)?;
        self.out.flush().map_err(Ext4Error::Write)?;
        Ok(())
    }

    fn inode(&self, ino: InodeNo) -> &'a InodeLayout {
        &self.layout.inodes[ino.0 as usize - 1]
    }

    /// Inodes of group `g` in use (they are numbered without gaps).
    fn used_in_group(&self, g: GroupNo) -> u32 {
        let ipg = u64::from(self.layout.geo.inodes_per_group);
        let first = u64::from(g.0) * ipg;
        (self.layout.inodes.len() as u64).saturating_sub(first).min(ipg) as u32
    }

    fn encode_gdt(&self) -> Vec<u8> {
        let layout = self.layout;
        let geo = &layout.geo;
        let mut gdt = vec![0u8; geo.gdt_blocks as usize * BLOCK];
        for g in 0..geo.groups {
            let group = GroupNo(g);
            let (bb, ib, it) = geo.group_metadata(g);
            let used = self.used_in_group(group);
            let ipg = geo.inodes_per_group;
            let desc = GroupDesc {
                block_bitmap: bb.0,
                inode_bitmap: ib.0,
                inode_table: it.0,
                free_blocks: layout.group_free_blocks[g as usize],
                free_inodes: ipg - used,
                used_dirs: layout.group_used_dirs[g as usize],
                flags: BG_INODE_ZEROED,
                itable_unused: ipg - used,
                block_bitmap_csum: crc32c_raw(layout.fs_seed, &self.block_bitmap(group)),
                inode_bitmap_csum: crc32c_raw(layout.fs_seed, &self.inode_bitmap(group)[..ipg as usize / 8]),
            };
            let at = g as usize * DESC_SIZE;
            gdt[at..at + DESC_SIZE].copy_from_slice(&encode_group_desc(&desc, g, layout.fs_seed));
        }
        gdt
    }

    fn write_super(&mut self, g: GroupNo) -> Result<(), Ext4Error> {
        let layout = self.layout;
        let journal_blocks = layout.journal.map(|_| {
            let j = self.inode(InodeNo(JOURNAL_INO));
            let (root, _) = encode_tree(&j.map, 0);
            let mut words = [0u32; 17];
            for (i, w) in words.iter_mut().take(15).enumerate() {
                *w = u32::from_le_bytes(root[4 * i..4 * i + 4].try_into().expect("4 bytes"));
            }
            words[15] = (j.size >> 32) as u32;
            words[16] = j.size as u32;
            words
        });
        let sb = encode_superblock(&SuperblockFields {
            inodes_count: layout.geo.inodes() as u32,
            blocks_count: layout.geo.blocks,
            r_blocks_count: layout.reserved_blocks,
            free_blocks_count: layout.free_blocks,
            free_inodes_count: layout.free_inodes as u32,
            inodes_per_group: layout.geo.inodes_per_group,
            time: layout.time,
            uuid: layout.uuid,
            label: layout.label,
            hash_seed: layout.hash_seed,
            journal_blocks,
            block_group_nr: g.0 as u16,
        });
        let mut block = vec![0u8; BLOCK];
        // The primary superblock sits 1024 bytes in; backups start their block.
        let at = if g.0 == 0 { 1024 } else { 0 };
        block[at..at + 1024].copy_from_slice(&sb);
        self.out.write(&block).map_err(Ext4Error::Write)?;
        let gdt = std::mem::take(&mut self.gdt);
        let r = self.out.write(&gdt).map_err(Ext4Error::Write);
        self.gdt = gdt;
        r
    }

    fn block_bitmap(&self, g: GroupNo) -> Vec<u8> {
        let geo = &self.layout.geo;
        let start = geo.group_start(g.0);
        let end = start + geo.group_len(g.0);
        let mut bitmap = vec![0u8; BLOCK];
        let set = |bitmap: &mut [u8], from: u64, to: u64| {
            for bit in from..to {
                bitmap[bit as usize / 8] |= 1 << (bit % 8);
            }
        };
        let used = &self.layout.used;
        let first = used.partition_point(|&(_, e)| e <= start);
        for &(s, e) in &used[first..] {
            if s >= end {
                break;
            }
            set(&mut bitmap, s.max(start) - start, e.min(end) - start);
        }
        // Blocks past the end of a short last group are marked used.
        set(&mut bitmap, end - start, BLOCKS_PER_GROUP);
        bitmap
    }

    fn inode_bitmap(&self, g: GroupNo) -> Vec<u8> {
        let used = self.used_in_group(g);
        let mut bitmap = vec![0u8; BLOCK];
        for bit in (0..used).chain(self.layout.geo.inodes_per_group..(8 * BLOCK) as u32) {
            bitmap[bit as usize / 8] |= 1 << (bit % 8);
        }
        bitmap
    }

    fn write_inode_table(&mut self, g: GroupNo) -> Result<(), Ext4Error> {
        let layout = self.layout;
        let ipg = layout.geo.inodes_per_group as usize;
        let first = g.0 as usize * ipg;
        let used = self.used_in_group(g) as usize;
        for slot in first..first + used {
            let ino = InodeNo(slot as u32 + 1);
            let bytes = self.encode_inode(ino);
            self.out.write(&bytes).map_err(Ext4Error::Write)?;
        }
        self.out.zeros(((ipg - used) * INODE_SIZE) as u64).map_err(Ext4Error::Write)
    }

    fn encode_inode(&self, ino: InodeNo) -> [u8; INODE_SIZE] {
        let layout = self.layout;
        let inode = self.inode(ino);
        if inode.source == Source::Reserved {
            return [0u8; INODE_SIZE];
        }
        let block = match &inode.map {
            BlockMap::Empty => [0u8; 60],
            BlockMap::Raw(raw) => *raw,
            map @ BlockMap::Extents { .. } => encode_tree(map, inode_seed(layout.fs_seed, ino.0, 0)).0,
        };
        let (file_acl, inline_xattrs) = match &inode.xattrs {
            XattrPlace::None => (0, Vec::new()),
            XattrPlace::Inline(area) => (0, area.clone()),
            XattrPlace::Block(idx) => (layout.xattr_blocks[*idx as usize].block.0, Vec::new()),
        };
        let fields = InodeFields {
            mode: inode.mode,
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            time: inode.time,
            links: inode.links,
            sectors: inode.blocks * (BLOCK_SIZE / 512),
            flags: inode.flags,
            block,
            file_acl,
            inline_xattrs,
        };
        encode_inode(&fields, ino.0, layout.fs_seed)
    }

    fn dir_block(&mut self, ino: InodeNo, b: u64) -> Vec<u8> {
        let layout = self.layout;
        let inode = self.inode(ino);
        let dir: &'a DirLayout = &layout.dirs[inode.dir.expect("a directory") as usize];
        if self.dir_cache.as_ref().map(|c| c.0) != Some(ino) {
            self.dir_cache = Some((ino, dir_items(self.plan, dir, &layout.ino_of)));
        }
        let items = &self.dir_cache.as_ref().expect("just filled").1;
        let seed = inode_seed(layout.fs_seed, ino.0, 0);
        let mut block = vec![0u8; BLOCK];
        let b = b as usize;
        match &dir.shape {
            DirShape::Linear { starts } => {
                let from = starts[b] as usize;
                let to = starts.get(b + 1).map_or(items.len(), |&s| s as usize);
                let mut at = 0;
                let mut entries: Vec<(&[u8], u32, u8)> = Vec::new();
                if b == 0 {
                    entries.push((b".", dir.ino.0, FT_DIR));
                    entries.push((b"..", dir.parent.0, FT_DIR));
                }
                entries.extend(items[from..to].iter().map(|i| (i.name, i.ino.0, i.file_type)));
                fill_leaf(&mut block, &mut at, &entries);
                seal_dir_leaf(&mut block, seed);
            }
            DirShape::Empty { .. } => {
                if b == 0 {
                    fill_leaf(&mut block, &mut 0, &[(b".", dir.ino.0, FT_DIR), (b"..", dir.parent.0, FT_DIR)]);
                } else {
                    encode_dirent(&mut block, 0, DIR_LEAF_SPACE, b"", 0);
                }
                seal_dir_leaf(&mut block, seed);
            }
            DirShape::Htree { order, leaf_starts, leaf_hashes, nodes } => {
                let nodes = *nodes as usize;
                let leaves = leaf_starts.len();
                let leaf_entry = |j: usize| (leaf_hashes[j], (1 + nodes + j) as u32);
                if b == 0 {
                    let entries: Vec<(u32, u32)> = if nodes == 0 {
                        (0..leaves).map(leaf_entry).collect()
                    } else {
                        (0..nodes).map(|k| (leaf_hashes[k * DX_NODE_LIMIT], 1 + k as u32)).collect()
                    };
                    encode_dx_root(&mut block, dir.ino.0, dir.parent.0, u8::from(nodes > 0), &entries, seed);
                } else if b <= nodes {
                    let k = b - 1;
                    let range = k * DX_NODE_LIMIT..((k + 1) * DX_NODE_LIMIT).min(leaves);
                    let entries: Vec<(u32, u32)> = range.map(leaf_entry).collect();
                    encode_dx_node(&mut block, &entries, seed);
                } else {
                    let j = b - 1 - nodes;
                    let from = leaf_starts[j] as usize;
                    let to = leaf_starts.get(j + 1).map_or(order.len(), |&s| s as usize);
                    let entries: Vec<(&[u8], u32, u8)> = order[from..to]
                        .iter()
                        .map(|&i| {
                            let item = &items[i as usize];
                            (item.name, item.ino.0, item.file_type)
                        })
                        .collect();
                    fill_leaf(&mut block, &mut 0, &entries);
                    seal_dir_leaf(&mut block, seed);
                }
            }
        }
        block
    }

    fn write_data(&mut self, ino: InodeNo, logical: u64, n_blocks: u64) -> Result<(), Ext4Error> {
        let plan = self.plan;
        let inode = self.inode(ino);
        let Source::Plan(pino) = inode.source else { unreachable!("only tree inodes have data") };
        let path = || path_of(plan, pino);
        let total = n_blocks * BLOCK_SIZE;
        match &plan.tree_inode(pino).body {
            Body::Symlink(target) => {
                self.out.write(target).map_err(Ext4Error::Write)?;
                self.out.zeros(total - target.len() as u64).map_err(Ext4Error::Write)?;
            }
            Body::File(content) => {
                let reader: ContentReader = plan.tree().open_content(content).map_err(|source| Ext4Error::ReadContent { path: path(), source })?;
                if reader.len() != inode.size {
                    return Err(Ext4Error::ContentChanged { path: path(), expected: inode.size });
                }
                let start = logical * BLOCK_SIZE;
                let end = (start + total).min(inode.size);
                let mut pos = start;
                while pos < end {
                    let n = (end - pos).min(OUT_BUF as u64 / 2) as usize;
                    self.out.fill(n, |buf| reader.read_exact_at(buf, pos)).map_err(|source| Ext4Error::ReadContent { path: path(), source })?;
                    pos += n as u64;
                }
                self.out.zeros(start + total - end).map_err(Ext4Error::Write)?;
            }
            _ => unreachable!("only files and symlinks have data"),
        }
        Ok(())
    }
}

/// Packs `entries` into a leaf block from `*at`; the last entry's record
/// reaches the checksum tail.
fn fill_leaf(block: &mut [u8], at: &mut usize, entries: &[(&[u8], u32, u8)]) {
    for (i, (name, ino, ft)) in entries.iter().enumerate() {
        let len = dirent_len(name.len());
        let rec_len = if i + 1 == entries.len() { DIR_LEAF_SPACE - *at } else { len };
        encode_dirent(&mut block[*at..], *ino, rec_len, name, *ft);
        *at += len;
    }
    if entries.is_empty() {
        encode_dirent(&mut block[*at..], 0, DIR_LEAF_SPACE - *at, b"", 0);
    }
}

/// The inode's `i_block` root and its tree blocks (in `tree` order) for an
/// extent map.
fn encode_tree(map: &BlockMap, ino_seed: u32) -> ([u8; 60], Vec<Vec<u8>>) {
    let BlockMap::Extents { extents, tree, depth } = map else { unreachable!("an extent map") };
    let mut entries: Vec<ExtentEntry> = extents.iter().map(|e| ExtentEntry::Leaf(*e)).collect();
    let mut blocks = Vec::with_capacity(tree.len());
    for level in 0..*depth {
        let mut next = Vec::with_capacity(entries.len().div_ceil(EXTENTS_PER_BLOCK));
        for chunk in entries.chunks(EXTENTS_PER_BLOCK) {
            let child = tree[blocks.len()];
            let mut block = vec![0u8; BLOCK];
            encode_extent_node(&mut block, chunk, level);
            seal_extent_block(&mut block, ino_seed);
            blocks.push(block);
            next.push(ExtentEntry::Index(ExtentIndex { logical: chunk[0].logical(), child: child.0 }));
        }
        entries = next;
    }
    let mut root = [0u8; 60];
    encode_extent_node(&mut root, &entries, *depth);
    (root, blocks)
}
