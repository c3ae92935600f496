//! cloud-init NoCloud seeds: a FAT12/FAT16 volume labelled `cidata` with
//! `user-data`, `meta-data` and, when given, `network-config` and
//! `vendor-data` in its root directory. cloud-init's NoCloud datasource finds
//! the volume by its label and reads those files.
//!
//! Two phases, as the other writers: `Plan::new` reads every input (each
//! into memory: a seed holds at most about 2 GiB and cloud-init's files are
//! usually kilobytes), checks it and settles the volume's geometry, so a bad
//! input or a `--size` too small fails before any output exists; [`write`]
//! then formats the volume with `fatfs` inside the staged output file and
//! copies the files in.
//!
//! **Deterministic:** the same inputs give the same bytes. The volume ID (the
//! serial blkid shows as the UUID) is the first four bytes of a sha256 over
//! the file names, lengths and contents, the timestamp and the size; every
//! timestamp (created, modified, accessed) is SOURCE_DATE_EPOCH as UTC,
//! clamped to FAT's 1980-01-01 00:00:00 ..= 2107-12-31 23:59:58, or
//! 1980-01-01 00:00:00 without it; files are written in a fixed order
//! (user-data, meta-data, network-config, vendor-data) into a file of zeros
//! (fatfs formats quickly: it writes only the boot sector, the FATs and the
//! root directory).
//!
//! **Size:** 512-byte sectors, one reserved sector, two FATs, 64 root
//! directory entries (the seed uses at most 10, long names included), and the
//! smallest cluster size from 512 bytes to 32 KiB that gives a valid FAT12
//! (at most 4084 clusters) or FAT16 (4085 to 65524 clusters) layout, so a
//! seed holds at most about 2 GiB. Automatically sized, a seed is the
//! smallest multiple of 64 KiB that holds the files with a quarter of their
//! size, and at least 64 KiB, free (128 KiB for a few small files). A given
//! size must be a multiple of 512 bytes and hold the files; the error names
//! the smallest size that does.
//!
//! **The label:** fatfs 0.3.6 writes the 11 label bytes it is given, unchanged,
//! both into the boot sector (BPB offset 43) and as the volume-label entry
//! at the start of the root directory; blkid reads the root-directory entry
//! first and the boot sector's as `LABEL_FATBOOT`. So the lowercase `cidata`
//! that cloud-init looks for needs no patching (mkfs.fat also keeps a
//! lowercase label, with a warning). The unit tests pin both copies.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::output::{OutputError, Staged};

/// The volume label cloud-init's NoCloud datasource looks for.
pub const LABEL: &str = "cidata";

const SECTOR: u64 = 512;
const RESERVED_SECTORS: u64 = 1;
const FATS: u64 = 2;
/// Root directory entries (FAT12/FAT16 have a fixed root directory): 64
/// entries are 4 sectors, room for the label, the four files with their long
/// names and a few more added by hand (mcopy).
const ROOT_ENTRIES: u16 = 64;
const ROOT_SECTORS: u64 = ROOT_ENTRIES as u64 * 32 / SECTOR;
/// fatfs refuses a volume with 8 sectors or fewer for the FATs and the data.
const MIN_FAT_AND_DATA_SECTORS: u64 = 8;
const FAT12_MAX_CLUSTERS: u64 = 4084;
const FAT16_MAX_CLUSTERS: u64 = 65524;
/// 32 KiB clusters: fatfs's largest, and FAT16's usual limit.
const MAX_SECTORS_PER_CLUSTER: u64 = 64;
/// Automatic sizes are multiples of this.
const SIZE_STEP: u64 = 64 << 10;
/// Free space an automatically sized seed keeps at least.
const MIN_FREE: u64 = 64 << 10;
/// FAT's first and last representable times, as Unix times (UTC).
const FAT_FIRST_TIME: i64 = 315_532_800; // 1980-01-01 00:00:00
const FAT_LAST_TIME: i64 = 4_354_819_198; // 2107-12-31 23:59:58

#[derive(Debug, thiserror::Error)]
pub enum CidataError {
    #[error("cannot read the {name} file {path}: {source}")]
    Read { name: &'static str, path: PathBuf, source: io::Error },
    #[error("the {name} file {path} is not a regular file")]
    NotAFile { name: &'static str, path: PathBuf },
    #[error("{flag} {value:?} cannot go into generated meta-data: give a letter followed by letters, digits, '.', '-' or '_' (not a YAML word such as yes, no, on, off, true, false or null), or write a --meta-data file")]
    MetaValue { flag: &'static str, value: String },
    #[error("the files are {total} bytes ({largest} is {largest_bytes}); a FAT12/FAT16 seed holds at most {max} bytes")]
    TooLarge { total: u64, largest: &'static str, largest_bytes: u64, max: u64 },
    #[error("--size {size} is not a multiple of 512 bytes")]
    SizeUnaligned { size: u64 },
    #[error("--size {size} is too small for these files ({total} bytes; {largest} is {largest_bytes}): the seed needs at least {needed} bytes")]
    SizeTooSmall { size: u64, total: u64, largest: &'static str, largest_bytes: u64, needed: u64 },
    #[error("--size {size} is larger than a FAT16 volume with 32 KiB clusters can be (at most {max} bytes)")]
    SizeTooLarge { size: u64, max: u64 },
    #[error("--size {size} has no valid FAT12 or FAT16 layout (its cluster count falls between the two); try a size a little larger")]
    SizeNoLayout { size: u64 },
    #[error("cannot write the seed: {step}: {source}")]
    Write { step: String, source: io::Error },
    #[error("fatfs laid the volume out as {got}, not the planned {planned} (a bug in osbuilder's layout)")]
    LayoutMismatch { planned: String, got: String },
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// What goes into the seed.
#[derive(Clone, Debug)]
pub struct CidataOptions {
    pub user_data: PathBuf,
    pub meta_data: MetaData,
    pub network_config: Option<PathBuf>,
    pub vendor_data: Option<PathBuf>,
    pub size: SeedSize,
    /// Every file's timestamps (UTC, clamped to FAT's range); `None`: 1980-01-01 00:00:00.
    pub source_date_epoch: Option<i64>,
}

/// The meta-data: a file, or generated as `instance-id: ID` and, with a
/// hostname, `local-hostname: NAME` (one line each, plain YAML scalars).
#[derive(Clone, Debug)]
pub enum MetaData {
    File(PathBuf),
    Generated { instance_id: String, hostname: Option<String> },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedSize {
    /// The smallest multiple of 64 KiB holding the files with a quarter of
    /// their size, and at least 64 KiB, free.
    Auto,
    /// Exactly this many bytes (a multiple of 512).
    Fixed(u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum FatKind {
    #[serde(rename = "FAT12")]
    Fat12,
    #[serde(rename = "FAT16")]
    Fat16,
}

impl FatKind {
    fn bits(self) -> u64 {
        match self {
            FatKind::Fat12 => 12,
            FatKind::Fat16 => 16,
        }
    }

    fn clusters_allowed(self) -> std::ops::RangeInclusive<u64> {
        match self {
            FatKind::Fat12 => 1..=FAT12_MAX_CLUSTERS,
            FatKind::Fat16 => FAT12_MAX_CLUSTERS + 1..=FAT16_MAX_CLUSTERS,
        }
    }
}

impl std::fmt::Display for FatKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FatKind::Fat12 => "FAT12",
            FatKind::Fat16 => "FAT16",
        })
    }
}

/// What [`write`] made.
#[derive(Clone, Debug, Serialize)]
pub struct CidataSummary {
    pub output: PathBuf,
    pub bytes: u64,
    pub fat: FatKind,
    pub cluster_bytes: u64,
    pub free_bytes: u64,
    /// As blkid shows it (`UUID=`): `XXXX-XXXX`.
    pub volume_id: String,
    pub files: Vec<SeedFile>,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct SeedFile {
    pub name: &'static str,
    pub bytes: u64,
    pub sha256: String,
}

/// A volume's layout, computed as fatfs 0.3.6 computes it (its
/// `determine_sectors_per_fat`, which rounds towards a larger FAT), so the
/// capacity checked here is the capacity fatfs formats; [`write`] checks the
/// two agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Geometry {
    total_sectors: u64,
    sectors_per_cluster: u64,
    fat: FatKind,
    sectors_per_fat: u64,
    clusters: u64,
}

impl Geometry {
    /// The layout of a volume of `total_sectors`: the smallest cluster size
    /// with a valid FAT12 or FAT16 layout. `None` when there is none (too
    /// small, too large, or a size whose cluster count falls between FAT12
    /// and FAT16 for every cluster size).
    fn for_sectors(total_sectors: u64) -> Option<Geometry> {
        (0..=MAX_SECTORS_PER_CLUSTER.trailing_zeros())
            .map(|shift| 1u64 << shift)
            .find_map(|sectors_per_cluster| Geometry::with_cluster(total_sectors, sectors_per_cluster))
    }

    /// fatfs tries FAT32, FAT16, FAT12 in that order and keeps the first whose
    /// cluster count suits it. FAT32 never suits a volume that has a FAT16 or
    /// FAT12 layout (its larger FATs leave fewer than 65525 clusters), so the
    /// order here is FAT16, FAT12.
    fn with_cluster(total_sectors: u64, sectors_per_cluster: u64) -> Option<Geometry> {
        if total_sectors <= RESERVED_SECTORS + ROOT_SECTORS + MIN_FAT_AND_DATA_SECTORS {
            return None;
        }
        [FatKind::Fat16, FatKind::Fat12].into_iter().find_map(|fat| {
            let t0 = total_sectors - RESERVED_SECTORS - ROOT_SECTORS;
            let t1 = t0 + 2 * sectors_per_cluster;
            let t2 = sectors_per_cluster * SECTOR * 8 / fat.bits() + FATS;
            let sectors_per_fat = t1.div_ceil(t2);
            let clusters = t0.checked_sub(FATS * sectors_per_fat)? / sectors_per_cluster;
            fat.clusters_allowed().contains(&clusters).then_some(Geometry { total_sectors, sectors_per_cluster, fat, sectors_per_fat, clusters })
        })
    }

    fn bytes(&self) -> u64 {
        self.total_sectors * SECTOR
    }

    fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    fn capacity(&self) -> u64 {
        self.clusters * self.cluster_bytes()
    }

    /// The free bytes left after `lengths`, or `None` when they do not fit.
    fn free_after(&self, lengths: &[u64]) -> Option<u64> {
        let used: u64 = lengths.iter().map(|len| len.div_ceil(self.cluster_bytes())).sum();
        self.clusters.checked_sub(used).map(|free| free * self.cluster_bytes())
    }
}

/// The largest seed: FAT16's most clusters of 32 KiB, plus what precedes them.
fn max_seed_bytes() -> u64 {
    let sectors_per_fat = (FAT16_MAX_CLUSTERS + 2).div_ceil(SECTOR / 2);
    (RESERVED_SECTORS + ROOT_SECTORS + FATS * sectors_per_fat + FAT16_MAX_CLUSTERS * MAX_SECTORS_PER_CLUSTER) * SECTOR
}

/// The smallest multiple of [`SIZE_STEP`] whose layout holds `lengths` with
/// at least `min_free` bytes free.
fn smallest_geometry(lengths: &[u64], min_free: u64) -> Option<Geometry> {
    let data: u64 = lengths.iter().sum();
    // Nothing smaller can hold the data: start there, rounded down to a step.
    let floor = (RESERVED_SECTORS + ROOT_SECTORS) * SECTOR + data + min_free;
    let mut size = (floor / SIZE_STEP * SIZE_STEP).max(SIZE_STEP);
    while size <= max_seed_bytes() + SIZE_STEP {
        if let Some(geometry) = Geometry::for_sectors(size / SECTOR) {
            if geometry.free_after(lengths).is_some_and(|free| free >= min_free) {
                return Some(geometry);
            }
        }
        size += SIZE_STEP;
    }
    None
}

/// One file of the seed, read.
struct Input {
    name: &'static str,
    bytes: Vec<u8>,
}

/// Everything settled before the output is created.
struct Plan {
    inputs: Vec<Input>,
    geometry: Geometry,
    volume_id: u32,
    time: fatfs::DateTime,
}

impl Plan {
    fn new(options: &CidataOptions) -> Result<Plan, CidataError> {
        let meta_data = match &options.meta_data {
            MetaData::File(path) => Source::File(path),
            MetaData::Generated { instance_id, hostname } => Source::Bytes(generated_meta_data(instance_id, hostname.as_deref())?),
        };
        let mut sources = vec![("user-data", Source::File(&options.user_data)), ("meta-data", meta_data)];
        if let Some(path) = &options.network_config {
            sources.push(("network-config", Source::File(path)));
        }
        if let Some(path) = &options.vendor_data {
            sources.push(("vendor-data", Source::File(path)));
        }

        // Sizes first: a file too large for any seed is refused before it is read.
        let mut lengths = Vec::with_capacity(sources.len());
        for (name, source) in &sources {
            lengths.push(match source {
                Source::File(path) => {
                    let meta = std::fs::metadata(path).map_err(|source| CidataError::Read { name, path: path.to_path_buf(), source })?;
                    if !meta.is_file() {
                        return Err(CidataError::NotAFile { name, path: path.to_path_buf() });
                    }
                    meta.len()
                }
                Source::Bytes(bytes) => bytes.len() as u64,
            });
        }
        too_large_for_any_seed(&sources.iter().map(|(name, _)| *name).collect::<Vec<_>>(), &lengths)?;

        let mut inputs = Vec::with_capacity(sources.len());
        for (name, source) in sources {
            let bytes = match source {
                Source::File(path) => std::fs::read(path).map_err(|source| CidataError::Read { name, path: path.to_path_buf(), source })?,
                Source::Bytes(bytes) => bytes,
            };
            inputs.push(Input { name, bytes });
        }
        // The lengths read (a file may have changed since its metadata was read).
        let names: Vec<_> = inputs.iter().map(|i| i.name).collect();
        let lengths: Vec<_> = inputs.iter().map(|i| i.bytes.len() as u64).collect();
        too_large_for_any_seed(&names, &lengths)?;
        let geometry = match options.size {
            SeedSize::Auto => {
                let data: u64 = lengths.iter().sum();
                let min_free = (data / 4).max(MIN_FREE);
                // The largest seed with less free space still beats refusing.
                smallest_geometry(&lengths, min_free).or_else(|| smallest_geometry(&lengths, 0)).ok_or_else(|| too_large(&names, &lengths))?
            }
            SeedSize::Fixed(size) => fixed_geometry(size, &names, &lengths)?,
        };

        let epoch = options.source_date_epoch.unwrap_or(FAT_FIRST_TIME).clamp(FAT_FIRST_TIME, FAT_LAST_TIME);
        let mut hash = Sha256::new();
        hash.update(b"osbuilder cidata v1\0");
        for input in &inputs {
            hash.update(input.name.as_bytes());
            hash.update([0]);
            hash.update((input.bytes.len() as u64).to_le_bytes());
            hash.update(Sha256::digest(&input.bytes));
        }
        hash.update(epoch.to_le_bytes());
        hash.update(geometry.total_sectors.to_le_bytes());
        let digest = hash.finalize();
        let volume_id = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
        Ok(Plan { inputs, geometry, volume_id, time: fat_time(epoch) })
    }
}

enum Source<'a> {
    File(&'a Path),
    Bytes(Vec<u8>),
}

fn largest<'a>(names: &[&'a str], lengths: &[u64]) -> (&'a str, u64) {
    names.iter().zip(lengths).max_by_key(|(_, len)| **len).map(|(name, len)| (*name, *len)).unwrap_or(("user-data", 0))
}

fn too_large(names: &[&'static str], lengths: &[u64]) -> CidataError {
    let (largest, largest_bytes) = largest(names, lengths);
    CidataError::TooLarge {
        total: lengths.iter().sum(),
        largest,
        largest_bytes,
        max: Geometry::for_sectors(max_seed_bytes() / SECTOR).map_or(0, |g| g.capacity()),
    }
}

fn too_large_for_any_seed(names: &[&'static str], lengths: &[u64]) -> Result<(), CidataError> {
    let max = Geometry::for_sectors(max_seed_bytes() / SECTOR).expect("the largest seed has a layout");
    match max.free_after(lengths) {
        Some(_) => Ok(()),
        None => Err(too_large(names, lengths)),
    }
}

fn fixed_geometry(size: u64, names: &[&'static str], lengths: &[u64]) -> Result<Geometry, CidataError> {
    if !size.is_multiple_of(SECTOR) {
        return Err(CidataError::SizeUnaligned { size });
    }
    if size > max_seed_bytes() {
        return Err(CidataError::SizeTooLarge { size, max: max_seed_bytes() });
    }
    let too_small = || {
        let (largest, largest_bytes) = largest(names, lengths);
        let needed = smallest_geometry(lengths, 0).map_or(max_seed_bytes(), |g| g.bytes());
        CidataError::SizeTooSmall { size, total: lengths.iter().sum(), largest, largest_bytes, needed }
    };
    match Geometry::for_sectors(size / SECTOR) {
        Some(geometry) if geometry.free_after(lengths).is_some() => Ok(geometry),
        Some(_) => Err(too_small()),
        // No layout: too small for any, or between FAT12 and FAT16.
        None if smallest_geometry(lengths, 0).is_none_or(|g| size < g.bytes()) => Err(too_small()),
        None => Err(CidataError::SizeNoLayout { size }),
    }
}

/// `instance-id: ID` and `local-hostname: NAME`, each value a plain YAML
/// scalar that YAML 1.1 (cloud-init's PyYAML) reads as a string.
fn generated_meta_data(instance_id: &str, hostname: Option<&str>) -> Result<Vec<u8>, CidataError> {
    check_plain_word("--instance-id", instance_id)?;
    let mut text = format!("instance-id: {instance_id}\n");
    if let Some(hostname) = hostname {
        check_plain_word("--hostname", hostname)?;
        text.push_str(&format!("local-hostname: {hostname}\n"));
    }
    Ok(text.into_bytes())
}

/// A letter first (so no number, date, `.inf` or `-` indicator), then
/// letters, digits, `.`, `-`, `_`; not one of YAML 1.1's boolean or null words.
fn check_plain_word(flag: &'static str, value: &str) -> Result<(), CidataError> {
    const YAML_WORDS: [&str; 9] = ["y", "n", "yes", "no", "on", "off", "true", "false", "null"];
    let mut chars = value.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && value.len() <= 253
        && !YAML_WORDS.iter().any(|w| w.eq_ignore_ascii_case(value));
    if ok {
        Ok(())
    } else {
        Err(CidataError::MetaValue { flag, value: value.to_string() })
    }
}

/// A Unix time (already clamped to FAT's range) as FAT's date and time, UTC.
fn fat_time(epoch: i64) -> fatfs::DateTime {
    let c = crate::time::Civil::from_epoch(epoch);
    fatfs::DateTime {
        date: fatfs::Date { year: c.year as u16, month: c.month as u16, day: c.day as u16 },
        time: fatfs::Time { hour: c.hour as u16, min: c.minute as u16, sec: c.second as u16, millis: 0 },
    }
}

/// fatfs asks its time provider for "now" whenever it stamps an entry; ours
/// always answers the seed's one time.
#[derive(Debug)]
struct FixedTime(fatfs::DateTime);

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// Builds the seed at `output` (staged: nothing is left there on an error).
pub fn write(options: &CidataOptions, output: &Path) -> Result<CidataSummary, CidataError> {
    let plan = Plan::new(options)?;
    let staged = Staged::create(output)?;
    let (free_bytes, sha256) = write_volume(&plan, staged.file())?;
    let output = staged.commit()?;
    let g = &plan.geometry;
    Ok(CidataSummary {
        output,
        bytes: g.bytes(),
        fat: g.fat,
        cluster_bytes: g.cluster_bytes(),
        free_bytes,
        volume_id: format!("{:04X}-{:04X}", plan.volume_id >> 16, plan.volume_id & 0xffff),
        files: plan.inputs.iter().map(|i| SeedFile { name: i.name, bytes: i.bytes.len() as u64, sha256: hex::encode(Sha256::digest(&i.bytes)) }).collect(),
        sha256,
    })
}

/// Formats the volume in `file` (empty), copies the files in, and returns
/// the free bytes and the image's sha256.
fn write_volume(plan: &Plan, file: &File) -> Result<(u64, String), CidataError> {
    let step = |step: &str| {
        let step = step.to_string();
        move |source| CidataError::Write { step, source }
    };
    let g = &plan.geometry;
    // All zeros (sparse), as fatfs's quick format expects.
    file.set_len(g.bytes()).map_err(step("sizing the image"))?;
    let mut label = [b' '; 11];
    label[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    let format = fatfs::FormatVolumeOptions::new()
        .bytes_per_sector(SECTOR as u16)
        .total_sectors(g.total_sectors as u32)
        .bytes_per_cluster((g.cluster_bytes()) as u32)
        .fats(FATS as u8)
        .max_root_dir_entries(ROOT_ENTRIES)
        .volume_id(plan.volume_id)
        .volume_label(label);
    fatfs::format_volume(file, format).map_err(step("formatting the FAT volume"))?;

    // fatfs keeps a `&'static` time provider: one small allocation per seed
    // is leaked for it.
    let time: &'static FixedTime = Box::leak(Box::new(FixedTime(plan.time)));
    let fs = fatfs::FileSystem::new(file, fatfs::FsOptions::new().time_provider(time)).map_err(step("opening the formatted volume"))?;
    let got_fat = match fs.fat_type() {
        fatfs::FatType::Fat12 => Some(FatKind::Fat12),
        fatfs::FatType::Fat16 => Some(FatKind::Fat16),
        fatfs::FatType::Fat32 => None,
    };
    let stats = fs.stats().map_err(step("reading the volume's statistics"))?;
    if got_fat != Some(g.fat) || u64::from(stats.total_clusters()) != g.clusters || u64::from(stats.cluster_size()) != g.cluster_bytes() {
        return Err(CidataError::LayoutMismatch {
            planned: format!("{} with {} clusters of {} bytes", g.fat, g.clusters, g.cluster_bytes()),
            got: format!("{:?} with {} clusters of {} bytes", fs.fat_type(), stats.total_clusters(), stats.cluster_size()),
        });
    }
    {
        let root = fs.root_dir();
        for input in &plan.inputs {
            let mut f = root.create_file(input.name).map_err(step(&format!("creating {}", input.name)))?;
            f.write_all(&input.bytes).map_err(step(&format!("writing {}", input.name)))?;
            f.flush().map_err(step(&format!("writing {}", input.name)))?;
        }
    }
    let free_bytes = u64::from(fs.stats().map_err(step("reading the volume's statistics"))?.free_clusters()) * g.cluster_bytes();
    fs.unmount().map_err(step("closing the volume"))?;

    let mut reader = file;
    reader.seek(SeekFrom::Start(0)).map_err(step("reading the image back"))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = reader.read(&mut buf).map_err(step("reading the image back"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok((free_bytes, hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, files: &[(&str, &[u8])]) -> CidataOptions {
        for (name, bytes) in files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        let has = |name: &str| files.iter().any(|(n, _)| *n == name).then(|| dir.join(name));
        CidataOptions {
            user_data: dir.join("user-data"),
            meta_data: MetaData::File(dir.join("meta-data")),
            network_config: has("network-config"),
            vendor_data: has("vendor-data"),
            size: SeedSize::Auto,
            source_date_epoch: None,
        }
    }

    /// Our geometry is fatfs's: format volumes around every boundary (the
    /// smallest volume, FAT12/FAT16, each cluster-size step) and compare the
    /// FAT type, cluster count and cluster size fatfs reports.
    #[test]
    fn geometry_matches_fatfs() {
        let overhead = RESERVED_SECTORS + ROOT_SECTORS;
        let mut sectors: Vec<u64> = (10..40).chain([64, 128, 255, 256, 1000, 4000, 500_000, 1_000_000, 4_000_000]).collect();
        // FAT12 to FAT16 at 512-byte clusters, then each step to larger clusters
        // where FAT16 runs out of them.
        // (fatfs counts free clusters one FAT entry read at a time: fewer
        // points where the FATs are large.)
        let mut boundaries = vec![(FAT12_MAX_CLUSTERS + overhead + FATS * 12, 40), (FAT16_MAX_CLUSTERS + overhead + FATS * 256, 40)];
        boundaries.extend((1..6).map(|shift| (FAT16_MAX_CLUSTERS * (1 << shift) + overhead + FATS * 256, 4)));
        for (boundary, around) in boundaries {
            sectors.extend(boundary - around..boundary + around);
        }
        sectors.push(max_seed_bytes() / SECTOR);
        let mut checked = 0;
        for total in sectors {
            let Some(g) = Geometry::for_sectors(total) else { continue };
            // Sparse: the largest is 2 GiB of nothing.
            let file = tempfile::tempfile().unwrap();
            file.set_len(total * SECTOR).unwrap();
            let opts =
                fatfs::FormatVolumeOptions::new().total_sectors(total as u32).bytes_per_cluster(g.cluster_bytes() as u32).max_root_dir_entries(ROOT_ENTRIES);
            fatfs::format_volume(&file, opts).unwrap_or_else(|e| panic!("{total} sectors ({g:?}): {e}"));
            let fs = fatfs::FileSystem::new(&file, fatfs::FsOptions::new()).unwrap();
            let stats = fs.stats().unwrap();
            let fat = match fs.fat_type() {
                fatfs::FatType::Fat12 => FatKind::Fat12,
                fatfs::FatType::Fat16 => FatKind::Fat16,
                fatfs::FatType::Fat32 => panic!("{total} sectors: fatfs chose FAT32"),
            };
            assert_eq!((fat, u64::from(stats.total_clusters()), u64::from(stats.cluster_size())), (g.fat, g.clusters, g.cluster_bytes()), "{total} sectors");
            checked += 1;
        }
        assert!(checked > 200, "only {checked} sizes had a layout");
        assert_eq!(
            Geometry::for_sectors(max_seed_bytes() / SECTOR).map(|g| (g.fat, g.clusters, g.sectors_per_cluster)),
            Some((FatKind::Fat16, FAT16_MAX_CLUSTERS, 64))
        );
        assert_eq!(Geometry::for_sectors(max_seed_bytes() / SECTOR + 64), None, "nothing larger than the largest seed");
        assert_eq!(Geometry::for_sectors(RESERVED_SECTORS + ROOT_SECTORS + MIN_FAT_AND_DATA_SECTORS), None, "fatfs's smallest volume");
    }

    #[test]
    fn automatic_sizes() {
        let check = |lengths: &[u64], expected: (u64, FatKind, u64)| {
            let data: u64 = lengths.iter().sum();
            let g = smallest_geometry(lengths, (data / 4).max(MIN_FREE)).unwrap();
            assert_eq!((g.bytes(), g.fat, g.cluster_bytes()), expected, "{lengths:?}");
            assert_eq!(g.bytes() % SIZE_STEP, 0);
            let free = g.free_after(lengths).unwrap();
            assert!(free >= MIN_FREE && free >= data / 4, "{lengths:?}: {free} free");
            // One step smaller does not keep that much free.
            if let Some(smaller) = Geometry::for_sectors((g.bytes() - SIZE_STEP) / SECTOR) {
                assert!(smaller.free_after(lengths).is_none_or(|f| f < (data / 4).max(MIN_FREE)), "{lengths:?}: {smaller:?} would do");
            }
        };
        check(&[30, 40], (128 << 10, FatKind::Fat12, 512));
        check(&[0, 0], (128 << 10, FatKind::Fat12, 512));
        // 138 clusters of data and 128 free are more than 128 KiB's 249.
        check(&[70_000, 20], (192 << 10, FatKind::Fat12, 512));
        // 3.75 MiB has 7615 clusters, short of the 7681 needed; 61 steps have 7741.
        check(&[3 << 20, 100], (61 * SIZE_STEP, FatKind::Fat16, 512));
        // 2 KiB clusters (512 and 1024 would need over 65524); 51203 clusters of
        // data and 12801 free: 2005 steps have 64033, 2004 have 64001.
        check(&[100 << 20, 100, 10, 10], (2005 * SIZE_STEP, FatKind::Fat16, 2048));
    }

    #[test]
    fn fat_times() {
        let check = |epoch: Option<i64>, expected: (u16, u16, u16, u16, u16, u16)| {
            let t = fat_time(epoch.unwrap_or(FAT_FIRST_TIME).clamp(FAT_FIRST_TIME, FAT_LAST_TIME));
            assert_eq!((t.date.year, t.date.month, t.date.day, t.time.hour, t.time.min, t.time.sec), expected, "{epoch:?}");
        };
        check(None, (1980, 1, 1, 0, 0, 0));
        check(Some(0), (1980, 1, 1, 0, 0, 0));
        check(Some(-5), (1980, 1, 1, 0, 0, 0));
        check(Some(1_700_000_000), (2023, 11, 14, 22, 13, 20));
        check(Some(951_782_400), (2000, 2, 29, 0, 0, 0));
        check(Some(4_354_819_198), (2107, 12, 31, 23, 59, 58));
        check(Some(i64::MAX), (2107, 12, 31, 23, 59, 58));
    }

    #[test]
    fn generated_meta_data_and_its_checks() {
        assert_eq!(generated_meta_data("iid-local01", Some("seed-vm")).unwrap(), b"instance-id: iid-local01\nlocal-hostname: seed-vm\n");
        assert_eq!(generated_meta_data("i.x_Y-1", None).unwrap(), b"instance-id: i.x_Y-1\n");
        for bad in ["", "1234", "2024-01-01", "-x", "a b", "a:b", "yes", "Off", "null", "caf\u{e9}", "x\ny: 1"] {
            let err = generated_meta_data(bad, None).unwrap_err();
            assert!(matches!(&err, CidataError::MetaValue { flag: "--instance-id", value } if value == bad), "{bad:?}: {err}");
        }
        let err = generated_meta_data("ok", Some("no")).unwrap_err();
        assert!(err.to_string().contains("--hostname \"no\""), "{err}");
    }

    /// The label in both places blkid and cloud-init read it, the volume ID,
    /// the timestamps, and the same bytes twice.
    #[test]
    fn label_volume_id_and_determinism() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), &[("user-data", b"#cloud-config\n"), ("meta-data", b"instance-id: a\n"), ("network-config", b"version: 2\n")]);
        opts.source_date_epoch = Some(1_700_000_000);
        let out = dir.path().join("seed.img");
        let summary = write(&opts, &out).unwrap();
        let image = std::fs::read(&out).unwrap();
        assert_eq!(image.len() as u64, summary.bytes);
        assert_eq!(summary.bytes, 128 << 10);
        assert_eq!(summary.fat, FatKind::Fat12);
        assert_eq!(summary.files.iter().map(|f| f.name).collect::<Vec<_>>(), ["user-data", "meta-data", "network-config"]);
        assert_eq!(hex::encode(Sha256::digest(&image)), summary.sha256);
        // FAT12/16 boot sector: volume ID at 39, label at 43, type at 54.
        assert_eq!(&image[43..54], b"cidata     ");
        assert_eq!(&image[54..62], b"FAT12   ");
        let id = u32::from_le_bytes(image[39..43].try_into().unwrap());
        assert_eq!(format!("{:04X}-{:04X}", id >> 16, id & 0xffff), summary.volume_id);
        // The root directory follows the reserved sector and both FATs; its
        // first entry is the volume label (attribute 0x08).
        let sectors_per_fat = u64::from(u16::from_le_bytes([image[22], image[23]]));
        let root = ((RESERVED_SECTORS + FATS * sectors_per_fat) * SECTOR) as usize;
        assert_eq!(&image[root..root + 11], b"cidata     ");
        assert_eq!(image[root + 11], 0x08);
        // Every file entry carries the epoch: 2023-11-14 22:13:20 as DOS date/time.
        let dos_date = ((2023 - 1980) << 9) | (11 << 5) | 14u16;
        let dos_time = (22 << 11) | (13 << 5) | (20 / 2u16);
        let files: Vec<&[u8]> =
            image[root..root + ROOT_SECTORS as usize * 512].chunks(32).filter(|e| e[0] != 0 && e[11] & 0x0f != 0x0f && e[11] & 0x08 == 0).collect();
        assert_eq!(files.len(), 3, "three short-name entries");
        for e in files {
            let word = |at: usize| u16::from_le_bytes([e[at], e[at + 1]]);
            assert_eq!((word(16), word(18), word(24)), (dos_date, dos_date, dos_date), "created, accessed, modified dates");
            assert_eq!((word(14), word(22)), (dos_time, dos_time), "created, modified times");
        }

        let again = dir.path().join("again.img");
        write(&opts, &again).unwrap();
        assert_eq!(std::fs::read(&again).unwrap(), image, "the same inputs give the same bytes");
        opts.source_date_epoch = None;
        let older = write(&opts, &again).unwrap();
        assert_ne!(older.volume_id, summary.volume_id, "the volume ID covers the timestamp");
    }

    #[test]
    fn sizes_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(dir.path(), &[("user-data", &[7u8; 100_000]), ("meta-data", b"instance-id: a\n")]);
        let out = dir.path().join("seed.img");

        opts.size = SeedSize::Fixed(1000);
        assert!(matches!(write(&opts, &out), Err(CidataError::SizeUnaligned { size: 1000 })));
        opts.size = SeedSize::Fixed(64 << 10);
        let err = write(&opts, &out).unwrap_err();
        let CidataError::SizeTooSmall { needed, largest: "user-data", largest_bytes: 100_000, .. } = err else { panic!("{err}") };
        assert!(err.to_string().contains(&format!("needs at least {needed} bytes")), "{err}");
        opts.size = SeedSize::Fixed(needed);
        assert_eq!(write(&opts, &out).unwrap().bytes, needed, "the size named is enough");
        opts.size = SeedSize::Fixed(needed - SIZE_STEP);
        assert!(matches!(write(&opts, &out), Err(CidataError::SizeTooSmall { .. })), "and one step less is not");
        opts.size = SeedSize::Fixed(3 << 30);
        assert!(matches!(write(&opts, &out), Err(CidataError::SizeTooLarge { .. })));
        opts.size = SeedSize::Fixed(10 << 20);
        let s = write(&opts, &out).unwrap();
        assert_eq!((s.bytes, s.fat, s.cluster_bytes), (10 << 20, FatKind::Fat16, 512));

        opts.size = SeedSize::Auto;
        opts.vendor_data = Some(dir.path().join("nope"));
        let err = write(&opts, &out).unwrap_err();
        assert!(matches!(&err, CidataError::Read { name: "vendor-data", path, .. } if path.ends_with("nope")), "{err}");
        opts.vendor_data = Some(dir.path().to_path_buf());
        assert!(matches!(write(&opts, &out), Err(CidataError::NotAFile { name: "vendor-data", .. })));

        // Larger than any seed: refused from its length, before it is read (sparse).
        opts.vendor_data = None;
        let big = dir.path().join("big");
        File::create(&big).unwrap().set_len(3 << 30).unwrap();
        opts.user_data = big;
        let err = write(&opts, &out).unwrap_err();
        assert!(matches!(&err, CidataError::TooLarge { largest: "user-data", largest_bytes, .. } if *largest_bytes == 3 << 30), "{err}");
    }
}
