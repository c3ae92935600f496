//! Guest kernels end to end: a real build of the default configuration from
//! Debian's 6.12 source (cached by the hash of its inputs, so only the first
//! run pays), its built-in options read back from the built config, boots
//! under QEMU TCG on microvm and q35, and the validation that refuses a
//! silently dropped option.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;

#[test]
fn default_kernel_has_the_guest_options_built_in_and_kata_names() {
    let k = default_kernel();
    for option in [
        "CONFIG_VIRTIO_PCI",
        "CONFIG_VIRTIO_MMIO",
        "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
        "CONFIG_VIRTIO_BLK",
        "CONFIG_VIRTIO_NET",
        "CONFIG_VIRTIO_CONSOLE",
        "CONFIG_VSOCKETS",
        "CONFIG_VIRTIO_VSOCKETS",
        "CONFIG_LIBNVDIMM",
        "CONFIG_BLK_DEV_PMEM",
        "CONFIG_FS_DAX",
        // Disks: Kata's DAX root (NVDIMM announced by ACPI NFIT, PFN
        // metadata), virtio-scsi (Kata's block_device_driver), partitions.
        "CONFIG_ACPI_NFIT",
        "CONFIG_NVDIMM_PFN",
        "CONFIG_SCSI_VIRTIO",
        "CONFIG_BLK_DEV_SD",
        "CONFIG_MSDOS_PARTITION",
        "CONFIG_EFI_PARTITION",
        "CONFIG_VIRTIO_FS",
        "CONFIG_FUSE_DAX",
        "CONFIG_NET_9P_VIRTIO",
        "CONFIG_9P_FS",
        "CONFIG_EXT4_FS",
        "CONFIG_EROFS_FS",
        // erofs as our writer makes it: LZ4 physical clusters, xattrs
        // (security.capability, SELinux labels) and POSIX ACLs.
        "CONFIG_EROFS_FS_ZIP",
        "CONFIG_LZ4_DECOMPRESS",
        "CONFIG_EROFS_FS_XATTR",
        "CONFIG_EROFS_FS_SECURITY",
        "CONFIG_EROFS_FS_POSIX_ACL",
        "CONFIG_OVERLAY_FS",
        "CONFIG_DM_INIT",
        "CONFIG_DM_VERITY",
        // dm-verity looks its hash up by name when the table loads.
        "CONFIG_CRYPTO_SHA256",
        "CONFIG_PVH",
        "CONFIG_BLK_DEV_INITRD",
        "CONFIG_RD_GZIP",
        "CONFIG_RD_ZSTD",
    ] {
        assert!(k.config.lines().any(|l| l == format!("{option}=y")), "{option} must be built in");
    }
    assert!(k.config.lines().any(|l| l == "# CONFIG_MODULES is not set"), "guest kernels load no modules");
    let name = k.vmlinux.file_name().unwrap().to_string_lossy().into_owned();
    let parts: Vec<&str> = name.splitn(3, '-').collect();
    assert_eq!(parts[0], "vmlinux");
    assert!(parts[1].starts_with("6.12."), "{name}");
    assert!(parts[2].parse::<u32>().is_ok(), "{name}: config version");
    // The ELF vmlinux (Firecracker, PVH) and the bzImage (QEMU, Cloud Hypervisor).
    assert_eq!(&fs::read(&k.vmlinux).unwrap()[..4], b"\x7fELF");
    assert_eq!(&fs::read(&k.bzimage).unwrap()[0x202..0x206], b"HdrS");
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(fs::read_dir(&k.out).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["source"]["kind"], "debian-package");
    assert_eq!(manifest["source"]["sha256"].as_str().unwrap().len(), 64);
    let vmlinux_digest = manifest["outputs"].as_array().unwrap().iter().find(|o| o["name"].as_str().unwrap().starts_with("vmlinux-")).unwrap()["sha256"].clone();
    assert_eq!(vmlinux_digest.as_str().unwrap(), sha256_file(&k.vmlinux));
}

#[test]
fn unchanged_rebuild_is_a_cache_hit() {
    default_kernel();
    let out = tempfile::tempdir().unwrap();
    let result = osbuilder_kernel(&[], &project_root().join("kernel-config"), out.path());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains(" cached in "), "the second build must come from the cache: {stderr}");
}

/// A tiny initrd: static busybox as /init, printing a marker and powering off.
fn marker_initrd(dir: &Path, marker: &str) -> PathBuf {
    let root = dir.join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    fs::write(
        root.join("init"),
        // No /dev/console in this initramfs: mount devtmpfs (built in) and
        // write there.
        // The marker also goes to /dev/kmsg (printk is synchronous), and the
        // UART gets a second to drain. `reboot -f` ends the VM (QEMU runs with
        // -no-reboot) with or without ACPI.
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\nexec >/dev/console 2>&1\n\
             /bin/busybox mount -t proc proc /proc\n/bin/busybox echo {marker} > /dev/kmsg\n/bin/busybox echo {marker}\n\
             /bin/busybox sleep 1\n/bin/busybox reboot -f\n"
        ),
    )
    .unwrap();
    fs::create_dir_all(root.join("proc")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    run(tool("chmod").arg("0755").arg(root.join("init")));
    let initrd = dir.join("initrd.cpio.gz");
    run(tool("sh").arg("-c").arg(format!("cd {} && find . | cpio --quiet -H newc -o | gzip -1 > {}", root.display(), initrd.display())));
    initrd
}

/// Boots under QEMU TCG until the guest powers off; returns the console.
fn boot_console(machine: &[&str], append: &str, kernel: &Path, initrd: &Path, dir: &Path) -> (String, Duration) {
    let console = dir.join(format!("console-{}.log", machine.join("_").replace([',', '='], "_")));
    let _ = fs::remove_file(&console);
    let started = Instant::now();
    let out = tool("timeout")
        .arg("180")
        .arg("qemu-system-x86_64")
        .args(machine)
        .args(["-accel", "tcg", "-m", "256", "-display", "none", "-monitor", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 reboot=t {append}"))
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(out.status.success(), "{machine:?}: QEMU did not end cleanly ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    (fs::read_to_string(&console).unwrap_or_default(), elapsed)
}

/// Boots under QEMU TCG and waits for `marker` on the serial console.
fn boot(machine: &[&str], append: &str, kernel: &Path, initrd: &Path, marker: &str, dir: &Path) -> Duration {
    let (log, elapsed) = boot_console(machine, append, kernel, initrd, dir);
    assert!(log.contains(marker), "{machine:?}: no marker on the console:\n{log}");
    elapsed
}

const MICROVM: [&str; 4] = ["-M", "microvm,memory-backend=mem", "-object", "memory-backend-memfd,id=mem,size=256M,share=on"];

#[test]
fn default_kernel_boots_on_microvm_and_q35() {
    let k = default_kernel();
    let dir = tempfile::tempdir().unwrap();
    let marker = "osbuilder-kernel-boot-ok";
    let initrd = marker_initrd(dir.path(), marker);
    let microvm = MICROVM;
    // QEMU's microvm ACPI tables lack the IRQ0 -> pin 2 override, so with
    // ACPI on the kernel gets no timer ticks unless TSC calibration happens to
    // succeed (it mostly fails under TCG; microvm has no HPET or PM timer).
    // With acpi=off the MP table routes IRQ0 right. KVM guests are unaffected
    // (kvmclock); Firecracker guests boot with ACPI off too.
    let t1 = boot(&microvm, "acpi=off", &k.bzimage, &initrd, marker, dir.path());
    let t2 = boot(&microvm, "acpi=off", &k.vmlinux, &initrd, marker, dir.path());
    let t3 = boot(&["-M", "q35"], "", &k.bzimage, &initrd, marker, dir.path());
    eprintln!("boot to marker under TCG: microvm bzImage {t1:?}, microvm PVH vmlinux {t2:?}, q35 bzImage {t3:?}");
}

#[test]
fn a_dropped_option_fails_the_build_naming_it_and_its_fragment() {
    // A copy of kernel-config plus a feature asking for FS_DAX alone, without
    // ZONE_DEVICE (which the dax feature turns on with its own dependencies):
    // olddefconfig drops FS_DAX without a word, and the build must say so.
    let tmp = tempfile::tempdir().unwrap();
    let config_dir = tmp.path().join("kernel-config");
    run(tool("cp").arg("-a").arg(project_root().join("kernel-config")).arg(&config_dir));
    fs::write(
        config_dir.join("fragments/features/trap.conf"),
        "# FS_DAX without ZONE_DEVICE.\nCONFIG_FS_DAX=y\n",
    )
    .unwrap();
    let out = tmp.path().join("out");
    let result = osbuilder_kernel(&["--features", "trap"], &config_dir, &out);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "the build must fail");
    assert!(stderr.contains("CONFIG_FS_DAX=y (asked by features/trap.conf:2) was dropped"), "{stderr}");
    assert!(!out.join("vmlinux").exists() && fs::read_dir(&out).map(|d| d.count()).unwrap_or(0) == 0, "no artifacts");
}

/// Patch 0001: an initramfs /init starts with devtmpfs on /dev. The
/// kernel's built-in initramfs gives it only /dev/console; without the
/// patch (the `devtmpfs.mount=0` control) /dev/null and every other node
/// are missing until /init mounts devtmpfs itself.
#[test]
fn initramfs_init_gets_devtmpfs() {
    let k = default_kernel();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("bin")).unwrap();
    fs::create_dir_all(root.join("dev")).unwrap();
    fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    // Nothing mounted by /init itself: /dev is what the kernel gave it.
    fs::write(
        root.join("init"),
        "#!/bin/busybox sh\n/bin/busybox echo init-started\n/bin/busybox test -c /dev/null && /bin/busybox test -c /dev/urandom && /bin/busybox echo init-has-dev-nodes\n/bin/busybox sleep 1\n/bin/busybox reboot -f\n",
    )
    .unwrap();
    run(tool("chmod").arg("0755").arg(root.join("init")));
    let initrd = dir.path().join("initrd.cpio.gz");
    run(tool("sh").arg("-c").arg(format!("cd {} && find . | cpio --quiet -H newc -o | gzip -1 > {}", root.display(), initrd.display())));

    let (with_patch, _) = boot_console(&MICROVM, "acpi=off", &k.bzimage, &initrd, dir.path());
    assert!(with_patch.contains("init-has-dev-nodes") && with_patch.contains("devtmpfs: mounted"), "patched kernel: devtmpfs on /dev:\n{with_patch}");

    let (without, _) = boot_console(&MICROVM, "acpi=off devtmpfs.mount=0", &k.bzimage, &initrd, dir.path());
    assert!(without.contains("init-started"), "control boot:\n{without}");
    assert!(!without.contains("init-has-dev-nodes"), "control boot: no device nodes but the console:\n{without}");
}

/// A kernel.org-style source fetched by URL: refused unless pinned in
/// versions.toml, refused (nothing kept) when the bytes do not match the
/// pin, and with the right pin downloaded once, verified, and, being the
/// same source bytes as Debian's tarball, a cache hit of the default build.
#[test]
fn a_pinned_url_source_is_verified_and_cached() {
    let k = default_kernel();
    let tmp = tempfile::tempdir().unwrap();
    let served = tmp.path().join("served");
    fs::create_dir_all(&served).unwrap();
    let tarball = Path::new("/usr/src/linux-source-6.12.tar.xz");
    fs::hard_link(tarball, served.join("linux-6.12.tar.xz")).or_else(|_| fs::copy(tarball, served.join("linux-6.12.tar.xz")).map(|_| ())).unwrap();
    let server = HttpServer::start(&served);
    let url = format!("http://{}/linux-6.12.tar.xz", server.addr);
    let pin = sha256_file(tarball);

    let config_dir = tmp.path().join("kernel-config");
    run(tool("cp").arg("-a").arg(project_root().join("kernel-config")).arg(&config_dir));
    let versions = fs::read_to_string(config_dir.join("versions.toml")).unwrap();

    // Not pinned.
    let out = tmp.path().join("out");
    let r = osbuilder_kernel(&["--source", &url], &config_dir, &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains("is not pinned in versions.toml"), "{stderr}");

    // A wrong pin, in a scratch cache: the download is refused and not kept.
    let wrong = "0".repeat(64);
    fs::write(config_dir.join("versions.toml"), format!("{versions}\n[[kernel.tarball]]\nversion = \"6.12\"\nurl = \"{url}\"\nsha256 = \"{wrong}\"\n")).unwrap();
    let scratch_cache = tmp.path().join("cache");
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["kernel", "--source", &url, "--cache-dir"])
        .arg(&scratch_cache)
        .arg("--config-dir")
        .arg(&config_dir)
        .arg("--patches-dir")
        .arg(project_root().join("patches"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains(&pin) && stderr.contains(&wrong), "the error must name both digests: {stderr}");
    let leftovers: Vec<_> = walk_files(&scratch_cache.join("kernel/sources"));
    assert!(leftovers.is_empty(), "nothing may be kept from a bad download: {leftovers:?}");

    // The right pin: downloaded (one GET), verified, and a cache hit.
    fs::write(config_dir.join("versions.toml"), format!("{versions}\n[[kernel.tarball]]\nversion = \"6.12\"\nurl = \"{url}\"\nsha256 = \"{pin}\"\n")).unwrap();
    let cached_source = osbuilder::oci::cache::BlobCache::default_dir().join("kernel/sources").join(format!("{pin}.tar.xz"));
    let _ = fs::remove_file(&cached_source);
    let before = server.gets();
    let r = osbuilder_kernel(&["--source", &url], &config_dir, &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    assert!(stderr.contains(" cached in "), "same source bytes as the default build: a cache hit: {stderr}");
    assert_eq!(server.gets() - before, 1, "one download");
    assert_eq!(sha256_file(&cached_source), pin);
    let find = |prefix: &str| fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&fs::read_to_string(find("manifest")).unwrap()).unwrap();
    let built = fs::read(&k.vmlinux).unwrap();
    let vmlinux = find("vmlinux-");
    assert_eq!(fs::read(vmlinux).unwrap(), built);
    assert!(manifest.to_string().contains(&pin), "the manifest records the source digest: {manifest}");
    let _ = fs::remove_file(&cached_source);
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else { return Vec::new() };
    rd.filter_map(|e| e.ok()).map(|e| e.path()).collect()
}

/// `python3 -m http.server` on a free loopback port, counting GETs from its log.
struct HttpServer {
    child: std::process::Child,
    addr: String,
    log: PathBuf,
}

impl HttpServer {
    fn start(dir: &Path) -> HttpServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.parent().unwrap().join(format!("http-{port}.log"));
        let child = std::process::Command::new("python3")
            .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("python3 -m http.server");
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "http.server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpServer { child, addr, log }
    }

    fn gets(&self) -> usize {
        fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains("\"GET ")).count()
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
