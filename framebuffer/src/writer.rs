//! The publishing side: owns the memfd, carves scanout buffers out of its pixel pool,
//! publishes flushes and cursor changes under seqlocks and wakes readers through eventfds.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::layout::{self, off};
use crate::shm::{self, Mapping};
use crate::{PixelFormat, Rect};

/// Readers beyond this many are not kept: the oldest subscription is dropped.
pub const MAX_SUBSCRIBERS: usize = 16;

/// Errors from the writer.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// Creating, sealing or mapping the memfd failed.
    #[error("cannot set up the shared framebuffer")]
    Setup(#[source] std::io::Error),
    /// The pool has no free range of the requested size.
    #[error("framebuffer pool exhausted: {requested} bytes requested, {free} free")]
    PoolExhausted { requested: usize, free: usize },
    /// The requested size is zero or too large for the pool.
    #[error("invalid pool allocation of {0} bytes")]
    BadAllocation(usize),
    /// A scanout does not fit its buffer or has an invalid geometry.
    #[error("scanout {width}x{height} stride {stride} does not fit a buffer of {len} bytes")]
    BadScanout {
        width: u32,
        height: u32,
        stride: u32,
        len: usize,
    },
    /// The cursor image is not `CURSOR_SIDE` x `CURSOR_SIDE` BGRA.
    #[error("cursor image must be {expected} bytes, got {got}")]
    BadCursor { expected: usize, got: usize },
    /// Creating a reader's wake-up eventfd or read-only descriptor failed.
    #[error("cannot share the framebuffer with a reader")]
    Share(#[source] std::io::Error),
}

/// A range of the pixel pool, owned by whoever allocated it. Not `Clone`: it is freed once.
#[derive(Debug, PartialEq, Eq)]
pub struct PoolBuffer {
    offset: usize,
    len: usize,
}

impl PoolBuffer {
    /// Usable length in bytes (a multiple of the page size).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes (never true for an allocated buffer).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// File offset of the buffer's first byte.
    pub fn offset(&self) -> usize {
        self.offset
    }
}

/// Where the scanout reads its pixels from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanoutConfig {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per row.
    pub stride: u32,
    /// Offset of the first pixel inside the buffer.
    pub offset_in_buffer: usize,
}

/// First-fit allocator over page-granular ranges of the pool, with coalescing on free.
#[derive(Debug)]
struct Pool {
    /// Free ranges: offset -> length.
    free: BTreeMap<usize, usize>,
    free_bytes: usize,
    start: usize,
    size: usize,
}

impl Pool {
    fn new(start: usize, size: usize) -> Self {
        let mut free = BTreeMap::new();
        if size > 0 {
            free.insert(start, size);
        }
        Self {
            free,
            free_bytes: size,
            start,
            size,
        }
    }

    fn alloc(&mut self, len: usize) -> Result<PoolBuffer, WriterError> {
        if len == 0 || len > self.size {
            return Err(WriterError::BadAllocation(len));
        }
        let len = len.next_multiple_of(layout::PAGE);
        let (&offset, &range_len) =
            self.free
                .iter()
                .find(|(_, &l)| l >= len)
                .ok_or(WriterError::PoolExhausted {
                    requested: len,
                    free: self.free_bytes,
                })?;
        self.free.remove(&offset);
        if range_len > len {
            self.free.insert(offset + len, range_len - len);
        }
        self.free_bytes -= len;
        Ok(PoolBuffer { offset, len })
    }

    fn release(&mut self, buf: PoolBuffer) {
        let (mut offset, mut len) = (buf.offset, buf.len);
        debug_assert!(offset >= self.start && offset + len <= self.start + self.size);
        self.free_bytes += len;
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back() {
            if prev + prev_len == offset {
                self.free.remove(&prev);
                offset = prev;
                len += prev_len;
            }
        }
        if let Some(&next_len) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += next_len;
        }
        self.free.insert(offset, len);
    }
}

/// The descriptors a reader needs: a read-only memfd and its own wake-up eventfd. Both can
/// be sent to another process with SCM_RIGHTS.
#[derive(Debug)]
pub struct ReaderFds {
    /// Read-only file description of the framebuffer memfd.
    pub memfd: OwnedFd,
    /// Eventfd signalled after every flush and cursor change.
    pub notify: OwnedFd,
}

/// A cloneable, thread-safe handle that hands out [`ReaderFds`]; the VMM's control API keeps
/// one to answer `GetFramebuffer`.
#[derive(Clone, Debug)]
pub struct FramebufferShare {
    /// The memfd, sealed against every new write when the writer was created (so whoever
    /// holds a duplicate can only map it read-only); readers get duplicates.
    read_only: Arc<File>,
    subscribers: Arc<Mutex<VecDeque<OwnedFd>>>,
}

impl FramebufferShare {
    /// A read-only memfd descriptor and a new eventfd subscribed to flushes.
    pub fn reader_fds(&self) -> Result<ReaderFds, WriterError> {
        let memfd = self.read_only.try_clone().map_err(WriterError::Share)?;
        let notify = shm::eventfd().map_err(WriterError::Share)?;
        let ours = notify.try_clone().map_err(WriterError::Share)?;
        let mut subs = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if subs.len() >= MAX_SUBSCRIBERS {
            subs.pop_front();
        }
        subs.push_back(ours);
        Ok(ReaderFds {
            memfd: memfd.into(),
            notify,
        })
    }
}

/// The single writer of a shared framebuffer.
pub struct FramebufferWriter {
    file: File,
    read_only: Arc<File>,
    map: Mapping,
    pool: Pool,
    subscribers: Arc<Mutex<VecDeque<OwnedFd>>>,
    generation: u64,
    sequence: u64,
    cursor_serial: u64,
    /// Offset and length of the buffer the scanout currently shows.
    scanout_buffer: Option<(usize, usize)>,
    scanout: Option<ScanoutConfig>,
}

impl std::fmt::Debug for FramebufferWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramebufferWriter")
            .field("pool", &self.pool)
            .field("generation", &self.generation)
            .field("sequence", &self.sequence)
            .field("scanout", &self.scanout)
            .finish_non_exhaustive()
    }
}

impl FramebufferWriter {
    /// Creates a framebuffer whose pixel pool holds `pool_size` bytes (rounded up to pages).
    /// Pool pages cost memory only once written.
    pub fn new(pool_size: usize) -> Result<Self, WriterError> {
        let pool_size = pool_size.next_multiple_of(layout::PAGE);
        let total = layout::POOL_OFFSET + pool_size;
        let file = shm::sealed_memfd("genos-framebuffer", total).map_err(WriterError::Setup)?;
        let map = Mapping::new(file.as_fd(), total, true).map_err(WriterError::Setup)?;
        // From here on only this mapping writes; what readers get maps read-only.
        shm::seal_writes(&file).map_err(WriterError::Setup)?;
        let read_only = file.try_clone().map_err(WriterError::Setup)?;
        let writer = Self {
            file,
            read_only: Arc::new(read_only),
            map,
            pool: Pool::new(layout::POOL_OFFSET, pool_size),
            subscribers: Arc::default(),
            generation: 0,
            sequence: 0,
            cursor_serial: 0,
            scanout_buffer: None,
            scanout: None,
        };
        let m = &writer.map;
        m.u32_at(off::VERSION)
            .store(layout::VERSION, Ordering::Relaxed);
        m.u32_at(off::HEADER_SIZE)
            .store(layout::HEADER_SIZE as u32, Ordering::Relaxed);
        m.u64_at(off::TOTAL_SIZE)
            .store(total as u64, Ordering::Relaxed);
        m.u64_at(off::POOL_OFFSET)
            .store(layout::POOL_OFFSET as u64, Ordering::Relaxed);
        m.u64_at(off::POOL_SIZE)
            .store(pool_size as u64, Ordering::Relaxed);
        // The magic goes last: a reader that sees it sees a complete header.
        m.u64_at(off::MAGIC).store(layout::MAGIC, Ordering::Release);
        Ok(writer)
    }

    /// A handle that hands out reader descriptors.
    pub fn share(&self) -> FramebufferShare {
        FramebufferShare {
            read_only: self.read_only.clone(),
            subscribers: self.subscribers.clone(),
        }
    }

    /// Bytes still free in the pool.
    pub fn pool_free(&self) -> usize {
        self.pool.free_bytes
    }

    /// Allocates `len` bytes (rounded up to pages) from the pixel pool.
    pub fn alloc(&mut self, len: usize) -> Result<PoolBuffer, WriterError> {
        self.pool.alloc(len)
    }

    /// Returns `buf` to the pool and releases its memory. If the scanout shows it, the
    /// scanout is disabled first so that no reader is pointed at freed memory.
    pub fn free(&mut self, buf: PoolBuffer) {
        if self.scanout_buffer.map(|(o, _)| o) == Some(buf.offset) {
            // Disabling cannot fail: only an enabled target is validated.
            let _ = self.set_scanout(None);
        }
        // The write seal readers rely on (`shm::seal_writes`) makes the kernel refuse hole
        // punching, so a freed buffer's pages stay allocated until the pool hands the range
        // out again: a VM's framebuffer costs at most its pool's size.
        let _ = shm::punch_hole(&self.file, buf.offset, buf.len);
        self.pool.release(buf);
    }

    /// The bytes of `buf`, for the device to copy pixels into.
    pub fn pixels_mut(&mut self, buf: &PoolBuffer) -> &mut [u8] {
        assert!(
            buf.offset >= layout::POOL_OFFSET && buf.offset + buf.len <= self.map.len(),
            "pool buffer from another writer"
        );
        // SAFETY: the range lies inside the mapping (checked above); pool buffers never
        // overlap and `&mut self` ensures no other slice from this writer is alive. Readers in
        // other processes map the file read-only, so they never write to it.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().add(buf.offset), buf.len) }
    }

    /// Points the scanout at `buffer` with `config`, or disables it with `None`. Publishes a
    /// new generation (readers treat it as a full-frame change) and wakes readers.
    pub fn set_scanout(
        &mut self,
        target: Option<(&PoolBuffer, ScanoutConfig)>,
    ) -> Result<(), WriterError> {
        if let Some((buf, cfg)) = target {
            let needed = (cfg.stride as usize)
                .checked_mul(cfg.height.saturating_sub(1) as usize)
                .and_then(|n| n.checked_add(cfg.width as usize * 4))
                .and_then(|n| n.checked_add(cfg.offset_in_buffer));
            let bad = cfg.width == 0
                || cfg.height == 0
                || cfg.width > layout::MAX_DIMENSION
                || cfg.height > layout::MAX_DIMENSION
                || (cfg.stride as usize) < cfg.width as usize * 4
                || needed.is_none_or(|n| n > buf.len);
            if bad {
                return Err(WriterError::BadScanout {
                    width: cfg.width,
                    height: cfg.height,
                    stride: cfg.stride,
                    len: buf.len,
                });
            }
        }
        let new_buffer = target.map(|(b, _)| (b.offset, b.len));
        let new_cfg = target.map(|(_, c)| c);
        if new_buffer == self.scanout_buffer && new_cfg == self.scanout {
            return Ok(());
        }
        self.scanout_buffer = new_buffer;
        self.scanout = new_cfg;
        self.generation += 1;
        let (generation, sequence) = (self.generation, self.sequence);
        self.with_frame_lock(|m| {
            m.u64_at(off::GENERATION)
                .store(generation, Ordering::Relaxed);
            match target {
                Some((buf, cfg)) => {
                    m.u32_at(off::WIDTH).store(cfg.width, Ordering::Relaxed);
                    m.u32_at(off::HEIGHT).store(cfg.height, Ordering::Relaxed);
                    m.u32_at(off::STRIDE).store(cfg.stride, Ordering::Relaxed);
                    m.u32_at(off::FORMAT)
                        .store(PixelFormat::Bgrx.code(), Ordering::Relaxed);
                    m.u64_at(off::PIXELS_OFFSET).store(
                        (buf.offset + cfg.offset_in_buffer) as u64,
                        Ordering::Relaxed,
                    );
                    m.u32_at(off::FLAGS)
                        .store(layout::FLAG_ENABLED, Ordering::Relaxed);
                }
                None => {
                    for field in [off::WIDTH, off::HEIGHT, off::STRIDE, off::FLAGS] {
                        m.u32_at(field).store(0, Ordering::Relaxed);
                    }
                    m.u64_at(off::PIXELS_OFFSET).store(0, Ordering::Relaxed);
                }
            }
            m.u64_at(off::SEQUENCE).store(sequence, Ordering::Relaxed);
        });
        self.wake_readers();
        Ok(())
    }

    /// The current scanout, if enabled.
    pub fn scanout(&self) -> Option<ScanoutConfig> {
        self.scanout
    }

    /// Offset of the buffer the scanout shows, if enabled.
    pub fn scanout_buffer_offset(&self) -> Option<usize> {
        self.scanout_buffer.map(|(o, _)| o)
    }

    /// Publishes a flush of `damage` (clipped to the scanout): increments the sequence,
    /// records the damage and wakes readers. Returns the new sequence, or `None` when the
    /// scanout is disabled or the damage lies entirely outside it.
    pub fn flush(&mut self, damage: Rect) -> Option<u64> {
        let cfg = self.scanout?;
        let damage = damage.clip(cfg.width, cfg.height)?;
        self.sequence += 1;
        let sequence = self.sequence;
        self.with_frame_lock(|m| {
            let entry = layout::damage_entry_offset(sequence);
            use layout::damage_entry as d;
            m.u64_at(entry + d::SEQUENCE)
                .store(sequence, Ordering::Relaxed);
            m.u32_at(entry + d::X).store(damage.x, Ordering::Relaxed);
            m.u32_at(entry + d::Y).store(damage.y, Ordering::Relaxed);
            m.u32_at(entry + d::WIDTH)
                .store(damage.width, Ordering::Relaxed);
            m.u32_at(entry + d::HEIGHT)
                .store(damage.height, Ordering::Relaxed);
            m.u64_at(off::SEQUENCE).store(sequence, Ordering::Relaxed);
        });
        self.wake_readers();
        Some(sequence)
    }

    /// The last published flush sequence.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Replaces the cursor image (`CURSOR_SIDE`² BGRA pixels, stride `CURSOR_SIDE * 4`) and
    /// hotspot, and shows it at (`x`, `y`).
    pub fn set_cursor(
        &mut self,
        image: &[u8],
        hot_x: u32,
        hot_y: u32,
        x: i32,
        y: i32,
    ) -> Result<(), WriterError> {
        if image.len() != layout::CURSOR_IMAGE_SIZE {
            return Err(WriterError::BadCursor {
                expected: layout::CURSOR_IMAGE_SIZE,
                got: image.len(),
            });
        }
        self.cursor_serial += 1;
        let serial = self.cursor_serial;
        self.with_cursor_lock(|m| {
            // The image is copied as relaxed atomic words so that a concurrent reader (which
            // retries on a lock change) never races with plain writes.
            for (i, chunk) in image.chunks_exact(4).enumerate() {
                let word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
                m.u32_at(layout::CURSOR_IMAGE_OFFSET + i * 4)
                    .store(word, Ordering::Relaxed);
            }
            m.u32_at(off::CURSOR_HOT_X).store(hot_x, Ordering::Relaxed);
            m.u32_at(off::CURSOR_HOT_Y).store(hot_y, Ordering::Relaxed);
            m.u32_at(off::CURSOR_X).store(x as u32, Ordering::Relaxed);
            m.u32_at(off::CURSOR_Y).store(y as u32, Ordering::Relaxed);
            m.u32_at(off::CURSOR_VISIBLE).store(1, Ordering::Relaxed);
            m.u64_at(off::CURSOR_SERIAL)
                .store(serial, Ordering::Relaxed);
        });
        self.wake_readers();
        Ok(())
    }

    /// Moves the cursor, or hides it when `visible` is false.
    pub fn move_cursor(&mut self, x: i32, y: i32, visible: bool) {
        self.cursor_serial += 1;
        let serial = self.cursor_serial;
        self.with_cursor_lock(|m| {
            m.u32_at(off::CURSOR_X).store(x as u32, Ordering::Relaxed);
            m.u32_at(off::CURSOR_Y).store(y as u32, Ordering::Relaxed);
            m.u32_at(off::CURSOR_VISIBLE)
                .store(u32::from(visible), Ordering::Relaxed);
            m.u64_at(off::CURSOR_SERIAL)
                .store(serial, Ordering::Relaxed);
        });
        self.wake_readers();
    }

    fn with_frame_lock(&self, update: impl FnOnce(&Mapping)) {
        seqlock_write(&self.map, off::FRAME_LOCK, update);
    }

    fn with_cursor_lock(&self, update: impl FnOnce(&Mapping)) {
        seqlock_write(&self.map, off::CURSOR_LOCK, update);
    }

    fn wake_readers(&self) {
        let subs = self
            .subscribers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for fd in subs.iter() {
            // A reader that went away leaves an eventfd nobody reads; signalling it is harmless.
            let _ = shm::signal(fd.as_fd());
        }
    }
}

/// Writer half of a seqlock: odd while `update` runs, even and advanced by two afterwards.
fn seqlock_write(map: &Mapping, lock_offset: usize, update: impl FnOnce(&Mapping)) {
    let lock = map.u64_at(lock_offset);
    let start = lock.load(Ordering::Relaxed);
    lock.store(start.wrapping_add(1), Ordering::Relaxed);
    // Orders the odd lock value before the field stores.
    fence(Ordering::Release);
    update(map);
    lock.store(start.wrapping_add(2), Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_coalesces_freed_neighbours_into_one_range() {
        let mut pool = Pool::new(layout::POOL_OFFSET, 4 * layout::PAGE);
        let a = pool.alloc(1).unwrap();
        let b = pool.alloc(layout::PAGE + 1).unwrap();
        let c = pool.alloc(layout::PAGE).unwrap();
        assert_eq!(pool.free_bytes, 0);
        assert!(matches!(
            pool.alloc(1),
            Err(WriterError::PoolExhausted { .. })
        ));
        pool.release(b);
        pool.release(a);
        pool.release(c);
        assert_eq!(pool.free.len(), 1);
        assert_eq!(
            pool.alloc(4 * layout::PAGE).unwrap().len(),
            4 * layout::PAGE
        );
    }

    #[test]
    fn pool_rejects_zero_and_oversized_allocations() {
        let mut pool = Pool::new(layout::POOL_OFFSET, layout::PAGE);
        assert!(matches!(pool.alloc(0), Err(WriterError::BadAllocation(0))));
        assert!(matches!(
            pool.alloc(layout::PAGE + 1),
            Err(WriterError::BadAllocation(_))
        ));
    }

    #[test]
    fn scanout_that_does_not_fit_its_buffer_is_rejected() {
        let mut w = FramebufferWriter::new(layout::PAGE).unwrap();
        let buf = w.alloc(layout::PAGE).unwrap();
        let cfg = ScanoutConfig {
            width: 64,
            height: 64,
            stride: 256,
            offset_in_buffer: 0,
        };
        assert!(matches!(
            w.set_scanout(Some((&buf, cfg))),
            Err(WriterError::BadScanout { .. })
        ));
        assert_eq!(w.generation(), 0);
    }
}
