//! What each virtio-input device is: its identity, event bits and axes, the answers to the
//! config-space queries Linux's virtio_input driver makes, and validation of injected events
//! against them. Pure data, no I/O.

use std::collections::BTreeMap;

use crate::rpc::InputEvent;

/// Linux event types and codes (include/uapi/linux/input-event-codes.h), from the API crate.
pub use vmm_api::input::evdev as ev;

/// `virtio_input_config_select` values.
pub mod select {
    pub const UNSET: u8 = 0x00;
    pub const ID_NAME: u8 = 0x01;
    pub const ID_SERIAL: u8 = 0x02;
    pub const ID_DEVIDS: u8 = 0x03;
    pub const PROP_BITS: u8 = 0x10;
    pub const EV_BITS: u8 = 0x11;
    pub const ABS_INFO: u8 = 0x12;
}

/// Largest coordinate of the tablet and touch axes (the guest scales to its screen).
pub const ABS_MAX: i32 = 32767;
/// Multi-touch contacts the touch screen tracks.
pub const TOUCH_SLOTS: i32 = 10;
// The issue asks for at least ten contacts.
const _: () = assert!(TOUCH_SLOTS >= 10);
/// Size of the `u` union in `virtio_input_config`.
pub const CONFIG_PAYLOAD_LEN: usize = 128;

/// Errors validating injected events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The device does not have this event type or code.
    #[error("event type {ty:#x} code {code:#x} is not supported by the {device}")]
    Unsupported {
        device: &'static str,
        ty: u16,
        code: u16,
    },
    /// An absolute value outside the axis range.
    #[error("value {value} of axis {code:#x} outside {min}..={max}")]
    OutOfRange {
        code: u16,
        value: i32,
        min: i32,
        max: i32,
    },
    /// A key or button value other than 0 (up), 1 (down) or 2 (repeat).
    #[error("key {code:#x} value {value} is not 0, 1 or 2")]
    BadKeyValue { code: u16, value: i32 },
}

/// `virtio_input_absinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbsInfo {
    pub min: i32,
    pub max: i32,
    pub fuzz: i32,
    pub flat: i32,
    pub res: i32,
}

impl AbsInfo {
    fn range(min: i32, max: i32) -> Self {
        Self {
            min,
            max,
            fuzz: 0,
            flat: 0,
            res: 0,
        }
    }
}

/// Which of the three devices a profile describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputKind {
    Keyboard,
    Tablet,
    Touch,
}

/// Identity and capabilities of one virtio-input device.
#[derive(Clone, Debug)]
pub struct InputProfile {
    pub kind: InputKind,
    pub name: &'static str,
    pub serial: &'static str,
    /// bustype, vendor, product, version.
    pub devids: [u16; 4],
    props: Vec<u16>,
    /// Event type -> codes.
    codes: BTreeMap<u16, Vec<u16>>,
    abs: BTreeMap<u16, AbsInfo>,
}

fn bitmap(bits: &[u16]) -> Vec<u8> {
    let mut map = vec![0u8; CONFIG_PAYLOAD_LEN];
    for &b in bits {
        if let Some(byte) = map.get_mut(usize::from(b / 8)) {
            *byte |= 1 << (b % 8);
        }
    }
    let len = map.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    map.truncate(len);
    map
}

impl InputProfile {
    /// A keyboard with every evdev key code (not buttons), LEDs, and autorepeat left to the
    /// guest (EV_REP).
    pub fn keyboard() -> Self {
        let keys = (1..0x100).chain(0x160..0x2c0).collect();
        Self {
            kind: InputKind::Keyboard,
            name: "GenOS virtio keyboard",
            serial: "genos-kbd-0",
            devids: [ev::BUS_VIRTUAL, 0x1af4, 0x0001, 1],
            props: vec![],
            codes: BTreeMap::from([
                (ev::EV_KEY, keys),
                (
                    ev::EV_LED,
                    vec![ev::LED_NUML, ev::LED_CAPSL, ev::LED_SCROLLL],
                ),
                // The driver only checks that EV_REP has bits to set it; the guest repeats.
                (ev::EV_REP, vec![0, 1]),
            ]),
            abs: BTreeMap::new(),
        }
    }

    /// An absolute pointer with three buttons and a wheel.
    pub fn tablet() -> Self {
        Self {
            kind: InputKind::Tablet,
            name: "GenOS virtio tablet",
            serial: "genos-tablet-0",
            devids: [ev::BUS_VIRTUAL, 0x1af4, 0x0002, 1],
            props: vec![ev::INPUT_PROP_POINTER],
            codes: BTreeMap::from([
                (
                    ev::EV_KEY,
                    vec![ev::BTN_LEFT, ev::BTN_RIGHT, ev::BTN_MIDDLE],
                ),
                (ev::EV_REL, vec![ev::REL_WHEEL]),
                (ev::EV_ABS, vec![ev::ABS_X, ev::ABS_Y]),
            ]),
            abs: BTreeMap::from([
                (ev::ABS_X, AbsInfo::range(0, ABS_MAX)),
                (ev::ABS_Y, AbsInfo::range(0, ABS_MAX)),
            ]),
        }
    }

    /// A direct multi-touch screen (MT protocol type B, [`TOUCH_SLOTS`] slots).
    pub fn touch() -> Self {
        let axes = [
            (ev::ABS_X, AbsInfo::range(0, ABS_MAX)),
            (ev::ABS_Y, AbsInfo::range(0, ABS_MAX)),
            (ev::ABS_MT_SLOT, AbsInfo::range(0, TOUCH_SLOTS - 1)),
            (ev::ABS_MT_POSITION_X, AbsInfo::range(0, ABS_MAX)),
            (ev::ABS_MT_POSITION_Y, AbsInfo::range(0, ABS_MAX)),
            (ev::ABS_MT_TRACKING_ID, AbsInfo::range(-1, 65535)),
        ];
        Self {
            kind: InputKind::Touch,
            name: "GenOS virtio touchscreen",
            serial: "genos-touch-0",
            devids: [ev::BUS_VIRTUAL, 0x1af4, 0x0003, 1],
            props: vec![ev::INPUT_PROP_DIRECT],
            codes: BTreeMap::from([
                (ev::EV_KEY, vec![ev::BTN_TOUCH]),
                (ev::EV_ABS, axes.iter().map(|(c, _)| *c).collect()),
            ]),
            abs: BTreeMap::from(axes),
        }
    }

    /// Short name for messages.
    pub fn label(&self) -> &'static str {
        match self.kind {
            InputKind::Keyboard => "keyboard",
            InputKind::Tablet => "tablet",
            InputKind::Touch => "touch screen",
        }
    }

    /// The payload for config query (`select`, `subsel`); its length is the `size` field.
    /// Unknown queries answer with size 0, as the spec requires.
    pub fn config_payload(&self, sel: u8, subsel: u8) -> Vec<u8> {
        let mut out = match sel {
            select::ID_NAME if subsel == 0 => self.name.as_bytes().to_vec(),
            select::ID_SERIAL if subsel == 0 => self.serial.as_bytes().to_vec(),
            select::ID_DEVIDS if subsel == 0 => {
                self.devids.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
            select::PROP_BITS if subsel == 0 => bitmap(&self.props),
            select::EV_BITS => self
                .codes
                .get(&u16::from(subsel))
                .map(|codes| bitmap(codes))
                .unwrap_or_default(),
            select::ABS_INFO => self
                .abs
                .get(&u16::from(subsel))
                .map(|a| {
                    [a.min, a.max, a.fuzz, a.flat, a.res]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect()
                })
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        out.truncate(CONFIG_PAYLOAD_LEN);
        out
    }

    /// Checks that the device could have produced `event`.
    pub fn check(&self, event: &InputEvent) -> Result<(), EventError> {
        if event.ty == ev::EV_SYN {
            if event.code == ev::SYN_REPORT {
                return Ok(());
            }
        } else if event.ty != ev::EV_LED
            && event.ty != ev::EV_REP
            && self
                .codes
                .get(&event.ty)
                .is_some_and(|codes| codes.contains(&event.code))
        {
            return match event.ty {
                ev::EV_KEY if !(0..=2).contains(&event.value) => Err(EventError::BadKeyValue {
                    code: event.code,
                    value: event.value,
                }),
                ev::EV_ABS => {
                    let a = self.abs[&event.code];
                    if (a.min..=a.max).contains(&event.value) {
                        Ok(())
                    } else {
                        Err(EventError::OutOfRange {
                            code: event.code,
                            value: event.value,
                            min: a.min,
                            max: a.max,
                        })
                    }
                }
                _ => Ok(()),
            };
        }
        Err(EventError::Unsupported {
            device: self.label(),
            ty: event.ty,
            code: event.code,
        })
    }
}

/// Whether an event is pointer motion, which may be dropped when the queue is full.
pub fn is_motion(event: &InputEvent) -> bool {
    match event.ty {
        ev::EV_SYN => true,
        ev::EV_ABS => matches!(
            event.code,
            ev::ABS_X | ev::ABS_Y | ev::ABS_MT_SLOT | ev::ABS_MT_POSITION_X | ev::ABS_MT_POSITION_Y
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_bit(map: &[u8], bit: u16) -> bool {
        map.get(usize::from(bit / 8))
            .is_some_and(|b| b & (1 << (bit % 8)) != 0)
    }

    fn event(ty: u16, code: u16, value: i32) -> InputEvent {
        InputEvent { ty, code, value }
    }

    #[test]
    fn identity_queries_answer_name_serial_and_ids() {
        let kbd = InputProfile::keyboard();
        assert_eq!(
            kbd.config_payload(select::ID_NAME, 0),
            b"GenOS virtio keyboard"
        );
        assert_eq!(kbd.config_payload(select::ID_SERIAL, 0), b"genos-kbd-0");
        assert_eq!(
            kbd.config_payload(select::ID_DEVIDS, 0),
            [0x06, 0, 0xf4, 0x1a, 1, 0, 1, 0]
        );
        assert!(kbd.config_payload(select::UNSET, 0).is_empty());
        assert!(kbd.config_payload(0x7f, 0).is_empty());
    }

    #[test]
    fn keyboard_reports_every_key_repeat_and_leds_but_no_buttons() {
        let kbd = InputProfile::keyboard();
        let keys = kbd.config_payload(select::EV_BITS, ev::EV_KEY as u8);
        for key in [1u16, 30, 0x7f, 0xff, 0x160, 0x2bf] {
            assert!(has_bit(&keys, key), "key {key:#x}");
        }
        for button in [0u16, ev::BTN_LEFT, ev::BTN_TOUCH, 0x2c0] {
            assert!(!has_bit(&keys, button), "button {button:#x}");
        }
        assert!(!kbd
            .config_payload(select::EV_BITS, ev::EV_REP as u8)
            .is_empty());
        assert!(has_bit(
            &kbd.config_payload(select::EV_BITS, ev::EV_LED as u8),
            ev::LED_CAPSL
        ));
        assert!(kbd
            .config_payload(select::EV_BITS, ev::EV_ABS as u8)
            .is_empty());
    }

    #[test]
    fn tablet_reports_absolute_axes_buttons_and_wheel() {
        let tab = InputProfile::tablet();
        let abs = tab.config_payload(select::EV_BITS, ev::EV_ABS as u8);
        assert!(has_bit(&abs, ev::ABS_X) && has_bit(&abs, ev::ABS_Y));
        let keys = tab.config_payload(select::EV_BITS, ev::EV_KEY as u8);
        for b in [ev::BTN_LEFT, ev::BTN_RIGHT, ev::BTN_MIDDLE] {
            assert!(has_bit(&keys, b));
        }
        assert!(has_bit(
            &tab.config_payload(select::EV_BITS, ev::EV_REL as u8),
            ev::REL_WHEEL
        ));
        let info = tab.config_payload(select::ABS_INFO, ev::ABS_X as u8);
        assert_eq!(info.len(), 20);
        assert_eq!(i32::from_le_bytes(info[4..8].try_into().unwrap()), ABS_MAX);
        assert!(tab
            .config_payload(select::ABS_INFO, ev::ABS_MT_SLOT as u8)
            .is_empty());
    }

    #[test]
    fn touch_is_direct_with_ten_mt_slots_and_tracking_ids() {
        let touch = InputProfile::touch();
        assert!(has_bit(
            &touch.config_payload(select::PROP_BITS, 0),
            ev::INPUT_PROP_DIRECT
        ));
        let abs = touch.config_payload(select::EV_BITS, ev::EV_ABS as u8);
        for axis in [
            ev::ABS_MT_SLOT,
            ev::ABS_MT_TRACKING_ID,
            ev::ABS_MT_POSITION_X,
            ev::ABS_MT_POSITION_Y,
        ] {
            assert!(has_bit(&abs, axis), "axis {axis:#x}");
        }
        let slot = touch.config_payload(select::ABS_INFO, ev::ABS_MT_SLOT as u8);
        assert_eq!(
            i32::from_le_bytes(slot[4..8].try_into().unwrap()),
            TOUCH_SLOTS - 1
        );
    }

    #[test]
    fn events_are_checked_against_the_device() {
        let tab = InputProfile::tablet();
        assert!(tab.check(&event(ev::EV_ABS, ev::ABS_X, ABS_MAX)).is_ok());
        assert!(tab.check(&event(ev::EV_SYN, ev::SYN_REPORT, 0)).is_ok());
        assert!(matches!(
            tab.check(&event(ev::EV_ABS, ev::ABS_X, ABS_MAX + 1)),
            Err(EventError::OutOfRange { .. })
        ));
        assert!(matches!(
            tab.check(&event(ev::EV_KEY, 30, 1)),
            Err(EventError::Unsupported { .. })
        ));
        assert!(matches!(
            tab.check(&event(ev::EV_KEY, ev::BTN_LEFT, 5)),
            Err(EventError::BadKeyValue { .. })
        ));
        let kbd = InputProfile::keyboard();
        assert!(kbd.check(&event(ev::EV_KEY, 30, 2)).is_ok());
        assert!(matches!(
            kbd.check(&event(ev::EV_LED, ev::LED_CAPSL, 1)),
            Err(EventError::Unsupported { .. })
        ));
        assert!(matches!(
            kbd.check(&event(ev::EV_SYN, 1, 0)),
            Err(EventError::Unsupported { .. })
        ));
    }
}
