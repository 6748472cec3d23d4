//! What the encoder's integration tests share: the 320x240 encoder they all drive.

use encoder::{Encoder, EncoderConfig};

pub const W: u32 = 320;
pub const H: u32 = 240;

/// A 320x240, 30 fps, 2 Mbit/s encoder with the default settings.
pub fn encoder() -> Encoder {
    Encoder::new(EncoderConfig {
        width: W,
        height: H,
        fps: 30.0,
        bitrate_bps: 2_000_000,
    })
    .expect("encoder")
}
