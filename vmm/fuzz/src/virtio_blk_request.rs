//! virtio-blk request parsing must never panic on any descriptor chain or guest memory
//! contents, and whatever it accepts must lie inside guest memory and the disk.

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::block::request::{
    parse_request, Descriptor, DiskProperties, RequestType, SECTOR_SIZE,
};
use vmm::devices::virtio::GuestMemoryMmap;

const MEM_SIZE: u64 = 0x1_0000;
const MAX_DESCRIPTORS: usize = 16;
const DESCRIPTOR_BYTES: usize = 14;

/// The target body: any input, no panic, and the oracle above.
pub fn run(data: &[u8]) {
    let Some((&[capacity, flags, count], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let disk = DiskProperties {
        capacity: u64::from(capacity),
        read_only: flags & 1 != 0,
    };
    let count = usize::from(count) % (MAX_DESCRIPTORS + 1);
    let Some((table, memory_bytes)) = rest.split_at_checked(count * DESCRIPTOR_BYTES) else {
        return;
    };
    let descriptors: Vec<Descriptor> = table
        .chunks_exact(DESCRIPTOR_BYTES)
        .map(|d| {
            let raw_addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            // Mostly near guest memory so that the interesting (in/at the edge) cases
            // dominate; the top bit keeps wild addresses reachable.
            let addr = if raw_addr >> 63 == 1 {
                raw_addr
            } else {
                raw_addr % (MEM_SIZE + 0x100)
            };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();

    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
    let n = memory_bytes.len().min(MEM_SIZE as usize);
    mem.write_slice(&memory_bytes[..n], GuestAddress(0))
        .unwrap();

    match parse_request(&mem, descriptors, disk) {
        Ok(req) => {
            assert!(
                mem.read_obj::<u8>(req.status).is_ok(),
                "status outside memory"
            );
            let mut total = 0u64;
            for s in &req.data {
                let end = s
                    .addr
                    .0
                    .checked_add(u64::from(s.len))
                    .expect("segment wraps");
                assert!(end <= MEM_SIZE, "segment outside memory");
                total += u64::from(s.len);
            }
            assert_eq!(total, req.data_len);
            match req.request_type {
                RequestType::In | RequestType::Out => {
                    assert_eq!(req.data_len % SECTOR_SIZE, 0);
                    assert!(req.sector + req.data_len / SECTOR_SIZE <= disk.capacity);
                    assert!(!(req.request_type == RequestType::Out && disk.read_only));
                }
                RequestType::GetId => assert!(req.data_len > 0),
                RequestType::Flush => {}
            }
        }
        Err(rejected) => {
            let _ = rejected.error.status_code();
            if let Some(status) = rejected.status {
                assert!(mem.read_obj::<u8>(status).is_ok(), "status outside memory");
            }
        }
    }
}
