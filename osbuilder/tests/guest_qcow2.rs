//! A compressed qcow2 disk of the Debian image booted by QEMU through
//! virtio-blk (`format=qcow2`, chosen from the file's header): the root
//! mounts, files read back as in the image, and a write in the guest lands
//! in the qcow2 file (QEMU allocates clusters; `qemu-img check` stays clean).

mod common;

use std::fs;
use std::path::Path;
use std::time::Duration;

use common::guest::*;
use common::*;
use osb_agent::client::{Client, ExecSpec};
use osbuilder::vm::{DiskAttach, Machine, Via, VmConfig};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn sh(client: &Client, script: &str) -> osb_agent::client::ExecOutput {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.timeout = Some(Duration::from_secs(120));
    client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec {script:?}: {e}"))
}

fn qemu_img(args: &[&str], file: &Path) -> String {
    let out = tool("qemu-img").args(args).arg(file).output().unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn compressed_qcow2_disk_boots_through_virtio_blk() {
    require_vhost_device_vsock();
    let dir = tempfile::Builder::new().prefix("osbuilder-guest-qcow2-").tempdir().unwrap();
    let (disk, json) = debian_guest_disk(dir.path(), "debian", &["--format", "qcow2", "--qcow2-compress"]);
    let root = json["cmdline"]["virtio-blk"].as_str().unwrap();
    assert!(root.starts_with("root=/dev/vda1 ") && root.ends_with(" init=/.osb/init"), "{root}");
    // What `osbuilder vm boot --disk X.qcow2` without --disk-report finds
    // by reading the guest's first 8 KiB through the qcow2 tables.
    let (table, dax) = osbuilder::disk::image::probe(&disk).unwrap();
    let probed = osbuilder::disk::image::cmdline(table, dax, osbuilder::disk::image::FsKind::Ext4, Some("/.osb/init"));
    assert_eq!(probed.virtio_blk, root);

    let k = default_kernel();
    let mut cfg = VmConfig::new(&k.bzimage, None, dir.path().join("vm"));
    cfg.machine = Machine::Microvm;
    cfg.mem_mib = 512;
    cfg.append = root.to_string();
    cfg.disk = Some(DiskAttach { path: disk.clone(), via: Via::VirtioBlk });
    let (mut vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);

    // QEMU was told the format (never left to guess it).
    let qemu_cmdline = fs::read(format!("/proc/{}/cmdline", vm.qemu_pid())).unwrap();
    let qemu_cmdline = String::from_utf8_lossy(&qemu_cmdline).replace('\0', " ");
    assert!(qemu_cmdline.contains(&format!("file={},if=none,id=disk0,format=qcow2", disk.display())), "{qemu_cmdline}");
    let out = sh(&client, "grep ' / ' /proc/mounts; cat /etc/debian_version; cd /usr/bin && find . -type f | sort | xargs sha256sum | sha256sum");
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    assert!(lines.next().unwrap_or("").contains(" / ext4 rw,"), "{text}");
    let host_root = umoci_unpack(&debian_layout(), DEBIAN_TAG);
    let rootfs = host_root.path().to_path_buf();
    assert_eq!(lines.next().unwrap_or(""), fs::read_to_string(rootfs.join("etc/debian_version")).unwrap().trim());
    let host = run_stdout(tool("sh").arg("-c").arg("find . -type f | sort | xargs sha256sum | sha256sum").current_dir(rootfs.join("usr/bin")));
    assert_eq!(lines.next().unwrap_or(""), host.trim(), "/usr/bin read through the compressed qcow2 differs from the image");

    let out = sh(&client, "head -c 3000000 /dev/urandom > /root/written && sync && sha256sum /root/written");
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));
    assert!(!vm.console_text().contains("Kernel panic"));

    // QEMU wrote into our file; it is still a consistent qcow2.
    let check = qemu_img(&["check", "-f", "qcow2"], &disk);
    assert!(check.contains("No errors were found"), "{check}");
}
