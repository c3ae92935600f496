//! Self-test of the integration-test harness in tests/common: the registries
//! start, accept pushes and enforce auth, every fixture builds and holds what
//! its script promises, and the oracles (umoci unpack, GNU cpio, tree
//! snapshots) agree with each other on the same trees.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use common::proxy::*;
use common::*;
use serde_json::{json, Value};

/// Names of the entries in a layer blob, listed with GNU tar (which reads
/// gzip and zstd layers through the matching external decompressor).
fn layer_entries(layout: &Path, digest: &str) -> Vec<String> {
    let blob = layout_blob_path(layout, digest);
    run_stdout(tool("tar").arg("-tf").arg(&blob)).lines().map(|l| l.trim_end_matches('/').trim_start_matches("./").to_string()).collect()
}

/// The direct children of `dir` in a snapshot, as full keys.
fn children(tree: &BTreeMap<String, Entry>, dir: &str) -> Vec<String> {
    let prefix = format!("{dir}/");
    tree.keys().filter(|k| k.starts_with(&prefix) && !k[prefix.len()..].contains('/')).cloned().collect()
}

fn entry<'a>(tree: &'a BTreeMap<String, Entry>, path: &str) -> &'a Entry {
    tree.get(path).unwrap_or_else(|| panic!("{path} missing from tree"))
}

fn layer_digests(manifest: &Value) -> Vec<String> {
    manifest["layers"].as_array().expect("manifest has layers").iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn anonymous_registry_accepts_every_fixture_format() {
    let reg = Registry::start();
    assert!(reg.addr().starts_with("127.0.0.1:"), "{}", reg.addr());
    assert_eq!(reg.get_status("/v2/", None), 200);

    // OCI layout, manifest pushed as is: the registry holds the same digest.
    let layered = layered_layout();
    push(&oci_ref(&layered, "v2"), &reg, "test/layered:v2", &[]);
    let info = skopeo_inspect(&reg, "test/layered:v2", &[]);
    assert_eq!(info["Digest"], layout_descriptor(&layered, "v2")["digest"]);
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
    assert!(info["Env"].as_array().unwrap().contains(&json!("GREETING=hello world")), "{info}");
    let raw = skopeo_inspect(&reg, "test/layered:v2", &["--raw"]);
    assert_eq!(raw["config"]["mediaType"], MT_OCI_CONFIG);
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], MT_OCI_LAYER_GZIP);
    }

    // Docker v2 schema 2, converted by skopeo.
    push(&oci_ref(&layered, "v2"), &reg, "test/layered:v2s2", &["--format", "v2s2"]);
    let raw = skopeo_inspect(&reg, "test/layered:v2s2", &["--raw"]);
    assert_eq!(raw["mediaType"], MT_DOCKER_MANIFEST);
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], MT_DOCKER_LAYER_GZIP);
    }

    // zstd layers stay zstd in the registry.
    push(&oci_ref(&zstd_layout(), "v2"), &reg, "test/layered:zstd", &[]);
    let raw = skopeo_inspect(&reg, "test/layered:zstd", &["--raw"]);
    for l in raw["layers"].as_array().unwrap() {
        assert_eq!(l["mediaType"], MT_OCI_LAYER_ZSTD);
    }

    // docker-archive source.
    let archive = docker_archive();
    push(&format!("docker-archive:{}", archive.display()), &reg, "test/from-archive:v2", &[]);
    let info = skopeo_inspect(&reg, "test/from-archive:v2", &[]);
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(info["Architecture"], "amd64");

    // Multi-arch index with both images.
    push_multiarch(&reg, "test/multi:latest");
    let raw = skopeo_inspect(&reg, "test/multi:latest", &["--raw"]);
    assert_eq!(raw["mediaType"], MT_OCI_INDEX);
    let archs: Vec<&str> = raw["manifests"].as_array().unwrap().iter().map(|m| m["platform"]["architecture"].as_str().unwrap()).collect();
    assert_eq!(archs, ["amd64", "arm64"]);
    let amd = skopeo_inspect(&reg, "test/multi:latest", &["--override-arch", "amd64"]);
    assert_eq!(amd["Architecture"], "amd64");
    assert!(amd["Env"].as_array().unwrap().contains(&json!("ARCH_MARKER=amd64")), "{amd}");
    let arm = skopeo_inspect(&reg, "test/multi:latest", &["--override-arch", "arm64"]);
    assert_eq!(arm["Architecture"], "arm64");
    assert!(arm["Env"].as_array().unwrap().contains(&json!("ARCH_MARKER=arm64")), "{arm}");

    assert_eq!(reg.get_status("/v2/test/layered/tags/list", None), 200);
}

#[test]
fn htpasswd_registry_requires_credentials() {
    let reg = Registry::start_with_htpasswd("alice", "s3cret pass");
    assert_eq!(reg.creds(), Some(("alice", "s3cret pass")));
    assert_eq!(reg.get_status("/v2/", None), 401);
    assert_eq!(reg.get_status("/v2/", Some(("alice", "s3cret pass"))), 200);
    assert_eq!(reg.get_status("/v2/", Some(("alice", "wrong"))), 401);

    let src = oci_ref(&layered_layout(), "v2");
    let err = try_push(&src, &reg, "private/layered:v2", &[], None).expect_err("an anonymous push to an htpasswd registry must fail");
    assert!(err.contains("unauthorized") || err.contains("authentication required"), "unexpected error for an anonymous push: {err}");
    let err = try_push(&src, &reg, "private/layered:v2", &[], Some(("alice", "wrong"))).expect_err("a push with a wrong password must fail");
    assert!(err.contains("unauthorized") || err.contains("authentication required"), "{err}");

    push(&src, &reg, "private/layered:v2", &[]);
    let info = skopeo_inspect(&reg, "private/layered:v2", &[]);
    assert_eq!(info["Digest"], layout_descriptor(&layered_layout(), "v2")["digest"]);
    assert!(try_skopeo_inspect(&reg, "private/layered:v2", &[], None).is_err());
}

#[test]
fn registries_use_distinct_ports_and_die_with_their_value() {
    let a = Registry::start();
    let b = Registry::start();
    assert_ne!(a.addr(), b.addr());
    let (addr, pid) = (a.addr(), a.pid());
    assert!(pid_alive(pid));
    drop(a);
    assert!(!pid_alive(pid), "registry pid {pid} survived drop");
    assert_eq!(http_status(&addr, "/v2/", None), None, "something still answers on {addr}");
    assert_eq!(b.get_status("/v2/", None), 200);

    // A panicking test unwinds through Drop too.
    let pid = std::sync::Mutex::new(0u32);
    let result = std::panic::catch_unwind(|| {
        let r = Registry::start();
        *pid.lock().unwrap() = r.pid();
        panic!("deliberate panic with a running registry");
    });
    assert!(result.is_err());
    let pid = *pid.lock().unwrap();
    assert_ne!(pid, 0);
    assert!(!pid_alive(pid), "registry pid {pid} survived a panic");
}

#[test]
fn debian_layout_is_a_faithful_debootstrap_image() {
    let layout = debian_layout();
    let manifest = layout_manifest(&layout, DEBIAN_TAG);
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1);
    assert_eq!(manifest["layers"][0]["mediaType"], MT_OCI_LAYER_GZIP);
    let cfg = layout_config(&layout, DEBIAN_TAG);
    assert_eq!(cfg["architecture"], "amd64");
    assert_eq!(cfg["os"], "linux");
    assert_eq!(cfg["config"]["Cmd"], json!(["/bin/bash"]));
    assert_eq!(cfg["config"]["WorkingDir"], "/root");
    assert_eq!(cfg["config"]["User"], "root");
    assert!(cfg["config"]["Env"].as_array().unwrap().contains(&json!("LANG=C.UTF-8")), "{cfg}");

    let rootfs = umoci_unpack(&layout, DEBIAN_TAG);
    let version = fs::read_to_string(rootfs.join("etc/debian_version")).unwrap();
    assert!(version.starts_with("12."), "debian_version {version:?}");
    let tree = tree_snapshot(&rootfs);
    assert!(tree.len() > 3000, "only {} entries", tree.len());
    // bookworm's debootstrap makes a merged-/usr system.
    assert_eq!(entry(&tree, "bin").kind, Kind::Symlink);
    assert_eq!(entry(&tree, "bin").target.as_deref(), Some("usr/bin"));
    assert_eq!(entry(&tree, "usr/bin/bash").mode, 0o755);
    assert_eq!(entry(&tree, "usr/bin/su").mode & 0o4000, 0o4000);
    assert_eq!(entry(&tree, "dev/null").rdev, Some((1, 3)));
    assert!(!tree.keys().any(|k| k.starts_with("var/cache/apt/archives/") && k.ends_with(".deb")));

    // umoci's round trip of the rootfs tarball is exact.
    let tar = debian_rootfs_tar();
    let extracted = tempfile::tempdir().unwrap();
    run(tool("tar").args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"]).arg(&tar).arg("-C").arg(extracted.path()));
    assert_trees_equal(&tree_snapshot(extracted.path()), &tree);
}

#[test]
fn layered_v2_applies_deletions_and_keeps_special_files() {
    let layout = layered_layout();

    let v1 = tree_snapshot(&umoci_unpack(&layout, "v1"));
    for p in LAYERED_DELETED.iter().chain(LAYERED_OPAQUE_HIDDEN) {
        assert!(v1.contains_key(*p), "v1 lacks {p}");
    }

    let v2_root = umoci_unpack(&layout, "v2");
    let v2 = tree_snapshot(&v2_root);
    for p in LAYERED_DELETED {
        assert!(!v2.contains_key(*p), "v2 still has deleted {p}");
    }
    assert_eq!(children(&v2, "opt/replace"), ["opt/replace/new"]);
    assert_eq!(children(&v2, "usr/share/doc"), Vec::<String>::new());
    assert_eq!(entry(&v2, "etc/data").link_group.as_deref(), Some("etc/data"));
    assert_eq!(entry(&v2, "etc/data-link").link_group.as_deref(), Some("etc/data"));
    assert_eq!(entry(&v2, "etc/data").nlink, 2);
    assert_eq!(entry(&v2, "bin/hello-link").target.as_deref(), Some("../etc/hello.txt"));
    assert_eq!(entry(&v2, "bin/suid").mode, 0o4755);
    assert_eq!(entry(&v2, "bin/sgid").mode, 0o2755);
    assert_eq!(entry(&v2, "tmp").mode, 0o1777);
    for p in ["home/user", "home/user/file"] {
        assert_eq!((entry(&v2, p).uid, entry(&v2, p).gid), (1000, 1000), "{p}");
    }
    assert_eq!(entry(&v2, "tmp/fifo").kind, Kind::Fifo);
    assert_eq!(entry(&v2, "dev/testnull").kind, Kind::CharDev);
    assert_eq!(entry(&v2, "dev/testnull").rdev, Some((1, 3)));
    assert_eq!(file_capability(&v2_root.join("bin/ping")).as_deref(), Some("cap_net_raw=ep"));
    assert_eq!(file_capability(&v2_root.join("bin/suid")), None);

    // The second layer carries real `.wh.` whiteouts, written by umoci.
    let m = layout_manifest(&layout, "v2");
    let layers = layer_digests(&m);
    assert_eq!(layers.len(), 2);
    let entries = layer_entries(&layout, &layers[1]);
    for wh in ["etc/.wh.remove-me", "usr/share/doc/.wh.pkg", "opt/replace/.wh.old1", "opt/replace/.wh.old2"] {
        assert!(entries.iter().any(|e| e == wh), "layer 2 lacks {wh}: {entries:?}");
    }

    let cfg = layout_config(&layout, "v2");
    assert_eq!(cfg["config"]["User"], "1000:1000");
    assert_eq!(cfg["config"]["WorkingDir"], "/home/user");
    assert_eq!(cfg["config"]["Entrypoint"], json!(["/bin/sh", "-c"]));
    assert_eq!(cfg["config"]["Cmd"], json!(["echo \"$GREETING\""]));

    // v3-opaque: a handmade opaque whiteout hides the lower directory's content.
    let m3 = layout_manifest(&layout, "v3-opaque");
    let layers3 = layer_digests(&m3);
    assert_eq!(layers3.len(), 3);
    assert_eq!(layers3[..2], layers[..]);
    assert!(layer_entries(&layout, &layers3[2]).iter().any(|e| e == "var/lib/opaque/.wh..wh..opq"));
    let v3 = tree_snapshot(&umoci_unpack(&layout, "v3-opaque"));
    assert_eq!(children(&v3, "var/lib/opaque"), ["var/lib/opaque/fresh"]);
    for p in LAYERED_OPAQUE_HIDDEN {
        assert!(!v3.contains_key(*p), "v3-opaque still has {p}");
    }
    // Everything outside the opaque directory is as in v2.
    let outside = |t: &BTreeMap<String, Entry>| -> BTreeMap<String, Entry> {
        t.iter().filter(|(k, _)| !k.starts_with("var")).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    assert_trees_equal(&outside(&v2), &outside(&v3));
}

#[test]
fn zstd_layout_has_zstd_layers_with_the_original_diff_ids() {
    let zstd = zstd_layout();
    let gzip = layered_layout();
    for tag in ["v1", "v2", "v3-opaque"] {
        let m = layout_manifest(&zstd, tag);
        for l in m["layers"].as_array().unwrap() {
            assert_eq!(l["mediaType"], MT_OCI_LAYER_ZSTD, "{tag}");
        }
        let cfg = layout_config(&zstd, tag);
        assert_eq!(cfg["rootfs"]["diff_ids"], layout_config(&gzip, tag)["rootfs"]["diff_ids"], "{tag}");
        let diff_ids: Vec<String> = layer_digests(&m)
            .iter()
            .map(|d| {
                let plain = run(tool("zstd").args(["-dc", "-q"]).arg(layout_blob_path(&zstd, d))).stdout;
                format!("sha256:{}", sha256_hex(&plain))
            })
            .collect();
        assert_eq!(json!(diff_ids), cfg["rootfs"]["diff_ids"], "{tag}");
    }
}

#[test]
fn docker_archive_holds_layered_v2() {
    let archive = docker_archive();
    let manifest: Value = serde_json::from_str(&run_stdout(tool("tar").arg("-xOf").arg(&archive).arg("manifest.json"))).unwrap();
    // skopeo writes the normalized name, not the short one it was given.
    assert_eq!(manifest[0]["RepoTags"], json!(["docker.io/library/layered:v2"]));
    assert_eq!(manifest[0]["Layers"].as_array().unwrap().len(), 2);
    let info: Value = serde_json::from_str(&run_stdout(tool("skopeo").arg("inspect").arg(format!("docker-archive:{}", archive.display())))).unwrap();
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Layers"].as_array().unwrap().len(), 2);
}

#[test]
fn multiarch_layout_is_an_index_of_two_platforms() {
    let layout = multiarch_layout();
    let top = layout_index(&layout);
    assert_eq!(top["manifests"].as_array().unwrap().len(), 1);
    let d = layout_descriptor(&layout, MULTIARCH_TAG);
    assert_eq!(d["mediaType"], MT_OCI_INDEX);
    let index = layout_manifest(&layout, MULTIARCH_TAG);
    assert_eq!(index["mediaType"], MT_OCI_INDEX);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    for (m, arch) in manifests.iter().zip(["amd64", "arm64"]) {
        assert_eq!(m["mediaType"], MT_OCI_MANIFEST);
        assert_eq!(m["platform"]["architecture"], arch);
        assert_eq!(m["platform"]["os"], "linux");
        let manifest = layout_json(&layout, m["digest"].as_str().unwrap());
        let cfg = layout_json(&layout, manifest["config"]["digest"].as_str().unwrap());
        assert_eq!(cfg["architecture"], arch);
        let last = layer_digests(&manifest).pop().unwrap();
        let marker = run_stdout(tool("tar").arg("-xzOf").arg(layout_blob_path(&layout, &last)).arg("etc/arch"));
        assert_eq!(marker.trim(), arch);
    }
    assert_eq!(manifests[1]["platform"]["variant"], "v8");
}

#[test]
fn cpio_oracles_round_trip_a_tree() {
    let rootfs = umoci_unpack(&layered_layout(), "v2");
    let source = tree_snapshot(&rootfs);
    let work = tempfile::tempdir().unwrap();
    let plain = work.path().join("initrd.cpio");
    run(tool("sh").arg("-c").arg(format!("cd '{}' && find . | sort | cpio -o -H newc --quiet > '{}'", rootfs.display(), plain.display())));
    let gz = work.path().join("initrd.cpio.gz");
    let zst = work.path().join("initrd.cpio.zst");
    fs::write(&gz, run(tool("gzip").arg("-c").arg(&plain)).stdout).unwrap();
    fs::write(&zst, run(tool("zstd").args(["-c", "-q"]).arg(&plain)).stdout).unwrap();

    for (file, compression) in [(&plain, Compression::None), (&gz, Compression::Gzip), (&zst, Compression::Zstd)] {
        assert_eq!(detect_compression(file), compression);
        let out = cpio_extract(file);
        let tree = tree_snapshot(&out);
        assert_trees_equal(&source, &tree);
        // cpio -m restores mtimes, so clamping can be checked on extracted trees.
        assert_eq!(entry(&tree, "etc/hello.txt").mtime, entry(&source, "etc/hello.txt").mtime);
    }

    let list = cpio_list(&gz);
    assert_eq!(list.len(), source.len() + 1, "the listing has every path plus '.'");
    let by_path: BTreeMap<&str, &CpioEntry> = list.iter().map(|e| (e.path.as_str(), e)).collect();
    assert_eq!(by_path["."].kind, Kind::Dir);
    // GNU cpio -o drops the leading "./" that find printed.
    assert_eq!(by_path["etc/data"].name, "etc/data");
    assert_eq!(by_path["bin/suid"].mode, 0o4755);
    assert_eq!(by_path["bin/sgid"].mode, 0o2755);
    assert_eq!(by_path["tmp"].mode, 0o1777);
    assert_eq!(by_path["dev/testnull"].kind, Kind::CharDev);
    assert_eq!(by_path["dev/testnull"].rdev, Some((1, 3)));
    assert_eq!(by_path["bin/hello-link"].target.as_deref(), Some("../etc/hello.txt"));
    assert_eq!(by_path["tmp/fifo"].kind, Kind::Fifo);
    assert_eq!((by_path["home/user/file"].uid, by_path["home/user/file"].gid), (1000, 1000));
    assert_eq!(by_path["etc/data-link"].nlink, 2);
    assert_eq!(by_path["bin/busybox"].size, entry(&source, "bin/busybox").size);
}

#[test]
fn cpio_line_parser_handles_devices_spaces_and_old_dates() {
    let e = parse_cpio_line("crw-r--r--   1 0        0          1,   3 Nov 22 00:03 dev/null").unwrap();
    assert_eq!((e.kind, e.mode, e.rdev, e.path.as_str()), (Kind::CharDev, 0o644, Some((1, 3)), "dev/null"));
    let e = parse_cpio_line("-rwsr-x--T   2 1000     100            5 Jan  1  1970 ./bin/a b  c").unwrap();
    assert_eq!((e.kind, e.mode, e.uid, e.gid, e.size), (Kind::File, 0o5750, 1000, 100, 5));
    assert_eq!((e.name.as_str(), e.path.as_str()), ("./bin/a b  c", "bin/a b  c"));
    let e = parse_cpio_line("lrwxrwxrwx   1 0        0              16 Nov 22 00:00 bin/x -> ../etc/y z").unwrap();
    assert_eq!((e.path.as_str(), e.target.as_deref()), ("bin/x", Some("../etc/y z")));
    assert!(parse_cpio_line("garbage").is_err());
}

#[test]
fn tree_diff_lists_each_mismatch_but_ignores_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("sub/a"), "a").unwrap();
    fs::hard_link(d.join("sub/a"), d.join("b")).unwrap();
    std::os::unix::fs::symlink("sub/a", d.join("link")).unwrap();
    let left = tree_snapshot(d);
    assert_eq!(left.len(), 4);
    assert_eq!(left["b"].link_group.as_deref(), Some("b"));
    assert_eq!(left["sub/a"].link_group.as_deref(), Some("b"));
    assert_eq!(left["link"].link_group, None);

    let mut right = left.clone();
    right.get_mut("sub/a").unwrap().mtime += 1000;
    right.get_mut("sub/a").unwrap().nlink = 1;
    assert!(diff_trees(&left, &right).is_empty(), "mtime and nlink must not be compared");

    right.get_mut("sub/a").unwrap().mode = 0o4755;
    right.get_mut("b").unwrap().sha256 = Some("0".repeat(64));
    right.remove("link");
    right.insert("extra".into(), left["sub"].clone());
    let diff = diff_trees(&left, &right);
    assert_eq!(diff.len(), 4, "{diff:#?}");
    assert!(diff.iter().any(|l| l.starts_with("~ sub/a: mode 0644 != 4755")), "{diff:#?}");
    assert!(diff.iter().any(|l| l.starts_with("~ b: sha256")), "{diff:#?}");
    assert!(diff.iter().any(|l| l.starts_with("- link: only in left")), "{diff:#?}");
    assert!(diff.iter().any(|l| l.starts_with("+ extra: only in right")), "{diff:#?}");

    let err = std::panic::catch_unwind(|| assert_trees_equal(&left, &right)).unwrap_err();
    let msg = err.downcast_ref::<String>().expect("panic message");
    assert!(msg.contains("trees differ in 4 place(s)") && msg.contains("~ sub/a: mode"), "{msg}");
}

#[test]
fn fixtures_are_cached_outside_the_repo_and_left_untouched_by_umoci() {
    let layout = layered_layout();
    let root = cache_root();
    assert!(layout.starts_with(&root), "{} not under {}", layout.display(), root.display());
    assert!(!layout.starts_with(env!("CARGO_MANIFEST_DIR")));
    let dir_name = layout.parent().unwrap().file_name().unwrap().to_string_lossy().into_owned();
    let key = dir_name.strip_prefix("layered-").expect("layered-KEY");
    assert_eq!(key.len(), 16);
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(fixture_build_seconds(&layout).is_some());
    assert_eq!(layered_layout(), layout);

    // Unpacking is read-only: index.json and the blob list stay the same.
    let listing = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(p.join("blobs/sha256")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v.push(fs::read_to_string(p.join("index.json")).unwrap());
        v
    };
    let before = listing(&layout);
    drop(umoci_unpack(&layout, "v2"));
    assert_eq!(listing(&layout), before);
}

// ---------------------------------------------------------------------------
// The fault-injecting proxy (common::proxy) against the real registry
// ---------------------------------------------------------------------------

/// `len` bytes of a fixed, incompressible-looking pattern.
fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

/// POSTs a new upload session for `repo` through `base` ("http://ADDR") and
/// returns its Location, which must point back at `base`.
fn start_upload(base: &str, repo: &str) -> String {
    let r = http("POST", &format!("{base}/v2/{repo}/blobs/uploads/"), &[], b"").expect("POST upload");
    assert_eq!(r.status, 202, "POST {repo}: {r:?}");
    let loc = r.header("Location").expect("Location").to_string();
    assert!(loc.starts_with(&format!("{base}/v2/{repo}/blobs/uploads/")), "{loc}");
    loc
}

/// `url` with `key=value` appended to its query.
fn with_query(url: &str, key: &str, value: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{key}={value}")
}

/// The upload UUID in an upload URL or target (".../blobs/uploads/UUID?...").
fn upload_uuid(url: &str) -> &str {
    let rest = &url[url.find("/blobs/uploads/").expect("an upload URL") + "/blobs/uploads/".len()..];
    rest.split('?').next().unwrap()
}

/// Size of the data an upload session holds on the registry's disk.
fn upload_data_len(reg: &Registry, repo: &str, uuid: &str) -> Option<u64> {
    let p = reg.storage_dir().join("docker/registry/v2/repositories").join(repo).join("_uploads").join(uuid).join("data");
    fs::metadata(p).ok().map(|m| m.len())
}

/// A registry error body's first code ("BLOB_UPLOAD_INVALID").
fn error_code(r: &HttpResponse) -> String {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or_else(|_| panic!("not JSON: {r:?}"));
    v["errors"][0]["code"].as_str().unwrap_or_default().to_string()
}

/// `data` as a chunked body of 64 KiB chunks.
fn chunk_encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in data.chunks(65_536) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

const OCTETS: (&str, &str) = ("Content-Type", "application/octet-stream");

#[test]
fn proxy_relays_a_skopeo_push_and_pull_and_counts_their_bytes() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let layered = layered_layout();
    run(tool("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false", "--dest-no-creds"])
        .arg(oci_ref(&layered, "v2"))
        .arg(format!("docker://{}/test/proxied:v2", proxy.addr())));
    let log = proxy.summary();

    // The image arrived (checked on the registry itself, not through the proxy).
    let desc = layout_descriptor(&layered, "v2");
    assert_eq!(skopeo_inspect(&reg, "test/proxied:v2", &[])["Digest"], desc["digest"]);

    // Every blob went up through the proxy: the PATCH and PUT body bytes of
    // the session its 201 PUT ?digest= closed add up to the blob's size.
    let manifest = layout_manifest(&layered, "v2");
    let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
    for d in std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap()) {
        sizes.insert(d["digest"].as_str().unwrap().to_string(), d["size"].as_u64().unwrap());
    }
    assert_eq!(sizes.len(), 3);
    let uploads = proxy.matching(None, "/v2/test/proxied/blobs/uploads/");
    let mut sent: BTreeMap<String, u64> = BTreeMap::new();
    for put in uploads.iter().filter(|s| s.method == "PUT" && s.status == Some(201)) {
        let uuid = upload_uuid(&put.path);
        let digest = put.path.split("digest=").nth(1).unwrap().split('&').next().unwrap().replace("%3A", ":");
        let bytes: u64 =
            uploads.iter().filter(|s| (s.method == "PATCH" || s.method == "PUT") && upload_uuid(&s.path) == uuid).map(|s| s.request_body_bytes).sum();
        sent.insert(digest, bytes);
    }
    assert_eq!(sent, sizes, "{log}");
    // The registry's Locations name the proxy: the client's Host went through.
    let base = format!("http://{}/", proxy.addr());
    for post in uploads.iter().filter(|s| s.method == "POST") {
        assert_eq!(post.status, Some(202), "{log}");
        assert!(post.response_header("Location").unwrap().starts_with(&base), "{log}");
    }
    let put_manifest = proxy.matching(Some("PUT"), "/v2/test/proxied/manifests/v2");
    assert_eq!(put_manifest.len(), 1, "{log}");
    assert_eq!(put_manifest[0].status, Some(201));
    assert_eq!(put_manifest[0].request_body_bytes, desc["size"].as_u64().unwrap());
    assert!(proxy.requests().iter().all(|s| s.fault.is_none() && s.note.is_none()), "{log}");

    // And down again: the blob GETs relay exactly the blobs' bytes.
    proxy.clear_requests();
    let out = tempfile::tempdir().unwrap();
    run(tool("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false", "--src-no-creds"])
        .arg(format!("docker://{}/test/proxied:v2", proxy.addr()))
        .arg(oci_ref(out.path(), "v2")));
    assert_eq!(layout_descriptor(out.path(), "v2")["digest"], desc["digest"]);
    assert_eq!(proxy.response_body_bytes(Some("GET"), "/v2/test/proxied/blobs/sha256:"), sizes.values().sum::<u64>(), "{}", proxy.summary());
}

#[test]
fn proxy_answers_injected_errors_on_the_chosen_request_only() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());

    // 500 on the first GET /v2/; the next one goes through.
    let ping = proxy.add(Rule::new(Some("GET"), "/v2/", Fault::status(500)));
    assert_eq!(http_status(&proxy.addr(), "/v2/", None), Some(500));
    assert_eq!(proxy.fired(ping), 1);
    assert_eq!(http_status(&proxy.addr(), "/v2/", None), Some(200));
    assert_eq!(http_status(&proxy.addr(), "/v2/", None), Some(200));
    assert_eq!((proxy.fired(ping), proxy.matched(ping)), (1, 3));

    // 429 with Retry-After on the second manifest request, all three on one
    // kept-alive client connection.
    let busy = proxy.add(Rule::new(None, "/manifests/", Fault::too_many_requests(1)).nth(2));
    let mut conn = std::net::TcpStream::connect(proxy.addr()).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut statuses = Vec::new();
    for method in ["GET", "HEAD", "GET"] {
        use std::io::Write as _;
        write!(conn, "{method} /v2/test/none/manifests/latest HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr()).unwrap();
        let r = read_response(&mut reader, method).unwrap();
        assert!(r.complete);
        if r.status == 429 {
            assert_eq!(r.header("Retry-After"), Some("1"));
            assert!(r.body.is_empty(), "a HEAD answer has no body");
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses, [404, 429, 404], "{}", proxy.summary());
    assert_eq!(proxy.fired(busy), 1);
    let seen = proxy.matching(None, "/manifests/");
    assert_eq!(seen[1].fault, Some(Fault::too_many_requests(1)));
    assert_eq!(seen[1].rule, Some(busy));
    assert_eq!(seen.iter().filter(|s| s.fault.is_some()).count(), 1);
    // The registry never saw the injected one.
    let access = reg.log().lines().filter(|l| l.starts_with("127.0.0.1 - -") && l.contains("/manifests/latest")).count();
    assert_eq!(access, 2, "{}", reg.log());
}

/// Pins what docker-registry 2.8 does with an upload whose PATCH connection
/// drops mid-body (A: Content-Length, B: chunked after a good PATCH) or whose
/// answer is lost (C); the findings are written down in the doc of
/// tests/common/proxy.rs, "docker-registry 2.8 and a dropped PATCH".
#[test]
fn proxy_drop_mid_patch_shows_how_the_registry_treats_a_partial_upload() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let base = format!("http://{}", proxy.addr());
    let blob = pattern(1 << 20);
    let digest = format!("sha256:{}", sha256_hex(&blob));

    // A: the first PATCH (1 MiB, Content-Length) drops after 300000 bytes.
    let l0 = start_upload(&base, "test/a");
    let uuid = upload_uuid(&l0).to_string();
    let drop = proxy.add(Rule::new(Some("PATCH"), "/v2/test/a/", Fault::DropAfterRequestBytes(300_000)));
    assert!(http("PATCH", &l0, &[OCTETS], &blob).is_err(), "the client must see the drop");
    assert_eq!(proxy.fired(drop), 1);
    let patch = &proxy.matching(Some("PATCH"), "/v2/test/a/")[0];
    assert_eq!((patch.status, patch.request_body_bytes), (None, 300_000), "{patch}");
    assert!(patch.note.as_deref().unwrap().contains("499"), "{patch}");
    assert!(reg.log().contains("client disconnected during blob PATCH"), "{}", reg.log());
    assert!(reg.log().contains("copied=300000"), "{}", reg.log());
    assert_eq!(upload_data_len(&reg, "test/a", &uuid), Some(300_000));
    let after = http("GET", &l0, &[], b"").unwrap();
    assert_eq!((after.status, error_code(&after).as_str()), (404, "BLOB_UPLOAD_INVALID"), "{after:?}");
    assert_eq!(after.header("Range"), None);
    assert_eq!(after.header("Docker-Upload-UUID"), None);
    assert!(reg.log().contains("upload resumed at wrong offest: 300000 != 0"), "{}", reg.log());
    let no_state = l0.split('?').next().unwrap();
    let r = http("GET", no_state, &[], b"").unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (404, "BLOB_UPLOAD_INVALID"));
    let rest = http("PATCH", &l0, &[OCTETS, ("Content-Range", "300000-1048575")], &blob[300_000..]).unwrap();
    assert_eq!((rest.status, error_code(&rest).as_str()), (404, "BLOB_UPLOAD_INVALID"));
    let put = http("PUT", &with_query(&l0, "digest", &digest), &[OCTETS], &blob[300_000..]).unwrap();
    assert_eq!((put.status, error_code(&put).as_str()), (404, "BLOB_UPLOAD_INVALID"));

    // B: a good first PATCH, then a chunked PATCH dropping after 100000 of
    // its bytes: neither Location works afterwards.
    let l0 = start_upload(&base, "test/b");
    let uuid = upload_uuid(&l0).to_string();
    let p1 = http("PATCH", &l0, &[OCTETS], &blob[..262_144]).unwrap();
    assert_eq!((p1.status, p1.header("Range")), (202, Some("0-262143")));
    let l1 = p1.header("Location").unwrap().to_string();
    let chunked = chunk_encode(&blob[262_144..]);
    let drop = proxy.add(Rule::new(Some("PATCH"), "/v2/test/b/", Fault::DropAfterRequestBytes(100_000)));
    assert!(http("PATCH", &l1, &[OCTETS, ("Transfer-Encoding", "chunked")], &chunked).is_err());
    assert_eq!(proxy.fired(drop), 1);
    assert_eq!(upload_data_len(&reg, "test/b", &uuid), Some(362_144));
    for l in [&l1, &l0] {
        let r = http("GET", l, &[], b"").unwrap();
        assert_eq!((r.status, error_code(&r).as_str()), (404, "BLOB_UPLOAD_INVALID"), "{r:?}");
    }

    // A fresh session is the way out; the proxy forwards a chunked body whole.
    let l0 = start_upload(&base, "test/b");
    let p = http("PATCH", &l0, &[OCTETS, ("Transfer-Encoding", "chunked")], &chunk_encode(&blob)).unwrap();
    assert_eq!((p.status, p.header("Range")), (202, Some("0-1048575")));
    let last = proxy.matching(Some("PATCH"), "/v2/test/b/").pop().unwrap();
    assert_eq!(last.request_body_bytes, 1 << 20);
    let put = http("PUT", &with_query(p.header("Location").unwrap(), "digest", &digest), &[], b"").unwrap();
    assert_eq!((put.status, put.header("Docker-Content-Digest")), (201, Some(digest.as_str())), "{put:?}");

    // C: the registry got the whole PATCH, the client lost the answer.
    let l0 = start_upload(&base, "test/c");
    let lost = proxy.add(Rule::new(Some("PATCH"), "/v2/test/c/", Fault::DropResponse));
    assert!(http("PATCH", &l0, &[OCTETS], &blob[..1000]).is_err());
    assert_eq!(proxy.fired(lost), 1);
    assert_eq!(upload_data_len(&reg, "test/c", upload_uuid(&l0)), Some(1000));
    let r = http("GET", &l0, &[], b"").unwrap();
    assert_eq!((r.status, error_code(&r).as_str()), (404, "BLOB_UPLOAD_INVALID"), "{r:?}");
}

/// The other half of the findings in tests/common/proxy.rs: a session
/// survives a failed PATCH only when none of its body reached the registry.
#[test]
fn registry_resumes_an_upload_only_when_no_byte_of_the_failed_patch_arrived() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let base = format!("http://{}", proxy.addr());
    let blob = pattern(1 << 20);
    let digest = format!("sha256:{}", sha256_hex(&blob));

    // An empty session already says "0-0".
    let l0 = start_upload(&base, "test/resume");
    let uuid = upload_uuid(&l0).to_string();
    let empty = http("GET", &l0, &[], b"").unwrap();
    assert_eq!((empty.status, empty.header("Range")), (204, Some("0-0")));
    // ... and so does one holding a single byte.
    let one = http("PATCH", &start_upload(&base, "test/one"), &[OCTETS], b"x").unwrap();
    assert_eq!((one.status, one.header("Range")), (202, Some("0-0")));

    let p1 = http("PATCH", &l0, &[OCTETS], &blob[..262_144]).unwrap();
    assert_eq!(p1.status, 202);
    let l1 = p1.header("Location").unwrap().to_string();
    assert_ne!(l1, l0, "each PATCH answer carries a new _state");

    // The second PATCH drops after its head, before any body byte.
    let drop = proxy.add(Rule::new(Some("PATCH"), "/v2/test/resume/", Fault::DropAfterRequestBytes(0)));
    assert!(http("PATCH", &l1, &[OCTETS], &blob[262_144..]).is_err());
    assert_eq!(proxy.fired(drop), 1);
    assert_eq!(upload_data_len(&reg, "test/resume", &uuid), Some(262_144));

    // A stale Location is refused without harming the session.
    let stale = http("GET", &l0, &[], b"").unwrap();
    assert_eq!((stale.status, error_code(&stale).as_str()), (404, "BLOB_UPLOAD_INVALID"));

    // The last Location reports where to go on, and takes the rest.
    let status = http("GET", &l1, &[], b"").unwrap();
    assert_eq!(status.status, 204, "{status:?}");
    assert_eq!(status.header("Range"), Some("0-262143"));
    assert_eq!(status.header("Docker-Upload-UUID"), Some(uuid.as_str()));
    assert_eq!(status.header("Location"), Some(l1.as_str()), "GET repeats the current Location");
    // Content-Range is not checked: the registry appends what comes.
    let p2 = http("PATCH", &l1, &[OCTETS, ("Content-Range", "1-2")], &blob[262_144..]).unwrap();
    assert_eq!((p2.status, p2.header("Range")), (202, Some("0-1048575")));
    let put = http("PUT", &with_query(p2.header("Location").unwrap(), "digest", &digest), &[], b"").unwrap();
    assert_eq!((put.status, put.header("Docker-Content-Digest")), (201, Some(digest.as_str())), "{put:?}");
    let got = http("GET", &format!("{base}/v2/test/resume/blobs/{digest}"), &[], b"").unwrap();
    assert_eq!((got.status, got.body.len()), (200, blob.len()));
    assert!(got.body == blob);
    // In all, the session forwarded the blob once: nothing twice.
    assert_eq!(proxy.request_body_bytes(None, &format!("/blobs/uploads/{uuid}")), blob.len() as u64);
}

#[test]
fn proxy_stalls_truncates_and_flips_as_told() {
    use std::time::{Duration, Instant};
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let base = format!("http://{}", proxy.addr());
    let blob = pattern(200_000);
    let digest = format!("sha256:{}", sha256_hex(&blob));
    // A monolithic upload: POST, then PUT ?digest= with the whole body.
    let l0 = start_upload(&base, "test/faults");
    let put = http("PUT", &with_query(&l0, "digest", &digest), &[OCTETS], &blob).unwrap();
    assert_eq!(put.status, 201);
    let url = format!("{base}/v2/test/faults/blobs/{digest}");

    // Stall: held, then answered.
    let stall = proxy.add(Rule::new(Some("GET"), "/v2/", Fault::Stall(Duration::from_millis(1500))));
    let t = Instant::now();
    assert_eq!(http_status(&proxy.addr(), "/v2/", None), Some(200));
    assert!(t.elapsed() >= Duration::from_millis(1500), "{:?}", t.elapsed());
    assert_eq!(proxy.fired(stall), 1);

    // Stall forever: the client gives up, the proxy serves others meanwhile.
    let forever = proxy.add(Rule::new(Some("GET"), "/v2/_stall", Fault::StallForever));
    let mut s = std::net::TcpStream::connect(proxy.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    {
        use std::io::{Read as _, Write as _};
        write!(s, "GET /v2/_stall HTTP/1.1\r\nHost: {}\r\n\r\n", proxy.addr()).unwrap();
        assert_eq!(http_status(&proxy.addr(), "/v2/", None), Some(200));
        let mut buf = [0u8; 16];
        let e = s.read(&mut buf).expect_err("no answer");
        assert!(matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{e}");
    }
    drop(s);
    assert_eq!(proxy.fired(forever), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let stalled = loop {
        let s = proxy.requests().into_iter().find(|s| s.rule == Some(forever)).unwrap();
        if s.note.is_some() || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(stalled.status, None);
    assert!(stalled.note.unwrap().contains("client closed"));

    // Truncate: the head promises 200000 bytes, 1000 come.
    let cut = proxy.add(Rule::new(Some("GET"), "/blobs/sha256:", Fault::TruncateResponse(1000)));
    let r = http("GET", &url, &[], b"").unwrap();
    assert_eq!((r.status, r.header("Content-Length")), (200, Some("200000")));
    assert!(!r.complete);
    assert_eq!(r.body, blob[..1000]);
    assert_eq!(proxy.fired(cut), 1);
    assert_eq!(proxy.matching(Some("GET"), "/blobs/sha256:")[0].response_body_bytes, 1000);

    // Flip: one byte differs, at the offset asked for; HEAD has no body to flip.
    let flip = proxy.add(Rule::new(None, "/blobs/sha256:", Fault::FlipResponseByte(150_000)).times(2));
    let head = http("HEAD", &url, &[], b"").unwrap();
    assert_eq!((head.status, head.body.len(), head.complete), (200, 0, true));
    let r = http("GET", &url, &[], b"").unwrap();
    assert!(r.complete);
    assert_eq!(r.body.len(), blob.len());
    let diffs: Vec<usize> = (0..blob.len()).filter(|&i| r.body[i] != blob[i]).collect();
    assert_eq!(diffs, [150_000]);
    assert_eq!(r.body[150_000], !blob[150_000]);
    assert_eq!((proxy.fired(flip), proxy.matched(flip)), (1, 2), "{}", proxy.summary());

    // A truncation beyond the body does not fire; the body comes whole.
    let long = proxy.add(Rule::new(Some("GET"), "/blobs/sha256:", Fault::TruncateResponse(1 << 30)));
    let r = http("GET", &url, &[], b"").unwrap();
    assert!(r.complete && r.body == blob);
    assert_eq!((proxy.fired(long), proxy.matched(long)), (0, 1));
}

#[test]
fn proxy_drop_ends_its_threads_and_port() {
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let addr = proxy.addr();
    proxy.add(Rule::new(None, "", Fault::StallForever));
    // A stalled request and an idle kept-alive connection are open when the
    // proxy goes.
    let stalled = std::net::TcpStream::connect(&addr).unwrap();
    {
        use std::io::Write as _;
        (&stalled).write_all(format!("GET /v2/ HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).unwrap();
    }
    let _idle = std::net::TcpStream::connect(&addr).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t = std::time::Instant::now();
    drop(proxy);
    assert!(t.elapsed() < std::time::Duration::from_secs(3), "{:?}", t.elapsed());
    {
        use std::io::Read as _;
        stalled.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 1];
        assert_eq!((&stalled).read(&mut buf).unwrap_or(0), 0, "the stalled connection is closed");
    }
    assert_eq!(http_status(&addr, "/v2/", None), None, "nothing listens any more");
}

#[test]
fn proxy_answers_expect_100_continue_itself() {
    // curl waits up to a second for "100 Continue" before sending a body; the
    // proxy answers it at once and does not forward the Expect.
    let reg = Registry::start();
    let proxy = FaultProxy::start(&reg.addr());
    let base = format!("http://{}", proxy.addr());
    let blob = pattern(3 << 20);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blob");
    fs::write(&file, &blob).unwrap();
    let l0 = start_upload(&base, "test/curl");
    let t = std::time::Instant::now();
    let out = run_stdout(
        tool("curl")
            .args(["-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PATCH"])
            .args(["-H", "Content-Type: application/octet-stream", "-H", "Expect: 100-continue"])
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(&l0),
    );
    assert_eq!(out, "202");
    assert!(t.elapsed() < std::time::Duration::from_millis(900), "{:?}", t.elapsed());
    let patch = proxy.matching(Some("PATCH"), "/v2/test/curl/").pop().unwrap();
    assert_eq!(patch.request_header("Expect"), Some("100-continue"));
    assert_eq!((patch.status, patch.request_body_bytes), (Some(202), blob.len() as u64));
    assert_eq!(patch.response_header("Range"), Some("0-3145727"));
}
