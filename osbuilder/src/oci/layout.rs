//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::digest::Digest;
use super::manifest::{Descriptor, ImageConfig, ManifestDoc, Platform};
use super::{check_layer_media_type, read_verified, verify_location, BlobLocation, BlobStore, Image, LayerInfo, OciError};
use crate::progress::Progress;

const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// Nested indexes deeper than this are refused as hostile.
const MAX_INDEX_DEPTH: usize = 4;

struct LayoutStore {
    dir: PathBuf,
}

fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
    dir.join("blobs/sha256").join(digest.hex())
}

impl BlobStore for LayoutStore {
    fn fetch_layer(&self, index: usize, layer: &LayerInfo, _progress: &Progress) -> Result<BlobLocation, OciError> {
        let digest = layer.digest.as_ref().expect("layout layers always have digests");
        let missing = || super::io_err(format!("layer {index} blob {digest} is missing from {}", self.dir.display()));
        let file = File::open(blob_path(&self.dir, digest)).map_err(missing())?;
        let len = file.metadata().map_err(missing())?.len();
        // Hashed and then parsed through this one open file.
        let loc = BlobLocation { file: Arc::new(file), offset: 0, len };
        verify_location(&loc, digest, layer.size, &format!("layer {index} blob {digest}"))?;
        Ok(loc)
    }
}

pub(super) fn open(dir: &Path, reference: Option<&str>, platform: &Platform) -> Result<Image, OciError> {
    let index_path = dir.join("index.json");
    let bytes = super::read_json_file(&index_path, &format!("{} is not an OCI image layout (cannot read index.json)", dir.display()))?;
    let ManifestDoc::Index(index) = ManifestDoc::parse(&bytes, &format!("{}", index_path.display()))? else {
        return Err(OciError::Invalid(format!("{} is a manifest, not an index", index_path.display())));
    };
    let chosen: &Descriptor = match reference {
        Some(r) => index
            .manifests
            .iter()
            .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(r))
            .ok_or_else(|| OciError::Invalid(format!("{} has no image tagged {r:?}; it has: {}", dir.display(), ref_names(&index.manifests))))?,
        None => match index.manifests.as_slice() {
            [only] => only,
            [] => return Err(OciError::Invalid(format!("{} holds no images", dir.display()))),
            many => {
                // Several entries without a ref: a multi-arch layout. Pick by platform.
                if many.iter().all(|d| d.platform.is_some()) {
                    index.select(platform).map_err(|e| OciError::Platform(format!("{}: {e}", dir.display())))?
                } else {
                    return Err(OciError::Invalid(format!(
                        "{} holds {} images; name one as oci:{}:REF (refs: {})",
                        dir.display(),
                        many.len(),
                        dir.display(),
                        ref_names(many)
                    )));
                }
            }
        },
    };
    let mut desc = chosen.clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let what = format!("manifest {}", desc.digest);
        let bytes = read_verified(&blob_path(dir, &desc.digest), &desc.digest, Some(desc.size), &what)?;
        match ManifestDoc::parse(&bytes, &what)? {
            ManifestDoc::Index(nested) => {
                desc = nested.select(platform).map_err(|e| OciError::Platform(format!("{}: {e}", dir.display())))?.clone();
            }
            ManifestDoc::Image(manifest) => {
                let config_what = format!("config {}", manifest.config.digest);
                let config_bytes = read_verified(&blob_path(dir, &manifest.config.digest), &manifest.config.digest, Some(manifest.config.size), &config_what)?;
                let config = ImageConfig::parse(&config_bytes, &config_what)?;
                let layers = layer_infos(&manifest.layers, &config)?;
                return Ok(Image {
                    reference: super::ImageRef::Layout { dir: dir.to_path_buf(), reference: reference.map(str::to_string) },
                    manifest_digest: Some(desc.digest.clone()),
                    config_digest: Some(manifest.config.digest.clone()),
                    manifest: Some(manifest),
                    config,
                    layers,
                    store: Box::new(LayoutStore { dir: dir.to_path_buf() }),
                });
            }
        }
    }
    Err(OciError::Invalid(format!("{}: indexes nested more than {MAX_INDEX_DEPTH} deep", dir.display())))
}

pub(super) fn layer_infos(layers: &[Descriptor], config: &ImageConfig) -> Result<Vec<LayerInfo>, OciError> {
    layers
        .iter()
        .enumerate()
        .map(|(i, d)| {
            check_layer_media_type(&d.media_type, &format!("layer {i} ({})", d.digest))?;
            Ok(LayerInfo { digest: Some(d.digest.clone()), media_type: d.media_type.clone(), size: d.size, diff_id: config.rootfs.diff_ids.get(i).cloned() })
        })
        .collect()
}

fn ref_names(manifests: &[Descriptor]) -> String {
    let names: Vec<&str> = manifests.iter().filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str)).collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}
