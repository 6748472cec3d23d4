//! Event-loop wiring of virtio-blk: the queue eventfd (an ioeventfd on QUEUE_NOTIFY).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.queue_events()[0], EventSet::IN)) {
            tracing::error!("virtio-blk: cannot watch the queue eventfd: {e}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        // Level-triggered epoll: the counter must be drained even before activation, or
        // the loop would spin on it.
        if self.queue_events()[0].read().is_ok() {
            self.metrics()
                .queue_events
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if events.event_set().contains(EventSet::IN) {
            self.process_queue();
        }
    }
}
