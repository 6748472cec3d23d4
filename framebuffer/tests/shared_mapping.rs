//! Writer and reader through two separate mappings of the same memfd.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use framebuffer::{
    layout, FramebufferReader, FramebufferWriter, PoolBuffer, ReaderError, ReaderFds, Rect,
    ScanoutConfig,
};

const W: u32 = 32;
const H: u32 = 16;

fn scanout_of(width: u32, height: u32) -> ScanoutConfig {
    ScanoutConfig {
        width,
        height,
        stride: width * 4,
        offset_in_buffer: 0,
    }
}

fn fill(writer: &mut FramebufferWriter, buf: &PoolBuffer, width: u32, rect: Rect, value: u8) {
    let px = writer.pixels_mut(buf);
    for y in rect.y..rect.y + rect.height {
        let start = (y * width * 4 + rect.x * 4) as usize;
        px[start..start + rect.width as usize * 4].fill(value);
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

fn full(width: u32, height: u32) -> Rect {
    Rect {
        x: 0,
        y: 0,
        width,
        height,
    }
}

#[test]
fn reader_sees_written_pixels_and_flush_damage() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    fill(&mut writer, &buf, W, full(W, H), 0x11);
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();

    let first = reader.wait_frame(soon()).unwrap().expect("initial frame");
    assert_eq!((first.info.width, first.info.height), (W, H));
    assert_eq!(first.damage, vec![full(W, H)]);
    assert!(first.pixels.iter().all(|&b| b == 0x11));

    let rect = Rect {
        x: 3,
        y: 2,
        width: 5,
        height: 4,
    };
    fill(&mut writer, &buf, W, rect, 0x7f);
    let sequence = writer.flush(rect).unwrap();
    let frame = reader.wait_frame(soon()).unwrap().expect("flushed frame");
    assert_eq!(frame.info.sequence, sequence);
    assert_eq!(frame.damage, vec![rect]);
    let at = |x: u32, y: u32| frame.pixels[(y * W * 4 + x * 4) as usize];
    assert_eq!(at(3, 2), 0x7f);
    assert_eq!(at(7, 5), 0x7f);
    assert_eq!(at(8, 5), 0x11);
    assert_eq!(at(3, 6), 0x11);
}

#[test]
fn reader_that_misses_flushes_gets_every_rectangle_then_full_damage_beyond_the_ring() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    reader.wait_frame(soon()).unwrap().unwrap();

    let rects: Vec<Rect> = (0..3)
        .map(|i| Rect {
            x: i,
            y: i,
            width: 1,
            height: 1,
        })
        .collect();
    for r in &rects {
        writer.flush(*r);
    }
    assert_eq!(reader.wait_frame(soon()).unwrap().unwrap().damage, rects);

    for _ in 0..=layout::DAMAGE_RING_LEN {
        writer.flush(Rect {
            x: 1,
            y: 1,
            width: 1,
            height: 1,
        });
    }
    assert_eq!(
        reader.wait_frame(soon()).unwrap().unwrap().damage,
        vec![full(W, H)]
    );
}

#[test]
fn flush_damage_is_clipped_to_the_scanout() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    reader.wait_frame(soon()).unwrap().unwrap();

    assert_eq!(
        writer.flush(Rect {
            x: W,
            y: 0,
            width: 4,
            height: 4
        }),
        None
    );
    writer.flush(Rect {
        x: W - 2,
        y: H - 1,
        width: 100,
        height: 100,
    });
    let frame = reader.wait_frame(soon()).unwrap().unwrap();
    assert_eq!(
        frame.damage,
        vec![Rect {
            x: W - 2,
            y: H - 1,
            width: 2,
            height: 1
        }]
    );
}

#[test]
fn waiting_reader_is_woken_by_a_flush_from_another_thread() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    reader.wait_frame(soon()).unwrap().unwrap();

    let flusher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        writer.flush(full(W, H)).unwrap()
    });
    let frame = reader
        .wait_frame(soon())
        .unwrap()
        .expect("woken by the flush");
    let sequence = frame.info.sequence;
    assert_eq!(sequence, flusher.join().unwrap());
}

#[test]
fn wait_without_a_flush_returns_none_at_the_deadline() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    reader.wait_frame(soon()).unwrap().unwrap();

    let deadline = Instant::now() + Duration::from_millis(30);
    assert!(reader.wait_frame(deadline).unwrap().is_none());
    assert!(Instant::now() >= deadline);
}

#[test]
fn resize_publishes_a_new_generation_and_leaves_the_old_buffer_intact() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let small = writer.alloc((W * H * 4) as usize).unwrap();
    fill(&mut writer, &small, W, full(W, H), 0x22);
    writer
        .set_scanout(Some((&small, scanout_of(W, H))))
        .unwrap();
    let mut reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    let old_info = reader.wait_frame(soon()).unwrap().unwrap().info;

    let (w2, h2) = (2 * W, 2 * H);
    let big = writer.alloc((w2 * h2 * 4) as usize).unwrap();
    fill(&mut writer, &big, w2, full(w2, h2), 0x33);
    writer
        .set_scanout(Some((&big, scanout_of(w2, h2))))
        .unwrap();

    assert!(!reader.is_current(&old_info).unwrap());
    let frame = reader.wait_frame(soon()).unwrap().unwrap();
    assert_ne!(frame.info.generation, old_info.generation);
    assert_eq!((frame.info.width, frame.info.height), (w2, h2));
    assert_eq!(frame.damage, vec![full(w2, h2)]);
    assert!(frame.pixels.iter().all(|&b| b == 0x33));
    // The old buffer still holds its pixels until the writer frees it.
    assert!(writer.pixels_mut(&small)[..(W * H * 4) as usize]
        .iter()
        .all(|&b| b == 0x22));
}

#[test]
fn freeing_the_scanout_buffer_disables_the_scanout() {
    let mut writer = FramebufferWriter::new(1 << 20).unwrap();
    let buf = writer.alloc((W * H * 4) as usize).unwrap();
    writer.set_scanout(Some((&buf, scanout_of(W, H)))).unwrap();
    let reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();

    writer.free(buf);

    assert!(!reader.info().unwrap().enabled());
    assert_eq!(writer.pool_free(), 1 << 20);
}

#[test]
fn reader_never_sees_a_torn_header_while_the_writer_resizes() {
    let mut writer = FramebufferWriter::new(8 << 20).unwrap();
    let sizes = [(64u32, 64u32), (640, 480)];
    let bufs: Vec<_> = sizes
        .iter()
        .map(|&(w, h)| writer.alloc((w * h * 4) as usize).unwrap())
        .collect();
    let reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let resizer = std::thread::spawn(move || {
        let mut i = 0;
        while !stop_writer.load(Ordering::Relaxed) {
            let (w, h) = sizes[i % 2];
            writer
                .set_scanout(Some((&bufs[i % 2], scanout_of(w, h))))
                .unwrap();
            writer.flush(full(w, h));
            i += 1;
        }
        i
    });

    let mut seen = 0;
    let until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < until {
        let info = reader.info().unwrap();
        if info.enabled() {
            assert!(
                sizes.contains(&(info.width, info.height)),
                "torn header {}x{}",
                info.width,
                info.height
            );
            assert_eq!(info.stride, info.width * 4);
            seen += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    assert!(resizer.join().unwrap() > 0);
    assert!(seen > 0);
}

#[test]
fn reader_descriptor_cannot_write_the_framebuffer() {
    let writer = FramebufferWriter::new(1 << 16).unwrap();
    let fds = writer.share().reader_fds().unwrap();
    let mut file = std::fs::File::from(fds.memfd);
    assert!(file.write_all(b"x").is_err());
    // Nor can it be mapped writable, nor a read-only mapping made writable.
    let len = 1 << 12;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // SAFETY: a fresh mapping of a valid fd; checked against MAP_FAILED and unmapped below.
    let writable = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_eq!(writable, libc::MAP_FAILED, "mapped writable");
    // SAFETY: as above, read-only.
    let read_only = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    assert_ne!(read_only, libc::MAP_FAILED);
    // SAFETY: `read_only` is the mapping made above, of `len` bytes.
    let upgraded = unsafe { libc::mprotect(read_only, len, libc::PROT_READ | libc::PROT_WRITE) };
    assert_ne!(upgraded, 0, "a read-only mapping was made writable");
    // SAFETY: unmapping the mapping made above.
    unsafe { libc::munmap(read_only, len) };
}

#[test]
fn cursor_image_hotspot_and_position_round_trip() {
    let mut writer = FramebufferWriter::new(1 << 16).unwrap();
    let reader = FramebufferReader::new(writer.share().reader_fds().unwrap()).unwrap();
    let image: Vec<u8> = (0..layout::CURSOR_IMAGE_SIZE).map(|i| i as u8).collect();

    writer.set_cursor(&image, 3, 4, 100, -5).unwrap();
    let c = reader.cursor().unwrap();
    assert_eq!(
        (c.visible, c.x, c.y, c.hot_x, c.hot_y),
        (true, 100, -5, 3, 4)
    );
    assert_eq!(c.image, image);

    writer.move_cursor(7, 8, false);
    let moved = reader.cursor().unwrap();
    assert_eq!((moved.visible, moved.x, moved.y), (false, 7, 8));
    assert!(moved.serial > c.serial);
}

#[test]
fn reader_rejects_an_unsealed_file_and_a_wrong_magic() {
    let memfd = |flags: libc::c_uint| {
        // SAFETY: plain syscall with a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"test".as_ptr(), flags) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let writer = FramebufferWriter::new(1 << 16).unwrap();
    let notify = || writer.share().reader_fds().unwrap().notify;

    let unsealed = memfd(0);
    std::fs::File::from(unsealed.try_clone().unwrap())
        .set_len(1 << 20)
        .unwrap();
    let err = FramebufferReader::new(ReaderFds {
        memfd: unsealed,
        notify: notify(),
    })
    .unwrap_err();
    assert!(matches!(err, ReaderError::NotSealed), "{err}");

    let zeros = memfd(libc::MFD_ALLOW_SEALING);
    std::fs::File::from(zeros.try_clone().unwrap())
        .set_len(1 << 20)
        .unwrap();
    // SAFETY: F_ADD_SEALS on a valid fd with an int argument.
    let rc = unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&zeros),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(rc, 0);
    let err = FramebufferReader::new(ReaderFds {
        memfd: zeros,
        notify: notify(),
    })
    .unwrap_err();
    assert!(matches!(err, ReaderError::BadMagic { .. }), "{err}");
}
