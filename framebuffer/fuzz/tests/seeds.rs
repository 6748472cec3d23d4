//! Every committed seed (and every crash ever found, kept as a seed) passes its target's
//! oracle.

use testkit::replay_seeds;

#[test]
fn every_framebuffer_reader_seed_passes() {
    replay_seeds(
        env!("CARGO_MANIFEST_DIR"),
        "framebuffer_reader",
        framebuffer_fuzz::framebuffer_reader::run,
    );
}
