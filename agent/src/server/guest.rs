//! Guest-wide RPCs: GetGuestDetails, OnlineCPUMem, SetGuestDateTime.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ttrpc::Code;

use super::call::{io_status, status};
use super::sys;

/// The sysfs paths the guest RPCs use (a temporary tree in tests).
#[derive(Clone, Debug)]
pub struct Sysfs {
    pub root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Sysfs {
        Sysfs { root: PathBuf::from("/sys") }
    }
}

/// Kata retries onlining this many times, this far apart.
const ONLINE_RETRIES: u32 = 50;
const ONLINE_RETRY_DELAY: Duration = Duration::from_millis(10);

impl Sysfs {
    fn memory(&self) -> PathBuf {
        self.root.join("devices/system/memory")
    }
    fn cpu(&self) -> PathBuf {
        self.root.join("devices/system/cpu")
    }

    /// /sys/devices/system/memory/block_size_bytes (hex); 0 when the kernel has no
    /// memory hotplug.
    pub fn mem_block_size(&self) -> ttrpc::Result<u64> {
        match std::fs::read_to_string(self.memory().join("block_size_bytes")) {
            Ok(text) => u64::from_str_radix(text.trim().trim_start_matches("0x"), 16)
                .map_err(|_| status(Code::INTERNAL, format!("bad memory block size {:?}", text.trim()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io_status("read block_size_bytes", &e)),
        }
    }

    pub fn mem_hotplug_probe(&self) -> bool {
        self.memory().join("probe").exists()
    }

    /// Per-device `online` files matching `prefix` + digits, sorted by number.
    fn online_files(dir: &Path, prefix: &str) -> Vec<(u32, PathBuf)> {
        let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let n: u32 = name.strip_prefix(prefix)?.parse().ok()?;
                Some((n, entry.path().join("online")))
            })
            .collect();
        out.sort();
        out
    }

    fn is_online(file: &Path) -> bool {
        // CPUs without an `online` file (cpu0 usually) cannot go offline.
        std::fs::read_to_string(file).map_or(true, |s| s.trim() != "0")
    }

    pub fn online_cpu_count(&self) -> u32 {
        Self::online_files(&self.cpu(), "cpu").iter().filter(|(_, f)| Self::is_online(f)).count() as u32
    }

    /// Onlines offline CPUs until `target` are online (as Kata's agent: retrying,
    /// since a hot-added CPU may take a moment to appear).
    pub fn online_cpus(&self, target: u32) -> ttrpc::Result<()> {
        for _ in 0..ONLINE_RETRIES {
            let mut online = self.online_cpu_count();
            if online >= target {
                return Ok(());
            }
            for (_, file) in Self::online_files(&self.cpu(), "cpu") {
                if online >= target {
                    break;
                }
                if file.exists() && !Self::is_online(&file) && std::fs::write(&file, "1").is_ok() {
                    online += 1;
                }
            }
            if self.online_cpu_count() >= target {
                return Ok(());
            }
            std::thread::sleep(ONLINE_RETRY_DELAY);
        }
        Err(status(Code::INTERNAL, format!("only {} of {target} CPUs could be onlined", self.online_cpu_count())))
    }

    /// Onlines every offline memory block.
    pub fn online_memory(&self) -> ttrpc::Result<()> {
        for (_, file) in Self::online_files(&self.memory(), "memory") {
            if file.exists() && !Self::is_online(&file) {
                std::fs::write(&file, "1").map_err(|e| io_status(&format!("online {}", file.display()), &e))?;
            }
        }
        Ok(())
    }
}

/// SetGuestDateTime: seconds and microseconds since the epoch.
pub fn set_date_time(sec: i64, usec: i64) -> ttrpc::Result<()> {
    if !(0..1_000_000).contains(&usec) {
        return Err(status(Code::INVALID_ARGUMENT, format!("Usec {usec} is not in 0..1000000")));
    }
    if sec < 0 {
        return Err(status(Code::INVALID_ARGUMENT, format!("Sec {sec} is before 1970")));
    }
    sys::set_realtime(sec, usec * 1000).map_err(|e| io_status("clock_settime", &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> Sysfs {
        let root = std::env::temp_dir().join(format!("osb-agent-sysfs-{}-{:?}", std::process::id(), std::thread::current().id()));
        let _ = std::fs::remove_dir_all(&root);
        let cpu = root.join("devices/system/cpu");
        let mem = root.join("devices/system/memory");
        std::fs::create_dir_all(cpu.join("cpu0")).unwrap();
        for (n, state) in [(1, "1"), (2, "0"), (3, "0")] {
            std::fs::create_dir_all(cpu.join(format!("cpu{n}"))).unwrap();
            std::fs::write(cpu.join(format!("cpu{n}/online")), state).unwrap();
        }
        std::fs::create_dir_all(cpu.join("cpufreq")).unwrap();
        for (n, state) in [(0, "1"), (1, "0")] {
            std::fs::create_dir_all(mem.join(format!("memory{n}"))).unwrap();
            std::fs::write(mem.join(format!("memory{n}/online")), state).unwrap();
        }
        std::fs::write(mem.join("block_size_bytes"), "8000000\n").unwrap();
        Sysfs { root }
    }

    #[test]
    fn details_and_onlining() {
        let sys = tree();
        assert_eq!(sys.mem_block_size().unwrap(), 0x8000000);
        assert!(!sys.mem_hotplug_probe());
        assert_eq!(sys.online_cpu_count(), 2);
        sys.online_cpus(3).unwrap();
        assert_eq!(sys.online_cpu_count(), 3);
        let cpu3 = sys.cpu().join("cpu3/online");
        assert_eq!(std::fs::read_to_string(&cpu3).unwrap(), "0");
        sys.online_cpus(2).unwrap(); // already there
        sys.online_memory().unwrap();
        assert_eq!(std::fs::read_to_string(sys.memory().join("memory1/online")).unwrap(), "1");
        std::fs::remove_dir_all(&sys.root).unwrap();
    }

    #[test]
    fn bad_times() {
        assert!(set_date_time(0, 1_000_000).is_err());
        assert!(set_date_time(0, -1).is_err());
        assert!(set_date_time(-5, 0).is_err());
    }
}
