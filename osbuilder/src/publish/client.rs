//! The push side of the registry client: blobs, resumable uploads and
//! manifests, over [`crate::oci::http`] (which sends the requests, answers
//! the authentication challenges and retries).
//!
//! The rules:
//! - A blob goes up in PATCH chunks read from its source at the offset
//!   needed, so memory is one chunk whatever the blob's size. After a failed
//!   chunk the upload session is asked how far it got (`GET` on the session:
//!   `Range: 0-LAST`) and the upload continues from there; only when the
//!   session is gone does it start again (at most `retries` times). A failure
//!   counts against the retry budget only while the registry holds no more
//!   than it ever did.
//! - A blob the repository has (HEAD) is not sent; one that another
//!   repository of the same registry has is mounted (`POST ?mount=&from=`),
//!   with the token's scope widened to pull from that repository.

use std::io::Read;

use bytes::Bytes;
use reqwest::{Method, StatusCode, Url};

use super::PublishError;
use crate::oci::digest::Digest;
use crate::oci::http::{error_body, Client, Failure, Req};
use crate::progress::Progress;

/// A blob the push can read at any offset.
pub trait BlobSource: Sync {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn reader_at(&self, offset: u64) -> std::io::Result<Box<dyn Read + Send + '_>>;
}

/// What happened to one blob.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum BlobOutcome {
    /// The repository had it.
    Present,
    /// Mounted from another repository of the registry.
    Mounted {
        from: String,
    },
    Uploaded {
        bytes: u64,
    },
}

/// The push's requests, as methods of the one registry client: what they
/// send goes through its authentication and retries.
impl Client {
    pub async fn blob_exists(&self, digest: &Digest) -> Result<bool, PublishError> {
        let resp = self.send(&Req::new(Method::HEAD, self.url(&format!("blobs/{digest}")))).await?;
        match resp.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.unexpected(&format!("HEAD blob {digest}"), s, &resp.body).into()),
        }
    }

    /// Starts an upload session, or mounts `digest` from `from`: `Ok(None)`
    /// when mounted.
    async fn start_upload(&self, mount: Option<(&Digest, &str)>) -> Result<Option<Url>, PublishError> {
        let mut url = self.url("blobs/uploads/");
        if let Some((digest, from)) = mount {
            url.query_pairs_mut().append_pair("mount", &digest.to_string()).append_pair("from", from);
        }
        let resp = self.send(&Req::new(Method::POST, url)).await?;
        match resp.status {
            StatusCode::CREATED if mount.is_some() => Ok(None),
            StatusCode::ACCEPTED => Ok(Some(self.location(&resp, "starting an upload")?)),
            s => Err(self.unexpected("starting an upload", s, &resp.body).into()),
        }
    }

    /// Where an upload session stands: the bytes the registry holds and the
    /// session's current URL; `None` when the session is gone.
    async fn upload_status(&self, session: &Url) -> Result<Option<(u64, Url)>, PublishError> {
        let resp = self.send(&Req::new(Method::GET, session.clone())).await?;
        match resp.status {
            StatusCode::NO_CONTENT | StatusCode::OK | StatusCode::ACCEPTED => {
                let have = match resp.header("range") {
                    Some(r) => parse_range_end(r).map_err(|e| self.unexpected(&format!("upload status (Range {r:?}: {e})"), resp.status, b""))?,
                    None => 0,
                };
                let url = if resp.headers.contains_key("location") { self.location(&resp, "upload status")? } else { session.clone() };
                Ok(Some((have, url)))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(self.unexpected("upload status", s, &resp.body).into()),
        }
    }

    fn with_digest(url: &Url, digest: &Digest) -> Url {
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("digest", &digest.to_string());
        url
    }

    /// Pushes one blob unless the repository has it; mounts it from one of
    /// `mount_from` when the registry can.
    pub async fn push_blob(&self, digest: &Digest, source: &dyn BlobSource, mount_from: &[String], progress: &Progress) -> Result<BlobOutcome, PublishError> {
        if self.blob_exists(digest).await? {
            return Ok(BlobOutcome::Present);
        }
        let mut session = None;
        // One mount attempt: a registry that cannot mount opens an upload
        // session instead, which the upload then uses.
        if let Some(from) = mount_from.iter().find(|r| *r != self.repo()) {
            let mounted = match self.add_pull_scope(from).await {
                Ok(()) => self.start_upload(Some((digest, from))).await,
                Err(e) => Err(e.into()),
            };
            match mounted {
                Ok(None) => return Ok(BlobOutcome::Mounted { from: from.clone() }),
                Ok(Some(url)) => session = Some(url),
                // Not allowed to read `from` (a hint from another user's push,
                // a wrong --mount-from): upload instead.
                Err(PublishError::Auth { message, .. }) => {
                    eprintln!("osbuilder: cannot mount {digest} from {from} ({message}); uploading it");
                    self.drop_pull_scope(from).await?;
                }
                Err(e) => return Err(e),
            }
        }
        let size = source.len();
        let bar = progress.bytes(format!("push {}", &digest.to_string()[..19]), size);
        let result = self.upload(digest, source, session, &bar).await;
        bar.finish_and_clear();
        result.map(|()| BlobOutcome::Uploaded { bytes: size })
    }

    async fn upload(&self, digest: &Digest, source: &dyn BlobSource, session: Option<Url>, bar: &indicatif::ProgressBar) -> Result<(), PublishError> {
        let size = source.len();
        let mut session = match session {
            Some(s) => s,
            None => self.start_upload(None).await?.expect("no mount asked"),
        };
        let mut offset = 0u64;
        // Failures count against the budget only while the registry holds no
        // more than it ever did (`high`); restarts from 0 have their own cap.
        let mut stalled = 0u32;
        let mut high = 0u64;
        let mut restarts = 0u32;
        let read_err = |e: std::io::Error| PublishError::Io { context: format!("cannot read blob {digest}"), source: e };
        loop {
            // The last request carries the last chunk (or, for a blob of one
            // chunk, the whole blob: a monolithic PUT) and the digest.
            let len = (size - offset).min(self.options().chunk_size);
            let last = offset + len == size;
            let mut chunk = vec![0u8; len as usize];
            source.reader_at(offset).map_err(read_err)?.read_exact(&mut chunk).map_err(read_err)?;
            let body = Bytes::from(chunk);
            let req = if last {
                let mut req = Req::new(Method::PUT, Self::with_digest(&session, digest)).header("content-type", "application/octet-stream");
                if len > 0 {
                    req = req.body(body);
                }
                req
            } else {
                Req::new(Method::PATCH, session.clone())
                    .header("content-type", "application/octet-stream")
                    .header("content-range", &format!("{}-{}", offset, offset + len - 1))
                    .body(body)
            };
            match self.send_once(&req).await {
                Ok(resp) if last && resp.status == StatusCode::CREATED => {
                    if let Some(got) = resp.header("docker-content-digest") {
                        if got != digest.to_string() {
                            return Err(self.unexpected(&format!("completing blob {digest} (the registry computed {got})"), resp.status, &resp.body).into());
                        }
                    }
                    bar.set_position(size);
                    return Ok(());
                }
                Ok(resp) if !last && resp.status == StatusCode::ACCEPTED => {
                    session = self.location(&resp, "uploading a chunk")?;
                    let before = offset;
                    offset += len;
                    if let Some(have) = resp.header("range").and_then(|r| parse_range_end(r).ok()) {
                        // Trust what the registry says it holds.
                        if have != offset && have <= size {
                            offset = have;
                        }
                    }
                    bar.set_position(offset);
                    if offset > high {
                        high = offset;
                        stalled = 0;
                    } else if offset <= before {
                        // Accepted, yet the session holds no more than before the chunk.
                        self.wait_or_give_up(
                            &mut stalled,
                            &format!("uploading {digest}: the registry took a chunk at byte {before} but holds only {offset} bytes"),
                            None,
                        )
                        .await?;
                    }
                    continue;
                }
                Ok(resp) if resp.status == StatusCode::RANGE_NOT_SATISFIABLE => {
                    self.wait_or_give_up(&mut stalled, &format!("uploading {digest}: the registry refused the range at byte {offset}"), None).await?;
                }
                Ok(resp) if resp.status == StatusCode::NOT_FOUND => {
                    // The session is gone (expired, cancelled, or completed by a
                    // request whose answer was lost): the status query below
                    // finds the blob or starts a new session.
                    self.wait_or_give_up(&mut stalled, &format!("uploading {digest}: the upload session is gone{}", error_body(&resp.body)), None).await?;
                }
                Ok(resp) if resp.status == StatusCode::BAD_REQUEST && String::from_utf8_lossy(&resp.body).contains("DIGEST_INVALID") => {
                    return Err(PublishError::Registry {
                        registry: self.registry().to_string(),
                        message: format!(
                            "the registry computed another digest than {digest} for the uploaded bytes (did the file change while being pushed?){}",
                            error_body(&resp.body)
                        ),
                    });
                }
                Ok(resp) => return Err(self.unexpected(&format!("{} blob {digest} at byte {offset}", req.method()), resp.status, &resp.body).into()),
                Err(Failure::Fatal(e)) => return Err(e.into()),
                Err(Failure::Retry { why, wait }) => {
                    self.wait_or_give_up(&mut stalled, &format!("uploading {digest}: {why}"), wait).await?;
                }
            }
            // Ask the session where it stands, then go on from there.
            {
                match self.upload_status(&session).await? {
                    Some((have, url)) if have <= size => {
                        session = url;
                        if have > high {
                            high = have;
                            stalled = 0;
                        }
                        if have > 0 {
                            self.bump(|s| {
                                s.resumes += 1;
                                s.resumed_from_bytes += have;
                            });
                        }
                        offset = have;
                    }
                    // The session is gone. It may have completed (the answer to
                    // the last request was lost): then the blob is there.
                    _ if self.blob_exists(digest).await? => {
                        bar.set_position(size);
                        return Ok(());
                    }
                    _ => {
                        restarts += 1;
                        if restarts > self.options().retries {
                            return Err(PublishError::Registry {
                                registry: self.registry().to_string(),
                                message: format!("uploading {digest}: the registry lost the upload session {restarts} times; giving up"),
                            });
                        }
                        self.bump(|s| s.restarts += 1);
                        session = self.start_upload(None).await?.expect("no mount asked");
                        offset = 0;
                    }
                }
                bar.set_position(offset);
            }
        }
    }

    /// PUTs a manifest (or index) under `reference` (a tag or its digest)
    /// and checks the digest the registry reports against ours.
    pub async fn put_manifest(&self, reference: &str, media_type: &str, bytes: &[u8]) -> Result<(), PublishError> {
        let req = Req::new(Method::PUT, self.url(&format!("manifests/{reference}"))).header("content-type", media_type).body(Bytes::copy_from_slice(bytes));
        let resp = self.send(&req).await?;
        if resp.status != StatusCode::CREATED && !resp.status.is_success() {
            return Err(self.unexpected(&format!("PUT manifest {reference}"), resp.status, &resp.body).into());
        }
        let ours = Digest::of_bytes(bytes).to_string();
        if let Some(got) = resp.header("docker-content-digest") {
            if got != ours {
                return Err(self.unexpected(&format!("PUT manifest {reference} (the registry reports {got}, ours is {ours})"), resp.status, b"").into());
            }
        }
        Ok(())
    }
}

/// `0-LAST` (or `bytes=0-LAST`): the number of bytes held, LAST + 1.
/// distribution answers `0-0` for an empty session as well as for one byte;
/// it is read as empty (a wrong guess costs one refused range and a new
/// status query).
fn parse_range_end(value: &str) -> Result<u64, String> {
    let v = value.trim().trim_start_matches("bytes=");
    let (a, b) = v.split_once('-').ok_or("no '-'")?;
    let a: u64 = a.trim().parse().map_err(|_| "start is not a number")?;
    let b: u64 = b.trim().parse().map_err(|_| "end is not a number")?;
    if a != 0 {
        return Err("does not start at 0".into());
    }
    Ok(if b == 0 { 0 } else { b + 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range_end("0-0"), Ok(0));
        assert_eq!(parse_range_end("0-1048575"), Ok(1 << 20));
        assert_eq!(parse_range_end("bytes=0-99"), Ok(100));
        assert!(parse_range_end("5-9").is_err());
        assert!(parse_range_end("junk").is_err());
    }
}
