//! Guest kernel, initramfs and root filesystem builder.
