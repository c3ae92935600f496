//! An OCI layout (index, manifest, config, layer) opened and applied: osbuilder::fuzzing::oci_manifest.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osbuilder::fuzzing::oci_manifest(data));
