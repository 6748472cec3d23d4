//! The virtio-vsock packet header (virtio 1.2 §5.10.6): 44 little-endian bytes in front of
//! every packet on the RX and TX queues. [`Header::decode`] reads the fields as they are;
//! [`Packet::parse`] checks every one of them and says what the packet asks for.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;
/// The host's CID (virtio 1.2 §5.10.4: 2 is the host).
pub const HOST_CID: u64 = 2;
/// Largest payload one packet may carry, in either direction (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a TX packet announcing more is refused.
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device offers.
pub const TYPE_STREAM: u16 = 1;

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_OP_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    Request = 1,
    Response = 2,
    Rst = 3,
    Shutdown = 4,
    Rw = 5,
    CreditUpdate = 6,
    CreditRequest = 7,
}

impl Op {
    fn from_u16(op: u16) -> Option<Self> {
        Some(match op {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Rst,
            4 => Self::Shutdown,
            5 => Self::Rw,
            6 => Self::CreditUpdate,
            7 => Self::CreditRequest,
            _ => return None,
        })
    }
}

/// `struct virtio_vsock_hdr`, field for field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The fields of `bytes`, unchecked.
    pub fn decode(bytes: &[u8; HDR_LEN]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap_or([0; 2]));
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The wire form.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a packet from the driver was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The descriptor chain is shorter than a header.
    #[error("packet of {0} bytes is shorter than its {HDR_LEN}-byte header")]
    Short(usize),
    /// `src_cid` is not the guest's CID (the guest cannot speak for another).
    #[error("source CID {got} is not the guest's ({expected})")]
    SrcCid { got: u64, expected: u64 },
    /// `dst_cid` is not the host.
    #[error("destination CID {0} is not the host")]
    DstCid(u64),
    /// A socket type other than stream.
    #[error("socket type {0} is not supported")]
    Type(u16),
    /// An operation the specification does not define.
    #[error("unknown operation {0}")]
    Op(u16),
    /// `len` above [`MAX_PAYLOAD`].
    #[error("payload length {0} exceeds {MAX_PAYLOAD}")]
    TooLong(u32),
    /// `len` is more than the descriptor chain holds after the header (CVE-2019-18960).
    #[error("payload length {len} exceeds the {available} bytes the descriptor chain holds")]
    BeyondChain { len: u32, available: u64 },
    /// A payload on an operation that has none.
    #[error("operation {op:?} carries {len} payload bytes")]
    UnexpectedPayload { op: Op, len: u32 },
    /// Flags other than SHUTDOWN_RCV / SHUTDOWN_SEND, or flags on another operation.
    #[error("operation {op:?} with flags {flags:#x}")]
    Flags { op: Op, flags: u32 },
}

/// A header whose every field was checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub hdr: Header,
    pub op: Op,
}

impl Packet {
    /// Checks a header the driver wrote, from guest `guest_cid`, with `available` bytes of
    /// chain after the header. The checks that fail before the CIDs are known to be right
    /// (short, wrong source) mean the packet is dropped; the others are answered with RST.
    pub fn parse(hdr: Header, guest_cid: u64, available: u64) -> Result<Self, PacketError> {
        if hdr.src_cid != guest_cid {
            return Err(PacketError::SrcCid {
                got: hdr.src_cid,
                expected: guest_cid,
            });
        }
        if hdr.dst_cid != HOST_CID {
            return Err(PacketError::DstCid(hdr.dst_cid));
        }
        if hdr.type_ != TYPE_STREAM {
            return Err(PacketError::Type(hdr.type_));
        }
        let op = Op::from_u16(hdr.op).ok_or(PacketError::Op(hdr.op))?;
        if hdr.len > MAX_PAYLOAD {
            return Err(PacketError::TooLong(hdr.len));
        }
        if u64::from(hdr.len) > available {
            return Err(PacketError::BeyondChain {
                len: hdr.len,
                available,
            });
        }
        if op != Op::Rw && hdr.len != 0 {
            return Err(PacketError::UnexpectedPayload { op, len: hdr.len });
        }
        let flags_ok = match op {
            Op::Shutdown => hdr.flags & !(SHUTDOWN_RCV | SHUTDOWN_SEND) == 0,
            _ => hdr.flags == 0,
        };
        if !flags_ok {
            return Err(PacketError::Flags {
                op,
                flags: hdr.flags,
            });
        }
        Ok(Self { hdr, op })
    }
}

impl PacketError {
    /// Whether the refused packet `hdr` is answered with RST. It is not for a short packet
    /// or a wrong source CID (an RST could not be addressed), nor for an RST itself (two
    /// ends answering each other's RSTs would never stop).
    pub fn answer_rst(&self, hdr: &Header) -> bool {
        hdr.op != Op::Rst as u16 && !matches!(self, Self::Short(_) | Self::SrcCid { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: u64 = 3;

    fn rw(len: u32) -> Header {
        Header {
            src_cid: GUEST,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: Op::Rw as u16,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_every_field_little_endian() {
        let hdr = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xa1a2_a3a4,
            dst_port: 0xb1b2_b3b4,
            len: 0xc1c2_c3c4,
            type_: 0xd1d2,
            op: 0xe1e2,
            flags: 0xf1f2_f3f4,
            buf_alloc: 0x1122_3344,
            fwd_cnt: 0x5566_7788,
        };

        let bytes = hdr.encode();

        assert_eq!(bytes[0], 0x08);
        assert_eq!(bytes[30..32], [0xe2, 0xe1]);
        assert_eq!(Header::decode(&bytes), hdr);
    }

    #[test]
    fn valid_rw_packet_parses() {
        let packet = Packet::parse(rw(10), GUEST, 10).unwrap();

        assert_eq!(packet.op, Op::Rw);
        assert_eq!(packet.hdr.len, 10);
    }

    #[test]
    fn len_beyond_the_chain_is_refused_with_rst() {
        let err = Packet::parse(rw(11), GUEST, 10).unwrap_err();

        assert_eq!(
            err,
            PacketError::BeyondChain {
                len: 11,
                available: 10
            }
        );
        assert!(err.answer_rst(&rw(11)));
    }

    #[test]
    fn a_malformed_rst_is_dropped_without_an_rst() {
        let mut hdr = rw(0);
        hdr.op = Op::Rst as u16;
        hdr.flags = 1;

        let err = Packet::parse(hdr, GUEST, 0).unwrap_err();

        assert!(matches!(err, PacketError::Flags { op: Op::Rst, .. }));
        assert!(!err.answer_rst(&hdr));
    }

    #[test]
    fn len_above_the_packet_limit_is_refused() {
        let err = Packet::parse(rw(MAX_PAYLOAD + 1), GUEST, u64::MAX).unwrap_err();

        assert_eq!(err, PacketError::TooLong(MAX_PAYLOAD + 1));
    }

    #[test]
    fn forged_source_cid_is_dropped_without_rst() {
        let mut hdr = rw(0);
        hdr.src_cid = 9;

        let err = Packet::parse(hdr, GUEST, 0).unwrap_err();

        assert!(matches!(err, PacketError::SrcCid { got: 9, .. }));
        assert!(!err.answer_rst(&hdr));
    }

    #[test]
    fn malformed_fields_are_each_refused() {
        type Breakage = fn(&mut Header);
        let cases: [(Breakage, PacketError); 6] = [
            (|h| h.dst_cid = 5, PacketError::DstCid(5)),
            (|h| h.type_ = 2, PacketError::Type(2)),
            (|h| h.op = 0, PacketError::Op(0)),
            (|h| h.op = 8, PacketError::Op(8)),
            (
                |h| {
                    h.op = Op::Request as u16;
                    h.len = 1;
                },
                PacketError::UnexpectedPayload {
                    op: Op::Request,
                    len: 1,
                },
            ),
            (
                |h| {
                    h.op = Op::Shutdown as u16;
                    h.flags = 4;
                },
                PacketError::Flags {
                    op: Op::Shutdown,
                    flags: 4,
                },
            ),
        ];
        for (break_it, expected) in cases {
            let mut hdr = rw(0);
            break_it(&mut hdr);

            let err = Packet::parse(hdr, GUEST, 100).unwrap_err();

            assert_eq!(err, expected);
            assert!(err.answer_rst(&hdr));
        }
    }

    #[test]
    fn shutdown_accepts_both_flags() {
        let mut hdr = rw(0);
        hdr.op = Op::Shutdown as u16;
        hdr.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;

        assert_eq!(Packet::parse(hdr, GUEST, 0).unwrap().op, Op::Shutdown);
    }
}
