//! Event-loop wiring of virtio-net: the RX and TX queue eventfds (ioeventfds on
//! QUEUE_NOTIFY) and the backend's descriptor.
//!
//! The backend is watched edge-triggered: the device reads it until it would block or the
//! guest runs out of RX buffers, and in the latter case an RX queue notification, not the
//! backend, resumes reading. Level-triggered, a backend holding a frame nobody can take
//! would wake the loop forever.

use std::sync::atomic::Ordering;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use super::tap::FrameBackend;
use crate::devices::virtio::VirtioDevice;

const RX_QUEUE_EVENT: u32 = 0;
const TX_QUEUE_EVENT: u32 = 1;
const BACKEND_EVENT: u32 = 2;

impl<B: FrameBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            (
                "RX queue eventfd",
                Events::with_data(&self.queue_events()[RX_QUEUE], RX_QUEUE_EVENT, EventSet::IN),
            ),
            (
                "TX queue eventfd",
                Events::with_data(&self.queue_events()[TX_QUEUE], TX_QUEUE_EVENT, EventSet::IN),
            ),
            (
                "backend",
                Events::with_data_raw(
                    self.backend().as_raw_fd(),
                    BACKEND_EVENT,
                    EventSet::IN | EventSet::EDGE_TRIGGERED,
                ),
            ),
        ];
        for (what, events) in sources {
            if let Err(e) = ops.add(events) {
                tracing::error!("virtio-net: cannot watch the {what}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let queue = match events.data() {
            RX_QUEUE_EVENT => RX_QUEUE,
            TX_QUEUE_EVENT => TX_QUEUE,
            BACKEND_EVENT => {
                self.process_rx();
                return;
            }
            other => {
                tracing::warn!("virtio-net: event for unknown source {other}");
                return;
            }
        };
        // Level-triggered: the counter must be drained even before activation, or the
        // loop would spin on it.
        if self.queue_events()[queue].read().is_ok() {
            self.metrics().queue_events.fetch_add(1, Ordering::Relaxed);
        }
        if queue == RX_QUEUE {
            self.process_rx();
        } else {
            self.process_tx();
        }
    }
}
