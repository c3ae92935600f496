//! `osb-init`: the static PID 1 of osbuilder guests (issue #4).
//!
//! Boot: mount the pseudo filesystems, take the console, read the kernel
//! command line ([`cmdline`]), optionally switch to the real root
//! ([`boot`]); then set up the run config's network ([`network`]) and mounts
//! (`osb_agent::volume`), start the agent and the workload from the run config
//! ([`config`], [`user`], [`workload`]) and supervise them ([`supervisor`]):
//! reap, forward signals, restart the agent, and finally shut down
//! ([`shutdown`]). Everything that touches the machine goes through
//! [`sys::Sys`] so the sequences are unit-tested on the host.
//!
//! **Invariants:** only `sys` (and the agent crate's `net` and `volume`, shared
//! with the agent) makes raw syscalls; nothing here panics or
//! exits on purpose once running as PID 1 ([`pid1::main`] never returns).

#[macro_use]
pub mod log;
pub mod agent;
pub mod boot;
pub mod cmdline;
pub mod config;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
pub mod network;
pub mod pid1;
pub mod shutdown;
pub mod stamps;
pub mod supervisor;
pub mod sys;
pub mod user;
pub mod workload;
