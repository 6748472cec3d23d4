//! Event-loop wiring of an input device: its two queue eventfds and the injection kick.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Input, EVENT_QUEUE, STATUS_QUEUE};
use crate::devices::virtio::VirtioDevice;

/// `data` tag of the kick eventfd (queue eventfds are tagged with their index).
const KICK: u32 = u32::MAX;

impl MutEventSubscriber for Input {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
        if let Err(err) = ops.add(Events::with_data(self.kick_event(), KICK, EventSet::IN)) {
            tracing::error!("input: cannot register the injection eventfd: {err}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match self.common().queue_event(&events) {
            Some(EVENT_QUEUE) => self.process_event_queue(),
            Some(STATUS_QUEUE) => self.process_status_queue(),
            Some(_) => {}
            None if events.data() == KICK => {
                let _ = self.kick_event().read();
                self.process_event_queue();
            }
            None => {}
        }
    }
}
