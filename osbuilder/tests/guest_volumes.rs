//! Guest volumes, each against the real thing under QEMU with our kernel: block
//! volumes found by label on virtio-blk and virtio-scsi (one made by our own ext4
//! writer, one by mke2fs) and by serial, tmpfs with a size and mode, a read-only bind,
//! 9p from QEMU's own `-fsdev local`, a `nofail` mount whose device never comes, a fatal
//! one that stops the boot naming it, and a disk hot-added on q35 through QMP
//! `device_add`, mounted and unmounted by the agent's storage calls (and by `osbuilder
//! vm storage`); `osbuilder vm boot --volume/--share` attaching what the mounts name (a
//! SCSI disk by serial, a 9p share, read-only); virtio-fs through
//! rust-vmm's virtiofsd (and a DAX mount refused with init's explanation); the run
//! config's network on QEMU user networking. After power-off `e2fsck -fn` checks each
//! disk and `debugfs` reads back what the guest wrote.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::guest::*;
use common::*;
use osb_agent::client::{Client, ExecSpec};
use osb_agent::proto::storage::Storage;
use osbuilder::vm::{Machine, Via, Vm, VmConfig, Volume};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-guest-volumes-").tempdir().unwrap().keep())
}

/// An agent-only initrd with busybox (for the checks) and `mounts` in its run config.
fn initrd(name: &str, mounts: &[&str]) -> PathBuf {
    initrd_with(name, mounts, None)
}

/// The same, with `network` (JSON) as the run config's network.
fn initrd_with(name: &str, mounts: &[&str], network: Option<&str>) -> PathBuf {
    let out = scratch().join(format!("{name}.cpio.gz"));
    let init = guest_init();
    let mut cmd = tool(env!("CARGO_BIN_EXE_osbuilder"));
    cmd.args(["initrd", "--quiet", "--agent-only", "--init", init.to_str().unwrap(), "--add", "/bin/busybox:/bin/busybox:0755", "-o"]).arg(&out);
    for m in mounts {
        cmd.args(["--mount", m]);
    }
    if let Some(net) = network {
        let file = scratch().join(format!("{name}-network.json"));
        fs::write(&file, net).unwrap();
        cmd.arg("--network").arg(file);
    }
    let r = cmd.output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    out
}

/// A 32 MiB ext4 volume labelled `label` holding `/hello.txt`, made by mke2fs.
fn mke2fs_volume(name: &str, label: &str, hello: &str) -> PathBuf {
    let content = scratch().join(format!("{name}-content"));
    fs::create_dir_all(&content).unwrap();
    fs::write(content.join("hello.txt"), hello).unwrap();
    let img = scratch().join(format!("{name}.img"));
    run(tool("mke2fs").args(["-q", "-F", "-t", "ext4", "-L", label, "-d"]).arg(&content).arg(&img).arg("32M"));
    img
}

/// The same, made by our own ext4 writer (`osbuilder disk --table none`) from a
/// one-layer image.
fn osbuilder_volume(name: &str, label: &str, hello: &str) -> PathBuf {
    let mut tar = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(hello.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1);
    h.set_cksum();
    tar.append_data(&mut h, "hello.txt", hello.as_bytes()).unwrap();
    let tar = tar.into_inner().unwrap();
    let layout = write_layout(
        &scratch().join(format!("{name}-layout")),
        "v",
        &[LayoutLayer { blob: &tar, media_type: "application/vnd.oci.image.layer.v1.tar", diff_id: format!("sha256:{}", sha256_hex(&tar)) }],
    );
    let img = scratch().join(format!("{name}.img"));
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["disk", "--quiet", "--image", &oci_ref(&layout, "v"), "--fs", "ext4", "--table", "none", "--size", "32M", "--label", label, "-o"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    img
}

fn sh(client: &Client, script: &str) -> (i32, String, String) {
    let mut spec = ExecSpec::new(["/bin/busybox", "sh", "-c", script]);
    spec.env = vec!["PATH=/bin".into()];
    spec.timeout = Some(Duration::from_secs(120));
    let out = client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    (out.code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn sh_ok(client: &Client, script: &str) -> String {
    let (code, out, err) = sh(client, script);
    assert_eq!(code, 0, "{script}: {out}{err}");
    out
}

/// `osbuilder vm storage ARGS --agent` this guest's agent: stdout, or a panic with stderr.
fn storage_cli(vm: &Vm, args: &[&str]) -> String {
    let agent = format!("hvsock://{}:{}", vm.vsock_socket.display(), osb_agent::client::DEFAULT_PORT);
    let r = osbuilder().args(["vm", "storage"]).args(args).args(["--agent", &agent]).output().unwrap();
    assert!(r.status.success(), "osbuilder vm storage {args:?}: {}", String::from_utf8_lossy(&r.stderr));
    String::from_utf8_lossy(&r.stdout).into_owned()
}

fn power_off(mut vm: Vm, client: &Client) -> String {
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));
    vm.console_text()
}

/// `e2fsck -fn` finds nothing to fix.
fn assert_fsck_clean(img: &Path) {
    let out = tool("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(out.status.success(), "e2fsck -fn {}: {}{}", img.display(), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

/// A file of an ext4 image, read by debugfs.
fn debugfs_cat(img: &Path, path: &str) -> String {
    let out = tool("debugfs").args(["-R", &format!("cat {path}")]).arg(img).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Block volumes by label on virtio-blk (our ext4 writer's output) and on virtio-scsi
/// (mke2fs's), one by serial, a tmpfs with size and mode, a read-only bind of a
/// directory of one volume, a 9p share of a host directory, and a `nofail` mount
/// whose device never appears: the boot goes on, the workload reads and writes them,
/// ListStorages reports each (the failed one with its cause), and after power-off the
/// disks are clean and hold what the guest wrote.
#[test]
fn run_config_mounts_block_tmpfs_bind_and_9p() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let blk = osbuilder_volume("blk", "vol-blk", "hello from virtio-blk\n");
    let scsi = mke2fs_volume("scsi", "vol-scsi", "hello from virtio-scsi\n");
    let serial = mke2fs_volume("serial", "", "hello by serial\n");
    let share = scratch().join("share9p");
    fs::create_dir_all(&share).unwrap();
    fs::write(share.join("from-host.txt"), "written on the host\n").unwrap();
    let initrd = initrd(
        "mounts",
        &[
            // Listed out of order on purpose: the bind needs /data/blk, /data/blk/sub needs /data/blk.
            "/data/blk /srv/blk none bind,ro",
            "LABEL=vol-blk /data/blk auto noatime",
            "LABEL=vol-scsi /data/scsi ext4 rw,x-osb.uid=1000,x-osb.gid=1000,x-osb.mode=0770",
            "SERIAL=vol-serial-1 /data/serial ext4 ro",
            "none /data/tmp tmpfs size=8m,x-osb.mode=0750",
            "share9 /data/9p 9p msize=131072",
            "/dev/vdz /never ext4 nofail,x-osb.wait=0.5",
        ],
    );
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), scratch().join("mounts-vm"));
    let disk = |path: &Path, via, serial: Option<&str>| Volume::Disk { path: path.to_path_buf(), via, serial: serial.map(str::to_owned), read_only: false };
    cfg.volumes = vec![
        disk(&blk, Via::VirtioBlk, None),
        disk(&serial, Via::VirtioBlk, Some("vol-serial-1")),
        disk(&scsi, Via::VirtioScsi, None),
        Volume::Share9p { dir: share.clone(), tag: "share9".into(), read_only: false },
    ];
    let (vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);

    assert_eq!(
        sh_ok(&client, "cat /data/blk/hello.txt /data/scsi/hello.txt /data/serial/hello.txt"),
        "hello from virtio-blk\nhello from virtio-scsi\nhello by serial\n"
    );
    sh_ok(&client, "echo written by the guest > /data/scsi/guest.txt && echo on blk > /data/blk/guest.txt && sync");
    assert_eq!(sh_ok(&client, "stat -c '%u:%g %a' /data/scsi"), "1000:1000 770\n");
    let mounts = sh_ok(&client, "cat /proc/mounts");
    let line =
        |target: &str| mounts.lines().find(|l| l.split(' ').nth(1) == Some(target)).unwrap_or_else(|| panic!("{target} not mounted:\n{mounts}")).to_owned();
    assert!(line("/data/blk").contains(" ext4 rw,noatime"), "{}", line("/data/blk"));
    assert!(line("/data/serial").contains(" ext4 ro"), "{}", line("/data/serial"));
    assert!(line("/data/tmp").contains("tmpfs") && line("/data/tmp").contains("size=8192k") && line("/data/tmp").contains("mode=750"), "{}", line("/data/tmp"));
    assert!(line("/srv/blk").contains(" ro"), "the bind is read-only: {}", line("/srv/blk"));
    assert!(line("/data/9p").contains(" 9p "), "{}", line("/data/9p"));
    assert!(!mounts.contains(" /never "), "{mounts}");
    // The bind shows the volume, and refuses writes.
    assert_eq!(sh_ok(&client, "cat /srv/blk/guest.txt"), "on blk\n");
    let (code, _, err) = sh(&client, "echo x > /srv/blk/nope");
    assert_ne!(code, 0, "a write to the read-only bind succeeded");
    assert!(err.contains("Read-only file system"), "{err}");
    // 9p: the host's file in, the guest's file out.
    assert_eq!(sh_ok(&client, "cat /data/9p/from-host.txt && echo from the guest > /data/9p/from-guest.txt"), "written on the host\n");
    assert_eq!(fs::read_to_string(share.join("from-guest.txt")).unwrap(), "from the guest\n");

    let listed = client.list_storages().unwrap();
    let targets: Vec<(&str, bool)> = listed.iter().map(|s| (s.storage.mount_point.as_str(), s.mounted)).collect();
    assert_eq!(
        targets,
        [("/data/blk", true), ("/srv/blk", true), ("/data/scsi", true), ("/data/serial", true), ("/data/tmp", true), ("/data/9p", true), ("/never", false)],
        "in dependency order, the failed nofail one last"
    );
    assert!(listed[0].device.starts_with("/dev/vd"), "{listed:?}");
    assert!(listed[6].error.contains("device /dev/vdz not there after 0.5 s"), "{:?}", listed[6]);
    assert!(listed.iter().all(|s| s.origin == "boot"), "{listed:?}");
    // The same through the command line: the table names the failed one and its cause.
    let table = storage_cli(&vm, &["list"]);
    let never = table.lines().position(|l| l.starts_with("/never ")).unwrap_or_else(|| panic!("{table}"));
    assert!(table.lines().nth(never).unwrap().contains(" failed "), "{table}");
    assert_eq!(table.lines().nth(never + 1), Some("  error: device /dev/vdz not there after 0.5 s; check the VM's disks"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("/data/scsi ") && l.contains("x-osb.uid=1000") && l.contains(" mounted ")), "{table}");

    let console = power_off(vm, &client);
    assert!(
        console.contains("mount /dev/vdz on /never: device /dev/vdz not there after 0.5 s; check the VM's disks; it is nofail: going on without it"),
        "{console}"
    );
    for img in [&blk, &scsi, &serial] {
        assert_fsck_clean(img);
    }
    assert_eq!(debugfs_cat(&scsi, "/guest.txt"), "written by the guest\n");
    assert_eq!(debugfs_cat(&blk, "/guest.txt"), "on blk\n");
}

/// A mount that is not `nofail` whose device never appears stops the boot: init waits
/// the configured time, prints the mount and the cause, and powers off before the agent
/// or any workload starts. The mount comes from the kernel command line (`osb.mount=`).
#[test]
fn a_fatal_mount_whose_device_never_comes_powers_off_naming_it() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let initrd = initrd("plain", &[]);
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), scratch().join("fatal-vm"));
    cfg.append = "\"osb.mount=LABEL=missing /data ext4 x-osb.wait=1\"".into();
    let mut vm = Vm::start(&cfg).unwrap();
    let status = vm.wait_exit(BOOT_LIMIT).unwrap_or_else(|e| panic!("the guest must power off: {e}\n{}", vm.console_text()));
    let console = vm.console_text();
    assert!(
        console.contains("osb-init: mount LABEL=missing on /data: device LABEL=missing not there after 1.0 s; no block device's filesystem has it"),
        "{status}:\n{console}"
    );
    assert!(!console.contains("osb-agent: listening"), "the agent must not start:\n{console}");
}

/// `osbuilder vm boot --volume ... --share ...` attaches what an initrd's `--mount`s
/// name: a disk found by its serial on virtio-scsi and a 9p share, both read-only; the
/// image's workload (`osb.cmd=`) reads both (on the console), and a command run through
/// the agent reads them and can write neither.
#[test]
fn vm_boot_attaches_the_volumes_the_mounts_name() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let img = mke2fs_volume("cli", "", "hello from --volume\n");
    let share = scratch().join("cli-share");
    fs::create_dir_all(&share).unwrap();
    fs::write(share.join("shared.txt"), "shared by the host\n").unwrap();
    let initrd = initrd("cli", &["SERIAL=cli-1 /data ext4 ro", "cli9 /srv 9p ro"]);
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["vm", "boot", "--kernel", default_kernel().bzimage.to_str().unwrap(), "--initrd", initrd.to_str().unwrap()])
        .args(["--volume", &format!("{},via=virtio-scsi,serial=cli-1,ro", img.display())])
        .args(["--share", &format!("{},tag=cli9,ro", share.display())])
        .args(["--append", r#"osb.cmd=["/bin/busybox","cat","/data/hello.txt","/srv/shared.txt"] osb.on_exit=stay"#])
        .arg("--work-dir")
        .arg(scratch().join("cli-vm"))
        .args(["-e", "PATH=/bin", "--", "/bin/busybox", "sh", "-c", "cat /data/hello.txt /srv/shared.txt; touch /data/x /srv/x 2>&1; true"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
    assert!(r.status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with("hello from --volume\nshared by the host\n"), "{stdout}");
    assert_eq!(stdout.matches("Read-only file system").count(), 2, "{stdout}");
    assert!(!share.join("x").exists(), "the guest wrote into the read-only share");
    let console = fs::read_to_string(scratch().join("cli-vm/console.log")).unwrap();
    assert!(console.contains("hello from --volume") && console.contains("shared by the host"), "the workload's output:\n{console}");
    assert_fsck_clean(&img);
}

/// Hot-add on q35: a disk attached after boot (QMP blockdev-add + device_add on a PCIe
/// root port) is mounted by MountStorage (found by its serial, waited for), written,
/// unmounted by UnmountStorage, and is clean and holds the file on the host afterwards.
/// The agent refuses a second mount on the same point and an unknown unmount.
#[test]
fn a_hot_added_disk_is_mounted_and_unmounted_by_the_storage_calls() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let hot = mke2fs_volume("hot", "vol-hot", "hello hot-plugged\n");
    let initrd = initrd("hotplug", &[]);
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), scratch().join("hotplug-vm"));
    cfg.machine = Machine::Q35;
    cfg.qmp = true;
    cfg.extra_args = vec!["-device".into(), "pcie-root-port,id=rp1,chassis=1,slot=1".into()];
    let (vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);

    vm.qmp("blockdev-add", serde_json::json!({"node-name": "hot0", "driver": "raw", "file": {"driver": "file", "filename": hot.display().to_string()}}))
        .unwrap();
    vm.qmp("device_add", serde_json::json!({"driver": "virtio-blk-pci", "drive": "hot0", "id": "hotblk", "bus": "rp1", "serial": "hot-1"})).unwrap();
    let storage = Storage {
        driver: "blk".into(),
        source: "SERIAL=hot-1".into(),
        fstype: "ext4".into(),
        options: vec!["rw,noatime".into(), "x-osb.wait=60".into()],
        mount_point: "/mnt/hot".into(),
        ..Default::default()
    };
    let done = client.mount_storage(storage.clone()).unwrap_or_else(|e| panic!("MountStorage: {e}\n{}", vm.console_text()));
    assert_eq!((done.device.starts_with("/dev/vd"), done.fstype.as_str()), (true, "ext4"), "{done:?}");
    assert_eq!(sh_ok(&client, "cat /mnt/hot/hello.txt && echo from the guest > /mnt/hot/guest.txt && sync"), "hello hot-plugged\n");
    let again = client.mount_storage(storage).unwrap_err();
    assert_eq!(again.code(), Some(osb_agent::client::Code::ALREADY_EXISTS), "{again}");
    let listed = client.list_storages().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!((listed[0].storage.mount_point.as_str(), listed[0].origin.as_str(), listed[0].mounted), ("/mnt/hot", "agent", true));

    let unknown = client.unmount_storage("/mnt/nothing", false).unwrap_err();
    assert_eq!(unknown.code(), Some(osb_agent::client::Code::NOT_FOUND), "{unknown}");
    client.unmount_storage("/mnt/hot", false).unwrap();
    assert!(!sh_ok(&client, "cat /proc/mounts").contains("/mnt/hot"), "still mounted");
    assert!(client.list_storages().unwrap().is_empty());
    // A symbolic link in the mount point is refused (guest processes may make them).
    sh_ok(&client, "mkdir -p /mnt/real && ln -s /mnt/real /mnt/link");
    let linked = Storage { driver: "ephemeral".into(), source: "tmpfs".into(), mount_point: "/mnt/link/x".into(), ..Default::default() };
    let err = client.mount_storage(linked).unwrap_err().to_string();
    assert!(err.contains("/mnt/link is a symbolic link"), "{err}");
    // `osbuilder vm storage`: a tmpfs mounted, listed, unmounted from the command line.
    let mounted = storage_cli(&vm, &["mount", "--driver", "ephemeral", "scratch", "/mnt/cli", "auto", "size=2m,x-osb.mode=0700"]);
    assert_eq!(mounted, "mounted scratch (tmpfs) on /mnt/cli\n");
    assert_eq!(sh_ok(&client, "stat -c %a /mnt/cli && grep ' /mnt/cli ' /proc/mounts | cut -d' ' -f3"), "700\ntmpfs\n");
    let listed: serde_json::Value = serde_json::from_str(&storage_cli(&vm, &["list", "--json"])).unwrap();
    assert_eq!(
        (listed[0]["mount_point"].as_str(), listed[0]["origin"].as_str(), listed[0]["mounted"].as_bool()),
        (Some("/mnt/cli"), Some("agent"), Some(true)),
        "{listed}"
    );
    storage_cli(&vm, &["unmount", "/mnt/cli"]);
    assert!(!sh_ok(&client, "cat /proc/mounts").contains("/mnt/cli"), "still mounted");

    power_off(vm, &client);
    assert_fsck_clean(&hot);
    assert_eq!(debugfs_cat(&hot, "/guest.txt"), "from the guest\n");
}

/// run.json's network on QEMU user networking: the virtio-net interface found by its
/// MAC is renamed, addressed and given its MTU, the default route goes to QEMU's
/// gateway, `/etc/resolv.conf` and `/etc/hosts` are written, and the guest fetches a
/// file from an HTTP server on the host's loopback (QEMU's 10.0.2.2) before the host
/// asks anything: the network is up when the agent is.
#[test]
fn run_config_network_reaches_the_host() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let served = scratch().join("served");
    fs::create_dir_all(&served).unwrap();
    fs::write(served.join("greeting.txt"), "hello over the network\n").unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut server = tool("python3")
        .args(["-m", "http.server", "--bind", "127.0.0.1", &port.to_string()])
        .current_dir(&served)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let network = r#"{"interfaces": [{"name": "net0", "mac": "52:54:00:12:34:56", "addresses": ["10.0.2.15/24"], "mtu": 1400}],
        "routes": [{"dest": "default", "gateway": "10.0.2.2"}],
        "dns": {"nameservers": ["10.0.2.3"], "search": ["osb.test"]},
        "hosts": [{"address": "10.0.2.2", "names": ["hostbox"]}]}"#;
    let initrd = initrd_with("network", &[], Some(network));
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), scratch().join("network-vm"));
    cfg.extra_args = ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"].iter().map(|s| s.to_string()).collect();
    let (vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let links = sh_ok(&client, "ip -o link show net0; ip -o -4 addr show net0; ip route");
        assert!(links.contains("mtu 1400") && links.contains(",UP"), "{links}");
        assert!(links.contains("inet 10.0.2.15/24"), "{links}");
        assert!(links.contains("default via 10.0.2.2 dev net0"), "{links}");
        assert_eq!(sh_ok(&client, "cat /etc/resolv.conf"), "# written by osb-init from /etc/osb/run.json\nnameserver 10.0.2.3\nsearch osb.test\n");
        let hosts = sh_ok(&client, "cat /etc/hosts");
        assert!(hosts.contains("127.0.1.1\tosb\n") && hosts.contains("10.0.2.2\thostbox\n"), "{hosts}");
        assert_eq!(sh_ok(&client, &format!("wget -q -O - http://10.0.2.2:{port}/greeting.txt")), "hello over the network\n");
    }));
    let _ = server.kill();
    let _ = server.wait();
    power_off(vm, &client);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// virtio-fs with rust-vmm's virtiofsd sharing a host directory: the guest reads the
/// host's file and the file it writes appears on the host. A DAX mount of the same tag,
/// listed first and `nofail`, is refused (upstream QEMU's vhost-user-fs device has no
/// DAX window) and reported with init's explanation, and the plain mount then works.
#[test]
fn virtio_fs_shares_a_host_directory_and_a_dax_mount_is_refused_clearly() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let virtiofsd = require_virtiofsd();
    let shared = scratch().join("virtiofs-shared");
    fs::create_dir_all(&shared).unwrap();
    fs::write(shared.join("from-host.txt"), "shared by virtiofsd\n").unwrap();
    let work = scratch().join("virtiofs-vm");
    fs::create_dir_all(&work).unwrap();
    let socket = work.join("virtiofsd.sock");
    let mut daemon = tool(virtiofsd.to_str().unwrap())
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .arg("--cache=never")
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(work.join("virtiofsd.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "virtiofsd made no socket: {}", fs::read_to_string(work.join("virtiofsd.log")).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    let initrd = initrd("virtiofs", &["hostshare /data/dax virtiofs dax=always,nofail", "hostshare /data/vfs virtiofs"]);
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), &work);
    cfg.extra_args = ["-chardev", &format!("socket,id=vfs,path={}", socket.display()), "-device", "vhost-user-fs-device,chardev=vfs,tag=hostshare"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(sh_ok(&client, "cat /data/vfs/from-host.txt && echo from the guest > /data/vfs/from-guest.txt && sync"), "shared by virtiofsd\n");
        assert_eq!(fs::read_to_string(shared.join("from-guest.txt")).unwrap(), "from the guest\n");
        let mounts = sh_ok(&client, "cat /proc/mounts");
        assert!(mounts.contains("hostshare /data/vfs virtiofs "), "{mounts}");
        let listed = client.list_storages().unwrap();
        let dax = listed.iter().find(|s| s.storage.mount_point == "/data/dax").unwrap_or_else(|| panic!("{listed:?}"));
        assert!(!dax.mounted && dax.error.contains("refused DAX"), "{dax:?}");
    }));
    let console = power_off(vm, &client);
    let _ = daemon.kill();
    let _ = daemon.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(console.contains("the virtio-fs device hostshare refused DAX"), "{console}");
}

/// A free TCP port on the host's loopback (bound, then released for the server).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// NFS from a userspace server (Debian's nfs-ganesha with its VFS backend, beside an
/// rpcbind it needs to start; no kernel NFS server), reached over QEMU user
/// networking: one export mounted with NFSv3 through a server name from the run
/// config's hosts, and with NFSv4.1 by address. The guest reads the served file over
/// both and writes one that appears on the host. Nothing leaves the machine: the
/// server listens on the host's loopback, which QEMU's user network shows the guest as
/// 10.0.2.2.
#[test]
fn nfs_v3_and_v4_from_a_userspace_server() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let dir = scratch().join("nfs");
    let export = dir.join("export");
    fs::create_dir_all(&export).unwrap();
    fs::write(export.join("served.txt"), "served over NFS\n").unwrap();
    let (nfs_port, mnt_port) = (free_port(), free_port());
    let config = format!(
        "NFS_CORE_PARAM {{ NFS_Port = {nfs_port}; MNT_Port = {mnt_port}; Bind_addr = 127.0.0.1; Protocols = 3, 4; Enable_NLM = false; Enable_RQUOTA = false; }}
NFSV4 {{ Graceless = true; }}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Access_Type = RW; Squash = No_Root_Squash; Protocols = 3, 4; Transports = TCP; SecType = sys; FSAL {{ Name = VFS; }} }}
",
        export.display()
    );
    fs::write(dir.join("ganesha.conf"), config).unwrap();
    // ganesha registers its programs with rpcbind and stops when it cannot; start one
    // unless the machine runs its own.
    let rpcbind_running = std::net::TcpStream::connect("127.0.0.1:111").is_ok();
    let mut servers = Daemons(Vec::new());
    if !rpcbind_running {
        servers.0.push(
            tool("rpcbind")
                .arg("-f")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("rpcbind (ci/setup.sh installs it)"),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let log = dir.join("ganesha.log");
    let ganesha = tool("ganesha.nfsd")
        .args(["-F", "-N", "NIV_EVENT", "-f"])
        .arg(dir.join("ganesha.conf"))
        .arg("-L")
        .arg(&log)
        .arg("-p")
        .arg(dir.join("ganesha.pid"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ganesha.nfsd (ci/setup.sh installs nfs-ganesha)");
    servers.0.push(ganesha);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", nfs_port)).is_err() {
        assert!(servers.0.last_mut().unwrap().try_wait().unwrap().is_none(), "ganesha stopped: {}", fs::read_to_string(&log).unwrap_or_default());
        assert!(std::time::Instant::now() < deadline, "ganesha does not listen: {}", fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(100));
    }
    let network = r#"{"interfaces": [{"name": "eth0", "addresses": ["10.0.2.15/24"]}],
        "routes": [{"dest": "default", "gateway": "10.0.2.2"}],
        "hosts": [{"address": "10.0.2.2", "names": ["files"]}]}"#;
    let v3 = format!("files:{} /mnt/nfs3 nfs port={nfs_port},mountport={mnt_port},mountproto=tcp", export.display());
    let v4 = format!("10.0.2.2:/export /mnt/nfs4 nfs4 port={nfs_port}");
    let initrd = initrd_with("nfs", &[&v3, &v4], Some(network));
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(initrd), dir.join("vm"));
    cfg.extra_args = ["-netdev", "user,id=n0", "-device", "virtio-net-device,netdev=n0"].iter().map(|s| s.to_string()).collect();
    let (vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);
    assert_eq!(sh_ok(&client, "cat /mnt/nfs3/served.txt /mnt/nfs4/served.txt"), "served over NFS\nserved over NFS\n");
    sh_ok(&client, "echo written over NFSv3 > /mnt/nfs3/from-guest.txt && sync");
    let mounts = sh_ok(&client, "cat /proc/mounts");
    assert!(mounts.contains(" /mnt/nfs3 nfs ") && mounts.contains("vers=3"), "{mounts}");
    assert!(mounts.contains(" /mnt/nfs4 nfs4 ") && mounts.contains("vers=4.1"), "{mounts}");
    power_off(vm, &client);
    assert_eq!(fs::read_to_string(export.join("from-guest.txt")).unwrap(), "written over NFSv3\n");
    drop(servers);
}

/// Host daemons a test started: killed when it ends, passed or failed.
struct Daemons(Vec<std::process::Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
