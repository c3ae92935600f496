//! `cargo xtask boot`: the whole guest, proven by a boot. Our kernel, an
//! initrd of the Debian base image (or of the init alone) with the static
//! `osb-init` (init + agent), QEMU with real vsock through
//! vhost-device-vsock; waits for the agent's health answer, runs a command
//! through the agent, powers the guest off.

use clap::Args;

use crate::bench_kernel::{artifacts, kernel_cmd};
use crate::image::base_image;
use crate::util::{ci_tool, guest_init_binary, osbuilder_binary, target_dir, Cmd};

#[derive(Args)]
pub struct Boot {
    /// QEMU machine type: microvm or q35.
    #[arg(long, default_value = "microvm")]
    machine: String,
    /// Boot an initrd holding only the init and agent.
    #[arg(long)]
    agent_only: bool,
    /// Guest memory in MiB (default 256 agent-only, 1024 with the Debian image).
    #[arg(long)]
    mem: Option<u32>,
    /// Stay up after the command (Ctrl-C stops the guest).
    #[arg(long)]
    keep: bool,
    /// Extra kernel command line (osb.* options, see init/README.md).
    #[arg(long, default_value = "")]
    append: String,
    /// Command to run in the guest through the agent.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

impl Boot {
    pub fn run(self) -> anyhow::Result<()> {
        let osbuilder = osbuilder_binary()?;
        let kernel_out = target_dir().join("kernel");
        kernel_cmd(&osbuilder, &kernel_out).run()?;
        let kernel = artifacts(&kernel_out)?;
        let init = guest_init_binary()?;
        let vhost = ci_tool("vhost-device-vsock")?;
        let dir = target_dir().join("guest");
        std::fs::create_dir_all(&dir)?;
        let (initrd, mem) = if self.agent_only {
            let initrd = dir.join("agent-initrd.gz");
            Cmd::new(&osbuilder).args(["initrd", "--quiet", "--agent-only", "--init"]).arg(&init).arg("-o").arg(&initrd).run()?;
            (initrd, self.mem.unwrap_or(256))
        } else {
            let base = base_image()?;
            let initrd = dir.join("debian-initrd.zst");
            Cmd::new(&osbuilder)
                .args(["initrd", "--quiet", "--compress", "zstd", "--image"])
                .arg(format!("oci:{}:bookworm", base.join("layout").display()))
                .arg("--init")
                .arg(&init)
                .arg("-o")
                .arg(&initrd)
                .run()?;
            (initrd, self.mem.unwrap_or(1024))
        };
        let mut cmd = Cmd::new(&osbuilder)
            .args(["vm", "boot", "--kernel"])
            .arg(&kernel.bzimage)
            .arg("--initrd")
            .arg(&initrd)
            .args(["--machine", &self.machine, "--mem", &mem.to_string()])
            .arg("--append")
            .arg(&self.append)
            .env("OSBUILDER_VHOST_DEVICE_VSOCK", &vhost);
        if self.keep {
            cmd = cmd.arg("--keep");
        }
        if !self.command.is_empty() {
            cmd = cmd.arg("--").args(&self.command);
        }
        cmd.run()
    }
}
