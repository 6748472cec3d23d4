//! virtio-input (`vmm::devices::virtio::input`) driven by a hostile driver: config-space
//! reads always describe exactly the profile's answer to the selected query (size at most
//! 128, payload, zeros after it; nothing written past the 136-byte space), injected batches
//! are accepted only when every event is one the device can produce, and the event and
//! status queues, over descriptor tables and rings the guest rewrites at will, only ever
//! return used buffers the ring can hold, of 8 bytes (an event) or 0 (status, or too small),
//! with the delivered count matching the 8-byte ones. A driver whose writable buffers overlap
//! its own used ring overwrites what the device put there; such runs are only run, not read.
//!
//! Input: a profile byte (keyboard, tablet, touch), a queue-size byte, then operations:
//! config write, config read, guest memory write, inject, run event queue, run status queue.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::devices::virtio::input::{Input, InputProfile};
use vmm::devices::virtio::{GuestMemoryMmap, InterruptKind, InterruptTrigger, VirtioDevice};
use vmm::rpc::InputEvent;

const MEM_SIZE: usize = 0x1_0000;
const CONFIG_LEN: usize = 136;
/// Descriptor table, available ring and used ring of the event and status queues.
const RINGS: [(u32, u32, u32); 2] = [(0x0, 0x400, 0x800), (0x1000, 0x1400, 0x1800)];

struct NoInterrupt;

impl InterruptTrigger for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }

    fn set_needs_reset(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fn profile(selector: u8) -> InputProfile {
    match selector % 3 {
        0 => InputProfile::keyboard(),
        1 => InputProfile::tablet(),
        _ => InputProfile::touch(),
    }
}

fn used_idx(mem: &GuestMemoryMmap, queue: usize) -> u16 {
    mem.read_obj(GuestAddress(u64::from(RINGS[queue].2) + 2))
        .unwrap()
}

/// The used elements the device added in one run of `queue`: (id, len). `device_idx` is the
/// used index the device last published (it counts on from there); `before` is what the ring
/// held just before the run, which differs from it when the guest rewrote the used index
/// itself. The device publishes its own index whenever it adds elements, so a ring still
/// holding `before` had nothing added.
fn used_since(
    mem: &GuestMemoryMmap,
    queue: usize,
    device_idx: &mut u16,
    before: u16,
    size: u16,
) -> Vec<(u32, u32)> {
    let after = used_idx(mem, queue);
    if after == before {
        return Vec::new();
    }
    let start = *device_idx;
    *device_idx = after;
    let added = after.wrapping_sub(start);
    assert!(added <= size, "{added} used buffers in a queue of {size}");
    (0..added)
        .map(|i| {
            let slot = u64::from(start.wrapping_add(i) % size);
            let at = u64::from(RINGS[queue].2) + 4 + slot * 8;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect()
}

/// Whether a descriptor of `queue`'s table lets the device write into the queue's own used
/// ring: then the device's events land on the used elements it wrote, and what the ring
/// says afterwards is the guest's garbage, not the device's answer.
fn writes_alias_used_ring(mem: &GuestMemoryMmap, queue: usize, size: u16) -> bool {
    const VIRTQ_DESC_F_WRITE: u16 = 2;
    let (desc, _, used) = RINGS[queue];
    let ring = u64::from(used)..u64::from(used) + 6 + 8 * u64::from(size);
    (0..u64::from(size)).any(|i| {
        let at = u64::from(desc) + i * 16;
        let addr: u64 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let flags: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        let end = addr.saturating_add(u64::from(len));
        flags & VIRTQ_DESC_F_WRITE != 0 && addr < ring.end && end > ring.start
    })
}

fn check_config(dev: &Input, profile: &InputProfile) {
    let mut config = [0u8; CONFIG_LEN];
    dev.read_config(0, &mut config);
    let size = usize::from(config[2]);
    assert!(size <= CONFIG_LEN - 8);
    assert_eq!(
        &config[8..8 + size],
        &profile.config_payload(config[0], config[1])[..]
    );
    assert!(config[8 + size..].iter().all(|&b| b == 0));
}

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let [selector, size_byte, ops @ ..] = data else {
        return;
    };
    let profile = profile(*selector);
    let size = 1u16 << (size_byte % 7);
    let mut dev = Input::new(profile.clone()).expect("input device");
    let handle = dev.handle();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let queues = RINGS
        .iter()
        .map(|&(desc, avail, used)| {
            let mut q = Queue::new(64).unwrap();
            q.set_size(size);
            q.set_desc_table_address(Some(desc), Some(0));
            q.set_avail_ring_address(Some(avail), Some(0));
            q.set_used_ring_address(Some(used), Some(0));
            q.set_ready(true);
            q
        })
        .collect();
    dev.activate(mem.clone(), Arc::new(NoInterrupt), queues)
        .expect("activate");

    // The used index each queue's device last published.
    let mut device_idx = [0u16; 2];
    let mut rest = ops;
    while let [op, tail @ ..] = rest {
        rest = tail;
        match op % 6 {
            0 => {
                let [offset, value, tail @ ..] = rest else {
                    return;
                };
                dev.write_config(u64::from(*offset), &[*value]);
                check_config(&dev, &profile);
                rest = tail;
            }
            1 => {
                let [offset, len, tail @ ..] = rest else {
                    return;
                };
                let mut buf = vec![0xaau8; usize::from(len % 16) + 1];
                dev.read_config(u64::from(*offset), &mut buf);
                if usize::from(*offset) >= CONFIG_LEN {
                    assert!(buf.iter().all(|&b| b == 0xaa), "read past the config space");
                }
                rest = tail;
            }
            2 => {
                let [lo, hi, len, tail @ ..] = rest else {
                    return;
                };
                let at = usize::from(u16::from_le_bytes([*lo, *hi]));
                let n = usize::from(*len).min(tail.len()).min(MEM_SIZE - at);
                mem.write_slice(&tail[..n], GuestAddress(at as u64))
                    .unwrap();
                rest = &tail[n..];
            }
            3 => {
                let [count, tail @ ..] = rest else { return };
                let n = usize::from(count % 4);
                let Some((raw, tail)) = tail.split_at_checked(n * 8) else {
                    return;
                };
                let mut events: Vec<InputEvent> = raw
                    .chunks_exact(8)
                    .map(|e| InputEvent {
                        ty: u16::from_le_bytes([e[0], e[1]]),
                        code: u16::from_le_bytes([e[2], e[3]]),
                        value: i32::from_le_bytes([e[4], e[5], e[6], e[7]]),
                    })
                    .collect();
                events.push(InputEvent {
                    ty: 0,
                    code: 0,
                    value: 0,
                });
                if handle.inject(&events).is_ok() {
                    for e in &events {
                        assert_eq!(profile.check(e), Ok(()), "{e:?} accepted");
                    }
                }
                rest = tail;
            }
            4 => {
                let before = used_idx(&mem, 0);
                let delivered = handle.metrics().delivered.load(Ordering::Relaxed);
                let aliased = writes_alias_used_ring(&mem, 0, size);
                dev.process_event_queue();
                let used = used_since(&mem, 0, &mut device_idx[0], before, size);
                if aliased {
                    // The run must still end; its ring cannot be read back.
                    continue;
                }
                assert!(used
                    .iter()
                    .all(|&(id, len)| id < u32::from(size) && (len == 0 || len == 8)));
                let full = used.iter().filter(|&&(_, len)| len == 8).count() as u64;
                assert_eq!(
                    handle.metrics().delivered.load(Ordering::Relaxed) - delivered,
                    full
                );
            }
            _ => {
                let before = used_idx(&mem, 1);
                dev.process_status_queue();
                let used = used_since(&mem, 1, &mut device_idx[1], before, size);
                assert!(used
                    .iter()
                    .all(|&(id, len)| id < u32::from(size) && len == 0));
            }
        }
    }
}
