//! Bytes on a connection to the real agent server: osb_agent::server::fuzzing::ttrpc.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osb_agent::server::fuzzing::ttrpc(data));
