//! Orchestrator against a real genos-vmm running tiny guests: lifecycle, failures,
//! supervision, admission, reaping, and re-adoption after a hostd restart.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use hostd::config::Config;
use hostd::orchestrator::{pid_alive, OrchError, Orchestrator};
use hostd::store::EnvState;

fn orchestrator(dir: &Path, guest: &str, vcpus: u32) -> Option<Orchestrator> {
    let test = std::thread::current().name().unwrap_or("test").to_string();
    if !common::kvm_available(&test) {
        return None;
    }
    let vmm = common::vmm_bin(&test)?;
    let kernel = common::build_guest(guest);
    let cfg = Config::from_toml(&common::config_toml(&vmm, &kernel, vcpus, 4096)).unwrap();
    Some(Orchestrator::new(cfg, dir).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_goes_requested_to_ready_to_stopped_to_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(dir.path(), "ready", 4) else {
        return;
    };
    o.start().await.unwrap();
    let env = o
        .create(common::headless_spec("life", false), "test")
        .unwrap();
    assert_eq!(env.state, EnvState::Requested);
    let ready = common::wait_state(&o, "life", EnvState::Ready, 60).await;
    let pid = ready.vmm_pid.expect("pid recorded");
    assert!(pid_alive(pid));

    // Stand-in for the root disk genos-image would have built: ephemeral, so stop drops it.
    let disk = dir.path().join("envs/life/rootfs.ext4");
    std::fs::write(&disk, b"disk").unwrap();
    let stopped = o.stop("life", "test").await.unwrap();
    assert!(!disk.exists(), "ephemeral disk kept after stop");
    assert_eq!(stopped.state, EnvState::Stopped);
    assert!(!pid_alive(pid), "VMM still running after stop");

    let destroyed = o.destroy("life", "test").await.unwrap();
    assert_eq!(destroyed.state, EnvState::Destroyed);
    assert!(!dir.path().join("envs/life").exists());
    let actions: Vec<String> = o
        .audit_entries(100)
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .collect();
    for a in ["create", "spawn", "ready", "stop", "destroy"] {
        assert!(
            actions.contains(&a.to_string()),
            "audit lacks {a}: {actions:?}"
        );
    }
    assert!(o.verify_audit().unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_from_outside_fails_only_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(dir.path(), "ready", 4) else {
        return;
    };
    o.start().await.unwrap();
    o.create(common::headless_spec("victim", false), "test")
        .unwrap();
    o.create(common::headless_spec("bystander", false), "test")
        .unwrap();
    let victim = common::wait_state(&o, "victim", EnvState::Ready, 60).await;
    common::wait_state(&o, "bystander", EnvState::Ready, 60).await;

    // SAFETY: kill(2) on a pid we spawned; no memory is involved.
    unsafe { libc::kill(victim.vmm_pid.unwrap(), libc::SIGKILL) };

    let failed = common::wait_state(&o, "victim", EnvState::Failed, 20).await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("genos-vmm was killed by signal 9")
    );
    assert_eq!(o.show("bystander").unwrap().state, EnvState::Ready);
    o.destroy("victim", "test").await.unwrap();
    o.destroy("bystander", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_reboots_during_boot_fails_with_the_vmm_reason() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(dir.path(), "reboot", 4) else {
        return;
    };
    o.start().await.unwrap();
    o.create(common::headless_spec("flaky", false), "test")
        .unwrap();
    let failed = common::wait_state(&o, "flaky", EnvState::Failed, 60).await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("genos-vmm exited with status 3 (the guest rebooted)")
    );
    assert_eq!(
        o.destroy("flaky", "test").await.unwrap().state,
        EnvState::Destroyed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_what_exceeds_capacity_while_others_run() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(dir.path(), "ready", 1) else {
        return;
    };
    o.start().await.unwrap();
    o.create(common::headless_spec("first", false), "test")
        .unwrap();
    common::wait_state(&o, "first", EnvState::Ready, 60).await;
    let err = o
        .create(common::headless_spec("second", false), "test")
        .unwrap_err();
    assert!(matches!(err, OrchError::Admission(_)), "{err}");
    assert_eq!(
        err.to_string(),
        "not enough CPU: second asks for 1 vCPUs, 1 of 1 are in use (1 host CPUs x overcommit 1)"
    );
    assert!(
        o.show("second").is_err(),
        "a refused environment must not be stored"
    );
    // Once the first is stopped its vCPU is free again.
    o.stop("first", "test").await.unwrap();
    o.create(common::headless_spec("second", false), "test")
        .unwrap();
    common::wait_state(&o, "second", EnvState::Ready, 60).await;
    o.destroy("second", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environment_is_stopped_and_expired_one_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = orchestrator(dir.path(), "ready", 4) else {
        return;
    };
    o.start().await.unwrap();
    let mut s = common::headless_spec("idler", false);
    s.lifetime.ttl_s = Some(7200);
    s.lifetime.idle_s = Some(600);
    o.create(s, "test").unwrap();
    let env = common::wait_state(&o, "idler", EnvState::Ready, 60).await;
    let idle = env.spec.lifetime.idle_s.unwrap() as i64;
    let ttl = env.spec.lifetime.ttl_s.unwrap() as i64;

    o.reap_at(env.last_active_at + idle - 1).await.unwrap();
    assert_eq!(o.show("idler").unwrap().state, EnvState::Ready);
    o.reap_at(env.last_active_at + idle).await.unwrap();
    assert_eq!(o.show("idler").unwrap().state, EnvState::Stopped);
    o.reap_at(env.created_at + ttl).await.unwrap();
    assert_eq!(o.show("idler").unwrap().state, EnvState::Destroyed);
}

#[test]
fn restarted_hostd_readopts_a_running_vmm() {
    let dir = tempfile::tempdir().unwrap();
    let Some(first) = orchestrator(dir.path(), "ready", 4) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pid = rt.block_on(async {
        first.start().await.unwrap();
        first
            .create(common::headless_spec("survivor", false), "test")
            .unwrap();
        common::wait_state(&first, "survivor", EnvState::Ready, 60)
            .await
            .vmm_pid
            .unwrap()
    });
    // hostd goes away: its runtime and every task with it; the VMM keeps running.
    drop(rt);
    drop(first);
    assert!(pid_alive(pid));

    let second = orchestrator(dir.path(), "ready", 4).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        second.start().await.unwrap();
        let env = second.show("survivor").unwrap();
        assert_eq!(env.state, EnvState::Ready);
        assert_eq!(second.vmm_pid("survivor"), Some(pid), "not re-adopted");
        let actions: Vec<String> = second
            .audit_entries(10)
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert!(actions.contains(&"adopt".to_string()));
        // The adopted VMM is still controlled: stop goes through its API socket.
        assert_eq!(
            second.stop("survivor", "test").await.unwrap().state,
            EnvState::Stopped
        );
        assert!(!pid_alive(pid));
    });
}

#[test]
fn restarted_hostd_fails_environments_whose_vmm_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let Some(first) = orchestrator(dir.path(), "ready", 4) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pid = rt.block_on(async {
        first.start().await.unwrap();
        first
            .create(common::headless_spec("gone", false), "test")
            .unwrap();
        common::wait_state(&first, "gone", EnvState::Ready, 60)
            .await
            .vmm_pid
            .unwrap()
    });
    drop(rt);
    drop(first);
    // SAFETY: kill(2) on a pid we spawned; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }

    let second = orchestrator(dir.path(), "ready", 4).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        second.start().await.unwrap();
        let env = second.show("gone").unwrap();
        assert_eq!(env.state, EnvState::Failed);
        assert_eq!(
            env.reason.as_deref(),
            Some("its genos-vmm was gone when hostd restarted")
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_builder_fails_the_build_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Config::from_toml(
        "[images]\nbuilder = \"/nonexistent/genos-image\"\nkernel = \"\"\n[capacity]\nvcpus = 4\nmemory_mib = 4096\n",
    )
    .unwrap();
    let o = Orchestrator::new(cfg, dir.path()).unwrap();
    o.start().await.unwrap();
    o.create(common::headless_spec("nobuild", false), "test")
        .unwrap();
    let env = common::wait_state(&o, "nobuild", EnvState::Failed, 20).await;
    assert!(
        env.reason
            .as_deref()
            .unwrap()
            .starts_with("cannot run /nonexistent/genos-image"),
        "{:?}",
        env.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_never_finishes_booting_fails_after_the_boot_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let test = "guest_that_never_finishes_booting_fails_after_the_boot_timeout";
    if !common::kvm_available(test) {
        return;
    }
    let Some(vmm) = common::vmm_bin(test) else {
        return;
    };
    let toml = common::config_toml(&vmm, &common::build_guest("silent"), 4, 4096)
        .replace("boot_timeout_s = 120", "boot_timeout_s = 1");
    let o = Orchestrator::new(Config::from_toml(&toml).unwrap(), dir.path()).unwrap();
    o.start().await.unwrap();
    o.create(common::headless_spec("stuck", false), "test")
        .unwrap();
    let booting = common::wait_state(&o, "stuck", EnvState::Booting, 20).await;
    let failed = common::wait_state(&o, "stuck", EnvState::Failed, 20).await;
    assert_eq!(
        failed.reason.as_deref(),
        Some("the guest did not finish booting within 1 s")
    );
    // The VMM of a failed boot is not left running.
    let pid = booting.vmm_pid.or(failed.vmm_pid);
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) {
            assert!(Instant::now() < deadline, "VMM {pid} still running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Nor its jail (slot, network namespace) when it ran jailed.
    let record = dir.path().join("envs/stuck/jail.json");
    let deadline = Instant::now() + Duration::from_secs(5);
    while record.exists() {
        assert!(
            Instant::now() < deadline,
            "jail of a failed boot not released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjailed_environment_is_configured_over_the_api_and_stops() {
    let test = "unjailed_environment_is_configured_over_the_api_and_stops";
    if !common::kvm_available(test) {
        return;
    }
    let Some(vmm) = common::vmm_bin(test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut toml = common::config_toml(&vmm, &common::build_guest("ready"), 4, 4096);
    toml.push_str("[jail]\njailer = \"never\"\n");
    let o = Orchestrator::new(Config::from_toml(&toml).unwrap(), dir.path()).unwrap();
    o.start().await.unwrap();
    o.create(common::headless_spec("plain", false), "test")
        .unwrap();
    let ready = common::wait_state(&o, "plain", EnvState::Ready, 60).await;
    let pid = ready.vmm_pid.unwrap();
    // Unjailed: the VMM is hostd's own child, shares its uid, and no jail is recorded.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ppid = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .unwrap();
    assert_eq!(ppid.trim(), std::process::id().to_string());
    assert!(!dir.path().join("envs/plain/jail.json").exists());
    assert_eq!(
        o.stop("plain", "test").await.unwrap().state,
        EnvState::Stopped
    );
    assert!(!pid_alive(pid));
}
