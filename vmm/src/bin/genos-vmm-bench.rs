//! `genos-vmm-bench`: start-up, tiny-guest and memory figures of `genos-vmm`, each beside
//! a baseline measured in the same run (see `docs/vmm.md`, run it with `scripts/bench-vmm`).
//!
//! - process start → API socket accepting (median), baseline: spawn and reap `/bin/true`;
//! - process start → first vCPU entry (median; the VMM logs the CLOCK_MONOTONIC time of
//!   vCPU 0's first KVM_RUN), same baseline;
//! - tiny guest whole run: spawn, guest prints a line on COM1, resets through the i8042,
//!   process exits (median), same baseline;
//! - resident memory outside guest RAM of a running VMM (1 vCPU, 128 MiB), baseline: a
//!   running `/bin/sleep`;
//! - the floor KVM itself sets on this host: create a VM with irqchip, a 128 MiB memory
//!   slot and one vCPU, then destroy it, in this process with no VMM around it; once with
//!   a PIT as KVM creates it (tick reinjection on) and once without a PIT.
//!
//! `--vmm PATH` measures that binary (scripts/bench-vmm passes the shipped static build);
//! by default the `genos-vmm` beside this program.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TARGET_READY_MS: f64 = 5.0;
const TARGET_TINY_MS: f64 = 6.0;
const TARGET_OVERHEAD_MIB: f64 = 3.0;

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("genos-vmm-bench: {msg}");
    std::process::exit(1);
}

fn vmm_binary() -> PathBuf {
    if let Some(path) = flag_value("--vmm") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().unwrap_or_else(|e| die(format!("current exe: {e}")));
    let bin = exe.with_file_name("genos-vmm");
    if !bin.exists() {
        die(format!(
            "{} not found; build it first (scripts/bench-vmm does)",
            bin.display()
        ));
    }
    bin
}

fn build_guest(name: &str, out_dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
    let out = out_dir.join(format!("{name}.elf"));
    let status = Command::new("cc")
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,--build-id=none",
        ])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg(format!("-I{}", src.display()))
        .arg("-o")
        .arg(&out)
        .arg(src.join(format!("{name}.S")))
        .status()
        .unwrap_or_else(|e| die(format!("cannot run cc: {e}")));
    if !status.success() {
        die(format!("building tiny guest {name} failed"));
    }
    out
}

/// Milliseconds to spawn and reap `/bin/true`.
fn baseline_true() -> f64 {
    let t = Instant::now();
    let status = Command::new("/bin/true")
        .status()
        .unwrap_or_else(|e| die(format!("/bin/true: {e}")));
    assert!(status.success());
    t.elapsed().as_secs_f64() * 1e3
}

fn api_ready_ms(vmm: &Path, sock: &Path) -> f64 {
    let _ = std::fs::remove_file(sock);
    let t = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(format!("spawn genos-vmm: {e}")));
    let ready = loop {
        if std::os::unix::net::UnixStream::connect(sock).is_ok() {
            break t.elapsed();
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            die("API socket never became ready");
        }
        std::thread::sleep(Duration::from_micros(50));
    };
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    ready.as_secs_f64() * 1e3
}

/// (ms to first vCPU entry, ms for the whole run) of one tiny-guest run.
fn tiny_guest_run(vmm: &Path, guest: &Path) -> (f64, f64) {
    let t0 = monotonic_ns();
    let t = Instant::now();
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(guest)
        .args(["--mem-mib", "128", "--serial", "stdout"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| die(format!("spawn genos-vmm: {e}")));
    let mut stdout = String::new();
    let mut stderr = String::new();
    let _ = child
        .stdout
        .take()
        .map(|mut s| s.read_to_string(&mut stdout));
    let _ = child
        .stderr
        .take()
        .map(|mut s| s.read_to_string(&mut stderr));
    let status = child.wait().unwrap_or_else(|e| die(format!("wait: {e}")));
    let whole = t.elapsed().as_secs_f64() * 1e3;
    if status.code() != Some(3) || !stdout.contains("Hello from the tiny guest") {
        die(format!(
            "tiny guest run failed ({status}): {stdout}{stderr}"
        ));
    }
    let entry_ns: u64 = stderr
        .split("(monotonic ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| die(format!("no first-entry line in the VMM log: {stderr}")));
    ((entry_ns.saturating_sub(t0)) as f64 / 1e6, whole)
}

/// Resident (`Rss`) or proportional (`Pss`: shared pages divided among their users) KiB
/// of `pid`, excluding mappings whose name contains `exclude`.
fn mem_kib_excluding(pid: u32, field: &str, exclude: Option<&str>) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| die(format!("read smaps: {e}")));
    let mut total = 0;
    let mut skip = false;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            skip = exclude.is_some_and(|x| line.contains(x));
        } else if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            if !skip {
                total += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    total
}

/// (RSS, PSS) of a running VMM outside guest RAM and (RSS, PSS) of a running `sleep`, MiB.
fn memory_overhead(vmm: &Path, guest: &Path) -> ((f64, f64), (f64, f64)) {
    let mut child = Command::new(vmm)
        .arg("--kernel")
        .arg(guest)
        .args(["--mem-mib", "128", "--vcpus", "1", "--serial", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| die(format!("spawn genos-vmm: {e}")));
    std::thread::sleep(Duration::from_millis(300));
    let ram = Some("genos-guest-ram");
    let vmm_kib = (
        mem_kib_excluding(child.id(), "Rss", ram),
        mem_kib_excluding(child.id(), "Pss", ram),
    );
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();

    let mut sleeper = Command::new("/bin/sleep")
        .arg("10")
        .spawn()
        .unwrap_or_else(|e| die(format!("spawn sleep: {e}")));
    std::thread::sleep(Duration::from_millis(100));
    let sleep_kib = (
        mem_kib_excluding(sleeper.id(), "Rss", None),
        mem_kib_excluding(sleeper.id(), "Pss", None),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let mib = |(rss, pss): (u64, u64)| (rss as f64 / 1024.0, pss as f64 / 1024.0);
    (mib(vmm_kib), mib(sleep_kib))
}

fn flag_value(flag: &str) -> Option<String> {
    let mut args = std::env::args().skip_while(|a| a != flag);
    args.next()?;
    Some(
        args.next()
            .unwrap_or_else(|| die(format!("{flag} needs a value"))),
    )
}

/// Milliseconds KVM alone takes, in this process, to create a VM with an irqchip, a 128 MiB
/// memory slot, one vCPU and (`with_pit`) a PIT in KVM's default mode, and to destroy it
/// again: what any VMM pays here.
fn kvm_floor_ms(with_pit: bool) -> f64 {
    use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
    const SIZE: usize = 128 << 20;
    let t = Instant::now();
    let kvm = kvm_ioctls::Kvm::new().unwrap_or_else(|e| die(format!("/dev/kvm: {e}")));
    let vm = kvm
        .create_vm()
        .unwrap_or_else(|e| die(format!("create VM: {e}")));
    vm.set_tss_address(0xfffb_d000)
        .unwrap_or_else(|e| die(format!("TSS: {e}")));
    vm.create_irq_chip()
        .unwrap_or_else(|e| die(format!("irqchip: {e}")));
    if with_pit {
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap_or_else(|e| die(format!("PIT: {e}")));
    }
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        die("mmap of 128 MiB failed");
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: SIZE as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: `host` maps SIZE bytes and stays mapped until after the VM is dropped below.
    unsafe { vm.set_user_memory_region(region) }
        .unwrap_or_else(|e| die(format!("memory slot: {e}")));
    let vcpu = vm
        .create_vcpu(0)
        .unwrap_or_else(|e| die(format!("vCPU: {e}")));
    drop(vcpu);
    drop(vm);
    let elapsed = t.elapsed().as_secs_f64() * 1e3;
    // SAFETY: the mapping made above, no longer used by anything (the VM is gone).
    unsafe { libc::munmap(host, SIZE) };
    elapsed
}

fn main() {
    let runs: usize = flag_value("--runs")
        .map(|n| n.parse().unwrap_or_else(|_| die("--runs needs a number")))
        .unwrap_or(30);
    if std::fs::metadata("/dev/kvm").is_err() {
        die("/dev/kvm is not available");
    }
    let vmm = vmm_binary();
    let work = std::env::temp_dir().join(format!("genos-vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap_or_else(|e| die(format!("{}: {e}", work.display())));
    let guest = build_guest("console_line", &work);
    let spin = build_guest("spin", &work);
    let sock = work.join("api.sock");

    let (mut ready, mut entry, mut whole, mut base) = (vec![], vec![], vec![], vec![]);
    let (mut floor, mut floor_no_pit) = (vec![], vec![]);
    // One untimed round warms the page cache.
    let _ = api_ready_ms(&vmm, &sock);
    let _ = tiny_guest_run(&vmm, &guest);
    for _ in 0..runs {
        base.push(baseline_true());
        ready.push(api_ready_ms(&vmm, &sock));
        let (e, w) = tiny_guest_run(&vmm, &guest);
        entry.push(e);
        whole.push(w);
        floor.push(kvm_floor_ms(true));
        floor_no_pit.push(kvm_floor_ms(false));
    }
    let (overhead, sleep_mem) = memory_overhead(&vmm, &spin);
    let _ = std::fs::remove_dir_all(&work);

    let base = median(base);
    let ready = median(ready);
    let entry = median(entry);
    let whole = median(whole);
    let floor = median(floor);
    let floor_no_pit = median(floor_no_pit);
    println!("genos-vmm: {}", vmm.display());
    println!("genos-vmm benchmark ({runs} runs, medians; baseline measured in the same run)");
    println!(
        "{:<44} {:>10} {:>24} {:>7} {:>8}",
        "metric", "genos-vmm", "baseline", "ratio", "target"
    );
    let row = |name: &str, v: f64, unit: &str, b: f64, bname: &str, target: Option<f64>| {
        let verdict = match target {
            Some(t) => format!(
                "{t:>5.1} {unit:<2} {}",
                if v <= t { "ok" } else { "MISSED" }
            ),
            None => "-".into(),
        };
        println!(
            "{:<44} {:>7.2} {:<2} {:>15.2} {:<2} {:<5} {:>7.2}   {}",
            name,
            v,
            unit,
            b,
            unit,
            bname,
            v / b,
            verdict
        );
    };
    row(
        "process start -> API socket ready",
        ready,
        "ms",
        base,
        "true",
        Some(TARGET_READY_MS),
    );
    row(
        "process start -> first vCPU entry",
        entry,
        "ms",
        base,
        "true",
        None,
    );
    row(
        "tiny guest run (start, print, reset, exit)",
        whole,
        "ms",
        base,
        "true",
        Some(TARGET_TINY_MS),
    );
    row(
        "tiny guest run vs bare KVM VM, PIT",
        whole,
        "ms",
        floor,
        "kvm",
        None,
    );
    row(
        "tiny guest run vs bare KVM VM, no PIT",
        whole,
        "ms",
        floor_no_pit,
        "kvm",
        None,
    );
    row(
        "RSS outside guest RAM (1 vCPU, 128 MiB)",
        overhead.0,
        "MiB",
        sleep_mem.0,
        "sleep",
        Some(TARGET_OVERHEAD_MIB),
    );
    row(
        "PSS outside guest RAM (shared pages split)",
        overhead.1,
        "MiB",
        sleep_mem.1,
        "sleep",
        Some(TARGET_OVERHEAD_MIB),
    );
}
