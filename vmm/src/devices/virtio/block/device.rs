//! The virtio-blk device: disk file, configuration space and queue processing.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use vm_memory::Bytes;

use super::request::{
    parse_request, DiskProperties, RejectedRequest, Request, RequestError, RequestType, ID_LEN,
    SECTOR_SIZE,
};
use crate::devices::virtio::{
    read_config_bytes, GuestMemoryMmap, QueueMetrics, VirtioCommon, VirtioDevice,
};
use crate::devices::DeviceMetrics;

/// Size of the device's single request queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Most data segments per request announced to the driver (VIRTIO_BLK_F_SEG_MAX): a chain
/// also needs a header and a status descriptor. Without it Linux sends one segment per
/// request.
pub const BLOCK_SEG_MAX: u32 = BLOCK_QUEUE_SIZE as u32 - 2;
/// Bytes of `struct virtio_blk_config` exposed: capacity (u64), size_max (u32, not
/// offered: 0), seg_max (u32).
const CONFIG_LEN: usize = 16;

fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[..8].copy_from_slice(&capacity.to_le_bytes());
    config[12..].copy_from_slice(&BLOCK_SEG_MAX.to_le_bytes());
    config
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image file could not be opened.
    #[error("cannot open disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process (or device) holds a conflicting lock on the image.
    #[error("disk image {path} is in use (locked by another user)")]
    Locked {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image's size could not be determined.
    #[error("cannot determine the size of disk image {path}")]
    Size {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The queue eventfd could not be created.
    #[error("cannot create the virtio-blk queue eventfd")]
    EventFd(#[source] io::Error),
}

/// Counters of one virtio-blk device.
#[derive(Debug, Default, Serialize)]
pub struct BlockMetrics {
    /// Completed reads.
    pub reads: AtomicU64,
    /// Completed writes.
    pub writes: AtomicU64,
    /// Completed flushes.
    pub flushes: AtomicU64,
    /// Answered GET_ID requests.
    pub get_ids: AtomicU64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: AtomicU64,
    /// Requests refused as malformed or out of range (answered IOERR).
    pub invalid_requests: AtomicU64,
    /// Requests of types the device does not implement (answered UNSUPP).
    pub unsupported_requests: AtomicU64,
    /// Chains that could not be answered at all (no status byte).
    pub unanswerable_requests: AtomicU64,
    /// Host I/O errors (answered IOERR).
    pub io_errors: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    #[serde(skip)]
    pub queues: Arc<QueueMetrics>,
}

impl DeviceMetrics for BlockMetrics {
    fn snapshot(&self) -> serde_json::Value {
        self.queues.snapshot_with(self)
    }
}

/// What a snapshot keeps of a virtio-blk device beyond the common part: what the guest
/// has seen of the disk (requests are served to completion on the event loop, so none is
/// in flight when the vCPUs are paused). The disk's contents are the image file's: the
/// restoring VM must be given the same image, unchanged since the snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// Capacity in sectors (the configuration space).
    pub capacity: u64,
    /// VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// The GET_ID answer the guest has seen.
    pub id: [u8; ID_LEN],
}

/// A virtio-blk device over a raw disk image.
pub struct Block {
    common: VirtioCommon,
    disk: Disk,
    /// `struct virtio_blk_config` up to and including `seg_max` (little endian).
    config: [u8; CONFIG_LEN],
}

/// The disk image and what requests do to it.
struct Disk {
    file: File,
    props: DiskProperties,
    id: [u8; ID_LEN],
    metrics: Arc<BlockMetrics>,
}

impl Block {
    /// Opens the raw image at `path`. Its size, rounded down to whole sectors, is the
    /// disk's capacity. `name` is only used in messages.
    pub fn new(path: &Path, read_only: bool, name: &str) -> Result<Self, BlockError> {
        let open_err = |source| BlockError::Open {
            path: path.to_owned(),
            source,
        };
        let mut disk = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        lock_image(&disk, read_only).map_err(|source| BlockError::Locked {
            path: path.to_owned(),
            source,
        })?;
        let size_err = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        // Seek rather than metadata: block devices report a length of 0 in metadata.
        let size = disk.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = disk.metadata().map_err(size_err)?;
        // Stable per backing file and distinct between files: device and inode numbers.
        let id_string = format!("{:x}-{:x}", meta.dev(), meta.ino());
        tracing::debug!("{name}: {} ({size} bytes, id {id_string})", path.display());
        Self::from_file(disk, size / SECTOR_SIZE, read_only, id_string.as_bytes())
    }

    fn from_file(
        file: File,
        capacity: u64,
        read_only: bool,
        id_string: &[u8],
    ) -> Result<Self, BlockError> {
        let mut id = [0u8; ID_LEN];
        let n = id_string.len().min(ID_LEN);
        id[..n].copy_from_slice(&id_string[..n]);
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let common = VirtioCommon::new(
            "virtio-blk",
            VIRTIO_ID_BLOCK,
            avail_features,
            &[BLOCK_QUEUE_SIZE],
        )
        .map_err(BlockError::EventFd)?;
        let metrics = Arc::new(BlockMetrics {
            queues: common.metrics(),
            ..BlockMetrics::default()
        });
        Ok(Self {
            common,
            disk: Disk {
                file,
                props: DiskProperties {
                    capacity,
                    read_only,
                },
                id,
                metrics,
            },
            config: config_space(capacity),
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.disk.metrics.clone()
    }

    /// Disk size in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.props.capacity
    }

    /// The 20-byte ID answered to GET_ID.
    pub fn id(&self) -> &[u8; ID_LEN] {
        &self.disk.id
    }

    /// Serves every available request and interrupts the guest if it asked for it.
    /// Does nothing before activation.
    pub fn process_queue(&mut self) {
        let disk = &mut self.disk;
        self.common.serve_queue(0, |queue, mem| {
            queue.drain(mem, |chain| disk.serve(mem, chain))
        });
    }
}

impl Disk {
    /// Serves one chain; returns the number of bytes written to guest buffers.
    fn serve<M>(&mut self, mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        match parse_request(mem, chain, self.props) {
            Ok(request) => {
                let (status, written) = match self.execute(mem, &request) {
                    Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
                    Err(e) => {
                        self.metrics.io_errors.fetch_add(1, Ordering::Relaxed);
                        crate::guest_warn!(
                            "virtio-blk: {:?} request failed: {e}",
                            request.request_type
                        );
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                };
                match mem.write_obj(status, request.status) {
                    Ok(()) => written.saturating_add(1),
                    Err(_) => written,
                }
            }
            Err(RejectedRequest { error, status }) => {
                let counter = match error {
                    RequestError::Unsupported(_) => &self.metrics.unsupported_requests,
                    _ if status.is_none() => &self.metrics.unanswerable_requests,
                    _ => &self.metrics.invalid_requests,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("virtio-blk: request refused: {error}");
                match status.map(|addr| mem.write_obj(error.status_code(), addr)) {
                    Some(Ok(())) => 1,
                    _ => 0,
                }
            }
        }
    }

    /// Executes a parsed request; returns the number of data bytes written to the guest.
    fn execute(&mut self, mem: &GuestMemoryMmap, request: &Request) -> io::Result<u32> {
        let io_err = |e: vm_memory::GuestMemoryError| io::Error::other(e);
        match request.request_type {
            RequestType::In => {
                self.file
                    .seek(SeekFrom::Start(request.sector * SECTOR_SIZE))?;
                for s in &request.data {
                    mem.read_exact_volatile_from(s.addr, &mut self.file, s.len as usize)
                        .map_err(io_err)?;
                }
                self.metrics.reads.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_read
                    .fetch_add(request.data_len, Ordering::Relaxed);
                // Bounded by the parser: data_len <= capacity and <= queue size * u32::MAX,
                // but the used-ring length is a u32.
                Ok(u32::try_from(request.data_len).unwrap_or(u32::MAX))
            }
            RequestType::Out => {
                self.file
                    .seek(SeekFrom::Start(request.sector * SECTOR_SIZE))?;
                for s in &request.data {
                    mem.write_all_volatile_to(s.addr, &mut self.file, s.len as usize)
                        .map_err(io_err)?;
                }
                self.metrics.writes.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .bytes_written
                    .fetch_add(request.data_len, Ordering::Relaxed);
                Ok(0)
            }
            RequestType::Flush => {
                if !self.props.read_only {
                    self.file.sync_data()?;
                }
                self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(0)
            }
            RequestType::GetId => {
                let mut written = 0usize;
                for s in &request.data {
                    if written == ID_LEN {
                        break;
                    }
                    let n = (s.len as usize).min(ID_LEN - written);
                    mem.write_slice(&self.id[written..written + n], s.addr)
                        .map_err(io_err)?;
                    written += n;
                }
                self.metrics.get_ids.fetch_add(1, Ordering::Relaxed);
                Ok(written as u32)
            }
        }
    }
}

/// Takes an advisory lock on the image for as long as `disk` stays open: exclusive for a
/// writable disk, shared for a read-only one, so that two VMs cannot write the same image
/// (or one write what another reads) and corrupt it.
fn lock_image(disk: &File, read_only: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock only reads the flags and acts on the open file description of a
    // descriptor that `disk` owns and keeps open for the duration of the call.
    let ret = unsafe { libc::flock(disk.as_raw_fd(), mode | libc::LOCK_NB) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl VirtioDevice for Block {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // capacity is read-only; no writable fields are offered (no CONFIG_WCE): the default
    // write_config ignores writes.

    fn save_state(&mut self) -> serde_json::Value {
        serde_json::to_value(BlockState {
            capacity: self.disk.props.capacity,
            read_only: self.disk.props.read_only,
            id: self.disk.id,
        })
        .unwrap_or_default()
    }

    /// Refuses an image of another size or mode (the guest has cached what it read); keeps
    /// the ID the guest saw, even if the image is another file now (a copy).
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: BlockState = serde_json::from_value(state.clone())
            .map_err(|e| format!("invalid virtio-blk state: {e}"))?;
        if state.capacity != self.disk.props.capacity {
            return Err(format!(
                "the snapshot's disk has {} sectors, this image {}",
                state.capacity, self.disk.props.capacity
            ));
        }
        if state.read_only != self.disk.props.read_only {
            return Err(format!(
                "the snapshot's disk was {}, this one is {}",
                mode(state.read_only),
                mode(self.disk.props.read_only)
            ));
        }
        self.disk.id = state.id;
        Ok(())
    }
}

fn mode(read_only: bool) -> &'static str {
    match read_only {
        true => "read-only",
        false => "writable",
    }
}
