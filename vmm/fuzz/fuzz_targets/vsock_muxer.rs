//! cargo-fuzz entry point of [`vmm_fuzz::vsock_muxer`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::vsock_muxer::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!("vsock_muxer: built without cargo-fuzz; run `scripts/fuzz vmm/fuzz vsock_muxer`");
    std::process::exit(2);
}
