//! Every committed seed (and every crash ever found, kept as a seed) passes its target's
//! oracle.

use testkit::replay_seeds;

const DIR: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn every_http_request_seed_passes() {
    replay_seeds(DIR, "http_request", vmm_fuzz::http_request::run);
}

#[test]
fn every_gpu_decoder_seed_passes() {
    replay_seeds(DIR, "gpu_decoder", vmm_fuzz::gpu_decoder::run);
}

#[test]
fn every_virtio_blk_request_seed_passes() {
    replay_seeds(DIR, "virtio_blk_request", vmm_fuzz::virtio_blk_request::run);
}

#[test]
fn every_virtio_net_chain_seed_passes() {
    replay_seeds(DIR, "virtio_net_chain", vmm_fuzz::virtio_net_chain::run);
}

#[test]
fn every_virtio_input_seed_passes() {
    replay_seeds(DIR, "virtio_input", vmm_fuzz::virtio_input::run);
}

#[test]
fn every_vsock_packet_seed_passes() {
    replay_seeds(DIR, "vsock_packet", vmm_fuzz::vsock_packet::run);
}

#[test]
fn every_vsock_muxer_seed_passes() {
    replay_seeds(DIR, "vsock_muxer", vmm_fuzz::vsock_muxer::run);
}

#[test]
fn every_snapshot_file_seed_passes() {
    replay_seeds(DIR, "snapshot_file", vmm_fuzz::snapshot_file::run);
}
