//! Visible skips: a test that cannot run here says so, and the suite lists it.
//!
//! A test that lacks what it needs (root, a tool, Kata's sources) calls
//! [`skip!`] and returns. The skip goes to stderr as `SKIP: <test>: <reason>`
//! and, when `OSBUILDER_SKIP_LOG` names a file, as one line `<test>\t<reason>`
//! appended to it. `cargo xtask test` empties that file before the suite and
//! prints [`summary`] of it after, pass or fail, so no skip is silent.
//!
//! Each skip is one `write` on a file opened with `O_APPEND`, so lines from
//! concurrent tests and test binaries do not interleave.

use std::io::Write as _;
use std::path::Path;

/// The environment variable naming the skip log.
pub const LOG_ENV: &str = "OSBUILDER_SKIP_LOG";

/// Records that the calling test skips (part of) its checks, naming the test
/// by its module path: `skip!("user_and_groups", "needs root")` in
/// `agent/tests/agent.rs` records `agent::user_and_groups`.
#[macro_export]
macro_rules! skip {
    ($test:expr, $($reason:tt)+) => {
        $crate::skip::record(&format!("{}::{}", module_path!(), $test), &format!($($reason)+))
    };
}

/// One recorded skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub test: String,
    pub reason: String,
}

/// Prints the skip and appends it to the log named by [`LOG_ENV`], if any.
/// A log that cannot be written is reported on stderr, not fatal: the skip
/// itself was already printed.
pub fn record(test: &str, reason: &str) {
    // One line per skip, whatever the reason holds.
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("SKIP: {test}: {reason}");
    let Some(log) = std::env::var_os(LOG_ENV).filter(|v| !v.is_empty()) else {
        return;
    };
    let line = format!("{test}\t{reason}\n");
    let written = std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("SKIP: cannot record the skip in {}: {e}", Path::new(&log).display());
    }
}

/// Parses a skip log; lines that are not `<test>\t<reason>` are kept whole as
/// the reason of an unnamed test rather than dropped.
pub fn parse(text: &str) -> Vec<Skip> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once('\t') {
            Some((test, reason)) => Skip { test: test.into(), reason: reason.into() },
            None => Skip { test: "?".into(), reason: l.into() },
        })
        .collect()
}

/// The end-of-suite listing: `N test(s) skipped:` then one `  <test>: <reason>`
/// line each, sorted by test name, a test that skipped twice listed once per
/// distinct reason. Empty when nothing was skipped.
pub fn summary(skips: &[Skip]) -> String {
    let mut lines: Vec<(&str, &str)> = skips.iter().map(|s| (s.test.as_str(), s.reason.as_str())).collect();
    lines.sort_unstable();
    lines.dedup();
    if lines.is_empty() {
        return String::new();
    }
    let mut tests: Vec<&str> = lines.iter().map(|(t, _)| *t).collect();
    tests.dedup();
    let mut out = format!("{} test(s) skipped:\n", tests.len());
    for (test, reason) in lines {
        out.push_str(&format!("  {test}: {reason}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(test: &str, reason: &str) -> Skip {
        Skip { test: test.into(), reason: reason.into() }
    }

    #[test]
    fn record_appends_one_line_per_skip_and_summary_lists_them() {
        let dir = std::env::temp_dir().join(format!("testkit-skip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        let _ = std::fs::remove_file(&log);
        // No other test of this crate reads or sets LOG_ENV.
        std::env::set_var(LOG_ENV, &log);
        skip!("second", "needs {}", "root");
        record("agent::first", "no `ip`\nfound");
        std::env::remove_var(LOG_ENV);
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "testkit::skip::tests::second\tneeds root\nagent::first\tno `ip` found\n");
        assert_eq!(summary(&parse(&text)), "2 test(s) skipped:\n  agent::first: no `ip` found\n  testkit::skip::tests::second: needs root\n");
    }

    #[test]
    fn summary_counts_tests_not_lines() {
        let skips = [skip("a::t", "x"), skip("a::t", "x"), skip("a::t", "y"), skip("b::u", "z")];
        assert_eq!(summary(&skips), "2 test(s) skipped:\n  a::t: x\n  a::t: y\n  b::u: z\n");
        assert_eq!(summary(&[]), "");
        assert_eq!(parse("a\tb\n\nstray line\n"), [skip("a", "b"), skip("?", "stray line")]);
    }
}
