//! The guest resource report: what a workload inside the VM can actually use.
//!
//! The agent's `GetMetrics` answers this report as Prometheus text (Kata's `Metrics`
//! message carries one string); the client parses it back into [`Resources`]. A JVM-style
//! workload sizes its heap and thread pools from exactly these numbers: online CPUs,
//! `MemTotal`/`MemAvailable`, and the cgroup v2 limits (`memory.max`, `cpu.max`) of the
//! agent's cgroup and its ancestors.

use std::fmt::Write as _;
use std::path::Path;

/// Where cgroup v2 is mounted in the guest (init mounts it there).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";

/// The resources visible inside the guest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    /// CPUs online (`/sys/devices/system/cpu/online`).
    pub cpus_online: u32,
    /// `MemTotal` from `/proc/meminfo`, in bytes.
    pub mem_total_bytes: u64,
    /// `MemAvailable` from `/proc/meminfo`, in bytes.
    pub mem_available_bytes: u64,
    /// The cgroup v2 path of the reporting process (`/` for the root cgroup);
    /// empty when cgroup v2 is not mounted.
    pub cgroup: String,
    /// The smallest `memory.max` on the path from that cgroup to the root;
    /// `None` when unlimited.
    pub cgroup_memory_max_bytes: Option<u64>,
    /// The tightest `cpu.max` on that path as (quota, period) in microseconds;
    /// `None` when unlimited.
    pub cgroup_cpu_max: Option<(u64, u64)>,
}

impl Resources {
    /// Reads the report from this machine's /proc and /sys.
    pub fn collect() -> Resources {
        Resources::collect_from(Path::new("/"), Path::new(CGROUP2_ROOT))
    }

    /// Reads the report with `root` standing for `/` (for /proc and /sys/devices) and
    /// `cgroup_root` for the cgroup v2 mount.
    pub fn collect_from(root: &Path, cgroup_root: &Path) -> Resources {
        let mut res = Resources { cpus_online: online_cpus(root), ..Resources::default() };
        if let Ok(meminfo) = std::fs::read_to_string(root.join("proc/meminfo")) {
            res.mem_total_bytes = meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0);
            res.mem_available_bytes = meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(0);
        }
        if cgroup_root.join("cgroup.controllers").exists() {
            let own = std::fs::read_to_string(root.join("proc/self/cgroup")).unwrap_or_default();
            res.cgroup = own_cgroup_v2(&own).unwrap_or_else(|| "/".to_string());
            let (memory, cpu) = cgroup_limits(cgroup_root, &res.cgroup);
            res.cgroup_memory_max_bytes = memory;
            res.cgroup_cpu_max = cpu;
        }
        res
    }

    /// CPUs the workload can keep busy: the online CPUs, capped by the cgroup CPU
    /// quota (rounded up, at least 1).
    pub fn effective_cpus(&self) -> u32 {
        let online = self.cpus_online.max(1);
        match self.cgroup_cpu_max {
            Some((quota, period)) if period > 0 => {
                let limit = quota.div_ceil(period).max(1);
                online.min(u32::try_from(limit).unwrap_or(u32::MAX))
            }
            _ => online,
        }
    }

    /// Memory the workload can use: `MemTotal` capped by the cgroup memory limit.
    pub fn effective_memory_bytes(&self) -> u64 {
        match self.cgroup_memory_max_bytes {
            Some(max) => self.mem_total_bytes.min(max),
            None => self.mem_total_bytes,
        }
    }

    /// The report as Prometheus text exposition.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        let cg = escape_label(&self.cgroup);
        let mut gauge = |name: &str, help: &str, labels: &str, value: String| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            let _ = writeln!(out, "{name}{labels} {value}");
        };
        gauge("osb_guest_cpus_online", "CPUs online in the guest.", "", self.cpus_online.to_string());
        gauge("osb_guest_memory_total_bytes", "MemTotal of the guest.", "", self.mem_total_bytes.to_string());
        gauge("osb_guest_memory_available_bytes", "MemAvailable of the guest.", "", self.mem_available_bytes.to_string());
        let labels = format!("{{cgroup=\"{cg}\"}}");
        gauge(
            "osb_guest_cgroup_memory_max_bytes",
            "Tightest cgroup v2 memory.max from the agent's cgroup to the root (+Inf: none).",
            &labels,
            option_value(self.cgroup_memory_max_bytes),
        );
        gauge(
            "osb_guest_cgroup_cpu_quota_microseconds",
            "Quota of the tightest cgroup v2 cpu.max on that path (+Inf: none).",
            &labels,
            option_value(self.cgroup_cpu_max.map(|(quota, _)| quota)),
        );
        gauge(
            "osb_guest_cgroup_cpu_period_microseconds",
            "Period of that cpu.max (0: no quota).",
            &labels,
            self.cgroup_cpu_max.map_or(0, |(_, period)| period).to_string(),
        );
        gauge("osb_guest_effective_cpus", "CPUs a workload can keep busy: online CPUs capped by the cgroup quota.", "", self.effective_cpus().to_string());
        gauge(
            "osb_guest_effective_memory_bytes",
            "Memory a workload can use: MemTotal capped by the cgroup limit.",
            "",
            self.effective_memory_bytes().to_string(),
        );
        out
    }

    /// Parses what [`Resources::to_prometheus`] wrote; unknown metrics are skipped.
    pub fn from_prometheus(text: &str) -> Result<Resources, String> {
        let mut res = Resources::default();
        let mut seen_cpus = false;
        let mut quota: Option<u64> = None;
        let mut period = 0u64;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').ok_or_else(|| format!("metrics line without a value: {line:?}"))?;
            let (name, labels) = match series.find('{') {
                Some(i) => (&series[..i], &series[i..]),
                None => (series, ""),
            };
            let number = || parse_value(value).ok_or_else(|| format!("bad value in {line:?}"));
            match name {
                "osb_guest_cpus_online" => {
                    res.cpus_online = number()?.map_or(0, |v| v.min(u64::from(u32::MAX)) as u32);
                    seen_cpus = true;
                }
                "osb_guest_memory_total_bytes" => res.mem_total_bytes = number()?.unwrap_or(0),
                "osb_guest_memory_available_bytes" => res.mem_available_bytes = number()?.unwrap_or(0),
                "osb_guest_cgroup_memory_max_bytes" => {
                    res.cgroup = label_value(labels, "cgroup").unwrap_or_default();
                    res.cgroup_memory_max_bytes = number()?;
                }
                "osb_guest_cgroup_cpu_quota_microseconds" => quota = number()?,
                "osb_guest_cgroup_cpu_period_microseconds" => period = number()?.unwrap_or(0),
                _ => {}
            }
        }
        if !seen_cpus {
            return Err("the metrics text has no osb_guest_cpus_online".to_string());
        }
        res.cgroup_cpu_max = quota.filter(|_| period > 0).map(|q| (q, period));
        Ok(res)
    }
}

fn option_value(v: Option<u64>) -> String {
    v.map_or_else(|| "+Inf".to_string(), |v| v.to_string())
}

/// `None` for +Inf, `Some(n)` for an integer; floats are truncated.
fn parse_value(s: &str) -> Option<Option<u64>> {
    match s {
        "+Inf" | "Inf" => Some(None),
        _ => s.parse::<u64>().ok().or_else(|| s.parse::<f64>().ok().filter(|f| *f >= 0.0).map(|f| f as u64)).map(Some),
    }
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn label_value(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let mut out = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// Counts CPUs in a list such as `0-3,5,7-8`.
pub fn count_cpu_list(list: &str) -> u32 {
    list.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.trim().parse::<u32>().is_ok()),
        })
        .sum()
}

fn online_cpus(root: &Path) -> u32 {
    if let Ok(list) = std::fs::read_to_string(root.join("sys/devices/system/cpu/online")) {
        let n = count_cpu_list(&list);
        if n > 0 {
            return n;
        }
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    u32::try_from(n).unwrap_or(1).max(1)
}

/// A `/proc/meminfo` field in bytes (the file speaks kB).
pub fn meminfo_bytes(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        Some(match words.next() {
            Some("kB") => n.saturating_mul(1024),
            _ => n,
        })
    })
}

/// The unified-hierarchy (`0::`) path in a `/proc/<pid>/cgroup` file.
pub fn own_cgroup_v2(proc_cgroup: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| line.strip_prefix("0::")).map(|path| path.trim().to_string())
}

/// The tightest `memory.max` and `cpu.max` from `cgroup` up to the root of the
/// hierarchy mounted at `cgroup_root`.
pub fn cgroup_limits(cgroup_root: &Path, cgroup: &str) -> (Option<u64>, Option<(u64, u64)>) {
    let mut memory: Option<u64> = None;
    let mut cpu: Option<(u64, u64)> = None;
    let mut path = cgroup.trim_matches('/').to_string();
    loop {
        let dir = if path.is_empty() { cgroup_root.to_path_buf() } else { cgroup_root.join(&path) };
        if let Ok(text) = std::fs::read_to_string(dir.join("memory.max")) {
            if let Ok(limit) = text.trim().parse::<u64>() {
                memory = Some(memory.map_or(limit, |m| m.min(limit)));
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("cpu.max")) {
            let mut words = text.split_whitespace();
            if let (Some(quota), Some(period)) = (words.next(), words.next()) {
                if let (Ok(quota), Ok(period)) = (quota.parse::<u64>(), period.parse::<u64>()) {
                    let tighter = match cpu {
                        // quota/period < q/p  <=>  quota*p < q*period
                        Some((q, p)) => u128::from(quota) * u128::from(p) < u128::from(q) * u128::from(period),
                        None => true,
                    };
                    if period > 0 && tighter {
                        cpu = Some((quota, period));
                    }
                }
            }
        }
        if path.is_empty() {
            break;
        }
        path = match path.rfind('/') {
            Some(i) => path[..i].to_string(),
            None => String::new(),
        };
    }
    (memory, cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        for (list, n) in [("0", 1), ("0-3", 4), ("0-1,4,6-7\n", 5), ("", 0), ("x", 0)] {
            assert_eq!(count_cpu_list(list), n, "{list:?}");
        }
    }

    #[test]
    fn meminfo() {
        let text = "MemTotal:        2030580 kB\nMemFree: 1 kB\nMemAvailable:    1500000 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal"), Some(2030580 * 1024));
        assert_eq!(meminfo_bytes(text, "MemAvailable"), Some(1500000 * 1024));
        assert_eq!(meminfo_bytes(text, "Mem"), None);
    }

    #[test]
    fn own_cgroup() {
        assert_eq!(own_cgroup_v2("0::/init.scope\n").as_deref(), Some("/init.scope"));
        assert_eq!(own_cgroup_v2("1:name=systemd:/x\n0::/\n").as_deref(), Some("/"));
        assert_eq!(own_cgroup_v2("1:cpu:/x\n"), None);
    }

    #[test]
    fn limits_take_the_tightest_ancestor() {
        let dir = std::env::temp_dir().join(format!("osb-agent-cg-{}", std::process::id()));
        let leaf = dir.join("a/b");
        std::fs::create_dir_all(&leaf).unwrap();
        std::fs::write(dir.join("a/memory.max"), "1073741824\n").unwrap();
        std::fs::write(leaf.join("memory.max"), "max\n").unwrap();
        std::fs::write(dir.join("a/cpu.max"), "max 100000\n").unwrap();
        std::fs::write(leaf.join("cpu.max"), "150000 100000\n").unwrap();
        assert_eq!(cgroup_limits(&dir, "/a/b"), (Some(1 << 30), Some((150000, 100000))));
        assert_eq!(cgroup_limits(&dir, "/"), (None, None));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn prometheus_round_trip() {
        for res in [
            Resources {
                cpus_online: 4,
                mem_total_bytes: 1 << 30,
                mem_available_bytes: 1 << 29,
                cgroup: "/agent \"x\"".into(),
                cgroup_memory_max_bytes: Some(256 << 20),
                cgroup_cpu_max: Some((150000, 100000)),
            },
            Resources {
                cpus_online: 1,
                mem_total_bytes: 5,
                mem_available_bytes: 0,
                cgroup: String::new(),
                cgroup_memory_max_bytes: None,
                cgroup_cpu_max: None,
            },
        ] {
            let text = res.to_prometheus();
            assert_eq!(Resources::from_prometheus(&text).unwrap(), res, "{text}");
        }
    }

    #[test]
    fn effective_values() {
        let res = Resources {
            cpus_online: 4,
            mem_total_bytes: 1 << 30,
            cgroup_memory_max_bytes: Some(1 << 20),
            cgroup_cpu_max: Some((150000, 100000)),
            ..Resources::default()
        };
        assert_eq!(res.effective_cpus(), 2);
        assert_eq!(res.effective_memory_bytes(), 1 << 20);
    }
}
