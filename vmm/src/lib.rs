//! genos-vmm: a microVM monitor for GenOS built on the rust-vmm crates.
//!
//! One process runs one VM. The crate is a library (VM set-up, devices, control API)
//! with the `genos-vmm` binary as a thin front end.

pub mod arch;
pub mod devices;
pub mod api;
pub mod cli;
pub mod config;
pub mod rpc;
pub mod vstate;
pub mod builder;
pub mod device_manager;
pub mod vmm;
pub mod sandbox;
