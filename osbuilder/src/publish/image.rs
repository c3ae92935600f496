//! The images we publish, as bytes: manifests, configs and their layers.
//!
//! - **containerDisk** (KubeVirt): one tar layer holding `disk/` (0555) and
//!   one disk file in it (`disk/disk.qcow2`, or `disk/disk.img` for a raw
//!   disk; 0444), all owned 107:107 (`qemu`), nothing else; optionally
//!   `boot/vmlinuz` and `boot/initrd.img` beside it. A normal image manifest
//!   (OCI, or Docker v2 schema 2), so kubelet pulls it like any image.
//! - **kernel-boot**: `boot/vmlinuz` and `boot/initrd.img` (0444, 107:107) for
//!   KubeVirt's `kernelBoot.container`.
//! - **bundle**: an OCI 1.1 artifact (`artifactType`
//!   [`BUNDLE_ARTIFACT_TYPE`], the empty config), one layer per file with its
//!   media type and an `org.opencontainers.image.title`, so ORAS-style
//!   clients can pull one file.
//! - Several platforms give an index (or a Docker manifest list) over
//!   per-platform manifests.
//!
//! JSON is written compactly with fields in a fixed order, annotations
//! sorted, and nothing taken from the clock: the `created` time and every
//! mtime is SOURCE_DATE_EPOCH (given, or the disk's build report's), else
//! absent and 0. The same files give the same digests on every machine.

use std::collections::BTreeMap;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::tar::{TarEntry, TarKind};
use super::{io_err, prepare_layer, Blob, LayerCompression, PublishError};
use crate::disk::qcow2;
use crate::oci::cache::BlobCache;
use crate::oci::digest::Digest;
use crate::oci::manifest::{Platform, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use crate::progress::Progress;

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const BUNDLE_ARTIFACT_TYPE: &str = "application/vnd.osbuilder.guest.v1";
pub const TITLE: &str = "org.opencontainers.image.title";
pub const CREATED: &str = "org.opencontainers.image.created";
/// Our annotation keys.
pub const ANN_PREFIX: &str = "dev.osbuilder.";
/// Where a containerDisk's disk sits inside its uncompressed layer blob.
pub const ANN_DISK_OFFSET: &str = "dev.osbuilder.disk.offset";
pub const ANN_DISK_SIZE: &str = "dev.osbuilder.disk.size";
pub const ANN_DISK_PATH: &str = "dev.osbuilder.disk.path";
pub const ANN_DISK_SHA256: &str = "dev.osbuilder.disk.sha256";
pub const ANN_DISK_FORMAT: &str = "dev.osbuilder.disk.format";

/// The fixed paths of a kernel-boot image (KubeVirt's `kernelPath` and `initrdPath`).
pub const KERNEL_PATH: &str = "/boot/vmlinuz";
pub const INITRD_PATH: &str = "/boot/initrd.img";

const QEMU_ID: u64 = 107;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum ManifestFormat {
    /// OCI image manifest and index.
    Oci,
    /// Docker v2 schema 2 manifest and manifest list.
    V2s2,
}

/// The disk file a containerDisk carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum DiskFileFormat {
    /// qcow2 as given; a raw disk is converted (a layer cannot carry holes).
    Qcow2,
    /// The raw disk as given (a qcow2 input is refused).
    Raw,
}

/// One manifest (or index) ready to push, and the blobs it names.
#[derive(Debug)]
pub struct PublishedManifest {
    pub platform: Option<Platform>,
    pub media_type: String,
    pub bytes: Vec<u8>,
    pub digest: Digest,
    /// Config first, then the layers.
    pub blobs: Vec<Blob>,
    /// (layer digest, path in the layer, file digest) to check on `--verify`.
    files: Vec<(Digest, String, Digest)>,
}

impl PublishedManifest {
    pub(super) fn files_of(&self, layer: &Digest) -> Vec<(&String, &Digest)> {
        self.files.iter().filter(|(l, _, _)| l == layer).map(|(_, n, d)| (n, d)).collect()
    }
}

/// What one `osbuilder push` sends.
#[derive(Debug)]
pub struct Publication {
    manifests: Vec<PublishedManifest>,
    index: Option<PublishedManifest>,
    /// Files made for this push (a converted disk), removed when done.
    _scratch: Vec<tempfile::TempPath>,
}

impl Publication {
    /// The document the tag names: the index if there is one.
    pub fn top(&self) -> &PublishedManifest {
        self.index.as_ref().unwrap_or(&self.manifests[0])
    }

    pub fn manifests(&self) -> &[PublishedManifest] {
        &self.manifests
    }

    pub fn index(&self) -> Option<&PublishedManifest> {
        self.index.as_ref()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DescriptorOut<'a> {
    media_type: &'a str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    platform: Option<&'a Platform>,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ManifestOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    artifact_type: Option<&'a str>,
    config: DescriptorOut<'a>,
    layers: Vec<DescriptorOut<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct IndexOut<'a> {
    schema_version: u32,
    media_type: &'a str,
    manifests: Vec<DescriptorOut<'a>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: &'a BTreeMap<String, String>,
}

fn descriptor<'a>(blob: &'a Blob, annotate: bool) -> DescriptorOut<'a> {
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    DescriptorOut {
        media_type: &blob.media_type,
        digest: blob.digest.to_string(),
        size: blob.size,
        data: None,
        platform: None,
        artifact_type: None,
        annotations: if annotate { &blob.annotations } else { &EMPTY },
    }
}

/// The image config of a containerDisk or kernel-boot image.
fn image_config(platform: &Platform, diff_ids: &[Digest], epoch: Option<i64>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Config<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        created: Option<String>,
        architecture: &'a str,
        os: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        variant: Option<&'a str>,
        rootfs: Rootfs,
    }
    #[derive(Serialize)]
    struct Rootfs {
        r#type: &'static str,
        diff_ids: Vec<String>,
    }
    let config = Config {
        created: epoch.map(rfc3339),
        architecture: &platform.architecture,
        os: &platform.os,
        variant: platform.variant.as_deref(),
        rootfs: Rootfs { r#type: "layers", diff_ids: diff_ids.iter().map(Digest::to_string).collect() },
    };
    serde_json::to_vec(&config).expect("serializable")
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the epoch.
pub fn rfc3339(secs: i64) -> String {
    crate::time::Civil::from_epoch(secs).rfc3339()
}

fn owned(name: &str, kind: TarKind, mode: u32) -> TarEntry {
    TarEntry { name: name.into(), kind, mode, uid: QEMU_ID, gid: QEMU_ID, uname: "qemu".into(), gname: "qemu".into() }
}

/// `disk/` and `disk/NAME`, as KubeVirt expects them.
pub fn disk_entries(name: &str, disk: &Path) -> Vec<TarEntry> {
    vec![owned("disk", TarKind::Dir, 0o555), owned(&format!("disk/{name}"), TarKind::File { path: disk.to_path_buf() }, 0o444)]
}

fn boot_entries(kernel: &Path, initrd: Option<&Path>) -> Vec<TarEntry> {
    let mut v = vec![owned("boot", TarKind::Dir, 0o555), owned(&KERNEL_PATH[1..], TarKind::File { path: kernel.to_path_buf() }, 0o444)];
    if let Some(initrd) = initrd {
        v.push(owned(&INITRD_PATH[1..], TarKind::File { path: initrd.to_path_buf() }, 0o444));
    }
    v
}

/// Options shared by the image kinds.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    pub manifest_format: ManifestFormat,
    pub compression: LayerCompression,
    /// SOURCE_DATE_EPOCH: the `created` time and every mtime.
    pub epoch: Option<i64>,
    /// Annotations for the manifest (ours and the user's).
    pub annotations: BTreeMap<String, String>,
    pub cache: BlobCache,
}

impl ImageOptions {
    fn check(&self) -> Result<(), PublishError> {
        if self.manifest_format == ManifestFormat::V2s2 && self.compression == LayerCompression::Zstd {
            return Err(PublishError::Usage("Docker v2 schema 2 has no zstd layers: use --layer-compression gzip or none, or the OCI format".into()));
        }
        Ok(())
    }

    fn manifest_annotations(&self) -> BTreeMap<String, String> {
        let mut a = self.annotations.clone();
        if let Some(epoch) = self.epoch {
            a.entry(CREATED.into()).or_insert_with(|| rfc3339(epoch));
        }
        a
    }
}

/// An image manifest over `layers` for `platform`.
fn image_manifest(platform: &Platform, layers: Vec<super::PreparedLayer>, opts: &ImageOptions) -> PublishedManifest {
    let v2 = opts.manifest_format == ManifestFormat::V2s2;
    let diff_ids: Vec<Digest> = layers.iter().map(|l| l.diff_id.clone()).collect();
    let config = Blob::from_bytes(if v2 { DOCKER_CONFIG } else { OCI_CONFIG }, image_config(platform, &diff_ids, opts.epoch));
    let mut files = Vec::new();
    let mut blobs = vec![config];
    for mut layer in layers {
        if v2 {
            layer.blob.media_type = match layer.blob.media_type.rsplit_once('+') {
                Some((_, "gzip")) => "application/vnd.docker.image.rootfs.diff.tar.gzip".into(),
                _ => "application/vnd.docker.image.rootfs.diff.tar".into(),
            };
        }
        for (p, d) in &layer.files {
            files.push((layer.blob.digest.clone(), p.name.clone(), d.clone()));
        }
        blobs.push(layer.blob);
    }
    // Docker v2 schema 2 has no annotations.
    let annotations = if v2 { BTreeMap::new() } else { opts.manifest_annotations() };
    let out = ManifestOut {
        schema_version: 2,
        media_type: if v2 { DOCKER_MANIFEST } else { OCI_MANIFEST },
        artifact_type: None,
        config: descriptor(&blobs[0], !v2),
        layers: blobs[1..].iter().map(|b| descriptor(b, !v2)).collect(),
        annotations: &annotations,
    };
    let bytes = serde_json::to_vec(&out).expect("serializable");
    PublishedManifest {
        platform: Some(platform.clone()),
        media_type: if v2 { DOCKER_MANIFEST } else { OCI_MANIFEST }.into(),
        digest: Digest::of_bytes(&bytes),
        bytes,
        blobs,
        files,
    }
}

fn index_over(manifests: &[PublishedManifest], opts: &ImageOptions) -> PublishedManifest {
    let v2 = opts.manifest_format == ManifestFormat::V2s2;
    let annotations = if v2 { BTreeMap::new() } else { opts.manifest_annotations() };
    static EMPTY: BTreeMap<String, String> = BTreeMap::new();
    let out = IndexOut {
        schema_version: 2,
        media_type: if v2 { DOCKER_LIST } else { OCI_INDEX },
        manifests: manifests
            .iter()
            .map(|m| DescriptorOut {
                media_type: &m.media_type,
                digest: m.digest.to_string(),
                size: m.bytes.len() as u64,
                data: None,
                platform: m.platform.as_ref(),
                artifact_type: None,
                annotations: &EMPTY,
            })
            .collect(),
        annotations: &annotations,
    };
    let bytes = serde_json::to_vec(&out).expect("serializable");
    PublishedManifest {
        platform: None,
        media_type: if v2 { DOCKER_LIST } else { OCI_INDEX }.into(),
        digest: Digest::of_bytes(&bytes),
        bytes,
        blobs: Vec::new(),
        files: Vec::new(),
    }
}

/// One disk of a containerDisk.
#[derive(Clone, Debug)]
pub struct DiskInput {
    pub platform: Platform,
    pub path: PathBuf,
    /// The sha256 (hex) the disk must have: its build report's. Checked from
    /// the read the layer needs anyway.
    pub expect_sha256: Option<String>,
}

/// A containerDisk: one manifest per disk (an index over them when several),
/// each with the kernel and initrd beside the disk when given.
pub fn containerdisk(
    disks: &[DiskInput],
    want: DiskFileFormat,
    boot: Option<(&Path, Option<&Path>)>,
    opts: &ImageOptions,
    progress: &Progress,
) -> Result<Publication, PublishError> {
    opts.check()?;
    if disks.is_empty() {
        return Err(PublishError::Usage("give at least one disk".into()));
    }
    check_platforms(disks.iter().map(|d| &d.platform))?;
    let mut scratch = Vec::new();
    let mut manifests = Vec::new();
    for disk in disks {
        let (path, format, converted_from) = disk_file(&disk.path, want, &opts.cache, &mut scratch, progress)?;
        let name = match format {
            DiskFileFormat::Qcow2 => "disk.qcow2",
            DiskFileFormat::Raw => "disk.img",
        };
        let mut entries = disk_entries(name, &path);
        if let Some((kernel, initrd)) = boot {
            entries.extend(boot_entries(kernel, initrd));
        }
        let mtime = opts.epoch.unwrap_or(0).max(0) as u64;
        let mut layer = prepare_layer(&entries, mtime, opts.compression, &opts.cache, progress)?;
        let (placement, disk_digest) = layer.files[0].clone();
        if let Some(want) = &disk.expect_sha256 {
            let got = converted_from.as_ref().unwrap_or(&disk_digest);
            if want != got.hex() {
                return Err(PublishError::Input(format!(
                    "{} is not the disk its report describes (sha256 {want} there, {} here)",
                    disk.path.display(),
                    got.hex()
                )));
            }
        }
        let a = &mut layer.blob.annotations;
        a.insert(ANN_DISK_PATH.into(), format!("/{}", placement.name));
        a.insert(ANN_DISK_SHA256.into(), disk_digest.to_string());
        a.insert(ANN_DISK_FORMAT.into(), if format == DiskFileFormat::Qcow2 { "qcow2" } else { "raw" }.into());
        a.insert(ANN_DISK_SIZE.into(), placement.len.to_string());
        if opts.compression == LayerCompression::None {
            a.insert(ANN_DISK_OFFSET.into(), placement.offset.to_string());
        }
        manifests.push(image_manifest(&disk.platform, vec![layer], opts));
    }
    let index = (manifests.len() > 1).then(|| index_over(&manifests, opts));
    Ok(Publication { manifests, index, _scratch: scratch })
}

/// A kernel-boot image: the kernel and initrd at [`KERNEL_PATH`] and [`INITRD_PATH`].
pub fn kernel_boot(platform: &Platform, kernel: &Path, initrd: Option<&Path>, opts: &ImageOptions, progress: &Progress) -> Result<Publication, PublishError> {
    opts.check()?;
    for p in std::iter::once(kernel).chain(initrd) {
        must_be_file(p)?;
    }
    let mtime = opts.epoch.unwrap_or(0).max(0) as u64;
    let layer = prepare_layer(&boot_entries(kernel, initrd), mtime, opts.compression, &opts.cache, progress)?;
    Ok(Publication { manifests: vec![image_manifest(platform, vec![layer], opts)], index: None, _scratch: Vec::new() })
}

/// A file of a bundle.
#[derive(Clone, Debug)]
pub struct BundleFile {
    pub path: PathBuf,
    /// The `org.opencontainers.image.title` (the file name, unique in the bundle).
    pub title: String,
    pub media_type: String,
}

impl BundleFile {
    /// A file named by its base name, its media type sniffed from `role`
    /// and its first bytes.
    pub fn new(path: &Path, role: FileRole) -> Result<BundleFile, PublishError> {
        must_be_file(path)?;
        let title = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| PublishError::Usage(format!("{}: the file name must be UTF-8", path.display())))?
            .to_string();
        let media_type = role.media_type(path)?;
        Ok(BundleFile { path: path.to_path_buf(), title, media_type })
    }
}

/// What a bundle file is, for its media type.
#[derive(Clone, Debug)]
pub enum FileRole {
    Kernel,
    Initrd,
    Disk,
    Report,
    Launch,
    Other(Option<String>),
}

impl FileRole {
    fn media_type(&self, path: &Path) -> Result<String, PublishError> {
        let mut head = [0u8; 8];
        let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(io_err(format!("cannot read {}", path.display())))?;
        let head = &head[..n];
        Ok(match self {
            FileRole::Kernel => "application/vnd.osbuilder.kernel.v1".into(),
            FileRole::Initrd => {
                let suffix = if head.starts_with(&[0x1f, 0x8b]) {
                    "+gzip"
                } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
                    "+zstd"
                } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
                    "+xz"
                } else if head.starts_with(&[0x02, 0x21, 0x4c, 0x18]) || head.starts_with(&[0x04, 0x22, 0x4d, 0x18]) {
                    "+lz4"
                } else {
                    ""
                };
                format!("application/vnd.osbuilder.initrd.v1.cpio{suffix}")
            }
            FileRole::Disk => format!("application/vnd.osbuilder.disk.v1.{}", if qcow2::is_qcow2(head) { "qcow2" } else { "raw" }),
            FileRole::Report => "application/vnd.osbuilder.report.v1+json".into(),
            FileRole::Launch => "application/vnd.osbuilder.launch.v1+json".into(),
            FileRole::Other(Some(t)) => t.clone(),
            FileRole::Other(None) => "application/octet-stream".into(),
        })
    }
}

/// An OCI 1.1 artifact with one layer per file.
pub fn bundle(files: &[BundleFile], opts: &ImageOptions) -> Result<Publication, PublishError> {
    if opts.manifest_format == ManifestFormat::V2s2 {
        return Err(PublishError::Usage("a bundle is an OCI 1.1 artifact; Docker v2 schema 2 cannot carry one".into()));
    }
    let mut titles = std::collections::BTreeSet::new();
    let mut blobs = vec![Blob::from_bytes(OCI_EMPTY, b"{}".to_vec())];
    for f in files {
        if !titles.insert(f.title.clone()) {
            return Err(PublishError::Usage(format!("two files of the bundle are named {:?}", f.title)));
        }
        let mut blob = Blob::from_file(&f.media_type, &f.path)?;
        blob.annotations.insert(TITLE.into(), f.title.clone());
        blobs.push(blob);
    }
    let annotations = opts.manifest_annotations();
    let mut config = descriptor(&blobs[0], false);
    config.data = Some("e30=");
    let out = ManifestOut {
        schema_version: 2,
        media_type: OCI_MANIFEST,
        artifact_type: Some(BUNDLE_ARTIFACT_TYPE),
        config,
        layers: blobs[1..].iter().map(|b| descriptor(b, true)).collect(),
        annotations: &annotations,
    };
    let bytes = serde_json::to_vec(&out).expect("serializable");
    let manifest = PublishedManifest { platform: None, media_type: OCI_MANIFEST.into(), digest: Digest::of_bytes(&bytes), bytes, blobs, files: Vec::new() };
    Ok(Publication { manifests: vec![manifest], index: None, _scratch: Vec::new() })
}

fn must_be_file(p: &Path) -> Result<(), PublishError> {
    let md = std::fs::metadata(p).map_err(|e| PublishError::Input(format!("{}: {e}", p.display())))?;
    if !md.is_file() {
        return Err(PublishError::Input(format!("{} is not a regular file", p.display())));
    }
    Ok(())
}

fn check_platforms<'a>(platforms: impl Iterator<Item = &'a Platform>) -> Result<(), PublishError> {
    let mut seen = std::collections::BTreeSet::new();
    for p in platforms {
        if !seen.insert(p.to_string()) {
            return Err(PublishError::Usage(format!("two disks for platform {p}")));
        }
    }
    Ok(())
}

/// The disk file to put in the layer: a qcow2 as given (if self-contained),
/// a raw disk as given or converted to qcow2 into the cache's scratch space
/// (then with the raw disk's digest, computed while converting).
fn disk_file(
    path: &Path,
    want: DiskFileFormat,
    cache: &BlobCache,
    scratch: &mut Vec<tempfile::TempPath>,
    progress: &Progress,
) -> Result<(PathBuf, DiskFileFormat, Option<Digest>), PublishError> {
    must_be_file(path)?;
    let mut head = vec![0u8; 512];
    let n = std::fs::File::open(path).and_then(|mut f| f.read(&mut head)).map_err(io_err(format!("cannot read {}", path.display())))?;
    head.truncate(n);
    if n == 0 {
        return Err(PublishError::Input(format!("{} is empty", path.display())));
    }
    if qcow2::is_qcow2(&head) {
        let header = qcow2::parse_header(&head).map_err(|e| PublishError::Input(format!("{}: {e}", path.display())))?;
        qcow2::check_self_contained(&header)
            .map_err(|e| PublishError::Input(format!("{}: {e} (KubeVirt needs a disk without a backing file)", path.display())))?;
        if want == DiskFileFormat::Raw {
            return Err(PublishError::Usage(format!("{} is qcow2; --disk-format raw takes a raw disk", path.display())));
        }
        return Ok((path.to_path_buf(), DiskFileFormat::Qcow2, None));
    }
    if want == DiskFileFormat::Raw {
        return Ok((path.to_path_buf(), DiskFileFormat::Raw, None));
    }
    let (out, raw_digest) = raw_to_qcow2(path, cache, progress)?;
    let p = out.to_path_buf();
    scratch.push(out);
    Ok((p, DiskFileFormat::Qcow2, Some(raw_digest)))
}

/// Converts a raw disk to qcow2 (all-zero clusters left unallocated) with
/// our own writer, into the cache's temporary directory; returns it and the
/// raw disk's digest.
fn raw_to_qcow2(path: &Path, cache: &BlobCache, progress: &Progress) -> Result<(tempfile::TempPath, Digest), PublishError> {
    use crate::disk::Sink;
    use sha2::Digest as _;
    let size = std::fs::metadata(path).map_err(io_err(format!("cannot read {}", path.display())))?.len();
    if size % 512 != 0 {
        return Err(PublishError::Input(format!("{} is {size} bytes, not a whole number of 512-byte sectors; is it a disk?", path.display())));
    }
    let dir = cache.root().join("blobs/tmp");
    std::fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(format!("cannot create a file in {}", dir.display())))?;
    let (file, tmp_path) = tmp.into_parts();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let werr = io_err(format!("cannot convert {} to qcow2", path.display()));
    let mut w = qcow2::Qcow2Writer::new(io::BufWriter::new(file), size, qcow2::Qcow2Options { compress: false, threads }).map_err(werr)?;
    let mut src = std::fs::File::open(path).map_err(io_err(format!("cannot read {}", path.display())))?;
    let bar = progress.bytes("convert to qcow2".to_string(), size);
    let mut buf = vec![0u8; 1 << 20];
    let mut raw_hash = sha2::Sha256::new();
    let mut pos = 0u64;
    const CLUSTER: usize = 64 << 10;
    let werr = |e| PublishError::Io { context: format!("cannot convert {} to qcow2", path.display()), source: e };
    while pos < size {
        let want = ((size - pos) as usize).min(buf.len());
        src.read_exact(&mut buf[..want]).map_err(werr)?;
        raw_hash.update(&buf[..want]);
        for c in buf[..want].chunks(CLUSTER) {
            if c.iter().all(|&b| b == 0) {
                w.zeros(c.len() as u64).map_err(werr)?;
            } else {
                w.write_all(c).map_err(werr)?;
            }
        }
        pos += want as u64;
        bar.set_position(pos);
    }
    bar.finish_and_clear();
    let (out, _summary) = w.finish().map_err(werr)?;
    out.into_inner().map_err(|e| werr(e.into_error()))?.sync_data().map_err(werr)?;
    let digest = format!("sha256:{}", hex::encode(raw_hash.finalize())).parse().expect("a sha256 we computed");
    Ok((tmp_path, digest))
}

/// The sha256 of every regular file in a layer blob (plain, gzip or zstd
/// tar), by path without a leading `./` or `/`.
pub fn layer_file_digests(path: &Path) -> io::Result<BTreeMap<String, Digest>> {
    let file = std::fs::File::open(path)?;
    let reader = crate::oci::decompress(file)?;
    let mut archive = ::tar::Archive::new(reader);
    let mut out = BTreeMap::new();
    for entry in archive.entries()? {
        let entry = entry?;
        if entry.header().entry_type() != ::tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").trim_start_matches('/').to_string();
        let mut hashing = crate::oci::digest::HashingReader::new(entry);
        io::copy(&mut hashing, &mut io::sink())?;
        out.insert(name, hashing.finish()?.0);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}
