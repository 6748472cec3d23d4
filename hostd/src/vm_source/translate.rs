//! Viewers' input (the stream protocol's events) translated into evdev batches for the VM's
//! virtio-input devices. Sans-IO: events and the frame size in, batches out.

use proto::stream::{Button, InputEvent, TouchPhase};
use tracing::debug;
use vmm_api::input::{evdev, keyboard_accepts, ABS_MAX, MAX_INPUT_BATCH, TOUCH_SLOTS};
use vmm_api::{InputDevice, InputEvent as EvdevEvent};

const fn ev(ty: u16, code: u16, value: i32) -> EvdevEvent {
    EvdevEvent::new(ty, code, value)
}

const SYN: EvdevEvent = EvdevEvent::SYN_REPORT;

/// Scales a stream pixel coordinate to the VMM's 0..=32767 absolute axes.
fn scale(v: u16, extent: u32) -> i32 {
    if extent <= 1 {
        return 0;
    }
    let v = u32::from(v).min(extent - 1);
    (u64::from(v) * ABS_MAX as u64 / u64::from(extent - 1)) as i32
}

/// Turns the stream protocol's input events into evdev batches for the VMM's devices.
/// Sans-IO; keeps the state the translation needs (touch contacts, partial wheel notches).
#[derive(Debug, Default)]
pub struct InputTranslator {
    /// Tracking id of each touch slot's contact, if one is down.
    contacts: [Option<u16>; TOUCH_SLOTS as usize],
    next_tracking_id: u16,
    /// Wheel motion in 1/120 notch not yet sent.
    wheel_rest: i32,
}

impl InputTranslator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Translates `events` (coordinates in stream pixels of a `size` frame) into batches, one
    /// per run of consecutive events for the same device, each ending with `SYN_REPORT`.
    /// Events the VM has no device for (back/forward buttons, horizontal wheel, contacts
    /// past slot 9, keys outside the keyboard's set) are dropped.
    pub fn translate(
        &mut self,
        events: &[InputEvent],
        size: (u32, u32),
    ) -> Vec<(InputDevice, Vec<EvdevEvent>)> {
        let mut batches: Vec<(InputDevice, Vec<EvdevEvent>)> = Vec::new();
        for e in events {
            let Some((device, packet)) = self.packet(e, size) else {
                debug!(event = ?e, "input event has no VM device; dropped");
                continue;
            };
            match batches.last_mut() {
                Some((d, batch))
                    if *d == device && batch.len() + packet.len() <= MAX_INPUT_BATCH =>
                {
                    batch.extend(packet)
                }
                _ => batches.push((device, packet)),
            }
        }
        batches
    }

    /// One event as one evdev packet (ending with `SYN_REPORT`).
    fn packet(
        &mut self,
        e: &InputEvent,
        (w, h): (u32, u32),
    ) -> Option<(InputDevice, Vec<EvdevEvent>)> {
        use evdev::*;
        let (device, mut p) = match *e {
            InputEvent::Key { code, pressed } => {
                if !keyboard_accepts(code) {
                    return None;
                }
                (
                    InputDevice::Keyboard,
                    vec![ev(EV_KEY, code, pressed.into())],
                )
            }
            InputEvent::PointerMove { x, y } => (
                InputDevice::Tablet,
                vec![
                    ev(EV_ABS, ABS_X, scale(x, w)),
                    ev(EV_ABS, ABS_Y, scale(y, h)),
                ],
            ),
            InputEvent::PointerButton { button, pressed } => {
                let code = match button {
                    Button::Left => BTN_LEFT,
                    Button::Right => BTN_RIGHT,
                    Button::Middle => BTN_MIDDLE,
                    Button::Back | Button::Forward => return None,
                };
                (InputDevice::Tablet, vec![ev(EV_KEY, code, pressed.into())])
            }
            InputEvent::Wheel { dy, .. } => {
                self.wheel_rest += i32::from(dy);
                let notches = self.wheel_rest / 120;
                if notches == 0 {
                    return None;
                }
                self.wheel_rest -= notches * 120;
                // The protocol's positive dy scrolls down; REL_WHEEL's positive is up.
                (InputDevice::Tablet, vec![ev(EV_REL, REL_WHEEL, -notches)])
            }
            InputEvent::Touch { id, phase, x, y } => (
                InputDevice::Touch,
                self.touch(id, phase, scale(x, w), scale(y, h))?,
            ),
        };
        p.push(SYN);
        Some((device, p))
    }

    fn touch(&mut self, id: u8, phase: TouchPhase, x: i32, y: i32) -> Option<Vec<EvdevEvent>> {
        use evdev::*;
        let slot = self.contacts.get_mut(usize::from(id))?;
        let mut p = vec![ev(EV_ABS, ABS_MT_SLOT, i32::from(id))];
        match phase {
            TouchPhase::Start | TouchPhase::Move => {
                if slot.is_none() {
                    if phase == TouchPhase::Move {
                        // A move without a start (lost or refused start): nothing to move.
                        return None;
                    }
                    let tracking = self.next_tracking_id;
                    self.next_tracking_id = (tracking + 1) % (u16::MAX);
                    *slot = Some(tracking);
                    p.push(ev(EV_ABS, ABS_MT_TRACKING_ID, i32::from(tracking)));
                    if self.contacts.iter().flatten().count() == 1 {
                        p.push(ev(EV_KEY, BTN_TOUCH, 1));
                    }
                }
                p.push(ev(EV_ABS, ABS_MT_POSITION_X, x));
                p.push(ev(EV_ABS, ABS_MT_POSITION_Y, y));
                // Single-touch emulation follows the lowest active slot.
                if self.contacts.iter().position(Option::is_some) == Some(usize::from(id)) {
                    p.push(ev(EV_ABS, ABS_X, x));
                    p.push(ev(EV_ABS, ABS_Y, y));
                }
            }
            TouchPhase::End | TouchPhase::Cancel => {
                slot.take()?;
                p.push(ev(EV_ABS, ABS_MT_TRACKING_ID, -1));
                if self.contacts.iter().all(Option::is_none) {
                    p.push(ev(EV_KEY, BTN_TOUCH, 0));
                }
            }
        }
        Some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::evdev::*;
    use super::*;

    fn key(code: u16, value: i32) -> EvdevEvent {
        ev(EV_KEY, code, value)
    }

    #[test]
    fn key_press_and_release_become_one_keyboard_batch_of_two_packets() {
        let mut t = InputTranslator::new();
        let out = t.translate(
            &[
                InputEvent::Key {
                    code: 30,
                    pressed: true,
                },
                InputEvent::Key {
                    code: 30,
                    pressed: false,
                },
            ],
            (640, 480),
        );
        assert_eq!(
            out,
            vec![(
                InputDevice::Keyboard,
                vec![key(30, 1), SYN, key(30, 0), SYN]
            )]
        );
    }

    #[test]
    fn pointer_position_is_scaled_to_the_full_absolute_axis() {
        let mut t = InputTranslator::new();
        let out = t.translate(
            &[
                InputEvent::PointerMove { x: 0, y: 0 },
                InputEvent::PointerMove { x: 639, y: 479 },
                InputEvent::PointerMove { x: 5000, y: 240 },
            ],
            (640, 480),
        );
        let abs = |x, y| [ev(EV_ABS, ABS_X, x), ev(EV_ABS, ABS_Y, y), SYN];
        let want: Vec<_> = [abs(0, 0), abs(32767, 32767), abs(32767, 16417)].concat();
        assert_eq!(out, vec![(InputDevice::Tablet, want)]);
    }

    #[test]
    fn devices_change_split_batches_and_keep_order() {
        let mut t = InputTranslator::new();
        let out = t.translate(
            &[
                InputEvent::PointerButton {
                    button: Button::Left,
                    pressed: true,
                },
                InputEvent::Key {
                    code: 28,
                    pressed: true,
                },
                InputEvent::PointerButton {
                    button: Button::Right,
                    pressed: false,
                },
            ],
            (100, 100),
        );
        let devices: Vec<_> = out.iter().map(|(d, _)| *d).collect();
        assert_eq!(
            devices,
            [
                InputDevice::Tablet,
                InputDevice::Keyboard,
                InputDevice::Tablet
            ]
        );
        assert_eq!(out[0].1, vec![key(BTN_LEFT, 1), SYN]);
        assert_eq!(out[2].1, vec![key(BTN_RIGHT, 0), SYN]);
        assert!(out.iter().all(|(_, b)| b.last() == Some(&SYN)));
    }

    #[test]
    fn wheel_sends_whole_notches_with_evdev_sign_and_keeps_the_rest() {
        let mut t = InputTranslator::new();
        assert!(t
            .translate(&[InputEvent::Wheel { dx: 0, dy: 60 }], (10, 10))
            .is_empty());
        let out = t.translate(&[InputEvent::Wheel { dx: 0, dy: 200 }], (10, 10));
        // 60 + 200 = 260 = 2 notches down (REL_WHEEL -2) and 20 left over.
        assert_eq!(
            out,
            vec![(InputDevice::Tablet, vec![ev(EV_REL, REL_WHEEL, -2), SYN])]
        );
        let out = t.translate(&[InputEvent::Wheel { dx: 0, dy: -140 }], (10, 10));
        assert_eq!(
            out,
            vec![(InputDevice::Tablet, vec![ev(EV_REL, REL_WHEEL, 1), SYN])]
        );
    }

    #[test]
    fn events_without_a_vm_device_are_dropped() {
        let mut t = InputTranslator::new();
        let out = t.translate(
            &[
                InputEvent::PointerButton {
                    button: Button::Back,
                    pressed: true,
                },
                InputEvent::Key {
                    code: BTN_LEFT,
                    pressed: true,
                },
                InputEvent::Touch {
                    id: 10,
                    phase: TouchPhase::Start,
                    x: 1,
                    y: 1,
                },
                InputEvent::Touch {
                    id: 3,
                    phase: TouchPhase::Move,
                    x: 1,
                    y: 1,
                },
                InputEvent::Touch {
                    id: 3,
                    phase: TouchPhase::End,
                    x: 1,
                    y: 1,
                },
            ],
            (10, 10),
        );
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn two_finger_touch_follows_multitouch_protocol_b() {
        let mut t = InputTranslator::new();
        let touch = |id, phase| InputEvent::Touch {
            id,
            phase,
            x: 0,
            y: 0,
        };
        let out = t.translate(
            &[
                touch(0, TouchPhase::Start),
                touch(1, TouchPhase::Start),
                touch(0, TouchPhase::End),
                touch(1, TouchPhase::Cancel),
            ],
            (2, 2),
        );
        let abs = |c, v| ev(EV_ABS, c, v);
        assert_eq!(
            out,
            vec![(
                InputDevice::Touch,
                vec![
                    abs(ABS_MT_SLOT, 0),
                    abs(ABS_MT_TRACKING_ID, 0),
                    key(BTN_TOUCH, 1),
                    abs(ABS_MT_POSITION_X, 0),
                    abs(ABS_MT_POSITION_Y, 0),
                    abs(ABS_X, 0),
                    abs(ABS_Y, 0),
                    SYN,
                    abs(ABS_MT_SLOT, 1),
                    abs(ABS_MT_TRACKING_ID, 1),
                    abs(ABS_MT_POSITION_X, 0),
                    abs(ABS_MT_POSITION_Y, 0),
                    SYN,
                    abs(ABS_MT_SLOT, 0),
                    abs(ABS_MT_TRACKING_ID, -1),
                    SYN,
                    abs(ABS_MT_SLOT, 1),
                    abs(ABS_MT_TRACKING_ID, -1),
                    key(BTN_TOUCH, 0),
                    SYN,
                ]
            )]
        );
    }

    #[test]
    fn long_runs_are_split_below_the_vmm_batch_limit() {
        let mut t = InputTranslator::new();
        let moves = vec![InputEvent::PointerMove { x: 1, y: 1 }; 3000];
        let out = t.translate(&moves, (10, 10));
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|(_, b)| b.len() <= MAX_INPUT_BATCH && b.last() == Some(&SYN)));
        assert_eq!(out.iter().map(|(_, b)| b.len()).sum::<usize>(), 9000);
    }
}
