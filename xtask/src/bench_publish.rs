//! `cargo xtask bench --only publish`: the Debian disk (qcow2) as a KubeVirt
//! containerDisk pushed to a loopback registry, ours against the daemonless
//! way people do it today, alternating, in one run:
//!
//! - ours: `osbuilder push containerdisk` with a fresh cache and a fresh
//!   repository each run (nothing to skip, nothing to mount), default zstd,
//!   and gzip (umoci's compression) and none;
//! - anchor: `umoci init/new/unpack`, copy the disk into `rootfs/disk/` with
//!   owner 107:107 and modes 0555/0444, `umoci repack`, `skopeo copy` to the
//!   registry.
//!
//! Reported: median wall time, the bytes sent to the registry (ours: request
//! bodies, from `--push-report`; the anchor: the blobs of the image it
//! pushed), and peak RSS (the largest process of the pipeline, from wait4's
//! rusage). Then the resume case, through testkit's fault proxy: one upload
//! connection dropped half way, ours (8 MiB chunks, uncompressed layer)
//! against skopeo copy --retry-times 1 (one streaming PATCH, retried from
//! byte 0), counting the body bytes the registry received beyond the blobs'
//! sizes. Nothing asserts on time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::bench::{median_of as median, tempdir, Registry};
use crate::image::base_image;
use crate::util::Cmd;

struct Run {
    seconds: f64,
    bytes_sent: u64,
    peak_rss_mib: u64,
    digest: String,
}

/// Runs `cmd` (its stdout captured) and measures it with wait4.
#[allow(clippy::zombie_processes)] // reaped by wait4 below, which clippy cannot see
fn measured(cmd: &mut Command) -> anyhow::Result<(f64, u64, String)> {
    use std::os::unix::process::ExitStatusExt;
    let start = Instant::now();
    let child = cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().with_context(|| format!("cannot run {cmd:?}"))?;
    let pid = child.id() as libc::pid_t;
    let (mut out, mut err) = (child.stdout.context("stdout")?, child.stderr.context("stderr")?);
    let reader = std::thread::spawn(move || {
        let (mut o, mut e) = (String::new(), String::new());
        let _ = std::io::Read::read_to_string(&mut out, &mut o);
        let _ = std::io::Read::read_to_string(&mut err, &mut e);
        (o, e)
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for; the pointers are valid.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    let (stdout, stderr) = reader.join().map_err(|_| anyhow::anyhow!("reader thread"))?;
    if r != pid {
        bail!("wait4 on {pid} failed");
    }
    if !std::process::ExitStatus::from_raw(status).success() {
        bail!("{cmd:?} failed: {}", stderr.lines().rev().take(5).collect::<Vec<_>>().join(" / "));
    }
    // ru_maxrss of a child includes its waited-for descendants (Linux): the
    // largest process of the pipeline.
    Ok((seconds, usage.ru_maxrss as u64 / 1024, stdout))
}

fn ours(osbuilder: &Path, disk: &Path, target: &str, compression: &str, work: &Path) -> anyhow::Result<Run> {
    let cache = work.join("push-cache");
    let report = work.join("push-report.json");
    let (seconds, peak, stdout) = measured(
        Command::new(osbuilder)
            .args(["push", "containerdisk", "--quiet"])
            .arg(disk)
            .arg(target)
            .args(["--layer-compression", compression, "--cache-dir"])
            .arg(&cache)
            .arg("--push-report")
            .arg(&report),
    )?;
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?).context("our --push-report")?;
    std::fs::remove_dir_all(&cache)?;
    Ok(Run {
        seconds,
        bytes_sent: r["wire"]["bytes_sent"].as_u64().context("bytes_sent")?,
        peak_rss_mib: peak,
        digest: stdout.lines().last().unwrap_or_default().rsplit('@').next().unwrap_or_default().to_string(),
    })
}

fn anchor(disk: &Path, target: &str, work: &Path) -> anyhow::Result<Run> {
    let d = work.join("anchor");
    let script = format!(
        "set -e; umoci init --layout {d}/layout; umoci new --image {d}/layout:disk; \
         umoci unpack --image {d}/layout:disk {d}/bundle >/dev/null; \
         mkdir {d}/bundle/rootfs/disk; cp {disk} {d}/bundle/rootfs/disk/disk.img; \
         chown -R 107:107 {d}/bundle/rootfs/disk; chmod 0555 {d}/bundle/rootfs/disk; chmod 0444 {d}/bundle/rootfs/disk/disk.img; \
         umoci repack --image {d}/layout:disk {d}/bundle; \
         skopeo copy --quiet --dest-tls-verify=false oci:{d}/layout:disk docker://{target}",
        d = d.display(),
        disk = disk.display()
    );
    let (seconds, peak, _) = measured(Command::new("bash").args(["-c", &script]))?;
    // What skopeo sent: the image's config and layers.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("layout/index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("anchor index")?.to_string();
    let blob = |digest: &str| d.join("layout/blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(&manifest_digest))?)?;
    let mut bytes = manifest["config"]["size"].as_u64().unwrap_or(0);
    for l in manifest["layers"].as_array().context("anchor layers")? {
        bytes += l["size"].as_u64().unwrap_or(0);
    }
    std::fs::remove_dir_all(&d)?;
    Ok(Run { seconds, bytes_sent: bytes, peak_rss_mib: peak, digest: manifest_digest })
}

pub fn run(osbuilder: &Path, runs: usize) -> anyhow::Result<()> {
    let base = base_image()?;
    let work = tempdir()?;
    let disk = work.join("debian.qcow2");
    Cmd::new(osbuilder)
        .args(["disk", "--quiet", "--image"])
        .arg(format!("oci:{}:bookworm", base.join("layout").display()))
        .args(["--format", "qcow2", "-o"])
        .arg(&disk)
        .arg("--cache-dir")
        .arg(work.join("disk-cache"))
        .run()?;
    let disk_bytes = std::fs::metadata(&disk)?.len();
    let registry = Registry::start(&work.join("registry"))?;
    eprintln!("bench: containerDisk of the Debian disk ({disk_bytes} bytes qcow2) to {}, {runs} runs each, alternating", registry.addr);

    let variants = ["zstd", "gzip", "none"];
    let mut ours_runs: Vec<Vec<Run>> = variants.iter().map(|_| Vec::new()).collect();
    let mut anchor_runs = Vec::new();
    for run in 0..runs {
        anchor_runs.push(anchor(&disk, &format!("{}/bench/anchor-{run}:v1", registry.addr), &work)?);
        for (i, c) in variants.iter().enumerate() {
            ours_runs[i].push(ours(osbuilder, &disk, &format!("{}/bench/ours-{c}-{run}:v1", registry.addr), c, &work)?);
        }
    }
    let a = median(&anchor_runs.iter().map(|r| r.seconds).collect::<Vec<_>>());
    println!();
    println!("containerDisk push of the Debian qcow2 ({disk_bytes} bytes) to a loopback registry, {runs} runs each (median wall seconds)");
    println!("{:<52} {:>8} {:>9} {:>12} {:>9} {:>10}", "pipeline", "median", "speedup", "bytes sent", "peak RSS", "same digest");
    let row = |name: &str, rs: &[Run]| {
        let m = median(&rs.iter().map(|r| r.seconds).collect::<Vec<_>>());
        let same = rs.windows(2).all(|w| w[0].digest == w[1].digest);
        let peak = rs.iter().map(|r| r.peak_rss_mib).max().unwrap_or(0);
        println!(
            "{:<52} {:>8.2} {:>8.2}x {:>12} {:>6} MiB {:>10}",
            name,
            m,
            a / m,
            rs.last().map_or(0, |r| r.bytes_sent),
            peak,
            if same { "yes" } else { "no" }
        );
    };
    row("anchor: umoci new/unpack/cp/repack + skopeo copy", &anchor_runs);
    row("osbuilder push containerdisk (zstd, default)", &ours_runs[0]);
    row("osbuilder push containerdisk --layer-compression gzip", &ours_runs[1]);
    row("osbuilder push containerdisk --layer-compression none", &ours_runs[2]);
    println!("target: 2x faster than the anchor with memory bounded");

    pull_costs(&registry, runs, &variants)?;

    resume(osbuilder, &disk, &registry, &work)?;

    drop(registry);
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Body bytes the registry received for blob uploads.
fn upload_bytes(proxy: &testkit::proxy::FaultProxy) -> u64 {
    proxy.request_body_bytes(Some("PATCH"), "/blobs/uploads/") + proxy.request_body_bytes(Some("PUT"), "/blobs/uploads/")
}

/// One dropped connection half way through the layer upload: bytes sent again.
fn resume(osbuilder: &Path, disk: &Path, registry: &Registry, work: &Path) -> anyhow::Result<()> {
    use testkit::proxy::{Fault, FaultProxy, Rule};
    const CHUNK: u64 = 8 << 20;
    let layer_bytes = std::fs::metadata(disk)?.len() + 2048 + 512;
    let chunks = layer_bytes.div_ceil(CHUNK);
    let half = chunks / 2 + 1;
    println!();
    println!("resume: one upload connection dropped half way ({layer_bytes}-byte uncompressed layer, ours in {CHUNK}-byte chunks)");
    println!("{:<64} {:>14} {:>9} {:>10}", "case", "bytes re-sent", "of blob", "restarts");
    let mut rows = Vec::new();
    for (name, cut) in [("ours, cut before chunk {half} (between chunks)", 0u64), ("ours, cut 4 MiB into chunk {half} (mid-chunk)", 4 << 20)] {
        let proxy = FaultProxy::start(&registry.addr);
        let rule = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(cut)).nth(half as u32));
        let cache = work.join("resume-cache");
        let report = work.join("resume-report.json");
        Cmd::new(osbuilder)
            .args(["push", "containerdisk", "--quiet"])
            .arg(disk)
            .arg(format!("{}/bench/resume-{cut}:v1", proxy.addr()))
            .args(["--layer-compression", "none", "--chunk-mib", "8", "--cache-dir"])
            .arg(&cache)
            .arg("--push-report")
            .arg(&report)
            .quiet()
            .read()?;
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?)?;
        let blobs: u64 = r["blobs"].as_array().context("blobs")?.iter().filter_map(|b| b["size"].as_u64()).sum();
        if proxy.fired(rule) != 1 {
            bail!("the drop did not happen: {}", proxy.summary());
        }
        let resent = upload_bytes(&proxy).saturating_sub(blobs);
        rows.push((name.replace("{half}", &half.to_string()), resent, layer_bytes, r["wire"]["restarts"].as_u64().unwrap_or(0)));
        std::fs::remove_dir_all(&cache)?;
    }
    // The anchor: skopeo sends each blob in one PATCH and retries the copy from byte 0.
    let d = work.join("resume-anchor");
    let script = format!(
        "set -e; umoci init --layout {d}/layout; umoci new --image {d}/layout:disk; \
         umoci unpack --image {d}/layout:disk {d}/bundle >/dev/null; mkdir {d}/bundle/rootfs/disk; cp {disk} {d}/bundle/rootfs/disk/disk.img; \
         umoci repack --image {d}/layout:disk {d}/bundle",
        d = d.display(),
        disk = disk.display()
    );
    Cmd::new("bash").args(["-c", &script]).quiet().read()?;
    let proxy = FaultProxy::start(&registry.addr);
    // The blobs skopeo uploads: the config and the layer; the cut is half way through the layer.
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("layout/index.json"))?)?;
    let blob = |digest: &str| d.join("layout/blobs/sha256").join(digest.trim_start_matches("sha256:"));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(index["manifests"][0]["digest"].as_str().context("anchor index")?))?)?;
    let layer = manifest["layers"][0]["size"].as_u64().context("anchor layer")?;
    let pushed = layer + manifest["config"]["size"].as_u64().unwrap_or(0);
    let rule = proxy.add(Rule::new(Some("PATCH"), "/blobs/uploads/", Fault::DropAfterRequestBytes(layer / 2)));
    let copied = Cmd::new("skopeo")
        .args(["copy", "--quiet", "--retry-times", "1", "--dest-tls-verify=false"])
        .arg(format!("oci:{}/layout:disk", d.display()))
        .arg(format!("docker://{}/bench/resume-anchor:v1", proxy.addr()))
        .quiet()
        .read();
    let sent = upload_bytes(&proxy);
    let anchor_row = match copied {
        _ if proxy.fired(rule) != 1 => "(the drop did not fire)".to_string(),
        Ok(_) => sent.saturating_sub(pushed).to_string(),
        // skopeo 1.9 does not retry a broken pipe: the user runs it again.
        Err(_) => match Cmd::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}/layout:disk", d.display()))
            .arg(format!("docker://{}/bench/resume-anchor:v1", proxy.addr()))
            .quiet()
            .read()
        {
            Ok(_) => format!("{} (failed; run again)", upload_bytes(&proxy).saturating_sub(pushed)),
            Err(e) => format!("failed twice: {}", e.to_string().lines().last().unwrap_or_default()),
        },
    };
    for (name, resent, of, restarts) in rows {
        println!("{name:<64} {resent:>14} {:>8.1}% {restarts:>10}", 100.0 * resent as f64 / of as f64);
    }
    let pct = anchor_row
        .split_whitespace()
        .next()
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(String::from("-"), |n| format!("{:.1}%", 100.0 * n as f64 / layer as f64));
    println!("{:<64} {:>14} {:>9} {:>10}", "skopeo copy --retry-times 1, cut at 50% of its one PATCH", anchor_row, pct, "1");
    println!("(docker-registry 2.8 cancels an upload session that received part of a cut PATCH, so a mid-chunk cut starts over there)");
    std::fs::remove_dir_all(&d)?;
    Ok(())
}

/// What a node pays to pull each layer compression: the blob's size and the
/// time to fetch it from the loopback registry and decompress it (what
/// containerd does before the disk file exists), and from those the time at
/// two link speeds (transfer plus decompression, not overlapped: an upper bound).
fn pull_costs(registry: &Registry, runs: usize, variants: &[&str]) -> anyhow::Result<()> {
    println!();
    println!("pulling the layer (loopback fetch + decompress to /dev/null, median of {runs}); estimated at 1 Gbit/s and 100 Mbit/s");
    println!("{:<10} {:>12} {:>14} {:>12} {:>14}", "layer", "bytes", "fetch+decomp", "at 1 Gbit/s", "at 100 Mbit/s");
    for c in variants {
        let repo = format!("bench/ours-{c}-0");
        let url = format!("http://{}/v2/{repo}/manifests/v1", registry.addr);
        let manifest: serde_json::Value =
            serde_json::from_str(&Cmd::new("curl").args(["-sf", "-H", "Accept: application/vnd.oci.image.manifest.v1+json", &url]).quiet().read()?)?;
        let layer = &manifest["layers"][0];
        let (digest, bytes) = (layer["digest"].as_str().context("layer digest")?, layer["size"].as_u64().context("layer size")?);
        let decompress = match *c {
            "zstd" => "zstd -dc",
            "gzip" => "gzip -dc",
            _ => "cat",
        };
        let blob = format!("http://{}/v2/{repo}/blobs/{digest}", registry.addr);
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            Cmd::new("bash").args(["-c", &format!("set -o pipefail; curl -sf {blob} | {decompress} > /dev/null")]).quiet().read()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let local = median(&times);
        let at = |bits_per_s: f64| bytes as f64 * 8.0 / bits_per_s + local;
        println!("{c:<10} {bytes:>12} {local:>13.2}s {:>11.2}s {:>13.2}s", at(1e9), at(1e8));
    }
    Ok(())
}
