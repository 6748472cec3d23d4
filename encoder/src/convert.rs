//! BGRX/BGRA to I420 conversion (BT.601, limited range) into a persistent picture.
//!
//! The encoder keeps one [`I420Buffer`] for the whole stream and converts only the damaged
//! rectangles of each new frame into it, so conversion cost follows the damage, not the screen.
//! The SIMD work is done by the `yuv` crate (yuvutils-rs).

use yuv::{
    BufferStoreMut, YuvConversionMode, YuvError, YuvPlanarImage, YuvPlanarImageMut, YuvRange,
    YuvStandardMatrix,
};

use crate::frame::{FrameError, FrameRef, Rect};

/// Range and matrix used on both ends of the stream (signalled in the H.264 VUI).
pub(crate) const RANGE: YuvRange = YuvRange::Limited;
pub(crate) const MATRIX: YuvStandardMatrix = YuvStandardMatrix::Bt601;

/// When damage covers more than this share of the picture, convert it all in one pass: one big
/// call is faster than many overlapping small ones.
const FULL_CONVERT_NUM: u64 = 1;
const FULL_CONVERT_DEN: u64 = 2;

/// Why a conversion failed.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("picture size {width}x{height} must be non-zero and even")]
    BadPictureSize { width: u32, height: u32 },
    #[error("frame is {got_width}x{got_height}, picture is {width}x{height}")]
    SizeMismatch {
        width: u32,
        height: u32,
        got_width: u32,
        got_height: u32,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("colour conversion failed: {0}")]
    Yuv(YuvError),
}

/// An I420 picture: full-resolution Y plane, U and V planes at half resolution each way.
#[derive(Clone)]
pub struct I420Buffer {
    width: u32,
    height: u32,
    y: Vec<u8>,
    u: Vec<u8>,
    v: Vec<u8>,
}

impl std::fmt::Debug for I420Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I420Buffer")
            .field("width", &self.width)
            .field("height", &self.height)
            .finish()
    }
}

/// Grows `r` outward to even coordinates (one chroma sample covers 2x2 pixels) and clips it.
fn align_to_chroma(r: &Rect, width: u32, height: u32) -> Rect {
    let r = r.clamp_to(width, height);
    if r.is_empty() {
        return r;
    }
    let x0 = r.x & !1;
    let y0 = r.y & !1;
    let x1 = (r.right() + 1).min(width) & !1;
    let y1 = (r.bottom() + 1).min(height) & !1;
    Rect::new(x0, y0, x1 - x0, y1 - y0)
}

impl I420Buffer {
    /// A black picture of `width` x `height` (both even, non-zero).
    pub fn new(width: u32, height: u32) -> Result<Self, ConvertError> {
        if width == 0 || height == 0 || width % 2 != 0 || height % 2 != 0 {
            return Err(ConvertError::BadPictureSize { width, height });
        }
        let luma = width as usize * height as usize;
        Ok(Self {
            width,
            height,
            y: vec![16; luma],
            u: vec![128; luma / 4],
            v: vec![128; luma / 4],
        })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// Y plane, stride = width.
    pub fn y(&self) -> &[u8] {
        &self.y
    }

    /// U (Cb) plane, stride = width / 2.
    pub fn u(&self) -> &[u8] {
        &self.u
    }

    /// V (Cr) plane, stride = width / 2.
    pub fn v(&self) -> &[u8] {
        &self.v
    }

    /// Converts the whole of `frame`.
    pub fn convert_full(&mut self, frame: &FrameRef) -> Result<(), ConvertError> {
        self.check_frame(frame)?;
        self.convert_rect(frame, Rect::new(0, 0, self.width, self.height))
    }

    /// Converts the parts of `frame` inside `damage` (clipped to the picture, grown to even
    /// coordinates); returns the number of pixels converted.
    pub fn convert_damage(
        &mut self,
        frame: &FrameRef,
        damage: &[Rect],
    ) -> Result<u64, ConvertError> {
        self.check_frame(frame)?;
        let total = u64::from(self.width) * u64::from(self.height);
        let rects: Vec<Rect> = damage
            .iter()
            .map(|r| align_to_chroma(r, self.width, self.height))
            .filter(|r| !r.is_empty())
            .collect();
        let area: u64 = rects
            .iter()
            .map(|r| u64::from(r.width) * u64::from(r.height))
            .sum();
        if area * FULL_CONVERT_DEN >= total * FULL_CONVERT_NUM {
            self.convert_rect(frame, Rect::new(0, 0, self.width, self.height))?;
            return Ok(total);
        }
        for r in &rects {
            self.convert_rect(frame, *r)?;
        }
        Ok(area)
    }

    fn check_frame(&self, frame: &FrameRef) -> Result<(), ConvertError> {
        frame.validate()?;
        if frame.width != self.width || frame.height != self.height {
            return Err(ConvertError::SizeMismatch {
                width: self.width,
                height: self.height,
                got_width: frame.width,
                got_height: frame.height,
            });
        }
        Ok(())
    }

    /// Converts one chroma-aligned, in-bounds, non-empty rectangle.
    ///
    /// The `yuv` crate walks every plane with `chunks_exact(2 * stride)` (and the chroma planes
    /// with `chunks_exact(stride)`), silently dropping a final row pair whose slice is shorter than
    /// a full stride. Sub-rectangle slices are therefore extended to whole strides; where that
    /// would run past the end of a buffer (a rectangle on the last rows), the last row pair goes
    /// through small tightly packed staging buffers instead.
    fn convert_rect(&mut self, frame: &FrameRef, r: Rect) -> Result<(), ConvertError> {
        let y_stride = self.width as usize;
        let c_stride = y_stride / 2;
        let (x, y, w, h) = (
            r.x as usize,
            r.y as usize,
            r.width as usize,
            r.height as usize,
        );
        let fits =
            |start: usize, stride: usize, rows: usize, len: usize| start + rows * stride <= len;
        let src_start = y * frame.stride + x * 4;
        let direct = fits(src_start, frame.stride, h, frame.data.len())
            && fits(y * y_stride + x, y_stride, h, self.y.len())
            && fits((y / 2) * c_stride + x / 2, c_stride, h / 2, self.u.len());
        let direct_rows = if direct { h } else { h - 2 };
        if direct_rows > 0 {
            let y_start = y * y_stride + x;
            let c_start = (y / 2) * c_stride + x / 2;
            let mut planar = YuvPlanarImageMut {
                y_plane: BufferStoreMut::Borrowed(
                    &mut self.y[y_start..y_start + direct_rows * y_stride],
                ),
                y_stride: y_stride as u32,
                u_plane: BufferStoreMut::Borrowed(
                    &mut self.u[c_start..c_start + direct_rows / 2 * c_stride],
                ),
                u_stride: c_stride as u32,
                v_plane: BufferStoreMut::Borrowed(
                    &mut self.v[c_start..c_start + direct_rows / 2 * c_stride],
                ),
                v_stride: c_stride as u32,
                width: r.width,
                height: direct_rows as u32,
            };
            let src = &frame.data[src_start..src_start + direct_rows * frame.stride];
            bgrx_to_i420(&mut planar, src, frame.stride)?;
        }
        if direct {
            return Ok(());
        }
        // The last row pair, through packed staging buffers.
        let last = y + h - 2;
        let mut src = Vec::with_capacity(2 * w * 4);
        for row in [last, last + 1] {
            let start = row * frame.stride + x * 4;
            src.extend_from_slice(&frame.data[start..start + w * 4]);
        }
        let (mut ys, mut us, mut vs) = (vec![0u8; 2 * w], vec![0u8; w / 2], vec![0u8; w / 2]);
        let mut planar = YuvPlanarImageMut {
            y_plane: BufferStoreMut::Borrowed(&mut ys),
            y_stride: r.width,
            u_plane: BufferStoreMut::Borrowed(&mut us),
            u_stride: r.width / 2,
            v_plane: BufferStoreMut::Borrowed(&mut vs),
            v_stride: r.width / 2,
            width: r.width,
            height: 2,
        };
        bgrx_to_i420(&mut planar, &src, w * 4)?;
        for (i, row) in [last, last + 1].into_iter().enumerate() {
            let start = row * y_stride + x;
            self.y[start..start + w].copy_from_slice(&ys[i * w..(i + 1) * w]);
        }
        let c_start = (last / 2) * c_stride + x / 2;
        self.u[c_start..c_start + w / 2].copy_from_slice(&us);
        self.v[c_start..c_start + w / 2].copy_from_slice(&vs);
        Ok(())
    }

    /// Converts the whole picture back to packed BGRX (stride = width * 4) into `out`.
    pub fn to_bgrx(&self, out: &mut [u8]) -> Result<(), ConvertError> {
        i420_to_bgrx(
            (&self.y, &self.u, &self.v),
            (
                self.width as usize,
                self.width as usize / 2,
                self.width as usize / 2,
            ),
            self.width,
            self.height,
            out,
        )
    }
}

/// BGRX/BGRA (same layout; alpha ignored) to I420 with the stream's matrix and range.
fn bgrx_to_i420(
    planar: &mut YuvPlanarImageMut<u8>,
    src: &[u8],
    src_stride: usize,
) -> Result<(), ConvertError> {
    yuv::bgra_to_yuv420(
        planar,
        src,
        src_stride as u32,
        RANGE,
        MATRIX,
        YuvConversionMode::Balanced,
    )
    .map_err(ConvertError::Yuv)
}

/// Converts I420 planes with the given strides to packed BGRX (stride = width * 4), alpha/X = 255.
pub(crate) fn i420_to_bgrx(
    planes: (&[u8], &[u8], &[u8]),
    strides: (usize, usize, usize),
    width: u32,
    height: u32,
    out: &mut [u8],
) -> Result<(), ConvertError> {
    let image = YuvPlanarImage {
        y_plane: planes.0,
        y_stride: strides.0 as u32,
        u_plane: planes.1,
        u_stride: strides.1 as u32,
        v_plane: planes.2,
        v_stride: strides.2 as u32,
        width,
        height,
    };
    yuv::yuv420_to_bgra(&image, out, width * 4, RANGE, MATRIX).map_err(ConvertError::Yuv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PixelFormat;

    fn pattern(width: u32, height: u32, seed: u32) -> Vec<u8> {
        (0..width * height * 4)
            .map(|i| (i.wrapping_mul(2654435761).wrapping_add(seed) >> 13) as u8)
            .collect()
    }

    #[test]
    fn damage_conversion_matches_full_conversion() {
        let (w, h) = (96, 64);
        let a = pattern(w, h, 1);
        let mut b = a.clone();
        let rects = [Rect::new(5, 7, 20, 11), Rect::new(40, 30, 33, 21)];
        let fresh: Vec<u8> = a.iter().map(|v| 255 - v).collect();
        for r in &rects {
            for y in r.y..r.bottom() {
                let s = (y * w * 4 + r.x * 4) as usize;
                let e = s + r.width as usize * 4;
                b[s..e].copy_from_slice(&fresh[s..e]);
            }
        }
        let mut incremental = I420Buffer::new(w, h).unwrap();
        incremental
            .convert_full(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a))
            .unwrap();
        incremental
            .convert_damage(&FrameRef::packed(w, h, PixelFormat::Bgrx, &b), &rects)
            .unwrap();
        let mut full = I420Buffer::new(w, h).unwrap();
        full.convert_full(&FrameRef::packed(w, h, PixelFormat::Bgrx, &b))
            .unwrap();
        for (name, got, want) in [
            ("Y", incremental.y(), full.y()),
            ("U", incremental.u(), full.u()),
            ("V", incremental.v(), full.v()),
        ] {
            let worst = got
                .iter()
                .zip(want)
                .map(|(g, w)| g.abs_diff(*w))
                .max()
                .unwrap();
            assert!(worst <= 1, "{name} plane differs by up to {worst}");
        }
    }

    /// BT.601 limited-range reference (ITU-R BT.601, 8-bit): returns (Y, Cb, Cr).
    fn bt601_limited(r: f64, g: f64, b: f64) -> (f64, f64, f64) {
        let y = 16.0 + (65.481 * r + 128.553 * g + 24.966 * b) / 255.0;
        let cb = 128.0 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255.0;
        let cr = 128.0 + (112.0 * r - 93.786 * g - 18.214 * b) / 255.0;
        (y, cb, cr)
    }

    #[test]
    fn conversion_matches_a_scalar_bt601_limited_reference() {
        // 2x2 blocks of one colour each, so chroma subsampling does not blur the comparison.
        let colours: [(u8, u8, u8); 8] = [
            (0, 0, 0),
            (255, 255, 255),
            (255, 0, 0),
            (0, 255, 0),
            (0, 0, 255),
            (128, 128, 128),
            (30, 200, 90),
            (250, 120, 10),
        ];
        let (w, h) = (colours.len() as u32 * 2, 2);
        let mut data = vec![0u8; (w * h * 4) as usize];
        for (i, &(r, g, b)) in colours.iter().enumerate() {
            for y in 0..2 {
                for x in 0..2 {
                    let p = ((y * w + i as u32 * 2 + x) * 4) as usize;
                    data[p..p + 4].copy_from_slice(&[b, g, r, 0xff]);
                }
            }
        }
        let mut pic = I420Buffer::new(w, h).unwrap();
        pic.convert_full(&FrameRef::packed(w, h, PixelFormat::Bgra, &data))
            .unwrap();
        for (i, &(r, g, b)) in colours.iter().enumerate() {
            let (y, cb, cr) = bt601_limited(f64::from(r), f64::from(g), f64::from(b));
            let got = (pic.y()[i * 2], pic.u()[i], pic.v()[i]);
            assert!(
                (f64::from(got.0) - y).abs() <= 1.0,
                "Y of {:?}: {} vs {y:.2}",
                colours[i],
                got.0
            );
            assert!(
                (f64::from(got.1) - cb).abs() <= 1.0,
                "Cb of {:?}: {} vs {cb:.2}",
                colours[i],
                got.1
            );
            assert!(
                (f64::from(got.2) - cr).abs() <= 1.0,
                "Cr of {:?}: {} vs {cr:.2}",
                colours[i],
                got.2
            );
        }
        // And back: limited-range I420 of these colours returns them within rounding.
        let mut back = vec![0u8; data.len()];
        pic.to_bgrx(&mut back).unwrap();
        for (a, b) in data.chunks_exact(4).zip(back.chunks_exact(4)) {
            for c in 0..3 {
                assert!(a[c].abs_diff(b[c]) <= 2, "round trip {a:?} -> {b:?}");
            }
        }
    }

    #[test]
    fn odd_or_empty_picture_sizes_are_rejected() {
        for (w, h) in [(0, 2), (2, 0), (3, 2), (2, 5)] {
            assert!(
                matches!(
                    I420Buffer::new(w, h),
                    Err(ConvertError::BadPictureSize { .. })
                ),
                "{w}x{h}"
            );
        }
    }

    #[test]
    fn damage_is_grown_to_even_coordinates_and_clipped() {
        assert_eq!(
            align_to_chroma(&Rect::new(3, 5, 4, 4), 100, 100),
            Rect::new(2, 4, 6, 6)
        );
        assert_eq!(
            align_to_chroma(&Rect::new(97, 97, 50, 50), 100, 100),
            Rect::new(96, 96, 4, 4)
        );
        assert!(align_to_chroma(&Rect::new(100, 0, 5, 5), 100, 100).is_empty());
    }

    #[test]
    fn damage_touching_the_last_rows_with_unpadded_data_converts_fully() {
        // Regression: the yuv crate silently skips a final row pair whose slice is short.
        let (w, h) = (64, 32);
        let a = pattern(w, h, 1);
        let b: Vec<u8> = a.iter().map(|v| 255 - v).collect();
        let mut pic = I420Buffer::new(w, h).unwrap();
        pic.convert_full(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a))
            .unwrap();
        pic.convert_damage(
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &b),
            &[Rect::new(10, 20, 30, 12)],
        )
        .unwrap();
        let mut want = I420Buffer::new(w, h).unwrap();
        want.convert_full(&FrameRef::packed(w, h, PixelFormat::Bgrx, &b))
            .unwrap();
        for row in 20..32usize {
            for x in 10..40usize {
                let i = row * w as usize + x;
                assert!(pic.y()[i].abs_diff(want.y()[i]) <= 1, "Y at ({x},{row})");
            }
        }
    }
}
