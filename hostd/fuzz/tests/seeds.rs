//! Every committed seed (and every crash ever found, kept as a seed) passes its target's
//! oracle.

use testkit::replay_seeds;

#[test]
fn every_stream_token_seed_passes() {
    replay_seeds(
        env!("CARGO_MANIFEST_DIR"),
        "stream_token",
        hostd_fuzz::stream_token::run,
    );
}
