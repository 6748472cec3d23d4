//! Driver side of virtio queues for the gpu and input device tests, on
//! `virtio_queue::mock::MockSplitQueue`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::{GuestMemoryMmap, InterruptKind, InterruptTrigger};

const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptors per mock queue.
pub const QUEUE_LEN: u16 = 64;

/// Records every interrupt the device raises and whether it asked for a reset.
#[derive(Default)]
pub struct RecordingInterrupt {
    pub kinds: Mutex<Vec<InterruptKind>>,
    pub needs_reset: AtomicBool,
}

impl InterruptTrigger for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        self.kinds.lock().unwrap().push(kind);
        Ok(())
    }

    fn set_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.store(true, Ordering::SeqCst);
        Ok(())
    }
}

impl RecordingInterrupt {
    /// A shared recorder.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// How many interrupts of `kind` were raised.
    pub fn count(&self, kind: InterruptKind) -> usize {
        self.kinds
            .lock()
            .unwrap()
            .iter()
            .filter(|k| **k == kind)
            .count()
    }
}

/// `size` bytes of guest memory at address 0.
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// One buffer of a chain: address, length, device-writable.
#[derive(Clone, Copy)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn read(addr: u64, len: usize) -> Self {
        Self {
            addr,
            len: len as u32,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn write(addr: u64, len: usize) -> Self {
        Self {
            addr,
            len: len as u32,
            writable: true,
        }
    }
}

/// A driver-side queue: posts chains and reads back used entries.
pub struct DriverQueue<'a> {
    mock: MockSplitQueue<'a, GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
    next_desc: u16,
}

impl<'a> DriverQueue<'a> {
    /// A queue whose rings live at `base`.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64) -> Self {
        Self {
            mock: MockSplitQueue::create(mem, GuestAddress(base), QUEUE_LEN),
            mem,
            next_desc: 0,
        }
    }

    /// The mock queue (its rings and their addresses).
    pub fn mock(&self) -> &MockSplitQueue<'a, GuestMemoryMmap> {
        &self.mock
    }

    /// The device-side queue for `activate`.
    pub fn device_queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    /// Posts one chain made of `bufs`.
    pub fn post(&mut self, bufs: &[Buf]) {
        let start = self.next_desc;
        assert!(usize::from(start) + bufs.len() <= usize::from(QUEUE_LEN));
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let last = i + 1 == bufs.len();
                let mut flags = if b.writable { VRING_DESC_F_WRITE } else { 0 };
                if !last {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(
                    b.addr,
                    b.len,
                    flags,
                    start + i as u16 + 1,
                ))
            })
            .collect();
        self.mock.add_desc_chains(&descs, start).unwrap();
        self.next_desc += bufs.len() as u16;
    }

    /// Writes `bytes` at `addr` and posts a request/response chain.
    pub fn post_request(
        &mut self,
        addr: u64,
        bytes: &[u8],
        response_addr: u64,
        response_len: usize,
    ) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.post(&[
            Buf::read(addr, bytes.len()),
            Buf::write(response_addr, response_len),
        ]);
    }

    /// Used entries so far: (head index, length written).
    pub fn used(&self) -> Vec<(u32, u32)> {
        let idx = self.mock.used().idx().load();
        (0..idx)
            .map(|i| {
                let e = self
                    .mock
                    .used()
                    .ring()
                    .ref_at(usize::from(i) % usize::from(QUEUE_LEN))
                    .unwrap()
                    .load();
                (e.id(), e.len())
            })
            .collect()
    }
}
