//! The virtio-gpu request decoder must never panic, and whatever it accepts must survive the
//! device's own checks without panicking either.
//!
//! Input: first decoded as one request, then as a sequence of requests each prefixed by a
//! little-endian u16 length. `seeds/gpu_decoder` holds valid sequences to start from.

use std::sync::OnceLock;

use vm_memory::GuestAddress;
use vmm::devices::virtio::gpu::decoder;
use vmm::devices::virtio::gpu::{GpuConfig, GpuState};
use vmm::devices::virtio::GuestMemoryMmap;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

/// The target body: any input, no panic, and the oracle above.
pub fn run(data: &[u8]) {
    match decoder::decode(data) {
        Ok(request) => {
            let header = decoder::decode_header(data).expect("decode accepted the header");
            assert_eq!(header, request.header);
        }
        Err(err) => {
            let _ = err.response_type();
        }
    }
    // Then run the input as a sequence of requests, each prefixed by a little-endian u16
    // length, through a small device so that accepted commands also reach the resource,
    // backing and transfer code.
    let mut state = GpuState::new(GpuConfig {
        max_resources: 16,
        max_host_memory: 4 << 20,
        ..GpuConfig::with_size(64, 64)
    })
    .expect("device state");
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let take = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (request, tail) = tail.split_at(take);
        let out = state.process_request(memory(), request);
        assert!(out.len() >= decoder::HEADER_LEN);
        rest = tail;
    }
}
