//! cargo-fuzz entry point of [`vmm_fuzz::gpu_decoder`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::gpu_decoder::run(data));
