//! The one task that owns an agent connection: it moves bytes between the socket and the
//! sans-IO [`HostSession`], hands each request's frames to its caller, keeps the agent's
//! unsolicited stage and clipboard in watch channels, and queues a caller's data only
//! within the credit the agent granted.

use std::collections::HashMap;

use proto::agent::{
    AgentMessage, ClipboardContent, HostMessage, HostSession, RequestId, SessionError, Stage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use super::{AgentError, AgentInfo};

/// What a caller asks of the driver.
#[derive(Debug)]
pub(super) enum Command {
    /// Open a request with this first message; the id comes back on `opened`.
    Open {
        message: HostMessage,
        replies: mpsc::UnboundedSender<Reply>,
        opened: oneshot::Sender<Result<RequestId, AgentError>>,
    },
    /// Send a further message on a request (data waits for credit); `done` when queued.
    Send {
        id: RequestId,
        message: HostMessage,
        done: oneshot::Sender<Result<(), AgentError>>,
    },
    /// The caller took `n` bytes of the request's data.
    Consumed { id: RequestId, n: usize },
    /// The caller dropped the request before it ended.
    Forget { id: RequestId },
}

/// What the driver hands a caller.
#[derive(Debug)]
pub(super) enum Reply {
    Message(AgentMessage),
    Failed(AgentError),
}

/// A request in flight.
struct Pending {
    replies: mpsc::UnboundedSender<Reply>,
    /// A data message waiting for credit, and who waits for it.
    waiting: Option<(HostMessage, oneshot::Sender<Result<(), AgentError>>)>,
    exec: bool,
}

type Started = (
    mpsc::UnboundedSender<Command>,
    AgentInfo,
    watch::Receiver<Stage>,
    watch::Receiver<Option<ClipboardContent>>,
);

/// Exchanges Hello on `stream` and spawns the driver.
pub(super) async fn start(mut stream: UnixStream) -> Result<Started, AgentError> {
    let mut session = HostSession::new();
    stream.write_all(&session.take_output()).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let info = loop {
        if let Some(frame) = session.poll()? {
            match frame.message {
                AgentMessage::Hello {
                    minor,
                    agent,
                    features,
                    ..
                } => {
                    break AgentInfo {
                        agent,
                        minor,
                        features,
                    }
                }
                other => return Err(super::unexpected("Hello", &other)),
            }
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(AgentError::Closed);
        }
        session.receive(&buf[..n]);
    };
    let (commands, rx) = mpsc::unbounded_channel();
    let (stage_tx, stage) = watch::channel(Stage::Booting);
    let (clip_tx, clipboard) = watch::channel(None);
    let driver = Driver {
        session,
        requests: HashMap::new(),
        next_id: 1,
        stage: stage_tx,
        clipboard: clip_tx,
    };
    tokio::spawn(driver.run(stream, rx, buf));
    Ok((commands, info, stage, clipboard))
}

struct Driver {
    session: HostSession,
    requests: HashMap<RequestId, Pending>,
    next_id: u32,
    stage: watch::Sender<Stage>,
    clipboard: watch::Sender<Option<ClipboardContent>>,
}

impl Driver {
    async fn run(
        mut self,
        stream: UnixStream,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut buf: Vec<u8>,
    ) {
        let (mut reader, mut writer) = stream.into_split();
        let mut out = Vec::new();
        let failure = loop {
            if let Err(e) = self.deliver() {
                break AgentError::Session(e);
            }
            self.send_waiting();
            out.extend_from_slice(&self.session.take_output());
            tokio::select! {
                read = reader.read(&mut buf) => match read {
                    Ok(0) => break AgentError::Closed,
                    Ok(n) => self.session.receive(&buf[..n]),
                    Err(e) => break AgentError::Io(e),
                },
                // `write` either wrote some bytes or none when another branch wins.
                written = writer.write(&out), if !out.is_empty() => match written {
                    Ok(n) => { out.drain(..n); }
                    Err(e) => break AgentError::Io(e),
                },
                command = commands.recv() => match command {
                    Some(c) => self.command(c),
                    // Every client handle is gone: close the connection.
                    None => return,
                },
            }
        };
        tracing::debug!(error = %hostd_error(&failure), "agent connection ended");
        for (_, p) in self.requests.drain() {
            let _ = p.replies.send(Reply::Failed(clone_failure(&failure)));
            if let Some((_, done)) = p.waiting {
                let _ = done.send(Err(clone_failure(&failure)));
            }
        }
    }

    /// Hands every decoded frame to its request (or the watch channels).
    fn deliver(&mut self) -> Result<(), SessionError> {
        while let Some(frame) = self.session.poll()? {
            let id = frame.id;
            if id == RequestId::CONNECTION {
                self.notification(frame.message)?;
                continue;
            }
            let Some(pending) = self.requests.get(&id) else {
                // A request the caller forgot: data no one reads is granted back so the
                // agent can finish it; anything else is dropped with it.
                if let Some(n) = data_len(&frame.message) {
                    self.session.consumed(id, n);
                }
                continue;
            };
            if let AgentMessage::Ready(stage) = frame.message {
                self.raise_stage(stage);
            }
            let last = ends_request(&frame.message);
            if pending.replies.send(Reply::Message(frame.message)).is_err() {
                self.forget(id);
            } else if last {
                self.requests.remove(&id);
            }
        }
        Ok(())
    }

    fn notification(&mut self, message: AgentMessage) -> Result<(), SessionError> {
        match message {
            // A notification is the agent's current stage: it falls when the desktop
            // session ends.
            AgentMessage::Ready(stage) => {
                self.stage
                    .send_if_modified(|now| std::mem::replace(now, stage) != stage);
            }
            AgentMessage::ClipboardChanged(content) => {
                self.clipboard.send_replace(Some(content));
            }
            AgentMessage::Error { code, message } => {
                return Err(SessionError::Refused { code, message })
            }
            other => tracing::debug!(?other, "unexpected agent notification ignored"),
        }
        Ok(())
    }

    /// An answer to a query only raises the stage: a late one does not lower what a
    /// notification said.
    fn raise_stage(&self, stage: Stage) {
        self.stage.send_if_modified(|now| {
            let higher = stage > *now;
            if higher {
                *now = stage;
            }
            higher
        });
    }

    /// Queues data that waited for credit, where credit is there now.
    fn send_waiting(&mut self) {
        for (id, pending) in self.requests.iter_mut() {
            let Some((message, _)) = &pending.waiting else {
                continue;
            };
            let len = data_len_host(message).unwrap_or(0) as u64;
            if self.session.send_credit(*id) < len {
                continue;
            }
            let (message, done) = pending.waiting.take().expect("checked above");
            let _ = done.send(self.session.send(*id, message).map_err(AgentError::from));
        }
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Open {
                message,
                replies,
                opened,
            } => {
                let id = self.allocate_id();
                let exec = matches!(message, HostMessage::Exec(_));
                let result = self.session.send(id, message).map_err(AgentError::from);
                if result.is_ok() {
                    self.requests.insert(
                        id,
                        Pending {
                            replies,
                            waiting: None,
                            exec,
                        },
                    );
                }
                let _ = opened.send(result.map(|()| id));
            }
            Command::Send { id, message, done } => {
                let Some(pending) = self.requests.get_mut(&id) else {
                    let _ = done.send(Err(AgentError::Closed));
                    return;
                };
                match data_len_host(&message) {
                    Some(len) if self.session.send_credit(id) < len as u64 => {
                        pending.waiting = Some((message, done));
                    }
                    _ => {
                        let _ = done.send(self.session.send(id, message).map_err(AgentError::from));
                    }
                }
            }
            Command::Consumed { id, n } => self.session.consumed(id, n),
            Command::Forget { id } => self.forget(id),
        }
    }

    /// Drops a request the caller no longer wants; a process is killed so it does not run
    /// on unwatched.
    fn forget(&mut self, id: RequestId) {
        if let Some(p) = self.requests.remove(&id) {
            if p.exec && self.session.stream_open(id) {
                let _ = self.session.send(id, HostMessage::ExecKill { signal: 9 });
            }
        }
    }

    fn allocate_id(&mut self) -> RequestId {
        loop {
            let id = RequestId(self.next_id);
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.requests.contains_key(&id) && !self.session.stream_open(id) {
                return id;
            }
        }
    }
}

/// Whether the agent sends nothing more on a request after `m`.
fn ends_request(m: &AgentMessage) -> bool {
    matches!(
        m,
        AgentMessage::ExecExit { .. }
            | AgentMessage::FileEnd
            | AgentMessage::Done
            | AgentMessage::Error { .. }
            | AgentMessage::Ready(_)
            | AgentMessage::Clipboard(_)
    )
}

fn data_len(m: &AgentMessage) -> Option<usize> {
    match m {
        AgentMessage::ExecOutput { data, .. } | AgentMessage::FileData(data) => Some(data.len()),
        _ => None,
    }
}

fn data_len_host(m: &HostMessage) -> Option<usize> {
    match m {
        HostMessage::ExecStdin(d) | HostMessage::FileData(d) => Some(d.len()),
        _ => None,
    }
}

/// The connection's failure, once per request (I/O errors are not `Clone`).
fn clone_failure(e: &AgentError) -> AgentError {
    match e {
        AgentError::Session(s) => AgentError::Session(s.clone()),
        _ => AgentError::Closed,
    }
}

fn hostd_error(e: &AgentError) -> String {
    crate::error_chain(e)
}
