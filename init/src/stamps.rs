//! Boot stamps: the guest's `CLOCK_BOOTTIME` (the clock `/proc/uptime` reads,
//! without its 10 ms rounding) at each step of init's start-up, in
//! microseconds, handed to the agent as `--boot-stamps name=us,...` so the
//! host can place init's steps on the boot's time line (`osbuilder vm boot
//! --json`, `cargo xtask bench --only boot`).
//!
//! PID 1 marks `init` (its first instruction), `mounted` (pseudo
//! filesystems and console), `root` (the real root, when there is one) and
//! `spawn` (just before the agent's fork); the agent adds `agent` and
//! `listen`. Each name is marked once, and only the first agent gets them:
//! a restarted one has no boot to report.

use std::sync::Mutex;

static STAMPS: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// `CLOCK_BOOTTIME` in microseconds (0 if the clock cannot be read).
pub fn boottime_us() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Records `name` now, unless it was recorded already.
pub fn mark(name: &'static str) {
    let now = boottime_us();
    let mut stamps = STAMPS.lock().unwrap_or_else(|e| e.into_inner());
    if !stamps.iter().any(|(n, _)| *n == name) {
        stamps.push((name, now));
    }
}

/// `init=712345,mounted=713002,...`: the agent's `--boot-stamps` value.
pub fn arg() -> String {
    let stamps = STAMPS.lock().unwrap_or_else(|e| e.into_inner());
    stamps.iter().map(|(n, us)| format!("{n}={us}")).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_marked_once_in_order() {
        mark("test_a");
        let first = arg();
        mark("test_b");
        mark("test_a");
        let all = arg();
        assert!(all.starts_with(&first), "{all} does not extend {first}");
        let names: Vec<&str> = all.split(',').filter_map(|kv| kv.split_once('=').map(|(n, _)| n)).collect();
        assert_eq!(names.iter().filter(|n| **n == "test_a").count(), 1, "{all}");
        let us = |name: &str| all.split(',').find_map(|kv| kv.strip_prefix(&format!("{name}="))?.parse::<u64>().ok()).unwrap();
        assert!(us("test_a") > 0 && us("test_b") >= us("test_a"), "{all}");
    }
}
