//! cargo-fuzz entry point of [`vmm_fuzz::virtio_net_chain`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_net_chain::run(data));
