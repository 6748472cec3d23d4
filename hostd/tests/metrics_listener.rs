//! genos-hostd's opt-in metrics listener (`[metrics] listen`): the admin socket's
//! `/metrics` text over plain HTTP on TCP, and a clear refusal of an address it cannot use.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_hostd(dir: &Path, config: &str) -> Child {
    let cfg = dir.join("hostd.toml");
    std::fs::write(&cfg, config).unwrap();
    Command::new(env!("CARGO_BIN_EXE_genos-hostd"))
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A loopback port nothing listens on (bound and released).
fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn get(addr: SocketAddr, request: &str) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn hostd_serves_the_admin_sockets_metrics_on_its_metrics_listener() {
    let dir = tempfile::tempdir().unwrap();
    let addr = free_port();
    let mut hostd = spawn_hostd(
        dir.path(),
        &format!(
            "[images]\nbuilder = \"/nonexistent/genos-image\"\n[stream]\nlisten = \"127.0.0.1:0\"\n\
             [metrics]\nlisten = \"{addr}\"\n"
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).is_err() {
        assert!(
            hostd.try_wait().unwrap().is_none(),
            "genos-hostd exited before listening"
        );
        assert!(Instant::now() < deadline, "no metrics listener on {addr}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let answer = get(addr, "GET /metrics HTTP/1.1\r\nHost: genos\r\n\r\n");
    let other = get(addr, "GET /v1/envs HTTP/1.1\r\n\r\n");
    let admin = Command::new(env!("CARGO_BIN_EXE_genos"))
        .env("GENOS_SOCKET", dir.path().join("state/admin.sock"))
        .arg("metrics")
        .output()
        .unwrap();
    hostd.kill().unwrap();
    let _ = hostd.wait();

    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(head.contains("\r\nContent-Type: text/plain; version=0.0.4\r\n"));
    assert!(admin.status.success(), "{admin:?}");
    assert_eq!(body, String::from_utf8(admin.stdout).unwrap());
    assert!(
        body.contains("# TYPE genos_environment_state gauge\n"),
        "{body}"
    );
    assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
}

#[test]
fn hostd_refuses_to_start_on_a_metrics_address_that_is_not_one() {
    let dir = tempfile::tempdir().unwrap();

    let hostd = spawn_hostd(dir.path(), "[metrics]\nlisten = \"localhost:9100\"\n");
    let out = hostd.wait_with_output().unwrap();

    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[metrics] listen must be \"\" (off) or an address like 127.0.0.1:9100"),
        "{err}"
    );
}
