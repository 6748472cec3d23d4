//! A VM as a stream environment: its virtio-gpu scanout as an [`encoder::FrameSource`] and
//! its virtio-input devices as a [`crate::stream::InputSink`].
//!
//! Both talk to the VMM's control API (`docs/vmm-api.md`, types in [`vmm_api`]) through
//! hostd's one VMM client, [`crate::vmm_client`]: `GET /framebuffer` hands over the shared
//! framebuffer's memfd and flush eventfd (SCM_RIGHTS), read with
//! [`framebuffer::FramebufferReader`]; viewers' input is translated by the sans-IO
//! [`InputTranslator`] into evdev batches ending with `SYN_REPORT` and sent as `PUT /input`
//! from a worker thread, so the stream server's async tasks never wait on the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use encoder::{
    CursorShape, CursorUpdate, FrameRef, FrameSource, PixelFormat, Rect, SourceError, SourceFrame,
};
use framebuffer::{CursorState, FramebufferReader, ReaderError, ReaderFds};
use proto::stream::{Button, InputEvent, TouchPhase};
use tracing::{debug, warn};
use vmm_api::input::{evdev, keyboard_accepts, ABS_MAX, MAX_INPUT_BATCH, TOUCH_SLOTS};
use vmm_api::{
    DisplaySize, InputBatch, InputDevice, InputEvent as EvdevEvent, Request, ResponseError,
};

use crate::stream::source::{EnvironmentSource, InputError, InputSink};
use crate::uds::VmmSocket;
use crate::vmm_client::{VmmClient, VmmClientError};

/// How long one API request may take before the VMM is considered stuck.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Commands waiting for the input thread; past this, input is refused rather than queued
/// without bound behind a stalled VMM.
const INPUT_QUEUE: usize = 256;

/// Errors talking to a VMM or reading its framebuffer.
#[derive(Debug, thiserror::Error)]
pub enum VmSourceError {
    #[error(transparent)]
    Vmm(#[from] VmmClientError),
    #[error("the VM has no display (its config has no gpu)")]
    NoDisplay,
    #[error("shared framebuffer")]
    Reader(#[from] ReaderError),
    #[error("starting the input thread failed")]
    Thread(#[source] std::io::Error),
}

type Result<T, E = VmSourceError> = std::result::Result<T, E>;

/// The display size the VM was configured with (`GET /vm`, `config.gpu`).
fn configured_display(api: &mut VmmClient) -> Result<(u32, u32)> {
    let gpu = api.describe()?.config.and_then(|c| c.gpu);
    let size = gpu.ok_or(VmSourceError::NoDisplay)?;
    Ok((size.width, size.height))
}

/// The stream's current frame size, shared by the frame source (which learns it) and the
/// input sink (which scales pointer coordinates with it).
#[derive(Debug, Default)]
pub struct SharedSize(AtomicU64);

impl SharedSize {
    pub fn new(width: u32, height: u32) -> Self {
        let s = Self::default();
        s.set(width, height);
        s
    }
    pub fn get(&self) -> (u32, u32) {
        let v = self.0.load(Ordering::Relaxed);
        ((v >> 32) as u32, v as u32)
    }
    pub fn set(&self, width: u32, height: u32) {
        self.0.store(
            u64::from(width) << 32 | u64::from(height),
            Ordering::Relaxed,
        );
    }
}

/// The VM's scanout as a frame source. While the guest has not enabled the scanout (or has
/// disabled it) the source returns one black frame of the last known size, so viewers get a
/// picture; afterwards it returns frames only when the guest flushes.
///
/// The virtio-gpu cursor is reported through [`FrameSource::cursor_update`]: `next_frame`
/// returns early when the cursor's serial changed, and the image goes out only when the
/// shape or hotspot changed, trimmed of its transparent right and bottom margins.
pub struct VmFramebufferSource {
    reader: FramebufferReader,
    size: Arc<SharedSize>,
    blank: Vec<u8>,
    blank_sent: bool,
    sequence: u64,
    /// (generation, sequence) of the last frame returned.
    last_frame: Option<(u64, u64)>,
    /// Cursor serial last reported by [`FrameSource::cursor_update`].
    cursor_serial: Option<u64>,
    /// Cursor serial for which `next_frame` last returned early: each pointer change ends
    /// one wait, so a caller that never asks for the cursor is not woken over and over.
    cursor_woken: u64,
    /// Hotspot and 64x64 image last reported.
    cursor_shape: Option<(u32, u32, Vec<u8>)>,
}

impl std::fmt::Debug for VmFramebufferSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmFramebufferSource")
            .field("reader", &self.reader)
            .field("size", &self.size.get())
            .field("sequence", &self.sequence)
            .finish_non_exhaustive()
    }
}

impl VmFramebufferSource {
    /// Fetches the framebuffer of the VMM serving its API at `api_sock`.
    pub fn connect(api_sock: &VmmSocket) -> Result<Self> {
        let mut api = VmmClient::connect(api_sock, API_TIMEOUT)?;
        let display = configured_display(&mut api)?;
        let fds = api.framebuffer()?;
        Self::new(fds, display)
    }

    /// Reads the framebuffer in `fds`; `display` is the size reported while the scanout is
    /// disabled (the VM's configured display size).
    pub fn new(fds: ReaderFds, display: (u32, u32)) -> Result<Self> {
        let reader = FramebufferReader::new(fds)?;
        let info = reader.info()?;
        let cursor_woken = reader.cursor_serial();
        let size = if info.enabled() {
            (info.width, info.height)
        } else {
            display
        };
        Ok(Self {
            reader,
            size: Arc::new(SharedSize::new(size.0, size.1)),
            blank: Vec::new(),
            blank_sent: false,
            sequence: 0,
            last_frame: None,
            cursor_serial: None,
            cursor_woken,
            cursor_shape: None,
        })
    }

    /// Whether the cursor changed since the last wait it ended.
    fn cursor_changed(&mut self) -> bool {
        let serial = self.reader.cursor_serial();
        let changed = serial != self.cursor_woken;
        self.cursor_woken = serial;
        changed
    }

    /// The size handle to give the matching [`VmInput`].
    pub fn shared_size(&self) -> Arc<SharedSize> {
        self.size.clone()
    }
}

fn source_error(e: ReaderError) -> SourceError {
    match e {
        ReaderError::Wait(io) | ReaderError::Map(io) => SourceError::Io(io),
        other => SourceError::Other(other.to_string()),
    }
}

impl FrameSource for VmFramebufferSource {
    fn size(&self) -> (u32, u32) {
        match self.reader.info() {
            Ok(info) if info.enabled() => (info.width, info.height),
            _ => self.size.get(),
        }
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError> {
        loop {
            let info = self.reader.info().map_err(source_error)?;
            if info.enabled() {
                self.blank_sent = false;
                if self.last_frame != Some((info.generation, info.sequence)) {
                    break;
                }
            } else if !self.blank_sent {
                self.blank_sent = true;
                let (width, height) = self.size.get();
                self.blank.clear();
                self.blank.resize(width as usize * height as usize * 4, 0);
                self.sequence += 1;
                return Ok(Some(SourceFrame {
                    frame: FrameRef::packed(width, height, PixelFormat::Bgrx, &self.blank),
                    damage: vec![Rect::new(0, 0, width, height)],
                    sequence: self.sequence,
                    captured_at: Instant::now(),
                }));
            }
            // A cursor move flushes nothing: return so the caller picks it up now.
            if self.cursor_changed() {
                return Ok(None);
            }
            if !self.reader.wait_change(deadline).map_err(source_error)? {
                return Ok(None);
            }
        }
        let Some(frame) = self.reader.wait_frame(deadline).map_err(source_error)? else {
            return Ok(None);
        };
        self.last_frame = Some((frame.info.generation, frame.info.sequence));
        let (width, height) = (frame.info.width, frame.info.height);
        self.size.set(width, height);
        let damage = frame
            .damage
            .iter()
            .filter_map(|r| r.clip(width, height))
            .map(|r| Rect::new(r.x, r.y, r.width, r.height))
            .collect();
        self.sequence += 1;
        Ok(Some(SourceFrame {
            frame: FrameRef {
                width,
                height,
                stride: frame.info.stride as usize,
                format: PixelFormat::Bgrx,
                data: frame.pixels,
            },
            damage,
            sequence: self.sequence,
            captured_at: Instant::now(),
        }))
    }

    fn cursor_update(&mut self) -> Option<CursorUpdate> {
        // Called after every frame: the image is only read when the serial moved.
        if self.cursor_serial == Some(self.reader.cursor_serial()) {
            return None;
        }
        let cursor = match self.reader.cursor() {
            Ok(c) => c,
            Err(e) => {
                // A stuck or corrupt writer also fails the next frame read, which ends the stream.
                debug!(error = %e, "reading the cursor failed");
                return None;
            }
        };
        if self.cursor_serial == Some(cursor.serial) {
            return None;
        }
        self.cursor_serial = Some(cursor.serial);
        let same_shape = self.cursor_shape.as_ref().is_some_and(|(hx, hy, image)| {
            (*hx, *hy) == (cursor.hot_x, cursor.hot_y) && *image == cursor.image
        });
        let image = (!same_shape).then(|| trimmed_cursor(&cursor));
        let update = CursorUpdate {
            x: cursor.x,
            y: cursor.y,
            visible: cursor.visible,
            image,
        };
        if !same_shape {
            self.cursor_shape = Some((cursor.hot_x, cursor.hot_y, cursor.image));
        }
        Some(update)
    }
}

/// The cursor's image without its fully transparent right columns and bottom rows (the
/// top-left stays, so the hotspot keeps its meaning); at least 1x1.
fn trimmed_cursor(c: &CursorState) -> CursorShape {
    let side = framebuffer::layout::CURSOR_SIDE as usize;
    let (mut width, mut height) = (1, 1);
    for (i, px) in c.image.chunks_exact(4).enumerate() {
        if px[3] != 0 {
            width = width.max(i % side + 1);
            height = height.max(i / side + 1);
        }
    }
    let mut bgra = Vec::with_capacity(width * height * 4);
    for row in c.image.chunks_exact(side * 4).take(height) {
        bgra.extend_from_slice(&row[..width * 4]);
    }
    CursorShape {
        hot_x: c.hot_x,
        hot_y: c.hot_y,
        width: width as u32,
        height: height as u32,
        bgra,
    }
}

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

/// Work for the input thread.
#[derive(Debug)]
enum VmmCommand {
    Input(InputDevice, Vec<EvdevEvent>),
    Display(u32, u32),
}

/// The VM's input devices as the stream server's input sink. Translation happens in the
/// caller; the HTTP requests run on a worker thread in arrival order, so a slow VMM delays
/// input but never the server's tasks. Failures are logged (the caller cannot act on them
/// later); a full queue is refused at once.
#[derive(Debug)]
pub struct VmInput {
    translator: Mutex<InputTranslator>,
    size: Arc<SharedSize>,
    tx: SyncSender<VmmCommand>,
}

impl VmInput {
    /// Starts the input thread for the VMM at `api_sock`; `size` is the matching frame
    /// source's [`VmFramebufferSource::shared_size`]. The thread ends when this is dropped.
    pub fn start(api_sock: &VmmSocket, size: Arc<SharedSize>) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(INPUT_QUEUE);
        let path = api_sock.clone();
        std::thread::Builder::new()
            .name("vm-input".into())
            .spawn(move || input_thread(&path, rx))
            .map_err(VmSourceError::Thread)?;
        Ok(Self {
            translator: Mutex::new(InputTranslator::new()),
            size,
            tx,
        })
    }

    fn send(&self, cmd: VmmCommand) -> Result<(), InputError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            TrySendError::Full(_) => InputError::Other("the VMM is not taking input".into()),
            TrySendError::Disconnected(_) => InputError::Closed,
        })
    }
}

impl InputSink for VmInput {
    fn inject(&self, events: &[InputEvent]) -> Result<(), InputError> {
        // Hold the translator lock while queueing so batches keep the order they were made in.
        let mut translator = self.translator.lock().expect("poisoned");
        for (device, batch) in translator.translate(events, self.size.get()) {
            self.send(VmmCommand::Input(device, batch))?;
        }
        Ok(())
    }

    fn request_resize(&self, width: u32, height: u32) -> Result<(), InputError> {
        let _order = self.translator.lock().expect("poisoned");
        self.send(VmmCommand::Display(width, height))
    }
}

fn input_thread(path: &VmmSocket, rx: Receiver<VmmCommand>) {
    let mut api: Option<VmmClient> = None;
    for cmd in rx {
        if api.is_none() {
            match VmmClient::connect(path, API_TIMEOUT) {
                Ok(a) => api = Some(a),
                Err(e) => {
                    warn!(error = %e, ?cmd, "VMM unreachable; input dropped");
                    continue;
                }
            }
        }
        let a = api.as_mut().expect("connected above");
        let request = match cmd {
            VmmCommand::Input(device, events) => Request::Input(InputBatch { device, events }),
            VmmCommand::Display(width, height) => Request::Display(DisplaySize { width, height }),
        };
        match a.send(&request) {
            Ok(()) => {}
            // The VMM refused this one request; the connection is still good.
            Err(e @ VmmClientError::Answer(ResponseError::Refused { .. })) => {
                warn!(error = %e, %request, "VMM refused input")
            }
            Err(e) => {
                warn!(error = %e, %request, "VMM API failed; reconnecting for the next input");
                api = None;
            }
        }
    }
    debug!(path = %path.path().display(), "vm input thread ends");
}

/// A running VM as a stream environment: its framebuffer and its input devices, both through
/// the control API at `api_sock`. Register it with
/// [`crate::stream::StreamServer::add_environment`].
pub fn environment(api_sock: &VmmSocket) -> Result<EnvironmentSource> {
    let frames = VmFramebufferSource::connect(api_sock)?;
    let input = VmInput::start(api_sock, frames.shared_size())?;
    Ok(EnvironmentSource {
        frames: Box::new(frames),
        input: Arc::new(input),
    })
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

    fn scanout(width: u32, height: u32) -> framebuffer::ScanoutConfig {
        framebuffer::ScanoutConfig {
            width,
            height,
            // Padded rows: the source must pass the stride on, not assume width * 4.
            stride: width * 4 + 64,
            offset_in_buffer: 0,
        }
    }

    #[test]
    fn source_follows_flushes_resizes_and_a_disabled_scanout() {
        use framebuffer::FramebufferWriter;
        let soon = || Instant::now() + Duration::from_secs(5);
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (64, 48)).unwrap();
        let size = source.shared_size();

        // Disabled scanout: one blank frame of the configured size, then nothing.
        assert_eq!(source.size(), (64, 48));
        let blank = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!(
            (blank.frame.width, blank.frame.height, blank.sequence),
            (64, 48, 1)
        );
        let quick = Instant::now() + Duration::from_millis(50);
        assert!(source.next_frame(quick).unwrap().is_none());

        // The guest sets a 32x16 scanout and flushes a rectangle.
        let buf = writer.alloc(((32 * 4 + 64) * 16) as usize).unwrap();
        writer.pixels_mut(&buf).fill(0x22);
        writer.set_scanout(Some((&buf, scanout(32, 16)))).unwrap();
        let first = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!((first.frame.width, first.frame.height), (32, 16));
        assert_eq!(first.frame.stride, 32 * 4 + 64);
        assert_eq!(first.damage, vec![Rect::new(0, 0, 32, 16)]);
        first.frame.validate().unwrap();
        assert!(first.frame.data[..32 * 4].iter().all(|&b| b == 0x22));
        assert_eq!(size.get(), (32, 16));
        let damage = framebuffer::Rect {
            x: 2,
            y: 3,
            width: 4,
            height: 5,
        };
        writer.flush(damage).unwrap();
        let flushed = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!(flushed.damage, vec![Rect::new(2, 3, 4, 5)]);
        assert_eq!(flushed.sequence, 3);

        // Resize: a new buffer, reported in full at its new size.
        let big = writer.alloc(((40 * 4 + 64) * 20) as usize).unwrap();
        writer.set_scanout(Some((&big, scanout(40, 20)))).unwrap();
        let resized = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!(resized.damage, vec![Rect::new(0, 0, 40, 20)]);
        assert_eq!(source.size(), (40, 20));

        // Disabled again: one blank frame of the last size.
        writer.set_scanout(None).unwrap();
        let blank = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!((blank.frame.width, blank.frame.height), (40, 20));
        assert!(blank.frame.data.iter().all(|&b| b == 0));
    }

    #[test]
    fn cursor_changes_end_the_frame_wait_and_send_the_image_only_when_it_changes() {
        use framebuffer::layout::{CURSOR_IMAGE_SIZE, CURSOR_SIDE};
        use framebuffer::FramebufferWriter;
        let soon = || Instant::now() + Duration::from_secs(5);
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (32, 16)).unwrap();
        let buf = writer.alloc(((32 * 4 + 64) * 16) as usize).unwrap();
        writer.set_scanout(Some((&buf, scanout(32, 16)))).unwrap();
        source.next_frame(soon()).unwrap().unwrap();
        let initial = source.cursor_update().expect("initial cursor state");
        assert!(!initial.visible);
        // A 5x3 opaque block at (2, 1) of the 64x64 image, hotspot on its corner.
        let mut image = vec![0u8; CURSOR_IMAGE_SIZE];
        for y in 1..4 {
            for x in 2..7 {
                let i = ((y * CURSOR_SIDE + x) * 4) as usize;
                image[i..i + 4].copy_from_slice(&[1, 2, 3, 255]);
            }
        }

        writer.set_cursor(&image, 2, 1, 10, 20).unwrap();
        let started = Instant::now();
        let waited = source
            .next_frame(started + Duration::from_secs(5))
            .unwrap()
            .map(|f| f.sequence);
        let woke_after = started.elapsed();
        let shown = source.cursor_update().expect("cursor shown");
        let unchanged = source.cursor_update();
        writer.move_cursor(30, 40, true);
        source.next_frame(soon()).unwrap();
        let moved = source.cursor_update().expect("cursor moved");
        // A guest re-sending the same image with a new position: only the position is news.
        writer.set_cursor(&image, 2, 1, 31, 41).unwrap();
        let resent = source.cursor_update().expect("cursor re-sent");
        writer.move_cursor(31, 41, false);
        let hidden = source.cursor_update().expect("cursor hidden");
        writer.flush(framebuffer::Rect {
            x: 0,
            y: 0,
            width: 4,
            height: 4,
        });
        let flushed = source.next_frame(soon()).unwrap().map(|f| f.damage);

        assert!(waited.is_none(), "the guest flushed nothing");
        assert!(
            woke_after < Duration::from_secs(4),
            "returned for the cursor, not at the deadline ({woke_after:?})"
        );
        assert_eq!((shown.x, shown.y, shown.visible), (10, 20, true));
        let shape = shown.image.expect("new shape is sent");
        assert_eq!(
            (shape.width, shape.height, shape.hot_x, shape.hot_y),
            (7, 4, 2, 1),
            "trimmed to the opaque pixels' right and bottom edges"
        );
        assert_eq!(shape.bgra.len(), 7 * 4 * 4);
        assert_eq!(&shape.bgra[..4], &[0, 0, 0, 0]);
        assert_eq!(&shape.bgra[(7 + 2) * 4..(7 + 3) * 4], &[1, 2, 3, 255]);
        assert_eq!(unchanged, None);
        assert_eq!(
            moved,
            CursorUpdate {
                x: 30,
                y: 40,
                visible: true,
                image: None
            }
        );
        assert_eq!((resent.x, resent.y, resent.image), (31, 41, None));
        assert!(!hidden.visible && hidden.image.is_none());
        assert_eq!(flushed, Some(vec![Rect::new(0, 0, 4, 4)]));
    }

    #[test]
    fn a_new_cursor_shape_is_sent_again() {
        use framebuffer::layout::CURSOR_IMAGE_SIZE;
        use framebuffer::FramebufferWriter;
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (32, 16)).unwrap();
        let arrow = vec![255u8; CURSOR_IMAGE_SIZE];
        writer.set_cursor(&arrow, 0, 0, 5, 5).unwrap();
        source.cursor_update().expect("first shape");

        writer.set_cursor(&arrow, 3, 3, 5, 5).unwrap();
        let new_hotspot = source.cursor_update().expect("hotspot changed");
        let mut beam = arrow.clone();
        beam[..4].copy_from_slice(&[9, 9, 9, 255]);
        writer.set_cursor(&beam, 3, 3, 5, 5).unwrap();
        let new_pixels = source.cursor_update().expect("pixels changed");

        let shape = new_hotspot.image.expect("sent for a new hotspot");
        assert_eq!((shape.width, shape.height, shape.hot_x), (64, 64, 3));
        assert_eq!(
            &new_pixels.image.expect("sent for new pixels").bgra[..4],
            &[9, 9, 9, 255]
        );
    }
}
