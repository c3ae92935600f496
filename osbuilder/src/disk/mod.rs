//! Disk images: filesystems, partition tables and Kata's DAX layout.
//!
//! Every writer here is a pure encoder: it reads a [`crate::rootfs::Plan`]
//! (and the file bytes the tree points at) and emits bytes into a [`Sink`] in
//! increasing offset order, doing no other I/O. Staging the output file
//! (temporary name, fsync, rename) is [`crate::output`]'s job.

pub mod dax;
pub mod erofs;
pub mod ext4;
pub mod image;
pub mod layout;
pub mod qcow2;
pub mod table;
pub mod verity;

use std::io::{self, Seek, SeekFrom, Write};

/// A block of zeros for sinks that must write holes out.
pub(crate) static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// Where a format writer's bytes go, in increasing offset order.
pub trait Sink {
    /// Appends `buf`.
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()>;
    /// Appends `len` zero bytes. A seekable sink leaves a hole instead, so
    /// unused metadata and sparse ranges cost no host disk.
    fn zeros(&mut self, len: u64) -> io::Result<()>;
    /// Bytes appended so far (the offset of the next byte, relative to where
    /// this sink started).
    fn position(&self) -> u64;
}

/// A sink over a seekable file starting at byte `base` of it: zeros are
/// skipped with a seek. The caller sets the file's final length (a hole at
/// the end is not written by seeking alone).
pub struct SeekSink<W: Write + Seek> {
    inner: W,
    pos: u64,
}

impl<W: Write + Seek> SeekSink<W> {
    /// Positions `inner` at `base`; offsets are then relative to it.
    pub fn at(mut inner: W, base: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(base))?;
        Ok(SeekSink { inner, pos: 0 })
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write + Seek> Sink for SeekSink<W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, len: u64) -> io::Result<()> {
        if len > 0 {
            let delta = i64::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "hole too large"))?;
            self.inner.seek(SeekFrom::Current(delta))?;
            self.pos += len;
        }
        Ok(())
    }

    fn position(&self) -> u64 {
        self.pos
    }
}

/// A sink over any `Write` (a pipe, a hasher, a `Vec` in tests): zeros are
/// written out.
pub struct StreamSink<W: Write> {
    inner: W,
    pos: u64,
}

impl<W: Write> StreamSink<W> {
    pub fn new(inner: W) -> Self {
        StreamSink { inner, pos: 0 }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }
}

impl<W: Write> Sink for StreamSink<W> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, mut len: u64) -> io::Result<()> {
        self.pos += len;
        while len > 0 {
            let n = len.min(ZEROS.len() as u64) as usize;
            self.inner.write_all(&ZEROS[..n])?;
            len -= n as u64;
        }
        Ok(())
    }

    fn position(&self) -> u64 {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seek_and_stream_sinks_agree() {
        let mut file = tempfile::tempfile().unwrap();
        {
            let mut sink = SeekSink::at(&mut file, 3).unwrap();
            sink.write_all(b"ab").unwrap();
            sink.zeros(5).unwrap();
            sink.write_all(b"c").unwrap();
            assert_eq!(sink.position(), 8);
        }
        let mut stream = StreamSink::new(Vec::new());
        stream.zeros(3).unwrap();
        stream.write_all(b"ab").unwrap();
        stream.zeros(5).unwrap();
        stream.write_all(b"c").unwrap();
        use std::io::Read;
        let mut back = Vec::new();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut back).unwrap();
        assert_eq!(back, stream.into_inner());
    }
}
