//! `osbuilder vm ...`: boot a guest with its agent, and talk to an agent
//! (ours or Kata's protocol) over vsock or a hybrid-vsock socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};

use osb_agent::client::{Client, Endpoint, ExecSpec, User, DEFAULT_PORT};
use osb_agent::proto::storage::{Storage, StorageState};
use osb_agent::volume::MountSpec;
use osbuilder::disk::image::Cmdline;
use osbuilder::vm::{DiskAttach, Machine, Via, Vm, VmConfig, Volume};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a kernel + initrd (or a disk) under QEMU with vsock, wait for
    /// the agent's health check, then run a command through it or power off.
    Boot(Box<BootArgs>),
    /// Health check (grpc.Health/Check) and version.
    Check(AgentArgs),
    /// Agent version, guest details and the guest's resources.
    Info(AgentArgs),
    /// Run a command in the guest; exits with its exit code.
    Exec(ExecArgs),
    /// Copy a host file into the guest.
    Cp {
        #[command(flatten)]
        agent: AgentArgs,
        /// Host file.
        src: PathBuf,
        /// Absolute path in the guest.
        dest: String,
    },
    /// Send a signal to a process started through the agent.
    Signal {
        #[command(flatten)]
        agent: AgentArgs,
        /// Container id (`workload` for the image's own command).
        #[arg(long, default_value = "osb")]
        container: String,
        /// Exec id.
        exec_id: String,
        /// Signal number.
        #[arg(default_value_t = 15)]
        signal: i32,
    },
    /// Orderly poweroff (DestroySandbox).
    Shutdown(AgentArgs),
    /// Volumes after boot: mount, unmount and list them through the agent's
    /// storage calls (grpc.StorageService).
    #[command(subcommand)]
    Storage(StorageCommand),
}

#[derive(Subcommand)]
pub enum StorageCommand {
    /// Mount a volume in the running guest (MountStorage): the same
    /// SOURCE TARGET [TYPE [OPTIONS]] as `--mount` (one argument, fstab
    /// escapes such as \040 for a space, or two to four), e.g.
    /// `SERIAL=data-1 /data ext4 rw,x-osb.wait=30` after a device_add.
    Mount {
        #[command(flatten)]
        agent: AgentArgs,
        /// Kata's storage driver (blk, scsi, virtio-fs, 9p, nfs, ephemeral,
        /// bind, ...): implies the type when TYPE is left out or `auto`.
        #[arg(long)]
        driver: Option<String>,
        #[arg(value_name = "SPEC", required = true, num_args = 1..=4)]
        spec: Vec<String>,
    },
    /// Unmount a volume the boot or `storage mount` mounted (UnmountStorage).
    Unmount {
        #[command(flatten)]
        agent: AgentArgs,
        /// Detach it even while files on it are open (MNT_DETACH).
        #[arg(long)]
        detach: bool,
        /// The mount point in the guest.
        target: String,
    },
    /// The volumes mounted (and the boot's `nofail` ones that failed, with why).
    List {
        #[command(flatten)]
        agent: AgentArgs,
        /// One JSON array instead of the table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct AgentArgs {
    /// The agent: hvsock:///PATH:PORT (Firecracker / Cloud Hypervisor /
    /// vhost-device-vsock socket), vsock://CID:PORT or unix:///PATH.
    #[arg(long, env = "OSBUILDER_AGENT")]
    agent: Endpoint,
    /// Timeout of each call, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
}

impl AgentArgs {
    fn client(&self) -> anyhow::Result<Client> {
        Client::connect(&self.agent, Duration::from_secs(self.timeout)).with_context(|| format!("connecting to the agent at {}", self.agent))
    }
}

#[derive(Args)]
pub struct ExecArgs {
    #[command(flatten)]
    agent: AgentArgs,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Args, Clone)]
pub struct ProcessArgs {
    /// Pass our stdin to the process.
    #[arg(long, short)]
    interactive: bool,
    /// Run on a pseudo-terminal.
    #[arg(long, short)]
    tty: bool,
    /// UID[:GID] in the guest (default root).
    #[arg(long, short)]
    user: Option<String>,
    /// Working directory in the guest.
    #[arg(long, short = 'w', default_value = "/")]
    workdir: String,
    /// KEY=VALUE (repeatable).
    #[arg(long, short)]
    env: Vec<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct BootArgs {
    /// Kernel image (bzImage, or vmlinux for PVH).
    #[arg(long)]
    kernel: PathBuf,
    /// Initrd (e.g. from `osbuilder initrd --init`).
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "microvm")]
    machine: Machine,
    /// A disk image from `osbuilder disk`: its root is booted (no initrd
    /// needed) with the kernel arguments for --via. Raw or qcow2 (told by
    /// the file's magic and passed to QEMU as format=; a qcow2 with a
    /// backing or data file is refused).
    #[arg(long, requires = "via")]
    disk: Option<PathBuf>,
    /// How the guest sees --disk: pmem (NVDIMM with DAX; needs --machine q35
    /// and a --dax image), virtio-blk or virtio-scsi.
    #[arg(long, value_enum)]
    via: Option<Via>,
    /// The report `osbuilder disk --report` wrote: its `cmdline` entry for
    /// --via is used as is (default: recognise the disk's layout and assume
    /// the guest init at /.osb/init, as `osbuilder disk --init` puts it).
    /// For a --verity disk booted with --initrd (an initramfs holding
    /// osb-init), its `verity.initrd_cmdline` entry is used instead.
    #[arg(long, requires = "disk")]
    disk_report: Option<PathBuf>,
    /// A data volume for the guest's run config `mounts` (repeatable):
    /// PATH[,via=virtio-blk|virtio-scsi][,serial=S][,ro] (raw or qcow2, as
    /// for --disk; virtio-blk unless told; `SERIAL=S` finds it in the guest).
    #[arg(long, value_name = "PATH[,OPTS]", value_parser = Volume::parse_disk)]
    volume: Vec<Volume>,
    /// A host directory shared over 9p (QEMU's `-fsdev local`), mounted in
    /// the guest by its tag: DIR,tag=TAG[,ro] (repeatable).
    #[arg(long, value_name = "DIR,tag=TAG[,ro]", value_parser = Volume::parse_share)]
    share: Vec<Volume>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u32,
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Extra kernel command line (e.g. osb.cmd=..., osb.on_exit=stay).
    #[arg(long, default_value = "")]
    append: String,
    /// Replace our kernel arguments (console=ttyS0 panic=-1 ...; see
    /// kernel-config/README.md) with these; --append and a disk's root
    /// arguments still follow.
    #[arg(long, value_name = "ARGS")]
    kernel_args: Option<String>,
    /// microvm: QEMU's ACPI tables on or off [default: off; q35 has ACPI].
    #[arg(long, value_enum)]
    acpi: Option<Toggle>,
    /// Directory for the sockets and console log (default: a temporary one).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Agent vsock port.
    #[arg(long, default_value_t = DEFAULT_PORT)]
    port: u32,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Stay up after the health check until the guest powers off (Ctrl-C kills it).
    #[arg(long)]
    keep: bool,
    /// Print one JSON line with the timings and the agent's RSS.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    process: ProcessArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Toggle {
    On,
    Off,
}

pub fn run(cmd: VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Boot(args) => boot(*args),
        VmCommand::Check(a) => {
            let c = a.client()?;
            let ok = c.check()?;
            let v = c.version()?;
            println!("{} (agent {}, grpc {})", if ok { "SERVING" } else { "NOT SERVING" }, v.agent_version, v.grpc_version);
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        VmCommand::Info(a) => {
            let c = a.client()?;
            let v = c.version()?;
            let d = c.guest_details()?;
            let r = c.resources()?;
            println!("agent version:        {}", v.agent_version);
            println!("memory block size:    {} bytes", d.mem_block_size_bytes);
            println!("mem hotplug probe:    {}", d.support_mem_hotplug_probe);
            println!("cpus online:          {}", r.cpus_online);
            println!("memory total:         {} bytes", r.mem_total_bytes);
            println!("memory available:     {} bytes", r.mem_available_bytes);
            println!("cgroup:               {}", r.cgroup);
            println!("cgroup memory.max:    {}", r.cgroup_memory_max_bytes.map_or("max".into(), |v| v.to_string()));
            println!("cgroup cpu.max:       {}", r.cgroup_cpu_max.map_or("max".into(), |(q, p)| format!("{q} {p}")));
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Exec(a) => {
            let c = a.agent.client()?;
            exec(&c, &a.process)
        }
        VmCommand::Cp { agent, src, dest } => {
            let c = agent.client()?;
            c.copy_file(&src, &dest, 0, 0).with_context(|| format!("copying {} to {dest}", src.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Signal { agent, container, exec_id, signal } => {
            let c = agent.client()?;
            c.signal(&osb_agent::client::ProcessId { container_id: container, exec_id }, signal)?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Shutdown(a) => {
            a.client()?.destroy_sandbox()?;
            Ok(ExitCode::SUCCESS)
        }
        VmCommand::Storage(cmd) => storage(cmd),
    }
}

/// `SOURCE TARGET [TYPE [OPTIONS]]` (one fstab-style argument or its fields) and
/// `--driver` as Kata's Storage message, checked as the agent will check it.
fn storage_of_args(driver: Option<&str>, spec: &[String]) -> anyhow::Result<Storage> {
    let fields: Vec<String> = match spec {
        [line] => line.split_whitespace().map(osb_agent::volume::unescape_field).collect(),
        fields => fields.to_vec(),
    };
    if !(2..=4).contains(&fields.len()) {
        bail!("{:?}: expected SOURCE TARGET [TYPE [OPTIONS]]", spec.join(" "));
    }
    let storage = Storage {
        driver: driver.unwrap_or_default().to_owned(),
        source: fields[0].clone(),
        mount_point: fields[1].clone(),
        fstype: fields.get(2).cloned().unwrap_or_default(),
        options: fields.get(3).into_iter().cloned().collect(),
        ..Default::default()
    };
    MountSpec::from_storage(&storage).map_err(|e| anyhow::anyhow!("{}: {e}", fields.join(" ")))?;
    Ok(storage)
}

fn storage(cmd: StorageCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StorageCommand::Mount { agent, driver, spec } => {
            let storage = storage_of_args(driver.as_deref(), &spec)?;
            let target = storage.mount_point.clone();
            let done = agent.client()?.mount_storage(storage).with_context(|| format!("mounting {target}"))?;
            println!("mounted {} ({}) on {target}", done.device, done.fstype);
        }
        StorageCommand::Unmount { agent, detach, target } => {
            agent.client()?.unmount_storage(&target, detach).with_context(|| format!("unmounting {target}"))?;
        }
        StorageCommand::List { agent, json } => {
            let listed = agent.client()?.list_storages()?;
            if json {
                let rows: Vec<serde_json::Value> = listed
                    .iter()
                    .map(|s| {
                        serde_json::json!({
                            "mount_point": s.storage.mount_point,
                            "source": s.storage.source,
                            "driver": s.storage.driver,
                            "fstype": s.storage.fstype,
                            "options": s.storage.options,
                            "mounted": s.mounted,
                            "device": s.device,
                            "error": s.error,
                            "origin": s.origin,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                print!("{}", storage_table(&listed));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// ListStorages as aligned columns, a failed mount's cause on the line below it.
fn storage_table(listed: &[StorageState]) -> String {
    let dash = |s: &str| if s.is_empty() { "-".to_owned() } else { s.to_owned() };
    let mut rows = vec![["MOUNT POINT", "SOURCE", "TYPE", "DEVICE", "STATE", "ORIGIN", "OPTIONS"].map(str::to_owned)];
    let mut causes = vec![String::new()];
    for s in listed {
        let st = &s.storage;
        rows.push([
            st.mount_point.clone(),
            st.source.clone(),
            dash(&st.fstype),
            dash(&s.device),
            if s.mounted { "mounted" } else { "failed" }.to_owned(),
            s.origin.clone(),
            st.options.join(","),
        ]);
        causes.push(s.error.clone());
    }
    let widths: Vec<usize> = (0..7).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for (row, cause) in rows.iter().zip(&causes) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
        if !cause.is_empty() {
            out.push_str(&format!("  error: {cause}\n"));
        }
    }
    out
}

fn parse_user(s: &str) -> anyhow::Result<User> {
    let (uid, gid) = s.split_once(':').unwrap_or((s, s));
    match (uid.parse(), gid.parse()) {
        (Ok(uid), Ok(gid)) => Ok(User { uid, gid, ..User::default() }),
        _ if !s.contains(':') => Ok(User { username: s.to_string(), ..User::default() }),
        _ => bail!("--user {s:?} is not UID[:GID] or a user name"),
    }
}

fn exec(client: &Client, p: &ProcessArgs) -> anyhow::Result<ExitCode> {
    if p.command.is_empty() {
        bail!("no command given");
    }
    let mut spec = ExecSpec::new(p.command.clone());
    spec.env = p.env.clone();
    spec.cwd = p.workdir.clone();
    spec.tty = p.tty;
    if let Some(u) = &p.user {
        spec.user = parse_user(u)?;
    }
    let code = if p.interactive {
        client.exec_streaming(&spec, std::io::stdin(), std::io::stdout(), std::io::stderr())?
    } else {
        client.exec_streaming(&spec, std::io::empty(), std::io::stdout(), std::io::stderr())?
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

/// The kernel arguments that boot `disk` through `via`: from the build
/// report when given, else from the disk's recognised layout.
fn disk_cmdline(disk: &std::path::Path, via: Via, report: Option<&std::path::Path>, initrd: bool) -> anyhow::Result<String> {
    let cmdline: Cmdline = match report {
        Some(path) => {
            let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
                .with_context(|| format!("{} is not JSON", path.display()))?;
            let verity_initrd = &json["disk"]["verity"]["initrd_cmdline"];
            let c = if initrd && verity_initrd.is_object() { verity_initrd } else { &json["cmdline"] };
            let field = |k: &str| c[k].as_str().map(str::to_string);
            Cmdline {
                pmem: field("pmem"),
                virtio_blk: field("virtio-blk").with_context(|| format!("{} has no cmdline (is it a disk report?)", path.display()))?,
                virtio_scsi: field("virtio-scsi").with_context(|| format!("{} has no cmdline (is it a disk report?)", path.display()))?,
            }
        }
        None => {
            if second_partition(disk).with_context(|| format!("reading {}", disk.display()))? {
                bail!(
                    "{} has a second partition (an `osbuilder disk --verity` hash tree?): its kernel arguments need the root hash, pass the build's --disk-report",
                    disk.display()
                );
            }
            let (table, dax) = osbuilder::disk::image::probe(disk).with_context(|| format!("reading {}", disk.display()))?;
            let fs = osbuilder::disk::image::probe_fs(disk, table, dax).with_context(|| format!("reading {}", disk.display()))?;
            osbuilder::disk::image::cmdline(table, dax, fs, Some(osbuilder::pipeline::DISK_INIT_PATH))
        }
    };
    match cmdline.get(via) {
        Some(c) => Ok(c.to_string()),
        None => bail!("{} has no DAX layout, so it cannot be booted through pmem (build it with `osbuilder disk --dax`)", disk.display()),
    }
}

/// Whether the disk's table lists a partition 2 (MBR entry 2, or GPT entry
/// 2 at LBA 2): `osbuilder disk` writes one only for the verity hash tree.
fn second_partition(disk: &std::path::Path) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(disk)?;
    let mut mbr = [0u8; 512];
    if file.read_at(&mut mbr, 0)? < 512 || mbr[510..] != [0x55, 0xaa] {
        return Ok(false);
    }
    if mbr[446 + 4] == 0xee {
        let mut entry = [0u8; 16];
        file.read_at(&mut entry, 2 * 512 + 128)?;
        return Ok(entry.iter().any(|&b| b != 0));
    }
    Ok(mbr[446 + 16 + 4] != 0)
}

fn boot(args: BootArgs) -> anyhow::Result<ExitCode> {
    let tmp;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::Builder::new().prefix("osbuilder-vm-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut cfg = VmConfig::new(&args.kernel, args.initrd.clone(), &work_dir);
    cfg.machine = args.machine;
    cfg.mem_mib = args.mem;
    cfg.cpus = args.cpus;
    cfg.append = args.append.clone();
    cfg.kernel_args = args.kernel_args.clone();
    if args.acpi.is_some() && args.machine != Machine::Microvm {
        bail!("--acpi is a microvm option (q35 always has ACPI)");
    }
    cfg.acpi = args.acpi == Some(Toggle::On);
    cfg.volumes = args.volume.iter().chain(&args.share).cloned().collect();
    if let (Some(disk), Some(via)) = (&args.disk, args.via) {
        let root = disk_cmdline(disk, via, args.disk_report.as_deref(), args.initrd.is_some())?;
        cfg.append = if cfg.append.is_empty() { root } else { format!("{root} {}", cfg.append) };
        cfg.disk = Some(DiskAttach { path: disk.clone(), via });
    }
    let (mut vm, client) = Vm::start_with_agent(&cfg, args.port, Duration::from_secs(args.timeout), &mut |why| eprintln!("osbuilder: warning: {why}"))?;
    let endpoint = Endpoint::HybridVsock { path: vm.vsock_socket.clone(), port: args.port };
    let health_seconds = vm.started.elapsed().as_secs_f64();
    if args.json {
        // From the agent's own metrics: its RSS and the guest uptime when it
        // started listening.
        let asked = vm.started.elapsed().as_secs_f64();
        let metrics = client.metrics().unwrap_or_default();
        let answered = vm.started.elapsed().as_secs_f64();
        let metric = |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()));
        let timeline = osbuilder::vm::BootTimeline::from_metrics(&metrics, asked, answered, health_seconds);
        let phases: serde_json::Map<String, serde_json::Value> =
            timeline.iter().flat_map(|t| t.phases()).map(|(name, secs)| (name.to_string(), serde_json::json!(secs))).collect();
        let stamps: serde_json::Map<String, serde_json::Value> =
            timeline.iter().flat_map(|t| t.stamps.clone()).map(|(name, secs)| (name, serde_json::json!(secs))).collect();
        println!(
            "{}",
            serde_json::json!({
                "health_seconds": health_seconds,
                "accel": vm.accel,
                "machine": format!("{:?}", args.machine).to_lowercase(),
                "agent_rss_bytes": metric("osb_agent_rss_bytes"),
                "agent_ready_uptime_seconds": metric("osb_agent_ready_uptime_seconds"),
                "guest_memory_total_bytes": metric("osb_guest_memory_total_bytes"),
                // Seconds: QEMU start -> kernel clock zero -> init -> agent
                // listening -> health answer (BootTimeline), and the guest
                // uptime at each boot stamp.
                "cmdline": cfg.cmdline(vm.accel),
                "phases": phases,
                "boot_stamps": stamps,
            })
        );
    }
    eprintln!(
        "osbuilder: agent healthy {:.2}s after QEMU start ({}, {:?}); agent {endpoint}; console {}",
        health_seconds,
        vm.accel,
        args.machine,
        vm.console.display()
    );
    let code = if !args.process.command.is_empty() { exec(&client, &args.process)? } else { ExitCode::SUCCESS };
    if args.keep {
        eprintln!("osbuilder: guest running; `osbuilder vm exec --agent {endpoint} -- CMD`; Ctrl-C stops it");
        vm.wait_exit(Duration::from_secs(u64::MAX / 4))?;
        return Ok(code);
    }
    // DestroySandbox may race the poweroff that answers it: ignore its error
    // and judge by the VM ending.
    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).context("the guest did not power off after DestroySandbox")?;
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_arguments_are_one_line_or_its_fields() {
        let words = |s: &[&str]| s.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let one = storage_of_args(None, &words(&["LABEL=my\\040data /data ext4 ro,x-osb.wait=9"])).unwrap();
        let fields = storage_of_args(None, &words(&["LABEL=my data", "/data", "ext4", "ro,x-osb.wait=9"])).unwrap();
        assert_eq!(one, fields);
        assert_eq!((one.source.as_str(), one.options.as_slice()), ("LABEL=my data", &["ro,x-osb.wait=9".to_owned()][..]));
        let fs = storage_of_args(Some("virtio-fs"), &words(&["shared", "/mnt/s"])).unwrap();
        assert_eq!((fs.driver.as_str(), fs.fstype.as_str()), ("virtio-fs", ""));
        for (bad, why) in [
            (&["/dev/vdb"][..], "expected SOURCE TARGET"),
            (&["shared", "/mnt/s"][..], "no block device"),
            (&["/dev/vdb", "data"][..], "not an absolute path"),
            (&["/dev/vdb", "/d", "ext4", "nofail"][..], "nofail means nothing"),
        ] {
            let err = storage_of_args(None, &words(bad)).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_storage_table_aligns_and_gives_causes() {
        let state = |target: &str, mounted: bool, error: &str| StorageState {
            storage: Some(Storage { source: "LABEL=x".into(), mount_point: target.into(), options: vec!["rw".into()], ..Default::default() }).into(),
            mounted,
            error: error.into(),
            origin: "boot".into(),
            device: if mounted { "/dev/vdb".into() } else { String::new() },
            ..Default::default()
        };
        let table = storage_table(&[state("/data", true, ""), state("/a/long/path", false, "device LABEL=x not there after 1.0 s")]);
        assert_eq!(
            table,
            "MOUNT POINT   SOURCE   TYPE  DEVICE    STATE    ORIGIN  OPTIONS\n\
             /data         LABEL=x  -     /dev/vdb  mounted  boot    rw\n\
             /a/long/path  LABEL=x  -     -         failed   boot    rw\n  \
             error: device LABEL=x not there after 1.0 s\n"
        );
    }
}
