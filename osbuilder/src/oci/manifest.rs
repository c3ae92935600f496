//! The JSON documents of an image: index, manifest, config.
//!
//! Our own lenient serde types rather than oci-spec's: OCI and Docker v2
//! schema 2 documents share one shape, and we only need the fields that drive
//! the build. Unknown fields are ignored; the raw bytes are kept for digests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

/// Media types we ask registries for, best first.
pub const ACCEPTED_MANIFESTS: &[&str] = &[OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST];

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split('/');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
                Ok(Platform { os: os.to_string(), architecture: arch.to_string(), variant: variant.filter(|v| !v.is_empty()).map(str::to_string) })
            }
            _ => Err(format!("platform {s:?} is not of the form os/arch[/variant]")),
        }
    }

    pub fn linux_amd64() -> Self {
        Platform { os: "linux".into(), architecture: "amd64".into(), variant: None }
    }

    /// Whether an image of platform `candidate` satisfies this request: a
    /// request without a variant accepts any variant.
    pub fn accepts(&self, candidate: &Platform) -> bool {
        self.os == candidate.os && self.architecture == candidate.architecture && (self.variant.is_none() || self.variant == candidate.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// Either an index/manifest list or an image manifest: told apart by
/// `mediaType` when present, else by which list the document carries.
#[derive(Clone, Debug)]
pub enum ManifestDoc {
    Index(Index),
    Image(ImageManifest),
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    #[serde(default)]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} is not valid JSON of the expected shape: {source}")]
    Json { what: String, source: serde_json::Error },
    #[error("{what} has unsupported media type {media_type:?} (expected an OCI or Docker v2 schema 2 manifest or index)")]
    MediaType { what: String, media_type: String },
    #[error("{what} has schemaVersion {version}; only schema 2 is supported (schema 1 is deprecated and unsigned)")]
    SchemaVersion { what: String, version: u64 },
}

impl ManifestDoc {
    /// Parses a manifest or index; `what` names it in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self, ManifestError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            schema_version: Option<u64>,
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let json_err = |source| ManifestError::Json { what: what.to_string(), source };
        let probe: Probe = serde_json::from_slice(bytes).map_err(json_err)?;
        if let Some(v) = probe.schema_version.filter(|&v| v != 2) {
            return Err(ManifestError::SchemaVersion { what: what.to_string(), version: v });
        }
        let is_index = match probe.media_type.as_deref() {
            Some(OCI_INDEX | DOCKER_LIST) => true,
            Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
            None => probe.manifests.is_some(),
            Some(other) => return Err(ManifestError::MediaType { what: what.to_string(), media_type: other.to_string() }),
        };
        Ok(if is_index {
            ManifestDoc::Index(serde_json::from_slice(bytes).map_err(json_err)?)
        } else {
            ManifestDoc::Image(serde_json::from_slice(bytes).map_err(json_err)?)
        })
    }
}

impl Index {
    /// Picks the manifest for `wanted`, or explains what is available.
    pub fn select(&self, wanted: &Platform) -> Result<&Descriptor, String> {
        self.manifests.iter().find(|d| d.platform.as_ref().is_some_and(|p| wanted.accepts(p))).ok_or_else(|| {
            let available: Vec<String> =
                self.manifests.iter().filter_map(|d| d.platform.as_ref()).filter(|p| p.os != "unknown").map(ToString::to_string).collect();
            if available.is_empty() {
                format!("the index has no manifest for {wanted} (it names no platforms)")
            } else {
                format!("the index has no manifest for {wanted}; available: {}", available.join(", "))
            }
        })
    }
}

/// The image configuration: what the guest needs to run the workload.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
    #[serde(default)]
    pub rootfs: RootfsDiffs,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
pub struct RootfsDiffs {
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl ImageConfig {
    pub fn parse(bytes: &[u8], what: &str) -> Result<Self, ManifestError> {
        // Docker and OCI configs use `null` for empty lists; serde's default
        // handles missing fields, Option handles null.
        serde_json::from_slice(bytes).map_err(|source| ManifestError::Json { what: what.to_string(), source })
    }

    pub fn platform(&self) -> Platform {
        Platform { os: self.os.clone(), architecture: self.architecture.clone(), variant: self.variant.clone() }
    }

    /// `created` as seconds since the epoch, if it parses as RFC 3339.
    pub fn created_epoch(&self) -> Option<i64> {
        parse_rfc3339(self.created.as_deref()?)
    }
}

/// Parses the RFC 3339 timestamps image configs carry
/// (`2024-05-01T12:34:56.789Z`, `...+02:00`) to seconds since the epoch.
/// Hand-written: a dozen lines instead of a date crate for one field.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        tz if tz.len() == 6 && (tz.starts_with('+') || tz.starts_with('-')) && &tz[3..4] == ":" => {
            let h: i64 = tz[1..3].parse().ok()?;
            let m: i64 = tz[4..6].parse().ok()?;
            let sign = if tz.starts_with('-') { -1 } else { 1 };
            sign * (h * 3600 + m * 60)
        }
        _ => return None,
    };
    // Days from civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2024-02-29T12:00:00.123456789Z"), Some(1_709_208_000));
        assert_eq!(parse_rfc3339("2024-02-29T14:00:00+02:00"), Some(1_709_208_000));
        assert_eq!(parse_rfc3339("1969-12-31T23:59:59Z"), Some(-1));
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339("2024-13-01T00:00:00Z"), None);
    }

    #[test]
    fn platforms() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux/amd64/x/y").is_err());
        assert!(Platform::parse("linux/arm64").unwrap().accepts(&p));
        assert!(!p.accepts(&Platform::parse("linux/arm64/v7").unwrap()));
    }

    #[test]
    fn index_selection_lists_platforms() {
        let doc = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
          {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
          {"mediaType":"application/vnd.oci.image.manifest.v1+json","size":1,"digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","platform":{"os":"unknown","architecture":"unknown"}}]}"#;
        let ManifestDoc::Index(index) = ManifestDoc::parse(doc, "test index").unwrap() else { panic!("not an index") };
        assert!(index.select(&Platform::parse("linux/arm64").unwrap()).is_ok());
        let err = index.select(&Platform::linux_amd64()).unwrap_err();
        assert_eq!(err, "the index has no manifest for linux/amd64; available: linux/arm64/v8");
    }

    #[test]
    fn rejects_schema1_and_foreign_types() {
        assert!(matches!(ManifestDoc::parse(br#"{"schemaVersion":1}"#, "m"), Err(ManifestError::SchemaVersion { .. })));
        assert!(matches!(ManifestDoc::parse(br#"{"schemaVersion":2,"mediaType":"text/html"}"#, "m"), Err(ManifestError::MediaType { .. })));
    }
}
