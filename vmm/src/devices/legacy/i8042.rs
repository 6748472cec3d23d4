//! i8042 keyboard controller, only as far as the guest's reset goes: writing 0xFE
//! (pulse reset line) to the command port 0x64 signals the VMM through an eventfd.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
#[cfg(test)]
use crate::devices::DeviceMetrics as _;

/// Counters of the i8042.
#[derive(Debug, Default)]
pub struct I8042Metrics {
    /// Reset requests from the guest.
    pub reset_requests: AtomicU64,
    /// Resets that could not be signalled to the VMM.
    pub reset_signal_failures: AtomicU64,
}

impl crate::devices::DeviceMetrics for I8042Metrics {
    fn snapshot(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Snapshot {
            reset_requests: u64,
            reset_signal_failures: u64,
        }
        serde_json::to_value(Snapshot {
            reset_requests: self.reset_requests.load(Ordering::Relaxed),
            reset_signal_failures: self.reset_signal_failures.load(Ordering::Relaxed),
        })
        .unwrap_or_default()
    }
}

/// Offset of the command/status port (0x64) from the device's base (0x60).
const COMMAND_OFFSET: u64 = 4;
/// The "pulse CPU reset line" command.
const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 on the port-I/O bus at 0x60..=0x64.
pub struct I8042 {
    device: I8042Device<EventFdTrigger>,
    metrics: Arc<I8042Metrics>,
}

impl I8042 {
    /// An i8042 that writes to `reset_evt` when the guest asks for a CPU reset.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            device: I8042Device::new(EventFdTrigger::new(reset_evt)),
            metrics: Arc::new(I8042Metrics::default()),
        }
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<I8042Metrics> {
        self.metrics.clone()
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], Ok(offset)) => *byte = self.device.read(offset),
            (data, _) => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (&[value], Ok(offset8)) = (data, u8::try_from(offset)) else {
            return;
        };
        if offset == COMMAND_OFFSET && value == CMD_RESET_CPU {
            self.metrics.reset_requests.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(e) = self.device.write(offset8, value) {
            self.metrics
                .reset_signal_failures
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!("i8042: cannot signal the guest's reset request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_on_port_0x64_signals_the_reset_eventfd() {
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(reset_evt.try_clone().unwrap());

        i8042.write(0x60, COMMAND_OFFSET, &[CMD_RESET_CPU]);

        assert_eq!(reset_evt.read().unwrap(), 1);
        assert_eq!(i8042.metrics().snapshot()["reset_requests"], 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut i8042 = I8042::new(reset_evt.try_clone().unwrap());

        i8042.write(0x60, COMMAND_OFFSET, &[0xfd]);
        i8042.write(0x60, 0, &[CMD_RESET_CPU]);
        i8042.write(0x60, COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);

        let err = reset_evt.read().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        assert_eq!(i8042.metrics().snapshot()["reset_requests"], 0);
    }

    #[test]
    fn status_port_reads_as_ready_for_commands() {
        let mut i8042 = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut status = [0xffu8];
        i8042.read(0x60, COMMAND_OFFSET, &mut status);
        // Input-buffer-full (bit 1) clear: the guest's reset path waits on it.
        assert_eq!(status[0] & 0x2, 0);
    }
}
