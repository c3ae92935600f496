//! The guest under load and under faults, in few boots (TCG is slow): one
//! Debian guest takes the load (32 clients' health checks and exec/wait
//! round trips, a stream through `cat`, idle hybrid-vsock connections, a
//! workload forking 1,000 children, the agent SIGKILLed while clients are
//! busy); agent-only initrds show init's fatal boot steps (a missing root
//! device, a wrong filesystem type), each naming the step and powering off.
//! Corrupted dm-verity data at mount time is in `guest_verity.rs`, beside
//! the wrong root hash.
//!
//! Figures (round trips per second, stream MB/s, the agent's RSS) are
//! printed, never asserted: bounds are on memory growth and on completion.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::guest::*;
use common::*;
use osb_agent::client::{Client, ExecSpec, ProcessId};
use osbuilder::vm::{DiskAttach, Machine, Via, Vm, VmConfig};
use sha2::{Digest as _, Sha256};

const BOOT_LIMIT: Duration = Duration::from_secs(240);
const CLIENTS: usize = 32;
/// The stream through `cat` in the suite; `cargo xtask bench --only load`
/// streams 1 GiB (`OSBUILDER_LOAD_STREAM_MIB`).
const DEFAULT_STREAM_MIB: u64 = 128;
/// Growth of the agent's resident set across the load that counts as a
/// leak: the per-connection and per-process state is a few KiB, the byte
/// budget for frames in flight 16 MiB.
const RSS_GROWTH_LIMIT_KIB: u64 = 64 << 10;

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| tempfile::Builder::new().prefix("osbuilder-guest-load-").tempdir().unwrap().keep())
}

fn osbuilder_initrd(args: &[&str], out: &Path) {
    let r = tool(env!("CARGO_BIN_EXE_osbuilder")).args(["initrd", "--quiet"]).args(args).arg("-o").arg(out).output().unwrap();
    assert!(r.status.success(), "osbuilder initrd {args:?}: {}", String::from_utf8_lossy(&r.stderr));
}

fn vm_config(initrd: &Path, mem: u32, append: &str, name: &str) -> VmConfig {
    require_vhost_device_vsock();
    let k = default_kernel();
    let mut cfg = VmConfig::new(&k.bzimage, Some(initrd.to_path_buf()), scratch().join(name));
    cfg.machine = Machine::Microvm;
    cfg.mem_mib = mem;
    cfg.append = append.to_string();
    cfg
}

fn sh(client: &Client, script: &str) -> String {
    let mut spec = ExecSpec::new(["/bin/sh", "-c", script]);
    spec.timeout = Some(Duration::from_secs(120));
    let out = client.exec(&spec, b"").unwrap_or_else(|e| panic!("exec {script:?}: {e}"));
    assert_eq!(out.code, 0, "{script:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The agent's pid: the parent of a shell it runs.
fn agent_pid(client: &Client) -> u32 {
    let out = sh(client, "echo $PPID");
    out.trim().parse().unwrap_or_else(|_| panic!("agent pid: {out:?}"))
}

/// `VmRSS` and `VmHWM` of `pid` in KiB, read in the guest.
fn rss_kib(client: &Client, pid: u32) -> (u64, u64) {
    let status = sh(client, &format!("cat /proc/{pid}/status"));
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} in {status}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Every process of the guest as pid -> (state, command), from
/// /proc/<pid>/stat (the state follows the command's closing parenthesis).
fn guest_processes(client: &Client) -> BTreeMap<u32, (char, String)> {
    let out = sh(client, "for f in /proc/[0-9]*/stat; do cat $f 2>/dev/null; echo; done");
    let mut procs = BTreeMap::new();
    for line in out.lines().filter(|l| !l.is_empty()) {
        let (Some(open), Some(close)) = (line.find('('), line.rfind(')')) else { panic!("/proc/*/stat line: {line:?}") };
        let pid = line[..open].trim().parse().unwrap();
        let state = line[close + 1..].trim_start().chars().next().unwrap();
        procs.insert(pid, (state, line[open + 1..close].to_string()));
    }
    procs
}

/// `n` calls of `call` spread over [`CLIENTS`] connections of their own,
/// all at once; returns the failures (as text) and the elapsed time.
fn on_many_clients(vm: &Vm, n: usize, call: impl Fn(&Client, usize) -> Result<(), String> + Sync) -> (Vec<String>, Duration) {
    let endpoint = vm.agent_endpoint(1024);
    let clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(&endpoint, Duration::from_secs(60)).expect("connect")).collect();
    let start = Instant::now();
    let failures = std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(c, client)| {
                let call = &call;
                s.spawn(move || (c..n).step_by(CLIENTS).filter_map(|i| call(client, i).err()).collect::<Vec<_>>())
            })
            .collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    (failures, start.elapsed())
}

/// Pipes `mib` MiB of a fixed pseudo-random stream through `cat` in the
/// guest (WriteStdin on one thread, ReadStdout on another: the whole size
/// never sits in memory on either side) and compares sha256 of what went
/// in and what came back. Returns MB/s.
fn stream_through_cat(client: &Client, mib: u64) -> f64 {
    let total = mib << 20;
    let id = client.start(&ExecSpec::new(["cat"])).expect("start cat");
    let start = Instant::now();
    let (sent, got) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut hash = Sha256::new();
            let mut chunk = vec![0u8; 1 << 20];
            let mut state = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..mib {
                for b in chunk.chunks_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    b.copy_from_slice(&state.to_le_bytes());
                }
                hash.update(&chunk);
                let n = client.write_stdin(&id, &chunk).expect("WriteStdin");
                assert_eq!(n, chunk.len(), "WriteStdin took only part of a chunk");
            }
            client.close_stdin(&id).expect("CloseStdin");
            hex(&hash.finalize())
        });
        let mut hash = Sha256::new();
        let mut got = 0u64;
        while let Some(data) = client.read_stream(&id, true, osb_agent::client::READ_CHUNK).expect("ReadStdout") {
            got += data.len() as u64;
            hash.update(&data);
        }
        assert_eq!(got, total, "bytes back from cat");
        (writer.join().unwrap(), hex(&hash.finalize()))
    });
    assert_eq!(client.wait_timeout(&id, Duration::from_secs(60)).expect("wait cat"), 0);
    assert_eq!(got, sent, "sha256 of the bytes back from cat");
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The Debian image with our init; the workload (`osb.cmd`) forks 1,000
/// children and exits at once without waiting for them, so all of them end
/// as orphans of init, some already dead (zombies handed to init), some
/// still running. Then, on the same guest:
///
/// - no process is left in state Z once the children are gone;
/// - 32 clients make 960 health checks, none fails;
/// - 32 clients make 1,000 exec/wait round trips, each with its output;
/// - one client streams `OSBUILDER_LOAD_STREAM_MIB` (default 128) MiB
///   through `cat`, sha256 compared;
/// - the agent's RSS before and after, growth bounded;
/// - 200 idle hybrid-vsock connections (past the agent's cap of 64), then
///   a fresh client's health check;
/// - the agent SIGKILLed while 32 clients exec: each of them gets an error
///   (none hangs), init restarts the agent, and a fresh client gets health
///   and an exec from a new agent process.
#[test]
fn the_agent_serves_under_load_and_comes_back_after_a_kill() {
    let _one = one_guest_at_a_time();
    let init = guest_init();
    let initrd = scratch().join("debian-initrd.zst");
    osbuilder_initrd(&["--compress", "zstd", "--image", &oci_ref(&debian_layout(), DEBIAN_TAG), "--init", init.to_str().unwrap()], &initrd);
    let fork = r#"i=0; while [ $i -lt 1000 ]; do sleep 0.$((i % 10)) & i=$((i + 1)); done; echo forked-$i-children; exit 0"#;
    let append = format!(r#"osb.cmd=["/bin/sh","-c","{fork}"] osb.on_exit=stay"#);
    let cfg = vm_config(&initrd, 1024, &append, "load");
    let (mut vm, client) = boot_to_agent(&cfg, BOOT_LIMIT);

    // 1,000 children, no zombie.
    let workload = ProcessId { container_id: "workload".into(), exec_id: String::new() };
    assert_eq!(client.wait_timeout(&workload, Duration::from_secs(120)).expect("wait for the workload"), 0);
    assert!(vm.console_text().contains("forked-1000-children"), "{}", vm.console_text());
    let deadline = Instant::now() + Duration::from_secs(60);
    let procs = loop {
        let procs = guest_processes(&client);
        if !procs.values().any(|(_, comm)| comm == "sleep") || Instant::now() > deadline {
            break procs;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let zombies: Vec<_> = procs.iter().filter(|(_, (state, _))| *state == 'Z').collect();
    assert!(zombies.is_empty(), "zombies after the 1,000-children workload: {zombies:?}");
    let sleeping = procs.values().filter(|(_, comm)| comm == "sleep").count();
    assert_eq!(sleeping, 0, "the workload's children (sleep 0.9 at most) are gone: {procs:?}");
    eprintln!("1,000 children: none left, no zombie ({} processes in the guest)", procs.len());

    let agent = agent_pid(&client);
    let before = rss_kib(&client, agent);

    // 960 health checks from 32 clients.
    let (failures, took) = on_many_clients(&vm, 960, |c, _| match c.check() {
        Ok(true) => Ok(()),
        Ok(false) => Err("NOT_SERVING".into()),
        Err(e) => Err(e.to_string()),
    });
    assert!(failures.is_empty(), "{} of 960 health checks failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    eprintln!("960 health checks from {CLIENTS} clients: {:.2} s ({:.0}/s)", took.as_secs_f64(), 960.0 / took.as_secs_f64());

    // 1,000 exec/wait round trips from 32 clients.
    let (failures, took) = on_many_clients(&vm, 1000, |c, i| {
        let mut spec = ExecSpec::new(["echo", &format!("exec-{i}")]);
        spec.timeout = Some(Duration::from_secs(120));
        let out = c.exec(&spec, b"").map_err(|e| format!("exec {i}: {e}"))?;
        match (out.code, String::from_utf8_lossy(&out.stdout)) {
            (0, text) if text == format!("exec-{i}\n") => Ok(()),
            (code, text) => Err(format!("exec {i}: code {code}, stdout {text:?}")),
        }
    });
    assert!(failures.is_empty(), "{} of 1,000 execs failed: {:?}", failures.len(), &failures[..failures.len().min(5)]);
    eprintln!("1,000 exec/wait round trips from {CLIENTS} clients: {:.2} s ({:.1}/s)", took.as_secs_f64(), 1000.0 / took.as_secs_f64());
    let after_exec = rss_kib(&client, agent);
    // The guest's own fork/exec rate beside it, for scale.
    let t = Instant::now();
    sh(&client, "i=0; while [ $i -lt 200 ]; do /bin/echo x > /dev/null; i=$((i + 1)); done");
    eprintln!("(for scale: the guest's shell alone runs {:.0} fork/exec/wait of /bin/echo per second)", 200.0 / t.elapsed().as_secs_f64());

    // A stream through cat.
    let mib = std::env::var("OSBUILDER_LOAD_STREAM_MIB").ok().map(|v| v.parse().expect("OSBUILDER_LOAD_STREAM_MIB: MiB")).unwrap_or(DEFAULT_STREAM_MIB);
    let rate = stream_through_cat(&client, mib);
    eprintln!("{mib} MiB through cat (WriteStdin/ReadStdout, one client): {rate:.1} MB/s");
    let after_stream = rss_kib(&client, agent);
    eprintln!(
        "agent RSS KiB (VmRSS/VmHWM): before {}/{}, after the execs {}/{}, after the stream {}/{}",
        before.0, before.1, after_exec.0, after_exec.1, after_stream.0, after_stream.1
    );
    for (what, (rss, _)) in [("the execs", after_exec), ("the stream", after_stream)] {
        assert!(rss < before.0 + RSS_GROWTH_LIMIT_KIB, "the agent's RSS grew from {} KiB to {rss} KiB after {what}", before.0);
    }
    assert_eq!(agent_pid(&client), agent, "the agent was not restarted by the load");

    // Idle connections past the cap, then a fresh client.
    let endpoint = vm.agent_endpoint(1024);
    let idle: Vec<Client> =
        (0..200).map(|i| Client::connect(&endpoint, Duration::from_secs(30)).unwrap_or_else(|e| panic!("idle connection {i}: {e}"))).collect();
    let fresh = Client::connect(&endpoint, Duration::from_secs(30)).expect("connect after 200 idle connections");
    assert!(fresh.check().expect("health check after 200 idle connections"));
    drop(idle);

    // SIGKILL to the agent while 32 clients exec.
    let (done_tx, done_rx) = mpsc::channel();
    let mut workers = Vec::new();
    let progress: std::sync::Arc<Vec<std::sync::atomic::AtomicU32>> = std::sync::Arc::new((0..CLIENTS).map(|_| Default::default()).collect());
    for w in 0..CLIENTS {
        let c = Client::connect(&endpoint, Duration::from_secs(30)).expect("connect");
        let done = done_tx.clone();
        let progress = progress.clone();
        workers.push(std::thread::spawn(move || {
            let mut ok = 0u32;
            let err = loop {
                progress[w].store(ok, std::sync::atomic::Ordering::Relaxed);
                let mut spec = ExecSpec::new(["sh", "-c", "sleep 0.2; echo x"]);
                spec.timeout = Some(Duration::from_secs(60));
                match c.exec(&spec, b"") {
                    Ok(_) => ok += 1,
                    Err(e) => break e.to_string(),
                }
            };
            let _ = done.send((w, ok, err));
        }));
    }
    drop(done_tx);
    std::thread::sleep(Duration::from_secs(3));
    // From a connection of its own (`client` was the idlest and was closed
    // for the idle ones above), with the shell's builtin: the minbase image
    // has no kill(1). The agent dies before it can answer.
    let killer = Client::connect(&endpoint, Duration::from_secs(30)).expect("connect");
    let kill = killer.exec(&ExecSpec::new(["/bin/sh", "-c", &format!("kill -9 {agent}")]), b"");
    assert!(kill.is_err(), "the agent answered after its own SIGKILL: {kill:?}");
    let killed = Instant::now();
    let mut ended = Vec::new();
    while ended.len() < CLIENTS {
        match done_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(r) => ended.push(r),
            Err(_) => {
                let snap: Vec<u32> = progress.iter().map(|p| p.load(std::sync::atomic::Ordering::Relaxed)).collect();
                panic!(
                    "{} of {CLIENTS} clients neither failed nor stopped 60 s after the agent was killed (execs done per client: {snap:?}); ended: {ended:?}",
                    CLIENTS - ended.len()
                )
            }
        }
    }
    for w in workers {
        w.join().unwrap();
    }
    let ok: u32 = ended.iter().map(|(_, ok, _)| ok).sum();
    eprintln!(
        "agent killed under load: {CLIENTS} clients had {ok} execs done, all ended with errors within {:.1} s; e.g. {:?}",
        killed.elapsed().as_secs_f64(),
        ended[0].2
    );
    assert!(ok > 0, "the clients were busy before the kill: {ended:?}");
    let client = vm.wait_for_agent(1024, Duration::from_secs(60)).expect("init must restart a killed agent");
    assert!(client.check().unwrap());
    let new_agent = agent_pid(&client);
    assert_ne!(new_agent, agent, "a new agent process");
    assert!(vm.console_text().contains("agent"), "{}", vm.console_text());

    let _ = client.destroy_sandbox();
    vm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|e| panic!("DestroySandbox must power the guest off: {e}"));
    assert!(!vm.console_text().contains("Kernel panic"), "{}", vm.console_text());
}

/// Boots `initrd` with `append` (and `disk` through virtio-blk): the guest
/// must stop by itself; returns its console. No agent is waited for.
fn boot_to_poweroff(initrd: &Path, disk: Option<&Path>, append: &str, name: &str) -> String {
    let mut cfg = vm_config(initrd, 256, append, name);
    cfg.disk = disk.map(|d| DiskAttach { path: d.to_path_buf(), via: Via::VirtioBlk });
    let mut vm = Vm::start(&cfg).unwrap();
    let status = vm.wait_exit(BOOT_LIMIT).unwrap_or_else(|e| panic!("{name}: the guest must power off by itself: {e}"));
    let console = vm.console_text();
    assert!(!console.contains("Kernel panic"), "{name}: {console}");
    eprintln!("{name}: guest ended: {status}");
    console
}

/// Init's fatal boot steps, from an initrd holding only osb-init: a root
/// device that never appears (`osb.root=/dev/vdz`, no such disk) and an
/// ext4 disk (made by mke2fs) mounted as the wrong type
/// (`osb.rootfstype=erofs`). Each prints `osb-init: <step>: <error>` and
/// powers the VM off: QEMU exits, no kernel panic. (Corrupted dm-verity
/// data read at mount: `guest_verity.rs`.)
#[test]
fn init_names_the_failing_root_step_and_powers_off() {
    let _one = one_guest_at_a_time();
    let init = guest_init();
    let initrd = scratch().join("agent-initrd.gz");
    osbuilder_initrd(&["--agent-only", "--init", init.to_str().unwrap()], &initrd);

    let console = boot_to_poweroff(&initrd, None, "osb.root=/dev/vdz", "missing-root");
    assert!(
        console.contains("osb-init: wait for root device /dev/vdz: not there after 5s; check the VM's disks and osb.root"),
        "init names the missing device: {console}"
    );
    assert!(!console.contains("osb-agent: listening"), "no agent after a failed root: {console}");

    let dir = tempfile::tempdir().unwrap();
    let ext4 = dir.path().join("ext4.img");
    run(tool("mke2fs").args(["-q", "-F", "-t", "ext4"]).arg(&ext4).arg("16M"));
    let console = boot_to_poweroff(&initrd, Some(&ext4), "osb.root=/dev/vda osb.rootfstype=erofs", "wrong-fstype");
    let line = console.lines().find(|l| l.contains("osb-init: mount root /dev/vda:")).unwrap_or_else(|| panic!("init names the failed mount: {console}"));
    assert!(line.contains("osb-init: mount root /dev/vda: erofs: Invalid argument"), "only the type asked for is tried: {line}");
    assert!(!console.contains("osb-agent: listening"), "no agent after a failed root: {console}");
}
