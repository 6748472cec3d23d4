//! A streamed desktop's clipboard and display size, between its viewers and its guest agent.
//!
//! [`GuestInput`] is the stream server's input sink for a VM: input events and the virtio-gpu
//! display size go to the VMM ([`VmInput`]); a viewer's clipboard and the guest-side mode
//! change go to one task per environment ([`DesktopLink::run`]), which talks to the guest's
//! agent and hands the guest's own clipboard changes to the environment's viewers. The policy
//! (what to send when) is the sans-IO [`DesktopState`]; the task only moves its decisions to
//! the agent and the stream server. Newest wins in both directions: a clipboard or a size
//! superseded before it could be applied is not applied, and what waits for the desktop
//! session is applied when the agent reports it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::agent::{ClipboardContent, ErrorCode, HostMessage, Stage, MIME_TEXT_UTF8};
use proto::stream::{InputEvent, MAX_CLIPBOARD_LEN};
use tokio::sync::watch;

use super::{OrchError, Orchestrator};
use crate::agent::{AgentClient, AgentError};
use crate::error_chain;
use crate::stream::source::{InputError, InputSink};

/// Pause before reaching the agent again after its connection failed.
const RECONNECT: Duration = Duration::from_secs(2);

/// What viewers asked of the guest's desktop: each field is the latest request, replaced by
/// the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Requests {
    clipboard: Option<Arc<str>>,
    mode: Option<(u16, u16)>,
}

/// The stream server's input sink for a VM with a guest agent.
pub struct GuestInput {
    /// The VM's own input devices and display size (the VMM's).
    vm: Box<dyn InputSink>,
    requests: watch::Sender<Requests>,
    /// Why the guest cannot take a clipboard now (no session; the agent refused it).
    clipboard_unavailable: Arc<Mutex<Option<String>>>,
}

impl InputSink for GuestInput {
    fn inject(&self, events: &[InputEvent]) -> Result<(), InputError> {
        self.vm.inject(events)
    }

    fn set_clipboard(&self, text: &str) -> Result<(), InputError> {
        if let Some(why) = self.clipboard_unavailable.lock().expect("poisoned").clone() {
            return Err(InputError::Unavailable(why));
        }
        self.requests
            .send_modify(|r| r.clipboard = Some(Arc::from(text)));
        Ok(())
    }

    fn request_resize(&self, width: u32, height: u32) -> Result<(), InputError> {
        // The VMM's display first: the guest's driver sees the new preferred size; the
        // agent then sets the mode on the guest's output (newest wins, applied once the
        // session runs).
        self.vm.request_resize(width, height)?;
        let mode = (clamp_u16(width), clamp_u16(height));
        self.requests.send_modify(|r| r.mode = Some(mode));
        Ok(())
    }
}

fn clamp_u16(v: u32) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

/// What to do next, decided by [`DesktopState`].
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    SetClipboard(Arc<str>),
    SetMode(u16, u16),
}

/// The link's policy, without I/O: which requests still have to reach the guest, which
/// guest clipboards go to the viewers.
#[derive(Debug)]
struct DesktopState {
    /// Why there is no agent connection now (`None`: connected).
    no_agent: Option<String>,
    stage: Stage,
    /// The latest requests, and what of them the guest has.
    wanted: Requests,
    applied: Requests,
    /// The last clipboard text exchanged either way: the guest's notification of a text a
    /// viewer just set is not sent back to the viewers as news.
    last_text: Option<Arc<str>>,
}

impl Default for DesktopState {
    fn default() -> Self {
        DesktopState {
            no_agent: Some("it has not answered yet".into()),
            stage: Stage::Booting,
            wanted: Requests::default(),
            applied: Requests::default(),
            last_text: None,
        }
    }
}

impl DesktopState {
    /// Why the guest cannot take a clipboard at this stage, for the viewer.
    fn clipboard_unavailable(&self) -> Option<String> {
        if let Some(why) = &self.no_agent {
            return Some(format!("the guest agent cannot be reached ({why})"));
        }
        (self.stage < Stage::Session).then(|| {
            format!(
                "the guest's desktop session is not running (its agent reports {})",
                self.stage.name()
            )
        })
    }

    /// The agent connection is up, or why not.
    fn agent(&mut self, connected: Result<(), String>) {
        self.no_agent = connected.err();
    }

    fn stage(&mut self, stage: Stage) {
        if stage < Stage::Session {
            // A new session has neither: both are applied again when it comes.
            self.applied = Requests::default();
        }
        self.stage = stage;
    }

    fn requests(&mut self, wanted: Requests) {
        self.wanted = wanted;
    }

    /// The next request to apply in the guest, if the session runs.
    fn next_step(&self) -> Option<Step> {
        if self.stage < Stage::Session {
            return None;
        }
        if let Some((w, h)) = self.wanted.mode.filter(|m| self.applied.mode != Some(*m)) {
            return Some(Step::SetMode(w, h));
        }
        match &self.wanted.clipboard {
            Some(text) if self.applied.clipboard.as_ref() != Some(text) => {
                Some(Step::SetClipboard(text.clone()))
            }
            _ => None,
        }
    }

    /// `step` was applied (or failed for good: it is not tried again until superseded).
    fn done(&mut self, step: &Step) {
        match step {
            Step::SetMode(w, h) => self.applied.mode = Some((*w, *h)),
            Step::SetClipboard(text) => {
                self.applied.clipboard = Some(text.clone());
                self.last_text = Some(text.clone());
            }
        }
    }

    /// The guest's clipboard changed: the text to show the viewers, if it is text they can
    /// take and news to them.
    fn guest_clipboard(&mut self, content: &ClipboardContent) -> Option<Arc<str>> {
        if !content.mime.eq_ignore_ascii_case(MIME_TEXT_UTF8)
            || content.data.len() > MAX_CLIPBOARD_LEN
        {
            return None;
        }
        let text: Arc<str> = std::str::from_utf8(&content.data).ok()?.into();
        if self.last_text.as_ref() == Some(&text) {
            return None;
        }
        self.last_text = Some(text.clone());
        Some(text)
    }
}

/// What a desktop link is connected to: where it reaches the guest's agent (again, after a
/// connection ended) and where the guest's clipboard goes.
pub trait DesktopEnds: Send + Sync + 'static {
    /// A connection to the guest's agent; an error when there is none now.
    fn agent(&self) -> impl std::future::Future<Output = Result<AgentClient, OrchError>> + Send;
    /// The guest has `text` on its clipboard, news to the viewers.
    fn guest_clipboard(&self, text: &str);
}

/// The orchestrator's environment `name`: its agent, and its viewers on the stream server.
pub(super) struct Environment {
    orch: Orchestrator,
    name: String,
}

impl DesktopEnds for Environment {
    async fn agent(&self) -> Result<AgentClient, OrchError> {
        self.orch.agent(&self.name).await
    }

    fn guest_clipboard(&self, text: &str) {
        if let Some(server) = self.orch.inner.stream.get() {
            server.set_environment_clipboard(&self.name, text);
        }
    }
}

impl Environment {
    pub(super) fn new(orch: &Orchestrator, name: &str) -> Self {
        Environment {
            orch: orch.clone(),
            name: name.to_owned(),
        }
    }
}

/// The agent side of one environment's desktop link.
pub struct DesktopLink<E> {
    ends: E,
    requests: watch::Receiver<Requests>,
    clipboard_unavailable: Arc<Mutex<Option<String>>>,
}

/// The sink for the stream server (the VM's own devices `vm`, plus the guest's clipboard and
/// display through the agent) and the task that serves it ([`DesktopLink::run`]).
pub fn link<E: DesktopEnds>(ends: E, vm: Box<dyn InputSink>) -> (GuestInput, DesktopLink<E>) {
    let (tx, rx) = watch::channel(Requests::default());
    let unavailable = Arc::new(Mutex::new(DesktopState::default().clipboard_unavailable()));
    (
        GuestInput {
            vm,
            requests: tx,
            clipboard_unavailable: unavailable.clone(),
        },
        DesktopLink {
            ends,
            requests: rx,
            clipboard_unavailable: unavailable,
        },
    )
}

/// How one connection to the agent ended.
enum Ended {
    /// The sink is gone: the environment stopped streaming.
    Unstreamed,
    /// The agent connection ended; reach it again.
    AgentLost,
}

impl<E: DesktopEnds> DesktopLink<E> {
    /// Serves the link until the environment stops streaming (the [`GuestInput`] is
    /// dropped), reaching the agent again whenever its connection ends.
    pub async fn run(mut self) {
        let mut state = DesktopState::default();
        loop {
            match self.ends.agent().await {
                Ok(client) => match self.serve(&client, &mut state).await {
                    Ended::Unstreamed => return,
                    Ended::AgentLost => {
                        tracing::debug!("desktop link: agent connection ended");
                        state.agent(Err("its connection ended".into()));
                    }
                },
                Err(e) => {
                    // Not ready any more (stopping, failed) or the agent is unreachable.
                    let why = error_chain(&e);
                    tracing::debug!(error = %why, "desktop link: no agent");
                    state.agent(Err(why));
                }
            }
            state.stage(Stage::Booting);
            self.publish_unavailable(&state);
            tokio::select! {
                _ = tokio::time::sleep(RECONNECT) => {}
                changed = self.requests.changed() => if changed.is_err() { return },
            }
        }
    }

    async fn serve(&mut self, client: &AgentClient, state: &mut DesktopState) -> Ended {
        let mut stage = client.stage_changes();
        let mut guest_clipboard = client.clipboard_changes();
        guest_clipboard.mark_unchanged();
        state.agent(Ok(()));
        state.stage(*stage.borrow_and_update());
        state.requests(self.requests.borrow_and_update().clone());
        self.publish_unavailable(state);
        loop {
            while let Some(step) = state.next_step() {
                match self.apply(client, &step).await {
                    Ok(()) => state.done(&step),
                    Err(AgentError::Closed) | Err(AgentError::Session(_)) => {
                        return Ended::AgentLost
                    }
                    Err(e) => {
                        self.refused(&step, &e);
                        state.done(&step);
                    }
                }
            }
            tokio::select! {
                changed = self.requests.changed() => {
                    if changed.is_err() {
                        return Ended::Unstreamed;
                    }
                    state.requests(self.requests.borrow_and_update().clone());
                }
                changed = stage.changed() => {
                    if changed.is_err() {
                        return Ended::AgentLost;
                    }
                    state.stage(*stage.borrow_and_update());
                    self.publish_unavailable(state);
                }
                changed = guest_clipboard.changed() => {
                    if changed.is_err() {
                        return Ended::AgentLost;
                    }
                    let content = guest_clipboard.borrow_and_update().clone();
                    if let Some(text) = content.and_then(|c| state.guest_clipboard(&c)) {
                        self.ends.guest_clipboard(&text);
                    }
                }
            }
        }
    }

    async fn apply(&self, client: &AgentClient, step: &Step) -> Result<(), AgentError> {
        let message = match step {
            Step::SetClipboard(text) => HostMessage::ClipboardSet(ClipboardContent {
                mime: MIME_TEXT_UTF8.into(),
                data: text.as_bytes().to_vec(),
            }),
            Step::SetMode(width, height) => HostMessage::DisplaySetMode {
                width: *width,
                height: *height,
            },
        };
        client.call_done(message).await
    }

    /// The agent refused `step`: logged; a clipboard it cannot take is refused to the
    /// viewers from now on, with the agent's reason.
    fn refused(&self, step: &Step, e: &AgentError) {
        let why = error_chain(e);
        match step {
            Step::SetMode(w, h) => {
                tracing::warn!(error = %why, "the guest did not take the display size {w}x{h}")
            }
            Step::SetClipboard(_) => {
                tracing::warn!(error = %why, "the guest did not take the clipboard");
                if let AgentError::Refused {
                    code: ErrorCode::NotSupported,
                    message,
                } = e
                {
                    *self.clipboard_unavailable.lock().expect("poisoned") =
                        Some(format!("the guest agent cannot take it: {message}"));
                }
            }
        }
    }

    fn publish_unavailable(&self, state: &DesktopState) {
        let mut slot = self.clipboard_unavailable.lock().expect("poisoned");
        match state.clipboard_unavailable() {
            Some(why) => *slot = Some(why),
            // A session (again): whatever was refused before is tried anew.
            None => *slot = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(t: &str) -> ClipboardContent {
        ClipboardContent {
            mime: MIME_TEXT_UTF8.into(),
            data: t.as_bytes().to_vec(),
        }
    }

    fn wanted(clipboard: Option<&str>, mode: Option<(u16, u16)>) -> Requests {
        Requests {
            clipboard: clipboard.map(Arc::from),
            mode,
        }
    }

    #[test]
    fn requests_wait_for_the_session_and_only_the_newest_is_applied() {
        let mut s = DesktopState::default();
        assert!(s
            .clipboard_unavailable()
            .unwrap()
            .contains("has not answered yet"));
        s.agent(Ok(()));
        s.stage(Stage::System);
        s.requests(wanted(Some("first"), Some((800, 600))));
        s.requests(wanted(Some("second"), Some((1280, 720))));
        assert_eq!(s.next_step(), None, "no session yet");
        assert!(s
            .clipboard_unavailable()
            .unwrap()
            .contains("reports system"));

        s.stage(Stage::Session);
        let mut steps = vec![];
        while let Some(step) = s.next_step() {
            s.done(&step);
            steps.push(step);
        }

        assert_eq!(
            steps,
            vec![
                Step::SetMode(1280, 720),
                Step::SetClipboard(Arc::from("second"))
            ]
        );
        assert_eq!(s.clipboard_unavailable(), None);
    }

    #[test]
    fn without_an_agent_the_clipboard_is_refused_saying_why() {
        let mut s = DesktopState::default();

        s.agent(Err(
            "nothing in the guest accepted a connection on vsock port 1024".into(),
        ));

        assert_eq!(
            s.clipboard_unavailable().as_deref(),
            Some(
                "the guest agent cannot be reached (nothing in the guest accepted a connection \
                 on vsock port 1024)"
            )
        );
        assert_eq!(s.next_step(), None);
    }

    #[test]
    fn a_new_session_gets_the_latest_size_and_clipboard_again() {
        let mut s = DesktopState::default();
        s.agent(Ok(()));
        s.stage(Stage::Session);
        s.requests(wanted(Some("kept"), Some((1024, 768))));
        while let Some(step) = s.next_step() {
            s.done(&step);
        }

        s.stage(Stage::System);
        s.stage(Stage::Session);

        assert_eq!(s.next_step(), Some(Step::SetMode(1024, 768)));
    }

    #[test]
    fn the_guest_echo_of_a_viewers_clipboard_is_not_news_but_its_own_change_is() {
        let mut s = DesktopState::default();
        s.agent(Ok(()));
        s.stage(Stage::Session);
        s.requests(wanted(Some("pasted"), None));
        let step = s.next_step().unwrap();
        s.done(&step);

        assert_eq!(s.guest_clipboard(&text("pasted")), None);
        assert_eq!(
            s.guest_clipboard(&text("copied in the guest")).as_deref(),
            Some("copied in the guest")
        );
        assert_eq!(
            s.guest_clipboard(&text("copied in the guest")),
            None,
            "said once"
        );
    }

    #[test]
    fn guest_clipboards_viewers_cannot_take_are_not_sent() {
        let mut s = DesktopState::default();
        let image = ClipboardContent {
            mime: "image/png".into(),
            data: vec![0x89, b'P', b'N', b'G'],
        };
        let not_utf8 = ClipboardContent {
            mime: MIME_TEXT_UTF8.into(),
            data: vec![0xff, 0xfe],
        };
        let too_long = text(&"x".repeat(MAX_CLIPBOARD_LEN + 1));

        assert_eq!(s.guest_clipboard(&image), None);
        assert_eq!(s.guest_clipboard(&not_utf8), None);
        assert_eq!(s.guest_clipboard(&too_long), None);
    }
}
