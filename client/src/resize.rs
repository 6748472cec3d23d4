//! When genos-view asks the environment to take its window's size: after the user stopped
//! dragging ([`DEBOUNCE`]), clamped to what the stream can carry, and only when it differs
//! from what the stream has or was last asked for. Sans-IO: sizes and `now` in, the
//! `ClientMessage::Resize` to send out.

use std::time::{Duration, Instant};

/// Quiet time after the last window size change before the size is asked for.
pub const DEBOUNCE: Duration = Duration::from_millis(300);
/// Smallest side a guest display takes (genos-vmm's `MIN_DISPLAY_DIM`).
pub const MIN_SIDE: u16 = 64;
/// Largest picture the encoder takes (openh264 level 5.2: 3840x2160, or portrait).
pub const MAX_LONG_SIDE: u16 = 3840;
pub const MAX_SHORT_SIDE: u16 = 2160;

/// The size to ask for a `width` x `height` physical-pixel window: each side even (H.264
/// 4:2:0), within [`MIN_SIDE`] and the encoder's [`MAX_LONG_SIDE`] x [`MAX_SHORT_SIDE`]
/// (the longer side of the window is the long one). `None` for an empty (minimised) window.
pub fn clamp_size(width: u32, height: u32) -> Option<(u16, u16)> {
    if width == 0 || height == 0 {
        return None;
    }
    let (max_w, max_h) = if width >= height {
        (MAX_LONG_SIDE, MAX_SHORT_SIDE)
    } else {
        (MAX_SHORT_SIDE, MAX_LONG_SIDE)
    };
    let side = |v: u32, max: u16| {
        let v = v.clamp(u32::from(MIN_SIDE), u32::from(max)) as u16;
        v & !1
    };
    Some((side(width, max_w), side(height, max_h)))
}

/// Resize requests of one session.
#[derive(Debug, Clone)]
pub struct ResizeRequests {
    debounce: Duration,
    /// The newest window size (clamped) and when it arrived.
    pending: Option<((u16, u16), Instant)>,
    /// The last size asked for.
    requested: Option<(u16, u16)>,
    /// The stream's size as the server last announced it.
    stream: Option<(u16, u16)>,
    /// Whether requests may be sent (connected with the input right, not refused).
    enabled: bool,
}

impl Default for ResizeRequests {
    fn default() -> Self {
        Self::new(DEBOUNCE)
    }
}

impl ResizeRequests {
    /// Nothing is sent until [`ResizeRequests::enable`].
    pub fn new(debounce: Duration) -> Self {
        Self {
            debounce,
            pending: None,
            requested: None,
            stream: None,
            enabled: false,
        }
    }

    /// Requests may go out from now on (the session is open and its token has `input`).
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// No more requests (the server refused them); a pending size is dropped.
    pub fn disable(&mut self) {
        self.enabled = false;
        self.pending = None;
    }

    /// The window's inner size is now `width` x `height` physical pixels.
    pub fn window_resized(&mut self, width: u32, height: u32, now: Instant) {
        if let Some(size) = clamp_size(width, height) {
            self.pending = Some((size, now));
        }
    }

    /// The stream is now `width` x `height` (Welcome or Config).
    pub fn stream_resized(&mut self, width: u16, height: u16) {
        self.stream = Some((width, height));
    }

    /// When [`ResizeRequests::poll`] has something to do, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let (_, at) = self.pending.filter(|_| self.enabled)?;
        Some(at + self.debounce)
    }

    /// The size to send now as `ClientMessage::Resize`, if any.
    pub fn poll(&mut self, now: Instant) -> Option<(u16, u16)> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        let (size, _) = self.pending.take()?;
        // What the server is heading for: the last request, else the stream as it is.
        if self.requested.or(self.stream) == Some(size) {
            return None;
        }
        self.requested = Some(size);
        Some(size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn enabled() -> ResizeRequests {
        let mut r = ResizeRequests::new(ms(300));
        r.enable();
        r
    }

    #[test]
    fn a_size_is_sent_once_the_window_stopped_changing() {
        let t0 = Instant::now();
        let mut r = enabled();

        r.window_resized(1000, 700, t0);
        r.window_resized(1010, 705, t0 + ms(200));
        let during_drag = r.poll(t0 + ms(400));
        let deadline = r.deadline();
        let after = r.poll(t0 + ms(500));
        let later = r.poll(t0 + ms(2000));

        assert_eq!(during_drag, None, "the drag went on 200 ms before");
        assert_eq!(deadline, Some(t0 + ms(500)));
        assert_eq!(after, Some((1010, 704)));
        assert_eq!(later, None, "sent once");
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn sizes_are_even_and_within_the_encoders_limits() {
        assert_eq!(clamp_size(1279, 721), Some((1278, 720)));
        assert_eq!(clamp_size(5000, 3000), Some((3840, 2160)));
        assert_eq!(clamp_size(3000, 5000), Some((2160, 3840)));
        assert_eq!(clamp_size(10, 7), Some((64, 64)));
        assert_eq!(clamp_size(70_000, 100), Some((3840, 100)));
        assert_eq!(clamp_size(0, 500), None);
    }

    #[test]
    fn a_size_the_stream_already_has_is_not_asked_for() {
        let t0 = Instant::now();
        let mut r = enabled();
        r.stream_resized(1280, 720);

        r.window_resized(1280, 720, t0);
        let same = r.poll(t0 + ms(300));
        r.window_resized(1281, 721, t0 + ms(400));
        let rounds_to_same = r.poll(t0 + ms(700));

        assert_eq!(same, None);
        assert_eq!(rounds_to_same, None);
    }

    #[test]
    fn going_back_to_the_streams_size_after_a_request_asks_for_it_again() {
        let t0 = Instant::now();
        let mut r = enabled();
        r.stream_resized(1280, 720);
        r.window_resized(800, 600, t0);
        assert_eq!(r.poll(t0 + ms(300)), Some((800, 600)));

        // The server has not applied 800x600 yet when the user drags back.
        r.window_resized(1280, 720, t0 + ms(400));
        let back = r.poll(t0 + ms(700));
        r.stream_resized(1280, 720);
        r.window_resized(1280, 720, t0 + ms(800));
        let unchanged = r.poll(t0 + ms(1100));

        assert_eq!(back, Some((1280, 720)));
        assert_eq!(unchanged, None);
    }

    #[test]
    fn nothing_is_sent_before_enable_and_the_pending_size_goes_out_after() {
        let t0 = Instant::now();
        let mut r = ResizeRequests::new(ms(300));

        r.window_resized(1024, 768, t0);
        let before = r.poll(t0 + ms(1000));
        let no_deadline = r.deadline();
        r.enable();
        let after = r.poll(t0 + ms(1000));

        assert_eq!(before, None);
        assert_eq!(no_deadline, None);
        assert_eq!(after, Some((1024, 768)));
    }

    #[test]
    fn a_disabled_session_sends_nothing_more() {
        let t0 = Instant::now();
        let mut r = enabled();
        r.window_resized(1024, 768, t0);

        r.disable();
        r.window_resized(900, 600, t0 + ms(10));

        assert_eq!(r.poll(t0 + ms(1000)), None);
        assert_eq!(r.deadline(), None);
    }

    #[test]
    fn a_minimised_window_keeps_the_last_size() {
        let t0 = Instant::now();
        let mut r = enabled();
        r.window_resized(1024, 768, t0);

        r.window_resized(0, 0, t0 + ms(100));

        assert_eq!(r.poll(t0 + ms(300)), Some((1024, 768)));
    }
}
