//! Writes raw BGRA frames of a synthetic scene to stdout, for looking at scenes:
//! `cargo run -p genos-scenes --example dump_scene -- typing 1280 720 30 90 | ffmpeg -f rawvideo -pix_fmt bgra -s 1280x720 -i - out%03d.png`
use scenes::{Scene, SyntheticSource};
use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: dump_scene SCENE WIDTH HEIGHT FPS FRAMES";
    let [scene, w, h, fps, frames] = args.as_slice() else {
        return Err(usage.into());
    };
    let mut source = SyntheticSource::new(
        scene.parse::<Scene>()?,
        w.parse()?,
        h.parse()?,
        fps.parse()?,
    );
    let mut out = std::io::stdout().lock();
    for index in 1..=frames.parse::<u32>()? {
        let frame = source.advance();
        eprintln!("frame {index} damage {:?}", frame.damage);
        out.write_all(frame.frame.data)?;
    }
    Ok(())
}
