//! The end of the machine: SIGTERM to everyone, a bounded wait, SIGKILL,
//! sync, unmount, reboot(2) — as a [`Sys`] sequence, unit-tested.

use std::io;
use std::time::Duration;

use crate::sys::{self, flags, Mount, Power, Reaped, Sys};

/// How often the wait for processes to end checks.
pub const TICK: Duration = Duration::from_millis(20);
/// How long to wait after SIGKILL (it cannot be refused; only a process
/// stuck in the kernel takes long).
pub const KILL_WAIT: Duration = Duration::from_secs(1);

/// Filesystem types with nothing to flush: left mounted.
const VOLATILE_FS: &[&str] = &[
    "rootfs",
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "ramfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "mqueue",
    "bpf",
    "pstore",
    "configfs",
    "hugetlbfs",
    "fusectl",
    "efivarfs",
    "binfmt_misc",
    "autofs",
    "nsfs",
];

/// `(mount point, fstype)` from /proc/mounts, in mount order.
pub fn parse_mounts(proc_mounts: &str) -> Vec<(String, String)> {
    let points = crate::boot::mount_points(proc_mounts);
    let types = proc_mounts.lines().filter_map(|line| line.split(' ').nth(2));
    points.into_iter().zip(types).map(|(p, t)| (p, t.to_owned())).collect()
}

/// Reaps until no child is left (true) or `limit` has passed (false).
fn reap_until_gone(sys: &mut dyn Sys, limit: Duration, on_reaped: &mut dyn FnMut(Reaped)) -> bool {
    let mut waited = Duration::ZERO;
    loop {
        match sys.reap() {
            Ok(Some(reaped)) => on_reaped(reaped),
            Ok(None) if waited < limit => {
                sys.sleep(TICK);
                waited += TICK;
            }
            Ok(None) => return false,
            Err(_) => return true, // ECHILD: nobody left
        }
    }
}

/// Unmounts, newest first, every filesystem that holds data (a failed
/// unmount is retried lazily), then remounts `/` read-only.
fn unmount_all(sys: &mut dyn Sys) {
    let mounts = sys.read_file("/proc/mounts").map(|m| parse_mounts(&m)).unwrap_or_default();
    for (target, fstype) in mounts.iter().rev() {
        if target == "/" || VOLATILE_FS.contains(&fstype.as_str()) {
            continue;
        }
        if let Err(e) = sys.umount(target, false) {
            debug!("umount {target}: {e}; detaching it");
            let _ = sys.umount(target, true);
        }
    }
    let remount = Mount { source: "", target: "/", fstype: "", flags: flags::REMOUNT | flags::RDONLY, data: "" };
    if let Err(e) = sys.mount(&remount) {
        debug!("remount / read-only: {e}");
    }
}

/// Ends every process and the machine. `on_reaped` sees each process reaped
/// on the way (the workload's end is still reported). Returns only if
/// reboot(2) fails, with its error.
///
/// Without ACPI (`acpi=off`, Firecracker) the kernel cannot power off and
/// would halt with the VM still running; a reboot ends such VMs (QEMU
/// `-no-reboot`, Firecracker), so a power-off becomes a reboot there.
pub fn shutdown(sys: &mut dyn Sys, how: Power, timeout: Duration, on_reaped: &mut dyn FnMut(Reaped)) -> io::Error {
    if let Err(e) = sys.kill_all(sys::SIGTERM) {
        debug!("kill -TERM -1: {e}");
    }
    if !reap_until_gone(sys, timeout, on_reaped) {
        say!("processes still running after {timeout:?}: killing them");
        let _ = sys.kill_all(sys::SIGKILL);
        if !reap_until_gone(sys, KILL_WAIT, on_reaped) {
            say!("processes still running after SIGKILL; going on");
        }
    }
    let how = if how == Power::Off && !sys.exists("/sys/firmware/acpi") {
        debug!("no ACPI: rebooting to end the VM");
        Power::Reboot
    } else {
        how
    };
    sys.sync();
    unmount_all(sys);
    sys.sync();
    match sys.reboot(how) {
        Err(e) => e,
        Ok(()) => io::Error::other("reboot(2) returned"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::record::Recorder;

    const MOUNTS: &str = "/dev/vda1 / ext4 rw 0 0\n\
        devtmpfs /dev devtmpfs rw 0 0\n\
        proc /proc proc rw 0 0\n\
        tmpfs /run tmpfs rw 0 0\n\
        /dev/vdb /data xfs rw 0 0\n\
        share /data/share 9p rw 0 0\n";

    fn machine() -> Recorder {
        let mut sys = Recorder::new();
        sys.files.insert("/proc/mounts".into(), MOUNTS.into());
        sys.existing.insert("/sys/firmware/acpi".into());
        sys
    }

    const TAIL: [&str; 5] = ["sync", "umount /data/share", "umount /data", "mount - / - ro,remount", "sync"];

    fn run(sys: &mut Recorder, how: Power) -> Vec<i32> {
        let mut reaped = Vec::new();
        let err = shutdown(sys, how, Duration::from_secs(3), &mut |r| reaped.push(r.pid));
        assert_eq!(err.to_string(), "reboot(2) returned");
        reaped
    }

    #[test]
    fn everyone_ends_in_time() {
        let mut sys = machine();
        sys.reaps = [Some(Reaped { pid: 7, status: 0 }), None, Some(Reaped { pid: 9, status: 15 })].into();
        assert_eq!(run(&mut sys, Power::Off), [7, 9]);
        let mut expected = vec!["kill -1 TERM"];
        expected.extend(TAIL);
        expected.push("reboot poweroff");
        sys.assert_ops(&expected);
        assert_eq!(sys.slept, TICK);
    }

    #[test]
    fn stragglers_get_sigkill_after_the_timeout() {
        let mut sys = machine();
        let ticks = (Duration::from_secs(3).as_millis() / TICK.as_millis()) as usize;
        sys.reaps = std::iter::repeat_n(None, ticks + 1).chain([Some(Reaped { pid: 5, status: 9 })]).collect();
        assert_eq!(run(&mut sys, Power::Reboot), [5]);
        let mut expected = vec!["kill -1 TERM", "kill -1 KILL"];
        expected.extend(TAIL);
        expected.push("reboot restart");
        sys.assert_ops(&expected);
        assert_eq!(sys.slept, Duration::from_secs(3));
    }

    #[test]
    fn busy_mounts_are_detached_and_no_acpi_means_reboot() {
        let mut sys = machine();
        sys.existing.clear();
        sys.fail("umount /data/share", libc::EBUSY);
        sys.fail("mount - / -", libc::EBUSY);
        run(&mut sys, Power::Off);
        sys.assert_ops(&[
            "kill -1 TERM",
            "sync",
            "umount /data/share",
            "umount -l /data/share",
            "umount /data",
            "mount - / - ro,remount",
            "sync",
            "reboot restart",
        ]);
    }

    #[test]
    fn a_failed_reboot_is_returned() {
        let mut sys = machine();
        sys.fail("reboot", libc::EPERM);
        let err = shutdown(&mut sys, Power::Off, Duration::ZERO, &mut |_| {});
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }
}
