//! Low-latency H.264 encoding of damaged framebuffers with openh264.
//!
//! One call in, at most one access unit out: the encoder never queues frames, so the caller
//! (the streaming server) bounds frames in flight simply by not calling [`Encoder::encode`] while
//! the network is still draining the previous output. Colour conversion only touches the damaged
//! rectangles of a persistent I420 picture, and nothing is encoded when nothing changed: damage
//! whose pixels equal what the picture was converted from (a copy the encoder keeps) is dropped
//! before conversion.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::time::{Duration, Instant};

use openh264::encoder::{
    BitRate, Complexity, EncoderConfig as H264Config, FrameRate, FrameType, IntraFramePeriod,
    Profile, QpRange, RateControlMode, SpsPpsStrategy, UsageType, VuiConfig,
};
use openh264::formats::YUVSlices;
use openh264::{OpenH264API, Timestamp};
use openh264_sys2::{
    SBitrateInfo, WelsTraceCallback, ENCODER_OPTION_BITRATE, ENCODER_OPTION_FRAME_RATE,
    ENCODER_OPTION_MAX_BITRATE, ENCODER_OPTION_TRACE_CALLBACK, SPATIAL_LAYER_0, SPATIAL_LAYER_ALL,
    WELS_LOG_ERROR, WELS_LOG_INFO, WELS_LOG_WARNING,
};

use crate::convert::{ConvertError, I420Buffer};
use crate::diff::Shadow;
use crate::frame::{FrameRef, Rect};
use crate::rate::{Grant, RateBudget};

/// Receives openh264's log lines (initialisation warnings; the wrapper silences it afterwards)
/// and logs each at openh264's own level: its warnings say which settings it overrode, which an
/// operator needs to read.
unsafe extern "C" fn openh264_trace(_ctx: *mut c_void, level: c_int, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: openh264 passes a NUL-terminated string that is valid for the duration of the call.
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let message = message.trim_end();
    match trace_level(level) {
        tracing::Level::ERROR => tracing::error!(target: "openh264", "{message}"),
        tracing::Level::WARN => tracing::warn!(target: "openh264", "{message}"),
        tracing::Level::INFO => tracing::info!(target: "openh264", "{message}"),
        _ => tracing::debug!(target: "openh264", "{message}"),
    }
}

/// The `tracing` level of an openh264 log level (`WELS_LOG_*`, a bit each; lower is worse).
fn trace_level(level: c_int) -> tracing::Level {
    match level {
        l if l <= WELS_LOG_ERROR as c_int => tracing::Level::ERROR,
        l if l <= WELS_LOG_WARNING as c_int => tracing::Level::WARN,
        l if l <= WELS_LOG_INFO as c_int => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    }
}

/// Smallest picture openh264 accepts.
const MIN_SIDE: u32 = 16;
/// Largest picture openh264 encodes (level 5.2).
const MAX_LONG_SIDE: u32 = 3840;
const MAX_SHORT_SIDE: u32 = 2160;
/// Bounds for run-time rate changes; openh264 misbehaves outside them.
const MIN_BITRATE_BPS: u32 = 10_000;
const MAX_BITRATE_BPS: u32 = 200_000_000;
const MIN_FPS: f32 = 1.0;
const MAX_FPS: f32 = 240.0;
/// More threads than this buy nothing: a frame only has so many slices worth splitting.
const MAX_THREADS: u16 = 4;

/// Stream parameters fixed at creation (bitrate and frame rate can change later).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncoderConfig {
    pub width: u32,
    pub height: u32,
    pub fps: f32,
    pub bitrate_bps: u32,
}

/// One encoded access unit.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// Annex-B byte stream (start codes included); keyframes carry SPS and PPS.
    pub data: Vec<u8>,
    /// True for an IDR picture: a decoder can start here.
    pub keyframe: bool,
    /// Wall time spent in colour conversion and encoding.
    pub encode_time: Duration,
}

/// Why encoding failed.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("frame size {width}x{height} is odd; H.264 4:2:0 needs even width and height")]
    OddDimensions { width: u32, height: u32 },
    #[error("frame size {width}x{height} is outside 16x16..3840x2160 (or 2160x3840)")]
    UnsupportedSize { width: u32, height: u32 },
    #[error("frame rate {0} is outside {MIN_FPS}..={MAX_FPS}")]
    InvalidFps(f32),
    #[error("bitrate {0} bit/s is outside {MIN_BITRATE_BPS}..={MAX_BITRATE_BPS}")]
    InvalidBitrate(u32),
    #[error("{0} encoder threads is outside 1..={MAX_THREADS}")]
    InvalidThreads(u16),
    #[error("frame is {got_width}x{got_height} but the encoder was created for {width}x{height}")]
    SizeMismatch {
        width: u32,
        height: u32,
        got_width: u32,
        got_height: u32,
    },
    #[error("invalid frame")]
    Frame(#[from] ConvertError),
    #[error("openh264 failed")]
    Codec(#[source] openh264::Error),
    #[error("openh264 rejected the {option} setting (code {code})")]
    SetOption { option: &'static str, code: i32 },
}

/// A low-latency H.264 encoder for one fixed-size stream.
pub struct Encoder {
    cfg: EncoderConfig,
    tuning: Tuning,
    h264: openh264::encoder::Encoder,
    picture: I420Buffer,
    /// Nothing has been encoded yet: the next frame must be converted in full and be an IDR.
    fresh: bool,
    /// Picture content changed but was not sent (the 1 s window was full, or openh264 dropped
    /// it); encode it with the next call even if that call brings no damage.
    pending_changes: bool,
    /// Bits sent over the last second against the target; what the next picture may spend.
    budget: RateBudget,
    /// The bitrate openh264 was last told (the next picture's grant times the frame rate).
    applied_bps: u32,
    frames_encoded: u64,
    /// [`Encoder::refine`] passes left before the picture counts as converged.
    refinements_left: u32,
    /// Origin of the timestamps handed to openh264: the first picture's time.
    epoch: Option<Instant>,
    /// Whether damage is compared with `shadow` to drop identical repaints.
    skip_identical: bool,
    /// The pixels the picture was converted from; `None` while skipping is off or until the
    /// next full conversion after it was turned on.
    shadow: Option<Shadow>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("cfg", &self.cfg)
            .field("tuning", &self.tuning)
            .field("frames_encoded", &self.frames_encoded)
            .finish_non_exhaustive()
    }
}

fn validate_size(width: u32, height: u32) -> Result<(), EncodeError> {
    let (long, short) = (width.max(height), width.min(height));
    if width < MIN_SIDE || height < MIN_SIDE || long > MAX_LONG_SIDE || short > MAX_SHORT_SIDE {
        return Err(EncodeError::UnsupportedSize { width, height });
    }
    if width % 2 != 0 || height % 2 != 0 {
        return Err(EncodeError::OddDimensions { width, height });
    }
    Ok(())
}

fn validate_fps(fps: f32) -> Result<(), EncodeError> {
    if (MIN_FPS..=MAX_FPS).contains(&fps) {
        Ok(())
    } else {
        Err(EncodeError::InvalidFps(fps))
    }
}

fn validate_bitrate(bps: u32) -> Result<(), EncodeError> {
    if (MIN_BITRATE_BPS..=MAX_BITRATE_BPS).contains(&bps) {
        Ok(())
    } else {
        Err(EncodeError::InvalidBitrate(bps))
    }
}

/// Refinement passes allowed after each change (see [`Encoder::refine`]): about half a second at
/// 60 fps, worth 2-3 dB on a still desktop, after which further passes gain little.
pub const REFINEMENT_PASSES: u32 = 30;

/// Which openh264 tool set to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Usage {
    /// openh264's camera real-time mode: about twice as fast per frame, but on recorded real
    /// desktops (scripts/record-desktops) 4-24 dB Y-PSNR behind screen mode at the same
    /// bitrate on scrolling (see docs/encoder.md).
    CameraRealTime,
    /// openh264's screen-content real-time mode: hash-based motion search and scroll
    /// detection. The default: on recorded terminal, browser and typing desktops it is at or
    /// far above camera mode and x264 veryfast at the same bitrate, and at 1080p60 it still
    /// encodes faster than real time on one core of the development machine.
    #[default]
    ScreenContentRealTime,
}

/// Largest slice with more than one thread: big enough that a 1080p P-frame is one slice per
/// thread, small enough for openh264's slice count limit at 4K keyframes.
const MAX_SLICE_BYTES: u32 = 150_000;
/// Pictures at least this large are encoded on two threads by [`Encoder::new`].
const THREADED_MIN_PIXELS: u32 = 1280 * 720;

/// How openh264 does the work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub usage: Usage,
    /// Threads encoding each picture, each on its own slices. More threads cut the wall time
    /// of a frame (latency) when cores are free, at a little more CPU and a few bits more.
    pub threads: u16,
}

impl Tuning {
    /// One thread, the default tool set.
    pub const SINGLE_THREAD: Self = Self {
        usage: Usage::ScreenContentRealTime,
        threads: 1,
    };

    /// What [`Encoder::new`] uses for `width` x `height`: the default tool set on
    /// [`Tuning::threads_for`] threads.
    pub fn low_latency(width: u32, height: u32) -> Self {
        let usage = Usage::default();
        Self {
            usage,
            threads: Self::threads_for(usage, width, height),
        }
    }

    /// Threads that measured better for `usage` at `width` x `height`. Camera mode: two from
    /// 720p up when the machine has two CPUs or more (1080p desktop: 9.2 ms → 6.4 ms a frame on
    /// the 2-core development machine at the same PSNR), else one. Screen-content mode: always
    /// one; on the recorded 1080p60 desktops two threads (slices) were no faster in wall time
    /// on the loaded 2-core machine (24.4 vs 22.7 ms a picture on the man page) and lost 6-7 dB
    /// Y-PSNR on the man page and the browser scroll at 4 Mbit/s (docs/encoder.md).
    pub fn threads_for(usage: Usage, width: u32, height: u32) -> u16 {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let big = width.saturating_mul(height) >= THREADED_MIN_PIXELS;
        match usage {
            Usage::CameraRealTime if big && cpus >= 2 => 2,
            _ => 1,
        }
    }
}

/// QP bounds: the floor keeps rate control from spending bits past visually lossless; the
/// ceiling is H.264's own, so that openh264 can shrink a picture as far as the 1 s window
/// needs (with 42, most slices of a 2 Mbit/s 1080p scroll sat at the ceiling and the stream
/// ran at twice the target).
const MIN_QP: u8 = 12;
const MAX_QP: u8 = 51;

fn h264_config(cfg: &EncoderConfig, tuning: Tuning) -> H264Config {
    let c = H264Config::new()
        .usage_type(match tuning.usage {
            Usage::CameraRealTime => UsageType::CameraVideoRealTime,
            Usage::ScreenContentRealTime => UsageType::ScreenContentRealTime,
        })
        .rate_control_mode(RateControlMode::Bitrate)
        .bitrate(BitRate::from_bps(cfg.bitrate_bps))
        .max_frame_rate(FrameRate::from_hz(cfg.fps))
        .qp(QpRange::new(MIN_QP, MAX_QP))
        // openh264's own skipping judges a 5 s window; the 1 s ceiling is held by `RateBudget`,
        // which keeps a waiting change and sends it with the next call.
        .skip_frames(false)
        .num_threads(tuning.threads)
        .complexity(Complexity::Low)
        // Keyframes only on demand (viewer join or loss): periodic IDRs are bitrate spikes.
        .intra_frame_period(IntraFramePeriod::from_num_frames(0))
        .sps_pps_strategy(SpsPpsStrategy::ConstantId)
        // Constrained baseline: no B-frames, decodable by every hardware and browser decoder.
        .profile(Profile::Baseline)
        .vui(VuiConfig::bt601())
        // Both are camera-mode tools that openh264 turns off (with a warning) for screen content;
        // off everywhere keeps behaviour and logs the same in both modes.
        .adaptive_quantization(false)
        .background_detection(false);
    if tuning.threads > 1 {
        // openh264 only spreads a picture over threads in slices; size-limited slices let it
        // cut the picture into one partition per thread.
        c.max_slice_len(MAX_SLICE_BYTES)
    } else {
        c
    }
}

impl Encoder {
    /// Creates an encoder for `cfg.width` x `cfg.height` frames: both even, 16..=3840 by 16..=2160
    /// (or portrait), at 1..=240 fps and 10 kbit/s..=200 Mbit/s, tuned for latency
    /// ([`Tuning::low_latency`]).
    pub fn new(cfg: EncoderConfig) -> Result<Self, EncodeError> {
        Self::with_tuning(cfg, Tuning::low_latency(cfg.width, cfg.height))
    }

    /// Like [`Encoder::new`] with a chosen openh264 tool set, on one thread.
    pub fn with_usage(cfg: EncoderConfig, usage: Usage) -> Result<Self, EncodeError> {
        Self::with_tuning(
            cfg,
            Tuning {
                usage,
                ..Tuning::SINGLE_THREAD
            },
        )
    }

    /// Like [`Encoder::new`] with explicit tuning. `tuning.threads` must be 1..=4.
    pub fn with_tuning(cfg: EncoderConfig, tuning: Tuning) -> Result<Self, EncodeError> {
        validate_size(cfg.width, cfg.height)?;
        validate_fps(cfg.fps)?;
        validate_bitrate(cfg.bitrate_bps)?;
        if !(1..=MAX_THREADS).contains(&tuning.threads) {
            return Err(EncodeError::InvalidThreads(tuning.threads));
        }
        let h264 = Self::make_codec(&cfg, tuning)?;
        Ok(Self {
            cfg,
            tuning,
            h264,
            picture: I420Buffer::new(cfg.width, cfg.height)?,
            fresh: true,
            pending_changes: false,
            budget: RateBudget::new(cfg.bitrate_bps, cfg.fps),
            applied_bps: cfg.bitrate_bps,
            frames_encoded: 0,
            refinements_left: 0,
            epoch: None,
            skip_identical: true,
            shadow: None,
        })
    }

    fn make_codec(
        cfg: &EncoderConfig,
        tuning: Tuning,
    ) -> Result<openh264::encoder::Encoder, EncodeError> {
        let mut codec = openh264::encoder::Encoder::with_api_config(
            OpenH264API::from_source(),
            h264_config(cfg, tuning),
        )
        .map_err(EncodeError::Codec)?;
        // openh264 prints its initialisation warnings to stderr; route them to `tracing`.
        let mut callback: WelsTraceCallback = Some(openh264_trace);
        // SAFETY: the trace callback option is accepted before initialisation; openh264 copies
        // the function pointer out of `callback`, which lives for the call. `openh264_trace` has
        // the C signature openh264 expects and never unwinds.
        let rc = unsafe {
            codec.raw_api().set_option(
                ENCODER_OPTION_TRACE_CALLBACK,
                std::ptr::addr_of_mut!(callback).cast(),
            )
        };
        if rc != 0 {
            return Err(EncodeError::SetOption {
                option: "trace callback",
                code: rc,
            });
        }
        Ok(codec)
    }

    /// Current configuration (reflects run-time bitrate and frame rate changes).
    pub fn config(&self) -> EncoderConfig {
        self.cfg
    }

    /// Number of frames that produced output so far.
    pub fn frames_encoded(&self) -> u64 {
        self.frames_encoded
    }

    /// Turns identical-pixel skipping on (the default) or off. On, [`Encoder::encode`] compares
    /// the damaged pixels with a copy of what the picture was converted from (width x height x
    /// 4 bytes) and converts and encodes only what really changed; a frame whose damage changed
    /// nothing returns `None`. Off frees the copy; turned on again, skipping resumes from the
    /// next full conversion (the next keyframe). Off exists to measure what skipping saves.
    pub fn set_skip_identical(&mut self, on: bool) {
        self.skip_identical = on;
        if !on {
            self.shadow = None;
        }
    }

    /// Whether identical-pixel skipping is on (see [`Encoder::set_skip_identical`]).
    pub fn skip_identical(&self) -> bool {
        self.skip_identical
    }

    /// Encodes `frame`, of which only the pixels in `damage` changed since the previous call.
    ///
    /// Returns `None` when `damage` is empty, or every pixel in it equals what the encoder last
    /// converted there (identical repaints, see [`Encoder::set_skip_identical`]), and no
    /// keyframe is due or forced: nothing changed, so nothing is converted or sent. `force_keyframe` makes the output an IDR picture (viewer joined or lost
    /// data). The first frame and every forced keyframe are converted in full, so a keyframe always
    /// shows exactly `frame`.
    pub fn encode(
        &mut self,
        frame: &FrameRef,
        damage: &[Rect],
        force_keyframe: bool,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        self.encode_at(frame, damage, force_keyframe, Instant::now())
    }

    /// [`Encoder::encode`] for a frame shown at `at` (its capture time) instead of now: rate
    /// control budgets bits by the time between frames, so a source replayed faster or slower
    /// than real time (benchmarks, tests) passes its own clock. Times must not go backwards.
    pub fn encode_at(
        &mut self,
        frame: &FrameRef,
        damage: &[Rect],
        force_keyframe: bool,
        at: Instant,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        if frame.width != self.cfg.width || frame.height != self.cfg.height {
            return Err(EncodeError::SizeMismatch {
                width: self.cfg.width,
                height: self.cfg.height,
                got_width: frame.width,
                got_height: frame.height,
            });
        }
        let started = Instant::now();
        let full = self.fresh || force_keyframe;
        let damaged = damage
            .iter()
            .any(|r| !r.clamp_to(frame.width, frame.height).is_empty());
        // Validated before anything reads it, so a broken source is reported even on an idle
        // screen and the copy below is never updated from a frame that fails to convert.
        frame.validate().map_err(ConvertError::from)?;
        let changed = match &self.shadow {
            Some(shadow) if damaged && !full => shadow.changed(frame, damage),
            _ => damage.to_vec(),
        };
        let damaged = damaged && !changed.is_empty();
        if !damaged && !full && !self.pending_changes {
            return Ok(None);
        }
        if full {
            // A keyframe re-reads the whole frame: a viewer starting there sees exactly the
            // source, even if some damage was lost upstream.
            if let Err(err) = self.picture.convert_full(frame) {
                // The picture may be partly converted: the copy no longer matches it.
                self.shadow = None;
                return Err(err.into());
            }
            if self.skip_identical {
                match &mut self.shadow {
                    Some(shadow) => shadow.store_full(frame),
                    None => self.shadow = Some(Shadow::of(frame)),
                }
            }
        } else if damaged {
            let converted = self.picture.convert_damage(frame, &changed);
            if let Some(shadow) = &mut self.shadow {
                match converted {
                    // Large damage is converted in one pass over the whole frame.
                    Ok(n) if n == u64::from(frame.width) * u64::from(frame.height) => {
                        shadow.store_full(frame)
                    }
                    Ok(_) => shadow.store(frame, &changed),
                    Err(_) => self.shadow = None,
                }
            }
            converted?;
        }
        // The wrapper initialises openh264 on the first encode, which is an IDR anyway; forcing
        // before that must not touch the codec.
        if force_keyframe && !self.fresh {
            self.h264.force_intra_frame();
        }
        let must_send = self.fresh || force_keyframe;
        let out = self.encode_budgeted(started, at, must_send)?;
        self.refinements_left = if out.is_some() { REFINEMENT_PASSES } else { 0 };
        Ok(out)
    }

    /// Encodes the persistent picture as it stands as an IDR picture, without a new frame: the
    /// keyframe a viewer joining a still screen needs. The picture holds every pixel the
    /// previous calls converted (a forced keyframe or the first frame converted the whole
    /// frame, damage since then), so nobody keeps a second copy of the screen for this.
    ///
    /// Returns `None` before the first frame (there is no picture yet) or when rate control
    /// drops the picture (it is then sent with the next call).
    pub fn keyframe(&mut self) -> Result<Option<EncodedFrame>, EncodeError> {
        if self.fresh {
            return Ok(None);
        }
        let started = Instant::now();
        self.h264.force_intra_frame();
        let out = self.encode_budgeted(started, started, true)?;
        self.refinements_left = if out.is_some() { REFINEMENT_PASSES } else { 0 };
        Ok(out)
    }

    /// Re-encodes the unchanged picture to sharpen it: each pass is a small P-frame that lets
    /// rate control spend the idle budget on detail (about +0.2 dB per pass on a still desktop).
    ///
    /// Call it when the source has nothing new and the network has room. Returns `None` when
    /// there is nothing to refine: no frame encoded yet, or [`REFINEMENT_PASSES`] passes done
    /// since the last change. Never needed for correctness: a viewer already shows the picture.
    pub fn refine(&mut self) -> Result<Option<EncodedFrame>, EncodeError> {
        self.refine_at(Instant::now())
    }

    /// [`Encoder::refine`] at time `at` (see [`Encoder::encode_at`]).
    /// A change that had to wait for room in the 1 s window is sent by this call as soon as
    /// there is room, so calling `refine` whenever the source is idle is enough to flush it.
    pub fn refine_at(&mut self, at: Instant) -> Result<Option<EncodedFrame>, EncodeError> {
        if self.fresh {
            return Ok(None);
        }
        if self.pending_changes {
            let out = self.encode_budgeted(Instant::now(), at, false)?;
            if out.is_some() {
                self.refinements_left = REFINEMENT_PASSES;
            }
            return Ok(out);
        }
        if self.refinements_left == 0 {
            return Ok(None);
        }
        let out = self.encode_budgeted(Instant::now(), at, false)?;
        if out.is_some() {
            self.refinements_left -= 1;
        }
        Ok(out)
    }

    /// Encodes the picture if the 1 s window has room (`must_send`: always), aiming openh264
    /// at the bits granted; a picture that must wait stays pending.
    fn encode_budgeted(
        &mut self,
        started: Instant,
        at: Instant,
        must_send: bool,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        let bits = match self.budget.grant(at, must_send) {
            Grant::Wait => {
                self.pending_changes = true;
                return Ok(None);
            }
            Grant::Encode { bits } => bits,
        };
        // openh264 aims each picture at bitrate / fps; say the rate that makes it this grant.
        // Before the first picture the codec is not initialised and runs at the target anyway.
        if !self.fresh {
            let bps = (bits as f64 * f64::from(self.cfg.fps))
                .clamp(f64::from(MIN_BITRATE_BPS), f64::from(MAX_BITRATE_BPS))
                as u32;
            if bps != self.applied_bps {
                self.apply_rates(bps)?;
                self.applied_bps = bps;
            }
        }
        let out = self.encode_picture(started, at)?;
        if let Some(out) = &out {
            self.budget.sent(at, out.data.len() as u64 * 8);
        }
        Ok(out)
    }

    /// Encodes the persistent picture as it stands.
    fn encode_picture(
        &mut self,
        started: Instant,
        at: Instant,
    ) -> Result<Option<EncodedFrame>, EncodeError> {
        let yuv = YUVSlices::new(
            (self.picture.y(), self.picture.u(), self.picture.v()),
            (self.cfg.width as usize, self.cfg.height as usize),
            (
                self.cfg.width as usize,
                self.cfg.width as usize / 2,
                self.cfg.width as usize / 2,
            ),
        );
        let epoch = *self.epoch.get_or_insert(at);
        let timestamp =
            Timestamp::from_millis(at.saturating_duration_since(epoch).as_millis() as u64);
        let bitstream = self
            .h264
            .encode_at(&yuv, timestamp)
            .map_err(EncodeError::Codec)?;
        let frame_type = bitstream.frame_type();
        let mut data = Vec::new();
        bitstream.write_vec(&mut data);
        self.fresh = false;
        if data.is_empty() || frame_type == FrameType::Skip {
            // Rate control dropped it: the picture still holds the change, so send it next time.
            self.pending_changes = true;
            return Ok(None);
        }
        self.pending_changes = false;
        self.frames_encoded += 1;
        Ok(Some(EncodedFrame {
            data,
            keyframe: frame_type == FrameType::IDR,
            encode_time: started.elapsed(),
        }))
    }

    /// Changes the target bitrate from the next frame on. Out-of-range values are clamped to
    /// 10 kbit/s..=200 Mbit/s.
    pub fn set_bitrate(&mut self, bps: u32) {
        let bps = bps.clamp(MIN_BITRATE_BPS, MAX_BITRATE_BPS);
        if bps == self.cfg.bitrate_bps {
            return;
        }
        self.cfg.bitrate_bps = bps;
        self.budget.set_target(bps);
        self.update_codec();
    }

    /// Changes the nominal frame rate (used by rate control to budget bits per frame). Values are
    /// clamped to 1..=240.
    pub fn set_fps(&mut self, fps: f32) {
        let fps = if fps.is_nan() {
            MIN_FPS
        } else {
            fps.clamp(MIN_FPS, MAX_FPS)
        };
        if fps == self.cfg.fps {
            return;
        }
        self.cfg.fps = fps;
        self.budget.set_fps(fps);
        self.update_codec();
    }

    fn update_codec(&mut self) {
        let result = if self.fresh {
            // openh264 is initialised lazily by the first encode: just start over with the new
            // parameters.
            Self::make_codec(&self.cfg, self.tuning).map(|codec| {
                self.h264 = codec;
                self.applied_bps = self.cfg.bitrate_bps;
            })
        } else {
            // The next picture's grant sets the bitrate; the frame rate changes now.
            let bps = self.applied_bps;
            self.apply_rates(bps)
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, cfg = ?self.cfg, "openh264 rejected a rate change; keeping the previous one");
        }
    }

    /// Pushes bitrate `bps` and `self.cfg`'s frame rate into the running codec.
    fn apply_rates(&mut self, bps: u32) -> Result<(), EncodeError> {
        let bps = i32::try_from(bps).unwrap_or(i32::MAX);
        let mut max = SBitrateInfo {
            iLayer: SPATIAL_LAYER_0,
            iBitrate: bps,
        };
        let mut target = SBitrateInfo {
            iLayer: SPATIAL_LAYER_ALL,
            iBitrate: bps,
        };
        let mut fps: f32 = self.cfg.fps;
        // openh264 refuses a maximum below the current target, so the order depends on the
        // direction of the change.
        let raising = bps >= self.applied_bps.min(i32::MAX as u32) as i32;
        // SAFETY: openh264 has been initialised by a first encode (callers check `fresh`), each
        // option id is paired with the type openh264 reads for it (SBitrateInfo for the bitrate
        // options, f32 for the frame rate), and the pointers are valid for the duration of the
        // call. None of these options changes parameters the wrapper relies on (picture size,
        // data format).
        let rcs = unsafe {
            let api = self.h264.raw_api();
            let mut set_max = || {
                api.set_option(
                    ENCODER_OPTION_MAX_BITRATE,
                    std::ptr::addr_of_mut!(max).cast(),
                )
            };
            let mut set_target = || {
                api.set_option(
                    ENCODER_OPTION_BITRATE,
                    std::ptr::addr_of_mut!(target).cast(),
                )
            };
            let (max_rc, target_rc) = if raising {
                let m = set_max();
                (m, set_target())
            } else {
                let t = set_target();
                (set_max(), t)
            };
            [
                max_rc,
                target_rc,
                api.set_option(
                    ENCODER_OPTION_FRAME_RATE,
                    std::ptr::addr_of_mut!(fps).cast(),
                ),
            ]
        };
        let names = ["max bitrate", "bitrate", "frame rate"];
        match names.into_iter().zip(rcs).find(|&(_, rc)| rc != 0) {
            None => Ok(()),
            Some((option, code)) => Err(EncodeError::SetOption { option, code }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openh264_levels_map_to_the_same_tracing_levels() {
        let at = |l| trace_level(l as c_int);

        assert_eq!(at(WELS_LOG_ERROR), tracing::Level::ERROR);
        assert_eq!(at(WELS_LOG_WARNING), tracing::Level::WARN);
        assert_eq!(at(WELS_LOG_INFO), tracing::Level::INFO);
        assert_eq!(at(openh264_sys2::WELS_LOG_DEBUG), tracing::Level::DEBUG);
        assert_eq!(at(openh264_sys2::WELS_LOG_DETAIL), tracing::Level::DEBUG);
    }
}
