//! genos-agent's X11 side against real X servers: the system agent (a host process over a
//! Unix socket, driven through `HostSession` as hostd drives it) with its session part
//! (`genos-agent session`) inside an Xvfb display, and RandR modes on Xorg with the dummy
//! video driver (Xvfb cannot change modes). Needs the tools `scripts/install-deps`
//! installs; without them each test skips, saying why, unless GENOS_REQUIRE covers `tools`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use proto::agent::session::HostSession;
use proto::agent::{
    AgentMessage, ClipboardContent, ErrorCode, Features, Frame, HostMessage, RequestId, Stage,
    MIME_TEXT_UTF8,
};
use testkit::x11::{Guard, XServer};
use testkit::{skip, Need};
use x11rb::connection::Connection;
use x11rb::protocol::xproto::{ConnectionExt as _, CreateWindowAux, Window, WindowClass};
use x11rb::rust_connection::RustConnection;

const AGENT: &str = env!("CARGO_BIN_EXE_genos-agent");

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        || Path::new(tool).is_file()
}

/// A scratch directory removed at the end.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("genos-x11-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Xvfb on a display of its own, logging into `scratch`.
fn xvfb(scratch: &Scratch) -> XServer {
    xvfb_with(scratch, &[])
}

/// Xvfb with more arguments.
fn xvfb_with(scratch: &Scratch, args: &[&OsStr]) -> XServer {
    let log = scratch.0.join("xvfb.log");
    let mut cmd = Command::new("Xvfb");
    cmd.args(["-nolisten", "tcp", "-screen", "0", "1024x768x24"])
        .args(args)
        .stderr(std::fs::File::create(&log).unwrap());
    XServer::spawn(cmd, &log)
}

/// The system agent (Unix socket for the host, its session socket in the scratch dir) and
/// one host connection to it.
struct System {
    _child: Guard,
    socket: PathBuf,
    session_socket: PathBuf,
    stream: UnixStream,
    session: HostSession,
    features: Features,
    next_id: u32,
    pending: Vec<Frame<AgentMessage>>,
}

impl System {
    fn start(scratch: &Scratch) -> System {
        let socket = scratch.0.join("agent.sock");
        let session_socket = scratch.0.join("session.sock");
        let systemctl = scratch.0.join("systemctl");
        std::fs::write(&systemctl, "#!/bin/sh\necho running\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&systemctl, std::fs::Permissions::from_mode(0o755)).unwrap();
        let child = Command::new(AGENT)
            .args(["--no-vsock", "--unix"])
            .arg(&socket)
            .arg("--session-socket")
            .arg(&session_socket)
            .arg("--systemctl")
            .arg(&systemctl)
            .stdin(Stdio::null())
            .spawn()
            .expect("start genos-agent");
        let child = Guard(child);
        let mut system = System {
            _child: child,
            stream: connect(&socket),
            socket,
            session_socket,
            session: HostSession::new(),
            features: Features::empty(),
            next_id: 1,
            pending: Vec::new(),
        };
        system.flush();
        match system.next_frame().message {
            AgentMessage::Hello { features, .. } => system.features = features,
            other => panic!("expected the agent's Hello, got {other:?}"),
        }
        system
    }

    /// Starts a session part on `x`'s display, connected to this agent.
    fn session_part(&self, x: &XServer) -> Guard {
        self.session_part_with(x, &[])
    }

    fn session_part_with(&self, x: &XServer, env: &[(&str, &std::ffi::OsStr)]) -> Guard {
        let child = Command::new(AGENT)
            .arg("session")
            .arg("--socket")
            .arg(&self.session_socket)
            .env("DISPLAY", &x.display)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .spawn()
            .expect("start genos-agent session");
        Guard(child)
    }

    /// The features a host connecting now is told about.
    fn features_now(&self) -> Features {
        let mut stream = connect(&self.socket);
        let mut session = HostSession::new();
        stream.write_all(&session.take_output()).unwrap();
        loop {
            if let Some(f) = session.poll().unwrap() {
                match f.message {
                    AgentMessage::Hello { features, .. } => return features,
                    other => panic!("expected the agent's Hello, got {other:?}"),
                }
            }
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap();
            assert!(n > 0, "agent closed the connection");
            session.receive(&buf[..n]);
        }
    }

    fn flush(&mut self) {
        let out = self.session.take_output();
        self.stream.write_all(&out).unwrap();
    }

    fn request(&mut self, m: HostMessage) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.session.send(id, m).unwrap();
        self.flush();
        id
    }

    fn next_frame(&mut self) -> Frame<AgentMessage> {
        loop {
            if let Some(f) = self.session.poll().expect("agent speaks the protocol") {
                return f;
            }
            let mut buf = [0u8; 65536];
            let n = self.stream.read(&mut buf).expect("read from the agent");
            assert!(n > 0, "agent closed the connection");
            self.session.receive(&buf[..n]);
        }
    }

    /// The first frame (kept ones first) that `pick` accepts, within `limit`.
    fn wait_for(
        &mut self,
        what: &str,
        limit: Duration,
        mut pick: impl FnMut(&Frame<AgentMessage>) -> bool,
    ) -> AgentMessage {
        if let Some(i) = self.pending.iter().position(&mut pick) {
            return self.pending.remove(i).message;
        }
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no {what} within {limit:?}; got {:?}",
                self.pending
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            let f = self.next_frame();
            if pick(&f) {
                return f.message;
            }
            self.pending.push(f);
        }
    }

    fn reply(&mut self, id: RequestId) -> AgentMessage {
        self.wait_for(&format!("answer to {id}"), Duration::from_secs(20), |f| {
            f.id == id
        })
    }

    /// Reads Ready notifications in order until the stage is `stage` (an old Ready kept in
    /// `pending` counts only before the newer ones).
    fn wait_stage(&mut self, stage: Stage) {
        let is_ready = |f: &Frame<AgentMessage>| {
            f.id == RequestId::CONNECTION && matches!(f.message, AgentMessage::Ready(_))
        };
        while let Some(i) = self.pending.iter().position(is_ready) {
            if self.pending.remove(i).message == AgentMessage::Ready(stage) {
                return;
            }
        }
        self.wait_for(&format!("Ready({stage:?})"), Duration::from_secs(20), |f| {
            f.id == RequestId::CONNECTION && f.message == AgentMessage::Ready(stage)
        });
    }

    /// Asks until the clipboard requests reach a session part (it connects in the
    /// background); returns the first answer that is not "no desktop session".
    fn when_connected(&mut self, m: impl Fn() -> HostMessage) -> AgentMessage {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let id = self.request(m());
            match self.reply(id) {
                AgentMessage::Error { message, .. }
                    if message.contains("no desktop session is connected")
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
                other => return other,
            }
        }
    }

    fn set_clipboard(&mut self, text: &str) -> AgentMessage {
        self.when_connected(|| {
            HostMessage::ClipboardSet(ClipboardContent {
                mime: MIME_TEXT_UTF8.into(),
                data: text.as_bytes().to_vec(),
            })
        })
    }
}

fn connect(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match UnixStream::connect(socket) {
            Ok(s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                return s;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("agent socket {}: {e}", socket.display()),
        }
    }
}

/// `xclip -o` of the clipboard in `target`.
fn xclip_out(x: &XServer, target: &str) -> String {
    let out = Command::new("xclip")
        .args(["-selection", "clipboard", "-o", "-t", target])
        .env("DISPLAY", &x.display)
        .stdin(Stdio::null())
        .output()
        .expect("run xclip");
    assert!(
        out.status.success(),
        "xclip -o -t {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `xclip -i` owning the clipboard with `text` (in the foreground, so the guard ends it).
fn xclip_in(x: &XServer, text: &str) -> Guard {
    let mut child = Command::new("xclip")
        .args(["-quiet", "-selection", "clipboard", "-i"])
        .env("DISPLAY", &x.display)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run xclip -i");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    Guard(child)
}

/// Whether the clipboard tools are here; else skips (or fails under GENOS_REQUIRE).
/// Another client's connection to `display` with one window of `class` on the root,
/// mapped (and flushed) when `map`: what a desktop's first app does, or an unmapped
/// selection owner.
fn app_window(display: &str, class: WindowClass, map: bool) -> (RustConnection, Window) {
    let (conn, screen) = x11rb::connect(Some(display)).unwrap();
    let root = conn.setup().roots[screen].root;
    let window = conn.generate_id().unwrap();
    let size = if class == WindowClass::INPUT_ONLY {
        1
    } else {
        100
    };
    conn.create_window(
        x11rb::COPY_DEPTH_FROM_PARENT,
        window,
        root,
        0,
        0,
        size,
        size,
        0,
        class,
        x11rb::COPY_FROM_PARENT,
        &CreateWindowAux::new(),
    )
    .unwrap();
    if map {
        conn.map_window(window).unwrap();
    }
    conn.flush().unwrap();
    (conn, window)
}

fn tools(test: &str, needed: &[&str]) -> bool {
    match needed.iter().find(|t| !have(t)) {
        None => true,
        Some(t) => {
            skip(
                Need::Tools,
                format!("{test}: {t} is not installed (scripts/install-deps)"),
            );
            false
        }
    }
}

#[test]
fn clipboard_set_through_the_session_part_is_read_by_xclip_in_every_text_target() {
    if !tools("clipboard set", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("set");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);

    let before = system.features;
    let done = system.set_clipboard("héllo GenOS\nline 2");

    assert_eq!(done, AgentMessage::Done);
    let x_features = Features::CLIPBOARD | Features::DISPLAY;
    assert!(!before.contains(Features::CLIPBOARD) && !before.contains(Features::DISPLAY));
    assert!(system.features_now().contains(x_features));
    assert_eq!(xclip_out(&x, "UTF8_STRING"), "héllo GenOS\nline 2");
    assert_eq!(
        xclip_out(&x, "text/plain;charset=utf-8"),
        "héllo GenOS\nline 2"
    );
    let targets = xclip_out(&x, "TARGETS");
    for t in ["UTF8_STRING", "STRING", "TEXT", "text/plain;charset=utf-8"] {
        assert!(targets.lines().any(|l| l == t), "{t} not in {targets:?}");
    }
    let refused = Command::new("xclip")
        .args(["-selection", "clipboard", "-o", "-t", "image/png"])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    assert!(refused.stdout.is_empty());
}

#[test]
fn text_copied_with_xclip_is_announced_as_changed_and_got() {
    if !tools("clipboard get", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("get");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);
    // The agent's own set first: it must not come back as a change.
    assert_eq!(system.set_clipboard("from the host"), AgentMessage::Done);

    let _owner = xclip_in(&x, "copied in the guest ✓");

    let first_change = system.wait_for("ClipboardChanged", Duration::from_secs(10), |f| {
        matches!(f.message, AgentMessage::ClipboardChanged(_))
    });
    assert_eq!(
        first_change,
        AgentMessage::ClipboardChanged(ClipboardContent {
            mime: MIME_TEXT_UTF8.into(),
            data: "copied in the guest ✓".as_bytes().to_vec(),
        })
    );
    let get = system.request(HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    match system.reply(get) {
        AgentMessage::Clipboard(c) => assert_eq!(c.data, "copied in the guest ✓".as_bytes()),
        other => panic!("{other:?}"),
    }
    let html = system.request(HostMessage::ClipboardGet {
        mime: "text/html".into(),
    });
    match system.reply(html) {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotSupported);
            assert!(message.contains("text/plain;charset=utf-8"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn session_stage_comes_when_a_window_of_another_client_maps() {
    if !tools("session stage", &["Xvfb"]) {
        return;
    }
    let scratch = Scratch::new("stage");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    system.wait_stage(Stage::System);
    let _part = system.session_part(&x);
    // Connected (clipboard answers) while no window is mapped: still `system`.
    let get = system.when_connected(|| HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    assert!(
        matches!(
            get,
            AgentMessage::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{get:?}"
    );
    let query = system.request(HostMessage::ReadyQuery);
    assert_eq!(system.reply(query), AgentMessage::Ready(Stage::System));

    let _app = app_window(&x.display, WindowClass::INPUT_OUTPUT, true);

    system.wait_stage(Stage::Session);
}

#[test]
fn a_session_part_that_leaves_drops_the_stage_and_a_new_one_is_picked_up() {
    if !tools("session part restart", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("restart");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    assert!(!system.features.contains(Features::CLIPBOARD));
    // A window from the start: the session part finds it when it connects.
    let _xterm_like = xclip_in(&x, "kept by xclip");
    let _app = app_window(&x.display, WindowClass::INPUT_OUTPUT, true);
    let part = system.session_part(&x);
    system.wait_stage(Stage::Session);

    drop(part);

    system.wait_stage(Stage::System);
    let get = system.request(HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    match system.reply(get) {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotSupported);
            assert!(
                message.contains("no desktop session is connected"),
                "{message}"
            );
            assert!(message.contains("the last one left"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let _again = system.session_part(&x);
    system.wait_stage(Stage::Session);
    match system.when_connected(|| HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    }) {
        AgentMessage::Clipboard(c) => assert_eq!(c.data, b"kept by xclip"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn display_modes_are_set_with_randr_on_xorg_dummy_new_and_existing() {
    if !tools(
        "display mode",
        &[
            "Xorg",
            "xrandr",
            "/usr/lib/xorg/modules/drivers/dummy_drv.so",
        ],
    ) {
        return;
    }
    let scratch = Scratch::new("randr");
    let x = XServer::xorg_dummy(&scratch.0);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);
    let mode = |w, h| {
        move || HostMessage::DisplaySetMode {
            width: w,
            height: h,
        }
    };

    // 1366x768 is no mode of the dummy driver: made from CVT timings.
    let created = system.when_connected(mode(1366, 768));
    let after_created = x.xrandr_current();
    let existing = system.when_connected(mode(1024, 768));
    let after_existing = x.xrandr_current();
    let too_big = system.when_connected(mode(40000, 768));

    assert_eq!(created, AgentMessage::Done);
    assert!(
        after_created.contains("current 1366 x 768"),
        "{after_created}"
    );
    assert_eq!(existing, AgentMessage::Done);
    assert!(
        after_existing.contains("current 1024 x 768"),
        "{after_existing}"
    );
    match too_big {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::InvalidArgument);
            assert!(message.contains("outside the screen's range"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_kiosk_session_part_is_at_session_while_the_app_runs_under_its_compositor() {
    let scratch = Scratch::new("kiosk");
    let mut system = System::start(&scratch);
    system.wait_stage(Stage::System);
    // A stand-in for cage's Wayland socket: it accepts connections as the compositor's does.
    let _compositor = std::os::unix::net::UnixListener::bind(scratch.0.join("wayland-7")).unwrap();
    // genos-kiosk-session's shape: the part in the background, then the shell becomes the app.
    let app = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "'{AGENT}' session --kiosk --socket '{}' & exec sleep 60",
            system.session_socket.display()
        ))
        .env("WAYLAND_DISPLAY", "wayland-7")
        .env("XDG_RUNTIME_DIR", &scratch.0)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the kiosk stand-in");
    let mut app = Guard(app);

    system.wait_stage(Stage::Session);
    let get = system.when_connected(|| HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    let _ = app.0.kill();
    let _ = app.0.wait();

    match get {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotSupported);
            assert!(message.contains("kiosk"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // The app is gone: the part ends with it and the stage falls back.
    system.wait_stage(Stage::System);
}

/// A clipboard owner that answers UTF8_STRING only through INCR, in `chunk`-byte pieces
/// (what owners of large selections do), until `stop`.
fn incr_owner(
    display: &str,
    text: Vec<u8>,
    chunk: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    use x11rb::protocol::xproto::{
        ChangeWindowAttributesAux, EventMask, PropMode, Property, SelectionNotifyEvent,
        SELECTION_NOTIFY_EVENT,
    };
    use x11rb::protocol::Event;
    use x11rb::wrapper::ConnectionExt as _;
    let (conn, window) = app_window(display, WindowClass::INPUT_ONLY, false);
    let atom = |n: &[u8]| conn.intern_atom(false, n).unwrap().reply().unwrap().atom;
    let (clipboard, utf8, incr) = (atom(b"CLIPBOARD"), atom(b"UTF8_STRING"), atom(b"INCR"));
    conn.set_selection_owner(window, clipboard, x11rb::CURRENT_TIME)
        .unwrap();
    conn.flush().unwrap();
    std::thread::spawn(move || {
        // (requestor, property, bytes sent); and how many transfers ended.
        let mut transfer: Option<(u32, u32, usize)> = None;
        let mut finished = 0;
        while !stop.load(Ordering::Relaxed) {
            let Some(event) = conn.poll_for_event().unwrap() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            match event {
                Event::SelectionRequest(e) => {
                    let ok = e.target == utf8 && transfer.is_none();
                    if ok {
                        conn.change_window_attributes(
                            e.requestor,
                            &ChangeWindowAttributesAux::new()
                                .event_mask(EventMask::PROPERTY_CHANGE),
                        )
                        .unwrap();
                        conn.change_property32(
                            PropMode::REPLACE,
                            e.requestor,
                            e.property,
                            incr,
                            &[text.len() as u32],
                        )
                        .unwrap();
                        transfer = Some((e.requestor, e.property, 0));
                    }
                    let notify = SelectionNotifyEvent {
                        response_type: SELECTION_NOTIFY_EVENT,
                        sequence: 0,
                        time: e.time,
                        requestor: e.requestor,
                        selection: e.selection,
                        target: e.target,
                        property: if ok { e.property } else { x11rb::NONE },
                    };
                    conn.send_event(false, e.requestor, EventMask::NO_EVENT, notify)
                        .unwrap();
                }
                Event::PropertyNotify(e) if e.state == Property::DELETE => {
                    if let Some((requestor, property, sent)) = transfer {
                        if e.window == requestor && e.atom == property {
                            let end = (sent + chunk).min(text.len());
                            conn.change_property8(
                                PropMode::REPLACE,
                                requestor,
                                property,
                                utf8,
                                &text[sent..end],
                            )
                            .unwrap();
                            transfer = if sent == end {
                                finished += 1;
                                None
                            } else {
                                Some((requestor, property, end))
                            };
                        }
                    }
                }
                _ => {}
            }
            conn.flush().unwrap();
        }
        finished
    })
}

#[test]
fn a_clipboard_sent_in_incr_pieces_is_got_whole() {
    if !tools("clipboard INCR", &["Xvfb"]) {
        return;
    }
    let scratch = Scratch::new("incr");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);
    let text: Vec<u8> = (0..300_000).map(|i| b'a' + (i % 26) as u8).collect();
    // Connected first (an empty clipboard answers NotFound), then the owner appears.
    let empty = system.when_connected(|| HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    assert!(
        matches!(
            empty,
            AgentMessage::Error {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{empty:?}"
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let owner = incr_owner(&x.display, text.clone(), 64 * 1024, stop.clone());

    let changed = system.wait_for("ClipboardChanged", Duration::from_secs(20), |f| {
        matches!(f.message, AgentMessage::ClipboardChanged(_))
    });
    let get = system.request(HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    let got = system.reply(get);
    stop.store(true, Ordering::Relaxed);
    let transfers = owner.join().unwrap();

    match (changed, got) {
        (AgentMessage::ClipboardChanged(c), AgentMessage::Clipboard(g)) => {
            assert!(c.data == text, "change: {} bytes", c.data.len());
            assert!(g.data == text, "get: {} bytes", g.data.len());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        transfers, 2,
        "one INCR transfer for the change, one for the get"
    );
}

#[test]
fn a_clipboard_over_the_protocol_limit_is_refused_as_too_large() {
    if !tools("clipboard too large", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("large");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);
    let text = "x".repeat(proto::agent::MAX_CLIPBOARD_LEN + 1);
    let _owner = xclip_in(&x, &text);
    std::thread::sleep(Duration::from_millis(300));

    let got = system.when_connected(|| HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });

    match got {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::TooLarge);
            assert!(message.contains("524288"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !system
            .pending
            .iter()
            .any(|f| matches!(f.message, AgentMessage::ClipboardChanged(_))),
        "a clipboard too large to relay must not be announced"
    );
}

/// An Xauthority file with one MIT-MAGIC-COOKIE-1 entry for any address (FamilyWild) and
/// any display (an empty number).
fn xauthority(path: &Path, cookie: &[u8; 16]) {
    let mut entry = Vec::new();
    entry.extend_from_slice(&0xffffu16.to_be_bytes());
    for field in [&b""[..], b"", b"MIT-MAGIC-COOKIE-1", cookie] {
        entry.extend_from_slice(&(field.len() as u16).to_be_bytes());
        entry.extend_from_slice(field);
    }
    std::fs::write(path, entry).unwrap();
}

#[test]
fn a_display_with_access_control_is_reached_with_the_cookie_from_xauthority() {
    if !tools("X authority", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("xauth");
    let auth = scratch.0.join("Xauthority");
    xauthority(&auth, b"genos-agent-test");
    let x = xvfb_with(&scratch, &[OsStr::new("-auth"), auth.as_os_str()]);
    assert!(
        x11rb::connect(Some(&x.display)).is_err(),
        "the display must refuse clients without the cookie"
    );
    let mut system = System::start(&scratch);
    let _part = system.session_part_with(&x, &[("XAUTHORITY", auth.as_os_str())]);

    let done = system.set_clipboard("behind a cookie");

    assert_eq!(done, AgentMessage::Done);
    let out = Command::new("xclip")
        .args(["-selection", "clipboard", "-o"])
        .env("DISPLAY", &x.display)
        .env("XAUTHORITY", &auth)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "behind a cookie");
}

#[test]
fn a_session_part_ends_when_its_display_closes_and_the_stage_falls_back() {
    if !tools("display closes", &["Xvfb"]) {
        return;
    }
    let scratch = Scratch::new("logout");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _app = app_window(&x.display, WindowClass::INPUT_OUTPUT, true);
    let mut part = system.session_part(&x);
    system.wait_stage(Stage::Session);

    drop(x);

    system.wait_stage(Stage::System);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = part.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the session part outlived its display"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.success(),
        "a closed display is the session's normal end: {status}"
    );
}

#[test]
fn latin1_only_owners_and_readers_get_iso_8859_1_text() {
    if !tools("STRING fallback", &["Xvfb", "xclip"]) {
        return;
    }
    let scratch = Scratch::new("latin1");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    let _part = system.session_part(&x);
    assert_eq!(system.set_clipboard("héllo €"), AgentMessage::Done);
    let out = Command::new("xclip")
        .args(["-selection", "clipboard", "-o", "-t", "STRING"])
        .env("DISPLAY", &x.display)
        .output()
        .unwrap();
    // An owner that offers only STRING (xclip answers just the target it was given).
    let mut owner = Command::new("xclip")
        .args(["-quiet", "-selection", "clipboard", "-t", "STRING", "-i"])
        .env("DISPLAY", &x.display)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    owner.stdin.take().unwrap().write_all(b"caf\xe9").unwrap();
    let _owner = Guard(owner);

    let changed = system.wait_for("ClipboardChanged", Duration::from_secs(10), |f| {
        matches!(f.message, AgentMessage::ClipboardChanged(_))
    });

    assert_eq!(out.stdout, b"h\xe9llo ?");
    match changed {
        AgentMessage::ClipboardChanged(c) => assert_eq!(c.data, "café".as_bytes()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_session_part_of_another_user_is_refused() {
    if !tools("peer check", &["Xvfb", "setpriv"]) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip(
            Need::Root,
            "running a session part as another user needs root",
        );
    }
    let scratch = Scratch::new("peer");
    let x = xvfb(&scratch);
    let mut system = System::start(&scratch);
    // nobody is neither root nor the session user (genos, absent here).
    let intruder = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            AGENT,
            "session",
        ])
        .arg("--socket")
        .arg(&system.session_socket)
        .env("DISPLAY", &x.display)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let _intruder = Guard(intruder);
    std::thread::sleep(Duration::from_secs(2));

    let get = system.request(HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });

    match system.reply(get) {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotSupported);
            assert!(
                message.contains("no desktop session is connected"),
                "{message}"
            );
        }
        other => panic!("a part of uid 65534 was served: {other:?}"),
    }
}
