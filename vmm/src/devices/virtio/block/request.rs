//! Parsing of virtio-blk requests: a descriptor chain becomes a typed [`Request`] or a
//! [`RejectedRequest`] saying why and where (if anywhere) the error status goes.
//!
//! Pure over guest memory: nothing here touches the disk, so the rules a guest can
//! break are checked in one place and fuzzed (`vmm/fuzz`, target `virtio_blk_request`).
//!
//! Layout rules (virtio 1.2, 5.2.6): device-readable descriptors come first and hold
//! the 16-byte header, then for OUT the data; device-writable descriptors follow and hold,
//! for IN and GET_ID, the data, and in their last byte the status. Any split of these
//! bytes over descriptors is accepted (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

/// The split-ring descriptor type requests are parsed from (re-exported for fuzzing).
pub use virtio_queue::desc::split::Descriptor;

/// Bytes per sector in virtio-blk addressing.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the request header (type, reserved, sector).
pub const HEADER_LEN: usize = 16;
/// Length of the device ID string answered to GET_ID.
pub const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// `struct virtio_blk_outhdr`.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
struct RequestHeader {
    request_type: u32,
    _reserved: u32,
    sector: u64,
}

// SAFETY: `RequestHeader` is `repr(C)`, made of plain integers with no padding (4+4+8),
// so every byte pattern is a valid value.
unsafe impl ByteValued for RequestHeader {}

/// A contiguous piece of guest memory a request reads or writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into guest memory.
    In,
    /// Write sectors from guest memory.
    Out,
    /// Make previous writes durable.
    Flush,
    /// Return the device ID string.
    GetId,
}

/// A well-formed request, checked against the disk's size and mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub request_type: RequestType,
    /// First sector (IN and OUT only; 0 otherwise).
    pub sector: u64,
    /// Guest buffers holding (OUT) or receiving (IN, GET_ID) the data, in order.
    pub data: Vec<Segment>,
    /// Total length of `data`.
    pub data_len: u64,
    /// Where the one-byte status goes.
    pub status: GuestAddress,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain had no descriptors.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// There is no device-writable byte for the status.
    #[error("no device-writable status byte")]
    NoStatus,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is {0} bytes, 16 needed")]
    HeaderTooShort(u64),
    /// Data in the wrong direction for the request type (e.g. readable data for IN).
    #[error("{0:?} request with data buffers in the wrong direction")]
    WrongDirection(RequestType),
    /// IN/OUT data is not a whole number of sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// The request reaches past the end of the disk.
    #[error("sectors {sector}..+{sectors} beyond capacity {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
        /// Disk size in sectors.
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// GET_ID with no buffer for the ID.
    #[error("GET_ID without a data buffer")]
    NoIdBuffer,
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

impl RequestError {
    /// The virtio-blk status answering this error.
    pub fn status_code(&self) -> u8 {
        match self {
            RequestError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A request refused by the parser.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedRequest {
    /// Why.
    pub error: RequestError,
    /// Where to write the error status, when the chain has a usable status byte.
    pub status: Option<GuestAddress>,
}

/// The disk properties requests are checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskProperties {
    /// Size in sectors.
    pub capacity: u64,
    /// Whether writes are refused.
    pub read_only: bool,
}

/// Parses the descriptors of one chain (in chain order) into a request.
pub fn parse_request<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
    disk: DiskProperties,
) -> Result<Request, RejectedRequest> {
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut any = false;
    let mut order_error = None;
    let mut memory_error = None;
    for desc in descriptors {
        any = true;
        let segment = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if memory_error.is_none() && !mem.check_range(segment.addr, segment.len as usize) {
            memory_error = Some(RequestError::OutsideMemory {
                addr: segment.addr.raw_value(),
                len: segment.len,
            });
        }
        if desc.is_write_only() {
            writable.push(segment);
        } else {
            if !writable.is_empty() {
                order_error.get_or_insert(RequestError::ReadableAfterWritable);
            }
            readable.push(segment);
        }
    }
    if !any {
        return Err(RejectedRequest {
            error: RequestError::EmptyChain,
            status: None,
        });
    }

    // The status byte is the last writable byte; only if it is in guest memory can we
    // report anything.
    let status = writable
        .iter()
        .rev()
        .find(|s| s.len > 0)
        .and_then(|s| s.addr.checked_add(u64::from(s.len) - 1))
        .filter(|&addr| mem.check_range(addr, 1));
    let reject = |error| RejectedRequest { error, status };
    let Some(status_addr) = status else {
        return Err(reject(RequestError::NoStatus));
    };
    if let Some(e) = memory_error.or(order_error) {
        return Err(reject(e));
    }

    let (header_segments, out_data) = split_segments(&readable, HEADER_LEN as u64);
    let header_len = total_len(&header_segments);
    if header_len < HEADER_LEN as u64 {
        return Err(reject(RequestError::HeaderTooShort(total_len(&readable))));
    }
    let header = read_header(mem, &header_segments).map_err(|_| {
        reject(RequestError::OutsideMemory {
            addr: header_segments[0].addr.raw_value(),
            len: header_segments[0].len,
        })
    })?;
    let writable_len = total_len(&writable);
    let (in_data, _status_byte) = split_segments(&writable, writable_len - 1);

    let (request_type, data) = match header.request_type {
        VIRTIO_BLK_T_IN => (RequestType::In, in_data),
        VIRTIO_BLK_T_OUT => (RequestType::Out, out_data.clone()),
        VIRTIO_BLK_T_FLUSH => (RequestType::Flush, Vec::new()),
        VIRTIO_BLK_T_GET_ID => (RequestType::GetId, in_data),
        other => return Err(reject(RequestError::Unsupported(other))),
    };
    let data_len = total_len(&data);
    let readable_data = total_len(&out_data) > 0;
    let writable_data = writable_len > 1;

    let sector = match request_type {
        RequestType::In | RequestType::Out => {
            let wrong_direction = match request_type {
                RequestType::In => readable_data,
                _ => writable_data,
            };
            if wrong_direction {
                return Err(reject(RequestError::WrongDirection(request_type)));
            }
            if request_type == RequestType::Out && disk.read_only {
                return Err(reject(RequestError::ReadOnly));
            }
            if data_len % SECTOR_SIZE != 0 {
                return Err(reject(RequestError::UnalignedLength(data_len)));
            }
            let sectors = data_len / SECTOR_SIZE;
            let in_range = header
                .sector
                .checked_add(sectors)
                .is_some_and(|end| end <= disk.capacity);
            if !in_range {
                return Err(reject(RequestError::OutOfRange {
                    sector: header.sector,
                    sectors,
                    capacity: disk.capacity,
                }));
            }
            header.sector
        }
        RequestType::GetId => {
            if readable_data {
                return Err(reject(RequestError::WrongDirection(request_type)));
            }
            if data_len == 0 {
                return Err(reject(RequestError::NoIdBuffer));
            }
            0
        }
        RequestType::Flush => 0,
    };

    Ok(Request {
        request_type,
        sector,
        data,
        data_len,
        status: status_addr,
    })
}

fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segments` after `at` bytes (or at their end when shorter), dropping empty pieces.
/// The segments must lie in guest memory (checked by the caller), so no address wraps.
fn split_segments(segments: &[Segment], at: u64) -> (Vec<Segment>, Vec<Segment>) {
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut left = at;
    for s in segments {
        let len = u64::from(s.len);
        let take = left.min(len);
        left -= take;
        if take > 0 {
            head.push(Segment {
                addr: s.addr,
                len: take as u32,
            });
        }
        if take < len {
            tail.push(Segment {
                addr: s.addr.unchecked_add(take),
                len: (len - take) as u32,
            });
        }
    }
    (head, tail)
}

fn read_header<M: GuestMemoryBackend + ?Sized>(
    mem: &M,
    segments: &[Segment],
) -> Result<RequestHeader, vm_memory::GuestMemoryError> {
    let mut header = RequestHeader::default();
    let bytes = header.as_mut_slice();
    let mut filled = 0;
    for s in segments {
        let end = filled + s.len as usize;
        mem.read_slice(&mut bytes[filled..end], s.addr)?;
        filled = end;
    }
    // The header's integers are little-endian on the wire.
    Ok(RequestHeader {
        request_type: u32::from_le(header.request_type),
        _reserved: 0,
        sector: u64::from_le(header.sector),
    })
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;

    use super::*;
    use crate::devices::virtio::GuestMemoryMmap;

    const MEM_SIZE: usize = 0x10000;
    const DISK: DiskProperties = DiskProperties {
        capacity: 8,
        read_only: false,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn w(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    #[test]
    fn read_request_in_three_descriptors_parses() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 2);

        let req = parse_request(&mem, [r(0x100, 16), w(0x1000, 1024), w(0x2000, 1)], DISK).unwrap();

        assert_eq!(req.request_type, RequestType::In);
        assert_eq!(req.sector, 2);
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 1024
            }]
        );
        assert_eq!(req.data_len, 1024);
        assert_eq!(req.status, GuestAddress(0x2000));
    }

    #[test]
    fn header_data_and_status_may_share_descriptors() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_OUT, 1);

        let req = parse_request(&mem, [r(0x100, 16 + 512), w(0x2000, 1)], DISK).unwrap();
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x110),
                len: 512
            }]
        );

        header(&mem, 0x100, VIRTIO_BLK_T_IN, 1);
        let req = parse_request(&mem, [r(0x100, 8), r(0x108, 8), w(0x1000, 513)], DISK).unwrap();
        assert_eq!(
            req.data,
            vec![Segment {
                addr: GuestAddress(0x1000),
                len: 512
            }]
        );
        assert_eq!(req.status, GuestAddress(0x1200));
    }

    fn error(
        mem: &GuestMemoryMmap,
        descs: Vec<Descriptor>,
        disk: DiskProperties,
    ) -> RejectedRequest {
        parse_request(mem, descs, disk).unwrap_err()
    }

    #[test]
    fn short_header_is_an_io_error_reported_in_the_status() {
        let mem = mem();
        let rej = error(&mem, vec![r(0x100, 8), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::HeaderTooShort(8));
        assert_eq!(rej.status, Some(GuestAddress(0x2000)));
        assert_eq!(rej.error.status_code(), VIRTIO_BLK_S_IOERR as u8);
    }

    #[test]
    fn chain_without_writable_status_cannot_be_answered() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_FLUSH, 0);
        let rej = error(&mem, vec![r(0x100, 16), r(0x2000, 1)], DISK);
        assert_eq!(
            rej,
            RejectedRequest {
                error: RequestError::NoStatus,
                status: None
            }
        );
        let rej = error(&mem, vec![], DISK);
        assert_eq!(rej.error, RequestError::EmptyChain);
    }

    #[test]
    fn readable_after_writable_is_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_OUT, 0);
        let rej = error(
            &mem,
            vec![r(0x100, 16), w(0x1000, 512), r(0x1200, 512), w(0x2000, 1)],
            DISK,
        );
        assert_eq!(rej.error, RequestError::ReadableAfterWritable);
    }

    #[test]
    fn data_in_the_wrong_direction_is_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 0);
        let rej = error(&mem, vec![r(0x100, 16), r(0x1000, 512), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::WrongDirection(RequestType::In));

        header(&mem, 0x100, VIRTIO_BLK_T_OUT, 0);
        let rej = error(&mem, vec![r(0x100, 16), w(0x1000, 512), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::WrongDirection(RequestType::Out));
    }

    #[test]
    fn requests_past_the_end_of_the_disk_are_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 7);
        let rej = error(
            &mem,
            vec![r(0x100, 16), w(0x1000, 1024), w(0x2000, 1)],
            DISK,
        );
        assert_eq!(
            rej.error,
            RequestError::OutOfRange {
                sector: 7,
                sectors: 2,
                capacity: 8
            }
        );

        header(&mem, 0x100, VIRTIO_BLK_T_IN, u64::MAX);
        let rej = error(&mem, vec![r(0x100, 16), w(0x1000, 512), w(0x2000, 1)], DISK);
        assert!(matches!(rej.error, RequestError::OutOfRange { .. }));

        // The last sector exactly is fine.
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 7);
        assert!(parse_request(&mem, [r(0x100, 16), w(0x1000, 512), w(0x2000, 1)], DISK).is_ok());
    }

    #[test]
    fn partial_sectors_are_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 0);
        let rej = error(&mem, vec![r(0x100, 16), w(0x1000, 100), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::UnalignedLength(100));
    }

    #[test]
    fn writes_to_read_only_disks_are_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_OUT, 0);
        let disk = DiskProperties {
            read_only: true,
            ..DISK
        };
        let rej = error(&mem, vec![r(0x100, 16), r(0x1000, 512), w(0x2000, 1)], disk);
        assert_eq!(rej.error, RequestError::ReadOnly);
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let mem = mem();
        header(&mem, 0x100, 11, 0);
        let rej = error(&mem, vec![r(0x100, 16), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::Unsupported(11));
        assert_eq!(rej.error.status_code(), VIRTIO_BLK_S_UNSUPP as u8);
    }

    #[test]
    fn descriptors_outside_memory_are_refused() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_IN, 0);
        let rej = error(
            &mem,
            vec![r(0x100, 16), w(MEM_SIZE as u64 - 256, 512), w(0x2000, 1)],
            DISK,
        );
        assert!(matches!(rej.error, RequestError::OutsideMemory { .. }));
        assert_eq!(rej.status, Some(GuestAddress(0x2000)));

        let rej = error(&mem, vec![r(0x100, 16), w(MEM_SIZE as u64, 1)], DISK);
        assert_eq!(rej.status, None);
    }

    #[test]
    fn descriptors_wrapping_the_address_space_are_refused() {
        let mem = mem();
        let rej = error(&mem, vec![r(0x100, 16), w(u64::MAX - 4, 16)], DISK);
        assert_eq!(rej.status, None);
        let rej = error(&mem, vec![r(u64::MAX, 16), w(0x2000, 1)], DISK);
        assert!(matches!(rej.error, RequestError::OutsideMemory { .. }));
    }

    #[test]
    fn get_id_needs_a_writable_buffer() {
        let mem = mem();
        header(&mem, 0x100, VIRTIO_BLK_T_GET_ID, 0);
        let rej = error(&mem, vec![r(0x100, 16), w(0x2000, 1)], DISK);
        assert_eq!(rej.error, RequestError::NoIdBuffer);
        let req = parse_request(&mem, [r(0x100, 16), w(0x1000, 20), w(0x2000, 1)], DISK).unwrap();
        assert_eq!(req.request_type, RequestType::GetId);
        assert_eq!(req.data_len, 20);
    }
}
