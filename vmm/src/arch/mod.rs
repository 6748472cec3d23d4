//! Architecture-specific VM set-up. Only x86_64 is supported.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
