//! Confinement the VMM applies to itself: seccomp filters per thread role and a
//! Landlock ruleset over the files it uses. The namespaces, root, cgroups and uid come
//! from `genos-jailer`, which starts the VMM.

pub mod landlock;
pub mod runtime;
pub mod seccomp;

pub use runtime::{SandboxError, SandboxOptions, SandboxStatus};
