//! The session core on simulated time, as quinn-proto tests itself: a simulated viewer built
//! on proto's codecs, a network model (latency, retransmission delay for lost packets,
//! reordering, stalls) and a fake clock the test advances. No sockets, tasks or sleeps: every
//! run is the same run.

use std::collections::VecDeque;

use proto::stream::{Button, ClientMessage, FrameHeader, Message, MessageReader, ServerMessage};

use super::*;
use crate::stream::token::{EnvRef, Revocations, TokenKey};

const ENV: &str = "desk";
const ENV_UID: u64 = 7;
/// The simulated wall clock at the start of every test: 2027-01-15, whole seconds.
const START_UNIX_S: u64 = 1_800_000_000;
const FPS: u32 = 30;
const MS: Duration = Duration::from_millis(1);

fn env_ref() -> EnvRef {
    EnvRef::new(ENV, ENV_UID)
}

fn config() -> SessionConfig {
    SessionConfig {
        hello_timeout: Duration::from_secs(5),
        expiry_grace: Duration::from_secs(30),
        resume_grace: Duration::from_secs(15),
        max_frames_in_flight: 4,
        bitrate: BitrateLimits::default(),
    }
}

fn stream_config() -> StreamConfig {
    StreamConfig {
        width: 640,
        height: 480,
        fps_milli: FPS * 1000,
        codec: Codec::H264AnnexB,
        bitrate_bps: 2_500_000,
    }
}

/// xorshift64: the network's dice, the same every run.
struct Dice(u64);

impl Dice {
    fn chance(&mut self, p: f64) -> bool {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 1_000_000) as f64 / 1e6 < p
    }
    fn below(&mut self, n: u64) -> u64 {
        self.chance(0.0);
        self.0 % n.max(1)
    }
}

/// The network between the server and the viewer.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// One-way delay.
    latency: Duration,
    /// Chance that a packet is lost; a frame with a lost packet arrives one retransmission
    /// timeout (3 × latency) late, as QUIC repairs it.
    loss: f64,
    /// Extra random delay of each frame stream up to this much (streams overtake each other).
    jitter: Duration,
}

impl Link {
    fn clean() -> Self {
        Self {
            latency: 20 * MS,
            loss: 0.0,
            jitter: Duration::ZERO,
        }
    }
}

/// A frame as the viewer's decoder sees it.
#[derive(Debug, Clone, Copy)]
struct Received {
    header: FrameHeader,
    at: Instant,
}

/// The simulated viewer: speaks the protocol through proto's codecs only.
#[derive(Default)]
struct Viewer {
    control: MessageReader,
    messages: Vec<ServerMessage>,
    frames: Vec<Received>,
    /// The viewer stops reading frame streams until then (a frozen app, a tunnel).
    stalled_until: Option<Instant>,
}

impl Viewer {
    fn errors(&self) -> Vec<(ErrorCode, String)> {
        self.messages
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Error { code, message } => Some((*code, message.clone())),
                _ => None,
            })
            .collect()
    }

    fn welcome(&self) -> Option<&ServerMessage> {
        self.messages
            .iter()
            .find(|m| matches!(m, ServerMessage::Welcome { .. }))
    }

    /// Whether every delta frame received had its predecessor decoded (a keyframe starts a
    /// chain; a gap breaks it until the next keyframe).
    fn every_delta_had_its_predecessor(&self) -> bool {
        let mut last: Option<u64> = None;
        for f in &self.frames {
            let h = f.header;
            if !h.keyframe && last != Some(h.sequence - 1) {
                return false;
            }
            last = Some(h.sequence);
        }
        true
    }
}

/// The server's side of everything that is not the session: its tables for authorization
/// (tokens, revocations, parked sessions) and one environment (input sink, shared encoder).
struct Host {
    tokens: TokenKey,
    revocations: Revocations,
    parked: ParkedSessions<()>,
    next_session: u8,
    /// The admission caps are full: authenticated sessions are refused.
    full: bool,
    injected: Vec<InputEvent>,
    clipboard: Option<String>,
    /// The environment has no clipboard: set means refused with this reason.
    clipboard_unavailable: Option<String>,
    resizes: Vec<(u16, u16)>,
    /// What the session gave the audit chain, in order.
    records: Vec<ViewerRecord>,
    targets: Vec<u32>,
    keyframe_requested: bool,
    sequence: u64,
    config: StreamConfig,
}

impl Host {
    fn authorize(
        &mut self,
        hello: &HelloRequest,
        clock: &Clock,
        now: Instant,
    ) -> Result<Grant, Refusal> {
        let (claims, ()) = check_token(
            &self.tokens,
            &self.revocations,
            hello,
            |name| (name == ENV).then(|| (env_ref(), ())),
            clock.unix_s(now),
        )?;
        if self.full {
            return Err(Refusal::new(ErrorCode::TooManyConnections, "caps full"));
        }
        let session = self.parked.open(hello.resume, ENV, now, || {
            self.next_session += 1;
            Ok([self.next_session; 16])
        })?;
        Ok(Grant {
            claims,
            session,
            config: self.config,
        })
    }

    /// The shared encoder's next frame: a keyframe if one was asked for since the last.
    fn encode(&mut self, clock: &Clock, now: Instant) -> Arc<Frame> {
        self.sequence += 1;
        let keyframe = std::mem::take(&mut self.keyframe_requested);
        // Ten and fifty packets.
        let len = if keyframe { 60_000 } else { 12_000 };
        Arc::new(Frame {
            sequence: self.sequence,
            capture_time_us: clock.unix_us(now),
            keyframe,
            width: self.config.width,
            height: self.config.height,
            fps_milli: self.config.fps_milli,
            bitrate_bps: self.config.bitrate_bps,
            data: vec![0x5a; len],
        })
    }
}

/// One frame stream on the way to the viewer.
struct InTransit {
    arrives: Instant,
    frame: Arc<Frame>,
}

/// The session core and a simulated viewer, joined by a simulated network, on a fake clock.
struct Pair {
    now: Instant,
    clock: Clock,
    link: Link,
    dice: Dice,
    session: Session,
    host: Host,
    viewer: Viewer,
    /// Control-stream bytes in flight, each way, in order.
    to_server: VecDeque<(Instant, Vec<u8>)>,
    to_viewer: VecDeque<(Instant, Vec<u8>)>,
    frames: Vec<InTransit>,
    /// Acknowledgements of whole frame streams on their way back.
    acks: Vec<(Instant, u64)>,
    path: PathStats,
    /// The encoder publishes a frame every `1/FPS` while set.
    video: bool,
    next_frame_at: Instant,
    closed: Option<Refusal>,
}

impl Pair {
    fn new(cfg: SessionConfig, link: Link) -> Self {
        let now = Instant::now();
        let clock = Clock::new(now, START_UNIX_S * 1_000_000);
        Self {
            now,
            clock,
            link,
            dice: Dice(0x9e37_79b9_7f4a_7c15),
            session: Session::new(cfg, clock, now),
            host: Host {
                tokens: TokenKey::from_bytes(&[7; 32]),
                revocations: Revocations::default(),
                parked: ParkedSessions::new(cfg.resume_grace),
                next_session: 0,
                full: false,
                injected: Vec::new(),
                clipboard: None,
                clipboard_unavailable: None,
                resizes: Vec::new(),
                records: Vec::new(),
                targets: Vec::new(),
                keyframe_requested: false,
                sequence: 0,
                config: stream_config(),
            },
            viewer: Viewer::default(),
            to_server: VecDeque::new(),
            to_viewer: VecDeque::new(),
            frames: Vec::new(),
            acks: Vec::new(),
            path: PathStats {
                rtt: 2 * link.latency,
                cwnd_bytes: 1 << 20,
                sent_packets: 0,
                lost_packets: 0,
            },
            video: false,
            next_frame_at: now,
            closed: None,
        }
    }

    /// A token for the environment valid for `ttl` of simulated time.
    fn token(&self, rights: Rights, ttl: Duration) -> String {
        let expires = self.clock.unix_s(self.now) + ttl.as_secs();
        self.host
            .tokens
            .issue_expiring_at(&env_ref(), rights, expires)
            .unwrap()
    }

    fn hello(token: &str, resume: [u8; 16]) -> ClientMessage {
        ClientMessage::Hello {
            min_version: 1,
            max_version: 1,
            env_id: ENV.to_owned(),
            token: token.to_owned(),
            resume,
            viewport_width: 0,
            viewport_height: 0,
        }
    }

    /// The viewer writes `msg` on its control stream.
    fn send(&mut self, msg: &ClientMessage) {
        self.send_bytes(msg.to_bytes());
    }

    /// Control-stream bytes from the viewer, split the way the network likes.
    fn send_bytes(&mut self, bytes: Vec<u8>) {
        let at = self.now + self.link.latency;
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let n = (1 + self.dice.below(40) as usize).min(rest.len());
            self.to_server.push_back((at, rest[..n].to_vec()));
            rest = &rest[n..];
        }
    }

    /// Opens the control stream, sends Hello and runs until the Welcome (or the refusal)
    /// arrived.
    fn connect(&mut self, token: &str, resume: [u8; 16]) {
        self.session.handle(Event::ControlOpened, self.now);
        self.send(&Self::hello(token, resume));
        self.run_for(4 * self.link.latency);
    }

    /// The viewer's connection drops: the server parks what the session held.
    fn drop_connection(&mut self) {
        self.session.handle(Event::ConnectionLost, self.now);
        self.execute();
        self.video = false;
        let id = self.session.id().expect("an open session");
        let held = self.session.held();
        self.host.parked.park(id, ENV, (), held, self.now);
    }

    /// A new connection of the same viewer, later (same host, same network).
    fn reconnect(&mut self, token: &str, resume: [u8; 16]) {
        self.session = Session::new(config(), self.clock, self.now);
        self.viewer = Viewer::default();
        self.to_server.clear();
        self.to_viewer.clear();
        self.frames.clear();
        self.acks.clear();
        self.closed = None;
        self.connect(token, resume);
    }

    /// Executes the session's actions as the quinn driver does.
    fn execute(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Authorize(hello) => {
                    let grant = self.host.authorize(&hello, &self.clock, self.now);
                    self.session.handle(Event::Authorized(grant), self.now);
                }
                Action::Send(msg) => self
                    .to_viewer
                    .push_back((self.now + self.link.latency, msg.to_bytes())),
                Action::SendFrame(frame) => {
                    let packets = frame.data.len() as u64 / 1200 + 1;
                    let lost = (0..packets)
                        .filter(|_| self.dice.chance(self.link.loss))
                        .count();
                    self.path.sent_packets += packets;
                    self.path.lost_packets += lost as u64;
                    let mut delay = self.link.latency;
                    if lost > 0 {
                        delay += 3 * self.link.latency;
                    }
                    let jitter = self.link.jitter.as_micros() as u64;
                    delay += Duration::from_micros(self.dice.below(jitter + 1));
                    self.frames.push(InTransit {
                        arrives: self.now + delay,
                        frame,
                    });
                }
                Action::CancelFramesBefore(sequence) => {
                    // A reset stream ends at once for the sender.
                    let now = self.now;
                    self.frames.retain(|f| {
                        let keep = f.frame.sequence >= sequence;
                        if !keep {
                            self.acks.push((now, f.frame.sequence));
                        }
                        keep
                    });
                }
                Action::Inject(events) => self.host.injected.extend(events),
                Action::SetClipboard(text) => match self.host.clipboard_unavailable.clone() {
                    None => self.host.clipboard = Some(text),
                    Some(reason) => self.session.handle(
                        Event::Unavailable {
                            what: Capability::Clipboard,
                            reason,
                        },
                        self.now,
                    ),
                },
                Action::Record(r) => self.host.records.push(r),
                Action::Resize { width, height } => self.host.resizes.push((width, height)),
                Action::RequestKeyframe => self.host.keyframe_requested = true,
                Action::SetBitrateTarget(t) => self.host.targets.push(t),
                Action::Close(r) => {
                    // The error is the last thing on the control stream.
                    let err = ServerMessage::Error {
                        code: r.code,
                        message: r.message.clone(),
                    };
                    self.to_viewer
                        .push_back((self.now + self.link.latency, err.to_bytes()));
                    self.closed = Some(r);
                }
            }
        }
    }

    /// The earliest thing that happens next, if before `until`.
    fn next_event(&self, until: Instant) -> Instant {
        let stall = self
            .viewer
            .stalled_until
            .filter(|&t| t > self.now)
            .unwrap_or(self.now);
        [
            self.to_server.front().map(|(t, _)| *t),
            self.to_viewer.front().map(|(t, _)| *t),
            self.frames.iter().map(|f| f.arrives.max(stall)).min(),
            self.acks.iter().map(|(t, _)| *t).min(),
            self.session.poll_timeout(),
            (self.video && self.closed.is_none()).then_some(self.next_frame_at),
        ]
        .into_iter()
        .flatten()
        .filter(|&t| t <= until)
        .min()
        .unwrap_or(until)
        .max(self.now)
    }

    /// Advances simulated time by `d`, delivering everything due on the way.
    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            self.execute();
            self.now = self.next_event(until);
            let progressed = self.deliver();
            self.execute();
            if !progressed {
                assert!(
                    self.now >= until,
                    "the simulation is stuck at {:?}",
                    self.now
                );
                return;
            }
        }
    }

    /// Delivers everything due now; whether anything was.
    fn deliver(&mut self) -> bool {
        let now = self.now;
        let mut progressed = false;
        while self.to_server.front().is_some_and(|(t, _)| *t <= now) {
            let (_, bytes) = self.to_server.pop_front().unwrap();
            progressed = true;
            self.session.handle(Event::ControlData(&bytes), now);
        }
        while self.to_viewer.front().is_some_and(|(t, _)| *t <= now) {
            let (_, bytes) = self.to_viewer.pop_front().unwrap();
            progressed = true;
            self.viewer.control.push(&bytes);
            while let Some(m) = self.viewer.control.next_message::<ServerMessage>().unwrap() {
                self.viewer.messages.push(m);
            }
        }
        let stalled = self.viewer.stalled_until.is_some_and(|t| t > now);
        if !stalled {
            let mut due: Vec<InTransit> = Vec::new();
            let mut i = 0;
            while i < self.frames.len() {
                if self.frames[i].arrives <= now {
                    due.push(self.frames.swap_remove(i));
                } else {
                    i += 1;
                }
            }
            due.sort_by_key(|f| (f.arrives, f.frame.sequence));
            for f in due {
                progressed = true;
                let encoded = f.frame.header().encode();
                let header = FrameHeader::decode(&encoded).expect("a valid frame header");
                assert_eq!(header.payload_len as usize, f.frame.data.len());
                self.viewer.frames.push(Received { header, at: now });
                self.acks.push((now + self.link.latency, header.sequence));
            }
        }
        let mut i = 0;
        while i < self.acks.len() {
            if self.acks[i].0 <= now {
                let (_, sequence) = self.acks.swap_remove(i);
                progressed = true;
                self.session.handle(Event::FrameDone(sequence), now);
            } else {
                i += 1;
            }
        }
        if self.video && self.closed.is_none() && self.next_frame_at <= now {
            progressed = true;
            self.next_frame_at += Duration::from_micros(1_000_000 / u64::from(FPS));
            let frame = self.host.encode(&self.clock, now);
            self.session.handle(Event::Path(self.path), now);
            self.session.handle(Event::Frame(frame), now);
        }
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            progressed = true;
            self.session.handle(Event::Path(self.path), now);
            self.session.handle_timeout(now);
        }
        progressed
    }

    fn start_video(&mut self) {
        self.video = true;
        self.next_frame_at = self.now;
    }

    fn frames_received_since(&self, t: Instant) -> Vec<FrameHeader> {
        self.viewer
            .frames
            .iter()
            .filter(|f| f.at >= t)
            .map(|f| f.header)
            .collect()
    }
}

fn key(code: u16, pressed: bool) -> ClientMessage {
    ClientMessage::Input(InputEvent::Key { code, pressed })
}

/// A viewer with `rights` and a token for `ttl`, joined and watching 30 fps video.
fn watching(rights: Rights, ttl: Duration, cfg: SessionConfig, link: Link) -> Pair {
    let mut p = Pair::new(cfg, link);
    let token = p.token(rights, ttl);
    p.connect(&token, [0; 16]);
    assert!(p.session.is_open(), "not admitted: {:?}", p.viewer.errors());
    p.start_video();
    p
}

const HOUR: Duration = Duration::from_secs(3600);

#[test]
fn joining_viewer_is_welcomed_with_its_rights_and_gets_a_keyframe_first() {
    let mut p = watching(Rights::VIEW | Rights::INPUT, HOUR, config(), Link::clean());

    p.run_for(Duration::from_secs(1));

    let Some(ServerMessage::Welcome {
        rights,
        resumed,
        resume_grace_ms,
        config: cfg,
        ..
    }) = p.viewer.welcome()
    else {
        panic!("no Welcome: {:?}", p.viewer.messages)
    };
    assert_eq!(*rights, Rights::VIEW | Rights::INPUT);
    assert!(!resumed);
    assert_eq!(*resume_grace_ms, 15_000);
    assert_eq!(*cfg, stream_config());
    assert!(p.viewer.frames[0].header.keyframe);
    assert!(p.viewer.every_delta_had_its_predecessor());
    assert!(p.viewer.frames.len() >= 28, "{}", p.viewer.frames.len());
}

#[test]
fn frames_before_the_first_keyframe_are_not_sent() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    // The encoder ignores the join's keyframe request for three frames (its rate limit).
    p.host.keyframe_requested = false;
    for _ in 0..3 {
        let f = p.host.encode(&p.clock, p.now);
        p.session.handle(Event::Frame(f), p.now);
    }
    p.video = false;
    p.host.keyframe_requested = true;
    let f = p.host.encode(&p.clock, p.now);
    p.session.handle(Event::Frame(f), p.now);

    p.run_for(Duration::from_millis(200));

    let got: Vec<(u64, bool)> = p
        .viewer
        .frames
        .iter()
        .map(|f| (f.header.sequence, f.header.keyframe))
        .collect();
    assert_eq!(got, vec![(4, true)]);
    assert_eq!(p.session.stats().frames_dropped, 3);
    assert_eq!(
        p.session.stats().frames_congested,
        0,
        "waiting for a keyframe is no congestion signal"
    );
}

#[test]
fn view_only_viewer_input_is_refused_with_code() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    let before = p.viewer.frames.len();

    p.send(&key(30, true));
    p.send(&key(30, false));
    p.send(&ClientMessage::Clipboard("secret".into()));
    p.send(&ClientMessage::Resize {
        width: 800,
        height: 600,
    });
    p.run_for(Duration::from_millis(500));

    let errors = p.viewer.errors();
    assert_eq!(
        errors,
        vec![
            (
                ErrorCode::PermissionDenied,
                "input refused: token lacks the input right".to_owned()
            ),
            (
                ErrorCode::PermissionDenied,
                "clipboard refused: token lacks the clipboard right".to_owned()
            ),
            (
                ErrorCode::PermissionDenied,
                "resize refused: token lacks the input right".to_owned()
            ),
        ],
        "one input refusal however many events"
    );
    assert!(matches!(
        p.viewer.welcome(),
        Some(ServerMessage::Welcome { rights, .. }) if *rights == Rights::VIEW
    ));
    assert!(p.host.injected.is_empty());
    assert_eq!(p.host.clipboard, None);
    assert!(p.host.resizes.is_empty());
    assert_eq!(p.session.stats().input_refused, 2);
    assert!(p.session.is_open(), "refusals are not fatal");
    assert!(p.viewer.frames.len() > before + 10, "video goes on");
}

#[test]
fn a_session_records_its_join_each_rights_first_use_once_and_its_leave_with_counts() {
    let rights = Rights::VIEW | Rights::INPUT | Rights::CLIPBOARD;
    let mut p = Pair::new(config(), Link::clean());
    let issued = p.token(rights, HOUR);
    let token = p.host.tokens.decode(&issued).unwrap().id;
    p.connect(&issued, [0; 16]);

    for _ in 0..3 {
        p.send(&key(30, true));
        p.send(&key(30, false));
    }
    p.send(&ClientMessage::Clipboard("one".into()));
    p.send(&ClientMessage::Clipboard("two".into()));
    p.run_for(Duration::from_millis(300));
    p.session.handle(Event::ControlFinished, p.now);
    p.execute();

    assert_eq!(
        p.host.records,
        vec![
            ViewerRecord::Joined {
                token,
                rights,
                resumed: false
            },
            ViewerRecord::FirstUse {
                token,
                right: Rights::INPUT
            },
            ViewerRecord::FirstUse {
                token,
                right: Rights::CLIPBOARD
            },
            ViewerRecord::Left {
                token,
                input_events: 6,
                clipboard_sets: 2
            },
        ]
    );
}

#[test]
fn a_clipboard_the_environment_cannot_take_is_reported_to_the_viewer_once() {
    let rights = Rights::VIEW | Rights::CLIPBOARD;
    let mut p = watching(rights, HOUR, config(), Link::clean());
    p.host.clipboard_unavailable = Some("no guest agent".into());

    p.send(&ClientMessage::Clipboard("one".into()));
    p.send(&ClientMessage::Clipboard("two".into()));
    p.run_for(Duration::from_millis(300));

    assert_eq!(
        p.viewer.errors(),
        vec![(
            ErrorCode::Unavailable,
            "clipboard unavailable: no guest agent".to_owned()
        )]
    );
    assert_eq!(p.host.clipboard, None);
    assert!(p.session.is_open(), "not fatal");
}

#[test]
fn the_environments_clipboard_reaches_only_viewers_with_the_clipboard_right() {
    let mut with = watching(
        Rights::VIEW | Rights::CLIPBOARD,
        HOUR,
        config(),
        Link::clean(),
    );
    let mut without = watching(Rights::VIEW | Rights::INPUT, HOUR, config(), Link::clean());

    for p in [&mut with, &mut without] {
        p.session
            .handle(Event::EnvironmentClipboard("from the guest ✓"), p.now);
        p.run_for(Duration::from_millis(100));
    }

    let clipboards = |p: &Pair| -> Vec<String> {
        p.viewer
            .messages
            .iter()
            .filter_map(|m| match m {
                ServerMessage::Clipboard(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(clipboards(&with), vec!["from the guest ✓".to_owned()]);
    assert_eq!(with.session.stats().clipboard_received, 1);
    assert!(clipboards(&without).is_empty());
    assert!(without.viewer.errors().is_empty(), "nothing to refuse");
}

#[test]
fn an_expired_token_no_longer_receives_the_environments_clipboard() {
    let mut p = watching(
        Rights::VIEW | Rights::CLIPBOARD,
        Duration::from_secs(2),
        config(),
        Link::clean(),
    );
    p.run_for(Duration::from_secs(3));

    p.session.handle(Event::EnvironmentClipboard("late"), p.now);
    p.run_for(Duration::from_millis(100));

    assert!(!p
        .viewer
        .messages
        .iter()
        .any(|m| matches!(m, ServerMessage::Clipboard(_))));
}

#[test]
fn input_with_the_input_right_is_injected_in_order_and_clamped_to_the_frame() {
    let mut p = watching(Rights::VIEW | Rights::INPUT, HOUR, config(), Link::clean());

    p.send(&key(30, true));
    p.send(&ClientMessage::Input(InputEvent::PointerMove {
        x: 9_000,
        y: 10,
    }));
    p.send(&ClientMessage::Input(InputEvent::PointerButton {
        button: Button::Left,
        pressed: true,
    }));
    p.send(&key(30, false));
    p.run_for(Duration::from_millis(200));

    assert_eq!(
        p.host.injected,
        vec![
            InputEvent::Key {
                code: 30,
                pressed: true
            },
            InputEvent::PointerMove { x: 639, y: 10 },
            InputEvent::PointerButton {
                button: Button::Left,
                pressed: true
            },
            InputEvent::Key {
                code: 30,
                pressed: false
            },
        ]
    );
    assert_eq!(
        p.session.held().releases(),
        vec![InputEvent::PointerButton {
            button: Button::Left,
            pressed: false
        }]
    );
    assert!(p.viewer.errors().is_empty());
}

#[test]
fn held_keys_are_released_when_the_session_expires() {
    let grace = Duration::from_secs(2);
    let cfg = SessionConfig {
        expiry_grace: grace,
        ..config()
    };
    let mut p = watching(
        Rights::VIEW | Rights::INPUT,
        Duration::from_secs(3),
        cfg,
        Link::clean(),
    );
    let expires_at = p.clock.instant_at_unix(START_UNIX_S + 3, p.now);
    p.send(&key(30, true));
    p.send(&key(42, true));
    p.send(&key(42, false));

    p.run_for(expires_at - p.now + 100 * MS);
    let after_expiry = p.viewer.frames.len();
    p.send(&key(31, true));
    p.run_for(grace - 200 * MS);
    let before_end = p.viewer.frames.len();
    let still_open = p.session.is_open();
    p.run_for(Duration::from_millis(400));

    assert_eq!(
        p.host.injected,
        vec![
            InputEvent::Key {
                code: 30,
                pressed: true
            },
            InputEvent::Key {
                code: 42,
                pressed: true
            },
            InputEvent::Key {
                code: 42,
                pressed: false
            },
            InputEvent::Key {
                code: 30,
                pressed: false
            },
        ],
        "the key still held at expiry is released; input after it is not delivered"
    );
    let errors = p.viewer.errors();
    assert_eq!(errors[0].0, ErrorCode::SessionExpiring);
    assert!(
        errors[0].1.contains("input is no longer accepted"),
        "{}",
        errors[0].1
    );
    assert_eq!(
        errors[1],
        (
            ErrorCode::PermissionDenied,
            "input refused: token expired".to_owned()
        )
    );
    assert_eq!(errors.last().unwrap().0, ErrorCode::TokenExpired);
    assert!(
        still_open && before_end > after_expiry + 40,
        "video goes on during the grace"
    );
    assert!(p.session.is_ended());
    assert_eq!(
        p.closed.as_ref().map(|r| r.code),
        Some(ErrorCode::TokenExpired)
    );
    assert!(p.session.held().is_empty());
}

#[test]
fn viewer_that_stalls_gets_a_keyframe_when_it_catches_up() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    p.run_for(Duration::from_secs(1));
    let stall_end = p.now + Duration::from_secs(2);
    p.viewer.stalled_until = Some(stall_end);

    p.run_for(Duration::from_secs(2));
    p.run_for(Duration::from_millis(100));
    let dropped_until_caught_up = p.session.stats().frames_dropped;
    p.run_for(Duration::from_millis(1900));

    let after = p.frames_received_since(stall_end);
    assert!(dropped_until_caught_up >= 5, "{dropped_until_caught_up}");
    assert!(
        after[0].keyframe,
        "first frame after the stall: {:?}",
        after[0]
    );
    assert!(
        p.viewer.every_delta_had_its_predecessor(),
        "the viewer never got a delta it could not decode"
    );
    let last_second = p.frames_received_since(p.now - Duration::from_secs(1));
    assert!(
        last_second.len() >= 29,
        "back to full rate: {}",
        last_second.len()
    );
    assert_eq!(
        p.session.stats().frames_dropped,
        dropped_until_caught_up,
        "no drops once caught up"
    );
}

#[test]
fn keyframe_cancels_older_frames_still_in_flight() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    p.run_for(Duration::from_millis(500));
    p.video = false;
    p.run_for(Duration::from_millis(100));
    p.viewer.stalled_until = Some(p.now + Duration::from_secs(1));
    for _ in 0..3 {
        let f = p.host.encode(&p.clock, p.now);
        p.session.handle(Event::Frame(f), p.now);
    }
    p.execute();
    let in_flight = p.frames.len();

    p.send(&ClientMessage::KeyframeRequest);
    p.run_for(Duration::from_millis(100));
    let key = p.host.encode(&p.clock, p.now);
    let key_seq = key.sequence;
    p.session.handle(Event::Frame(key), p.now);
    p.run_for(Duration::from_secs(2));

    assert_eq!(in_flight, 3);
    let after: Vec<u64> = p
        .frames_received_since(p.now - Duration::from_millis(1500))
        .iter()
        .map(|h| h.sequence)
        .collect();
    assert_eq!(
        after,
        vec![key_seq],
        "older frames were reset, not delivered"
    );
    assert!(p.session.open.as_ref().unwrap().in_flight.is_empty());
}

#[test]
fn reordered_frame_streams_keep_the_in_flight_count_exact() {
    let link = Link {
        jitter: 60 * MS,
        ..Link::clean()
    };
    let mut p = watching(Rights::VIEW, HOUR, config(), link);

    p.run_for(Duration::from_secs(3));
    p.video = false;
    p.run_for(Duration::from_millis(500));

    let mut seqs: Vec<u64> = p.viewer.frames.iter().map(|f| f.header.sequence).collect();
    let in_order = seqs.windows(2).all(|w| w[0] < w[1]);
    seqs.sort_unstable();
    assert!(!in_order, "the link did reorder");
    assert_eq!(
        seqs,
        (1..=p.host.sequence).collect::<Vec<_>>(),
        "every frame arrived"
    );
    assert_eq!(p.session.stats().frames_dropped, 0);
    assert!(p.session.open.as_ref().unwrap().in_flight.is_empty());
}

#[test]
fn abr_lowers_bitrate_after_sustained_loss() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    p.run_for(Duration::from_secs(2));
    let clean = *p.host.targets.last().unwrap();
    let ticks_clean = p.host.targets.len();

    p.link.loss = 0.2;
    p.run_for(Duration::from_secs(2));

    let lossy = *p.host.targets.last().unwrap();
    assert_eq!(
        clean,
        BitrateLimits::default().max_bps,
        "a clean path grows to the top"
    );
    assert!(
        (9..=11).contains(&ticks_clean),
        "one target per 200 ms tick: {ticks_clean}"
    );
    assert!(lossy < clean / 2, "{lossy} after loss, {clean} before");
    let stats = p
        .viewer
        .messages
        .iter()
        .rev()
        .find_map(|m| match m {
            ServerMessage::Stats(s) => Some(*s),
            _ => None,
        })
        .expect("server stats every second");
    assert!(stats.loss_permille >= 100, "{stats:?}");
    assert_eq!(stats.rtt_us, 40_000);
}

#[test]
fn abr_lowers_bitrate_while_frames_keep_being_dropped() {
    // Little slack: a stalled viewer fills its in-flight allowance within every ABR tick.
    let cfg = SessionConfig {
        max_frames_in_flight: 1,
        ..config()
    };
    let mut p = watching(Rights::VIEW, HOUR, cfg, Link::clean());
    p.run_for(Duration::from_secs(1));
    let clean = *p.host.targets.last().unwrap();
    p.viewer.stalled_until = Some(p.now + Duration::from_secs(2));

    p.run_for(Duration::from_secs(2));

    let stalled = *p.host.targets.last().unwrap();
    assert_eq!(clean, BitrateLimits::default().max_bps);
    assert!(p.session.stats().frames_congested >= 10);
    assert!(
        stalled < clean * 3 / 4,
        "{stalled} while stalled, {clean} before"
    );
}

#[test]
fn random_loss_below_the_backoff_does_not_lower_the_bitrate() {
    let link = Link {
        loss: 0.01,
        ..Link::clean()
    };
    let mut p = watching(Rights::VIEW, HOUR, config(), link);

    p.run_for(Duration::from_secs(3));

    assert_eq!(
        *p.host.targets.last().unwrap(),
        BitrateLimits::default().max_bps
    );
}

#[test]
fn resume_within_window_keeps_rights() {
    let mut p = watching(Rights::VIEW | Rights::INPUT, HOUR, config(), Link::clean());
    p.send(&key(42, true));
    p.run_for(Duration::from_millis(300));
    let id = p.session.id().unwrap();
    p.drop_connection();

    p.run_for(Duration::from_secs(10));
    let token = p.token(Rights::VIEW | Rights::INPUT, HOUR);
    p.reconnect(&token, id);
    p.start_video();
    p.send(&key(42, false));
    p.run_for(Duration::from_millis(500));

    let Some(ServerMessage::Welcome {
        session_id,
        rights,
        resumed,
        ..
    }) = p.viewer.welcome()
    else {
        panic!("no Welcome: {:?}", p.viewer.messages)
    };
    assert!(*resumed);
    assert_eq!(*session_id, id);
    assert_eq!(*rights, Rights::VIEW | Rights::INPUT);
    assert!(
        p.viewer.frames[0].header.keyframe,
        "a resumed session starts with a keyframe"
    );
    assert_eq!(
        p.host.injected,
        vec![
            InputEvent::Key {
                code: 42,
                pressed: true
            },
            InputEvent::Key {
                code: 42,
                pressed: false
            }
        ]
    );
    assert!(p.session.held().is_empty());
    assert!(p.host.parked.is_empty());
}

#[test]
fn held_keys_are_released_when_the_resume_window_closes() {
    let mut p = watching(Rights::VIEW | Rights::INPUT, HOUR, config(), Link::clean());
    p.send(&key(42, true));
    p.run_for(Duration::from_millis(300));
    let id = p.session.id().unwrap();
    p.drop_connection();
    let window_closes = p.host.parked.poll_timeout().unwrap();

    let early = p.host.parked.expire(window_closes - MS);
    let released = p.host.parked.expire(window_closes);
    let token = p.token(Rights::VIEW, HOUR);
    p.now = window_closes;
    p.reconnect(&token, id);

    assert!(early.is_empty());
    assert_eq!(released.len(), 1);
    assert_eq!(
        released[0].releases,
        vec![InputEvent::Key {
            code: 42,
            pressed: false
        }]
    );
    assert!(
        matches!(p.viewer.welcome(), Some(ServerMessage::Welcome { resumed: false, session_id, .. }) if *session_id != id),
        "too late: a fresh session"
    );
}

#[test]
fn resuming_a_session_of_another_environment_is_refused() {
    let mut parked = ParkedSessions::new(Duration::from_secs(15));
    let now = Instant::now();
    parked.park([9; 16], "other", (), HeldInput::default(), now);

    let refused = parked.resume([9; 16], ENV, now);
    let kept = parked.resume([9; 16], "other", now);

    assert_eq!(refused.unwrap_err().code, ErrorCode::ResumeRejected);
    assert_eq!(
        kept,
        Ok(Some(HeldInput::default())),
        "the session stays parked for its owner"
    );
}

#[test]
fn revocation_mid_session_closes_with_token_revoked() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    p.run_for(Duration::from_millis(300));
    let claims = p.session.claims().unwrap().clone();
    let mut unrelated = Revocations::default();
    unrelated.revoke_environment(ENV_UID + 1);
    p.session.handle(Event::Revocations(&unrelated), p.now);
    let open_after_unrelated = p.session.is_open();

    p.host
        .revocations
        .revoke_token(claims.id, claims.expires_unix);
    let list = p.host.revocations.clone();
    p.session.handle(Event::Revocations(&list), p.now);
    p.run_for(Duration::from_millis(100));

    assert!(open_after_unrelated);
    assert_eq!(
        p.closed.as_ref().map(|r| r.code),
        Some(ErrorCode::TokenRevoked)
    );
    assert_eq!(p.viewer.errors().last().unwrap().0, ErrorCode::TokenRevoked);
}

#[test]
fn environment_stopping_ends_the_session_with_no_such_environment() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());

    p.session.handle(Event::EnvironmentClosed, p.now);
    p.run_for(Duration::from_millis(100));

    let r = p.closed.as_ref().unwrap();
    assert_eq!(r.code, ErrorCode::NoSuchEnvironment);
    assert!(
        r.message.contains("\"desk\" stopped streaming"),
        "{}",
        r.message
    );
}

#[test]
fn silent_connection_is_closed_at_the_hello_deadline() {
    let mut p = Pair::new(config(), Link::clean());
    p.session.handle(Event::ControlOpened, p.now);

    p.run_for(Duration::from_secs(5) - MS);
    let open_before = p.closed.is_none();
    p.run_for(2 * MS);

    assert!(open_before);
    let r = p.closed.as_ref().unwrap();
    assert_eq!(
        (r.code, r.message.as_str()),
        (ErrorCode::ProtocolViolation, "no Hello received in time")
    );
    assert!(p.session.hello_timed_out());
}

#[test]
fn hello_split_into_many_small_chunks_is_reassembled() {
    let mut p = Pair::new(config(), Link::clean());
    let token = p.token(Rights::VIEW, HOUR);
    p.session.handle(Event::ControlOpened, p.now);
    let bytes = Pair::hello(&token, [0; 16]).to_bytes();
    for b in bytes {
        p.session.handle(Event::ControlData(&[b]), p.now);
    }

    p.execute();

    assert!(p.session.is_open());
}

#[test]
fn hello_longer_than_a_hello_is_refused_at_its_length_prefix() {
    let mut p = Pair::new(config(), Link::clean());
    p.session.handle(Event::ControlOpened, p.now);
    let len = (MAX_HELLO_LEN as u32 + 1).to_le_bytes();

    p.session.handle(Event::ControlData(&len), p.now);
    p.execute();

    let r = p.closed.as_ref().unwrap();
    assert_eq!(r.code, ErrorCode::ProtocolViolation);
    assert!(r.message.contains("exceeds limit"), "{}", r.message);
}

#[test]
fn first_message_other_than_hello_or_a_second_hello_is_a_protocol_violation() {
    let mut first = Pair::new(config(), Link::clean());
    first.session.handle(Event::ControlOpened, first.now);
    first.send(&ClientMessage::KeyframeRequest);
    first.run_for(Duration::from_millis(100));
    let mut twice = watching(Rights::VIEW, HOUR, config(), Link::clean());
    let token = twice.token(Rights::VIEW, HOUR);
    twice.send(&Pair::hello(&token, [0; 16]));
    twice.run_for(Duration::from_millis(100));

    assert_eq!(
        first.closed.as_ref().map(|r| r.message.as_str()),
        Some("first message must be Hello")
    );
    assert_eq!(
        twice.closed.as_ref().map(|r| (r.code, r.message.as_str())),
        Some((ErrorCode::ProtocolViolation, "Hello sent twice"))
    );
}

#[test]
fn unsupported_version_and_bad_tokens_are_refused_with_their_codes() {
    let refusal = |hello: ClientMessage, tweak: &dyn Fn(&mut Host)| {
        let mut p = Pair::new(config(), Link::clean());
        tweak(&mut p.host);
        p.session.handle(Event::ControlOpened, p.now);
        p.send(&hello);
        p.run_for(Duration::from_millis(100));
        assert!(p.viewer.welcome().is_none());
        p.closed.clone().expect("refused").code
    };
    let p = Pair::new(config(), Link::clean());
    let good = p.token(Rights::VIEW, HOUR);
    let input_only = p.token(Rights::INPUT, HOUR);
    let expired = p
        .host
        .tokens
        .issue_expiring_at(&env_ref(), Rights::VIEW, START_UNIX_S - 10)
        .unwrap();
    let forged = TokenKey::from_bytes(&[8; 32])
        .issue(&env_ref(), Rights::all(), HOUR)
        .unwrap();
    let future = ClientMessage::Hello {
        min_version: 7,
        max_version: 9,
        env_id: ENV.into(),
        token: good.clone(),
        resume: [0; 16],
        viewport_width: 0,
        viewport_height: 0,
    };
    let ClientMessage::Hello { token, .. } = Pair::hello(&good, [0; 16]) else {
        unreachable!()
    };
    let unknown_env = ClientMessage::Hello {
        min_version: 1,
        max_version: 1,
        env_id: "nope".into(),
        token,
        resume: [0; 16],
        viewport_width: 0,
        viewport_height: 0,
    };
    let none = &|_: &mut Host| {};

    assert_eq!(refusal(future, none), ErrorCode::UnsupportedVersion);
    assert_eq!(
        refusal(Pair::hello(&expired, [0; 16]), none),
        ErrorCode::TokenExpired
    );
    assert_eq!(
        refusal(Pair::hello(&forged, [0; 16]), none),
        ErrorCode::TokenForged
    );
    assert_eq!(
        refusal(Pair::hello("x.y", [0; 16]), none),
        ErrorCode::BadToken
    );
    assert_eq!(refusal(unknown_env, none), ErrorCode::NoSuchEnvironment);
    assert_eq!(
        refusal(Pair::hello(&input_only, [0; 16]), none),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        refusal(Pair::hello(&good, [0; 16]), &|h| h.full = true),
        ErrorCode::TooManyConnections
    );
}

#[test]
fn ping_is_answered_with_the_server_clock() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    let sent_at = p.now;

    p.send(&ClientMessage::Ping { client_time_us: 77 });
    p.run_for(Duration::from_millis(100));

    let pong = p.viewer.messages.iter().find_map(|m| match m {
        ServerMessage::Pong {
            client_time_us,
            server_time_us,
        } => Some((*client_time_us, *server_time_us)),
        _ => None,
    });
    // The ping took one link latency to arrive.
    let expected = p.clock.unix_us(sent_at + p.link.latency);
    assert_eq!(pong, Some((77, expected)));
}

#[test]
fn a_resolution_change_is_announced_once_with_the_new_size() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    p.run_for(Duration::from_millis(300));

    p.host.config.width = 1280;
    p.host.config.height = 720;
    p.host.keyframe_requested = true;
    p.run_for(Duration::from_millis(300));

    let configs: Vec<StreamConfig> = p
        .viewer
        .messages
        .iter()
        .filter_map(|m| match m {
            ServerMessage::Config(c) => Some(*c),
            _ => None,
        })
        .collect();
    assert_eq!(configs.len(), 1);
    assert_eq!((configs[0].width, configs[0].height), (1280, 720));
    let first_big = p
        .viewer
        .frames
        .iter()
        .find(|f| f.header.width == 1280)
        .unwrap();
    assert!(first_big.header.keyframe);
}

// Parts of the core on their own.

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
        ..stream_config()
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
fn expiry_instants_are_bounded_for_tokens_that_never_expire() {
    let now = Instant::now();
    let clock = Clock::new(now, START_UNIX_S * 1_000_000);

    let never = clock.instant_at_unix(u64::MAX, now);
    let past = clock.instant_at_unix(1, now);

    assert_eq!(never, now + FAR_FUTURE);
    assert_eq!(past, now);
}

#[test]
fn clock_maps_instants_to_unix_time() {
    let now = Instant::now();
    let c = Clock::new(now, START_UNIX_S * 1_000_000);
    assert_eq!(c.unix_us(now + 5 * MS), START_UNIX_S * 1_000_000 + 5_000);
    assert_eq!(c.unix_us(now - 5 * MS), START_UNIX_S * 1_000_000 - 5_000);
    assert_eq!(
        c.unix_s(now + Duration::from_millis(1500)),
        START_UNIX_S + 1
    );
}

#[test]
fn the_viewers_newest_reported_stats_and_the_measured_path_are_kept() {
    let mut p = watching(Rights::VIEW, HOUR, config(), Link::clean());
    let report = |decoded| ClientStats {
        frames_decoded: decoded,
        frames_dropped: 1,
        decode_us_p50: 4_000,
        latency_us_p50: 12_000,
    };
    assert_eq!(p.session.client_stats(), None);

    p.send(&ClientMessage::Stats(report(10)));
    p.send(&ClientMessage::Stats(report(70)));
    p.run_for(Duration::from_millis(500));

    assert_eq!(p.session.client_stats(), Some(report(70)));
    assert_eq!(p.session.path().rtt, p.path.rtt);
    assert!(p.session.path().sent_packets > 0);
}
