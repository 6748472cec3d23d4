//! virtio-gpu display path benchmark. Prints one table:
//!
//! - flush → reader woken: time from the device executing RESOURCE_FLUSH to a reader thread
//!   blocked in `FramebufferReader::wait_frame` returning the new sequence (median, p99);
//! - host CPU per full 1920x1080 TRANSFER_TO_HOST_2D + RESOURCE_FLUSH (backing scattered in
//!   4 KiB pages, as a guest's shmem buffer is), next to a plain memcpy of the same bytes
//!   measured in the same run, and their ratio.
//!
//! Run: `cargo bench -p genos-vmm --bench gpu`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use framebuffer::FramebufferReader;
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::gpu::decoder::{Command, Format, MemEntry, Rect, Response};
use vmm::devices::virtio::gpu::{GpuConfig, GpuState};
use vmm::devices::virtio::GuestMemoryMmap;

const WIDTH: u32 = 1920;
const HEIGHT: u32 = 1080;
const PAGE: u64 = 4096;
const WAKE_SAMPLES: usize = 2000;
const COPY_SAMPLES: usize = 200;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into a live local.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ok(r: Response) {
    assert_eq!(r, Response::OkNoData);
}

fn main() {
    let frame_len = (WIDTH * HEIGHT * 4) as u64;
    let pages = frame_len.div_ceil(PAGE);
    // Guest memory with the frame's pages in reverse order, one backing entry per page.
    let base = 0x100_0000u64;
    let mem_size = (base + (pages + 1) * PAGE) as usize;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    let entries: Vec<MemEntry> = (0..pages)
        .map(|i| {
            let len = PAGE.min(frame_len - i * PAGE) as u32;
            MemEntry {
                addr: base + (pages - 1 - i) * PAGE,
                len,
            }
        })
        .collect();
    for (i, e) in entries.iter().enumerate() {
        let fill = vec![(i % 251) as u8; e.len as usize];
        mem.write_slice(&fill, GuestAddress(e.addr)).unwrap();
    }

    let mut gpu = GpuState::new(GpuConfig::with_size(WIDTH, HEIGHT)).unwrap();
    let full = Rect {
        x: 0,
        y: 0,
        width: WIDTH,
        height: HEIGHT,
    };
    ok(gpu.execute(
        &mem,
        Command::ResourceCreate2d {
            resource_id: 1,
            format: Format::B8G8R8X8,
            width: WIDTH,
            height: HEIGHT,
        },
    ));
    ok(gpu.execute(
        &mem,
        Command::ResourceAttachBacking {
            resource_id: 1,
            entries,
        },
    ));
    ok(gpu.execute(
        &mem,
        Command::SetScanout {
            scanout_id: 0,
            resource_id: 1,
            rect: full,
        },
    ));
    let transfer = Command::TransferToHost2d {
        resource_id: 1,
        rect: full,
        offset: 0,
    };
    let flush = Command::ResourceFlush {
        resource_id: 1,
        rect: full,
    };

    // Transfer + flush vs memcpy, interleaved so both see the same machine state.
    let src = vec![0x5au8; frame_len as usize];
    let mut dst = vec![0u8; frame_len as usize];
    for _ in 0..5 {
        ok(gpu.execute(&mem, transfer.clone()));
        dst.copy_from_slice(&src);
    }
    let (mut gpu_ns, mut copy_ns) = (Vec::new(), Vec::new());
    for _ in 0..COPY_SAMPLES {
        let t = thread_cpu_ns();
        ok(gpu.execute(&mem, transfer.clone()));
        ok(gpu.execute(&mem, flush.clone()));
        gpu_ns.push(thread_cpu_ns() - t);
        let t = thread_cpu_ns();
        black_box(&mut dst).copy_from_slice(black_box(&src));
        copy_ns.push(thread_cpu_ns() - t);
    }
    gpu_ns.sort_unstable();
    copy_ns.sort_unstable();

    // Flush → wake-up: a reader thread blocks in wait_frame; the device thread flushes a
    // small rectangle and records when; the reader records when it got the new sequence.
    let mut reader = FramebufferReader::new(gpu.handle().reader_fds().unwrap()).unwrap();
    reader
        .wait_frame(Instant::now() + Duration::from_secs(1))
        .unwrap()
        .unwrap();
    let epoch = Instant::now();
    let flushed_at = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(Barrier::new(2));
    let (flushed_at_r, ready_r) = (flushed_at.clone(), ready.clone());
    let waiter = std::thread::spawn(move || {
        let mut latencies = Vec::with_capacity(WAKE_SAMPLES);
        for _ in 0..WAKE_SAMPLES {
            ready_r.wait();
            let frame = reader
                .wait_frame(Instant::now() + Duration::from_secs(5))
                .unwrap()
                .expect("flush within 5 s");
            let woke = epoch.elapsed().as_nanos() as u64;
            black_box(frame.info.sequence);
            latencies.push(woke - flushed_at_r.load(Ordering::Acquire));
        }
        latencies
    });
    let small = Command::ResourceFlush {
        resource_id: 1,
        rect: Rect {
            x: 10,
            y: 10,
            width: 64,
            height: 16,
        },
    };
    for _ in 0..WAKE_SAMPLES {
        ready.wait();
        // Let the reader reach poll() so each sample includes a real wake-up.
        std::thread::sleep(Duration::from_micros(200));
        flushed_at.store(epoch.elapsed().as_nanos() as u64, Ordering::Release);
        ok(gpu.execute(&mem, small.clone()));
    }
    let mut wake_ns = waiter.join().unwrap();
    wake_ns.sort_unstable();

    let us = |ns: u64| ns as f64 / 1000.0;
    let gpu_med = percentile(&gpu_ns, 0.5);
    let copy_med = percentile(&copy_ns, 0.5);
    println!("virtio-gpu display path ({WIDTH}x{HEIGHT} BGRX, {pages} backing pages)");
    println!("| measurement | median | p99 | target |");
    println!("|---|---|---|---|");
    println!(
        "| flush -> reader woken ({WAKE_SAMPLES} samples) | {:.1} us | {:.1} us | median <= 1000 us |",
        us(percentile(&wake_ns, 0.5)),
        us(percentile(&wake_ns, 0.99))
    );
    println!(
        "| transfer+flush, host CPU ({COPY_SAMPLES} samples) | {:.0} us | {:.0} us | |",
        us(gpu_med),
        us(percentile(&gpu_ns, 0.99))
    );
    println!(
        "| memcpy of the same {} MiB, host CPU | {:.0} us | {:.0} us | |",
        frame_len >> 20,
        us(copy_med),
        us(percentile(&copy_ns, 0.99))
    );
    println!(
        "| ratio transfer+flush / memcpy | {:.2}x | | <= 1.5x |",
        gpu_med as f64 / copy_med as f64
    );
}
