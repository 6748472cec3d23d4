//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs,
//! reached on the host through a Unix socket as in Firecracker's hybrid design (issue #13).
//!
//! Sans-IO cores: [`packet`] checks the header of every packet the driver sends,
//! [`connection`] is one connection's state and credit-based flow control, [`muxer`] the
//! connection table (RST for unknown ports, bounded buffers, timeouts, transport reset),
//! [`handshake`] the host program's `CONNECT <port>` line. The device on
//! [`super::VirtioCommon`] comes next; nothing attaches this device yet.

pub mod connection;
pub mod handshake;
pub mod metrics;
pub mod muxer;
pub mod packet;

pub use metrics::VsockMetrics;
