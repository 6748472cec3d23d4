//! Checking of virtio-net descriptor chains: a TX chain becomes the guest memory holding
//! one outgoing frame, an RX chain the guest memory that can receive one.
//!
//! Pure over guest memory, so every rule a guest can break is checked in one place:
//! descriptors inside guest memory, in the right direction, and lengths within bounds.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

/// The split-ring descriptor type chains are made of.
pub use virtio_queue::desc::split::Descriptor;

use super::tap::VNET_HDR_LEN;

/// Length of an Ethernet header (destination, source, EtherType).
pub const ETH_HLEN: usize = 14;
/// Shortest frame accepted in either direction: the virtio-net and Ethernet headers.
pub const MIN_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HLEN;
/// Shortest acceptable TX chain.
pub const MIN_TX_LEN: u64 = MIN_FRAME_LEN as u64;
/// Longest acceptable TX chain: the header and a 65550-byte frame (64 KiB of payload
/// plus Ethernet and VLAN headers), as Linux and Firecracker bound it.
pub const MAX_FRAME_LEN: u64 = 65562;

/// A contiguous piece of guest memory holding (TX) or receiving (RX) frame bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The chain had no descriptors.
    #[error("empty descriptor chain")]
    Empty,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A TX chain holds a device-writable descriptor.
    #[error("device-writable descriptor in a TX chain")]
    WritableOnTx,
    /// An RX chain holds a device-readable descriptor.
    #[error("device-readable descriptor in an RX chain")]
    ReadableOnRx,
    /// A TX chain is too short for the virtio-net and Ethernet headers.
    #[error("TX chain of {0} bytes, at least {MIN_TX_LEN} needed")]
    TooShort(u64),
    /// A TX chain is longer than the largest frame.
    #[error("TX chain of {0} bytes, at most {MAX_FRAME_LEN} allowed")]
    TooLong(u64),
    /// An RX chain cannot hold even the virtio-net header.
    #[error("RX chain of {0} bytes cannot hold the {VNET_HDR_LEN}-byte header")]
    NoRoomForHeader(u64),
}

/// Checks a TX chain; returns its segments and their total length (header included).
pub fn tx_segments<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let (segments, len) = segments(mem, descriptors, false)?;
    if len < MIN_TX_LEN {
        return Err(ChainError::TooShort(len));
    }
    if len > MAX_FRAME_LEN {
        return Err(ChainError::TooLong(len));
    }
    Ok((segments, len))
}

/// Checks an RX chain; returns its segments and how many bytes they can hold.
pub fn rx_segments<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let (segments, len) = segments(mem, descriptors, true)?;
    if len < VNET_HDR_LEN as u64 {
        return Err(ChainError::NoRoomForHeader(len));
    }
    Ok((segments, len))
}

fn segments<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
    writable: bool,
) -> Result<(Vec<Segment>, u64), ChainError> {
    let mut segments = Vec::new();
    let mut total = 0u64;
    let mut any = false;
    for desc in descriptors {
        any = true;
        if desc.is_write_only() != writable {
            return Err(if writable {
                ChainError::ReadableOnRx
            } else {
                ChainError::WritableOnTx
            });
        }
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if !mem.check_range(segment.addr, segment.len as usize) {
            return Err(ChainError::OutsideMemory {
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        }
        // At most queue-size descriptors of u32 lengths: no overflow.
        total += u64::from(segment.len);
        if segment.len > 0 {
            segments.push(segment);
        }
    }
    if !any {
        return Err(ChainError::Empty);
    }
    Ok((segments, total))
}

/// Copies `segments` (already checked against `mem`) into `buf`, which must hold their
/// total length.
pub fn gather<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segments: &[Segment],
    buf: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut filled = 0;
    for s in segments {
        let end = filled + s.len as usize;
        mem.read_slice(&mut buf[filled..end], s.addr)?;
        filled = end;
    }
    Ok(())
}

/// Copies `data` into `segments` (already checked against `mem`), which must hold it;
/// returns the number of bytes written.
pub fn scatter<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segments: &[Segment],
    data: &[u8],
) -> Result<usize, vm_memory::GuestMemoryError> {
    let mut written = 0;
    for s in segments {
        if written == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - written);
        mem.write_slice(&data[written..written + n], s.addr)?;
        written += n;
    }
    Ok(written)
}
