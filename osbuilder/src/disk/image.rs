//! A whole disk image: the filesystem writer and the partition layout put
//! together in one pass over one staged file, hashed as it is written, with
//! the kernel arguments for every way to boot it.

use std::io;
use std::path::Path;

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use super::ext4::{self, Ext4Error, Ext4Options, Ext4Size, Ext4Summary};
use super::layout::{advance_to, plan_disk, DiskError, DiskSpec, ExtraPartition, PartitionType, TableKind};
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
}

/// Everything that shapes a disk, except the tree.
#[derive(Clone, Debug)]
pub struct DiskOptions {
    pub fs: FsKind,
    pub table: TableKind,
    pub dax: bool,
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
    pub bytes: u64,
    pub sha256: String,
    pub fs: FsKind,
    pub table: &'static str,
    pub dax: bool,
    /// The filesystem partition (the whole disk with `--table none`).
    pub partition: PartitionReport,
    pub partitions: Vec<PartitionReport>,
    pub filesystem: Ext4Summary,
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

/// Kata's root arguments (its GetKernelRootParams) for ext4, with `rw` for
/// block devices a guest owns and `ro` for the shared DAX mapping.
pub fn cmdline(table: TableKind, dax: bool, fs: FsKind, init_path: Option<&str>) -> Cmdline {
    let FsKind::Ext4 = fs;
    let part = |dev: &str, pmem: bool| match table {
        TableKind::None => dev.to_string(),
        _ if pmem => format!("{dev}p1"),
        _ => format!("{dev}1"),
    };
    let init = init_path.map(|p| format!(" init={p}")).unwrap_or_default();
    let block = |dev: &str| format!("root={} rootfstype=ext4 rootflags=data=ordered,errors=remount-ro rw{init}", part(dev, false));
    Cmdline {
        pmem: dax.then(|| format!("root={} rootflags=dax,data=ordered,errors=remount-ro ro rootfstype=ext4{init}", part("/dev/pmem0", true))),
        virtio_blk: block("/dev/vda"),
        virtio_scsi: block("/dev/sda"),
    }
}

/// The root filesystem type and mount flags (empty for none) for a
/// read-only verity root: one match arm per filesystem we write.
fn verity_root_fs(fs: FsKind) -> (&'static str, &'static str) {
    match fs {
        FsKind::Ext4 => ("ext4", "data=ordered,errors=remount-ro"),
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
/// MBR, or a bare filesystem.
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
    let has_mbr = head.len() >= 512 && head[510..512] == [0x55, 0xaa];
    let dax = head.len() >= 4096 + 16 && &head[4096..4096 + 16] == b"NVDIMM_PFN_INFO\0";
    let table = match (has_mbr, head.get(446 + 4)) {
        (true, Some(0xee)) => TableKind::Gpt,
        (true, Some(t)) if *t != 0 => TableKind::Mbr,
        _ => TableKind::None,
    };
    Ok((table, dax))
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

/// Lays out and writes the disk for `plan` to `out` (staged: nothing is left
/// at `out` unless the whole image was written). Errors in the layout, such
/// as a fixed size too small, come before the output file is created.
pub fn write_disk(plan: &Plan, opts: &DiskOptions, out: &Path) -> Result<DiskReport, ImageError> {
    let ext4_opts = Ext4Options {
        size: opts.size,
        reserved_percent: opts.reserved_percent,
        source_date_epoch: opts.source_date_epoch,
        seed: opts.seed,
        label: opts.label.clone(),
        journal: opts.journal,
    };
    let fs = ext4::layout(plan, &ext4_opts)?;
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

    let staged = Staged::create(out)?;
    let file = staged.file().try_clone().map_err(ImageError::Write)?;
    let mut sink = Hashing { inner: SeekSink::at(io::BufWriter::with_capacity(4 << 20, file), 0).map_err(ImageError::Write)?, hasher: Sha256::new() };
    disk.write_head(&mut sink)?;
    let tree = if opts.verity {
        let mut tap = VerityTap::new(Offset { base: disk.fs_offset(), inner: &mut sink }, salt, data_blocks);
        fs.write(plan, &mut tap)?;
        let (_, tree) = tap.finish()?;
        if let Some(first) = first_pass.filter(|f| *f != tree.root_hash) {
            return Err(ImageError::VerityChanged { first: hex::encode(first), second: hex::encode(tree.root_hash) });
        }
        let hash_part = &disk.partitions()[1];
        advance_to(&mut sink, hash_part.start, "verity hash partition")?;
        debug_assert_eq!(tree.hash_area.len() as u64, hash_part.size);
        sink.write_all(&tree.hash_area).map_err(ImageError::Write)?;
        Some(tree)
    } else {
        fs.write(plan, &mut Offset { base: disk.fs_offset(), inner: &mut sink })?;
        None
    };
    disk.write_tail(&mut sink)?;
    debug_assert_eq!(sink.position(), disk.total_bytes());
    let sha256 = hex::encode(sink.hasher.finalize());
    let file = sink.inner.into_inner().into_inner().map_err(|e| ImageError::Write(e.into_error()))?;
    file.set_len(disk.total_bytes()).map_err(ImageError::Write)?;
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
    let partition = partitions.first().cloned().unwrap_or(PartitionReport {
        number: 0,
        offset: 0,
        size: fs.size_bytes(),
        kind: "none".into(),
        guid: None,
    });
    Ok(DiskReport {
        bytes: disk.total_bytes(),
        sha256,
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
        let dm = |d: &str, h: &str| format!("dm-mod.create=\"dm-verity,,,ro,0 8000 verity 1 {d} {h} 4096 4096 1000 0 sha256 {root} {salt}\" dm-mod.waitfor={d},{h}");
        let c = verity_cmdline(true, FsKind::Ext4, Some("/.osb/init"), &tree, false);
        let tail = "root=/dev/dm-0 rootfstype=ext4 rootflags=data=ordered,errors=remount-ro ro init=/.osb/init";
        assert_eq!(c.pmem.unwrap(), format!("{} {tail}", dm("/dev/pmem0p1", "/dev/pmem0p2")));
        assert_eq!(c.virtio_blk, format!("{} {tail}", dm("/dev/vda1", "/dev/vda2")));
        assert_eq!(c.virtio_scsi, format!("{} {tail}", dm("/dev/sda1", "/dev/sda2")));
        let i = verity_cmdline(false, FsKind::Ext4, Some("/.osb/init"), &tree, true);
        assert_eq!(i.pmem, None);
        assert_eq!(i.virtio_blk, format!("{} osb.root=/dev/dm-0 osb.rootfstype=ext4 osb.rootflags=data=ordered,errors=remount-ro osb.ro=1", dm("/dev/vda1", "/dev/vda2")));
    }
}
