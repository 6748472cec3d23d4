//! The configuration files shipped in `configs/`, built in as text: the one place a crate takes
//! them from, so no crate reaches into another directory with `include_str!`.
//!
//! The files stay where they are (operators, scripts and packaging read them from `configs/`);
//! each constant is the file's text exactly as committed. Parsing and checking them is the job
//! of the crate that reads them.

/// `configs/catalog.toml`: the bases, desktops and apps an environment spec may name, with
/// synonyms and package names. Read through `proto::spec::EMBEDDED_CATALOG` by genos-hostd
/// (composer and spec checks; its `catalog` setting may name another file) and by genos-image
/// (what a root filesystem installs).
pub const CATALOG: &str = include_str!("../catalog.toml");

/// `configs/hostd.toml`: genos-hostd's documented configuration file, also the source of every
/// default (`hostd::config::EMBEDDED_CONFIG`, used when no `--config` file is given).
pub const HOSTD: &str = include_str!("../hostd.toml");

/// `configs/guest-kernel.config`: the guest kernel's configuration fragment, merged onto
/// `make tinyconfig` by genos-image (`image_builder::kernel::DEFAULT_CONFIG_FRAGMENT`); part of
/// the kernel artifact's cache key.
pub const GUEST_KERNEL_FRAGMENT: &str = include_str!("../guest-kernel.config");

/// `configs/seccomp/genos-vmm.json`: genos-vmm's per-thread seccomp allow-lists (seccompiler's
/// JSON format), compiled by `vmm::sandbox::seccomp` when the VMM starts.
pub const SECCOMP_VMM: &str = include_str!("../seccomp/genos-vmm.json");
