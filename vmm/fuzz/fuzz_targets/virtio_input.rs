//! cargo-fuzz entry point of [`vmm_fuzz::virtio_input`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_input::run(data));
