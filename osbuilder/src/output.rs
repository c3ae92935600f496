//! Staging of every output file: a temporary name in the destination
//! directory, fsync, then an atomic rename onto the final name.
//!
//! A half-written initrd, disk image, report or kernel copy is never left
//! where a good one is expected: the temporary file is removed when the
//! [`Staged`] value is dropped without [`Staged::commit`] (an error, a
//! panic), and a SIGINT, SIGTERM or SIGHUP removes every file still staged
//! before the process dies as the signal would have it (and every blob still
//! being written into the cache, through [`SignalCleanup`]). The rename
//! replaces an existing output only once the new one is complete and on disk.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("output {0} is a directory; give a file name")]
    IsDirectory(PathBuf),
    #[error("output directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("cannot create a temporary file next to {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot move the finished output to {path}: {source}")]
    Rename { path: PathBuf, source: io::Error },
}

/// The temporary files staged now, removed by the signal thread.
static STAGED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static SIGNALS: Once = Once::new();

/// Starts the thread that, on SIGINT/SIGTERM/SIGHUP, removes every staged
/// file and then lets the signal take its default course. A thread (not a
/// handler) so that it may lock and allocate.
fn watch_signals() {
    SIGNALS.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) else { return };
        std::thread::Builder::new()
            .name("osbuilder-signals".into())
            .spawn(move || {
                if let Some(signal) = signals.forever().next() {
                    let staged = STAGED.lock().unwrap_or_else(|e| e.into_inner());
                    for path in staged.iter() {
                        let _ = std::fs::remove_file(path);
                    }
                    let _ = signal_hook::low_level::emulate_default_handler(signal);
                    // A signal whose default is to continue: still stop.
                    std::process::exit(128 + signal);
                }
            })
            .ok();
    });
}

/// An output being written; see the module documentation.
#[derive(Debug)]
pub struct Staged {
    tmp: Option<tempfile::NamedTempFile>,
    dest: PathBuf,
}

impl Staged {
    /// Creates the temporary file next to `dest` (mode 0644 less the umask,
    /// like any build output; tempfile's own default is 0600).
    pub fn create(dest: &Path) -> Result<Staged, OutputError> {
        if dest.is_dir() {
            return Err(OutputError::IsDirectory(dest.to_path_buf()));
        }
        let dir = parent_dir(dest);
        if !dir.is_dir() {
            return Err(OutputError::NoDirectory(dir.to_path_buf()));
        }
        watch_signals();
        let tmp = tempfile::Builder::new()
            .prefix(".osbuilder-")
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(0o644))
            .tempfile_in(dir)
            .map_err(|source| OutputError::Create { path: dest.to_path_buf(), source })?;
        STAGED.lock().unwrap_or_else(|e| e.into_inner()).push(tmp.path().to_path_buf());
        Ok(Staged { tmp: Some(tmp), dest: dest.to_path_buf() })
    }

    /// The file being written.
    pub fn file(&self) -> &File {
        self.tmp.as_ref().expect("not yet committed").as_file()
    }

    /// Where the output will be once committed.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// A write error for this output.
    pub fn write_error(&self, source: io::Error) -> OutputError {
        OutputError::Write { path: self.dest.clone(), source }
    }

    /// Flushes the data to disk and renames the file onto its final name.
    pub fn commit(mut self) -> Result<PathBuf, OutputError> {
        let tmp = self.tmp.take().expect("committed once");
        let tmp_path = tmp.path().to_path_buf();
        tmp.as_file().sync_all().map_err(|source| OutputError::Write { path: self.dest.clone(), source })?;
        let result = tmp.persist(&self.dest);
        unregister(&tmp_path);
        result.map_err(|e| OutputError::Rename { path: self.dest.clone(), source: e.error })?;
        // Make the rename itself durable.
        if let Ok(dir) = File::open(parent_dir(&self.dest)) {
            let _ = dir.sync_all();
        }
        Ok(std::mem::take(&mut self.dest))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            unregister(tmp.path());
            // NamedTempFile's own drop removes the file.
        }
    }
}

/// Another temporary file (a blob on its way into the cache) that a signal
/// must not leave behind: registered while this value lives.
#[derive(Debug)]
pub(crate) struct SignalCleanup(PathBuf);

impl SignalCleanup {
    pub(crate) fn new(path: &Path) -> SignalCleanup {
        watch_signals();
        STAGED.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
        SignalCleanup(path.to_path_buf())
    }
}

impl Drop for SignalCleanup {
    fn drop(&mut self) {
        unregister(&self.0);
    }
}

fn unregister(path: &Path) {
    STAGED.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != path);
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Writes a small output (a report, a manifest) in one go, staged like any other.
pub fn write_file(dest: &Path, bytes: &[u8]) -> Result<PathBuf, OutputError> {
    let staged = Staged::create(dest)?;
    let mut file = staged.file();
    file.write_all(bytes).map_err(|e| staged.write_error(e))?;
    staged.commit()
}

/// Copies `src` to `dest`, staged.
pub fn copy_file(src: &Path, dest: &Path) -> Result<PathBuf, OutputError> {
    let staged = Staged::create(dest)?;
    let mut from = File::open(src).map_err(|e| staged.write_error(io::Error::new(e.kind(), format!("cannot read {}: {e}", src.display()))))?;
    let mut to = staged.file();
    io::copy(&mut from, &mut to).map_err(|e| staged.write_error(e))?;
    staged.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn commit_replaces_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("disk.img");
        std::fs::write(&out, b"old good output").unwrap();
        {
            let staged = Staged::create(&out).unwrap();
            let mut f = staged.file();
            f.write_all(b"half").unwrap();
            // Dropped: an error on the way.
        }
        assert_eq!(std::fs::read(&out).unwrap(), b"old good output", "the old output survives a failed write");
        assert_eq!(names(dir.path()), ["disk.img"], "no temporary file left");
        write_file(&out, b"new").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["disk.img"]);
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o644, 0o644 & !umask(), "readable by all, as build outputs are");
        assert!(matches!(Staged::create(dir.path()), Err(OutputError::IsDirectory(_))));
        assert!(matches!(Staged::create(&dir.path().join("nope/x")), Err(OutputError::NoDirectory(_))));
    }

    fn umask() -> u32 {
        // SAFETY: umask only swaps the process mask; it is restored at once.
        unsafe {
            let m = libc::umask(0o022);
            libc::umask(m);
            m
        }
    }

    /// A SIGTERM while an output is staged removes the temporary file; the
    /// process dies by the signal. Run in a child process (this test binary
    /// re-executed on just this test) so the signal does not end the suite.
    #[test]
    fn a_signal_removes_staged_files() {
        if let Some(dir) = std::env::var_os("OSBUILDER_TEST_STAGE_DIR") {
            let staged = Staged::create(&Path::new(&dir).join("out.img")).unwrap();
            staged.file().write_all(b"partial").unwrap();
            println!("staged");
            std::thread::sleep(std::time::Duration::from_secs(30));
            unreachable!("killed before");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "output::tests::a_signal_removes_staged_files", "--nocapture", "--test-threads=1"])
            .env("OSBUILDER_TEST_STAGE_DIR", dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait for the child to say it staged the file: the file appears in the
        // directory a moment before it is registered for removal, and a
        // signal in between would find nothing to remove.
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        assert!(lines.any(|l| l.is_ok_and(|l| l.trim_end().ends_with("staged"))), "the child never staged its file");
        assert!(!names(dir.path()).is_empty(), "the child staged no file");
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
        assert!(names(dir.path()).is_empty(), "staged file left: {:?}", names(dir.path()));
    }
}
