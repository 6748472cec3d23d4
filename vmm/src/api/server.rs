//! The control API server: one thread serving HTTP/1.1 on a Unix socket.
//!
//! The thread multiplexes up to [`MAX_CONNECTIONS`] non-blocking connections with
//! `poll(2)` and serves requests one at a time: parse ([`super::http`]), route
//! ([`super::router`]), forward the action to the VMM's main thread
//! ([`crate::rpc::ApiSender::call`]), write the response. Each connection answers its
//! requests in order (pipelining works); a parse error is answered and the connection
//! closed. No input ends the thread: every error is confined to its connection.
//!
//! Slow or silent clients cannot hold the server: a request must arrive whole within
//! [`HEADER_TIMEOUT`] of its first byte (a new connection's first request, of the accept),
//! or the connection is answered `408` and closed; and at most [`MAX_CONNECTIONS`] are
//! kept, a newcomer replacing the one quiet the longest. A keep-alive connection idle
//! between requests has no deadline (hostd keeps one per VM for input).
//!
//! `GET /framebuffer` answers with two descriptors in an `SCM_RIGHTS` control message
//! attached to the first bytes of the response: `[memfd, flush_eventfd]`. A client reads
//! the response with `recvmsg(2)` (room for two fds) and keeps reading plain bytes until
//! the body is complete. `GET /input/socket` passes one descriptor the same way: the
//! client's end of a new raw input channel.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::http::{
    parse_request, Limits, ParseError, Parsed, Request, Response, CONTINUE_RESPONSE,
};
use super::router::route;
use crate::rpc::{ApiSender, FramebufferFds, VmmResponse};

/// Most connections kept at once. A new client beyond that replaces the connection that
/// has been quiet the longest, so idle or stalled clients cannot lock others out.
pub const MAX_CONNECTIONS: usize = 16;

/// Time a client has to send a whole request (head and body), counted from its first byte,
/// or from the accept for a connection's first request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The socket path exists and is not a socket.
    #[error("api socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is listening on the socket path.
    #[error("api socket {0}: another process is listening on it")]
    InUse(PathBuf),
    /// Removing a stale socket, binding or configuring the listener failed.
    #[error("api socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Spawning the server thread failed.
    #[error("cannot start the api thread: {0}")]
    Spawn(#[source] io::Error),
}

/// Binds the API socket at `path`. A stale socket left by a dead VMM is replaced; a live
/// one (something accepts connections) or a non-socket file is an error.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let bind_error = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServerError::NotASocket(path.to_owned()))
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    // Whoever can connect controls the VM: owner only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    Ok(listener)
}

/// Spawns the server thread (named `api`) on an already bound listener.
pub fn spawn(listener: UnixListener, sender: ApiSender) -> Result<JoinHandle<()>, ServerError> {
    listener.set_nonblocking(true).map_err(ServerError::Spawn)?;
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || Server::new(listener, sender).run())
        .map_err(ServerError::Spawn)
}

/// [`bind`] then [`spawn`]: what the VMM calls for `--api-sock PATH`.
pub fn start(path: &Path, sender: ApiSender) -> Result<JoinHandle<()>, ServerError> {
    spawn(bind(path)?, sender)
}

/// One client connection.
struct Connection {
    stream: UnixStream,
    /// Bytes received and not yet parsed.
    input: Vec<u8>,
    /// Encoded response not yet written, from `written`.
    output: Vec<u8>,
    written: usize,
    /// Descriptors to attach to the first bytes of `output`.
    fds: Vec<OwnedFd>,
    /// Whether `100 Continue` was sent for the request in progress.
    continue_sent: bool,
    /// Close once `output` is written.
    close_after_write: bool,
    /// `output` answers an action the VMM handled (see [`ApiSender::response_sent`]).
    answers_call: bool,
    /// The peer finished sending (EOF): answer what is buffered, then close.
    peer_closed: bool,
    /// A fatal error occurred, or the connection is finished: drop it.
    dead: bool,
    /// Last time bytes moved in either direction.
    last_active: Instant,
    /// When the request being received started; `None` between requests.
    request_started: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Self {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            written: 0,
            fds: Vec::new(),
            continue_sent: false,
            close_after_write: false,
            answers_call: false,
            peer_closed: false,
            dead: false,
            last_active: Instant::now(),
            request_started: Some(Instant::now()),
        }
    }

    /// When the request being received must be complete, if one is being received.
    fn deadline(&self) -> Option<Instant> {
        if self.dead || self.wants_write() {
            return None;
        }
        self.request_started.map(|t| t + HEADER_TIMEOUT)
    }

    fn wants_write(&self) -> bool {
        self.written < self.output.len()
    }

    fn wants_read(&self) -> bool {
        !self.wants_write() && !self.close_after_write && !self.peer_closed && !self.dead
    }
}

struct Server {
    listener: UnixListener,
    sender: ApiSender,
    limits: Limits,
    connections: Vec<Connection>,
}

impl Server {
    fn new(listener: UnixListener, sender: ApiSender) -> Self {
        Self {
            listener,
            sender,
            limits: Limits::default(),
            connections: Vec::new(),
        }
    }

    fn run(mut self) {
        // Before the first connection: the API thread parses what clients send.
        crate::sandbox::runtime::enter_or_exit(crate::sandbox::seccomp::ThreadRole::Api);
        let mut pollfds: Vec<libc::pollfd> = Vec::with_capacity(MAX_CONNECTIONS + 1);
        loop {
            pollfds.clear();
            pollfds.push(libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            for conn in &self.connections {
                let mut events = 0;
                if conn.wants_read() {
                    events |= libc::POLLIN;
                }
                if conn.wants_write() {
                    events |= libc::POLLOUT;
                }
                pollfds.push(libc::pollfd {
                    fd: conn.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let timeout = self
                .connections
                .iter()
                .filter_map(Connection::deadline)
                .min()
                .map_or(-1, |deadline| {
                    let left = deadline.saturating_duration_since(Instant::now());
                    // Rounded up: waking a little late is fine, spinning early is not.
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                });
            // SAFETY: `pollfds` is a valid, initialised array of `pollfds.len()` entries
            // that outlives the call; poll only writes the `revents` fields.
            let ret =
                unsafe { libc::poll(pollfds.as_mut_ptr(), pollfds.len() as libc::nfds_t, timeout) };
            if ret < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!("api: poll failed: {err}");
                return;
            }
            let Server {
                sender,
                limits,
                connections,
                ..
            } = &mut self;
            for (conn, pfd) in connections.iter_mut().zip(&pollfds[1..]) {
                let revents = pfd.revents;
                // A hang-up or error with output pending: the write fails and drops it.
                if revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0 {
                    flush(sender, conn);
                }
                if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
                    && conn.wants_read()
                {
                    receive(conn, limits);
                }
                serve(sender, limits, conn);
                expire(sender, conn, Instant::now());
                if conn.peer_closed && !conn.wants_write() {
                    conn.dead = true;
                }
            }
            self.close_finished();
            if pollfds[0].revents & libc::POLLIN != 0 {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.connections.len() >= MAX_CONNECTIONS {
                        self.evict_quietest();
                    }
                    self.connections.push(Connection::new(stream));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // E.g. EMFILE. The listener stays readable; pause so that the loop does
                    // not spin, and keep serving existing connections.
                    tracing::warn!("api: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    return;
                }
            }
        }
    }

    /// Drops the connection that has been quiet the longest.
    fn evict_quietest(&mut self) {
        let Some(quietest) = self
            .connections
            .iter()
            .enumerate()
            .min_by_key(|(_, conn)| conn.last_active)
            .map(|(i, _)| i)
        else {
            return;
        };
        let conn = self.connections.swap_remove(quietest);
        if conn.answers_call {
            self.sender.response_sent();
        }
    }

    fn close_finished(&mut self) {
        let sender = &self.sender;
        self.connections.retain_mut(|conn| {
            if conn.dead && conn.answers_call {
                // The answer cannot be delivered; do not keep the VMM waiting for it.
                conn.answers_call = false;
                sender.response_sent();
            }
            !conn.dead
        });
    }
}

/// Reads what is available into the connection's input buffer.
fn receive(conn: &mut Connection, limits: &Limits) {
    // One request's worth: the parser rejects anything longer, so more is never needed
    // before the buffered request is answered.
    let cap = limits.max_head_bytes + limits.max_body_bytes;
    let mut chunk = [0u8; 4096];
    loop {
        match conn.stream.read(&mut chunk) {
            Ok(0) => {
                conn.peer_closed = true;
                return;
            }
            Ok(n) => {
                conn.input.extend_from_slice(&chunk[..n]);
                conn.last_active = Instant::now();
                conn.request_started.get_or_insert(conn.last_active);
                if n < chunk.len() || conn.input.len() >= cap {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                conn.dead = true;
                return;
            }
        }
    }
}

/// Answers buffered requests until one needs more bytes or a response is pending.
fn serve(sender: &ApiSender, limits: &Limits, conn: &mut Connection) {
    while !conn.wants_write() && !conn.close_after_write && !conn.dead && !conn.input.is_empty() {
        match parse_request(&conn.input, limits) {
            Ok(Parsed::Partial { expect_continue }) => {
                if expect_continue && !conn.continue_sent {
                    conn.continue_sent = true;
                    conn.output = CONTINUE_RESPONSE.to_vec();
                    conn.written = 0;
                    flush(sender, conn);
                }
                return;
            }
            Ok(Parsed::Complete { request, consumed }) => {
                conn.input.drain(..consumed);
                conn.continue_sent = false;
                // A pipelined request already started; otherwise none until bytes come.
                conn.request_started = (!conn.input.is_empty()).then(Instant::now);
                let (mut response, fds, answered) = respond(sender, &request);
                response.close |= !request.keep_alive;
                queue(conn, response, fds, answered);
            }
            Err(e) => {
                conn.input.clear();
                queue(conn, parse_error_response(&e), Vec::new(), false);
            }
        }
        flush(sender, conn);
    }
}

/// Answers `408` and closes a connection whose request did not arrive whole in time. The
/// answer is best effort: a client that does not read it is dropped all the same.
fn expire(sender: &ApiSender, conn: &mut Connection, now: Instant) {
    if conn.deadline().is_none_or(|deadline| now < deadline) {
        return;
    }
    conn.input.clear();
    let mut response = Response::error(
        408,
        &format!("request not complete within {HEADER_TIMEOUT:?}"),
    );
    response.close = true;
    queue(conn, response, Vec::new(), false);
    flush(sender, conn);
    conn.dead = true;
}

/// Routes and runs one request; returns the response, any fds to pass, and whether
/// the VMM handled an action for it.
fn respond(sender: &ApiSender, request: &Request) -> (Response, Vec<OwnedFd>, bool) {
    let action = match route(request) {
        Ok(action) => action,
        Err(e) => {
            let mut response = Response::error(e.status, &e.reason);
            response.allow = e.allow;
            return (response, Vec::new(), false);
        }
    };
    let (response, fds) = match sender.call(action) {
        Ok(VmmResponse::Empty) => (Response::no_content(), Vec::new()),
        Ok(VmmResponse::Description(d)) => (Response::json(200, &d), Vec::new()),
        Ok(VmmResponse::Metrics(m)) => (Response::json(200, &m), Vec::new()),
        Ok(VmmResponse::Framebuffer(fds)) => framebuffer_response(fds),
        Ok(VmmResponse::InputSocket(fd)) => (
            Response::json(200, &vmm_api::input_socket::InputSocketHandoff::current()),
            vec![fd],
        ),
        Err(e) => (Response::error(e.status(), &e.to_string()), Vec::new()),
    };
    (response, fds, true)
}

fn queue(conn: &mut Connection, response: Response, fds: Vec<OwnedFd>, answers_call: bool) {
    conn.close_after_write = response.close;
    conn.output = response.encode();
    conn.written = 0;
    conn.fds = fds;
    conn.answers_call = answers_call;
}

/// Writes as much pending output as the socket takes.
fn flush(sender: &ApiSender, conn: &mut Connection) {
    while conn.wants_write() && !conn.dead {
        let pending = &conn.output[conn.written..];
        let fds: Vec<RawFd> = conn.fds.iter().map(AsRawFd::as_raw_fd).collect();
        // sendmsg with MSG_NOSIGNAL: a client that went away is an EPIPE for its
        // connection, never a SIGPIPE for the VMM, whatever the signal disposition.
        let result = conn
            .stream
            .send_with_fds(&[pending], &fds)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()));
        match result {
            Ok(0) => conn.dead = true,
            Ok(n) => {
                conn.written += n;
                conn.last_active = Instant::now();
                // The descriptors went with these bytes; close our copies.
                conn.fds.clear();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => conn.dead = true,
        }
    }
    if !conn.wants_write() && conn.answers_call {
        conn.answers_call = false;
        sender.response_sent();
    }
    if !conn.wants_write() && conn.close_after_write {
        conn.dead = true;
    }
}

fn parse_error_response(e: &ParseError) -> Response {
    let mut response = Response::error(e.status(), &e.to_string());
    response.close = true;
    response
}

/// Body of a `GET /framebuffer` answer: the memfd's size and the order of the fds.
fn framebuffer_response(fds: FramebufferFds) -> (Response, Vec<OwnedFd>) {
    let size = fds
        .memfd
        .try_clone()
        .map(std::fs::File::from)
        .and_then(|file| file.metadata())
        .map(|meta| meta.len());
    match size {
        Ok(size) => (
            Response::json(200, &vmm_api::FramebufferHandoff::new(size)),
            vec![fds.memfd, fds.flush_eventfd],
        ),
        Err(e) => (
            Response::error(500, &format!("cannot stat the framebuffer memfd: {e}")),
            Vec::new(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn request_arriving_with_eof_is_answered_before_closing() {
        let (mut client, server_end) = UnixStream::pair().unwrap();
        server_end.set_nonblocking(true).unwrap();
        let mut conn = Connection::new(server_end);
        // Exactly one read chunk, so that the same receive() also sees the EOF.
        let head = "GET /nope HTTP/1.1\r\nX-Pad: ";
        let pad = "a".repeat(4096 - head.len() - 4);
        client
            .write_all(format!("{head}{pad}\r\n\r\n").as_bytes())
            .unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let (sender, _receiver) = crate::rpc::channel().unwrap();

        receive(&mut conn, &Limits::default());
        assert!(conn.peer_closed);
        assert_eq!(conn.input.len(), 4096);
        serve(&sender, &Limits::default(), &mut conn);
        assert!(!conn.wants_write(), "the answer is written");
        drop(conn);

        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{answer:?}"
        );
    }

    #[test]
    fn receive_stops_buffering_at_one_request_worth() {
        let (mut client, server_end) = UnixStream::pair().unwrap();
        server_end.set_nonblocking(true).unwrap();
        let mut conn = Connection::new(server_end);
        let limits = Limits {
            max_head_bytes: 1024,
            max_headers: 8,
            max_body_bytes: 1024,
        };
        let writer = std::thread::spawn(move || {
            let _ = client.write_all(&vec![b'x'; 64 * 1024]);
        });
        receive(&mut conn, &limits);
        assert!(conn.input.len() <= 2048 + 4096, "{}", conn.input.len());
        drop(conn);
        writer.join().unwrap();
    }
}
