//! cargo-fuzz entry point of [`vmm_fuzz::virtio_net_chain`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::virtio_net_chain::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!(
        "virtio_net_chain: built without cargo-fuzz; run `scripts/fuzz vmm/fuzz virtio_net_chain`"
    );
    std::process::exit(2);
}
