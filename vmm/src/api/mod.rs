//! Control API: HTTP/1.1 with JSON bodies on a Unix socket (`--api-sock PATH`).
//!
//! - [`http`]: sans-IO request parser and response encoder.
//! - [`router`]: method + path + JSON body → [`crate::rpc::VmmAction`], or a 4xx reason.
//! - [`server`]: the thread that accepts connections and forwards actions to the VMM's
//!   main thread through [`crate::rpc::ApiSender`].
//!
//! Endpoints and the state machine are documented in `docs/vmm-api.md`.

pub mod http;
pub mod router;
pub mod server;

pub use server::{bind, spawn, start, ServerError};
