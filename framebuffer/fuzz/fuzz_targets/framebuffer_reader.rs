//! cargo-fuzz entry point of [`framebuffer_fuzz::framebuffer_reader`].
//!
//! Only a `cargo fuzz` build (which sets `--cfg fuzzing`) links libFuzzer's `main`; any other
//! build, such as `cargo test --all-targets`, gets a `main` that says how to fuzz instead of an
//! uninstrumented libFuzzer that would run until killed.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| framebuffer_fuzz::framebuffer_reader::run(data));

#[cfg(not(fuzzing))]
fn main() {
    eprintln!("framebuffer_reader: built without cargo-fuzz; run `scripts/fuzz framebuffer/fuzz framebuffer_reader`");
    std::process::exit(2);
}
