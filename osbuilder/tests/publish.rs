//! `osbuilder push`: containerDisks, kernel-boot images and bundles pushed
//! to the real registry server (docker-registry) on loopback, and read back
//! by the tools that own the formats: skopeo (inspect, copy), umoci
//! (unpack: owners, modes, bytes), qemu-img (check), curl (range requests on
//! the blob). The registry's own access log counts the uploads.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use serde_json::Value;

use common::*;

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-publish-it-").tempdir().unwrap()
}

fn shared_cache() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-publish-cache-").tempdir().unwrap().keep())
}

/// The Debian image as a qcow2 disk (and its report), built once.
fn debian_qcow2() -> &'static (PathBuf, PathBuf) {
    static DISK: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DISK.get_or_init(|| {
        let dir = tempfile::Builder::new().prefix("osbuilder-publish-disk-").tempdir().unwrap().keep();
        let img = dir.join("debian.qcow2");
        let report = dir.join("debian.qcow2.json");
        let image = oci_ref(&debian_layout(), DEBIAN_TAG);
        build_ok(&["disk", "--image", &image, "-o", path_str(&img), "--format", "qcow2", "--report", path_str(&report)], shared_cache());
        (img, report)
    })
}

/// Runs `osbuilder push ...` with its own cache; returns the output.
fn push_cmd(args: &[&str], cache: &Path) -> Output {
    let out = osbuilder().arg("push").args(args).arg("--cache-dir").arg(cache).output().expect("run osbuilder");
    out
}

/// A push that must succeed: returns the `HOST/REPO@sha256:...` it printed last.
fn push_ok(args: &[&str], cache: &Path) -> String {
    let out = push_cmd(args, cache);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "osbuilder push {args:?} failed:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let last = stdout.lines().last().unwrap_or_default().to_string();
    assert!(last.contains("@sha256:") && last.len() > 71, "the last line is the pushed reference: {stdout:?}");
    last
}

fn push_err(args: &[&str], cache: &Path) -> String {
    let out = push_cmd(args, cache);
    assert!(!out.status.success(), "osbuilder push {args:?} should fail:\n{}", String::from_utf8_lossy(&out.stdout));
    assert!(out.stdout.is_empty(), "a failed push prints no reference: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn digest_of(pinned: &str) -> &str {
    pinned.rsplit_once('@').unwrap().1
}

/// skopeo inspect --raw (the manifest bytes), parsed.
fn raw_manifest(reference: &str) -> (Vec<u8>, Value) {
    raw_manifest_with(reference, None)
}

fn raw_manifest_with(reference: &str, creds: Option<(&str, &str)>) -> (Vec<u8>, Value) {
    let mut cmd = tool("skopeo");
    cmd.args(["inspect", "--raw", "--tls-verify=false"]);
    if let Some((u, p)) = creds {
        cmd.arg(format!("--creds={u}:{p}"));
    }
    let out = run(cmd.arg(format!("docker://{}", reference.trim_start_matches("docker://"))));
    let v = serde_json::from_slice(&out.stdout).expect("manifest JSON");
    (out.stdout, v)
}

/// Requests the registry's access log shows for `method` on paths containing `needle`.
fn log_count(registry: &Registry, method: &str, needle: &str) -> usize {
    registry.log().lines().filter(|l| l.contains(&format!("\"{method} ")) && l.contains(needle)).count()
}

/// skopeo copy of a pushed image into an OCI layout, then umoci unpack.
/// Debian's umoci (0.4.7) cannot read zstd layers: for those skopeo
/// recompresses with gzip on the way (skopeo reads the zstd layer).
fn unpack(reference: &str, dir: &Path) -> Scratch {
    fs::create_dir_all(dir).unwrap();
    let layout = dir.join("layout");
    let (_, manifest) = raw_manifest(reference);
    let zstd = manifest["layers"].as_array().unwrap().iter().any(|l| l["mediaType"].as_str().unwrap().ends_with("+zstd"));
    let mut cmd = tool("skopeo");
    cmd.args(["copy", "--src-tls-verify=false"]);
    if zstd {
        cmd.args(["--dest-compress", "--dest-compress-format", "gzip"]);
    }
    run(cmd.arg(format!("docker://{reference}")).arg(format!("oci:{}:img", layout.display())));
    umoci_unpack(&layout, "img")
}

/// Every entry under `root`, as (relative path, mode, uid, gid).
fn listing(root: &Path) -> Vec<(String, u32, u32, u32)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let md = fs::symlink_metadata(e.path()).unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            out.push((rel, md.permissions().mode() & 0o7777, md.uid(), md.gid()));
            if md.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn containerdisk_is_a_plain_image_with_one_disk_owned_by_qemu() {
    let (disk, report) = debian_qcow2();
    let registry = Registry::start();
    let tmp = scratch();
    let pinned = push_ok(&["containerdisk", path_str(disk), &registry.image_ref("guest/debian:v1"), "--report", path_str(report), "--verify"], tmp.path());
    assert!(pinned.starts_with(&registry.image_ref("guest/debian@sha256:")), "{pinned}");

    // skopeo reads it as an image; one layer; the config says linux/amd64.
    let inspect = skopeo_inspect(&registry, "guest/debian:v1", &[]);
    assert_eq!(inspect["Digest"].as_str(), Some(digest_of(&pinned)));
    assert_eq!(inspect["Os"], "linux");
    assert_eq!(inspect["Architecture"], "amd64");
    let (bytes, manifest) = raw_manifest(&pinned);
    assert_eq!(sha256_hex(&bytes), digest_of(&pinned).trim_start_matches("sha256:"));
    assert_eq!(manifest["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "{manifest}");
    assert_eq!(layers[0]["mediaType"], "application/vnd.oci.image.layer.v1.tar+zstd");
    let report_json: Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
    let ann = &manifest["annotations"];
    assert!(ann["dev.osbuilder.report.digest"].as_str().unwrap().starts_with("sha256:"), "{ann}");
    assert_eq!(ann["dev.osbuilder.source.digest"], report_json["image"]["manifest_digest"]);
    assert_eq!(ann["dev.osbuilder.cmdline.virtio-blk"], report_json["cmdline"]["virtio-blk"]);
    assert_eq!(layers[0]["annotations"]["dev.osbuilder.disk.sha256"].as_str().unwrap(), format!("sha256:{}", sha256_file(disk)));
    assert!(layers[0]["annotations"].get("dev.osbuilder.disk.offset").is_none(), "a compressed layer has no offset");

    // The same disk with a report that differs only in its timings and output
    // path (what a rebuild of the same bytes gives): the same manifest.
    let mut other: Value = report_json.clone();
    other["seconds"]["write"] = serde_json::json!(99.5);
    other["output"] = serde_json::json!("/elsewhere/disk.qcow2");
    let other_report = tmp.path().join("other-report.json");
    fs::write(&other_report, serde_json::to_vec_pretty(&other).unwrap()).unwrap();
    let again = push_ok(&["containerdisk", path_str(disk), &registry.image_ref("guest/debian:v2"), "--report", path_str(&other_report)], tmp.path());
    assert_eq!(digest_of(&again), digest_of(&pinned), "timings and the output path do not change the image");
    other["image"]["reference"] = serde_json::json!("oci:/somewhere/else:tag");
    fs::write(&other_report, serde_json::to_vec_pretty(&other).unwrap()).unwrap();
    let changed = push_ok(&["containerdisk", path_str(disk), &registry.image_ref("guest/debian:v3"), "--report", path_str(&other_report)], tmp.path());
    assert_ne!(digest_of(&changed), digest_of(&pinned), "what the report says about the source does");

    // umoci: exactly disk/disk.qcow2, 0555/0444, 107:107, the same bytes.
    let rootfs = unpack(&pinned, tmp.path());
    assert_eq!(listing(rootfs.path()), vec![("disk".to_string(), 0o555, 107, 107), ("disk/disk.qcow2".to_string(), 0o444, 107, 107)]);
    let unpacked = rootfs.path().join("disk/disk.qcow2");
    assert_eq!(sha256_file(&unpacked), sha256_file(disk));
    let check = run(tool("qemu-img").args(["check", "-f", "qcow2"]).arg(&unpacked));
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors were found"), "{}", String::from_utf8_lossy(&check.stdout));
}

#[test]
fn the_same_disk_gives_the_same_digest_anywhere_and_a_second_push_sends_nothing() {
    let (disk, _) = debian_qcow2();
    let (a, b) = (Registry::start(), Registry::start());
    let (ca, cb) = (scratch(), scratch());
    for compression in ["zstd", "gzip", "none"] {
        let tag = format!("guest/debian:{compression}");
        let pa = push_ok(&["containerdisk", path_str(disk), &a.image_ref(&tag), "--layer-compression", compression], ca.path());
        let pb = push_ok(&["containerdisk", path_str(disk), &b.image_ref(&tag), "--layer-compression", compression], cb.path());
        assert_eq!(digest_of(&pa), digest_of(&pb), "{compression}: two caches, two registries, one digest");
    }
    // Another path and file name for the same bytes, pushed by digest: the same digest.
    let moved = cb.path().join("elsewhere/renamed.qcow2");
    fs::create_dir_all(moved.parent().unwrap()).unwrap();
    fs::copy(disk, &moved).unwrap();
    let first = push_ok(&["containerdisk", path_str(disk), &a.image_ref("guest/debian:zstd")], ca.path());
    let by_digest = format!("{}@{}", b.image_ref("pinned/disk"), digest_of(&first));
    assert_eq!(push_ok(&["containerdisk", path_str(&moved), &by_digest], cb.path()), by_digest);
    let wrong = format!("{}@sha256:{}", b.image_ref("pinned/disk"), "0".repeat(64));
    let err = push_err(&["containerdisk", path_str(&moved), &wrong], cb.path());
    assert!(err.contains("what we built is") && err.contains(digest_of(&first)), "{err}");

    let uploads = |r: &Registry| log_count(r, "PATCH", "/blobs/uploads/") + log_count(r, "PUT", "/blobs/uploads/");
    let before = uploads(&a);
    assert!(before >= 6, "three images of two blobs each were uploaded:\n{}", a.log());
    let again = push_ok(&["containerdisk", path_str(disk), &a.image_ref("guest/debian:zstd")], ca.path());
    assert_eq!(uploads(&a), before, "a second push uploads no blob:\n{}", a.log());

    // Into a second repository: mounted from the first, not uploaded.
    let posts_before = log_count(&a, "POST", "mount=");
    let other = push_ok(&["containerdisk", path_str(disk), &a.image_ref("other/disk:v1")], ca.path());
    assert_eq!(digest_of(&other), digest_of(&again));
    assert_eq!(uploads(&a), before, "a push to another repository mounts:\n{}", a.log());
    let log = a.log();
    let mounts: Vec<&str> = log.lines().filter(|l| l.contains("\"POST ") && l.contains("mount=")).collect();
    assert_eq!(mounts.len() - posts_before, 2, "config and layer mounted: {mounts:#?}");
    assert!(mounts.iter().all(|l| l.contains("\" 201 ")), "the registry answered 201 Created to each mount: {mounts:#?}");
}

#[test]
fn an_uncompressed_containerdisk_serves_the_disk_at_its_annotated_offset() {
    let (disk, _) = debian_qcow2();
    let registry = Registry::start();
    let tmp = scratch();
    let pinned = push_ok(&["containerdisk", path_str(disk), &registry.image_ref("seek/disk:v1"), "--layer-compression", "none", "--verify"], tmp.path());
    let (_, manifest) = raw_manifest(&pinned);
    let layer = &manifest["layers"][0];
    assert_eq!(layer["mediaType"], "application/vnd.oci.image.layer.v1.tar");
    let ann = &layer["annotations"];
    let offset: u64 = ann["dev.osbuilder.disk.offset"].as_str().unwrap().parse().unwrap();
    let size: u64 = ann["dev.osbuilder.disk.size"].as_str().unwrap().parse().unwrap();
    assert_eq!(size, fs::metadata(disk).unwrap().len());
    assert_eq!(ann["dev.osbuilder.disk.path"], "/disk/disk.qcow2");
    // Read the disk straight from the registry with range requests, in pieces.
    let url = format!("http://{}/v2/seek/disk/blobs/{}", registry.addr(), layer["digest"].as_str().unwrap());
    let out = tmp.path().join("ranged");
    let piece = 8 << 20;
    let mut at = 0u64;
    let mut whole = Vec::new();
    while at < size {
        let end = (at + piece).min(size) - 1;
        let got = run(tool("curl").args(["-sf", "-r"]).arg(format!("{}-{}", offset + at, offset + end)).arg(&url));
        assert_eq!(got.stdout.len() as u64, end - at + 1, "range {at}-{end}");
        whole.extend_from_slice(&got.stdout);
        at = end + 1;
    }
    fs::write(&out, &whole).unwrap();
    assert_eq!(sha256_file(&out), sha256_file(disk), "the annotated range of the blob is the disk");
    assert_eq!(ann["dev.osbuilder.disk.sha256"].as_str().unwrap(), format!("sha256:{}", sha256_file(disk)));
}

#[test]
fn docker_v2s2_and_a_raw_disk_converted_to_qcow2() {
    let registry = Registry::start();
    let tmp = scratch();
    // A raw disk with data at both ends and a hole between.
    let raw = tmp.path().join("disk.raw");
    let mut bytes = vec![0u8; 1 << 20];
    bytes[..4096].fill(0xa5);
    fs::write(&raw, &bytes).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_at(&[0x5a; 4096], (64 << 20) - 4096).unwrap();
    drop(f);

    let pinned = push_ok(&["containerdisk", path_str(&raw), &registry.image_ref("v2/disk:v1"), "--manifest-format", "v2s2", "--verify"], tmp.path());
    let (_, manifest) = raw_manifest(&pinned);
    assert_eq!(manifest["mediaType"], "application/vnd.docker.distribution.manifest.v2+json");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.docker.container.image.v1+json");
    assert_eq!(manifest["layers"][0]["mediaType"], "application/vnd.docker.image.rootfs.diff.tar.gzip");
    let rootfs = unpack(&pinned, tmp.path());
    let qcow2 = rootfs.path().join("disk/disk.qcow2");
    let cmp = tool("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&qcow2).arg(&raw).output().unwrap();
    assert!(cmp.status.success(), "the qcow2 in the image holds the raw disk: {}", String::from_utf8_lossy(&cmp.stdout));
    assert!(fs::metadata(&qcow2).unwrap().len() < 2 << 20, "the hole is not stored");

    // Raw on request: the raw disk itself.
    let pinned =
        push_ok(&["containerdisk", path_str(&raw), &registry.image_ref("v2/raw:v1"), "--disk-format", "raw", "--layer-compression", "gzip"], tmp.path());
    let rootfs = unpack(&pinned, &tmp.path().join("raw"));
    assert_eq!(sha256_file(&rootfs.path().join("disk/disk.img")), sha256_file(&raw));

    // Refusals, each naming the problem.
    let err =
        push_err(&["containerdisk", path_str(&raw), &registry.image_ref("v2/x:v1"), "--manifest-format", "v2s2", "--layer-compression", "zstd"], tmp.path());
    assert!(err.contains("no zstd layers"), "{err}");
    let backed = tmp.path().join("backed.qcow2");
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"]).arg(&raw).arg(&backed));
    let err = push_err(&["containerdisk", path_str(&backed), &registry.image_ref("v2/x:v1")], tmp.path());
    assert!(err.contains("backing file"), "{err}");
    let err = push_err(&["containerdisk", path_str(&raw), "guest/disk:v1"], tmp.path());
    assert!(err.contains("registry host"), "{err}");
    let err = push_err(&["containerdisk", path_str(&tmp.path().join("missing.qcow2")), &registry.image_ref("v2/x:v1")], tmp.path());
    assert!(err.contains("missing.qcow2"), "{err}");
}

#[test]
fn several_platforms_give_an_index() {
    let registry = Registry::start();
    let tmp = scratch();
    let (disk, _) = debian_qcow2();
    let other = tmp.path().join("arm.qcow2");
    run(tool("qemu-img").args(["create", "-q", "-f", "qcow2"]).arg(&other).arg("16M"));
    let pinned = push_ok(
        &[
            "containerdisk",
            &format!("linux/amd64={}", path_str(disk)),
            &format!("linux/arm64={}", path_str(&other)),
            &registry.image_ref("multi/disk:v1"),
            "--verify",
        ],
        tmp.path(),
    );
    let (_, index) = raw_manifest(&pinned);
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let platforms: Vec<String> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{}/{}", m["platform"]["os"].as_str().unwrap(), m["platform"]["architecture"].as_str().unwrap()))
        .collect();
    assert_eq!(platforms, ["linux/amd64", "linux/arm64"]);
    let arm = run(tool("skopeo").args(["inspect", "--tls-verify=false", "--override-arch", "arm64"]).arg(registry.docker_ref("multi/disk:v1")));
    let arm: Value = serde_json::from_slice(&arm.stdout).unwrap();
    assert_eq!(arm["Architecture"], "arm64");
    let arm_manifest = format!("{}@{}", registry.image_ref("multi/disk"), index["manifests"][1]["digest"].as_str().unwrap());
    let (_, m) = raw_manifest(&arm_manifest);
    assert_eq!(m["layers"][0]["annotations"]["dev.osbuilder.disk.sha256"].as_str().unwrap(), format!("sha256:{}", sha256_file(&other)));
}

#[test]
fn kernel_boot_image_and_containerdisk_with_kernel() {
    let registry = Registry::start();
    let tmp = scratch();
    let kernel = tmp.path().join("bzImage");
    let initrd = tmp.path().join("initrd.img");
    fs::write(&kernel, b"MZ not really a kernel, but bytes to carry").unwrap();
    fs::write(&initrd, vec![7u8; 300_000]).unwrap();
    let pinned =
        push_ok(&["kernel-boot", &registry.image_ref("boot/k:v1"), "--kernel", path_str(&kernel), "--initrd", path_str(&initrd), "--verify"], tmp.path());
    let rootfs = unpack(&pinned, tmp.path());
    assert_eq!(
        listing(rootfs.path()),
        vec![("boot".to_string(), 0o555, 107, 107), ("boot/initrd.img".to_string(), 0o444, 107, 107), ("boot/vmlinuz".to_string(), 0o444, 107, 107)]
    );
    assert_eq!(fs::read(rootfs.path().join("boot/vmlinuz")).unwrap(), fs::read(&kernel).unwrap());
    assert_eq!(fs::read(rootfs.path().join("boot/initrd.img")).unwrap(), fs::read(&initrd).unwrap());
    let (_, manifest) = raw_manifest(&pinned);
    assert_eq!(manifest["annotations"]["dev.osbuilder.kernel.sha256"].as_str().unwrap(), format!("sha256:{}", sha256_file(&kernel)));

    let (disk, _) = debian_qcow2();
    let pinned = push_ok(
        &["containerdisk", path_str(disk), &registry.image_ref("boot/all:v1"), "--kernel", path_str(&kernel), "--initrd", path_str(&initrd)],
        tmp.path(),
    );
    let rootfs = unpack(&pinned, &tmp.path().join("all"));
    let names: Vec<String> = listing(rootfs.path()).into_iter().map(|e| e.0).collect();
    assert_eq!(names, ["boot", "boot/initrd.img", "boot/vmlinuz", "disk", "disk/disk.qcow2"]);
}

#[test]
fn a_bundle_is_an_artifact_with_one_titled_layer_per_file() {
    let registry = Registry::start();
    let tmp = scratch();
    let (disk, report) = debian_qcow2();
    let kernel = tmp.path().join("vmlinuz");
    fs::write(&kernel, b"kernel bytes").unwrap();
    let notes = tmp.path().join("NOTES.txt");
    fs::write(&notes, b"hello").unwrap();
    let notes_arg = format!("{}=text/plain", path_str(&notes));
    let pinned = push_ok(
        &["bundle", &registry.image_ref("bundle/debian:v1"), "--report", path_str(report), "--kernel", path_str(&kernel), "--file", &notes_arg, "--verify"],
        tmp.path(),
    );
    let (_, manifest) = raw_manifest(&pinned);
    assert_eq!(manifest["artifactType"], "application/vnd.osbuilder.guest.v1");
    assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.empty.v1+json");
    assert_eq!(manifest["config"]["size"], 2);
    let layers = manifest["layers"].as_array().unwrap();
    let titles: Vec<(&str, &str)> =
        layers.iter().map(|l| (l["annotations"]["org.opencontainers.image.title"].as_str().unwrap(), l["mediaType"].as_str().unwrap())).collect();
    assert_eq!(
        titles,
        [
            ("debian.qcow2", "application/vnd.osbuilder.disk.v1.qcow2"),
            ("debian.qcow2.json", "application/vnd.osbuilder.report.v1+json"),
            ("vmlinuz", "application/vnd.osbuilder.kernel.v1"),
            ("NOTES.txt", "text/plain"),
            ("launch.json", "application/vnd.osbuilder.launch.v1+json"),
        ]
    );
    // One file pulled alone, by its title, the way an ORAS-style client does.
    let disk_layer = &layers[0];
    let url = format!("http://{}/v2/bundle/debian/blobs/{}", registry.addr(), disk_layer["digest"].as_str().unwrap());
    let got = tmp.path().join("pulled.qcow2");
    run(tool("curl").args(["-sf", "-o"]).arg(&got).arg(&url));
    assert_eq!(sha256_file(&got), sha256_file(disk));
    let launch = layers.iter().find(|l| l["annotations"]["org.opencontainers.image.title"] == "launch.json").unwrap();
    let url = format!("http://{}/v2/bundle/debian/blobs/{}", registry.addr(), launch["digest"].as_str().unwrap());
    let launch: Value = serde_json::from_slice(&run(tool("curl").args(["-sf"]).arg(&url)).stdout).unwrap();
    assert_eq!((launch["disk"].as_str(), launch["kernel"].as_str()), (Some("debian.qcow2"), Some("vmlinuz")));
    let report_json: Value = serde_json::from_slice(&fs::read(report).unwrap()).unwrap();
    assert_eq!(launch["cmdline"], report_json["cmdline"]);
    // A report beside a file that is not the one it describes is refused.
    let stale = tmp.path().join("stale");
    fs::create_dir_all(&stale).unwrap();
    fs::write(stale.join("debian.qcow2"), b"not the disk").unwrap();
    fs::copy(report, stale.join("debian.qcow2.json")).unwrap();
    let err = push_err(&["bundle", &registry.image_ref("bundle/stale:v1"), "--report", path_str(&stale.join("debian.qcow2.json"))], tmp.path());
    assert!(err.contains("is not the output"), "{err}");
    // skopeo copies the artifact whole.
    run(tool("skopeo").args(["copy", "--src-tls-verify=false"]).arg(format!("docker://{pinned}")).arg(format!("oci:{}:b", tmp.path().join("copy").display())));
}

#[test]
fn credentials_basic_and_bearer_and_clear_refusals() {
    let tmp = scratch();
    let (disk, _) = debian_qcow2();
    for (kind, registry) in [("htpasswd", Registry::start_with_htpasswd("pusher", "s3cret")), ("token", Registry::start_with_token_auth("pusher", "s3cret"))] {
        let target = registry.image_ref("auth/disk:v1");
        let pinned = push_ok(&["containerdisk", path_str(disk), &target, "--creds", "pusher:s3cret", "--verify"], tmp.path());
        let (_, m) = raw_manifest_with(&pinned, Some(("pusher", "s3cret")));
        assert_eq!(m["layers"].as_array().unwrap().len(), 1, "{kind}");
        // A second repository mounts, with the token scoped to read the first.
        push_ok(&["containerdisk", path_str(disk), &registry.image_ref("auth/other:v1"), "--creds", "pusher:s3cret"], tmp.path());
        let log = registry.log();
        let mounted = log.lines().filter(|l| l.contains("\"POST ") && l.contains("mount=") && l.contains("\" 201 ")).count();
        assert_eq!(mounted, 2, "{kind}: config and layer mounted:\n{log}");
        let err = push_err(&["containerdisk", path_str(disk), &target, "--creds", "pusher:wrong"], tmp.path());
        assert!(err.contains(&registry.addr()) && err.contains("refused"), "{kind}: {err}");
        eprintln!("{kind}, wrong credentials: {err}");
        let err = push_err(&["containerdisk", path_str(disk), &target], tmp.path());
        assert!(err.contains(&registry.addr()) && err.contains("no credentials"), "{kind}: {err}");
        eprintln!("{kind}, no credentials: {err}");
    }
}

/// Runs `osbuilder push ARGS`; returns whether it succeeded, its stderr and
/// its peak RSS in MiB (from wait4's rusage of that one process).
fn push_measured(args: &[&str], cache: &Path) -> (bool, String, u64) {
    let (status, stderr, peak) = common::run_measured(osbuilder().arg("push").args(args).arg("--cache-dir").arg(cache));
    (status.success(), stderr, peak)
}

#[test]
fn a_3_gib_sparse_disk_pushes_with_bounded_memory() {
    let registry = Registry::start();
    let tmp = scratch();
    let raw = tmp.path().join("big.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(3 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    // Some data spread over the disk, the rest holes.
    for i in 0..48u64 {
        let block: Vec<u8> = (0..(1u32 << 20)).map(|j| (j.wrapping_mul(2654435761) >> 13) as u8 ^ i as u8).collect();
        f.write_at(&block, i * (64 << 20)).unwrap();
    }
    drop(f);
    let raw_sha = sha256_file(&raw);
    let mut peaks = Vec::new();
    for (name, extra) in
        [("qcow2", &["--layer-compression", "none"][..]), ("raw", &["--disk-format", "raw", "--layer-compression", "none", "--chunk-mib", "32"][..])]
    {
        let target = registry.image_ref(&format!("big/{name}:v1"));
        let mut args = vec!["containerdisk", path_str(&raw), &target];
        args.extend_from_slice(extra);
        let (ok, stderr, peak) = push_measured(&args, tmp.path());
        assert!(ok, "{name}: {stderr}");
        eprintln!("3 GiB sparse disk as {name}: peak RSS {peak} MiB; {}", stderr.lines().last().unwrap_or_default());
        assert!(peak < 200, "{name}: peak RSS {peak} MiB is not bounded by the chunk size");
        peaks.push(peak);
        let (_, manifest) = raw_manifest(&format!("{}/big/{name}:v1", registry.addr()));
        let layer = &manifest["layers"][0];
        let size: u64 = layer["annotations"]["dev.osbuilder.disk.size"].as_str().unwrap().parse().unwrap();
        if name == "raw" {
            assert_eq!(size, 3 << 30);
            assert_eq!(layer["annotations"]["dev.osbuilder.disk.sha256"].as_str().unwrap(), format!("sha256:{raw_sha}"));
        } else {
            assert!(size < 64 << 20, "the qcow2 keeps only the data: {size}");
        }
    }
}

// ---------------------------------------------------------------------------
// Faults, injected by a proxy between the push and the registry
// ---------------------------------------------------------------------------

use common::proxy::{Fault, FaultProxy, Rule};

/// Pushes the Debian disk uncompressed (a 135 MB layer) through `proxy` in
/// 8 MiB chunks; returns the push report and stderr.
fn push_through(proxy: &FaultProxy, repo_tag: &str, extra: &[&str], cache: &Path) -> (Value, String) {
    let (disk, _) = debian_qcow2();
    let report = cache.join(format!("{}.push.json", repo_tag.replace(['/', ':'], "_")));
    let target = format!("{}/{repo_tag}", proxy.addr());
    let mut args =
        vec!["containerdisk", path_str(disk), &target, "--layer-compression", "none", "--chunk-mib", "8", "--verify", "--push-report", path_str(&report)];
    args.extend_from_slice(extra);
    let out = push_cmd(&args, cache);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "push through the proxy failed:\n{stderr}\n--- proxy\n{}", proxy.summary());
    (serde_json::from_slice(&fs::read(&report).unwrap()).unwrap(), stderr)
}

fn layer_size(report: &Value) -> u64 {
    report["blobs"].as_array().unwrap().iter().map(|b| b["size"].as_u64().unwrap()).sum()
}

/// Body bytes the registry received for blob uploads (PATCH and PUT).
fn upload_bytes(proxy: &FaultProxy) -> u64 {
    proxy.request_body_bytes(Some("PATCH"), "/blobs/uploads/") + proxy.request_body_bytes(Some("PUT"), "/blobs/uploads/")
}

#[test]
fn a_connection_dropped_between_chunks_resumes_where_the_registry_stopped() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let tmp = scratch();
    // The 9th PATCH of the 135 MB layer (about half way): the connection
    // dies after the request head, before any byte of the chunk arrives.
    let drop = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(0)).nth(9));
    let (report, stderr) = push_through(&proxy, "fault/between:v1", &[], tmp.path());
    assert_eq!(proxy.fired(drop), 1, "{}", proxy.summary());
    assert_eq!(report["wire"]["resumes"], 1, "{report}\n{stderr}");
    assert_eq!(report["wire"]["restarts"], 0, "{report}");
    assert!(report["wire"]["resumed_from_bytes"].as_u64().unwrap() == 8 * (8 << 20), "{report}");
    // Nothing was sent twice: the registry received each byte once.
    assert_eq!(upload_bytes(&proxy), layer_size(&report), "{}", proxy.summary());
    assert!(stderr.contains("trying again"), "the retry is said: {stderr}");
}

#[test]
fn a_503_and_a_429_with_retry_after_mid_upload_resume_without_resending() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let tmp = scratch();
    let busy = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::status(503)).nth(3));
    let slow = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::too_many_requests(1)).nth(7));
    let head = proxy.add(Rule::new(Some("HEAD"), "/blobs/", Fault::status(500)));
    // A 404 on a chunk (a session the client must not trust): asked again, it is there.
    let gone = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::status(404)).nth(12));
    let (report, stderr) = push_through(&proxy, "fault/busy:v1", &[], tmp.path());
    assert_eq!((proxy.fired(busy), proxy.fired(slow), proxy.fired(head), proxy.fired(gone)), (1, 1, 1, 1), "{}", proxy.summary());
    assert_eq!(report["wire"]["retries"], 4, "{report}");
    assert_eq!(report["wire"]["resumes"], 3, "{report}");
    assert_eq!(report["wire"]["restarts"], 0, "{report}");
    assert!(stderr.contains("429") && stderr.contains("trying again in 1.0 s"), "Retry-After: 1 is honoured: {stderr}");
    assert!(stderr.contains("503"), "{stderr}");
    assert_eq!(upload_bytes(&proxy), layer_size(&report), "{}", proxy.summary());
}

#[test]
fn a_connection_dropped_mid_chunk_starts_over_on_docker_registry_and_still_pushes_right() {
    // docker-registry 2.8 keeps the partial bytes of a cut PATCH but then
    // refuses the session (404 BLOB_UPLOAD_INVALID: its state token's offset
    // no longer matches; see testkit's proxy.rs): the only way on is a new
    // session. The push must notice, start over once, and end correct.
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let tmp = scratch();
    let drop = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(4 << 20)).nth(9));
    let (report, stderr) = push_through(&proxy, "fault/mid:v1", &[], tmp.path());
    assert_eq!(proxy.fired(drop), 1);
    assert_eq!((report["wire"]["restarts"].as_u64(), report["wire"]["resumes"].as_u64()), (Some(1), Some(0)), "{report}\n{stderr}");
    // Sent: 8 whole chunks and half of the 9th, then the whole layer again.
    assert_eq!(upload_bytes(&proxy), layer_size(&report) + 8 * (8 << 20) + (4 << 20), "{}", proxy.summary());
    assert_eq!(report["verified"], true);
}

#[test]
fn a_lost_answer_to_the_last_request_and_a_stall_end_in_a_correct_push() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let tmp = scratch();
    // The final PUT of the layer reaches the registry, its answer does not.
    let lost = proxy.add(Rule::new(Some("PUT"), "digest=", Fault::DropResponse).nth(2));
    // A HEAD held longer than --timeout: it times out and is asked again.
    let stall = proxy.add(Rule::new(Some("HEAD"), "/blobs/", Fault::Stall(std::time::Duration::from_secs(4))));
    let (report, stderr) = push_through(&proxy, "fault/lost:v1", &["--timeout", "2"], tmp.path());
    assert_eq!((proxy.fired(lost), proxy.fired(stall)), (1, 1), "{}", proxy.summary());
    assert_eq!(report["verified"], true, "{report}\n{stderr}");
    // The upload had completed: it is found, not sent again.
    assert_eq!(report["wire"]["restarts"], 0, "{report}");
    assert_eq!(upload_bytes(&proxy), layer_size(&report), "{}", proxy.summary());
}

#[test]
fn a_registry_that_never_answers_gives_a_clear_error_and_no_manifest() {
    let registry = Registry::start();
    let proxy = FaultProxy::start(&registry.addr());
    let tmp = scratch();
    proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::StallForever).always());
    let (disk, _) = debian_qcow2();
    let target = format!("{}/fault/dead:v1", proxy.addr());
    let err = push_err(
        &["containerdisk", path_str(disk), &target, "--layer-compression", "none", "--chunk-mib", "8", "--timeout", "1", "--retries", "1"],
        tmp.path(),
    );
    assert!(err.contains(&format!("registry {}", proxy.addr())) && err.contains("gave up after 2 attempts"), "{err}");
    assert_eq!(proxy.count(Some("PUT"), "/manifests/"), 0, "no manifest may name a blob that is not there:\n{}", proxy.summary());
    assert_eq!(registry.get_status("/v2/fault/dead/manifests/v1", None), 404);

    // Every attempt cut mid-chunk at the same place: the session is lost each
    // time and no attempt gets further, so the retry budget runs out.
    let proxy = FaultProxy::start(&registry.addr());
    proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(1 << 20)).always());
    let target = format!("{}/fault/cut:v1", proxy.addr());
    let err = push_err(&["containerdisk", path_str(disk), &target, "--layer-compression", "none", "--chunk-mib", "8", "--retries", "2"], tmp.path());
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert_eq!(proxy.count(Some("PUT"), "/manifests/"), 0);

    // A 500 on every manifest PUT: the blobs are there, the tag is not.
    let proxy = FaultProxy::start(&registry.addr());
    proxy.add(Rule::new(Some("PUT"), "/manifests/", Fault::status(500)).always());
    let target = format!("{}/fault/nomanifest:v1", proxy.addr());
    let err = push_err(&["containerdisk", path_str(disk), &target, "--retries", "2"], tmp.path());
    assert!(err.contains("500") && err.contains("gave up after 3 attempts"), "{err}");
    assert_eq!(registry.get_status("/v2/fault/nomanifest/manifests/v1", None), 404);
}

#[test]
fn a_cidata_seed_travels_as_a_raw_containerdisk() {
    let registry = Registry::start();
    let tmp = scratch();
    let user_data = tmp.path().join("user-data");
    fs::write(&user_data, "#cloud-config\nhostname: vm1\n").unwrap();
    let seed = tmp.path().join("seed.img");
    let out = osbuilder().args(["cidata", "-o", path_str(&seed), "--user-data", path_str(&user_data), "--instance-id", "iid-1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let pinned = push_ok(&["containerdisk", path_str(&seed), &registry.image_ref("guest/seed:v1"), "--disk-format", "raw", "--verify"], tmp.path());
    let rootfs = unpack(&pinned, &tmp.path().join("unpacked"));
    let pulled = rootfs.path().join("disk/disk.img");
    assert_eq!(sha256_file(&pulled), sha256_file(&seed));
    let blkid = run_stdout(tool("blkid").args(["-p", "-o", "export"]).arg(&pulled));
    assert!(blkid.lines().any(|l| l == "LABEL=cidata"), "{blkid}");
}
