//! End to end on loopback: synthetic source → hostd stream server → client library.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{ClientError, ConnectOptions, ConnectUrl, Session, StatsCollector};
use hostd::stream::source::{self, RecordingInput};
use hostd::stream::{EnvRef, ServerConfig, TokenKey};
use proto::stream::{Button, ClientMessage, ErrorCode, InputEvent, Message, Rights, TouchPhase};
use scenes::{Scene, SyntheticSource};
use support::{next_frame, refused, Harness, HOUR};

const ENV: &str = "env-test";

/// The streamed environment: name `ENV`, store id 1.
fn env() -> EnvRef {
    EnvRef::new(ENV, 1)
}

/// A stream server (`cfg`) serving the synthetic `scene` as [`env`].
fn start(cfg: ServerConfig, scene: Scene, w: u32, h: u32, fps: f32) -> Harness {
    support::start(cfg, &env(), scene, w, h, fps)
}
async fn wait_for_events(input: &RecordingInput, n: usize) -> Vec<InputEvent> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ev = input.events();
        if ev.len() >= n || Instant::now() > deadline {
            return ev;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_frames_match_their_own_source_frame_above_34_db() {
    let (w, h, fps) = (320, 240, 30.0);
    let hx = start(ServerConfig::default(), Scene::Windows, w, h, fps);
    let mut s = Session::connect(&hx.url(&env(), Rights::VIEW), ConnectOptions::default())
        .await
        .unwrap();
    let mut replica = SyntheticSource::new(Scene::Windows, w, h, fps);
    let mut checked = 0;
    while checked < 20 {
        let f = next_frame(&mut s).await;
        assert_eq!((f.width, f.height), (w, h));
        // Encoded frame k is source frame k: the scene changes every frame and the source
        // starts when the first viewer joins.
        let expected = loop {
            let data = replica.advance().frame.data.to_vec();
            if replica.rendered() == f.sequence {
                break data;
            }
            assert!(
                replica.rendered() < f.sequence,
                "replica overtook the stream"
            );
        };
        // This scene decodes at 35-37 dB; a neighbouring source frame scores 15-19 dB, so
        // the bar tells the right frame from a wrong one with a wide margin (the encoder's
        // quality itself is measured by scripts/bench-encoder).
        let psnr = encoder::psnr_bgrx(&f.bgrx, &expected, w, h);
        assert!(psnr >= 34.0, "frame {} PSNR {psnr:.1} dB", f.sequence);
        checked += 1;
    }
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_events_arrive_at_the_source_in_order() {
    let hx = start(ServerConfig::default(), Scene::Still, 320, 240, 30.0);
    let s = Session::connect(
        &hx.url(&env(), Rights::VIEW | Rights::INPUT),
        ConnectOptions::default(),
    )
    .await
    .unwrap();
    let mut sent = Vec::new();
    for i in 0..200u16 {
        let ev = match i % 5 {
            0 => InputEvent::Key {
                code: 30 + i % 20,
                pressed: i % 2 == 0,
            },
            1 => InputEvent::PointerMove {
                x: i % 320,
                y: (i * 7) % 240,
            },
            2 => InputEvent::PointerButton {
                button: Button::Left,
                pressed: i % 2 == 1,
            },
            3 => InputEvent::Wheel {
                dx: 0,
                dy: i as i16 - 100,
            },
            _ => InputEvent::Touch {
                id: (i % 3) as u8,
                phase: TouchPhase::Move,
                x: i % 320,
                y: i % 240,
            },
        };
        s.send_input(ev);
        sent.push(ev);
    }
    let got = wait_for_events(&hx.input, sent.len()).await;
    assert_eq!(got, sent);
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificate_fingerprint_is_refused() {
    let hx = start(ServerConfig::default(), Scene::Still, 64, 64, 10.0);
    let mut url = hx.url(&env(), Rights::VIEW);
    url.cert_sha256[0] ^= 0xff;
    let err = Session::connect(&url, ConnectOptions::default())
        .await
        .err()
        .expect("connection with a wrong pin must fail");
    match err {
        ClientError::CertificateMismatch { expected, actual } => {
            assert_ne!(expected, actual);
            assert_eq!(actual, hx.server.fingerprint());
        }
        other => panic!("expected CertificateMismatch, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_token_is_refused() {
    let hx = start(ServerConfig::default(), Scene::Still, 64, 64, 10.0);
    let token = hx
        .tokens
        .issue_expiring_at(&env(), Rights::VIEW, support::now_unix() - 10)
        .unwrap();

    let (code, message) = refused(&hx.url_with_token(ENV, &token)).await;

    assert_eq!(code, ErrorCode::TokenExpired);
    assert!(message.contains("expired"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_token_is_refused() {
    let hx = start(ServerConfig::default(), Scene::Still, 64, 64, 10.0);
    let forged = TokenKey::generate()
        .unwrap()
        .issue(&env(), Rights::all(), HOUR)
        .unwrap();

    let (code, message) = refused(&hx.url_with_token(ENV, &forged)).await;

    assert_eq!(code, ErrorCode::TokenForged);
    assert!(message.contains("signature"), "{message}");
}

/// A viewer that authenticates and then never reads a frame: the slowest possible link.
async fn stalled_viewer(url: &ConnectUrl) -> (quinn::Endpoint, quinn::Connection) {
    let mut cfg = support::quic_client_config(url);
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(2u32.into());
    cfg.transport_config(Arc::new(t));
    let (ep, conn) = support::raw_connection(url, cfg).await;
    let (mut send, recv) = conn.open_bi().await.unwrap();
    let hello = ClientMessage::Hello {
        min_version: 1,
        max_version: 1,
        env_id: url.env_id.clone(),
        token: url.token.clone(),
        resume: [0; 16],
        viewport_width: 0,
        viewport_height: 0,
    };
    send.write_all(&hello.to_bytes()).await.unwrap();
    // Keep the control stream open but never accept a frame stream.
    std::mem::forget(send);
    std::mem::forget(recv);
    (ep, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_viewer_does_not_slow_down_a_fast_one() {
    let fps = 30.0;
    let hx = start(ServerConfig::default(), Scene::Windows, 320, 240, fps);
    let url = hx.url(&env(), Rights::VIEW);
    let (_ep, _slow) = stalled_viewer(&url).await;
    let mut fast = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    // Skip the start-up frames, then measure two seconds.
    for _ in 0..5 {
        next_frame(&mut fast).await;
    }
    let mut stats = StatsCollector::default();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let f = next_frame(&mut fast).await;
        stats.record(&f);
    }
    let report = stats.report(0, Duration::ZERO, 0);
    let env = hx.server.env_stats(ENV).unwrap();
    assert_eq!(env.viewers, 2);
    assert!(
        env.frames_dropped > 0,
        "the stalled viewer was never throttled"
    );
    assert!(
        report.fps >= 0.9 * f64::from(fps),
        "fast viewer got {:.1} fps with a stalled viewer present",
        report.fps
    );
    assert!(
        report.latency_ms_p99 < 500.0,
        "latency p99 {:.1} ms",
        report.latency_ms_p99
    );
    fast.close().await;
}

// Per-session behaviour without the transport (rights, refusals, resumption, keyframe and
// drop policy, expiry) is tested on simulated time in hostd/src/stream/session/tests.rs:
// `view_only_viewer_input_is_refused_with_code` and `resume_within_window_keeps_rights`
// replace the loopback tests of the same behaviour.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_keys_are_released_when_the_grace_period_ends() {
    let cfg = ServerConfig {
        resume_grace: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let hx = start(cfg, Scene::Still, 64, 64, 10.0);
    let s = Session::connect(
        &hx.url(&env(), Rights::VIEW | Rights::INPUT),
        ConnectOptions::default(),
    )
    .await
    .unwrap();
    let press = InputEvent::Key {
        code: 42,
        pressed: true,
    };
    s.send_input(press);
    wait_for_events(&hx.input, 1).await;
    s.close().await;
    let got = wait_for_events(&hx.input, 2).await;
    assert_eq!(
        got,
        vec![
            press,
            InputEvent::Key {
                code: 42,
                pressed: false
            }
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_per_address_cap_are_refused() {
    let cfg = ServerConfig {
        max_sessions_per_prefix: 2,
        ..ServerConfig::default()
    };
    let hx = start(cfg, Scene::Still, 64, 64, 10.0);
    let url = hx.url(&env(), Rights::VIEW);
    let a = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let b = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let err = Session::connect(&url, ConnectOptions::default())
        .await
        .err()
        .expect("third connection from one address must be refused");
    assert!(
        matches!(
            err,
            ClientError::Refused {
                code: ErrorCode::TooManyConnections,
                ..
            }
        ),
        "{err}"
    );
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_pass_address_validation_when_retry_is_required() {
    // Threshold 0: every new connection must first answer a QUIC Retry.
    let cfg = ServerConfig {
        retry_threshold: 0,
        ..ServerConfig::default()
    };
    let hx = start(cfg, Scene::Still, 64, 64, 10.0);

    let mut s = Session::connect(&hx.url(&env(), Rights::VIEW), ConnectOptions::default())
        .await
        .unwrap();
    next_frame(&mut s).await;

    assert_eq!(
        hx.server.admission_stats().retries,
        1,
        "the server must have sent exactly one Retry, which the client answered"
    );
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connection_is_closed_after_the_hello_timeout() {
    let cfg = ServerConfig {
        hello_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let hx = start(cfg, Scene::Still, 64, 64, 10.0);
    let url = hx.url(&env(), Rights::VIEW);
    let (_ep, conn) = support::raw_connection(&url, support::quic_client_config(&url)).await;
    let close = support::server_close(&conn, "server did not close the silent connection").await;
    assert_eq!(
        close.error_code,
        (ErrorCode::ProtocolViolation as u32).into()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while hx.server.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        hx.server.open_connections(),
        0,
        "connection slot not released"
    );
}

/// Returns one picture, then nothing ever again (a VM whose screen does not change).
struct StillOnce {
    pixels: Vec<u8>,
    sent: bool,
}

impl encoder::FrameSource for StillOnce {
    fn size(&self) -> (u32, u32) {
        (64, 64)
    }
    fn next_frame(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<encoder::SourceFrame<'_>>, encoder::SourceError> {
        if self.sent {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            return Ok(None);
        }
        self.sent = true;
        Ok(Some(encoder::SourceFrame {
            frame: encoder::FrameRef::packed(64, 64, encoder::PixelFormat::Bgrx, &self.pixels),
            damage: vec![encoder::Rect::new(0, 0, 64, 64)],
            captured_at: Instant::now(),
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_joining_a_still_screen_gets_a_keyframe() {
    let pixels: Vec<u8> = (0..64 * 64)
        .flat_map(|i| [(i % 64 * 4) as u8, (i / 64 * 4) as u8, 128, 255])
        .collect();
    let src = source::EnvironmentSource {
        frames: Box::new(StillOnce {
            pixels: pixels.clone(),
            sent: false,
        }),
        input: Arc::new(RecordingInput::default()),
    };
    let (server, tokens) = support::serve(ServerConfig::default(), &env(), src, 30.0);
    let token = tokens.issue(&env(), Rights::VIEW, HOUR).unwrap();
    let url: ConnectUrl = server.connect_url(ENV, &token).unwrap().parse().unwrap();
    let mut first = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    next_frame(&mut first).await;
    // The source has nothing new; the second viewer still needs a picture.
    let mut second = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let f = next_frame(&mut second).await;
    assert!(f.keyframe);
    assert!(encoder::psnr_bgrx(&f.bgrx, &pixels, 64, 64) >= 30.0);
    first.close().await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewers_counters_and_its_reported_latency_are_kept_until_it_leaves() {
    let hx = start(ServerConfig::default(), Scene::Windows, 320, 240, 30.0);
    let mut s = Session::connect(&hx.url(&env(), Rights::VIEW), ConnectOptions::default())
        .await
        .unwrap();

    // The first report is due 2 s after the session started decoding.
    let deadline = Instant::now() + Duration::from_secs(20);
    let viewer = loop {
        next_frame(&mut s).await;
        let viewers = hx.server.viewer_stats(ENV);
        if let [v] = viewers.as_slice() {
            if v.client.is_some() {
                break *v;
            }
        }
        assert!(Instant::now() < deadline, "no report: {viewers:?}");
    };
    drop(s);
    let left = Instant::now() + Duration::from_secs(10);
    while !hx.server.viewer_stats(ENV).is_empty() {
        assert!(Instant::now() < left, "the viewer's series outlived it");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let client = viewer.client.unwrap();
    assert_eq!(viewer.transport, "quic");
    assert!(viewer.frames_sent >= client.frames_decoded, "{viewer:?}");
    assert!(client.frames_decoded > 0, "{client:?}");
    assert!(client.latency_us_p50 > 0, "{client:?}");
    assert!(viewer.bitrate_target_bps > 0, "{viewer:?}");
    assert!(!viewer.rtt.is_zero(), "{viewer:?}");
}
