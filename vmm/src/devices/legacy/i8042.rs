//! i8042 keyboard controller, only as far as the guest's reset goes: writing 0xFE
//! (pulse reset line) to the command port 0x64 signals the VMM through an eventfd.
//!
//! There is no keyboard behind it, and the status register says so in the way Linux
//! understands quickly: "output buffer full" is always set, so the i8042 driver's initial
//! flush reads 16 junk bytes and concludes "No controller found" at once, instead of
//! polling for command answers that never come (seconds of boot time under nested KVM).
//! "Input buffer full" is always clear, so the kernel's reboot path (`kb_wait()` then 0xFE)
//! never waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
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
/// Status register: output buffer full (data waiting for the guest). Input buffer full
/// (0x02, controller busy) is never set.
const STATUS_OUTPUT_FULL: u8 = 0x01;

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

    /// The device's guest-visible state, for a snapshot: there is none (its status is
    /// constant and its data port always reads 0), which the state records explicitly.
    pub fn save(&self) -> I8042State {
        I8042State {}
    }

    /// An i8042 in the snapshotted `state`, signalling resets on `reset_evt`.
    pub fn restore(_state: &I8042State, reset_evt: EventFd) -> Self {
        Self::new(reset_evt)
    }
}

/// The i8042's snapshot: empty (see [`I8042::save`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct I8042State {}

impl BusDevice for I8042 {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([byte], _) if offset == COMMAND_OFFSET => *byte = STATUS_OUTPUT_FULL,
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
            crate::guest_error!("i8042: cannot signal the guest's reset request: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Status register: input buffer full (controller busy with the last command).
    const STATUS_INPUT_FULL: u8 = 0x02;

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
    fn a_restored_i8042_still_signals_resets() {
        let saved = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()).save();
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();

        let mut restored = I8042::restore(&saved, reset_evt.try_clone().unwrap());
        restored.write(0x60, COMMAND_OFFSET, &[CMD_RESET_CPU]);

        assert_eq!(reset_evt.read().unwrap(), 1);
    }

    #[test]
    fn status_port_reads_as_ready_for_commands() {
        let mut i8042 = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut status = [0xffu8];
        i8042.read(0x60, COMMAND_OFFSET, &mut status);
        // Input-buffer-full clear: the guest's reset path waits for it.
        assert_eq!(status[0] & STATUS_INPUT_FULL, 0);
    }

    #[test]
    fn status_port_reports_data_that_is_never_a_keyboard() {
        let mut i8042 = I8042::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut status = [0u8];
        let mut data = [0xffu8];
        for _ in 0..17 {
            i8042.read(0x60, COMMAND_OFFSET, &mut status);
            i8042.read(0x60, 0, &mut data);
        }
        // Still "output full" after more than the 16 bytes Linux flushes: it gives up.
        assert_ne!(status[0] & STATUS_OUTPUT_FULL, 0);
        assert_eq!(data[0], 0);
    }
}
