//! Saving decoded frames as PNG (`--dump DIR`).

use std::path::{Path, PathBuf};

use crate::session::Frame;

/// Why a frame could not be saved.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("frame has no pixels (decoding disabled?)")]
    NoPixels,
    #[error("{}: {source}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Png(#[from] png::EncodingError),
}

/// Writes `f` as an 8-bit RGB PNG.
pub fn save_png(path: &Path, f: &Frame) -> Result<(), DumpError> {
    if f.bgrx.len() != f.width as usize * f.height as usize * 4 {
        return Err(DumpError::NoPixels);
    }
    let rgb: Vec<u8> = f
        .bgrx
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0]])
        .collect();
    let file = std::fs::File::create(path).map_err(|source| DumpError::Create {
        path: path.to_path_buf(),
        source,
    })?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), f.width, f.height);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_compression(png::Compression::Fastest);
    let mut w = enc.write_header()?;
    w.write_image_data(&rgb)?;
    Ok(w.finish()?)
}
