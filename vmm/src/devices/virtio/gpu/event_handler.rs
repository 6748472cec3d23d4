//! Event-loop wiring of the gpu device: the control and cursor queue eventfds.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Gpu, CONTROL_QUEUE, CURSOR_QUEUE};
use crate::devices::virtio::VirtioDevice;

impl MutEventSubscriber for Gpu {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events().iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                tracing::error!("gpu: cannot register queue {index} eventfd: {err}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(event) = self.queue_events().get(index) else {
            return;
        };
        // Draining the counter re-arms the (level-triggered) eventfd; an empty one is fine.
        let _ = event.read();
        if index == CONTROL_QUEUE || index == CURSOR_QUEUE {
            self.process_queue(index);
        }
    }
}
