//! The boot section of `cargo xtask bench` (`--only boot`): where a guest
//! boot's time goes, under TCG, beside Debian's cloud kernel reaching a
//! busybox shell in the same run.
//!
//! - Phases (medians over the runs) of our kernel + agent-only initrd on
//!   microvm (ACPI off and on) and q35, and of the Debian base image's DAX
//!   ext4 disk (pmem on q35), from the bzImage and from the ELF vmlinux
//!   through its PVH entry: QEMU start -> the kernel's clock zero ->
//!   init's first instruction -> the agent listening -> the first health
//!   answer at the host (`osbuilder vm boot --json`, from init's and the
//!   agent's CLOCK_BOOTTIME stamps; see `osbuilder::vm::BootTimeline`).
//! - init's and the agent's start-up steps in microseconds.
//! - The agent-only initrd compressed with gzip, zstd and not at all: size
//!   versus time to init.
//! - Each boot argument's saving: our default set with one argument taken
//!   out (or a candidate put in), against the default, on microvm.
//! - One boot with `initcall_debug`: the ten slowest initcalls and the
//!   largest gaps between kernel messages (time spent outside initcalls),
//!   and an SVG time line of that boot (phases, slowest initcalls) written
//!   beside the table.
//!
//! Nothing here asserts on time: it prints what it measured.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde_json::Value;

use crate::bench_kernel::{artifacts, boot_to_marker, debian_cloud_kernel, kernel_cmd, marker_initrd, median, KernelArtifacts, Q35};
use crate::image::base_image;
use crate::util::{ci_tool, guest_init_binary, project_root, target_dir, Cmd};

/// The phases `osbuilder vm boot --json` reports, in order, and their labels.
const PHASES: &[(&str, &str)] = &[
    ("qemu_to_kernel", "QEMU -> kernel"),
    ("kernel_to_init", "kernel -> /init"),
    ("init_to_listen", "/init -> listening"),
    ("listen_to_health", "listening -> health"),
    ("total", "total (wall)"),
];

/// One way to boot our guest.
struct Boot {
    name: String,
    machine: &'static str,
    acpi: Option<&'static str>,
    initrd: Option<PathBuf>,
    disk: Option<(PathBuf, &'static str)>,
    kernel_args: Option<String>,
    append: String,
    /// Boot the uncompressed ELF vmlinux through its PVH entry (as
    /// Firecracker and Kata's QEMU and Cloud Hypervisor configs do) instead
    /// of the bzImage.
    vmlinux: bool,
}

impl Boot {
    /// Boots once with `osbuilder vm boot --json`, then runs `command` (if
    /// any) through the agent; returns the JSON line and the command's output.
    fn run(&self, osbuilder: &Path, kernel: &KernelArtifacts, vhost: &Path, work: &Path, command: &[&str]) -> anyhow::Result<(Value, String)> {
        let image = if self.vmlinux { &kernel.vmlinux } else { &kernel.bzimage };
        let mut cmd = Cmd::new(osbuilder).args(["vm", "boot", "--json", "--machine", self.machine, "--kernel"]).arg(image);
        if let Some(initrd) = &self.initrd {
            cmd = cmd.arg("--initrd").arg(initrd);
        }
        if let Some((disk, via)) = &self.disk {
            cmd = cmd.arg("--disk").arg(disk).args(["--via", via, "--mem", "1024"]);
        }
        if let Some(acpi) = self.acpi {
            cmd = cmd.args(["--acpi", acpi]);
        }
        if let Some(args) = &self.kernel_args {
            cmd = cmd.arg("--kernel-args").arg(args);
        }
        if !self.append.is_empty() {
            cmd = cmd.arg("--append").arg(&self.append);
        }
        let out = cmd.arg("--work-dir").arg(work.join("vm")).env("OSBUILDER_VHOST_DEVICE_VSOCK", vhost).args(command).quiet().read()?;
        let (json, rest) = out.split_once('\n').unwrap_or((&out, ""));
        Ok((serde_json::from_str(json).with_context(|| format!("{}: not the JSON line: {json}", self.name))?, rest.to_string()))
    }
}

/// Medians of each phase over `samples` (JSON lines of `vm boot --json`).
fn phase_medians(samples: &[Value]) -> Vec<Option<f64>> {
    PHASES.iter().map(|(key, _)| median(samples.iter().filter_map(|s| s["phases"][key].as_f64()).collect())).collect()
}

fn stamp_median(samples: &[Value], name: &str) -> Option<f64> {
    median(samples.iter().filter_map(|s| s["boot_stamps"][name].as_f64()).collect())
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0}", v * 1e3))
}

pub fn run(osbuilder: &Path, work: &Path, runs: usize) -> anyhow::Result<()> {
    let init = guest_init_binary()?;
    let vhost = ci_tool("vhost-device-vsock")?;
    let kernel_out = work.join("kernel");
    kernel_cmd(osbuilder, &kernel_out).quiet().run()?;
    let kernel = artifacts(&kernel_out)?;
    let initrd_for = |name: &str, compress: &str, extra: &[&str]| -> anyhow::Result<PathBuf> {
        let out = work.join(name);
        Cmd::new(osbuilder)
            .args(["initrd", "--quiet", "--agent-only", "--compress", compress, "--init"])
            .arg(&init)
            .args(extra)
            .arg("-o")
            .arg(&out)
            .quiet()
            .run()?;
        Ok(out)
    };
    let gzip = initrd_for("agent.cpio.gz", "gzip", &[])?;
    let zstd = initrd_for("agent.cpio.zst", "zstd", &["--level", "19"])?;
    let plain = initrd_for("agent.cpio", "none", &[])?;
    let with_busybox = initrd_for("agent-busybox.cpio.gz", "gzip", &["--add", "/bin/busybox:/bin/busybox:0755"])?;
    // The Debian base image as Kata's DAX ext4 disk, booted from pmem.
    let base = base_image()?;
    let disk = work.join("dax.img");
    Cmd::new(osbuilder)
        .args(["disk", "--quiet", "--dax", "--image"])
        .arg(format!("oci:{}:bookworm", base.join("layout").display()))
        .arg("--init")
        .arg(&init)
        .arg("-o")
        .arg(&disk)
        .quiet()
        .run()?;

    let boot = |name: &str, machine: &'static str, initrd: Option<&Path>| Boot {
        name: name.to_string(),
        machine,
        acpi: None,
        initrd: initrd.map(Path::to_path_buf),
        disk: None,
        kernel_args: None,
        append: String::new(),
        vmlinux: false,
    };
    let configs = [
        boot("ours, agent-only, microvm", "microvm", Some(&gzip)),
        Boot { acpi: Some("on"), ..boot("ours, agent-only, microvm, ACPI on", "microvm", Some(&gzip)) },
        boot("ours, agent-only, q35", "q35", Some(&gzip)),
        Boot { disk: Some((disk.clone(), "pmem")), ..boot("ours, Debian DAX ext4 disk (pmem), q35", "q35", None) },
        boot("ours, agent-only zstd -19, microvm", "microvm", Some(&zstd)),
        boot("ours, agent-only uncompressed, microvm", "microvm", Some(&plain)),
        Boot { vmlinux: true, ..boot("ours, agent-only, microvm, vmlinux (PVH)", "microvm", Some(&gzip)) },
        Boot { vmlinux: true, ..boot("ours, agent-only, q35, vmlinux (PVH)", "q35", Some(&gzip)) },
    ];

    // Our default arguments on microvm, each taken out, and candidates put in.
    let (first, _) = configs[0].run(osbuilder, &kernel, &vhost, work, &[])?;
    let default_args = first["cmdline"].as_str().context("no cmdline in vm boot --json")?.to_string();
    let mut arg_rows: Vec<(String, Boot)> = Vec::new();
    // console=, panic= and reboot= are not about speed: without reboot=t a
    // powered-off microvm guest hangs in its reset instead of ending QEMU.
    for arg in default_args.split_whitespace().filter(|a| !["console=", "panic=", "reboot="].iter().any(|p| a.starts_with(p))) {
        let without: Vec<&str> = default_args.split_whitespace().filter(|a| a != &arg).collect();
        arg_rows.push((format!("without {arg}"), Boot { kernel_args: Some(without.join(" ")), ..boot(&format!("without {arg}"), "microvm", Some(&gzip)) }));
    }
    for candidate in CANDIDATES {
        arg_rows.push((format!("with {candidate}"), Boot { append: candidate.to_string(), ..boot(&format!("with {candidate}"), "microvm", Some(&gzip)) }));
    }

    let (debian_pkg, debian) = debian_cloud_kernel()?;
    let shell_initrd = marker_initrd(work, "shell", "(/bin/busybox sleep 1; /bin/busybox reboot -f) &\nexec /bin/busybox sh")?;
    let mut samples: Vec<Vec<Value>> = configs.iter().map(|_| Vec::new()).collect();
    let mut arg_samples: Vec<Vec<(Value, Value)>> = arg_rows.iter().map(|_| Vec::new()).collect();
    samples[0].push(first);
    let mut anchor = Vec::new();
    // The default boots the argument rows pair with, for the headline.
    let mut default_boots: Vec<Value> = Vec::new();
    for run in 0..runs {
        eprintln!("bench: boot run {}/{runs}", run + 1);
        for (i, c) in configs.iter().enumerate() {
            if i == 0 && run == 0 {
                continue;
            }
            samples[i].push(c.run(osbuilder, &kernel, &vhost, work, &[]).with_context(|| c.name.clone())?.0);
        }
        // Each variant right after a default boot of its own: the table
        // reports the median of these paired differences, which TCG's
        // boot-to-boot spread (tens of ms) disturbs less than two medians.
        for (i, (_, c)) in arg_rows.iter().enumerate() {
            let base = configs[0].run(osbuilder, &kernel, &vhost, work, &[])?.0;
            let variant = c.run(osbuilder, &kernel, &vhost, work, &[]).with_context(|| c.name.clone())?.0;
            default_boots.push(base.clone());
            arg_samples[i].push((base, variant));
        }
        anchor.push(boot_to_marker(Q35, &debian, &shell_initrd, "", "MARK ", &work.join("anchor-console.log"))?);
    }

    // The first row's median over every boot of that config in this run.
    samples[0].extend(default_boots);
    let configs_named: Vec<String> =
        configs.iter().enumerate().map(|(i, c)| if i == 0 { format!("{} ({} boots)", c.name, samples[0].len()) } else { c.name.clone() }).collect();
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!();
    println!("boot phases under TCG, milliseconds, {runs} runs (medians; phases from init's and the agent's CLOCK_BOOTTIME stamps)");
    print!("{:<44}", "guest");
    for (_, label) in PHASES {
        print!(" {label:>20}");
    }
    println!(" {:>12}", "uptime@ready");
    for (name, s) in configs_named.iter().zip(&samples) {
        print!("{name:<44}");
        for m in phase_medians(s) {
            print!(" {:>20}", ms(m));
        }
        println!(" {:>12}", ms(stamp_median(s, "listen")));
    }
    let wall = median(anchor.iter().filter_map(|b| b.wall).collect());
    let shell = median(anchor.iter().filter_map(|b| b.guest).collect());
    println!("{:<44} {:>20} {:>20} {:>20} {:>20} {:>20} {:>12}", format!("{debian_pkg} + busybox shell, q35"), "-", "-", "-", "-", ms(wall), ms(shell));
    println!("(uptime@ready: guest uptime when the agent listened, or, for Debian, when the shell started; the Debian row's total is QEMU start to the shell's first output)");
    println!("(microvm with ACPI on: no PIT and no tick before the local APIC timer runs, so the guest's clock misses part of early boot; its uptime reads low and QEMU -> kernel high: compare its total)");

    let ready = stamp_median(&samples[0], "listen");
    let health = phase_medians(&samples[0])[4];
    println!();
    println!("targets");
    if let (Some(r), Some(d)) = (ready, shell) {
        println!(
            "  uptime at agent-ready, ours microvm / Debian's at its shell, q35: {:.0} / {:.0} ms = 1/{:.2} (target: at most 1/3)",
            r * 1e3,
            d * 1e3,
            d / r
        );
    }
    if let Some(q) = stamp_median(&samples[2], "listen") {
        println!("  ours on q35, uptime at agent-ready: {:.0} ms", q * 1e3);
    }
    if let (Some(h), Some(w)) = (health, wall) {
        println!("  QEMU start to first health answer, ours microvm (bzImage) vs Debian to its shell: {:.0} vs {:.0} ms = 1/{:.2}", h * 1e3, w * 1e3, w / h);
    }
    if let (Some(h), Some(w)) = (phase_medians(&samples[6])[4], wall) {
        println!(
            "  QEMU start to first health answer, ours microvm (vmlinux, PVH) vs Debian to its shell: {:.0} vs {:.0} ms = 1/{:.2}",
            h * 1e3,
            w * 1e3,
            w / h
        );
    }

    println!();
    println!("init and agent start-up, microseconds after init's first instruction (medians, ours microvm)");
    let t0 = stamp_median(&samples[0], "init");
    for stamp in ["mounted", "root", "spawn", "agent", "listen"] {
        let v = stamp_median(&samples[0], stamp).zip(t0).map(|(s, i)| (s - i) * 1e6);
        println!("  {stamp:<10} {:>10}", v.map_or("-".into(), |v| format!("{v:.0}")));
    }
    println!("  (mounted: pseudo filesystems and console; root: the real root (none for an initrd); spawn: the agent's fork; agent: its first instruction; listen: its vsock socket)");

    println!();
    println!("agent-only initrd: compression, size and time to /init (medians, microvm)");
    for (c, s, file) in [(&configs[0], &samples[0], &gzip), (&configs[4], &samples[4], &zstd), (&configs[5], &samples[5], &plain)] {
        println!("  {:<44} {:>10} bytes {:>8} ms to /init {:>8} ms total", c.name, size(file), ms(stamp_median(s, "init")), ms(phase_medians(s)[4]));
    }

    println!();
    println!("boot arguments on microvm: uptime at agent-ready, each variant against a default boot just before it ({default_args})");
    println!("  {:<56} {:>10} {:>14} {:>22}", "variant", "ready ms", "default ms", "variant - default ms");
    for ((name, _), pairs) in arg_rows.iter().zip(&arg_samples) {
        let listen = |v: &Value| v["boot_stamps"]["listen"].as_f64();
        let deltas: Vec<f64> = pairs.iter().filter_map(|(b, v)| Some(listen(v)? - listen(b)?)).collect();
        let spread = deltas.iter().map(|d| format!("{:+.0}", d * 1e3)).collect::<Vec<_>>().join(" ");
        println!(
            "  {:<56} {:>10} {:>14} {:>8} ({spread})",
            name,
            ms(median(pairs.iter().filter_map(|(_, v)| listen(v)).collect())),
            ms(median(pairs.iter().filter_map(|(b, _)| listen(b)).collect())),
            median(deltas).map_or("-".into(), |d| format!("{:+.0}", d * 1e3)),
        );
    }

    // One boot with initcall_debug, dmesg read back through the agent.
    // initramfs_async=0: the archive is unpacked before the initcalls that
    // follow it instead of beside them on the one vCPU, where it would be
    // counted in whichever initcall it interrupted.
    let traced = Boot {
        append: "initcall_debug printk.time=1 log_buf_len=4M initramfs_async=0".into(),
        ..boot("ours, agent-only + busybox, initcall_debug", "microvm", Some(&with_busybox))
    };
    let (json, dmesg) = traced.run(osbuilder, &kernel, &vhost, work, &["--", "/bin/busybox", "dmesg"])?;
    let trace = KernelTrace::parse(&dmesg);
    println!();
    println!(
        "one boot with initcall_debug (microvm, agent-only + busybox): {} initcalls, {:.0} ms in them",
        trace.initcalls.len(),
        trace.initcalls.iter().map(|c| c.usecs).sum::<u64>() as f64 / 1e3
    );
    println!("  ten slowest initcalls");
    for c in trace.slowest(10) {
        println!("  {:>9.1} ms  at {:>8.1} ms  {}", c.usecs as f64 / 1e3, c.start * 1e3, c.name);
    }
    println!("  largest gaps between kernel messages outside initcalls (what ran before the next message)");
    for g in trace.gaps(10) {
        println!("  {:>9.1} ms  at {:>8.1} ms  before: {}", g.secs * 1e3, g.at * 1e3, g.next);
    }
    let svg_path = target_dir().join("bench").join("boot-timeline.svg");
    std::fs::create_dir_all(svg_path.parent().expect("has a parent"))?;
    std::fs::write(&svg_path, timeline_svg(&json, &trace))?;
    println!("  time line of this boot: {}", svg_path.strip_prefix(project_root()).unwrap_or(&svg_path).display());
    Ok(())
}

/// Boot arguments tried on top of our default set (Kata's and
/// Firecracker's, and the ones the issue names), each alone.
const CANDIDATES: &[&str] = &[
    "lpj=10384000",
    "rcupdate.rcu_expedited=1",
    "cryptomgr.notests",
    "i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd",
    "random.trust_cpu=on",
    // Security-weakening: measured so the table can say what they would buy.
    "mitigations=off",
    "nokaslr",
];

/// One initcall from `initcall_debug`.
#[derive(Debug, PartialEq)]
pub struct Initcall {
    pub name: String,
    /// Kernel seconds when it started.
    pub start: f64,
    pub usecs: u64,
}

/// A stretch between two kernel messages that no initcall covers.
#[derive(Debug, PartialEq)]
pub struct Gap {
    pub at: f64,
    pub secs: f64,
    pub next: String,
}

/// The kernel's messages with their timestamps, and the initcalls among them.
#[derive(Debug, Default)]
pub struct KernelTrace {
    pub lines: Vec<(f64, String)>,
    pub initcalls: Vec<Initcall>,
}

impl KernelTrace {
    /// Parses `dmesg` output (`[    0.123456] text`).
    pub fn parse(dmesg: &str) -> KernelTrace {
        let mut t = KernelTrace::default();
        for line in dmesg.lines() {
            let Some((stamp, text)) = line.strip_prefix('[').and_then(|l| l.split_once(']')) else { continue };
            let Ok(at) = stamp.trim().parse::<f64>() else { continue };
            let text = text.trim().to_string();
            // "initcall foo+0x0/0x40 returned 0 after 1234 usecs"
            if let Some(rest) = text.strip_prefix("initcall ") {
                if let Some((func, after)) = rest.split_once(" returned ") {
                    let usecs = after.split(" after ").nth(1).and_then(|u| u.trim_end_matches(" usecs").parse::<u64>().ok());
                    if let Some(usecs) = usecs {
                        let name = func.split('+').next().unwrap_or(func).to_string();
                        t.initcalls.push(Initcall { name, start: at - usecs as f64 / 1e6, usecs });
                    }
                }
            }
            t.lines.push((at, text));
        }
        t
    }

    pub fn slowest(&self, n: usize) -> Vec<&Initcall> {
        let mut v: Vec<&Initcall> = self.initcalls.iter().collect();
        v.sort_by(|a, b| b.usecs.cmp(&a.usecs).then(a.start.total_cmp(&b.start)));
        v.truncate(n);
        v
    }

    /// The `n` largest gaps between consecutive messages, leaving out
    /// those inside an initcall (counted above) and the calling/returned
    /// lines themselves.
    pub fn gaps(&self, n: usize) -> Vec<Gap> {
        let inside = |t: f64| self.initcalls.iter().any(|c| t > c.start + 1e-6 && t <= c.start + c.usecs as f64 / 1e6 + 1e-6);
        let mut gaps: Vec<Gap> = self
            .lines
            .windows(2)
            .filter(|w| !inside(w[1].0))
            .map(|w| Gap { at: w[0].0, secs: w[1].0 - w[0].0, next: w[1].1.chars().take(90).collect() })
            .collect();
        gaps.sort_by(|a, b| b.secs.total_cmp(&a.secs));
        gaps.truncate(n);
        gaps
    }
}

/// An SVG time line of one boot, in the manner of `systemd-analyze plot`:
/// the phases as bars on the host's clock, then on the same axis the
/// initcalls of at least 1 ms (purple) and the largest stretches between
/// kernel messages outside initcalls (grey), each labelled.
pub fn timeline_svg(boot: &Value, trace: &KernelTrace) -> String {
    let kernel_start = boot["phases"]["qemu_to_kernel"].as_f64().unwrap_or(0.0);
    let total = boot["phases"]["total"].as_f64().unwrap_or(1.0).max(0.001);
    let stamp = |n: &str| boot["boot_stamps"][n].as_f64().map(|t| t + kernel_start);
    let mut bars: Vec<(String, f64, f64, &str)> = Vec::new();
    bars.push(("QEMU start, firmware, decompression".into(), 0.0, kernel_start, "#9e9e9e"));
    if let Some(init) = stamp("init") {
        bars.push(("kernel".into(), kernel_start, init, "#1e88e5"));
        if let Some(listen) = stamp("listen") {
            bars.push(("init + agent start-up".into(), init, listen, "#43a047"));
            bars.push(("vsock to the host, first health answer".into(), listen, total, "#fb8c00"));
        }
    }
    // The kernel's message stamps (sched_clock) and the uptime clock init
    // reads can be tens of milliseconds apart: anchor the messages at the
    // last one before init ran.
    let shift = match (trace.lines.iter().rev().find(|(_, l)| l.starts_with("Run /init")), stamp("init")) {
        (Some((t, _)), Some(init)) => init - t,
        _ => kernel_start,
    };
    let mut spans: Vec<(String, f64, f64, &str)> = trace
        .initcalls
        .iter()
        .filter(|c| c.usecs >= 1000)
        .map(|c| (format!("{} ({:.1} ms)", c.name, c.usecs as f64 / 1e3), c.start, c.start + c.usecs as f64 / 1e6, "#8e24aa"))
        .collect();
    spans.extend(
        trace
            .gaps(8)
            .into_iter()
            .filter(|g| g.secs >= 0.005)
            .map(|g| (format!("before \"{}\" ({:.1} ms)", g.next, g.secs * 1e3), g.at, g.at + g.secs, "#757575")),
    );
    spans.sort_by(|a, b| a.1.total_cmp(&b.1));
    bars.extend(spans.into_iter().map(|(label, from, to, color)| (label, from + shift, to + shift, color)));
    let (left, width, row) = (20.0, 1100.0, 18.0);
    let x = |t: f64| left + t / total * width;
    let height = 60.0 + row * bars.len() as f64;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{height}" font-family="sans-serif" font-size="11">"#,
        w = left * 2.0 + width + 300.0
    );
    let _ = writeln!(
        svg,
        r#"<text x="{left}" y="14" font-size="13">Guest boot under TCG: QEMU start to the agent's first health answer, {:.0} ms</text>"#,
        total * 1e3
    );
    let step = if total > 2.0 { 0.25 } else { 0.1 };
    let mut t = 0.0;
    while t <= total + 1e-9 {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.1}" y1="24" x2="{0:.1}" y2="{1}" stroke="#e0e0e0"/><text x="{0:.1}" y="34" text-anchor="middle">{2:.0} ms</text>"##,
            x(t),
            height - 10.0,
            t * 1e3
        );
        t += step;
    }
    for (i, (label, from, to, color)) in bars.iter().enumerate() {
        let y = 44.0 + row * i as f64;
        let w = (x(*to) - x(*from)).max(1.0);
        let _ = writeln!(svg, r#"<rect x="{:.1}" y="{y}" width="{w:.1}" height="{}" fill="{color}"/>"#, x(*from), row - 4.0);
        let _ = writeln!(svg, r#"<text x="{:.1}" y="{}">{}</text>"#, x(*to) + 4.0, y + row - 7.0, xml_escape(label));
    }
    svg.push_str("</svg>\n");
    svg
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DMESG: &str = "[    0.000000] Linux version 6.12\n\
                         [    0.100000] calling  a_init+0x0/0x10 @ 1\n\
                         [    0.150000] initcall a_init+0x0/0x10 returned 0 after 50000 usecs\n\
                         [    0.150010] calling  b_init+0x0/0x10 @ 1\n\
                         [    0.151010] initcall b_init+0x0/0x10 returned 0 after 1000 usecs\n\
                         [    0.400000] Run /init as init process\n";

    #[test]
    fn initcalls_and_gaps_come_from_dmesg() {
        let t = KernelTrace::parse(DMESG);
        assert_eq!(t.initcalls.len(), 2);
        assert_eq!(t.slowest(1)[0].name, "a_init");
        assert!((t.slowest(1)[0].start - 0.1).abs() < 1e-9);
        let gaps = t.gaps(2);
        // 0.151 -> 0.4 is outside every initcall; 0.0 -> 0.1 the next.
        assert!((gaps[0].secs - 0.24899).abs() < 1e-6, "{gaps:?}");
        assert_eq!(gaps[0].next, "Run /init as init process");
        assert!((gaps[1].secs - 0.1).abs() < 1e-9, "{gaps:?}");
    }

    #[test]
    fn the_timeline_has_a_bar_per_phase_and_slow_initcall() {
        let boot = serde_json::json!({"phases": {"qemu_to_kernel": 0.2, "total": 1.0}, "boot_stamps": {"init": 0.5, "listen": 0.6}});
        let svg = timeline_svg(&boot, &KernelTrace::parse(DMESG));
        // 4 phases, 2 initcalls, 2 gaps of 5 ms or more.
        assert_eq!(svg.matches("<rect").count(), 4 + 2 + 2, "{svg}");
        assert!(svg.contains("a_init (50.0 ms)") && svg.ends_with("</svg>\n"));
    }
}
