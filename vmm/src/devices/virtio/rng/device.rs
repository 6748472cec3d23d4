//! The virtio-rng device: one request queue of device-writable buffers.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use vm_memory::{Address, Bytes};

use crate::devices::virtio::{GuestMemoryMmap, QueueMetrics, VirtioCommon, VirtioDevice};
use crate::devices::DeviceMetrics;

/// Size of the device's request queue.
pub const RNG_QUEUE_SIZE: u16 = 64;
/// Most bytes given per request: the guest asks again if it wants more, and a guest
/// cannot make the VMM generate unbounded amounts of randomness in one go.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;
const CHUNK: usize = 4096;

/// Counters of the entropy device.
#[derive(Debug, Default, Serialize)]
pub struct RngMetrics {
    /// Requests served.
    pub requests: AtomicU64,
    /// Random bytes given to the guest.
    pub bytes: AtomicU64,
    /// Requests that could not be filled (bad buffers or getrandom failure).
    pub failures: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    #[serde(skip)]
    pub queues: Arc<QueueMetrics>,
}

impl DeviceMetrics for RngMetrics {
    fn snapshot(&self) -> serde_json::Value {
        self.queues.snapshot_with(self)
    }
}

/// The entropy device.
pub struct Rng {
    common: VirtioCommon,
    metrics: Arc<RngMetrics>,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> io::Result<Self> {
        let common = VirtioCommon::new(
            "virtio-rng",
            VIRTIO_ID_RNG,
            1 << VIRTIO_F_VERSION_1,
            &[RNG_QUEUE_SIZE],
        )?;
        let metrics = Arc::new(RngMetrics {
            queues: common.metrics(),
            ..RngMetrics::default()
        });
        Ok(Self { common, metrics })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<RngMetrics> {
        self.metrics.clone()
    }

    /// Fills every available buffer and interrupts the guest if it asked for it.
    pub fn process_queue(&mut self) {
        let metrics = &self.metrics;
        self.common.serve_queue(0, |queue, mem| {
            queue.drain(mem, |chain| fill(metrics, mem, chain))
        });
    }
}

/// Fills the chain's device-writable buffers; returns the bytes written. Readable
/// descriptors (which a driver should not send) are skipped.
fn fill<M>(
    metrics: &RngMetrics,
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<M>,
) -> u32
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    let mut buf = [0u8; CHUNK];
    let mut written = 0usize;
    for desc in chain.filter(|d| d.is_write_only()) {
        let mut offset = 0usize;
        while offset < desc.len() as usize && written < MAX_BYTES_PER_REQUEST {
            let n = (desc.len() as usize - offset)
                .min(CHUNK)
                .min(MAX_BYTES_PER_REQUEST - written);
            let result = getrandom(&mut buf[..n])
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    let addr = desc
                        .addr()
                        .checked_add(offset as u64)
                        .ok_or_else(|| "buffer address overflows".to_string())?;
                    mem.write_slice(&buf[..n], addr).map_err(|e| e.to_string())
                });
            if let Err(e) = result {
                metrics.failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("virtio-rng: request not filled: {e}");
                return count(metrics, written);
            }
            offset += n;
            written += n;
        }
    }
    count(metrics, written)
}

fn count(metrics: &RngMetrics, written: usize) -> u32 {
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    metrics.bytes.fetch_add(written as u64, Ordering::Relaxed);
    // At most MAX_BYTES_PER_REQUEST.
    written as u32
}

/// Fills `buf` from the kernel's CSPRNG (getrandom(2): no file descriptor needed, works
/// inside a jail without /dev).
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes for the
        // duration of the call; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

/// virtio-rng has no configuration space and nothing to add to activation or reset.
impl VirtioDevice for Rng {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::test_utils::{
        check_broken_queue_needs_reset, guest_memory, r, w, Driver, DATA_START,
    };

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    #[test]
    fn fills_writable_buffers_with_random_bytes() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        let irq = Driver::interrupt();
        rng.activate(mem.clone(), irq.clone(), vec![driver.queue()])
            .unwrap();
        let head = driver.add_chain(&[w(DATA_START, 256), w(DATA_START + 0x1000, 5000)]);

        rng.process_queue();

        assert_eq!(driver.used_count(), 1);
        assert_eq!(driver.used(0), (u32::from(head), 5256));
        assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
        // 256 zero bytes from a CSPRNG: probability 2^-2048.
        assert_ne!(read(&mem, DATA_START, 256), vec![0u8; 256]);
        assert_ne!(read(&mem, DATA_START + 0x1000 + 4744, 256), vec![0u8; 256]);
        assert_ne!(
            read(&mem, DATA_START, 256),
            read(&mem, DATA_START + 0x1000, 256)
        );
        assert_eq!(rng.metrics().snapshot()["bytes"], 5256);
    }

    #[test]
    fn readable_buffers_are_left_alone() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), Driver::interrupt(), vec![driver.queue()])
            .unwrap();
        driver.add_chain(&[r(DATA_START, 64), w(DATA_START + 0x100, 16)]);

        rng.process_queue();

        assert_eq!(driver.used(0).1, 16);
        assert_eq!(read(&mem, DATA_START, 64), vec![0u8; 64]);
    }

    #[test]
    fn huge_requests_are_capped() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), Driver::interrupt(), vec![driver.queue()])
            .unwrap();
        driver.add_chain(&[w(DATA_START, 0x20_0000)]);

        rng.process_queue();

        assert_eq!(driver.used(0).1 as usize, MAX_BYTES_PER_REQUEST);
    }

    #[test]
    fn buffers_outside_guest_memory_fill_only_what_is_inside() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), Driver::interrupt(), vec![driver.queue()])
            .unwrap();
        let end = crate::devices::virtio::test_utils::MEM_SIZE as u64;
        driver.add_chain(&[w(DATA_START, 32), w(end - 8, 64)]);

        rng.process_queue();

        assert_eq!(driver.used_count(), 1);
        assert_eq!(driver.used(0).1, 32);
        assert_eq!(rng.metrics().snapshot()["failures"], 1);
    }

    #[test]
    fn notification_through_the_event_loop_serves_requests() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let mut rng = Rng::new().unwrap();
        rng.activate(mem.clone(), Driver::interrupt(), vec![driver.queue()])
            .unwrap();
        driver.add_chain(&[w(DATA_START, 16)]);
        let notify = rng.queue_events()[0].try_clone().unwrap();
        let metrics = rng.metrics();
        let rng = Arc::new(Mutex::new(rng));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(rng);

        notify.write(1).unwrap();
        em.run_with_timeout(1000).unwrap();

        assert_eq!(driver.used_count(), 1);
        assert_eq!(em.run_with_timeout(0).unwrap(), 0);
        assert_eq!(metrics.snapshot()["queue_events"], 1);
    }

    #[test]
    fn broken_avail_index_puts_the_device_in_needs_reset_until_the_driver_resets_it() {
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        driver.add_chain(&[w(DATA_START, 16)]);

        let t = check_broken_queue_needs_reset(
            Rng::new().unwrap(),
            &mem,
            &[&driver.vq],
            0,
            Rng::process_queue,
        );

        driver.add_chain(&[w(DATA_START, 16)]);
        t.returns(Rng::process_queue);
        assert_eq!(driver.used_count(), 1, "served again after the reset");
        assert_eq!(
            t.device.lock().unwrap().metrics().snapshot()["queue_errors"],
            1
        );
    }

    #[test]
    fn a_restored_rng_goes_on_at_the_saved_ring_positions() {
        use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport, TransportState};
        use crate::devices::virtio::test_utils::Transported;
        let mem = guest_memory();
        let mut driver = Driver::new(&mem, 16);
        let t = Transported::bring_up(Rng::new().unwrap(), &mem, &[&driver.vq]);
        driver.add_chain(&[w(DATA_START, 16)]);
        driver.add_chain(&[w(DATA_START + 0x100, 32)]);
        t.returns(Rng::process_queue);
        let json = serde_json::to_vec(&t.transport.save()).unwrap();

        let state: TransportState = serde_json::from_slice(&json).unwrap();
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
        let mut restored = MmioTransport::new(rng.clone(), mem.clone(), interrupt).unwrap();
        restored.restore(&state).unwrap();
        let head = driver.add_chain(&[w(DATA_START + 0x200, 8)]);
        rng.lock().unwrap().process_queue();

        assert_eq!(
            state.common.active_queues.as_ref().unwrap()[0].next_avail,
            2
        );
        assert_eq!(restored.status(), t.transport.status());
        assert_eq!(driver.used_count(), 3, "the restored device used one more");
        assert_eq!(driver.used(2), (u32::from(head), 8));
        assert_eq!(irq.read().unwrap(), 1, "and interrupted the guest");
        assert_eq!(restored.save().common, rng.lock().unwrap().common().save());
    }

    #[test]
    fn a_transport_state_of_another_device_is_refused() {
        use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
        use crate::devices::virtio::test_utils::Transported;
        let mem = guest_memory();
        let driver = Driver::new(&mem, 16);
        let t = Transported::bring_up(Rng::new().unwrap(), &mem, &[&driver.vq]);
        let mut state = t.transport.save();
        state.device_type = 2;
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let interrupt = Arc::new(MmioInterrupt::new(EventFd::new(0).unwrap()));
        let mut restored = MmioTransport::new(rng.clone(), mem.clone(), interrupt).unwrap();

        let err = restored.restore(&state).unwrap_err();

        assert!(
            err.to_string()
                .contains("snapshot has device type 2, this is 4"),
            "{err}"
        );
        assert!(!rng.lock().unwrap().is_activated(), "nothing restored");
    }

    #[test]
    fn identifies_as_an_entropy_device_with_one_queue() {
        let rng = Rng::new().unwrap();
        assert_eq!(rng.device_type(), 4);
        assert_eq!(rng.queue_max_sizes(), &[RNG_QUEUE_SIZE]);
        assert_ne!(rng.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
