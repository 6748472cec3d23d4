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
            testkit::skip(
                testkit::Need::Kernel,
                format!("linux_boots_to_init_with_virtio_blk_and_rng: {var} is not set"),
            );
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
    let log = Arc::new(Mutex::new(String::new()));
    let mut stderr = child.stderr.take().unwrap();
    let log_reader = {
        let log = log.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
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
            note(&body);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    if let Some((200, body)) = try_http(&sock, "GET", "/metrics", None) {
        note(&body);
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
    let _ = log_reader.join();
    let console = console.lock().unwrap().clone();
    let log = log.lock().unwrap().clone();

    assert!(
        console.contains("Run /init"),
        "kernel did not reach init (exit {exited:?}) after {:?}",
        started.elapsed()
    );
    assert!(
        console.contains("virtio_blk virtio0: [vda]"),
        "virtio-blk did not probe vda"
    );
    // The devices log their activation by the guest driver (which happens only after the
    // driver's probe set DRIVER_OK); the metrics snapshots are a second witness.
    assert!(
        rng_ready || log.contains("rng: activated by the guest driver"),
        "virtio-rng was not driven by the guest:\n{log}"
    );
    assert!(
        blk_ready || log.contains("block0: activated by the guest driver"),
        "virtio-blk was not driven by the guest:\n{log}"
    );
}
