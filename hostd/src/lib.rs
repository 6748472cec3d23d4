//! GenOS host daemon and operator CLI.
//!
//! `composer` turns requests into specs; `config` loads `configs/hostd.toml`; `store` keeps
//! environments and the audit chain in SQLite; `admin` serves the operator socket;
//! `orchestrator` builds, boots and supervises environments; `client` is the CLI's side of
//! the admin socket.

pub mod admin;
pub mod composer;
pub mod config;
pub mod orchestrator;
pub mod store;
pub mod uds;
pub mod stream;
