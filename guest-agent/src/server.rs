//! The agent's event loop: one thread, poll(2) over the listeners, the connections, the
//! children's pipes and a signalfd for SIGCHLD. Each connection has its own
//! [`AgentSession`]; requests on it are dispatched here to [`Exec`], [`Put`], [`Get`] and
//! [`crate::system`].
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
use crate::ready::Readiness;
use crate::system;
use crate::transport::{self, Listener};
use crate::users::Accounts;

/// Name and version announced in the Hello.
pub const AGENT_NAME: &str = concat!("genos-agent ", env!("CARGO_PKG_VERSION"));
/// What this build can do. Clipboard and display need an X server: not in this build.
pub const FEATURES: Features = Features::from_bits_retain(
    Features::EXEC.bits()
        | Features::FILES.bits()
        | Features::TIME.bits()
        | Features::NETWORK.bits()
        | Features::POWER.bits(),
);
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
    fn new(io: File, serial: bool) -> Self {
        Conn {
            io,
            session: AgentSession::new(AGENT_NAME, FEATURES),
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
        if listeners.is_empty() && cfg.serial.is_none() {
            return Err(ServerError::NoTransport);
        }
        for l in &listeners {
            eprintln!("genos-agent: listening on {}", l.name);
        }
        let now = Instant::now();
        Ok(Server {
            readiness: Readiness::new(cfg.initramfs, cfg.systemctl.clone(), now),
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

    fn add_conn(&mut self, io: File, serial: bool) {
        self.next_token += 1;
        self.conns.insert(self.next_token, Conn::new(io, serial));
    }

    /// One poll and everything it made ready.
    pub fn turn(&mut self) -> Result<(), ServerError> {
        #[derive(Clone, Copy)]
        enum Slot {
            SigChld,
            Listener(usize),
            Conn(u64),
            Wake,
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
                Slot::Wake => {}
            }
        }
        self.service(now);
        Ok(())
    }

    fn accept(&mut self, i: usize, now: Instant) {
        loop {
            match self.listeners[i].accept() {
                Ok(Some(io)) => self.add_conn(io, false),
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
        let stage = self.readiness.stage();
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
            H::ClipboardGet { .. } | H::ClipboardSet(_) => c.error(
                id,
                ErrorCode::NotSupported,
                "the clipboard is not supported by this agent build (no X11 support)",
            ),
            H::DisplaySetMode { .. } => c.error(
                id,
                ErrorCode::NotSupported,
                "display modes are not supported by this agent build (no X11 RandR support)",
            ),
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
    fn service(&mut self, now: Instant) {
        if let Some(stage) = self.readiness.poll(now) {
            eprintln!("genos-agent: stage {}", stage.name());
        }
        let stage = self.readiness.stage();
        if self.serial_retry.is_some_and(|at| now >= at) {
            self.serial_retry = None;
            let path = self
                .cfg
                .serial
                .clone()
                .expect("retry only with a serial path");
            match transport::open_serial(&path) {
                Ok(io) => self.add_conn(io, true),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => {
                    self.log
                        .log(now, format_args!("opening {}: {e}", path.display()));
                    self.serial_retry = Some(now + SERIAL_RETRY);
                }
            }
        }
        for c in self.conns.values_mut() {
            if c.session.is_open() && stage > c.stage_sent {
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
        }
    }
}
