//! cargo-fuzz entry point of [`vmm_fuzz::snapshot_file`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| vmm_fuzz::snapshot_file::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!("snapshot_file: built without cargo-fuzz; run `scripts/fuzz vmm/fuzz snapshot_file`");
    std::process::exit(2);
}
