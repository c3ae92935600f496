//! The supervisor loop for real on the host, without a VM: real children,
//! real signals, a real signalfd and waitpid(-1); only the machine-wide
//! steps (kill -1, mounts, reboot) go to a harmless stand-in for the kernel.
//!
//! No libtest harness (`harness = false`): waitpid(-1) and a process-wide
//! signal mask need this to be the only thread. The process becomes a child
//! subreaper so orphans come back to it as they would to PID 1.

use std::cell::RefCell;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use osb_init::agent::AgentCommand;
use osb_init::cmdline::OnExit;
use osb_init::config::Workload;
use osb_init::supervisor::{Supervisor, HANDLED_SIGNALS};
use osb_init::sys::proc::SignalFd;
use osb_init::sys::{Mount, Power, Reaped, Sys};
use osb_init::workload;

/// Passes reaping and sleeping through; records the machine-wide calls
/// instead of making them, and signals only this process's own children.
#[derive(Clone, Default)]
struct Host {
    ops: Rc<RefCell<Vec<String>>>,
}

impl Host {
    fn log(&self, op: String) {
        self.ops.borrow_mut().push(op);
    }
}

fn own_children() -> Vec<i32> {
    let me = std::process::id().to_string();
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1).map(str::to_owned));
        if ppid.as_deref() == Some(me.as_str()) {
            pids.push(pid);
        }
    }
    pids
}

impl Sys for Host {
    fn mount(&mut self, m: &Mount) -> io::Result<()> {
        self.log(format!("mount {}", m.target));
        Ok(())
    }
    fn umount(&mut self, target: &str, _detach: bool) -> io::Result<()> {
        self.log(format!("umount {target}"));
        Ok(())
    }
    fn mkdir(&mut self, _: &str, _: u32) -> io::Result<()> {
        unreachable!()
    }
    fn symlink(&mut self, _: &str, _: &str) -> io::Result<()> {
        unreachable!()
    }
    fn chdir(&mut self, _: &str) -> io::Result<()> {
        unreachable!()
    }
    fn chroot(&mut self, _: &str) -> io::Result<()> {
        unreachable!()
    }
    fn exists(&mut self, _: &str) -> bool {
        true // "ACPI present": power-offs stay power-offs
    }
    fn read_file(&mut self, path: &str) -> io::Result<String> {
        assert_eq!(path, "/proc/mounts");
        Ok("/dev/vda1 / ext4 rw 0 0\n/dev/vdb /data ext4 rw 0 0\n".into())
    }
    fn kernel_log(&mut self) -> io::Result<String> {
        unreachable!()
    }
    fn open_console(&mut self, _: &str) -> io::Result<()> {
        unreachable!()
    }
    fn sethostname(&mut self, _: &str) -> io::Result<()> {
        unreachable!()
    }
    fn loopback_up(&mut self) -> io::Result<()> {
        unreachable!()
    }
    fn add_entropy(&mut self, _: &[u8]) -> io::Result<()> {
        unreachable!()
    }
    fn sleep(&mut self, duration: Duration) {
        std::thread::sleep(duration)
    }
    fn kill_all(&mut self, signal: i32) -> io::Result<()> {
        self.log(format!("kill -1 {signal}"));
        for pid in own_children() {
            let _ = osb_init::sys::proc::kill(pid, signal);
        }
        Ok(())
    }
    fn reap(&mut self) -> io::Result<Option<Reaped>> {
        osb_init::sys::proc::reap_any()
    }
    fn sync(&mut self) {
        self.log("sync".into());
    }
    fn reboot(&mut self, how: Power) -> io::Result<()> {
        self.log(format!("reboot {how:?}"));
        Ok(())
    }
}

fn sh(script: &str) -> Workload {
    Workload { argv: vec!["sh".into(), "-c".into(), script.into()], env: vec!["PATH=/usr/bin:/bin".into()], working_dir: "/".into(), user: String::new() }
}

fn prepared(w: &Workload) -> Result<workload::Prepared, workload::StartError> {
    let mut p = workload::prepare(w, |_| String::new(), workload::file_kind)?;
    p.identity.uid = osb_init::sys::proc::uid();
    p.identity.gid = osb_init::sys::proc::gid();
    p.identity.groups = vec![p.identity.gid];
    Ok(p)
}

/// A stand-in agent: a shell that appends the event lines it reads on fd 3
/// to `out` and runs `on_exited` when it sees the workload's end.
fn fake_agent(prelude: &str, out: &Path, on_exited: &str) -> AgentCommand {
    let script =
        format!("{prelude}\nwhile read -r line; do echo \"$line\" >> {out}; case \"$line\" in *exited*) {on_exited};; esac; done <&3", out = out.display());
    AgentCommand { program: "/bin/sh".into(), argv0: "fake-agent".into(), args: vec!["-c".into(), script], boot_stamps: false }
}

struct Case {
    dir: PathBuf,
}

impl Case {
    fn new(name: &str) -> Case {
        let dir = std::env::temp_dir().join(format!("osb-init-supervisor-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Case { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap_or_default()
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs the loop to its end and the shutdown; returns how it ended and the
/// stand-in kernel's record of the shutdown.
fn run(mut supervisor: Supervisor<Host>, host: &Host) -> (Power, Vec<String>) {
    let how = supervisor.run();
    let err = supervisor.finish(how);
    assert_eq!(err.to_string(), "reboot(2) returned");
    assert!(own_children().is_empty(), "everyone reaped: {:?}", own_children());
    let ops = host.ops.borrow().clone();
    (how, ops)
}

/// What the stand-in sees of a shutdown where everyone ends on SIGTERM.
fn clean_shutdown(how: Power) -> Vec<String> {
    ["kill -1 15", "sync", "umount /data", "mount /", "sync", &format!("reboot {how:?}")].map(String::from).to_vec()
}

fn workload_exit_is_reported_to_the_agent() {
    let case = Case::new("exit");
    let events = case.path("events");
    let host = Host::default();
    // on_exit=stay, so the agent surely reads the exit before the shutdown
    // it then asks for (as DestroySandbox would).
    let mut s = Supervisor::new(host.clone(), new_signals(), OnExit::Stay, Duration::from_secs(2));
    s.start_agent(fake_agent("", &events, "kill -USR2 $PPID"));
    // The workload leaves an orphan behind: the subreaper reaps it too.
    s.start_workload(prepared(&sh("(sleep 0.2 &) ; echo hello-from-workload; exit 3")));
    let pid = s.workload_pid().unwrap();
    let (how, ops) = run(s, &host);
    assert_eq!(how, Power::Off);
    assert_eq!(ops, clean_shutdown(Power::Off));
    let lines = case.read("events");
    assert_eq!(lines, format!("{{\"event\":\"started\",\"pid\":{pid}}}\n{{\"event\":\"exited\",\"pid\":{pid},\"code\":3}}\n"));
}

fn sigterm_is_forwarded_and_usr2_powers_off() {
    let case = Case::new("term");
    let events = case.path("events");
    let host = Host::default();
    let mut s = Supervisor::new(host.clone(), new_signals(), OnExit::Stay, Duration::from_secs(2));
    // The agent asks for a power-off (DestroySandbox) once the workload ended.
    s.start_agent(fake_agent("", &events, "kill -USR2 $PPID"));
    // The workload asks PID 1 (its parent here) to SIGTERM it, and traps that.
    s.start_workload(prepared(&sh("trap 'exit 7' TERM; kill -TERM $PPID; while :; do sleep 0.02; done")));
    let (how, _) = run(s, &host);
    assert_eq!(how, Power::Off);
    assert!(case.read("events").ends_with(",\"code\":7}\n"), "{}", case.read("events"));
}

fn a_dead_agent_is_restarted_and_gets_the_history() {
    let case = Case::new("restart");
    let events = case.path("events");
    let starts = case.path("starts");
    // The first agent dies at once; the second reads and asks for a reboot.
    let prelude = format!("echo start >> {s}; [ $(wc -l < {s}) -ge 2 ] || exit 1", s = starts.display());
    let host = Host::default();
    let mut s = Supervisor::new(host.clone(), new_signals(), OnExit::Stay, Duration::from_secs(2));
    s.start_workload(prepared(&sh("exit 0")));
    let started = Instant::now();
    s.start_agent(fake_agent(&prelude, &events, "kill -USR1 $PPID"));
    let (how, ops) = run(s, &host);
    assert_eq!(how, Power::Reboot);
    assert_eq!(ops, clean_shutdown(Power::Reboot));
    assert_eq!(case.read("starts"), "start\nstart\n");
    assert!(started.elapsed() >= osb_init::agent::MIN_BACKOFF, "restarted after a backoff");
    let lines = case.read("events");
    assert!(lines.contains("\"event\":\"started\"") && lines.contains("\"code\":0}"), "history replayed: {lines}");
}

/// on_exit=poweroff (the default) after a workload that could not start.
fn unstartable_workload_counts_as_exited() {
    let host = Host::default();
    let mut s = Supervisor::new(host.clone(), new_signals(), OnExit::PowerOff, Duration::from_secs(1));
    s.start_workload(prepared(&Workload { argv: vec!["no-such-program".into()], ..sh("") }));
    assert_eq!(s.workload_pid(), None);
    let (how, _) = run(s, &host);
    assert_eq!(how, Power::Off);
}

fn stubborn_processes_get_sigkill() {
    let host = Host::default();
    let mut s = Supervisor::new(host.clone(), new_signals(), OnExit::PowerOff, Duration::from_millis(300));
    // The agent ignores SIGTERM; the workload ends at once.
    s.start_agent(AgentCommand {
        program: "/bin/sh".into(),
        argv0: "stubborn".into(),
        args: vec!["-c".into(), "trap '' TERM; while :; do sleep 0.05; done".into()],
        boot_stamps: false,
    });
    s.start_workload(prepared(&sh("sleep 0.1")));
    let started = Instant::now();
    let (_, ops) = run(s, &host);
    assert_eq!(&ops[..2], ["kill -1 15", "kill -1 9"]);
    assert!(started.elapsed() >= Duration::from_millis(300), "waited for the timeout first");
}

fn new_signals() -> SignalFd {
    SignalFd::new(&HANDLED_SIGNALS).unwrap()
}

fn main() {
    // SAFETY: prctl with integer arguments only.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(ret, 0, "PR_SET_CHILD_SUBREAPER");
    let cases: [(&str, fn()); 5] = [
        ("workload_exit_is_reported_to_the_agent", workload_exit_is_reported_to_the_agent),
        ("sigterm_is_forwarded_and_usr2_powers_off", sigterm_is_forwarded_and_usr2_powers_off),
        ("a_dead_agent_is_restarted_and_gets_the_history", a_dead_agent_is_restarted_and_gets_the_history),
        ("unstartable_workload_counts_as_exited", unstartable_workload_counts_as_exited),
        ("stubborn_processes_get_sigkill", stubborn_processes_get_sigkill),
    ];
    for (name, case) in cases {
        let started = Instant::now();
        case();
        println!("test {name} ... ok ({:?})", started.elapsed());
    }
    println!("\ntest result: ok. {} passed", cases.len());
}
