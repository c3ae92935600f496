//! Hostile layers against the intake's limits, through the CLI: a 1 EiB
//! sparse file in 512 bytes, a 1 GiB PAX path in a 1 MB gzip, too many
//! entries, too deep a tree, gzip and zstd bombs. Each must be refused with
//! the limit's message (short, naming the option that raises it), no output,
//! and bounded memory: the child's peak RSS from wait4, under rlimits that
//! turn a regression into a failure instead of a full disk or an OOM kill.

mod common;

use std::fs;
use std::path::Path;

use common::bombs::*;
use common::*;

/// Peak RSS a refused build may reach.
const MAX_RSS_MIB: u64 = 400;
/// The longest error message a refusal may print.
const MAX_MESSAGE_BYTES: usize = 1024;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-intake-").tempdir().unwrap()
}

/// Runs `osbuilder initrd` on `layout` and returns (success, stderr, peak
/// RSS in MiB). The child runs under RLIMIT_FSIZE (2 GiB) and RLIMIT_AS
/// (4 GiB), set by util-linux's `prlimit`, which then execs our binary in the
/// same process: without the limits under test a hostile layer would fill the
/// disk or the memory of the machine running the tests. The peak RSS can
/// include pages of the test process at the fork (an over-estimate): callers
/// drop large buffers before.
fn build_measured(layout: &Path, out: &Path, extra: &[&str], tmp: &Path) -> (bool, String, u64) {
    use std::os::unix::process::ExitStatusExt;
    let mut cmd = tool("prlimit");
    cmd.arg(format!("--fsize={}", 2u64 << 30))
        .arg(format!("--as={}", 4u64 << 30))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["initrd", "--image", &oci_ref(layout, "evil"), "-o", path_str(out), "--compress", "none"])
        .args(extra)
        .arg("--cache-dir")
        .arg(tmp.join("cache"))
        .env_remove("SOURCE_DATE_EPOCH")
        .env("TMPDIR", tmp);
    let (status, stderr, rss_mib) = common::run_measured(&mut cmd);
    let stderr = if status.signal().is_some() { format!("{stderr}\n(killed by {status})") } else { stderr };
    (status.success(), stderr, rss_mib)
}

/// Builds `layer`, expects a refusal naming every one of `expected`, and
/// checks the output is absent, memory bounded and the message short.
fn check_refused(name: &str, layer: &Layer, codec: Codec, extra: &[&str], expected: &[&str]) {
    let tmp = scratch();
    let layout = layout_with(&tmp.path().join("layout"), layer, codec);
    let compressed = fs::read_dir(layout.join("blobs/sha256")).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).max().unwrap();
    let out = tmp.path().join("out.cpio");
    let (ok, stderr, rss_mib) = build_measured(&layout, &out, extra, tmp.path());
    eprintln!("{name}: largest blob {compressed} bytes, peak RSS {rss_mib} MiB: {}", stderr.trim());
    assert!(!ok, "{name}: the build must fail");
    let message = stderr.lines().find(|l| l.starts_with("osbuilder: error:")).unwrap_or_else(|| panic!("{name}: no error line in {stderr:?}"));
    for want in expected {
        assert!(message.contains(want), "{name}: the error must say {want:?}: {message}");
    }
    assert!(message.len() < MAX_MESSAGE_BYTES, "{name}: a {}-byte message", message.len());
    assert!(rss_mib < MAX_RSS_MIB, "{name}: peak RSS {rss_mib} MiB, over {MAX_RSS_MIB} MiB");
    assert!(!out.exists(), "{name}: no output for a refused image");
}

#[test]
fn a_512_byte_sparse_entry_declaring_1_eib_is_refused_before_any_zero_is_written() {
    check_refused("sparse-1eib", &sparse_1eib(), Codec::Gzip, &[], &["\"huge\"", "1152921504606846976 bytes", "--max-spool-bytes"]);
}

#[test]
fn a_1_gib_pax_path_in_a_1_mb_gzip_is_refused_from_its_header() {
    check_refused(
        "pax-1gib",
        &pax_1gib(),
        Codec::Gzip,
        &[],
        &["PAX extended header at byte 0", "1073741824 bytes", "1048576-byte limit", "--max-header-bytes"],
    );
}

#[test]
fn more_entries_than_the_limit_are_refused() {
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..150 {
        let name = format!("f{i:03}");
        b.append(&header(tar::EntryType::Regular, &name, 0), &b""[..]).unwrap();
    }
    let layer = Layer::plain(b.into_inner().unwrap());
    check_refused("entries", &layer, Codec::Gzip, &["--max-entries", "100"], &["\"f100\"", "more than 100 entries", "--max-entries"]);
    // Under the limit the same layer builds (the limit, not the layer, refused it).
    let tmp = scratch();
    let layout = layout_with(&tmp.path().join("layout"), &layer, Codec::Gzip);
    let (ok, stderr, _) = build_measured(&layout, &tmp.path().join("ok.cpio"), &["--max-entries", "150"], tmp.path());
    assert!(ok, "{stderr}");
}

#[test]
fn trees_deeper_than_the_limit_are_refused_by_name_or_through_symlinks() {
    // By name: 60 directories in one entry's path.
    let deep = vec!["d"; 60].join("/");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Regular, "x", 0);
    b.append_data(&mut h, format!("{deep}/f"), &b""[..]).unwrap();
    check_refused(
        "deep-name",
        &Layer::plain(b.into_inner().unwrap()),
        Codec::Gzip,
        &["--max-path-depth", "50"],
        &["61 levels deep", "over the limit of 50", "--max-path-depth"],
    );

    // Through a symlink: each name is shallow, where they land is not.
    let forty = vec!["d"; 40].join("/");
    let twenty = vec!["e"; 20].join("/");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = header(tar::EntryType::Directory, "x", 0);
    b.append_data(&mut h, format!("{forty}/"), &b""[..]).unwrap();
    let mut h = header(tar::EntryType::Symlink, "l", 0);
    b.append_link(&mut h, "l", &forty).unwrap();
    let mut h = header(tar::EntryType::Regular, "x", 0);
    b.append_data(&mut h, format!("l/{twenty}/f"), &b""[..]).unwrap();
    check_refused(
        "deep-symlink",
        &Layer::plain(b.into_inner().unwrap()),
        Codec::Gzip,
        &["--max-path-depth", "50"],
        &["51 levels deep", "over the limit of 50", "--max-path-depth"],
    );
}

#[test]
fn a_gzip_bomb_is_refused_over_the_ratio() {
    check_refused("gzip-bomb", &zeros_1gib(), Codec::Gzip, &["--max-ratio", "100"], &["decompress to more than", "over the limit of 100:1", "--max-ratio"]);
}

#[test]
fn a_zstd_bomb_is_refused_over_the_default_ratio() {
    check_refused("zstd-bomb", &zeros_1gib(), Codec::Zstd, &[], &["decompress to more than", "over the limit of 1000:1", "--max-ratio"]);
}

#[test]
fn spool_files_go_to_the_tmp_dir_given() {
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header(tar::EntryType::Regular, "f", 2), &b"hi"[..]).unwrap();
    let layer = Layer::plain(b.into_inner().unwrap());
    let tmp = scratch();
    let layout = layout_with(&tmp.path().join("layout"), &layer, Codec::Gzip);
    let missing = tmp.path().join("no-such-dir");
    let (ok, stderr, _) = build_measured(&layout, &tmp.path().join("a.cpio"), &["--tmp-dir", path_str(&missing)], tmp.path());
    assert!(!ok && stderr.contains("spool file") && stderr.contains(path_str(&missing)), "{stderr}");
    let (ok, stderr, _) = build_measured(&layout, &tmp.path().join("b.cpio"), &["--tmp-dir", path_str(tmp.path())], tmp.path());
    assert!(ok, "{stderr}");
}

#[test]
fn an_index_json_over_the_json_limit_is_refused_before_it_is_read_whole() {
    let mut b = tar::Builder::new(Vec::new());
    b.append(&header(tar::EntryType::Regular, "f", 2), &b"hi"[..]).unwrap();
    let tmp = scratch();
    let layout = layout_with(&tmp.path().join("layout"), &Layer::plain(b.into_inner().unwrap()), Codec::Gzip);
    let out = tmp.path().join("ok.cpio");
    let (ok, stderr, _) = build_measured(&layout, &out, &[], tmp.path());
    assert!(ok, "the layout builds as it is: {stderr}");
    // The same index with 256 MiB of JSON whitespace after it: valid JSON, too big.
    let mut index = fs::read(layout.join("index.json")).unwrap();
    index.resize(index.len() + (256 << 20), b' ');
    fs::write(layout.join("index.json"), &index).unwrap();
    drop(index);
    fs::remove_file(&out).unwrap();
    let (ok, stderr, rss_mib) = build_measured(&layout, &out, &[], tmp.path());
    eprintln!("index.json of 256 MiB: peak RSS {rss_mib} MiB: {}", stderr.trim());
    assert!(!ok && stderr.contains("index.json is over the 16 MiB (16777216-byte) limit for JSON documents"), "{stderr}");
    assert!(rss_mib < 128, "index.json was read whole: peak RSS {rss_mib} MiB");
    assert!(!out.exists());
}
