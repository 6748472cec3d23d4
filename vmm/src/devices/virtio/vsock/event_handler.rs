//! Event-loop wiring of virtio-vsock: the three queue eventfds, the Unix listener, the
//! deadline timer and one edge-triggered registration per host stream, added and removed
//! as the device opens and closes streams.

use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE};
use super::host::{FdChange, FIRST_STREAM};
use crate::devices::virtio::VirtioDevice;

/// `data` tag of the listener (queue eventfds are tagged with their index).
const LISTENER: u32 = 3;
/// `data` tag of the deadline timer.
const TIMER: u32 = 4;

fn stream_events() -> EventSet {
    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED | EventSet::READ_HANG_UP
}

impl Vsock {
    /// Starts or stops watching the streams the device opened or closed.
    fn apply_fd_changes(&mut self, ops: &mut EventOps) {
        for change in self.take_fd_changes() {
            match change {
                FdChange::Add(fd, id) => {
                    if let Err(e) = ops.add(Events::with_data_raw(fd, id, stream_events())) {
                        tracing::error!("virtio-vsock: cannot watch host stream {id}: {e}");
                    }
                }
                FdChange::Remove(sock, id) => {
                    use std::os::fd::AsRawFd;
                    let events = Events::with_data_raw(sock.as_raw_fd(), id, stream_events());
                    if let Err(e) = ops.remove(events) {
                        tracing::error!("virtio-vsock: cannot unwatch host stream {id}: {e}");
                    }
                    drop(sock);
                }
            }
        }
    }
}

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.common().watch_queue_events(ops);
        let listener = Events::with_data_raw(self.host().listener_fd(), LISTENER, EventSet::IN);
        if let Err(e) = ops.add(listener) {
            tracing::error!("virtio-vsock: cannot watch the listener: {e}");
        }
        if let Err(e) = ops.add(Events::with_data(self.timer(), TIMER, EventSet::IN)) {
            tracing::error!("virtio-vsock: cannot watch the timer: {e}");
        }
        self.apply_fd_changes(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let now = Instant::now();
        match self.common().queue_event(&events) {
            Some(RX_QUEUE) => self.process_rx(now),
            Some(TX_QUEUE) => self.process_tx(now),
            Some(EVENT_QUEUE) => self.process_event_queue(),
            Some(_) => {}
            None => match events.data() {
                LISTENER => self.process_listener(now),
                TIMER => self.process_timer(now),
                id if id >= FIRST_STREAM => {
                    let set = events.event_set();
                    let readable = set.intersects(
                        EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                    );
                    self.process_stream(id, readable, set.contains(EventSet::OUT), now);
                }
                other => tracing::warn!("virtio-vsock: event for unknown source {other}"),
            },
        }
        self.apply_fd_changes(ops);
    }
}
