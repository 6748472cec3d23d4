//! Helpers shared by the client's end-to-end suites: a stream server on loopback serving a
//! synthetic desktop, tokens and URLs for it, and waiting for a session's next event of one
//! kind; a scripted server and an X server for the viewer's own tests.

#![allow(dead_code)]

pub mod scripted;
pub mod x11;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use client::{ClientError, ConnectOptions, ConnectUrl, Event, Session};
use hostd::stream::source::{self, EnvironmentSource, RecordingInput};
use hostd::stream::{EnvRef, Identity, ServerConfig, StreamServer, TokenKey};
use proto::stream::{ErrorCode, Rights};
use scenes::Scene;

pub const HOUR: Duration = Duration::from_secs(3600);

/// A stream server on loopback, the input its synthetic source received, and the key its
/// tokens are signed with.
pub struct Harness {
    pub server: StreamServer,
    pub input: Arc<RecordingInput>,
    pub tokens: Arc<TokenKey>,
}

/// A stream server (`cfg`) serving `src` at `fps` as environment `env`, and its token key.
pub fn serve(
    cfg: ServerConfig,
    env: &EnvRef,
    src: EnvironmentSource,
    fps: f32,
) -> (StreamServer, Arc<TokenKey>) {
    let identity = Identity::generate(&[]).unwrap();
    let tokens = Arc::new(TokenKey::generate().unwrap());
    let server = StreamServer::bind(cfg, &identity, tokens.clone()).unwrap();
    server.add_environment(env, src, fps).unwrap();
    (server, tokens)
}

/// A stream server (`cfg`) serving the synthetic `scene` at `w` x `h`, `fps` as `env`.
pub fn start(cfg: ServerConfig, env: &EnvRef, scene: Scene, w: u32, h: u32, fps: f32) -> Harness {
    let (src, input) = source::synthetic(scene, w, h, fps);
    let (server, tokens) = serve(cfg, env, src, fps);
    Harness {
        server,
        input,
        tokens,
    }
}

impl Harness {
    /// A URL for environment `env` with `token`.
    pub fn url_with_token(&self, env: &str, token: &str) -> ConnectUrl {
        self.server
            .connect_url(env, token)
            .unwrap()
            .parse()
            .unwrap()
    }

    /// A URL for `env` with a fresh token of `rights`, valid for an hour.
    pub fn url(&self, env: &EnvRef, rights: Rights) -> ConnectUrl {
        let token = self.tokens.issue(env, rights, HOUR).unwrap();
        self.url_with_token(&env.name, &token)
    }
}

/// The next event of the session that `pick` takes, skipping the others; fails the test
/// when none comes within `secs` (naming `what`) or the session closes first.
pub async fn next_event<T>(
    s: &mut Session,
    secs: u64,
    what: &str,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> T {
    loop {
        let event = tokio::time::timeout(Duration::from_secs(secs), s.next_event())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {secs} s"))
            .expect("session ended");
        if let Event::Closed(r) = &event {
            panic!("session closed: {r}");
        }
        if let Some(taken) = pick(event) {
            return taken;
        }
    }
}

/// The session's next frame (within 10 s).
pub async fn next_frame(s: &mut Session) -> client::Frame {
    next_event(s, 10, "event", |e| match e {
        Event::Frame(f) => Some(f),
        _ => None,
    })
    .await
}

/// The refusal `url` meets: its code and message; fails the test if the session is admitted
/// or fails otherwise.
pub async fn refused(url: &ConnectUrl) -> (ErrorCode, String) {
    match Session::connect(url, ConnectOptions::default()).await {
        Err(ClientError::Refused { code, message }) => (code, message),
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, the session was admitted"),
    }
}

/// A QUIC client config that trusts the certificate `url` pins, for tests that speak the
/// protocol by hand.
pub fn quic_client_config(url: &ConnectUrl) -> quinn::ClientConfig {
    let (tls, _) = client::tls::client_config(url.cert_sha256).unwrap();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

/// A QUIC connection with `cfg` to the server `url` names, from 127.0.0.1, nothing sent yet.
pub async fn raw_connection(
    url: &ConnectUrl,
    cfg: quinn::ClientConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(cfg);
    let addr = format!("{}:{}", url.host, url.port).parse().unwrap();
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    (ep, conn)
}

/// How the server closed `conn` (within 5 s); fails the test, saying `what`, if it did not
/// close it with an application close.
pub async fn server_close(conn: &quinn::Connection, what: &str) -> quinn::ApplicationClose {
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => c,
        other => panic!("unexpected close: {other}"),
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
