//! Shared-memory framebuffer published by genos-vmm's virtio-gpu and read by hostd.
//!
//! One memfd holds a header page (frame and cursor state under two seqlocks, a ring of
//! recent damage rectangles), a 64x64 cursor image and a pool of pixel buffers. The gpu
//! device allocates each guest resource's host copy from the pool, so a page flip or a
//! resize only re-points the header at another buffer (a new *generation*) and a flush only
//! bumps the *sequence* and records its damage: the one pixel copy is the guest's
//! TRANSFER_TO_HOST_2D. Readers map the file read-only (a sealed memfd, so it cannot
//! shrink under them) and sleep on an eventfd until the writer signals a change.
//!
//! The byte layout is in [`layout`] and `docs/framebuffer.md`. No KVM dependency: hostd uses
//! [`FramebufferReader`] directly.

pub mod layout;
mod reader;
mod rect;
mod shm;
mod writer;

pub use reader::{CursorState, Frame, FrameInfo, FramebufferReader, ReaderError};
pub use rect::Rect;
pub use writer::{
    FramebufferShare, FramebufferWriter, PoolBuffer, ReaderFds, ScanoutConfig, WriterError,
    MAX_SUBSCRIBERS,
};

/// Pixel formats of the shared buffer. The gpu device always publishes [`PixelFormat::Bgrx`]
/// (converting other guest formats during the transfer), so readers handle one layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 4 bytes per pixel, memory order B, G, R, X (DRM XRGB8888).
    Bgrx,
}

impl PixelFormat {
    /// The format's code in the header.
    pub fn code(self) -> u32 {
        match self {
            PixelFormat::Bgrx => 1,
        }
    }

    /// The format with header code `code`.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(PixelFormat::Bgrx),
            _ => None,
        }
    }
}
