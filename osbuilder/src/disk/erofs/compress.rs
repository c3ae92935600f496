//! LZ4 into fixed-size physical clusters, erofs's way.
//!
//! erofs cuts a file into extents that each fill one 4 KiB physical cluster:
//! the compressor is asked for "as much input as fits in 4096 bytes"
//! (liblz4's `LZ4_compress_destSize`, or the HC variant), not "compress this
//! much". The compressed bytes sit at the end of the cluster with zeros
//! before them (the `ZERO_PADDING` feature the kernel uses to find the exact
//! input size). An extent that would not hold more than one block of input
//! is stored plain: 4096 raw bytes (less at the end of the file). So every
//! extent but the last covers at least one block, and each 4 KiB logical
//! cluster holds at most one extent start, which the full index requires.

use std::io;

use super::format::{Lcluster, BLOCK};
use crate::rootfs::ContentReader;

/// The largest input one extent may cover: bounds what a random read has to
/// decompress and keeps index distances far below their 11-bit limit.
const MAX_EXTENT: usize = 256 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    /// liblz4's fast mode.
    Lz4,
    /// liblz4's high-compression mode (level 9, what `mkfs.erofs -zlz4hc`
    /// uses by default).
    Lz4hc,
}

pub const LZ4HC_LEVEL: i32 = 9;

/// One extent: `len` bytes of the file from `start`, in one physical block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub len: u32,
    pub compressed: bool,
}

/// A compressed file: its extents and their blocks (one per extent).
#[derive(Debug)]
pub struct Compressed {
    pub extents: Vec<Extent>,
    pub blocks: Vec<u8>,
}

impl Compressed {
    pub fn block_count(&self) -> u64 {
        self.extents.len() as u64
    }

    /// The full index: one entry per 4 KiB logical cluster of the file,
    /// `base` being the block address of the first physical cluster.
    pub fn lclusters(&self, size: u64, base: u32) -> Vec<Lcluster> {
        let n = size.div_ceil(BLOCK as u64) as usize;
        let mut out = Vec::with_capacity(n);
        let lcn_of = |e: &Extent| (e.start / BLOCK as u64) as usize;
        let mut next = 0usize; // next extent to place
        let mut head = 0usize; // lcluster of the extent covering the current one
        for lcn in 0..n {
            if next < self.extents.len() && lcn_of(&self.extents[next]) == lcn {
                let e = &self.extents[next];
                out.push(Lcluster::Head { compressed: e.compressed, clusterofs: (e.start % BLOCK as u64) as u16, blkaddr: base + next as u32 });
                head = lcn;
                next += 1;
            } else {
                let ahead = self.extents.get(next).map_or(n, lcn_of) - lcn;
                out.push(Lcluster::NonHead { back: (lcn - head) as u16, ahead: ahead as u16 });
            }
        }
        out
    }
}

/// Compresses a whole file of `size` bytes; `None` when that saves no block
/// (the file is then stored uncompressed, as mkfs.erofs does).
pub fn compress_file(reader: &ContentReader, size: u64, algo: Compression) -> io::Result<Option<Compressed>> {
    let plain_blocks = size.div_ceil(BLOCK as u64);
    let mut extents = Vec::new();
    let mut blocks = Vec::new();
    let mut window = Window::new(reader, size);
    let mut out = [0u8; BLOCK];
    let mut pos = 0u64;
    while pos < size {
        if extents.len() as u64 + 1 >= plain_blocks {
            // Even if the rest fitted in one block nothing would be saved.
            return Ok(None);
        }
        let src = window.at(pos)?;
        let last = pos + src.len() as u64 == size;
        let (read, wrote) = match algo {
            Compression::Lz4 => lzzzz::lz4::compress_fill(src, &mut out),
            Compression::Lz4hc => lzzzz::lz4_hc::compress_fill(src, &mut out, LZ4HC_LEVEL),
            Compression::None => unreachable!("no compression asked for"),
        }
        .map_err(|e| io::Error::other(format!("lz4: {e}")))?;
        // A compressed extent must hold more than a block, so that the next
        // one starts in a later logical cluster; the last one may hold less.
        let compressed = read > BLOCK || (last && read == src.len());
        if compressed {
            let at = blocks.len();
            blocks.resize(at + BLOCK, 0);
            blocks[at + BLOCK - wrote..].copy_from_slice(&out[..wrote]);
            extents.push(Extent { start: pos, len: read as u32, compressed: true });
            pos += read as u64;
            continue;
        }
        // Stored plain: a block of input, and never past the end of a
        // logical cluster unless another extent starts in the next one (the
        // kernel maps a plain extent up to the end of the cluster it reads,
        // which must not exceed the physical block).
        let mut n = src.len().min(BLOCK);
        let into = (pos % BLOCK as u64) as usize;
        if pos + n as u64 == size && into + n > BLOCK {
            n = BLOCK - into;
        }
        let at = blocks.len();
        blocks.resize(at + BLOCK, 0);
        blocks[at..at + n].copy_from_slice(&src[..n]);
        extents.push(Extent { start: pos, len: n as u32, compressed: false });
        pos += n as u64;
    }
    if extents.len() as u64 >= plain_blocks {
        return Ok(None);
    }
    Ok(Some(Compressed { extents, blocks }))
}

/// The file's bytes from a position on, up to [`MAX_EXTENT`] at a time.
struct Window<'r> {
    reader: &'r ContentReader,
    size: u64,
    buf: Vec<u8>,
    /// File offset of `buf[0]`.
    start: u64,
}

impl<'r> Window<'r> {
    fn new(reader: &'r ContentReader, size: u64) -> Self {
        Window { reader, size, buf: Vec::with_capacity(4 * MAX_EXTENT), start: 0 }
    }

    fn at(&mut self, pos: u64) -> io::Result<&[u8]> {
        let want_end = (pos + MAX_EXTENT as u64).min(self.size);
        if self.start + (self.buf.len() as u64) < want_end {
            let skip = (pos - self.start) as usize;
            self.buf.drain(..skip);
            self.start = pos;
            let have = self.buf.len();
            let end = (pos + 4 * MAX_EXTENT as u64).min(self.size);
            self.buf.resize((end - pos) as usize, 0);
            self.reader.read_exact_at(&mut self.buf[have..], pos + have as u64)?;
        }
        let from = (pos - self.start) as usize;
        Ok(&self.buf[from..(want_end - self.start) as usize])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake(extents: &[(u64, u32)]) -> Compressed {
        Compressed { extents: extents.iter().map(|&(start, len)| Extent { start, len, compressed: true }).collect(), blocks: Vec::new() }
    }

    #[test]
    fn index_points_back_to_heads_and_ahead_to_the_next() {
        // Extents [0, 10000), [10000, 20000), [20000, 20500).
        let c = fake(&[(0, 10000), (10000, 10000), (20000, 500)]);
        let idx = c.lclusters(20500, 100);
        assert_eq!(idx.len(), 6);
        assert_eq!(idx[0], Lcluster::Head { compressed: true, clusterofs: 0, blkaddr: 100 });
        assert_eq!(idx[1], Lcluster::NonHead { back: 1, ahead: 1 });
        assert_eq!(idx[2], Lcluster::Head { compressed: true, clusterofs: 10000 - 8192, blkaddr: 101 });
        assert_eq!(idx[3], Lcluster::NonHead { back: 1, ahead: 1 });
        assert_eq!(idx[4], Lcluster::Head { compressed: true, clusterofs: 20000 - 16384, blkaddr: 102 });
        assert_eq!(idx[5], Lcluster::NonHead { back: 1, ahead: 1 }, "the last points past the end");
    }
}
