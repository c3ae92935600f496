//! run.json and the command line merged into the workload: osb_init::fuzzing::run_json.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| osb_init::fuzzing::run_json(data));
