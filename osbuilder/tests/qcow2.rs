//! `osbuilder disk --format qcow2`, checked by QEMU's own tool: `qemu-img
//! check` (refcounts, tables), `qemu-img info` (version, cluster size) and
//! `qemu-img compare` against the raw image of the same build (QEMU reads
//! and inflates every cluster). The boot through virtio-blk is in
//! `guest_qcow2.rs`.

mod common;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use osbuilder::disk::qcow2::{Qcow2Options, Qcow2Writer};
use osbuilder::disk::Sink;
use serde_json::Value;

use common::*;

const MIB: u64 = 1 << 20;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-qcow2-it-").tempdir().unwrap()
}

/// A blob cache shared by this file's tests (the layers are read once).
fn shared_cache() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-qcow2-cache-").tempdir().unwrap().keep())
}

fn debian_image() -> String {
    oci_ref(&debian_layout(), DEBIAN_TAG)
}

/// `osbuilder disk` of the Debian image into `dir/name` with a report.
fn build(dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, Value) {
    let img = dir.join(name);
    let report = dir.join(format!("{name}.json"));
    let image = debian_image();
    let mut args = vec!["disk", "--image", &image, "-o", path_str(&img), "--report", path_str(&report)];
    args.extend_from_slice(extra);
    build_ok(&args, shared_cache());
    let json: Value = serde_json::from_slice(&fs::read(&report).unwrap()).expect("report is JSON");
    (img, json)
}

fn qemu_img_json(args: &[&str], file: &Path) -> Value {
    let out = tool("qemu-img").args(args).arg("--output=json").arg(file).output().expect("run qemu-img");
    assert!(out.status.success(), "qemu-img {args:?} {}: {}{}", file.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("qemu-img {args:?} JSON: {e}"))
}

/// `qemu-img check`: no errors, no leaks, nothing corrupt; returns its JSON.
fn assert_check_clean(qcow2: &Path) -> Value {
    let check = qemu_img_json(&["check", "-f", "qcow2"], qcow2);
    for key in ["check-errors", "corruptions", "leaks"] {
        assert_eq!(check.get(key).and_then(Value::as_u64).unwrap_or(0), 0, "qemu-img check {key}: {check}");
    }
    assert!(check.get("corruptions-fixed").is_none() && check.get("leaks-fixed").is_none(), "{check}");
    check
}

/// `qemu-img compare` of the raw and the qcow2 image: identical content.
fn assert_same_content(raw: &Path, qcow2: &Path) {
    let out = tool("qemu-img").args(["compare", "-f", "raw", "-F", "qcow2"]).arg(raw).arg(qcow2).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img compare {} {}: {}{}",
        raw.display(),
        qcow2.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Images are identical"), "{}", String::from_utf8_lossy(&out.stdout));
}

fn assert_info(qcow2: &Path, virtual_size: u64) -> Value {
    let info = qemu_img_json(&["info", "-f", "qcow2"], qcow2);
    assert_eq!(info["format"], "qcow2", "{info}");
    assert_eq!(info["cluster-size"], 65536, "{info}");
    assert_eq!(info["virtual-size"].as_u64(), Some(virtual_size), "{info}");
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1", "version 3: {info}");
    assert_eq!(info["format-specific"]["data"]["refcount-bits"], 16, "{info}");
    assert_eq!(info["format-specific"]["data"]["lazy-refcounts"], false, "{info}");
    assert!(info.get("backing-filename").is_none(), "no backing file: {info}");
    info
}

/// The Debian image raw, as qcow2 (twice) and as compressed qcow2 (twice):
/// QEMU finds every qcow2 consistent and identical to the raw image, the
/// reports agree on the raw digest, and rebuilds are byte-identical.
#[test]
fn debian_qcow2_matches_the_raw_build() {
    let tmp = scratch();
    let (raw, raw_report) = build(tmp.path(), "raw.img", &[]);
    let (q, q_report) = build(tmp.path(), "disk.qcow2", &["--format", "qcow2"]);
    let (q2, _) = build(tmp.path(), "again.qcow2", &["--format", "qcow2"]);
    let (c, c_report) = build(tmp.path(), "small.qcow2", &["--format", "qcow2", "--qcow2-compress"]);
    let (c2, _) = build(tmp.path(), "small-again.qcow2", &["--format", "qcow2", "--qcow2-compress"]);

    let rd = &raw_report["disk"];
    assert_eq!(rd["format"], "raw");
    assert_eq!(rd["sha256"], rd["raw_sha256"], "for a raw image the two digests are one");
    assert_eq!(rd["sha256"].as_str().unwrap(), sha256_file(&raw));
    assert!(rd.get("qcow2").is_none(), "{rd}");
    let size = rd["bytes"].as_u64().unwrap();

    for (file, report, again, compressed) in [(&q, &q_report, &q2, false), (&c, &c_report, &c2, true)] {
        let d = &report["disk"];
        assert_eq!(d["format"], "qcow2");
        assert_eq!(d["raw_sha256"], rd["sha256"], "same disk content as the raw build");
        assert_eq!(d["bytes"].as_u64(), Some(size), "the virtual size is the raw size");
        assert_eq!(d["sha256"].as_str().unwrap(), sha256_file(file), "sha256 is the file's");
        assert_eq!(d["file_bytes"].as_u64(), Some(fs::metadata(file).unwrap().len()));
        assert_eq!(d["partition"], rd["partition"]);
        assert_eq!(d["cmdline"], rd["cmdline"]);
        assert_eq!(sha256_file(again), sha256_file(file), "two builds give the same bytes");

        assert_info(file, size);
        let check = assert_check_clean(file);
        let q2 = &d["qcow2"];
        assert_eq!(check["allocated-clusters"].as_u64(), q2["allocated_clusters"].as_u64(), "{check} {q2}");
        if compressed {
            assert_eq!(check["compressed-clusters"].as_u64(), q2["compressed_clusters"].as_u64(), "{check} {q2}");
        }
        assert_same_content(&raw, file);
        // Our reader (what `vm boot` uses to recognise the layout) agrees.
        assert_eq!(osbuilder::disk::image::probe(file).unwrap(), osbuilder::disk::image::probe(&raw).unwrap());
    }

    let q_bytes = fs::metadata(&q).unwrap().len();
    let c_bytes = fs::metadata(&c).unwrap().len();
    let compressed = c_report["disk"]["qcow2"]["compressed_clusters"].as_u64().unwrap();
    assert!(compressed > 0 && q_report["disk"]["qcow2"]["compressed_clusters"] == 0);
    assert!(c_bytes * 10 < q_bytes * 7, "compression must pay on a Debian root: {c_bytes} vs {q_bytes}");
    // Only data is stored: the qcow2 is no bigger than the raw file's allocated blocks plus metadata.
    let raw_allocated = fs::metadata(&raw).unwrap().blocks() * 512;
    assert!(q_bytes <= raw_allocated + 4 * MIB, "qcow2 {q_bytes} vs raw allocated {raw_allocated}");
    eprintln!("raw {size} bytes ({raw_allocated} allocated), qcow2 {q_bytes}, compressed {c_bytes} ({compressed} compressed clusters)");
}

/// A fixed 5 GiB disk: the qcow2 file holds the data only, QEMU agrees.
#[test]
fn sparse_five_gib_disk_costs_only_its_data() {
    let tmp = scratch();
    let (raw, raw_report) = build(tmp.path(), "big.img", &["--size", "5G", "--table", "gpt"]);
    let (q, q_report) = build(tmp.path(), "big.qcow2", &["--size", "5G", "--table", "gpt", "--format", "qcow2"]);
    let size = raw_report["disk"]["bytes"].as_u64().unwrap();
    assert!(size > 5 << 30, "{size}");
    assert_eq!(q_report["disk"]["raw_sha256"], raw_report["disk"]["sha256"]);
    let q_bytes = fs::metadata(&q).unwrap().len();
    assert!(q_bytes < 1 << 30, "a sparse 5 GiB disk must not cost 5 GiB: {q_bytes}");
    assert!(fs::metadata(&q).unwrap().blocks() * 512 <= q_bytes + MIB);
    let zero = q_report["disk"]["qcow2"]["zero_clusters"].as_u64().unwrap();
    assert!(zero * 65536 > 4 << 30, "most of the disk is unallocated: {zero} zero clusters");
    assert_info(&q, size);
    assert_check_clean(&q);
    assert_same_content(&raw, &q);
}

/// Bad combinations fail with a clear message, before anything is written.
#[test]
fn bad_combinations_are_refused_and_leave_nothing() {
    let tmp = scratch();
    let image = debian_image();
    let out = tmp.path().join("x.qcow2");
    let o = path_str(&out);
    let cases: &[(&[&str], &str)] = &[
        (&["--qcow2-compress"], "--qcow2-compress needs --format qcow2"),
        (&["--format", "raw", "--qcow2-compress"], "--qcow2-compress needs --format qcow2"),
        (&["--format", "qcow2", "--dax"], "must be raw"),
        (&["--format", "vmdk"], "invalid value 'vmdk'"),
        (&["--format", "qcow2", "--size", "8M"], "needs at least"),
    ];
    for (extra, want) in cases {
        let mut args = vec!["disk", "--image", &image, "-o", o];
        args.extend_from_slice(extra);
        let err = build_err(&args, shared_cache());
        assert!(err.contains(want), "{extra:?}: expected {want:?} in:\n{err}");
        let left: Vec<_> = fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{extra:?} left {left:?}");
    }
}

/// A pseudo-random byte stream (xorshift), for incompressible data.
fn noise(seed: u32, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The writer on its own, over every edge QEMU could disagree with: data
/// across the 512 MiB boundary of one L2 table, compressible and
/// incompressible clusters side by side, clusters that are zero but
/// written, a last partial cluster; checked and compared by qemu-img, with
/// and without compression.
#[test]
fn writer_edges_pass_qemu_img() {
    let tmp = scratch();
    let size: u64 = 513 * MIB + 12 * 1024;
    let text: Vec<u8> = (0..300_000u32).flat_map(|i| format!("line {} of a compressible file\n", i % 977).into_bytes()).collect();
    let regions: Vec<(u64, Vec<u8>)> = vec![
        (0, text[..200_000].to_vec()),
        (200_000, noise(1, 70_000)),
        (MIB + 100, vec![0u8; 3 * 65536]), // written zeros: still unallocated
        (2 * MIB + 7, noise(2, 65536 * 2 + 1)),
        (2 * MIB + 7 + 65536 * 2 + 1, text[..100_000].to_vec()),
        (512 * MIB - 30 * 1024, noise(3, 70 * 1024)),
        (size - 4096, text[..4096].to_vec()),
    ];
    let raw_path = tmp.path().join("edges.raw");
    let mut raw = fs::File::create(&raw_path).unwrap();
    for (at, bytes) in &regions {
        raw.seek(SeekFrom::Start(*at)).unwrap();
        raw.write_all(bytes).unwrap();
    }
    raw.set_len(size).unwrap();
    for compress in [false, true] {
        let path = tmp.path().join(format!("edges-{compress}.qcow2"));
        let file = fs::File::create(&path).unwrap();
        let mut w = Qcow2Writer::new(file, size, Qcow2Options { compress, threads: 2 }).unwrap();
        for (at, bytes) in &regions {
            w.zeros(at - w.position()).unwrap();
            // Odd-sized writes, so clusters fill from pieces.
            for piece in bytes.chunks(10_007) {
                w.write_all(piece).unwrap();
            }
        }
        let (_, summary) = w.finish().unwrap();
        assert_eq!(summary.file_bytes, fs::metadata(&path).unwrap().len());
        assert_eq!(summary.compressed_clusters > 0, compress, "{summary:?}");
        assert_info(&path, size);
        let check = assert_check_clean(&path);
        assert_eq!(check["allocated-clusters"].as_u64(), Some(summary.allocated_clusters), "{check} {summary:?}");
        assert_same_content(&raw_path, &path);
    }
}

/// SIGINT while the compressing threads run: nothing is left behind.
#[test]
fn sigint_during_a_compressed_write_leaves_nothing_behind() {
    let tmp = scratch();
    // 512 MiB that compress well, so the write lasts long enough to be hit.
    let big = tmp.path().join("big");
    run(tool("sh").arg("-c").arg(format!("yes osbuilder-qcow2-interrupt | head -c 536870912 > '{}'", big.display())));
    let dir = tmp.path().join("out");
    fs::create_dir(&dir).unwrap();
    let out = dir.join("interrupted.qcow2");
    let mut cmd = osbuilder();
    cmd.args(["disk", "--image", &debian_image(), "-o", path_str(&out), "--format", "qcow2", "--qcow2-compress"])
        .args(["--add", &format!("{}:/big", big.display()), "--cache-dir"])
        .arg(shared_cache());
    assert_sigint_leaves_nothing(cmd, &dir, Duration::from_millis(300));
}
