//! Boots the GenOS guest kernel (`GENOS_GUEST_KERNEL`) with the busybox initramfs
//! (`GENOS_GUEST_INITRAMFS`) and `--vsock 3:SOCKET`, and checks what the guest kernel does
//! with the device: its virtio-vsock driver probes it (DRIVER_OK), and a host program's
//! `CONNECT 4242` reaches the guest kernel, which answers the REQUEST (nothing listens on
//! port 4242, so with RST): the program is closed without `OK` and without waiting for the
//! device's 2 s timeout.
//!
//! Slow by nature (minutes here), like `boot_linux`; skipped with a message when the images
//! or `/dev/kvm` are missing (`scripts/test` sets both variables).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::boot::{describe_exit, terminate, BootWatch, Images, LogTail, BOOT_LIMIT};
use common::{spawn_vmm, try_http, wait_for_socket};

const TEST: &str = "the_guest_kernel_drives_virtio_vsock_and_answers_a_host_connect";
/// virtio-mmio device status bit set by the driver after a successful probe.
const DRIVER_OK: u64 = 4;

/// The vsock device's metrics, if the VMM answers.
fn vsock_metrics(api: &std::path::Path) -> Option<serde_json::Value> {
    let (200, body) = try_http(api, "GET", "/metrics", None)? else {
        return None;
    };
    let m: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(m["devices"]["vsock"].clone())
}

/// One host program: `CONNECT 4242`, then what the device does. `Some(true)` when it was
/// closed without `OK`, before the device's own timeout could have fired.
fn host_connect(sock: &std::path::Path) -> Option<bool> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream.write_all(b"CONNECT 4242\n").ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    Some(answer.is_empty() && started.elapsed() < Duration::from_secs(2))
}

#[test]
fn the_guest_kernel_drives_virtio_vsock_and_answers_a_host_connect() {
    let Some(Images {
        kernel,
        initramfs: Some(initramfs),
    }) = Images::from_env(TEST, true)
    else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot-linux-vsock");
    std::fs::create_dir_all(&dir).unwrap();
    let api = dir.join("api.sock");
    let vsock = dir.join("v.sock");
    let _ = std::fs::remove_file(&api);

    let mut child = spawn_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--vsock",
        &format!("3:{}", vsock.display()),
        "--cpu-template",
        "baseline",
        "--mem-mib",
        "256",
        "--api-sock",
        api.to_str().unwrap(),
        "--serial",
        "none",
    ]);
    let log = LogTail::new();
    let log_reader = log.follow(child.stderr.take().unwrap());
    let watch = BootWatch::new(TEST, log.clone());
    assert!(wait_for_socket(&api, Duration::from_secs(30)), "API socket");

    let mut driver_ok = false;
    let mut answered = false;
    let mut attempts = 0;
    let mut exited = None;
    while watch.elapsed() < BOOT_LIMIT && !answered {
        if let Some(status) = child.try_wait().unwrap() {
            watch.set_outcome(describe_exit(status));
            exited = Some(status);
            break;
        }
        let Some(m) = vsock_metrics(&api) else {
            std::thread::sleep(Duration::from_secs(2));
            continue;
        };
        driver_ok |= m["transport"]["status"].as_u64().unwrap_or(0) & DRIVER_OK != 0;
        if driver_ok {
            attempts += 1;
            let before = vsock_metrics(&api).unwrap_or_default();
            let closed_fast = host_connect(&vsock) == Some(true);
            let after = vsock_metrics(&api).unwrap_or_default();
            let count = |m: &serde_json::Value, k: &str| m["device"][k].as_u64().unwrap_or(0);
            // The guest sent a packet (its RST) and the device did not time the attempt out.
            answered = closed_fast
                && count(&after, "tx_packets") > count(&before, "tx_packets")
                && count(&after, "connect_timeouts") == count(&before, "connect_timeouts");
            eprintln!(
                "{TEST}: attempt {attempts} at {:.1} s: closed fast {closed_fast}, \
                 metrics {}",
                watch.elapsed().as_secs_f64(),
                after["device"]
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let elapsed = watch.elapsed();
    if exited.is_none() {
        terminate(&mut child);
    }
    let status = child.wait().unwrap();
    if exited.is_none() {
        watch.set_outcome(format!(
            "stopped by the test, then {}",
            describe_exit(status)
        ));
    }
    let _ = log_reader.join();

    assert!(
        driver_ok || log.contains("vsock: activated by the guest driver"),
        "the guest's virtio-vsock driver did not probe the device within {:.1} s",
        elapsed.as_secs_f64()
    );
    assert!(
        answered,
        "the guest kernel did not answer a host CONNECT ({attempts} attempts, {:.1} s)",
        elapsed.as_secs_f64()
    );
    eprintln!(
        "{TEST}: the guest answered a host CONNECT after {:.1} s",
        elapsed.as_secs_f64()
    );
}
