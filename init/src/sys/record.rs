//! A recording [`Sys`] for host tests: each call that changes the machine is
//! recorded as one line of text (queries such as `exists` are not), and
//! calls can be made to fail with a chosen errno.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::Duration;

use super::{flags, Mount, Power, Reaped, Sys};

#[derive(Default)]
pub struct Recorder {
    /// The recorded calls, in order.
    pub ops: Vec<String>,
    /// Paths that exist (mkdir adds to it).
    pub existing: HashSet<String>,
    /// Contents for `read_file`.
    pub files: HashMap<String, String>,
    /// What `kernel_log` returns (`None`: it fails with EPERM).
    pub kmsg: Option<String>,
    /// `(prefix, errno)`: a call whose line starts with `prefix` fails
    /// (after being recorded).
    pub failures: Vec<(String, i32)>,
    /// Paths that start existing after this many `exists` checks.
    pub appear_after: HashMap<String, usize>,
    /// What successive `reap` calls return; `Err(ECHILD)` once empty.
    pub reaps: VecDeque<Option<Reaped>>,
    /// Total time passed to `sleep`.
    pub slept: Duration,
}

fn flag_names(bits: u64) -> String {
    let names: Vec<&str> = [
        (flags::RDONLY, "ro"),
        (flags::NOSUID, "nosuid"),
        (flags::NODEV, "nodev"),
        (flags::NOEXEC, "noexec"),
        (flags::REMOUNT, "remount"),
        (flags::RELATIME, "relatime"),
    ]
    .iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| *name)
    .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Makes calls whose line starts with `prefix` fail with `errno`.
    pub fn fail(&mut self, prefix: &str, errno: i32) {
        self.failures.push((prefix.to_owned(), errno));
    }

    pub fn assert_ops<S: AsRef<str>>(&self, expected: &[S]) {
        let expected: Vec<&str> = expected.iter().map(|s| s.as_ref()).collect();
        let got: Vec<&str> = self.ops.iter().map(String::as_str).collect();
        assert_eq!(got, expected, "\ngot:\n  {}\nexpected:\n  {}\n", got.join("\n  "), expected.join("\n  "));
    }

    fn record(&mut self, op: String) -> io::Result<()> {
        let failure = self.failures.iter().find(|(prefix, _)| op.starts_with(prefix.as_str())).map(|(_, errno)| *errno);
        self.ops.push(op);
        match failure {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }
}

impl Sys for Recorder {
    fn mount(&mut self, m: &Mount) -> io::Result<()> {
        let op = if m.flags & flags::MOVE != 0 {
            format!("move {} {}", m.source, m.target)
        } else {
            let dash = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            let mut op = format!("mount {} {} {} {}", dash(m.source), m.target, dash(m.fstype), flag_names(m.flags));
            if !m.data.is_empty() {
                op.push(' ');
                op.push_str(m.data);
            }
            op
        };
        self.record(op)
    }

    fn umount(&mut self, target: &str, detach: bool) -> io::Result<()> {
        self.record(format!("umount {}{target}", if detach { "-l " } else { "" }))
    }

    fn mkdir(&mut self, path: &str, _mode: u32) -> io::Result<()> {
        self.record(format!("mkdir {path}"))?;
        if !self.existing.insert(path.to_owned()) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        Ok(())
    }

    fn symlink(&mut self, target: &str, link: &str) -> io::Result<()> {
        self.record(format!("symlink {link} -> {target}"))
    }

    fn chdir(&mut self, path: &str) -> io::Result<()> {
        self.record(format!("chdir {path}"))
    }

    fn chroot(&mut self, path: &str) -> io::Result<()> {
        self.record(format!("chroot {path}"))
    }

    fn exists(&mut self, path: &str) -> bool {
        if let Some(n) = self.appear_after.get_mut(path) {
            if *n == 0 {
                return true;
            }
            *n -= 1;
            return false;
        }
        self.existing.contains(path)
    }

    fn read_file(&mut self, path: &str) -> io::Result<String> {
        self.files.get(path).cloned().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn kernel_log(&mut self) -> io::Result<String> {
        self.kmsg.clone().ok_or_else(|| io::Error::from_raw_os_error(libc::EPERM))
    }

    fn open_console(&mut self, path: &str) -> io::Result<()> {
        self.record(format!("console {path}"))
    }

    fn sethostname(&mut self, name: &str) -> io::Result<()> {
        self.record(format!("hostname {name}"))
    }

    fn loopback_up(&mut self) -> io::Result<()> {
        self.record("lo up".into())
    }

    fn add_entropy(&mut self, seed: &[u8]) -> io::Result<()> {
        self.record(format!("entropy {} bytes", seed.len()))
    }

    fn sleep(&mut self, duration: Duration) {
        self.slept += duration;
    }

    fn kill_all(&mut self, signal: i32) -> io::Result<()> {
        let name = match signal {
            libc::SIGTERM => "TERM".to_owned(),
            libc::SIGKILL => "KILL".to_owned(),
            other => other.to_string(),
        };
        self.record(format!("kill -1 {name}"))
    }

    fn reap(&mut self) -> io::Result<Option<Reaped>> {
        match self.reaps.pop_front() {
            Some(r) => Ok(r),
            None => Err(io::Error::from_raw_os_error(libc::ECHILD)),
        }
    }

    fn sync(&mut self) {
        self.ops.push("sync".into());
    }

    fn reboot(&mut self, how: Power) -> io::Result<()> {
        self.record(format!("reboot {}", if how == Power::Off { "poweroff" } else { "restart" }))
    }
}
