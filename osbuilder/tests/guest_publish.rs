//! A seekable containerDisk used the way a VMM can: our erofs disk pushed
//! with `--layer-compression none`, then booted by QEMU straight from the
//! registry blob with its http block driver (`qemu-block-extra`), at the
//! offset and size the layer's annotations give. Nothing is pulled first:
//! the guest reads what it needs with range requests.

mod common;

use std::fs;
use std::time::Duration;

use common::guest::*;
use common::*;
use osb_agent::client::{Client, ExecSpec};
use osbuilder::vm::{Machine, VmConfig};

const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn sh(client: &Client, script: &str) -> osb_agent::client::ExecOutput {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.timeout = Some(Duration::from_secs(180));
    client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
}

#[test]
fn an_uncompressed_containerdisk_boots_from_the_registry_blob_with_range_requests() {
    require_vhost_device_vsock();
    let _one = one_guest_at_a_time();
    let dir = tempfile::Builder::new().prefix("osbuilder-guest-publish-").tempdir().unwrap();
    let (disk, json) = debian_guest_disk(dir.path(), "debian-erofs", &["--fs", "erofs", "--compress", "lz4hc"]);
    let root = json["cmdline"]["virtio-blk"].as_str().unwrap().to_string();

    let registry = Registry::start();
    let push = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["push", "containerdisk", "--quiet"])
        .arg(&disk)
        .arg(registry.image_ref("seekable/debian:v1"))
        .args(["--disk-format", "raw", "--layer-compression", "none", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();
    assert!(push.status.success(), "osbuilder push: {}", String::from_utf8_lossy(&push.stderr));
    let pinned = String::from_utf8_lossy(&push.stdout).trim().to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&run(tool("skopeo").args(["inspect", "--raw", "--tls-verify=false"]).arg(format!("docker://{pinned}"))).stdout).unwrap();
    let layer = &manifest["layers"][0];
    let ann = &layer["annotations"];
    let offset = ann["dev.osbuilder.disk.offset"].as_str().unwrap();
    let size = ann["dev.osbuilder.disk.size"].as_str().unwrap();
    assert_eq!(size.parse::<u64>().unwrap(), fs::metadata(&disk).unwrap().len());
    let url = format!("http://{}/v2/seekable/debian/blobs/{}", registry.addr(), layer["digest"].as_str().unwrap());

    let k = default_kernel();
    let mut cfg = VmConfig::new(&k.bzimage, None, dir.path().join("vm"));
    cfg.machine = Machine::Microvm;
    cfg.mem_mib = 512;
    cfg.append = root.clone();
    cfg.extra_args = vec![
        "-blockdev".into(),
        format!("driver=http,node-name=blob,url={url},read-only=on"),
        "-blockdev".into(),
        format!("driver=raw,node-name=disk0,file=blob,offset={offset},size={size},read-only=on"),
        "-device".into(),
        "virtio-blk-device,drive=disk0".into(),
    ];
    let (mut vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);
    let out = sh(&client, "grep ' / ' /proc/mounts; cat /etc/debian_version; cd /usr/bin && find . -type f | sort | xargs sha256sum | sha256sum");
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert!(lines.next().unwrap_or("").contains(" / erofs ro,"), "{text}");
    assert_eq!(lines.next().unwrap_or(""), fs::read_to_string(debian_rootfs_file("etc/debian_version")).unwrap().trim());
    let host_root = umoci_unpack(&debian_layout(), DEBIAN_TAG);
    let host = run_stdout(tool("sh").arg("-c").arg("find . -type f | sort | xargs sha256sum | sha256sum").current_dir(host_root.path().join("usr/bin")));
    assert_eq!(lines.next().unwrap_or(""), host.trim(), "/usr/bin read over HTTP differs from the image");
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));

    // The registry served the guest's reads as range requests on the blob.
    let log = registry.log();
    let blob_path = format!("/v2/seekable/debian/blobs/{}", layer["digest"].as_str().unwrap());
    let gets = log.lines().filter(|l| l.contains(&format!("\"GET {blob_path}")) && l.contains("\" 206 ")).count();
    assert!(gets > 0, "no range request reached the registry:\n{log}");
    eprintln!("the guest booted from the blob in {gets} range requests ({size}-byte disk)");
}
