//! Paths, the one command runner, and setup.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context as _};

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Where slow artifacts are cached, outside the repository.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("OSBUILDER_CACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("osbuilder")
}

/// A command that logs itself and fails with its stderr.
pub struct Cmd {
    program: OsString,
    args: Vec<OsString>,
    cwd: Option<PathBuf>,
    envs: Vec<(OsString, OsString)>,
    quiet: bool,
}

impl Cmd {
    pub fn new(program: impl Into<OsString>) -> Self {
        Cmd { program: program.into(), args: vec![], cwd: None, envs: vec![], quiet: false }
    }
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }
    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }
    pub fn env(mut self, k: impl Into<OsString>, v: impl Into<OsString>) -> Self {
        self.envs.push((k.into(), v.into()));
        self
    }
    /// Don't echo the command line (for commands run many times in benches).
    pub fn quiet(mut self) -> Self {
        self.quiet = true;
        self
    }

    fn line(&self) -> String {
        std::iter::once(&self.program).chain(&self.args).map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        c.envs(self.envs.iter().map(|(k, v)| (k, v)));
        c
    }

    /// Runs with inherited stdio.
    pub fn run(self) -> anyhow::Result<()> {
        if !self.quiet {
            eprintln!("$ {}", self.line());
        }
        let status = self.command().status().with_context(|| format!("cannot run {}", self.line()))?;
        if !status.success() {
            bail!("`{}` failed ({status})", self.line());
        }
        Ok(())
    }

    /// Runs capturing stdout; on failure the error carries stderr.
    pub fn read(self) -> anyhow::Result<String> {
        if !self.quiet {
            eprintln!("$ {}", self.line());
        }
        let out = self.command().stdin(Stdio::null()).output().with_context(|| format!("cannot run {}", self.line()))?;
        if !out.status.success() {
            bail!("`{}` failed ({}):\n{}", self.line(), out.status, String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Installs what the build and tests need (ci/setup.sh: idempotent, fast when done).
pub fn setup() -> anyhow::Result<()> {
    Cmd::new("bash").arg(project_root().join("ci/setup.sh")).quiet().run()
}

/// sha256 of some byte strings, hex, for cache keys.
pub fn hash_key(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())[..16].to_string()
}

/// Builds the release `osbuilder` binary and returns its path.
pub fn osbuilder_binary() -> anyhow::Result<PathBuf> {
    Cmd::new("cargo").args(["build", "--release", "--quiet", "-p", "osbuilder"]).cwd(project_root()).run()?;
    Ok(target_dir().join("release/osbuilder"))
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| project_root().join("target"))
}

/// A tool from `ci/tools.sh` (installed and cached on first use).
pub fn ci_tool(name: &str) -> anyhow::Result<PathBuf> {
    let out = Cmd::new("bash").arg(project_root().join("ci/tools.sh")).arg(name).quiet().read()?;
    Ok(PathBuf::from(out.trim()))
}

/// The static guest binary `osb-init` (init + agent), built with static
/// glibc for the only target installed here. The explicit --target keeps
/// +crt-static away from build scripts and proc macros.
pub fn guest_init_binary() -> anyhow::Result<PathBuf> {
    Cmd::new("cargo")
        .args(["build", "--quiet", "--profile", "guest", "--target", "x86_64-unknown-linux-gnu", "-p", "osb-init"])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .cwd(project_root())
        .run()?;
    Ok(target_dir().join("x86_64-unknown-linux-gnu/guest/osb-init"))
}

/// sha256 of a file, hex (`sha256sum`).
pub fn sha256_file(path: &Path) -> anyhow::Result<String> {
    Ok(Cmd::new("sha256sum").arg(path).quiet().read()?.split_whitespace().next().unwrap_or("").to_string())
}
