//! `genos-vmm` started by `genos-jailer` with a tiny guest: every thread under seccomp,
//! the unprivileged uid, the cgroup limits, Landlock enforced, no host file reachable, and
//! a forbidden system call from each thread role killing the process (exit 128+SIGSYS).
//! Needs root and `/dev/kvm`; prints why and skips otherwise. The jailer binary must be
//! built first: `cargo build -p genos-jailer`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{build_guest, http, kvm_available, wait_for_socket};

const NOBODY: u32 = 65534;
const MEMORY_LIMIT: &str = "268435456";
const PIDS_LIMIT: &str = "32";
const TIMEOUT: Duration = Duration::from_secs(30);
/// The jailer's status for a VMM killed by SIGSYS (a seccomp violation).
const KILLED_BY_SECCOMP: i32 = 128 + libc::SIGSYS;

fn can_run(test: &str) -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(
            testkit::Need::Root,
            format!("{test}: the jailer needs root"),
        );
        return false;
    }
    kvm_available(test)
}

/// `target/<profile>/genos-jailer`, beside this test's `deps/` directory.
fn jailer_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().unwrap().parent().unwrap().join("genos-jailer");
    assert!(
        path.exists(),
        "{} missing: build it with `cargo build -p genos-jailer`",
        path.display()
    );
    path
}

/// One jail: its base directory (removed on drop) and id.
struct Jail {
    base: PathBuf,
    id: String,
    sock: PathBuf,
}

impl Jail {
    fn new(name: &str) -> Self {
        let id = format!("vmm-{name}-{}", std::process::id());
        let base = std::env::temp_dir().join(format!("genos-jailed-{id}"));
        std::fs::create_dir_all(&base).unwrap();
        let sock = base.join("api.sock");
        Self { base, id, sock }
    }

    /// Starts the jailer on `vmm_args` (plus the API socket), with the test's cgroup limits.
    fn start(&self, vmm_args: &[&str]) -> Child {
        let (mem, pids) = match cgroup_v1() {
            true => ("memory.limit_in_bytes", "pids.max"),
            false => ("memory.max", "pids.max"),
        };
        Command::new(jailer_bin())
            .args(["--id", &self.id])
            .args(["--uid", &NOBODY.to_string(), "--gid", &NOBODY.to_string()])
            .arg("--chroot-base")
            .arg(&self.base)
            .arg("--exec-file")
            .arg(common::vmm_bin())
            .args(["--cgroup", &format!("{mem}={MEMORY_LIMIT}")])
            .args(["--cgroup", &format!("{pids}={PIDS_LIMIT}")])
            .arg("--")
            .args(vmm_args)
            .arg("--api-sock")
            .arg(&self.sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn genos-jailer")
    }

    fn vmm_pid(&self) -> u32 {
        let path = self
            .base
            .join("genos-vmm")
            .join(&self.id)
            .join("genos-vmm.pid");
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                return pid;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{} never appeared", path.display());
    }

    fn cgroup_file(&self, file: &str) -> PathBuf {
        let controller = file.split('.').next().unwrap();
        match cgroup_v1() {
            true => Path::new("/sys/fs/cgroup").join(controller),
            false => PathBuf::from("/sys/fs/cgroup"),
        }
        .join("genos")
        .join(&self.id)
        .join(file)
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn cgroup_v1() -> bool {
    Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists()
}

/// Waits for `child` until [`TIMEOUT`] passes, then kills it (`None`).
fn wait_status(child: &mut Child) -> Option<ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait for genos-jailer") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child` (killing it after [`TIMEOUT`]); returns its status and stderr.
fn wait(mut child: Child) -> (Option<ExitStatus>, String) {
    let run = wait_status(&mut child);
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    (run, stderr)
}

/// Stops the jailed VMM with SIGTERM (forwarded by the jailer) and reaps the jailer.
fn stop(mut child: Child) {
    // SAFETY: kill(2) on the jailer we spawned.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = wait_status(&mut child);
}

fn spin_guest() -> PathBuf {
    build_guest("spin", &[])
}

/// Polls `GET /vm` until the VM runs with its sandbox in place; returns the description.
fn running_description(sock: &Path) -> serde_json::Value {
    assert!(wait_for_socket(sock, TIMEOUT), "API socket never came up");
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (status, body) = http(sock, "GET", "/vm", None);
        assert_eq!(status, 200, "{body}");
        let description: serde_json::Value = serde_json::from_str(&body).unwrap();
        if description["state"] == "running" && !description["sandbox"]["landlock"].is_null() {
            return description;
        }
        assert!(Instant::now() < deadline, "VM never ran: {body}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Each thread's name and its `Seccomp:` line.
fn thread_seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .map(|task| {
            let task = task.unwrap().path();
            let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
            let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
            let seccomp = status
                .lines()
                .find(|l| l.starts_with("Seccomp:"))
                .unwrap_or("no Seccomp line")
                .to_owned();
            (comm.trim().to_owned(), seccomp)
        })
        .collect()
}

#[test]
fn jailed_vmm_runs_every_thread_under_seccomp_as_nobody_within_its_limits() {
    if !can_run("jailed_vmm_runs_every_thread_under_seccomp_as_nobody_within_its_limits") {
        return;
    }
    let jail = Jail::new("confined");
    let guest = spin_guest();
    let child = jail.start(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--vcpus",
        "2",
        "--serial",
        "none",
    ]);
    let pid = jail.vmm_pid();

    let description = running_description(&jail.sock);
    let threads = thread_seccomp_modes(pid);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let memory_file = match cgroup_v1() {
        true => "memory.limit_in_bytes",
        false => "memory.max",
    };
    let memory_limit = std::fs::read_to_string(jail.cgroup_file(memory_file)).unwrap();
    let pids_limit = std::fs::read_to_string(jail.cgroup_file("pids.max")).unwrap();
    stop(child);

    assert_eq!(description["sandbox"]["seccomp"], "kill", "{description}");
    assert_eq!(
        description["sandbox"]["landlock"], "enforced",
        "{description}"
    );
    for role in ["genos-vmm", "api", "vcpu0", "vcpu1"] {
        assert!(
            threads.iter().any(|(name, _)| name == role),
            "no {role} thread in {threads:?}"
        );
    }
    // KVM's own worker (`kvm-nx-lpage-recovery`) lives in the VMM's thread group but runs
    // only kernel code; whether it shows the filter depends on when the kernel forks it.
    assert!(
        threads
            .iter()
            .filter(|(name, _)| !name.starts_with("kvm-"))
            .all(|(_, seccomp)| seccomp == "Seccomp:\t2"),
        "a thread without its filter: {threads:?}"
    );
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert_eq!(
        uid_line.split_whitespace().skip(1).collect::<Vec<_>>(),
        vec![NOBODY.to_string(); 4],
        "{uid_line}"
    );
    assert_eq!(memory_limit.trim(), MEMORY_LIMIT);
    assert_eq!(pids_limit.trim(), PIDS_LIMIT);
}

#[test]
fn jailed_vmm_cannot_open_a_host_file_outside_its_root() {
    if !can_run("jailed_vmm_cannot_open_a_host_file_outside_its_root") {
        return;
    }
    let jail = Jail::new("noescape");
    // A file that exists on the host, readable by anyone, but not mounted into the jail.
    let host_file = spin_guest();
    let child = jail.start(&[]);
    assert!(
        wait_for_socket(&jail.sock, TIMEOUT),
        "API socket never came up"
    );

    let body = format!(r#"{{"kernel":"{}"}}"#, host_file.display());
    let (status, reason) = http(&jail.sock, "PUT", "/vm/config", Some(&body));
    stop(child);

    assert_eq!(status, 400, "{reason}");
    assert!(reason.contains("No such file or directory"), "{reason}");
}

fn selftest_kills(role: &str) {
    let jail = Jail::new(&format!("selftest-{role}"));
    let guest = spin_guest();
    let child = jail.start(&[
        "--kernel",
        guest.to_str().unwrap(),
        "--mem-mib",
        "32",
        "--serial",
        "none",
        "--seccomp-selftest",
        role,
    ]);

    let (status, stderr) = wait(child);

    assert_eq!(
        status.and_then(|s| s.code()),
        Some(KILLED_BY_SECCOMP),
        "the {role} thread's forbidden call did not kill the VMM: {stderr}"
    );
}

#[test]
fn a_forbidden_call_from_the_main_thread_kills_the_jailed_vmm() {
    if can_run("a_forbidden_call_from_the_main_thread_kills_the_jailed_vmm") {
        selftest_kills("main");
    }
}

#[test]
fn a_forbidden_call_from_a_vcpu_thread_kills_the_jailed_vmm() {
    if can_run("a_forbidden_call_from_a_vcpu_thread_kills_the_jailed_vmm") {
        selftest_kills("vcpu");
    }
}

#[test]
fn a_forbidden_call_from_the_api_thread_kills_the_jailed_vmm() {
    if can_run("a_forbidden_call_from_the_api_thread_kills_the_jailed_vmm") {
        selftest_kills("api");
    }
}
