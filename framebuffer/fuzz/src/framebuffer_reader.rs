//! The framebuffer reader (hostd's side) against a hostile writer (a VMM that publishes
//! garbage in the header and the damage ring): it never panics, never reads outside the
//! file, and whatever it returns is consistent with what the header says: a frame's pixels
//! lie inside the file and have the length its geometry implies, its damage lies inside the
//! frame, the first frame and every new generation are fully damaged, and the cursor is
//! what the header holds.
//!
//! A real writer sets up a 32x16 scanout and flushes twice; then the input is a sequence of
//! operations: `0xc0..=0xff` reads (the first one opens the reader), anything else patches
//! the header page: two bytes of offset, then four bytes (even op) or eight bytes (odd op)
//! written there. The writer's two seqlock words are kept even (a held lock only makes the
//! reader wait, and is tested elsewhere). The input ends with a read.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::time::Instant;

use framebuffer::layout::{self, off};
use framebuffer::{
    FramebufferReader, FramebufferWriter, ReaderError, ReaderFds, Rect, ScanoutConfig,
};

const POOL_SIZE: usize = 64 * 1024;
const WIDTH: u32 = 32;
const HEIGHT: u32 = 16;

/// The file as the reader must interpret it, read back through our own descriptor.
struct Raw<'a>(&'a File);

impl Raw<'_> {
    fn u32(&self, offset: usize) -> u32 {
        let mut b = [0u8; 4];
        self.0.read_exact_at(&mut b, offset as u64).unwrap();
        u32::from_le_bytes(b)
    }

    fn u64(&self, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.0.read_exact_at(&mut b, offset as u64).unwrap();
        u64::from_le_bytes(b)
    }

    fn len(&self) -> u64 {
        self.0.metadata().unwrap().len()
    }
}

/// A writer with an enabled scanout and two flushes, then the hostile writer's file: a
/// copy of everything the real writer published in a memfd sealed only against shrinking
/// and growing (as the reader demands), which the patches write to. The real writer seals
/// its own memfd against every new write, so a hostile VMM is modelled by a file it owns,
/// which the reader cannot tell apart. Returns the real writer (kept for its flush
/// eventfd), the reader's descriptors on the copy, and the copy.
fn published() -> (FramebufferWriter, ReaderFds, File) {
    let mut writer = FramebufferWriter::new(POOL_SIZE).expect("framebuffer writer");
    let stride = WIDTH * 4;
    let buffer = writer
        .alloc((stride * HEIGHT) as usize)
        .expect("pool buffer");
    let config = ScanoutConfig {
        width: WIDTH,
        height: HEIGHT,
        stride,
        offset_in_buffer: 0,
    };
    writer
        .set_scanout(Some((&buffer, config)))
        .expect("scanout");
    for (x, y) in [(0, 0), (8, 4)] {
        writer.flush(Rect {
            x,
            y,
            width: 8,
            height: 8,
        });
    }
    let real = writer.share().reader_fds().expect("reader descriptors");
    let hostile = hostile_copy(&File::from(real.memfd));
    let fds = ReaderFds {
        memfd: hostile.try_clone().expect("dup of the copy").into(),
        notify: real.notify,
    };
    (writer, fds, hostile)
}

/// A memfd with the contents of `published`, sealed against shrinking and growing only.
fn hostile_copy(published: &File) -> File {
    let len = published.metadata().expect("published size").len();
    let mut contents = vec![0u8; len as usize];
    published
        .read_exact_at(&mut contents, 0)
        .expect("published contents");
    // SAFETY: a static NUL-terminated name; the returned fd is checked before use.
    let fd = unsafe {
        libc::memfd_create(
            c"hostile-framebuffer".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(&contents, 0).expect("copy contents");
    // SAFETY: F_ADD_SEALS on a valid fd with an int argument.
    let sealed = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert!(sealed == 0, "seal: {}", std::io::Error::last_os_error());
    file
}

fn patch(file: &File, wide: bool, offset: u16, value: &[u8]) {
    let width = if wide { 8 } else { 4 };
    let offset = (usize::from(offset) % layout::HEADER_SIZE) & !(width - 1);
    file.write_all_at(&value[..width], offset as u64).unwrap();
    for lock in [off::FRAME_LOCK, off::CURSOR_LOCK] {
        let raw = Raw(file).u64(lock);
        file.write_all_at(&(raw & !1).to_le_bytes(), lock as u64)
            .unwrap();
    }
}

/// One read through the reader, checked against the header.
fn read(reader: &mut FramebufferReader, raw: &Raw<'_>, last_generation: &mut Option<u64>) {
    let flags = raw.u32(off::FLAGS);
    match reader.info() {
        Ok(info) if info.enabled() => {
            assert_ne!(flags & layout::FLAG_ENABLED, 0);
            assert_eq!(
                (info.width, info.height, info.stride),
                (
                    raw.u32(off::WIDTH),
                    raw.u32(off::HEIGHT),
                    raw.u32(off::STRIDE)
                )
            );
            assert!(info.width <= layout::MAX_DIMENSION && info.height <= layout::MAX_DIMENSION);
            assert!(u64::from(info.stride) >= u64::from(info.width) * 4);
            let start = raw.u64(off::PIXELS_OFFSET);
            let len =
                u64::from(info.stride) * u64::from(info.height - 1) + u64::from(info.width) * 4;
            assert!(start >= layout::POOL_OFFSET as u64 && start + len <= raw.len());
        }
        Ok(info) => assert_eq!(flags & layout::FLAG_ENABLED, 0, "{info:?}"),
        Err(e) => assert!(matches!(e, ReaderError::Corrupt(_)), "{e}"),
    }

    match reader.wait_frame(Instant::now()) {
        Ok(Some(frame)) => {
            let info = frame.info;
            let len = info.stride as usize * (info.height as usize - 1) + info.width as usize * 4;
            assert_eq!(frame.pixels.len(), len);
            // Touch both ends: outside the mapping this faults.
            std::hint::black_box((frame.pixels[0], frame.pixels[len - 1]));
            let full = Rect {
                x: 0,
                y: 0,
                width: info.width,
                height: info.height,
            };
            if *last_generation != Some(info.generation) {
                assert_eq!(frame.damage, [full], "a new generation is fully damaged");
            }
            assert!(!frame.damage.is_empty());
            for r in &frame.damage {
                assert_eq!(
                    r.clip(info.width, info.height),
                    Some(*r),
                    "{r:?} in {info:?}"
                );
            }
            *last_generation = Some(info.generation);
        }
        Ok(None) => {}
        Err(e) => assert!(matches!(e, ReaderError::Corrupt(_)), "{e}"),
    }

    let cursor = reader.cursor().expect("an unlocked cursor reads");
    assert_eq!(cursor.image.len(), layout::CURSOR_IMAGE_SIZE);
    assert_eq!(cursor.serial, raw.u64(off::CURSOR_SERIAL));
    assert_eq!(cursor.x, raw.u32(off::CURSOR_X) as i32);
    assert_eq!(cursor.hot_y, raw.u32(off::CURSOR_HOT_Y));
    assert_eq!(reader.cursor_serial(), cursor.serial);
}

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let (_writer, fds, hostile) = published();
    let raw = Raw(&hostile);
    let mut fds = Some(fds);
    let mut reader: Option<FramebufferReader> = None;
    let mut last_generation = None;
    let mut rest = data;
    loop {
        let op = rest.first().copied();
        if op.is_none() || op >= Some(0xc0) {
            if reader.is_none() {
                let Some(fds) = fds.take() else { return };
                match FramebufferReader::new(fds) {
                    Ok(r) => {
                        assert_eq!(raw.u64(off::MAGIC), layout::MAGIC);
                        assert_eq!(raw.u32(off::VERSION), layout::VERSION);
                        assert_eq!(raw.u64(off::TOTAL_SIZE), raw.len());
                        reader = Some(r);
                    }
                    Err(ReaderError::BadMagic { .. } | ReaderError::Corrupt(_)) => return,
                    Err(e) => panic!("opening the reader: {e}"),
                }
            }
            read(reader.as_mut().unwrap(), &raw, &mut last_generation);
            if op.is_none() {
                return;
            }
            rest = &rest[1..];
            continue;
        }
        let op = op.unwrap();
        let wide = op & 1 == 1;
        let need = 2 + if wide { 8 } else { 4 };
        let Some(args) = rest.get(1..1 + need) else {
            rest = &[];
            continue;
        };
        patch(
            &hostile,
            wide,
            u16::from_le_bytes([args[0], args[1]]),
            &args[2..],
        );
        rest = &rest[1 + need..];
    }
}
