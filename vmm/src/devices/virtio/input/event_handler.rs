//! Event-loop wiring of an input device: its two queue eventfds and the injection kick.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Input, EVENT_QUEUE, STATUS_QUEUE};
use crate::devices::virtio::VirtioDevice;

/// `data` tag of the kick eventfd (queue eventfds are tagged with their index).
const KICK: u32 = u32::MAX;

impl MutEventSubscriber for Input {
    fn init(&mut self, ops: &mut EventOps) {
        for (index, event) in self.queue_events().iter().enumerate() {
            if let Err(err) = ops.add(Events::with_data(event, index as u32, EventSet::IN)) {
                tracing::error!("input: cannot register queue {index} eventfd: {err}");
            }
        }
        if let Err(err) = ops.add(Events::with_data(self.kick_event(), KICK, EventSet::IN)) {
            tracing::error!("input: cannot register the injection eventfd: {err}");
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            KICK => {
                let _ = self.kick_event().read();
                self.process_event_queue();
            }
            index => {
                let Some(event) = self.queue_events().get(index as usize) else {
                    return;
                };
                let _ = event.read();
                match index as usize {
                    EVENT_QUEUE => self.process_event_queue(),
                    STATUS_QUEUE => self.process_status_queue(),
                    _ => {}
                }
            }
        }
    }
}
