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
        &fs::read(fs::read_dir(&k.out).unwrap().filter_map(|e| e.ok()).map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "json")).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["source"]["kind"], "debian-package");
    assert_eq!(manifest["source"]["sha256"].as_str().unwrap().len(), 64);
    let vmlinux_digest =
        manifest["outputs"].as_array().unwrap().iter().find(|o| o["name"].as_str().unwrap().starts_with("vmlinux-")).unwrap()["sha256"].clone();
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
    fs::write(config_dir.join("fragments/features/trap.conf"), "# FS_DAX without ZONE_DEVICE.\nCONFIG_FS_DAX=y\n").unwrap();
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
    fs::write(config_dir.join("versions.toml"), format!("{versions}\n[[kernel.tarball]]\nversion = \"6.12\"\nurl = \"{url}\"\nsha256 = \"{wrong}\"\n"))
        .unwrap();
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
    let find =
        |prefix: &str| fs::read_dir(&out).unwrap().map(|e| e.unwrap().path()).find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix)).unwrap();
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

/// A stand-in kernel tree for the builder's own logic (lock, work directory,
/// cache key), since a real build takes many minutes: its Makefile answers
/// the targets the builder runs, and `make bzImage` records that it started
/// (`started.<pid>` in `$OSB_FAKE_KERNEL_DIR`), waits for a `gate` file
/// there, and fails if its work directory was replaced meanwhile. With a
/// config dir (series 0.0, one fragment) and a patches dir of its own.
struct FakeKernel {
    dir: tempfile::TempDir,
}

const FAKE_MAKEFILE: &str = r#"# Stand-in for a kernel tree: only the targets osbuilder's kernel builder runs.
O ?= .
allnoconfig:
	@true
olddefconfig:
	cp $(KCONFIG_ALLCONFIG) $(O)/.config
kernelrelease:
	@echo 0.0.1-fake
bzImage:
	sh $(CURDIR)/build.sh $(O)
vmlinux: bzImage
"#;

const FAKE_BUILD: &str = r#"set -e
o=$1
token=$$
echo "$token" > "$o/owner"
touch "$OSB_FAKE_KERNEL_DIR/started.$token"
while [ ! -e "$OSB_FAKE_KERNEL_DIR/gate" ]; do sleep 0.02; done
owner=$(cat "$o/owner" 2>/dev/null || echo nothing)
if [ "$owner" != "$token" ]; then echo "work directory clobbered: $o/owner holds $owner, not $token" >&2; exit 1; fi
mkdir -p "$o/arch/x86/boot"
echo "vmlinux of $token" > "$o/vmlinux"
echo "bzImage of $token" > "$o/arch/x86/boot/bzImage"
echo "map of $token" > "$o/System.map"
"#;

impl FakeKernel {
    fn new() -> FakeKernel {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        for d in
            ["src", "kernel-config/fragments/common", "kernel-config/fragments/x86_64", "kernel-config/fragments/features", "patches/0.0.x", "cache", "state"]
        {
            fs::create_dir_all(p.join(d)).unwrap();
        }
        fs::write(p.join("src/Makefile"), FAKE_MAKEFILE).unwrap();
        fs::write(p.join("src/build.sh"), FAKE_BUILD).unwrap();
        fs::write(p.join("kernel-config/versions.toml"), "[[kernel]]\nseries = \"0.0\"\nconfig_version = 1\n").unwrap();
        fs::write(p.join("kernel-config/default-features"), "").unwrap();
        fs::write(p.join("kernel-config/fragments/common/base.conf"), "CONFIG_FAKE=y\n").unwrap();
        fs::write(p.join("patches/0.0.x/series"), "").unwrap();
        FakeKernel { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `osbuilder kernel` of the fake tree into `out`, in the scratch cache.
    fn command(&self, out: &str) -> std::process::Command {
        let mut c = tool(env!("CARGO_BIN_EXE_osbuilder"));
        c.args(["kernel", "--jobs", "1", "--source"])
            .arg(self.path("src"))
            .arg("--config-dir")
            .arg(self.path("kernel-config"))
            .arg("--patches-dir")
            .arg(self.path("patches"))
            .arg("--cache-dir")
            .arg(self.path("cache"))
            .arg("-o")
            .arg(self.path(out))
            .env("OSB_FAKE_KERNEL_DIR", self.path("state"))
            .env_remove("SOURCE_DATE_EPOCH");
        c
    }

    fn open_gate(&self) {
        fs::write(self.path("state/gate"), "").unwrap();
    }

    fn makes_started(&self) -> usize {
        fs::read_dir(self.path("state")).unwrap().filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("started.")).count()
    }

    fn manifest(&self, out: &str) -> serde_json::Value {
        let path = self.path(out).join("manifest-0.0.1-fake-1.json");
        serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
    }
}

/// A child's stderr, line by line, on a channel (and all of it at the end).
fn stderr_lines(child: &mut std::process::Child) -> (std::sync::mpsc::Receiver<String>, std::thread::JoinHandle<String>) {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(line);
        }
        all
    });
    (rx, reader)
}

/// Two builds of one cache key at once (two `osbuilder kernel` processes,
/// real make, the real lock): the second waits for the first instead of
/// clearing its work directory under it, then takes the first's result
/// from the cache. One make runs; both succeed with the same artifacts.
#[test]
fn two_builds_of_one_key_wait_for_each_other() {
    let fake = FakeKernel::new();
    let spawn = |out: &str| fake.command(out).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut first = spawn("out1");
    let (_first_lines, first_err) = stderr_lines(&mut first);
    let deadline = Instant::now() + Duration::from_secs(120);
    while fake.makes_started() == 0 {
        assert!(first.try_wait().unwrap().is_none(), "the first build ended before make started: {}", first_err.join().unwrap());
        assert!(Instant::now() < deadline, "the first build's make never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The second build: it either waits for the lock (and says so) or, with
    // no lock, clears the work directory and starts a make of its own.
    let mut second = spawn("out2");
    let (second_lines, second_err) = stderr_lines(&mut second);
    let mut said_waiting = false;
    while !said_waiting && fake.makes_started() < 2 {
        assert!(second.try_wait().unwrap().is_none(), "the second build ended early: {}", second_err.join().unwrap());
        assert!(Instant::now() < deadline, "the second build neither waited nor built");
        said_waiting = second_lines.try_iter().any(|l| l.contains("waiting for"));
        std::thread::sleep(Duration::from_millis(20));
    }
    fake.open_gate();
    let (s1, s2) = (first.wait().unwrap(), second.wait().unwrap());
    let (e1, e2) = (first_err.join().unwrap(), second_err.join().unwrap());
    assert!(s1.success(), "the first build failed: {e1}");
    assert!(s2.success(), "the second build failed: {e2}");
    assert_eq!(fake.makes_started(), 1, "one make for one key\nfirst: {e1}\nsecond: {e2}");
    assert!(said_waiting, "the second build says it waits: {e2}");
    assert!(e1.contains(" built in ") && e2.contains(" cached in "), "first: {e1}\nsecond: {e2}");
    assert_eq!(fs::read(fake.path("out1/vmlinux-0.0.1-fake-1")).unwrap(), fs::read(fake.path("out2/vmlinux-0.0.1-fake-1")).unwrap());
    let kernel_dir = fake.path("cache/kernel");
    let mut left: Vec<String> = fs::read_dir(&kernel_dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert!(left.iter().all(|n| !n.starts_with("work-") || n.ends_with(".lock")), "no work directory left: {left:?}");
}

/// The cache key covers binutils, which the kernel build runs as `ld` and
/// `as` from PATH: the same inputs with gold as `ld` are another key (a
/// rebuild, not a cache hit), and the manifest names both linkers' versions.
#[test]
fn another_linker_is_another_cache_key() {
    let fake = FakeKernel::new();
    fake.open_gate();
    let run = |cmd: &mut std::process::Command| {
        let r = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&r.stderr).into_owned();
        assert!(r.status.success(), "{stderr}");
        stderr
    };
    let stderr = run(&mut fake.command("bfd"));
    assert!(stderr.contains(" built in "), "{stderr}");
    let bfd = fake.manifest("bfd");

    let gold_dir = fake.path("gold");
    fs::create_dir(&gold_dir).unwrap();
    std::os::unix::fs::symlink(run_stdout(tool("sh").args(["-c", "command -v ld.gold"])).trim(), gold_dir.join("ld")).unwrap();
    let path = format!("{}:{}", gold_dir.display(), std::env::var("PATH").unwrap_or_default());
    let stderr = run(fake.command("gold").env("PATH", format!("{}:/usr/local/bin:/usr/bin:/bin", path)));
    assert!(stderr.contains(" built in "), "another ld must not be a cache hit: {stderr}");
    let gold = fake.manifest("gold");
    assert_ne!(bfd["cache_key"], gold["cache_key"]);
    let toolchain = |m: &serde_json::Value| m["toolchain"].as_str().unwrap().to_owned();
    assert!(toolchain(&bfd).contains("GNU ld ") && toolchain(&gold).contains("GNU gold"), "{}\n{}", toolchain(&bfd), toolchain(&gold));
    assert!(toolchain(&bfd).contains("GNU assembler"), "{}", toolchain(&bfd));
}
