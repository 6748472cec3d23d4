//! Readiness through the guest agent, against a real genos-vmm: every environment gets a
//! virtio-vsock device, and with `[vmm] ready = "agent"` a guest that boots but has no agent
//! listening fails with that reason instead of being called ready. Needs /dev/kvm (skips
//! with the reason). The agent answering over vsock in a real Linux guest is
//! `agent_vsock_guest.rs`.

mod common;

use hostd::store::EnvState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booted_guest_without_an_agent_fails_saying_the_agent_did_not_answer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = common::tiny_guest_orchestrator(dir.path(), "ready", 4, |toml| {
        toml.replace("ready = \"boot\"", "ready = \"agent\"")
            .replace("boot_timeout_s = 120", "boot_timeout_s = 6")
    })
    .await
    else {
        return;
    };

    o.create(common::headless_spec("quiet", true), "test")
        .unwrap();
    let failed = common::wait_state(&o, "quiet", EnvState::Failed, 60).await;

    let reason = failed.reason.unwrap_or_default();
    // A nested kvm_pvm host (no stock guest user space runs there) says so instead.
    let expected = if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "this host's KVM is the nested kvm_pvm kind, where guest user space cannot make system \
         calls: the guest kernel booted but its agent never answers ("
    } else {
        "the guest agent did not answer within 6 s ("
    };
    assert!(
        reason.starts_with(expected) && reason.contains("vsock port 1024"),
        "{reason}"
    );
    let actions: Vec<String> = o
        .audit_entries(100)
        .unwrap()
        .into_iter()
        .filter(|e| e.target == "quiet")
        .map(|e| e.action)
        .collect();
    assert!(
        actions.iter().any(|a| a == "booted"),
        "the kernel's boot is recorded: {actions:?}"
    );
    assert!(!actions.iter().any(|a| a == "ready"), "{actions:?}");
    o.destroy("quiet", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_in_a_guest_without_an_agent_says_its_agent_cannot_be_reached() {
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = common::tiny_guest_orchestrator(dir.path(), "ready", 4, |toml| toml).await else {
        return;
    };
    common::create_ready(&o, "noagent", true).await;
    let exec = proto::agent::ExecRequest {
        argv: vec!["true".into()],
        ..Default::default()
    };

    let err = o
        .exec(
            "noagent",
            "test",
            exec,
            None,
            std::time::Duration::from_secs(5),
        )
        .await
        .unwrap_err();

    assert_eq!(
        hostd::error_chain(&err),
        "guest agent of noagent: vsock handshake: nothing in the guest accepted a connection \
         on vsock port 1024"
    );
    o.destroy("noagent", "test").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_without_an_agent_to_build_in_fails_saying_how_to_get_one() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = hostd::config::Config::from_toml(
        "[images]\nkernel = \"/nonexistent/vmlinux\"\nagent = \"/nonexistent/genos-agent\"\n\
         [capacity]\nvcpus = 4\nmemory_mib = 4096\n",
    )
    .unwrap();
    let o = hostd::orchestrator::Orchestrator::new(cfg, dir.path()).unwrap();
    o.start().await.unwrap();

    o.create(common::headless_spec("bare", true), "test")
        .unwrap();

    common::assert_fails_with(
        &o,
        "bare",
        20,
        "images.agent \"/nonexistent/genos-agent\" was not found: build the static agent with \
         scripts/build-agent and set images.agent to its path",
    )
    .await;
}
