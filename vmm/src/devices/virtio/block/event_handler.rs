//! Event-loop wiring of virtio-blk: the queue eventfd (an ioeventfd on QUEUE_NOTIFY).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::Block;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common().queue_event(&events).is_some() && events.event_set().contains(EventSet::IN)
        {
            self.process_queue();
        }
    }
}
