//! Snapshots of a tiny guest that counts in memory and prints its counter on COM1: it is
//! snapshotted once it has counted to N, then two VMM processes restore it at once and
//! each goes on counting from where it was paused, on its own copy of memory; corrupted
//! or truncated snapshots, snapshots of a running VM and loads into a VMM configured for
//! another VM are refused. The guest has a virtio-rng device, and in some tests
//! virtio-input, virtio-gpu, a read-only virtio-blk disk and virtio-vsock (their state goes
//! through the snapshot; the guest drives none of them). Skipped (with a message) without
//! `/dev/kvm`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use common::{build_guest, http, kvm_available, spawn_vmm, wait_for_socket};

/// The count the guest must reach before it is snapshotted.
const N: u64 = 200;
const TIMEOUT: Duration = Duration::from_secs(30);

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("snapshot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Kills the VMM when the test ends, however it ends.
struct Vmm(Child);

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The complete lines of a console as counter values (the first line may be the tail of
/// a value begun before a snapshot, so it is not parsed).
fn values(text: &str, skip_first: bool) -> Vec<u64> {
    let Some(end) = text.rfind('\n') else {
        return Vec::new();
    };
    text[..end]
        .split('\n')
        .skip(usize::from(skip_first))
        .map(|l| u64::from_str_radix(l, 16).unwrap_or_else(|_| panic!("bad line {l:?}")))
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn assert_consecutive(values: &[u64], what: &str) {
    for pair in values.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "{what} skipped a value: {values:?}");
    }
}

/// What a snapshot of the counting guest left: the directory with `snapshot` and
/// `memory`, and the console up to the pause.
struct Snapshotted {
    dir: Dir,
    console: String,
}

/// Boots the counter guest with an API socket (and `extra` arguments), waits for N,
/// pauses and snapshots it into `snapshot` and `memory` beside the socket, then stops it.
fn snapshot_counter_guest(name: &str, extra: &[&str]) -> Snapshotted {
    let dir = Dir::new(name);
    let guest = build_guest("counter", &[]);
    let sock = dir.join("api.sock");
    let serial = format!("file:{}", dir.arg("console"));
    let mut args = vec![
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--rng",
        "--serial",
        &serial,
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let vmm = Vmm(spawn_vmm(&args));
    assert!(wait_for_socket(&sock, TIMEOUT), "no API socket");
    wait_until("the guest to count to N", || {
        values(&console(&dir.join("console")), false)
            .last()
            .is_some_and(|v| *v >= N)
    });
    let create = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
        dir.arg("snapshot"),
        dir.arg("memory")
    );

    let running = http(&sock, "PUT", "/snapshot/create", Some(&create));
    let pause = http(&sock, "PUT", "/vm/actions", Some(r#"{"action":"pause"}"#));
    let console_at_pause = console(&dir.join("console"));
    let created = http(&sock, "PUT", "/snapshot/create", Some(&create));
    std::thread::sleep(Duration::from_millis(50));
    let console_after = console(&dir.join("console"));
    let stop = http(&sock, "PUT", "/vm/actions", Some(r#"{"action":"stop"}"#));
    drop(vmm);

    assert_eq!(running.0, 409, "snapshot of a running VM: {running:?}");
    assert!(running.1.contains("while the VM is running"), "{running:?}");
    assert_eq!(pause.0, 204, "{pause:?}");
    assert_eq!(created.0, 204, "{created:?}");
    assert_eq!(stop.0, 204, "{stop:?}");
    assert_eq!(
        console_after, console_at_pause,
        "the paused guest printed on"
    );
    assert_eq!(
        std::fs::metadata(dir.join("memory")).unwrap().len(),
        32 << 20
    );
    Snapshotted {
        dir,
        console: console_at_pause,
    }
}

/// Checks a restored copy's console: with what the snapshotted guest printed, its first
/// bytes complete the value in flight, and from there it counts on without a gap.
fn assert_continues(before: &str, after: &str, what: &str) {
    let last_before = *values(before, false).last().unwrap();
    let joined = format!("{before}{after}");
    let all = values(&joined, false);
    let resumed = &all[values(before, false).len()..];
    assert!(resumed.len() >= 20, "{what} printed too little: {after:?}");
    assert_eq!(
        resumed[0],
        last_before + 1,
        "{what} did not go on from the paused value (before ends {:?}, after starts {:?})",
        &before[before.len().saturating_sub(20)..],
        &after[..after.len().min(20)]
    );
    assert!(resumed[0] > N, "{what} restarted below N");
    assert_consecutive(resumed, what);
}

fn file_crc(path: &Path) -> u64 {
    vmm::snapshot::format::crc64(&std::fs::read(path).unwrap())
}

#[test]
fn two_restores_of_one_snapshot_both_go_on_counting_from_the_paused_value() {
    if !kvm_available("two_restores_of_one_snapshot_both_go_on_counting_from_the_paused_value") {
        return;
    }
    // With the three virtio-input devices and virtio-gpu too (no host-side resource the
    // clones share).
    let snap = snapshot_counter_guest("two", &["--input", "--gpu", "640x480"]);
    let memory_before = file_crc(&snap.dir.join("memory"));

    let started = Instant::now();
    let clones: Vec<(Vmm, PathBuf)> = ["a", "b"]
        .iter()
        .map(|name| {
            let out = snap.dir.join(&format!("clone-{name}"));
            let serial = format!("file:{}", out.display());
            let child = spawn_vmm(&["--restore", &snap.dir.arg(""), "--serial", &serial]);
            (Vmm(child), out)
        })
        .collect();
    for (_, out) in &clones {
        wait_until("a clone to print 100 values", || {
            values(&console(out), true).len() >= 100
        });
    }
    let elapsed = started.elapsed();
    let outputs: Vec<String> = clones.iter().map(|(_, out)| console(out)).collect();
    let mut clones = clones;
    for (vmm, _) in &mut clones {
        assert!(vmm.0.try_wait().unwrap().is_none(), "a clone exited early");
    }
    drop(clones);

    assert_continues(&snap.console, &outputs[0], "clone a");
    assert_continues(&snap.console, &outputs[1], "clone b");
    assert_eq!(
        file_crc(&snap.dir.join("memory")),
        memory_before,
        "a clone wrote to the snapshot's memory file"
    );
    eprintln!("two clones restored and printed 100 values each in {elapsed:?}");
}

#[test]
fn a_snapshot_loads_through_the_api_into_a_fresh_vmm() {
    if !kvm_available("a_snapshot_loads_through_the_api_into_a_fresh_vmm") {
        return;
    }
    // With a read-only disk and a vsock device too: their state goes through the
    // snapshot (the guest drives neither) and the copy listens on its own vsock socket.
    let disk_dir = Dir::new("api-disk");
    std::fs::write(disk_dir.join("disk.img"), vec![0u8; 4096]).unwrap();
    let disk = format!("{}:ro", disk_dir.arg("disk.img"));
    let vsock = format!("3:{}", disk_dir.arg("v.sock"));
    let snap = snapshot_counter_guest("api", &["--disk", &disk, "--vsock", &vsock]);
    let sock = snap.dir.join("fresh.sock");
    let _vmm = Vmm(spawn_vmm(&["--api-sock", sock.to_str().unwrap()]));
    assert!(wait_for_socket(&sock, TIMEOUT), "no API socket");
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}","serial":"file:{}","vsock_uds_path":"{}"}}"#,
        snap.dir.arg("snapshot"),
        snap.dir.arg("memory"),
        snap.dir.arg("loaded"),
        disk_dir.arg("copy.sock")
    );

    let loaded = http(&sock, "PUT", "/snapshot/load", Some(&load));
    let paused = http(&sock, "GET", "/vm", None);
    std::thread::sleep(Duration::from_millis(50));
    let printed_while_paused = console(&snap.dir.join("loaded"));
    let again = http(&sock, "PUT", "/snapshot/load", Some(&load));
    let resume = http(&sock, "PUT", "/vm/actions", Some(r#"{"action":"resume"}"#));
    wait_until("the loaded VM to print 50 values", || {
        values(&console(&snap.dir.join("loaded")), true).len() >= 50
    });

    assert_eq!(loaded.0, 204, "{loaded:?}");
    assert!(paused.1.contains(r#""state":"paused""#), "{paused:?}");
    assert!(paused.1.contains("copy.sock"), "{paused:?}");
    assert!(
        std::os::unix::net::UnixStream::connect(disk_dir.join("copy.sock")).is_ok(),
        "the copy's vsock listens on its own socket"
    );
    assert_eq!(printed_while_paused, "", "the VM ran before resume");
    assert_eq!(again.0, 409, "a second load: {again:?}");
    assert_eq!(resume.0, 204, "{resume:?}");
    assert_continues(
        &snap.console,
        &console(&snap.dir.join("loaded")),
        "the loaded VM",
    );
}

#[test]
fn corrupted_truncated_and_mismatched_snapshots_are_refused_and_nothing_is_restored() {
    if !kvm_available(
        "corrupted_truncated_and_mismatched_snapshots_are_refused_and_nothing_is_restored",
    ) {
        return;
    }
    let snap = snapshot_counter_guest("bad", &[]);
    let good = std::fs::read(snap.dir.join("snapshot")).unwrap();
    let mut corrupted = good.clone();
    let middle = corrupted.len() / 2;
    corrupted[middle] ^= 0x01;
    let bad = Dir::new("bad-copy");
    std::fs::write(bad.join("snapshot"), &corrupted).unwrap();
    std::fs::copy(snap.dir.join("memory"), bad.join("memory")).unwrap();
    let short = Dir::new("short-copy");
    std::fs::write(short.join("snapshot"), &good[..good.len() - 100]).unwrap();
    std::fs::copy(snap.dir.join("memory"), short.join("memory")).unwrap();
    let small_memory = Dir::new("small-memory");
    std::fs::write(small_memory.join("snapshot"), &good).unwrap();
    std::fs::write(small_memory.join("memory"), vec![0u8; 4096]).unwrap();

    let run =
        |dir: &Dir| common::run_vmm(&["--restore", &dir.arg(""), "--serial", "none"], TIMEOUT);
    let corrupt_run = run(&bad);
    let short_run = run(&short);
    let small_run = run(&small_memory);

    let sock = snap.dir.join("other.sock");
    let guest = build_guest("counter", &[]);
    let _vmm = Vmm(spawn_vmm(&["--api-sock", sock.to_str().unwrap()]));
    assert!(wait_for_socket(&sock, TIMEOUT));
    let configure = format!(r#"{{"kernel":"{}","mem_mib":64}}"#, guest.to_str().unwrap());
    let configured = http(&sock, "PUT", "/vm/config", Some(&configure));
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}","resume_vm":true}}"#,
        snap.dir.arg("snapshot"),
        snap.dir.arg("memory")
    );
    let mismatched = http(&sock, "PUT", "/snapshot/load", Some(&load));
    let described = http(&sock, "GET", "/vm", None);

    assert_eq!(corrupt_run.status, Some(2), "{corrupt_run:?}");
    assert!(
        corrupt_run.stderr.contains("corrupt: checksum"),
        "{corrupt_run:?}"
    );
    assert_eq!(short_run.status, Some(2), "{short_run:?}");
    assert!(short_run.stderr.contains("truncated"), "{short_run:?}");
    assert_eq!(small_run.status, Some(2), "{small_run:?}");
    assert!(
        small_run
            .stderr
            .contains("has 4096 bytes, the snapshot's VM has 33554432"),
        "{small_run:?}"
    );
    assert_eq!(configured.0, 204, "{configured:?}");
    assert_eq!(mismatched.0, 400, "{mismatched:?}");
    assert!(
        mismatched
            .1
            .contains("snapshot's VM has mem_mib 32, this VMM is configured for 64"),
        "{mismatched:?}"
    );
    assert!(
        described.1.contains(r#""state":"configured""#),
        "{described:?}"
    );
}

#[test]
fn a_restored_vm_can_be_snapshotted_again_and_that_snapshot_goes_on() {
    if !kvm_available("a_restored_vm_can_be_snapshotted_again_and_that_snapshot_goes_on") {
        return;
    }
    let snap = snapshot_counter_guest("again", &[]);
    let sock = snap.dir.join("clone.sock");
    let vmm = Vmm(spawn_vmm(&["--api-sock", sock.to_str().unwrap()]));
    assert!(wait_for_socket(&sock, TIMEOUT), "no API socket");
    let load = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}","resume_vm":true,"serial":"file:{}"}}"#,
        snap.dir.arg("snapshot"),
        snap.dir.arg("memory"),
        snap.dir.arg("first-copy")
    );
    assert_eq!(http(&sock, "PUT", "/snapshot/load", Some(&load)).0, 204);
    wait_until("the copy to count 100 more", || {
        values(&console(&snap.dir.join("first-copy")), true).len() >= 100
    });
    let second = Dir::new("again-second");
    let create = format!(
        r#"{{"snapshot_path":"{}","mem_file_path":"{}"}}"#,
        snap.dir.arg("snapshot2"),
        snap.dir.arg("memory2")
    );

    let pause = http(&sock, "PUT", "/vm/actions", Some(r#"{"action":"pause"}"#));
    let created = http(&sock, "PUT", "/snapshot/create", Some(&create));
    let copy_console = console(&snap.dir.join("first-copy"));
    drop(vmm);
    std::fs::rename(snap.dir.join("snapshot2"), second.join("snapshot")).unwrap();
    std::fs::rename(snap.dir.join("memory2"), second.join("memory")).unwrap();
    let out = second.join("console");
    let serial = format!("file:{}", out.display());
    let _again = Vmm(spawn_vmm(&[
        "--restore",
        &second.arg(""),
        "--serial",
        &serial,
    ]));
    wait_until("the second-generation copy to print", || {
        values(&console(&out), true).len() >= 50
    });

    assert_eq!(pause.0, 204, "{pause:?}");
    assert_eq!(created.0, 204, "{created:?}");
    let before = format!("{}{copy_console}", snap.console);
    assert_continues(&before, &console(&out), "the copy of the copy");
}

#[test]
fn a_vm_with_two_vcpus_restores_both_and_goes_on() {
    if !kvm_available("a_vm_with_two_vcpus_restores_both_and_goes_on") {
        return;
    }
    // The second vCPU waits for a start-up IPI that never comes: its state (not running)
    // must come back as it was, the first one's as running.
    let snap = snapshot_counter_guest("smp", &["--vcpus", "2"]);
    let out = snap.dir.join("copy");
    let serial = format!("file:{}", out.display());
    let _copy = Vmm(spawn_vmm(&[
        "--restore",
        &snap.dir.arg(""),
        "--serial",
        &serial,
    ]));
    wait_until("the two-vCPU copy to print", || {
        values(&console(&out), true).len() >= 50
    });

    assert_continues(&snap.console, &console(&out), "the two-vCPU copy");
}
