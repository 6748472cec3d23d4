//! Streaming benchmark: glass-to-glass latency on loopback and behaviour under netem.
//!
//! `cargo run --release -p genos-client --example stream_bench` prints one table:
//! 1. baseline: the same frames encoded and decoded in-process (no network, no server), the
//!    floor the streamed latency is compared with;
//! 2. loopback: synthetic source → hostd stream server → QUIC → client decode, 1080p60;
//! 3. netem (root only): server and client in two network namespaces joined by a veth pair,
//!    20 ms delay each way (40 ms RTT) and 5 % loss on the server's egress: longest stall
//!    and time for the bitrate to settle. The namespaces are created and deleted by this run;
//!    no traffic leaves them.
//!
//! Flags: `--seconds N` (per phase, default 6), `--size WxH` (default 1920x1080), `--fps N`
//! (default 60), `--skip-netem`. Internal roles `--serve ADDR` / `--view URL` run inside the
//! namespaces.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::stats::percentile;
use client::{ConnectOptions, ConnectUrl, Event, Session, StatsCollector};
use encoder::synthetic::{Scene, SyntheticSource};
use encoder::{Decoder, Encoder, EncoderConfig};
use hostd::stream::abr::BitrateLimits;
use hostd::stream::{source, Identity, ServerConfig, StreamServer, TokenKey};
use proto::stream::Rights;

const ENV: &str = "bench";
const NS_SRV: &str = "genos-bench-srv";
const NS_CLI: &str = "genos-bench-cli";
const SRV_IP: &str = "10.231.77.1";
const CLI_IP: &str = "10.231.77.2";

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    width: u32,
    height: u32,
    fps: f32,
    skip_netem: bool,
}

fn parse_args() -> (Opts, Option<(String, String)>) {
    let mut o = Opts {
        seconds: 6,
        width: 1920,
        height: 1080,
        fps: 60.0,
        skip_netem: false,
    };
    let mut role = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--seconds" => o.seconds = val().parse().expect("--seconds N"),
            "--fps" => o.fps = val().parse().expect("--fps N"),
            "--size" => {
                let v = val();
                let (w, h) = v.split_once('x').expect("--size WxH");
                o.width = w.parse().expect("width");
                o.height = h.parse().expect("height");
            }
            "--skip-netem" => o.skip_netem = true,
            "--serve" => role = Some(("serve".to_owned(), val())),
            "--view" => role = Some(("view".to_owned(), val())),
            other => panic!("unknown argument {other}"),
        }
    }
    (o, role)
}

fn main() {
    let (opts, role) = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match role {
        Some((r, arg)) if r == "serve" => rt.block_on(serve_role(&opts, &arg)),
        Some((_, url)) => rt.block_on(view_role(&opts, &url)),
        None => rt.block_on(run_all(&opts)),
    }
}

/// Median and p99 of in-process encode+decode latency per frame: the floor for streaming.
fn baseline(opts: &Opts) -> (f64, f64) {
    let mut src = SyntheticSource::new(Scene::Windows, opts.width, opts.height, opts.fps);
    let mut enc = Encoder::new(EncoderConfig {
        width: opts.width,
        height: opts.height,
        fps: opts.fps,
        bitrate_bps: BitrateLimits::default().start_bps,
    })
    .expect("encoder");
    let mut dec = Decoder::new().expect("decoder");
    let mut lat = Vec::new();
    for i in 0..(opts.fps as usize * 3) {
        let f = src.advance();
        let t0 = f.captured_at;
        if let Some(e) = enc.encode(&f.frame, &f.damage, i == 0).expect("encode") {
            if dec.decode(&e.data).expect("decode").is_some() {
                lat.push(t0.elapsed().as_micros() as u64);
            }
        }
    }
    (
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
    )
}

struct ViewResult {
    report: client::SessionReport,
    duration: Duration,
}

async fn view(url: &ConnectUrl, seconds: u64) -> Result<ViewResult, String> {
    let mut s = Session::connect(url, ConnectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    // Warm-up: the first keyframe and a few frames.
    let mut warm = 0;
    while warm < 10 {
        match s.next_event().await {
            Some(Event::Frame(_)) => warm += 1,
            Some(Event::Closed(r)) => return Err(r),
            Some(_) => {}
            None => return Err("session ended".into()),
        }
    }
    let mut stats = StatsCollector::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(seconds);
    while Instant::now() < end {
        match tokio::time::timeout_at(end.into(), s.next_event()).await {
            Ok(Some(Event::Frame(f))) => stats.record(&f),
            Ok(Some(Event::Closed(r))) => return Err(r),
            Ok(Some(_)) => {}
            Ok(None) => return Err("session ended".into()),
            Err(_) => break,
        }
    }
    let c = s.counters().clone();
    let report = stats.report(
        c.frames_dropped.load(std::sync::atomic::Ordering::Relaxed),
        s.connection_stats().path.rtt,
        c.clock_offset_us.load(std::sync::atomic::Ordering::Relaxed),
    );
    s.close().await;
    Ok(ViewResult {
        report,
        duration: t0.elapsed(),
    })
}

fn start_server(opts: &Opts, listen: &str) -> (StreamServer, String) {
    let identity = Identity::generate(&[]).expect("identity");
    let tokens = Arc::new(TokenKey::generate().expect("key"));
    let cfg = ServerConfig {
        listen: listen.parse().expect("listen address"),
        ..ServerConfig::default()
    };
    let server = StreamServer::bind(cfg, &identity, tokens.clone()).expect("bind");
    let (src, _) = source::synthetic(Scene::Windows, opts.width, opts.height, opts.fps);
    server.add_environment(ENV, src, opts.fps).expect("env");
    let token = tokens
        .issue(ENV, Rights::VIEW, Duration::from_secs(600))
        .expect("token");
    let url = server.connect_url(ENV, &token).expect("url");
    (server, url)
}

/// Runs in the server namespace: prints the URL, then `t_ms bitrate_bps` lines every 50 ms.
async fn serve_role(opts: &Opts, listen: &str) {
    let (server, url) = start_server(opts, listen);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{url}").unwrap();
    out.flush().unwrap();
    drop(out);
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let limit = Duration::from_secs(opts.seconds + 30);
    while t0.elapsed() < limit {
        tick.tick().await;
        let st = server.env_stats(ENV).expect("env");
        if st.viewers == 0 {
            continue;
        }
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{} {}", t0.elapsed().as_millis(), st.bitrate_bps).is_err() {
            return;
        }
        let _ = out.flush();
    }
}

/// Runs in the client namespace: prints the session report as JSON.
async fn view_role(opts: &Opts, url: &str) {
    let url: ConnectUrl = url.parse().expect("url");
    match view(&url, opts.seconds).await {
        Ok(r) => println!("{}", serde_json::to_string(&r.report).unwrap()),
        Err(e) => {
            eprintln!("view failed: {e}");
            std::process::exit(1);
        }
    }
}

fn sh(args: &[&str]) -> Result<(), String> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{} failed: {st}", args.join(" ")))
    }
}

fn teardown_netns() {
    for ns in [NS_SRV, NS_CLI] {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
}

fn setup_netns() -> Result<(), String> {
    teardown_netns();
    sh(&["ip", "netns", "add", NS_SRV])?;
    sh(&["ip", "netns", "add", NS_CLI])?;
    sh(&[
        "ip", "link", "add", "gbench0", "netns", NS_SRV, "type", "veth", "peer", "name",
        "gbench1", "netns", NS_CLI,
    ])?;
    for (ns, dev, ip) in [(NS_SRV, "gbench0", SRV_IP), (NS_CLI, "gbench1", CLI_IP)] {
        sh(&["ip", "-n", ns, "addr", "add", &format!("{ip}/30"), "dev", dev])?;
        sh(&["ip", "-n", ns, "link", "set", dev, "up"])?;
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
    }
    // 40 ms RTT: 20 ms each way; 5 % loss on the video direction.
    sh(&[
        "ip", "netns", "exec", NS_SRV, "tc", "qdisc", "add", "dev", "gbench0", "root", "netem",
        "delay", "20ms", "loss", "5%", "limit", "10000",
    ])?;
    sh(&[
        "ip", "netns", "exec", NS_CLI, "tc", "qdisc", "add", "dev", "gbench1", "root", "netem",
        "delay", "20ms", "limit", "10000",
    ])?;
    Ok(())
}

struct NetemResult {
    report: client::SessionReport,
    settle_ms: f64,
    final_kbps: f64,
}

/// Time after which the bitrate stays within ±15 % of its final value (median of the last
/// third), measured from the first sample.
fn settle_time(samples: &[(u64, u32)]) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let tail: Vec<u64> = samples[samples.len() * 2 / 3..]
        .iter()
        .map(|s| u64::from(s.1))
        .collect();
    let fin = percentile(&tail, 0.5) as f64;
    let t0 = samples[0].0;
    let mut settled_at = t0;
    for &(t, b) in samples {
        if (f64::from(b) - fin).abs() > 0.15 * fin {
            settled_at = t;
        }
    }
    ((settled_at - t0) as f64, fin / 1000.0)
}

fn netem(opts: &Opts) -> Result<NetemResult, String> {
    setup_netns()?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let exe = exe.to_str().ok_or("exe path")?;
    let common = [
        "--seconds".to_owned(),
        opts.seconds.to_string(),
        "--fps".to_owned(),
        opts.fps.to_string(),
        "--size".to_owned(),
        format!("{}x{}", opts.width, opts.height),
    ];
    let mut server = Command::new("ip")
        .args(["netns", "exec", NS_SRV, exe, "--serve", &format!("{SRV_IP}:4433")])
        .args(&common)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::new(server.stdout.take().ok_or("stdout")?).lines();
    let url = lines
        .next()
        .ok_or("server printed nothing")?
        .map_err(|e| e.to_string())?;
    let sampler = std::thread::spawn(move || {
        let mut v = Vec::new();
        for line in lines.map_while(Result::ok) {
            let mut it = line.split(' ');
            if let (Some(t), Some(b)) = (it.next(), it.next()) {
                if let (Ok(t), Ok(b)) = (t.parse::<u64>(), b.parse::<u32>()) {
                    v.push((t, b));
                }
            }
        }
        v
    });
    let out = Command::new("ip")
        .args(["netns", "exec", NS_CLI, exe, "--view", &url])
        .args(&common)
        .output()
        .map_err(|e| e.to_string())?;
    let _ = server.kill();
    let _ = server.wait();
    let samples = sampler.join().map_err(|_| "sampler panicked")?;
    teardown_netns();
    if !out.status.success() {
        return Err(format!(
            "client failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("client output: {e}"))?;
    let report = client::SessionReport {
        frames: v["frames"].as_u64().unwrap_or(0),
        keyframes: v["keyframes"].as_u64().unwrap_or(0),
        fps: v["fps"].as_f64().unwrap_or(0.0),
        bitrate_kbps: v["bitrate_kbps"].as_f64().unwrap_or(0.0),
        latency_ms_p50: v["latency_ms_p50"].as_f64().unwrap_or(0.0),
        latency_ms_p99: v["latency_ms_p99"].as_f64().unwrap_or(0.0),
        decode_ms_p50: v["decode_ms_p50"].as_f64().unwrap_or(0.0),
        decode_ms_p99: v["decode_ms_p99"].as_f64().unwrap_or(0.0),
        longest_gap_ms: v["longest_gap_ms"].as_f64().unwrap_or(0.0),
        frames_dropped: v["frames_dropped"].as_u64().unwrap_or(0),
        rtt_ms: v["rtt_ms"].as_f64().unwrap_or(0.0),
        clock_offset_ms: v["clock_offset_ms"].as_f64().unwrap_or(0.0),
    };
    let (settle_ms, final_kbps) = settle_time(&samples);
    Ok(NetemResult {
        report,
        settle_ms,
        final_kbps,
    })
}

async fn run_all(opts: &Opts) {
    eprintln!(
        "stream_bench: {}x{} @ {} fps, {} s per phase",
        opts.width, opts.height, opts.fps, opts.seconds
    );
    let (base_p50, base_p99) = baseline(opts);
    let (server, url) = start_server(opts, "127.0.0.1:0");
    let url: ConnectUrl = url.parse().expect("url");
    let lo = view(&url, opts.seconds).await.expect("loopback session");
    drop(server);
    let nm = if opts.skip_netem {
        None
    } else {
        tokio::task::block_in_place(|| Some(netem(opts)))
    };

    let r = &lo.report;
    println!();
    println!(
        "| phase | fps | kbit/s | g2g p50 ms | g2g p99 ms | decode p50 ms | longest stall ms | bitrate settle ms | vs baseline (p50) | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| baseline: in-process encode+decode | – | – | {base_p50:.1} | {base_p99:.1} | – | – | – | 1.00x | – |"
    );
    println!(
        "| loopback QUIC ({:.0} s) | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | – | {:.2}x | p50 ≤ 16, p99 ≤ 33 |",
        lo.duration.as_secs_f64(),
        r.fps,
        r.bitrate_kbps,
        r.latency_ms_p50,
        r.latency_ms_p99,
        r.decode_ms_p50,
        r.longest_gap_ms,
        r.latency_ms_p50 / base_p50.max(0.001),
    );
    match nm {
        None => println!("| netem 40 ms RTT, 5 % loss | skipped | | | | | | | | |"),
        Some(Err(e)) => println!("| netem 40 ms RTT, 5 % loss | failed: {e} | | | | | | | | |"),
        Some(Ok(n)) => {
            let r = &n.report;
            println!(
                "| netem 40 ms RTT, 5 % loss (settled at {:.0} kbit/s) | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2}x | stall ≤ 200, settle ≤ 1000 |",
                n.final_kbps,
                r.fps,
                r.bitrate_kbps,
                r.latency_ms_p50,
                r.latency_ms_p99,
                r.decode_ms_p50,
                r.longest_gap_ms,
                n.settle_ms,
                r.latency_ms_p50 / base_p50.max(0.001),
            );
        }
    }
}
