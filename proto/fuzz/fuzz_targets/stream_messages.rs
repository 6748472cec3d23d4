//! cargo-fuzz entry point of [`proto_fuzz::stream_messages`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| proto_fuzz::stream_messages::run(data));
