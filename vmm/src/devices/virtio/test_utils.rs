//! Test harness for virtio device models: guest memory, a driver-side mock split queue
//! (virtio-queue's `MockSplitQueue`), an interrupt that counts, and a device behind a real
//! virtio-mmio transport ([`Transported`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{reg, MmioInterrupt, MmioTransport};
use super::{GuestMemoryMmap, InterruptKind, InterruptTrigger, VirtioDevice};
use crate::devices::bus::BusDevice;

/// Size of the test guest's memory.
pub const MEM_SIZE: usize = 0x40_0000;
/// Where test buffers may go (the mock queue's rings sit below).
pub const DATA_START: u64 = 0x10_0000;

/// An interrupt that counts queue and config interrupts and needs-reset marks.
#[derive(Default)]
pub struct CountingInterrupt {
    pub queue: AtomicU32,
    pub config: AtomicU32,
    pub needs_reset: AtomicU32,
}

impl InterruptTrigger for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        match kind {
            InterruptKind::Queue => self.queue.fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }

    fn set_needs_reset(&self) -> std::io::Result<()> {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
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
}

impl<'a> Driver<'a> {
    /// A queue of `size` entries with its rings at the start of guest memory.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, 0, size)
    }

    /// A queue of `size` entries with its rings from `base`.
    pub fn at(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        Self {
            vq: MockSplitQueue::create(mem, GuestAddress(base), size),
            next_desc: 0,
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

/// A device behind a real virtio-mmio transport, driven through the transport's registers
/// the way a guest driver drives it; the queues' rings are laid out by mock queues.
pub struct Transported<D: VirtioDevice + 'static> {
    pub transport: MmioTransport,
    pub device: Arc<Mutex<D>>,
    pub irq: EventFd,
}

impl<D: VirtioDevice + 'static> Transported<D> {
    /// Puts `device` behind a transport and brings it up: VERSION_1 negotiated, queue `i`
    /// on the rings of `rings[i]`, DRIVER_OK.
    pub fn bring_up(
        device: D,
        mem: &GuestMemoryMmap,
        rings: &[&MockSplitQueue<'_, GuestMemoryMmap>],
    ) -> Self {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let device = Arc::new(Mutex::new(device));
        let transport = MmioTransport::new(device.clone(), mem.clone(), interrupt).unwrap();
        let mut t = Self {
            transport,
            device,
            irq,
        };
        t.driver_ok(rings);
        t
    }

    fn driver_ok(&mut self, rings: &[&MockSplitQueue<'_, GuestMemoryMmap>]) {
        use virtio_bindings::virtio_config::{
            VIRTIO_CONFIG_S_ACKNOWLEDGE as ACK, VIRTIO_CONFIG_S_DRIVER as DRIVER,
            VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
        };
        self.write(reg::STATUS, ACK);
        self.write(reg::STATUS, ACK | DRIVER);
        self.write(reg::DRIVER_FEATURES_SEL, 1);
        self.write(reg::DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
        self.write(reg::STATUS, ACK | DRIVER | FEATURES_OK);
        for (i, vq) in rings.iter().enumerate() {
            let size = vq.desc_table().total_size() as u32 / 16;
            self.write(reg::QUEUE_SEL, i as u32);
            self.write(reg::QUEUE_NUM, size);
            for (low, addr) in [
                (reg::QUEUE_DESC_LOW, vq.desc_table_addr()),
                (reg::QUEUE_DRIVER_LOW, vq.avail_addr()),
                (reg::QUEUE_DEVICE_LOW, vq.used_addr()),
            ] {
                self.write(low, addr.0 as u32);
                self.write(low + 4, (addr.0 >> 32) as u32);
            }
            self.write(reg::QUEUE_READY, 1);
        }
        self.write(reg::STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_eq!(self.status(), ACK | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    pub fn read(&mut self, offset: u64) -> u32 {
        let mut word = [0u8; 4];
        self.transport.read(0, offset, &mut word);
        u32::from_le_bytes(word)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(0, offset, &value.to_le_bytes());
    }

    /// The device status register.
    pub fn status(&mut self) -> u32 {
        self.read(reg::STATUS)
    }

    /// Whether the device tells the driver it needs a reset, with a configuration
    /// interrupt pending.
    pub fn needs_reset(&mut self) -> bool {
        let status = self.status() & VIRTIO_CONFIG_S_NEEDS_RESET != 0;
        let config_irq = self.read(reg::INTERRUPT_STATUS) & VIRTIO_MMIO_INT_CONFIG != 0;
        assert_eq!(
            status, config_irq,
            "status and configuration interrupt disagree"
        );
        status
    }

    /// Resets the device (status 0), then brings it up again on `rings`.
    pub fn reset_and_bring_up(&mut self, rings: &[&MockSplitQueue<'_, GuestMemoryMmap>]) {
        self.write(reg::STATUS, 0);
        assert_eq!(self.status(), 0);
        self.driver_ok(rings);
    }

    /// Runs `f` on the device on another thread and panics if it does not return within
    /// 10 s: a device spinning on a broken ring never does (the thread is left behind).
    pub fn returns(&self, f: impl FnOnce(&mut D) + Send + 'static) {
        let device = self.device.clone();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            f(&mut device.lock().unwrap());
            let _ = done.send(());
        });
        finished
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the device did not return from a broken queue");
    }
}

/// Makes the driver's available index claim more new chains than the queue has entries
/// (an index `size + 1` ahead of what the device has seen).
pub fn corrupt_avail_idx(vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    let size = vq.desc_table().total_size() as u16 / 16;
    let idx = vq.avail().idx().load();
    vq.avail().idx().store(idx.wrapping_add(size + 1));
}

/// What the driver does to its rings when it sets a queue up again after a reset.
pub fn restart_rings(vq: &MockSplitQueue<'_, GuestMemoryMmap>) {
    vq.avail().idx().store(0);
    vq.used().idx().store(0);
}

/// The contract every device keeps for a queue the guest broke: `serve` (the device's
/// handler for queue `broken`, as a notification runs it) returns, the device reports
/// DEVICE_NEEDS_RESET with a configuration interrupt, consumes nothing more from that
/// queue when notified again, and works after the driver resets it.
pub fn check_broken_queue_needs_reset<D: VirtioDevice + 'static>(
    device: D,
    mem: &GuestMemoryMmap,
    rings: &[&MockSplitQueue<'_, GuestMemoryMmap>],
    broken: usize,
    serve: impl Fn(&mut D) + Clone + Send + 'static,
) -> Transported<D> {
    let mut t = Transported::bring_up(device, mem, rings);
    corrupt_avail_idx(rings[broken]);

    t.returns(serve.clone());

    assert!(t.needs_reset(), "status {:#x}", t.status());
    assert_eq!(t.irq.read().unwrap(), 1, "one configuration interrupt");
    t.returns(serve.clone());
    assert_eq!(rings[broken].used().idx().load(), 0, "nothing used");
    assert!(t.irq.read().is_err(), "no further interrupt");

    for vq in rings {
        restart_rings(vq);
    }
    t.reset_and_bring_up(rings);
    t.returns(serve);
    assert!(!t.needs_reset(), "status {:#x}", t.status());
    t
}
