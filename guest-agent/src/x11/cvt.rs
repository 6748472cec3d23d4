//! VESA CVT mode timings (normal blanking), as Xorg's `cvt` and `xf86CVTMode` compute them,
//! for display sizes the guest has no mode for. Under virtio-gpu the timings only have to be
//! valid; the size is what the viewer asked for, kept exactly (CVT's 8-pixel rounding is
//! applied to the blanking, never to the visible width).

/// One mode line: a pixel clock and the horizontal and vertical timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Pixel clock in kHz.
    pub clock_khz: u32,
    pub hdisplay: u16,
    pub hsync_start: u16,
    pub hsync_end: u16,
    pub htotal: u16,
    pub vdisplay: u16,
    pub vsync_start: u16,
    pub vsync_end: u16,
    pub vtotal: u16,
}

impl Timings {
    /// Refresh rate in Hz these timings give.
    pub fn refresh_hz(&self) -> f64 {
        f64::from(self.clock_khz) * 1000.0 / (f64::from(self.htotal) * f64::from(self.vtotal))
    }
}

const H_GRANULARITY: u32 = 8;
const MIN_V_PORCH: u32 = 3;
/// Minimum vertical sync plus back porch, in µs.
const MIN_VSYNC_BP: f64 = 550.0;
const HSYNC_PERCENTAGE: u32 = 8;
/// The blanking formula's C' and M' (C = 40, J = 20, K = 128, M = 600).
const C_PRIME: f64 = 30.0;
const M_PRIME: f64 = 300.0;
const CLOCK_STEP_KHZ: u32 = 250;

/// Vertical sync width by aspect ratio (the CVT standard's table; 10 for other ratios).
fn vsync_lines(h: u32, v: u32) -> u32 {
    if v % 3 == 0 && v * 4 / 3 == h {
        4
    } else if v % 9 == 0 && v * 16 / 9 == h {
        5
    } else if v % 10 == 0 && v * 16 / 10 == h {
        6
    } else if (v % 4 == 0 && v * 5 / 4 == h) || (v % 9 == 0 && v * 15 / 9 == h) {
        7
    } else {
        10
    }
}

/// CVT timings for `width`×`height` at `refresh` Hz; `None` when a total overflows the
/// 16-bit fields X modes have (sizes beyond 65535 minus blanking).
pub fn cvt(width: u16, height: u16, refresh: f64) -> Option<Timings> {
    let (w, h) = (u32::from(width), u32::from(height));
    // Blanking is computed on the width rounded up to the granularity, so the visible
    // width stays what was asked for and every sync edge lies beyond it.
    let w_rnd = w.div_ceil(H_GRANULARITY) * H_GRANULARITY;
    let vsync = vsync_lines(w_rnd, h);
    let hperiod_us = (1_000_000.0 / refresh - MIN_VSYNC_BP) / f64::from(h + MIN_V_PORCH);
    let mut vsync_bp = (MIN_VSYNC_BP / hperiod_us) as u32 + 1;
    if vsync_bp < vsync + MIN_V_PORCH {
        vsync_bp = vsync + MIN_V_PORCH;
    }
    let vtotal = h + vsync_bp + MIN_V_PORCH;
    let blank_pct = (C_PRIME - M_PRIME * hperiod_us / 1000.0).max(20.0);
    let mut hblank = (f64::from(w_rnd) * blank_pct / (100.0 - blank_pct)) as u32;
    hblank -= hblank % (2 * H_GRANULARITY);
    let htotal = w_rnd + hblank;
    let mut clock = (f64::from(htotal) * 1000.0 / hperiod_us) as u32;
    clock -= clock % CLOCK_STEP_KHZ;
    let hsync_end = w_rnd + hblank / 2;
    let mut hsync_width = htotal * HSYNC_PERCENTAGE / 100;
    hsync_width -= hsync_width % H_GRANULARITY;
    let hsync_start = hsync_end - hsync_width;
    let vsync_start = h + MIN_V_PORCH;
    let vsync_end = vsync_start + vsync;
    let narrow = |v: u32| u16::try_from(v).ok();
    Some(Timings {
        clock_khz: clock,
        hdisplay: width,
        hsync_start: narrow(hsync_start)?,
        hsync_end: narrow(hsync_end)?,
        htotal: narrow(htotal)?,
        vdisplay: height,
        vsync_start: narrow(vsync_start)?,
        vsync_end: narrow(vsync_end)?,
        vtotal: narrow(vtotal)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(t: &Timings) -> (u32, [u16; 8]) {
        (
            t.clock_khz,
            [
                t.hdisplay,
                t.hsync_start,
                t.hsync_end,
                t.htotal,
                t.vdisplay,
                t.vsync_start,
                t.vsync_end,
                t.vtotal,
            ],
        )
    }

    #[test]
    fn common_sizes_match_the_cvt_tool() {
        // `cvt W H 60` of Debian's xcvt 0.1.2, copied from its mode lines.
        let cases = [
            (
                1920,
                1080,
                173_000,
                [1920, 2048, 2248, 2576, 1080, 1083, 1088, 1120],
            ),
            (
                1280,
                720,
                74_500,
                [1280, 1344, 1472, 1664, 720, 723, 728, 748],
            ),
            (
                1024,
                768,
                63_500,
                [1024, 1072, 1176, 1328, 768, 771, 775, 798],
            ),
            (
                1280,
                800,
                83_500,
                [1280, 1352, 1480, 1680, 800, 803, 809, 831],
            ),
            (800, 600, 38_250, [800, 832, 912, 1024, 600, 603, 607, 624]),
            (
                1368,
                768,
                85_250,
                [1368, 1440, 1576, 1784, 768, 771, 781, 798],
            ),
        ];
        for (w, h, clock, timings) in cases {
            let t = cvt(w, h, 60.0).unwrap();

            assert_eq!(line(&t), (clock, timings), "{w}x{h}");
        }
    }

    #[test]
    fn a_width_off_the_granularity_is_kept_and_the_syncs_lie_beyond_it() {
        let t = cvt(1366, 768, 60.0).unwrap();

        assert_eq!(t.hdisplay, 1366);
        assert!(t.hsync_start > 1366 && t.hsync_end > t.hsync_start && t.htotal > t.hsync_end);
        assert!((t.refresh_hz() - 60.0).abs() < 0.5, "{}", t.refresh_hz());
    }

    #[test]
    fn totals_beyond_sixteen_bits_are_refused() {
        assert_eq!(cvt(65_000, 1000, 60.0), None);
    }
}
