//! Image intake: registries, OCI layouts and docker archives, resolved to one
//! [`Image`] whose layers are verified and applied, in order, to a
//! [`crate::rootfs::Tree`].
//!
//! Every blob is checked against its digest before a parser sees it, and is
//! then read from the same open file (never reopened by path): registry blobs
//! while they stream into the cache (a cached one by a hashing pass), local
//! blobs by a hashing pass, docker-archive layers whose names carry no digest
//! by a decompressing pass against the config's `diff_id`; JSON documents are
//! checked in memory, as parsed. The uncompressed stream of every layer is
//! also checked against the config's `diff_ids` as it is applied (which also
//! catches a local file changed in place between the check and the parse).
//! Layers are fetched concurrently but applied strictly in order, never held
//! whole in memory.

pub mod auth;
pub mod cache;
pub mod digest;
pub mod http;
pub mod manifest;

mod archive;
mod layout;
mod registry;

pub use http::is_loopback as registry_is_loopback;

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use crate::progress::Progress;
use crate::rootfs::{Intake, LayerError, LayerStats, Tree, RATIO_FLOOR};
use cache::BlobCache;
use digest::{Digest, HashingReader};
use manifest::{ImageConfig, ImageManifest, ManifestError, Platform};

/// Where an image comes from, in skopeo's transport syntax.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    /// `docker://HOST[:PORT]/REPO[:TAG|@DIGEST]`, or the same without the prefix.
    Registry(String),
    /// `oci:DIR[:REF]`: an OCI image layout directory.
    Layout { dir: PathBuf, reference: Option<String> },
    /// `docker-archive:FILE[:NAME:TAG]`: what `docker save` and skopeo write.
    DockerArchive { path: PathBuf, reference: Option<String> },
}

impl FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // A trailing `:ref` is split off only when it cannot be part of the
        // path (paths with colons must then carry an explicit ref).
        fn split_ref(rest: &str) -> (PathBuf, Option<String>) {
            match rest.split_once(':') {
                Some((dir, r)) if !r.is_empty() => (PathBuf::from(dir), Some(r.to_string())),
                _ => (PathBuf::from(rest.trim_end_matches(':')), None),
            }
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, reference) = split_ref(rest);
            return Ok(ImageRef::Layout { dir, reference });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (path, reference) = split_ref(rest);
            return Ok(ImageRef::DockerArchive { path, reference });
        }
        let name = s.strip_prefix("docker://").unwrap_or(s);
        if name.is_empty() || name.contains("://") {
            return Err(format!("image reference {s:?} is not one of docker://HOST/REPO:TAG, HOST/REPO:TAG, oci:DIR[:REF], docker-archive:FILE"));
        }
        oci_client::Reference::from_str(name).map_err(|e| format!("image reference {s:?}: {e}"))?;
        Ok(ImageRef::Registry(name.to_string()))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry(r) => write!(f, "docker://{r}"),
            ImageRef::Layout { dir, reference } => {
                write!(f, "oci:{}", dir.display())?;
                reference.iter().try_for_each(|r| write!(f, ":{r}"))
            }
            ImageRef::DockerArchive { path, reference } => {
                write!(f, "docker-archive:{}", path.display())?;
                reference.iter().try_for_each(|r| write!(f, ":{r}"))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { what: String, expected: Digest, actual: Digest },
    #[error("{what}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { what: String, expected: u64, actual: u64 },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("{context}: {source}")]
    Registry { context: String, source: Box<dyn std::error::Error + Send + Sync> },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Platform(String),
    #[error(transparent)]
    Blob(#[from] cache::CommitError),
    #[error("fetching layer {index} ({digest}) panicked: {message}")]
    FetchPanicked { index: usize, digest: String, message: String },
    #[error("layer {index} ({digest}): {source}")]
    Layer { index: usize, digest: String, source: LayerError },
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}

/// Knobs for resolving and fetching an image.
#[derive(Clone, Debug)]
pub struct PullOptions {
    pub platform: Platform,
    pub cache: BlobCache,
    /// `USER:PASSWORD` from the command line; see [`auth`] for other sources.
    pub credentials: Option<String>,
    /// Allow plain HTTP to a registry that is not on loopback.
    pub insecure: bool,
    /// How many layers are fetched at once.
    pub fetch_jobs: usize,
    /// Attempts after the first for a registry request or a blob transfer.
    pub retries: u32,
    /// How long a registry may leave a request unanswered or a transfer idle.
    pub timeout: std::time::Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::linux_amd64(),
            cache: BlobCache::new(BlobCache::default_dir()),
            credentials: None,
            insecure: false,
            fetch_jobs: 4,
            retries: 5,
            timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// One layer as the manifest (or docker archive) describes it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerInfo {
    /// The blob digest; `None` for legacy docker archives, whose layers are
    /// named by id and checked through `diff_id` instead.
    pub digest: Option<Digest>,
    pub media_type: String,
    pub size: u64,
    /// Digest of the uncompressed tar, from the config.
    pub diff_id: Option<Digest>,
}

impl LayerInfo {
    fn label(&self, index: usize) -> String {
        match &self.digest {
            Some(d) => d.to_string(),
            None => format!("#{index}"),
        }
    }
}

/// A byte range of a local file holding one verified blob. The file is the
/// one that was hashed, held open: parsing it reads the verified file even
/// if its name now points at another.
#[derive(Clone, Debug)]
pub struct BlobLocation {
    pub file: Arc<File>,
    pub offset: u64,
    pub len: u64,
}

impl BlobLocation {
    /// The blob's bytes, by positioned reads of the shared file.
    pub fn reader(&self) -> RangeReader {
        RangeReader { file: Arc::clone(&self.file), pos: self.offset, end: self.offset + self.len }
    }
}

/// Reads a byte range of a shared open file (positioned reads, so readers of
/// different ranges of one docker archive do not disturb each other).
pub struct RangeReader {
    file: Arc<File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.end - self.pos).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the blob is shorter than when it was verified"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Gets verified blobs onto the local disk.
trait BlobStore: Send + Sync {
    fn fetch_layer(&self, index: usize, layer: &LayerInfo, progress: &Progress) -> Result<BlobLocation, OciError>;
}

/// A resolved image: manifest and config read and verified, layers ready to fetch.
pub struct Image {
    pub reference: ImageRef,
    pub manifest_digest: Option<Digest>,
    pub manifest: Option<ImageManifest>,
    pub config_digest: Option<Digest>,
    pub config: ImageConfig,
    pub layers: Vec<LayerInfo>,
    store: Box<dyn BlobStore>,
}

impl Image {
    /// Resolves `reference` to one image manifest for `opts.platform`.
    pub fn open(reference: &ImageRef, opts: &PullOptions, progress: &Progress) -> Result<Image, OciError> {
        let image = match reference {
            ImageRef::Registry(name) => registry::open(name, opts, progress)?,
            ImageRef::Layout { dir, reference: r } => layout::open(dir, r.as_deref(), &opts.platform)?,
            ImageRef::DockerArchive { path, reference: r } => archive::open(path, r.as_deref())?,
        };
        let image = Image { reference: reference.clone(), ..image };
        image.check_platform(&opts.platform)?;
        Ok(image)
    }

    fn check_platform(&self, wanted: &Platform) -> Result<(), OciError> {
        let got = self.config.platform();
        // Configs without os/architecture exist (hand-made images), and many
        // omit the variant their index names: compare what the config states.
        let mismatch = (!got.os.is_empty() && got.os != wanted.os)
            || (!got.architecture.is_empty() && got.architecture != wanted.architecture)
            || (got.variant.is_some() && wanted.variant.is_some() && got.variant != wanted.variant);
        if mismatch {
            return Err(OciError::Platform(format!("{} is a {got} image, not {wanted}; pass --platform {got} to use it anyway", self.reference)));
        }
        Ok(())
    }

    pub fn platform(&self) -> Platform {
        self.config.platform()
    }

    /// Applies every layer to `tree` in order, fetching up to
    /// `fetch_jobs` layers ahead, within `intake`'s limits (file data
    /// spooled into its directory).
    pub fn apply_layers(&self, tree: &mut Tree, intake: &Intake, fetch_jobs: usize, progress: &Progress) -> Result<Vec<LayerStats>, OciError> {
        if !self.config.rootfs.diff_ids.is_empty() && self.config.rootfs.diff_ids.len() != self.layers.len() {
            return Err(OciError::Invalid(format!(
                "the image config lists {} diff_ids but the manifest has {} layers",
                self.config.rootfs.diff_ids.len(),
                self.layers.len()
            )));
        }
        let n = self.layers.len();
        let slots: Mutex<Vec<Option<Result<BlobLocation, OciError>>>> = Mutex::new((0..n).map(|_| None).collect());
        let ready = Condvar::new();
        let next = std::sync::atomic::AtomicUsize::new(0);
        let jobs = fetch_jobs.clamp(1, 8).min(n.max(1));
        std::thread::scope(|scope| {
            for _ in 0..jobs {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= n {
                        break;
                    }
                    let result = self.fetch_caught(i, progress);
                    let failed = result.is_err();
                    slots.lock().expect("slots")[i] = Some(result);
                    ready.notify_all();
                    if failed {
                        break;
                    }
                });
            }
            let mut stats = Vec::with_capacity(n);
            for i in 0..n {
                let location = {
                    let mut guard = slots.lock().expect("slots");
                    loop {
                        if let Some(result) = guard[i].take() {
                            break result;
                        }
                        guard = ready.wait(guard).expect("slots");
                    }
                };
                let location = match location {
                    Ok(l) => l,
                    Err(e) => {
                        // Let fetchers finish quickly: nobody will use their work.
                        next.store(n, std::sync::atomic::Ordering::SeqCst);
                        return Err(e);
                    }
                };
                match self.apply_one(tree, i, &location, intake, progress) {
                    Ok(s) => stats.push(s),
                    Err(e) => {
                        next.store(n, std::sync::atomic::Ordering::SeqCst);
                        return Err(e);
                    }
                }
            }
            Ok(stats)
        })
    }

    /// Fetches layer `i`, turning a panic in the store into an error: the
    /// applying thread waits for every slot to be filled, so a fetcher that
    /// unwound without filling its slot would leave it waiting forever.
    fn fetch_caught(&self, i: usize, progress: &Progress) -> Result<BlobLocation, OciError> {
        let fetch = std::panic::AssertUnwindSafe(|| self.store.fetch_layer(i, &self.layers[i], progress));
        std::panic::catch_unwind(fetch).unwrap_or_else(|payload| {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(OciError::FetchPanicked { index: i, digest: self.layers[i].label(i), message })
        })
    }

    fn apply_one(&self, tree: &mut Tree, index: usize, location: &BlobLocation, intake: &Intake, progress: &Progress) -> Result<LayerStats, OciError> {
        let layer = &self.layers[index];
        let label = layer.label(index);
        let bar = progress.bytes(format!("apply {}", short(&label)), location.len);
        let compressed = Arc::new(AtomicU64::new(0));
        let raw = Counting { inner: bar.wrap_read(location.reader()), count: compressed.clone() };
        let decoded = decompress(raw).map_err(io_err(format!("cannot read layer {label}")))?;
        let bounded = RatioGuard { inner: decoded, compressed, uncompressed: 0, max_ratio: intake.limits.max_ratio };
        let mut hashing = HashingReader::new(bounded);
        let stats = tree.apply_layer(&mut hashing, index as u32, intake).map_err(|source| OciError::Layer { index, digest: label.clone(), source })?;
        let (diff_id, _) = hashing.finish().map_err(io_err(format!("cannot read layer {label}")))?;
        bar.finish_and_clear();
        if let Some(expected) = self.config.rootfs.diff_ids.get(index) {
            if *expected != diff_id {
                return Err(OciError::DigestMismatch { what: format!("uncompressed layer {label} (diff_id)"), expected: expected.clone(), actual: diff_id });
            }
        }
        Ok(stats)
    }
}

fn short(label: &str) -> &str {
    label.get(..19).unwrap_or(label)
}

/// Counts the bytes read through it, for [`RatioGuard`] on the other side of
/// the decoder.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Fails a decompressed stream that grows past `max_ratio` times the
/// compressed bytes read so far, once past [`RATIO_FLOOR`]: a decompression
/// bomb costs at most that much work, whatever it would expand to. (The
/// decoder's read-ahead makes the measured ratio, if anything, smaller.)
struct RatioGuard<R> {
    inner: R,
    compressed: Arc<AtomicU64>,
    uncompressed: u64,
    max_ratio: u64,
}

impl<R: Read> Read for RatioGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.uncompressed += n as u64;
        let compressed = self.compressed.load(Ordering::Relaxed).max(1);
        if self.uncompressed > RATIO_FLOOR && self.uncompressed > compressed.saturating_mul(self.max_ratio) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} compressed bytes decompress to more than {} bytes, over the limit of {}:1 (a decompression bomb? raise the limit with --max-ratio)",
                    compressed, self.uncompressed, self.max_ratio
                ),
            ));
        }
        Ok(n)
    }
}

/// Wraps a layer stream in the decoder its first bytes call for: gzip, zstd
/// or plain tar. Magic numbers decide, not media types, which registries and
/// tools get wrong often enough.
pub fn decompress<R: Read + Send + 'static>(raw: R) -> io::Result<Box<dyn Read + Send>> {
    let mut buffered = BufReader::with_capacity(1 << 20, raw);
    let head = buffered.fill_buf()?;
    Ok(if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::Decoder::with_buffer(buffered)?)
    } else {
        Box::new(buffered)
    })
}

/// Checks a layer media type is one we can apply.
pub(crate) fn check_layer_media_type(media_type: &str, what: &str) -> Result<(), OciError> {
    const KNOWN: &[&str] = &[
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "",
    ];
    if KNOWN.contains(&media_type) {
        Ok(())
    } else {
        Err(OciError::Invalid(format!("{what} has media type {media_type:?}, which is not an image layer (tar, tar+gzip or tar+zstd)")))
    }
}

/// The largest JSON document (index, manifest, config) read into memory.
pub const MAX_JSON: u64 = 16 << 20;

/// Reads a small JSON document from a local file, refusing one over
/// [`MAX_JSON`] (by its size, and by reading no more than that).
pub(crate) fn read_json_file(path: &Path, what: &str) -> Result<Vec<u8>, OciError> {
    let file = File::open(path).map_err(io_err(format!("{what} ({})", path.display())))?;
    let mut bytes = Vec::new();
    file.take(MAX_JSON + 1).read_to_end(&mut bytes).map_err(io_err(format!("{what} ({})", path.display())))?;
    check_json_size(bytes.len() as u64, &path.display().to_string())?;
    Ok(bytes)
}

/// Refuses a JSON document over [`MAX_JSON`].
pub(crate) fn check_json_size(len: u64, what: &str) -> Result<(), OciError> {
    if len > MAX_JSON {
        return Err(OciError::Invalid(format!("{what} is over the {} MiB ({MAX_JSON}-byte) limit for JSON documents", MAX_JSON >> 20)));
    }
    Ok(())
}

/// Reads a small JSON blob from a local file, checking digest and size.
pub(crate) fn read_verified(path: &Path, expected: &Digest, size: Option<u64>, what: &str) -> Result<Vec<u8>, OciError> {
    if let Some(size) = size {
        check_json_size(size, &format!("{what} ({size} bytes by its descriptor)"))?;
    }
    let bytes = read_json_file(path, &format!("cannot read {what}"))?;
    verify_bytes(&bytes, expected, size, what)?;
    Ok(bytes)
}

pub(crate) fn verify_bytes(bytes: &[u8], expected: &Digest, size: Option<u64>, what: &str) -> Result<(), OciError> {
    if let Some(size) = size.filter(|&s| s != bytes.len() as u64) {
        return Err(OciError::SizeMismatch { what: what.to_string(), expected: size, actual: bytes.len() as u64 });
    }
    let actual = Digest::of_bytes(bytes);
    if actual != *expected {
        return Err(OciError::DigestMismatch { what: what.to_string(), expected: expected.clone(), actual });
    }
    Ok(())
}

/// Verifies a local blob (a byte range of an open file) against its digest.
pub(crate) fn verify_location(loc: &BlobLocation, expected: &Digest, size: u64, what: &str) -> Result<(), OciError> {
    if loc.len != size {
        return Err(OciError::SizeMismatch { what: what.to_string(), expected: size, actual: loc.len });
    }
    let actual = Digest::of_open_range(&loc.file, loc.offset, loc.len).map_err(io_err(format!("cannot read {what}")))?;
    if actual != *expected {
        return Err(OciError::DigestMismatch { what: what.to_string(), expected: expected.clone(), actual });
    }
    Ok(())
}

/// Verifies a layer known only by the digest of its uncompressed tar (a
/// docker-archive layer whose name carries no digest) in a decompressing
/// pass of its own, before the tar parser reads it.
pub(crate) fn verify_uncompressed(loc: &BlobLocation, expected: &Digest, what: &str) -> Result<(), OciError> {
    let decoded = decompress(loc.reader()).map_err(io_err(format!("cannot read {what}")))?;
    let (actual, _) = HashingReader::new(decoded).finish().map_err(io_err(format!("cannot read {what}")))?;
    if actual != *expected {
        return Err(OciError::DigestMismatch { what: what.to_string(), expected: expected.clone(), actual });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str, expected: Result<ImageRef, &str>) {
        match (s.parse::<ImageRef>(), expected) {
            (Ok(got), Ok(want)) => assert_eq!(got, want),
            (Err(e), Err(want)) => assert!(e.contains(want), "{s}: {e}"),
            (got, want) => panic!("{s}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn image_refs() {
        check("docker://127.0.0.1:5000/library/debian:bookworm", Ok(ImageRef::Registry("127.0.0.1:5000/library/debian:bookworm".into())));
        check(
            "127.0.0.1:5000/debian@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            Ok(ImageRef::Registry("127.0.0.1:5000/debian@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into())),
        );
        check("oci:/tmp/layout:bookworm", Ok(ImageRef::Layout { dir: "/tmp/layout".into(), reference: Some("bookworm".into()) }));
        check("oci:/tmp/layout", Ok(ImageRef::Layout { dir: "/tmp/layout".into(), reference: None }));
        check("docker-archive:/tmp/a.tar", Ok(ImageRef::DockerArchive { path: "/tmp/a.tar".into(), reference: None }));
        check("docker-archive:/tmp/a.tar:img:v1", Ok(ImageRef::DockerArchive { path: "/tmp/a.tar".into(), reference: Some("img:v1".into()) }));
        check("http://example.com/x", Err("is not one of"));
        check("Upper/Case:tag", Err("image reference"));
    }

    fn one_file_tar(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    /// Writes a one-layer OCI layout into `dir` (the layer uncompressed, the
    /// config without diff_ids, so only the blob digest guards the layer)
    /// and returns the layer blob's path.
    fn one_layer_layout(dir: &Path, layer: &[u8]) -> PathBuf {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        let put = |bytes: &[u8]| {
            let digest = Digest::of_bytes(bytes);
            std::fs::write(blobs.join(digest.hex()), bytes).unwrap();
            serde_json::json!({"digest": digest.to_string(), "size": bytes.len()})
        };
        let mut layer_desc = put(layer);
        layer_desc["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
        let config = put(br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#);
        let manifest = serde_json::json!({"schemaVersion": 2, "config": config, "layers": [layer_desc]});
        let mut manifest_desc = put(manifest.to_string().as_bytes());
        manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
        std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        blobs.join(Digest::of_bytes(layer).hex())
    }

    #[test]
    fn a_verified_layer_is_read_from_the_file_that_was_verified() {
        let tmp = tempfile::tempdir().unwrap();
        let blob = one_layer_layout(tmp.path(), &one_file_tar("f", b"verified"));
        let progress = Progress::hidden();
        let reference = ImageRef::Layout { dir: tmp.path().to_path_buf(), reference: None };
        let image = Image::open(&reference, &PullOptions::default(), &progress).unwrap();
        let location = image.store.fetch_layer(0, &image.layers[0], &progress).unwrap();
        // Another process puts other bytes (of the same length) under the
        // blob's name after the check.
        let swap = tmp.path().join("swap");
        std::fs::write(&swap, one_file_tar("f", b"swapped!")).unwrap();
        std::fs::rename(&swap, &blob).unwrap();
        let mut tree = Tree::new();
        image.apply_one(&mut tree, 0, &location, &Intake::default(), &progress).unwrap();
        let idx = tree.lookup(&crate::rootfs::RelPath::parse_user("f").unwrap()).unwrap();
        let crate::rootfs::Body::File(content) = &tree.inode(idx).body else { panic!("f is not a file") };
        let mut data = String::new();
        tree.open_content(content).unwrap().read_to_string(&mut data).unwrap();
        assert_eq!(data, "verified", "the layer must be read from the file whose digest was checked");
    }

    /// A store whose fetcher for one layer panics (a bug in a source, or a
    /// library panicking on hostile input); the others serve a real layer.
    struct PanickingStore {
        panic_at: usize,
        layer: BlobLocation,
    }

    impl BlobStore for PanickingStore {
        fn fetch_layer(&self, index: usize, _layer: &LayerInfo, _progress: &Progress) -> Result<BlobLocation, OciError> {
            if index == self.panic_at {
                panic!("injected fetcher panic for layer {index}");
            }
            Ok(self.layer.clone())
        }
    }

    #[test]
    fn a_panicking_fetcher_fails_apply_layers_instead_of_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let tar_bytes = one_file_tar("f", b"hi");
        let path = dir.path().join("layer.tar");
        std::fs::write(&path, &tar_bytes).unwrap();
        for (n_layers, panic_at) in [(3, 1), (1, 0), (4, 3)] {
            let layer = LayerInfo { digest: None, media_type: String::new(), size: tar_bytes.len() as u64, diff_id: None };
            let image = Image {
                reference: ImageRef::Registry("127.0.0.1:1/test:panic".into()),
                manifest_digest: None,
                manifest: None,
                config_digest: None,
                config: ImageConfig::parse(br#"{"rootfs":{"type":"layers","diff_ids":[]}}"#, "config").unwrap(),
                layers: vec![layer; n_layers],
                store: Box::new(PanickingStore {
                    panic_at,
                    layer: BlobLocation { file: Arc::new(File::open(&path).unwrap()), offset: 0, len: tar_bytes.len() as u64 },
                }),
            };
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let mut tree = Tree::new();
                let result = image.apply_layers(&mut tree, &Intake::default(), 2, &Progress::hidden()).map(|_| ());
                let _ = tx.send(result.map_err(|e| e.to_string()));
            });
            let result = rx.recv_timeout(std::time::Duration::from_secs(30)).expect("apply_layers must return when a fetcher panics, not wait forever");
            let err = result.expect_err("a panicked fetch is an error");
            assert!(err.contains(&format!("layer {panic_at} (#{panic_at})")) && err.contains("panicked") && err.contains("injected fetcher panic"), "{err}");
        }
    }

    #[test]
    fn decompress_sniffs_magic() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        io::Write::write_all(&mut gz, b"hello").unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&b"hello"[..], 3).unwrap();
        for input in [gz, zst, b"hello".to_vec()] {
            let mut out = String::new();
            decompress(io::Cursor::new(input)).unwrap().read_to_string(&mut out).unwrap();
            assert_eq!(out, "hello");
        }
    }
}
