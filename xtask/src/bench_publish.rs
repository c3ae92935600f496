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
//! rusage). Nothing asserts on time.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::bench::{tempdir, Registry};
use crate::image::base_image;
use crate::util::Cmd;

struct Run {
    seconds: f64,
    bytes_sent: u64,
    peak_rss_mib: u64,
    digest: String,
}

/// Runs `cmd` (its stdout captured) and measures it with wait4.
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

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
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

    drop(registry);
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
