//! The agent's X11 side, over x11rb's pure-Rust connection (no libxcb, so the agent stays
//! static): the CLIPBOARD selection (get, set, change notifications through XFixes), display
//! modes through RandR ([`randr`]) and the `session` stage (a top-level window of another
//! client is mapped).
//!
//! Nothing here blocks on another client: a clipboard get is a conversion answered later by
//! [`Desktop::process`] (or failed at its deadline). Requests to the X server itself wait for
//! their replies; the server is local. The connection's descriptor goes into the agent's
//! poll loop ([`Desktop::fd`]); [`Desktop::process`] must run after every use of the
//! connection, since replies can leave events buffered inside it.

pub mod clipboard;
pub mod cvt;
pub mod randr;

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use proto::agent::{RequestId, MAX_CLIPBOARD_LEN};
use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectError, ConnectionError, ReplyError, ReplyOrIdError};
use x11rb::protocol::xfixes::{ConnectionExt as _, SelectionEventMask};
use x11rb::protocol::xproto::{
    Atom, AtomEnum, ChangeWindowAttributesAux, ConnectionExt as _, CreateWindowAux, EventMask,
    GetPropertyReply, MapState, PropMode, Property, SelectionNotifyEvent, SelectionRequestEvent,
    Window, WindowClass, SELECTION_NOTIFY_EVENT,
};
use x11rb::protocol::Event;
use x11rb::rust_connection::RustConnection;
use x11rb::wrapper::ConnectionExt as _;
use x11rb::{CURRENT_TIME, NONE};

use clipboard::{Answer, Incoming, TargetAtoms, TransferError};
pub use randr::DisplayError;

/// How long the clipboard's owner has to answer a conversion (each INCR piece restarts it).
pub const GET_TIMEOUT: Duration = Duration::from_secs(2);

/// Who asked for a clipboard conversion: a connection's request.
pub type Requester = (u64, RequestId);

/// Why the X side failed.
#[derive(Debug, thiserror::Error)]
pub enum X11Error {
    #[error("cannot connect to the X display: {0}")]
    Connect(#[from] ConnectError),
    #[error("X connection lost: {0}")]
    Connection(#[from] ConnectionError),
    #[error("X request failed: {0}")]
    Request(#[from] ReplyError),
    #[error("X request failed: {0}")]
    RequestOrId(#[from] ReplyOrIdError),
    #[error("the X server lacks the {0} extension")]
    Extension(&'static str),
    #[error("another X client kept the clipboard")]
    NotOwner,
}

impl X11Error {
    /// Whether the connection is gone (as opposed to one request failing).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            X11Error::Connect(_)
                | X11Error::Connection(_)
                | X11Error::Request(ReplyError::ConnectionError(_))
                | X11Error::RequestOrId(ReplyOrIdError::ConnectionError(_))
        )
    }
}

/// Why a clipboard get produced no text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GetError {
    #[error("the clipboard is empty")]
    Empty,
    #[error("the clipboard holds no text (its owner offers neither UTF8_STRING nor STRING)")]
    NoText,
    #[error("the clipboard's owner did not answer within {GET_TIMEOUT:?}")]
    Timeout,
    #[error(transparent)]
    Transfer(#[from] TransferError),
    #[error("the clipboard is not valid UTF-8 text")]
    NotUtf8,
}

/// What the X side has for the agent after [`Desktop::process`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesktopEvent {
    /// The answer to a [`Desktop::clipboard_get`].
    Clipboard {
        to: Requester,
        result: Result<Vec<u8>, GetError>,
    },
    /// Another client set the clipboard to this text.
    Changed(Vec<u8>),
    /// The session's first window is mapped (once per connection).
    SessionReady,
    /// Something worth a log line.
    Log(String),
}

/// Whether a top-level window of another client is mapped: `windows` are the root's
/// children as (id, viewable, override-redirect); a window belongs to this client when its
/// id with the client's resource mask cleared is the client's resource base.
pub fn session_window(windows: &[(u32, bool, bool)], own_base: u32, own_mask: u32) -> bool {
    windows.iter().any(|&(id, viewable, override_redirect)| {
        viewable && !override_redirect && id & !own_mask != own_base
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Request(Requester),
    Changed,
    /// A change fetch overtaken by the agent's own set: its old content is not relayed.
    Discard,
}

#[derive(Debug)]
struct Active {
    purpose: Purpose,
    target: Atom,
    deadline: Instant,
    /// Pieces of an INCR transfer, once the owner started one.
    incr: Option<Incoming>,
}

/// One X display the agent serves.
pub struct Desktop {
    conn: RustConnection,
    root: Window,
    window: Window,
    clipboard: Atom,
    incr: Atom,
    property: Atom,
    atoms: TargetAtoms,
    own_base: u32,
    own_mask: u32,
    /// The text the agent owns the clipboard with.
    owned: Option<Vec<u8>>,
    queue: VecDeque<Purpose>,
    active: Option<Active>,
    session: bool,
    events: Vec<DesktopEvent>,
}

impl std::fmt::Debug for Desktop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Desktop")
            .field("root", &self.root)
            .field("window", &self.window)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Desktop {
    /// Connects to `display` (`None`: `$DISPLAY`, with `$XAUTHORITY` for the cookie), makes
    /// the agent's hidden window and subscribes to clipboard and window events.
    pub fn connect(display: Option<&str>) -> Result<Desktop, X11Error> {
        let (conn, screen) = RustConnection::connect(display)?;
        let setup = conn.setup();
        let root = setup.roots[screen].root;
        let (own_base, own_mask) = (setup.resource_id_base, setup.resource_id_mask);
        let window = conn.generate_id()?;
        conn.create_window(
            0,
            window,
            root,
            -10,
            -10,
            1,
            1,
            0,
            WindowClass::INPUT_ONLY,
            x11rb::COPY_FROM_PARENT,
            &CreateWindowAux::new().event_mask(EventMask::PROPERTY_CHANGE),
        )?
        .check()?;
        let intern = |name: &[u8]| -> Result<Atom, X11Error> {
            Ok(conn.intern_atom(false, name)?.reply()?.atom)
        };
        let atoms = TargetAtoms {
            targets: intern(b"TARGETS")?,
            utf8_string: intern(b"UTF8_STRING")?,
            string: AtomEnum::STRING.into(),
            text: intern(b"TEXT")?,
            mime_utf8: intern(proto::agent::MIME_TEXT_UTF8.as_bytes())?,
        };
        let clipboard = intern(b"CLIPBOARD")?;
        let incr = intern(b"INCR")?;
        let property = intern(b"GENOS_CLIPBOARD")?;
        conn.set_wm_name(window)?;
        if conn
            .extension_information(x11rb::protocol::xfixes::X11_EXTENSION_NAME)?
            .is_none()
        {
            return Err(X11Error::Extension("XFIXES"));
        }
        conn.xfixes_query_version(5, 0)?.reply()?;
        conn.xfixes_select_selection_input(
            window,
            clipboard,
            SelectionEventMask::SET_SELECTION_OWNER
                | SelectionEventMask::SELECTION_WINDOW_DESTROY
                | SelectionEventMask::SELECTION_CLIENT_CLOSE,
        )?
        .check()?;
        conn.change_window_attributes(
            root,
            &ChangeWindowAttributesAux::new().event_mask(EventMask::SUBSTRUCTURE_NOTIFY),
        )?
        .check()?;
        let mut desktop = Desktop {
            conn,
            root,
            window,
            clipboard,
            incr,
            property,
            atoms,
            own_base,
            own_mask,
            owned: None,
            queue: VecDeque::new(),
            active: None,
            session: false,
            events: Vec::new(),
        };
        desktop.scan_windows()?;
        Ok(desktop)
    }

    /// The connection's descriptor, for poll(2).
    pub fn fd(&self) -> RawFd {
        self.conn.stream().as_raw_fd()
    }

    /// Whether the session's first window has been seen.
    pub fn session_ready(&self) -> bool {
        self.session
    }

    /// When [`Desktop::process`] has a deadline to check.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.active.as_ref().map(|a| a.deadline)
    }

    /// Looks at the root's children once (at connect): a desktop already up is a session.
    fn scan_windows(&mut self) -> Result<(), X11Error> {
        let tree = self.conn.query_tree(self.root)?.reply()?;
        let cookies: Vec<_> = tree
            .children
            .iter()
            .map(|&w| self.conn.get_window_attributes(w).map(|c| (w, c)))
            .collect::<Result<_, _>>()?;
        let mut windows = Vec::new();
        for (w, cookie) in cookies {
            // A window destroyed since the tree was read has no attributes: skip it.
            if let Ok(a) = cookie.reply() {
                windows.push((w, a.map_state == MapState::VIEWABLE, a.override_redirect));
            }
        }
        self.see_windows(&windows);
        Ok(())
    }

    fn see_windows(&mut self, windows: &[(u32, bool, bool)]) {
        if !self.session && session_window(windows, self.own_base, self.own_mask) {
            self.session = true;
            self.events.push(DesktopEvent::SessionReady);
        }
    }

    /// Sets the clipboard to `text` (UTF-8) and answers other clients' requests for it.
    pub fn clipboard_set(&mut self, text: Vec<u8>) -> Result<(), X11Error> {
        self.conn
            .set_selection_owner(self.window, self.clipboard, CURRENT_TIME)?;
        let owner = self
            .conn
            .get_selection_owner(self.clipboard)?
            .reply()?
            .owner;
        if owner != self.window {
            return Err(X11Error::NotOwner);
        }
        self.owned = Some(text);
        // Content fetched from the previous owner is older than this set: not relayed.
        self.queue.retain(|p| *p != Purpose::Changed);
        if let Some(a) = self
            .active
            .as_mut()
            .filter(|a| a.purpose == Purpose::Changed)
        {
            a.purpose = Purpose::Discard;
        }
        Ok(())
    }

    /// Asks for the clipboard's text; the answer comes as [`DesktopEvent::Clipboard`].
    pub fn clipboard_get(&mut self, to: Requester, now: Instant) -> Result<(), X11Error> {
        if let Some(text) = &self.owned {
            // The agent's own content: no round trip through the server.
            self.events.push(DesktopEvent::Clipboard {
                to,
                result: Ok(text.clone()),
            });
            return Ok(());
        }
        self.queue.push_back(Purpose::Request(to));
        self.start_next(now)
    }

    /// Sets the display mode (see [`randr::set_mode`]).
    pub fn set_mode(&mut self, width: u16, height: u16) -> Result<(), DisplayError> {
        randr::set_mode(&self.conn, self.root, width, height)
    }

    /// Forgets requests of connection `token` (it closed): their answers would go nowhere.
    pub fn forget(&mut self, token: u64) {
        self.queue
            .retain(|p| !matches!(p, Purpose::Request((t, _)) if *t == token));
    }

    fn start_next(&mut self, now: Instant) -> Result<(), X11Error> {
        if self.active.is_some() {
            return Ok(());
        }
        let Some(purpose) = self.queue.pop_front() else {
            return Ok(());
        };
        self.convert(purpose, self.atoms.utf8_string, now)
    }

    fn convert(&mut self, purpose: Purpose, target: Atom, now: Instant) -> Result<(), X11Error> {
        self.conn.delete_property(self.window, self.property)?;
        self.conn.convert_selection(
            self.window,
            self.clipboard,
            target,
            self.property,
            CURRENT_TIME,
        )?;
        self.active = Some(Active {
            purpose,
            target,
            deadline: now + GET_TIMEOUT,
            incr: None,
        });
        Ok(())
    }

    fn finish(&mut self, result: Result<Vec<u8>, GetError>, now: Instant) -> Result<(), X11Error> {
        let Some(active) = self.active.take() else {
            return Ok(());
        };
        let result = result.and_then(|data| {
            String::from_utf8(data)
                .map(String::into_bytes)
                .map_err(|_| GetError::NotUtf8)
        });
        match (active.purpose, result) {
            (Purpose::Request(to), result) => {
                self.events.push(DesktopEvent::Clipboard { to, result });
            }
            (Purpose::Changed, Ok(data)) => self.events.push(DesktopEvent::Changed(data)),
            (Purpose::Changed, Err(GetError::Empty | GetError::NoText)) => {}
            (Purpose::Changed, Err(e)) => self.events.push(DesktopEvent::Log(format!(
                "clipboard change not relayed: {e}"
            ))),
            (Purpose::Discard, _) => {}
        }
        self.start_next(now)
    }

    /// Handles every event the server sent, checks the conversion's deadline and returns
    /// what the agent must act on. An error means the display is gone.
    pub fn process(&mut self, now: Instant) -> Result<Vec<DesktopEvent>, X11Error> {
        while let Some(event) = self.conn.poll_for_event()? {
            self.event(event, now)?;
        }
        if self.active.as_ref().is_some_and(|a| now >= a.deadline) {
            self.finish(Err(GetError::Timeout), now)?;
        }
        self.conn.flush()?;
        Ok(std::mem::take(&mut self.events))
    }

    fn event(&mut self, event: Event, now: Instant) -> Result<(), X11Error> {
        match event {
            Event::SelectionRequest(e) => self.answer(&e)?,
            Event::SelectionClear(e) if e.selection == self.clipboard => self.owned = None,
            // The agent's own set is never echoed back; an owner that went away leaves an
            // empty clipboard, which is no content to relay.
            Event::XfixesSelectionNotify(e)
                if e.selection == self.clipboard && e.owner != self.window && e.owner != NONE =>
            {
                self.owned = None;
                if !self.queue.contains(&Purpose::Changed) {
                    self.queue.push_back(Purpose::Changed);
                }
                self.start_next(now)?;
            }
            Event::SelectionNotify(e) if e.requestor == self.window => self.converted(&e, now)?,
            Event::PropertyNotify(e)
                if e.window == self.window
                    && e.atom == self.property
                    && e.state == Property::NEW_VALUE =>
            {
                self.incr_piece(now)?
            }
            Event::MapNotify(e) if e.event == self.root => {
                self.see_windows(&[(e.window, true, e.override_redirect)]);
            }
            Event::Error(e) => self
                .events
                .push(DesktopEvent::Log(format!("X error: {:?}", e.error_kind))),
            _ => {}
        }
        Ok(())
    }

    /// A conversion's answer arrived in our property (or was refused).
    fn converted(&mut self, e: &SelectionNotifyEvent, now: Instant) -> Result<(), X11Error> {
        let Some(active) = &self.active else {
            return Ok(());
        };
        if e.selection != self.clipboard || e.target != active.target || active.incr.is_some() {
            return Ok(());
        }
        if e.property == NONE {
            // UTF8_STRING refused: old clients offer only STRING.
            if active.target == self.atoms.utf8_string {
                let purpose = active.purpose;
                return self.convert(purpose, self.atoms.string, now);
            }
            let owner = self
                .conn
                .get_selection_owner(self.clipboard)?
                .reply()?
                .owner;
            let why = if owner == NONE {
                GetError::Empty
            } else {
                GetError::NoText
            };
            return self.finish(Err(why), now);
        }
        let reply = self.take_transfer_property()?;
        if reply.type_ == self.incr {
            // Deleting the property (above) told the owner to send the first piece.
            let active = self.active.as_mut().expect("checked above");
            active.incr = Some(Incoming::default());
            active.deadline = now + GET_TIMEOUT;
            return Ok(());
        }
        if reply.bytes_after > 0 {
            return self.finish(Err(TransferError::TooLarge.into()), now);
        }
        let result = self
            .atoms
            .decode(reply.type_, &reply.value)
            .ok_or(GetError::NoText)
            .and_then(|data| {
                let mut incoming = Incoming::default();
                incoming.push(&data)?;
                Ok(incoming.into_inner())
            });
        self.finish(result, now)
    }

    /// Reads and deletes the property a selection owner wrote for us (deleting it is what
    /// asks an INCR owner for its next piece), up to one byte past the clipboard limit so
    /// that a longer value shows as `bytes_after`.
    fn take_transfer_property(&self) -> Result<GetPropertyReply, X11Error> {
        Ok(self
            .conn
            .get_property(
                true,
                self.window,
                self.property,
                AtomEnum::ANY,
                0,
                (MAX_CLIPBOARD_LEN / 4 + 1) as u32,
            )?
            .reply()?)
    }

    /// The next piece of an INCR transfer; an empty one ends it.
    fn incr_piece(&mut self, now: Instant) -> Result<(), X11Error> {
        if self.active.as_ref().is_none_or(|a| a.incr.is_none()) {
            return Ok(());
        }
        let reply = self.take_transfer_property()?;
        let active = self.active.as_mut().expect("checked above");
        let incoming = active.incr.as_mut().expect("checked above");
        if reply.value.is_empty() {
            let data = active.incr.take().expect("checked above").into_inner();
            let result = self
                .atoms
                .decode(reply.type_, &data)
                .ok_or(GetError::NoText);
            return self.finish(result, now);
        }
        if let Err(e) = incoming.push(&reply.value) {
            return self.finish(Err(e.into()), now);
        }
        active.deadline = now + GET_TIMEOUT;
        Ok(())
    }

    /// Answers another client's request for the clipboard the agent owns.
    fn answer(&mut self, e: &SelectionRequestEvent) -> Result<(), X11Error> {
        // Obsolete clients name no property: ICCCM says use the target's name.
        let property = if e.property == NONE {
            e.target
        } else {
            e.property
        };
        let text = self
            .owned
            .as_deref()
            .filter(|_| e.selection == self.clipboard && e.owner == self.window);
        // A single ChangeProperty carries the whole text (the protocol bounds it at 512 KiB,
        // far below a server's request limit with BIG-REQUESTS); without room it is refused.
        let fits = |len: usize| len + 64 <= self.conn.maximum_request_bytes();
        let answered = match (text, self.atoms.answer(e.target)) {
            (None, _) | (_, Answer::Refuse) => false,
            (Some(_), Answer::Targets) => {
                self.conn.change_property32(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    AtomEnum::ATOM,
                    &self.atoms.offered(),
                )?;
                true
            }
            (Some(text), Answer::Utf8 { type_ }) if fits(text.len()) => {
                self.conn.change_property8(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    type_,
                    text,
                )?;
                true
            }
            (Some(text), Answer::Latin1) if fits(text.len()) => {
                let latin1 = clipboard::utf8_to_latin1(&String::from_utf8_lossy(text));
                self.conn.change_property8(
                    PropMode::REPLACE,
                    e.requestor,
                    property,
                    AtomEnum::STRING,
                    &latin1,
                )?;
                true
            }
            (Some(_), _) => {
                self.events.push(DesktopEvent::Log(
                    "clipboard request refused: the text exceeds the X server's request size"
                        .into(),
                ));
                false
            }
        };
        let notify = SelectionNotifyEvent {
            response_type: SELECTION_NOTIFY_EVENT,
            sequence: 0,
            time: e.time,
            requestor: e.requestor,
            selection: e.selection,
            target: e.target,
            property: if answered { property } else { NONE },
        };
        self.conn
            .send_event(false, e.requestor, EventMask::NO_EVENT, notify)?;
        Ok(())
    }
}

trait WmName {
    fn set_wm_name(&self, window: Window) -> Result<(), ConnectionError>;
}

impl WmName for RustConnection {
    /// Names the hidden window, so `xlsclients`/`xprop` show whose it is.
    fn set_wm_name(&self, window: Window) -> Result<(), ConnectionError> {
        self.change_property8(
            PropMode::REPLACE,
            window,
            AtomEnum::WM_NAME,
            AtomEnum::STRING,
            b"genos-agent",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mapped_window_of_another_client_is_a_session() {
        let (base, mask) = (0x0040_0000, 0x001f_ffff);

        assert!(session_window(&[(0x0060_0001, true, false)], base, mask));
    }

    #[test]
    fn own_unmapped_and_override_redirect_windows_are_not_a_session() {
        let (base, mask) = (0x0040_0000, 0x001f_ffff);
        let windows = [
            (0x0040_0002, true, false),  // the agent's own
            (0x0060_0001, false, false), // unmapped
            (0x0080_0001, true, true),   // a menu or tooltip
        ];

        assert!(!session_window(&windows, base, mask));
        assert!(!session_window(&[], base, mask));
    }
}
