//! The part of a virtio device that is the same for every device model: its identity
//! (type, queue sizes, queue eventfds), feature negotiation, activation, reset, the
//! interrupt after a queue pass and the answer to a queue the guest broke.
//!
//! A device holds one [`VirtioCommon`] and hands it out through
//! [`VirtioDevice::common`](super::VirtioDevice::common); the trait's default methods
//! delegate here, so that a device model is only its configuration space, its queue
//! processing ([`VirtioCommon::serve_queue`]) and what its own activation and reset add.
//! Its event handler registers the queue eventfds with [`VirtioCommon::watch_queue_events`]
//! and maps an event back to its queue with [`VirtioCommon::queue_event`]; the queue
//! counters ([`QueueMetrics`]) are kept here and added to each device's metrics snapshot.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    check_rings, ActivateError, DeviceQueue, GuestMemoryMmap, InterruptKind, InterruptTrigger,
    QueueError,
};

/// Why the device refused the features a driver accepted (the driver then reads the
/// status back without FEATURES_OK and gives up on the device).
#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    /// The driver accepted feature bits the device did not offer.
    #[error(
        "driver features {features:#x} include {unoffered:#x}, not offered (offered {offered:#x})"
    )]
    NotOffered {
        /// What the driver accepted.
        features: u64,
        /// The bits of it the device did not offer.
        unoffered: u64,
        /// What the device offered.
        offered: u64,
    },
    /// The driver did not accept VIRTIO_F_VERSION_1 (a legacy driver).
    #[error("driver features {features:#x} lack VIRTIO_F_VERSION_1")]
    NotModern {
        /// What the driver accepted.
        features: u64,
    },
}

/// Counters of a device's queues, kept by its common part.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Queue notifications handled (eventfd reads that found one).
    pub queue_events: AtomicU64,
    /// Times the guest broke a queue (the device then needs a reset).
    pub queue_errors: AtomicU64,
}

/// The values of [`QueueMetrics`], for a device's metrics snapshot (`#[serde(flatten)]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct QueueMetricsValues {
    pub queue_events: u64,
    pub queue_errors: u64,
}

impl QueueMetrics {
    /// Current values.
    pub fn values(&self) -> QueueMetricsValues {
        QueueMetricsValues {
            queue_events: self.queue_events.load(Ordering::Relaxed),
            queue_errors: self.queue_errors.load(Ordering::Relaxed),
        }
    }

    /// A device's metrics snapshot: its own `counters` (a struct serialised field by field,
    /// the queue counters skipped) with these added.
    pub fn snapshot_with(&self, counters: &impl Serialize) -> serde_json::Value {
        let mut snapshot = serde_json::to_value(counters).unwrap_or_default();
        if let (serde_json::Value::Object(all), Ok(serde_json::Value::Object(queues))) =
            (&mut snapshot, serde_json::to_value(self.values()))
        {
            all.extend(queues);
        }
        snapshot
    }
}

/// One queue as a snapshot keeps it: virtio-queue's `QueueState` (which has no serde),
/// the ring positions included.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// VIRTIO_F_EVENT_IDX in use.
    pub event_idx: bool,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The guest broke the queue (the device waits for a reset).
    #[serde(default)]
    pub broken: bool,
}

impl QueueSnapshot {
    /// The state of `queue`.
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            broken: false,
        }
    }

    /// The queue again; refuses sizes and alignments virtio-queue refuses.
    pub fn to_queue(&self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What a snapshot keeps of a device's common part.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonState {
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queues of the activated device with their positions; `None` before
    /// activation.
    pub active_queues: Option<Vec<QueueSnapshot>>,
}

/// What an activated device works with: guest memory, its interrupt and its queues.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn InterruptTrigger>,
    queues: Vec<DeviceQueue>,
}

/// The state every virtio device has, and the rules every device follows for it.
pub struct VirtioCommon {
    name: &'static str,
    device_type: u32,
    avail_features: u64,
    acked_features: u64,
    queue_sizes: &'static [u16],
    queue_evts: Vec<EventFd>,
    active: Option<Active>,
    metrics: Arc<QueueMetrics>,
}

impl std::fmt::Debug for VirtioCommon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioCommon")
            .field("name", &self.name)
            .field("device_type", &self.device_type)
            .field(
                "avail_features",
                &format_args!("{:#x}", self.avail_features),
            )
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("activated", &self.is_activated())
            .finish_non_exhaustive()
    }
}

impl VirtioCommon {
    /// The common part of a device of virtio type `device_type` offering `avail_features`,
    /// with one queue (and one notification eventfd) per entry of `queue_sizes`, each
    /// entry the queue's maximum size. `name` (`virtio-blk`, ...) starts its log lines.
    pub fn new(
        name: &'static str,
        device_type: u32,
        avail_features: u64,
        queue_sizes: &'static [u16],
    ) -> io::Result<Self> {
        let queue_evts = queue_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<_>>()?;
        Ok(Self {
            name,
            device_type,
            avail_features,
            acked_features: 0,
            queue_sizes,
            queue_evts,
            active: None,
            metrics: Arc::default(),
        })
    }

    /// The name that starts the device's log lines.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Virtio device ID.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// Maximum size of each queue; the length is the number of queues.
    pub fn queue_sizes(&self) -> &'static [u16] {
        self.queue_sizes
    }

    /// Feature bits the device offers.
    pub fn avail_features(&self) -> u64 {
        self.avail_features
    }

    /// Feature bits the driver accepted (0 until it did, and again after a reset).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// One eventfd per queue, signalled when the driver notifies that queue.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The queue counters, for the device's metrics to show.
    pub fn metrics(&self) -> Arc<QueueMetrics> {
        self.metrics.clone()
    }

    /// Registers every queue eventfd with the event loop, tagged (`Events::data`) with its
    /// queue index; a device tags its other sources from the queue count up.
    pub fn watch_queue_events(&self, ops: &mut EventOps) {
        for (index, evt) in self.queue_evts.iter().enumerate() {
            // At most u16::MAX queues in virtio.
            let tag = index as u32;
            if let Err(e) = ops.add(Events::with_data(evt, tag, EventSet::IN)) {
                tracing::error!("{}: cannot watch the queue {index} eventfd: {e}", self.name);
            }
        }
    }

    /// The queue an event registered by [`VirtioCommon::watch_queue_events`] is for, or
    /// `None` for another source. Its eventfd's counter is drained (epoll is
    /// level-triggered: even before activation, or the loop would spin on it) and the
    /// notification counted.
    pub fn queue_event(&self, events: &Events) -> Option<usize> {
        let index = events.data() as usize;
        let evt = self.queue_evts.get(index)?;
        if evt.read().is_ok() {
            self.metrics.queue_events.fetch_add(1, Ordering::Relaxed);
        }
        Some(index)
    }

    /// Takes the features the driver accepted at FEATURES_OK: all of them, or none when
    /// they include a bit the device did not offer or lack VIRTIO_F_VERSION_1. A refusal
    /// is logged (rate-limited: a guest can renegotiate in a loop).
    pub fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        let unoffered = features & !self.avail_features;
        let refusal = if unoffered != 0 {
            Some(FeatureError::NotOffered {
                features,
                unoffered,
                offered: self.avail_features,
            })
        } else if features & (1 << VIRTIO_F_VERSION_1) == 0 {
            Some(FeatureError::NotModern { features })
        } else {
            None
        };
        if let Some(e) = refusal {
            crate::guest_warn!("{}: features refused: {e}", self.name);
            return Err(e);
        }
        self.acked_features = features;
        Ok(())
    }

    /// Starts the device on `queues` (one per queue size, rings inside `mem`): the device
    /// serves them until the next reset and signals the guest through `interrupt`.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn InterruptTrigger>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::BadQueue(format!(
                "{} queues, {} expected",
                queues.len(),
                self.queue_sizes.len()
            )));
        }
        for (index, queue) in queues.iter().enumerate() {
            check_rings(index, queue, &mem)?;
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queues: DeviceQueue::from_queues(queues),
        });
        Ok(())
    }

    /// Whether the device is activated (since the last reset).
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Guest memory of the activated device.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.active.as_ref().map(|a| &a.mem)
    }

    /// The interrupt the device was activated with.
    pub fn interrupt(&self) -> Option<&Arc<dyn InterruptTrigger>> {
        self.active.as_ref().map(|a| &a.interrupt)
    }

    /// The queues of the activated device (none before activation).
    pub fn queues(&self) -> &[DeviceQueue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    /// The acked features and, once activated, every queue's configuration and position.
    pub fn save(&self) -> CommonState {
        CommonState {
            acked_features: self.acked_features,
            active_queues: self.active.as_ref().map(|a| {
                a.queues
                    .iter()
                    .map(|q| QueueSnapshot {
                        broken: q.is_broken(),
                        ..QueueSnapshot::of(q.queue())
                    })
                    .collect()
            }),
        }
    }

    /// Marks the queues that were broken when the snapshot was taken (after activation).
    pub fn restore_broken(&mut self, state: &CommonState) {
        let (Some(active), Some(saved)) = (self.active.as_mut(), &state.active_queues) else {
            return;
        };
        for (queue, saved) in active.queues.iter_mut().zip(saved) {
            if saved.broken {
                queue.mark_broken();
            }
        }
    }

    /// Returns to the state before negotiation: no features acked, not activated (queues,
    /// memory and interrupt dropped), and notifications that arrived for the old queues
    /// dropped. Returns whether the device was activated.
    pub fn reset(&mut self) -> bool {
        self.acked_features = 0;
        for evt in &self.queue_evts {
            // An empty counter (EAGAIN) is what is wanted.
            let _ = evt.read();
        }
        self.active.take().is_some()
    }

    /// One pass over queue `index` of the activated device: `pass` serves what the driver
    /// made available and returns whether it used any buffer. Then either the guest is
    /// interrupted, if it asked to be for what was used, or, when the pass (or that
    /// question) found the queue broken, the device is marked as needing a reset. Does
    /// nothing before activation or for a queue the device does not have.
    pub fn serve_queue(
        &mut self,
        index: usize,
        pass: impl FnOnce(&mut DeviceQueue, &GuestMemoryMmap) -> Result<bool, QueueError>,
    ) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mem = &active.mem;
        let outcome = pass(queue, mem).and_then(|used_any| {
            if used_any {
                queue.needs_notification(mem)
            } else {
                Ok(false)
            }
        });
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                    crate::guest_warn!("{}: cannot interrupt the guest: {e}", self.name);
                }
            }
            Err(e) => {
                self.metrics.queue_errors.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!(
                    "{}: {}; the device needs a reset",
                    self.name,
                    crate::vmm::error_chain(&e)
                );
                if let Err(e) = active.interrupt.set_needs_reset() {
                    crate::guest_warn!(
                        "{}: cannot raise the configuration interrupt: {e}",
                        self.name
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::QueueT;

    use super::*;
    use crate::devices::virtio::test_utils::{
        corrupt_avail_idx, guest_memory, w, CountingInterrupt, Driver, DATA_START,
    };
    use crate::logging::tests::Captured;
    use crate::logging::BURST;

    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const OFFERED: u64 = VERSION_1 | 1 << 3;
    const SIZES: &[u16] = &[16, 16];

    fn common() -> VirtioCommon {
        VirtioCommon::new("virtio-test", 42, OFFERED, SIZES).unwrap()
    }

    /// Activates `c` on the rings of `drivers`; returns the interrupt.
    fn activate(
        c: &mut VirtioCommon,
        mem: &GuestMemoryMmap,
        drivers: &[&Driver],
    ) -> Arc<CountingInterrupt> {
        let irq = Driver::interrupt();
        c.activate(
            mem.clone(),
            irq.clone(),
            drivers.iter().map(|d| d.queue()).collect(),
        )
        .unwrap();
        irq
    }

    /// A pass that returns every available chain unwritten.
    fn return_all(q: &mut DeviceQueue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        q.drain(mem, |_| 0)
    }

    #[test]
    fn offered_features_with_version_1_are_acked() {
        let mut c = common();

        c.ack_features(OFFERED).unwrap();

        assert_eq!(c.acked_features(), OFFERED);
    }

    #[test]
    fn unoffered_feature_bits_are_refused_and_logged_a_bounded_number_of_times() {
        let mut c = common();
        let features = VERSION_1 | 1 << 5;

        let (results, logs) = Captured::run(|| {
            (0..1000)
                .map(|_| c.ack_features(features))
                .collect::<Vec<_>>()
        });

        assert!(results.iter().all(|r| matches!(
            r,
            Err(FeatureError::NotOffered {
                unoffered: 0x20,
                ..
            })
        )));
        assert_eq!(c.acked_features(), 0, "nothing acked");
        let lines = logs.lines();
        assert_eq!(lines.len(), BURST as usize, "{lines:?}");
        assert!(
            lines
                .iter()
                .all(|l| l.contains("virtio-test: features refused")),
            "{lines:?}"
        );
    }

    #[test]
    fn features_without_version_1_are_refused() {
        let mut c = common();

        let result = c.ack_features(1 << 3);

        assert!(matches!(result, Err(FeatureError::NotModern { .. })));
        assert_eq!(c.acked_features(), 0);
    }

    #[test]
    fn activation_with_the_wrong_number_of_queues_is_refused() {
        let mem = guest_memory();
        let driver = Driver::new(&mem, 16);
        let mut c = common();

        let result = c.activate(mem.clone(), Driver::interrupt(), vec![driver.queue()]);

        let Err(ActivateError::BadQueue(why)) = result else {
            panic!("activated with one of two queues");
        };
        assert_eq!(why, "1 queues, 2 expected");
        assert!(!c.is_activated());
        assert!(c.queues().is_empty());
    }

    #[test]
    fn activation_with_rings_outside_guest_memory_is_refused_naming_the_queue() {
        let mem = guest_memory();
        let driver = Driver::new(&mem, 16);
        let mut outside = driver.queue();
        outside.set_used_ring_address(Some(0x4000_0000), Some(0));
        let mut c = common();

        let result = c.activate(
            mem.clone(),
            Driver::interrupt(),
            vec![driver.queue(), outside],
        );

        let Err(ActivateError::BadQueue(why)) = result else {
            panic!("activated on rings outside guest memory");
        };
        assert!(why.starts_with("queue 1: used ring at 0x40000000"), "{why}");
        assert!(!c.is_activated());
    }

    #[test]
    fn activation_hands_the_queues_interrupt_and_memory_to_the_passes() {
        let mem = guest_memory();
        let mut d0 = Driver::new(&mem, 16);
        let d1 = Driver::new(&mem, 16);
        let mut c = common();
        let irq = activate(&mut c, &mem, &[&d0, &d1]);
        d0.add_chain(&[w(DATA_START, 8)]);

        c.serve_queue(0, return_all);

        assert_eq!(d0.used_count(), 1);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        assert_eq!(c.queues().len(), 2);
        assert_eq!(c.queues()[1].queue().size(), 16);
    }

    #[test]
    fn a_pass_that_uses_nothing_raises_no_interrupt() {
        let mem = guest_memory();
        let (d0, d1) = (Driver::new(&mem, 16), Driver::new(&mem, 16));
        let mut c = common();
        let irq = activate(&mut c, &mem, &[&d0, &d1]);

        c.serve_queue(0, return_all);
        c.serve_queue(7, |_, _| panic!("no queue 7"));

        assert_eq!(irq.queue.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn passes_do_not_run_before_activation() {
        let mut c = common();

        c.serve_queue(0, |_, _| panic!("served before activation"));

        assert!(c.interrupt().is_none());
    }

    #[test]
    fn reset_clears_acked_features_activation_and_pending_notifications() {
        let mem = guest_memory();
        let (d0, d1) = (Driver::new(&mem, 16), Driver::new(&mem, 16));
        let mut c = common();
        c.ack_features(OFFERED).unwrap();
        activate(&mut c, &mem, &[&d0, &d1]);
        c.queue_events()[1].write(1).unwrap();

        let was_active = c.reset();

        assert!(was_active);
        assert_eq!(c.acked_features(), 0);
        assert!(!c.is_activated());
        assert!(c.interrupt().is_none());
        assert!(c.queues().is_empty());
        assert!(c.queue_events()[1].read().is_err(), "notification dropped");
        assert!(!c.reset(), "a second reset finds nothing active");
    }

    #[test]
    fn a_broken_queue_sets_needs_reset_once_and_is_not_served_again() {
        let mem = guest_memory();
        let (mut d0, d1) = (Driver::new(&mem, 16), Driver::new(&mem, 16));
        let mut c = common();
        let irq = activate(&mut c, &mem, &[&d0, &d1]);
        d0.add_chain(&[w(DATA_START, 8)]);
        corrupt_avail_idx(&d0.vq);
        let metrics = c.metrics();

        let ((), logs) = Captured::run(|| {
            c.serve_queue(0, return_all);
            c.serve_queue(0, return_all);
        });

        assert_eq!(irq.needs_reset.load(Ordering::SeqCst), 1);
        assert_eq!(irq.queue.load(Ordering::SeqCst), 0);
        assert_eq!(metrics.values().queue_errors, 1);
        assert!(c.queues()[0].is_broken());
        assert!(!c.queues()[1].is_broken());
        assert_eq!(d0.used_count(), 0, "nothing used");
        let lines = logs.lines();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].contains("virtio-test: queue 0: cannot read the available ring"),
            "{lines:?}"
        );
        assert!(lines[0].contains("the device needs a reset"), "{lines:?}");
    }

    #[test]
    fn queue_events_reach_the_loop_tagged_with_their_queue_and_are_counted() {
        use std::sync::Mutex;

        use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

        struct Wiring {
            common: VirtioCommon,
            seen: Vec<Option<usize>>,
        }
        impl MutEventSubscriber for Wiring {
            fn init(&mut self, ops: &mut EventOps) {
                self.common.watch_queue_events(ops);
            }
            fn process(&mut self, events: Events, _ops: &mut EventOps) {
                let queue = self.common.queue_event(&events);
                self.seen.push(queue);
            }
        }
        let common = common();
        let notify = common.queue_events()[1].try_clone().unwrap();
        let metrics = common.metrics();
        let wiring = Arc::new(Mutex::new(Wiring {
            common,
            seen: Vec::new(),
        }));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(wiring.clone());

        notify.write(1).unwrap();
        em.run_with_timeout(1000).unwrap();

        assert_eq!(wiring.lock().unwrap().seen, vec![Some(1)]);
        assert_eq!(metrics.values().queue_events, 1);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0, "counter drained");
    }

    #[test]
    fn device_snapshots_carry_the_queue_counters_beside_the_devices_own() {
        #[derive(Serialize)]
        struct Counters {
            served: AtomicU64,
            #[serde(skip)]
            queues: Arc<QueueMetrics>,
        }
        let counters = Counters {
            served: AtomicU64::new(3),
            queues: Arc::default(),
        };
        counters.queues.queue_errors.fetch_add(1, Ordering::Relaxed);

        let snapshot = counters.queues.snapshot_with(&counters);

        assert_eq!(
            snapshot,
            serde_json::json!({"served": 3, "queue_events": 0, "queue_errors": 1})
        );
    }
}
