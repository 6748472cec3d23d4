//! Frame and damage types shared by frame sources, the encoder and the streaming server.

use std::time::Instant;

pub use framebuffer::Rect;

/// Damage gathered over frames the server chose not to encode (network still busy), to hand to
/// the next [`crate::Encoder::encode`] call so nothing is lost. Keeps at most
/// [`DamageSet::MAX_RECTS`] rectangles; past that it collapses to their bounding box.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DamageSet {
    rects: Vec<Rect>,
}

impl DamageSet {
    pub const MAX_RECTS: usize = 32;

    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `damage` (empty rectangles are ignored).
    pub fn add(&mut self, damage: &[Rect]) {
        for r in damage.iter().filter(|r| !r.is_empty()) {
            if self.rects.iter().any(|known| known.contains_rect(r)) {
                continue;
            }
            self.rects.retain(|known| !r.contains_rect(known));
            self.rects.push(*r);
        }
        if self.rects.len() > Self::MAX_RECTS {
            let bounds = self
                .rects
                .iter()
                .fold(Rect::default(), |acc, r| acc.union(r));
            self.rects = vec![bounds];
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rects.is_empty()
    }

    pub fn rects(&self) -> &[Rect] {
        &self.rects
    }

    /// Returns the gathered damage and starts over.
    pub fn take(&mut self) -> Vec<Rect> {
        std::mem::take(&mut self.rects)
    }
}

/// Memory byte order of a 32-bit pixel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Bytes B, G, R, unused.
    Bgrx,
    /// Bytes B, G, R, alpha (alpha is ignored: the stream is opaque).
    Bgra,
}

/// A borrowed 32-bit-per-pixel frame.
#[derive(Debug, Clone, Copy)]
pub struct FrameRef<'a> {
    pub width: u32,
    pub height: u32,
    /// Bytes from the start of one row to the next (at least `width * 4`).
    pub stride: usize,
    pub format: PixelFormat,
    pub data: &'a [u8],
}

/// Why a [`FrameRef`] cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame is {width}x{height}; width and height must be non-zero")]
    Empty { width: u32, height: u32 },
    #[error("stride {stride} is smaller than width {width} x 4 bytes")]
    StrideTooSmall { stride: usize, width: u32 },
    #[error("frame data is {len} bytes; {needed} needed for {width}x{height} at stride {stride}")]
    DataTooShort {
        len: usize,
        needed: usize,
        width: u32,
        height: u32,
        stride: usize,
    },
}

impl<'a> FrameRef<'a> {
    /// A tightly packed frame (stride = width * 4).
    pub fn packed(width: u32, height: u32, format: PixelFormat, data: &'a [u8]) -> Self {
        Self {
            width,
            height,
            stride: width as usize * 4,
            format,
            data,
        }
    }

    /// Checks that dimensions, stride and data length agree.
    pub fn validate(&self) -> Result<(), FrameError> {
        if self.width == 0 || self.height == 0 {
            return Err(FrameError::Empty {
                width: self.width,
                height: self.height,
            });
        }
        let row = self.width as usize * 4;
        if self.stride < row {
            return Err(FrameError::StrideTooSmall {
                stride: self.stride,
                width: self.width,
            });
        }
        // Checked: stride and height may come from a guest-controlled framebuffer description.
        let needed = self
            .stride
            .checked_mul(self.height as usize - 1)
            .and_then(|n| n.checked_add(row))
            .unwrap_or(usize::MAX);
        if self.data.len() < needed {
            return Err(FrameError::DataTooShort {
                len: self.data.len(),
                needed,
                width: self.width,
                height: self.height,
                stride: self.stride,
            });
        }
        Ok(())
    }
}

/// One frame from a [`FrameSource`] with what changed since the previous frame it returned.
#[derive(Debug, Clone)]
pub struct SourceFrame<'a> {
    pub frame: FrameRef<'a>,
    /// Rectangles covering every pixel that changed since the previous frame (the first frame
    /// reports the whole screen).
    pub damage: Vec<Rect>,
    pub captured_at: Instant,
}

/// Why a frame source failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("frame source closed")]
    Closed,
    #[error("frame source I/O failed")]
    Io(#[from] std::io::Error),
    #[error("frame source failed: {0}")]
    Other(String),
}

/// A pointer image: BGRA with straight (not premultiplied) alpha, stride `width * 4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorShape {
    /// Hotspot (the pixel that points) inside the image.
    pub hot_x: u32,
    pub hot_y: u32,
    pub width: u32,
    pub height: u32,
    /// `width * height * 4` bytes.
    pub bgra: Vec<u8>,
}

/// The pointer as a source shows it apart from its frames, like a desktop's hardware cursor:
/// it is never drawn into the frames, so moving it costs no encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorUpdate {
    /// Hotspot position in frame pixels (may lie outside the frame).
    pub x: i32,
    pub y: i32,
    pub visible: bool,
    /// The shape, present only when it changed since the previous update (and in the first).
    pub image: Option<CursorShape>,
}

/// Anything that produces frames: the VM framebuffer, a synthetic scene.
pub trait FrameSource: Send {
    /// Current frame size in pixels.
    fn size(&self) -> (u32, u32);
    /// Blocks until a frame newer than the last one returned is ready, or `deadline` passes
    /// (`Ok(None)`). A source whose pointer can change without a new frame also returns
    /// `Ok(None)` early when it does, so that the caller polls [`FrameSource::cursor_update`]
    /// promptly.
    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError>;
    /// The pointer's state if it changed since the previous call (`None`: unchanged, or the
    /// source has no pointer). Callers poll it after every [`FrameSource::next_frame`] return.
    fn cursor_update(&mut self) -> Option<CursorUpdate> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_empty_narrow_and_short_frames() {
        let data = [0u8; 64];
        let ok = FrameRef::packed(4, 4, PixelFormat::Bgrx, &data);
        assert_eq!(ok.validate(), Ok(()));
        let empty = FrameRef::packed(0, 4, PixelFormat::Bgrx, &data);
        assert!(matches!(empty.validate(), Err(FrameError::Empty { .. })));
        let narrow = FrameRef { stride: 15, ..ok };
        assert!(matches!(
            narrow.validate(),
            Err(FrameError::StrideTooSmall { .. })
        ));
        let short = FrameRef { height: 5, ..ok };
        assert!(matches!(
            short.validate(),
            Err(FrameError::DataTooShort { needed: 80, .. })
        ));
        let huge = FrameRef {
            stride: usize::MAX / 2,
            height: 3,
            ..ok
        };
        assert!(matches!(
            huge.validate(),
            Err(FrameError::DataTooShort {
                needed: usize::MAX,
                ..
            })
        ));
    }

    #[test]
    fn damage_set_keeps_every_pixel_and_drops_contained_rects() {
        let mut set = DamageSet::new();
        set.add(&[
            Rect::new(0, 0, 10, 10),
            Rect::new(2, 2, 3, 3),
            Rect::new(0, 0, 0, 5),
        ]);
        assert_eq!(set.rects(), &[Rect::new(0, 0, 10, 10)]);
        set.add(&[Rect::new(50, 50, 4, 4), Rect::new(0, 0, 20, 20)]);
        assert_eq!(
            set.rects(),
            &[Rect::new(50, 50, 4, 4), Rect::new(0, 0, 20, 20)]
        );
        assert_eq!(set.take().len(), 2);
        assert!(set.is_empty());
    }

    #[test]
    fn damage_set_collapses_to_the_bounding_box_when_too_many() {
        let mut set = DamageSet::new();
        let many: Vec<Rect> = (0..40).map(|i| Rect::new(i * 10, i, 2, 2)).collect();
        set.add(&many);
        assert_eq!(set.rects(), &[Rect::new(0, 0, 392, 41)]);
    }
}
