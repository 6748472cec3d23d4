//! The control API driving a real VM: configure, start, pause, resume, metrics, stop.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{build_guest, finish, http, kvm_available, spawn_vmm, wait_for_socket};

const TIMEOUT: Duration = Duration::from_secs(30);

fn socket_path(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-sockets");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&path);
    path
}

fn io_out_exits(sock: &std::path::Path) -> u64 {
    let (status, body) = http(sock, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["vcpu_exits"]["io_out"]
        .as_u64()
        .unwrap_or_else(|| panic!("{body}"))
}

#[test]
fn api_configures_starts_pauses_resumes_and_stops_a_guest() {
    if !kvm_available("api_configures_starts_pauses_resumes_and_stops_a_guest") {
        return;
    }
    let guest = build_guest("spin", &[]);
    let sock = socket_path("lifecycle");
    let started = Instant::now();
    let child = spawn_vmm(&["--api-sock", sock.to_str().unwrap()]);
    assert!(wait_for_socket(&sock, TIMEOUT));

    let (status, body) = http(&sock, "GET", "/vm", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"not-configured\""), "{body}");

    let config = format!(
        r#"{{"kernel": "{}", "mem_mib": 32, "serial": "none"}}"#,
        guest.display()
    );
    assert_eq!(http(&sock, "PUT", "/vm/config", Some(&config)).0, 204);
    let (status, body) = http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "start"}"#));
    assert_eq!(status, 204, "{body}");
    let (_, body) = http(&sock, "GET", "/vm", None);
    assert!(body.contains("\"running\""), "{body}");

    // Running: the guest keeps writing to the UART.
    let deadline = Instant::now() + TIMEOUT;
    while io_out_exits(&sock) < 100 {
        assert!(Instant::now() < deadline, "guest made no progress");
        std::thread::sleep(Duration::from_millis(10));
    }

    assert_eq!(
        http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "pause"}"#)).0,
        204
    );
    let paused_at = io_out_exits(&sock);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(io_out_exits(&sock), paused_at, "vCPUs ran while paused");
    let (_, body) = http(&sock, "GET", "/vm", None);
    assert!(body.contains("\"paused\""), "{body}");

    assert_eq!(
        http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "resume"}"#)).0,
        204
    );
    let deadline = Instant::now() + TIMEOUT;
    while io_out_exits(&sock) <= paused_at {
        assert!(Instant::now() < deadline, "guest did not resume");
        std::thread::sleep(Duration::from_millis(10));
    }

    let (status, body) = http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "stop"}"#));
    assert_eq!(status, 204, "{body}");
    let run = finish(child, started, TIMEOUT);
    assert_eq!(run.status, Some(0), "{run:?}");
    assert!(!sock.exists(), "API socket left behind");
}

#[test]
fn out_of_order_and_failing_actions_get_4xx_and_leave_the_vmm_serving() {
    if !kvm_available("out_of_order_and_failing_actions_get_4xx_and_leave_the_vmm_serving") {
        return;
    }
    let sock = socket_path("errors");
    let started = Instant::now();
    let child = spawn_vmm(&["--api-sock", sock.to_str().unwrap()]);
    assert!(wait_for_socket(&sock, TIMEOUT));

    let (status, body) = http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "pause"}"#));
    assert_eq!(status, 409, "{body}");

    // A kernel that exists but is not a kernel: the start fails with 400, the VMM stays up.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("api-bad-kernel");
    std::fs::create_dir_all(&dir).unwrap();
    let bogus = dir.join("bogus");
    std::fs::write(&bogus, b"not a kernel at all").unwrap();
    let config = format!(r#"{{"kernel": "{}", "mem_mib": 32}}"#, bogus.display());
    assert_eq!(http(&sock, "PUT", "/vm/config", Some(&config)).0, 204);
    let (status, body) = http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "start"}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot load kernel"), "{body}");
    let (_, body) = http(&sock, "GET", "/vm", None);
    assert!(body.contains("\"configured\""), "{body}");

    let (status, body) = http(&sock, "GET", "/metrics", None);
    assert_eq!(status, 200, "{body}");

    assert_eq!(
        http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "stop"}"#)).0,
        204
    );
    let run = finish(child, started, TIMEOUT);
    assert_eq!(run.status, Some(0), "{run:?}");
}

#[test]
fn metrics_count_exits_by_kind_and_device_counters() {
    if !kvm_available("metrics_count_exits_by_kind_and_device_counters") {
        return;
    }
    let guest = build_guest("spin", &[]);
    let sock = socket_path("metrics");
    let started = Instant::now();
    let child = spawn_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--rng",
        "--serial",
        "none",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    assert!(wait_for_socket(&sock, TIMEOUT));
    let deadline = Instant::now() + TIMEOUT;
    while io_out_exits(&sock) == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, body) = http(&sock, "GET", "/metrics", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for kind in [
        "io_in",
        "io_out",
        "mmio_read",
        "mmio_write",
        "shutdown",
        "internal_error",
        "hlt",
    ] {
        assert!(v["vcpu_exits"][kind].is_u64(), "{kind} missing: {body}");
    }
    assert!(v["devices"]["serial"].is_object(), "{body}");
    assert!(v["devices"]["rng"].is_object(), "{body}");
    assert!(v["devices"]["i8042"].is_object(), "{body}");
    assert_eq!(
        http(&sock, "PUT", "/vm/actions", Some(r#"{"action": "stop"}"#)).0,
        204
    );
    assert_eq!(finish(child, started, TIMEOUT).status, Some(0));
}
