//! Device models and the buses the vCPU run loop dispatches guest I/O to.
//!
//! Legacy devices (UART, i8042, boot timer) sit on the port-I/O bus; virtio devices sit
//! on the MMIO bus behind the virtio-mmio transport. Device models are testable without
//! KVM: they see guest memory through `vm-memory` and signal the guest through
//! [`virtio::InterruptTrigger`].

pub mod bus;
pub mod virtio;
