//! A viewer session: connect with a pinned certificate, authenticate, then receive decoded
//! frames and server messages as [`Event`]s while sending input.
//!
//! Tasks: a control reader and writer on the bidirectional control stream, an acceptor that
//! reads each per-frame unidirectional stream, and a decoder thread that puts frames back in
//! sequence order, skips to the newest keyframe when one is available (so a slow decoder or a
//! lost frame never accumulates latency) and decodes with openh264.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proto::stream::{
    self as wire, ClientMessage, ErrorCode, FrameHeader, InputEvent, Message, MessageReader,
    Rights, ServerMessage, ServerStats, StreamConfig, FRAME_HEADER_LEN,
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::url::ConnectUrl;

/// Why a session could not be established or ended.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("server certificate does not match the pinned fingerprint (expected {expected}, server presented {actual})")]
    CertificateMismatch { expected: String, actual: String },
    #[error("server refused the session: {message} ({code:?})")]
    Refused { code: ErrorCode, message: String },
    #[error("connection failed")]
    Connection(#[from] quinn::ConnectionError),
    #[error("connecting failed")]
    Connect(#[from] quinn::ConnectError),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("local UDP socket")]
    Io(#[from] std::io::Error),
    #[error("control stream write failed")]
    Write(#[from] quinn::WriteError),
    #[error("server violated the protocol: {0}")]
    Protocol(String),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("creating the decoder failed")]
    Decoder(#[from] encoder::DecodeError),
}

/// Knobs of a connection; the defaults suit an interactive viewer.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Drawable size hint sent in Hello (0 = no preference).
    pub viewport: (u16, u16),
    /// Session id from an earlier [`Session::session_id`] to resume.
    pub resume: Option<[u8; 16]>,
    /// How many frame streams the server may have open towards us at once.
    pub max_frame_streams: u32,
    /// Decode frames (false: only count them, e.g. for load tests).
    pub decode: bool,
    /// Time allowed for the handshake and the Welcome.
    pub timeout: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            viewport: (0, 0),
            resume: None,
            max_frame_streams: 32,
            decode: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A decoded frame with its timing.
#[derive(Debug, Clone)]
pub struct Frame {
    pub sequence: u64,
    pub keyframe: bool,
    pub width: u32,
    pub height: u32,
    /// B, G, R, X bytes, stride `width * 4`; empty when decoding is off.
    pub bgrx: Vec<u8>,
    /// Encoded size.
    pub encoded_bytes: usize,
    /// Server capture time, microseconds since the epoch on the server's clock.
    pub capture_time_us: u64,
    /// Capture to decoded, corrected by the estimated clock offset.
    pub latency: Duration,
    pub decode_time: Duration,
}

/// Something that happened in the session.
#[derive(Debug, Clone)]
pub enum Event {
    Frame(Frame),
    Config(StreamConfig),
    Cursor {
        x: u16,
        y: u16,
        visible: bool,
        image: Option<wire::CursorImage>,
    },
    Clipboard(String),
    ServerStats(ServerStats),
    /// A non-fatal error (e.g. input refused for lack of rights).
    Error {
        code: ErrorCode,
        message: String,
    },
    /// The session ended; no more events follow.
    Closed(String),
}

/// Counters kept by the session's tasks.
#[derive(Debug, Default)]
pub struct Counters {
    pub frames_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub frames_decoded: AtomicU64,
    /// Frames skipped (superseded by a keyframe, undecodable, or not consumed in time).
    pub frames_dropped: AtomicU64,
    /// Server clock minus client clock, microseconds (from Ping/Pong).
    pub clock_offset_us: AtomicI64,
    /// Round-trip time of the best Ping/Pong sample, microseconds.
    pub ping_rtt_us: AtomicU64,
}

/// An established viewer session.
pub struct Session {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    ctl_tx: mpsc::UnboundedSender<ClientMessage>,
    events: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
    session_id: [u8; 16],
    rights: Rights,
    config: StreamConfig,
    resumed: bool,
}

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn refused_from_close(e: &quinn::ConnectionError) -> Option<ClientError> {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => Some(ClientError::Refused {
            code: ErrorCode::from_u16(u16::try_from(c.error_code.into_inner()).unwrap_or(u16::MAX)),
            message: String::from_utf8_lossy(&c.reason).into_owned(),
        }),
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED =>
        {
            Some(ClientError::Refused {
                code: ErrorCode::TooManyConnections,
                message: "server refused the connection (connection limit)".into(),
            })
        }
        _ => None,
    }
}

impl Session {
    /// Connects to `url` and completes Hello/Welcome.
    pub async fn connect(url: &ConnectUrl, opts: ConnectOptions) -> Result<Session, ClientError> {
        let addr: SocketAddr = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .map_err(|source| ClientError::Resolve {
                host: url.host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| ClientError::Resolve {
                host: url.host.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            })?;
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let mut endpoint = quinn::Endpoint::client(bind)?;
        let (tls, verifier) = crate::tls::client_config(url.cert_sha256)?;
        let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).expect("in range"),
        ));
        transport.max_concurrent_uni_streams(opts.max_frame_streams.into());
        transport.max_concurrent_bidi_streams(0u32.into());
        cfg.transport_config(Arc::new(transport));
        endpoint.set_default_client_config(cfg);

        // The certificate is pinned, so the name only has to be syntactically valid.
        let connecting = endpoint.connect(addr, "localhost")?;
        let conn = match tokio::time::timeout(opts.timeout, connecting).await {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if let Some(actual) = verifier.mismatch.lock().expect("poisoned").take() {
                    return Err(ClientError::CertificateMismatch {
                        expected: crate::tls::hex(&url.cert_sha256),
                        actual,
                    });
                }
                return Err(refused_from_close(&e).unwrap_or(ClientError::Connection(e)));
            }
        };

        let handshake = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let hello = ClientMessage::Hello {
                min_version: wire::MIN_VERSION,
                max_version: wire::VERSION,
                env_id: url.env_id.clone(),
                token: url.token.clone(),
                resume: opts.resume.unwrap_or([0; 16]),
                viewport_width: opts.viewport.0,
                viewport_height: opts.viewport.1,
            };
            send.write_all(&hello.to_bytes()).await?;
            let mut reader = MessageReader::new();
            let first = read_server_message(&mut recv, &mut reader).await;
            Ok::<_, ClientError>((send, recv, reader, first))
        };
        let (send, recv, reader, first) = match tokio::time::timeout(opts.timeout, handshake).await
        {
            Err(_) => return Err(ClientError::Timeout),
            Ok(Err(e)) => return Err(closed_reason(&conn).unwrap_or(e)),
            Ok(Ok(x)) => x,
        };
        let (session_id, rights, config, resumed) = match first {
            Ok(ServerMessage::Welcome {
                session_id,
                rights,
                config,
                resumed,
                ..
            }) => (session_id, rights, config, resumed),
            Ok(ServerMessage::Error { code, message }) => {
                return Err(ClientError::Refused { code, message })
            }
            Ok(other) => {
                return Err(ClientError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )))
            }
            Err(e) => return Err(closed_reason(&conn).unwrap_or(e)),
        };

        let counters = Arc::new(Counters::default());
        let (ev_tx, events) = mpsc::channel(8);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let decoder = spawn_decoder(opts.decode, ev_tx.clone(), ctl_tx.clone(), counters.clone())?;
        tokio::spawn(control_writer(send, ctl_rx));
        tokio::spawn(control_reader(
            recv,
            reader,
            ev_tx.clone(),
            counters.clone(),
            conn.clone(),
        ));
        tokio::spawn(frame_acceptor(conn.clone(), decoder, counters.clone()));
        tokio::spawn(pinger(ctl_tx.clone()));
        Ok(Session {
            endpoint,
            conn,
            ctl_tx,
            events,
            counters,
            session_id,
            rights,
            config,
            resumed,
        })
    }

    pub fn session_id(&self) -> [u8; 16] {
        self.session_id
    }
    pub fn rights(&self) -> Rights {
        self.rights
    }
    /// Stream configuration from the Welcome (later changes arrive as [`Event::Config`]).
    pub fn config(&self) -> StreamConfig {
        self.config
    }
    pub fn resumed(&self) -> bool {
        self.resumed
    }
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }
    /// QUIC-level statistics (RTT, loss, bytes).
    pub fn connection_stats(&self) -> quinn::ConnectionStats {
        self.conn.stats()
    }

    /// Next event; `None` after the session ended and every event was taken.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Takes events until `frames` frames were decoded: a benchmark's warm-up (the join
    /// keyframe and what queued behind it); the reason, if the session ends first.
    pub async fn skip_frames(&mut self, frames: u64) -> Result<(), String> {
        let mut seen = 0;
        while seen < frames {
            match self.next_event().await {
                Some(Event::Frame(_)) => seen += 1,
                Some(Event::Closed(r)) => return Err(r),
                Some(_) => {}
                None => return Err("session ended".into()),
            }
        }
        Ok(())
    }

    /// Queues a control message (input, clipboard, resize, keyframe request).
    pub fn send(&self, msg: ClientMessage) {
        let _ = self.ctl_tx.send(msg);
    }

    pub fn send_input(&self, ev: InputEvent) {
        self.send(ClientMessage::Input(ev));
    }

    /// A clonable handle for sending from other threads (e.g. a window's event loop).
    pub fn sender(&self) -> mpsc::UnboundedSender<ClientMessage> {
        self.ctl_tx.clone()
    }

    /// Closes the connection and waits briefly for the close to be sent.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }

    /// Drops the network path abruptly (tests of resumption): no close frame is sent.
    pub fn abandon(self) {
        drop(self.conn);
        drop(self.endpoint);
    }
}

fn closed_reason(conn: &quinn::Connection) -> Option<ClientError> {
    conn.close_reason().as_ref().and_then(refused_from_close)
}

async fn read_server_message(
    recv: &mut quinn::RecvStream,
    reader: &mut MessageReader,
) -> Result<ServerMessage, ClientError> {
    loop {
        match reader.next_message::<ServerMessage>() {
            Ok(Some(m)) => return Ok(m),
            Ok(None) => {}
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
        }
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(c)) => reader.push(&c.bytes),
            Ok(None) => return Err(ClientError::Protocol("control stream ended".into())),
            Err(e) => return Err(ClientError::Protocol(format!("control stream: {e}"))),
        }
    }
}

async fn control_writer(
    mut send: quinn::SendStream,
    mut rx: mpsc::UnboundedReceiver<ClientMessage>,
) {
    let mut buf = Vec::new();
    while let Some(m) = rx.recv().await {
        buf.clear();
        m.encode(&mut buf);
        // Batch what is already queued into one write: input bursts stay cheap and ordered.
        while let Ok(m) = rx.try_recv() {
            m.encode(&mut buf);
        }
        if send.write_all(&buf).await.is_err() {
            return;
        }
    }
}

async fn control_reader(
    mut recv: quinn::RecvStream,
    mut reader: MessageReader,
    tx: mpsc::Sender<Event>,
    counters: Arc<Counters>,
    conn: quinn::Connection,
) {
    loop {
        let msg = match read_server_message(&mut recv, &mut reader).await {
            Ok(m) => m,
            Err(e) => {
                let reason = match closed_reason(&conn) {
                    Some(r) => r.to_string(),
                    None => match conn.close_reason() {
                        Some(r) => format!("connection closed: {r}"),
                        None => e.to_string(),
                    },
                };
                let _ = tx.send(Event::Closed(reason)).await;
                return;
            }
        };
        let ev = match msg {
            ServerMessage::Pong {
                client_time_us,
                server_time_us,
            } => {
                let now = unix_now_us();
                let rtt = now.saturating_sub(client_time_us);
                // Keep the offset from the fastest exchange: its error is at most rtt / 2.
                if rtt < counters.ping_rtt_us.load(Ordering::Relaxed)
                    || counters.ping_rtt_us.load(Ordering::Relaxed) == 0
                {
                    counters.ping_rtt_us.store(rtt.max(1), Ordering::Relaxed);
                    let mid = client_time_us + rtt / 2;
                    counters
                        .clock_offset_us
                        .store(server_time_us as i64 - mid as i64, Ordering::Relaxed);
                }
                continue;
            }
            ServerMessage::Config(c) => Event::Config(c),
            ServerMessage::Cursor {
                x,
                y,
                visible,
                image,
            } => Event::Cursor {
                x,
                y,
                visible,
                image,
            },
            ServerMessage::Clipboard(t) => Event::Clipboard(t),
            ServerMessage::Stats(s) => Event::ServerStats(s),
            ServerMessage::Error { code, message } => Event::Error { code, message },
            ServerMessage::Welcome { .. } => {
                warn!("server sent a second Welcome; ignored");
                continue;
            }
        };
        if tx.send(ev).await.is_err() {
            return;
        }
    }
}

async fn pinger(tx: mpsc::UnboundedSender<ClientMessage>) {
    let mut interval = tokio::time::interval(Duration::from_secs(1));
    loop {
        interval.tick().await;
        if tx
            .send(ClientMessage::Ping {
                client_time_us: unix_now_us(),
            })
            .is_err()
        {
            return;
        }
    }
}

/// One frame as received, before decoding.
struct Received {
    header: FrameHeader,
    data: Vec<u8>,
}

async fn frame_acceptor(
    conn: quinn::Connection,
    decoder: std::sync::mpsc::Sender<Received>,
    counters: Arc<Counters>,
) {
    while let Ok(mut stream) = conn.accept_uni().await {
        let decoder = decoder.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut hdr = [0u8; FRAME_HEADER_LEN];
            if stream.read_exact(&mut hdr).await.is_err() {
                return; // reset by the server (superseded) or connection gone
            }
            let header = match FrameHeader::decode(&hdr) {
                Ok(h) => h,
                Err(e) => {
                    warn!(error = %e, "bad frame header; stream ignored");
                    let _ = stream.stop(1u32.into());
                    return;
                }
            };
            let mut data = vec![0u8; header.payload_len as usize];
            if stream.read_exact(&mut data).await.is_err() {
                return;
            }
            counters.frames_received.fetch_add(1, Ordering::Relaxed);
            counters
                .bytes_received
                .fetch_add((FRAME_HEADER_LEN + data.len()) as u64, Ordering::Relaxed);
            let _ = decoder.send(Received { header, data });
        });
    }
}

/// How long a gap in the sequence is waited for before asking for a keyframe.
const GAP_WAIT: Duration = Duration::from_millis(300);

fn spawn_decoder(
    decode: bool,
    events: mpsc::Sender<Event>,
    ctl: mpsc::UnboundedSender<ClientMessage>,
    counters: Arc<Counters>,
) -> Result<std::sync::mpsc::Sender<Received>, ClientError> {
    let (tx, rx) = std::sync::mpsc::channel::<Received>();
    let mut dec = encoder::Decoder::new()?;
    std::thread::Builder::new()
        .name("genos-decode".into())
        .spawn(move || {
            let mut pending: BTreeMap<u64, Received> = BTreeMap::new();
            let mut next: Option<u64> = None;
            let mut gap_since: Option<Instant> = None;
            let mut last_key_request = Instant::now() - GAP_WAIT;
            let mut window = crate::stats::ReportWindow::new(Instant::now());
            loop {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(r) => {
                        if next.is_none_or(|n| r.header.sequence >= n) {
                            pending.insert(r.header.sequence, r);
                        } else {
                            counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        // Take everything already queued before deciding what to decode.
                        while let Ok(r) = rx.try_recv() {
                            if next.is_none_or(|n| r.header.sequence >= n) {
                                pending.insert(r.header.sequence, r);
                            }
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                // Newest wins: frames older than the newest keyframe are never needed.
                if let Some(&k) = pending
                    .iter()
                    .rev()
                    .find(|(_, r)| r.header.keyframe)
                    .map(|(s, _)| s)
                {
                    let newer = pending.split_off(&k);
                    counters
                        .frames_dropped
                        .fetch_add(pending.len() as u64, Ordering::Relaxed);
                    pending = newer;
                    if next.is_none_or(|n| n < k) {
                        next = Some(k);
                    }
                }
                while let Some(n) = next {
                    let Some(r) = pending.remove(&n) else { break };
                    next = Some(n + 1);
                    gap_since = None;
                    if !decode_one(&mut dec, decode, r, &events, &counters, &mut window) {
                        return;
                    }
                }
                let report = window.take_due(
                    Instant::now(),
                    counters.frames_decoded.load(Ordering::Relaxed),
                    counters.frames_dropped.load(Ordering::Relaxed),
                );
                if let Some(report) = report {
                    if ctl.send(ClientMessage::Stats(report)).is_err() {
                        return;
                    }
                }
                if pending.is_empty() {
                    gap_since = None;
                } else {
                    let since = *gap_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= GAP_WAIT && last_key_request.elapsed() >= GAP_WAIT {
                        debug!(?next, "frame missing; requesting a keyframe");
                        last_key_request = Instant::now();
                        if ctl.send(ClientMessage::KeyframeRequest).is_err() {
                            return;
                        }
                    }
                }
            }
        })
        .map_err(ClientError::Io)?;
    Ok(tx)
}

/// Decodes and delivers one frame (its timings go into `window`); false when the session's
/// consumer is gone.
fn decode_one(
    dec: &mut encoder::Decoder,
    decode: bool,
    r: Received,
    events: &mpsc::Sender<Event>,
    counters: &Counters,
    window: &mut crate::stats::ReportWindow,
) -> bool {
    let started = Instant::now();
    let (width, height, bgrx) = if decode {
        match dec.decode(&r.data) {
            Ok(Some(f)) => (f.width, f.height, f.bgrx),
            Ok(None) => return true,
            Err(e) => {
                warn!(sequence = r.header.sequence, error = %e, "decode failed");
                counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
                return true;
            }
        }
    } else {
        (
            u32::from(r.header.width),
            u32::from(r.header.height),
            Vec::new(),
        )
    };
    let decode_time = started.elapsed();
    let offset = counters.clock_offset_us.load(Ordering::Relaxed);
    let now_server = unix_now_us() as i64 + offset;
    let latency_us = (now_server - r.header.capture_time_us as i64).max(0) as u64;
    counters.frames_decoded.fetch_add(1, Ordering::Relaxed);
    window.push(decode_time, Duration::from_micros(latency_us));
    let frame = Frame {
        sequence: r.header.sequence,
        keyframe: r.header.keyframe,
        width,
        height,
        bgrx,
        encoded_bytes: r.data.len(),
        capture_time_us: r.header.capture_time_us,
        latency: Duration::from_micros(latency_us),
        decode_time,
    };
    match events.try_send(Event::Frame(frame)) {
        Ok(()) => true,
        // A consumer slower than the stream sees the newest frames, never a growing queue.
        Err(mpsc::error::TrySendError::Full(_)) => {
            counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}
