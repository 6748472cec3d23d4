//! GenOS stream client library and genos-view.
//!
//! [`Session::connect`] takes a [`ConnectUrl`] (`genos://HOST:PORT/ENV?token=..&cert=..`),
//! pins the server certificate, authenticates with the token and yields decoded frames and
//! server messages as [`Event`]s; input goes back with [`Session::send_input`].
//! [`clipboard`] and [`resize`] decide what genos-view shares and asks for (sans-IO), and
//! [`window`] is the viewer that drives them.

pub mod clipboard;
pub mod dump;
pub mod keymap;
pub mod resize;
pub mod session;
pub mod stats;
pub mod tls;
pub mod url;
pub mod window;

pub use session::{ClientError, ConnectOptions, Event, Frame, Session};
pub use stats::{SessionReport, StatsCollector};
pub use url::{ConnectUrl, UrlError};

/// `e` and its sources, joined with ": ".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
