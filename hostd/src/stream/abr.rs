//! Adaptive bitrate: turns one viewer's QUIC path statistics into a target bitrate.
//!
//! Pure state machine (no I/O) fed every [`TICK`] with quinn's RTT, congestion window and
//! packet counters plus the frames the server had to drop for that viewer. The ceiling is what
//! the congestion window can carry per RTT; within it the target grows multiplicatively while
//! the path is clean and backs off on heavy loss or dropped frames. Random loss below
//! [`LOSS_BACKOFF`] is not treated as congestion (QUIC recovers it and the cwnd already reacts).
//!
//! Like TCP, a session starts in slow start: until the first congestion signal, or until the
//! congestion window is what limits, the target grows by [`SLOW_START_GROWTH`] per tick, so a
//! viewer reaches the path's rate within a second; after that it only probes by [`GROWTH`].

use std::time::Duration;

/// How often the server samples the path and updates targets.
pub const TICK: Duration = Duration::from_millis(200);
/// Loss ratio per tick above which the target is cut.
pub const LOSS_BACKOFF: f64 = 0.10;
const GROWTH: f64 = 1.15;
/// Growth per tick in slow start.
const SLOW_START_GROWTH: f64 = 1.5;
const CUT: f64 = 0.80;
const CEILING_SHARE: f64 = 0.8;

/// Allowed bitrate range and starting point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitrateLimits {
    pub min_bps: u32,
    pub start_bps: u32,
    pub max_bps: u32,
}

impl Default for BitrateLimits {
    fn default() -> Self {
        Self {
            min_bps: 250_000,
            start_bps: 2_500_000,
            max_bps: 8_000_000,
        }
    }
}

/// One sample of a viewer's path.
#[derive(Debug, Clone, Copy, Default)]
pub struct PathSample {
    pub rtt: Duration,
    pub cwnd_bytes: u64,
    /// Cumulative counters from quinn's `PathStats`.
    pub sent_packets: u64,
    pub lost_packets: u64,
    /// Cumulative frames the server dropped for this viewer (in-flight cap reached, lag).
    pub dropped_frames: u64,
}

/// Per-viewer controller.
#[derive(Debug)]
pub struct Controller {
    limits: BitrateLimits,
    target: f64,
    last: Option<PathSample>,
    /// Loss ratio of the latest tick.
    pub last_loss: f64,
    /// No congestion signal seen yet and the window not yet the limit.
    slow_start: bool,
}

impl Controller {
    pub fn new(limits: BitrateLimits) -> Self {
        Self {
            limits,
            target: f64::from(limits.start_bps),
            last: None,
            last_loss: 0.0,
            slow_start: true,
        }
    }

    pub fn target_bps(&self) -> u32 {
        self.target as u32
    }

    /// Feeds one sample; returns the new target.
    pub fn update(&mut self, s: PathSample) -> u32 {
        let prev = self.last.replace(s).unwrap_or_default();
        let sent = s.sent_packets.saturating_sub(prev.sent_packets);
        let lost = s.lost_packets.saturating_sub(prev.lost_packets);
        let dropped = s.dropped_frames.saturating_sub(prev.dropped_frames);
        self.last_loss = if sent == 0 {
            0.0
        } else {
            lost as f64 / (sent + lost) as f64
        };
        let rtt = s.rtt.as_secs_f64().max(0.001);
        let ceiling = CEILING_SHARE * s.cwnd_bytes as f64 * 8.0 / rtt;
        if dropped > 0 || (sent >= 20 && self.last_loss > LOSS_BACKOFF) {
            self.slow_start = false;
            self.target *= CUT;
        } else if self.slow_start {
            self.target *= SLOW_START_GROWTH;
        } else {
            self.target *= GROWTH;
        }
        if self.target >= ceiling {
            self.slow_start = false;
        }
        let (min, max) = (
            f64::from(self.limits.min_bps),
            f64::from(self.limits.max_bps),
        );
        self.target = self.target.min(ceiling).clamp(min, max);
        self.target_bps()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: u64, rtt_ms: u64, cwnd: u64, lost: u64, dropped: u64) -> PathSample {
        PathSample {
            rtt: Duration::from_millis(rtt_ms),
            cwnd_bytes: cwnd,
            sent_packets: t * 100,
            lost_packets: lost,
            dropped_frames: dropped,
        }
    }

    #[test]
    fn clean_fast_path_grows_to_max() {
        let mut c = Controller::new(BitrateLimits::default());
        for t in 1..40 {
            c.update(sample(t, 1, 1 << 20, 0, 0));
        }
        assert_eq!(c.target_bps(), BitrateLimits::default().max_bps);
    }

    #[test]
    fn clean_path_reaches_max_within_a_second() {
        let limits = BitrateLimits::default();
        let mut c = Controller::new(limits);
        let ticks = (Duration::from_secs(1).as_millis() / TICK.as_millis()) as u64;
        for t in 1..=ticks {
            c.update(sample(t, 40, 1 << 20, 0, 0));
        }
        assert_eq!(c.target_bps(), limits.max_bps);
    }

    #[test]
    fn growth_slows_after_the_first_backoff() {
        let mut c = Controller::new(BitrateLimits {
            min_bps: 100_000,
            start_bps: 1_000_000,
            max_bps: 100_000_000,
        });
        let before = c.target_bps();
        let fast = c.update(sample(1, 1, 1 << 30, 0, 0));
        let cut = c.update(sample(2, 1, 1 << 30, 0, 1));
        let regrown = c.update(sample(3, 1, 1 << 30, 0, 1));
        assert!(f64::from(fast) / f64::from(before) >= 1.5);
        assert!(cut < fast);
        let growth = f64::from(regrown) / f64::from(cut);
        assert!(growth > 1.0 && growth < 1.2, "{growth}");
    }

    #[test]
    fn small_cwnd_caps_target() {
        let mut c = Controller::new(BitrateLimits::default());
        // 12 KB per 40 ms = 2.4 Mbit/s raw, 1.92 Mbit/s after the share.
        for t in 1..20 {
            c.update(sample(t, 40, 12_000, 0, 0));
        }
        assert!(
            (1_800_000..=1_950_000).contains(&c.target_bps()),
            "{}",
            c.target_bps()
        );
    }

    #[test]
    fn dropped_frames_cut_target_and_heavy_loss_too() {
        let mut c = Controller::new(BitrateLimits::default());
        let t0 = c.update(sample(1, 1, 1 << 20, 0, 0));
        let t1 = c.update(sample(2, 1, 1 << 20, 0, 3));
        assert!(t1 < t0);
        let t2 = c.update(sample(3, 1, 1 << 20, 30, 3));
        assert!(t2 < t1);
    }

    #[test]
    fn moderate_random_loss_is_not_congestion() {
        let mut c = Controller::new(BitrateLimits::default());
        let t0 = c.target_bps();
        let t1 = c.update(sample(1, 40, 1 << 20, 5, 0));
        assert!(t1 > t0);
    }

    #[test]
    fn target_never_leaves_limits() {
        let limits = BitrateLimits::default();
        let mut c = Controller::new(limits);
        for t in 1..100 {
            c.update(sample(t, 500, 1200, 90, t));
        }
        assert_eq!(c.target_bps(), limits.min_bps);
    }
}
