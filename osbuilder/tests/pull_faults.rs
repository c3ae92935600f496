//! Pulls under faults and load: testkit's fault-injecting proxy in front of
//! the real registry (connections cut mid-blob, lost answers, 500/503/429,
//! stalls, truncated and corrupted bodies), SIGINT mid-pull, a full disk
//! (small tmpfs mounts as output and as cache) and eight builds at once
//! against one cache. After every run: the output is identical to a clean
//! build or absent with a clear error, nothing half-written sits beside it,
//! and every file under the cache's blob names hashes to its name.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use testkit::proxy::{Fault, FaultProxy, Rule};

const REPO_TAG: &str = "faults:v2";

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("osbuilder-pull-").tempdir().unwrap()
}

/// A registry holding the layered test image, its largest layer (about
/// 1 MiB, the blob faults are aimed at) and the sha256 of a clean build.
struct Setup {
    registry: Registry,
    layer: String,
    layer_size: u64,
    clean_sha256: String,
}

fn setup() -> Setup {
    let registry = Registry::start();
    let layout = layered_layout();
    push(&oci_ref(&layout, "v2"), &registry, REPO_TAG, &[]);
    let manifest = layout_manifest(&layout, "v2");
    let largest = manifest["layers"].as_array().unwrap().iter().max_by_key(|l| l["size"].as_u64().unwrap()).unwrap();
    let layer = largest["digest"].as_str().unwrap().to_string();
    let layer_size = largest["size"].as_u64().unwrap();
    assert!(layer_size > 512 << 10, "the faults below cut and flip beyond 256 KiB; layer {layer} has {layer_size} bytes");
    let tmp = scratch();
    let out = tmp.path().join("clean.cpio.gz");
    build_ok(&["initrd", "--image", &registry.docker_ref(REPO_TAG), "-o", path_str(&out)], &tmp.path().join("cache"));
    Setup { clean_sha256: sha256_file(&out), registry, layer, layer_size }
}

/// Asserts the cache holds only verified blobs: every file in
/// `blobs/sha256/` hashes to its name, and no temporary blob is left.
/// Returns the number of blobs.
fn assert_cache_consistent(cache: &Path) -> usize {
    let dir = cache.join("blobs/sha256");
    let mut n = 0;
    if let Ok(entries) = fs::read_dir(&dir) {
        for entry in entries {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            assert_eq!(sha256_file(&entry.path()), name, "{} does not hash to its name", entry.path().display());
            n += 1;
        }
    }
    let leftovers: Vec<_> = fs::read_dir(cache.join("blobs/tmp")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    assert!(leftovers.is_empty(), "temporary blobs left in the cache: {leftovers:?}");
    n
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

enum Expect {
    /// The pull survives: the output equals the clean build's.
    Identical,
    /// The pull fails with an error containing every one of these.
    Error(Vec<String>),
}

struct Case {
    name: &'static str,
    rule: Rule,
    args: &'static [&'static str],
    expect: Expect,
}

#[test]
fn pull_faults_end_in_an_identical_build_or_a_clear_error() {
    let s = setup();
    let blob = format!("/blobs/{}", s.layer);
    let once = |fault| Rule::new(Some("GET"), &blob, fault);
    let always = |fault| Rule::new(Some("GET"), &blob, fault).always();
    let err = |parts: &[&str]| Expect::Error(parts.iter().map(|p| p.to_string()).collect());
    let cases = vec![
        Case { name: "connection cut mid-blob", rule: once(Fault::TruncateResponse(256 << 10)), args: &[], expect: Expect::Identical },
        Case { name: "answer lost", rule: once(Fault::DropResponse), args: &[], expect: Expect::Identical },
        Case { name: "500", rule: once(Fault::status(500)), args: &[], expect: Expect::Identical },
        Case { name: "503 twice", rule: once(Fault::status(503)).times(2), args: &[], expect: Expect::Identical },
        Case { name: "429 with Retry-After", rule: once(Fault::too_many_requests(1)), args: &[], expect: Expect::Identical },
        Case { name: "manifest 503", rule: Rule::new(Some("GET"), "/manifests/", Fault::status(503)), args: &[], expect: Expect::Identical },
        Case {
            name: "stall shorter than the timeout",
            rule: once(Fault::Stall(Duration::from_secs(2))),
            args: &["--timeout", "30"],
            expect: Expect::Identical,
        },
        Case { name: "stall mid-blob", rule: once(Fault::StallResponseAfter(256 << 10)), args: &["--timeout", "2"], expect: Expect::Identical },
        Case { name: "flipped byte", rule: once(Fault::FlipResponseByte(300_000)), args: &[], expect: Expect::Identical },
        Case { name: "503 always", rule: always(Fault::status(503)), args: &["--retries", "2"], expect: err(&["503", "gave up after 3 attempts", &s.layer]) },
        Case {
            name: "truncated always",
            rule: always(Fault::TruncateResponse(256 << 10)),
            args: &["--retries", "2"],
            expect: err(&[&s.layer, "gave up after 3 attempts"]),
        },
        Case { name: "flipped always", rule: always(Fault::FlipResponseByte(300_000)), args: &["--retries", "2"], expect: err(&["wrong digest", &s.layer]) },
        Case { name: "stall forever", rule: always(Fault::StallForever), args: &["--retries", "1", "--timeout", "2"], expect: err(&["timed out", &s.layer]) },
    ];
    let (mut injected, mut survived, mut failed_clearly) = (0, 0, 0);
    let mut report = Vec::new();
    for case in cases {
        let proxy = FaultProxy::start(&s.registry.addr());
        let rule = proxy.add(case.rule);
        let tmp = scratch();
        let cache = tmp.path().join("cache");
        let out_dir = tmp.path().join("out");
        fs::create_dir(&out_dir).unwrap();
        let out = out_dir.join("initrd.cpio.gz");
        let image = format!("docker://{}/{REPO_TAG}", proxy.addr());
        let mut args = vec!["initrd", "--image", &image, "-o", path_str(&out)];
        args.extend(case.args);
        let result = run_osbuilder(&args, &cache);
        let stderr = String::from_utf8_lossy(&result.stderr);
        let fired = proxy.fired(rule);
        assert!(fired > 0, "{}: the fault never fired\n{}", case.name, proxy.summary());
        injected += fired;
        match &case.expect {
            Expect::Identical => {
                assert!(result.status.success(), "{}: the pull should survive {fired} fault(s):\n{stderr}\n{}", case.name, proxy.summary());
                assert_eq!(sha256_file(&out), s.clean_sha256, "{}: output differs from the clean build", case.name);
                assert_eq!(names(&out_dir), ["initrd.cpio.gz"], "{}: stray files beside the output", case.name);
                survived += fired;
            }
            Expect::Error(parts) => {
                assert!(!result.status.success(), "{}: the pull should fail\n{}", case.name, proxy.summary());
                for part in parts {
                    assert!(stderr.contains(part.as_str()), "{}: the error should say {part:?}:\n{stderr}", case.name);
                }
                assert!(names(&out_dir).is_empty(), "{}: files left in the output directory: {:?}", case.name, names(&out_dir));
                failed_clearly += 1;
            }
        }
        let blobs = assert_cache_consistent(&cache);
        let outcome = if result.status.success() { "ok".to_string() } else { format!("error: {}", stderr.trim().lines().last().unwrap_or("")) };
        report.push(format!("{:32} fired {fired:2}, {blobs} verified blobs cached, {outcome}", case.name));
        if case.name == "stall mid-blob" {
            let gets = proxy.matching(Some("GET"), &blob);
            let resumed = gets.iter().filter(|g| g.request_header("range").is_some_and(|r| r.starts_with(&format!("bytes={}-", 256 << 10)))).count();
            assert_eq!(resumed, 1, "the stalled transfer resumes at the byte it had: {gets:#?}");
        }
    }
    eprintln!("pull faults:\n  {}", report.join("\n  "));
    eprintln!("pull faults: {injected} injected, {survived} survived with an identical output, {failed_clearly} persistent faults failed clearly");
}

/// SIGINT while a layer is half transferred (the proxy relays 256 KiB and
/// then hangs): the process dies by the signal, leaving no output, no
/// temporary file beside it and no partial blob in the cache.
#[test]
fn sigint_mid_pull_leaves_no_output_temp_or_partial_blob() {
    let s = setup();
    let proxy = FaultProxy::start(&s.registry.addr());
    let rule = proxy.add(Rule::new(Some("GET"), &format!("/blobs/{}", s.layer), Fault::StallResponseAfter(256 << 10)).always());
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let out_dir = tmp.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("initrd.cpio.gz");
    let mut child = osbuilder()
        .args(["initrd", "--image", &format!("docker://{}/{REPO_TAG}", proxy.addr()), "-o", path_str(&out), "--timeout", "600"])
        .arg("--cache-dir")
        .arg(&cache)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (no deadline on the assertion: the stall is forever) until the
    // proxy has sent its 256 KiB and the cache holds the partial blob.
    let partial = |cache: &Path| fs::read_dir(cache.join("blobs/tmp")).map(|d| d.count()).unwrap_or(0);
    for _ in 0..600 {
        if proxy.fired(rule) > 0 && partial(&cache) > 0 {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "osbuilder ended before the interrupt");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(proxy.fired(rule) > 0 && partial(&cache) > 0, "the transfer never reached the stall\n{}", proxy.summary());
    // SAFETY: kill on the pid of our own child, which has not been reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let result = child.wait_with_output().unwrap();
    assert_eq!(result.status.signal(), Some(libc::SIGINT), "osbuilder should die by SIGINT: {:?}\n{}", result.status, String::from_utf8_lossy(&result.stderr));
    assert!(names(&out_dir).is_empty(), "files left in the output directory: {:?}", names(&out_dir));
    let blobs = assert_cache_consistent(&cache);
    assert!(!cache.join("blobs/sha256").join(s.layer.trim_start_matches("sha256:")).exists());
    eprintln!("sigint mid-pull: died by SIGINT, {blobs} verified blobs cached, no partial blob");
}

/// A tmpfs of `size` at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let parent = scratch();
        let dir = parent.path().join("tmpfs");
        fs::create_dir(&dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&dir).output().ok()?;
        out.status.success().then_some(Tmpfs { dir, _parent: parent })
    }

    fn resize(&self, size: &str) {
        run(Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.dir));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

fn small_tmpfs(test: &str) -> Option<Tmpfs> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip!(test, "mounting a tmpfs needs root");
        return None;
    }
    let fs = Tmpfs::mount("256k");
    if fs.is_none() {
        testkit::skip!(test, "mount -t tmpfs failed here");
    }
    fs
}

#[test]
fn a_full_output_filesystem_fails_clearly_and_the_next_build_with_space_succeeds() {
    let Some(tmpfs) = small_tmpfs("a_full_output_filesystem_fails_clearly_and_the_next_build_with_space_succeeds") else { return };
    let s = setup();
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let out = tmpfs.dir.join("initrd.cpio.gz");
    let image = s.registry.docker_ref(REPO_TAG);
    let stderr = build_err(&["initrd", "--image", &image, "-o", path_str(&out)], &cache);
    assert!(stderr.contains("No space left on device") && stderr.contains(path_str(&out)), "the error should name the full disk and the output:\n{stderr}");
    assert!(names(&tmpfs.dir).is_empty(), "half-written files on the full filesystem: {:?}", names(&tmpfs.dir));
    assert_cache_consistent(&cache);
    tmpfs.resize("64m");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&out)], &cache);
    assert_eq!(sha256_file(&out), s.clean_sha256);
    assert_eq!(names(&tmpfs.dir), ["initrd.cpio.gz"]);
}

#[test]
fn a_full_cache_filesystem_fails_clearly_and_leaves_the_cache_consistent() {
    let Some(tmpfs) = small_tmpfs("a_full_cache_filesystem_fails_clearly_and_leaves_the_cache_consistent") else { return };
    let s = setup();
    let tmp = scratch();
    let cache = tmpfs.dir.join("cache");
    let out = tmp.path().join("initrd.cpio.gz");
    let image = s.registry.docker_ref(REPO_TAG);
    let stderr = build_err(&["initrd", "--image", &image, "-o", path_str(&out)], &cache);
    assert!(stderr.contains("No space left on device") && stderr.contains(path_str(&cache)), "the error should name the full disk and the cache:\n{stderr}");
    assert!(stderr.contains(&s.layer), "the error should name the blob {}:\n{stderr}", s.layer);
    assert!(!out.exists());
    assert_eq!(names(tmp.path()), Vec::<String>::new(), "files left beside the output");
    let kept = assert_cache_consistent(&cache);
    tmpfs.resize("64m");
    build_ok(&["initrd", "--image", &image, "-o", path_str(&out)], &cache);
    assert_eq!(sha256_file(&out), s.clean_sha256);
    let after = assert_cache_consistent(&cache);
    eprintln!("full cache: {kept} verified blobs kept after ENOSPC, {after} after the build with space");
}

/// Eight builds at once against one fresh cache: every output identical,
/// every cached blob verified, and each blob downloaded once.
#[test]
fn eight_parallel_builds_share_one_cache_and_download_each_blob_once() {
    let s = setup();
    let proxy = FaultProxy::start(&s.registry.addr());
    let tmp = scratch();
    let cache = tmp.path().join("cache");
    let image = format!("docker://{}/{REPO_TAG}", proxy.addr());
    let children: Vec<_> = (0..8)
        .map(|i| {
            let out = tmp.path().join(format!("initrd-{i}.cpio.gz"));
            let child = osbuilder()
                .args(["initrd", "--image", &image, "-o", path_str(&out), "--cache-dir", path_str(&cache)])
                .env_remove("SOURCE_DATE_EPOCH")
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (out, child)
        })
        .collect();
    for (out, child) in children {
        let result = child.wait_with_output().unwrap();
        assert!(result.status.success(), "{}: {}", out.display(), String::from_utf8_lossy(&result.stderr));
        assert_eq!(sha256_file(&out), s.clean_sha256, "{} differs from the clean build", out.display());
    }
    let blobs = assert_cache_consistent(&cache);
    let mut per_blob = std::collections::BTreeMap::<String, usize>::new();
    for seen in proxy.matching(Some("GET"), "/blobs/sha256:") {
        if seen.status == Some(200) {
            *per_blob.entry(seen.path.rsplit('/').next().unwrap().to_string()).or_default() += 1;
        }
    }
    eprintln!("eight parallel builds: {blobs} blobs cached; downloads per blob: {per_blob:?}");
    assert_eq!(per_blob.len(), blobs, "every cached blob came through the proxy");
    assert!(per_blob.values().all(|&n| n == 1), "each blob must be downloaded once: {per_blob:?}");
    let _ = s.layer_size;
}

/// A registry answering the manifest GET with a body far over the 16 MiB
/// limit for JSON documents, undeclared (1 GiB until the connection closes)
/// or declared (a `Content-Length` of 10 GiB): the pull is refused, naming
/// the manifest and the limit, without buffering the body, so the peak RSS
/// stays small and the proxy gets to write little beyond the limit before
/// the client hangs up.
#[test]
fn a_huge_manifest_is_refused_without_buffering_it() {
    let s = setup();
    for (name, len, declare) in [("1 GiB, undeclared", 1u64 << 30, false), ("10 GiB, declared", 10u64 << 30, true)] {
        let proxy = FaultProxy::start(&s.registry.addr());
        let rule = proxy.add(Rule::new(Some("GET"), "/manifests/", Fault::RespondHuge { len, declare }).always());
        let tmp = scratch();
        let out = tmp.path().join("initrd.cpio.gz");
        let image = format!("docker://{}/{REPO_TAG}", proxy.addr());
        let cache = tmp.path().join("cache");
        let (status, stderr, peak_mib) =
            run_measured(osbuilder().args(["initrd", "--image", &image, "-o", path_str(&out), "--retries", "1", "--cache-dir", path_str(&cache)]));
        let written: u64 = proxy.matching(Some("GET"), "/manifests/").iter().map(|r| r.response_body_bytes).sum();
        eprintln!("huge manifest, {name}: peak RSS {peak_mib} MiB, the proxy wrote {written} bytes: {}", stderr.trim().lines().last().unwrap_or(""));
        assert!(proxy.fired(rule) > 0, "{name}: the fault never fired\n{}", proxy.summary());
        assert!(!status.success(), "{name}: the pull should be refused\n{stderr}");
        assert!(
            stderr.contains("manifest") && stderr.contains(REPO_TAG) && stderr.contains("16 MiB"),
            "{name}: the error should name the manifest and the limit:\n{stderr}"
        );
        assert!(peak_mib < 100, "{name}: peak RSS {peak_mib} MiB: the manifest was buffered");
        assert!(written < 64 << 20, "{name}: the client read {written} bytes of the manifest before refusing it");
        assert!(!out.exists());
        assert_cache_consistent(&cache);
    }
}

/// The GETs matching `path` in the proxy's log: the one `rule` fired on and
/// the one after it.
fn fault_and_retry(proxy: &FaultProxy, rule: testkit::proxy::RuleId, path: &str) -> (testkit::proxy::Seen, testkit::proxy::Seen) {
    let gets = proxy.matching(Some("GET"), path);
    let i = gets.iter().position(|g| g.rule == Some(rule)).unwrap_or_else(|| panic!("no GET of {path} met the fault\n{}", proxy.summary()));
    let retry = gets.get(i + 1).unwrap_or_else(|| panic!("the GET of {path} was not tried again\n{}", proxy.summary()));
    (gets[i].clone(), retry.clone())
}

/// A 429 or 503 with `Retry-After: 2` on the manifest or on a blob: the pull
/// waits what the registry asked (the retry arrives no earlier than 2 s after
/// the refused request) and then builds the same output.
#[test]
fn a_429_or_503_with_retry_after_is_waited_out() {
    let s = setup();
    let blob = format!("/blobs/{}", s.layer);
    let unavailable = Fault::Respond { status: 503, headers: vec![("Retry-After".into(), "2".into())], body: String::new() };
    for (name, path, fault) in [
        ("manifest 429", "/manifests/", Fault::too_many_requests(2)),
        ("blob 429", blob.as_str(), Fault::too_many_requests(2)),
        ("blob 503", blob.as_str(), unavailable),
    ] {
        let proxy = FaultProxy::start(&s.registry.addr());
        let rule = proxy.add(Rule::new(Some("GET"), path, fault));
        let tmp = scratch();
        let out = tmp.path().join("initrd.cpio.gz");
        let image = format!("docker://{}/{REPO_TAG}", proxy.addr());
        let result = run_osbuilder(&["initrd", "--image", &image, "-o", path_str(&out)], &tmp.path().join("cache"));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(result.status.success(), "{name}: the pull should wait and succeed:\n{stderr}\n{}", proxy.summary());
        assert_eq!(sha256_file(&out), s.clean_sha256, "{name}: output differs from the clean build");
        let (refused, retry) = fault_and_retry(&proxy, rule, path);
        let waited = retry.arrived - refused.arrived;
        eprintln!("{name}: tried again {:.2} s after the refusal", waited.as_secs_f64());
        assert!(waited >= Duration::from_secs(2), "{name}: Retry-After: 2 not honoured, the retry came {waited:?} after the refusal\n{stderr}");
    }
}

/// A `Retry-After` longer than the client waits: the pull fails at once
/// with an error that names the wait, on the manifest as on a blob.
#[test]
fn a_retry_after_over_the_limit_fails_naming_the_wait() {
    let s = setup();
    let blob = format!("/blobs/{}", s.layer);
    for (name, path) in [("manifest", "/manifests/"), ("blob", blob.as_str())] {
        let proxy = FaultProxy::start(&s.registry.addr());
        let rule = proxy.add(Rule::new(Some("GET"), path, Fault::too_many_requests(3600)).always());
        let tmp = scratch();
        let out = tmp.path().join("initrd.cpio.gz");
        let image = format!("docker://{}/{REPO_TAG}", proxy.addr());
        let result = run_osbuilder(&["initrd", "--image", &image, "-o", path_str(&out)], &tmp.path().join("cache"));
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(proxy.fired(rule) > 0, "{name}: the fault never fired\n{}", proxy.summary());
        assert!(!result.status.success(), "{name}: the pull should fail\n{stderr}");
        assert!(stderr.contains("3600 s") && stderr.contains("Retry-After"), "{name}: the error should name the wait:\n{stderr}");
        assert_eq!(proxy.fired(rule), 1, "{name}: a wait over the limit is not tried again\n{}", proxy.summary());
        assert!(!out.exists());
    }
}
