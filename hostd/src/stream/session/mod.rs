//! One viewer's session as a pure state machine (sans-IO, in the style of quinn-proto).
//!
//! [`Session`] owns every per-viewer decision: the Hello and its deadline, the outcome of
//! authorization and admission, rights (view-only viewers' input is refused with a code),
//! held keys (released at token expiry and, by [`ParkedSessions`], when a dropped session's
//! resume window closes), frame delivery (newest wins: frames beyond the in-flight limit are
//! dropped, then nothing but a keyframe is sent; a keyframe cancels older frames still in
//! flight), keyframes on join, request and after drops, ABR ([`super::abr::Controller`]
//! ticks) and whole-session token expiry (`SessionExpiring`, then the end after
//! `expiry_grace`). Events and `now` go in through [`Session::handle`] and
//! [`Session::handle_timeout`]; [`Session::poll_action`] says what to do and
//! [`Session::poll_timeout`] when to call back. No clock, socket or task in here: the quinn
//! driver in [`super::server`] executes the actions, `tests.rs` drives it on simulated time.

mod held;
#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::stream::{
    self as wire, ClientMessage, ClientStats, Codec, ErrorCode, FrameHeader, InputEvent,
    MessageReader, Rights, ServerMessage, ServerStats, StreamConfig, MAX_HELLO_LEN,
    MAX_MESSAGE_LEN,
};
use tracing::{debug, info, warn};

pub use held::{Expired, HeldInput, Opened, ParkedSessions};

use super::abr::{self, BitrateLimits, Controller, PathSample};
use super::token::{Claims, EnvRef, Revocations, TokenError, TokenId, TokenKey};

/// Farther than any token lives (hostd issues at most a week): an expiry beyond it is
/// treated as never reached instead of overflowing the clock.
pub const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Server statistics go to the viewer every this many ABR ticks (one second).
const STATS_EVERY_TICKS: u64 = 5;

/// Converts `Instant`s to the wire's microseconds since the Unix epoch, from one reading of
/// both clocks taken by the driver.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    instant: Instant,
    unix_us: u64,
}

impl Clock {
    /// The clocks read `instant` and `unix_us` at the same moment.
    pub fn new(instant: Instant, unix_us: u64) -> Self {
        Self { instant, unix_us }
    }

    /// Microseconds since the Unix epoch at `at`.
    pub fn unix_us(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_us + d.as_micros() as u64,
            None => self
                .unix_us
                .saturating_sub(self.instant.duration_since(at).as_micros() as u64),
        }
    }

    /// Whole seconds since the Unix epoch at `at` (what tokens are checked against).
    pub fn unix_s(&self, at: Instant) -> u64 {
        self.unix_us(at) / 1_000_000
    }

    /// The `Instant` at which the system clock reads `unix_s` (`now` if that has passed,
    /// [`FAR_FUTURE`] from now at most).
    pub fn instant_at_unix(&self, unix_s: u64, now: Instant) -> Instant {
        let left_us = unix_s
            .saturating_mul(1_000_000)
            .saturating_sub(self.unix_us(now));
        now + Duration::from_micros(left_us).min(FAR_FUTURE)
    }
}

/// One encoded frame of the shared encoder, as published to every viewer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub sequence: u64,
    pub capture_time_us: u64,
    pub keyframe: bool,
    pub width: u16,
    pub height: u16,
    /// The stream's frame rate and the encoder's bitrate when this frame was encoded.
    pub fps_milli: u32,
    pub bitrate_bps: u32,
    pub data: Vec<u8>,
}

impl Frame {
    /// The header that starts this frame's unidirectional stream.
    pub fn header(&self) -> FrameHeader {
        FrameHeader {
            sequence: self.sequence,
            capture_time_us: self.capture_time_us,
            keyframe: self.keyframe,
            codec: Codec::H264AnnexB,
            width: self.width,
            height: self.height,
            payload_len: self.data.len() as u32,
        }
    }

    /// The stream configuration this frame belongs to.
    pub fn config(&self) -> StreamConfig {
        StreamConfig {
            width: self.width,
            height: self.height,
            fps_milli: self.fps_milli,
            codec: Codec::H264AnnexB,
            bitrate_bps: self.bitrate_bps,
        }
    }
}

/// A reason to end a session, sent to the client before closing (and as the close code).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        Refusal::new(e.code(), e.to_string())
    }
}

/// What a Hello asks for; the driver answers with [`Event::Authorized`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRequest {
    pub env_id: String,
    pub token: String,
    /// The session to resume, if the client names one.
    pub resume: Option<[u8; 16]>,
}

/// What authorization and admission granted a Hello.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub claims: Claims,
    /// The session opened (or resumed: then what it held is released at expiry like fresh
    /// presses).
    pub session: Opened,
    /// The environment's stream configuration now.
    pub config: StreamConfig,
}

/// Checks a Hello's token for the environment `lookup` finds under its name: signature
/// first (a peer without a genuine token learns nothing, not even which environments
/// stream), then the environment, expiry and scope, revocation and the view right.
pub fn check_token<E>(
    tokens: &TokenKey,
    revocations: &Revocations,
    hello: &HelloRequest,
    lookup: impl FnOnce(&str) -> Option<(EnvRef, E)>,
    now_unix: u64,
) -> Result<(Claims, E), Refusal> {
    tokens.decode(&hello.token)?;
    let (env_ref, env) = lookup(&hello.env_id).ok_or_else(|| {
        Refusal::new(
            ErrorCode::NoSuchEnvironment,
            format!("environment {:?} is not streaming", hello.env_id),
        )
    })?;
    let claims = tokens.verify_at(&hello.token, &env_ref, now_unix)?;
    revocations.check(&claims)?;
    if !claims.rights.contains(Rights::VIEW) {
        return Err(Refusal::new(
            ErrorCode::PermissionDenied,
            "token lacks the view right",
        ));
    }
    Ok((claims, env))
}

/// Tunables of one session (from the server's configuration).
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Time a client has, once connected, to open the control stream and send Hello.
    pub hello_timeout: Duration,
    /// How long video continues after the token expired (input stops at once).
    pub expiry_grace: Duration,
    /// How long a dropped session can be resumed (announced in the Welcome).
    pub resume_grace: Duration,
    /// Frames in flight beyond what two RTTs hold at the frame rate, before drops.
    pub max_frames_in_flight: usize,
    pub bitrate: BitrateLimits,
}

/// The connection's path as the transport sees it now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PathStats {
    pub rtt: Duration,
    pub cwnd_bytes: u64,
    /// Cumulative packet counters.
    pub sent_packets: u64,
    pub lost_packets: u64,
}

/// Something that happened to the session.
#[derive(Debug)]
pub enum Event<'a> {
    /// The client opened its control stream.
    ControlOpened,
    /// Bytes arrived on the control stream, in order.
    ControlData(&'a [u8]),
    /// The client finished (or reset) its control stream: it left.
    ControlFinished,
    /// The answer to [`Action::Authorize`]: a grant, or why not (token, environment, resume
    /// or the admission caps).
    Authorized(Result<Grant, Refusal>),
    /// The shared encoder published a frame.
    Frame(Arc<Frame>),
    /// The driver fell this many frames behind the encoder and skipped them.
    FramesLagged(u64),
    /// The frame stream of `sequence` ended: acknowledged, reset or failed.
    FrameDone(u64),
    /// Fresh path statistics; the driver reports them before every timeout it handles and
    /// every frame (the in-flight limit uses the RTT).
    Path(PathStats),
    /// The revocation list changed.
    Revocations(&'a Revocations),
    /// The environment stopped streaming.
    EnvironmentClosed,
    /// The environment's clipboard changed (in the guest, or set by another viewer): sent
    /// to this viewer if it holds the clipboard right.
    EnvironmentClipboard(&'a str),
    /// The connection is gone (closed, timed out, or the control stream failed).
    ConnectionLost,
    /// The environment cannot do what an action asked ([`Action::SetClipboard`],
    /// [`Action::Resize`]): the viewer is told once per kind, later ones are only counted.
    Unavailable { what: Capability, reason: String },
}

/// What a viewer can ask of the environment beyond input events, each answered
/// [`ErrorCode::Unavailable`] once per session when the environment cannot do it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Clipboard,
    Resize,
}

impl Capability {
    fn bit(self) -> u8 {
        match self {
            Capability::Clipboard => 1,
            Capability::Resize => 2,
        }
    }
}

impl std::fmt::Display for Capability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Capability::Clipboard => "clipboard",
            Capability::Resize => "resize",
        })
    }
}

/// What the audit chain keeps of a viewer's session; the driver adds the environment, the
/// viewer's address and the time. At most one `FirstUse` per right and session, so a viewer
/// cannot flood the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ViewerRecord {
    /// The session opened (or resumed) with this token.
    Joined {
        token: TokenId,
        rights: Rights,
        resumed: bool,
    },
    /// The viewer used `right` ([`Rights::INPUT`] or [`Rights::CLIPBOARD`]) for the first
    /// time in this session.
    FirstUse { token: TokenId, right: Rights },
    /// The session ended (it may still be resumed): what the viewer did in it.
    Left {
        token: TokenId,
        input_events: u64,
        clipboard_sets: u64,
    },
}

/// Something the driver must do, in the order polled.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Check this Hello (tokens, environment, resume, admission caps) and answer with
    /// [`Event::Authorized`].
    Authorize(HelloRequest),
    /// Write this message on the control stream.
    Send(ServerMessage),
    /// Send this frame on a new unidirectional stream; report [`Event::FrameDone`] when the
    /// stream ends.
    SendFrame(Arc<Frame>),
    /// Reset the streams of frames older than `sequence` (a keyframe supersedes them).
    CancelFramesBefore(u64),
    /// Deliver these events to the environment's input, in order.
    Inject(Vec<InputEvent>),
    SetClipboard(String),
    Resize {
        width: u16,
        height: u16,
    },
    /// Ask the shared encoder for a keyframe.
    RequestKeyframe,
    /// This viewer's ABR target for the shared encoder.
    SetBitrateTarget(u32),
    /// Append this to the audit chain.
    Record(ViewerRecord),
    /// Send `Error` with the refusal on the control stream (if open), then close the
    /// connection with its code. Nothing follows.
    Close(Refusal),
}

/// Counters of one session.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub frames_sent: u64,
    /// Every frame not sent to this viewer.
    pub frames_dropped: u64,
    /// Frames not sent because the path did not drain (in-flight limit, lag): the ABR's
    /// congestion signal. Frames skipped while waiting for a keyframe are consequences,
    /// not new signals, and are only in `frames_dropped`.
    pub frames_congested: u64,
    pub input_refused: u64,
    /// Input events delivered to the environment.
    pub input_events: u64,
    /// Clipboard texts handed to the environment.
    pub clipboard_sets: u64,
    /// Clipboard texts of the environment sent to the viewer.
    pub clipboard_received: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until the Hello: the deadline for it.
    AwaitingHello {
        deadline: Instant,
    },
    /// The Hello went out as [`Action::Authorize`].
    Authorizing,
    Open,
    Ended,
}

/// State of an open session.
#[derive(Debug)]
struct Open {
    id: [u8; 16],
    claims: Claims,
    rights: Rights,
    expires_at: Instant,
    expired: bool,
    /// The viewer was told once about refused input since the rights last changed.
    refusal_reported: bool,
    /// [`Capability::bit`]s the viewer was told are unavailable.
    unavailable_reported: u8,
    /// Rights whose first use is in the audit chain.
    used: Rights,
    held: HeldInput,
    config: StreamConfig,
    needs_keyframe: bool,
    in_flight: BTreeSet<u64>,
    abr: Controller,
    next_tick: Instant,
    ticks: u64,
    /// What the viewer last reported of its side (decoded frames, latency), if it has.
    client: Option<ClientStats>,
}

/// One viewer's session. See the module documentation.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    clock: Clock,
    phase: Phase,
    reader: MessageReader,
    version: u16,
    control_open: bool,
    hello_timed_out: bool,
    open: Option<Open>,
    path: PathStats,
    stats: SessionStats,
    actions: VecDeque<Action>,
}

impl Session {
    /// A connection that completed its handshake at `now`.
    pub fn new(cfg: SessionConfig, clock: Clock, now: Instant) -> Self {
        Self {
            cfg,
            clock,
            phase: Phase::AwaitingHello {
                deadline: now + cfg.hello_timeout,
            },
            // Before authentication only a Hello's worth is accepted: a longer length prefix
            // is refused as soon as it arrives.
            reader: MessageReader::with_limit(MAX_HELLO_LEN),
            version: 0,
            control_open: false,
            hello_timed_out: false,
            open: None,
            path: PathStats::default(),
            stats: SessionStats::default(),
            actions: VecDeque::new(),
        }
    }

    /// Feeds one event that happened at `now`.
    pub fn handle(&mut self, event: Event<'_>, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        match event {
            Event::ControlOpened => self.control_open = true,
            Event::ControlData(bytes) => {
                self.reader.push(bytes);
                self.read_messages(now);
            }
            Event::ControlFinished | Event::ConnectionLost => self.end(),
            Event::Unavailable { what, reason } => {
                if let Some(open) = self.open.as_mut() {
                    if open.unavailable_reported & what.bit() == 0 {
                        open.unavailable_reported |= what.bit();
                        self.actions.push_back(Action::Send(ServerMessage::Error {
                            code: ErrorCode::Unavailable,
                            message: format!("{what} unavailable: {reason}"),
                        }));
                    }
                }
            }
            Event::Authorized(grant) => self.on_authorized(grant, now),
            Event::EnvironmentClipboard(text) => {
                if let Some(open) = &self.open {
                    if open.rights.contains(Rights::CLIPBOARD) {
                        self.stats.clipboard_received += 1;
                        self.actions
                            .push_back(Action::Send(ServerMessage::Clipboard(text.to_owned())));
                    }
                }
            }
            Event::Frame(frame) => self.on_frame(frame),
            Event::FramesLagged(n) => {
                if let Some(open) = self.open.as_mut() {
                    self.stats.frames_dropped += n;
                    self.stats.frames_congested += n;
                    open.needs_keyframe = true;
                    self.actions.push_back(Action::RequestKeyframe);
                }
            }
            Event::FrameDone(sequence) => {
                if let Some(open) = self.open.as_mut() {
                    open.in_flight.remove(&sequence);
                }
            }
            Event::Path(path) => self.path = path,
            Event::Revocations(list) => {
                if let Some(open) = &self.open {
                    if let Err(e) = list.check(&open.claims) {
                        self.close(e.into());
                    }
                }
            }
            Event::EnvironmentClosed => {
                let env = self.open.as_ref().map(|o| o.claims.env.name.clone());
                self.close(Refusal::new(
                    ErrorCode::NoSuchEnvironment,
                    format!(
                        "environment {:?} stopped streaming",
                        env.unwrap_or_default()
                    ),
                ));
            }
        }
    }

    /// Runs the timers due at `now` (see [`Session::poll_timeout`]).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingHello { deadline } if now >= deadline => {
                self.hello_timed_out = true;
                let what = if self.control_open {
                    "Hello received"
                } else {
                    "control stream opened"
                };
                self.close(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    format!("no {what} in time"),
                ));
            }
            Phase::Open => self.open_timers(now),
            _ => {}
        }
    }

    /// The next action for the driver.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingHello { deadline } => Some(deadline),
            Phase::Open => {
                let open = self.open.as_ref()?;
                let expiry = if open.expired {
                    open.expires_at + self.cfg.expiry_grace
                } else {
                    open.expires_at
                };
                Some(open.next_tick.min(expiry))
            }
            Phase::Authorizing | Phase::Ended => None,
        }
    }

    /// Whether the session is over (after the last action is polled, the driver stops).
    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// Whether the session is authenticated and not over.
    pub fn is_open(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The session id, once open.
    pub fn id(&self) -> Option<[u8; 16]> {
        self.open.as_ref().map(|o| o.id)
    }

    /// The token's claims, once open.
    pub fn claims(&self) -> Option<&Claims> {
        self.open.as_ref().map(|o| &o.claims)
    }

    /// What the viewer holds down now (for parking when the connection drops).
    pub fn held(&self) -> HeldInput {
        self.open
            .as_ref()
            .map(|o| o.held.clone())
            .unwrap_or_default()
    }

    /// Whether the session ended because no Hello came in time.
    pub fn hello_timed_out(&self) -> bool {
        self.hello_timed_out
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// What the viewer last reported of its side ([`ClientMessage::Stats`]), once open.
    pub fn client_stats(&self) -> Option<ClientStats> {
        self.open.as_ref().and_then(|o| o.client)
    }

    /// The path as last measured ([`Event::Path`]).
    pub fn path(&self) -> PathStats {
        self.path
    }

    /// The current ABR target, once open.
    pub fn bitrate_target(&self) -> Option<u32> {
        self.open.as_ref().map(|o| o.abr.target_bps())
    }

    fn close(&mut self, refusal: Refusal) {
        if self.phase == Phase::Ended {
            return;
        }
        self.end();
        self.actions.push_back(Action::Close(refusal));
    }

    /// Ends the session; an open one leaves its record for the audit chain.
    fn end(&mut self) {
        if self.phase == Phase::Ended {
            return;
        }
        self.phase = Phase::Ended;
        if let Some(open) = &self.open {
            self.actions.push_back(Action::Record(ViewerRecord::Left {
                token: open.claims.id,
                input_events: self.stats.input_events,
                clipboard_sets: self.stats.clipboard_sets,
            }));
        }
    }

    /// Records the first use of `right` in this session.
    fn record_first_use(&mut self, right: Rights) {
        if let Some(open) = self.open.as_mut() {
            if !open.used.contains(right) {
                open.used = open.used | right;
                self.actions
                    .push_back(Action::Record(ViewerRecord::FirstUse {
                        token: open.claims.id,
                        right,
                    }));
            }
        }
    }

    fn read_messages(&mut self, now: Instant) {
        while matches!(self.phase, Phase::AwaitingHello { .. } | Phase::Open) {
            match self.reader.next_message::<ClientMessage>() {
                Ok(Some(msg)) => self.on_message(msg, now),
                Ok(None) => return,
                Err(e) => {
                    return self.close(Refusal::new(
                        ErrorCode::ProtocolViolation,
                        format!("malformed control message: {e}"),
                    ))
                }
            }
        }
    }

    fn on_message(&mut self, msg: ClientMessage, now: Instant) {
        if matches!(self.phase, Phase::AwaitingHello { .. }) {
            return self.on_hello(msg);
        }
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let expired = open.expired;
        let denied = |what: &str, right: &str| ServerMessage::Error {
            code: ErrorCode::PermissionDenied,
            message: if expired {
                format!("{what} refused: token expired")
            } else {
                format!("{what} refused: token lacks the {right} right")
            },
        };
        match msg {
            ClientMessage::Input(ev) => {
                if !open.rights.contains(Rights::INPUT) {
                    self.stats.input_refused += 1;
                    if !open.refusal_reported {
                        open.refusal_reported = true;
                        let msg = denied("input", "input");
                        if let ServerMessage::Error { message, .. } = &msg {
                            warn!(env = %open.claims.env.name, "{message}");
                        }
                        self.actions.push_back(Action::Send(msg));
                    }
                    return;
                }
                let ev = clamp_event(ev, &open.config);
                tracing::trace!(env = %open.claims.env.name, ?ev, "input");
                open.held.track(&ev);
                self.stats.input_events += 1;
                self.record_first_use(Rights::INPUT);
                self.actions.push_back(Action::Inject(vec![ev]));
            }
            ClientMessage::KeyframeRequest => self.actions.push_back(Action::RequestKeyframe),
            ClientMessage::Ping { client_time_us } => {
                self.actions.push_back(Action::Send(ServerMessage::Pong {
                    client_time_us,
                    server_time_us: self.clock.unix_us(now),
                }))
            }
            ClientMessage::Clipboard(text) => {
                if open.rights.contains(Rights::CLIPBOARD) {
                    self.stats.clipboard_sets += 1;
                    self.record_first_use(Rights::CLIPBOARD);
                    self.actions.push_back(Action::SetClipboard(text));
                } else {
                    // Logged at debug: a viewer sends as many as it likes.
                    debug!(env = %open.claims.env.name, expired, "clipboard refused");
                    let msg = denied("clipboard", "clipboard");
                    self.actions.push_back(Action::Send(msg));
                }
            }
            ClientMessage::Resize { width, height } => {
                if open.rights.contains(Rights::INPUT) {
                    self.actions.push_back(Action::Resize { width, height });
                } else {
                    self.actions
                        .push_back(Action::Send(denied("resize", "input")));
                }
            }
            ClientMessage::Stats(s) => open.client = Some(s),
            ClientMessage::Hello { .. } => self.close(Refusal::new(
                ErrorCode::ProtocolViolation,
                "Hello sent twice",
            )),
        }
    }

    fn on_hello(&mut self, msg: ClientMessage) {
        let ClientMessage::Hello {
            min_version,
            max_version,
            env_id,
            token,
            resume,
            ..
        } = msg
        else {
            return self.close(Refusal::new(
                ErrorCode::ProtocolViolation,
                "first message must be Hello",
            ));
        };
        let Some(version) = wire::negotiate_version(min_version, max_version) else {
            return self.close(Refusal::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "client speaks versions {min_version}..={max_version}, server {}..={}",
                    wire::MIN_VERSION,
                    wire::VERSION
                ),
            ));
        };
        self.version = version;
        self.phase = Phase::Authorizing;
        self.actions.push_back(Action::Authorize(HelloRequest {
            env_id,
            token,
            resume: (resume != [0; 16]).then_some(resume),
        }));
    }

    fn on_authorized(&mut self, grant: Result<Grant, Refusal>, now: Instant) {
        if self.phase != Phase::Authorizing {
            return;
        }
        let grant = match grant {
            Ok(g) => g,
            Err(r) => {
                warn!(code = ?r.code, reason = %r.message, "viewer refused");
                return self.close(r);
            }
        };
        info!(env = %grant.claims.env.name, rights = %grant.claims.rights,
              token = %grant.claims.id, resumed = grant.session.resumed, "viewer joined");
        self.actions.push_back(Action::Record(ViewerRecord::Joined {
            token: grant.claims.id,
            rights: grant.claims.rights,
            resumed: grant.session.resumed,
        }));
        self.actions.push_back(Action::Send(ServerMessage::Welcome {
            version: self.version,
            session_id: grant.session.id,
            rights: grant.claims.rights,
            resumed: grant.session.resumed,
            resume_grace_ms: self.cfg.resume_grace.as_millis().min(u128::from(u32::MAX)) as u32,
            config: grant.config,
        }));
        // A joining viewer needs a picture now, whatever the encoder is doing.
        self.actions.push_back(Action::RequestKeyframe);
        let expires_at = self.clock.instant_at_unix(grant.claims.expires_unix, now);
        self.open = Some(Open {
            id: grant.session.id,
            rights: grant.claims.rights,
            claims: grant.claims,
            expires_at,
            expired: false,
            refusal_reported: false,
            unavailable_reported: 0,
            used: Rights::empty(),
            held: grant.session.held,
            config: grant.config,
            needs_keyframe: true,
            in_flight: BTreeSet::new(),
            abr: Controller::new(self.cfg.bitrate),
            next_tick: now + abr::TICK,
            ticks: 0,
            client: None,
        });
        self.phase = Phase::Open;
        self.reader.set_limit(MAX_MESSAGE_LEN);
        // Messages the client sent right behind its Hello.
        self.read_messages(now);
        self.open_timers(now);
    }

    fn on_frame(&mut self, frame: Arc<Frame>) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        let config = frame.config();
        if (config.width, config.height) != (open.config.width, open.config.height) {
            self.actions
                .push_back(Action::Send(ServerMessage::Config(config)));
        }
        open.config = config;
        if frame.keyframe {
            // Everything older is useless once the keyframe is there: stop spending bandwidth.
            open.needs_keyframe = false;
            if open.in_flight.first().is_some_and(|&s| s < frame.sequence) {
                open.in_flight = open.in_flight.split_off(&frame.sequence);
                self.actions
                    .push_back(Action::CancelFramesBefore(frame.sequence));
            }
        } else if open.needs_keyframe {
            self.stats.frames_dropped += 1;
            return;
        } else if open.in_flight.len()
            >= in_flight_limit(
                self.cfg.max_frames_in_flight,
                self.path.rtt,
                config.fps_milli,
            )
        {
            self.stats.frames_dropped += 1;
            self.stats.frames_congested += 1;
            open.needs_keyframe = true;
            self.actions.push_back(Action::RequestKeyframe);
            return;
        }
        open.in_flight.insert(frame.sequence);
        self.stats.frames_sent += 1;
        self.actions.push_back(Action::SendFrame(frame));
    }

    fn open_timers(&mut self, now: Instant) {
        let grace = self.cfg.expiry_grace;
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if !open.expired && now >= open.expires_at {
            // Everything but viewing ends now; keys this viewer holds are let go, as nothing
            // it sends will release them any more. Sessions are only admitted with the view
            // right.
            open.expired = true;
            open.rights = Rights::VIEW;
            open.refusal_reported = false;
            let releases = std::mem::take(&mut open.held).releases();
            if !releases.is_empty() {
                self.actions.push_back(Action::Inject(releases));
            }
            info!(env = %open.claims.env.name, "token expired: input stopped");
            self.actions.push_back(Action::Send(ServerMessage::Error {
                code: ErrorCode::SessionExpiring,
                message: format!(
                    "token expired: input is no longer accepted; video ends in {} s",
                    grace.as_secs()
                ),
            }));
        }
        if open.expired && now >= open.expires_at + grace {
            return self.close(Refusal::new(
                ErrorCode::TokenExpired,
                format!("token expired {} s ago; session ended", grace.as_secs()),
            ));
        }
        if now >= open.next_tick {
            self.abr_tick(now);
        }
    }

    fn abr_tick(&mut self, now: Instant) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        // A driver that woke late does not get a burst of ticks.
        while open.next_tick <= now {
            open.next_tick += abr::TICK;
        }
        let target = open.abr.update(PathSample {
            rtt: self.path.rtt,
            cwnd_bytes: self.path.cwnd_bytes,
            sent_packets: self.path.sent_packets,
            lost_packets: self.path.lost_packets,
            dropped_frames: self.stats.frames_congested,
        });
        self.actions.push_back(Action::SetBitrateTarget(target));
        open.ticks += 1;
        if open.ticks % STATS_EVERY_TICKS == 0 {
            self.actions
                .push_back(Action::Send(ServerMessage::Stats(ServerStats {
                    bitrate_bps: open.config.bitrate_bps,
                    rtt_us: self.path.rtt.as_micros().min(u128::from(u32::MAX)) as u32,
                    loss_permille: (open.abr.last_loss * 1000.0) as u16,
                    cwnd_bytes: self.path.cwnd_bytes.min(u64::from(u32::MAX)) as u32,
                    frames_sent: self.stats.frames_sent,
                    frames_dropped: self.stats.frames_dropped,
                })));
        }
    }
}

/// Keeps pointer coordinates inside the current frame.
fn clamp_event(ev: InputEvent, cfg: &StreamConfig) -> InputEvent {
    let (mx, my) = (cfg.width.saturating_sub(1), cfg.height.saturating_sub(1));
    match ev {
        InputEvent::PointerMove { x, y } => InputEvent::PointerMove {
            x: x.min(mx),
            y: y.min(my),
        },
        InputEvent::Touch { id, phase, x, y } => InputEvent::Touch {
            id,
            phase,
            x: x.min(mx),
            y: y.min(my),
        },
        other => other,
    }
}

/// Frames a viewer may have unacknowledged: the configured slack plus what two round trips
/// hold at the stream's frame rate (one for the acknowledgement, one for a loss to be
/// detected and repaired; acknowledgements take an RTT even on an idle path).
fn in_flight_limit(slack: usize, rtt: Duration, fps_milli: u32) -> usize {
    let per_rtt = 2.0 * rtt.as_secs_f64() * f64::from(fps_milli) / 1000.0;
    slack + per_rtt.ceil() as usize
}
