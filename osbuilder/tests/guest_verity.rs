//! `osbuilder disk --verity` booted: our kernel under QEMU TCG with the
//! report's kernel arguments (dm-init builds /dev/dm-0 from partitions 1 and
//! 2), the agent answering from the verified root. A byte flipped in one
//! file's data makes reading that file fail in the guest while others read;
//! a wrong root hash stops the boot in our init (from an initramfs), which
//! names the failing step and powers off instead of the kernel panicking.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::guest::*;
use common::*;
use osb_agent::client::{Client, ExecSpec};
use osbuilder::vm::{DiskAttach, Machine, Via, Vm, VmConfig};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-guest-verity-").tempdir().unwrap().keep())
}

/// `osbuilder disk --init --verity` of the Debian image, with its report.
fn verity_disk(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, serde_json::Value) {
    let args: Vec<&str> = std::iter::once("--verity").chain(args.iter().copied()).collect();
    debian_guest_disk(dir, name, &args)
}

fn key(via: Via) -> &'static str {
    match via {
        Via::Pmem => "pmem",
        Via::VirtioBlk => "virtio-blk",
        Via::VirtioScsi => "virtio-scsi",
    }
}

fn vm(disk: &Path, initrd: Option<PathBuf>, append: String, via: Via, machine: Machine, name: &str) -> VmConfig {
    require_vhost_device_vsock();
    let k = default_kernel();
    let mut cfg = VmConfig::new(&k.bzimage, initrd, scratch().join(name));
    cfg.machine = machine;
    cfg.mem_mib = 512;
    cfg.append = append;
    cfg.disk = Some(DiskAttach { path: disk.to_path_buf(), via });
    cfg
}

/// A guest booted from the disk alone with the report's `cmdline` for `via`.
fn disk_vm(disk: &Path, report: &serde_json::Value, via: Via, machine: Machine, name: &str) -> VmConfig {
    let root = report["cmdline"][key(via)].as_str().unwrap_or_else(|| panic!("no cmdline.{} in {report}", key(via)));
    assert!(root.contains(" root=/dev/dm-0 ") && root.ends_with(" init=/.osb/init"), "{root}");
    vm(disk, None, root.to_string(), via, machine, name)
}

fn boot(cfg: &VmConfig) -> (Vm, Client) {
    boot_to_agent(cfg, BOOT_LIMIT)
}

fn shutdown(mut vm: Vm, client: &Client) {
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));
    let console = vm.console_text();
    assert!(!console.contains("Kernel panic"), "{console}");
}

struct Sh {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sh(client: &Client, script: &str) -> Sh {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.timeout = Some(Duration::from_secs(120));
    let out = client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    Sh { code: out.code, stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// The root as `DEVICE / TYPE OPTIONS` (the device named through sysfs by
/// the root's device number: the kernel calls its own root /dev/root).
fn root_mount(client: &Client) -> String {
    let out = sh(client, "d=$(mountpoint -d /) && . /sys/dev/block/$d/uevent && set -- $(grep ' / ' /proc/mounts) && echo /dev/$DEVNAME $2 $3 $4");
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.stdout.trim().to_string()
}

/// The device-mapper table the kernel built, as the guest shows it.
fn assert_root_is_verity(client: &Client, fstype: &str) {
    let root = root_mount(client);
    assert!(root.starts_with(&format!("/dev/dm-0 / {fstype} ro,")), "{root}");
    let out = sh(client, "cat /sys/block/dm-0/dm/name /sys/block/dm-0/ro; ls /sys/block/dm-0/slaves | sort | tr '\\n' ' '");
    let mut lines = out.stdout.lines();
    assert_eq!(lines.next(), Some("dm-verity"), "{}", out.stdout);
    assert_eq!(lines.next(), Some("1"), "read-only device: {}", out.stdout);
    let slaves = lines.next().unwrap_or_default().trim().to_string();
    assert!(slaves == "vda1 vda2" || slaves == "pmem0p1 pmem0p2", "dm-0 sits on partitions 1 and 2: {slaves:?}");
    let out = sh(client, "touch /verity-write-test");
    assert_ne!(out.code, 0, "the verity root is read-only");
    assert!(out.stderr.contains("Read-only file system"), "{}", out.stderr);
}

/// MBR (Kata's layout: data vda1, hash tree vda2) through virtio-blk on
/// microvm: the kernel builds the verity device from the report's
/// arguments, mounts it read-only as root, and every file of /usr/bin reads
/// back through the hash checks as it is in the image.
#[test]
fn verity_disk_boots_from_dev_dm_0_through_virtio_blk() {
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (disk, report) = verity_disk(dir.path(), "blk", &[]);
    let cfg = disk_vm(&disk, &report, Via::VirtioBlk, Machine::Microvm, "verity-blk");
    let (vm, client) = boot(&cfg);
    assert_root_is_verity(&client, "ext4");
    assert_usr_bin_matches_the_image(&client);
    // dm-init waited for both partitions (dm-mod.waitfor) before making dm-0.
    let out = sh(&client, "dmesg | grep 'device-mapper: init'");
    assert!(out.stdout.contains("waiting for device /dev/vda2") && out.stdout.contains("all devices available"), "the kernel's dm-init log: {}", out.stdout);
    shutdown(vm, &client);
}

/// One byte flipped inside one file's data (found with debugfs, placed by
/// the report's partition offset): the guest still boots, reading that file
/// fails with an I/O error, and another file reads as in the image.
#[test]
fn a_flipped_byte_in_a_file_fails_only_that_file() {
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (disk, report) = verity_disk(dir.path(), "tamper", &[]);
    let part = &report["disk"]["partition"];
    let (offset, size) = (part["offset"].as_u64().unwrap(), part["size"].as_u64().unwrap());
    let fs_copy = dd_range(&disk, offset, size, &dir.path().join("fs.img"));
    let victim = "/usr/bin/base32";
    let bmap = run_stdout(tool("debugfs").args(["-R", &format!("bmap {victim} 1")]).arg(&fs_copy));
    let block: u64 = bmap.trim().parse().unwrap_or_else(|_| panic!("debugfs bmap {victim}: {bmap:?}"));
    assert!(block > 0 && block * 4096 < size, "{block}");
    let at = offset + block * 4096 + 777;
    let f = fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
    drop(f);

    let cfg = disk_vm(&disk, &report, Via::VirtioBlk, Machine::Microvm, "verity-tamper");
    let (vm, client) = boot(&cfg);
    assert_root_is_verity(&client, "ext4");
    let out = sh(&client, &format!("cat {victim} > /dev/null"));
    assert_ne!(out.code, 0, "reading the tampered {victim} must fail");
    assert!(out.stderr.contains("Input/output error"), "{}", out.stderr);
    let other = "usr/bin/base64";
    let out = sh(&client, &format!("sha256sum /{other}"));
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout.split_whitespace().next(), Some(sha256_file(&debian_rootfs_file(other)).as_str()), "an untouched file still reads");
    let out = sh(&client, "dmesg | grep -i verity");
    assert!(out.stdout.contains("corrupted"), "the kernel names the corruption: {}", out.stdout);
    shutdown(vm, &client);
}

/// A wrong root hash on the command line, booted the initramfs way (an
/// initrd holding only osb-init, `verity.initrd_cmdline`): dm-init still
/// creates /dev/dm-0 (verity checks on read), mounting it fails, and init
/// names the step and powers the VM off: no kernel panic. Then, with the
/// right root hash, corrupted data that the mount itself reads: a byte
/// flipped in the filesystem's block 0 (in the 1 KiB before ext4's
/// superblock, which ext4 never looks at: only verity can object), and
/// separately a byte flipped in the hash tree's top block. Both fail the
/// same way at mount: dm-verity answers EIO for the block, so the boot
/// stops in init with the verity hint, not later in a file read.
#[test]
fn a_wrong_root_hash_or_corrupted_data_stops_the_boot_in_init_naming_the_step() {
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (disk, report) = verity_disk(dir.path(), "wrong", &[]);
    let initrd = dir.path().join("agent-initrd.gz");
    let init = guest_init();
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["initrd", "--quiet", "--agent-only", "--init", init.to_str().unwrap(), "-o"])
        .arg(&initrd)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let root = report["disk"]["verity"]["root_hash"].as_str().unwrap();
    let wrong: String = root
        .chars()
        .enumerate()
        .map(|(i, c)| {
            if i == 10 {
                if c == '0' {
                    '1'
                } else {
                    '0'
                }
            } else {
                c
            }
        })
        .collect();
    assert_ne!(wrong, root);
    let cmdline = report["disk"]["verity"]["initrd_cmdline"]["virtio-blk"].as_str().unwrap();
    assert!(cmdline.contains(root) && cmdline.contains("osb.root=/dev/dm-0"), "{cmdline}");
    let stops_at_mount = |cmdline: String, kernel_says: &str, name: &str| {
        let cfg = vm(&disk, Some(initrd.clone()), cmdline, Via::VirtioBlk, Machine::Microvm, name);
        let mut vm = Vm::start(&cfg).unwrap();
        let status = vm.wait_exit(BOOT_LIMIT).unwrap_or_else(|e| panic!("{name}: the guest must power off by itself: {e}"));
        let console = vm.console_text();
        assert!(console.contains("osb-init: mount root /dev/dm-0: ext4: Input/output error"), "{name}: init names the failing step: {console}");
        assert!(console.contains("if it is dm-verity, the data does not match the root hash"), "{name}: {console}");
        assert!(
            console.contains("device-mapper: verity") && console.contains(kernel_says),
            "{name}: the kernel's verity error ({kernel_says}) is on the console: {console}"
        );
        assert!(!console.contains("Kernel panic"), "{name}: {console}");
        eprintln!("{name}: guest ended: {status}");
    };
    stops_at_mount(cmdline.replace(root, &wrong), "metadata block 0 is corrupted", "verity-wrong-hash");

    let flip = |at: u64| {
        let f = fs::OpenOptions::new().read(true).write(true).open(&disk).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
    };
    let data = report["disk"]["partition"]["offset"].as_u64().unwrap();
    let hash = report["disk"]["verity"]["hash_partition"]["offset"].as_u64().unwrap();
    assert!(hash > data, "{}", report["disk"]);
    flip(data + 512);
    stops_at_mount(cmdline.to_string(), "data block 0 is corrupted", "verity-corrupt-block-0");
    flip(data + 512);
    flip(hash + 5);
    stops_at_mount(cmdline.to_string(), "metadata block 0 is corrupted", "verity-corrupt-hash-tree");
}

/// Kata's DAX layout through an NVDIMM (q35): dm-verity over /dev/pmem0p1
/// and /dev/pmem0p2 (no DAX through device-mapper), the workload runs from
/// the verified root.
#[test]
fn dax_verity_disk_boots_through_pmem() {
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (disk, report) = verity_disk(dir.path(), "dax", &["--dax"]);
    let mut cfg = disk_vm(&disk, &report, Via::Pmem, Machine::Q35, "verity-pmem");
    cfg.append.push_str(r#" osb.cmd=["/bin/sh","-c","echo workload-ran-from-$(stat -c %D /)"] osb.on_exit=stay"#);
    let (vm, client) = boot(&cfg);
    assert_root_is_verity(&client, "ext4");
    let out = sh(&client, "cat /etc/debian_version");
    assert_eq!(out.stdout, fs::read_to_string(debian_rootfs_file("etc/debian_version")).unwrap());
    assert!(vm.console_text().contains("workload-ran-from-"), "{}", vm.console_text());
    shutdown(vm, &client);
}

/// `osbuilder vm boot` with a verity disk: without the report it refuses
/// (the arguments need the root hash) before starting anything; with
/// `--initrd` (only osb-init in it) and `--disk-report` it takes the report's
/// `verity.initrd_cmdline`, our init mounts /dev/dm-0 and switches to it,
/// and the command runs in the verified root.
#[test]
fn vm_boot_takes_the_initramfs_arguments_from_the_report() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let dir = tempfile::tempdir().unwrap();
    let (disk, _) = verity_disk(dir.path(), "cli", &[]);
    let report = dir.path().join("cli.json");
    let initrd = dir.path().join("agent-initrd.gz");
    let init = guest_init();
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["initrd", "--quiet", "--agent-only", "--init", init.to_str().unwrap(), "-o"])
        .arg(&initrd)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let k = default_kernel();
    let boot = |extra: &[&std::ffi::OsStr]| {
        tool(env!("CARGO_BIN_EXE_osbuilder"))
            .args(["vm", "boot", "--via", "virtio-blk", "--mem", "512", "--kernel"])
            .arg(&k.bzimage)
            .arg("--disk")
            .arg(&disk)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = boot(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("has a second partition") && stderr.contains("--disk-report"), "{stderr}");

    let work = dir.path().join("vm");
    let out = boot(&[
        "--initrd".as_ref(),
        initrd.as_os_str(),
        "--disk-report".as_ref(),
        report.as_os_str(),
        "--work-dir".as_ref(),
        work.as_os_str(),
        "--".as_ref(),
        "/bin/sh".as_ref(),
        "-c".as_ref(),
        "cat /etc/debian_version; grep ' / ' /proc/mounts".as_ref(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "osbuilder vm boot: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    let version = fs::read_to_string(debian_rootfs_file("etc/debian_version")).unwrap();
    assert!(stdout.starts_with(&version), "{stdout}");
    assert!(stdout.contains("/dev/dm-0 / ext4 ro,"), "init mounted the verity device as root: {stdout}");
}

/// Our LZ4HC erofs under dm-verity (GPT: root-hash partition UUIDs) through
/// virtio-blk: root on /dev/dm-0, erofs read-only, /usr/bin decompressed
/// through the hash checks to the image's bytes.
#[test]
fn erofs_verity_disk_boots_from_dev_dm_0() {
    let _one = one_guest_at_a_time();
    let dir = tempfile::tempdir().unwrap();
    let (disk, report) = verity_disk(dir.path(), "erofs", &["--fs", "erofs", "--compress", "lz4hc", "--table", "gpt"]);
    let cfg = disk_vm(&disk, &report, Via::VirtioBlk, Machine::Microvm, "verity-erofs");
    let (vm, client) = boot(&cfg);
    assert_root_is_verity(&client, "erofs");
    assert_usr_bin_matches_the_image(&client);
    shutdown(vm, &client);
}
