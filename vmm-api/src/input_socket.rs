//! The raw input channel: `GET /input/socket` ([`PATH`]) answers with an
//! [`InputSocketHandoff`] body and one descriptor (SCM_RIGHTS, as `GET /framebuffer`): one
//! end of an `AF_UNIX` `SOCK_SEQPACKET` pair whose other end the VMM's event loop reads.
//!
//! Each message the client sends is one input batch, as `PUT /input` carries: 1 to
//! [`MAX_RECORDS_PER_MESSAGE`] fixed-size [`InputRecord`]s of [`RECORD_LEN`] bytes, all for
//! the same device, the last one `SYN_REPORT`. The VMM checks a message as it checks a
//! `PUT /input` body and then against the device; a message that fails is dropped whole
//! (counted, logged rate-limited), the channel stays open. There are no answers: a client
//! that wants to know reads the VMM's metrics. Encoding and decoding live here so that the
//! VMM and hostd agree on one byte layout.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use serde::{Deserialize, Serialize};

use crate::input::{validate_events, InputBatch, InputBatchError, InputDevice, InputEvent};

/// `GET`: an [`InputSocketHandoff`] and one descriptor.
pub const PATH: &str = "/input/socket";
/// Bytes in one record: device (u8), three zero bytes, then `struct virtio_input_event`
/// (le16 type, le16 code, le32 value).
pub const RECORD_LEN: usize = 12;
/// Most records in one message (one batch); the VMM drops longer messages.
pub const MAX_RECORDS_PER_MESSAGE: usize = 256;
/// Largest message in bytes.
pub const MAX_MESSAGE_LEN: usize = RECORD_LEN * MAX_RECORDS_PER_MESSAGE;
/// Most messages the VMM reads per wake-up of its event loop; the rest wait for the next
/// pass, so that a flood cannot hold the loop.
pub const MAX_MESSAGES_PER_WAKE: usize = 64;
/// The socket type of the handed-over descriptor.
pub const SOCKET_TYPE: &str = "seqpacket";

/// Sends one message (an encoded batch) on the channel's client end without waiting and
/// without SIGPIPE: a `SOCK_SEQPACKET` send is whole or fails, so a full socket is
/// `WouldBlock` and a VMM that closed its end (replaced the channel, or exited) is `EPIPE`.
pub fn send_message(socket: BorrowedFd<'_>, message: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `message` is live and readable for its length during the call; `socket`
        // is an open descriptor for the call's duration.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Body of the `GET /input/socket` answer: the layout the descriptor carries, so that a
/// client can check it speaks the same one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSocketHandoff {
    /// Always [`SOCKET_TYPE`].
    pub socket: String,
    /// [`RECORD_LEN`].
    pub record_len: usize,
    /// [`MAX_RECORDS_PER_MESSAGE`].
    pub max_records: usize,
}

impl InputSocketHandoff {
    /// The answer for this crate's layout.
    pub fn current() -> Self {
        Self {
            socket: SOCKET_TYPE.into(),
            record_len: RECORD_LEN,
            max_records: MAX_RECORDS_PER_MESSAGE,
        }
    }

    /// Whether the VMM's answer is this crate's layout.
    pub fn is_current(&self) -> bool {
        *self == Self::current()
    }
}

/// The device index a record carries.
pub fn device_index(device: InputDevice) -> u8 {
    match device {
        InputDevice::Keyboard => 0,
        InputDevice::Tablet => 1,
        InputDevice::Touch => 2,
    }
}

/// The device of index `index` ([`device_index`]).
pub fn device_of(index: u8) -> Option<InputDevice> {
    match index {
        0 => Some(InputDevice::Keyboard),
        1 => Some(InputDevice::Tablet),
        2 => Some(InputDevice::Touch),
        _ => None,
    }
}

/// Why a record or message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The message is not a whole number of records.
    #[error("message of {0} bytes is not a whole number of {RECORD_LEN}-byte records")]
    Partial(usize),
    /// The message has more than [`MAX_RECORDS_PER_MESSAGE`] records (or was truncated).
    #[error("message longer than {MAX_RECORDS_PER_MESSAGE} records")]
    TooLong,
    /// A record names no device.
    #[error("record {index}: no input device {device}")]
    Device {
        /// Position in the message.
        index: usize,
        /// The byte it carries.
        device: u8,
    },
    /// A record's reserved bytes are not zero.
    #[error("record {0}: reserved bytes are not zero")]
    Reserved(usize),
    /// A message mixes devices.
    #[error("record {0}: a message's records must all be for one device")]
    MixedDevices(usize),
    /// The batch is empty or does not end with `SYN_REPORT`.
    #[error(transparent)]
    Batch(#[from] InputBatchError),
}

/// One record: an event for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputRecord {
    /// The device.
    pub device: InputDevice,
    /// The event.
    pub event: InputEvent,
}

impl InputRecord {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut bytes = [0u8; RECORD_LEN];
        bytes[0] = device_index(self.device);
        bytes[4..6].copy_from_slice(&self.event.ty.to_le_bytes());
        bytes[6..8].copy_from_slice(&self.event.code.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.event.value.to_le_bytes());
        bytes
    }

    /// The record in `bytes`; `index` is its position, for the error.
    pub fn decode(bytes: &[u8; RECORD_LEN], index: usize) -> Result<Self, RecordError> {
        let device = device_of(bytes[0]).ok_or(RecordError::Device {
            index,
            device: bytes[0],
        })?;
        if bytes[1..4] != [0, 0, 0] {
            return Err(RecordError::Reserved(index));
        }
        let event = InputEvent::new(
            u16::from_le_bytes([bytes[4], bytes[5]]),
            u16::from_le_bytes([bytes[6], bytes[7]]),
            i32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]),
        );
        Ok(Self { device, event })
    }
}

/// Appends the message for `events` on `device` to `out`, after checking the batch as
/// the VMM will (non-empty, at most [`MAX_RECORDS_PER_MESSAGE`], ending with `SYN_REPORT`).
pub fn encode_message(
    device: InputDevice,
    events: &[InputEvent],
    out: &mut Vec<u8>,
) -> Result<(), RecordError> {
    validate_events(events)?;
    if events.len() > MAX_RECORDS_PER_MESSAGE {
        return Err(RecordError::TooLong);
    }
    out.reserve(events.len() * RECORD_LEN);
    for &event in events {
        out.extend_from_slice(&InputRecord { device, event }.encode());
    }
    Ok(())
}

/// The batch one message carries, checked as `PUT /input` checks its body (what the
/// device accepts is the device's to check).
pub fn decode_message(message: &[u8]) -> Result<InputBatch, RecordError> {
    if message.len() % RECORD_LEN != 0 {
        return Err(RecordError::Partial(message.len()));
    }
    if message.len() > MAX_MESSAGE_LEN {
        return Err(RecordError::TooLong);
    }
    let mut device = None;
    let mut events = Vec::with_capacity(message.len() / RECORD_LEN);
    for (index, chunk) in message.chunks_exact(RECORD_LEN).enumerate() {
        let bytes: &[u8; RECORD_LEN] = chunk.try_into().expect("chunks_exact");
        let record = InputRecord::decode(bytes, index)?;
        if *device.get_or_insert(record.device) != record.device {
            return Err(RecordError::MixedDevices(index));
        }
        events.push(record.event);
    }
    validate_events(&events)?;
    Ok(InputBatch {
        device: device.expect("validate_events refuses an empty batch"),
        events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::evdev::{ABS_X, EV_ABS, EV_KEY};

    fn key_batch() -> Vec<InputEvent> {
        vec![InputEvent::new(EV_KEY, 30, 1), InputEvent::SYN_REPORT]
    }

    #[test]
    fn a_record_has_the_documented_byte_layout() {
        let record = InputRecord {
            device: InputDevice::Touch,
            event: InputEvent::new(EV_ABS, 0x35, -2),
        };

        let bytes = record.encode();

        assert_eq!(
            bytes,
            [2, 0, 0, 0, 0x03, 0x00, 0x35, 0x00, 0xfe, 0xff, 0xff, 0xff]
        );
        assert_eq!(InputRecord::decode(&bytes, 0), Ok(record));
    }

    #[test]
    fn a_message_round_trips_for_every_device() {
        for device in [
            InputDevice::Keyboard,
            InputDevice::Tablet,
            InputDevice::Touch,
        ] {
            let events = vec![
                InputEvent::new(EV_ABS, ABS_X, 1234),
                InputEvent::new(EV_KEY, 0x110, 1),
                InputEvent::SYN_REPORT,
            ];
            let mut message = Vec::new();

            encode_message(device, &events, &mut message).unwrap();

            assert_eq!(message.len(), 3 * RECORD_LEN);
            assert_eq!(
                decode_message(&message),
                Ok(InputBatch { device, events }),
                "{device:?}"
            );
        }
    }

    #[test]
    fn a_partial_record_is_refused() {
        let mut message = Vec::new();
        encode_message(InputDevice::Keyboard, &key_batch(), &mut message).unwrap();
        message.pop();

        assert_eq!(
            decode_message(&message),
            Err(RecordError::Partial(2 * RECORD_LEN - 1))
        );
        assert_eq!(decode_message(&[0; 5]), Err(RecordError::Partial(5)));
    }

    #[test]
    fn unknown_devices_reserved_bytes_and_mixed_devices_are_refused() {
        let mut message = Vec::new();
        encode_message(InputDevice::Keyboard, &key_batch(), &mut message).unwrap();
        let mut unknown = message.clone();
        unknown[RECORD_LEN] = 3;
        let mut reserved = message.clone();
        reserved[2] = 1;
        let mut mixed = message.clone();
        mixed[RECORD_LEN] = device_index(InputDevice::Tablet);

        assert_eq!(
            decode_message(&unknown),
            Err(RecordError::Device {
                index: 1,
                device: 3
            })
        );
        assert_eq!(decode_message(&reserved), Err(RecordError::Reserved(0)));
        assert_eq!(decode_message(&mixed), Err(RecordError::MixedDevices(1)));
    }

    #[test]
    fn empty_unterminated_and_overlong_messages_are_refused() {
        let mut unterminated = Vec::new();
        unterminated.extend_from_slice(
            &InputRecord {
                device: InputDevice::Keyboard,
                event: InputEvent::new(EV_KEY, 30, 1),
            }
            .encode(),
        );
        let overlong = vec![0u8; MAX_MESSAGE_LEN + RECORD_LEN];
        let too_many = vec![InputEvent::SYN_REPORT; MAX_RECORDS_PER_MESSAGE + 1];

        assert_eq!(
            decode_message(&[]),
            Err(RecordError::Batch(InputBatchError::Empty))
        );
        assert_eq!(
            decode_message(&unterminated),
            Err(RecordError::Batch(InputBatchError::NoSynReport))
        );
        assert_eq!(decode_message(&overlong), Err(RecordError::TooLong));
        assert_eq!(
            encode_message(InputDevice::Tablet, &too_many, &mut Vec::new()),
            Err(RecordError::TooLong)
        );
        assert_eq!(
            encode_message(InputDevice::Tablet, &[], &mut Vec::new()),
            Err(RecordError::Batch(InputBatchError::Empty))
        );
    }

    #[test]
    fn the_handoff_body_describes_this_layout() {
        let json = serde_json::to_string(&InputSocketHandoff::current()).unwrap();
        let other = InputSocketHandoff {
            record_len: 8,
            ..InputSocketHandoff::current()
        };

        assert_eq!(
            json,
            r#"{"socket":"seqpacket","record_len":12,"max_records":256}"#
        );
        assert!(serde_json::from_str::<InputSocketHandoff>(&json)
            .unwrap()
            .is_current());
        assert!(!other.is_current());
    }
}
