//! Boot-timer device: the guest writes [`BOOT_TIMER_MAGIC`] to offset 0 of its MMIO page
//! when it has booted, and the VMM logs the time elapsed since the VMM process started.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::devices::bus::BusDevice;

/// What a snapshot keeps of the boot timer: the boot time it recorded, if any, so that a
/// restored guest's second signal does not count as its boot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTimerState {
    /// Microseconds from the snapshotted VMM's start to the guest's signal.
    pub boot_time_us: Option<u64>,
}

/// The byte the guest writes at offset 0 to say "boot finished".
pub const BOOT_TIMER_MAGIC: u8 = 123;

/// Records the first boot-finished signal from the guest.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    boot_time: Arc<OnceLock<Duration>>,
}

impl BootTimer {
    /// A boot timer measuring from `start` (the VMM's own start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            boot_time: Arc::new(OnceLock::new()),
        }
    }

    /// Time from VMM start to the guest's first boot-finished signal, once it arrived.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.get().copied()
    }

    /// The recorded boot time, for a snapshot.
    pub fn save(&self) -> BootTimerState {
        BootTimerState {
            boot_time_us: self.boot_time().map(|d| d.as_micros() as u64),
        }
    }

    /// A boot timer measuring from `start` that has already recorded what `state` says.
    pub fn restore(start: Instant, state: &BootTimerState) -> Self {
        let timer = Self::new(start);
        if let Some(us) = state.boot_time_us {
            let _ = timer.boot_time.set(Duration::from_micros(us));
        }
        timer
    }

    /// A handle that sees the boot time without locking the device.
    pub fn boot_time_handle(&self) -> Arc<OnceLock<Duration>> {
        self.boot_time.clone()
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&BOOT_TIMER_MAGIC) {
            return;
        }
        let elapsed = self.start.elapsed();
        // Only the first signal counts: a guest that reboots in place or writes the
        // magic twice must not move the recorded boot time.
        if self.boot_time.set(elapsed).is_ok() {
            tracing::info!(
                "Guest-boot-time = {:>6} us {} ms",
                elapsed.as_micros(),
                elapsed.as_millis()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_timer_keeps_the_recorded_boot_and_ignores_a_second_signal() {
        let mut timer = BootTimer::new(Instant::now() - Duration::from_millis(5));
        timer.write(0, 0, &[BOOT_TIMER_MAGIC]);
        let saved = timer.save();

        let mut restored = BootTimer::restore(Instant::now(), &saved);
        restored.write(0, 0, &[BOOT_TIMER_MAGIC]);

        assert_eq!(restored.save(), saved);
        assert!(saved.boot_time_us.unwrap() >= 5000);
    }

    #[test]
    fn a_timer_saved_before_the_boot_signal_records_the_restored_guests_signal() {
        let saved = BootTimer::new(Instant::now()).save();

        let mut restored = BootTimer::restore(Instant::now(), &saved);
        restored.write(0, 0, &[BOOT_TIMER_MAGIC]);

        assert_eq!(saved.boot_time_us, None);
        assert!(restored.boot_time().is_some());
    }

    #[test]
    fn magic_write_records_the_boot_time_once() {
        let start = Instant::now() - Duration::from_millis(5);
        let mut timer = BootTimer::new(start);

        timer.write(0xd000_0000, 0, &[BOOT_TIMER_MAGIC]);
        let first = timer.boot_time().expect("boot time recorded");
        std::thread::sleep(Duration::from_millis(2));
        timer.write(0xd000_0000, 0, &[BOOT_TIMER_MAGIC]);

        assert!(first >= Duration::from_millis(5));
        assert_eq!(timer.boot_time(), Some(first));
        assert_eq!(timer.boot_time_handle().get().copied(), Some(first));
    }

    #[derive(Clone, Default)]
    struct LogCapture(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for LogCapture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn boot_time_is_logged_once() {
        let logs = LogCapture::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let mut timer = BootTimer::new(Instant::now());

        tracing::subscriber::with_default(subscriber, || {
            timer.write(0, 0, &[BOOT_TIMER_MAGIC]);
            timer.write(0, 0, &[BOOT_TIMER_MAGIC]);
            timer.write(0, 0, &[7]);
        });

        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.matches("Guest-boot-time").count(), 1, "{text}");
    }

    #[test]
    fn other_values_and_offsets_are_ignored() {
        let mut timer = BootTimer::new(Instant::now());

        timer.write(0, 0, &[BOOT_TIMER_MAGIC - 1]);
        timer.write(0, 1, &[BOOT_TIMER_MAGIC]);
        timer.write(0, 0, &[]);

        assert_eq!(timer.boot_time(), None);
    }

    #[test]
    fn reads_return_zeros() {
        let mut timer = BootTimer::new(Instant::now());
        let mut buf = [0xffu8; 4];
        timer.read(0, 0, &mut buf);
        assert_eq!(buf, [0; 4]);
    }
}
