//! Phase one: every inode's shape, nid and data blocks, settled before a byte
//! is written.
//!
//! The image is, in block order: block 0 (the superblock at 1024, then the
//! first inodes), the rest of the metadata area (inodes in plan order with
//! their inline xattrs and, right after each inode, its inline tail, chunk
//! map or compressed index), the shared xattr area, then the data area (each
//! inode's blocks in plan order). The metadata area starts at block 0
//! (`meta_blkaddr` 0), so the root, first in plan order, gets nid 36 and
//! any nid fits the superblock's 16-bit `root_nid`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::compress::{self, Compressed, Compression};
use super::format::*;
use super::{ErofsError, ErofsOptions};
use crate::rootfs::{Body, Plan, PlanIno};

const B: u64 = BLOCK as u64;
/// Where the first inode goes: after the superblock, 32-aligned.
const FIRST_INODE: u64 = (SUPER_OFFSET + SUPER_SIZE) as u64;

/// How an inode's data is stored.
#[derive(Debug)]
pub(super) enum Data {
    /// Nothing (devices, fifos, sockets, empty files).
    None,
    /// `blocks` whole blocks from `blkaddr` in the data area, then `tail`
    /// bytes inline after the inode (0: no inline part).
    Flat {
        blkaddr: u32,
        blocks: u64,
        tail: u32,
    },
    /// 4 KiB chunks with 8-byte indexes; `map[i]` is chunk i's data-area
    /// block (during layout `None` for a hole, then the shared zero block).
    /// Used for files with holes (flat inodes cannot have any).
    Chunked {
        blkaddr: u32,
        map: Vec<Option<u32>>,
    },
    Compressed {
        blkaddr: u32,
        data: Compressed,
    },
}

#[derive(Debug)]
pub(super) struct InodeRec {
    pub nid: u64,
    pub head: InodeHead,
    /// The inline xattr body (header, shared ids, entries), if any.
    pub xattrs: Vec<u8>,
    pub data: Data,
}

impl InodeRec {
    pub fn layout(&self) -> DataLayout {
        match &self.data {
            Data::None => DataLayout::FlatPlain,
            Data::Flat { tail: 0, .. } => DataLayout::FlatPlain,
            Data::Flat { .. } => DataLayout::FlatInline,
            Data::Chunked { .. } => DataLayout::ChunkBased,
            Data::Compressed { .. } => DataLayout::CompressedFull,
        }
    }
}

#[derive(Debug)]
pub(super) struct Layout {
    /// Indexed by `PlanIno`.
    pub inodes: Vec<InodeRec>,
    /// Per directory (by `DirIdx`): the entries of each block, as indexes
    /// into `sorted` (the children plus `.` and `..`, sorted by name).
    pub dirs: Vec<DirShape>,
    pub meta_end: u64,
    pub xattr_blkaddr: u32,
    /// The shared xattr area (whole blocks).
    pub shared: Vec<u8>,
    pub data_start: u32,
    /// The zero block holes of chunk-based files point at, if any.
    pub zero_block: Option<u32>,
    pub blocks: u64,
    pub image_bytes: u64,
    pub build_time: u64,
    pub uuid: [u8; 16],
    pub volume_name: [u8; 16],
    pub feature_incompat: u32,
    pub compressed_files: u64,
    pub inline_tails: u64,
}

/// A directory's contents: names in on-disk order and how they split into
/// blocks.
#[derive(Debug)]
pub(super) struct DirShape {
    /// `(name, child)`; `.` and `..` included.
    pub sorted: Vec<(Vec<u8>, PlanIno)>,
    /// `(first, end)` ranges of `sorted` per block.
    pub blocks: Vec<(usize, usize)>,
    /// The used bytes of the last block.
    pub last_len: usize,
}

impl DirShape {
    pub fn size(&self) -> u64 {
        (self.blocks.len() as u64 - 1) * B + self.last_len as u64
    }
}

fn dir_shape(plan: &Plan, dir: &crate::rootfs::PlannedDir) -> Result<DirShape, ErofsError> {
    let mut sorted: Vec<(Vec<u8>, PlanIno)> = Vec::with_capacity(dir.entries.len() + 2);
    sorted.push((b".".to_vec(), dir.ino));
    sorted.push((b"..".to_vec(), dir.parent));
    for e in &dir.entries {
        if e.name.len() > 255 {
            return Err(ErofsError::NameTooLong { path: plan.path_of(e.ino), len: e.name.len() });
        }
        sorted.push((e.name.to_vec(), e.ino));
    }
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut blocks = Vec::new();
    let (mut first, mut used) = (0usize, 0usize);
    for (i, (name, _)) in sorted.iter().enumerate() {
        let need = DIRENT + name.len();
        if used + need > BLOCK {
            blocks.push((first, i));
            first = i;
            used = 0;
        }
        used += need;
    }
    blocks.push((first, sorted.len()));
    Ok(DirShape { sorted, blocks, last_len: used })
}

/// Splits a full xattr name into erofs's short-prefix index and the rest.
fn xattr_index(name: &[u8]) -> Option<(u8, &[u8])> {
    match name {
        b"system.posix_acl_access" => return Some((2, b"")),
        b"system.posix_acl_default" => return Some((3, b"")),
        _ => {}
    }
    const PREFIXES: [(&[u8], u8); 3] = [(b"user.", 1), (b"trusted.", 4), (b"security.", 6)];
    PREFIXES.iter().find(|(p, _)| name.starts_with(p)).map(|(p, i)| (*i, &name[p.len()..]))
}

type XattrKey = (u8, Vec<u8>, Vec<u8>);

impl Layout {
    pub fn new(plan: &Plan, opts: &ErofsOptions) -> Result<Layout, ErofsError> {
        let tree = plan.tree();
        let n = plan.inodes().len();
        if n as u64 > u32::MAX as u64 {
            return Err(ErofsError::TooManyInodes { inodes: n as u64 });
        }
        let epoch = opts.source_date_epoch.max(0);
        let clamp = |t: i64| t.min(epoch).max(0);

        // The build time compact inodes inherit: the most common mtime, so
        // as many inodes as possible are 32 bytes.
        let mut times: HashMap<i64, u64> = HashMap::new();
        for pi in plan.inodes() {
            *times.entry(clamp(tree.inode(pi.idx).meta.mtime)).or_default() += 1;
        }
        let build_time = times.iter().max_by_key(|(t, c)| (**c, std::cmp::Reverse(**t))).map_or(epoch, |(t, _)| *t);

        // Xattrs: split names, count identical ones; those on two or more
        // inodes go to the shared area once.
        let mut per_inode: Vec<Vec<XattrKey>> = Vec::with_capacity(n);
        let mut counts: HashMap<XattrKey, u32> = HashMap::new();
        for (i, pi) in plan.inodes().iter().enumerate() {
            let meta = &tree.inode(pi.idx).meta;
            let mut list = Vec::with_capacity(meta.xattrs.len());
            for (name, value) in &meta.xattrs {
                let path = || plan.path_of(PlanIno::from_index(i));
                let shown = || String::from_utf8_lossy(name).into_owned();
                let (index, rest) = xattr_index(name).ok_or_else(|| ErofsError::XattrNamespace { path: path(), name: shown() })?;
                if rest.len() > 255 || value.len() > u16::MAX as usize {
                    return Err(ErofsError::XattrTooLong { path: path(), name: shown() });
                }
                let key = (index, rest.to_vec(), value.clone());
                *counts.entry(key.clone()).or_default() += 1;
                list.push(key);
            }
            per_inode.push(list);
        }
        let mut shared = Vec::new();
        let mut shared_ids: HashMap<XattrKey, u32> = HashMap::new();
        for list in &per_inode {
            for key in list {
                if counts[key] >= 2 && !shared_ids.contains_key(key) {
                    let len = xattr_entry_len(&key.1, &key.2);
                    let left = BLOCK - shared.len() % BLOCK;
                    if len > left {
                        shared.resize(shared.len() + left, 0); // an entry never straddles blocks
                    }
                    shared_ids.insert(key.clone(), (shared.len() / 4) as u32);
                    encode_xattr_entry(key.0, &key.1, &key.2, &mut shared);
                }
            }
        }
        shared.resize(shared.len().next_multiple_of(BLOCK), 0);

        let dirs: Vec<DirShape> = plan.dirs().iter().map(|d| dir_shape(plan, d)).collect::<Result<_, _>>()?;

        let compressed = if opts.compression == Compression::None { Vec::new() } else { compress_all(plan, opts)? };
        let mut compressed: Vec<Option<Probed>> = compressed;
        compressed.resize_with(n, || None);

        // Place the inodes.
        let mut inodes = Vec::with_capacity(n);
        let mut pos = FIRST_INODE;
        let (mut compressed_files, mut inline_tails) = (0u64, 0u64);
        for (i, pi) in plan.inodes().iter().enumerate() {
            let ino = PlanIno::from_index(i);
            let inode = tree.inode(pi.idx);
            let meta = &inode.meta;
            let path = || plan.path_of(ino);

            let mut xattrs = Vec::new();
            if !per_inode[i].is_empty() {
                let ids: Vec<u32> = per_inode[i].iter().filter_map(|k| shared_ids.get(k).copied()).collect();
                if ids.len() > u8::MAX as usize {
                    return Err(ErofsError::XattrsTooLarge { path: path() });
                }
                encode_xattr_ibody_header(&ids, &mut xattrs);
                for key in per_inode[i].iter().filter(|k| !shared_ids.contains_key(*k)) {
                    encode_xattr_entry(key.0, &key.1, &key.2, &mut xattrs);
                }
            }

            let (size, rdev, tailable, data) = match &inode.body {
                Body::Dir(_) => {
                    let shape = &dirs[pi.dir.expect("directories have a dir entry").index()];
                    (shape.size(), 0, true, None)
                }
                Body::File(content) => {
                    let size = content.len();
                    let probed = compressed[i].take();
                    if let Some(Probed { compressed: Some(c), .. }) = probed {
                        (size, 0, false, Some(Data::Compressed { blkaddr: 0, data: c }))
                    } else if size == 0 {
                        (0, 0, false, Some(Data::None))
                    } else {
                        // The compressor already read the runs of the files it saw.
                        let runs = match probed {
                            Some(p) => p.runs,
                            None => tree.data_runs(content, B).map_err(|source| ErofsError::ReadContent { path: path(), source })?,
                        };
                        let nblocks = size.div_ceil(B);
                        let mapped: u64 = runs.iter().map(|r| r.1).sum();
                        if mapped < nblocks {
                            let mut map = vec![None; nblocks as usize];
                            let mut k = 0u32;
                            for (first, count) in runs {
                                for b in first..first + count {
                                    map[b as usize] = Some(k);
                                    k += 1;
                                }
                            }
                            (size, 0, false, Some(Data::Chunked { blkaddr: 0, map }))
                        } else {
                            (size, 0, opts.inline_data, None)
                        }
                    }
                }
                Body::Symlink(target) => (target.len() as u64, 0, true, None),
                Body::CharDevice { major, minor } | Body::BlockDevice { major, minor } => (0, encode_rdev(*major, *minor), false, Some(Data::None)),
                Body::Fifo | Body::Socket => (0, 0, false, Some(Data::None)),
            };

            let mtime = clamp(meta.mtime);
            let compact =
                meta.uid <= u16::MAX as u32 && meta.gid <= u16::MAX as u32 && pi.nlink <= u16::MAX as u32 && size <= u32::MAX as u64 && mtime == build_time;
            let isize = if compact { COMPACT_INODE } else { EXTENDED_INODE } as u64;
            let base = isize + xattrs.len() as u64;
            if base > B {
                return Err(ErofsError::XattrsTooLarge { path: path() });
            }
            let room = |pos: u64| B - pos % B;
            let next_block = |pos: u64| pos.next_multiple_of(B);

            let data = match data {
                Some(d) => d,
                None => {
                    // A flat inode: full blocks in the data area, and the
                    // tail inline where that fits and wastes less than a block.
                    let tail = size % B;
                    let inline = tailable && tail > 0 && base + tail <= B && {
                        let pad = if room(pos) >= base + tail { 0 } else { room(pos) };
                        pad <= B - tail
                    };
                    if inline {
                        if room(pos) < base + tail {
                            pos = next_block(pos);
                        }
                        inline_tails += 1;
                        Data::Flat { blkaddr: 0, blocks: size / B, tail: tail as u32 }
                    } else {
                        Data::Flat { blkaddr: 0, blocks: size.div_ceil(B), tail: 0 }
                    }
                }
            };
            // The part that must not straddle a block: the inode, its xattrs
            // and (compressed) the map header.
            let (head, extra) = match &data {
                Data::Flat { tail, .. } => (base + *tail as u64, 0),
                Data::None => (base, 0),
                Data::Chunked { map, .. } => (base.next_multiple_of(CHUNK_INDEX as u64), (map.len() * CHUNK_INDEX) as u64),
                Data::Compressed { .. } => {
                    let aligned = base.next_multiple_of(8);
                    (aligned + FULL_INDEX_HEAD as u64, size.div_ceil(B) * LCLUSTER_INDEX as u64)
                }
            };
            if room(pos) < head {
                pos = next_block(pos);
            }
            if let Data::Compressed { .. } = data {
                compressed_files += 1;
            }
            let nid = pos / SLOT;
            pos = (pos + head + extra).next_multiple_of(SLOT);
            let i_u = rdev;
            let rec = InodeRec {
                nid,
                head: InodeHead {
                    compact,
                    layout: DataLayout::FlatPlain,
                    xattr_icount: xattr_icount(xattrs.len()),
                    mode: (inode.body.file_type_bits() | (meta.mode & 0o7777)) as u16,
                    nlink: pi.nlink,
                    size,
                    i_u,
                    ino: i as u32 + 1,
                    uid: meta.uid,
                    gid: meta.gid,
                    mtime,
                },
                xattrs,
                data,
            };
            inodes.push(rec);
        }
        let root_nid = inodes[0].nid;
        debug_assert!(root_nid <= u16::MAX as u64, "the root is the first inode");
        let meta_end = pos.next_multiple_of(B);
        let xattr_blkaddr = (meta_end / B) as u32;
        let data_start_u64 = meta_end / B + (shared.len() / BLOCK) as u64;

        // The data area, in plan order.
        let mut next = data_start_u64;
        // Holes of chunk-based files all point at one zero block at the start
        // of the data area, as mkfs.erofs's deduplicated chunks do: a
        // NULL_ADDR hole is valid for the kernel, but erofs-utils 1.5 extracts
        // it as data.
        let zero_block = inodes.iter().any(|r| matches!(r.data, Data::Chunked { .. })).then(|| {
            next += 1;
            data_start_u64 as u32
        });
        for (i, rec) in inodes.iter_mut().enumerate() {
            let take = |next: &mut u64, count: u64| -> Result<u32, ErofsError> {
                let at = *next;
                *next += count;
                u32::try_from(*next).map(|_| at as u32).map_err(|_| ErofsError::TooManyBlocks { blocks: *next })
            };
            match &mut rec.data {
                Data::None => {}
                Data::Flat { blkaddr, blocks, .. } => {
                    *blkaddr = if *blocks > 0 { take(&mut next, *blocks)? } else { 0 };
                    rec.head.i_u = *blkaddr;
                }
                Data::Chunked { blkaddr, map } => {
                    let count = map.iter().filter(|m| m.is_some()).count() as u64;
                    *blkaddr = take(&mut next, count)?;
                    for m in map.iter_mut() {
                        *m = Some(m.map_or(zero_block.expect("a zero block for holes"), |k| k + *blkaddr));
                    }
                    rec.head.i_u = CHUNK_FORMAT_INDEXES;
                }
                Data::Compressed { blkaddr, data } => {
                    *blkaddr = take(&mut next, data.block_count())?;
                    rec.head.i_u = data.block_count() as u32;
                }
            }
            rec.head.layout = rec.layout();
            let _ = i;
        }
        let used_blocks = next;
        let blocks = match opts.size {
            None => used_blocks,
            Some(bytes) => {
                if bytes % B != 0 {
                    return Err(ErofsError::SizeNotBlockMultiple { given: bytes });
                }
                if bytes < used_blocks * B {
                    return Err(ErofsError::TooSmall { needed: used_blocks * B, given: bytes });
                }
                bytes / B
            }
        };
        if blocks > u32::MAX as u64 {
            return Err(ErofsError::TooManyBlocks { blocks });
        }

        let mut feature_incompat = 0;
        if inodes.iter().any(|r| matches!(r.data, Data::Compressed { .. })) {
            feature_incompat |= INCOMPAT_ZERO_PADDING;
        }
        if inodes.iter().any(|r| matches!(r.data, Data::Chunked { .. })) {
            feature_incompat |= INCOMPAT_CHUNKED_FILE;
        }
        let mut volume_name = [0u8; 16];
        if let Some(label) = &opts.label {
            if label.len() > 15 {
                return Err(ErofsError::LabelTooLong { label: label.clone(), len: label.len() });
            }
            volume_name[..label.len()].copy_from_slice(label.as_bytes());
        }
        let uuid = super::derive_uuid(&opts.seed);
        Ok(Layout {
            inodes,
            dirs,
            meta_end,
            xattr_blkaddr,
            shared,
            data_start: data_start_u64 as u32,
            zero_block,
            blocks: used_blocks,
            image_bytes: blocks * B,
            build_time: build_time as u64,
            uuid,
            volume_name,
            feature_incompat,
            compressed_files,
            inline_tails,
        })
    }

    pub fn root_nid(&self) -> u16 {
        self.inodes[0].nid as u16
    }
}

/// Compresses every regular file larger than a block, on all cores; the
/// results are in plan order whatever the threads did, so the bytes are too.
/// What [`compress_all`] learnt of one file: its data runs, and its
/// compressed form when compressing it saved a block.
struct Probed {
    runs: Vec<(u64, u64)>,
    compressed: Option<Compressed>,
}

fn compress_all(plan: &Plan, opts: &ErofsOptions) -> Result<Vec<Option<Probed>>, ErofsError> {
    let tree = plan.tree();
    let jobs: Vec<(usize, &crate::rootfs::Content)> = plan
        .inodes()
        .iter()
        .enumerate()
        .filter_map(|(i, pi)| match &tree.inode(pi.idx).body {
            Body::File(c) if c.len() > B => Some((i, c)),
            _ => None,
        })
        .collect();
    let results: Mutex<Vec<Option<Probed>>> = Mutex::new((0..plan.inodes().len()).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<ErofsError>> = Mutex::new(None);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(i, content)) = jobs.get(k) else { break };
                if failed.lock().unwrap().is_some() {
                    break;
                }
                let path = || plan.path_of(PlanIno::from_index(i));
                let outcome = tree.open_content(content).and_then(|reader| {
                    if reader.len() != content.len() {
                        return Err(std::io::Error::other(format!("it changed (expected {} bytes)", content.len())));
                    }
                    // Files with holes stay uncompressed and chunk-based, so
                    // their holes cost nothing.
                    let runs = tree.data_runs(content, B)?;
                    let mapped: u64 = runs.iter().map(|r| r.1).sum();
                    let compressed = if mapped < content.len().div_ceil(B) { None } else { compress::compress_file(&reader, content.len(), opts.compression)? };
                    Ok(Probed { runs, compressed })
                });
                match outcome {
                    Ok(p) => results.lock().unwrap()[i] = Some(p),
                    Err(source) => {
                        *failed.lock().unwrap() = Some(ErofsError::ReadContent { path: path(), source });
                        break;
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(e);
    }
    Ok(results.into_inner().unwrap())
}
