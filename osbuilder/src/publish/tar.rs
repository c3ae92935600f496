//! The tar layers we publish, as a list of byte ranges rather than a file.
//!
//! A containerDisk or kernel-boot layer is a few 512-byte headers around
//! whole files the build already wrote. Describing it as parts (header
//! bytes, a range of a host file, zero padding) means the uncompressed layer
//! never has to be written out: its digest is one read of the disk, and any
//! byte range of it (an upload resumed at byte N) is produced by reading the
//! disk at the right place. The headers come from the `tar` crate; only the
//! concatenation is ours.
//!
//! Everything is fixed by the inputs: entries in the order given, owner and
//! mode as given, one mtime for all (the build's SOURCE_DATE_EPOCH, else 0),
//! ustar headers (sizes over 8 GiB in the base-256 form that Go's
//! archive/tar and GNU tar read) and the two zero blocks that end an archive.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One entry of a layer we build.
#[derive(Clone, Debug)]
pub struct TarEntry {
    /// Path inside the layer, relative, no trailing slash (`disk`, `disk/disk.qcow2`).
    pub name: String,
    pub kind: TarKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub uname: String,
    pub gname: String,
}

#[derive(Clone, Debug)]
pub enum TarKind {
    Dir,
    /// A host file, taken whole; its length is fixed when the layer is made.
    File {
        path: PathBuf,
    },
}

#[derive(Clone, Debug)]
enum Part {
    Bytes(Arc<Vec<u8>>),
    File { index: usize, len: u64 },
    Zeros(u64),
}

/// A tar archive as parts; see the module documentation.
#[derive(Clone, Debug)]
pub struct TarLayer {
    parts: Vec<(u64, Part)>,
    files: Vec<(PathBuf, u64)>,
    len: u64,
}

/// Where one file's bytes sit inside the layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePlacement {
    pub name: String,
    pub offset: u64,
    pub len: u64,
}

impl TarLayer {
    pub fn new(entries: &[TarEntry], mtime: u64) -> io::Result<Self> {
        let mut parts = Vec::new();
        let mut files = Vec::new();
        let mut len = 0u64;
        let mut push = |parts: &mut Vec<(u64, Part)>, part: Part, n: u64| {
            if n > 0 {
                parts.push((len, part));
                len += n;
            }
        };
        for entry in entries {
            let mut header = tar::Header::new_ustar();
            header.set_path(&entry.name).map_err(|e| io::Error::new(e.kind(), format!("layer entry {:?}: {e}", entry.name)))?;
            if matches!(entry.kind, TarKind::Dir) {
                // `set_path` drops a trailing slash; tar tools write directories with one.
                let name = format!("{}/", entry.name);
                let field = &mut header.as_old_mut().name;
                if name.len() > field.len() {
                    return Err(io::Error::other(format!("layer directory {:?} is too long", entry.name)));
                }
                field[..name.len()].copy_from_slice(name.as_bytes());
            }
            header.set_mode(entry.mode);
            header.set_uid(entry.uid);
            header.set_gid(entry.gid);
            header.set_username(&entry.uname)?;
            header.set_groupname(&entry.gname)?;
            header.set_mtime(mtime);
            let size = match &entry.kind {
                TarKind::Dir => {
                    header.set_entry_type(tar::EntryType::Directory);
                    0
                }
                TarKind::File { path } => {
                    let size = std::fs::metadata(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?.len();
                    header.set_entry_type(tar::EntryType::Regular);
                    size
                }
            };
            header.set_size(size);
            header.set_cksum();
            push(&mut parts, Part::Bytes(Arc::new(header.as_bytes().to_vec())), 512);
            if let TarKind::File { path } = &entry.kind {
                files.push((path.clone(), size));
                push(&mut parts, Part::File { index: files.len() - 1, len: size }, size);
                push(&mut parts, Part::Zeros(size.next_multiple_of(512) - size), size.next_multiple_of(512) - size);
            }
        }
        push(&mut parts, Part::Zeros(1024), 1024);
        Ok(TarLayer { parts, files, len })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where each file's data starts in the layer, in entry order.
    pub fn placements(&self, entries: &[TarEntry]) -> Vec<FilePlacement> {
        let names = entries.iter().filter(|e| matches!(e.kind, TarKind::File { .. })).map(|e| e.name.clone());
        let starts = self.parts.iter().filter_map(|(at, p)| match p {
            Part::File { len, .. } => Some((*at, *len)),
            _ => None,
        });
        // A zero-length file has no part: account for it by walking the files list.
        let mut starts = starts.peekable();
        let mut out = Vec::new();
        for (name, (_, size)) in names.zip(&self.files) {
            if *size == 0 {
                out.push(FilePlacement { name, offset: 0, len: 0 });
                continue;
            }
            let (offset, len) = starts.next().expect("one part per non-empty file");
            out.push(FilePlacement { name, offset, len });
        }
        out
    }

    /// A reader of the layer's bytes from `offset` to the end. The host files
    /// are opened now; one that has changed length since the layer was made is
    /// an error when reached.
    pub fn reader_at(&self, offset: u64) -> io::Result<TarReader> {
        let mut files = Vec::with_capacity(self.files.len());
        for (path, len) in &self.files {
            let file = File::open(path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            let now = file.metadata()?.len();
            if now != *len {
                return Err(changed(path, *len, now));
            }
            files.push((file, path.clone(), *len));
        }
        Ok(TarReader { layer: self.clone(), files, pos: offset.min(self.len) })
    }
}

fn changed(path: &Path, was: u64, now: u64) -> io::Error {
    io::Error::other(format!("{} changed while being published ({was} bytes, now {now})", path.display()))
}

/// See [`TarLayer::reader_at`].
pub struct TarReader {
    layer: TarLayer,
    files: Vec<(File, PathBuf, u64)>,
    pos: u64,
}

impl TarReader {
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Read for TarReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.layer.len || buf.is_empty() {
            return Ok(0);
        }
        let i = self.layer.parts.partition_point(|(at, _)| *at <= self.pos) - 1;
        let (start, part) = &self.layer.parts[i];
        let within = self.pos - start;
        let n = match part {
            Part::Bytes(bytes) => {
                let src = &bytes[within as usize..];
                let n = src.len().min(buf.len());
                buf[..n].copy_from_slice(&src[..n]);
                n
            }
            Part::Zeros(len) => {
                let n = ((len - within) as usize).min(buf.len());
                buf[..n].fill(0);
                n
            }
            Part::File { index, len } => {
                let (file, path, _) = &self.files[*index];
                let want = ((len - within) as usize).min(buf.len());
                let n = file.read_at(&mut buf[..want], within)?;
                if n == 0 {
                    let now = file.metadata()?.len();
                    return Err(changed(path, *len, now));
                }
                n
            }
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path, size: usize) -> Vec<TarEntry> {
        let path = dir.join("blob");
        std::fs::write(&path, (0..size).map(|i| (i % 251) as u8).collect::<Vec<_>>()).unwrap();
        let owned = |name: &str, kind, mode| TarEntry { name: name.into(), kind, mode, uid: 107, gid: 107, uname: "qemu".into(), gname: "qemu".into() };
        vec![owned("disk", TarKind::Dir, 0o555), owned("disk/disk.img", TarKind::File { path }, 0o444)]
    }

    #[test]
    fn parts_read_back_as_a_tar_archive_with_the_file_at_its_placement() {
        let tmp = tempfile::tempdir().unwrap();
        for size in [0usize, 1, 511, 512, 513, 100_000] {
            let entries = entries(tmp.path(), size);
            let layer = TarLayer::new(&entries, 1_700_000_000).unwrap();
            let mut bytes = Vec::new();
            layer.reader_at(0).unwrap().read_to_end(&mut bytes).unwrap();
            assert_eq!(bytes.len() as u64, layer.len());
            assert_eq!(bytes.len() % 512, 0);
            let placement = &layer.placements(&entries)[0];
            assert_eq!(placement.len, size as u64);
            let data = std::fs::read(tmp.path().join("blob")).unwrap();
            if size > 0 {
                assert_eq!(placement.offset, 1024);
                assert_eq!(&bytes[1024..1024 + size], &data[..]);
            }

            let mut archive = tar::Archive::new(&bytes[..]);
            let mut seen = Vec::new();
            for entry in archive.entries().unwrap() {
                let mut entry = entry.unwrap();
                let h = entry.header().clone();
                let mut body = Vec::new();
                entry.read_to_end(&mut body).unwrap();
                seen.push((
                    entry.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.username().unwrap().unwrap().to_string(),
                    h.mtime().unwrap(),
                    body,
                ));
            }
            assert_eq!(seen.len(), 2);
            assert_eq!((seen[0].0.as_str(), seen[0].1, seen[0].2, seen[0].3.as_str()), ("disk/", 0o555, 107, "qemu"));
            assert_eq!((seen[1].0.as_str(), seen[1].1, seen[1].4), ("disk/disk.img", 0o444, 1_700_000_000));
            assert_eq!(seen[1].5, data);

            // Any suffix is the same bytes.
            for at in [0u64, 1, 511, 512, 1023, 1024, 1025, layer.len() - 1, layer.len()] {
                let mut tail = Vec::new();
                layer.reader_at(at).unwrap().read_to_end(&mut tail).unwrap();
                assert_eq!(&tail[..], &bytes[at as usize..], "offset {at}, size {size}");
            }
        }
    }

    #[test]
    fn a_file_that_changes_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let entries = entries(tmp.path(), 4096);
        let layer = TarLayer::new(&entries, 0).unwrap();
        std::fs::write(tmp.path().join("blob"), b"short").unwrap();
        let err = layer.reader_at(0).err().expect("changed length");
        assert!(err.to_string().contains("changed while being published"), "{err}");
    }
}
