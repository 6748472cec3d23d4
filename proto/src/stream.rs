//! Client↔hostd streaming protocol: framing, messages and their codecs (sans-IO).
//!
//! A session is one QUIC connection (ALPN [`ALPN`]). The client opens one bidirectional
//! *control stream* and writes length-prefixed [`ClientMessage`]s on it; the server answers
//! on the same stream with [`ServerMessage`]s. Every video frame travels on its own
//! server-initiated unidirectional stream: a [`FrameHeader`] followed by the H.264 Annex-B
//! access unit. All integers are little-endian. `docs/protocol.md` is the normative text;
//! this module is its reference implementation: pure functions from bytes to typed values.

use thiserror::Error;

use crate::wire::{put_str16, put_str32, Reader};

/// Protocol version spoken by this implementation.
pub const VERSION: u16 = 1;
/// Oldest version this implementation still accepts.
pub const MIN_VERSION: u16 = 1;
/// QUIC/TLS application protocol name.
pub const ALPN: &[u8] = b"genos-stream/1";
/// Largest control message (type byte + body) either side accepts.
pub const MAX_MESSAGE_LEN: usize = 1 << 20;
/// Largest Hello (type byte + body): what a server buffers before the client has
/// authenticated. Environment ids and tokens are short; 4 KiB leaves room for both.
pub const MAX_HELLO_LEN: usize = 4096;
/// Largest clipboard text, in bytes of UTF-8.
pub const MAX_CLIPBOARD_LEN: usize = 256 * 1024;
/// Largest cursor image edge, in pixels.
pub const MAX_CURSOR_EDGE: u16 = 256;
/// Largest encoded video frame a client must accept.
pub const MAX_FRAME_PAYLOAD: u32 = 16 << 20;
/// First byte of every server-initiated unidirectional stream carrying a video frame.
pub const UNI_STREAM_VIDEO: u8 = 0x01;
/// Encoded length of a [`FrameHeader`] including the leading stream-type byte.
pub const FRAME_HEADER_LEN: usize = 27;

/// Why a byte sequence is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("{0} trailing bytes after message")]
    TrailingBytes(usize),
    #[error("unknown message type {0:#04x}")]
    UnknownType(u8),
    #[error("message length {len} exceeds limit {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("empty message")]
    Empty,
    #[error("string is not valid UTF-8")]
    BadUtf8,
    #[error("invalid value {value} for field {field}")]
    BadValue { field: &'static str, value: u64 },
}

/// Capability rights carried by a token and granted to a session (bit set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rights(u8);

impl Rights {
    pub const VIEW: Rights = Rights(1);
    pub const INPUT: Rights = Rights(2);
    pub const CLIPBOARD: Rights = Rights(4);
    pub const ADMIN: Rights = Rights(8);
    const ALL_BITS: u8 = 0x0f;

    pub const fn empty() -> Self {
        Rights(0)
    }
    pub const fn all() -> Self {
        Rights(Self::ALL_BITS)
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Rejects unknown bits so a newer peer's rights are never silently narrowed.
    pub fn from_bits(bits: u8) -> Option<Self> {
        (bits & !Self::ALL_BITS == 0).then_some(Rights(bits))
    }
    pub const fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: Rights) -> Self {
        Rights(self.0 | other.0)
    }
}

impl std::ops::BitOr for Rights {
    type Output = Rights;
    fn bitor(self, rhs: Rights) -> Rights {
        self.union(rhs)
    }
}

impl std::fmt::Display for Rights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = [
            (Rights::VIEW, "view"),
            (Rights::INPUT, "input"),
            (Rights::CLIPBOARD, "clipboard"),
            (Rights::ADMIN, "admin"),
        ];
        let mut first = true;
        for (r, name) in names {
            if self.contains(r) {
                if !first {
                    f.write_str(",")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        Ok(())
    }
}

/// A rights list names a right that does not exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown right {0:?} (rights are view, input, clipboard, admin)")]
pub struct UnknownRight(pub String);

impl std::str::FromStr for Rights {
    type Err = UnknownRight;
    /// Parses a comma-separated list such as `view,input`.
    fn from_str(s: &str) -> Result<Self, UnknownRight> {
        let mut rights = Rights::empty();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            rights = rights
                | match part {
                    "view" => Rights::VIEW,
                    "input" => Rights::INPUT,
                    "clipboard" => Rights::CLIPBOARD,
                    "admin" => Rights::ADMIN,
                    other => return Err(UnknownRight(other.into())),
                };
        }
        Ok(rights)
    }
}

/// Error codes sent in [`ServerMessage::Error`] and used as QUIC application close codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// Normal close, no error.
    None = 0,
    UnsupportedVersion = 1,
    ProtocolViolation = 2,
    BadToken = 3,
    TokenForged = 4,
    TokenExpired = 5,
    WrongEnvironment = 6,
    NoSuchEnvironment = 7,
    PermissionDenied = 8,
    TooManyConnections = 9,
    ResumeRejected = 10,
    Internal = 11,
    ServerShutdown = 12,
    /// The token was revoked by the host (an operator, or the environment was destroyed).
    TokenRevoked = 13,
    /// Non-fatal warning: the token expired during the session; input is no longer accepted
    /// and the video ends after a grace period (then the close carries `TokenExpired`).
    SessionExpiring = 14,
    /// Non-fatal: the environment cannot do what the viewer asked (a clipboard or resize in
    /// an environment without the means for it); the message says what and why.
    Unavailable = 15,
    /// A code this implementation does not know (from a newer peer).
    Unknown = 0xffff,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            0 => None,
            1 => UnsupportedVersion,
            2 => ProtocolViolation,
            3 => BadToken,
            4 => TokenForged,
            5 => TokenExpired,
            6 => WrongEnvironment,
            7 => NoSuchEnvironment,
            8 => PermissionDenied,
            9 => TooManyConnections,
            10 => ResumeRejected,
            11 => Internal,
            12 => ServerShutdown,
            13 => TokenRevoked,
            14 => SessionExpiring,
            15 => Unavailable,
            _ => Unknown,
        }
    }
    /// Whether the server closes the connection after sending this error.
    pub fn is_fatal(self) -> bool {
        !matches!(
            self,
            ErrorCode::None
                | ErrorCode::PermissionDenied
                | ErrorCode::SessionExpiring
                | ErrorCode::Unavailable
        )
    }
}

/// Video codec of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// H.264 access units in Annex-B byte-stream format (start codes, SPS/PPS before IDR).
    H264AnnexB = 1,
}

impl Codec {
    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        match v {
            1 => Ok(Codec::H264AnnexB),
            _ => Err(DecodeError::BadValue {
                field: "codec",
                value: v.into(),
            }),
        }
    }
}

/// Current stream parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StreamConfig {
    pub width: u16,
    pub height: u16,
    /// Nominal frame rate, in thousandths of a frame per second.
    pub fps_milli: u32,
    pub codec: Codec,
    /// Current target bitrate of the encoder.
    pub bitrate_bps: u32,
}

/// Phase of a touch contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TouchPhase {
    Start = 0,
    Move = 1,
    End = 2,
    Cancel = 3,
}

/// Mouse button, numbered as on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Button {
    Left = 1,
    Middle = 2,
    Right = 3,
    Back = 4,
    Forward = 5,
}

/// One input event; coordinates are stream pixels (0..width, 0..height of the current config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputEvent {
    /// `code` is a Linux evdev key code (`KEY_*` from `input-event-codes.h`).
    Key {
        code: u16,
        pressed: bool,
    },
    PointerMove {
        x: u16,
        y: u16,
    },
    PointerButton {
        button: Button,
        pressed: bool,
    },
    /// Scroll in 1/120 of a notch; positive `dy` scrolls down, positive `dx` right.
    Wheel {
        dx: i16,
        dy: i16,
    },
    Touch {
        id: u8,
        phase: TouchPhase,
        x: u16,
        y: u16,
    },
}

/// Messages the client sends on the control stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    /// First message of every session.
    Hello {
        min_version: u16,
        max_version: u16,
        env_id: String,
        token: String,
        /// Session to resume after a reconnect; all zeros for a new session.
        resume: [u8; 16],
        /// Client's drawable size, a hint for the initial resolution (0 = no preference).
        viewport_width: u16,
        viewport_height: u16,
    },
    KeyframeRequest,
    Input(InputEvent),
    Clipboard(String),
    Resize {
        width: u16,
        height: u16,
    },
    Stats(ClientStats),
    Ping {
        client_time_us: u64,
    },
}

/// Client-side view of the session, reported to the server now and then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    pub frames_decoded: u64,
    pub frames_dropped: u64,
    pub decode_us_p50: u32,
    pub latency_us_p50: u32,
}

/// Cursor shape; `bgra` is `width * height * 4` bytes, premultiplied alpha not assumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorImage {
    pub hot_x: u16,
    pub hot_y: u16,
    pub width: u16,
    pub height: u16,
    pub bgra: Vec<u8>,
}

/// Server-side view of the session's transport and encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerStats {
    pub bitrate_bps: u32,
    pub rtt_us: u32,
    /// Lost packets per thousand sent, over the last reporting interval.
    pub loss_permille: u16,
    pub cwnd_bytes: u32,
    pub frames_sent: u64,
    pub frames_dropped: u64,
}

/// Messages the server sends on the control stream.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    /// Accepts the Hello; nothing else is sent before it.
    Welcome {
        version: u16,
        session_id: [u8; 16],
        rights: Rights,
        resumed: bool,
        /// How long the server keeps the session after the connection drops.
        resume_grace_ms: u32,
        config: StreamConfig,
    },
    Config(StreamConfig),
    Cursor {
        x: u16,
        y: u16,
        visible: bool,
        image: Option<CursorImage>,
    },
    Clipboard(String),
    Stats(ServerStats),
    Error {
        code: ErrorCode,
        message: String,
    },
    Pong {
        client_time_us: u64,
        server_time_us: u64,
    },
}

mod ty {
    pub const HELLO: u8 = 0x01;
    pub const KEYFRAME_REQUEST: u8 = 0x02;
    pub const CLIPBOARD_C: u8 = 0x08;
    pub const RESIZE: u8 = 0x09;
    pub const CLIENT_STATS: u8 = 0x0a;
    pub const PING: u8 = 0x0b;
    pub const KEY: u8 = 0x10;
    pub const POINTER_MOVE: u8 = 0x11;
    pub const POINTER_BUTTON: u8 = 0x12;
    pub const WHEEL: u8 = 0x13;
    pub const TOUCH: u8 = 0x14;
    pub const WELCOME: u8 = 0x81;
    pub const CONFIG: u8 = 0x82;
    pub const CURSOR: u8 = 0x83;
    pub const CLIPBOARD_S: u8 = 0x84;
    pub const SERVER_STATS: u8 = 0x85;
    pub const ERROR: u8 = 0x86;
    pub const PONG: u8 = 0x87;
}

fn put_config(out: &mut Vec<u8>, c: &StreamConfig) {
    out.extend_from_slice(&c.width.to_le_bytes());
    out.extend_from_slice(&c.height.to_le_bytes());
    out.extend_from_slice(&c.fps_milli.to_le_bytes());
    out.push(c.codec as u8);
    out.extend_from_slice(&c.bitrate_bps.to_le_bytes());
}

fn read_config(r: &mut Reader<'_>) -> Result<StreamConfig, DecodeError> {
    Ok(StreamConfig {
        width: r.u16()?,
        height: r.u16()?,
        fps_milli: r.u32()?,
        codec: Codec::from_u8(r.u8()?)?,
        bitrate_bps: r.u32()?,
    })
}

/// A message type that can be framed on the control stream.
pub trait Message: Sized {
    /// Appends the type byte and body (no length prefix).
    fn encode_body(&self, out: &mut Vec<u8>);
    /// Parses a type byte followed by a body (no length prefix); rejects trailing bytes.
    fn decode_body(msg: &[u8]) -> Result<Self, DecodeError>;

    /// Appends the framed message (`u32` length, type, body) to `out`.
    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        self.encode_body(out);
        let len = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    }

    /// The framed message as a new buffer.
    fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }
}

impl Message for ClientMessage {
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            ClientMessage::Hello {
                min_version,
                max_version,
                env_id,
                token,
                resume,
                viewport_width,
                viewport_height,
            } => {
                out.push(ty::HELLO);
                out.extend_from_slice(&min_version.to_le_bytes());
                out.extend_from_slice(&max_version.to_le_bytes());
                put_str16(out, env_id);
                put_str16(out, token);
                out.extend_from_slice(resume);
                out.extend_from_slice(&viewport_width.to_le_bytes());
                out.extend_from_slice(&viewport_height.to_le_bytes());
            }
            ClientMessage::KeyframeRequest => out.push(ty::KEYFRAME_REQUEST),
            ClientMessage::Input(ev) => match *ev {
                InputEvent::Key { code, pressed } => {
                    out.push(ty::KEY);
                    out.extend_from_slice(&code.to_le_bytes());
                    out.push(pressed.into());
                }
                InputEvent::PointerMove { x, y } => {
                    out.push(ty::POINTER_MOVE);
                    out.extend_from_slice(&x.to_le_bytes());
                    out.extend_from_slice(&y.to_le_bytes());
                }
                InputEvent::PointerButton { button, pressed } => {
                    out.push(ty::POINTER_BUTTON);
                    out.push(button as u8);
                    out.push(pressed.into());
                }
                InputEvent::Wheel { dx, dy } => {
                    out.push(ty::WHEEL);
                    out.extend_from_slice(&dx.to_le_bytes());
                    out.extend_from_slice(&dy.to_le_bytes());
                }
                InputEvent::Touch { id, phase, x, y } => {
                    out.push(ty::TOUCH);
                    out.push(id);
                    out.push(phase as u8);
                    out.extend_from_slice(&x.to_le_bytes());
                    out.extend_from_slice(&y.to_le_bytes());
                }
            },
            ClientMessage::Clipboard(text) => {
                out.push(ty::CLIPBOARD_C);
                put_str32(out, text, MAX_CLIPBOARD_LEN);
            }
            ClientMessage::Resize { width, height } => {
                out.push(ty::RESIZE);
                out.extend_from_slice(&width.to_le_bytes());
                out.extend_from_slice(&height.to_le_bytes());
            }
            ClientMessage::Stats(s) => {
                out.push(ty::CLIENT_STATS);
                out.extend_from_slice(&s.frames_decoded.to_le_bytes());
                out.extend_from_slice(&s.frames_dropped.to_le_bytes());
                out.extend_from_slice(&s.decode_us_p50.to_le_bytes());
                out.extend_from_slice(&s.latency_us_p50.to_le_bytes());
            }
            ClientMessage::Ping { client_time_us } => {
                out.push(ty::PING);
                out.extend_from_slice(&client_time_us.to_le_bytes());
            }
        }
    }

    fn decode_body(msg: &[u8]) -> Result<Self, DecodeError> {
        let (&t, body) = msg.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader::new(body);
        let m = match t {
            ty::HELLO => ClientMessage::Hello {
                min_version: r.u16()?,
                max_version: r.u16()?,
                env_id: r.str16()?,
                token: r.str16()?,
                resume: r.array()?,
                viewport_width: r.u16()?,
                viewport_height: r.u16()?,
            },
            ty::KEYFRAME_REQUEST => ClientMessage::KeyframeRequest,
            ty::KEY => ClientMessage::Input(InputEvent::Key {
                code: r.u16()?,
                pressed: r.bool("pressed")?,
            }),
            ty::POINTER_MOVE => ClientMessage::Input(InputEvent::PointerMove {
                x: r.u16()?,
                y: r.u16()?,
            }),
            ty::POINTER_BUTTON => {
                let b = r.u8()?;
                let button = match b {
                    1 => Button::Left,
                    2 => Button::Middle,
                    3 => Button::Right,
                    4 => Button::Back,
                    5 => Button::Forward,
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "button",
                            value: v.into(),
                        })
                    }
                };
                ClientMessage::Input(InputEvent::PointerButton {
                    button,
                    pressed: r.bool("pressed")?,
                })
            }
            ty::WHEEL => ClientMessage::Input(InputEvent::Wheel {
                dx: r.i16()?,
                dy: r.i16()?,
            }),
            ty::TOUCH => {
                let id = r.u8()?;
                let phase = match r.u8()? {
                    0 => TouchPhase::Start,
                    1 => TouchPhase::Move,
                    2 => TouchPhase::End,
                    3 => TouchPhase::Cancel,
                    v => {
                        return Err(DecodeError::BadValue {
                            field: "phase",
                            value: v.into(),
                        })
                    }
                };
                ClientMessage::Input(InputEvent::Touch {
                    id,
                    phase,
                    x: r.u16()?,
                    y: r.u16()?,
                })
            }
            ty::CLIPBOARD_C => ClientMessage::Clipboard(r.str32(MAX_CLIPBOARD_LEN, "clipboard")?),
            ty::RESIZE => ClientMessage::Resize {
                width: r.u16()?,
                height: r.u16()?,
            },
            ty::CLIENT_STATS => ClientMessage::Stats(ClientStats {
                frames_decoded: r.u64()?,
                frames_dropped: r.u64()?,
                decode_us_p50: r.u32()?,
                latency_us_p50: r.u32()?,
            }),
            ty::PING => ClientMessage::Ping {
                client_time_us: r.u64()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

impl Message for ServerMessage {
    fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            ServerMessage::Welcome {
                version,
                session_id,
                rights,
                resumed,
                resume_grace_ms,
                config,
            } => {
                out.push(ty::WELCOME);
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(session_id);
                out.push(rights.bits());
                out.push((*resumed).into());
                out.extend_from_slice(&resume_grace_ms.to_le_bytes());
                put_config(out, config);
            }
            ServerMessage::Config(c) => {
                out.push(ty::CONFIG);
                put_config(out, c);
            }
            ServerMessage::Cursor {
                x,
                y,
                visible,
                image,
            } => {
                out.push(ty::CURSOR);
                out.extend_from_slice(&x.to_le_bytes());
                out.extend_from_slice(&y.to_le_bytes());
                out.push((*visible).into());
                match image {
                    None => out.push(0),
                    Some(img) => {
                        out.push(1);
                        out.extend_from_slice(&img.hot_x.to_le_bytes());
                        out.extend_from_slice(&img.hot_y.to_le_bytes());
                        out.extend_from_slice(&img.width.to_le_bytes());
                        out.extend_from_slice(&img.height.to_le_bytes());
                        out.extend_from_slice(&img.bgra);
                    }
                }
            }
            ServerMessage::Clipboard(text) => {
                out.push(ty::CLIPBOARD_S);
                put_str32(out, text, MAX_CLIPBOARD_LEN);
            }
            ServerMessage::Stats(s) => {
                out.push(ty::SERVER_STATS);
                out.extend_from_slice(&s.bitrate_bps.to_le_bytes());
                out.extend_from_slice(&s.rtt_us.to_le_bytes());
                out.extend_from_slice(&s.loss_permille.to_le_bytes());
                out.extend_from_slice(&s.cwnd_bytes.to_le_bytes());
                out.extend_from_slice(&s.frames_sent.to_le_bytes());
                out.extend_from_slice(&s.frames_dropped.to_le_bytes());
            }
            ServerMessage::Error { code, message } => {
                out.push(ty::ERROR);
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str16(out, message);
            }
            ServerMessage::Pong {
                client_time_us,
                server_time_us,
            } => {
                out.push(ty::PONG);
                out.extend_from_slice(&client_time_us.to_le_bytes());
                out.extend_from_slice(&server_time_us.to_le_bytes());
            }
        }
    }

    fn decode_body(msg: &[u8]) -> Result<Self, DecodeError> {
        let (&t, body) = msg.split_first().ok_or(DecodeError::Empty)?;
        let mut r = Reader::new(body);
        let m = match t {
            ty::WELCOME => {
                let version = r.u16()?;
                let session_id = r.array()?;
                let bits = r.u8()?;
                let rights = Rights::from_bits(bits).ok_or(DecodeError::BadValue {
                    field: "rights",
                    value: bits.into(),
                })?;
                ServerMessage::Welcome {
                    version,
                    session_id,
                    rights,
                    resumed: r.bool("resumed")?,
                    resume_grace_ms: r.u32()?,
                    config: read_config(&mut r)?,
                }
            }
            ty::CONFIG => ServerMessage::Config(read_config(&mut r)?),
            ty::CURSOR => {
                let x = r.u16()?;
                let y = r.u16()?;
                let visible = r.bool("visible")?;
                let image = if r.bool("has_image")? {
                    let hot_x = r.u16()?;
                    let hot_y = r.u16()?;
                    let width = r.u16()?;
                    let height = r.u16()?;
                    for (field, v) in [("cursor width", width), ("cursor height", height)] {
                        if v > MAX_CURSOR_EDGE {
                            return Err(DecodeError::BadValue {
                                field,
                                value: v.into(),
                            });
                        }
                    }
                    let len = usize::from(width) * usize::from(height) * 4;
                    Some(CursorImage {
                        hot_x,
                        hot_y,
                        width,
                        height,
                        bgra: r.take(len)?.to_vec(),
                    })
                } else {
                    None
                };
                ServerMessage::Cursor {
                    x,
                    y,
                    visible,
                    image,
                }
            }
            ty::CLIPBOARD_S => ServerMessage::Clipboard(r.str32(MAX_CLIPBOARD_LEN, "clipboard")?),
            ty::SERVER_STATS => ServerMessage::Stats(ServerStats {
                bitrate_bps: r.u32()?,
                rtt_us: r.u32()?,
                loss_permille: r.u16()?,
                cwnd_bytes: r.u32()?,
                frames_sent: r.u64()?,
                frames_dropped: r.u64()?,
            }),
            ty::ERROR => ServerMessage::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            },
            ty::PONG => ServerMessage::Pong {
                client_time_us: r.u64()?,
                server_time_us: r.u64()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(m)
    }
}

/// Reassembles length-prefixed messages from arbitrary chunks of a control stream.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte in `buf`; compacted lazily to avoid O(n²) shifts.
    start: usize,
    /// Largest message accepted; 0 means [`MAX_MESSAGE_LEN`].
    limit: usize,
}

impl MessageReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// A reader that refuses messages longer than `limit` as soon as their length prefix
    /// arrives (a server reading a Hello uses [`MAX_HELLO_LEN`]).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit: limit.min(MAX_MESSAGE_LEN),
            ..Self::default()
        }
    }

    /// Changes the largest message accepted from now on (at most [`MAX_MESSAGE_LEN`]).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_MESSAGE_LEN);
    }

    /// The largest message this reader accepts.
    pub fn limit(&self) -> usize {
        if self.limit == 0 {
            MAX_MESSAGE_LEN
        } else {
            self.limit
        }
    }

    /// Appends bytes received from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet consumed as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable: the peer violated the protocol.
    pub fn next_message<M: Message>(&mut self) -> Result<Option<M>, DecodeError> {
        let avail = &self.buf[self.start..];
        let Some(len_bytes) = avail.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let limit = self.limit();
        if len > limit {
            return Err(DecodeError::TooLong { len, limit });
        }
        let Some(body) = avail.get(4..4 + len) else {
            return Ok(None);
        };
        let msg = M::decode_body(body)?;
        self.start += 4 + len;
        if self.start > 64 * 1024 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(msg))
    }
}

/// Header at the start of each video-frame unidirectional stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame number from the shared encoder; increases by at least one per frame.
    pub sequence: u64,
    /// Capture time of the source frame, server clock, microseconds since the Unix epoch.
    pub capture_time_us: u64,
    pub keyframe: bool,
    pub codec: Codec,
    pub width: u16,
    pub height: u16,
    /// Bytes of encoded payload that follow the header on the stream.
    pub payload_len: u32,
}

impl FrameHeader {
    /// Encodes the header, including the leading [`UNI_STREAM_VIDEO`] byte.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut b = [0u8; FRAME_HEADER_LEN];
        b[0] = UNI_STREAM_VIDEO;
        b[1..9].copy_from_slice(&self.sequence.to_le_bytes());
        b[9..17].copy_from_slice(&self.capture_time_us.to_le_bytes());
        b[17] = u8::from(self.keyframe);
        b[18] = self.codec as u8;
        b[19..21].copy_from_slice(&self.width.to_le_bytes());
        b[21..23].copy_from_slice(&self.height.to_le_bytes());
        b[23..27].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Decodes exactly [`FRAME_HEADER_LEN`] bytes.
    pub fn decode(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < FRAME_HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        if b.len() > FRAME_HEADER_LEN {
            return Err(DecodeError::TrailingBytes(b.len() - FRAME_HEADER_LEN));
        }
        let mut r = Reader::new(b);
        let kind = r.u8()?;
        if kind != UNI_STREAM_VIDEO {
            return Err(DecodeError::UnknownType(kind));
        }
        let h = FrameHeader {
            sequence: r.u64()?,
            capture_time_us: r.u64()?,
            keyframe: r.bool("keyframe")?,
            codec: Codec::from_u8(r.u8()?)?,
            width: r.u16()?,
            height: r.u16()?,
            payload_len: r.u32()?,
        };
        if h.payload_len > MAX_FRAME_PAYLOAD {
            return Err(DecodeError::BadValue {
                field: "payload_len",
                value: h.payload_len.into(),
            });
        }
        r.finish()?;
        Ok(h)
    }
}

/// Chooses the protocol version for a client's advertised range, if any overlaps ours.
pub fn negotiate_version(client_min: u16, client_max: u16) -> Option<u16> {
    let hi = client_max.min(VERSION);
    let lo = client_min.max(MIN_VERSION);
    (lo <= hi).then_some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_config() -> StreamConfig {
        StreamConfig {
            width: 1920,
            height: 1080,
            fps_milli: 60_000,
            codec: Codec::H264AnnexB,
            bitrate_bps: 4_000_000,
        }
    }

    fn all_client_messages() -> Vec<ClientMessage> {
        vec![
            ClientMessage::Hello {
                min_version: 1,
                max_version: 3,
                env_id: "env-1".into(),
                token: "abc.def".into(),
                resume: [7; 16],
                viewport_width: 800,
                viewport_height: 600,
            },
            ClientMessage::KeyframeRequest,
            ClientMessage::Input(InputEvent::Key {
                code: 30,
                pressed: true,
            }),
            ClientMessage::Input(InputEvent::PointerMove { x: 5, y: 65535 }),
            ClientMessage::Input(InputEvent::PointerButton {
                button: Button::Right,
                pressed: false,
            }),
            ClientMessage::Input(InputEvent::Wheel { dx: -120, dy: 240 }),
            ClientMessage::Input(InputEvent::Touch {
                id: 3,
                phase: TouchPhase::Cancel,
                x: 10,
                y: 20,
            }),
            ClientMessage::Clipboard("héllo ✓".into()),
            ClientMessage::Resize {
                width: 1280,
                height: 720,
            },
            ClientMessage::Stats(ClientStats {
                frames_decoded: 1,
                frames_dropped: 2,
                decode_us_p50: 3,
                latency_us_p50: 4,
            }),
            ClientMessage::Ping {
                client_time_us: u64::MAX,
            },
        ]
    }

    fn all_server_messages() -> Vec<ServerMessage> {
        vec![
            ServerMessage::Welcome {
                version: 1,
                session_id: [9; 16],
                rights: Rights::VIEW | Rights::INPUT,
                resumed: true,
                resume_grace_ms: 10_000,
                config: sample_config(),
            },
            ServerMessage::Config(sample_config()),
            ServerMessage::Cursor {
                x: 1,
                y: 2,
                visible: true,
                image: Some(CursorImage {
                    hot_x: 1,
                    hot_y: 1,
                    width: 2,
                    height: 2,
                    bgra: (0..16).collect(),
                }),
            },
            ServerMessage::Cursor {
                x: 1,
                y: 2,
                visible: false,
                image: None,
            },
            ServerMessage::Clipboard(String::new()),
            ServerMessage::Stats(ServerStats {
                bitrate_bps: 1,
                rtt_us: 2,
                loss_permille: 3,
                cwnd_bytes: 4,
                frames_sent: 5,
                frames_dropped: 6,
            }),
            ServerMessage::Error {
                code: ErrorCode::TokenExpired,
                message: "token expired".into(),
            },
            ServerMessage::Pong {
                client_time_us: 1,
                server_time_us: 2,
            },
        ]
    }

    #[test]
    fn every_client_message_round_trips() {
        for m in all_client_messages() {
            let bytes = m.to_bytes();
            let mut r = MessageReader::new();
            r.push(&bytes);
            assert_eq!(r.next_message::<ClientMessage>().unwrap(), Some(m));
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn every_server_message_round_trips() {
        for m in all_server_messages() {
            let bytes = m.to_bytes();
            let mut r = MessageReader::new();
            r.push(&bytes);
            assert_eq!(r.next_message::<ServerMessage>().unwrap(), Some(m));
        }
    }

    #[test]
    fn reader_reassembles_messages_split_at_every_byte() {
        let msgs = all_client_messages();
        let mut stream = Vec::new();
        for m in &msgs {
            m.encode(&mut stream);
        }
        let mut r = MessageReader::new();
        let mut got = Vec::new();
        for b in &stream {
            r.push(std::slice::from_ref(b));
            while let Some(m) = r.next_message::<ClientMessage>().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn reader_rejects_oversized_length_before_buffering_body() {
        let mut r = MessageReader::new();
        r.push(&((MAX_MESSAGE_LEN as u32) + 1).to_le_bytes());
        assert_eq!(
            r.next_message::<ClientMessage>(),
            Err(DecodeError::TooLong {
                len: MAX_MESSAGE_LEN + 1,
                limit: MAX_MESSAGE_LEN
            })
        );
    }

    #[test]
    fn hello_reader_refuses_an_oversized_length_prefix_before_the_body_arrives() {
        let mut r = MessageReader::with_limit(MAX_HELLO_LEN);
        r.push(&((MAX_HELLO_LEN as u32) + 1).to_le_bytes());
        assert_eq!(
            r.next_message::<ClientMessage>(),
            Err(DecodeError::TooLong {
                len: MAX_HELLO_LEN + 1,
                limit: MAX_HELLO_LEN
            })
        );
        let mut r = MessageReader::with_limit(MAX_HELLO_LEN);
        r.push(&ClientMessage::KeyframeRequest.to_bytes());
        r.set_limit(MAX_MESSAGE_LEN);
        assert_eq!(r.limit(), MAX_MESSAGE_LEN);
        assert_eq!(
            r.next_message::<ClientMessage>(),
            Ok(Some(ClientMessage::KeyframeRequest))
        );
    }

    #[test]
    fn truncated_and_trailing_bodies_are_rejected() {
        let body = &ClientMessage::Resize {
            width: 1,
            height: 2,
        }
        .to_bytes()[4..];
        assert_eq!(
            ClientMessage::decode_body(&body[..body.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(
            ClientMessage::decode_body(&long),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(ClientMessage::decode_body(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn unknown_types_and_bad_enums_are_rejected() {
        assert_eq!(
            ClientMessage::decode_body(&[0x7f]),
            Err(DecodeError::UnknownType(0x7f))
        );
        assert_eq!(
            ServerMessage::decode_body(&[ty::HELLO]),
            Err(DecodeError::UnknownType(ty::HELLO))
        );
        assert!(matches!(
            ClientMessage::decode_body(&[ty::POINTER_BUTTON, 9, 1]),
            Err(DecodeError::BadValue {
                field: "button",
                ..
            })
        ));
        assert!(matches!(
            ClientMessage::decode_body(&[ty::KEY, 1, 0, 2]),
            Err(DecodeError::BadValue {
                field: "pressed",
                ..
            })
        ));
    }

    #[test]
    fn invalid_utf8_string_is_rejected() {
        let mut body = vec![ty::CLIPBOARD_C];
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(&[0xff, 0xfe]);
        assert_eq!(ClientMessage::decode_body(&body), Err(DecodeError::BadUtf8));
    }

    #[test]
    fn oversized_clipboard_is_rejected_on_decode_and_truncated_on_encode() {
        let mut body = vec![ty::CLIPBOARD_C];
        body.extend_from_slice(&((MAX_CLIPBOARD_LEN + 1) as u32).to_le_bytes());
        assert!(matches!(
            ClientMessage::decode_body(&body),
            Err(DecodeError::BadValue {
                field: "clipboard",
                ..
            })
        ));
        let big = "é".repeat(MAX_CLIPBOARD_LEN);
        let bytes = ClientMessage::Clipboard(big).to_bytes();
        let ClientMessage::Clipboard(text) = ClientMessage::decode_body(&bytes[4..]).unwrap()
        else {
            panic!("wrong type");
        };
        assert!(text.len() <= MAX_CLIPBOARD_LEN);
    }

    #[test]
    fn oversized_cursor_image_is_rejected() {
        let mut body = vec![ty::CURSOR, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0];
        body.extend_from_slice(&(MAX_CURSOR_EDGE + 1).to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        assert!(matches!(
            ServerMessage::decode_body(&body),
            Err(DecodeError::BadValue { .. })
        ));
    }

    #[test]
    fn frame_header_round_trips_and_checks_stream_type() {
        let h = FrameHeader {
            sequence: 42,
            capture_time_us: 1_700_000_000_000_000,
            keyframe: true,
            codec: Codec::H264AnnexB,
            width: 1920,
            height: 1080,
            payload_len: 12345,
        };
        let b = h.encode();
        assert_eq!(FrameHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[0] = 0x02;
        assert_eq!(FrameHeader::decode(&bad), Err(DecodeError::UnknownType(2)));
        let mut huge = b;
        huge[23..27].copy_from_slice(&(MAX_FRAME_PAYLOAD + 1).to_le_bytes());
        assert!(FrameHeader::decode(&huge).is_err());
    }

    #[test]
    fn version_negotiation_picks_highest_common_version() {
        assert_eq!(negotiate_version(1, 5), Some(VERSION));
        assert_eq!(negotiate_version(VERSION + 1, VERSION + 2), None);
        assert_eq!(negotiate_version(0, 0), None);
    }

    #[test]
    fn rights_parse_display_and_reject_unknown_bits() {
        let r: Rights = "view,input".parse().unwrap();
        assert!(r.contains(Rights::VIEW) && r.contains(Rights::INPUT));
        assert!(!r.contains(Rights::ADMIN));
        assert_eq!(r.to_string(), "view,input");
        assert!("view,fly".parse::<Rights>().is_err());
        assert_eq!(Rights::from_bits(0x10), None);
    }

    #[test]
    fn error_codes_round_trip_and_unknown_codes_map_to_unknown() {
        for v in 0..=15u16 {
            assert_eq!(ErrorCode::from_u16(v) as u16, v);
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown);
        assert!(!ErrorCode::PermissionDenied.is_fatal());
        assert!(ErrorCode::TokenForged.is_fatal());
        assert!(ErrorCode::TokenRevoked.is_fatal());
        assert!(!ErrorCode::SessionExpiring.is_fatal());
        assert!(!ErrorCode::Unavailable.is_fatal());
    }
}
