//! `cargo xtask`: the project's own automation (setup, build, test, bench).
//!
//! xtask orchestrates; the logic lives in the `osbuilder` library and binary.
//! Every external command goes through [`util::Cmd`], which prints the command
//! line and fails with its stderr.

mod bench;
mod bench_disk;
mod bench_erofs;
mod bench_guest;
mod bench_kernel;
mod bench_publish;
mod bench_verity;
mod boot;
mod image;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the Debian packages the build and tests need (idempotent).
    Setup,
    /// Build the default base image (Debian bookworm minbase, as an OCI layout) and print its path.
    BaseImage,
    /// Set up, then build a guest initrd from an image (default: the local Debian base image).
    BuildImage(image::BuildImage),
    /// Set up, then build the guest kernel (cached by the hash of its inputs).
    Kernel {
        /// Arguments for `osbuilder kernel` (--series, --features, --source, -o ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the whole test suite.
    Test {
        /// Extra arguments for `cargo test`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run our pipeline and the anchor pipelines side by side; print medians, ratios and sizes.
    Bench(bench::Bench),
    /// Build kernel, init+agent and initrd, boot under QEMU with vsock, wait
    /// for the agent, run a command through it (e.g. `-- cat /etc/debian_version`).
    Boot(boot::Boot),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Setup => util::setup(),
        Command::BaseImage => {
            util::setup()?;
            println!("{}", image::base_image()?.display());
            Ok(())
        }
        Command::BuildImage(args) => {
            util::setup()?;
            args.run()
        }
        Command::Test { args } => {
            util::setup()?;
            // The Debian base image is shared by xtask and the tests: build it
            // once here so its log is visible, not inside a test's output.
            let base = image::base_image()?;
            // The guest tests boot the static init+agent with real vsock.
            let init = util::guest_init_binary()?;
            let vhost = util::ci_tool("vhost-device-vsock")?;
            let mut cmd = util::Cmd::new("cargo")
                .args(["test", "--workspace"])
                .args(args)
                .cwd(util::project_root())
                .env("OSBUILDER_BASE_IMAGE", base)
                .env("OSBUILDER_GUEST_INIT", init)
                .env("OSBUILDER_VHOST_DEVICE_VSOCK", vhost);
            // Kata's own client judges wire compatibility. Its sources come
            // from GitHub (KATA_SRC or a local mirror, see ci/TOOLS.md); where
            // none can be had the compatibility test says so and is skipped.
            match util::ci_tool("kata-agent-ctl") {
                Ok(path) => cmd = cmd.env("OSBUILDER_KATA_AGENT_CTL", path),
                Err(e) => eprintln!("xtask: warning: no kata-agent-ctl, its compatibility test will be skipped: {e:#}"),
            }
            // Guest boots that needed a second start (common::guest::boot_to_agent)
            // are written down there: say so after the suite, pass or fail.
            let retries = util::target_dir().join("tmp/guest-retries.log");
            let _ = std::fs::remove_file(&retries);
            let result = cmd.run();
            if let Ok(text) = std::fs::read_to_string(&retries) {
                eprintln!("xtask: note: {} guest boot(s) needed a second start (agent listening, host never reached it):", text.lines().count());
                eprint!("{text}");
            }
            result
        }
        Command::Kernel { args } => {
            util::setup()?;
            bench_kernel::kernel_cmd(&util::osbuilder_binary()?, &util::target_dir().join("kernel")).args(args).run()
        }
        Command::Boot(args) => {
            util::setup()?;
            args.run()
        }
        Command::Bench(args) => {
            util::setup()?;
            args.run()
        }
    }
}
