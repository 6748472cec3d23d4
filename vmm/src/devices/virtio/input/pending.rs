//! Bounded queue of events waiting for guest buffers. Events are kept in packets (runs
//! ending with SYN_REPORT). When the queue is full the oldest pointer-motion packet is
//! dropped first; packets carrying keys, buttons, wheel or touch-down/up are never dropped:
//! a batch whose such packets do not fit is refused as a whole.

use std::collections::VecDeque;

use super::profile::is_motion;
use crate::rpc::InputEvent;

/// Default capacity in events.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Why a batch was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    /// Not enough room even after dropping every pending motion packet.
    #[error("input queue full: {needed} events must be kept, {free} free (guest is not reading)")]
    Full { needed: usize, free: usize },
    /// The batch does not end with SYN_REPORT.
    #[error("batch does not end with SYN_REPORT")]
    Unterminated,
}

#[derive(Debug)]
struct Packet {
    events: Vec<InputEvent>,
    motion: bool,
}

/// The pending queue.
#[derive(Debug)]
pub struct PendingQueue {
    packets: VecDeque<Packet>,
    /// Events of the front packet already handed to the guest.
    front_sent: usize,
    len: usize,
    capacity: usize,
    dropped: u64,
}

impl PendingQueue {
    /// A queue holding at most `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            packets: VecDeque::new(),
            front_sent: 0,
            len: 0,
            capacity,
            dropped: 0,
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Motion events dropped so far.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Adds a batch (already validated against the device, ending with SYN_REPORT).
    /// Returns how many motion events were dropped to make room.
    pub fn push_batch(&mut self, events: &[InputEvent]) -> Result<u64, PendingError> {
        if !events.last().is_some_and(|e| e.is_syn_report()) {
            return Err(PendingError::Unterminated);
        }
        let packets: Vec<Packet> = events
            .split_inclusive(|e| e.is_syn_report())
            .map(|p| Packet {
                events: p.to_vec(),
                motion: p.iter().all(is_motion),
            })
            .collect();
        // Events that can never be dropped: those already queued (motion included for a
        // partly delivered front packet) plus the batch's non-motion packets.
        let kept_queued: usize = self
            .packets
            .iter()
            .enumerate()
            .filter(|(i, p)| !p.motion || (*i == 0 && self.front_sent > 0))
            .map(|(i, p)| p.events.len() - if i == 0 { self.front_sent } else { 0 })
            .sum();
        let kept_new: usize = packets
            .iter()
            .filter(|p| !p.motion)
            .map(|p| p.events.len())
            .sum();
        if kept_queued + kept_new > self.capacity {
            return Err(PendingError::Full {
                needed: kept_new,
                free: self.capacity.saturating_sub(kept_queued),
            });
        }
        let before = self.dropped;
        for packet in packets {
            let n = packet.events.len();
            while self.len + n > self.capacity {
                if !self.drop_oldest_motion() {
                    break;
                }
            }
            if self.len + n > self.capacity {
                // Only a motion packet can be left without room (checked above).
                self.dropped += n as u64;
                continue;
            }
            self.len += n;
            self.packets.push_back(packet);
        }
        Ok(self.dropped - before)
    }

    fn drop_oldest_motion(&mut self) -> bool {
        let skip_front = usize::from(self.front_sent > 0);
        let Some(idx) = self
            .packets
            .iter()
            .skip(skip_front)
            .position(|p| p.motion)
            .map(|i| i + skip_front)
        else {
            return false;
        };
        let packet = self.packets.remove(idx).expect("index from position()");
        self.len -= packet.events.len();
        self.dropped += packet.events.len() as u64;
        true
    }

    /// Every event not yet handed to the guest, in order (for a snapshot): the rest of
    /// the front packet, then the others. Each packet ends with SYN_REPORT, so this is a
    /// batch [`PendingQueue::push_batch`] takes back.
    pub fn undelivered(&self) -> Vec<InputEvent> {
        self.packets
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                let skip = if i == 0 { self.front_sent } else { 0 };
                p.events[skip..].iter().copied()
            })
            .collect()
    }

    /// The next event for the guest, without removing it.
    pub fn peek(&self) -> Option<InputEvent> {
        self.packets.front().map(|p| p.events[self.front_sent])
    }

    /// Removes the event returned by [`PendingQueue::peek`].
    pub fn pop(&mut self) -> Option<InputEvent> {
        let front = self.packets.front()?;
        let event = front.events[self.front_sent];
        self.front_sent += 1;
        self.len -= 1;
        if self.front_sent == front.events.len() {
            self.packets.pop_front();
            self.front_sent = 0;
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::super::profile::ev;
    use super::*;

    fn syn() -> InputEvent {
        InputEvent {
            ty: ev::EV_SYN,
            code: ev::SYN_REPORT,
            value: 0,
        }
    }

    fn motion(x: i32) -> Vec<InputEvent> {
        vec![
            InputEvent {
                ty: ev::EV_ABS,
                code: ev::ABS_X,
                value: x,
            },
            syn(),
        ]
    }

    fn key(code: u16, value: i32) -> Vec<InputEvent> {
        vec![
            InputEvent {
                ty: ev::EV_KEY,
                code,
                value,
            },
            syn(),
        ]
    }

    fn drain(q: &mut PendingQueue) -> Vec<InputEvent> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn full_queue_drops_oldest_motion_first_and_keeps_keys() {
        let mut q = PendingQueue::new(6);
        q.push_batch(&motion(1)).unwrap();
        q.push_batch(&key(30, 1)).unwrap();
        q.push_batch(&motion(2)).unwrap();

        let dropped = q.push_batch(&key(30, 0)).unwrap();

        assert_eq!(dropped, 2);
        let events = drain(&mut q);
        let expected: Vec<_> = [key(30, 1), motion(2), key(30, 0)].concat();
        assert_eq!(events, expected);
    }

    #[test]
    fn key_batch_that_cannot_fit_is_refused_and_nothing_is_lost() {
        let mut q = PendingQueue::new(4);
        q.push_batch(&key(30, 1)).unwrap();
        q.push_batch(&key(31, 1)).unwrap();

        let err = q.push_batch(&key(32, 1)).unwrap_err();

        assert_eq!(err, PendingError::Full { needed: 2, free: 0 });
        assert_eq!(drain(&mut q), [key(30, 1), key(31, 1)].concat());
    }

    #[test]
    fn motion_that_cannot_fit_behind_keys_is_dropped_not_refused() {
        let mut q = PendingQueue::new(4);
        q.push_batch(&key(30, 1)).unwrap();
        q.push_batch(&key(31, 1)).unwrap();

        assert_eq!(q.push_batch(&motion(5)), Ok(2));
        assert_eq!(q.len(), 4);
        assert_eq!(q.dropped(), 2);
    }

    #[test]
    fn partly_delivered_motion_packet_is_not_dropped() {
        let mut q = PendingQueue::new(4);
        q.push_batch(&motion(1)).unwrap();
        q.push_batch(&motion(2)).unwrap();
        assert_eq!(q.pop().unwrap().value, 1);

        q.push_batch(&key(30, 1)).unwrap();

        assert_eq!(drain(&mut q), [vec![syn()], key(30, 1)].concat());
    }

    #[test]
    fn unterminated_batch_is_refused() {
        let mut q = PendingQueue::new(8);
        assert_eq!(
            q.push_batch(&key(30, 1)[..1]),
            Err(PendingError::Unterminated)
        );
        assert!(q.is_empty());
    }
}
