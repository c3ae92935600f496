//! A random tree through the initrd writer and back through a separate newc reader: osbuilder::fuzzing::cpio_round_trip.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osbuilder::fuzzing::cpio_round_trip(data));
