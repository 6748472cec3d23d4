//! The VM's virtio-gpu scanout as an [`encoder::FrameSource`], read from the shared
//! framebuffer (`GET /framebuffer`'s memfd and flush eventfd) with
//! [`framebuffer::FramebufferReader`], and the virtio-gpu cursor as cursor updates.

use std::sync::Arc;
use std::time::Instant;

use encoder::{
    CursorShape, CursorUpdate, FrameRef, FrameSource, PixelFormat, Rect, SourceError, SourceFrame,
};
use framebuffer::{CursorState, FramebufferReader, ReaderError, ReaderFds};
use tracing::debug;

use super::{configured_display, Result, SharedSize, API_TIMEOUT};
use crate::uds::VmmSocket;
use crate::vmm_client::VmmClient;

/// The VM's scanout as a frame source. While the guest has not enabled the scanout (or has
/// disabled it) the source returns one black frame of the last known size, so viewers get a
/// picture; afterwards it returns frames only when the guest flushes.
///
/// The virtio-gpu cursor is reported through [`FrameSource::cursor_update`]: `next_frame`
/// returns early when the cursor's serial changed, and the image goes out only when the
/// shape or hotspot changed, trimmed of its transparent right and bottom margins.
pub struct VmFramebufferSource {
    reader: FramebufferReader,
    size: Arc<SharedSize>,
    blank: Vec<u8>,
    blank_sent: bool,
    /// (generation, sequence) of the last frame returned.
    last_frame: Option<(u64, u64)>,
    /// Cursor serial last reported by [`FrameSource::cursor_update`].
    cursor_serial: Option<u64>,
    /// Cursor serial for which `next_frame` last returned early: each pointer change ends
    /// one wait, so a caller that never asks for the cursor is not woken over and over.
    cursor_woken: u64,
    /// Hotspot and 64x64 image last reported.
    cursor_shape: Option<(u32, u32, Vec<u8>)>,
}

impl std::fmt::Debug for VmFramebufferSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmFramebufferSource")
            .field("reader", &self.reader)
            .field("size", &self.size.get())
            .field("last_frame", &self.last_frame)
            .finish_non_exhaustive()
    }
}

impl VmFramebufferSource {
    /// Fetches the framebuffer of the VMM serving its API at `api_sock`.
    pub fn connect(api_sock: &VmmSocket) -> Result<Self> {
        let mut api = VmmClient::connect(api_sock, API_TIMEOUT)?;
        let display = configured_display(&mut api)?;
        let fds = api.framebuffer()?;
        Self::new(fds, display)
    }

    /// Reads the framebuffer in `fds`; `display` is the size reported while the scanout is
    /// disabled (the VM's configured display size).
    pub fn new(fds: ReaderFds, display: (u32, u32)) -> Result<Self> {
        let reader = FramebufferReader::new(fds)?;
        let info = reader.info()?;
        let cursor_woken = reader.cursor_serial();
        let size = if info.enabled() {
            (info.width, info.height)
        } else {
            display
        };
        Ok(Self {
            reader,
            size: Arc::new(SharedSize::new(size.0, size.1)),
            blank: Vec::new(),
            blank_sent: false,
            last_frame: None,
            cursor_serial: None,
            cursor_woken,
            cursor_shape: None,
        })
    }

    /// Whether the cursor changed since the last wait it ended.
    fn cursor_changed(&mut self) -> bool {
        let serial = self.reader.cursor_serial();
        let changed = serial != self.cursor_woken;
        self.cursor_woken = serial;
        changed
    }

    /// The size handle to give the matching [`VmInput`].
    pub fn shared_size(&self) -> Arc<SharedSize> {
        self.size.clone()
    }
}

fn source_error(e: ReaderError) -> SourceError {
    match e {
        ReaderError::Wait(io) | ReaderError::Map(io) => SourceError::Io(io),
        other => SourceError::Other(other.to_string()),
    }
}

impl FrameSource for VmFramebufferSource {
    fn size(&self) -> (u32, u32) {
        match self.reader.info() {
            Ok(info) if info.enabled() => (info.width, info.height),
            _ => self.size.get(),
        }
    }

    fn next_frame(&mut self, deadline: Instant) -> Result<Option<SourceFrame<'_>>, SourceError> {
        loop {
            let info = self.reader.info().map_err(source_error)?;
            if info.enabled() {
                self.blank_sent = false;
                if self.last_frame != Some((info.generation, info.sequence)) {
                    break;
                }
            } else if !self.blank_sent {
                self.blank_sent = true;
                let (width, height) = self.size.get();
                self.blank.clear();
                self.blank.resize(width as usize * height as usize * 4, 0);
                return Ok(Some(SourceFrame {
                    frame: FrameRef::packed(width, height, PixelFormat::Bgrx, &self.blank),
                    damage: vec![Rect::new(0, 0, width, height)],
                    captured_at: Instant::now(),
                }));
            }
            // A cursor move flushes nothing: return so the caller picks it up now.
            if self.cursor_changed() {
                return Ok(None);
            }
            if !self.reader.wait_change(deadline).map_err(source_error)? {
                return Ok(None);
            }
        }
        let Some(frame) = self.reader.wait_frame(deadline).map_err(source_error)? else {
            return Ok(None);
        };
        self.last_frame = Some((frame.info.generation, frame.info.sequence));
        let (width, height) = (frame.info.width, frame.info.height);
        self.size.set(width, height);
        let damage = frame
            .damage
            .iter()
            .filter_map(|r| r.clip(width, height))
            .map(|r| Rect::new(r.x, r.y, r.width, r.height))
            .collect();
        Ok(Some(SourceFrame {
            frame: FrameRef {
                width,
                height,
                stride: frame.info.stride as usize,
                format: PixelFormat::Bgrx,
                data: frame.pixels,
            },
            damage,
            captured_at: Instant::now(),
        }))
    }

    fn cursor_update(&mut self) -> Option<CursorUpdate> {
        // Called after every frame: the image is only read when the serial moved.
        if self.cursor_serial == Some(self.reader.cursor_serial()) {
            return None;
        }
        let cursor = match self.reader.cursor() {
            Ok(c) => c,
            Err(e) => {
                // A stuck or corrupt writer also fails the next frame read, which ends the stream.
                debug!(error = %e, "reading the cursor failed");
                return None;
            }
        };
        if self.cursor_serial == Some(cursor.serial) {
            return None;
        }
        self.cursor_serial = Some(cursor.serial);
        let same_shape = self.cursor_shape.as_ref().is_some_and(|(hx, hy, image)| {
            (*hx, *hy) == (cursor.hot_x, cursor.hot_y) && *image == cursor.image
        });
        let image = (!same_shape).then(|| trimmed_cursor(&cursor));
        let update = CursorUpdate {
            x: cursor.x,
            y: cursor.y,
            visible: cursor.visible,
            image,
        };
        if !same_shape {
            self.cursor_shape = Some((cursor.hot_x, cursor.hot_y, cursor.image));
        }
        Some(update)
    }
}

/// The cursor's image without its fully transparent right columns and bottom rows (the
/// top-left stays, so the hotspot keeps its meaning); at least 1x1.
fn trimmed_cursor(c: &CursorState) -> CursorShape {
    let side = framebuffer::layout::CURSOR_SIDE as usize;
    let (mut width, mut height) = (1, 1);
    for (i, px) in c.image.chunks_exact(4).enumerate() {
        if px[3] != 0 {
            width = width.max(i % side + 1);
            height = height.max(i / side + 1);
        }
    }
    let mut bgra = Vec::with_capacity(width * height * 4);
    for row in c.image.chunks_exact(side * 4).take(height) {
        bgra.extend_from_slice(&row[..width * 4]);
    }
    CursorShape {
        hot_x: c.hot_x,
        hot_y: c.hot_y,
        width: width as u32,
        height: height as u32,
        bgra,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn scanout(width: u32, height: u32) -> framebuffer::ScanoutConfig {
        framebuffer::ScanoutConfig {
            width,
            height,
            // Padded rows: the source must pass the stride on, not assume width * 4.
            stride: width * 4 + 64,
            offset_in_buffer: 0,
        }
    }

    #[test]
    fn source_follows_flushes_resizes_and_a_disabled_scanout() {
        use framebuffer::FramebufferWriter;
        let soon = || Instant::now() + Duration::from_secs(5);
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (64, 48)).unwrap();
        let size = source.shared_size();

        // Disabled scanout: one blank frame of the configured size, then nothing.
        assert_eq!(source.size(), (64, 48));
        let blank = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!((blank.frame.width, blank.frame.height), (64, 48));
        let quick = Instant::now() + Duration::from_millis(50);
        assert!(source.next_frame(quick).unwrap().is_none());

        // The guest sets a 32x16 scanout and flushes a rectangle.
        let buf = writer.alloc(((32 * 4 + 64) * 16) as usize).unwrap();
        writer.pixels_mut(&buf).fill(0x22);
        writer.set_scanout(Some((&buf, scanout(32, 16)))).unwrap();
        let first = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!((first.frame.width, first.frame.height), (32, 16));
        assert_eq!(first.frame.stride, 32 * 4 + 64);
        assert_eq!(first.damage, vec![Rect::new(0, 0, 32, 16)]);
        first.frame.validate().unwrap();
        assert!(first.frame.data[..32 * 4].iter().all(|&b| b == 0x22));
        assert_eq!(size.get(), (32, 16));
        let damage = framebuffer::Rect {
            x: 2,
            y: 3,
            width: 4,
            height: 5,
        };
        writer.flush(damage).unwrap();
        let flushed = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!(flushed.damage, vec![Rect::new(2, 3, 4, 5)]);

        // Resize: a new buffer, reported in full at its new size.
        let big = writer.alloc(((40 * 4 + 64) * 20) as usize).unwrap();
        writer.set_scanout(Some((&big, scanout(40, 20)))).unwrap();
        let resized = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!(resized.damage, vec![Rect::new(0, 0, 40, 20)]);
        assert_eq!(source.size(), (40, 20));

        // Disabled again: one blank frame of the last size.
        writer.set_scanout(None).unwrap();
        let blank = source.next_frame(soon()).unwrap().unwrap();
        assert_eq!((blank.frame.width, blank.frame.height), (40, 20));
        assert!(blank.frame.data.iter().all(|&b| b == 0));
    }

    #[test]
    fn cursor_changes_end_the_frame_wait_and_send_the_image_only_when_it_changes() {
        use framebuffer::layout::{CURSOR_IMAGE_SIZE, CURSOR_SIDE};
        use framebuffer::FramebufferWriter;
        let soon = || Instant::now() + Duration::from_secs(5);
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (32, 16)).unwrap();
        let buf = writer.alloc(((32 * 4 + 64) * 16) as usize).unwrap();
        writer.set_scanout(Some((&buf, scanout(32, 16)))).unwrap();
        source.next_frame(soon()).unwrap().unwrap();
        let initial = source.cursor_update().expect("initial cursor state");
        assert!(!initial.visible);
        // A 5x3 opaque block at (2, 1) of the 64x64 image, hotspot on its corner.
        let mut image = vec![0u8; CURSOR_IMAGE_SIZE];
        for y in 1..4 {
            for x in 2..7 {
                let i = ((y * CURSOR_SIDE + x) * 4) as usize;
                image[i..i + 4].copy_from_slice(&[1, 2, 3, 255]);
            }
        }

        writer.set_cursor(&image, 2, 1, 10, 20).unwrap();
        let started = Instant::now();
        let waited = source
            .next_frame(started + Duration::from_secs(5))
            .unwrap()
            .map(|f| f.damage);
        let woke_after = started.elapsed();
        let shown = source.cursor_update().expect("cursor shown");
        let unchanged = source.cursor_update();
        writer.move_cursor(30, 40, true);
        source.next_frame(soon()).unwrap();
        let moved = source.cursor_update().expect("cursor moved");
        // A guest re-sending the same image with a new position: only the position is news.
        writer.set_cursor(&image, 2, 1, 31, 41).unwrap();
        let resent = source.cursor_update().expect("cursor re-sent");
        writer.move_cursor(31, 41, false);
        let hidden = source.cursor_update().expect("cursor hidden");
        writer.flush(framebuffer::Rect {
            x: 0,
            y: 0,
            width: 4,
            height: 4,
        });
        let flushed = source.next_frame(soon()).unwrap().map(|f| f.damage);

        assert!(waited.is_none(), "the guest flushed nothing");
        assert!(
            woke_after < Duration::from_secs(4),
            "returned for the cursor, not at the deadline ({woke_after:?})"
        );
        assert_eq!((shown.x, shown.y, shown.visible), (10, 20, true));
        let shape = shown.image.expect("new shape is sent");
        assert_eq!(
            (shape.width, shape.height, shape.hot_x, shape.hot_y),
            (7, 4, 2, 1),
            "trimmed to the opaque pixels' right and bottom edges"
        );
        assert_eq!(shape.bgra.len(), 7 * 4 * 4);
        assert_eq!(&shape.bgra[..4], &[0, 0, 0, 0]);
        assert_eq!(&shape.bgra[(7 + 2) * 4..(7 + 3) * 4], &[1, 2, 3, 255]);
        assert_eq!(unchanged, None);
        assert_eq!(
            moved,
            CursorUpdate {
                x: 30,
                y: 40,
                visible: true,
                image: None
            }
        );
        assert_eq!((resent.x, resent.y, resent.image), (31, 41, None));
        assert!(!hidden.visible && hidden.image.is_none());
        assert_eq!(flushed, Some(vec![Rect::new(0, 0, 4, 4)]));
    }

    #[test]
    fn a_new_cursor_shape_is_sent_again() {
        use framebuffer::layout::CURSOR_IMAGE_SIZE;
        use framebuffer::FramebufferWriter;
        let mut writer = FramebufferWriter::new(4 << 20).unwrap();
        let mut source =
            VmFramebufferSource::new(writer.share().reader_fds().unwrap(), (32, 16)).unwrap();
        let arrow = vec![255u8; CURSOR_IMAGE_SIZE];
        writer.set_cursor(&arrow, 0, 0, 5, 5).unwrap();
        source.cursor_update().expect("first shape");

        writer.set_cursor(&arrow, 3, 3, 5, 5).unwrap();
        let new_hotspot = source.cursor_update().expect("hotspot changed");
        let mut beam = arrow.clone();
        beam[..4].copy_from_slice(&[9, 9, 9, 255]);
        writer.set_cursor(&beam, 3, 3, 5, 5).unwrap();
        let new_pixels = source.cursor_update().expect("pixels changed");

        let shape = new_hotspot.image.expect("sent for a new hotspot");
        assert_eq!((shape.width, shape.height, shape.hot_x), (64, 64, 3));
        assert_eq!(
            &new_pixels.image.expect("sent for new pixels").bgra[..4],
            &[9, 9, 9, 255]
        );
    }
}
