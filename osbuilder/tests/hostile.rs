//! The hostile-input corpus (`tests/hostile/`, described in its README):
//! every case of `cases.toml` through the real binary (`osbuilder initrd`),
//! each with the error it must produce or the exact tree it must build, read
//! back from the newc archive byte for byte. For every case, refused or
//! built, nothing may be written outside the output: the run's scratch
//! directory (input, a sentinel `etc/`, the working and home directories, the
//! `--tmp-dir`) lists the same names, sizes and mtimes before and after, the
//! host's `/etc` too, no device node, fifo or setuid file appears on the host,
//! and a refused build leaves nothing at or beside the output path.
//!
//! The small inputs are committed bytes, written by [`committed_inputs`]:
//! `committed_inputs_are_what_the_generator_writes` holds the two together
//! (`OSBUILDER_HOSTILE_REGENERATE=1` rewrites the files). The big ones (bombs,
//! a 100,000-entry directory) are built by [`generated_input`] when run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use common::bombs::{self, Codec};
use common::*;
use serde::Deserialize;
use serde_json::json;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hostile")
}

// ---------------------------------------------------------------------------
// The case list
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct CaseList {
    case: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// What the input is, for the reader.
    #[allow(dead_code)]
    what: String,
    /// Committed tar layers (paths under tests/hostile/), applied in order,
    /// in an OCI layout made by `write_layout`.
    #[serde(default)]
    layers: Vec<String>,
    /// A committed OCI layout directory (tag `evil`).
    layout: Option<String>,
    /// A committed docker archive.
    docker_archive: Option<String>,
    /// An input built by `generated_input`.
    generated: Option<String>,
    /// Extra arguments to `osbuilder initrd`.
    #[serde(default)]
    args: Vec<String>,
    /// The build must fail with a message containing this.
    error: Option<String>,
    /// The build must succeed with exactly this listing (see `listing`).
    tree: Option<String>,
    /// The build must succeed with this many entries (root included) ...
    entries: Option<usize>,
    /// ... among which these listing lines.
    #[serde(default)]
    has: Vec<String>,
    /// Also compare the tree with `umoci unpack` of the same layout.
    #[serde(default)]
    umoci: bool,
}

fn cases() -> Vec<Case> {
    let path = corpus_dir().join("cases.toml");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let list: CaseList = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for case in &list.case {
        let inputs = [!case.layers.is_empty(), case.layout.is_some(), case.docker_archive.is_some(), case.generated.is_some()];
        assert_eq!(inputs.iter().filter(|&&b| b).count(), 1, "{}: exactly one of layers, layout, docker_archive, generated", case.name);
        let outcomes = [case.error.is_some(), case.tree.is_some(), case.entries.is_some()];
        assert_eq!(outcomes.iter().filter(|&&b| b).count(), 1, "{}: exactly one of error, tree, entries", case.name);
        if let Some(e) = &case.error {
            assert!(e.len() >= 8, "{}: an expected error of {e:?} names nothing", case.name);
        }
    }
    let mut names: Vec<&str> = list.case.iter().map(|c| c.name.as_str()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), list.case.len(), "case names must be unique");
    list.case
}

// ---------------------------------------------------------------------------
// The committed inputs and their generator
// ---------------------------------------------------------------------------

/// A tar stream written header by header, so that names, link targets and
/// records no honest tool writes get through.
#[derive(Default)]
struct Tar(Vec<u8>);

const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

impl Tar {
    /// One entry with raw `name` and `link` (at most 100 bytes each), owner
    /// 0:0, mtime 1.
    fn raw(mut self, kind: tar::EntryType, name: &[u8], link: &[u8], mode: u32, data: &[u8]) -> Self {
        self.push(kind, name, link, mode, (0, 0), (0, 0), data);
        self
    }

    #[allow(clippy::too_many_arguments)]
    fn push(&mut self, kind: tar::EntryType, name: &[u8], link: &[u8], mode: u32, owner: (u64, u64), dev: (u32, u32), data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_uid(owner.0);
        h.set_gid(owner.1);
        if matches!(kind, tar::EntryType::Char | tar::EntryType::Block) {
            h.set_device_major(dev.0).unwrap();
            h.set_device_minor(dev.1).unwrap();
        }
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
    }

    fn file(self, name: &str, data: &str) -> Self {
        self.raw(tar::EntryType::Regular, name.as_bytes(), b"", 0o644, data.as_bytes())
    }

    fn dir(self, name: &str) -> Self {
        self.raw(tar::EntryType::Directory, name.as_bytes(), b"", 0o755, b"")
    }

    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(tar::EntryType::Symlink, name.as_bytes(), target.as_bytes(), 0o777, b"")
    }

    fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(tar::EntryType::Link, name.as_bytes(), target.as_bytes(), 0o644, b"")
    }

    /// An entry with its owner and device numbers.
    fn special(mut self, kind: tar::EntryType, name: &str, mode: u32, owner: (u64, u64), dev: (u32, u32)) -> Self {
        self.push(kind, name.as_bytes(), b"", mode, owner, dev, b"");
        self
    }

    /// A PAX extended header (`x`) holding `records` (key, raw value).
    fn pax(self, records: &[(&str, &[u8])]) -> Self {
        let mut body = Vec::new();
        for (key, value) in records {
            let rest = key.len() + value.len() + 3;
            // The length prefix counts itself.
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        self.raw(tar::EntryType::XHeader, b"PaxHeaders/x", b"", 0o644, &body)
    }

    /// The two zero blocks that end an archive.
    fn end(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

/// Deterministic bytes that are not a tar stream (xorshift64).
fn garbage(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tar_layers() -> Vec<(&'static str, Vec<u8>)> {
    use tar::EntryType::*;
    let deep = |n: usize| vec!["d"; n].join("/");
    let mut too_many = Tar::default();
    for i in 0..11 {
        too_many = too_many.file(&format!("f{i:02}"), "");
    }
    let mut truncated = Tar::default().raw(Regular, b"f", b"", 0o644, &[b'x'; 1000]).0;
    truncated.truncate(512 + 100);
    let mut bad_checksum = Tar::default().file("f", "x").end();
    bad_checksum[148..156].copy_from_slice(b"0000000\0");
    vec![
        ("layers/dotdot.tar", Tar::default().file("../../sentinel/etc/passwd", "pwned\n").end()),
        ("layers/dotdot-inner.tar", Tar::default().dir("a/").file("a/../../x", "pwned\n").end()),
        ("layers/absolute.tar", Tar::default().file("/etc/x", "pwned\n").end()),
        ("layers/symlink-absolute-write.tar", Tar::default().symlink("lnk", "/etc").file("lnk/passwd", "pwned\n").end()),
        (
            "layers/symlink-absolute-write-existing.tar",
            Tar::default().dir("etc/").file("etc/passwd", "root\n").symlink("lnk", "/etc").file("lnk/passwd", "pwned\n").end(),
        ),
        ("layers/symlink-relative-escape.tar", Tar::default().symlink("lnk", "../../..").file("lnk/x", "x\n").end()),
        ("layers/symlink-to-sentinel.tar", Tar::default().symlink("lnk", "../../sentinel/etc").file("lnk/passwd", "pwned\n").end()),
        ("layers/symlink-climb-lower.tar", Tar::default().symlink("up", "../../../..").end()),
        ("layers/symlink-climb-upper.tar", Tar::default().file("up/etc/cron.d/job", "pwned\n").end()),
        ("layers/symlink-loop.tar", Tar::default().symlink("loop", "loop").file("loop/x", "x").end()),
        ("layers/file-as-parent.tar", Tar::default().file("f", "x").file("f/child", "y").end()),
        ("layers/file-as-parent-escapes.tar", Tar::default().file("e\x1b[2J\r", "x").file("e\x1b[2J\r/child", "y").end()),
        ("layers/hardlink-escape.tar", Tar::default().hardlink("h", "../../sentinel/etc/passwd").end()),
        ("layers/hardlink-absolute.tar", Tar::default().hardlink("h", "/etc/passwd").end()),
        ("layers/hardlink-missing.tar", Tar::default().hardlink("h", "etc/shadow").end()),
        ("layers/hardlink-dir.tar", Tar::default().dir("d/").hardlink("h", "d").end()),
        ("layers/hardlink-legal.tar", Tar::default().file("f", "data").hardlink("h", "f").end()),
        ("layers/hardlink-to-symlink.tar", Tar::default().symlink("s", "/etc/passwd").hardlink("hs", "s").end()),
        (
            "layers/hardlink-through-symlink.tar",
            Tar::default().dir("etc/").file("etc/passwd", "root\n").symlink("lnk", "../../..").hardlink("h", "lnk/etc/passwd").end(),
        ),
        (
            "layers/devices-and-modes.tar",
            Tar::default()
                .dir("dev/")
                .special(Char, "dev/null", 0o666, (0, 0), (1, 3))
                .special(Block, "dev/sda", 0o660, (0, 6), (8, 0))
                .dir("run/")
                .special(Fifo, "run/fifo", 0o600, (0, 0), (0, 0))
                .dir("bin/")
                .special(Regular, "bin/su", 0o4755, (0, 0), (0, 0))
                .special(Regular, "bin/wall", 0o2755, (0, 5), (0, 0))
                .special(Directory, "tmp/", 0o1777, (0, 0), (0, 0))
                .special(Directory, "home/", 0o755, (0, 0), (0, 0))
                .special(Directory, "home/u/", 0o700, (1000, 1000), (0, 0))
                .special(Regular, "home/u/f", 0o6711, (1000, 1000), (0, 0))
                .end(),
        ),
        ("layers/whiteout-missing-parent.tar", Tar::default().file("keep", "k").file("no/such/.wh.x", "").file("nodir/.wh..wh..opq", "").end()),
        ("layers/whiteout-dotdot.tar", Tar::default().file(".wh...", "").end()),
        ("layers/opaque-lower.tar", Tar::default().dir("d/").file("d/old", "o").dir("d/sub/").file("d/sub/f", "f").file("top", "t").end()),
        ("layers/opaque-upper.tar", Tar::default().file("d/.wh..wh..opq", "").file("d/new", "n").file(".wh.top", "").end()),
        (
            "layers/duplicates.tar",
            Tar::default()
                .file("f", "first")
                .file("f", "second!")
                .file("d", "a file")
                .dir("d/")
                .file("d/in", "i")
                .symlink("s", "/etc/passwd")
                .file("s", "now a file")
                .raw(Directory, b"m/", b"", 0o700, b"")
                .raw(Directory, b"m/", b"", 0o750, b"")
                .end(),
        ),
        (
            "layers/invalid-utf8.tar",
            Tar::default()
                .raw(Regular, b"bad\xff\xfe", b"", 0o644, b"x")
                .raw(Directory, b"caf\xe9/", b"", 0o755, b"")
                .raw(Regular, b"caf\xe9/\xc3\x28", b"", 0o644, b"y")
                .raw(Symlink, b"l", b"\xff\xfe", 0o777, b"")
                .end(),
        ),
        ("layers/pax-path-nul.tar", Tar::default().pax(&[("path", b"a\0../../sentinel/etc/passwd")]).file("placeholder", "pwned\n").end()),
        ("layers/symlink-empty-target.tar", Tar::default().symlink("l", "").end()),
        ("layers/pax-linkpath-nul.tar", Tar::default().file("f", "x").pax(&[("linkpath", b"f\0../../etc/passwd")]).symlink("l", "f").end()),
        (
            "layers/gnu-longname-nul.tar",
            Tar::default().raw(GNULongName, b"././@LongLink", b"", 0o644, b"evil\0../../sentinel/etc/passwd\0").file("placeholder", "pwned\n").end(),
        ),
        ("layers/path-too-long.tar", Tar::default().pax(&[("path", "a/".repeat(2100).as_bytes())]).file("placeholder", "x").end()),
        ("layers/name-too-long.tar", Tar::default().pax(&[("path", "n".repeat(256).as_bytes())]).file("placeholder", "x").end()),
        ("layers/symlink-long-name.tar", Tar::default().pax(&[("linkpath", "l".repeat(300).as_bytes())]).symlink("s", "placeholder").file("s/f", "x").end()),
        ("layers/pax-uid-escape.tar", Tar::default().pax(&[("uid", b"\x1b[2J\x1b[31mroot")]).file("f", "x").end()),
        ("layers/pax-uid-huge.tar", Tar::default().pax(&[("uid", b"99999999999")]).file("f", "x").end()),
        ("layers/truncated-data.tar", truncated),
        ("layers/truncated-header.tar", Tar::default().file("f", "x").0[..100].to_vec()),
        ("layers/no-end-marker.tar", Tar::default().file("f", "x").0),
        ("layers/empty.tar", Vec::new()),
        ("layers/bad-checksum.tar", bad_checksum),
        ("layers/garbage.tar", garbage(4096)),
        ("layers/too-many-entries.tar", too_many.end()),
        ("layers/too-deep.tar", Tar::default().file(&format!("{}/f", deep(11)), "").end()),
        ("layers/too-deep-symlink.tar", Tar::default().dir(&format!("{}/", deep(8))).symlink("l", &deep(8)).file("l/e/e/e/f", "").end()),
    ]
}

/// Writes `bytes` as a blob of the layout in `dir`; returns its digest and size.
fn put_blob(dir: &Path, bytes: &[u8]) -> (String, usize) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let hex = sha256_hex(bytes);
    fs::write(blobs.join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// A layout in `dir` whose tag `evil` names a manifest with `config` and
/// `layers` (descriptors as given, blobs written by the caller).
fn manifest_layout(dir: &Path, config: &[u8], layers: serde_json::Value) {
    let (config_digest, config_size) = put_blob(dir, config);
    let manifest = json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_size}, "layers": layers});
    let (digest, size) = put_blob(dir, manifest.to_string().as_bytes());
    index_layout(dir, json!({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": size}));
}

fn index_layout(dir: &Path, mut descriptor: serde_json::Value) {
    descriptor["annotations"] = json!({"org.opencontainers.image.ref.name": "evil"});
    fs::write(dir.join("index.json"), json!({"schemaVersion": 2, "manifests": [descriptor]}).to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

fn config_for(diff_ids: &[String]) -> Vec<u8> {
    json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}}).to_string().into_bytes()
}

fn diff_id(tar: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(tar))
}

/// The committed OCI layouts, written under `root/layouts/`.
fn write_layouts(root: &Path) {
    let honest = Tar::default().file("f", "honest\n").end();
    let hostile = Tar::default().file("../../sentinel/etc/passwd", "pwned\n").end();
    let layer_desc = |digest: &str, size: usize| json!({"mediaType": MT_OCI_LAYER_TAR, "digest": digest, "size": size});
    let dir = |name: &str| {
        let d = root.join("layouts").join(name);
        fs::create_dir_all(&d).unwrap();
        d
    };

    // The manifest names the honest layer's digest; the blob under that name is another tar.
    let d = dir("layer-digest-lies");
    let (digest, size) = put_blob(&d, &honest);
    fs::write(layout_blob_path(&d, &digest), &hostile).unwrap();
    manifest_layout(&d, &config_for(&[diff_id(&honest)]), json!([layer_desc(&digest, size)]));

    // The blob hashes to its name; the config's diff_id is another layer's.
    let d = dir("diff-id-lies");
    let (digest, size) = put_blob(&d, &honest);
    manifest_layout(&d, &config_for(&[diff_id(&hostile)]), json!([layer_desc(&digest, size)]));

    // The descriptor says 10 bytes; the blob is longer.
    let d = dir("layer-size-lies");
    let (digest, _) = put_blob(&d, &honest);
    manifest_layout(&d, &config_for(&[diff_id(&honest)]), json!([layer_desc(&digest, 10)]));

    let d = dir("config-not-json");
    let (digest, size) = put_blob(&d, &honest);
    manifest_layout(&d, b"architecture: amd64\nos: linux\n", json!([layer_desc(&digest, size)]));

    // Two diff_ids for one layer.
    let d = dir("diff-ids-count");
    let (digest, size) = put_blob(&d, &honest);
    manifest_layout(&d, &config_for(&[diff_id(&honest), diff_id(&honest)]), json!([layer_desc(&digest, size)]));

    let d = dir("layer-blob-missing");
    let missing = format!("sha256:{}", sha256_hex(b"a blob that is not in the layout"));
    manifest_layout(&d, &config_for(&[diff_id(&honest)]), json!([layer_desc(&missing, 100)]));

    // A digest whose hex part is a path out of the layout.
    let d = dir("layer-digest-path");
    manifest_layout(&d, &config_for(&[diff_id(&honest)]), json!([layer_desc("sha256:../../../../sentinel/etc/passwd", 100)]));

    let d = dir("layer-digest-algorithm");
    let (digest, size) = put_blob(&d, &honest);
    let md5 = digest.replace("sha256:", "md5:");
    manifest_layout(&d, &config_for(&[diff_id(&honest)]), json!([layer_desc(&md5, size)]));

    let d = dir("manifest-not-json");
    let (digest, size) = put_blob(&d, b"<html>not a manifest</html>\n");
    index_layout(&d, json!({"mediaType": MT_OCI_MANIFEST, "digest": digest, "size": size}));

    let d = dir("index-not-json");
    fs::write(d.join("index.json"), "{\"schemaVersion\": 2, \"manifests\": [").unwrap();
    fs::write(d.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();

    // An image index with arm64 and s390x images only.
    let d = dir("index-no-platform");
    let (digest, size) = put_blob(&d, &honest);
    let mut platforms = Vec::new();
    for (arch, variant) in [("arm64", Some("v8")), ("s390x", None)] {
        let mut config: serde_json::Value = serde_json::from_slice(&config_for(&[diff_id(&honest)])).unwrap();
        config["architecture"] = json!(arch);
        let (config_digest, config_size) = put_blob(&d, config.to_string().as_bytes());
        let manifest = json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
            "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_size}, "layers": [layer_desc(&digest, size)]});
        let (m_digest, m_size) = put_blob(&d, manifest.to_string().as_bytes());
        let mut platform = json!({"architecture": arch, "os": "linux"});
        if let Some(v) = variant {
            platform["variant"] = json!(v);
        }
        platforms.push(json!({"mediaType": MT_OCI_MANIFEST, "digest": m_digest, "size": m_size, "platform": platform}));
    }
    let index = json!({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": platforms});
    let (i_digest, i_size) = put_blob(&d, index.to_string().as_bytes());
    index_layout(&d, json!({"mediaType": MT_OCI_INDEX, "digest": i_digest, "size": i_size}));
}

/// A docker archive whose manifest.json names members out of the archive.
fn docker_archive_escape() -> Vec<u8> {
    let manifest = json!([{"Config": "../../sentinel/etc/passwd", "RepoTags": ["evil:latest"], "Layers": ["../../sentinel/etc/shadow"]}]);
    Tar::default().file("manifest.json", &manifest.to_string()).end()
}

/// Every committed input: path under tests/hostile/ and bytes.
fn committed_inputs() -> BTreeMap<PathBuf, Vec<u8>> {
    let mut inputs: BTreeMap<PathBuf, Vec<u8>> = tar_layers().into_iter().map(|(p, b)| (PathBuf::from(p), b)).collect();
    inputs.insert("archives/manifest-escape.tar".into(), docker_archive_escape());
    let tmp = tempfile::tempdir().unwrap();
    write_layouts(tmp.path());
    for (path, _) in files_under(tmp.path()) {
        let bytes = fs::read(tmp.path().join(&path)).unwrap();
        inputs.insert(path, bytes);
    }
    inputs
}

/// Regular files under `root`, relative, sorted.
fn files_under(root: &Path) -> BTreeMap<PathBuf, u64> {
    let mut files = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                files.insert(entry.path().strip_prefix(root).unwrap().to_path_buf(), meta.len());
            }
        }
    }
    files
}

const INPUT_DIRS: [&str; 3] = ["layers", "layouts", "archives"];

#[test]
fn committed_inputs_are_what_the_generator_writes() {
    let corpus = corpus_dir();
    let inputs = committed_inputs();
    if std::env::var_os("OSBUILDER_HOSTILE_REGENERATE").is_some() {
        for d in INPUT_DIRS {
            let _ = fs::remove_dir_all(corpus.join(d));
        }
        for (path, bytes) in &inputs {
            fs::create_dir_all(corpus.join(path).parent().unwrap()).unwrap();
            fs::write(corpus.join(path), bytes).unwrap();
        }
    }
    let mut on_disk = BTreeMap::new();
    for d in INPUT_DIRS {
        for (path, _) in files_under(&corpus.join(d)) {
            on_disk.insert(Path::new(d).join(&path), fs::read(corpus.join(d).join(&path)).unwrap());
        }
    }
    let stale: Vec<_> = on_disk.keys().filter(|p| !inputs.contains_key(*p)).collect();
    let differ: Vec<_> = inputs.iter().filter(|(p, b)| on_disk.get(*p) != Some(b)).map(|(p, _)| p).collect();
    assert!(
        stale.is_empty() && differ.is_empty(),
        "tests/hostile/ differs from its generator (run with OSBUILDER_HOSTILE_REGENERATE=1): not generated {stale:?}, missing or different {differ:?}"
    );
}

/// The big inputs, built into `dir` as a layout (tag `evil`).
fn generated_input(name: &str, dir: &Path) -> PathBuf {
    match name {
        "gzip-bomb" => bombs::layout_with(dir, &bombs::zeros_1gib(), Codec::Gzip),
        "zstd-bomb" => bombs::layout_with(dir, &bombs::zeros_1gib(), Codec::Zstd),
        "sparse-1eib" => bombs::layout_with(dir, &bombs::sparse_1eib(), Codec::Gzip),
        "pax-1gib" => bombs::layout_with(dir, &bombs::pax_1gib(), Codec::Gzip),
        "dir-100k" => {
            let mut tar = Tar::default().dir("d/");
            for i in 0..100_000 {
                tar = tar.file(&format!("d/f{i:06}"), "");
            }
            bombs::layout_with(dir, &bombs::Layer::plain(tar.end()), Codec::Gzip)
        }
        _ => panic!("no generator for {name:?}"),
    }
}

// ---------------------------------------------------------------------------
// The tree a build produced, as text
// ---------------------------------------------------------------------------

/// Printable ASCII but space and backslash as is, other bytes as `\xNN`.
fn shown(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| if b.is_ascii_graphic() && b != b'\\' { (b as char).to_string() } else { format!("\\x{b:02x}") }).collect()
}

/// One line per archive entry, in archive order:
/// `PATH KIND MODE UID:GID` and, for a file, `size=N` (its data quoted when
/// 16 bytes or less), `-> TARGET` for a symlink, `MAJOR,MINOR` for a device
/// node, then `links=N first=PATH` for a hard-link set.
fn listing(entries: &[NewcEntry]) -> String {
    let mut data_of: HashMap<u32, &[u8]> = HashMap::new();
    let mut first_of: HashMap<u32, &[u8]> = HashMap::new();
    for e in entries {
        if !e.data.is_empty() || !data_of.contains_key(&e.ino) {
            data_of.insert(e.ino, &e.data);
        }
        first_of.entry(e.ino).or_insert(&e.name);
    }
    let mut out = String::new();
    for e in entries {
        let kind = e.kind();
        let name = e.name.strip_prefix(b"./").unwrap_or(&e.name);
        out.push_str(&format!("{} {} {:04o} {}:{}", shown(name), format!("{kind:?}").to_lowercase(), e.mode & 0o7777, e.uid, e.gid));
        match kind {
            Kind::File => {
                let data = data_of[&e.ino];
                out.push_str(&format!(" size={}", data.len()));
                if data.len() <= 16 {
                    out.push_str(&format!(" data={}", shown(data)));
                }
            }
            Kind::Symlink => out.push_str(&format!(" -> {}", shown(&e.data))),
            Kind::CharDev | Kind::BlockDev => out.push_str(&format!(" {},{}", e.rdev.0, e.rdev.1)),
            Kind::Dir | Kind::Fifo | Kind::Socket => {}
        }
        if kind != Kind::Dir && e.nlink > 1 {
            out.push_str(&format!(" links={} first={}", e.nlink, shown(first_of[&e.ino])));
        }
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Nothing outside the output
// ---------------------------------------------------------------------------

/// Path bytes to mode, size and mtime (seconds, nanoseconds).
type HostSnapshot = BTreeMap<Vec<u8>, (u32, u64, i64, i64)>;

/// Name, type, mode, size and mtime (ns) of every path under `root` but
/// `skip`, not following symlinks (one level only for `/etc`).
fn host_snapshot(root: &Path, skip: &[&Path]) -> HostSnapshot {
    let mut map = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = fs::read_dir(&dir) else { continue };
        for entry in rd {
            let entry = entry.unwrap();
            let path = entry.path();
            if skip.contains(&path.as_path()) {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&path) else { continue };
            map.insert(path.as_os_str().as_bytes().to_vec(), (meta.mode(), meta.size(), meta.mtime(), meta.mtime_nsec()));
            if meta.is_dir() && root != Path::new("/etc") {
                stack.push(path);
            }
        }
    }
    map
}

/// Paths under `root` that are device nodes, fifos, sockets or setuid/setgid files.
fn special_files(root: &Path) -> Vec<String> {
    host_snapshot(root, &[])
        .into_iter()
        .filter(|(_, (mode, ..))| {
            let kind = mode & 0o170000;
            !matches!(kind, 0o100000 | 0o040000 | 0o120000) || (kind == 0o100000 && mode & 0o6000 != 0)
        })
        .map(|(p, (mode, ..))| format!("{} ({mode:o})", String::from_utf8_lossy(&p)))
        .collect()
}

/// One run's scratch directory: the input, the output's directory, the
/// `--tmp-dir`, the blob cache, an empty working and home directory, and a
/// sentinel `etc/` for relative escapes (`../../sentinel/etc/passwd`) to hit.
struct Arena {
    dir: tempfile::TempDir,
}

impl Arena {
    fn new() -> Arena {
        let dir = tempfile::Builder::new().prefix("osbuilder-hostile-").tempdir().unwrap();
        for d in ["input", "out", "tmp", "cache", "cwd", "home", "sentinel/etc"] {
            fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        fs::write(dir.path().join("sentinel/etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
        fs::write(dir.path().join("sentinel/etc/shadow"), "root:*:1::::::\n").unwrap();
        fs::write(dir.path().join("sentinel/x"), "x\n").unwrap();
        Arena { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Everything that must not change: the arena but the output's
    /// directory and the blob cache, and the host's /etc.
    fn snapshot(&self) -> (HostSnapshot, HostSnapshot) {
        let (out, cache) = (self.path("out"), self.path("cache"));
        (host_snapshot(self.dir.path(), &[&out, &cache]), host_snapshot(Path::new("/etc"), &[]))
    }
}

fn layout_of_layers(case: &Case, dir: &Path) -> PathBuf {
    let blobs: Vec<Vec<u8>> = case.layers.iter().map(|l| fs::read(corpus_dir().join(l)).unwrap_or_else(|e| panic!("{}: {l}: {e}", case.name))).collect();
    let layers: Vec<LayoutLayer> = blobs.iter().map(|b| LayoutLayer { blob: b, media_type: MT_OCI_LAYER_TAR, diff_id: diff_id(b) }).collect();
    write_layout(dir, "evil", &layers)
}

fn copy_dir(from: &Path, to: &Path) {
    for (path, _) in files_under(from) {
        fs::create_dir_all(to.join(&path).parent().unwrap()).unwrap();
        fs::copy(from.join(&path), to.join(&path)).unwrap();
    }
}

/// The image reference for the case's input, put into the arena.
fn prepare(case: &Case, arena: &Arena) -> (String, Option<PathBuf>) {
    let input = arena.path("input");
    if !case.layers.is_empty() {
        let layout = layout_of_layers(case, &input.join("layout"));
        (oci_ref(&layout, "evil"), Some(layout))
    } else if let Some(l) = &case.layout {
        copy_dir(&corpus_dir().join(l), &input.join("layout"));
        (oci_ref(&input.join("layout"), "evil"), Some(input.join("layout")))
    } else if let Some(a) = &case.docker_archive {
        fs::copy(corpus_dir().join(a), input.join("archive.tar")).unwrap();
        (format!("docker-archive:{}", input.join("archive.tar").display()), None)
    } else {
        let name = case.generated.as_deref().unwrap();
        let layout = generated_input(name, &input.join("layout"));
        (oci_ref(&layout, "evil"), Some(layout))
    }
}

enum Outcome {
    Refused,
    Built,
}

/// Runs one case; returns its outcome or every way it went wrong.
fn run_case(case: &Case) -> Result<Outcome, Vec<String>> {
    let arena = Arena::new();
    let (image, layout) = prepare(case, &arena);
    let before = arena.snapshot();
    let out = arena.path("out/initrd.cpio");
    // Under RLIMIT_FSIZE and RLIMIT_AS (util-linux's prlimit execs our binary
    // in its process), so a bomb that got through fails instead of filling
    // the machine.
    let mut cmd = tool("prlimit");
    cmd.arg(format!("--fsize={}", 2u64 << 30))
        .arg(format!("--as={}", 4u64 << 30))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["initrd", "-q", "--image", &image, "-o", path_str(&out), "--compress", "none", "--tmp-dir", path_str(&arena.path("tmp"))])
        .arg("--cache-dir")
        .arg(arena.path("cache"))
        .args(&case.args)
        .current_dir(arena.path("cwd"))
        .env("HOME", arena.path("home"))
        .env("TMPDIR", arena.path("tmp"))
        .env_remove("SOURCE_DATE_EPOCH")
        .env_remove("OSBUILDER_CACHE")
        .env_remove("OSBUILDER_TMP_DIR");
    let result = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    let said = if result.status.success() { "built".to_string() } else { stderr.lines().last().unwrap_or_default().to_string() };
    eprintln!("{}: {said}", case.name);
    let mut problems = Vec::new();

    if arena.snapshot() != before {
        let (a, b) = (before, arena.snapshot());
        let changed: Vec<String> =
            a.0.keys()
                .chain(b.0.keys())
                .chain(a.1.keys())
                .chain(b.1.keys())
                .filter(|k| a.0.get(*k) != b.0.get(*k) || a.1.get(*k) != b.1.get(*k))
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
        problems.push(format!("written outside the output: {changed:?}"));
    }
    let specials = special_files(arena.dir.path());
    if !specials.is_empty() {
        problems.push(format!("special files on the host: {specials:?}"));
    }
    let beside: Vec<_> = files_under(&arena.path("out")).into_keys().filter(|p| p != Path::new("initrd.cpio")).collect();
    if !beside.is_empty() {
        problems.push(format!("left beside the output: {beside:?}"));
    }
    if stderr.contains("panicked") {
        problems.push(format!("panicked: {stderr}"));
    }
    // Hostile bytes are shown escaped or replaced, never sent to the terminal as they are.
    if result.stderr.iter().any(|&b| b.is_ascii_control() && b != b'\n' && b != b'\t') || std::str::from_utf8(&result.stderr).is_err() {
        problems.push(format!("raw control or non-UTF-8 bytes on stderr: {stderr:?}"));
    }

    let outcome = if let Some(want) = &case.error {
        if result.status.code() != Some(1) {
            problems.push(format!("must be refused (exit 1), got {}: {}", result.status, stderr.trim()));
        } else if !stderr.contains(want.as_str()) {
            problems.push(format!("the error must say {want:?}: {}", stderr.trim()));
        }
        if out.exists() {
            problems.push("a refused build left its output".into());
        }
        Outcome::Refused
    } else {
        if !result.status.success() {
            problems.push(format!("must build, got {}: {}", result.status, stderr.trim()));
            return Err(problems);
        }
        let entries = newc_entries(&out);
        let got = listing(&entries);
        if let Some(want) = &case.tree {
            if got.trim() != want.trim() {
                problems.push(format!("tree differs:\n--- expected\n{}\n--- got\n{}", want.trim(), got.trim()));
            }
        }
        if let Some(n) = case.entries {
            if entries.len() != n {
                problems.push(format!("{} entries, expected {n}", entries.len()));
            }
            for line in &case.has {
                if !got.lines().any(|l| l == line) {
                    problems.push(format!("no line {line:?} in the tree"));
                }
            }
        }
        if case.umoci {
            let theirs = tree_snapshot(&umoci_unpack(layout.as_deref().unwrap(), "evil"));
            let diff = diff_trees(&tree_snapshot(&cpio_extract(&out)), &theirs);
            if !diff.is_empty() {
                problems.push(format!("ours (left) and umoci's (right) differ:\n  {}", diff.join("\n  ")));
            }
        }
        Outcome::Built
    };
    if problems.is_empty() {
        Ok(outcome)
    } else {
        Err(problems)
    }
}

#[test]
fn every_case_of_the_corpus_has_its_outcome_and_writes_nothing_outside_the_output() {
    let cases = cases();
    let (mut refused, mut built, mut failures) = (0, 0, Vec::new());
    for case in &cases {
        match run_case(case) {
            Ok(Outcome::Refused) => refused += 1,
            Ok(Outcome::Built) => built += 1,
            Err(problems) => failures.push(format!("{}:\n  {}", case.name, problems.join("\n  "))),
        }
    }
    eprintln!("hostile corpus: {} cases, {refused} refused with the expected error, {built} built the expected tree, {} failed", cases.len(), failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
