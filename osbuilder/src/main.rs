//! `osbuilder`: a thin command line over the library. Parse, call, report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use osbuilder::compress::{CompressOptions, Compression};
use osbuilder::disk::erofs::Compression as ErofsCompression;
use osbuilder::disk::ext4::{Ext4Size, Headroom};
use osbuilder::disk::image::{DiskFormat, FsKind};
use osbuilder::disk::layout::TableKind;
use osbuilder::initrd::InitrdOptions;
use osbuilder::oci::cache::BlobCache;
use osbuilder::oci::manifest::Platform;
use osbuilder::oci::{Image, ImageRef, PullOptions};
use osbuilder::pipeline::{self, AddSpec, DiskJob, ImageSummary, InitrdJob, RemoveSpec, TreeJob};
use osbuilder::progress::Progress;
use osbuilder::rootfs::{Intake, Limits, RelPath};

mod cli_push;
mod cli_vm;

#[derive(Parser)]
#[command(name = "osbuilder", version, about = "Build micro-VM guest artifacts from OCI images", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Turn an image into an initrd (cpio newc, optionally compressed).
    Initrd(InitrdArgs),
    /// Turn an image into a bootable disk image (ext4; MBR, GPT or none; Kata's DAX layout).
    Disk(DiskArgs),
    /// Make a cloud-init NoCloud seed: a FAT volume labelled `cidata`.
    Cidata(CidataArgs),
    /// Build a guest kernel from a pinned source, patches and config fragments.
    Kernel(KernelArgs),
    /// Boot a guest and talk to its agent.
    #[command(subcommand)]
    Vm(cli_vm::VmCommand),
    /// Push a disk (KubeVirt containerDisk), a kernel + initrd (kernel-boot)
    /// or a whole build (OCI artifact) to a registry.
    #[command(subcommand)]
    Push(cli_push::PushCommand),
    /// Show an image's manifest, config, layers and platform.
    Inspect {
        /// docker://HOST/REPO:TAG, HOST/REPO:TAG, oci:DIR[:REF] or docker-archive:FILE
        image: ImageRef,
        #[command(flatten)]
        pull: PullArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct PullArgs {
    /// Platform to pick from a multi-arch index.
    #[arg(long, default_value = "linux/amd64", value_parser = Platform::parse)]
    platform: Platform,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Retries of a failed registry request or blob transfer (a transfer
    /// cut short resumes at the byte it reached).
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Seconds a registry may leave a request without an answer or a
    /// transfer without a byte.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
}

/// How to reach a registry and where blobs are kept: pulls and pushes alike.
#[derive(Args)]
pub(crate) struct RegistryArgs {
    /// Registry credentials USER:PASSWORD (also: OSBUILDER_REGISTRY_USER/PASSWORD, ~/.docker/config.json).
    #[arg(long, env = "OSBUILDER_REGISTRY_CREDS", hide_env_values = true)]
    pub(crate) creds: Option<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    #[arg(long)]
    pub(crate) insecure: bool,
    /// Blob cache directory [default: $XDG_CACHE_HOME/osbuilder].
    #[arg(long, env = "OSBUILDER_CACHE")]
    pub(crate) cache_dir: Option<PathBuf>,
}

impl RegistryArgs {
    pub(crate) fn cache(&self) -> BlobCache {
        BlobCache::new(self.cache_dir.clone().unwrap_or_else(BlobCache::default_dir))
    }
}

impl PullArgs {
    fn options(&self) -> PullOptions {
        PullOptions {
            platform: self.platform.clone(),
            cache: self.registry.cache(),
            credentials: self.registry.creds.clone(),
            insecure: self.registry.insecure,
            retries: self.retries,
            timeout: std::time::Duration::from_secs(self.timeout.max(1)),
            ..PullOptions::default()
        }
    }
}

#[derive(Args)]
struct KernelArgs {
    /// Kernel series (MAJOR.MINOR) from kernel-config/versions.toml [default: the first].
    #[arg(long)]
    series: Option<String>,
    /// Feature fragments, comma-separated [default: kernel-config/default-features].
    #[arg(long, value_delimiter = ',')]
    features: Option<Vec<String>>,
    /// Source: a tarball, an extracted tree, or a pinned URL [default: the series' Debian package].
    #[arg(long)]
    source: Option<osbuilder::kernel::SourceSpec>,
    /// Output directory for vmlinux-*, vmlinuz-*, config-*, System.map-* and the manifest.
    #[arg(long, short, default_value = "target/kernel")]
    output: PathBuf,
    /// The kernel-config directory.
    #[arg(long, default_value = "kernel-config")]
    config_dir: PathBuf,
    /// The patches directory.
    #[arg(long, default_value = "patches")]
    patches_dir: PathBuf,
    /// Parallel make jobs (0: all cores).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Cache for sources, builds and artifacts [default: $XDG_CACHE_HOME/osbuilder].
    #[arg(long, env = "OSBUILDER_CACHE")]
    cache_dir: Option<PathBuf>,
    /// KBUILD_BUILD_TIMESTAMP as seconds since the epoch (default 0).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: Option<i64>,
}

#[derive(Args)]
struct InitrdArgs {
    /// The image: docker://HOST/REPO:TAG, HOST/REPO:TAG, oci:DIR[:REF] or docker-archive:FILE
    #[arg(long, required_unless_present = "agent_only")]
    image: Option<ImageRef>,
    /// The guest init (a static `osb-init`): placed at /init, with the
    /// image's Entrypoint/Cmd/Env/WorkingDir/User at /etc/osb/run.json and
    /// /.osb/initrd-complete as the archive's last entry (init checks it).
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    /// No image: an initrd holding only --init (the agent-only guest).
    #[arg(long, requires = "init", conflicts_with = "image")]
    agent_only: bool,
    /// Output file.
    #[arg(long, short)]
    output: PathBuf,
    /// Compression of the archive.
    #[arg(long, default_value = "gzip")]
    compress: Compression,
    /// Compression level (gzip 1-9, default 9; zstd 1-19, default 3).
    #[arg(long)]
    level: Option<u32>,
    /// Compression threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Memory of the target guest (e.g. 512M, 2G): warn when the unpacked tree
    /// does not fit its rootfs (a tmpfs of half the RAM the kernel leaves).
    #[arg(long, default_value = "2G", value_parser = pipeline::parse_mem_size)]
    guest_mem: u64,
    #[command(flatten)]
    tree: TreeArgs,
}

#[derive(Args)]
struct DiskArgs {
    /// The image: docker://HOST/REPO:TAG, HOST/REPO:TAG, oci:DIR[:REF] or docker-archive:FILE
    #[arg(long)]
    image: ImageRef,
    /// Output file (the disk image, in --format).
    #[arg(long, short)]
    output: PathBuf,
    /// File format: raw (sparse) or qcow2 (version 3, 64 KiB clusters, only
    /// clusters holding data allocated; not with --dax).
    #[arg(long, default_value = "raw")]
    format: DiskFormat,
    /// qcow2: deflate-compress every cluster that shrinks (what
    /// `qemu-img convert -c` makes; smaller, slower to read).
    #[arg(long)]
    qcow2_compress: bool,
    /// Filesystem.
    #[arg(long, default_value = "ext4")]
    fs: FsKind,
    /// erofs compression: none, lz4, or lz4hc (smaller, slower to build;
    /// what Kata's image builder uses). Compressed files cannot use DAX.
    #[arg(long, default_value = "none")]
    compress: ErofsCompression,
    /// Partition table: none (the filesystem is the whole disk, Firecracker's
    /// root=/dev/vda), mbr (Kata's), gpt (Discoverable Partitions root type).
    #[arg(long, default_value = "mbr")]
    table: TableArg,
    /// Kata's DAX/NVDIMM layout (MBR): PFN info block at 4 KiB, filesystem at
    /// 3 MiB, booted as /dev/pmem0p1 with DAX or /dev/vda1.
    #[arg(long)]
    dax: bool,
    /// Filesystem size: auto (content + metadata + --headroom) or a size
    /// such as 512M or 2G (a bare number is bytes).
    #[arg(long, default_value = "auto")]
    size: String,
    /// Free space added to an auto-sized ext4: a size (64M) or a
    /// percentage of what the content and metadata take [default: 10%].
    /// erofs is read-only and sized to its content.
    #[arg(long)]
    headroom: Option<String>,
    /// Blocks reserved for root, in percent. Default 0: the headroom is the
    /// free space asked for, and reserving part of it would hide it from a
    /// workload that does not run as root (mke2fs reserves 5%, Kata 3%).
    #[arg(long, default_value_t = 0.0)]
    reserved_percent: f64,
    /// Filesystem label (at most 16 bytes for ext4, 15 for erofs).
    #[arg(long)]
    label: Option<String>,
    /// No journal (a read-only root does not need one).
    #[arg(long)]
    no_journal: bool,
    /// Measured root: a dm-verity hash tree (sha256, 4 KiB blocks, salt
    /// derived from the inputs) over the filesystem in partition 2; the
    /// kernel arguments mount /dev/dm-0 read-only. Needs --table mbr or gpt.
    #[arg(long)]
    verity: bool,
    /// The guest init (a static `osb-init`): placed at /.osb/init (not over
    /// the image's own /sbin/init; the cmdline says init=/.osb/init), with the
    /// image's workload at /etc/osb/run.json.
    #[arg(long, value_name = "PATH")]
    init: Option<PathBuf>,
    #[command(flatten)]
    tree: TreeArgs,
}

#[derive(Args)]
struct CidataArgs {
    /// Output file (the seed: a raw FAT12/FAT16 volume, no partition table).
    #[arg(long, short)]
    output: PathBuf,
    /// The user-data file (#cloud-config, a script, ...).
    #[arg(long, value_name = "FILE")]
    user_data: PathBuf,
    /// The meta-data file (or --instance-id to generate one).
    #[arg(long, value_name = "FILE", required_unless_present = "instance_id", conflicts_with = "instance_id")]
    meta_data: Option<PathBuf>,
    /// The network-config file (netplan-style version 1 or 2).
    #[arg(long, value_name = "FILE")]
    network_config: Option<PathBuf>,
    /// The vendor-data file.
    #[arg(long, value_name = "FILE")]
    vendor_data: Option<PathBuf>,
    /// Generate the meta-data: `instance-id: ID` (instead of --meta-data).
    #[arg(long, value_name = "ID")]
    instance_id: Option<String>,
    /// With --instance-id: `local-hostname: NAME` in the generated meta-data.
    // `conflicts_with` is spelled out: clap does not enforce `requires` when
    // the required argument conflicts with one that is given.
    #[arg(long, value_name = "NAME", requires = "instance_id", conflicts_with = "meta_data")]
    hostname: Option<String>,
    /// Volume size: auto (the files, a quarter of their size and at least
    /// 64 KiB free, in steps of 64 KiB) or a size such as 1M (a multiple of 512).
    #[arg(long, default_value = "auto")]
    size: String,
    /// Every file's timestamps, UTC, clamped to FAT's 1980..2107 [default: 1980-01-01 00:00:00].
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: Option<i64>,
}

/// The options that shape the guest tree, shared by `initrd` and `disk`.
#[derive(Args)]
struct TreeArgs {
    /// Add a host file or directory: SRC:DEST[:MODE] (repeatable).
    #[arg(long, value_name = "SRC:DEST[:MODE]")]
    add: Vec<AddSpec>,
    /// Remove a path from the image (repeatable); symlinked parents are
    /// followed inside the image (/bin/ls is /usr/bin/ls when /bin -> usr/bin).
    /// A path that is not there is an error.
    #[arg(long, value_name = "PATH", value_parser = |s: &str| RelPath::parse_user(s).map_err(|e| e.to_string()))]
    remove: Vec<RelPath>,
    /// Like --remove, but a path that is not there is only a warning (repeatable).
    #[arg(long, value_name = "PATH", value_parser = |s: &str| RelPath::parse_user(s).map_err(|e| e.to_string()))]
    remove_if_present: Vec<RelPath>,
    /// A volume for the guest init to mount at boot, written into
    /// /etc/osb/run.json (repeatable; needs --init): an fstab-style line,
    /// "SOURCE TARGET [TYPE [OPTIONS]]", e.g. "LABEL=data /data ext4 noatime"
    /// (see init/README.md: sources, types, nofail, x-osb.wait=...).
    #[arg(long, value_name = "SPEC", requires = "init", value_parser = pipeline::parse_mount_arg)]
    mount: Vec<osb_agent::volume::MountSpec>,
    /// The guest's network for the guest init, written into /etc/osb/run.json
    /// as `network` (needs --init): a JSON file holding an object with
    /// `interfaces`, `routes`, `dns`, `hosts` (see init/README.md).
    #[arg(long, value_name = "FILE", requires = "init", value_parser = pipeline::parse_network_arg)]
    network: Option<serde_json::Value>,
    /// Clamp every mtime to this (default: the image's `created`, else 0).
    #[arg(long, env = "SOURCE_DATE_EPOCH")]
    source_date_epoch: Option<i64>,
    /// Write a JSON build report here.
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    pull: PullArgs,
    #[command(flatten)]
    intake: IntakeArgs,
}

/// Limits on what an image's layers may make the build hold, and where
/// their file data is spooled. A layer over a limit is refused naming it.
#[derive(Args)]
struct IntakeArgs {
    /// Most file data all layers may hold together (sparse files at their full size).
    #[arg(long, value_name = "SIZE", default_value = "64G", value_parser = pipeline::parse_disk_size)]
    max_spool_bytes: u64,
    /// Most entries all layers may hold together.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_entries)]
    max_entries: u64,
    /// Most bytes of names, link targets and PAX records (xattrs) all layers may hold together.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = pipeline::parse_disk_size)]
    max_metadata_bytes: u64,
    /// Most directories above an entry.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_path_depth)]
    max_path_depth: usize,
    /// Largest header record (PAX header, GNU long name or link, sparse map).
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = pipeline::parse_disk_size)]
    max_header_bytes: u64,
    /// Most uncompressed bytes per compressed byte of a layer (past its first 64 MiB).
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_ratio, value_parser = clap::value_parser!(u64).range(1..))]
    max_ratio: u64,
    /// Where layer file data is spooled [default: $TMPDIR, else /tmp unless it is a tmpfs, else /var/tmp].
    #[arg(long, value_name = "DIR", env = "OSBUILDER_TMP_DIR")]
    tmp_dir: Option<PathBuf>,
}

impl IntakeArgs {
    fn intake(&self) -> Intake {
        Intake {
            limits: Limits {
                max_spool_bytes: self.max_spool_bytes,
                max_entries: self.max_entries,
                max_metadata_bytes: self.max_metadata_bytes,
                max_path_depth: self.max_path_depth,
                max_header_bytes: self.max_header_bytes,
                max_ratio: self.max_ratio,
            },
            spool_dir: self.tmp_dir.clone(),
        }
    }
}

impl TreeArgs {
    fn job(&self, image: ImageRef, init: Option<PathBuf>) -> TreeJob {
        TreeJob {
            image,
            pull: self.pull.options(),
            source_date_epoch: self.source_date_epoch,
            adds: self.add.clone(),
            removes: (self.remove.iter().map(|path| RemoveSpec { path: path.clone(), if_present: false }))
                .chain(self.remove_if_present.iter().map(|path| RemoveSpec { path: path.clone(), if_present: true }))
                .collect(),
            intake: self.intake.intake(),
            init,
            mounts: self.mount.clone(),
            network: self.network.clone(),
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TableArg {
    None,
    Mbr,
    Gpt,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::auto(cli.quiet);
    let result = match cli.command {
        Command::Vm(cmd) => {
            return match cli_vm::run(cmd) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("osbuilder: error: {}", error_chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Initrd(args) => initrd(args, &progress),
        Command::Disk(args) => disk(args, &progress),
        Command::Cidata(args) => cidata(args),
        Command::Kernel(args) => kernel(args, &progress),
        Command::Inspect { image, pull, json } => inspect(&image, &pull, json, &progress),
        Command::Push(cmd) => cli_push::run(cmd, &progress),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("osbuilder: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the
/// previous message already includes (our error types print their sources).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut last = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !last.is_empty() && last.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
        last = text;
    }
    out
}

fn initrd(args: InitrdArgs, progress: &Progress) -> anyhow::Result<()> {
    pipeline::check_output_dir(&args.output)?;
    check_report_path(args.tree.report.as_deref(), &args.output)?;
    let options = InitrdOptions {
        compression: CompressOptions { kind: args.compress, level: args.level, threads: args.threads },
        source_date_epoch: 0,
        guest_mem: Some(args.guest_mem),
        // Set by the pipeline when the initrd holds our init.
        completion_marker: false,
    };
    let Some(image) = args.image else {
        // --agent-only (clap requires --init with it and --image without it).
        let init = args.init.context("--agent-only needs --init")?;
        if let Some(path) = args.tree.remove.first().or(args.tree.remove_if_present.first()) {
            anyhow::bail!("--remove {path}: an --agent-only initrd has no image to remove anything from");
        }
        let opts = InitrdOptions { source_date_epoch: args.tree.source_date_epoch.unwrap_or(0), ..options };
        let report = pipeline::build_agent_initrd(&init, &args.tree.add, &args.tree.mount, args.tree.network.as_ref(), &args.output, &opts, progress)
            .context("building an agent-only initrd")?;
        eprintln!(
            "osbuilder: wrote {} ({} entries, {} bytes unpacked, {} bytes compressed, sha256 {})",
            args.output.display(),
            report.entries,
            report.uncompressed_bytes,
            report.compressed_bytes,
            report.sha256
        );
        return write_report(args.tree.report.as_deref(), &report);
    };
    let job = InitrdJob { tree: args.tree.job(image, args.init), output: args.output, initrd: options };
    let report = pipeline::build_initrd(&job, progress).with_context(|| format!("building an initrd from {}", job.tree.image))?;
    for w in report.build.warnings.iter().chain(&report.initrd.warnings) {
        eprintln!("osbuilder: warning: {w}");
    }
    if report.initrd.dropped_xattrs > 0 {
        eprintln!(
            "osbuilder: warning: {} files carry xattrs (e.g. security.capability) that cpio newc cannot hold; they are dropped in the initrd",
            report.initrd.dropped_xattrs
        );
    }
    eprintln!(
        "osbuilder: wrote {} ({} entries, {} bytes unpacked, {} bytes {}, sha256 {}) in {:.2}s",
        report.build.output.display(),
        report.initrd.entries,
        report.initrd.uncompressed_bytes,
        report.initrd.compressed_bytes,
        report.compression,
        report.initrd.sha256,
        report.seconds.resolve + report.seconds.layers + report.seconds.write
    );
    write_report(args.tree.report.as_deref(), &report)
}

fn write_report(path: Option<&std::path::Path>, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(path) = path {
        let json = serde_json::to_vec_pretty(report)?;
        osbuilder::output::write_file(path, &json).with_context(|| format!("writing the report to {}", path.display()))?;
    }
    Ok(())
}

/// Refuses, before any work, a `--report` that would land on the output
/// itself (the report would silently replace the image just written) or in a
/// directory that does not exist (the build would succeed, then fail).
fn check_report_path(report: Option<&std::path::Path>, output: &std::path::Path) -> anyhow::Result<()> {
    let Some(report) = report else { return Ok(()) };
    pipeline::check_output_dir(report).context("--report")?;
    let key = |p: &std::path::Path| {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        Some((dir.canonicalize().ok()?, p.file_name()?.to_owned()))
    };
    let same = match (key(report), key(output)) {
        (Some(a), Some(b)) => a == b,
        _ => report == output,
    };
    if same {
        anyhow::bail!("--report {} is the output file; give the report another name", report.display());
    }
    Ok(())
}

fn disk(args: DiskArgs, progress: &Progress) -> anyhow::Result<()> {
    check_report_path(args.tree.report.as_deref(), &args.output)?;
    if args.fs == FsKind::Erofs {
        let ext4_only = [(args.headroom.is_some(), "--headroom"), (args.reserved_percent != 0.0, "--reserved-percent"), (args.no_journal, "--no-journal")];
        if let Some((_, flag)) = ext4_only.iter().find(|(given, _)| *given) {
            anyhow::bail!("{flag} is for ext4; erofs is read-only, sized to its content, and has no journal");
        }
    }
    let size = if args.size == "auto" {
        let text = args.headroom.as_deref().unwrap_or("10%");
        let headroom = match text.strip_suffix('%') {
            Some(pct) => Headroom::Percent(pct.trim().parse().with_context(|| format!("--headroom {text:?} is not a size or a percentage"))?),
            None => Headroom::Bytes(pipeline::parse_disk_size(text).map_err(anyhow::Error::msg).context("--headroom")?),
        };
        Ext4Size::Auto { headroom }
    } else {
        Ext4Size::Fixed(pipeline::parse_disk_size(&args.size).map_err(anyhow::Error::msg).context("--size")?)
    };
    let job = DiskJob {
        tree: args.tree.job(args.image, args.init),
        output: args.output,
        fs: args.fs,
        compression: args.compress,
        table: match args.table {
            TableArg::None => TableKind::None,
            TableArg::Mbr => TableKind::Mbr,
            TableArg::Gpt => TableKind::Gpt,
        },
        dax: args.dax,
        size,
        reserved_percent: args.reserved_percent,
        label: args.label,
        journal: !args.no_journal,
        format: args.format,
        qcow2_compress: args.qcow2_compress,
        verity: args.verity,
    };
    let report = pipeline::build_disk(&job, progress).with_context(|| format!("building a disk from {}", job.tree.image))?;
    for w in &report.build.warnings {
        eprintln!("osbuilder: warning: {w}");
    }
    let d = &report.disk;
    eprintln!(
        "osbuilder: wrote {} ({} {} bytes{}, {} {}{}{}, filesystem at byte {} size {}, {} inodes, sha256 {}) in {:.2}s",
        report.build.output.display(),
        match d.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 if d.qcow2.as_ref().is_some_and(|q| q.compressed_clusters > 0) => "compressed qcow2",
            DiskFormat::Qcow2 => "qcow2",
        },
        d.bytes,
        if d.format == DiskFormat::Qcow2 { format!(" in a {}-byte file", d.file_bytes) } else { String::new() },
        d.table,
        d.fs.name(),
        if args.compress == ErofsCompression::None { String::new() } else { format!(" {:?}", args.compress).to_lowercase() },
        if d.dax { " with Kata's DAX layout" } else { "" },
        d.partition.offset,
        d.partition.size,
        d.filesystem.used_inodes(),
        d.sha256,
        report.seconds.resolve + report.seconds.layers + report.seconds.write
    );
    if let Some(v) = &d.verity {
        eprintln!(
            "osbuilder: dm-verity root hash {} over {} blocks of {} bytes, hash tree in partition {} (byte {}, {} bytes)",
            v.root_hash, v.data_blocks, v.data_block_size, v.hash_partition.number, v.hash_partition.offset, v.hash_partition.size
        );
        eprintln!("osbuilder: kernel_verity_params = \"{}\"", v.kernel_verity_params);
    }
    if let Some(pmem) = &report.cmdline.pmem {
        eprintln!("osbuilder: boot through pmem (DAX):   {pmem}");
    }
    eprintln!("osbuilder: boot through virtio-blk:   {}", report.cmdline.virtio_blk);
    eprintln!("osbuilder: boot through virtio-scsi:  {}", report.cmdline.virtio_scsi);
    write_report(args.tree.report.as_deref(), &report)
}

fn cidata(args: CidataArgs) -> anyhow::Result<()> {
    use osbuilder::cidata::{CidataOptions, MetaData, SeedSize};
    let meta_data = match (args.meta_data, args.instance_id) {
        (Some(path), None) => MetaData::File(path),
        (None, Some(instance_id)) => MetaData::Generated { instance_id, hostname: args.hostname },
        // clap lets exactly one of the two through.
        _ => anyhow::bail!("give --meta-data FILE or --instance-id ID, not both"),
    };
    let size = match args.size.as_str() {
        "auto" => SeedSize::Auto,
        text => SeedSize::Fixed(pipeline::parse_disk_size(text).map_err(anyhow::Error::msg).context("--size")?),
    };
    let options = CidataOptions {
        user_data: args.user_data,
        meta_data,
        network_config: args.network_config,
        vendor_data: args.vendor_data,
        size,
        source_date_epoch: args.source_date_epoch,
    };
    let s = osbuilder::cidata::write(&options, &args.output).context("building a cidata seed")?;
    let files: Vec<String> = s.files.iter().map(|f| format!("{} {}", f.name, f.bytes)).collect();
    eprintln!(
        "osbuilder: wrote {} ({} bytes, {} labelled {}, volume id {}, {} bytes free; {} bytes; sha256 {})",
        s.output.display(),
        s.bytes,
        s.fat,
        osbuilder::cidata::LABEL,
        s.volume_id,
        s.free_bytes,
        files.join(", "),
        s.sha256
    );
    Ok(())
}

fn kernel(args: KernelArgs, progress: &Progress) -> anyhow::Result<()> {
    let jobs = if args.jobs == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { args.jobs };
    let job = osbuilder::kernel::KernelJob {
        config_dir: args.config_dir,
        patches_dir: args.patches_dir,
        series: args.series,
        features: args.features,
        source: args.source,
        out_dir: args.output,
        cache_dir: args.cache_dir.unwrap_or_else(BlobCache::default_dir),
        jobs,
        source_date_epoch: args.source_date_epoch,
    };
    let spinner = progress.spinner("kernel");
    let say = |line: &str| {
        if spinner.is_hidden() {
            eprintln!("osbuilder: {line}");
        } else {
            spinner.set_message(line.to_string());
        }
    };
    let report = osbuilder::kernel::build(&job, &say).context("building the guest kernel")?;
    spinner.finish_and_clear();
    let m = &report.manifest;
    eprintln!(
        "osbuilder: kernel {} (config {}) {} in {:.2}s -> {}",
        m.kernel_version,
        m.config_version,
        if report.cache_hit { "cached" } else { "built" },
        m.build_seconds,
        report.out_dir.display()
    );
    for f in &report.files {
        println!("{}", f.display());
    }
    Ok(())
}

fn inspect(image: &ImageRef, pull: &PullArgs, json: bool, progress: &Progress) -> anyhow::Result<()> {
    let opened = Image::open(image, &pull.options(), progress).with_context(|| format!("inspecting {image}"))?;
    let summary = ImageSummary::of(&opened);
    if json {
        let doc = serde_json::json!({ "image": summary, "config": opened.config });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    let show = |d: &Option<osbuilder::oci::digest::Digest>| d.as_ref().map_or("-".to_string(), ToString::to_string);
    println!("image:     {}", summary.reference);
    println!("manifest:  {}", show(&summary.manifest_digest));
    if let Some(m) = &opened.manifest {
        println!("type:      {}", m.media_type.as_deref().unwrap_or("(none)"));
    }
    println!("config:    {}", show(&summary.config_digest));
    println!("platform:  {}", summary.platform);
    println!("created:   {}", summary.created.as_deref().unwrap_or("-"));
    let rc = &opened.config.config;
    let list = |v: &Option<Vec<String>>| v.as_ref().map_or("-".to_string(), |v| format!("{v:?}"));
    println!("entrypoint: {}", list(&rc.entrypoint));
    println!("cmd:       {}", list(&rc.cmd));
    println!("env:       {}", list(&rc.env));
    println!("workdir:   {}", rc.working_dir.as_deref().unwrap_or("-"));
    println!("user:      {}", rc.user.as_deref().unwrap_or("-"));
    let total: u64 = summary.layers.iter().map(|l| l.size).sum();
    println!("layers:    {} ({} bytes)", summary.layers.len(), total);
    for (i, l) in summary.layers.iter().enumerate() {
        let media = if l.media_type.is_empty() { "tar" } else { &l.media_type };
        println!("  {i:>2} {} {:>12} {}", show(&l.digest), l.size, media);
    }
    Ok(())
}
