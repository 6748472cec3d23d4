//! Boots the GenOS guest kernel (`GENOS_GUEST_KERNEL`, a vmlinux) with the busybox
//! initramfs (`GENOS_GUEST_INITRAMFS`), a virtio-blk disk and virtio-rng under the
//! `baseline` CPU template, and checks what the kernel itself does: it reaches
//! `Run /init`, virtio-blk probes `vda`, virtio-rng is driven (DRIVER_OK, entropy read).
//!
//! Slow by nature (minutes here: the nested KVM emulates most guest code). Skipped
//! with a message when the images or `/dev/kvm` are missing; `scripts/test` sets both
//! variables (`cargo run -q -p genos-image -- kernel|initramfs`). On failure it prints how
//! the VMM ended and its last log lines (`common::boot`).

mod common;

use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::boot::{describe_exit, terminate, BootWatch, Images, LogTail, BOOT_LIMIT};
use common::{spawn_vmm, try_http, wait_for_socket};

const TEST: &str = "linux_boots_to_init_with_virtio_blk_and_rng";
/// virtio-mmio device status bit set by the driver after a successful probe.
const DRIVER_OK: u64 = 4;

#[test]
fn linux_boots_to_init_with_virtio_blk_and_rng() {
    let Some(Images {
        kernel,
        initramfs: Some(initramfs),
    }) = Images::from_env(TEST, true)
    else {
        return;
    };
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("boot-linux");
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(4 << 20))
        .unwrap();
    let sock = dir.join("api.sock");
    let _ = std::fs::remove_file(&sock);

    let mut child = spawn_vmm(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initramfs.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
        "--rng",
        "--cpu-template",
        "baseline",
        "--mem-mib",
        "256",
        "--vcpus",
        "1",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let log = LogTail::new();
    let log_reader = log.follow(child.stderr.take().unwrap());
    let watch = BootWatch::new(TEST, log.clone());
    let console = Arc::new(Mutex::new(String::new()));
    let mut stdout = child.stdout.take().unwrap();
    let reader = {
        let console = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                eprint!("{text}");
                console.lock().unwrap().push_str(&text);
            }
        })
    };
    assert!(
        wait_for_socket(&sock, Duration::from_secs(30)),
        "API socket"
    );

    // Whether any metrics snapshot showed the device's driver ready (DRIVER_OK).
    let mut rng_ready = false;
    let mut blk_ready = false;
    let mut note = |body: &str| {
        let Ok(m) = serde_json::from_str::<serde_json::Value>(body) else {
            return;
        };
        let ready = |dev: &str| {
            m["devices"][dev]["transport"]["status"]
                .as_u64()
                .unwrap_or(0)
                & DRIVER_OK
                != 0
        };
        rng_ready |= ready("rng");
        blk_ready |= ready("block0");
    };
    let mut exited = None;
    while watch.elapsed() < BOOT_LIMIT {
        if console.lock().unwrap().contains("Run /init") {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            watch.set_outcome(describe_exit(status));
            exited = Some(status);
            break;
        }
        // Keep the latest counters: the guest may panic (and the VMM exit) right after
        // init starts, since user space cannot run on this nested KVM.
        if let Some((200, body)) = try_http(&sock, "GET", "/metrics", None) {
            note(&body);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if let Some((200, body)) = try_http(&sock, "GET", "/metrics", None) {
        note(&body);
    }
    let boot_time = watch.elapsed();
    let stopped_at = if exited.is_some() {
        None
    } else if boot_time >= BOOT_LIMIT {
        Some("at the time limit")
    } else {
        Some("after the kernel reached init")
    };
    if stopped_at.is_some() {
        terminate(&mut child);
    }
    let status = child.wait().unwrap();
    if let Some(stopped_at) = stopped_at {
        watch.set_outcome(format!(
            "stopped by the test {stopped_at}, then {}",
            describe_exit(status)
        ));
    }
    let _ = reader.join();
    let _ = log_reader.join();
    let console = console.lock().unwrap().clone();

    assert!(
        console.contains("Run /init"),
        "kernel did not reach init after {:.1} s (VMM {})",
        boot_time.as_secs_f64(),
        exited.map_or("still running".into(), describe_exit)
    );
    eprintln!(
        "{TEST}: kernel reached init after {:.1} s",
        boot_time.as_secs_f64()
    );
    assert!(
        console.contains("virtio_blk virtio0: [vda]"),
        "virtio-blk did not probe vda"
    );
    // The devices log their activation by the guest driver (which happens only after the
    // driver's probe set DRIVER_OK); the metrics snapshots are a second witness.
    assert!(
        rng_ready || log.contains("rng: activated by the guest driver"),
        "virtio-rng was not driven by the guest"
    );
    assert!(
        blk_ready || log.contains("block0: activated by the guest driver"),
        "virtio-blk was not driven by the guest"
    );
}
