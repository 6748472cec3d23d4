//! Benchmark: what the jail costs at start-up.
//!
//! Measures, in one run and alternating so both see the same machine load: process
//! start to the VMM's API socket answering, for `genos-vmm` started directly and through
//! `genos-jailer`, plus spawning `/bin/true` as a baseline. Prints one table.
//!
//! Usage: `genos-jail-bench [--runs N] [--vmm PATH] [--jailer PATH]` (as root; defaults
//! are the binaries beside this one: build them with `cargo build --release`).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Polls the API socket until `GET /vm` answers, returning the time since `start`.
fn wait_ready(sock: &Path, start: Instant) -> Duration {
    let deadline = start + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = UnixStream::connect(sock) {
            let _ = s.write_all(b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n");
            let mut buf = [0u8; 12];
            if s.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
                return start.elapsed();
            }
        }
        assert!(
            Instant::now() < deadline,
            "API at {} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn stop(mut child: Child) {
    // SAFETY: signalling a child this process spawned and still owns.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn p90(v: &mut [Duration]) -> Duration {
    v.sort();
    v[(v.len() * 9 / 10).min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = arg(&args, "--runs")
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let here = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let vmm = arg(&args, "--vmm")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("genos-vmm"));
    let jailer = arg(&args, "--jailer")
        .map(PathBuf::from)
        .unwrap_or_else(|| here.join("genos-jailer"));
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("genos-jail-bench: run as root (the jailer needs it)");
        std::process::exit(2);
    }
    let dir = std::env::temp_dir().join(format!("genos-jail-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let (mut base, mut plain, mut jailed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let start = Instant::now();
        Command::new("/bin/true").status().unwrap();
        base.push(start.elapsed());

        let sock = dir.join(format!("plain-{i}.sock"));
        let start = Instant::now();
        let child = Command::new(&vmm)
            .arg("--api-sock")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        plain.push(wait_ready(&sock, start));
        stop(child);

        let sock = dir.join(format!("jailed-{i}.sock"));
        let start = Instant::now();
        let child = Command::new(&jailer)
            .args([
                "--id",
                &format!("bench{i}"),
                "--uid",
                "65534",
                "--gid",
                "65534",
                "--chroot-base",
            ])
            .arg(&dir)
            .arg("--exec-file")
            .arg(&vmm)
            .args(["--cgroup", "pids.max=64", "--"])
            .arg("--api-sock")
            .arg(&sock)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        jailed.push(wait_ready(&sock, start));
        stop(child);
    }
    let _ = std::fs::remove_dir_all(&dir);

    let (bm, pm, jm) = (median(&mut base), median(&mut plain), median(&mut jailed));
    println!("start-up to API ready, {runs} runs each, interleaved");
    println!("| case                   | median ms | p90 ms | x /bin/true |");
    println!("|------------------------|-----------|--------|-------------|");
    for (name, m, v) in [
        ("spawn /bin/true", bm, &mut base),
        ("genos-vmm", pm, &mut plain),
        ("genos-jailer+genos-vmm", jm, &mut jailed),
    ] {
        println!(
            "| {name:<22} | {:>9.2} | {:>6.2} | {:>11.1} |",
            ms(m),
            ms(p90(v)),
            m.as_secs_f64() / bm.as_secs_f64()
        );
    }
    println!(
        "jail overhead (median difference): {:.2} ms (target <= 10 ms)",
        ms(jm.saturating_sub(pm))
    );
}
