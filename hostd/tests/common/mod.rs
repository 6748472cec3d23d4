//! Shared helpers: tiny guests (assembled like vmm/tests do), the genos-vmm binary, configs.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hostd::composer::{Composer, Outcome};
use hostd::orchestrator::Orchestrator;
use hostd::store::{EnvRecord, EnvState};
use proto::spec::{Catalog, Spec};

pub use testkit::kvm_available;

/// `genos-vmm` from the same target directory as this test's binaries (built by
/// `cargo build -p genos-vmm` or any workspace-wide build), or `GENOS_VMM_BIN`.
pub fn vmm_bin(test: &str) -> Option<PathBuf> {
    workspace_bin(test, "genos-vmm", "GENOS_VMM_BIN")
}

/// The workspace binary `name` beside the test binaries (as `cargo test --workspace` builds
/// it), or the path in the environment variable `var`; None (skipped, saying why) if absent.
pub fn workspace_bin(test: &str, name: &str, var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Some(p.into());
    }
    // Test binaries live in <target>/<profile>/deps; the workspace's binaries one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        testkit::skip(
            testkit::Need::Bins,
            format!(
                "{test}: {} not built (run `cargo build --workspace`, or set {var})",
                p.display()
            ),
        );
        None
    }
}

/// Assembles `hostd/tests/guests/<name>.S` with the VMM tests' start-up code and linker
/// script into a freestanding ELF loaded at 1 MiB.
pub fn build_guest(name: &str) -> PathBuf {
    // Also used by other crates' tests (client): resolve hostd's directory from any of them.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../hostd");
    let vmm_guests = root.join("../vmm/tests/guests");
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostd-guests");
    std::fs::create_dir_all(&out_dir).expect("guest output dir");
    let out = out_dir.join(format!("{name}.elf"));
    let output = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()))
        .args([
            "-nostdlib",
            "-static",
            "-no-pie",
            "-ffreestanding",
            "-Wl,--build-id=none",
        ])
        .arg(format!("-Wl,-T,{}", vmm_guests.join("guest.ld").display()))
        .arg(format!("-I{}", vmm_guests.display()))
        .arg("-o")
        .arg(&out)
        .arg(root.join(format!("tests/guests/{name}.S")))
        .output()
        .expect("run the C compiler (cc)");
    assert!(
        output.status.success(),
        "building guest {name}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// A hostd config running `kernel` as every environment's guest, no image builds.
pub fn config_toml(vmm: &Path, kernel: &Path, vcpus: u32, memory_mib: u64) -> String {
    format!(
        r#"
[capacity]
vcpus = {vcpus}
memory_mib = {memory_mib}
cpu_overcommit = 1.0
memory_overcommit = 1.0
[images]
builder = "/nonexistent/genos-image"
kernel = "{}"
build_rootfs = false
[vmm]
binary = "{}"
api_timeout_s = 20
boot_timeout_s = 120
cpu_template = "host"
# The tiny guests have no agent: their boot-timer write is ready.
ready = "boot"
[reaper]
interval_s = 3600
[stream]
listen = "127.0.0.1:0"
"#,
        kernel.display(),
        vmm.display()
    )
}

/// The running test's name (the test harness names each test's thread after it).
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("test").to_string()
}

/// The genos-vmm binary and a hostd config booting the tiny guest `guest` for every
/// environment on a host of `vcpus` CPUs and 4 GiB; None (skipped, saying why) without KVM
/// or the binary.
pub fn tiny_guest_config(test: &str, guest: &str, vcpus: u32) -> Option<(PathBuf, String)> {
    if !kvm_available(test) {
        return None;
    }
    let vmm = vmm_bin(test)?;
    let toml = config_toml(&vmm, &build_guest(guest), vcpus, 4096);
    Some((vmm, toml))
}

/// A started orchestrator over `dir` booting the tiny guest `guest` on a host of `vcpus`
/// CPUs, its config text changed by `edit`; None (skipped, saying why) where the test cannot
/// run.
pub async fn tiny_guest_orchestrator(
    dir: &Path,
    guest: &str,
    vcpus: u32,
    edit: impl FnOnce(String) -> String,
) -> Option<Orchestrator> {
    let (_, toml) = tiny_guest_config(&test_name(), guest, vcpus)?;
    let o = orchestrator(dir, &edit(toml));
    o.start().await.unwrap();
    Some(o)
}

/// An orchestrator over state directory `dir` with the config text `toml`.
pub fn orchestrator(dir: &Path, toml: &str) -> Orchestrator {
    Orchestrator::new(hostd::config::Config::from_toml(toml).unwrap(), dir).unwrap()
}

/// Creates the headless environment `name` (`offline`: without network) and waits until it
/// is ready.
pub async fn create_ready(o: &Orchestrator, name: &str, offline: bool) -> EnvRecord {
    o.create(headless_spec(name, offline), "test").unwrap();
    wait_state(o, name, EnvState::Ready, 60).await
}

/// Waits until environment `name` has failed (for up to `secs`) and checks its reason.
pub async fn assert_fails_with(o: &Orchestrator, name: &str, secs: u64, reason: &str) -> EnvRecord {
    let failed = wait_state(o, name, EnvState::Failed, secs).await;
    assert_eq!(failed.reason.as_deref(), Some(reason), "{name}");
    failed
}

/// Kills the VMM of the ready environment `victim` from outside and checks that only it
/// fails, with the signal as its reason, while the ready `bystander` stays ready; destroys
/// both.
pub async fn assert_killed_vmm_fails_only_its_environment(
    o: &Orchestrator,
    victim: &EnvRecord,
    bystander: &str,
) {
    // SAFETY: kill(2) on the VMM pid the orchestrator reported; no memory is involved.
    unsafe { libc::kill(victim.vmm_pid.unwrap(), libc::SIGKILL) };

    assert_fails_with(o, &victim.name, 20, "genos-vmm was killed by signal 9").await;
    assert_eq!(o.show(bystander).unwrap().state, EnvState::Ready);
    o.destroy(&victim.name, "test").await.unwrap();
    o.destroy(bystander, "test").await.unwrap();
}

/// The actions of the newest `limit` audit entries, oldest first.
pub fn audit_actions(o: &Orchestrator, limit: i64) -> Vec<String> {
    o.audit_entries(limit)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect()
}

/// Polls `done` every 20 ms for up to `secs`; whether it became true.
pub async fn wait_until(secs: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The smallest headless spec, named `name`, as the composer makes it from a sentence (one
/// core, 128 MB, an hour); `offline` asks for no network.
pub fn headless_spec(name: &str, offline: bool) -> Spec {
    let sentence = if offline {
        "headless python, 1 core, 128 MB ram, no internet, for 1 hour"
    } else {
        "headless python, 1 core, 128 MB ram, for 1 hour"
    };
    match Composer::new(Catalog::embedded(), Default::default())
        .compose(sentence)
        .outcome
    {
        Outcome::Spec(s) => Spec {
            name: name.into(),
            ..*s
        },
        o => panic!("{sentence:?} did not compose: {o:?}"),
    }
}

/// Polls until environment `name` is in state `want`; fails the test after `secs`, naming the
/// state and reason it was left in.
pub async fn wait_state(o: &Orchestrator, name: &str, want: EnvState, secs: u64) -> EnvRecord {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let env = o.show(name).unwrap();
        if env.state == want {
            return env;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is {:?} ({:?}), wanted {want:?}",
            env.state,
            env.reason
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A genos-vmm process with a 320x240 display and input devices, killed when dropped.
pub struct DisplayVmm {
    pub child: std::process::Child,
    /// Its API socket.
    pub sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for DisplayVmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bin` with a 320x240 display and input devices on `kernel` (a tiny guest that
/// signals boot and halts); returns once its API answers with the VM running.
pub fn start_display_vmm(bin: &Path, kernel: &Path) -> DisplayVmm {
    use hostd::uds::VmmSocket;
    use hostd::vmm_client::VmmClient;
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let child = Command::new(bin)
        .arg("--kernel")
        .arg(kernel)
        .args([
            "--serial",
            "none",
            "--gpu",
            "320x240",
            "--input",
            "--api-sock",
        ])
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn genos-vmm");
    let mut vmm = DisplayVmm {
        child,
        sock,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let api = VmmClient::connect(&VmmSocket::unjailed(&vmm.sock), Duration::from_secs(10));
        if let Ok(mut api) = api {
            if api.describe().unwrap().state == vmm_api::VmState::Running {
                return vmm;
            }
        }
        if let Some(status) = vmm.child.try_wait().unwrap() {
            panic!("genos-vmm exited early with {status}");
        }
        assert!(Instant::now() < deadline, "genos-vmm API never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on 127.0.0.1 free when asked (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Debian's `etcd` server binary on PATH (`scripts/install-deps` installs `etcd-server`).
pub fn find_etcd() -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("etcd"))
        .find(|p| p.is_file())
}
