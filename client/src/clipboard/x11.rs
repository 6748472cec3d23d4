//! The host side of clipboard sharing on X11: [`HostClipboard`] watches the CLIPBOARD
//! selection and sends its text to the environment, and puts the environment's text there.
//!
//! Two threads: a watcher blocks on its own X connection for XFixes selection-owner
//! notifications (no polling), a worker reads and sets the selection with `arboard` (whose
//! own thread answers other applications' requests for the text genos-view put there, for as
//! long as the [`HostClipboard`] lives) and runs [`ClipboardSync`] to decide what goes where.

use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;

use proto::stream::{ClientMessage, MAX_CLIPBOARD_LEN};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};
use x11rb::connection::{Connection, RequestConnection as _};
use x11rb::protocol::xfixes::{self, ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::ConnectionExt as _;
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;

use super::{ClipboardSync, LocalDecision, RemoteDecision};

/// Why the host clipboard cannot be shared.
#[derive(Debug, thiserror::Error)]
pub enum ClipboardError {
    #[error("cannot connect to the X server for the clipboard")]
    Connect(#[from] x11rb::errors::ConnectError),
    #[error("the X server has no XFIXES extension (needed to see clipboard changes)")]
    NoXfixes,
    #[error("X11 request failed")]
    Connection(#[from] x11rb::errors::ConnectionError),
    #[error("X11 request refused")]
    Reply(#[from] x11rb::errors::ReplyError),
    #[error("cannot open the clipboard")]
    Open(#[from] arboard::Error),
    #[error("cannot start the clipboard thread")]
    Thread(#[source] std::io::Error),
}

enum Command {
    /// The host selection changed owner.
    LocalChanged,
    /// The environment's clipboard holds this text.
    Remote(String),
    /// The server refused the clipboard for this session.
    Refuse,
    Stop,
}

/// The host's CLIPBOARD selection, shared with one session while this lives.
pub struct HostClipboard {
    commands: mpsc::Sender<Command>,
    /// The watcher's connection, kept open until the watcher is woken by shutting it down.
    watch: Arc<RustConnection>,
}

impl HostClipboard {
    /// Starts sharing: the host clipboard's current text and every later change go to
    /// `outbox` as `ClientMessage::Clipboard` (as [`ClipboardSync`] decides).
    pub fn start(outbox: UnboundedSender<ClientMessage>) -> Result<Self, ClipboardError> {
        let watch = Arc::new(watch_connection()?);
        let clipboard = arboard::Clipboard::new()?;
        let (commands, rx) = mpsc::channel();
        let notify = commands.clone();
        let conn = watch.clone();
        std::thread::Builder::new()
            .name("genos-view-clip-watch".into())
            .spawn(move || watcher(&conn, &notify))
            .map_err(ClipboardError::Thread)?;
        std::thread::Builder::new()
            .name("genos-view-clipboard".into())
            .spawn(move || worker(clipboard, &rx, &outbox))
            .map_err(ClipboardError::Thread)?;
        // The text already there when the viewer starts counts as a change.
        let _ = commands.send(Command::LocalChanged);
        Ok(Self { commands, watch })
    }

    /// The environment's clipboard now holds `text` (`Event::Clipboard`).
    pub fn set_from_environment(&self, text: String) {
        let _ = self.commands.send(Command::Remote(text));
    }

    /// Stops sending the host clipboard (the server refused it for this session).
    pub fn refuse(&self) {
        let _ = self.commands.send(Command::Refuse);
    }
}

impl Drop for HostClipboard {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Stop);
        // Wakes the watcher from its blocking read: the read fails and the thread ends.
        let fd = self.watch.stream().as_raw_fd();
        // SAFETY: `fd` is the watcher connection's socket, kept open by `self.watch`;
        // shutdown(2) only ends its traffic, it closes nothing and touches no memory.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
    }
}

/// A connection that receives XFixes notifications of CLIPBOARD owner changes.
fn watch_connection() -> Result<RustConnection, ClipboardError> {
    let (conn, screen) = x11rb::connect(None)?;
    if conn
        .extension_information(xfixes::X11_EXTENSION_NAME)?
        .is_none()
    {
        return Err(ClipboardError::NoXfixes);
    }
    conn.xfixes_query_version(5, 0)?.reply()?;
    let root = conn.setup().roots[screen].root;
    let clipboard = conn.intern_atom(false, b"CLIPBOARD")?.reply()?.atom;
    conn.xfixes_select_selection_input(
        root,
        clipboard,
        SelectionEventMask::SET_SELECTION_OWNER
            | SelectionEventMask::SELECTION_WINDOW_DESTROY
            | SelectionEventMask::SELECTION_CLIENT_CLOSE,
    )?
    .check()?;
    Ok(conn)
}

fn watcher(conn: &RustConnection, notify: &mpsc::Sender<Command>) {
    loop {
        match conn.wait_for_event() {
            Ok(Event::XfixesSelectionNotify(_)) => {
                if notify.send(Command::LocalChanged).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "clipboard watcher stopped");
                return;
            }
        }
    }
}

fn worker(
    mut clipboard: arboard::Clipboard,
    rx: &mpsc::Receiver<Command>,
    outbox: &UnboundedSender<ClientMessage>,
) {
    let mut sync = ClipboardSync::default();
    let mut next = rx.recv().ok();
    while let Some(command) = next.take() {
        match command {
            Command::LocalChanged => {
                // Owner changes come in bursts: read the selection once for all queued ones.
                loop {
                    match rx.try_recv() {
                        Ok(Command::LocalChanged) => {}
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let decision = match clipboard.get_text() {
                    Ok(text) => sync.local_changed(text),
                    Err(arboard::Error::ContentNotAvailable) => sync.local_cleared(),
                    Err(e) => {
                        warn!(error = %e, "cannot read the clipboard");
                        sync.local_cleared()
                    }
                };
                match decision {
                    LocalDecision::Send(text) => {
                        debug!(bytes = text.len(), "clipboard sent to the environment");
                        if outbox.send(ClientMessage::Clipboard(text)).is_err() {
                            return;
                        }
                    }
                    LocalDecision::TooLarge { len } => warn!(
                        "the clipboard holds {len} bytes of text, more than the {} KiB GenOS \
                         carries: not sent to the environment",
                        MAX_CLIPBOARD_LEN / 1024
                    ),
                    LocalDecision::Same | LocalDecision::Empty | LocalDecision::Refused => {}
                }
            }
            Command::Remote(text) => {
                if let RemoteDecision::Set(text) = sync.remote_changed(text) {
                    debug!(bytes = text.len(), "clipboard from the environment");
                    if let Err(e) = clipboard.set_text(text) {
                        warn!(error = %e, "cannot put the environment's clipboard on this host's");
                    }
                }
            }
            Command::Refuse => {
                if !sync.is_refused() {
                    info!("clipboard sharing towards the environment is off for this session");
                }
                sync.refuse();
            }
            Command::Stop => return,
        }
        if next.is_none() {
            next = rx.recv().ok();
        }
    }
}
