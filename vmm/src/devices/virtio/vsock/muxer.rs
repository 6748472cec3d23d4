//! The connection table of the vsock device, sans-IO: checked packets from the TX queue,
//! bytes, ends and errors from host streams and the current time go in; packets for the
//! RX queue and [`HostAction`]s on host streams come out.
//!
//! Connections are keyed by (host port, guest port). A guest REQUEST to host port P asks
//! the driver to connect the host socket `<path>_P` ([`HostAction::Connect`]); a host
//! program's `CONNECT <port>` gets a host port from [`HOST_PORTS`], which guest requests
//! may not use, so the two kinds never collide. Packets for unknown connections are
//! answered with RST. What waits for the guest is bounded: each connection's owed
//! control packets are flags and its data at most [`TO_GUEST_CAP`] bytes, standalone
//! RSTs at most [`MAX_PENDING_RSTS`], and the driver reads a host stream only as far as
//! [`Muxer::read_budget`] allows, which is the backpressure on host programs.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connection::{Connection, State, Violation, TO_GUEST_CAP};
use super::metrics::{bump, VsockMetrics};
use super::packet::{Header, Op, Packet, HOST_CID, TYPE_STREAM};

/// Host ports given to host-initiated connections (Firecracker's range); guest requests to
/// these ports are refused.
pub const HOST_PORTS: Range<u32> = (1 << 30)..(1 << 31);
/// Most connections at once.
pub const MAX_CONNECTIONS: usize = 128;
/// Most RSTs for unknown connections waiting for RX buffers; more are dropped (the guest
/// that sends to nobody while giving no buffers learns nothing).
pub const MAX_PENDING_RSTS: usize = 64;
/// How long the guest has to answer a host program's `CONNECT` with RESPONSE.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A host stream, as the driver names it.
pub type StreamId = u32;

/// (host port, guest port).
type Key = (u32, u32);

/// What the driver does to host streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostAction {
    /// Connect the host socket for `host_port` for the guest's `guest_port`, then report
    /// [`Muxer::host_connected`] or [`Muxer::host_connect_failed`].
    Connect { host_port: u32, guest_port: u32 },
    /// Write [`Muxer::host_bound`] of the stream, then report [`Muxer::host_consumed`].
    Flush(StreamId),
    /// Shut the stream's write side: the guest sends no more.
    ShutWrite(StreamId),
    /// Close the stream and forget it.
    Close(StreamId),
}

/// Why a host program's connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    /// [`MAX_CONNECTIONS`] are open.
    #[error("{MAX_CONNECTIONS} connections already open")]
    TooMany,
    /// Every port of [`HOST_PORTS`] is in use with that guest port.
    #[error("no free host port")]
    NoPort,
}

/// The connection table.
pub struct Muxer {
    guest_cid: u64,
    conns: BTreeMap<Key, Conn>,
    by_stream: HashMap<StreamId, Key>,
    /// Connections with a packet for the guest, in the order they got one.
    ready: VecDeque<Key>,
    /// RSTs for packets that belong to no connection.
    lone_rsts: VecDeque<Header>,
    actions: VecDeque<HostAction>,
    next_host_port: u32,
    metrics: Arc<VsockMetrics>,
}

/// A connection and its host stream (none while a guest-initiated one is connecting).
struct Conn {
    c: Connection,
    stream: Option<StreamId>,
    queued: bool,
}

impl Muxer {
    /// An empty table for guest `guest_cid`.
    pub fn new(guest_cid: u64, metrics: Arc<VsockMetrics>) -> Self {
        Self {
            guest_cid,
            conns: BTreeMap::new(),
            by_stream: HashMap::new(),
            ready: VecDeque::new(),
            lone_rsts: VecDeque::new(),
            actions: VecDeque::new(),
            next_host_port: HOST_PORTS.start,
            metrics,
        }
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// Whether no connection is open.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The next thing to do to a host stream.
    pub fn pop_action(&mut self) -> Option<HostAction> {
        self.actions.pop_front()
    }

    /// A refused TX packet: answered with RST when it can be (see
    /// [`super::packet::PacketError::answer_rst`]); a connection it names is dropped.
    pub fn guest_malformed(&mut self, hdr: &Header, answer_rst: bool) {
        bump(&self.metrics.tx_malformed, 1);
        if !answer_rst {
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
        } else {
            self.lone_rst(hdr);
        }
    }

    /// A checked packet from the guest and its payload (`hdr.len` bytes).
    pub fn guest_packet(&mut self, packet: &Packet, payload: &[u8]) {
        let hdr = &packet.hdr;
        bump(&self.metrics.tx_packets, 1);
        bump(&self.metrics.tx_bytes, payload.len() as u64);
        let key = (hdr.dst_port, hdr.src_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            self.new_from_guest(packet);
            return;
        };
        if conn.c.is_resetting() {
            // Its RST is on the way; only the guest's own RST ends it sooner.
            if packet.op == Op::Rst {
                self.remove(key);
            }
            return;
        }
        conn.c.update_peer_credit(hdr);
        let outcome = match packet.op {
            Op::Request => Err(Violation::UnexpectedOp {
                op: Op::Request,
                state: conn.c.state,
            }),
            Op::Response => conn.c.accept_response().map(|()| {
                bump(&self.metrics.connections_opened, 1);
            }),
            Op::Rst => {
                self.remove(key);
                return;
            }
            Op::Shutdown => conn.c.guest_shutdown(hdr.flags),
            Op::Rw => conn.c.guest_data(payload),
            Op::CreditUpdate => Ok(()),
            Op::CreditRequest => {
                conn.c.credit_requested();
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                let conn = &mut self.conns.get_mut(&key).expect("looked up above");
                if let Some(stream) = conn.stream {
                    if conn.c.has_host_bound() {
                        self.actions.push_back(HostAction::Flush(stream));
                    } else if conn.c.host_consumed(0) {
                        self.actions.push_back(HostAction::ShutWrite(stream));
                    }
                }
                self.schedule(key);
            }
            Err(v) => {
                let counter = match v {
                    Violation::CreditOverrun { .. } => &self.metrics.credit_overruns,
                    _ => &self.metrics.protocol_errors,
                };
                bump(counter, 1);
                crate::guest_warn!(
                    "virtio-vsock: connection {}:{} reset: {v}",
                    hdr.src_port,
                    hdr.dst_port
                );
                self.reset_conn(key);
            }
        }
    }

    fn new_from_guest(&mut self, packet: &Packet) {
        let hdr = &packet.hdr;
        match packet.op {
            // Nothing to answer an RST for a connection that does not exist with.
            Op::Rst => {}
            Op::Request if HOST_PORTS.contains(&hdr.dst_port) => {
                tracing::debug!(
                    "virtio-vsock: guest asked for reserved host port {}",
                    hdr.dst_port
                );
                self.lone_rst(hdr);
            }
            Op::Request if self.conns.len() >= MAX_CONNECTIONS => {
                crate::guest_warn!(
                    "virtio-vsock: connection to host port {} refused: {MAX_CONNECTIONS} open",
                    hdr.dst_port
                );
                self.lone_rst(hdr);
            }
            Op::Request => {
                let key = (hdr.dst_port, hdr.src_port);
                self.conns.insert(
                    key,
                    Conn {
                        c: Connection::from_guest(self.guest_cid, hdr),
                        stream: None,
                        queued: false,
                    },
                );
                self.actions.push_back(HostAction::Connect {
                    host_port: hdr.dst_port,
                    guest_port: hdr.src_port,
                });
            }
            _ => self.lone_rst(hdr),
        }
    }

    /// The host socket of a guest-initiated connection is connected as `stream`.
    pub fn host_connected(&mut self, host_port: u32, guest_port: u32, stream: StreamId) {
        let key = (host_port, guest_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            self.actions.push_back(HostAction::Close(stream));
            return;
        };
        if conn.stream.is_some() || conn.c.state != State::HostConnecting || conn.c.is_resetting() {
            self.actions.push_back(HostAction::Close(stream));
            return;
        }
        conn.stream = Some(stream);
        conn.c.host_connected();
        self.by_stream.insert(stream, key);
        bump(&self.metrics.connections_opened, 1);
        self.schedule(key);
    }

    /// The host socket of a guest-initiated connection could not be connected: RST.
    pub fn host_connect_failed(&mut self, host_port: u32, guest_port: u32) {
        bump(&self.metrics.host_connect_failures, 1);
        let key = (host_port, guest_port);
        if self.conns.contains_key(&key) {
            self.reset_conn(key);
        }
    }

    /// A host program on `stream` asked for guest port `guest_port`: a host port is
    /// allocated and a REQUEST owed; the guest has until `now + CONNECT_TIMEOUT`.
    /// Returns the host port.
    pub fn host_connect(
        &mut self,
        stream: StreamId,
        guest_port: u32,
        now: Instant,
    ) -> Result<u32, AcceptError> {
        if self.conns.len() >= MAX_CONNECTIONS {
            return Err(AcceptError::TooMany);
        }
        let span = HOST_PORTS.end - HOST_PORTS.start;
        let mut port = self.next_host_port;
        let mut tries = 0;
        while self.conns.contains_key(&(port, guest_port)) {
            tries += 1;
            if tries > MAX_CONNECTIONS {
                return Err(AcceptError::NoPort);
            }
            port = HOST_PORTS.start + (port + 1 - HOST_PORTS.start) % span;
        }
        self.next_host_port = HOST_PORTS.start + (port + 1 - HOST_PORTS.start) % span;
        let key = (port, guest_port);
        let c = Connection::from_host(self.guest_cid, port, guest_port, now + CONNECT_TIMEOUT);
        self.conns.insert(
            key,
            Conn {
                c,
                stream: Some(stream),
                queued: false,
            },
        );
        self.by_stream.insert(stream, key);
        self.schedule(key);
        Ok(port)
    }

    /// How many bytes may be read from `stream` now (0: leave it until credit or buffer
    /// room returns; the driver asks again after every pass).
    pub fn read_budget(&self, stream: StreamId) -> usize {
        self.conn_of(stream).map_or(0, |c| c.c.read_budget())
    }

    /// Bytes read from `stream` (at most its [`Muxer::read_budget`]); returns how many
    /// were taken.
    pub fn host_data(&mut self, stream: StreamId, bytes: &[u8]) -> usize {
        let Some(&key) = self.by_stream.get(&stream) else {
            return 0;
        };
        let taken = self.conns.get_mut(&key).map_or(0, |c| c.c.host_data(bytes));
        self.schedule(key);
        taken
    }

    /// `stream` ended (read returned 0).
    pub fn host_eof(&mut self, stream: StreamId) {
        let Some(&key) = self.by_stream.get(&stream) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if matches!(conn.c.state, State::GuestAccepting { .. }) {
            // The host program left before the guest answered.
            self.reset_conn(key);
            return;
        }
        conn.c.host_ended();
        self.schedule(key);
    }

    /// Reading or writing `stream` failed: the guest gets RST.
    pub fn host_error(&mut self, stream: StreamId) {
        bump(&self.metrics.host_stream_errors, 1);
        if let Some(&key) = self.by_stream.get(&stream) {
            self.reset_conn(key);
        }
    }

    /// The guest bytes to write to `stream` next.
    pub fn host_bound(&self, stream: StreamId) -> &[u8] {
        self.conn_of(stream).map_or(&[], |c| c.c.host_bound())
    }

    /// `stream` took `n` bytes of [`Muxer::host_bound`].
    pub fn host_consumed(&mut self, stream: StreamId, n: usize) {
        let Some(&key) = self.by_stream.get(&stream) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.c.host_consumed(n) {
            self.actions.push_back(HostAction::ShutWrite(stream));
        }
        self.schedule(key);
    }

    /// Times host-initiated connections out: the guest gets RST, the host program is
    /// closed.
    pub fn tick(&mut self, now: Instant) {
        let late: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.c.deadline().is_some_and(|d| d <= now) && !c.c.is_resetting())
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            bump(&self.metrics.connect_timeouts, 1);
            tracing::debug!("virtio-vsock: guest port {} did not answer", key.1);
            self.reset_conn(key);
        }
    }

    /// The earliest deadline, for the driver's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().filter_map(|c| c.c.deadline()).min()
    }

    /// Drops every connection (the device's transport reset, e.g. after a snapshot
    /// restore): host streams are closed, nothing more goes to the guest, which is told
    /// by the transport reset event and drops its side.
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        self.lone_rsts.clear();
        self.ready.clear();
    }

    /// Whether a packet waits for the guest.
    pub fn has_rx(&self) -> bool {
        !self.lone_rsts.is_empty() || !self.ready.is_empty()
    }

    /// The next packet for the guest, its payload (at most `max_payload` bytes) appended
    /// to `payload`. Call it only with an RX buffer in hand: what it returns is sent.
    pub fn pop_rx(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        payload.clear();
        if let Some(hdr) = self.lone_rsts.pop_front() {
            bump(&self.metrics.rst_sent, 1);
            bump(&self.metrics.rx_packets, 1);
            return Some(hdr);
        }
        while let Some(key) = self.ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let Some(hdr) = conn.c.next_packet(max_payload, payload) else {
                continue;
            };
            bump(&self.metrics.rx_packets, 1);
            bump(&self.metrics.rx_bytes, u64::from(hdr.len));
            if hdr.op == Op::Rst as u16 {
                bump(&self.metrics.rst_sent, 1);
                self.remove(key);
            } else {
                self.schedule(key);
            }
            return Some(hdr);
        }
        None
    }

    fn conn_of(&self, stream: StreamId) -> Option<&Conn> {
        self.by_stream.get(&stream).and_then(|k| self.conns.get(k))
    }

    fn schedule(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued && conn.c.has_packet() {
                conn.queued = true;
                self.ready.push_back(key);
            }
        }
    }

    /// Resets connection `key`: the final RST goes to the guest, the host stream is
    /// closed at once (nothing more is read or written).
    fn reset_conn(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if !conn.c.guest_knows() {
            self.remove(key);
            return;
        }
        conn.c.reset();
        if let Some(stream) = conn.stream.take() {
            self.by_stream.remove(&stream);
            self.actions.push_back(HostAction::Close(stream));
        }
        self.schedule(key);
    }

    /// Forgets connection `key` and closes its stream.
    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            // A connection made again under this key must not find the old one's place
            // (a guest cycling REQUEST and RST without RX buffers would grow the queue).
            if conn.queued {
                self.ready.retain(|k| *k != key);
            }
            bump(&self.metrics.connections_closed, 1);
            if let Some(stream) = conn.stream {
                self.by_stream.remove(&stream);
                self.actions.push_back(HostAction::Close(stream));
            }
        }
    }

    /// Queues an RST answering `hdr`, which belongs to no connection.
    fn lone_rst(&mut self, hdr: &Header) {
        if self.lone_rsts.len() >= MAX_PENDING_RSTS {
            bump(&self.metrics.rst_dropped, 1);
            return;
        }
        self.lone_rsts.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: hdr.dst_port,
            dst_port: hdr.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: Op::Rst as u16,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Checks of the table's invariants, for tests and fuzzing: no connection holds more
    /// than it may, and the memory waiting for the guest is bounded.
    pub fn check_invariants(&self) {
        use super::connection::HOST_BUF_ALLOC;
        assert!(self.conns.len() <= MAX_CONNECTIONS);
        assert!(self.lone_rsts.len() <= MAX_PENDING_RSTS);
        for (key, conn) in &self.conns {
            // The OK line is at most 14 bytes ("OK 2147483647\n").
            assert!(
                conn.c.host_bound_len() <= HOST_BUF_ALLOC as usize + 14,
                "{key:?}"
            );
            assert!(conn.c.to_guest_len() <= TO_GUEST_CAP, "{key:?}");
            if let Some(stream) = conn.stream {
                assert_eq!(self.by_stream.get(&stream), Some(key));
            }
        }
        assert!(self.by_stream.len() <= self.conns.len());
        assert!(self.ready.len() <= self.conns.len(), "stale ready entries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::vsock::connection::{CREDIT_LOW, HOST_BUF_ALLOC};
    use crate::devices::virtio::vsock::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};

    const GUEST: u64 = 3;
    const GUEST_PORT: u32 = 1000;
    const HOST_PORT: u32 = 52;
    const STREAM: StreamId = 9;

    fn muxer() -> Muxer {
        Muxer::new(GUEST, Arc::default())
    }

    /// A checked packet from the guest's `GUEST_PORT` to host port `to`.
    fn from_guest(op: Op, to: u32, len: u32, flags: u32) -> Packet {
        let hdr = Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: GUEST_PORT,
            dst_port: to,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: 4096,
            fwd_cnt: 0,
        };
        Packet::parse(hdr, GUEST, u64::from(len)).unwrap()
    }

    fn send(m: &mut Muxer, op: Op, to: u32, payload: &[u8], flags: u32) {
        m.guest_packet(&from_guest(op, to, payload.len() as u32, flags), payload);
    }

    /// Every packet the muxer has for the guest now, with payloads.
    fn drain_rx(m: &mut Muxer) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        let mut payload = Vec::new();
        while let Some(hdr) = m.pop_rx(4096 - 44, &mut payload) {
            assert_eq!(hdr.len as usize, payload.len());
            out.push((hdr, payload.clone()));
        }
        out
    }

    fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
        packets.iter().map(|(h, _)| h.op).collect()
    }

    fn actions(m: &mut Muxer) -> Vec<HostAction> {
        std::iter::from_fn(|| m.pop_action()).collect()
    }

    /// A guest-initiated connection to `HOST_PORT`, established on `STREAM`.
    fn established() -> Muxer {
        let mut m = muxer();
        send(&mut m, Op::Request, HOST_PORT, &[], 0);
        assert_eq!(
            actions(&mut m),
            [HostAction::Connect {
                host_port: HOST_PORT,
                guest_port: GUEST_PORT
            }]
        );
        m.host_connected(HOST_PORT, GUEST_PORT, STREAM);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Response as u16]);
        m
    }

    #[test]
    fn a_guest_request_is_answered_with_response_once_the_host_socket_connects() {
        let mut m = muxer();

        send(&mut m, Op::Request, HOST_PORT, &[], 0);
        let before = drain_rx(&mut m);
        let connect = actions(&mut m);
        m.host_connected(HOST_PORT, GUEST_PORT, STREAM);
        let after = drain_rx(&mut m);

        assert!(before.is_empty(), "nothing before the host socket answers");
        assert_eq!(connect.len(), 1);
        let (hdr, _) = &after[0];
        assert_eq!(hdr.op, Op::Response as u16);
        assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST));
        assert_eq!((hdr.src_port, hdr.dst_port), (HOST_PORT, GUEST_PORT));
        assert_eq!(hdr.buf_alloc, HOST_BUF_ALLOC);
    }

    #[test]
    fn a_guest_request_to_a_host_port_nobody_listens_on_gets_rst() {
        let mut m = muxer();
        send(&mut m, Op::Request, HOST_PORT, &[], 0);
        actions(&mut m);

        m.host_connect_failed(HOST_PORT, GUEST_PORT);

        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
        assert!(m.is_empty());
    }

    #[test]
    fn packets_for_unknown_connections_get_rst_but_an_rst_gets_nothing() {
        let mut m = muxer();

        send(&mut m, Op::Rw, HOST_PORT, b"hi", 0);
        send(&mut m, Op::CreditRequest, HOST_PORT, &[], 0);
        send(&mut m, Op::Rst, HOST_PORT, &[], 0);
        let rx = drain_rx(&mut m);

        assert_eq!(ops(&rx), [Op::Rst as u16, Op::Rst as u16]);
        assert_eq!(
            (rx[0].0.src_port, rx[0].0.dst_port),
            (HOST_PORT, GUEST_PORT)
        );
        assert!(actions(&mut m).is_empty());
    }

    #[test]
    fn guest_requests_to_the_host_initiated_port_range_are_refused() {
        let mut m = muxer();

        send(&mut m, Op::Request, HOST_PORTS.start + 5, &[], 0);

        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
        assert!(actions(&mut m).is_empty(), "no host socket is tried");
    }

    #[test]
    fn standalone_rsts_waiting_for_buffers_are_bounded() {
        let mut m = muxer();

        for port in 0..(MAX_PENDING_RSTS as u32 * 2) {
            send(&mut m, Op::Rw, port, b"x", 0);
        }

        assert_eq!(drain_rx(&mut m).len(), MAX_PENDING_RSTS);
        assert_eq!(
            m.metrics
                .rst_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
            MAX_PENDING_RSTS as u64
        );
    }

    #[test]
    fn a_host_connect_sends_request_and_tells_the_host_ok_after_the_response() {
        let now = Instant::now();
        let mut m = muxer();

        let port = m.host_connect(STREAM, GUEST_PORT, now).unwrap();
        let request = drain_rx(&mut m);
        m.guest_packet(&from_guest(Op::Response, port, 0, 0), &[]);
        let flush = actions(&mut m);

        assert!(HOST_PORTS.contains(&port));
        assert_eq!(ops(&request), [Op::Request as u16]);
        assert_eq!(
            (request[0].0.src_port, request[0].0.dst_port),
            (port, GUEST_PORT)
        );
        assert_eq!(flush, [HostAction::Flush(STREAM)]);
        assert_eq!(m.host_bound(STREAM), format!("OK {port}\n").as_bytes());
    }

    #[test]
    fn the_ok_line_does_not_count_as_forwarded_guest_bytes() {
        let mut m = muxer();
        let port = m.host_connect(STREAM, GUEST_PORT, Instant::now()).unwrap();
        drain_rx(&mut m);
        m.guest_packet(&from_guest(Op::Response, port, 0, 0), &[]);
        let line = m.host_bound(STREAM).len();

        m.host_consumed(STREAM, line);
        m.guest_packet(&from_guest(Op::CreditRequest, port, 0, 0), &[]);

        assert_eq!(drain_rx(&mut m)[0].0.fwd_cnt, 0);
    }

    #[test]
    fn host_connect_ports_never_collide() {
        let mut m = muxer();
        let now = Instant::now();

        let ports: Vec<u32> = (0..10)
            .map(|i| m.host_connect(STREAM + i, 1234, now).unwrap())
            .collect();

        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn an_unanswered_host_connect_times_out_with_rst_and_the_host_stream_closed() {
        let now = Instant::now();
        let mut m = muxer();
        m.host_connect(STREAM, GUEST_PORT, now).unwrap();
        drain_rx(&mut m);

        m.tick(now + CONNECT_TIMEOUT - Duration::from_millis(1));
        let early = actions(&mut m);
        m.tick(now + CONNECT_TIMEOUT);

        assert!(early.is_empty());
        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
        assert!(m.is_empty());
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn a_host_connect_the_guest_never_heard_of_times_out_without_rst() {
        let now = Instant::now();
        let mut m = muxer();
        m.host_connect(STREAM, GUEST_PORT, now).unwrap();

        m.tick(now + CONNECT_TIMEOUT);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert!(
            drain_rx(&mut m).is_empty(),
            "the REQUEST never left: nothing to reset"
        );
    }

    #[test]
    fn guest_data_within_credit_goes_to_the_host_stream() {
        let mut m = established();

        send(&mut m, Op::Rw, HOST_PORT, b"ping", 0);

        assert_eq!(actions(&mut m), [HostAction::Flush(STREAM)]);
        assert_eq!(m.host_bound(STREAM), b"ping");
        m.host_consumed(STREAM, 4);
        assert!(m.host_bound(STREAM).is_empty());
    }

    #[test]
    fn a_guest_overrunning_its_credit_is_reset_and_its_bytes_dropped() {
        let mut m = established();
        let chunk = vec![7u8; 60_000];
        send(&mut m, Op::Rw, HOST_PORT, &chunk, 0);
        actions(&mut m);

        send(&mut m, Op::Rw, HOST_PORT, &chunk, 0);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
        assert!(m.is_empty());
        assert_eq!(
            m.metrics
                .credit_overruns
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        m.check_invariants();
    }

    #[test]
    fn data_after_the_guests_shutdown_send_is_refused_with_rst() {
        let mut m = established();
        send(&mut m, Op::Shutdown, HOST_PORT, &[], SHUTDOWN_SEND);
        assert_eq!(actions(&mut m), [HostAction::ShutWrite(STREAM)]);

        send(&mut m, Op::Rw, HOST_PORT, b"late", 0);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
        assert_eq!(
            m.metrics
                .protocol_errors
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn data_before_the_connection_is_up_is_refused_with_rst() {
        let mut m = muxer();
        let port = m.host_connect(STREAM, GUEST_PORT, Instant::now()).unwrap();
        drain_rx(&mut m);

        m.guest_packet(&from_guest(Op::Rw, port, 1, 0), b"x");

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
    }

    #[test]
    fn host_data_never_exceeds_the_guests_credit() {
        let mut m = established();
        // The guest's REQUEST said buf_alloc 4096, fwd_cnt 0.
        assert_eq!(m.read_budget(STREAM), 4096);

        let taken = m.host_data(STREAM, &[1u8; 5000]);
        let sent = drain_rx(&mut m);

        assert_eq!(taken, 4096);
        assert_eq!(m.read_budget(STREAM), 0, "no credit left: the host waits");
        let total: usize = sent.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(total, 4096);
        assert!(sent.iter().all(|(h, _)| h.op == Op::Rw as u16));
    }

    #[test]
    fn a_credit_update_from_the_guest_lets_host_data_flow_again() {
        let mut m = established();
        m.host_data(STREAM, &[1u8; 4096]);
        drain_rx(&mut m);
        let mut update = from_guest(Op::CreditUpdate, HOST_PORT, 0, 0);
        update.hdr.fwd_cnt = 1000;

        m.guest_packet(&update, &[]);

        assert_eq!(m.read_budget(STREAM), 1000);
        assert!(
            drain_rx(&mut m).is_empty(),
            "a credit update is not answered"
        );
    }

    #[test]
    fn a_guest_shrinking_its_buffer_below_what_is_in_flight_gets_nothing_more() {
        let mut m = established();
        m.host_data(STREAM, &[1u8; 4096]);
        drain_rx(&mut m);
        let mut shrunk = from_guest(Op::CreditUpdate, HOST_PORT, 0, 0);
        shrunk.hdr.buf_alloc = 10;
        shrunk.hdr.fwd_cnt = 1;

        m.guest_packet(&shrunk, &[]);

        assert_eq!(m.read_budget(STREAM), 0);
    }

    #[test]
    fn a_credit_request_is_answered_with_a_credit_update() {
        let mut m = established();

        send(&mut m, Op::CreditRequest, HOST_PORT, &[], 0);
        let rx = drain_rx(&mut m);

        assert_eq!(ops(&rx), [Op::CreditUpdate as u16]);
        assert_eq!(rx[0].0.buf_alloc, HOST_BUF_ALLOC);
    }

    #[test]
    fn a_credit_update_goes_out_when_the_guests_view_of_our_room_gets_low() {
        let mut m = established();
        let chunk = vec![0u8; 16 * 1024];
        for _ in 0..4 {
            send(&mut m, Op::Rw, HOST_PORT, &chunk, 0);
        }
        actions(&mut m);

        m.host_consumed(STREAM, CREDIT_LOW as usize - 1);
        let early = drain_rx(&mut m);
        m.host_consumed(STREAM, 1);
        let update = drain_rx(&mut m);

        assert!(early.is_empty());
        assert_eq!(ops(&update), [Op::CreditUpdate as u16]);
        assert_eq!(update[0].0.fwd_cnt, CREDIT_LOW);
    }

    #[test]
    fn an_orderly_close_shuts_both_directions_then_resets() {
        let mut m = established();
        m.host_data(STREAM, b"bye");
        m.host_eof(STREAM);

        let host_side = drain_rx(&mut m);
        send(&mut m, Op::Rw, HOST_PORT, b"last", 0);
        send(
            &mut m,
            Op::Shutdown,
            HOST_PORT,
            &[],
            SHUTDOWN_SEND | SHUTDOWN_RCV,
        );
        let before_flush = actions(&mut m);
        m.host_consumed(STREAM, 4);
        let after_flush = actions(&mut m);
        let last = drain_rx(&mut m);

        assert_eq!(ops(&host_side), [Op::Rw as u16, Op::Shutdown as u16]);
        assert_eq!(host_side[1].0.flags, SHUTDOWN_SEND);
        assert_eq!(
            before_flush,
            [HostAction::Flush(STREAM), HostAction::Flush(STREAM)]
        );
        assert_eq!(
            after_flush,
            [HostAction::ShutWrite(STREAM)],
            "the host stream's write side shuts only after the guest's last bytes"
        );
        assert_eq!(ops(&last), [Op::Rst as u16]);
        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert!(m.is_empty());
    }

    #[test]
    fn a_guest_shutdown_rcv_drops_what_waits_for_it_and_stops_reading() {
        let mut m = established();
        let mut no_credit = from_guest(Op::CreditUpdate, HOST_PORT, 0, 0);
        no_credit.hdr.buf_alloc = 0;
        m.guest_packet(&no_credit, &[]);
        m.host_data(STREAM, b"");

        send(&mut m, Op::Shutdown, HOST_PORT, &[], SHUTDOWN_RCV);

        assert_eq!(m.read_budget(STREAM), 0);
        assert!(drain_rx(&mut m).is_empty());
        assert_eq!(m.len(), 1, "the guest may still send");
    }

    #[test]
    fn a_request_on_an_open_connection_resets_it() {
        let mut m = established();

        send(&mut m, Op::Request, HOST_PORT, &[], 0);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
    }

    #[test]
    fn the_guests_rst_closes_the_host_stream_without_an_answer() {
        let mut m = established();

        send(&mut m, Op::Rst, HOST_PORT, &[], 0);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert!(drain_rx(&mut m).is_empty());
        assert!(m.is_empty());
    }

    #[test]
    fn a_host_stream_error_resets_the_connection() {
        let mut m = established();

        m.host_error(STREAM);

        assert_eq!(actions(&mut m), [HostAction::Close(STREAM)]);
        assert_eq!(ops(&drain_rx(&mut m)), [Op::Rst as u16]);
    }

    #[test]
    fn reset_drops_every_connection_and_closes_their_streams() {
        let mut m = established();
        m.host_connect(STREAM + 1, 77, Instant::now()).unwrap();
        send(&mut m, Op::Rw, 9999, b"x", 0);

        m.reset();

        let mut closed = actions(&mut m);
        closed.sort_by_key(|a| match a {
            HostAction::Close(id) => *id,
            _ => 0,
        });
        assert_eq!(
            closed,
            [HostAction::Close(STREAM), HostAction::Close(STREAM + 1)]
        );
        assert!(m.is_empty());
        assert!(!m.has_rx(), "nothing more goes to the guest");
    }

    #[test]
    fn a_guest_cycling_request_and_rst_without_rx_buffers_holds_no_more_memory() {
        let mut m = muxer();

        for _ in 0..1000 {
            send(&mut m, Op::Request, HOST_PORT, &[], 0);
            actions(&mut m);
            m.host_connect_failed(HOST_PORT, GUEST_PORT);
            send(&mut m, Op::Rst, HOST_PORT, &[], 0);
        }

        m.check_invariants();
        assert!(m.is_empty());
        assert!(drain_rx(&mut m).is_empty());
    }

    #[test]
    fn a_megabyte_flows_each_way_through_the_credit_in_order() {
        let mut m = established();
        let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
        let (mut fed, mut to_guest, mut guest_fwd) = (0, Vec::new(), 0u32);
        let (mut sent, mut to_host) = (0, Vec::new());

        for _ in 0..10_000 {
            if to_guest.len() == data.len() && to_host.len() == data.len() {
                break;
            }
            // Host → guest: read what the budget allows, the guest consumes and says so.
            let n = m.read_budget(STREAM).min(data.len() - fed);
            assert_eq!(m.host_data(STREAM, &data[fed..fed + n]), n);
            fed += n;
            for (hdr, payload) in drain_rx(&mut m) {
                if hdr.op == Op::Rw as u16 {
                    to_guest.extend_from_slice(&payload);
                    guest_fwd = guest_fwd.wrapping_add(hdr.len);
                }
            }
            let mut update = from_guest(Op::CreditUpdate, HOST_PORT, 0, 0);
            update.hdr.fwd_cnt = guest_fwd;
            m.guest_packet(&update, &[]);
            // Guest → host: the guest sends within the credit it was last told, the host
            // stream takes everything.
            let chunk = (data.len() - sent).min(4000);
            if chunk > 0 && m.conn_of(STREAM).unwrap().c.host_free() as usize >= chunk {
                send(&mut m, Op::Rw, HOST_PORT, &data[sent..sent + chunk], 0);
                sent += chunk;
            }
            actions(&mut m);
            let bound = m.host_bound(STREAM).to_vec();
            to_host.extend_from_slice(&bound);
            m.host_consumed(STREAM, bound.len());
            m.check_invariants();
        }

        assert!(to_guest == data, "host → guest bytes differ");
        assert!(to_host == data, "guest → host bytes differ");
        assert_eq!(
            m.metrics
                .credit_overruns
                .load(std::sync::atomic::Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn connections_beyond_the_limit_are_refused() {
        let mut m = muxer();
        let now = Instant::now();
        for i in 0..MAX_CONNECTIONS as u32 {
            m.host_connect(100 + i, i, now).unwrap();
        }

        let refused = m.host_connect(1, 5, now);
        send(&mut m, Op::Request, HOST_PORT, &[], 0);

        assert_eq!(refused, Err(AcceptError::TooMany));
        assert!(actions(&mut m).is_empty());
        let rx = drain_rx(&mut m);
        assert!(rx
            .iter()
            .any(|(h, _)| h.op == Op::Rst as u16 && h.src_port == HOST_PORT));
        m.check_invariants();
    }
}
