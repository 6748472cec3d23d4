//! Virtio device interface shared by the virtio-mmio transport and the device models.
//!
//! A device model (block, rng, gpu, input, ...) implements [`VirtioDevice`]: it states its
//! type, queues, features and config space, and is activated by the transport once the
//! driver has set DRIVER_OK. Queue processing lives in the device's `device.rs`; its
//! `event_handler.rs` only wires the queue eventfds (registered with KVM as ioeventfds on
//! QUEUE_NOTIFY) into the VMM's event loop. Interrupts go out through
//! [`InterruptTrigger`], which the transport backs with an irqfd.

pub mod block;
pub mod gpu;
pub mod input;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

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
pub trait VirtioDevice: Send {
    /// Virtio device ID (2 block, 4 entropy, 16 gpu, 18 input, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (must include `VIRTIO_F_VERSION_1`).
    fn avail_features(&self) -> u64;
    /// Feature bits the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted (already masked by `avail_features`).
    fn set_acked_features(&mut self, features: u64);
    /// Reads from the device-specific configuration space. Out-of-range reads leave `data` untouched.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to the device-specific configuration space. Out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];
    /// Starts the device with the queues the driver configured.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptTrigger>,
        queues: Vec<virtio_queue::Queue>,
    ) -> Result<(), ActivateError>;
    /// Whether [`VirtioDevice::activate`] has succeeded since the last reset.
    fn is_activated(&self) -> bool;
    /// Returns the device to its pre-activation state. Returns false when the device
    /// cannot be reset, in which case the transport marks it as needing reset.
    fn reset(&mut self) -> bool {
        false
    }
}

/// A pass over one queue that went wrong because the guest corrupted its rings.
#[derive(Debug)]
pub struct QueueError {
    /// What the pass was doing.
    pub what: &'static str,
    /// The ring error.
    pub source: virtio_queue::Error,
}

/// Serves every available chain of `queue`: `serve` handles one chain and returns how
/// many bytes it wrote into it. Notifications are re-enabled without losing a chain the
/// guest adds meanwhile. Returns whether the guest asked to be interrupted for what was
/// used; ring errors go to `on_error` (the pass ends at the first one that stops it).
pub fn drain_queue<'m>(
    queue: &mut virtio_queue::Queue,
    mem: &'m GuestMemoryMmap,
    mut serve: impl FnMut(virtio_queue::DescriptorChain<&'m GuestMemoryMmap>) -> u32,
    mut on_error: impl FnMut(QueueError),
) -> bool {
    use virtio_queue::QueueT;
    let mut error = |what, source| on_error(QueueError { what, source });
    let mut used_any = false;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            error("disable notifications", e);
            break;
        }
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let used_len = serve(chain);
            if let Err(e) = queue.add_used(mem, head, used_len) {
                error("add a used entry", e);
            }
            used_any = true;
        }
        match queue.enable_notification(mem) {
            // New buffers arrived while notifications were off: go round again.
            Ok(true) => continue,
            Ok(false) => break,
            Err(e) => {
                error("enable notifications", e);
                break;
            }
        }
    }
    if !used_any {
        return false;
    }
    match queue.needs_notification(mem) {
        Ok(needed) => needed,
        Err(e) => {
            error("read the used event", e);
            false
        }
    }
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
