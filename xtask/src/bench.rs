//! `cargo xtask bench`: our pipeline and the anchor (the shell pipeline
//! others use) side by side in one run, alternating, on the same machine.
//!
//! Anchor (Kata osbuilder's initrd path): `skopeo copy` from the registry to an
//! OCI layout, `umoci unpack`, `find . | cpio -H newc -o | gzip -9`.
//! Ours: `osbuilder initrd` from the same registry with a cold blob cache (it
//! pulls every run, as skopeo does) at the default gzip -9, plus gzip -6, zstd
//! and warm-cache variants.
//! Wall times are medians; nothing here asserts on time.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;

use crate::image::base_image;
use crate::util::{osbuilder_binary, Cmd};

#[derive(Args)]
pub struct Bench {
    /// Runs of each pipeline.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Sections to run (default: all).
    #[arg(long, value_delimiter = ',', value_enum)]
    only: Vec<Section>,
    /// Skip the cold kernel build (about 15 minutes on 2 cores) and with it
    /// the reproducibility row.
    #[arg(long)]
    skip_cold_kernel: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Registry image to initrd, ours vs skopeo+umoci+cpio+gzip.
    Initrd,
    /// Guest kernel build and boot, ours vs Debian's cloud kernel.
    Kernel,
    /// Init + agent sizes, agent RSS, time to agent health.
    Guest,
    /// Boot phases (QEMU, kernel, init, agent, health) of each launch
    /// config, boot arguments' savings, initrd compression, the slowest
    /// initcalls and an SVG time line, beside Debian's cloud kernel.
    Boot,
    /// Registry image to a bare ext4 disk image, ours vs skopeo+umoci+mke2fs -d,
    /// the fetch+decompress floor, and mke2fs -d - on the layer's tar stream;
    /// then erofs (plain, lz4, lz4hc) ours vs skopeo+umoci+mkfs.erofs.
    Disk,
    /// The Debian disk as a containerDisk to a loopback registry, ours vs
    /// umoci + skopeo copy; bytes re-sent after a dropped upload.
    Publish,
    /// The agent under load in a guest: 32 clients' health checks and
    /// exec/wait round trips, 1 GiB through `cat`, the agent's RSS.
    Load,
}

/// A docker-registry on a free loopback port, killed on drop.
pub(crate) struct Registry {
    child: Child,
    pub(crate) addr: String,
    _dir: PathBuf,
}

impl Registry {
    pub(crate) fn start(dir: &Path) -> anyhow::Result<Registry> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = format!("127.0.0.1:{port}");
        std::fs::create_dir_all(dir.join("storage"))?;
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}, delete: {{enabled: true}}}}\nhttp: {{addr: {addr}}}\n",
                dir.join("storage").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start docker-registry (run `cargo xtask setup`)")?;
        let registry = Registry { child, addr, _dir: dir.to_path_buf() };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            if Instant::now() > deadline {
                bail!("docker-registry did not listen on {} within 20 s", registry.addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }
}

impl Registry {
    /// Pushes the base image (`base_image()`'s layout) as library/debian:bookworm
    /// and returns its reference without the transport (HOST:PORT/REPO:TAG).
    pub(crate) fn push_base(&self, base: &Path) -> anyhow::Result<String> {
        let image = format!("{}/library/debian:bookworm", self.addr);
        Cmd::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:bookworm", base.join("layout").display()))
            .arg(format!("docker://{image}"))
            .run()?;
        Ok(image)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct Sample {
    pub(crate) seconds: f64,
    pub(crate) bytes: u64,
    pub(crate) sha256: String,
}

pub(crate) fn timed(cmd: Cmd, out: &Path) -> anyhow::Result<Sample> {
    let t = Instant::now();
    cmd.quiet().read()?;
    let seconds = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(out).with_context(|| format!("{} was not written", out.display()))?.len();
    let sha256 = crate::util::sha256_file(out)?;
    Ok(Sample { seconds, bytes, sha256 })
}

pub(crate) fn median(samples: &[Sample]) -> f64 {
    median_of(&samples.iter().map(|s| s.seconds).collect::<Vec<_>>())
}

pub(crate) fn median_of(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(crate) fn identical(samples: &[Sample]) -> bool {
    samples.windows(2).all(|w| w[0].sha256 == w[1].sha256)
}

impl Bench {
    pub fn run(self) -> anyhow::Result<()> {
        let osbuilder = osbuilder_binary()?;
        let wants = |s: Section| self.only.is_empty() || self.only.contains(&s);
        if wants(Section::Initrd) {
            self.initrd(&osbuilder)?;
        }
        if wants(Section::Kernel) {
            let work = tempdir()?;
            crate::bench_kernel::run(&osbuilder, &work, self.runs, !self.skip_cold_kernel)?;
            std::fs::remove_dir_all(&work)?;
        }
        if wants(Section::Guest) {
            let work = tempdir()?;
            crate::bench_guest::run(&osbuilder, &work, self.runs)?;
            std::fs::remove_dir_all(&work)?;
        }
        if wants(Section::Boot) {
            let work = tempdir()?;
            crate::bench_boot::run(&osbuilder, &work, self.runs)?;
            std::fs::remove_dir_all(&work)?;
        }
        if wants(Section::Disk) {
            crate::bench_disk::run(&osbuilder, self.runs)?;
            crate::bench_erofs::run(&osbuilder, self.runs)?;
        }
        if wants(Section::Publish) {
            crate::bench_publish::run(&osbuilder, self.runs)?;
        }
        if wants(Section::Load) {
            crate::bench_load::run()?;
        }
        Ok(())
    }

    fn initrd(&self, osbuilder: &Path) -> anyhow::Result<()> {
        let base = base_image()?;
        let work = tempdir()?;
        let registry = Registry::start(&work.join("registry"))?;
        let image = registry.push_base(&base)?;
        let unpacked = dir_size(&work, &base)?;
        eprintln!("bench: image {image} ({unpacked}), {} runs each, alternating", self.runs);

        let (mut anchor, mut ours_gz, mut ours_gz6, mut ours_zst, mut ours_warm) = (vec![], vec![], vec![], vec![], vec![]);
        let warm_cache = work.join("warm-cache");
        for run in 0..self.runs {
            // Anchor: Kata osbuilder's way.
            let dir = work.join(format!("anchor-{run}"));
            std::fs::create_dir_all(&dir)?;
            let out = dir.join("initrd.gz");
            let script = format!(
                "set -e; skopeo copy --quiet --src-tls-verify=false docker://{image} oci:{d}/layout:bookworm; \
                 umoci unpack --image {d}/layout:bookworm {d}/bundle >/dev/null; \
                 cd {d}/bundle/rootfs && find . | cpio --quiet -H newc -o | gzip -9 > {out}",
                d = dir.display(),
                out = out.display()
            );
            anchor.push(timed(Cmd::new("bash").args(["-c", &script]), &out)?);
            std::fs::remove_dir_all(&dir)?;

            // Ours, cold cache: pulls every time, like the anchor.
            for (compress, level, samples) in [("gzip", "9", &mut ours_gz), ("gzip", "6", &mut ours_gz6), ("zstd", "3", &mut ours_zst)] {
                let cache = work.join(format!("cache-{compress}-{level}-{run}"));
                let out = work.join(format!("ours-{run}.{compress}{level}"));
                samples.push(timed(
                    Cmd::new(osbuilder)
                        .args(["initrd", "--quiet", "--image", &format!("docker://{image}"), "--compress", compress, "--level", level, "-o"])
                        .arg(&out)
                        .arg("--cache-dir")
                        .arg(&cache),
                    &out,
                )?);
                std::fs::remove_dir_all(&cache)?;
                if run + 1 < self.runs {
                    std::fs::remove_file(&out)?;
                }
            }
            // Ours, warm cache: the second build of the same image pulls nothing.
            let out = work.join(format!("warm-{run}.gz"));
            ours_warm.push(timed(
                Cmd::new(osbuilder).args(["initrd", "--quiet", "--image", &format!("docker://{image}"), "-o"]).arg(&out).arg("--cache-dir").arg(&warm_cache),
                &out,
            )?);
            std::fs::remove_file(&out)?;
        }
        drop(registry);

        let a = median(&anchor);
        println!();
        println!("registry image -> initrd, Debian bookworm minbase, {} runs each (median wall seconds)", self.runs);
        println!("{:<44} {:>8} {:>8} {:>12} {:>10}", "pipeline", "median", "speedup", "bytes", "identical");
        let row = |name: &str, s: &[Sample]| {
            let m = median(s);
            println!("{:<44} {:>8.2} {:>7.2}x {:>12} {:>10}", name, m, a / m, s.last().map_or(0, |x| x.bytes), if identical(s) { "yes" } else { "no" });
        };
        row("anchor: skopeo+umoci+cpio+gzip -9", &anchor);
        row("osbuilder gzip -9, default (cold cache)", &ours_gz);
        row("osbuilder gzip -6 (cold cache)", &ours_gz6);
        row("osbuilder zstd -3 (cold cache)", &ours_zst);
        row("osbuilder gzip -9 (warm cache)", &ours_warm);
        let size_ratio = ours_gz.last().map_or(0.0, |o| o.bytes as f64) / anchor.last().map_or(1.0, |x| x.bytes as f64);
        println!("size ours gzip -9 / anchor: {size_ratio:.3}");
        std::fs::remove_dir_all(&work)?;
        Ok(())
    }
}

pub(crate) fn tempdir() -> anyhow::Result<PathBuf> {
    let out = Cmd::new("mktemp").args(["-d", "-t", "osbuilder-bench.XXXXXX"]).quiet().read()?;
    Ok(PathBuf::from(out.trim()))
}

fn dir_size(_work: &Path, base: &Path) -> anyhow::Result<String> {
    let tar = base.join("rootfs.tar");
    let len = std::fs::metadata(&tar).map(|m| m.len()).unwrap_or(0);
    Ok(format!("{} MB as tar", len / 1_000_000))
}
