//! The browser client's server side: HTTPS on the stream port's TCP side serves the page
//! (assets embedded in the binary, [`assets`]) and carries browser viewers over a WebSocket
//! (`wss://HOST:PORT/ws`) into the stream server's sessions ([`MessageViewers`]): the same
//! Hello, tokens, admission, rights, held keys, expiry and newest-wins frames as native
//! viewers. Links are `https://HOST:PORT/#env=ENV&token=TOKEN` ([`web_url`]); the token is in
//! the fragment, which browsers never send to the server.
//!
//! Browsers with WebTransport connect over HTTP/3 to the same port's UDP side instead
//! ([`webtransport`]; `GET /webtransport` tells the page the certificate hash to pin).
//!
//! WebSocket framing (docs/web-client.md): client → server binary messages carry
//! control-stream bytes (framed as in docs/protocol.md); server → client binary messages are
//! either `0x00` + one framed control message, or one video frame (its 27-byte header, whose
//! first byte is 0x01, then the access unit).

pub mod assets;
#[cfg(test)]
mod keymap;
pub mod webtransport;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message};
use tracing::{debug, info};

use crate::stream::server::{MessageViewers, Outbound};
use crate::stream::session::PathStats;
use crate::stream::Identity;

/// Largest request head the server reads (request line and headers).
const MAX_HEAD: usize = 8 * 1024;
/// Time a peer has for its TLS handshake, and then for its request head.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections being handshaken or served a page at once (WebSocket viewers are counted by
/// the stream server's admission instead, once upgraded).
const MAX_PAGE_CONNECTIONS: usize = 64;
/// Largest WebSocket message accepted from a browser: the largest control message (a
/// clipboard, 1 MiB) and its framing; the session refuses more than a Hello before Welcome.
const MAX_WS_MESSAGE: usize = proto::stream::MAX_MESSAGE_LEN + 16;
/// Unsent bytes the kernel keeps per viewer before a write waits: small, so that a frame
/// counts as in flight until it is nearly on the wire and a slow path drops frames (newest
/// wins) instead of queueing seconds of video in a socket buffer.
const NOTSENT_LOWAT: libc::c_int = 128 * 1024;
/// WebSocket close codes for protocol errors are 4000 + the `ErrorCode`.
pub const CLOSE_CODE_BASE: u16 = 4000;

/// Why the web server could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error("binding TCP {addr} failed")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{0} holds no certificate")]
    NoCertificate(PathBuf),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
}

/// The certificate the page is served with.
pub enum Certificate<'a> {
    /// hostd's stream identity (self-signed: browsers warn once, see docs/web-client.md).
    Identity(&'a Identity),
    /// PEM files supplied by the operator (`[stream] tls_cert`, `tls_key`): a chain and its key.
    Files { cert: &'a Path, key: &'a Path },
}

/// The TLS configuration of the web server for `cert` (TLS 1.2 and 1.3, ALPN http/1.1).
pub fn tls_config(cert: Certificate<'_>) -> Result<Arc<rustls::ServerConfig>, WebError> {
    let (chain, key) = match cert {
        Certificate::Identity(id) => (vec![id.cert.clone()], id.private_key()),
        Certificate::Files { cert, key } => {
            let read = |path: &Path| {
                let path = path.to_owned();
                move |source| WebError::Read { path, source }
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(read(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(read(cert))?;
            if chain.is_empty() {
                return Err(WebError::NoCertificate(cert.to_owned()));
            }
            (chain, PrivateKeyDer::from_pem_file(key).map_err(read(key))?)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(tls))
}

/// The host part of links: `[stream] public_host` if set, else the bind address (an
/// unspecified one as loopback, as for `genos://` links), IPv6 literals bracketed.
pub fn link_host(public_host: Option<&str>, bind: SocketAddr) -> String {
    if let Some(h) = public_host.filter(|h| !h.is_empty()) {
        return if h.contains(':') && !h.starts_with('[') {
            format!("[{h}]")
        } else {
            h.to_owned()
        };
    }
    match bind.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The link a browser opens: `https://HOST:PORT/#env=ENV&token=TOKEN` (the token in the
/// fragment never reaches a request line or a log).
pub fn web_url(host: &str, port: u16, env_id: &str, token: &str) -> String {
    format!(
        "https://{host}:{port}/#env={}&token={}",
        percent_encode(env_id),
        percent_encode(token)
    )
}

/// The web link for a `genos://HOST:PORT/ENV?token=T&cert=..` link, with `public_host`
/// instead of its host when set. `None` if `url` is not such a link.
pub fn web_url_from_connect_url(url: &str, public_host: Option<&str>) -> Option<String> {
    let rest = url.strip_prefix("genos://")?;
    let (authority, rest) = rest.split_once('/')?;
    let (host, port) = authority.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let (env, query) = rest.split_once('?')?;
    let token = query.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    let env = percent_decode(env)?;
    let host = public_host
        .filter(|h| !h.is_empty())
        .map(|h| link_host(Some(h), SocketAddr::from(([0, 0, 0, 0], 0))))
        .unwrap_or_else(|| host.to_owned());
    Some(web_url(&host, port, &env, token))
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// Base64 of the SHA-256 of the identity's SubjectPublicKeyInfo: what Chromium's
/// `--ignore-certificate-errors-spki-list` takes to trust this self-signed certificate.
pub fn spki_sha256_base64(identity: &Identity) -> Option<String> {
    use base64::Engine;
    let key = identity.private_key();
    let pkcs8 = key.secret_der();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .ok()?;
    // SubjectPublicKeyInfo of an ECDSA P-256 key: the algorithm identifiers, then the point.
    let mut spki = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").ok()?;
    spki.extend_from_slice(ring::signature::KeyPair::public_key(&pair).as_ref());
    let digest = ring::digest::digest(&ring::digest::SHA256, &spki);
    Some(base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
}

/// The HTTPS server of the page and the browser transport.
pub struct WebServer {
    local_addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl WebServer {
    /// Binds TCP `listen` (the stream server's port number) and serves until dropped.
    /// Must be called within a tokio runtime.
    pub async fn bind(
        listen: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        viewers: MessageViewers,
    ) -> Result<Self, WebError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| WebError::Bind {
                addr: listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| WebError::Bind {
            addr: listen,
            source,
        })?;
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        let task = tokio::spawn(accept_loop(listener, acceptor, viewers));
        info!(%local_addr, "web client served");
        Ok(Self { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for WebServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    viewers: MessageViewers,
) {
    let pages = Arc::new(Semaphore::new(MAX_PAGE_CONNECTIONS));
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = pages.clone().try_acquire_owned() else {
            debug!(%remote, "too many page connections; refused");
            continue;
        };
        let (acceptor, viewers) = (acceptor.clone(), viewers.clone());
        tokio::spawn(async move {
            serve_tcp(tcp, remote, acceptor, viewers, permit).await;
        });
    }
}

/// Sets a small unsent-bytes mark and keep-alives (a vanished browser is noticed).
fn tune_socket(fd: RawFd) {
    let set = |level, name, value: libc::c_int| {
        // SAFETY: `fd` is an open socket owned by the caller; the option value is a c_int
        // of the size passed.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    set(libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, NOTSENT_LOWAT);
    set(libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 10);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 5);
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 3);
}

/// The TCP path of `fd` as the session's ABR takes it (RTT, window, segments sent, lost).
fn tcp_path(fd: RawFd) -> PathStats {
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is a socket that stays open while its session runs; `info` and `len`
    // are valid for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return PathStats::default();
    }
    PathStats {
        rtt: Duration::from_micros(info.tcpi_rtt.into()),
        cwnd_bytes: u64::from(info.tcpi_snd_cwnd) * u64::from(info.tcpi_snd_mss),
        sent_packets: info.tcpi_segs_out.into(),
        lost_packets: info.tcpi_total_retrans.into(),
    }
}

/// A request head as far as this server needs it.
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
}

/// Reads one request head; returns it and the bytes read beyond it.
async fn read_head<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<(Request, Vec<u8>), &'static str> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.map_err(|_| "read failed")?;
        if n == 0 {
            return Err("closed before the request head");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let request = Request {
                    method: req.method.unwrap_or("").to_owned(),
                    path: req.path.unwrap_or("").to_owned(),
                    headers: req
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                };
                return Ok((request, buf[len..].to_vec()));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => return Err("request head too large"),
            Err(_) => return Err("malformed request"),
        }
    }
}

/// Headers every response carries: nothing is cached or framed elsewhere, scripts and
/// connections only from this origin, no referrer (links carry tokens in fragments, but
/// nothing should leak the page's address either).
const COMMON_HEADERS: &str = "Cache-Control: no-store\r\n\
X-Content-Type-Options: nosniff\r\n\
Referrer-Policy: no-referrer\r\n\
X-Frame-Options: DENY\r\n\
Content-Security-Policy: default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'\r\n";

fn response(status: &str, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\n{COMMON_HEADERS}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        r.extend_from_slice(body);
    }
    r
}

async fn serve_tcp(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    viewers: MessageViewers,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let fd = tcp.as_raw_fd();
    tune_socket(fd);
    let head = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut tls = acceptor
            .accept(tcp)
            .await
            .map_err(|_| "TLS handshake failed")?;
        let (req, rest) = read_head(&mut tls).await?;
        Ok::<_, &'static str>((tls, req, rest))
    })
    .await;
    let (mut tls, req, rest) = match head {
        Ok(Ok(h)) => h,
        Ok(Err(why)) => return debug!(%remote, why, "web connection dropped"),
        Err(_) => return debug!(%remote, "web connection timed out before its request"),
    };
    let path = req.path.split(['?', '#']).next().unwrap_or("");
    let head_only = req.method == "HEAD";
    if req.method != "GET" && !head_only {
        let r = response(
            "405 Method Not Allowed",
            "text/plain",
            b"only GET\n",
            head_only,
        );
        let _ = tls.write_all(&r).await;
        let _ = tls.shutdown().await;
        return;
    }
    if path == "/ws" {
        drop(permit);
        return upgrade(tls, remote, fd, req, rest, viewers).await;
    }
    let r = match assets::get(path) {
        _ if path == "/webtransport" => {
            // The hash the page pins its WebTransport connection to (the certificate rotates,
            // so it is asked for here, over this already-trusted origin, not put in links).
            let body = match viewers.webtransport_cert_sha256() {
                Some(h) => format!("{{\"path\":\"{}\",\"sha256\":\"{h}\"}}", webtransport::PATH),
                None => "{}".to_owned(),
            };
            response("200 OK", "application/json", body.as_bytes(), head_only)
        }
        Some(a) => response("200 OK", a.content_type, a.body, head_only),
        None => response("404 Not Found", "text/plain", b"not found\n", head_only),
    };
    let _ = tls.write_all(&r).await;
    let _ = tls.shutdown().await;
}

/// Refuses an upgrade with `status` and a one-line reason.
async fn refuse<S: tokio::io::AsyncWrite + Unpin>(mut s: S, status: &str, why: &str) {
    let r = response(status, "text/plain", format!("{why}\n").as_bytes(), false);
    let _ = s.write_all(&r).await;
    let _ = s.shutdown().await;
}

/// Completes the WebSocket handshake and hands the viewer to the stream server.
async fn upgrade(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    remote: SocketAddr,
    fd: RawFd,
    req: Request,
    rest: Vec<u8>,
    viewers: MessageViewers,
) {
    let key = req.header("Sec-WebSocket-Key").map(str::to_owned);
    let ok = req.header_has_token("Upgrade", "websocket")
        && req.header_has_token("Connection", "upgrade")
        && req.header("Sec-WebSocket-Version") == Some("13");
    let Some(key) = key.filter(|_| ok) else {
        return refuse(tls, "400 Bad Request", "expected a WebSocket upgrade").await;
    };
    // Only the page itself may open viewer sockets: a page of another origin cannot ride on
    // a user's browser (the token is needed anyway, but this costs nothing).
    let same_origin = match (req.header("Origin"), req.header("Host")) {
        (Some(origin), Some(host)) => origin.eq_ignore_ascii_case(&format!("https://{host}")),
        _ => false,
    };
    if !same_origin {
        return refuse(tls, "403 Forbidden", "cross-origin WebSocket refused").await;
    }
    let slot = match viewers.admit(remote.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            debug!(%remote, reason = %e, "web viewer refused");
            return refuse(tls, "503 Service Unavailable", &e.to_string()).await;
        }
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    if tls.write_all(head.as_bytes()).await.is_err() || tls.flush().await.is_err() {
        return;
    }
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_WS_MESSAGE))
        .max_frame_size(Some(MAX_WS_MESSAGE));
    let ws = tokio_tungstenite::WebSocketStream::from_partially_read(
        tls,
        rest,
        Role::Server,
        Some(config),
    )
    .await;
    let (sink, stream) = ws.split();
    // The client's binary messages are control-stream bytes; a close, an error or a text
    // message (not part of the protocol) ends the stream, which ends the session.
    let incoming = stream
        .take_while(|m| {
            std::future::ready(matches!(
                m,
                Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))
            ))
        })
        .filter_map(|m| {
            std::future::ready(match m {
                Ok(Message::Binary(b)) => Some(b.to_vec()),
                _ => None,
            })
        });
    let outgoing = sink.with(move |o: Outbound| {
        let m = match o {
            Outbound::Binary(b) => Message::Binary(b.into()),
            Outbound::Close(code, reason) => {
                // Close reasons are at most 123 bytes; cut on a character boundary.
                let mut end = reason.len().min(120);
                while !reason.is_char_boundary(end) {
                    end -= 1;
                }
                Message::Close(Some(CloseFrame {
                    code: CloseCode::from(CLOSE_CODE_BASE + code as u16),
                    reason: reason[..end].to_owned().into(),
                }))
            }
        };
        std::future::ready(Ok::<_, tungstenite::Error>(m))
    });
    info!(%remote, "web viewer connected");
    viewers
        .serve(
            slot,
            remote,
            Box::pin(incoming),
            Box::pin(outgoing),
            move || tcp_path(fd),
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_links_carry_the_token_in_the_fragment_only() {
        let url = web_url("genos.example", 4433, "my env", "AbC-_.x");
        assert_eq!(
            url,
            "https://genos.example:4433/#env=my%20env&token=AbC-_.x"
        );
        let (request_part, fragment) = url.split_once('#').unwrap();
        assert!(!request_part.contains("AbC"));
        assert!(fragment.contains("token="));
    }

    #[test]
    fn link_host_prefers_public_host_and_brackets_ipv6() {
        let any4: SocketAddr = "0.0.0.0:4433".parse().unwrap();
        let any6: SocketAddr = "[::]:4433".parse().unwrap();
        let v6: SocketAddr = "[2001:db8::1]:4433".parse().unwrap();
        let lo: SocketAddr = "127.0.0.1:4433".parse().unwrap();
        assert_eq!(link_host(Some("genos.example"), any4), "genos.example");
        assert_eq!(link_host(Some("2001:db8::2"), any4), "[2001:db8::2]");
        assert_eq!(link_host(Some(""), lo), "127.0.0.1");
        assert_eq!(link_host(None, any4), "127.0.0.1");
        assert_eq!(link_host(None, any6), "[::1]");
        assert_eq!(link_host(None, v6), "[2001:db8::1]");
    }

    #[test]
    fn a_genos_link_becomes_the_web_link_for_the_same_port_and_token() {
        let genos = "genos://127.0.0.1:4433/my%20env?token=T0k.en&cert=ab12";
        assert_eq!(
            web_url_from_connect_url(genos, None).unwrap(),
            "https://127.0.0.1:4433/#env=my%20env&token=T0k.en"
        );
        assert_eq!(
            web_url_from_connect_url(genos, Some("genos.example")).unwrap(),
            "https://genos.example:4433/#env=my%20env&token=T0k.en"
        );
        let v6 = "genos://[::1]:9/e?cert=00&token=t";
        assert_eq!(
            web_url_from_connect_url(v6, None).unwrap(),
            "https://[::1]:9/#env=e&token=t"
        );
        for bad in [
            "https://x/",
            "genos://h/e?token=t",
            "genos://h:1/e?cert=0",
            "genos://h:x/e?token=t",
        ] {
            assert_eq!(web_url_from_connect_url(bad, None), None, "{bad}");
        }
    }

    #[test]
    fn operator_pem_files_are_loaded_and_missing_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["genos.example".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        assert!(tls_config(Certificate::Files {
            cert: &cert,
            key: &key
        })
        .is_ok());
        let missing = dir.path().join("none.pem");
        let err = tls_config(Certificate::Files {
            cert: &missing,
            key: &key,
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("none.pem"), "{err}");
        std::fs::write(&missing, "not pem\n").unwrap();
        let err = tls_config(Certificate::Files {
            cert: &missing,
            key: &key,
        })
        .err()
        .unwrap();
        assert!(matches!(err, WebError::NoCertificate(_)), "{err}");
    }

    #[test]
    fn spki_hash_is_of_the_certificates_public_key() {
        use base64::Engine;
        let id = Identity::generate(&[]).unwrap();
        let spki = spki_sha256_base64(&id).unwrap();
        let raw = base64::engine::general_purpose::STANDARD
            .decode(&spki)
            .unwrap();
        assert_eq!(raw.len(), 32);
        // The SubjectPublicKeyInfo is inside the certificate's DER: the hash is over it.
        let cert = id.cert.as_ref();
        let prefix = hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap();
        let at = cert
            .windows(prefix.len())
            .position(|w| w == prefix.as_slice())
            .expect("P-256 SPKI in the certificate");
        let digest = ring::digest::digest(&ring::digest::SHA256, &cert[at..at + prefix.len() + 65]);
        assert_eq!(digest.as_ref(), raw.as_slice());
    }
}
