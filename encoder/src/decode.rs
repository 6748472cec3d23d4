//! H.264 decoding to BGRX for clients and tests (openh264, BT.601 limited range like the encoder).

use openh264::decoder::Decoder as H264Decoder;
use openh264::formats::YUVSource;

use crate::convert::{i420_to_bgrx, ConvertError};

/// A decoded picture, packed BGRX with stride = width * 4 (X = 255).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedFrame {
    pub width: u32,
    pub height: u32,
    pub bgrx: Vec<u8>,
}

/// Why decoding failed.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("openh264 decoder failed")]
    Codec(#[source] openh264::Error),
    #[error("decoded picture has unusable size {width}x{height}")]
    BadSize { width: usize, height: usize },
    #[error("converting the decoded picture to BGRX failed")]
    Convert(#[source] ConvertError),
}

/// Decodes an Annex-B H.264 stream access unit by access unit.
pub struct Decoder {
    h264: H264Decoder,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder").finish_non_exhaustive()
    }
}

impl Decoder {
    pub fn new() -> Result<Self, DecodeError> {
        Ok(Self {
            h264: H264Decoder::new().map_err(DecodeError::Codec)?,
        })
    }

    /// Decodes one access unit (as produced by one [`crate::Encoder::encode`] call). Returns
    /// `None` when the data completed no picture (for example parameter sets only).
    pub fn decode(&mut self, annexb: &[u8]) -> Result<Option<DecodedFrame>, DecodeError> {
        let Some(yuv) = self.h264.decode(annexb).map_err(DecodeError::Codec)? else {
            return Ok(None);
        };
        let (width, height) = yuv.dimensions();
        if width == 0 || height == 0 || width > u16::MAX as usize || height > u16::MAX as usize {
            return Err(DecodeError::BadSize { width, height });
        }
        let mut bgrx = vec![0u8; width * height * 4];
        i420_to_bgrx(
            (yuv.y(), yuv.u(), yuv.v()),
            yuv.strides(),
            width as u32,
            height as u32,
            &mut bgrx,
        )
        .map_err(DecodeError::Convert)?;
        Ok(Some(DecodedFrame {
            width: width as u32,
            height: height as u32,
            bgrx,
        }))
    }
}
