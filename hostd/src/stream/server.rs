//! The QUIC stream server: accepts viewers, authenticates them with capability tokens and
//! fans one shared encoder per environment out to every viewer of it.
//!
//! Threads and tasks: each environment's source and encoder run on a dedicated OS thread
//! (blocking `next_frame` + CPU-bound encode) publishing into a broadcast channel, and the
//! source's pointer into a watch channel (latest value only). Each viewer is one task driving
//! its [`Session`] (the sans-IO core in [`super::session`] decides everything per viewer:
//! Hello, rights, held keys, newest-wins delivery and keyframes, resume, ABR, token expiry):
//! it feeds the session control-stream bytes, frames, stream completions, path statistics,
//! revocations and timeouts, and executes what it asks (control messages through a writer
//! task, frames on their own unidirectional streams, input into the environment). Beside it
//! run a control writer and a cursor task (the newest pointer state, at most once per frame
//! interval).
//!
//! Admission ([`super::admission`]): unvalidated handshakes are few (then QUIC Retry), every
//! handshake has a deadline, the Hello has a deadline and a size bound (the connection's
//! receive window is a few KiB until the token is accepted), and only authenticated sessions
//! count against the per-prefix and total session caps. Tokens are checked at Hello and for
//! the whole session: revocation ends it at once; expiry stops its input at once and its
//! video after `expiry_grace`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use encoder::{EncodeError, Encoder, EncoderConfig, Tuning};
use proto::stream::{
    self as wire, Codec, CursorImage, ErrorCode, Message, ServerMessage, StreamConfig,
    MAX_HELLO_LEN, MAX_MESSAGE_LEN,
};
use quinn::VarInt;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::abr::BitrateLimits;
use super::admission::{Admission, Decision, Limits, Stage};
use super::identity::Identity;
use super::session::{
    self, Action, Capability, Clock, Event, Expired, Frame, Grant, HeldInput, HelloRequest,
    ParkedSessions, PathStats, Refusal, Session, SessionConfig, SessionStats, ViewerRecord,
};
use super::source::{EnvironmentSource, InputError, InputSink};
use super::token::{EnvRef, Revocations, TokenId, TokenKey};

/// Connection-level receive window until the client has authenticated: room for one Hello
/// ([`MAX_HELLO_LEN`]) and its framing, nothing more is buffered for an unknown peer.
const PRE_AUTH_RECEIVE_WINDOW: u32 = 2 * MAX_HELLO_LEN as u32;
/// Connection-level receive window of an authenticated session: the largest control message
/// (a clipboard) twice over.
const SESSION_RECEIVE_WINDOW: u32 = 2 * MAX_MESSAGE_LEN as u32;

/// Why the server could not start or an environment could not be added.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("QUIC TLS configuration failed: {0}")]
    QuicTls(String),
    #[error("binding UDP {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("environment {0:?} is already being streamed")]
    DuplicateEnvironment(String),
    #[error("creating the encoder failed")]
    Encoder(#[from] encoder::EncodeError),
    #[error("spawning the encoder thread failed")]
    Thread(#[source] std::io::Error),
}

/// Tunables of the stream server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// Authenticated viewer sessions at once, over all sources.
    pub max_sessions: usize,
    /// Authenticated viewer sessions at once from one source prefix (IPv4 /32, IPv6 /64).
    pub max_sessions_per_prefix: usize,
    /// Handshakes from unproven addresses in progress at once; beyond, new clients must
    /// first answer a QUIC Retry (stateless), so spoofed Initials hold nothing.
    pub retry_threshold: usize,
    /// Connections with a proven address that have not authenticated yet, from one prefix.
    pub max_pending_per_prefix: usize,
    /// Connections with a proven address that have not authenticated yet, in total.
    pub max_pending: usize,
    /// Time a client has to complete the QUIC handshake.
    pub handshake_timeout: Duration,
    /// Close connections silent for this long (the client sends keep-alives).
    pub idle_timeout: Duration,
    /// Time a client has, once connected, to open the control stream and send Hello.
    pub hello_timeout: Duration,
    /// How long video continues after a session's token expired (input stops at once).
    pub expiry_grace: Duration,
    /// How long a dropped session can be resumed.
    pub resume_grace: Duration,
    /// Frames sent to one viewer and not yet acknowledged, beyond those two RTTs hold at the
    /// stream's frame rate, before new ones are dropped.
    pub max_frames_in_flight: usize,
    /// Minimum time between forced keyframes of one environment (coalesces requests).
    pub keyframe_min_interval: Duration,
    pub bitrate: BitrateLimits,
    /// openh264 tool set of every environment's encoder.
    pub usage: encoder::Usage,
    /// Threads per encoder (1..=4); `None`: [`encoder::Tuning::low_latency`] by picture size.
    pub encoder_threads: Option<u16>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_sessions: 64,
            max_sessions_per_prefix: 8,
            retry_threshold: 16,
            max_pending_per_prefix: 8,
            max_pending: 64,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            hello_timeout: Duration::from_secs(5),
            expiry_grace: Duration::from_secs(30),
            resume_grace: Duration::from_secs(15),
            max_frames_in_flight: 4,
            keyframe_min_interval: Duration::from_millis(250),
            bitrate: BitrateLimits::default(),
            usage: encoder::Usage::default(),
            encoder_threads: None,
        }
    }
}

/// Microseconds since the Unix epoch by the system clock.
pub fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Counters of one environment, for tests, benchmarks and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnvStats {
    pub viewers: usize,
    pub frames_encoded: u64,
    pub keyframes: u64,
    pub bitrate_bps: u32,
    pub input_refused: u64,
    /// Frames not sent to some viewer (in-flight cap reached, lag), summed over viewers.
    pub frames_dropped: u64,
}

/// One viewer's counters, for the metrics endpoint (one series per viewer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ViewerStats {
    /// The server's id of this viewer (unique while hostd runs).
    pub viewer: u64,
    /// `quic` (genos-view) or `web` (the browser's WebTransport or WebSocket).
    pub transport: &'static str,
    pub frames_sent: u64,
    /// Frames not sent to this viewer (in-flight cap, lag, waiting for a keyframe).
    pub frames_dropped: u64,
    pub input_events: u64,
    /// This viewer's ABR target.
    pub bitrate_target_bps: u32,
    /// The transport's smoothed round-trip time.
    pub rtt: Duration,
    /// What the viewer last reported of its side (decoded frames, decode time, glass
    /// latency); `None` until it reports.
    pub client: Option<wire::ClientStats>,
}

/// The pointer as viewers see it; `image_serial` changes whenever the image does, so each
/// viewer sends the image once per shape.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct CursorSnapshot {
    x: u16,
    y: u16,
    visible: bool,
    image: Option<Arc<CursorImage>>,
    image_serial: u64,
}

impl CursorSnapshot {
    /// Applies a source update: position and visibility always, the image when one came.
    fn apply(&mut self, u: encoder::CursorUpdate) {
        self.x = u.x.clamp(0, i32::from(u16::MAX)) as u16;
        self.y = u.y.clamp(0, i32::from(u16::MAX)) as u16;
        self.visible = u.visible;
        if let Some(shape) = u.image {
            self.image = Some(Arc::new(wire_cursor_image(shape)));
            self.image_serial += 1;
        }
    }

    /// The Cursor message for a viewer that last got image `sent_serial`; carries the image
    /// only if that viewer has not had it yet.
    fn message(&self, sent_serial: Option<u64>) -> ServerMessage {
        let image = match &self.image {
            Some(img) if sent_serial != Some(self.image_serial) => Some(CursorImage::clone(img)),
            _ => None,
        };
        ServerMessage::Cursor {
            x: self.x,
            y: self.y,
            visible: self.visible,
            image,
        }
    }
}

/// A source's cursor shape on the wire: cropped to the protocol's largest edge (sources
/// have 64x64 at most; cropping keeps the hotspot meaningful), hotspot saturated to `u16`.
fn wire_cursor_image(shape: encoder::CursorShape) -> CursorImage {
    let max = u32::from(wire::MAX_CURSOR_EDGE);
    let (width, height) = (shape.width.min(max), shape.height.min(max));
    let row = shape.width as usize * 4;
    let mut bgra = Vec::with_capacity(width as usize * height as usize * 4);
    for y in 0..height as usize {
        // Pixels missing from a short image are transparent.
        let src = shape.bgra.get(y * row..).unwrap_or_default();
        let px = &src[..src.len().min(width as usize * 4)];
        bgra.extend_from_slice(px);
        bgra.resize((y + 1) * width as usize * 4, 0);
    }
    CursorImage {
        hot_x: shape.hot_x.min(u32::from(u16::MAX)) as u16,
        hot_y: shape.hot_y.min(u32::from(u16::MAX)) as u16,
        width: width as u16,
        height: height as u16,
        bgra,
    }
}

/// A clipboard text and the viewer it came from (`None`: from the guest), which is not
/// sent it back.
#[derive(Debug, Clone)]
struct SharedClipboard {
    text: Arc<str>,
    from_viewer: Option<u64>,
}

struct Environment {
    id: String,
    /// The host's unique id of this environment; tokens are signed over it.
    uid: u64,
    /// Set when the environment stops streaming: its sessions end.
    closed: watch::Sender<bool>,
    frames: broadcast::Sender<Arc<Frame>>,
    /// The source's pointer; `None` until the source reports one.
    cursor: watch::Sender<Option<CursorSnapshot>>,
    /// The environment's clipboard as viewers are to see it; `None` until it has one.
    clipboard: watch::Sender<Option<SharedClipboard>>,
    input: Arc<dyn InputSink>,
    force_keyframe: AtomicBool,
    stop: AtomicBool,
    viewers: AtomicUsize,
    /// Per-viewer ABR targets; the encoder runs at the smallest.
    targets: Mutex<HashMap<u64, u32>>,
    /// Each joined viewer's counters, kept by its driver.
    viewer_stats: Mutex<std::collections::BTreeMap<u64, ViewerStats>>,
    bitrate_bps: AtomicU32,
    config: Mutex<StreamConfig>,
    frames_encoded: AtomicU64,
    keyframes: AtomicU64,
    input_refused: AtomicU64,
    frames_dropped: AtomicU64,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Environment {
    fn env_ref(&self) -> EnvRef {
        EnvRef::new(self.id.clone(), self.uid)
    }
    fn request_keyframe(&self) {
        self.force_keyframe.store(true, Ordering::Release);
    }
    fn config(&self) -> StreamConfig {
        let mut c = *self.config.lock().expect("poisoned");
        c.bitrate_bps = self.bitrate_bps.load(Ordering::Relaxed);
        c
    }
    fn stats(&self) -> EnvStats {
        EnvStats {
            viewers: self.viewers.load(Ordering::Relaxed),
            frames_encoded: self.frames_encoded.load(Ordering::Relaxed),
            keyframes: self.keyframes.load(Ordering::Relaxed),
            bitrate_bps: self.bitrate_bps.load(Ordering::Relaxed),
            input_refused: self.input_refused.load(Ordering::Relaxed),
            frames_dropped: self.frames_dropped.load(Ordering::Relaxed),
        }
    }
}

/// What admission control did, for tests, benchmarks and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdmissionStats {
    /// QUIC Retry packets sent (address validation under load).
    pub retries: u64,
    /// Connection attempts refused at a cap.
    pub refused: u64,
    /// Handshakes abandoned at `handshake_timeout`.
    pub handshake_timeouts: u64,
    /// Connections closed for not sending a Hello within `hello_timeout`.
    pub hello_timeouts: u64,
    /// Handshakes from unproven addresses in progress now.
    pub unvalidated: usize,
    /// Connections with a proven address, not yet authenticated, now.
    pub pending: usize,
    /// Authenticated sessions now.
    pub sessions: usize,
}

#[derive(Default)]
struct AdmissionCounters {
    retries: AtomicU64,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    hello_timeouts: AtomicU64,
}

struct Shared {
    cfg: ServerConfig,
    tokens: Arc<TokenKey>,
    clock: Clock,
    envs: Mutex<HashMap<String, Arc<Environment>>>,
    admission: Mutex<Admission>,
    admission_counters: AdmissionCounters,
    revocations: Mutex<Revocations>,
    /// Bumped on every revocation: open sessions re-check their token.
    revoked: watch::Sender<u64>,
    parked: Mutex<ParkedSessions<Arc<Environment>>>,
    next_viewer: AtomicU64,
    /// Where viewers' records go ([`StreamServer::viewer_records`]); none until asked.
    records: Mutex<Option<mpsc::UnboundedSender<ViewerEvent>>>,
    /// The TLS certificates by ALPN (and the WebTransport certificate's hash).
    certs: Arc<crate::web::webtransport::CertResolver>,
}

/// A viewer's record with who and where: what the host's audit chain keeps of a session.
/// Unbounded channel, bounded by the sessions: each session sends one `Joined`, at most one
/// `FirstUse` per right and one `Left`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewerEvent {
    pub env: EnvRef,
    /// The server's number for this connection (the `viewer` field of its log lines).
    pub viewer: u64,
    pub remote: SocketAddr,
    pub record: ViewerRecord,
}

impl Shared {
    fn record(&self, env: &Environment, viewer: u64, remote: SocketAddr, record: ViewerRecord) {
        let event = ViewerEvent {
            env: env.env_ref(),
            viewer,
            remote,
            record,
        };
        if let Some(tx) = self.records.lock().expect("poisoned").as_ref() {
            // A receiver that went away takes nothing more; the log line stays.
            let _ = tx.send(event);
        }
    }

    fn session_config(&self) -> SessionConfig {
        SessionConfig {
            hello_timeout: self.cfg.hello_timeout,
            expiry_grace: self.cfg.expiry_grace,
            resume_grace: self.cfg.resume_grace,
            max_frames_in_flight: self.cfg.max_frames_in_flight,
            bitrate: self.cfg.bitrate,
        }
    }

    fn count_hello_timeout(&self, session: &Session) {
        if session.hello_timed_out() {
            self.admission_counters
                .hello_timeouts
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection's admission slot, released when the connection's task ends.
struct SlotGuard {
    shared: Arc<Shared>,
    stage: Option<Stage>,
}

impl SlotGuard {
    /// Moves the slot on with `step`; a refused step has released the old slot.
    fn advance(
        &mut self,
        step: impl FnOnce(&mut Admission, Stage) -> Result<Stage, super::admission::Full>,
    ) -> Result<(), super::admission::Full> {
        let Some(stage) = self.stage.take() else {
            return Ok(());
        };
        let mut admission = self.shared.admission.lock().expect("poisoned");
        let next = step(&mut admission, stage)?;
        self.stage = Some(next);
        Ok(())
    }
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        if let Some(stage) = self.stage.take() {
            self.shared
                .admission
                .lock()
                .expect("poisoned")
                .release(stage);
        }
    }
}

/// The streaming server. Dropping it stops accepting, closes connections and stops encoders.
pub struct StreamServer {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    fingerprint: String,
}

fn transport_config(cfg: &ServerConfig) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(cfg.idle_timeout).unwrap_or(VarInt::from_u32(30_000).into()),
    ));
    // Clients open exactly one bidirectional control stream and no unidirectional ones.
    // HTTP/3 clients (WebTransport) refuse a server that offers fewer than 3 unidirectional
    // streams at the start (control and QPACK streams), so 3 are offered to every client;
    // native connections are given no more after the handshake, and nothing reads any
    // stream a native client opens (its bytes count against the small receive window).
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(3u32.into());
    // Until the token is accepted a peer may have only a Hello's worth of data in flight
    // (raised per connection after admission).
    t.receive_window(PRE_AUTH_RECEIVE_WINDOW.into());
    // The protocol sends no datagrams, but HTTP/3 (WebTransport) peers require the QUIC
    // datagram extension to be offered; a few received are kept and never read.
    t.datagram_receive_buffer_size(Some(16 * 1024));
    // BBR models bandwidth and RTT instead of reading every loss as congestion: random loss
    // (Wi-Fi, mobile) would otherwise collapse Cubic's window and with it the video bitrate.
    t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    t
}

impl StreamServer {
    /// Binds the UDP socket and starts accepting. Must be called within a tokio runtime.
    pub fn bind(
        cfg: ServerConfig,
        identity: &Identity,
        tokens: Arc<TokenKey>,
    ) -> Result<Self, StreamError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Native viewers get the identity their links pin; browsers' WebTransport (ALPN h3)
        // a short-lived certificate ([`crate::web::webtransport`]).
        let certs = Arc::new(
            crate::web::webtransport::CertResolver::new(identity)
                .map_err(|e| StreamError::QuicTls(crate::error_chain(&e)))?,
        );
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(certs.clone());
        tls.alpn_protocols = vec![
            wire::ALPN.to_vec(),
            crate::web::webtransport::ALPN_H3.to_vec(),
        ];
        tls.max_early_data_size = 0;
        let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| StreamError::QuicTls(e.to_string()))?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
        server_cfg.transport_config(Arc::new(transport_config(&cfg)));
        // Addresses are proven by Retry only, never by NEW_TOKEN tokens from an earlier
        // connection (quinn's `bloom` feature, which a dependency enables, would issue two per
        // connection: every client of a shared configuration would then count as proven and
        // skip the Retry that keeps floods out of the pending slots).
        let mut validation = quinn::ValidationTokenConfig::default();
        validation.sent(0);
        server_cfg.validation_token_config(validation);
        let endpoint = quinn::Endpoint::server(server_cfg, cfg.listen).map_err(|source| {
            StreamError::Bind {
                addr: cfg.listen,
                source,
            }
        })?;
        let limits = Limits {
            retry_threshold: cfg.retry_threshold,
            max_pending_per_prefix: cfg.max_pending_per_prefix,
            max_pending: cfg.max_pending,
            max_sessions_per_prefix: cfg.max_sessions_per_prefix,
            max_sessions: cfg.max_sessions,
        };
        let resume_grace = cfg.resume_grace;
        let shared = Arc::new(Shared {
            cfg,
            tokens,
            clock: Clock::new(Instant::now(), unix_now_us()),
            envs: Mutex::new(HashMap::new()),
            admission: Mutex::new(Admission::new(limits)),
            admission_counters: AdmissionCounters::default(),
            revocations: Mutex::new(Revocations::default()),
            revoked: watch::Sender::new(0),
            parked: Mutex::new(ParkedSessions::new(resume_grace)),
            next_viewer: AtomicU64::new(1),
            records: Mutex::new(None),
            certs,
        });
        tokio::spawn(accept_loop(endpoint.clone(), shared.clone()));
        Ok(Self {
            endpoint,
            shared,
            fingerprint: identity.fingerprint.clone(),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// From now on, every viewer's joins, first uses of the input and clipboard rights and
    /// leaves arrive here (a later call replaces the earlier receiver).
    pub fn viewer_records(&self) -> mpsc::UnboundedReceiver<ViewerEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.shared.records.lock().expect("poisoned") = Some(tx);
        rx
    }

    /// Whether `env_id` has viewers now (watched environments are not idle).
    pub fn is_watched(&self, env_id: &str) -> bool {
        self.shared
            .envs
            .lock()
            .expect("poisoned")
            .get(env_id)
            .is_some_and(|e| e.viewers.load(Ordering::Acquire) > 0)
    }

    /// SHA-256 of the server certificate, lowercase hex.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn tokens(&self) -> &TokenKey {
        &self.shared.tokens
    }

    /// The URL a client uses to view `env_id` with `token`.
    pub fn connect_url(&self, env_id: &str, token: &str) -> std::io::Result<String> {
        Ok(super::connect_url(
            self.local_addr()?,
            env_id,
            token,
            &self.fingerprint,
        ))
    }

    /// Starts streaming `source` as environment `env` at `fps` frames per second. Viewers
    /// ask for it by name; only tokens issued for this `env.uid` open it.
    pub fn add_environment(
        &self,
        env: &EnvRef,
        source: EnvironmentSource,
        fps: f32,
    ) -> Result<(), StreamError> {
        let (env_id, uid) = (env.name.as_str(), env.uid);
        let mut envs = self.shared.envs.lock().expect("poisoned");
        if envs.contains_key(env_id) {
            return Err(StreamError::DuplicateEnvironment(env_id.to_owned()));
        }
        let (width, height) = source.frames.size();
        let start = self.shared.cfg.bitrate.start_bps;
        let encoder = make_encoder(
            &self.shared.cfg,
            EncoderConfig {
                width,
                height,
                fps,
                bitrate_bps: start,
            },
        )?;
        let (tx, _) = broadcast::channel(16);
        let env = Arc::new(Environment {
            id: env_id.to_owned(),
            uid,
            closed: watch::Sender::new(false),
            frames: tx,
            cursor: watch::Sender::new(None),
            clipboard: watch::Sender::new(None),
            input: source.input,
            force_keyframe: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            viewers: AtomicUsize::new(0),
            targets: Mutex::new(HashMap::new()),
            viewer_stats: Mutex::default(),
            bitrate_bps: AtomicU32::new(start),
            config: Mutex::new(StreamConfig {
                width: width as u16,
                height: height as u16,
                fps_milli: (fps * 1000.0) as u32,
                codec: Codec::H264AnnexB,
                bitrate_bps: start,
            }),
            frames_encoded: AtomicU64::new(0),
            keyframes: AtomicU64::new(0),
            input_refused: AtomicU64::new(0),
            frames_dropped: AtomicU64::new(0),
            thread: Mutex::new(None),
        });
        let thread_env = env.clone();
        let clock = self.shared.clock;
        let cfg = self.shared.cfg.clone();
        let frames = source.frames;
        let handle = std::thread::Builder::new()
            .name(format!("encode-{env_id}"))
            .spawn(move || encode_loop(thread_env, frames, encoder, fps, clock, cfg))
            .map_err(StreamError::Thread)?;
        *env.thread.lock().expect("poisoned") = Some(handle);
        envs.insert(env_id.to_owned(), env);
        info!(env = env_id, width, height, fps, "streaming environment");
        Ok(())
    }

    /// The guest of `env_id` has `text` on its clipboard: sent to its viewers holding the
    /// clipboard right, and to those joining later. Unknown environments are ignored (the
    /// environment stopped meanwhile).
    pub fn set_environment_clipboard(&self, env_id: &str, text: &str) {
        let env = self
            .shared
            .envs
            .lock()
            .expect("poisoned")
            .get(env_id)
            .cloned();
        if let Some(env) = env {
            env.clipboard.send_replace(Some(SharedClipboard {
                text: text.into(),
                from_viewer: None,
            }));
        }
    }

    /// Stops streaming `env_id`; its viewers are disconnected.
    pub fn remove_environment(&self, env_id: &str) {
        let env = self.shared.envs.lock().expect("poisoned").remove(env_id);
        if let Some(env) = env {
            stop_environment(&env);
        }
    }

    pub fn env_stats(&self, env_id: &str) -> Option<EnvStats> {
        let envs = self.shared.envs.lock().expect("poisoned");
        envs.get(env_id).map(|e| e.stats())
    }

    /// The counters of each viewer joined to `env_id` now, by viewer id.
    pub fn viewer_stats(&self, env_id: &str) -> Vec<ViewerStats> {
        let envs = self.shared.envs.lock().expect("poisoned");
        envs.get(env_id).map_or_else(Vec::new, |e| {
            e.viewer_stats
                .lock()
                .expect("poisoned")
                .values()
                .copied()
                .collect()
        })
    }

    /// Connections currently holding a slot: handshaking, awaiting Hello, or in a session.
    pub fn open_connections(&self) -> usize {
        let (unvalidated, pending, sessions) =
            self.shared.admission.lock().expect("poisoned").counts();
        unvalidated + pending + sessions
    }

    /// What admission control has done so far and holds now.
    pub fn admission_stats(&self) -> AdmissionStats {
        let (unvalidated, pending, sessions) =
            self.shared.admission.lock().expect("poisoned").counts();
        let c = &self.shared.admission_counters;
        AdmissionStats {
            retries: c.retries.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            handshake_timeouts: c.handshake_timeouts.load(Ordering::Relaxed),
            hello_timeouts: c.hello_timeouts.load(Ordering::Relaxed),
            unvalidated,
            pending,
            sessions,
        }
    }

    /// Revokes one token (kept until `expires_unix`); sessions using it end at once.
    pub fn revoke_token(&self, id: TokenId, expires_unix: u64) {
        self.shared
            .revocations
            .lock()
            .expect("poisoned")
            .revoke_token(id, expires_unix);
        self.shared.revoked.send_modify(|g| *g += 1);
    }

    /// Revokes every token of environment `uid`; its sessions end at once.
    pub fn revoke_environment(&self, uid: u64) {
        self.shared
            .revocations
            .lock()
            .expect("poisoned")
            .revoke_environment(uid);
        self.shared.revoked.send_modify(|g| *g += 1);
    }

    /// Replaces the revocation list (hostd loads it from its store at start).
    pub fn set_revocations(&self, list: Revocations) {
        *self.shared.revocations.lock().expect("poisoned") = list;
        self.shared.revoked.send_modify(|g| *g += 1);
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        self.endpoint.close(
            VarInt::from_u32(ErrorCode::ServerShutdown as u32),
            b"server shutting down",
        );
        let envs: Vec<_> = self
            .shared
            .envs
            .lock()
            .expect("poisoned")
            .drain()
            .map(|(_, e)| e)
            .collect();
        for env in envs {
            stop_environment(&env);
        }
    }

    /// Waits until the endpoint is closed and idle.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn stop_environment(env: &Environment) {
    env.stop.store(true, Ordering::Release);
    env.closed.send_replace(true);
    if let Some(h) = env.thread.lock().expect("poisoned").take() {
        // The loop checks `stop` at least every 100 ms.
        let _ = h.join();
    }
}

/// An encoder for `config` as the server is configured to tune it.
fn make_encoder(cfg: &ServerConfig, config: EncoderConfig) -> Result<Encoder, EncodeError> {
    let auto = Tuning::low_latency(config.width, config.height);
    Encoder::with_tuning(
        config,
        Tuning {
            usage: cfg.usage,
            threads: cfg.encoder_threads.unwrap_or(auto.threads),
        },
    )
}

/// The environment's encoder thread.
fn encode_loop(
    env: Arc<Environment>,
    mut frames: Box<dyn encoder::FrameSource>,
    mut encoder: Encoder,
    fps: f32,
    clock: Clock,
    cfg: ServerConfig,
) {
    let mut sequence = 0u64;
    let mut last_forced: Option<Instant> = None;
    let mut current_bitrate = cfg.bitrate.start_bps;
    let (mut width, mut height) = frames.size();
    while !env.stop.load(Ordering::Acquire) {
        // After every return of `next_frame` (sources return early when only the pointer
        // moved) and while idle, so a joining viewer finds the pointer current.
        if let Some(update) = frames.cursor_update() {
            env.cursor
                .send_modify(|c| c.get_or_insert_with(Default::default).apply(update));
        }
        if env.viewers.load(Ordering::Acquire) == 0 {
            // Nobody watches: don't burn CPU; the first viewer gets a keyframe anyway.
            env.force_keyframe.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        let frame = match frames.next_frame(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(f)) => f,
            Ok(None) => {
                // A still screen produces no frames, but a joining viewer needs a keyframe
                // now: the encoder encodes its own picture of the screen again.
                let due = env.force_keyframe.load(Ordering::Acquire)
                    && last_forced.is_none_or(|t| t.elapsed() >= cfg.keyframe_min_interval);
                // Otherwise the encoder spends the room still frames leave in the bitrate
                // window: a change that waited for room, or refining the picture towards
                // lossless text (docs/encoder.md).
                let (still, what) = if due {
                    env.force_keyframe.store(false, Ordering::Release);
                    last_forced = Some(Instant::now());
                    (encoder.keyframe(), "re-encoding the still frame")
                } else {
                    (encoder.refine(), "refining the still frame")
                };
                match still {
                    Ok(Some(encoded)) => {
                        sequence += 1;
                        publish(
                            &env,
                            &clock,
                            sequence,
                            Instant::now(),
                            width,
                            height,
                            encoded,
                        );
                    }
                    // No picture yet, or rate control held the keyframe: the viewer still
                    // waits, so the next frame (or the next still pass) is a keyframe.
                    Ok(None) if due => env.force_keyframe.store(true, Ordering::Release),
                    Ok(None) => {}
                    Err(e) => warn!(env = %env.id, error = %e, "{what} failed"),
                }
                continue;
            }
            Err(e) => {
                warn!(env = %env.id, error = %e, "frame source failed; stopping stream");
                break;
            }
        };
        if (frame.frame.width, frame.frame.height) != (width, height) {
            (width, height) = (frame.frame.width, frame.frame.height);
            match make_encoder(
                &cfg,
                EncoderConfig {
                    width,
                    height,
                    fps,
                    bitrate_bps: current_bitrate,
                },
            ) {
                Ok(e) => encoder = e,
                Err(e) => {
                    warn!(env = %env.id, error = %e, "re-creating encoder after resize failed");
                    break;
                }
            }
            let mut c = env.config.lock().expect("poisoned");
            c.width = width as u16;
            c.height = height as u16;
            env.force_keyframe.store(true, Ordering::Release);
        }
        let target = {
            let t = env.targets.lock().expect("poisoned");
            shared_target(t.values().copied()).unwrap_or(cfg.bitrate.start_bps)
        };
        if target.abs_diff(current_bitrate) > current_bitrate / 20 {
            encoder.set_bitrate(target);
            current_bitrate = target;
            env.bitrate_bps.store(target, Ordering::Relaxed);
        }
        let force = env.force_keyframe.load(Ordering::Acquire)
            && last_forced.is_none_or(|t| t.elapsed() >= cfg.keyframe_min_interval);
        if force {
            env.force_keyframe.store(false, Ordering::Release);
            last_forced = Some(Instant::now());
        }
        let encoded = match encoder.encode(&frame.frame, &frame.damage, force) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                warn!(env = %env.id, error = %e, "encoding failed; requesting a keyframe");
                env.force_keyframe.store(true, Ordering::Release);
                continue;
            }
        };
        sequence += 1;
        publish(
            &env,
            &clock,
            sequence,
            frame.captured_at,
            width,
            height,
            encoded,
        );
    }
    debug!(env = %env.id, "encoder thread ends");
}

fn publish(
    env: &Environment,
    clock: &Clock,
    sequence: u64,
    captured_at: Instant,
    width: u32,
    height: u32,
    encoded: encoder::EncodedFrame,
) {
    env.frames_encoded.fetch_add(1, Ordering::Relaxed);
    if encoded.keyframe {
        env.keyframes.fetch_add(1, Ordering::Relaxed);
    }
    let config = env.config();
    let frame = Frame {
        sequence,
        capture_time_us: clock.unix_us(captured_at),
        keyframe: encoded.keyframe,
        width: width as u16,
        height: height as u16,
        fps_milli: config.fps_milli,
        bitrate_bps: config.bitrate_bps,
        data: encoded.data,
    };
    // No receivers is fine: the last viewer may have just left.
    let _ = env.frames.send(Arc::new(frame));
}

/// The shared encoder's bitrate from the viewers' targets: the smallest, except that viewers
/// far below the best one (less than a quarter of it) do not drag everyone down — they get
/// what fits (keyframes after drops) instead.
fn shared_target(targets: impl Iterator<Item = u32> + Clone) -> Option<u32> {
    let best = targets.clone().max()?;
    targets.filter(|&t| t >= best / 4).min()
}

async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let ip = incoming.remote_address().ip();
        let validated = incoming.remote_address_validated();
        let decision = shared.admission.lock().expect("poisoned").on_incoming(
            ip,
            validated,
            incoming.may_retry(),
        );
        let stage = match decision {
            Decision::Accept(stage) => stage,
            Decision::Retry => {
                // Under load, make the client prove it owns its address before we keep any
                // state or do any crypto work for it.
                match incoming.retry() {
                    Ok(()) => {
                        shared
                            .admission_counters
                            .retries
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => debug!(error = %e, "retry failed"),
                }
                continue;
            }
            Decision::Refuse(full) => {
                shared
                    .admission_counters
                    .refused
                    .fetch_add(1, Ordering::Relaxed);
                debug!(%ip, reason = %full, "connection refused");
                incoming.refuse();
                continue;
            }
        };
        let guard = SlotGuard {
            shared: shared.clone(),
            stage: Some(stage),
        };
        tokio::spawn(handshake(shared.clone(), incoming, guard));
    }
}

/// Completes one handshake within `handshake_timeout`, then serves the connection.
async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming, mut guard: SlotGuard) {
    let ip = incoming.remote_address().ip();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return debug!(%ip, error = %e, "accept failed"),
    };
    // Dropping an unfinished `Connecting` abandons the handshake and its state.
    let conn = match tokio::time::timeout(shared.cfg.handshake_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return debug!(%ip, error = %e, "handshake failed"),
        Err(_) => {
            shared
                .admission_counters
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            return debug!(%ip, "handshake timed out");
        }
    };
    // A completed handshake proves the address: from here on it counts against its prefix.
    if let Err(full) = guard.advance(|a, stage| a.handshake_done(stage, ip)) {
        shared
            .admission_counters
            .refused
            .fetch_add(1, Ordering::Relaxed);
        debug!(%ip, reason = %full, "connection refused after the handshake");
        let msg = full.to_string();
        conn.close(
            VarInt::from_u32(ErrorCode::TooManyConnections as u32),
            msg.as_bytes(),
        );
        return;
    }
    if crate::web::webtransport::is_h3(&conn) {
        let viewers = MessageViewers {
            shared: shared.clone(),
        };
        let deadline = shared.cfg.hello_timeout;
        return crate::web::webtransport::serve(viewers, MessageSlot(guard), conn, deadline).await;
    }
    conn.set_max_concurrent_uni_streams(0u32.into());
    serve_connection(shared, conn, guard).await;
}

/// Checks a Hello against the server's tables: the token (see [`session::check_token`]),
/// then the admission caps, then resumption; a fresh session gets a random id.
fn authorize(
    shared: &Shared,
    slot: &mut SlotGuard,
    hello: &HelloRequest,
    now: Instant,
) -> Result<(Grant, Arc<Environment>), Refusal> {
    let (claims, env) = {
        let revocations = shared.revocations.lock().expect("poisoned");
        session::check_token(
            &shared.tokens,
            &revocations,
            hello,
            |name| {
                let envs = shared.envs.lock().expect("poisoned");
                envs.get(name).map(|e| (e.env_ref(), e.clone()))
            },
            unix_now_us() / 1_000_000,
        )?
    };
    // Authenticated: only now does the connection count as a session of its prefix.
    slot.advance(|a, stage| a.authenticated(stage))
        .map_err(|full| Refusal::new(ErrorCode::TooManyConnections, full.to_string()))?;
    let session =
        shared
            .parked
            .lock()
            .expect("poisoned")
            .open(hello.resume, &env.id, now, || {
                let mut id = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .map_err(|_| Refusal::new(ErrorCode::Internal, "random generator failed"))?;
                Ok(id)
            })?;
    let grant = Grant {
        claims,
        session,
        config: env.config(),
    };
    Ok((grant, env))
}

/// Writes control messages in order until the queue closes or the stream fails. Hands the
/// stream back unfinished: a closing session closes the connection right behind its last
/// message, and a finished stream would reach the client first as a protocol violation.
async fn write_control(
    mut send: quinn::SendStream,
    mut rx: mpsc::Receiver<ServerMessage>,
) -> quinn::SendStream {
    while let Some(m) = rx.recv().await {
        if send.write_all(&m.to_bytes()).await.is_err() {
            break;
        }
    }
    send
}

/// How long a closing session waits for its last control messages to be written.
const CLOSE_FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// The path statistics of `conn` as the session core takes them.
fn path_stats(conn: &quinn::Connection) -> PathStats {
    let st = conn.stats();
    PathStats {
        rtt: st.path.rtt,
        cwnd_bytes: st.path.cwnd,
        sent_packets: st.path.sent_packets,
        lost_packets: st.path.lost_packets,
    }
}

/// What a joined viewer's driver waits on: the environment's frames, its end, the
/// revocation list, and its clipboard (marked unseen, so what it has goes out at the join).
type Feeds = (
    Option<broadcast::Receiver<Arc<Frame>>>,
    Option<watch::Receiver<bool>>,
    Option<watch::Receiver<u64>>,
    Option<watch::Receiver<Option<SharedClipboard>>>,
);

fn subscribe(shared: &Shared, env: &Environment) -> Feeds {
    let mut clipboard = env.clipboard.subscribe();
    clipboard.mark_changed();
    (
        Some(env.frames.subscribe()),
        Some(env.closed.subscribe()),
        Some(shared.revoked.subscribe()),
        Some(clipboard),
    )
}

/// An authenticated viewer's hold on its environment.
struct Joined {
    env: Arc<Environment>,
    viewer_id: u64,
    cursor: tokio::task::JoinHandle<()>,
}

impl Joined {
    /// The viewer's hold, with its pointer task (which waits for the Welcome).
    fn new(
        env: Arc<Environment>,
        viewer_id: u64,
        ctl_tx: &mpsc::Sender<ServerMessage>,
        welcomed: &watch::Receiver<bool>,
    ) -> Self {
        Joined {
            cursor: tokio::spawn(cursor_loop(env.clone(), ctl_tx.clone(), welcomed.clone())),
            viewer_id,
            env,
        }
    }
}

/// What the driver has reported to the environment's counters so far.
#[derive(Default)]
struct Reported {
    input_refused: u64,
    frames_dropped: u64,
}

impl Reported {
    fn sync(&mut self, env: &Environment, stats: SessionStats) {
        let refused = stats.input_refused - self.input_refused;
        let dropped = stats.frames_dropped - self.frames_dropped;
        env.input_refused.fetch_add(refused, Ordering::Relaxed);
        env.frames_dropped.fetch_add(dropped, Ordering::Relaxed);
        self.input_refused = stats.input_refused;
        self.frames_dropped = stats.frames_dropped;
    }
}

/// The next frame published to a joined viewer (never, before joining).
async fn next_frame(
    frames: Option<&mut broadcast::Receiver<Arc<Frame>>>,
) -> Result<Arc<Frame>, broadcast::error::RecvError> {
    match frames {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the joined viewer's environment stops streaming.
async fn env_closed(closed: Option<&mut watch::Receiver<bool>>) {
    match closed {
        Some(rx) => {
            let _ = rx.wait_for(|closed| *closed).await;
        }
        None => std::future::pending().await,
    }
}

/// The environment's next clipboard (never, before joining or once it is gone).
async fn clipboard_changed(
    clipboard: Option<&mut watch::Receiver<Option<SharedClipboard>>>,
) -> SharedClipboard {
    if let Some(rx) = clipboard {
        while rx.changed().await.is_ok() {
            if let Some(c) = rx.borrow_and_update().clone() {
                return c;
            }
        }
    }
    std::future::pending().await
}

/// Resolves when the revocation list changed (never, before joining).
async fn revocations_changed(revoked: Option<&mut watch::Receiver<u64>>) {
    if let Some(rx) = revoked {
        if rx.changed().await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Drives one connection's [`Session`] through a [`ViewerLoop`]: the control stream's bytes
/// and the connection's path in, messages on the control stream and frames on streams of
/// their own out, until the session ends; then parks it for resumption.
async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, mut slot: SlotGuard) {
    let remote = conn.remote_address();
    let (ctl_tx, ctl_rx) = mpsc::channel::<ServerMessage>(64);
    let mut lp = ViewerLoop::new(shared, remote, ("viewer", "quic"), ctl_tx.clone());
    let (send, mut recv) =
        match tokio::time::timeout_at(sleep_deadline(lp.session.poll_timeout()), conn.accept_bi())
            .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return debug!(%remote, error = %e, "connection ended before the control stream")
            }
            Err(_) => {
                lp.session.handle_timeout(Instant::now());
                lp.shared.count_hello_timeout(&lp.session);
                if let Some(Action::Close(r)) = lp.session.poll_action() {
                    conn.close(VarInt::from_u32(r.code as u32), r.message.as_bytes());
                }
                return;
            }
        };
    lp.session.handle(Event::ControlOpened, Instant::now());
    let mut writer = tokio::spawn(write_control(send, ctl_rx));
    let mut writer_done = false;
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let mut out = QuicOut {
        conn: conn.clone(),
        ctl_tx: ctl_tx.clone(),
        cancel_rx: lp.cancel_rx(),
        done_tx,
        remote,
    };
    let path = || path_stats(&conn);
    while lp.run_actions(&mut slot, &mut out) {
        tokio::select! {
            chunk = recv.read_chunk(64 * 1024, true) => match chunk {
                Ok(Some(chunk)) => lp.session.handle(Event::ControlData(&chunk.bytes), Instant::now()),
                Ok(None) | Err(_) => lp.session.handle(Event::ControlFinished, Instant::now()),
            },
            feed = lp.next_feed() => lp.on_feed(feed, path),
            Some(sequence) = done_rx.recv() => {
                lp.session.handle(Event::FrameDone(sequence), Instant::now());
            }
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                lp.session.handle(Event::ConnectionLost, Instant::now());
            }
            e = conn.closed() => {
                debug!(%remote, error = %e, "connection closed");
                lp.session.handle(Event::ConnectionLost, Instant::now());
            }
        }
    }
    if let Some(r) = lp.ending() {
        let error = ServerMessage::Error {
            code: r.code,
            message: r.message.clone(),
        };
        // The error goes last on the control stream; the close frame repeats the code and
        // message, so clients see them even if the stream data is lost with the connection.
        let flushed = async {
            let _ = ctl_tx.send(error).await;
            drop(ctl_tx);
            drop(out);
            if let Some(j) = lp.joined.as_mut() {
                let _ = (&mut j.cursor).await;
            }
            if writer_done {
                None
            } else {
                (&mut writer).await.ok()
            }
        };
        // Held until the connection is closed: dropping a send stream finishes it.
        let send = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, flushed).await;
        conn.close(VarInt::from_u32(r.code as u32), r.message.as_bytes());
        drop(send);
    }
    writer.abort();
    lp.leave();
    drop(slot);
}

/// The QUIC side of a [`ViewerLoop`]: control messages on the control stream's bounded
/// queue, each frame on a unidirectional stream of its own (reset when superseded).
struct QuicOut {
    conn: quinn::Connection,
    ctl_tx: mpsc::Sender<ServerMessage>,
    cancel_rx: watch::Receiver<u64>,
    done_tx: mpsc::UnboundedSender<u64>,
    remote: SocketAddr,
}

impl ViewerOut for QuicOut {
    fn admitted(&mut self) {
        self.conn.set_receive_window(SESSION_RECEIVE_WINDOW.into());
    }

    fn send(&mut self, m: ServerMessage) {
        if self.ctl_tx.try_send(m).is_err() {
            debug!(remote = %self.remote, "control queue full; message skipped");
        }
    }

    fn send_frame(&mut self, frame: Arc<Frame>) {
        tokio::spawn(send_frame(
            self.conn.clone(),
            frame,
            self.cancel_rx.clone(),
            self.done_tx.clone(),
        ));
    }
}

/// How one transport sends what a [`ViewerLoop`]'s session asks for.
trait ViewerOut {
    /// The viewer was admitted.
    fn admitted(&mut self) {}
    /// One control message, in order.
    fn send(&mut self, m: ServerMessage);
    /// One frame; the transport reports it done (sent or skipped) through its done channel.
    fn send_frame(&mut self, frame: Arc<Frame>);
}

/// What a viewer's feeds delivered ([`ViewerLoop::next_feed`]).
enum Feed {
    Frame(Result<Arc<Frame>, broadcast::error::RecvError>),
    Timeout,
    Revoked,
    EnvironmentClosed,
    Clipboard(SharedClipboard),
}

/// One viewer's [`Session`] and what a joined viewer is subscribed to, shared by the QUIC
/// and the message-transport drivers: admission, the session's actions on the environment,
/// the feeds (frames, revocations, the environment closing, its clipboard, the session's
/// timer) and leaving. The drivers add only their I/O ([`ViewerOut`], the client's bytes,
/// the path).
struct ViewerLoop {
    shared: Arc<Shared>,
    remote: SocketAddr,
    /// What the log calls this kind of viewer.
    kind: &'static str,
    /// [`ViewerStats::transport`].
    transport: &'static str,
    session: Session,
    joined: Option<Joined>,
    frames: Option<broadcast::Receiver<Arc<Frame>>>,
    closed: Option<watch::Receiver<bool>>,
    revoked: Option<watch::Receiver<u64>>,
    clipboard: Option<watch::Receiver<Option<SharedClipboard>>>,
    reported: Reported,
    closing: Option<Refusal>,
    /// The pointer task's queue (the transport forwards it in order with the rest); let go
    /// when the session ends, so that the queue closes once the transport lets go too.
    ctl_tx: Option<mpsc::Sender<ServerMessage>>,
    /// Set once the Welcome is queued: the pointer task sends nothing before it.
    welcomed: watch::Sender<bool>,
    /// Frames older than this value are skipped or reset (newest wins after a keyframe).
    cancel: watch::Sender<u64>,
}

impl ViewerLoop {
    fn new(
        shared: Arc<Shared>,
        remote: SocketAddr,
        (kind, transport): (&'static str, &'static str),
        ctl_tx: mpsc::Sender<ServerMessage>,
    ) -> Self {
        let session = Session::new(shared.session_config(), shared.clock, Instant::now());
        Self {
            shared,
            remote,
            kind,
            transport,
            session,
            joined: None,
            frames: None,
            closed: None,
            revoked: None,
            clipboard: None,
            reported: Reported::default(),
            closing: None,
            ctl_tx: Some(ctl_tx),
            welcomed: watch::channel(false).0,
            cancel: watch::channel(0).0,
        }
    }

    /// The newest-wins mark a transport's frame sender watches.
    fn cancel_rx(&self) -> watch::Receiver<u64> {
        self.cancel.subscribe()
    }

    /// Executes the session's actions; false once the session has ended.
    fn run_actions(&mut self, slot: &mut SlotGuard, out: &mut impl ViewerOut) -> bool {
        while let Some(action) = self.session.poll_action() {
            let now = Instant::now();
            match action {
                Action::Authorize(hello) => {
                    let granted = authorize(&self.shared, slot, &hello, now).map(|(grant, env)| {
                        out.admitted();
                        self.join(env);
                        grant
                    });
                    self.session.handle(Event::Authorized(granted), now);
                }
                Action::Send(m) => {
                    let welcome = matches!(m, ServerMessage::Welcome { .. });
                    out.send(m);
                    if welcome {
                        self.welcomed.send_replace(true);
                    }
                }
                Action::SendFrame(frame) => out.send_frame(frame),
                Action::CancelFramesBefore(sequence) => {
                    self.cancel.send_replace(sequence);
                }
                Action::Close(r) => self.closing = Some(r),
                Action::Record(record) => {
                    if let Some(j) = &self.joined {
                        self.shared.record(&j.env, j.viewer_id, self.remote, record);
                    }
                }
                action => {
                    if let Some(j) = &self.joined {
                        if let Some((what, reason)) =
                            execute_on_environment(&j.env, j.viewer_id, action)
                        {
                            self.session
                                .handle(Event::Unavailable { what, reason }, now);
                        }
                    }
                }
            }
        }
        if let Some(j) = &self.joined {
            let stats = self.session.stats();
            self.reported.sync(&j.env, stats);
            let viewer = ViewerStats {
                viewer: j.viewer_id,
                transport: self.transport,
                frames_sent: stats.frames_sent,
                frames_dropped: stats.frames_dropped,
                input_events: stats.input_events,
                bitrate_target_bps: self.session.bitrate_target().unwrap_or(0),
                rtt: self.session.path().rtt,
                client: self.session.client_stats(),
            };
            j.env
                .viewer_stats
                .lock()
                .expect("poisoned")
                .insert(j.viewer_id, viewer);
        }
        !self.session.is_ended()
    }

    /// Takes a hold on `env` and subscribes to its feeds.
    fn join(&mut self, env: Arc<Environment>) {
        let ctl_tx = self
            .ctl_tx
            .clone()
            .expect("a viewer joins before its session ends");
        let viewer_id = self.shared.next_viewer.fetch_add(1, Ordering::Relaxed);
        info!(remote = %self.remote, env = %env.id, viewer = viewer_id, "{} admitted", self.kind);
        env.viewers.fetch_add(1, Ordering::AcqRel);
        (self.frames, self.closed, self.revoked, self.clipboard) = subscribe(&self.shared, &env);
        self.joined = Some(Joined::new(
            env,
            viewer_id,
            &ctl_tx,
            &self.welcomed.subscribe(),
        ));
    }

    /// The next thing a feed delivers (frames and the rest only once joined).
    async fn next_feed(&mut self) -> Feed {
        let timeout = self.session.poll_timeout();
        tokio::select! {
            frame = next_frame(self.frames.as_mut()) => Feed::Frame(frame),
            _ = sleep_until(timeout) => Feed::Timeout,
            _ = revocations_changed(self.revoked.as_mut()) => Feed::Revoked,
            _ = env_closed(self.closed.as_mut()) => Feed::EnvironmentClosed,
            c = clipboard_changed(self.clipboard.as_mut()) => Feed::Clipboard(c),
        }
    }

    /// Hands what a feed delivered to the session; `path` reads the transport's path now.
    fn on_feed(&mut self, feed: Feed, path: impl Fn() -> PathStats) {
        let now = Instant::now();
        match feed {
            Feed::Frame(Ok(frame)) => {
                self.session.handle(Event::Path(path()), now);
                self.session.handle(Event::Frame(frame), now);
            }
            Feed::Frame(Err(broadcast::error::RecvError::Lagged(n))) => {
                self.session.handle(Event::FramesLagged(n), now)
            }
            Feed::Frame(Err(broadcast::error::RecvError::Closed)) | Feed::EnvironmentClosed => {
                self.session.handle(Event::EnvironmentClosed, now)
            }
            Feed::Timeout => {
                self.session.handle(Event::Path(path()), now);
                self.session.handle_timeout(now);
            }
            Feed::Revoked => {
                let list = self.shared.revocations.lock().expect("poisoned").clone();
                self.session.handle(Event::Revocations(&list), now);
            }
            Feed::Clipboard(c) => {
                if self.joined.as_ref().map(|j| j.viewer_id) != c.from_viewer {
                    self.session
                        .handle(Event::EnvironmentClipboard(&c.text), now);
                }
            }
        }
    }

    /// The session has ended: stops the pointer task and returns why the viewer is closed,
    /// if it is (the transport then sends the error and closes).
    fn ending(&mut self) -> Option<Refusal> {
        self.shared.count_hello_timeout(&self.session);
        self.ctl_tx = None;
        if let Some(j) = &self.joined {
            j.cursor.abort();
        }
        let closing = self.closing.take();
        if let Some(r) = &closing {
            warn!(remote = %self.remote, code = ?r.code, reason = %r.message, "closing {}", self.kind);
        }
        closing
    }

    /// Gives up the hold on the environment and parks the session for resumption.
    fn leave(self) {
        if let (Some(j), Some(id)) = (self.joined, self.session.id()) {
            j.env.viewers.fetch_sub(1, Ordering::AcqRel);
            j.env.targets.lock().expect("poisoned").remove(&j.viewer_id);
            j.env
                .viewer_stats
                .lock()
                .expect("poisoned")
                .remove(&j.viewer_id);
            park_session(&self.shared, id, j.env.clone(), self.session.held());
            info!(viewer = j.viewer_id, env = %j.env.id, "{} left", self.kind);
        }
    }
}

/// Tokio's form of the session's next deadline (far away if it has none).
fn sleep_deadline(at: Option<Instant>) -> tokio::time::Instant {
    at.unwrap_or_else(|| Instant::now() + session::FAR_FUTURE)
        .into()
}

/// Executes an action that concerns the viewer's environment; returns what the
/// environment could not do, for the session to tell the viewer.
fn execute_on_environment(
    env: &Environment,
    viewer_id: u64,
    action: Action,
) -> Option<(Capability, String)> {
    let (capability, result) = match action {
        Action::Inject(events) => (None, env.input.inject(&events)),
        Action::SetClipboard(text) => {
            let result = env.input.set_clipboard(&text);
            if result.is_ok() {
                // The environment's other viewers see what this one pasted.
                env.clipboard.send_replace(Some(SharedClipboard {
                    text: text.into(),
                    from_viewer: Some(viewer_id),
                }));
            }
            (Some(Capability::Clipboard), result)
        }
        Action::Resize { width, height } => (
            Some(Capability::Resize),
            env.input.request_resize(width.into(), height.into()),
        ),
        Action::RequestKeyframe => {
            env.request_keyframe();
            return None;
        }
        Action::SetBitrateTarget(target) => {
            env.targets
                .lock()
                .expect("poisoned")
                .insert(viewer_id, target);
            return None;
        }
        other => {
            debug!(?other, "not an environment action");
            return None;
        }
    };
    match (capability, result) {
        (_, Ok(())) => None,
        (Some(what), Err(InputError::Unavailable(reason))) => Some((what, reason)),
        (_, Err(e)) => {
            warn!(env = %env.id, error = %e, "input delivery failed");
            None
        }
    }
}

/// Keeps a dropped session for `resume_grace`; afterwards releases whatever it held down.
fn park_session(shared: &Arc<Shared>, id: [u8; 16], env: Arc<Environment>, held: HeldInput) {
    let env_id = env.id.clone();
    shared
        .parked
        .lock()
        .expect("poisoned")
        .park(id, &env_id, env, held, Instant::now());
    let shared = shared.clone();
    tokio::spawn(async move {
        tokio::time::sleep(shared.cfg.resume_grace).await;
        let expired = shared
            .parked
            .lock()
            .expect("poisoned")
            .expire(Instant::now());
        for Expired { env, releases } in expired {
            if releases.is_empty() {
                continue;
            }
            if let Err(e) = env.input.inject(&releases) {
                warn!(env = %env.id, error = %e, "releasing held input failed");
            }
        }
    });
}

/// Longest wait between two pointer updates to one viewer, whatever the frame rate.
const MAX_CURSOR_INTERVAL: Duration = Duration::from_millis(50);

/// Sends the viewer the environment's pointer: the current state at once (with its image),
/// then the newest state after each change, at most once per frame interval. Waiting for the
/// control queue instead of queueing means a slow viewer skips to the newest position.
async fn cursor_loop(
    env: Arc<Environment>,
    ctl_tx: mpsc::Sender<ServerMessage>,
    mut welcomed: watch::Receiver<bool>,
) {
    // A pointer before the Welcome would be the viewer's first message: a protocol error.
    if welcomed.wait_for(|w| *w).await.is_err() {
        return;
    }
    let mut rx = env.cursor.subscribe();
    let mut sent_serial = None;
    loop {
        let snapshot = rx.borrow_and_update().clone();
        if let Some(snapshot) = snapshot {
            if ctl_tx.send(snapshot.message(sent_serial)).await.is_err() {
                break;
            }
            sent_serial = Some(snapshot.image_serial).filter(|_| snapshot.image.is_some());
        }
        let fps_milli = env.config().fps_milli.max(1);
        let frame_interval = Duration::from_micros(1_000_000_000 / u64::from(fps_milli));
        // Slow streams (a still screen at 1 fps) still get a pointer that feels live.
        tokio::time::sleep(frame_interval.min(MAX_CURSOR_INTERVAL)).await;
        if rx.changed().await.is_err() {
            break;
        }
    }
    // The environment or the control writer is gone; the driver ends the session.
}

/// Resolves once a keyframe newer than `sequence` has been published to this viewer.
async fn superseded(cancel: &mut watch::Receiver<u64>, sequence: u64) {
    loop {
        if *cancel.borrow_and_update() > sequence {
            return;
        }
        if cancel.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Sends one frame on its own unidirectional stream, reset if a keyframe supersedes it.
async fn send_frame(
    conn: quinn::Connection,
    packet: Arc<Frame>,
    mut cancel: watch::Receiver<u64>,
    done: mpsc::UnboundedSender<u64>,
) {
    let header = packet.header();
    let opened = tokio::select! {
        s = conn.open_uni() => s.ok(),
        _ = superseded(&mut cancel, packet.sequence) => None,
    };
    if let Some(mut stream) = opened {
        // Older frames go first: the decoder needs them in order.
        let _ = stream.set_priority(-(packet.sequence as i32 & 0x3fff_ffff));
        let cancelled = tokio::select! {
            _ = async {
                stream.write_all(&header.encode()).await?;
                stream.write_all(&packet.data).await?;
                stream.finish()?;
                // Counts as in flight until the peer acknowledged every byte.
                let _ = stream.stopped().await;
                Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
            } => false,
            _ = superseded(&mut cancel, packet.sequence) => true,
        };
        if cancelled {
            let _ = stream.reset(VarInt::from_u32(0));
        }
    }
    // Counted in flight until here; the session may be gone already.
    let _ = done.send(packet.sequence);
}

/// First byte of a server → client message on a message transport ([`MessageViewers`]):
/// one framed control message (`ServerMessage::to_bytes`) follows. A video frame's message
/// starts with its header instead, whose first byte is the frame stream type (0x01).
pub const MESSAGE_CONTROL: u8 = 0x00;

/// A message for a message transport's writer ([`MessageViewers::serve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    /// One binary message: [`MESSAGE_CONTROL`] and a control message, or a frame's header
    /// and access unit.
    Binary(Vec<u8>),
    /// Close the transport with this protocol error code and reason; nothing follows.
    Close(ErrorCode, String),
}

/// Why a message transport's connection was not admitted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotAdmitted(String);

/// A message-transport connection's admission slot ([`MessageViewers::admit`]).
pub struct MessageSlot(SlotGuard);

/// Serves viewers that arrive over an ordered message transport instead of QUIC (the
/// browser's WebSocket, `crate::web`). Each is driven by the same [`Session`] as a QUIC
/// viewer (Hello, token, admission caps, rights, held keys, expiry, resume, newest-wins
/// frames, ABR), with the same tables: only the I/O differs. Client → server messages carry
/// control-stream bytes; server → client messages are [`Outbound`]s.
#[derive(Clone)]
pub struct MessageViewers {
    shared: Arc<Shared>,
}

impl StreamServer {
    /// The handle through which other transports hand this server their viewers.
    pub fn message_viewers(&self) -> MessageViewers {
        MessageViewers {
            shared: self.shared.clone(),
        }
    }
}

impl MessageViewers {
    /// SHA-256 (hex) of the certificate WebTransport clients get now (what a page passes as
    /// `serverCertificateHashes`).
    pub fn webtransport_cert_sha256(&self) -> Option<String> {
        self.shared.certs.webtransport_sha256()
    }

    /// Takes an admission slot for a connection from `ip` whose address is proven (a
    /// completed TCP handshake): it counts as pending until its Hello is accepted.
    pub fn admit(&self, ip: std::net::IpAddr) -> Result<MessageSlot, NotAdmitted> {
        let decision = self
            .shared
            .admission
            .lock()
            .expect("poisoned")
            .on_incoming(ip, true, false);
        match decision {
            Decision::Accept(stage) => Ok(MessageSlot(SlotGuard {
                shared: self.shared.clone(),
                stage: Some(stage),
            })),
            Decision::Refuse(full) => {
                self.shared
                    .admission_counters
                    .refused
                    .fetch_add(1, Ordering::Relaxed);
                Err(NotAdmitted(full.to_string()))
            }
            Decision::Retry => Err(NotAdmitted("address not validated".into())),
        }
    }

    /// Drives one viewer until its session ends: `incoming` yields the client's messages
    /// (control-stream bytes; its end is the client leaving), `outgoing` takes what goes to
    /// the client, `path` reads the transport's path now (RTT, window, loss). A frame counts
    /// as in flight until `outgoing` accepted it, so a transport that pushes back (TCP's
    /// send buffer) makes the session drop frames and send a keyframe, newest wins.
    pub async fn serve<R, W, P>(
        &self,
        slot: MessageSlot,
        remote: SocketAddr,
        incoming: R,
        outgoing: W,
        path: P,
    ) where
        R: futures_util::Stream<Item = Vec<u8>> + Unpin + Send,
        W: futures_util::Sink<Outbound> + Unpin + Send + 'static,
        P: Fn() -> PathStats + Send,
    {
        serve_messages(
            self.shared.clone(),
            slot.0,
            remote,
            incoming,
            outgoing,
            path,
        )
        .await
    }
}

/// What the message writer task is asked to send, in order.
enum Queued {
    Control(ServerMessage),
    Frame(Arc<Frame>),
    Close(Refusal),
}

/// Writes queued messages in order; frames older than the newest cancel mark are skipped
/// (reported done without being sent). Every frame taken off the queue is reported done.
async fn write_messages<W>(
    mut out: W,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    cancel: watch::Receiver<u64>,
    done: mpsc::UnboundedSender<u64>,
) where
    W: futures_util::Sink<Outbound> + Unpin + Send,
{
    use futures_util::SinkExt;
    while let Some(item) = rx.recv().await {
        let message = match item {
            Queued::Control(m) => {
                let mut b = vec![MESSAGE_CONTROL];
                b.extend_from_slice(&m.to_bytes());
                Outbound::Binary(b)
            }
            Queued::Frame(frame) => {
                if frame.sequence < *cancel.borrow() {
                    let _ = done.send(frame.sequence);
                    continue;
                }
                let mut b = Vec::with_capacity(wire::FRAME_HEADER_LEN + frame.data.len());
                b.extend_from_slice(&frame.header().encode());
                b.extend_from_slice(&frame.data);
                let sent = out.send(Outbound::Binary(b)).await;
                let _ = done.send(frame.sequence);
                if sent.is_err() {
                    break;
                }
                continue;
            }
            Queued::Close(r) => {
                let _ = out.send(Outbound::Close(r.code, r.message)).await;
                break;
            }
        };
        if out.send(message).await.is_err() {
            break;
        }
    }
}

/// [`serve_connection`] for a message transport: the same [`ViewerLoop`], with the
/// transport's messages in and one ordered writer out.
async fn serve_messages<R, W, P>(
    shared: Arc<Shared>,
    mut slot: SlotGuard,
    remote: SocketAddr,
    mut incoming: R,
    outgoing: W,
    path: P,
) where
    R: futures_util::Stream<Item = Vec<u8>> + Unpin + Send,
    W: futures_util::Sink<Outbound> + Unpin + Send + 'static,
    P: Fn() -> PathStats + Send,
{
    use futures_util::StreamExt;
    // The cursor task writes into a bounded queue (a slow viewer skips to the newest
    // pointer), forwarded to the writer here.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ServerMessage>(64);
    let mut lp = ViewerLoop::new(shared, remote, ("web viewer", "web"), ctl_tx);
    // The transport is the control stream: it is open once the connection is.
    lp.session.handle(Event::ControlOpened, Instant::now());
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<u64>();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Queued>();
    let mut writer = tokio::spawn(write_messages(outgoing, out_rx, lp.cancel_rx(), done_tx));
    let mut writer_done = false;
    let mut out = MessageOut(out_tx);
    while lp.run_actions(&mut slot, &mut out) {
        tokio::select! {
            data = incoming.next() => match data {
                Some(data) => lp.session.handle(Event::ControlData(&data), Instant::now()),
                None => lp.session.handle(Event::ControlFinished, Instant::now()),
            },
            feed = lp.next_feed() => lp.on_feed(feed, &path),
            Some(sequence) = done_rx.recv() => {
                lp.session.handle(Event::FrameDone(sequence), Instant::now());
            }
            Some(m) = ctl_rx.recv() => out.send(m),
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                lp.session.handle(Event::ConnectionLost, Instant::now());
            }
        }
    }
    if let Some(r) = lp.ending() {
        // The error goes last as a message, then the close repeats code and reason.
        out.send(ServerMessage::Error {
            code: r.code,
            message: r.message.clone(),
        });
        let _ = out.0.send(Queued::Close(r));
        drop(out);
        if !writer_done {
            let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, &mut writer).await;
        }
    } else {
        drop(out);
    }
    writer.abort();
    lp.leave();
    drop(slot);
}

/// A message transport's side of a [`ViewerLoop`]: everything in order through one writer.
struct MessageOut(mpsc::UnboundedSender<Queued>);

impl ViewerOut for MessageOut {
    fn send(&mut self, m: ServerMessage) {
        let _ = self.0.send(Queued::Control(m));
    }

    fn send_frame(&mut self, frame: Arc<Frame>) {
        let _ = self.0.send(Queued::Frame(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_target_is_the_smallest_healthy_viewer_target() {
        assert_eq!(
            shared_target([3_000_000, 2_000_000].into_iter()),
            Some(2_000_000)
        );
        // A stalled viewer at the floor does not drag the healthy one down.
        assert_eq!(
            shared_target([3_000_000, 250_000].into_iter()),
            Some(3_000_000)
        );
        assert_eq!(shared_target(std::iter::empty()), None);
    }

    fn arrow(width: u32, height: u32) -> encoder::CursorShape {
        encoder::CursorShape {
            hot_x: 1,
            hot_y: 2,
            width,
            height,
            bgra: (0..width * height * 4).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn cursor_image_goes_to_each_viewer_once_per_shape() {
        let mut cursor = CursorSnapshot::default();
        cursor.apply(encoder::CursorUpdate {
            x: 10,
            y: 20,
            visible: true,
            image: Some(arrow(3, 2)),
        });
        let first = cursor.message(None);
        let again = cursor.message(Some(cursor.image_serial));
        cursor.apply(encoder::CursorUpdate {
            x: -5,
            y: 70_000,
            visible: false,
            image: None,
        });
        let moved = cursor.message(Some(cursor.image_serial));
        let joined = cursor.message(None);
        let seen = cursor.image_serial;
        cursor.apply(encoder::CursorUpdate {
            x: 1,
            y: 1,
            visible: true,
            image: Some(arrow(2, 2)),
        });
        let reshaped = cursor.message(Some(seen));

        let ServerMessage::Cursor {
            x,
            y,
            visible,
            image: Some(img),
        } = first
        else {
            panic!("first message carries the image: {first:?}")
        };
        assert_eq!((x, y, visible), (10, 20, true));
        assert_eq!((img.hot_x, img.hot_y, img.width, img.height), (1, 2, 3, 2));
        assert_eq!(img.bgra, arrow(3, 2).bgra);
        assert!(matches!(again, ServerMessage::Cursor { image: None, .. }));
        assert_eq!(
            moved,
            ServerMessage::Cursor {
                x: 0,
                y: u16::MAX,
                visible: false,
                image: None
            },
            "positions are clamped to the wire's range"
        );
        assert!(
            matches!(joined, ServerMessage::Cursor { image: Some(ref i), .. } if i.width == 3),
            "a joining viewer gets the current image with the position"
        );
        assert!(
            matches!(reshaped, ServerMessage::Cursor { image: Some(ref i), .. } if i.width == 2)
        );
    }

    #[test]
    fn oversized_cursor_images_are_cropped_to_the_wire_limit() {
        let edge = u32::from(wire::MAX_CURSOR_EDGE);
        let mut shape = arrow(edge + 10, 2);
        shape.hot_x = 300;
        let img = wire_cursor_image(shape.clone());
        let short = wire_cursor_image(encoder::CursorShape {
            bgra: vec![7; 4],
            ..arrow(2, 2)
        });

        assert_eq!((img.width, img.height, img.hot_x), (edge as u16, 2, 300));
        let row = (edge as usize + 10) * 4;
        assert_eq!(
            img.bgra[..edge as usize * 4],
            shape.bgra[..edge as usize * 4]
        );
        assert_eq!(
            img.bgra[edge as usize * 4..],
            shape.bgra[row..row + edge as usize * 4]
        );
        assert_eq!(short.bgra, [vec![7; 4], vec![0; 12]].concat());
    }
}
