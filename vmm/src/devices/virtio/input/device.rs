//! virtio-input device: config-space answers from an [`InputProfile`], the event queue
//! filled from a bounded [`PendingQueue`], the status queue consumed.
//!
//! Injection goes through an [`InputHandle`] (any thread): the batch is validated, queued,
//! and a kick eventfd wakes the device on the event loop, which hands events to the guest
//! as it posts buffers.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pending::{PendingError, PendingQueue, DEFAULT_CAPACITY};
use super::profile::{EventError, InputProfile, CONFIG_PAYLOAD_LEN};
use crate::devices::virtio::{read_config_bytes, QueueMetrics, VirtioCommon, VirtioDevice};
use crate::devices::DeviceMetrics;
use crate::rpc::InputEvent;

/// Virtio device id of an input device.
pub const INPUT_DEVICE_ID: u32 = 18;
/// Index of the event queue (device to driver).
pub const EVENT_QUEUE: usize = 0;
/// Index of the status queue (driver to device: LEDs).
pub const STATUS_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [64, 64];
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Size of `virtio_input_event`.
const EVENT_LEN: usize = 8;
/// Offset of the payload union in `virtio_input_config`.
const CONFIG_PAYLOAD_OFFSET: usize = 8;

/// Errors from creating an input device or injecting events.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The batch has no events.
    #[error("input batch is empty")]
    Empty,
    /// One event is not something this device produces.
    #[error("event {index} rejected")]
    Event {
        index: usize,
        #[source]
        source: EventError,
    },
    /// The pending queue refused the batch.
    #[error(transparent)]
    Pending(#[from] PendingError),
    /// An eventfd could not be created or signalled.
    #[error("input device eventfd")]
    EventFd(#[source] std::io::Error),
}

/// Counters of one input device.
#[derive(Debug, Default, Serialize)]
pub struct InputMetrics {
    /// Events accepted for delivery.
    pub injected: AtomicU64,
    /// Events written to guest buffers.
    pub delivered: AtomicU64,
    /// Motion events dropped because the guest was not reading.
    pub dropped: AtomicU64,
    /// Batches refused (invalid, or keys that did not fit).
    pub refused: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    #[serde(skip)]
    pub queues: Arc<QueueMetrics>,
}

impl DeviceMetrics for InputMetrics {
    fn snapshot(&self) -> serde_json::Value {
        self.queues.snapshot_with(self)
    }
}

/// The VMM's handle on an input device: injects event batches. Cheap to clone.
#[derive(Clone)]
pub struct InputHandle {
    profile: Arc<InputProfile>,
    pending: Arc<Mutex<PendingQueue>>,
    kick: Arc<EventFd>,
    metrics: Arc<InputMetrics>,
}

impl std::fmt::Debug for InputHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputHandle")
            .field("device", &self.profile.label())
            .finish_non_exhaustive()
    }
}

impl InputHandle {
    /// Validates `events` against the device (every event supported, values in range, ending
    /// with SYN_REPORT), queues them and wakes the device. Returns how many pending motion
    /// events were dropped to make room.
    pub fn inject(&self, events: &[InputEvent]) -> Result<u64, InputError> {
        let result = self.try_inject(events);
        if result.is_err() {
            self.metrics.refused.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    fn try_inject(&self, events: &[InputEvent]) -> Result<u64, InputError> {
        if events.is_empty() {
            return Err(InputError::Empty);
        }
        for (index, event) in events.iter().enumerate() {
            self.profile
                .check(event)
                .map_err(|source| InputError::Event { index, source })?;
        }
        let dropped = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_batch(events)?;
        self.metrics
            .injected
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.metrics.dropped.fetch_add(dropped, Ordering::Relaxed);
        self.kick.write(1).map_err(InputError::EventFd)?;
        Ok(dropped)
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<InputMetrics> {
        self.metrics.clone()
    }
}

/// A virtio-input device (keyboard, tablet or touch screen, by profile).
pub struct Input {
    common: VirtioCommon,
    profile: Arc<InputProfile>,
    select: u8,
    subsel: u8,
    kick: Arc<EventFd>,
    pending: Arc<Mutex<PendingQueue>>,
    metrics: Arc<InputMetrics>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("device", &self.profile.label())
            .field("activated", &self.common.is_activated())
            .finish_non_exhaustive()
    }
}

impl Input {
    /// A device described by `profile`, with a pending queue of the default capacity.
    pub fn new(profile: InputProfile) -> Result<Self, InputError> {
        Self::with_capacity(profile, DEFAULT_CAPACITY)
    }

    /// A device whose pending queue holds at most `capacity` events.
    pub fn with_capacity(profile: InputProfile, capacity: usize) -> Result<Self, InputError> {
        let common = VirtioCommon::new(
            "virtio-input",
            INPUT_DEVICE_ID,
            VIRTIO_F_VERSION_1,
            &QUEUE_SIZES,
        )
        .map_err(InputError::EventFd)?;
        let metrics = Arc::new(InputMetrics {
            queues: common.metrics(),
            ..InputMetrics::default()
        });
        Ok(Self {
            common,
            profile: Arc::new(profile),
            select: 0,
            subsel: 0,
            kick: Arc::new(EventFd::new(EFD_NONBLOCK).map_err(InputError::EventFd)?),
            pending: Arc::new(Mutex::new(PendingQueue::new(capacity))),
            metrics,
        })
    }

    /// The VMM's handle for injecting events.
    pub fn handle(&self) -> InputHandle {
        InputHandle {
            profile: self.profile.clone(),
            pending: self.pending.clone(),
            kick: self.kick.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The eventfd an [`InputHandle`] signals after queuing events.
    pub fn kick_event(&self) -> &EventFd {
        &self.kick
    }

    /// Moves pending events into the guest's event-queue buffers, as many as it posted.
    pub fn process_event_queue(&mut self) {
        let (pending, metrics) = (&self.pending, &self.metrics);
        self.common.serve_queue(EVENT_QUEUE, |queue, mem| {
            let mut pending = pending.lock().unwrap_or_else(PoisonError::into_inner);
            let mut used_any = false;
            while let Some(event) = pending.peek() {
                let Some(chain) = queue.pop(mem)? else {
                    break;
                };
                let head = chain.head_index();
                let mut bytes = [0u8; EVENT_LEN];
                bytes[0..2].copy_from_slice(&event.ty.to_le_bytes());
                bytes[2..4].copy_from_slice(&event.code.to_le_bytes());
                bytes[4..8].copy_from_slice(&event.value.to_le_bytes());
                let written = match chain.writer(mem) {
                    Ok(mut w) if w.available_bytes() >= EVENT_LEN => {
                        w.write_all(&bytes).map(|()| EVENT_LEN).unwrap_or(0)
                    }
                    // A buffer too small for an event is returned unused; the event waits.
                    _ => 0,
                };
                if written == EVENT_LEN {
                    pending.pop();
                    metrics.delivered.fetch_add(1, Ordering::Relaxed);
                }
                queue.add_used(mem, head, written as u32)?;
                used_any = true;
            }
            Ok(used_any)
        });
    }

    /// Returns the driver's status buffers (LED changes); the host has no LEDs to set.
    pub fn process_status_queue(&mut self) {
        self.common
            .serve_queue(STATUS_QUEUE, |queue, mem| queue.drain(mem, |_| 0));
    }

    fn config_bytes(&self) -> [u8; CONFIG_PAYLOAD_OFFSET + CONFIG_PAYLOAD_LEN] {
        let mut config = [0u8; CONFIG_PAYLOAD_OFFSET + CONFIG_PAYLOAD_LEN];
        let payload = self.profile.config_payload(self.select, self.subsel);
        config[0] = self.select;
        config[1] = self.subsel;
        config[2] = payload.len() as u8;
        config[CONFIG_PAYLOAD_OFFSET..CONFIG_PAYLOAD_OFFSET + payload.len()]
            .copy_from_slice(&payload);
        config
    }
}

impl VirtioDevice for Input {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_bytes();
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `select` (byte 0) and `subsel` (byte 1) are writable.
        for (i, &byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = byte,
                Some(1) => self.subsel = byte,
                _ => {}
            }
        }
    }

    fn on_reset(&mut self) {
        self.select = 0;
        self.subsel = 0;
    }

    /// The device kind (checked on restore), the configuration selectors and the events
    /// injected but not yet handed to the guest.
    fn save_state(&mut self) -> serde_json::Value {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .undelivered();
        serde_json::json!({
            "device": self.profile.label(),
            "select": self.select,
            "subsel": self.subsel,
            "pending": pending,
        })
    }

    /// Takes the selectors and the undelivered events back, and kicks the event loop so
    /// that they reach the buffers the guest posted before the snapshot.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Saved {
            device: String,
            select: u8,
            subsel: u8,
            pending: Vec<InputEvent>,
        }
        let saved: Saved = serde_json::from_value(state.clone())
            .map_err(|e| format!("invalid virtio-input state: {e}"))?;
        if saved.device != self.profile.label() {
            return Err(format!(
                "the snapshot's device is a {}, this one a {}",
                saved.device,
                self.profile.label()
            ));
        }
        self.select = saved.select;
        self.subsel = saved.subsel;
        if !saved.pending.is_empty() {
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_batch(&saved.pending)
                .map_err(|e| format!("pending events: {e}"))?;
            self.kick
                .write(1)
                .map_err(|e| format!("cannot kick the event loop: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::super::profile::{ev, select};
    use super::*;
    use crate::devices::virtio::gpu::test_driver::{
        guest_memory, Buf, DriverQueue, RecordingInterrupt,
    };
    use crate::devices::virtio::test_utils::check_broken_queue_needs_reset;
    use crate::devices::virtio::{GuestMemoryMmap, InterruptKind};

    fn event(ty: u16, code: u16, value: i32) -> InputEvent {
        InputEvent { ty, code, value }
    }

    fn syn() -> InputEvent {
        event(ev::EV_SYN, ev::SYN_REPORT, 0)
    }

    /// Selects (`sel`, `subsel`) the way the Linux driver does and reads size and payload.
    fn query(dev: &mut Input, sel: u8, subsel: u8) -> Vec<u8> {
        dev.write_config(0, &[sel]);
        dev.write_config(1, &[subsel]);
        let mut size = [0u8];
        dev.read_config(2, &mut size);
        let mut payload = vec![0u8; usize::from(size[0])];
        dev.read_config(8, &mut payload);
        payload
    }

    #[test]
    fn a_restored_device_delivers_what_was_pending_and_keeps_its_selectors() {
        let mem = guest_memory(1 << 20);
        let mut dev = Input::new(InputProfile::tablet()).unwrap();
        let handle = dev.handle();
        let (_irq, mut events, _status) = activated(&mut dev, &mem);
        let batch = [
            event(ev::EV_ABS, ev::ABS_X, 100),
            event(ev::EV_ABS, ev::ABS_Y, 200),
            event(ev::EV_KEY, ev::BTN_LEFT, 1),
            syn(),
        ];
        handle.inject(&batch).unwrap();
        for i in 0..2 {
            events.post(&[Buf::write(0x10000 + i * 8, 8)]);
        }
        dev.process_event_queue();
        dev.write_config(0, &[select::ID_NAME]);
        let json = serde_json::to_vec(&dev.save_state()).unwrap();

        let mut restored = Input::new(InputProfile::tablet()).unwrap();
        restored
            .restore_state(&serde_json::from_slice(&json).unwrap())
            .unwrap();
        let kicked = restored.kick_event().read().unwrap();
        let (_irq2, mut events2, _status2) = activated(&mut restored, &mem);
        for i in 0..2 {
            events2.post(&[Buf::write(0x20000 + i * 8, 8)]);
        }
        restored.process_event_queue();

        assert_eq!(kicked, 1);
        assert_eq!(events2.used().len(), 2);
        assert_eq!(read_event(&mem, 0x20000), batch[2]);
        assert_eq!(read_event(&mem, 0x20008), batch[3]);
        let mut sel = [0u8];
        restored.read_config(0, &mut sel);
        assert_eq!(sel[0], select::ID_NAME);
    }

    #[test]
    fn a_keyboards_state_does_not_restore_into_a_tablet() {
        let mut kbd = Input::new(InputProfile::keyboard()).unwrap();
        let mut tablet = Input::new(InputProfile::tablet()).unwrap();

        let err = tablet.restore_state(&kbd.save_state()).unwrap_err();

        assert_eq!(
            err,
            "the snapshot's device is a keyboard, this one a tablet"
        );
    }

    #[test]
    fn config_space_answers_the_drivers_queries() {
        let mut kbd = Input::new(InputProfile::keyboard()).unwrap();
        assert_eq!(
            query(&mut kbd, select::ID_NAME, 0),
            b"GenOS virtio keyboard"
        );
        assert_eq!(query(&mut kbd, select::ID_DEVIDS, 0).len(), 8);
        let keys = query(&mut kbd, select::EV_BITS, ev::EV_KEY as u8);
        assert_eq!(keys[30 / 8] & (1 << (30 % 8)), 1 << (30 % 8), "KEY_A");
        assert!(!query(&mut kbd, select::EV_BITS, ev::EV_REP as u8).is_empty());
        assert!(query(&mut kbd, select::ABS_INFO, 0).is_empty());

        let mut touch = Input::new(InputProfile::touch()).unwrap();
        let info = query(&mut touch, select::ABS_INFO, ev::ABS_MT_SLOT as u8);
        assert_eq!(info.len(), 20);
        // Reading past the 136-byte config space leaves the buffer untouched.
        let mut past = [0xaau8; 4];
        touch.read_config(136, &mut past);
        assert_eq!(past, [0xaa; 4]);
    }

    fn activated<'m>(
        dev: &mut Input,
        mem: &'m GuestMemoryMmap,
    ) -> (Arc<RecordingInterrupt>, DriverQueue<'m>, DriverQueue<'m>) {
        let events = DriverQueue::new(mem, 0);
        let status = DriverQueue::new(mem, 0x4000);
        let irq = RecordingInterrupt::new();
        dev.activate(
            mem.clone(),
            irq.clone(),
            vec![events.device_queue(), status.device_queue()],
        )
        .unwrap();
        (irq, events, status)
    }

    fn read_event(mem: &GuestMemoryMmap, addr: u64) -> InputEvent {
        let b: [u8; 8] = mem.read_obj(GuestAddress(addr)).unwrap();
        event(
            u16::from_le_bytes([b[0], b[1]]),
            u16::from_le_bytes([b[2], b[3]]),
            i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        )
    }

    #[test]
    fn injected_batch_waits_for_buffers_and_is_delivered_in_order() {
        let mem = guest_memory(1 << 20);
        let mut dev = Input::new(InputProfile::tablet()).unwrap();
        let handle = dev.handle();
        let (irq, mut events, _status) = activated(&mut dev, &mem);
        let batch = [
            event(ev::EV_ABS, ev::ABS_X, 100),
            event(ev::EV_ABS, ev::ABS_Y, 200),
            event(ev::EV_KEY, ev::BTN_LEFT, 1),
            syn(),
        ];

        assert_eq!(handle.inject(&batch).unwrap(), 0);
        dev.process_event_queue();
        assert!(events.used().is_empty(), "no buffers yet");

        for i in 0..3 {
            events.post(&[Buf::write(0x10000 + i * 8, 8)]);
        }
        dev.process_event_queue();
        assert_eq!(events.used().len(), 3);
        for i in 0..2 {
            events.post(&[Buf::write(0x10000 + (3 + i) * 8, 8)]);
        }
        dev.process_event_queue();

        let delivered: Vec<_> = (0..4).map(|i| read_event(&mem, 0x10000 + i * 8)).collect();
        assert_eq!(delivered, batch);
        assert_eq!(
            events.used().len(),
            4,
            "the fifth buffer stays with the device"
        );
        assert!(irq.count(InterruptKind::Queue) >= 2);
    }

    #[test]
    fn invalid_batches_are_refused_with_the_offending_event() {
        let dev = Input::new(InputProfile::keyboard()).unwrap();
        let handle = dev.handle();
        assert!(matches!(handle.inject(&[]), Err(InputError::Empty)));
        assert!(matches!(
            handle.inject(&[event(ev::EV_KEY, 30, 1)]),
            Err(InputError::Pending(PendingError::Unterminated))
        ));
        let err = handle
            .inject(&[
                event(ev::EV_KEY, 30, 1),
                event(ev::EV_ABS, ev::ABS_X, 1),
                syn(),
            ])
            .unwrap_err();
        assert!(matches!(err, InputError::Event { index: 1, .. }), "{err}");
        assert_eq!(handle.metrics().refused.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn full_queue_drops_motion_keeps_keys_and_refuses_keys_that_do_not_fit() {
        let mut dev = Input::with_capacity(InputProfile::tablet(), 6).unwrap();
        let handle = dev.handle();
        let mem = guest_memory(1 << 20);
        let (_irq, mut events, _status) = activated(&mut dev, &mem);
        let motion = |x| [event(ev::EV_ABS, ev::ABS_X, x), syn()];
        let click = |v| [event(ev::EV_KEY, ev::BTN_LEFT, v), syn()];

        handle.inject(&motion(1)).unwrap();
        handle.inject(&click(1)).unwrap();
        handle.inject(&motion(2)).unwrap();
        assert_eq!(
            handle.inject(&click(0)).unwrap(),
            2,
            "oldest motion dropped"
        );
        assert!(matches!(
            handle.inject(&[
                event(ev::EV_REL, ev::REL_WHEEL, 1),
                syn(),
                event(ev::EV_KEY, ev::BTN_RIGHT, 1),
                syn()
            ]),
            Err(InputError::Pending(PendingError::Full { .. }))
        ));

        for i in 0..8 {
            events.post(&[Buf::write(0x10000 + i * 8, 8)]);
        }
        dev.process_event_queue();
        let delivered: Vec<_> = (0..6).map(|i| read_event(&mem, 0x10000 + i * 8)).collect();
        assert_eq!(delivered, [click(1), motion(2), click(0)].concat());
        assert_eq!(handle.metrics().dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn broken_event_queue_puts_the_device_in_needs_reset() {
        let mem = guest_memory(1 << 20);
        let events = DriverQueue::new(&mem, 0);
        let status = DriverQueue::new(&mem, 0x4000);
        let dev = Input::new(InputProfile::keyboard()).unwrap();
        dev.handle()
            .inject(&[event(ev::EV_KEY, 30, 1), syn()])
            .unwrap();

        check_broken_queue_needs_reset(
            dev,
            &mem,
            &[events.mock(), status.mock()],
            EVENT_QUEUE,
            Input::process_event_queue,
        );
    }

    #[test]
    fn broken_status_queue_puts_the_device_in_needs_reset() {
        let mem = guest_memory(1 << 20);
        let events = DriverQueue::new(&mem, 0);
        let status = DriverQueue::new(&mem, 0x4000);
        let dev = Input::new(InputProfile::keyboard()).unwrap();

        check_broken_queue_needs_reset(
            dev,
            &mem,
            &[events.mock(), status.mock()],
            STATUS_QUEUE,
            Input::process_status_queue,
        );
    }

    #[test]
    fn reset_of_the_activated_device_clears_its_selectors_and_the_common_part() {
        let mem = guest_memory(1 << 20);
        let mut dev = Input::new(InputProfile::keyboard()).unwrap();
        dev.ack_features(VIRTIO_F_VERSION_1).unwrap();
        let _queues = activated(&mut dev, &mem);
        dev.write_config(0, &[select::ID_NAME, 1]);

        assert!(dev.reset());

        let mut selectors = [0xffu8; 2];
        dev.read_config(0, &mut selectors);
        assert_eq!(selectors, [0, 0]);
        assert!(!dev.is_activated());
        assert_eq!(dev.acked_features(), 0);
    }

    #[test]
    fn status_queue_buffers_are_returned() {
        let mem = guest_memory(1 << 20);
        let mut dev = Input::new(InputProfile::keyboard()).unwrap();
        let (irq, _events, mut status) = activated(&mut dev, &mem);
        mem.write_slice(&[0x11, 0, 1, 0, 1, 0, 0, 0], GuestAddress(0x20000))
            .unwrap();
        status.post(&[Buf::read(0x20000, 8)]);

        dev.process_status_queue();

        assert_eq!(status.used(), vec![(0, 0)]);
        assert_eq!(irq.count(InterruptKind::Queue), 1);
    }
}
