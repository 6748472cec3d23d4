//! The system agent's end of its link to the session part (`genos-agent session`, running
//! inside the user's X session): the roles of the protocol reversed, the session part an
//! agent and the system agent its host ([`HostSession`]). Clipboard and display requests
//! from hostd's connections are forwarded on it under ids of the link's own; the answers go
//! back to the connection and request they came from. The session part's `Ready` and
//! `ClipboardChanged` notifications come out as [`LinkEvent`]s.

use std::collections::HashMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use proto::agent::session::HostSession;
use proto::agent::{
    AgentMessage, ClipboardContent, Features, HostMessage, RequestId, SendError, Stage,
    MAX_FRAME_LEN,
};

use crate::x11::Requester;

/// How long the session part has to answer a forwarded request (its own clipboard
/// conversions give up after 2 s; a mode change takes well under a second).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the session part said that the agent acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// The final answer to a forwarded request.
    Reply {
        to: Requester,
        message: AgentMessage,
    },
    /// The session's clipboard changed.
    Changed(ClipboardContent),
}

/// One connected session part.
#[derive(Debug)]
pub struct SessionLink {
    pub io: File,
    session: HostSession,
    /// The connecting process's uid (SO_PEERCRED), for logs.
    pub uid: u32,
    /// The stage the session part last announced.
    pub stage: Stage,
    /// What its Hello announced (none of the X features under the kiosk).
    pub features: Features,
    next_id: u32,
    pending: HashMap<RequestId, (Requester, Instant)>,
    /// Why the link is over, once it is.
    pub dead: Option<String>,
}

impl SessionLink {
    pub fn new(io: File, uid: u32) -> Self {
        SessionLink {
            io,
            session: HostSession::new(),
            uid,
            stage: Stage::Booting,
            features: Features::empty(),
            next_id: 1,
            pending: HashMap::new(),
            dead: None,
        }
    }

    /// Whether the Hello exchange finished (the session part answered).
    pub fn is_open(&self) -> bool {
        self.session.is_open()
    }

    pub fn wants_input(&self) -> bool {
        self.dead.is_none() && self.session.buffered_input() < MAX_FRAME_LEN + 4
    }

    pub fn wants_output(&self) -> bool {
        self.dead.is_none() && !self.session.output().is_empty()
    }

    /// Forwards a clipboard or display request of `to`; its answer comes as a
    /// [`LinkEvent::Reply`].
    pub fn forward(
        &mut self,
        to: Requester,
        message: HostMessage,
        now: Instant,
    ) -> Result<(), SendError> {
        let id = RequestId(self.next_id);
        // Ids wrap past u32::MAX; 0 is the connection's and ids in flight are skipped.
        self.next_id = self.next_id.checked_add(1).unwrap_or(1);
        if self.pending.contains_key(&id) {
            return Err(SendError::IdInUse { id });
        }
        self.session.send(id, message)?;
        self.pending.insert(id, (to, now + FORWARD_TIMEOUT));
        Ok(())
    }

    /// Forgets the requests of a connection that closed.
    pub fn forget(&mut self, token: u64) {
        self.pending.retain(|_, ((t, _), _)| *t != token);
    }

    /// Requests still waiting for an answer (when the link dies they fail).
    pub fn take_pending(&mut self) -> Vec<Requester> {
        self.pending.drain().map(|(_, (to, _))| to).collect()
    }

    /// Requests the session part left unanswered past [`FORWARD_TIMEOUT`]; forgotten here
    /// (a late answer is dropped).
    pub fn expired(&mut self, now: Instant) -> Vec<Requester> {
        let late: Vec<RequestId> = self
            .pending
            .iter()
            .filter(|(_, (_, deadline))| now >= *deadline)
            .map(|(&id, _)| id)
            .collect();
        late.iter()
            .filter_map(|id| self.pending.remove(id))
            .map(|(to, _)| to)
            .collect()
    }

    /// The earliest deadline of a forwarded request.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|(_, d)| *d).min()
    }

    /// Reads what the session part sent and returns what it means.
    pub fn read(&mut self) -> Vec<LinkEvent> {
        let mut buf = vec![0u8; 64 * 1024];
        while self.wants_input() {
            match self.io.read(&mut buf) {
                Ok(0) => {
                    self.dead = Some("it closed the connection".into());
                    break;
                }
                Ok(n) => self.session.receive(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    self.dead = Some(format!("reading its connection: {e}"));
                    break;
                }
            }
        }
        let mut events = Vec::new();
        loop {
            let frame = match self.session.poll() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    self.dead.get_or_insert_with(|| format!("protocol: {e}"));
                    break;
                }
            };
            if frame.id == RequestId::CONNECTION {
                match frame.message {
                    AgentMessage::Hello { features, .. } => self.features = features,
                    AgentMessage::Ready(stage) => self.stage = stage,
                    AgentMessage::ClipboardChanged(content) => {
                        events.push(LinkEvent::Changed(content))
                    }
                    AgentMessage::Error { code, message } => {
                        self.dead = Some(format!("it failed the connection ({code:?}): {message}"));
                    }
                    _ => {}
                }
                continue;
            }
            if let Some((to, _)) = self.pending.remove(&frame.id) {
                events.push(LinkEvent::Reply {
                    to,
                    message: frame.message,
                });
            }
        }
        events
    }

    /// Writes queued output without blocking.
    pub fn flush(&mut self) {
        while self.dead.is_none() && !self.session.output().is_empty() {
            match self.io.write(self.session.output()) {
                Ok(0) => self.dead = Some("it closed the connection".into()),
                Ok(n) => self.session.advance_output(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => self.dead = Some(format!("writing its connection: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::agent::session::AgentSession;
    use proto::agent::ErrorCode;
    use std::os::unix::net::UnixStream;

    /// A link over a socket pair and the session part's end of it, Hello exchanged and
    /// the part at `session`.
    fn linked() -> (SessionLink, UnixStream, AgentSession) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut link = SessionLink::new(File::from(std::os::fd::OwnedFd::from(ours)), 0);
        let mut part = AgentSession::new("part", Features::CLIPBOARD);
        link.flush();
        let hello = part_reads(&mut theirs, &mut part);
        assert!(matches!(hello[..], [(_, HostMessage::Hello { .. })]));
        part.send(RequestId::CONNECTION, AgentMessage::Ready(Stage::Session))
            .unwrap();
        theirs.write_all(&part.take_output()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(link.read().is_empty());
        assert!(link.is_open() && link.features.contains(Features::CLIPBOARD));
        (link, theirs, part)
    }

    /// Everything the part received since the last call, as (id, message).
    fn part_reads(
        theirs: &mut UnixStream,
        part: &mut AgentSession,
    ) -> Vec<(RequestId, HostMessage)> {
        let mut buf = [0u8; 65536];
        let n = theirs.read(&mut buf).unwrap();
        part.receive(&buf[..n]);
        let mut got = Vec::new();
        while let Some(f) = part.poll().unwrap() {
            got.push((f.id, f.message));
        }
        got
    }

    #[test]
    fn answers_go_back_to_the_connection_and_request_that_asked() {
        let (mut link, mut theirs, mut part) = linked();
        let now = Instant::now();
        link.forward(
            (7, RequestId(42)),
            HostMessage::DisplaySetMode {
                width: 800,
                height: 600,
            },
            now,
        )
        .unwrap();
        link.forward(
            (9, RequestId(42)),
            HostMessage::ClipboardGet {
                mime: "text/plain".into(),
            },
            now,
        )
        .unwrap();
        link.flush();
        let got = part_reads(&mut theirs, &mut part);
        assert_eq!(got.len(), 2);
        assert_ne!(got[0].0, got[1].0, "the link's own ids keep the two apart");

        part.send(
            got[1].0,
            AgentMessage::Error {
                code: ErrorCode::NotFound,
                message: "empty".into(),
            },
        )
        .unwrap();
        part.send(got[0].0, AgentMessage::Done).unwrap();
        theirs.write_all(&part.take_output()).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let events = link.read();

        assert_eq!(link.stage, Stage::Session);
        assert_eq!(
            events,
            vec![
                LinkEvent::Reply {
                    to: (9, RequestId(42)),
                    message: AgentMessage::Error {
                        code: ErrorCode::NotFound,
                        message: "empty".into()
                    },
                },
                LinkEvent::Reply {
                    to: (7, RequestId(42)),
                    message: AgentMessage::Done
                },
            ]
        );
    }

    #[test]
    fn a_request_the_part_leaves_unanswered_expires_once() {
        let (mut link, _theirs, _part) = linked();
        let now = Instant::now();
        link.forward(
            (3, RequestId(5)),
            HostMessage::DisplaySetMode {
                width: 800,
                height: 600,
            },
            now,
        )
        .unwrap();

        assert!(link
            .expired(now + FORWARD_TIMEOUT - Duration::from_millis(1))
            .is_empty());
        assert_eq!(link.next_deadline(), Some(now + FORWARD_TIMEOUT));
        assert_eq!(link.expired(now + FORWARD_TIMEOUT), vec![(3, RequestId(5))]);
        assert!(link.expired(now + FORWARD_TIMEOUT * 2).is_empty());
        assert_eq!(link.next_deadline(), None);
    }

    #[test]
    fn a_part_that_closes_is_dead_with_a_reason() {
        let (mut link, theirs, _part) = linked();
        drop(theirs);

        let _ = link.read();

        assert_eq!(link.dead.as_deref(), Some("it closed the connection"));
    }
}
