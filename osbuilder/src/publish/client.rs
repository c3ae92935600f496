//! The registry side of a push: requests, authentication, retries and
//! resumable blob uploads, over the distribution spec's HTTP API.
//!
//! Why not `oci-client`'s push: its errors drop the response headers a
//! careful push needs (`Retry-After` on a 429, `Range` and `Location` of an
//! upload session), it never retries, and it cannot resume an upload, so a
//! dropped connection at 90% of a 3 GiB disk starts again from byte 0. The
//! requests here are few and plain (HEAD, POST, PATCH, PUT, GET), sent with
//! `reqwest` (the client `oci-client` itself is built on, so nothing new is
//! compiled); `oci-client` parses the references and pulls.
//!
//! The rules:
//! - Every request that can be repeated safely (HEAD, GET, manifest PUT,
//!   starting a session) is retried on a dropped connection, a timeout, a
//!   5xx or a 429, with exponential backoff, or after the `Retry-After` the
//!   registry names (seconds or an HTTP date; a wait over the limit is an
//!   error that says so).
//! - A blob goes up in PATCH chunks read from its source at the offset
//!   needed, so memory is one chunk whatever the blob's size. After a failed
//!   chunk the upload session is asked how far it got (`GET` on the session:
//!   `Range: 0-LAST`) and the upload continues from there; only when the
//!   session is gone does it start again (at most `retries` times). A failure
//!   counts against the retry budget only while the registry holds no more
//!   than it ever did.
//! - A blob the repository has (HEAD) is not sent; one that another
//!   repository of the same registry has is mounted (`POST ?mount=&from=`).
//! - Authentication follows the registry's challenge: HTTP basic, or a bearer
//!   token from the realm it names (scoped to this repository, plus pull on
//!   the repositories a mount reads from), renewed once on a 401.

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use oci_client::secrets::RegistryAuth;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::PublishError;
use crate::oci::digest::Digest;
use crate::progress::Progress;

/// How a push behaves on the wire.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bytes per PATCH request.
    pub chunk_size: u64,
    /// Attempts after the first for one request, or for one upload while it
    /// makes no progress.
    pub retries: u32,
    /// The first backoff; doubled on each further failure.
    pub backoff: Duration,
    /// No backoff and no `Retry-After` wait is longer than this.
    pub max_wait: Duration,
    /// A request with no answer for this long fails (a chunk gets extra time
    /// for its size at 256 KiB/s).
    pub timeout: Duration,
    /// Plain HTTP (loopback registries always get it).
    pub insecure: bool,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            chunk_size: 16 << 20,
            retries: 5,
            backoff: Duration::from_millis(500),
            max_wait: Duration::from_secs(60),
            timeout: Duration::from_secs(60),
            insecure: false,
        }
    }
}

/// What a push did on the wire, for the report and the tests.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct WireStats {
    pub requests: u64,
    /// Request body bytes handed to the connection (a chunk cut short by a
    /// dropped connection counts whole).
    pub bytes_sent: u64,
    pub retries: u64,
    /// Upload sessions continued from the registry's acknowledged offset.
    pub resumes: u64,
    /// Bytes the registry had already acknowledged when an upload resumed.
    pub resumed_from_bytes: u64,
    /// Upload sessions started again from byte 0.
    pub restarts: u64,
}

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

enum Failure {
    /// Worth another try, after at least `wait`.
    Retry {
        why: String,
        wait: Option<Duration>,
    },
    Fatal(PublishError),
}

struct Auth {
    creds: RegistryAuth,
    /// What the registry asked for, once known.
    scheme: Option<Scheme>,
    header: Option<HeaderValue>,
    mount_scopes: BTreeSet<String>,
}

#[derive(Clone, Debug)]
enum Scheme {
    Basic,
    Bearer { realm: String, service: Option<String> },
}

/// A connection to one repository of one registry.
pub struct Client {
    http: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    base: Url,
    registry: String,
    repo: String,
    opts: ClientOptions,
    auth: Mutex<Auth>,
    stats: Mutex<WireStats>,
}

fn status_text(status: StatusCode) -> String {
    format!("{} {}", status.as_u16(), status.canonical_reason().unwrap_or(""))
}

/// Seconds, or an HTTP date, as the registry may send in `Retry-After`.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(when.duration_since(std::time::SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// The registry's error body, shortened, for a message.
fn error_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(400)]);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// One request, ready to send again.
#[derive(Clone)]
pub(super) struct Req {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

impl Req {
    fn new(method: Method, url: Url) -> Self {
        Req { method, url, headers: HeaderMap::new(), body: None }
    }

    fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, HeaderValue::from_str(value).expect("header values we build are ASCII"));
        self
    }

    fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }
}

pub(super) struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Client {
    pub fn new(registry: &str, repo: &str, creds: RegistryAuth, opts: ClientOptions) -> Result<Client, PublishError> {
        let plain = opts.insecure || crate::oci::registry_is_loopback(registry);
        let scheme = if plain { "http" } else { "https" };
        // Docker Hub's API is not served at the name people write.
        let api_host = if registry == "docker.io" || registry == "index.docker.io" { "registry-1.docker.io" } else { registry };
        let base =
            Url::parse(&format!("{scheme}://{api_host}/")).map_err(|e| PublishError::Usage(format!("registry {registry:?} is not a host[:port]: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .read_timeout(opts.timeout)
            .user_agent(concat!("osbuilder/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| PublishError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| PublishError::Io { context: "cannot start the async runtime".into(), source: e })?;
        let header = match &creds {
            RegistryAuth::Bearer(token) => Some(bearer(token)?),
            _ => None,
        };
        Ok(Client {
            http,
            runtime,
            base,
            registry: registry.to_string(),
            repo: repo.to_string(),
            opts,
            auth: Mutex::new(Auth { creds, scheme: None, header, mount_scopes: BTreeSet::new() }),
            stats: Mutex::new(WireStats::default()),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    pub fn stats(&self) -> WireStats {
        self.stats.lock().unwrap().clone()
    }

    fn url(&self, path: &str) -> Url {
        self.base.join(&format!("v2/{}/{path}", self.repo)).expect("paths we build are valid")
    }

    /// A `Location` header, absolute or relative to the registry.
    fn location(&self, resp: &Resp, what: &str) -> Result<Url, PublishError> {
        let loc = resp
            .header("location")
            .ok_or_else(|| PublishError::Registry { registry: self.registry.clone(), message: format!("{what}: the answer has no Location header") })?;
        self.base
            .join(loc)
            .map_err(|e| PublishError::Registry { registry: self.registry.clone(), message: format!("{what}: Location {loc:?} is not a URL: {e}") })
    }

    /// Whether `url` is the registry itself (scheme, host and port): only
    /// there do the credentials go.
    fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.base.scheme() && url.host_str() == self.base.host_str() && url.port_or_known_default() == self.base.port_or_known_default()
    }

    fn bump(&self, f: impl FnOnce(&mut WireStats)) {
        f(&mut self.stats.lock().unwrap());
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff.saturating_mul(1u32 << attempt.min(16));
        // A little jitter so parallel pushes do not retry in step.
        let jitter =
            Duration::from_millis(u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_millis() % 100));
        (base + jitter).min(self.opts.max_wait)
    }

    /// Sends `req` once, authenticating on a 401 (once) and classifying
    /// failures.
    async fn send_once(&self, req: &Req) -> Result<Resp, Failure> {
        for round in 0..2 {
            let header = self.auth.lock().unwrap().header.clone();
            let len = req.body.as_ref().map_or(0, |b| b.len() as u64);
            let mut builder = self
                .http
                .request(req.method.clone(), req.url.clone())
                .headers(req.headers.clone())
                .timeout(self.opts.timeout + Duration::from_secs(len / (256 << 10)));
            if let Some(h) = header.filter(|_| self.same_origin(&req.url)) {
                builder = builder.header(reqwest::header::AUTHORIZATION, h);
            }
            if let Some(body) = &req.body {
                builder = builder.header(reqwest::header::CONTENT_LENGTH, len).body(body.clone());
            }
            self.bump(|s| {
                s.requests += 1;
                s.bytes_sent += len;
            });
            let what = format!("{} {}", req.method, req.url.path());
            let resp = match builder.send().await {
                Ok(r) => r,
                Err(e) => return Err(Failure::Retry { why: format!("{what}: {}", describe(&e)), wait: None }),
            };
            let status = resp.status();
            let headers = resp.headers().clone();
            let body = if req.method == Method::HEAD {
                Bytes::new()
            } else {
                match resp.bytes().await {
                    Ok(b) => b,
                    Err(e) => return Err(Failure::Retry { why: format!("{what}: reading the answer: {}", describe(&e)), wait: None }),
                }
            };
            let resp = Resp { status, headers, body };
            if status == StatusCode::UNAUTHORIZED && round == 0 {
                self.authenticate(&resp).await.map_err(Failure::Fatal)?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let source = match self.auth.lock().unwrap().creds {
                    RegistryAuth::Anonymous => "no credentials were given",
                    _ => "the credentials were refused",
                };
                return Err(Failure::Fatal(PublishError::Auth {
                    registry: self.registry.clone(),
                    message: format!("{what} answered {} ({source}){}", status_text(status), error_body(&resp.body)),
                }));
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
                let wait = retry_after(&resp.headers);
                return Err(Failure::Retry { why: format!("{what} answered {}{}", status_text(status), error_body(&resp.body)), wait });
            }
            return Ok(resp);
        }
        unreachable!("the second round returns")
    }

    /// Sends an idempotent request, retrying as the module documentation says.
    async fn send(&self, req: &Req) -> Result<Resp, PublishError> {
        let mut attempt = 0;
        loop {
            match self.send_once(req).await {
                Ok(resp) => return Ok(resp),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { why, wait }) => {
                    self.wait_or_give_up(&mut attempt, &why, wait).await?;
                }
            }
        }
    }

    async fn wait_or_give_up(&self, attempt: &mut u32, why: &str, wait: Option<Duration>) -> Result<(), PublishError> {
        if *attempt >= self.opts.retries {
            return Err(PublishError::Registry { registry: self.registry.clone(), message: format!("{why} (gave up after {} attempts)", *attempt + 1) });
        }
        let wait = match wait {
            Some(w) if w > self.opts.max_wait => {
                return Err(PublishError::Registry {
                    registry: self.registry.clone(),
                    message: format!("{why}; it asks to wait {} s (Retry-After), over the {} s limit", w.as_secs(), self.opts.max_wait.as_secs()),
                })
            }
            Some(w) => w,
            None => self.backoff(*attempt),
        };
        *attempt += 1;
        self.bump(|s| s.retries += 1);
        tracing_retry(why, wait);
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// Answers a 401's challenge: basic credentials, or a bearer token from
    /// the realm.
    async fn authenticate(&self, resp: &Resp) -> Result<(), PublishError> {
        let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
        let parsed = http_auth::parse_challenges(&challenge).unwrap_or_default();
        let scheme = if let Some(c) = parsed.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            let param = |k: &str| c.params.iter().find(|(name, _)| name.eq_ignore_ascii_case(k)).map(|(_, v)| v.to_unescaped());
            let realm = param("realm")
                .ok_or_else(|| PublishError::Auth { registry: self.registry.clone(), message: format!("a bearer challenge without a realm: {challenge:?}") })?;
            Scheme::Bearer { realm, service: param("service") }
        } else if parsed.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic")) {
            Scheme::Basic
        } else {
            return Err(PublishError::Auth { registry: self.registry.clone(), message: format!("401 with a challenge we cannot answer: {challenge:?}") });
        };
        let (creds, scopes) = {
            let auth = self.auth.lock().unwrap();
            (auth.creds.clone(), auth.mount_scopes.clone())
        };
        let header = match (&scheme, &creds) {
            (Scheme::Basic, RegistryAuth::Basic(user, pass)) => basic(user, pass)?,
            (Scheme::Basic, _) => {
                return Err(PublishError::Auth {
                    registry: self.registry.clone(),
                    message: "it asks for a user and password, and no credentials were given (--creds, OSBUILDER_REGISTRY_USER/PASSWORD or an auth file)"
                        .into(),
                })
            }
            (Scheme::Bearer { .. }, RegistryAuth::Bearer(_)) => {
                return Err(PublishError::Auth { registry: self.registry.clone(), message: "the bearer token given was refused".into() })
            }
            (Scheme::Bearer { realm, service }, _) => bearer(&self.fetch_token(realm, service.as_deref(), &creds, &scopes).await?)?,
        };
        let mut auth = self.auth.lock().unwrap();
        auth.scheme = Some(scheme);
        auth.header = Some(header);
        Ok(())
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, creds: &RegistryAuth, extra: &BTreeSet<String>) -> Result<String, PublishError> {
        let auth_err = |message: String| PublishError::Auth { registry: self.registry.clone(), message };
        let mut url = Url::parse(realm).map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        let realm_host = format!("{}:{}", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0));
        if url.scheme() != "https" && !(self.opts.insecure || crate::oci::registry_is_loopback(&realm_host)) {
            return Err(auth_err(format!("the token realm {realm} is plain HTTP; credentials go there only with --insecure")));
        }
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &format!("repository:{}:pull,push", self.repo));
            for repo in extra {
                q.append_pair("scope", &format!("repository:{repo}:pull"));
            }
        }
        let mut req = Req::new(Method::GET, url);
        if let RegistryAuth::Basic(user, pass) = creds {
            req.headers.insert(reqwest::header::AUTHORIZATION, basic(user, pass)?);
        }
        let mut attempt = 0;
        let resp = loop {
            let builder = self.http.request(Method::GET, req.url.clone()).headers(req.headers.clone()).timeout(self.opts.timeout);
            match builder.send().await {
                Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(r.headers());
                    self.wait_or_give_up(&mut attempt, &format!("token server {realm} answered {}", status_text(r.status())), wait).await?;
                }
                Ok(r) => break r,
                Err(e) => self.wait_or_give_up(&mut attempt, &format!("token server {realm}: {}", describe(&e)), None).await?,
            }
        };
        let status = resp.status();
        let body = resp.bytes().await.map_err(|e| auth_err(format!("token server {realm}: {}", describe(&e))))?;
        if !status.is_success() {
            let given = if matches!(creds, RegistryAuth::Anonymous) { "no credentials were given" } else { "the credentials were refused" };
            return Err(auth_err(format!("the token server {realm} answered {} ({given}){}", status_text(status), error_body(&body))));
        }
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token: Token = serde_json::from_slice(&body).map_err(|e| auth_err(format!("the token server {realm} sent no token: {e}")))?;
        token.token.or(token.access_token).filter(|t| !t.is_empty()).ok_or_else(|| auth_err(format!("the token server {realm} sent an empty token")))
    }

    /// Blocks on `f`.
    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }

    pub async fn blob_exists(&self, digest: &Digest) -> Result<bool, PublishError> {
        let resp = self.send(&Req::new(Method::HEAD, self.url(&format!("blobs/{digest}")))).await?;
        match resp.status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.unexpected(&format!("HEAD blob {digest}"), s, &resp.body)),
        }
    }

    fn unexpected(&self, what: &str, status: StatusCode, body: &[u8]) -> PublishError {
        PublishError::Registry { registry: self.registry.clone(), message: format!("{what} answered {}{}", status_text(status), error_body(body)) }
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
            s => Err(self.unexpected("starting an upload", s, &resp.body)),
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
            s => Err(self.unexpected("upload status", s, &resp.body)),
        }
    }

    fn with_digest(url: &Url, digest: &Digest) -> Url {
        let mut url = url.clone();
        url.query_pairs_mut().append_pair("digest", &digest.to_string());
        url
    }

    /// A bearer token scoped to pull from `repo` too (a mount reads from it);
    /// fetched again only when the scope is new.
    async fn add_mount_scope(&self, repo: &str) -> Result<(), PublishError> {
        let (scheme, creds, scopes) = {
            let mut auth = self.auth.lock().unwrap();
            if !auth.mount_scopes.insert(repo.to_string()) {
                return Ok(());
            }
            (auth.scheme.clone(), auth.creds.clone(), auth.mount_scopes.clone())
        };
        if let (Some(Scheme::Bearer { realm, service }), false) = (scheme, matches!(creds, RegistryAuth::Bearer(_))) {
            let token = self.fetch_token(&realm, service.as_deref(), &creds, &scopes).await?;
            self.auth.lock().unwrap().header = Some(bearer(&token)?);
        }
        Ok(())
    }

    /// Forgets a mount source's scope and, with a bearer token, fetches one
    /// without it.
    async fn drop_mount_scope(&self, repo: &str) -> Result<(), PublishError> {
        let (scheme, creds, scopes) = {
            let mut auth = self.auth.lock().unwrap();
            auth.mount_scopes.remove(repo);
            (auth.scheme.clone(), auth.creds.clone(), auth.mount_scopes.clone())
        };
        if let (Some(Scheme::Bearer { realm, service }), false) = (scheme, matches!(creds, RegistryAuth::Bearer(_))) {
            let token = self.fetch_token(&realm, service.as_deref(), &creds, &scopes).await?;
            self.auth.lock().unwrap().header = Some(bearer(&token)?);
        }
        Ok(())
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
        if let Some(from) = mount_from.iter().find(|r| **r != self.repo) {
            let mounted = match self.add_mount_scope(from).await {
                Ok(()) => self.start_upload(Some((digest, from))).await,
                Err(e) => Err(e),
            };
            match mounted {
                Ok(None) => return Ok(BlobOutcome::Mounted { from: from.clone() }),
                Ok(Some(url)) => session = Some(url),
                // Not allowed to read `from` (a hint from another user's push,
                // a wrong --mount-from): upload instead.
                Err(PublishError::Auth { message, .. }) => {
                    eprintln!("osbuilder: cannot mount {digest} from {from} ({message}); uploading it");
                    self.drop_mount_scope(from).await?;
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
            let len = (size - offset).min(self.opts.chunk_size);
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
                            return Err(self.unexpected(&format!("completing blob {digest} (the registry computed {got})"), resp.status, &resp.body));
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
                        registry: self.registry.clone(),
                        message: format!(
                            "the registry computed another digest than {digest} for the uploaded bytes (did the file change while being pushed?){}",
                            error_body(&resp.body)
                        ),
                    });
                }
                Ok(resp) => return Err(self.unexpected(&format!("{} blob {digest} at byte {offset}", req.method), resp.status, &resp.body)),
                Err(Failure::Fatal(e)) => return Err(e),
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
                        if restarts > self.opts.retries {
                            return Err(PublishError::Registry {
                                registry: self.registry.clone(),
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
            return Err(self.unexpected(&format!("PUT manifest {reference}"), resp.status, &resp.body));
        }
        let ours = Digest::of_bytes(bytes).to_string();
        if let Some(got) = resp.header("docker-content-digest") {
            if got != ours {
                return Err(self.unexpected(&format!("PUT manifest {reference} (the registry reports {got}, ours is {ours})"), resp.status, b""));
            }
        }
        Ok(())
    }

    /// GETs a manifest by digest and checks it.
    pub async fn get_manifest(&self, digest: &Digest, accept: &str) -> Result<Bytes, PublishError> {
        let req = Req::new(Method::GET, self.url(&format!("manifests/{digest}"))).header("accept", accept);
        let resp = self.send(&req).await?;
        if !resp.status.is_success() {
            return Err(self.unexpected(&format!("GET manifest {digest}"), resp.status, &resp.body));
        }
        if resp.body.len() > 4 << 20 {
            return Err(self.unexpected(&format!("GET manifest {digest} ({} bytes, over 4 MiB)", resp.body.len()), resp.status, b""));
        }
        if Digest::of_bytes(&resp.body) != *digest {
            return Err(self.unexpected(&format!("GET manifest {digest}: the bytes have another digest"), resp.status, b""));
        }
        Ok(resp.body)
    }

    /// Streams a blob (or `range` of it) to `sink`, retrying and continuing
    /// from the byte reached; returns the bytes read.
    pub async fn get_blob(&self, digest: &Digest, range: Option<(u64, u64)>, sink: &mut dyn std::io::Write) -> Result<u64, PublishError> {
        use futures_util::StreamExt;
        let (start, end) = range.map_or((0, None), |(a, b)| (a, Some(b)));
        let mut pos = start;
        let mut attempt = 0;
        loop {
            let header = self.auth.lock().unwrap().header.clone();
            let mut builder = self.http.get(self.url(&format!("blobs/{digest}")));
            if let Some(h) = header {
                builder = builder.header(reqwest::header::AUTHORIZATION, h);
            }
            if pos > 0 || end.is_some() {
                builder = builder.header("range", format!("bytes={pos}-{}", end.map_or(String::new(), |e| e.to_string())));
            }
            self.bump(|s| s.requests += 1);
            let why = match builder.send().await {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && attempt == 0 => {
                    let r = Resp { status: resp.status(), headers: resp.headers().clone(), body: Bytes::new() };
                    self.authenticate(&r).await?;
                    attempt += 1;
                    continue;
                }
                Ok(resp) if resp.status().is_success() => {
                    if (pos > 0 || end.is_some()) && resp.status() != StatusCode::PARTIAL_CONTENT {
                        return Err(self.unexpected(&format!("GET blob {digest} with a Range"), resp.status(), b"(the registry ignored the range)"));
                    }
                    let mut stream = resp.bytes_stream();
                    let mut failed = None;
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(c) => {
                                sink.write_all(&c).map_err(|e| PublishError::Io { context: format!("cannot keep blob {digest}"), source: e })?;
                                pos += c.len() as u64;
                            }
                            Err(e) => {
                                failed = Some(describe(&e));
                                break;
                            }
                        }
                    }
                    match failed {
                        None => return Ok(pos - start),
                        Some(why) => format!("GET blob {digest}: {why}"),
                    }
                }
                Ok(resp) if resp.status().is_server_error() || resp.status() == StatusCode::TOO_MANY_REQUESTS => {
                    format!("GET blob {digest} answered {}", status_text(resp.status()))
                }
                Ok(resp) => return Err(self.unexpected(&format!("GET blob {digest}"), resp.status(), b"")),
                Err(e) => format!("GET blob {digest}: {}", describe(&e)),
            };
            self.wait_or_give_up(&mut attempt, &why, None).await?;
        }
    }
}

fn tracing_retry(why: &str, wait: Duration) {
    eprintln!("osbuilder: {why}; trying again in {:.1} s", wait.as_secs_f64());
}

/// What reqwest says went wrong, with its sources (the useful part is
/// usually two levels down: "connection reset by peer").
fn describe(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
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

fn basic(user: &str, pass: &str) -> Result<HeaderValue, PublishError> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| PublishError::Usage("the credentials cannot be sent in a header".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

fn bearer(token: &str) -> Result<HeaderValue, PublishError> {
    let mut v =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| PublishError::Usage("the bearer token has characters a header cannot carry".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_retry_after() {
        assert_eq!(parse_range_end("0-0"), Ok(0));
        assert_eq!(parse_range_end("0-1048575"), Ok(1 << 20));
        assert_eq!(parse_range_end("bytes=0-99"), Ok(100));
        assert!(parse_range_end("5-9").is_err());
        assert!(parse_range_end("junk").is_err());

        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert("retry-after", HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        h.insert("retry-after", HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
