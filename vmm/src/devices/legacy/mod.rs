//! Legacy PC devices: the COM1 8250 UART and the i8042 controller on the port-I/O bus,
//! and the boot-timer page on the MMIO bus.
//!
//! The UART and the i8042 are vm-superio models; this module adapts them to
//! [`crate::devices::bus::BusDevice`] and backs their signals with eventfds (the UART's
//! interrupt is an irqfd, the i8042's reset is read by the VMM's event loop).

mod boot_timer;
mod i8042;
mod serial;

pub use boot_timer::{BootTimer, BootTimerState, BOOT_TIMER_MAGIC};
pub use i8042::{I8042Metrics, I8042State, I8042};
pub use serial::{
    stdin_input, Serial, SerialInput, SerialMetrics, SerialOutput, SerialOutputError, SerialState,
};

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio [`vm_superio::Trigger`] that writes 1 to an eventfd.
///
/// For the UART the eventfd is registered with KVM as an irqfd, so triggering it raises
/// the guest interrupt line; for the i8042 it tells the VMM that the guest asked for a reset.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd written on each trigger.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
