//! The build steps strung together: image -> tree -> initrd. The CLI and
//! xtask both call these, so the pipeline is one library call for others too.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use osb_agent::volume::MountSpec;
use serde::Serialize;

use crate::disk::{
    self,
    erofs::Compression,
    ext4::Ext4Size,
    image::{Cmdline, DiskFormat, DiskOptions, DiskReport, FsKind, ImageError},
    layout::TableKind,
};
use crate::initrd::{self, InitrdError, InitrdOptions, InitrdReport};
use crate::oci::digest::Digest;
use crate::oci::{Image, ImageRef, LayerInfo, OciError, PullOptions};
use crate::progress::Progress;
use crate::rootfs::{HostAddError, Intake, LayerStats, PathError, Plan, RelPath, Tree, TreeStats};
use sha2::Digest as _;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error(transparent)]
    Initrd(#[from] InitrdError),
    #[error(transparent)]
    HostAdd(#[from] HostAddError),
    #[error(transparent)]
    Disk(#[from] ImageError),
    #[error("{0}")]
    Usage(String),
}

/// `--add SRC:DEST[:MODE]`: a host file or directory to place in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddSpec {
    pub src: PathBuf,
    pub dest: RelPath,
    pub mode: Option<u32>,
}

impl FromStr for AddSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.splitn(3, ':');
        let (Some(src), Some(dest)) = (parts.next().filter(|p| !p.is_empty()), parts.next().filter(|p| !p.is_empty())) else {
            return Err(format!("--add {s:?} is not SRC:DEST[:MODE]"));
        };
        let mode = parts
            .next()
            .map(|m| u32::from_str_radix(m, 8).ok().filter(|&m| m <= 0o7777).ok_or_else(|| format!("--add {s:?}: mode {m:?} is not octal like 0755")))
            .transpose()?;
        let dest = RelPath::parse_user(dest).map_err(|e: PathError| format!("--add {s:?}: {e}"))?;
        Ok(AddSpec { src: PathBuf::from(src), dest, mode })
    }
}

/// `--remove PATH` or, with `if_present`, `--remove-if-present PATH`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoveSpec {
    pub path: RelPath,
    /// A path that is not in the image is a warning, not an error.
    pub if_present: bool,
}

/// Where SOURCE_DATE_EPOCH came from, recorded in the report.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EpochSource {
    Explicit,
    ImageCreated,
    Zero,
}

/// The inputs that make the guest tree, shared by every output kind.
#[derive(Clone, Debug)]
pub struct TreeJob {
    pub image: ImageRef,
    pub pull: PullOptions,
    /// `None`: use the image config's `created`, else 0.
    pub source_date_epoch: Option<i64>,
    pub adds: Vec<AddSpec>,
    pub removes: Vec<RemoveSpec>,
    /// The intake's limits and where layer file data is spooled.
    pub intake: Intake,
    /// The guest init (static `osb-init`), with the image's run config at
    /// [`RUN_CONFIG_PATH`]; where it goes depends on the output kind.
    pub init: Option<PathBuf>,
    /// `--mount`: written into the run config's `mounts` (needs `init`).
    pub mounts: Vec<MountSpec>,
    /// `--network`: the run config's `network` (needs `init`).
    pub network: Option<serde_json::Value>,
}

/// Everything that shapes one initrd build.
#[derive(Clone, Debug)]
pub struct InitrdJob {
    pub tree: TreeJob,
    pub output: PathBuf,
    pub initrd: InitrdOptions,
}

/// Where the guest init goes in an initrd: what the kernel runs.
pub const INITRD_INIT_PATH: &str = "/init";
/// Where the guest init goes on a disk: beside, not over, the image's own
/// `/sbin/init`; the kernel is told with `init=`.
pub const DISK_INIT_PATH: &str = "/.osb/init";

/// Where the guest init reads the workload's run config.
pub const RUN_CONFIG_PATH: &str = "etc/osb/run.json";

/// The workload as the guest init reads it (`/etc/osb/run.json`), taken
/// from the OCI image config at build time. Field order is fixed, so the
/// same image gives the same bytes.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct GuestRunConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<RunMount>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_json::Value>,
}

/// One of the run config's `mounts`, as the guest init reads it (see init/README.md).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct RunMount {
    pub source: String,
    pub target: String,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub read_only: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// Octal, as a string (`"0750"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nofail: bool,
}

impl RunMount {
    pub fn of(spec: &MountSpec) -> RunMount {
        RunMount {
            source: spec.source.clone(),
            target: spec.target.clone(),
            fstype: spec.fstype.clone(),
            options: spec.options.clone(),
            read_only: spec.read_only,
            wait: spec.wait.map(|w| w.as_secs_f64()),
            uid: spec.uid,
            gid: spec.gid,
            mode: spec.mode.map(|m| format!("{m:04o}")),
            nofail: spec.nofail,
        }
    }
}

/// `--network FILE`: a JSON object with only the fields the guest init knows (it
/// checks the values themselves at boot, and a bad one stops the boot naming it).
pub fn parse_network_arg(path: &str) -> Result<serde_json::Value, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("read {path}: {e}"))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("{path}: not valid JSON: {e}"))?;
    let Some(map) = value.as_object() else { return Err(format!("{path}: the network must be a JSON object")) };
    const KNOWN: [&str; 4] = ["interfaces", "routes", "dns", "hosts"];
    if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("{path}: unknown field {k:?} (known: {})", KNOWN.join(", ")));
    }
    Ok(value)
}

/// `--mount SPEC`: an fstab-style line, checked as the guest init will read it.
pub fn parse_mount_arg(s: &str) -> Result<MountSpec, String> {
    MountSpec::parse_line(s).map_err(|e| e.to_string())
}

impl GuestRunConfig {
    pub fn of(config: &crate::oci::manifest::RunConfig) -> Self {
        let nonempty = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
        GuestRunConfig {
            entrypoint: config.entrypoint.clone().filter(|v| !v.is_empty()),
            cmd: config.cmd.clone().filter(|v| !v.is_empty()),
            env: config.env.clone().filter(|v| !v.is_empty()),
            working_dir: nonempty(&config.working_dir),
            user: nonempty(&config.user),
            mounts: Vec::new(),
            network: None,
        }
    }

    /// With `--mount`s and `--network` added.
    pub fn with_volumes(mut self, mounts: &[MountSpec], network: Option<&serde_json::Value>) -> Self {
        self.mounts = mounts.iter().map(RunMount::of).collect();
        self.network = network.cloned();
        self
    }

    pub fn has_workload(&self) -> bool {
        self.entrypoint.is_some() || self.cmd.is_some()
    }

    /// Whether the guest needs the file at all.
    pub fn is_empty(&self) -> bool {
        !self.has_workload() && self.mounts.is_empty() && self.network.is_none()
    }
}

/// Places the guest init at `dest` (0755) and, when the image names a
/// workload or there are mounts, the run config at `/etc/osb/run.json` (0644).
pub fn add_guest_init(tree: &mut Tree, init: &Path, dest: &str, run: Option<&GuestRunConfig>, epoch: i64) -> Result<(), BuildError> {
    let dest = RelPath::parse_user(dest).expect("valid path");
    tree.add_host_path(init, &dest, Some(0o755), epoch)?;
    if let Some(run) = run.filter(|r| !r.is_empty()) {
        let mut json = serde_json::to_vec_pretty(run).expect("serialisable");
        json.push(b'\n');
        tree.add_bytes(&RelPath::parse_user(RUN_CONFIG_PATH).expect("valid path"), json, 0o644, epoch)?;
    }
    Ok(())
}

/// An initrd holding only the guest init (no image), plus any `--add`ed
/// host files: the agent-only guest.
pub fn build_agent_initrd(
    init: &Path,
    adds: &[AddSpec],
    mounts: &[MountSpec],
    network: Option<&serde_json::Value>,
    output: &Path,
    opts: &InitrdOptions,
    progress: &Progress,
) -> Result<InitrdReport, BuildError> {
    if output.is_dir() {
        return Err(BuildError::Usage(format!("output {} is a directory; give a file name", output.display())));
    }
    let mut tree = Tree::new();
    let run = GuestRunConfig::default().with_volumes(mounts, network);
    add_guest_init(&mut tree, init, INITRD_INIT_PATH, Some(&run), opts.source_date_epoch)?;
    for add in adds {
        tree.add_host_path(&add.src, &add.dest, add.mode, opts.source_date_epoch)?;
    }
    let bar = progress.bytes("write", tree.stats().file_bytes);
    let opts = InitrdOptions { completion_marker: true, ..opts.clone() };
    let report = initrd::write_initrd(&tree, output, &opts, &bar)?;
    bar.finish_and_clear();
    Ok(report)
}

#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    pub reference: String,
    pub manifest_digest: Option<Digest>,
    pub config_digest: Option<Digest>,
    pub platform: String,
    pub created: Option<String>,
    pub layers: Vec<LayerInfo>,
}

impl ImageSummary {
    pub fn of(image: &Image) -> Self {
        ImageSummary {
            reference: image.reference.to_string(),
            manifest_digest: image.manifest_digest.clone(),
            config_digest: image.config_digest.clone(),
            platform: image.platform().to_string(),
            created: image.config.created.clone(),
            layers: image.layers.clone(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub entries: u64,
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    pub bytes: u64,
}

impl From<LayerStats> for LayerReport {
    fn from(s: LayerStats) -> Self {
        LayerReport { entries: s.entries, whiteouts: s.whiteouts, opaque_dirs: s.opaque_dirs, bytes: s.bytes_spooled }
    }
}

/// What every build report starts with: the image by digest, the epoch,
/// the layers, the tree and where the output went.
#[derive(Clone, Debug, Serialize)]
pub struct BuildSummary {
    pub image: ImageSummary,
    pub source_date_epoch: i64,
    pub epoch_source: EpochSource,
    pub layers: Vec<LayerReport>,
    pub tree: TreeStatsReport,
    pub output: PathBuf,
    /// What the build let pass but the user should know (`--remove-if-present`
    /// paths that were not there).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl BuildSummary {
    fn new(image: &Image, stats: Vec<LayerStats>, tree: TreeStats, epoch: i64, epoch_source: EpochSource, output: &Path) -> Self {
        BuildSummary {
            image: ImageSummary::of(image),
            source_date_epoch: epoch,
            epoch_source,
            layers: stats.into_iter().map(Into::into).collect(),
            tree: tree.into(),
            output: output.to_path_buf(),
            warnings: Vec::new(),
        }
    }
}

/// What a build did: inputs by digest, outputs by digest, and timings.
#[derive(Clone, Debug, Serialize)]
pub struct InitrdBuildReport {
    #[serde(flatten)]
    pub build: BuildSummary,
    pub compression: String,
    pub initrd: InitrdReport,
    pub seconds: Timings,
}

#[derive(Clone, Debug, Serialize)]
pub struct TreeStatsReport {
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub special: u64,
    pub hard_links: u64,
    pub file_bytes: u64,
}

impl From<TreeStats> for TreeStatsReport {
    fn from(s: TreeStats) -> Self {
        TreeStatsReport {
            entries: s.entries,
            files: s.files,
            dirs: s.dirs,
            symlinks: s.symlinks,
            special: s.special,
            hard_links: s.hard_links,
            file_bytes: s.file_bytes,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub resolve: f64,
    pub layers: f64,
    pub write: f64,
}

/// Resolves the image and builds the guest tree (layers, then removals, then
/// additions), returning it with what the build needs to report (the last
/// element: warnings).
#[allow(clippy::type_complexity)]
pub fn build_tree(
    job: &TreeJob,
    init_path: &str,
    progress: &Progress,
    timings: &mut Timings,
) -> Result<(Image, Tree, Vec<LayerStats>, i64, EpochSource, Vec<String>), BuildError> {
    let t = Instant::now();
    let image = Image::open(&job.image, &job.pull, progress)?;
    timings.resolve = t.elapsed().as_secs_f64();
    let (epoch, epoch_source) = match (job.source_date_epoch, image.config.created_epoch()) {
        (Some(e), _) => (e, EpochSource::Explicit),
        (None, Some(created)) => (created, EpochSource::ImageCreated),
        (None, None) => (0, EpochSource::Zero),
    };
    let t = Instant::now();
    let mut tree = Tree::new();
    let stats = image.apply_layers(&mut tree, &job.intake, job.pull.fetch_jobs, progress)?;
    let warnings = remove_paths(&mut tree, &job.removes)?;
    if let Some(init) = &job.init {
        add_guest_init(&mut tree, init, init_path, Some(&GuestRunConfig::of(&image.config.config).with_volumes(&job.mounts, job.network.as_ref())), epoch)?;
    }
    for add in &job.adds {
        tree.add_host_path(&add.src, &add.dest, add.mode, epoch)?;
    }
    timings.layers = t.elapsed().as_secs_f64();
    Ok((image, tree, stats, epoch, epoch_source, warnings))
}

/// `--remove` and `--remove-if-present`: a `--remove` path that is not in
/// the image is an error (a typo or a path under a symlink the user did not
/// expect would otherwise leave the file in silently); a
/// `--remove-if-present` one is a warning, returned.
fn remove_paths(tree: &mut Tree, removes: &[RemoveSpec]) -> Result<Vec<String>, BuildError> {
    let paths: Vec<&RelPath> = removes.iter().map(|r| &r.path).collect();
    let found = tree.remove_all(&paths);
    let mut warnings = Vec::new();
    for (remove, _) in removes.iter().zip(found).filter(|(_, found)| !found) {
        if !remove.if_present {
            return Err(BuildError::Usage(format!("--remove {}: not in the image; use --remove-if-present for a path that may be missing", remove.path)));
        }
        warnings.push(format!("--remove-if-present {}: not in the image, nothing removed", remove.path));
    }
    Ok(warnings)
}

/// The whole `osbuilder initrd` job.
pub fn build_initrd(job: &InitrdJob, progress: &Progress) -> Result<InitrdBuildReport, BuildError> {
    if job.output.is_dir() {
        return Err(BuildError::Usage(format!("output {} is a directory; give a file name", job.output.display())));
    }
    let mut timings = Timings::default();
    let (image, tree, stats, epoch, epoch_source, warnings) = build_tree(&job.tree, INITRD_INIT_PATH, progress, &mut timings)?;
    let t = Instant::now();
    // Our init checks the marker; an initrd for another init goes without.
    let opts = InitrdOptions { source_date_epoch: epoch, completion_marker: job.tree.init.is_some(), ..job.initrd.clone() };
    // newc adds a 110-byte header plus the name and padding per entry.
    let tree_stats = tree.stats();
    let estimate = tree_stats.file_bytes + tree_stats.entries * 192;
    let bar = progress.bytes(format!("write {:?}", job.initrd.compression.kind).to_lowercase(), estimate);
    let report = initrd::write_initrd(&tree, &job.output, &opts, &bar)?;
    bar.finish_and_clear();
    timings.write = t.elapsed().as_secs_f64();
    Ok(InitrdBuildReport {
        build: BuildSummary { warnings, ..BuildSummary::new(&image, stats, tree_stats, epoch, epoch_source, &job.output) },
        compression: format!("{:?}", job.initrd.compression.kind).to_lowercase(),
        initrd: report,
        seconds: timings,
    })
}

/// Everything that shapes one disk build.
#[derive(Clone, Debug)]
pub struct DiskJob {
    pub tree: TreeJob,
    pub output: PathBuf,
    pub fs: FsKind,
    /// erofs only.
    pub compression: Compression,
    pub table: TableKind,
    pub dax: bool,
    pub size: Ext4Size,
    pub reserved_percent: f64,
    pub label: Option<String>,
    pub journal: bool,
    /// The file format (not part of the seed: a raw and a qcow2 build of the
    /// same inputs hold the same disk).
    pub format: DiskFormat,
    pub qcow2_compress: bool,
    /// A dm-verity hash tree in partition 2 (read-only root on /dev/dm-0).
    pub verity: bool,
}

/// What a disk build did.
#[derive(Clone, Debug, Serialize)]
pub struct DiskBuildReport {
    #[serde(flatten)]
    pub build: BuildSummary,
    pub disk: DiskReport,
    /// The kernel arguments for each way to boot the disk (also in `disk`).
    pub cmdline: Cmdline,
    pub seconds: Timings,
}

/// The seed every identifier on a disk comes from: a hash of what the disk
/// is made of (the image by digest, the epoch, the additions by name and
/// size, the layout options), so the same inputs give the same UUIDs.
fn disk_seed(job: &DiskJob, image: &Image, epoch: i64) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(b"osbuilder disk seed v1");
    field(image.manifest_digest.as_ref().map(|d| d.to_string()).unwrap_or_default().as_bytes());
    field(image.config_digest.as_ref().map(|d| d.to_string()).unwrap_or_default().as_bytes());
    for layer in &image.layers {
        field(layer.digest.as_ref().or(layer.diff_id.as_ref()).map(|d| d.to_string()).unwrap_or_default().as_bytes());
    }
    field(&epoch.to_le_bytes());
    for add in &job.tree.adds {
        field(&add.dest.to_bytes());
        field(&std::fs::metadata(&add.src).map(|m| m.len()).unwrap_or(0).to_le_bytes());
    }
    for remove in &job.tree.removes {
        field(&remove.path.to_bytes());
    }
    field(format!("{:?} {:?} {} {:?} {} {:?} {}", job.fs, job.table, job.dax, job.size, job.reserved_percent, job.label, job.journal).as_bytes());
    if job.compression != Compression::None {
        field(format!("{:?}", job.compression).as_bytes());
    }
    field(&[job.tree.init.is_some() as u8]);
    if job.verity {
        // Only when set, so disks without verity keep their identifiers.
        field(b"verity");
    }
    h.finalize().into()
}

/// The whole `osbuilder disk` job.
pub fn build_disk(job: &DiskJob, progress: &Progress) -> Result<DiskBuildReport, BuildError> {
    if job.qcow2_compress && job.format != DiskFormat::Qcow2 {
        return Err(BuildError::Usage("--qcow2-compress needs --format qcow2".into()));
    }
    if job.dax && job.format == DiskFormat::Qcow2 {
        return Err(BuildError::Usage("--dax makes a disk for an NVDIMM, which maps the file as it is: it must be raw (--format raw), not qcow2".into()));
    }
    check_output_dir(&job.output)?;
    if job.output.is_dir() {
        return Err(BuildError::Usage(format!("output {} is a directory; give a file name", job.output.display())));
    }
    let mut timings = Timings::default();
    let (image, tree, stats, epoch, epoch_source, warnings) = build_tree(&job.tree, DISK_INIT_PATH, progress, &mut timings)?;
    let t = Instant::now();
    let plan = Plan::new(&tree).map_err(|e| BuildError::Disk(e.into()))?;
    let opts = DiskOptions {
        fs: job.fs,
        compression: job.compression,
        table: job.table,
        dax: job.dax,
        size: job.size,
        reserved_percent: job.reserved_percent,
        label: job.label.clone(),
        journal: job.journal,
        source_date_epoch: epoch,
        seed: disk_seed(job, &image, epoch),
        init_path: job.tree.init.as_ref().map(|_| DISK_INIT_PATH.to_string()),
        format: job.format,
        qcow2_compress: job.qcow2_compress,
        verity: job.verity,
    };
    let disk = disk::image::write_disk(&plan, &opts, &job.output)?;
    timings.write = t.elapsed().as_secs_f64();
    Ok(DiskBuildReport {
        build: BuildSummary { warnings, ..BuildSummary::new(&image, stats, tree.stats(), epoch, epoch_source, &job.output) },
        cmdline: disk.cmdline.clone(),
        disk,
        seconds: timings,
    })
}

/// Parses a memory size: `512M`, `2G`, `1048576K`; a bare number is MiB, as in QEMU's `-m`.
pub fn parse_mem_size(s: &str) -> Result<u64, String> {
    parse_size(s, 20).ok_or_else(|| format!("memory size {:?} is not like 512M or 2G", s.trim()))
}

/// Parses a disk size: `512M`, `2G`, `1T`, `64K`; a bare number is bytes.
pub fn parse_disk_size(s: &str) -> Result<u64, String> {
    parse_size(s, 0).ok_or_else(|| format!("size {:?} is not like 512M, 2G or a number of bytes", s.trim()))
}

/// A number with an optional binary K/M/G/T suffix; `bare_shift` scales a
/// number without one. `None` when malformed or out of range.
fn parse_size(s: &str, bare_shift: u32) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, bare_shift),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_shl(shift).filter(|v| v >> shift == n))
}

/// Checks `path` can be written as an output (its directory exists).
pub fn check_output_dir(path: &Path) -> Result<(), BuildError> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(BuildError::Usage(format!("output directory {} does not exist", dir.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_specs() {
        let a: AddSpec = "target/init:/sbin/init:0755".parse().unwrap();
        assert_eq!((a.src.to_str().unwrap(), a.dest.to_bytes(), a.mode), ("target/init", b"sbin/init".to_vec(), Some(0o755)));
        let b: AddSpec = "conf:/etc/agent.toml".parse().unwrap();
        assert_eq!(b.mode, None);
        assert!("justsrc".parse::<AddSpec>().is_err());
        assert!("a:/b:999".parse::<AddSpec>().is_err());
        assert!("a:/../b".parse::<AddSpec>().is_err());
    }

    #[test]
    fn mem_sizes() {
        assert_eq!(parse_mem_size("512M"), Ok(512 << 20));
        assert_eq!(parse_mem_size("2G"), Ok(2 << 30));
        assert_eq!(parse_mem_size("2048"), Ok(2048 << 20));
        assert!(parse_mem_size("lots").is_err());
        assert!(parse_mem_size("99999999999999G").is_err());
        assert_eq!(parse_disk_size("4096"), Ok(4096));
        assert_eq!(parse_disk_size("1T"), Ok(1 << 40));
        assert!(parse_disk_size("1.5G").is_err());
    }
}
