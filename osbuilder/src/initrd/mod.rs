//! Writing a [`Tree`] as a kernel initramfs: cpio newc, optionally compressed.
//!
//! Reproducible by construction: entries in the tree's sorted order, inode
//! numbers from the layout plan (the walk's order) from 1, mtimes clamped to
//! SOURCE_DATE_EPOCH, hard links sharing an inode number with the data on the
//! last name (GNU cpio's convention, which the kernel also accepts). The
//! output is staged by [`crate::output`] and renamed into place only when
//! complete.

pub mod cpio;

use std::io::{self, BufWriter, Write};
use std::path::Path;

use indicatif::ProgressBar;
use sha2::{Digest as _, Sha256};

use crate::output::Staged;
use crate::compress::{CompressOptions, Compression, Encoder};
use crate::rootfs::{Body, Plan, PlanError, Tree};
use cpio::{NewcHeader, NewcWriter, MAX_FILE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    #[error("{path} is {size} bytes; cpio newc cannot hold files of 4 GiB or more (build a disk image instead)")]
    FileTooLarge { path: String, size: u64 },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Output(#[from] crate::output::OutputError),
    #[error("cannot write the initrd: {0}")]
    Write(#[source] io::Error),
    #[error("cannot write the initrd: {0}")]
    Cpio(#[from] cpio::CpioError),
    #[error("cannot set up compression: {0}")]
    Compress(#[from] crate::compress::CompressError),
}

#[derive(Clone, Debug)]
pub struct InitrdOptions {
    pub compression: CompressOptions,
    /// Upper bound for every mtime in the archive.
    pub source_date_epoch: i64,
    /// Memory of the guest this initrd is meant for, to warn about size.
    pub guest_mem: Option<u64>,
}

/// What was written, for the CLI and the build manifest.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InitrdReport {
    pub entries: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    /// Inodes whose xattrs newc cannot carry (e.g. `security.capability`).
    pub dropped_xattrs: u64,
    pub sha256: String,
    pub warnings: Vec<String>,
}

/// Counts (and optionally hashes, or reports progress of) bytes on their way to `inner`.
struct Counting<W> {
    inner: W,
    count: u64,
    hasher: Option<Sha256>,
    progress: Option<ProgressBar>,
}

impl<W> Counting<W> {
    fn new(inner: W, hash: bool, progress: Option<ProgressBar>) -> Self {
        Counting { inner, count: 0, hasher: hash.then(Sha256::new), progress }
    }
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        if let Some(h) = &mut self.hasher {
            h.update(&buf[..n]);
        }
        if let Some(bar) = &self.progress {
            bar.inc(n as u64);
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A writer whose errors name the output ("No space left on device" alone
/// does not say which disk).
struct PathNamed<W> {
    inner: W,
    path: std::path::PathBuf,
}

impl<W: Write> PathNamed<W> {
    fn named(&self, e: io::Error) -> io::Error {
        io::Error::new(e.kind(), format!("{}: {e}", self.path.display()))
    }
}

impl<W: Write> Write for PathNamed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(|e| self.named(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(|e| self.named(e))
    }
}

/// Writes `tree` as an initrd at `out`; `progress` counts uncompressed bytes.
pub fn write_initrd(tree: &Tree, out: &Path, opts: &InitrdOptions, progress: &ProgressBar) -> Result<InitrdReport, InitrdError> {
    let staged = Staged::create(out)?;
    let file = staged.file().try_clone().map_err(InitrdError::Write)?;
    let file = PathNamed { inner: file, path: staged.dest().to_path_buf() };
    let mut report = write_archive(tree, file, opts, progress)?;
    staged.commit()?;
    report.warnings.extend(size_warnings(&report, opts));
    Ok(report)
}

/// Streams the archive into `out` (which receives compressed bytes).
pub fn write_archive<W: Write + Send + 'static>(
    tree: &Tree,
    out: W,
    opts: &InitrdOptions,
    progress: &ProgressBar,
) -> Result<InitrdReport, InitrdError> {
    let plan = Plan::new(tree)?;
    check_file_sizes(&plan)?;
    let compressed = Counting::new(BufWriter::with_capacity(1 << 20, out), true, None);
    let encoder = Encoder::new(&opts.compression, compressed)?;
    let uncompressed = Counting::new(encoder, false, Some(progress.clone()));
    let mut cpio = NewcWriter::new(BufWriter::with_capacity(1 << 20, uncompressed));
    let mut report = InitrdReport::default();
    let clamp = |mtime: i64| mtime.min(opts.source_date_epoch).clamp(0, i64::from(u32::MAX)) as u32;

    let mut result = Ok(());
    plan.walk_paths(|path, seq, ino| {
        if result.is_err() {
            return;
        }
        let planned = plan.inode(ino);
        let inode = plan.tree_inode(ino);
        let is_last_name = planned.last_name == seq;
        let mut header = NewcHeader {
            // Plan numbers start at 0 for the root; cpio's at 1.
            ino: ino.get() + 1,
            mode: inode.body.file_type_bits() | inode.meta.mode,
            uid: inode.meta.uid,
            gid: inode.meta.gid,
            nlink: planned.nlink,
            mtime: clamp(inode.meta.mtime),
            file_size: 0,
            dev_major: 0,
            dev_minor: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        if !inode.meta.xattrs.is_empty() && is_last_name {
            report.dropped_xattrs += 1;
        }
        let name: &[u8] = if path.is_empty() { b"." } else { path };
        result = match &inode.body {
            Body::File(content) if is_last_name => {
                header.file_size = content.len() as u32;
                match tree.open_content(content) {
                    Ok(mut reader) => cpio.append(&header, name, &mut reader).map_err(InitrdError::from),
                    Err(e) => Err(InitrdError::Write(e)),
                }
            }
            Body::Symlink(target) => {
                header.file_size = target.len() as u32;
                cpio.append_bytes(&header, name, target).map_err(InitrdError::from)
            }
            Body::CharDevice { major, minor } | Body::BlockDevice { major, minor } => {
                header.rdev_major = *major;
                header.rdev_minor = *minor;
                cpio.append_bytes(&header, name, &[]).map_err(InitrdError::from)
            }
            // Directories, fifos, sockets, and the earlier names of a hard link.
            _ => cpio.append_bytes(&header, name, &[]).map_err(InitrdError::from),
        };
        report.entries += 1;
    });
    result?;
    let buffered = cpio.finish()?;
    let uncompressed = buffered.into_inner().map_err(|e| InitrdError::Write(e.into_error()))?;
    report.uncompressed_bytes = uncompressed.count;
    let mut compressed = uncompressed.inner.finish().map_err(InitrdError::Write)?;
    compressed.flush().map_err(InitrdError::Write)?;
    report.compressed_bytes = compressed.count;
    report.sha256 = hex::encode(compressed.hasher.take().expect("hashing").finalize());
    Ok(report)
}

/// newc sizes are 32-bit: refuse files of 4 GiB or more before any output.
fn check_file_sizes(plan: &Plan) -> Result<(), InitrdError> {
    if plan.totals().file_bytes <= MAX_FILE_SIZE {
        return Ok(());
    }
    let mut too_large = None;
    plan.walk_paths(|path, _, ino| match &plan.tree_inode(ino).body {
        Body::File(content) if content.len() > MAX_FILE_SIZE && too_large.is_none() => {
            too_large = Some(InitrdError::FileTooLarge { path: format!("/{}", String::from_utf8_lossy(path)), size: content.len() });
        }
        _ => {}
    });
    too_large.map_or(Ok(()), Err)
}

/// Warnings about an initrd too large for the guest it is meant for. The
/// kernel holds the compressed image and the unpacked tmpfs in RAM at once.
fn size_warnings(report: &InitrdReport, opts: &InitrdOptions) -> Vec<String> {
    let Some(mem) = opts.guest_mem else { return vec![] };
    let needed = report.uncompressed_bytes + report.compressed_bytes;
    if needed * 2 > mem {
        vec![format!(
            "the initrd needs about {} MiB of guest RAM while unpacking ({} MiB unpacked + {} MiB compressed), over half of the {} MiB guest; \
             give the guest more memory or build a disk image instead",
            needed >> 20,
            report.uncompressed_bytes >> 20,
            report.compressed_bytes >> 20,
            mem >> 20
        )]
    } else {
        vec![]
    }
}

impl InitrdOptions {
    pub fn new(kind: Compression) -> Self {
        InitrdOptions { compression: CompressOptions::new(kind), source_date_epoch: 0, guest_mem: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::RelPath;
    use std::fs::File;
    use std::process::{Command, Stdio};

    /// The archive of `tree` in memory (`write_archive` wants a `Send +
    /// 'static` sink, so the bytes are shared with it).
    fn archive_bytes(tree: &Tree, opts: &InitrdOptions) -> (Vec<u8>, InitrdReport) {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let report = write_archive(tree, Shared(buf.clone()), opts, &ProgressBar::hidden()).unwrap();
        let bytes = buf.lock().unwrap().clone();
        (bytes, report)
    }

    fn options() -> InitrdOptions {
        InitrdOptions { source_date_epoch: 1_000, ..InitrdOptions::new(Compression::None) }
    }

    #[test]
    fn files_of_4_gib_are_refused_before_any_output() {
        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big");
        // Sparse: costs no disk.
        File::create(&big).unwrap().set_len(MAX_FILE_SIZE + 1).unwrap();
        let mut tree = Tree::new();
        tree.add_host_path(&big, &RelPath::parse_user("/var/big.img").unwrap(), None, 0).unwrap();
        let out = tmp.path().join("initrd.cpio");
        let err = write_initrd(&tree, &out, &options(), &ProgressBar::hidden()).unwrap_err();
        assert!(matches!(&err, InitrdError::FileTooLarge { path, .. } if path == "/var/big.img"), "{err}");
        assert!(err.to_string().contains("disk image"), "the message suggests the way out: {err}");
        assert!(!out.exists());
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1, "no temporary file left");
    }

    #[test]
    fn hard_links_share_an_inode_and_carry_data_once() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("payload");
        std::fs::write(&src, b"shared bytes").unwrap();
        let mut tree = Tree::new();
        tree.add_host_path(&src, &RelPath::parse_user("/a/first").unwrap(), Some(0o640), 5_000).unwrap();
        // A second name for the same inode, as a layer's hard link would make.
        let first = tree.lookup(&RelPath::parse_user("a/first").unwrap()).unwrap();
        let a = tree.lookup(&RelPath::parse_user("a").unwrap()).unwrap();
        tree.dir_entries_mut(a).unwrap().insert(b"second".to_vec(), crate::rootfs::Dentry { inode: first, layer: 0 });
        let out = tmp.path().join("initrd.cpio");
        let report = write_initrd(&tree, &out, &options(), &ProgressBar::hidden()).unwrap();
        assert_eq!(report.entries, 4);

        // GNU cpio is the oracle: both names, link count 2, data on the last
        // name only, mtime clamped to SOURCE_DATE_EPOCH (1000: 1 January 1970).
        let listing = Command::new("cpio")
            .args(["-itvn", "--quiet", "-F"])
            .arg(&out)
            .env("TZ", "UTC")
            .stdout(Stdio::piped())
            .output()
            .unwrap();
        let text = String::from_utf8(listing.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        let first_line = lines.iter().find(|l| l.ends_with(" a/first")).unwrap();
        let second_line = lines.iter().find(|l| l.ends_with(" a/second")).unwrap();
        assert!(first_line.starts_with("-rw-r-----   2 0        0               0"), "{first_line}");
        assert!(second_line.starts_with("-rw-r-----   2 0        0              12"), "{second_line}");
        assert!(second_line.contains("Jan  1  1970"), "{second_line}");

        let dir = tmp.path().join("x");
        std::fs::create_dir(&dir).unwrap();
        let status = Command::new("cpio")
            .args(["-idm", "--quiet", "-F"])
            .arg(&out)
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        use std::os::unix::fs::MetadataExt;
        let m1 = std::fs::metadata(dir.join("a/first")).unwrap();
        let m2 = std::fs::metadata(dir.join("a/second")).unwrap();
        assert_eq!(m1.ino(), m2.ino());
        assert_eq!(m1.mtime(), 1_000, "mtime 5000 clamped to SOURCE_DATE_EPOCH");
        assert_eq!(std::fs::read(dir.join("a/first")).unwrap(), b"shared bytes");
    }

    #[test]
    fn same_tree_same_bytes_whatever_the_compression_threads() {
        let mut tree = Tree::new();
        for i in 0..200u32 {
            let data = format!("file {i} ").repeat(i as usize * 50).into_bytes();
            tree.add_bytes(&RelPath::parse_user(&format!("d{}/f{i}", i % 7)).unwrap(), data, 0o644, 10).unwrap();
        }
        let write = |kind, threads| {
            let opts = InitrdOptions {
                compression: CompressOptions { kind, level: None, threads },
                source_date_epoch: 1_000,
                guest_mem: None,
            };
            archive_bytes(&tree, &opts).0
        };
        for kind in [Compression::None, Compression::Gzip, Compression::Zstd] {
            assert_eq!(write(kind, 1), write(kind, 2), "{kind:?}");
        }
    }

    /// The archive of a fixed tree (hard links across directories, every
    /// kind, xattrs, mtimes above and below the clamp) has the digest the
    /// writer produced before it read the shared layout plan: moving the
    /// planning out of this module changed no byte.
    #[test]
    fn bytes_unchanged_by_the_layout_plan() {
        let mut tree = Tree::new();
        let p = |s: &str| RelPath::parse_user(s).unwrap();
        for i in 0..40u32 {
            let data = format!("{i}:").repeat(i as usize * 37).into_bytes();
            tree.add_bytes(&p(&format!("/d{}/s{}/f{i}", i % 5, i % 3)), data, 0o640 + (i % 8), 500 + i64::from(i) * 100).unwrap();
        }
        let f3 = tree.lookup(&p("d3/s0/f3")).unwrap();
        let d1 = tree.lookup(&p("d1")).unwrap();
        tree.dir_entries_mut(d1).unwrap().insert(b"hard".to_vec(), crate::rootfs::Dentry { inode: f3, layer: 0 });
        tree.inode_mut(f3).meta.xattrs.insert(b"security.capability".to_vec(), vec![1, 0, 0, 2]);
        let meta = || crate::rootfs::Metadata::new(0o644, 7, 8, 99);
        let root = crate::rootfs::InodeIdx::ROOT;
        tree.put(root, b"null", meta(), Body::CharDevice { major: 1, minor: 3 }, 0);
        tree.put(root, b"vda", meta(), Body::BlockDevice { major: 254, minor: 0 }, 0);
        tree.put(root, b"fifo", meta(), Body::Fifo, 0);
        tree.put(root, b"sock", meta(), Body::Socket, 0);
        tree.put(d1, b"lnk", meta(), Body::Symlink(b"../d3/s0/f3".to_vec()), 0);
        let (_, report) = archive_bytes(&tree, &options());
        assert_eq!(report.entries, 67);
        assert_eq!(report.sha256, "63d5125d48a72b9bc4ea7bc84a3477849748a4111c46c8b38a840d946a875986");
    }
}
