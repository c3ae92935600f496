//! Starting the workload: user and program resolution, then a child in its
//! own session with the console as stdio, in its working directory, under
//! its user.

use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::config::{env_get, Workload};
use crate::sys::proc;
use crate::user::{self, Identity};

/// Exit codes reported when the workload cannot start (the shell's and
/// Docker's conventions): not found, found but not executable, and any
/// other setup failure (user, working directory).
pub const CODE_NOT_FOUND: i32 = 127;
pub const CODE_CANNOT_EXECUTE: i32 = 126;
pub const CODE_SETUP_FAILED: i32 = 125;

/// Why the workload did not start, with the exit code to report for it.
#[derive(Debug)]
pub struct StartError {
    pub message: String,
    pub code: i32,
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A workload resolved against the guest's files, ready to spawn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// Absolute path of the program to execute.
    pub program: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: String,
    pub identity: Identity,
}

/// What a path is, for PATH lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Missing,
    /// Exists but is not an executable regular file.
    NotExecutable,
    Executable,
}

/// Stats a path for [`find_program`].
pub fn file_kind(path: &Path) -> FileKind {
    match std::fs::metadata(path) {
        Err(_) => FileKind::Missing,
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => FileKind::Executable,
        Ok(_) => FileKind::NotExecutable,
    }
}

/// Finds `name` the way execvp does: a name with a `/` is used as it is
/// (relative to `working_dir`); otherwise each PATH entry is tried in order
/// (an empty entry is the working directory). The error distinguishes "not
/// found" (127) from "found only non-executable files" (126).
pub fn find_program(name: &str, path_var: &str, working_dir: &str, kind: impl Fn(&Path) -> FileKind) -> Result<PathBuf, StartError> {
    // Joined and without `.` components (`/srv/./tool` is `/srv/tool`).
    let absolute = |p: &Path| Path::new(working_dir).join(p).components().collect::<PathBuf>();
    if name.is_empty() {
        return Err(StartError { message: "the command is an empty string".into(), code: CODE_NOT_FOUND });
    }
    let candidates: Vec<PathBuf> = if name.contains('/') {
        vec![absolute(Path::new(name))]
    } else {
        path_var.split(':').map(|dir| absolute(&Path::new(if dir.is_empty() { "." } else { dir }).join(name))).collect()
    };
    let mut saw_non_executable = false;
    for candidate in candidates {
        match kind(&candidate) {
            FileKind::Executable => return Ok(candidate),
            FileKind::NotExecutable => saw_non_executable = true,
            FileKind::Missing => {}
        }
    }
    Err(if saw_non_executable {
        StartError { message: format!("{name:?} is not an executable file"), code: CODE_CANNOT_EXECUTE }
    } else if name.contains('/') {
        StartError { message: format!("{name:?} does not exist"), code: CODE_NOT_FOUND }
    } else {
        StartError { message: format!("{name:?} not found in PATH={path_var}"), code: CODE_NOT_FOUND }
    })
}

/// Resolves the user (from the guest's /etc/passwd and /etc/group, read
/// with `read`), adds HOME when the environment lacks it, and finds the
/// program.
pub fn prepare(w: &Workload, read: impl Fn(&str) -> String, kind: impl Fn(&Path) -> FileKind) -> Result<Prepared, StartError> {
    let identity = user::resolve(&w.user, &read("/etc/passwd"), &read("/etc/group"))
        .map_err(|e| StartError { message: format!("user {:?}: {e}", w.user), code: CODE_SETUP_FAILED })?;
    let mut env = w.env.clone();
    if env_get(&env, "HOME").is_none() {
        env.push(format!("HOME={}", identity.home));
    }
    let path_var = env_get(&env, "PATH").unwrap_or(crate::config::DEFAULT_PATH);
    let program = find_program(&w.argv[0], path_var, &w.working_dir, kind)?;
    Ok(Prepared { program, argv: w.argv.clone(), env, working_dir: w.working_dir.clone(), identity })
}

/// Maps a failed spawn (exec's errno, or a failing pre-exec step) to the
/// exit code to report.
fn spawn_error(p: &Prepared, e: io::Error) -> StartError {
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => CODE_NOT_FOUND,
        Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::ETXTBSY) => CODE_CANNOT_EXECUTE,
        _ => CODE_SETUP_FAILED,
    };
    StartError { message: format!("exec {}: {e}", p.program.display()), code }
}

/// Starts the workload as a child: its own session (the console, fd 0, as
/// its controlling terminal when possible), stdio inherited (the console),
/// the prepared environment only, in its working directory (created if
/// missing, as Docker does), with the prepared uid, gid and groups.
/// Returns its pid.
pub fn spawn(p: &Prepared) -> Result<i32, StartError> {
    if !Path::new(&p.working_dir).is_dir() {
        if let Err(e) = std::fs::create_dir_all(&p.working_dir) {
            return Err(StartError { message: format!("working directory {}: {e}", p.working_dir), code: CODE_SETUP_FAILED });
        }
    }
    let mut command = Command::new(&p.program);
    command.arg0(&p.argv[0]).args(&p.argv[1..]).env_clear().current_dir(&p.working_dir);
    for entry in &p.env {
        let (key, value) = entry.split_once('=').unwrap_or((entry, ""));
        command.env(key, value);
    }
    let Identity { uid, gid, groups, .. } = p.identity.clone();
    let change_ids = proc::is_root();
    // SAFETY: the closure runs between fork and exec in a single-threaded
    // child and only makes async-signal-safe syscalls (no allocation: the
    // groups vector was built before the fork).
    unsafe {
        command.pre_exec(move || {
            proc::child_reset_signals()?;
            proc::child_new_session(true)?;
            if change_ids {
                proc::child_set_ids(uid, gid, &groups)?;
            }
            Ok(())
        });
    }
    match command.spawn() {
        // Dropping the Child neither waits nor kills: PID 1 reaps it.
        Ok(child) => Ok(child.id() as i32),
        Err(e) => Err(spawn_error(p, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_fs(path: &Path) -> FileKind {
        match path.to_str().unwrap() {
            "/usr/bin/python3" | "/bin/sh" | "/app/run" | "/srv/tool" => FileKind::Executable,
            "/usr/local/bin/python3" | "/etc/passwd" => FileKind::NotExecutable,
            _ => FileKind::Missing,
        }
    }

    fn check(name: &str, path: &str, expected: Result<&str, i32>) {
        let got = find_program(name, path, "/srv", fake_fs).map(|p| p.to_str().unwrap().to_owned()).map_err(|e| e.code);
        assert_eq!(got, expected.map(str::to_owned), "{name:?} in {path:?}");
    }

    #[test]
    fn path_lookup_like_execvp() {
        check("python3", "/usr/local/bin:/usr/bin", Ok("/usr/bin/python3"));
        check("sh", "/usr/local/bin:/usr/bin:/bin", Ok("/bin/sh"));
        check("/app/run", "", Ok("/app/run"));
        check("./tool", "/bin", Ok("/srv/tool"));
        check("tool", "/bin:", Ok("/srv/tool")); // empty entry = working dir
        check("tool", "/bin", Err(CODE_NOT_FOUND));
        check("/etc/passwd", "/bin", Err(CODE_CANNOT_EXECUTE));
        check("python3", "/usr/local/bin", Err(CODE_CANNOT_EXECUTE));
        check("/nope", "/bin", Err(CODE_NOT_FOUND));
        check("", "/bin", Err(CODE_NOT_FOUND));
        let err = find_program("tool", "/bin", "/", fake_fs).unwrap_err();
        assert_eq!(err.to_string(), "\"tool\" not found in PATH=/bin");
    }

    fn workload(argv: &[&str], user: &str) -> Workload {
        Workload { argv: argv.iter().map(|s| s.to_string()).collect(), env: vec!["PATH=/usr/bin:/bin".into()], working_dir: "/srv".into(), user: user.into() }
    }

    fn files(path: &str) -> String {
        match path {
            "/etc/passwd" => "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n".into(),
            "/etc/group" => "root:x:0:\nwheel:x:10:app\n".into(),
            _ => String::new(),
        }
    }

    #[test]
    fn prepares_user_home_and_program() {
        let p = prepare(&workload(&["python3", "-m", "http.server"], "app"), files, fake_fs).unwrap();
        assert_eq!(p.program, Path::new("/usr/bin/python3"));
        assert_eq!(p.argv, ["python3", "-m", "http.server"]);
        assert_eq!(p.env, ["PATH=/usr/bin:/bin", "HOME=/home/app"]);
        assert_eq!((p.identity.uid, p.identity.gid, p.identity.groups.as_slice()), (1000, 1000, &[1000, 10][..]));

        let mut w = workload(&["sh"], "");
        w.env.push("HOME=/custom".into());
        let p = prepare(&w, files, fake_fs).unwrap();
        assert_eq!(p.env, ["PATH=/usr/bin:/bin", "HOME=/custom"], "HOME from the config wins");

        let err = prepare(&workload(&["sh"], "ghost"), files, fake_fs).unwrap_err();
        assert_eq!((err.code, err.to_string().starts_with("user \"ghost\": no user")), (CODE_SETUP_FAILED, true));
        assert_eq!(prepare(&workload(&["nope"], ""), files, fake_fs).unwrap_err().code, CODE_NOT_FOUND);
    }

    /// Spawns for real on the host and waits for that one pid.
    fn run(p: &Prepared) -> i32 {
        let pid = spawn(p).unwrap();
        crate::sys::exit_code(proc::wait_for(pid).unwrap())
    }

    fn host_workload(script: &str, dir: &Path) -> Prepared {
        let w = Workload {
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: vec!["PATH=/usr/bin:/bin".into(), "GREETING=hi".into()],
            working_dir: dir.to_str().unwrap().into(),
            user: String::new(),
        };
        let mut p = prepare(&w, |_| String::new(), file_kind).unwrap();
        // Run as whoever runs the tests (setgroups needs root).
        p.identity = Identity { uid: proc::uid(), gid: proc::gid(), groups: vec![proc::gid()], home: "/".into() };
        p
    }

    #[test]
    fn spawned_workload_gets_its_environment_session_and_directory() {
        let dir = std::env::temp_dir().join(format!("osb-init-test-{}", std::process::id()));
        let work = dir.join("made/by/spawn");
        let out = dir.join("out");
        let script = format!(
            "echo \"$0|$GREETING|$HOME|$(pwd)|$(env | wc -l)\" > {out}; \
             read -r _ _ _ _ _ sid _ < /proc/$$/stat; [ \"$sid\" = $$ ] || exit 9; exit 3",
            out = out.display()
        );
        let p = host_workload(&script, &work);
        assert_eq!(run(&p), 3, "exit code (9 = not its own session leader)");
        let text = std::fs::read_to_string(&out).unwrap();
        // sh adds PWD (and maybe SHLVL/_) to what it was given: PATH, GREETING, HOME.
        let fields: Vec<&str> = text.trim().split('|').collect();
        assert_eq!(&fields[..4], ["sh", "hi", "/", work.to_str().unwrap()], "{text}");
        assert!(fields[4].trim().parse::<u32>().unwrap() <= 6, "a clean environment: {text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_by_signal_is_128_plus_signal() {
        let p = host_workload("kill -TERM $$", Path::new("/"));
        assert_eq!(run(&p), 143);
    }

    #[test]
    fn exec_failures_map_to_shell_codes() {
        let mut p = host_workload("true", Path::new("/"));
        p.program = "/nonexistent/program".into();
        assert_eq!(spawn(&p).unwrap_err().code, CODE_NOT_FOUND);
        let plain = std::env::temp_dir().join(format!("osb-init-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        p.program = plain.clone();
        assert_eq!(spawn(&p).unwrap_err().code, CODE_CANNOT_EXECUTE);
        std::fs::remove_file(plain).unwrap();
    }
}
