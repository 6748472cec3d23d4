//! Sans-IO agent session: bytes in → frames out, frames in → bytes out, with the Hello
//! exchange and per-request flow control.
//!
//! Both ends use the same type: [`HostSession`] in hostd's agent client, [`AgentSession`] in
//! genos-agent. A driver pushes what it read from the transport into [`Session::receive`],
//! takes frames from [`Session::poll`], queues frames with [`Session::send`] and writes
//! [`Session::output`] to the transport. Nothing here blocks, reads a clock or does I/O.
//!
//! Flow control: a request with streams (exec, file put, file get) gives each direction a
//! window of [`INITIAL_WINDOW`] bytes of data. A sender may send data only within the credit
//! the receiver granted; the receiver grants more ([`HostMessage::Credit`],
//! [`AgentMessage::Credit`]) as its application reports data consumed
//! ([`Session::consumed`]). So a slow reader bounds what the other side can make it buffer.

use std::collections::HashMap;
use std::marker::PhantomData;

use thiserror::Error;

use super::codec::{hello_version, ty, Frame};
use super::{
    AgentMessage, DecodeError, ErrorCode, Features, HostMessage, Message, MessageReader, RequestId,
    INITIAL_WINDOW, MAX_CHUNK_LEN, MAX_FRAME_LEN, MAX_HELLO_LEN, MAX_OPEN_STREAMS, MAX_WINDOW,
    VERSION_MAJOR, VERSION_MINOR,
};

/// What a message means to the session (as opposed to the application).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello,
    /// Opens a request with data streams (host only).
    Open,
    /// Starts a request without streams (host only): its id must not be 0 or in use.
    Request,
    /// Flow-controlled data of this many bytes.
    Data(usize),
    /// Grants the peer more data on a request.
    Credit(u32),
    /// Ends a request (agent only): its streams are gone on both sides.
    Close,
    Other,
}

/// Which end of the connection a session is.
pub trait Side {
    /// Messages this side sends.
    type Out: std::fmt::Debug + PartialEq;
    /// Messages this side receives.
    type In: std::fmt::Debug;
    /// The Hello frame's type byte of the peer.
    const PEER_HELLO: u8;
    fn kind_out(m: &Self::Out) -> Kind;
    fn kind_in(m: &Self::In) -> Kind;
    fn credit(bytes: u32) -> Self::Out;
}

/// The host end (hostd's agent client).
#[derive(Debug)]
pub enum Host {}
/// The guest end (genos-agent).
#[derive(Debug)]
pub enum Agent {}

fn host_kind(m: &HostMessage) -> Kind {
    use HostMessage as H;
    match m {
        H::Hello { .. } => Kind::Hello,
        H::Exec(_) | H::FilePut(_) | H::FileGet(_) => Kind::Open,
        H::ExecStdin(d) | H::FileData(d) => Kind::Data(d.len()),
        H::Credit { bytes } => Kind::Credit(*bytes),
        H::ExecStdinEof | H::ExecKill { .. } | H::FileEnd => Kind::Other,
        H::ReadyQuery
        | H::ClipboardGet { .. }
        | H::ClipboardSet(_)
        | H::DisplaySetMode { .. }
        | H::TimeSet { .. }
        | H::NetworkConfigure(_)
        | H::Power(_) => Kind::Request,
    }
}

fn agent_kind(m: &AgentMessage) -> Kind {
    use AgentMessage as A;
    match m {
        A::Hello { .. } => Kind::Hello,
        A::ExecOutput { data, .. } | A::FileData(data) => Kind::Data(data.len()),
        A::Credit { bytes } => Kind::Credit(*bytes),
        A::ExecExit { .. } | A::FileEnd | A::Done | A::Error { .. } => Kind::Close,
        _ => Kind::Other,
    }
}

impl Side for Host {
    type Out = HostMessage;
    type In = AgentMessage;
    const PEER_HELLO: u8 = ty::A_HELLO;
    fn kind_out(m: &HostMessage) -> Kind {
        host_kind(m)
    }
    fn kind_in(m: &AgentMessage) -> Kind {
        agent_kind(m)
    }
    fn credit(bytes: u32) -> HostMessage {
        HostMessage::Credit { bytes }
    }
}

impl Side for Agent {
    type Out = AgentMessage;
    type In = HostMessage;
    const PEER_HELLO: u8 = ty::HELLO;
    fn kind_out(m: &AgentMessage) -> Kind {
        agent_kind(m)
    }
    fn kind_in(m: &HostMessage) -> Kind {
        host_kind(m)
    }
    fn credit(bytes: u32) -> AgentMessage {
        AgentMessage::Credit { bytes }
    }
}

/// The session hostd's agent client drives.
pub type HostSession = Session<Host>;
/// The session genos-agent drives.
pub type AgentSession = Session<Agent>;

/// Why the connection cannot go on. After one of these the session is closed; the agent side
/// has queued an `Error` frame (id 0) saying why, which the driver should still write.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SessionError {
    #[error("peer speaks protocol {theirs}.x; this end speaks {ours}.x")]
    UnsupportedVersion { ours: u16, theirs: u16 },
    #[error("malformed frame")]
    Decode(#[from] DecodeError),
    #[error("protocol violation: {0}")]
    Violation(String),
    #[error("agent refused the connection ({code:?}): {message}")]
    Refused { code: ErrorCode, message: String },
    #[error("session is closed")]
    Closed,
}

/// Why a frame was not queued. The session is unchanged: nothing was sent.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SendError {
    #[error("request {id} has {credit} bytes of credit, the chunk is {len}")]
    NoCredit {
        id: RequestId,
        credit: u64,
        len: usize,
    },
    #[error("request {id} has no open stream")]
    NotOpen { id: RequestId },
    #[error("request {id} is already open")]
    IdInUse { id: RequestId },
    #[error("request id 0 is reserved for the connection")]
    ReservedId,
    #[error("{MAX_OPEN_STREAMS} requests with streams are open already")]
    TooManyStreams,
    #[error("message does not fit the wire format: {0}")]
    Invalid(DecodeError),
    #[error("a string or list is longer than its field")]
    Cut,
    #[error("the Hello exchange has not finished")]
    NotReady,
    #[error("session is closed")]
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello,
    Open,
    Closed,
}

/// Flow-control state of one request's data streams (both directions).
#[derive(Debug, Clone, Copy)]
struct Stream {
    /// Bytes this side may still send.
    send_credit: u64,
    /// Bytes the peer may still send.
    recv_window: u64,
    /// Received but not yet reported consumed by the application.
    buffered: u64,
    /// Consumed but not yet granted back to the peer.
    unacked: u64,
}

impl Stream {
    fn new() -> Self {
        Stream {
            send_credit: INITIAL_WINDOW.into(),
            recv_window: INITIAL_WINDOW.into(),
            buffered: 0,
            unacked: 0,
        }
    }
}

/// One end of an agent connection.
#[derive(Debug)]
pub struct Session<S: Side> {
    reader: MessageReader,
    out: Vec<u8>,
    state: State,
    /// Agent side: what its Hello says.
    hello: Option<(String, Features)>,
    peer_minor: u16,
    streams: HashMap<RequestId, Stream>,
    side: PhantomData<S>,
}

impl Session<Host> {
    /// A host session; its Hello is already queued.
    pub fn new() -> Self {
        let mut s = Self::blank(None);
        Frame::new(
            RequestId::CONNECTION,
            HostMessage::Hello {
                major: VERSION_MAJOR,
                minor: VERSION_MINOR,
            },
        )
        .encode(&mut s.out);
        s
    }
}

impl Default for Session<Host> {
    fn default() -> Self {
        Self::new()
    }
}

impl Session<Agent> {
    /// An agent session that answers the host's Hello naming `agent` and its `features`.
    pub fn new(agent: &str, features: Features) -> Self {
        Self::blank(Some((agent.to_owned(), features)))
    }
}

impl<S: Side> Session<S>
where
    Frame<S::Out>: Message,
    Frame<S::In>: Message,
{
    fn blank(hello: Option<(String, Features)>) -> Self {
        Session {
            reader: MessageReader::with_limit(MAX_HELLO_LEN),
            out: Vec::new(),
            state: State::AwaitingHello,
            hello,
            peer_minor: 0,
            streams: HashMap::new(),
            side: PhantomData,
        }
    }

    /// Appends bytes read from the transport.
    pub fn receive(&mut self, bytes: &[u8]) {
        if self.state != State::Closed {
            self.reader.push(bytes);
        }
    }

    /// Bytes received but not yet decoded (a driver stops reading above a bound).
    pub fn buffered_input(&self) -> usize {
        self.reader.buffered()
    }

    /// Bytes to write to the transport.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    /// Marks `n` bytes of [`Session::output`] as written.
    pub fn advance_output(&mut self, n: usize) {
        self.out.drain(..n.min(self.out.len()));
    }

    /// Takes all pending output.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Whether the Hello exchange finished and the session is usable.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// The peer's minor version (valid once open).
    pub fn peer_minor(&self) -> u16 {
        self.peer_minor
    }

    /// Whether request `id` has open data streams.
    pub fn stream_open(&self, id: RequestId) -> bool {
        self.streams.contains_key(&id)
    }

    /// Bytes of data this side may send on `id` now (0 if it has no stream).
    pub fn send_credit(&self, id: RequestId) -> u64 {
        self.streams.get(&id).map_or(0, |s| s.send_credit)
    }

    /// Requests with open streams.
    pub fn open_streams(&self) -> usize {
        self.streams.len()
    }

    /// The application processed `n` bytes of data received on `id`; grants the peer more
    /// once half a window has been consumed (fewer, larger Credit frames).
    pub fn consumed(&mut self, id: RequestId, n: usize) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        let n = (n as u64).min(s.buffered);
        s.buffered -= n;
        s.unacked += n;
        if s.unacked >= u64::from(INITIAL_WINDOW / 2) {
            let bytes = s.unacked as u32;
            s.recv_window += s.unacked;
            s.unacked = 0;
            Frame::new(id, S::credit(bytes)).encode(&mut self.out);
        }
    }

    /// Queues `message` on request `id`.
    pub fn send(&mut self, id: RequestId, message: S::Out) -> Result<(), SendError> {
        match self.state {
            State::Closed => return Err(SendError::Closed),
            // The host may pipeline requests behind its Hello; the agent answers only after.
            State::AwaitingHello if self.hello.is_some() => return Err(SendError::NotReady),
            _ => {}
        }
        let kind = S::kind_out(&message);
        match kind {
            Kind::Data(len) => {
                if len > MAX_CHUNK_LEN {
                    return Err(SendError::Invalid(DecodeError::TooLong {
                        len,
                        limit: MAX_CHUNK_LEN,
                    }));
                }
                let s = self.streams.get_mut(&id).ok_or(SendError::NotOpen { id })?;
                if (len as u64) > s.send_credit {
                    return Err(SendError::NoCredit {
                        id,
                        credit: s.send_credit,
                        len,
                    });
                }
                s.send_credit -= len as u64;
                Frame::new(id, message).encode(&mut self.out);
                return Ok(());
            }
            Kind::Open | Kind::Request => {
                if id == RequestId::CONNECTION {
                    return Err(SendError::ReservedId);
                }
                if self.streams.contains_key(&id) {
                    return Err(SendError::IdInUse { id });
                }
                if kind == Kind::Open && self.streams.len() >= MAX_OPEN_STREAMS {
                    return Err(SendError::TooManyStreams);
                }
            }
            _ => {}
        }
        // Anything but data is small and rare: check it decodes at the peer before queueing,
        // so an over-long string or list is an error here rather than a cut value there.
        let frame = Frame::new(id, message);
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        if bytes.len() - 4 > MAX_FRAME_LEN {
            return Err(SendError::Invalid(DecodeError::TooLong {
                len: bytes.len() - 4,
                limit: MAX_FRAME_LEN,
            }));
        }
        let decoded = Frame::<S::Out>::decode_body(&bytes[4..]).map_err(SendError::Invalid)?;
        if decoded != frame {
            return Err(SendError::Cut);
        }
        match kind {
            Kind::Open => {
                self.streams.insert(id, Stream::new());
            }
            Kind::Close => {
                self.streams.remove(&id);
            }
            _ => {}
        }
        self.out.extend_from_slice(&bytes);
        Ok(())
    }

    /// The next frame for the application, `Ok(None)` when more bytes are needed. Hello and
    /// Credit frames are handled here (the peer's Hello is still returned, after its checks);
    /// data frames count against the request's window until [`Session::consumed`].
    pub fn poll(&mut self) -> Result<Option<Frame<S::In>>, SessionError> {
        if self.state == State::Closed {
            return Err(SessionError::Closed);
        }
        loop {
            match self.next_frame() {
                Ok(Some(Some(frame))) => return Ok(Some(frame)),
                Ok(Some(None)) => continue,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.fail(&e);
                    return Err(e);
                }
            }
        }
    }

    /// Closes the session; the agent side tells the host why in an Error frame (id 0).
    fn fail(&mut self, e: &SessionError) {
        self.state = State::Closed;
        self.streams.clear();
        if self.hello.is_some() {
            let code = match e {
                SessionError::UnsupportedVersion { .. } => ErrorCode::UnsupportedVersion,
                _ => ErrorCode::ProtocolViolation,
            };
            let frame = Frame::new(
                RequestId::CONNECTION,
                AgentMessage::Error {
                    code,
                    message: e.to_string(),
                },
            );
            frame.encode(&mut self.out);
        }
    }

    /// `Some(None)`: a frame the session consumed itself.
    fn next_frame(&mut self) -> Result<Option<Option<Frame<S::In>>>, SessionError> {
        if self.state == State::AwaitingHello {
            return self.next_hello();
        }
        let Some(frame) = self.reader.next_message::<Frame<S::In>>()? else {
            return Ok(None);
        };
        let id = frame.id;
        match S::kind_in(&frame.message) {
            Kind::Hello => return Err(SessionError::Violation("a second Hello".into())),
            // An answer on an id in use would end the open request at the host while it runs.
            Kind::Request if id == RequestId::CONNECTION || self.streams.contains_key(&id) => {
                return Err(SessionError::Violation(format!(
                    "a request on id {id}, which is reserved or in use"
                )));
            }
            Kind::Open => {
                if id == RequestId::CONNECTION {
                    return Err(SessionError::Violation(
                        "a request with streams on id 0".into(),
                    ));
                }
                if self.streams.contains_key(&id) {
                    return Err(SessionError::Violation(format!(
                        "request {id} opened while open"
                    )));
                }
                if self.streams.len() >= MAX_OPEN_STREAMS {
                    let refusal = Frame::new(
                        id,
                        AgentMessage::Error {
                            code: ErrorCode::TooLarge,
                            message: format!("{MAX_OPEN_STREAMS} requests are open already"),
                        },
                    );
                    refusal.encode(&mut self.out);
                    return Ok(Some(None));
                }
                self.streams.insert(id, Stream::new());
            }
            Kind::Data(len) => match self.streams.get_mut(&id) {
                Some(s) => {
                    if len as u64 > s.recv_window {
                        return Err(SessionError::Violation(format!(
                            "request {id}: {len} bytes of data beyond the {} bytes granted",
                            s.recv_window
                        )));
                    }
                    s.recv_window -= len as u64;
                    s.buffered += len as u64;
                }
                // The agent ends a request while the host may still be sending its data (a
                // process exits before reading all of its stdin): such data is late, not
                // hostile, and the application drops it as belonging to no request.
                None if self.hello.is_some() => {}
                None => {
                    return Err(SessionError::Violation(format!(
                        "data on request {id}, which has no stream"
                    )))
                }
            },
            Kind::Credit(bytes) => {
                // Credit for a request that just ended crosses its end on the wire.
                if let Some(s) = self.streams.get_mut(&id) {
                    s.send_credit += u64::from(bytes);
                    if s.send_credit > MAX_WINDOW {
                        return Err(SessionError::Violation(format!(
                            "request {id}: credit beyond {MAX_WINDOW} bytes"
                        )));
                    }
                }
                return Ok(Some(None));
            }
            Kind::Close => {
                self.streams.remove(&id);
            }
            Kind::Request | Kind::Other => {}
        }
        Ok(Some(Some(frame)))
    }

    fn next_hello(&mut self) -> Result<Option<Option<Frame<S::In>>>, SessionError> {
        // Read the version before decoding: a Hello of another major may have another body.
        let Some(raw) = self.reader.next_message::<RawFrame>()? else {
            return Ok(None);
        };
        let peer_ty = raw.0.first().copied();
        if self.hello.is_none() && peer_ty == Some(ty::A_ERROR) {
            let frame = Frame::<AgentMessage>::decode_body(&raw.0)?;
            if let AgentMessage::Error { code, message } = frame.message {
                return Err(SessionError::Refused { code, message });
            }
        }
        if peer_ty != Some(S::PEER_HELLO) {
            return Err(SessionError::Violation(
                "the first frame is not a Hello".into(),
            ));
        }
        let (major, minor) = hello_version(&raw.0).ok_or(DecodeError::Truncated)?;
        if major != VERSION_MAJOR {
            return Err(SessionError::UnsupportedVersion {
                ours: VERSION_MAJOR,
                theirs: major,
            });
        }
        let frame = Frame::<S::In>::decode_body(&raw.0)?;
        if frame.id != RequestId::CONNECTION {
            return Err(SessionError::Violation("Hello on a request id".into()));
        }
        self.peer_minor = minor;
        self.state = State::Open;
        self.reader.set_limit(MAX_FRAME_LEN);
        if let Some((agent, features)) = self.hello.clone() {
            Frame::new(
                RequestId::CONNECTION,
                AgentMessage::Hello {
                    major: VERSION_MAJOR,
                    minor: VERSION_MINOR,
                    agent,
                    features,
                },
            )
            .encode(&mut self.out);
        }
        Ok(Some(Some(frame)))
    }
}

/// A frame's bytes, undecoded (for the Hello's version check).
struct RawFrame(Vec<u8>);

impl Message for RawFrame {
    fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.0);
    }
    fn decode_body(msg: &[u8]) -> Result<Self, DecodeError> {
        Ok(RawFrame(msg.to_vec()))
    }
}
