//! GenOS stream client library and genos-view.
//!
//! [`Session::connect`] takes a [`ConnectUrl`] (`genos://HOST:PORT/ENV?token=..&cert=..`),
//! pins the server certificate, authenticates with the token and yields decoded frames and
//! server messages as [`Event`]s; input goes back with [`Session::send_input`].

pub mod dump;
pub mod keymap;
pub mod session;
pub mod stats;
pub mod tls;
pub mod url;
pub mod window;

pub use session::{ClientError, ConnectOptions, Event, Frame, Session};
pub use stats::{SessionReport, StatsCollector};
pub use url::{ConnectUrl, UrlError};
