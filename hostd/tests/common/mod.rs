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
    if let Some(p) = std::env::var_os("GENOS_VMM_BIN") {
        return Some(p.into());
    }
    // Test binaries live in <target>/<profile>/deps; the workspace's binaries one level up.
    let exe = std::env::current_exe().expect("test binary path");
    let p = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile directory")
        .join("genos-vmm");
    if p.exists() {
        Some(p)
    } else {
        testkit::skip(
            testkit::Need::Bins,
            format!(
                "{test}: {} not built (run `cargo build -p genos-vmm`)",
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
[reaper]
interval_s = 3600
[stream]
listen = "127.0.0.1:0"
"#,
        kernel.display(),
        vmm.display()
    )
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
