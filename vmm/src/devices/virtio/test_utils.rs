//! Test harness for virtio device models: guest memory, a driver-side mock split queue
//! (virtio-queue's `MockSplitQueue`) and an interrupt that counts.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::{GuestMemoryMmap, InterruptKind, InterruptTrigger};

/// Size of the test guest's memory.
pub const MEM_SIZE: usize = 0x40_0000;
/// Where test buffers may go (the mock queue's rings sit below).
pub const DATA_START: u64 = 0x10_0000;

/// An interrupt that counts queue and config interrupts.
#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU32,
    pub config: AtomicU32,
}

impl InterruptTrigger for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// Device-readable buffer.
pub fn r(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

/// Device-writable buffer.
pub fn w(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// The driver's side of one queue.
pub struct Driver<'a> {
    pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
    next_desc: u16,
    chains: u16,
}

impl<'a> Driver<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self {
            vq: MockSplitQueue::new(mem, size),
            next_desc: 0,
            chains: 0,
        }
    }

    /// The device's view of the queue (ready, rings set).
    pub fn queue(&self) -> Queue {
        let q: Queue = self.vq.create_queue().unwrap();
        assert_eq!(q.size(), self.vq.desc_table().total_size() as u16 / 16);
        q
    }

    /// Makes `bufs` available as one chain; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let mut flags = if b.writable {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
                let last = i == bufs.len() - 1;
                if !last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                let next = if last { 0 } else { head + i as u16 + 1 };
                RawDescriptor::from(Descriptor::new(b.addr, b.len, flags, next))
            })
            .collect();
        self.vq.add_desc_chains(&descs, head).unwrap();
        self.next_desc += bufs.len() as u16;
        self.chains += 1;
        head
    }

    /// How many chains the device has returned.
    pub fn used_count(&self) -> u16 {
        self.vq.used().idx().load()
    }

    /// The `n`th used element as (head index, length).
    pub fn used(&self, n: u16) -> (u32, u32) {
        let elem = self.vq.used().ring().ref_at(n as usize).unwrap().load();
        (elem.id(), elem.len())
    }

    /// The interrupt to give the device.
    pub fn interrupt() -> Arc<CountingInterrupt> {
        Arc::new(CountingInterrupt::default())
    }
}
