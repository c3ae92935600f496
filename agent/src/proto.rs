//! Generated protobuf messages and ttrpc bindings (from proto/*.proto).
#![allow(
    missing_docs,
    clippy::all,
    dead_code,
    unused_mut,
    unused_results,
    trivial_casts,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unknown_lints,
    unused_imports
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}
pub mod oci {
    include!(concat!(env!("OUT_DIR"), "/oci.rs"));
}
pub mod types {
    include!(concat!(env!("OUT_DIR"), "/types.rs"));
}
