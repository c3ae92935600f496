//! `cargo xtask test`: the whole suite with everything it needs, then what
//! it could not check (skipped tests, guest boots that needed a retry).

use std::path::Path;

use anyhow::bail;
use clap::Args;
use testkit::skip::{self, Skip};

use crate::{image, util};

/// Tests whose skip never fails the run: Kata's client needs Kata's sources,
/// which no package registry carries (ci/TOOLS.md says how to enable it).
const ALWAYS_ALLOWED: &[&str] = &["kata_agent_ctl_talks_to_our_agent"];

#[derive(Args)]
pub struct Test {
    /// Only list skipped tests instead of failing on them. By default a skip
    /// fails the run (what can run on a fresh machine must run), except for
    /// Kata's client ([`ALWAYS_ALLOWED`]) and the tests named by --allow-skip.
    #[arg(long)]
    allow_skips: bool,
    /// A test allowed to skip: its full name (`osbuilder::...::name`) or its
    /// last `::` components.
    #[arg(long, value_name = "TEST")]
    allow_skip: Vec<String>,
    /// Seconds each fuzz target runs after the tests (`cargo xtask fuzz` runs longer).
    #[arg(long, default_value_t = crate::fuzz::SUITE_SECONDS, value_name = "N")]
    fuzz_seconds: u64,
    /// Extra arguments for `cargo test`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

impl Test {
    pub fn run(self) -> anyhow::Result<()> {
        // Formatting and lints first: they take a minute, the suite many.
        lint()?;
        // The Debian base image is shared by xtask and the tests: build it
        // once here so its log is visible, not inside a test's output.
        let base = image::base_image()?;
        // The guest tests boot the static init+agent with real vsock.
        let init = util::guest_init_binary()?;
        let vhost = util::ci_tool("vhost-device-vsock")?;
        // virtio-fs volumes: rust-vmm's virtiofsd, built once and cached like vhost-device-vsock.
        let virtiofsd = util::ci_tool("virtiofsd")?;
        let tmp = util::target_dir().join("tmp");
        std::fs::create_dir_all(&tmp)?;
        // Every test that cannot run here writes itself down (testkit::skip).
        let skips = tmp.join("skips.log");
        std::fs::write(&skips, "")?;
        let mut cmd = util::Cmd::new("cargo")
            .args(["test", "--workspace"])
            .args(&self.args)
            .cwd(util::project_root())
            .env("OSBUILDER_BASE_IMAGE", base)
            .env("OSBUILDER_GUEST_INIT", init)
            .env("OSBUILDER_VHOST_DEVICE_VSOCK", vhost)
            .env("OSBUILDER_VIRTIOFSD", virtiofsd)
            .env(skip::LOG_ENV, &skips);
        // Kata's own client judges wire compatibility. No package registry
        // carries its sources: they come from KATA_SRC or KATA_MIRROR (see
        // ci/TOOLS.md); without them its test is skipped, and listed below.
        match util::ci_tool("kata-agent-ctl") {
            Ok(path) => cmd = cmd.env("OSBUILDER_KATA_AGENT_CTL", path),
            Err(e) => eprintln!("xtask: warning: no kata-agent-ctl, its compatibility test will be skipped: {e:#}"),
        }
        // Guest boots that needed a second start (common::guest::boot_to_agent)
        // are written down there: say so after the suite, pass or fail.
        let retries = tmp.join("guest-retries.log");
        let _ = std::fs::remove_file(&retries);
        let result = cmd.run();
        if let Ok(text) = std::fs::read_to_string(&retries) {
            eprintln!("xtask: note: {} guest boot(s) needed a second start (agent listening, host never reached it):", text.lines().count());
            eprint!("{text}");
        }
        let skipped = read_skips(&skips)?;
        eprint!("{}", skip::summary(&skipped));
        result?;
        // Every fuzz target for a few seconds: new code meets the fuzzer at once, and
        // the committed corpora still build and run.
        crate::fuzz::run(crate::fuzz::TARGETS, self.fuzz_seconds)?;
        if !self.allow_skips {
            let allowed: Vec<String> = ALWAYS_ALLOWED.iter().map(|s| s.to_string()).chain(self.allow_skip).collect();
            let denied = denied(&skipped, &allowed);
            if !denied.is_empty() {
                bail!(
                    "{} test(s) skipped that must run here: {} (install what they need with `cargo xtask setup`, run as root, or pass --allow-skips / --allow-skip TEST)",
                    denied.len(),
                    denied.join(", ")
                );
            }
        }
        Ok(())
    }
}

/// `cargo fmt --check` and `cargo clippy -D warnings` over the workspace,
/// every target (tests, benches, xtask itself).
fn lint() -> anyhow::Result<()> {
    let root = util::project_root();
    util::Cmd::new("cargo").args(["fmt", "--all", "--check"]).cwd(&root).run()?;
    util::Cmd::new("cargo").args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]).cwd(&root).run()?;
    Ok(())
}

fn read_skips(path: &Path) -> anyhow::Result<Vec<Skip>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(skip::parse(&text)),
        Err(e) => bail!("cannot read the skip log {}: {e}", path.display()),
    }
}

/// The skipped tests (sorted, once each) that no `allowed` entry names.
fn denied(skipped: &[Skip], allowed: &[String]) -> Vec<String> {
    let names = |s: &Skip| allowed.iter().any(|a| s.test == *a || s.test.ends_with(&format!("::{a}")));
    let mut out: Vec<String> = skipped.iter().filter(|s| !names(s)).map(|s| s.test.clone()).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skip(test: &str) -> Skip {
        Skip { test: test.into(), reason: "r".into() }
    }

    #[test]
    fn denied_names_the_skips_the_allow_list_does_not() {
        let skipped = [skip("guest::kata_agent_ctl_talks_to_our_agent"), skip("net::list"), skip("net::list"), skip("agent::user")];
        let allowed = ["kata_agent_ctl_talks_to_our_agent".to_string(), "ser".to_string()];
        // "ser" is not a whole `::` component of agent::user.
        assert_eq!(denied(&skipped, &allowed), ["agent::user", "net::list"]);
        assert_eq!(denied(&skipped, &["net::list".into(), "agent::user".into(), "guest::kata_agent_ctl_talks_to_our_agent".into()]), Vec::<String>::new());
        assert_eq!(denied(&[], &[]), Vec::<String>::new());
    }

    #[test]
    fn the_skip_log_is_read_back_and_a_missing_one_is_an_error() {
        let dir = std::env::temp_dir().join(format!("xtask-skips-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("skips.log");
        std::fs::write(&log, "a::b\tneeds root\n").unwrap();
        assert_eq!(read_skips(&log).unwrap(), [Skip { test: "a::b".into(), reason: "needs root".into() }]);
        std::fs::remove_file(&log).unwrap();
        let err = read_skips(&log).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.starts_with(&format!("cannot read the skip log {}: ", log.display())), "{err}");
    }
}
