//! Counters of what the orchestrator did and the Prometheus text built from them, the
//! store and the stream server (host totals, then one series per environment), and the
//! opt-in plain-HTTP listener that serves that text on TCP (`[metrics] listen`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{OrchError, Orchestrator};
use crate::store::{EnvRecord, EnvState};
use crate::stream::server::{EnvStats, ViewerStats};

/// What the orchestrator did since it started, for [`Orchestrator::metrics_text`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) created: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) vmm_failures: AtomicU64,
    pub(super) composed: AtomicU64,
    pub(super) clarified: AtomicU64,
    pub(super) reaped: AtomicU64,
}

/// Adds one to `counter`.
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Orchestrator {
    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> Result<String, OrchError> {
        let envs = self.store().envs(true)?;
        let mut out = String::new();
        out.push_str("# HELP genos_environments Environments by lifecycle state.\n# TYPE genos_environments gauge\n");
        for st in EnvState::ALL {
            let n = envs.iter().filter(|e| e.state == st).count();
            out.push_str(&format!(
                "genos_environments{{state=\"{}\"}} {n}\n",
                st.as_str()
            ));
        }
        let live: Vec<&EnvRecord> = envs.iter().filter(|e| e.state.is_live()).collect();
        let c = &self.inner.counters;
        let cap = self.inner.capacity;
        // Sums in integers: an empty f64 sum is -0.0, which would print as "-0".
        let count = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
        let gauges = [
            (
                "genos_vcpus_allocated",
                "vCPUs promised to live environments.",
                live.iter().map(|e| u64::from(e.spec.vcpus)).sum::<u64>() as f64,
            ),
            (
                "genos_memory_allocated_mib",
                "Memory promised to live environments.",
                live.iter()
                    .map(|e| u64::from(e.spec.memory_mib))
                    .sum::<u64>() as f64,
            ),
            (
                "genos_capacity_vcpus",
                "Host vCPUs before overcommit.",
                f64::from(cap.vcpus),
            ),
            (
                "genos_capacity_memory_mib",
                "Host memory for environments before overcommit.",
                cap.memory_mib as f64,
            ),
        ];
        let counters = [
            (
                "genos_environments_created_total",
                "Environments admitted.",
                count(&c.created),
            ),
            (
                "genos_admission_refusals_total",
                "Requests refused by admission control.",
                count(&c.refused),
            ),
            (
                "genos_vmm_failures_total",
                "VMMs that ended without being asked to.",
                count(&c.vmm_failures),
            ),
            (
                "genos_compose_requests_total",
                "Requests composed.",
                count(&c.composed),
            ),
            (
                "genos_compose_clarifications_total",
                "Composed requests answered with a question.",
                count(&c.clarified),
            ),
            (
                "genos_reaped_total",
                "Environments stopped or destroyed by TTL/idle reaping.",
                count(&c.reaped),
            ),
        ];
        for (kind, metrics) in [("gauge", &gauges[..]), ("counter", &counters[..])] {
            for (name, help, v) in metrics {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
                ));
            }
        }
        let server = self.stream_server();
        let current: Vec<EnvRecord> = envs
            .into_iter()
            .filter(|e| e.state != EnvState::Destroyed)
            .collect();
        out.push_str(&env_series(&current, |name| {
            server.and_then(|s| s.env_stats(name))
        }));
        out.push_str(&viewer_series(&current, |name| {
            server.map_or_else(Vec::new, |s| s.viewer_stats(name))
        }));
        Ok(out)
    }
}

/// A stream-server family: name, type, help, and its value in an environment's stats.
type StreamFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&EnvStats) -> u64,
);

/// Per-environment families, one series per environment not destroyed (label `env`, the
/// environment's name): its state (1 on the label of the current one), vCPUs and memory
/// from its spec, and what the stream server counts for it (only for streamed ones; `stats`
/// gives those by name). Each family's HELP and TYPE come even without environments.
pub(crate) fn env_series(envs: &[EnvRecord], stats: impl Fn(&str) -> Option<EnvStats>) -> String {
    let streamed: Vec<(&str, EnvStats)> = envs
        .iter()
        .filter_map(|e| stats(&e.name).map(|s| (e.name.as_str(), s)))
        .collect();
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    };
    let env = |name: &str| format!("env=\"{}\"", label_value(name));
    family(
        "genos_environment_state",
        "gauge",
        "Lifecycle state of each environment (1 on its current state).",
        envs.iter()
            .map(|e| {
                let labels = format!("{},state=\"{}\"", env(&e.name), e.state.as_str());
                (labels, 1)
            })
            .collect(),
    );
    family(
        "genos_environment_vcpus",
        "gauge",
        "vCPUs of each environment.",
        envs.iter()
            .map(|e| (env(&e.name), u64::from(e.spec.vcpus)))
            .collect(),
    );
    family(
        "genos_environment_memory_mib",
        "gauge",
        "Memory of each environment.",
        envs.iter()
            .map(|e| (env(&e.name), u64::from(e.spec.memory_mib)))
            .collect(),
    );
    let stream: [StreamFamily; 6] = [
        (
            "genos_environment_viewers",
            "gauge",
            "Viewers watching each streamed environment.",
            |s| s.viewers as u64,
        ),
        (
            "genos_environment_bitrate_bps",
            "gauge",
            "Encoder target bitrate of each streamed environment.",
            |s| u64::from(s.bitrate_bps),
        ),
        (
            "genos_environment_frames_encoded_total",
            "counter",
            "Frames encoded for each streamed environment.",
            |s| s.frames_encoded,
        ),
        (
            "genos_environment_keyframes_total",
            "counter",
            "Keyframes encoded for each streamed environment.",
            |s| s.keyframes,
        ),
        (
            "genos_environment_frames_dropped_total",
            "counter",
            "Frames not sent to some viewer (in-flight cap, lag), summed over viewers.",
            |s| s.frames_dropped,
        ),
        (
            "genos_environment_input_refused_total",
            "counter",
            "Input events refused (viewer without the input right, or over its rate).",
            |s| s.input_refused,
        ),
    ];
    for (name, kind, help, get) in stream {
        family(
            name,
            kind,
            help,
            streamed.iter().map(|(n, s)| (env(n), get(s))).collect(),
        );
    }
    out
}

/// A per-viewer family: name, type, help, and its value for a viewer (`None`: no sample,
/// as for a viewer that has not reported its side yet).
type ViewerFamily = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ViewerStats) -> Option<f64>,
);

/// Per-viewer families, one series per viewer joined to an environment in `envs` now
/// (labels `env`, `viewer`, the server's id of it, and `transport`): what the stream server
/// counts for it, its path's round trip, and what the viewer reports of its side (decoded
/// frames, decode time, capture-to-decoded latency, medians over its last report's
/// window). A viewer's series go when it leaves. Each family's HELP and TYPE come even
/// without viewers.
pub(crate) fn viewer_series(
    envs: &[EnvRecord],
    viewers: impl Fn(&str) -> Vec<ViewerStats>,
) -> String {
    let joined: Vec<(&str, ViewerStats)> = envs
        .iter()
        .flat_map(|e| {
            viewers(&e.name)
                .into_iter()
                .map(move |v| (e.name.as_str(), v))
        })
        .collect();
    let families: [ViewerFamily; 8] = [
        (
            "genos_viewer_frames_sent_total",
            "counter",
            "Frames sent to each viewer.",
            |v| Some(v.frames_sent as f64),
        ),
        (
            "genos_viewer_frames_dropped_total",
            "counter",
            "Frames not sent to each viewer (in-flight cap, lag, waiting for a keyframe).",
            |v| Some(v.frames_dropped as f64),
        ),
        (
            "genos_viewer_input_events_total",
            "counter",
            "Input events each viewer delivered to its environment.",
            |v| Some(v.input_events as f64),
        ),
        (
            "genos_viewer_bitrate_target_bps",
            "gauge",
            "Each viewer's adaptive bitrate target.",
            |v| Some(f64::from(v.bitrate_target_bps)),
        ),
        (
            "genos_viewer_rtt_seconds",
            "gauge",
            "Smoothed round-trip time of each viewer's connection.",
            |v| Some(v.rtt.as_secs_f64()),
        ),
        (
            "genos_viewer_decoded_frames_total",
            "counter",
            "Frames each viewer reports decoded.",
            |v| v.client.map(|c| c.frames_decoded as f64),
        ),
        (
            "genos_viewer_decode_seconds",
            "gauge",
            "Median decode time each viewer reports.",
            |v| v.client.map(|c| f64::from(c.decode_us_p50) / 1e6),
        ),
        (
            "genos_viewer_latency_seconds",
            "gauge",
            "Median capture-to-decoded latency each viewer reports.",
            |v| v.client.map(|c| f64::from(c.latency_us_p50) / 1e6),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (env, v) in &joined {
            if let Some(value) = get(v) {
                let _ = writeln!(
                    out,
                    "{name}{{env=\"{}\",viewer=\"{}\",transport=\"{}\"}} {value}",
                    label_value(env),
                    v.viewer,
                    v.transport
                );
            }
        }
    }
    out
}

/// A label value in the text format: backslash, double quote and newline escaped.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Bounds of the metrics listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// Connections served at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time for a client to send its request head.
    pub read_timeout: Duration,
    /// Time to write the answer.
    pub write_timeout: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: 16,
            read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
        }
    }
}

/// Largest request head read; a scraper's GET is a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Serves `GET /metrics` (the same text as the admin socket's) over plain HTTP/1.x on
/// `listener`, one request per connection, until the task is dropped. Anything else gets
/// 404 (another path), 405 (another method) or 400; a connection over
/// `limits.max_connections` gets 503 (and is dropped unanswered while as many others are
/// being refused), one that sends no request head within `limits.read_timeout` is closed.
pub async fn serve_metrics(orch: Orchestrator, listener: TcpListener, limits: ListenerLimits) {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let refusals = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Told so while as many again are being told; past that, dropped at once.
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    let _refusal = refusal;
                    let answer = response("503 Service Unavailable", "too many connections\n");
                    let _ = finish(&mut conn, &answer, limits).await;
                });
            }
            continue;
        };
        let orch = orch.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = serve_one(&orch, &mut conn, limits).await {
                tracing::debug!(%peer, error = %e, "metrics connection");
            }
        });
    }
}

async fn serve_one(
    orch: &Orchestrator,
    conn: &mut TcpStream,
    limits: ListenerLimits,
) -> std::io::Result<()> {
    let timed_out = |what| std::io::Error::new(std::io::ErrorKind::TimedOut, what);
    let head = tokio::time::timeout(limits.read_timeout, read_head(conn))
        .await
        .map_err(|_| timed_out("no request within the read timeout"))??;
    let answer = match head.as_deref().map(request_line) {
        Some(Some(("GET", "/metrics"))) => match orch.metrics_text() {
            Ok(text) => response("200 OK", &text),
            Err(e) => response("500 Internal Server Error", &format!("{e}\n")),
        },
        Some(Some(("GET", _))) => response("404 Not Found", "only /metrics is served here\n"),
        Some(Some(_)) => response("405 Method Not Allowed", "only GET /metrics\n"),
        Some(None) | None => response("400 Bad Request", "not an HTTP request\n"),
    };
    finish(conn, &answer, limits).await
}

/// Writes `answer` and closes the connection.
async fn finish(
    conn: &mut TcpStream,
    answer: &[u8],
    limits: ListenerLimits,
) -> std::io::Result<()> {
    tokio::time::timeout(limits.write_timeout, async {
        conn.write_all(answer).await?;
        conn.shutdown().await
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "answer not taken within the write timeout",
        )
    })??;
    // Closing with unread input (the rest of an oversized head) would reset the connection
    // and could lose the answer: read a bounded amount first, as servers' lingering close.
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 4096];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    Ok(())
}

/// How long and how much a closing connection's unread input is drained.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

/// Reads up to the end of the request head; `None` when it is longer than
/// [`MAX_REQUEST_HEAD`] or the peer closes first.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8(buf).ok());
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

/// Method and path (query cut off) of an HTTP/1.x request head.
fn request_line(head: &str) -> Option<(&str, &str)> {
    let mut parts = head.lines().next()?.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

fn response(status: &str, body: &str) -> Vec<u8> {
    let kind = if status.starts_with("200") {
        "text/plain; version=0.0.4"
    } else {
        "text/plain"
    };
    let allow = if status.starts_with("405") {
        "Allow: GET\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::{env_series, serve_metrics, viewer_series, ListenerLimits};
    use crate::composer::Outcome;
    use crate::config::Config;
    use crate::orchestrator::Orchestrator;
    use crate::store::EnvState;
    use crate::stream::server::{EnvStats, ViewerStats};

    fn orchestrator() -> (tempfile::TempDir, Orchestrator) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml("[capacity]\nvcpus = 4\nmemory_mib = 8192\n").unwrap();
        let o = Orchestrator::new(cfg, dir.path()).unwrap();
        (dir, o)
    }

    /// Adds an environment named `name` with `vcpus` and `memory_mib` to the store.
    fn add_env(o: &Orchestrator, name: &str, vcpus: u32, memory_mib: u32, state: EnvState) {
        let Outcome::Spec(spec) = o.compose("python headless").outcome else {
            panic!("no spec");
        };
        let spec = proto::spec::Spec {
            name: name.into(),
            vcpus,
            memory_mib,
            ..*spec
        };
        let mut store = o.store();
        store.insert_env(&spec).unwrap();
        store.set_state(name, state, None).unwrap();
    }

    #[test]
    fn each_environment_has_its_own_series_and_streamed_ones_their_counters() {
        let (_dir, o) = orchestrator();
        add_env(&o, "dev", 2, 4096, EnvState::Ready);
        add_env(&o, "ci\"x", 1, 1024, EnvState::Building);
        let envs = o.store().envs(false).unwrap();
        let stats = |name: &str| {
            (name == "dev").then_some(EnvStats {
                viewers: 2,
                frames_encoded: 900,
                keyframes: 3,
                bitrate_bps: 1_800_000,
                input_refused: 4,
                frames_dropped: 7,
            })
        };

        let text = env_series(&envs, stats);

        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "genos_environment_state{env=\"dev\",state=\"ready\"} 1",
                "genos_environment_state{env=\"ci\\\"x\",state=\"building\"} 1",
                "genos_environment_vcpus{env=\"dev\"} 2",
                "genos_environment_vcpus{env=\"ci\\\"x\"} 1",
                "genos_environment_memory_mib{env=\"dev\"} 4096",
                "genos_environment_memory_mib{env=\"ci\\\"x\"} 1024",
                "genos_environment_viewers{env=\"dev\"} 2",
                "genos_environment_bitrate_bps{env=\"dev\"} 1800000",
                "genos_environment_frames_encoded_total{env=\"dev\"} 900",
                "genos_environment_keyframes_total{env=\"dev\"} 3",
                "genos_environment_frames_dropped_total{env=\"dev\"} 7",
                "genos_environment_input_refused_total{env=\"dev\"} 4",
            ]
        );
        assert_eq!(text.matches("# HELP ").count(), 9);
        assert!(text.contains("# TYPE genos_environment_frames_dropped_total counter\n"));
        assert!(text.contains("# TYPE genos_environment_viewers gauge\n"));
    }

    #[test]
    fn each_joined_viewer_has_its_series_and_reported_ones_their_side() {
        let (_dir, o) = orchestrator();
        add_env(&o, "dev", 2, 4096, EnvState::Ready);
        let envs = o.store().envs(false).unwrap();
        let viewer = |id, transport, client| ViewerStats {
            viewer: id,
            transport,
            frames_sent: 600,
            frames_dropped: 2,
            input_events: 40,
            bitrate_target_bps: 3_000_000,
            rtt: std::time::Duration::from_micros(1_500),
            client,
        };
        let reported = proto::stream::ClientStats {
            frames_decoded: 590,
            frames_dropped: 1,
            decode_us_p50: 4_250,
            latency_us_p50: 15_000,
        };
        let viewers = |name: &str| match name {
            "dev" => vec![viewer(3, "quic", Some(reported)), viewer(9, "web", None)],
            _ => vec![],
        };

        let text = viewer_series(&envs, viewers);

        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let quic = "{env=\"dev\",viewer=\"3\",transport=\"quic\"}";
        let web = "{env=\"dev\",viewer=\"9\",transport=\"web\"}";
        assert_eq!(
            samples,
            [
                format!("genos_viewer_frames_sent_total{quic} 600"),
                format!("genos_viewer_frames_sent_total{web} 600"),
                format!("genos_viewer_frames_dropped_total{quic} 2"),
                format!("genos_viewer_frames_dropped_total{web} 2"),
                format!("genos_viewer_input_events_total{quic} 40"),
                format!("genos_viewer_input_events_total{web} 40"),
                format!("genos_viewer_bitrate_target_bps{quic} 3000000"),
                format!("genos_viewer_bitrate_target_bps{web} 3000000"),
                format!("genos_viewer_rtt_seconds{quic} 0.0015"),
                format!("genos_viewer_rtt_seconds{web} 0.0015"),
                format!("genos_viewer_decoded_frames_total{quic} 590"),
                format!("genos_viewer_decode_seconds{quic} 0.00425"),
                format!("genos_viewer_latency_seconds{quic} 0.015"),
            ]
        );
        assert_eq!(text.matches("# HELP ").count(), 8);
        assert!(text.contains("# TYPE genos_viewer_latency_seconds gauge\n"));
    }

    #[test]
    fn a_destroyed_environment_leaves_the_per_environment_series() {
        let (_dir, o) = orchestrator();
        add_env(&o, "old", 2, 2048, EnvState::Stopped);
        o.store()
            .set_state("old", EnvState::Destroyed, None)
            .unwrap();

        let text = o.metrics_text().unwrap();

        assert!(text.contains("genos_environments{state=\"destroyed\"} 1\n"));
        assert!(!text.contains("env=\"old\""), "{text}");
    }

    /// Sends `request` to `addr` and reads the whole answer.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(request).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut answer))
            .await
            .expect("answered within 5 s")
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn the_listener_serves_get_metrics_and_refuses_everything_else() {
        let (_dir, o) = orchestrator();
        add_env(&o, "dev", 2, 4096, EnvState::Ready);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_metrics(
            o.clone(),
            listener,
            ListenerLimits::default(),
        ));

        let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let other = exchange(addr, b"GET /v1/envs HTTP/1.1\r\n\r\n").await;
        let post = exchange(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        let junk = exchange(addr, b"hello\r\n\r\n").await;
        let huge = exchange(addr, &[b'a'; 20_000]).await;
        server.abort();

        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4"));
        assert_eq!(body, o.metrics_text().unwrap());
        assert!(body.contains("genos_environment_state{env=\"dev\",state=\"ready\"} 1\n"));
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        assert!(
            post.starts_with("HTTP/1.1 405 ") && post.contains("Allow: GET"),
            "{post}"
        );
        assert!(junk.starts_with("HTTP/1.1 400 "), "{junk}");
        assert!(huge.starts_with("HTTP/1.1 400 "), "{huge}");
    }

    #[tokio::test]
    async fn the_listener_closes_silent_connections_and_turns_away_those_over_its_bound() {
        let (_dir, o) = orchestrator();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = ListenerLimits {
            max_connections: 1,
            read_timeout: Duration::from_millis(300),
            write_timeout: Duration::from_secs(1),
        };
        let server = tokio::spawn(serve_metrics(o, listener, limits));

        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let turned_away = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        let started = std::time::Instant::now();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest))
            .await
            .expect("closed within 5 s");
        let closed_after = started.elapsed();
        let served_again = exchange(addr, b"GET /metrics HTTP/1.1\r\n\r\n").await;
        server.abort();

        assert!(turned_away.starts_with("HTTP/1.1 503 "), "{turned_away}");
        assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
        assert!(closed_after < Duration::from_secs(2), "{closed_after:?}");
        assert!(served_again.starts_with("HTTP/1.1 200 "), "{served_again}");
    }

    #[test]
    fn metrics_are_gauges_then_counters_with_help_and_type() {
        let (_dir, o) = orchestrator();
        o.compose("python headless");

        let text = o.metrics_text().unwrap();

        let (states, rest) = text.split_at(text.find("# HELP genos_vcpus").unwrap());
        let (rest, per_env) = rest.split_at(rest.find("# HELP genos_environment_state").unwrap());
        let (per_env, per_viewer) = per_env.split_at(per_env.find("# HELP genos_viewer_").unwrap());
        assert_eq!(per_env, env_series(&[], |_| None));
        assert_eq!(per_viewer, viewer_series(&[], |_| vec![]));
        assert_eq!(states.lines().count(), 2 + 7, "{states}");
        assert!(states.contains("genos_environments{state=\"ready\"} 0\n"));
        let want = [
            (
                "genos_vcpus_allocated",
                "gauge",
                "vCPUs promised to live environments.",
                0,
            ),
            (
                "genos_memory_allocated_mib",
                "gauge",
                "Memory promised to live environments.",
                0,
            ),
            (
                "genos_capacity_vcpus",
                "gauge",
                "Host vCPUs before overcommit.",
                4,
            ),
            (
                "genos_capacity_memory_mib",
                "gauge",
                "Host memory for environments before overcommit.",
                8192,
            ),
            (
                "genos_environments_created_total",
                "counter",
                "Environments admitted.",
                0,
            ),
            (
                "genos_admission_refusals_total",
                "counter",
                "Requests refused by admission control.",
                0,
            ),
            (
                "genos_vmm_failures_total",
                "counter",
                "VMMs that ended without being asked to.",
                0,
            ),
            (
                "genos_compose_requests_total",
                "counter",
                "Requests composed.",
                1,
            ),
            (
                "genos_compose_clarifications_total",
                "counter",
                "Composed requests answered with a question.",
                0,
            ),
            (
                "genos_reaped_total",
                "counter",
                "Environments stopped or destroyed by TTL/idle reaping.",
                0,
            ),
        ]
        .map(|(name, kind, help, v)| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        })
        .concat();
        assert_eq!(rest, want);
    }
}
