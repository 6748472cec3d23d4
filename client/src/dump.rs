//! Saving decoded frames as PNG (`--dump DIR`).

use std::path::Path;

use crate::session::Frame;

/// Writes `f` as an 8-bit RGB PNG.
pub fn save_png(path: &Path, f: &Frame) -> Result<(), String> {
    if f.bgrx.len() != f.width as usize * f.height as usize * 4 {
        return Err("frame has no pixels (decoding disabled?)".into());
    }
    let rgb: Vec<u8> = f
        .bgrx
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), f.width, f.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fastest);
    let mut w = enc.write_header().map_err(|e| e.to_string())?;
    w.write_image_data(&rgb).map_err(|e| e.to_string())?;
    w.finish().map_err(|e| e.to_string())
}
