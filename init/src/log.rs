//! Console messages: `osb-init: ...` lines on stderr (the console once
//! [`crate::boot`] has reopened it). Write errors are ignored: PID 1 must
//! not die because the console went away.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

/// Turns `debug!` messages on (`osb.debug=1`).
pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Writes one `osb-init: ...` line in a single write, so lines from
/// concurrent writers to the console do not interleave mid-line.
pub fn line(args: std::fmt::Arguments) {
    let text = format!("osb-init: {args}\n");
    let _ = std::io::stderr().write_all(text.as_bytes());
}

/// Prints `osb-init: <message>` on the console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { $crate::log::line(format_args!($($arg)*)) };
}

/// Like [`say!`], only with `osb.debug=1`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::line(format_args!($($arg)*))
        }
    };
}
