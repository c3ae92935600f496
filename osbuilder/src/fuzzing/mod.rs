//! Entry points of the fuzz targets in `fuzz/` (cargo-fuzz, libFuzzer), one
//! function a target, and their replay in `cargo test`.
//!
//! Each function takes the fuzzer's bytes and drives public APIs the way the
//! pipeline does. Bad input must end in an `Err` somewhere inside; a panic, a
//! hang or an allocation past libFuzzer's limit is a defect. Where a target has
//! an oracle (the cpio round trip, e2fsck, fsck.erofs), a disagreement panics.
//!
//! The module exists only in test builds and in builds with `--cfg fuzzing`
//! (what cargo-fuzz passes): the release binary carries none of it. The unit
//! test at the bottom runs every committed corpus and regression input
//! (`fuzz/corpus/<target>/`, `fuzz/regressions/<target>/`) through the same
//! functions, so a crash the fuzzer found stays fixed without the fuzzer.

mod newc;
mod treegen;

use std::io::Cursor;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::disk::{erofs, ext4, SeekSink, Sink};
use crate::initrd::{self, InitrdOptions};
use crate::oci::digest::Digest;
use crate::oci::manifest::{ImageConfig, ManifestDoc, Platform};
use crate::oci::{Image, ImageRef, PullOptions};
use crate::progress::Progress;
use crate::rootfs::{Body, Plan, Tree};
use crate::rootfs::{Intake, Limits};
use indicatif::ProgressBar;

/// Decompressed layer bytes read at most: a few KiB of zstd can claim
/// gigabytes, which would measure the disk, not the parser.
const MAX_LAYER_BYTES: u64 = 64 << 20;

/// The intake limits of every target: the defaults scaled to what a fuzz
/// input can hold, so a refusal by limit is reached (and exercised) long
/// before libFuzzer's RSS limit.
pub(crate) fn intake() -> Intake {
    let limits = Limits {
        max_spool_bytes: MAX_LAYER_BYTES,
        max_entries: 100_000,
        max_metadata_bytes: 16 << 20,
        max_path_depth: 256,
        max_header_bytes: 1 << 20,
        ..Limits::default()
    };
    Intake { limits, spool_dir: None }
}

/// Target `layer`: the bytes as a layer blob (plain, gzip or zstd, sniffed as
/// `Image::apply_layers` does), applied twice onto one tree (as layers 0 and 1,
/// so whiteouts and replacements meet a lower layer), then planned, walked and
/// every file read back.
pub fn layer(data: &[u8]) {
    let mut tree = Tree::new();
    for index in 0..2 {
        let Ok(decoded) = crate::oci::decompress(Cursor::new(data.to_vec())) else { return };
        let bounded = std::io::Read::take(decoded, MAX_LAYER_BYTES);
        if tree.apply_layer(bounded, index, &intake()).is_err() {
            return;
        }
    }
    let Ok(plan) = Plan::new(&tree) else { return };
    let totals = plan.totals();
    let mut names = 0u64;
    let mut file_bytes = 0u64;
    plan.walk_paths(|path, seq, ino| {
        names += u64::from(!path.is_empty());
        let inode = plan.tree_inode(ino);
        if let Body::File(content) = &inode.body {
            if plan.inode(ino).last_name == seq {
                file_bytes += content.len();
                read_all(&tree, content);
            }
        }
    });
    assert_eq!(names, totals.names, "the walk visits every name once");
    assert_eq!(file_bytes, totals.file_bytes, "the totals count each file's bytes once");
}

fn read_all(tree: &Tree, content: &crate::rootfs::Content) {
    let mut reader = tree.open_content(content).expect("a spooled file opens");
    let n = std::io::copy(&mut reader, &mut std::io::sink()).expect("a spooled file reads");
    assert_eq!(n, content.len(), "a file reads back at its length");
    let runs = tree.data_runs(content, 4096).expect("data runs of a spooled file");
    assert!(runs.iter().all(|&(start, len)| len > 0 && start + len <= content.len().div_ceil(4096) * 4096), "{runs:?}");
}

/// Target `oci_manifest`: an OCI image layout made from the bytes, opened with
/// `Image::open` and its one layer applied. The input is up to four parts
/// separated by NUL bytes: `index.json`, the manifest blob, the config blob,
/// the layer blob. In the JSON parts `@M@`, `@MS@`, `@C@`, `@CS@`, `@L@`, `@LS@`
/// become the digest and size of the manifest, config and layer, so the
/// fuzzer can reach past digest verification.
pub fn oci_manifest(data: &[u8]) {
    let mut parts = data.splitn(4, |&b| b == 0);
    let index = parts.next().unwrap_or_default();
    let manifest = parts.next().unwrap_or_default();
    let config = parts.next().unwrap_or_default();
    let layer = parts.next().unwrap_or_default();

    // The documents on their own, as every source parses them.
    for doc in [index, manifest] {
        if let Ok(ManifestDoc::Index(ix)) = ManifestDoc::parse(doc, "fuzz") {
            let _ = ix.select(&Platform::linux_amd64());
        }
    }
    if let Ok(c) = ImageConfig::parse(config, "fuzz") {
        let _ = c.created_epoch();
        let _ = c.platform().to_string();
    }
    if let Ok(text) = std::str::from_utf8(index) {
        let _ = Platform::parse(text);
        let _ = crate::oci::manifest::parse_rfc3339(text);
        let _ = text.parse::<Digest>();
        let _ = text.parse::<ImageRef>();
    }

    let dir = tempfile::tempdir().expect("a temporary directory");
    let blobs = dir.path().join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("blobs/sha256");
    let put = |bytes: &[u8]| {
        let digest = Digest::of_bytes(bytes);
        std::fs::write(blobs.join(digest.hex()), bytes).expect("write a blob");
        (digest.to_string(), bytes.len().to_string())
    };
    let (l, ls) = put(layer);
    let config = substitute(config, &[("@L@", &l), ("@LS@", &ls)]);
    let (c, cs) = put(&config);
    let vars = [("@L@", l.as_str()), ("@LS@", ls.as_str()), ("@C@", &c), ("@CS@", &cs)];
    let manifest = substitute(manifest, &vars);
    let (m, ms) = put(&manifest);
    let index = substitute(index, &[("@M@", &m), ("@MS@", &ms), ("@C@", &c), ("@CS@", &cs)]);
    std::fs::write(dir.path().join("index.json"), &index).expect("write index.json");

    let reference = ImageRef::Layout { dir: dir.path().to_path_buf(), reference: None };
    let progress = Progress::hidden();
    let Ok(image) = Image::open(&reference, &PullOptions::default(), &progress) else { return };
    let _ = image.platform().to_string();
    let _ = image.config.created_epoch();
    let mut tree = Tree::new();
    let _ = image.apply_layers(&mut tree, &intake(), 1, &progress);
}

fn substitute(doc: &[u8], vars: &[(&str, &str)]) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(doc).into_owned();
    // Longest names first: `@LS@` is not `@L@` followed by `S@`.
    let mut vars = vars.to_vec();
    vars.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in vars {
        text = text.replace(name, value);
    }
    if std::str::from_utf8(doc).is_ok() {
        text.into_bytes()
    } else {
        doc.to_vec() // keep invalid UTF-8 as it came: the parsers must refuse it
    }
}

/// Target `cpio`: a tree decoded from the bytes, written by
/// `initrd::write_archive` uncompressed, read back with a separate newc
/// reader ([`newc`]) and compared entry by entry with the plan.
pub fn cpio_round_trip(data: &[u8]) {
    let Some(tree) = treegen::tree(data) else { return };
    let Ok(plan) = Plan::new(&tree) else { return };
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let opts = InitrdOptions { source_date_epoch: 1_700_000_000, ..InitrdOptions::new(crate::compress::Compression::None) };
    if initrd::write_archive(&tree, SharedBuf(buf.clone()), &opts, &ProgressBar::hidden()).is_err() {
        return;
    }
    let bytes = std::mem::take(&mut *buf.lock().expect("buffer"));
    let entries = newc::read(&bytes).unwrap_or_else(|e| panic!("our archive does not read back: {e}"));
    newc::check_against_plan(&entries, &plan, opts.source_date_epoch);
}

struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("buffer").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How often [`disk`] asks the external checkers when `fsck` is `Every`.
static DISK_RUNS: AtomicU64 = AtomicU64::new(0);

/// When [`disk`] runs e2fsck and fsck.erofs on what it wrote.
#[derive(Clone, Copy, Debug)]
pub enum Fsck {
    Always,
    /// Every Nth call (the checkers cost milliseconds, the writers microseconds).
    Every(u64),
}

/// Target `disk`: a tree decoded from the bytes, written as ext4 and as erofs
/// (options from the first byte) into temporary files; `e2fsck -fn` and
/// `fsck.erofs --extract` judge the images (see [`Fsck`]) and the extracted
/// erofs files must hold the tree's bytes.
pub fn disk(data: &[u8], fsck: Fsck) {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some(tree) = treegen::tree(rest) else { return };
    let Ok(plan) = Plan::new(&tree) else { return };
    let check = match fsck {
        Fsck::Always => true,
        Fsck::Every(n) => DISK_RUNS.fetch_add(1, Ordering::Relaxed).is_multiple_of(n.max(1)),
    };
    let dir = tempfile::tempdir().expect("a temporary directory");

    let ext4_opts = ext4::Ext4Options {
        size: match flags & 3 {
            0 => ext4::Ext4Size::Auto { headroom: ext4::Headroom::Bytes(0) },
            1 => ext4::Ext4Size::Auto { headroom: ext4::Headroom::Percent(u32::from(flags >> 4)) },
            2 => ext4::Ext4Size::Fixed(u64::from(flags >> 2) << 16),
            _ => ext4::Ext4Size::Auto { headroom: ext4::Headroom::Bytes(1 << 20) },
        },
        reserved_percent: 5.0,
        source_date_epoch: 1_700_000_000,
        seed: [flags; 32],
        label: Some("fuzz".into()),
        journal: flags & 4 != 0,
    };
    if let Ok(layout) = ext4::layout(&plan, &ext4_opts) {
        let image = dir.path().join("ext4.img");
        write_image(&image, layout.size_bytes(), |sink| layout.write(&plan, sink).map_err(|e| e.to_string()));
        if check {
            e2fsck(&image);
        }
    }

    let erofs_opts = erofs::ErofsOptions {
        compression: match (flags >> 3) & 3 {
            0 | 3 => erofs::Compression::None,
            1 => erofs::Compression::Lz4,
            _ => erofs::Compression::Lz4hc,
        },
        inline_data: flags & 0x20 == 0,
        size: None,
        source_date_epoch: 1_700_000_000,
        seed: [flags; 32],
        label: Some("fuzz".into()),
    };
    if let Ok(layout) = erofs::layout(&plan, &erofs_opts) {
        let image = dir.path().join("erofs.img");
        write_image(&image, layout.size_bytes(), |sink| layout.write(&plan, sink).map_err(|e| e.to_string()));
        if check {
            fsck_erofs(&image, &tree, &plan, dir.path());
        }
    }
}

/// Writes an image the writer laid out; a layout it then cannot write is a defect.
fn write_image(path: &Path, size: u64, write: impl FnOnce(&mut dyn Sink) -> Result<(), String>) {
    let file = std::fs::File::create(path).expect("create an image file");
    let mut sink = SeekSink::at(file.try_clone().expect("clone"), 0).expect("a sink");
    if let Err(e) = write(&mut sink) {
        panic!("the writer failed on a tree its layout accepted: {e}");
    }
    assert_eq!(sink.position(), size, "the writer ends where its layout said");
    file.set_len(size).expect("set the image length");
}

fn e2fsck(image: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(image).output().expect("e2fsck runs (e2fsprogs)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let expected = ["Pass 1", "Pass 2", "Pass 3", "Pass 4", "Pass 5", "files (", "e2fsck 1."];
    let odd: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty() && !expected.iter().any(|e| l.contains(e))).collect();
    assert!(out.status.success() && odd.is_empty(), "e2fsck -fn {} ({}):\n{text}", image.display(), out.status);
}

fn fsck_erofs(image: &Path, tree: &Tree, plan: &Plan, dir: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let target = dir.join("x");
    let out = Command::new("fsck.erofs").arg(format!("--extract={}", target.display())).arg(image).output().expect("fsck.erofs runs (erofs-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !text.contains("<E>"), "fsck.erofs {} ({}):\n{text}", image.display(), out.status);
    plan.walk_paths(|path, _, ino| {
        if let Body::File(content) = &plan.tree_inode(ino).body {
            let host = target.join(std::ffi::OsStr::from_bytes(path));
            let got = std::fs::read(&host).unwrap_or_else(|e| panic!("fsck.erofs did not extract {}: {e}", host.display()));
            let mut want = Vec::new();
            std::io::Read::read_to_end(&mut tree.open_content(content).expect("open"), &mut want).expect("read");
            assert!(got == want, "/{} extracted from erofs differs from the tree", String::from_utf8_lossy(path));
        }
    });
}

/// Target `kernel_fragment`: the bytes as a Kconfig fragment, merged with
/// itself and with a fragment of the same names, written as an allconfig and
/// read back as a `.config`.
pub fn kernel_fragment(data: &[u8]) {
    use crate::kernel::config::{parse_dotconfig, parse_fragment, Merged};
    let text = String::from_utf8_lossy(data);
    let _ = parse_dotconfig(&text);
    let Ok(requests) = parse_fragment(&text, "fuzz.conf") else { return };
    let Ok(merged) = Merged::new(requests.iter().cloned().chain(requests.iter().cloned())) else {
        // A fragment that contradicts itself is an error; merging it twice must agree.
        assert!(Merged::new(requests).is_err(), "merging a fragment with itself fails only if it fails alone");
        return;
    };
    let allconfig = merged.to_allconfig();
    let reread = parse_fragment(&allconfig, "allconfig").unwrap_or_else(|e| panic!("our allconfig does not parse: {e}\n{allconfig}"));
    let again = Merged::new(reread).expect("one request per name");
    assert_eq!(again.requests.len(), merged.requests.len(), "{allconfig}");
    for (name, r) in &merged.requests {
        assert_eq!(again.requests.get(name).map(|a| &a.value), Some(&r.value), "{name} in\n{allconfig}");
    }
    let dot = parse_dotconfig(&allconfig);
    assert_eq!(dot.len(), merged.requests.len());
}

#[cfg(test)]
mod tests;
