//! Fuzz target bodies for genos-proto. Each module's `run` takes any bytes and must not
//! panic; it also asserts a round trip. The cargo-fuzz binaries in `fuzz_targets/` call them,
//! and `tests/seeds.rs` replays every committed seed (`seeds/<target>/`) through them in a
//! normal `cargo test`.

pub mod agent_frames;
pub mod spec_json;
pub mod stream_messages;
