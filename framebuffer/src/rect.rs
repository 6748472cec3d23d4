//! The one rectangle type of the frame path: damage the VMM's virtio-gpu publishes in the
//! shared framebuffer, that hostd's frame sources read, that the encoder converts and the
//! stream server passes on. Pure arithmetic, saturating at the edges of `u32`.

use std::fmt;

/// An axis-aligned rectangle of pixels (damage or a region of a frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// The rectangle at (`x`, `y`) of `width` x `height` pixels.
    pub const fn new(x: u32, y: u32, width: u32, height: u32) -> Self {
        Self {
            x,
            y,
            width,
            height,
        }
    }

    /// True when the rectangle covers no pixel.
    pub const fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    /// Exclusive right edge.
    pub const fn right(&self) -> u32 {
        self.x.saturating_add(self.width)
    }

    /// Exclusive bottom edge.
    pub const fn bottom(&self) -> u32 {
        self.y.saturating_add(self.height)
    }

    /// The part of `self` inside a `width` x `height` frame (possibly empty).
    pub fn clamp_to(&self, width: u32, height: u32) -> Rect {
        let x0 = self.x.min(width);
        let y0 = self.y.min(height);
        let x1 = self.right().min(width);
        let y1 = self.bottom().min(height);
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    /// The part of `self` inside a `width` x `height` frame, or `None` if it covers no pixel.
    pub fn clip(&self, width: u32, height: u32) -> Option<Rect> {
        let r = self.clamp_to(width, height);
        (!r.is_empty()).then_some(r)
    }

    /// Whether the rectangle lies within a `width` x `height` area, edges overflow-checked
    /// (a guest's rectangle whose edge wraps around `u32` lies nowhere).
    pub fn fits_in(&self, width: u32, height: u32) -> bool {
        self.x.checked_add(self.width).is_some_and(|e| e <= width)
            && self.y.checked_add(self.height).is_some_and(|e| e <= height)
    }

    /// Smallest rectangle containing both (an empty rectangle contributes nothing).
    pub fn union(&self, other: &Rect) -> Rect {
        if self.is_empty() {
            return *other;
        }
        if other.is_empty() {
            return *self;
        }
        let x0 = self.x.min(other.x);
        let y0 = self.y.min(other.y);
        let x1 = self.right().max(other.right());
        let y1 = self.bottom().max(other.bottom());
        Rect::new(x0, y0, x1 - x0, y1 - y0)
    }

    /// True when `other` lies entirely inside `self` (an empty `other` lies inside anything).
    pub const fn contains_rect(&self, other: &Rect) -> bool {
        other.is_empty()
            || (other.x >= self.x
                && other.y >= self.y
                && other.right() <= self.right()
                && other.bottom() <= self.bottom())
    }

    /// True when the pixel (`px`, `py`) lies inside.
    pub const fn contains(&self, px: u32, py: u32) -> bool {
        px >= self.x && px < self.right() && py >= self.y && py < self.bottom()
    }
}

impl fmt::Display for Rect {
    /// `WxH+X+Y`, as X11 geometry.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}+{}+{}", self.width, self.height, self.x, self.y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_union_and_contains_agree_at_the_edges() {
        let r = Rect::new(10, 10, 20, 5);
        assert_eq!(r.clamp_to(25, 12), Rect::new(10, 10, 15, 2));
        assert!(r.clamp_to(5, 5).is_empty());
        assert_eq!(r.union(&Rect::new(0, 0, 1, 1)), Rect::new(0, 0, 30, 15));
        assert_eq!(Rect::default().union(&r), r);
        assert!(r.contains(10, 14) && !r.contains(30, 10) && !r.contains(10, 15));
        // Edges saturate instead of overflowing.
        assert_eq!(Rect::new(u32::MAX - 1, 0, 10, 1).right(), u32::MAX);
    }

    #[test]
    fn clip_is_none_exactly_when_nothing_is_inside() {
        assert_eq!(
            Rect::new(10, 10, 20, 5).clip(25, 12),
            Some(Rect::new(10, 10, 15, 2))
        );
        assert_eq!(Rect::new(25, 0, 4, 4).clip(25, 12), None);
        assert_eq!(Rect::new(0, 0, 0, 4).clip(25, 12), None);
        assert_eq!(
            Rect::new(u32::MAX - 1, 0, u32::MAX, 1).clip(u32::MAX, 1),
            Some(Rect::new(u32::MAX - 1, 0, 1, 1))
        );
    }
}
