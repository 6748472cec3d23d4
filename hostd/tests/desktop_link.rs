//! hostd's desktop link against the real genos-agent (system part on a Unix socket, session
//! part in a real X server): a viewer's clipboard reaches the X CLIPBOARD selection, a copy
//! made in the X session reaches the viewers' side, and a viewer's resize becomes the X
//! screen's mode (Xorg with the dummy driver: Xvfb cannot change modes). The VM's own input
//! devices are a stand-in; the VM path is `vm_source.rs`'s. Needs Xorg's dummy driver,
//! xclip, xrandr and xterm (skips with the reason unless GENOS_REQUIRE covers tools) and the
//! workspace's genos-agent.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostd::agent::{AgentAddress, AgentClient};
use hostd::orchestrator::desktop::{self, DesktopEnds};
use hostd::orchestrator::OrchError;
use hostd::stream::source::{InputError, InputSink};
use proto::stream::InputEvent;
use testkit::x11::{Guard, XServer};

/// Everything here happens in well under this on an idle machine.
const LIMIT: Duration = Duration::from_secs(60);

/// The link's ends: the agent on its Unix socket, and the clipboards it hands the viewers.
struct Ends {
    agent: AgentAddress,
    to_viewers: Arc<Mutex<Vec<String>>>,
}

impl DesktopEnds for Ends {
    async fn agent(&self) -> Result<AgentClient, OrchError> {
        AgentClient::connect(&self.agent, Duration::from_secs(10))
            .await
            .map_err(|source| OrchError::Agent {
                name: "desk".into(),
                source,
            })
    }

    fn guest_clipboard(&self, text: &str) {
        self.to_viewers.lock().unwrap().push(text.to_owned());
    }
}

/// The VM's own devices: they take any input and any display size.
struct Vm;

impl InputSink for Vm {
    fn inject(&self, _events: &[InputEvent]) -> Result<(), InputError> {
        Ok(())
    }
    fn request_resize(&self, _width: u32, _height: u32) -> Result<(), InputError> {
        Ok(())
    }
}

fn tools(test: &str) -> bool {
    for tool in ["Xorg", "xclip", "xrandr", "xterm"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            testkit::skip(testkit::Need::Tools, format!("{test}: needs {tool}"));
            return false;
        }
    }
    let dummy = Path::new("/usr/lib/xorg/modules/drivers/dummy_drv.so").exists();
    if !dummy {
        testkit::skip(
            testkit::Need::Tools,
            format!("{test}: needs xserver-xorg-video-dummy"),
        );
    }
    dummy
}

/// Polls `check` every 100 ms until it holds, failing the test after [`LIMIT`].
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {LIMIT:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn xclip_out(x: &XServer) -> String {
    let out = Command::new("xclip")
        .args(["-selection", "clipboard", "-o"])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewers_clipboard_and_size_reach_the_x_session_and_its_copies_come_back() {
    const TEST: &str = "viewers_clipboard_and_size_reach_the_x_session";
    if !tools(TEST) {
        return;
    }
    let Some(agent) = common::workspace_bin(TEST, "genos-agent", "GENOS_AGENT_BIN") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let x = XServer::xorg_dummy(dir.path());
    let (socket, session_socket) = (dir.path().join("agent.sock"), dir.path().join("s.sock"));
    let systemctl = dir.path().join("systemctl");
    std::fs::write(&systemctl, "#!/bin/sh\necho running\n").unwrap();
    std::fs::set_permissions(
        &systemctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let spawn = |cmd: &mut Command| Guard(cmd.stdin(Stdio::null()).spawn().unwrap());
    let _system = spawn(
        Command::new(&agent)
            .args(["--no-vsock", "--unix"])
            .arg(&socket)
            .arg("--session-socket")
            .arg(&session_socket)
            .arg("--systemctl")
            .arg(&systemctl),
    );
    let _session = spawn(
        Command::new(&agent)
            .args(["session", "--socket"])
            .arg(&session_socket)
            .env("DISPLAY", &x.display),
    );
    // The session's first window: the agent reports `session` once it is mapped.
    let _window = spawn(
        Command::new("xterm")
            .env("DISPLAY", &x.display)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let to_viewers = Arc::new(Mutex::new(Vec::new()));
    let ends = Ends {
        agent: AgentAddress::Unix(socket),
        to_viewers: to_viewers.clone(),
    };
    let (input, link) = desktop::link(ends, Box::new(Vm));
    let served = tokio::spawn(link.run());

    // A viewer's paste: refused (saying why) until the session runs, then in X.
    eventually("the session", || {
        input.set_clipboard("from the viewer ✓").is_ok()
    })
    .await;
    eventually("the viewer's text in the X clipboard", || {
        xclip_out(&x) == "from the viewer ✓"
    })
    .await;
    // A copy in the session.
    let _owner = spawn(
        Command::new("sh")
            .args([
                "-c",
                "printf 'copied in the session' | xclip -selection clipboard -i -loops 0 -quiet",
            ])
            .env("DISPLAY", &x.display)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    eventually("the session's copy at the viewers", || {
        to_viewers
            .lock()
            .unwrap()
            .iter()
            .any(|t| t == "copied in the session")
    })
    .await;
    // A viewer's window size.
    input.request_resize(1366, 768).unwrap();
    eventually("the X screen at 1366x768", || {
        x.xrandr_current().contains("current 1366 x 768")
    })
    .await;

    assert!(
        !to_viewers
            .lock()
            .unwrap()
            .iter()
            .any(|t| t == "from the viewer ✓"),
        "the viewer's own paste came back as news: {:?}",
        to_viewers.lock().unwrap()
    );
    drop(input);
    tokio::time::timeout(LIMIT, served)
        .await
        .expect("the link ends when its sink is dropped")
        .unwrap();
}
