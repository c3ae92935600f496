//! Docker archives (`docker save`, `skopeo copy ... docker-archive:`): a tar
//! holding `manifest.json`, the config and one tar per layer.
//!
//! Nothing is extracted: layers are read in place as byte ranges of the
//! archive, held open from the start, so members are checked and parsed
//! from the same file. Names in `manifest.json` are only looked up among the
//! archive's entries, never opened as paths.
//!
//! Digests come from member names: `blobs/sha256/<hex>` (Docker 25+),
//! `<hex>.tar` / `<hex>.json` (skopeo, and the config of older `docker
//! save`). Older `docker save` names layers `<id>/layer.tar`, an id that is
//! not a digest: those are checked against the config's `diff_ids` (the
//! config itself being checked against its name) in a pass of their own
//! before the tar parser reads them. A config whose name carries no digest
//! cannot be checked and is refused.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::digest::Digest;
use super::manifest::ImageConfig;
use super::{io_err, verify_bytes, verify_location, verify_uncompressed, BlobLocation, BlobStore, Image, LayerInfo, OciError};
use crate::progress::Progress;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveManifest {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

struct ArchiveStore {
    /// Where each layer is in the archive, and its member name (for errors).
    locations: Vec<(BlobLocation, String)>,
    shown: String,
}

impl BlobStore for ArchiveStore {
    fn fetch_layer(&self, index: usize, layer: &LayerInfo, _progress: &Progress) -> Result<BlobLocation, OciError> {
        let (loc, name) = &self.locations[index];
        let shown = &self.shown;
        match (&layer.digest, &layer.diff_id) {
            (Some(digest), _) => verify_location(loc, digest, layer.size, &format!("layer {index} ({name}) of docker archive {shown}"))?,
            (None, Some(diff_id)) => {
                verify_uncompressed(loc, diff_id, &format!("layer {index} ({name}) of docker archive {shown}, uncompressed, against the config's diff_id"))?
            }
            (None, None) => {
                return Err(OciError::Invalid(format!("layer {index} ({name}) of docker archive {shown} has neither a digest in its name nor a diff_id")))
            }
        }
        Ok(loc.clone())
    }
}

/// The digest a docker archive's member name carries, if any:
/// `blobs/sha256/<hex>` (Docker 25+) or `<hex>.tar` / `<hex>.json` (skopeo).
fn digest_in_name(name: &str) -> Option<Digest> {
    let hex = name.strip_prefix("blobs/sha256/").or_else(|| name.strip_suffix(".tar")).or_else(|| name.strip_suffix(".json"))?;
    format!("sha256:{hex}").parse().ok()
}

pub(super) fn open(path: &Path, reference: Option<&str>) -> Result<Image, OciError> {
    let shown = path.display().to_string();
    let file = Arc::new(File::open(path).map_err(io_err(format!("cannot open docker archive {shown}")))?);
    let mut entries: HashMap<String, (u64, u64)> = HashMap::new();
    {
        let mut archive = tar::Archive::new(&*file);
        for entry in archive.entries_with_seek().map_err(io_err(format!("{shown} is not a tar archive")))? {
            let entry = entry.map_err(io_err(format!("{shown}: bad tar entry")))?;
            if entry.header().entry_type().is_file() {
                let name = String::from_utf8_lossy(&entry.path_bytes()).trim_start_matches("./").to_string();
                entries.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
    }
    let read_member = |name: &str, limit: u64| -> Result<Vec<u8>, OciError> {
        let &(offset, size) = entries.get(name).ok_or_else(|| OciError::Invalid(format!("docker archive {shown} has no member {name:?}")))?;
        if size > limit {
            return Err(OciError::Invalid(format!("{name} in {shown} is {size} bytes, over the {limit}-byte limit")));
        }
        let mut buf = vec![0; size as usize];
        file.read_exact_at(&mut buf, offset).map_err(io_err(format!("cannot read {name} from {shown}")))?;
        Ok(buf)
    };
    let manifest_bytes = read_member("manifest.json", 16 << 20)?;
    let manifests: Vec<ArchiveManifest> =
        serde_json::from_slice(&manifest_bytes).map_err(|e| OciError::Invalid(format!("manifest.json of {shown} is malformed: {e}")))?;
    let chosen = match reference {
        Some(r) => manifests
            .iter()
            .find(|m| m.repo_tags.iter().flatten().any(|t| t == r || t.rsplit('/').next() == Some(r)))
            .ok_or_else(|| OciError::Invalid(format!("docker archive {shown} has no image tagged {r:?}")))?,
        None => match manifests.as_slice() {
            [only] => only,
            [] => return Err(OciError::Invalid(format!("docker archive {shown} holds no images"))),
            _ => {
                return Err(OciError::Invalid(format!("docker archive {shown} holds {} images; name one as docker-archive:{shown}:NAME:TAG", manifests.len())))
            }
        },
    };
    let config_bytes = read_member(&chosen.config, 16 << 20)?;
    let config_digest = digest_in_name(&chosen.config).ok_or_else(|| {
        OciError::Invalid(format!(
            "docker archive {shown}: the config member {:?} names no digest (<sha256 hex>.json or blobs/sha256/<hex>), so it cannot be verified",
            chosen.config
        ))
    })?;
    verify_bytes(&config_bytes, &config_digest, None, &format!("config {config_digest} of {shown}"))?;
    let config = ImageConfig::parse(&config_bytes, &format!("config of {shown}"))?;
    if config.rootfs.diff_ids.len() != chosen.layers.len() {
        return Err(OciError::Invalid(format!(
            "docker archive {shown}: the config lists {} diff_ids for {} layers",
            config.rootfs.diff_ids.len(),
            chosen.layers.len()
        )));
    }
    let mut layers = Vec::new();
    let mut locations = Vec::new();
    for (i, name) in chosen.layers.iter().enumerate() {
        let &(offset, size) = entries.get(name.as_str()).ok_or_else(|| OciError::Invalid(format!("docker archive {shown} has no layer member {name:?}")))?;
        layers.push(LayerInfo { digest: digest_in_name(name), media_type: String::new(), size, diff_id: config.rootfs.diff_ids.get(i).cloned() });
        locations.push((BlobLocation { file: Arc::clone(&file), offset, len: size }, name.clone()));
    }
    Ok(Image {
        reference: super::ImageRef::DockerArchive { path: path.to_path_buf(), reference: reference.map(str::to_string) },
        manifest_digest: None,
        manifest: None,
        config_digest: Some(config_digest),
        config,
        layers,
        store: Box::new(ArchiveStore { locations, shown }),
    })
}
