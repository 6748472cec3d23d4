//! Streaming benchmark: glass-to-glass latency on loopback and behaviour under netem.
//!
//! `cargo run --release -p genos-client --example stream_bench` prints one table:
//! 1. baseline: the same frames encoded and decoded in-process (no network, no server), the
//!    floor the streamed latency is compared with;
//! 2. loopback: synthetic source → hostd stream server → QUIC → client decode, 1080p60;
//! 3. impaired link: the same through a UDP relay on loopback that delays every datagram
//!    20 ms each way (40 ms RTT) and drops 5 % in each direction — what `tc netem` would do,
//!    but this machine's kernel has no `sch_netem` ("Specified qdisc kind is unknown"):
//!    longest stall between decoded frames and time for the server's bitrate to settle.
//!
//! Flags: `--seconds N` (per phase, default 6), `--size WxH` (default 1920x1080), `--fps N`
//! (default 60), `--impaired-runs N` (phase 3 repeated with fresh sessions, one row each,
//! default 3: random loss makes single runs differ), `--skip-netem` (skip phase 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::stats::percentile;
use client::{ConnectOptions, ConnectUrl, Event, Session, StatsCollector};
use encoder::{Decoder, Encoder, EncoderConfig};
use hostd::stream::abr::BitrateLimits;
use hostd::stream::{source, Identity, ServerConfig, StreamServer, TokenKey};
use proto::stream::Rights;
use scenes::{Scene, SyntheticSource};

const ENV: &str = "bench";

#[derive(Debug, Clone)]
struct Opts {
    seconds: u64,
    width: u32,
    height: u32,
    fps: f32,
    impaired_runs: usize,
    skip_netem: bool,
}

fn parse_args() -> Opts {
    let mut o = Opts {
        seconds: 6,
        width: 1920,
        height: 1080,
        fps: 60.0,
        impaired_runs: 3,
        skip_netem: false,
    };
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
            "--impaired-runs" => o.impaired_runs = val().parse().expect("--impaired-runs N"),
            "--skip-netem" => o.skip_netem = true,
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

fn main() {
    let opts = parse_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run_all(&opts));
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
    /// When the measured window ended (before the session was closed).
    ended: Instant,
}

async fn view(url: &ConnectUrl, seconds: u64) -> Result<ViewResult, String> {
    let mut s = Session::connect(url, ConnectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    // Warm-up: the first keyframe and a few frames.
    s.skip_frames(10).await?;
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
    let ended = Instant::now();
    let c = s.counters().clone();
    let report = stats.report(
        c.frames_dropped.load(std::sync::atomic::Ordering::Relaxed),
        s.connection_stats().path.rtt,
        c.clock_offset_us.load(std::sync::atomic::Ordering::Relaxed),
    );
    s.close().await;
    Ok(ViewResult {
        report,
        duration: ended - t0,
        ended,
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
    let env = hostd::stream::EnvRef::new(ENV, 1);
    server.add_environment(&env, src, opts.fps).expect("env");
    let token = tokens
        .issue(&env, Rights::VIEW, Duration::from_secs(600))
        .expect("token");
    let url = server.connect_url(ENV, &token).expect("url");
    (server, url)
}

/// A UDP relay between client and server that delays every datagram by `delay` in each
/// direction and drops a fraction `loss` of them (both directions), like `tc netem delay 20ms
/// loss 5%` on both ends of a link. Used because this kernel has no `sch_netem`.
async fn impairment_relay(
    server: std::net::SocketAddr,
    delay: Duration,
    loss: f64,
) -> std::net::SocketAddr {
    use tokio::net::UdpSocket;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay front"));
    let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.expect("relay back"));
    back.connect(server).await.expect("relay connect");
    let addr = front.local_addr().expect("relay addr");
    let client = Arc::new(std::sync::Mutex::new(None::<std::net::SocketAddr>));
    // Deterministic xorshift so runs are comparable.
    fn dropper(seed: u64, loss: f64) -> impl FnMut() -> bool {
        let mut x = seed;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 10_000) as f64 / 10_000.0 < loss
        }
    }
    // Upstream: client -> server.
    {
        let (front, back, client) = (front.clone(), back.clone(), client.clone());
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        tokio::spawn(async move {
            let mut drop_it = dropper(0x1234_5678, loss);
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                if !drop_it() {
                    let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
            }
        });
        tokio::spawn(async move {
            while let Some((due, pkt)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                let _ = back.send(&pkt).await;
            }
        });
    }
    // Downstream: server -> client.
    {
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let back2 = back.clone();
        tokio::spawn(async move {
            let mut drop_it = dropper(0x9abc_def0, loss);
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = back2.recv(&mut buf).await {
                if !drop_it() {
                    let _ = tx.send((tokio::time::Instant::now() + delay, buf[..n].to_vec()));
                }
            }
        });
        let front2 = front.clone();
        tokio::spawn(async move {
            while let Some((due, pkt)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                let to = *client.lock().unwrap();
                if let Some(to) = to {
                    let _ = front2.send_to(&pkt, to).await;
                }
            }
        });
    }
    addr
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

async fn impaired(opts: &Opts) -> Result<NetemResult, String> {
    let (server, url) = start_server(opts, "127.0.0.1:0");
    let server = Arc::new(server);
    let server_addr = server.local_addr().map_err(|e| e.to_string())?;
    let relay = impairment_relay(server_addr, Duration::from_millis(20), 0.05).await;
    let mut url: ConnectUrl = url.parse().map_err(|e| format!("{e}"))?;
    url.port = relay.port();
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (server, sampling) = (server.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut v = Vec::new();
            let t0 = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                if let Some(st) = server.env_stats(ENV) {
                    if st.viewers > 0 {
                        v.push((
                            Instant::now(),
                            t0.elapsed().as_millis() as u64,
                            st.bitrate_bps,
                        ));
                    }
                }
            }
            v
        })
    };
    let r = view(&url, opts.seconds).await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await.map_err(|e| e.to_string())?;
    let r = r?;
    // Only the measured window: closing the session is not part of the link's behaviour.
    let samples: Vec<(u64, u32)> = samples
        .into_iter()
        .filter(|&(at, _, _)| at <= r.ended)
        .map(|(_, t, b)| (t, b))
        .collect();
    let (settle_ms, final_kbps) = settle_time(&samples);
    Ok(NetemResult {
        report: r.report,
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
    let mut impaired_results = Vec::new();
    if !opts.skip_netem {
        for _ in 0..opts.impaired_runs {
            impaired_results.push(impaired(opts).await);
        }
    }

    println!();
    println!(
        "| phase | fps | kbit/s | g2g p50 ms | g2g p99 ms | decode p50 ms | longest stall ms | bitrate settle ms | vs baseline (p50) | target |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| baseline: in-process encode+decode | – | – | {base_p50:.1} | {base_p99:.1} | – | – | – | 1.00x | – |"
    );
    let phase = format!("loopback QUIC ({:.0} s)", lo.duration.as_secs_f64());
    print_row(&phase, &lo.report, None, base_p50, "p50 ≤ 16, p99 ≤ 33");
    if impaired_results.is_empty() {
        println!("| impaired: 40 ms RTT, 5 % loss | skipped | | | | | | | | |");
    }
    for (i, result) in impaired_results.iter().enumerate() {
        let run = i + 1;
        match result {
            Err(e) => {
                println!("| impaired #{run}: 40 ms RTT, 5 % loss | failed: {e} | | | | | | | | |")
            }
            Ok(n) => {
                let phase = format!(
                    "impaired #{run}: 40 ms RTT, 5 % loss (settled at {:.0} kbit/s)",
                    n.final_kbps
                );
                let target = "stall ≤ 200, settle ≤ 1000";
                print_row(&phase, &n.report, Some(n.settle_ms), base_p50, target);
            }
        }
    }
}

/// One table row for a streamed phase.
fn print_row(
    phase: &str,
    r: &client::SessionReport,
    settle_ms: Option<f64>,
    base_p50: f64,
    target: &str,
) {
    let settle = settle_ms.map_or("–".to_string(), |ms| format!("{ms:.0}"));
    println!(
        "| {phase} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {settle} | {:.2}x | {target} |",
        r.fps,
        r.bitrate_kbps,
        r.latency_ms_p50,
        r.latency_ms_p99,
        r.decode_ms_p50,
        r.longest_gap_ms,
        r.latency_ms_p50 / base_p50.max(0.001),
    );
}
