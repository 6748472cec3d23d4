//! virtio-net backed by a TAP device in the VM's network namespace.
//!
//! `tap` opens the TAP device behind the [`FrameBackend`] trait; `chain` checks RX and
//! TX descriptor chains (pure); `device` holds the queues and moves frames; and
//! `event_handler` wires the queue eventfds and the TAP into the VMM's event loop.

pub mod chain;
mod device;
mod event_handler;
mod tap;

pub use device::{
    MacAddr, MacParseError, Net, NetError, NetMetrics, NET_QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
pub use tap::{FrameBackend, Tap, TapError, VNET_HDR_LEN};

#[cfg(test)]
mod tests;
