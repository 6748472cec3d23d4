//! Identical-pixel skipping: damage whose pixels did not change costs no frame.

use encoder::{Decoder, FrameRef, PixelFormat, Rect};
use scenes::{Scene, SyntheticSource};

mod common;

use common::{encoder, H, W};

const WHOLE: Rect = Rect::new(0, 0, W, H);

fn desktop() -> Vec<u8> {
    SyntheticSource::new(Scene::Windows, W, H, 30.0)
        .advance()
        .frame
        .data
        .to_vec()
}

fn frame(data: &[u8]) -> FrameRef<'_> {
    FrameRef::packed(W, H, PixelFormat::Bgrx, data)
}

/// Sets pixel (x, y) to white or black, whichever is farther from its colour.
fn flip_pixel(data: &mut [u8], x: u32, y: u32) {
    let i = ((y * W + x) * 4) as usize;
    let v = if data[i + 1] < 128 { 255 } else { 0 };
    data[i..i + 3].fill(v);
}

/// Green of pixel (x, y) in a BGRX picture.
fn green(bgrx: &[u8], x: u32, y: u32) -> i32 {
    i32::from(bgrx[((y * W + x) * 4 + 1) as usize])
}

#[test]
fn damage_over_identical_pixels_produces_no_frame() {
    let data = desktop();
    let mut enc = encoder();
    assert!(enc
        .encode(&frame(&data), &[WHOLE], false)
        .unwrap()
        .is_some());

    let caret = [Rect::new(100, 50, 2, 16)];
    let repaint = enc.encode(&frame(&data), &caret, false).unwrap();
    let whole = enc.encode(&frame(&data.clone()), &[WHOLE], false).unwrap();

    assert!(repaint.is_none());
    assert!(whole.is_none());
    assert_eq!(enc.frames_encoded(), 1);
}

#[test]
fn one_changed_pixel_under_whole_screen_damage_is_sent_and_shown() {
    let data = desktop();
    let mut enc = encoder();
    let mut dec = Decoder::new().unwrap();
    let first = enc.encode(&frame(&data), &[WHOLE], false).unwrap().unwrap();
    dec.decode(&first.data).unwrap().unwrap();
    let mut changed = data.clone();
    let (x, y) = (201, 117);
    flip_pixel(&mut changed, x, y);

    let out = enc.encode(&frame(&changed), &[WHOLE], false).unwrap();

    let out = out.expect("a frame for the changed pixel");
    assert!(!out.keyframe);
    let shown = dec.decode(&out.data).unwrap().unwrap();
    let (want, was) = (green(&changed, x, y), green(&data, x, y));
    let got = green(&shown.bgrx, x, y);
    assert!(
        (got - want).abs() < (got - was).abs(),
        "pixel shows {got}, source changed {was} -> {want}"
    );
}

#[test]
fn a_pixel_changed_back_is_sent_again() {
    let a = desktop();
    let mut b = a.clone();
    flip_pixel(&mut b, 10, 11);
    let mut enc = encoder();
    enc.encode(&frame(&a), &[WHOLE], false).unwrap().unwrap();
    enc.encode(&frame(&b), &[Rect::new(10, 11, 1, 1)], false)
        .unwrap()
        .unwrap();

    let back = enc.encode(&frame(&a), &[WHOLE], false).unwrap();

    assert!(back.is_some(), "reverting the pixel must be encoded");
    assert_eq!(enc.frames_encoded(), 3);
}

#[test]
fn with_skipping_off_identical_repaints_are_encoded() {
    let data = desktop();
    let mut enc = encoder();
    enc.set_skip_identical(false);
    enc.encode(&frame(&data), &[WHOLE], false).unwrap().unwrap();

    let repaint = enc.encode(&frame(&data), &[WHOLE], false).unwrap();

    assert!(!enc.skip_identical());
    assert!(repaint.is_some());
}

#[test]
fn a_forced_keyframe_is_sent_even_when_nothing_changed() {
    let data = desktop();
    let mut enc = encoder();
    enc.encode(&frame(&data), &[WHOLE], false).unwrap().unwrap();

    let key = enc.encode(&frame(&data), &[WHOLE], true).unwrap();

    assert!(key.is_some_and(|k| k.keyframe));
}
