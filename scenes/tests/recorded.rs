//! A recording made of known frames reads back exactly, with damage only where frames differ.

use std::io::Write;
use std::process::{Command, Stdio};

use scenes::{Manifest, RecordedSource};
use sha2::{Digest, Sha256};
use testkit::Need;

const W: u32 = 64;
const H: u32 = 48;

/// Four frames: a pattern, the same again, one pixel changed, the same again.
fn frames() -> Vec<Vec<u8>> {
    let a: Vec<u8> = (0..W * H)
        .flat_map(|i| [(i % 256) as u8, (i / 7 % 256) as u8, (i / 3 % 256) as u8, 0])
        .collect();
    let mut b = a.clone();
    b[((40 * W + 50) * 4) as usize] ^= 0x80;
    vec![a.clone(), a, b.clone(), b]
}

fn ffmpeg_present() -> bool {
    Command::new("ffmpeg").arg("-version").output().is_ok()
}

#[test]
fn a_lossless_recording_reads_back_with_damage_from_frame_compares() {
    if !ffmpeg_present() {
        return testkit::skip(Need::Tools, "ffmpeg is not installed");
    }
    let dir = std::env::temp_dir().join(format!("genos-recorded-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("clip.mkv");
    let mut ffmpeg = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo"])
        .args([
            "-pix_fmt",
            "bgr0",
            "-s",
            &format!("{W}x{H}"),
            "-r",
            "10",
            "-i",
            "-",
        ])
        .args(["-c:v", "ffv1", "-pix_fmt", "bgr0"])
        .arg(&file)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = ffmpeg.stdin.take().unwrap();
    for f in frames() {
        stdin.write_all(&f).unwrap();
    }
    drop(stdin);
    assert!(ffmpeg.wait().unwrap().success());
    let sha: String = Sha256::digest(std::fs::read(&file).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(
        dir.join("manifest.tsv"),
        format!("# test\nclip\tclip.mkv\t{W}x{H}\t10\t4\t2\t{sha}\n"),
    )
    .unwrap();

    let manifest = Manifest::load(&dir).unwrap();
    let rec = manifest.get("clip").unwrap();
    rec.verify().unwrap();
    let mut source = RecordedSource::open(rec, W, H, 10).unwrap();
    let mut got = Vec::new();
    while let Some(frame) = source.advance().unwrap() {
        got.push((frame.frame.data.to_vec(), frame.damage.clone()));
    }
    std::fs::remove_dir_all(&dir).unwrap();

    let want = frames();
    assert_eq!(got.len(), 4);
    for (i, ((data, _), expected)) in got.iter().zip(&want).enumerate() {
        let colour = |d: &[u8]| d.chunks(4).map(|p| [p[0], p[1], p[2]]).collect::<Vec<_>>();
        assert_eq!(colour(data), colour(expected), "frame {i} differs");
    }
    assert_eq!(got[0].1, vec![encoder::Rect::new(0, 0, W, H)]);
    assert!(got[1].1.is_empty(), "{:?}", got[1].1);
    assert!(
        got[2]
            .1
            .iter()
            .any(|r| r.contains_rect(&encoder::Rect::new(50, 40, 1, 1))),
        "{:?}",
        got[2].1
    );
    assert!(got[3].1.is_empty(), "{:?}", got[3].1);
}
