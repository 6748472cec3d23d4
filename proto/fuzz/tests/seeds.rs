//! Every committed seed (and every crash ever found, kept as a seed) passes its target's
//! oracle.

use testkit::replay_seeds;

const DIR: &str = env!("CARGO_MANIFEST_DIR");

#[test]
fn every_stream_messages_seed_passes() {
    replay_seeds(DIR, "stream_messages", proto_fuzz::stream_messages::run);
}

#[test]
fn every_spec_json_seed_passes() {
    replay_seeds(DIR, "spec_json", proto_fuzz::spec_json::run);
}

#[test]
fn every_agent_frames_seed_passes() {
    replay_seeds(DIR, "agent_frames", proto_fuzz::agent_frames::run);
}
