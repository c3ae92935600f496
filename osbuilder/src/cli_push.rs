//! `osbuilder push ...`: publish a disk, a kernel + initrd or a whole build
//! to an OCI registry. Progress and a summary go to stderr; the last (only)
//! line on stdout is the pushed reference with its digest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use osbuilder::oci::cache::BlobCache;
use osbuilder::oci::digest::Digest;
use osbuilder::oci::manifest::Platform;
use osbuilder::progress::Progress;
use osbuilder::publish::image::{self, BundleFile, DiskFileFormat, DiskInput, FileRole, ImageOptions, ManifestFormat};
use osbuilder::publish::{self, ClientOptions, LayerCompression, PushOptions, PushReport, Target};

#[derive(Subcommand)]
pub enum PushCommand {
    /// A KubeVirt containerDisk: `disk/` holding one disk file (qcow2 unless
    /// --disk-format raw), owned 107:107. Several disks (PLATFORM=PATH) give
    /// an index.
    #[command(name = "containerdisk")]
    ContainerDisk(ContainerDiskArgs),
    /// A kernel-boot image for KubeVirt's kernelBoot.container: the kernel at
    /// /boot/vmlinuz and the initrd at /boot/initrd.img, owned 107:107.
    KernelBoot(KernelBootArgs),
    /// The whole build as an OCI 1.1 artifact: one layer per file (the
    /// output the build report names, the report, kernel, initrd, launch.json).
    Bundle(BundleArgs),
}

#[derive(Args)]
pub struct ContainerDiskArgs {
    /// The disk (raw or qcow2), or several as PLATFORM=PATH (linux/arm64=disk.qcow2),
    /// then the reference to push to: HOST[:PORT]/REPO[:TAG|@DIGEST].
    #[arg(required = true, num_args = 2.., value_name = "DISK... REF")]
    args: Vec<String>,
    /// The disk file in the image: qcow2 (a raw disk is converted; layers carry no holes) or raw as given.
    #[arg(long, value_enum, default_value = "qcow2")]
    disk_format: DiskFileFormat,
    /// Also carry this kernel at /boot/vmlinuz (KubeVirt kernelBoot from the same image).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// And this initrd at /boot/initrd.img (needs --kernel).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// The disk's build report (`osbuilder disk --report`): checked against the
    /// disk, its digest, source image and kernel arguments become annotations.
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    layout: LayoutArgs,
    #[command(flatten)]
    wire: WireArgs,
}

#[derive(Args)]
pub struct KernelBootArgs {
    /// HOST[:PORT]/REPO[:TAG|@DIGEST]
    reference: String,
    #[arg(long)]
    kernel: PathBuf,
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The platform of the kernel.
    #[arg(long, default_value = "linux/amd64", value_parser = Platform::parse)]
    platform: Platform,
    #[command(flatten)]
    layout: LayoutArgs,
    #[command(flatten)]
    wire: WireArgs,
}

#[derive(Args)]
pub struct BundleArgs {
    /// HOST[:PORT]/REPO[:TAG|@DIGEST]
    reference: String,
    /// The build report (`osbuilder disk|initrd --report`); the output it names is pushed with it.
    #[arg(long)]
    report: PathBuf,
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initrd to add (a disk build's report names only the disk).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Any other file, as PATH or PATH=MEDIATYPE (repeatable).
    #[arg(long = "file")]
    files: Vec<String>,
    #[command(flatten)]
    layout: LayoutArgs,
    #[command(flatten)]
    wire: WireArgs,
}

#[derive(Args)]
pub struct LayoutArgs {
    /// Manifest format: OCI, or Docker v2 schema 2.
    #[arg(long, value_enum, default_value = "oci")]
    manifest_format: ManifestFormat,
    /// Layer compression [default: zstd for OCI, gzip for v2s2]. `none` keeps
    /// the disk at a fixed, annotated offset of the blob (readable with range requests).
    #[arg(long, value_enum)]
    layer_compression: Option<LayerCompression>,
    /// An annotation on the manifest, KEY=VALUE (repeatable).
    #[arg(long = "annotation", value_name = "KEY=VALUE")]
    annotations: Vec<String>,
    /// The `created` time and every mtime (default: the build report's, else none).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: Option<i64>,
}

#[derive(Args)]
pub struct WireArgs {
    /// Credentials, plain HTTP, and the blob cache (compressed layers are spooled there).
    #[command(flatten)]
    registry: crate::RegistryArgs,
    /// MiB per upload request.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    chunk_mib: u64,
    /// Retries of a failed request, or of an upload that makes no progress.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds a request may wait for an answer (a request with a body gets
    /// more: its size at 256 KiB/s).
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// A repository of the same registry to mount blobs from (repeatable;
    /// repositories we pushed to before are tried too).
    #[arg(long)]
    mount_from: Vec<String>,
    /// Pull the manifest and every layer back and check them.
    #[arg(long)]
    verify: bool,
    /// Write what the push did (blobs sent, skipped, mounted; retries, resumes) as JSON here.
    #[arg(long)]
    push_report: Option<PathBuf>,
}

impl WireArgs {
    fn options(&self) -> PushOptions {
        PushOptions {
            client: ClientOptions {
                chunk_size: self.chunk_mib << 20,
                retries: self.retries,
                timeout: Duration::from_secs(self.timeout.max(1)),
                insecure: self.registry.insecure,
                ..ClientOptions::default()
            },
            credentials: self.registry.creds.clone(),
            mount_from: self.mount_from.clone(),
            verify: self.verify,
            cache: self.registry.cache(),
        }
    }
}

impl LayoutArgs {
    fn options(&self, cache: &BlobCache, epoch_from_report: Option<i64>, mut annotations: BTreeMap<String, String>) -> anyhow::Result<ImageOptions> {
        for a in &self.annotations {
            let (k, v) = a.split_once('=').with_context(|| format!("--annotation {a:?} is not KEY=VALUE"))?;
            if k.is_empty() {
                bail!("--annotation {a:?} has an empty key");
            }
            annotations.insert(k.to_string(), v.to_string());
        }
        let compression = self.layer_compression.unwrap_or(match self.manifest_format {
            ManifestFormat::Oci => LayerCompression::Zstd,
            ManifestFormat::V2s2 => LayerCompression::Gzip,
        });
        if self.manifest_format == ManifestFormat::V2s2 && !annotations.is_empty() {
            eprintln!("osbuilder: warning: Docker v2 schema 2 has no annotations; {} are left out (use the OCI format to keep them)", annotations.len());
        }
        if self.manifest_format == ManifestFormat::V2s2 && compression == LayerCompression::None {
            eprintln!("osbuilder: warning: with v2s2 the disk's offset in the uncompressed layer is not recorded (no annotations)");
        }
        Ok(ImageOptions {
            manifest_format: self.manifest_format,
            compression,
            epoch: self.source_date_epoch.or(epoch_from_report),
            annotations,
            cache: cache.clone(),
        })
    }
}

/// The annotation naming the build report: the sha256 of its canonical JSON
/// without the timings and the output path, which differ between builds of
/// the same bytes (so the same disk keeps its manifest digest).
const REPORT_DIGEST: &str = "dev.osbuilder.report.digest";

fn report_digest(json: &serde_json::Value) -> Digest {
    fn strip(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                map.retain(|k, _| k != "seconds" && k != "hash_seconds");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v = json.clone();
    if let Some(map) = v.as_object_mut() {
        map.remove("output");
    }
    strip(&mut v);
    // serde_json's maps are sorted: this is a canonical form.
    Digest::of_bytes(&serde_json::to_vec(&v).expect("serializable"))
}

/// What a build report tells a push.
struct ReportFacts {
    json: serde_json::Value,
    annotations: BTreeMap<String, String>,
    epoch: Option<i64>,
}

fn read_report(path: &Path) -> anyhow::Result<ReportFacts> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read the build report {}", path.display()))?;
    if bytes.len() > 16 << 20 {
        bail!("{} is over 16 MiB; is it a build report?", path.display());
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes).with_context(|| format!("{} is not a JSON build report", path.display()))?;
    if !json.get("output").is_some_and(|o| o.is_string()) {
        bail!("{} is not an osbuilder build report (no \"output\")", path.display());
    }
    let mut a = BTreeMap::new();
    a.insert(REPORT_DIGEST.to_string(), report_digest(&json).to_string());
    let image = &json["image"];
    if let Some(r) = image["reference"].as_str() {
        a.insert("dev.osbuilder.source.image".into(), r.into());
    }
    if let Some(d) = image["manifest_digest"].as_str() {
        a.insert("dev.osbuilder.source.digest".into(), d.into());
    }
    if let Some(cmdline) = json["cmdline"].as_object() {
        for (device, args) in cmdline {
            if let Some(args) = args.as_str() {
                a.insert(format!("dev.osbuilder.cmdline.{device}"), args.into());
            }
        }
    }
    Ok(ReportFacts { epoch: json["source_date_epoch"].as_i64(), json, annotations: a })
}

/// The report's output file: as recorded, else beside the report.
fn report_output(report: &Path, facts: &ReportFacts) -> anyhow::Result<PathBuf> {
    let recorded = PathBuf::from(facts.json["output"].as_str().unwrap_or_default());
    let beside = report.parent().unwrap_or(Path::new(".")).join(recorded.file_name().unwrap_or_default());
    // The sha256 check that follows catches a file that is not the one described.
    for candidate in [beside, recorded.clone()] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!("the build report {} names {}, which is not there (nor beside the report)", report.display(), recorded.display())
}

pub fn run(cmd: PushCommand, progress: &Progress) -> anyhow::Result<()> {
    match cmd {
        PushCommand::ContainerDisk(a) => containerdisk(a, progress),
        PushCommand::KernelBoot(a) => kernel_boot(a, progress),
        PushCommand::Bundle(a) => bundle(a, progress),
    }
}

fn containerdisk(a: ContainerDiskArgs, progress: &Progress) -> anyhow::Result<()> {
    let (reference, disks) = a.args.split_last().expect("clap requires two");
    let target = Target::parse(reference)?;
    let mut inputs = Vec::new();
    for d in disks {
        let input = match d.split_once('=') {
            Some((platform, path)) if platform.contains('/') => {
                DiskInput { platform: Platform::parse(platform).map_err(anyhow::Error::msg)?, path: path.into(), expect_sha256: None }
            }
            _ => DiskInput { platform: Platform::linux_amd64(), path: d.into(), expect_sha256: None },
        };
        inputs.push(input);
    }
    let wire = a.wire.options();
    let mut annotations = BTreeMap::new();
    let mut epoch = None;
    if let Some(report) = &a.report {
        if inputs.len() != 1 {
            bail!("--report describes one disk; give one disk with it");
        }
        let facts = read_report(report)?;
        // The image's platform, unless the disk was given as PLATFORM=PATH.
        if !disks[0].contains('=') {
            if let Some(p) = facts.json["image"]["platform"].as_str() {
                inputs[0].platform = Platform::parse(p).map_err(anyhow::Error::msg)?;
            }
        }
        let want = facts.json["disk"]["sha256"].as_str().with_context(|| format!("{} is not a disk build report", report.display()))?;
        inputs[0].expect_sha256 = Some(want.to_string());
        annotations = facts.annotations;
        epoch = facts.epoch;
    }
    if let Some(k) = &a.kernel {
        annotations.insert("dev.osbuilder.kernel.sha256".into(), file_digest(k)?.to_string());
    }
    let opts = a.layout.options(&wire.cache, epoch, annotations)?;
    let boot = a.kernel.as_deref().map(|k| (k, a.initrd.as_deref()));
    let publication = image::containerdisk(&inputs, a.disk_format, boot, &opts, progress)?;
    finish(&publication, &target, &wire, a.wire.push_report.as_deref(), progress)
}

fn kernel_boot(a: KernelBootArgs, progress: &Progress) -> anyhow::Result<()> {
    let target = Target::parse(&a.reference)?;
    let wire = a.wire.options();
    let mut annotations = BTreeMap::new();
    annotations.insert("dev.osbuilder.kernel.sha256".into(), file_digest(&a.kernel)?.to_string());
    let opts = a.layout.options(&wire.cache, None, annotations)?;
    let publication = image::kernel_boot(&a.platform, &a.kernel, a.initrd.as_deref(), &opts, progress)?;
    finish(&publication, &target, &wire, a.wire.push_report.as_deref(), progress)
}

fn bundle(a: BundleArgs, progress: &Progress) -> anyhow::Result<()> {
    let target = Target::parse(&a.reference)?;
    let wire = a.wire.options();
    let facts = read_report(&a.report)?;
    let output = report_output(&a.report, &facts)?;
    let is_disk = facts.json.get("disk").is_some();
    let want = if is_disk { facts.json["disk"]["sha256"].as_str() } else { facts.json["initrd"]["sha256"].as_str() };
    let want = want.with_context(|| format!("{} names no sha256 for its output", a.report.display()))?;
    let got = file_digest(&output)?;
    if want != got.hex() {
        bail!("{} is not the output {} describes (sha256 {want} there, {} here)", output.display(), a.report.display(), got.hex());
    }
    let mut files = vec![BundleFile::new(&output, if is_disk { FileRole::Disk } else { FileRole::Initrd })?, BundleFile::new(&a.report, FileRole::Report)?];
    if let Some(k) = &a.kernel {
        files.push(BundleFile::new(k, FileRole::Kernel)?);
    }
    if let Some(i) = &a.initrd {
        files.push(BundleFile::new(i, FileRole::Initrd)?);
    }
    for f in &a.files {
        let (path, media_type) = match f.rsplit_once('=') {
            Some((p, t)) if t.contains('/') => (PathBuf::from(p), Some(t.to_string())),
            _ => (PathBuf::from(f), None),
        };
        files.push(BundleFile::new(&path, FileRole::Other(media_type))?);
    }
    // launch.json: which file is which and the kernel arguments per device.
    let title = |role: &str| files.iter().find(|f| f.media_type.contains(role)).map(|f| f.title.clone());
    let launch = serde_json::json!({
        "kernel": title(".kernel."),
        "initrd": title(".initrd."),
        "disk": title(".disk."),
        "cmdline": facts.json.get("cmdline").cloned().unwrap_or(serde_json::Value::Null),
        "kernel_verity_params": facts.json["disk"]["verity"]["kernel_verity_params"].clone(),
    });
    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let launch_path = dir.path().join("launch.json");
    std::fs::write(&launch_path, serde_json::to_vec_pretty(&launch)?)?;
    files.push(BundleFile::new(&launch_path, FileRole::Launch)?);
    let opts = a.layout.options(&wire.cache, facts.epoch, facts.annotations.clone())?;
    let publication = image::bundle(&files, &opts)?;
    finish(&publication, &target, &wire, a.wire.push_report.as_deref(), progress)
}

fn file_digest(p: &Path) -> anyhow::Result<Digest> {
    let len = std::fs::metadata(p).with_context(|| format!("{}", p.display()))?.len();
    Digest::of_file_range(p, 0, len).with_context(|| format!("reading {}", p.display()))
}

fn finish(publication: &publish::Publication, target: &Target, wire: &PushOptions, push_report: Option<&Path>, progress: &Progress) -> anyhow::Result<()> {
    let report: PushReport = publish::push(publication, target, wire, progress).with_context(|| format!("pushing to {}/{}", target.registry, target.repo))?;
    let (mut sent, mut present, mut mounted) = (0u64, 0, 0);
    for b in &report.blobs {
        match &b.outcome {
            publish::BlobOutcome::Uploaded { bytes } => sent += bytes,
            publish::BlobOutcome::Present => present += 1,
            publish::BlobOutcome::Mounted { .. } => mounted += 1,
        }
    }
    eprintln!(
        "pushed {} blobs ({} bytes of blobs uploaded, {present} already there, {mounted} mounted), {} retries, {} resumes{}",
        report.blobs.len(),
        sent,
        report.wire.retries,
        report.wire.resumes,
        if report.verified { "; verified by pulling back" } else { "" }
    );
    if let Some(path) = push_report {
        osbuilder::output::write_file(path, &serde_json::to_vec_pretty(&report)?).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", report.pushed);
    Ok(())
}
