//! The stream server's clipboard between an environment and its viewers, over QUIC on
//! loopback: the guest's clipboard reaches viewers holding the clipboard right (also those
//! joining later), and what one viewer pastes reaches the others but is not echoed back.

mod support;

use std::time::Duration;

use client::{ConnectOptions, Event, Session};
use hostd::stream::{EnvRef, ServerConfig};
use proto::stream::{ClientMessage, Rights};
use scenes::Scene;
use support::{next_event, start};

fn env() -> EnvRef {
    EnvRef::new("clip", 11)
}

/// A server streaming a still 160x120 screen for [`env`].
fn still_server() -> support::Harness {
    start(
        ServerConfig::default(),
        &env(),
        Scene::Still,
        160,
        120,
        10.0,
    )
}

/// A viewer with `rights`, joined (its first frame is there), and the clipboards it was sent
/// on the way.
async fn join(hx: &support::Harness, rights: Rights) -> (Session, Vec<String>) {
    let mut s = Session::connect(&hx.url(&env(), rights), ConnectOptions::default())
        .await
        .unwrap();
    let mut clipboards = vec![];
    next_event(&mut s, 10, "first frame", |e| match e {
        Event::Frame(_) => Some(()),
        Event::Clipboard(t) => {
            clipboards.push(t);
            None
        }
        _ => None,
    })
    .await;
    (s, clipboards)
}

async fn next_clipboard(s: &mut Session) -> String {
    next_event(s, 10, "clipboard", |e| match e {
        Event::Clipboard(t) => Some(t),
        _ => None,
    })
    .await
}

/// Whether a clipboard arrives within `d`.
async fn clipboard_within(s: &mut Session, d: Duration) -> Option<String> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, s.next_event()).await {
            Err(_) | Ok(None) => return None,
            Ok(Some(Event::Clipboard(t))) => return Some(t),
            Ok(Some(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guests_clipboard_reaches_viewers_with_the_right_and_later_joiners() {
    let hx = still_server();
    let (mut holder, _) = join(&hx, Rights::VIEW | Rights::CLIPBOARD).await;
    let (mut watcher, _) = join(&hx, Rights::VIEW | Rights::INPUT).await;

    hx.server
        .set_environment_clipboard("clip", "copied in the guest ✓");

    assert_eq!(next_clipboard(&mut holder).await, "copied in the guest ✓");
    assert_eq!(
        clipboard_within(&mut watcher, Duration::from_millis(500)).await,
        None,
        "a viewer without the clipboard right saw it"
    );
    let (late, seen_at_join) = join(&hx, Rights::VIEW | Rights::CLIPBOARD).await;
    assert_eq!(seen_at_join, vec!["copied in the guest ✓".to_owned()]);
    for s in [holder, watcher, late] {
        s.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewers_paste_goes_to_the_environment_and_the_other_viewers_only() {
    let hx = still_server();
    let rights = Rights::VIEW | Rights::CLIPBOARD;
    let (mut paster, _) = join(&hx, rights).await;
    let (mut other, _) = join(&hx, rights).await;

    paster.send(ClientMessage::Clipboard("pasted by one".into()));

    assert_eq!(next_clipboard(&mut other).await, "pasted by one");
    assert_eq!(hx.input.clipboard().as_deref(), Some("pasted by one"));
    assert_eq!(
        clipboard_within(&mut paster, Duration::from_millis(500)).await,
        None,
        "the paste was echoed to its viewer"
    );
    paster.close().await;
    other.close().await;
}
