//! The kernel section of `cargo xtask bench`: cold and cached build times,
//! reproducibility (a cold build in a second cache directory, so another
//! absolute build path, compared byte for byte with the cached one),
//! artifact sizes, and boot time to the initrd's first output under QEMU
//! TCG for our kernel and Debian's cloud kernel with the same initrd.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::util::{cache_root, project_root, sha256_file, Cmd};

/// `osbuilder kernel` with the project's config and patches.
pub fn kernel_cmd(osbuilder: &Path, out: &Path) -> Cmd {
    let root = project_root();
    Cmd::new(osbuilder).arg("kernel").arg("--config-dir").arg(root.join("kernel-config")).arg("--patches-dir").arg(root.join("patches")).arg("-o").arg(out)
}

pub struct KernelArtifacts {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
}

/// The artifacts `osbuilder kernel -o out` wrote last: `out` may still hold
/// those of an earlier config version (`vmlinuz-6.12.117-2` beside `-3`),
/// so the newest file of each kind is taken.
pub fn artifacts(out: &Path) -> anyhow::Result<KernelArtifacts> {
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
        for e in std::fs::read_dir(out)? {
            let e = e?;
            let p = e.path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)) {
                let t = e.metadata()?.modified()?;
                if newest.as_ref().is_none_or(|(nt, np)| (t, &p) > (*nt, np)) {
                    newest = Some((t, p));
                }
            }
        }
        newest.map(|(_, p)| p).with_context(|| format!("no {prefix}* in {}", out.display()))
    };
    Ok(KernelArtifacts { vmlinux: find("vmlinux-")?, bzimage: find("vmlinuz-")? })
}

/// Debian's cloud kernel (what `linux-image-cloud-amd64` depends on),
/// downloaded with apt and cached by package name.
pub fn debian_cloud_kernel() -> anyhow::Result<(String, PathBuf)> {
    let deps = Cmd::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]).quiet().read();
    let deps = match deps {
        Ok(d) if d.contains("Depends:") => d,
        _ => {
            Cmd::new("apt-get").args(["update", "-qq"]).run()?;
            Cmd::new("apt-cache").args(["depends", "linux-image-cloud-amd64"]).quiet().read()?
        }
    };
    let package = deps
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")))
        .map(str::to_string)
        .context("linux-image-cloud-amd64 names no kernel package")?;
    let dir = cache_root().join("anchor").join(&package);
    let vmlinuz = dir.join("vmlinuz");
    if vmlinuz.is_file() {
        return Ok((package, vmlinuz));
    }
    let tmp = cache_root().join("anchor").join(format!("{package}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    Cmd::new("apt-get").args(["download", "-q", &package]).cwd(&tmp).run()?;
    let deb = std::fs::read_dir(&tmp)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    Cmd::new("dpkg-deb").arg("-x").arg(&deb).arg(tmp.join("x")).run()?;
    let boot = tmp.join("x/boot");
    let image = std::fs::read_dir(&boot)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("the package has no /boot/vmlinuz-*")?;
    std::fs::rename(&image, tmp.join("vmlinuz"))?;
    std::fs::remove_dir_all(tmp.join("x"))?;
    std::fs::remove_file(&deb)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir)?;
    Ok((package, vmlinuz))
}

/// A busybox initrd whose /init prints `MARK <uptime>` and then runs
/// `then` (shell lines), e.g. `reboot -f` to power off at once.
pub fn marker_initrd(dir: &Path, name: &str, then: &str) -> anyhow::Result<PathBuf> {
    let root = dir.join(format!("{name}-root"));
    for d in ["bin", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("static busybox (busybox-static) is missing")?;
    std::fs::write(
        root.join("init"),
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null\n/bin/busybox mount -t proc proc /proc\n\
             /bin/busybox echo \"<1>MARK $(/bin/busybox cut -d' ' -f1 /proc/uptime)\" > /dev/kmsg\n{then}\n"
        ),
    )?;
    Cmd::new("chmod").arg("0755").arg(root.join("init")).quiet().run()?;
    let initrd = dir.join(format!("{name}-initrd.gz"));
    Cmd::new("sh")
        .arg("-c")
        .arg(format!("cd {} && find . | LC_ALL=C sort | cpio --quiet -H newc -o | gzip -9 > {}", root.display(), initrd.display()))
        .quiet()
        .run()?;
    Ok(initrd)
}

pub const MICROVM: &[&str] = &["-M", "microvm,memory-backend=mem", "-object", "memory-backend-memfd,id=mem,size=256M,share=on"];
pub const Q35: &[&str] = &["-M", "q35"];

/// One boot: wall time from QEMU start to `marker` on the console, and the
/// number after the marker (the guest's uptime), or None if it never came.
pub struct BootSample {
    pub wall: Option<f64>,
    pub guest: Option<f64>,
}

pub fn boot_to_marker(machine: &[&str], kernel: &Path, initrd: &Path, append: &str, marker: &str, console: &Path) -> anyhow::Result<BootSample> {
    let _ = std::fs::remove_file(console);
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(machine)
        .args(["-accel", "tcg", "-m", "256", "-display", "none", "-monitor", "none", "-no-reboot", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 reboot=t quiet {append}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start qemu-system-x86_64")?;
    let limit = Duration::from_secs(90);
    let mut sample = BootSample { wall: None, guest: None };
    let look = |sample: &mut BootSample| {
        if sample.wall.is_none() {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            if let Some(rest) = text.split(marker).nth(1) {
                sample.wall = Some(started.elapsed().as_secs_f64());
                sample.guest = rest.split_whitespace().next().and_then(|v| v.parse().ok());
            }
        }
    };
    loop {
        look(&mut sample);
        if child.try_wait()?.is_some() {
            // The marker may have landed between the last read and the exit.
            look(&mut sample);
            return Ok(sample);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(sample);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The median of some samples (None when there are none).
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

pub fn run(osbuilder: &Path, work: &Path, runs: usize, cold: bool) -> anyhow::Result<()> {
    // The cached build (cold the first time on this machine), then a rebuild.
    let out = work.join("kernel");
    let t = Instant::now();
    kernel_cmd(osbuilder, &out).run()?;
    let first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    kernel_cmd(osbuilder, &out).quiet().run()?;
    let cached = t.elapsed().as_secs_f64();
    let ours = artifacts(&out)?;

    // A cold build in a scratch cache: time, and the same bytes?
    let cold_result = if cold {
        let cold_out = work.join("kernel-cold");
        let t = Instant::now();
        kernel_cmd(osbuilder, &cold_out).arg("--cache-dir").arg(work.join("cold-cache")).run()?;
        let secs = t.elapsed().as_secs_f64();
        let other = artifacts(&cold_out)?;
        let same = sha256_file(&other.vmlinux)? == sha256_file(&ours.vmlinux)? && sha256_file(&other.bzimage)? == sha256_file(&ours.bzimage)?;
        let _ = std::fs::remove_dir_all(work.join("cold-cache"));
        Some((secs, same))
    } else {
        None
    };

    let (debian_pkg, debian) = debian_cloud_kernel()?;
    let initrd = marker_initrd(work, "marker", "/bin/busybox reboot -f")?;
    let console = work.join("console.log");
    let cases: Vec<(&str, &[&str], &Path, &str)> = vec![
        ("ours, microvm (acpi=off)", MICROVM, &ours.bzimage, "acpi=off"),
        ("ours, q35", Q35, &ours.bzimage, ""),
        ("debian cloud, q35", Q35, &debian, ""),
        ("debian cloud, microvm (acpi=off)", MICROVM, &debian, "acpi=off"),
    ];
    let mut samples: Vec<Vec<BootSample>> = cases.iter().map(|_| Vec::new()).collect();
    for _ in 0..runs {
        for (i, (_, machine, kernel, append)) in cases.iter().enumerate() {
            // Debian's kernel never boots on microvm under TCG (below): try once.
            if i == 3 && !samples[3].is_empty() {
                continue;
            }
            samples[i].push(boot_to_marker(machine, kernel, &initrd, append, "MARK ", &console)?);
        }
    }

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!();
    println!("guest kernel 6.12 (default features), 2 cores");
    println!("{:<46} {:>12}", "build", "seconds");
    println!("{:<46} {:>12.1}", "first `cargo xtask kernel` in this run", first);
    println!("{:<46} {:>12.2}", "cached rebuild", cached);
    match cold_result {
        Some((secs, same)) => {
            println!("{:<46} {:>12.1}", "cold build (scratch cache, other build path)", secs);
            println!("{:<46} {:>12}", "cold build identical to cached (vmlinux, bzImage)", if same { "yes" } else { "NO" });
        }
        None => println!("{:<46} {:>12}", "cold build", "skipped (--skip-cold-kernel)"),
    }
    println!("{:<46} {:>12}", "vmlinux bytes", size(&ours.vmlinux));
    println!("{:<46} {:>12}", "bzImage bytes", size(&ours.bzimage));
    println!("{:<46} {:>12}", format!("{debian_pkg} vmlinuz bytes"), size(&debian));
    println!();
    println!("QEMU start to the initrd's first output under TCG, same busybox initrd, {runs} runs (medians)");
    println!("{:<36} {:>10} {:>14} {:>8}", "kernel, machine", "wall s", "guest uptime s", "booted");
    for ((name, ..), s) in cases.iter().zip(&samples) {
        let booted = s.iter().filter(|b| b.wall.is_some()).count();
        let wall = median(s.iter().filter_map(|b| b.wall).collect());
        let guest = median(s.iter().filter_map(|b| b.guest).collect());
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!("{:<36} {:>10} {:>14} {:>5}/{}", name, f(wall), f(guest), booted, s.len());
    }
    println!("(Debian's cloud kernel has no MP-table parsing: with acpi=off on microvm it falls back to the absent 8259 PIC and waits for a tick forever.)");
    Ok(())
}
