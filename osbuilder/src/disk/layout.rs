//! The whole-disk plan: partition table (none, MBR, GPT) or Kata's DAX
//! layout around one filesystem partition and optional extra partitions
//! (the dm-verity hash tree, later).
//!
//! Two phases, like every writer here: [`plan_disk`] settles every byte range
//! and identifier; the writers then stream in increasing offset order. The
//! integrator writes one image through one sink:
//!
//! ```text
//! layout.write_head(sink)            // 0 .. fs_offset
//! <filesystem>                       // fs_offset .. fs_offset + fs_bytes
//! for p in partitions()[1..] { advance_to(sink, p.start); <p's bytes> }
//! layout.write_tail(sink)            // end of the last partition .. total_bytes
//! file.set_len(total_bytes)          // a SeekSink leaves trailing holes unwritten
//! ```
//!
//! Identifiers (MBR disk signatures, GPT disk and partition GUIDs) are
//! derived from [`DiskSpec::seed`] with SHA-256 over a fixed label, so the
//! same spec always gives the same bytes.

use std::io;

use sha2::{Digest as _, Sha256};

use super::dax::{self, DAX_ALIGN, DAX_DATA_OFFSET, PFN_INFO_OFFSET};
use super::table::{self, GptEntry, GptHeader, Guid, Lba, MbrEntry, GPT_ARRAY_SECTORS, SECTOR};
use super::Sink;

const MIB: u64 = 1 << 20;
/// Where partition 1 starts on MBR and GPT disks (LBA 2048), and the
/// alignment of every later partition.
pub const PARTITION_ALIGN: u64 = MIB;
/// Where the filesystem starts in the DAX layout (LBA 6144).
pub const DAX_FS_OFFSET: u64 = 3 * MIB;

/// Discoverable Partitions Specification: root partition, x86-64.
pub const GPT_TYPE_ROOT_X86_64: Guid = Guid::parse("4f68bce3-e8cd-4db1-96e7-fbcaf984b709");
/// Discoverable Partitions Specification: root verity partition, x86-64.
pub const GPT_TYPE_ROOT_VERITY_X86_64: Guid = Guid::parse("2c7357ed-ebd2-46d9-aec1-23d437ec2bf5");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// The filesystem is the whole disk (Firecracker's `root=/dev/vda`).
    None,
    /// One primary partition per filesystem, what Kata uses (`/dev/vda1`).
    Mbr,
    /// Protective MBR + GPT with Discoverable Partitions type GUIDs.
    Gpt,
}

/// A partition after the filesystem: today always the x86-64 root verity
/// partition (Kata's measured rootfs keeps the hash tree on partition 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraPartition {
    /// A positive multiple of 512.
    pub size_bytes: u64,
    /// The GPT partition GUID; `None` derives one from the seed.
    /// systemd-repart takes it from the verity root hash. Ignored on MBR.
    pub guid: Option<Guid>,
}

impl ExtraPartition {
    pub fn sized(size_bytes: u64) -> Self {
        ExtraPartition { size_bytes, guid: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub table: TableKind,
    /// Kata's DAX/NVDIMM layout (MBR only).
    pub dax: bool,
    /// Size of the filesystem partition: a positive multiple of 512.
    pub fs_bytes: u64,
    /// Every identifier on the disk is derived from this.
    pub seed: [u8; 32],
    /// The GPT partition GUID of the filesystem partition; `None` derives one
    /// from the seed (systemd-repart takes it from the verity root hash).
    pub root_guid: Option<Guid>,
    pub extra_partitions: Vec<ExtraPartition>,
}

impl DiskSpec {
    /// A spec with derived GUIDs and no extra partitions.
    pub fn new(table: TableKind, dax: bool, fs_bytes: u64, seed: [u8; 32]) -> Self {
        DiskSpec { table, dax, fs_bytes, seed, root_guid: None, extra_partitions: Vec::new() }
    }
}

/// What a partition is, in the terms of the table that describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionType {
    /// An MBR type byte (0x83, Linux).
    Mbr(u8),
    Gpt { type_guid: Guid, guid: Guid, name: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based, as in `/dev/vda1`.
    pub number: u32,
    /// Byte offset in the image.
    pub start: u64,
    /// Bytes.
    pub size: u64,
    pub kind: PartitionType,
}

impl Partition {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("filesystem size {0} is not a positive multiple of 512 bytes")]
    FsSize(u64),
    #[error("partition {number} size {size} is not a positive multiple of 512 bytes")]
    PartitionSize { number: u32, size: u64 },
    #[error("a DAX disk needs a partition table: Kata reads /dev/pmem0p1 and /dev/vda1; use an MBR table")]
    DaxWithoutTable,
    #[error("a DAX disk takes an MBR table (Kata's layout has an MBR at 0 and at 2 MiB), not GPT")]
    DaxWithGpt,
    #[error("extra partitions need a partition table: use an MBR or GPT table")]
    ExtraWithoutTable,
    #[error("an MBR holds at most 4 primary partitions, {0} were asked for")]
    TooManyMbrPartitions(usize),
    #[error("a disk of {0} bytes is too large for an MBR (2 TiB limit): use GPT")]
    TooLargeForMbr(u64),
    #[error("disk size overflows 64 bits")]
    Overflow,
    #[error("the {step} must start at byte {expected} of the image but the sink is at {found}")]
    SinkPosition { step: &'static str, expected: u64, found: u64 },
    #[error("writing the {step}: {source}")]
    Write { step: &'static str, source: io::Error },
}

/// The computed disk: every range and identifier, ready to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayout {
    total_bytes: u64,
    fs_offset: u64,
    partitions: Vec<Partition>,
    table: PlannedTable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PlannedTable {
    None,
    Mbr { signature: u32 },
    Gpt { disk_guid: Guid },
    /// `outer` at 0 for virtio-blk, `inner` at 2 MiB for pmem; distinct so
    /// that PARTUUIDs (signature-partno) differ when both devices exist.
    Dax { outer_signature: u32, inner_signature: u32 },
}

/// The GPT partition name of the filesystem partition (systemd-repart's
/// default label for this type).
pub const GPT_NAME_ROOT: &str = "root-x86-64";
pub const GPT_NAME_ROOT_VERITY: &str = "root-x86-64-verity";

fn derive(seed: &[u8; 32], label: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"osbuilder disk identifier\0");
    hasher.update(seed);
    hasher.update(label.as_bytes());
    hasher.finalize().into()
}

fn derive_guid(seed: &[u8; 32], label: &str) -> Guid {
    let bytes = derive(seed, label);
    Guid::v4_from_bytes(bytes[..16].try_into().expect("16 of 32 bytes"))
}

/// A non-zero signature (zero reads as "no signature" to some tools).
fn derive_signature(seed: &[u8; 32], label: &str) -> u32 {
    let bytes = derive(seed, label);
    u32::from_le_bytes(bytes[..4].try_into().expect("4 of 32 bytes")).max(1)
}

fn align_up(value: u64, align: u64) -> Result<u64, DiskError> {
    value.checked_next_multiple_of(align).ok_or(DiskError::Overflow)
}

/// Plans the disk `spec` describes, or says why it cannot exist.
pub fn plan_disk(spec: &DiskSpec) -> Result<DiskLayout, DiskError> {
    if spec.fs_bytes == 0 || spec.fs_bytes % SECTOR != 0 {
        return Err(DiskError::FsSize(spec.fs_bytes));
    }
    for (i, extra) in spec.extra_partitions.iter().enumerate() {
        if extra.size_bytes == 0 || extra.size_bytes % SECTOR != 0 {
            return Err(DiskError::PartitionSize { number: i as u32 + 2, size: extra.size_bytes });
        }
    }
    match (spec.table, spec.dax) {
        (TableKind::None, true) => return Err(DiskError::DaxWithoutTable),
        (TableKind::Gpt, true) => return Err(DiskError::DaxWithGpt),
        (TableKind::None, false) if !spec.extra_partitions.is_empty() => return Err(DiskError::ExtraWithoutTable),
        (TableKind::None, false) => {
            return Ok(DiskLayout {
                total_bytes: spec.fs_bytes,
                fs_offset: 0,
                partitions: Vec::new(),
                table: PlannedTable::None,
            })
        }
        _ => {}
    }
    let n_partitions = 1 + spec.extra_partitions.len();
    if spec.table == TableKind::Mbr && n_partitions > 4 {
        return Err(DiskError::TooManyMbrPartitions(n_partitions));
    }
    // GPT's 128 slots are out of reach of any sane spec, but say so anyway.
    if n_partitions > table::GPT_ENTRIES as usize {
        return Err(DiskError::Overflow);
    }

    let fs_offset = if spec.dax { DAX_FS_OFFSET } else { PARTITION_ALIGN };
    let is_gpt = spec.table == TableKind::Gpt;
    let mut partitions = Vec::with_capacity(n_partitions);
    let root_kind = if is_gpt {
        PartitionType::Gpt {
            type_guid: GPT_TYPE_ROOT_X86_64,
            guid: spec.root_guid.unwrap_or_else(|| derive_guid(&spec.seed, "partition 1")),
            name: GPT_NAME_ROOT,
        }
    } else {
        PartitionType::Mbr(table::MBR_TYPE_LINUX)
    };
    let fs_end = fs_offset.checked_add(spec.fs_bytes).ok_or(DiskError::Overflow)?;
    partitions.push(Partition { number: 1, start: fs_offset, size: spec.fs_bytes, kind: root_kind });
    let mut end = fs_end;
    for (i, extra) in spec.extra_partitions.iter().enumerate() {
        let number = i as u32 + 2;
        let start = align_up(end, PARTITION_ALIGN)?;
        let kind = if is_gpt {
            PartitionType::Gpt {
                type_guid: GPT_TYPE_ROOT_VERITY_X86_64,
                guid: extra.guid.unwrap_or_else(|| derive_guid(&spec.seed, &format!("partition {number}"))),
                name: GPT_NAME_ROOT_VERITY,
            }
        } else {
            PartitionType::Mbr(table::MBR_TYPE_LINUX)
        };
        end = start.checked_add(extra.size_bytes).ok_or(DiskError::Overflow)?;
        partitions.push(Partition { number, start, size: extra.size_bytes, kind });
    }

    let (total_bytes, table) = match (spec.table, spec.dax) {
        (TableKind::Mbr, false) => {
            (align_up(end, PARTITION_ALIGN)?, PlannedTable::Mbr { signature: derive_signature(&spec.seed, "mbr") })
        }
        (TableKind::Mbr, true) => (
            align_up(end, DAX_ALIGN)?,
            PlannedTable::Dax {
                outer_signature: derive_signature(&spec.seed, "dax outer mbr"),
                inner_signature: derive_signature(&spec.seed, "dax inner mbr"),
            },
        ),
        (TableKind::Gpt, _) => {
            let backup = (GPT_ARRAY_SECTORS + 1) * SECTOR;
            let total = align_up(end.checked_add(backup).ok_or(DiskError::Overflow)?, PARTITION_ALIGN)?;
            (total, PlannedTable::Gpt { disk_guid: derive_guid(&spec.seed, "disk") })
        }
        (TableKind::None, _) => unreachable!("returned above"),
    };
    // Every MBR field is 32 bits of sectors: start and size of each entry.
    if matches!(table, PlannedTable::Mbr { .. } | PlannedTable::Dax { .. })
        && total_bytes / SECTOR > u64::from(u32::MAX)
    {
        return Err(DiskError::TooLargeForMbr(total_bytes));
    }
    Ok(DiskLayout { total_bytes, fs_offset, partitions, table })
}

/// Advances `sink` with zeros (a hole on a seekable sink) to image byte
/// `offset`, for the gaps between partitions. The sink must have started at
/// image byte 0.
pub fn advance_to(sink: &mut dyn Sink, offset: u64, step: &'static str) -> Result<(), DiskError> {
    let found = sink.position();
    if found > offset {
        return Err(DiskError::SinkPosition { step, expected: offset, found });
    }
    sink.zeros(offset - found).map_err(|source| DiskError::Write { step, source })
}

fn put(sink: &mut dyn Sink, offset: u64, bytes: &[u8], step: &'static str) -> Result<(), DiskError> {
    advance_to(sink, offset, step)?;
    sink.write_all(bytes).map_err(|source| DiskError::Write { step, source })
}

impl DiskLayout {
    /// Size of the image file.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Byte offset of the filesystem partition in the image.
    pub fn fs_offset(&self) -> u64 {
        self.fs_offset
    }

    /// Partitions in number order; empty for [`TableKind::None`]. Partition
    /// 1 is the filesystem.
    pub fn partitions(&self) -> &[Partition] {
        &self.partitions
    }

    /// Where pmem's data starts (2 MiB) in a DAX layout: the second MBR.
    pub fn dax_data_offset(&self) -> Option<u64> {
        matches!(self.table, PlannedTable::Dax { .. }).then_some(DAX_DATA_OFFSET)
    }

    /// The GPT disk GUID, on GPT disks.
    pub fn disk_guid(&self) -> Option<Guid> {
        match self.table {
            PlannedTable::Gpt { disk_guid } => Some(disk_guid),
            _ => None,
        }
    }

    /// The MBR disk signature at 0 (the outer one in the DAX layout).
    pub fn mbr_signature(&self) -> Option<u32> {
        match self.table {
            PlannedTable::Mbr { signature } | PlannedTable::Dax { outer_signature: signature, .. } => Some(signature),
            _ => None,
        }
    }

    /// End of the last partition (where [`DiskLayout::write_tail`] starts).
    pub fn tail_offset(&self) -> u64 {
        self.partitions.last().map_or(self.total_bytes, Partition::end)
    }

    /// The MBR entries as seen from image byte `base` (0, or 2 MiB for pmem).
    fn mbr_entries(&self, base: u64) -> Vec<MbrEntry> {
        self.partitions
            .iter()
            .map(|p| {
                let kind = match p.kind {
                    PartitionType::Mbr(kind) => kind,
                    PartitionType::Gpt { .. } => unreachable!("mbr entries of a gpt disk"),
                };
                let sectors = u32::try_from(p.size / SECTOR).expect("checked by plan_disk");
                MbrEntry { kind, first: Lba::of_byte(p.start - base), sectors }
            })
            .collect()
    }

    fn gpt_parts(&self, disk_guid: Guid) -> (Vec<u8>, GptHeader, GptHeader) {
        let entries: Vec<GptEntry> = self
            .partitions
            .iter()
            .map(|p| match p.kind {
                PartitionType::Gpt { type_guid, guid, name } => GptEntry {
                    type_guid,
                    guid,
                    first: Lba::of_byte(p.start),
                    last: Lba(Lba::of_byte(p.end()).0 - 1),
                    attributes: 0,
                    name: name.to_string(),
                },
                PartitionType::Mbr(_) => unreachable!("gpt entries of an mbr disk"),
            })
            .collect();
        let array = table::encode_gpt_entries(&entries);
        let last = Lba::of_byte(self.total_bytes).0 - 1;
        let backup_entries = Lba(last - GPT_ARRAY_SECTORS);
        let primary = GptHeader {
            disk_guid,
            my_lba: Lba(1),
            alternate_lba: Lba(last),
            first_usable: Lba(2 + GPT_ARRAY_SECTORS),
            last_usable: Lba(backup_entries.0 - 1),
            entries_lba: Lba(2),
        };
        let backup = GptHeader { my_lba: Lba(last), alternate_lba: Lba(1), entries_lba: backup_entries, ..primary };
        (array, primary, backup)
    }

    /// Writes everything before the filesystem: `sink` is at image byte 0
    /// and ends exactly at [`DiskLayout::fs_offset`].
    pub fn write_head(&self, sink: &mut dyn Sink) -> Result<(), DiskError> {
        if sink.position() != 0 {
            return Err(DiskError::SinkPosition { step: "disk head", expected: 0, found: sink.position() });
        }
        match self.table {
            PlannedTable::None => {}
            PlannedTable::Mbr { signature } => {
                put(sink, 0, &table::encode_mbr(signature, &self.mbr_entries(0)), "mbr")?;
            }
            PlannedTable::Gpt { disk_guid } => {
                let (array, primary, _) = self.gpt_parts(disk_guid);
                let crc = table::gpt_entries_crc(&array);
                put(sink, 0, &table::encode_protective_mbr(self.total_bytes / SECTOR), "protective mbr")?;
                put(sink, primary.my_lba.byte(), &table::encode_gpt_header(&primary, crc), "gpt header")?;
                put(sink, primary.entries_lba.byte(), &array, "gpt partition entries")?;
            }
            PlannedTable::Dax { outer_signature, inner_signature } => {
                put(sink, 0, &table::encode_mbr(outer_signature, &self.mbr_entries(0)), "dax outer mbr")?;
                put(sink, PFN_INFO_OFFSET, &dax::encode_pfn_info(), "nvdimm pfn info block")?;
                let inner = table::encode_mbr(inner_signature, &self.mbr_entries(DAX_DATA_OFFSET));
                put(sink, DAX_DATA_OFFSET, &inner, "dax inner mbr")?;
            }
        }
        advance_to(sink, self.fs_offset, "filesystem partition")?;
        debug_assert_eq!(sink.position(), self.fs_offset);
        Ok(())
    }

    /// Writes everything after the last partition (GPT's backup entries and
    /// header; zeros up to the padded size otherwise): `sink` is at the end
    /// of the last partition and ends at [`DiskLayout::total_bytes`]. Trailing
    /// zeros are a hole on a seekable sink: set the file's length.
    pub fn write_tail(&self, sink: &mut dyn Sink) -> Result<(), DiskError> {
        let expected = self.tail_offset();
        if sink.position() != expected {
            return Err(DiskError::SinkPosition { step: "disk tail", expected, found: sink.position() });
        }
        if let PlannedTable::Gpt { disk_guid } = self.table {
            let (array, _, backup) = self.gpt_parts(disk_guid);
            let crc = table::gpt_entries_crc(&array);
            put(sink, backup.entries_lba.byte(), &array, "gpt backup partition entries")?;
            put(sink, backup.my_lba.byte(), &table::encode_gpt_header(&backup, crc), "gpt backup header")?;
        }
        advance_to(sink, self.total_bytes, "disk end padding")?;
        debug_assert_eq!(sink.position(), self.total_bytes);
        Ok(())
    }
}
