//! `genos-view URL`: show a GenOS stream in a window, or measure it headless.
//!
//! `genos-view --headless --frames N --json URL` decodes N frames and prints one JSON object
//! (frames, fps, bitrate_kbps, latency_ms_p50/p99, decode_ms_p50, cursor_updates, ...);
//! `--dump DIR` saves the decoded frames as PNG.
//!
//! The window shares the clipboard with the environment both ways when the token has the
//! clipboard right (`--no-clipboard` turns that off) and asks the environment to take its
//! size whenever the user resized it (`--fixed-size`: keep the environment's size, only
//! scale).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use client::window::ViewerOptions;
use client::{error_chain, ConnectOptions, ConnectUrl, Event, Session, StatsCollector};

#[derive(Debug, Parser)]
#[command(name = "genos-view", about = "View a GenOS environment's screen")]
struct Args {
    /// Connect URL printed by genos-hostd: genos://HOST:PORT/ENV?token=...&cert=...
    url: String,
    /// No window: receive and decode, then print statistics.
    #[arg(long)]
    headless: bool,
    /// Headless: stop after this many decoded frames.
    #[arg(long, default_value_t = 300)]
    frames: u64,
    /// Headless: print the statistics as one JSON object.
    #[arg(long)]
    json: bool,
    /// Save decoded frames as PNG files in this directory.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Headless: give up after this many seconds.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Do not share the clipboard with the environment (in either direction).
    #[arg(long)]
    no_clipboard: bool,
    /// Keep the environment's display size: scale its frames to the window instead of
    /// asking it to take the window's size.
    #[arg(long)]
    fixed_size: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let url: ConnectUrl = match args.url.parse() {
        Ok(u) => u,
        Err(e) => {
            eprintln!("genos-view: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(dir) = &args.dump {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("genos-view: cannot create {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    }
    let result = if args.headless {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(headless(&args, &url))
    } else {
        let opts = ViewerOptions {
            dump: args.dump.clone(),
            clipboard: !args.no_clipboard,
            fixed_size: args.fixed_size,
        };
        client::window::run(url, opts).map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("genos-view: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn headless(args: &Args, url: &ConnectUrl) -> Result<(), String> {
    let mut session = Session::connect(url, ConnectOptions::default())
        .await
        .map_err(|e| error_chain(&e))?;
    let mut stats = StatsCollector::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    while stats.frames() < args.frames {
        let ev = tokio::time::timeout_at(deadline, session.next_event())
            .await
            .map_err(|_| {
                format!(
                    "timed out after {} s with {} of {} frames",
                    args.timeout_secs,
                    stats.frames(),
                    args.frames
                )
            })?;
        match ev {
            Some(Event::Frame(f)) => {
                stats.record(&f);
                if let Some(dir) = &args.dump {
                    save_png(dir, &f).map_err(|e| format!("saving frame {}: {e}", f.sequence))?;
                }
            }
            Some(Event::Cursor { .. }) => stats.record_cursor(),
            Some(Event::Closed(reason)) => return Err(format!("session ended: {reason}")),
            Some(Event::Error { code, message }) if code.is_fatal() => {
                return Err(format!("server error: {message} ({code:?})"))
            }
            Some(_) => {}
            None => return Err("session ended".into()),
        }
    }
    let c = session.counters();
    let report = stats.report(
        c.frames_dropped.load(std::sync::atomic::Ordering::Relaxed),
        session.connection_stats().path.rtt,
        c.clock_offset_us.load(std::sync::atomic::Ordering::Relaxed),
    );
    session.close().await;
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
    } else {
        println!(
            "{} frames, {:.1} fps, {:.0} kbit/s, latency p50 {:.1} ms p99 {:.1} ms, decode p50 {:.1} ms",
            report.frames,
            report.fps,
            report.bitrate_kbps,
            report.latency_ms_p50,
            report.latency_ms_p99,
            report.decode_ms_p50
        );
    }
    Ok(())
}

fn save_png(dir: &Path, f: &client::Frame) -> Result<(), client::dump::DumpError> {
    client::dump::save_png(&dir.join(format!("frame-{:06}.png", f.sequence)), f)
}
