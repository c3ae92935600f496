//! A Kconfig fragment parsed, merged and written back: osbuilder::fuzzing::kernel_fragment.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osbuilder::fuzzing::kernel_fragment(data));
