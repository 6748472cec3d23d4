//! Key latency from the stream server's input sink to the VM's keyboard event queue:
//! `scripts/bench-input` (builds the release genos-vmm, then
//! `cargo bench -p genos-hostd --bench input`). Needs `/dev/kvm`.
//!
//! Two paths into the same genos-vmm (a tiny guest that idles; the events wait in the
//! keyboard's pending queue, which the VMM counts as `injected`), measured interleaved in one
//! run so the figures read as ratios on any machine:
//! - **raw channel**: hostd's [`VmInput`] (one `SOCK_SEQPACKET` message per batch, read by the
//!   VMM's event loop);
//! - **PUT /input** (the path before it, rebuilt here as the baseline): a bounded queue to a
//!   worker thread that sends one `PUT /input` per batch over a keep-alive API connection,
//!   which the VMM's API thread hands to its event loop.
//!
//! A sample is one key press (`EV_KEY` + `SYN_REPORT`) from the `inject` call until the
//! VMM's metrics count both events; the same observer (a `GET /metrics` loop on its own
//! connection) serves both paths. A burst of 60 presses and releases measures how long a
//! paste typed as keys takes to arrive. Five rounds, each on a fresh VMM.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostd::stream::source::InputSink;
use hostd::uds::VmmSocket;
use hostd::vm_source::{InputTranslator, SharedSize, VmInput};
use hostd::vmm_client::VmmClient;
use proto::stream::InputEvent;
use vmm_api::{InputBatch, Request};

const TIMEOUT: Duration = Duration::from_secs(10);
/// The idle guest never reads its keyboard, and the VMM keeps at most 1024 pending events
/// per device: each round gets a fresh VMM and stays below that (8 events per sample pair,
/// 8 per burst key pair).
const ROUNDS: usize = 5;
const SAMPLES_PER_ROUND: usize = 60;
const BURST_KEYS: usize = 60;

/// The path before the raw channel: translate, queue, one `PUT /input` per batch.
struct HttpInput {
    translator: std::sync::Mutex<InputTranslator>,
    tx: SyncSender<InputBatch>,
}

impl HttpInput {
    fn start(sock: &Path) -> Self {
        let (tx, rx) = mpsc::sync_channel::<InputBatch>(256);
        let mut api = VmmClient::connect(&VmmSocket::unjailed(sock), TIMEOUT).unwrap();
        std::thread::spawn(move || {
            for batch in rx {
                api.send(&Request::Input(batch)).expect("PUT /input");
            }
        });
        Self {
            translator: std::sync::Mutex::new(InputTranslator::new()),
            tx,
        }
    }

    fn inject(&self, events: &[InputEvent]) {
        let mut t = self.translator.lock().unwrap();
        for (device, events) in t.translate(events, (320, 240)) {
            self.tx.send(InputBatch { device, events }).unwrap();
        }
    }
}

/// Counts the keyboard's injected events through `GET /metrics`.
struct Observer(VmmClient);

impl Observer {
    fn injected(&mut self) -> u64 {
        let m = self.0.metrics().unwrap();
        m.devices["keyboard"]["device"]["injected"]
            .as_u64()
            .expect("keyboard.device.injected in the metrics")
    }

    /// Waits until the count reaches `want`; the time it took from `start`.
    fn wait(&mut self, want: u64, start: Instant) -> Duration {
        loop {
            let n = self.injected();
            if n >= want {
                return start.elapsed();
            }
            assert!(start.elapsed() < TIMEOUT, "{n} of {want} events arrived");
        }
    }
}

fn key(code: u16, pressed: bool) -> InputEvent {
    InputEvent::Key { code, pressed }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// One round on a fresh VMM: interleaved single-key samples, then one burst per path.
fn round(
    bin: &Path,
    kernel: &Path,
    raw_lat: &mut Vec<Duration>,
    http_lat: &mut Vec<Duration>,
    bursts: &mut [Vec<Duration>; 2],
) {
    let vmm = common::start_display_vmm(bin, kernel);
    let api = VmmSocket::unjailed(&vmm.sock);
    let raw = VmInput::start(&api, Arc::new(SharedSize::new(320, 240))).unwrap();
    let http = HttpInput::start(&vmm.sock);
    let mut observer = Observer(VmmClient::connect(&api, TIMEOUT).unwrap());
    let mut count = observer.injected();
    let inject = |path: usize, events: &[InputEvent]| {
        if path == 0 {
            raw.inject(events).unwrap();
        } else {
            http.inject(events);
        }
    };
    for i in 0..SAMPLES_PER_ROUND {
        // A press is measured, its release only waited for, so every sample starts with
        // the key up and the queue quiet. Alternate which path goes first.
        for path in [i % 2, 1 - i % 2] {
            let start = Instant::now();
            inject(path, &[key(30, true)]);
            let took = observer.wait(count + 2, start);
            inject(path, &[key(30, false)]);
            count += 4;
            observer.wait(count, Instant::now());
            if path == 0 {
                &mut *raw_lat
            } else {
                &mut *http_lat
            }
            .push(took);
        }
    }
    for (path, times) in bursts.iter_mut().enumerate() {
        let start = Instant::now();
        for _ in 0..BURST_KEYS {
            inject(path, &[key(30, true), key(30, false)]);
        }
        count += 4 * BURST_KEYS as u64;
        times.push(observer.wait(count, start));
    }
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn main() {
    let test = "bench input";
    if !common::kvm_available(test) {
        eprintln!("input bench needs /dev/kvm");
        std::process::exit(1);
    }
    let Some(bin) = common::vmm_bin(test) else {
        eprintln!("run scripts/bench-input (it builds the release genos-vmm first)");
        std::process::exit(1);
    };
    let kernel = common::build_guest("ready");
    let (mut raw_lat, mut http_lat) = (Vec::new(), Vec::new());
    let mut bursts: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        round(&bin, &kernel, &mut raw_lat, &mut http_lat, &mut bursts);
    }
    raw_lat.sort();
    http_lat.sort();
    let samples = raw_lat.len();
    println!("key press: inject → VM keyboard queue ({samples} samples each, interleaved)");
    println!(
        "| path | p50 ms | p90 ms | p99 ms | {BURST_KEYS} keys burst ms (median of {ROUNDS}) |"
    );
    println!("|---|---|---|---|---|");
    for (name, lat, b) in [
        (
            "raw channel (GET /input/socket)",
            &raw_lat,
            median(&mut bursts[0]),
        ),
        (
            "PUT /input per batch (before)",
            &http_lat,
            median(&mut bursts[1]),
        ),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            ms(percentile(lat, 0.5)),
            ms(percentile(lat, 0.9)),
            ms(percentile(lat, 0.99)),
            ms(b)
        );
    }
    let ratio = |p| percentile(&raw_lat, p).as_secs_f64() / percentile(&http_lat, p).as_secs_f64();
    println!(
        "raw / before: p50 {:.2}x, p99 {:.2}x, burst {:.2}x",
        ratio(0.5),
        ratio(0.99),
        median(&mut bursts[0]).as_secs_f64() / median(&mut bursts[1]).as_secs_f64()
    );
}
