//! The orchestrator against a VMM that does what a compromised one could (real genos-vmm,
//! tiny guests, /dev/kvm): a jailed VMM swapping its API socket for a link to another host
//! socket gets no connection from hostd, and a restarted hostd whose recorded VMM pid now
//! belongs to another process neither adopts nor signals that process.

mod common;

use std::os::unix::net::UnixListener;
use std::path::Path;

use hostd::config::Config;
use hostd::orchestrator::{pid_alive, Orchestrator};
use hostd::store::{EnvState, Store};

/// An orchestrator running the `ready` guest; `jail` is the `[jail] jailer` mode.
fn orchestrator(test: &str, dir: &Path, jail: &str) -> Option<Orchestrator> {
    if !common::kvm_available(test) {
        return None;
    }
    let vmm = common::vmm_bin(test)?;
    let kernel = common::build_guest("ready");
    let mut toml = common::config_toml(&vmm, &kernel, 4, 4096);
    toml.push_str(&format!("[jail]\njailer = \"{jail}\"\n"));
    Some(Orchestrator::new(Config::from_toml(&toml).unwrap(), dir).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_vmm_cannot_point_hostd_at_another_host_socket() {
    let test = "a_jailed_vmm_cannot_point_hostd_at_another_host_socket";
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(
            testkit::Need::Root,
            format!("{test}: the jailer needs root"),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(test, dir.path(), "always") else {
        return;
    };
    o.start().await.unwrap();
    o.create(common::headless_spec("swapper", true), "test")
        .unwrap();
    common::wait_state(&o, "swapper", EnvState::Ready, 60).await;
    let pid = o.vmm_pid("swapper").expect("supervised");

    // What the VMM's uid can do in its own run/ directory: move the real socket aside and
    // put a link to some other host socket in its place.
    let decoy_path = dir.path().join("host-service.sock");
    let decoy = UnixListener::bind(&decoy_path).unwrap();
    decoy.set_nonblocking(true).unwrap();
    let run = dir.path().join("jail/genos-vmm/swapper/run");
    std::fs::rename(run.join("api.sock"), run.join("moved.sock")).unwrap();
    std::os::unix::fs::symlink(&decoy_path, run.join("api.sock")).unwrap();

    // Stop talks to the VMM (PUT /vm/actions) and, refused, kills it through its pidfd.
    let stopped = o.stop("swapper", "test").await.unwrap();
    assert_eq!(stopped.state, EnvState::Stopped);
    assert!(!pid_alive(pid), "VMM still running after stop");
    assert_eq!(
        decoy.accept().map(drop).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "hostd connected to the socket the link pointed at"
    );
}

#[test]
fn a_restarted_hostd_never_adopts_or_signals_a_process_that_took_the_vmm_pid() {
    let test = "a_restarted_hostd_never_adopts_or_signals_a_process_that_took_the_vmm_pid";
    let dir = tempfile::tempdir().unwrap();
    let Some(first) = orchestrator(test, dir.path(), "auto") else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (vmm_pid, sock) = rt.block_on(async {
        first.start().await.unwrap();
        first
            .create(common::headless_spec("reused", true), "test")
            .unwrap();
        common::wait_state(&first, "reused", EnvState::Ready, 60).await;
        let env = first.show("reused").unwrap();
        (env.vmm_pid.unwrap(), env.api_socket.unwrap())
    });
    drop(rt);
    drop(first);

    // The recorded pid now names another process (as after the VMM died and its pid was
    // reused), while something still answers on the environment's socket.
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let other = bystander.id() as i32;
    Store::open(dir.path())
        .unwrap()
        .set_vmm("reused", Some(other), Some(&sock))
        .unwrap();
    let record = dir.path().join("envs/reused/vmm.json");
    if let Ok(text) = std::fs::read(&record) {
        let mut v: serde_json::Value = serde_json::from_slice(&text).unwrap();
        v["process"]["pid"] = other.into();
        std::fs::write(&record, v.to_string()).unwrap();
    }

    let second = orchestrator(test, dir.path(), "auto").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (state, reason, stop) = rt.block_on(async {
        second.start().await.unwrap();
        let env = second.show("reused").unwrap();
        // Were it adopted, stopping would end in a SIGKILL to the recorded pid.
        let stop = second.stop("reused", "test").await.map(|e| e.state);
        (env.state, env.reason, stop)
    });
    let survived = bystander.try_wait().unwrap().is_none();
    // Clean up what the test started before asserting.
    let _ = bystander.kill();
    let _ = bystander.wait();
    // SAFETY: kill(2) on the VMM this test's orchestrator started; no memory is involved.
    unsafe { libc::kill(vmm_pid, libc::SIGKILL) };

    assert!(
        survived,
        "hostd signalled the process that took the VMM's pid"
    );
    assert_eq!(
        state,
        EnvState::Failed,
        "adopted a process it did not start"
    );
    assert_eq!(
        reason.as_deref(),
        Some("its genos-vmm was gone when hostd restarted")
    );
    assert!(
        stop.is_err(),
        "a failed environment cannot be stopped: {stop:?}"
    );
}
