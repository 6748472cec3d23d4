//! WebTransport (HTTP/3) viewers on the stream server's own quinn endpoint: connections that
//! negotiated ALPN `h3` instead of `genos-stream/1` get a short-lived certificate (browsers
//! pin it by `serverCertificateHashes`, which accept only certificates valid at most 14 days;
//! rotated here every [`ROTATE_AFTER`]) and are driven through [`MessageViewers`] with the
//! protocol unchanged: the control stream is the first bidirectional WebTransport stream, each
//! frame arrives on its own unidirectional stream.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use proto::stream::ErrorCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::debug;

use crate::stream::identity::fingerprint;
use crate::stream::server::{MessageSlot, MessageViewers, Outbound, MESSAGE_CONTROL};
use crate::stream::session::PathStats;
use crate::stream::Identity;

/// ALPN of HTTP/3, which WebTransport runs on.
pub const ALPN_H3: &[u8] = b"h3";
/// Validity of the WebTransport certificate (browsers refuse more than 14 days).
pub const VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);
/// A certificate this old is replaced at the next handshake (pages learn the current hash
/// from `/webtransport` when they connect, so links outlive rotations).
pub const ROTATE_AFTER: Duration = Duration::from_secs(6 * 24 * 3600);
/// How long a closing session waits for its last control message to be acknowledged and read
/// (the page then closes the session itself).
const CLOSE_FLUSH: Duration = Duration::from_millis(500);
/// Path of the WebTransport session's CONNECT request.
pub const PATH: &str = "/wt";

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating the WebTransport certificate failed")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate's key is not usable")]
    Key(#[from] rustls::Error),
    #[error("the system clock is out of range")]
    Clock,
}

struct Current {
    key: Arc<CertifiedKey>,
    sha256: String,
    made: Instant,
}

/// Chooses the certificate by ALPN: the stream identity (pinned by `genos://` links) for
/// native viewers, the short-lived WebTransport certificate for `h3`.
#[derive(Debug)]
pub struct CertResolver {
    identity: Arc<CertifiedKey>,
    webtransport: Mutex<Option<Current>>,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("sha256", &self.sha256)
            .finish()
    }
}

fn certified(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'_>,
) -> Result<CertifiedKey, CertError> {
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(vec![cert], signer))
}

/// A new ECDSA P-256 certificate for `localhost`, valid from an hour ago for [`VALIDITY`].
fn short_lived() -> Result<Current, CertError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CertError::Clock)?
        .as_secs() as i64;
    let at = |s: i64| time::OffsetDateTime::from_unix_timestamp(s).map_err(|_| CertError::Clock);
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params.not_before = at(now - 3600)?;
    params.not_after = at(now + VALIDITY.as_secs() as i64 - 3600)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    let der = cert.der().clone();
    let pkcs8 = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Ok(Current {
        sha256: fingerprint(&der),
        key: Arc::new(certified(der, pkcs8)?),
        made: Instant::now(),
    })
}

impl CertResolver {
    pub fn new(identity: &Identity) -> Result<Self, CertError> {
        Ok(Self {
            identity: Arc::new(certified(identity.cert.clone(), identity.private_key())?),
            webtransport: Mutex::new(Some(short_lived()?)),
        })
    }

    /// The current WebTransport certificate (made anew when due), and its SHA-256 hex.
    fn current(&self) -> Option<(Arc<CertifiedKey>, String)> {
        let mut slot = self.webtransport.lock().expect("poisoned");
        let due = slot
            .as_ref()
            .is_none_or(|c| c.made.elapsed() >= ROTATE_AFTER);
        if due {
            match short_lived() {
                Ok(c) => *slot = Some(c),
                Err(e) => debug!(error = %e, "WebTransport certificate not rotated"),
            }
        }
        slot.as_ref().map(|c| (c.key.clone(), c.sha256.clone()))
    }

    /// SHA-256 (hex) of the certificate WebTransport clients get now.
    pub fn webtransport_sha256(&self) -> Option<String> {
        self.current().map(|(_, h)| h)
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let h3 = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_H3));
        if h3 {
            self.current().map(|(key, _)| key)
        } else {
            Some(self.identity.clone())
        }
    }
}

/// Whether the connection negotiated HTTP/3.
pub fn is_h3(conn: &quinn::Connection) -> bool {
    conn.handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol)
        .is_some_and(|p| p == ALPN_H3)
}

/// What the outgoing half writes to: the control stream, and the session for frame streams.
struct Writer {
    session: web_transport_quinn::Session,
    control: web_transport_quinn::SendStream,
}

/// Serves one HTTP/3 connection: the WebTransport handshake (CONNECT to [`PATH`]) and its
/// control stream within `deadline`, then the viewer through `viewers`.
pub async fn serve(
    viewers: MessageViewers,
    slot: MessageSlot,
    conn: quinn::Connection,
    deadline: Duration,
) {
    let remote = conn.remote_address();
    // HTTP/3 needs the client's control and QPACK streams and a CONNECT stream beside the
    // session's control stream.
    conn.set_max_concurrent_uni_streams(3u32.into());
    conn.set_max_concurrent_bi_streams(2u32.into());
    let opened = tokio::time::timeout(deadline, async {
        let request = web_transport_quinn::Request::accept(conn.clone())
            .await
            .map_err(|e| e.to_string())?;
        // Only the page this host served may open sessions (as for the WebSocket).
        let origin = request.headers.get("origin").and_then(|o| o.to_str().ok());
        let own = match (request.url.host_str(), request.url.port()) {
            (Some(host), Some(port)) => format!("https://{host}:{port}"),
            (Some(host), None) => format!("https://{host}"),
            _ => String::new(),
        };
        if !origin.is_some_and(|o| o.eq_ignore_ascii_case(&own)) {
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::FORBIDDEN)
                .await;
            return Err("cross-origin WebTransport refused".to_owned());
        }
        if request.url.path() != PATH {
            let _ = request
                .reject(web_transport_quinn::http::StatusCode::NOT_FOUND)
                .await;
            return Err("CONNECT to an unknown path".to_owned());
        }
        let session = request.ok().await.map_err(|e| e.to_string())?;
        let (send, recv) = session.accept_bi().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((session, send, recv))
    })
    .await;
    let (session, control, recv) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => return debug!(%remote, why, "WebTransport session not opened"),
        Err(_) => {
            conn.close(
                (ErrorCode::ProtocolViolation as u32).into(),
                b"no WebTransport session in time",
            );
            return debug!(%remote, "WebTransport session not opened in time");
        }
    };
    // Client → server: the control stream's bytes; its end (or reset) ends the session.
    let incoming = futures_util::stream::unfold(recv, |mut recv| async move {
        match recv.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => Some((chunk.bytes.to_vec(), recv)),
            _ => None,
        }
    })
    .boxed();
    let writer = Writer {
        session: session.clone(),
        control,
    };
    let outgoing = Box::pin(futures_util::sink::unfold(
        writer,
        |mut w, o: Outbound| async move {
            match o {
                Outbound::Binary(b) if b.first() == Some(&MESSAGE_CONTROL) => {
                    w.control
                        .write_all(&b[1..])
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Outbound::Binary(frame) => {
                    // One frame per unidirectional stream, as for native viewers; it counts as
                    // sent once QUIC took it (stream credit is the back-pressure).
                    let mut s = w.session.open_uni().await.map_err(|e| e.to_string())?;
                    s.write_all(&frame).await.map_err(|e| e.to_string())?;
                    let _ = s.finish();
                }
                Outbound::Close(code, reason) => {
                    // The Error before this must reach the page first: the session's close
                    // makes the browser drop what the page has not read yet, even data its
                    // QUIC stack acknowledged. So wait for the acknowledgement and then for
                    // the page, which closes the session itself once it read the Error.
                    let _ = w.control.finish();
                    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                        let _ = w.control.stopped().await;
                        w.session.closed().await
                    })
                    .await;
                    w.session.close(code as u32, reason.as_bytes());
                }
            }
            Ok::<_, String>(w)
        },
    ));
    let path = move || {
        let st = conn.stats();
        PathStats {
            rtt: st.path.rtt,
            cwnd_bytes: st.path.cwnd,
            sent_packets: st.path.sent_packets,
            lost_packets: st.path.lost_packets,
        }
    };
    viewers.serve(slot, remote, incoming, outgoing, path).await;
    session.close(0, b"");
}
