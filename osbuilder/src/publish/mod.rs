//! Publishing: what the builder made, as images in any OCI registry.
//!
//! `image.rs` turns files into publications (a containerDisk, a kernel-boot
//! image, an OCI 1.1 artifact bundle, an index over several platforms):
//! manifests and configs as bytes, layers as [`Blob`]s. Layers are tar
//! archives our code lays out (`tar.rs`), the same bytes on every machine for
//! the same files; uncompressed ones are never written out, compressed ones
//! are spooled once into the blob cache. `client.rs` is the push side of the
//! registry client ([`crate::oci::http`], shared with pulls): skip what is
//! there, mount what another repository has, upload the rest in chunks that
//! resume where the registry says it stopped.
//! [`push`] ties them together, and `--verify` pulls the result back.

pub mod client;
pub mod image;
pub mod tar;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

use crate::oci::cache::BlobCache;
use crate::oci::digest::Digest;
use crate::oci::http::{Access, Client};
pub use crate::oci::http::{ClientOptions, WireStats};
use crate::progress::Progress;
pub use client::BlobOutcome;
pub use image::{Publication, PublishedManifest};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Input(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("registry {registry} refused access: {message}")]
    Auth { registry: String, message: String },
    #[error("verification of the pushed image failed: {0}")]
    Verify(String),
}

impl From<crate::oci::http::HttpError> for PublishError {
    fn from(e: crate::oci::http::HttpError) -> Self {
        use crate::oci::http::HttpError;
        match e {
            HttpError::Usage(m) => PublishError::Usage(m),
            HttpError::Io { context, source } => PublishError::Io { context, source },
            HttpError::Registry { registry, message } => PublishError::Registry { registry, message },
            HttpError::Auth { registry, message } => PublishError::Auth { registry, message },
        }
    }
}

pub(crate) fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> PublishError {
    let context = context.into();
    move |source| PublishError::Io { context, source }
}

/// The bytes of a blob, wherever they are.
#[derive(Clone, Debug)]
pub enum BlobData {
    Bytes(Bytes),
    /// A whole host file of the blob's size.
    File(PathBuf),
    /// An uncompressed layer made on the fly.
    Tar(tar::TarLayer),
}

/// A blob to push: its descriptor and where its bytes come from.
#[derive(Clone, Debug)]
pub struct Blob {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub annotations: BTreeMap<String, String>,
    pub data: BlobData,
}

impl Blob {
    pub fn from_bytes(media_type: &str, bytes: Vec<u8>) -> Blob {
        Blob {
            media_type: media_type.into(),
            digest: Digest::of_bytes(&bytes),
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
            data: BlobData::Bytes(Bytes::from(bytes)),
        }
    }

    /// A whole file, hashed now.
    pub fn from_file(media_type: &str, path: &Path) -> Result<Blob, PublishError> {
        let size = std::fs::metadata(path).map_err(io_err(format!("cannot read {}", path.display())))?.len();
        let digest = Digest::of_file_range(path, 0, size).map_err(io_err(format!("cannot read {}", path.display())))?;
        Ok(Blob { media_type: media_type.into(), digest, size, annotations: BTreeMap::new(), data: BlobData::File(path.to_path_buf()) })
    }
}

impl client::BlobSource for Blob {
    fn len(&self) -> u64 {
        self.size
    }

    fn reader_at(&self, offset: u64) -> io::Result<Box<dyn Read + Send + '_>> {
        match &self.data {
            BlobData::Bytes(b) => Ok(Box::new(io::Cursor::new(b.slice(offset.min(b.len() as u64) as usize..)))),
            BlobData::File(path) => {
                let file = File::open(path)?;
                let now = file.metadata()?.len();
                if now != self.size {
                    return Err(io::Error::other(format!("{} changed while being published ({} bytes, now {now})", path.display(), self.size)));
                }
                Ok(Box::new(FileRangeReader { file, pos: offset, end: self.size }))
            }
            BlobData::Tar(layer) => Ok(Box::new(layer.reader_at(offset)?)),
        }
    }
}

struct FileRangeReader {
    file: File,
    pos: u64,
    end: u64,
}

impl Read for FileRangeReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = ((self.end - self.pos.min(self.end)) as usize).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file got shorter while being published"));
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// How a layer is compressed in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerCompression {
    /// Plain tar: the files sit at fixed offsets inside the blob.
    None,
    Gzip,
    Zstd,
}

/// A layer ready to push, with what the config and the annotations need.
#[derive(Clone, Debug)]
pub struct PreparedLayer {
    pub blob: Blob,
    /// The digest of the uncompressed tar (the config's `diff_id`).
    pub diff_id: Digest,
    /// Each file's place in the uncompressed tar and its digest.
    pub files: Vec<(tar::FilePlacement, Digest)>,
}

/// Lays out `entries` as a tar layer: hashes it (and each file inside) in
/// one read, and for gzip/zstd compresses it into the blob cache in the same
/// pass, with `compress.rs` (gzip level 6, zstd level 3), whose bytes depend
/// only on the input.
pub fn prepare_layer(
    entries: &[tar::TarEntry],
    mtime: u64,
    compression: LayerCompression,
    cache: &BlobCache,
    progress: &Progress,
) -> Result<PreparedLayer, PublishError> {
    let layer = tar::TarLayer::new(entries, mtime).map_err(io_err("cannot lay out the layer"))?;
    let placements = layer.placements(entries);
    let mut reader = layer.reader_at(0).map_err(io_err("cannot read the layer's files"))?;
    let mut tar_hash = Sha256::new();
    let mut file_hashes: Vec<Sha256> = placements.iter().map(|_| Sha256::new()).collect();
    let bar = progress.bytes("hash layer".to_string(), layer.len());

    // The project's compressors: parallel, and the same bytes whatever the
    // number of cores (see `compress.rs`).
    let kind = match compression {
        LayerCompression::None => None,
        LayerCompression::Gzip => Some(crate::compress::Compression::Gzip),
        LayerCompression::Zstd => Some(crate::compress::Compression::Zstd),
    };
    let mut out = match kind {
        None => None,
        Some(kind) => {
            let spool = cache.spool().map_err(io_err("cannot write to the blob cache"))?;
            // gzip at 6 (what registries' other clients use; compress.rs's own
            // default, 9, is for initrds built once and booted often).
            let level = if kind == crate::compress::Compression::Gzip { Some(6) } else { None };
            let opts = crate::compress::CompressOptions { level, ..crate::compress::CompressOptions::new(kind) };
            let enc = crate::compress::encoder(&opts, spool)
                .map_err(|e| PublishError::Io { context: "cannot start the compressor".into(), source: io::Error::other(e) })?;
            Some(enc)
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err("cannot read the layer's files"))?;
        if n == 0 {
            break;
        }
        let chunk = &buf[..n];
        tar_hash.update(chunk);
        for (p, h) in placements.iter().zip(file_hashes.iter_mut()) {
            let (a, b) = (p.offset.max(pos), (p.offset + p.len).min(pos + n as u64));
            if a < b {
                h.update(&chunk[(a - pos) as usize..(b - pos) as usize]);
            }
        }
        if let Some(w) = &mut out {
            w.write_all(chunk).map_err(io_err("cannot write the compressed layer"))?;
        }
        pos += n as u64;
        bar.set_position(pos);
    }
    bar.finish_and_clear();
    let diff_id: Digest = format!("sha256:{}", hex::encode(tar_hash.finalize())).parse().expect("sha256");
    let files = placements.into_iter().zip(file_hashes).map(|(p, h)| (p, format!("sha256:{}", hex::encode(h.finalize())).parse().expect("sha256"))).collect();
    let (media_suffix, data, digest, size) = match out {
        None => ("", BlobData::Tar(layer.clone()), diff_id.clone(), layer.len()),
        Some(w) => {
            let suffix = if compression == LayerCompression::Gzip { "+gzip" } else { "+zstd" };
            finish_spool(w.finish().map_err(io_err("cannot finish the compressed layer"))?, suffix)?
        }
    };
    Ok(PreparedLayer {
        blob: Blob { media_type: format!("application/vnd.oci.image.layer.v1.tar{media_suffix}"), digest, size, annotations: BTreeMap::new(), data },
        diff_id,
        files,
    })
}

fn finish_spool(w: crate::oci::cache::BlobWriter, suffix: &'static str) -> Result<(&'static str, BlobData, Digest, u64), PublishError> {
    let size = w.written();
    let path = w.commit().map_err(|e| PublishError::Io { context: "cannot store the compressed layer".into(), source: io::Error::other(e.to_string()) })?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
    let digest = format!("sha256:{name}").parse().expect("the cache names blobs by digest");
    Ok((suffix, BlobData::File(path), digest, size))
}

/// Where to push: `HOST[:PORT]/REPO[:TAG|@DIGEST]` (a `docker://` prefix is
/// accepted).
#[derive(Clone, Debug)]
pub struct Target {
    pub registry: String,
    pub repo: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl Target {
    pub fn parse(s: &str) -> Result<Target, PublishError> {
        let bare = s.strip_prefix("docker://").unwrap_or(s);
        let (host, _) =
            bare.split_once('/').ok_or_else(|| PublishError::Usage(format!("{s:?}: give HOST[:PORT]/REPO[:TAG], e.g. 127.0.0.1:5000/guest/disk:v1")))?;
        if !(host.contains('.') || host.contains(':') || host == "localhost") {
            return Err(PublishError::Usage(format!("{s:?}: name the registry host first (HOST[:PORT]/REPO[:TAG]); pushes never go to a default registry")));
        }
        let reference: oci_client::Reference = bare.parse().map_err(|e| PublishError::Usage(format!("{s:?} is not an image reference: {e}")))?;
        let digest = reference.digest().map(|d| d.parse::<Digest>()).transpose().map_err(|e| PublishError::Usage(format!("{s:?}: {e}")))?;
        let tag = reference.tag().map(str::to_string);
        Ok(Target { registry: host.to_string(), repo: reference.repository().to_string(), tag, digest })
    }

    /// `HOST/REPO@DIGEST`.
    pub fn pinned(&self, digest: &Digest) -> String {
        format!("{}/{}@{digest}", self.registry, self.repo)
    }
}

/// How a push is done.
#[derive(Clone, Debug)]
pub struct PushOptions {
    pub client: ClientOptions,
    /// USER:PASSWORD, else the environment and the auth files (see `oci::auth`).
    pub credentials: Option<String>,
    /// Repositories of the same registry to mount blobs from.
    pub mount_from: Vec<String>,
    /// Pull the manifest and the layers back and check them.
    pub verify: bool,
    pub cache: BlobCache,
}

/// What a push did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PushReport {
    /// `HOST/REPO@sha256:...` of the top-level manifest or index.
    pub pushed: String,
    pub digest: Digest,
    pub media_type: String,
    pub tag: Option<String>,
    pub blobs: Vec<BlobReport>,
    pub wire: WireStats,
    pub verified: bool,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BlobReport {
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    #[serde(flatten)]
    pub outcome: BlobOutcome,
}

/// Pushes `publication` to `target`.
pub fn push(publication: &Publication, target: &Target, opts: &PushOptions, progress: &Progress) -> Result<PushReport, PublishError> {
    let (creds, _source) = crate::oci::auth::resolve(&target.registry, opts.credentials.as_deref()).map_err(|e| PublishError::Usage(e.to_string()))?;
    let client = Client::new(&target.registry, &target.repo, creds, Access::Push, opts.client.clone())?;
    let mut known = mounts::Known::load(&opts.cache, &target.registry);
    let top = publication.top();
    if let Some(want) = &target.digest {
        if *want != top.digest {
            return Err(PublishError::Usage(format!("the reference names {want}, but what we built is {}", top.digest)));
        }
    }
    let mut blobs = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for m in publication.manifests() {
        for blob in &m.blobs {
            if !seen.insert(blob.digest.clone()) {
                continue;
            }
            let mut from: Vec<String> = opts.mount_from.clone();
            for repo in known.repos(&blob.digest) {
                if !from.contains(&repo) {
                    from.push(repo);
                }
            }
            let outcome = client.block_on(client.push_blob(&blob.digest, blob, &from, progress))?;
            known.add(&blob.digest, &target.repo);
            blobs.push(BlobReport { digest: blob.digest.clone(), size: blob.size, media_type: blob.media_type.clone(), outcome });
        }
    }
    let reference = target.tag.clone().unwrap_or_else(|| "latest".into());
    for m in publication.manifests() {
        let by = if std::ptr::eq(m, top) && target.digest.is_none() { reference.clone() } else { m.digest.to_string() };
        client.block_on(client.put_manifest(&by, &m.media_type, &m.bytes))?;
    }
    if let Some(index) = publication.index() {
        let by = if target.digest.is_none() { reference.clone() } else { index.digest.to_string() };
        client.block_on(client.put_manifest(&by, &index.media_type, &index.bytes))?;
    }
    known.save();
    if opts.verify {
        verify(&client, publication, &opts.cache, progress)?;
    }
    Ok(PushReport {
        pushed: target.pinned(&top.digest),
        digest: top.digest.clone(),
        media_type: top.media_type.clone(),
        tag: if target.digest.is_none() { Some(reference) } else { None },
        blobs,
        wire: client.stats(),
        verified: opts.verify,
    })
}

/// Pulls every manifest and layer back: the manifests must be our bytes,
/// every blob its digest, and each file in a layer the digest it had here.
fn verify(client: &Client, publication: &Publication, cache: &BlobCache, progress: &Progress) -> Result<(), PublishError> {
    let fail = |m: String| PublishError::Verify(m);
    if let Some(index) = publication.index() {
        let got = client.block_on(client.get_manifest(&index.digest.to_string(), &index.media_type))?;
        if got[..] != index.bytes[..] {
            return Err(fail(format!("the index {} came back different", index.digest)));
        }
    }
    for m in publication.manifests() {
        let got = client.block_on(client.get_manifest(&m.digest.to_string(), &m.media_type))?;
        if got[..] != m.bytes[..] {
            return Err(fail(format!("manifest {} came back different", m.digest)));
        }
        for blob in &m.blobs {
            let bar = progress.bytes(format!("verify {}", &blob.digest.to_string()[..19]), blob.size);
            let mut writer = cache.spool().map_err(io_err("cannot write to the blob cache"))?;
            let mut tee = BarWriter { inner: &mut writer, bar: &bar };
            client.block_on(client.get_blob(&blob.digest, &mut tee))?;
            bar.finish_and_clear();
            let path = writer.commit().map_err(|e| fail(e.to_string()))?;
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name != blob.digest.hex() {
                let _ = std::fs::remove_file(&path);
                return Err(fail(format!("blob {} came back with digest sha256:{name}", blob.digest)));
            }
            let expected = m.files_of(&blob.digest);
            if !expected.is_empty() {
                let found = image::layer_file_digests(&path).map_err(io_err(format!("cannot read back layer {}", blob.digest)))?;
                for (name, digest) in expected {
                    match found.get(name) {
                        Some(d) if d == digest => {}
                        Some(d) => return Err(fail(format!("{name} in layer {} came back as {d}, expected {digest}", blob.digest))),
                        None => return Err(fail(format!("{name} is missing from layer {}", blob.digest))),
                    }
                }
            }
            // Keep uncompressed layers out of the cache: they can be made again.
            if matches!(blob.data, BlobData::Tar(_)) {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    Ok(())
}

struct BarWriter<'a, W> {
    inner: &'a mut W,
    bar: &'a indicatif::ProgressBar,
}

impl<W: Write> Write for BarWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Which repositories of a registry we have pushed each blob to, so a push
/// to a new repository can mount instead of uploading (what Docker keeps as
/// its "distribution metadata"). A hint only: a wrong entry costs one
/// refused mount.
mod mounts {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use crate::oci::cache::BlobCache;
    use crate::oci::digest::Digest;

    const MAX_REPOS: usize = 8;
    const MAX_BLOBS: usize = 20_000;

    pub struct Known {
        path: PathBuf,
        map: BTreeMap<String, Vec<String>>,
        changed: bool,
    }

    impl Known {
        pub fn load(cache: &BlobCache, registry: &str) -> Known {
            let key = hex::encode(&<sha2::Sha256 as sha2::Digest>::digest(registry.as_bytes())[..8]);
            let path = cache.root().join("publish/mounts").join(format!("{key}.json"));
            let map = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
            Known { path, map, changed: false }
        }

        pub fn repos(&self, digest: &Digest) -> Vec<String> {
            self.map.get(digest.hex()).cloned().unwrap_or_default()
        }

        pub fn add(&mut self, digest: &Digest, repo: &str) {
            let repos = self.map.entry(digest.hex().to_string()).or_default();
            if let Some(i) = repos.iter().position(|r| r == repo) {
                repos.remove(i);
            }
            repos.insert(0, repo.to_string());
            repos.truncate(MAX_REPOS);
            self.changed = true;
        }

        /// Best effort: a hint that cannot be saved is only a lost hint.
        pub fn save(&self) {
            if !self.changed {
                return;
            }
            let mut map = self.map.clone();
            while map.len() > MAX_BLOBS {
                let first = map.keys().next().cloned().expect("non-empty");
                map.remove(&first);
            }
            let Some(dir) = self.path.parent() else { return };
            if std::fs::create_dir_all(dir).is_err() {
                return;
            }
            let Ok(json) = serde_json::to_vec(&map) else { return };
            let _ = crate::output::write_file(&self.path, &json);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("127.0.0.1:5000/guest/disk:v1").unwrap();
        assert_eq!((t.registry.as_str(), t.repo.as_str(), t.tag.as_deref()), ("127.0.0.1:5000", "guest/disk", Some("v1")));
        let t = Target::parse("docker://localhost:5000/disk").unwrap();
        assert_eq!((t.repo.as_str(), t.tag.as_deref()), ("disk", Some("latest")));
        let d = format!("sha256:{}", "a".repeat(64));
        let t = Target::parse(&format!("reg.example/x/y@{d}")).unwrap();
        assert_eq!(t.digest.unwrap().to_string(), d);
        assert!(Target::parse("library/ubuntu:22.04").is_err(), "no default registry");
        assert!(Target::parse("disk").is_err());
    }

    #[test]
    fn compressed_layers_are_the_same_bytes_every_time() {
        let tmp = tempfile::tempdir().unwrap();
        let disk = tmp.path().join("disk.img");
        std::fs::write(&disk, (0..3_000_000u32).map(|i| (i / 7 % 13) as u8).collect::<Vec<_>>()).unwrap();
        let entries = image::disk_entries("disk.img", &disk);
        for c in [LayerCompression::Gzip, LayerCompression::Zstd, LayerCompression::None] {
            let a = prepare_layer(&entries, 0, c, &BlobCache::new(tmp.path().join("c1")), &Progress::hidden()).unwrap();
            let b = prepare_layer(&entries, 0, c, &BlobCache::new(tmp.path().join("c2")), &Progress::hidden()).unwrap();
            assert_eq!(a.blob.digest, b.blob.digest, "{c:?}");
            assert_eq!(a.diff_id, b.diff_id);
            assert_eq!(a.files[0].1, Digest::of_file_range(&disk, 0, 3_000_000).unwrap());
            if c != LayerCompression::None {
                assert!(a.blob.size < 3_000_000, "{c:?} compressed to {}", a.blob.size);
                let path = match &a.blob.data {
                    BlobData::File(p) => p.clone(),
                    _ => panic!("spooled"),
                };
                assert_eq!(Digest::of_file_range(&path, 0, a.blob.size).unwrap(), a.blob.digest);
                assert_eq!(image::layer_file_digests(&path).unwrap().get("disk/disk.img"), Some(&a.files[0].1));
            } else {
                assert_eq!(a.diff_id, a.blob.digest);
            }
        }
    }
}
