//! Clipboard sharing between the viewer's host and the environment.
//!
//! [`ClipboardSync`] decides, without I/O, what to do when either side's clipboard changes:
//! text only, within [`MAX_CLIPBOARD_LEN`], and never back to the side it came from (the
//! environment echoing what the viewer sent, or the host reporting the text genos-view just
//! put there, would otherwise bounce between them forever). [`x11`] drives it on the host's
//! X11 CLIPBOARD selection.

pub mod x11;

use proto::stream::{ErrorCode, MAX_CLIPBOARD_LEN};

/// What to do with the host clipboard's new text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalDecision {
    /// Send it to the environment (`ClientMessage::Clipboard`).
    Send(String),
    /// The environment already holds this text (it came from there, or was sent already).
    Same,
    /// Nothing to share.
    Empty,
    /// More than [`MAX_CLIPBOARD_LEN`] bytes: not sent, the user is told.
    TooLarge { len: usize },
    /// Sending is off: the server refused the clipboard for this session.
    Refused,
}

/// What to do with text the environment's clipboard now holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteDecision {
    /// Put it on the host clipboard.
    Set(String),
    /// The host clipboard already holds it (the environment echoes what the viewer sent).
    Same,
    /// Nothing to share.
    Empty,
}

/// The clipboard sharing state of one session.
#[derive(Debug, Clone)]
pub struct ClipboardSync {
    /// Text both sides are known to hold: the last one sent or received.
    shared: Option<String>,
    limit: usize,
    refused: bool,
}

impl Default for ClipboardSync {
    fn default() -> Self {
        Self::new(MAX_CLIPBOARD_LEN)
    }
}

impl ClipboardSync {
    /// A session's state, texts above `limit` bytes not sent.
    pub fn new(limit: usize) -> Self {
        Self {
            shared: None,
            limit,
            refused: false,
        }
    }

    /// The host clipboard now holds `text`.
    pub fn local_changed(&mut self, text: String) -> LocalDecision {
        if self.refused {
            return LocalDecision::Refused;
        }
        if self.shared.as_deref() == Some(text.as_str()) {
            return LocalDecision::Same;
        }
        // From here on the host holds something the environment does not.
        self.shared = None;
        if text.is_empty() {
            return LocalDecision::Empty;
        }
        if text.len() > self.limit {
            return LocalDecision::TooLarge { len: text.len() };
        }
        self.shared = Some(text.clone());
        LocalDecision::Send(text)
    }

    /// The host clipboard now holds no text (empty, or only other formats).
    pub fn local_cleared(&mut self) -> LocalDecision {
        self.local_changed(String::new())
    }

    /// The environment's clipboard now holds `text`.
    pub fn remote_changed(&mut self, text: String) -> RemoteDecision {
        if text.is_empty() {
            return RemoteDecision::Empty;
        }
        if self.shared.as_deref() == Some(text.as_str()) {
            return RemoteDecision::Same;
        }
        self.shared = Some(text.clone());
        RemoteDecision::Set(text)
    }

    /// The server refused the clipboard for the rest of the session: stop sending (texts
    /// from the environment are still taken).
    pub fn refuse(&mut self) {
        self.refused = true;
    }

    pub fn is_refused(&self) -> bool {
        self.refused
    }
}

/// A viewer feature a server's non-fatal error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feature {
    Clipboard,
    Resize,
}

/// What a non-fatal server error means for the viewer's clipboard and resize requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The token does not allow it (or expired): the server drops every later request, so
    /// stop sending them.
    Denied(Feature),
    /// The environment cannot do it now (no guest agent yet, a fixed display): tell the
    /// user; later requests cost little and may succeed once the guest can.
    Unavailable(Feature),
    /// The token expired mid-session: nothing but video is accepted any more.
    Expiring,
}

/// Classifies a non-fatal server `Error`. hostd names the request first in the message
/// (`"clipboard refused: ..."`, `"resize unavailable: ..."`); other errors are `None`.
pub fn classify_error(code: ErrorCode, message: &str) -> Option<Refusal> {
    let feature = || {
        let first = message.split_whitespace().next()?;
        match first {
            "clipboard" => Some(Feature::Clipboard),
            "resize" => Some(Feature::Resize),
            _ => None,
        }
    };
    match code {
        ErrorCode::PermissionDenied => feature().map(Refusal::Denied),
        ErrorCode::Unavailable => feature().map(Refusal::Unavailable),
        ErrorCode::SessionExpiring => Some(Refusal::Expiring),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_change_is_sent_once() {
        let mut sync = ClipboardSync::default();

        let first = sync.local_changed("hello".into());
        let again = sync.local_changed("hello".into());

        assert_eq!(first, LocalDecision::Send("hello".into()));
        assert_eq!(again, LocalDecision::Same);
    }

    #[test]
    fn text_from_the_environment_is_set_locally_and_not_sent_back() {
        let mut sync = ClipboardSync::default();

        let set = sync.remote_changed("from guest".into());
        // Owning the host selection makes the host report the same text as a change.
        let echo = sync.local_changed("from guest".into());

        assert_eq!(set, RemoteDecision::Set("from guest".into()));
        assert_eq!(echo, LocalDecision::Same);
    }

    #[test]
    fn the_environment_echoing_sent_text_does_not_take_the_host_clipboard() {
        let mut sync = ClipboardSync::default();
        sync.local_changed("copied here".into());

        let echo = sync.remote_changed("copied here".into());

        assert_eq!(echo, RemoteDecision::Same);
    }

    #[test]
    fn text_copied_again_after_the_environment_changed_is_sent_again() {
        let mut sync = ClipboardSync::default();
        sync.local_changed("a".into());
        sync.remote_changed("b".into());

        let again = sync.local_changed("a".into());

        assert_eq!(again, LocalDecision::Send("a".into()));
    }

    #[test]
    fn text_above_the_limit_is_not_sent_and_does_not_count_as_shared() {
        let mut sync = ClipboardSync::new(8);

        let big = sync.local_changed("123456789".into());
        let fits = sync.local_changed("12345678".into());
        // The guest still holds what it had: the same big text later is refused again.
        let big_again = sync.local_changed("123456789".into());

        assert_eq!(big, LocalDecision::TooLarge { len: 9 });
        assert_eq!(fits, LocalDecision::Send("12345678".into()));
        assert_eq!(big_again, LocalDecision::TooLarge { len: 9 });
    }

    #[test]
    fn text_from_the_environment_is_set_again_once_the_host_held_something_else() {
        let mut sync = ClipboardSync::new(8);
        sync.remote_changed("guest".into());
        sync.local_changed("far too long".into());
        let mut cleared = ClipboardSync::default();
        cleared.local_changed("a".into());
        cleared.local_cleared();

        let after_big = sync.remote_changed("guest".into());
        let after_clear = cleared.remote_changed("a".into());

        assert_eq!(after_big, RemoteDecision::Set("guest".into()));
        assert_eq!(after_clear, RemoteDecision::Set("a".into()));
    }

    #[test]
    fn the_default_limit_is_the_protocols() {
        let mut sync = ClipboardSync::default();

        let at_limit = sync.local_changed("x".repeat(MAX_CLIPBOARD_LEN));
        let above = sync.local_changed("y".repeat(MAX_CLIPBOARD_LEN + 1));

        assert!(matches!(at_limit, LocalDecision::Send(t) if t.len() == MAX_CLIPBOARD_LEN));
        assert_eq!(
            above,
            LocalDecision::TooLarge {
                len: MAX_CLIPBOARD_LEN + 1
            }
        );
    }

    #[test]
    fn empty_texts_are_not_shared() {
        let mut sync = ClipboardSync::default();

        assert_eq!(sync.local_cleared(), LocalDecision::Empty);
        assert_eq!(sync.remote_changed(String::new()), RemoteDecision::Empty);
    }

    #[test]
    fn a_refused_clipboard_sends_nothing_but_still_takes_the_environments() {
        let mut sync = ClipboardSync::default();

        sync.refuse();

        assert_eq!(sync.local_changed("x".into()), LocalDecision::Refused);
        assert_eq!(
            sync.remote_changed("y".into()),
            RemoteDecision::Set("y".into())
        );
    }

    #[test]
    fn server_errors_are_classified_by_code_and_the_request_they_name() {
        let cases = [
            (
                ErrorCode::PermissionDenied,
                "clipboard refused: token lacks the clipboard right",
                Some(Refusal::Denied(Feature::Clipboard)),
            ),
            (
                ErrorCode::PermissionDenied,
                "resize refused: token expired",
                Some(Refusal::Denied(Feature::Resize)),
            ),
            (
                ErrorCode::Unavailable,
                "clipboard unavailable: this environment has no guest agent",
                Some(Refusal::Unavailable(Feature::Clipboard)),
            ),
            (
                ErrorCode::Unavailable,
                "resize unavailable: this environment's display size is fixed",
                Some(Refusal::Unavailable(Feature::Resize)),
            ),
            (
                ErrorCode::PermissionDenied,
                "input refused: token lacks the input right",
                None,
            ),
            (
                ErrorCode::SessionExpiring,
                "input is no longer accepted; video ends in 30 s",
                Some(Refusal::Expiring),
            ),
            (ErrorCode::Internal, "clipboard refused: x", None),
        ];
        for (code, message, expected) in cases {
            assert_eq!(classify_error(code, message), expected, "{message}");
        }
    }
}
