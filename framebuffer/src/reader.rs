//! The reading side: maps the memfd read-only, waits on its eventfd and reads headers under
//! the seqlocks. Everything read from the file is validated: the writer (a VMM facing a
//! guest) is less trusted than the reader.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use crate::layout::{self, off};
use crate::shm::{self, Mapping};
use crate::writer::ReaderFds;
use crate::{PixelFormat, Rect};

/// Spins on a busy seqlock before yielding the CPU to the (possibly preempted) writer.
const SEQLOCK_SPINS: u32 = 100;
/// How long a writer may hold a seqlock before the reader reports it stuck. Generous: a
/// preempted writer on a loaded host holds it for a scheduler time slice or more.
const SEQLOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Errors from the reader.
#[derive(Debug, thiserror::Error)]
pub enum ReaderError {
    /// Inspecting or mapping the memfd failed.
    #[error("cannot map the shared framebuffer")]
    Map(#[source] std::io::Error),
    /// The file is not a framebuffer of a version this reader knows.
    #[error("not a GenOS framebuffer (magic {magic:#x}, version {version})")]
    BadMagic { magic: u64, version: u32 },
    /// The memfd is not sealed against shrinking, so a mapping could fault under us.
    #[error("framebuffer memfd is not sealed against shrinking and growing")]
    NotSealed,
    /// A header field points outside the file or is out of range.
    #[error("corrupt framebuffer header: {0}")]
    Corrupt(&'static str),
    /// The writer held a seqlock for too long (it is stuck or hostile).
    #[error("framebuffer writer never released its lock")]
    Stuck,
    /// Waiting on the eventfd failed.
    #[error("waiting for a flush failed")]
    Wait(#[source] std::io::Error),
}

/// The published state of the scanout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameInfo {
    /// Changes whenever the buffer or geometry changes (resize, page flip, disable).
    pub generation: u64,
    /// Flush counter, incremented on every flush.
    pub sequence: u64,
    /// Width in pixels; 0 when the scanout is disabled.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Bytes per row.
    pub stride: u32,
    /// Pixel format.
    pub format: PixelFormat,
    pixels_offset: usize,
}

impl FrameInfo {
    /// Whether the scanout is enabled.
    pub fn enabled(&self) -> bool {
        self.width != 0
    }
}

/// A frame as returned by [`FramebufferReader::wait_frame`].
#[derive(Debug)]
pub struct Frame<'a> {
    /// Header values the pixels belong to.
    pub info: FrameInfo,
    /// What changed since the previous frame returned by this reader (the whole frame after a
    /// generation change or when the reader fell more than the damage ring behind).
    pub damage: Vec<Rect>,
    /// The scanout's pixels, `stride * (height - 1) + width * 4` bytes. The writer may update
    /// them while they are read; any such change is reported as damage of a later frame.
    pub pixels: &'a [u8],
}

/// Cursor state copied out of the shared file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CursorState {
    /// Incremented on every cursor change.
    pub serial: u64,
    /// Whether the cursor is shown.
    pub visible: bool,
    /// Hotspot position in scanout coordinates.
    pub x: i32,
    /// Hotspot position in scanout coordinates.
    pub y: i32,
    /// Hotspot inside the image.
    pub hot_x: u32,
    /// Hotspot inside the image.
    pub hot_y: u32,
    /// `CURSOR_SIDE`² BGRA pixels, stride `CURSOR_SIDE * 4`.
    pub image: Vec<u8>,
}

/// A read-only view of a shared framebuffer.
pub struct FramebufferReader {
    map: Mapping,
    notify: OwnedFd,
    last: Option<(u64, u64)>,
}

impl std::fmt::Debug for FramebufferReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FramebufferReader")
            .field("len", &self.map.len())
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl FramebufferReader {
    /// Maps the memfd in `fds` read-only after checking its seals, size and header.
    pub fn new(fds: ReaderFds) -> Result<Self, ReaderError> {
        let seals = shm::seals(fds.memfd.as_fd()).map_err(ReaderError::Map)?;
        if seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
            != libc::F_SEAL_SHRINK | libc::F_SEAL_GROW
        {
            return Err(ReaderError::NotSealed);
        }
        let file = File::from(fds.memfd);
        let len = file.metadata().map_err(ReaderError::Map)?.len();
        let len = usize::try_from(len).map_err(|_| ReaderError::Corrupt("file size"))?;
        if len < layout::POOL_OFFSET {
            return Err(ReaderError::Corrupt("file shorter than the header"));
        }
        let map = Mapping::new(file.as_fd(), len, false).map_err(ReaderError::Map)?;
        let magic = map.u64_at(off::MAGIC).load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let version = map.u32_at(off::VERSION).load(Ordering::Relaxed);
        if magic != layout::MAGIC || version != layout::VERSION {
            return Err(ReaderError::BadMagic { magic, version });
        }
        if map.u64_at(off::TOTAL_SIZE).load(Ordering::Relaxed) != len as u64 {
            return Err(ReaderError::Corrupt(
                "total size differs from the file size",
            ));
        }
        Ok(Self {
            map,
            notify: fds.notify,
            last: None,
        })
    }

    /// The current header, read consistently.
    pub fn info(&self) -> Result<FrameInfo, ReaderError> {
        let m = &self.map;
        let raw = seqlock_read(m, off::FRAME_LOCK, |m| {
            (
                m.u64_at(off::GENERATION).load(Ordering::Relaxed),
                m.u64_at(off::SEQUENCE).load(Ordering::Relaxed),
                m.u32_at(off::WIDTH).load(Ordering::Relaxed),
                m.u32_at(off::HEIGHT).load(Ordering::Relaxed),
                m.u32_at(off::STRIDE).load(Ordering::Relaxed),
                m.u32_at(off::FORMAT).load(Ordering::Relaxed),
                m.u64_at(off::PIXELS_OFFSET).load(Ordering::Relaxed),
                m.u32_at(off::FLAGS).load(Ordering::Relaxed),
            )
        })?;
        let (generation, sequence, width, height, stride, format, pixels_offset, flags) = raw;
        if flags & layout::FLAG_ENABLED == 0 {
            return Ok(FrameInfo {
                generation,
                sequence,
                width: 0,
                height: 0,
                stride: 0,
                format: PixelFormat::Bgrx,
                pixels_offset: 0,
            });
        }
        let format = PixelFormat::from_code(format).ok_or(ReaderError::Corrupt("pixel format"))?;
        if width == 0
            || height == 0
            || width > layout::MAX_DIMENSION
            || height > layout::MAX_DIMENSION
        {
            return Err(ReaderError::Corrupt("frame size"));
        }
        if u64::from(stride) < u64::from(width) * 4 {
            return Err(ReaderError::Corrupt("stride shorter than a row"));
        }
        let end = pixels_offset
            .checked_add(u64::from(stride) * u64::from(height - 1) + u64::from(width) * 4)
            .ok_or(ReaderError::Corrupt("pixel range"))?;
        if pixels_offset < layout::POOL_OFFSET as u64 || end > self.map.len() as u64 {
            return Err(ReaderError::Corrupt("pixels outside the pool"));
        }
        Ok(FrameInfo {
            generation,
            sequence,
            width,
            height,
            stride,
            format,
            pixels_offset: pixels_offset as usize,
        })
    }

    /// Whether `info` still describes the current buffer (no resize, page flip or disable
    /// since). Check after consuming a frame's pixels to discard a frame whose buffer was
    /// retired while it was read.
    pub fn is_current(&self, info: &FrameInfo) -> Result<bool, ReaderError> {
        Ok(self.info()?.generation == info.generation)
    }

    /// Waits until a frame newer than the last one returned is published or `deadline`
    /// passes (`Ok(None)`). The first call returns the current frame at once if the scanout
    /// is enabled. Disabled scanouts are skipped.
    pub fn wait_frame(&mut self, deadline: Instant) -> Result<Option<Frame<'_>>, ReaderError> {
        loop {
            let info = self.info()?;
            let newer = match self.last {
                None => true,
                Some((generation, sequence)) => {
                    info.generation != generation || info.sequence != sequence
                }
            };
            if info.enabled() && newer {
                let damage = self.damage_since(&info)?;
                self.last = Some((info.generation, info.sequence));
                let len =
                    info.stride as usize * (info.height as usize - 1) + info.width as usize * 4;
                // SAFETY: `info()` checked that `pixels_offset..pixels_offset + len` lies inside
                // the read-only mapping, which lives as long as the returned borrow of `self`.
                let pixels = unsafe {
                    std::slice::from_raw_parts(self.map.as_ptr().add(info.pixels_offset), len)
                };
                return Ok(Some(Frame {
                    info,
                    damage,
                    pixels,
                }));
            }
            if !shm::wait_readable(&self.notify, deadline).map_err(ReaderError::Wait)? {
                return Ok(None);
            }
        }
    }

    /// Waits for any change (flush, scanout or cursor) or `deadline`; returns whether one
    /// was signalled. For readers that also follow the cursor.
    pub fn wait_change(&self, deadline: Instant) -> Result<bool, ReaderError> {
        shm::wait_readable(&self.notify, deadline).map_err(ReaderError::Wait)
    }

    /// The cursor's change counter alone: one atomic load, for readers that poll for a
    /// change before paying for [`FramebufferReader::cursor`] (which copies the image).
    pub fn cursor_serial(&self) -> u64 {
        self.map.u64_at(off::CURSOR_SERIAL).load(Ordering::Acquire)
    }

    /// The cursor, read consistently.
    pub fn cursor(&self) -> Result<CursorState, ReaderError> {
        seqlock_read(&self.map, off::CURSOR_LOCK, |m| {
            let mut image = Vec::with_capacity(layout::CURSOR_IMAGE_SIZE);
            for i in 0..layout::CURSOR_IMAGE_SIZE / 4 {
                let word = m
                    .u32_at(layout::CURSOR_IMAGE_OFFSET + i * 4)
                    .load(Ordering::Relaxed);
                image.extend_from_slice(&word.to_ne_bytes());
            }
            CursorState {
                serial: m.u64_at(off::CURSOR_SERIAL).load(Ordering::Relaxed),
                visible: m.u32_at(off::CURSOR_VISIBLE).load(Ordering::Relaxed) != 0,
                x: m.u32_at(off::CURSOR_X).load(Ordering::Relaxed) as i32,
                y: m.u32_at(off::CURSOR_Y).load(Ordering::Relaxed) as i32,
                hot_x: m.u32_at(off::CURSOR_HOT_X).load(Ordering::Relaxed),
                hot_y: m.u32_at(off::CURSOR_HOT_Y).load(Ordering::Relaxed),
                image,
            }
        })
    }

    /// Damage between the last returned frame and `info`, from the ring.
    fn damage_since(&self, info: &FrameInfo) -> Result<Vec<Rect>, ReaderError> {
        let full = vec![Rect {
            x: 0,
            y: 0,
            width: info.width,
            height: info.height,
        }];
        let Some((last_generation, last_sequence)) = self.last else {
            return Ok(full);
        };
        if last_generation != info.generation
            || info.sequence < last_sequence
            || info.sequence - last_sequence > layout::DAMAGE_RING_LEN as u64
        {
            return Ok(full);
        }
        let (from, to) = (last_sequence + 1, info.sequence);
        let entries = seqlock_read(&self.map, off::FRAME_LOCK, |m| {
            (from..=to)
                .map(|s| {
                    use layout::damage_entry as d;
                    let e = layout::damage_entry_offset(s);
                    (
                        m.u64_at(e + d::SEQUENCE).load(Ordering::Relaxed),
                        Rect {
                            x: m.u32_at(e + d::X).load(Ordering::Relaxed),
                            y: m.u32_at(e + d::Y).load(Ordering::Relaxed),
                            width: m.u32_at(e + d::WIDTH).load(Ordering::Relaxed),
                            height: m.u32_at(e + d::HEIGHT).load(Ordering::Relaxed),
                        },
                    )
                })
                .collect::<Vec<_>>()
        })?;
        let mut damage = Vec::with_capacity(entries.len());
        for (expected, (sequence, rect)) in (from..=to).zip(entries) {
            // An entry already overwritten by a newer flush, or a rectangle outside the frame,
            // degrades to full damage rather than trusting it.
            match rect.clip(info.width, info.height) {
                Some(r) if sequence == expected && r == rect => damage.push(r),
                _ => return Ok(full),
            }
        }
        Ok(damage)
    }
}

/// Reader half of a seqlock: retries `read` until it ran while the lock was even and
/// unchanged.
fn seqlock_read<T>(
    map: &Mapping,
    lock_offset: usize,
    read: impl Fn(&Mapping) -> T,
) -> Result<T, ReaderError> {
    let lock = map.u64_at(lock_offset);
    let mut deadline = None;
    for attempt in 0u32.. {
        // Relaxed loads plus fences: atomic loads of read-only memory are only sound when
        // relaxed (see core::sync::atomic, "atomic accesses to read-only memory").
        let before = lock.load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        if before % 2 == 0 {
            let value = read(map);
            fence(Ordering::Acquire);
            if lock.load(Ordering::Relaxed) == before {
                return Ok(value);
            }
        }
        if attempt < SEQLOCK_SPINS {
            std::hint::spin_loop();
            continue;
        }
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + SEQLOCK_PATIENCE);
        if Instant::now() >= deadline {
            break;
        }
        std::thread::yield_now();
    }
    Err(ReaderError::Stuck)
}
