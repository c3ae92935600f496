//! Integration-test harness: a real registry, cached fixture images and
//! independent oracles (umoci, GNU cpio, skopeo) to check osbuilder against.
//!
//! Integration tests include it with `mod common;`. It uses std, `tempfile`,
//! `serde_json`, `sha2`, `hex` and `libc` (`bombs` also `tar`, `flate2` and
//! `zstd`), and shells out to the Debian tools that
//! `ci/setup.sh` installs: docker-registry, skopeo, umoci, debootstrap,
//! htpasswd (apache2-utils), cpio, gzip, zstd, flock (util-linux), setcap and
//! getcap (libcap2-bin), busybox-static and GNU tar. Most of it needs root
//! (umoci unpack, mknod, chown, cpio extraction with owners).
//!
//! Fixture images are built by the shell scripts in `tests/fixtures/` and cached
//! outside the repository under `$XDG_CACHE_HOME/osbuilder-tests/` (default
//! `~/.cache/osbuilder-tests/`), one directory per fixture named
//! `NAME-KEY`, where KEY hashes the script, `lib.sh` and the keys of the
//! fixtures it is made from. A build runs under a `flock` on `NAME-KEY.lock`
//! into a temporary sibling directory that is renamed into place only when
//! complete, so parallel tests and parallel `cargo test` runs never see a half
//! built fixture. Cached fixtures are shared: tests must treat them as
//! read-only and copy them before changing anything.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::ops::Deref;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// Running external tools
// ---------------------------------------------------------------------------

/// PATH for every tool the harness runs: CI's environment may lack the sbin
/// directories where debootstrap, setcap and getcap live.
fn tool_path() -> String {
    let inherited = std::env::var("PATH").unwrap_or_default();
    format!("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:{inherited}")
}

/// A `Command` for an external tool with the harness's PATH and the C locale,
/// so that parsed output (cpio listings) does not depend on the caller's locale.
pub fn tool(program: &str) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", tool_path()).env("LC_ALL", "C");
    c
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command to completion, capturing its output, and panics with the
/// command line, exit status, stdout and stderr if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)));
    if !out.status.success() {
        panic!(
            "`{}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Runs a command like [`run`] and returns its stdout as text.
pub fn run_stdout(cmd: &mut Command) -> String {
    String::from_utf8_lossy(&run(cmd).stdout).into_owned()
}

/// Hex sha256 of a byte string.
/// Our binary, as the tests drive it.
/// Runs `cmd` (stdout discarded, stderr captured) and returns its exit
/// status, its stderr and its peak RSS in MiB, measured by `wait4`: the
/// memory bound tests hold a child to. The peak can include pages of the test
/// process at the fork (an over-estimate): callers drop large buffers before.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which clippy cannot see
pub fn run_measured(cmd: &mut Command) -> (std::process::ExitStatus, String, u64) {
    use std::os::unix::process::ExitStatusExt;
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    (std::process::ExitStatus::from_raw(status), reader.join().unwrap(), usage.ru_maxrss as u64 / 1024)
}

pub fn osbuilder() -> Command {
    tool(env!("CARGO_BIN_EXE_osbuilder"))
}

/// Runs osbuilder with its own blob cache and no SOURCE_DATE_EPOCH from
/// the environment, returning the output whatever the exit status.
pub fn run_osbuilder(args: &[&str], cache: &Path) -> Output {
    let mut cmd = osbuilder();
    cmd.args(args).arg("--cache-dir").arg(cache).env_remove("SOURCE_DATE_EPOCH").stdin(Stdio::null());
    cmd.output().expect("run osbuilder")
}

/// Runs osbuilder and asserts it succeeded.
pub fn build_ok(args: &[&str], cache: &Path) -> Output {
    let out = run_osbuilder(args, cache);
    assert!(out.status.success(), "osbuilder {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs osbuilder, asserts it failed, and returns its stderr.
pub fn build_err(args: &[&str], cache: &Path) -> String {
    let out = run_osbuilder(args, cache);
    assert!(!out.status.success(), "osbuilder {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of a file's content, streamed.
pub fn sha256_file(path: &Path) -> String {
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A path inside a temporary directory that is removed when this value is
/// dropped. It dereferences to `Path`, so `scratch.join("etc")`,
/// `&*scratch` and `scratch.as_ref()` work where a path is expected.
pub struct Scratch {
    dir: TempDir,
    path: PathBuf,
}

impl Scratch {
    fn new(dir: TempDir, path: PathBuf) -> Self {
        Scratch { dir, path }
    }

    /// The path this scratch stands for (for example an unpacked rootfs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temporary directory holding the path, removed on drop.
    pub fn temp_root(&self) -> &Path {
        self.dir.path()
    }

    /// Keeps the directory on disk (for debugging a failing test) and
    /// returns the path.
    pub fn keep(self) -> PathBuf {
        let Scratch { dir, path } = self;
        let _ = dir.keep();
        path
    }
}

impl Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

impl fmt::Debug for Scratch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scratch({})", self.path.display())
    }
}

fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir().expect("create temporary directory")
}

// ---------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------

/// A real CNCF distribution registry (`docker-registry serve`) on a free
/// 127.0.0.1 port, storing blobs in a temporary directory. Plain HTTP; with
/// `start_with_htpasswd` it demands HTTP basic auth checked against a bcrypt
/// htpasswd file. The server is killed by pid when this value is dropped,
/// which includes unwinding from a failed assertion.
pub struct Registry {
    child: Child,
    addr: String,
    creds: Option<(String, String)>,
    dir: TempDir,
}

impl Registry {
    /// Starts an anonymous registry and waits until `GET /v2/` answers 200.
    pub fn start() -> Registry {
        Registry::spawn(None, false)
    }

    /// Starts a registry that accepts only `user`/`pass` (bcrypt via
    /// `htpasswd -Bbn`) and waits until `GET /v2/` answers 401.
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Registry {
        Registry::spawn(Some((user.to_string(), pass.to_string())), false)
    }

    /// Starts a registry using bearer-token auth: a token server (in this
    /// process, on another loopback port) checks `user`/`pass` by HTTP basic
    /// and hands out RS256 JWTs that the registry verifies against a
    /// self-signed certificate, the flow Docker Hub and most registries use.
    pub fn start_with_token_auth(user: &str, pass: &str) -> Registry {
        Registry::spawn(Some((user.to_string(), pass.to_string())), true)
    }

    fn spawn(creds: Option<(String, String)>, token: bool) -> Registry {
        let dir = tempdir("osbuilder-registry-");
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).unwrap();
        let mut auth = String::new();
        if let (Some((user, pass)), true) = (&creds, token) {
            let server = TokenServer::start(dir.path(), user, pass);
            auth = format!(
                "auth:\n  token:\n    realm: http://{}/token\n    service: osbuilder-test\n    issuer: osbuilder-test-issuer\n    rootcertbundle: \"{}\"\n",
                server.addr,
                server.cert.display()
            );
        } else if let Some((user, pass)) = &creds {
            let line = run_stdout(tool("htpasswd").args(["-Bbn", user, pass]));
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, line.trim_end().to_string() + "\n").unwrap();
            auth = format!("auth:\n  htpasswd:\n    realm: osbuilder-test\n    path: \"{}\"\n", htpasswd.display());
        }
        let config = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        let expected = if creds.is_some() { 401 } else { 200 };

        // The port is found by binding port 0 and releasing it, so another
        // process can take it before the registry binds it: retry on a new
        // port when the registry exits reporting the address in use.
        let mut last_log = String::new();
        for _attempt in 0..10 {
            let port = free_port();
            let addr = format!("127.0.0.1:{port}");
            fs::write(
                &config,
                format!(
                    "version: 0.1\n\
                     log:\n  level: warn\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: \"{}\"\n  delete:\n    enabled: true\n\
                     http:\n  addr: {addr}\n  secret: osbuilder-test-secret\n\
                     {auth}",
                    storage.display()
                ),
            )
            .unwrap();
            let log = fs::File::create(&log_path).unwrap();
            let mut child = tool("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("spawn docker-registry (is the docker-registry package installed?)");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    last_log = fs::read_to_string(&log_path).unwrap_or_default();
                    if last_log.contains("address already in use") {
                        break;
                    }
                    panic!("docker-registry exited at start ({status}):\n{last_log}");
                }
                if let Some(code) = http_status(&addr, "/v2/", None) {
                    if code == expected {
                        return Registry { child, addr, creds, dir };
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("registry at {addr} answered GET /v2/ with {code}, expected {expected}:\n{}", fs::read_to_string(&log_path).unwrap_or_default());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("registry at {addr} did not answer within 30 s:\n{}", fs::read_to_string(&log_path).unwrap_or_default());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start docker-registry on a free port:\n{last_log}");
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The user and password of an htpasswd registry, `None` if anonymous.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    /// "ADDR/REPO:TAG" (a reference as osbuilder's CLI takes it).
    pub fn image_ref(&self, repo_tag: &str) -> String {
        format!("{}/{}", self.addr, repo_tag)
    }

    /// "docker://ADDR/REPO:TAG" (a skopeo reference).
    pub fn docker_ref(&self, repo_tag: &str) -> String {
        format!("docker://{}/{}", self.addr, repo_tag)
    }

    /// The registry server's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The registry's directory for blobs and manifests.
    pub fn storage_dir(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// What the server logged so far (warnings and errors only).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Status code of a GET on `path`, with optional basic auth; panics when
    /// the server does not answer.
    pub fn get_status(&self, path: &str, basic: Option<(&str, &str)>) -> u16 {
        http_status(&self.addr, path, basic).unwrap_or_else(|| panic!("registry {} did not answer GET {path}", self.addr))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to the registry's own pid; it was spawned
        // directly, not through a shell, so that pid is the server.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// One HTTP/1.0 GET to `addr`; returns the status code, or `None` when
/// nothing answers (connection refused, timeout, garbage).
pub fn http_status(addr: &str, path: &str, basic: Option<(&str, &str)>) -> Option<u16> {
    let sock: SocketAddr = addr.parse().ok()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some((u, p)) = basic {
        req.push_str(&format!("Authorization: Basic {}\r\n", base64(format!("{u}:{p}").as_bytes())));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    // "HTTP/1.1 200 OK"
    line.split_whitespace().nth(1)?.parse().ok()
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------

/// Copies `src` (any skopeo reference: "oci:DIR:TAG", "docker-archive:FILE",
/// see [`oci_ref`]) to `registry` as REPO:TAG, with the registry's own
/// credentials if it has any. `extra_args` go to `skopeo copy`, e.g.
/// `&["--format", "v2s2"]` for a Docker v2 schema 2 manifest or `&["--all"]`
/// for an index. Panics if skopeo fails.
pub fn push(src: &str, registry: &Registry, repo_tag: &str, extra_args: &[&str]) {
    if let Err(e) = try_push(src, registry, repo_tag, extra_args, registry.creds()) {
        panic!("{e}\n--- registry log\n{}", registry.log());
    }
}

/// Like [`push`] but with explicit credentials (`None`: anonymous, with
/// `--dest-no-creds`, so no auth file on the machine interferes) and
/// returning skopeo's stderr on failure instead of panicking.
pub fn try_push(src: &str, registry: &Registry, repo_tag: &str, extra_args: &[&str], creds: Option<(&str, &str)>) -> Result<(), String> {
    let mut cmd = tool("skopeo");
    cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
    match creds {
        Some((u, p)) => cmd.arg("--dest-creds").arg(format!("{u}:{p}")),
        None => cmd.arg("--dest-no-creds"),
    };
    cmd.args(extra_args).arg(src).arg(registry.docker_ref(repo_tag));
    let out = cmd.stdin(Stdio::null()).output().expect("run skopeo");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed ({}): {}", describe(&cmd), out.status, String::from_utf8_lossy(&out.stderr)))
    }
}

/// `skopeo inspect` of REPO:TAG on `registry` (with its credentials), parsed.
/// `extra_args` go to skopeo, e.g. `&["--raw"]` for the manifest as stored,
/// `&["--config"]` for the image config, `&["--override-arch", "arm64"]`.
pub fn skopeo_inspect(registry: &Registry, repo_tag: &str, extra_args: &[&str]) -> Value {
    try_skopeo_inspect(registry, repo_tag, extra_args, registry.creds()).unwrap_or_else(|e| panic!("{e}\n--- registry log\n{}", registry.log()))
}

/// Like [`skopeo_inspect`] with explicit credentials (`None`: anonymous),
/// returning the error text instead of panicking.
pub fn try_skopeo_inspect(registry: &Registry, repo_tag: &str, extra_args: &[&str], creds: Option<(&str, &str)>) -> Result<Value, String> {
    let mut cmd = tool("skopeo");
    cmd.arg("inspect").arg("--tls-verify=false");
    match creds {
        Some((u, p)) => cmd.arg("--creds").arg(format!("{u}:{p}")),
        None => cmd.arg("--no-creds"),
    };
    cmd.args(extra_args).arg(registry.docker_ref(repo_tag));
    let out = cmd.stdin(Stdio::null()).output().expect("run skopeo");
    if !out.status.success() {
        return Err(format!("`{}` failed ({}): {}", describe(&cmd), out.status, String::from_utf8_lossy(&out.stderr)));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("skopeo inspect printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// "oci:LAYOUT:TAG", the skopeo reference to a tag in an OCI layout.
pub fn oci_ref(layout: &Path, tag: &str) -> String {
    format!("oci:{}:{tag}", layout.display())
}

// ---------------------------------------------------------------------------
// OCI layout reading
// ---------------------------------------------------------------------------

/// One layer for [`write_layout`]: its blob as stored (compressed or not),
/// the blob's media type and the diff_id of its uncompressed tar.
pub struct LayoutLayer<'a> {
    pub blob: &'a [u8],
    pub media_type: &'a str,
    pub diff_id: String,
}

/// Writes an OCI layout in `dir` whose image, tagged `tag`, has `layers`
/// (amd64/linux, an empty config), and returns `dir`.
pub fn write_layout(dir: &Path, tag: &str, layers: &[LayoutLayer]) -> PathBuf {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let hex = sha256_hex(bytes);
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), bytes.len())
    };
    let descs: Vec<Value> = layers
        .iter()
        .map(|l| {
            let (digest, size) = put(l.blob);
            json!({"mediaType": l.media_type, "digest": digest, "size": size})
        })
        .collect();
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let config = json!({"architecture": "amd64", "os": "linux", "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids}});
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = json!({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config_size}, "layers": descs});
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = json!({"schemaVersion": 2, "manifests": [{"mediaType": MT_OCI_MANIFEST, "digest": manifest_digest,
        "size": manifest_size, "annotations": {"org.opencontainers.image.ref.name": tag}}]});
    fs::write(dir.join("index.json"), index.to_string()).unwrap();
    fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    dir.to_path_buf()
}

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// Path of a blob ("sha256:HEX") in an OCI layout.
pub fn layout_blob_path(layout: &Path, digest: &str) -> PathBuf {
    let (alg, hex) = digest.split_once(':').unwrap_or_else(|| panic!("bad digest {digest}"));
    layout.join("blobs").join(alg).join(hex)
}

/// A blob's bytes; panics if its sha256 does not match its digest.
pub fn layout_blob(layout: &Path, digest: &str) -> Vec<u8> {
    let path = layout_blob_path(layout, digest);
    let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(format!("sha256:{}", sha256_hex(&bytes)), digest, "blob {} is corrupt", path.display());
    bytes
}

/// A JSON blob, parsed.
pub fn layout_json(layout: &Path, digest: &str) -> Value {
    serde_json::from_slice(&layout_blob(layout, digest)).expect("blob is JSON")
}

/// The layout's index.json, parsed.
pub fn layout_index(layout: &Path) -> Value {
    let p = layout.join("index.json");
    serde_json::from_slice(&fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))).expect("index.json is JSON")
}

/// The descriptor in index.json whose `org.opencontainers.image.ref.name`
/// annotation is `tag`.
pub fn layout_descriptor(layout: &Path, tag: &str) -> Value {
    let index = layout_index(layout);
    index["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .cloned()
        .unwrap_or_else(|| panic!("no tag {tag} in {}/index.json: {index}", layout.display()))
}

/// The manifest (or image index, for an index tag) that `tag` names.
pub fn layout_manifest(layout: &Path, tag: &str) -> Value {
    let d = layout_descriptor(layout, tag);
    layout_json(layout, d["digest"].as_str().expect("descriptor digest"))
}

/// The image config of a single-image `tag`.
pub fn layout_config(layout: &Path, tag: &str) -> Value {
    let m = layout_manifest(layout, tag);
    layout_json(layout, m["config"]["digest"].as_str().expect("manifest has a config"))
}

// ---------------------------------------------------------------------------
// Fixture cache
// ---------------------------------------------------------------------------

/// Bump to rebuild every fixture (changes every cache key).
const CACHE_FORMAT: &str = "osbuilder-tests fixture cache v1";

/// Root of the fixture cache: `$XDG_CACHE_HOME/osbuilder-tests`, else
/// `$HOME/.cache/osbuilder-tests`.
pub fn cache_root() -> PathBuf {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h).join(".cache"),
            _ => std::env::temp_dir().join("osbuilder-cache"),
        },
    };
    base.join("osbuilder-tests")
}

/// Directory of the fixture scripts (tests/fixtures in this crate).
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

/// A built, cached fixture: its directory and the cache key derived fixtures
/// fold into theirs.
#[derive(Clone, Debug)]
struct Built {
    key: String,
    dir: PathBuf,
}

/// An exclusive lock on a file, held by a `flock` child process for as long
/// as this value lives. std has no stable flock at the crate's MSRV, and
/// holding the lock in a child keeps this free of libc: `flock FILE sh -c
/// 'echo locked; exec cat'` prints once it holds the lock and keeps it until
/// its stdin closes, which happens on drop and also if this process dies.
struct FileLock {
    child: Child,
}

impl FileLock {
    fn acquire(path: &Path) -> FileLock {
        let mut child = tool("flock")
            .arg("--exclusive")
            .arg(path)
            .args(["sh", "-c", "echo locked; exec cat >/dev/null"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn flock (util-linux)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read from flock");
        if line.trim() != "locked" {
            let status = child.wait();
            panic!("flock {} failed: {status:?}", path.display());
        }
        FileLock { child }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A Rust step run on a fixture's output directory after its script, named by
/// a version string that enters the cache key.
type PostStep<'a> = (&'a str, fn(&Path));

/// Builds (once) the fixture made by `script` from `inputs` (each the key and
/// the path argument of a fixture it derives from), optionally followed by a
/// Rust step `post` (named by a version string that enters the key), and
/// returns the cached directory.
fn cached_fixture(name: &str, script: &str, inputs: &[(&str, &Path)], post: Option<PostStep<'_>>) -> Built {
    let fixtures = fixtures_dir();
    let script_path = fixtures.join(script);
    let read = |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    let lib = read(&fixtures.join("lib.sh"));
    let body = read(&script_path);
    let mut h = Sha256::new();
    for part in [CACHE_FORMAT.as_bytes(), name.as_bytes(), lib.as_slice(), body.as_slice()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for (key, _) in inputs {
        h.update(key.as_bytes());
    }
    if let Some((version, _)) = post {
        h.update(version.as_bytes());
    }
    let key = hex::encode(h.finalize())[..16].to_string();

    let root = cache_root();
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
    let final_dir = root.join(format!("{name}-{key}"));
    if final_dir.is_dir() {
        return Built { key, dir: final_dir };
    }
    let _lock = FileLock::acquire(&root.join(format!("{name}-{key}.lock")));
    if final_dir.is_dir() {
        return Built { key, dir: final_dir };
    }
    // Holding the lock, any partial build of this key is from a process that
    // died: remove it.
    let partial_prefix = format!(".{name}-{key}.partial-");
    for e in fs::read_dir(&root).unwrap().flatten() {
        if e.file_name().to_string_lossy().starts_with(&partial_prefix) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let tmp = tempfile::Builder::new().prefix(&partial_prefix).tempdir_in(&root).expect("create partial fixture dir");
    let log_path = root.join(format!("{name}-{key}.log"));
    let log = fs::File::create(&log_path).unwrap();
    let started = Instant::now();
    eprintln!("[fixtures] building {name} ({script}) into {}", final_dir.display());
    let status = tool("bash")
        .arg(&script_path)
        .arg(tmp.path())
        .args(inputs.iter().map(|(_, p)| *p))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .expect("run bash");
    if !status.success() {
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("fixture script {} failed ({status}); log {}:\n{}", script_path.display(), log_path.display(), tail.join("\n"));
    }
    if let Some((_, f)) = post {
        f(tmp.path());
    }
    let secs = started.elapsed().as_secs_f64();
    fs::write(tmp.path().join("build-seconds"), format!("{secs:.1}\n")).unwrap();
    let tmp_path = tmp.keep();
    fs::rename(&tmp_path, &final_dir).unwrap_or_else(|e| {
        let _ = fs::remove_dir_all(&tmp_path);
        panic!("rename {} -> {}: {e}", tmp_path.display(), final_dir.display())
    });
    eprintln!("[fixtures] built {name} in {secs:.1} s");
    prune_stale(&root, name, &key);
    Built { key, dir: final_dir }
}

/// Removes builds of fixture `name` under other keys (older recipes) that
/// were made more than a week ago, so the cache does not grow with every
/// script edit while a checkout still on an older recipe keeps its fixture
/// for a while. Lock files stay: removing one could let two builders in.
fn prune_stale(root: &Path, name: &str, key: &str) {
    let prefix = format!("{name}-");
    let week = Duration::from_secs(7 * 24 * 3600);
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        let file_name = e.file_name().to_string_lossy().into_owned();
        let Some(other) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        if other.len() != 16 || other == key || !other.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let old = e.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok()).is_some_and(|age| age > week);
        if old && e.path().is_dir() {
            eprintln!("[fixtures] removing stale {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
            let _ = fs::remove_file(root.join(format!("{file_name}.log")));
        }
    }
}

/// Seconds the fixture in `dir` (a path returned by a fixture function, or
/// its parent) took to build, as recorded when it was built.
pub fn fixture_build_seconds(path: &Path) -> Option<f64> {
    let dir = if path.is_dir() && path.join("build-seconds").exists() { path } else { path.parent()? };
    fs::read_to_string(dir.join("build-seconds")).ok()?.trim().parse().ok()
}

fn memo(cell: &'static OnceLock<Built>, build: impl FnOnce() -> Built) -> Built {
    if let Some(b) = cell.get() {
        return b.clone();
    }
    let b = build();
    cell.get_or_init(|| b).clone()
}

/// The Debian base image: the same recipe (rootfs-templates/debian) that
/// `cargo xtask build-image` uses. `cargo xtask test` builds it first and
/// passes its directory in `OSBUILDER_BASE_IMAGE`; a bare `cargo test`
/// builds it here from the same recipe.
fn debian_base_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || {
        if let Some(dir) = std::env::var_os("OSBUILDER_BASE_IMAGE").map(PathBuf::from) {
            if dir.join("layout/index.json").is_file() && dir.join("rootfs.tar").is_file() {
                let key = sha256_hex(dir.as_os_str().as_encoded_bytes())[..16].to_string();
                return Built { key, dir };
            }
        }
        let recipe = fixtures_dir().join("../../../rootfs-templates/debian/make-oci-layout.sh");
        let recipe_key = sha256_file(&recipe);
        let built = cached_fixture("debian-base", "make-debian-base.sh", &[(&recipe_key, &recipe)], None);
        Built { key: built.key, dir: built.dir.join("base") }
    })
}

fn debian_rootfs_fixture() -> Built {
    debian_base_fixture()
}

fn debian_layout_fixture() -> Built {
    debian_base_fixture()
}

fn layered_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || cached_fixture("layered", "make-layered-layout.sh", &[], None))
}

fn zstd_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || {
        let base = layered_fixture();
        let layout = base.dir.join("oci");
        cached_fixture("layered-zstd", "make-zstd-layout.sh", &[(&base.key, &layout)], None)
    })
}

fn docker_archive_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || {
        let base = layered_fixture();
        let layout = base.dir.join("oci");
        cached_fixture("docker-archive", "make-docker-archive.sh", &[(&base.key, &layout)], None)
    })
}

fn multiarch_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || cached_fixture("multiarch", "make-multiarch-layout.sh", &[], Some(("assemble_multiarch_index v1", assemble_multiarch_index))))
}

/// The debootstrap (`--variant=minbase`, bookworm) root filesystem as an
/// uncompressed tarball with numeric owners and xattrs (about 130 MB; the
/// .debs and apt lists debootstrap leaves are removed).
pub fn debian_rootfs_tar() -> PathBuf {
    debian_rootfs_fixture().dir.join("rootfs.tar")
}

/// OCI layout (umoci) holding the debootstrap rootfs as one gzip layer, tag
/// [`DEBIAN_TAG`]. Config: Cmd ["/bin/bash"], Env PATH and LANG=C.UTF-8,
/// WorkingDir /root, User "root", label org.opencontainers.image.title.
pub fn debian_layout() -> PathBuf {
    debian_layout_fixture().dir.join("layout")
}
pub const DEBIAN_TAG: &str = "bookworm";

/// OCI layout (umoci, gzip layers) of a small busybox image, tags `v1`
/// (one layer), `v2` (a second layer with whiteouts and special files) and
/// `v3-opaque` (a third, handmade layer with an opaque whiteout). The layout
/// of each is described in tests/fixtures/make-layered-layout.sh; the
/// `LAYERED_*` constants name the paths involved.
pub fn layered_layout() -> PathBuf {
    layered_fixture().dir.join("oci")
}

/// Files and directories present in layered `v1` and deleted in `v2`.
pub const LAYERED_DELETED: &[&str] =
    &["etc/remove-me", "usr/share/doc/pkg", "usr/share/doc/pkg/README", "usr/share/doc/pkg/COPYING", "opt/replace/old1", "opt/replace/old2"];
/// Entries of the opaque directory in layered `v2` that `v3-opaque` hides.
pub const LAYERED_OPAQUE_HIDDEN: &[&str] = &["var/lib/opaque/old-a", "var/lib/opaque/sub", "var/lib/opaque/sub/old-b"];

fn awkward_fixture() -> Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    memo(&CELL, || cached_fixture("awkward", "make-awkward-layout.sh", &[], None))
}

/// OCI layout (umoci, one gzip layer), tag [`AWKWARD_TAG`], holding every
/// file-system feature a disk writer can get wrong: special permission bits,
/// hard links across directories, owners beyond 16 bits, a fifo, devices with
/// large numbers, a file capability and a `user.*` xattr, odd names and both
/// kinds of symlink. The paths are listed in
/// tests/fixtures/make-awkward-layout.sh.
pub fn awkward_layout() -> PathBuf {
    awkward_fixture().dir.join("oci")
}
pub const AWKWARD_TAG: &str = "v1";

/// The layered image's three tags copied by skopeo with layers recompressed
/// as zstd (media type [`MT_OCI_LAYER_ZSTD`]); the configs, and so the
/// diff_ids, are those of [`layered_layout`].
pub fn zstd_layout() -> PathBuf {
    zstd_fixture().dir.join("oci")
}

/// The layered image's `v2` as a docker-archive file (`docker save` format,
/// uncompressed layers), tagged `layered:v2`, which skopeo records in
/// manifest.json as RepoTags ["docker.io/library/layered:v2"]. skopeo reference:
/// `format!("docker-archive:{}", path.display())`.
pub fn docker_archive() -> PathBuf {
    docker_archive_fixture().dir.join("layered.tar")
}

/// OCI layout whose index.json has one entry, tag [`MULTIARCH_TAG`], an image
/// index over two images: linux/amd64 and linux/arm64 (variant v8). Each image
/// is busybox plus /etc/arch holding "amd64" or "arm64", with config
/// `architecture` and env ARCH_MARKER set to match.
pub fn multiarch_layout() -> PathBuf {
    multiarch_fixture().dir.join("oci")
}
pub const MULTIARCH_TAG: &str = "multi";

/// Pushes the multi-arch index and both images to `registry` as REPO:TAG
/// (`skopeo copy --all`).
pub fn push_multiarch(registry: &Registry, repo_tag: &str) {
    push(&oci_ref(&multiarch_layout(), MULTIARCH_TAG), registry, repo_tag, &["--all"]);
}

/// Rust step of the multiarch fixture: replaces the per-arch tags that the
/// script made with one image index over both, tagged `multi`.
fn assemble_multiarch_index(out: &Path) {
    let layout = out.join("oci");
    let mut manifests = Vec::new();
    for (tag, platform) in
        [("amd64", json!({"architecture": "amd64", "os": "linux"})), ("arm64", json!({"architecture": "arm64", "os": "linux", "variant": "v8"}))]
    {
        let d = layout_descriptor(&layout, tag);
        manifests.push(json!({
            "mediaType": d["mediaType"],
            "digest": d["digest"],
            "size": d["size"],
            "platform": platform,
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MT_OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = serde_json::to_vec(&index).unwrap();
    let digest = format!("sha256:{}", sha256_hex(&bytes));
    fs::write(layout_blob_path(&layout, &digest), &bytes).unwrap();
    let top = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": MT_OCI_INDEX,
            "digest": digest,
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": MULTIARCH_TAG},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------
// Oracles: umoci unpack, GNU cpio
// ---------------------------------------------------------------------------

/// `umoci unpack --image LAYOUT:TAG BUNDLE` into a temporary directory (as
/// root, so owners, modes, device nodes and xattrs are applied); returns
/// BUNDLE/rootfs.
pub fn umoci_unpack(layout: &Path, tag: &str) -> Scratch {
    let dir = tempdir("osbuilder-umoci-");
    let bundle = dir.path().join("bundle");
    run(tool("umoci").arg("unpack").arg("--image").arg(format!("{}:{tag}", layout.display())).arg(&bundle));
    let rootfs = bundle.join("rootfs");
    Scratch::new(dir, rootfs)
}

/// Compression of an initrd, told by its magic bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
    None,
}

/// Reads the magic: gzip `1f 8b`, zstd `28 b5 2f fd`, otherwise a cpio
/// magic ("070701", "070702", "070707") for an uncompressed archive; panics
/// on anything else.
pub fn detect_compression(path: &Path) -> Compression {
    let mut magic = [0u8; 6];
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let n = f.read(&mut magic).unwrap();
    let magic = &magic[..n];
    if magic.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else if magic.starts_with(b"07070") {
        Compression::None
    } else {
        panic!("{}: unknown initrd magic {magic:02x?}", path.display())
    }
}

/// Runs `cpio ARGS` in `cwd` with the decompressed initrd on its stdin
/// (external `gzip -dc` / `zstd -dc`), and returns cpio's stdout.
fn cpio_pipe(initrd: &Path, cwd: &Path, args: &[&str]) -> Vec<u8> {
    let compression = detect_compression(initrd);
    let mut decompressor = match compression {
        Compression::Gzip => Some(tool("gzip").arg("-dc").arg(initrd).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn gzip")),
        Compression::Zstd => Some(tool("zstd").args(["-dc", "-q"]).arg(initrd).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn zstd")),
        Compression::None => None,
    };
    let stdin = match &mut decompressor {
        Some(d) => Stdio::from(d.stdout.take().unwrap()),
        None => Stdio::from(fs::File::open(initrd).unwrap()),
    };
    let out = tool("cpio").args(args).current_dir(cwd).stdin(stdin).output().expect("run cpio");
    if let Some(d) = decompressor {
        let dout = d.wait_with_output().unwrap();
        assert!(dout.status.success(), "{compression:?} decompression of {} failed: {}", initrd.display(), String::from_utf8_lossy(&dout.stderr));
    }
    assert!(out.status.success(), "cpio {args:?} on {} failed ({}): {}", initrd.display(), out.status, String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// Extracts an initrd (gzip, zstd or plain newc cpio) with GNU
/// `cpio -idm --no-absolute-filenames` as root into a temporary directory,
/// so owners, modes, device nodes, hard links and mtimes are restored; returns
/// that directory. Only the first archive of a concatenated initrd is read.
pub fn cpio_extract(initrd: &Path) -> Scratch {
    let dir = tempdir("osbuilder-cpio-");
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    cpio_pipe(initrd, &root, &["-idm", "--no-absolute-filenames", "--quiet"]);
    Scratch::new(dir, root)
}

/// One line of `cpio -itvn`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpioEntry {
    /// The name as stored in the archive (e.g. "etc/passwd", "./init", ".").
    pub name: String,
    /// `name` without a leading "./" or "/" ("." for the root).
    pub path: String,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    /// Size field (0 for devices; 0 for all but one name of a hard-link set
    /// in newc, whose data travels with the last name).
    pub size: u64,
    /// (major, minor) of a device node.
    pub rdev: Option<(u32, u32)>,
    /// Symlink target.
    pub target: Option<String>,
    /// The listing line, for messages.
    pub line: String,
}

/// Lists an initrd with GNU `cpio -itvn` (numeric owners) and parses every
/// line. Only the first archive of a concatenated initrd is read.
pub fn cpio_list(initrd: &Path) -> Vec<CpioEntry> {
    let cwd = std::env::temp_dir();
    let out = cpio_pipe(initrd, &cwd, &["-itvn", "--quiet"]);
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_cpio_line(l).unwrap_or_else(|e| panic!("cannot parse cpio line {l:?}: {e}")))
        .collect()
}

/// One newc header and its data, read byte for byte (names as stored: not
/// UTF-8 when the image's are not).
#[derive(Clone, Debug)]
pub struct NewcEntry {
    /// The name as stored, without its terminating NUL.
    pub name: Vec<u8>,
    pub ino: u32,
    /// The whole `st_mode`: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    /// (major, minor) of the device a device node stands for.
    pub rdev: (u32, u32),
    /// File data (empty on all but the last name of a hard-link set) or a
    /// symlink's target.
    pub data: Vec<u8>,
}

impl NewcEntry {
    pub fn kind(&self) -> Kind {
        Kind::of_mode(self.mode).unwrap_or_else(|| panic!("{:?}: unknown file type {:o}", String::from_utf8_lossy(&self.name), self.mode & 0o170000))
    }
}

/// Every entry of an initrd, in archive order, read from the newc headers
/// (`070701`/`070702`: 13 eight-digit hex fields after the magic), which
/// `cpio -tv` gives only in part (mtimes to the minute, names lossily). The
/// reader is held to GNU cpio: the paths and kinds it finds must be exactly
/// those of [`cpio_list`], in the same order. Only the first archive of a
/// concatenated initrd is read.
pub fn newc_entries(initrd: &Path) -> Vec<NewcEntry> {
    let data = match detect_compression(initrd) {
        Compression::None => fs::read(initrd).unwrap(),
        Compression::Gzip => run(tool("gzip").arg("-dc").arg(initrd)).stdout,
        Compression::Zstd => run(tool("zstd").args(["-dc", "-q"]).arg(initrd)).stdout,
    };
    let field = |at: usize, i: usize| {
        let hex = std::str::from_utf8(&data[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
        u32::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{}: header at {at}: field {i} {hex:?}: {e}", initrd.display()))
    };
    let pad4 = |n: usize| (n + 3) & !3;
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let magic = &data[at..at + 6];
        assert!(magic == b"070701" || magic == b"070702", "{}: no newc magic at {at}: {magic:?}", initrd.display());
        let (size, name_size) = (field(at, 6) as usize, field(at, 11) as usize);
        let name = data[at + 110..at + 110 + name_size - 1].to_vec();
        let data_at = pad4(at + 110 + name_size);
        let entry = NewcEntry {
            name,
            ino: field(at, 0),
            mode: field(at, 1),
            uid: field(at, 2),
            gid: field(at, 3),
            nlink: field(at, 4),
            mtime: field(at, 5),
            rdev: (field(at, 9), field(at, 10)),
            data: data[data_at..data_at + size].to_vec(),
        };
        at = pad4(data_at + size);
        if entry.name == b"TRAILER!!!" {
            break;
        }
        entry.kind();
        entries.push(entry);
    }
    let ours: Vec<(String, Kind)> = entries.iter().map(|e| (normalize_archive_path(&String::from_utf8_lossy(&e.name)), e.kind())).collect();
    let listed = cpio_list(initrd);
    let gnu: Vec<(String, Kind)> = listed.into_iter().map(|e| (e.path, e.kind)).collect();
    assert!(ours == gnu, "the newc header reader disagrees with GNU cpio's listing");
    entries
}

/// The exact mtime of every entry of an initrd, directories and symlinks
/// included, which neither `cpio -tv` (minutes or days) nor `cpio -idm`
/// (files only) gives: from [`newc_entries`], in archive order.
pub fn cpio_mtimes(initrd: &Path) -> Vec<(String, Kind, i64)> {
    newc_entries(initrd).into_iter().map(|e| (normalize_archive_path(&String::from_utf8_lossy(&e.name)), e.kind(), i64::from(e.mtime))).collect()
}

/// Parses one `cpio -tvn` line, e.g.
/// `crw-r--r--   1 0        0          1,   3 Nov 22 00:03 dev/null` or
/// `lrwxrwxrwx   1 0        0               7 Jan  1  1970 bin/sh -> busybox`.
pub fn parse_cpio_line(line: &str) -> Result<CpioEntry, String> {
    // Tokens with their byte offsets, so the name keeps its inner spaces.
    let mut tokens: Vec<(usize, &str)> = Vec::new();
    let mut start = None;
    for (i, c) in line.char_indices() {
        match (c == ' ' || c == '\t', start) {
            (true, Some(s)) => {
                tokens.push((s, &line[s..i]));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
        if tokens.len() >= 11 {
            break;
        }
    }
    if let Some(s) = start {
        if tokens.len() < 11 {
            tokens.push((s, &line[s..]));
        }
    }
    let tok = |i: usize| tokens.get(i).map(|t| t.1).ok_or_else(|| format!("missing field {i}"));
    let mode_str = tok(0)?;
    let (kind, mode) = parse_mode_string(mode_str)?;
    let nlink = tok(1)?.parse().map_err(|e| format!("nlink: {e}"))?;
    let uid = tok(2)?.parse().map_err(|e| format!("uid: {e}"))?;
    let gid = tok(3)?.parse().map_err(|e| format!("gid: {e}"))?;
    let (size, rdev, date_at) = if let Some(major) = tok(4)?.strip_suffix(',') {
        let major = major.parse().map_err(|e| format!("major: {e}"))?;
        let minor = tok(5)?.parse().map_err(|e| format!("minor: {e}"))?;
        (0, Some((major, minor)), 6)
    } else {
        (tok(4)?.parse().map_err(|e| format!("size: {e}"))?, None, 5)
    };
    // Date: three tokens ("Nov 22 00:03" or "Jan  1  1970"), then the name.
    let name_at = tokens.get(date_at + 3).map(|t| t.0).ok_or("missing name")?;
    let rest = &line[name_at..];
    let (name, target) = if kind == Kind::Symlink {
        match rest.split_once(" -> ") {
            Some((n, t)) => (n.to_string(), Some(t.to_string())),
            None => return Err("symlink without ' -> '".into()),
        }
    } else {
        (rest.to_string(), None)
    };
    Ok(CpioEntry { path: normalize_archive_path(&name), name, kind, mode, nlink, uid, gid, size, rdev, target, line: line.to_string() })
}

fn normalize_archive_path(name: &str) -> String {
    let mut p = name;
    loop {
        if let Some(r) = p.strip_prefix("./") {
            p = r;
        } else if let Some(r) = p.strip_prefix('/') {
            p = r;
        } else {
            break;
        }
    }
    let p = p.trim_end_matches('/');
    if p.is_empty() {
        ".".to_string()
    } else {
        p.to_string()
    }
}

/// Parses an `ls -l` style mode ("-rwsr-xr-x", "drwxrwxrwt") into kind and
/// permission bits.
pub fn parse_mode_string(s: &str) -> Result<(Kind, u32), String> {
    let b = s.as_bytes();
    if b.len() < 10 {
        return Err(format!("mode string {s:?} too short"));
    }
    let kind = match b[0] {
        b'-' => Kind::File,
        b'd' => Kind::Dir,
        b'l' => Kind::Symlink,
        b'c' => Kind::CharDev,
        b'b' => Kind::BlockDev,
        b'p' => Kind::Fifo,
        b's' => Kind::Socket,
        c => return Err(format!("unknown type {:?} in {s:?}", c as char)),
    };
    let mut mode = 0u32;
    for (i, shift) in [(1usize, 6u32), (4, 3), (7, 0)] {
        if b[i] == b'r' {
            mode |= 4 << shift;
        }
        if b[i + 1] == b'w' {
            mode |= 2 << shift;
        }
        let special = match i {
            1 => 0o4000,
            4 => 0o2000,
            _ => 0o1000,
        };
        match b[i + 2] {
            b'x' => mode |= 1 << shift,
            b's' | b't' => mode |= (1 << shift) | special,
            b'S' | b'T' => mode |= special,
            b'-' => {}
            c => return Err(format!("unexpected {:?} in {s:?}", c as char)),
        }
    }
    Ok((kind, mode))
}

/// The file capability `getcap` reports for `path` (e.g. "cap_net_raw=ep"),
/// `None` if it has none. This is how tests see a `security.capability`
/// xattr without an xattr crate.
pub fn file_capability(path: &Path) -> Option<String> {
    let out = run_stdout(tool("getcap").arg(path));
    let line = out.lines().next()?.trim();
    // getcap prints "PATH CAPS" (libcap 2.66) or "PATH = CAPS" (older).
    let rest = line.strip_prefix(&*path.to_string_lossy())?.trim();
    let rest = rest.strip_prefix('=').unwrap_or(rest).trim();
    if rest.is_empty() {
        None
    } else {
        Some(rest.to_string())
    }
}

// ---------------------------------------------------------------------------
// Tree snapshots
// ---------------------------------------------------------------------------

/// File type of a tree or archive entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDev,
    BlockDev,
}

impl Kind {
    /// The kind a `st_mode`-style mode's file type bits name, `None` for none.
    pub fn of_mode(mode: u32) -> Option<Kind> {
        Some(match mode & 0o170000 {
            0o100000 => Kind::File,
            0o040000 => Kind::Dir,
            0o120000 => Kind::Symlink,
            0o010000 => Kind::Fifo,
            0o140000 => Kind::Socket,
            0o020000 => Kind::CharDev,
            0o060000 => Kind::BlockDev,
            _ => return None,
        })
    }
}

/// What [`tree_snapshot`] records about one path. [`diff_trees`] compares
/// kind, mode, uid, gid, sha256, target, rdev and link_group; size (of
/// directories, file-system dependent), nlink and mtime are recorded but not
/// compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (mode & 0o7777).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Hex sha256 of a regular file's content.
    pub sha256: Option<String>,
    /// Target of a symlink.
    pub target: Option<String>,
    /// (major, minor) of a device node.
    pub rdev: Option<(u32, u32)>,
    /// For a non-directory that shares its inode with other paths of the
    /// same tree: the first of those paths in sorted order (the same value on
    /// every member, including the first itself). `None` otherwise.
    pub link_group: Option<String>,
    pub nlink: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {:04o} {}:{}", self.kind, self.mode, self.uid, self.gid)?;
        if let Some(s) = &self.sha256 {
            write!(f, " size={} sha256={}", self.size, &s[..12])?;
        }
        if let Some(t) = &self.target {
            write!(f, " -> {t}")?;
        }
        if let Some((ma, mi)) = self.rdev {
            write!(f, " dev={ma}:{mi}")?;
        }
        if let Some(g) = &self.link_group {
            write!(f, " linked-with={g}")?;
        }
        Ok(())
    }
}

/// Linux's encoding of dev_t (glibc's gnu_dev_major/minor).
pub fn dev_major_minor(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// Walks `root` (without following symlinks) and records every path below
/// it, keyed by its path relative to `root` with '/' separators ("etc",
/// "etc/passwd"). The root itself is not included: its mode depends on the
/// temporary directory it was extracted into; stat it directly if needed.
/// Names that are not UTF-8 are converted lossily.
pub fn tree_snapshot(root: &Path) -> BTreeMap<String, Entry> {
    let mut map = BTreeMap::new();
    let mut inodes: HashMap<(u64, u64), Vec<String>> = HashMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = fs::read_dir(&dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()));
        for de in rd {
            let de = de.unwrap();
            let name = de.file_name().to_string_lossy().into_owned();
            let key = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let path = de.path();
            let md = fs::symlink_metadata(&path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
            let ft = md.file_type();
            let kind = if ft.is_file() {
                Kind::File
            } else if ft.is_dir() {
                Kind::Dir
            } else if ft.is_symlink() {
                Kind::Symlink
            } else if ft.is_fifo() {
                Kind::Fifo
            } else if ft.is_socket() {
                Kind::Socket
            } else if ft.is_char_device() {
                Kind::CharDev
            } else {
                Kind::BlockDev
            };
            let entry = Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: md.size(),
                sha256: (kind == Kind::File).then(|| sha256_file(&path)),
                target: (kind == Kind::Symlink).then(|| fs::read_link(&path).unwrap().to_string_lossy().into_owned()),
                rdev: matches!(kind, Kind::CharDev | Kind::BlockDev).then(|| dev_major_minor(md.rdev())),
                link_group: None,
                nlink: md.nlink(),
                mtime: md.mtime(),
            };
            if kind != Kind::Dir && md.nlink() > 1 {
                inodes.entry((md.dev(), md.ino())).or_default().push(key.clone());
            }
            if kind == Kind::Dir {
                stack.push((path, key.clone()));
            }
            map.insert(key, entry);
        }
    }
    for mut paths in inodes.into_values() {
        if paths.len() < 2 {
            continue;
        }
        paths.sort();
        let first = paths[0].clone();
        for p in paths {
            map.get_mut(&p).unwrap().link_group = Some(first.clone());
        }
    }
    map
}

/// Differences between two snapshots, one readable line each:
/// `- PATH: only in left (ENTRY)`, `+ PATH: only in right (ENTRY)`,
/// `~ PATH: FIELD left != right`. mtime, nlink and size are not compared.
pub fn diff_trees(left: &BTreeMap<String, Entry>, right: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut out = Vec::new();
    let keys: BTreeSet<&String> = left.keys().chain(right.keys()).collect();
    for k in keys {
        match (left.get(k), right.get(k)) {
            (Some(a), None) => out.push(format!("- {k}: only in left ({a})")),
            (None, Some(b)) => out.push(format!("+ {k}: only in right ({b})")),
            (Some(a), Some(b)) => {
                let mut field = |name: &str, x: String, y: String| {
                    if x != y {
                        out.push(format!("~ {k}: {name} {x} != {y}"));
                    }
                };
                field("kind", format!("{:?}", a.kind), format!("{:?}", b.kind));
                field("mode", format!("{:04o}", a.mode), format!("{:04o}", b.mode));
                field("uid", a.uid.to_string(), b.uid.to_string());
                field("gid", a.gid.to_string(), b.gid.to_string());
                field("sha256", format!("{:?}", a.sha256), format!("{:?}", b.sha256));
                field("target", format!("{:?}", a.target), format!("{:?}", b.target));
                field("rdev", format!("{:?}", a.rdev), format!("{:?}", b.rdev));
                field("link_group", format!("{:?}", a.link_group), format!("{:?}", b.link_group));
            }
            (None, None) => unreachable!(),
        }
    }
    out
}

/// Panics with the list of differences (at most 200 lines shown) unless the
/// two snapshots agree on every compared field of every path.
#[track_caller]
pub fn assert_trees_equal(left: &BTreeMap<String, Entry>, right: &BTreeMap<String, Entry>) {
    let diff = diff_trees(left, right);
    if !diff.is_empty() {
        let shown: Vec<&str> = diff.iter().take(200).map(String::as_str).collect();
        panic!(
            "trees differ in {} place(s) (left {} entries, right {}):\n{}{}",
            diff.len(),
            left.len(),
            right.len(),
            shown.join("\n"),
            if diff.len() > 200 { "\n..." } else { "" }
        );
    }
}

// ---------------------------------------------------------------------------
// A bearer-token server for docker-registry's `auth: token`
// ---------------------------------------------------------------------------

/// Issues JWTs (RS256, the certificate in `x5c`) to clients presenting the
/// right basic credentials; signing is done by the `openssl` command line.
struct TokenServer {
    addr: String,
    cert: PathBuf,
}

fn base64url(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl TokenServer {
    fn start(dir: &Path, user: &str, pass: &str) -> TokenServer {
        use std::io::{BufRead, BufReader, Write};
        let key = dir.join("token.key");
        let cert = dir.join("token.crt");
        run(tool("openssl")
            .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=osbuilder-test-token"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert));
        let der = run(tool("openssl").args(["x509", "-outform", "DER", "-in"]).arg(&cert)).stdout;
        let x5c = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(&der)
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let expected_auth = {
            use base64::Engine as _;
            format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")))
        };
        let user = user.to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request_line = String::new();
                if reader.read_line(&mut request_line).is_err() {
                    continue;
                }
                let mut authorized = false;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = line.split_once(':') {
                        if k.eq_ignore_ascii_case("authorization") && v.trim() == expected_auth {
                            authorized = true;
                        }
                    }
                }
                let mut stream = stream;
                if !authorized {
                    let _ = stream.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                    continue;
                }
                // Grant every scope asked for (repository:NAME:ACTIONS).
                let query = request_line.split_whitespace().nth(1).unwrap_or("").split_once('?').map(|x| x.1).unwrap_or("");
                let access: Vec<serde_json::Value> = query
                    .split('&')
                    .filter_map(|kv| kv.strip_prefix("scope="))
                    .filter_map(|scope| {
                        let scope = scope.replace("%3A", ":").replace("%2C", ",").replace("%2F", "/");
                        let mut parts = scope.splitn(3, ':');
                        let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
                        Some(json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
                    })
                    .collect();
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                let header = json!({"typ": "JWT", "alg": "RS256", "x5c": [x5c]});
                let claims = json!({
                    "iss": "osbuilder-test-issuer", "sub": user, "aud": "osbuilder-test",
                    "exp": now + 600, "nbf": now - 10, "iat": now, "jti": format!("{now}-{}", access.len()),
                    "access": access,
                });
                let signing_input = format!("{}.{}", base64url(header.to_string().as_bytes()), base64url(claims.to_string().as_bytes()));
                let mut sign = tool("openssl");
                sign.args(["dgst", "-sha256", "-sign"]).arg(&key).stdin(Stdio::piped()).stdout(Stdio::piped());
                let mut child = sign.spawn().unwrap();
                child.stdin.take().unwrap().write_all(signing_input.as_bytes()).unwrap();
                let signature = child.wait_with_output().unwrap().stdout;
                let token = format!("{signing_input}.{}", base64url(&signature));
                let body = json!({"token": token, "access_token": token, "expires_in": 600}).to_string();
                let _ = stream.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                        .as_bytes(),
                );
            }
        });
        TokenServer { addr, cert }
    }
}
pub mod bombs;
pub mod guest;
#[allow(unused_imports)] // not every test file injects faults
pub use testkit::proxy;

/// `dd` of LEN bytes at OFFSET of `img` into `dest` (holes stay holes), for
/// reading one partition of a disk image with its format's own tools.
pub fn dd_range(img: &Path, offset: u64, len: u64, dest: &Path) -> PathBuf {
    run(tool("dd")
        .arg(format!("if={}", img.display()))
        .arg(format!("of={}", dest.display()))
        .args(["bs=1M", "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"])
        .arg(format!("skip={offset}"))
        .arg(format!("count={len}")));
    assert_eq!(fs::metadata(dest).unwrap().len(), len, "{} is shorter than the range", img.display());
    dest.to_path_buf()
}

/// Runs `cmd` (a build whose output goes into the empty directory `dir`),
/// waits for its staged `.osbuilder-*.tmp` file, lets it write for `settle`,
/// sends SIGINT and checks that the process dies of it and leaves nothing in
/// `dir`.
pub fn assert_sigint_leaves_nothing(mut cmd: Command, dir: &Path, settle: Duration) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let staged = loop {
        let found = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| n.starts_with(".osbuilder-") && n.ends_with(".tmp"));
        if let Some(name) = found {
            break name;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("osbuilder finished ({status}) before its staged file was seen");
        }
        assert!(Instant::now() < deadline, "no staged file within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(settle);
    let size_then = fs::metadata(dir.join(&staged)).map(|m| m.len()).unwrap_or(0);
    run(tool("kill").args(["-INT", &child.id().to_string()]));
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!status.success(), "an interrupted build must not succeed: {status}\n{stderr}");
    assert!(status.signal() == Some(2) || status.code() == Some(130), "dies of SIGINT: {status}\n{stderr}");
    let left: Vec<_> = fs::read_dir(dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "left behind after SIGINT (staged {staged}, {size_then} bytes when signalled): {left:?}");
}
