//! A stream that changes size mid-session (the environment took a viewer's Resize): the
//! client passes the new Config on and decodes every frame at its own size. The window
//! side (drawing any size letterboxed) is `window::tests`.

mod support;

use client::{ConnectOptions, ConnectUrl, Event, Session};
use encoder::{Encoder, EncoderConfig, FrameRef, PixelFormat, Rect};
use proto::stream::{Rights, ServerMessage, StreamConfig};
use support::scripted::{ScriptedServer, CONFIG};

/// A keyframe of a `w` x `h` picture of one colour (`bgrx`).
fn solid_keyframe(w: u32, h: u32, bgrx: [u8; 4]) -> Vec<u8> {
    let pixels = bgrx.repeat((w * h) as usize);
    let mut enc = Encoder::new(EncoderConfig {
        width: w,
        height: h,
        fps: 30.0,
        bitrate_bps: 2_000_000,
    })
    .unwrap();
    let frame = FrameRef::packed(w, h, PixelFormat::Bgrx, &pixels);
    let encoded = enc.encode(&frame, &[Rect::new(0, 0, w, h)], true).unwrap();
    encoded.expect("a forced keyframe").data
}

/// The centre pixel's B, G, R.
fn centre(f: &client::Frame) -> [u8; 3] {
    let i = ((f.height / 2 * f.width + f.width / 2) * 4) as usize;
    [f.bgrx[i], f.bgrx[i + 1], f.bgrx[i + 2]]
}

fn near(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(b).all(|(&x, y)| x.abs_diff(y) <= 12)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_decode_at_their_new_size_after_the_stream_resized() {
    let server = ScriptedServer::start(Rights::VIEW.union(Rights::INPUT));
    let url: ConnectUrl = server.url.parse().unwrap();
    let mut session = Session::connect(&url, ConnectOptions::default())
        .await
        .unwrap();
    let resized = StreamConfig {
        width: 160,
        height: 128,
        ..CONFIG
    };

    server.send_frame(1, true, 320, 240, solid_keyframe(320, 240, [0, 0, 255, 0]));
    let before = support::next_frame(&mut session).await;
    server.send(ServerMessage::Config(resized));
    let config = support::next_event(&mut session, 10, "Config", |e| match e {
        Event::Config(c) => Some(c),
        _ => None,
    })
    .await;
    server.send_frame(2, true, 160, 128, solid_keyframe(160, 128, [255, 0, 0, 0]));
    let after = support::next_frame(&mut session).await;

    assert_eq!((before.width, before.height), (320, 240));
    assert!(near(centre(&before), [0, 0, 255]), "{:?}", centre(&before));
    assert_eq!(config, resized);
    assert_eq!((after.width, after.height, after.sequence), (160, 128, 2));
    assert_eq!(after.bgrx.len(), 160 * 128 * 4);
    assert!(near(centre(&after), [255, 0, 0]), "{:?}", centre(&after));
}
