//! genos-view's window under a real X server (Xvfb): the clipboard shared both ways with
//! the environment as other X applications see it (xclip), and resize requests after the
//! user resized the window (xdotool). The server is scripted (support::scripted): it
//! welcomes the viewer with the rights a test chooses and records what the viewer sends.

mod support;

use std::time::Duration;

use hostd::stream::{EnvRef, ServerConfig};
use proto::stream::{ClientMessage, ErrorCode, Rights, ServerMessage};
use scenes::Scene;
use support::scripted::{ScriptedServer, CONFIG};
use support::x11::{self, Viewer, XServer};
use testkit::Need;

/// Xvfb and the X tools a test needs, or a skip (a failure under `GENOS_REQUIRE=tools`).
fn x_tools(extra: &[&'static str]) -> bool {
    let mut tools = vec!["Xvfb", "xclip"];
    tools.extend_from_slice(extra);
    match x11::missing_tool(&tools) {
        None => true,
        Some(t) => {
            testkit::skip(
                Need::Tools,
                format!("{t} is not installed (scripts/install-deps)"),
            );
            false
        }
    }
}

/// An X server, a scripted server admitting `rights`, and genos-view with `args` connected
/// to it (the Hello arrived).
async fn viewer(
    rights: Rights,
    args: &[&str],
    dir: &std::path::Path,
) -> (XServer, ScriptedServer, Viewer) {
    let x = XServer::start();
    let mut server = ScriptedServer::start(rights);
    let viewer = Viewer::start(&x.display, &server.url, args, dir);
    server
        .next(30, "Hello", |m| {
            matches!(m, ClientMessage::Hello { .. }).then_some(())
        })
        .await;
    (x, server, viewer)
}

fn clipboard_texts(m: ClientMessage) -> Option<String> {
    match m {
        ClientMessage::Clipboard(t) => Some(t),
        _ => None,
    }
}

async fn set_host_clipboard(display: &str, text: &str) {
    let (display, text) = (display.to_owned(), text.to_owned());
    tokio::task::spawn_blocking(move || x11::set_clipboard(&display, &text))
        .await
        .unwrap();
}

async fn host_clipboard_becomes(display: &str, expected: &str) -> Option<String> {
    let (display, expected) = (display.to_owned(), expected.to_owned());
    tokio::task::spawn_blocking(move || x11::wait_for_clipboard(&display, &expected, 10))
        .await
        .unwrap()
}

const ALL: Rights = Rights::VIEW.union(Rights::INPUT).union(Rights::CLIPBOARD);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clipboard_goes_both_ways_without_bouncing_back() {
    if !x_tools(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, _viewer) = viewer(ALL, &[], dir.path()).await;

    set_host_clipboard(&x.display, "copied on the host: ünïcødé ✓").await;
    let sent = server.next(10, "Clipboard", clipboard_texts).await;
    server.send(ServerMessage::Clipboard("copied in the guest ✓".into()));
    let pasted = host_clipboard_becomes(&x.display, "copied in the guest ✓").await;
    // The host reports genos-view's own ownership as a change: it must not go back.
    let bounced = server
        .collect(Duration::from_millis(1500), clipboard_texts)
        .await;

    assert_eq!(sent, "copied on the host: ünïcødé ✓");
    assert_eq!(pasted.as_deref(), Some("copied in the guest ✓"));
    assert!(bounced.is_empty(), "sent back: {bounced:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_clipboard_above_the_protocols_limit_is_not_sent() {
    if !x_tools(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, viewer) = viewer(ALL, &[], dir.path()).await;
    let big = "x".repeat(proto::stream::MAX_CLIPBOARD_LEN + 1);

    set_host_clipboard(&x.display, &big).await;
    let while_big = server
        .collect(Duration::from_millis(2000), clipboard_texts)
        .await;
    // Still watching: the next (small) change goes out.
    set_host_clipboard(&x.display, "small").await;
    let next = server.next(10, "Clipboard", clipboard_texts).await;

    assert!(
        while_big.is_empty(),
        "sent {} bytes",
        while_big.iter().map(String::len).sum::<usize>()
    );
    assert_eq!(next, "small");
    let log = viewer.log();
    assert!(
        log.contains("262145 bytes") && log.contains("not sent"),
        "the user is told: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clipboard_of_the_largest_size_from_the_environment_is_served_whole() {
    if !x_tools(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, server, _viewer) = viewer(ALL, &[], dir.path()).await;
    // Above what one X request carries without BIG-REQUESTS (262140 bytes).
    let line = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde\n";
    let full = line.repeat(proto::stream::MAX_CLIPBOARD_LEN / line.len());

    server.send(ServerMessage::Clipboard(full.clone()));
    let pasted = host_clipboard_becomes(&x.display, &full).await;

    assert_eq!(full.len(), proto::stream::MAX_CLIPBOARD_LEN);
    assert_eq!(pasted.map(|t| t.len()), Some(full.len()));
}

/// Neither direction is shared: a host change is not sent, the server's text is not taken.
async fn nothing_is_shared(rights: Rights, args: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, mut viewer) = viewer(rights, args, dir.path()).await;

    set_host_clipboard(&x.display, "host text").await;
    server.send(ServerMessage::Clipboard("guest text".into()));
    let sent = server
        .collect(Duration::from_millis(2000), clipboard_texts)
        .await;
    let display = x.display.clone();
    let host = tokio::task::spawn_blocking(move || x11::clipboard_text(&display))
        .await
        .unwrap();

    assert!(sent.is_empty(), "sent {sent:?}");
    assert_eq!(host.as_deref(), Some("host text"));
    assert!(viewer.running(), "genos-view exited: {}", viewer.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_clipboard_shares_nothing() {
    if !x_tools(&[]) {
        return;
    }
    nothing_is_shared(ALL, &["--no-clipboard"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_the_clipboard_right_shares_nothing() {
    if !x_tools(&[]) {
        return;
    }
    nothing_is_shared(Rights::VIEW.union(Rights::INPUT), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clipboard_the_server_refused_is_not_sent_again() {
    if !x_tools(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, viewer) = viewer(ALL, &[], dir.path()).await;
    set_host_clipboard(&x.display, "first").await;
    let first = server.next(10, "Clipboard", clipboard_texts).await;

    // As hostd answers once the token expired.
    server.send(ServerMessage::Error {
        code: ErrorCode::PermissionDenied,
        message: "clipboard refused: token expired".into(),
    });
    // The refusal is in once the viewer logged it.
    let logged = tokio::task::spawn_blocking({
        let viewer_log = dir.path().join("genos-view.log");
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                let log = std::fs::read_to_string(&viewer_log).unwrap_or_default();
                if log.contains("clipboard refused") {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        }
    })
    .await
    .unwrap();
    set_host_clipboard(&x.display, "second").await;
    let after = server
        .collect(Duration::from_millis(2000), clipboard_texts)
        .await;

    assert_eq!(first, "first");
    assert!(logged, "the refusal was not logged: {}", viewer.log());
    assert!(after.is_empty(), "sent after the refusal: {after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_clipboard_reaches_a_stream_servers_environment() {
    if !x_tools(&[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let env = EnvRef::new("dev", 1);
    let hx = support::start(ServerConfig::default(), &env, Scene::Still, 320, 240, 10.0);
    let token = hx.tokens.issue(&env, ALL, support::HOUR).unwrap();
    let url = hx.server.connect_url(&env.name, &token).unwrap();
    let x = XServer::start();
    let _viewer = Viewer::start(&x.display, &url, &[], dir.path());

    set_host_clipboard(&x.display, "to the environment").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut got = hx.input.clipboard();
    while got.is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        got = hx.input.clipboard();
    }

    assert_eq!(got.as_deref(), Some("to the environment"));
}

fn resizes(m: ClientMessage) -> Option<(u16, u16)> {
    match m {
        ClientMessage::Resize { width, height } => Some((width, height)),
        _ => None,
    }
}

/// Drags genos-view's window through three sizes 100 ms apart, ending at 801x601.
async fn drag_window(display: &str) {
    let display = display.to_owned();
    tokio::task::spawn_blocking(move || {
        let id = x11::window_named(&display, "^genos-view");
        let mut args = Vec::new();
        for (i, (w, h)) in [("900", "640"), ("850", "620"), ("801", "601")]
            .into_iter()
            .enumerate()
        {
            if i > 0 {
                args.extend(["sleep", "0.1"]);
            }
            args.extend(["windowsize", id.as_str(), w, h]);
        }
        x11::xdotool(&display, &args);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resized_window_asks_for_its_size_once_the_drag_ended() {
    if !x_tools(&["xdotool"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, _viewer) = viewer(ALL, &[], dir.path()).await;
    // The window opens at the stream's size (1280x720): nothing to ask for.
    let at_start = server.collect(Duration::from_millis(1000), resizes).await;

    drag_window(&x.display).await;
    let after_drag = server.collect(Duration::from_millis(1500), resizes).await;

    assert_eq!((CONFIG.width, CONFIG.height), (1280, 720));
    assert!(at_start.is_empty(), "asked {at_start:?} at start");
    assert_eq!(after_drag, vec![(800, 600)], "one request, even sides");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fixed_size_window_never_asks_for_a_resize() {
    if !x_tools(&["xdotool"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (x, mut server, _viewer) = viewer(ALL, &["--fixed-size"], dir.path()).await;

    drag_window(&x.display).await;
    let asked = server.collect(Duration::from_millis(1500), resizes).await;

    assert!(asked.is_empty(), "asked {asked:?}");
}
