//! Output compression: none, gzip or zstd, using all cores.
//!
//! Gzip is compressed in parallel the way pigz does it: the input is cut into
//! independent 128 KiB blocks, each block is deflated with the previous
//! 32 KiB of input as a preset dictionary and ends with a sync flush (an empty
//! stored block) so that the raw deflate streams can be concatenated, and the
//! per-block CRC-32 values are combined into a single gzip trailer. The result
//! is one ordinary gzip member, read by `gunzip` and by the kernel's
//! initramfs decompressor alike.
//!
//! This is hand-written on top of `flate2::Compress` with the zlib-rs backend
//! (`set_dictionary` is available because zlib-rs counts as a zlib backend)
//! rather than using `gzp`'s `ParCompress<Gzip>`, because no crate does
//! pigz-style compression with zlib-rs:
//!
//! - With the `deflate_rust` feature, `gzp` compresses every block without a
//!   dictionary: its dictionary code sits behind its `any_zlib` feature,
//!   which needs the C zlib (`libz-sys`) for Adler-32 and does not build
//!   against zlib-rs alone. On 200 MB of `/usr` (two cores) its output at
//!   level 6 was 1.3% larger than this module's (39.22% against 38.70% of
//!   the input), for about the same speed (64 to 69 MB/s for both, within
//!   the noise of the machine; the dictionary costs a little CPU). This
//!   module's output is as small as single-stream `flate2` output at the
//!   same level. (GNU `gzip -6`, on the C zlib, is 2.7% smaller still, but
//!   single-threaded at 13 MB/s; zlib-rs at level 9 matches its size.)
//! - `gzp` cuts a block whenever `Write::flush` is called, so its output
//!   depends on how the caller flushes. Here block boundaries depend only on
//!   the input bytes, and the output is identical whatever the thread count
//!   (with one thread, blocks are compressed inline with the same layout).
//! - `gzp` panics in `Drop` if the pipeline failed, and pulls in `flume`,
//!   `bytes`, `core_affinity` and `num_cpus`; this module needs only `std`
//!   and `flate2`.
//!
//! Zstd uses the `zstd` crate's multi-threaded mode. Its output does not
//! depend on the number of worker threads as long as there is at least one,
//! so one worker is used even when a single thread is requested.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

/// The input block size for parallel gzip, as in pigz.
const GZIP_BLOCK_LEN: usize = 128 * 1024;

/// The size of the deflate window, used as the preset dictionary of a block.
const GZIP_DICT_LEN: usize = 32 * 1024;

/// The compression format of an output file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compression {
    /// No compression.
    None,
    /// Gzip (RFC 1952), compressed in parallel.
    Gzip,
    /// Zstandard, compressed in parallel.
    Zstd,
}

impl Compression {
    /// Returns the level used when none is given.
    pub fn default_level(self) -> u32 {
        match self {
            Compression::None => 0,
            // zlib-rs at level 6 writes about 2.7% more than GNU gzip -6;
            // at 9 it matches gzip -9, which is what Kata's osbuilder uses.
            // Compressing in parallel keeps level 9 fast (`cargo xtask bench`).
            Compression::Gzip => 9,
            Compression::Zstd => 3,
        }
    }

    /// Returns the range of valid levels.
    ///
    /// Zstd stops at 19, like the `zstd` tool without `--ultra`: the higher
    /// levels use windows of up to 128 MiB, which the kernel's decompressor
    /// would have to allocate while unpacking the initramfs.
    pub fn levels(self) -> std::ops::RangeInclusive<u32> {
        match self {
            Compression::None => 0..=0,
            Compression::Gzip => 1..=9,
            Compression::Zstd => 1..=19,
        }
    }

    /// Returns the usual file name extension, with its dot, or an empty string.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// The error returned when parsing an unknown compression name.
#[derive(Debug, thiserror::Error)]
#[error("unknown compression {0:?}, expected one of \"none\", \"gzip\", \"zstd\"")]
pub struct ParseCompressionError(String);

impl FromStr for Compression {
    type Err = ParseCompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "zstd" => Ok(Compression::Zstd),
            _ => Err(ParseCompressionError(s.to_owned())),
        }
    }
}

/// How to compress an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressOptions {
    /// The format.
    pub kind: Compression,
    /// The level; `None` means the format's default (gzip 6, zstd 3).
    pub level: Option<u32>,
    /// The number of compression threads; 0 means one per available core.
    pub threads: usize,
}

impl CompressOptions {
    /// Returns options for `kind` with the default level on all cores.
    pub fn new(kind: Compression) -> Self {
        Self { kind, level: None, threads: 0 }
    }

    /// Returns the level to use, after applying the default.
    pub fn effective_level(&self) -> u32 {
        self.level.unwrap_or(self.kind.default_level())
    }

    /// Returns the number of threads to use, after resolving 0 to the number of cores.
    pub fn effective_threads(&self) -> usize {
        resolve_threads(self.threads)
    }
}

fn resolve_threads(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Errors from setting up compression.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The level is outside the range the format supports.
    #[error("invalid {kind} compression level {level}, expected {min} to {max}")]
    InvalidLevel {
        /// The format.
        kind: Compression,
        /// The level given.
        level: u32,
        /// The lowest valid level.
        min: u32,
        /// The highest valid level.
        max: u32,
    },
    /// The compressor could not be set up.
    #[error("failed to set up {kind} compression")]
    Setup {
        /// The format.
        kind: Compression,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// A compressing writer; see [`encoder`].
///
/// [`Encoder::finish`] must be called to complete the output; dropping the
/// encoder discards whatever has not been written yet.
pub enum Encoder<W: Write> {
    /// Writes the input through unchanged.
    None(W),
    /// Compresses to gzip.
    Gzip(ParGzEncoder<W>),
    /// Compresses to zstd.
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> fmt::Debug for Encoder<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoder::None(_) => "Encoder::None",
            Encoder::Gzip(_) => "Encoder::Gzip",
            Encoder::Zstd(_) => "Encoder::Zstd",
        })
    }
}

/// Returns a writer that compresses into `w` as `opts` says.
pub fn encoder<W: Write>(opts: &CompressOptions, w: W) -> Result<Encoder<W>, CompressError> {
    Encoder::new(opts, w)
}

impl<W: Write> Encoder<W> {
    /// Returns a writer that compresses into `w` as `opts` says.
    pub fn new(opts: &CompressOptions, w: W) -> Result<Self, CompressError> {
        let kind = opts.kind;
        let level = opts.effective_level();
        let levels = kind.levels();
        if !levels.contains(&level) {
            return Err(CompressError::InvalidLevel { kind, level, min: *levels.start(), max: *levels.end() });
        }
        let threads = opts.effective_threads();
        match kind {
            Compression::None => Ok(Encoder::None(w)),
            Compression::Gzip => Ok(Encoder::Gzip(ParGzEncoder::new(w, level, threads))),
            Compression::Zstd => {
                let setup = |source| CompressError::Setup { kind, source };
                // The level range was checked above, so the conversion cannot fail.
                let mut z = zstd::stream::write::Encoder::new(w, level as i32).map_err(setup)?;
                // Always use at least one worker: zstd's output with workers
                // differs from its single-threaded output, but not between
                // worker counts.
                let workers = u32::try_from(threads).unwrap_or(u32::MAX).max(1);
                z.multithread(workers).map_err(setup)?;
                z.include_checksum(true).map_err(setup)?;
                Ok(Encoder::Zstd(z))
            }
        }
    }

    /// Completes the compressed stream and returns the underlying writer, flushed.
    pub fn finish(self) -> io::Result<W> {
        let mut w = match self {
            Encoder::None(w) => w,
            Encoder::Gzip(gz) => gz.finish()?,
            Encoder::Zstd(z) => z.finish()?,
        };
        w.flush()?;
        Ok(w)
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(gz) => gz.write(buf),
            Encoder::Zstd(z) => z.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.write_all(buf),
            Encoder::Gzip(gz) => gz.write_all(buf),
            Encoder::Zstd(z) => z.write_all(buf),
        }
    }

    /// Flushes the underlying writer without changing the output.
    ///
    /// Gzip writes out the blocks already compressed; zstd keeps its
    /// buffered data, because a zstd flush ends the current block and would
    /// make the output depend on when the caller flushed.
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(gz) => gz.flush(),
            Encoder::Zstd(z) => z.get_mut().flush(),
        }
    }
}

/// One block of input for a gzip worker.
struct Job {
    input: Vec<u8>,
    /// The up to 32 KiB of input preceding the block.
    dict: Vec<u8>,
    /// A buffer to reuse for the output.
    output: Vec<u8>,
    last: bool,
    reply: mpsc::SyncSender<io::Result<Block>>,
}

/// One compressed block, with its input handed back for reuse.
struct Block {
    input: Vec<u8>,
    output: Vec<u8>,
    crc: flate2::Crc,
}

/// Deflates one block into `output` as a raw deflate stream that ends with a
/// sync flush, or with the final block if `last` is set.
///
/// A new compressor is made for every block: zlib-rs 0.6 (like zlib-ng before
/// its fix for issue 2100) lets stale window contents from before a reset
/// influence match selection, so reusing a reset compressor would make the
/// output depend on which thread compressed which block. A fresh compressor
/// costs about 400 KiB of zeroed memory, which is negligible next to
/// deflating 128 KiB.
fn deflate_block(level: u32, dict: &[u8], input: &[u8], last: bool, output: &mut Vec<u8>) -> io::Result<()> {
    use flate2::{FlushCompress, Status};

    let mut compress = flate2::Compress::new(flate2::Compression::new(level), false);
    if !dict.is_empty() {
        compress.set_dictionary(dict).map_err(io::Error::other)?;
    }
    let flush = if last { FlushCompress::Finish } else { FlushCompress::Sync };
    output.clear();
    // Enough for incompressible input in most cases; the loop grows it otherwise.
    output.reserve(input.len() + input.len() / 64 + 64);
    loop {
        if output.len() == output.capacity() {
            output.reserve(output.capacity() / 2 + 64);
        }
        let before = (compress.total_in(), compress.total_out());
        let consumed = compress.total_in() as usize;
        let status = compress.compress_vec(&input[consumed..], output, flush).map_err(io::Error::other)?;
        let consumed = compress.total_in() as usize;
        let has_room = output.len() < output.capacity();
        match status {
            Status::StreamEnd => return Ok(()),
            // A flush is complete once all input is consumed and deflate stopped
            // with output space left over.
            _ if !last && consumed == input.len() && has_room => return Ok(()),
            _ if has_room && before == (compress.total_in(), compress.total_out()) => {
                return Err(io::Error::other("deflate made no progress"));
            }
            _ => {}
        }
    }
}

/// Compresses one job; used by the workers and by the single-threaded path.
fn run_job(level: u32, job: &mut Job) -> io::Result<Block> {
    let mut output = std::mem::take(&mut job.output);
    deflate_block(level, &job.dict, &job.input, job.last, &mut output)?;
    let mut crc = flate2::Crc::new();
    crc.update(&job.input);
    Ok(Block { input: std::mem::take(&mut job.input), output, crc })
}

/// A pool of threads that compress gzip blocks.
struct Pool {
    jobs: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(threads: usize, level: u32) -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = Arc::clone(&rx);
                std::thread::spawn(move || {
                    loop {
                        // The lock is only held while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(mut job) = job else { return };
                        let result = run_job(level, &mut job);
                        // The encoder may have been dropped; then nobody wants the result.
                        let _ = job.reply.send(result);
                    }
                })
            })
            .collect();
        Self { jobs: Some(tx), workers }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Closing the channel makes the workers exit after their current job.
        self.jobs.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

/// A gzip encoder that compresses blocks in parallel, pigz-style.
///
/// The output is a single gzip member with a zero modification time and the
/// Unix OS byte. It depends only on the input and the level, not on the
/// number of threads or on how the input is split into `write` calls, and
/// `flush` does not change it. [`ParGzEncoder::finish`] must be called to
/// complete the stream.
pub struct ParGzEncoder<W: Write> {
    inner: W,
    level: u32,
    /// The block being filled.
    buf: Vec<u8>,
    /// The last up to 32 KiB of input before `buf`.
    dict: Vec<u8>,
    /// The workers, or `None` to compress on the calling thread.
    pool: Option<Pool>,
    /// Results of the blocks in flight, oldest first.
    pending: VecDeque<mpsc::Receiver<io::Result<Block>>>,
    max_pending: usize,
    free_inputs: Vec<Vec<u8>>,
    free_outputs: Vec<Vec<u8>>,
    crc: flate2::Crc,
    header_written: bool,
}

impl<W: Write> ParGzEncoder<W> {
    /// Creates an encoder at `level` (0 to 9) using `threads` threads (0 for
    /// one per core); with one thread, blocks are compressed on the calling
    /// thread.
    pub fn new(w: W, level: u32, threads: usize) -> Self {
        let level = level.min(9);
        let threads = resolve_threads(threads);
        let pool = (threads > 1).then(|| Pool::new(threads, level));
        Self {
            inner: w,
            level,
            buf: Vec::with_capacity(GZIP_BLOCK_LEN),
            dict: Vec::with_capacity(GZIP_DICT_LEN),
            pool,
            pending: VecDeque::new(),
            max_pending: 2 * threads,
            free_inputs: Vec::new(),
            free_outputs: Vec::new(),
            crc: flate2::Crc::new(),
            header_written: false,
        }
    }

    /// Returns a reference to the underlying writer.
    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Compresses the remaining input, writes the gzip trailer and returns
    /// the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.dispatch(true)?;
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        let mut trailer = [0u8; 8];
        trailer[..4].copy_from_slice(&self.crc.sum().to_le_bytes());
        trailer[4..].copy_from_slice(&self.crc.amount().to_le_bytes());
        self.inner.write_all(&trailer)?;
        self.inner.flush()?;
        // Stop the workers before handing out the writer.
        self.pool.take();
        Ok(self.inner)
    }

    fn header(&self) -> [u8; 10] {
        // The extra flags say "slowest" for level 9 and "fastest" for level 1, as gzip does.
        let xfl = match self.level {
            9 => 2,
            1 => 4,
            _ => 0,
        };
        // Magic, deflate, no flags, mtime 0, extra flags, OS 3 (Unix).
        [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, xfl, 3]
    }

    /// Sends the current block to be compressed.
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let fresh = self.free_inputs.pop().unwrap_or_else(|| Vec::with_capacity(GZIP_BLOCK_LEN));
        let input = std::mem::replace(&mut self.buf, fresh);
        // The next block's dictionary is the last 32 KiB of input so far.
        let dict = self.dict.clone();
        if input.len() >= GZIP_DICT_LEN {
            self.dict.clear();
            self.dict.extend_from_slice(&input[input.len() - GZIP_DICT_LEN..]);
        } else {
            self.dict.extend_from_slice(&input);
            let excess = self.dict.len().saturating_sub(GZIP_DICT_LEN);
            self.dict.drain(..excess);
        }
        let (reply, result) = mpsc::sync_channel(1);
        let mut job = Job { input, dict, output: self.free_outputs.pop().unwrap_or_default(), last, reply };
        if self.pool.is_none() {
            let block = run_job(self.level, &mut job)?;
            return self.write_block(block);
        }
        while self.pending.len() >= self.max_pending {
            self.write_oldest()?;
        }
        let jobs = self.pool.as_ref().and_then(|pool| pool.jobs.as_ref()).expect("the pool is running");
        jobs.send(job).map_err(|_| worker_gone())?;
        self.pending.push_back(result);
        Ok(())
    }

    /// Waits for the oldest block in flight and writes it out.
    fn write_oldest(&mut self) -> io::Result<()> {
        let result = self.pending.pop_front().expect("a block is in flight");
        let block = result.recv().map_err(|_| worker_gone())??;
        self.write_block(block)
    }

    fn write_block(&mut self, mut block: Block) -> io::Result<()> {
        if !self.header_written {
            self.inner.write_all(&self.header())?;
            self.header_written = true;
        }
        self.inner.write_all(&block.output)?;
        self.crc.combine(&block.crc);
        block.input.clear();
        self.free_inputs.push(block.input);
        self.free_outputs.push(block.output);
        Ok(())
    }
}

fn worker_gone() -> io::Error {
    io::Error::other("gzip compression thread exited unexpectedly")
}

impl<W: Write> Write for ParGzEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // A full block is only sent once more input arrives, so that
        // `finish` knows which block is the last one.
        if self.buf.len() == GZIP_BLOCK_LEN {
            self.dispatch(false)?;
        }
        let n = buf.len().min(GZIP_BLOCK_LEN - self.buf.len());
        self.buf.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    /// Writes out the blocks in flight and flushes the underlying writer.
    ///
    /// The partial block being filled is kept, so flushing does not change
    /// the output.
    fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.write_oldest()?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    /// Returns about 8 MiB of deterministic, semi-compressible data: text-like
    /// runs with repeats at varying distances, and some incompressible noise.
    fn sample_data() -> Vec<u8> {
        let words: Vec<&[u8]> = [
            "kernel", "initrd", "rootfs", "layer", "digest", "sha256", "manifest", "usr", "lib", "bin", "etc", "the", "of", "and", "cpio", "newc", "gzip",
            "zstd", "\n", " ", "/",
        ]
        .iter()
        .map(|w| w.as_bytes())
        .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut out = Vec::with_capacity(8 << 20);
        while out.len() < 8 << 20 {
            let r = next();
            match r % 32 {
                0 => {
                    // Random bytes.
                    for _ in 0..(r >> 8) % 64 {
                        out.push(next() as u8);
                    }
                }
                1 | 2 if out.len() > 70_000 => {
                    // A copy from up to 64 KiB back, across block boundaries.
                    let dist = 1 + ((r >> 8) % 65_536) as usize;
                    let len = 4 + ((r >> 32) % 200) as usize;
                    let start = out.len() - dist;
                    for i in 0..len {
                        out.push(out[start + i]);
                    }
                }
                _ => out.extend_from_slice(words[((r >> 8) % words.len() as u64) as usize]),
            }
        }
        out.truncate(8 << 20);
        out
    }

    fn compress(opts: &CompressOptions, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut enc = encoder(opts, Vec::new()).unwrap();
        for piece in data.chunks(chunk.max(1)) {
            enc.write_all(piece).unwrap();
        }
        enc.finish().unwrap()
    }

    fn run(cmd: &str, args: &[&str], stdin: &[u8]) -> std::process::Output {
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to run {cmd}: {e}"));
        let mut stdin_pipe = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        // Feed stdin from another thread so a full stdout pipe cannot deadlock.
        let feeder = std::thread::spawn(move || {
            let _ = stdin_pipe.write_all(&input);
        });
        let output = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(output.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        output
    }

    fn gzip_opts(level: Option<u32>, threads: usize) -> CompressOptions {
        CompressOptions { kind: Compression::Gzip, level, threads }
    }

    fn zstd_opts(level: Option<u32>, threads: usize) -> CompressOptions {
        CompressOptions { kind: Compression::Zstd, level, threads }
    }

    #[test]
    fn names_round_trip() {
        for kind in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(kind.to_string().parse::<Compression>().unwrap(), kind);
        }
        let err = "xz".parse::<Compression>().unwrap_err();
        assert_eq!(err.to_string(), "unknown compression \"xz\", expected one of \"none\", \"gzip\", \"zstd\"");
    }

    #[test]
    fn invalid_levels_are_rejected() {
        let err = encoder(&gzip_opts(Some(10), 1), Vec::new()).unwrap_err();
        assert_eq!(err.to_string(), "invalid gzip compression level 10, expected 1 to 9");
        assert!(encoder(&zstd_opts(Some(20), 1), Vec::new()).is_err());
        assert!(encoder(&zstd_opts(Some(0), 1), Vec::new()).is_err());
        let none = CompressOptions::new(Compression::None);
        assert!(encoder(&none, Vec::new()).is_ok());
    }

    #[test]
    fn none_passes_through() {
        let data = b"plain bytes".repeat(1000);
        let out = compress(&CompressOptions::new(Compression::None), &data, 777);
        assert_eq!(out, data);
    }

    #[test]
    fn gzip_round_trips_through_gzip() {
        let data = sample_data();
        let out = compress(&gzip_opts(None, 4), &data, 100_000);
        assert_eq!(&out[..4], [0x1f, 0x8b, 8, 0]);
        assert!(out.len() < data.len() / 2, "compressed to {} bytes", out.len());
        run("gzip", &["-t"], &out);
        assert!(run("gzip", &["-dc"], &out).stdout == data);
        // flate2's own decoder must see a single member with the whole input.
        let mut decoded = Vec::new();
        let mut dec = flate2::read::GzDecoder::new(&out[..]);
        io::Read::read_to_end(&mut dec, &mut decoded).unwrap();
        assert!(decoded == data);
    }

    #[test]
    fn gzip_output_does_not_depend_on_threads_or_writes() {
        let data = sample_data();
        let reference = compress(&gzip_opts(None, 1), &data, 1 << 20);
        for (threads, chunk) in [(1, 4096), (2, 65_536), (3, 1 << 20), (8, 1_000_003), (8, 1 << 20)] {
            let out = compress(&gzip_opts(None, threads), &data, chunk);
            assert!(out == reference, "{threads} threads, {chunk}-byte writes");
        }
        // Flushing in the middle must not change anything either.
        let mut enc = encoder(&gzip_opts(None, 2), Vec::new()).unwrap();
        for piece in data.chunks(300_000) {
            enc.write_all(piece).unwrap();
            enc.flush().unwrap();
        }
        assert!(enc.finish().unwrap() == reference);
    }

    #[test]
    fn gzip_levels_round_trip() {
        let data = &sample_data()[..1 << 20];
        let mut sizes = Vec::new();
        for level in [1, 9] {
            let out = compress(&gzip_opts(Some(level), 2), data, 1 << 16);
            assert_eq!(out[8], if level == 9 { 2 } else { 4 });
            assert!(run("gzip", &["-dc"], &out).stdout == data);
            sizes.push(out.len());
        }
        assert!(sizes[1] < sizes[0], "{sizes:?}");
    }

    #[test]
    fn gzip_handles_incompressible_data() {
        let mut state = 1u32;
        let data: Vec<u8> = (0..1_000_000)
            .map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (state >> 24) as u8
            })
            .collect();
        let out = compress(&gzip_opts(Some(9), 2), &data, 1 << 20);
        assert!(run("gzip", &["-dc"], &out).stdout == data);
    }

    #[test]
    fn gzip_block_boundaries() {
        // Sizes around the block and dictionary sizes.
        for len in [1, GZIP_DICT_LEN - 1, GZIP_BLOCK_LEN, GZIP_BLOCK_LEN + 1, 3 * GZIP_BLOCK_LEN] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect();
            let out = compress(&gzip_opts(None, 3), &data, 10_000);
            assert!(run("gzip", &["-dc"], &out).stdout == data, "length {len}");
        }
    }

    #[test]
    fn gzip_empty_input() {
        let one = compress(&gzip_opts(None, 1), b"", 1);
        let many = compress(&gzip_opts(None, 4), b"", 1);
        assert_eq!(one, many);
        run("gzip", &["-t"], &one);
        assert!(run("gzip", &["-dc"], &one).stdout.is_empty());
        // Header (XFL 2: maximum compression, the default level 9), an
        // empty final fixed block, CRC 0 and length 0.
        assert_eq!(one, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn zstd_round_trips_through_zstd() {
        let data = sample_data();
        let out = compress(&zstd_opts(None, 4), &data, 100_000);
        assert!(out.len() < data.len() / 2, "compressed to {} bytes", out.len());
        run("zstd", &["-t", "-q"], &out);
        assert!(run("zstd", &["-dc"], &out).stdout == data);
    }

    #[test]
    fn zstd_output_is_deterministic() {
        let data = sample_data();
        let reference = compress(&zstd_opts(None, 2), &data, 1 << 20);
        for (threads, chunk) in [(2, 1 << 20), (1, 4096), (3, 65_536), (8, 1_000_003)] {
            let out = compress(&zstd_opts(None, threads), &data, chunk);
            assert!(out == reference, "{threads} threads, {chunk}-byte writes");
        }
        // Flushing in the middle must not change anything either.
        let mut enc = encoder(&zstd_opts(None, 2), Vec::new()).unwrap();
        for piece in data.chunks(300_000) {
            enc.write_all(piece).unwrap();
            enc.flush().unwrap();
        }
        assert!(enc.finish().unwrap() == reference);
    }

    #[test]
    fn zstd_empty_input() {
        let out = compress(&zstd_opts(None, 2), b"", 1);
        assert_eq!(out, compress(&zstd_opts(None, 2), b"", 1));
        run("zstd", &["-t", "-q"], &out);
        assert!(run("zstd", &["-dc"], &out).stdout.is_empty());
    }
}
