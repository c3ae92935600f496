//! Where a regular file's bytes live.
//!
//! Layers are compressed streams that cannot be read at random, so while a layer
//! is applied its file data is copied once into a spool file (an unlinked
//! temporary file, which on a machine with memory to spare stays in page cache)
//! and the tree keeps `(spool, offset, len)`. Output writers then read each file
//! with positioned reads, in whatever order their format wants.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// Bytes held in memory (small generated files such as a run config).
    Inline(Arc<[u8]>),
    /// A byte range of a registered backing file (a layer spool).
    Extent { file: u32, offset: u64, len: u64 },
    /// A file on the host, read when the output is written.
    Host { path: PathBuf, len: u64 },
}

impl Content {
    pub fn len(&self) -> u64 {
        match self {
            Content::Inline(bytes) => bytes.len() as u64,
            Content::Extent { len, .. } | Content::Host { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The backing files that [`Content::Extent`] points into.
#[derive(Debug, Default)]
pub(crate) struct Spools {
    files: Vec<Arc<File>>,
}

impl Spools {
    /// Starts a new spool file in `dir` ([`default_spool_dir`] when `None`).
    pub(crate) fn create(&mut self, dir: Option<&Path>) -> io::Result<SpoolWriter> {
        let dir = dir.map_or_else(default_spool_dir, Path::to_path_buf);
        let file = tempfile::tempfile_in(&dir).map_err(|e| io::Error::new(e.kind(), format!("in {}: {e}", dir.display())))?;
        let read_handle = Arc::new(file.try_clone()?);
        let index = u32::try_from(self.files.len()).expect("spool count fits u32");
        self.files.push(read_handle);
        Ok(SpoolWriter { index, out: BufWriter::with_capacity(1 << 20, file), offset: 0 })
    }

    /// Spool file number `index` (tests look at how it is stored).
    #[cfg(test)]
    pub(crate) fn file(&self, index: u32) -> &File {
        &self.files[index as usize]
    }

    pub(crate) fn open(&self, content: &Content) -> io::Result<ContentReader> {
        Ok(match content {
            Content::Inline(bytes) => ContentReader::Inline { bytes: bytes.clone(), pos: 0 },
            Content::Extent { file, offset, len } => {
                let file = self.files.get(*file as usize).cloned().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no spool file #{file}")))?;
                ContentReader::Extent { file, start: *offset, pos: *offset, end: offset + len }
            }
            Content::Host { path, len } => {
                let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
                ContentReader::Extent { file: Arc::new(file), start: 0, pos: 0, end: *len }
            }
        })
    }
}

/// Where spool files go by default: `$TMPDIR` when set (the user's choice),
/// else `/tmp` unless it is a tmpfs, which holds its files in memory (spooled
/// layers are as large as the image), then `/var/tmp`.
pub fn default_spool_dir() -> PathBuf {
    choose_spool_dir(std::env::var_os("TMPDIR").filter(|v| !v.is_empty()).map(PathBuf::from), &[Path::new("/tmp"), Path::new("/var/tmp")], is_tmpfs)
}

fn choose_spool_dir(tmpdir: Option<PathBuf>, candidates: &[&Path], is_tmpfs: impl Fn(&Path) -> bool) -> PathBuf {
    if let Some(dir) = tmpdir {
        return dir;
    }
    candidates.iter().find(|d| d.is_dir() && !is_tmpfs(d)).or(candidates.first()).map_or_else(std::env::temp_dir, |d| d.to_path_buf())
}

/// Whether `dir` is on a tmpfs (memory); `false` when that cannot be told.
pub(crate) fn is_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return false };
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `stat` is a
    // plain struct the kernel fills in.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statfs(c_path.as_ptr(), &mut stat) };
    r == 0 && stat.f_type == libc::TMPFS_MAGIC
}

/// Finds the runs of `block`-sized blocks of `content` that hold a non-zero
/// byte, as `(first block, number of blocks)`; the last block may be short.
///
/// What counts is the bytes, not how the backing file stores them, so the
/// answer (and a disk writer's layout built on it) is the same on every host
/// filesystem; holes the backing file reports (`SEEK_DATA`) are only skipped
/// without reading.
pub(crate) fn data_runs(reader: &ContentReader, block: u64) -> io::Result<Vec<(u64, u64)>> {
    assert!(block > 0 && block <= 1 << 20, "block size {block}");
    let (len, base, file) = match reader {
        ContentReader::Inline { bytes, .. } => (bytes.len() as u64, 0, None),
        ContentReader::Extent { file, start, end, .. } => (end - start, *start, Some(file)),
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    // Small files (most of a rootfs) need no 1 MiB buffer.
    let chunk = ((1 << 20) / block * block).min(len.div_ceil(block) * block).max(block);
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0u64;
    while pos < len {
        if let Some(file) = file {
            match next_data(file, base + pos)? {
                None => break,
                Some(data) if data > base + pos => {
                    let skip_to = (data - base) / block * block;
                    if skip_to >= len {
                        break;
                    }
                    pos = pos.max(skip_to);
                }
                Some(_) => {}
            }
        }
        let n = chunk.min(len - pos);
        let buf = &mut buf[..n as usize];
        match reader {
            ContentReader::Inline { bytes, .. } => buf.copy_from_slice(&bytes[pos as usize..(pos + n) as usize]),
            ContentReader::Extent { file, .. } => file.read_exact_at(buf, base + pos)?,
        }
        for (i, blk) in buf.chunks(block as usize).enumerate() {
            if blk.iter().all(|&b| b == 0) {
                continue;
            }
            let b = pos / block + i as u64;
            match runs.last_mut() {
                Some((first, count)) if *first + *count == b => *count += 1,
                _ => runs.push((b, 1)),
            }
        }
        pos += n;
    }
    Ok(runs)
}

/// The offset of the first data at or after `offset` (`None`: only a hole
/// follows). Filesystems without SEEK_DATA report everything as data.
fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else { return Ok(Some(offset)) };
    // SAFETY: lseek on a file descriptor this `File` owns; it only moves
    // the descriptor's position, which the positioned reads here ignore.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
        _ => Err(err),
    }
}

/// Appends file bodies to one spool file.
pub struct SpoolWriter {
    index: u32,
    out: BufWriter<File>,
    offset: u64,
}

impl SpoolWriter {
    /// Copies exactly `len` bytes from `data` into the spool.
    pub fn append(&mut self, data: &mut dyn Read, len: u64) -> io::Result<Content> {
        let copied = io::copy(&mut data.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("expected {len} bytes of file data, got {copied}")));
        }
        let content = Content::Extent { file: self.index, offset: self.offset, len };
        self.offset += len;
        Ok(content)
    }

    /// Spools a sparse file of `real_size` bytes: each `(offset, length)`
    /// segment is copied from `data` in order, the holes between them are left
    /// as holes of the spool file (read back as zeros, never written). The
    /// file starts on a 4 KiB boundary of the spool so its holes can be real.
    pub fn append_sparse(&mut self, data: &mut dyn Read, segments: &[(u64, u64)], real_size: u64) -> io::Result<Content> {
        let start = self.offset.next_multiple_of(4096);
        let end = start.checked_add(real_size).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sparse file too large"))?;
        for &(offset, len) in segments {
            debug_assert!(offset + len <= real_size, "segments lie inside the file");
            self.out.seek(SeekFrom::Start(start + offset))?;
            let copied = io::copy(&mut data.take(len), &mut self.out)?;
            if copied != len {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("expected {len} bytes of sparse file data, got {copied}")));
            }
        }
        self.out.seek(SeekFrom::Start(end))?;
        self.offset = end;
        Ok(Content::Extent { file: self.index, offset: start, len: real_size })
    }

    /// Flushes buffered data so readers see it; returns the bytes spooled.
    pub fn finish(mut self) -> io::Result<u64> {
        self.out.flush()?;
        // A sparse file ending in a hole: the spool must reach its end.
        if self.out.get_ref().metadata()?.len() < self.offset {
            self.out.get_ref().set_len(self.offset)?;
        }
        // Readers use positioned reads on a cloned handle; the position of this
        // one no longer matters, but make sure the data reached the file.
        self.out.get_mut().stream_position()?;
        Ok(self.offset)
    }
}

/// A reader over one file's content.
pub enum ContentReader {
    Inline {
        bytes: Arc<[u8]>,
        pos: usize,
    },
    /// A byte range of a spool file, or of a host file (from 0 to its length).
    Extent {
        file: Arc<File>,
        start: u64,
        pos: u64,
        end: u64,
    },
}

impl ContentReader {
    /// Reads exactly `buf.len()` bytes at `offset` from the start of the
    /// content, leaving the sequential position alone.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let out_of_range = || io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end of a file's content");
        match self {
            ContentReader::Inline { bytes, .. } => {
                let start = usize::try_from(offset).map_err(|_| out_of_range())?;
                let src = bytes.get(start..start + buf.len()).ok_or_else(out_of_range)?;
                buf.copy_from_slice(src);
                Ok(())
            }
            ContentReader::Extent { file, start, end, .. } => {
                let len = buf.len() as u64;
                let abs = start.checked_add(offset).filter(|a| a + len <= *end).ok_or_else(out_of_range)?;
                file.read_exact_at(buf, abs)
            }
        }
    }

    /// The content's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            ContentReader::Inline { bytes, .. } => bytes.len() as u64,
            ContentReader::Extent { start, end, .. } => end - start,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Read for ContentReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ContentReader::Inline { bytes, pos } => {
                let n = (bytes.len() - *pos).min(buf.len());
                buf[..n].copy_from_slice(&bytes[*pos..*pos + n]);
                *pos += n;
                Ok(n)
            }
            ContentReader::Extent { file, pos, end, .. } => {
                let want = ((*end - *pos) as usize).min(buf.len());
                if want == 0 {
                    return Ok(0);
                }
                let n = file.read_at(&mut buf[..want], *pos)?;
                *pos += n as u64;
                Ok(n)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_round_trip() {
        let mut spools = Spools::default();
        let mut w = spools.create(None).unwrap();
        let a = w.append(&mut &b"hello "[..], 6).unwrap();
        let b = w.append(&mut &b"world!!"[..], 5).unwrap();
        assert!(w.append(&mut &b"ab"[..], 3).is_err(), "short data must fail");
        w.finish().unwrap();
        let mut s = String::new();
        spools.open(&a).unwrap().read_to_string(&mut s).unwrap();
        spools.open(&b).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
        let mut s = String::new();
        spools.open(&Content::Inline(Arc::from(&b"inline"[..]))).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "inline");
    }

    #[test]
    fn spools_avoid_a_tmpfs_tmp() {
        let (tmp, var_tmp) = (Path::new("/tmp"), Path::new("/var/tmp"));
        let tmpfs = |d: &Path| d == tmp;
        assert_eq!(choose_spool_dir(None, &[tmp, var_tmp], tmpfs), var_tmp);
        assert_eq!(choose_spool_dir(None, &[tmp, var_tmp], |_| false), tmp);
        assert_eq!(choose_spool_dir(Some("/x".into()), &[tmp, var_tmp], tmpfs), Path::new("/x"), "TMPDIR is the user's choice");
        // The real check on a real tmpfs, where the machine has one.
        if Path::new("/dev/shm").is_dir() {
            assert!(is_tmpfs(Path::new("/dev/shm")), "/dev/shm is a tmpfs");
        } else {
            eprintln!("SKIP: spools_avoid_a_tmpfs_tmp: no /dev/shm to check is_tmpfs on");
        }
    }

    #[test]
    fn data_runs_follow_the_bytes_not_the_holes() {
        let bs = 4096u64;
        // A host file: a hole, data, explicit zeros written as data, a hole, a short tail.
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let file = f.as_file_mut();
        file.write_all_at(&[7u8; 10], 3 * bs + 5).unwrap();
        file.write_all_at(&vec![0u8; 2 * bs as usize], 5 * bs).unwrap();
        file.write_all_at(&[1u8; 100], 9 * bs).unwrap();
        file.set_len(9 * bs + 100).unwrap();
        let spools = Spools::default();
        let host = Content::Host { path: f.path().to_path_buf(), len: 9 * bs + 100 };
        let reader = spools.open(&host).unwrap();
        assert_eq!(data_runs(&reader, bs).unwrap(), vec![(3, 1), (9, 1)]);
        let mut back = [0u8; 12];
        reader.read_exact_at(&mut back, 3 * bs + 4).unwrap();
        assert_eq!(back, [0, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0]);
        assert!(reader.read_exact_at(&mut back, 9 * bs + 95).is_err(), "past the end");

        // Inline bytes and a spool extent not aligned to the block size.
        let mut bytes = vec![0u8; 3 * bs as usize];
        bytes[bs as usize + 1] = 9;
        let inline = spools.open(&Content::Inline(Arc::from(bytes.clone()))).unwrap();
        assert_eq!(data_runs(&inline, bs).unwrap(), vec![(1, 1)]);
        let mut spools = Spools::default();
        let mut w = spools.create(None).unwrap();
        w.append(&mut &b"xyz"[..], 3).unwrap();
        let c = w.append(&mut &bytes[..], bytes.len() as u64).unwrap();
        w.finish().unwrap();
        let mut r = spools.open(&c).unwrap();
        assert_eq!(data_runs(&r, bs).unwrap(), vec![(1, 1)]);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, bytes);
        let mut one = [0u8; 2];
        r.read_exact_at(&mut one, bs).unwrap();
        assert_eq!(one, [0, 9], "positioned reads ignore the sequential position");
    }
}
