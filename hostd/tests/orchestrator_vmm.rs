//! Orchestrator against a real genos-vmm running tiny guests: lifecycle, failures,
//! supervision, admission, reaping, and re-adoption after a hostd restart.

mod common;

use std::path::Path;

use hostd::config::Config;
use hostd::orchestrator::{pid_alive, OrchError, Orchestrator};
use hostd::store::EnvState;
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// A started orchestrator in a fresh state directory booting the tiny guest `guest` on a
/// host of `vcpus` CPUs, its config text changed by `edit`; None (skipped) where the test
/// cannot run.
async fn started_with(
    guest: &str,
    vcpus: u32,
    edit: impl FnOnce(String) -> String,
) -> Option<(TempDir, Orchestrator)> {
    let dir = tempfile::tempdir().unwrap();
    let o = common::tiny_guest_orchestrator(dir.path(), guest, vcpus, edit).await?;
    Some((dir, o))
}

async fn started(guest: &str, vcpus: u32) -> Option<(TempDir, Orchestrator)> {
    started_with(guest, vcpus, |toml| toml).await
}

/// Creates the environment `name` without waiting for it.
fn create(o: &Orchestrator, name: &str) {
    o.create(common::headless_spec(name, false), "test")
        .unwrap();
}

/// Runs a hostd over `dir` until environment `name` is ready, then lets it go away (its
/// runtime and every task with it) while the VMM keeps running; the VMM's pid.
fn hostd_gone_after_ready(dir: &Path, name: &str) -> Option<i32> {
    let rt = Runtime::new().unwrap();
    let pid = rt.block_on(async {
        let first = common::tiny_guest_orchestrator(dir, "ready", 4, |toml| toml).await?;
        let ready = common::create_ready(&first, name, false).await;
        Some(ready.vmm_pid.expect("pid recorded"))
    });
    drop(rt);
    pid
}

/// A new hostd over the same `dir`, started on `rt`.
fn restarted_hostd(rt: &Runtime, dir: &Path) -> Orchestrator {
    rt.block_on(common::tiny_guest_orchestrator(dir, "ready", 4, |toml| {
        toml
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_goes_requested_to_ready_to_stopped_to_destroyed() {
    let Some((dir, o)) = started("ready", 4).await else {
        return;
    };
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
    let actions = common::audit_actions(&o, 100);
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
    let Some((_dir, o)) = started("ready", 4).await else {
        return;
    };
    create(&o, "victim");
    create(&o, "bystander");
    let victim = common::wait_state(&o, "victim", EnvState::Ready, 60).await;
    common::wait_state(&o, "bystander", EnvState::Ready, 60).await;

    common::assert_killed_vmm_fails_only_its_environment(&o, &victim, "bystander").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_that_reboots_during_boot_fails_with_the_vmm_reason() {
    let Some((_dir, o)) = started("reboot", 4).await else {
        return;
    };
    create(&o, "flaky");
    let reason = "genos-vmm exited with status 3 (the guest rebooted)";
    common::assert_fails_with(&o, "flaky", 60, reason).await;
    assert_eq!(
        o.destroy("flaky", "test").await.unwrap().state,
        EnvState::Destroyed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_what_exceeds_capacity_while_others_run() {
    let Some((_dir, o)) = started("ready", 1).await else {
        return;
    };
    common::create_ready(&o, "first", false).await;
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
    common::create_ready(&o, "second", false).await;
    o.destroy("second", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_environment_is_stopped_and_expired_one_destroyed() {
    let Some((_dir, o)) = started("ready", 4).await else {
        return;
    };
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
    let Some(pid) = hostd_gone_after_ready(dir.path(), "survivor") else {
        return;
    };
    assert!(pid_alive(pid));

    let rt = Runtime::new().unwrap();
    let second = restarted_hostd(&rt, dir.path());
    let env = second.show("survivor").unwrap();
    assert_eq!(env.state, EnvState::Ready);
    assert_eq!(second.vmm_pid("survivor"), Some(pid), "not re-adopted");
    assert!(common::audit_actions(&second, 10).contains(&"adopt".to_string()));
    // The adopted VMM is still controlled: stop goes through its API socket.
    let stopped = rt.block_on(second.stop("survivor", "test")).unwrap();
    assert_eq!(stopped.state, EnvState::Stopped);
    assert!(!pid_alive(pid));
}

#[test]
fn restarted_hostd_fails_environments_whose_vmm_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pid) = hostd_gone_after_ready(dir.path(), "gone") else {
        return;
    };
    // SAFETY: kill(2) on a pid we spawned; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let rt = Runtime::new().unwrap();
    rt.block_on(common::wait_until(5, || !pid_alive(pid)));

    let second = restarted_hostd(&rt, dir.path());
    let env = second.show("gone").unwrap();
    assert_eq!(env.state, EnvState::Failed);
    assert_eq!(
        env.reason.as_deref(),
        Some("its genos-vmm was gone when hostd restarted")
    );
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
    create(&o, "nobuild");
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
    let Some((dir, o)) = started_with("silent", 4, |toml| {
        toml.replace("boot_timeout_s = 120", "boot_timeout_s = 1")
    })
    .await
    else {
        return;
    };
    create(&o, "stuck");
    let booting = common::wait_state(&o, "stuck", EnvState::Booting, 20).await;
    let reason = "the guest kernel did not reach its initramfs within 1 s";
    let failed = common::assert_fails_with(&o, "stuck", 20, reason).await;
    // The VMM of a failed boot is not left running.
    if let Some(pid) = booting.vmm_pid.or(failed.vmm_pid) {
        assert!(
            common::wait_until(5, || !pid_alive(pid)).await,
            "VMM {pid} still running"
        );
    }
    // Nor its jail (slot, network namespace) when it ran jailed.
    let record = dir.path().join("envs/stuck/jail.json");
    assert!(
        common::wait_until(5, || !record.exists()).await,
        "jail of a failed boot not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unjailed_environment_is_configured_over_the_api_and_stops() {
    let Some((dir, o)) =
        started_with("ready", 4, |toml| toml + "[jail]\njailer = \"never\"\n").await
    else {
        return;
    };
    let ready = common::create_ready(&o, "plain", false).await;
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
