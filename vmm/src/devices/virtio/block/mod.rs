//! virtio-blk backed by a raw image file, read-only or read-write.
//!
//! `request` turns descriptor chains into typed requests (pure, fuzzed); `device` holds
//! the disk and the queue and executes requests; `event_handler` wires the queue's
//! eventfd into the VMM's event loop.

mod device;
mod event_handler;
pub mod request;

pub use device::{Block, BlockError, BlockMetrics, BLOCK_QUEUE_SIZE, BLOCK_SEG_MAX};

#[cfg(test)]
mod tests;
