//! Event-loop wiring of virtio-rng: the queue eventfd (an ioeventfd on QUEUE_NOTIFY).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Rng;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            tracing::error!("virtio-rng: cannot watch the queue eventfd: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter even before activation: epoll is level-triggered.
        let _ = self.queue_events()[0].read();
        self.process_queue();
    }
}
