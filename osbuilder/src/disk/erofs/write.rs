//! Phase two: the bytes, in block order.

use super::format::*;
use super::layout::{Data, DirShape, Layout};
use super::ErofsError;
use crate::disk::Sink;
use crate::rootfs::{Body, ContentReader, Plan, PlanIno};

const B: u64 = BLOCK as u64;
const CHUNK: usize = 1 << 20;

/// Directory block `k` of `shape`, `used` bytes long (no padding).
fn dir_block(l: &Layout, plan: &Plan, shape: &DirShape, k: usize) -> Vec<u8> {
    let (first, end) = shape.blocks[k];
    let entries: Vec<(&[u8], u64, u8)> =
        shape.sorted[first..end].iter().map(|(name, ino)| (name.as_slice(), l.inodes[ino.index()].nid, plan.tree_inode(*ino).body.dirent_type())).collect();
    let mut out = Vec::with_capacity(BLOCK);
    encode_dir_block(&entries, &mut out);
    out
}

fn open(plan: &Plan, ino: PlanIno, size: u64) -> Result<ContentReader, ErofsError> {
    let Body::File(content) = &plan.tree_inode(ino).body else { unreachable!("file data comes from files") };
    let reader = plan.tree().open_content(content).map_err(|source| ErofsError::ReadContent { path: plan.path_of(ino), source })?;
    if reader.len() != size {
        return Err(ErofsError::ContentChanged { path: plan.path_of(ino), expected: size });
    }
    Ok(reader)
}

pub fn write(l: &Layout, plan: &Plan, sink: &mut dyn Sink) -> Result<(), ErofsError> {
    let start = sink.position();
    let w = |e| ErofsError::Write(e);

    // The metadata area, built whole (a few bytes per inode).
    let mut meta = vec![0u8; l.meta_end as usize];
    let mut rec_buf = Vec::with_capacity(BLOCK);
    for (i, rec) in l.inodes.iter().enumerate() {
        let ino = PlanIno::from_index(i);
        rec_buf.clear();
        encode_inode(&rec.head, &mut rec_buf);
        rec_buf.extend_from_slice(&rec.xattrs);
        let at = (rec.nid * SLOT) as usize;
        match &rec.data {
            Data::None => {}
            Data::Flat { tail: 0, .. } => {}
            Data::Flat { blocks, tail, .. } => match &plan.tree_inode(ino).body {
                Body::File(_) => {
                    let reader = open(plan, ino, rec.head.size)?;
                    let from = rec_buf.len();
                    rec_buf.resize(from + *tail as usize, 0);
                    reader.read_exact_at(&mut rec_buf[from..], blocks * B).map_err(|source| ErofsError::ReadContent { path: plan.path_of(ino), source })?;
                }
                Body::Symlink(target) => rec_buf.extend_from_slice(target),
                Body::Dir(_) => {
                    let shape = &l.dirs[plan.inode(ino).dir.expect("a directory").index()];
                    let last = dir_block(l, plan, shape, shape.blocks.len() - 1);
                    debug_assert_eq!(last.len(), *tail as usize);
                    rec_buf.extend_from_slice(&last);
                }
                _ => unreachable!("only files, symlinks and directories have data"),
            },
            Data::Chunked { map, .. } => {
                let aligned = (at + rec_buf.len()).next_multiple_of(CHUNK_INDEX) - at;
                rec_buf.resize(aligned, 0);
                for m in map {
                    rec_buf.extend_from_slice(&[0; 4]); // advise, device id
                    rec_buf.extend_from_slice(&m.expect("placed").to_le_bytes());
                }
            }
            Data::Compressed { blkaddr, data } => {
                let aligned = (at + rec_buf.len()).next_multiple_of(8) - at;
                rec_buf.resize(aligned, 0);
                encode_full_index_head(&mut rec_buf);
                for lc in data.lclusters(rec.head.size, *blkaddr) {
                    encode_lcluster(lc, &mut rec_buf);
                }
            }
        }
        meta[at..at + rec_buf.len()].copy_from_slice(&rec_buf);
    }
    let sb = Superblock {
        feature_compat: COMPAT_SB_CHKSUM | COMPAT_MTIME,
        feature_incompat: l.feature_incompat,
        root_nid: l.root_nid(),
        inos: l.inodes.len() as u64,
        build_time: l.build_time,
        blocks: (l.image_bytes / B) as u32,
        meta_blkaddr: 0,
        xattr_blkaddr: l.xattr_blkaddr,
        uuid: l.uuid,
        volume_name: l.volume_name,
    };
    meta[SUPER_OFFSET..SUPER_OFFSET + SUPER_SIZE].copy_from_slice(&encode_superblock(&sb));
    seal_superblock(&mut meta[..BLOCK]);
    sink.write_all(&meta).map_err(w)?;
    drop(meta);
    sink.write_all(&l.shared).map_err(w)?;
    debug_assert_eq!(sink.position() - start, l.data_start as u64 * B);

    // The data area: the shared zero block first, then every inode's blocks.
    if l.zero_block.is_some() {
        sink.zeros(B).map_err(w)?;
    }
    let mut buf = vec![0u8; CHUNK];
    for (i, rec) in l.inodes.iter().enumerate() {
        let ino = PlanIno::from_index(i);
        match &rec.data {
            Data::None => {}
            Data::Flat { blocks: 0, .. } => {}
            Data::Flat { blkaddr, blocks, .. } => {
                debug_assert_eq!(sink.position() - start, *blkaddr as u64 * B);
                let total = blocks * B;
                match &plan.tree_inode(ino).body {
                    Body::File(_) => {
                        let reader = open(plan, ino, rec.head.size)?;
                        let end = total.min(rec.head.size);
                        let mut pos = 0u64;
                        while pos < end {
                            let n = (end - pos).min(CHUNK as u64) as usize;
                            reader.read_exact_at(&mut buf[..n], pos).map_err(|source| ErofsError::ReadContent { path: plan.path_of(ino), source })?;
                            sink.write_all(&buf[..n]).map_err(w)?;
                            pos += n as u64;
                        }
                        sink.zeros(total - end).map_err(w)?;
                    }
                    Body::Symlink(target) => {
                        sink.write_all(target).map_err(w)?;
                        sink.zeros(total - target.len() as u64).map_err(w)?;
                    }
                    Body::Dir(_) => {
                        let shape = &l.dirs[plan.inode(ino).dir.expect("a directory").index()];
                        for k in 0..*blocks as usize {
                            let block = dir_block(l, plan, shape, k);
                            sink.write_all(&block).map_err(w)?;
                            sink.zeros(B - block.len() as u64).map_err(w)?;
                        }
                    }
                    _ => unreachable!("only files, symlinks and directories have data"),
                }
            }
            Data::Chunked { blkaddr, map } => {
                debug_assert_eq!(sink.position() - start, *blkaddr as u64 * B);
                let reader = open(plan, ino, rec.head.size)?;
                for (chunk, m) in map.iter().enumerate() {
                    if *m == l.zero_block {
                        continue;
                    }
                    let pos = chunk as u64 * B;
                    let n = (rec.head.size - pos).min(B) as usize;
                    reader.read_exact_at(&mut buf[..n], pos).map_err(|source| ErofsError::ReadContent { path: plan.path_of(ino), source })?;
                    sink.write_all(&buf[..n]).map_err(w)?;
                    sink.zeros(B - n as u64).map_err(w)?;
                }
            }
            Data::Compressed { blkaddr, data } => {
                debug_assert_eq!(sink.position() - start, *blkaddr as u64 * B);
                sink.write_all(&data.blocks).map_err(w)?;
            }
        }
    }
    let written = sink.position() - start;
    debug_assert_eq!(written, l.blocks * B);
    sink.zeros(l.image_bytes - written).map_err(w)?;
    Ok(())
}
