//! cargo-fuzz entry point of [`proto_fuzz::agent_frames`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| proto_fuzz::agent_frames::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!("agent_frames: built without cargo-fuzz; run `scripts/fuzz proto/fuzz agent_frames`");
    std::process::exit(2);
}
