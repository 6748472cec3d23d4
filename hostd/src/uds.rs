//! Unix sockets: the CLI's HTTP/1.1 client for admin.sock ([`request`]), and the hardened
//! way to reach a genos-vmm control socket ([`VmmSocket`]), which hostd's one VMM client
//! (`crate::vmm_client`) connects through.
//!
//! A VMM is not trusted (a guest may have taken it over), so every connection to one goes
//! through [`VmmSocket`]: the socket is opened without following any link the VMM could
//! have planted and the peer's uid is checked against the uid the VMM runs as.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Largest response body the CLI reads from hostd's admin socket (long audit listings).
pub const MAX_ADMIN_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a socket (a {kind})")]
    NotSocket { path: PathBuf, kind: &'static str },
    #[error("{path} is served by uid {uid}, not by the VMM's uid {want}")]
    PeerUid { path: PathBuf, uid: u32, want: u32 },
    #[error("HTTP exchange with {path} failed")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("{path} sent a response body larger than {limit} bytes")]
    BodyTooLarge { path: PathBuf, limit: usize },
    #[error("bad request for {0}")]
    Request(String),
    #[error("{path} did not answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
}

/// One response: status and body bytes.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Credentials of the process that listens on a socket (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// SO_PEERCRED of a connected Unix socket.
pub fn peer_cred(fd: &impl AsRawFd) -> std::io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are live locals of the sizes passed; the kernel writes at
    // most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Where one VMM's control socket is, and who must be listening on it.
///
/// `base` is a directory hostd trusts: created by root or by hostd, never writable by the
/// VMM (the jail directory `<chroot-base>/genos-vmm/ID`, or unjailed the environment's own
/// directory). Everything below it (`rel`, e.g. `run/api.sock`) may be under the VMM's
/// control: its `run/` directory belongs to the VMM's uid, which can replace `api.sock` by a
/// symlink to any host socket, e.g. `/run/docker.sock`. So the components of `rel` are
/// opened one by one with `O_PATH | O_NOFOLLOW` relative to the previous one (a symlink
/// anywhere fails the open of a directory, and is seen as a link, not followed, for the
/// last component), the last one must be a socket inode, and hostd connects to that very
/// inode through `/proc/self/fd/N` of its `O_PATH` descriptor: the kernel resolves the magic
/// link to the inode already opened, so nothing renamed or swapped in between is reached.
/// After connecting, SO_PEERCRED must name `uid` (a hard link to someone else's socket, or
/// a socket handed to another process, is refused there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmSocket {
    pub base: PathBuf,
    pub rel: Vec<String>,
    pub uid: u32,
}

impl VmmSocket {
    /// The socket at `path` of a VMM running as hostd's own user (unjailed): `path`'s
    /// directory is the trusted base.
    pub fn unjailed(path: &Path) -> VmmSocket {
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        VmmSocket {
            base: base.to_owned(),
            rel: vec![path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()],
            // SAFETY: geteuid has no preconditions and cannot fail.
            uid: unsafe { libc::geteuid() },
        }
    }

    /// The socket `name` beside this one (same trusted base and directory, same owner):
    /// the VM's vsock socket next to its control socket.
    pub fn sibling(&self, name: &str) -> VmmSocket {
        let mut rel = self.rel.clone();
        rel.pop();
        rel.push(name.to_owned());
        VmmSocket {
            base: self.base.clone(),
            rel,
            uid: self.uid,
        }
    }

    /// The socket's path, for messages.
    pub fn path(&self) -> PathBuf {
        let mut p = self.base.clone();
        p.extend(&self.rel);
        p
    }

    fn connect_error(&self, source: std::io::Error) -> UdsError {
        UdsError::Connect {
            path: self.path(),
            source,
        }
    }

    /// An `O_PATH` descriptor of the socket inode, reached without following links below
    /// `base`.
    fn open_inode(&self) -> Result<OwnedFd, UdsError> {
        let Some((last, dirs)) = self.rel.split_last() else {
            return Err(self.connect_error(std::io::Error::from(std::io::ErrorKind::InvalidInput)));
        };
        let base = CString::new(self.base.as_os_str().as_encoded_bytes())
            .map_err(|_| self.connect_error(std::io::ErrorKind::InvalidInput.into()))?;
        // The base is the operator's (it may itself be reached through links they made).
        let mut dir = openat(
            libc::AT_FDCWD,
            &base,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
        .map_err(|e| self.connect_error(e))?;
        for c in dirs {
            let name = component(c).map_err(|e| self.connect_error(e))?;
            dir = openat(
                dir.as_raw_fd(),
                &name,
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
            .map_err(|e| self.connect_error(e))?;
        }
        let name = component(last).map_err(|e| self.connect_error(e))?;
        let sock = openat(
            dir.as_raw_fd(),
            &name,
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
        .map_err(|e| self.connect_error(e))?;
        // SAFETY: an all-zero `stat` is a valid value for fstat to overwrite.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `sock` is an open descriptor and `st` a live, writable stat.
        if unsafe { libc::fstat(sock.as_raw_fd(), &mut st) } != 0 {
            return Err(self.connect_error(std::io::Error::last_os_error()));
        }
        let kind = match st.st_mode & libc::S_IFMT {
            libc::S_IFSOCK => return Ok(sock),
            libc::S_IFLNK => "symbolic link",
            libc::S_IFREG => "regular file",
            libc::S_IFDIR => "directory",
            _ => "special file",
        };
        Err(UdsError::NotSocket {
            path: self.path(),
            kind,
        })
    }

    fn check_peer(&self, fd: &impl AsRawFd) -> Result<PeerCred, UdsError> {
        let cred = peer_cred(fd).map_err(|e| self.connect_error(e))?;
        if cred.uid != self.uid {
            return Err(UdsError::PeerUid {
                path: self.path(),
                uid: cred.uid,
                want: self.uid,
            });
        }
        Ok(cred)
    }

    /// Connects (blocking: a Unix connect does not wait on the peer) and checks the peer's
    /// uid.
    pub fn connect(&self) -> Result<(std::os::unix::net::UnixStream, PeerCred), UdsError> {
        let inode = self.open_inode()?;
        let stream = std::os::unix::net::UnixStream::connect(proc_fd_path(&inode))
            .map_err(|e| self.connect_error(e))?;
        let cred = self.check_peer(&stream)?;
        Ok((stream, cred))
    }
}

fn proc_fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// One path component: no `/`, not `.` or `..`.
fn component(c: &str) -> std::io::Result<CString> {
    if c.is_empty() || c == "." || c == ".." || c.contains('/') {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    CString::new(c).map_err(|_| std::io::ErrorKind::InvalidInput.into())
}

fn openat(dir: libc::c_int, name: &CString, flags: libc::c_int) -> std::io::Result<OwnedFd> {
    // SAFETY: `name` is NUL-terminated; `dir` is AT_FDCWD or a descriptor we hold open.
    let fd = unsafe { libc::openat(dir, name.as_ptr(), flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends one request to hostd's admin socket on a fresh connection, with a deadline.
pub async fn request(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, UdsError> {
    with_deadline(sock, timeout, exchange(sock, method, uri, body)).await
}

async fn with_deadline(
    path: &Path,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<Response, UdsError>>,
) -> Result<Response, UdsError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(UdsError::Timeout {
            path: path.into(),
            secs: timeout.as_secs(),
        }),
    }
}

async fn exchange(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, UdsError> {
    let limit = MAX_ADMIN_BODY;
    let http = |source| UdsError::Http {
        path: sock.into(),
        source,
    };
    let mut sender = handshake::<Full<Bytes>>(sock).await?;
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("json serialises"))
        .unwrap_or_default();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .header("content-length", bytes.len())
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| UdsError::Request(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let body = match Limited::new(resp.into_body(), limit).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) => {
            return Err(match e.downcast::<hyper::Error>() {
                Ok(e) => http(*e),
                // The only other error `Limited` produces is its length limit.
                Err(_) => UdsError::BodyTooLarge {
                    path: sock.into(),
                    limit,
                },
            });
        }
    };
    Ok(Response { status, body })
}

/// How a streamed download (`genos cp` out of a guest) went: the status and, for a
/// success, the length hostd announced, the file's mode header and the bytes written; for
/// a failure, hostd's answer.
#[derive(Debug, Clone, Default)]
pub struct Download {
    pub status: u16,
    pub length: Option<u64>,
    pub mode: Option<String>,
    pub written: u64,
    pub error_body: Vec<u8>,
}

/// Connects to hostd's admin socket for one exchange with bodies of type `B`.
async fn handshake<B>(sock: &Path) -> Result<hyper::client::conn::http1::SendRequest<B>, UdsError>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = UnixStream::connect(sock)
        .await
        .map_err(|source| UdsError::Connect {
            path: sock.into(),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| UdsError::Http {
            path: sock.into(),
            source,
        })?;
    // The connection task ends when the response is read or `sender` is dropped (on any
    // error or a too-large body), so nothing keeps reading from the peer after the exchange.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// PUTs `size` bytes of `file` to `uri` as they are read (never the whole file in memory),
/// with `Content-Length`; hostd's answer. Each read and the answer must come within `idle`
/// (the answer comes once the guest has the file: `idle` plus a second per 100 kB).
pub async fn upload(
    sock: &Path,
    uri: &str,
    mut file: tokio::fs::File,
    size: u64,
    idle: Duration,
) -> Result<Response, UdsError> {
    use tokio::io::AsyncReadExt;
    let mut sender = handshake::<crate::body_channel::ChannelBody>(sock).await?;
    let (tx, body) = crate::body_channel::channel();
    tokio::spawn(async move {
        let mut left = size;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let chunk = match file.read(&mut buf[..want]).await {
                Ok(0) => Err(std::io::Error::other("the file shrank while it was sent")),
                Ok(n) => Ok(Bytes::copy_from_slice(&buf[..n])),
                Err(e) => Err(e),
            };
            let failed = chunk.is_err();
            if let Ok(c) = &chunk {
                left -= c.len() as u64;
            }
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    let req = hyper::Request::builder()
        .method("PUT")
        .uri(uri)
        .header("host", "localhost")
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(body)
        .map_err(|e| UdsError::Request(e.to_string()))?;
    let answer = idle + Duration::from_secs(size / 100_000);
    let exchange = async {
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| UdsError::Http {
                path: sock.into(),
                source,
            })?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ADMIN_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        Ok(Response { status, body })
    };
    with_deadline(sock, answer, exchange).await
}

/// GETs `uri` and writes its body into `out` as it comes. A success is complete only if
/// `written` equals `length`: hostd cuts the body short when the guest fails mid-way.
pub async fn download(
    sock: &Path,
    uri: &str,
    out: &mut (impl tokio::io::AsyncWrite + Unpin),
    idle: Duration,
) -> Result<Download, UdsError> {
    use tokio::io::AsyncWriteExt;
    let http = |source| UdsError::Http {
        path: sock.into(),
        source,
    };
    let timed_out = || UdsError::Timeout {
        path: sock.into(),
        secs: idle.as_secs(),
    };
    let mut sender = handshake::<Full<Bytes>>(sock).await?;
    let req = hyper::Request::builder()
        .method("GET")
        .uri(uri)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .map_err(|e| UdsError::Request(e.to_string()))?;
    let resp = tokio::time::timeout(idle, sender.send_request(req))
        .await
        .map_err(|_| timed_out())?
        .map_err(http)?;
    let mut d = Download {
        status: resp.status().as_u16(),
        ..Download::default()
    };
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    d.length = header("content-length").and_then(|v| v.parse().ok());
    d.mode = header(crate::admin::FILE_MODE_HEADER);
    let success = (200..300).contains(&d.status);
    let mut body = resp.into_body();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Err(_) => return Err(timed_out()),
            Ok(None) => break,
            // A cut body: `written` stays short of `length`.
            Ok(Some(Err(_))) => break,
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if success {
            out.write_all(&data)
                .await
                .map_err(|e| UdsError::Request(format!("writing the download: {e}")))?;
            d.written += data.len() as u64;
        } else if d.error_body.len() < MAX_ADMIN_BODY {
            d.error_body.extend_from_slice(&data);
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn euid() -> u32 {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }

    #[test]
    fn a_symlink_planted_for_the_socket_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        // Some other host socket the VMM would like hostd to talk to.
        let target = dir.path().join("other.sock");
        let other = UnixListener::bind(&target).unwrap();
        other.set_nonblocking(true).unwrap();
        let run = dir.path().join("jail/run");
        std::fs::create_dir_all(&run).unwrap();
        std::os::unix::fs::symlink(&target, run.join("api.sock")).unwrap();
        // And a jail whose `run` directory itself was swapped for a link.
        std::fs::create_dir_all(dir.path().join("jail2")).unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("jail2/run")).unwrap();

        let sock = VmmSocket {
            base: dir.path().join("jail"),
            rel: vec!["run".into(), "api.sock".into()],
            uid: euid(),
        };
        let r = sock.connect();
        assert!(
            matches!(
                &r,
                Err(UdsError::NotSocket {
                    kind: "symbolic link",
                    ..
                })
            ),
            "{r:?}"
        );
        let swapped_dir = VmmSocket {
            base: dir.path().join("jail2"),
            rel: vec!["run".into(), "other.sock".into()],
            uid: euid(),
        };
        let r = swapped_dir.connect();
        assert!(
            matches!(&r, Err(UdsError::Connect { source, .. }) if source.raw_os_error() == Some(libc::ENOTDIR) || source.raw_os_error() == Some(libc::ELOOP)),
            "{r:?}"
        );
        assert_eq!(
            other.accept().unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "the other socket was reached"
        );
    }

    #[test]
    fn a_socket_served_by_another_uid_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let sock = VmmSocket {
            uid: euid().wrapping_add(1),
            ..VmmSocket::unjailed(&path)
        };
        let r = sock.connect();
        assert!(
            matches!(r, Err(UdsError::PeerUid { uid, want, .. }) if uid == euid() && want == euid().wrapping_add(1)),
            "{r:?}"
        );
    }

    #[test]
    fn the_real_socket_is_reached_and_its_peer_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let sock = VmmSocket::unjailed(&path);

        let (_, peer) = sock.connect().unwrap();

        assert!(listener.accept().is_ok(), "the listener was reached");
        assert_eq!(peer.pid, std::process::id() as i32);
        assert_eq!(peer.uid, euid());
    }
}
