//! The admin socket of a running `genos-hostd` under abuse: a flood of idle connections is
//! not kept (the oldest idle ones are closed for newcomers, the rest after the header
//! timeout) and a real request is still answered; oversized requests are refused and long
//! request texts are audited in brief.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hostd::admin::{HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST_BODY};
use hostd::orchestrator::AUDIT_TEXT_MAX;

struct Hostd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Hostd {
    /// genos-hostd whose environments would fail at their build (no VM is needed here).
    fn start() -> Hostd {
        let dir = tempfile::tempdir().unwrap();
        let cfg = "[images]\nbuilder = \"/nonexistent/genos-image\"\n[stream]\nlisten = \"127.0.0.1:0\"\n";
        let cfg_path = dir.path().join("hostd.toml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_genos-hostd"))
            .arg("--config")
            .arg(&cfg_path)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let h = Hostd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(h.socket()).is_err() {
            assert!(Instant::now() < deadline, "admin.sock did not answer");
            std::thread::sleep(Duration::from_millis(20));
        }
        h
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("state/admin.sock")
    }

    fn genos(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_genos"))
            .env("GENOS_SOCKET", self.socket())
            .args(args)
            .output()
            .unwrap()
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// One request on its own connection: (status, body).
    fn raw(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        // hostd may answer and close before taking all of an oversized body.
        let _ = s
            .write_all(head.as_bytes())
            .and_then(|()| s.write_all(body));
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP response: {text:?}"));
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (status, body.to_string())
    }
}

impl Drop for Hostd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the hostd we spawned; no memory is involved.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn idle_connections_are_not_kept_and_a_real_request_is_still_answered() {
    let h = Hostd::start();
    let baseline = h.open_fds();
    let flood = 4 * MAX_CONNECTIONS;
    let idle: Vec<UnixStream> = (0..flood)
        .map(|_| UnixStream::connect(h.socket()).unwrap())
        .collect();

    let o = h.genos(&["health"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let held = h.open_fds().saturating_sub(baseline);
    assert!(
        held <= MAX_CONNECTIONS + 8,
        "hostd holds {held} more descriptors with {flood} idle connections open"
    );

    // Every idle connection is closed by hostd: for a newcomer, or at the header timeout.
    let deadline = Instant::now() + HEADER_TIMEOUT * 3;
    for (i, mut s) in idle.into_iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        s.set_read_timeout(Some(left.max(Duration::from_millis(10))))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            r => panic!("idle connection {i} still open after the header timeout: {r:?}"),
        }
    }
}

#[test]
fn oversized_requests_are_refused_and_long_texts_are_audited_in_brief() {
    let h = Hostd::start();
    let big = serde_json::json!({ "text": "x".repeat(MAX_REQUEST_BODY + 1) }).to_string();
    let (status, body) = h.raw("POST", "/v1/compose", big.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request body larger than"), "{body}");

    let text = "gimp with 8 gigs ".repeat(MAX_REQUEST_BODY / 20);
    let req = serde_json::json!({ "text": text }).to_string();
    assert!(req.len() <= MAX_REQUEST_BODY);
    let (status, body) = h.raw("POST", "/v1/compose", req.as_bytes());
    assert_eq!(status, 200, "{body}");

    let o = h.genos(&["--json", "audit", "list", "--limit", "1"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let entry = &v["entries"][0];
    assert_eq!(entry["action"], "compose", "{v}");
    let detail = entry["detail"].as_str().unwrap();
    assert!(
        detail.len() < AUDIT_TEXT_MAX + 200,
        "{} bytes of request text audited",
        detail.len()
    );
    assert!(detail.starts_with("gimp with 8 gigs"), "{detail}");
    assert!(
        detail.contains(&format!("({} bytes, sha256 ", text.len())),
        "{detail}"
    );
    assert!(h.genos(&["audit", "verify"]).status.success());
}
