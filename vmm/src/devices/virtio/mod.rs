//! Virtio device interface shared by the virtio-mmio transport and the device models.
//!
//! A device model (block, rng, gpu, input, ...) implements [`VirtioDevice`] around a
//! [`VirtioCommon`] (`common.rs`), which holds what every device has: type, queue sizes
//! and eventfds, offered and acked features, and, once the driver has set DRIVER_OK, the
//! queues, guest memory and interrupt. Feature negotiation, activation checks, reset, the
//! interrupt after a queue pass and the answer to a broken queue are written there once;
//! the trait's default methods delegate to it. Queue processing lives in the device's
//! `device.rs`; its `event_handler.rs` only wires the queue eventfds (registered with KVM
//! as ioeventfds on QUEUE_NOTIFY) into the VMM's event loop. Interrupts go out through
//! [`InterruptTrigger`], which the transport backs with an irqfd.
//!
//! Devices read and update their rings through [`DeviceQueue`]. A guest that breaks a
//! ring (an available index further ahead than the queue size, a descriptor index outside
//! the table, rings that cannot be written) gets the same answer from every device:
//! [`VirtioCommon::serve_queue`] sets DEVICE_NEEDS_RESET with a configuration interrupt,
//! and the queue is left alone until the driver resets the device.

pub mod block;
mod common;
pub mod gpu;
pub mod input;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use common::{
    CommonState, FeatureError, QueueMetrics, QueueMetricsValues, QueueSnapshot, VirtioCommon,
};

/// Guest memory as device models see it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Why the device raises its interrupt (the bits of the virtio-mmio InterruptStatus register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A used buffer was added to a queue.
    Queue,
    /// The configuration space changed.
    Config,
}

/// What a device needs to signal the guest.
pub trait InterruptTrigger: Send + Sync {
    /// Records `kind` in the interrupt status and raises the device's interrupt line.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
    /// Marks the device as needing a reset (DEVICE_NEEDS_RESET in its status, virtio 1.2
    /// §2.1.2) and raises a configuration interrupt so that the driver looks; the transport
    /// clears the mark when the driver resets the device. Marking an already marked device
    /// raises nothing.
    fn set_needs_reset(&self) -> std::io::Result<()>;
}

/// Errors a device can return when the driver activates it.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a queue configuration the device cannot use.
    #[error("invalid queue configuration: {0}")]
    BadQueue(String),
    /// Activating the device's backend failed.
    #[error("device backend failed to activate: {0}")]
    Backend(#[source] std::io::Error),
}

/// A virtio device model behind the virtio-mmio transport.
///
/// A device implements [`VirtioDevice::common`] and [`VirtioDevice::common_mut`], its
/// configuration space, and, where its activation or reset does more than the common
/// part's, [`VirtioDevice::on_activate`] and [`VirtioDevice::on_reset`]; the other methods
/// have defaults that delegate to its [`VirtioCommon`].
pub trait VirtioDevice: Send {
    /// The part every device shares.
    fn common(&self) -> &VirtioCommon;
    /// The part every device shares, to change.
    fn common_mut(&mut self) -> &mut VirtioCommon;

    /// Virtio device ID (2 block, 4 entropy, 16 gpu, 18 input, ...).
    fn device_type(&self) -> u32 {
        self.common().device_type()
    }
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16] {
        self.common().queue_sizes()
    }
    /// Feature bits the device offers (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64 {
        self.common().avail_features()
    }
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64 {
        self.common().acked_features()
    }
    /// Takes the features the driver accepted at FEATURES_OK, or refuses them all
    /// ([`VirtioCommon::ack_features`]).
    fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        self.common_mut().ack_features(features)
    }
    /// Reads from the device-specific configuration space. Out-of-range reads leave `data`
    /// untouched; the default is a device without a configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let _ = (offset, data);
    }
    /// Writes to the device-specific configuration space. Out-of-range writes are ignored;
    /// the default is a device without writable fields.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let _ = (offset, data);
    }
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd] {
        self.common().queue_events()
    }
    /// Starts the device with the queues the driver configured: the common part checks
    /// and takes them ([`VirtioCommon::activate`]), then [`VirtioDevice::on_activate`]
    /// runs; if that fails the device is left unactivated.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptTrigger>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.common_mut().activate(mem, interrupt, queues)?;
        self.on_activate().inspect_err(|_| {
            self.common_mut().reset();
        })
    }
    /// What the device does once activated, beyond the common part (e.g. serve what was
    /// queued before).
    fn on_activate(&mut self) -> Result<(), ActivateError> {
        Ok(())
    }
    /// Whether [`VirtioDevice::activate`] has succeeded since the last reset.
    fn is_activated(&self) -> bool {
        self.common().is_activated()
    }
    /// Returns the device to its initial state (the driver wrote 0 to the status): the
    /// common part ([`VirtioCommon::reset`]), then, if the device was activated,
    /// [`VirtioDevice::on_reset`]. Returns false when the device cannot be reset, in which
    /// case the transport marks it as needing reset.
    fn reset(&mut self) -> bool {
        if self.common_mut().reset() {
            self.on_reset();
        }
        true
    }
    /// What a reset of the activated device clears beyond the common part (device state
    /// the guest built, configuration selectors, ...).
    fn on_reset(&mut self) {}
    /// The device model's own state for a snapshot, beyond the common part (which the
    /// transport saves for every device); the default is a device with none.
    fn save_state(&mut self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Takes back what [`VirtioDevice::save_state`] gave, before the transport
    /// re-activates the device. The default accepts only "no state".
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        match state {
            serde_json::Value::Null => Ok(()),
            _ => Err("this device keeps no state of its own".into()),
        }
    }
}

/// A queue the guest broke: the device cannot go on with it until the driver resets it.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// virtio-queue refused to read or update the rings (e.g. an available index further
    /// ahead than the queue size, or a ring write outside guest memory).
    #[error("queue {queue}: cannot {what}")]
    Ring {
        /// Index of the queue in the device.
        queue: usize,
        /// What the device was doing.
        what: &'static str,
        /// The ring error.
        #[source]
        source: virtio_queue::Error,
    },
    /// The available ring names a descriptor outside the descriptor table.
    #[error("queue {queue}: available ring names descriptor {head} of a {size}-entry table")]
    HeadOutOfRange {
        /// Index of the queue in the device.
        queue: usize,
        /// The descriptor index the guest wrote.
        head: u16,
        /// The queue's size.
        size: u16,
    },
}

/// One queue of an activated device: virtio-queue's [`Queue`] plus whether the guest broke
/// it. Every device model reads and updates its rings through this type, so that a broken
/// ring is handled the same way everywhere: the first operation that fails returns a
/// [`QueueError`] (which [`VirtioCommon::serve_queue`] answers with DEVICE_NEEDS_RESET), and from then on
/// the queue offers no chains and takes no used entries until the driver resets the
/// device (which builds new queues).
#[derive(Debug)]
pub struct DeviceQueue {
    queue: Queue,
    index: usize,
    broken: bool,
}

impl DeviceQueue {
    /// Queue `index` of a device, as the transport configured it.
    pub fn new(queue: Queue, index: usize) -> Self {
        Self {
            queue,
            index,
            broken: false,
        }
    }

    /// One device queue per transport queue, in order.
    pub fn from_queues(queues: Vec<Queue>) -> Vec<Self> {
        queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| Self::new(q, i))
            .collect()
    }

    /// Whether the guest broke this queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the queue broken (a restored snapshot's queue that was).
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// The underlying queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    fn fail(&mut self, what: &'static str, source: virtio_queue::Error) -> QueueError {
        self.broken = true;
        QueueError::Ring {
            queue: self.index,
            what,
            source,
        }
    }

    /// The next chain the driver made available; `None` when there is none or the queue
    /// is broken.
    pub fn pop<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
    ) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, QueueError> {
        if self.broken {
            return Ok(None);
        }
        // `iter` rather than `pop_descriptor_chain`: the latter logs and hides the error,
        // and a caller that believes the queue empty while the index says otherwise spins.
        let chain = match self.queue.iter(mem) {
            Ok(mut chains) => chains.next(),
            Err(e) => return Err(self.fail("read the available ring", e)),
        };
        let size = self.queue.size();
        match chain {
            Some(chain) if chain.head_index() >= size => {
                self.broken = true;
                Err(QueueError::HeadOutOfRange {
                    queue: self.index,
                    head: chain.head_index(),
                    size,
                })
            }
            chain => Ok(chain),
        }
    }

    /// Gives the last popped chain back: the next [`DeviceQueue::pop`] returns it again.
    pub fn undo_pop(&mut self) {
        if !self.broken {
            self.queue
                .set_next_avail(self.queue.next_avail().wrapping_sub(1));
        }
    }

    /// Returns chain `head` to the driver with `len` bytes written into it.
    pub fn add_used(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), QueueError> {
        if self.broken {
            return Ok(());
        }
        self.queue
            .add_used(mem, head, len)
            .map_err(|e| self.fail("add a used entry", e))
    }

    /// Whether the driver wants an interrupt for what was used since the last time.
    pub fn needs_notification(&mut self, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        if self.broken {
            return Ok(false);
        }
        self.queue
            .needs_notification(mem)
            .map_err(|e| self.fail("read the used event", e))
    }

    /// Serves every available chain: `serve` handles one chain and returns how many bytes
    /// it wrote into it. Notifications are re-enabled without losing a chain the guest
    /// adds meanwhile. Returns whether any chain was used (the pass result
    /// [`VirtioCommon::serve_queue`] wants).
    pub fn drain<'m>(
        &mut self,
        mem: &'m GuestMemoryMmap,
        mut serve: impl FnMut(DescriptorChain<&'m GuestMemoryMmap>) -> u32,
    ) -> Result<bool, QueueError> {
        let mut used_any = false;
        while !self.broken {
            self.queue
                .disable_notification(mem)
                .map_err(|e| self.fail("disable notifications", e))?;
            while let Some(chain) = self.pop(mem)? {
                let head = chain.head_index();
                let used_len = serve(chain);
                self.add_used(mem, head, used_len)?;
                used_any = true;
            }
            // New buffers that arrived while notifications were off: go round again.
            let more = self
                .queue
                .enable_notification(mem)
                .map_err(|e| self.fail("enable notifications", e))?;
            if !more {
                break;
            }
        }
        Ok(used_any)
    }
}

/// Checks that the rings of `queue` (queue `index` of its device) lie in guest memory
/// (the transport has already refused sizes and alignments virtio-queue does not accept).
pub fn check_rings(
    index: usize,
    queue: &Queue,
    mem: &GuestMemoryMmap,
) -> Result<(), ActivateError> {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let size = u64::from(queue.size());
    let rings = [
        ("descriptor table", queue.desc_table(), 16 * size),
        ("available ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ];
    for (what, addr, len) in rings {
        // `len` is at most 16 * 32768.
        if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len as usize) {
            return Err(ActivateError::BadQueue(format!(
                "queue {index}: {what} at {addr:#x} (+{len:#x}) is outside guest memory"
            )));
        }
    }
    Ok(())
}

/// Copies `data.len()` bytes of a device's configuration space `config` from `offset`
/// into `data`; an access that does not fit leaves `data` untouched, as
/// [`VirtioDevice::read_config`] promises.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = start
        .checked_add(data.len())
        .and_then(|end| config.get(start..end))
    {
        data.copy_from_slice(src);
    }
}
