//! Writing a [`Tree`] as a kernel initramfs: cpio newc, optionally compressed.
//!
//! Reproducible by construction: entries in the tree's sorted order, inode
//! numbers from the layout plan (the walk's order) from 1, mtimes clamped to
//! SOURCE_DATE_EPOCH, hard links sharing an inode number with the data on the
//! last name (GNU cpio's convention, which the kernel also accepts). The
//! output is staged by [`crate::output`] and renamed into place only when
//! complete.
//!
//! An initrd for our init ends with a completion marker,
//! [`COMPLETION_MARKER`]: the kernel stops unpacking at the first error (a
//! tree larger than its rootfs tmpfs) and still starts `/init`, so the
//! marker's absence is how init tells a truncated tree from a whole one.

pub mod cpio;

use std::io::{self, BufWriter, Write};
use std::path::Path;

use indicatif::ProgressBar;
use sha2::{Digest as _, Sha256};

use crate::compress::{CompressOptions, Compression, Encoder};
use crate::output::Staged;
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
    #[error("the tree holds /{path}, which the initrd writer adds itself as the completion marker for the guest init; remove it (--remove /{path})")]
    MarkerInTree { path: &'static str },
}

/// Written as the archive's last entry when [`InitrdOptions::completion_marker`]
/// is set; osb-init (`init/src/boot.rs`, `INITRD_MARKER`) refuses an
/// initramfs root without it. Its content names the entries before it.
pub const COMPLETION_MARKER: &str = ".osb/initrd-complete";
const MARKER_DIR: &str = ".osb";

/// The guest's page size: tmpfs stores every file in whole pages.
const PAGE: u64 = 4096;
/// tmpfs keeps a symlink target in the inode up to this length (with its
/// NUL, the kernel's `SHORT_SYMLINK_LEN`); a longer one takes a page.
const SHORT_SYMLINK_LEN: u64 = 128;

#[derive(Clone, Debug)]
pub struct InitrdOptions {
    pub compression: CompressOptions,
    /// Upper bound for every mtime in the archive.
    pub source_date_epoch: i64,
    /// Memory of the guest this initrd is meant for, to warn about size.
    pub guest_mem: Option<u64>,
    /// End the archive with [`COMPLETION_MARKER`]: set for initrds holding
    /// our init (`--init`, `--agent-only`), which checks it; a plain initrd
    /// for another init carries nothing of ours.
    pub completion_marker: bool,
}

/// What was written, for the CLI and the build manifest.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct InitrdReport {
    pub entries: u64,
    pub uncompressed_bytes: u64,
    pub compressed_bytes: u64,
    /// What the unpacked tree takes in the kernel's rootfs (a tmpfs): every
    /// file's data in whole pages, once per inode, and a page per long symlink.
    pub tmpfs_bytes: u64,
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
pub fn write_archive<W: Write + Send + 'static>(tree: &Tree, out: W, opts: &InitrdOptions, progress: &ProgressBar) -> Result<InitrdReport, InitrdError> {
    let plan = Plan::new(tree)?;
    check_file_sizes(&plan)?;
    let marker_dir = if opts.completion_marker { Some(marker_needs_dir(tree)?) } else { None };
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
                report.tmpfs_bytes += content.len().div_ceil(PAGE) * PAGE;
                header.file_size = content.len() as u32;
                match tree.open_content(content) {
                    Ok(mut reader) => cpio.append(&header, name, &mut reader).map_err(InitrdError::from),
                    Err(e) => Err(InitrdError::Write(e)),
                }
            }
            Body::Symlink(target) => {
                if target.len() as u64 + 1 > SHORT_SYMLINK_LEN {
                    report.tmpfs_bytes += PAGE;
                }
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
    if let Some(with_dir) = marker_dir {
        // Plan numbers 0..n are cpio's 1..=n.
        append_marker(&mut cpio, with_dir, plan.inodes().len() as u32 + 1, &mut report, clamp(opts.source_date_epoch))?;
    }
    let buffered = cpio.finish()?;
    let uncompressed = buffered.into_inner().map_err(|e| InitrdError::Write(e.into_error()))?;
    report.uncompressed_bytes = uncompressed.count;
    let mut compressed = uncompressed.inner.finish().map_err(InitrdError::Write)?;
    compressed.flush().map_err(InitrdError::Write)?;
    report.compressed_bytes = compressed.count;
    report.sha256 = hex::encode(compressed.hasher.take().expect("hashing").finalize());
    Ok(report)
}

/// Whether the marker needs its directory written too (the tree has no
/// `.osb`); a tree that holds the marker or a non-directory `.osb` is refused.
fn marker_needs_dir(tree: &Tree) -> Result<bool, InitrdError> {
    let lookup = |p: &str| tree.lookup(&crate::rootfs::RelPath::parse_user(p).expect("valid path"));
    match lookup(MARKER_DIR) {
        None => Ok(true),
        Some(idx) if !matches!(tree.inode(idx).body, Body::Dir(_)) => Err(InitrdError::MarkerInTree { path: MARKER_DIR }),
        Some(_) if lookup(COMPLETION_MARKER).is_some() => Err(InitrdError::MarkerInTree { path: COMPLETION_MARKER }),
        Some(_) => Ok(false),
    }
}

/// Appends [`COMPLETION_MARKER`] (after its directory when `with_dir`)
/// behind every entry of the tree, numbered after the plan's inodes.
fn append_marker<W: Write>(cpio: &mut NewcWriter<W>, with_dir: bool, first_ino: u32, report: &mut InitrdReport, mtime: u32) -> Result<(), InitrdError> {
    let mut header = NewcHeader { ino: first_ino, mode: 0o040755, nlink: 2, mtime, ..NewcHeader::default() };
    if with_dir {
        cpio.append_bytes(&header, MARKER_DIR.as_bytes(), &[])?;
        report.entries += 1;
        header.ino += 1;
    }
    let content = format!("osbuilder initrd: complete after {} entries\n", report.entries);
    header = NewcHeader { mode: 0o100444, nlink: 1, file_size: content.len() as u32, ..header };
    cpio.append_bytes(&header, COMPLETION_MARKER.as_bytes(), content.as_bytes())?;
    report.entries += 1;
    report.tmpfs_bytes += PAGE;
    Ok(())
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

/// What the guest kernel keeps for itself before its rootfs is sized: a
/// fixed part (kernel image, early allocations) and a share of the RAM
/// (the page structs, 64 bytes per 4 KiB page, and per-zone reserves).
/// Measured on our kernel under QEMU microvm (the "Memory: ... available"
/// line and the rootfs's `size=`) at 256, 384 and 512 MiB: 19.2 MiB +
/// 1.71% of the RAM; rounded up here, so the estimate errs to the small side.
const KERNEL_FIXED: u64 = 20 << 20;
const KERNEL_RAM_SHARE: u64 = 56;

/// The kernel's initramfs rootfs is a tmpfs of half the RAM it has when it
/// mounts it (early in boot, while the compressed initrd is still held in
/// reserved memory): about this many bytes for a guest of `guest_mem`.
/// (With `root=` on the command line the rootfs is a ramfs without a limit.)
pub fn rootfs_limit(guest_mem: u64, compressed_bytes: u64) -> u64 {
    let reserved = KERNEL_FIXED + guest_mem / KERNEL_RAM_SHARE + compressed_bytes.div_ceil(PAGE) * PAGE;
    guest_mem.saturating_sub(reserved) / 2
}

/// The smallest guest whose rootfs holds `tmpfs_bytes` ([`rootfs_limit`] inverted).
fn guest_mem_needed(tmpfs_bytes: u64, compressed_bytes: u64) -> u64 {
    let fixed = 2 * tmpfs_bytes + KERNEL_FIXED + compressed_bytes.div_ceil(PAGE) * PAGE;
    (fixed * KERNEL_RAM_SHARE).div_ceil(KERNEL_RAM_SHARE - 1)
}

/// Warnings about an initrd too large for the guest it is meant for: a tree
/// over the rootfs limit is cut short by the kernel while unpacking.
fn size_warnings(report: &InitrdReport, opts: &InitrdOptions) -> Vec<String> {
    let Some(mem) = opts.guest_mem else { return vec![] };
    let mib = |b: u64| b >> 20;
    let limit = rootfs_limit(mem, report.compressed_bytes);
    let mut warnings = Vec::new();
    if report.tmpfs_bytes > limit {
        warnings.push(format!(
            "the unpacked tree takes about {} MiB in the guest's rootfs (files in whole 4 KiB pages), over the rootfs limit of about {} MiB \
             in a {} MiB guest (a tmpfs of half the guest RAM left after the kernel and the {} MiB compressed initrd): the kernel would stop \
             unpacking; give the guest at least {} MiB or build a disk image instead",
            mib(report.tmpfs_bytes),
            mib(limit),
            mib(mem),
            mib(report.compressed_bytes),
            mib(guest_mem_needed(report.tmpfs_bytes, report.compressed_bytes)) + 1,
        ));
    }
    // tmpfs allows one inode per page of its size.
    let max_inodes = limit / PAGE;
    if report.entries > max_inodes {
        warnings.push(format!(
            "the initrd has {} entries, over the about {max_inodes} inodes the rootfs of a {} MiB guest allows (one per 4 KiB page of it): \
             give the guest more memory or build a disk image instead",
            report.entries,
            mib(mem)
        ));
    }
    warnings
}

impl InitrdOptions {
    pub fn new(kind: Compression) -> Self {
        InitrdOptions { compression: CompressOptions::new(kind), source_date_epoch: 0, guest_mem: None, completion_marker: false }
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
        let listing = Command::new("cpio").args(["-itvn", "--quiet", "-F"]).arg(&out).env("TZ", "UTC").stdout(Stdio::piped()).output().unwrap();
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
        let status = Command::new("cpio").args(["-idm", "--quiet", "-F"]).arg(&out).current_dir(&dir).status().unwrap();
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
                completion_marker: true,
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

    fn cpio_names(archive: &Path) -> Vec<String> {
        let out = Command::new("cpio").args(["-it", "--quiet", "-F"]).arg(archive).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(str::to_owned).collect()
    }

    fn cpio_extract(archive: &Path, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("cpio").args(["-idm", "--quiet", "-F"]).arg(archive).current_dir(dir).status().unwrap();
        assert!(status.success());
    }

    /// With `completion_marker`, the archive ends with `.osb` (when the tree
    /// has none) and `.osb/initrd-complete`, naming the entries before it;
    /// GNU cpio is the oracle for the order and the bytes.
    #[test]
    fn the_completion_marker_is_the_last_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |s: &str| RelPath::parse_user(s).unwrap();
        let marked = InitrdOptions { completion_marker: true, ..options() };
        let mut tree = Tree::new();
        tree.add_bytes(&p("/init"), b"#!/bin/sh\n".to_vec(), 0o755, 0).unwrap();
        tree.add_bytes(&p("/zz/last"), b"z".to_vec(), 0o644, 0).unwrap();

        let out = tmp.path().join("plain.cpio");
        let report = write_initrd(&tree, &out, &options(), &ProgressBar::hidden()).unwrap();
        assert_eq!(cpio_names(&out), [".", "init", "zz", "zz/last"], "no marker unless asked for");
        assert_eq!(report.entries, 4);

        let out = tmp.path().join("marked.cpio");
        let report = write_initrd(&tree, &out, &marked, &ProgressBar::hidden()).unwrap();
        assert_eq!(cpio_names(&out), [".", "init", "zz", "zz/last", ".osb", ".osb/initrd-complete"]);
        assert_eq!(report.entries, 6);
        cpio_extract(&out, &tmp.path().join("x"));
        let marker = tmp.path().join("x").join(COMPLETION_MARKER);
        assert_eq!(std::fs::read_to_string(&marker).unwrap(), "osbuilder initrd: complete after 5 entries\n");
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::symlink_metadata(&marker).unwrap();
        assert_eq!((meta.mode() & 0o7777, meta.nlink(), meta.mtime()), (0o444, 1, 1_000), "its own inode, mtime at the epoch");

        // A tree with its own /.osb (a directory) gets only the file.
        tree.add_bytes(&p("/.osb/lower/keep"), Vec::new(), 0o644, 0).unwrap();
        let out = tmp.path().join("osb-dir.cpio");
        write_initrd(&tree, &out, &marked, &ProgressBar::hidden()).unwrap();
        let names = cpio_names(&out);
        assert_eq!(names.iter().filter(|n| *n == ".osb").count(), 1, "{names:?}");
        assert_eq!(names.last().unwrap(), ".osb/initrd-complete", "{names:?}");

        // A tree holding the marker, or a /.osb that is no directory, is refused before any output.
        for (path, named) in [("/.osb/initrd-complete", "/.osb/initrd-complete"), ("/.osb", "/.osb")] {
            let mut tree = Tree::new();
            tree.add_bytes(&p(path), b"x".to_vec(), 0o644, 0).unwrap();
            let out = tmp.path().join("refused.cpio");
            let err = write_initrd(&tree, &out, &marked, &ProgressBar::hidden()).unwrap_err().to_string();
            assert!(err.contains(&format!("the tree holds {named}, ")), "{err}");
            assert!(!out.exists());
        }
    }

    /// `tmpfs_bytes` is what a real tmpfs holds once the archive is unpacked
    /// into it: the host kernel's tmpfs, mounted in a user and mount
    /// namespace of its own (`unshare -rm`, no root needed), filled by GNU
    /// cpio and measured by statfs.
    #[test]
    fn tmpfs_bytes_is_what_a_tmpfs_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let p = |s: &str| RelPath::parse_user(s).unwrap();
        let mut tree = Tree::new();
        for (i, len) in [0usize, 1, 4095, 4096, 4097, 3 * 4096 + 5, 70_000].into_iter().enumerate() {
            tree.add_bytes(&p(&format!("/d{}/f{i}", i % 2)), vec![b'x'; len], 0o644, 0).unwrap();
        }
        let f4 = tree.lookup(&p("d0/f4")).unwrap();
        let d1 = tree.lookup(&p("d1")).unwrap();
        tree.dir_entries_mut(d1).unwrap().insert(b"hard".to_vec(), crate::rootfs::Dentry { inode: f4, layer: 0 });
        let meta = || crate::rootfs::Metadata::new(0o777, 0, 0, 0);
        tree.put(d1, b"short", meta(), Body::Symlink(vec![b'a'; 127]), 0);
        tree.put(d1, b"long", meta(), Body::Symlink(vec![b'b'; 128]), 0);
        tree.put(d1, b"fifo", crate::rootfs::Metadata::new(0o644, 0, 0, 0), Body::Fifo, 0);
        let archive = tmp.path().join("t.cpio");
        let opts = InitrdOptions { completion_marker: true, ..options() };
        let report = write_initrd(&tree, &archive, &opts, &ProgressBar::hidden()).unwrap();
        // Pages: 0+1+1+1+2+4+18 for the files (the hard link once), one for
        // the long symlink, one for the marker.
        assert_eq!(report.tmpfs_bytes, 29 * PAGE);

        let mnt = tmp.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let script = r#"mount -t tmpfs -o size=16m osb-test "$1" && cd "$1" && cpio -idm --quiet -F "$2" && stat -f -c '%b %f %S' ."#;
        let out = Command::new("unshare").args(["-rm", "sh", "-c", script, "sh"]).arg(&mnt).arg(&archive).output().unwrap();
        assert!(
            out.status.success(),
            "unshare -rm (a user namespace, to mount a tmpfs) failed; this test needs unprivileged user namespaces: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fields: Vec<u64> = String::from_utf8(out.stdout).unwrap().split_whitespace().map(|f| f.parse().unwrap()).collect();
        let used = (fields[0] - fields[1]) * fields[2];
        assert_eq!(report.tmpfs_bytes, used, "tmpfs holds {used} bytes");
    }

    /// [`rootfs_limit`] against what our kernel gave its rootfs under QEMU
    /// microvm (`size=` in /proc/mounts) with the Debian base image's zstd
    /// initrd (41,090,181 bytes): never above it, at most 1 MiB below.
    #[test]
    fn rootfs_limit_follows_the_kernel() {
        for (mem_mib, size_kib) in [(256u64, 98_928u64), (384, 163_248), (512, 227_760)] {
            let real = size_kib << 10;
            let estimate = rootfs_limit(mem_mib << 20, 41_090_181);
            assert!(estimate <= real && real - estimate <= 1 << 20, "{mem_mib} MiB: estimate {estimate}, kernel {real}");
            let needed = guest_mem_needed(real, 41_090_181);
            assert!(rootfs_limit(needed, 41_090_181) >= real && needed <= (mem_mib + 2) << 20, "{mem_mib} MiB: needed {needed}");
        }
        assert_eq!(rootfs_limit(16 << 20, 1 << 20), 0, "a guest smaller than the kernel's share has no room");
    }

    #[test]
    fn size_warnings_name_the_rootfs_limit() {
        let report = InitrdReport { entries: 6_675, tmpfs_bytes: 128_304 << 10, compressed_bytes: 41_090_181, ..InitrdReport::default() };
        let warn = |mem: u64| size_warnings(&report, &InitrdOptions { guest_mem: Some(mem << 20), ..options() });
        let w = warn(256);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("the unpacked tree takes about 125 MiB in the guest's rootfs"), "{}", w[0]);
        assert!(w[0].contains("over the rootfs limit of about 96 MiB in a 256 MiB guest"), "{}", w[0]);
        let needed: u64 = w[0].split("at least ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        assert!(warn(needed).is_empty() && !warn(needed - 2).is_empty(), "{needed} MiB is just enough");
        assert!(warn(384).is_empty(), "the 384 MiB guest unpacked it all");
        let many = InitrdReport { entries: 40_000, tmpfs_bytes: 4096, ..report };
        let w = size_warnings(&many, &InitrdOptions { guest_mem: Some(256 << 20), ..options() });
        assert!(w.len() == 1 && w[0].contains("40000 entries, over the about 24"), "{w:?}");
    }
}
