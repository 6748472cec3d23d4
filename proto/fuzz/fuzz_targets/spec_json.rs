//! cargo-fuzz entry point of [`proto_fuzz::spec_json`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto_fuzz::spec_json::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!("spec_json: built without cargo-fuzz; run `scripts/fuzz proto/fuzz spec_json`");
    std::process::exit(2);
}
