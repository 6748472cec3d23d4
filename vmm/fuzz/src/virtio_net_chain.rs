//! virtio-net descriptor chains (`vmm::devices::virtio::net::chain`): for any chain and guest
//! memory, the TX and RX checks give exactly the answer the rules give (every descriptor in
//! guest memory and in the queue's direction, TX length within the frame bounds, RX room for
//! the header; the first broken rule is the one reported), and accepted chains copy
//! correctly: gathering a TX chain and scattering it back leaves memory unchanged,
//! scattering into an RX chain writes what fits.
//!
//! Input: a descriptor count, that many 14-byte descriptors (address u64, length u32, flags
//! u16, little-endian), then the guest memory's contents.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::devices::virtio::net::chain::{
    gather, rx_segments, scatter, tx_segments, ChainError, Descriptor, Segment, MAX_FRAME_LEN,
    MIN_TX_LEN,
};
use vmm::devices::virtio::net::VNET_HDR_LEN;
use vmm::devices::virtio::GuestMemoryMmap;

const MEM_SIZE: u64 = 0x1_0000;
const MAX_DESCRIPTORS: usize = 16;
const DESCRIPTOR_BYTES: usize = 14;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// Mostly near guest memory so that the interesting (inside, at the edge) cases dominate;
/// the top bit keeps wild values reachable.
fn near_memory(raw: u64) -> u64 {
    if raw >> 63 == 1 {
        raw
    } else {
        raw % (MEM_SIZE + 0x100)
    }
}

fn descriptors(table: &[u8]) -> Vec<Descriptor> {
    table
        .chunks_exact(DESCRIPTOR_BYTES)
        .map(|d| {
            let addr = near_memory(u64::from_le_bytes(d[0..8].try_into().unwrap()));
            let raw_len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let len = if raw_len >> 31 == 1 {
                raw_len
            } else {
                near_memory(u64::from(raw_len)) as u32
            };
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            Descriptor::new(addr, len, flags, 0)
        })
        .collect()
}

/// The chain rules, stated directly: the answer a correct check gives.
fn expected(
    mem: &GuestMemoryMmap,
    chain: &[Descriptor],
    rx: bool,
) -> Result<(Vec<Segment>, u64), ChainError> {
    if chain.is_empty() {
        return Err(ChainError::Empty);
    }
    for d in chain {
        let writable = d.flags() & VIRTQ_DESC_F_WRITE != 0;
        match (rx, writable) {
            (false, true) => return Err(ChainError::WritableOnTx),
            (true, false) => return Err(ChainError::ReadableOnRx),
            _ => {}
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(ChainError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    let total: u64 = chain.iter().map(|d| u64::from(d.len())).sum();
    if rx && total < VNET_HDR_LEN as u64 {
        return Err(ChainError::NoRoomForHeader(total));
    }
    if !rx && total < MIN_TX_LEN {
        return Err(ChainError::TooShort(total));
    }
    if !rx && total > MAX_FRAME_LEN {
        return Err(ChainError::TooLong(total));
    }
    let segments = chain
        .iter()
        .filter(|d| d.len() > 0)
        .map(|d| Segment {
            addr: d.addr(),
            len: d.len(),
        })
        .collect();
    Ok((segments, total))
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut bytes = vec![0u8; MEM_SIZE as usize];
    mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

fn disjoint(segments: &[Segment]) -> bool {
    let mut ranges: Vec<(u64, u64)> = segments
        .iter()
        .map(|s| (s.addr.0, s.addr.0 + u64::from(s.len)))
        .collect();
    ranges.sort_unstable();
    ranges.windows(2).all(|w| w[0].1 <= w[1].0)
}

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count) % (MAX_DESCRIPTORS + 1);
    let Some((table, contents)) = rest.split_at_checked(count * DESCRIPTOR_BYTES) else {
        return;
    };
    let chain = descriptors(table);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let n = contents.len().min(MEM_SIZE as usize);
    mem.write_slice(&contents[..n], GuestAddress(0)).unwrap();

    let tx = tx_segments(&mem, chain.iter().copied());
    assert_eq!(tx, expected(&mem, &chain, false), "TX check of {chain:?}");
    if let Ok((segments, total)) = tx {
        let before = snapshot(&mem);
        let mut frame = vec![0u8; total as usize];
        gather(&mem, &segments, &mut frame).expect("gather a checked TX chain");
        let written = scatter(&mem, &segments, &frame).expect("scatter back a gathered TX chain");
        assert_eq!(written, frame.len());
        assert!(
            snapshot(&mem) == before,
            "gather then scatter changed memory"
        );
    }

    let rx = rx_segments(&mem, chain.iter().copied());
    assert_eq!(rx, expected(&mem, &chain, true), "RX check of {chain:?}");
    if let Ok((segments, room)) = rx {
        let frame = &contents[..contents.len().min(room as usize)];
        let written = scatter(&mem, &segments, frame).expect("scatter into a checked RX chain");
        assert_eq!(written, frame.len());
        if disjoint(&segments) {
            let mut back = vec![0u8; room as usize];
            gather(&mem, &segments, &mut back).unwrap();
            assert_eq!(&back[..written], frame);
        }
    }
}
