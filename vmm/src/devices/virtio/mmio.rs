//! The virtio-mmio (version 2) transport: the register block a driver programs to
//! discover a device, negotiate features, set up queues and start it.
//!
//! One [`MmioTransport`] sits on the MMIO bus per device slot. It holds the queue
//! configuration until the driver sets DRIVER_OK, then hands the queues, guest memory
//! and an [`MmioInterrupt`] to the device ([`VirtioDevice::activate`]). Register layout
//! and the status rules follow the virtio 1.2 spec, section 4.2.2.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    CommonState, GuestMemoryMmap, InterruptKind, InterruptTrigger, QueueSnapshot, VirtioDevice,
};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The transport version implemented (modern virtio-mmio).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the driver.
pub const MMIO_VENDOR_ID: u32 = 0;
/// Size of one device's register window.
pub const MMIO_SLOT_SIZE: u64 = 0x1000;
/// Offset of QueueNotify: KVM ioeventfds are registered here, matching the queue index.
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// Where the device-specific configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets (virtio 1.2 §4.2.2).
pub(crate) mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// The device's interrupt: the InterruptStatus bits plus the irqfd that raises its GSI, and
/// the device's DEVICE_NEEDS_RESET mark.
///
/// Shared between the transport (which reads and acknowledges the status, and shows the
/// mark in the device status register) and the device (which triggers it from the event
/// loop).
#[derive(Debug)]
pub struct MmioInterrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    irq_evt: EventFd,
    raised: AtomicU64,
    failures: AtomicU64,
}

impl MmioInterrupt {
    /// An interrupt raised by writing `irq_evt` (registered with KVM as an irqfd).
    pub fn new(irq_evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            irq_evt,
            raised: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// The irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Whether the device asked for a reset ([`InterruptTrigger::set_needs_reset`]).
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

impl InterruptTrigger for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => VIRTIO_MMIO_INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        self.irq_evt.write(1).inspect_err(|_| {
            self.failures.fetch_add(1, Ordering::Relaxed);
        })
    }

    fn set_needs_reset(&self) -> std::io::Result<()> {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.trigger(InterruptKind::Config)
    }
}

/// Counters of one transport.
#[derive(Debug, Default)]
pub struct TransportMetrics {
    /// Activations that succeeded.
    pub activations: AtomicU64,
    /// Activations refused (bad queues or backend failure).
    pub activation_failures: AtomicU64,
    /// Driver status writes that broke the status sequence.
    pub invalid_status_writes: AtomicU64,
    /// Register accesses with a bad width, alignment or offset.
    pub invalid_accesses: AtomicU64,
    /// QUEUE_NOTIFY writes that reached the transport (not caught by an ioeventfd).
    pub notifies: AtomicU64,
    /// Device resets by the driver.
    pub resets: AtomicU64,
}

/// The virtio-mmio register block of one device.
pub struct MmioTransport {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
    metrics: Arc<TransportMetrics>,
    queues: Vec<Queue>,
    device_type: u32,
    avail_features: u64,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
}

/// Errors building a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The device declared a queue size virtio-queue refuses.
    #[error("device declares an invalid maximum queue size")]
    QueueSize(#[source] virtio_queue::Error),
    /// The device does not offer VIRTIO_F_VERSION_1, which virtio-mmio v2 requires.
    #[error("device does not offer VIRTIO_F_VERSION_1")]
    NotModern,
    /// A snapshot's transport state does not fit this device.
    #[error("{name}: cannot restore the snapshot's state: {reason}")]
    Restore {
        /// The device.
        name: String,
        /// Why.
        reason: String,
    },
}

/// What a snapshot keeps of one virtio-mmio device: the transport's registers and queue
/// configuration, the interrupt status, the common part of the device (acked features,
/// queue positions) and the device model's own state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Virtio device ID, checked on restore.
    pub device_type: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// DriverFeatures as written.
    pub driver_features: u64,
    /// Status as the driver set it.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
    /// The transport's queue configuration (what register reads answer).
    pub queues: Vec<QueueSnapshot>,
    /// The device's common part.
    pub common: CommonState,
    /// The device model's own state ([`VirtioDevice::save_state`]).
    pub device: serde_json::Value,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem` and whose interrupt is
    /// `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
    ) -> Result<Self, MmioError> {
        let (queues, device_type, avail_features) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).map_err(MmioError::QueueSize))
                .collect::<Result<Vec<_>, _>>()?;
            (queues, dev.device_type(), dev.avail_features())
        };
        if avail_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(MmioError::NotModern);
        }
        Ok(Self {
            name: format!("virtio-mmio device type {device_type}"),
            device,
            mem,
            interrupt,
            metrics: Arc::new(TransportMetrics::default()),
            queues,
            device_type,
            avail_features,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
        })
    }

    /// Names the device in log messages (e.g. `block0`).
    pub fn set_name(&mut self, name: &str) {
        self.name = name.to_owned();
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<MmioInterrupt> {
        &self.interrupt
    }

    /// The transport's counters.
    pub fn metrics(&self) -> Arc<TransportMetrics> {
        self.metrics.clone()
    }

    /// The device status register: what the driver set, plus DEVICE_NEEDS_RESET when the
    /// device asked for a reset.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | VIRTIO_CONFIG_S_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn has_status(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
            && !self.has_status(VIRTIO_CONFIG_S_DRIVER_OK)
            && !self.has_status(VIRTIO_CONFIG_S_FAILED)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Applies `f` to the selected queue when queue configuration is allowed and the
    /// queue is not live yet; a value the queue refuses (size, alignment) is ignored.
    fn update_queue(&mut self, f: impl FnOnce(&mut Queue) -> Result<(), virtio_queue::Error>) {
        if !self.queue_config_allowed() {
            self.metrics
                .invalid_accesses
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let accepted = match self.selected_queue() {
            Some(q) if !q.ready() => f(q).is_ok(),
            _ => false,
        };
        if !accepted {
            self.metrics
                .invalid_accesses
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let queue = self.queues.get(self.queue_select as usize);
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => MMIO_VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_select {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: the spec's "region absent" value.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            // The device's config space does not change behind the driver's back in a
            // way that needs a generation count (no multi-field atomic updates).
            reg::CONFIG_GENERATION => 0,
            _ => {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_select = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_select = value,
            reg::DRIVER_FEATURES => {
                if !self.has_status(VIRTIO_CONFIG_S_DRIVER)
                    || self.has_status(VIRTIO_CONFIG_S_FEATURES_OK)
                {
                    self.metrics
                        .invalid_accesses
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let value = u64::from(value);
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
                    1 => {
                        self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32)
                    }
                    // Pages beyond 1 hold no features we offer; a driver acking any
                    // there fails at FEATURES_OK via the mask below.
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = value,
            reg::QUEUE_NUM => match u16::try_from(value) {
                Ok(size) => self.update_queue(|q| q.try_set_size(size)),
                Err(_) => {
                    self.metrics
                        .invalid_accesses
                        .fetch_add(1, Ordering::Relaxed);
                }
            },
            reg::QUEUE_READY => {
                if !self.queue_config_allowed() {
                    self.metrics
                        .invalid_accesses
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => self.notify(value),
            reg::INTERRUPT_ACK => self.interrupt.ack(value),
            reg::STATUS => self.set_status(value),
            reg::QUEUE_DESC_LOW => self.update_queue(|q| {
                q.try_set_desc_table_address(GuestAddress(low(q.desc_table(), value)))
            }),
            reg::QUEUE_DESC_HIGH => self.update_queue(|q| {
                q.try_set_desc_table_address(GuestAddress(high(q.desc_table(), value)))
            }),
            reg::QUEUE_DRIVER_LOW => self.update_queue(|q| {
                q.try_set_avail_ring_address(GuestAddress(low(q.avail_ring(), value)))
            }),
            reg::QUEUE_DRIVER_HIGH => self.update_queue(|q| {
                q.try_set_avail_ring_address(GuestAddress(high(q.avail_ring(), value)))
            }),
            reg::QUEUE_DEVICE_LOW => self.update_queue(|q| {
                q.try_set_used_ring_address(GuestAddress(low(q.used_ring(), value)))
            }),
            reg::QUEUE_DEVICE_HIGH => self.update_queue(|q| {
                q.try_set_used_ring_address(GuestAddress(high(q.used_ring(), value)))
            }),
            reg::SHM_SEL => {}
            _ => {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// QUEUE_NOTIFY reached the transport: with KVM the ioeventfd catches these writes,
    /// so this path serves guests without ioeventfd support and tests.
    fn notify(&mut self, queue_index: u32) {
        self.metrics.notifies.fetch_add(1, Ordering::Relaxed);
        let dev = lock(&self.device);
        match dev.queue_events().get(queue_index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::guest_warn!("virtio-mmio: cannot signal queue {queue_index}: {e}");
                }
            }
            None => {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // FAILED may be set at any time and ends the driver's use of the device.
        if value & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // The driver only ever adds bits; clearing one requires a reset.
        let added = value & !self.status;
        if value & self.status != self.status || added.count_ones() != 1 {
            self.invalid_status(value);
            return;
        }
        match added {
            VIRTIO_CONFIG_S_ACKNOWLEDGE if self.status == 0 => self.status = value,
            VIRTIO_CONFIG_S_DRIVER if self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE => {
                self.status = value
            }
            VIRTIO_CONFIG_S_FEATURES_OK
                if self.status == VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER =>
            {
                self.accept_features(value);
            }
            VIRTIO_CONFIG_S_DRIVER_OK
                if self.status
                    == VIRTIO_CONFIG_S_ACKNOWLEDGE
                        | VIRTIO_CONFIG_S_DRIVER
                        | VIRTIO_CONFIG_S_FEATURES_OK =>
            {
                self.activate(value);
            }
            _ => self.invalid_status(value),
        }
    }

    fn invalid_status(&self, value: u32) {
        self.metrics
            .invalid_status_writes
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            "virtio-mmio: status {value:#x} does not follow {:#x}; ignored",
            self.status
        );
    }

    /// FEATURES_OK sticks only when the device takes the features the driver accepted
    /// (VERSION_1 and nothing it did not offer: [`VirtioCommon::ack_features`], which logs a
    /// refusal); otherwise the driver reads the status back without it and gives up.
    ///
    /// [`VirtioCommon::ack_features`]: super::VirtioCommon::ack_features
    fn accept_features(&mut self, value: u32) {
        if lock(&self.device)
            .ack_features(self.driver_features)
            .is_ok()
        {
            self.status = value;
        }
    }

    fn activate(&mut self, value: u32) {
        let result = self.try_activate();
        match result {
            Ok(()) => {
                self.metrics.activations.fetch_add(1, Ordering::Relaxed);
                self.status = value;
                crate::guest_info!(
                    "{}: activated by the guest driver (features {:#x})",
                    self.name,
                    self.driver_features
                );
            }
            Err(e) => {
                self.metrics
                    .activation_failures
                    .fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!("{}: not activated: {e}", self.name);
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                let _ = self.interrupt.trigger(InterruptKind::Config);
            }
        }
    }

    fn try_activate(&mut self) -> Result<(), super::ActivateError> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                return Err(super::ActivateError::BadQueue(format!(
                    "queue {i} not ready"
                )));
            }
            super::check_rings(i, q, &self.mem)?;
        }
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // The device gets its own copies; the transport keeps the configuration to
        // answer register reads until the next reset.
        let queues = self
            .queues
            .iter()
            .map(|q| {
                let mut q = Queue::try_from(q.state())
                    .map_err(|e| super::ActivateError::BadQueue(e.to_string()))?;
                q.set_event_idx(event_idx);
                Ok(q)
            })
            .collect::<Result<Vec<_>, super::ActivateError>>()?;
        let interrupt: Arc<dyn InterruptTrigger> = self.interrupt.clone();
        lock(&self.device).activate(self.mem.clone(), interrupt, queues)
    }

    fn reset(&mut self) {
        self.metrics.resets.fetch_add(1, Ordering::Relaxed);
        if !lock(&self.device).reset() {
            // The device keeps running on its old queues: tell the driver it must not
            // reuse it rather than pretend the reset happened.
            crate::guest_warn!("{}: cannot reset", self.name);
            self.status = VIRTIO_CONFIG_S_NEEDS_RESET;
            return;
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.interrupt.clear();
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
    }

    /// The transport's and its device's state, for a snapshot. Call it with the vCPUs
    /// paused (nothing then changes the registers or the rings).
    pub fn save(&self) -> TransportState {
        let mut dev = lock(&self.device);
        TransportState {
            device_type: self.device_type,
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            driver_features: self.driver_features,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            common: dev.common().save(),
            device: dev.save_state(),
        }
    }

    /// Puts a new transport and its new device (built like the snapshotted one) into
    /// `state`: registers, queue configuration, interrupt status, then the device's
    /// features and, if it was activated, its activation on the saved queues with their
    /// ring positions, and its own state. A state that does not fit the device (another
    /// type, queue count, features it does not offer, rings outside guest memory) is
    /// refused.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), MmioError> {
        let refuse = |reason: String| MmioError::Restore {
            name: self.name.clone(),
            reason,
        };
        if state.device_type != self.device_type {
            return Err(refuse(format!(
                "snapshot has device type {}, this is {}",
                state.device_type, self.device_type
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(refuse(format!(
                "snapshot has {} queues, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(QueueSnapshot::to_queue)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| refuse(format!("invalid queue configuration: {e}")))?;
        {
            let mut dev = lock(&self.device);
            if state.common.acked_features != 0 {
                dev.ack_features(state.common.acked_features)
                    .map_err(|e| refuse(e.to_string()))?;
            }
            if let Some(active) = &state.common.active_queues {
                let device_queues = active
                    .iter()
                    .map(QueueSnapshot::to_queue)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| refuse(format!("invalid device queue: {e}")))?;
                let interrupt: Arc<dyn InterruptTrigger> = self.interrupt.clone();
                dev.restore_state(&state.device)
                    .map_err(|e| refuse(format!("device state: {e}")))?;
                dev.activate(self.mem.clone(), interrupt, device_queues)
                    .map_err(|e| refuse(e.to_string()))?;
                dev.common_mut().restore_broken(&state.common);
            } else {
                dev.restore_state(&state.device)
                    .map_err(|e| refuse(format!("device state: {e}")))?;
            }
        }
        self.queues = queues;
        self.queue_select = state.queue_select;
        self.device_features_select = state.device_features_select;
        self.driver_features_select = state.driver_features_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.interrupt
            .status
            .store(state.interrupt_status, Ordering::SeqCst);
        self.interrupt
            .needs_reset
            .store(state.needs_reset, Ordering::SeqCst);
        Ok(())
    }

    /// A serialisable snapshot of the transport's counters.
    pub fn metrics_snapshot(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Snapshot {
            status: u32,
            needs_reset: bool,
            activations: u64,
            activation_failures: u64,
            invalid_status_writes: u64,
            invalid_accesses: u64,
            notifies: u64,
            resets: u64,
            interrupts: u64,
            interrupt_failures: u64,
        }
        let m = &self.metrics;
        serde_json::to_value(Snapshot {
            status: self.status(),
            needs_reset: self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0,
            activations: m.activations.load(Ordering::Relaxed),
            activation_failures: m.activation_failures.load(Ordering::Relaxed),
            invalid_status_writes: m.invalid_status_writes.load(Ordering::Relaxed),
            invalid_accesses: m.invalid_accesses.load(Ordering::Relaxed),
            notifies: m.notifies.load(Ordering::Relaxed),
            resets: m.resets.load(Ordering::Relaxed),
            interrupts: self.interrupt.raised.load(Ordering::Relaxed),
            interrupt_failures: self.interrupt.failures.load(Ordering::Relaxed),
        })
        .unwrap_or_default()
    }
}

/// `addr` with its low 32 bits replaced by `value` (the *_LOW queue address registers).
fn low(addr: u64, value: u32) -> u64 {
    (addr & !0xffff_ffff) | u64::from(value)
}

/// `addr` with its high 32 bits replaced by `value` (the *_HIGH queue address registers).
fn high(addr: u64, value: u32) -> u64 {
    (addr & 0xffff_ffff) | (u64::from(value) << 32)
}

/// Locks a device, surviving a panic in another holder: a poisoned device keeps serving
/// register accesses rather than taking every vCPU thread down with it.
fn lock(device: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset % 4 == 0 => *word = self.read_register(offset).to_le_bytes(),
            _ => {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
                data.fill(0);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if self.has_status(VIRTIO_CONFIG_S_DRIVER) && !self.has_status(VIRTIO_CONFIG_S_FAILED) {
                lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset % 4 == 0 => self.write_register(offset, u32::from_le_bytes(word)),
            _ => {
                self.metrics
                    .invalid_accesses
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::devices::virtio::{ActivateError, VirtioCommon};

    const ACK: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
    const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
    const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
    const FEATURE_LOW: u64 = 1 << 3;
    const FEATURE_HIGH: u64 = 1 << 40;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// A device that records what the transport does to it.
    struct TestDevice {
        common: VirtioCommon,
        config: [u8; 8],
        activated_with: Option<Vec<(u16, bool)>>,
        resettable: bool,
        fail_activation: bool,
    }

    impl TestDevice {
        fn new() -> Self {
            Self {
                common: VirtioCommon::new(
                    "test-device",
                    42,
                    VERSION_1 | FEATURE_LOW | FEATURE_HIGH,
                    &[16, 8],
                )
                .unwrap(),
                config: [1, 2, 3, 4, 5, 6, 7, 8],
                activated_with: None,
                resettable: true,
                fail_activation: false,
            }
        }

        fn interrupt(&self) -> Arc<dyn InterruptTrigger> {
            self.common.interrupt().unwrap().clone()
        }
    }

    impl VirtioDevice for TestDevice {
        fn common(&self) -> &VirtioCommon {
            &self.common
        }
        fn common_mut(&mut self) -> &mut VirtioCommon {
            &mut self.common
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let end = offset as usize + data.len();
            if end <= self.config.len() {
                data.copy_from_slice(&self.config[offset as usize..end]);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let end = offset as usize + data.len();
            if end <= self.config.len() {
                self.config[offset as usize..end].copy_from_slice(data);
            }
        }
        fn on_activate(&mut self) -> Result<(), ActivateError> {
            if self.fail_activation {
                return Err(ActivateError::BadQueue("refused".into()));
            }
            let queues = self.common.queues().iter().map(|q| q.queue());
            self.activated_with = Some(queues.map(|q| (q.size(), q.ready())).collect());
            Ok(())
        }
        fn reset(&mut self) -> bool {
            if self.resettable {
                self.common.reset();
                self.activated_with = None;
            }
            self.resettable
        }
    }

    struct Fixture {
        transport: MmioTransport,
        device: Arc<Mutex<TestDevice>>,
        irq: EventFd,
    }

    fn fixture() -> Fixture {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(TestDevice::new()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let transport = MmioTransport::new(device.clone(), mem, interrupt).unwrap();
        Fixture {
            transport,
            device,
            irq,
        }
    }

    impl Fixture {
        fn read(&mut self, offset: u64) -> u32 {
            let mut buf = [0u8; 4];
            self.transport.read(0, offset, &mut buf);
            u32::from_le_bytes(buf)
        }

        fn write(&mut self, offset: u64, value: u32) {
            self.transport.write(0, offset, &value.to_le_bytes());
        }

        fn ack_features(&mut self, features: u64) {
            self.write(reg::DRIVER_FEATURES_SEL, 0);
            self.write(reg::DRIVER_FEATURES, features as u32);
            self.write(reg::DRIVER_FEATURES_SEL, 1);
            self.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
        }

        fn negotiate(&mut self, features: u64) {
            self.write(reg::STATUS, ACK);
            self.write(reg::STATUS, ACK | DRIVER);
            self.ack_features(features);
            self.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        }

        /// Sets up queue `index` with `size` entries and rings at `base`.
        fn setup_queue(&mut self, index: u32, size: u32, base: u64) {
            self.write(reg::QUEUE_SEL, index);
            self.write(reg::QUEUE_NUM, size);
            self.write(reg::QUEUE_DESC_LOW, base as u32);
            self.write(reg::QUEUE_DESC_HIGH, (base >> 32) as u32);
            self.write(reg::QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
            self.write(reg::QUEUE_DRIVER_HIGH, 0);
            self.write(reg::QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
            self.write(reg::QUEUE_DEVICE_HIGH, 0);
            self.write(reg::QUEUE_READY, 1);
        }

        fn bring_up(&mut self) {
            self.negotiate(VERSION_1 | FEATURE_LOW);
            self.setup_queue(0, 16, 0x1_0000);
            self.setup_queue(1, 8, 0x2_0000);
            self.write(reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        }
    }

    #[test]
    fn identification_registers() {
        let mut f = fixture();
        assert_eq!(f.read(reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(f.read(reg::MAGIC_VALUE).to_le_bytes(), *b"virt");
        assert_eq!(f.read(reg::VERSION), 2);
        assert_eq!(f.read(reg::DEVICE_ID), 42);
        assert_eq!(f.read(reg::VENDOR_ID), MMIO_VENDOR_ID);
    }

    #[test]
    fn device_features_are_paged_by_the_select_register() {
        let mut f = fixture();
        f.write(reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(f.read(reg::DEVICE_FEATURES), FEATURE_LOW as u32);
        f.write(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            f.read(reg::DEVICE_FEATURES),
            ((VERSION_1 | FEATURE_HIGH) >> 32) as u32
        );
        f.write(reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(f.read(reg::DEVICE_FEATURES), 0);
    }

    #[test]
    fn features_acked_on_both_pages_reach_the_device_at_features_ok() {
        let mut f = fixture();
        f.negotiate(VERSION_1 | FEATURE_LOW | FEATURE_HIGH);
        assert_eq!(f.read(reg::STATUS), ACK | DRIVER | FEATURES_OK);
        assert_eq!(
            f.device.lock().unwrap().acked_features(),
            VERSION_1 | FEATURE_LOW | FEATURE_HIGH
        );
    }

    #[test]
    fn features_ok_is_refused_without_version_1() {
        let mut f = fixture();
        f.negotiate(FEATURE_LOW);
        assert_eq!(f.read(reg::STATUS), ACK | DRIVER);
        assert_eq!(f.device.lock().unwrap().acked_features(), 0);
    }

    #[test]
    fn features_ok_is_refused_for_features_not_offered() {
        let mut f = fixture();
        f.negotiate(VERSION_1 | (1 << 5));
        assert_eq!(f.read(reg::STATUS), ACK | DRIVER);
    }

    #[test]
    fn renegotiating_an_unoffered_feature_logs_a_bounded_number_of_lines() {
        use crate::logging::tests::Captured;
        use crate::logging::{BURST, REFILL};
        let mut f = fixture();
        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | DRIVER);
        f.ack_features(VERSION_1 | (1 << 5));

        let ((), flood) = Captured::run(|| {
            for _ in 0..10_000 {
                f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
            }
        });
        std::thread::sleep(REFILL);
        let ((), after) = Captured::run(|| f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK));

        let flood = flood.lines();
        assert_eq!(flood.len(), BURST as usize, "{flood:?}");
        assert!(flood.iter().all(|l| l.contains("refused")), "{flood:?}");
        let after = after.lines();
        assert_eq!(after.len(), 1, "{after:?}");
        let suppressed = 10_000 - BURST;
        assert!(
            after[0].contains(&format!("({suppressed} similar messages suppressed)")),
            "{after:?}"
        );
        assert_eq!(f.read(reg::STATUS), ACK | DRIVER);
    }

    #[test]
    fn feature_writes_outside_the_negotiation_window_are_ignored() {
        let mut f = fixture();
        // Before DRIVER.
        f.ack_features(VERSION_1 | FEATURE_LOW);
        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | DRIVER);
        f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(f.read(reg::STATUS), ACK | DRIVER, "nothing acked yet");
        // After FEATURES_OK.
        f.ack_features(VERSION_1);
        f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        f.ack_features(VERSION_1 | FEATURE_LOW | FEATURE_HIGH);
        assert_eq!(f.device.lock().unwrap().acked_features(), VERSION_1);
    }

    #[test]
    fn status_bits_must_come_in_order() {
        let mut f = fixture();
        f.write(reg::STATUS, DRIVER);
        assert_eq!(f.read(reg::STATUS), 0);
        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        assert_eq!(f.read(reg::STATUS), ACK);
        f.write(reg::STATUS, ACK | DRIVER_OK);
        assert_eq!(f.read(reg::STATUS), ACK);
        assert_eq!(
            f.transport
                .metrics()
                .invalid_status_writes
                .load(Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn queue_setup_and_driver_ok_activate_the_device() {
        let mut f = fixture();
        f.bring_up();

        assert_eq!(f.read(reg::STATUS), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        let dev = f.device.lock().unwrap();
        assert_eq!(dev.activated_with, Some(vec![(16, true), (8, true)]));
    }

    #[test]
    fn activation_is_logged_with_the_device_name() {
        #[derive(Clone, Default)]
        struct Logs(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Logs {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let mut f = fixture();
        f.transport.set_name("block0");

        tracing::subscriber::with_default(subscriber, || f.bring_up());

        let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("block0: activated by the guest driver"),
            "{text}"
        );
    }

    #[test]
    fn queue_registers_report_sizes_and_readiness() {
        let mut f = fixture();
        f.negotiate(VERSION_1);
        f.write(reg::QUEUE_SEL, 1);
        assert_eq!(f.read(reg::QUEUE_NUM_MAX), 8);
        assert_eq!(f.read(reg::QUEUE_READY), 0);
        f.setup_queue(1, 4, 0x3_0000);
        assert_eq!(f.read(reg::QUEUE_READY), 1);
        f.write(reg::QUEUE_SEL, 7);
        assert_eq!(f.read(reg::QUEUE_NUM_MAX), 0, "queue 7 does not exist");
    }

    #[test]
    fn queue_setup_before_features_ok_is_ignored() {
        let mut f = fixture();
        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | DRIVER);
        f.setup_queue(0, 16, 0x1_0000);
        assert_eq!(f.read(reg::QUEUE_READY), 0);
    }

    #[test]
    fn driver_ok_with_unready_or_invalid_queues_needs_reset() {
        let mut f = fixture();
        f.negotiate(VERSION_1);
        f.setup_queue(0, 16, 0x1_0000);
        // Queue 1's rings lie outside the 1 MiB of guest memory.
        f.setup_queue(1, 8, 0x4000_0000);
        f.write(reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);

        assert_eq!(
            f.read(reg::STATUS),
            ACK | DRIVER | FEATURES_OK | VIRTIO_CONFIG_S_NEEDS_RESET
        );
        assert!(!f.device.lock().unwrap().is_activated());
        assert_eq!(f.read(reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(f.irq.read().unwrap(), 1);
    }

    #[test]
    fn activation_refused_by_the_device_needs_reset() {
        let mut f = fixture();
        f.device.lock().unwrap().fail_activation = true;
        f.bring_up();
        assert_ne!(f.read(reg::STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(f.read(reg::STATUS) & DRIVER_OK, 0);
        let dev = f.device.lock().unwrap();
        assert!(
            !dev.is_activated(),
            "the common part's activation is undone"
        );
        assert!(dev.common().queues().is_empty());
    }

    #[test]
    fn reset_returns_transport_and_device_to_their_initial_state() {
        let mut f = fixture();
        f.bring_up();
        f.device
            .lock()
            .unwrap()
            .interrupt()
            .trigger(InterruptKind::Queue)
            .unwrap();

        f.write(reg::STATUS, 0);

        assert_eq!(f.read(reg::STATUS), 0);
        assert_eq!(f.read(reg::INTERRUPT_STATUS), 0);
        assert_eq!(f.read(reg::QUEUE_READY), 0);
        let dev = f.device.lock().unwrap();
        assert!(!dev.is_activated());
        assert_eq!(dev.acked_features(), 0);
        drop(dev);
        // The device can be brought up again.
        f.bring_up();
        assert!(f.device.lock().unwrap().is_activated());
    }

    #[test]
    fn reset_of_a_device_that_cannot_reset_reports_needs_reset() {
        let mut f = fixture();
        f.device.lock().unwrap().resettable = false;
        f.bring_up();
        f.write(reg::STATUS, 0);
        assert_eq!(f.read(reg::STATUS), VIRTIO_CONFIG_S_NEEDS_RESET);
    }

    #[test]
    fn failed_is_accepted_at_any_time() {
        let mut f = fixture();
        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(f.read(reg::STATUS), ACK | VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn config_space_reads_and_writes_pass_through() {
        let mut f = fixture();
        let mut b = [0u8; 2];
        f.transport.read(0, CONFIG_SPACE_OFFSET + 2, &mut b);
        assert_eq!(b, [3, 4]);

        // Writes before DRIVER are refused.
        f.transport.write(0, CONFIG_SPACE_OFFSET, &[0xaa]);
        assert_eq!(f.device.lock().unwrap().config[0], 1);

        f.write(reg::STATUS, ACK);
        f.write(reg::STATUS, ACK | DRIVER);
        f.transport.write(0, CONFIG_SPACE_OFFSET + 7, &[0xbb]);
        let mut one = [0u8];
        f.transport.read(0, CONFIG_SPACE_OFFSET + 7, &mut one);
        assert_eq!(one, [0xbb]);
    }

    #[test]
    fn queue_notify_signals_the_queue_eventfd() {
        let mut f = fixture();
        f.write(reg::QUEUE_NOTIFY, 1);
        f.write(reg::QUEUE_NOTIFY, 9);
        let dev = f.device.lock().unwrap();
        assert_eq!(dev.queue_events()[1].read().unwrap(), 1);
        assert!(dev.queue_events()[0].read().is_err());
    }

    #[test]
    fn interrupt_status_is_set_by_the_device_and_cleared_by_ack() {
        let mut f = fixture();
        f.bring_up();
        let interrupt = f.device.lock().unwrap().interrupt();

        interrupt.trigger(InterruptKind::Queue).unwrap();
        interrupt.trigger(InterruptKind::Config).unwrap();
        assert_eq!(f.irq.read().unwrap(), 2);
        assert_eq!(
            f.read(reg::INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );

        f.write(reg::INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(f.read(reg::INTERRUPT_STATUS), VIRTIO_MMIO_INT_CONFIG);
    }

    #[test]
    fn misaligned_or_narrow_register_accesses_are_ignored() {
        let mut f = fixture();
        let mut two = [0xffu8; 2];
        f.transport.read(0, reg::MAGIC_VALUE, &mut two);
        assert_eq!(two, [0, 0]);
        f.transport.write(0, reg::STATUS, &[ACK as u8]);
        f.transport.write(0, reg::STATUS + 1, &ACK.to_le_bytes());
        assert_eq!(f.read(reg::STATUS), 0);
        let mut word = [0u8; 4];
        f.transport.read(0, 0x0ff, &mut word);
        assert_eq!(word, [0; 4]);
        assert_eq!(
            f.transport
                .metrics()
                .invalid_accesses
                .load(Ordering::Relaxed),
            4
        );
    }

    #[test]
    fn absent_shared_memory_regions_read_as_all_ones() {
        let mut f = fixture();
        assert_eq!(f.read(reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(f.read(reg::SHM_LEN_HIGH), u32::MAX);
    }

    #[test]
    fn devices_without_version_1_are_refused() {
        struct Legacy(VirtioCommon);
        impl VirtioDevice for Legacy {
            fn common(&self) -> &VirtioCommon {
                &self.0
            }
            fn common_mut(&mut self) -> &mut VirtioCommon {
                &mut self.0
            }
        }
        let legacy = Legacy(VirtioCommon::new("legacy", 1, 0, &[16]).unwrap());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let irq = Arc::new(MmioInterrupt::new(EventFd::new(0).unwrap()));
        let result = MmioTransport::new(Arc::new(Mutex::new(legacy)), mem, irq);
        assert!(matches!(result, Err(MmioError::NotModern)));
    }
}
