use encoder::synthetic::{Scene, SyntheticSource};
use encoder::*;
fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let scene: Scene = a[0].parse().unwrap();
    let (w, h) = (1280, 720);
    let n: u32 = a[1].parse().unwrap();
    let kbps: u32 = a[2].parse().unwrap();
    let mut src = SyntheticSource::new(scene, w, h, 60.0);
    let mut enc = Encoder::new(EncoderConfig { width: w, height: h, fps: 60.0, bitrate_bps: kbps * 1000 }).unwrap();
    let mut dec = Decoder::new().unwrap();
    let mut shown = vec![0u8; (w * h * 4) as usize];
    for i in 0..n {
        let f = src.advance();
        let mut pic = I420Buffer::new(w, h).unwrap();
        pic.convert_full(&f.frame).unwrap();
        let mut rt = vec![0u8; (w * h * 4) as usize];
        pic.to_bgrx(&mut rt).unwrap();
        let ceiling = psnr_bgrx(f.frame.data, &rt, w, h);
        let full = [Rect::new(0, 0, w, h)]; let dmg: &[Rect] = if std::env::var("FULL").is_ok() { &full } else { &f.damage }; let out = enc.encode(&f.frame, dmg, false).unwrap();
        let (len, key) = out.as_ref().map(|o| (o.data.len(), o.keyframe)).unwrap_or((0, false));
        if let Some(o) = out { if let Some(p) = dec.decode(&o.data).unwrap() { shown = p.bgrx; } }
        println!("{i:3} bytes {len:7} key {key} psnr {:.2} ceiling {:.2}", psnr_bgrx(f.frame.data, &shown, w, h), ceiling);
    }
}
