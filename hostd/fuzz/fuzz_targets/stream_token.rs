//! cargo-fuzz entry point of [`hostd_fuzz::stream_token`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hostd_fuzz::stream_token::run(data));
