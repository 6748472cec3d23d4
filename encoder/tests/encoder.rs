//! Encoder and decoder behaviour on real openh264, fed by the synthetic desktops.

use encoder::{
    psnr_bgrx, DecodeError, Decoder, EncodeError, EncodedFrame, Encoder, EncoderConfig, FrameRef,
    PixelFormat, Rect, Tuning, Usage, REFINEMENT_PASSES,
};
use scenes::{Scene, SyntheticSource};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const W: u32 = 1280;
const H: u32 = 720;

fn config(width: u32, height: u32, fps: f32, bitrate_bps: u32) -> EncoderConfig {
    EncoderConfig {
        width,
        height,
        fps,
        bitrate_bps,
    }
}

/// NAL unit types in an Annex-B access unit.
fn nal_types(annexb: &[u8]) -> Vec<u8> {
    openh264::nal_units(annexb)
        .filter_map(|nal| {
            let start = nal.windows(3).position(|w| w == [0, 0, 1])? + 3;
            nal.get(start).map(|b| b & 0x1f)
        })
        .collect()
}

/// The time the source's next frame shows, on the source's clock (frame n at (n - 1) / fps):
/// the encoder budgets bits over time, and these tests render much faster than real time.
fn next_shown_at(source: &SyntheticSource) -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    start + Duration::from_secs_f64(source.rendered() as f64 / f64::from(source.fps()))
}

/// Encodes `n` frames of `scene` and returns the outputs (None where nothing was produced).
fn encode_frames(
    enc: &mut Encoder,
    source: &mut SyntheticSource,
    n: usize,
) -> Vec<Option<EncodedFrame>> {
    (0..n)
        .map(|_| {
            let at = next_shown_at(source);
            let f = source.advance();
            enc.encode_at(&f.frame, &f.damage, false, at)
                .expect("encode")
        })
        .collect()
}

#[test]
fn round_trip_psnr_is_at_least_35_db_for_every_scene_at_720p() {
    for scene in Scene::ALL {
        let mut source = SyntheticSource::new(scene, W, H, 30.0);
        let mut enc = Encoder::new(config(W, H, 30.0, 3_000_000)).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut shown: Option<Vec<u8>> = None;
        for i in 0..10 {
            let f = source.advance();
            if let Some(out) = enc.encode(&f.frame, &f.damage, false).unwrap() {
                let pic = dec
                    .decode(&out.data)
                    .unwrap()
                    .expect("one picture per access unit");
                assert_eq!((pic.width, pic.height), (W, H));
                shown = Some(pic.bgrx);
            }
            let shown = shown.as_deref().expect("first frame produces a picture");
            let psnr = psnr_bgrx(f.frame.data, shown, W, H);
            assert!(psnr >= 35.0, "{scene} frame {i}: PSNR {psnr:.2} dB < 35 dB");
        }
    }
}

#[test]
fn two_thread_encoding_decodes_to_the_same_quality_as_one_thread() {
    let psnr_with = |threads: u16| {
        let tuning = Tuning {
            usage: Usage::CameraRealTime,
            threads,
        };
        let mut source = SyntheticSource::new(Scene::Windows, W, H, 30.0);
        let mut enc = Encoder::with_tuning(config(W, H, 30.0, 3_000_000), tuning).unwrap();
        let mut dec = Decoder::new().unwrap();
        let mut worst = f64::INFINITY;
        for _ in 0..8 {
            let f = source.advance();
            let out = enc.encode(&f.frame, &f.damage, false).unwrap().unwrap();
            let pic = dec.decode(&out.data).unwrap().expect("a picture");
            worst = worst.min(psnr_bgrx(f.frame.data, &pic.bgrx, W, H));
        }
        worst
    };

    let (one, two) = (psnr_with(1), psnr_with(2));

    assert!(two >= 35.0, "two threads: worst PSNR {two:.2} dB");
    assert!(
        (one - two).abs() < 1.0,
        "one thread {one:.2} dB, two {two:.2} dB"
    );
}

#[test]
fn thread_counts_outside_one_to_four_are_refused() {
    for threads in [0, 5] {
        let tuning = Tuning {
            usage: Usage::CameraRealTime,
            threads,
        };
        let result = Encoder::with_tuning(config(64, 64, 30.0, 300_000), tuning);
        assert!(
            matches!(result, Err(EncodeError::InvalidThreads(t)) if t == threads),
            "{threads}: {result:?}"
        );
    }
}

#[test]
fn first_frame_is_an_idr_with_parameter_sets() {
    let mut source = SyntheticSource::new(Scene::Still, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 500_000)).unwrap();
    let f = source.advance();
    let out = enc
        .encode(&f.frame, &f.damage, false)
        .unwrap()
        .expect("first frame encodes");
    assert!(out.keyframe);
    let types = nal_types(&out.data);
    assert!(
        types.contains(&7) && types.contains(&8) && types.contains(&5),
        "NAL types {types:?}"
    );
}

#[test]
fn empty_damage_produces_no_output() {
    let mut source = SyntheticSource::new(Scene::Windows, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 500_000)).unwrap();
    let f = source.advance();
    assert!(enc.encode(&f.frame, &f.damage, false).unwrap().is_some());

    let f = source.advance();
    assert!(enc.encode(&f.frame, &[], false).unwrap().is_none());
    // Damage entirely outside the picture, or of zero size, is no damage either.
    let outside = [Rect::new(320, 0, 10, 10), Rect::new(5, 5, 0, 7)];
    assert!(enc.encode(&f.frame, &outside, false).unwrap().is_none());
    assert_eq!(enc.frames_encoded(), 1);
}

#[test]
fn forced_keyframe_produces_an_idr_a_fresh_decoder_can_start_from() {
    let mut source = SyntheticSource::new(Scene::Scrolling, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 800_000)).unwrap();
    let outs = encode_frames(&mut enc, &mut source, 5);
    assert!(
        outs[1..].iter().flatten().all(|o| !o.keyframe),
        "no IDR unless asked"
    );

    let f = source.advance();
    let out = enc
        .encode(&f.frame, &f.damage, true)
        .unwrap()
        .expect("forced keyframe encodes");
    assert!(out.keyframe);
    assert!(nal_types(&out.data).contains(&5), "IDR slice present");
    let pic = Decoder::new()
        .unwrap()
        .decode(&out.data)
        .unwrap()
        .expect("decodable on its own");
    assert!(psnr_bgrx(f.frame.data, &pic.bgrx, 320, 240) > 30.0);

    // Forcing works on an unchanged picture too (a viewer joins an idle screen).
    let f = source.advance();
    let _ = enc.encode(&f.frame, &f.damage, false).unwrap();
    let out = enc
        .encode(&f.frame, &[], true)
        .unwrap()
        .expect("forced keyframe encodes without damage");
    assert!(out.keyframe);
}

fn mean_bytes(outs: &[Option<EncodedFrame>]) -> f64 {
    let sizes: Vec<usize> = outs.iter().flatten().map(|o| o.data.len()).collect();
    sizes.iter().sum::<usize>() as f64 / sizes.len().max(1) as f64
}

#[test]
fn lowering_the_bitrate_lowers_bits_per_second_to_the_new_target() {
    let mut source = SyntheticSource::new(Scene::Scrolling, 640, 360, 30.0);
    let mut enc = Encoder::new(config(640, 360, 30.0, 4_000_000)).unwrap();
    let high = encode_frames(&mut enc, &mut source, 30);
    enc.set_bitrate(300_000);
    assert_eq!(enc.config().bitrate_bps, 300_000);
    let low = encode_frames(&mut enc, &mut source, 30);

    // 30 frames at 30 fps: each half is one second.
    let bits = |outs: &[Option<EncodedFrame>]| {
        outs.iter()
            .flatten()
            .map(|o| o.data.len() * 8)
            .sum::<usize>()
    };
    let (high, low) = (bits(&high), bits(&low));
    assert!(
        low <= 330_000,
        "{low} bit/s sent after lowering to 300 kbit/s"
    );
    assert!(
        low * 2 < high,
        "{high} bit/s at 4 Mbit/s, {low} at 300 kbit/s"
    );
}

#[test]
fn lowering_the_frame_rate_raises_bits_per_frame() {
    let mut source = SyntheticSource::new(Scene::Scrolling, 640, 360, 30.0);
    let mut enc = Encoder::new(config(640, 360, 60.0, 600_000)).unwrap();
    let fast = encode_frames(&mut enc, &mut source, 30);
    enc.set_fps(10.0);
    let slow = encode_frames(&mut enc, &mut source, 30);
    let (fast, slow) = (mean_bytes(&fast[15..]), mean_bytes(&slow[15..]));
    assert!(
        slow > fast * 2.0,
        "bytes per frame {fast:.0} at 60 fps, {slow:.0} at 10 fps"
    );
}

#[test]
fn rate_changes_before_the_first_frame_apply() {
    let mut source = SyntheticSource::new(Scene::Windows, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 5_000_000)).unwrap();
    enc.set_bitrate(50_000);
    enc.set_fps(60.0);
    assert_eq!(enc.config(), config(320, 240, 60.0, 50_000));
    let outs = encode_frames(&mut enc, &mut source, 20);
    assert!(outs[0].as_ref().is_some_and(|o| o.keyframe));
}

#[test]
fn refine_sharpens_an_idle_picture_a_bounded_number_of_times() {
    let mut source = SyntheticSource::new(Scene::Still, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 300_000)).unwrap();
    assert!(
        enc.refine().unwrap().is_none(),
        "nothing to refine before the first frame"
    );
    let f = source.advance();
    let first = enc.encode(&f.frame, &f.damage, false).unwrap().unwrap();
    let reference = f.frame.data.to_vec();
    let mut dec = Decoder::new().unwrap();
    let before = psnr_bgrx(
        &reference,
        &dec.decode(&first.data).unwrap().unwrap().bgrx,
        320,
        240,
    );
    let mut last = Vec::new();
    for _ in 0..REFINEMENT_PASSES {
        let out = enc.refine().unwrap().expect("refinement pass");
        assert!(!out.keyframe);
        last = dec.decode(&out.data).unwrap().unwrap().bgrx;
    }
    assert!(
        enc.refine().unwrap().is_none(),
        "converged after {REFINEMENT_PASSES} passes"
    );
    let after = psnr_bgrx(&reference, &last, 320, 240);
    assert!(after > before + 0.5, "PSNR {before:.2} dB -> {after:.2} dB");
}

#[test]
fn odd_and_out_of_range_sizes_are_rejected() {
    for (w, h) in [(1281, 720), (1280, 719), (17, 16)] {
        assert!(
            matches!(
                Encoder::new(config(w, h, 30.0, 1_000_000)),
                Err(EncodeError::OddDimensions { .. })
            ),
            "{w}x{h}"
        );
    }
    for (w, h) in [(0, 720), (1280, 0), (14, 720), (4096, 2160), (2160, 3841)] {
        assert!(
            matches!(
                Encoder::new(config(w, h, 30.0, 1_000_000)),
                Err(EncodeError::UnsupportedSize { .. })
            ),
            "{w}x{h}"
        );
    }
    assert!(
        Encoder::new(config(2160, 3840, 30.0, 1_000_000)).is_ok(),
        "portrait 4K is fine"
    );
    assert!(matches!(
        Encoder::new(config(64, 64, 0.0, 1_000_000)),
        Err(EncodeError::InvalidFps(_))
    ));
    assert!(matches!(
        Encoder::new(config(64, 64, 30.0, 0)),
        Err(EncodeError::InvalidBitrate(0))
    ));
}

#[test]
fn frames_of_the_wrong_size_or_length_are_rejected() {
    let mut enc = Encoder::new(config(64, 64, 30.0, 300_000)).unwrap();
    let data = vec![0u8; 64 * 64 * 4];
    let wrong = FrameRef::packed(64, 32, PixelFormat::Bgrx, &data);
    let err = enc
        .encode(&wrong, &[Rect::new(0, 0, 64, 32)], false)
        .unwrap_err();
    assert!(matches!(err, EncodeError::SizeMismatch { .. }), "{err}");
    let short = FrameRef::packed(64, 64, PixelFormat::Bgrx, &data[..100]);
    let err = enc
        .encode(&short, &[Rect::new(0, 0, 64, 64)], false)
        .unwrap_err();
    assert!(matches!(err, EncodeError::Frame(_)), "{err}");
    let narrow = FrameRef {
        width: 64,
        height: 64,
        stride: 100,
        format: PixelFormat::Bgra,
        data: &data,
    };
    assert!(enc
        .encode(&narrow, &[Rect::new(0, 0, 64, 64)], false)
        .is_err());
}

#[test]
fn padded_stride_encodes_like_packed_rows() {
    let (w, h) = (160u32, 96u32);
    let mut source = SyntheticSource::new(Scene::Windows, w, h, 30.0);
    let packed = source.advance().frame.data.to_vec();
    let stride = w as usize * 4 + 64;
    // A framebuffer with padding after each row and none after the last.
    let mut padded = vec![0xAAu8; stride * (h as usize - 1) + w as usize * 4];
    for y in 0..h as usize {
        padded[y * stride..y * stride + w as usize * 4]
            .copy_from_slice(&packed[y * w as usize * 4..(y + 1) * w as usize * 4]);
    }
    let full = [Rect::new(0, 0, w, h)];
    let a = Encoder::new(config(w, h, 30.0, 500_000))
        .unwrap()
        .encode(
            &FrameRef::packed(w, h, PixelFormat::Bgrx, &packed),
            &full,
            false,
        )
        .unwrap()
        .unwrap();
    let b = Encoder::new(config(w, h, 30.0, 500_000))
        .unwrap()
        .encode(
            &FrameRef {
                width: w,
                height: h,
                stride,
                format: PixelFormat::Bgra,
                data: &padded,
            },
            &full,
            false,
        )
        .unwrap()
        .unwrap();
    assert_eq!(a.data, b.data);
}

#[test]
fn decoder_survives_garbage() {
    let mut dec = Decoder::new().unwrap();
    let inputs: [&[u8]; 4] = [
        &[],
        &[0, 0, 0, 1, 0x65, 0xff, 0x00, 0x12],
        &[0xde, 0xad, 0xbe, 0xef],
        &[0, 0, 1, 0x67, 0x42],
    ];
    for input in inputs {
        match dec.decode(input) {
            Ok(None) | Err(DecodeError::Codec(_)) => {}
            other => panic!("unexpected result for {input:?}: {other:?}"),
        }
    }
}

#[test]
fn psnr_of_identical_pictures_is_infinite_and_of_off_by_one_is_48_db() {
    let a = vec![100u8; 16 * 8 * 4];
    assert_eq!(psnr_bgrx(&a, &a, 16, 8), f64::INFINITY);
    let mut b: Vec<u8> = a.iter().map(|v| v + 1).collect();
    // The fourth byte is padding and must not count.
    for px in b.chunks_exact_mut(4) {
        px[3] = 0;
    }
    let psnr = psnr_bgrx(&a, &b, 16, 8);
    assert!((psnr - 48.1308).abs() < 1e-3, "{psnr}");
}

#[test]
fn smallest_sizes_encode_and_decode() {
    for (w, h) in [(16, 16), (18, 34), (34, 18)] {
        let data: Vec<u8> = (0..w * h * 4).map(|i| (i * 7) as u8).collect();
        let mut enc = Encoder::new(config(w, h, 30.0, 100_000)).unwrap();
        let out = enc
            .encode(
                &FrameRef::packed(w, h, PixelFormat::Bgrx, &data),
                &[Rect::new(0, 0, w, h)],
                false,
            )
            .unwrap()
            .expect("first frame encodes");
        let pic = Decoder::new()
            .unwrap()
            .decode(&out.data)
            .unwrap()
            .expect("decodes");
        assert_eq!((pic.width, pic.height), (w, h));
    }
}

/// openh264 silently builds without its assembly when `nasm` is missing (about 3x slower). This
/// links against a routine that exists only in the x86-64 assembly, so such a build fails here.
#[cfg(target_arch = "x86_64")]
#[test]
fn openh264_is_built_with_its_x86_assembly() {
    extern "C" {
        fn WelsSampleSad16x16_sse2(a: *const u8, a_stride: i32, b: *const u8, b_stride: i32)
            -> i32;
    }
    #[repr(C, align(16))]
    struct Block([u8; 16 * 16]);
    let (a, b) = (Block([7; 256]), Block([4; 256]));
    // SAFETY: both buffers hold 16 rows of 16 bytes at the given stride and are 16-byte aligned
    // (the routine uses aligned SSE2 loads); it only reads them.
    let sad = unsafe { WelsSampleSad16x16_sse2(a.0.as_ptr(), 16, b.0.as_ptr(), 16) };
    assert_eq!(sad, 3 * 256);
}

#[test]
fn forced_keyframe_shows_the_whole_current_frame_even_if_damage_was_lost() {
    let (w, h) = (320, 240);
    let mut source = SyntheticSource::new(Scene::Windows, w, h, 30.0);
    let mut enc = Encoder::new(config(w, h, 30.0, 2_000_000)).unwrap();
    let f = source.advance();
    enc.encode(&f.frame, &f.damage, false).unwrap().unwrap();
    // Frames whose damage never reached the encoder.
    for _ in 0..5 {
        source.advance();
    }
    let f = source.advance();
    let out = enc.encode(&f.frame, &[], true).unwrap().unwrap();
    let pic = Decoder::new().unwrap().decode(&out.data).unwrap().unwrap();
    let psnr = psnr_bgrx(f.frame.data, &pic.bgrx, w, h);
    // A stale picture (window 20 px from where it is now) scores far below this.
    assert!(
        psnr >= 30.0,
        "keyframe PSNR {psnr:.2} dB against the current frame"
    );
}

#[test]
fn a_change_that_waited_for_room_in_the_window_is_sent_by_refine() {
    let mut source = SyntheticSource::new(Scene::Windows, 320, 240, 30.0);
    let mut enc = Encoder::new(config(320, 240, 30.0, 20_000)).unwrap();
    let outs = encode_frames(&mut enc, &mut source, 30);
    let waited = outs.iter().skip(1).any(Option::is_none);
    assert!(
        waited,
        "20 kbit/s of a moving window never filled the 1 s window"
    );

    // The source goes still; one second later the window has room again.
    let later = next_shown_at(&source) + Duration::from_secs(1);
    let flushed = enc.refine_at(later).unwrap();

    assert!(flushed.is_some_and(|f| !f.keyframe));
}

#[test]
fn no_one_second_window_of_a_scroll_exceeds_the_target_by_more_than_ten_percent() {
    let (fps, bps) = (30u32, 1_500_000u32);
    let mut source = SyntheticSource::new(Scene::Scrolling, 640, 360, fps as f32);
    let mut enc = Encoder::new(config(640, 360, fps as f32, bps)).unwrap();

    let bits: Vec<usize> = encode_frames(&mut enc, &mut source, 4 * fps as usize)
        .iter()
        .map(|o| o.as_ref().map_or(0, |o| o.data.len() * 8))
        .collect();

    let worst = bits
        .windows(fps as usize)
        .map(|w| w.iter().sum::<usize>())
        .max()
        .unwrap();
    assert!(
        worst as f64 <= f64::from(bps) * 1.10,
        "worst 1 s window {worst} bit for a target of {bps} bit/s"
    );
}
