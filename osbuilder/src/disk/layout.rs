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
    Gpt {
        type_guid: Guid,
        guid: Guid,
        name: &'static str,
    },
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
    Mbr {
        signature: u32,
    },
    Gpt {
        disk_guid: Guid,
    },
    /// `outer` at 0 for virtio-blk, `inner` at 2 MiB for pmem; distinct so
    /// that PARTUUIDs (signature-partno) differ when both devices exist.
    Dax {
        outer_signature: u32,
        inner_signature: u32,
    },
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
    if spec.fs_bytes == 0 || !spec.fs_bytes.is_multiple_of(SECTOR) {
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
        (TableKind::None, false) => return Ok(DiskLayout { total_bytes: spec.fs_bytes, fs_offset: 0, partitions: Vec::new(), table: PlannedTable::None }),
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
        (TableKind::Mbr, false) => (align_up(end, PARTITION_ALIGN)?, PlannedTable::Mbr { signature: derive_signature(&spec.seed, "mbr") }),
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
    if matches!(table, PlannedTable::Mbr { .. } | PlannedTable::Dax { .. }) && total_bytes / SECTOR > u64::from(u32::MAX) {
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
                PartitionType::Gpt { type_guid, guid, name } => {
                    GptEntry { type_guid, guid, first: Lba::of_byte(p.start), last: Lba(Lba::of_byte(p.end()).0 - 1), attributes: 0, name: name.to_string() }
                }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{SeekSink, StreamSink};
    use serde_json::{json, Value};
    use std::io::{Read, Seek, SeekFrom};
    use std::path::Path;
    use std::process::Command;

    const SEED: [u8; 32] = [7; 32];
    const FS_MARK: &[u8] = b"filesystem starts here";
    const EXTRA_MARK: &[u8] = b"extra partition starts here";

    /// Writes the image the way the integrator will: head, the filesystem
    /// (a marker, then a hole), each extra partition, tail, file length.
    fn write_image(layout: &DiskLayout, sink: &mut dyn Sink) {
        layout.write_head(sink).unwrap();
        assert_eq!(sink.position(), layout.fs_offset(), "head ends at the filesystem");
        let fs_bytes = layout.partitions().first().map_or(layout.total_bytes(), |p| p.size);
        sink.write_all(FS_MARK).unwrap();
        sink.zeros(fs_bytes - FS_MARK.len() as u64).unwrap();
        for p in layout.partitions().iter().skip(1) {
            advance_to(sink, p.start, "extra partition").unwrap();
            sink.write_all(EXTRA_MARK).unwrap();
            sink.zeros(p.size - EXTRA_MARK.len() as u64).unwrap();
        }
        layout.write_tail(sink).unwrap();
        assert_eq!(sink.position(), layout.total_bytes(), "tail ends at the disk's end");
    }

    fn image_file(layout: &DiskLayout) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        {
            let mut sink = SeekSink::at(file.as_file_mut(), 0).unwrap();
            write_image(layout, &mut sink);
        }
        file.as_file().set_len(layout.total_bytes()).unwrap();
        assert_eq!(file.as_file().metadata().unwrap().len(), layout.total_bytes());
        file
    }

    fn image_bytes(layout: &DiskLayout) -> Vec<u8> {
        let mut sink = StreamSink::new(Vec::new());
        write_image(layout, &mut sink);
        sink.into_inner()
    }

    /// The image from byte `from` on, as its own file: what pmem shows.
    fn suffix_file(image: &Path, from: u64) -> tempfile::NamedTempFile {
        let mut src = std::fs::File::open(image).unwrap();
        src.seek(SeekFrom::Start(from)).unwrap();
        let mut out = tempfile::NamedTempFile::new().unwrap();
        std::io::copy(&mut src, out.as_file_mut()).unwrap();
        out
    }

    fn read_at(image: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut file = std::fs::File::open(image).unwrap();
        file.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0; len];
        file.read_exact(&mut buf).unwrap();
        buf
    }

    fn run(program: &str, args: &[&str], image: &Path) -> String {
        let out = Command::new(program).args(args).arg(image).output().unwrap_or_else(|e| panic!("{program} runs (install fdisk and gdisk): {e}"));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{program} {args:?} failed: {text}");
        text
    }

    /// `sfdisk --json`, reduced to what we check; `node` names are dropped
    /// (they embed the temp file's name).
    fn sfdisk_view(image: &Path) -> Value {
        let text = run("sfdisk", &["--json"], image);
        let mut json: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("sfdisk --json: {e}: {text}"));
        let table = json["partitiontable"].take();
        let parts: Vec<Value> = table["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let mut p = p.clone();
                p.as_object_mut().unwrap().remove("node");
                p
            })
            .collect();
        let mut view = json!({ "label": table["label"], "id": table["id"], "partitions": parts });
        for key in ["firstlba", "lastlba"] {
            if let Some(v) = table.get(key) {
                view[key] = v.clone();
            }
        }
        view
    }

    fn mbr_part(start: u64, size: u64) -> Value {
        json!({ "start": start, "size": size, "type": "83" })
    }

    fn upper(guid: Guid) -> String {
        guid.to_string().to_uppercase()
    }

    #[test]
    fn whole_disk_is_just_the_filesystem() {
        let layout = plan_disk(&DiskSpec::new(TableKind::None, false, 4096 * 10, SEED)).unwrap();
        assert_eq!((layout.fs_offset(), layout.total_bytes()), (0, 40960));
        assert!(layout.partitions().is_empty());
        let bytes = image_bytes(&layout);
        assert_eq!(bytes.len(), 40960);
        assert!(bytes.starts_with(FS_MARK));
    }

    #[test]
    fn mbr_disk_has_one_linux_partition_at_1_mib() {
        let fs_bytes = 5 * MIB + 4096;
        let layout = plan_disk(&DiskSpec::new(TableKind::Mbr, false, fs_bytes, SEED)).unwrap();
        assert_eq!(layout.fs_offset(), MIB);
        assert_eq!(layout.total_bytes(), 7 * MIB, "padded to whole MiB");
        let image = image_file(&layout);
        let signature = format!("0x{:08x}", layout.mbr_signature().unwrap());
        assert_eq!(sfdisk_view(image.path()), json!({ "label": "dos", "id": signature, "partitions": [mbr_part(2048, fs_bytes / 512)] }));
        let verify = run("sfdisk", &["--verify"], image.path());
        assert!(!verify.to_lowercase().contains("different"), "sfdisk --verify: {verify}");
        assert_eq!(read_at(image.path(), MIB, FS_MARK.len()), FS_MARK);
    }

    #[test]
    fn mbr_extra_partitions_follow_1_mib_aligned() {
        let mut spec = DiskSpec::new(TableKind::Mbr, false, 4 * MIB + 512, SEED);
        spec.extra_partitions = vec![ExtraPartition::sized(64 * 1024), ExtraPartition::sized(MIB)];
        let layout = plan_disk(&spec).unwrap();
        let starts: Vec<u64> = layout.partitions().iter().map(|p| p.start).collect();
        assert_eq!(starts, [MIB, 6 * MIB, 7 * MIB]);
        assert_eq!(layout.total_bytes(), 8 * MIB);
        let image = image_file(&layout);
        assert_eq!(sfdisk_view(image.path())["partitions"], json!([mbr_part(2048, (4 * MIB + 512) / 512), mbr_part(6 * 2048, 128), mbr_part(7 * 2048, 2048)]));
        run("sfdisk", &["--verify"], image.path());
        assert_eq!(read_at(image.path(), 6 * MIB, EXTRA_MARK.len()), EXTRA_MARK);
    }

    #[test]
    fn gpt_disk_passes_sgdisk_and_shows_the_derived_identifiers() {
        let fs_bytes = 3 * MIB;
        let mut spec = DiskSpec::new(TableKind::Gpt, false, fs_bytes, SEED);
        let verity_guid = Guid::parse("0123abcd-0000-4000-8000-00000000beef");
        spec.extra_partitions = vec![ExtraPartition { size_bytes: 40960, guid: Some(verity_guid) }];
        let layout = plan_disk(&spec).unwrap();
        assert_eq!(layout.fs_offset(), MIB);
        // 1 MiB + 3 MiB fs, verity at 4 MiB (80 sectors), backup 33 sectors: 5 MiB.
        assert_eq!(layout.total_bytes(), 5 * MIB);
        let disk_guid = layout.disk_guid().unwrap();
        let root_guid = match &layout.partitions()[0].kind {
            PartitionType::Gpt { guid, .. } => *guid,
            other => panic!("{other:?}"),
        };
        assert_eq!(root_guid.0[6] >> 4, 4, "v4 version nibble");
        assert_eq!(root_guid.0[8] >> 6, 0b10, "rfc 4122 variant");
        let image = image_file(&layout);

        let verify = run("sgdisk", &["-v"], image.path());
        assert!(verify.contains("No problems found"), "sgdisk -v: {verify}");
        let print = run("sgdisk", &["-p"], image.path());
        assert!(print.contains(&format!("Disk identifier (GUID): {}", upper(disk_guid))), "{print}");
        let info = run("sgdisk", &["-i", "1"], image.path());
        assert!(info.contains(&format!("Partition unique GUID: {}", upper(root_guid))), "{info}");
        assert!(info.contains("Partition name: 'root-x86-64'"), "{info}");

        let last_lba = 5 * MIB / 512 - 1;
        assert_eq!(
            sfdisk_view(image.path()),
            json!({
                "label": "gpt", "id": upper(disk_guid), "firstlba": 34, "lastlba": last_lba - 33,
                "partitions": [
                    { "start": 2048, "size": fs_bytes / 512, "type": upper(GPT_TYPE_ROOT_X86_64),
                      "uuid": upper(root_guid), "name": "root-x86-64" },
                    { "start": 4 * 2048, "size": 80, "type": upper(GPT_TYPE_ROOT_VERITY_X86_64),
                      "uuid": upper(verity_guid), "name": "root-x86-64-verity" },
                ],
            })
        );
        run("sfdisk", &["--verify"], image.path());
        assert_eq!(read_at(image.path(), MIB, FS_MARK.len()), FS_MARK);
        assert_eq!(&read_at(image.path(), last_lba * 512, 8), b"EFI PART");
    }

    #[test]
    fn gpt_root_guid_can_be_given() {
        let mut spec = DiskSpec::new(TableKind::Gpt, false, MIB, SEED);
        let guid = Guid::parse("11111111-2222-4333-8444-555555555555");
        spec.root_guid = Some(guid);
        let layout = plan_disk(&spec).unwrap();
        assert!(matches!(layout.partitions()[0].kind, PartitionType::Gpt { guid: g, .. } if g == guid));
    }

    #[test]
    fn dax_disk_matches_kata_layout_from_both_readers() {
        let fs_bytes = 5 * MIB;
        let mut spec = DiskSpec::new(TableKind::Mbr, true, fs_bytes, SEED);
        spec.extra_partitions = vec![ExtraPartition::sized(8192)];
        let layout = plan_disk(&spec).unwrap();
        assert_eq!(layout.fs_offset(), 3 * MIB);
        assert_eq!(layout.dax_data_offset(), Some(2 * MIB));
        // fs 3..8 MiB, hash 8 MiB + 8 KiB, padded to 10 MiB.
        assert_eq!(layout.total_bytes(), 10 * MIB);
        let image = image_file(&layout);

        // virtio-blk: the whole image; partition 1 at 3 MiB.
        let outer = sfdisk_view(image.path());
        assert_eq!(outer["label"], "dos");
        assert_eq!(outer["partitions"], json!([mbr_part(6144, fs_bytes / 512), mbr_part(8 * 2048, 16)]));
        run("sfdisk", &["--verify"], image.path());

        // pmem: the device starts at 2 MiB and is total - 2 MiB long.
        let pmem = suffix_file(image.path(), 2 * MIB);
        assert_eq!(pmem.as_file().metadata().unwrap().len(), layout.total_bytes() - 2 * MIB);
        let inner = sfdisk_view(pmem.path());
        assert_eq!(inner["partitions"], json!([mbr_part(2048, fs_bytes / 512), mbr_part(6 * 2048, 16)]));
        assert_ne!(inner["id"], outer["id"], "distinct signatures, distinct PARTUUIDs");
        run("sfdisk", &["--verify"], pmem.path());

        assert_eq!(read_at(image.path(), 4096, 4096), dax::encode_pfn_info());
        assert_eq!(read_at(image.path(), 3 * MIB, FS_MARK.len()), FS_MARK);
        assert_eq!(read_at(image.path(), 8 * MIB, EXTRA_MARK.len()), EXTRA_MARK);
        // Nothing but the two MBRs and the PFN block in the reserved 3 MiB.
        let head = read_at(image.path(), 0, 3 * MIB as usize);
        let nonzero: Vec<usize> = head.iter().enumerate().filter(|(_, &b)| b != 0).map(|(i, _)| i).collect();
        assert!(nonzero.iter().all(|&i| i < 512 || (4096..8192).contains(&i) || (2 * MIB as usize..2 * MIB as usize + 512).contains(&i)));
    }

    #[test]
    fn dax_total_is_a_2_mib_multiple() {
        for fs_bytes in [4096, MIB, 2 * MIB - 512, 2 * MIB, 7 * MIB + 4096] {
            let layout = plan_disk(&DiskSpec::new(TableKind::Mbr, true, fs_bytes, SEED)).unwrap();
            assert_eq!(layout.total_bytes() % (2 * MIB), 0, "fs {fs_bytes}");
            assert!(layout.total_bytes() >= 3 * MIB + fs_bytes);
            assert!(layout.total_bytes() < 3 * MIB + fs_bytes + 2 * MIB);
        }
    }

    #[test]
    fn same_spec_same_bytes_and_seed_changes_identifiers() {
        for table in [TableKind::None, TableKind::Mbr, TableKind::Gpt] {
            for dax in [false, true] {
                let mut spec = DiskSpec::new(table, dax, 2 * MIB, SEED);
                let Ok(layout) = plan_disk(&spec) else { continue };
                assert_eq!(image_bytes(&layout), image_bytes(&plan_disk(&spec).unwrap()), "{table:?} dax {dax}");
                if table != TableKind::None {
                    spec.seed[0] ^= 1;
                    let other = plan_disk(&spec).unwrap();
                    assert_ne!(image_bytes(&layout), image_bytes(&other), "{table:?} dax {dax} seed matters");
                }
            }
        }
    }

    #[test]
    fn writers_refuse_a_sink_in_the_wrong_place() {
        let layout = plan_disk(&DiskSpec::new(TableKind::Gpt, false, MIB, SEED)).unwrap();
        let mut sink = StreamSink::new(Vec::new());
        sink.zeros(1).unwrap();
        assert!(matches!(layout.write_head(&mut sink), Err(DiskError::SinkPosition { expected: 0, found: 1, .. })));
        let mut sink = StreamSink::new(Vec::new());
        sink.zeros(MIB).unwrap();
        assert!(matches!(layout.write_tail(&mut sink), Err(DiskError::SinkPosition { expected, .. }) if expected == 2 * MIB));
    }

    #[test]
    fn impossible_specs_are_refused() {
        let check = |spec: DiskSpec, expected: &str| {
            let err = plan_disk(&spec).unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        };
        check(DiskSpec::new(TableKind::None, true, MIB, SEED), "needs a partition table");
        check(DiskSpec::new(TableKind::Gpt, true, MIB, SEED), "not GPT");
        check(DiskSpec::new(TableKind::Mbr, false, 0, SEED), "filesystem size 0");
        check(DiskSpec::new(TableKind::Mbr, false, 1000, SEED), "filesystem size 1000");
        check(DiskSpec::new(TableKind::Mbr, false, 3 << 40, SEED), "too large for an MBR");
        let mut spec = DiskSpec::new(TableKind::None, false, MIB, SEED);
        spec.extra_partitions = vec![ExtraPartition::sized(MIB)];
        check(spec, "extra partitions need a partition table");
        let mut spec = DiskSpec::new(TableKind::Mbr, false, MIB, SEED);
        spec.extra_partitions = vec![ExtraPartition::sized(MIB); 4];
        check(spec.clone(), "at most 4 primary partitions, 5");
        spec.extra_partitions[1].size_bytes = 100;
        check(spec, "partition 3 size 100");
        assert!(plan_disk(&DiskSpec::new(TableKind::Gpt, false, 3 << 40, SEED)).is_ok(), "gpt takes big disks");
    }
}
