//! The kernel command line as init reads it: osb_init::fuzzing::cmdline.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osb_init::fuzzing::cmdline(data));
