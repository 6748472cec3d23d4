//! Event-loop wiring of virtio-rng: the queue eventfd (an ioeventfd on QUEUE_NOTIFY).

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.common().queue_event(&events).is_some() {
            self.process_queue();
        }
    }
}
