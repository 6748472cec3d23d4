//! The virtio-vsock connection table under a hostile guest and hostile host programs: the
//! input is a script of guest packets (any header, checked as the device checks it), host
//! connects, bytes, ends, errors, writes, timer ticks, resets and RX buffers of any size.
//!
//! Oracle, after every step: the table's own bounds ([`Muxer::check_invariants`]: no more
//! buffered than allowed); every packet for the guest has a valid header (from the host
//! CID to the guest's, stream type, a defined operation, flags only on SHUTDOWN, payload
//! only on RW and within the buffer it was given); no RW goes beyond the credit the guest's
//! latest header on that connection granted; and host bytes reach the guest in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::devices::virtio::vsock::connection::HOST_BUF_ALLOC;
use vmm::devices::virtio::vsock::muxer::{HostAction, Muxer, StreamId, HOST_PORTS};
use vmm::devices::virtio::vsock::packet::{
    Header, Op, Packet, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

const GUEST: u64 = 3;
/// Ports the script picks from, so that packets meet connections often.
const HOST_SIDE_PORTS: [u32; 4] = [52, 53, HOST_PORTS.start, HOST_PORTS.start + 1];
const GUEST_PORTS: [u32; 2] = [1000, 1001];

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        let (b, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_le_bytes(*b))
    }
    fn u16(&mut self) -> Option<u16> {
        let (b, rest) = self.0.split_first_chunk::<2>()?;
        self.0 = rest;
        Some(u16::from_le_bytes(*b))
    }
}

/// What the oracle knows about one (host port, guest port).
#[derive(Default)]
struct Model {
    /// The guest's latest (buf_alloc, fwd_cnt) on this key.
    credit: (u32, u32),
    /// RW bytes sent on the current connection.
    tx: u32,
    /// The stream feeding it and how many of its bytes the guest got.
    stream: Option<StreamId>,
    delivered: u64,
    /// The guest said SHUTDOWN_RCV: bytes may be dropped from here on.
    lossy: bool,
}

struct Harness {
    m: Muxer,
    now: Instant,
    keys: HashMap<(u32, u32), Model>,
    /// Stream → key, and how many bytes were fed into it.
    streams: HashMap<StreamId, ((u32, u32), u64)>,
    connects: Vec<(u32, u32)>,
    next_stream: StreamId,
    payload: Vec<u8>,
}

/// The target body.
pub fn run(data: &[u8]) {
    let mut h = Harness {
        m: Muxer::new(GUEST, Arc::default()),
        now: Instant::now(),
        keys: HashMap::new(),
        streams: HashMap::new(),
        connects: Vec::new(),
        next_stream: 8,
        payload: Vec::new(),
    };
    let mut input = Bytes(data);
    while let Some(step) = input.u8() {
        if h.step(step, &mut input).is_none() {
            break;
        }
        h.apply_actions();
        h.m.check_invariants();
    }
    // Whatever is owed drains into large buffers.
    for _ in 0..1024 {
        if !h.pop(MAX_PAYLOAD as usize) {
            break;
        }
        h.apply_actions();
    }
    h.m.check_invariants();
}

impl Harness {
    fn step(&mut self, step: u8, input: &mut Bytes<'_>) -> Option<()> {
        match step % 10 {
            0 => self.guest_packet(input)?,
            1 => {
                let guest_port = GUEST_PORTS[usize::from(input.u8()? % 2)];
                let stream = self.new_stream();
                if let Ok(port) = self.m.host_connect(stream, guest_port, self.now) {
                    self.streams.insert(stream, ((port, guest_port), 0));
                    let model = self.keys.entry((port, guest_port)).or_default();
                    model.stream = Some(stream);
                }
            }
            2 => {
                let pick = usize::from(input.u8()?);
                if !self.connects.is_empty() {
                    let (host_port, guest_port) = self.connects.remove(pick % self.connects.len());
                    if pick & 0x80 != 0 {
                        self.m.host_connect_failed(host_port, guest_port);
                    } else {
                        let stream = self.new_stream();
                        self.m.host_connected(host_port, guest_port, stream);
                        self.streams.insert(stream, ((host_port, guest_port), 0));
                    }
                }
            }
            3 => {
                let stream = self.pick_stream(input.u8()?)?;
                let want = usize::from(input.u16()?);
                let n = want.min(self.m.read_budget(stream));
                // A stream the table does not know has no budget (n is 0).
                let fed = self.streams.get(&stream).map_or(0, |s| s.1);
                let bytes: Vec<u8> = (fed..fed + n as u64).map(pattern).collect();
                let taken = self.m.host_data(stream, &bytes);
                assert_eq!(taken, n, "a budgeted read was not taken whole");
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.1 += n as u64;
                }
            }
            4 => {
                let stream = self.pick_stream(input.u8()?)?;
                self.m.host_eof(stream);
            }
            5 => {
                let stream = self.pick_stream(input.u8()?)?;
                self.m.host_error(stream);
            }
            6 => {
                let stream = self.pick_stream(input.u8()?)?;
                let want = usize::from(input.u16()?);
                let n = want.min(self.m.host_bound(stream).len());
                self.m.host_consumed(stream, n);
            }
            7 => {
                let room = usize::from(input.u16()?) % (MAX_PAYLOAD as usize + 1);
                self.pop(room);
            }
            8 => {
                self.now += Duration::from_millis(u64::from(input.u16()?) * 4);
                self.m.tick(self.now);
            }
            _ => {
                if input.u8()? == 0 {
                    self.m.reset();
                    self.keys.clear();
                    self.streams.clear();
                    self.connects.clear();
                }
            }
        }
        Some(())
    }

    fn new_stream(&mut self) -> StreamId {
        self.next_stream += 1;
        self.next_stream
    }

    fn pick_stream(&self, pick: u8) -> Option<StreamId> {
        let mut ids: Vec<StreamId> = self.streams.keys().copied().collect();
        ids.sort_unstable();
        // Sometimes a stream the table never heard of.
        if ids.is_empty() || pick == 0xff {
            return Some(7);
        }
        Some(ids[usize::from(pick) % ids.len()])
    }

    fn guest_packet(&mut self, input: &mut Bytes<'_>) -> Option<()> {
        let shape = input.u8()?;
        let op = u16::from(input.u8()? % 9);
        let len = u32::from(input.u16()?) * u32::from(shape >> 6);
        let hdr = Header {
            src_cid: if shape & 1 == 0 { GUEST } else { 4 },
            dst_cid: if shape & 2 == 0 { HOST_CID } else { 9 },
            src_port: GUEST_PORTS[usize::from(shape >> 2 & 1)],
            dst_port: HOST_SIDE_PORTS[usize::from(shape >> 3 & 3)],
            len,
            type_: TYPE_STREAM,
            op,
            flags: if shape & 0x20 == 0 {
                0
            } else {
                u32::from(input.u8()?)
            },
            buf_alloc: input.u32()?,
            fwd_cnt: input.u32()?,
        };
        let available = u64::from(input.u32()? % 0x2_0000);
        match Packet::parse(hdr, GUEST, available) {
            Ok(packet) => {
                let key = (hdr.dst_port, hdr.src_port);
                let model = self.keys.entry(key).or_default();
                model.credit = (hdr.buf_alloc, hdr.fwd_cnt);
                if packet.op == Op::Shutdown && hdr.flags & SHUTDOWN_RCV != 0 {
                    model.lossy = true;
                }
                self.payload.clear();
                self.payload.resize(hdr.len as usize, 0x5a);
                let payload = std::mem::take(&mut self.payload);
                self.m.guest_packet(&packet, &payload);
                self.payload = payload;
            }
            Err(e) => self.m.guest_malformed(&hdr, e.answer_rst(&hdr)),
        }
        Some(())
    }

    /// Takes one packet for the guest into a buffer of `room` payload bytes and checks it;
    /// returns whether there was one.
    fn pop(&mut self, room: usize) -> bool {
        let Some(hdr) = self.m.pop_rx(room, &mut self.payload) else {
            return false;
        };
        let mut bytes = [0u8; HDR_LEN];
        bytes.copy_from_slice(&hdr.encode());
        assert_eq!(Header::decode(&bytes), hdr);
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST), "{hdr:?}");
        assert_eq!(hdr.type_, TYPE_STREAM);
        assert_eq!(hdr.len as usize, self.payload.len());
        assert!(self.payload.len() <= room, "payload beyond the buffer");
        let op = match hdr.op {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => panic!("undefined operation {other} to the guest"),
        };
        assert!(op == Op::Rw || hdr.len == 0, "payload on {op:?}");
        assert!(op != Op::Rw || hdr.len > 0, "empty RW");
        match op {
            Op::Shutdown => {
                assert_ne!(hdr.flags, 0);
                assert_eq!(hdr.flags & !(SHUTDOWN_RCV | SHUTDOWN_SEND), 0);
            }
            _ => assert_eq!(hdr.flags, 0, "{hdr:?}"),
        }
        if op != Op::Rst {
            assert_eq!(hdr.buf_alloc, HOST_BUF_ALLOC);
        }
        let key = (hdr.src_port, hdr.dst_port);
        let model = self.keys.entry(key).or_default();
        match op {
            // A new connection: its counters start again.
            Op::Request | Op::Response => {
                model.tx = 0;
                model.delivered = 0;
                model.lossy = false;
                model.stream = self
                    .streams
                    .iter()
                    .find(|(_, (k, _))| *k == key)
                    .map(|(s, _)| *s);
            }
            Op::Rw => {
                model.tx = model.tx.wrapping_add(hdr.len);
                let (buf_alloc, fwd_cnt) = model.credit;
                assert!(
                    model.tx.wrapping_sub(fwd_cnt) <= buf_alloc,
                    "RW beyond the guest's credit: sent {} consumed {fwd_cnt} buffer {buf_alloc}",
                    model.tx
                );
                if !model.lossy {
                    for (i, b) in self.payload.iter().enumerate() {
                        assert_eq!(
                            *b,
                            pattern(model.delivered + i as u64),
                            "bytes out of order"
                        );
                    }
                }
                model.delivered += u64::from(hdr.len);
            }
            _ => {}
        }
        true
    }

    fn apply_actions(&mut self) {
        while let Some(action) = self.m.pop_action() {
            match action {
                HostAction::Connect {
                    host_port,
                    guest_port,
                } => {
                    assert!(
                        !HOST_PORTS.contains(&host_port),
                        "guest got a reserved port"
                    );
                    self.connects.push((host_port, guest_port));
                }
                HostAction::Close(stream) => {
                    self.streams.remove(&stream);
                }
                HostAction::Flush(_) | HostAction::ShutWrite(_) => {}
            }
        }
    }
}

/// The byte at `offset` of every host stream.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}
