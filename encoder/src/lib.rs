//! Framebuffer to H.264 encoding and decoding.
//!
//! The streaming server pulls frames from a [`FrameSource`] (the VM's shared framebuffer or the
//! synthetic desktops of the `genos-scenes` crate), hands them with their damage to an
//! [`Encoder`] and ships the Annex-B output. Clients and tests turn it back into pixels with
//! [`Decoder`].
//!
//! Colour: BT.601 limited range everywhere (encoder conversion, VUI signalling, decoder).

mod convert;
mod decode;
mod diff;
mod encode;
mod frame;
mod quality;
mod rate;

pub use convert::{ConvertError, I420Buffer};
pub use decode::{DecodeError, DecodedFrame, Decoder};
pub use diff::{changed_rects, DiffError};
pub use encode::{
    EncodeError, EncodedFrame, Encoder, EncoderConfig, Tuning, Usage, REFINEMENT_PASSES,
};
pub use frame::{
    CursorShape, CursorUpdate, DamageSet, FrameError, FrameRef, FrameSource, PixelFormat, Rect,
    SourceError, SourceFrame,
};
pub use quality::psnr_bgrx;
pub use rate::WINDOW as RATE_WINDOW;
