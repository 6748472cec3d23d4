//! The host side of the vsock device (Firecracker's hybrid design): a Unix listener at
//! path S where host programs connect and write `CONNECT <port>\n`, and, for a guest
//! connecting to host port P, a non-blocking connection to the Unix socket `S_P`.
//!
//! This is the I/O driver of the [`Muxer`]: [`HostSide::pump`] carries out its
//! [`HostAction`]s and feeds it what the streams read, as far as its read budgets allow.
//! Every stream is non-blocking and watched edge-triggered for input and output; a stream
//! left readable because its connection had no budget is read again on the next pump.
//! Host programs are not trusted either: the `CONNECT` line is bounded in length and time
//! ([`super::handshake`]), and at most [`MAX_HANDSHAKES`] may be under way.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::handshake::{self, LINE_TIMEOUT, MAX_LINE};
use super::metrics::{bump, VsockMetrics};
use super::muxer::{HostAction, Muxer, StreamId};

/// Most host programs connected to S that have not finished their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 16;
/// First stream id (the device's event tags below are its queues, listener and timer).
pub const FIRST_STREAM: StreamId = 8;
/// Bytes read from a host stream at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The socket path exists and is not a socket.
    #[error("vsock socket {0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is listening on the socket path.
    #[error("vsock socket {0}: another process is listening on it")]
    InUse(PathBuf),
    /// Removing a stale socket, binding or configuring the listener failed.
    #[error("vsock socket {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A descriptor for the event loop to start or stop watching.
#[derive(Debug)]
pub enum FdChange {
    /// Watch `fd` (edge-triggered, input and output), tagged with the stream id.
    Add(RawFd, StreamId),
    /// Stop watching the stream, then drop it (which closes it).
    Remove(UnixStream, StreamId),
}

struct Stream {
    sock: UnixStream,
    /// The last edge said there is input, and it was not all read yet.
    readable: bool,
    /// Set until the `CONNECT` line is complete (host-initiated streams only).
    handshake: Option<Handshake>,
}

struct Handshake {
    buf: Vec<u8>,
    deadline: Instant,
}

/// The listener and the host streams of one vsock device.
pub struct HostSide {
    path: PathBuf,
    listener: UnixListener,
    streams: HashMap<StreamId, Stream>,
    next_id: StreamId,
    changes: Vec<FdChange>,
    scratch: Vec<u8>,
}

impl HostSide {
    /// Listens on `path`. A stale socket left by a dead VMM is replaced; a live one or a
    /// file that is not a socket is an error. The socket is the owner's only (0600).
    pub fn bind(path: &Path) -> Result<Self, HostError> {
        let bind_error = |source| HostError::Bind {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(HostError::NotASocket(path.to_owned()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(HostError::InUse(path.to_owned()));
                }
                std::fs::remove_file(path).map_err(bind_error)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_error(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        Ok(Self {
            path: path.to_owned(),
            listener,
            streams: HashMap::new(),
            next_id: FIRST_STREAM,
            changes: Vec::new(),
            scratch: vec![0; READ_CHUNK],
        })
    }

    /// The listener's descriptor, for the event loop.
    pub fn listener_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Descriptors to start or stop watching since the last call.
    pub fn take_changes(&mut self) -> Vec<FdChange> {
        std::mem::take(&mut self.changes)
    }

    /// Accepts every waiting host program; each must send its `CONNECT` line within
    /// [`LINE_TIMEOUT`].
    pub fn accept_all(&mut self, now: Instant, metrics: &VsockMetrics) {
        loop {
            match self.listener.accept() {
                Ok((sock, _)) => {
                    let handshakes = self
                        .streams
                        .values()
                        .filter(|s| s.handshake.is_some())
                        .count();
                    if handshakes >= MAX_HANDSHAKES {
                        bump(&metrics.handshake_failures, 1);
                        crate::guest_warn!(
                            "virtio-vsock: host connection refused: {MAX_HANDSHAKES} already \
                             sending their CONNECT line"
                        );
                        continue;
                    }
                    if let Err(e) = sock.set_nonblocking(true) {
                        crate::guest_warn!("virtio-vsock: cannot use a host connection: {e}");
                        continue;
                    }
                    let handshake = Handshake {
                        buf: Vec::with_capacity(MAX_LINE),
                        deadline: now + LINE_TIMEOUT,
                    };
                    self.insert(sock, Some(handshake));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    crate::guest_warn!("virtio-vsock: accept on {}: {e}", self.path.display());
                    return;
                }
            }
        }
    }

    fn insert(&mut self, sock: UnixStream, handshake: Option<Handshake>) -> StreamId {
        let mut id = self.next_id;
        while self.streams.contains_key(&id) || id < FIRST_STREAM {
            id = id.wrapping_add(1);
        }
        self.next_id = id.wrapping_add(1);
        self.changes.push(FdChange::Add(sock.as_raw_fd(), id));
        self.streams.insert(
            id,
            Stream {
                sock,
                // A new stream may already hold input that raised no edge yet.
                readable: true,
                handshake,
            },
        );
        id
    }

    /// Connects to `S_<port>` without waiting (a Unix socket connects at once or fails).
    fn connect(&mut self, port: u32) -> io::Result<StreamId> {
        let mut path = self.path.clone().into_os_string();
        path.push(format!("_{port}"));
        let sock = connect_nonblocking(Path::new(&path))?;
        Ok(self.insert(sock, None))
    }

    /// An event on stream `id`: input (or hang-up) marks it readable, output lets the
    /// device write what waits for it.
    pub fn stream_event(
        &mut self,
        id: StreamId,
        readable: bool,
        writable: bool,
        muxer: &mut Muxer,
    ) {
        if let Some(s) = self.streams.get_mut(&id) {
            s.readable |= readable;
        }
        if writable {
            self.flush(id, muxer);
        }
    }

    /// Carries out the muxer's actions and reads every readable stream as far as its
    /// budget goes, until neither has anything left to do.
    pub fn pump(&mut self, muxer: &mut Muxer, now: Instant, metrics: &VsockMetrics) {
        loop {
            let mut progress = false;
            while let Some(action) = muxer.pop_action() {
                progress = true;
                match action {
                    HostAction::Connect {
                        host_port,
                        guest_port,
                    } => match self.connect(host_port) {
                        Ok(id) => muxer.host_connected(host_port, guest_port, id),
                        Err(e) => {
                            tracing::debug!(
                                "virtio-vsock: guest connection to host port {host_port}: {e}"
                            );
                            muxer.host_connect_failed(host_port, guest_port);
                        }
                    },
                    HostAction::Flush(id) => self.flush(id, muxer),
                    HostAction::ShutWrite(id) => {
                        if let Some(s) = self.streams.get(&id) {
                            // A peer already gone is found by the next read.
                            let _ = s.sock.shutdown(std::net::Shutdown::Write);
                        }
                    }
                    HostAction::Close(id) => self.close(id),
                }
            }
            let readable: Vec<StreamId> = self
                .streams
                .iter()
                .filter(|(_, s)| s.readable)
                .map(|(id, _)| *id)
                .collect();
            for id in readable {
                progress |= self.read(id, muxer, now, metrics);
            }
            if !progress {
                return;
            }
        }
    }

    /// Writes what waits for stream `id`.
    fn flush(&mut self, id: StreamId, muxer: &mut Muxer) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        loop {
            let bytes = muxer.host_bound(id);
            if bytes.is_empty() {
                return;
            }
            match s.sock.write(bytes) {
                Ok(n) => muxer.host_consumed(id, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("virtio-vsock: host stream write: {e}");
                    muxer.host_error(id);
                    return;
                }
            }
        }
    }

    /// Reads stream `id`; returns whether anything happened.
    fn read(
        &mut self,
        id: StreamId,
        muxer: &mut Muxer,
        now: Instant,
        metrics: &VsockMetrics,
    ) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        if let Some(hs) = &mut s.handshake {
            return match read_line(&mut s.sock, hs) {
                LineRead::Pending => {
                    s.readable = false;
                    false
                }
                LineRead::Failed(why) => {
                    bump(&metrics.handshake_failures, 1);
                    crate::guest_warn!("virtio-vsock: host connection dropped: {why}");
                    self.close(id);
                    true
                }
                LineRead::Done(port, len) => {
                    let rest = hs.buf.split_off(len);
                    s.handshake = None;
                    match muxer.host_connect(id, port, now) {
                        Ok(_) => {
                            muxer.host_data(id, &rest);
                        }
                        Err(e) => {
                            crate::guest_warn!(
                                "virtio-vsock: host connection to guest port {port} refused: {e}"
                            );
                            self.close(id);
                        }
                    }
                    true
                }
            };
        }
        let mut progress = false;
        loop {
            let budget = muxer.read_budget(id).min(self.scratch.len());
            if budget == 0 {
                return progress;
            }
            match s.sock.read(&mut self.scratch[..budget]) {
                Ok(0) => {
                    s.readable = false;
                    muxer.host_eof(id);
                    return true;
                }
                Ok(n) => {
                    muxer.host_data(id, &self.scratch[..n]);
                    progress = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    s.readable = false;
                    return progress;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!("virtio-vsock: host stream read: {e}");
                    s.readable = false;
                    muxer.host_error(id);
                    return true;
                }
            }
        }
    }

    /// Stops watching stream `id` and closes it.
    fn close(&mut self, id: StreamId) {
        if let Some(s) = self.streams.remove(&id) {
            self.changes.push(FdChange::Remove(s.sock, id));
        }
    }

    /// Drops host programs that did not finish their `CONNECT` line in time.
    pub fn expire_handshakes(&mut self, now: Instant, metrics: &VsockMetrics) {
        let late: Vec<StreamId> = self
            .streams
            .iter()
            .filter(|(_, s)| s.handshake.as_ref().is_some_and(|h| h.deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            bump(&metrics.handshake_failures, 1);
            crate::guest_warn!(
                "virtio-vsock: host connection dropped: no CONNECT line within {LINE_TIMEOUT:?}"
            );
            self.close(id);
        }
    }

    /// The earliest handshake deadline.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.streams
            .values()
            .filter_map(|s| s.handshake.as_ref().map(|h| h.deadline))
            .min()
    }
}

impl Drop for HostSide {
    fn drop(&mut self) {
        // The socket file would otherwise stay behind, refusing nobody but looking live.
        let _ = std::fs::remove_file(&self.path);
    }
}

enum LineRead {
    Pending,
    Done(u32, usize),
    Failed(String),
}

/// Reads the `CONNECT` line, never more than [`MAX_LINE`] bytes in all.
fn read_line(sock: &mut UnixStream, hs: &mut Handshake) -> LineRead {
    loop {
        match handshake::parse(&hs.buf) {
            Ok(Some((port, len))) => return LineRead::Done(port, len),
            Ok(None) => {}
            Err(e) => return LineRead::Failed(e.to_string()),
        }
        let mut chunk = [0u8; MAX_LINE];
        let room = MAX_LINE - hs.buf.len();
        match sock.read(&mut chunk[..room]) {
            Ok(0) => return LineRead::Failed("closed before its CONNECT line".into()),
            Ok(n) => hs.buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return LineRead::Pending,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return LineRead::Failed(e.to_string()),
        }
    }
}

/// A non-blocking `SOCK_STREAM` connection to the Unix socket at `path`.
pub(crate) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let sock = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes for the call.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(sock)
}
