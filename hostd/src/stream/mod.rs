//! Streaming server: environments' screens to viewers over QUIC, viewers' input back.
//!
//! One [`server::StreamServer`] per hostd serves every environment. Each environment has one
//! frame source and one shared encoder (on its own thread); each viewer gets the newest frames
//! on per-frame QUIC streams, with keyframes on join/request and per-viewer adaptive bitrate
//! feeding the shared encoder. Wire format: `proto::stream`, documented in `docs/protocol.md`.

pub mod abr;
pub mod admission;
pub mod demo;
pub mod identity;
pub mod server;
pub mod session;
pub mod source;
pub mod token;

pub use identity::Identity;
pub use server::{ServerConfig, StreamServer, ViewerEvent};
pub use session::ViewerRecord;
pub use source::{EnvironmentSource, InputSink, RecordingInput};
pub use token::{Claims, EnvRef, Revocations, TokenError, TokenId, TokenKey, TokenKeyError};

/// Builds the connect URL clients take: `genos://HOST:PORT/ENV_ID?token=T&cert=SHA256HEX`.
pub fn connect_url(
    addr: std::net::SocketAddr,
    env_id: &str,
    token: &str,
    fingerprint: &str,
) -> String {
    let host = match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => "127.0.0.1".to_owned(),
        ip if ip.is_unspecified() => "[::1]".to_owned(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    // Tokens are base64url and fingerprints hex, env ids are validated identifiers: nothing
    // here needs percent-encoding, but encode the env id defensively.
    let env: String = env_id
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!(
        "genos://{host}:{}/{env}?token={token}&cert={fingerprint}",
        addr.port()
    )
}
