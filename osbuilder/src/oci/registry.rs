//! Pulling from a registry through `oci-client`.
//!
//! Manifests are small and fetched whole (and checked against the digest the
//! reference or the index names); blobs stream from `pull_blob_stream` into the
//! cache writer, which hashes as it writes and renames only a verified blob.
//! Plain HTTP is used only for loopback registries or with `--insecure`.

use std::io::Write;
use std::net::IpAddr;
use std::str::FromStr;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::cache::BlobCache;
use super::digest::Digest;
use super::layout::layer_infos;
use super::manifest::{ImageConfig, ManifestDoc, ACCEPTED_MANIFESTS};
use super::{auth, verify_bytes, BlobLocation, BlobStore, Image, LayerInfo, OciError, PullOptions};
use crate::progress::Progress;

const MAX_INDEX_DEPTH: usize = 4;

struct RegistryStore {
    client: Client,
    reference: Reference,
    cache: BlobCache,
    runtime: tokio::runtime::Runtime,
}

fn registry_err(context: String) -> impl FnOnce(oci_client::errors::OciDistributionError) -> OciError {
    move |e| OciError::Registry { context, source: Box::new(e) }
}

/// Whether `registry` (`host[:port]`) is on this machine.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, port)| if port.chars().all(|c| c.is_ascii_digit()) { h } else { registry })
    };
    host == "localhost" || IpAddr::from_str(host).is_ok_and(|ip| ip.is_loopback())
}

impl RegistryStore {
    /// Streams `desc` into the cache unless a verified copy is there already.
    /// Returns the blob's file, open: what was verified is what is read.
    async fn fetch_blob(&self, desc: &OciDescriptor, digest: &Digest, size: u64, what: &str, progress: &Progress) -> Result<std::fs::File, OciError> {
        if let Some(file) = self.cache.get_verified(digest, Some(size)).map_err(super::io_err(format!("cannot read the cache for {what}")))? {
            return Ok(file);
        }
        let bar = progress.bytes(format!("pull {}", &digest.to_string()[..19]), size);
        let mut stream = self
            .client
            .pull_blob_stream(&self.reference, desc)
            .await
            .map_err(registry_err(format!("cannot pull {what} from {}", self.reference)))?;
        let mut writer = self.cache.writer(digest, Some(size)).map_err(super::io_err("cannot write to the blob cache"))?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(super::io_err(format!("transfer of {what} from {} failed", self.reference)))?;
            if writer.written() + chunk.len() as u64 > size {
                return Err(OciError::SizeMismatch { what: what.to_string(), expected: size, actual: writer.written() + chunk.len() as u64 });
            }
            writer.write_all(&chunk).map_err(super::io_err(format!("cannot store {what} in the cache")))?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(writer.commit_open()?.1)
    }
}

impl BlobStore for RegistryStore {
    fn fetch_layer(&self, index: usize, layer: &LayerInfo, progress: &Progress) -> Result<BlobLocation, OciError> {
        let digest = layer.digest.clone().expect("registry layers always have digests");
        let desc = OciDescriptor { media_type: layer.media_type.clone(), digest: digest.to_string(), size: layer.size as i64, ..Default::default() };
        let what = format!("layer {index} ({digest})");
        let file = self.runtime.block_on(self.fetch_blob(&desc, &digest, layer.size, &what, progress))?;
        Ok(BlobLocation { file: std::sync::Arc::new(file), offset: 0, len: layer.size })
    }
}

pub(super) fn open(name: &str, opts: &PullOptions, progress: &Progress) -> Result<Image, OciError> {
    let reference = Reference::from_str(name).map_err(|e| OciError::Invalid(format!("image reference {name:?}: {e}")))?;
    let registry = reference.resolve_registry().to_string();
    let protocol = if opts.insecure || is_loopback(&registry) {
        ClientProtocol::HttpsExcept(vec![registry.clone(), reference.registry().to_string()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig { protocol, ..Default::default() });
    let (auth, _source) = auth::resolve(reference.registry(), opts.credentials.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(super::io_err("cannot start the async runtime"))?;

    let spinner = progress.spinner(format!("resolve {reference}"));
    let (manifest_digest, manifest, reference) = runtime.block_on(resolve_manifest(&client, &auth, &reference, opts))?;
    let store = RegistryStore { client, reference, cache: opts.cache.clone(), runtime };
    let config_desc = OciDescriptor {
        media_type: manifest.config.media_type.clone(),
        digest: manifest.config.digest.to_string(),
        size: manifest.config.size as i64,
        ..Default::default()
    };
    let config_what = format!("config {}", manifest.config.digest);
    if manifest.config.size > 16 << 20 {
        return Err(OciError::Invalid(format!("{config_what} is {} bytes, over the 16 MiB limit", manifest.config.size)));
    }
    let config_file = store
        .runtime
        .block_on(store.fetch_blob(&config_desc, &manifest.config.digest, manifest.config.size, &config_what, progress))?;
    // Checked again in memory: the bytes parsed are the bytes hashed.
    let mut config_bytes = vec![0; manifest.config.size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&config_file, &mut config_bytes, 0)
        .map_err(super::io_err(format!("cannot read {config_what}")))?;
    verify_bytes(&config_bytes, &manifest.config.digest, Some(manifest.config.size), &config_what)?;
    let config = ImageConfig::parse(&config_bytes, &config_what)?;
    let layers = layer_infos(&manifest.layers, &config)?;
    spinner.finish_and_clear();
    Ok(Image {
        reference: super::ImageRef::Registry(name.to_string()),
        manifest_digest: Some(manifest_digest),
        config_digest: Some(manifest.config.digest.clone()),
        manifest: Some(manifest),
        config,
        layers,
        store: Box::new(store),
    })
}

/// Fetches the manifest the reference names, following an index to the
/// manifest for the requested platform. Returns the reference pinned to the
/// manifest's digest.
async fn resolve_manifest(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    opts: &PullOptions,
) -> Result<(Digest, super::manifest::ImageManifest, Reference), OciError> {
    let mut current = reference.clone();
    let mut expected: Option<Digest> = match reference.digest() {
        Some(d) => Some(d.parse().map_err(|e| OciError::Invalid(format!("{reference}: {e}")))?),
        None => None,
    };
    for _ in 0..MAX_INDEX_DEPTH {
        let (bytes, _server_digest) = client
            .pull_manifest_raw(&current, auth, ACCEPTED_MANIFESTS)
            .await
            .map_err(registry_err(format!("cannot fetch the manifest of {current}")))?;
        // oci-client has read the body by now; refuse it before parsing.
        super::check_json_size(bytes.len() as u64, &format!("the manifest of {current} ({} bytes)", bytes.len()))?;
        let actual = Digest::of_bytes(&bytes);
        if let Some(expected) = &expected {
            verify_bytes(&bytes, expected, None, &format!("manifest of {current}"))?;
        }
        match ManifestDoc::parse(&bytes, &format!("manifest of {current}"))? {
            ManifestDoc::Index(index) => {
                let desc = index.select(&opts.platform).map_err(|e| OciError::Platform(format!("{reference}: {e}")))?;
                expected = Some(desc.digest.clone());
                current = current.clone_with_digest(desc.digest.to_string());
            }
            ManifestDoc::Image(manifest) => {
                let pinned = current.clone_with_digest(actual.to_string());
                return Ok((actual, manifest, pinned));
            }
        }
    }
    Err(OciError::Invalid(format!("{reference}: indexes nested more than {MAX_INDEX_DEPTH} deep")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for r in ["127.0.0.1:5000", "localhost:5000", "localhost", "[::1]:5000", "127.8.9.1"] {
            assert!(is_loopback(r), "{r}");
        }
        for r in ["10.0.0.1:5000", "registry.example:443", "docker.io", "[fe80::1]:5000"] {
            assert!(!is_loopback(r), "{r}");
        }
    }
}
