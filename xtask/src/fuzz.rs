//! `cargo xtask fuzz`: builds the fuzz targets in `fuzz/` with cargo-fuzz and
//! runs each with libFuzzer for a while; `cargo xtask test` runs each for a
//! few seconds after the suite.
//!
//! cargo-fuzz's default build adds AddressSanitizer (`-Zsanitizer=address`),
//! which only a nightly rustc accepts; `--sanitizer none` leaves the stable
//! flags (SanitizerCoverage through `-Cpasses=sancov-module` and
//! `-Cllvm-args`, `--cfg fuzzing`, `-Cdebug-assertions`), so the targets
//! build on the one stable toolchain CI has. Safe Rust needs no ASan to turn
//! memory errors into crashes; panics, overflow checks and debug assertions
//! are what libFuzzer catches here.
//!
//! The build is cargo-fuzz's `--dev` with `fuzz/Cargo.toml`'s dev profile
//! (opt-level 1): every dependency is instrumented, and a cold release build
//! of the eight targets took over half an hour on two cores, most of the
//! suite's budget; opt-level 1 builds in minutes and executes a few times
//! slower, which a few seconds per target in the suite can afford and a long
//! `cargo xtask fuzz --seconds N` makes up for with time.
//!
//! Corpora: libFuzzer reads the committed seeds (`fuzz/corpus/<target>/`) and
//! the regression inputs (`fuzz/regressions/<target>/`) and writes what it
//! finds into a working corpus under the target directory, which later runs
//! start from; crash inputs go to `<target dir>/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::util;

/// Every target in `fuzz/Cargo.toml`, in the order they run.
pub const TARGETS: &[&str] = &["layer", "oci_manifest", "cpio", "disk", "kernel_fragment", "ttrpc", "init_cmdline", "init_run_json"];

/// Seconds per target in `cargo xtask test`.
pub const SUITE_SECONDS: u64 = 5;

#[derive(Args)]
pub struct Fuzz {
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Run only this target (repeatable; default: all of them).
    #[arg(long = "target", value_name = "NAME")]
    targets: Vec<String>,
}

impl Fuzz {
    pub fn run(self) -> anyhow::Result<()> {
        for t in &self.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("no fuzz target {t:?}; the targets are {}", TARGETS.join(", "));
            }
        }
        let targets: Vec<&str> = if self.targets.is_empty() { TARGETS.to_vec() } else { self.targets.iter().map(String::as_str).collect() };
        run(&targets, self.seconds)
    }
}

/// What one libFuzzer run did.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub executions: u64,
    /// Inputs in the working corpus after the run.
    pub corpus: usize,
    /// The crash, timeout or out-of-memory input, when the run failed.
    pub artifact: Option<PathBuf>,
}

/// Builds every target, runs `targets` for `seconds` each, prints a line per
/// target and fails naming every crash.
pub fn run(targets: &[&str], seconds: u64) -> anyhow::Result<()> {
    let bins = build()?;
    let mut crashes = Vec::new();
    for target in targets {
        let outcome = run_target(&bins, target, seconds)?;
        let status = match &outcome.artifact {
            None => "no crash".to_string(),
            Some(a) => format!("CRASH: {}", a.display()),
        };
        eprintln!("xtask: fuzz {target}: {} executions in {seconds} s, corpus {} inputs, {status}", outcome.executions, outcome.corpus);
        if let Some(a) = outcome.artifact {
            crashes.push(format!(
                "{target}: {} (reproduce: {} {}; once fixed, add the input to fuzz/regressions/{target}/)",
                a.display(),
                bins.join(target).display(),
                a.display()
            ));
        }
    }
    if !crashes.is_empty() {
        bail!("{} fuzz target(s) crashed:\n  {}", crashes.len(), crashes.join("\n  "));
    }
    Ok(())
}

fn fuzz_dir() -> PathBuf {
    util::project_root().join("fuzz")
}

fn work_dir() -> PathBuf {
    util::target_dir().join("fuzz")
}

/// Builds all targets (dev profile at opt-level 1, instrumented, no
/// sanitizer); returns the directory holding the binaries.
fn build() -> anyhow::Result<PathBuf> {
    let cargo_fuzz = util::ci_tool("cargo-fuzz")?;
    let target_dir = work_dir().join("target");
    util::Cmd::new(cargo_fuzz)
        .args(["build", "--dev", "--sanitizer", "none", "--fuzz-dir"])
        .arg(fuzz_dir())
        .cwd(util::project_root())
        .env("CARGO_TARGET_DIR", &target_dir)
        .run()?;
    Ok(target_dir.join(host_triple()).join("debug"))
}

/// cargo-fuzz builds for the host triple explicitly (its binaries land under it).
fn host_triple() -> String {
    format!("{}-unknown-linux-gnu", std::env::consts::ARCH)
}

fn run_target(bins: &Path, target: &str, seconds: u64) -> anyhow::Result<Outcome> {
    let corpus = work_dir().join("corpus").join(target);
    let artifacts = work_dir().join("artifacts").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("cannot create {}", corpus.display()))?;
    std::fs::create_dir_all(&artifacts).with_context(|| format!("cannot create {}", artifacts.display()))?;
    let mut cmd = Command::new(bins.join(target));
    cmd.arg(format!("-max_total_time={seconds}"))
        .arg("-rss_limit_mb=2048")
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        // The first directory receives new inputs; the committed ones are only read.
        .arg(&corpus);
    for seeds in [fuzz_dir().join("corpus").join(target), fuzz_dir().join("regressions").join(target)] {
        if seeds.is_dir() {
            cmd.arg(seeds);
        }
    }
    eprintln!("$ {}", std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" "));
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot run fuzz target {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let log_path = work_dir().join(format!("{target}.log"));
    std::fs::write(&log_path, log.as_bytes()).with_context(|| format!("cannot write {}", log_path.display()))?;
    let executions = final_stat(&log, "number_of_executed_units");
    let corpus_size = std::fs::read_dir(&corpus).map(|d| d.count()).unwrap_or(0);
    if out.status.success() {
        let Some(executions) = executions else {
            bail!("fuzz target {target} ended without libFuzzer's final stats (log: {})", log_path.display());
        };
        return Ok(Outcome { executions, corpus: corpus_size, artifact: None });
    }
    let Some(artifact) = artifact_path(&log) else {
        bail!("fuzz target {target} failed ({}) without writing an input (log: {})", out.status, log_path.display());
    };
    // Show why: the panic message and libFuzzer's summary.
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    Ok(Outcome { executions: executions.unwrap_or(0), corpus: corpus_size, artifact: Some(artifact) })
}

/// `stat::NAME: N` from libFuzzer's `-print_final_stats=1` output.
fn final_stat(log: &str, name: &str) -> Option<u64> {
    let key = format!("stat::{name}:");
    log.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok())
}

/// The input libFuzzer saved for a crash, timeout or OOM
/// (`Test unit written to PATH`).
fn artifact_path(log: &str) -> Option<PathBuf> {
    log.lines().rev().find_map(|l| l.split_once("Test unit written to ")).map(|(_, p)| PathBuf::from(p.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libfuzzer_output_is_read() {
        let log = "#1234\tDONE   cov: 6 ft: 7 corp: 1/1b\nDone 1234 runs in 4 second(s)\n\
                   stat::number_of_executed_units: 6972002\nstat::average_exec_per_sec:     1743000\n";
        assert_eq!(final_stat(log, "number_of_executed_units"), Some(6_972_002));
        assert_eq!(final_stat(log, "peak_rss_mb"), None);
        let crash = "==1== ERROR: libFuzzer: deadly signal\nMS: 1 ChangeBit-;\n\
                     artifact_prefix='/t/a/'; Test unit written to /t/a/crash-da39a3ee\nBase64: \n";
        assert_eq!(artifact_path(crash), Some(PathBuf::from("/t/a/crash-da39a3ee")));
        assert_eq!(artifact_path(log), None);
    }

    #[test]
    fn every_target_is_in_the_fuzz_manifest_and_has_seeds() {
        let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
        let bins = manifest.matches("[[bin]]").count();
        assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml and TARGETS list the same targets");
        for t in TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t} is not in fuzz/Cargo.toml");
            assert!(fuzz_dir().join("fuzz_targets").join(format!("{t}.rs")).is_file(), "fuzz/fuzz_targets/{t}.rs");
            let seeds = std::fs::read_dir(fuzz_dir().join("corpus").join(t)).map(|d| d.count()).unwrap_or(0);
            assert!(seeds > 0, "fuzz/corpus/{t}/ has no seeds");
        }
    }
}
