//! Picture quality measurement.

/// Peak signal-to-noise ratio in dB over the B, G and R bytes of two packed BGRX pictures
/// (stride = width * 4); the fourth byte is ignored. Identical pictures give `f64::INFINITY`.
///
/// # Panics
/// If either buffer is shorter than `width * height * 4` bytes.
pub fn psnr_bgrx(a: &[u8], b: &[u8], width: u32, height: u32) -> f64 {
    let len = width as usize * height as usize * 4;
    assert!(
        a.len() >= len && b.len() >= len,
        "psnr_bgrx: buffers shorter than {width}x{height}x4"
    );
    let mut sse: u64 = 0;
    for (pa, pb) in a[..len].chunks_exact(4).zip(b[..len].chunks_exact(4)) {
        for c in 0..3 {
            let d = i32::from(pa[c]) - i32::from(pb[c]);
            sse += (d * d) as u64;
        }
    }
    if sse == 0 {
        return f64::INFINITY;
    }
    let mse = sse as f64 / (width as f64 * height as f64 * 3.0);
    10.0 * (255.0 * 255.0 / mse).log10()
}
