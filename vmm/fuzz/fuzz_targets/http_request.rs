//! cargo-fuzz entry point of [`vmm_fuzz::http_request`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::http_request::run(data));
