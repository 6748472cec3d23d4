//! Encoder benchmark: openh264 through this crate's API (camera and screen-content modes)
//! beside ffmpeg's libx264 ultrafast and veryfast (zerolatency) on the same frames, synthetic
//! (`genos-scenes`) and recorded real desktops (`scripts/record-desktops`), per size, frame
//! rate and bitrate. Printed per row: frames per CPU-second encode-only, Y-PSNR of the stream
//! as ffmpeg decodes it (a neutral judge), the average bitrate and the worst 1 s window's.
//! Run with `scripts/bench-encoder` (release build); see docs/encoder.md.
//!
//! Encode-only on both sides: x264 is fed the very I420 frames our converter produced (raw
//! yuv420p on stdin, so ffmpeg converts nothing) and its time is ffmpeg's CPU time minus a
//! one-frame run's; ours is the encoding thread's CPU time in `encode_at`/`refine_at`, which
//! includes our damage-only colour conversion (about 0.4 ms per full 1080p frame).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use encoder::{Encoder, EncoderConfig, FrameRef, I420Buffer, PixelFormat, Rect, Tuning, Usage};
use scenes::{Manifest, RecordedSource, Scene, SyntheticSource};

#[derive(Parser, Debug)]
#[command(
    about = "Benchmark the GenOS encoder against x264 on synthetic and recorded desktops",
    after_help = "With --quick (or GENOS_BENCH_QUICK=1) the defaults become: --scenes recorded \
                  --sizes 1920x1080 --fps 60 --kbps 2000,4000 --seconds 2"
)]
struct Args {
    /// Scenes, comma separated: synthetic (windows, typing, scrolling, still) and recorded
    /// ones by manifest name; `synthetic`, `recorded` and `all` expand [default: all].
    #[arg(long, value_delimiter = ',')]
    scenes: Option<Vec<String>>,
    /// Frame sizes, comma separated [default: 1280x720,1920x1080].
    #[arg(long, value_delimiter = ',')]
    sizes: Option<Vec<String>>,
    /// Frame rates, comma separated [default: 30,60].
    #[arg(long, value_delimiter = ',')]
    fps: Option<Vec<u32>>,
    /// Target bitrates in kbit/s, comma separated [default: 2000,4000,8000].
    #[arg(long, value_delimiter = ',')]
    kbps: Option<Vec<u32>>,
    /// Seconds of content per row; recordings may be shorter [default: 3].
    #[arg(long)]
    seconds: Option<f64>,
    /// A subset that runs in minutes (other defaults, see below).
    #[arg(long)]
    quick: bool,
    /// Encoders, comma separated: camera, screen, screen-2t (two threads, as `Encoder::new`
    /// does from 720p up), x264-ultrafast, x264-veryfast.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "camera,screen,x264-ultrafast,x264-veryfast"
    )]
    encoders: Vec<String>,
    /// Recordings directory (default: $GENOS_RECORDINGS or ~/.cache/genos/recordings).
    #[arg(long)]
    recordings: Option<PathBuf>,
    /// Also measure colour conversion against memcpy.
    #[arg(long)]
    conversion: bool,
    /// Instead of the encoder matrix, measure identical-pixel skipping: screen mode on each
    /// scene with the whole screen reported damaged every frame (a compositor repainting
    /// unchanged areas), skipping on and off, beside the scene's own damage.
    #[arg(long)]
    repaint: bool,
}

type BoxError = Box<dyn std::error::Error>;

/// The matrix a run covers, once defaults are applied.
struct Plan {
    scenes: Vec<String>,
    sizes: Vec<(u32, u32)>,
    fps: Vec<u32>,
    kbps: Vec<u32>,
    seconds: f64,
}

impl Plan {
    fn new(args: &Args) -> Result<Self, BoxError> {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let quick = args.quick || std::env::var("GENOS_BENCH_QUICK").is_ok_and(|v| v == "1");
        let (scenes, sizes, fps, kbps, seconds) = if quick {
            (
                strings(&["recorded"]),
                strings(&["1920x1080"]),
                vec![60],
                vec![2000, 4000],
                2.0,
            )
        } else {
            (
                strings(&["all"]),
                strings(&["1280x720", "1920x1080"]),
                vec![30, 60],
                vec![2000, 4000, 8000],
                3.0,
            )
        };
        let sizes = args.sizes.clone().unwrap_or(sizes);
        Ok(Self {
            scenes: args.scenes.clone().unwrap_or(scenes),
            sizes: sizes
                .iter()
                .map(|s| parse_size(s))
                .collect::<Result<Vec<_>, _>>()?,
            fps: args.fps.clone().unwrap_or(fps),
            kbps: args.kbps.clone().unwrap_or(kbps),
            seconds: args.seconds.unwrap_or(seconds),
        })
    }
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("size {s:?} is not WxH"))?;
    Ok((
        w.parse().map_err(|e| format!("{s}: {e}"))?,
        h.parse().map_err(|e| format!("{s}: {e}"))?,
    ))
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of the whole process (all its threads; ffmpeg children are not counted).
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_PROCESS_CPUTIME_ID is always supported on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// User + system CPU time of all waited-for children so far.
fn children_cpu() -> Duration {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    assert_eq!(rc, 0, "getrusage failed");
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Where a scene's frames come from.
#[derive(Debug, Clone)]
enum SceneSpec {
    Synthetic(Scene),
    Recorded(scenes::Recording),
}

impl SceneSpec {
    fn name(&self) -> String {
        match self {
            Self::Synthetic(s) => s.name().to_string(),
            Self::Recorded(r) => r.name.clone(),
        }
    }
}

/// A scene's frames at one size and rate, held in memory so every encoder reads the same.
struct Clip {
    width: u32,
    height: u32,
    fps: u32,
    bgrx: Vec<Vec<u8>>,
    damage: Vec<Vec<Rect>>,
    /// Each frame as our converter makes it (yuv420p, planes back to back): what x264 is fed
    /// and what the decoded streams are compared with.
    i420: Vec<Vec<u8>>,
}

fn load_clip(
    spec: &SceneSpec,
    (w, h): (u32, u32),
    fps: u32,
    frames: usize,
) -> Result<Clip, BoxError> {
    let mut clip = Clip {
        width: w,
        height: h,
        fps,
        bgrx: Vec::new(),
        damage: Vec::new(),
        i420: Vec::new(),
    };
    match spec {
        SceneSpec::Synthetic(scene) => {
            let mut source = SyntheticSource::new(*scene, w, h, fps as f32);
            for _ in 0..frames {
                let f = source.advance();
                clip.bgrx.push(f.frame.data.to_vec());
                clip.damage.push(f.damage);
            }
        }
        SceneSpec::Recorded(rec) => {
            let mut source = RecordedSource::open(rec, w, h, fps)?;
            while clip.bgrx.len() < frames {
                let Some(f) = source.advance()? else { break };
                clip.bgrx.push(f.frame.data.to_vec());
                clip.damage.push(f.damage);
            }
        }
    }
    let mut pic = I420Buffer::new(w, h)?;
    for data in &clip.bgrx {
        pic.convert_full(&FrameRef::packed(w, h, PixelFormat::Bgrx, data))?;
        let mut planes = Vec::with_capacity(w as usize * h as usize * 3 / 2);
        planes.extend_from_slice(pic.y());
        planes.extend_from_slice(pic.u());
        planes.extend_from_slice(pic.v());
        clip.i420.push(planes);
    }
    Ok(clip)
}

/// What one encoder made of a clip.
struct Run {
    encoder: String,
    cpu: Duration,
    /// Access units in stream order with the source frame each one belongs to.
    units: Vec<(usize, Vec<u8>)>,
}

/// openh264 through this crate's API with `threads` encoding threads. With more than one, time
/// is the process's CPU time (the bench does nothing else meanwhile), and the wall time per
/// sent picture is printed to stderr: the second core buys latency, not CPU.
fn run_openh264(clip: &Clip, bps: u32, usage: Usage, threads: u16) -> Result<Run, BoxError> {
    run_openh264_with(clip, bps, usage, threads, Damage::Source)
}

/// The damage a run hands the encoder with each frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Damage {
    /// What the scene reports (skipping on, as `Encoder::new` does).
    Source,
    /// The whole screen every frame, as a compositor repainting unchanged areas reports it;
    /// identical-pixel skipping on or off.
    WholeScreen { skip: bool },
}

fn run_openh264_with(
    clip: &Clip,
    bps: u32,
    usage: Usage,
    threads: u16,
    damage_mode: Damage,
) -> Result<Run, BoxError> {
    let cfg = EncoderConfig {
        width: clip.width,
        height: clip.height,
        fps: clip.fps as f32,
        bitrate_bps: bps,
    };
    let mut enc = Encoder::with_tuning(cfg, Tuning { usage, threads })?;
    let whole = [Rect::new(0, 0, clip.width, clip.height)];
    if let Damage::WholeScreen { skip } = damage_mode {
        enc.set_skip_identical(skip);
    }
    let clock = if threads > 1 { process_cpu } else { thread_cpu };
    let start = Instant::now();
    let mut run = Run {
        encoder: match usage {
            Usage::CameraRealTime => String::from("openh264 camera"),
            Usage::ScreenContentRealTime => String::from("openh264 screen"),
        } + if threads > 1 { " 2t" } else { "" }
            + match damage_mode {
                Damage::Source => "",
                Damage::WholeScreen { skip: true } => " skip",
                Damage::WholeScreen { skip: false } => " noskip",
            },
        cpu: Duration::ZERO,
        units: Vec::new(),
    };
    let mut wall = Duration::ZERO;
    for (i, (data, damage)) in clip.bgrx.iter().zip(&clip.damage).enumerate() {
        let frame = FrameRef::packed(clip.width, clip.height, PixelFormat::Bgrx, data);
        let damage = match damage_mode {
            Damage::Source => damage.as_slice(),
            Damage::WholeScreen { .. } => &whole,
        };
        // The frame's own time on the source's clock, not the bench's.
        let at = start + Duration::from_secs_f64(i as f64 / f64::from(clip.fps));
        let t0 = clock();
        let w0 = Instant::now();
        // Like the streaming server: encode changes; when idle, spend the time sharpening.
        let out = match enc.encode_at(&frame, damage, false, at)? {
            Some(out) => Some(out),
            None => enc.refine_at(at)?,
        };
        run.cpu += clock() - t0;
        if out.is_some() {
            wall += w0.elapsed();
        }
        if let Some(out) = out {
            run.units.push((i, out.data));
        }
    }
    eprintln!(
        "{}: {:.2} ms wall per sent picture",
        run.encoder,
        wall.as_secs_f64() * 1e3 / run.units.len().max(1) as f64
    );
    Ok(run)
}

fn ffmpeg_x264(
    clip: &Clip,
    bps: u32,
    preset: &str,
    frames: usize,
    out: &Path,
) -> Result<Duration, BoxError> {
    let before = children_cpu();
    let rate = bps.to_string();
    let mut child = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "rawvideo", "-pix_fmt", "yuv420p"])
        .args(["-s", &format!("{}x{}", clip.width, clip.height)])
        .args(["-r", &clip.fps.to_string(), "-i", "-"])
        .args(["-c:v", "libx264", "-preset", preset, "-tune", "zerolatency"])
        .args([
            "-threads", "1", "-b:v", &rate, "-maxrate", &rate, "-bufsize", &rate,
        ])
        .args(["-g", "100000", "-f", "h264"])
        .arg(out)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ffmpeg (scripts/install-deps): {e}"))?;
    {
        let mut stdin = child.stdin.take().ok_or("ffmpeg stdin")?;
        for f in clip.i420.iter().take(frames) {
            stdin.write_all(f)?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("ffmpeg/x264 failed: {status}").into());
    }
    Ok(children_cpu() - before)
}

/// Splits an Annex-B stream from x264 (one slice per picture with one thread) into access
/// units: parameter sets and SEI go with the picture that follows them.
fn access_units(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut units = Vec::new();
    let mut pending = Vec::new();
    for nal in openh264::nal_units(stream) {
        pending.extend_from_slice(nal);
        let header = nal.iter().skip_while(|&&b| b == 0).nth(1).copied();
        if matches!(header.map(|h| h & 0x1f), Some(1 | 5)) {
            units.push(std::mem::take(&mut pending));
        }
    }
    units
}

fn run_x264(clip: &Clip, bps: u32, preset: &str) -> Result<Run, BoxError> {
    let out = std::env::temp_dir().join(format!("genos-bench-{}-x264.h264", std::process::id()));
    // ffmpeg's own start-up and teardown is not encoding: subtract a one-frame run.
    let startup = ffmpeg_x264(clip, bps, preset, 1, &out)?;
    let cpu = ffmpeg_x264(clip, bps, preset, clip.i420.len(), &out)?.saturating_sub(startup);
    let stream = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    let units = access_units(&stream);
    if units.len() != clip.i420.len() {
        return Err(format!(
            "x264 {preset}: {} pictures for {} frames",
            units.len(),
            clip.i420.len()
        )
        .into());
    }
    Ok(Run {
        encoder: format!("x264 {preset}"),
        cpu,
        units: units.into_iter().enumerate().collect(),
    })
}

/// Decodes `stream` with ffmpeg into yuv420p pictures, one per access unit.
fn ffmpeg_decode(clip: &Clip, stream: &[u8]) -> Result<Vec<Vec<u8>>, BoxError> {
    let input = std::env::temp_dir().join(format!("genos-bench-{}-judge.h264", std::process::id()));
    std::fs::write(&input, stream)?;
    let mut child = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-f",
            "h264",
            "-i",
        ])
        .arg(&input)
        .args([
            "-fps_mode",
            "passthrough",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "yuv420p",
            "-",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ffmpeg: {e}"))?;
    let mut raw = Vec::new();
    child
        .stdout
        .take()
        .ok_or("ffmpeg stdout")?
        .read_to_end(&mut raw)?;
    let status = child.wait()?;
    std::fs::remove_file(&input)?;
    if !status.success() {
        return Err(format!("ffmpeg could not decode the stream: {status}").into());
    }
    let size = clip.width as usize * clip.height as usize * 3 / 2;
    Ok(raw.chunks_exact(size).map(<[u8]>::to_vec).collect())
}

/// What a row prints.
struct Measured {
    encoded: usize,
    frames: usize,
    fps_per_cpu: f64,
    y_psnr: f64,
    y_psnr_min: f64,
    avg_kbps: f64,
    worst_kbps: f64,
    /// The first picture (the IDR), kbit.
    first_kbit: f64,
}

fn y_mse(a: &[u8], b: &[u8]) -> f64 {
    let sum: u64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = i64::from(x) - i64::from(y);
            (d * d) as u64
        })
        .sum();
    sum as f64 / a.len() as f64
}

fn psnr_of(mse: f64) -> f64 {
    if mse <= 0.0 {
        100.0
    } else {
        (10.0 * (255.0f64 * 255.0 / mse).log10()).min(100.0)
    }
}

fn measure(clip: &Clip, run: &Run) -> Result<Measured, BoxError> {
    let stream: Vec<u8> = run
        .units
        .iter()
        .flat_map(|(_, d)| d.iter().copied())
        .collect();
    let pictures = ffmpeg_decode(clip, &stream)?;
    if pictures.len() != run.units.len() {
        return Err(format!(
            "{}: ffmpeg decoded {} pictures from {} access units",
            run.encoder,
            pictures.len(),
            run.units.len()
        )
        .into());
    }
    // What a viewer shows for each source frame: the last picture decoded by then.
    let luma = clip.width as usize * clip.height as usize;
    let mut shown: Option<&[u8]> = None;
    let mut next = 0;
    let (mut mse_sum, mut worst) = (0.0, f64::INFINITY);
    let mut bits = vec![0u64; clip.i420.len()];
    for (i, reference) in clip.i420.iter().enumerate() {
        while next < run.units.len() && run.units[next].0 == i {
            bits[i] += run.units[next].1.len() as u64 * 8;
            shown = Some(&pictures[next][..luma]);
            next += 1;
        }
        let mse = match shown {
            Some(y) => y_mse(&reference[..luma], y),
            None => y_mse(&reference[..luma], &vec![16; luma]),
        };
        mse_sum += mse;
        worst = worst.min(psnr_of(mse));
    }
    let n = clip.i420.len();
    let window = (clip.fps as usize).min(n);
    let worst_bits = bits
        .windows(window)
        .map(|w| w.iter().sum::<u64>())
        .max()
        .unwrap_or(0);
    let seconds = n as f64 / f64::from(clip.fps);
    Ok(Measured {
        encoded: run.units.len(),
        frames: n,
        fps_per_cpu: n as f64 / run.cpu.as_secs_f64().max(1e-9),
        y_psnr: psnr_of(mse_sum / n as f64),
        y_psnr_min: worst,
        avg_kbps: bits.iter().sum::<u64>() as f64 / seconds / 1000.0,
        worst_kbps: worst_bits as f64 / (window as f64 / f64::from(clip.fps)) / 1000.0,
        first_kbit: run
            .units
            .first()
            .map_or(0.0, |(_, d)| d.len() as f64 * 8.0 / 1000.0),
    })
}

fn scene_specs(plan: &Plan, recordings_dir: &Path) -> Result<Vec<SceneSpec>, BoxError> {
    let synthetic = [
        Scene::Windows,
        Scene::Typing,
        Scene::Scrolling,
        Scene::Still,
    ];
    let manifest = || -> Result<Manifest, BoxError> { Ok(Manifest::load(recordings_dir)?) };
    let mut specs = Vec::new();
    for name in &plan.scenes {
        match name.as_str() {
            "all" | "synthetic" | "recorded" => {
                if name != "recorded" {
                    specs.extend(synthetic.map(SceneSpec::Synthetic));
                }
                if name != "synthetic" {
                    specs.extend(manifest()?.recordings.into_iter().map(SceneSpec::Recorded));
                }
            }
            other => match other.parse::<Scene>() {
                Ok(scene) => specs.push(SceneSpec::Synthetic(scene)),
                Err(_) => specs.push(SceneSpec::Recorded(manifest()?.get(other)?.clone())),
            },
        }
    }
    for spec in &specs {
        if let SceneSpec::Recorded(rec) = spec {
            rec.verify()?;
            println!(
                "recording {}: {} ({}x{}, {} fps, {} frames, {} distinct), sha256 {} checked",
                rec.name,
                rec.path.display(),
                rec.width,
                rec.height,
                rec.fps,
                rec.frames,
                rec.distinct_frames,
                rec.sha256
            );
        }
    }
    Ok(specs)
}

fn bench_conversion() -> Result<(), BoxError> {
    let (w, h) = (1920u32, 1080u32);
    let mut source = SyntheticSource::new(Scene::Windows, w, h, 60.0);
    let data = source.advance().frame.data.to_vec();
    let frame = FrameRef::packed(w, h, PixelFormat::Bgrx, &data);
    let bytes = data.len();
    let mut dst = vec![0u8; bytes];
    let mut pic = I420Buffer::new(w, h)?;
    let mut pic2 = I420Buffer::new(w, h)?;
    // A window-sized damage rectangle (a tenth of the screen): cost should follow the area.
    let rect = Rect::new(400, 300, w / 4, h * 2 / 5);
    let rect_bytes = (rect.width * rect.height * 4) as usize;
    /// Bytes of input per call, name, the operation.
    type Op<'a> = (usize, &'static str, Box<dyn FnMut() + 'a>);
    let mut ops: [Op; 3] = [
        (
            bytes,
            "memcpy (same frame)",
            Box::new(|| {
                dst.copy_from_slice(std::hint::black_box(&data));
                std::hint::black_box(&dst);
            }),
        ),
        (
            bytes,
            "yuv crate, full frame (BT.601 limited)",
            Box::new(|| {
                pic.convert_full(std::hint::black_box(&frame))
                    .expect("convert")
            }),
        ),
        (
            rect_bytes,
            "yuv crate, damage 480x432 (10% of frame)",
            Box::new(|| {
                pic2.convert_damage(std::hint::black_box(&frame), &[rect])
                    .expect("convert");
            }),
        ),
    ];
    // Interleaved batches on the thread's CPU clock, best batch kept: other processes on a
    // shared machine disturb all operations alike and as little as possible.
    let mut best = [f64::INFINITY; 3];
    for _ in 0..15 {
        for (i, (_, _, f)) in ops.iter_mut().enumerate() {
            let start = thread_cpu();
            for _ in 0..20 {
                f();
            }
            best[i] = best[i].min((thread_cpu() - start).as_secs_f64() / 20.0);
        }
    }
    println!();
    println!("Colour conversion, 1920x1080 BGRX -> I420 (GB/s of BGRX input, thread CPU time):");
    println!("| operation                                   |   GB/s | vs memcpy |");
    println!("|---------------------------------------------|-------:|----------:|");
    let memcpy = bytes as f64 / best[0] / 1e9;
    for ((bytes, name, _), t) in ops.iter().zip(best) {
        let gbs = *bytes as f64 / t / 1e9;
        println!("| {name:<43} | {gbs:>6.2} | {:>9.2} |", gbs / memcpy);
    }
    Ok(())
}

/// Identical-pixel skipping, per scene, size, rate and bitrate: the scene's own damage, then the
/// whole screen damaged every frame with skipping on and off; CPU ratios against "noskip".
fn bench_repaint(plan: &Plan, specs: &[SceneSpec]) -> Result<(), BoxError> {
    println!("Identical repaints: whole-screen damage every frame, openh264 screen mode, one thread; CPU and frames sent with identical-pixel skipping on and off (ratios in the same run).");
    println!("| scene          |      size | fps | target | damage        | sent/frames | fps/CPU-s | CPU vs noskip | Y-PSNR | avg kbit/s |");
    println!("|----------------|-----------|----:|-------:|---------------|------------:|----------:|--------------:|-------:|-----------:|");
    let modes = [
        Damage::WholeScreen { skip: false },
        Damage::WholeScreen { skip: true },
        Damage::Source,
    ];
    for &(w, h) in &plan.sizes {
        for &fps in &plan.fps {
            for spec in specs {
                let frames = (plan.seconds * f64::from(fps)).round() as usize;
                let clip = load_clip(spec, (w, h), fps, frames)?;
                for &kbps in &plan.kbps {
                    let mut noskip_cpu = None;
                    for mode in modes {
                        let run = run_openh264_with(
                            &clip,
                            kbps * 1000,
                            Usage::ScreenContentRealTime,
                            1,
                            mode,
                        )?;
                        let cpu = run.cpu.as_secs_f64();
                        let base = *noskip_cpu.get_or_insert(cpu);
                        let m = measure(&clip, &run)?;
                        let label = match mode {
                            Damage::Source => "scene's own",
                            Damage::WholeScreen { skip: true } => "whole, skip",
                            Damage::WholeScreen { skip: false } => "whole, noskip",
                        };
                        println!(
                            "| {:<14} | {:>9} | {:>3} | {:>6} | {:<13} | {:>5}/{:<5} | {:>9.0} | {:>12.2}x | {:>6.2} | {:>10.0} |",
                            spec.name(),
                            format!("{w}x{h}"),
                            fps,
                            kbps,
                            label,
                            m.encoded,
                            m.frames,
                            m.fps_per_cpu,
                            cpu / base,
                            m.y_psnr,
                            m.avg_kbps,
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let plan = Plan::new(&args)?;
    let dir = args
        .recordings
        .clone()
        .unwrap_or_else(scenes::recordings_dir);
    let specs = scene_specs(&plan, &dir)?;
    let started = Instant::now();
    if args.repaint {
        bench_repaint(&plan, &specs)?;
        eprintln!("benchmark took {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    println!(
        "Encode-only, one core each; {:.1} s of content per row; fps/CPU-s = source frames per \
         CPU-second; Y-PSNR over all frames of what ffmpeg decodes (each source frame against \
         the last picture sent by then); worst 1 s = highest bitrate over any 1 s window.",
        plan.seconds
    );
    println!("| scene          |      size | fps | target | encoder         | sent/frames | fps/CPU-s | vs x264 uf | Y-PSNR | vs x264 vf | Y min | avg kbit/s | worst 1 s kbit/s | IDR kbit |");
    println!("|----------------|-----------|----:|-------:|-----------------|------------:|----------:|-----------:|-------:|-----------:|------:|-----------:|-----------------:|---------:|");
    for &(w, h) in &plan.sizes {
        for &fps in &plan.fps {
            for spec in &specs {
                let frames = (plan.seconds * f64::from(fps)).round() as usize;
                let clip = load_clip(spec, (w, h), fps, frames)?;
                for &kbps in &plan.kbps {
                    let bps = kbps * 1000;
                    let mut rows = Vec::new();
                    for name in &args.encoders {
                        let run = match name.as_str() {
                            "camera" => run_openh264(&clip, bps, Usage::CameraRealTime, 1)?,
                            "screen" => run_openh264(&clip, bps, Usage::ScreenContentRealTime, 1)?,
                            "screen-2t" => {
                                run_openh264(&clip, bps, Usage::ScreenContentRealTime, 2)?
                            }
                            "x264-ultrafast" => run_x264(&clip, bps, "ultrafast")?,
                            "x264-veryfast" => run_x264(&clip, bps, "veryfast")?,
                            other => return Err(format!("unknown encoder {other:?}").into()),
                        };
                        let m = measure(&clip, &run)?;
                        rows.push((run.encoder, m));
                    }
                    let find = |label: &str| rows.iter().find(|(e, _)| e == label).map(|(_, m)| m);
                    let (uf, vf) = (find("x264 ultrafast"), find("x264 veryfast"));
                    for (encoder, m) in &rows {
                        let speed = uf.map_or("-".into(), |u| {
                            format!("{:.2}x", m.fps_per_cpu / u.fps_per_cpu)
                        });
                        let quality =
                            vf.map_or("-".into(), |v| format!("{:+.2}", m.y_psnr - v.y_psnr));
                        println!(
                            "| {:<14} | {:>9} | {:>3} | {:>6} | {:<15} | {:>5}/{:<5} | {:>9.0} | {:>10} | {:>6.2} | {:>10} | {:>5.1} | {:>10.0} | {:>9.0} ({:>4.0}%) | {:>8.0} |",
                            spec.name(),
                            format!("{w}x{h}"),
                            fps,
                            kbps,
                            encoder,
                            m.encoded,
                            m.frames,
                            m.fps_per_cpu,
                            speed,
                            m.y_psnr,
                            quality,
                            m.y_psnr_min,
                            m.avg_kbps,
                            m.worst_kbps,
                            m.worst_kbps / f64::from(kbps) * 100.0,
                            m.first_kbit,
                        );
                    }
                }
            }
        }
    }
    if args.conversion {
        bench_conversion()?;
    }
    eprintln!("benchmark took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
