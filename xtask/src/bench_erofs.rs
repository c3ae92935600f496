//! The erofs rows of `cargo xtask bench --only disk`: registry image to a
//! bare erofs image, ours against the pipeline others use, alternating, from
//! the same local registry:
//!
//! - ours: `osbuilder disk --fs erofs --table none` uncompressed, with
//!   `--compress lz4` and with `--compress lz4hc`, a cold blob cache each run;
//! - anchor (Kata's image builder and containerd's erofs differ): `skopeo
//!   copy` to an OCI layout, `umoci unpack`, `mkfs.erofs -T0` on the rootfs,
//!   uncompressed and with `-zlz4` / `-zlz4hc` (erofs-utils, Debian's 1.5).
//!
//! `fsck.erofs` checks every image produced, outside the timing. Wall times
//! are medians; targets are printed beside the figures, nothing asserts.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::Context as _;

use crate::bench::{identical, median, tempdir, timed, Registry, Sample};
use crate::image::base_image;
use crate::util::Cmd;

#[derive(Default)]
struct Row {
    samples: Vec<Sample>,
    fsck_ok: usize,
    fsck_note: Option<String>,
    failure: Option<String>,
}

impl Row {
    fn record(&mut self, run: anyhow::Result<Sample>, img: &Path) {
        match run {
            Ok(s) => {
                self.samples.push(s);
                match fsck(img) {
                    Ok(()) => self.fsck_ok += 1,
                    Err(note) => self.fsck_note = self.fsck_note.take().or(Some(note)),
                }
            }
            Err(e) => self.failure = Some(format!("failed: {e:#}").lines().last().unwrap_or("").to_string()),
        }
        let _ = std::fs::remove_file(img);
    }
    fn median(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| median(&self.samples))
    }
    fn bytes(&self) -> Option<u64> {
        self.samples.last().map(|s| s.bytes)
    }
}

fn fsck(img: &Path) -> Result<(), String> {
    let out = Command::new("fsck.erofs").arg(img).stdin(Stdio::null()).output().map_err(|e| format!("cannot run fsck.erofs: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() && !text.contains("<E>") {
        Ok(())
    } else {
        Err(format!("fsck.erofs {}: {}", out.status, text.lines().find(|l| l.contains("<E>")).unwrap_or("").trim()))
    }
}

/// (row label, osbuilder --compress, mkfs.erofs flags)
const VARIANTS: [(&str, &str, &str); 3] = [("plain", "none", ""), ("lz4", "lz4", "-zlz4"), ("lz4hc", "lz4hc", "-zlz4hc")];

pub fn run(osbuilder: &Path, runs: usize) -> anyhow::Result<()> {
    let base = base_image()?;
    let work = tempdir()?;
    let registry = Registry::start(&work.join("registry"))?;
    let image = registry.push_base(&base)?;
    eprintln!("bench: erofs from {image}, {runs} runs each, alternating");
    let mut ours: Vec<Row> = VARIANTS.iter().map(|_| Row::default()).collect();
    let mut anchor: Vec<Row> = VARIANTS.iter().map(|_| Row::default()).collect();
    for run in 0..runs {
        for (i, (label, compress, mkfs_flags)) in VARIANTS.iter().enumerate() {
            let cache = work.join(format!("cache-{run}-{label}"));
            let out = work.join(format!("ours-{run}-{label}.erofs"));
            let cmd = Cmd::new(osbuilder)
                .args(["disk", "--quiet", "--image", &format!("docker://{image}"), "--fs", "erofs", "--compress", compress])
                .args(["--table", "none", "-o"])
                .arg(&out)
                .arg("--cache-dir")
                .arg(&cache);
            ours[i].record(timed(cmd, &out), &out);
            std::fs::remove_dir_all(&cache).with_context(|| format!("removing {}", cache.display()))?;

            let dir = work.join(format!("anchor-{run}-{label}"));
            std::fs::create_dir_all(&dir)?;
            let img = dir.join("rootfs.erofs");
            let script = format!(
                "set -e; skopeo copy --quiet --src-tls-verify=false docker://{image} oci:{d}/layout:bookworm; \
                 umoci unpack --image {d}/layout:bookworm {d}/bundle >/dev/null; \
                 mkfs.erofs -T0 {mkfs_flags} {img} {d}/bundle/rootfs >/dev/null",
                d = dir.display(),
                img = img.display()
            );
            anchor[i].record(timed(Cmd::new("bash").args(["-c", &script]), &img), &img);
            std::fs::remove_dir_all(&dir)?;
        }
    }
    drop(registry);
    std::fs::remove_dir_all(&work)?;

    println!();
    println!("registry image -> bare erofs image, Debian bookworm minbase, {runs} runs each (median wall seconds)");
    println!("{:<52} {:>8} {:>11} {:>10} {:>9}", "pipeline", "median", "bytes", "fsck.erofs", "identical");
    let row = |name: &str, r: &Row| match r.median() {
        None => println!("{name:<52} {:>8}  {}", "-", r.failure.as_deref().unwrap_or("no sample")),
        Some(m) => {
            println!(
                "{:<52} {:>8.2} {:>11} {:>10} {:>9}",
                name,
                m,
                r.bytes().map_or("-".into(), |b| b.to_string()),
                format!("{}/{} ok", r.fsck_ok, r.samples.len()),
                if r.samples.len() < 2 {
                    "n/a"
                } else if identical(&r.samples) {
                    "yes"
                } else {
                    "no"
                }
            );
            if let Some(n) = &r.fsck_note {
                println!("{:<52} not clean: {n}", "");
            }
        }
    };
    for (i, (label, compress, mkfs_flags)) in VARIANTS.iter().enumerate() {
        row(&format!("ours: osbuilder disk --fs erofs --compress {compress}"), &ours[i]);
        row(&format!("anchor: skopeo+umoci+mkfs.erofs {mkfs_flags} ({label})"), &anchor[i]);
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".into(),
    };
    for (i, (label, _, _)) in VARIANTS.iter().enumerate() {
        let (o, a) = (&ours[i], &anchor[i]);
        let size = match (o.bytes(), a.bytes()) {
            (Some(x), Some(y)) if y > 0 => format!("{:+.1}%", (x as f64 / y as f64 - 1.0) * 100.0),
            _ => "-".into(),
        };
        println!(
            "{:<52} {:>8}   target >= 2x; size ours vs mkfs.erofs {size}{}",
            format!("erofs {label}: anchor / ours"),
            ratio(a.median(), o.median()),
            if *label == "lz4hc" { " (target within +10%)" } else { "" }
        );
    }
    Ok(())
}
