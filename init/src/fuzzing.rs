//! Entry points of the fuzz targets `init_cmdline` and `init_run_json` in
//! `fuzz/` (cargo-fuzz), and their replay in `cargo test`. Present only in
//! test builds and with `--cfg fuzzing`: the guest binary carries none of it.
//!
//! Both inputs come from outside init's control (the kernel command line
//! from whoever boots the VM, run.json from the image), so every byte string
//! must end in options, a workload or an error, never a panic (PID 1
//! panicking is a kernel panic).

use crate::cmdline::{self, Options};
use crate::config::{self, RunConfig};

/// Target `init_cmdline`: the bytes as `/proc/cmdline` (read lossily, as
/// init does), split and parsed into `osb.*` options.
pub fn cmdline(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let params = cmdline::split(&text);
    for (key, value) in &params {
        if key.starts_with("osb.") {
            if let Some(v) = value {
                let _ = cmdline::parse_list(v);
            }
        }
    }
    match Options::parse(&text) {
        Ok((opts, errors)) => {
            for e in errors {
                let _ = e.to_string();
            }
            let _ = config::merge(&RunConfig::default(), &opts).map(check_workload);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

/// Target `init_run_json`: the bytes up to the first NUL as run.json, the
/// rest as the command line; the two merged into the workload.
pub fn run_json(data: &[u8]) {
    let (json, line) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(text) = std::str::from_utf8(json) else { return };
    let Ok(run) = RunConfig::parse(text) else { return };
    let opts = Options::parse(&String::from_utf8_lossy(line)).map(|(o, _)| o).unwrap_or_default();
    if let Some(workload) = config::merge(&run, &opts) {
        check_workload(workload);
    }
    if let Ok(mounts) = config::mounts(&run, &opts) {
        check_mounts(&mounts);
    }
}

/// What `config::mounts` promises: valid specs whose fstab form reads back to the same
/// spec (what init hands the agent), no mount before one it sits inside.
fn check_mounts(mounts: &[osb_agent::volume::MountSpec]) {
    use osb_agent::volume::{is_under, MountSpec};
    for m in mounts {
        m.validate().expect("a listed mount is valid");
        let line = m.to_line();
        let back = MountSpec::parse_line(&line).unwrap_or_else(|e| panic!("{line:?} does not read back: {e}"));
        assert_eq!(back.to_line(), line, "{m:?}");
        assert_eq!(
            (&back.source, &back.target, &back.fstype, &back.options, back.read_only, back.nofail),
            (&m.source, &m.target, &m.fstype, &m.options, m.read_only, m.nofail)
        );
    }
    for (i, a) in mounts.iter().enumerate() {
        for b in &mounts[i + 1..] {
            assert!(
                !(is_under(&a.target, &b.target) && a.target.trim_end_matches('/') != b.target.trim_end_matches('/')),
                "{} comes before {}, which holds it",
                a.target,
                b.target
            );
        }
    }
}

/// What `config::merge` promises: a command, each variable once, a PATH, a
/// working directory.
fn check_workload(w: config::Workload) {
    assert!(!w.argv.is_empty(), "a workload has a command");
    assert!(config::env_get(&w.env, "PATH").is_some(), "PATH is always set: {:?}", w.env);
    let key = |e: &String| e.split_once('=').map_or(e.clone(), |(k, _)| k.to_string());
    let mut keys: Vec<String> = w.env.iter().map(key).collect();
    keys.sort();
    let n = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), n, "each variable once: {:?}", w.env);
    assert!(!w.working_dir.is_empty());
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Every committed input of `name` (`fuzz/corpus/`, `fuzz/regressions/`).
    fn replay(name: &str, target: fn(&[u8])) {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut inputs = Vec::new();
        for kind in ["corpus", "regressions"] {
            if let Ok(entries) = std::fs::read_dir(root.join(kind).join(name)) {
                inputs.extend(entries.map(|e| e.expect("read a fuzz input directory").path()));
            }
        }
        inputs.sort();
        assert!(!inputs.is_empty(), "no committed inputs for fuzz target {name}");
        let failed: Vec<_> = inputs
            .iter()
            .filter(|path| {
                let data = std::fs::read(path).expect("read a fuzz input");
                std::panic::catch_unwind(|| target(&data)).is_err()
            })
            .collect();
        assert!(failed.is_empty(), "fuzz target {name} panicked on {failed:#?}");
    }

    #[test]
    fn fuzz_inputs_init_cmdline() {
        replay("init_cmdline", super::cmdline);
    }

    #[test]
    fn fuzz_inputs_init_run_json() {
        replay("init_run_json", super::run_json);
    }
}
