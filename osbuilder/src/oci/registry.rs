//! Pulling from a registry, over the registry client [`super::http`].
//!
//! Manifests are small and fetched whole, read as they stream and refused
//! as soon as they pass the 16 MiB limit for JSON documents (by their
//! `Content-Length` or their bytes), then checked against the digest the
//! reference or the index names; blobs stream into the cache writer, which
//! hashes as it writes and renames only a verified blob. Plain HTTP is used
//! only for loopback registries or with `--insecure`.
//!
//! Faults on the wire are retried (`retries` times, exponential backoff from
//! 250 ms, at most 8 s, or the `Retry-After` a 429 or 503 names, at most
//! 60 s: a longer one is an error naming the wait): a dropped connection, a
//! timeout (no answer or no byte for `timeout`), a 5xx, a 408 or a 429, a
//! body cut short and a blob whose digest is wrong. A transfer cut short
//! continues from the byte it reached with a `Range` request; a blob with a
//! wrong digest is fetched again from byte 0. Errors of our own side (the
//! cache's disk full) are not retried.
//!
//! One blob is fetched by one process at a time: the fetch holds the
//! cache's lock for that digest ([`BlobCache::lock`]) and looks in the cache
//! again once it has it, so parallel builds download each blob once.

use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use oci_client::Reference;

use super::cache::{BlobCache, BlobWriter, CommitError};
use super::digest::Digest;
use super::http::{Access, Client, ClientOptions, Failure, HttpError};
use super::layout::layer_infos;
use super::manifest::{ImageConfig, ManifestDoc, ACCEPTED_MANIFESTS};
use super::{auth, verify_bytes, BlobLocation, BlobStore, Image, LayerInfo, OciError, PullOptions};
use crate::progress::Progress;

const MAX_INDEX_DEPTH: usize = 4;

struct RegistryStore {
    client: Client,
    reference: Reference,
    cache: BlobCache,
}

/// Why one attempt at a blob failed.
enum Attempt {
    /// A fault on the wire: worth another attempt, after at least `wait`.
    Retry { why: String, wait: Option<Duration> },
    /// A refusal from the registry (404, 401...), or our side (the cache):
    /// the error says what failed.
    Fatal(OciError),
}

/// A registry client's error, with what we were doing.
fn registry_err(context: impl Into<String>) -> impl FnOnce(HttpError) -> OciError {
    let context = context.into();
    move |e| OciError::Registry { context, source: Box::new(e) }
}

impl RegistryStore {
    /// Streams blob `digest` into the cache unless a verified copy is there
    /// already. Returns the blob's file, open: what was verified is what is read.
    async fn fetch_blob(&self, digest: &Digest, size: u64, what: &str, progress: &Progress) -> Result<std::fs::File, OciError> {
        let cached = || self.cache.get_verified(digest, Some(size)).map_err(super::io_err(format!("cannot read the cache for {what}")));
        if let Some(file) = cached()? {
            return Ok(file);
        }
        // Another process may be fetching it: wait for it, then reuse its blob.
        let _lock = self.cache.lock(digest).map_err(super::io_err(format!("cannot lock {what} in the cache {}", self.cache.root().display())))?;
        if let Some(file) = cached()? {
            return Ok(file);
        }
        let bar = progress.bytes(format!("pull {}", &digest.to_string()[..19]), size);
        let mut partial: Option<BlobWriter> = None;
        let context = format!("cannot pull {what} from {}", self.reference);
        let mut failures = 0;
        loop {
            match self.transfer(digest, size, what, &mut partial, &bar).await {
                Ok(file) => {
                    bar.finish_and_clear();
                    return Ok(file);
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry { why, wait }) => {
                    self.client.wait_or_give_up(&mut failures, &format!("{what}: {why}"), wait).await.map_err(registry_err(&context))?
                }
            }
        }
    }

    /// One attempt at a blob: from byte 0, or from where `partial` stopped.
    async fn transfer(
        &self,
        digest: &Digest,
        size: u64,
        what: &str,
        partial: &mut Option<BlobWriter>,
        bar: &indicatif::ProgressBar,
    ) -> Result<std::fs::File, Attempt> {
        let offset = partial.as_ref().map_or(0, |w| w.written());
        let mut body = match self.client.open_blob(digest, offset).await {
            Ok(body) => body,
            Err(Failure::Retry { why, wait }) => return Err(Attempt::Retry { why, wait }),
            Err(Failure::Fatal(e)) => return Err(Attempt::Fatal(registry_err(format!("cannot pull {what} from {}", self.reference))(e))),
        };
        if body.from == 0 {
            // From byte 0: asked so, or the registry ignored the range.
            *partial = None;
        }
        if partial.is_none() {
            bar.set_position(0);
            let writer = self.cache.writer(digest, Some(size)).map_err(|e| Attempt::Fatal(self.cache_error(what, e)))?;
            *partial = Some(writer);
        }
        let writer = partial.as_mut().expect("set above");
        loop {
            let chunk = match body.chunk().await {
                Ok(Some(chunk)) => chunk,
                Ok(None) => break,
                Err(e) => return Err(Attempt::Retry { why: format!("transfer failed after {} of {size} bytes: {e}", writer.written()), wait: None }),
            };
            if writer.written() + chunk.len() as u64 > size {
                *partial = None;
                return Err(Attempt::Retry { why: format!("the registry sent more than the {size} bytes the manifest names"), wait: None });
            }
            writer.write_all(&chunk).map_err(|e| Attempt::Fatal(self.cache_error(what, e)))?;
            bar.inc(chunk.len() as u64);
        }
        if writer.written() < size {
            return Err(Attempt::Retry { why: format!("the transfer ended after {} of {size} bytes", writer.written()), wait: None });
        }
        match partial.take().expect("set above").commit_open() {
            Ok((_, file)) => Ok(file),
            Err(e @ CommitError::Digest { .. }) => Err(Attempt::Retry { why: e.to_string(), wait: None }),
            Err(e) => Err(Attempt::Fatal(e.into())),
        }
    }

    fn cache_error(&self, what: &str, e: std::io::Error) -> OciError {
        OciError::Io { context: format!("cannot store {what} in the cache {}", self.cache.root().display()), source: e }
    }
}

impl BlobStore for RegistryStore {
    fn fetch_layer(&self, index: usize, layer: &LayerInfo, progress: &Progress) -> Result<BlobLocation, OciError> {
        let digest = layer.digest.clone().expect("registry layers always have digests");
        let what = format!("layer {index} ({digest})");
        let file = self.client.block_on(self.fetch_blob(&digest, layer.size, &what, progress))?;
        Ok(BlobLocation { file: std::sync::Arc::new(file), offset: 0, len: layer.size })
    }
}

pub(super) fn open(name: &str, opts: &PullOptions, progress: &Progress) -> Result<Image, OciError> {
    let reference = Reference::from_str(name).map_err(|e| OciError::Invalid(format!("image reference {name:?}: {e}")))?;
    let (creds, _source) = auth::resolve(reference.registry(), opts.credentials.as_deref())?;
    let wire = ClientOptions {
        retries: opts.retries,
        timeout: opts.timeout,
        insecure: opts.insecure,
        backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(8),
        ..ClientOptions::default()
    };
    let client =
        Client::new(reference.registry(), reference.repository(), creds, Access::Pull, wire).map_err(registry_err(format!("cannot pull {reference}")))?;

    let spinner = progress.spinner(format!("resolve {reference}"));
    let (manifest_digest, manifest, reference) = client.block_on(resolve_manifest(&client, &reference, opts))?;
    let store = RegistryStore { client, reference, cache: opts.cache.clone() };
    let config_what = format!("config {}", manifest.config.digest);
    if manifest.config.size > 16 << 20 {
        return Err(OciError::Invalid(format!("{config_what} is {} bytes, over the 16 MiB limit", manifest.config.size)));
    }
    let config_file = store.client.block_on(store.fetch_blob(&manifest.config.digest, manifest.config.size, &config_what, progress))?;
    // Checked again in memory: the bytes parsed are the bytes hashed.
    let mut config_bytes = vec![0; manifest.config.size as usize];
    std::os::unix::fs::FileExt::read_exact_at(&config_file, &mut config_bytes, 0).map_err(super::io_err(format!("cannot read {config_what}")))?;
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
async fn resolve_manifest(client: &Client, reference: &Reference, opts: &PullOptions) -> Result<(Digest, super::manifest::ImageManifest, Reference), OciError> {
    let mut current = reference.clone();
    let mut expected: Option<Digest> = match reference.digest() {
        Some(d) => Some(d.parse().map_err(|e| OciError::Invalid(format!("{reference}: {e}")))?),
        None => None,
    };
    let accept = ACCEPTED_MANIFESTS.join(", ");
    for _ in 0..MAX_INDEX_DEPTH {
        // A digest wins over a tag, as the reference means.
        let by = current.digest().or(current.tag()).unwrap_or("latest");
        let bytes = client.get_manifest(by, &accept).await.map_err(registry_err(format!("cannot fetch the manifest of {current}")))?;
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
