//! Event-loop wiring of the gpu device: the control and cursor queue eventfds.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Gpu;
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Gpu {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(index) = self.common().queue_event(&events) {
            self.process_queue(index);
        }
    }
}
