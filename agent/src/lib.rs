//! The guest agent and its host-side client.
//!
//! - [`proto`]: the protocol, generated from our own `proto/*.proto` files that carry
//!   Kata's service, method and message names and field numbers (package `grpc`,
//!   services `AgentService` and `Health`), so Kata's clients can talk to us.
//! - [`client`] (always built): the host side, over a hybrid-vsock Unix socket,
//!   AF_VSOCK or a plain Unix socket.
//! - `server` (cargo feature `server`): the guest side, linked into `osb-init` and
//!   started by it as `/proc/self/exe` with argv[0] `osb-agent`.
//! - [`resources`]: the guest resource report (CPUs, memory, cgroup limits).
//! - [`net`]: interfaces and routes over rtnetlink (used by the server's network RPCs
//!   and by init for the run config's network).
//! - [`volume`]: mounts (the run config's `mounts`, `osb.mount=`, the storage RPCs):
//!   specs, their order, finding devices by label, UUID or serial, mounting.
//! - [`dirwalk`]: walking to a directory from `/` without following symbolic links
//!   (CopyFile's parents, the storage calls' mount points).
//!
//! Invariant: the wire protocol types in [`proto`] are the only types that cross the
//! VM boundary.

pub mod client;
pub mod dirwalk;
pub mod net;
pub mod proto;
pub mod resources;
#[cfg(feature = "server")]
pub mod server;
pub mod volume;
