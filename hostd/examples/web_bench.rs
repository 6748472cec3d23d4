//! Browser glass-to-glass latency beside genos-view's, in one run (issue #14).
//!
//! `scripts/bench-web` (or `cargo run --release -p genos-hostd --example web_bench`)
//! serves one synthetic 1080p60 scene (`Scene::Windows`) from hostd's `StreamServer` and its
//! web server on loopback and measures, one after the other, for `--seconds` each:
//! 1. genos-view's client library (`client::Session`, decode on): capture (the frame header's
//!    time, server clock) to decoded, with the clock offset from Ping/Pong, as
//!    client/examples/stream_bench.rs does;
//! 2. headless Chromium over WebTransport: the page (web/genos.js) measures capture to
//!    painted on its canvas, on its clock corrected by the offset from its own Ping/Pong,
//!    and records every frame (`genos.startRecording`); decode time is chunk submitted to
//!    `VideoDecoder` output;
//! 3. the same over the WebSocket fallback.
//!
//! Each skips the first 10 decoded frames (the first keyframe and the decoder's start), as
//! stream_bench does. It prints one table (frames, fps, latency p50/p99, decode p50, the
//! ratios of p50 and p99 to genos-view's; target: the browser's p50 within 1.5x) and how long
//! each part took. Flags: `--seconds N` (default 10), `--size WxH` (default 1920x1080),
//! `--fps N` (default 60). Needs Debian's `chromium` (scripts/install-deps).

#[path = "../tests/browser/mod.rs"]
mod browser;

use std::time::{Duration, Instant};

use browser::{Browser, Host};
use client::stats::percentile;
use client::{ConnectOptions, ConnectUrl, Event, Session, StatsCollector};
use proto::stream::Rights;
use scenes::Scene;
use serde_json::Value;

/// Decoded frames not measured at the start of each session.
const WARM_UP: u64 = 10;
/// The browser's p50 target, relative to genos-view's.
const TARGET_RATIO: f64 = 1.5;

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    width: u32,
    height: u32,
    fps: f32,
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        seconds: 10,
        width: 1920,
        height: 1080,
        fps: 60.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = val()?.parse().map_err(|_| "--seconds N")?,
            "--fps" => o.fps = val()?.parse().map_err(|_| "--fps N")?,
            "--size" => {
                let v = val()?;
                let (w, h) = v.split_once('x').ok_or("--size WxH")?;
                o.width = w.parse().map_err(|_| "--size WxH: width")?;
                o.height = h.parse().map_err(|_| "--size WxH: height")?;
            }
            "-h" | "--help" => {
                return Err("usage: web_bench [--seconds N] [--size WxH] [--fps N]".into())
            }
            other => return Err(format!("unknown argument {other} (try --help)")),
        }
    }
    if o.seconds == 0 || o.fps <= 0.0 {
        return Err("--seconds and --fps must be above 0".into());
    }
    Ok(o)
}

fn main() {
    let opts = match parse_args() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("web_bench: {e}");
            std::process::exit(2);
        }
    };
    if browser::chromium().is_none() {
        eprintln!("web_bench: chromium is not installed (scripts/install-deps)");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(&opts));
}

/// One measured client: per-frame latencies and decode times (µs) and the window's length.
struct Measured {
    frames: u64,
    /// First to last measured frame.
    span: Duration,
    latency_us: Vec<u64>,
    decode_us: Vec<u64>,
    dropped: u64,
    /// Capture to handed to the decoder (encoding, transport, the client's queue).
    transit_us: Vec<u64>,
    /// For the browser: `drawImage` onto the canvas.
    draw_us: Vec<u64>,
    /// For the browser: capture to the page's next animation frame after painting.
    next_frame_us: Vec<u64>,
    /// How long the part took, connecting and warm-up included.
    took: Duration,
}

impl Measured {
    fn fps(&self) -> f64 {
        let s = self.span.as_secs_f64();
        if s > 0.0 {
            self.frames.saturating_sub(1) as f64 / s
        } else {
            0.0
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// genos-view's side: the client library's session, decode on, as stream_bench measures it.
async fn native(url: &ConnectUrl, seconds: u64) -> Result<Measured, String> {
    let started = Instant::now();
    let mut s = Session::connect(url, ConnectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    s.skip_frames(WARM_UP).await?;
    let mut stats = StatsCollector::default();
    let mut latency_us = Vec::new();
    let mut decode_us = Vec::new();
    let mut transit_us = Vec::new();
    let (mut first, mut last) = (None, None);
    let dropped_before = s
        .counters()
        .frames_dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    let end = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < end {
        match tokio::time::timeout_at(end.into(), s.next_event()).await {
            Ok(Some(Event::Frame(f))) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                latency_us.push(f.latency.as_micros() as u64);
                decode_us.push(f.decode_time.as_micros() as u64);
                transit_us.push(f.latency.saturating_sub(f.decode_time).as_micros() as u64);
                stats.record(&f);
            }
            Ok(Some(Event::Closed(r))) => return Err(r),
            Ok(Some(_)) => {}
            Ok(None) => return Err("session ended".into()),
            Err(_) => break,
        }
    }
    let dropped = s
        .counters()
        .frames_dropped
        .load(std::sync::atomic::Ordering::Relaxed)
        - dropped_before;
    s.close().await;
    Ok(Measured {
        frames: stats.frames(),
        span: match (first, last) {
            (Some(a), Some(b)) => b - a,
            _ => Duration::ZERO,
        },
        latency_us,
        decode_us,
        dropped,
        transit_us,
        draw_us: Vec::new(),
        next_frame_us: Vec::new(),
        took: started.elapsed(),
    })
}

/// The page's side over `transport`: a 1:1 viewport of the stream's size at device pixel
/// ratio 1, the page's own recording of every frame after the warm-up.
async fn in_browser(
    browser: &Browser,
    hx: &Host,
    token: &str,
    transport: &str,
    opts: &Opts,
) -> Result<Measured, String> {
    let started = Instant::now();
    let link = format!("{}&transport={transport}", hx.link(token));
    let page = browser.open(&link, opts.width, opts.height).await;
    let result = record(&page, transport, opts.seconds).await;
    page.close().await;
    let mut m = result?;
    m.took = started.elapsed();
    Ok(m)
}

async fn record(
    page: &browser::Page<'_>,
    transport: &str,
    seconds: u64,
) -> Result<Measured, String> {
    // The recording starts as soon as the page's script has run; its warm-up ends after
    // WARM_UP decoded frames.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let started = page
            .eval(&format!(
                "window.genos && window.genos.startRecording ? \
                 (window.genos.recordingStatus() || window.genos.startRecording({WARM_UP}), true) : false"
            ))
            .await;
        if started == Value::Bool(true) {
            break;
        }
        if Instant::now() > deadline {
            return Err("the page did not load in 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = page.eval("window.genos.recordingStatus()").await;
        if status["started"] == Value::Bool(true) {
            break;
        }
        let error = page.eval("window.genos.error").await;
        if error.is_object() {
            return Err(format!("the page failed: {error}"));
        }
        if Instant::now() > deadline {
            let state = page.eval("JSON.stringify([window.genos.state, window.genos.framesDecoded, window.genos.notices])").await;
            return Err(format!("no {WARM_UP} decoded frames in 60 s: {state}"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let r = page.eval("window.genos.stopRecording()").await;
    let used = page.eval("window.genos.transport").await;
    if used != transport {
        return Err(format!("the page used {used}, not {transport}"));
    }
    let list = |key: &str| -> Vec<u64> {
        r[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_f64)
                    .map(|ms| (ms * 1000.0).max(0.0).round() as u64)
                    .collect()
            })
            .unwrap_or_default()
    };
    let frames = r["frames"].as_u64().ok_or(format!("no recording: {r}"))?;
    if r["decodeErrors"].as_u64().unwrap_or(0) > 0 {
        return Err(format!("decoder errors: {}", r["decodeErrors"]));
    }
    Ok(Measured {
        frames,
        span: Duration::from_secs_f64(r["spanMs"].as_f64().unwrap_or(0.0) / 1000.0),
        latency_us: list("latencyMs"),
        decode_us: list("decodeMs"),
        dropped: r["dropped"].as_u64().unwrap_or(0),
        transit_us: list("transitMs"),
        draw_us: list("drawMs"),
        next_frame_us: list("nextFrameMs"),
        took: Duration::ZERO,
    })
}

async fn run(opts: &Opts) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!(
        "web_bench: {}x{} @ {} fps, {} s per client after {WARM_UP} warm-up frames; load average {}",
        opts.width,
        opts.height,
        opts.fps,
        opts.seconds,
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    let total = Instant::now();
    let t = Instant::now();
    let hx = browser::host(Scene::Windows, opts.width, opts.height, opts.fps).await;
    let token = hx.token(Rights::VIEW);
    let url: ConnectUrl = hx
        .server
        .connect_url(&hx.env.name, &token)
        .expect("connect url")
        .parse()
        .expect("url");
    let setup = t.elapsed();

    let view = native(&url, opts.seconds).await;
    eprintln!("web_bench: genos-view done");
    let t = Instant::now();
    let browser = Browser::start(&hx.spki).await;
    let browser_start = t.elapsed();
    let mut rows = vec![("genos-view (QUIC, client library)", view)];
    for (name, transport) in [
        ("Chromium, WebTransport", "webtransport"),
        ("Chromium, WebSocket", "websocket"),
    ] {
        let r = in_browser(&browser, &hx, &token, transport, opts).await;
        eprintln!("web_bench: {name} done");
        rows.push((name, r));
    }
    drop(browser);

    let (base_p50, base_p99) = match &rows[0].1 {
        Ok(m) => (
            ms(percentile(&m.latency_us, 0.5)),
            ms(percentile(&m.latency_us, 0.99)),
        ),
        Err(_) => (f64::NAN, f64::NAN),
    };
    println!();
    println!(
        "| client | frames | fps | dropped | latency p50 ms | latency p99 ms | decode p50 ms | p50 vs genos-view | p99 vs genos-view | took s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, r) in &rows {
        match r {
            Err(e) => println!("| {name} | failed: {e} | | | | | | | | |"),
            Ok(m) => {
                let p50 = ms(percentile(&m.latency_us, 0.5));
                let p99 = ms(percentile(&m.latency_us, 0.99));
                println!(
                    "| {name} | {} | {:.1} | {} | {p50:.1} | {p99:.1} | {:.1} | {:.2}x | {:.2}x | {:.1} |",
                    m.frames,
                    m.fps(),
                    m.dropped,
                    ms(percentile(&m.decode_us, 0.5)),
                    p50 / base_p50,
                    p99 / base_p99,
                    m.took.as_secs_f64(),
                );
            }
        }
    }
    // Where the time goes: medians of each stage (they need not add up to the median total).
    println!();
    println!(
        "| client (p50 of each stage, ms) | capture → handed to the decoder | decode | drawImage | latency (to painted) | to the next animation frame |"
    );
    println!("|---|---|---|---|---|---|");
    for (name, r) in &rows {
        if let Ok(m) = r {
            let p = |v: &[u64]| {
                if v.is_empty() {
                    "–".to_string()
                } else {
                    format!("{:.1}", ms(percentile(v, 0.5)))
                }
            };
            println!(
                "| {name} | {} | {} | {} | {} | {} |",
                p(&m.transit_us),
                p(&m.decode_us),
                p(&m.draw_us),
                p(&m.latency_us),
                p(&m.next_frame_us),
            );
        }
    }
    println!();
    let verdict = |i: usize| match &rows[i].1 {
        Ok(m) => {
            let ratio = ms(percentile(&m.latency_us, 0.5)) / base_p50;
            format!(
                "{:.2}x ({})",
                ratio,
                if ratio <= TARGET_RATIO {
                    "met"
                } else {
                    "missed"
                }
            )
        }
        Err(_) => "–".into(),
    };
    println!(
        "target: browser p50 within {TARGET_RATIO}x of genos-view's: WebTransport {}, WebSocket {}",
        verdict(1),
        verdict(2)
    );
    println!(
        "took: set-up {:.1} s, browser start {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        browser_start.as_secs_f64(),
        total.elapsed().as_secs_f64()
    );
}
