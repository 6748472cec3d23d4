//! One vsock stream connection between a guest socket and a host stream, sans-IO: its
//! state, credit-based flow control in both directions (virtio 1.2 §5.10.6.3), its
//! bounded buffers and the packets it owes the guest.
//!
//! "Host" is this end (the device and the Unix stream behind it), "guest" the driver's end.
//! Guest → host bytes wait in [`Connection::host_bound`] until the host stream takes them;
//! the guest may never have more there than the `buf_alloc` it was given
//! ([`HOST_BUF_ALLOC`]). Host → guest bytes wait in a buffer of at most [`TO_GUEST_CAP`]
//! bytes and leave only within the credit the guest's last header granted.

use std::collections::VecDeque;
use std::time::Instant;

use super::packet::{Header, Op, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Receive buffer each connection announces to the guest (`buf_alloc`): the most guest
/// bytes the device holds for one host stream that does not keep up.
pub const HOST_BUF_ALLOC: u32 = 64 * 1024;
/// Most host bytes read ahead for one connection, waiting for guest buffers or credit.
pub const TO_GUEST_CAP: usize = 64 * 1024;
/// A CREDIT_UPDATE is sent once the guest believes it has less than this much room left
/// and the host stream has freed at least as much since the guest was last told.
pub const CREDIT_LOW: u32 = HOST_BUF_ALLOC / 4;

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The guest asked (REQUEST); the host socket is being connected.
    HostConnecting,
    /// A host program asked (`CONNECT`); the guest has not answered yet.
    GuestAccepting {
        /// When the guest's RESPONSE is given up on.
        deadline: Instant,
    },
    /// Both ends agreed: data may flow.
    Established,
}

/// Why a connection is reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// The guest sent more than the credit it was given.
    #[error("guest sent {len} bytes with {free} bytes of credit left")]
    CreditOverrun { len: u32, free: u32 },
    /// The guest sent data after saying it would send no more.
    #[error("guest sent data after SHUTDOWN_SEND")]
    DataAfterShutdown,
    /// The operation does not fit the connection's state.
    #[error("{op:?} in state {state:?}")]
    UnexpectedOp { op: Op, state: State },
}

/// Control packets a connection owes the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
    /// SHUTDOWN_SEND, sent once the buffered host bytes are out.
    shutdown: bool,
    /// The final RST: the connection is removed when it leaves.
    rst: bool,
}

/// One connection.
#[derive(Debug)]
pub struct Connection {
    /// The host's port (the guest's destination port for guest-initiated connections).
    pub host_port: u32,
    /// The guest's port.
    pub guest_port: u32,
    pub state: State,
    guest_cid: u64,

    /// Guest bytes not yet taken by the host stream; the first `reply_len` bytes are the
    /// device's own `OK` line and do not count as credit.
    host_bound: VecDeque<u8>,
    reply_len: usize,
    /// Guest bytes received (the guest's `tx_cnt` as this end saw it).
    rx_cnt: u32,
    /// Guest bytes the host stream took.
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    sent_fwd_cnt: u32,

    /// Host bytes waiting to go to the guest.
    to_guest: VecDeque<u8>,
    /// Host bytes sent to the guest.
    tx_cnt: u32,
    /// The guest's receive buffer and how much of what it was sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,

    /// SHUTDOWN flags the guest sent (sticky).
    guest_shut: u32,
    /// The host stream ended (read returned 0).
    host_eof: bool,
    /// SHUTDOWN_SEND went to the guest.
    sent_shutdown: bool,
    /// The host stream's write side was shut (the guest sends no more and all was written).
    host_write_shut: bool,
    owed: Owed,
}

impl Connection {
    /// A connection the guest asked for; the host socket is not connected yet.
    pub fn from_guest(guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(guest_cid, req.dst_port, req.src_port, State::HostConnecting);
        c.update_peer_credit(req);
        c
    }

    /// A connection a host program asked for on host port `host_port`; a REQUEST is owed.
    pub fn from_host(guest_cid: u64, host_port: u32, guest_port: u32, deadline: Instant) -> Self {
        let mut c = Self::new(
            guest_cid,
            host_port,
            guest_port,
            State::GuestAccepting { deadline },
        );
        c.owed.request = true;
        c
    }

    fn new(guest_cid: u64, host_port: u32, guest_port: u32, state: State) -> Self {
        Self {
            host_port,
            guest_port,
            state,
            guest_cid,
            host_bound: VecDeque::new(),
            reply_len: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            sent_fwd_cnt: 0,
            to_guest: VecDeque::new(),
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            guest_shut: 0,
            host_eof: false,
            sent_shutdown: false,
            host_write_shut: false,
            owed: Owed::default(),
        }
    }

    /// Takes the guest's credit fields from any header it sent on this connection.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// How many more bytes the guest can take (`peer_free` of §5.10.6.3): its buffer less
    /// what was sent and not yet consumed. Zero when the guest's counters make no sense
    /// (consumed more than it was sent, or a buffer shrunk below what is in flight).
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Room left in the host-bound buffer: what the guest may still send.
    pub fn host_free(&self) -> u32 {
        HOST_BUF_ALLOC.saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// The guest's RESPONSE to the host's REQUEST arrived: the connection is up and the
    /// host program is told `OK <host_port>`.
    pub fn accept_response(&mut self) -> Result<(), Violation> {
        if !matches!(self.state, State::GuestAccepting { .. }) || self.owed.request {
            return Err(self.unexpected(Op::Response));
        }
        self.state = State::Established;
        let line = super::handshake::ok_line(self.host_port);
        self.reply_len = line.len();
        self.host_bound.extend(line.as_bytes());
        Ok(())
    }

    /// The host socket for a guest-initiated connection is connected: RESPONSE is owed.
    pub fn host_connected(&mut self) {
        if self.state == State::HostConnecting {
            self.state = State::Established;
            self.owed.response = true;
        }
    }

    /// `len` bytes of guest data (an RW packet): refused beyond the credit the guest was
    /// given, after its SHUTDOWN_SEND, or before the connection is up.
    pub fn guest_data(&mut self, payload: &[u8]) -> Result<(), Violation> {
        if self.state != State::Established {
            return Err(self.unexpected(Op::Rw));
        }
        if self.guest_shut & SHUTDOWN_SEND != 0 {
            return Err(Violation::DataAfterShutdown);
        }
        // At most MAX_PAYLOAD, checked by the packet parser.
        let len = payload.len() as u32;
        let free = self.host_free();
        if len > free {
            return Err(Violation::CreditOverrun { len, free });
        }
        self.host_bound.extend(payload);
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        Ok(())
    }

    /// The guest's SHUTDOWN with `flags`. SHUTDOWN_RCV drops what waits for the guest
    /// and stops reading the host stream.
    pub fn guest_shutdown(&mut self, flags: u32) -> Result<(), Violation> {
        if self.state != State::Established {
            return Err(self.unexpected(Op::Shutdown));
        }
        self.guest_shut |= flags;
        if flags & SHUTDOWN_RCV != 0 {
            self.to_guest.clear();
            self.owed.shutdown = false;
        }
        self.check_finished();
        Ok(())
    }

    /// The guest asked for our credit.
    pub fn credit_requested(&mut self) {
        self.owed.credit_update = true;
    }

    fn unexpected(&self, op: Op) -> Violation {
        Violation::UnexpectedOp {
            op,
            state: self.state,
        }
    }

    /// The guest bytes the host stream should take next (the front of the buffer).
    pub fn host_bound(&self) -> &[u8] {
        self.host_bound.as_slices().0
    }

    /// Whether guest bytes wait for the host stream.
    pub fn has_host_bound(&self) -> bool {
        !self.host_bound.is_empty()
    }

    /// Bytes waiting for the host stream.
    pub fn host_bound_len(&self) -> usize {
        self.host_bound.len()
    }

    /// The host stream took `n` bytes of [`Connection::host_bound`]. Returns whether the
    /// host stream's write side should now be shut (the guest sends no more).
    pub fn host_consumed(&mut self, n: usize) -> bool {
        let n = n.min(self.host_bound.len());
        self.host_bound.drain(..n);
        let reply = n.min(self.reply_len);
        self.reply_len -= reply;
        // At most HOST_BUF_ALLOC plus the reply line.
        self.fwd_cnt = self.fwd_cnt.wrapping_add((n - reply) as u32);
        let guest_view_free =
            HOST_BUF_ALLOC.saturating_sub(self.rx_cnt.wrapping_sub(self.sent_fwd_cnt));
        let freed_unannounced = self.fwd_cnt.wrapping_sub(self.sent_fwd_cnt);
        if guest_view_free < CREDIT_LOW && freed_unannounced >= CREDIT_LOW {
            self.owed.credit_update = true;
        }
        self.check_finished();
        self.should_shut_host_write()
    }

    fn should_shut_host_write(&mut self) -> bool {
        if self.guest_shut & SHUTDOWN_SEND != 0
            && self.host_bound.is_empty()
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            return true;
        }
        false
    }

    /// How many host bytes the connection takes now: bounded by its buffer, and once up
    /// by the guest's credit; none once the host stream ended or the guest receives no
    /// more.
    pub fn read_budget(&self) -> usize {
        if self.host_eof || self.guest_shut & SHUTDOWN_RCV != 0 || self.owed.rst {
            return 0;
        }
        let room = TO_GUEST_CAP.saturating_sub(self.to_guest.len());
        match self.state {
            State::HostConnecting => 0,
            State::GuestAccepting { .. } => room,
            State::Established => {
                let credit = (self.peer_free() as usize).saturating_sub(self.to_guest.len());
                room.min(credit)
            }
        }
    }

    /// Host bytes for the guest; returns how many were taken (at most
    /// [`Connection::read_budget`], which callers read no more than).
    pub fn host_data(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.read_budget());
        self.to_guest.extend(&bytes[..n]);
        n
    }

    /// Host bytes waiting for the guest.
    pub fn to_guest_len(&self) -> usize {
        self.to_guest.len()
    }

    /// The host stream ended: SHUTDOWN_SEND is owed once the buffered bytes are out.
    pub fn host_ended(&mut self) {
        if !self.host_eof {
            self.host_eof = true;
            if self.guest_shut & SHUTDOWN_RCV == 0 {
                self.owed.shutdown = true;
            }
            self.check_finished();
        }
    }

    /// Both directions are done (the guest sends nothing more and everything it sent was
    /// written; the host sends nothing more or the guest takes nothing more): the final
    /// RST is owed, after which the connection is gone.
    fn check_finished(&mut self) {
        let guest_done = self.guest_shut & SHUTDOWN_SEND != 0 && self.host_bound.is_empty();
        let host_done = self.sent_shutdown || self.guest_shut & SHUTDOWN_RCV != 0;
        if guest_done && host_done {
            self.owed.rst = true;
        }
    }

    /// Whether the guest has heard of this connection (sent or was sent its REQUEST):
    /// only then does a reset owe it an RST.
    pub fn guest_knows(&self) -> bool {
        !(matches!(self.state, State::GuestAccepting { .. }) && self.owed.request)
    }

    /// Whether the connection is being reset (its final RST is owed).
    pub fn is_resetting(&self) -> bool {
        self.owed.rst
    }

    /// Owes the final RST now (a reset of this connection).
    pub fn reset(&mut self) {
        self.owed.rst = true;
        self.to_guest.clear();
        self.owed.shutdown = false;
    }

    /// Whether the connection has a packet for the guest now.
    pub fn has_packet(&self) -> bool {
        let o = &self.owed;
        o.request
            || o.response
            || o.rst
            || o.credit_update
            || (o.shutdown && self.to_guest.is_empty())
            || (self.state == State::Established
                && !self.to_guest.is_empty()
                && self.peer_free() > 0)
    }

    /// The next packet for the guest, its payload (at most `max_payload` bytes) appended
    /// to `payload`. Order: REQUEST or RESPONSE, data, SHUTDOWN, CREDIT_UPDATE, the final
    /// RST; every packet carries the current credit. `None` when nothing is owed.
    pub fn next_packet(&mut self, max_payload: usize, payload: &mut Vec<u8>) -> Option<Header> {
        let peer_free = self.peer_free();
        let o = &mut self.owed;
        let (op, flags) = if o.rst {
            // Whatever else was owed no longer matters.
            *o = Owed::default();
            o.rst = true;
            (Op::Rst, 0)
        } else if o.request {
            o.request = false;
            (Op::Request, 0)
        } else if o.response {
            o.response = false;
            (Op::Response, 0)
        } else if self.state == State::Established
            && !self.to_guest.is_empty()
            && peer_free > 0
            && max_payload > 0
        {
            let n = self.to_guest.len().min(max_payload).min(peer_free as usize);
            payload.extend(self.to_guest.drain(..n));
            // n ≤ peer_free, a u32.
            self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
            (Op::Rw, 0)
        } else if o.shutdown && self.to_guest.is_empty() {
            o.shutdown = false;
            self.sent_shutdown = true;
            (Op::Shutdown, SHUTDOWN_SEND)
        } else if o.credit_update {
            (Op::CreditUpdate, 0)
        } else {
            return None;
        };
        self.owed.credit_update = false;
        self.sent_fwd_cnt = self.fwd_cnt;
        if op == Op::Shutdown {
            self.check_finished();
        }
        // At most max_payload ≤ MAX_PAYLOAD bytes.
        let len = payload.len() as u32;
        Some(self.header(op, flags, len))
    }

    /// A header from this end of the connection.
    pub fn header(&self, op: Op, flags: u32, len: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.host_port,
            dst_port: self.guest_port,
            len,
            type_: TYPE_STREAM,
            op: op as u16,
            flags,
            buf_alloc: HOST_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// The RESPONSE deadline of a host-initiated connection.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::GuestAccepting { deadline } => Some(deadline),
            _ => None,
        }
    }
}
