//! virtio-rng (entropy device): fills the guest's buffers from the host kernel's CSPRNG.

mod device;
mod event_handler;

pub use device::{Rng, RngMetrics, RNG_QUEUE_SIZE};
