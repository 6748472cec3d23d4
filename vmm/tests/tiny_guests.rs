//! Tiny guest programs run under the real `/dev/kvm` through the same `genos-vmm` binary,
//! run loop and devices as a Linux guest. Skipped (with a message) without `/dev/kvm`.

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{build_guest, kvm_available, run_vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run_guest(name: &str, defines: &[&str], extra: &[&str]) -> common::Run {
    let guest = build_guest(name, defines);
    let mut args = vec!["--kernel", guest.to_str().unwrap(), "--mem-mib", "32"];
    args.extend_from_slice(extra);
    run_vmm(&args, TIMEOUT)
}

#[test]
fn guest_prints_over_the_uart_and_resets_through_the_i8042() {
    if !kvm_available("guest_prints_over_the_uart_and_resets_through_the_i8042") {
        return;
    }
    let run = run_guest("hello", &[], &[]);
    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(
        run.stdout.contains("Hello from the tiny guest\n"),
        "{run:?}"
    );
    assert!(run.stderr.contains("reset through the i8042"), "{run:?}");
}

#[test]
fn unclaimed_port_reads_return_all_ones() {
    if !kvm_available("unclaimed_port_reads_return_all_ones") {
        return;
    }
    let run = run_guest("hello", &[], &[]);
    assert!(
        run.stdout.contains("unclaimed port reads 000000ff\n"),
        "{run:?}"
    );
}

#[test]
fn guest_reads_virtio_mmio_magic_version_and_device_id() {
    if !kvm_available("guest_reads_virtio_mmio_magic_version_and_device_id") {
        return;
    }
    let run = run_guest("virtio", &[], &["--rng"]);
    assert_eq!(run.status, Some(3), "{run:?}");
    // "virt" little-endian, virtio-mmio version 2, entropy device (4).
    assert!(
        run.stdout
            .contains("magic=74726976 version=00000002 device=00000004\n"),
        "{run:?}"
    );
}

#[test]
fn guest_signals_the_boot_timer() {
    if !kvm_available("guest_signals_the_boot_timer") {
        return;
    }
    let run = run_guest("boot_timer", &[], &[]);
    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(run.stdout.contains("boot timer signalled"), "{run:?}");
    assert!(run.stderr.contains("Guest-boot-time"), "{run:?}");
}

#[test]
fn int3_reaches_the_guest_breakpoint_handler_and_execution_resumes() {
    if !kvm_available("int3_reaches_the_guest_breakpoint_handler_and_execution_resumes") {
        return;
    }
    let run = run_guest("int3", &[], &[]);
    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(
        run.stdout
            .contains("breakpoint handled\nresumed after int3\n"),
        "{run:?}"
    );
}

#[test]
fn unemulatable_instruction_stops_the_vm_naming_rip_and_bytes() {
    if !kvm_available("unemulatable_instruction_stops_the_vm_naming_rip_and_bytes") {
        return;
    }
    let run = run_guest("bad_insn", &[], &[]);
    assert_eq!(run.status, Some(6), "{run:?}");
    assert!(run.stdout.contains("about to fail"), "{run:?}");
    assert!(!run.stdout.contains("emulated?!"), "{run:?}");
    assert!(run.stderr.contains("RIP 0x10"), "{run:?}");
    assert!(run.stderr.contains("f3 48 0f b8"), "{run:?}");
}

#[test]
fn triple_fault_ends_the_vm_with_status_4() {
    if !kvm_available("triple_fault_ends_the_vm_with_status_4") {
        return;
    }
    let run = run_guest("triple_fault", &[], &[]);
    assert_eq!(run.status, Some(4), "{run:?}");
    assert!(run.stderr.contains("triple fault"), "{run:?}");
}

#[test]
fn reset_after_a_kernel_panic_line_is_a_panic() {
    if !kvm_available("reset_after_a_kernel_panic_line_is_a_panic") {
        return;
    }
    let run = run_guest("console_events", &["PANIC"], &[]);
    assert_eq!(run.status, Some(5), "{run:?}");
    assert!(run.stderr.contains("panic"), "{run:?}");
}

#[test]
fn kernel_halt_line_is_a_poweroff() {
    if !kvm_available("kernel_halt_line_is_a_poweroff") {
        return;
    }
    let run = run_guest("console_events", &[], &[]);
    assert_eq!(run.status, Some(0), "{run:?}");
    assert!(run.stdout.contains("reboot: System halted"), "{run:?}");
}

#[test]
fn several_vcpus_start_and_stop_with_the_guest() {
    if !kvm_available("several_vcpus_start_and_stop_with_the_guest") {
        return;
    }
    let run = run_guest("hello", &[], &["--vcpus", "4"]);
    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(
        run.stdout.contains("Hello from the tiny guest\n"),
        "{run:?}"
    );
}

#[test]
fn console_can_go_to_a_file() {
    if !kvm_available("console_can_go_to_a_file") {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-file");
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("console.log");
    let serial = format!("file:{}", log.display());
    let run = run_guest("hello", &[], &["--serial", &serial]);
    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(!run.stdout.contains("Hello"), "{run:?}");
    let console = std::fs::read_to_string(&log).unwrap();
    assert!(console.contains("Hello from the tiny guest\n"), "{console}");
}

#[test]
fn sigterm_stops_a_running_guest_with_status_0() {
    if !kvm_available("sigterm_stops_a_running_guest_with_status_0") {
        return;
    }
    let guest = build_guest("spin", &[]);
    let started = std::time::Instant::now();
    let mut child = common::spawn_vmm(&["--kernel", guest.to_str().unwrap(), "--mem-mib", "32"]);
    // Let it print a few ticks first.
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = [0u8; 64];
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("tick\ntick\n") {
        let n = std::io::Read::read(&mut stdout, &mut buf).unwrap();
        assert!(n > 0, "guest console closed early");
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    let run = common::finish(child, started, TIMEOUT);
    assert_eq!(run.status, Some(0), "{run:?}");
}

/// `GET uri` on the API socket at `sock`, or `None` when no complete answer arrives within
/// `limit` (a VMM whose main thread is stuck).
fn api_get(sock: &Path, uri: &str, limit: Duration) -> Option<(u16, String)> {
    let mut stream = UnixStream::connect(sock).ok()?;
    stream.set_read_timeout(Some(limit)).unwrap();
    write!(
        stream,
        "GET {uri} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some((status, body.to_owned()))
}

/// Forwards the lines of `pipe` to a channel.
fn lines_of(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `want`; returns every line seen until then.
fn wait_for_line(lines: &mpsc::Receiver<String>, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(want);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => panic!("no line with {want:?} within {limit:?}; console: {seen:?}"),
        }
    }
}

#[test]
fn guest_that_breaks_a_virtio_queue_gets_needs_reset_and_the_vmm_keeps_serving() {
    if !kvm_available("guest_that_breaks_a_virtio_queue_gets_needs_reset_and_the_vmm_keeps_serving")
    {
        return;
    }
    let guest = build_guest("broken_queue", &[]);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("broken-queue");
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("api.sock");
    let started = Instant::now();
    let mut child = common::spawn_vmm(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--rng",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    let console = lines_of(child.stdout.take().unwrap());
    wait_for_line(&console, "queue broken and notified", TIMEOUT);

    // The main thread still answers, and reports the device as needing a reset.
    let deadline = Instant::now() + TIMEOUT;
    let metrics = loop {
        let (status, body) = api_get(&sock, "/metrics", Duration::from_secs(5))
            .expect("the VMM did not answer GET /metrics within 5 s");
        assert_eq!(status, 200, "{body}");
        let metrics: serde_json::Value = serde_json::from_str(&body).unwrap();
        if metrics["devices"]["rng"]["transport"]["needs_reset"] == true {
            break metrics;
        }
        assert!(Instant::now() < deadline, "never needs reset: {body}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let rng = &metrics["devices"]["rng"];
    assert_eq!(rng["device"]["queue_errors"], 1, "{rng}");
    assert_eq!(rng["device"]["requests"], 0, "{rng}");
    // The guest read DEVICE_NEEDS_RESET (0x40) over DRIVER_OK and a configuration interrupt.
    let seen = wait_for_line(&console, "status=", TIMEOUT);
    assert!(
        seen.last()
            .unwrap()
            .contains("status=0000004f interrupt_status=00000002"),
        "{seen:?}"
    );

    // SIGTERM still stops it.
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let run = common::finish(child, started, TIMEOUT);
    assert_eq!(run.status, Some(0), "{run:?}");
    // One line about the broken queue, not one per pass.
    assert_eq!(
        run.stderr.matches("needs a reset").count(),
        1,
        "{}",
        run.stderr
    );
}

#[test]
fn missing_kernel_is_one_line_and_status_2() {
    let run = run_vmm(&["--kernel", "/nonexistent/vmlinux"], TIMEOUT);
    assert_eq!(run.status, Some(2), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run:?}");
}

#[test]
fn non_kernel_file_is_refused_with_status_2() {
    if !kvm_available("non_kernel_file_is_refused_with_status_2") {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("not-a-kernel");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("garbage.bin");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let run = run_vmm(&["--kernel", path.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.status, Some(2), "{run:?}");
    assert!(run.stderr.contains("cannot load kernel"), "{run:?}");
}

/// The VMM as shipped (`scripts/build-vmm`: static, `vmm` profile with abort on panic) runs a
/// guest like the test build. `scripts/test` builds it and names it in `GENOS_VMM_SHIPPED`;
/// without it the test says so and passes.
#[test]
fn shipped_static_build_runs_a_tiny_guest_without_a_dynamic_loader() {
    if !kvm_available("shipped_static_build_runs_a_tiny_guest_without_a_dynamic_loader") {
        return;
    }
    let Some(shipped) = std::env::var_os("GENOS_VMM_SHIPPED") else {
        testkit::skip(
            testkit::Need::Shipped,
            "GENOS_VMM_SHIPPED is not set (scripts/test sets it)",
        );
        return;
    };
    let guest = build_guest("console_line", &[]);
    let elf = std::fs::read(&shipped).expect("read the shipped genos-vmm");

    let child = std::process::Command::new(&shipped)
        .args(["--kernel", guest.to_str().unwrap(), "--mem-mib", "32"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the shipped genos-vmm");
    let run = common::finish(child, std::time::Instant::now(), TIMEOUT);

    assert_eq!(run.status, Some(3), "{run:?}");
    assert_eq!(run.stdout, "Hello from the tiny guest\n", "{run:?}");
    assert!(
        !has_interpreter(&elf),
        "the shipped genos-vmm asks for a dynamic loader"
    );
}

/// Whether an ELF64 little-endian file has a PT_INTERP program header (needs ld.so).
fn has_interpreter(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..4], b"\x7fELF", "not an ELF file");
    let (phoff, phentsize, phnum) = (u64_at(0x20) as usize, u16_at(0x36) as usize, u16_at(0x38));
    (0..usize::from(phnum)).any(|i| u32_at(phoff + i * phentsize) == PT_INTERP)
}
