//! Early boot and root switching, as sequences of [`Sys`] calls.
//!
//! [`early_boot`] mounts the pseudo filesystems, takes the console and reads
//! the command line; [`switch_root`] mounts the real root named by
//! `osb.root` (optionally under a tmpfs overlay), moves /dev, /proc, /sys and
//! /run onto it, moves it onto `/` and chroots (an initramfs cannot
//! pivot_root). Failures of essential steps are [`BootError`]s naming the
//! step; the rest are warnings on the console.

use std::fmt;
use std::io;
use std::time::Duration;

use crate::cmdline::{Options, RootSource};
use crate::sys::{self, flags::*, Mount, Sys};

/// Where the new root is assembled before it moves onto `/`.
pub const NEW_ROOT: &str = "/.osb/root";
/// The read-only lower layer when `osb.overlay=1`.
pub const OVERLAY_LOWER: &str = "/.osb/lower";
/// The tmpfs holding the overlay's upper and work directories.
pub const OVERLAY_RW: &str = "/.osb/rw";

/// The last entry `osbuilder initrd --init` writes (osbuilder's
/// `initrd::COMPLETION_MARKER`). The kernel stops unpacking an initramfs at
/// the first error, a tree larger than its rootfs, and still starts
/// `/init`: without this file the tree is not whole.
pub const INITRD_MARKER: &str = "/.osb/initrd-complete";

/// How long to wait for the root's block device node to appear.
pub const DEVICE_WAIT: Duration = Duration::from_secs(5);
const DEVICE_POLL: Duration = Duration::from_millis(10);

/// A boot step that failed; printed as `osb-init: <step>: <error>`.
#[derive(Debug)]
pub enum BootError {
    /// An essential pseudo filesystem or a root layer did not mount.
    Mount {
        what: String,
        source: io::Error,
    },
    Mkdir {
        path: String,
        source: io::Error,
    },
    ReadCmdline {
        source: io::Error,
    },
    BadOption(crate::cmdline::OptionError),
    /// The root's device node never appeared.
    WaitDevice {
        path: String,
        waited: Duration,
    },
    /// No filesystem type mounted the root device.
    MountRoot {
        device: String,
        tried: Vec<(String, io::Error)>,
    },
    Chdir {
        path: String,
        source: io::Error,
    },
    Chroot {
        source: io::Error,
    },
    /// The root is the kernel's initramfs and [`INITRD_MARKER`] is missing.
    InitramfsIncomplete {
        /// The kernel's own words ("Initramfs unpacking failed: ...").
        kernel: Option<String>,
        /// The rootfs's size (`size=` in /proc/mounts; none on a ramfs).
        rootfs_kib: Option<u64>,
    },
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Mount { what, source } => write!(f, "{what}: {source}"),
            BootError::Mkdir { path, source } => write!(f, "create mount point {path}: {source}"),
            BootError::ReadCmdline { source } => write!(f, "read /proc/cmdline: {source}"),
            BootError::BadOption(e) => write!(f, "{e}"),
            BootError::WaitDevice { path, waited } => {
                write!(f, "wait for root device {path}: not there after {waited:?}; check the VM's disks and osb.root")
            }
            BootError::MountRoot { device, tried } => {
                write!(f, "mount root {device}:")?;
                if tried.is_empty() {
                    write!(f, " no block filesystem type to try; set osb.rootfstype")?;
                }
                for (i, (fstype, err)) in tried.iter().enumerate() {
                    write!(f, "{} {fstype}: {err}", if i == 0 { "" } else { "," })?;
                }
                // A dm-verity device reads fine until a block fails its
                // hash; then every read of it is EIO.
                if device.starts_with("/dev/dm-") && tried.iter().any(|(_, e)| sys::is_errno(e, libc::EIO)) {
                    write!(f, "; the device-mapper root failed to read: if it is dm-verity, the data does not match the root hash or hash tree on the kernel command line (see the kernel's \"verity\" messages)")?;
                }
                Ok(())
            }
            BootError::Chdir { path, source } => write!(f, "chdir {path}: {source}"),
            BootError::Chroot { source } => write!(f, "chroot into the new root: {source}"),
            BootError::InitramfsIncomplete { kernel, rootfs_kib } => {
                let holds = rootfs_kib.map(|kib| format!(" (the kernel's rootfs holds {} MiB)", kib >> 10)).unwrap_or_default();
                write!(f, "initramfs incomplete: {INITRD_MARKER}, the last entry of an initrd from `osbuilder initrd --init`, is missing")?;
                match kernel {
                    Some(said) => write!(f, ": the kernel stopped unpacking (\"{said}\"): the unpacked tree is larger than the kernel's rootfs, a tmpfs of half the guest's RAM{holds}; give the guest more memory or boot a disk image instead")?,
                    None => write!(f, ", and the kernel's log names no unpacking failure: either the tree did not fit the kernel's rootfs, a tmpfs of half the guest's RAM{holds} (give the guest more memory), or the initrd was made another way (end it with an empty {INITRD_MARKER})")?,
                }
                write!(f, "; nothing was run")
            }
        }
    }
}

impl std::error::Error for BootError {}

/// A pseudo filesystem mounted at boot.
struct Pseudo {
    source: &'static str,
    target: &'static str,
    fstype: &'static str,
    flags: u64,
    data: &'static str,
    /// Boot stops without it.
    essential: bool,
}

/// In order; /dev comes right after /proc so the console is taken early.
const PSEUDO: [Pseudo; 7] = [
    Pseudo { source: "proc", target: "/proc", fstype: "proc", flags: NOSUID | NODEV | NOEXEC, data: "", essential: true },
    Pseudo { source: "devtmpfs", target: "/dev", fstype: "devtmpfs", flags: NOSUID, data: "mode=0755", essential: true },
    Pseudo { source: "sysfs", target: "/sys", fstype: "sysfs", flags: NOSUID | NODEV | NOEXEC, data: "", essential: true },
    Pseudo { source: "devpts", target: "/dev/pts", fstype: "devpts", flags: NOSUID | NOEXEC, data: "gid=5,mode=0620,ptmxmode=0666", essential: false },
    Pseudo { source: "shm", target: "/dev/shm", fstype: "tmpfs", flags: NOSUID | NODEV, data: "mode=1777", essential: false },
    Pseudo { source: "tmpfs", target: "/run", fstype: "tmpfs", flags: NOSUID | NODEV, data: "mode=0755", essential: false },
    Pseudo { source: "cgroup2", target: "/sys/fs/cgroup", fstype: "cgroup2", flags: NOSUID | NODEV | NOEXEC | RELATIME, data: "", essential: false },
];

/// Symlinks in /dev, `(link, target)`; an existing entry is kept (devtmpfs
/// already has a /dev/ptmx node, which works as well as the link).
const DEV_LINKS: [(&str, &str); 5] = [
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

/// `mkdir -p` for an absolute path; existing directories are fine.
pub fn mkdir_p(sys: &mut dyn Sys, path: &str) -> Result<(), BootError> {
    let mut prefix = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        if sys.exists(&prefix) {
            continue;
        }
        match sys.mkdir(&prefix, 0o755) {
            Err(e) if !sys::is_errno(&e, sys::EEXIST) => return Err(BootError::Mkdir { path: prefix, source: e }),
            _ => {}
        }
    }
    Ok(())
}

/// The mount points listed in /proc/mounts (octal escapes such as `\040`
/// decoded).
pub fn mount_points(proc_mounts: &str) -> Vec<String> {
    proc_mounts.lines().filter_map(|line| line.split(' ').nth(1)).map(osb_agent::volume::unescape_field).collect()
}

/// When `/` is the kernel's initramfs (the last mount on `/` in
/// /proc/mounts is `rootfs`): `Some` with the rootfs's `size=` in KiB when
/// it has one (a tmpfs; a ramfs has none).
pub fn initramfs_root(proc_mounts: &str) -> Option<Option<u64>> {
    let root = proc_mounts.lines().rev().map(|line| line.split(' ').collect::<Vec<_>>()).find(|fields| fields.len() >= 4 && fields[1] == "/")?;
    if root[2] != "rootfs" {
        return None;
    }
    let size = root[3].split(',').find_map(|opt| opt.strip_prefix("size=")).and_then(|v| v.strip_suffix('k')).and_then(|v| v.parse().ok());
    Some(size)
}

/// The kernel's line about a failed initramfs unpack, if its log has one.
pub fn unpack_failure(kernel_log: &str) -> Option<String> {
    const SAID: &str = "Initramfs unpacking failed";
    kernel_log.lines().find_map(|line| line.find(SAID).map(|at| line[at..].trim_end().to_owned()))
}

/// Stops the boot on an initramfs root without [`INITRD_MARKER`]: the
/// kernel unpacked only part of the initrd (and said so in its log).
fn check_initramfs(sys: &mut dyn Sys, proc_mounts: &str) -> Result<(), BootError> {
    let Some(rootfs_kib) = initramfs_root(proc_mounts) else {
        return Ok(());
    };
    if sys.exists(INITRD_MARKER) {
        return Ok(());
    }
    let kernel = sys.kernel_log().ok().and_then(|log| unpack_failure(&log));
    Err(BootError::InitramfsIncomplete { kernel, rootfs_kib })
}

/// Mounts the pseudo filesystems, takes /dev/console as fds 0-2, makes the
/// /dev links and reads the command line; then seeds the RNG and brings up
/// loopback. Mounts already in place (the kernel's own devtmpfs on /dev) are
/// kept.
pub fn early_boot(sys: &mut dyn Sys) -> Result<Options, BootError> {
    let mut proc_mounts = String::new();
    let mut mounted: Vec<String> = Vec::new();
    for pseudo in &PSEUDO {
        if mounted.iter().any(|m| m == pseudo.target) {
            debug!("{} already mounted", pseudo.target);
        } else if let Err(e) = mount_pseudo(sys, pseudo) {
            if pseudo.essential {
                return Err(e);
            }
            say!("warning: {e}");
        }
        if pseudo.target == "/proc" {
            proc_mounts = sys.read_file("/proc/mounts").unwrap_or_default();
            mounted = mount_points(&proc_mounts);
        }
        if pseudo.target == "/dev" {
            if let Err(e) = sys.open_console("/dev/console") {
                // Nothing can be printed without it; carry on regardless.
                say!("warning: open /dev/console: {e}");
            }
        }
    }
    for (link, target) in DEV_LINKS {
        match sys.symlink(target, link) {
            Err(e) if !sys::is_errno(&e, sys::EEXIST) => {
                say!("warning: symlink {link} -> {target}: {e}")
            }
            _ => {}
        }
    }
    // Before anything else runs, as soon as the console can say why.
    check_initramfs(sys, &proc_mounts)?;

    let cmdline = sys.read_file("/proc/cmdline").map_err(|source| BootError::ReadCmdline { source })?;
    let (opts, errors) = Options::parse(&cmdline).map_err(BootError::BadOption)?;
    for e in errors {
        say!("warning: {e}");
    }
    crate::log::set_debug(opts.debug);

    if let Some(seed) = &opts.entropy {
        if let Err(e) = sys.add_entropy(seed) {
            say!("warning: seed the RNG from osb.entropy: {e}");
        }
    }
    if let Err(e) = sys.loopback_up() {
        say!("warning: bring up lo: {e}");
    }
    Ok(opts)
}

/// Mounts one pseudo filesystem, creating its mount point; EBUSY (already
/// mounted there) counts as success.
fn mount_pseudo(sys: &mut dyn Sys, p: &Pseudo) -> Result<(), BootError> {
    mkdir_p(sys, p.target)?;
    let mount = Mount { source: p.source, target: p.target, fstype: p.fstype, flags: p.flags, data: p.data };
    match sys.mount(&mount) {
        Err(e) if sys::is_errno(&e, sys::EBUSY) => {
            debug!("{mount}: already mounted");
            Ok(())
        }
        Err(source) => Err(BootError::Mount { what: mount.to_string(), source }),
        Ok(()) => Ok(()),
    }
}

fn mount_step(sys: &mut dyn Sys, mount: &Mount) -> Result<(), BootError> {
    sys.mount(mount).map_err(|source| BootError::Mount { what: mount.to_string(), source })
}

/// Waits (bounded) for a device node to appear: block drivers may still be
/// probing when init starts.
pub fn wait_for_path(sys: &mut dyn Sys, path: &str, limit: Duration) -> Result<(), BootError> {
    let mut waited = Duration::ZERO;
    while !sys.exists(path) {
        if waited >= limit {
            return Err(BootError::WaitDevice { path: path.to_owned(), waited });
        }
        sys.sleep(DEVICE_POLL);
        waited += DEVICE_POLL;
    }
    if !waited.is_zero() {
        debug!("{path} appeared after {waited:?}");
    }
    Ok(())
}

/// Tried first when the kernel offers them (ext4 before ext3/ext2, which
/// the ext4 driver also registers and which would each log a refusal).
const PREFERRED_FSTYPES: [&str; 5] = ["ext4", "erofs", "xfs", "btrfs", "squashfs"];

/// The block filesystem types to try, from /proc/filesystems (`nodev`
/// entries and fuseblk left out): the common root types first, then the
/// rest in the kernel's order.
pub fn block_fstypes(proc_filesystems: &str) -> Vec<String> {
    let offered: Vec<&str> =
        proc_filesystems.lines().filter(|line| !line.starts_with("nodev")).map(str::trim).filter(|fs| !fs.is_empty() && *fs != "fuseblk").collect();
    let preferred = PREFERRED_FSTYPES.iter().copied().filter(|fs| offered.contains(fs));
    let rest = offered.iter().copied().filter(|fs| !PREFERRED_FSTYPES.contains(fs));
    preferred.chain(rest).map(str::to_owned).collect()
}

/// Joins mount option strings, skipping empty ones.
fn join_options(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(",")
}

/// Mounts a block device at `target`, with the given type or each type the
/// kernel offers in turn; a rw mount refused with EROFS/EACCES is retried
/// read-only (as mount(8) does).
fn mount_block(sys: &mut dyn Sys, device: &str, target: &str, opts: &Options, flags: u64) -> Result<(), BootError> {
    wait_for_path(sys, device, DEVICE_WAIT)?;
    let fstypes = match &opts.rootfstype {
        Some(t) => t.split(',').map(str::to_owned).collect(),
        None => block_fstypes(&sys.read_file("/proc/filesystems").unwrap_or_default()),
    };
    let data = join_options(&[if opts.dax { "dax" } else { "" }, opts.rootflags.as_deref().unwrap_or("")]);
    let mut tried = Vec::new();
    for fstype in fstypes {
        let mount = Mount { source: device, target, fstype: &fstype, flags, data: &data };
        match sys.mount(&mount) {
            Ok(()) => return Ok(()),
            Err(e) if flags & RDONLY == 0 && (sys::is_errno(&e, libc::EROFS) || sys::is_errno(&e, libc::EACCES)) => {
                let ro = Mount { flags: flags | RDONLY, ..mount };
                match sys.mount(&ro) {
                    Ok(()) => {
                        say!("warning: {device} is read-only; mounted it read-only");
                        return Ok(());
                    }
                    Err(e) => tried.push((fstype, e)),
                }
            }
            Err(e) => tried.push((fstype, e)),
        }
    }
    Err(BootError::MountRoot { device: device.to_owned(), tried })
}

/// Mounts the root named by `osb.root` at `target`.
fn mount_root_source(sys: &mut dyn Sys, opts: &Options, target: &str, flags: u64) -> Result<(), BootError> {
    let rootflags = opts.rootflags.as_deref().unwrap_or("");
    match &opts.root {
        RootSource::Initramfs => Ok(()),
        RootSource::Block(device) => mount_block(sys, device, target, opts, flags),
        RootSource::VirtioFs(tag) => mount_step(sys, &Mount { source: tag, target, fstype: "virtiofs", flags, data: rootflags }),
        RootSource::NineP(tag) => {
            let data = join_options(&["trans=virtio,version=9p2000.L", rootflags]);
            mount_step(sys, &Mount { source: tag, target, fstype: "9p", flags, data: &data })
        }
    }
}

/// Switches to the root named by `osb.root`; does nothing for the
/// initramfs. On return the process's root and cwd are the new `/`, with
/// /dev, /proc, /sys (and /run when the root has a place for it) carried over.
pub fn switch_root(sys: &mut dyn Sys, opts: &Options) -> Result<(), BootError> {
    if opts.root == RootSource::Initramfs {
        if opts.overlay {
            say!("warning: osb.overlay=1 ignored: the initramfs root is already writable");
        }
        return Ok(());
    }
    if opts.overlay {
        mkdir_p(sys, OVERLAY_LOWER)?;
        mount_root_source(sys, opts, OVERLAY_LOWER, RDONLY)?;
        mkdir_p(sys, OVERLAY_RW)?;
        mount_step(sys, &Mount { source: "tmpfs", target: OVERLAY_RW, fstype: "tmpfs", flags: 0, data: "mode=0755" })?;
        let upper = format!("{OVERLAY_RW}/upper");
        let work = format!("{OVERLAY_RW}/work");
        mkdir_p(sys, &upper)?;
        mkdir_p(sys, &work)?;
        mkdir_p(sys, NEW_ROOT)?;
        let data = format!("lowerdir={OVERLAY_LOWER},upperdir={upper},workdir={work}");
        mount_step(sys, &Mount { source: "overlay", target: NEW_ROOT, fstype: "overlay", flags: 0, data: &data })?;
    } else {
        mkdir_p(sys, NEW_ROOT)?;
        mount_root_source(sys, opts, NEW_ROOT, if opts.ro { RDONLY } else { 0 })?;
    }

    for dir in ["/dev", "/proc", "/sys", "/run"] {
        let to = format!("{NEW_ROOT}{dir}");
        let moved = mkdir_p(sys, &to).and_then(|()| mount_step(sys, &Mount { source: dir, target: &to, fstype: "", flags: MOVE, data: "" }));
        match moved {
            Ok(()) => {}
            // A read-only root without /run: the workload goes without.
            Err(e) if dir == "/run" => {
                say!("warning: {e}; /run stays behind");
                let _ = sys.umount(dir, true);
            }
            Err(e) => return Err(e),
        }
    }
    sys.chdir(NEW_ROOT).map_err(|source| BootError::Chdir { path: NEW_ROOT.into(), source })?;
    mount_step(sys, &Mount { source: ".", target: "/", fstype: "", flags: MOVE, data: "" })?;
    sys.chroot(".").map_err(|source| BootError::Chroot { source })?;
    sys.chdir("/").map_err(|source| BootError::Chdir { path: "/".into(), source })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::record::Recorder;

    const CMDLINE: &str = "console=ttyS0 quiet";

    /// The calls of an early boot where nothing was mounted before init.
    const EARLY: &[&str] = &[
        "mkdir /proc",
        "mount proc /proc proc nosuid,nodev,noexec",
        "mkdir /dev",
        "mount devtmpfs /dev devtmpfs nosuid mode=0755",
        "console /dev/console",
        "mkdir /sys",
        "mount sysfs /sys sysfs nosuid,nodev,noexec",
        "mkdir /dev/pts",
        "mount devpts /dev/pts devpts nosuid,noexec gid=5,mode=0620,ptmxmode=0666",
        "mkdir /dev/shm",
        "mount shm /dev/shm tmpfs nosuid,nodev mode=1777",
        "mkdir /run",
        "mount tmpfs /run tmpfs nosuid,nodev mode=0755",
        "mkdir /sys/fs",
        "mkdir /sys/fs/cgroup",
        "mount cgroup2 /sys/fs/cgroup cgroup2 nosuid,nodev,noexec,relatime",
        "symlink /dev/ptmx -> pts/ptmx",
        "symlink /dev/fd -> /proc/self/fd",
        "symlink /dev/stdin -> /proc/self/fd/0",
        "symlink /dev/stdout -> /proc/self/fd/1",
        "symlink /dev/stderr -> /proc/self/fd/2",
        "lo up",
    ];

    fn booted(cmdline: &str) -> Recorder {
        let mut sys = Recorder::new();
        sys.files.insert("/proc/cmdline".into(), cmdline.into());
        sys.files.insert("/proc/filesystems".into(), "nodev\tsysfs\nnodev\ttmpfs\n\text3\n\text4\n\terofs\nnodev\tvirtiofs\n\tfuseblk\n".into());
        sys
    }

    #[test]
    fn early_boot_order() {
        let mut sys = booted(CMDLINE);
        let opts = early_boot(&mut sys).unwrap();
        assert_eq!(opts, Options::default());
        sys.assert_ops(EARLY);
    }

    #[test]
    fn early_boot_keeps_the_kernels_devtmpfs_and_existing_dirs() {
        let mut sys = booted("osb.entropy=0102");
        for dir in ["/proc", "/dev", "/sys", "/run", "/dev/fd", INITRD_MARKER] {
            sys.existing.insert(dir.into());
        }
        // The kernel mounted devtmpfs on /dev before starting init.
        sys.files.insert("/proc/mounts".into(), "rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\ndevtmpfs /dev devtmpfs rw 0 0\n".into());
        // devtmpfs has its own /dev/ptmx node: kept (the failed calls are
        // recorded, and boot goes on).
        sys.fail("symlink /dev/ptmx", sys::EEXIST);
        sys.fail("symlink /dev/fd", sys::EEXIST);
        early_boot(&mut sys).unwrap();
        let expected: Vec<&str> = EARLY
            .iter()
            .copied()
            .filter(|op| !["mkdir /proc", "mkdir /dev", "mkdir /sys", "mkdir /run"].contains(op) && !op.starts_with("mount devtmpfs"))
            .flat_map(|op| if op == "lo up" { vec!["entropy 2 bytes", op] } else { vec![op] })
            .collect();
        sys.assert_ops(&expected);
    }

    #[test]
    fn early_boot_tolerates_ebusy_and_optional_failures() {
        let mut sys = booted(CMDLINE);
        sys.fail("mount devtmpfs", sys::EBUSY);
        sys.fail("mount cgroup2", sys::ENOENT);
        sys.fail("lo up", sys::ENOENT);
        sys.fail("console", sys::ENOENT);
        early_boot(&mut sys).unwrap();
        assert!(sys.ops.contains(&"symlink /dev/stderr -> /proc/self/fd/2".to_owned()), "boot went on: {:?}", sys.ops);
    }

    #[test]
    fn essential_mount_failures_stop_boot_naming_the_step() {
        for (failing, message) in [
            ("mount proc", "mount proc on /proc (proc): "),
            ("mount devtmpfs", "mount devtmpfs on /dev (devtmpfs, mode=0755): "),
            ("mount sysfs", "mount sysfs on /sys (sysfs): "),
            ("mkdir /proc", "create mount point /proc: "),
        ] {
            let mut sys = booted(CMDLINE);
            sys.fail(failing, libc::EPERM);
            let err = early_boot(&mut sys).unwrap_err().to_string();
            assert!(err.starts_with(message), "{failing}: {err}");
            assert_eq!(sys.ops.last().unwrap().split(' ').take(2).collect::<Vec<_>>().join(" "), failing, "boot stops at the failure");
        }
        let mut sys = booted("osb.root=vda1");
        let err = early_boot(&mut sys).unwrap_err().to_string();
        assert!(err.starts_with("kernel command line option osb.root: "), "{err}");
    }

    /// /proc/mounts when the kernel unpacked the initramfs into its rootfs
    /// (a tmpfs of 98928 KiB) and init mounted /proc.
    const INITRAMFS_MOUNTS: &str = "rootfs / rootfs rw,size=98928k,nr_inodes=24732 0 0\nproc /proc proc rw,nosuid,nodev,noexec,relatime 0 0\n";

    /// The early-boot calls up to the /dev links: where the marker check
    /// stops a truncated initramfs, before the command line and anything else.
    fn early_until_the_links() -> Vec<&'static str> {
        EARLY.iter().copied().filter(|op| *op != "lo up").collect()
    }

    #[test]
    fn initramfs_with_the_marker_boots_on() {
        let mut sys = booted(CMDLINE);
        sys.files.insert("/proc/mounts".into(), INITRAMFS_MOUNTS.into());
        sys.existing.insert("/.osb/initrd-complete".into());
        early_boot(&mut sys).unwrap();
        sys.assert_ops(EARLY);
    }

    #[test]
    fn initramfs_without_the_marker_stops_early_boot() {
        let mut sys = booted(CMDLINE);
        sys.files.insert("/proc/mounts".into(), INITRAMFS_MOUNTS.into());
        let err = early_boot(&mut sys).unwrap_err().to_string();
        assert!(err.starts_with("initramfs incomplete: /.osb/initrd-complete, "), "{err}");
        assert!(err.contains("the kernel's rootfs holds 96 MiB"), "{err}");
        assert!(err.contains("give the guest more memory"), "{err}");
        sys.assert_ops(&early_until_the_links());
    }

    #[test]
    fn a_truncated_initramfs_quotes_the_kernel() {
        let mut sys = booted(CMDLINE);
        sys.files.insert("/proc/mounts".into(), INITRAMFS_MOUNTS.into());
        sys.kmsg = Some("<6>Unpacking initramfs...\n<0>Initramfs unpacking failed: write error\n<6>Freeing initrd memory: 40128K\n".into());
        let err = early_boot(&mut sys).unwrap_err().to_string();
        assert_eq!(
            err,
            "initramfs incomplete: /.osb/initrd-complete, the last entry of an initrd from `osbuilder initrd --init`, is missing: \
             the kernel stopped unpacking (\"Initramfs unpacking failed: write error\"): the unpacked tree is larger than the kernel's rootfs, \
             a tmpfs of half the guest's RAM (the kernel's rootfs holds 96 MiB); give the guest more memory or boot a disk image instead; nothing was run"
        );
    }

    #[test]
    fn a_root_the_kernel_mounted_needs_no_marker() {
        for mounts in [
            // root= on the command line: the kernel mounted the disk.
            "/dev/root / ext4 ro,relatime 0 0\nproc /proc proc rw 0 0\n",
            // The rootfs under a root moved onto / (as switch_root leaves it).
            "rootfs / rootfs rw 0 0\n/dev/vda1 / ext4 rw 0 0\n",
        ] {
            let mut sys = booted(CMDLINE);
            sys.files.insert("/proc/mounts".into(), mounts.into());
            early_boot(&mut sys).unwrap();
            sys.assert_ops(EARLY);
        }
    }

    /// The switch-root calls after the root is mounted at NEW_ROOT.
    const MOVE_AND_CHROOT: &[&str] = &[
        "mkdir /.osb/root/dev",
        "move /dev /.osb/root/dev",
        "mkdir /.osb/root/proc",
        "move /proc /.osb/root/proc",
        "mkdir /.osb/root/sys",
        "move /sys /.osb/root/sys",
        "mkdir /.osb/root/run",
        "move /run /.osb/root/run",
        "chdir /.osb/root",
        "move . /",
        "chroot .",
        "chdir /",
    ];

    fn switch(cmdline: &str, setup: impl FnOnce(&mut Recorder)) -> (Recorder, Result<(), BootError>) {
        let mut sys = booted(cmdline);
        sys.existing.insert("/dev/vda1".into());
        sys.existing.insert("/dev/pmem0p1".into());
        setup(&mut sys);
        let (opts, _) = Options::parse(cmdline).unwrap();
        let result = switch_root(&mut sys, &opts);
        (sys, result)
    }

    fn with_move(first: &[&str]) -> Vec<String> {
        first.iter().chain(MOVE_AND_CHROOT).map(|s| s.to_string()).collect()
    }

    #[test]
    fn initramfs_root_does_nothing() {
        let (sys, result) = switch("osb.root=none osb.overlay=1", |_| {});
        result.unwrap();
        sys.assert_ops::<&str>(&[]);
    }

    #[test]
    fn block_root_tries_the_kernels_types_in_order() {
        let (sys, result) = switch("osb.root=/dev/vda1", |sys| {
            sys.fail("mount /dev/vda1 /.osb/root ext4", sys::EINVAL);
            sys.fail("mount /dev/vda1 /.osb/root erofs", sys::EINVAL);
        });
        result.unwrap();
        let expected = with_move(&[
            "mkdir /.osb",
            "mkdir /.osb/root",
            "mount /dev/vda1 /.osb/root ext4 -",
            "mount /dev/vda1 /.osb/root erofs -",
            "mount /dev/vda1 /.osb/root ext3 -",
        ]);
        sys.assert_ops(&expected);
    }

    #[test]
    fn pmem_root_with_dax_and_a_given_type() {
        let (sys, result) = switch("osb.root=/dev/pmem0p1 osb.dax=1 osb.rootfstype=ext4 osb.rootflags=noatime osb.ro=1", |_| {});
        result.unwrap();
        sys.assert_ops(&with_move(&["mkdir /.osb", "mkdir /.osb/root", "mount /dev/pmem0p1 /.osb/root ext4 ro dax,noatime"]));
    }

    #[test]
    fn read_only_device_is_remounted_read_only() {
        let (sys, result) = switch("osb.root=/dev/vda1 osb.rootfstype=erofs", |sys| sys.fail("mount /dev/vda1 /.osb/root erofs -", sys::EROFS));
        result.unwrap();
        sys.assert_ops(&with_move(&["mkdir /.osb", "mkdir /.osb/root", "mount /dev/vda1 /.osb/root erofs -", "mount /dev/vda1 /.osb/root erofs ro"]));
    }

    #[test]
    fn virtiofs_and_9p_roots() {
        let (sys, result) = switch("osb.root=virtiofs:rootfs", |_| {});
        result.unwrap();
        sys.assert_ops(&with_move(&["mkdir /.osb", "mkdir /.osb/root", "mount rootfs /.osb/root virtiofs -"]));

        let (sys, result) = switch("osb.root=9p:share osb.rootflags=msize=262144", |_| {});
        result.unwrap();
        sys.assert_ops(&with_move(&["mkdir /.osb", "mkdir /.osb/root", "mount share /.osb/root 9p - trans=virtio,version=9p2000.L,msize=262144"]));
    }

    #[test]
    fn overlay_over_a_read_only_root() {
        let (sys, result) = switch("osb.root=/dev/vda1 osb.rootfstype=ext4 osb.overlay=1", |_| {});
        result.unwrap();
        sys.assert_ops(&with_move(&[
            "mkdir /.osb",
            "mkdir /.osb/lower",
            "mount /dev/vda1 /.osb/lower ext4 ro",
            "mkdir /.osb/rw",
            "mount tmpfs /.osb/rw tmpfs - mode=0755",
            "mkdir /.osb/rw/upper",
            "mkdir /.osb/rw/work",
            "mkdir /.osb/root",
            "mount overlay /.osb/root overlay - lowerdir=/.osb/lower,upperdir=/.osb/rw/upper,workdir=/.osb/rw/work",
        ]));
    }

    #[test]
    fn root_mount_failure_names_every_type_tried() {
        let (sys, result) = switch("osb.root=/dev/vda1", |sys| sys.fail("mount /dev/vda1", sys::EINVAL));
        let err = result.unwrap_err().to_string();
        assert_eq!(
            err,
            "mount root /dev/vda1: ext4: Invalid argument (os error 22), erofs: Invalid argument (os error 22), ext3: Invalid argument (os error 22)"
        );
        assert!(!sys.ops.iter().any(|op| op.starts_with("move") || op.starts_with("chroot")), "{:?}", sys.ops);
    }

    #[test]
    fn verity_root_read_errors_say_so() {
        let (_, result) = switch("osb.root=/dev/dm-0 osb.rootfstype=ext4 osb.ro=1", |sys| {
            sys.existing.insert("/dev/dm-0".into());
            sys.fail("mount /dev/dm-0", libc::EIO)
        });
        let err = result.unwrap_err().to_string();
        assert!(
            err.starts_with("mount root /dev/dm-0: ext4: Input/output error (os error 5); the device-mapper root failed to read: if it is dm-verity"),
            "{err}"
        );
        // Other devices and other errors get no such hint.
        let (_, result) = switch("osb.root=/dev/vda1 osb.rootfstype=ext4", |sys| sys.fail("mount /dev/vda1", libc::EIO));
        assert!(!result.unwrap_err().to_string().contains("dm-verity"));
    }

    #[test]
    fn missing_device_waits_a_bounded_time() {
        let (sys, result) = switch("osb.root=/dev/vdb", |_| {});
        let err = result.unwrap_err().to_string();
        assert_eq!(err, "wait for root device /dev/vdb: not there after 5s; check the VM's disks and osb.root");
        assert_eq!(sys.slept, DEVICE_WAIT);

        // A device that shows up late is waited for.
        let (sys, result) = switch("osb.root=/dev/vdb osb.rootfstype=ext4", |sys| {
            sys.appear_after.insert("/dev/vdb".into(), 30);
        });
        result.unwrap();
        assert_eq!(sys.slept, DEVICE_POLL * 30);
    }

    #[test]
    fn failed_moves_stop_the_switch() {
        let (sys, result) = switch("osb.root=virtiofs:r", |sys| sys.fail("move /sys", libc::EINVAL));
        assert_eq!(result.unwrap_err().to_string(), "move /sys to /.osb/root/sys: Invalid argument (os error 22)");
        assert_eq!(sys.ops.last().unwrap(), "move /sys /.osb/root/sys");

        let (_, result) = switch("osb.root=virtiofs:r", |sys| sys.fail("chroot", libc::EPERM));
        assert_eq!(result.unwrap_err().to_string(), "chroot into the new root: Operation not permitted (os error 1)");

        // A read-only root without /run: /run is left behind, not fatal.
        let (sys, result) = switch("osb.root=virtiofs:r osb.ro=1", |sys| sys.fail("mkdir /.osb/root/run", sys::EROFS));
        result.unwrap();
        assert!(
            sys.ops.contains(&"umount -l /run".to_owned())
                && sys.ops.ends_with(&["chdir /.osb/root".into(), "move . /".into(), "chroot .".into(), "chdir /".into()])
        );
    }

    #[test]
    fn finds_the_initramfs_root_and_the_kernels_words() {
        assert_eq!(initramfs_root(INITRAMFS_MOUNTS), Some(Some(98_928)));
        assert_eq!(initramfs_root("rootfs / rootfs rw 0 0\n"), Some(None), "a ramfs has no size");
        assert_eq!(initramfs_root("/dev/root / ext4 ro 0 0\n"), None);
        assert_eq!(initramfs_root(""), None, "unknown: no check");
        assert_eq!(
            unpack_failure("<6>[    0.5] Unpacking initramfs...\n<0>[    0.9] Initramfs unpacking failed: write error\n"),
            Some("Initramfs unpacking failed: write error".to_owned())
        );
        assert_eq!(unpack_failure("<6>Unpacking initramfs...\n"), None);
    }

    #[test]
    fn parses_proc_files() {
        assert_eq!(mount_points("a / rootfs rw 0 0\nb /mnt/with\\040space x rw 0 0\n"), ["/", "/mnt/with space"]);
        assert_eq!(block_fstypes("nodev\tsysfs\n\text3\n\text2\n\text4\n\tfuseblk\n\tvfat\n\terofs\n"), ["ext4", "erofs", "ext3", "ext2", "vfat"]);
    }
}
