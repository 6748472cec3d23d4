//! Boot-timer device: the guest writes [`BOOT_TIMER_MAGIC`] to offset 0 of its MMIO page
//! when it has booted, and the VMM logs the time elapsed since the VMM process started.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::devices::bus::BusDevice;

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
