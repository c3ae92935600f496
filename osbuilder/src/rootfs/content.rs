//! Where a regular file's bytes live.
//!
//! Layers are compressed streams that cannot be read at random, so while a layer
//! is applied its file data is copied once into a spool file (an unlinked
//! temporary file, which on a machine with memory to spare stays in page cache)
//! and the tree keeps `(spool, offset, len)`. Output writers then read each file
//! with positioned reads, in whatever order their format wants.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, Write};
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
    /// Starts a new spool file in `dir` (the system temp dir when `None`).
    pub(crate) fn create(&mut self, dir: Option<&Path>) -> io::Result<SpoolWriter> {
        let file = match dir {
            Some(dir) => tempfile::tempfile_in(dir)?,
            None => tempfile::tempfile()?,
        };
        let read_handle = Arc::new(file.try_clone()?);
        let index = u32::try_from(self.files.len()).expect("spool count fits u32");
        self.files.push(read_handle);
        Ok(SpoolWriter { index, out: BufWriter::with_capacity(1 << 20, file), offset: 0 })
    }

    pub(crate) fn open(&self, content: &Content) -> io::Result<ContentReader> {
        Ok(match content {
            Content::Inline(bytes) => ContentReader::Inline { bytes: bytes.clone(), pos: 0 },
            Content::Extent { file, offset, len } => {
                let file = self.files.get(*file as usize).cloned().ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("no spool file #{file}"))
                })?;
                ContentReader::Extent { file, pos: *offset, end: offset + len }
            }
            Content::Host { path, len } => {
                let file = File::open(path).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display()))
                })?;
                ContentReader::Host(file.take(*len))
            }
        })
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
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("expected {len} bytes of file data, got {copied}"),
            ));
        }
        let content = Content::Extent { file: self.index, offset: self.offset, len };
        self.offset += len;
        Ok(content)
    }

    /// Flushes buffered data so readers see it; returns the bytes spooled.
    pub fn finish(mut self) -> io::Result<u64> {
        self.out.flush()?;
        // Readers use positioned reads on a cloned handle; the position of this
        // one no longer matters, but make sure the data reached the file.
        self.out.get_mut().stream_position()?;
        Ok(self.offset)
    }
}

/// A reader over one file's content.
pub enum ContentReader {
    Inline { bytes: Arc<[u8]>, pos: usize },
    Extent { file: Arc<File>, pos: u64, end: u64 },
    Host(io::Take<File>),
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
            ContentReader::Extent { file, pos, end } => {
                let want = ((*end - *pos) as usize).min(buf.len());
                if want == 0 {
                    return Ok(0);
                }
                let n = file.read_at(&mut buf[..want], *pos)?;
                *pos += n as u64;
                Ok(n)
            }
            ContentReader::Host(take) => take.read(buf),
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
}
