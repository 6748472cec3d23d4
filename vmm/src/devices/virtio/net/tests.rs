//! virtio-net device tests through mock driver queues and an in-memory frame backend,
//! plus one test over a real TAP device in a private network namespace.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::chain::MAX_FRAME_LEN;
use super::{
    FrameBackend, MacAddr, Net, NetError, TapError, NET_QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
    VNET_HDR_LEN,
};
use crate::devices::virtio::test_utils::{
    check_broken_queue_needs_reset, guest_memory, r, w, CountingInterrupt, Driver, DATA_START,
    MEM_SIZE,
};
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::devices::DeviceMetrics;

const MAC: MacAddr = MacAddr([0x06, 0x11, 0x22, 0x33, 0x44, 0x55]);
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const RING_SIZE: u16 = 64;
/// Guest buffers of TX chains.
const TX_DATA: u64 = DATA_START;
/// Guest buffers of RX chains.
const RX_DATA: u64 = DATA_START + 0x10_0000;
/// An RX buffer as Linux posts them without mergeable buffers: header + 1514-byte frame.
const RX_BUF_LEN: u32 = VNET_HDR_LEN as u32 + 1514;

/// The host side of the in-memory backend.
#[derive(Clone)]
struct Wire {
    to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
    from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
    refuse_writes: Arc<AtomicBool>,
    /// Signalled whenever a frame is queued for the guest (the backend's readiness fd).
    ready: Arc<EventFd>,
}

impl Wire {
    fn new() -> Self {
        Self {
            to_guest: Default::default(),
            from_guest: Default::default(),
            refuse_writes: Default::default(),
            ready: Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        }
    }

    /// Queues `frame` (virtio-net header included) for the guest.
    fn send_to_guest(&self, frame: Vec<u8>) {
        self.to_guest.lock().unwrap().push_back(frame);
        self.ready.write(1).unwrap();
    }

    fn sent_by_guest(&self) -> Vec<Vec<u8>> {
        self.from_guest.lock().unwrap().clone()
    }

    fn waiting_for_guest(&self) -> usize {
        self.to_guest.lock().unwrap().len()
    }
}

struct MemBackend(Wire);

impl AsRawFd for MemBackend {
    fn as_raw_fd(&self) -> RawFd {
        self.0.ready.as_raw_fd()
    }
}

impl FrameBackend for MemBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = self.0.to_guest.lock().unwrap().pop_front();
        let frame = frame.ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.0.refuse_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from(io::ErrorKind::OutOfMemory));
        }
        self.0.from_guest.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

/// The driver's side of one queue, its rings at `base`.
fn queue_driver(mem: &GuestMemoryMmap, base: u64) -> Driver<'_> {
    Driver::at(mem, base, RING_SIZE)
}

struct Fixture {
    net: Net<MemBackend>,
    wire: Wire,
    mem: GuestMemoryMmap,
}

fn fixture() -> Fixture {
    let wire = Wire::new();
    Fixture {
        net: Net::with_backend(MemBackend(wire.clone()), MAC).unwrap(),
        wire,
        mem: guest_memory(),
    }
}

impl Fixture {
    fn activate(&mut self, rx: &Driver, tx: &Driver) -> Arc<CountingInterrupt> {
        let irq = Arc::new(CountingInterrupt::default());
        self.net
            .activate(self.mem.clone(), irq.clone(), vec![rx.queue(), tx.queue()])
            .unwrap();
        irq
    }

    fn metric(&self, name: &str) -> u64 {
        self.net.metrics().snapshot()[name].as_u64().unwrap()
    }
}

/// An Ethernet frame of `len` bytes with a recognisable pattern.
fn ethernet_frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect()
}

/// `frame` behind a virtio-net header whose bytes are all `hdr_byte`.
fn with_header(frame: &[u8], hdr_byte: u8) -> Vec<u8> {
    let mut out = vec![hdr_byte; VNET_HDR_LEN];
    out.extend_from_slice(frame);
    out
}

fn clean_header() -> [u8; VNET_HDR_LEN] {
    let mut hdr = [0u8; VNET_HDR_LEN];
    hdr[10] = 1; // num_buffers
    hdr
}

fn read_guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
    out
}

#[test]
fn tx_sends_one_frame_with_a_clean_header() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    let irq = f.activate(&rx, &tx);
    let frame = ethernet_frame(60, 1);
    // A header asking for checksum and GSO work that was never negotiated.
    let chain = with_header(&frame, 0xff);
    mem.write_slice(&chain, GuestAddress(TX_DATA)).unwrap();
    let head = tx.add_chain(&[r(TX_DATA, chain.len() as u32)]);

    f.net.process_tx();

    assert_eq!(f.wire.sent_by_guest(), vec![with_header(&frame, 0)]);
    assert_eq!(tx.used_count(), 1);
    assert_eq!(tx.used(0), (u32::from(head), 0));
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    assert_eq!(f.metric("tx_packets"), 1);
    assert_eq!(f.metric("tx_bytes"), 60);
}

#[test]
fn tx_gathers_a_frame_split_over_several_descriptors() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let frame = ethernet_frame(1514, 2);
    let chain = with_header(&frame, 0);
    // Header split 5 + 7, frame split 100 + 1000 + rest, scattered around memory.
    let pieces = [
        (0x0, 5),
        (0x100, 7),
        (0x1000, 100),
        (0x3000, 1000),
        (0x8000, 414),
    ];
    let mut bufs = Vec::new();
    let mut at = 0;
    for (offset, len) in pieces {
        mem.write_slice(&chain[at..at + len], GuestAddress(TX_DATA + offset))
            .unwrap();
        bufs.push(r(TX_DATA + offset, len as u32));
        at += len;
    }
    assert_eq!(at, chain.len());

    f.net.process_tx();
    assert!(f.wire.sent_by_guest().is_empty(), "nothing queued yet");
    tx.add_chain(&bufs);
    f.net.process_tx();

    assert_eq!(f.wire.sent_by_guest(), vec![chain]);
    assert_eq!(f.metric("tx_bytes"), 1514);
}

#[test]
fn tx_chain_too_short_for_the_headers_is_dropped_and_later_frames_still_go() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let frame = ethernet_frame(60, 3);
    mem.write_slice(&with_header(&frame, 0), GuestAddress(TX_DATA))
        .unwrap();
    tx.add_chain(&[r(TX_DATA, 10)]); // not even the virtio-net header
    tx.add_chain(&[r(TX_DATA, VNET_HDR_LEN as u32 + 13)]); // no full Ethernet header
    tx.add_chain(&[r(TX_DATA, VNET_HDR_LEN as u32 + 60)]);

    f.net.process_tx();

    assert_eq!(tx.used_count(), 3, "every chain is returned");
    assert_eq!(f.wire.sent_by_guest(), vec![with_header(&frame, 0)]);
    assert_eq!(f.metric("tx_malformed_chains"), 2);
    assert_eq!(f.metric("tx_packets"), 1);
}

#[test]
fn tx_chain_with_a_device_writable_descriptor_is_dropped() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    mem.write_slice(
        &with_header(&ethernet_frame(60, 4), 0),
        GuestAddress(TX_DATA),
    )
    .unwrap();
    mem.write_slice(&[0x5a; 64], GuestAddress(TX_DATA + 0x1000))
        .unwrap();

    tx.add_chain(&[r(TX_DATA, 72), w(TX_DATA + 0x1000, 64)]);
    f.net.process_tx();

    assert_eq!(tx.used(0).1, 0);
    assert!(f.wire.sent_by_guest().is_empty());
    assert_eq!(f.metric("tx_malformed_chains"), 1);
    assert_eq!(read_guest(&mem, TX_DATA + 0x1000, 64), vec![0x5a; 64]);
}

#[test]
fn tx_frames_over_the_size_limit_are_dropped_and_the_limit_itself_is_sent() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let largest = MAX_FRAME_LEN as u32;
    tx.add_chain(&[
        r(TX_DATA, 40_000),
        r(TX_DATA + 40_000, largest - 40_000 + 1),
    ]);
    tx.add_chain(&[r(TX_DATA, 40_000), r(TX_DATA + 40_000, largest - 40_000)]);
    // A chain whose lengths would overflow a u32 sum.
    tx.add_chain(&[r(TX_DATA, u32::MAX), r(TX_DATA, u32::MAX)]);

    f.net.process_tx();

    assert_eq!(tx.used_count(), 3);
    let sent = f.wire.sent_by_guest();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), largest as usize);
    assert_eq!(f.metric("tx_oversized_frames"), 1);
    assert_eq!(f.metric("tx_malformed_chains"), 1, "outside guest memory");
}

#[test]
fn tx_buffers_outside_guest_memory_are_dropped() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);

    tx.add_chain(&[r(MEM_SIZE as u64 - 32, 100)]);
    tx.add_chain(&[r(u64::MAX - 10, 100)]);
    f.net.process_tx();

    assert_eq!(tx.used_count(), 2);
    assert!(f.wire.sent_by_guest().is_empty());
    assert_eq!(f.metric("tx_malformed_chains"), 2);
}

#[test]
fn tx_frames_the_backend_refuses_are_counted_as_dropped() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    f.wire.refuse_writes.store(true, Ordering::SeqCst);

    tx.add_chain(&[r(TX_DATA, 72)]);
    f.net.process_tx();

    assert_eq!(tx.used_count(), 1);
    assert_eq!(f.metric("tx_dropped"), 1);
    assert_eq!(f.metric("tx_packets"), 0);
}

#[test]
fn rx_copies_frames_into_guest_buffers_with_a_clean_header() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    let irq = f.activate(&rx, &tx);
    let first = ethernet_frame(1514, 5);
    let second = ethernet_frame(60, 6);
    // A header claiming offloads the guest never negotiated.
    f.wire.send_to_guest(with_header(&first, 0xee));
    f.wire.send_to_guest(with_header(&second, 0xee));
    // The first buffer is split: header alone, then the frame.
    let a = rx.add_chain(&[w(RX_DATA, 12), w(RX_DATA + 0x1000, 1514)]);
    let b = rx.add_chain(&[w(RX_DATA + 0x2000, RX_BUF_LEN)]);

    f.net.process_rx();

    assert_eq!(rx.used_count(), 2);
    assert_eq!(rx.used(0), (u32::from(a), 12 + 1514));
    assert_eq!(rx.used(1), (u32::from(b), 12 + 60));
    assert_eq!(read_guest(&mem, RX_DATA, 12), clean_header());
    assert_eq!(read_guest(&mem, RX_DATA + 0x1000, 1514), first);
    assert_eq!(
        read_guest(&mem, RX_DATA + 0x2000, 72),
        with_header(&second, 0)
            .iter()
            .enumerate()
            .map(|(i, &b)| if i == 10 { 1 } else { b })
            .collect::<Vec<_>>()
    );
    assert_eq!(
        irq.queue.load(Ordering::SeqCst),
        1,
        "one interrupt for both"
    );
    assert_eq!(f.metric("rx_packets"), 2);
    assert_eq!(f.metric("rx_bytes"), 1514 + 60);
}

#[test]
fn rx_frame_waits_for_guest_buffers_and_is_delivered_when_they_arrive() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    let irq = f.activate(&rx, &tx);
    let rx_notify = f.net.queue_events()[RX_QUEUE].try_clone().unwrap();
    let backend_ready = f.wire.ready.clone();
    let frames = [ethernet_frame(100, 7), ethernet_frame(200, 8)];
    let wire = f.wire.clone();
    let net = Arc::new(Mutex::new(f.net));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    em.add_subscriber(net.clone());

    // Frames arrive while the guest has posted no buffers.
    for frame in &frames {
        wire.send_to_guest(with_header(frame, 0));
    }
    assert!(em.run_with_timeout(1000).unwrap() >= 1);
    assert_eq!(rx.used_count(), 0);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 0);
    // One frame is in the device, one still in the backend; nothing was dropped.
    assert_eq!(wire.waiting_for_guest(), 1);
    let metric = |name: &str| {
        net.lock().unwrap().metrics().snapshot()[name]
            .as_u64()
            .unwrap()
    };
    assert_eq!(metric("rx_deferred"), 1);
    assert_eq!(metric("rx_dropped"), 0);
    // Edge-triggered: with the frames still waiting, the loop stays quiet.
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
    assert_eq!(
        backend_ready.read().unwrap(),
        2,
        "the backend was signalled"
    );

    // The guest posts two buffers and notifies the RX queue.
    rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);
    rx.add_chain(&[w(RX_DATA + 0x1000, RX_BUF_LEN)]);
    rx_notify.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    assert_eq!(rx.used_count(), 2);
    assert_eq!(read_guest(&mem, RX_DATA + 12, 100), frames[0]);
    assert_eq!(read_guest(&mem, RX_DATA + 0x1000 + 12, 200), frames[1]);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
    assert_eq!(metric("rx_packets"), 2);
    assert_eq!(metric("queue_events"), 1);
}

#[test]
fn rx_chain_with_a_device_readable_descriptor_is_returned_unused() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    mem.write_slice(&[0x5a; 64], GuestAddress(RX_DATA)).unwrap();
    let frame = ethernet_frame(60, 9);
    f.wire.send_to_guest(with_header(&frame, 0));
    let bad = rx.add_chain(&[w(RX_DATA + 0x1000, 12), r(RX_DATA, 1514)]);
    let good = rx.add_chain(&[w(RX_DATA + 0x2000, RX_BUF_LEN)]);

    f.net.process_rx();

    assert_eq!(rx.used_count(), 2);
    assert_eq!(rx.used(0), (u32::from(bad), 0));
    assert_eq!(rx.used(1), (u32::from(good), 72));
    assert_eq!(
        read_guest(&mem, RX_DATA, 64),
        vec![0x5a; 64],
        "readable buffer untouched"
    );
    assert_eq!(read_guest(&mem, RX_DATA + 0x2000 + 12, 60), frame);
    assert_eq!(f.metric("rx_malformed_chains"), 1);
}

#[test]
fn rx_chains_too_small_for_the_header_or_outside_memory_are_returned_unused() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    f.wire
        .send_to_guest(with_header(&ethernet_frame(60, 10), 0));
    rx.add_chain(&[w(RX_DATA, 11)]);
    rx.add_chain(&[w(MEM_SIZE as u64 - 100, RX_BUF_LEN)]);

    f.net.process_rx();

    assert_eq!(rx.used_count(), 2);
    assert_eq!(rx.used(0).1, 0);
    assert_eq!(rx.used(1).1, 0);
    assert_eq!(f.metric("rx_malformed_chains"), 2);
    assert_eq!(
        f.metric("rx_deferred"),
        1,
        "the frame waits for a usable buffer"
    );
    assert_eq!(f.metric("rx_dropped"), 0);
}

#[test]
fn rx_frame_larger_than_the_guest_buffer_is_dropped_and_the_buffer_reused() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let small = ethernet_frame(60, 11);
    f.wire
        .send_to_guest(with_header(&ethernet_frame(9000, 12), 0));
    f.wire.send_to_guest(with_header(&small, 0));
    let head = rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);

    f.net.process_rx();

    assert_eq!(rx.used_count(), 1);
    assert_eq!(rx.used(0), (u32::from(head), 72));
    assert_eq!(read_guest(&mem, RX_DATA + 12, 60), small);
    assert_eq!(f.metric("rx_dropped"), 1);
    assert_eq!(f.metric("rx_packets"), 1);
}

#[test]
fn runt_frames_from_the_backend_are_dropped() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    f.wire.send_to_guest(vec![0; 5]);
    rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);

    f.net.process_rx();

    assert_eq!(rx.used_count(), 0);
    assert_eq!(f.metric("rx_dropped"), 1);
}

#[test]
fn backend_readiness_through_the_event_loop_delivers_frames() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);
    let wire = f.wire.clone();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    em.add_subscriber(Arc::new(Mutex::new(f.net)));
    let frame = ethernet_frame(80, 13);

    wire.send_to_guest(with_header(&frame, 0));
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    assert_eq!(rx.used_count(), 1);
    assert_eq!(read_guest(&mem, RX_DATA + 12, 80), frame);
}

#[test]
fn tx_notification_through_the_event_loop_sends_frames() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let frame = ethernet_frame(64, 14);
    mem.write_slice(&with_header(&frame, 0), GuestAddress(TX_DATA))
        .unwrap();
    tx.add_chain(&[r(TX_DATA, 76)]);
    let notify = f.net.queue_events()[TX_QUEUE].try_clone().unwrap();
    let wire = f.wire.clone();
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    em.add_subscriber(Arc::new(Mutex::new(f.net)));

    notify.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    assert_eq!(wire.sent_by_guest(), vec![with_header(&frame, 0)]);
    assert_eq!(
        em.run_with_timeout(0).unwrap(),
        0,
        "the eventfd was drained"
    );
}

#[test]
fn nothing_moves_before_activation() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    f.wire
        .send_to_guest(with_header(&ethernet_frame(60, 15), 0));
    rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);
    tx.add_chain(&[r(TX_DATA, 72)]);

    f.net.process_rx();
    f.net.process_tx();

    assert_eq!((rx.used_count(), tx.used_count()), (0, 0));
    assert_eq!(f.wire.waiting_for_guest(), 1);
    assert!(f.wire.sent_by_guest().is_empty());
}

#[test]
fn work_queued_before_activation_is_served_at_activation() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let mut rx = queue_driver(&mem, RX_RING);
    let mut tx = queue_driver(&mem, TX_RING);
    let frame = ethernet_frame(60, 16);
    f.wire.send_to_guest(with_header(&frame, 0));
    rx.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);
    tx.add_chain(&[r(TX_DATA, 72)]);
    f.net.process_rx();

    let irq = f.activate(&rx, &tx);

    assert_eq!((rx.used_count(), tx.used_count()), (1, 1));
    assert_eq!(read_guest(&mem, RX_DATA + 12, 60), frame);
    assert_eq!(f.wire.sent_by_guest().len(), 1);
    assert_eq!(irq.queue.load(Ordering::SeqCst), 2);
}

#[test]
fn config_space_holds_the_mac_and_link_up() {
    let f = fixture();
    assert_eq!(f.net.device_type(), 1);
    let features = f.net.avail_features();
    for bit in [VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS] {
        assert_ne!(features & (1 << bit), 0, "feature bit {bit}");
    }
    let mut mac = [0u8; 6];
    f.net.read_config(0, &mut mac);
    assert_eq!(mac, MAC.0);
    // Linux reads the MAC a byte at a time.
    let mut byte = [0u8; 1];
    f.net.read_config(5, &mut byte);
    assert_eq!(byte[0], 0x55);
    let mut status = [0u8; 2];
    f.net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16);
    let mut past = [0x77u8; 4];
    f.net.read_config(6, &mut past);
    assert_eq!(past, [0x77; 4], "out-of-range reads leave data untouched");
    f.net.read_config(u64::MAX, &mut byte);
    assert_eq!(byte[0], 0x55);
}

#[test]
fn config_writes_do_not_change_the_mac() {
    let mut f = fixture();
    f.net.write_config(0, &[0; 6]);
    let mut mac = [0u8; 6];
    f.net.read_config(0, &mut mac);
    assert_eq!(mac, MAC.0);
}

#[test]
fn mac_addresses_parse_and_print() {
    let mac: MacAddr = "06:11:22:33:44:5f".parse().unwrap();
    assert_eq!(mac, MacAddr([0x06, 0x11, 0x22, 0x33, 0x44, 0x5f]));
    assert_eq!(mac.to_string(), "06:11:22:33:44:5f");
    assert_eq!("06:11:22:33:44:5F".parse::<MacAddr>().unwrap(), mac);
    for bad in [
        "",
        "06:11:22:33:44",
        "06:11:22:33:44:55:66",
        "06:11:22:33:44:5",
        "06:11:22:33:44:zz",
        "06-11-22-33-44-55",
        "01:00:5e:00:00:01",
        "+6:11:22:33:44:55",
    ] {
        let err = bad.parse::<MacAddr>().unwrap_err();
        assert!(
            err.to_string().contains("not a MAC address"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn mac_addresses_round_trip_through_json_as_strings() {
    let json = serde_json::to_string(&MAC).unwrap();
    assert_eq!(json, "\"06:11:22:33:44:55\"");
    assert_eq!(serde_json::from_str::<MacAddr>(&json).unwrap(), MAC);
    let err = serde_json::from_str::<MacAddr>("\"01:02:03\"").unwrap_err();
    assert!(err.to_string().contains("not a MAC address"), "{err}");
}

#[test]
fn the_tap_backed_device_fits_the_device_manager() {
    fn attachable<D: VirtioDevice + MutEventSubscriber + 'static>() {}
    attachable::<Net>();
    let metrics: Arc<dyn DeviceMetrics> = fixture().net.metrics();
    let snapshot = metrics.snapshot();
    for key in [
        "rx_packets",
        "tx_packets",
        "rx_dropped",
        "tx_dropped",
        "rx_bytes",
        "tx_bytes",
    ] {
        assert_eq!(snapshot[key], 0, "{key}");
    }
}

#[test]
fn activation_needs_two_valid_queues_and_reset_allows_another() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    let irq = Arc::new(CountingInterrupt::default());
    assert_eq!(f.net.queue_max_sizes(), &[NET_QUEUE_SIZE, NET_QUEUE_SIZE]);
    assert!(f
        .net
        .activate(mem.clone(), irq.clone(), vec![rx.queue()])
        .is_err());
    let mut broken = tx.queue();
    virtio_queue::QueueT::set_desc_table_address(&mut broken, Some(0xffff_0000), Some(0xff));
    assert!(f
        .net
        .activate(mem.clone(), irq.clone(), vec![rx.queue(), broken])
        .is_err());
    assert!(!f.net.is_activated());

    f.activate(&rx, &tx);
    assert!(f.net.is_activated());
    assert!(f.net.reset());
    assert!(!f.net.is_activated());
    f.activate(&rx, &tx);
    assert!(f.net.is_activated());
}

#[test]
fn a_missing_tap_is_an_error_naming_it_and_is_not_created() {
    let err = Net::new("genos-none0", MAC).err().unwrap();
    assert!(matches!(err, NetError::Tap(TapError::Missing(_))), "{err}");
    assert!(err.to_string().contains("genos-none0"), "{err}");
    assert!(!std::path::Path::new("/sys/class/net/genos-none0").exists());
}

#[test]
fn tap_names_that_cannot_name_an_interface_are_refused() {
    for bad in ["", "a-name-far-too-long", "nul\0inside"] {
        let err = Net::new(bad, MAC).err().unwrap();
        assert!(
            err.to_string().contains("not a valid interface name"),
            "{err}"
        );
    }
}

#[test]
fn an_interface_that_is_not_a_tap_is_refused() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        testkit::skip(testkit::Need::Tun, "/dev/net/tun is missing");
        return;
    }
    let err = Net::new("lo", MAC).err().unwrap();
    assert!(
        matches!(err, NetError::Tap(TapError::Attach { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("lo"), "{err}");
}

mod chains {
    //! The pure chain checks, on descriptor lists no queue would produce.

    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor;

    use super::super::chain::{rx_segments, scatter, tx_segments, ChainError, Segment};
    use super::*;

    fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
        let flags = if writable {
            VRING_DESC_F_WRITE as u16
        } else {
            0
        };
        Descriptor::new(addr, len, flags, 0)
    }

    #[test]
    fn empty_chains_are_refused() {
        let mem = guest_memory();
        assert_eq!(tx_segments(&mem, []), Err(ChainError::Empty));
        assert_eq!(rx_segments(&mem, []), Err(ChainError::Empty));
    }

    #[test]
    fn zero_length_descriptors_are_skipped() {
        let mem = guest_memory();
        let (segments, len) = tx_segments(
            &mem,
            [
                desc(0x1000, 0, false),
                desc(0x2000, 60, false),
                desc(0x3000, 0, false),
            ],
        )
        .unwrap();
        assert_eq!(len, 60);
        assert_eq!(
            segments,
            vec![Segment {
                addr: GuestAddress(0x2000),
                len: 60
            }]
        );
    }

    #[test]
    fn a_descriptor_ending_exactly_at_the_end_of_memory_is_accepted() {
        let mem = guest_memory();
        let end = MEM_SIZE as u64;
        assert!(rx_segments(&mem, [desc(end - 1526, 1526, true)]).is_ok());
        assert_eq!(
            rx_segments(&mem, [desc(end - 1525, 1526, true)]),
            Err(ChainError::OutsideMemory {
                addr: end - 1525,
                len: 1526
            })
        );
    }

    #[test]
    fn scatter_stops_when_the_data_ends() {
        let mem = guest_memory();
        mem.write_slice(&[0xaa; 16], GuestAddress(0x2000)).unwrap();
        let segments = [
            Segment {
                addr: GuestAddress(0x1000),
                len: 4,
            },
            Segment {
                addr: GuestAddress(0x2000),
                len: 16,
            },
        ];

        assert_eq!(scatter(&mem, &segments, &[1, 2, 3, 4, 5, 6]).unwrap(), 6);

        assert_eq!(read_guest(&mem, 0x1000, 4), [1, 2, 3, 4]);
        let mut expected = vec![0xaa; 16];
        expected[..2].copy_from_slice(&[5, 6]);
        assert_eq!(read_guest(&mem, 0x2000, 16), expected);
    }
}

mod real_tap {
    //! Real TAP devices in a network namespace that a test thread creates for itself
    //! (unshare), so nothing is left behind and nothing reaches any other namespace: the
    //! "guest" ARPs for the namespace's own address.

    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use vmm_sys_util::tempdir::TempDir;

    use super::super::Tap;
    use super::*;

    const GUEST_IP: [u8; 4] = [10, 250, 0, 2];
    const HOST_IP: [u8; 4] = [10, 250, 0, 1];

    /// Why the real-TAP tests cannot run here, if they cannot.
    fn unsupported() -> Option<(testkit::Need, &'static str)> {
        use testkit::Need;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Some((
                Need::Root,
                "needs root to create a network namespace and TAP devices",
            ));
        }
        if !Path::new("/dev/net/tun").exists() {
            return Some((Need::Tun, "/dev/net/tun is missing"));
        }
        if Command::new("ip").arg("-V").output().is_err() {
            return Some((Need::Tools, "the ip tool (iproute2) is missing"));
        }
        None
    }

    /// Moves the calling thread (only) into a new, empty network namespace; it lives as
    /// long as the thread or a descriptor inside it.
    fn enter_new_netns() {
        // SAFETY: unshare takes flags only; CLONE_NEWNET affects the calling thread alone.
        let ret = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        assert_eq!(ret, 0, "unshare: {}", io::Error::last_os_error());
    }

    /// Runs `ip` in the calling thread's network namespace (children inherit it).
    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn arp_request() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&MAC.0);
        f.extend_from_slice(&[0x08, 0x06]); // ARP
        f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
        f.extend_from_slice(&MAC.0);
        f.extend_from_slice(&GUEST_IP);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&HOST_IP);
        f
    }

    fn is_arp_reply_for_guest(frame: &[u8]) -> bool {
        frame.len() >= 42
            && frame[0..6] == MAC.0
            && frame[12..14] == [0x08, 0x06]
            && frame[20..22] == [0, 2]
            && frame[28..32] == HOST_IP
            && frame[38..42] == GUEST_IP
    }

    #[test]
    fn guest_frames_cross_a_real_tap_and_replies_come_back() {
        if let Some((need, why)) = unsupported() {
            testkit::skip(need, why);
            return;
        }
        std::thread::spawn(|| {
            enter_new_netns();
            // No IPv6 chatter (router solicitations, DAD) to fill the RX buffers. /proc/sys/net
            // shows the opening thread's namespace. Absent IPv6 is fine too.
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            ip(&["tuntap", "add", "dev", "tap0", "mode", "tap"]);
            ip(&["addr", "add", "10.250.0.1/24", "dev", "tap0"]);
            ip(&["link", "set", "tap0", "up"]);
            exchange_arp();
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_unprivileged_vmm_opens_its_own_tap_but_not_another_users() {
        if let Some((need, why)) = unsupported() {
            testkit::skip(need, why);
            return;
        }
        const VMM_UID: u32 = 64_999;
        // The jail's /dev/net/tun: a node owned by the VMM's uid, mode 0660.
        let jail = TempDir::new().unwrap();
        std::fs::set_permissions(jail.as_path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let tun = jail.as_path().join("tun");
        let tun_c = std::ffi::CString::new(tun.to_str().unwrap()).unwrap();
        // SAFETY: the path is NUL-terminated and outlives both calls; the device number
        // is that of the TUN/TAP control device (10, 200).
        let ret = unsafe {
            libc::mknod(
                tun_c.as_ptr(),
                libc::S_IFCHR | 0o660,
                libc::makedev(10, 200),
            ) | libc::chown(tun_c.as_ptr(), VMM_UID, VMM_UID)
        };
        assert_eq!(ret, 0, "mknod/chown: {}", io::Error::last_os_error());

        let (own, foreign) = std::thread::spawn(move || {
            enter_new_netns();
            let owner = VMM_UID.to_string();
            let other = (VMM_UID - 1).to_string();
            ip(&[
                "tuntap", "add", "dev", "tap0", "mode", "tap", "user", &owner,
            ]);
            ip(&[
                "tuntap", "add", "dev", "tap1", "mode", "tap", "user", &other,
            ]);
            // Raw system calls change only this thread's credentials (the libc wrappers
            // would change every thread of the test process). Leaving uid 0 also clears
            // the thread's capabilities, as in the jail.
            // SAFETY: setresgid/setresuid take integers only.
            let ret = unsafe {
                libc::syscall(libc::SYS_setresgid, VMM_UID, VMM_UID, VMM_UID)
                    | libc::syscall(libc::SYS_setresuid, VMM_UID, VMM_UID, VMM_UID)
            };
            assert_eq!(ret, 0, "drop privileges: {}", io::Error::last_os_error());
            let open = |name| {
                Tap::open_via(&tun, name)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            };
            (open("tap0"), open("tap1"))
        })
        .join()
        .unwrap();

        assert_eq!(own, Ok(()));
        let err = foreign.unwrap_err();
        assert!(err.contains("cannot attach to TAP device tap1"), "{err}");
    }

    fn exchange_arp() {
        let mut net = Net::new("tap0", MAC).unwrap();
        assert_eq!(net.backend().name(), "tap0");
        let mem = guest_memory();
        let mut rx = queue_driver(&mem, RX_RING);
        let mut tx = queue_driver(&mem, TX_RING);
        let irq = Arc::new(CountingInterrupt::default());
        net.activate(mem.clone(), irq.clone(), vec![rx.queue(), tx.queue()])
            .unwrap();
        const BUFFERS: u64 = 32;
        for i in 0..BUFFERS {
            rx.add_chain(&[w(RX_DATA + i * 0x1000, RX_BUF_LEN)]);
        }
        mem.write_slice(&with_header(&arp_request(), 0), GuestAddress(TX_DATA))
            .unwrap();
        let tx_notify = net.queue_events()[TX_QUEUE].try_clone().unwrap();
        let net = Arc::new(Mutex::new(net));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
        em.add_subscriber(net.clone());

        // Like a real guest, repeat the request until answered: the kernel drops what
        // the TAP transmits until its link watcher has seen the carrier come up.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = 0;
        let mut requests = 0;
        let mut got_reply = false;
        let mut last_request: Option<Instant> = None;
        while !got_reply && Instant::now() < deadline {
            if last_request.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
                tx.add_chain(&[r(TX_DATA, (VNET_HDR_LEN + arp_request().len()) as u32)]);
                tx_notify.write(1).unwrap();
                requests += 1;
                last_request = Some(Instant::now());
            }
            em.run_with_timeout(50).unwrap();
            while seen < rx.used_count() {
                let (id, len) = rx.used(seen);
                let addr = RX_DATA + u64::from(id) * 0x1000;
                let frame = read_guest(&mem, addr, len as usize);
                assert_eq!(frame[..VNET_HDR_LEN], clean_header());
                got_reply |= is_arp_reply_for_guest(&frame[VNET_HDR_LEN..]);
                seen += 1;
            }
            assert!(
                u64::from(seen) < BUFFERS,
                "RX buffers ran out without an ARP reply"
            );
        }

        assert!(got_reply, "no ARP reply from the namespace within 5 s");
        assert_eq!(tx.used_count(), requests);
        let snapshot = net.lock().unwrap().metrics().snapshot();
        assert_eq!(snapshot["tx_packets"], u64::from(requests));
        assert_eq!(snapshot["rx_packets"], u64::from(seen));
        assert!(irq.queue.load(Ordering::SeqCst) >= 1);
    }
}

#[test]
fn broken_tx_avail_index_puts_the_device_in_needs_reset() {
    let mem = guest_memory();
    let rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    let net = Net::with_backend(MemBackend(Wire::new()), MAC).unwrap();

    check_broken_queue_needs_reset(
        net,
        &mem,
        &[&rx.vq, &tx.vq],
        TX_QUEUE,
        Net::<MemBackend>::process_tx,
    );
}

#[test]
fn broken_rx_avail_index_puts_the_device_in_needs_reset() {
    let mem = guest_memory();
    let rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    let wire = Wire::new();
    let net = Net::with_backend(MemBackend(wire.clone()), MAC).unwrap();
    wire.send_to_guest(vec![0; VNET_HDR_LEN + 60]);

    check_broken_queue_needs_reset(
        net,
        &mem,
        &[&rx.vq, &tx.vq],
        RX_QUEUE,
        Net::<MemBackend>::process_rx,
    );
}

#[test]
fn a_restored_nic_delivers_the_frame_that_waited_for_a_buffer() {
    let mut f = fixture();
    let mem = f.mem.clone();
    let rx = queue_driver(&mem, RX_RING);
    let tx = queue_driver(&mem, TX_RING);
    f.activate(&rx, &tx);
    let frame = ethernet_frame(120, 9);
    f.wire.send_to_guest(with_header(&frame, 0));
    f.net.process_rx();
    let json = serde_json::to_vec(&f.net.save_state()).unwrap();

    let wire = Wire::new();
    let mut restored = Net::with_backend(MemBackend(wire), MAC).unwrap();
    restored
        .restore_state(&serde_json::from_slice(&json).unwrap())
        .unwrap();
    let mut rx2 = queue_driver(&mem, RX_RING + 0x10_0000);
    let tx2 = queue_driver(&mem, TX_RING + 0x10_0000);
    rx2.add_chain(&[w(RX_DATA, RX_BUF_LEN)]);
    restored
        .activate(
            mem.clone(),
            Arc::new(CountingInterrupt::default()),
            vec![rx2.queue(), tx2.queue()],
        )
        .unwrap();

    assert_eq!(rx.used_count(), 0, "the original had no buffer for it");
    assert_eq!(rx2.used_count(), 1);
    assert_eq!(read_guest(&mem, RX_DATA + 12, 120), frame);
}

#[test]
fn a_restore_with_another_mac_is_refused() {
    let mut f = fixture();
    let other = MacAddr([0x06, 0, 0, 0, 0, 9]);
    let mut restored = Net::with_backend(MemBackend(Wire::new()), other).unwrap();

    let err = restored.restore_state(&f.net.save_state()).unwrap_err();

    assert!(err.starts_with("the snapshot's MAC is "), "{err}");
}
