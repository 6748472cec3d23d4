//! `genos-hostd`: the GenOS host daemon. Serves the admin socket, runs the orchestrator.
//!
//! Under systemd (`Type=notify`, packaging/systemd/genos-hostd.service) it sends `READY=1`
//! once the admin socket and the stream server are bound and VMMs are re-adopted,
//! `WATCHDOG=1` at half `WATCHDOG_USEC` while its own admin socket answers, and
//! `STOPPING=1` when it is told to stop ([`notify`]). With its stderr on the journal it
//! logs in journald's native protocol, fields included ([`init_logging`]).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hostd::admin::{self, AccessPolicy};
use hostd::config::Config;
use hostd::orchestrator::Orchestrator;

#[derive(Parser)]
#[command(name = "genos-hostd", version, about = "GenOS host daemon")]
struct Args {
    /// Configuration file (default: /etc/genos/hostd.toml when it exists, else the
    /// built-in copy of configs/hostd.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory (default: $XDG_STATE_HOME/genos, else ~/.local/state/genos).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream a synthetic scene (no VM) to genos-view clients.
    ServeDemo(hostd::stream::demo::DemoArgs),
}

/// The appliance's configuration file, read when `--config` is not given.
const SYSTEM_CONFIG: &str = "/etc/genos/hostd.toml";

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging();
    if let Some(Cmd::ServeDemo(mut demo)) = args.command {
        // The demo's certificate and token key live under the global --state-dir.
        demo.state_dir = args.state_dir.clone();
        return match hostd::stream::demo::run(demo) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.as_ref()),
    }
}

/// Logs to journald in its native protocol when stderr is the journal (systemd sets
/// `JOURNAL_STREAM` to that stream's device and inode), so that event fields become journal
/// fields with a `GENOS_` prefix (`journalctl -u genos-hostd GENOS_ENV=NAME`); else text on
/// stderr.
fn init_logging() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter =
        || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let journald = stderr_is_journal()
        .then(|| tracing_journald::layer().ok())
        .flatten()
        .map(|l| {
            l.with_field_prefix(Some("GENOS".into()))
                .with_syslog_identifier("genos-hostd".into())
        });
    match journald {
        Some(layer) => tracing_subscriber::registry()
            .with(filter())
            .with(layer)
            .init(),
        None => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Whether stderr is the stream `JOURNAL_STREAM` names (systemd.exec(5)).
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    use std::os::unix::fs::MetadataExt;
    journal_stream_is(&value, meta.dev(), meta.ino())
}

/// Whether a `JOURNAL_STREAM` value (`DEVICE:INODE`) names the file `dev`, `ino`.
fn journal_stream_is(value: &str, dev: u64, ino: u64) -> bool {
    value
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("genos-hostd: {}", hostd::error_chain(e));
    ExitCode::FAILURE
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let etc = PathBuf::from(SYSTEM_CONFIG);
    let config = args.config.clone().or_else(|| etc.is_file().then_some(etc));
    let cfg = match &config {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    };
    let state_dir = cfg.state_dir(args.state_dir.as_deref())?;
    let socket = state_dir.join("admin.sock");
    let policy = AccessPolicy::new(&cfg.admin.group);
    let stream_cfg = cfg.stream.clone();
    let metrics_listen = cfg.metrics.listen.0;
    let orch = Orchestrator::new(cfg, &state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = admin::bind(&socket, &policy).await?;
        // The browser page and transport (hostd::web), on the stream port's TCP side.
        let mut _web = None;
        if stream_cfg.enabled {
            let stream_dir = state_dir.join("stream");
            let identity = hostd::stream::Identity::load_or_create(&stream_dir)?;
            let tokens = std::sync::Arc::new(hostd::stream::TokenKey::load_or_create(
                &stream_dir.join("token.key"),
            )?);
            let server_cfg = hostd::stream::ServerConfig {
                listen: stream_cfg.listen,
                usage: stream_cfg.encoder.into(),
                encoder_threads: stream_cfg.encoder_threads.fixed(),
                ..Default::default()
            };
            let server = hostd::stream::StreamServer::bind(server_cfg, &identity, tokens)?;
            let cert = match stream_cfg.tls_files()? {
                Some((cert, key)) => hostd::web::Certificate::Files { cert, key },
                None => hostd::web::Certificate::Identity(&identity),
            };
            // A bad certificate is the operator's to fix (fatal); a TCP port someone else
            // holds costs only the browser page (native viewers still connect).
            let tls = hostd::web::tls_config(cert)?;
            match hostd::web::WebServer::bind(server.local_addr()?, tls, server.message_viewers())
                .await
            {
                Ok(web) => _web = Some(web),
                Err(e) => tracing::warn!(
                    error = %hostd::error_chain(&e),
                    "browser page not served"
                ),
            }
            tracing::info!(listen = %stream_cfg.listen, "stream server ready");
            orch.set_stream_server(std::sync::Arc::new(server))?;
        }
        orch.start().await?;
        // `[fleet] etcd`: join in the background (an unreachable fleet is retried, never
        // keeping local environments from being served); leave on the way out.
        let fleet = if orch.config().fleet.etcd.is_empty() {
            None
        } else {
            let port = orch
                .stream_server()
                .and_then(|s| s.local_addr().ok())
                .map(|a| a.port());
            Some(hostd::fleet::Membership::start(
                &orch.config().fleet,
                orch.clone(),
                port,
            )?)
        };
        // `[metrics] listen`: the admin socket's /metrics also on plain HTTP over TCP.
        if let Some(addr) = metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                std::io::Error::new(e.kind(), format!("[metrics] listen {addr}: {e}"))
            })?;
            let addr = listener.local_addr()?;
            tracing::info!(listen = %addr, "metrics listener ready");
            tokio::spawn(hostd::orchestrator::serve_metrics(
                orch.clone(),
                listener,
                hostd::orchestrator::ListenerLimits::default(),
            ));
        }
        tracing::info!(socket = %socket.display(), "genos-hostd ready");
        // The listener is bound: connections made from now on are served.
        notify::send("READY=1");
        if let Some(every) = notify::watchdog_interval() {
            tokio::spawn(notify::watchdog(socket.clone(), every));
        }
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            r = admin::serve_fleet_on(orch, listener, policy, fleet.clone()) => r.map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
            r = tokio::signal::ctrl_c() => r.map_err(Into::into),
            _ = term.recv() => Ok(()),
        };
        notify::send("STOPPING=1");
        if let Some(f) = &fleet {
            f.leave().await;
        }
        // VMMs keep running: the next hostd re-adopts them.
        let _ = std::fs::remove_file(&socket);
        result
    })
}

/// systemd's notification protocol (sd_notify(3)): one datagram per state change to the
/// Unix socket named by `NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace).
/// Written here rather than taken from a crate: it is one `sendto`, and it needs no
/// dependency. Without `NOTIFY_SOCKET` (not under systemd) nothing is sent.
mod notify {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    use std::path::PathBuf;
    use std::time::Duration;

    /// Sends `state` (`READY=1`, ...) to systemd; failures are logged, never fatal.
    pub fn send(state: &str) {
        let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        let sent = address(target.to_string_lossy().as_ref()).and_then(|addr| {
            let sock = UnixDatagram::unbound()?;
            sock.send_to_addr(state.as_bytes(), &addr)
        });
        if let Err(e) = sent {
            tracing::warn!(state, error = %e, "cannot notify systemd");
        }
    }

    /// `NOTIFY_SOCKET`'s value as a socket address.
    fn address(value: &str) -> std::io::Result<SocketAddr> {
        match value.strip_prefix('@') {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())
            }
            None => SocketAddr::from_pathname(value),
        }
    }

    /// How often to ping the watchdog: half of `WATCHDOG_USEC`, when it is set for this
    /// process (`WATCHDOG_PID` absent or ours).
    pub fn watchdog_interval() -> Option<Duration> {
        interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        )
    }

    pub(super) fn interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
        if pid.is_some_and(|p| p.trim().parse::<u32>().ok() != Some(me)) {
            return None;
        }
        let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
        Some(Duration::from_micros(usec / 2))
    }

    /// Pings the watchdog every `every`, but only after the admin socket answered a
    /// `GET /v1/health` within that time: a runtime that no longer schedules, a stuck
    /// accept loop or a held store lock stops the pings, and systemd restarts the unit.
    pub async fn watchdog(socket: PathBuf, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match hostd::uds::request(&socket, "GET", "/v1/health", None, every).await {
                Ok(r) if r.ok() => send("WATCHDOG=1"),
                Ok(r) => tracing::warn!(status = r.status, "watchdog: health request refused"),
                Err(e) => tracing::warn!(error = %e, "watchdog: admin socket does not answer"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::journal_stream_is;
    use super::notify::interval;
    use std::time::Duration;

    #[test]
    fn the_journal_is_used_only_when_stderr_is_the_named_stream() {
        assert!(journal_stream_is("9:1234", 9, 1234));
        assert!(!journal_stream_is("9:1234", 9, 1235));
        assert!(!journal_stream_is("9", 9, 1234));
        assert!(!journal_stream_is("x:y", 9, 1234));
    }

    #[test]
    fn the_watchdog_pings_at_half_its_timeout_for_this_process_only() {
        assert_eq!(
            interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(interval(None, None, 7), None);
        assert_eq!(interval(Some("0"), None, 7), None);
        assert_eq!(interval(Some("soon"), None, 7), None);
    }
}
