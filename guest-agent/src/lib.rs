//! genos-agent, the GenOS guest agent: serves hostd over AF_VSOCK (genos-vmm), a
//! virtio-serial port (QEMU) or a Unix socket (tests), speaking [`proto::agent`].
//!
//! Statically linked and free of NSS, so the same binary runs as PID 1 of the initramfs and
//! as a service in any root filesystem. `docs/agent.md` describes protocol and behaviour.

pub mod exec;
pub mod files;
pub mod kiosk;
pub mod link;
pub mod paths;
pub mod ready;
pub mod server;
pub mod system;
pub mod transport;
pub mod users;
pub mod x11;
