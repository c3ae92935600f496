//! PID 1's main loop: one signalfd, no threads, no async runtime.
//!
//! SIGCHLD: reap every ended child (the workload, the agent, orphans).
//! SIGTERM/SIGINT: forwarded to the workload (a power-off when there is
//! none). SIGUSR2/SIGPWR: power off. SIGUSR1: reboot. The loop wakes early
//! only for a pending agent restart.

use std::io;
use std::time::Duration;

use crate::agent::{self, Agent, AgentCommand};
use crate::cmdline::OnExit;
use crate::shutdown;
use crate::sys::proc::{self, SignalFd};
use crate::sys::{self, exit_code, Power, Reaped, Sys};
use crate::workload::{self, Prepared, StartError};

/// The signals the loop handles; blocked and read from its signalfd.
pub const HANDLED_SIGNALS: [i32; 7] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPWR, libc::SIGHUP];

fn signal_name(signal: i32) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        libc::SIGUSR2 => "SIGUSR2".into(),
        libc::SIGPWR => "SIGPWR".into(),
        libc::SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

pub struct Supervisor<S: Sys> {
    sys: S,
    signals: SignalFd,
    on_exit: OnExit,
    shutdown_timeout: Duration,
    /// The running workload's pid.
    workload: Option<i32>,
    /// Workload events so far, replayed to a restarted agent.
    history: Vec<String>,
    agent: Option<Agent>,
    /// Set when the machine should go down.
    pending: Option<Power>,
}

impl<S: Sys> Supervisor<S> {
    /// `signals` must already be blocking [`HANDLED_SIGNALS`] (create it
    /// before starting any child, so none is missed).
    pub fn new(sys: S, signals: SignalFd, on_exit: OnExit, shutdown_timeout: Duration) -> Self {
        Supervisor { sys, signals, on_exit, shutdown_timeout, workload: None, history: Vec::new(), agent: None, pending: None }
    }

    pub fn start_agent(&mut self, command: AgentCommand) {
        let mut agent = Agent::new(command);
        agent.start(&self.history);
        self.agent = Some(agent);
    }

    /// Starts the prepared workload; a workload that cannot start counts as
    /// one that exited with the code in the error.
    pub fn start_workload(&mut self, prepared: Result<Prepared, StartError>) {
        match prepared.and_then(|p| workload::spawn(&p)) {
            Ok(pid) => {
                debug!("workload started, pid {pid}");
                self.workload = Some(pid);
                self.event(agent::started_event(pid));
            }
            Err(e) => {
                say!("start workload: {e}");
                self.workload_ended(0, e.code);
            }
        }
    }

    pub fn workload_pid(&self) -> Option<i32> {
        self.workload
    }

    /// Sends an event line to the agent (now, and again whenever it restarts).
    pub fn record(&mut self, line: String) {
        self.event(line);
    }

    fn event(&mut self, line: String) {
        if let Some(agent) = &mut self.agent {
            agent.send(&line);
        }
        self.history.push(line);
    }

    /// Reports the workload's end and applies `osb.on_exit`. `pid` is 0 when
    /// it never started.
    fn workload_ended(&mut self, pid: i32, code: i32) {
        say!("workload exited with code {code}");
        self.workload = None;
        self.event(agent::exited_event(pid, code));
        self.pending = match self.on_exit {
            OnExit::PowerOff => Some(Power::Off),
            OnExit::Reboot => Some(Power::Reboot),
            OnExit::Stay => None,
        };
    }

    fn reaped(&mut self, r: Reaped) {
        if Some(r.pid) == self.workload {
            self.workload_ended(r.pid, exit_code(r.status));
        } else if let Some(agent) = self.agent.as_mut().filter(|a| a.pid() == Some(r.pid)) {
            agent.exited(r.status);
        } else {
            debug!("reaped pid {} (code {})", r.pid, exit_code(r.status));
        }
    }

    fn reap_all(&mut self) {
        while let Ok(Some(r)) = self.sys.reap() {
            self.reaped(r);
        }
    }

    fn on_signal(&mut self, signal: i32, sender: i32) {
        match signal {
            libc::SIGCHLD => {}
            libc::SIGTERM | libc::SIGINT => match self.workload {
                Some(pid) => {
                    debug!("forwarding {} to the workload", signal_name(signal));
                    if let Err(e) = proc::kill(pid, signal) {
                        debug!("kill {pid}: {e}");
                    }
                }
                None => {
                    say!("{} and no workload: powering off", signal_name(signal));
                    self.pending = Some(Power::Off);
                }
            },
            libc::SIGUSR1 => {
                say!("reboot requested (SIGUSR1 from pid {sender})");
                self.pending = Some(Power::Reboot);
            }
            libc::SIGUSR2 | libc::SIGPWR => {
                say!("power-off requested ({} from pid {sender})", signal_name(signal));
                self.pending = Some(Power::Off);
            }
            other => debug!("ignoring {}", signal_name(other)),
        }
    }

    /// Runs until the machine should go down; returns how.
    pub fn run(&mut self) -> Power {
        loop {
            if let Some(how) = self.pending.take() {
                return how;
            }
            let timeout = self.agent.as_ref().and_then(Agent::time_to_restart);
            match self.signals.wait(timeout) {
                Ok(signals) => {
                    for (signal, sender) in signals {
                        self.on_signal(signal, sender);
                    }
                }
                Err(e) => {
                    say!("wait for signals: {e}");
                    self.sys.sleep(Duration::from_millis(100));
                }
            }
            self.reap_all();
            if let Some(agent) = self.agent.as_mut().filter(|a| a.restart_due()) {
                agent.start(&self.history);
            }
        }
    }

    /// The shutdown sequence ([`shutdown::shutdown`]); returns only if
    /// reboot(2) failed, with its error.
    pub fn finish(mut self, how: Power) -> io::Error {
        let workload = self.workload.take();
        shutdown::shutdown(&mut self.sys, how, self.shutdown_timeout, &mut |r| {
            if Some(r.pid) == workload {
                say!("workload exited with code {}", sys::exit_code(r.status));
            }
        })
    }
}
