//! End to end on loopback: the source's pointer reaches viewers as Cursor messages, apart
//! from the video (synthetic source → hostd stream server → client library).

mod support;

use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{ConnectOptions, ConnectUrl, Event, Session};
use encoder::{CursorUpdate, FrameSource, SourceError, SourceFrame};
use hostd::stream::{source, RecordingInput, ServerConfig, StreamServer};
use proto::stream::{CursorImage, Rights};
use scenes::{arrow_cursor, Scene, SyntheticSource};

const ENV: &str = "env-cursor";

/// A Cursor message as the client reports it.
#[derive(Debug, Clone)]
struct CursorEvent {
    x: u16,
    y: u16,
    visible: bool,
    image: Option<CursorImage>,
}

fn serve(scene: Scene, w: u32, h: u32, fps: f32) -> (StreamServer, ConnectUrl) {
    let (src, _input) = source::synthetic(scene, w, h, fps);
    serve_source(src, fps)
}

fn serve_source(src: source::EnvironmentSource, fps: f32) -> (StreamServer, ConnectUrl) {
    let env = hostd::stream::EnvRef::new(ENV, 1);
    let (server, tokens) = support::serve(ServerConfig::default(), &env, src, fps);
    let token = tokens.issue(&env, Rights::VIEW, support::HOUR).unwrap();
    let url = server.connect_url(ENV, &token).unwrap().parse().unwrap();
    (server, url)
}

/// The next Cursor event, skipping frames and other events.
async fn next_cursor(s: &mut Session) -> CursorEvent {
    support::next_event(s, 10, "cursor message", |e| match e {
        Event::Cursor {
            x,
            y,
            visible,
            image,
        } => Some(CursorEvent {
            x,
            y,
            visible,
            image,
        }),
        _ => None,
    })
    .await
}

/// The synthetic arrow as the wire carries it.
fn wire_arrow() -> CursorImage {
    let a = arrow_cursor();
    CursorImage {
        hot_x: a.hot_x as u16,
        hot_y: a.hot_y as u16,
        width: a.width as u16,
        height: a.height as u16,
        bgra: a.bgra,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_gets_the_cursor_image_once_then_positions_in_source_order() {
    let (w, h, fps) = (160, 120, 30.0);
    let (_server, url) = serve(Scene::Windows, w, h, fps);
    // The pointer's path, frame by frame (index 0: before the first frame).
    let mut replica = SyntheticSource::new(Scene::Windows, w, h, fps);
    let mut path = vec![replica.pointer()];
    for _ in 0..3000 {
        replica.advance();
        path.push(replica.pointer());
    }

    let mut s = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let mut received = Vec::new();
    for _ in 0..25 {
        received.push(next_cursor(&mut s).await);
    }
    s.close().await;

    assert_eq!(
        received[0].image,
        Some(wire_arrow()),
        "the image comes first"
    );
    assert!(
        received[1..].iter().all(|c| c.image.is_none()),
        "the unchanged image is not sent again"
    );
    assert!(received.iter().all(|c| c.visible));
    let mut at = 0;
    for c in &received {
        let pos = (i32::from(c.x), i32::from(c.y));
        let found = path[at..].iter().position(|&p| p == pos);
        at += found.unwrap_or_else(|| {
            panic!("{pos:?} is not on the source's path from frame {at} on: {received:?}")
        });
    }
    let mut distinct: Vec<_> = received.iter().map(|c| (c.x, c.y)).collect();
    distinct.dedup();
    assert!(distinct.len() >= 20, "the pointer moves: {distinct:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_joining_later_gets_the_current_cursor_at_once() {
    // On a still desktop the pointer never moves: a late viewer learns of it only if the
    // server sends the current state on join.
    let (w, h, fps) = (160, 120, 30.0);
    let (_server, url) = serve(Scene::Still, w, h, fps);
    let mut first = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let seen_first = next_cursor(&mut first).await;

    let mut late = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let seen_late = next_cursor(&mut late).await;
    late.close().await;
    first.close().await;

    let centre = ((w / 2) as u16, (h / 2) as u16);
    assert_eq!((seen_first.x, seen_first.y), centre);
    assert_eq!((seen_late.x, seen_late.y), centre);
    assert!(seen_late.visible);
    assert_eq!(seen_late.image, Some(wire_arrow()));
}

/// One black picture, then only pointer moves sent by the test, each reported on its own and
/// without any frame damage (like a VM whose guest only moves the mouse).
struct PointerOnly {
    pixels: Vec<u8>,
    frame_sent: bool,
    moves: std_mpsc::Receiver<(i32, i32)>,
    pending: Option<(i32, i32)>,
    image_sent: bool,
}

impl PointerOnly {
    fn start() -> (source::EnvironmentSource, std_mpsc::Sender<(i32, i32)>) {
        let (tx, moves) = std_mpsc::channel();
        let frames = PointerOnly {
            pixels: vec![0; 64 * 48 * 4],
            frame_sent: false,
            moves,
            pending: None,
            image_sent: false,
        };
        let src = source::EnvironmentSource {
            frames: Box::new(frames),
            input: Arc::new(RecordingInput::default()),
        };
        (src, tx)
    }
}

impl FrameSource for PointerOnly {
    fn size(&self) -> (u32, u32) {
        (64, 48)
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if !self.frame_sent {
            self.frame_sent = true;
            return Ok(Some(SourceFrame {
                frame: encoder::FrameRef::packed(64, 48, encoder::PixelFormat::Bgrx, &self.pixels),
                damage: vec![encoder::Rect::new(0, 0, 64, 48)],
                captured_at: Instant::now(),
            }));
        }
        if self.pending.is_none() {
            let wait = deadline.saturating_duration_since(Instant::now());
            self.pending = self.moves.recv_timeout(wait).ok();
        }
        Ok(None)
    }

    fn cursor_update(&mut self) -> Option<CursorUpdate> {
        let (x, y) = self.pending.take()?;
        let image = (!self.image_sent).then(arrow_cursor);
        self.image_sent = true;
        Some(CursorUpdate {
            x,
            y,
            visible: true,
            image,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pointer_moves_without_frames_reach_the_viewer_in_order() {
    let (src, moves) = PointerOnly::start();
    let (_server, url) = serve_source(src, 30.0);
    let mut s = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    moves.send((1, 1)).unwrap();
    let first = next_cursor(&mut s).await;

    let sent: Vec<(u16, u16)> = (2..12).map(|i| (i * 5, i * 3)).collect();
    let mut received = Vec::new();
    for &(x, y) in &sent {
        moves.send((i32::from(x), i32::from(y))).unwrap();
        // Slower than the frame interval: no reason to coalesce these.
        let c = next_cursor(&mut s).await;
        received.push((c.x, c.y, c.image.is_some()));
    }
    s.close().await;

    assert_eq!((first.x, first.y, first.image), (1, 1, Some(wire_arrow())));
    let want: Vec<_> = sent.iter().map(|&(x, y)| (x, y, false)).collect();
    assert_eq!(received, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_pointer_moves_are_coalesced_to_one_per_frame_interval() {
    let fps = 30.0;
    let (src, moves) = PointerOnly::start();
    let (_server, url) = serve_source(src, fps);
    let mut s = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    moves.send((0, 0)).unwrap();
    next_cursor(&mut s).await;

    // 300 distinct moves, one every 2 ms (15 per frame interval), each reported on its own.
    let last = (300 % 64, 300 / 8);
    let mover = std::thread::spawn(move || {
        for i in 1..=300 {
            moves.send((i % 64, i / 8)).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        moves
    });
    let mut received = Vec::new();
    let started = Instant::now();
    loop {
        let c = next_cursor(&mut s).await;
        received.push((c.x, c.y));
        if (i32::from(c.x), i32::from(c.y)) == last {
            break;
        }
    }
    let span = started.elapsed();
    drop(mover.join().unwrap());
    s.close().await;

    // At most one message per frame interval (plus slack for network jitter), whatever
    // the source's rate; the newest position is never lost.
    let allowed = (span.as_secs_f64() * f64::from(fps)).ceil() as usize + 3;
    assert!(
        received.len() <= allowed,
        "{} messages in {span:?} (at most {allowed})",
        received.len()
    );
    assert_eq!(received.last().map(|&(x, y)| (x, y)), Some((44, 37)));
}
