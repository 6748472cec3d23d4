//! The admin socket of a running `genos-hostd` under abuse: a flood of idle connections is
//! not kept (the oldest idle ones are closed for newcomers, the rest after the header
//! timeout) and a real request is still answered; oversized requests are refused and long
//! request texts are audited in brief.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use daemon::Hostd;
use hostd::admin::{HEADER_TIMEOUT, MAX_CONNECTIONS, MAX_REQUEST_BODY};
use hostd::orchestrator::AUDIT_TEXT_MAX;

/// genos-hostd whose environments would fail at their build (no VM is needed here).
fn start_hostd() -> Hostd {
    Hostd::start(
        "[images]\nbuilder = \"/nonexistent/genos-image\"\n[stream]\nlisten = \"127.0.0.1:0\"\n",
    )
}

fn open_fds(h: &Hostd) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", h.child.id()))
        .unwrap()
        .count()
}

/// One request on its own connection: (status, body).
fn raw(h: &Hostd, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(h.socket()).unwrap();
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

#[test]
fn idle_connections_are_not_kept_and_a_real_request_is_still_answered() {
    let h = start_hostd();
    let baseline = open_fds(&h);
    let flood = 4 * MAX_CONNECTIONS;
    let idle: Vec<UnixStream> = (0..flood)
        .map(|_| UnixStream::connect(h.socket()).unwrap())
        .collect();

    let o = h.genos(&["health"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let held = open_fds(&h).saturating_sub(baseline);
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
    let h = start_hostd();
    let big = serde_json::json!({ "text": "x".repeat(MAX_REQUEST_BODY + 1) }).to_string();
    let (status, body) = raw(&h, "POST", "/v1/compose", big.as_bytes());
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("request body larger than"), "{body}");

    let text = "gimp with 8 gigs ".repeat(MAX_REQUEST_BODY / 20);
    let req = serde_json::json!({ "text": text }).to_string();
    assert!(req.len() <= MAX_REQUEST_BODY);
    let (status, body) = raw(&h, "POST", "/v1/compose", req.as_bytes());
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
