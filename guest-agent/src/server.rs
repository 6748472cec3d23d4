//! The agent's event loop: one thread, poll(2) over the listeners, the connections, the
//! children's pipes and a signalfd for SIGCHLD. Each connection has its own
//! [`AgentSession`]; requests on it are dispatched here to [`Exec`], [`Put`], [`Get`] and
//! [`crate::system`]. Clipboard and display requests go to the X side: the agent's own X
//! connection ([`Desktop`], in the session part or with `--x11`), else the connected
//! session part ([`SessionLink`]), else they are refused saying no desktop session is
//! connected.
//!
//! Memory stays bounded by the peer's behaviour only through the protocol's limits: a
//! connection is not read while its session holds more than [`MAX_PENDING_OUTPUT`] bytes of
//! unwritten output or a frame's worth of undecoded input, and children's pipes are read
//! only within the credit the host granted.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proto::agent::session::AgentSession;
use proto::agent::{
    AgentMessage, ErrorCode, Features, Frame, HostMessage, OutputFd, PowerAction, RequestId, Stage,
    MAX_CHUNK_LEN, MAX_FRAME_LEN,
};

use crate::exec::{self, Exec, Output};
use crate::files::{Get, Put};
use crate::kiosk::{Kiosk, KioskState};
use crate::link::{LinkEvent, SessionLink};
use crate::ready::{self, Readiness};
use crate::system;
use crate::transport::{self, Listener};
use crate::users::Accounts;
use crate::x11::clipboard::is_text_mime;
use crate::x11::{Desktop, DesktopEvent, DisplayError, GetError, X11Error};

/// Name and version announced in the Hello.
pub const AGENT_NAME: &str = concat!("genos-agent ", env!("CARGO_PKG_VERSION"));
/// What the system agent always does. Clipboard and display ([`DESKTOP_FEATURES`]) are
/// announced only while an X display is reachable (its own, or a session part's).
pub const FEATURES: Features = Features::from_bits_retain(
    Features::EXEC.bits()
        | Features::FILES.bits()
        | Features::TIME.bits()
        | Features::NETWORK.bits()
        | Features::POWER.bits(),
);
/// What an X display adds, and all the session part does.
pub const DESKTOP_FEATURES: Features =
    Features::from_bits_retain(Features::CLIPBOARD.bits() | Features::DISPLAY.bits());
/// Where the system agent listens for session parts by default.
pub const DEFAULT_SESSION_SOCKET: &str = "/run/genos-agent/session.sock";
/// How long a session part waits for its X display at start, and between tries to reach the
/// system agent.
const X_CONNECT_WAIT: Duration = Duration::from_secs(10);
const UPLINK_RETRY: Duration = Duration::from_secs(1);
const UPLINK_REFUSED_RETRY: Duration = Duration::from_secs(10);
/// Unwritten output above which a connection's input is no longer read.
pub const MAX_PENDING_OUTPUT: usize = 4 << 20;
/// Longest wait in poll: timeouts and readiness checks are this precise.
const TICK: Duration = Duration::from_millis(100);
/// How long a PID 1 agent waits for the host to close after a power Done.
const POWER_LINGER: Duration = Duration::from_secs(2);
/// How long before a closed virtio-serial port is opened again.
const SERIAL_RETRY: Duration = Duration::from_secs(1);
/// Chunks one request may send per loop turn, so one fast stream cannot starve the rest.
const CHUNKS_PER_TURN: usize = 8;

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listening on {name}: {source}")]
    Listen {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up SIGCHLD: {0}")]
    Signal(#[source] std::io::Error),
    #[error("poll: {0}")]
    Poll(#[source] std::io::Error),
    #[error("no transport: give --unix or --serial, or allow vsock")]
    NoTransport,
    #[error("X display: {0}")]
    X11(#[source] X11Error),
    #[error("the X display closed: {0}")]
    DisplayGone(String),
}

/// Which part of the agent this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The system service (or PID 1): everything, the desktop through a session part.
    System,
    /// `genos-agent session`, inside the user's X session: clipboard, display and the
    /// `session` stage for the system agent, over its session socket.
    Session,
}

/// What the agent serves and how.
#[derive(Debug, Clone)]
pub struct Config {
    /// AF_VSOCK port; `None` = no vsock.
    pub vsock_port: Option<u32>,
    /// Whether a vsock that cannot be set up stops the agent (an explicit `--vsock-port`).
    pub vsock_required: bool,
    pub unix: Option<PathBuf>,
    pub serial: Option<PathBuf>,
    pub max_file_size: u64,
    pub systemctl: PathBuf,
    pub ip: PathBuf,
    pub resolv_conf: PathBuf,
    pub accounts: Accounts,
    /// In the initramfs (as PID 1 or started by its init): no init system to ask, so the
    /// stage is `system` at once and power goes through reboot(2).
    pub initramfs: bool,
    pub role: Role,
    /// Connect to this X display (`Some("")`: `$DISPLAY`); always in the session role.
    pub x11: Option<String>,
    /// System role: where session parts connect.
    pub session_socket: Option<PathBuf>,
    /// Whether a session socket that cannot be set up stops the agent.
    pub session_socket_required: bool,
    /// System role: the user (besides root) whose session parts are accepted.
    pub session_user: String,
    /// Session role: the system agent's session socket.
    pub uplink: Option<PathBuf>,
    /// Session role under the kiosk (cage, Wayland): no X; the app and the compositor
    /// make the session stage ([`crate::kiosk`]).
    pub kiosk: bool,
}

/// At most `BURST` lines per 10 s, then a count of the suppressed ones: what a peer makes
/// the agent log cannot flood the guest's console.
#[derive(Debug, Default)]
struct RateLimit {
    window: Option<Instant>,
    lines: u32,
    suppressed: u32,
}

impl RateLimit {
    const BURST: u32 = 20;
    fn log(&mut self, now: Instant, line: std::fmt::Arguments<'_>) {
        if self
            .window
            .is_none_or(|w| now >= w + Duration::from_secs(10))
        {
            if self.suppressed > 0 {
                eprintln!("genos-agent: {} messages suppressed", self.suppressed);
            }
            *self = RateLimit {
                window: Some(now),
                ..RateLimit::default()
            };
        }
        if self.lines < Self::BURST {
            self.lines += 1;
            eprintln!("genos-agent: {line}");
        } else {
            self.suppressed += 1;
        }
    }
}

/// One host connection.
#[derive(Debug)]
struct Conn {
    io: File,
    session: AgentSession,
    execs: HashMap<RequestId, Exec>,
    puts: HashMap<RequestId, Put>,
    gets: HashMap<RequestId, Get>,
    /// The stage last announced on this connection.
    stage_sent: Stage,
    serial: bool,
    dead: bool,
}

impl Conn {
    fn new(io: File, serial: bool, features: Features) -> Self {
        Conn {
            io,
            session: AgentSession::new(AGENT_NAME, features),
            execs: HashMap::new(),
            puts: HashMap::new(),
            gets: HashMap::new(),
            stage_sent: Stage::Booting,
            serial,
            dead: false,
        }
    }

    fn wants_input(&self) -> bool {
        !self.dead
            && self.session.output().len() < MAX_PENDING_OUTPUT
            && self.session.buffered_input() < MAX_FRAME_LEN + 4
    }

    /// Queues a reply; a reply the session refuses is a bug in the agent, reported as such.
    fn reply(&mut self, id: RequestId, message: AgentMessage) {
        if let Err(e) = self.session.send(id, message) {
            let _ = self.session.send(
                id,
                AgentMessage::Error {
                    code: ErrorCode::Internal,
                    message: format!("agent reply not sendable: {e}"),
                },
            );
        }
    }

    fn error(&mut self, id: RequestId, code: ErrorCode, message: impl std::fmt::Display) {
        self.reply(
            id,
            AgentMessage::Error {
                code,
                message: message.to_string(),
            },
        );
    }

    fn flush(&mut self) {
        while !self.session.output().is_empty() {
            match self.io.write(self.session.output()) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => self.session.advance_output(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
    }

    /// Reads output of request `id` within its credit; returns whether both pipes are idle
    /// or closed (as opposed to holding data the host has no credit for).
    fn pump_output(&mut self, id: RequestId, now: Instant, log: &mut RateLimit) -> bool {
        let Some(e) = self.execs.get_mut(&id) else {
            return true;
        };
        let mut idle = true;
        for fd in [OutputFd::Stdout, OutputFd::Stderr] {
            for _ in 0..CHUNKS_PER_TURN {
                if e.output_fd(fd).is_none() {
                    break;
                }
                let credit = self.session.send_credit(id).min(MAX_CHUNK_LEN as u64) as usize;
                if credit == 0 {
                    idle = false;
                    break;
                }
                match e.read_output(fd, credit) {
                    Ok(Output::Data(data)) => {
                        if let Err(err) =
                            self.session.send(id, AgentMessage::ExecOutput { fd, data })
                        {
                            log.log(now, format_args!("exec {id}: output lost: {err}"));
                        }
                    }
                    Ok(Output::Idle | Output::Closed) => break,
                    Err(err) => {
                        log.log(now, format_args!("exec {id}: reading {fd:?}: {err}"));
                        break;
                    }
                }
            }
        }
        idle
    }
}

/// The agent.
pub struct Server {
    cfg: Config,
    listeners: Vec<Listener>,
    sigchld: File,
    conns: BTreeMap<u64, Conn>,
    next_token: u64,
    readiness: Readiness,
    /// Children of exec requests: pid → (connection, request).
    pids: HashMap<i32, (u64, RequestId)>,
    serial_retry: Option<Instant>,
    /// A power action acknowledged by a PID 1 agent, done once the host closed or lingered.
    power: Option<(PowerAction, u64, Instant)>,
    log: RateLimit,
    /// The agent's own X connection (session role, or `--x11`).
    desktop: Option<Desktop>,
    /// Session role under the kiosk.
    kiosk: Option<Kiosk>,
    /// Why a request found the X connection gone (acted on in the next service).
    desktop_lost: Option<String>,
    /// System role: the session parts' listener and the one connected.
    session_listener: Option<Listener>,
    link: Option<SessionLink>,
    /// Why no session part is connected, for the refusals that say so.
    link_gone: String,
    /// Session role: when to try the system agent again, and the connection to it.
    uplink_retry: Option<Instant>,
    uplink_token: Option<u64>,
    uplink_error: Option<String>,
}

/// A descriptor owned elsewhere, for poll.
struct RawFdRef(std::os::fd::RawFd);

impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0
    }
}

/// Connects to the X display (`""`: `$DISPLAY`); a session part started with its session
/// may be a little early, so it tries for [`X_CONNECT_WAIT`].
fn connect_display(display: &str, role: Role) -> Result<Desktop, ServerError> {
    let display = (!display.is_empty()).then_some(display);
    let deadline = Instant::now() + X_CONNECT_WAIT;
    loop {
        match Desktop::connect(display) {
            Ok(d) => return Ok(d),
            Err(e) if role == Role::Session && e.is_fatal() && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => return Err(ServerError::X11(e)),
        }
    }
}

fn sigchld_fd() -> std::io::Result<File> {
    // SAFETY: the sigset is initialised by sigemptyset/sigaddset before use; sigprocmask and
    // signalfd read it; the descriptor is checked and owned at once.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from(OwnedFd::from_raw_fd(fd)))
    }
}

impl Server {
    /// Opens the transports. Call before any other thread exists (SIGCHLD is blocked).
    pub fn new(cfg: Config) -> Result<Server, ServerError> {
        let sigchld = sigchld_fd().map_err(ServerError::Signal)?;
        let mut listeners = Vec::new();
        if let Some(port) = cfg.vsock_port {
            match Listener::vsock(port) {
                Ok(l) => listeners.push(l),
                Err(source) if cfg.vsock_required => {
                    return Err(ServerError::Listen {
                        name: format!("vsock port {port}"),
                        source,
                    })
                }
                Err(e) => eprintln!("genos-agent: no vsock (port {port}): {e}"),
            }
        }
        if let Some(path) = &cfg.unix {
            listeners.push(Listener::unix(path).map_err(|source| ServerError::Listen {
                name: format!("unix socket {}", path.display()),
                source,
            })?);
        }
        let mut session_listener = None;
        if let Some(path) = cfg
            .session_socket
            .as_ref()
            .filter(|_| cfg.role == Role::System)
        {
            match Listener::session(path) {
                Ok(l) => session_listener = Some(l),
                Err(source) if cfg.session_socket_required => {
                    return Err(ServerError::Listen {
                        name: format!("session socket {}", path.display()),
                        source,
                    })
                }
                Err(e) => eprintln!(
                    "genos-agent: no session socket ({}): {e}; clipboard and display are off",
                    path.display()
                ),
            }
        }
        let desktop = match &cfg.x11 {
            Some(display) if !cfg.kiosk => Some(connect_display(display, cfg.role)?),
            _ => None,
        };
        let kiosk =
            (cfg.role == Role::Session && cfg.kiosk).then(|| Kiosk::from_env(Instant::now()));
        if cfg.role == Role::System && listeners.is_empty() && cfg.serial.is_none() {
            return Err(ServerError::NoTransport);
        }
        for l in listeners.iter().chain(&session_listener) {
            eprintln!("genos-agent: listening on {}", l.name);
        }
        let now = Instant::now();
        // The session part is not the one to ask the init system: its baseline is `system`.
        let no_init = cfg.initramfs || cfg.role == Role::Session;
        Ok(Server {
            readiness: Readiness::new(no_init, cfg.systemctl.clone(), now),
            desktop,
            kiosk,
            desktop_lost: None,
            session_listener,
            link: None,
            link_gone: "none has connected yet".into(),
            uplink_retry: cfg.uplink.as_ref().map(|_| now),
            uplink_token: None,
            uplink_error: None,
            serial_retry: cfg.serial.as_ref().map(|_| now),
            cfg,
            listeners,
            sigchld,
            conns: BTreeMap::new(),
            next_token: 0,
            pids: HashMap::new(),
            power: None,
            log: RateLimit::default(),
        })
    }

    /// Serves until the process is killed (or powers the guest off).
    pub fn run(&mut self) -> Result<(), ServerError> {
        loop {
            self.turn()?;
        }
    }

    /// What a Hello says now: the X features only while a display is reachable.
    fn features(&self) -> Features {
        let desktop = self.desktop.is_some()
            || self
                .link
                .as_ref()
                .is_some_and(|l| l.features.contains(Features::CLIPBOARD));
        match (self.cfg.role, desktop) {
            (Role::Session, _) if self.kiosk.is_some() => Features::empty(),
            (Role::Session, _) => DESKTOP_FEATURES,
            (Role::System, true) => FEATURES | DESKTOP_FEATURES,
            (Role::System, false) => FEATURES,
        }
    }

    /// The stage announced to hosts.
    fn stage(&self) -> Stage {
        if let Some(k) = &self.kiosk {
            return if k.running() {
                Stage::Session
            } else {
                Stage::System
            };
        }
        let desktop = match (&self.desktop, &self.link) {
            (Some(d), _) if d.session_ready() => Some(Stage::Session),
            (Some(_), _) => Some(Stage::System),
            (None, Some(l)) => Some(l.stage),
            (None, None) => None,
        };
        ready::combine(self.readiness.stage(), desktop)
    }

    fn add_conn(&mut self, io: File, serial: bool) -> u64 {
        self.next_token += 1;
        let features = self.features();
        self.conns
            .insert(self.next_token, Conn::new(io, serial, features));
        self.next_token
    }

    /// One poll and everything it made ready.
    pub fn turn(&mut self) -> Result<(), ServerError> {
        #[derive(Clone, Copy)]
        enum Slot {
            SigChld,
            Listener(usize),
            Conn(u64),
            Wake,
            X,
            SessionListener,
            Link,
        }
        let now = Instant::now();
        let mut fds = Vec::new();
        let mut slots = Vec::new();
        let mut push = |fd: &dyn AsRawFd, events: i16, slot: Slot| {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events,
                revents: 0,
            });
            slots.push(slot);
        };
        push(&self.sigchld, libc::POLLIN, Slot::SigChld);
        for (i, l) in self.listeners.iter().enumerate() {
            push(l, libc::POLLIN, Slot::Listener(i));
        }
        if let Some(d) = &self.desktop {
            push(&RawFdRef(d.fd()), libc::POLLIN, Slot::X);
        }
        if let Some(l) = &self.session_listener {
            push(l, libc::POLLIN, Slot::SessionListener);
        }
        if let Some(link) = &self.link {
            let mut events = 0;
            if link.wants_input() {
                events |= libc::POLLIN;
            }
            if link.wants_output() {
                events |= libc::POLLOUT;
            }
            push(&link.io, events, Slot::Link);
        }
        let mut busy = false;
        for (&token, c) in &self.conns {
            let mut events = 0;
            if c.wants_input() {
                events |= libc::POLLIN;
            }
            if !c.session.output().is_empty() {
                events |= libc::POLLOUT;
            }
            push(&c.io, events, Slot::Conn(token));
            for (&id, e) in &c.execs {
                let credit = c.session.send_credit(id) > 0;
                for fd in [OutputFd::Stdout, OutputFd::Stderr] {
                    if let Some(f) = e.output_fd(fd).filter(|_| credit) {
                        push(f, libc::POLLIN, Slot::Wake);
                    }
                }
                if let Some(f) = e.stdin_wants_write() {
                    push(f, libc::POLLOUT, Slot::Wake);
                }
            }
            busy |= c.gets.keys().any(|&id| c.session.send_credit(id) > 0);
        }
        let deadline = self
            .conns
            .values()
            .flat_map(|c| c.execs.values().filter_map(Exec::next_deadline))
            .chain(self.readiness.next_check())
            .chain(self.serial_retry)
            .chain(self.uplink_retry)
            .chain(self.desktop.as_ref().and_then(Desktop::next_deadline))
            .chain(self.kiosk.as_ref().map(Kiosk::next_check))
            .chain(self.link.as_ref().and_then(SessionLink::next_deadline))
            .chain(self.power.map(|(_, _, at)| at))
            .min();
        let timeout = if busy {
            Duration::ZERO
        } else {
            deadline.map_or(TICK, |d| d.saturating_duration_since(now).min(TICK))
        };
        // SAFETY: `fds` is a live array of `fds.len()` pollfd structures.
        let rc = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                timeout.as_millis() as libc::c_int,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(ServerError::Poll(e));
            }
        }
        let now = Instant::now();
        for (pfd, slot) in fds.iter().zip(slots) {
            if pfd.revents == 0 {
                continue;
            }
            match slot {
                Slot::SigChld => self.reap(now),
                Slot::Listener(i) => self.accept(i, now),
                Slot::Conn(token) => self.read_conn(token, pfd.revents, now),
                // The X connection is read by Desktop::process in service().
                Slot::Wake | Slot::X => {}
                Slot::SessionListener => self.accept_session(now),
                Slot::Link => self.read_link(now),
            }
        }
        self.service(now)
    }

    /// Takes a session part's connection if it comes from root or the session user; a new
    /// one replaces the one connected (a session part restarted before the old one's end
    /// was seen).
    fn accept_session(&mut self, now: Instant) {
        loop {
            let Some(listener) = &self.session_listener else {
                return;
            };
            let io = match listener.accept() {
                Ok(Some(io)) => io,
                Ok(None) => return,
                Err(e) => {
                    let name = listener.name.clone();
                    self.log.log(now, format_args!("accepting on {name}: {e}"));
                    return;
                }
            };
            let uid = match transport::peer_uid(&io) {
                Ok(uid) => uid,
                Err(e) => {
                    self.log.log(
                        now,
                        format_args!("session part refused: no credentials: {e}"),
                    );
                    continue;
                }
            };
            let user = &self.cfg.session_user;
            let user_uid = self.cfg.accounts.lookup(user).ok().map(|u| u.uid);
            if uid != 0 && Some(uid) != user_uid {
                self.log.log(
                    now,
                    format_args!("session part refused: uid {uid} is neither root nor {user}"),
                );
                continue;
            }
            if let Some(old) = self.link.as_mut() {
                old.dead = Some("a new session part connected".into());
                self.drop_link(now);
            }
            eprintln!("genos-agent: session part connected (uid {uid})");
            let mut link = SessionLink::new(io, uid);
            link.flush();
            self.link = Some(link);
        }
    }

    fn read_link(&mut self, now: Instant) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        let events = link.read();
        for event in events {
            match event {
                LinkEvent::Reply {
                    to: (token, id),
                    message,
                } => {
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.reply(id, message);
                    }
                }
                LinkEvent::Changed(content) => self.relay_changed(&content),
            }
        }
        if self.link.as_ref().is_some_and(|l| l.dead.is_some()) {
            self.drop_link(now);
        }
    }

    /// Ends the link: its requests fail, the stage falls back, and the reason is kept for
    /// the refusals that follow.
    fn drop_link(&mut self, now: Instant) {
        let Some(mut link) = self.link.take() else {
            return;
        };
        let reason = link.dead.take().unwrap_or_else(|| "unknown".into());
        for (token, id) in link.take_pending() {
            if let Some(c) = self.conns.get_mut(&token) {
                c.error(
                    id,
                    ErrorCode::Io,
                    format!("the desktop session part went away before answering: {reason}"),
                );
            }
        }
        self.log.log(
            now,
            format_args!("session part (uid {}) gone: {reason}", link.uid),
        );
        self.link_gone = format!("the last one left: {reason}");
    }

    fn relay_changed(&mut self, content: &proto::agent::ClipboardContent) {
        for c in self.conns.values_mut() {
            if c.session.is_open() {
                c.reply(
                    RequestId::CONNECTION,
                    AgentMessage::ClipboardChanged(content.clone()),
                );
            }
        }
    }

    /// A clipboard or display request: to the agent's own display, else the session part.
    fn desktop_request(&mut self, token: u64, frame: Frame<HostMessage>, now: Instant) {
        use HostMessage as H;
        let id = frame.id;
        let reply: Result<Option<AgentMessage>, (ErrorCode, String)> = match &frame.message {
            H::ClipboardGet { mime }
            | H::ClipboardSet(proto::agent::ClipboardContent { mime, .. })
                if !is_text_mime(mime) =>
            {
                Err((
                    ErrorCode::NotSupported,
                    format!(
                        "clipboard type {mime:?} is not supported: only text/plain;charset=utf-8"
                    ),
                ))
            }
            H::ClipboardSet(c) if std::str::from_utf8(&c.data).is_err() => Err((
                ErrorCode::InvalidArgument,
                "clipboard text is not valid UTF-8".into(),
            )),
            H::DisplaySetMode { width, height } if *width == 0 || *height == 0 => Err((
                ErrorCode::InvalidArgument,
                format!("display mode {width}x{height} has no area"),
            )),
            _ => Ok(None),
        };
        let reply = match reply {
            Err(e) => Err(e),
            Ok(_) if self.kiosk.is_some() => Err((
                ErrorCode::NotSupported,
                "the kiosk session (cage, Wayland) has no clipboard or display control through the agent".into(),
            )),
            Ok(_) if self.desktop.is_some() => self.desktop_do(token, id, frame.message, now),
            Ok(_) => match self.link.as_mut() {
                Some(link) => match link.forward((token, id), frame.message, now) {
                    Ok(()) => {
                        link.flush();
                        Ok(None)
                    }
                    Err(e) => Err((
                        ErrorCode::Internal,
                        format!("forwarding to the session part: {e}"),
                    )),
                },
                None => Err((
                    ErrorCode::NotSupported,
                    format!(
                        "no desktop session is connected to the agent ({}), so there is no clipboard or display to use",
                        self.link_gone
                    ),
                )),
            },
        };
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        match reply {
            Ok(Some(message)) => c.reply(id, message),
            Ok(None) => {}
            Err((code, message)) => c.error(id, code, message),
        }
    }

    /// Does a clipboard or display request on the agent's own X connection.
    fn desktop_do(
        &mut self,
        token: u64,
        id: RequestId,
        message: HostMessage,
        now: Instant,
    ) -> Result<Option<AgentMessage>, (ErrorCode, String)> {
        let d = self.desktop.as_mut().expect("checked by the caller");
        let io = |e: X11Error| (ErrorCode::Io, e.to_string());
        let (result, fatal) = match message {
            HostMessage::ClipboardGet { .. } => {
                let r = d.clipboard_get((token, id), now);
                let fatal = r.as_ref().err().is_some_and(X11Error::is_fatal);
                (r.map(|()| None).map_err(io), fatal)
            }
            HostMessage::ClipboardSet(c) => {
                let r = d.clipboard_set(c.data);
                let fatal = r.as_ref().err().is_some_and(X11Error::is_fatal);
                (r.map(|()| Some(AgentMessage::Done)).map_err(io), fatal)
            }
            HostMessage::DisplaySetMode { width, height } => {
                let r = d.set_mode(width, height);
                let fatal = r.as_ref().err().is_some_and(DisplayError::is_fatal);
                let r = r.map(|()| Some(AgentMessage::Done)).map_err(|e| {
                    let code = match e {
                        DisplayError::OutOfRange { .. } | DisplayError::NoTimings(..) => {
                            ErrorCode::InvalidArgument
                        }
                        DisplayError::NoOutput | DisplayError::NoCrtc(_) => ErrorCode::NotFound,
                        DisplayError::NoRandr => ErrorCode::NotSupported,
                        _ => ErrorCode::Io,
                    };
                    (code, format!("display mode {width}x{height}: {e}"))
                });
                (r, fatal)
            }
            _ => (Ok(None), false),
        };
        if fatal {
            self.desktop_lost = Some(match &result {
                Err((_, message)) => message.clone(),
                Ok(_) => "the X connection failed".into(),
            });
        }
        result
    }

    fn accept(&mut self, i: usize, now: Instant) {
        loop {
            match self.listeners[i].accept() {
                Ok(Some(io)) => {
                    self.add_conn(io, false);
                }
                Ok(None) => return,
                Err(e) => {
                    let name = self.listeners[i].name.clone();
                    self.log.log(now, format_args!("accepting on {name}: {e}"));
                    return;
                }
            }
        }
    }

    /// Reaps every exited child: exec requests get their status; others (as PID 1, orphans
    /// re-parented to us) are just collected.
    fn reap(&mut self, now: Instant) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        while matches!(self.sigchld.read(&mut info), Ok(n) if n > 0) {}
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into our local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                return;
            }
            if let Some((token, id)) = self.pids.remove(&pid) {
                if let Some(e) = self
                    .conns
                    .get_mut(&token)
                    .and_then(|c| c.execs.get_mut(&id))
                {
                    e.exited(exec::exit_status(status), now);
                }
            }
        }
    }

    fn read_conn(&mut self, token: u64, revents: i16, now: Instant) {
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        if revents & libc::POLLIN != 0 || revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            let mut buf = vec![0u8; 64 * 1024];
            while c.wants_input() {
                match c.io.read(&mut buf) {
                    Ok(0) => {
                        c.dead = true;
                        break;
                    }
                    Ok(n) => c.session.receive(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        c.dead = true;
                        break;
                    }
                }
            }
        }
        self.dispatch(token, now);
    }

    /// Handles every complete frame of connection `token`.
    fn dispatch(&mut self, token: u64, now: Instant) {
        loop {
            let Some(c) = self.conns.get_mut(&token) else {
                return;
            };
            let frame = match c.session.poll() {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(e) => {
                    self.log.log(now, format_args!("connection closed: {e}"));
                    c.flush();
                    c.dead = true;
                    return;
                }
            };
            self.handle(token, frame, now);
        }
    }

    fn handle(&mut self, token: u64, frame: Frame<HostMessage>, now: Instant) {
        use HostMessage as H;
        match &frame.message {
            H::ClipboardGet { .. } | H::ClipboardSet(_) | H::DisplaySetMode { .. } => {
                return self.desktop_request(token, frame, now)
            }
            H::Exec(_)
            | H::FilePut(_)
            | H::FileGet(_)
            | H::TimeSet { .. }
            | H::NetworkConfigure(_)
            | H::Power(_)
                if self.cfg.role == Role::Session =>
            {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.error(
                        frame.id,
                        ErrorCode::NotSupported,
                        "the agent's session part does only clipboard and display",
                    );
                }
                return;
            }
            _ => {}
        }
        let stage = self.stage();
        let cfg = &self.cfg;
        let Some(c) = self.conns.get_mut(&token) else {
            return;
        };
        let id = frame.id;
        match frame.message {
            H::Hello { .. } => {
                c.stage_sent = stage;
                c.reply(RequestId::CONNECTION, AgentMessage::Ready(stage));
            }
            H::ReadyQuery => c.reply(id, AgentMessage::Ready(stage)),
            H::Exec(req) => match Exec::spawn(&req, &cfg.accounts, now) {
                Ok(e) => {
                    self.pids.insert(e.pid, (token, id));
                    c.reply(id, AgentMessage::ExecStarted { pid: e.pid as u32 });
                    c.execs.insert(id, e);
                }
                Err(err) => c.error(id, err.code(), err),
            },
            H::ExecStdin(data) => {
                let len = data.len();
                match c.execs.get_mut(&id) {
                    Some(e) if e.stdin_open() => e.queue_stdin(&data),
                    Some(_) => {
                        c.session.consumed(id, len);
                        self.log.log(
                            now,
                            format_args!("exec {id}: stdin after its end, or with stdin off"),
                        );
                    }
                    // Late: the process exited and ExecExit is on its way.
                    None => {}
                }
            }
            H::ExecStdinEof => {
                if let Some(e) = c.execs.get_mut(&id) {
                    e.stdin_eof();
                }
            }
            H::ExecKill { signal } => {
                if let Some(e) = c.execs.get(&id) {
                    e.signal(signal.into());
                }
            }
            H::FilePut(req) => match Put::begin(&req, id, &cfg.accounts, cfg.max_file_size) {
                Ok(p) => {
                    c.puts.insert(id, p);
                }
                Err(err) => c.error(id, err.code(), err),
            },
            H::FileData(data) => {
                let len = data.len();
                if let Some(p) = c.puts.get_mut(&id) {
                    if let Err(err) = p.write(&data) {
                        c.puts.remove(&id);
                        c.error(id, err.code(), err);
                    }
                }
                c.session.consumed(id, len);
            }
            H::FileEnd => {
                if let Some(p) = c.puts.remove(&id) {
                    match p.finish() {
                        Ok(_) => c.reply(id, AgentMessage::Done),
                        Err(err) => c.error(id, err.code(), err),
                    }
                }
            }
            H::FileGet(req) => match Get::begin(&req, &cfg.accounts, cfg.max_file_size) {
                Ok((g, size, mode)) => {
                    c.reply(id, AgentMessage::FileInfo { size, mode });
                    c.gets.insert(id, g);
                }
                Err(err) => c.error(id, err.code(), err),
            },
            H::ClipboardGet { .. } | H::ClipboardSet(_) | H::DisplaySetMode { .. } => {
                unreachable!("desktop requests are handled before")
            }
            H::TimeSet { utc_ns } => match system::set_time(utc_ns) {
                Ok(()) => c.reply(id, AgentMessage::Done),
                Err(err) => c.error(id, err.code(), err),
            },
            H::NetworkConfigure(net) => {
                match system::configure_network(&net, &cfg.ip, &cfg.resolv_conf) {
                    Ok(()) => c.reply(id, AgentMessage::Done),
                    Err(err) => c.error(id, err.code(), err),
                }
            }
            H::Power(action) if cfg.initramfs => {
                // reboot(2) does not return: acknowledge first, act once the host read it.
                c.reply(id, AgentMessage::Done);
                self.power = Some((action, token, now + POWER_LINGER));
            }
            H::Power(action) => match system::power(action, false, &cfg.systemctl) {
                Ok(()) => c.reply(id, AgentMessage::Done),
                Err(err) => c.error(id, err.code(), err),
            },
            // The session consumes credit itself.
            H::Credit { .. } => {}
        }
    }

    /// Work not tied to one descriptor: child pipes, file reads, exits, timeouts, readiness,
    /// output, dead connections.
    fn service(&mut self, now: Instant) -> Result<(), ServerError> {
        if let Some(stage) = self.readiness.poll(now) {
            eprintln!("genos-agent: stage {}", stage.name());
        }
        self.service_desktop(now)?;
        if let Some(k) = self.kiosk.as_mut() {
            let was = k.running();
            match k.poll(now) {
                KioskState::Ended => {
                    return Err(ServerError::DisplayGone("the kiosk app exited".into()))
                }
                KioskState::Running if !was => {
                    eprintln!("genos-agent: the kiosk app runs under its compositor")
                }
                _ => {}
            }
        }
        self.service_uplink(now);
        if let Some(link) = self.link.as_mut() {
            link.flush();
            for (token, id) in link.expired(now) {
                if let Some(c) = self.conns.get_mut(&token) {
                    c.error(
                        id,
                        ErrorCode::Io,
                        format!(
                            "the desktop session part did not answer within {:?}",
                            crate::link::FORWARD_TIMEOUT
                        ),
                    );
                }
            }
        }
        if self.link.as_ref().is_some_and(|l| l.dead.is_some()) {
            self.drop_link(now);
        }
        let stage = self.stage();
        if self.serial_retry.is_some_and(|at| now >= at) {
            self.serial_retry = None;
            let path = self
                .cfg
                .serial
                .clone()
                .expect("retry only with a serial path");
            match transport::open_serial(&path) {
                Ok(io) => {
                    self.add_conn(io, true);
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    self.log
                        .log(now, format_args!("opening {}: {e}", path.display()));
                    self.serial_retry = Some(now + SERIAL_RETRY);
                }
            }
        }
        for c in self.conns.values_mut() {
            if c.session.is_open() && stage != c.stage_sent {
                c.stage_sent = stage;
                c.reply(RequestId::CONNECTION, AgentMessage::Ready(stage));
            }
            let ids: Vec<RequestId> = c.execs.keys().copied().collect();
            for id in ids {
                let done = c.execs.get_mut(&id).map_or(0, Exec::flush_stdin);
                c.session.consumed(id, done);
                let idle = c.pump_output(id, now, &mut self.log);
                let e = c.execs.get_mut(&id).expect("listed above");
                e.check_timeout(now);
                // Output the host has no credit for yet is never dropped: wait for credit.
                if let Some(status) = e.finished(now).filter(|_| idle) {
                    let timed_out = e.timed_out;
                    c.execs.remove(&id);
                    c.reply(id, AgentMessage::ExecExit { status, timed_out });
                }
            }
            let ids: Vec<RequestId> = c.gets.keys().copied().collect();
            for id in ids {
                for _ in 0..CHUNKS_PER_TURN {
                    let credit = c.session.send_credit(id).min(MAX_CHUNK_LEN as u64) as usize;
                    if credit == 0 {
                        break;
                    }
                    let g = c.gets.get_mut(&id).expect("listed above");
                    match g.next_chunk(credit) {
                        Ok(Some(data)) => c.reply(id, AgentMessage::FileData(data)),
                        Ok(None) => {
                            c.gets.remove(&id);
                            c.reply(id, AgentMessage::FileEnd);
                            break;
                        }
                        Err(err) => {
                            c.gets.remove(&id);
                            c.error(id, err.code(), err);
                            break;
                        }
                    }
                }
            }
            c.flush();
        }
        if let Some((action, token, at)) = self.power {
            let drained = self
                .conns
                .get(&token)
                .is_none_or(|c| c.dead || c.session.output().is_empty());
            let closed = self.conns.get(&token).is_none_or(|c| c.dead);
            if drained && (closed || now >= at) {
                if let Err(e) = system::power(action, true, &self.cfg.systemctl) {
                    eprintln!("genos-agent: {e}");
                    self.power = None;
                }
            }
        }
        let dead: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.dead)
            .map(|(&t, _)| t)
            .collect();
        for token in dead {
            let c = self.conns.remove(&token).expect("listed above");
            // The host that asked for these is gone: nobody would see their results.
            for e in c.execs.values() {
                e.signal(libc::SIGKILL);
            }
            if c.serial {
                self.serial_retry = Some(now + SERIAL_RETRY);
            }
            if let Some(d) = self.desktop.as_mut() {
                d.forget(token);
            }
            if let Some(l) = self.link.as_mut() {
                l.forget(token);
            }
            if self.uplink_token == Some(token) {
                self.uplink_token = None;
                // Closed before its Hello: the system agent refused this part (not root
                // nor its session user); asking every second would only fill the log.
                let (retry, why) = if c.session.is_open() {
                    (UPLINK_RETRY, "closed the session connection")
                } else {
                    (
                        UPLINK_REFUSED_RETRY,
                        "refused this session part (see its log)",
                    )
                };
                self.uplink_retry = Some(now + retry);
                eprintln!("genos-agent: the system agent {why}; trying again in {retry:?}");
            }
        }
        Ok(())
    }

    /// Everything the X connection has: answers, clipboard changes, the session's window.
    fn service_desktop(&mut self, now: Instant) -> Result<(), ServerError> {
        let Some(d) = self.desktop.as_mut() else {
            return Ok(());
        };
        let processed = match self.desktop_lost.take() {
            Some(why) => Err(why),
            None => d.process(now).map_err(|e| e.to_string()),
        };
        let events = match processed {
            Ok(events) => events,
            Err(e) => {
                self.desktop = None;
                if self.cfg.role == Role::Session {
                    return Err(ServerError::DisplayGone(e));
                }
                self.log.log(now, format_args!("X display lost: {e}"));
                return Ok(());
            }
        };
        for event in events {
            match event {
                DesktopEvent::Clipboard {
                    to: (token, id),
                    result,
                } => {
                    let Some(c) = self.conns.get_mut(&token) else {
                        continue;
                    };
                    match result {
                        Ok(data) => c.reply(
                            id,
                            AgentMessage::Clipboard(proto::agent::ClipboardContent {
                                mime: proto::agent::MIME_TEXT_UTF8.into(),
                                data,
                            }),
                        ),
                        Err(e) => {
                            let code = match e {
                                GetError::Empty => ErrorCode::NotFound,
                                GetError::NoText | GetError::NotUtf8 => ErrorCode::NotSupported,
                                GetError::Timeout => ErrorCode::Io,
                                GetError::Transfer(_) => ErrorCode::TooLarge,
                            };
                            c.error(id, code, e);
                        }
                    }
                }
                DesktopEvent::Changed(data) => {
                    self.relay_changed(&proto::agent::ClipboardContent {
                        mime: proto::agent::MIME_TEXT_UTF8.into(),
                        data,
                    })
                }
                DesktopEvent::SessionReady => {
                    eprintln!("genos-agent: the desktop session's first window is mapped")
                }
                DesktopEvent::Log(line) => self.log.log(now, format_args!("{line}")),
            }
        }
        Ok(())
    }

    /// Session role: keeps a connection to the system agent, retrying while it is away.
    fn service_uplink(&mut self, now: Instant) {
        if self.uplink_retry.is_none_or(|at| now < at) {
            return;
        }
        let path = self.cfg.uplink.clone().expect("retry only with an uplink");
        match transport::connect_unix(&path) {
            Ok(io) => {
                self.uplink_retry = None;
                self.uplink_error = None;
                eprintln!(
                    "genos-agent: connected to the system agent at {}",
                    path.display()
                );
                let token = self.add_conn(io, false);
                self.uplink_token = Some(token);
            }
            Err(e) => {
                let message = format!("system agent at {}: {e}; retrying", path.display());
                if self.uplink_error.as_deref() != Some(&message) {
                    eprintln!("genos-agent: {message}");
                    self.uplink_error = Some(message);
                }
                self.uplink_retry = Some(now + UPLINK_RETRY);
            }
        }
    }
}
