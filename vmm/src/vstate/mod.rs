//! VM state: guest memory, the KVM VM, vCPU threads and their run loop, and the lifecycle
//! events (guest poweroff, reboot, triple fault, panic, errors) that end the VM, and the
//! KVM state a snapshot saves and restores.

pub mod lifecycle;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;
