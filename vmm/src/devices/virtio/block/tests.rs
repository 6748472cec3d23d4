//! virtio-blk device tests through a mock driver queue.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::{Block, BlockError, BLOCK_QUEUE_SIZE, BLOCK_SEG_MAX};
use crate::devices::virtio::test_utils::{
    check_broken_queue_needs_reset, guest_memory, r, w, Driver, DATA_START,
};
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::devices::DeviceMetrics;

const SECTORS: u64 = 8;
const HDR: u64 = DATA_START;
const DATA: u64 = DATA_START + 0x1000;
const STATUS: u64 = DATA_START + 0x8000;

fn disk_pattern() -> Vec<u8> {
    (0..SECTORS as usize * 512)
        .map(|i| (i % 251) as u8)
        .collect()
}

struct Fixture {
    file: TempFile,
    block: Block,
    mem: GuestMemoryMmap,
}

fn fixture(read_only: bool) -> Fixture {
    let file = TempFile::new().unwrap();
    std::fs::write(file.as_path(), disk_pattern()).unwrap();
    let block = Block::new(file.as_path(), read_only, "test").unwrap();
    Fixture {
        file,
        block,
        mem: guest_memory(),
    }
}

fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
    let mut bytes = [0u8; 16];
    bytes[..4].copy_from_slice(&request_type.to_le_bytes());
    bytes[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&bytes, GuestAddress(HDR)).unwrap();
}

fn status(mem: &GuestMemoryMmap) -> u8 {
    mem.read_obj(GuestAddress(STATUS)).unwrap()
}

impl Fixture {
    /// Activates the device on `driver`'s queue; returns the interrupt counter.
    fn activate(
        &mut self,
        driver: &Driver,
    ) -> Arc<crate::devices::virtio::test_utils::CountingInterrupt> {
        let irq = Driver::interrupt();
        self.block
            .activate(self.mem.clone(), irq.clone(), vec![driver.queue()])
            .unwrap();
        irq
    }

    fn metric(&self, name: &str) -> u64 {
        self.block.metrics().snapshot()[name].as_u64().unwrap()
    }
}

/// Runs one request on a fresh queue; returns (status byte, used length).
fn run_one(f: &mut Fixture, bufs: &[crate::devices::virtio::test_utils::Buf]) -> (u8, u32) {
    let mem = f.mem.clone();
    mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut driver = Driver::new(&mem, 16);
    f.activate(&driver);
    let head = driver.add_chain(bufs);
    f.block.process_queue();
    assert_eq!(driver.used_count(), 1);
    let (id, len) = driver.used(0);
    assert_eq!(id, u32::from(head));
    (status(&mem), len)
}

#[test]
fn read_copies_sectors_into_guest_buffers() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, 2);

    let (st, len) = run_one(
        &mut f,
        &[r(HDR, 16), w(DATA, 512), w(DATA + 0x800, 512), w(STATUS, 1)],
    );

    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1024 + 1);
    let mut got = vec![0u8; 512];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, disk_pattern()[1024..1536]);
    f.mem
        .read_slice(&mut got, GuestAddress(DATA + 0x800))
        .unwrap();
    assert_eq!(got, disk_pattern()[1536..2048]);
    assert_eq!(f.metric("reads"), 1);
    assert_eq!(f.metric("bytes_read"), 1024);
}

#[test]
fn write_persists_to_the_image_file() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_OUT, 3);
    f.mem
        .write_slice(&[0xab; 1024], GuestAddress(DATA))
        .unwrap();

    let (st, len) = run_one(&mut f, &[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)]);

    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    assert_eq!(len, 1);
    let on_disk = std::fs::read(f.file.as_path()).unwrap();
    let mut expected = disk_pattern();
    expected[3 * 512..5 * 512].fill(0xab);
    assert_eq!(on_disk, expected);
    assert_eq!(f.metric("bytes_written"), 1024);
}

#[test]
fn flush_succeeds() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_FLUSH, 0);
    let (st, len) = run_one(&mut f, &[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 1));
    assert_eq!(f.metric("flushes"), 1);
}

#[test]
fn get_id_returns_the_device_id() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_GET_ID, 0);

    let (st, len) = run_one(&mut f, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);

    assert_eq!((st, len), (VIRTIO_BLK_S_OK as u8, 21));
    let mut id = [0u8; 20];
    f.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, f.block.id());
    assert_ne!(id, [0u8; 20]);
}

#[test]
fn ids_differ_between_image_files() {
    let a = fixture(false);
    let b = fixture(false);
    assert_ne!(a.block.id(), b.block.id());
}

#[test]
fn read_beyond_capacity_is_an_io_error_and_touches_nothing() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, SECTORS - 1);
    f.mem
        .write_slice(&[0x5a; 1024], GuestAddress(DATA))
        .unwrap();

    let (st, len) = run_one(&mut f, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);

    assert_eq!((st, len), (VIRTIO_BLK_S_IOERR as u8, 1));
    let mut got = [0u8; 1024];
    f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, [0x5a; 1024]);
    assert_eq!(f.metric("invalid_requests"), 1);
}

#[test]
fn write_beyond_capacity_leaves_the_file_unchanged() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_OUT, SECTORS);
    let (st, _) = run_one(&mut f, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(f.file.as_path()).unwrap(), disk_pattern());
}

#[test]
fn read_only_disk_refuses_writes_and_advertises_ro() {
    let mut f = fixture(true);
    assert_ne!(f.block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    header(&f.mem, VIRTIO_BLK_T_OUT, 0);
    f.mem.write_slice(&[0xcd; 512], GuestAddress(DATA)).unwrap();

    let (st, _) = run_one(&mut f, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);

    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(std::fs::read(f.file.as_path()).unwrap(), disk_pattern());
    // Reads still work.
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let (st, _) = run_one(&mut f, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
}

#[test]
fn short_header_is_an_io_error() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let (st, len) = run_one(&mut f, &[r(HDR, 12), w(STATUS, 1)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_IOERR as u8, 1));
}

#[test]
fn data_in_the_wrong_direction_is_an_io_error() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let (st, _) = run_one(&mut f, &[r(HDR, 16), r(DATA, 512), w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn unknown_request_type_is_unsupported() {
    let mut f = fixture(false);
    header(&f.mem, 0x1234, 0);
    let (st, len) = run_one(&mut f, &[r(HDR, 16), w(STATUS, 1)]);
    assert_eq!((st, len), (VIRTIO_BLK_S_UNSUPP as u8, 1));
    assert_eq!(f.metric("unsupported_requests"), 1);
}

#[test]
fn chain_without_writable_status_is_returned_unanswered() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let (st, len) = run_one(&mut f, &[r(HDR, 16), r(STATUS, 1)]);
    assert_eq!((st, len), (0xff, 0), "status untouched, nothing written");
    assert_eq!(f.metric("unanswerable_requests"), 1);
}

#[test]
fn buffers_outside_guest_memory_are_refused() {
    let mut f = fixture(false);
    header(&f.mem, VIRTIO_BLK_T_IN, 0);
    let outside = crate::devices::virtio::test_utils::MEM_SIZE as u64 - 256;
    let (st, _) = run_one(&mut f, &[r(HDR, 16), w(outside, 512), w(STATUS, 1)]);
    assert_eq!(st, VIRTIO_BLK_S_IOERR as u8);
}

#[test]
fn several_requests_are_served_in_order_with_one_interrupt() {
    let mut f = fixture(false);
    let mem = f.mem.clone();
    let mut driver = Driver::new(&mem, 16);
    let irq = f.activate(&driver);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    let a = driver.add_chain(&[r(HDR, 16), w(STATUS, 1)]);
    let b = driver.add_chain(&[r(HDR, 16), w(STATUS + 1, 1)]);

    f.block.process_queue();

    assert_eq!(driver.used_count(), 2);
    assert_eq!(driver.used(0).0, u32::from(a));
    assert_eq!(driver.used(1).0, u32::from(b));
    assert_eq!(irq.queue.load(Ordering::SeqCst), 1);
}

#[test]
fn nothing_is_served_before_activation() {
    let mut f = fixture(false);
    let mem = f.mem.clone();
    let mut driver = Driver::new(&mem, 16);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    driver.add_chain(&[r(HDR, 16), w(STATUS, 1)]);

    f.block.process_queue();

    assert_eq!(driver.used_count(), 0);
}

#[test]
fn config_space_holds_capacity_and_seg_max() {
    let f = fixture(false);
    let mut cap = [0u8; 8];
    f.block.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), SECTORS);
    let mut seg_max = [0u8; 4];
    f.block.read_config(12, &mut seg_max);
    assert_eq!(u32::from_le_bytes(seg_max), BLOCK_SEG_MAX);
    assert_ne!(f.block.avail_features() & (1 << VIRTIO_BLK_F_SEG_MAX), 0);
    let mut past = [0x77u8; 4];
    f.block.read_config(14, &mut past);
    assert_eq!(past, [0x77; 4], "out-of-range reads leave data untouched");
    let mut huge = [0x77u8; 1];
    f.block.read_config(u64::MAX, &mut huge);
    assert_eq!(huge, [0x77]);
}

#[test]
fn partial_trailing_sector_is_not_exposed() {
    let file = TempFile::new().unwrap();
    std::fs::write(file.as_path(), vec![0u8; 512 * 3 + 100]).unwrap();
    let block = Block::new(file.as_path(), true, "test").unwrap();
    assert_eq!(block.capacity(), 3);
}

#[test]
fn missing_image_is_an_error_naming_the_path() {
    let err = Block::new(std::path::Path::new("/nonexistent/disk.img"), false, "t")
        .err()
        .unwrap();
    assert!(matches!(err, BlockError::Open { .. }));
    assert!(err.to_string().contains("/nonexistent/disk.img"));
}

#[test]
fn reset_deactivates_and_allows_a_new_activation() {
    let mut f = fixture(false);
    let mem = f.mem.clone();
    let driver = Driver::new(&mem, 16);
    f.activate(&driver);
    assert!(f.block.is_activated());

    assert!(f.block.reset());
    assert!(!f.block.is_activated());
    f.activate(&driver);
    assert!(f.block.is_activated());
}

#[test]
fn activation_needs_exactly_one_valid_queue() {
    let mut f = fixture(false);
    let irq = Driver::interrupt();
    assert!(f
        .block
        .activate(f.mem.clone(), irq.clone(), vec![])
        .is_err());
    let mem = f.mem.clone();
    let driver = Driver::new(&mem, 16);
    let mut q = driver.queue();
    virtio_queue::QueueT::set_desc_table_address(&mut q, Some(0xffff_0000), Some(0xff));
    assert!(f.block.activate(f.mem.clone(), irq, vec![q]).is_err());
    assert_eq!(f.block.queue_max_sizes(), &[BLOCK_QUEUE_SIZE]);
}

#[test]
fn queue_notification_through_the_event_loop_serves_requests() {
    let mut f = fixture(false);
    let mem = f.mem.clone();
    let mut driver = Driver::new(&mem, 16);
    f.activate(&driver);
    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    driver.add_chain(&[r(HDR, 16), w(STATUS, 1)]);
    let notify = f.block.queue_events()[0].try_clone().unwrap();
    let block = Arc::new(Mutex::new(f.block));
    let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber>>>::new().unwrap();
    em.add_subscriber(block.clone());

    notify.write(1).unwrap();
    assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

    assert_eq!(driver.used_count(), 1);
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
    // The eventfd was drained: nothing more to do.
    assert_eq!(em.run_with_timeout(0).unwrap(), 0);
}

#[test]
fn a_writable_image_cannot_be_opened_twice() {
    let f = fixture(false);
    let err = Block::new(f.file.as_path(), false, "second").err().unwrap();
    assert!(matches!(err, BlockError::Locked { .. }), "{err}");
    assert!(Block::new(f.file.as_path(), true, "reader").is_err());
}

#[test]
fn read_only_images_can_be_shared_but_not_written_meanwhile() {
    let f = fixture(true);
    let second = Block::new(f.file.as_path(), true, "second");
    assert!(second.is_ok());
    assert!(Block::new(f.file.as_path(), false, "writer").is_err());
}

#[test]
fn broken_avail_index_puts_the_device_in_needs_reset_until_the_driver_resets_it() {
    let file = TempFile::new().unwrap();
    std::fs::write(file.as_path(), disk_pattern()).unwrap();
    let block = Block::new(file.as_path(), false, "test").unwrap();
    let mem = guest_memory();
    let mut driver = Driver::new(&mem, 16);
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let chain = [r(HDR, 16), w(DATA, 20), w(STATUS, 1)];
    driver.add_chain(&chain);

    let t = check_broken_queue_needs_reset(block, &mem, &[&driver.vq], 0, Block::process_queue);

    driver.add_chain(&chain);
    t.returns(Block::process_queue);
    assert_eq!(driver.used_count(), 1, "served again after the reset");
    assert_eq!(status(&mem), VIRTIO_BLK_S_OK as u8);
}

#[test]
fn a_restored_disk_serves_the_next_request_with_the_saved_id_and_position() {
    use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
    use crate::devices::virtio::test_utils::Transported;
    let f = fixture(true);
    let mem = f.mem.clone();
    let mut driver = Driver::new(&mem, 16);
    let original_id = *f.block.id();
    let t = Transported::bring_up(f.block, &mem, &[&driver.vq]);
    header(&mem, VIRTIO_BLK_T_IN, 0);
    driver.add_chain(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]);
    t.returns(Block::process_queue);
    let state = t.transport.save();
    drop(t);
    // The same contents in another file: another inode, so another ID of its own.
    let copy = TempFile::new().unwrap();
    std::fs::write(copy.as_path(), disk_pattern()).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(copy.as_path(), true, "copy").unwrap(),
    ));
    let interrupt = Arc::new(MmioInterrupt::new(
        vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
    ));
    let mut restored = MmioTransport::new(block.clone(), mem.clone(), interrupt).unwrap();

    restored.restore(&state).unwrap();
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let head = driver.add_chain(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]);
    block.lock().unwrap().process_queue();

    assert_eq!(driver.used_count(), 2);
    assert_eq!(driver.used(1), (u32::from(head), 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(id, original_id, "the guest sees the disk it knew");
}

#[test]
fn a_restore_onto_an_image_of_another_size_is_refused() {
    use crate::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
    use crate::devices::virtio::test_utils::Transported;
    let f = fixture(true);
    let mem = f.mem.clone();
    let driver = Driver::new(&mem, 16);
    let state = Transported::bring_up(f.block, &mem, &[&driver.vq])
        .transport
        .save();
    let small = TempFile::new().unwrap();
    std::fs::write(small.as_path(), vec![0u8; 1024]).unwrap();
    let block = Arc::new(Mutex::new(
        Block::new(small.as_path(), true, "small").unwrap(),
    ));
    let interrupt = Arc::new(MmioInterrupt::new(
        vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
    ));
    let mut restored = MmioTransport::new(block.clone(), mem, interrupt).unwrap();

    let err = restored.restore(&state).unwrap_err();

    assert!(
        err.to_string()
            .contains("the snapshot's disk has 8 sectors, this image 2"),
        "{err}"
    );
    assert!(!block.lock().unwrap().is_activated());
}
