//! `cargo xtask`: the project's own automation (setup, build, test, bench).
//!
//! xtask orchestrates; the logic lives in the `osbuilder` library and binary.
//! Every external command goes through [`util::Cmd`], which prints the command
//! line and fails with its stderr.

mod bench;
mod bench_boot;
mod bench_disk;
mod bench_erofs;
mod bench_guest;
mod bench_kernel;
mod bench_load;
mod bench_publish;
mod bench_verity;
mod boot;
mod fuzz;
mod image;
mod test;
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
    /// Set up, then run the whole test suite; list every skipped test at the end.
    Test(test::Test),
    /// Build the fuzz targets (fuzz/, cargo-fuzz) and run each with libFuzzer; fail on a crash.
    Fuzz(fuzz::Fuzz),
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
        Command::Test(args) => {
            util::setup()?;
            args.run()
        }
        Command::Kernel { args } => {
            util::setup()?;
            bench_kernel::kernel_cmd(&util::osbuilder_binary()?, &util::target_dir().join("kernel")).args(args).run()
        }
        Command::Boot(args) => {
            util::setup()?;
            args.run()
        }
        Command::Fuzz(args) => {
            util::setup()?;
            args.run()
        }
        Command::Bench(args) => {
            util::setup()?;
            args.run()
        }
    }
}
