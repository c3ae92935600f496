//! The boot harness: a guest under QEMU (KVM when `/dev/kvm` works, TCG
//! otherwise) with real vsock through rust-vmm's `vhost-device-vsock`, the
//! serial console captured to a file, and the agent reached through the
//! hybrid-vsock Unix socket (`CONNECT <port>\n`, as Firecracker and Cloud
//! Hypervisor offer it). Both processes are killed by pid when the [`Vm`]
//! is dropped, also when a test panics, and die with the thread that
//! started them (PR_SET_PDEATHSIG) if the harness itself is killed.

use std::io;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use crate::disk::image::Via;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot start {what}: {source}")]
    Spawn { what: String, source: io::Error },
    #[error("{what} did not come up within {secs} s{detail}")]
    Timeout { what: String, secs: u64, detail: String },
    #[error("the guest stopped ({status}) before {what}; console {console}:\n{tail}")]
    Exited { what: String, status: String, console: PathBuf, tail: String },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Machine {
    /// QEMU microvm: virtio-mmio devices, no PCI, no firmware.
    Microvm,
    /// QEMU q35: PCI, ACPI.
    Q35,
}

#[derive(Clone, Debug)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub machine: Machine,
    pub mem_mib: u32,
    pub cpus: u32,
    /// Added to the kernel command line after ours.
    pub append: String,
    /// Replaces our kernel arguments ([`default_kernel_args`]); `append`
    /// still follows.
    pub kernel_args: Option<String>,
    /// microvm: ACPI tables on (QEMU's default) or off (our default: the
    /// virtio-mmio devices are then on the command line, as on Firecracker).
    /// q35 always has ACPI.
    pub acpi: bool,
    pub guest_cid: u32,
    /// Holds the sockets and the console log.
    pub work_dir: PathBuf,
    pub vhost_device_vsock: PathBuf,
    pub qemu: PathBuf,
    /// Extra QEMU arguments (disks, devices).
    pub extra_args: Vec<String>,
    /// A disk image attached as pmem (NVDIMM), virtio-blk or virtio-scsi.
    pub disk: Option<DiskAttach>,
    /// Open a QMP socket (`work_dir/qmp.sock`) for [`Vm::qmp`]: hot-plugging
    /// devices into the running guest.
    pub qmp: bool,
    /// Data volumes beside the root, for the run config's `mounts` to find.
    pub volumes: Vec<Volume>,
}

/// A data volume: what the guest's `mounts` (by `SERIAL=`, `LABEL=`, a tag) refer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Volume {
    /// A disk file (raw or qcow2, told by its magic as for the root) on virtio-blk or
    /// virtio-scsi, with the serial the guest's `SERIAL=` finds it by.
    Disk { path: PathBuf, via: Via, serial: Option<String>, read_only: bool },
    /// A host directory shared over 9p (QEMU's own `-fsdev local`) under `tag`.
    Share9p { dir: PathBuf, tag: String, read_only: bool },
}

/// A serial or tag QEMU takes as it is and the guest reads back the same: letters,
/// digits, `.`, `_`, `-`; a virtio-blk serial holds at most 20 bytes
/// (VIRTIO_BLK_ID_BYTES), and the same bound keeps SCSI's and a tag's short.
fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
        return Err(format!("{what} {value:?}: 1 to 20 of A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

impl Volume {
    /// `PATH[,via=virtio-blk|virtio-scsi][,serial=S][,ro]` (`osbuilder vm boot --volume`).
    pub fn parse_disk(s: &str) -> Result<Volume, String> {
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| format!("{s:?}: expected PATH[,via=virtio-blk|virtio-scsi][,serial=S][,ro]"))?;
        let (mut via, mut serial, mut read_only) = (Via::VirtioBlk, None, false);
        for part in parts {
            match part.split_once('=') {
                Some(("via", "virtio-blk")) => via = Via::VirtioBlk,
                Some(("via", "virtio-scsi")) => via = Via::VirtioScsi,
                Some(("via", other)) => return Err(format!("{s:?}: via={other}: a volume is on virtio-blk or virtio-scsi")),
                Some(("serial", v)) => {
                    check_name("serial", v).map_err(|e| format!("{s:?}: {e}"))?;
                    serial = Some(v.to_owned());
                }
                None if part == "ro" => read_only = true,
                _ => return Err(format!("{s:?}: unknown {part:?} (via=, serial=, ro)")),
            }
        }
        Ok(Volume::Disk { path: PathBuf::from(path), via, serial, read_only })
    }

    /// `DIR,tag=TAG[,ro]` (`osbuilder vm boot --share`).
    pub fn parse_share(s: &str) -> Result<Volume, String> {
        let mut parts = s.split(',');
        let dir = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| format!("{s:?}: expected DIR,tag=TAG[,ro]"))?;
        let (mut tag, mut read_only) = (None, false);
        for part in parts {
            match part.split_once('=') {
                Some(("tag", v)) => {
                    check_name("tag", v).map_err(|e| format!("{s:?}: {e}"))?;
                    tag = Some(v.to_owned());
                }
                None if part == "ro" => read_only = true,
                _ => return Err(format!("{s:?}: unknown {part:?} (tag=, ro)")),
            }
        }
        let tag = tag.ok_or_else(|| format!("{s:?}: a share needs tag=TAG (the guest mounts it by that tag)"))?;
        Ok(Volume::Share9p { dir: PathBuf::from(dir), tag, read_only })
    }

    /// QEMU arguments for volume number `i`: its drive or fsdev, and its device (a SCSI
    /// disk on the controller `volscsi`, which [`volume_args`] adds once).
    fn qemu_args(&self, i: usize, machine: Machine) -> Result<Vec<String>, VmError> {
        let id = format!("vol{i}");
        Ok(match self {
            Volume::Disk { path, via, serial, read_only } => {
                let serial = serial.as_ref().map(|s| format!(",serial={s}")).unwrap_or_default();
                let device = match via {
                    Via::VirtioBlk => format!("{}{serial}", virtio_blk_device(machine, &id)),
                    Via::VirtioScsi => format!("scsi-hd,drive={id},bus=volscsi.0{serial}"),
                    Via::Pmem => {
                        return Err(VmError::Io {
                            context: format!("volume {}", path.display()),
                            source: io::Error::other("a volume is on virtio-blk or virtio-scsi (pmem is for the root disk)"),
                        })
                    }
                };
                vec!["-drive".into(), drive_arg(path, &id, *read_only)?, "-device".into(), device]
            }
            Volume::Share9p { dir, tag, read_only } => {
                if !dir.is_dir() {
                    return Err(VmError::Io { context: format!("share {}", dir.display()), source: io::Error::other("not a directory") });
                }
                let ro = if *read_only { ",readonly=on" } else { "" };
                vec![
                    "-fsdev".into(),
                    format!("local,id=fs{i},path={},security_model=none{ro}", qemu_quote(dir)),
                    "-device".into(),
                    format!("{},fsdev=fs{i},mount_tag={tag}", if machine == Machine::Microvm { "virtio-9p-device" } else { "virtio-9p-pci" }),
                ]
            }
        })
    }
}

/// QEMU's option syntax: a comma inside a value is doubled.
fn qemu_quote(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The `-drive` value for a disk file (the root or a volume) under `id`, its format
/// told by its magic.
fn drive_arg(path: &Path, id: &str, read_only: bool) -> Result<String, VmError> {
    let format = disk_format(path)?;
    let ro = if read_only { ",read-only=on" } else { "" };
    Ok(format!("file={},if=none,id={id},format={format},cache=writeback{ro}", qemu_quote(path)))
}

/// The virtio-blk device for drive `id` (MMIO on microvm, PCI elsewhere).
fn virtio_blk_device(machine: Machine, id: &str) -> String {
    format!("{},drive={id}", if machine == Machine::Microvm { "virtio-blk-device" } else { "virtio-blk-pci" })
}

/// A virtio-scsi controller named `id` (MMIO on microvm, PCI elsewhere).
fn virtio_scsi_controller(machine: Machine, id: &str) -> String {
    format!("{},id={id}", if machine == Machine::Microvm { "virtio-scsi-device" } else { "virtio-scsi-pci" })
}

/// QEMU arguments for all of `volumes`, with one virtio-scsi controller for those on SCSI.
fn volume_args(volumes: &[Volume], machine: Machine) -> Result<Vec<String>, VmError> {
    let mut args = Vec::new();
    if volumes.iter().any(|v| matches!(v, Volume::Disk { via: Via::VirtioScsi, .. })) {
        args.extend(["-device".to_owned(), virtio_scsi_controller(machine, "volscsi")]);
    }
    for (i, v) in volumes.iter().enumerate() {
        args.extend(v.qemu_args(i, machine)?);
    }
    Ok(args)
}

/// A disk image and how the guest sees it.
#[derive(Clone, Debug)]
pub struct DiskAttach {
    pub path: PathBuf,
    pub via: Via,
}

/// QEMU's `format=` for a disk file: `qcow2` when it starts with the qcow2
/// magic, else `raw`. Never left to QEMU's own probing, and a qcow2 file
/// that names another file (backing file, external data file) is refused: a
/// guest that wrote a qcow2 header into a raw disk must not make QEMU open
/// host files.
fn disk_format(path: &std::path::Path) -> Result<&'static str, VmError> {
    use std::io::Read;
    let io_err = |source| VmError::Io { context: format!("cannot read {}", path.display()), source };
    let mut head = [0u8; 112];
    let mut file = std::fs::File::open(path).map_err(io_err)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(io_err)? {
            0 => break,
            k => n += k,
        }
    }
    if !crate::disk::qcow2::is_qcow2(&head[..n]) {
        return Ok("raw");
    }
    let header = crate::disk::qcow2::parse_header(&head[..n]).map_err(io_err)?;
    crate::disk::qcow2::check_self_contained(&header).map_err(io_err)?;
    Ok("qcow2")
}

impl DiskAttach {
    /// QEMU arguments for the disk (Kata's for the NVDIMM: a read-only,
    /// shared file backend and an unarmed NVDIMM, so the guest maps the
    /// host's page cache and cannot write it).
    fn qemu_args(&self, machine: Machine) -> Result<Vec<String>, VmError> {
        let path = self.path.display().to_string();
        let mmio = machine == Machine::Microvm;
        Ok(match self.via {
            Via::Pmem => {
                if disk_format(&self.path)? != "raw" {
                    return Err(VmError::Io {
                        context: format!("{path} cannot back an NVDIMM"),
                        source: io::Error::other(
                            "an NVDIMM maps the file as it is, so it must be a raw image, not qcow2; boot it through virtio-blk or virtio-scsi",
                        ),
                    });
                }
                if mmio {
                    return Err(VmError::Io {
                        context: "pmem needs an NVDIMM".into(),
                        source: io::Error::other("QEMU's microvm has no NVDIMM: use --machine q35"),
                    });
                }
                let size = std::fs::metadata(&self.path).map_err(|source| VmError::Io { context: format!("cannot read {path}"), source })?.len();
                vec![
                    "-object".into(),
                    format!("memory-backend-file,id=mem0,share=on,mem-path={path},size={size},readonly=on"),
                    "-device".into(),
                    "nvdimm,id=nv0,memdev=mem0,unarmed=on".into(),
                ]
            }
            Via::VirtioBlk => vec!["-drive".into(), drive_arg(&self.path, "disk0", false)?, "-device".into(), virtio_blk_device(machine, "disk0")],
            Via::VirtioScsi => vec![
                "-device".into(),
                virtio_scsi_controller(machine, "scsi0"),
                "-drive".into(),
                drive_arg(&self.path, "disk0", false)?,
                "-device".into(),
                "scsi-hd,drive=disk0,bus=scsi0.0".into(),
            ],
        })
    }

    /// The NVDIMM's size rounded up to MiB, for `maxmem`.
    fn pmem_mib(&self) -> u64 {
        match self.via {
            Via::Pmem => std::fs::metadata(&self.path).map(|m| m.len().div_ceil(1 << 20)).unwrap_or(0),
            _ => 0,
        }
    }
}

impl VmConfig {
    pub fn new(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>, work_dir: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd,
            machine: Machine::Microvm,
            mem_mib: 256,
            cpus: 1,
            append: String::new(),
            kernel_args: None,
            acpi: false,
            guest_cid: 3,
            work_dir: work_dir.into(),
            vhost_device_vsock: vhost_device_vsock_path(),
            qemu: PathBuf::from("qemu-system-x86_64"),
            extra_args: Vec::new(),
            disk: None,
            qmp: false,
            volumes: Vec::new(),
        }
    }

    /// The kernel command line we pass under `accel` ("kvm" or "tcg"):
    /// [`default_kernel_args`] (or `kernel_args`), then `append`.
    pub fn cmdline(&self, accel: &str) -> String {
        let mut c = self.kernel_args.clone().unwrap_or_else(|| default_kernel_args(self.machine, self.acpi, accel == "tcg"));
        if !self.append.is_empty() {
            c.push(' ');
            c.push_str(&self.append);
        }
        c
    }
}

/// The kernel arguments our launches use for `machine` (with or without
/// ACPI on microvm; under TCG or KVM). Each one's reason and measured
/// saving is in kernel-config/README.md ("Boot arguments"); none weakens
/// the guest's security.
pub fn default_kernel_args(machine: Machine, acpi: bool, tcg: bool) -> String {
    // Serial console, no reboot loops; the one UART VMMs give, probed alone;
    // lock prefixes left in place on one vCPU (patching them out is
    // text patching: slow under TCG, and undone again by CPU hotplug);
    // no IO-APIC timer check (the VMM's timer works).
    let mut c = String::from("console=ttyS0 panic=-1 reboot=t quiet 8250.nr_uarts=1 noreplace-smp no_timer_check");
    if machine == Machine::Microvm {
        // No PCI on microvm: skip probing for it.
        c.push_str(" pci=off");
        if !acpi {
            c.push_str(" acpi=off");
        }
    }
    let reduced_hardware_acpi = machine == Machine::Microvm && acpi;
    // TCG has no TSC-deadline timer, so the kernel calibrates the local
    // APIC timer against the PIT for about a quarter of a second; under KVM
    // the CPU's TSC deadline mode skips that. Under TCG the PIT or HPET
    // drives the tick instead. Not on ACPI's reduced-hardware microvm,
    // which has no PIT clockevent to fall back on.
    if tcg && !reduced_hardware_acpi {
        c.push_str(" nolapic_timer");
    }
    // A TCG guest reads the host's TSC, whose rate the host knows; the
    // guest's own quick calibration against the PIT fails in some boots under
    // TCG ("Marking TSC unstable due to could not calculate TSC khz"), which
    // leaves a 4 ms jiffies clock for good, or, on microvm with ACPI (no PIT
    // tick to fall back on), hangs the boot there. tsc=reliable: the
    // clocksource watchdog judges the TSC against jiffies, and it is TCG's
    // jiffies that drift when the host is busy (it dropped the TSC in 6 of
    // 10 boots run side by side).
    if let Some(khz) = tcg.then(host_tsc_khz).flatten() {
        c.push_str(&format!(" tsc_early_khz={khz} tsc=reliable"));
    }
    c
}

/// The host's TSC rate in kHz, measured once against the monotonic clock
/// over 50 ms; None unless the host's TSC is constant (`constant_tsc`).
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
            if !cpuinfo.lines().any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "constant_tsc")) {
                return None;
            }
            // SAFETY: rdtsc has no preconditions on x86_64.
            let (t0, c0) = (Instant::now(), unsafe { core::arch::x86_64::_rdtsc() });
            std::thread::sleep(Duration::from_millis(50));
            // SAFETY: as above.
            let (c1, elapsed) = (unsafe { core::arch::x86_64::_rdtsc() }, t0.elapsed());
            let khz = c1.wrapping_sub(c0) as f64 / elapsed.as_secs_f64() / 1e3;
            (100_000.0..100_000_000.0).contains(&khz).then_some(khz.round() as u64)
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    })
}

/// `$OSBUILDER_VHOST_DEVICE_VSOCK`, else `vhost-device-vsock` on PATH
/// (`ci/tools.sh vhost-device-vsock` installs and prints it).
pub fn vhost_device_vsock_path() -> PathBuf {
    std::env::var_os("OSBUILDER_VHOST_DEVICE_VSOCK").filter(|v| !v.is_empty()).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("vhost-device-vsock"))
}

/// Whether to try KVM: `OSBUILDER_ACCEL=kvm|tcg` decides; otherwise KVM
/// when `/dev/kvm` opens read-write and no guest has yet failed on it in
/// this process (some hosts expose a /dev/kvm that cannot run guests:
/// [`Vm::start`] then falls back to TCG and remembers).
pub fn kvm_usable() -> bool {
    match std::env::var("OSBUILDER_ACCEL").as_deref() {
        Ok("tcg") => return false,
        Ok("kvm") => return true,
        _ => {}
    }
    !KVM_BROKEN.load(std::sync::atomic::Ordering::Relaxed) && std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

static KVM_BROKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub struct Vm {
    qemu: Child,
    vhost: Child,
    pub console: PathBuf,
    /// The hybrid-vsock Unix socket (`CONNECT <port>\n`).
    pub vsock_socket: PathBuf,
    pub started: Instant,
    pub accel: &'static str,
    exit: Option<ExitStatus>,
    cfg: VmConfig,
    qemu_log: PathBuf,
}

fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

fn wait_for_path(path: &Path, child: &mut Child, what: &str, limit: Duration) -> Result<(), VmError> {
    let start = Instant::now();
    while !path.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(VmError::Spawn { what: what.to_string(), source: io::Error::other(format!("exited ({status}) before creating {}", path.display())) });
        }
        if start.elapsed() > limit {
            return Err(VmError::Timeout { what: format!("{what} socket {}", path.display()), secs: limit.as_secs(), detail: String::new() });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn spawn_qemu(cfg: &VmConfig, accel: &str, vu: &Path, console: &Path, qemu_log: &Path) -> Result<(Child, Instant), VmError> {
    let mem = format!("memory-backend-memfd,id=mem,size={}M,share=on", cfg.mem_mib);
    let mut q = Command::new(&cfg.qemu);
    let pmem = cfg.disk.as_ref().filter(|d| d.via == Via::Pmem);
    match cfg.machine {
        // acpi=off: QEMU then lists the virtio-mmio devices on the kernel
        // command line (virtio_mmio.device=...), as Firecracker does.
        Machine::Microvm => q.args(["-M", if cfg.acpi { "microvm,acpi=on,memory-backend=mem" } else { "microvm,acpi=off,memory-backend=mem" }]),
        Machine::Q35 if pmem.is_some() => q.args(["-M", "q35,nvdimm=on,memory-backend=mem"]),
        Machine::Q35 => q.args(["-M", "q35,memory-backend=mem"]),
    };
    // An NVDIMM is memory: it needs a slot and room under maxmem.
    let m = match pmem {
        Some(d) => format!("{}M,slots=2,maxmem={}M", cfg.mem_mib, u64::from(cfg.mem_mib) + d.pmem_mib() + 2),
        None => format!("{}M", cfg.mem_mib),
    };
    q.args(["-object", &mem, "-accel", accel, "-m", &m, "-smp", &cfg.cpus.to_string()]);
    if accel == "kvm" {
        q.args(["-cpu", "host"]);
    }
    q.args(["-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults"]);
    q.arg("-serial").arg(format!("file:{}", console.display()));
    q.arg("-chardev").arg(format!("socket,id=vsock0,path={}", vu.display()));
    q.args([
        "-device",
        match cfg.machine {
            Machine::Microvm => "vhost-user-vsock-device,chardev=vsock0",
            Machine::Q35 => "vhost-user-vsock-pci,chardev=vsock0",
        },
    ]);
    q.arg("-kernel").arg(&cfg.kernel);
    if let Some(initrd) = &cfg.initrd {
        q.arg("-initrd").arg(initrd);
    }
    q.arg("-append").arg(cfg.cmdline(accel));
    if let Some(disk) = &cfg.disk {
        q.args(disk.qemu_args(cfg.machine)?);
    }
    q.args(volume_args(&cfg.volumes, cfg.machine)?);
    q.args(&cfg.extra_args);
    if cfg.qmp {
        q.arg("-qmp").arg(format!("unix:{},server=on,wait=off", cfg.work_dir.join("qmp.sock").display()));
    }
    q.stdin(Stdio::null()).stdout(Stdio::null());
    q.stderr(std::fs::File::create(qemu_log).map_err(|source| VmError::Io { context: "cannot create the qemu log".into(), source })?);
    die_with_parent(&mut q);
    let started = Instant::now();
    let qemu = q.spawn().map_err(|source| VmError::Spawn { what: cfg.qemu.display().to_string(), source })?;
    Ok((qemu, started))
}

impl Vm {
    pub fn start(cfg: &VmConfig) -> Result<Vm, VmError> {
        let io_err = |context: String| move |source| VmError::Io { context, source };
        std::fs::create_dir_all(&cfg.work_dir).map_err(io_err(format!("cannot create {}", cfg.work_dir.display())))?;
        let vu = cfg.work_dir.join("vhost-user-vsock.sock");
        let hv = cfg.work_dir.join("vsock.sock");
        let console = cfg.work_dir.join("console.log");
        for p in [&vu, &hv, &console] {
            let _ = std::fs::remove_file(p);
        }
        let mut vhost_cmd = Command::new(&cfg.vhost_device_vsock);
        vhost_cmd
            .arg("--vm")
            // tx-buffer-size: the default 64 KiB cannot hold one 64 KiB
            // ReadStdout answer plus its framing, and the stream stalls.
            .arg(format!("guest-cid={},socket={},uds-path={},tx-buffer-size={}", cfg.guest_cid, vu.display(), hv.display(), 1 << 20))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(cfg.work_dir.join("vhost-device-vsock.log")).map_err(io_err("cannot create the vhost log".into()))?);
        die_with_parent(&mut vhost_cmd);
        let mut vhost = vhost_cmd.spawn().map_err(|source| VmError::Spawn {
            what: format!("{} (run `ci/tools.sh vhost-device-vsock`, or set OSBUILDER_VHOST_DEVICE_VSOCK)", cfg.vhost_device_vsock.display()),
            source,
        })?;
        if let Err(e) = wait_for_path(&vu, &mut vhost, "vhost-device-vsock", Duration::from_secs(10)) {
            let _ = vhost.kill();
            let _ = vhost.wait();
            return Err(e);
        }

        let qemu_log = cfg.work_dir.join("qemu.log");
        let accel = if kvm_usable() { "kvm" } else { "tcg" };
        let (qemu, started) = match spawn_qemu(cfg, accel, &vu, &console, &qemu_log) {
            Ok(q) => q,
            Err(e) => {
                let _ = vhost.kill();
                let _ = vhost.wait();
                return Err(e);
            }
        };
        let vm = Vm { qemu, vhost, console, vsock_socket: hv, started, accel, exit: None, cfg: cfg.clone(), qemu_log };
        Ok(vm)
    }

    /// Runs one QMP command (`{"execute": command, "arguments": arguments}`) on
    /// a fresh QMP connection (the VM must have been started with `qmp`) and
    /// returns its `return` value; QEMU's `error` becomes an error naming it.
    pub fn qmp(&self, command: &str, arguments: serde_json::Value) -> Result<serde_json::Value, VmError> {
        use std::io::{BufRead, BufReader, Write};
        let path = self.cfg.work_dir.join("qmp.sock");
        let io_err = |what: &str| {
            let context = format!("QMP {command} ({what} {})", path.display());
            move |source| VmError::Io { context, source }
        };
        let stream = std::os::unix::net::UnixStream::connect(&path).map_err(io_err("connect to"))?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).map_err(io_err("set a timeout on"))?;
        let mut writer = stream.try_clone().map_err(io_err("clone"))?;
        let mut reader = BufReader::new(stream);
        // The greeting, then capabilities negotiation, then the command; events
        // (objects with "event") may come between and are skipped.
        let answer = |reader: &mut BufReader<std::os::unix::net::UnixStream>, want_greeting: bool| -> Result<serde_json::Value, VmError> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).map_err(io_err("read from"))? == 0 {
                    return Err(VmError::Io { context: format!("QMP {command}"), source: io::Error::other("QEMU closed the QMP socket") });
                }
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| VmError::Io { context: format!("QMP {command}"), source: io::Error::other(format!("not JSON ({e}): {line}")) })?;
                if want_greeting && v.get("QMP").is_some() {
                    return Ok(v);
                }
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    return Err(VmError::Io { context: format!("QMP {command}"), source: io::Error::other(format!("QEMU refused it: {e}")) });
                }
            }
        };
        answer(&mut reader, true)?;
        writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").map_err(io_err("write to"))?;
        answer(&mut reader, false)?;
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writer.write_all(format!("{request}\n").as_bytes()).map_err(io_err("write to"))?;
        answer(&mut reader, false)
    }

    pub fn qemu_pid(&self) -> u32 {
        self.qemu.id()
    }

    pub fn console_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    fn console_tail(&self) -> String {
        let text = self.console_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The QEMU exit status, if it has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.qemu.try_wait().ok().flatten();
        }
        self.exit
    }

    /// A guest that KVM could not run (some hosts expose a /dev/kvm that
    /// fails with "KVM internal error", and QEMU then sits paused, or makes
    /// QEMU abort at start) is started over under TCG; later guests of this process go straight to
    /// TCG.
    fn kvm_fallback(&mut self) -> Result<(), VmError> {
        if self.accel != "kvm" || std::env::var("OSBUILDER_ACCEL").as_deref() == Ok("kvm") {
            return Ok(());
        }
        let log = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        // Seen here: "KVM internal error" with QEMU left paused, and QEMU
        // aborting at start on an MSR KVM refuses ("failed to set MSR ...",
        // an assertion in kvm.c).
        let broken = log.contains("KVM internal error") || (self.exited().is_some() && log.to_lowercase().contains("kvm"));
        if broken {
            KVM_BROKEN.store(true, std::sync::atomic::Ordering::Relaxed);
            self.kill();
            let cfg = self.cfg.clone();
            *self = Vm::start(&cfg)?;
        }
        Ok(())
    }

    /// Fails with the console tail if the guest has stopped.
    pub fn check_running(&mut self, what: &str) -> Result<(), VmError> {
        self.kvm_fallback()?;
        match self.exited() {
            Some(status) => {
                Err(VmError::Exited { what: what.to_string(), status: status.to_string(), console: self.console.clone(), tail: self.console_tail() })
            }
            None => Ok(()),
        }
    }

    /// Waits until `needle` shows on the console; returns the time since QEMU started.
    pub fn wait_for_console(&mut self, needle: &str, limit: Duration) -> Result<Duration, VmError> {
        loop {
            if self.console_text().contains(needle) {
                return Ok(self.started.elapsed());
            }
            self.check_running(&format!("{needle:?} showed on the console"))?;
            if self.started.elapsed() > limit {
                return Err(VmError::Timeout {
                    what: format!("{needle:?} on the console"),
                    secs: limit.as_secs(),
                    detail: format!("; console:\n{}", self.console_tail()),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for QEMU to end by itself (poweroff with -no-reboot).
    pub fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus, VmError> {
        let start = Instant::now();
        loop {
            self.kvm_fallback()?;
            if let Some(s) = self.exited() {
                return Ok(s);
            }
            if start.elapsed() > limit {
                return Err(VmError::Timeout { what: "guest poweroff".into(), secs: limit.as_secs(), detail: format!("; console:\n{}", self.console_tail()) });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's address through the hybrid-vsock socket.
    pub fn agent_endpoint(&self, port: u32) -> osb_agent::client::Endpoint {
        osb_agent::client::Endpoint::HybridVsock { path: self.vsock_socket.clone(), port }
    }

    /// Retries connect + grpc.Health/Check until the agent answers, the
    /// guest stops (an error with the console tail), or `limit` passes.
    pub fn wait_for_agent(&mut self, port: u32, limit: Duration) -> Result<osb_agent::client::Client, VmError> {
        use osb_agent::client::Client;
        let endpoint = self.agent_endpoint(port);
        let start = Instant::now();
        loop {
            self.check_running("the agent answered")?;
            if let Ok(mut c) = Client::connect(&endpoint, Duration::from_secs(2)) {
                if c.check().unwrap_or(false) {
                    c.set_timeout(Duration::from_secs(30));
                    return Ok(c);
                }
            }
            if start.elapsed() > limit {
                return Err(VmError::Timeout {
                    what: format!("the agent at {endpoint}"),
                    secs: limit.as_secs(),
                    detail: format!("; console:\n{}", self.console_tail()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// [`Vm::start`] then [`Vm::wait_for_agent`]. A guest whose agent says
    /// on the console that it is listening while the host's hybrid-vsock
    /// connections never reach it (seen a few times under TCG with
    /// vhost-device-vsock 0.3, on q35 and microvm; the guest is fine, the
    /// host side never connects; not understood yet) gets exactly one fresh
    /// start, reported through `on_retry`; any other failure is returned.
    pub fn start_with_agent(cfg: &VmConfig, port: u32, limit: Duration, on_retry: &mut dyn FnMut(&str)) -> Result<(Vm, osb_agent::client::Client), VmError> {
        let mut vm = Vm::start(cfg)?;
        match vm.wait_for_agent(port, limit) {
            Ok(client) => Ok((vm, client)),
            Err(e @ VmError::Timeout { .. }) if vm.console_text().contains("osb-agent: listening on vsock port") => {
                on_retry(&format!(
                    "{}: the guest's agent was listening but the host never reached it within {} s ({e}); starting the guest once more",
                    cfg.work_dir.display(),
                    limit.as_secs()
                ));
                vm.kill();
                drop(vm);
                let mut vm = Vm::start(cfg)?;
                let client = vm.wait_for_agent(port, limit)?;
                Ok((vm, client))
            }
            Err(e) => Err(e),
        }
    }

    /// Kills QEMU and the vsock backend now.
    pub fn kill(&mut self) {
        for child in [&mut self.qemu, &mut self.vhost] {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // The sockets stay: a restarted Vm in the same directory (the KVM
        // fallback) has already made new ones at these paths.
        self.kill();
    }
}

/// One boot on the host's clock (seconds after QEMU was started), from the
/// agent's boot stamps: `osb_boot_stamp_seconds{stamp="NAME"}` (guest
/// uptime at init's and the agent's start-up steps) and
/// `osb_guest_uptime_seconds` (guest uptime when the report was made). The
/// report was made between `asked` and `answered` (host seconds), so the
/// guest's clock started at their midpoint minus that uptime, to within half
/// a round trip: the time QEMU, the firmware (none on microvm) and the
/// kernel's decompressor took before the kernel's clock began.
#[derive(Clone, Debug, PartialEq)]
pub struct BootTimeline {
    /// Host seconds from QEMU's start to the guest's clock zero.
    pub kernel_start: f64,
    /// Guest uptime in seconds at each stamp, in the order recorded.
    pub stamps: Vec<(String, f64)>,
    /// Host seconds from QEMU's start to the first health answer.
    pub health: f64,
}

impl BootTimeline {
    pub fn from_metrics(metrics: &str, asked: f64, answered: f64, health: f64) -> Option<BootTimeline> {
        let mut stamps = Vec::new();
        let mut uptime = None;
        for line in metrics.lines() {
            if let Some(rest) = line.strip_prefix("osb_boot_stamp_seconds{stamp=\"") {
                // A line that does not parse is left out, not the whole time line.
                if let Some((name, Ok(secs))) = rest.split_once("\"}").map(|(n, v)| (n, v.trim().parse())) {
                    stamps.push((name.to_string(), secs));
                }
            } else if let Some(v) = line.strip_prefix("osb_guest_uptime_seconds ") {
                uptime = v.trim().parse::<f64>().ok();
            }
        }
        let uptime = uptime?;
        Some(BootTimeline { kernel_start: (asked + answered) / 2.0 - uptime, stamps, health })
    }

    /// Guest uptime at `name`.
    pub fn stamp(&self, name: &str) -> Option<f64> {
        self.stamps.iter().find(|(n, _)| n == name).map(|(_, t)| *t)
    }

    /// The phases, in seconds: QEMU start -> kernel clock zero; kernel ->
    /// init's first instruction; init -> the agent listening; listening ->
    /// the first health answer at the host; and the total.
    pub fn phases(&self) -> Vec<(&'static str, Option<f64>)> {
        let init = self.stamp("init");
        let listen = self.stamp("listen");
        vec![
            ("qemu_to_kernel", Some(self.kernel_start)),
            ("kernel_to_init", init),
            ("init_to_listen", init.zip(listen).map(|(i, l)| l - i)),
            ("listen_to_health", listen.map(|l| self.health - self.kernel_start - l)),
            ("total", Some(self.health)),
        ]
    }
}

#[cfg(test)]
mod timeline_tests {
    use super::{default_kernel_args, BootTimeline, Machine};

    #[test]
    fn launch_arguments_follow_the_machine_and_the_accelerator() {
        let args = |m, acpi, tcg| default_kernel_args(m, acpi, tcg).split(' ').map(String::from).collect::<Vec<_>>();
        for (m, acpi) in [(Machine::Microvm, false), (Machine::Microvm, true), (Machine::Q35, true)] {
            for tcg in [false, true] {
                let a = args(m, acpi, tcg);
                for must in ["console=ttyS0", "panic=-1", "reboot=t", "quiet", "8250.nr_uarts=1", "noreplace-smp", "no_timer_check"] {
                    assert!(a.iter().any(|x| x == must), "{m:?} acpi={acpi} tcg={tcg}: {must} missing from {a:?}");
                }
                assert_eq!(a.iter().any(|x| x == "pci=off"), m == Machine::Microvm, "{a:?}");
                assert_eq!(a.iter().any(|x| x == "acpi=off"), m == Machine::Microvm && !acpi, "{a:?}");
                // Only TCG calibrates the APIC timer; ACPI's reduced hardware has no PIT to fall back on.
                assert_eq!(a.iter().any(|x| x == "nolapic_timer"), tcg && !(m == Machine::Microvm && acpi), "{m:?} acpi={acpi} tcg={tcg}: {a:?}");
                assert!(!a.iter().any(|x| x.starts_with("mitigations") || x == "nokaslr"), "no default weakens the guest: {a:?}");
                // This machine's TSC is constant: TCG guests are told its rate.
                let told = tcg && super::host_tsc_khz().is_some();
                assert_eq!(a.iter().any(|x| x.starts_with("tsc_early_khz=")), told, "{a:?}");
                assert_eq!(a.iter().any(|x| x == "tsc=reliable"), told, "{a:?}");
            }
        }
    }

    #[test]
    fn phases_add_up_to_the_total() {
        let metrics = "osb_agent_rss_bytes 1\nosb_guest_uptime_seconds 0.900000\nosb_boot_stamp_seconds{stamp=\"init\"} 0.500000\n\
                       osb_boot_stamp_seconds{stamp=\"spawn\"} 0.510000\nosb_boot_stamp_seconds{stamp=\"listen\"} 0.600000\n";
        let t = BootTimeline::from_metrics(metrics, 1.19, 1.21, 1.0).unwrap();
        assert!((t.kernel_start - 0.3).abs() < 1e-9, "{t:?}");
        assert_eq!(t.stamp("spawn"), Some(0.51));
        let phases = t.phases();
        let sum: f64 = phases[..4].iter().map(|(_, v)| v.unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-9, "{phases:?}");
        assert!((phases[2].1.unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(BootTimeline::from_metrics("osb_agent_rss_bytes 1\n", 0.0, 0.0, 0.0), None, "no uptime, no time line");
    }
}

#[cfg(test)]
mod qcow2_attach_tests {
    use super::*;
    use crate::disk::qcow2::{Qcow2Options, Qcow2Writer};
    use crate::disk::Sink;

    fn attach(path: &std::path::Path, via: Via, machine: Machine) -> Result<Vec<String>, VmError> {
        DiskAttach { path: path.to_path_buf(), via }.qemu_args(machine)
    }

    #[test]
    fn the_drive_format_comes_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let q = dir.path().join("disk.qcow2");
        let mut w = Qcow2Writer::new(std::fs::File::create(&q).unwrap(), 1 << 20, Qcow2Options { compress: false, threads: 1 }).unwrap();
        w.write_all(b"data").unwrap();
        w.finish().unwrap();

        let args = attach(&raw, Via::VirtioBlk, Machine::Microvm).unwrap().join(" ");
        assert!(args.contains(",format=raw,"), "{args}");
        let args = attach(&q, Via::VirtioScsi, Machine::Q35).unwrap().join(" ");
        assert!(args.contains(",format=qcow2,"), "{args}");
        let err = attach(&q, Via::Pmem, Machine::Q35).unwrap_err().to_string();
        assert!(err.contains("cannot back an NVDIMM"), "{err}");

        // A backing file named in the header: refused, QEMU never sees it.
        let mut bytes = std::fs::read(&q).unwrap();
        bytes[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        bytes[16..20].copy_from_slice(&9u32.to_be_bytes());
        bytes[0x200..0x209].copy_from_slice(b"/etc/host");
        std::fs::write(&q, &bytes).unwrap();
        let err = attach(&q, Via::VirtioBlk, Machine::Microvm).unwrap_err().to_string();
        assert!(err.contains("backing file"), "{err}");
    }
}

#[cfg(test)]
mod volume_tests {
    use super::*;

    #[test]
    fn volumes_parse_and_become_qemu_devices() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("data.img");
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        let path = img.display().to_string();
        let blk = Volume::parse_disk(&format!("{path},serial=data-1,ro")).unwrap();
        assert_eq!(blk, Volume::Disk { path: img.clone(), via: Via::VirtioBlk, serial: Some("data-1".into()), read_only: true });
        // A comma in a file name cannot be written in --volume, but a library caller's path is quoted.
        let odd = dir.path().join("a,b.img");
        std::fs::write(&odd, vec![0u8; 4096]).unwrap();
        let scsi = Volume::Disk { path: odd.clone(), via: Via::VirtioScsi, serial: None, read_only: false };
        let share = Volume::parse_share(&format!("{},tag=share9", dir.path().display())).unwrap();
        let args = volume_args(&[blk, scsi, share], Machine::Microvm).unwrap();
        let quoted = odd.display().to_string().replace(',', ",,");
        assert_eq!(
            args,
            [
                "-device".to_owned(),
                "virtio-scsi-device,id=volscsi".into(),
                "-drive".into(),
                format!("file={path},if=none,id=vol0,format=raw,cache=writeback,read-only=on"),
                "-device".into(),
                "virtio-blk-device,drive=vol0,serial=data-1".into(),
                "-drive".into(),
                format!("file={quoted},if=none,id=vol1,format=raw,cache=writeback"),
                "-device".into(),
                "scsi-hd,drive=vol1,bus=volscsi.0".into(),
                "-fsdev".into(),
                format!("local,id=fs2,path={},security_model=none", dir.path().display()),
                "-device".into(),
                "virtio-9p-device,fsdev=fs2,mount_tag=share9".into(),
            ]
        );
        let q35 = volume_args(&[Volume::parse_disk(&path).unwrap()], Machine::Q35).unwrap();
        assert_eq!(q35[3], "virtio-blk-pci,drive=vol0");
        for (bad, why) in [
            (Volume::parse_disk("x.img,via=pmem"), "virtio-blk or virtio-scsi"),
            (Volume::parse_disk("x.img,serial=has space"), "1 to 20 of"),
            (Volume::parse_disk("x.img,serial=123456789012345678901"), "1 to 20 of"),
            (Volume::parse_disk("x.img,cache=none"), "unknown \"cache=none\""),
            (Volume::parse_disk(""), "expected PATH"),
            (Volume::parse_share("/tmp"), "needs tag=TAG"),
            (Volume::parse_share("/tmp,tag=a=b"), "1 to 20 of"),
        ] {
            let err = bad.unwrap_err();
            assert!(err.contains(why), "{err}");
        }
        let missing = Volume::Share9p { dir: dir.path().join("none"), tag: "t".into(), read_only: false };
        assert!(volume_args(&[missing], Machine::Q35).unwrap_err().to_string().contains("not a directory"));
    }
}
