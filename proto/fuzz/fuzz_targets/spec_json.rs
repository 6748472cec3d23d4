//! cargo-fuzz entry point of [`proto_fuzz::spec_json`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proto_fuzz::spec_json::run(data));
