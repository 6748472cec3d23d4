//! Damage found by comparing two frames, for sources that do not know what changed (screen
//! recordings, a framebuffer without flush rectangles).
//!
//! The frames are compared in tiles; the changed tiles are merged into rectangles (runs along
//! a tile row, then runs of equal width down the rows) and bounded like any other damage
//! ([`DamageSet`]). Every changed pixel is covered; unchanged pixels are covered only where they
//! share a tile with a changed one. The X/alpha byte is ignored: it is not part of the picture.

use crate::frame::{DamageSet, FrameError, FrameRef};
use crate::Rect;

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
    let (w, h) = (cur.width, cur.height);
    let tiles_x = w.div_ceil(TILE_W);
    // Rectangles still growing downwards: (x, width, y, height), in tile rows order.
    let mut open: Vec<Rect> = Vec::new();
    let mut done: Vec<Rect> = Vec::new();
    let mut changed = vec![false; tiles_x as usize];
    for band_y in (0..h).step_by(TILE_H as usize) {
        let band_h = TILE_H.min(h - band_y);
        changed.fill(false);
        for y in band_y..band_y + band_h {
            if row(prev, y, 0, w) == row(cur, y, 0, w) {
                continue;
            }
            for (t, flag) in changed.iter_mut().enumerate().filter(|(_, f)| !**f) {
                let x0 = t as u32 * TILE_W;
                let x1 = (x0 + TILE_W).min(w);
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
            let x0 = start as u32 * TILE_W;
            let x1 = (t as u32 * TILE_W).min(w);
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
    let mut set = DamageSet::new();
    set.add(&done);
    Ok(set.take())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PixelFormat;

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
}
