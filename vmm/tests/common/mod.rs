//! Helpers shared by the integration tests: building tiny guests with the C toolchain,
//! running `genos-vmm` with a deadline, skipping when `/dev/kvm` is missing.

#![allow(dead_code)]

pub mod boot;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use testkit::kvm_available;

/// Assembles and links `tests/guests/<name>.S` with `defines` (`-D` values) into a
/// freestanding ELF at 1 MiB; returns its path (under the target's test temp dir).
pub fn build_guest(name: &str, defines: &[&str]) -> PathBuf {
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tiny-guests");
    std::fs::create_dir_all(&out_dir).expect("create guest output dir");
    let suffix: String = defines.iter().map(|d| format!("-{d}")).collect();
    let out = out_dir.join(format!("{name}{suffix}.elf"));
    let mut cmd = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
    cmd.args([
        "-nostdlib",
        "-static",
        "-no-pie",
        "-ffreestanding",
        "-Wl,--build-id=none",
    ])
    .arg(format!("-Wl,-T,{}", src_dir.join("guest.ld").display()))
    .arg(format!("-I{}", src_dir.display()))
    .args(defines.iter().map(|d| format!("-D{d}")))
    .arg("-o")
    .arg(&out)
    .arg(src_dir.join(format!("{name}.S")));
    let output = cmd.output().expect("run the C compiler (cc)");
    assert!(
        output.status.success(),
        "building guest {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// What a finished VMM run left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit status (None when killed at the deadline).
    pub status: Option<i32>,
    /// Guest console (the VMM's stdout with `--serial stdout`).
    pub stdout: String,
    /// The VMM's log.
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

/// The `genos-vmm` binary built for these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_genos-vmm")
}

/// Spawns `genos-vmm args...` with piped output.
pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn genos-vmm")
}

/// Waits for `child` until `deadline`, killing it then; collects its output.
pub fn finish(mut child: Child, started: Instant, timeout: Duration) -> Run {
    // Either pipe may already have been taken by the caller.
    let out_reader = read_all(child.stdout.take());
    let err_reader = read_all(child.stderr.take());
    let deadline = started + timeout;
    let status: Option<ExitStatus> = loop {
        if let Some(status) = child.try_wait().expect("wait for genos-vmm") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = started.elapsed();
    Run {
        status: status.and_then(|s| s.code()),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed,
    }
}

fn read_all<R: Read + Send + 'static>(pipe: Option<R>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut s);
        }
        s
    })
}

/// Runs `genos-vmm args...` to completion (killed after `timeout`).
pub fn run_vmm(args: &[&str], timeout: Duration) -> Run {
    let started = Instant::now();
    let child = spawn_vmm(args);
    finish(child, started, timeout)
}

/// Waits until something accepts connections on `path` (or `timeout` passes).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    false
}

/// One HTTP/1.1 request over the Unix socket at `path`; returns (status, body).
pub fn http(path: &Path, method: &str, uri: &str, body: Option<&str>) -> (u16, String) {
    try_http(path, method, uri, body).expect("connect to API")
}

/// [`http`], or `None` when nothing listens on `path` (e.g. the VMM has exited).
pub fn try_http(path: &Path, method: &str, uri: &str, body: Option<&str>) -> Option<(u16, String)> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(path).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {uri} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}
