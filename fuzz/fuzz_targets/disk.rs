//! A random tree as ext4 and erofs, every 16th judged by e2fsck and fsck.erofs: osbuilder::fuzzing::disk.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osbuilder::fuzzing::disk(data, osbuilder::fuzzing::Fsck::Every(16)));
