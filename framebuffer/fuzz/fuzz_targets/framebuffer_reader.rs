//! cargo-fuzz entry point of [`framebuffer_fuzz::framebuffer_reader`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| framebuffer_fuzz::framebuffer_reader::run(data));
