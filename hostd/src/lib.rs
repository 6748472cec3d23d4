//! GenOS host daemon and operator CLI.
//!
//! `composer` turns requests into specs (`llm` is its optional model backend); `config`
//! loads `configs/hostd.toml`; `store` keeps environments and the audit chain in SQLite;
//! `orchestrator` builds, boots and supervises environments; `admin` serves the operator
//! socket; `uds` is HTTP over Unix sockets (CLI → hostd, hostd → genos-vmm); `pidfd` holds
//! VMM processes by pidfd; `stream` streams environments to viewers.

pub mod admin;
pub mod composer;
pub mod config;
pub mod llm;
pub mod orchestrator;
pub mod pidfd;
pub mod store;
pub mod stream;
pub mod uds;
pub mod vm_source;
pub mod vmm_client;
