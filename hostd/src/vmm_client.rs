//! hostd's one client for a genos-vmm control socket: the orchestrator (configure, start,
//! describe, stop) and the stream source (framebuffer, input, display) both go through it.
//!
//! Requests and answers are the [`vmm_api`] contract's types ([`Request`], decoded with
//! [`Request::decode`]); this module is the transport: blocking HTTP/1.1 on one keep-alive
//! Unix connection, because `GET /framebuffer` passes descriptors (SCM_RIGHTS) with its
//! answer and the input thread sends one request after another. Async callers use [`run`],
//! which runs the exchange on tokio's blocking pool under a hard deadline.
//!
//! The VMM is not trusted (a guest may have taken it over): the socket is reached through
//! [`VmmSocket`] (no link followed, peer uid checked), every request has a deadline, no
//! response head past [`MAX_HEAD`] nor body past [`MAX_VMM_BODY`] is read, and anything
//! the VMM never sends (chunked bodies, bytes after the answer) ends the connection.

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use framebuffer::ReaderFds;
use serde::de::DeserializeOwned;
use vmm_api::input_socket::InputSocketHandoff;
use vmm_api::{FramebufferHandoff, Request, ResponseError, VmDescription, VmMetrics};

use crate::uds::{PeerCred, UdsError, VmmSocket};

/// Largest response body read from a VMM. The biggest legitimate answer, `GET /metrics`,
/// is a few KiB.
pub const MAX_VMM_BODY: usize = 1024 * 1024;
/// Largest response head (status line and headers) read from a VMM.
pub const MAX_HEAD: usize = 16 * 1024;

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmClientError {
    #[error("cannot connect to the VMM API socket")]
    Connect(#[source] UdsError),
    #[error("VMM API I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the VMM did not answer {request} within {secs} s")]
    Timeout { request: String, secs: u64 },
    #[error("malformed VMM API response: {0}")]
    Malformed(String),
    #[error("the VMM sent a response head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the VMM sent a response body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the VMM closed the connection mid-response")]
    Closed,
    #[error(transparent)]
    Answer(#[from] ResponseError),
    #[error("VMM passed {0} file descriptors with GET /framebuffer, expected 2")]
    Fds(usize),
    #[error("VMM passed {0} file descriptors with GET /input/socket, expected 1")]
    InputSocketFds(usize),
    #[error("the VMM's input socket carries another layout ({0:?})")]
    InputSocketLayout(InputSocketHandoff),
    #[error("the VMM API task failed")]
    Task(#[source] tokio::task::JoinError),
}

type Result<T, E = VmmClientError> = std::result::Result<T, E>;

/// One answer: its status and body, before [`Request::decode`] gives it a type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// One keep-alive connection to a VMM's control API.
#[derive(Debug)]
pub struct VmmClient {
    stream: UnixStream,
    peer: PeerCred,
    timeout: Duration,
}

impl VmmClient {
    /// Connects (links not followed, peer uid checked); each request then has `timeout`.
    pub fn connect(sock: &VmmSocket, timeout: Duration) -> Result<Self> {
        let (stream, peer) = sock.connect().map_err(VmmClientError::Connect)?;
        Ok(Self {
            stream,
            peer,
            timeout,
        })
    }

    /// Who serves the socket (SO_PEERCRED at connect).
    pub fn peer(&self) -> PeerCred {
        self.peer
    }

    /// Sends `request` and reads its answer, whatever its status.
    pub fn call(&mut self, request: &Request) -> Result<Answer> {
        Ok(self.exchange(request)?.0)
    }

    /// Sends `request` and checks its answer is the success status (for requests that
    /// answer with no body: configure, actions, input, display).
    pub fn send(&mut self, request: &Request) -> Result<()> {
        let answer = self.call(request)?;
        Ok(request.check(answer.status, &answer.body)?)
    }

    /// Sends `request` and decodes its success body as `T`.
    pub fn fetch<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T> {
        let answer = self.call(request)?;
        Ok(request.decode(answer.status, &answer.body)?)
    }

    /// `GET /vm`.
    pub fn describe(&mut self) -> Result<VmDescription> {
        self.fetch(&Request::Describe)
    }

    /// `GET /metrics`.
    pub fn metrics(&mut self) -> Result<VmMetrics> {
        self.fetch(&Request::Metrics)
    }

    /// `GET /framebuffer`: the shared framebuffer's memfd and this client's flush eventfd.
    pub fn framebuffer(&mut self) -> Result<ReaderFds> {
        let request = Request::Framebuffer;
        let (answer, mut fds) = self.exchange(&request)?;
        let handoff: FramebufferHandoff = request.decode(answer.status, &answer.body)?;
        if fds.len() != 2 || handoff.fds != FramebufferHandoff::FD_ORDER {
            return Err(VmmClientError::Fds(fds.len()));
        }
        let notify = fds.pop().expect("two fds");
        let memfd = fds.pop().expect("two fds");
        Ok(ReaderFds { memfd, notify })
    }

    /// `GET /input/socket`: this client's end of the VMM's raw input channel (a
    /// `SOCK_SEQPACKET` socket; [`vmm_api::input_socket`] is its layout), checked to carry
    /// the layout this hostd speaks.
    pub fn input_socket(&mut self) -> Result<OwnedFd> {
        let request = Request::InputSocket;
        let (answer, mut fds) = self.exchange(&request)?;
        let handoff: InputSocketHandoff = request.decode(answer.status, &answer.body)?;
        if fds.len() != 1 {
            return Err(VmmClientError::InputSocketFds(fds.len()));
        }
        if !handoff.is_current() {
            return Err(VmmClientError::InputSocketLayout(handoff));
        }
        Ok(fds.pop().expect("one fd"))
    }

    /// One request and its answer, with the descriptors passed along with it.
    fn exchange(&mut self, request: &Request) -> Result<(Answer, Vec<OwnedFd>)> {
        let deadline = Deadline::new(request, self.timeout);
        let body = request.body();
        let mut bytes = format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\n",
            request.method().as_str(),
            request.path()
        );
        if let Some(body) = &body {
            bytes.push_str("Content-Type: application/json\r\n");
            bytes.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        bytes.push_str("\r\n");
        let mut bytes = bytes.into_bytes();
        bytes.extend_from_slice(body.as_deref().unwrap_or_default());
        self.stream.set_write_timeout(Some(deadline.remaining()?))?;
        self.stream.write_all(&bytes).map_err(|e| deadline.io(e))?;
        self.read_answer(&deadline)
    }

    /// Reads one answer: head, then exactly Content-Length body bytes.
    fn read_answer(&mut self, deadline: &Deadline) -> Result<(Answer, Vec<OwnedFd>)> {
        let mut buf = Vec::new();
        let mut fds = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_len, status, body_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut parsed = httparse::Response::new(&mut headers);
            match parsed.parse(&buf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let status = parsed.code.unwrap_or_default();
                    break (head_len, status, body_length(parsed.headers)?);
                }
                Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
                Ok(httparse::Status::Partial) => return Err(VmmClientError::HeadTooLarge),
                Err(e) => return Err(VmmClientError::Malformed(e.to_string())),
            }
            let n = self.read(&mut chunk, deadline, &mut fds)?;
            buf.extend_from_slice(&chunk[..n]);
        };
        if body_len > MAX_VMM_BODY {
            return Err(VmmClientError::BodyTooLarge {
                limit: MAX_VMM_BODY,
            });
        }
        let end = head_len + body_len;
        while buf.len() < end {
            let n = self.read(&mut chunk, deadline, &mut fds)?;
            buf.extend_from_slice(&chunk[..n]);
        }
        // Requests are never pipelined, so nothing may follow the body.
        if buf.len() > end {
            return Err(VmmClientError::Malformed(
                "unexpected bytes after the response".into(),
            ));
        }
        let body = buf.split_off(head_len);
        Ok((Answer { status, body }, fds))
    }

    /// One read before the deadline; descriptors passed with the bytes go to `fds`.
    fn read(
        &mut self,
        chunk: &mut [u8],
        deadline: &Deadline,
        fds: &mut Vec<OwnedFd>,
    ) -> Result<usize> {
        self.stream.set_read_timeout(Some(deadline.remaining()?))?;
        let n = recv_with_fds(&self.stream, chunk, fds).map_err(|e| deadline.io(e))?;
        if n == 0 {
            return Err(VmmClientError::Closed);
        }
        Ok(n)
    }
}

/// When the current request must be answered by.
struct Deadline {
    at: Instant,
    request: String,
    timeout: Duration,
}

impl Deadline {
    fn new(request: &Request, timeout: Duration) -> Self {
        Self {
            at: Instant::now() + timeout,
            request: request.to_string(),
            timeout,
        }
    }

    fn expired(&self) -> VmmClientError {
        VmmClientError::Timeout {
            request: self.request.clone(),
            secs: self.timeout.as_secs(),
        }
    }

    /// Time left (never zero, which would mean "no timeout" to the socket).
    fn remaining(&self) -> Result<Duration> {
        match self.at.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(self.expired()),
        }
    }

    /// An I/O error, or the deadline if the socket timed out.
    fn io(&self, e: std::io::Error) -> VmmClientError {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => self.expired(),
            _ => VmmClientError::Io(e),
        }
    }
}

/// The body's length: `Content-Length`, 0 without one. The VMM never sends chunked bodies,
/// so a `Transfer-Encoding` is refused rather than decoded.
fn body_length(headers: &[httparse::Header<'_>]) -> Result<usize> {
    if headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(VmmClientError::Malformed(
            "Transfer-Encoding is not part of the VMM API".into(),
        ));
    }
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map_or(Ok(0), |h| {
            std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| VmmClientError::Malformed("bad Content-Length".into()))
        })
}

/// `recvmsg(2)` into `buf`, taking ownership of any descriptors passed with SCM_RIGHTS.
fn recv_with_fds(
    stream: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> std::io::Result<usize> {
    // Room for a few descriptors more than the two expected, so extras are seen (and
    // closed) instead of truncating the control message; u64s keep it cmsghdr-aligned.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid (null pointers, zero lengths); fields set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: `msg` points at `iov` (into `buf`) and `control`, both live and writable
        // for the call's duration with the lengths given.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: `msg` was filled in by recvmsg; the CMSG_* macros walk its control buffer
    // within `msg_controllen`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR return null or a header inside `control`.
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is plain arithmetic.
            let data_len =
                (hdr.cmsg_len as usize).saturating_sub(unsafe { libc::CMSG_LEN(0) } as usize);
            // SAFETY: the data of this header lies inside `control`.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..data_len / std::mem::size_of::<libc::c_int>() {
                // SAFETY: `i` indexes within the header's data; it may be unaligned.
                let fd = unsafe { data.cast::<libc::c_int>().add(i).read_unaligned() };
                // SAFETY: SCM_RIGHTS installed `fd` in this process for us alone.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        // SAFETY: as for CMSG_FIRSTHDR.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(std::io::Error::other(
            "file descriptors were truncated in transit",
        ));
    }
    Ok(n)
}

/// Connects to `sock` and runs `exchange` on tokio's blocking pool, each request with
/// `timeout`; the whole, connection included, ends by `timeout` after the first request
/// would (a VMM that never accepts cannot hold the caller).
pub async fn run<T, F>(sock: &VmmSocket, timeout: Duration, exchange: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&mut VmmClient) -> Result<T> + Send + 'static,
{
    let sock = sock.clone();
    let task = tokio::task::spawn_blocking(move || {
        let mut client = VmmClient::connect(&sock, timeout)?;
        exchange(&mut client)
    });
    match tokio::time::timeout(timeout, task).await {
        Ok(joined) => joined.map_err(VmmClientError::Task)?,
        Err(_) => Err(VmmClientError::Timeout {
            request: "the exchange".into(),
            secs: timeout.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use vmm_api::{ErrorBody, LifecycleAction, VmState};

    /// Reads one request head from `s`.
    fn read_head(s: &mut UnixStream) {
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if s.read(&mut b).unwrap_or(0) == 0 {
                return;
            }
            head.push(b[0]);
        }
    }

    /// A fake VMM at `path` answering every connection with `head`, then body bytes for as
    /// long as the client reads them; counts the body bytes it managed to send.
    fn flooding_server(path: &Path, head: &'static str, chunked: bool) -> Arc<AtomicU64> {
        let listener = UnixListener::bind(path).unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = sent.clone();
        std::thread::spawn(move || {
            for s in listener.incoming() {
                let Ok(mut s) = s else { return };
                read_head(&mut s);
                if s.write_all(head.as_bytes()).is_err() {
                    continue;
                }
                let data = vec![b'x'; 64 * 1024];
                let chunk = format!("{:x}\r\n", data.len());
                loop {
                    let ok = if chunked {
                        s.write_all(chunk.as_bytes()).is_ok()
                            && s.write_all(&data).is_ok()
                            && s.write_all(b"\r\n").is_ok()
                    } else {
                        s.write_all(&data).is_ok()
                    };
                    if !ok {
                        break;
                    }
                    counter.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
            }
        });
        sent
    }

    /// A fake VMM at `path` answering each request on one connection with the next of
    /// `answers` (status, body).
    fn answering_server(path: &Path, answers: Vec<(u16, String)>) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            for (status, body) in answers {
                read_head(&mut s);
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                if s.write_all(head.as_bytes()).is_err() || s.write_all(body.as_bytes()).is_err() {
                    return;
                }
            }
        });
    }

    #[tokio::test]
    async fn a_vmm_body_past_the_bound_is_refused_without_reading_it() {
        for (head, chunked) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 2147483648\r\n\r\n",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                true,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("api.sock");
            let sent = flooding_server(&path, head, chunked);

            let r = run(&VmmSocket::unjailed(&path), Duration::from_secs(60), |c| {
                c.metrics()
            })
            .await;

            let refused = if chunked {
                matches!(&r, Err(VmmClientError::Malformed(m)) if m.contains("Transfer-Encoding"))
            } else {
                matches!(r, Err(VmmClientError::BodyTooLarge { limit }) if limit == MAX_VMM_BODY)
            };
            assert!(refused, "{head:?}: {r:?}");
            // Stopped at the bound: the server could not push much more than that (socket
            // buffers) before hostd hung up.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let n = sent.load(Ordering::Relaxed);
            assert!(n < 16 * MAX_VMM_BODY as u64, "{head:?}: {n} bytes read");
        }
    }

    /// A fake VMM at `path` that reads one request, writes `reply` in one write and keeps
    /// the connection open for `linger`.
    fn scripted_server(path: &Path, reply: &'static [u8], linger: Duration) {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            read_head(&mut s);
            let _ = s.write_all(reply);
            std::thread::sleep(linger);
        });
    }

    #[test]
    fn a_vmm_that_stalls_mid_answer_times_out_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        scripted_server(
            &path,
            b"HTTP/1.1 200 OK\r\nContent-Le",
            Duration::from_secs(5),
        );
        let mut client =
            VmmClient::connect(&VmmSocket::unjailed(&path), Duration::from_millis(300)).unwrap();
        let started = Instant::now();

        let r = client.describe();

        assert!(
            matches!(&r, Err(VmmClientError::Timeout { request, .. }) if request == "GET /vm"),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn answers_decode_into_the_api_types_on_one_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let description = VmDescription {
            state: VmState::Running,
            config: None,
            boot_time_us: Some(1500),
            uptime_us: 9,
            sandbox: None,
        };
        let refusal = ErrorBody {
            error: "cannot start while the VM is running".into(),
        };
        answering_server(
            &path,
            vec![
                (200, serde_json::to_string(&description).unwrap()),
                (409, serde_json::to_string(&refusal).unwrap()),
                (204, String::new()),
            ],
        );
        let mut client =
            VmmClient::connect(&VmmSocket::unjailed(&path), Duration::from_secs(5)).unwrap();

        let described = client.describe().unwrap();
        let refused = client
            .send(&Request::Action(LifecycleAction::Start))
            .unwrap_err();
        let stopped = client.send(&Request::Action(LifecycleAction::Stop));

        assert_eq!(described, description);
        assert_eq!(
            refused.to_string(),
            "VMM answered PUT /vm/actions with 409: cannot start while the VM is running"
        );
        assert!(stopped.is_ok(), "{stopped:?}");
    }

    #[test]
    fn bytes_after_the_answer_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        // The answer and a second, unasked-for one behind it.
        scripted_server(
            &path,
            b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            Duration::from_secs(1),
        );
        let mut client =
            VmmClient::connect(&VmmSocket::unjailed(&path), Duration::from_secs(5)).unwrap();

        let r = client.send(&Request::Action(LifecycleAction::Pause));

        assert!(
            matches!(&r, Err(VmmClientError::Malformed(m)) if m.contains("after the response")),
            "{r:?}"
        );
    }

    #[test]
    fn a_socket_served_by_another_uid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let ours = VmmSocket::unjailed(&path);
        let sock = VmmSocket {
            uid: ours.uid.wrapping_add(1),
            ..ours
        };

        let err = VmmClient::connect(&sock, Duration::from_secs(5)).unwrap_err();

        assert!(
            matches!(err, VmmClientError::Connect(UdsError::PeerUid { .. })),
            "{err:?}"
        );
    }
}
