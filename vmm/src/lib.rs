//! genos-vmm: a microVM monitor for GenOS built on the rust-vmm crates.
//!
//! One process runs one VM. The crate is a library (VM set-up, devices, control API)
//! with the `genos-vmm` binary as a thin front end.

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod logging;
pub mod rpc;
pub mod sandbox;
pub mod snapshot;
pub mod vmm;
pub mod vstate;
