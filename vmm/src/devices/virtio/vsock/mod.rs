//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs,
//! reached on the host through a Unix socket as in Firecracker's hybrid design (issue #13).
//!
//! Sans-IO cores: [`packet`] checks the header of every packet the driver sends,
//! [`connection`] is one connection's state and credit-based flow control, [`muxer`] the
//! connection table (RST for unknown ports, bounded buffers, timeouts, transport reset),
//! [`handshake`] the host program's `CONNECT <port>` line. The I/O: [`host`] (the Unix
//! listener and streams), `device` (queues, configuration space, the event queue) and
//! `event_handler` (epoll wiring).

pub mod connection;
mod device;
mod event_handler;
pub use vmm_api::vsock_handshake as handshake;
pub mod host;
pub mod metrics;
pub mod muxer;
pub mod packet;

pub use device::{Vsock, VsockError, EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VSOCK_QUEUE_SIZE};
pub use metrics::VsockMetrics;

#[cfg(test)]
mod tests;
