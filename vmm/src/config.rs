//! VM configuration: the types live in the `genos-vmm-api` crate ([`vmm_api::config`]),
//! the contract hostd and the VMM share; this module re-exports them under their old path.

pub use vmm_api::config::*;
