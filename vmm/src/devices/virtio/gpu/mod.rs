//! virtio-gpu (2D) over virtio-mmio, publishing its scanout into the shared framebuffer of
//! the `framebuffer` crate.
//!
//! `decoder` is the sans-IO wire format, `device` the resources, scanout and queues,
//! `event_handler` the event-loop wiring.

pub mod decoder;
pub mod device;
mod event_handler;

pub use device::{Gpu, GpuConfig, GpuError, GpuHandle, GpuMetrics, GpuMetricsSnapshot, GpuState};
#[cfg(test)]
pub(crate) mod test_driver;
