//! Guest images for GenOS: the guest kernel, the initramfs and per-environment root
//! filesystems (Debian, Ubuntu, Fedora, Alpine, each built with its distribution's own
//! tool), kept in a content-addressed cache.
//!
//! The `genos-image` binary is a thin CLI over [`kernel::build`], [`initramfs::build`],
//! [`rootfs::build`] (which executes a [`plan::Plan`]) and the [`cache::Cache`].

pub mod apk_bootstrap;
pub mod cache;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod nested_test;
pub mod path_error;
pub mod plan;
pub mod probe;
pub mod rootfs;
pub mod tools;
