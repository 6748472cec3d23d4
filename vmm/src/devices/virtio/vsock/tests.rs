//! virtio-vsock device tests through mock driver queues, with real Unix sockets in a
//! temporary directory for the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::connection::HOST_BUF_ALLOC;
use super::host::FdChange;
use super::muxer::{StreamId, HOST_PORTS};
use super::packet::{Header, Op, HDR_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::{Vsock, EVENT_QUEUE, RX_QUEUE, TX_QUEUE, VSOCK_QUEUE_SIZE};
use crate::devices::virtio::test_utils::{
    check_broken_queue_needs_reset, guest_memory, r, w, CountingInterrupt, Driver, DATA_START,
};
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::devices::DeviceMetrics;

const GUEST: u64 = 3;
const GUEST_PORT: u32 = 1024;
const HOST_PORT: u32 = 52;
const RING_SIZE: u16 = 64;
/// Guest buffers: TX packets from here, RX buffers from RX_DATA, event buffers after.
const TX_DATA: u64 = DATA_START;
const RX_DATA: u64 = DATA_START + 0x10_0000;
const EVENT_DATA: u64 = DATA_START + 0x20_0000;
/// An RX buffer as Linux posts them: header and payload in one 4 KiB buffer.
const RX_BUF: u32 = 4096;

struct Fixture<'m> {
    dev: Vsock,
    mem: &'m GuestMemoryMmap,
    rx: Driver<'m>,
    tx: Driver<'m>,
    ev: Driver<'m>,
    irq: std::sync::Arc<CountingInterrupt>,
    dir: TempDir,
    /// Next free TX / RX / event buffer address.
    tx_next: u64,
    rx_bufs: Vec<u64>,
    ev_bufs: Vec<u64>,
    /// RX packets already looked at.
    rx_seen: u16,
    /// Streams the device asked the event loop to watch.
    streams: Vec<StreamId>,
    now: Instant,
}

fn fixture(mem: &GuestMemoryMmap) -> Fixture<'_> {
    let dir = TempDir::new_with_prefix("/tmp/genos-vsock-").unwrap();
    let dev = Vsock::new(GUEST, &dir.as_path().join("v.sock")).unwrap();
    let irq = Driver::interrupt();
    let f = Fixture {
        dev,
        mem,
        rx: Driver::at(mem, 0, RING_SIZE),
        tx: Driver::at(mem, 0x4000, RING_SIZE),
        ev: Driver::at(mem, 0x8000, RING_SIZE),
        irq,
        dir,
        tx_next: TX_DATA,
        rx_bufs: Vec::new(),
        ev_bufs: Vec::new(),
        rx_seen: 0,
        streams: Vec::new(),
        now: Instant::now(),
    };
    f
}

fn header(op: Op, dst_port: u32, len: u32, flags: u32) -> Header {
    Header {
        src_cid: GUEST,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op: op as u16,
        flags,
        buf_alloc: 256 * 1024,
        fwd_cnt: 0,
    }
}

impl Fixture<'_> {
    fn activate(&mut self) {
        self.dev
            .activate(
                self.mem.clone(),
                self.irq.clone(),
                vec![self.rx.queue(), self.tx.queue(), self.ev.queue()],
            )
            .unwrap();
    }

    fn sock_path(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    /// A host program listening on `S_<port>`.
    fn listen(&self, port: u32) -> UnixListener {
        UnixListener::bind(self.dir.as_path().join(format!("v.sock_{port}"))).unwrap()
    }

    /// Posts `n` RX buffers.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let addr = RX_DATA + self.rx_bufs.len() as u64 * u64::from(RX_BUF);
            self.rx.add_chain(&[w(addr, RX_BUF)]);
            self.rx_bufs.push(addr);
        }
        self.dev.process_rx(self.now);
        self.settle();
    }

    /// Writes `bytes` at the next TX address; returns where.
    fn stage(&mut self, bytes: &[u8]) -> u64 {
        let addr = self.tx_next;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx_next += (bytes.len() as u64).max(1).next_multiple_of(64);
        addr
    }

    /// Sends one packet from the guest: header and payload in two descriptors, as Linux.
    fn send(&mut self, hdr: Header, payload: &[u8]) {
        let h = self.stage(&hdr.encode());
        if payload.is_empty() {
            self.tx.add_chain(&[r(h, HDR_LEN as u32)]);
        } else {
            let p = self.stage(payload);
            self.tx
                .add_chain(&[r(h, HDR_LEN as u32), r(p, payload.len() as u32)]);
        }
        self.dev.process_tx(self.now);
        self.settle();
    }

    /// Records the streams the device opened (a real event loop would watch them) and
    /// drops the ones it closed.
    fn settle(&mut self) {
        for change in self.dev.take_fd_changes() {
            match change {
                FdChange::Add(_, id) => self.streams.push(id),
                FdChange::Remove(_, id) => self.streams.retain(|s| *s != id),
            }
        }
    }

    /// Tells the device every watched stream may have input (what epoll would say).
    fn poll_streams(&mut self) {
        for id in self.streams.clone() {
            self.dev.process_stream(id, true, true, self.now);
        }
        self.settle();
    }

    /// RX packets the device used since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen < self.rx.used_count() {
            let (head, len) = self.rx.used(self.rx_seen);
            self.rx_seen += 1;
            let addr = self.rx_bufs[head as usize];
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            assert!(bytes.len() >= HDR_LEN, "RX packet of {} bytes", bytes.len());
            let hdr = Header::decode(bytes[..HDR_LEN].try_into().unwrap());
            assert_eq!(hdr.len as usize, bytes.len() - HDR_LEN, "{hdr:?}");
            out.push((hdr, bytes[HDR_LEN..].to_vec()));
        }
        out
    }

    fn metric(&self, name: &str) -> u64 {
        self.dev.metrics().snapshot()[name].as_u64().unwrap()
    }

    /// A guest-initiated connection to `HOST_PORT`, up; returns the host program's end.
    fn guest_connects(&mut self, listener: &UnixListener) -> UnixStream {
        self.send(header(Op::Request, HOST_PORT, 0, 0), &[]);
        let (host, _) = listener.accept().unwrap();
        let response = self.received();
        assert_eq!(ops(&response), [Op::Response as u16]);
        host
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn identifies_as_vsock_with_three_queues_and_the_guest_cid_in_its_config() {
    let mem = guest_memory();
    let f = fixture(&mem);
    let mut cid = [0u8; 8];
    let mut high = [0xffu8; 4];

    f.dev.read_config(0, &mut cid);
    f.dev.read_config(4, &mut high);

    assert_eq!(f.dev.device_type(), 19);
    assert_eq!(f.dev.queue_max_sizes(), &[VSOCK_QUEUE_SIZE; 3]);
    assert_eq!(
        f.dev.avail_features(),
        1 << 32,
        "VERSION_1 only, no SEQPACKET"
    );
    assert_eq!(u64::from_le_bytes(cid), GUEST);
    assert_eq!(high, [0; 4]);
    assert!(f.sock_path().exists(), "listening on S");
}

#[test]
fn a_full_round_trip_between_a_guest_socket_and_a_host_program() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);

    f.send(header(Op::Rw, HOST_PORT, 4, 0), b"ping");
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    host.write_all(b"pong").unwrap();
    f.poll_streams();
    let rx = f.received();

    assert_eq!(&got, b"ping");
    assert_eq!(ops(&rx), [Op::Rw as u16]);
    let (hdr, payload) = &rx[0];
    assert_eq!(payload, b"pong");
    assert_eq!((hdr.src_port, hdr.dst_port), (HOST_PORT, GUEST_PORT));
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST));
    assert_eq!(hdr.fwd_cnt, 4, "the host took the guest's 4 bytes");
    assert_eq!(hdr.buf_alloc, HOST_BUF_ALLOC);
    assert_eq!(f.metric("connections_opened"), 1);
    assert!(f.irq.queue.load(Ordering::SeqCst) > 0);
}

#[test]
fn a_host_program_connects_with_connect_and_gets_ok_once_the_guest_accepts() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let mut host = UnixStream::connect(f.sock_path()).unwrap();

    host.write_all(b"CONNECT 1024\nearly").unwrap();
    f.dev.process_listener(f.now);
    f.settle();
    f.poll_streams();
    let request = f.received();
    assert_eq!(ops(&request), [Op::Request as u16]);
    let (req, _) = request[0];
    assert!(HOST_PORTS.contains(&req.src_port));
    assert_eq!(req.dst_port, GUEST_PORT);
    let mut response = header(Op::Response, req.src_port, 0, 0);
    response.dst_port = req.src_port;
    f.send(response, &[]);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    let data = f.received();

    assert_eq!(
        std::str::from_utf8(&line).unwrap(),
        format!("OK {}\n", req.src_port)
    );
    assert_eq!(ops(&data), [Op::Rw as u16]);
    assert_eq!(
        data[0].1, b"early",
        "bytes after the line are data, not lost"
    );
}

#[test]
fn a_host_program_the_guest_does_not_answer_is_closed_after_the_timeout() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(4);
    let mut host = UnixStream::connect(f.sock_path()).unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    f.dev.process_listener(f.now);
    f.settle();
    f.poll_streams();
    assert_eq!(ops(&f.received()), [Op::Request as u16]);

    f.dev.process_timer(f.now + Duration::from_secs(3));
    f.settle();
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();

    assert!(rest.is_empty(), "closed without OK");
    assert_eq!(ops(&f.received()), [Op::Rst as u16]);
    assert_eq!(f.metric("connect_timeouts"), 1);
}

#[test]
fn a_host_program_without_a_connect_line_is_dropped() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    let mut slow = UnixStream::connect(f.sock_path()).unwrap();
    let mut garbage = UnixStream::connect(f.sock_path()).unwrap();
    garbage.write_all(&[b'A'; 100]).unwrap();
    slow.write_all(b"CONN").unwrap();

    f.dev.process_listener(f.now);
    f.settle();
    f.poll_streams();
    f.dev.process_timer(f.now + Duration::from_secs(6));
    f.settle();

    for sock in [&mut slow, &mut garbage] {
        let mut rest = Vec::new();
        // A close with our unread bytes pending may reach the peer as a reset.
        let _ = sock.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    assert_eq!(f.metric("handshake_failures"), 2);
    assert!(f.streams.is_empty());
}

#[test]
fn a_guest_connecting_to_a_port_nobody_listens_on_gets_rst() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(2);

    f.send(header(Op::Request, 9999, 0, 0), &[]);

    let rx = f.received();
    assert_eq!(ops(&rx), [Op::Rst as u16]);
    assert_eq!((rx[0].0.src_port, rx[0].0.dst_port), (9999, GUEST_PORT));
    assert_eq!(f.metric("host_connect_failures"), 1);
}

#[test]
fn a_packet_for_an_unknown_connection_gets_rst() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(2);

    f.send(header(Op::Rw, HOST_PORT, 3, 0), b"abc");

    assert_eq!(ops(&f.received()), [Op::Rst as u16]);
}

#[test]
fn malformed_headers_are_refused_with_rst_where_they_can_be_answered() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let mut wrong_dst = header(Op::Request, HOST_PORT, 0, 0);
    wrong_dst.dst_cid = 7;
    let mut forged_src = header(Op::Request, HOST_PORT, 0, 0);
    forged_src.src_cid = 9;
    let mut bad_op = header(Op::Request, HOST_PORT, 0, 0);
    bad_op.op = 99;

    f.send(wrong_dst, &[]);
    f.send(forged_src, &[]);
    f.send(bad_op, &[]);
    let short = f.stage(&[0u8; 20]);
    f.tx.add_chain(&[r(short, 20)]);
    f.dev.process_tx(f.now);

    assert_eq!(
        ops(&f.received()),
        [Op::Rst as u16, Op::Rst as u16],
        "wrong destination and unknown op answered; forged source and short dropped"
    );
    assert_eq!(f.metric("tx_malformed"), 4);
    assert_eq!(f.tx.used_count(), 4, "every TX chain is returned");
}

#[test]
fn a_len_beyond_the_descriptor_chain_is_refused_before_reading_a_byte() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);
    host.set_nonblocking(true).unwrap();

    // Says 4096 bytes follow; the chain holds 8.
    f.send(header(Op::Rw, HOST_PORT, 4096, 0), &[1u8; 8]);

    assert_eq!(ops(&f.received()), [Op::Rst as u16]);
    let mut buf = [0u8; 16];
    assert!(
        matches!(host.read(&mut buf), Ok(0)),
        "nothing reached the host and its stream is closed"
    );
    assert_eq!(f.metric("tx_malformed"), 1);
}

#[test]
fn a_tx_chain_with_a_writable_descriptor_is_dropped() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(2);
    let h = f.stage(&header(Op::Request, HOST_PORT, 0, 0).encode());

    f.tx.add_chain(&[r(h, HDR_LEN as u32), w(h + 0x1000, 64)]);
    f.dev.process_tx(f.now);

    assert!(f.received().is_empty());
    assert_eq!(f.metric("tx_malformed"), 1);
    assert_eq!(f.tx.used_count(), 1);
}

#[test]
fn rx_chains_that_are_not_writable_only_or_too_short_are_returned_unused() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.rx.add_chain(&[r(RX_DATA, RX_BUF)]);
    f.rx.add_chain(&[w(RX_DATA + 0x1000, 16)]);
    f.rx_bufs.extend([RX_DATA, RX_DATA + 0x1000]);
    f.dev.process_rx(f.now);

    f.send(header(Op::Rw, HOST_PORT, 1, 0), b"x");

    assert_eq!(f.rx.used_count(), 2);
    assert_eq!(f.rx.used(0).1, 0);
    assert_eq!(f.rx.used(1).1, 0);
    assert_eq!(f.metric("rx_malformed_chains"), 2);
    f.rx_seen = 2;
    f.post_rx(1);
    assert_eq!(ops(&f.received()), [Op::Rst as u16], "the RST waited");
}

#[test]
fn packets_wait_for_rx_buffers_and_go_out_in_order() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    let listener = f.listen(HOST_PORT);
    f.send(header(Op::Request, HOST_PORT, 0, 0), &[]);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"one").unwrap();
    f.poll_streams();
    drop(host);
    f.poll_streams();
    assert_eq!(f.rx.used_count(), 0, "no buffers yet");

    f.post_rx(8);

    let rx = f.received();
    assert_eq!(
        ops(&rx),
        [Op::Response as u16, Op::Rw as u16, Op::Shutdown as u16]
    );
    assert_eq!(rx[1].1, b"one");
    assert_eq!(rx[2].0.flags, SHUTDOWN_SEND);
}

#[test]
fn a_guest_overrunning_its_credit_is_reset() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    // The host program never reads: the guest's bytes pile up in the device.
    let _host = f.guest_connects(&listener);
    let chunk = vec![0x5a; 60 * 1024];
    let mut sent = 0;

    // The socket buffer takes some; the device holds at most HOST_BUF_ALLOC more.
    while f.metric("credit_overruns") == 0 && sent < 64 {
        f.send(header(Op::Rw, HOST_PORT, chunk.len() as u32, 0), &chunk);
        sent += 1;
    }

    assert_eq!(f.metric("credit_overruns"), 1);
    let rx = ops(&f.received());
    let (last, before) = rx.split_last().unwrap();
    assert_eq!(*last, Op::Rst as u16);
    assert!(
        before.iter().all(|op| *op == Op::CreditUpdate as u16),
        "{rx:?}"
    );
    assert!(f.streams.is_empty(), "host stream closed");
}

#[test]
fn data_after_the_guests_shutdown_send_resets_the_connection() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);

    f.send(header(Op::Shutdown, HOST_PORT, 0, SHUTDOWN_SEND), &[]);
    let mut eof = Vec::new();
    host.read_to_end(&mut eof).unwrap();
    f.send(header(Op::Rw, HOST_PORT, 4, 0), b"late");

    assert!(eof.is_empty(), "the host saw the guest's end of data");
    assert_eq!(ops(&f.received()), [Op::Rst as u16]);
    assert_eq!(f.metric("protocol_errors"), 1);
}

#[test]
fn an_orderly_close_from_both_sides_ends_with_rst_and_a_closed_host_stream() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);

    f.send(header(Op::Rw, HOST_PORT, 3, 0), b"bye");
    f.send(
        header(Op::Shutdown, HOST_PORT, 0, SHUTDOWN_SEND | SHUTDOWN_RCV),
        &[],
    );
    let mut all = Vec::new();
    host.read_to_end(&mut all).unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    f.poll_streams();

    assert_eq!(all, b"bye");
    assert_eq!(ops(&f.received()), [Op::Rst as u16]);
    assert!(f.streams.is_empty());
    assert_eq!(f.metric("connections_closed"), 1);
}

#[test]
fn transport_reset_drops_every_connection_and_tells_the_guest() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);

    f.dev.transport_reset(f.now);
    f.settle();
    assert_eq!(f.ev.used_count(), 0, "no event buffer yet: the event waits");
    f.ev.add_chain(&[w(EVENT_DATA, 4)]);
    f.ev_bufs.push(EVENT_DATA);
    f.dev.process_event_queue();

    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host stream closed");
    assert_eq!(f.ev.used(0).1, 4);
    let mut id = [0xffu8; 4];
    mem.read_slice(&mut id, GuestAddress(EVENT_DATA)).unwrap();
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert!(
        f.received().is_empty(),
        "no RSTs: the guest drops its side itself"
    );
    assert_eq!(f.metric("transport_resets"), 1);
    assert!(f.streams.is_empty());
}

#[test]
fn a_driver_reset_drops_every_connection() {
    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(8);
    let listener = f.listen(HOST_PORT);
    let mut host = f.guest_connects(&listener);

    assert!(f.dev.reset());
    f.settle();

    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(f.streams.is_empty());
}

#[test]
fn a_broken_tx_queue_puts_the_device_in_needs_reset_until_the_driver_resets_it() {
    let mem = guest_memory();
    let dir = TempDir::new_with_prefix("/tmp/genos-vsock-").unwrap();
    let dev = Vsock::new(GUEST, &dir.as_path().join("v.sock")).unwrap();
    let rx = Driver::at(&mem, 0, RING_SIZE);
    let tx = Driver::at(&mem, 0x4000, RING_SIZE);
    let ev = Driver::at(&mem, 0x8000, RING_SIZE);

    let t = check_broken_queue_needs_reset(
        dev,
        &mem,
        &[&rx.vq, &tx.vq, &ev.vq],
        TX_QUEUE,
        |d: &mut Vsock| d.process_tx(Instant::now()),
    );

    assert_eq!(
        t.device.lock().unwrap().metrics().snapshot()["queue_errors"],
        1
    );
    let _ = (RX_QUEUE, EVENT_QUEUE);
}

#[test]
fn a_live_socket_at_the_path_is_not_taken_over_and_a_stale_one_is_replaced() {
    let dir = TempDir::new_with_prefix("/tmp/genos-vsock-").unwrap();
    let path = dir.as_path().join("v.sock");
    let live = UnixListener::bind(&path).unwrap();

    let in_use = Vsock::new(GUEST, &path).err().unwrap();
    drop(live);
    let replaced = Vsock::new(GUEST, &path);

    assert!(
        in_use.to_string().contains("another process is listening"),
        "{in_use}"
    );
    assert!(replaced.is_ok());
}

#[test]
fn the_event_loop_wires_the_listener_streams_and_timer() {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

    let mem = guest_memory();
    let mut f = fixture(&mem);
    f.activate();
    f.post_rx(4);
    let path = f.sock_path();
    let Fixture {
        dev, rx, rx_bufs, ..
    } = f;
    let metrics = dev.metrics();
    let dev = Arc::new(Mutex::new(dev));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    em.add_subscriber(dev);
    let run_until = |em: &mut EventManager<_>, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() && Instant::now() < deadline {
            em.run_with_timeout(100).unwrap();
        }
    };
    let mut host = UnixStream::connect(&path).unwrap();

    // Listener, then the stream's input: the CONNECT line becomes a REQUEST.
    host.write_all(b"CONNECT 1024\n").unwrap();
    run_until(&mut em, &|| rx.used_count() == 1);
    // No RESPONSE: the timer ends the attempt and the stream is closed.
    run_until(&mut em, &|| {
        metrics.connect_timeouts.load(Ordering::Relaxed) == 1
    });
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();

    assert_eq!(rx.used_count(), 2, "REQUEST, then RST");
    let mut op = [0u8; 2];
    mem.read_slice(&mut op, GuestAddress(rx_bufs[0] + 30))
        .unwrap();
    assert_eq!(u16::from_le_bytes(op), Op::Request as u16);
    assert!(rest.is_empty());
}

#[test]
fn a_restored_device_sends_the_transport_reset_on_the_buffer_posted_before_the_snapshot() {
    use std::sync::{Arc, Mutex};

    use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
    use crate::devices::virtio::test_utils::Transported;
    let mem = guest_memory();
    let dir = TempDir::new_with_prefix("/tmp/genos-vsock-").unwrap();
    let rx = Driver::at(&mem, 0, RING_SIZE);
    let tx = Driver::at(&mem, 0x4000, RING_SIZE);
    let mut ev = Driver::at(&mem, 0x8000, RING_SIZE);
    ev.add_chain(&[w(EVENT_DATA, 4)]);
    mem.write_slice(&[0xff; 4], GuestAddress(EVENT_DATA))
        .unwrap();
    let dev = Vsock::new(GUEST, &dir.as_path().join("v.sock")).unwrap();
    let t = Transported::bring_up(dev, &mem, &[&rx.vq, &tx.vq, &ev.vq]);
    let state = t.transport.save();
    let restored_dev = Vsock::new(GUEST, &dir.as_path().join("clone.sock")).unwrap();
    let metrics = restored_dev.metrics();
    let restored_dev = Arc::new(Mutex::new(restored_dev));
    let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(MmioInterrupt::new(irq.try_clone().unwrap()));
    let mut restored = MmioTransport::new(restored_dev, mem.clone(), interrupt).unwrap();

    restored.restore(&state).unwrap();

    assert_eq!(ev.used_count(), 1, "the event went out at once");
    assert_eq!(ev.used(0).1, 4);
    let mut id = [0xffu8; 4];
    mem.read_slice(&mut id, GuestAddress(EVENT_DATA)).unwrap();
    assert_eq!(
        u32::from_le_bytes(id),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert_eq!(metrics.snapshot()["transport_resets"], 1);
    assert_eq!(irq.read().unwrap(), 1, "with an interrupt");
    assert_eq!(
        t.device.lock().unwrap().metrics().snapshot()["transport_resets"],
        0
    );
}

#[test]
fn a_restore_with_another_guest_cid_is_refused() {
    use std::sync::{Arc, Mutex};

    use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
    use crate::devices::virtio::test_utils::Transported;
    let mem = guest_memory();
    let dir = TempDir::new_with_prefix("/tmp/genos-vsock-").unwrap();
    let (rx, tx, ev) = (
        Driver::at(&mem, 0, RING_SIZE),
        Driver::at(&mem, 0x4000, RING_SIZE),
        Driver::at(&mem, 0x8000, RING_SIZE),
    );
    let dev = Vsock::new(GUEST, &dir.as_path().join("v.sock")).unwrap();
    let state = Transported::bring_up(dev, &mem, &[&rx.vq, &tx.vq, &ev.vq])
        .transport
        .save();
    let other = Arc::new(Mutex::new(
        Vsock::new(GUEST + 1, &dir.as_path().join("o.sock")).unwrap(),
    ));
    let interrupt = Arc::new(MmioInterrupt::new(
        vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
    ));
    let mut restored = MmioTransport::new(other.clone(), mem.clone(), interrupt).unwrap();

    let err = restored.restore(&state).unwrap_err();

    assert!(
        err.to_string()
            .contains("the snapshot's guest CID is 3, this device's 4"),
        "{err}"
    );
    assert!(!other.lock().unwrap().is_activated());
}
