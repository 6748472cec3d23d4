//! Wire formats shared by genos-hostd, its clients and the guest agent.
//!
//! Plain data and codecs only: no I/O, no async runtime. `spec` is the environment spec
//! (composer, orchestrator, image builder); `stream` is the client↔hostd streaming protocol;
//! `agent` is the hostd↔genos-agent protocol.

pub mod agent;
pub mod spec;
pub mod stream;
mod wire;
