//! Progress bars on stderr when it is a terminal; silent otherwise (CI, pipes).

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

#[derive(Clone)]
pub struct Progress {
    multi: Option<MultiProgress>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress").field("enabled", &self.multi.is_some()).finish()
    }
}

impl Progress {
    /// Bars when stderr is a terminal and `quiet` is false.
    pub fn auto(quiet: bool) -> Self {
        use std::io::IsTerminal;
        if quiet || !std::io::stderr().is_terminal() {
            Progress::hidden()
        } else {
            Progress { multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())) }
        }
    }

    pub fn hidden() -> Self {
        Progress { multi: None }
    }

    pub fn bytes(&self, label: impl Into<String>, total: u64) -> ProgressBar {
        let Some(multi) = &self.multi else { return ProgressBar::hidden() };
        let bar = multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{msg:28} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_message(label.into());
        bar
    }

    pub fn spinner(&self, label: impl Into<String>) -> ProgressBar {
        let Some(multi) = &self.multi else { return ProgressBar::hidden() };
        let bar = multi.add(ProgressBar::new_spinner());
        bar.set_style(ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"));
        bar.set_message(label.into());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        bar
    }
}
