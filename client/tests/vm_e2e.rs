//! The product path end to end, with a real genos-vmm: hostd's orchestrator starts a
//! graphical environment (a tiny guest standing in for the OS, a virtio-gpu display and
//! the input devices), publishes it on the stream server when it is ready, mints a viewer
//! URL, and the client library connects to it, decodes the VM's screen and sends a key
//! that reaches the VM's virtio-input keyboard; a clipboard the VM has no agent for is
//! refused out loud, a watched environment is never idle, and the session is audited.
//! Needs /dev/kvm (skips with the reason).

#[path = "../../hostd/tests/common/mod.rs"]
mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{ConnectOptions, Event, Session};
use hostd::store::EnvState;
use hostd::stream::{Identity, ServerConfig, StreamServer, TokenKey};
use proto::stream::{ClientMessage, ErrorCode, InputEvent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_sees_a_graphical_environment_and_its_keys_reach_the_vm() {
    let test = "a_viewer_sees_a_graphical_environment";
    let Some((_, mut toml)) = common::tiny_guest_config(test, "ready", 4) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // This test is about the frame and input paths, not the jail (covered elsewhere).
    toml.push_str("[jail]\njailer = \"never\"\n");
    let orch = common::orchestrator(dir.path(), &toml);
    let stream_dir = dir.path().join("stream");
    let identity = Identity::load_or_create(&stream_dir).unwrap();
    let tokens = Arc::new(TokenKey::load_or_create(&stream_dir.join("token.key")).unwrap());
    let server = StreamServer::bind(ServerConfig::default(), &identity, tokens).unwrap();
    orch.set_stream_server(Arc::new(server)).unwrap();
    orch.start().await.unwrap();

    let name = match orch
        .create_from_text("firefox on a 640x480 screen with 256 MB and 1 core", "test")
        .await
        .unwrap()
    {
        hostd::orchestrator::CreateOutcome::Created(env) => env.name.clone(),
        hostd::orchestrator::CreateOutcome::Clarify(c) => panic!("composer asked: {c:?}"),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let e = orch.show(&name).unwrap();
        if e.state == EnvState::Ready {
            break e;
        }
        assert!(e.state != EnvState::Failed, "failed: {:?}", e.reason);
        assert!(
            Instant::now() < deadline,
            "{name} never became ready: {:?}",
            e.state
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let token = orch
        .mint_token(&name, "test", 3600, "view,input,clipboard")
        .unwrap();
    let url = token["url"]
        .as_str()
        .expect("token carries a genos:// URL")
        .to_string();
    // And the browser's link to the same stream, with the token in its fragment.
    let web = token["web_url"].as_str().expect("token carries a web link");
    assert!(
        web.starts_with("https://") && web.contains(&format!("#env={name}&token=")),
        "{web}"
    );

    let mut session = Session::connect(&url.parse().unwrap(), ConnectOptions::default())
        .await
        .unwrap();
    let frame = support::next_event(&mut session, 20, "frame", |e| match e {
        Event::Frame(f) => Some(f),
        _ => None,
    })
    .await;
    session.send_input(InputEvent::Key {
        code: 30,
        pressed: true,
    });
    session.send_input(InputEvent::Key {
        code: 30,
        pressed: false,
    });

    session.send(ClientMessage::Clipboard("hello".into()));
    let answer = "answer to the clipboard";
    let clipboard_refusal = support::next_event(&mut session, 10, answer, |e| match e {
        Event::Error { code, message } => Some((code, message)),
        _ => None,
    })
    .await;
    // Far past the idle limit: a watched environment is not reaped.
    let idle_s = ready
        .spec
        .lifetime
        .idle_s
        .expect("the composer sets an idle limit");
    orch.reap_at(hostd::store::now_s() + idle_s as i64 + 60)
        .await
        .unwrap();
    let watched_state = orch.show(&name).unwrap().state;

    let sock = ready.api_socket.clone().expect("api socket");
    let injected = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let metrics = hostd::uds::request(
                std::path::Path::new(&sock),
                "GET",
                "/metrics",
                None,
                Duration::from_secs(2),
            )
            .await
            .unwrap()
            .json();
            let n = metrics["devices"]["keyboard"]["device"]["injected"]
                .as_u64()
                .unwrap_or(0);
            if n > 0 || Instant::now() > deadline {
                break n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    session.close().await;
    let token_id = token["token_id"].as_str().unwrap().to_string();
    let audited = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let entries: Vec<String> = orch
                .audit_entries(100)
                .unwrap()
                .into_iter()
                .filter(|e| e.actor == format!("viewer:{token_id}") && e.target == name)
                .map(|e| format!("{} {}", e.action, e.detail))
                .collect();
            if entries.iter().any(|e| e.starts_with("viewer-leave")) || Instant::now() > deadline {
                break entries;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    orch.stop(&name, "test").await.unwrap();

    // The tiny guest has no agent: the refusal says so (before or after the link's first
    // attempt to reach it).
    assert_eq!(clipboard_refusal.0, ErrorCode::Unavailable);
    assert!(
        clipboard_refusal
            .1
            .starts_with("clipboard unavailable: the guest agent cannot be reached ("),
        "{}",
        clipboard_refusal.1
    );
    assert_eq!(
        watched_state,
        EnvState::Ready,
        "a watched environment is not idle"
    );
    let actions: Vec<&str> = audited
        .iter()
        .map(|e| e.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["viewer-join", "viewer-use", "viewer-use", "viewer-leave"],
        "{audited:#?}"
    );
    assert!(audited[1].contains("right=input") && audited[2].contains("right=clipboard"));
    assert!(
        audited[3].contains("input_events=2 clipboard_sets=1"),
        "{}",
        audited[3]
    );
    assert_eq!(
        (frame.width, frame.height),
        (640, 480),
        "the VM's display size"
    );
    assert!(frame.keyframe, "a viewer's first frame is a keyframe");
    assert!(
        injected >= 2,
        "key press and release reach the VM's keyboard: {injected} events"
    );
}
