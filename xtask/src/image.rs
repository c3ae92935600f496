//! The default guest image build and the base image it starts from.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;

use crate::util::{cache_root, hash_key, osbuilder_binary, project_root, target_dir, Cmd};

const BASE_SCRIPT: &str = "rootfs-templates/debian/make-oci-layout.sh";

/// The Debian bookworm minbase OCI layout, built by the recipe in
/// rootfs-templates/debian and cached by the recipe's hash. Returns the cache
/// directory holding `layout/` (tag `bookworm`) and `rootfs.tar`.
pub fn base_image() -> anyhow::Result<PathBuf> {
    let script = project_root().join(BASE_SCRIPT);
    let recipe = std::fs::read(&script).with_context(|| format!("reading {}", script.display()))?;
    let dir = cache_root().join("base").join(format!("debian-bookworm-minbase-{}", hash_key(&[&recipe, b"bookworm", b"minbase"])));
    if dir.join("layout/index.json").exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(dir.parent().expect("has a parent"))?;
    eprintln!("xtask: building the Debian bookworm minbase base image (debootstrap, about a minute)");
    // flock: tests and xtask may ask at the same time.
    Cmd::new("flock")
        .arg(dir.with_extension("lock"))
        .args(["bash", "-c", "[ -e \"$2/layout/index.json\" ] || \"$1\" \"$2\" bookworm minbase", "make-base"])
        .arg(&script)
        .arg(&dir)
        .run()?;
    Ok(dir)
}

#[derive(Args)]
pub struct BuildImage {
    /// Image to build from (default: the local Debian bookworm minbase layout).
    #[arg(long)]
    image: Option<String>,
    /// Output file [default: target/guest/initrd-<name>.img.gz].
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// gzip, zstd or none.
    #[arg(long, default_value = "gzip")]
    compress: String,
    /// Leave out our init (osb-init at /init with the image's run config).
    #[arg(long)]
    no_init: bool,
    /// Extra arguments for `osbuilder initrd` (e.g. --add SRC:DEST).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    extra: Vec<String>,
}

impl BuildImage {
    pub fn run(self) -> anyhow::Result<()> {
        let image = match self.image {
            Some(i) => i,
            None => format!("oci:{}:bookworm", base_image()?.join("layout").display()),
        };
        let ext = match self.compress.as_str() {
            "gzip" => ".gz",
            "zstd" => ".zst",
            _ => "",
        };
        let output = self.output.unwrap_or_else(|| target_dir().join(format!("guest/initrd-debian-bookworm.cpio{ext}")));
        std::fs::create_dir_all(output.parent().expect("has a parent"))?;
        let report = output.with_extension("report.json");
        let mut cmd =
            Cmd::new(osbuilder_binary()?).args(["initrd", "--image", &image, "--compress", &self.compress, "-o"]).arg(&output).arg("--report").arg(&report);
        if !self.no_init {
            cmd = cmd.arg("--init").arg(crate::util::guest_init_binary()?);
        }
        cmd.args(self.extra).run()?;
        eprintln!("xtask: initrd at {}, build report at {}", output.display(), report.display());
        Ok(())
    }
}
