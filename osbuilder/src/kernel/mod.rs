//! Guest kernels: a pinned source, a numbered patch series and config
//! fragments become a validated, reproducible `vmlinux` and `bzImage`.
//!
//! Inputs live in the repository (`kernel-config/`, `patches/`); extraction,
//! configuration and the build happen in a cache directory outside it, keyed
//! by a hash of every input, so an unchanged rebuild is a cache hit. The
//! configuration step fails when `olddefconfig` dropped or changed anything a
//! fragment asked for ([`config::validate`]). Builds of the same key take
//! turns (a flock beside the work directory); the key covers the toolchain
//! (gcc, binutils' ld and as, make) as well as the inputs.

pub mod config;
pub mod patches;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::oci::digest::Digest;
use config::{ConfigError, Merged, Mismatch};
use patches::{Patch, PatchError};

/// Bumped when the build procedure itself changes, so old cache entries are
/// not reused for a different recipe.
const RECIPE_VERSION: &str = "osbuilder-kernel-1";
const KBUILD_USER: &str = "osbuilder";
const KBUILD_HOST: &str = "osbuilder";

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{path}: {message}")]
    Inputs { path: PathBuf, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error("kernel series {series} is not in {versions} (known: {known})")]
    UnknownSeries { series: String, versions: PathBuf, known: String },
    #[error("feature {name:?} has no fragment {path} (known features: {known})")]
    UnknownFeature { name: String, path: PathBuf, known: String },
    #[error("no kernel source: {0}")]
    Source(String),
    #[error("source {what} has sha256 {actual}, but the pin says {expected}")]
    SourceDigest { what: String, expected: String, actual: String },
    #[error("the final .config does not honour {} requested option(s):\n  {}\n(the full configuration is in {config})", .mismatches.len(), .mismatches.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n  "))]
    Validation { mismatches: Vec<Mismatch>, config: PathBuf },
    #[error("`{command}` failed ({status}); last lines of {log}:\n{tail}")]
    Step { command: String, status: String, log: PathBuf, tail: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> KernelError {
    let context = context.into();
    move |source| KernelError::Io { context, source }
}

/// One entry of `kernel-config/versions.toml`.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct KernelVersion {
    /// MAJOR.MINOR.
    pub series: String,
    /// Bumped on every fragment or patch change; part of the artifact names.
    pub config_version: u32,
    /// A Debian package shipping `/usr/src/<package>.tar.xz` (verified by apt).
    #[serde(default)]
    pub debian_package: Option<String>,
    /// kernel.org-style tarballs, pinned by sha256.
    #[serde(default)]
    pub tarball: Vec<TarballPin>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct TarballPin {
    pub version: String,
    pub url: String,
    pub sha256: String,
}

#[derive(Deserialize)]
struct VersionsFile {
    kernel: Vec<KernelVersion>,
}

/// Where the kernel source comes from (`--source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// A `.tar.xz` / `.tar.gz` / `.tar` of a kernel tree.
    Tarball(PathBuf),
    /// An extracted tree (copied before patching; never modified).
    Tree(PathBuf),
    /// A URL that must match a pinned tarball of the series.
    Url(String),
}

impl std::str::FromStr for SourceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.starts_with("http://") || s.starts_with("https://") {
            Ok(SourceSpec::Url(s.to_string()))
        } else if Path::new(s).is_dir() {
            Ok(SourceSpec::Tree(PathBuf::from(s)))
        } else {
            Ok(SourceSpec::Tarball(PathBuf::from(s)))
        }
    }
}

/// Everything that shapes one kernel build.
#[derive(Clone, Debug)]
pub struct KernelJob {
    /// The repository's `kernel-config/`.
    pub config_dir: PathBuf,
    /// The repository's `patches/`.
    pub patches_dir: PathBuf,
    /// MAJOR.MINOR; default: the first entry of versions.toml.
    pub series: Option<String>,
    /// Feature fragments; default: `kernel-config/default-features`.
    pub features: Option<Vec<String>>,
    pub source: Option<SourceSpec>,
    pub out_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub jobs: usize,
    /// Seconds since the epoch for KBUILD_BUILD_TIMESTAMP (default 0).
    pub source_date_epoch: Option<i64>,
}

/// A resolved source: a local tarball or tree, with what identifies it.
#[derive(Clone, Debug, Serialize)]
pub struct ResolvedSource {
    pub kind: &'static str,
    pub path: PathBuf,
    /// sha256 of the tarball, or of the tree's file list and contents.
    pub sha256: String,
    /// The Debian package version, for `debian-package` sources.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debian_version: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct InputDigest {
    pub name: String,
    pub sha256: String,
}

/// All inputs, read and checked, before anything is built.
#[derive(Clone, Debug)]
pub struct KernelInputs {
    pub version: KernelVersion,
    pub features: Vec<String>,
    pub fragments: Vec<InputDigest>,
    pub merged: Merged,
    pub whitelist: BTreeSet<String>,
    pub patches: Vec<Patch>,
    pub patch_digests: Vec<InputDigest>,
    pub source: ResolvedSource,
    pub toolchain: String,
    pub key: String,
}

/// What a build produced (also written as `manifest.json` beside the outputs).
#[derive(Clone, Debug, Serialize)]
pub struct KernelManifest {
    pub kernel_version: String,
    pub series: String,
    pub config_version: u32,
    pub features: Vec<String>,
    pub source: ResolvedSource,
    pub fragments: Vec<InputDigest>,
    pub patches: Vec<InputDigest>,
    pub toolchain: String,
    pub kbuild_timestamp: String,
    pub cache_key: String,
    pub outputs: Vec<InputDigest>,
    pub build_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KernelReport {
    pub manifest: KernelManifest,
    pub cache_hit: bool,
    pub out_dir: PathBuf,
    pub files: Vec<PathBuf>,
}

/// Reads versions.toml.
pub fn read_versions(config_dir: &Path) -> Result<Vec<KernelVersion>, KernelError> {
    let path = config_dir.join("versions.toml");
    let text = std::fs::read_to_string(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
    let file: VersionsFile = toml::from_str(&text).map_err(|e| KernelError::Inputs { path: path.clone(), message: e.to_string() })?;
    Ok(file.kernel)
}

/// The fragment files of a build, in merge order: `common/*.conf`,
/// `x86_64/*.conf` (each sorted), then each feature's `features/NAME.conf`.
pub fn fragment_files(config_dir: &Path, features: &[String]) -> Result<Vec<(String, PathBuf)>, KernelError> {
    let fragments = config_dir.join("fragments");
    let mut out = Vec::new();
    for group in ["common", "x86_64"] {
        let dir = fragments.join(group);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io_err(format!("cannot read {}", dir.display())))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".conf"))
            .collect();
        names.sort();
        out.extend(names.into_iter().map(|n| (format!("{group}/{n}"), dir.join(n))));
    }
    for feature in features {
        let path = fragments.join("features").join(format!("{feature}.conf"));
        if feature.contains('/') || !path.is_file() {
            return Err(KernelError::UnknownFeature { name: feature.clone(), path, known: known_features(config_dir).join(", ") });
        }
        out.push((format!("features/{feature}.conf"), path));
    }
    Ok(out)
}

fn known_features(config_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(config_dir.join("fragments/features"))
        .map(|d| d.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".conf").map(str::to_string)).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `kernel-config/default-features`: one name per line, `#` comments.
pub fn default_features(config_dir: &Path) -> Result<Vec<String>, KernelError> {
    let path = config_dir.join("default-features");
    let text = std::fs::read_to_string(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
    Ok(text.lines().map(|l| l.split('#').next().unwrap_or("").trim()).filter(|l| !l.is_empty()).map(str::to_string).collect())
}

/// Artifact names in Kata's convention: `vmlinux-<kernel version>-<config version>`.
pub fn artifact_name(kind: &str, kernel_version: &str, config_version: u32) -> String {
    format!("{kind}-{kernel_version}-{config_version}")
}

fn sha256_file(path: &Path) -> Result<String, KernelError> {
    let len = std::fs::metadata(path).map_err(io_err(format!("cannot read {}", path.display())))?.len();
    Ok(Digest::of_file_range(path, 0, len).map_err(io_err(format!("cannot read {}", path.display())))?.hex().to_string())
}

fn run_capture(cmd: &mut Command) -> Result<String, KernelError> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().map_err(io_err(format!("cannot run {shown}")))?;
    if !out.status.success() {
        return Err(KernelError::Source(format!("{shown} failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Finds and identifies the source: `--source`, else the series' Debian package.
fn resolve_source(job: &KernelJob, version: &KernelVersion) -> Result<ResolvedSource, KernelError> {
    match &job.source {
        Some(SourceSpec::Tarball(path)) => {
            if !path.is_file() {
                return Err(KernelError::Source(format!("{} is neither a tarball nor a directory", path.display())));
            }
            let sha256 = sha256_file(path)?;
            // A tarball named in versions.toml must match its pin.
            let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if let Some(pin) = version.tarball.iter().find(|p| p.url.ends_with(&format!("/{file_name}"))) {
                if pin.sha256 != sha256 {
                    return Err(KernelError::SourceDigest { what: path.display().to_string(), expected: pin.sha256.clone(), actual: sha256 });
                }
            }
            Ok(ResolvedSource { kind: "tarball", path: path.clone(), sha256, debian_version: None })
        }
        Some(SourceSpec::Tree(path)) => Ok(ResolvedSource { kind: "tree", path: path.clone(), sha256: tree_digest(path)?, debian_version: None }),
        Some(SourceSpec::Url(url)) => {
            let pin = version.tarball.iter().find(|p| &p.url == url).ok_or_else(|| {
                KernelError::Source(format!("{url} is not pinned in versions.toml for {}; add a [[kernel.tarball]] with its sha256", version.series))
            })?;
            let dest = job.cache_dir.join("kernel/sources").join(format!("{}.tar{}", pin.sha256, tar_suffix(url)));
            if !dest.is_file() {
                download(url, &dest, &pin.sha256)?;
            }
            Ok(ResolvedSource { kind: "url", path: dest, sha256: pin.sha256.clone(), debian_version: None })
        }
        None => {
            let package = version
                .debian_package
                .as_deref()
                .ok_or_else(|| KernelError::Source(format!("kernel {} names no Debian package; pass --source", version.series)))?;
            let path = PathBuf::from(format!("/usr/src/{package}.tar.xz"));
            if !path.is_file() {
                return Err(KernelError::Source(format!("{} is missing: install {package} (ci/setup.sh does) or pass --source", path.display())));
            }
            // apt verified the file through Debian's signed metadata; Debian
            // replaces it on every security update, so record, don't pin.
            let debian_version = run_capture(Command::new("dpkg-query").args(["-W", "-f=${Version}", package])).ok();
            Ok(ResolvedSource { kind: "debian-package", sha256: sha256_file(&path)?, path, debian_version })
        }
    }
}

fn tar_suffix(name: &str) -> &'static str {
    if name.ends_with(".xz") {
        ".xz"
    } else if name.ends_with(".gz") {
        ".gz"
    } else {
        ""
    }
}

/// Downloads `url` to `dest` through a temporary name, checking the pin.
fn download(url: &str, dest: &Path, sha256: &str) -> Result<(), KernelError> {
    let dir = dest.parent().expect("has a parent");
    std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err("cannot create a download file"))?;
    run_capture(Command::new("curl").args(["-fsSL", "--retry", "3", "-o"]).arg(tmp.path()).arg(url))?;
    let actual = sha256_file(tmp.path())?;
    if actual != sha256 {
        return Err(KernelError::SourceDigest { what: url.to_string(), expected: sha256.to_string(), actual });
    }
    tmp.persist(dest).map_err(|e| KernelError::Io { context: format!("cannot store {}", dest.display()), source: e.error })?;
    Ok(())
}

/// A digest of an extracted tree: sorted relative paths, modes, contents.
fn tree_digest(root: &Path) -> Result<String, KernelError> {
    use sha2::{Digest as _, Sha256};
    let listing = run_capture(Command::new("find").arg(".").args(["-type", "f", "-o", "-type", "l"]).current_dir(root))?;
    let mut paths: Vec<&str> = listing.lines().collect();
    paths.sort_unstable();
    let mut h = Sha256::new();
    for p in paths {
        h.update(p.as_bytes());
        h.update([0]);
        let full = root.join(p);
        match std::fs::read_link(&full) {
            Ok(target) => h.update(target.to_string_lossy().as_bytes()),
            Err(_) => h.update(sha256_file(&full)?.as_bytes()),
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Reads, merges and identifies every input; nothing is built.
pub fn resolve_inputs(job: &KernelJob) -> Result<KernelInputs, KernelError> {
    let versions = read_versions(&job.config_dir)?;
    let version = match &job.series {
        Some(s) => versions.iter().find(|v| &v.series == s).cloned().ok_or_else(|| KernelError::UnknownSeries {
            series: s.clone(),
            versions: job.config_dir.join("versions.toml"),
            known: versions.iter().map(|v| v.series.clone()).collect::<Vec<_>>().join(", "),
        })?,
        None => {
            versions.first().cloned().ok_or_else(|| KernelError::Inputs { path: job.config_dir.join("versions.toml"), message: "lists no kernel".into() })?
        }
    };
    let features = match &job.features {
        Some(f) => f.clone(),
        None => default_features(&job.config_dir)?,
    };
    let mut requests = Vec::new();
    let mut fragments = Vec::new();
    for (label, path) in fragment_files(&job.config_dir, &features)? {
        let text = std::fs::read_to_string(&path).map_err(io_err(format!("cannot read {}", path.display())))?;
        requests.extend(config::parse_fragment(&text, &label)?);
        fragments.push(InputDigest { name: label, sha256: Digest::of_bytes(text.as_bytes()).hex().to_string() });
    }
    let merged = Merged::new(requests)?;
    let whitelist_path = job.config_dir.join("whitelist").join(format!("{}.conf", version.series));
    let whitelist_text = std::fs::read_to_string(&whitelist_path).unwrap_or_default();
    let whitelist = config::parse_whitelist(&whitelist_text, &format!("whitelist/{}.conf", version.series))?;
    let patches = patches::read_series(&job.patches_dir, &version.series)?;
    let patch_digests =
        patches.iter().map(|p| Ok(InputDigest { name: p.name.clone(), sha256: sha256_file(&p.path)? })).collect::<Result<Vec<_>, KernelError>>()?;
    let source = resolve_source(job, &version)?;
    let toolchain = Toolchain::probe();

    let mut key_parts: Vec<String> =
        vec![RECIPE_VERSION.into(), version.series.clone(), version.config_version.to_string(), source.sha256.clone(), toolchain.identity.clone()];
    key_parts.push(format!("epoch={:?}", job.source_date_epoch));
    key_parts.extend(features.iter().map(|f| format!("feature={f}")));
    key_parts.extend(fragments.iter().map(|f| format!("{}={}", f.name, f.sha256)));
    key_parts.push(format!("whitelist={}", Digest::of_bytes(whitelist_text.as_bytes()).hex()));
    key_parts.extend(patch_digests.iter().map(|p| format!("{}={}", p.name, p.sha256)));
    let key = Digest::of_bytes(key_parts.join("\n").as_bytes()).hex()[..16].to_string();
    Ok(KernelInputs { version, features, fragments, merged, whitelist, patches, patch_digests, source, toolchain: toolchain.summary, key })
}

/// The tools the kernel build runs from PATH, as they identify themselves.
struct Toolchain {
    /// Every tool's full `--version` output (or why it could not run), for the key.
    identity: String,
    /// Their first lines, joined by "; ", for the manifest.
    summary: String,
}

impl Toolchain {
    /// The compiler, binutils' linker and assembler (which the kernel's
    /// Makefile calls as `ld` and `as` itself, not through gcc) and make: a
    /// binutils or make upgrade is a different build, not a cache hit.
    const TOOLS: [&'static str; 4] = ["gcc", "ld", "as", "make"];

    fn probe() -> Toolchain {
        let mut identity = String::new();
        let mut firsts = Vec::new();
        for tool in Self::TOOLS {
            let said = run_capture(Command::new(tool).arg("--version").env("LC_ALL", "C")).unwrap_or_else(|e| format!("{tool}: {e}"));
            identity.push_str(&format!("{tool} --version:\n{said}\n"));
            firsts.push(said.lines().next().unwrap_or("").to_string());
        }
        Toolchain { identity, summary: firsts.join("; ") }
    }
}

/// `date -u`-style text for KBUILD_BUILD_TIMESTAMP from seconds since the epoch.
pub fn kbuild_timestamp(epoch: i64) -> String {
    let c = crate::time::Civil::from_epoch(epoch);
    format!("{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC", c.year, c.month, c.day, c.hour, c.minute, c.second)
}

/// Runs one build step with its output appended to `log`.
fn step(cmd: &mut Command, log: &Path) -> Result<(), KernelError> {
    let shown = format!("{cmd:?}");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io_err(format!("cannot write {}", log.display())))?;
    let status =
        cmd.stdin(Stdio::null()).stdout(file.try_clone().map_err(io_err("log"))?).stderr(file).status().map_err(io_err(format!("cannot run {shown}")))?;
    if status.success() {
        return Ok(());
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    Err(KernelError::Step { command: shown, status: status.to_string(), log: log.to_path_buf(), tail })
}

/// Configures the tree in `src` into `build` and checks the result.
pub fn configure(inputs: &KernelInputs, src: &Path, build: &Path, log: &Path) -> Result<(), KernelError> {
    let allconfig = build.join("osbuilder.allconfig");
    std::fs::create_dir_all(build).map_err(io_err(format!("cannot create {}", build.display())))?;
    std::fs::write(&allconfig, inputs.merged.to_allconfig()).map_err(io_err("cannot write the merged fragments"))?;
    let make = |target: &str| {
        let mut c = Command::new("make");
        // ARCH explicit: without it make may pick 32-bit x86 from allnoconfig.
        c.arg("-C").arg(src).arg(format!("O={}", build.display())).arg("ARCH=x86_64").arg(format!("KCONFIG_ALLCONFIG={}", allconfig.display())).arg(target);
        // Names a fragment option this kernel does not know in the log; the
        // validation below turns it into an error naming the fragment line
        // (unless the version's whitelist allows it).
        c.env("KCONFIG_WARN_UNKNOWN_SYMBOLS", "1");
        c
    };
    step(&mut make("allnoconfig"), log)?;
    step(&mut make("olddefconfig"), log)?;
    let config_path = build.join(".config");
    let text = std::fs::read_to_string(&config_path).map_err(io_err(format!("cannot read {}", config_path.display())))?;
    let mismatches = config::validate(&inputs.merged, &config::parse_dotconfig(&text), &inputs.whitelist);
    if !mismatches.is_empty() {
        return Err(KernelError::Validation { mismatches, config: config_path });
    }
    Ok(())
}

/// The whole build: inputs, cache lookup, extract, patch, configure,
/// validate, make, collect. Progress messages go to `log_line`.
pub fn build(job: &KernelJob, log_line: &dyn Fn(&str)) -> Result<KernelReport, KernelError> {
    let started = Instant::now();
    let inputs = resolve_inputs(job)?;
    let series = &inputs.version.series;
    let kernel_root = job.cache_dir.join("kernel");
    let done = kernel_root.join(format!("{series}-{}", inputs.key));
    if let Some(report) = from_cache(&inputs, &done, job)? {
        return Ok(report);
    }

    // A fixed work path per key: the kernel embeds build paths in places.
    // Whoever holds the lock beside it owns it (and the staging directory);
    // a second build of the same key waits, then finds the first's result.
    let work = kernel_root.join(format!("work-{series}-{}", inputs.key));
    let _lock = lock_work_dir(&kernel_root.join(format!("work-{series}-{}.lock", inputs.key)), series, log_line)?;
    if let Some(report) = from_cache(&inputs, &done, job)? {
        return Ok(report);
    }
    if work.exists() {
        std::fs::remove_dir_all(&work).map_err(io_err(format!("cannot clear {}", work.display())))?;
    }
    let src = work.join("src");
    let build_dir = work.join("build");
    std::fs::create_dir_all(&src).map_err(io_err(format!("cannot create {}", src.display())))?;
    let log = work.join("build.log");
    log_line(&format!("kernel {series}: source {} ({}), log {}", inputs.source.path.display(), inputs.source.kind, log.display()));
    match inputs.source.kind {
        "tree" => step(Command::new("cp").arg("-a").arg(format!("{}/.", inputs.source.path.display())).arg(&src), &log)?,
        _ => step(Command::new("tar").arg("-xf").arg(&inputs.source.path).arg("-C").arg(&src).arg("--strip-components=1"), &log)?,
    }
    for p in &inputs.patches {
        log_line(&format!("kernel {series}: applying {}", p.name));
        // Absolute: `patch -d` runs in the source tree.
        let patch_file = std::path::absolute(&p.path).map_err(io_err(format!("cannot resolve {}", p.path.display())))?;
        step(Command::new("patch").arg("-d").arg(&src).args(["-p1", "--batch", "--forward", "--fuzz=0", "-i"]).arg(&patch_file), &log)?;
    }
    log_line(&format!("kernel {series}: configuring ({} requested options)", inputs.merged.requests.len()));
    if let Err(e) = configure(&inputs, &src, &build_dir, &log) {
        return Err(keep_failure(e, &work, &kernel_root.join(format!("failed-{series}-{}", inputs.key))));
    }
    let kernel_version =
        run_capture(Command::new("make").arg("-s").arg("-C").arg(&src).arg(format!("O={}", build_dir.display())).arg("ARCH=x86_64").arg("kernelrelease"))?;
    let epoch = job.source_date_epoch.unwrap_or(0);
    let timestamp = kbuild_timestamp(epoch);
    log_line(&format!("kernel {series}: building {kernel_version} with {} jobs", job.jobs.max(1)));
    step(
        Command::new("make")
            .arg("-C")
            .arg(&src)
            .arg(format!("O={}", build_dir.display()))
            .arg("ARCH=x86_64")
            .arg(format!("-j{}", job.jobs.max(1)))
            .args(["bzImage", "vmlinux"])
            .env("KBUILD_BUILD_TIMESTAMP", &timestamp)
            .env("KBUILD_BUILD_USER", KBUILD_USER)
            .env("KBUILD_BUILD_HOST", KBUILD_HOST)
            .env("KBUILD_BUILD_VERSION", "1")
            .env("SOURCE_DATE_EPOCH", epoch.to_string()),
        &log,
    )?;

    // Collect into a temporary directory, then rename into the cache.
    let cv = inputs.version.config_version;
    let staging = kernel_root.join(format!("{series}-{}.tmp", inputs.key));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err("cannot clear the staging directory"))?;
    }
    std::fs::create_dir_all(&staging).map_err(io_err("cannot create the staging directory"))?;
    let mut outputs = Vec::new();
    for (from, kind) in [("vmlinux", "vmlinux"), ("arch/x86/boot/bzImage", "vmlinuz"), (".config", "config"), ("System.map", "System.map")] {
        let name = artifact_name(kind, &kernel_version, cv);
        let dest = staging.join(&name);
        std::fs::copy(build_dir.join(from), &dest).map_err(io_err(format!("cannot collect {from}")))?;
        outputs.push(InputDigest { sha256: sha256_file(&dest)?, name });
    }
    let manifest = KernelManifest {
        kernel_version,
        series: series.clone(),
        config_version: cv,
        features: inputs.features.clone(),
        source: inputs.source.clone(),
        fragments: inputs.fragments.clone(),
        patches: inputs.patch_digests.clone(),
        toolchain: inputs.toolchain.clone(),
        kbuild_timestamp: timestamp,
        cache_key: inputs.key.clone(),
        outputs,
        build_seconds: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_vec_pretty(&manifest).expect("serializable");
    std::fs::write(staging.join("manifest.json"), json).map_err(io_err("cannot write the manifest"))?;
    std::fs::rename(&staging, &done).map_err(io_err(format!("cannot move the build to {}", done.display())))?;
    // The tree and objects are 1-2 GB; the artifacts are what is kept.
    let _ = std::fs::remove_dir_all(&work);
    let files = publish(&done, &manifest, &job.out_dir)?;
    Ok(KernelReport { manifest, cache_hit: false, out_dir: job.out_dir.clone(), files })
}

/// The cached build of `inputs` (`done/manifest.json`), published to the output directory.
fn from_cache(inputs: &KernelInputs, done: &Path, job: &KernelJob) -> Result<Option<KernelReport>, KernelError> {
    let manifest_path = done.join("manifest.json");
    if !manifest_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&manifest_path).map_err(io_err("cannot read the cached manifest"))?;
    let cached: serde_json::Value = serde_json::from_str(&text).map_err(|e| KernelError::Inputs { path: manifest_path.clone(), message: e.to_string() })?;
    let manifest = manifest_from_cache(inputs, &cached)?;
    let files = publish(done, &manifest, &job.out_dir)?;
    Ok(Some(KernelReport { manifest, cache_hit: true, out_dir: job.out_dir.clone(), files }))
}

/// Takes the exclusive lock (flock) on `path`, waiting (and saying so) while
/// another build holds it; released when the returned file is dropped or the
/// process ends. The lock file stays: removing it would let a third build
/// lock a new file while a second still holds the old one.
fn lock_work_dir(path: &Path, series: &str, log_line: &dyn Fn(&str)) -> Result<std::fs::File, KernelError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    }
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(io_err(format!("cannot open {}", path.display())))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            log_line(&format!("kernel {series}: waiting for another build of the same inputs (it holds {})", path.display()));
            file.lock().map_err(io_err(format!("cannot lock {}", path.display())))?;
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err(format!("cannot lock {}", path.display()))(e)),
    }
    Ok(file)
}

/// Keeps the `.config` and log of a failed configuration (small) and drops
/// the extracted tree (over a gigabyte), pointing the error at what is kept.
fn keep_failure(err: KernelError, work: &Path, keep: &Path) -> KernelError {
    let _ = std::fs::remove_dir_all(keep);
    if std::fs::create_dir_all(keep).is_err() {
        return err;
    }
    let _ = std::fs::copy(work.join("build/.config"), keep.join(".config"));
    let _ = std::fs::copy(work.join("build.log"), keep.join("build.log"));
    let _ = std::fs::remove_dir_all(work);
    match err {
        KernelError::Validation { mismatches, .. } => KernelError::Validation { mismatches, config: keep.join(".config") },
        KernelError::Step { command, status, tail, .. } => KernelError::Step { command, status, log: keep.join("build.log"), tail },
        other => other,
    }
}

/// Rebuilds the manifest of a cached build (inputs are identical by key).
fn manifest_from_cache(inputs: &KernelInputs, cached: &serde_json::Value) -> Result<KernelManifest, KernelError> {
    let outputs: Vec<InputDigest> = cached["outputs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|o| Some(InputDigest { name: o["name"].as_str()?.to_string(), sha256: o["sha256"].as_str()?.to_string() }))
        .collect();
    Ok(KernelManifest {
        kernel_version: cached["kernel_version"].as_str().unwrap_or_default().to_string(),
        series: inputs.version.series.clone(),
        config_version: inputs.version.config_version,
        features: inputs.features.clone(),
        source: inputs.source.clone(),
        fragments: inputs.fragments.clone(),
        patches: inputs.patch_digests.clone(),
        toolchain: inputs.toolchain.clone(),
        kbuild_timestamp: cached["kbuild_timestamp"].as_str().unwrap_or_default().to_string(),
        cache_key: inputs.key.clone(),
        outputs,
        build_seconds: cached["build_seconds"].as_f64().unwrap_or_default(),
    })
}

/// Copies the artifacts and the manifest from the cache to `out_dir`
/// (each staged by [`crate::output`]).
fn publish(done: &Path, manifest: &KernelManifest, out_dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    std::fs::create_dir_all(out_dir).map_err(io_err(format!("cannot create {}", out_dir.display())))?;
    let mut files = Vec::new();
    let names = manifest.outputs.iter().map(|o| o.name.clone()).chain([String::from("manifest.json")]);
    for name in names {
        let from = done.join(&name);
        let to =
            out_dir.join(if name == "manifest.json" { format!("manifest-{}-{}.json", manifest.kernel_version, manifest.config_version) } else { name.clone() });
        crate::output::copy_file(&from, &to).map_err(|e| KernelError::Io { context: format!("cannot publish {name}"), source: std::io::Error::other(e) })?;
        files.push(to);
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_timestamps() {
        assert_eq!(artifact_name("vmlinux", "6.12.117", 3), "vmlinux-6.12.117-3");
        assert_eq!(kbuild_timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(kbuild_timestamp(1_709_208_000), "2024-02-29 12:00:00 UTC");
    }

    #[test]
    fn source_specs() {
        assert_eq!("https://cdn.kernel.org/x.tar.xz".parse::<SourceSpec>().unwrap(), SourceSpec::Url("https://cdn.kernel.org/x.tar.xz".into()));
        assert_eq!("/nonexistent.tar.xz".parse::<SourceSpec>().unwrap(), SourceSpec::Tarball("/nonexistent.tar.xz".into()));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(dir.path().to_str().unwrap().parse::<SourceSpec>().unwrap(), SourceSpec::Tree(dir.path().into()));
    }

    /// The repository's own inputs parse, merge without conflicts, and every
    /// default feature has a fragment.
    #[test]
    fn repository_inputs_are_consistent() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let config_dir = root.join("kernel-config");
        let versions = read_versions(&config_dir).unwrap();
        assert!(!versions.is_empty());
        let features = default_features(&config_dir).unwrap();
        let mut requests = Vec::new();
        for (label, path) in fragment_files(&config_dir, &features).unwrap() {
            requests.extend(config::parse_fragment(&std::fs::read_to_string(path).unwrap(), &label).unwrap());
        }
        let merged = Merged::new(requests).unwrap();
        for must in
            ["CONFIG_VIRTIO_VSOCKETS", "CONFIG_VIRTIO_BLK", "CONFIG_EXT4_FS", "CONFIG_EROFS_FS", "CONFIG_OVERLAY_FS", "CONFIG_FS_DAX", "CONFIG_DM_VERITY"]
        {
            assert!(merged.requests.contains_key(must), "{must} is requested by the default build");
        }
        for v in &versions {
            patches::read_series(&root.join("patches"), &v.series).unwrap();
        }
        let err = fragment_files(&config_dir, &["no-such-feature".into()]).unwrap_err().to_string();
        assert!(err.contains("known features:"), "{err}");
    }
}
