//! The disk section of `cargo xtask bench`: registry image to a bare ext4
//! filesystem image (`--table none`, what Firecracker boots as /dev/vda),
//! four pipelines side by side, alternating, from the same local registry:
//!
//! - ours: `osbuilder disk --table none` with the CLI's other defaults (auto
//!   size, 10% headroom, journal) and a cold blob cache every run;
//! - anchor (Kata's image builder and hand-made Firecracker rootfs scripts,
//!   minus mounting as root): `skopeo copy` to an OCI layout, `umoci unpack`,
//!   `truncate` + `mke2fs -t ext4 -b 4096 -d rootfs` at the size of our
//!   filesystem;
//! - floor: fetch every layer blob and decompress it to /dev/null, in
//!   sequence: no tool that reads the image can beat it;
//! - rival: `curl blob | gzip -dc | mke2fs -d -` (e2fsprogs >= 1.47.1 reads a
//!   tar stream; from bookworm-backports through ci/e2fsprogs-backports.sh),
//!   possible only on a single-layer image, at the same size.
//!
//! `e2fsck -fn` on every image produced, outside the timing. Wall times are
//! medians; the targets are printed beside the figures, nothing asserts.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _};

use crate::bench::{identical, median, tempdir, timed, Registry, Sample};
use crate::image::base_image;
use crate::util::{project_root, Cmd};

const ACCEPT: &str = "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// One pipeline's samples, the `e2fsck -fn` verdicts of its images, and why
/// it stopped (or could not start).
#[derive(Default)]
struct Row {
    samples: Vec<Sample>,
    clean: Vec<bool>,
    fsck_note: Option<String>,
    fs: Option<FsInfo>,
    failure: Option<String>,
}

impl Row {
    fn unavailable(why: String) -> Row {
        Row { failure: Some(why), ..Row::default() }
    }
    fn median(&self) -> Option<f64> {
        (!self.samples.is_empty()).then(|| median(&self.samples))
    }
    /// Records one timed run that made `img`, or why it failed.
    fn record(&mut self, run: anyhow::Result<Sample>, img: &Path) {
        match run {
            Ok(s) => {
                self.samples.push(s);
                self.check(img);
            }
            Err(e) => self.failure = Some(format!("failed: {}", short(&e))),
        }
    }

    /// Records an image: its `e2fsck -fn` verdict and (once) its geometry.
    fn check(&mut self, img: &Path) {
        let (clean, note) = fsck(img);
        self.clean.push(clean);
        if !clean && self.fsck_note.is_none() {
            self.fsck_note = Some(note);
        }
        if self.fs.is_none() {
            self.fs = fs_info(img);
        }
    }
}

/// What `dumpe2fs -h` says about a filesystem.
struct FsInfo {
    bytes: u64,
    used: u64,
    inodes: u64,
}

fn fs_info(img: &Path) -> Option<FsInfo> {
    let out = Command::new("dumpe2fs").arg("-h").arg(img).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| -> Option<u64> { text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':').map(|v| v.trim().parse().ok()))? };
    let (blocks, free, bs) = (field("Block count")?, field("Free blocks")?, field("Block size")?);
    Some(FsInfo { bytes: blocks * bs, used: (blocks - free) * bs, inodes: field("Inode count")? })
}

/// `e2fsck -fn`: clean when it exits 0; otherwise its first complaint.
fn fsck(img: &Path) -> (bool, String) {
    match Command::new("e2fsck").arg("-fn").arg(img).stdin(Stdio::null()).output() {
        Ok(o) if o.status.success() => (true, String::new()),
        Ok(o) => {
            let all = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            let first = all.lines().skip(1).find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            (false, format!("e2fsck -fn {}: {first}", o.status))
        }
        Err(e) => (false, format!("cannot run e2fsck: {e}")),
    }
}

/// The decompressor of a layer media type, as a shell command reading stdin.
fn decompressor(media_type: &str) -> anyhow::Result<&'static str> {
    Ok(if media_type.ends_with("gzip") {
        "gzip -dc"
    } else if media_type.ends_with("zstd") {
        "zstd -dc"
    } else if media_type.ends_with(".tar") {
        "cat"
    } else {
        bail!("layer media type {media_type}: no decompressor known")
    })
}

/// The error's last line (a script's own message), for a table row.
fn short(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Times a shell script that produces no file.
fn timed_script(script: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    Cmd::new("bash").args(["-c", script]).quiet().read()?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(osbuilder: &Path, runs: usize) -> anyhow::Result<()> {
    let base = base_image()?;
    let work = tempdir()?;
    let registry = Registry::start(&work.join("registry"))?;
    let image = registry.push_base(&base)?;
    let repo = "library/debian";
    let manifest_url = format!("http://{}/v2/{repo}/manifests/bookworm", registry.addr);
    let manifest: serde_json::Value =
        serde_json::from_str(&Cmd::new("curl").args(["-sf", "-H", ACCEPT, &manifest_url]).quiet().read()?).context("the registry's manifest")?;
    let mut layers = Vec::new();
    for l in manifest["layers"].as_array().context("the manifest has no layers")? {
        let digest = l["digest"].as_str().context("a layer without a digest")?;
        let media = l["mediaType"].as_str().unwrap_or("");
        layers.push((format!("http://{}/v2/{repo}/blobs/{digest}", registry.addr), decompressor(media)?, l["size"].as_u64().unwrap_or(0)));
    }
    let blob_bytes: u64 = layers.iter().map(|l| l.2).sum();
    eprintln!("bench: image {image} ({} layer(s), {} MB compressed), {runs} runs each, alternating", layers.len(), blob_bytes / 1_000_000);

    // The rival needs e2fsprogs >= 1.47.1 and one tar stream.
    let rival_mke2fs: Result<PathBuf, String> = if layers.len() != 1 {
        Err(format!("the image has {} layers; mke2fs -d - reads one tar stream and knows no whiteouts", layers.len()))
    } else {
        match Cmd::new("bash").arg(project_root().join("ci/e2fsprogs-backports.sh")).quiet().read() {
            Ok(p) => Ok(PathBuf::from(p.trim())),
            Err(e) => Err(format!("no e2fsprogs >= 1.47.1: {}", short(&e))),
        }
    };
    let rival_version = rival_mke2fs.as_ref().ok().and_then(|m| {
        let out = Command::new(m).arg("-V").output().ok()?;
        String::from_utf8_lossy(&out.stderr).split_whitespace().nth(1).map(str::to_string)
    });

    let mut ours = Row::default();
    let mut ours_reports: Vec<serde_json::Value> = Vec::new();
    let mut anchor = Row::default();
    let mut floor = Row::default();
    let mut rival = match &rival_mke2fs {
        Ok(_) => Row::default(),
        Err(why) => Row::unavailable(why.clone()),
    };
    // The size every other image gets: our auto-sized filesystem's (run 0).
    let mut size: Option<u64> = None;

    for run in 0..runs {
        // Ours, cold cache: pulls every time, like skopeo.
        let cache = work.join(format!("cache-{run}"));
        let out = work.join(format!("ours-{run}.img"));
        let report = work.join(format!("ours-{run}.json"));
        ours.samples.push(timed(
            Cmd::new(osbuilder)
                .args(["disk", "--quiet", "--image", &format!("docker://{image}"), "--table", "none", "-o"])
                .arg(&out)
                .arg("--report")
                .arg(&report)
                .arg("--cache-dir")
                .arg(&cache),
            &out,
        )?);
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&report)?).context("our --report")?;
        let fs_size = r["disk"]["partition"]["size"].as_u64().context("no disk.partition.size in our report")?;
        ours_reports.push(r);
        let size = *size.get_or_insert(fs_size);
        ours.check(&out);
        std::fs::remove_file(&out)?;
        std::fs::remove_dir_all(&cache)?;
        if !size.is_multiple_of(4096) {
            bail!("our filesystem size {size} is not a multiple of 4096");
        }
        let blocks = size / 4096;

        // Anchor: skopeo + umoci + mke2fs -d, at our size.
        if anchor.failure.is_none() {
            let dir = work.join(format!("anchor-{run}"));
            std::fs::create_dir_all(&dir)?;
            let img = dir.join("rootfs.img");
            let script = format!(
                "set -e; skopeo copy --quiet --src-tls-verify=false docker://{image} oci:{d}/layout:bookworm; \
                 umoci unpack --image {d}/layout:bookworm {d}/bundle >/dev/null; \
                 truncate -s {size} {img}; mke2fs -q -t ext4 -b 4096 -d {d}/bundle/rootfs {img} {blocks}",
                d = dir.display(),
                img = img.display()
            );
            anchor.record(timed(Cmd::new("bash").args(["-c", &script]), &img), &img);
            std::fs::remove_dir_all(&dir)?;
        }

        // Floor: fetch and decompress every layer to /dev/null, in sequence.
        if floor.failure.is_none() {
            let mut script = format!("set -e -o pipefail; curl -sf -H '{ACCEPT}' {manifest_url} >/dev/null");
            for (url, dec, _) in &layers {
                script += &format!("; curl -sf {url} | {dec} >/dev/null");
            }
            match timed_script(&script) {
                Ok(seconds) => floor.samples.push(Sample { seconds, bytes: 0, sha256: String::new() }),
                Err(e) => floor.failure = Some(format!("failed: {}", short(&e))),
            }
        }

        // Rival: the layer's tar stream straight into mke2fs -d -, at our size.
        if let (Ok(mke2fs), None) = (&rival_mke2fs, &rival.failure) {
            let img = work.join(format!("rival-{run}.img"));
            let (url, dec, _) = &layers[0];
            let script = format!(
                "set -e -o pipefail; curl -sf -H '{ACCEPT}' {manifest_url} >/dev/null; truncate -s {size} {img}; \
                 curl -sf {url} | {dec} | {mke2fs} -q -t ext4 -b 4096 -d - {img} {blocks}",
                img = img.display(),
                mke2fs = mke2fs.display()
            );
            rival.record(timed(Cmd::new("bash").args(["-c", &script]), &img), &img);
            let _ = std::fs::remove_file(&img);
        }
    }
    // The dm-verity rows, on the same registry image (printed first).
    let verity = crate::bench_verity::run(osbuilder, &image, &work, runs);
    let qcow2 = run_qcow2(osbuilder, &image, &work, runs);
    drop(registry);
    std::fs::remove_dir_all(&work)?;
    verity?;

    let size = size.unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!();
    println!("registry image -> bare ext4 image (--table none), Debian bookworm minbase, {runs} runs each (median wall seconds)");
    println!("(one machine, {cores} cores; anything else running on it makes these figures noisy)");
    println!(
        "{:<46} {:>8} {:>11} {:>11} {:>11} {:>8} {:>9} {:>9}",
        "pipeline", "median", "file bytes", "fs bytes", "used bytes", "inodes", "e2fsck", "identical"
    );
    let row = |name: &str, r: &Row, file_bytes: bool| {
        let Some(m) = r.median() else {
            println!("{name:<46} {:>8}  {}", "-", r.failure.as_deref().unwrap_or("no sample"));
            return;
        };
        let fs = r.fs.as_ref();
        let num = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        let clean = if r.clean.is_empty() { "-".to_string() } else { format!("{}/{} ok", r.clean.iter().filter(|c| **c).count(), r.clean.len()) };
        println!(
            "{:<46} {:>8.2} {:>11} {:>11} {:>11} {:>8} {:>9} {:>9}",
            name,
            m,
            if file_bytes { num(r.samples.last().map(|s| s.bytes)) } else { "-".into() },
            num(fs.map(|f| f.bytes)),
            num(fs.map(|f| f.used)),
            num(fs.map(|f| f.inodes)),
            clean,
            if !file_bytes {
                "-"
            } else if r.samples.len() < 2 {
                "n/a"
            } else if identical(&r.samples) {
                "yes"
            } else {
                "no"
            }
        );
        if let Some(note) = &r.fsck_note {
            println!("{:<46} not clean: {note}", "");
        }
        if let Some(f) = &r.failure {
            println!("{:<46} stopped after {} run(s): {f}", "", r.samples.len());
        }
    };
    row("ours: osbuilder disk --table none (cold cache)", &ours, true);
    row("anchor: skopeo+umoci+mke2fs -d DIR", &anchor, true);
    row("floor: curl blob | gzip -dc > /dev/null", &floor, false);
    let rival_name = format!("rival: curl | gzip -dc | mke2fs {} -d -", rival_version.as_deref().unwrap_or(">=1.47.1"));
    row(&rival_name, &rival, true);
    println!("(anchor and rival are made at our filesystem's size, {size} bytes; ours auto-sizes: content + metadata + 10% headroom)");

    let split = |k: &str| {
        let v: Vec<Sample> =
            ours_reports.iter().filter_map(|r| r["seconds"][k].as_f64()).map(|seconds| Sample { seconds, bytes: 0, sha256: String::new() }).collect();
        if v.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2}", median(&v))
        }
    };
    println!("ours, from its --report (medians): resolve {} s, layers {} s, write {} s", split("resolve"), split("layers"), split("write"));

    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    };
    let (o, a, f, r) = (ours.median(), anchor.median(), floor.median(), rival.median());
    println!("{:<46} {:>8}   target >= 3x (ours 3x faster than the anchor)", "anchor / ours", ratio(a, o));
    println!("{:<46} {:>8}   target <= 1.5x (ours within 1.5x of the floor)", "ours / floor", ratio(o, f));
    println!("{:<46} {:>8}   (> 1: ours is faster than mke2fs reading the tar stream)", "rival / ours", ratio(r, o));
    let (qcow2_text, ends) = qcow2?;
    print!("{qcow2_text}");
    // The pipeline others run end to end: the ext4 anchor above, then
    // qemu-img convert.
    for (name, ours_q, convert) in ends {
        let anchor_end = a.zip(convert).map(|(a, c)| a + c);
        println!(
            "{:<52} {:>8}   target >= 2x (skopeo+umoci+mke2fs -d + qemu-img convert, against ours)",
            format!("anchor / ours ({name}, end to end)"),
            ratio(anchor_end, ours_q)
        );
    }
    Ok(())
}

/// One qcow2 pipeline's samples and `qemu-img check` verdicts.
#[derive(Default)]
struct Qcow2Row {
    samples: Vec<Sample>,
    /// Seconds of the raw build alone (the anchor's first step).
    raw_seconds: Vec<Sample>,
    /// Seconds of `qemu-img convert` alone (the anchor's second step).
    convert_seconds: Vec<Sample>,
    clean: Vec<bool>,
    note: Option<String>,
    failure: Option<String>,
}

impl Qcow2Row {
    fn check(&mut self, img: &Path) {
        match Cmd::new("qemu-img").args(["check", "-q", "-f", "qcow2"]).arg(img).quiet().read() {
            Ok(_) => self.clean.push(true),
            Err(e) => {
                self.clean.push(false);
                self.note.get_or_insert(short(&e));
            }
        }
    }
}

/// The qcow2 rows: registry image to a qcow2 disk (Kata's MBR layout, auto
/// size), ours (`osbuilder disk --format qcow2`, with and without
/// `--qcow2-compress`) against the anchor, `osbuilder disk` raw followed by
/// `qemu-img convert -O qcow2` (and `-c`). Cold blob cache for every run of
/// both; `qemu-img check` of every image outside the timing.
/// Returns the table and, per variant, (name, our median, the median of
/// `qemu-img convert` alone) for the end-to-end comparison with the ext4
/// anchor.
/// A row of the end-to-end comparison: its name, seconds and bytes (when measured).
pub type EndToEndRow = (String, Option<f64>, Option<f64>);

pub fn run_qcow2(osbuilder: &Path, image: &str, work: &Path, runs: usize) -> anyhow::Result<(String, Vec<EndToEndRow>)> {
    use std::fmt::Write as _;
    let mut rows: Vec<(String, Qcow2Row)> = Vec::new();
    let variants: [(&str, bool); 2] = [("qcow2", false), ("qcow2 -c", true)];
    for (name, _) in variants {
        rows.push((format!("ours: osbuilder disk --format {name}"), Qcow2Row::default()));
        rows.push((format!("anchor: osbuilder raw + qemu-img convert -O {name}"), Qcow2Row::default()));
    }
    let disk = |cache: &Path, out: &Path, extra: &[&str]| {
        Cmd::new(osbuilder).args(["disk", "--quiet", "--image", &format!("docker://{image}"), "-o"]).arg(out).args(extra).arg("--cache-dir").arg(cache)
    };
    for run in 0..runs {
        for (v, (_, compress)) in variants.iter().enumerate() {
            // Ours.
            let cache = work.join(format!("qcow2-cache-{run}-{v}"));
            let out = work.join(format!("ours-{run}-{v}.qcow2"));
            let extra: &[&str] = if *compress { &["--format", "qcow2", "--qcow2-compress"] } else { &["--format", "qcow2"] };
            let row = &mut rows[2 * v].1;
            if row.failure.is_none() {
                match timed(disk(&cache, &out, extra), &out) {
                    Ok(s) => {
                        row.samples.push(s);
                        row.check(&out);
                    }
                    Err(e) => row.failure = Some(format!("failed: {}", short(&e))),
                }
            }
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_dir_all(&cache);

            // Anchor: raw, then qemu-img convert.
            let row = &mut rows[2 * v + 1].1;
            if row.failure.is_none() {
                let raw = work.join(format!("anchor-{run}-{v}.img"));
                let out = work.join(format!("anchor-{run}-{v}.qcow2"));
                let result = timed(disk(&cache, &raw, &[]), &raw).and_then(|r| {
                    let mut convert = Cmd::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]);
                    if *compress {
                        convert = convert.arg("-c");
                    }
                    let c = timed(convert.arg(&raw).arg(&out), &out)?;
                    Ok((r, c))
                });
                match result {
                    Ok((r, c)) => {
                        row.samples.push(Sample { seconds: r.seconds + c.seconds, bytes: c.bytes, sha256: c.sha256 });
                        row.raw_seconds.push(r);
                        row.convert_seconds.push(Sample { seconds: c.seconds, bytes: 0, sha256: String::new() });
                        row.check(&out);
                    }
                    Err(e) => row.failure = Some(format!("failed: {}", short(&e))),
                }
                let _ = std::fs::remove_file(&raw);
                let _ = std::fs::remove_file(&out);
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
    }

    let mut text = String::new();
    writeln!(text)?;
    writeln!(text, "registry image -> qcow2 disk (MBR, auto size), Debian bookworm minbase, {runs} runs each (median wall seconds, cold blob cache)")?;
    writeln!(text, "{:<52} {:>8} {:>8} {:>11} {:>12} {:>9}", "pipeline", "median", "raw step", "file bytes", "qemu-img ck", "identical")?;
    for (name, r) in &rows {
        if r.samples.is_empty() {
            writeln!(text, "{name:<52} {:>8}  {}", "-", r.failure.as_deref().unwrap_or("no sample"))?;
            continue;
        }
        let raw_step = if r.raw_seconds.is_empty() { "-".to_string() } else { format!("{:.2}", median(&r.raw_seconds)) };
        writeln!(
            text,
            "{:<52} {:>8.2} {:>8} {:>11} {:>12} {:>9}",
            name,
            median(&r.samples),
            raw_step,
            r.samples.last().map_or(0, |s| s.bytes),
            format!("{}/{} ok", r.clean.iter().filter(|c| **c).count(), r.clean.len()),
            if r.samples.len() < 2 {
                "n/a"
            } else if identical(&r.samples) {
                "yes"
            } else {
                "no"
            }
        )?;
        if let Some(note) = &r.note {
            writeln!(text, "{:<52} not clean: {note}", "")?;
        }
        if let Some(f) = &r.failure {
            writeln!(text, "{:<52} stopped after {} run(s): {f}", "", r.samples.len())?;
        }
    }
    let med = |i: usize| (!rows[i].1.samples.is_empty()).then(|| median(&rows[i].1.samples));
    for (v, (name, _)) in variants.iter().enumerate() {
        let ratio = match (med(2 * v + 1), med(2 * v)) {
            (Some(a), Some(o)) if o > 0.0 => format!("{:.2}x", a / o),
            _ => "-".into(),
        };
        writeln!(text, "{:<52} {:>8}   (our raw build + qemu-img convert, against ours in one pass)", format!("raw+convert / ours ({name})"), ratio)?;
    }
    let ends = variants
        .iter()
        .enumerate()
        .map(|(v, (name, _))| {
            let convert = &rows[2 * v + 1].1.convert_seconds;
            (name.to_string(), med(2 * v), (!convert.is_empty()).then(|| median(convert)))
        })
        .collect();
    Ok((text, ends))
}
