//! End-to-end: real images (debootstrap, umoci, skopeo), a real registry, our
//! binary, and the format owners as oracles (GNU cpio, gzip, zstd, umoci).

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::*;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-it-").tempdir().unwrap()
}

/// The initrd's tree, extracted by GNU cpio, equals umoci's unpack of the
/// same image (modes, owners, link targets, contents, hard links).
fn assert_matches_umoci(initrd: &Path, layout: &Path, tag: &str) {
    let ours = cpio_extract(initrd);
    let theirs = umoci_unpack(layout, tag);
    assert_trees_equal(&tree_snapshot(&ours), &tree_snapshot(&theirs));
}

#[test]
fn debian_image_to_gzip_initrd_matches_umoci_and_is_reproducible() {
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let layout = debian_layout();
    let image = oci_ref(&layout, DEBIAN_TAG);
    let first = tmp.path().join("a.cpio.gz");
    let second = tmp.path().join("b.cpio.gz");
    let report = tmp.path().join("report.json");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&first), "--report", path_str(&report)], &cache);
    build_ok(&["initrd", "--image", &image, "-o", path_str(&second), "--threads", "1"], &cache);

    run(tool("gzip").arg("-t").arg(&first));
    assert_eq!(sha256_file(&first), sha256_file(&second), "two builds (2 threads vs 1) must be byte-identical");
    assert_matches_umoci(&first, &layout, DEBIAN_TAG);

    // mtimes are clamped to the image's `created`, the default SOURCE_DATE_EPOCH.
    let report: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(report["epoch_source"], "image-created");
    let epoch = report["source_date_epoch"].as_i64().unwrap();
    let extracted = cpio_extract(&first);
    let snapshot = tree_snapshot(&extracted);
    assert!(snapshot.len() > 5000, "a Debian minbase has thousands of entries, got {}", snapshot.len());
    // GNU cpio -m restores the mtimes of files (not of symlinks or directories).
    let late: Vec<_> = snapshot.iter().filter(|(_, e)| e.kind == Kind::File && e.mtime > epoch).map(|(p, _)| p).collect();
    assert!(late.is_empty(), "entries newer than SOURCE_DATE_EPOCH: {late:?}");
    assert_eq!(report["initrd"]["sha256"].as_str().unwrap(), sha256_file(&first));
}

/// `--source-date-epoch` clamps the mtime of every entry, directories and
/// symlinks included: newer ones become the epoch, older ones stay. The
/// headers are read exactly (`cpio_mtimes`, held to GNU cpio's listing); GNU
/// `cpio -idm`, which restores the mtimes of files only, agrees for those.
#[test]
fn explicit_source_date_epoch_clamps_every_mtime() {
    const EPOCH: i64 = 86400;
    let tmp = scratch();
    let out = tmp.path().join("x.cpio");
    build_ok(
        &["initrd", "--image", &oci_ref(&layered_layout(), "v3-opaque"), "-o", path_str(&out), "--compress", "none", "--source-date-epoch", &EPOCH.to_string()],
        &tmp.path().join("cache"),
    );
    let entries = cpio_mtimes(&out);
    for kind in [Kind::File, Kind::Dir, Kind::Symlink] {
        let n = entries.iter().filter(|(_, k, _)| *k == kind).count();
        assert!(n >= 2, "the layered image must give {kind:?} entries to check, found {n}: {entries:?}");
    }
    // The fixture's files were made when it was built, long after the epoch,
    // except v3-opaque's last layer, tarred with --mtime=@0 (older: kept).
    let older = ["var", "var/lib", "var/lib/opaque", "var/lib/opaque/fresh"];
    let expected = |path: &str| if older.contains(&path) { 0 } else { EPOCH };
    let wrong: Vec<_> = entries.iter().filter(|(path, _, mtime)| *mtime != expected(path)).collect();
    assert!(wrong.is_empty(), "entries whose mtime is not min(original, {EPOCH}): {wrong:?}");
    assert!(older.iter().all(|p| entries.iter().any(|(path, _, _)| path == p)), "{older:?} must be in the archive");

    let snapshot = tree_snapshot(&cpio_extract(&out));
    let files: Vec<_> = snapshot.iter().filter(|(_, e)| e.kind == Kind::File).collect();
    assert!(!files.is_empty());
    for (path, e) in files {
        assert_eq!(e.mtime, expected(path), "{path}: mtime after GNU cpio -idm");
    }
}

#[test]
fn layered_image_from_registry_applies_whiteouts_and_keeps_special_files() {
    let registry = Registry::start();
    let layout = layered_layout();
    for tag in ["v2", "v3-opaque"] {
        push(&oci_ref(&layout, tag), &registry, &format!("layered:{tag}"), &[]);
    }
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    for tag in ["v2", "v3-opaque"] {
        let out = tmp.path().join(format!("{tag}.cpio.gz"));
        build_ok(&["initrd", "--image", &registry.docker_ref(&format!("layered:{tag}")), "-o", path_str(&out)], &cache);
        assert_matches_umoci(&out, &layout, tag);
        let names: Vec<String> = cpio_list(&out).into_iter().map(|e| e.path).collect();
        assert!(!names.iter().any(|n| n.rsplit('/').next().unwrap().starts_with(".wh.")), "whiteout files leaked: {names:?}");
        for deleted in LAYERED_DELETED {
            assert!(!names.iter().any(|n| n == deleted), "{deleted} should be deleted in {tag}");
        }
        if tag == "v3-opaque" {
            for hidden in LAYERED_OPAQUE_HIDDEN {
                assert!(!names.iter().any(|n| n == hidden), "{hidden} should be hidden by the opaque dir");
            }
        }
    }
}

#[test]
fn docker_v2s2_manifests_and_docker_archives_are_accepted() {
    let registry = Registry::start();
    let layout = layered_layout();
    push(&oci_ref(&layout, "v2"), &registry, "layered:v2s2", &["--format", "v2s2"]);
    let raw = skopeo_inspect(&registry, "layered:v2s2", &["--raw"]);
    assert_eq!(raw["mediaType"], MT_DOCKER_MANIFEST);
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("v2s2.cpio.gz");
    build_ok(&["initrd", "--image", &registry.image_ref("layered:v2s2"), "-o", path_str(&out)], &cache);
    assert_matches_umoci(&out, &layout, "v2");

    let archive = docker_archive();
    let out = tmp.path().join("archive.cpio.gz");
    build_ok(&["initrd", "--image", &format!("docker-archive:{}", archive.display()), "-o", path_str(&out)], &cache);
    assert_matches_umoci(&out, &layout, "v2");
}

#[test]
fn zstd_layers_in_and_zstd_initrd_out() {
    let tmp = scratch();
    let layout = zstd_layout();
    assert_eq!(layout_manifest(&layout, "v2")["layers"][0]["mediaType"], MT_OCI_LAYER_ZSTD);
    let out = tmp.path().join("z.cpio.zst");
    build_ok(&["initrd", "--image", &oci_ref(&layout, "v2"), "-o", path_str(&out), "--compress", "zstd"], &tmp.path().join("cache"));
    run(tool("zstd").arg("-tq").arg(&out));
    assert!(matches!(detect_compression(&out), common::Compression::Zstd));
    assert_matches_umoci(&out, &layered_layout(), "v2");
}

#[test]
fn multi_arch_index_picks_the_platform_or_lists_what_exists() {
    let registry = Registry::start();
    push_multiarch(&registry, "multi:latest");
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let image = registry.docker_ref("multi:latest");
    let arch_of = |out: &Path| {
        let extracted = cpio_extract(out);
        fs::read_to_string(extracted.join("etc/arch")).unwrap().trim().to_string()
    };
    let amd = tmp.path().join("amd.cpio");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&amd), "--compress", "none"], &cache);
    assert_eq!(arch_of(&amd), "amd64");
    let arm = tmp.path().join("arm.cpio");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&arm), "--compress", "none", "--platform", "linux/arm64"], &cache);
    assert_eq!(arch_of(&arm), "arm64");
    let err = build_err(&["initrd", "--image", &image, "-o", path_str(&tmp.path().join("s.cpio")), "--platform", "linux/s390x"], &cache);
    assert!(err.contains("no manifest for linux/s390x") && err.contains("linux/amd64") && err.contains("linux/arm64/v8"), "{err}");
    // The same index from an OCI layout.
    let layout_out = tmp.path().join("layout-arm.cpio");
    build_ok(
        &["initrd", "--image", &oci_ref(&multiarch_layout(), MULTIARCH_TAG), "-o", path_str(&layout_out), "--compress", "none", "--platform", "linux/arm64/v8"],
        &cache,
    );
    assert_eq!(arch_of(&layout_out), "arm64");
}

#[test]
fn htpasswd_registry_needs_credentials_from_flags_or_docker_config() {
    let registry = Registry::start_with_htpasswd("alice", "s3cret");
    push(&oci_ref(&layered_layout(), "v1"), &registry, "private:v1", &[]);
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let image = registry.docker_ref("private:v1");
    let out = tmp.path().join("p.cpio.gz");
    let empty_home = tmp.path().join("home");
    fs::create_dir_all(&empty_home).unwrap();

    let anonymous = osbuilder()
        .args(["initrd", "--image", &image, "-o", path_str(&out), "--cache-dir", path_str(&cache)])
        .env("HOME", &empty_home)
        .env_remove("DOCKER_CONFIG")
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&anonymous.stderr);
    assert!(!anonymous.status.success() && err.to_lowercase().contains("auth"), "anonymous pull must fail naming auth: {err}");
    assert!(!out.exists());

    let wrong = build_err(&["initrd", "--image", &image, "-o", path_str(&out), "--creds", "alice:wrong"], &cache);
    assert!(wrong.to_lowercase().contains("auth") || wrong.contains("401"), "{wrong}");

    build_ok(&["initrd", "--image", &image, "-o", path_str(&out), "--creds", "alice:s3cret"], &cache);
    assert_matches_umoci(&out, &layered_layout(), "v1");

    // Credentials from a docker config.json, with a fresh cache so blobs are pulled again.
    let docker_config = tmp.path().join("docker");
    fs::create_dir_all(&docker_config).unwrap();
    let auth = base64_encode(b"alice:s3cret");
    fs::write(docker_config.join("config.json"), format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr())).unwrap();
    let out2 = tmp.path().join("p2.cpio.gz");
    let status = osbuilder()
        .args(["initrd", "--image", &image, "-o", path_str(&out2), "--cache-dir", path_str(&tmp.path().join("cache2"))])
        .env("DOCKER_CONFIG", &docker_config)
        .env_remove("REGISTRY_AUTH_FILE")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert_eq!(sha256_file(&out), sha256_file(&out2));
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[test]
fn second_build_pulls_no_blobs() {
    let registry = Registry::start();
    push(&oci_ref(&layered_layout(), "v2"), &registry, "cached:v2", &[]);
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let image = registry.docker_ref("cached:v2");
    let blob_gets = |log: &str| log.lines().filter(|l| l.contains("GET /v2/cached/blobs/")).count();
    build_ok(&["initrd", "--image", &image, "-o", path_str(&tmp.path().join("1.gz"))], &cache);
    let after_first = blob_gets(&registry.log());
    assert!(after_first >= 3, "the first build pulls config and layers ({after_first} blob GETs)\n{}", registry.log());
    build_ok(&["initrd", "--image", &image, "-o", path_str(&tmp.path().join("2.gz"))], &cache);
    assert_eq!(blob_gets(&registry.log()), after_first, "the second build must pull no blob");
    assert_eq!(sha256_file(&tmp.path().join("1.gz")), sha256_file(&tmp.path().join("2.gz")));
}

/// Copies a layout so a test can damage it.
fn copy_layout(layout: &Path, dest: &Path) -> PathBuf {
    run(tool("cp").arg("-a").arg(layout).arg(dest));
    dest.to_path_buf()
}

#[test]
fn corrupted_blob_is_named_and_the_old_output_survives() {
    let tmp = scratch();
    let layout = copy_layout(&layered_layout(), &tmp.path().join("layout"));
    let manifest = layout_manifest(&layout, "v2");
    let layer = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    let blob = layout_blob_path(&layout, &layer);
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();

    let out = tmp.path().join("keep.cpio.gz");
    fs::write(&out, b"previous good output").unwrap();
    let err = build_err(&["initrd", "--image", &oci_ref(&layout, "v2"), "-o", path_str(&out)], &tmp.path().join("cache"));
    assert!(err.contains("digest mismatch") && err.contains(&layer), "error must name the blob: {err}");
    assert_eq!(fs::read(&out).unwrap(), b"previous good output");
    let leftovers: Vec<_> = fs::read_dir(tmp.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");
}

#[test]
fn add_remove_and_size_warnings() {
    let tmp = scratch();
    let host = tmp.path().join("host");
    fs::create_dir_all(host.join("conf.d")).unwrap();
    fs::write(host.join("init"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::write(host.join("conf.d/a.conf"), b"a=1\n").unwrap();
    let out = tmp.path().join("added.cpio");
    let result = build_ok(
        &[
            "initrd",
            "--image",
            &oci_ref(&layered_layout(), "v2"),
            "-o",
            path_str(&out),
            "--compress",
            "none",
            "--add",
            &format!("{}:/sbin/init:0700", host.join("init").display()),
            "--add",
            &format!("{}:/etc/conf.d", host.join("conf.d").display()),
            "--remove",
            "/bin/ping",
            "--guest-mem",
            "1M",
        ],
        &tmp.path().join("cache"),
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("warning") && stderr.contains("guest RAM"), "a 1M guest must get a size warning: {stderr}");
    let listing = cpio_list(&out);
    let init = listing.iter().find(|e| e.path == "sbin/init").expect("sbin/init added");
    assert_eq!((init.mode, init.uid, init.gid), (0o700, 0, 0));
    assert!(listing.iter().any(|e| e.path == "etc/conf.d/a.conf"));
    assert!(!listing.iter().any(|e| e.path == "bin/ping"), "removed path must be gone");
    let extracted = cpio_extract(&out);
    assert_eq!(fs::read(extracted.join("sbin/init")).unwrap(), b"#!/bin/sh\necho hi\n");
}

#[test]
fn inspect_shows_manifest_config_and_layers() {
    let tmp = scratch();
    let layout = layered_layout();
    let out = build_ok(&["inspect", "--json", &oci_ref(&layout, "v2")], &tmp.path().join("cache"));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let manifest = layout_manifest(&layout, "v2");
    assert_eq!(doc["image"]["platform"], "linux/amd64");
    assert_eq!(doc["image"]["layers"].as_array().unwrap().len(), manifest["layers"].as_array().unwrap().len());
    assert_eq!(doc["image"]["layers"][0]["digest"], manifest["layers"][0]["digest"]);
    assert_eq!(doc["image"]["config_digest"], manifest["config"]["digest"]);
    let text = build_ok(&["inspect", &oci_ref(&layout, "v2")], &tmp.path().join("cache"));
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("platform:  linux/amd64") && text.contains("layers:"), "{text}");
}

#[test]
fn unusable_references_fail_clearly() {
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("x.gz");
    let err = build_err(&["initrd", "--image", &oci_ref(&layered_layout(), "nope"), "-o", path_str(&out)], &cache);
    assert!(err.contains("no image tagged \"nope\""), "{err}");
    let err = build_err(&["initrd", "--image", "oci:/does/not/exist", "-o", path_str(&out)], &cache);
    assert!(err.contains("not an OCI image layout"), "{err}");
    let registry = Registry::start();
    let err = build_err(&["initrd", "--image", &registry.docker_ref("missing:tag"), "-o", path_str(&out)], &cache);
    assert!(err.contains("cannot fetch the manifest"), "{err}");
    assert!(!out.exists());
}

#[test]
fn registry_failing_mid_transfer_leaves_no_partial_blob_or_output() {
    let registry = Registry::start();
    let layout = layered_layout();
    push(&oci_ref(&layout, "v1"), &registry, "flaky:v1", &[]);
    let layer = layout_manifest(&layout, "v1")["layers"][0]["digest"].as_str().unwrap().to_string();
    // Every GET of the layer is cut after 64 KiB; one retry (resumed from
    // the byte it reached) is cut too. tests/pull_faults.rs has the faults
    // a pull survives.
    let proxy = testkit::proxy::FaultProxy::start(&registry.addr());
    let cut = proxy.add(testkit::proxy::Rule::new(Some("GET"), &format!("/blobs/{layer}"), testkit::proxy::Fault::TruncateResponse(64 * 1024)).always());
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let out = tmp.path().join("flaky.cpio.gz");
    let image = format!("docker://{}/flaky:v1", proxy.addr());
    let err = build_err(&["initrd", "--image", &image, "-o", path_str(&out), "--retries", "1"], &cache);
    assert_eq!(proxy.fired(cut), 2, "{}", proxy.summary());
    assert!(err.contains(&layer) && err.contains("gave up after 2 attempts"), "the error must name the blob: {err}");
    assert!(!out.exists(), "no output after a failed pull");
    let hex = layer.trim_start_matches("sha256:");
    assert!(!cache.join("blobs/sha256").join(hex).exists(), "a partial blob must not land in the cache");
    let tmp_files = fs::read_dir(cache.join("blobs/tmp")).map(|d| d.count()).unwrap_or(0);
    assert_eq!(tmp_files, 0, "no temporary blob files left behind");
    // Straight from the registry the same build then works.
    build_ok(&["initrd", "--image", &registry.docker_ref("flaky:v1"), "-o", path_str(&out)], &cache);
    assert_matches_umoci(&out, &layout, "v1");
}

#[test]
fn bearer_token_registry_works_with_credentials_from_flags_or_environment() {
    let registry = Registry::start_with_token_auth("bob", "t0ken-pass");
    push(&oci_ref(&layered_layout(), "v2"), &registry, "tokens/app:v2", &[]);
    let tmp = scratch();
    let image = registry.docker_ref("tokens/app:v2");
    let out = tmp.path().join("t.cpio.gz");
    let home = tmp.path().join("home");
    fs::create_dir_all(&home).unwrap();
    let clean_env = |cmd: &mut std::process::Command| {
        cmd.env("HOME", &home)
            .env_remove("DOCKER_CONFIG")
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("OSBUILDER_REGISTRY_USER")
            .env_remove("OSBUILDER_REGISTRY_PASSWORD");
    };

    let mut anonymous = osbuilder();
    anonymous.args(["initrd", "--image", &image, "-o", path_str(&out), "--cache-dir", path_str(&tmp.path().join("c0"))]);
    clean_env(&mut anonymous);
    let result = anonymous.output().unwrap();
    assert!(!result.status.success(), "anonymous pull from a token registry must fail");
    assert!(!out.exists());

    build_ok(&["initrd", "--image", &image, "-o", path_str(&out), "--creds", "bob:t0ken-pass"], &tmp.path().join("c1"));
    assert_matches_umoci(&out, &layered_layout(), "v2");

    let out2 = tmp.path().join("t2.cpio.gz");
    let mut from_env = osbuilder();
    from_env.args(["initrd", "--image", &image, "-o", path_str(&out2), "--cache-dir", path_str(&tmp.path().join("c2"))]);
    clean_env(&mut from_env);
    from_env.env("OSBUILDER_REGISTRY_USER", "bob").env("OSBUILDER_REGISTRY_PASSWORD", "t0ken-pass");
    let result = from_env.output().unwrap();
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_eq!(sha256_file(&out), sha256_file(&out2));
}

/// A tar entry written with raw header bytes, so names no honest tool would
/// write (`..`, absolute) get through.
fn raw_entry(builder: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, name: &str, link: &str, data: &[u8]) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
    h.set_size(data.len() as u64);
    h.set_mtime(1);
    h.set_uid(0);
    h.set_gid(0);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
    }
    h.set_cksum();
    builder.append(&h, data).unwrap();
}

/// Writes an OCI layout whose image has the given layers (tar bytes, gzipped here).
fn layout_with_layers(dir: &Path, layers: &[Vec<u8>]) -> PathBuf {
    use std::io::Write as _;
    let blobs: Vec<Vec<u8>> = layers
        .iter()
        .map(|layer| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            gz.write_all(layer).unwrap();
            gz.finish().unwrap()
        })
        .collect();
    let layers: Vec<LayoutLayer> = layers
        .iter()
        .zip(&blobs)
        .map(|(layer, blob)| LayoutLayer { blob, media_type: MT_OCI_LAYER_GZIP, diff_id: format!("sha256:{}", sha256_hex(layer)) })
        .collect();
    write_layout(dir, "evil", &layers)
}

#[test]
fn hostile_layers_are_refused_naming_the_entry() {
    use tar::EntryType::*;
    let tmp = scratch();
    let cases: Vec<(&str, Vec<Vec<u8>>, &str)> = vec![
        (
            "dotdot",
            vec![{
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, Regular, "../../etc/evil", "", b"x");
                b.into_inner().unwrap()
            }],
            "../../etc/evil",
        ),
        (
            "absolute",
            vec![{
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, Regular, "/etc/passwd", "", b"x");
                b.into_inner().unwrap()
            }],
            "/etc/passwd",
        ),
        (
            "hardlink-missing",
            vec![{
                let mut b = tar::Builder::new(Vec::new());
                raw_entry(&mut b, Link, "shadow", "etc/shadow", b"");
                b.into_inner().unwrap()
            }],
            "etc/shadow",
        ),
    ];
    for (name, layers, expected) in cases {
        let layout = layout_with_layers(&tmp.path().join(name), &layers);
        let out = tmp.path().join(format!("{name}.cpio"));
        let err = build_err(&["initrd", "--image", &oci_ref(&layout, "evil"), "-o", path_str(&out)], &tmp.path().join("cache"));
        assert!(err.contains(expected), "{name}: the error must name {expected:?}: {err}");
        assert!(!out.exists(), "{name}: no output for a hostile image");
    }
    // The same machinery accepts an honest hand-made layout (the test is not vacuous).
    let honest = layout_with_layers(
        &tmp.path().join("honest"),
        &[{
            let mut b = tar::Builder::new(Vec::new());
            raw_entry(&mut b, Directory, "etc/", "", b"");
            raw_entry(&mut b, Regular, "etc/ok", "", b"fine");
            raw_entry(&mut b, Link, "etc/ok2", "etc/ok", b"");
            b.into_inner().unwrap()
        }],
    );
    let out = tmp.path().join("honest.cpio");
    build_ok(&["initrd", "--image", &oci_ref(&honest, "evil"), "-o", path_str(&out), "--compress", "none"], &tmp.path().join("cache"));
    let extracted = cpio_extract(&out);
    assert_eq!(fs::read(extracted.join("etc/ok2")).unwrap(), b"fine");
}

/// One tar layer from `(kind, name, data or link target, mode)` rows.
fn tar_layer(rows: &[(tar::EntryType, &str, &str, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(kind, name, arg, mode) in rows {
        let (data, link) = if kind == tar::EntryType::Regular { (arg.as_bytes(), "") } else { (&b""[..], arg) };
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Whiteouts, opaque markers and symlinks that climb past the root, in the
/// shapes where entry order or a missing parent used to change the result:
/// our initrd of each image equals `umoci unpack` of the same layout.
#[test]
fn whiteout_opaque_and_symlink_edge_cases_match_umoci() {
    use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
    let tmp = scratch();
    // `d` 0700 and `d/sub` 0711 so that a kept or re-created directory shows.
    let lower = tar_layer(&[(D, "d/", "", 0o700), (D, "d/sub/", "", 0o711), (F, "d/sub/old", "o", 0o644), (F, "d/keep", "k", 0o644), (F, "top", "t", 0o644)]);
    let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("opaque-after-new", vec![lower.clone(), tar_layer(&[(F, "d/sub/new", "n", 0o644), (F, "d/.wh..wh..opq", "", 0o644)])]),
        ("opaque-before-new", vec![lower.clone(), tar_layer(&[(F, "d/.wh..wh..opq", "", 0o644), (F, "d/sub/new", "n", 0o644)])]),
        ("whiteout-after-new", vec![lower.clone(), tar_layer(&[(F, "d/sub/new", "n", 0o644), (F, "d/.wh.sub", "", 0o644)])]),
        ("whiteout-before-new", vec![lower.clone(), tar_layer(&[(F, "d/.wh.sub", "", 0o644), (F, "d/sub/new", "n", 0o644)])]),
        ("whiteout-redeclared", vec![lower.clone(), tar_layer(&[(D, "d/sub/", "", 0o750), (F, "d/.wh.sub", "", 0o644)])]),
        ("symlink-clamp", vec![tar_layer(&[(L, "lnk", "../../../../etc", 0o777)]), tar_layer(&[(F, "lnk/x", "x", 0o644)])]),
        ("symlink-clamp-cron", vec![tar_layer(&[(L, "up", "../../../..", 0o777)]), tar_layer(&[(F, "up/etc/cron.d/job", "x", 0o644)])]),
        ("whiteout-missing-parent", vec![lower.clone(), tar_layer(&[(F, "no/such/.wh.x", "", 0o644), (F, "nodir/.wh..wh..opq", "", 0o644)])]),
        ("whiteout-file-parent", vec![lower.clone(), tar_layer(&[(F, "top/.wh.x", "", 0o644)])]),
    ];
    let mut failures = Vec::new();
    for (name, layers) in cases {
        let layout = layout_with_layers(&tmp.path().join(name), &layers);
        let out = tmp.path().join(format!("{name}.cpio"));
        let result = run_osbuilder(&["initrd", "--image", &oci_ref(&layout, "evil"), "-o", path_str(&out), "--compress", "none"], &tmp.path().join("cache"));
        if !result.status.success() {
            failures.push(format!("{name}: osbuilder failed: {}", String::from_utf8_lossy(&result.stderr).trim()));
            continue;
        }
        let theirs = tree_snapshot(&umoci_unpack(&layout, "evil"));
        assert!(!theirs.is_empty(), "{name}: umoci unpacked nothing");
        let diff = diff_trees(&tree_snapshot(&cpio_extract(&out)), &theirs);
        if !diff.is_empty() {
            failures.push(format!("{name}: ours (left) and umoci's (right) differ:\n  {}", diff.join("\n  ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `--remove` resolves parents inside the image as `--add` does (Debian's
/// `/bin -> usr/bin`), and a path that is not there is an error unless it
/// is given with `--remove-if-present`.
#[test]
fn remove_follows_symlinked_parents_and_refuses_missing_paths() {
    use tar::EntryType::{Directory as D, Regular as F, Symlink as L};
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let layout = layout_with_layers(
        &tmp.path().join("merged-usr"),
        &[tar_layer(&[
            (D, "usr/", "", 0o755),
            (D, "usr/bin/", "", 0o755),
            (F, "usr/bin/ls", "ls", 0o755),
            (F, "usr/bin/cat", "cat", 0o755),
            (L, "bin", "usr/bin", 0o777),
        ])],
    );
    let image = oci_ref(&layout, "evil");
    let out = tmp.path().join("removed.cpio");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&out), "--compress", "none", "--remove", "/bin/ls"], &cache);
    let names: Vec<String> = cpio_list(&out).into_iter().map(|e| e.path).collect();
    assert!(!names.iter().any(|n| n == "usr/bin/ls"), "--remove /bin/ls must remove /usr/bin/ls: {names:?}");
    assert!(names.iter().any(|n| n == "usr/bin/cat") && names.iter().any(|n| n == "bin"), "{names:?}");

    let missing = tmp.path().join("missing.cpio");
    let err = build_err(&["initrd", "--image", &image, "-o", path_str(&missing), "--remove", "/nonexistent"], &cache);
    assert!(err.contains("--remove /nonexistent") && err.contains("not in the image") && err.contains("--remove-if-present"), "{err}");
    assert!(!missing.exists(), "no output when a --remove path is missing");

    let result = build_ok(
        &[
            "initrd",
            "--image",
            &image,
            "-o",
            path_str(&missing),
            "--compress",
            "none",
            "--remove-if-present",
            "/nonexistent",
            "--remove-if-present",
            "/bin/cat",
        ],
        &cache,
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("warning") && stderr.contains("/nonexistent") && !stderr.contains("/bin/cat"), "{stderr}");
    let names: Vec<String> = cpio_list(&missing).into_iter().map(|e| e.path).collect();
    assert!(!names.iter().any(|n| n == "usr/bin/cat") && names.iter().any(|n| n == "usr/bin/ls"), "{names:?}");
}

/// The docker-archive fixture rewritten the way `docker save` wrote archives
/// before Docker 25: layer `i` at `<sha256 of "legacy layer i">/layer.tar`
/// (an id, not its digest),
/// the config at `config_name` (default: skopeo's `<sha256 hex>.json`).
/// `tamper` may change any member's bytes (given its new name).
fn legacy_docker_archive(dest: &Path, config_name: Option<&str>, tamper: impl Fn(&str, &mut Vec<u8>)) -> PathBuf {
    use std::io::Read as _;
    let mut members = std::collections::HashMap::new();
    let mut archive = tar::Archive::new(fs::File::open(docker_archive()).unwrap());
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type().is_file() {
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            members.insert(name, bytes);
        }
    }
    let manifest: serde_json::Value = serde_json::from_slice(&members["manifest.json"]).unwrap();
    let old_config = manifest[0]["Config"].as_str().unwrap().to_string();
    let config = config_name.unwrap_or(&old_config).to_string();
    let mut out = vec![(config.clone(), members[&old_config].clone())];
    let mut layer_names = Vec::new();
    for (i, layer) in manifest[0]["Layers"].as_array().unwrap().iter().enumerate() {
        let name = format!("{}/layer.tar", sha256_hex(format!("legacy layer {i}").as_bytes()));
        out.push((name.clone(), members[layer.as_str().unwrap()].clone()));
        layer_names.push(name);
    }
    let legacy = serde_json::json!([{"Config": config, "RepoTags": manifest[0]["RepoTags"], "Layers": layer_names}]);
    out.push(("manifest.json".into(), legacy.to_string().into_bytes()));
    let mut builder = tar::Builder::new(fs::File::create(dest).unwrap());
    for (name, mut bytes) in out {
        tamper(&name, &mut bytes);
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o444);
        h.set_size(bytes.len() as u64);
        builder.append_data(&mut h, &name, &bytes[..]).unwrap();
    }
    builder.finish().unwrap();
    dest.to_path_buf()
}

/// Layers of an old `docker save` archive carry no digest in their names and
/// are checked against the config's diff_ids before the tar parser reads
/// them; the config is checked against the digest its name carries, and one
/// whose name carries none is refused.
#[test]
fn docker_archives_without_digest_names_are_verified_before_use() {
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let build = |archive: &Path, name: &str| {
        let out = tmp.path().join(format!("{name}.cpio"));
        let result =
            run_osbuilder(&["initrd", "--image", &format!("docker-archive:{}", archive.display()), "-o", path_str(&out), "--compress", "none"], &cache);
        (result, out)
    };
    let honest = legacy_docker_archive(&tmp.path().join("legacy.tar"), None, |_, _| {});
    let (result, out) = build(&honest, "honest");
    assert!(result.status.success(), "{}", String::from_utf8_lossy(&result.stderr));
    assert_matches_umoci(&out, &layered_layout(), "v2");

    // A broken tar header in layer 1: the digest check must speak, not the parser.
    let target = format!("{}/layer.tar", sha256_hex(b"legacy layer 1"));
    let bad_layer = legacy_docker_archive(&tmp.path().join("bad-layer.tar"), None, |name, bytes| {
        if name == target {
            bytes[0] ^= 0x01;
        }
    });
    let (result, out) = build(&bad_layer, "bad-layer");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && !out.exists(), "a tampered layer must fail: {err}");
    assert!(err.contains("digest mismatch") && err.contains(&target) && err.contains("diff_id"), "the error must be the digest check naming {target}: {err}");

    // A config whose name carries no digest cannot be checked: refused.
    let anonymous = legacy_docker_archive(&tmp.path().join("anonymous.tar"), Some("config.json"), |_, _| {});
    let (result, out) = build(&anonymous, "anonymous");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && !out.exists(), "an unverifiable config must fail: {err}");
    assert!(err.contains("config.json") && err.contains("no digest"), "{err}");

    // A config changed under its digest name.
    let bad_config = legacy_docker_archive(&tmp.path().join("bad-config.tar"), None, |name, bytes| {
        if name.ends_with(".json") && name != "manifest.json" {
            bytes.push(b' ');
        }
    });
    let (result, _) = build(&bad_config, "bad-config");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success() && err.contains("digest mismatch") && err.contains("config"), "{err}");
}
