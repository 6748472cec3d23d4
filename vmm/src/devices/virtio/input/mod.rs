//! virtio-input over virtio-mmio: a keyboard, an absolute pointer (tablet) and a multi-touch
//! screen, each one device built from an [`InputProfile`].
//!
//! `profile` answers the driver's config-space queries and validates injected events,
//! `pending` is the bounded queue of events waiting for guest buffers, `device` the virtio
//! device, `event_handler` the event-loop wiring. The VMM injects through [`InputHandle`].

pub mod device;
mod event_handler;
pub mod pending;
pub mod profile;

pub use device::{Input, InputError, InputHandle, InputMetrics};
pub use profile::{InputKind, InputProfile};
