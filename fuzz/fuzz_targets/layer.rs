//! A layer blob (plain, gzip or zstd) applied twice, planned and read back: osbuilder::fuzzing::layer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osbuilder::fuzzing::layer(data));
