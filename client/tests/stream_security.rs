//! Hostile peers and tokens that stop counting, on loopback: half-open handshake floods,
//! oversized Hellos, tokens of a destroyed namesake, revoked tokens, and tokens that expire
//! during a session.
//!
//! Floods are bounded in count and time and go only to 127.0.0.1 and ::1.

mod support;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use client::{ConnectOptions, ConnectUrl, Event, Session};
use hostd::stream::source;
use hostd::stream::{EnvRef, ServerConfig, TokenKey};
use proto::stream::{ClientMessage, ErrorCode, InputEvent, Message, Rights, MAX_HELLO_LEN};
use scenes::Scene;
use support::{next_frame, now_unix, quic_client_config, refused, Harness, HOUR};

fn start(cfg: ServerConfig, env: &EnvRef) -> Harness {
    support::start(cfg, env, Scene::Windows, 64, 64, 30.0)
}

impl Harness {
    /// A URL for `env` with `token`, reaching the server at `ip`.
    fn url_at(&self, ip: std::net::IpAddr, env: &str, token: &str) -> ConnectUrl {
        let addr = SocketAddr::new(ip, self.server.local_addr().unwrap().port());
        hostd::stream::connect_url(addr, env, token, self.server.fingerprint())
            .parse()
            .unwrap()
    }
    fn url_v4(&self, env: &EnvRef, token: &str) -> ConnectUrl {
        self.url_at(Ipv4Addr::LOCALHOST.into(), &env.name, token)
    }
}

/// Waits for the session's end and returns its reason; panics if it is still open after
/// `limit`.
async fn closed_within(s: &mut Session, limit: Duration) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, s.next_event()).await {
            Err(_) => panic!("session still open after {limit:?}"),
            Ok(None) => return "events ended".into(),
            Ok(Some(Event::Closed(r))) => return r,
            Ok(Some(_)) => {}
        }
    }
}

/// One client Initial datagram for `server`, as a real client's first packet (built by
/// quinn's sans-IO core, never driven further).
fn client_initial(server: SocketAddr, cfg: &quinn::ClientConfig) -> Vec<u8> {
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    let (_, mut conn) = ep.connect(now, cfg.clone(), server, "localhost").unwrap();
    let mut buf = Vec::with_capacity(1500);
    let t = conn
        .poll_transmit(now, 1, &mut buf)
        .expect("a client's first transmit is its Initial");
    buf.truncate(t.size);
    buf
}

/// Sends `count` Initials, each from a fresh socket (a fresh client port) and never
/// answered, spread over `over`, alternating between `targets`. Returns how many were sent.
fn initial_flood(
    targets: Vec<SocketAddr>,
    cfg: quinn::ClientConfig,
    count: usize,
    over: Duration,
) -> usize {
    let mut sockets = Vec::with_capacity(count);
    let gap = over / count as u32;
    for i in 0..count {
        let to = targets[i % targets.len()];
        let bind: SocketAddr = if to.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let sock = UdpSocket::bind(bind).unwrap();
        sock.send_to(&client_initial(to, &cfg), to).unwrap();
        // Kept open (and never read) until the flood ends: the half-open peer stays.
        sockets.push(sock);
        std::thread::sleep(gap);
    }
    sockets.len()
}

/// Clients that complete the QUIC handshake from `from` and then never send a Hello.
async fn handshake_only(
    server: SocketAddr,
    cfg: &quinn::ClientConfig,
    n: usize,
) -> Vec<(quinn::Endpoint, quinn::Connection)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let bind: SocketAddr = (Ipv6Addr::LOCALHOST, 0).into();
        let mut ep = quinn::Endpoint::client(bind).unwrap();
        ep.set_default_client_config(cfg.clone());
        let conn = ep.connect(server, "localhost").unwrap().await.unwrap();
        out.push((ep, conn));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_connects_and_gets_frames_while_half_open_handshakes_flood_the_server() {
    // Arrange: a dual-stack server; the flood comes from 127.0.0.1 (the viewer's own
    // address) and ::1; connections that finish the handshake but never say Hello hold every
    // pending slot of ::1.
    let env = EnvRef::new("flooded", 1);
    let cfg = ServerConfig {
        listen: (Ipv6Addr::UNSPECIFIED, 0).into(),
        handshake_timeout: Duration::from_secs(3),
        hello_timeout: Duration::from_secs(6),
        ..ServerConfig::default()
    };
    let (threshold, pending_cap) = (cfg.retry_threshold, cfg.max_pending_per_prefix);
    let hx = start(cfg, &env);
    let token = hx.tokens.issue(&env, Rights::VIEW, HOUR).unwrap();
    let url = hx.url_v4(&env, &token);
    let port = hx.server.local_addr().unwrap().port();
    let v4: SocketAddr = (Ipv4Addr::LOCALHOST, port).into();
    let v6: SocketAddr = (Ipv6Addr::LOCALHOST, port).into();
    let quic = quic_client_config(&url);
    let flood_cfg = quic.clone();
    let flood = tokio::task::spawn_blocking(move || {
        initial_flood(vec![v4, v6], flood_cfg, 240, Duration::from_secs(3))
    });
    let _silent = handshake_only(v6, &quic, pending_cap).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Act: a legitimate viewer from 127.0.0.1 while the flood runs.
    let mut viewer = Session::connect(&url, ConnectOptions::default())
        .await
        .expect("a legitimate viewer must get in during the flood");
    next_frame(&mut viewer).await;
    let during = hx.server.admission_stats();
    let sent = flood.await.unwrap();
    eprintln!("flood of {sent} Initials; while the viewer joined: {during:?}");

    // Assert: the flood was answered with Retries and never held more than the threshold;
    // the viewer is the one session; half-open state drains after the deadlines.
    assert!(
        during.unvalidated + during.pending > 0,
        "the viewer connected after the half-open state had drained: {during:?}"
    );
    assert!(
        during.retries > 0,
        "no Retry under a flood of {sent}: {during:?}"
    );
    assert!(during.unvalidated <= threshold, "{during:?}");
    assert_eq!(during.sessions, 1, "{during:?}");
    next_frame(&mut viewer).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let drained = loop {
        let s = hx.server.admission_stats();
        if (s.unvalidated, s.pending) == (0, 0) || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("after the deadlines: {drained:?}");
    assert_eq!(
        (drained.unvalidated, drained.pending),
        (0, 0),
        "{drained:?}"
    );
    assert!(drained.handshake_timeouts >= 1, "{drained:?}");
    assert!(drained.hello_timeouts >= pending_cap as u64, "{drained:?}");
    assert_eq!(drained.sessions, 1);
    viewer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_longer_than_a_hello_is_refused_before_it_is_buffered() {
    let env = EnvRef::new("e", 1);
    let cfg = ServerConfig {
        hello_timeout: Duration::from_secs(60),
        ..ServerConfig::default()
    };
    let hx = start(cfg, &env);
    let url = hx.url_v4(&env, "t");

    // A length prefix beyond a Hello's is refused at once, not buffered until the Hello
    // timeout (the server's receive window holds only a few KiB before authentication).
    let (_ep, conn) = support::raw_connection(&url, quic_client_config(&url)).await;
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(&(1u32 << 20).to_le_bytes()).await.unwrap();
    // The server may already have closed on the length alone: this write then fails.
    let _ = send.write_all(&[0u8; 1024]).await;
    let close = support::server_close(&conn, "the server waited for the oversized Hello").await;
    assert_eq!(
        close.error_code,
        (ErrorCode::ProtocolViolation as u32).into()
    );
    let why = String::from_utf8_lossy(&close.reason);
    assert!(why.contains("exceeds limit"), "{why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_for_a_destroyed_environment_does_not_open_a_new_one_of_the_same_name() {
    let old = EnvRef::new("dev", 1);
    let hx = start(ServerConfig::default(), &old);
    let old_token = hx.tokens.issue(&old, Rights::all(), HOUR).unwrap();
    // `dev` is destroyed and a new `dev` (a new store id) takes its name.
    hx.server.remove_environment("dev");
    let new = EnvRef::new("dev", 2);
    let (src, _) = source::synthetic(Scene::Still, 64, 64, 10.0);
    hx.server.add_environment(&new, src, 10.0).unwrap();

    let (code, message) = refused(&hx.url_v4(&new, &old_token)).await;
    let new_token = hx.tokens.issue(&new, Rights::VIEW, HOUR).unwrap();
    let mut s = Session::connect(&hx.url_v4(&new, &new_token), ConnectOptions::default())
        .await
        .unwrap();

    assert_eq!(code, ErrorCode::WrongEnvironment, "{message}");
    assert!(message.contains("earlier environment"), "{message}");
    next_frame(&mut s).await;
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refused_and_the_session_using_it_is_cut() {
    let env = EnvRef::new("e", 1);
    let hx = start(ServerConfig::default(), &env);
    let revoked = hx.tokens.issue(&env, Rights::VIEW, HOUR).unwrap();
    let kept = hx.tokens.issue(&env, Rights::VIEW, HOUR).unwrap();
    let mut victim = Session::connect(&hx.url_v4(&env, &revoked), ConnectOptions::default())
        .await
        .unwrap();
    let mut bystander = Session::connect(&hx.url_v4(&env, &kept), ConnectOptions::default())
        .await
        .unwrap();
    next_frame(&mut victim).await;

    let claims = hx.tokens.decode(&revoked).unwrap();
    hx.server.revoke_token(claims.id, claims.expires_unix);

    let reason = closed_within(&mut victim, Duration::from_secs(5)).await;
    assert!(reason.contains("revoked"), "{reason}");
    let (code, message) = refused(&hx.url_v4(&env, &revoked)).await;
    assert_eq!(code, ErrorCode::TokenRevoked, "{message}");
    next_frame(&mut bystander).await;

    // Destroying the environment revokes every token of it.
    hx.server.revoke_environment(env.uid);
    let reason = closed_within(&mut bystander, Duration::from_secs(5)).await;
    assert!(reason.contains("environment was destroyed"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_expiring_mid_session_stops_input_at_once_and_video_after_the_grace_period() {
    let env = EnvRef::new("e", 1);
    let grace = Duration::from_secs(2);
    let cfg = ServerConfig {
        expiry_grace: grace,
        ..ServerConfig::default()
    };
    let hx = start(cfg, &env);
    let expires_unix = now_unix() + 2;
    let token = hx
        .tokens
        .issue_expiring_at(&env, Rights::VIEW | Rights::INPUT, expires_unix)
        .unwrap();
    let mut s = Session::connect(&hx.url_v4(&env, &token), ConnectOptions::default())
        .await
        .unwrap();
    let held = InputEvent::Key {
        code: 30,
        pressed: true,
    };
    s.send_input(held);

    // Expiry: a warning, the held key let go, later input refused, video still flowing.
    let warning = loop {
        match tokio::time::timeout(Duration::from_secs(5), s.next_event())
            .await
            .expect("no expiry warning within 5 s")
            .expect("session ended")
        {
            Event::Error { code, message } => break (code, message),
            Event::Closed(r) => panic!("closed before the grace period: {r}"),
            _ => {}
        }
    };
    let after_expiry = Instant::now();
    s.send_input(InputEvent::Key {
        code: 31,
        pressed: true,
    });
    next_frame(&mut s).await;
    let reason = closed_within(&mut s, grace + Duration::from_secs(5)).await;
    let video_lasted = after_expiry.elapsed();

    assert_eq!(warning.0, ErrorCode::SessionExpiring, "{}", warning.1);
    assert!(
        warning.1.contains("input is no longer accepted"),
        "{}",
        warning.1
    );
    assert!(now_unix() >= expires_unix);
    assert_eq!(
        hx.input.events(),
        vec![
            held,
            InputEvent::Key {
                code: 30,
                pressed: false
            }
        ],
        "only the key pressed before expiry arrives, and it is released at expiry"
    );
    assert!(hx.server.env_stats("e").unwrap().input_refused >= 1);
    assert!(reason.contains("expired"), "{reason}");
    assert!(
        video_lasted >= grace - Duration::from_millis(500),
        "video ended {video_lasted:?} after expiry, grace is {grace:?}"
    );
}

/// Hello messages are built by the client library; this one checks the bound is generous
/// enough for real Hellos: a long environment name and a real token.
#[test]
fn a_real_hello_fits_the_pre_authentication_bound() {
    let key = TokenKey::generate().unwrap();
    let name = "e".repeat(255);
    let token = key
        .issue(&EnvRef::new(&*name, u64::MAX), Rights::all(), HOUR)
        .unwrap();
    let hello = ClientMessage::Hello {
        min_version: 1,
        max_version: 1,
        env_id: name,
        token,
        resume: [0xff; 16],
        viewport_width: 3840,
        viewport_height: 2160,
    };
    assert!(hello.to_bytes().len() - 4 <= MAX_HELLO_LEN);
}
