//! The desktop viewer: a winit window drawn with softbuffer, forwarding keyboard, mouse,
//! wheel and touch to the session.
//!
//! The session runs on a tokio runtime in a network thread; decoded frames reach the event
//! loop as user events, input goes back through the session's sender. Frames are scaled to
//! the window with aspect-preserving letterboxing (nearest neighbour); pointer positions are
//! mapped back through the same transform.

use std::num::NonZeroU32;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use proto::stream::{Button, ClientMessage, InputEvent, TouchPhase};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;
use winit::application::ApplicationHandler;
use winit::event::{ElementState, MouseButton, MouseScrollDelta, WindowEvent};
use winit::event_loop::{ActiveEventLoop, EventLoop, EventLoopProxy};
use winit::keyboard::PhysicalKey;
use winit::window::{Window, WindowId};

use crate::session::{ConnectOptions, Event, Frame, Session};
use crate::url::ConnectUrl;

/// Why the viewer window could not run.
#[derive(Debug, thiserror::Error)]
pub enum WindowError {
    #[error("cannot open the display (is DISPLAY set?)")]
    EventLoop(#[from] winit::error::EventLoopError),
    #[error("session: {0}")]
    Session(String),
}

enum UserEvent {
    Connected(UnboundedSender<ClientMessage>),
    Frame(Frame),
    Closed(String),
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
    sender: Option<UnboundedSender<ClientMessage>>,
    dump: Option<PathBuf>,
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
        buf.fill(0);
        if let Some(f) = &self.frame {
            if f.bgrx.len() == f.width as usize * f.height as usize * 4 {
                let p = placement(f.width, f.height, size.width, size.height);
                let (ww, wh) = (size.width as usize, size.height as usize);
                let x_start = p.x0.max(0.0) as usize;
                let y_start = p.y0.max(0.0) as usize;
                let x_end = ((p.x0 + f64::from(f.width) * p.scale) as usize).min(ww);
                let y_end = ((p.y0 + f64::from(f.height) * p.scale) as usize).min(wh);
                // Precompute source columns once per redraw.
                let cols: Vec<usize> = (x_start..x_end)
                    .map(|x| (((x as f64 - p.x0) / p.scale) as usize).min(f.width as usize - 1))
                    .collect();
                for y in y_start..y_end {
                    let sy = (((y as f64 - p.y0) / p.scale) as usize).min(f.height as usize - 1);
                    let src = &f.bgrx[sy * f.width as usize * 4..][..f.width as usize * 4];
                    let dst = &mut buf[y * ww + x_start..y * ww + x_end];
                    for (d, &sx) in dst.iter_mut().zip(&cols) {
                        let px = &src[sx * 4..sx * 4 + 4];
                        // softbuffer wants 0x00RRGGBB.
                        *d = u32::from(px[2]) << 16 | u32::from(px[1]) << 8 | u32::from(px[0]);
                    }
                }
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
        self.window = Some(window);
    }

    fn user_event(&mut self, event_loop: &ActiveEventLoop, event: UserEvent) {
        match event {
            UserEvent::Connected(s) => self.sender = Some(s),
            UserEvent::Frame(f) => {
                if let Some(dir) = &self.dump {
                    let path = dir.join(format!("frame-{:06}.png", f.sequence));
                    if let Err(e) = crate::dump::save_png(&path, &f) {
                        warn!(error = %e, "dump failed");
                    }
                }
                if let Some(w) = &self.window {
                    if self.frame.is_none() {
                        w.set_title(&format!("genos-view {}x{}", f.width, f.height));
                    }
                    w.request_redraw();
                }
                self.frame = Some(f);
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
            WindowEvent::Resized(_) => {
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
}

fn network_thread(url: ConnectUrl, proxy: EventLoopProxy<UserEvent>) {
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
        if proxy
            .send_event(UserEvent::Connected(session.sender()))
            .is_err()
        {
            return;
        }
        while let Some(ev) = session.next_event().await {
            let sent = match ev {
                Event::Frame(f) => proxy.send_event(UserEvent::Frame(f)),
                Event::Closed(r) => {
                    let _ = proxy.send_event(UserEvent::Closed(r));
                    return;
                }
                Event::Error { code, message } if code.is_fatal() => {
                    let _ = proxy.send_event(UserEvent::Closed(message));
                    return;
                }
                Event::Error { message, .. } => {
                    warn!("{message}");
                    Ok(())
                }
                _ => Ok(()),
            };
            if sent.is_err() {
                break; // window closed
            }
        }
        session.close().await;
    });
}

/// Opens the viewer window on `url` and runs until it is closed or the session ends.
pub fn run(url: ConnectUrl, dump: Option<PathBuf>) -> Result<(), WindowError> {
    let event_loop = EventLoop::<UserEvent>::with_user_event().build()?;
    let proxy = event_loop.create_proxy();
    let net = std::thread::Builder::new()
        .name("genos-view-net".into())
        .spawn(move || network_thread(url, proxy))
        .map_err(|e| WindowError::Session(e.to_string()))?;
    let mut app = App {
        proxy_closed: None,
        window: None,
        surface: None,
        frame: None,
        sender: None,
        dump,
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
}
