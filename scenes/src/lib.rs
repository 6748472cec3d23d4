//! Deterministic synthetic desktops with exact damage, for tests, benchmarks and demos.
//!
//! Each [`Scene`] is a small compositor: a wallpaper, a taskbar and windows pre-rendered into
//! their own bitmaps, recomposed only inside the rectangles that change. The damage a frame
//! reports is exactly the set of rectangles recomposed, so it covers every changed pixel.
//! Animation advances by frame index at the nominal frame rate (time t = sequence / fps), so the
//! same seed, size and rate always give the same frames, whether pulled paced or unpaced.
//!
//! Every scene also has a mouse pointer (an arrow) that is reported through
//! [`FrameSource::cursor_update`] and never drawn into the frames, like a desktop's hardware
//! cursor: it drags the moving window, rests below the typing caret, or stays still.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use encoder::{
    CursorShape, CursorUpdate, FrameRef, FrameSource, PixelFormat, Rect, SourceError, SourceFrame,
};

mod recorded;

pub use recorded::{recordings_dir, Manifest, RecordedSource, Recording, RecordingError, MANIFEST};

/// Paces a source to its frame rate against the real clock: the first frame is due at once,
/// each next one a frame interval later, and a source that fell behind never catches up with
/// a burst.
#[derive(Debug, Clone)]
struct Pacer {
    interval: Duration,
    next_due: Option<Instant>,
}

impl Pacer {
    fn new(fps: f32) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / f64::from(fps)),
            next_due: None,
        }
    }

    /// Sleeps until the next frame is due and returns true, or sleeps until `deadline` and
    /// returns false if that comes first.
    fn wait(&mut self, deadline: Instant) -> bool {
        let now = Instant::now();
        let due = self.next_due.unwrap_or(now);
        if due > deadline {
            if deadline > now {
                std::thread::sleep(deadline - now);
            }
            return false;
        }
        if due > now {
            std::thread::sleep(due - now);
        }
        self.next_due = Some((due + self.interval).max(Instant::now()));
        true
    }
}

/// An error and its sources on one line, for [`SourceError::Other`].
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// What the synthetic desktop shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scene {
    /// Wallpaper, taskbar and three windows; one is dragged around the screen.
    Windows,
    /// Text typed into an editor window at about 15 characters per second, with a blinking caret.
    Typing,
    /// A browser-like page of text, headings and pictures scrolling up continuously.
    Scrolling,
    /// The desktop of `Windows`, never changing after the first frame.
    Still,
}

impl Scene {
    pub const ALL: [Scene; 4] = [
        Scene::Windows,
        Scene::Typing,
        Scene::Scrolling,
        Scene::Still,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scene::Windows => "windows",
            Scene::Typing => "typing",
            Scene::Scrolling => "scrolling",
            Scene::Still => "still",
        }
    }
}

impl fmt::Display for Scene {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown scene name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown scene {0:?}; expected one of windows, typing, scrolling, still")]
pub struct ParseSceneError(String);

impl FromStr for Scene {
    type Err = ParseSceneError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scene::ALL
            .into_iter()
            .find(|scene| scene.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| ParseSceneError(s.to_owned()))
    }
}

// ---------------------------------------------------------------------------------------------
// Small deterministic helpers.

/// splitmix64: tiny, fast, good enough for content generation, and stable across platforms.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`lo` when the range is empty).
    fn range(&mut self, lo: u32, hi: u32) -> u32 {
        if hi <= lo {
            return lo;
        }
        lo + (self.next_u64() % u64::from(hi - lo)) as u32
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.range(0, 100) < percent
    }

    /// A colour whose red, green and blue are drawn, in that order, from `lo[i]..hi[i]`.
    fn color(&mut self, lo: [u32; 3], hi: [u32; 3]) -> Color {
        let r = self.range(lo[0], hi[0]) as u8;
        let g = self.range(lo[1], hi[1]) as u8;
        let b = self.range(lo[2], hi[2]) as u8;
        rgb(r, g, b)
    }
}

fn hash2(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.wrapping_mul(0x2545_f491_4f6c_dd1d)).next_u64()
}

/// A colour in memory order B, G, R, X.
type Color = [u8; 4];

const fn rgb(r: u8, g: u8, b: u8) -> Color {
    [b, g, r, 255]
}

fn mix(a: Color, b: Color, alpha: u32) -> Color {
    let m =
        |x: u8, y: u8| ((u32::from(x) * (255 - alpha) + u32::from(y) * alpha + 127) / 255) as u8;
    [m(a[0], b[0]), m(a[1], b[1]), m(a[2], b[2]), 255]
}

/// A BGRX bitmap, stride = width * 4.
#[derive(Clone)]
struct Canvas {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32, fill: Color) -> Self {
        let mut data = Vec::with_capacity(width as usize * height as usize * 4);
        for _ in 0..width as usize * height as usize {
            data.extend_from_slice(&fill);
        }
        Self {
            width,
            height,
            data,
        }
    }

    fn stride(&self) -> usize {
        self.width as usize * 4
    }

    fn bounds(&self) -> Rect {
        Rect::new(0, 0, self.width, self.height)
    }

    fn row_mut(&mut self, y: u32) -> &mut [u8] {
        let s = self.stride();
        &mut self.data[y as usize * s..(y as usize + 1) * s]
    }

    fn fill_rect(&mut self, r: Rect, color: Color) {
        let r = r.clamp_to(self.width, self.height);
        for y in r.y..r.bottom() {
            let row = self.row_mut(y);
            for px in row[r.x as usize * 4..r.right() as usize * 4].chunks_exact_mut(4) {
                px.copy_from_slice(&color);
            }
        }
    }

    /// Rectangle outline, 1 pixel wide.
    fn frame_rect(&mut self, r: Rect, color: Color) {
        if r.is_empty() {
            return;
        }
        self.fill_rect(Rect::new(r.x, r.y, r.width, 1), color);
        self.fill_rect(Rect::new(r.x, r.bottom() - 1, r.width, 1), color);
        self.fill_rect(Rect::new(r.x, r.y, 1, r.height), color);
        self.fill_rect(Rect::new(r.right() - 1, r.y, 1, r.height), color);
    }

    /// Vertical gradient from `top` to `bottom` inside `r`.
    fn gradient_rect(&mut self, r: Rect, top: Color, bottom: Color) {
        let r = r.clamp_to(self.width, self.height);
        for y in r.y..r.bottom() {
            let alpha = if r.height > 1 {
                (y - r.y) * 255 / (r.height - 1)
            } else {
                0
            };
            self.fill_rect(Rect::new(r.x, y, r.width, 1), mix(top, bottom, alpha));
        }
    }

    /// Moves the contents of `r` up by `dy` rows in place (the bottom `dy` rows keep their old
    /// contents for the caller to redraw).
    fn scroll_up(&mut self, r: Rect, dy: u32) {
        let r = r.clamp_to(self.width, self.height);
        let stride = self.stride();
        let (x0, x1) = (r.x as usize * 4, r.right() as usize * 4);
        for y in r.y..r.bottom().saturating_sub(dy) {
            let src = (y + dy) as usize * stride;
            self.data
                .copy_within(src + x0..src + x1, y as usize * stride + x0);
        }
    }

    /// Copies `src` (a rectangle of `from`) to (`dx`, `dy`) here, clipped on both sides.
    fn blit(&mut self, from: &Canvas, src: Rect, dx: u32, dy: u32) {
        let src = src.clamp_to(from.width, from.height);
        let w = src.width.min(self.width.saturating_sub(dx));
        let h = src.height.min(self.height.saturating_sub(dy));
        for row in 0..h {
            let s = (src.y + row) as usize * from.stride() + src.x as usize * 4;
            let d = (dy + row) as usize * self.stride() + dx as usize * 4;
            self.data[d..d + w as usize * 4].copy_from_slice(&from.data[s..s + w as usize * 4]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Text: a fixed pseudo-font of anti-aliased glyphs (text-like strokes, not real letters).

const GLYPH_W: u32 = 8;
const GLYPH_H: u32 = 16;
const GLYPH_COUNT: usize = 64;

struct Font {
    scale: u32,
    /// GLYPH_COUNT masks of GLYPH_W x GLYPH_H coverage values.
    masks: Vec<[u8; (GLYPH_W * GLYPH_H) as usize]>,
}

impl Font {
    fn new(scale: u32) -> Self {
        let mut rng = Rng::new(0xf0_47);
        let mut masks = Vec::with_capacity(GLYPH_COUNT);
        for _ in 0..GLYPH_COUNT {
            let mut ink = [false; (GLYPH_W * GLYPH_H) as usize];
            let tall = rng.chance(30);
            let top = if tall { 3 } else { 6 };
            let descender = rng.chance(12);
            let bottom = if descender { 14 } else { 12 };
            for _ in 0..rng.range(2, 5) {
                if rng.chance(55) {
                    let x = rng.range(1, 6);
                    let (y0, y1) = (rng.range(top, top + 3), rng.range(10, bottom + 1));
                    for y in y0..=y1.max(y0) {
                        ink[(y * GLYPH_W + x) as usize] = true;
                    }
                } else {
                    let y = rng.range(top.max(6), 13);
                    let (x0, x1) = (rng.range(1, 3), rng.range(4, 7));
                    for x in x0..=x1 {
                        ink[(y * GLYPH_W + x) as usize] = true;
                    }
                }
            }
            // Soft right and bottom edges, like hinted anti-aliased text.
            let mut mask = [0u8; (GLYPH_W * GLYPH_H) as usize];
            for y in 0..GLYPH_H {
                for x in 0..GLYPH_W {
                    let i = (y * GLYPH_W + x) as usize;
                    mask[i] = if ink[i] {
                        255
                    } else if x > 0 && ink[i - 1] {
                        90
                    } else if y > 0 && ink[i - GLYPH_W as usize] {
                        50
                    } else {
                        0
                    };
                }
            }
            masks.push(mask);
        }
        Self { scale, masks }
    }

    fn cell_w(&self) -> u32 {
        GLYPH_W * self.scale
    }

    fn cell_h(&self) -> u32 {
        GLYPH_H * self.scale
    }

    /// Draws glyph `code` with its cell's top-left at (`x`, `y`), clipped to `clip`.
    #[allow(
        clippy::too_many_arguments,
        reason = "a drawing primitive; every argument is needed"
    )]
    fn draw(&self, c: &mut Canvas, code: u64, x: u32, y: u32, ink: Color, bg: Color, clip: Rect) {
        let mask = &self.masks[(code % GLYPH_COUNT as u64) as usize];
        let clip = clip.clamp_to(c.width, c.height);
        let gy0 = clip.y.saturating_sub(y);
        let gy1 = self.cell_h().min(clip.bottom().saturating_sub(y));
        for gy in gy0..gy1 {
            let py = y + gy;
            for gx in 0..self.cell_w() {
                let px = x + gx;
                if px < clip.x || px >= clip.right() {
                    continue;
                }
                let a = mask[((gy / self.scale) * GLYPH_W + gx / self.scale) as usize];
                if a != 0 {
                    let i = py as usize * c.stride() + px as usize * 4;
                    c.data[i..i + 4].copy_from_slice(&mix(bg, ink, u32::from(a)));
                }
            }
        }
    }

    /// Fills `area` with lines of words generated from `seed`, like a page of prose.
    fn paragraph(&self, c: &mut Canvas, area: Rect, seed: u64, ink: Color, bg: Color) {
        let cols = area.width / self.cell_w();
        let rows = area.height / (self.cell_h() + 2 * self.scale);
        for row in 0..rows {
            let y = area.y + row * (self.cell_h() + 2 * self.scale);
            let len = if row % 5 == 4 { cols / 2 } else { cols };
            for (col, code) in line_text(hash2(seed, u64::from(row)), len)
                .into_iter()
                .enumerate()
            {
                if let Some(code) = code {
                    self.draw(
                        c,
                        code,
                        area.x + col as u32 * self.cell_w(),
                        y,
                        ink,
                        bg,
                        area,
                    );
                }
            }
        }
    }
}

/// Glyph codes for one line of `cols` cells: words of 2..9 letters separated by spaces (None).
fn line_text(seed: u64, cols: u32) -> Vec<Option<u64>> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(cols as usize);
    while (out.len() as u32) < cols {
        let word = rng.range(2, 10);
        if out.len() as u32 + word > cols {
            break;
        }
        for _ in 0..word {
            out.push(Some(rng.next_u64()));
        }
        out.push(None);
    }
    out.truncate(cols as usize);
    out
}

// ---------------------------------------------------------------------------------------------
// Desktop: wallpaper, taskbar and windows.

/// A window: a bitmap placed on the screen (always fully on screen).
struct Window {
    x: u32,
    y: u32,
    canvas: Canvas,
    /// Client area in window coordinates (below the title bar, inside the border).
    client: Rect,
}

impl Window {
    fn screen_rect(&self) -> Rect {
        Rect::new(self.x, self.y, self.canvas.width, self.canvas.height)
    }
}

const TEXT_INK: Color = rgb(0x22, 0x24, 0x28);
const PAPER: Color = rgb(0xfb, 0xfb, 0xfa);
const BORDER: Color = rgb(0x30, 0x34, 0x3a);

fn make_window(
    font: &Font,
    rng: &mut Rng,
    x: u32,
    y: u32,
    width: u32,
    height: u32,
    title_color: Color,
) -> Window {
    let s = font.scale;
    let mut c = Canvas::new(width, height, PAPER);
    let title_h = (24 * s).min(height);
    c.gradient_rect(
        Rect::new(0, 0, width, title_h),
        title_color,
        mix(title_color, rgb(0, 0, 0), 40),
    );
    let title_bg = mix(title_color, rgb(0, 0, 0), 20);
    let title_clip = Rect::new(0, 0, width.saturating_sub(70 * s), title_h);
    for (i, code) in line_text(rng.next_u64(), 14).into_iter().enumerate() {
        if let Some(code) = code {
            font.draw(
                &mut c,
                code,
                10 * s + i as u32 * font.cell_w(),
                4 * s,
                rgb(255, 255, 255),
                title_bg,
                title_clip,
            );
        }
    }
    for (i, color) in [
        rgb(0xe8, 0x5c, 0x4a),
        rgb(0xf2, 0xb8, 0x3b),
        rgb(0x5c, 0xb8, 0x5c),
    ]
    .into_iter()
    .enumerate()
    {
        let bx = width.saturating_sub((22 * (i as u32 + 1)) * s);
        c.fill_rect(Rect::new(bx, 6 * s, 12 * s, 12 * s), color);
    }
    c.frame_rect(c.bounds(), BORDER);
    let client = Rect::new(
        1,
        title_h,
        width.saturating_sub(2),
        height.saturating_sub(title_h + 1),
    );
    Window {
        x,
        y,
        canvas: c,
        client,
    }
}

struct Desktop {
    width: u32,
    height: u32,
    font: Font,
    /// Wallpaper and taskbar: everything below the windows.
    background: Canvas,
    /// Bottom to top.
    windows: Vec<Window>,
    screen: Canvas,
}

impl Desktop {
    fn new(width: u32, height: u32, rng: &mut Rng) -> Self {
        let font = Font::new(1 + height / 1400);
        let s = font.scale;
        let mut background = Canvas::new(width, height, rgb(0, 0, 0));
        // Wallpaper: a smooth diagonal blend between two seeded colours with soft waves.
        let c0 = rng.color([10, 40, 90], [60, 100, 160]);
        let c1 = rng.color([120, 60, 80], [200, 140, 150]);
        let phase = rng.range(0, 628) as f32 / 100.0;
        let span = (width + height).max(1) as f32;
        for y in 0..height {
            let row = background.row_mut(y);
            for (x, px) in row.chunks_exact_mut(4).enumerate() {
                let t = (x as f32 + y as f32) / span;
                let wave = (x as f32 / width.max(1) as f32 * 6.0 + phase).sin()
                    * (y as f32 / height.max(1) as f32 * 4.0).cos()
                    * 0.12;
                let a = ((t + wave).clamp(0.0, 1.0) * 255.0) as u32;
                px.copy_from_slice(&mix(c0, c1, a));
            }
        }
        // Taskbar with a start button, a few application icons and a clock.
        let bar_h = (40 * s).min(height);
        let bar = Rect::new(0, height - bar_h, width, bar_h);
        background.fill_rect(bar, rgb(0x1e, 0x22, 0x28));
        background.fill_rect(Rect::new(0, bar.y, width, 1), rgb(0x44, 0x4a, 0x52));
        for i in 0..8u32 {
            let color = rng.color([60; 3], [250; 3]);
            background.fill_rect(
                Rect::new(8 * s + i * 40 * s, bar.y + 8 * s, 24 * s, 24 * s),
                color,
            );
        }
        let clock_x = width.saturating_sub(60 * s);
        for (i, code) in line_text(rng.next_u64(), 5).into_iter().enumerate() {
            if let Some(code) = code {
                font.draw(
                    &mut background,
                    code,
                    clock_x + i as u32 * font.cell_w(),
                    bar.y + 12 * s,
                    rgb(0xe0, 0xe0, 0xe0),
                    rgb(0x1e, 0x22, 0x28),
                    bar,
                );
            }
        }
        let screen = background.clone();
        Self {
            width,
            height,
            font,
            background,
            windows: Vec::new(),
            screen,
        }
    }

    /// Height of the area above the taskbar.
    fn work_height(&self) -> u32 {
        self.height - (40 * self.font.scale).min(self.height)
    }

    /// Adds a window at a fraction of the work area (clamped so it fits on screen).
    fn add_window(&mut self, rng: &mut Rng, frac: [f32; 4], title: Color) -> usize {
        let (w, h) = (self.width as f32, self.work_height().max(1) as f32);
        let ww = ((frac[2] * w) as u32).clamp(1, self.width);
        let wh = ((frac[3] * h) as u32).clamp(1, self.height);
        let x = ((frac[0] * w) as u32).min(self.width - ww);
        let y = ((frac[1] * h) as u32).min(self.height - wh);
        let win = make_window(&self.font, rng, x, y, ww, wh, title);
        self.windows.push(win);
        self.windows.len() - 1
    }

    /// Recomposes `r` of the screen from the wallpaper and the windows.
    fn compose(&mut self, r: Rect) {
        let r = r.clamp_to(self.width, self.height);
        if r.is_empty() {
            return;
        }
        self.screen.blit(&self.background, r, r.x, r.y);
        for win in &self.windows {
            let wr = win.screen_rect();
            let x0 = r.x.max(wr.x);
            let y0 = r.y.max(wr.y);
            let x1 = r.right().min(wr.right());
            let y1 = r.bottom().min(wr.bottom());
            if x0 < x1 && y0 < y1 {
                self.screen.blit(
                    &win.canvas,
                    Rect::new(x0 - wr.x, y0 - wr.y, x1 - x0, y1 - y0),
                    x0,
                    y0,
                );
            }
        }
    }

    /// Screen rectangle of a window-relative rectangle.
    fn to_screen(&self, win: usize, r: Rect) -> Rect {
        let w = &self.windows[win];
        Rect::new(w.x + r.x, w.y + r.y, r.width, r.height).clamp_to(self.width, self.height)
    }
}

/// Window content kinds used by the desktop scenes.
fn fill_document(font: &Font, win: &mut Window, seed: u64) {
    let s = font.scale;
    let area = win.client;
    let inner = Rect::new(
        area.x + 12 * s,
        area.y + 10 * s,
        area.width.saturating_sub(24 * s),
        area.height.saturating_sub(20 * s),
    );
    font.paragraph(&mut win.canvas, inner, seed, TEXT_INK, PAPER);
}

fn fill_icons(font: &Font, win: &mut Window, rng: &mut Rng) {
    let s = font.scale;
    let area = win.client;
    let step = 72 * s;
    let mut y = area.y + 12 * s;
    while y + 56 * s <= area.bottom() {
        let mut x = area.x + 12 * s;
        while x + 48 * s <= area.right() {
            let color = rng.color([40; 3], [240; 3]);
            win.canvas.gradient_rect(
                Rect::new(x + 8 * s, y, 32 * s, 32 * s),
                color,
                mix(color, rgb(0, 0, 0), 80),
            );
            for (i, code) in line_text(rng.next_u64(), 6).into_iter().enumerate() {
                if let Some(code) = code {
                    font.draw(
                        &mut win.canvas,
                        code,
                        x + i as u32 * font.cell_w(),
                        y + 36 * s,
                        TEXT_INK,
                        PAPER,
                        area,
                    );
                }
            }
            x += step;
        }
        y += step;
    }
}

fn fill_chart(win: &mut Window, rng: &mut Rng) {
    let area = win.client;
    win.canvas.fill_rect(area, rgb(0xf4, 0xf6, 0xf8));
    let bars = 12u32;
    let bw = area.width / (bars * 2 + 1);
    for i in 0..bars {
        let h = rng.range(area.height / 8, area.height * 7 / 8 + 1);
        let color = mix(rgb(0x3a, 0x7b, 0xd5), rgb(0xe0, 0x60, 0x40), i * 255 / bars);
        win.canvas.gradient_rect(
            Rect::new(area.x + bw * (2 * i + 1), area.bottom() - h, bw, h),
            color,
            mix(color, rgb(255, 255, 255), 90),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Scenes.

enum SceneState {
    Windows {
        dragged: usize,
        origin: (f64, f64),
        velocity: (f64, f64),
    },
    Typing {
        editor: usize,
        text: Rng,
        typed: u64,
        col: u32,
        row: u32,
        caret_on: bool,
        word_left: u32,
    },
    Scrolling {
        browser: usize,
        page: Page,
        offset: u64,
    },
    Still,
}

/// Typing speed of the Typing scene, characters per second.
const TYPING_CPS: f64 = 15.0;
/// Caret blink half-period.
const CARET_HALF_PERIOD_S: f64 = 0.53;
/// Scrolling speed as a share of the screen height per second.
const SCROLL_SCREENS_PER_S: f64 = 0.4;

/// Folds a coordinate moving forever into 0..=max and back (a window bouncing off the edges).
fn bounce(pos: f64, max: u32) -> u32 {
    if max == 0 {
        return 0;
    }
    let period = 2.0 * f64::from(max);
    let p = pos.rem_euclid(period);
    (if p <= f64::from(max) { p } else { period - p }).round() as u32
}

/// The pointer image: black outline, white fill, transparent elsewhere; hotspot at its tip.
const ARROW: [&str; 18] = [
    "X           ",
    "XX          ",
    "X.X         ",
    "X..X        ",
    "X...X       ",
    "X....X      ",
    "X.....X     ",
    "X......X    ",
    "X.......X   ",
    "X........X  ",
    "X.........X ",
    "X......XXXXX",
    "X...X..X    ",
    "X..X X..X   ",
    "X.X  X..X   ",
    "XX    X..X  ",
    "X     X..X  ",
    "       XX   ",
];

/// The synthetic pointer's shape ([`ARROW`] as BGRA, hotspot at the tip).
pub fn arrow_cursor() -> CursorShape {
    let (width, height) = (ARROW[0].len() as u32, ARROW.len() as u32);
    let mut bgra = Vec::with_capacity((width * height * 4) as usize);
    for row in ARROW {
        for c in row.bytes() {
            bgra.extend_from_slice(match c {
                b'X' => &[0, 0, 0, 255],
                b'.' => &[255, 255, 255, 255],
                _ => &[0, 0, 0, 0],
            });
        }
    }
    CursorShape {
        hot_x: 0,
        hot_y: 0,
        width,
        height,
        bgra,
    }
}

/// A synthetic frame source rendering `scene` at `width` x `height`, `fps` frames per second.
pub struct SyntheticSource {
    scene: Scene,
    fps: f32,
    desktop: Desktop,
    state: SceneState,
    /// Frames rendered so far; frame n (from 1) shows t = (n - 1) / fps.
    rendered: u64,
    pacer: Pacer,
    /// Pointer position last returned by `cursor_update` (`None`: nothing returned yet).
    cursor_reported: Option<(i32, i32)>,
}

impl fmt::Debug for SyntheticSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SyntheticSource")
            .field("scene", &self.scene)
            .field("width", &self.desktop.width)
            .field("height", &self.desktop.height)
            .field("fps", &self.fps)
            .field("rendered", &self.rendered)
            .finish()
    }
}

impl SyntheticSource {
    /// A source with the default seed. `width`/`height` are clamped to 1..=8192, `fps` to
    /// 0.1..=1000.
    pub fn new(scene: Scene, width: u32, height: u32, fps: f32) -> Self {
        Self::with_seed(scene, width, height, fps, 0x5eed)
    }

    /// A source whose content is fully determined by `seed`, size and rate.
    pub fn with_seed(scene: Scene, width: u32, height: u32, fps: f32, seed: u64) -> Self {
        let (width, height) = (width.clamp(1, 8192), height.clamp(1, 8192));
        let fps = if fps.is_nan() {
            30.0
        } else {
            fps.clamp(0.1, 1000.0)
        };
        let mut rng = Rng::new(seed);
        let mut desktop = Desktop::new(width, height, &mut rng);
        let state = match scene {
            Scene::Windows | Scene::Still => {
                let a =
                    desktop.add_window(&mut rng, [0.04, 0.05, 0.45, 0.55], rgb(0x3a, 0x6e, 0xa5));
                let b = desktop.add_window(&mut rng, [0.45, 0.12, 0.5, 0.6], rgb(0x5a, 0x7d, 0x3c));
                let c = desktop.add_window(&mut rng, [0.2, 0.35, 0.42, 0.5], rgb(0x8a, 0x4b, 0x9c));
                let font = Font::new(desktop.font.scale);
                fill_document(&font, &mut desktop.windows[a], rng.next_u64());
                fill_icons(&font, &mut desktop.windows[b], &mut rng);
                fill_chart(&mut desktop.windows[c], &mut rng);
                if scene == Scene::Still {
                    SceneState::Still
                } else {
                    let win = desktop.windows[c].screen_rect();
                    let speed = f64::from(width.max(height)) * 0.3;
                    SceneState::Windows {
                        dragged: c,
                        origin: (f64::from(win.x), f64::from(win.y)),
                        velocity: (speed, speed * 0.6),
                    }
                }
            }
            Scene::Typing => {
                let a =
                    desktop.add_window(&mut rng, [0.55, 0.08, 0.42, 0.5], rgb(0x5a, 0x7d, 0x3c));
                let font = Font::new(desktop.font.scale);
                fill_icons(&font, &mut desktop.windows[a], &mut rng);
                let editor =
                    desktop.add_window(&mut rng, [0.06, 0.1, 0.6, 0.78], rgb(0x2f, 0x4f, 0x7f));
                SceneState::Typing {
                    editor,
                    text: Rng::new(rng.next_u64()),
                    typed: 0,
                    col: 0,
                    row: 0,
                    caret_on: false,
                    word_left: 0,
                }
            }
            Scene::Scrolling => {
                let browser =
                    desktop.add_window(&mut rng, [0.0, 0.0, 1.0, 1.0], rgb(0x44, 0x48, 0x50));
                let page = Page::new(rng.next_u64(), desktop.font.scale);
                SceneState::Scrolling {
                    browser,
                    page,
                    offset: 0,
                }
            }
        };
        let mut source = Self {
            scene,
            fps,
            desktop,
            state,
            rendered: 0,
            pacer: Pacer::new(fps),
            cursor_reported: None,
        };
        source.init_scene();
        source
    }

    /// The pointer's hotspot now, in screen pixels: on the dragged window's title bar, just
    /// below the typing caret, or resting over the page or desktop.
    pub fn pointer(&self) -> (i32, i32) {
        let d = &self.desktop;
        let s = d.font.scale;
        let (x, y) = match &self.state {
            SceneState::Windows { dragged, .. } => {
                let w = d.windows[*dragged].screen_rect();
                (
                    w.x + (w.width / 3).min(80 * s),
                    w.y + (w.height / 2).min(12 * s),
                )
            }
            SceneState::Typing {
                editor, col, row, ..
            } => {
                let area = text_area(&d.windows[*editor], s);
                let (cw, lh) = (d.font.cell_w(), d.font.cell_h() + 2 * s);
                let caret = d.to_screen(
                    *editor,
                    Rect::new(area.x + col * cw, area.y + row * lh, 1, 1),
                );
                (caret.x + 6 * s, caret.y + lh + 4 * s)
            }
            SceneState::Scrolling { .. } => (d.width * 2 / 3, d.height / 2),
            SceneState::Still => (d.width / 2, d.height / 2),
        };
        (x.min(d.width - 1) as i32, y.min(d.height - 1) as i32)
    }

    pub fn scene(&self) -> Scene {
        self.scene
    }

    pub fn fps(&self) -> f32 {
        self.fps
    }

    /// Draws the scene's state at t = 0 into its windows and composes the whole screen.
    fn init_scene(&mut self) {
        if let SceneState::Scrolling { browser, page, .. } = &mut self.state {
            let win = &mut self.desktop.windows[*browser];
            let view = viewport(win, self.desktop.font.scale);
            let scale = self.desktop.font.scale;
            // Toolbar: back/forward buttons and an address bar.
            let bar = Rect::new(view.x, win.client.y, view.width, view.y - win.client.y);
            win.canvas.fill_rect(bar, rgb(0xe8, 0xea, 0xed));
            win.canvas.fill_rect(
                Rect::new(view.x, view.y.saturating_sub(1), view.width, 1),
                rgb(0xb0, 0xb4, 0xba),
            );
            for i in 0..2 {
                win.canvas.fill_rect(
                    Rect::new(
                        bar.x + (8 + 28 * i) * scale,
                        bar.y + 8 * scale,
                        20 * scale,
                        20 * scale,
                    ),
                    rgb(0xc4, 0xc8, 0xce),
                );
            }
            let address = Rect::new(
                bar.x + 72 * scale,
                bar.y + 6 * scale,
                bar.width.saturating_sub(90 * scale),
                24 * scale,
            );
            win.canvas.fill_rect(address, rgb(0xff, 0xff, 0xff));
            win.canvas.frame_rect(address, rgb(0xb0, 0xb4, 0xba));
            let font = &self.desktop.font;
            for (i, code) in line_text(page.seed, 40).into_iter().enumerate() {
                if let Some(code) = code {
                    font.draw(
                        &mut win.canvas,
                        code,
                        address.x + 8 * scale + i as u32 * font.cell_w(),
                        address.y + 4 * scale,
                        rgb(0x50, 0x54, 0x5a),
                        rgb(255, 255, 255),
                        address,
                    );
                }
            }
            page.render(&mut win.canvas, view, 0, 0, view.height);
        }
        if let SceneState::Typing { editor, .. } = &self.state {
            let win = &mut self.desktop.windows[*editor];
            let area = text_area(win, self.desktop.font.scale);
            win.canvas.fill_rect(area, PAPER);
        }
        self.desktop
            .compose(Rect::new(0, 0, self.desktop.width, self.desktop.height));
    }

    /// How many frames were rendered: the last one returned is frame `rendered()`, counting
    /// from 1 (a stream that encodes every frame publishes it with this sequence).
    pub fn rendered(&self) -> u64 {
        self.rendered
    }

    /// Renders the next frame immediately, without pacing (benchmarks, tests).
    pub fn advance(&mut self) -> SourceFrame<'_> {
        self.rendered += 1;
        let damage = if self.rendered == 1 {
            // The first frame is new in full; it shows t = 0.
            self.update(0.0);
            vec![Rect::new(0, 0, self.desktop.width, self.desktop.height)]
        } else {
            let t = (self.rendered - 1) as f64 / f64::from(self.fps);
            self.update(t)
        };
        for r in &damage {
            self.desktop.compose(*r);
        }
        SourceFrame {
            frame: FrameRef::packed(
                self.desktop.width,
                self.desktop.height,
                PixelFormat::Bgrx,
                &self.desktop.screen.data,
            ),
            damage,
            captured_at: Instant::now(),
        }
    }

    /// Moves the scene to time `t` (seconds) and returns the screen rectangles that changed.
    fn update(&mut self, t: f64) -> Vec<Rect> {
        let scale = self.desktop.font.scale;
        match &mut self.state {
            SceneState::Still => Vec::new(),
            SceneState::Windows {
                dragged,
                origin,
                velocity,
            } => {
                let win = &self.desktop.windows[*dragged];
                let old = win.screen_rect();
                let max_x = self.desktop.width - old.width;
                let max_y = self.desktop.work_height().saturating_sub(old.height);
                let x = bounce(origin.0 + velocity.0 * t, max_x);
                let y = bounce(
                    origin.1 + velocity.1 * t,
                    max_y.min(self.desktop.height - old.height),
                );
                if (x, y) == (old.x, old.y) {
                    return Vec::new();
                }
                let win = &mut self.desktop.windows[*dragged];
                win.x = x;
                win.y = y;
                vec![old, win.screen_rect()]
            }
            SceneState::Typing {
                editor,
                text,
                typed,
                col,
                row,
                caret_on,
                word_left,
            } => {
                let editor = *editor;
                let font = &self.desktop.font;
                let (cw, lh) = (font.cell_w(), font.cell_h() + 2 * scale);
                let win = &mut self.desktop.windows[editor];
                let area = text_area(win, scale);
                let (cols, rows) = (area.width / cw, area.height / lh);
                let mut damage: Vec<Rect> = Vec::new();
                let mut scrolled = false;
                if cols == 0 || rows == 0 {
                    return damage;
                }
                let caret_cell = |col: u32, row: u32| {
                    Rect::new(
                        area.x + col * cw,
                        area.y + row * lh,
                        (2 * scale).min(cw),
                        lh,
                    )
                };
                let due = (t * TYPING_CPS).floor() as u64;
                let typing = due > *typed;
                // The caret stays lit while typing and blinks when idle.
                let blink_on = ((t / CARET_HALF_PERIOD_S).floor() as u64) % 2 == 0;
                if !typing && blink_on == *caret_on {
                    return damage;
                }
                // Take the caret off before typing.
                if *caret_on {
                    win.canvas.fill_rect(caret_cell(*col, *row), PAPER);
                    damage.push(caret_cell(*col, *row));
                }
                while *typed < due {
                    *typed += 1;
                    if *word_left == 0 {
                        // Between words: a space, or a new line when the next word won't fit.
                        let next = text.range(2, 10);
                        if *col > 0 {
                            *col += 1;
                        }
                        if *col + next > cols || text.chance(4) {
                            *col = 0;
                            *row += 1;
                        }
                        *word_left = next;
                        if *row >= rows {
                            // Scroll the text up one line.
                            win.canvas.scroll_up(area, lh);
                            win.canvas.fill_rect(
                                Rect::new(
                                    area.x,
                                    area.y + (rows - 1) * lh,
                                    area.width,
                                    area.height - (rows - 1) * lh,
                                ),
                                PAPER,
                            );
                            *row = rows - 1;
                            scrolled = true;
                        }
                    }
                    let cell = Rect::new(area.x + *col * cw, area.y + *row * lh, cw, lh);
                    font.draw(
                        &mut win.canvas,
                        text.next_u64(),
                        cell.x,
                        cell.y + scale,
                        TEXT_INK,
                        PAPER,
                        area,
                    );
                    damage.push(cell);
                    *col += 1;
                    *word_left -= 1;
                }
                *caret_on = typing || blink_on;
                if *col < cols && *caret_on {
                    win.canvas.fill_rect(caret_cell(*col, *row), TEXT_INK);
                    damage.push(caret_cell(*col, *row));
                } else {
                    *caret_on = false;
                }
                if scrolled {
                    // Everything typed this frame lies in the text area, which moved as a whole.
                    damage = vec![area];
                }
                damage
                    .into_iter()
                    .map(|r| self.desktop.to_screen(editor, r))
                    .collect()
            }
            SceneState::Scrolling {
                browser,
                page,
                offset,
            } => {
                let browser = *browser;
                let win = &mut self.desktop.windows[browser];
                let view = viewport(win, scale);
                let speed = f64::from(self.desktop.height) * SCROLL_SCREENS_PER_S;
                let target = (t * speed).floor() as u64;
                let dy = target - *offset;
                if dy == 0 || view.is_empty() {
                    return Vec::new();
                }
                if dy < u64::from(view.height) {
                    let dy = dy as u32;
                    win.canvas.scroll_up(view, dy);
                    page.render(&mut win.canvas, view, target, view.height - dy, view.height);
                } else {
                    page.render(&mut win.canvas, view, target, 0, view.height);
                }
                *offset = target;
                vec![self.desktop.to_screen(browser, view)]
            }
        }
    }
}

/// The editor's text area (window coordinates).
fn text_area(win: &Window, scale: u32) -> Rect {
    let c = win.client;
    Rect::new(
        c.x + 10 * scale,
        c.y + 8 * scale,
        c.width.saturating_sub(20 * scale),
        c.height.saturating_sub(16 * scale),
    )
}

/// The browser's page viewport (window coordinates): the client area below a toolbar.
fn viewport(win: &Window, scale: u32) -> Rect {
    let c = win.client;
    let bar = (36 * scale).min(c.height);
    Rect::new(c.x, c.y + bar, c.width, c.height - bar)
}

/// An endless web page laid out in blocks (headings, paragraphs, pictures) generated on demand.
struct Page {
    seed: u64,
    scale: u32,
    font: Font,
    heading_font: Font,
    /// (top, height, kind, seed) in page coordinates, contiguous from 0.
    blocks: Vec<(u64, u32, BlockKind, u64)>,
}

#[derive(Clone, Copy)]
enum BlockKind {
    Heading,
    Paragraph,
    Picture,
    Gap,
}

impl Page {
    fn new(seed: u64, scale: u32) -> Self {
        Self {
            seed,
            scale,
            font: Font::new(scale),
            heading_font: Font::new(scale * 2),
            blocks: Vec::new(),
        }
    }

    fn line_height(&self) -> u32 {
        self.font.cell_h() + 4 * self.scale
    }

    /// The block containing page row `y`, generating blocks as needed.
    fn block_at(&mut self, y: u64) -> (u64, u32, BlockKind, u64) {
        while self.blocks.last().is_none_or(|b| b.0 + u64::from(b.1) <= y) {
            let n = self.blocks.len() as u64;
            let top = self.blocks.last().map_or(0, |b| b.0 + u64::from(b.1));
            let mut rng = Rng::new(hash2(self.seed, n));
            let lh = self.line_height();
            let (kind, height) = if n % 2 == 1 {
                (BlockKind::Gap, 14 * self.scale)
            } else {
                match rng.range(0, 10) {
                    0..=1 => (BlockKind::Heading, 2 * lh),
                    2..=7 => (BlockKind::Paragraph, lh * rng.range(3, 9)),
                    _ => (BlockKind::Picture, rng.range(120, 300) * self.scale),
                }
            };
            self.blocks.push((top, height, kind, rng.next_u64()));
        }
        let i = self.blocks.partition_point(|b| b.0 + u64::from(b.1) <= y);
        self.blocks[i]
    }

    /// Renders viewport rows `from..to` showing the page scrolled to `offset`.
    fn render(&mut self, c: &mut Canvas, view: Rect, offset: u64, from: u32, to: u32) {
        let margin = (view.width / 10).max(4 * self.scale);
        let content = Rect::new(view.x + margin, 0, view.width.saturating_sub(2 * margin), 0);
        for vy in from..to {
            let y = offset + u64::from(vy);
            let (top, height, kind, seed) = self.block_at(y);
            let by = (y - top) as u32;
            let screen_y = view.y + vy;
            c.fill_rect(Rect::new(view.x, screen_y, view.width, 1), PAPER);
            let row_clip = Rect::new(content.x, screen_y, content.width, 1);
            match kind {
                BlockKind::Gap => {}
                BlockKind::Heading | BlockKind::Paragraph => {
                    let (lh, cell_h) = (self.line_height(), self.font.cell_h());
                    let heading = matches!(kind, BlockKind::Heading);
                    // Headings use double-size glyphs.
                    let zoom = if heading { 2 } else { 1 };
                    let (line, in_line) = (by / (lh * zoom), by % (lh * zoom));
                    if in_line >= cell_h * zoom {
                        continue;
                    }
                    let cw = self.font.cell_w() * zoom;
                    let cols = content.width / cw;
                    let len = if !heading && line % 4 == 3 {
                        cols * 2 / 3
                    } else {
                        cols
                    };
                    let ink = if heading {
                        rgb(0x10, 0x30, 0x60)
                    } else {
                        TEXT_INK
                    };
                    let font = if heading {
                        &self.heading_font
                    } else {
                        &self.font
                    };
                    for (col, code) in line_text(hash2(seed, u64::from(line)), len)
                        .into_iter()
                        .enumerate()
                    {
                        if let Some(code) = code {
                            let gx = content.x + col as u32 * cw;
                            font.draw(c, code, gx, screen_y - in_line, ink, PAPER, row_clip);
                        }
                    }
                }
                BlockKind::Picture => {
                    let mut rng = Rng::new(seed);
                    let w = content.width.min(rng.range(200, 640) * self.scale);
                    let a = rng.color([20; 3], [240; 3]);
                    let b = rng.color([20; 3], [240; 3]);
                    let h = height.max(1);
                    let sun = (
                        rng.range(0, w.max(1)),
                        rng.range(0, h),
                        rng.range(20, 60) * self.scale,
                    );
                    let row = c.row_mut(screen_y);
                    for x in 0..w {
                        let (dx, dy) = (
                            i64::from(x) - i64::from(sun.0),
                            i64::from(by) - i64::from(sun.1),
                        );
                        let inside = dx * dx + dy * dy < i64::from(sun.2) * i64::from(sun.2);
                        let color = if inside {
                            rgb(0xff, 0xe0, 0x80)
                        } else {
                            mix(a, b, by * 255 / h)
                        };
                        let i = (content.x + x) as usize * 4;
                        row[i..i + 4].copy_from_slice(&color);
                    }
                }
            }
        }
    }
}

impl FrameSource for SyntheticSource {
    fn size(&self) -> (u32, u32) {
        (self.desktop.width, self.desktop.height)
    }

    /// The first call returns the arrow and its position; later calls the position whenever a
    /// frame moved it. The pointer only moves with frames, so `next_frame` never returns early.
    fn cursor_update(&mut self) -> Option<CursorUpdate> {
        let (x, y) = self.pointer();
        let first = self.cursor_reported.is_none();
        if self.cursor_reported == Some((x, y)) {
            return None;
        }
        self.cursor_reported = Some((x, y));
        Some(CursorUpdate {
            x,
            y,
            visible: true,
            image: first.then(arrow_cursor),
        })
    }

    /// Waits until the next frame is due at the source's frame rate (the first frame is due at
    /// once), then renders it. Returns `Ok(None)` if `deadline` comes first.
    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError> {
        if !self.pacer.wait(deadline) {
            return Ok(None);
        }
        Ok(Some(self.advance()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pixels that differ between two packed BGRX frames, as (x, y).
    fn changed_pixels(a: &[u8], b: &[u8], width: u32) -> Vec<(u32, u32)> {
        a.chunks_exact(4)
            .zip(b.chunks_exact(4))
            .enumerate()
            .filter(|(_, (pa, pb))| pa != pb)
            .map(|(i, _)| ((i as u32) % width, (i as u32) / width))
            .collect()
    }

    /// Checks over `frames` frames that the damage covers every changed pixel and that each
    /// damage rectangle contains at least one changed pixel (no made-up damage).
    fn assert_damage_exact(scene: Scene, width: u32, height: u32, fps: f32, frames: u32) {
        let mut source = SyntheticSource::new(scene, width, height, fps);
        let first = source.advance();
        assert_eq!(
            first.damage,
            vec![Rect::new(0, 0, width, height)],
            "{scene}: first frame is fully damaged"
        );
        let mut previous = first.frame.data.to_vec();
        for index in 2..=frames {
            let frame = source.advance();
            let changed = changed_pixels(&previous, frame.frame.data, width);
            for &(x, y) in &changed {
                assert!(
                    frame.damage.iter().any(|r| r.contains(x, y)),
                    "{scene} frame {index}: pixel ({x},{y}) changed outside damage {:?}",
                    frame.damage
                );
            }
            for r in &frame.damage {
                assert!(
                    !r.is_empty() && r.right() <= width && r.bottom() <= height,
                    "{scene}: bad rect {r:?}"
                );
                assert!(
                    changed.iter().any(|&(x, y)| r.contains(x, y)),
                    "{scene} frame {index}: damage {r:?} covers no changed pixel"
                );
            }
            previous.copy_from_slice(frame.frame.data);
        }
    }

    #[test]
    fn windows_damage_covers_exactly_the_changed_pixels() {
        assert_damage_exact(Scene::Windows, 320, 200, 30.0, 40);
        // Low frame rate: big jumps and bounces off the screen edges.
        assert_damage_exact(Scene::Windows, 320, 200, 3.0, 40);
    }

    #[test]
    fn typing_damage_covers_exactly_the_changed_pixels() {
        assert_damage_exact(Scene::Typing, 320, 200, 30.0, 120);
        // Low frame rate: several characters per frame, line wraps and the editor scrolling.
        assert_damage_exact(Scene::Typing, 240, 160, 4.0, 150);
    }

    #[test]
    fn scrolling_damage_covers_exactly_the_changed_pixels() {
        assert_damage_exact(Scene::Scrolling, 320, 200, 30.0, 60);
    }

    #[test]
    fn still_scene_reports_no_damage_after_the_first_frame() {
        let mut source = SyntheticSource::new(Scene::Still, 64, 48, 60.0);
        source.advance();
        for _ in 0..10 {
            assert!(source.advance().damage.is_empty());
        }
    }

    #[test]
    fn same_seed_gives_the_same_frames_and_another_seed_does_not() {
        for scene in Scene::ALL {
            let mut a = SyntheticSource::with_seed(scene, 160, 120, 30.0, 7);
            let mut b = SyntheticSource::with_seed(scene, 160, 120, 30.0, 7);
            let mut c = SyntheticSource::with_seed(scene, 160, 120, 30.0, 8);
            let mut differs = false;
            for _ in 0..20 {
                let fa = a.advance();
                let (da, damage_a) = (fa.frame.data.to_vec(), fa.damage.clone());
                let fb = b.advance();
                assert_eq!(da, fb.frame.data, "{scene}");
                assert_eq!(damage_a, fb.damage, "{scene}");
                differs |= da != c.advance().frame.data;
            }
            assert!(differs, "{scene}: seed changes the content");
        }
    }

    #[test]
    fn tiny_and_odd_sizes_render_with_damage_inside_the_frame() {
        for scene in Scene::ALL {
            for (w, h) in [(1, 1), (7, 5), (33, 17), (95, 301), (0, 0)] {
                let mut source = SyntheticSource::new(scene, w, h, 60.0);
                let (w, h) = source.size();
                for _ in 0..40 {
                    let f = source.advance();
                    assert_eq!(f.frame.data.len(), (w * h * 4) as usize);
                    assert!(
                        f.damage
                            .iter()
                            .all(|r| !r.is_empty() && r.right() <= w && r.bottom() <= h),
                        "{scene} {w}x{h}: {:?}",
                        f.damage
                    );
                }
            }
        }
    }

    #[test]
    fn scenes_parse_from_and_display_as_lowercase_names() {
        for scene in Scene::ALL {
            assert_eq!(scene.to_string().parse::<Scene>(), Ok(scene));
        }
        assert_eq!("Typing".parse::<Scene>(), Ok(Scene::Typing));
        let err = "desktop".parse::<Scene>().unwrap_err();
        assert!(
            err.to_string()
                .contains("windows, typing, scrolling, still"),
            "{err}"
        );
    }

    #[test]
    fn rendered_frames_are_counted_from_one() {
        let mut source = SyntheticSource::new(Scene::Typing, 64, 48, 30.0);
        assert_eq!(source.rendered(), 0);
        for expected in 1..=5 {
            source.advance();
            assert_eq!(source.rendered(), expected);
        }
    }

    #[test]
    fn first_cursor_update_carries_the_arrow_and_later_ones_only_positions() {
        let mut source = SyntheticSource::new(Scene::Windows, 320, 200, 30.0);

        let first = source.cursor_update().expect("initial pointer");
        source.advance();
        let mut later = Vec::new();
        for _ in 0..10 {
            source.advance();
            later.extend(source.cursor_update());
        }

        let image = first.image.expect("first update has the image");
        assert_eq!(image, arrow_cursor());
        assert_eq!(image.bgra.len(), (image.width * image.height * 4) as usize);
        assert!(image.hot_x < image.width && image.hot_y < image.height);
        assert!(first.visible);
        assert_eq!(later.len(), 10, "the dragged window moves every frame");
        assert!(later.iter().all(|u| u.image.is_none() && u.visible));
    }

    #[test]
    fn pointer_drags_the_moving_window() {
        let mut source = SyntheticSource::new(Scene::Windows, 320, 200, 30.0);
        let offset = |s: &SyntheticSource| {
            let SceneState::Windows { dragged, .. } = s.state else {
                unreachable!("windows scene")
            };
            let w = s.desktop.windows[dragged].screen_rect();
            let (x, y) = s.pointer();
            (x - w.x as i32, y - w.y as i32)
        };
        let grip = offset(&source);

        let mut positions = Vec::new();
        for _ in 0..30 {
            source.advance();
            assert_eq!(
                offset(&source),
                grip,
                "pointer keeps its grip on the title bar"
            );
            positions.push(source.pointer());
        }

        positions.dedup();
        assert!(positions.len() > 20, "pointer moves: {positions:?}");
        assert!(positions
            .iter()
            .all(|&(x, y)| (0..320).contains(&x) && (0..200).contains(&y)));
    }

    #[test]
    fn pointer_follows_the_typing_caret_and_rests_when_nothing_moves() {
        let mut typing = SyntheticSource::new(Scene::Typing, 320, 200, 30.0);
        let mut still = SyntheticSource::new(Scene::Still, 320, 200, 30.0);
        typing.cursor_update();
        still.cursor_update();

        let mut typing_moves = 0;
        let mut still_moves = 0;
        for _ in 0..60 {
            typing.advance();
            still.advance();
            typing_moves += usize::from(typing.cursor_update().is_some());
            still_moves += usize::from(still.cursor_update().is_some());
        }

        // 2 s at 15 characters per second: about 30 caret moves, some frames without one.
        assert!((20..60).contains(&typing_moves), "{typing_moves} moves");
        assert_eq!(still_moves, 0);
        assert_eq!(still.pointer(), (160, 100));
    }

    #[test]
    fn pointer_path_depends_only_on_seed_size_and_rate() {
        let path = |seed| {
            let mut s = SyntheticSource::with_seed(Scene::Windows, 200, 150, 20.0, seed);
            (0..15)
                .map(|_| {
                    s.advance();
                    s.pointer()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(path(3), path(3));
    }

    #[test]
    fn next_frame_is_paced_to_the_frame_rate() {
        let mut source = SyntheticSource::new(Scene::Still, 64, 48, 10.0);
        let start = Instant::now();
        assert!(
            source
                .next_frame(start + Duration::from_secs(1))
                .unwrap()
                .is_some(),
            "first frame at once"
        );
        // The second frame is due 100 ms after the first: a 10 ms deadline passes first.
        assert!(source
            .next_frame(Instant::now() + Duration::from_millis(10))
            .unwrap()
            .is_none());
        let second = source
            .next_frame(Instant::now() + Duration::from_secs(5))
            .unwrap();
        assert!(second.is_some(), "second frame");
        assert_eq!(source.rendered(), 2);
        assert!(
            start.elapsed() >= Duration::from_millis(95),
            "waited for the frame interval"
        );
    }
}
