//! osbuilder: turns OCI images into micro-VM guest artifacts.
//!
//! See ARCHITECTURE.md for the map. The binary in `main.rs` is a thin clap
//! front end over this library; xtask drives the same functions.

pub mod cidata;
pub mod compress;
pub mod disk;
pub mod initrd;
pub mod kernel;
pub mod oci;
pub mod output;
pub mod pipeline;
pub mod progress;
pub mod publish;
pub mod rootfs;
pub mod time;
pub mod vm;

#[cfg(any(test, fuzzing))]
#[doc(hidden)]
pub mod fuzzing;
