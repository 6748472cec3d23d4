//! Event-loop wiring of virtio-net: the RX and TX queue eventfds (ioeventfds on
//! QUEUE_NOTIFY) and the backend's descriptor.
//!
//! The backend is watched edge-triggered: the device reads it until it would block or the
//! guest runs out of RX buffers, and in the latter case an RX queue notification, not the
//! backend, resumes reading. Level-triggered, a backend holding a frame nobody can take
//! would wake the loop forever.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RX_QUEUE, TX_QUEUE};
use super::tap::FrameBackend;
use crate::devices::virtio::VirtioDevice;

/// `data` tag of the backend (the queue eventfds are tagged with their index).
const BACKEND_EVENT: u32 = 2;

impl<B: FrameBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
        let backend = Events::with_data_raw(
            self.backend().as_raw_fd(),
            BACKEND_EVENT,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        );
        if let Err(e) = ops.add(backend) {
            tracing::error!("virtio-net: cannot watch the backend: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match self.common().queue_event(&events) {
            Some(RX_QUEUE) => self.process_rx(),
            Some(TX_QUEUE) => self.process_tx(),
            Some(_) => {}
            None if events.data() == BACKEND_EVENT => self.process_rx(),
            None => tracing::warn!("virtio-net: event for unknown source {}", events.data()),
        }
    }
}
