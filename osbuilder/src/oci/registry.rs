//! Pulling from a registry through `oci-client`.
//!
//! Manifests are small and fetched whole (and checked against the digest the
//! reference or the index names); blobs stream from `pull_blob_stream` into the
//! cache writer, which hashes as it writes and renames only a verified blob.
//! Plain HTTP is used only for loopback registries or with `--insecure`.
//!
//! Faults on the wire are retried (`retries` times, exponential backoff from
//! 250 ms, at most 8 s): a dropped connection, a timeout (no answer or no
//! byte for `timeout`), a 5xx, a 408 or a 429 (oci-client's errors drop the
//! response headers, so a 429's `Retry-After` is not seen: the backoff
//! stands in for it), a body cut short and a blob whose digest is wrong. A
//! transfer cut short continues from the byte it reached with a `Range`
//! request; a blob with a wrong digest is fetched again from byte 0. Errors
//! of our own side (the cache's disk full) are not retried.
//!
//! One blob is fetched by one process at a time: the fetch holds the
//! cache's lock for that digest ([`BlobCache::lock`]) and looks in the cache
//! again once it has it, so parallel builds download each blob once.

use std::io::Write;
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use futures_util::StreamExt;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use super::cache::{BlobCache, BlobWriter, CommitError};
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
    wire: Wire,
    runtime: tokio::runtime::Runtime,
}

/// How hard a pull tries; see the module documentation.
#[derive(Clone, Copy, Debug)]
struct Wire {
    retries: u32,
    timeout: Duration,
}

/// Why one attempt failed.
enum Failure {
    /// A fault on the wire: worth another attempt.
    Retry(String),
    /// A refusal from the registry (404, 401...): another attempt cannot help.
    Refused(OciDistributionError),
    /// Our side (the cache): the error says what failed.
    Fatal(OciError),
}

impl Wire {
    fn backoff(attempt: u32) -> Duration {
        Duration::from_millis(250u64 << attempt.min(5)).min(Duration::from_secs(8))
    }

    /// After a failed attempt: waits the backoff, or (the `retries` spent,
    /// or the failure final) returns the error to give up with.
    async fn after(&self, failure: Failure, failures: &mut u32, context: &str) -> Result<(), OciError> {
        match failure {
            Failure::Fatal(e) => Err(e),
            Failure::Refused(e) => Err(OciError::Registry { context: context.to_string(), source: Box::new(e) }),
            Failure::Retry(why) if *failures >= self.retries => {
                Err(OciError::Registry { context: context.to_string(), source: format!("{why} (gave up after {} attempts)", *failures + 1).into() })
            }
            Failure::Retry(why) => {
                let wait = Self::backoff(*failures);
                *failures += 1;
                eprintln!("osbuilder: {context}: {why}; trying again in {:.1} s", wait.as_secs_f64());
                tokio::time::sleep(wait).await;
                Ok(())
            }
        }
    }

    /// Sorts an oci-client error into retried and final, naming a timeout.
    fn classify(&self, e: OciDistributionError) -> Failure {
        let retry = match &e {
            OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429 || *code == 408,
            OciDistributionError::RegistryError { envelope, .. } => envelope.errors.iter().any(|e| e.code == OciErrorCode::Toomanyrequests),
            OciDistributionError::RequestError(_) | OciDistributionError::IoError(_) => true,
            _ => false,
        };
        if let OciDistributionError::RequestError(r) = &e {
            // oci-client's error is transparent: the reqwest error is not in its source chain.
            if r.is_timeout() {
                return Failure::Retry(self.describe(r));
            }
        }
        if retry {
            Failure::Retry(self.describe(&e))
        } else {
            Failure::Refused(e)
        }
    }

    /// An error with its causes (reqwest's own message leaves them out),
    /// saying so plainly when it was our timeout.
    fn describe(&self, e: &(dyn std::error::Error + 'static)) -> String {
        if is_timeout(e) {
            return format!("timed out: no answer or no data for {} s (--timeout)", self.timeout.as_secs());
        }
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !message.contains(&text) {
                message = format!("{message}: {text}");
            }
            source = s.source();
        }
        message
    }
}

fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.downcast_ref::<reqwest::Error>().is_some_and(|r| r.is_timeout())
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
        {
            return true;
        }
        cur = e.source();
    }
    false
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
            match self.transfer(desc, digest, size, what, &mut partial, &bar).await {
                Ok(path) => {
                    bar.finish_and_clear();
                    return Ok(path);
                }
                Err(failure) => self.wire.after(failure, &mut failures, &context).await?,
            }
        }
    }

    /// One attempt at a blob: from byte 0, or from where `partial` stopped.
    async fn transfer(
        &self,
        desc: &OciDescriptor,
        digest: &Digest,
        size: u64,
        what: &str,
        partial: &mut Option<BlobWriter>,
        bar: &indicatif::ProgressBar,
    ) -> Result<std::fs::File, Failure> {
        let offset = partial.as_ref().map_or(0, |w| w.written());
        let stream = if offset == 0 {
            self.client.pull_blob_stream(&self.reference, desc).await.map_err(|e| self.wire.classify(e))?
        } else {
            match self.client.pull_blob_stream_partial(&self.reference, desc, offset, None).await.map_err(|e| self.wire.classify(e))? {
                BlobResponse::Partial(stream) => stream,
                // The registry ignored the range: start again.
                BlobResponse::Full(stream) => {
                    *partial = None;
                    stream
                }
            }
        };
        let mut stream = stream;
        if partial.is_none() {
            bar.set_position(0);
            let writer = self.cache.writer(digest, Some(size)).map_err(|e| Failure::Fatal(self.cache_error(what, e)))?;
            *partial = Some(writer);
        }
        let writer = partial.as_mut().expect("set above");
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                // oci-client's own digest check ends a full stream; ours, at commit, names the blob.
                Err(_) if writer.written() == size => break,
                Err(e) => return Err(Failure::Retry(format!("transfer failed after {} of {size} bytes: {}", writer.written(), self.wire.describe(&e)))),
            };
            if writer.written() + chunk.len() as u64 > size {
                *partial = None;
                return Err(Failure::Retry(format!("the registry sent more than the {size} bytes the manifest names")));
            }
            writer.write_all(&chunk).map_err(|e| Failure::Fatal(self.cache_error(what, e)))?;
            bar.inc(chunk.len() as u64);
        }
        if writer.written() < size {
            return Err(Failure::Retry(format!("the transfer ended after {} of {size} bytes", writer.written())));
        }
        match partial.take().expect("set above").commit_open() {
            Ok((_, file)) => Ok(file),
            Err(e @ CommitError::Digest { .. }) => Err(Failure::Retry(e.to_string())),
            Err(e) => Err(Failure::Fatal(e.into())),
        }
    }

    fn cache_error(&self, what: &str, e: std::io::Error) -> OciError {
        OciError::Io { context: format!("cannot store {what} in the cache {}", self.cache.root().display()), source: e }
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
    let wire = Wire { retries: opts.retries, timeout: opts.timeout };
    let client = Client::new(ClientConfig {
        protocol,
        read_timeout: Some(opts.timeout),
        connect_timeout: Some(opts.timeout.min(Duration::from_secs(15))),
        ..Default::default()
    });
    let (auth, _source) = auth::resolve(reference.registry(), opts.credentials.as_deref())?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().map_err(super::io_err("cannot start the async runtime"))?;

    let spinner = progress.spinner(format!("resolve {reference}"));
    let (manifest_digest, manifest, reference) = runtime.block_on(resolve_manifest(&client, &auth, &reference, opts, wire))?;
    let store = RegistryStore { client, reference, cache: opts.cache.clone(), wire, runtime };
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
    let config_file = store.runtime.block_on(store.fetch_blob(&config_desc, &manifest.config.digest, manifest.config.size, &config_what, progress))?;
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
async fn resolve_manifest(
    client: &Client,
    auth: &RegistryAuth,
    reference: &Reference,
    opts: &PullOptions,
    wire: Wire,
) -> Result<(Digest, super::manifest::ImageManifest, Reference), OciError> {
    let mut current = reference.clone();
    let mut expected: Option<Digest> = match reference.digest() {
        Some(d) => Some(d.parse().map_err(|e| OciError::Invalid(format!("{reference}: {e}")))?),
        None => None,
    };
    for _ in 0..MAX_INDEX_DEPTH {
        let mut failures = 0;
        let (bytes, _server_digest) = loop {
            match client.pull_manifest_raw(&current, auth, ACCEPTED_MANIFESTS).await {
                Ok(got) => break got,
                Err(e) => wire.after(wire.classify(e), &mut failures, &format!("cannot fetch the manifest of {current}")).await?,
            }
        };
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
