//! hostd↔genos-agent protocol: the messages, their wire codec and a sans-IO session with
//! per-request flow control.
//!
//! One connection (AF_VSOCK port [`VSOCK_PORT`], a Unix socket in tests, or a virtio-serial
//! port under QEMU) carries length-prefixed frames in both directions. Every frame names a
//! request id, so several operations run at once: an exec streaming output while a clipboard
//! change arrives. The host sends [`HostMessage`]s, the agent [`AgentMessage`]s; both sides
//! drive a [`session::Session`] (bytes in → messages out, messages in → bytes out).
//! `docs/agent.md` is the normative text; this module is its reference implementation.

mod codec;
pub mod session;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

pub use crate::stream::{DecodeError, Message, MessageReader};
pub use codec::{hello_version, Frame};
pub use session::{AgentSession, HostSession, SendError, SessionError};

/// Major version: a peer with another major is refused at Hello.
pub const VERSION_MAJOR: u16 = 1;
/// Minor version: additions a peer of the same major may ignore by not using them.
pub const VERSION_MINOR: u16 = 0;
/// AF_VSOCK port the agent listens on in the guest (the host connects with `CONNECT 1024`).
pub const VSOCK_PORT: u32 = 1024;
/// Name of the virtio-serial port the agent opens under QEMU (`/dev/virtio-ports/<name>`).
pub const VIRTIO_SERIAL_NAME: &str = "org.genos.agent";
/// Largest frame (type, request id and body), either direction.
pub const MAX_FRAME_LEN: usize = crate::stream::MAX_MESSAGE_LEN;
/// Largest frame accepted before the Hello exchange finished.
pub const MAX_HELLO_LEN: usize = 4096;
/// Largest data chunk (stdin, stdout, stderr, file contents) in one frame.
pub const MAX_CHUNK_LEN: usize = 64 * 1024;
/// Largest clipboard content.
pub const MAX_CLIPBOARD_LEN: usize = 512 * 1024;
/// Bytes of stream data each side may send on a request before the peer grants more.
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// Largest window a receiver may grant (credit beyond it is a protocol violation).
pub const MAX_WINDOW: u64 = 16 << 20;
/// Largest argv or environment list of an Exec.
pub const MAX_ARGS: usize = 4096;
/// Largest number of DNS resolvers in a network configuration.
pub const MAX_RESOLVERS: usize = 8;
/// Requests with streams (exec, file put/get) open at once on one connection.
pub const MAX_OPEN_STREAMS: usize = 64;

/// Identifies a request and every frame belonging to it. The host picks ids; 0 is the
/// connection itself (Hello) and the agent's unsolicited notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u32);

impl RequestId {
    /// Hello and notifications.
    pub const CONNECTION: RequestId = RequestId(0);
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Readiness stages, in the order the guest reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum Stage {
    /// The agent runs; nothing more is known.
    Booting = 0,
    /// The init system reached its target (or the agent is PID 1 of an initramfs).
    System = 1,
    /// The display server runs and the session's first window is mapped.
    Session = 2,
}

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Booting => "booting",
            Stage::System => "system",
            Stage::Session => "session",
        }
    }
}

/// Optional abilities of an agent build, announced in its Hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u32);

impl Features {
    pub const EXEC: Features = Features(1);
    pub const FILES: Features = Features(2);
    pub const CLIPBOARD: Features = Features(4);
    pub const DISPLAY: Features = Features(8);
    pub const TIME: Features = Features(16);
    pub const NETWORK: Features = Features(32);
    pub const POWER: Features = Features(64);
    const ALL_BITS: u32 = 0x7f;

    pub const fn empty() -> Self {
        Features(0)
    }
    pub const fn bits(self) -> u32 {
        self.0
    }
    /// Unknown bits (from a newer minor version) are kept: they only say more is possible.
    pub const fn from_bits_retain(bits: u32) -> Self {
        Features(bits)
    }
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// Bits this implementation knows nothing about.
    pub const fn unknown_bits(self) -> u32 {
        self.0 & !Self::ALL_BITS
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// The whole environment of the process (nothing is inherited from the agent).
    pub env: Vec<(String, String)>,
    /// Working directory; empty = the user's home directory.
    pub cwd: String,
    /// User name from the guest's `/etc/passwd`; empty = the agent's own user.
    pub user: String,
    /// Wall-clock limit; the process group is killed (SIGKILL) when it expires. 0 = none.
    pub timeout_ms: u32,
    /// Whether the host streams stdin (`ExecStdin`, `ExecStdinEof`); else stdin is `/dev/null`.
    pub stdin: bool,
}

/// Which output stream a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OutputFd {
    Stdout = 1,
    Stderr = 2,
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

/// A file to write in the guest; `size` bytes of `FileData` follow, then `FileEnd`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FilePutRequest {
    /// Absolute path.
    pub path: String,
    /// Owner of the new file and whose home bounds `path`; empty = root.
    pub user: String,
    /// Permission bits (at most 0o7777).
    pub mode: u32,
    /// Exact number of bytes that follow.
    pub size: u64,
    /// Allow paths outside the user's home.
    pub as_root: bool,
}

/// A file to read from the guest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FileGetRequest {
    /// Absolute path.
    pub path: String,
    /// Whose home bounds `path`; empty = root.
    pub user: String,
    /// Allow paths outside the user's home.
    pub as_root: bool,
}

/// Clipboard content: a MIME type and its bytes (`text/plain;charset=utf-8` is UTF-8 text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipboardContent {
    pub mime: String,
    pub data: Vec<u8>,
}

/// MIME type of UTF-8 text, the one every clipboard implementation supports.
pub const MIME_TEXT_UTF8: &str = "text/plain;charset=utf-8";

/// Interface configuration from hostd's network plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkConfig {
    pub interface: String,
    pub address: IpAddr,
    pub prefix: u8,
    pub gateway: Option<IpAddr>,
    pub resolvers: Vec<IpAddr>,
}

/// Orderly power actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerAction {
    Poweroff = 1,
    Reboot = 2,
}

/// Error codes of an [`AgentMessage::Error`] reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// The peer's major version is not spoken here.
    UnsupportedVersion = 1,
    /// A malformed frame or a frame out of order; the connection is closed after it.
    ProtocolViolation = 2,
    /// This agent build cannot do that (e.g. clipboard without an X server).
    NotSupported = 3,
    /// Refused by policy: a path outside the user's home, an unknown user.
    PermissionDenied = 4,
    NotFound = 5,
    /// Over a size limit (file, clipboard, open requests).
    TooLarge = 6,
    InvalidArgument = 7,
    /// An operating system call failed; the message says which.
    Io = 8,
    /// The request id is already in use, or names no running request.
    BadRequestId = 9,
    Internal = 10,
    /// A code from a newer peer.
    Unknown = 0xffff,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> Self {
        use ErrorCode::*;
        match v {
            1 => UnsupportedVersion,
            2 => ProtocolViolation,
            3 => NotSupported,
            4 => PermissionDenied,
            5 => NotFound,
            6 => TooLarge,
            7 => InvalidArgument,
            8 => Io,
            9 => BadRequestId,
            10 => Internal,
            _ => Unknown,
        }
    }
}

/// What the host sends to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage {
    /// First frame (request id 0).
    Hello { major: u16, minor: u16 },
    /// Asks for the current stage; answered by `Ready`.
    ReadyQuery,
    /// Starts a process; answered by `ExecStarted`, output, then `ExecExit` (or `Error`).
    Exec(ExecRequest),
    /// Bytes for the process's stdin (flow-controlled).
    ExecStdin(Vec<u8>),
    /// Closes the process's stdin.
    ExecStdinEof,
    /// Sends a signal (1..=64) to the process group.
    ExecKill { signal: u8 },
    /// Starts a file upload; answered by `Done` once the file is in place (or `Error`).
    FilePut(FilePutRequest),
    /// Starts a file download; answered by `FileInfo`, `FileData`…, `FileEnd` (or `Error`).
    FileGet(FileGetRequest),
    /// File contents of a put (flow-controlled).
    FileData(Vec<u8>),
    /// End of a put's contents.
    FileEnd,
    /// Asks for the clipboard in the given MIME type; answered by `Clipboard`.
    ClipboardGet { mime: String },
    /// Sets the clipboard; answered by `Done`.
    ClipboardSet(ClipboardContent),
    /// Sets the display mode of the first output; answered by `Done`.
    DisplaySetMode { width: u16, height: u16 },
    /// Sets the system clock (UTC, ns since the Unix epoch); answered by `Done`.
    TimeSet { utc_ns: u64 },
    /// Configures an interface; answered by `Done`.
    NetworkConfigure(NetworkConfig),
    /// Powers off or reboots; answered by `Done` before the agent acts.
    Power(PowerAction),
    /// Grants the agent `bytes` more of stream data on this request.
    Credit { bytes: u32 },
}

/// What the agent sends to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// Answer to the Hello (request id 0).
    Hello {
        major: u16,
        minor: u16,
        /// Name and version of the agent build, for logs.
        agent: String,
        features: Features,
    },
    /// The current stage: the answer to `ReadyQuery`, and unsolicited (id 0) when it changes
    /// (it falls back to `System` when the desktop session part goes away).
    Ready(Stage),
    /// The process runs.
    ExecStarted { pid: u32 },
    /// Output of the process (flow-controlled).
    ExecOutput { fd: OutputFd, data: Vec<u8> },
    /// The process ended (after all its output); `timed_out` if the agent killed it.
    ExecExit { status: ExitStatus, timed_out: bool },
    /// Size and mode of a file about to be sent.
    FileInfo { size: u64, mode: u32 },
    /// File contents of a get (flow-controlled).
    FileData(Vec<u8>),
    /// End of a get's contents.
    FileEnd,
    /// Clipboard contents (answer to `ClipboardGet`).
    Clipboard(ClipboardContent),
    /// The guest's clipboard changed (id 0).
    ClipboardChanged(ClipboardContent),
    /// A request without a result of its own succeeded.
    Done,
    /// Grants the host `bytes` more of stream data on this request.
    Credit { bytes: u32 },
    /// The request failed and is over (id 0: the connection failed and closes).
    Error { code: ErrorCode, message: String },
}
