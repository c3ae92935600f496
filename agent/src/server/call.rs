//! What a handler knows about the call it serves: its deadline and whether the
//! client is still there; and the ttrpc status helpers.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use ttrpc::{Code, TtrpcContext};

use super::sys;

/// A ttrpc error status.
pub fn status(code: Code, message: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message.into()))
}

/// Maps an io::Error of `what` to the closest status code.
pub fn io_status(what: &str, e: &std::io::Error) -> ttrpc::Error {
    use std::io::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound => Code::NOT_FOUND,
        K::PermissionDenied => Code::PERMISSION_DENIED,
        K::AlreadyExists => Code::ALREADY_EXISTS,
        K::InvalidInput | K::InvalidData => Code::INVALID_ARGUMENT,
        K::WouldBlock | K::TimedOut => Code::UNAVAILABLE,
        _ => Code::INTERNAL,
    };
    status(code, format!("{what}: {e}"))
}

/// The longest a blocked handler sleeps before looking at its client again.
const TICK: Duration = Duration::from_millis(500);

/// A call in progress.
pub struct Call<'a> {
    ctx: &'a TtrpcContext,
    deadline: Option<Instant>,
}

impl<'a> Call<'a> {
    pub fn new(ctx: &'a TtrpcContext) -> Call<'a> {
        let deadline = u64::try_from(ctx.timeout_nano).ok().filter(|n| *n > 0).and_then(|n| Instant::now().checked_add(Duration::from_nanos(n)));
        Call { ctx, deadline }
    }

    /// The client closed its connection.
    pub fn client_gone(&self) -> bool {
        matches!(self.ctx.cancel_rx.try_recv(), Err(crossbeam_channel::TryRecvError::Disconnected))
    }

    /// CANCELLED when the client is gone, DEADLINE_EXCEEDED past the deadline.
    pub fn check(&self) -> ttrpc::Result<()> {
        if self.client_gone() {
            return Err(status(Code::CANCELLED, "the client closed its connection"));
        }
        if let Some(deadline) = self.deadline {
            if Instant::now() >= deadline {
                return Err(status(Code::DEADLINE_EXCEEDED, "the call's timeout passed"));
            }
        }
        Ok(())
    }

    /// How long to sleep before the next [`Call::check`].
    pub fn tick(&self) -> Duration {
        match self.deadline {
            Some(deadline) => deadline.saturating_duration_since(Instant::now()).min(TICK),
            None => TICK,
        }
    }

    /// Waits until `fd` is ready for `events` (POLLIN/POLLOUT), the client hangs up,
    /// or the deadline passes; Ok means "try the I/O again".
    pub fn wait_fd(&self, fd: BorrowedFd<'_>, events: libc::c_short) -> ttrpc::Result<()> {
        let mut fds = [
            libc::pollfd { fd: fd.as_raw_fd(), events, revents: 0 },
            // The connection itself: POLLRDHUP/POLLHUP as soon as the peer closes.
            libc::pollfd { fd: self.ctx.fd, events: libc::POLLRDHUP, revents: 0 },
        ];
        sys::poll(&mut fds, Some(self.tick())).map_err(|e| io_status("poll", &e))?;
        if fds[1].revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            return Err(status(Code::CANCELLED, "the client closed its connection"));
        }
        self.check()
    }
}
