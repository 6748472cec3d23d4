//! `genos-hostd serve-demo`: stream a synthetic scene so a person can try streaming before any
//! VM exists. Prints the connect URL (fresh token, certificate fingerprint) as the first line
//! of standard output and the browser link (`https://HOST:PORT/#env=..&token=..`, the page
//! served over HTTPS on the same port number's TCP side) as the second, and serves until
//! interrupted.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::stream::Rights;
use scenes::Scene;

use super::identity::{Identity, IdentityError};
use super::server::{ServerConfig, StreamError, StreamServer};
use super::source;
use super::token::{EnvRef, TokenKey, TokenKeyError};

/// Why the demo server could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid --size {0:?}: expected WIDTHxHEIGHT, each 16..=4096")]
    Size(String),
    #[error("invalid --fps {0}: expected 1..=240")]
    Fps(f32),
    #[error("loading the server identity failed")]
    Identity(#[from] IdentityError),
    #[error("token key")]
    Token(#[from] TokenKeyError),
    #[error("stream server")]
    Server(#[from] StreamError),
    #[error("web client server")]
    Web(#[from] crate::web::WebError),
    #[error("I/O")]
    Io(#[from] std::io::Error),
}

/// Arguments of `serve-demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Synthetic scene: windows, typing, scrolling or still.
    #[arg(long, default_value = "windows")]
    pub scene: Scene,
    /// Frame size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720")]
    pub size: String,
    /// Frames per second.
    #[arg(long, default_value_t = 30.0)]
    pub fps: f32,
    /// UDP address to listen on (the browser page is served on the same TCP port).
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,
    /// Host name in the browser link (default: the listen address).
    #[arg(long)]
    pub public_host: Option<String>,
    /// Environment id in the URL.
    #[arg(long, default_value = "demo")]
    pub env_id: String,
    /// Rights of the printed token (comma-separated: view,input,clipboard,admin).
    #[arg(long, default_value = "view,input,clipboard")]
    pub rights: Rights,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: u64,
    /// State directory whose `stream/` holds the certificate and token key (created if
    /// missing). Not a flag of its own: genos-hostd fills it from its global `--state-dir`;
    /// `None` means [`default_state_dir`].
    #[arg(skip)]
    pub state_dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<(u32, u32), DemoError> {
    let err = || DemoError::Size(s.to_owned());
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(err)?;
    let w: u32 = w.parse().map_err(|_| err())?;
    let h: u32 = h.parse().map_err(|_| err())?;
    if !(16..=4096).contains(&w) || !(16..=4096).contains(&h) {
        return Err(err());
    }
    Ok((w, h))
}

/// hostd's default state directory: `$XDG_STATE_HOME/genos`, else `~/.local/state/genos`.
pub fn default_state_dir() -> PathBuf {
    std::env::var_os("XDG_STATE_HOME")
        .map(|d| PathBuf::from(d).join("genos"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/genos")))
        .unwrap_or_else(|| PathBuf::from("/var/lib/genos"))
}

/// Runs the demo server on the current tokio runtime until Ctrl-C or SIGTERM.
pub async fn serve(args: DemoArgs) -> Result<(), DemoError> {
    let (width, height) = parse_size(&args.size)?;
    if !(1.0..=240.0).contains(&args.fps) {
        return Err(DemoError::Fps(args.fps));
    }
    let dir = args
        .state_dir
        .clone()
        .unwrap_or_else(default_state_dir)
        .join("stream");
    let identity = Identity::load_or_create(&dir)?;
    let tokens = Arc::new(TokenKey::load_or_create(&dir.join("token.key"))?);
    let cfg = ServerConfig {
        listen: args.listen,
        ..ServerConfig::default()
    };
    let server = StreamServer::bind(cfg, &identity, tokens.clone())?;
    let (src, _input) = source::synthetic(args.scene, width, height, args.fps);
    // Each run is a new environment: tokens printed by an earlier run do not open it.
    let mut uid = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut uid)
        .map_err(|_| TokenKeyError::Random)?;
    let env = EnvRef::new(args.env_id.clone(), u64::from_le_bytes(uid));
    server.add_environment(&env, src, args.fps)?;
    let token = tokens.issue(&env, args.rights, Duration::from_secs(args.ttl_secs))?;
    let url = server.connect_url(&args.env_id, &token)?;
    // The page on the same port number, TCP (port 0 asked: the one the UDP socket got).
    let bound = server.local_addr()?;
    let web = crate::web::WebServer::bind(
        bound,
        crate::web::tls_config(crate::web::Certificate::Identity(&identity))?,
        server.message_viewers(),
    )
    .await?;
    let host = crate::web::link_host(args.public_host.as_deref(), web.local_addr());
    let web_url = crate::web::web_url(&host, web.local_addr().port(), &args.env_id, &token);
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{url}")?;
        writeln!(out, "{web_url}")?;
        out.flush()?;
    }
    eprintln!(
        "serving scene {} at {width}x{height} {} fps on {bound} (UDP, and TCP for browsers); \
         view with: genos-view '{url}', or open the https link in a browser",
        args.scene, args.fps,
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    server.shutdown();
    drop(web);
    Ok(())
}

/// Builds a tokio runtime and runs [`serve`] on it (for a synchronous `main`).
pub fn run(args: DemoArgs) -> Result<(), DemoError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(args))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_parses_and_rejects_nonsense() {
        assert_eq!(parse_size("1920x1080").unwrap(), (1920, 1080));
        for bad in ["", "1920", "0x10", "1920x", "axb", "99999x10"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
