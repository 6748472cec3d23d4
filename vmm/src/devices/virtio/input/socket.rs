//! The raw input channel's VMM end (`GET /input/socket`; layout, limits and codec in
//! [`vmm_api::input_socket`]). [`InputChannel`] creates a `SOCK_SEQPACKET` pair per request,
//! registers the VMM's end in the event loop as an [`InputSocketReader`] and gives the other
//! end to the client; a new request replaces the previous channel (whose client then gets
//! `EPIPE`). The reader takes at most [`MAX_MESSAGES_PER_WAKE`] messages per wake-up, each one
//! batch: decoded and checked as `PUT /input` checks its body, then injected through the
//! device's [`InputHandle`](super::InputHandle) (the device's own checks, the pending queue
//! and its kick). A message that fails is dropped whole, counted and logged rate-limited.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps};
use serde::Serialize;
use vmm_api::input_socket::{decode_message, RecordError, MAX_MESSAGES_PER_WAKE, MAX_MESSAGE_LEN};

use super::{InputError, InputHandles};
use crate::device_manager::EventManager;
use crate::devices::DeviceMetrics;

/// Why a message was dropped, or a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InputSocketError {
    /// The message is not a well-formed batch.
    #[error("malformed message")]
    Record(#[from] RecordError),
    /// The device refused the batch (an event it does not have, or keys that do not fit).
    #[error("the device refused the batch")]
    Device(#[from] InputError),
    /// The socket pair could not be created.
    #[error("cannot create the input socket pair")]
    Socket(#[source] io::Error),
}

/// Counters of the raw input channel, under `input_socket` in the VMM's metrics.
#[derive(Debug, Default, Serialize)]
pub struct InputSocketMetrics {
    /// Channels handed out (`GET /input/socket` answered).
    pub handoffs: AtomicU64,
    /// Messages (batches) injected.
    pub messages: AtomicU64,
    /// Records (events) in the injected messages.
    pub records: AtomicU64,
    /// Messages dropped whole: malformed, too long, or refused by the device.
    pub dropped: AtomicU64,
}

impl DeviceMetrics for InputSocketMetrics {
    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

/// What one [`InputSocketReader::serve`] pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// Messages read (injected or dropped).
    pub messages: usize,
    /// The client is gone (or the socket failed): the reader is done.
    pub closed: bool,
}

/// The VMM's end of one channel, read on the event loop.
pub struct InputSocketReader {
    socket: Option<OwnedFd>,
    devices: InputHandles,
    metrics: Arc<InputSocketMetrics>,
    buf: Box<[u8]>,
}

impl std::fmt::Debug for InputSocketReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputSocketReader")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl InputSocketReader {
    /// Reads batches for `devices` from `socket` (a non-blocking `SOCK_SEQPACKET` end).
    pub fn new(socket: OwnedFd, devices: InputHandles, metrics: Arc<InputSocketMetrics>) -> Self {
        Self {
            socket: Some(socket),
            devices,
            metrics,
            buf: vec![0; MAX_MESSAGE_LEN].into_boxed_slice(),
        }
    }

    /// Reads and injects the waiting messages, at most [`MAX_MESSAGES_PER_WAKE`]; the rest
    /// wait for the next wake-up (the socket stays readable). Never blocks.
    pub fn serve(&mut self) -> Pass {
        let mut pass = Pass::default();
        let Some(fd) = self.socket.as_ref().map(AsRawFd::as_raw_fd) else {
            pass.closed = true;
            return pass;
        };
        while pass.messages < MAX_MESSAGES_PER_WAKE {
            // SAFETY: `buf` is writable for its length; `fd` is open (owned by self). With
            // MSG_TRUNC the kernel returns the message's real length, even past `buf`.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            let len = match usize::try_from(n) {
                Ok(0) if peer_gone(fd) => {
                    pass.closed = true;
                    break;
                }
                Ok(len) => len,
                Err(_) => match io::Error::last_os_error().kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => {
                        pass.closed = true;
                        break;
                    }
                },
            };
            pass.messages += 1;
            let result = if len > self.buf.len() {
                Err(RecordError::TooLong.into())
            } else {
                self.deliver(len)
            };
            match result {
                Ok(records) => {
                    self.metrics.messages.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .records
                        .fetch_add(records as u64, Ordering::Relaxed);
                }
                Err(e) => {
                    self.metrics.dropped.fetch_add(1, Ordering::Relaxed);
                    crate::guest_warn!(
                        "input socket: message of {len} bytes dropped: {}",
                        crate::vmm::error_chain(&e)
                    );
                }
            }
            if len == 0 {
                // An empty message: the rest waits for the next wake-up, which also tells
                // an empty message from a peer that has just hung up.
                break;
            }
        }
        pass
    }

    /// Decodes the message in `buf[..len]` and injects it; returns its record count.
    fn deliver(&self, len: usize) -> Result<usize, InputSocketError> {
        let batch = decode_message(&self.buf[..len])?;
        self.devices.get(batch.device).inject(&batch.events)?;
        Ok(batch.events.len())
    }
}

/// Whether `fd`'s peer has hung up (a zero-length read is then the end, not a message).
fn peer_gone(fd: std::os::fd::RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd that lives across the call; a zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR) != 0
}

impl MutEventSubscriber for InputSocketReader {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(fd) = &self.socket {
            if let Err(e) = ops.add(Events::new_raw(fd.as_raw_fd(), EventSet::IN)) {
                tracing::error!("input socket: cannot register the channel: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let pass = self.serve();
        if pass.closed || events.event_set().contains(EventSet::ERROR) {
            let _ = ops.remove(events);
            self.socket = None;
            tracing::info!("input socket: the client closed the channel");
        }
    }
}

/// Hands out raw input channels into one VM's input devices; the newest one is read.
#[derive(Debug, Default)]
pub struct InputChannel {
    reader: Option<SubscriberId>,
    metrics: Arc<InputSocketMetrics>,
}

impl InputChannel {
    /// No channel yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The channel's counters (across handoffs).
    pub fn metrics(&self) -> Arc<InputSocketMetrics> {
        self.metrics.clone()
    }

    /// A new channel into `devices`: the VMM's end is registered in `event_manager` in
    /// place of the previous channel's, which is closed; the client's end is returned.
    pub fn handoff(
        &mut self,
        devices: &InputHandles,
        event_manager: &mut EventManager,
    ) -> Result<OwnedFd, InputSocketError> {
        let (vmm_end, client_end) = seqpacket_pair().map_err(InputSocketError::Socket)?;
        if let Some(previous) = self.reader.take() {
            // Dropping the old reader closes its end: its client's next send fails.
            let _ = event_manager.remove_subscriber(previous);
        }
        let reader = InputSocketReader::new(vmm_end, devices.clone(), self.metrics.clone());
        self.reader = Some(event_manager.add_subscriber(Arc::new(Mutex::new(reader))));
        self.metrics.handoffs.fetch_add(1, Ordering::Relaxed);
        Ok(client_end)
    }
}

/// A non-blocking, close-on-exec `AF_UNIX` `SOCK_SEQPACKET` pair (the seccomp policy allows
/// the main thread exactly these arguments).
pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints for socketpair to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair returned two fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use vmm_api::input::evdev::{ABS_X, EV_ABS, EV_KEY};
    use vmm_api::input_socket::{encode_message, InputRecord, RECORD_LEN};
    use vmm_api::{InputDevice, InputEvent};

    use super::super::InputDevices;
    use super::*;

    /// A reader on a fresh pair, the client's end, and the devices it injects into.
    fn reader() -> (InputSocketReader, OwnedFd, InputHandles) {
        let devices = InputDevices::new().unwrap().handles();
        let (vmm_end, client) = seqpacket_pair().unwrap();
        let reader = InputSocketReader::new(vmm_end, devices.clone(), Arc::default());
        (reader, client, devices)
    }

    fn send(fd: &OwnedFd, message: &[u8]) -> io::Result<()> {
        vmm_api::input_socket::send_message(fd.as_fd(), message)
    }

    fn message(device: InputDevice, events: &[InputEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(device, events, &mut out).unwrap();
        out
    }

    fn key(value: i32) -> Vec<u8> {
        message(
            InputDevice::Keyboard,
            &[InputEvent::new(EV_KEY, 30, value), InputEvent::SYN_REPORT],
        )
    }

    fn counts(m: &InputSocketMetrics) -> (u64, u64, u64) {
        (
            m.messages.load(Ordering::Relaxed),
            m.records.load(Ordering::Relaxed),
            m.dropped.load(Ordering::Relaxed),
        )
    }

    fn injected(devices: &InputHandles, device: InputDevice) -> u64 {
        devices
            .get(device)
            .metrics()
            .injected
            .load(Ordering::Relaxed)
    }

    #[test]
    fn each_message_is_one_batch_injected_into_its_device() {
        let (mut reader, client, devices) = reader();
        send(&client, &key(1)).unwrap();
        send(
            &client,
            &message(
                InputDevice::Tablet,
                &[InputEvent::new(EV_ABS, ABS_X, 5), InputEvent::SYN_REPORT],
            ),
        )
        .unwrap();

        let pass = reader.serve();

        assert_eq!(
            pass,
            Pass {
                messages: 2,
                closed: false
            }
        );
        assert_eq!(counts(&reader.metrics), (2, 4, 0));
        assert_eq!(injected(&devices, InputDevice::Keyboard), 2);
        assert_eq!(injected(&devices, InputDevice::Tablet), 2);
    }

    #[test]
    fn malformed_messages_are_dropped_whole_and_the_channel_stays_open() {
        let (mut reader, client, devices) = reader();
        let good = key(1);
        let mut reserved = good.clone();
        reserved[1] = 1;
        let mut unknown_device = good.clone();
        unknown_device[RECORD_LEN] = 9;
        let mut mixed = good.clone();
        mixed[RECORD_LEN] = 1;
        let unterminated = InputRecord {
            device: InputDevice::Keyboard,
            event: InputEvent::new(EV_KEY, 30, 1),
        }
        .encode();
        for bad in [
            &good[..RECORD_LEN + 3],
            &reserved,
            &unknown_device,
            &mixed,
            &unterminated,
        ] {
            send(&client, bad).unwrap();
        }
        send(&client, &good).unwrap();

        let pass = reader.serve();

        assert_eq!(pass.messages, 6);
        assert!(!pass.closed);
        assert_eq!(counts(&reader.metrics), (1, 2, 5));
        assert_eq!(injected(&devices, InputDevice::Keyboard), 2);
    }

    #[test]
    fn a_message_longer_than_the_limit_is_dropped() {
        let (mut reader, client, devices) = reader();
        let syn = InputRecord {
            device: InputDevice::Keyboard,
            event: InputEvent::SYN_REPORT,
        }
        .encode();
        let too_long = syn.repeat(MAX_MESSAGE_LEN / RECORD_LEN + 1);
        send(&client, &too_long).unwrap();
        send(&client, &key(1)).unwrap();

        let pass = reader.serve();

        assert_eq!(pass.messages, 2);
        assert_eq!(counts(&reader.metrics), (1, 2, 1));
        assert_eq!(injected(&devices, InputDevice::Keyboard), 2);
    }

    #[test]
    fn an_event_the_device_does_not_have_drops_the_message_as_put_input_refuses_it() {
        let (mut reader, client, devices) = reader();
        let abs_on_keyboard = message(
            InputDevice::Keyboard,
            &[
                InputEvent::new(EV_KEY, 30, 1),
                InputEvent::new(EV_ABS, ABS_X, 1),
                InputEvent::SYN_REPORT,
            ],
        );
        send(&client, &abs_on_keyboard).unwrap();

        reader.serve();

        let keyboard = devices.get(InputDevice::Keyboard).metrics();
        assert_eq!(counts(&reader.metrics), (0, 0, 1));
        assert_eq!(keyboard.injected.load(Ordering::Relaxed), 0);
        assert_eq!(keyboard.refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_flood_is_read_at_most_max_messages_per_wake() {
        let (mut reader, client, devices) = reader();
        let total = 2 * MAX_MESSAGES_PER_WAKE + 10;
        for i in 0..total {
            send(&client, &key((i % 2) as i32)).unwrap();
        }

        let passes: Vec<usize> = (0..4).map(|_| reader.serve().messages).collect();

        assert_eq!(
            passes,
            [MAX_MESSAGES_PER_WAKE, MAX_MESSAGES_PER_WAKE, 10, 0]
        );
        assert_eq!(injected(&devices, InputDevice::Keyboard), 2 * total as u64);
    }

    #[test]
    fn an_empty_message_is_dropped_and_a_hang_up_closes_the_reader() {
        let (mut reader, client, _devices) = reader();
        send(&client, &[]).unwrap();
        send(&client, &key(1)).unwrap();

        let empty = reader.serve();
        let rest = reader.serve();
        drop(client);
        let gone = reader.serve();

        assert_eq!((empty.messages, empty.closed), (1, false));
        assert_eq!((rest.messages, rest.closed), (1, false));
        assert_eq!((gone.messages, gone.closed), (0, true));
        assert_eq!(counts(&reader.metrics), (1, 2, 1));
    }

    #[test]
    fn a_second_handoff_replaces_the_first_channel() {
        let devices = InputDevices::new().unwrap().handles();
        let mut event_manager = EventManager::new().unwrap();
        let mut channel = InputChannel::new();
        let first = channel.handoff(&devices, &mut event_manager).unwrap();
        send(&first, &key(1)).unwrap();
        event_manager.run_with_timeout(1000).unwrap();

        let second = channel.handoff(&devices, &mut event_manager).unwrap();
        let old = send(&first, &key(0)).unwrap_err();
        send(&second, &key(0)).unwrap();
        event_manager.run_with_timeout(1000).unwrap();

        assert_eq!(old.raw_os_error(), Some(libc::EPIPE), "{old}");
        assert_eq!(injected(&devices, InputDevice::Keyboard), 4);
        let metrics = channel.metrics();
        assert_eq!(metrics.handoffs.load(Ordering::Relaxed), 2);
        assert_eq!(counts(&metrics), (2, 4, 0));
    }
}
