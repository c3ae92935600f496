//! osbuilder: turns OCI images into micro-VM guest artifacts.
//!
//! See ARCHITECTURE.md for the map. The binary in `main.rs` is a thin clap
//! front end over this library; xtask drives the same functions.

pub mod oci;
pub mod progress;
pub mod rootfs;
pub mod compress;
pub mod initrd;
pub mod disk;
pub mod cidata;
pub mod output;
pub mod pipeline;
pub mod kernel;
pub mod vm;
pub mod publish;
pub mod time;
#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
