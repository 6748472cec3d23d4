//! Orchestrator starting genos-vmm through genos-jailer (root and /dev/kvm): the VMM runs
//! as its slot's uid in its own namespaces and cgroup, stop leaves nothing behind, a killed
//! or seccomp-killed VMM fails only its environment with the reason, and `nat` environments
//! get a network namespace for as long as they run.

mod common;

use std::path::{Path, PathBuf};

use hostd::orchestrator::{pid_alive, Orchestrator};
use hostd::store::EnvState;
use proto::spec::NetworkMode;
use tempfile::TempDir;

const UID_BASE: u32 = 64000;

/// [`jailed_in`] a fresh state directory.
async fn jailed(extra_vmm_args: &[&str]) -> Option<(TempDir, Orchestrator)> {
    let dir = tempfile::tempdir().unwrap();
    let o = jailed_in(dir.path(), extra_vmm_args, "").await?;
    Some((dir, o))
}

/// A started orchestrator over `dir` that must jail (`jailer = "always"`), the VMM given
/// `extra_vmm_args` and the jail section `extra_jail_toml`; None (with the reason printed)
/// when this host cannot run the test.
async fn jailed_in(
    dir: &Path,
    extra_vmm_args: &[&str],
    extra_jail_toml: &str,
) -> Option<Orchestrator> {
    let test = common::test_name();
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(
            testkit::Need::Root,
            format!("{test}: the jailer needs root"),
        );
        return None;
    }
    let (vmm, toml) = common::tiny_guest_config(&test, "ready", 4)?;
    if !vmm.with_file_name("genos-jailer").exists() {
        testkit::skip(
            testkit::Need::Bins,
            format!("{test}: genos-jailer not built (run `cargo build -p genos-jailer`)"),
        );
        return None;
    }
    let extra: Vec<String> = extra_vmm_args.iter().map(|a| format!("{a:?}")).collect();
    let mut toml = toml.replace(
        "[vmm]\n",
        &format!("[vmm]\nextra_args = [{}]\n", extra.join(", ")),
    );
    toml.push_str(&format!(
        "[jail]\njailer = \"always\"\nuid_base = {UID_BASE}\ngid_base = {UID_BASE}\n{extra_jail_toml}"
    ));
    let o = common::orchestrator(dir, &toml);
    o.start().await.unwrap();
    Some(o)
}

fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn namespace(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The VMM's cgroup directories (one per v1 hierarchy, or the v2 one).
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            if !path.contains("/genos/") {
                return None;
            }
            let mount = if controllers.is_empty() {
                "/sys/fs/cgroup/unified".to_string()
            } else {
                format!("/sys/fs/cgroup/{}", controllers.split(',').next()?)
            };
            let root = if Path::new(&mount).exists() {
                mount
            } else {
                "/sys/fs/cgroup".into()
            };
            Some(PathBuf::from(root).join(path.trim_start_matches('/')))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vmm_runs_as_its_slot_uid_in_its_own_namespaces_and_stop_cleans_up() {
    let Some((dir, o)) = jailed(&[]).await else {
        return;
    };
    let env = common::create_ready(&o, "jail-life", true).await;
    let pid = env.vmm_pid.expect("pid recorded");

    assert_eq!(
        status_field(pid, "Uid").split_whitespace().next(),
        Some("64000")
    );
    assert_eq!(
        status_field(pid, "Gid").split_whitespace().next(),
        Some("64000")
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        assert_ne!(
            namespace(&pid.to_string(), ns),
            namespace("self", ns),
            "the VMM shares hostd's {ns} namespace"
        );
    }
    let cgroups = cgroup_dirs(pid);
    assert!(!cgroups.is_empty(), "the VMM is in no genos cgroup");
    assert!(
        cgroups.iter().all(|c| c.ends_with("genos/jail-life")),
        "{cgroups:?}"
    );
    // Limits from the spec: 128 MiB guest + 128 MiB VMM overhead, 128 tasks.
    let limit = |file: &str| {
        cgroups
            .iter()
            .find_map(|c| std::fs::read_to_string(c.join(file)).ok())
            .map(|v| v.trim().to_string())
    };
    let memory = limit("memory.limit_in_bytes").or_else(|| limit("memory.max"));
    assert_eq!(memory.as_deref(), Some("268435456"));
    assert_eq!(limit("pids.max").as_deref(), Some("128"));
    let jail_dir = dir.path().join("jail/genos-vmm/jail-life");
    let pid_file = jail_dir.join("genos-vmm.pid");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string()
    );
    let console = dir.path().join("envs/jail-life/console.log");
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&console).unwrap()),
        UID_BASE
    );
    // The API socket hostd asked for reaches the jailed VMM.
    assert!(env.api_socket.unwrap().ends_with("envs/jail-life/api.sock"));

    let stopped = o.stop("jail-life", "test").await.unwrap();
    assert_eq!(stopped.state, EnvState::Stopped);
    assert!(
        common::wait_until(10, || !pid_alive(pid)).await,
        "VMM {pid} still running"
    );
    let cleaned = common::wait_until(5, || {
        !pid_file.exists() && !cgroups.iter().any(|c| c.exists())
    });
    assert!(
        cleaned.await,
        "left behind: pid file {} / cgroups {cgroups:?}",
        pid_file.exists()
    );
    assert!(!dir.path().join("envs/jail-life/jail.json").exists());
    o.destroy("jail-life", "test").await.unwrap();
}

/// A desktop's VMM has a virtio-gpu device, whose shared framebuffer is set up inside the
/// jail, where there is no /proc: the environment boots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_desktop_vmm_sets_up_its_framebuffer_and_boots() {
    let Some((_dir, o)) = jailed(&[]).await else {
        return;
    };
    let mut spec = common::headless_spec("jail-desk", true);
    spec.desktop = "xfce".into();

    o.create(spec, "test").unwrap();
    let env = common::wait_state(&o, "jail-desk", EnvState::Ready, 60).await;

    // Before the fix the VMM exited creating the device ("cannot set up the shared
    // framebuffer"), so the environment failed instead.
    assert_eq!(env.state, EnvState::Ready, "{:?}", env.reason);
    assert!(pid_alive(env.vmm_pid.expect("pid recorded")));
    o.destroy("jail-desk", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jailed_vmm_killed_from_outside_fails_only_its_environment() {
    let Some((_dir, o)) = jailed(&[]).await else {
        return;
    };
    let victim = common::create_ready(&o, "jail-victim", true).await;
    let bystander = common::create_ready(&o, "jail-bystander", true).await;
    // Two environments, two slots, two uids.
    assert_ne!(
        status_field(victim.vmm_pid.unwrap(), "Uid"),
        status_field(bystander.vmm_pid.unwrap(), "Uid")
    );

    common::assert_killed_vmm_fails_only_its_environment(&o, &victim, "jail-bystander").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_killed_by_its_seccomp_filter_fails_with_the_seccomp_reason() {
    let Some((dir, o)) = jailed(&["--seccomp-selftest", "vcpu"]).await else {
        return;
    };
    o.create(common::headless_spec("jail-sigsys", true), "test")
        .unwrap();
    let reason =
        "genos-vmm was killed by its seccomp filter (a system call outside its allow-list)";
    common::assert_fails_with(&o, "jail-sigsys", 60, reason).await;
    assert!(!dir.path().join("envs/jail-sigsys/jail.json").exists());
    o.destroy("jail-sigsys", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nat_environment_has_a_network_namespace_only_while_it_runs() {
    let Some((_dir, o)) = jailed(&[]).await else {
        return;
    };
    let mut s = common::headless_spec("jail-nat", true);
    s.network.mode = NetworkMode::Nat;
    o.create(s, "test").unwrap();
    let env = common::wait_state(&o, "jail-nat", EnvState::Ready, 60).await;
    let pid = env.vmm_pid.unwrap();

    let netns = Path::new("/var/run/netns/genos-e0");
    assert!(netns.exists(), "no {}", netns.display());
    let joined = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
    let named = std::fs::metadata(netns).unwrap();
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&joined),
        std::os::unix::fs::MetadataExt::ino(&named),
        "the VMM is not in its environment's namespace"
    );
    let audit: Vec<String> = o
        .audit_entries(50)
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "network")
        .map(|e| e.detail)
        .collect();
    assert!(
        audit
            .iter()
            .any(|d| d.contains("genos-e0") && d.contains("guest 10.201.0.2")),
        "{audit:?}"
    );

    o.stop("jail-nat", "test").await.unwrap();
    assert!(!netns.exists(), "{} left after stop", netns.display());
    o.destroy("jail-nat", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jail_that_cannot_be_built_fails_with_the_jailers_reason() {
    let dir = tempfile::tempdir().unwrap();
    // A chroot base below a regular file cannot be created.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"").unwrap();
    let base = format!(
        "chroot_base = {:?}\n",
        blocker.join("jail").display().to_string()
    );
    let Some(o) = jailed_in(dir.path(), &[], &base).await else {
        return;
    };
    o.create(common::headless_spec("jail-broken", true), "test")
        .unwrap();
    let failed = common::wait_state(&o, "jail-broken", EnvState::Failed, 30).await;
    let reason = failed.reason.unwrap();
    assert!(
        reason.starts_with("the jail could not be set up: ") && reason.contains("not-a-dir"),
        "{reason}"
    );
    o.destroy("jail-broken", "test").await.unwrap();
}
