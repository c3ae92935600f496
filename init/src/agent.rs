//! The agent as a child of PID 1: started from this very binary
//! (`/proc/self/exe` with argv[0] `osb-agent`), given the read end of a pipe
//! as fd 3 on which init writes workload events (one JSON object a line),
//! and restarted with exponential backoff when it dies.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::sys::{self, proc};

/// The fd number the agent reads workload events from.
pub const EVENTS_FD: i32 = 3;
/// First restart delay; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// An agent that ran this long before dying restarts after [`MIN_BACKOFF`].
pub const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// `{"event":"started","pid":N}`.
pub fn started_event(pid: i32) -> String {
    format!("{{\"event\":\"started\",\"pid\":{pid}}}\n")
}

/// `{"event":"exited","pid":N,"code":C}`.
pub fn exited_event(pid: i32, code: i32) -> String {
    format!("{{\"event\":\"exited\",\"pid\":{pid},\"code\":{code}}}\n")
}

/// `{"event":"mount","spec":LINE,"device":D,"error":E}`: a boot mount, for the
/// agent's ListStorages (`error` empty when mounted).
pub fn mount_event(spec: &osb_agent::volume::MountSpec, device: &str, error: &str) -> String {
    let mut line = serde_json::json!({"event": "mount", "spec": spec.to_line(), "device": device, "error": error}).to_string();
    line.push('\n');
    line
}

/// How to start the agent.
#[derive(Clone, Debug)]
pub struct AgentCommand {
    pub program: PathBuf,
    pub argv0: String,
    pub args: Vec<String>,
    /// Pass init's boot stamps ([`crate::stamps`]) as `--boot-stamps`.
    pub boot_stamps: bool,
}

impl AgentCommand {
    /// The agent linked into this binary, listening on vsock `port` for the peer
    /// `allow_cid` (a CID or `any`; None: the agent's default, the host).
    pub fn linked(port: u32, allow_cid: Option<&str>) -> AgentCommand {
        let mut args = vec!["--port".into(), port.to_string(), "--workload-fd".into(), EVENTS_FD.to_string()];
        if let Some(cid) = allow_cid {
            args.extend(["--allow-cid".into(), cid.to_string()]);
        }
        AgentCommand { program: "/proc/self/exe".into(), argv0: "osb-agent".into(), args, boot_stamps: true }
    }
}

/// The agent process and its restart state.
pub struct Agent {
    command: AgentCommand,
    pid: Option<i32>,
    events: Option<OwnedFd>,
    started_at: Instant,
    backoff: Duration,
    restart_at: Option<Instant>,
}

impl Agent {
    pub fn new(command: AgentCommand) -> Agent {
        Agent { command, pid: None, events: None, started_at: Instant::now(), backoff: MIN_BACKOFF, restart_at: None }
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// Starts the agent and replays `history` (the workload events so far)
    /// on its new pipe. On failure a restart is scheduled.
    pub fn start(&mut self, history: &[String]) {
        self.restart_at = None;
        match self.spawn() {
            Ok((pid, events)) => {
                debug!("agent started, pid {pid}");
                self.pid = Some(pid);
                self.events = Some(events);
                // The boot's stamps describe the first agent only.
                self.command.boot_stamps = false;
                self.started_at = Instant::now();
                for line in history {
                    self.send(line);
                }
            }
            Err(e) => {
                say!("start agent: {e}; retrying in {:?}", self.backoff);
                self.schedule_restart();
            }
        }
    }

    fn spawn(&self) -> std::io::Result<(i32, OwnedFd)> {
        let (read, write) = proc::event_pipe()?;
        let read_fd = read.as_raw_fd();
        let mut command = Command::new(&self.command.program);
        command.arg0(&self.command.argv0).args(&self.command.args).stdin(Stdio::null());
        if self.command.boot_stamps {
            crate::stamps::mark("spawn");
            command.arg("--boot-stamps").arg(crate::stamps::arg());
        }
        // SAFETY: the closure runs between fork and exec in a single-threaded
        // child and only makes async-signal-safe syscalls on fd numbers;
        // `read` stays open in the parent until spawn returns.
        unsafe {
            command.pre_exec(move || {
                proc::child_reset_signals()?;
                proc::child_new_session(false)?;
                proc::child_install_fd(read_fd, EVENTS_FD)
            });
        }
        let child = command.spawn()?;
        drop(read);
        Ok((child.id() as i32, write))
    }

    /// Writes one event line; a dead or stuck reader loses it (it gets the
    /// history again when restarted).
    pub fn send(&mut self, line: &str) {
        if let Some(fd) = &self.events {
            if let Err(e) = proc::write_all_nonblocking(fd, line.as_bytes()) {
                debug!("workload event to the agent: {e}");
            }
        }
    }

    /// The agent ended: report it and schedule its restart.
    pub fn exited(&mut self, status: i32) {
        self.pid = None;
        self.events = None;
        if self.started_at.elapsed() >= HEALTHY_RUN {
            self.backoff = MIN_BACKOFF;
        }
        say!("agent exited with code {}; restarting in {:?}", sys::exit_code(status), self.backoff);
        self.schedule_restart();
    }

    fn schedule_restart(&mut self) {
        self.restart_at = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// How long until a restart is due (`None`: none pending).
    pub fn time_to_restart(&self) -> Option<Duration> {
        self.restart_at.map(|t| t.saturating_duration_since(Instant::now()))
    }

    pub fn restart_due(&self) -> bool {
        self.time_to_restart() == Some(Duration::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines() {
        let started: serde_json::Value = serde_json::from_str(&started_event(42)).unwrap();
        assert_eq!(started, serde_json::json!({"event": "started", "pid": 42}));
        let exited = exited_event(42, 143);
        assert!(exited.ends_with('\n') && exited.matches('\n').count() == 1);
        let exited: serde_json::Value = serde_json::from_str(&exited).unwrap();
        assert_eq!(exited, serde_json::json!({"event": "exited", "pid": 42, "code": 143}));
    }

    #[test]
    fn the_linked_agent_command() {
        let c = AgentCommand::linked(1024, None);
        assert_eq!((c.program.to_str().unwrap(), c.argv0.as_str()), ("/proc/self/exe", "osb-agent"));
        assert_eq!(c.args, ["--port", "1024", "--workload-fd", "3"]);
        let c = AgentCommand::linked(1024, Some("any"));
        assert_eq!(c.args, ["--port", "1024", "--workload-fd", "3", "--allow-cid", "any"]);
    }

    #[test]
    fn backoff_doubles_up_to_a_limit() {
        let mut agent = Agent::new(AgentCommand { program: "/nonexistent".into(), argv0: "x".into(), args: vec![], boot_stamps: false });
        let mut delays = Vec::new();
        for _ in 0..9 {
            delays.push(agent.backoff);
            agent.schedule_restart();
        }
        assert_eq!(delays.iter().map(|d| d.as_millis()).collect::<Vec<_>>(), [100, 200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        assert!(agent.time_to_restart().unwrap() <= MAX_BACKOFF);
    }
}
