//! The content-addressed blob cache, outside the repository.
//!
//! Blobs live at `ROOT/blobs/sha256/<hex>`, written under a temporary name and
//! renamed only after their digest and size check out, so a crash or a
//! registry failing mid-transfer never leaves a bad blob under a good name.
//! A cached blob is re-verified when used: hashing is far cheaper than
//! building from a corrupted layer.
//!
//! Temporary blobs live in `ROOT/blobs/tmp/` and go when their writer is
//! dropped, and on SIGINT/SIGTERM/SIGHUP with the staged outputs
//! ([`crate::output::SignalCleanup`]). Processes sharing a cache take
//! `ROOT/blobs/locks/<hex>` ([`BlobCache::lock`], an advisory `flock`) while
//! they fetch a blob, so a second build waits for the first's verified blob
//! instead of downloading it again. Lock files are left in place: removing
//! one another process may have open would let two holders in.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use super::digest::Digest;

#[derive(Clone, Debug)]
pub struct BlobCache {
    root: PathBuf,
}

impl BlobCache {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        BlobCache { root: root.into() }
    }

    /// `$OSBUILDER_CACHE`, else `$XDG_CACHE_HOME/osbuilder`, else `~/.cache/osbuilder`.
    pub fn default_dir() -> PathBuf {
        if let Some(dir) = std::env::var_os("OSBUILDER_CACHE").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(std::env::temp_dir);
        base.join("osbuilder")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// The cached blob, if present and intact, open: the caller reads the
    /// file that was hashed, not whatever the name holds later. A corrupt
    /// entry is removed.
    pub fn get_verified(&self, digest: &Digest, size: Option<u64>) -> io::Result<Option<File>> {
        let path = self.blob_path(digest);
        let Ok(file) = File::open(&path) else { return Ok(None) };
        let len = file.metadata()?.len();
        if size.is_some_and(|s| s != len) || Digest::of_open_range(&file, 0, len)? != *digest {
            fs::remove_file(&path)?;
            return Ok(None);
        }
        Ok(Some(file))
    }

    /// Waits for and takes the fetch lock of `digest`, held until the
    /// returned file is dropped. The lock is per open file, so two threads
    /// of one process exclude each other too.
    pub fn lock(&self, digest: &Digest) -> io::Result<fs::File> {
        let dir = self.root.join("blobs/locks");
        fs::create_dir_all(&dir)?;
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(digest.hex()))?;
        file.lock()?;
        Ok(file)
    }

    /// Starts writing a blob expected to have `digest` (and `size`, if known).
    pub fn writer(&self, digest: &Digest, size: Option<u64>) -> io::Result<BlobWriter> {
        let tmp_dir = self.root.join("blobs/tmp");
        fs::create_dir_all(&tmp_dir)?;
        fs::create_dir_all(self.root.join("blobs/sha256"))?;
        let file = tempfile::NamedTempFile::new_in(&tmp_dir)?;
        let cleanup = crate::output::SignalCleanup::new(file.path());
        Ok(BlobWriter {
            file: io::BufWriter::with_capacity(1 << 20, file),
            hasher: Sha256::new(),
            written: 0,
            digest: Some(digest.clone()),
            size,
            root: self.root.clone(),
            cleanup,
        })
    }

    /// Starts writing a blob whose digest is not known yet (one we make):
    /// [`BlobWriter::commit`] names it by what was written.
    pub fn spool(&self) -> io::Result<BlobWriter> {
        let mut w = self.writer(&Digest::of_bytes(b""), None)?;
        w.digest = None;
        Ok(w)
    }
}

/// A blob being written; dropped without [`BlobWriter::commit`] it vanishes.
pub struct BlobWriter {
    file: io::BufWriter<tempfile::NamedTempFile>,
    hasher: Sha256,
    written: u64,
    /// `None` for a spooled blob, named by its content at commit.
    digest: Option<Digest>,
    size: Option<u64>,
    root: PathBuf,
    /// Removes the temporary file on a signal; last, so dropped after `file`.
    cleanup: crate::output::SignalCleanup,
}

#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    #[error("blob {expected} has the wrong digest: got sha256:{actual}")]
    Digest { expected: Digest, actual: String },
    #[error("blob {digest} has {actual} bytes, the manifest says {expected}")]
    Size { digest: Digest, expected: u64, actual: u64 },
    #[error("cannot store blob {digest} in the cache: {source}")]
    Io { digest: Digest, source: io::Error },
}

impl BlobWriter {
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Verifies size and digest, then moves the blob under its name.
    pub fn commit(self) -> Result<PathBuf, CommitError> {
        self.commit_open().map(|(path, _)| path)
    }

    /// [`BlobWriter::commit`], also returning the file written (open for
    /// reading too), so the verified bytes are read back without a reopen.
    pub fn commit_open(self) -> Result<(PathBuf, File), CommitError> {
        let BlobWriter { cleanup, file, hasher, written, digest, size, root } = self;
        let actual = hex::encode(hasher.finalize());
        let digest = match digest {
            Some(digest) => digest,
            None => format!("sha256:{actual}").parse().expect("a sha256 we computed"),
        };
        if let Some(expected) = size.filter(|&s| s != written) {
            return Err(CommitError::Size { digest, expected, actual: written });
        }
        if actual != digest.hex() {
            return Err(CommitError::Digest { expected: digest, actual });
        }
        let dest = BlobCache::new(root).blob_path(&digest);
        let io_err = |source| CommitError::Io { digest: digest.clone(), source };
        let file = file.into_inner().map_err(|e| io_err(e.into_error()))?;
        file.as_file().sync_data().map_err(io_err)?;
        let file = file.persist(&dest).map_err(|e| io_err(e.error))?;
        drop(cleanup);
        Ok((dest, file))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_verifies_and_corrupt_entries_are_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = BlobCache::new(tmp.path());
        let good = Digest::of_bytes(b"layer");

        let mut w = cache.writer(&good, Some(5)).unwrap();
        w.write_all(b"LAYER").unwrap();
        assert!(matches!(w.commit(), Err(CommitError::Digest { .. })));
        assert!(!cache.blob_path(&good).exists(), "a bad blob must not land under the name");

        let mut w = cache.writer(&good, Some(9)).unwrap();
        w.write_all(b"layer").unwrap();
        assert!(matches!(w.commit(), Err(CommitError::Size { .. })));

        let mut w = cache.writer(&good, Some(5)).unwrap();
        w.write_all(b"layer").unwrap();
        let path = w.commit().unwrap();
        let mut cached = String::new();
        io::Read::read_to_string(&mut cache.get_verified(&good, Some(5)).unwrap().unwrap(), &mut cached).unwrap();
        assert_eq!(cached, "layer");

        fs::write(&path, b"evil!").unwrap();
        assert!(cache.get_verified(&good, Some(5)).unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(fs::read_dir(tmp.path().join("blobs/tmp")).unwrap().count(), 0, "no temporary files left");
    }
}
