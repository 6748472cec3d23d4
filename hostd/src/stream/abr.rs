//! Adaptive bitrate: turns one viewer's QUIC path statistics into a target bitrate.
//!
//! Pure state machine (no I/O) fed every [`TICK`] with quinn's RTT, congestion window and
//! packet counters plus the frames the server had to drop for that viewer. The ceiling is what
//! the congestion window can carry per RTT; within it the target grows multiplicatively while
//! the path is clean and backs off on heavy loss or dropped frames. Random loss below
//! [`LOSS_BACKOFF`] is not treated as congestion (QUIC recovers it and the cwnd already reacts).
//!
//! Like TCP, a session starts in slow start: until the first sign of congestion the target
//! grows by [`SLOW_START_GROWTH`] per tick (still under the window ceiling), so a viewer
//! reaches the path's rate within a second; after that it only probes by [`GROWTH`]. A bad
//! tick (drops or heavy loss) holds the target; heavy loss two ticks running or drops
//! [`DROP_TICKS_TO_CUT`] ticks running cut it and end slow start.

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
/// Ticks over which the window ceiling is the maximum (one second).
const CEILING_WINDOW: usize = 5;
/// Consecutive ticks with dropped frames that count as congestion (600 ms: longer than a
/// 1080p keyframe takes on a lossy 40 ms path).
const DROP_TICKS_TO_CUT: u32 = 3;

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
    /// Cumulative frames the server dropped for this viewer because the path did not drain
    /// (in-flight cap reached, lag); not those skipped while waiting for a keyframe.
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
    /// Consecutive ticks with dropped frames.
    drop_ticks: u32,
    /// The previous tick lost more than [`LOSS_BACKOFF`].
    heavy_loss_last_tick: bool,
    /// Window ceilings of the last [`CEILING_WINDOW`] ticks (ring, by `ticks`).
    ceilings: [f64; CEILING_WINDOW],
    ticks: usize,
}

impl Controller {
    pub fn new(limits: BitrateLimits) -> Self {
        Self {
            limits,
            target: f64::from(limits.start_bps),
            last: None,
            last_loss: 0.0,
            slow_start: true,
            drop_ticks: 0,
            heavy_loss_last_tick: false,
            ceilings: [0.0; CEILING_WINDOW],
            ticks: 0,
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
        // The congestion window swings from tick to tick (loss recovery, BBR's probing): the
        // ceiling is the largest of the last second's, as BBR itself filters bandwidth.
        self.ceilings[self.ticks % CEILING_WINDOW] =
            CEILING_SHARE * s.cwnd_bytes as f64 * 8.0 / rtt;
        self.ticks += 1;
        let ceiling = self.ceilings[..self.ticks.min(CEILING_WINDOW)]
            .iter()
            .copied()
            .fold(0.0, f64::max);
        // A single tick is a small sample: at 5 % random loss about one tick in a hundred
        // loses over 10 %. Two ticks running are congestion.
        let heavy_loss = sent >= 20 && self.last_loss > LOSS_BACKOFF;
        let sustained_loss = heavy_loss && self.heavy_loss_last_tick;
        self.heavy_loss_last_tick = heavy_loss;
        // Frames are dropped for a few ticks whenever one big frame is slow to deliver: the
        // keyframe a viewer joins with, or a retransmission timeout under random loss. Only
        // drops lasting longer than that mean the path cannot carry the bitrate (and then
        // the window ceiling usually says so first).
        self.drop_ticks = if dropped > 0 { self.drop_ticks + 1 } else { 0 };
        let sustained_drops = self.drop_ticks >= DROP_TICKS_TO_CUT;
        if sustained_loss || sustained_drops {
            self.slow_start = false;
            self.drop_ticks = 0;
            self.target *= CUT;
        } else if dropped > 0 || heavy_loss {
            // Hold until it is clear whether this is congestion.
        } else if self.slow_start {
            self.target *= SLOW_START_GROWTH;
        } else {
            self.target *= GROWTH;
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
    fn growth_slows_after_the_first_cut_but_not_after_a_hold() {
        let mut c = Controller::new(BitrateLimits {
            min_bps: 100_000,
            start_bps: 1_000_000,
            max_bps: 100_000_000,
        });
        let path = |t: u64, dropped: u64| sample(t, 1, 1 << 30, 0, dropped);
        let fast = c.update(path(1, 0));
        let held = c.update(path(2, 1));
        let still_fast = c.update(path(3, 1));
        for t in 4..=6 {
            c.update(path(t, t));
        }
        let cut = c.target_bps();
        let regrown = c.update(path(7, 6));

        assert!(f64::from(fast) / 1e6 >= 1.5);
        assert_eq!(held, fast);
        assert!(
            f64::from(still_fast) / f64::from(held) >= 1.5,
            "a hold keeps slow start"
        );
        let growth = f64::from(regrown) / f64::from(cut);
        assert!(growth > 1.0 && growth < 1.2, "after a cut: {growth}");
    }

    #[test]
    fn a_one_tick_dip_of_the_window_does_not_pull_the_target_down() {
        let mut c = Controller::new(BitrateLimits::default());
        for t in 1..10 {
            c.update(sample(t, 40, 1 << 20, 0, 0));
        }
        let before = c.target_bps();

        let during = c.update(sample(10, 40, 20_000, 0, 0));

        assert!(during >= before, "{during} < {before}");
    }

    #[test]
    fn a_window_that_stays_small_caps_the_target_within_a_second() {
        let mut c = Controller::new(BitrateLimits::default());
        for t in 1..10 {
            c.update(sample(t, 40, 1 << 20, 0, 0));
        }
        for t in 10..16 {
            c.update(sample(t, 40, 12_000, 0, 0));
        }
        assert!(c.target_bps() <= 1_950_000, "{}", c.target_bps());
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
    fn lasting_drops_or_heavy_loss_cut_the_target_short_ones_hold_it() {
        let mut c = Controller::new(BitrateLimits::default());
        let t0 = c.update(sample(1, 1, 1 << 20, 0, 0));
        let held1 = c.update(sample(2, 1, 1 << 20, 0, 3));
        let held2 = c.update(sample(3, 1, 1 << 20, 0, 5));
        let cut = c.update(sample(4, 1, 1 << 20, 0, 6));
        let lossy_held = c.update(sample(5, 1, 1 << 20, 30, 6));
        let lossy_cut = c.update(sample(6, 1, 1 << 20, 60, 6));
        assert_eq!((held1, held2), (t0, t0), "drops for two ticks only hold");
        assert!(cut < held2);
        assert_eq!(lossy_held, cut, "one tick of heavy loss only holds");
        assert!(lossy_cut < lossy_held);
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
