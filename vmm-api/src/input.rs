//! Input: the three virtio-input devices a VM has with `input: true`, the evdev events
//! `PUT /input` carries to them, and what each device accepts (the keyboard's key set, the
//! axes' range, the touch screen's slots), so that a client can translate without a batch
//! being refused.

use serde::{Deserialize, Serialize};

/// Most events accepted in one input batch.
pub const MAX_INPUT_BATCH: usize = 4096;
/// Largest coordinate of the tablet's and touch screen's absolute axes (the guest scales
/// to its screen); the smallest is 0.
pub const ABS_MAX: i32 = 32767;
/// Multi-touch contacts the touch screen tracks (`ABS_MT_SLOT` 0..TOUCH_SLOTS).
pub const TOUCH_SLOTS: i32 = 10;

/// Linux event types and codes (`include/uapi/linux/input-event-codes.h`) the devices use.
pub mod evdev {
    pub const EV_SYN: u16 = 0x00;
    pub const EV_KEY: u16 = 0x01;
    pub const EV_REL: u16 = 0x02;
    pub const EV_ABS: u16 = 0x03;
    pub const EV_LED: u16 = 0x11;
    pub const EV_REP: u16 = 0x14;
    pub const SYN_REPORT: u16 = 0;
    pub const REL_WHEEL: u16 = 0x08;
    pub const ABS_X: u16 = 0x00;
    pub const ABS_Y: u16 = 0x01;
    pub const ABS_MT_SLOT: u16 = 0x2f;
    pub const ABS_MT_POSITION_X: u16 = 0x35;
    pub const ABS_MT_POSITION_Y: u16 = 0x36;
    pub const ABS_MT_TRACKING_ID: u16 = 0x39;
    pub const BTN_LEFT: u16 = 0x110;
    pub const BTN_RIGHT: u16 = 0x111;
    pub const BTN_MIDDLE: u16 = 0x112;
    pub const BTN_TOUCH: u16 = 0x14a;
    pub const KEY_MAX: u16 = 0x2ff;
    pub const LED_NUML: u16 = 0;
    pub const LED_CAPSL: u16 = 1;
    pub const LED_SCROLLL: u16 = 2;
    pub const INPUT_PROP_POINTER: u16 = 0;
    pub const INPUT_PROP_DIRECT: u16 = 1;
    pub const BUS_VIRTUAL: u16 = 0x06;
}

pub use evdev::{EV_SYN, SYN_REPORT};

/// The key codes the keyboard has (`docs/input.md`): every evdev key below `BTN_MISC`
/// (0x100) and from `KEY_OK` (0x160) to below `BTN_TRIGGER_HAPPY` (0x2c0); the button
/// ranges in between belong to the pointer devices. A batch with any other code is refused.
pub const KEYBOARD_KEYS: [std::ops::Range<u16>; 2] = [1..0x100, 0x160..0x2c0];

/// Whether the keyboard has key `code` ([`KEYBOARD_KEYS`]).
pub fn keyboard_accepts(code: u16) -> bool {
    KEYBOARD_KEYS.iter().any(|keys| keys.contains(&code))
}

/// Which virtio-input device an input batch goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputDevice {
    /// The keyboard (`EV_KEY` with [`KEYBOARD_KEYS`] codes).
    Keyboard,
    /// The absolute pointer: `EV_ABS` X/Y, `BTN_LEFT/RIGHT/MIDDLE`, `REL_WHEEL`.
    Tablet,
    /// The multi-touch screen (MT type B slots).
    Touch,
}

/// One evdev event as the guest will see it (`struct virtio_input_event`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputEvent {
    /// Event type (`EV_KEY` = 1, `EV_ABS` = 3, ...). JSON name `type`.
    #[serde(rename = "type")]
    pub ty: u16,
    /// Event code (`KEY_A`, `ABS_X`, ...).
    pub code: u16,
    /// Event value.
    pub value: i32,
}

impl InputEvent {
    /// `EV_SYN / SYN_REPORT`, the end of an evdev packet.
    pub const SYN_REPORT: InputEvent = InputEvent::new(EV_SYN, SYN_REPORT, 0);

    /// An event of type `ty`, code `code` and value `value`.
    pub const fn new(ty: u16, code: u16, value: i32) -> Self {
        Self { ty, code, value }
    }

    /// Whether this is `EV_SYN / SYN_REPORT`, the end of an evdev packet.
    pub fn is_syn_report(&self) -> bool {
        self.ty == EV_SYN && self.code == SYN_REPORT
    }
}

/// Why an input batch is refused before it reaches a device.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputBatchError {
    /// No events.
    #[error("events must not be empty")]
    Empty,
    /// More than [`MAX_INPUT_BATCH`] events.
    #[error("at most {MAX_INPUT_BATCH} events per batch, got {0}")]
    TooLong(usize),
    /// The last event is not `SYN_REPORT`.
    #[error("events must end with SYN_REPORT (type 0, code 0)")]
    NoSynReport,
}

/// `PUT /input` body: a batch of events for one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputBatch {
    /// Target device.
    pub device: InputDevice,
    /// Events, ending with `SYN_REPORT`.
    pub events: Vec<InputEvent>,
}

impl InputBatch {
    /// Checks that the batch is non-empty, at most [`MAX_INPUT_BATCH`] long and ends with
    /// `SYN_REPORT` (what each device accepts is checked by the device).
    pub fn validate(&self) -> Result<(), InputBatchError> {
        validate_events(&self.events)
    }
}

/// [`InputBatch::validate`] for a slice of events.
pub fn validate_events(events: &[InputEvent]) -> Result<(), InputBatchError> {
    match events.last() {
        None => Err(InputBatchError::Empty),
        Some(_) if events.len() > MAX_INPUT_BATCH => Err(InputBatchError::TooLong(events.len())),
        Some(last) if !last.is_syn_report() => Err(InputBatchError::NoSynReport),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyboard_key_set_holds_keys_and_leaves_out_buttons() {
        for key in [1, 30, 0xff, 0x160, 0x2bf] {
            assert!(keyboard_accepts(key), "{key:#x} refused");
        }
        for not_key in [
            0,
            0x100,
            evdev::BTN_LEFT,
            evdev::BTN_TOUCH,
            0x15f,
            0x2c0,
            evdev::KEY_MAX,
        ] {
            assert!(!keyboard_accepts(not_key), "{not_key:#x} accepted");
        }
    }

    #[test]
    fn input_event_json_names_its_type_field_type() {
        let event = InputEvent::new(evdev::EV_KEY, 30, 1);

        let json = serde_json::to_string(&event).unwrap();

        assert_eq!(json, r#"{"type":1,"code":30,"value":1}"#);
        assert_eq!(serde_json::from_str::<InputEvent>(&json).unwrap(), event);
    }

    #[test]
    fn input_batch_round_trips_and_refuses_unknown_fields() {
        let batch = InputBatch {
            device: InputDevice::Touch,
            events: vec![
                InputEvent::new(evdev::EV_ABS, evdev::ABS_MT_SLOT, 3),
                InputEvent::SYN_REPORT,
            ],
        };

        let json = serde_json::to_string(&batch).unwrap();
        let unknown =
            serde_json::from_str::<InputBatch>(r#"{"device":"keyboard","events":[],"extra":1}"#);
        let unknown_event =
            serde_json::from_str::<InputEvent>(r#"{"type":0,"code":0,"value":0,"x":1}"#);

        assert!(json.starts_with(r#"{"device":"touch","#), "{json}");
        assert_eq!(serde_json::from_str::<InputBatch>(&json).unwrap(), batch);
        assert!(unknown
            .unwrap_err()
            .to_string()
            .contains("unknown field `extra`"));
        assert!(unknown_event.is_err());
    }

    #[test]
    fn batches_must_be_non_empty_bounded_and_end_with_syn_report() {
        let key = InputEvent::new(evdev::EV_KEY, 30, 1);

        assert_eq!(validate_events(&[key, InputEvent::SYN_REPORT]), Ok(()));
        assert_eq!(validate_events(&[]), Err(InputBatchError::Empty));
        assert_eq!(
            validate_events(&[InputEvent::SYN_REPORT, key]),
            Err(InputBatchError::NoSynReport)
        );
        let long = vec![InputEvent::SYN_REPORT; MAX_INPUT_BATCH + 1];
        assert_eq!(
            validate_events(&long),
            Err(InputBatchError::TooLong(MAX_INPUT_BATCH + 1))
        );
    }
}
