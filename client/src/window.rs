//! The desktop viewer: a winit window drawn with softbuffer, forwarding keyboard, mouse,
//! wheel and touch to the session.
//!
//! The session runs on a tokio runtime in a network thread; decoded frames reach the event
//! loop as user events, input goes back through the session's sender. Frames are scaled to
//! the window with aspect-preserving letterboxing (nearest neighbour); pointer positions are
//! mapped back through the same transform.
//!
//! The environment's pointer arrives separately from the video (`Cursor` messages) and is
//! drawn over the frame at its position, scaled like the frame; while the remote pointer is
//! visible the local one is hidden over the window, so there is one pointer on screen.
//!
//! Unless [`ViewerOptions::fixed_size`], the window asks the environment to take its size
//! ([`crate::resize`]: debounced, in physical pixels) and shows frames of whatever size
//! arrive letterboxed until they match. Unless clipboard sharing is off, the network thread
//! shares the host's clipboard with the environment ([`crate::clipboard`]) when the token
//! has the clipboard right.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use proto::stream::{
    Button, ClientMessage, CursorImage, InputEvent, Rights, StreamConfig, TouchPhase,
};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};
use winit::application::ApplicationHandler;
use winit::event::{ElementState, MouseButton, MouseScrollDelta, WindowEvent};
use winit::event_loop::{ActiveEventLoop, ControlFlow, EventLoop, EventLoopProxy};
use winit::keyboard::PhysicalKey;
use winit::window::{Window, WindowId};

use crate::clipboard::x11::HostClipboard;
use crate::clipboard::{classify_error, Feature, Refusal};
use crate::resize::ResizeRequests;
use crate::session::{ConnectOptions, Event, Frame, Session};
use crate::url::ConnectUrl;

/// How the viewer window behaves.
#[derive(Debug, Clone)]
pub struct ViewerOptions {
    /// Save every decoded frame as a PNG in this directory.
    pub dump: Option<PathBuf>,
    /// Share the clipboard both ways (only if the token has the clipboard right).
    pub clipboard: bool,
    /// Keep the environment's display size: frames are only scaled to the window, which
    /// never asks for a resize.
    pub fixed_size: bool,
}

impl Default for ViewerOptions {
    fn default() -> Self {
        Self {
            dump: None,
            clipboard: true,
            fixed_size: false,
        }
    }
}

/// Why the viewer window could not run.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("cannot open the display (is DISPLAY set?)")]
    EventLoop(#[from] winit::error::EventLoopError),
    #[error("session: {0}")]
    Session(String),
}

enum UserEvent {
    Connected {
        sender: UnboundedSender<ClientMessage>,
        rights: Rights,
        config: StreamConfig,
    },
    Config(StreamConfig),
    /// The server refuses resize requests for the rest of the session.
    ResizeRefused,
    Frame(Frame),
    Cursor {
        x: u16,
        y: u16,
        visible: bool,
        image: Option<CursorImage>,
    },
    Closed(String),
}

/// The environment's pointer as last reported: hotspot position in frame pixels and the
/// latest image (messages without one keep it).
#[derive(Debug, Clone, Default)]
pub struct RemoteCursor {
    pub x: u16,
    pub y: u16,
    pub visible: bool,
    pub image: Option<CursorImage>,
}

/// Alpha-blends `cursor` over a window buffer of `ww`x`wh` pixels (`0x00RRGGBB`) showing the
/// frame at `p`, scaled with the frame (nearest neighbour) and clipped to the window.
pub fn draw_cursor(buf: &mut [u32], ww: usize, wh: usize, p: Placement, cursor: &RemoteCursor) {
    let Some(img) = cursor.image.as_ref().filter(|_| cursor.visible) else {
        return;
    };
    let (w, h) = (i64::from(img.width), i64::from(img.height));
    if img.bgra.len() < (w * h * 4) as usize || buf.len() < ww * wh || p.scale <= 0.0 {
        return;
    }
    // The image's top-left in frame pixels, and the window pixels it covers.
    let fx0 = i64::from(cursor.x) - i64::from(img.hot_x);
    let fy0 = i64::from(cursor.y) - i64::from(img.hot_y);
    let to_window = |f: i64, origin: f64, limit: usize| {
        (origin + f as f64 * p.scale)
            .floor()
            .clamp(0.0, limit as f64) as usize
    };
    let (x_start, x_end) = (to_window(fx0, p.x0, ww), to_window(fx0 + w, p.x0, ww));
    let (y_start, y_end) = (to_window(fy0, p.y0, wh), to_window(fy0 + h, p.y0, wh));
    // Same window-to-frame mapping as the frame itself, so the pointer sits on its pixels.
    let image_index = |win: usize, origin: f64, first: i64, len: i64| {
        let i = ((win as f64 - origin) / p.scale).floor() as i64 - first;
        (0..len).contains(&i).then_some(i as usize)
    };
    for wy in y_start..y_end {
        let Some(iy) = image_index(wy, p.y0, fy0, h) else {
            continue;
        };
        for wx in x_start..x_end {
            let Some(ix) = image_index(wx, p.x0, fx0, w) else {
                continue;
            };
            let px = &img.bgra[(iy * img.width as usize + ix) * 4..][..4];
            let a = u32::from(px[3]);
            if a == 0 {
                continue;
            }
            let dst = &mut buf[wy * ww + wx];
            let blend = |src: u8, shift: u32| {
                let d = (*dst >> shift) & 0xff;
                ((u32::from(src) * a + d * (255 - a) + 127) / 255) << shift
            };
            *dst = blend(px[2], 16) | blend(px[1], 8) | blend(px[0], 0);
        }
    }
}

/// Draws `f` into a window buffer of `ww`x`wh` pixels (`0x00RRGGBB`): scaled to fit with its
/// aspect ratio kept (nearest neighbour), black bars around it. Frames of any size, so a
/// stream that changed size shows undistorted until the window matches it. Returns where
/// the frame went; `None` (buffer black) for a frame without pixels.
pub fn draw_frame(buf: &mut [u32], ww: usize, wh: usize, f: &Frame) -> Option<Placement> {
    buf.fill(0);
    let (fw, fh) = (f.width as usize, f.height as usize);
    if fw == 0 || fh == 0 || f.bgrx.len() != fw * fh * 4 || buf.len() < ww * wh {
        return None;
    }
    let p = placement(f.width, f.height, ww as u32, wh as u32);
    let x_start = p.x0.max(0.0) as usize;
    let y_start = p.y0.max(0.0) as usize;
    let x_end = ((p.x0 + fw as f64 * p.scale) as usize).min(ww);
    let y_end = ((p.y0 + fh as f64 * p.scale) as usize).min(wh);
    // Source columns once per frame.
    let cols: Vec<usize> = (x_start..x_end)
        .map(|x| (((x as f64 - p.x0) / p.scale) as usize).min(fw - 1))
        .collect();
    for y in y_start..y_end {
        let sy = (((y as f64 - p.y0) / p.scale) as usize).min(fh - 1);
        let src = &f.bgrx[sy * fw * 4..][..fw * 4];
        let dst = &mut buf[y * ww + x_start..y * ww + x_end];
        for (d, &sx) in dst.iter_mut().zip(&cols) {
            let px = &src[sx * 4..sx * 4 + 4];
            // softbuffer wants 0x00RRGGBB.
            *d = u32::from(px[2]) << 16 | u32::from(px[1]) << 8 | u32::from(px[0]);
        }
    }
    Some(p)
}

/// Where the frame lands in the window: offset and scale (letterboxed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub x0: f64,
    pub y0: f64,
    pub scale: f64,
}

/// Fits a `fw`x`fh` frame into a `ww`x`wh` window preserving aspect ratio.
pub fn placement(fw: u32, fh: u32, ww: u32, wh: u32) -> Placement {
    if fw == 0 || fh == 0 || ww == 0 || wh == 0 {
        return Placement {
            x0: 0.0,
            y0: 0.0,
            scale: 1.0,
        };
    }
    let scale = (f64::from(ww) / f64::from(fw)).min(f64::from(wh) / f64::from(fh));
    Placement {
        x0: (f64::from(ww) - f64::from(fw) * scale) / 2.0,
        y0: (f64::from(wh) - f64::from(fh) * scale) / 2.0,
        scale,
    }
}

/// Window position to frame pixel, clamped to the frame.
pub fn window_to_frame(p: Placement, fw: u32, fh: u32, x: f64, y: f64) -> (u16, u16) {
    let fx = ((x - p.x0) / p.scale).clamp(0.0, f64::from(fw.saturating_sub(1)));
    let fy = ((y - p.y0) / p.scale).clamp(0.0, f64::from(fh.saturating_sub(1)));
    (fx as u16, fy as u16)
}

struct App {
    proxy_closed: Option<String>,
    window: Option<Rc<Window>>,
    surface: Option<softbuffer::Surface<Rc<Window>, Rc<Window>>>,
    frame: Option<Frame>,
    cursor: Option<RemoteCursor>,
    sender: Option<UnboundedSender<ClientMessage>>,
    dump: Option<PathBuf>,
    /// `None` with a fixed size.
    resize: Option<ResizeRequests>,
}

impl App {
    fn send(&self, ev: InputEvent) {
        if let Some(s) = &self.sender {
            let _ = s.send(ClientMessage::Input(ev));
        }
    }

    fn frame_pos(&self, x: f64, y: f64) -> Option<(u16, u16)> {
        let (f, w) = (self.frame.as_ref()?, self.window.as_ref()?);
        let size = w.inner_size();
        let p = placement(f.width, f.height, size.width, size.height);
        Some(window_to_frame(p, f.width, f.height, x, y))
    }

    fn redraw(&mut self) {
        let (Some(window), Some(surface)) = (&self.window, &mut self.surface) else {
            return;
        };
        let size = window.inner_size();
        let (Some(w), Some(h)) = (NonZeroU32::new(size.width), NonZeroU32::new(size.height)) else {
            return;
        };
        if let Err(e) = surface.resize(w, h) {
            warn!(error = %e, "surface resize failed");
            return;
        }
        let mut buf = match surface.buffer_mut() {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "no surface buffer");
                return;
            }
        };
        let (ww, wh) = (size.width as usize, size.height as usize);
        if let Some(p) = self
            .frame
            .as_ref()
            .and_then(|f| draw_frame(&mut buf, ww, wh, f))
        {
            if let Some(cursor) = &self.cursor {
                draw_cursor(&mut buf, ww, wh, p, cursor);
            }
        }
        if let Err(e) = buf.present() {
            warn!(error = %e, "present failed");
        }
    }
}

impl ApplicationHandler<UserEvent> for App {
    fn resumed(&mut self, event_loop: &ActiveEventLoop) {
        if self.window.is_some() {
            return;
        }
        let attrs = Window::default_attributes()
            .with_title("genos-view")
            .with_inner_size(winit::dpi::LogicalSize::new(1280.0, 720.0));
        let window = match event_loop.create_window(attrs) {
            Ok(w) => Rc::new(w),
            Err(e) => {
                self.proxy_closed = Some(format!("cannot create window: {e}"));
                event_loop.exit();
                return;
            }
        };
        let surface = softbuffer::Context::new(window.clone())
            .and_then(|ctx| softbuffer::Surface::new(&ctx, window.clone()));
        match surface {
            Ok(s) => self.surface = Some(s),
            Err(e) => {
                self.proxy_closed = Some(format!("cannot create drawing surface: {e}"));
                event_loop.exit();
                return;
            }
        }
        // The window's first size counts as a change: the environment is asked to take it.
        if let Some(r) = &mut self.resize {
            let size = window.inner_size();
            r.window_resized(size.width, size.height, Instant::now());
        }
        self.window = Some(window);
    }

    fn user_event(&mut self, event_loop: &ActiveEventLoop, event: UserEvent) {
        match event {
            UserEvent::Connected {
                sender,
                rights,
                config,
            } => {
                self.sender = Some(sender);
                if let Some(r) = &mut self.resize {
                    r.stream_resized(config.width, config.height);
                    if rights.contains(Rights::INPUT) {
                        r.enable();
                    } else {
                        info!("the token has no input right: the window will not resize the environment");
                    }
                }
            }
            UserEvent::Config(c) => {
                if let Some(r) = &mut self.resize {
                    r.stream_resized(c.width, c.height);
                }
            }
            UserEvent::ResizeRefused => {
                if let Some(r) = &mut self.resize {
                    r.disable();
                }
            }
            UserEvent::Frame(f) => {
                if let Some(dir) = &self.dump {
                    let path = dir.join(format!("frame-{:06}.png", f.sequence));
                    if let Err(e) = crate::dump::save_png(&path, &f) {
                        warn!(error = %e, "dump failed");
                    }
                }
                if let Some(w) = &self.window {
                    let size = self.frame.as_ref().map(|p| (p.width, p.height));
                    if size != Some((f.width, f.height)) {
                        w.set_title(&format!("genos-view {}x{}", f.width, f.height));
                    }
                    w.request_redraw();
                }
                self.frame = Some(f);
            }
            UserEvent::Cursor {
                x,
                y,
                visible,
                image,
            } => {
                let cursor = self.cursor.get_or_insert_with(RemoteCursor::default);
                (cursor.x, cursor.y, cursor.visible) = (x, y, visible);
                if image.is_some() {
                    cursor.image = image;
                }
                if let Some(w) = &self.window {
                    w.set_cursor_visible(!(visible && cursor.image.is_some()));
                    w.request_redraw();
                }
            }
            UserEvent::Closed(reason) => {
                self.proxy_closed = Some(reason);
                event_loop.exit();
            }
        }
    }

    fn window_event(&mut self, event_loop: &ActiveEventLoop, _id: WindowId, event: WindowEvent) {
        match event {
            WindowEvent::CloseRequested => event_loop.exit(),
            WindowEvent::RedrawRequested => self.redraw(),
            WindowEvent::Resized(size) => {
                if let Some(r) = &mut self.resize {
                    r.window_resized(size.width, size.height, Instant::now());
                }
                if let Some(w) = &self.window {
                    w.request_redraw();
                }
            }
            WindowEvent::KeyboardInput { event, .. } => {
                if event.repeat {
                    return; // the guest's own autorepeat handles held keys
                }
                if let PhysicalKey::Code(k) = event.physical_key {
                    if let Some(code) = crate::keymap::evdev_code(k) {
                        self.send(InputEvent::Key {
                            code,
                            pressed: event.state == ElementState::Pressed,
                        });
                    }
                }
            }
            WindowEvent::CursorMoved { position, .. } => {
                if let Some((x, y)) = self.frame_pos(position.x, position.y) {
                    self.send(InputEvent::PointerMove { x, y });
                }
            }
            WindowEvent::MouseInput { state, button, .. } => {
                let button = match button {
                    MouseButton::Left => Button::Left,
                    MouseButton::Middle => Button::Middle,
                    MouseButton::Right => Button::Right,
                    MouseButton::Back => Button::Back,
                    MouseButton::Forward => Button::Forward,
                    MouseButton::Other(_) => return,
                };
                self.send(InputEvent::PointerButton {
                    button,
                    pressed: state == ElementState::Pressed,
                });
            }
            WindowEvent::MouseWheel { delta, .. } => {
                // winit: positive y scrolls up; the protocol: positive dy scrolls down.
                let (dx, dy) = match delta {
                    MouseScrollDelta::LineDelta(x, y) => (x * 120.0, -y * 120.0),
                    // About 40 px per notch, as most toolkits assume.
                    MouseScrollDelta::PixelDelta(p) => (p.x as f32 * 3.0, -p.y as f32 * 3.0),
                };
                let clamp = |v: f32| v.clamp(f32::from(i16::MIN), f32::from(i16::MAX)) as i16;
                self.send(InputEvent::Wheel {
                    dx: clamp(dx),
                    dy: clamp(dy),
                });
            }
            WindowEvent::Touch(t) => {
                let phase = match t.phase {
                    winit::event::TouchPhase::Started => TouchPhase::Start,
                    winit::event::TouchPhase::Moved => TouchPhase::Move,
                    winit::event::TouchPhase::Ended => TouchPhase::End,
                    winit::event::TouchPhase::Cancelled => TouchPhase::Cancel,
                };
                if let Some((x, y)) = self.frame_pos(t.location.x, t.location.y) {
                    self.send(InputEvent::Touch {
                        id: (t.id % 256) as u8,
                        phase,
                        x,
                        y,
                    });
                }
            }
            _ => {}
        }
    }

    fn about_to_wait(&mut self, event_loop: &ActiveEventLoop) {
        let Some(r) = &mut self.resize else {
            return;
        };
        if let Some((width, height)) = r.poll(Instant::now()) {
            debug!(width, height, "asking the environment to resize");
            if let Some(s) = &self.sender {
                let _ = s.send(ClientMessage::Resize { width, height });
            }
        }
        event_loop.set_control_flow(match r.deadline() {
            Some(at) => ControlFlow::WaitUntil(at),
            None => ControlFlow::Wait,
        });
    }
}

/// The host clipboard shared with `session`, if `wanted` and its token allows it.
fn share_clipboard(session: &Session, wanted: bool) -> Option<HostClipboard> {
    if !wanted {
        return None;
    }
    if !session.rights().contains(Rights::CLIPBOARD) {
        info!("the token has no clipboard right: the clipboard is not shared");
        return None;
    }
    match HostClipboard::start(session.sender()) {
        Ok(c) => Some(c),
        Err(e) => {
            warn!("the clipboard is not shared: {}", crate::error_chain(&e));
            None
        }
    }
}

fn network_thread(url: ConnectUrl, proxy: EventLoopProxy<UserEvent>, clipboard: bool) {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = proxy.send_event(UserEvent::Closed(format!("tokio runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let mut session = match Session::connect(&url, ConnectOptions::default()).await {
            Ok(s) => s,
            Err(e) => {
                let _ = proxy.send_event(UserEvent::Closed(e.to_string()));
                return;
            }
        };
        let connected = UserEvent::Connected {
            sender: session.sender(),
            rights: session.rights(),
            config: session.config(),
        };
        if proxy.send_event(connected).is_err() {
            return;
        }
        let host_clipboard = share_clipboard(&session, clipboard);
        while let Some(ev) = session.next_event().await {
            let sent = match ev {
                Event::Frame(f) => proxy.send_event(UserEvent::Frame(f)),
                Event::Config(c) => proxy.send_event(UserEvent::Config(c)),
                Event::Clipboard(text) => {
                    if let Some(c) = &host_clipboard {
                        c.set_from_environment(text);
                    }
                    Ok(())
                }
                Event::Cursor {
                    x,
                    y,
                    visible,
                    image,
                } => proxy.send_event(UserEvent::Cursor {
                    x,
                    y,
                    visible,
                    image,
                }),
                Event::Closed(r) => {
                    let _ = proxy.send_event(UserEvent::Closed(r));
                    return;
                }
                Event::Error { code, message } if code.is_fatal() => {
                    let _ = proxy.send_event(UserEvent::Closed(message));
                    return;
                }
                Event::Error { code, message } => {
                    warn!("{message}");
                    let refusal = classify_error(code, &message);
                    let (clip, resize) = match refusal {
                        Some(Refusal::Denied(Feature::Clipboard)) => (true, false),
                        Some(Refusal::Denied(Feature::Resize)) => (false, true),
                        Some(Refusal::Expiring) => (true, true),
                        Some(Refusal::Unavailable(_)) | None => (false, false),
                    };
                    if let (true, Some(c)) = (clip, &host_clipboard) {
                        c.refuse();
                    }
                    if resize {
                        proxy.send_event(UserEvent::ResizeRefused)
                    } else {
                        Ok(())
                    }
                }
                _ => Ok(()),
            };
            if sent.is_err() {
                break; // window closed
            }
        }
        drop(host_clipboard);
        session.close().await;
    });
}

/// Opens the viewer window on `url` and runs until it is closed or the session ends.
pub fn run(url: ConnectUrl, opts: ViewerOptions) -> Result<(), WindowError> {
    let event_loop = EventLoop::<UserEvent>::with_user_event().build()?;
    let proxy = event_loop.create_proxy();
    let clipboard = opts.clipboard;
    let net = std::thread::Builder::new()
        .name("genos-view-net".into())
        .spawn(move || network_thread(url, proxy, clipboard))
        .map_err(|e| WindowError::Session(e.to_string()))?;
    let mut app = App {
        proxy_closed: None,
        window: None,
        surface: None,
        frame: None,
        cursor: None,
        sender: None,
        dump: opts.dump,
        resize: (!opts.fixed_size).then(ResizeRequests::default),
    };
    event_loop.run_app(&mut app)?;
    drop(app.sender.take());
    // The network thread ends when the event loop's proxy is gone; don't hang on it.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while !net.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    match app.proxy_closed {
        Some(reason) => Err(WindowError::Session(reason)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_letterboxes_and_maps_back() {
        let p = placement(1920, 1080, 1000, 1000);
        assert!((p.scale - 1000.0 / 1920.0).abs() < 1e-9);
        assert!(p.x0.abs() < 1e-9);
        assert!(p.y0 > 0.0);
        assert_eq!(window_to_frame(p, 1920, 1080, 500.0, 500.0), (960, 540));
        // Outside the picture clamps to its edge.
        assert_eq!(window_to_frame(p, 1920, 1080, -5.0, 0.0), (0, 0));
        assert_eq!(window_to_frame(p, 1920, 1080, 2000.0, 2000.0), (1919, 1079));
    }

    /// A `w`x`h` frame whose pixel (x, y) is 0x00RRGGBB = (x + 1) << 16 | (y + 1).
    fn numbered_frame(w: u32, h: u32) -> Frame {
        let mut bgrx = Vec::new();
        for y in 0..h {
            for x in 0..w {
                bgrx.extend_from_slice(&[y as u8 + 1, 0, x as u8 + 1, 0]);
            }
        }
        Frame {
            sequence: 1,
            keyframe: true,
            width: w,
            height: h,
            bgrx,
            encoded_bytes: 0,
            capture_time_us: 0,
            latency: Duration::ZERO,
            decode_time: Duration::ZERO,
        }
    }

    fn pixel(x: u32, y: u32) -> u32 {
        (x + 1) << 16 | (y + 1)
    }

    #[test]
    fn frames_of_another_shape_are_letterboxed_with_square_pixels() {
        let (ww, wh) = (8usize, 8usize);
        let mut wide = vec![7u32; ww * wh];
        let mut tall = vec![7u32; ww * wh];

        // The stream went from 4x2 to 2x4 while the window stayed 8x8.
        let pw = draw_frame(&mut wide, ww, wh, &numbered_frame(4, 2));
        let pt = draw_frame(&mut tall, ww, wh, &numbered_frame(2, 4));

        assert_eq!(pw.map(|p| (p.x0, p.y0, p.scale)), Some((0.0, 2.0, 2.0)));
        assert_eq!(pt.map(|p| (p.x0, p.y0, p.scale)), Some((2.0, 0.0, 2.0)));
        for y in 0..wh {
            for x in 0..ww {
                let (fx, fy) = (x as u32 / 2, y as u32 / 2);
                let expected_wide = if (2..6).contains(&y) {
                    pixel(fx, fy - 1)
                } else {
                    0
                };
                let expected_tall = if (2..6).contains(&x) {
                    pixel(fx - 1, fy)
                } else {
                    0
                };
                assert_eq!(wide[y * ww + x], expected_wide, "wide ({x}, {y})");
                assert_eq!(tall[y * ww + x], expected_tall, "tall ({x}, {y})");
            }
        }
    }

    #[test]
    fn a_frame_the_size_of_the_window_is_drawn_one_to_one() {
        let mut buf = vec![0u32; 6 * 4];

        let p = draw_frame(&mut buf, 6, 4, &numbered_frame(6, 4));

        assert_eq!(p.map(|p| p.scale), Some(1.0));
        for y in 0..4 {
            for x in 0..6 {
                assert_eq!(buf[y * 6 + x], pixel(x as u32, y as u32));
            }
        }
    }

    #[test]
    fn a_frame_without_pixels_leaves_the_window_black() {
        let mut buf = vec![7u32; 16];
        let mut empty = numbered_frame(4, 4);
        empty.bgrx.clear();

        let p = draw_frame(&mut buf, 4, 4, &empty);

        assert_eq!(p, None);
        assert!(buf.iter().all(|&px| px == 0));
    }

    /// A 2x2 cursor: opaque red, transparent, half-transparent white, opaque green.
    fn cursor_at(x: u16, y: u16) -> RemoteCursor {
        RemoteCursor {
            x,
            y,
            visible: true,
            image: Some(CursorImage {
                hot_x: 1,
                hot_y: 1,
                width: 2,
                height: 2,
                bgra: vec![
                    0, 0, 255, 255, 9, 9, 9, 0, 255, 255, 255, 128, 0, 255, 0, 255,
                ],
            }),
        }
    }

    #[test]
    fn cursor_is_blended_with_its_hotspot_at_the_position() {
        let mut buf = vec![0u32; 8 * 8];
        let p = placement(8, 8, 8, 8);

        draw_cursor(&mut buf, 8, 8, p, &cursor_at(3, 4));

        assert_eq!(buf[3 * 8 + 2], 0xff0000, "red at the top-left");
        assert_eq!(buf[3 * 8 + 3], 0, "transparent pixels leave the frame");
        assert_eq!(buf[4 * 8 + 2], 0x808080, "half white over black");
        assert_eq!(buf[4 * 8 + 3], 0x00ff00);
        assert_eq!(buf.iter().filter(|&&px| px != 0).count(), 3);
    }

    #[test]
    fn cursor_scales_with_the_frame_and_is_clipped_to_the_window() {
        let p = placement(4, 4, 8, 8); // scale 2
        let mut scaled = vec![0u32; 8 * 8];
        let mut clipped = vec![0u32; 8 * 8];
        let mut hidden = vec![0u32; 8 * 8];

        draw_cursor(&mut scaled, 8, 8, p, &cursor_at(2, 2));
        draw_cursor(&mut clipped, 8, 8, p, &cursor_at(0, 0));
        let invisible = RemoteCursor {
            visible: false,
            ..cursor_at(2, 2)
        };
        draw_cursor(&mut hidden, 8, 8, p, &invisible);

        // Frame pixel (1, 1) is window pixels (2..4, 2..4).
        for (x, y) in [(2, 2), (3, 2), (2, 3), (3, 3)] {
            assert_eq!(scaled[y * 8 + x], 0xff0000, "({x}, {y})");
        }
        assert_eq!(scaled[5 * 8 + 5], 0x00ff00);
        assert_eq!(scaled.iter().filter(|&&px| px != 0).count(), 12);
        // Hotspot at the corner: only the bottom-right (green) pixel is on screen.
        assert_eq!(clipped.iter().filter(|&&px| px == 0x00ff00).count(), 4);
        assert_eq!(clipped.iter().filter(|&&px| px != 0).count(), 4);
        assert!(hidden.iter().all(|&px| px == 0));
    }
}
