//! Byte layout of the shared framebuffer file (version 1). `docs/framebuffer.md` is the
//! prose version of this module; keep them in step.
//!
//! All integers are little-endian and naturally aligned. Fields inside a seqlock-guarded
//! block are read and written as relaxed atomics of their own width.

/// `b"GENOSFB1"` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"GENOSFB1");
/// Layout version; a reader refuses any other.
pub const VERSION: u32 = 1;
/// Page size the layout is aligned to.
pub const PAGE: usize = 4096;

/// Size of the header page.
pub const HEADER_SIZE: usize = PAGE;
/// Side of the square cursor image (the virtio-gpu cursor is 64x64).
pub const CURSOR_SIDE: u32 = 64;
/// Bytes of the cursor image (BGRA, stride `CURSOR_SIDE * 4`).
pub const CURSOR_IMAGE_SIZE: usize = (CURSOR_SIDE * CURSOR_SIDE * 4) as usize;
/// File offset of the cursor image.
pub const CURSOR_IMAGE_OFFSET: usize = HEADER_SIZE;
/// File offset of the pixel pool (scanout buffers are carved out of it).
pub const POOL_OFFSET: usize = CURSOR_IMAGE_OFFSET + CURSOR_IMAGE_SIZE;

/// Number of damage ring entries; a reader further behind than this sees full damage.
pub const DAMAGE_RING_LEN: usize = 64;
/// Size of one damage ring entry.
pub const DAMAGE_ENTRY_SIZE: usize = 24;

/// Largest width or height a reader accepts.
pub const MAX_DIMENSION: u32 = 16384;

/// Header field offsets (from the start of the file).
pub mod off {
    /// `u64` [`super::MAGIC`].
    pub const MAGIC: usize = 0;
    /// `u32` [`super::VERSION`].
    pub const VERSION: usize = 8;
    /// `u32` header size in bytes.
    pub const HEADER_SIZE: usize = 12;
    /// `u64` total file size in bytes.
    pub const TOTAL_SIZE: usize = 16;
    /// `u64` pool offset.
    pub const POOL_OFFSET: usize = 24;
    /// `u64` pool size.
    pub const POOL_SIZE: usize = 32;

    /// `u64` frame seqlock: odd while the writer updates the frame block.
    pub const FRAME_LOCK: usize = 64;
    /// `u64` generation: changes whenever the scanout buffer or its geometry changes.
    pub const GENERATION: usize = 72;
    /// `u64` sequence: incremented on every flush, never reset.
    pub const SEQUENCE: usize = 80;
    /// `u32` width in pixels (0 when the scanout is disabled).
    pub const WIDTH: usize = 88;
    /// `u32` height in pixels.
    pub const HEIGHT: usize = 92;
    /// `u32` bytes per row.
    pub const STRIDE: usize = 96;
    /// `u32` pixel format ([`crate::PixelFormat`] code).
    pub const FORMAT: usize = 100;
    /// `u64` file offset of the first pixel.
    pub const PIXELS_OFFSET: usize = 104;
    /// `u32` flags ([`super::FLAG_ENABLED`]).
    pub const FLAGS: usize = 112;
    /// Damage ring: [`super::DAMAGE_RING_LEN`] entries of [`super::DAMAGE_ENTRY_SIZE`] bytes,
    /// fields in [`super::damage_entry`]; the entry for sequence `s` is at index `s % len`.
    pub const DAMAGE_RING: usize = 128;

    /// `u64` cursor seqlock.
    pub const CURSOR_LOCK: usize = 2048;
    /// `u64` cursor serial: incremented on every cursor change (image or position).
    pub const CURSOR_SERIAL: usize = 2056;
    /// `u32` 1 when the cursor is shown.
    pub const CURSOR_VISIBLE: usize = 2064;
    /// `i32` cursor x (scanout coordinates of the hotspot).
    pub const CURSOR_X: usize = 2068;
    /// `i32` cursor y.
    pub const CURSOR_Y: usize = 2072;
    /// `u32` hotspot x inside the image.
    pub const CURSOR_HOT_X: usize = 2076;
    /// `u32` hotspot y inside the image.
    pub const CURSOR_HOT_Y: usize = 2080;
}

/// Flag: the scanout is enabled (width/height/pixels describe a frame).
pub const FLAG_ENABLED: u32 = 1;

/// Field offsets inside a damage ring entry: `sequence: u64, x: u32, y: u32, width: u32, height: u32`.
pub mod damage_entry {
    /// `u64` flush sequence this entry belongs to.
    pub const SEQUENCE: usize = 0;
    /// `u32` rectangle x.
    pub const X: usize = 8;
    /// `u32` rectangle y.
    pub const Y: usize = 12;
    /// `u32` rectangle width.
    pub const WIDTH: usize = 16;
    /// `u32` rectangle height.
    pub const HEIGHT: usize = 20;
}

/// File offset of the damage ring entry for `sequence`.
pub fn damage_entry_offset(sequence: u64) -> usize {
    off::DAMAGE_RING + (sequence % DAMAGE_RING_LEN as u64) as usize * DAMAGE_ENTRY_SIZE
}

const _: () = assert!(off::DAMAGE_RING + DAMAGE_RING_LEN * DAMAGE_ENTRY_SIZE <= off::CURSOR_LOCK);
const _: () = assert!(off::CURSOR_HOT_Y + 4 <= HEADER_SIZE);
const _: () = assert!(POOL_OFFSET % PAGE == 0);
