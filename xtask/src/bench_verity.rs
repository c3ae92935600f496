//! The dm-verity rows of `cargo xtask bench --only disk` (called from
//! `bench_disk::run` with its registry image), alternating runs:
//!
//! - ours: `osbuilder disk --verity` (MBR, data on partition 1, hash tree on
//!   partition 2, cold blob cache), and the same without `--verity`, whose
//!   difference is what the hash tree costs us;
//! - anchor: the ext4 anchor (`skopeo copy` + `umoci unpack` + `mke2fs -t
//!   ext4 -b 4096 -d` at our filesystem's size) followed by `veritysetup
//!   format --no-superblock` of the filesystem into a hash file, as Kata's
//!   image builder does;
//! - hashing alone: `veritysetup format --no-superblock` (with our salt) of
//!   our own filesystem partition, copied out: its root hash must be ours.
//!
//! Medians and throughput (filesystem bytes per second of hashing) are
//! printed beside the target (anchor / ours >= 2x); nothing asserts.

use std::path::Path;
use std::time::Instant;

use anyhow::Context as _;

use crate::bench::{identical, median, timed, Sample};
use crate::util::Cmd;

fn med(v: &[Sample]) -> Option<f64> {
    (!v.is_empty()).then(|| median(v))
}

/// Root hash from `veritysetup format` output.
fn root_hash(text: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix("Root hash:").map(|r| r.trim().to_string()))
}

pub fn run(osbuilder: &Path, image: &str, work: &Path, runs: usize) -> anyhow::Result<()> {
    let mut ours = Vec::new();
    let mut plain = Vec::new();
    let mut anchor = Vec::new();
    let mut hashing = Vec::new();
    let mut our_hashing = Vec::new();
    let mut agree = Vec::new();
    let mut fs_bytes = 0u64;
    let mut hash_bytes = 0u64;
    for run in 0..runs {
        // Ours with --verity, cold cache.
        let cache = work.join(format!("verity-cache-{run}"));
        let out = work.join(format!("verity-ours-{run}.img"));
        let report = work.join(format!("verity-ours-{run}.json"));
        ours.push(timed(
            Cmd::new(osbuilder)
                .args(["disk", "--quiet", "--verity", "--image", &format!("docker://{image}"), "-o"])
                .arg(&out)
                .arg("--report")
                .arg(&report)
                .arg("--cache-dir")
                .arg(&cache),
            &out,
        )?);
        std::fs::remove_dir_all(&cache)?;
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?).context("our --report")?;
        let v = &r["disk"]["verity"];
        let ours_root = v["root_hash"].as_str().context("no disk.verity.root_hash")?.to_string();
        let salt = v["salt"].as_str().context("no disk.verity.salt")?.to_string();
        let part = &r["disk"]["partition"];
        let (offset, size) = (part["offset"].as_u64().context("offset")?, part["size"].as_u64().context("size")?);
        fs_bytes = size;
        if let Some(seconds) = v["hash_seconds"].as_f64() {
            our_hashing.push(Sample { seconds, bytes: size, sha256: String::new() });
        }
        hash_bytes = v["hash_partition"]["size"].as_u64().unwrap_or(0);

        // veritysetup format of our own filesystem, copied out (outside the timing).
        let data = work.join(format!("verity-data-{run}.img"));
        let hash = work.join(format!("verity-hash-{run}.img"));
        Cmd::new("dd")
            .arg(format!("if={}", out.display()))
            .arg(format!("of={}", data.display()))
            .args(["bs=1M", "iflag=skip_bytes,count_bytes", "conv=sparse", "status=none"])
            .arg(format!("skip={offset}"))
            .arg(format!("count={size}"))
            .quiet()
            .run()?;
        std::fs::remove_file(&out)?;
        let t = Instant::now();
        let text = Cmd::new("veritysetup")
            .args(["format", "--no-superblock", "--hash", "sha256", "--data-block-size", "4096", "--hash-block-size", "4096", "--salt", &salt])
            .arg(&data)
            .arg(&hash)
            .quiet()
            .read()?;
        hashing.push(Sample { seconds: t.elapsed().as_secs_f64(), bytes: size, sha256: String::new() });
        agree.push(root_hash(&text).as_deref() == Some(ours_root.as_str()));
        std::fs::remove_file(&data)?;
        std::fs::remove_file(&hash)?;

        // Ours without --verity: the difference is the hash tree's cost.
        let cache = work.join(format!("plain-cache-{run}"));
        let out = work.join(format!("plain-ours-{run}.img"));
        plain.push(timed(
            Cmd::new(osbuilder).args(["disk", "--quiet", "--image", &format!("docker://{image}"), "-o"]).arg(&out).arg("--cache-dir").arg(&cache),
            &out,
        )?);
        std::fs::remove_dir_all(&cache)?;
        std::fs::remove_file(&out)?;

        // Anchor: skopeo + umoci + mke2fs -d at our size + veritysetup format.
        let dir = work.join(format!("verity-anchor-{run}"));
        std::fs::create_dir_all(&dir)?;
        let img = dir.join("rootfs.img");
        let script = format!(
            "set -e; skopeo copy --quiet --src-tls-verify=false docker://{image} oci:{d}/layout:bookworm; \
             umoci unpack --image {d}/layout:bookworm {d}/bundle >/dev/null; \
             truncate -s {size} {img}; mke2fs -q -t ext4 -b 4096 -d {d}/bundle/rootfs {img} {blocks}; \
             veritysetup format --no-superblock {img} {d}/rootfs.hash >/dev/null",
            d = dir.display(),
            img = img.display(),
            blocks = size / 4096
        );
        anchor.push(timed(Cmd::new("bash").args(["-c", &script]), &img)?);
        std::fs::remove_dir_all(&dir)?;
    }

    let (o, p, a, h) = (med(&ours), med(&plain), med(&anchor), med(&hashing));
    let secs = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
    let mbps = |s: Option<f64>| match s {
        Some(s) if s > 0.0 => format!("{:.0} MB/s", fs_bytes as f64 / s / 1e6),
        _ => "-".to_string(),
    };
    println!();
    println!("dm-verity: registry image -> MBR disk with the hash tree on partition 2, {runs} runs each (median wall seconds)");
    println!("filesystem {fs_bytes} bytes ({} blocks of 4 KiB), hash partition {hash_bytes} bytes", fs_bytes / 4096);
    println!("{:<58} {:>8} {:>11}", "pipeline", "median", "identical");
    let ident = |v: &[Sample]| {
        if v.len() < 2 {
            "n/a"
        } else if identical(v) {
            "yes"
        } else {
            "no"
        }
    };
    println!("{:<58} {:>8} {:>11}", "ours: osbuilder disk --verity (cold cache)", secs(o), ident(&ours));
    println!("{:<58} {:>8} {:>11}", "ours without --verity (cold cache)", secs(p), ident(&plain));
    println!("{:<58} {:>8} {:>11}", "anchor: skopeo+umoci+mke2fs -d + veritysetup format", secs(a), "-");
    println!("{:<58} {:>8} {:>11}", "veritysetup format of our filesystem alone", secs(h), "-");
    let oh = med(&our_hashing);
    let marginal = match (o, p) {
        (Some(o), Some(p)) => format!("{:+.2}", o - p),
        _ => "-".to_string(),
    };
    println!(
        "hashing: ours {} s in the tap ({} of filesystem; run time with - without --verity: {marginal} s), veritysetup format {} s ({}); root hashes agree {}/{}",
        secs(oh),
        mbps(oh),
        secs(h),
        mbps(h),
        agree.iter().filter(|a| **a).count(),
        agree.len()
    );
    let ratio = match (a, o) {
        (Some(a), Some(o)) if o > 0.0 => format!("{:.2}x", a / o),
        _ => "-".to_string(),
    };
    println!("{:<58} {:>8}   target >= 2x (ours 2x faster than the anchor)", "anchor / ours (with verity)", ratio);
    Ok(())
}
