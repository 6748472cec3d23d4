//! hostd's client for genos-agent, the program inside every guest (`proto::agent`,
//! `docs/agent.md`).
//!
//! [`AgentClient::connect`] reaches the agent through the VM's virtio-vsock Unix socket
//! (Firecracker's hybrid protocol: `CONNECT <port>` first, see [`hybrid`]) or straight
//! through a Unix socket the agent listens on (tests, and agents outside a VM), exchanges
//! Hello and hands the connection to one driver task ([`driver`]) that owns the socket and
//! the sans-IO [`proto::agent::HostSession`]. Callers run requests concurrently: simple calls
//! ([`AgentClient::call`]), processes ([`AgentClient::exec`]) and files
//! ([`AgentClient::put_file`], [`AgentClient::get_file`]). What the agent sends unasked
//! (its readiness stage, clipboard changes) is kept in watch channels.
//!
//! Memory is bounded by the protocol's flow control: data from the agent is granted back
//! only as a caller takes it ([`Exec::next`], the file writer), and a caller's data is
//! written only as the agent grants credit, one write at a time.

mod driver;
pub mod hybrid;

use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::agent::{
    AgentMessage, ClipboardContent, ErrorCode, ExecRequest, ExitStatus, Features, FileGetRequest,
    FilePutRequest, HostMessage, OutputFd, SendError, SessionError, Stage, MAX_CHUNK_LEN,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};

use crate::uds::VmmSocket;
use driver::{Command, Reply};

/// How long the agent has to answer the Hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an agent request or connection failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("VM vsock socket")]
    Uds(#[from] crate::uds::UdsError),
    #[error("vsock handshake")]
    Handshake(#[from] hybrid::HandshakeError),
    #[error("no answer from the agent within {0:?}")]
    Timeout(Duration),
    #[error("agent connection failed")]
    Session(#[from] SessionError),
    #[error("request not sent")]
    Send(#[from] SendError),
    #[error("transport")]
    Io(#[from] std::io::Error),
    /// The agent answered the request with an error.
    #[error("agent refused ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("the agent connection is closed")]
    Closed,
    #[error("unexpected answer from the agent: {0}")]
    Unexpected(String),
    #[error("the agent sent {got} bytes of a {size}-byte file")]
    ShortFile { got: u64, size: u64 },
    #[error("the file is {size} bytes, more than the {limit} allowed")]
    FileTooLarge { size: u64, limit: u64 },
}

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddress {
    /// The VM's virtio-vsock socket (`VsockConfig::uds_path`), reached as its control
    /// socket is (no link followed, the peer's uid checked), and the agent's guest port.
    Vsock { socket: VmmSocket, port: u32 },
    /// A Unix socket the agent itself listens on.
    Unix(PathBuf),
}

impl AgentAddress {
    /// The agent of a VM whose vsock device listens on `socket`, at its standard port.
    pub fn vm(socket: VmmSocket) -> Self {
        AgentAddress::Vsock {
            socket,
            port: proto::agent::VSOCK_PORT,
        }
    }
}

/// What the agent said about itself in its Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Name and version of the agent build.
    pub agent: String,
    pub minor: u16,
    pub features: Features,
}

/// A connection to one guest's agent; cheap to clone, requests run concurrently.
#[derive(Debug, Clone)]
pub struct AgentClient {
    commands: mpsc::UnboundedSender<Command>,
    info: AgentInfo,
    stage: watch::Receiver<Stage>,
    clipboard: watch::Receiver<Option<ClipboardContent>>,
}

impl AgentClient {
    /// Connects, exchanges Hello within `timeout` and starts the driver (needs a tokio
    /// runtime). The stage starts as the agent's answer to a first `ReadyQuery`.
    pub async fn connect(address: &AgentAddress, timeout: Duration) -> Result<Self, AgentError> {
        let connect = async {
            let stream = match address {
                AgentAddress::Vsock { socket, port } => {
                    let socket = socket.clone();
                    let (s, _peer) = tokio::task::spawn_blocking(move || socket.connect())
                        .await
                        .map_err(|e| AgentError::Io(std::io::Error::other(e)))??;
                    s.set_nonblocking(true)?;
                    let mut s = UnixStream::from_std(s)?;
                    hybrid::connect(&mut s, *port).await?;
                    s
                }
                AgentAddress::Unix(path) => connect_unix(path).await?,
            };
            driver::start(stream).await
        };
        let (commands, info, stage, clipboard) = tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| AgentError::Timeout(timeout))??;
        let client = AgentClient {
            commands,
            info,
            stage,
            clipboard,
        };
        let now = client.call(HostMessage::ReadyQuery).await?;
        match now {
            AgentMessage::Ready(_) => Ok(client),
            other => Err(unexpected("ReadyQuery", &other)),
        }
    }

    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// The stage the agent last reported.
    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    /// The stage as it changes; its sender is gone once the connection ended.
    pub fn stage_changes(&self) -> watch::Receiver<Stage> {
        self.stage.clone()
    }

    /// Waits until the agent reports `stage` (or a later one); `Closed` if the connection
    /// ends first.
    pub async fn wait_for_stage(&self, stage: Stage) -> Result<Stage, AgentError> {
        let mut rx = self.stage.clone();
        let reached = rx
            .wait_for(|s| *s >= stage)
            .await
            .map_err(|_| AgentError::Closed)?;
        Ok(*reached)
    }

    /// The guest's clipboard as last reported by the agent's change notifications.
    pub fn clipboard_changes(&self) -> watch::Receiver<Option<ClipboardContent>> {
        self.clipboard.clone()
    }

    /// Whether the driver still runs (the connection is up).
    pub fn is_connected(&self) -> bool {
        !self.commands.is_closed()
    }

    /// Sends a request without streams and returns its one answer (`Done`, `Ready`,
    /// `Clipboard`); an `Error` answer is [`AgentError::Refused`].
    pub async fn call(&self, message: HostMessage) -> Result<AgentMessage, AgentError> {
        let mut request = self.open(message).await?;
        let reply = request.next().await?;
        request.finish();
        match reply {
            AgentMessage::Error { code, message } => Err(AgentError::Refused { code, message }),
            other => Ok(other),
        }
    }

    /// Sends a request whose answer must be `Done`.
    pub async fn call_done(&self, message: HostMessage) -> Result<(), AgentError> {
        let what = format!("{message:?}");
        match self.call(message).await? {
            AgentMessage::Done => Ok(()),
            other => Err(unexpected(&what, &other)),
        }
    }

    /// Starts a process; its output, then its exit, come from [`Exec::next`].
    pub async fn exec(&self, exec: ExecRequest) -> Result<Exec, AgentError> {
        let mut request = self.open(HostMessage::Exec(exec)).await?;
        match request.next().await? {
            AgentMessage::ExecStarted { pid } => Ok(Exec { request, pid }),
            AgentMessage::Error { code, message } => Err(AgentError::Refused { code, message }),
            other => Err(unexpected("Exec", &other)),
        }
    }

    /// Writes `put.size` bytes read from `data` to a file in the guest; the agent puts it in
    /// place (atomically) only when all of them arrived.
    pub async fn put_file(
        &self,
        put: FilePutRequest,
        data: &mut (impl AsyncRead + Unpin),
    ) -> Result<(), AgentError> {
        let size = put.size;
        let mut request = self.open(HostMessage::FilePut(put)).await?;
        let mut buf = vec![0; MAX_CHUNK_LEN];
        let mut sent = 0u64;
        while sent < size {
            let want = (size - sent).min(buf.len() as u64) as usize;
            let n = data.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(AgentError::ShortFile { got: sent, size });
            }
            // The agent may refuse while we send (a path outside the home, a full disk);
            // its answer ends the request, so a send after it fails with the refusal.
            if let Some(refusal) = request.try_refusal() {
                return Err(refusal);
            }
            request
                .send(HostMessage::FileData(buf[..n].to_vec()))
                .await
                .map_err(|e| request.try_refusal().unwrap_or(e))?;
            sent += n as u64;
        }
        request
            .send(HostMessage::FileEnd)
            .await
            .map_err(|e| request.try_refusal().unwrap_or(e))?;
        match request.next().await? {
            AgentMessage::Done => Ok(()),
            AgentMessage::Error { code, message } => Err(AgentError::Refused { code, message }),
            other => Err(unexpected("FilePut", &other)),
        }
    }

    /// Opens a file in the guest for reading: its size and mode, and its data as it comes
    /// ([`GuestFile::next_chunk`]). One larger than `limit` bytes is refused before any of
    /// it is read.
    pub async fn open_file(
        &self,
        get: FileGetRequest,
        limit: u64,
    ) -> Result<GuestFile, AgentError> {
        let mut request = self.open(HostMessage::FileGet(get)).await?;
        let (size, mode) = match request.next().await? {
            AgentMessage::FileInfo { size, mode } => (size, mode),
            AgentMessage::Error { code, message } => {
                return Err(AgentError::Refused { code, message })
            }
            other => return Err(unexpected("FileGet", &other)),
        };
        if size > limit {
            // Dropping the request tells the driver to forget it; the agent's data for it
            // is ignored as late.
            return Err(AgentError::FileTooLarge { size, limit });
        }
        Ok(GuestFile {
            request,
            size,
            mode,
            got: 0,
        })
    }

    /// Reads a file from the guest into `out`, refusing one larger than `limit` bytes before
    /// any of it is written. Returns its size and mode.
    pub async fn get_file(
        &self,
        get: FileGetRequest,
        out: &mut (impl AsyncWrite + Unpin),
        limit: u64,
    ) -> Result<(u64, u32), AgentError> {
        let mut file = self.open_file(get, limit).await?;
        while let Some(data) = file.next_chunk().await? {
            out.write_all(&data).await?;
        }
        out.flush().await?;
        Ok((file.size, file.mode))
    }

    async fn open(&self, message: HostMessage) -> Result<Request, AgentError> {
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (id_tx, id_rx) = oneshot::channel();
        self.commands
            .send(Command::Open {
                message,
                replies: reply_tx,
                opened: id_tx,
            })
            .map_err(|_| AgentError::Closed)?;
        let id = id_rx.await.map_err(|_| AgentError::Closed)??;
        Ok(Request {
            id,
            commands: self.commands.clone(),
            replies,
            finished: false,
        })
    }
}

async fn connect_unix(path: &Path) -> Result<UnixStream, AgentError> {
    UnixStream::connect(path)
        .await
        .map_err(|source| AgentError::Connect {
            path: path.to_owned(),
            source,
        })
}

fn unexpected(what: &str, got: &AgentMessage) -> AgentError {
    AgentError::Unexpected(format!("{got:?} in answer to {what}"))
}

/// One request on the connection. Dropping it makes the driver forget the request.
#[derive(Debug)]
struct Request {
    id: proto::agent::RequestId,
    /// Unbounded: a request has at most one message in it at a time, plus one `Consumed`
    /// per data chunk the caller took (bounded by the window the agent was granted).
    commands: mpsc::UnboundedSender<Command>,
    replies: mpsc::UnboundedReceiver<Reply>,
    finished: bool,
}

impl Request {
    /// The next message the agent sent on this request.
    async fn next(&mut self) -> Result<AgentMessage, AgentError> {
        match self.replies.recv().await {
            Some(Reply::Message(m)) => Ok(m),
            Some(Reply::Failed(e)) => Err(e),
            None => Err(AgentError::Closed),
        }
    }

    /// An error answer that is already here, if any (without waiting).
    fn try_refusal(&mut self) -> Option<AgentError> {
        match self.replies.try_recv() {
            Ok(Reply::Message(AgentMessage::Error { code, message })) => {
                Some(AgentError::Refused { code, message })
            }
            Ok(Reply::Failed(e)) => Some(e),
            Ok(Reply::Message(other)) => Some(unexpected("a request still sending", &other)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(AgentError::Closed),
        }
    }

    /// Sends a further message on this request (data once the agent granted credit).
    async fn send(&self, message: HostMessage) -> Result<(), AgentError> {
        send(&self.commands, self.id, message).await
    }

    /// The caller is done with `n` bytes of data the agent sent: the agent may send more.
    fn consumed(&self, n: usize) {
        let _ = self.commands.send(Command::Consumed { id: self.id, n });
    }

    /// The request ended on the agent's side; nothing to forget.
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Forget { id: self.id });
        }
    }
}

/// A file being read from the guest ([`AgentClient::open_file`]).
#[derive(Debug)]
pub struct GuestFile {
    request: Request,
    /// Its size and mode as the agent announced them.
    pub size: u64,
    pub mode: u32,
    got: u64,
}

impl GuestFile {
    /// The next piece of the file, `None` once all of it came; the agent is granted more
    /// as pieces are taken.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, AgentError> {
        let size = self.size;
        match self.request.next().await? {
            AgentMessage::FileData(data) => {
                self.got += data.len() as u64;
                if self.got > size {
                    return Err(AgentError::Unexpected(format!(
                        "more than the announced {size} bytes"
                    )));
                }
                self.request.consumed(data.len());
                Ok(Some(data))
            }
            AgentMessage::FileEnd if self.got == size => Ok(None),
            AgentMessage::FileEnd => Err(AgentError::ShortFile {
                got: self.got,
                size,
            }),
            AgentMessage::Error { code, message } => Err(AgentError::Refused { code, message }),
            other => Err(unexpected("FileGet", &other)),
        }
    }
}

/// What a running process produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Output { fd: OutputFd, data: Vec<u8> },
    Exit { status: ExitStatus, timed_out: bool },
}

/// A process started by [`AgentClient::exec`].
#[derive(Debug)]
pub struct Exec {
    request: Request,
    pid: u32,
}

impl Exec {
    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's stdin and signals, usable from another task while this one reads
    /// the output (a process that fills its stdout stops reading its stdin).
    pub fn input(&self) -> ExecInput {
        ExecInput {
            id: self.request.id,
            commands: self.request.commands.clone(),
        }
    }

    /// The next output chunk or the exit (after which there is nothing more).
    pub async fn next(&mut self) -> Result<ExecEvent, AgentError> {
        match self.request.next().await? {
            AgentMessage::ExecOutput { fd, data } => {
                self.request.consumed(data.len());
                Ok(ExecEvent::Output { fd, data })
            }
            AgentMessage::ExecExit { status, timed_out } => {
                self.request.finish();
                Ok(ExecEvent::Exit { status, timed_out })
            }
            AgentMessage::Error { code, message } => {
                self.request.finish();
                Err(AgentError::Refused { code, message })
            }
            other => Err(unexpected("Exec", &other)),
        }
    }

    /// Runs the process to its end, collecting at most `limit` bytes of each output (the
    /// rest is read and counted, not kept).
    pub async fn collect(mut self, limit: usize) -> Result<ExecOutput, AgentError> {
        let mut out = ExecOutput::default();
        loop {
            match self.next().await? {
                ExecEvent::Output { fd, data } => {
                    let buf = match fd {
                        OutputFd::Stdout => &mut out.stdout,
                        OutputFd::Stderr => &mut out.stderr,
                    };
                    let room = limit.saturating_sub(buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..room]);
                    out.dropped += (data.len() - room) as u64;
                }
                ExecEvent::Exit { status, timed_out } => {
                    out.status = Some(status);
                    out.timed_out = timed_out;
                    return Ok(out);
                }
            }
        }
    }
}

/// Writes a running process's stdin and signals it ([`Exec::input`]).
#[derive(Debug, Clone)]
pub struct ExecInput {
    id: proto::agent::RequestId,
    commands: mpsc::UnboundedSender<Command>,
}

impl ExecInput {
    /// Writes to the process's stdin (the request must have asked for stdin), in chunks as
    /// the agent grants credit.
    pub async fn write(&self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(MAX_CHUNK_LEN) {
            send(
                &self.commands,
                self.id,
                HostMessage::ExecStdin(chunk.to_vec()),
            )
            .await?;
        }
        Ok(())
    }

    /// Closes the process's stdin.
    pub async fn close(&self) -> Result<(), AgentError> {
        send(&self.commands, self.id, HostMessage::ExecStdinEof).await
    }

    /// Sends `signal` to the process group.
    pub async fn kill(&self, signal: u8) -> Result<(), AgentError> {
        send(&self.commands, self.id, HostMessage::ExecKill { signal }).await
    }
}

/// Sends a further message on request `id`; returns once it is queued on the connection
/// (data waits there for the agent's credit, so a caller has at most one chunk in the
/// driver).
async fn send(
    commands: &mpsc::UnboundedSender<Command>,
    id: proto::agent::RequestId,
    message: HostMessage,
) -> Result<(), AgentError> {
    let (done_tx, done) = oneshot::channel();
    commands
        .send(Command::Send {
            id,
            message,
            done: done_tx,
        })
        .map_err(|_| AgentError::Closed)?;
    done.await.map_err(|_| AgentError::Closed)?
}

/// A finished process's result, from [`Exec::collect`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Output bytes beyond the limit, read and not kept.
    pub dropped: u64,
}
