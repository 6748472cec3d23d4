//! Fuzz target bodies for genos-hostd. Each module's `run` takes any bytes and must not
//! panic; it also asserts an oracle. The cargo-fuzz binaries in `fuzz_targets/` call them,
//! and `tests/seeds.rs` replays every committed seed (`seeds/<target>/`) through them in a
//! normal `cargo test`.

pub mod stream_token;
