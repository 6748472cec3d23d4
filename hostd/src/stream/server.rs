//! The QUIC stream server: accepts viewers, authenticates them with capability tokens and
//! fans one shared encoder per environment out to every viewer of it.
//!
//! Threads and tasks: each environment's source and encoder run on a dedicated OS thread
//! (blocking `next_frame` + CPU-bound encode) publishing into a broadcast channel, and the
//! source's pointer into a watch channel (latest value only). Each viewer has a control task
//! (input, keyframe requests, pings), a video task (newest-wins delivery on per-frame
//! unidirectional streams, bounded frames in flight), a cursor task (the newest pointer state,
//! at most once per frame interval) and an ABR tick.
//!
//! Admission ([`super::admission`]): unvalidated handshakes are few (then QUIC Retry), every
//! handshake has a deadline, the Hello has a deadline and a size bound (the connection's
//! receive window is a few KiB until the token is accepted), and only authenticated sessions
//! count against the per-prefix and total session caps. Tokens are checked at Hello and for
//! the whole session: revocation ends it at once; expiry stops its input at once and its
//! video after `expiry_grace`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use encoder::{EncodeError, Encoder, EncoderConfig, Tuning};
use proto::stream::{
    self as wire, Button, ClientMessage, Codec, CursorImage, ErrorCode, FrameHeader, InputEvent,
    Message, MessageReader, Rights, ServerMessage, ServerStats, StreamConfig, MAX_HELLO_LEN,
    MAX_MESSAGE_LEN,
};
use quinn::VarInt;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{debug, info, warn};

use super::abr::{self, BitrateLimits, Controller, PathSample};
use super::admission::{Admission, Decision, Limits, Stage};
use super::identity::Identity;
use super::source::{EnvironmentSource, InputSink};
use super::token::{Claims, EnvRef, Revocations, TokenId, TokenKey};

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

/// Converts `Instant`s to the wire's microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy)]
struct Clock {
    instant: Instant,
    unix_us: u64,
}

impl Clock {
    fn new() -> Self {
        Self {
            instant: Instant::now(),
            unix_us: unix_now_us(),
        }
    }
    fn unix_us(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(d) => self.unix_us + d.as_micros() as u64,
            None => self
                .unix_us
                .saturating_sub(self.instant.duration_since(at).as_micros() as u64),
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

/// One encoded frame as published to viewers.
#[derive(Debug)]
struct Packet {
    sequence: u64,
    capture_time_us: u64,
    keyframe: bool,
    width: u16,
    height: u16,
    data: Vec<u8>,
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

struct Environment {
    id: String,
    /// The host's unique id of this environment; tokens are signed over it.
    uid: u64,
    /// Set when the environment stops streaming: its sessions end.
    closed: watch::Sender<bool>,
    frames: broadcast::Sender<Arc<Packet>>,
    /// The source's pointer; `None` until the source reports one.
    cursor: watch::Sender<Option<CursorSnapshot>>,
    input: Arc<dyn InputSink>,
    force_keyframe: AtomicBool,
    stop: AtomicBool,
    viewers: AtomicUsize,
    /// Per-viewer ABR targets; the encoder runs at the smallest.
    targets: Mutex<HashMap<u64, u32>>,
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

/// A session whose connection dropped, kept for resumption.
struct ParkedSession {
    env_id: String,
    held: HeldInput,
    generation: u64,
}

/// Keys and buttons a session holds down, released when the session ends for good.
#[derive(Debug, Default, Clone)]
struct HeldInput {
    keys: HashSet<u16>,
    buttons: HashSet<u8>,
}

impl HeldInput {
    fn track(&mut self, ev: &InputEvent) {
        match *ev {
            InputEvent::Key { code, pressed } => {
                if pressed {
                    self.keys.insert(code);
                } else {
                    self.keys.remove(&code);
                }
            }
            InputEvent::PointerButton { button, pressed } => {
                if pressed {
                    self.buttons.insert(button as u8);
                } else {
                    self.buttons.remove(&(button as u8));
                }
            }
            _ => {}
        }
    }
    fn releases(&self) -> Vec<InputEvent> {
        let mut evs: Vec<InputEvent> = self
            .keys
            .iter()
            .map(|&code| InputEvent::Key {
                code,
                pressed: false,
            })
            .collect();
        for b in &self.buttons {
            let button = match b {
                1 => Button::Left,
                2 => Button::Middle,
                3 => Button::Right,
                4 => Button::Back,
                _ => Button::Forward,
            };
            evs.push(InputEvent::PointerButton {
                button,
                pressed: false,
            });
        }
        evs
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
    parked: Mutex<HashMap<[u8; 16], ParkedSession>>,
    next_viewer: AtomicU64,
}

impl Shared {
    /// Whether `claims` were revoked, as a refusal for the client.
    fn check_revoked(&self, claims: &Claims) -> Result<(), Refusal> {
        self.revocations
            .lock()
            .expect("poisoned")
            .check(claims)
            .map_err(|e| Refusal::new(e.code(), e.to_string()))
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
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Until the token is accepted a peer may have only a Hello's worth of data in flight
    // (raised per connection after admission).
    t.receive_window(PRE_AUTH_RECEIVE_WINDOW.into());
    t.datagram_receive_buffer_size(None);
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
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![identity.cert.clone()], identity.private_key())?;
        tls.alpn_protocols = vec![wire::ALPN.to_vec()];
        tls.max_early_data_size = 0;
        let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| StreamError::QuicTls(e.to_string()))?;
        let mut server_cfg = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
        server_cfg.transport_config(Arc::new(transport_config(&cfg)));
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
        let shared = Arc::new(Shared {
            cfg,
            tokens,
            clock: Clock::new(),
            envs: Mutex::new(HashMap::new()),
            admission: Mutex::new(Admission::new(limits)),
            admission_counters: AdmissionCounters::default(),
            revocations: Mutex::new(Revocations::default()),
            revoked: watch::Sender::new(0),
            parked: Mutex::new(HashMap::new()),
            next_viewer: AtomicU64::new(1),
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
            input: source.input,
            force_keyframe: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            viewers: AtomicUsize::new(0),
            targets: Mutex::new(HashMap::new()),
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
    let mut shadow = Shadow::default();
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
                // now: encode the last picture again from the shadow copy.
                let due = env.force_keyframe.load(Ordering::Acquire)
                    && last_forced.is_none_or(|t| t.elapsed() >= cfg.keyframe_min_interval);
                if due
                    && shadow.width == width
                    && shadow.height == height
                    && !shadow.data.is_empty()
                {
                    env.force_keyframe.store(false, Ordering::Release);
                    last_forced = Some(Instant::now());
                    let full = [encoder::Rect::new(0, 0, width, height)];
                    match encoder.encode(&shadow.frame(), &full, true) {
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
                        Ok(None) => {}
                        Err(e) => {
                            warn!(env = %env.id, error = %e, "re-encoding the still frame failed")
                        }
                    }
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
        shadow.update(&frame.frame, &frame.damage);
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
    let packet = Packet {
        sequence,
        capture_time_us: clock.unix_us(captured_at),
        keyframe: encoded.keyframe,
        width: width as u16,
        height: height as u16,
        data: encoded.data,
    };
    // No receivers is fine: the last viewer may have just left.
    let _ = env.frames.send(Arc::new(packet));
}

/// Copy of the source's latest picture, kept up to date by copying only damaged rectangles,
/// so a keyframe can be produced while the source has nothing new to return.
#[derive(Default)]
struct Shadow {
    width: u32,
    height: u32,
    format: Option<encoder::PixelFormat>,
    data: Vec<u8>,
}

impl Shadow {
    fn update(&mut self, f: &encoder::FrameRef<'_>, damage: &[encoder::Rect]) {
        let row = f.width as usize * 4;
        let whole = encoder::Rect::new(0, 0, f.width, f.height);
        let rects: &[encoder::Rect] =
            if (f.width, f.height) != (self.width, self.height) || self.format != Some(f.format) {
                self.width = f.width;
                self.height = f.height;
                self.format = Some(f.format);
                self.data = vec![0; row * f.height as usize];
                std::slice::from_ref(&whole)
            } else {
                damage
            };
        for r in rects {
            let r = r.clamp_to(f.width, f.height);
            let (x0, w) = (r.x as usize * 4, r.width as usize * 4);
            for y in r.y as usize..(r.y + r.height) as usize {
                let (src, dst) = (y * f.stride + x0, y * row + x0);
                if let (Some(s), Some(d)) =
                    (f.data.get(src..src + w), self.data.get_mut(dst..dst + w))
                {
                    d.copy_from_slice(s);
                }
            }
        }
    }

    fn frame(&self) -> encoder::FrameRef<'_> {
        encoder::FrameRef::packed(
            self.width,
            self.height,
            self.format.unwrap_or(encoder::PixelFormat::Bgrx),
            &self.data,
        )
    }
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
    serve_connection(shared, conn, guard).await;
}

/// Reads control messages until one is complete.
async fn read_message(
    recv: &mut quinn::RecvStream,
    reader: &mut MessageReader,
) -> Result<Option<ClientMessage>, Refusal> {
    loop {
        match reader.next_message::<ClientMessage>() {
            Ok(Some(m)) => return Ok(Some(m)),
            Ok(None) => {}
            Err(e) => {
                return Err(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    format!("malformed control message: {e}"),
                ))
            }
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => reader.push(&chunk.bytes),
            Ok(None) => return Ok(None),
            Err(_) => return Ok(None),
        }
    }
}

/// A reason to end a session, sent to the client before closing.
#[derive(Debug)]
struct Refusal {
    code: ErrorCode,
    message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

async fn refuse(conn: &quinn::Connection, send: Option<&mut quinn::SendStream>, r: Refusal) {
    if let Some(send) = send {
        let msg = ServerMessage::Error {
            code: r.code,
            message: r.message.clone(),
        };
        let _ = send.write_all(&msg.to_bytes()).await;
        let _ = send.finish();
    }
    // The close frame repeats the code and message: clients see them even if the stream data
    // is lost with the connection.
    conn.close(VarInt::from_u32(r.code as u32), r.message.as_bytes());
}

async fn serve_connection(shared: Arc<Shared>, conn: quinn::Connection, mut slot: SlotGuard) {
    let remote = conn.remote_address();
    // One deadline for the control stream and the Hello on it.
    let hello_deadline = tokio::time::Instant::now() + shared.cfg.hello_timeout;
    let hello_late = |shared: &Shared, what: &str| {
        shared
            .admission_counters
            .hello_timeouts
            .fetch_add(1, Ordering::Relaxed);
        Refusal::new(ErrorCode::ProtocolViolation, format!("no {what} in time"))
    };
    let (mut send, mut recv) = match tokio::time::timeout_at(hello_deadline, conn.accept_bi()).await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "connection ended before the control stream");
            return;
        }
        Err(_) => return refuse(&conn, None, hello_late(&shared, "control stream opened")).await,
    };
    // Before authentication only a Hello's worth is accepted (the receive window bounds what
    // the peer can send; the reader refuses a longer length prefix at once).
    let mut reader = MessageReader::with_limit(MAX_HELLO_LEN);
    let hello =
        match tokio::time::timeout_at(hello_deadline, read_message(&mut recv, &mut reader)).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return,
            Ok(Err(r)) => return refuse(&conn, Some(&mut send), r).await,
            Err(_) => {
                return refuse(
                    &conn,
                    Some(&mut send),
                    hello_late(&shared, "Hello received"),
                )
                .await
            }
        };
    let session = match admit(&shared, hello) {
        Ok(s) => s,
        Err(r) => {
            warn!(%remote, code = ?r.code, reason = %r.message, "viewer refused");
            return refuse(&conn, Some(&mut send), r).await;
        }
    };
    // Authenticated: only now does the connection count as a session of its prefix.
    if let Err(full) = slot.advance(|a, stage| a.authenticated(stage)) {
        warn!(%remote, reason = %full, "viewer refused");
        let r = Refusal::new(ErrorCode::TooManyConnections, full.to_string());
        return refuse(&conn, Some(&mut send), r).await;
    }
    conn.set_receive_window(SESSION_RECEIVE_WINDOW.into());
    reader.set_limit(MAX_MESSAGE_LEN);
    let viewer_id = shared.next_viewer.fetch_add(1, Ordering::Relaxed);
    info!(%remote, env = %session.env.id, rights = %session.claims.rights,
          token = %session.claims.id, resumed = session.resumed, viewer = viewer_id,
          "viewer joined");
    let welcome = ServerMessage::Welcome {
        version: session.version,
        session_id: session.id,
        rights: session.claims.rights,
        resumed: session.resumed,
        resume_grace_ms: shared.cfg.resume_grace.as_millis() as u32,
        config: session.env.config(),
    };
    if send.write_all(&welcome.to_bytes()).await.is_err() {
        return;
    }
    run_session(shared, conn, send, recv, reader, session, viewer_id).await;
    drop(slot);
}

/// An admitted viewer session.
struct Session {
    id: [u8; 16],
    version: u16,
    env: Arc<Environment>,
    claims: Claims,
    resumed: bool,
    held: HeldInput,
}

fn admit(shared: &Shared, hello: ClientMessage) -> Result<Session, Refusal> {
    let ClientMessage::Hello {
        min_version,
        max_version,
        env_id,
        token,
        resume,
        ..
    } = hello
    else {
        return Err(Refusal::new(
            ErrorCode::ProtocolViolation,
            "first message must be Hello",
        ));
    };
    let version = wire::negotiate_version(min_version, max_version).ok_or_else(|| {
        Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks versions {min_version}..={max_version}, server {}..={}",
                wire::MIN_VERSION,
                wire::VERSION
            ),
        )
    })?;
    let refusal = |e: super::token::TokenError| Refusal::new(e.code(), e.to_string());
    // The signature first: a peer without a genuine token learns nothing, not even which
    // environments stream.
    shared.tokens.decode(&token).map_err(refusal)?;
    let env = shared
        .envs
        .lock()
        .expect("poisoned")
        .get(&env_id)
        .cloned()
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::NoSuchEnvironment,
                format!("environment {env_id:?} is not streaming"),
            )
        })?;
    let claims = shared
        .tokens
        .verify(&token, &env.env_ref())
        .map_err(refusal)?;
    shared.check_revoked(&claims)?;
    if !claims.rights.contains(Rights::VIEW) {
        return Err(Refusal::new(
            ErrorCode::PermissionDenied,
            "token lacks the view right",
        ));
    }
    let mut resumed = false;
    let mut held = HeldInput::default();
    let mut id = [0u8; 16];
    if resume != [0; 16] {
        let mut parked = shared.parked.lock().expect("poisoned");
        match parked.remove(&resume) {
            Some(p) if p.env_id == env_id => {
                resumed = true;
                held = p.held;
                id = resume;
            }
            Some(p) => {
                parked.insert(resume, p);
                return Err(Refusal::new(
                    ErrorCode::ResumeRejected,
                    "session belongs to another environment",
                ));
            }
            // Unknown or expired: start afresh rather than fail; Welcome says resumed=false.
            None => {}
        }
    }
    if !resumed {
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "random generator failed"))?;
    }
    Ok(Session {
        id,
        version,
        env,
        claims,
        resumed,
        held,
    })
}

/// Per-viewer delivery counters shared between its tasks.
#[derive(Default)]
struct ViewerCounters {
    sent: AtomicU64,
    /// Every frame not sent to this viewer.
    dropped: AtomicU64,
    /// Frames not sent because the path did not drain (in-flight limit, broadcast lag): the
    /// ABR's congestion signal. Frames skipped while waiting for a keyframe are consequences,
    /// not new signals, and are only in `dropped`.
    congested: AtomicU64,
    in_flight: AtomicUsize,
}

async fn run_session(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut reader: MessageReader,
    session: Session,
    viewer_id: u64,
) {
    let env = session.env.clone();
    let counters = Arc::new(ViewerCounters::default());
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<ServerMessage>(64);
    let mut frames_rx = env.frames.subscribe();
    env.viewers.fetch_add(1, Ordering::AcqRel);
    env.request_keyframe();

    let writer = async {
        while let Some(m) = ctl_rx.recv().await {
            if send.write_all(&m.to_bytes()).await.is_err() {
                break;
            }
        }
    };

    let video = video_loop(
        &conn,
        &env,
        &mut frames_rx,
        &counters,
        shared.cfg.max_frames_in_flight,
        ctl_tx.clone(),
    );

    let cursor = cursor_loop(&env, ctl_tx.clone());

    // The token counts for the whole session: at expiry input stops (the control loop
    // releases what it held and refuses the rest), after the grace period the video too.
    let expires_at = instant_at_unix(session.claims.expires_unix);
    let mut held = session.held.clone();
    let control = control_loop(
        &env,
        session.claims.rights,
        expires_at,
        shared.cfg.expiry_grace,
        &mut recv,
        &mut reader,
        &ctl_tx,
        &mut held,
    );
    let expired = async {
        tokio::time::sleep_until(expires_at + shared.cfg.expiry_grace).await;
        Refusal::new(
            ErrorCode::TokenExpired,
            format!(
                "token expired {} s ago; session ended",
                shared.cfg.expiry_grace.as_secs()
            ),
        )
    };
    let revoked = async {
        let mut rx = shared.revoked.subscribe();
        loop {
            if let Err(r) = shared.check_revoked(&session.claims) {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    let env_closed = async {
        let mut rx = env.closed.subscribe();
        let _ = rx.wait_for(|closed| *closed).await;
        Refusal::new(
            ErrorCode::NoSuchEnvironment,
            format!("environment {:?} stopped streaming", env.id),
        )
    };

    let abr_loop = async {
        let mut ctl = Controller::new(shared.cfg.bitrate);
        let mut ticks = 0u32;
        let mut interval = tokio::time::interval(abr::TICK);
        loop {
            interval.tick().await;
            let st = conn.stats();
            let target = ctl.update(PathSample {
                rtt: st.path.rtt,
                cwnd_bytes: st.path.cwnd,
                sent_packets: st.path.sent_packets,
                lost_packets: st.path.lost_packets,
                dropped_frames: counters.congested.load(Ordering::Relaxed),
            });
            env.targets
                .lock()
                .expect("poisoned")
                .insert(viewer_id, target);
            ticks += 1;
            if ticks % 5 == 0 {
                let stats = ServerStats {
                    bitrate_bps: env.bitrate_bps.load(Ordering::Relaxed),
                    rtt_us: st.path.rtt.as_micros().min(u32::MAX as u128) as u32,
                    loss_permille: (ctl.last_loss * 1000.0) as u16,
                    cwnd_bytes: st.path.cwnd.min(u64::from(u32::MAX)) as u32,
                    frames_sent: counters.sent.load(Ordering::Relaxed),
                    frames_dropped: counters.dropped.load(Ordering::Relaxed),
                };
                if ctl_tx.try_send(ServerMessage::Stats(stats)).is_err() {
                    debug!(viewer = viewer_id, "control queue full; stats skipped");
                }
            }
        }
    };

    let end = tokio::select! {
        _ = writer => None,
        _ = video => None,
        _ = cursor => None,
        r = control => r,
        r = expired => Some(r),
        r = revoked => Some(r),
        r = env_closed => Some(r),
        _ = abr_loop => None,
        e = conn.closed() => { debug!(viewer = viewer_id, error = %e, "connection closed"); None }
    };
    if let Some(r) = end {
        warn!(viewer = viewer_id, code = ?r.code, reason = %r.message, "closing viewer");
        let msg = ServerMessage::Error {
            code: r.code,
            message: r.message.clone(),
        };
        let _ = send.write_all(&msg.to_bytes()).await;
        conn.close(VarInt::from_u32(r.code as u32), r.message.as_bytes());
    }
    env.viewers.fetch_sub(1, Ordering::AcqRel);
    env.targets.lock().expect("poisoned").remove(&viewer_id);
    park_session(&shared, session.id, &env, held);
    info!(viewer = viewer_id, env = %env.id, "viewer left");
}

/// Keeps a dropped session for `resume_grace`; afterwards releases whatever it held down.
fn park_session(shared: &Arc<Shared>, id: [u8; 16], env: &Arc<Environment>, held: HeldInput) {
    let generation = shared.next_viewer.fetch_add(1, Ordering::Relaxed);
    shared.parked.lock().expect("poisoned").insert(
        id,
        ParkedSession {
            env_id: env.id.clone(),
            held,
            generation,
        },
    );
    let shared = shared.clone();
    let env = env.clone();
    tokio::spawn(async move {
        tokio::time::sleep(shared.cfg.resume_grace).await;
        let expired = {
            let mut parked = shared.parked.lock().expect("poisoned");
            match parked.get(&id) {
                Some(p) if p.generation == generation => parked.remove(&id),
                _ => None,
            }
        };
        if let Some(p) = expired {
            let releases = p.held.releases();
            if !releases.is_empty() {
                if let Err(e) = env.input.inject(&releases) {
                    warn!(env = %env.id, error = %e, "releasing held input failed");
                }
            }
        }
    });
}

/// Farther than any token lives (hostd issues at most a week): an expiry beyond it is
/// treated as never reached instead of overflowing the clock.
const FAR_FUTURE: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The `Instant` at which the system clock reads `unix_s` seconds since the epoch (now if
/// that has passed).
fn instant_at_unix(unix_s: u64) -> tokio::time::Instant {
    let left_us = unix_s
        .saturating_mul(1_000_000)
        .saturating_sub(unix_now_us());
    tokio::time::Instant::now() + Duration::from_micros(left_us).min(FAR_FUTURE)
}

#[allow(clippy::too_many_arguments)]
async fn control_loop(
    env: &Environment,
    token_rights: Rights,
    expires_at: tokio::time::Instant,
    grace: Duration,
    recv: &mut quinn::RecvStream,
    reader: &mut MessageReader,
    ctl_tx: &mpsc::Sender<ServerMessage>,
    held: &mut HeldInput,
) -> Option<Refusal> {
    let mut refused_logged = false;
    let mut rights = token_rights;
    let mut expired = false;
    loop {
        let read = tokio::select! {
            r = read_message(recv, reader) => r,
            _ = tokio::time::sleep_until(expires_at), if !expired => {
                // Everything but viewing ends now; keys this viewer holds are let go, as
                // nothing it sends will release them any more.
                expired = true;
                // Sessions are only admitted with the view right.
                rights = Rights::VIEW;
                refused_logged = false;
                let releases = std::mem::take(held).releases();
                if !releases.is_empty() {
                    if let Err(e) = env.input.inject(&releases) {
                        warn!(env = %env.id, error = %e, "releasing held input failed");
                    }
                }
                info!(env = %env.id, "token expired: input stopped");
                let _ = ctl_tx.try_send(ServerMessage::Error {
                    code: ErrorCode::SessionExpiring,
                    message: format!(
                        "token expired: input is no longer accepted; video ends in {} s",
                        grace.as_secs()
                    ),
                });
                continue;
            }
        };
        let msg = match read {
            Ok(Some(m)) => m,
            Ok(None) => return None,
            Err(r) => return Some(r),
        };
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
                if !rights.contains(Rights::INPUT) {
                    env.input_refused.fetch_add(1, Ordering::Relaxed);
                    if !refused_logged {
                        let msg = denied("input", "input");
                        if let ServerMessage::Error { message, .. } = &msg {
                            warn!(env = %env.id, "{message}");
                        }
                        refused_logged = true;
                        let _ = ctl_tx.try_send(msg);
                    }
                    continue;
                }
                let ev = clamp_event(ev, &env.config());
                tracing::trace!(env = %env.id, ?ev, "input");
                held.track(&ev);
                if let Err(e) = env.input.inject(&[ev]) {
                    warn!(env = %env.id, error = %e, "input delivery failed");
                }
            }
            ClientMessage::KeyframeRequest => env.request_keyframe(),
            ClientMessage::Ping { client_time_us } => {
                let _ = ctl_tx.try_send(ServerMessage::Pong {
                    client_time_us,
                    server_time_us: unix_now_us(),
                });
            }
            ClientMessage::Clipboard(text) => {
                if !rights.contains(Rights::CLIPBOARD) {
                    warn!(env = %env.id, expired, "clipboard refused");
                    let _ = ctl_tx.try_send(denied("clipboard", "clipboard"));
                    continue;
                }
                if let Err(e) = env.input.set_clipboard(&text) {
                    warn!(env = %env.id, error = %e, "clipboard delivery failed");
                }
            }
            ClientMessage::Resize { width, height } => {
                if !rights.contains(Rights::INPUT) {
                    let _ = ctl_tx.try_send(denied("resize", "input"));
                    continue;
                }
                if let Err(e) = env.input.request_resize(width.into(), height.into()) {
                    warn!(env = %env.id, error = %e, "resize request failed");
                }
            }
            ClientMessage::Stats(s) => {
                debug!(env = %env.id, ?s, "client stats");
            }
            ClientMessage::Hello { .. } => {
                return Some(Refusal::new(
                    ErrorCode::ProtocolViolation,
                    "Hello sent twice",
                ))
            }
        }
    }
}

/// Longest wait between two pointer updates to one viewer, whatever the frame rate.
const MAX_CURSOR_INTERVAL: Duration = Duration::from_millis(50);

/// Sends the viewer the environment's pointer: the current state at once (with its image),
/// then the newest state after each change, at most once per frame interval. Waiting for the
/// control queue instead of queueing means a slow viewer skips to the newest position.
async fn cursor_loop(env: &Environment, ctl_tx: mpsc::Sender<ServerMessage>) {
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
    // The environment or the control writer is gone; other tasks end the session.
    std::future::pending::<()>().await;
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

async fn video_loop(
    conn: &quinn::Connection,
    env: &Environment,
    rx: &mut broadcast::Receiver<Arc<Packet>>,
    counters: &Arc<ViewerCounters>,
    max_in_flight: usize,
    ctl_tx: mpsc::Sender<ServerMessage>,
) {
    // Streams carrying frames older than this value are reset (newest-wins after a keyframe).
    let (cancel_tx, cancel_rx) = watch::channel(0u64);
    let mut needs_keyframe = true;
    let mut size = {
        let c = env.config();
        (c.width, c.height)
    };
    loop {
        let packet = match rx.recv().await {
            Ok(p) => p,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                counters.dropped.fetch_add(n, Ordering::Relaxed);
                counters.congested.fetch_add(n, Ordering::Relaxed);
                env.frames_dropped.fetch_add(n, Ordering::Relaxed);
                needs_keyframe = true;
                env.request_keyframe();
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        if (packet.width, packet.height) != size {
            size = (packet.width, packet.height);
            let _ = ctl_tx.send(ServerMessage::Config(env.config())).await;
        }
        if packet.keyframe {
            // Everything older is useless once the keyframe is there: stop spending bandwidth.
            cancel_tx.send_replace(packet.sequence);
            needs_keyframe = false;
        } else if needs_keyframe {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            env.frames_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        } else if counters.in_flight.load(Ordering::Acquire)
            >= in_flight_limit(max_in_flight, conn.rtt(), env.config().fps_milli)
        {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            counters.congested.fetch_add(1, Ordering::Relaxed);
            env.frames_dropped.fetch_add(1, Ordering::Relaxed);
            needs_keyframe = true;
            env.request_keyframe();
            continue;
        }
        counters.in_flight.fetch_add(1, Ordering::AcqRel);
        counters.sent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(send_frame(
            conn.clone(),
            packet,
            cancel_rx.clone(),
            counters.clone(),
        ));
    }
}

/// Frames a viewer may have unacknowledged: the configured slack plus what one round trip
/// holds at the stream's frame rate (acknowledgements take an RTT even on an idle path).
fn in_flight_limit(slack: usize, rtt: Duration, fps_milli: u32) -> usize {
    // Two RTTs: one for the acknowledgement, one for a loss to be detected and repaired.
    let per_rtt = 2.0 * rtt.as_secs_f64() * f64::from(fps_milli) / 1000.0;
    slack + per_rtt.ceil() as usize
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

async fn send_frame(
    conn: quinn::Connection,
    packet: Arc<Packet>,
    mut cancel: watch::Receiver<u64>,
    counters: Arc<ViewerCounters>,
) {
    let header = FrameHeader {
        sequence: packet.sequence,
        capture_time_us: packet.capture_time_us,
        keyframe: packet.keyframe,
        codec: Codec::H264AnnexB,
        width: packet.width,
        height: packet.height,
        payload_len: packet.data.len() as u32,
    };
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
    counters.in_flight.fetch_sub(1, Ordering::AcqRel);
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

    #[test]
    fn held_input_is_released_on_expiry() {
        let mut h = HeldInput::default();
        h.track(&InputEvent::Key {
            code: 30,
            pressed: true,
        });
        h.track(&InputEvent::Key {
            code: 31,
            pressed: true,
        });
        h.track(&InputEvent::Key {
            code: 31,
            pressed: false,
        });
        h.track(&InputEvent::PointerButton {
            button: Button::Right,
            pressed: true,
        });
        let mut r = h.releases();
        r.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            r,
            vec![
                InputEvent::Key {
                    code: 30,
                    pressed: false
                },
                InputEvent::PointerButton {
                    button: Button::Right,
                    pressed: false
                },
            ]
        );
    }

    #[test]
    fn pointer_coordinates_are_clamped_to_the_frame() {
        let cfg = StreamConfig {
            width: 100,
            height: 50,
            fps_milli: 30_000,
            codec: Codec::H264AnnexB,
            bitrate_bps: 1,
        };
        assert_eq!(
            clamp_event(InputEvent::PointerMove { x: 500, y: 20 }, &cfg),
            InputEvent::PointerMove { x: 99, y: 20 }
        );
    }

    #[test]
    fn in_flight_limit_grows_with_round_trip_time() {
        assert_eq!(in_flight_limit(4, Duration::from_micros(100), 60_000), 5);
        assert_eq!(in_flight_limit(4, Duration::from_millis(40), 60_000), 9);
    }

    #[test]
    fn shadow_tracks_damaged_rectangles_only() {
        let (w, h) = (8u32, 4u32);
        let mut px = vec![1u8; (w * h * 4) as usize];
        let mut sh = Shadow::default();
        sh.update(
            &encoder::FrameRef::packed(w, h, encoder::PixelFormat::Bgrx, &px),
            &[],
        );
        assert_eq!(sh.data, px, "first frame is copied whole");
        px.iter_mut().for_each(|b| *b = 9);
        let r = encoder::Rect::new(2, 1, 3, 2);
        sh.update(
            &encoder::FrameRef::packed(w, h, encoder::PixelFormat::Bgrx, &px),
            &[r],
        );
        for y in 0..h {
            for x in 0..w {
                let inside = (2..5).contains(&x) && (1..3).contains(&y);
                let v = sh.data[((y * w + x) * 4) as usize];
                assert_eq!(v, if inside { 9 } else { 1 }, "pixel {x},{y}");
            }
        }
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

    #[test]
    fn expiry_instants_are_bounded_for_tokens_that_never_expire() {
        let now = tokio::time::Instant::now();
        let never = instant_at_unix(u64::MAX);
        let past = instant_at_unix(1);

        assert!(never >= now + FAR_FUTURE - Duration::from_secs(1));
        assert!(past <= tokio::time::Instant::now());
    }

    #[test]
    fn clock_maps_instants_to_unix_time() {
        let c = Clock::new();
        let later = c.instant + Duration::from_millis(5);
        assert_eq!(c.unix_us(later), c.unix_us + 5_000);
        let earlier = c.instant - Duration::from_millis(5);
        assert_eq!(c.unix_us(earlier), c.unix_us - 5_000);
    }
}
