//! Per-session statistics as `genos-view --headless --json` prints them, and the window the
//! session reports to the server now and then (`ClientMessage::Stats`).

use std::time::{Duration, Instant};

use crate::session::Frame;

/// Collects per-frame timings.
#[derive(Debug, Default)]
pub struct StatsCollector {
    first: Option<Instant>,
    last: Option<Instant>,
    latencies_us: Vec<u64>,
    decode_us: Vec<u64>,
    bytes: u64,
    keyframes: u64,
    /// Longest time between two consecutive decoded frames.
    longest_gap: Duration,
    cursor_updates: u64,
}

/// Summary of a session, serialised as one JSON object.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SessionReport {
    pub frames: u64,
    pub keyframes: u64,
    pub fps: f64,
    pub bitrate_kbps: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p99: f64,
    pub decode_ms_p50: f64,
    pub decode_ms_p99: f64,
    pub longest_gap_ms: f64,
    pub frames_dropped: u64,
    pub rtt_ms: f64,
    pub clock_offset_ms: f64,
    /// Cursor messages received (pointer moves and shape changes).
    pub cursor_updates: u64,
}

/// The `q`-quantile (0..=1) of `v` by nearest rank, 0 for an empty slice.
pub fn percentile(v: &[u64], q: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// How often a session tells the server what it decoded and how late.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// The decode times and latencies since the last report to the server.
#[derive(Debug)]
pub struct ReportWindow {
    since: Instant,
    decode_us: Vec<u64>,
    latency_us: Vec<u64>,
}

impl ReportWindow {
    pub fn new(now: Instant) -> Self {
        Self {
            since: now,
            decode_us: Vec::new(),
            latency_us: Vec::new(),
        }
    }

    /// One decoded frame's decode time and capture-to-decoded latency.
    pub fn push(&mut self, decode: Duration, latency: Duration) {
        self.decode_us.push(decode.as_micros() as u64);
        self.latency_us.push(latency.as_micros() as u64);
    }

    /// The report due at `now` ([`REPORT_INTERVAL`] after the last, with frames decoded
    /// since), with the session's running totals; the window starts again.
    pub fn take_due(
        &mut self,
        now: Instant,
        frames_decoded: u64,
        frames_dropped: u64,
    ) -> Option<proto::stream::ClientStats> {
        if now.duration_since(self.since) < REPORT_INTERVAL || self.decode_us.is_empty() {
            return None;
        }
        let median = |v: &[u64]| u32::try_from(percentile(v, 0.5)).unwrap_or(u32::MAX);
        let report = proto::stream::ClientStats {
            frames_decoded,
            frames_dropped,
            decode_us_p50: median(&self.decode_us),
            latency_us_p50: median(&self.latency_us),
        };
        *self = Self::new(now);
        Some(report)
    }
}

impl StatsCollector {
    pub fn record(&mut self, f: &Frame) {
        let now = Instant::now();
        if let Some(last) = self.last {
            self.longest_gap = self.longest_gap.max(now - last);
        }
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.latencies_us.push(f.latency.as_micros() as u64);
        self.decode_us.push(f.decode_time.as_micros() as u64);
        self.bytes += f.encoded_bytes as u64;
        self.keyframes += u64::from(f.keyframe);
    }

    /// Counts one cursor message.
    pub fn record_cursor(&mut self) {
        self.cursor_updates += 1;
    }

    pub fn frames(&self) -> u64 {
        self.latencies_us.len() as u64
    }

    pub fn report(
        &self,
        frames_dropped: u64,
        rtt: Duration,
        clock_offset_us: i64,
    ) -> SessionReport {
        let frames = self.frames();
        let span = match (self.first, self.last) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        // n frames span n-1 intervals.
        let fps = if span > 0.0 {
            (frames.saturating_sub(1)) as f64 / span
        } else {
            0.0
        };
        let bitrate_kbps = if span > 0.0 {
            self.bytes as f64 * 8.0 / span / 1000.0
        } else {
            0.0
        };
        let ms = |us: u64| us as f64 / 1000.0;
        SessionReport {
            frames,
            keyframes: self.keyframes,
            fps,
            bitrate_kbps,
            latency_ms_p50: ms(percentile(&self.latencies_us, 0.5)),
            latency_ms_p99: ms(percentile(&self.latencies_us, 0.99)),
            decode_ms_p50: ms(percentile(&self.decode_us, 0.5)),
            decode_ms_p99: ms(percentile(&self.decode_us, 0.99)),
            longest_gap_ms: self.longest_gap.as_secs_f64() * 1000.0,
            frames_dropped,
            rtt_ms: rtt.as_secs_f64() * 1000.0,
            clock_offset_ms: clock_offset_us as f64 / 1000.0,
            cursor_updates: self.cursor_updates,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 50);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&v, 1.0), 100);
        assert_eq!(percentile(&[], 0.5), 0);
        assert_eq!(percentile(&[7], 0.99), 7);
    }

    #[test]
    fn the_server_report_comes_every_interval_with_the_windows_medians() {
        let t0 = Instant::now();
        let mut w = ReportWindow::new(t0);
        let ms = Duration::from_millis;
        for (decode, latency) in [(3, 10), (5, 14), (4, 30)] {
            w.push(ms(decode), ms(latency));
        }

        let early = w.take_due(t0 + ms(1_000), 3, 0);
        let due = w.take_due(t0 + REPORT_INTERVAL, 3, 1);
        let empty_window = w.take_due(t0 + 2 * REPORT_INTERVAL, 3, 1);

        assert_eq!(early, None);
        assert_eq!(
            due,
            Some(proto::stream::ClientStats {
                frames_decoded: 3,
                frames_dropped: 1,
                decode_us_p50: 4_000,
                latency_us_p50: 14_000,
            })
        );
        assert_eq!(
            empty_window, None,
            "nothing decoded since: nothing to report"
        );
    }

    #[test]
    fn report_counts_cursor_updates() {
        let mut stats = StatsCollector::default();
        stats.record_cursor();
        stats.record_cursor();

        let report = stats.report(0, Duration::ZERO, 0);

        assert_eq!(report.cursor_updates, 2);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["cursor_updates"], 2);
    }
}
