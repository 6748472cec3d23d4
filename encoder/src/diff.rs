//! Damage found by comparing two frames, for sources that do not know what changed (screen
//! recordings, a framebuffer without flush rectangles), and the encoder's [`Shadow`], which
//! shrinks reported damage to the pixels that really changed.
//!
//! The frames are compared in tiles; the changed tiles are merged into rectangles (runs along
//! a tile row, then runs of equal width down the rows) and bounded like any other damage
//! ([`DamageSet`]). Every changed pixel is covered; unchanged pixels are covered only where they
//! share a tile with a changed one. The X/alpha byte is ignored: it is not part of the picture.

use crate::frame::{DamageSet, FrameError, FrameRef};
use crate::{PixelFormat, Rect};

/// Tile width and height in pixels: 64x16 keeps rectangles tight around text lines while a
/// 1080p compare stays a few hundred tiles per row band.
const TILE_W: u32 = 64;
const TILE_H: u32 = 16;

/// Why two frames cannot be compared.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiffError {
    #[error("frames differ in size: {a_width}x{a_height} and {b_width}x{b_height}")]
    SizeMismatch {
        a_width: u32,
        a_height: u32,
        b_width: u32,
        b_height: u32,
    },
    #[error("invalid frame")]
    Frame(#[from] FrameError),
}

/// Whether the colour bytes of one row segment differ (4 bytes a pixel, the 4th ignored).
fn row_differs(a: &[u8], b: &[u8]) -> bool {
    if a == b {
        return false;
    }
    a.chunks_exact(4)
        .zip(b.chunks_exact(4))
        .any(|(p, q)| p[..3] != q[..3])
}

/// Pixels `x0..x1` of row `y` (the frame was validated).
fn row<'a>(f: &FrameRef<'a>, y: u32, x0: u32, x1: u32) -> &'a [u8] {
    let start = y as usize * f.stride;
    &f.data[start + x0 as usize * 4..start + x1 as usize * 4]
}

/// Rectangles covering every pixel whose colour differs between `prev` and `cur` (empty when
/// the frames show the same picture). Both frames must have the same size; strides and pixel
/// formats may differ only in the ignored byte's meaning.
pub fn changed_rects(prev: &FrameRef, cur: &FrameRef) -> Result<Vec<Rect>, DiffError> {
    prev.validate()?;
    cur.validate()?;
    if (prev.width, prev.height) != (cur.width, cur.height) {
        return Err(DiffError::SizeMismatch {
            a_width: prev.width,
            a_height: prev.height,
            b_width: cur.width,
            b_height: cur.height,
        });
    }
    let mut done = Vec::new();
    changed_in(prev, cur, Rect::new(0, 0, cur.width, cur.height), &mut done);
    let mut set = DamageSet::new();
    set.add(&done);
    Ok(set.take())
}

/// Appends to `done` rectangles covering every pixel of `area` (inside both frames, which have
/// the same size and were validated) whose colour differs; tiles start at `area`'s corner.
fn changed_in(prev: &FrameRef, cur: &FrameRef, area: Rect, done: &mut Vec<Rect>) {
    let (x_end, y_end) = (area.x + area.width, area.y + area.height);
    let tiles_x = area.width.div_ceil(TILE_W);
    // Rectangles still growing downwards, in tile rows order.
    let mut open: Vec<Rect> = Vec::new();
    let mut changed = vec![false; tiles_x as usize];
    for band_y in (area.y..y_end).step_by(TILE_H as usize) {
        let band_h = TILE_H.min(y_end - band_y);
        changed.fill(false);
        for y in band_y..band_y + band_h {
            if row(prev, y, area.x, x_end) == row(cur, y, area.x, x_end) {
                continue;
            }
            for (t, flag) in changed.iter_mut().enumerate().filter(|(_, f)| !**f) {
                let x0 = area.x + t as u32 * TILE_W;
                let x1 = (x0 + TILE_W).min(x_end);
                *flag = row_differs(row(prev, y, x0, x1), row(cur, y, x0, x1));
            }
        }
        // Runs of changed tiles in this band.
        let mut runs = Vec::new();
        let mut t = 0;
        while t < tiles_x as usize {
            if !changed[t] {
                t += 1;
                continue;
            }
            let start = t;
            while t < tiles_x as usize && changed[t] {
                t += 1;
            }
            let x0 = area.x + start as u32 * TILE_W;
            let x1 = (area.x + t as u32 * TILE_W).min(x_end);
            runs.push(Rect::new(x0, band_y, x1 - x0, band_h));
        }
        // A run directly below an open rectangle of the same extent extends it.
        let mut still_open = Vec::with_capacity(runs.len());
        for run in runs {
            match open
                .iter()
                .position(|o| o.x == run.x && o.width == run.width)
            {
                Some(i) => {
                    let mut grown = open.swap_remove(i);
                    grown.height += run.height;
                    still_open.push(grown);
                }
                None => still_open.push(run),
            }
        }
        done.append(&mut open);
        open = still_open;
    }
    done.append(&mut open);
}

/// Grows `r` outward to even coordinates and clips it to `width` x `height` (both even), so
/// that it covers whole chroma samples: exactly the pixels the converter reads for it.
fn align_even(r: &Rect, width: u32, height: u32) -> Rect {
    let r = r.clamp_to(width, height);
    if r.is_empty() {
        return r;
    }
    let (x0, y0) = (r.x & !1, r.y & !1);
    let x1 = (r.right() + 1).min(width) & !1;
    let y1 = (r.bottom() + 1).min(height) & !1;
    Rect::new(x0, y0, x1 - x0, y1 - y0)
}

/// The encoder's copy of the pixels its persistent picture was converted from, to tell damage
/// whose pixels really changed from repaints of the same pixels (a caret redrawn identically, a
/// compositor repainting a window). Comparing BGRX with `memcmp` costs a fraction of converting
/// it, and an unchanged rectangle then costs neither conversion nor a coded frame.
///
/// Invariant kept by the encoder: every pixel here is what the picture was converted from.
/// It only ever copies in what it converts ([`Shadow::store_full`], [`Shadow::store`]).
pub(crate) struct Shadow {
    width: u32,
    height: u32,
    /// Packed BGRX (stride width * 4).
    data: Vec<u8>,
}

impl Shadow {
    /// A copy of all of `frame` (validated, even-sized).
    pub(crate) fn of(frame: &FrameRef) -> Self {
        let mut s = Self {
            width: frame.width,
            height: frame.height,
            data: vec![0; frame.width as usize * frame.height as usize * 4],
        };
        s.store_full(frame);
        s
    }

    fn as_frame(&self) -> FrameRef<'_> {
        FrameRef::packed(self.width, self.height, PixelFormat::Bgrx, &self.data)
    }

    /// Rectangles of `damage` (grown to even coordinates) in which `frame` differs from the
    /// copy: what needs converting. Empty when every damaged pixel is unchanged. Does not
    /// update the copy; [`Shadow::store`] what gets converted. `frame` must have been validated
    /// and have the copy's size.
    pub(crate) fn changed(&self, frame: &FrameRef, damage: &[Rect]) -> Vec<Rect> {
        let prev = self.as_frame();
        let mut done = Vec::new();
        for r in damage {
            let area = align_even(r, self.width, self.height);
            if !area.is_empty() {
                changed_in(&prev, frame, area, &mut done);
            }
        }
        let mut set = DamageSet::new();
        set.add(&done);
        set.take()
    }

    /// Copies the pixels of `rects` (inside the frame) from `frame`.
    pub(crate) fn store(&mut self, frame: &FrameRef, rects: &[Rect]) {
        let stride = self.width as usize * 4;
        for r in rects {
            let r = r.clamp_to(self.width, self.height);
            let (x0, x1) = (r.x as usize * 4, r.right() as usize * 4);
            for y in r.y as usize..r.bottom() as usize {
                self.data[y * stride + x0..y * stride + x1]
                    .copy_from_slice(&frame.data[y * frame.stride + x0..y * frame.stride + x1]);
            }
        }
    }

    /// Copies all of `frame`.
    pub(crate) fn store_full(&mut self, frame: &FrameRef) {
        self.store(frame, &[Rect::new(0, 0, self.width, self.height)]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: u32, h: u32) -> Vec<u8> {
        (0..w * h * 4).map(|i| (i % 251) as u8).collect()
    }

    fn covered(rects: &[Rect], x: u32, y: u32) -> bool {
        rects
            .iter()
            .any(|r| x >= r.x && x < r.x + r.width && y >= r.y && y < r.y + r.height)
    }

    #[test]
    fn identical_frames_have_no_damage() {
        let a = frame(200, 100);
        let f = FrameRef::packed(200, 100, PixelFormat::Bgrx, &a);

        assert_eq!(changed_rects(&f, &f), Ok(vec![]));
    }

    #[test]
    fn only_the_x_byte_changing_is_no_damage() {
        let a = frame(130, 40);
        let mut b = a.clone();
        for px in b.chunks_exact_mut(4) {
            px[3] ^= 0xff;
        }

        let rects = changed_rects(
            &FrameRef::packed(130, 40, PixelFormat::Bgrx, &a),
            &FrameRef::packed(130, 40, PixelFormat::Bgrx, &b),
        );

        assert_eq!(rects, Ok(vec![]));
    }

    #[test]
    fn every_changed_pixel_is_covered_and_far_tiles_are_not() {
        let (w, h) = (300u32, 170u32);
        let a = frame(w, h);
        let mut b = a.clone();
        let changes = [
            (0, 0),
            (299, 169),
            (130, 16),
            (131, 31),
            (64, 100),
            (250, 60),
        ];
        for &(x, y) in &changes {
            b[((y * w + x) * 4) as usize] ^= 1;
        }

        let rects = changed_rects(
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &a),
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &b),
        )
        .unwrap();

        for &(x, y) in &changes {
            assert!(covered(&rects, x, y), "({x},{y}) not in {rects:?}");
        }
        assert!(!covered(&rects, 10, 150), "{rects:?}");
        assert!(rects
            .iter()
            .all(|r| r.x + r.width <= w && r.y + r.height <= h));
    }

    #[test]
    fn a_changed_column_of_tiles_is_one_rectangle() {
        let (w, h) = (256u32, 64u32);
        let a = frame(w, h);
        let mut b = a.clone();
        for y in 0..h {
            b[((y * w + 70) * 4) as usize] ^= 1;
        }

        let rects = changed_rects(
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &a),
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &b),
        );

        assert_eq!(rects, Ok(vec![Rect::new(64, 0, 64, 64)]));
    }

    #[test]
    fn padded_strides_compare_only_the_picture() {
        let (w, h) = (20u32, 20u32);
        let packed = frame(w, h);
        let mut padded = vec![0xaau8; (w as usize * 4 + 12) * h as usize];
        for y in 0..h as usize {
            let row = &packed[y * w as usize * 4..][..w as usize * 4];
            padded[y * (w as usize * 4 + 12)..][..w as usize * 4].copy_from_slice(row);
        }
        let padded = FrameRef {
            stride: w as usize * 4 + 12,
            ..FrameRef::packed(w, h, PixelFormat::Bgrx, &padded)
        };

        let rects = changed_rects(&FrameRef::packed(w, h, PixelFormat::Bgrx, &packed), &padded);

        assert_eq!(rects, Ok(vec![]));
    }

    #[test]
    fn frames_of_different_sizes_are_refused() {
        let a = frame(20, 20);
        let small = FrameRef::packed(10, 10, PixelFormat::Bgrx, &a);
        let big = FrameRef::packed(20, 20, PixelFormat::Bgrx, &a);

        assert!(matches!(
            changed_rects(&small, &big),
            Err(DiffError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn shadow_shrinks_damage_to_the_tile_holding_the_changed_pixel() {
        let (w, h) = (256u32, 128u32);
        let a = frame(w, h);
        let shadow = Shadow::of(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a));
        let mut b = a.clone();
        b[((71 * w + 131) * 4) as usize] ^= 1;
        let whole = [Rect::new(0, 0, w, h)];

        let same = shadow.changed(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a), &whole);
        let one = shadow.changed(&FrameRef::packed(w, h, PixelFormat::Bgrx, &b), &whole);

        assert_eq!(same, vec![]);
        assert_eq!(one, vec![Rect::new(128, 64, TILE_W, TILE_H)]);
    }

    #[test]
    fn shadow_rects_are_even_and_stay_inside_the_damage() {
        let (w, h) = (100u32, 60u32);
        let a = frame(w, h);
        let shadow = Shadow::of(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a));
        let mut b = a.clone();
        for px in b.chunks_exact_mut(4) {
            px[0] ^= 1;
        }

        let rects = shadow.changed(
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &b),
            &[Rect::new(7, 3, 9, 5)],
        );

        assert_eq!(rects, vec![Rect::new(6, 2, 10, 6)]);
    }

    #[test]
    fn shadow_store_makes_the_stored_pixels_unchanged() {
        let (w, h) = (128u32, 32u32);
        let a = frame(w, h);
        let mut shadow = Shadow::of(&FrameRef::packed(w, h, PixelFormat::Bgrx, &a));
        let mut b = a.clone();
        b[((5 * w + 3) * 4) as usize] ^= 1;
        b[((20 * w + 100) * 4) as usize] ^= 1;
        let fb = FrameRef::packed(w, h, PixelFormat::Bgrx, &b);

        shadow.store(&fb, &[Rect::new(0, 0, 64, 16)]);

        let whole = [Rect::new(0, 0, w, h)];
        assert_eq!(shadow.changed(&fb, &whole), vec![Rect::new(64, 16, 64, 16)]);
    }
}
