//! Guest images for GenOS: the guest kernel, the initramfs and per-environment root
//! filesystems, each built from Debian packages and kept in a content-addressed cache.
//!
//! The `genos-image` binary is a thin CLI over [`kernel::build`], [`initramfs::build`],
//! [`rootfs::build`] and the [`cache::Cache`].

pub mod cache;
pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;
pub mod tools;
