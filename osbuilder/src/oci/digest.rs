//! Content digests (`sha256:<64 hex>`) and verification of bytes against them.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form sha256:<64 lowercase hex digits>")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported (only sha256)")]
    Algorithm(String),
}

/// A sha256 content digest. Other algorithms are refused: every registry and
/// tool in use writes sha256, and a digest we cannot check is worthless.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Digest { hex: hex::encode(Sha256::digest(bytes)) }
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `len` bytes of `path` starting at `offset`.
    pub fn of_file_range(path: &Path, offset: u64, len: u64) -> io::Result<Self> {
        Self::of_open_range(&File::open(path)?, offset, len).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::new(io::ErrorKind::UnexpectedEof, format!("{} is shorter than expected", path.display()))
            } else {
                e
            }
        })
    }

    /// The digest of `len` bytes of an open file starting at `offset`, by
    /// positioned reads (the cursor is left alone), so that a caller can
    /// check a blob and then parse it from the same open file.
    pub fn of_open_range(file: &File, offset: u64, len: u64) -> io::Result<Self> {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let want = ((end - pos) as usize).min(buf.len());
            let n = file.read_at(&mut buf[..want], pos)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file is shorter than expected"));
            }
            hasher.update(&buf[..n]);
            pos += n as u64;
        }
        Ok(Digest { hex: hex::encode(hasher.finalize()) })
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (algo, hex) = s.split_once(':').ok_or_else(|| DigestError::Malformed(s.to_string()))?;
        if algo != "sha256" {
            return Err(DigestError::Algorithm(algo.to_string()));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(DigestError::Malformed(s.to_string()));
        }
        Ok(Digest { hex: hex.to_string() })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A reader that hashes everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }

    /// Reads whatever is left (tar readers stop at the end-of-archive marker,
    /// but the digest covers the whole stream) and returns digest and length.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest { hex: hex::encode(self.hasher.finalize()) }, self.count))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let empty = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Digest = empty.parse().unwrap();
        assert_eq!(d, Digest::of_bytes(b""));
        assert_eq!(d.to_string(), empty);
        assert!(matches!("sha512:abc".parse::<Digest>(), Err(DigestError::Algorithm(_))));
        assert!(matches!("sha256:ABC".parse::<Digest>(), Err(DigestError::Malformed(_))));
        assert!("sha256:../../etc/passwd".parse::<Digest>().is_err());
        assert!("nocolon".parse::<Digest>().is_err());
    }

    #[test]
    fn hashing_reader_covers_the_whole_stream() {
        let data = b"0123456789";
        let mut r = HashingReader::new(&data[..]);
        let mut first = [0u8; 4];
        r.read_exact(&mut first).unwrap();
        let (d, n) = r.finish().unwrap();
        assert_eq!((d, n), (Digest::of_bytes(data), 10));
    }
}
