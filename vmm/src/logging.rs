//! Rate-limited logging for the lines a guest can cause.
//!
//! A guest can make a device refuse the same thing as fast as it can exit to the VMM
//! (renegotiate an unoffered feature, break a queue and reset it again, ...). Logged
//! plainly, each refusal is a line and the guest fills the host's disk. Every log line a
//! guest can trigger therefore goes through [`guest_warn!`](crate::guest_warn),
//! [`guest_error!`](crate::guest_error) or [`guest_info!`](crate::guest_info): each call
//! site has its own token bucket ([`RateLimit`], one per process and so per VMM) of
//! [`BURST`] lines refilled at one line per [`REFILL`]. Lines beyond it are counted, not
//! written, and the next line that gets through says how many were suppressed:
//! `virtio-mmio: ... (1234 similar messages suppressed)`. Counters in the metrics, not
//! logs, are the way to see how often something happens.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log at once before it is limited.
pub const BURST: u32 = 10;
/// Time to earn one more line.
pub const REFILL: Duration = Duration::from_secs(1);

/// The token bucket of one call site.
#[derive(Debug)]
pub struct RateLimit {
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: u32,
    /// When the last token was earned (`None` until the first line).
    refilled: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    /// A full bucket (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            state: Mutex::new(Bucket {
                tokens: BURST,
                refilled: None,
                suppressed: 0,
            }),
        }
    }

    /// Whether a line may be written now: `Some(n)` with the number of lines suppressed
    /// since the last one written, or `None` when this one is to be suppressed (and counted).
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`RateLimit::admit`] at time `now`.
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let last = *b.refilled.get_or_insert(now);
        let earned = now.saturating_duration_since(last).as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(BURST);
            // A full bucket starts over; otherwise keep the part of a token already earned.
            b.refilled = Some(if b.tokens == BURST {
                now
            } else {
                last + REFILL * earned
            });
        }
        if b.tokens == 0 {
            b.suppressed += 1;
            return None;
        }
        b.tokens -= 1;
        Some(std::mem::take(&mut b.suppressed))
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// Logs at `level` through the call site's own [`RateLimit`]; the line that follows a
/// suppressed burst names how many were suppressed. Not for use directly: see
/// [`guest_warn!`](crate::guest_warn).
#[macro_export]
#[doc(hidden)]
macro_rules! __guest_log {
    ($level:ident, $($arg:tt)+) => {{
        // One bucket per call site and process (one VMM). Unit tests run in parallel
        // threads of one process and capture logs per thread: there, one per thread.
        #[cfg(not(test))]
        let admitted = {
            static LIMIT: $crate::logging::RateLimit = $crate::logging::RateLimit::new();
            LIMIT.admit()
        };
        #[cfg(test)]
        let admitted = {
            ::std::thread_local! {
                static LIMIT: $crate::logging::RateLimit = const { $crate::logging::RateLimit::new() };
            }
            LIMIT.with($crate::logging::RateLimit::admit)
        };
        match admitted {
            None => {}
            Some(0) => ::tracing::$level!($($arg)+),
            Some(suppressed) => ::tracing::$level!(
                "{} ({} similar messages suppressed)",
                format_args!($($arg)+),
                suppressed
            ),
        }
    }};
}

/// `tracing::warn!` for a line a guest can cause, rate-limited per call site (module docs).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::__guest_log!(warn, $($arg)+) };
}

/// `tracing::error!` for a line a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::__guest_log!(error, $($arg)+) };
}

/// `tracing::info!` for a line a guest can cause, rate-limited per call site.
#[macro_export]
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::__guest_log!(info, $($arg)+) };
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Log output captured by a test subscriber.
    #[derive(Clone, Default)]
    pub struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Runs `f` with a subscriber (all levels) writing into the returned capture.
        pub fn run<T>(f: impl FnOnce() -> T) -> (T, Captured) {
            let logs = Captured::default();
            let writer = logs.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_max_level(tracing::Level::TRACE)
                .with_ansi(false)
                .finish();
            let value = tracing::subscriber::with_default(subscriber, f);
            (value, logs)
        }

        /// The captured lines.
        pub fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }
    }

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_a_token_is_earned() {
        let limit = RateLimit::new();
        let t0 = Instant::now();

        let admitted: Vec<_> = (0..1000).filter_map(|_| limit.admit_at(t0)).collect();

        assert_eq!(admitted, vec![0; BURST as usize]);
        assert_eq!(limit.admit_at(t0 + REFILL / 2), None);
        assert_eq!(
            limit.admit_at(t0 + REFILL),
            Some(1000 - u64::from(BURST) + 1)
        );
        assert_eq!(limit.admit_at(t0 + REFILL), None);
    }

    #[test]
    fn a_quiet_call_site_earns_its_whole_burst_back_and_no_more() {
        let limit = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            limit.admit_at(t0).unwrap();
        }

        let later = t0 + REFILL * 1000;
        let admitted = (0..100).filter(|_| limit.admit_at(later).is_some()).count();

        assert_eq!(admitted, BURST as usize);
    }

    #[test]
    fn the_macro_reports_what_it_suppressed() {
        let ((), logs) = Captured::run(|| {
            for i in 0..100 {
                crate::guest_warn!("refused {i}");
            }
        });
        let lines = logs.lines();
        assert_eq!(lines.len(), BURST as usize, "{lines:?}");
        assert!(
            lines[0].contains("WARN") && lines[0].contains("refused 0"),
            "{lines:?}"
        );
    }
}
