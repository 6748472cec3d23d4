//! Boots the GenOS guest kernel (`GENOS_GUEST_KERNEL`, a vmlinux) with the busybox
//! initramfs (`GENOS_GUEST_INITRAMFS`), a virtio-blk disk and virtio-rng under the
//! `baseline` CPU template, and checks what the kernel itself does: it reaches
//! `Run /init`, virtio-blk probes `vda`, virtio-rng is driven (DRIVER_OK, entropy read).
//!
//! Slow by nature (minutes here: the nested KVM emulates most guest code). Skipped
//! with a message when the images or `/dev/kvm` are missing; `scripts/test` sets both
//! variables (`cargo run -q -p genos-image -- kernel|initramfs`).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, spawn_vmm, try_http, wait_for_socket};

const BOOT_TIMEOUT: Duration = Duration::from_secs(1200);
/// virtio-mmio device status bit set by the driver after a successful probe.
const DRIVER_OK: u64 = 4;

fn image(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("skipping linux_boots_to_init_with_virtio_blk_and_rng: {var} is not set");
            None
        }
    }
}

#[test]
fn linux_boots_to_init_with_virtio_blk_and_rng() {
    let (Some(kernel), Some(initramfs)) =
        (image("GENOS_GUEST_KERNEL"), image("GENOS_GUEST_INITRAMFS"))
    else {
        return;
    };
    if !kvm_available("linux_boots_to_init_with_virtio_blk_and_rng") {
        return;
    }
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

    let started = Instant::now();
    let mut last_metrics: Option<serde_json::Value> = None;
    let mut exited = None;
    while started.elapsed() < BOOT_TIMEOUT {
        if console.lock().unwrap().contains("Run /init") {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            exited = Some(status);
            break;
        }
        // Keep the latest counters: the guest may panic (and the VMM exit) right after
        // init starts, since user space cannot run on this nested KVM.
        if let Some((200, body)) = try_http(&sock, "GET", "/metrics", None) {
            last_metrics = serde_json::from_str(&body).ok();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if let Some((200, body)) = try_http(&sock, "GET", "/metrics", None) {
        last_metrics = serde_json::from_str(&body).ok();
    }
    // SAFETY: kill(2) on our own child; it may already have exited.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    let _ = reader.join();
    let console = console.lock().unwrap().clone();

    assert!(
        console.contains("Run /init"),
        "kernel did not reach init (exit {exited:?}) after {:?}",
        started.elapsed()
    );
    assert!(
        console.contains("virtio_blk virtio0: [vda]"),
        "virtio-blk did not probe vda"
    );
    let metrics = last_metrics.expect("metrics were read during boot");
    let rng = &metrics["devices"]["rng"];
    let status = rng["transport"]["status"].as_u64().unwrap_or(0);
    assert_ne!(status & DRIVER_OK, 0, "virtio-rng driver not ready: {rng}");
    assert!(
        rng["transport"]["activations"].as_u64().unwrap_or(0) >= 1,
        "virtio-rng never activated: {rng}"
    );
    let blk_status = metrics["devices"]["block0"]["transport"]["status"]
        .as_u64()
        .unwrap_or(0);
    assert_ne!(
        blk_status & DRIVER_OK,
        0,
        "virtio-blk driver not ready: {metrics}"
    );
}
