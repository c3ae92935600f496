//! A whole disk image: the filesystem writer and the partition layout put
//! together in one pass over one staged file, hashed as it is written, with
//! the kernel arguments for every way to boot it.

use std::io;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::erofs::{self, Compression, ErofsError, ErofsLayout, ErofsOptions, ErofsSummary};
use super::ext4::{self, Ext4Error, Ext4Layout, Ext4Options, Ext4Size, Ext4Summary};
use super::layout::{advance_to, plan_disk, DiskError, DiskLayout, DiskSpec, ExtraPartition, PartitionType, TableKind};
use super::qcow2::{Qcow2Options, Qcow2Summary, Qcow2Writer};
use super::verity::{self, NullSink, VerityError, VerityTap, VerityTree};
use super::{SeekSink, Sink, ZEROS};
use crate::output::{OutputError, Staged};
use crate::rootfs::Plan;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Plan(#[from] crate::rootfs::PlanError),
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
    #[error(transparent)]
    Erofs(#[from] ErofsError),
    #[error("{0}")]
    Options(String),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    Verity(#[from] VerityError),
    #[error("--verity needs a partition table (the hash tree goes in partition 2, as Kata boots it): use --table mbr or gpt")]
    VerityWithoutTable,
    #[error("the filesystem hashed differently on the second pass (root hash {first} then {second}): a file changed while the image was written; build from a stable tree")]
    VerityChanged { first: String, second: String },
    #[error("cannot write the disk image: {0}")]
    Write(#[source] io::Error),
}

/// The filesystems we write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext4,
    /// Read-only and compact; optionally LZ4-compressed (`--compress`).
    Erofs,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext4 => "ext4",
            FsKind::Erofs => "erofs",
        }
    }
}

/// The file format of the disk image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// The disk byte for byte (sparse where it is zero).
    #[default]
    Raw,
    /// qcow2 version 3, 64 KiB clusters, zero clusters unallocated.
    Qcow2,
}

/// Everything that shapes a disk, except the tree.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub fs: FsKind,
    /// erofs only.
    pub compression: Compression,
    pub table: TableKind,
    pub dax: bool,
    /// For erofs, `Auto` means exactly what the content needs (the headroom
    /// is not used: the filesystem is read-only).
    pub size: Ext4Size,
    pub reserved_percent: f64,
    pub label: Option<String>,
    pub journal: bool,
    pub source_date_epoch: i64,
    /// Every identifier (filesystem UUID, hash seed, partition GUIDs, disk
    /// signature) is derived from this; the pipeline hashes its inputs into it.
    pub seed: [u8; 32],
    /// Where the guest init sits in the tree, for the `init=` argument.
    pub init_path: Option<String>,
    /// The file format; the disk's content does not depend on it.
    pub format: DiskFormat,
    /// qcow2 only: deflate-compress the clusters that shrink.
    pub qcow2_compress: bool,
    /// A dm-verity hash tree over the filesystem in partition 2.
    pub verity: bool,
}

/// One partition, for the report.
#[derive(Clone, Debug, Serialize)]
pub struct PartitionReport {
    pub number: u32,
    pub offset: u64,
    pub size: u64,
    /// `0x83` for MBR, the type GUID for GPT.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guid: Option<String>,
}

/// The kernel arguments for each way to boot the disk.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Cmdline {
    /// NVDIMM with DAX (only for `--dax` images: fs-dax needs the PFN block).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pmem: Option<String>,
    #[serde(rename = "virtio-blk")]
    pub virtio_blk: String,
    #[serde(rename = "virtio-scsi")]
    pub virtio_scsi: String,
}

/// The filesystem's own summary.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum FsSummary {
    Ext4(Ext4Summary),
    Erofs(ErofsSummary),
}

impl FsSummary {
    /// Inodes the tree uses.
    pub fn used_inodes(&self) -> u64 {
        match self {
            FsSummary::Ext4(s) => s.inodes - s.free_inodes,
            FsSummary::Erofs(s) => s.inodes,
        }
    }
}

/// How the guest sees the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    Pmem,
    VirtioBlk,
    VirtioScsi,
}

impl Cmdline {
    pub fn get(&self, via: Via) -> Option<&str> {
        match via {
            Via::Pmem => self.pmem.as_deref(),
            Via::VirtioBlk => Some(&self.virtio_blk),
            Via::VirtioScsi => Some(&self.virtio_scsi),
        }
    }
}

/// What was written.
#[derive(Clone, Debug, Serialize)]
pub struct DiskReport {
    /// The disk's (guest-visible, virtual) size.
    pub bytes: u64,
    /// sha256 of the file written (raw or qcow2).
    pub sha256: String,
    pub format: DiskFormat,
    /// sha256 of the raw disk content: the `sha256` a raw build of the same
    /// inputs reports, whatever `format` is.
    pub raw_sha256: String,
    /// The length of the file written (a raw file's holes included).
    pub file_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qcow2: Option<Qcow2Summary>,
    pub fs: FsKind,
    pub table: &'static str,
    pub dax: bool,
    /// The filesystem partition (the whole disk with `--table none`).
    pub partition: PartitionReport,
    pub partitions: Vec<PartitionReport>,
    pub filesystem: FsSummary,
    pub cmdline: Cmdline,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verity: Option<VerityReport>,
}

/// The dm-verity tree of a `--verity` disk.
#[derive(Clone, Debug, Serialize)]
pub struct VerityReport {
    pub root_hash: String,
    pub salt: String,
    pub hash_algorithm: &'static str,
    /// veritysetup's hash format version (1: salt prepended to each block).
    pub hash_format: u32,
    pub data_blocks: u64,
    pub data_block_size: u64,
    pub hash_block_size: u64,
    /// The partition holding the hash tree; the tree starts at its byte 0
    /// (no superblock, like `veritysetup format --no-superblock`).
    pub hash_partition: PartitionReport,
    /// Kata's `kernel_verity_params`.
    pub kernel_verity_params: String,
    /// Time spent hashing in the pass that wrote the image.
    pub hash_seconds: f64,
    /// The same per device, for booting with an initramfs holding only
    /// `osb-init` (`osbuilder initrd --agent-only`): init mounts the verity
    /// device and, if the kernel rejects it, names the failing step and
    /// powers off instead of the kernel panicking.
    pub initrd_cmdline: Cmdline,
}

/// Kata's root arguments (its GetKernelRootParams): ext4 with `rw` on block
/// devices a guest owns and `ro` for the shared DAX mapping; erofs is always
/// read-only (`rootflags=dax ro` on pmem).
pub fn cmdline(table: TableKind, dax: bool, fs: FsKind, init_path: Option<&str>) -> Cmdline {
    let part = |dev: &str, pmem: bool| match table {
        TableKind::None => dev.to_string(),
        _ if pmem => format!("{dev}p1"),
        _ => format!("{dev}1"),
    };
    let init = init_path.map(|p| format!(" init={p}")).unwrap_or_default();
    let block = |dev: &str| match fs {
        FsKind::Ext4 => format!("root={} rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw{init}", part(dev, false)),
        FsKind::Erofs => format!("root={} rootfstype=erofs ro{init}", part(dev, false)),
    };
    let pmem = |dev: &str| match fs {
        FsKind::Ext4 => format!("root={dev} rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4{init}"),
        FsKind::Erofs => format!("root={dev} rootflags=dax ro rootfstype=erofs{init}"),
    };
    Cmdline { pmem: dax.then(|| pmem(&part("/dev/pmem0", true))), virtio_blk: block("/dev/vda"), virtio_scsi: block("/dev/sda") }
}

/// The filesystem writer chosen by [`DiskOptions::fs`], laid out.
enum FsLayout {
    Ext4(Ext4Layout),
    Erofs(ErofsLayout),
}

impl FsLayout {
    fn new(plan: &Plan, opts: &DiskOptions) -> Result<FsLayout, ImageError> {
        Ok(match opts.fs {
            FsKind::Ext4 => {
                if opts.compression != Compression::None {
                    return Err(ImageError::Options("--compress is for erofs; ext4 is not compressed".into()));
                }
                FsLayout::Ext4(ext4::layout(
                    plan,
                    &Ext4Options {
                        size: opts.size,
                        reserved_percent: opts.reserved_percent,
                        source_date_epoch: opts.source_date_epoch,
                        seed: opts.seed,
                        label: opts.label.clone(),
                        journal: opts.journal,
                    },
                )?)
            }
            FsKind::Erofs => {
                if opts.dax && opts.compression != Compression::None {
                    return Err(ImageError::Options("DAX maps only uncompressed erofs files; drop --compress or --dax".into()));
                }
                FsLayout::Erofs(erofs::layout(
                    plan,
                    &ErofsOptions {
                        compression: opts.compression,
                        // DAX maps only plain, block-aligned files (Kata
                        // builds its erofs with -Enoinline_data).
                        inline_data: !opts.dax,
                        size: match opts.size {
                            Ext4Size::Auto { .. } => None,
                            Ext4Size::Fixed(n) => Some(n),
                        },
                        source_date_epoch: opts.source_date_epoch,
                        seed: opts.seed,
                        label: opts.label.clone(),
                    },
                )?)
            }
        })
    }

    fn size_bytes(&self) -> u64 {
        match self {
            FsLayout::Ext4(l) => l.size_bytes(),
            FsLayout::Erofs(l) => l.size_bytes(),
        }
    }

    fn write(&self, plan: &Plan, sink: &mut dyn Sink) -> Result<(), ImageError> {
        match self {
            FsLayout::Ext4(l) => l.write(plan, sink)?,
            FsLayout::Erofs(l) => l.write(plan, sink)?,
        }
        Ok(())
    }

    fn summary(&self) -> FsSummary {
        match self {
            FsLayout::Ext4(l) => FsSummary::Ext4(l.summary()),
            FsLayout::Erofs(l) => FsSummary::Erofs(l.summary()),
        }
    }
}

/// The root filesystem type and mount flags (empty for none) for a
/// read-only verity root: one match arm per filesystem we write.
fn verity_root_fs(fs: FsKind) -> (&'static str, &'static str) {
    match fs {
        FsKind::Ext4 => ("ext4", "data=ordered,errors=remount-ro"),
        FsKind::Erofs => ("erofs", ""),
    }
}

/// The kernel arguments for a `--verity` disk: dm-init (`dm-mod.create`)
/// makes `/dev/dm-0` from partition 1 (data) and partition 2 (hash tree),
/// waiting for both devices (`dm-mod.waitfor`: pmem and virtio probing can
/// finish after dm-init runs), and the root is `/dev/dm-0`, read-only.
/// There is no DAX through dm-verity, so the pmem entry mounts without it.
/// With `initrd`, the root is left to our init (`osb.root=`) in an initramfs.
pub fn verity_cmdline(dax: bool, fs: FsKind, init_path: Option<&str>, tree: &VerityTree, initrd: bool) -> Cmdline {
    let (fstype, flags) = verity_root_fs(fs);
    let init = init_path.filter(|_| !initrd).map(|p| format!(" init={p}")).unwrap_or_default();
    let (kflags, oflags) = if flags.is_empty() { (String::new(), String::new()) } else { (format!(" rootflags={flags}"), format!(" osb.rootflags={flags}")) };
    let entry = |data: &str, hash: &str| {
        let dm = tree.dm_mod_create(data, hash);
        if initrd {
            format!("{dm} dm-mod.waitfor={data},{hash} osb.root=/dev/dm-0 osb.rootfstype={fstype}{oflags} osb.ro=1")
        } else {
            format!("{dm} dm-mod.waitfor={data},{hash} root=/dev/dm-0 rootfstype={fstype}{kflags} ro{init}")
        }
    };
    Cmdline {
        pmem: dax.then(|| entry("/dev/pmem0p1", "/dev/pmem0p2")),
        virtio_blk: entry("/dev/vda1", "/dev/vda2"),
        virtio_scsi: entry("/dev/sda1", "/dev/sda2"),
    }
}

/// Recognises the layouts [`write_disk`] makes from the first 8 KiB of an
/// image: Kata's DAX layout (the PFN block at 4 KiB), GPT (a protective MBR),
/// MBR, or a bare filesystem. A qcow2 image is read through its tables.
pub fn probe(path: &Path) -> io::Result<(TableKind, bool)> {
    use std::io::Read;
    let mut head = vec![0u8; 8192];
    let mut file = std::fs::File::open(path)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..])? {
            0 => break,
            k => n += k,
        }
    }
    head.truncate(n);
    if super::qcow2::is_qcow2(&head) {
        // The guest's first 8 KiB, through the qcow2 tables.
        let size = super::qcow2::parse_header(&head)?.size;
        head.resize(8192.min(size as usize), 0);
        super::qcow2::read_guest(&mut file, 0, &mut head)?;
    }
    let has_mbr = head.len() >= 512 && head[510..512] == [0x55, 0xaa];
    let dax = head.len() >= 4096 + 16 && &head[4096..4096 + 16] == b"NVDIMM_PFN_INFO\0";
    let table = match (has_mbr, head.get(446 + 4)) {
        (true, Some(0xee)) => TableKind::Gpt,
        (true, Some(t)) if *t != 0 => TableKind::Mbr,
        _ => TableKind::None,
    };
    Ok((table, dax))
}

/// Which filesystem sits in partition 1 (or the whole disk) of an image
/// [`probe`] recognised: the erofs magic at 1024 or ext4's at 1080.
pub fn probe_fs(path: &Path, table: TableKind, dax: bool) -> io::Result<FsKind> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let read = |at: u64, len: usize| -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, at)?;
        Ok(b)
    };
    let le64 = |b: &[u8]| u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    let start = match table {
        _ if dax => super::layout::DAX_FS_OFFSET,
        TableKind::None => 0,
        TableKind::Mbr => u32::from_le_bytes(read(446 + 8, 4)?.try_into().expect("4 bytes")) as u64 * 512,
        // The first entry of the array at LBA 2: its first LBA at byte 32.
        TableKind::Gpt => le64(&read(2 * 512 + 32, 8)?) * 512,
    };
    let head = read(start + 1024, 64)?;
    if head[..4] == erofs_magic() {
        Ok(FsKind::Erofs)
    } else if head[56..58] == [0x53, 0xef] {
        Ok(FsKind::Ext4)
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidData, format!("no ext4 or erofs filesystem at byte {start}")))
    }
}

fn erofs_magic() -> [u8; 4] {
    0xE0F5_E1E2u32.to_le_bytes()
}

/// Positions relative to where the filesystem starts inside the image.
struct Offset<'a> {
    inner: &'a mut dyn Sink,
    base: u64,
}

impl Sink for Offset<'_> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)
    }
    fn zeros(&mut self, len: u64) -> io::Result<()> {
        self.inner.zeros(len)
    }
    fn position(&self) -> u64 {
        self.inner.position() - self.base
    }
}

/// Hashes everything that passes, holes as the zeros they read back as.
struct Hashing<S> {
    inner: S,
    hasher: Sha256,
}

impl<S: Sink> Sink for Hashing<S> {
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.hasher.update(buf);
        self.inner.write_all(buf)
    }
    fn zeros(&mut self, len: u64) -> io::Result<()> {
        let mut left = len;
        while left > 0 {
            let n = left.min(ZEROS.len() as u64) as usize;
            self.hasher.update(&ZEROS[..n]);
            left -= n as u64;
        }
        self.inner.zeros(len)
    }
    fn position(&self) -> u64 {
        self.inner.position()
    }
}

/// What the ordered pass needs to build the dm-verity tree.
struct VerityPass {
    salt: [u8; 32],
    data_blocks: u64,
    /// The GPT pre-pass's root hash, which the real pass must reproduce.
    first_pass: Option<[u8; 32]>,
}

/// Head, filesystem (through the verity tap, then the hash partition, when
/// asked) and tail, in order.
fn stream(plan: &Plan, disk: &DiskLayout, fs: &FsLayout, verity: Option<&VerityPass>, sink: &mut dyn Sink) -> Result<Option<VerityTree>, ImageError> {
    disk.write_head(sink)?;
    let tree = match verity {
        Some(v) => {
            let mut tap = VerityTap::new(Offset { base: disk.fs_offset(), inner: &mut *sink }, v.salt, v.data_blocks);
            fs.write(plan, &mut tap)?;
            let (_, tree) = tap.finish()?;
            if let Some(first) = v.first_pass.filter(|f| *f != tree.root_hash) {
                return Err(ImageError::VerityChanged { first: hex::encode(first), second: hex::encode(tree.root_hash) });
            }
            let hash_part = &disk.partitions()[1];
            advance_to(sink, hash_part.start, "verity hash partition")?;
            debug_assert_eq!(tree.hash_area.len() as u64, hash_part.size);
            sink.write_all(&tree.hash_area).map_err(ImageError::Write)?;
            Some(tree)
        }
        None => {
            fs.write(plan, &mut Offset { base: disk.fs_offset(), inner: sink })?;
            None
        }
    };
    disk.write_tail(sink)?;
    debug_assert_eq!(sink.position(), disk.total_bytes());
    Ok(tree)
}

/// sha256 of the first `len` bytes of `file` (positioned reads).
fn hash_file(file: &std::fs::File, len: u64) -> io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Lays out and writes the disk for `plan` to `out` (staged: nothing is left
/// at `out` unless the whole image was written). Errors in the layout, such
/// as a fixed size too small, come before the output file is created.
pub fn write_disk(plan: &Plan, opts: &DiskOptions, out: &Path) -> Result<DiskReport, ImageError> {
    let fs = FsLayout::new(plan, opts)?;
    let mut spec = DiskSpec::new(opts.table, opts.dax, fs.size_bytes(), opts.seed);

    // dm-verity: the hash partition's size follows from the filesystem's
    // block count, so the whole disk is planned before anything is written.
    let data_blocks = fs.size_bytes() / verity::BLOCK;
    let salt = verity::derive_salt(&opts.seed);
    let mut first_pass = None;
    if opts.verity {
        if opts.table == TableKind::None {
            return Err(ImageError::VerityWithoutTable);
        }
        spec.extra_partitions = vec![ExtraPartition::sized(verity::hash_area_bytes(data_blocks))];
        if opts.table == TableKind::Gpt {
            // GPT names the partitions by GUIDs taken from the root hash
            // (systemd-repart's convention), and the primary table comes
            // before the filesystem: hash the filesystem once without
            // writing it (this costs a second read and hash of every file),
            // then write the image in one ordered pass.
            let mut tap = VerityTap::new(NullSink::default(), salt, data_blocks);
            fs.write(plan, &mut tap)?;
            let (_, tree) = tap.finish()?;
            spec.root_guid = Some(tree.data_partition_guid());
            spec.extra_partitions[0].guid = Some(tree.hash_partition_guid());
            first_pass = Some(tree.root_hash);
        }
    }
    let disk = plan_disk(&spec)?;
    let verity = opts.verity.then_some(VerityPass { salt, data_blocks, first_pass });

    let staged = Staged::create(out)?;
    let file = staged.file().try_clone().map_err(ImageError::Write)?;
    let buffered = io::BufWriter::with_capacity(4 << 20, file);
    let (raw_sha256, sha256, file_bytes, qcow2, tree) = match opts.format {
        DiskFormat::Raw => {
            let mut sink = Hashing { inner: SeekSink::at(buffered, 0).map_err(ImageError::Write)?, hasher: Sha256::new() };
            let tree = stream(plan, &disk, &fs, verity.as_ref(), &mut sink)?;
            let sha256 = hex::encode(sink.hasher.finalize());
            let file = sink.inner.into_inner().into_inner().map_err(|e| ImageError::Write(e.into_error()))?;
            file.set_len(disk.total_bytes()).map_err(ImageError::Write)?;
            (sha256.clone(), sha256, disk.total_bytes(), None, tree)
        }
        DiskFormat::Qcow2 => {
            let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
            let writer = Qcow2Writer::new(buffered, disk.total_bytes(), Qcow2Options { compress: opts.qcow2_compress, threads }).map_err(ImageError::Write)?;
            let mut sink = Hashing { inner: writer, hasher: Sha256::new() };
            let tree = stream(plan, &disk, &fs, verity.as_ref(), &mut sink)?;
            let raw_sha256 = hex::encode(sink.hasher.finalize());
            let (buffered, summary) = sink.inner.finish().map_err(ImageError::Write)?;
            let file = buffered.into_inner().map_err(|e| ImageError::Write(e.into_error()))?;
            file.set_len(summary.file_bytes).map_err(ImageError::Write)?;
            // The header is written last, at the start: hash the small file
            // once it is complete.
            let sha256 = hash_file(&file, summary.file_bytes).map_err(ImageError::Write)?;
            (raw_sha256, sha256, summary.file_bytes, Some(summary), tree)
        }
    };
    staged.commit()?;

    let partitions: Vec<PartitionReport> = disk
        .partitions()
        .iter()
        .map(|p| {
            let (kind, guid) = match &p.kind {
                PartitionType::Mbr(t) => (format!("{t:#04x}"), None),
                PartitionType::Gpt { type_guid, guid, .. } => (type_guid.to_string(), Some(guid.to_string())),
            };
            PartitionReport { number: p.number, offset: p.start, size: p.size, kind, guid }
        })
        .collect();
    let partition = partitions.first().cloned().unwrap_or(PartitionReport { number: 0, offset: 0, size: fs.size_bytes(), kind: "none".into(), guid: None });
    Ok(DiskReport {
        bytes: disk.total_bytes(),
        sha256,
        format: opts.format,
        raw_sha256,
        file_bytes,
        qcow2,
        fs: opts.fs,
        table: match opts.table {
            TableKind::None => "none",
            TableKind::Mbr => "mbr",
            TableKind::Gpt => "gpt",
        },
        dax: opts.dax,
        partition,
        filesystem: fs.summary(),
        cmdline: match &tree {
            Some(tree) => verity_cmdline(opts.dax, opts.fs, opts.init_path.as_deref(), tree, false),
            None => cmdline(opts.table, opts.dax, opts.fs, opts.init_path.as_deref()),
        },
        verity: tree.map(|tree| VerityReport {
            root_hash: hex::encode(tree.root_hash),
            salt: hex::encode(tree.salt),
            hash_algorithm: "sha256",
            hash_format: 1,
            data_blocks: tree.data_blocks,
            data_block_size: verity::BLOCK,
            hash_block_size: verity::BLOCK,
            hash_partition: partitions[1].clone(),
            kernel_verity_params: tree.kata_params(),
            hash_seconds: tree.hash_time.as_secs_f64(),
            initrd_cmdline: verity_cmdline(opts.dax, opts.fs, None, &tree, true),
        }),
        partitions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kata_root_arguments() {
        let c = cmdline(TableKind::Mbr, true, FsKind::Ext4, Some("/.osb/init"));
        assert_eq!(c.pmem.as_deref(), Some("root=/dev/pmem0p1 rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4 init=/.osb/init"));
        assert_eq!(c.virtio_blk, "root=/dev/vda1 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw init=/.osb/init");
        assert_eq!(c.virtio_scsi, "root=/dev/sda1 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw init=/.osb/init");
        let bare = cmdline(TableKind::None, false, FsKind::Ext4, None);
        assert_eq!(bare.pmem, None, "no DAX without the PFN block");
        assert_eq!(bare.virtio_blk, "root=/dev/vda rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw");
        assert_eq!(bare.get(Via::VirtioScsi), Some("root=/dev/sda rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw"));
    }

    #[test]
    fn verity_root_arguments() {
        let tree = VerityTree { root_hash: [0xab; 32], salt: [0xcd; 32], data_blocks: 1000, hash_area: Vec::new(), hash_time: std::time::Duration::ZERO };
        let (root, salt) = ("ab".repeat(32), "cd".repeat(32));
        let dm =
            |d: &str, h: &str| format!("dm-mod.create=\"dm-verity,,,ro,0 8000 verity 1 {d} {h} 4096 4096 1000 0 sha256 {root} {salt}\" dm-mod.waitfor={d},{h}");
        let c = verity_cmdline(true, FsKind::Ext4, Some("/.osb/init"), &tree, false);
        let tail = "root=/dev/dm-0 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro ro init=/.osb/init";
        assert_eq!(c.pmem.unwrap(), format!("{} {tail}", dm("/dev/pmem0p1", "/dev/pmem0p2")));
        assert_eq!(c.virtio_blk, format!("{} {tail}", dm("/dev/vda1", "/dev/vda2")));
        assert_eq!(c.virtio_scsi, format!("{} {tail}", dm("/dev/sda1", "/dev/sda2")));
        let i = verity_cmdline(false, FsKind::Ext4, Some("/.osb/init"), &tree, true);
        assert_eq!(i.pmem, None);
        assert_eq!(
            i.virtio_blk,
            format!("{} osb.root=/dev/dm-0 osb.rootfstype=ext4 osb.rootflags=data=ordered,errors=remount-ro osb.ro=1", dm("/dev/vda1", "/dev/vda2"))
        );
    }
}
