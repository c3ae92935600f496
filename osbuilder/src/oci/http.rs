//! The registry client: the distribution spec's HTTP API over `reqwest`, the
//! one client pulls ([`super::registry`]) and pushes ([`crate::publish`]) use.
//!
//! Why not `oci-client`'s pulls and pushes: it buffers a manifest whole
//! before anyone can judge its size, its errors drop the response headers
//! (`Retry-After` on a 429 or 503, `Range` and `Location` of an upload
//! session), it never retries and it cannot resume an upload. The requests
//! are few and plain, sent with `reqwest` (the client `oci-client` itself is
//! built on, so nothing new is compiled); `oci-client` parses references.
//!
//! The rules:
//! - Plain HTTP only to a loopback registry or with `--insecure`; the
//!   credentials go only to the registry's own origin (scheme, host, port).
//! - Authentication follows the registry's challenge: HTTP basic, or a bearer
//!   token from the realm it names (scoped to this repository, pull or
//!   pull,push, plus pull on the repositories a mount reads from), renewed
//!   once on a 401. A bearer token given by the user is sent as is.
//! - Every request that can be repeated safely is retried (`retries` times)
//!   on a dropped connection, a timeout, a 5xx, a 408 or a 429, with
//!   exponential backoff, or after the `Retry-After` the registry names
//!   (seconds or an HTTP date); a `Retry-After` over `max_wait` is an error
//!   that names the wait.
//! - No answer is buffered past [`MAX_JSON`]: a manifest is refused as soon
//!   as its `Content-Length`, or the bytes streamed so far, pass it. Blobs
//!   stream to the caller ([`Client::open_blob`]), from an offset with
//!   `Range`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use oci_client::secrets::RegistryAuth;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};

use super::digest::Digest;
use super::MAX_JSON;

/// What the client asks a token server for on this repository.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
}

/// How the client behaves on the wire.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bytes per PATCH request of a push.
    pub chunk_size: u64,
    /// Attempts after the first for one request, or for one upload while it
    /// makes no progress.
    pub retries: u32,
    /// The first backoff; doubled on each further failure.
    pub backoff: Duration,
    /// No backoff is longer than this.
    pub max_backoff: Duration,
    /// No `Retry-After` wait is longer than this: a longer one is an error.
    pub max_wait: Duration,
    /// A request with no answer, or a transfer with no byte, for this long
    /// fails (a request body gets extra time for its size at 256 KiB/s).
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
            max_backoff: Duration::from_secs(60),
            max_wait: Duration::from_secs(60),
            timeout: Duration::from_secs(60),
            insecure: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    Usage(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("registry {registry}: {message}")]
    Registry { registry: String, message: String },
    #[error("registry {registry} refused access: {message}")]
    Auth { registry: String, message: String },
}

/// What the client did on the wire, for a push's report and the tests.
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

/// Why one attempt failed.
pub(crate) enum Failure {
    /// Worth another try, after at least `wait`.
    Retry {
        why: String,
        wait: Option<Duration>,
    },
    Fatal(HttpError),
}

struct Auth {
    creds: RegistryAuth,
    /// What the registry asked for, once known.
    scheme: Option<Scheme>,
    header: Option<HeaderValue>,
    /// Repositories a token must also allow pulls from (mount sources).
    pull_scopes: BTreeSet<String>,
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
    access: Access,
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
pub(crate) fn error_body(body: &[u8]) -> String {
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
pub(crate) struct Req {
    method: Method,
    url: Url,
    headers: HeaderMap,
    body: Option<Bytes>,
}

impl Req {
    pub(crate) fn new(method: Method, url: Url) -> Self {
        Req { method, url, headers: HeaderMap::new(), body: None }
    }

    pub(crate) fn method(&self) -> &Method {
        &self.method
    }

    pub(crate) fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.insert(name, HeaderValue::from_str(value).expect("header values we build are ASCII"));
        self
    }

    pub(crate) fn body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }
}

/// An answer read whole (at most [`MAX_JSON`] bytes).
pub(crate) struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// A blob's body as it streams in.
pub(crate) struct BlobBody {
    resp: reqwest::Response,
    /// The byte of the blob the body starts at: the offset asked for, or 0
    /// when the registry ignored the `Range`.
    pub from: u64,
    timeout: Duration,
}

impl BlobBody {
    /// The next piece of the body; `None` at its end.
    pub(crate) async fn chunk(&mut self) -> Result<Option<Bytes>, String> {
        self.resp.chunk().await.map_err(|e| describe(&e, self.timeout))
    }
}

impl Client {
    pub fn new(registry: &str, repo: &str, creds: RegistryAuth, access: Access, opts: ClientOptions) -> Result<Client, HttpError> {
        let plain = opts.insecure || is_loopback(registry);
        let scheme = if plain { "http" } else { "https" };
        // Docker Hub's API is not served at the name people write.
        let api_host = if registry == "docker.io" || registry == "index.docker.io" { "registry-1.docker.io" } else { registry };
        let base = Url::parse(&format!("{scheme}://{api_host}/")).map_err(|e| HttpError::Usage(format!("registry {registry:?} is not a host[:port]: {e}")))?;
        let http = reqwest::Client::builder()
            .connect_timeout(opts.timeout.min(Duration::from_secs(15)))
            .read_timeout(opts.timeout)
            .user_agent(concat!("osbuilder/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| HttpError::Usage(format!("cannot set up the HTTP client: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| HttpError::Io { context: "cannot start the async runtime".into(), source: e })?;
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
            access,
            opts,
            auth: Mutex::new(Auth { creds, scheme: None, header, pull_scopes: BTreeSet::new() }),
            stats: Mutex::new(WireStats::default()),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repo(&self) -> &str {
        &self.repo
    }

    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    pub fn stats(&self) -> WireStats {
        self.stats.lock().unwrap().clone()
    }

    /// Blocks on `f` (any number of threads may at once).
    pub fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }

    /// `v2/REPO/PATH` on the registry.
    pub(crate) fn url(&self, path: &str) -> Url {
        self.base.join(&format!("v2/{}/{path}", self.repo)).expect("paths we build are valid")
    }

    /// A `Location` header, absolute or relative to the registry.
    pub(crate) fn location(&self, resp: &Resp, what: &str) -> Result<Url, HttpError> {
        let loc = resp.header("location").ok_or_else(|| self.registry_error(format!("{what}: the answer has no Location header")))?;
        self.base.join(loc).map_err(|e| self.registry_error(format!("{what}: Location {loc:?} is not a URL: {e}")))
    }

    pub(crate) fn registry_error(&self, message: String) -> HttpError {
        HttpError::Registry { registry: self.registry.clone(), message }
    }

    pub(crate) fn unexpected(&self, what: &str, status: StatusCode, body: &[u8]) -> HttpError {
        self.registry_error(format!("{what} answered {}{}", status_text(status), error_body(body)))
    }

    /// Whether `url` is the registry itself (scheme, host and port): only
    /// there do the credentials go.
    fn same_origin(&self, url: &Url) -> bool {
        url.scheme() == self.base.scheme() && url.host_str() == self.base.host_str() && url.port_or_known_default() == self.base.port_or_known_default()
    }

    pub(crate) fn bump(&self, f: impl FnOnce(&mut WireStats)) {
        f(&mut self.stats.lock().unwrap());
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff.saturating_mul(1u32 << attempt.min(16));
        // A little jitter so parallel clients do not retry in step.
        let jitter =
            Duration::from_millis(u64::from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_millis() % 100));
        (base + jitter).min(self.opts.max_backoff)
    }

    /// Sends `req` once, authenticating on a 401 (once) and sorting the
    /// faults worth another try from the refusals. The body of a success,
    /// or of any other status, is left unread for the caller.
    async fn send_raw(&self, req: &Req) -> Result<reqwest::Response, Failure> {
        for round in 0..2 {
            let header = self.auth.lock().unwrap().header.clone();
            let len = req.body.as_ref().map_or(0, |b| b.len() as u64);
            let mut builder = self.http.request(req.method.clone(), req.url.clone()).headers(req.headers.clone());
            if let Some(h) = header.filter(|_| self.same_origin(&req.url)) {
                builder = builder.header(reqwest::header::AUTHORIZATION, h);
            }
            if let Some(body) = &req.body {
                // The whole exchange may take its size at 256 KiB/s longer.
                builder =
                    builder.header(reqwest::header::CONTENT_LENGTH, len).body(body.clone()).timeout(self.opts.timeout + Duration::from_secs(len / (256 << 10)));
            }
            self.bump(|s| {
                s.requests += 1;
                s.bytes_sent += len;
            });
            let what = format!("{} {}", req.method, req.url.path());
            let resp = match builder.send().await {
                Ok(r) => r,
                Err(e) => return Err(Failure::Retry { why: format!("{what}: {}", describe(&e, self.opts.timeout)), wait: None }),
            };
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && round == 0 {
                let challenge = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                self.authenticate(&challenge).await.map_err(Failure::Fatal)?;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
                let body = error_prefix(resp).await;
                let source = match self.auth.lock().unwrap().creds {
                    RegistryAuth::Anonymous => "no credentials were given",
                    _ => "the credentials were refused",
                };
                return Err(Failure::Fatal(HttpError::Auth {
                    registry: self.registry.clone(),
                    message: format!("{what} answered {} ({source}){}", status_text(status), error_body(&body)),
                }));
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
                let wait = retry_after(resp.headers());
                let body = error_prefix(resp).await;
                return Err(Failure::Retry { why: format!("{what} answered {}{}", status_text(status), error_body(&body)), wait });
            }
            return Ok(resp);
        }
        unreachable!("the second round returns")
    }

    /// [`Self::send_raw`], the answer read whole (at most [`MAX_JSON`]).
    pub(crate) async fn send_once(&self, req: &Req) -> Result<Resp, Failure> {
        let resp = self.send_raw(req).await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = if req.method == Method::HEAD {
            Bytes::new()
        } else {
            let what = format!("{} {}", req.method, req.url.path());
            read_capped(resp, &what, &self.registry, self.opts.timeout).await?
        };
        Ok(Resp { status, headers, body })
    }

    /// Sends an idempotent request, retrying as the module documentation says.
    pub(crate) async fn send(&self, req: &Req) -> Result<Resp, HttpError> {
        let mut attempt = 0;
        loop {
            match self.send_once(req).await {
                Ok(resp) => return Ok(resp),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { why, wait }) => self.wait_or_give_up(&mut attempt, &why, wait).await?,
            }
        }
    }

    /// After a failed attempt: waits the backoff or the registry's
    /// `Retry-After`, or (the retries spent, or the wait over the limit)
    /// returns the error to give up with.
    pub(crate) async fn wait_or_give_up(&self, attempt: &mut u32, why: &str, wait: Option<Duration>) -> Result<(), HttpError> {
        let wait = match wait {
            Some(w) if w > self.opts.max_wait => {
                return Err(self.registry_error(format!(
                    "{why}; it asks to wait {} s (Retry-After), over the {} s limit",
                    w.as_secs(),
                    self.opts.max_wait.as_secs()
                )))
            }
            Some(w) => w,
            None => self.backoff(*attempt),
        };
        if *attempt >= self.opts.retries {
            return Err(self.registry_error(format!("{why} (gave up after {} attempts)", *attempt + 1)));
        }
        *attempt += 1;
        self.bump(|s| s.retries += 1);
        eprintln!("osbuilder: {why}; trying again in {:.1} s", wait.as_secs_f64());
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// GETs the manifest (or index) `reference` (a tag or a digest) names,
    /// read as it streams and refused as soon as it is known to be over
    /// [`MAX_JSON`]. The caller checks the digest.
    pub async fn get_manifest(&self, reference: &str, accept: &str) -> Result<Bytes, HttpError> {
        let req = Req::new(Method::GET, self.url(&format!("manifests/{reference}"))).header("accept", accept);
        let sep = if reference.contains(':') { '@' } else { ':' };
        let what = format!("the manifest {}/{}{sep}{reference}", self.registry, self.repo);
        let mut attempt = 0;
        loop {
            let failure = match self.send_raw(&req).await {
                Ok(resp) if resp.status().is_success() => match read_capped(resp, &what, &self.registry, self.opts.timeout).await {
                    Ok(bytes) => return Ok(bytes),
                    Err(f) => f,
                },
                Ok(resp) => {
                    let status = resp.status();
                    return Err(self.unexpected(&format!("GET manifest {reference}"), status, &error_prefix(resp).await));
                }
                Err(f) => f,
            };
            match failure {
                Failure::Fatal(e) => return Err(e),
                Failure::Retry { why, wait } => self.wait_or_give_up(&mut attempt, &why, wait).await?,
            }
        }
    }

    /// Opens blob `digest` from byte `offset` (a `Range` request past 0);
    /// the caller streams the body and retries with
    /// [`Self::wait_or_give_up`].
    pub(crate) async fn open_blob(&self, digest: &Digest, offset: u64) -> Result<BlobBody, Failure> {
        let mut req = Req::new(Method::GET, self.url(&format!("blobs/{digest}")));
        if offset > 0 {
            req = req.header("range", &format!("bytes={offset}-"));
        }
        let resp = self.send_raw(&req).await?;
        let from = match resp.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => offset,
            s if s.is_success() => 0,
            s => return Err(Failure::Fatal(self.unexpected(&format!("GET blob {digest}"), s, &error_prefix(resp).await))),
        };
        Ok(BlobBody { resp, from, timeout: self.opts.timeout })
    }

    /// Streams blob `digest` whole to `sink`, retrying and continuing from
    /// the byte reached; returns the bytes written.
    pub async fn get_blob(&self, digest: &Digest, sink: &mut dyn std::io::Write) -> Result<u64, HttpError> {
        let mut pos = 0;
        let mut attempt = 0;
        loop {
            let (why, wait) = match self.open_blob(digest, pos).await {
                Ok(body) if body.from != pos => {
                    return Err(self.registry_error(format!("GET blob {digest} from byte {pos}: the registry ignored the Range")));
                }
                Ok(mut body) => loop {
                    match body.chunk().await {
                        Ok(Some(c)) => {
                            sink.write_all(&c).map_err(|e| HttpError::Io { context: format!("cannot keep blob {digest}"), source: e })?;
                            pos += c.len() as u64;
                        }
                        Ok(None) => return Ok(pos),
                        Err(why) => break (format!("GET blob {digest}: {why}"), None),
                    }
                },
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry { why, wait }) => (why, wait),
            };
            self.wait_or_give_up(&mut attempt, &why, wait).await?;
        }
    }

    /// Answers a 401's challenge: basic credentials, or a bearer token from
    /// the realm.
    async fn authenticate(&self, challenge: &str) -> Result<(), HttpError> {
        let parsed = http_auth::parse_challenges(challenge).unwrap_or_default();
        let scheme = if let Some(c) = parsed.iter().find(|c| c.scheme.eq_ignore_ascii_case("bearer")) {
            let param = |k: &str| c.params.iter().find(|(name, _)| name.eq_ignore_ascii_case(k)).map(|(_, v)| v.to_unescaped());
            let realm = param("realm")
                .ok_or_else(|| HttpError::Auth { registry: self.registry.clone(), message: format!("a bearer challenge without a realm: {challenge:?}") })?;
            Scheme::Bearer { realm, service: param("service") }
        } else if parsed.iter().any(|c| c.scheme.eq_ignore_ascii_case("basic")) {
            Scheme::Basic
        } else {
            return Err(HttpError::Auth { registry: self.registry.clone(), message: format!("401 with a challenge we cannot answer: {challenge:?}") });
        };
        let (creds, scopes) = {
            let auth = self.auth.lock().unwrap();
            (auth.creds.clone(), auth.pull_scopes.clone())
        };
        let header = match (&scheme, &creds) {
            (Scheme::Basic, RegistryAuth::Basic(user, pass)) => basic(user, pass)?,
            (Scheme::Basic, _) => {
                return Err(HttpError::Auth {
                    registry: self.registry.clone(),
                    message: "it asks for a user and password, and no credentials were given (--creds, OSBUILDER_REGISTRY_USER/PASSWORD or an auth file)"
                        .into(),
                })
            }
            (Scheme::Bearer { .. }, RegistryAuth::Bearer(_)) => {
                return Err(HttpError::Auth { registry: self.registry.clone(), message: "the bearer token given was refused".into() })
            }
            (Scheme::Bearer { realm, service }, _) => bearer(&self.fetch_token(realm, service.as_deref(), &creds, &scopes).await?)?,
        };
        let mut auth = self.auth.lock().unwrap();
        auth.scheme = Some(scheme);
        auth.header = Some(header);
        Ok(())
    }

    async fn fetch_token(&self, realm: &str, service: Option<&str>, creds: &RegistryAuth, extra: &BTreeSet<String>) -> Result<String, HttpError> {
        let auth_err = |message: String| HttpError::Auth { registry: self.registry.clone(), message };
        let mut url = Url::parse(realm).map_err(|e| auth_err(format!("token realm {realm:?} is not a URL: {e}")))?;
        let realm_host = format!("{}:{}", url.host_str().unwrap_or_default(), url.port_or_known_default().unwrap_or(0));
        if url.scheme() != "https" && !(self.opts.insecure || is_loopback(&realm_host)) {
            return Err(auth_err(format!("the token realm {realm} is plain HTTP; credentials go there only with --insecure")));
        }
        let actions = match self.access {
            Access::Pull => "pull",
            Access::Push => "pull,push",
        };
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            q.append_pair("scope", &format!("repository:{}:{actions}", self.repo));
            for repo in extra {
                q.append_pair("scope", &format!("repository:{repo}:pull"));
            }
        }
        let mut headers = HeaderMap::new();
        if let RegistryAuth::Basic(user, pass) = creds {
            headers.insert(reqwest::header::AUTHORIZATION, basic(user, pass)?);
        }
        let mut attempt = 0;
        let resp = loop {
            let builder = self.http.request(Method::GET, url.clone()).headers(headers.clone()).timeout(self.opts.timeout);
            match builder.send().await {
                Ok(r) if r.status().is_server_error() || r.status() == StatusCode::TOO_MANY_REQUESTS => {
                    let wait = retry_after(r.headers());
                    self.wait_or_give_up(&mut attempt, &format!("token server {realm} answered {}", status_text(r.status())), wait).await?;
                }
                Ok(r) => break r,
                Err(e) => self.wait_or_give_up(&mut attempt, &format!("token server {realm}: {}", describe(&e, self.opts.timeout)), None).await?,
            }
        };
        let status = resp.status();
        let body = match read_capped(resp, &format!("the answer of the token server {realm}"), &self.registry, self.opts.timeout).await {
            Ok(b) => b,
            Err(Failure::Fatal(e)) => return Err(e),
            Err(Failure::Retry { why, .. }) => return Err(auth_err(why)),
        };
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

    /// Asks for pull access to `repo` too (a mount reads from it), fetching
    /// a new bearer token when the scope is new.
    pub(crate) async fn add_pull_scope(&self, repo: &str) -> Result<(), HttpError> {
        {
            let mut auth = self.auth.lock().unwrap();
            if !auth.pull_scopes.insert(repo.to_string()) {
                return Ok(());
            }
        }
        self.renew_token().await
    }

    /// Forgets `repo`'s pull scope and, with a bearer token, fetches one
    /// without it.
    pub(crate) async fn drop_pull_scope(&self, repo: &str) -> Result<(), HttpError> {
        self.auth.lock().unwrap().pull_scopes.remove(repo);
        self.renew_token().await
    }

    /// A new token for the scopes now wanted, when the registry asked for a
    /// bearer token and we fetch our own.
    async fn renew_token(&self) -> Result<(), HttpError> {
        let (scheme, creds, scopes) = {
            let auth = self.auth.lock().unwrap();
            (auth.scheme.clone(), auth.creds.clone(), auth.pull_scopes.clone())
        };
        if let (Some(Scheme::Bearer { realm, service }), false) = (scheme, matches!(creds, RegistryAuth::Bearer(_))) {
            let token = self.fetch_token(&realm, service.as_deref(), &creds, &scopes).await?;
            self.auth.lock().unwrap().header = Some(bearer(&token)?);
        }
        Ok(())
    }
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

/// Reads an answer whole, refusing it as soon as its `Content-Length` or
/// the bytes so far pass [`MAX_JSON`]: nothing past the limit is buffered.
async fn read_capped(mut resp: reqwest::Response, what: &str, registry: &str, timeout: Duration) -> Result<Bytes, Failure> {
    let too_large = |how: String| {
        Failure::Fatal(HttpError::Registry {
            registry: registry.to_string(),
            message: format!("{what} is over the {} MiB ({MAX_JSON}-byte) limit for JSON documents ({how})", MAX_JSON >> 20),
        })
    };
    if let Some(len) = resp.content_length().filter(|&n| n > MAX_JSON) {
        return Err(too_large(format!("Content-Length: {len}")));
    }
    let mut body = BytesMut::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) if body.len() as u64 + chunk.len() as u64 > MAX_JSON => {
                return Err(too_large(format!("more than {MAX_JSON} bytes sent")));
            }
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(Failure::Retry { why: format!("{what}: reading the answer: {}", describe(&e, timeout)), wait: None }),
        }
    }
}

/// The start of an error answer's body, for a message (read errors and
/// the rest of the body are left: the message does not need them).
async fn error_prefix(mut resp: reqwest::Response) -> Bytes {
    let mut body = BytesMut::new();
    while body.len() < 4096 {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(4096 - body.len())]),
            _ => break,
        }
    }
    body.freeze()
}

/// What reqwest says went wrong, with its sources (the useful part is
/// usually two levels down: "connection reset by peer"), and plainly so
/// when it was our timeout.
pub(crate) fn describe(e: &reqwest::Error, timeout: Duration) -> String {
    if is_timeout(e) {
        return format!("timed out: no answer or no data for {} s (--timeout)", timeout.as_secs());
    }
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

fn basic(user: &str, pass: &str) -> Result<HeaderValue, HttpError> {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let mut v = HeaderValue::from_str(&format!("Basic {token}")).map_err(|_| HttpError::Usage("the credentials cannot be sent in a header".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

fn bearer(token: &str) -> Result<HeaderValue, HttpError> {
    let mut v =
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| HttpError::Usage("the bearer token has characters a header cannot carry".into()))?;
    v.set_sensitive(true);
    Ok(v)
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

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
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
