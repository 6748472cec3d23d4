//! Shared-memory framebuffer published by genos-vmm's virtio-gpu and read by hostd.
