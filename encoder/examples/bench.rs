//! Encoder benchmark: openh264 (this crate) against ffmpeg's libx264 ultrafast/zerolatency on the
//! same synthetic frames (`genos-scenes`) at matched bitrate, plus colour conversion throughput
//! against memcpy. Prints one table; see docs/encoder.md. Run with `scripts/bench-encoder`
//! (release build).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use encoder::{
    psnr_bgrx, Decoder, Encoder, EncoderConfig, FrameRef, I420Buffer, PixelFormat, Rect, Usage,
};
use scenes::{Scene, SyntheticSource};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the GenOS encoder against x264 and colour conversion against memcpy")]
struct Args {
    /// Frames per scene and size.
    #[arg(long, default_value_t = 120)]
    frames: u32,
    /// Frame sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1280x720,1920x1080")]
    sizes: Vec<String>,
    /// Scenes, comma separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "windows,typing,scrolling,still"
    )]
    scenes: Vec<Scene>,
    /// Source frame rate (sets motion per frame and the encoders' rate budget).
    #[arg(long, default_value_t = 60.0)]
    fps: f32,
    /// Bitrate in kbit/s per 1280x720 (scaled by pixel count for other sizes).
    #[arg(long, default_value_t = 2500)]
    kbps_720p: u32,
    /// Skip the rows for openh264's screen-content mode.
    #[arg(long)]
    no_screen_mode: bool,
    /// Only measure colour conversion.
    #[arg(long)]
    conversion_only: bool,
    /// Skip the ffmpeg/x264 rows.
    #[arg(long)]
    no_x264: bool,
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

struct Row {
    scene: Scene,
    size: (u32, u32),
    encoder: &'static str,
    frames: u32,
    encoded: u32,
    cpu: Duration,
    bytes: u64,
    psnr_sum: f64,
    psnr_min: f64,
}

impl Row {
    fn print(&self) {
        let fps = f64::from(self.frames) / self.cpu.as_secs_f64().max(1e-9);
        let ms_per_enc = if self.encoded > 0 {
            self.cpu.as_secs_f64() * 1e3 / f64::from(self.encoded)
        } else {
            0.0
        };
        println!(
            "| {:<9} | {:>9} | {:<15} | {:>7}/{:<4} | {:>8.0} | {:>8.2} | {:>10.1} | {:>9.2} | {:>8.2} |",
            self.scene.name(),
            format!("{}x{}", self.size.0, self.size.1),
            self.encoder,
            self.encoded,
            self.frames,
            fps,
            ms_per_enc,
            self.bytes as f64 * 8.0 / f64::from(self.frames) / 1000.0,
            self.psnr_sum / f64::from(self.frames),
            self.psnr_min,
        );
    }
}

/// PSNR capped at 100 dB so identical frames do not make the mean infinite.
fn psnr(a: &[u8], b: &[u8], w: u32, h: u32) -> f64 {
    psnr_bgrx(a, b, w, h).min(100.0)
}

fn bench_openh264(
    scene: Scene,
    (w, h): (u32, u32),
    args: &Args,
    bps: u32,
    usage: Usage,
) -> Result<Row, Box<dyn std::error::Error>> {
    let mut source = SyntheticSource::new(scene, w, h, args.fps);
    let mut enc = Encoder::with_usage(
        EncoderConfig {
            width: w,
            height: h,
            fps: args.fps,
            bitrate_bps: bps,
        },
        usage,
    )?;
    let label = match usage {
        Usage::CameraRealTime => "openh264",
        Usage::ScreenContentRealTime => "openh264 screen",
    };
    let mut dec = Decoder::new()?;
    let mut shown: Vec<u8> = Vec::new();
    let mut row = Row {
        scene,
        size: (w, h),
        encoder: label,
        frames: args.frames,
        encoded: 0,
        cpu: Duration::ZERO,
        bytes: 0,
        psnr_sum: 0.0,
        psnr_min: f64::INFINITY,
    };
    for _ in 0..args.frames {
        let frame = source.advance();
        let t0 = thread_cpu();
        // Like the streaming server: encode changes; when idle, spend the time sharpening.
        let out = match enc.encode(&frame.frame, &frame.damage, false)? {
            Some(out) => Some(out),
            None => enc.refine()?,
        };
        row.cpu += thread_cpu() - t0;
        if let Some(out) = out {
            row.encoded += 1;
            row.bytes += out.data.len() as u64;
            if let Some(pic) = dec.decode(&out.data)? {
                shown = pic.bgrx;
            }
        }
        // A viewer keeps showing the last decoded picture when nothing was sent.
        let p = psnr(frame.frame.data, &shown, w, h);
        row.psnr_sum += p;
        row.psnr_min = row.psnr_min.min(p);
    }
    Ok(row)
}

fn run_ffmpeg(
    scene: Scene,
    (w, h): (u32, u32),
    fps: f32,
    bps: u32,
    frames: u32,
    out: &Path,
) -> Result<Duration, Box<dyn std::error::Error>> {
    let before = children_cpu();
    let mut child = Command::new("ffmpeg")
        .args([
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "bgra",
        ])
        .args(["-s", &format!("{w}x{h}"), "-r", &fps.to_string(), "-i", "-"])
        .args([
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-threads",
            "1",
        ])
        .args([
            "-b:v",
            &bps.to_string(),
            "-maxrate",
            &bps.to_string(),
            "-bufsize",
            &bps.to_string(),
        ])
        .args(["-g", "100000", "-pix_fmt", "yuv420p", "-f", "h264"])
        .arg(out)
        .stdin(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ffmpeg (apt install ffmpeg): {e}"))?;
    {
        let mut stdin = child.stdin.take().ok_or("ffmpeg stdin")?;
        let mut source = SyntheticSource::new(scene, w, h, fps);
        for _ in 0..frames {
            stdin.write_all(source.advance().frame.data)?;
        }
    }
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("ffmpeg failed: {status}").into());
    }
    Ok(children_cpu() - before)
}

fn bench_x264(
    scene: Scene,
    (w, h): (u32, u32),
    args: &Args,
    bps: u32,
) -> Result<Row, Box<dyn std::error::Error>> {
    let out = std::env::temp_dir().join(format!(
        "genos-bench-{}-{scene}-{w}x{h}.h264",
        std::process::id()
    ));
    // ffmpeg's own start-up and teardown is not encoding: subtract a one-frame run.
    let startup = run_ffmpeg(scene, (w, h), args.fps, bps, 1, &out)?;
    let cpu = run_ffmpeg(scene, (w, h), args.fps, bps, args.frames, &out)?.saturating_sub(startup);
    let stream = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    let mut dec = Decoder::new()?;
    let mut pictures = Vec::new();
    for nal in openh264::nal_units(&stream) {
        if let Some(pic) = dec.decode(nal)? {
            pictures.push(pic.bgrx);
        }
    }
    let mut source = SyntheticSource::new(scene, w, h, args.fps);
    let mut row = Row {
        scene,
        size: (w, h),
        encoder: "x264 ultrafast",
        frames: args.frames,
        encoded: pictures.len() as u32,
        cpu,
        bytes: stream.len() as u64,
        psnr_sum: 0.0,
        psnr_min: f64::INFINITY,
    };
    let black = vec![0u8; w as usize * h as usize * 4];
    for i in 0..args.frames as usize {
        let frame = source.advance();
        let p = psnr(frame.frame.data, pictures.get(i).unwrap_or(&black), w, h);
        row.psnr_sum += p;
        row.psnr_min = row.psnr_min.min(p);
    }
    Ok(row)
}

/// Throughput in GB/s of each operation (bytes processed per call, the call), measured on the
/// thread's CPU clock in interleaved batches and keeping each one's best batch, so that other
/// processes on a shared machine disturb all of them alike and as little as possible.
fn throughputs(ops: &mut [(usize, &mut dyn FnMut())]) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; ops.len()];
    for _ in 0..15 {
        for (i, (_, f)) in ops.iter_mut().enumerate() {
            let start = thread_cpu();
            let reps = 20;
            for _ in 0..reps {
                f();
            }
            best[i] = best[i].min((thread_cpu() - start).as_secs_f64() / f64::from(reps));
        }
    }
    ops.iter()
        .zip(best)
        .map(|((bytes, _), t)| *bytes as f64 / t / 1e9)
        .collect()
}

fn bench_conversion() -> Result<(), Box<dyn std::error::Error>> {
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
    let mut yuv = openh264::formats::YUVBuffer::new(w as usize, h as usize);
    let mut memcpy = || {
        dst.copy_from_slice(std::hint::black_box(&data));
        std::hint::black_box(&dst);
    };
    let mut full = || {
        pic.convert_full(std::hint::black_box(&frame))
            .expect("convert")
    };
    let mut partial = || {
        pic2.convert_damage(std::hint::black_box(&frame), &[rect])
            .expect("convert");
    };
    let mut oh = || {
        yuv.read_bgra8(openh264::formats::BgraSliceU8::new(
            std::hint::black_box(&data),
            (w as usize, h as usize),
        ));
    };
    let rates = throughputs(&mut [
        (bytes, &mut memcpy),
        (bytes, &mut full),
        (rect_bytes, &mut partial),
        (bytes, &mut oh),
    ]);
    let (memcpy, full, partial, oh) = (rates[0], rates[1], rates[2], rates[3]);
    let partial_time_ratio = (rect_bytes as f64 / partial) / (bytes as f64 / full);
    println!();
    println!("Colour conversion, 1920x1080 BGRX -> I420 (GB/s of BGRX input, one core, thread CPU time):");
    println!("| operation                                   |   GB/s | vs memcpy |");
    println!("|---------------------------------------------|-------:|----------:|");
    for (name, v) in [
        ("memcpy (same frame)", memcpy),
        ("yuv crate, full frame (BT.601 limited)", full),
        ("yuv crate, damage 480x432 (10% of frame)", partial),
        ("openh264 crate's built-in BGRA->YUV", oh),
    ] {
        println!("| {name:<43} | {v:>6.2} | {:>9.2} |", v / memcpy);
    }
    println!(
        "Damage-only conversion of 10% of the frame takes {:.1}% of a full conversion's time.",
        partial_time_ratio * 100.0
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let sizes = args
        .sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    println!("Encode, one core, {} frames per row at {} fps (fps = source frames per CPU-second; openh264 skips frames without damage):", args.frames, args.fps);
    println!("| scene     |      size | encoder         | encoded/frames |  src fps | ms/enc'd | kbit/frame | PSNR mean | PSNR min |");
    println!("|-----------|-----------|-----------------|----------------|---------:|---------:|-----------:|----------:|---------:|");
    for &(w, h) in sizes.iter().filter(|_| !args.conversion_only) {
        let bps =
            (u64::from(args.kbps_720p) * 1000 * u64::from(w) * u64::from(h) / (1280 * 720)) as u32;
        for &scene in &args.scenes {
            bench_openh264(scene, (w, h), &args, bps, Usage::CameraRealTime)?.print();
            if !args.no_screen_mode {
                bench_openh264(scene, (w, h), &args, bps, Usage::ScreenContentRealTime)?.print();
            }
            if !args.no_x264 {
                bench_x264(scene, (w, h), &args, bps)?.print();
            }
        }
    }
    bench_conversion()?;
    eprintln!("benchmark took {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
