//! qcow2 output: a [`Sink`] adapter that turns the raw disk stream into a
//! qcow2 version 3 image (QEMU's docs/interop/qcow2.txt).
//!
//! Hand-written: the Rust qcow2 crates that write (`qcow2-rs`, `imago`) are
//! asynchronous random-access block drivers built around their own I/O
//! runtimes, and the others only read. What a builder needs is a streaming
//! encoder over one sequential pass, which is small: a header, one L1 table,
//! L2 tables, a refcount table and refcount blocks.
//!
//! Layout of the file we write, always in this order so that the same raw
//! stream gives the same bytes:
//!
//! ```text
//! cluster 0        header (written last, by seeking back)
//! clusters 1..     data: guest clusters in increasing guest order, each
//!                  either a standard 64 KiB cluster or deflate-compressed
//!                  bytes packed back to back (byte granular, as QEMU packs
//!                  them); a standard cluster that comes while compressed
//!                  data half fills a host cluster is held back (up to 16)
//!                  until the compressed bytes reach a boundary or would
//!                  cross one, then the gap to the boundary is zeros
//! then             the L2 tables (only those that map something), in L1 order
//! then             the L1 table
//! then             the refcount table, then the refcount blocks
//! ```
//!
//! An all-zero guest cluster is left unallocated (it reads as zeros: there is
//! no backing file), so a sparse 5 GiB disk costs only its data.
//!
//! Compression follows QEMU's zlib compression type: raw deflate with a
//! 4 KiB window (QEMU inflates with `windowBits = -12`, which rejects matches
//! further back than 4 KiB, so a default 32 KiB window would not do), and a
//! cluster is stored uncompressed when compressing it saves less than one
//! 512-byte sector (QEMU: when the deflated data would not be smaller than a
//! cluster). Clusters are compressed independently, in batches, on up to
//! `threads` threads; the output does not depend on the thread count.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::mpsc;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::Serialize;

use super::{Sink, ZEROS};

pub const CLUSTER_BITS: u32 = 16;
pub const CLUSTER: u64 = 1 << CLUSTER_BITS;
const CLUSTER_USIZE: usize = CLUSTER as usize;

/// One compression job's result: the cluster, its compressed bytes, and
/// whether they fit in less than the cluster.
type Compressed = (Vec<u8>, Vec<u8>, bool);
/// Entries per L2 table (64-bit entries, no extended L2).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// refcount_order 4: 16-bit refcounts.
const REFCOUNT_ORDER: u32 = 4;
/// Entries per refcount block.
const RB_ENTRIES: u64 = CLUSTER * 8 / (1 << REFCOUNT_ORDER);
/// Version 3 header through `compression_type` (byte 104), padded to 8.
const HEADER_LENGTH: u32 = 112;
const MAGIC: &[u8; 4] = b"QFI\xfb";
/// L1/L2 entry bit 63: the cluster's refcount is exactly one.
const COPIED: u64 = 1 << 63;
/// L2 entry bit 62: a compressed cluster.
const COMPRESSED: u64 = 1 << 62;
/// Compressed cluster descriptor: bits 0..x-1 host offset, x..61 the number
/// of additional 512-byte sectors, x = 62 - (cluster_bits - 8).
const CSIZE_SHIFT: u32 = 62 - (CLUSTER_BITS - 8);
/// Bits 9..55 of a standard descriptor or an L1 entry: the host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Clusters compressed per batch (4 MiB of guest data).
const BATCH: usize = 64;
/// Standard clusters held back at most while compressed data fills a host
/// cluster (1 MiB).
const HELD: usize = 16;
/// The deflate level. QEMU uses zlib's default (6); on the Debian base
/// image's clusters (4 KiB window, zlib-rs 0.6) level 4 took 71% of level
/// 6's time for 0.6% more bytes (6: 2.75 s, 54.65 MB; 5: 2.31 s, 54.67 MB;
/// 4: 1.96 s, 54.98 MB; 3: 1.85 s, 55.28 MB, one thread). Level 1 must not
/// be used: zlib-rs 0.6.8 panicked compressing these clusters at level 1
/// with a 4 KiB window.
const LEVEL: u32 = 4;

/// How to write the qcow2 file.
#[derive(Clone, Copy, Debug)]
pub struct Qcow2Options {
    /// Deflate-compress the clusters that shrink (`qemu-img convert -c`).
    pub compress: bool,
    /// Threads compressing (1 = the calling thread only).
    pub threads: usize,
}

/// What the qcow2 file holds, for the report.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Qcow2Summary {
    pub cluster_size: u64,
    /// The guest disk's size.
    pub virtual_size: u64,
    /// Guest clusters with data (standard or compressed).
    pub allocated_clusters: u64,
    /// Of those, stored compressed.
    pub compressed_clusters: u64,
    /// Guest clusters left unallocated because they are all zeros.
    pub zero_clusters: u64,
    /// Header, L1, L2 and refcount clusters.
    pub metadata_clusters: u64,
    /// The length of the qcow2 file.
    pub file_bytes: u64,
}

/// The encoders, pure functions so that the unit tests pin them.
pub mod encode {
    use super::*;

    /// The version 3 header (HEADER_LENGTH bytes; the rest of cluster 0 is
    /// zero, which also ends the (empty) header extension area).
    pub fn header(virtual_size: u64, l1_size: u32, l1_offset: u64, refcount_table_offset: u64, refcount_table_clusters: u32) -> [u8; HEADER_LENGTH as usize] {
        let mut h = [0u8; HEADER_LENGTH as usize];
        h[0..4].copy_from_slice(MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        // 8..16 backing_file_offset = 0, 16..20 backing_file_size = 0
        h[20..24].copy_from_slice(&CLUSTER_BITS.to_be_bytes());
        h[24..32].copy_from_slice(&virtual_size.to_be_bytes());
        // 32..36 crypt_method = 0
        h[36..40].copy_from_slice(&l1_size.to_be_bytes());
        h[40..48].copy_from_slice(&l1_offset.to_be_bytes());
        h[48..56].copy_from_slice(&refcount_table_offset.to_be_bytes());
        h[56..60].copy_from_slice(&refcount_table_clusters.to_be_bytes());
        // 60..64 nb_snapshots = 0, 64..72 snapshots_offset = 0
        // 72..80 incompatible, 80..88 compatible, 88..96 autoclear features = 0
        h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h[100..104].copy_from_slice(&HEADER_LENGTH.to_be_bytes());
        // 104 compression_type = 0 (zlib), 105..112 padding
        h
    }

    /// The L2 entry of a compressed cluster whose `len` deflated bytes start
    /// at host byte `offset`.
    pub fn compressed_entry(offset: u64, len: u64) -> u64 {
        debug_assert!(len > 0 && offset < 1 << CSIZE_SHIFT);
        let extra_sectors = ((offset + len - 1) >> 9) - (offset >> 9);
        COMPRESSED | (extra_sectors << CSIZE_SHIFT) | offset
    }

    /// The L2 entry of a standard cluster at host `offset` (refcount 1).
    pub fn standard_entry(offset: u64) -> u64 {
        debug_assert_eq!(offset % CLUSTER, 0);
        COPIED | offset
    }

    /// Number of L1 entries for a disk of `virtual_size` bytes.
    pub fn l1_size(virtual_size: u64) -> u64 {
        virtual_size.div_ceil(CLUSTER).div_ceil(L2_ENTRIES)
    }

    /// Given `n` host clusters before the refcount structures, the number of
    /// refcount table clusters and refcount blocks so that the blocks cover
    /// every cluster, their own and the table's included.
    pub fn refcount_sizes(n: u64) -> (u64, u64) {
        let (mut table, mut blocks) = (1u64, 1u64);
        loop {
            let total = n + table + blocks;
            let b = total.div_ceil(RB_ENTRIES);
            let t = (b * 8).div_ceil(CLUSTER);
            if (t, b) == (table, blocks) {
                return (table, blocks);
            }
            table = t.max(1);
            blocks = b.max(1);
        }
    }
}

/// Whether every byte of `b` is zero (folded in chunks so that it vectorises).
fn is_zero(b: &[u8]) -> bool {
    b.chunks(512).all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

fn other(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Raw deflate with a 4 KiB window into `out`; false when the result would
/// not save at least one sector (the cluster is then stored as is).
fn deflate_cluster(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> io::Result<bool> {
    let limit = CLUSTER_USIZE - 512;
    c.reset();
    out.clear();
    out.reserve_exact(limit);
    // compress_vec writes into the spare capacity only: a stream that does
    // not end within it did not pay.
    let status = c.compress_vec(input, out, FlushCompress::Finish).map_err(|e| io::Error::other(format!("deflate: {e}")))?;
    Ok(status == Status::StreamEnd && out.len() <= limit)
}

/// The qcow2 writer. Feed it the raw disk in order through [`Sink`], then
/// call [`Qcow2Writer::finish`].
pub struct Qcow2Writer<W: Write + Seek> {
    out: W,
    opts: Qcow2Options,
    virtual_size: u64,
    /// Guest bytes accepted so far.
    pos: u64,
    /// The guest cluster being filled (`pos % CLUSTER` bytes of it).
    buf: Vec<u8>,
    /// Next host byte; starts after cluster 0.
    host: u64,
    /// (guest cluster, L2 entry), in increasing guest cluster order.
    map: Vec<(u64, u64)>,
    /// Refcount per host cluster of the data area (index = host cluster).
    refs: Vec<u16>,
    /// Clusters waiting to be compressed.
    pending: Vec<(u64, Vec<u8>)>,
    /// The guest clusters of the batch being compressed, in order.
    in_flight: Vec<u64>,
    /// Standard clusters waiting for the compressed data to reach a cluster
    /// boundary.
    held: Vec<(u64, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
    spare_out: Vec<Vec<u8>>,
    pool: Option<Pool>,
    summary: Qcow2Summary,
}

/// A compression job (index in its batch, the cluster, an output buffer)
/// and its answer (whether compression paid).
type Job = (usize, Vec<u8>, Vec<u8>);
type Done = (usize, Vec<u8>, Vec<u8>, io::Result<bool>);

/// Threads deflating clusters, each with its own compressor. They end when
/// the writer (and so their job channels) is dropped.
struct Pool {
    jobs: Vec<mpsc::Sender<Job>>,
    results: mpsc::Receiver<Done>,
}

impl Pool {
    fn new(threads: usize) -> io::Result<Pool> {
        let (done_tx, results) = mpsc::channel::<Done>();
        let mut jobs = Vec::new();
        for _ in 0..threads {
            let (tx, rx) = mpsc::channel::<Job>();
            let done_tx = done_tx.clone();
            std::thread::Builder::new().name("osbuilder-deflate".into()).spawn(move || {
                let mut c = Compress::new_with_window_bits(Compression::new(LEVEL), false, 12);
                for (i, input, mut out) in rx {
                    let fit = deflate_cluster(&mut c, &input, &mut out);
                    if done_tx.send((i, input, out, fit)).is_err() {
                        break;
                    }
                }
            })?;
            jobs.push(tx);
        }
        Ok(Pool { jobs, results })
    }
}

impl<W: Write + Seek> Qcow2Writer<W> {
    /// A writer for a disk of exactly `virtual_size` bytes into `out`
    /// (positioned anywhere: the file is written from its start).
    pub fn new(mut out: W, virtual_size: u64, opts: Qcow2Options) -> io::Result<Self> {
        if virtual_size == 0 || !virtual_size.is_multiple_of(512) {
            return Err(other(format!("a qcow2 disk must be a non-zero multiple of 512 bytes, not {virtual_size}")));
        }
        if encode::l1_size(virtual_size) * 8 > 32 << 20 {
            return Err(other(format!("{virtual_size} bytes is beyond QEMU's qcow2 limit for 64 KiB clusters")));
        }
        out.seek(SeekFrom::Start(CLUSTER))?;
        let threads = opts.threads.max(1);
        Ok(Qcow2Writer {
            out,
            opts: Qcow2Options { threads, ..opts },
            virtual_size,
            pos: 0,
            buf: Vec::with_capacity(CLUSTER_USIZE),
            host: CLUSTER,
            map: Vec::new(),
            refs: vec![1],
            pending: Vec::new(),
            in_flight: Vec::new(),
            held: Vec::new(),
            spare: Vec::new(),
            spare_out: Vec::new(),
            pool: if opts.compress { Some(Pool::new(threads)?) } else { None },
            summary: Qcow2Summary { cluster_size: CLUSTER, virtual_size, ..Default::default() },
        })
    }

    fn pad_to_cluster(&mut self) -> io::Result<()> {
        let gap = self.host.next_multiple_of(CLUSTER) - self.host;
        self.out.write_all(&ZEROS[..gap as usize])?;
        self.host += gap;
        Ok(())
    }

    fn add_ref(&mut self, cluster: u64) -> io::Result<()> {
        let i = cluster as usize;
        if self.refs.len() <= i {
            self.refs.resize(i + 1, 0);
        }
        self.refs[i] = self.refs[i].checked_add(1).ok_or_else(|| io::Error::other("qcow2 refcount overflow"))?;
        Ok(())
    }

    /// A standard cluster. In the middle of compressed data it is held back
    /// until the compressed bytes reach a cluster boundary (or would cross
    /// one), so that the rest of that host cluster is not wasted.
    fn put_standard(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        if !self.host.is_multiple_of(CLUSTER) {
            let mut copy = self.spare.pop().unwrap_or_default();
            copy.clear();
            copy.extend_from_slice(data);
            self.held.push((guest, copy));
            if self.held.len() == HELD {
                self.release_held()?;
            }
            return Ok(());
        }
        self.write_standard(guest, data)
    }

    fn write_standard(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(self.host % CLUSTER, 0);
        let off = self.host;
        self.out.write_all(data)?;
        self.host += CLUSTER;
        self.add_ref(off / CLUSTER)?;
        self.map.push((guest, encode::standard_entry(off)));
        self.summary.allocated_clusters += 1;
        Ok(())
    }

    /// Pads to the next cluster boundary and writes the held standard clusters.
    fn release_held(&mut self) -> io::Result<()> {
        self.pad_to_cluster()?;
        for (guest, data) in std::mem::take(&mut self.held) {
            self.write_standard(guest, &data)?;
            self.spare.push(data);
        }
        Ok(())
    }

    fn put_compressed(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        let len = data.len() as u64;
        if !self.held.is_empty() && self.host % CLUSTER + len > CLUSTER {
            self.release_held()?;
        }
        let off = self.host;
        if off + len > 1 << CSIZE_SHIFT {
            return Err(io::Error::other("compressed data beyond the qcow2 offset limit"));
        }
        self.out.write_all(data)?;
        self.host += len;
        for c in off / CLUSTER..=(off + len - 1) / CLUSTER {
            self.add_ref(c)?;
        }
        self.map.push((guest, encode::compressed_entry(off, len)));
        self.summary.allocated_clusters += 1;
        self.summary.compressed_clusters += 1;
        if !self.held.is_empty() && self.host.is_multiple_of(CLUSTER) {
            self.release_held()?;
        }
        Ok(())
    }

    /// One full guest cluster.
    fn emit(&mut self, guest: u64, data: &[u8]) -> io::Result<()> {
        debug_assert_eq!(data.len(), CLUSTER_USIZE);
        if is_zero(data) {
            self.summary.zero_clusters += 1;
            return Ok(());
        }
        if !self.opts.compress {
            return self.put_standard(guest, data);
        }
        let mut copy = self.spare.pop().unwrap_or_default();
        copy.clear();
        copy.extend_from_slice(data);
        self.pending.push((guest, copy));
        if self.pending.len() == BATCH {
            self.dispatch()?;
        }
        Ok(())
    }

    /// Hands the pending clusters to the compressing threads, after writing
    /// the results of the batch before (so that the next batch fills while
    /// this one compresses).
    fn dispatch(&mut self) -> io::Result<()> {
        self.collect()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let pool = self.pool.as_ref().expect("a compressing writer has a pool");
        for (i, (guest, input)) in std::mem::take(&mut self.pending).into_iter().enumerate() {
            let out = self.spare_out.pop().unwrap_or_default();
            pool.jobs[i % pool.jobs.len()].send((i, input, out)).map_err(|_| io::Error::other("a compression thread stopped"))?;
            self.in_flight.push(guest);
        }
        Ok(())
    }

    /// Waits for the batch in flight and writes it in guest order.
    fn collect(&mut self) -> io::Result<()> {
        if self.in_flight.is_empty() {
            return Ok(());
        }
        let n = self.in_flight.len();
        let mut done: Vec<Option<Compressed>> = (0..n).map(|_| None).collect();
        let pool = self.pool.as_ref().expect("a compressing writer has a pool");
        for _ in 0..n {
            let (i, input, out, fit) = pool.results.recv().map_err(|_| io::Error::other("a compression thread stopped"))?;
            done[i] = Some((input, out, fit?));
        }
        let guests = std::mem::take(&mut self.in_flight);
        for (guest, d) in guests.into_iter().zip(done) {
            let (input, out, fit) = d.expect("every job answered once");
            if fit {
                self.put_compressed(guest, &out)?;
            } else {
                self.put_standard(guest, &input)?;
            }
            self.spare.push(input);
            self.spare_out.push(out);
        }
        Ok(())
    }

    fn check_room(&self, len: u64) -> io::Result<()> {
        if self.pos + len > self.virtual_size {
            return Err(other(format!("write past the end of the {}-byte qcow2 disk", self.virtual_size)));
        }
        Ok(())
    }

    /// Writes the metadata and the header; returns the output and the summary.
    pub fn finish(mut self) -> io::Result<(W, Qcow2Summary)> {
        let rest = self.virtual_size - self.pos;
        self.zeros(rest)?;
        if !self.buf.is_empty() {
            // The last, partial cluster: the bytes past the disk read as zeros.
            let guest = self.pos / CLUSTER;
            let mut last = std::mem::take(&mut self.buf);
            last.resize(CLUSTER_USIZE, 0);
            self.emit(guest, &last)?;
        }
        if self.opts.compress {
            self.dispatch()?;
            self.collect()?;
            self.release_held()?;
        }
        self.pad_to_cluster()?;
        // Held clusters were placed after later compressed ones: the tables
        // are built in guest order.
        self.map.sort_unstable_by_key(|&(guest, _)| guest);
        let data_clusters = self.host / CLUSTER;
        self.refs.resize(data_clusters as usize, 0);

        // L2 tables, one per L1 entry that maps something.
        let l1_size = encode::l1_size(self.virtual_size);
        let mut l1 = vec![0u64; l1_size as usize];
        let mut table = vec![0u8; CLUSTER_USIZE];
        let mut i = 0;
        while i < self.map.len() {
            let l1_index = self.map[i].0 / L2_ENTRIES;
            table.fill(0);
            while i < self.map.len() && self.map[i].0 / L2_ENTRIES == l1_index {
                let (guest, entry) = self.map[i];
                let at = (guest % L2_ENTRIES) as usize * 8;
                table[at..at + 8].copy_from_slice(&entry.to_be_bytes());
                i += 1;
            }
            l1[l1_index as usize] = COPIED | self.host;
            self.out.write_all(&table)?;
            self.host += CLUSTER;
        }
        // The L1 table, zero-padded to whole clusters.
        let l1_offset = self.host;
        let l1_bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.out.write_all(&l1_bytes)?;
        self.host += l1_bytes.len() as u64;
        self.pad_to_cluster()?;

        // The refcount table, then the blocks.
        let n = self.host / CLUSTER;
        let (rt_clusters, rb_count) = encode::refcount_sizes(n);
        let rt_offset = self.host;
        let rb_offset = rt_offset + rt_clusters * CLUSTER;
        let total = n + rt_clusters + rb_count;
        let mut rt = vec![0u8; (rt_clusters * CLUSTER) as usize];
        for b in 0..rb_count {
            rt[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&(rb_offset + b * CLUSTER).to_be_bytes());
        }
        self.out.write_all(&rt)?;
        let refcount = |c: u64| -> u16 {
            if c < data_clusters {
                self.refs[c as usize]
            } else if c < total {
                1
            } else {
                0
            }
        };
        for b in 0..rb_count {
            table.fill(0);
            for k in 0..RB_ENTRIES {
                let r = refcount(b * RB_ENTRIES + k);
                table[k as usize * 2..k as usize * 2 + 2].copy_from_slice(&r.to_be_bytes());
            }
            self.out.write_all(&table)?;
        }
        self.host = total * CLUSTER;
        debug_assert!(self.refs[1..].iter().all(|&r| r > 0), "a data cluster without a reference");

        let header = encode::header(self.virtual_size, l1_size as u32, l1_offset, rt_offset, rt_clusters as u32);
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header)?;
        self.out.flush()?;
        self.summary.metadata_clusters = total - data_clusters + 1;
        self.summary.file_bytes = self.host;
        Ok((self.out, self.summary))
    }
}

impl<W: Write + Seek> Sink for Qcow2Writer<W> {
    fn write_all(&mut self, mut buf: &[u8]) -> io::Result<()> {
        self.check_room(buf.len() as u64)?;
        while !buf.is_empty() {
            if self.buf.is_empty() && buf.len() >= CLUSTER_USIZE {
                // Whole clusters straight from the caller's buffer.
                let guest = self.pos / CLUSTER;
                self.emit(guest, &buf[..CLUSTER_USIZE])?;
                self.pos += CLUSTER;
                buf = &buf[CLUSTER_USIZE..];
                continue;
            }
            let n = (CLUSTER_USIZE - self.buf.len()).min(buf.len());
            self.buf.extend_from_slice(&buf[..n]);
            self.pos += n as u64;
            buf = &buf[n..];
            if self.buf.len() == CLUSTER_USIZE {
                let guest = self.pos / CLUSTER - 1;
                let full = std::mem::take(&mut self.buf);
                self.emit(guest, &full)?;
                self.buf = full;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn zeros(&mut self, mut len: u64) -> io::Result<()> {
        self.check_room(len)?;
        if !self.buf.is_empty() {
            let n = (CLUSTER - self.buf.len() as u64).min(len);
            self.write_all(&ZEROS[..n as usize])?;
            len -= n;
        }
        // Whole zero clusters: unallocated, nothing written.
        let whole = len / CLUSTER;
        self.summary.zero_clusters += whole;
        self.pos += whole * CLUSTER;
        let rest = len % CLUSTER;
        if rest > 0 {
            self.buf.resize(rest as usize, 0);
            self.pos += rest;
        }
        Ok(())
    }

    fn position(&self) -> u64 {
        self.pos
    }
}

/// The header fields a reader needs.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
    pub backing_file_offset: u64,
    pub incompatible_features: u64,
    pub crypt_method: u32,
}

/// Whether `head` (the first bytes of a file) starts with the qcow2 magic.
pub fn is_qcow2(head: &[u8]) -> bool {
    head.len() >= 4 && &head[..4] == MAGIC
}

/// Parses a qcow2 header.
pub fn parse_header(h: &[u8]) -> io::Result<Header> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("not a qcow2 image we can read: {m}"));
    if h.len() < 72 || !is_qcow2(h) {
        return Err(bad("no qcow2 header"));
    }
    let u32_at = |o: usize| u32::from_be_bytes(h[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_be_bytes(h[o..o + 8].try_into().unwrap());
    let version = u32_at(4);
    if version != 2 && version != 3 {
        return Err(bad(&format!("version {version}")));
    }
    let cluster_bits = u32_at(20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(bad(&format!("cluster_bits {cluster_bits}")));
    }
    let incompatible_features = if version >= 3 && h.len() >= 80 { u64_at(72) } else { 0 };
    Ok(Header {
        version,
        cluster_bits,
        size: u64_at(24),
        crypt_method: u32_at(32),
        l1_size: u32_at(36),
        l1_offset: u64_at(40),
        backing_file_offset: u64_at(8),
        incompatible_features,
    })
}

/// A qcow2 image that names no other file: no backing file, no external
/// data file, no encryption. Booting a disk we sniffed as qcow2 is only safe
/// with these refused (a guest that wrote a qcow2 header into a raw disk
/// must not make QEMU open host files).
pub fn check_self_contained(h: &Header) -> io::Result<()> {
    if h.backing_file_offset != 0 {
        return Err(other("the qcow2 image has a backing file; only self-contained qcow2 images are supported".into()));
    }
    if h.incompatible_features & !1 != 0 {
        return Err(other(format!(
            "the qcow2 image uses incompatible features {:#x} (external data file, extended L2 or compression type); not supported",
            h.incompatible_features
        )));
    }
    if h.crypt_method != 0 {
        return Err(other("the qcow2 image is encrypted; not supported".into()));
    }
    Ok(())
}

/// Reads `buf.len()` guest bytes at guest offset `offset` through the L1
/// and L2 tables (standard, zero and compressed clusters; no backing file).
/// For `osbuilder vm boot` to recognise a qcow2 disk's layout, and tests.
pub fn read_guest<F: Read + Seek>(file: &mut F, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    let mut head = [0u8; 112];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut head[..72])?;
    let _ = file.read(&mut head[72..])?;
    let h = parse_header(&head)?;
    check_self_contained(&h)?;
    let cs = 1u64 << h.cluster_bits;
    let l2_entries = cs / 8;
    let x = 62 - (h.cluster_bits - 8);
    let mut done = 0usize;
    let mut cluster = vec![0u8; cs as usize];
    while done < buf.len() {
        let g = offset + done as u64;
        let in_cluster = (g % cs) as usize;
        let n = (cs as usize - in_cluster).min(buf.len() - done);
        let out = &mut buf[done..done + n];
        let guest_cluster = g / cs;
        let l1_index = guest_cluster / l2_entries;
        let entry = if g >= h.size || l1_index >= h.l1_size as u64 {
            0
        } else {
            let mut e = [0u8; 8];
            file.seek(SeekFrom::Start(h.l1_offset + l1_index * 8))?;
            file.read_exact(&mut e)?;
            let l2 = u64::from_be_bytes(e) & OFFSET_MASK;
            if l2 == 0 {
                0
            } else {
                file.seek(SeekFrom::Start(l2 + (guest_cluster % l2_entries) * 8))?;
                file.read_exact(&mut e)?;
                u64::from_be_bytes(e)
            }
        };
        if entry & COMPRESSED != 0 {
            let coff = entry & ((1u64 << x) - 1);
            let sectors = ((entry & ((1u64 << 62) - 1)) >> x) + 1;
            let csize = sectors * 512 - (coff & 511);
            let mut comp = Vec::new();
            file.seek(SeekFrom::Start(coff))?;
            file.by_ref().take(csize).read_to_end(&mut comp)?;
            let mut d = Decompress::new_with_window_bits(false, 15);
            let mut plain = Vec::with_capacity(cs as usize);
            d.decompress_vec(&comp, &mut plain, FlushDecompress::Finish).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("inflate: {e}")))?;
            if plain.len() != cs as usize {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a compressed cluster does not inflate to a whole cluster"));
            }
            out.copy_from_slice(&plain[in_cluster..in_cluster + n]);
        } else if entry & OFFSET_MASK == 0 || entry & 1 != 0 {
            out.fill(0);
        } else {
            file.seek(SeekFrom::Start((entry & OFFSET_MASK) + in_cluster as u64))?;
            file.read_exact(&mut cluster[..n])?;
            out.copy_from_slice(&cluster[..n]);
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn header_fields() {
        let h = encode::header(5 << 30, 10, 0x30000, 0x40000, 1);
        assert_eq!(&h[0..4], b"QFI\xfb");
        assert_eq!(u32::from_be_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_be_bytes(h[20..24].try_into().unwrap()), 16);
        assert_eq!(u64::from_be_bytes(h[24..32].try_into().unwrap()), 5 << 30);
        assert_eq!(u32::from_be_bytes(h[36..40].try_into().unwrap()), 10);
        assert_eq!(u64::from_be_bytes(h[40..48].try_into().unwrap()), 0x30000);
        assert_eq!(u64::from_be_bytes(h[48..56].try_into().unwrap()), 0x40000);
        assert_eq!(u32::from_be_bytes(h[56..60].try_into().unwrap()), 1);
        assert!(h[72..96].iter().all(|&b| b == 0), "no feature bits");
        assert_eq!(u32::from_be_bytes(h[96..100].try_into().unwrap()), 4);
        assert_eq!(u32::from_be_bytes(h[100..104].try_into().unwrap()), 112);
        assert_eq!(h[104], 0, "zlib");
        let parsed = parse_header(&h).unwrap();
        assert_eq!((parsed.version, parsed.cluster_bits, parsed.size), (3, 16, 5 << 30));
        check_self_contained(&parsed).unwrap();
    }

    #[test]
    fn compressed_descriptor() {
        assert_eq!(CSIZE_SHIFT, 54);
        // 100 bytes inside one sector: no additional sector.
        assert_eq!(encode::compressed_entry(0x10000 + 10, 100), COMPRESSED | (0x10000 + 10));
        // Ending exactly at a sector boundary: still one sector.
        assert_eq!(encode::compressed_entry(0x10000, 512), COMPRESSED | 0x10000);
        // One byte over: one additional sector.
        assert_eq!(encode::compressed_entry(0x10000, 513), COMPRESSED | (1 << 54) | 0x10000);
        // Starting at 500 with 20 bytes crosses into the next sector.
        assert_eq!(encode::compressed_entry(0x10000 + 500, 20), COMPRESSED | (1 << 54) | (0x10000 + 500));
        assert_eq!(encode::standard_entry(0x20000), (1 << 63) | 0x20000);
    }

    #[test]
    fn table_sizes() {
        assert_eq!(encode::l1_size(1), 1);
        assert_eq!(encode::l1_size(512 << 20), 1);
        assert_eq!(encode::l1_size((512 << 20) + 512), 2);
        assert_eq!(encode::l1_size(5 << 30), 10);
        assert_eq!(encode::refcount_sizes(10), (1, 1));
        // 32768 clusters per block: 32766 + table + block fit, one more does not.
        assert_eq!(encode::refcount_sizes(32766), (1, 1));
        assert_eq!(encode::refcount_sizes(32767), (1, 2));
        // 8192 blocks per table cluster.
        let (t, b) = encode::refcount_sizes(8192 * 32768);
        assert_eq!((t, b), (2, 8193));
        assert!(b * RB_ENTRIES >= 8192 * 32768 + t + b);
    }

    /// A guest disk with every kind of cluster, written with and without
    /// compression, read back through the tables.
    fn sample(size: usize) -> Vec<u8> {
        let mut raw = vec![0u8; size];
        let mut x = 0x1234_5678u32;
        for (i, b) in raw.iter_mut().enumerate() {
            let c = i / CLUSTER_USIZE;
            *b = match c % 4 {
                0 => 0,
                1 => (i % 251) as u8, // compressible
                2 => {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8 // incompressible
                }
                _ => {
                    if i % 7000 == 0 {
                        1
                    } else {
                        0
                    }
                }
            };
        }
        raw
    }

    fn write(raw: &[u8], compress: bool, threads: usize, chunk: usize) -> (Vec<u8>, Qcow2Summary) {
        let mut w = Qcow2Writer::new(Cursor::new(Vec::new()), raw.len() as u64, Qcow2Options { compress, threads }).unwrap();
        for part in raw.chunks(chunk) {
            if is_zero(part) {
                w.zeros(part.len() as u64).unwrap();
            } else {
                w.write_all(part).unwrap();
            }
        }
        let (c, s) = w.finish().unwrap();
        (c.into_inner(), s)
    }

    #[test]
    fn round_trip_and_determinism() {
        let raw = sample(37 * CLUSTER_USIZE + 4096);
        for compress in [false, true] {
            let (a, sa) = write(&raw, compress, 1, 10_000);
            let (b, sb) = write(&raw, compress, 3, CLUSTER_USIZE);
            assert_eq!(a, b, "same bytes whatever the chunking and thread count");
            assert_eq!(sa, sb);
            assert_eq!(sa.file_bytes, a.len() as u64);
            assert_eq!(a.len() as u64 % CLUSTER, 0);
            let mut back = vec![0u8; raw.len()];
            read_guest(&mut Cursor::new(&a), 0, &mut back).unwrap();
            assert!(back == raw, "read back differs (compress {compress})");
            assert_eq!(sa.zero_clusters + sa.allocated_clusters, 38);
            if compress {
                assert!(sa.compressed_clusters > 0 && sa.compressed_clusters < sa.allocated_clusters, "{sa:?}");
            } else {
                assert_eq!(sa.compressed_clusters, 0);
            }
        }
    }

    #[test]
    fn bounds() {
        assert!(Qcow2Writer::new(Cursor::new(Vec::new()), 1000, Qcow2Options { compress: false, threads: 1 }).is_err());
        let mut w = Qcow2Writer::new(Cursor::new(Vec::new()), 4096, Qcow2Options { compress: false, threads: 1 }).unwrap();
        assert!(w.write_all(&[1u8; 4097]).is_err());
        assert!(w.zeros(4097).is_err());
    }

    #[test]
    fn four_kib_window() {
        // A cluster whose only repeat is 8 KiB back: a 32 KiB window would
        // reference it, QEMU's -12 inflate would refuse the stream.
        let mut input = vec![0u8; CLUSTER_USIZE];
        let mut x = 7u32;
        for b in input[..8192].iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
        let (first, rest) = input.split_at_mut(8192);
        rest[..8192].copy_from_slice(first);
        let mut c = Compress::new_with_window_bits(Compression::new(LEVEL), false, 12);
        let mut out = Vec::new();
        assert!(deflate_cluster(&mut c, &input, &mut out).unwrap());
        let mut d = Decompress::new_with_window_bits(false, 12);
        let mut plain = Vec::with_capacity(CLUSTER_USIZE);
        d.decompress_vec(&out, &mut plain, FlushDecompress::Finish).expect("inflates with a 4 KiB window");
        assert!(plain == input);
    }
}
