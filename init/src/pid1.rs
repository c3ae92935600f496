//! PID 1 from start to end: boot, switch root, start the agent and the
//! workload, supervise, shut down. Never returns: a fatal error is printed
//! as `osb-init: <step>: <error>` and the machine powers off; a panic is
//! caught and does the same.

use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use osb_agent::volume::{self, MountSpec};

use crate::agent::{self, AgentCommand};
use crate::boot::{self, BootError};
use crate::config::{self, ConfigError, RunConfig, RUN_CONFIG_PATH};
use crate::network;
use crate::shutdown;
use crate::stamps;
use crate::supervisor::{Supervisor, HANDLED_SIGNALS};
use crate::sys::proc::{self, SignalFd};
use crate::sys::{Linux, Power, Sys};
use crate::workload;

/// Used when boot fails before the command line is read.
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// The hostname when neither osb.hostname nor the run config sets one.
pub const DEFAULT_HOSTNAME: &str = "osb";

/// A step that stops the boot; its text is `<step>: <error>`.
#[derive(Debug)]
pub struct Fatal(String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<BootError> for Fatal {
    fn from(e: BootError) -> Fatal {
        Fatal(e.to_string())
    }
}

impl From<ConfigError> for Fatal {
    fn from(e: ConfigError) -> Fatal {
        Fatal(e.to_string())
    }
}

/// PID 1's entry point. `agent_linked`: this binary carries the agent (run
/// as `/proc/self/exe` with argv[0] `osb-agent`), so init starts it.
pub fn main(agent_linked: bool) -> ! {
    stamps::mark("init");
    if proc::getpid() != 1 {
        eprintln!("osb-init: this is a guest's PID 1 and does nothing as pid {}", proc::getpid());
        std::process::exit(2);
    }
    panic::set_hook(Box::new(|info| say!("panic: {info}")));
    let error = panic::catch_unwind(AssertUnwindSafe(|| run(agent_linked))).unwrap_or_else(|_| {
        // The panic hook has printed it; still end cleanly.
        panic::catch_unwind(|| shutdown::shutdown(&mut Linux, Power::Off, DEFAULT_SHUTDOWN_TIMEOUT, &mut |_| {}))
            .unwrap_or_else(|_| io::Error::other("panic during shutdown"))
    });
    say!("reboot: {error}; halting here");
    proc::park()
}

/// Boots and supervises; on a fatal error prints it and shuts down.
/// Returns only if reboot(2) failed.
fn run(agent_linked: bool) -> io::Error {
    let mut sys = Linux;
    match boot_and_supervise(&mut sys, agent_linked) {
        Ok(error) => error,
        Err(fatal) => {
            say!("{fatal}");
            shutdown::shutdown(&mut sys, Power::Off, DEFAULT_SHUTDOWN_TIMEOUT, &mut |_| {})
        }
    }
}

/// The run config from the (new) root; absent means empty.
fn read_run_config(sys: &mut dyn Sys) -> Result<RunConfig, Fatal> {
    match sys.read_file(RUN_CONFIG_PATH) {
        Ok(text) => Ok(RunConfig::parse(&text)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(RunConfig::default()),
        Err(e) => Err(Fatal(format!("read {RUN_CONFIG_PATH}: {e}"))),
    }
}

/// Makes the boot's mounts in order. A failure stops the boot unless the mount is
/// `nofail`; then it is reported (console, and the agent's ListStorages) and the boot
/// goes on. `events` gets one line per mount for the agent.
fn mount_volumes(ops: &mut dyn volume::Ops, mounts: &[MountSpec], hosts: &[(String, String)], events: &mut dyn FnMut(String)) -> Result<(), Fatal> {
    for spec in mounts {
        match volume::mount(ops, spec, true, hosts) {
            Ok(done) => {
                debug!("mounted {} on {} ({})", done.device, spec.target, done.fstype);
                events(agent::mount_event(spec, &done.device, ""));
            }
            Err(e) if e.nofail => {
                say!("warning: {e}; it is nofail: going on without it");
                events(agent::mount_event(spec, "", &e.cause));
            }
            Err(e) => return Err(Fatal(e.to_string())),
        }
    }
    Ok(())
}

fn boot_and_supervise(sys: &mut Linux, agent_linked: bool) -> Result<io::Error, Fatal> {
    // First: PID 1 drops unblocked signals it has no handler for; blocked
    // ones wait for the signalfd.
    proc::block_signals(&HANDLED_SIGNALS).map_err(|e| Fatal(format!("block signals: {e}")))?;
    let opts = boot::early_boot(sys)?;
    stamps::mark("mounted");
    // After the console is on fds 0-2 (they may be closed before), and
    // before any child exists.
    let signals = SignalFd::new(&HANDLED_SIGNALS).map_err(|e| Fatal(format!("open a signalfd: {e}")))?;
    boot::switch_root(sys, &opts)?;
    if opts.root != crate::cmdline::RootSource::Initramfs {
        stamps::mark("root");
    }
    let run_config = read_run_config(sys)?;

    let hostname = opts.hostname.as_deref().or(run_config.hostname.as_deref()).unwrap_or(DEFAULT_HOSTNAME);
    if let Err(e) = sys.sethostname(hostname) {
        say!("warning: set hostname {hostname:?}: {e}");
    }

    let mut supervisor = Supervisor::new(Linux, signals, opts.on_exit, opts.shutdown_timeout);
    // Before the agent and the workload: neither may see a mount point still empty
    // or the network unconfigured. The network first: NFS volumes need it.
    let mut hosts = Vec::new();
    if let Some(network) = &run_config.network {
        network::configure(network).map_err(Fatal)?;
        network::install_etc_file("hosts", &network::hosts_file(hostname, &network.hosts)).map_err(|e| Fatal(format!("network: {e}")))?;
        if let Some(dns) = &network.dns {
            network::install_etc_file("resolv.conf", &network::resolv_conf(dns)).map_err(|e| Fatal(format!("network: {e}")))?;
        }
        hosts = network.host_addresses();
    }
    let mounts = config::mounts(&run_config, &opts)?;
    mount_volumes(&mut volume::Linux, &mounts, &hosts, &mut |line| supervisor.record(line))?;
    if opts.agent && agent_linked {
        supervisor.start_agent(AgentCommand::linked(opts.agent_port, opts.agent_allow_cid.as_deref()));
    } else {
        debug!("no agent ({})", if opts.agent { "not linked into this binary" } else { "osb.agent=0" });
    }
    match config::merge(&run_config, &opts) {
        Some(w) => {
            let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
            supervisor.start_workload(workload::prepare(&w, read, workload::file_kind));
        }
        None => say!("no workload in {RUN_CONFIG_PATH} or osb.cmd; staying up"),
    }
    let how = supervisor.run();
    Ok(supervisor.finish(how))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::record::Recorder;

    #[test]
    fn run_config_is_optional_but_must_be_valid() {
        let mut sys = Recorder::new();
        assert_eq!(read_run_config(&mut sys).unwrap(), RunConfig::default(), "no file: no config");
        sys.files.insert(RUN_CONFIG_PATH.into(), r#"{"cmd":["true"]}"#.into());
        assert_eq!(read_run_config(&mut sys).unwrap().cmd, Some(vec!["true".to_owned()]));
        sys.files.insert(RUN_CONFIG_PATH.into(), "{".into());
        let err = read_run_config(&mut sys).unwrap_err().to_string();
        assert!(err.starts_with("/etc/osb/run.json: not valid JSON"), "{err}");
    }
}
