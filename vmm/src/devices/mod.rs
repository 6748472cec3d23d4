//! Device models and the buses the vCPU run loop dispatches guest I/O to.
//!
//! Legacy devices (UART, i8042, boot timer) sit on the port-I/O bus; virtio devices sit
//! on the MMIO bus behind the virtio-mmio transport. Device models are testable without
//! KVM: they see guest memory through `vm-memory` and signal the guest through
//! [`virtio::InterruptTrigger`].

pub mod bus;
pub mod legacy;
pub mod virtio;

/// Counters a device exposes on the VMM's metrics endpoint. Devices keep them in
/// atomics so that a snapshot never waits on the device's lock.
pub trait DeviceMetrics: Send + Sync {
    /// The counters as a JSON object.
    fn snapshot(&self) -> serde_json::Value;
}
