//! `hostd::vm_source` against a real genos-vmm (`--gpu 320x240 --input`) running a tiny guest
//! that never drives the display: the framebuffer arrives over the control API and reads as
//! one blank frame of the configured size, input batches reach the VMM's devices through the raw input channel, and the
//! stream server takes the VM as an environment.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use encoder::{FrameSource, PixelFormat, Rect};
use hostd::uds::VmmSocket;
use hostd::vm_source::{self, VmFramebufferSource};
use hostd::vmm_client::VmmClient;
use proto::stream::{Button, InputEvent};
use vmm_api::input::evdev;
use vmm_api::{InputBatch, InputDevice, InputEvent as EvdevEvent, Request};

/// Each API request's deadline.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Starts genos-vmm with a 320x240 display and input devices on a guest that signals boot
/// and halts, or skips the test, saying why.
fn key(code: u16, pressed: bool) -> InputEvent {
    InputEvent::Key { code, pressed }
}

fn start_vmm() -> Option<common::DisplayVmm> {
    let test = std::thread::current().name().unwrap_or("test").to_string();
    if !common::kvm_available(&test) {
        return None;
    }
    let bin = common::vmm_bin(&test)?;
    Some(common::start_display_vmm(
        &bin,
        &common::build_guest("ready"),
    ))
}

/// `devices.<device>.device.injected` from the VMM's metrics.
fn injected(sock: &Path, device: &str) -> u64 {
    let m = VmmClient::connect(&VmmSocket::unjailed(sock), TIMEOUT)
        .unwrap()
        .metrics()
        .unwrap();
    m.devices[device]["device"]["injected"]
        .as_u64()
        .unwrap_or_else(|| panic!("no {device}.injected in metrics: {m:?}"))
}

fn wait_injected(sock: &Path, device: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = injected(sock, device);
        if n == want {
            return;
        }
        assert!(n < want, "{device}: {n} events injected, expected {want}");
        assert!(
            Instant::now() < deadline,
            "{device}: {n} events injected, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn framebuffer_of_an_undriven_display_is_one_blank_frame_then_waits_for_a_flush() {
    let Some(vmm) = start_vmm() else { return };

    let mut source = VmFramebufferSource::connect(&VmmSocket::unjailed(&vmm.sock)).unwrap();

    assert_eq!(source.size(), (320, 240));
    let first = source
        .next_frame(Instant::now() + Duration::from_secs(1))
        .unwrap()
        .expect("a first frame at once");
    assert_eq!((first.frame.width, first.frame.height), (320, 240));
    assert_eq!(first.frame.format, PixelFormat::Bgrx);
    assert!(first.frame.stride >= 320 * 4);
    first.frame.validate().unwrap();
    assert!(first.frame.data.iter().all(|&b| b == 0), "blank frame");
    assert_eq!(first.damage, vec![Rect::new(0, 0, 320, 240)]);

    let start = Instant::now();
    let wait = Duration::from_millis(300);
    let second = source.next_frame(start + wait).unwrap();
    assert!(second.is_none(), "no flush, yet a frame arrived");
    assert!(start.elapsed() >= wait - Duration::from_millis(5));
}

#[test]
fn input_sink_delivers_keyboard_and_pointer_batches_to_the_vmm() {
    let Some(vmm) = start_vmm() else { return };
    let env = vm_source::environment(&VmmSocket::unjailed(&vmm.sock)).unwrap();

    env.input.inject(&[key(30, true), key(30, false)]).unwrap();
    env.input
        .inject(&[
            InputEvent::PointerMove { x: 160, y: 120 },
            InputEvent::PointerButton {
                button: Button::Left,
                pressed: true,
            },
            InputEvent::PointerButton {
                button: Button::Left,
                pressed: false,
            },
        ])
        .unwrap();

    // Key down + SYN, key up + SYN.
    wait_injected(&vmm.sock, "keyboard", 4);
    // ABS_X, ABS_Y, SYN; BTN_LEFT 1, SYN; BTN_LEFT 0, SYN.
    wait_injected(&vmm.sock, "tablet", 7);
    // Both batches came through the raw channel, not PUT /input.
    let channel = input_socket_metrics(&vmm.sock);
    assert_eq!(channel["messages"], 2, "{channel}");
    assert_eq!(channel["records"], 11, "{channel}");
}

/// The VMM's `input_socket` counters.
fn input_socket_metrics(sock: &Path) -> serde_json::Value {
    let m = VmmClient::connect(&VmmSocket::unjailed(sock), TIMEOUT)
        .unwrap()
        .metrics()
        .unwrap();
    m.devices["input_socket"].clone()
}

#[test]
fn input_sink_fetches_a_new_channel_when_another_client_took_the_vmms() {
    let Some(vmm) = start_vmm() else { return };
    let env = vm_source::environment(&VmmSocket::unjailed(&vmm.sock)).unwrap();
    let (press, release) = ([key(30, true)], [key(30, false)]);
    env.input.inject(&press).unwrap();
    wait_injected(&vmm.sock, "keyboard", 2);

    // Another client asks for the channel: the VMM replaces the sink's.
    let _theirs = VmmClient::connect(&VmmSocket::unjailed(&vmm.sock), TIMEOUT)
        .unwrap()
        .input_socket()
        .unwrap();
    let refused = env.input.inject(&release).unwrap_err().to_string();

    assert!(refused.contains("input channel"), "{refused}");
    // The worker fetches a new channel; input flows again without a new environment.
    let deadline = Instant::now() + TIMEOUT;
    while env.input.inject(&release).is_err() {
        assert!(Instant::now() < deadline, "no new input channel");
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_injected(&vmm.sock, "keyboard", 4);
    assert_eq!(input_socket_metrics(&vmm.sock)["handoffs"], 3);
}

#[test]
fn vmm_accepts_a_translated_batch_and_refuses_one_without_syn_report() {
    let Some(vmm) = start_vmm() else { return };
    let mut api = VmmClient::connect(&VmmSocket::unjailed(&vmm.sock), TIMEOUT).unwrap();
    let key = |value| EvdevEvent::new(evdev::EV_KEY, 57, value);
    let syn = EvdevEvent::SYN_REPORT;
    let keyboard = |events: &[EvdevEvent]| {
        Request::Input(InputBatch {
            device: InputDevice::Keyboard,
            events: events.to_vec(),
        })
    };

    api.send(&keyboard(&[key(1), syn, key(0), syn])).unwrap();
    let err = api.send(&keyboard(&[key(1)])).unwrap_err().to_string();

    assert!(err.starts_with("VMM answered PUT /input with 400"), "{err}");
    // The refused batch did not count, and the connection is still usable.
    assert_eq!(injected(&vmm.sock, "keyboard"), 4);
    api.describe().unwrap();
}

#[test]
fn stream_server_streams_a_vm_as_an_environment() {
    let Some(vmm) = start_vmm() else { return };
    let state = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let identity = hostd::stream::Identity::load_or_create(state.path()).unwrap();
    let tokens = Arc::new(hostd::stream::TokenKey::generate().unwrap());
    let cfg = hostd::stream::ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = hostd::stream::StreamServer::bind(cfg, &identity, tokens.clone()).unwrap();

    let env = hostd::stream::EnvRef::new("vm1", 1);
    server
        .add_environment(
            &env,
            vm_source::environment(&VmmSocket::unjailed(&vmm.sock)).unwrap(),
            30.0,
        )
        .unwrap();
    let token = tokens
        .issue(&env, "view,input".parse().unwrap(), Duration::from_secs(60))
        .unwrap();
    let url = server.connect_url("vm1", &token).unwrap();

    assert!(url.starts_with("genos://127.0.0.1:"), "{url}");
    assert!(url.contains("/vm1?token="), "{url}");
    let stats = server.env_stats("vm1").expect("environment registered");
    assert_eq!(stats.viewers, 0);
    server.remove_environment("vm1");
    assert!(server.env_stats("vm1").is_none());
    server.shutdown();
}
