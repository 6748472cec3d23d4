//! `Encoder::keyframe`: a still screen's keyframe comes from the encoder's own picture.

use encoder::{psnr_bgrx, Decoder, FrameRef, PixelFormat, Rect};

mod common;

use common::{encoder, H, W};

/// A BGRX picture: a gradient background with a solid block at (`bx`, `by`).
fn picture(bx: u32, by: u32) -> Vec<u8> {
    let mut data = vec![0u8; (W * H * 4) as usize];
    for y in 0..H {
        for x in 0..W {
            let i = ((y * W + x) * 4) as usize;
            let inside = (bx..bx + 60).contains(&x) && (by..by + 40).contains(&y);
            let px = if inside {
                [30, 200, 240, 0]
            } else {
                [(x % 256) as u8, (y % 256) as u8, 90, 0]
            };
            data[i..i + 4].copy_from_slice(&px);
        }
    }
    data
}

fn frame(data: &[u8]) -> FrameRef<'_> {
    FrameRef::packed(W, H, PixelFormat::Bgrx, data)
}

#[test]
fn keyframe_before_any_frame_is_none() {
    let mut enc = encoder();

    let out = enc.keyframe().unwrap();

    assert!(out.is_none(), "no picture yet, so no keyframe");
}

#[test]
fn keyframe_shows_the_last_damaged_picture_to_a_fresh_decoder() {
    let mut enc = encoder();
    let first = picture(10, 10);
    enc.encode(&frame(&first), &[Rect::new(0, 0, W, H)], false)
        .unwrap()
        .expect("first frame encodes");
    // The block moves; only the rectangle covering both positions is damaged.
    let moved = picture(100, 80);
    enc.encode(&frame(&moved), &[Rect::new(10, 10, 150, 110)], false)
        .unwrap();

    let out = enc
        .keyframe()
        .unwrap()
        .expect("a keyframe of the still picture");

    assert!(out.keyframe, "an IDR a joining viewer can start from");
    let pic = Decoder::new()
        .unwrap()
        .decode(&out.data)
        .unwrap()
        .expect("decodable on its own");
    let now = psnr_bgrx(&moved, &pic.bgrx, W, H);
    let before = psnr_bgrx(&first, &pic.bgrx, W, H);
    assert!(
        now >= 35.0,
        "keyframe PSNR {now:.2} dB against the current picture"
    );
    assert!(
        before < now - 5.0,
        "keyframe looks like the old picture ({before:.2} dB) as much as the new ({now:.2} dB)"
    );
}

#[test]
fn frames_after_a_keyframe_continue_the_stream() {
    let mut enc = encoder();
    let mut dec = Decoder::new().unwrap();
    let first = picture(10, 10);
    let out = enc
        .encode(&frame(&first), &[Rect::new(0, 0, W, H)], false)
        .unwrap()
        .unwrap();
    dec.decode(&out.data).unwrap().unwrap();

    let key = enc.keyframe().unwrap().unwrap();
    dec.decode(&key.data).unwrap().unwrap();
    let moved = picture(200, 150);
    let next = enc
        .encode(&frame(&moved), &[Rect::new(10, 10, 250, 180)], false)
        .unwrap()
        .expect("damage after the keyframe encodes");

    assert!(!next.keyframe, "the next frame is a P-frame");
    let pic = dec.decode(&next.data).unwrap().unwrap();
    let psnr = psnr_bgrx(&moved, &pic.bgrx, W, H);
    assert!(psnr >= 35.0, "P-frame after the keyframe: {psnr:.2} dB");
}
