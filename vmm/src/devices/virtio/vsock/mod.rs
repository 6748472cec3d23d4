//! virtio-vsock (virtio 1.2 §5.10): stream sockets between the guest and host programs,
//! reached on the host through a Unix socket as in Firecracker's hybrid design (issue #13).
//! Built up sans-IO: [`packet`] checks the header of every packet the driver sends; the
//! connection table (credit-based flow control, RST for unknown ports, bounded buffers) and
//! the device on [`super::VirtioCommon`] come next. Nothing attaches this device yet.

pub mod packet;
