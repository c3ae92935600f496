//! The guest side: our kernel (built once per input hash, shared with
//! `cargo xtask kernel`), the static init+agent binary and vhost-device-vsock
//! that `cargo xtask test` provides through the environment.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use super::tool;

pub fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `osbuilder kernel` with its default cache (shared with `cargo xtask
/// kernel`, so a kernel built by either is a cache hit for the other).
pub fn osbuilder_kernel(args: &[&str], config_dir: &Path, out: &Path) -> Output {
    tool(env!("CARGO_BIN_EXE_osbuilder"))
        .arg("kernel")
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--patches-dir")
        .arg(project_root().join("patches"))
        .arg("-o")
        .arg(out)
        .args(args)
        .env_remove("SOURCE_DATE_EPOCH")
        .output()
        .expect("run osbuilder kernel")
}

pub struct Built {
    pub out: PathBuf,
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub config: String,
}

/// The default kernel, built once per test process (and cached across runs).
pub fn default_kernel() -> &'static Built {
    static CELL: OnceLock<Built> = OnceLock::new();
    CELL.get_or_init(|| {
        let out = tempfile::Builder::new().prefix("osbuilder-kernel-").tempdir().unwrap().keep();
        let result = osbuilder_kernel(&[], &project_root().join("kernel-config"), &out);
        assert!(result.status.success(), "kernel build failed:\n{}", String::from_utf8_lossy(&result.stderr));
        let find = |prefix: &str| {
            fs::read_dir(&out)
                .unwrap()
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix}* in {}", out.display()))
        };
        let config = fs::read_to_string(find("config-")).unwrap();
        Built { vmlinux: find("vmlinux-"), bzimage: find("vmlinuz-"), config, out }
    })
}

/// A path from the environment `cargo xtask test` sets up.
fn from_env(var: &str, what: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => panic!("{var} is not set: run the suite with `cargo xtask test`, which builds {what}"),
    }
}

/// The static `osb-init` (init + agent).
pub fn guest_init() -> PathBuf {
    from_env("OSBUILDER_GUEST_INIT", "the static osb-init")
}

/// vhost-device-vsock, which osbuilder::vm finds through the same variable.
pub fn require_vhost_device_vsock() -> PathBuf {
    from_env("OSBUILDER_VHOST_DEVICE_VSOCK", "vhost-device-vsock (ci/tools.sh)")
}

/// rust-vmm's virtiofsd (`ci/tools.sh virtiofsd`), for virtio-fs volumes.
pub fn require_virtiofsd() -> PathBuf {
    from_env("OSBUILDER_VIRTIOFSD", "virtiofsd (ci/tools.sh)")
}

/// One guest at a time: on 2 cores parallel TCG guests only compete, and a
/// run with five vhost-device-vsock + QEMU pairs at once once lost the
/// vhost-user socket of a q35 guest (not understood yet; see the notes).
pub fn one_guest_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A path of the Debian image as umoci unpacks it (once per test binary).
pub fn debian_rootfs_file(rel: &str) -> PathBuf {
    static ROOT: OnceLock<super::Scratch> = OnceLock::new();
    ROOT.get_or_init(|| super::umoci_unpack(&super::debian_layout(), super::DEBIAN_TAG)).path().join(rel)
}

/// The sha256 of every regular file under the guest's /usr/bin equals the
/// image's (umoci's unpack on the host), read through whatever disk,
/// filesystem and device-mapper stack the guest booted from.
pub fn assert_usr_bin_matches_the_image(client: &osb_agent::client::Client) {
    const LIST: &str = "find . -type f | sort | xargs sha256sum";
    let mut spec = osb_agent::client::ExecSpec::new(["/bin/sh", "-c", &format!("cd /usr/bin && {LIST}")]);
    spec.timeout = Some(std::time::Duration::from_secs(120));
    let out = client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec sha256sum in /usr/bin: {e}"));
    assert_eq!(out.code, 0, "{}", String::from_utf8_lossy(&out.stderr));
    let guest = String::from_utf8_lossy(&out.stdout).into_owned();
    let host = super::run_stdout(tool("sh").arg("-c").arg(LIST).current_dir(debian_rootfs_file("usr/bin")));
    assert!(guest.lines().count() > 100, "{guest}");
    assert_eq!(guest, host, "/usr/bin in the guest differs from the image");
}

/// Where guest boots that needed a second start are written down; `cargo
/// xtask test` prints this file after the suite, so a retry is never silent.
pub fn retry_log() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-retries.log")
}

/// Starts `cfg` and waits up to `limit` for the agent on vsock port 1024
/// ([`osbuilder::vm::Vm::start_with_agent`]: a guest whose agent listens but
/// is never reached gets one fresh start, recorded in [`retry_log`]).
pub fn boot_to_agent(cfg: &osbuilder::vm::VmConfig, limit: std::time::Duration) -> (osbuilder::vm::Vm, osb_agent::client::Client) {
    use std::io::Write as _;
    let (vm, client) = osbuilder::vm::Vm::start_with_agent(cfg, 1024, limit, &mut |why| {
        eprintln!("{why}");
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(retry_log()) {
            let _ = writeln!(f, "{why}");
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{}: agent healthy {:.2}s after QEMU start ({})", cfg.work_dir.display(), vm.started.elapsed().as_secs_f64(), vm.accel);
    (vm, client)
}

/// `osbuilder disk` of the Debian image with our init (`--init`) and `args`,
/// into `dir/NAME.img` with its report, parsed.
pub fn debian_guest_disk(dir: &Path, name: &str, args: &[&str]) -> (PathBuf, serde_json::Value) {
    let out = dir.join(format!("{name}.img"));
    let report = dir.join(format!("{name}.json"));
    let init = guest_init();
    let r = tool(env!("CARGO_BIN_EXE_osbuilder"))
        .args(["disk", "--quiet", "--image", &super::oci_ref(&super::debian_layout(), super::DEBIAN_TAG), "--init", init.to_str().unwrap()])
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(r.status.success(), "osbuilder disk {args:?}: {}", String::from_utf8_lossy(&r.stderr));
    let json: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    (out, json)
}
