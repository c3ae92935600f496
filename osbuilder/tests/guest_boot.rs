//! Boot where users boot: our kernel on QEMU microvm with ACPI off and on,
//! on q35, and with Firecracker's kernel command line, each showing what
//! userspace writes on the serial console (a busybox `/init`) and reaching
//! our agent over vsock; and the boot stamps init and the agent report.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use osbuilder::vm::{default_kernel_args, Machine, VmConfig};

const BOOT_LIMIT: Duration = Duration::from_secs(240);

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-guest-boot-").tempdir().unwrap().keep())
}

/// A busybox initrd whose /init writes a line to its stdout (the console,
/// through the tty layer: not printk) and powers off.
fn echo_initrd() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let root = scratch().join("echo-root");
        for d in ["bin", "dev", "proc"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::copy("/bin/busybox", root.join("bin/busybox")).expect("static busybox (busybox-static)");
        fs::write(root.join("init"), "#!/bin/busybox sh\n/bin/busybox echo \"userspace says hello on $(/bin/busybox tty)\"\n/bin/busybox reboot -f\n").unwrap();
        let r = tool("chmod").arg("0755").arg(root.join("init")).status().unwrap();
        assert!(r.success());
        let out = scratch().join("echo-initrd.gz");
        let r = tool("sh")
            .arg("-c")
            .arg(format!("cd {} && find . | LC_ALL=C sort | cpio --quiet -H newc -o | gzip -9 > {}", root.display(), out.display()))
            .status()
            .unwrap();
        assert!(r.success());
        out
    })
}

const HELLO: &str = "userspace says hello on /dev/console";

/// Boots `machine` (QEMU -M value) with the echo initrd and `cmdline`;
/// returns the console once the greeting is on it or QEMU has exited
/// (`reboot=k`, Firecracker's, resets QEMU's microvm instead of ending it).
fn echo_boot(name: &str, machine: &str, cmdline: &str) -> String {
    let kernel = &default_kernel().bzimage;
    let console = scratch().join(format!("{name}.console"));
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", machine, "-accel", "tcg", "-m", "256", "-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(echo_initrd())
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if fs::read_to_string(&console).is_ok_and(|c| c.contains(HELLO)) {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        if started.elapsed() > BOOT_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: QEMU still running after {BOOT_LIMIT:?}; console:\n{}", fs::read_to_string(&console).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::read_to_string(&console).unwrap_or_default()
}

/// What userspace writes reaches the serial console on every machine our
/// launches use, with the kernel arguments each gets: microvm without and
/// with ACPI (with ACPI the UART's interrupt comes from the DSDT, which only
/// the PNP 8250 driver reads), q35, and Firecracker's documented command line
/// (microvm without ACPI is what Firecracker's x86 guests see).
#[test]
fn userspace_output_reaches_the_console_on_every_machine() {
    let _one = one_guest_at_a_time();
    let cases = [
        ("microvm-acpi-off", "microvm,acpi=off", default_kernel_args(Machine::Microvm, false, true)),
        ("microvm-acpi-on", "microvm,acpi=on", default_kernel_args(Machine::Microvm, true, true)),
        ("q35", "q35", default_kernel_args(Machine::Q35, true, true)),
        // Firecracker's getting-started boot arguments plus its default
        // i8042 set (its DEFAULT_KERNEL_CMDLINE also has 8250.nr_uarts=0,
        // which removes the console altogether; see kernel-config/README.md).
        ("firecracker", "microvm,acpi=off", "console=ttyS0 reboot=k panic=1 pci=off nomodules i8042.noaux i8042.nomux i8042.dumbkbd".to_string()),
    ];
    let mut failed = Vec::new();
    for (name, machine, cmdline) in &cases {
        let console = echo_boot(name, machine, cmdline);
        eprintln!("{name} ({cmdline}): {} bytes of console", console.len());
        if !console.contains(HELLO) {
            failed.push(format!("{name} (-M {machine}, {cmdline}):\n{console}"));
        }
    }
    assert!(failed.is_empty(), "no userspace output on:\n{}", failed.join("\n---\n"));
}

fn agent_initrd() -> &'static Path {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        let out = scratch().join("agent-initrd.gz");
        let init = guest_init();
        let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
            .args(["initrd", "--quiet", "--agent-only", "--init", init.to_str().unwrap(), "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        out
    })
}

/// microvm with ACPI on: the virtio-mmio vsock device is found from the
/// DSDT (no virtio_mmio.device= on the command line) and the agent answers;
/// its metrics carry init's and its own boot stamps, in order, on the
/// guest's clock, and on the host's clock it listened before the host's
/// health answer (to within the estimate's error).
#[test]
fn agent_answers_on_microvm_with_acpi_and_reports_its_boot_stamps() {
    let _one = one_guest_at_a_time();
    require_vhost_device_vsock();
    let mut cfg = VmConfig::new(&default_kernel().bzimage, Some(agent_initrd().to_path_buf()), scratch().join("acpi-on"));
    cfg.acpi = true;
    assert!(!cfg.cmdline("tcg").contains("acpi=off"), "{}", cfg.cmdline("tcg"));
    let (mut vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);
    let health = vm.started.elapsed().as_secs_f64();
    let asked = vm.started.elapsed().as_secs_f64();
    let metrics = client.metrics().unwrap();
    let answered = vm.started.elapsed().as_secs_f64();
    let t = osbuilder::vm::BootTimeline::from_metrics(&metrics, asked, answered, health).unwrap_or_else(|| panic!("no time line in:\n{metrics}"));
    let names: Vec<&str> = t.stamps.iter().map(|(n, _)| n.as_str()).collect();
    // No `root`: an initramfs root is not switched.
    assert_eq!(names, ["init", "mounted", "spawn", "agent", "listen"], "{metrics}");
    assert!(t.stamps.windows(2).all(|w| w[0].1 <= w[1].1), "stamps out of order: {:?}", t.stamps);
    assert!(t.stamps[0].1 > 0.0, "init starts after the kernel: {:?}", t.stamps);
    // The kernel's clock starts after QEMU does, and the agent listened
    // before the host's health answer, to within the estimate's error (half
    // the metrics call's round trip).
    let error = (answered - asked) / 2.0 + 1e-3;
    assert!(t.kernel_start > 0.0, "{t:?}");
    let listen_to_health = t.phases()[3].1.unwrap();
    assert!(listen_to_health > -error && listen_to_health < health, "{t:?} (health at {health}, error bound {error})");
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));
}
