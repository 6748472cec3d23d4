//! Fuzz target bodies for genos-vmm. Each module's `run` takes any bytes and must not panic;
//! it also asserts an oracle (round trips, bounds, agreement with a direct statement of the
//! rules). The cargo-fuzz binaries in `fuzz_targets/` call them, and `tests/seeds.rs` replays
//! every committed seed (`seeds/<target>/`) through them in a normal `cargo test`.

pub mod gpu_decoder;
pub mod http_request;
pub mod snapshot_file;
pub mod virtio_blk_request;
pub mod virtio_input;
pub mod virtio_net_chain;
pub mod vsock_muxer;
pub mod vsock_packet;
