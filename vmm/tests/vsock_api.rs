//! virtio-vsock through the real genos-vmm binary: `PUT /vsock` before start (and its
//! refusals), and, with a tiny guest running under the default seccomp and Landlock
//! sandbox, a host program's `CONNECT` on the device's socket accepted, its line read and
//! the attempt ended by the device's timer (the tiny guest has no vsock driver).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{build_guest, finish, http, kvm_available, spawn_vmm, wait_for_socket};

const TIMEOUT: Duration = Duration::from_secs(30);

fn test_dir(name: &str) -> PathBuf {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("vsock-api")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn put_vsock_sets_the_device_and_refuses_bad_cids_and_paths() {
    let dir = test_dir("put");
    let api = dir.join("api.sock");
    let kernel = dir.join("kernel");
    std::fs::write(&kernel, b"not started").unwrap();
    let child = spawn_vmm(&["--api-sock", api.to_str().unwrap()]);
    assert!(wait_for_socket(&api, TIMEOUT));
    let vsock = dir.join("v.sock");

    let before_config = http(
        &api,
        "PUT",
        "/vsock",
        Some(&format!(
            r#"{{"guest_cid": 3, "uds_path": "{}"}}"#,
            vsock.display()
        )),
    );
    let config = format!(r#"{{"kernel": "{}"}}"#, kernel.display());
    assert_eq!(http(&api, "PUT", "/vm/config", Some(&config)).0, 204);
    let put = http(
        &api,
        "PUT",
        "/vsock",
        Some(&format!(
            r#"{{"guest_cid": 7, "uds_path": "{}"}}"#,
            vsock.display()
        )),
    );
    let host_cid = http(
        &api,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#),
    );
    let no_dir = http(
        &api,
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 3, "uds_path": "/nonexistent-genos/v.sock"}"#),
    );
    let (_, described) = http(&api, "GET", "/vm", None);
    let _ = http(&api, "PUT", "/vm/actions", Some(r#"{"action": "stop"}"#));
    let run = finish(child, Instant::now(), TIMEOUT);

    assert_eq!(before_config.0, 409, "{}", before_config.1);
    assert_eq!(put.0, 204, "{}", put.1);
    assert_eq!(host_cid.0, 400);
    assert!(
        host_cid
            .1
            .contains("vsock guest_cid must be between 3 and 4294967294, got 2"),
        "{}",
        host_cid.1
    );
    assert_eq!(no_dir.0, 400);
    assert!(
        no_dir.1.contains("directory does not exist"),
        "{}",
        no_dir.1
    );
    let vm: serde_json::Value = serde_json::from_str(&described).unwrap();
    assert_eq!(vm["config"]["vsock"]["guest_cid"], 7, "{described}");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

#[test]
fn a_sandboxed_vmm_accepts_a_host_connect_and_times_it_out_without_a_guest_driver() {
    let test = "a_sandboxed_vmm_accepts_a_host_connect_and_times_it_out_without_a_guest_driver";
    if !kvm_available(test) {
        return;
    }
    let guest = build_guest("spin", &[]);
    let dir = test_dir("sandboxed");
    let api = dir.join("api.sock");
    let vsock = dir.join("v.sock");
    let child = spawn_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--serial",
        "none",
        "--api-sock",
        api.to_str().unwrap(),
        "--vsock",
        &format!("3:{}", vsock.display()),
    ]);
    assert!(wait_for_socket(&api, TIMEOUT), "API socket");
    let deadline = Instant::now() + TIMEOUT;
    while !http(&api, "GET", "/vm", None).1.contains("\"running\"") {
        assert!(Instant::now() < deadline, "the VM did not start");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut host = UnixStream::connect(&vsock).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    host.set_read_timeout(Some(TIMEOUT)).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let read = host.read_to_end(&mut answer);
    let waited = started.elapsed();
    let (_, metrics) = http(&api, "GET", "/metrics", None);
    let (_, described) = http(&api, "GET", "/vm", None);
    let _ = http(&api, "PUT", "/vm/actions", Some(r#"{"action": "stop"}"#));
    let run = finish(child, Instant::now(), TIMEOUT);

    assert!(read.is_ok(), "{read:?}");
    assert!(answer.is_empty(), "no OK without a guest: {answer:?}");
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10),
        "closed after {waited:?}, not by the 2 s RESPONSE timeout"
    );
    let m: serde_json::Value = serde_json::from_str(&metrics).unwrap();
    assert_eq!(
        m["devices"]["vsock"]["device"]["connect_timeouts"], 1,
        "{metrics}"
    );
    assert!(
        described.contains(r#""seccomp":"kill""#),
        "the filters were on: {described}"
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}
