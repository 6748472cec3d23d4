//! Control API round-trip latency, against a plain Unix-socket echo measured in the same run.
//!
//! `cargo run --release -p genos-vmm --example api_latency [ROUNDS]`
//!
//! A request goes client → API thread (parse, route) → channel + eventfd → main thread
//! (`drain_into`) → back → response bytes. The controller here answers at once, so the
//! figures are the API's own cost; the baseline is a 200-byte echo over a socketpair
//! between two threads (the floor for any request/response over a Unix socket).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmm::rpc::{self, ActionError, VmDescription, VmState, VmmAction, VmmController, VmmResponse};

struct AnswerAtOnce;

impl VmmController for AnswerAtOnce {
    fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, ActionError> {
        Ok(match action {
            VmmAction::Describe => VmmResponse::Description(VmDescription {
                state: VmState::Running,
                config: None,
                boot_time_us: None,
                uptime_us: 0,
                sandbox: None,
            }),
            _ => VmmResponse::Empty,
        })
    }
}

fn read_response(stream: &mut UnixStream, buf: &mut Vec<u8>) {
    buf.clear();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "server closed");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..head_end]).unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map_or(0, |v| v.parse().unwrap());
            if buf.len() >= head_end + 4 + len {
                return;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

fn measure(rounds: usize, mut once: impl FnMut()) -> Vec<Duration> {
    for _ in 0..rounds / 10 {
        once();
    }
    let mut times: Vec<Duration> = (0..rounds)
        .map(|_| {
            let start = Instant::now();
            once();
            start.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .map_or(5000, |a| a.parse().expect("ROUNDS must be a number"));

    // Baseline: echo over a socketpair.
    let (mut client, mut server) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 200];
        while server.read_exact(&mut buf).is_ok() {
            if server.write_all(&buf).is_err() {
                return;
            }
        }
    });
    let msg = [7u8; 200];
    let mut back = [0u8; 200];
    let echo = measure(rounds, || {
        client.write_all(&msg).unwrap();
        client.read_exact(&mut back).unwrap();
    });

    // The API server with a controller that answers at once.
    let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (sender, receiver) = rpc::channel().unwrap();
    vmm::api::server::start(&sock, sender).unwrap();
    std::thread::spawn(move || {
        let mut controller = AnswerAtOnce;
        loop {
            let mut pfd = libc::pollfd {
                fd: receiver.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that lives across the call.
            unsafe { libc::poll(&mut pfd, 1, -1) };
            receiver.drain_into(&mut controller);
        }
    });
    let mut api = UnixStream::connect(&sock).unwrap();
    let mut buf = Vec::new();

    let body = r#"{"device":"tablet","events":[{"type":3,"code":0,"value":16384},{"type":3,"code":1,"value":9000},{"type":1,"code":272,"value":1},{"type":0,"code":0,"value":0}]}"#;
    let input = format!(
        "PUT /input HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let input_times = measure(rounds, || {
        api.write_all(input.as_bytes()).unwrap();
        read_response(&mut api, &mut buf);
    });
    let describe = b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let describe_times = measure(rounds, || {
        api.write_all(describe).unwrap();
        read_response(&mut api, &mut buf);
    });

    let base = percentile(&echo, 0.5).as_secs_f64();
    println!("{rounds} rounds each");
    println!(
        "{:<34} {:>10} {:>10} {:>14}",
        "operation", "median µs", "p99 µs", "median / echo"
    );
    for (name, times) in [
        ("socketpair echo, 200 B (baseline)", &echo),
        ("PUT /input, 4 events", &input_times),
        ("GET /vm", &describe_times),
    ] {
        let median = percentile(times, 0.5);
        println!(
            "{:<34} {:>10.1} {:>10.1} {:>14.1}",
            name,
            median.as_secs_f64() * 1e6,
            percentile(times, 0.99).as_secs_f64() * 1e6,
            median.as_secs_f64() / base
        );
    }
}
