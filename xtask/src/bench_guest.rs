//! The guest section of `cargo xtask bench`: sizes of the static init +
//! agent, the agent-only initrd, the agent's RSS after boot, and time from
//! QEMU start to the agent's health answer under TCG on our kernel, beside
//! Debian's cloud kernel with a busybox initrd reaching a shell.

use std::path::Path;

use crate::bench_kernel::{artifacts, boot_to_marker, debian_cloud_kernel, kernel_cmd, marker_initrd, median, BootSample, Q35};
use crate::util::{ci_tool, guest_init_binary, project_root, target_dir, Cmd};

pub fn run(osbuilder: &Path, work: &Path, runs: usize) -> anyhow::Result<()> {
    let init = guest_init_binary()?;
    // The same binary without the agent, to show what the agent adds.
    Cmd::new("cargo")
        .args(["build", "--quiet", "--profile", "guest", "--target", "x86_64-unknown-linux-gnu", "-p", "osb-init", "--no-default-features"])
        .args(["--target-dir"])
        .arg(target_dir().join("init-only"))
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .cwd(project_root())
        .run()?;
    let init_only = target_dir().join("init-only/x86_64-unknown-linux-gnu/guest/osb-init");
    let vhost = ci_tool("vhost-device-vsock")?;
    let kernel_out = work.join("kernel");
    kernel_cmd(osbuilder, &kernel_out).quiet().run()?;
    let kernel = artifacts(&kernel_out)?;
    let initrd = work.join("agent-initrd.gz");
    Cmd::new(osbuilder).args(["initrd", "--quiet", "--agent-only", "--init"]).arg(&init).arg("-o").arg(&initrd).quiet().run()?;

    let mut ours: Vec<(String, Vec<serde_json::Value>)> = vec![("ours, agent-only, microvm".into(), vec![]), ("ours, agent-only, q35".into(), vec![])];
    let (debian_pkg, debian) = debian_cloud_kernel()?;
    // Reaching a shell: the marker, then busybox sh on the console (the VM
    // powers off a second later).
    let shell_initrd = marker_initrd(work, "shell", "(/bin/busybox sleep 1; /bin/busybox reboot -f) &\nexec /bin/busybox sh")?;
    let mut anchor: Vec<BootSample> = Vec::new();
    for _ in 0..runs {
        for (i, machine) in ["microvm", "q35"].iter().enumerate() {
            let out = Cmd::new(osbuilder)
                .args(["vm", "boot", "--json", "--machine", machine, "--kernel"])
                .arg(&kernel.bzimage)
                .arg("--initrd")
                .arg(&initrd)
                .arg("--work-dir")
                .arg(work.join(format!("vm-{machine}")))
                .env("OSBUILDER_VHOST_DEVICE_VSOCK", &vhost)
                .quiet()
                .read()?;
            let line = out.lines().last().unwrap_or("{}");
            ours[i].1.push(serde_json::from_str(line)?);
        }
        anchor.push(boot_to_marker(Q35, &debian, &shell_initrd, "", "MARK ", &work.join("anchor-console.log"))?);
    }

    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    println!();
    println!("guest init + agent (static, stripped, one binary)");
    println!("{:<52} {:>12}", "osb-init with the agent linked in, bytes", size(&init));
    println!("{:<52} {:>12}", "osb-init alone (--no-default-features), bytes", size(&init_only));
    println!("{:<52} {:>12}", "agent-only initrd (gzip -9), bytes", size(&initrd));
    println!();
    println!("QEMU start to the agent's health answer under TCG, {runs} runs (medians)");
    println!("{:<40} {:>9} {:>16} {:>14}", "guest", "wall s", "guest uptime s", "agent RSS KiB");
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |v| format!("{v:.p$}"));
    for (name, samples) in &ours {
        let get = |k: &str| median(samples.iter().filter_map(|s| s[k].as_f64()).collect());
        println!(
            "{:<40} {:>9} {:>16} {:>14}",
            name,
            f(get("health_seconds"), 2),
            f(get("agent_ready_uptime_seconds"), 2),
            f(get("agent_rss_bytes").map(|b| b / 1024.0), 0)
        );
    }
    let wall = median(anchor.iter().filter_map(|b| b.wall).collect());
    let guest = median(anchor.iter().filter_map(|b| b.guest).collect());
    println!("{:<40} {:>9} {:>16} {:>14}", format!("{debian_pkg} + busybox shell, q35"), f(wall, 2), f(guest, 2), "-");
    println!("(guest uptime: /proc/uptime when the agent started listening, or when the shell started)");
    Ok(())
}
