//! virtio-gpu 2D device: resources with guest-memory backing, one scanout published into the
//! shared framebuffer, the cursor, and the display-changed event.
//!
//! Each resource's host copy is a buffer of the shared framebuffer's pool, always in BGRX
//! (other guest formats are converted while TRANSFER_TO_HOST_2D copies the rectangle). So
//! the transfer is the only pixel copy: SET_SCANOUT re-points the shared header at the
//! resource's buffer and RESOURCE_FLUSH publishes a sequence number and the damage.
//! Every command completes synchronously, so fences are signalled by the response itself
//! (the fence flag and id are echoed).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use framebuffer::{FramebufferShare, FramebufferWriter, PoolBuffer, ReaderFds, ScanoutConfig};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::decoder::{self, resp, Command, CtrlHeader, Format, MemEntry, Rect, Request, Response};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, DeviceQueue, GuestMemoryMmap, InterruptKind,
    InterruptTrigger, QueueError, QueueMetrics, QueueMetricsValues, VirtioCommon, VirtioDevice,
};
use crate::devices::DeviceMetrics;

/// Virtio device id of a GPU.
pub const GPU_DEVICE_ID: u32 = 16;
/// Index of the control queue.
pub const CONTROL_QUEUE: usize = 0;
/// Index of the cursor queue.
pub const CURSOR_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 16];
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_GPU_F_EDID: u64 = 1 << 1;
/// `VIRTIO_GPU_EVENT_DISPLAY` in `events_read`.
pub const EVENT_DISPLAY: u32 = 1;
/// Largest request read from a queue (an ATTACH_BACKING with the maximum entry count).
const MAX_REQUEST_LEN: usize =
    decoder::HEADER_LEN + 8 + decoder::MAX_MEM_ENTRIES as usize * decoder::MEM_ENTRY_LEN;
/// Side of the (square) cursor resource.
const CURSOR_SIDE: u32 = framebuffer::layout::CURSOR_SIDE;
/// Host memory one backing entry costs: the entry and its running offset ([`Backing`]).
const BACKING_ENTRY_COST: usize = std::mem::size_of::<MemEntry>() + std::mem::size_of::<u64>();

/// Configuration of the gpu device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// Initial display width announced to the guest.
    pub width: u32,
    /// Initial display height.
    pub height: u32,
    /// Most resources the guest may hold at once.
    pub max_resources: usize,
    /// Most host memory (bytes) all resources together may use: their pixels and their
    /// guest-memory backing lists.
    pub max_host_memory: usize,
}

impl GpuConfig {
    /// A display of `width` x `height` with default limits (1024 resources, 256 MiB).
    pub fn with_size(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            max_resources: 1024,
            max_host_memory: 256 << 20,
        }
    }
}

/// Errors from creating or controlling the gpu device.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The shared framebuffer could not be created or shared.
    #[error("shared framebuffer")]
    Framebuffer(#[source] framebuffer::WriterError),
    /// A queue eventfd could not be created.
    #[error("cannot create a queue eventfd")]
    EventFd(#[source] std::io::Error),
    /// A requested display size is out of range.
    #[error("display size {width}x{height} out of range (1..={max} each)")]
    BadDisplaySize { width: u32, height: u32, max: u32 },
    /// Signalling the guest failed.
    #[error("cannot raise the configuration interrupt")]
    Interrupt(#[source] std::io::Error),
}

/// Counters of the gpu device.
#[derive(Debug, Default)]
pub struct GpuMetrics {
    /// Requests processed on both queues.
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Flushes published to the framebuffer.
    pub flushes: AtomicU64,
    /// Bytes copied by transfers.
    pub transfer_bytes: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    pub queues: Arc<QueueMetrics>,
}

/// Serialisable snapshot of [`GpuMetrics`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GpuMetricsSnapshot {
    pub requests: u64,
    pub errors: u64,
    pub flushes: u64,
    pub transfer_bytes: u64,
    #[serde(flatten)]
    pub queues: QueueMetricsValues,
}

impl DeviceMetrics for GpuMetrics {
    fn snapshot(&self) -> serde_json::Value {
        serde_json::to_value(self.values()).unwrap_or_default()
    }
}

impl GpuMetrics {
    /// Current values.
    pub fn values(&self) -> GpuMetricsSnapshot {
        GpuMetricsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            transfer_bytes: self.transfer_bytes.load(Ordering::Relaxed),
            queues: self.queues.values(),
        }
    }
}

/// State shared between the device and the VMM's control plane.
struct DisplayShared {
    /// Size announced in GET_DISPLAY_INFO / GET_EDID.
    size: (u32, u32),
    /// `events_read` in the config space.
    events_read: u32,
    /// Set once the driver activated the device.
    interrupt: Option<Arc<dyn InterruptTrigger>>,
}

/// Locks the shared display state; a thread that panicked holding it left nothing half
/// written that matters (three plain fields), so a poisoned lock is taken as it is.
fn lock_display(display: &Mutex<DisplayShared>) -> MutexGuard<'_, DisplayShared> {
    display.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The VMM's handle on a gpu device: resize requests and framebuffer descriptors. Cheap to
/// clone, usable from any thread.
#[derive(Clone)]
pub struct GpuHandle {
    display: Arc<Mutex<DisplayShared>>,
    share: FramebufferShare,
    metrics: Arc<GpuMetrics>,
}

impl std::fmt::Debug for GpuHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuHandle").finish_non_exhaustive()
    }
}

impl GpuHandle {
    /// Asks the guest to switch to `width` x `height`: the new size is announced in
    /// GET_DISPLAY_INFO and a display event with a configuration interrupt tells the driver
    /// to ask. The guest follows by creating a new resource and setting it as scanout.
    pub fn set_display_size(&self, width: u32, height: u32) -> Result<(), GpuError> {
        let max = decoder::MAX_DIMENSION;
        if width == 0 || height == 0 || width > max || height > max {
            return Err(GpuError::BadDisplaySize { width, height, max });
        }
        let mut d = lock_display(&self.display);
        d.size = (width, height);
        d.events_read |= EVENT_DISPLAY;
        if let Some(interrupt) = &d.interrupt {
            interrupt
                .trigger(InterruptKind::Config)
                .map_err(GpuError::Interrupt)?;
        }
        Ok(())
    }

    /// The size currently announced to the guest.
    pub fn display_size(&self) -> (u32, u32) {
        lock_display(&self.display).size
    }

    /// Descriptors for a new reader of the shared framebuffer (`GetFramebuffer`).
    pub fn reader_fds(&self) -> Result<ReaderFds, GpuError> {
        self.share.reader_fds().map_err(GpuError::Framebuffer)
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<GpuMetrics> {
        self.metrics.clone()
    }
}

/// Guest-memory backing of a resource: its entries and their running offsets.
#[derive(Debug)]
struct Backing {
    entries: Vec<MemEntry>,
    /// `starts[i]` is the backing offset of `entries[i]`.
    starts: Vec<u64>,
    total: u64,
}

impl Backing {
    /// Copies `dst.len()` bytes from backing offset `offset` into `dst`.
    fn read(&self, mem: &GuestMemoryMmap, offset: u64, dst: &mut [u8]) -> Result<(), CommandError> {
        let mut idx = self
            .starts
            .partition_point(|&s| s <= offset)
            .saturating_sub(1);
        let first_start = self.starts.get(idx).ok_or(CommandError::GuestMemory)?;
        let mut within = offset - first_start;
        let mut done = 0;
        while done < dst.len() {
            let entry = self.entries.get(idx).ok_or(CommandError::GuestMemory)?;
            let left_in_entry = u64::from(entry.len).saturating_sub(within);
            let n = usize::try_from(left_in_entry)
                .unwrap_or(usize::MAX)
                .min(dst.len() - done);
            mem.read_slice(&mut dst[done..done + n], GuestAddress(entry.addr + within))
                .map_err(|_| CommandError::GuestMemory)?;
            done += n;
            idx += 1;
            within = 0;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Resource {
    format: Format,
    width: u32,
    height: u32,
    backing: Option<Backing>,
    buffer: PoolBuffer,
}

impl Resource {
    fn stride(&self) -> u64 {
        u64::from(self.width) * 4
    }

    /// Refuses a rectangle that does not fit inside the resource.
    fn check_rect(&self, rect: Rect) -> Result<(), CommandError> {
        if rect.fits_in(self.width, self.height) {
            Ok(())
        } else {
            Err(self.rect_outside(rect))
        }
    }

    fn rect_outside(&self, rect: Rect) -> CommandError {
        CommandError::RectOutside {
            rect,
            width: self.width,
            height: self.height,
        }
    }
}

/// Converts a row of `format` pixels in place to BGRX (the 4th byte keeps the source's
/// alpha or padding byte, which makes cursor images BGRA).
fn convert_to_bgrx(format: Format, row: &mut [u8]) {
    match format {
        Format::B8G8R8A8 | Format::B8G8R8X8 => {}
        Format::A8R8G8B8 | Format::X8R8G8B8 => {
            for px in row.chunks_exact_mut(4) {
                px.reverse();
            }
        }
        Format::R8G8B8A8 | Format::R8G8B8X8 => {
            for px in row.chunks_exact_mut(4) {
                px.swap(0, 2);
            }
        }
        Format::X8B8G8R8 | Format::A8B8G8R8 => {
            for px in row.chunks_exact_mut(4) {
                px.rotate_left(1);
            }
        }
    }
}

/// Why a command failed; becomes an error response.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum CommandError {
    #[error("unknown resource {0}")]
    UnknownResource(u32),
    #[error("resource {0} already exists")]
    DuplicateResource(u32),
    #[error("resource limit of {0} reached")]
    TooManyResources(usize),
    #[error("host memory limit reached")]
    OutOfMemory,
    #[error("invalid scanout {0}")]
    BadScanout(u32),
    #[error("rectangle {rect} outside resource {width}x{height}")]
    RectOutside { rect: Rect, width: u32, height: u32 },
    #[error("backing entry {addr:#x}+{len:#x} outside guest memory")]
    BackingOutsideMemory { addr: u64, len: u32 },
    #[error("resource {0} has no backing")]
    NoBacking(u32),
    #[error("resource {0} already has backing")]
    BackingAttached(u32),
    #[error("transfer reads {end} bytes of a {total}-byte backing")]
    BackingTooShort { end: u64, total: u64 },
    #[error("guest memory access failed")]
    GuestMemory,
    #[error("cursor resource must be {CURSOR_SIDE}x{CURSOR_SIDE}, is {0}x{1}")]
    BadCursorSize(u32, u32),
}

impl CommandError {
    fn response_type(&self) -> u32 {
        match self {
            CommandError::UnknownResource(_) | CommandError::DuplicateResource(_) => {
                resp::ERR_INVALID_RESOURCE_ID
            }
            CommandError::TooManyResources(_) | CommandError::OutOfMemory => {
                resp::ERR_OUT_OF_MEMORY
            }
            CommandError::BadScanout(_) => resp::ERR_INVALID_SCANOUT_ID,
            CommandError::RectOutside { .. }
            | CommandError::BackingTooShort { .. }
            | CommandError::BadCursorSize(..) => resp::ERR_INVALID_PARAMETER,
            CommandError::BackingOutsideMemory { .. }
            | CommandError::NoBacking(_)
            | CommandError::BackingAttached(_)
            | CommandError::GuestMemory => resp::ERR_UNSPEC,
        }
    }
}

/// Command execution, independent of queues: decoded commands in, responses out.
pub struct GpuState {
    config: GpuConfig,
    writer: FramebufferWriter,
    /// Size of the writer's pixel pool (page-rounded `max_host_memory`).
    pool_size: usize,
    /// Host memory held by backing lists.
    backing_bytes: usize,
    resources: BTreeMap<u32, Resource>,
    /// Resource shown on scanout 0 and the rectangle of it that is shown.
    scanout: Option<(u32, Rect)>,
    cursor_visible: bool,
    /// Top-left corner of the cursor image, as the guest placed it.
    cursor_pos: (i32, i32),
    /// Hotspot inside the cursor image, from the last UPDATE_CURSOR with an image.
    cursor_hot: (u32, u32),
    /// The image of the last UPDATE_CURSOR with one (for snapshots).
    cursor_image: Option<Vec<u8>>,
    display: Arc<Mutex<DisplayShared>>,
    metrics: Arc<GpuMetrics>,
}

/// One 2D resource as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SavedResource {
    id: u32,
    /// virtio format code.
    format: u32,
    width: u32,
    height: u32,
    /// Guest-memory backing entries (address, length), if attached.
    backing: Option<Vec<(u64, u32)>>,
    /// The host copy of its pixels (BGRX, `width * height * 4` bytes), hex.
    pixels: String,
}

/// What a snapshot keeps of the gpu beyond the common part: the display size and pending
/// display event, every resource with its pixels and backing, the scanout and the cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSnapshot {
    display_size: (u32, u32),
    events_read: u32,
    resources: Vec<SavedResource>,
    /// Resource and rectangle (x, y, width, height) on scanout 0.
    scanout: Option<(u32, [u32; 4])>,
    cursor_visible: bool,
    cursor_pos: (i32, i32),
    cursor_hot: (u32, u32),
    cursor_image: Option<String>,
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
    // Only ASCII hex digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

fn from_hex(hex: &str) -> Result<Vec<u8>, String> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        _ => Err(format!("invalid hex digit {:?}", char::from(c))),
    };
    let bytes = hex.as_bytes();
    if bytes.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

impl std::fmt::Debug for GpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuState")
            .field("config", &self.config)
            .field("resources", &self.resources.len())
            .field("scanout", &self.scanout)
            .finish_non_exhaustive()
    }
}

impl GpuState {
    /// A device state with its shared framebuffer.
    pub fn new(config: GpuConfig) -> Result<Self, GpuError> {
        let max = decoder::MAX_DIMENSION;
        if config.width == 0 || config.height == 0 || config.width > max || config.height > max {
            return Err(GpuError::BadDisplaySize {
                width: config.width,
                height: config.height,
                max,
            });
        }
        let writer =
            FramebufferWriter::new(config.max_host_memory).map_err(GpuError::Framebuffer)?;
        Ok(Self {
            config,
            pool_size: writer.pool_free(),
            writer,
            backing_bytes: 0,
            resources: BTreeMap::new(),
            scanout: None,
            cursor_visible: false,
            cursor_pos: (0, 0),
            cursor_hot: (0, 0),
            cursor_image: None,
            display: Arc::new(Mutex::new(DisplayShared {
                size: (config.width, config.height),
                events_read: 0,
                interrupt: None,
            })),
            metrics: Arc::default(),
        })
    }

    /// The VMM's handle.
    pub fn handle(&self) -> GpuHandle {
        GpuHandle {
            display: self.display.clone(),
            share: self.writer.share(),
            metrics: self.metrics.clone(),
        }
    }

    /// Decodes, executes and encodes one request; never fails (errors become error responses).
    pub fn process_request(&mut self, mem: &GuestMemoryMmap, bytes: &[u8]) -> Vec<u8> {
        self.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let response = match decoder::decode(bytes) {
            Ok(Request { header, command }) => {
                let response = self.execute(mem, command);
                (header, response)
            }
            Err(err) => (
                decoder::decode_header(bytes).unwrap_or_default(),
                Response::Err(err.response_type()),
            ),
        };
        if matches!(response.1, Response::Err(_)) {
            self.metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        decoder::encode_response(&response.0, &response.1)
    }

    /// Executes one decoded command.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, command: Command) -> Response {
        let result = match command {
            Command::GetDisplayInfo => {
                let size = self.display_size();
                return Response::DisplayInfo(vec![Some(size)]);
            }
            Command::GetEdid { scanout_id } => {
                if scanout_id != 0 {
                    return Response::Err(resp::ERR_INVALID_SCANOUT_ID);
                }
                let (w, h) = self.display_size();
                return Response::Edid(decoder::edid_for(w, h));
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            } => self.create(resource_id, format, width, height),
            Command::ResourceUnref { resource_id } => self.unref(resource_id),
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            } => self.attach_backing(mem, resource_id, entries),
            Command::ResourceDetachBacking { resource_id } => self
                .resource_mut(resource_id)
                .and_then(|r| r.backing.take().ok_or(CommandError::NoBacking(resource_id)))
                .map(|backing| self.release(&backing)),
            Command::SetScanout {
                scanout_id,
                resource_id,
                rect,
            } => self.set_scanout(scanout_id, resource_id, rect),
            Command::TransferToHost2d {
                resource_id,
                rect,
                offset,
            } => self.transfer(mem, resource_id, rect, offset),
            Command::ResourceFlush { resource_id, rect } => self.flush(resource_id, rect),
            Command::UpdateCursor {
                pos,
                resource_id,
                hot_x,
                hot_y,
            } => self.update_cursor(pos.x as i32, pos.y as i32, resource_id, hot_x, hot_y),
            Command::MoveCursor { pos } => {
                self.cursor_pos = (pos.x as i32, pos.y as i32);
                let (x, y) = self.cursor_hotspot_position();
                self.writer.move_cursor(x, y, self.cursor_visible);
                Ok(())
            }
        };
        match result {
            Ok(()) => Response::OkNoData,
            Err(err) => Response::Err(err.response_type()),
        }
    }

    /// Frees every resource and disables the scanout (device reset).
    pub fn reset(&mut self) {
        // Disabling the scanout cannot fail.
        let _ = self.writer.set_scanout(None);
        self.scanout = None;
        for (_, res) in std::mem::take(&mut self.resources) {
            self.writer.free(res.buffer);
        }
        self.backing_bytes = 0;
        self.cursor_image = None;
        let mut d = lock_display(&self.display);
        d.events_read = 0;
        d.interrupt = None;
    }

    /// Everything the guest built, for a snapshot.
    pub fn save(&mut self) -> GpuSnapshot {
        let display = lock_display(&self.display);
        let (display_size, events_read) = (display.size, display.events_read);
        drop(display);
        let resources = self
            .resources
            .iter()
            .map(|(&id, r)| {
                let len = r.width as usize * r.height as usize * 4;
                SavedResource {
                    id,
                    format: r.format.code(),
                    width: r.width,
                    height: r.height,
                    backing: r
                        .backing
                        .as_ref()
                        .map(|b| b.entries.iter().map(|e| (e.addr, e.len)).collect()),
                    pixels: to_hex(&self.writer.pixels_mut(&r.buffer)[..len]),
                }
            })
            .collect();
        GpuSnapshot {
            display_size,
            events_read,
            resources,
            scanout: self
                .scanout
                .map(|(id, r)| (id, [r.x, r.y, r.width, r.height])),
            cursor_visible: self.cursor_visible,
            cursor_pos: self.cursor_pos,
            cursor_hot: self.cursor_hot,
            cursor_image: self.cursor_image.as_deref().map(to_hex),
        }
    }

    /// The display size and pending display event of `saved` (needs no guest memory).
    fn restore_display(&mut self, saved: &GpuSnapshot) {
        let mut d = lock_display(&self.display);
        d.size = saved.display_size;
        d.events_read = saved.events_read;
    }

    /// Rebuilds what the guest built, through the same checks as its commands (limits,
    /// backing inside guest memory, rectangles inside resources), then publishes the
    /// scanout and the cursor as they were.
    fn restore(&mut self, mem: &GuestMemoryMmap, saved: &GpuSnapshot) -> Result<(), String> {
        for r in &saved.resources {
            let format = Format::from_code(r.format)
                .ok_or_else(|| format!("resource {}: unknown format {}", r.id, r.format))?;
            self.create(r.id, format, r.width, r.height)
                .map_err(|e| format!("resource {}: {e}", r.id))?;
            let pixels = from_hex(&r.pixels).map_err(|e| format!("resource {}: {e}", r.id))?;
            let len = r.width as usize * r.height as usize * 4;
            if pixels.len() != len {
                return Err(format!(
                    "resource {}: {} bytes of pixels for {}x{}",
                    r.id,
                    pixels.len(),
                    r.width,
                    r.height
                ));
            }
            let buffer = &self.resources[&r.id].buffer;
            self.writer.pixels_mut(buffer)[..len].copy_from_slice(&pixels);
            if let Some(entries) = &r.backing {
                let entries = entries
                    .iter()
                    .map(|&(addr, len)| MemEntry { addr, len })
                    .collect();
                self.attach_backing(mem, r.id, entries)
                    .map_err(|e| format!("resource {}: {e}", r.id))?;
            }
        }
        if let Some((id, [x, y, width, height])) = saved.scanout {
            let rect = Rect {
                x,
                y,
                width,
                height,
            };
            self.set_scanout(0, id, rect)
                .map_err(|e| format!("scanout: {e}"))?;
            self.writer.flush(framebuffer::Rect {
                x: 0,
                y: 0,
                width,
                height,
            });
        }
        self.cursor_pos = saved.cursor_pos;
        self.cursor_hot = saved.cursor_hot;
        self.cursor_visible = saved.cursor_visible;
        let (x, y) = self.cursor_hotspot_position();
        match &saved.cursor_image {
            Some(hex) => {
                let image = from_hex(hex).map_err(|e| format!("cursor: {e}"))?;
                if image.len() != framebuffer::layout::CURSOR_IMAGE_SIZE {
                    return Err(format!("cursor image of {} bytes", image.len()));
                }
                let _ = self
                    .writer
                    .set_cursor(&image, self.cursor_hot.0, self.cursor_hot.1, x, y);
                self.writer.move_cursor(x, y, self.cursor_visible);
                self.cursor_image = Some(image);
            }
            None => self.writer.move_cursor(x, y, self.cursor_visible),
        }
        Ok(())
    }

    fn display_size(&self) -> (u32, u32) {
        lock_display(&self.display).size
    }

    /// Host memory the guest's resources hold: pixels (whole pool pages) and backing lists.
    fn host_memory_used(&self) -> usize {
        self.pool_size - self.writer.pool_free() + self.backing_bytes
    }

    /// Gives back what a detached backing list held.
    fn release(&mut self, backing: &Backing) {
        self.backing_bytes -= backing.entries.len() * BACKING_ENTRY_COST;
    }

    fn resource_mut(&mut self, id: u32) -> Result<&mut Resource, CommandError> {
        self.resources
            .get_mut(&id)
            .ok_or(CommandError::UnknownResource(id))
    }

    fn create(
        &mut self,
        id: u32,
        format: Format,
        width: u32,
        height: u32,
    ) -> Result<(), CommandError> {
        if self.resources.contains_key(&id) {
            return Err(CommandError::DuplicateResource(id));
        }
        if self.resources.len() >= self.config.max_resources {
            return Err(CommandError::TooManyResources(self.config.max_resources));
        }
        // The decoder bounds width and height by MAX_DIMENSION, so this cannot overflow.
        let len = width as usize * height as usize * format.bytes_per_pixel() as usize;
        if self.host_memory_used() + len > self.config.max_host_memory {
            return Err(CommandError::OutOfMemory);
        }
        let buffer = self
            .writer
            .alloc(len)
            .map_err(|_| CommandError::OutOfMemory)?;
        // A recycled pool range may hold another resource's pixels; new resources start black.
        self.writer.pixels_mut(&buffer)[..len].fill(0);
        self.resources.insert(
            id,
            Resource {
                format,
                width,
                height,
                backing: None,
                buffer,
            },
        );
        Ok(())
    }

    fn unref(&mut self, id: u32) -> Result<(), CommandError> {
        let res = self
            .resources
            .remove(&id)
            .ok_or(CommandError::UnknownResource(id))?;
        if self.scanout.is_some_and(|(r, _)| r == id) {
            self.scanout = None;
        }
        if let Some(backing) = &res.backing {
            self.release(backing);
        }
        // Frees the pool range; disables the shared scanout if it showed this resource.
        self.writer.free(res.buffer);
        Ok(())
    }

    fn attach_backing(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u32,
        entries: Vec<MemEntry>,
    ) -> Result<(), CommandError> {
        let cost = entries.len() * BACKING_ENTRY_COST;
        let used = self.host_memory_used();
        let max = self.config.max_host_memory;
        let res = self.resource_mut(id)?;
        if res.backing.is_some() {
            return Err(CommandError::BackingAttached(id));
        }
        if used + cost > max {
            return Err(CommandError::OutOfMemory);
        }
        let mut starts = Vec::with_capacity(entries.len());
        let mut total = 0u64;
        for e in &entries {
            if !GuestMemoryBackend::check_range(mem, GuestAddress(e.addr), e.len as usize) {
                return Err(CommandError::BackingOutsideMemory {
                    addr: e.addr,
                    len: e.len,
                });
            }
            starts.push(total);
            total += u64::from(e.len);
        }
        res.backing = Some(Backing {
            entries,
            starts,
            total,
        });
        self.backing_bytes += cost;
        Ok(())
    }

    fn set_scanout(&mut self, scanout_id: u32, id: u32, rect: Rect) -> Result<(), CommandError> {
        if scanout_id != 0 {
            return Err(CommandError::BadScanout(scanout_id));
        }
        if id == 0 || rect.is_empty() {
            let _ = self.writer.set_scanout(None);
            self.scanout = None;
            return Ok(());
        }
        let res = self
            .resources
            .get(&id)
            .ok_or(CommandError::UnknownResource(id))?;
        res.check_rect(rect)?;
        let config = ScanoutConfig {
            width: rect.width,
            height: rect.height,
            stride: res.width * 4,
            offset_in_buffer: rect.y as usize * res.stride() as usize + rect.x as usize * 4,
        };
        // The rectangle fits the resource, so it fits the resource's buffer.
        self.writer
            .set_scanout(Some((&res.buffer, config)))
            .map_err(|_| res.rect_outside(rect))?;
        self.scanout = Some((id, rect));
        Ok(())
    }

    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        id: u32,
        rect: Rect,
        offset: u64,
    ) -> Result<(), CommandError> {
        let res = self
            .resources
            .get(&id)
            .ok_or(CommandError::UnknownResource(id))?;
        let backing = res.backing.as_ref().ok_or(CommandError::NoBacking(id))?;
        res.check_rect(rect)?;
        if rect.is_empty() {
            return Ok(());
        }
        let stride = res.stride();
        let row_len = u64::from(rect.width) * 4;
        // Source rows are `stride` apart starting at `offset` (the driver's layout).
        let end = stride
            .checked_mul(u64::from(rect.height - 1))
            .and_then(|n| n.checked_add(row_len))
            .and_then(|n| n.checked_add(offset))
            .unwrap_or(u64::MAX);
        if end > backing.total {
            return Err(CommandError::BackingTooShort {
                end,
                total: backing.total,
            });
        }
        let format = res.format;
        let dst_start = rect.y as usize * stride as usize + rect.x as usize * 4;
        let pixels = self.writer.pixels_mut(&res.buffer);
        if rect.x == 0 && rect.width == res.width {
            // Whole rows: one contiguous range on both sides.
            let len = stride as usize * rect.height as usize;
            let dst = &mut pixels[dst_start..dst_start + len];
            backing.read(mem, offset, dst)?;
            convert_to_bgrx(format, dst);
        } else {
            for row in 0..u64::from(rect.height) {
                let dst = dst_start + (row * stride) as usize;
                let dst = &mut pixels[dst..dst + row_len as usize];
                backing.read(mem, offset + row * stride, dst)?;
                convert_to_bgrx(format, dst);
            }
        }
        self.metrics
            .transfer_bytes
            .fetch_add(row_len * u64::from(rect.height), Ordering::Relaxed);
        Ok(())
    }

    fn flush(&mut self, id: u32, rect: Rect) -> Result<(), CommandError> {
        let res = self
            .resources
            .get(&id)
            .ok_or(CommandError::UnknownResource(id))?;
        res.check_rect(rect)?;
        let Some((_, shown)) = self.scanout.filter(|(r, _)| *r == id) else {
            // Flushing a resource that is not on screen is valid and shows nothing.
            return Ok(());
        };
        // Translate from resource to scanout coordinates, keeping only the visible part.
        let x0 = rect.x.max(shown.x);
        let y0 = rect.y.max(shown.y);
        let x1 = (rect.x + rect.width).min(shown.x + shown.width);
        let y1 = (rect.y + rect.height).min(shown.y + shown.height);
        if x0 < x1 && y0 < y1 {
            let damage = framebuffer::Rect {
                x: x0 - shown.x,
                y: y0 - shown.y,
                width: x1 - x0,
                height: y1 - y0,
            };
            if self.writer.flush(damage).is_some() {
                self.metrics.flushes.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Where the hotspot is on the scanout. The guest places the image's top-left corner
    /// (Linux's cursor plane position is the plane's corner); readers want the point the
    /// pointer is at, which is the hotspot.
    fn cursor_hotspot_position(&self) -> (i32, i32) {
        (
            self.cursor_pos.0.saturating_add(self.cursor_hot.0 as i32),
            self.cursor_pos.1.saturating_add(self.cursor_hot.1 as i32),
        )
    }

    fn update_cursor(
        &mut self,
        x: i32,
        y: i32,
        id: u32,
        hot_x: u32,
        hot_y: u32,
    ) -> Result<(), CommandError> {
        self.cursor_pos = (x, y);
        if id == 0 {
            self.cursor_visible = false;
            let (x, y) = self.cursor_hotspot_position();
            self.writer.move_cursor(x, y, false);
            return Ok(());
        }
        let res = self
            .resources
            .get(&id)
            .ok_or(CommandError::UnknownResource(id))?;
        if res.width != CURSOR_SIDE || res.height != CURSOR_SIDE {
            return Err(CommandError::BadCursorSize(res.width, res.height));
        }
        let image =
            self.writer.pixels_mut(&res.buffer)[..framebuffer::layout::CURSOR_IMAGE_SIZE].to_vec();
        // A hotspot outside the image is a guest bug; keep it on the image's edge.
        let hot = (hot_x.min(CURSOR_SIDE - 1), hot_y.min(CURSOR_SIDE - 1));
        self.cursor_hot = hot;
        let (x, y) = self.cursor_hotspot_position();
        // The image has exactly the size the writer expects.
        let _ = self.writer.set_cursor(&image, hot.0, hot.1, x, y);
        self.cursor_image = Some(image);
        self.cursor_visible = true;
        Ok(())
    }
}

/// The virtio-gpu device model behind virtio-mmio.
pub struct Gpu {
    common: VirtioCommon,
    state: GpuState,
    /// A snapshot's state, applied when the restore re-activates the device (resources
    /// need guest memory).
    restoring: Option<GpuSnapshot>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("state", &self.state)
            .field("activated", &self.common.is_activated())
            .finish_non_exhaustive()
    }
}

impl Gpu {
    /// A gpu device with its shared framebuffer.
    pub fn new(config: GpuConfig) -> Result<Self, GpuError> {
        let common = VirtioCommon::new(
            "virtio-gpu",
            GPU_DEVICE_ID,
            VIRTIO_F_VERSION_1 | VIRTIO_GPU_F_EDID,
            &QUEUE_SIZES,
        )
        .map_err(GpuError::EventFd)?;
        let mut state = GpuState::new(config)?;
        state.metrics = Arc::new(GpuMetrics {
            queues: common.metrics(),
            ..GpuMetrics::default()
        });
        Ok(Self {
            common,
            state,
            restoring: None,
        })
    }

    /// The VMM's handle (resize, framebuffer descriptors, metrics).
    pub fn handle(&self) -> GpuHandle {
        self.state.handle()
    }

    /// Processes every available request of queue `index` and signals the guest if needed.
    pub fn process_queue(&mut self, index: usize) {
        let state = &mut self.state;
        self.common
            .serve_queue(index, |queue, mem| Self::serve_all(state, mem, queue));
    }

    /// Answers every available request of `queue`; returns whether it used any.
    fn serve_all(
        state: &mut GpuState,
        mem: &GuestMemoryMmap,
        queue: &mut DeviceQueue,
    ) -> Result<bool, QueueError> {
        let mut used_any = false;
        while let Some(chain) = queue.pop(mem)? {
            let head = chain.head_index();
            let response = match chain.clone().reader(mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes().min(MAX_REQUEST_LEN);
                    let mut bytes = vec![0u8; len];
                    match reader.read_exact(&mut bytes) {
                        Ok(()) => state.process_request(mem, &bytes),
                        Err(_) => error_response(resp::ERR_UNSPEC),
                    }
                }
                Err(_) => error_response(resp::ERR_UNSPEC),
            };
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(response.len());
                    writer.write_all(&response[..n]).map(|()| n).unwrap_or(0)
                }
                Err(_) => 0,
            };
            queue.add_used(mem, head, written as u32)?;
            used_any = true;
        }
        Ok(used_any)
    }
}

fn error_response(code: u32) -> Vec<u8> {
    decoder::encode_response(&CtrlHeader::default(), &Response::Err(code))
}

impl VirtioDevice for Gpu {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let events_read = lock_display(&self.state.display).events_read;
        // virtio_gpu_config: events_read, events_clear, num_scanouts, num_capsets.
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&events_read.to_le_bytes());
        config[8..12].copy_from_slice(&1u32.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only events_clear (offset 4) is writable: it clears the bits written.
        if offset == 4 && data.len() == 4 {
            let clear = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            lock_display(&self.state.display).events_read &= !clear;
        }
    }

    fn on_activate(&mut self) -> Result<(), ActivateError> {
        // Display-size changes from the VMM raise configuration interrupts from now on.
        lock_display(&self.state.display).interrupt = self.common.interrupt().cloned();
        if let Some(saved) = self.restoring.take() {
            let Some(mem) = self.common.memory().cloned() else {
                return Err(ActivateError::BadQueue("no guest memory".into()));
            };
            self.state.restore(&mem, &saved).map_err(|e| {
                ActivateError::Backend(std::io::Error::other(format!(
                    "restoring the snapshot's resources: {e}"
                )))
            })?;
        }
        Ok(())
    }

    fn save_state(&mut self) -> serde_json::Value {
        serde_json::to_value(self.state.save()).unwrap_or_default()
    }

    /// Takes the display size at once; the resources, scanout and cursor when the
    /// transport re-activates the device (they need its guest memory). A state with
    /// resources for a device that is not re-activated is refused by the transport's
    /// order: it restores an activated device's state before activating it.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved: GpuSnapshot = serde_json::from_value(state.clone())
            .map_err(|e| format!("invalid virtio-gpu state: {e}"))?;
        self.state.restore_display(&saved);
        if !saved.resources.is_empty() || saved.scanout.is_some() || saved.cursor_image.is_some() {
            self.restoring = Some(saved);
        }
        Ok(())
    }

    fn on_reset(&mut self) {
        self.state.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use framebuffer::FramebufferReader;
    use vm_memory::Bytes;

    use super::super::decoder::{cmd, CursorPos, FLAG_FENCE, HEADER_LEN};
    use super::super::test_driver::{guest_memory, DriverQueue, RecordingInterrupt};
    use super::*;
    use crate::devices::virtio::test_utils::check_broken_queue_needs_reset;

    /// Checks that a broken queue `index` puts a fresh device in NEEDS_RESET.
    fn broken_queue_needs_reset(index: usize) {
        let mem = guest_memory(MEM_SIZE);
        let control = DriverQueue::new(&mem, 0);
        let cursor = DriverQueue::new(&mem, 0x4000);
        let gpu = Gpu::new(GpuConfig::with_size(64, 64)).unwrap();

        check_broken_queue_needs_reset(
            gpu,
            &mem,
            &[control.mock(), cursor.mock()],
            index,
            move |gpu: &mut Gpu| gpu.process_queue(index),
        );
    }

    #[test]
    fn broken_control_queue_puts_the_device_in_needs_reset() {
        broken_queue_needs_reset(CONTROL_QUEUE);
    }

    #[test]
    fn broken_cursor_queue_puts_the_device_in_needs_reset() {
        broken_queue_needs_reset(CURSOR_QUEUE);
    }

    const MEM_SIZE: usize = 32 << 20;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    fn rect(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    fn state() -> GpuState {
        GpuState::new(GpuConfig::with_size(640, 480)).unwrap()
    }

    /// RESOURCE_CREATE_2D of a `w` x `h` resource `id` in `format`.
    fn create_as(
        s: &mut GpuState,
        mem: &GuestMemoryMmap,
        id: u32,
        format: Format,
        w: u32,
        h: u32,
    ) -> Response {
        let create = Command::ResourceCreate2d {
            resource_id: id,
            format,
            width: w,
            height: h,
        };
        s.execute(mem, create)
    }

    /// RESOURCE_CREATE_2D of a `w` x `h` B8G8R8X8 resource `id`.
    fn create(s: &mut GpuState, mem: &GuestMemoryMmap, id: u32, w: u32, h: u32) -> Response {
        create_as(s, mem, id, Format::B8G8R8X8, w, h)
    }

    fn set_scanout(resource_id: u32, rect: Rect) -> Command {
        Command::SetScanout {
            scanout_id: 0,
            resource_id,
            rect,
        }
    }

    fn transfer(resource_id: u32, rect: Rect, offset: u64) -> Command {
        Command::TransferToHost2d {
            resource_id,
            rect,
            offset,
        }
    }

    fn flush(resource_id: u32, rect: Rect) -> Command {
        Command::ResourceFlush { resource_id, rect }
    }

    /// A state of a device whose limits are `config`'s.
    fn limited(config: GpuConfig) -> GpuState {
        GpuState::new(config).unwrap()
    }

    /// A 640x480 state and a reader of its shared framebuffer.
    fn state_and_reader() -> (GpuState, FramebufferReader) {
        let s = state();
        let reader = FramebufferReader::new(s.handle().reader_fds().unwrap()).unwrap();
        (s, reader)
    }

    /// A `w` x `h` device activated on `mem`, its control queue's driver side (the cursor
    /// queue is idle) and its interrupt.
    fn active_gpu(
        mem: &GuestMemoryMmap,
        w: u32,
        h: u32,
    ) -> (Gpu, DriverQueue<'_>, Arc<RecordingInterrupt>) {
        let mut gpu = Gpu::new(GpuConfig::with_size(w, h)).unwrap();
        let ctrl = DriverQueue::new(mem, 0);
        let cursor = DriverQueue::new(mem, 0x4000);
        let irq = RecordingInterrupt::new();
        let queues = vec![ctrl.device_queue(), cursor.device_queue()];
        gpu.activate(mem.clone(), irq.clone(), queues).unwrap();
        (gpu, ctrl, irq)
    }

    fn attach(
        s: &mut GpuState,
        mem: &GuestMemoryMmap,
        id: u32,
        entries: &[(u64, u32)],
    ) -> Response {
        s.execute(
            mem,
            Command::ResourceAttachBacking {
                resource_id: id,
                entries: entries
                    .iter()
                    .map(|&(addr, len)| MemEntry { addr, len })
                    .collect(),
            },
        )
    }

    fn err(code: u32) -> Response {
        Response::Err(code)
    }

    /// Checks that each of `commands` is answered with the error `code`.
    fn assert_each_answers(
        s: &mut GpuState,
        mem: &GuestMemoryMmap,
        commands: impl IntoIterator<Item = Command>,
        code: u32,
    ) {
        for c in commands {
            assert_eq!(s.execute(mem, c.clone()), err(code), "{c:?}");
        }
    }

    #[test]
    fn backing_lists_count_against_the_host_memory_limit() {
        let mem = guest_memory(MEM_SIZE);
        let config = GpuConfig {
            max_host_memory: 1 << 20,
            ..GpuConfig::with_size(64, 64)
        };
        let mut s = limited(config);
        let max = decoder::MAX_MEM_ENTRIES as usize;
        let list = vec![(0x1000, 16); max];
        // Each full list costs max * BACKING_ENTRY_COST (384 KiB): two fit beside four
        // 16 KiB resources in 1 MiB, a third does not.
        for id in 1..=4 {
            assert_eq!(create(&mut s, &mem, id, 64, 64), Response::OkNoData);
        }
        assert_eq!(attach(&mut s, &mem, 1, &list), Response::OkNoData);
        assert_eq!(attach(&mut s, &mem, 2, &list), Response::OkNoData);

        assert_eq!(attach(&mut s, &mem, 3, &list), err(resp::ERR_OUT_OF_MEMORY));
        assert_eq!(
            create(&mut s, &mem, 5, 256, 256),
            err(resp::ERR_OUT_OF_MEMORY),
            "the lists' memory is not available for pixels either"
        );

        // Detaching or destroying gives the memory back.
        let detach = Command::ResourceDetachBacking { resource_id: 1 };
        assert_eq!(s.execute(&mem, detach), Response::OkNoData);
        assert_eq!(attach(&mut s, &mem, 3, &list), Response::OkNoData);
        assert_eq!(attach(&mut s, &mem, 4, &list), err(resp::ERR_OUT_OF_MEMORY));
        let unref = Command::ResourceUnref { resource_id: 2 };
        assert_eq!(s.execute(&mem, unref), Response::OkNoData);
        assert_eq!(attach(&mut s, &mem, 4, &list), Response::OkNoData);
    }

    #[test]
    fn commands_on_unknown_resources_answer_invalid_resource_id() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        let r = rect(0, 0, 1, 1);
        let commands = [
            Command::ResourceUnref { resource_id: 9 },
            Command::ResourceAttachBacking {
                resource_id: 9,
                entries: vec![],
            },
            Command::ResourceDetachBacking { resource_id: 9 },
            set_scanout(9, r),
            transfer(9, r, 0),
            flush(9, r),
            Command::UpdateCursor {
                pos: CursorPos::default(),
                resource_id: 9,
                hot_x: 0,
                hot_y: 0,
            },
        ];
        assert_each_answers(&mut s, &mem, commands, resp::ERR_INVALID_RESOURCE_ID);
    }

    #[test]
    fn duplicate_resource_id_is_rejected() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        assert_eq!(create(&mut s, &mem, 1, 4, 4), Response::OkNoData);
        assert_eq!(
            create(&mut s, &mem, 1, 4, 4),
            err(resp::ERR_INVALID_RESOURCE_ID)
        );
    }

    #[test]
    fn backing_entries_outside_guest_memory_are_an_error_response() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        create(&mut s, &mem, 1, 4, 4);
        let end = MEM_SIZE as u64;
        for entries in [
            vec![(end, 64)],
            vec![(end - 32, 64)],
            vec![(0x1000, 64), (u64::MAX - 8, 8)],
        ] {
            assert_eq!(
                attach(&mut s, &mem, 1, &entries),
                err(resp::ERR_UNSPEC),
                "{entries:?}"
            );
        }
        // A rejected attach leaves the resource without backing.
        assert_eq!(attach(&mut s, &mem, 1, &[(0x1000, 64)]), Response::OkNoData);
        assert_eq!(
            attach(&mut s, &mem, 1, &[(0x1000, 64)]),
            err(resp::ERR_UNSPEC)
        );
    }

    #[test]
    fn resource_count_limit_answers_out_of_memory() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = limited(GpuConfig {
            max_resources: 2,
            ..GpuConfig::with_size(64, 64)
        });
        create(&mut s, &mem, 1, 4, 4);
        create(&mut s, &mem, 2, 4, 4);
        assert_eq!(create(&mut s, &mem, 3, 4, 4), err(resp::ERR_OUT_OF_MEMORY));
        s.execute(&mem, Command::ResourceUnref { resource_id: 1 });
        assert_eq!(create(&mut s, &mem, 3, 4, 4), Response::OkNoData);
    }

    #[test]
    fn host_memory_limit_answers_out_of_memory_and_unref_gives_it_back() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = limited(GpuConfig {
            max_host_memory: 1 << 20,
            ..GpuConfig::with_size(64, 64)
        });
        // 512x512x4 = 1 MiB: the whole budget.
        assert_eq!(create(&mut s, &mem, 1, 512, 512), Response::OkNoData);
        assert_eq!(
            create(&mut s, &mem, 2, 16, 16),
            err(resp::ERR_OUT_OF_MEMORY)
        );
        assert_eq!(
            create(&mut s, &mem, 3, 16384, 16384),
            err(resp::ERR_OUT_OF_MEMORY)
        );
        s.execute(&mem, Command::ResourceUnref { resource_id: 1 });
        assert_eq!(create(&mut s, &mem, 2, 16, 16), Response::OkNoData);
    }

    #[test]
    fn out_of_range_rectangles_answer_invalid_parameter() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        create(&mut s, &mem, 1, 16, 8);
        attach(&mut s, &mem, 1, &[(0x10_0000, 16 * 8 * 4)]);
        for r in [rect(0, 0, 17, 8), rect(0, 1, 16, 8), rect(16, 0, 1, 1)] {
            let commands = [set_scanout(1, r), transfer(1, r, 0), flush(1, r)];
            assert_each_answers(&mut s, &mem, commands, resp::ERR_INVALID_PARAMETER);
        }
    }

    #[test]
    fn transfer_beyond_the_backing_or_without_backing_is_rejected() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        create(&mut s, &mem, 1, 16, 8);
        let transfer = |offset| transfer(1, rect(0, 0, 16, 8), offset);
        assert_eq!(s.execute(&mem, transfer(0)), err(resp::ERR_UNSPEC));
        // One byte short of the 16x8x4 the transfer reads.
        attach(&mut s, &mem, 1, &[(0x10_0000, 16 * 8 * 4 - 1)]);
        assert_eq!(
            s.execute(&mem, transfer(0)),
            err(resp::ERR_INVALID_PARAMETER)
        );
        // Offsets whose arithmetic overflows are rejected, not wrapped.
        assert_eq!(
            s.execute(&mem, transfer(u64::MAX - 4)),
            err(resp::ERR_INVALID_PARAMETER)
        );
        s.execute(&mem, Command::ResourceDetachBacking { resource_id: 1 });
        assert_eq!(s.execute(&mem, transfer(0)), err(resp::ERR_UNSPEC));
    }

    #[test]
    fn set_scanout_on_a_scanout_other_than_zero_is_rejected() {
        let mem = guest_memory(MEM_SIZE);
        let mut s = state();
        create(&mut s, &mem, 1, 16, 8);
        assert_eq!(
            s.execute(
                &mem,
                Command::SetScanout {
                    scanout_id: 1,
                    resource_id: 1,
                    rect: rect(0, 0, 16, 8)
                }
            ),
            err(resp::ERR_INVALID_SCANOUT_ID)
        );
        assert_eq!(
            s.execute(&mem, Command::GetEdid { scanout_id: 3 }),
            err(resp::ERR_INVALID_SCANOUT_ID)
        );
    }

    #[test]
    fn a_restored_gpu_shows_the_saved_frame_and_keeps_its_resources_backing() {
        let mem = guest_memory(MEM_SIZE);
        let (mut gpu, _ctrl, _irq) = active_gpu(&mem, 640, 480);
        let pattern: Vec<u8> = (0..8 * 8 * 4).map(|i| (i % 253) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x10_0000)).unwrap();
        let full = rect(0, 0, 8, 8);
        create(&mut gpu.state, &mem, 1, 8, 8);
        attach(&mut gpu.state, &mem, 1, &[(0x10_0000, 256)]);
        gpu.state.execute(&mem, set_scanout(1, full));
        gpu.state.execute(&mem, transfer(1, full, 0));
        gpu.state.execute(&mem, flush(1, full));
        let json = serde_json::to_vec(&gpu.save_state()).unwrap();

        let mut restored = Gpu::new(GpuConfig::with_size(640, 480)).unwrap();
        let mut reader = FramebufferReader::new(restored.handle().reader_fds().unwrap()).unwrap();
        restored
            .restore_state(&serde_json::from_slice(&json).unwrap())
            .unwrap();
        let ctrl = DriverQueue::new(&mem, 0x20_0000);
        let cursor = DriverQueue::new(&mem, 0x20_4000);
        restored
            .activate(
                mem.clone(),
                RecordingInterrupt::new(),
                vec![ctrl.device_queue(), cursor.device_queue()],
            )
            .unwrap();
        let shown = reader.wait_frame(soon()).unwrap().unwrap();
        let (shown_size, shown_pixels) = (
            (shown.info.width, shown.info.height),
            shown.pixels[..256].to_vec(),
        );
        mem.write_slice(&[0x5a; 256], GuestAddress(0x10_0000))
            .unwrap();
        restored.state.execute(&mem, transfer(1, full, 0));
        restored.state.execute(&mem, flush(1, full));
        let redrawn = reader.wait_frame(soon()).unwrap().unwrap();

        assert_eq!(shown_size, (8, 8));
        assert_eq!(shown_pixels, pattern);
        assert_eq!(&redrawn.pixels[..256], &[0x5a; 256][..], "backing restored");
    }

    #[test]
    fn a_saved_resource_with_the_wrong_pixel_count_fails_the_restore() {
        let mem = guest_memory(MEM_SIZE);
        let (mut gpu, _ctrl, _irq) = active_gpu(&mem, 640, 480);
        create(&mut gpu.state, &mem, 1, 8, 8);
        let mut saved: GpuSnapshot = serde_json::from_value(gpu.save_state()).unwrap();
        saved.resources[0].pixels.truncate(10);
        let mut restored = Gpu::new(GpuConfig::with_size(640, 480)).unwrap();
        restored
            .restore_state(&serde_json::to_value(&saved).unwrap())
            .unwrap();
        let ctrl = DriverQueue::new(&mem, 0x20_0000);
        let cursor = DriverQueue::new(&mem, 0x20_4000);

        let err = restored
            .activate(
                mem.clone(),
                RecordingInterrupt::new(),
                vec![ctrl.device_queue(), cursor.device_queue()],
            )
            .unwrap_err();

        assert!(
            err.to_string()
                .contains("device backend failed to activate"),
            "{err}"
        );
        assert!(!restored.is_activated());
    }

    #[test]
    fn every_format_is_published_as_bgrx() {
        let mem = guest_memory(MEM_SIZE);
        // Memory bytes of the pixel (R=0x11, G=0x22, B=0x33, A/X=0x44) in each format.
        let cases = [
            (Format::B8G8R8X8, [0x33, 0x22, 0x11, 0x44]),
            (Format::B8G8R8A8, [0x33, 0x22, 0x11, 0x44]),
            (Format::X8R8G8B8, [0x44, 0x11, 0x22, 0x33]),
            (Format::A8R8G8B8, [0x44, 0x11, 0x22, 0x33]),
            (Format::R8G8B8X8, [0x11, 0x22, 0x33, 0x44]),
            (Format::R8G8B8A8, [0x11, 0x22, 0x33, 0x44]),
            (Format::X8B8G8R8, [0x44, 0x33, 0x22, 0x11]),
            (Format::A8B8G8R8, [0x44, 0x33, 0x22, 0x11]),
        ];
        for (format, bytes) in cases {
            let (mut s, mut reader) = state_and_reader();
            mem.write_slice(&bytes.repeat(4), GuestAddress(0x10_0000))
                .unwrap();
            create_as(&mut s, &mem, 1, format, 2, 2);
            attach(&mut s, &mem, 1, &[(0x10_0000, 16)]);
            let full = rect(0, 0, 2, 2);
            s.execute(&mem, set_scanout(1, full));
            s.execute(&mem, transfer(1, full, 0));
            s.execute(&mem, flush(1, full));
            let frame = reader.wait_frame(soon()).unwrap().unwrap();
            assert_eq!(&frame.pixels[..4], &[0x33, 0x22, 0x11, 0x44], "{format:?}");
        }
    }

    #[test]
    fn scanout_of_a_sub_rectangle_publishes_damage_in_scanout_coordinates() {
        let mem = guest_memory(MEM_SIZE);
        let (mut s, mut reader) = state_and_reader();
        create(&mut s, &mem, 1, 32, 32);
        s.execute(&mem, set_scanout(1, rect(8, 8, 16, 16)));
        let first = reader.wait_frame(soon()).unwrap().unwrap();
        assert_eq!(
            (first.info.width, first.info.height, first.info.stride),
            (16, 16, 128)
        );

        s.execute(&mem, flush(1, rect(0, 0, 10, 10)));

        let frame = reader.wait_frame(soon()).unwrap().unwrap();
        assert_eq!(
            frame.damage,
            vec![framebuffer::Rect {
                x: 0,
                y: 0,
                width: 2,
                height: 2
            }]
        );
    }

    #[test]
    fn unref_of_the_scanout_resource_disables_the_published_scanout() {
        let mem = guest_memory(MEM_SIZE);
        let (mut s, reader) = state_and_reader();
        create(&mut s, &mem, 1, 8, 8);
        s.execute(&mem, set_scanout(1, rect(0, 0, 8, 8)));
        assert!(reader.info().unwrap().enabled());

        assert_eq!(
            s.execute(&mem, Command::ResourceUnref { resource_id: 1 }),
            Response::OkNoData
        );

        assert!(!reader.info().unwrap().enabled());
    }

    #[test]
    fn cursor_update_publishes_image_hotspot_and_hotspot_position() {
        let mem = guest_memory(MEM_SIZE);
        let (mut s, reader) = state_and_reader();
        let image: Vec<u8> = (0..64 * 64 * 4).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&image, GuestAddress(0x10_0000)).unwrap();
        create_as(&mut s, &mem, 5, Format::B8G8R8A8, 64, 64);
        attach(&mut s, &mem, 5, &[(0x10_0000, image.len() as u32)]);
        s.execute(&mem, transfer(5, rect(0, 0, 64, 64), 0));

        let pos = CursorPos {
            scanout_id: 0,
            x: 100,
            y: 50,
        };
        let r = s.execute(
            &mem,
            Command::UpdateCursor {
                pos,
                resource_id: 5,
                hot_x: 2,
                hot_y: 3,
            },
        );
        assert_eq!(r, Response::OkNoData);
        let c = reader.cursor().unwrap();
        // The guest places the image's corner at (100, 50): the pointer is at its hotspot.
        assert_eq!(
            (c.visible, c.x, c.y, c.hot_x, c.hot_y),
            (true, 102, 53, 2, 3)
        );
        assert_eq!(c.image, image);

        s.execute(
            &mem,
            Command::MoveCursor {
                pos: CursorPos {
                    scanout_id: 0,
                    x: 7,
                    y: 9,
                },
            },
        );
        let moved = reader.cursor().unwrap();
        assert_eq!((moved.visible, moved.x, moved.y), (true, 9, 12));

        create_as(&mut s, &mem, 6, Format::B8G8R8A8, 32, 32);
        assert_eq!(
            s.execute(
                &mem,
                Command::UpdateCursor {
                    pos,
                    resource_id: 6,
                    hot_x: 0,
                    hot_y: 0
                }
            ),
            err(resp::ERR_INVALID_PARAMETER)
        );
    }

    #[test]
    fn display_size_request_raises_a_config_interrupt_and_is_reported() {
        let mem = guest_memory(MEM_SIZE);
        let (mut gpu, _ctrl, irq) = active_gpu(&mem, 640, 480);
        let handle = gpu.handle();
        let events_read = |gpu: &Gpu| {
            let mut b = [0u8; 4];
            gpu.read_config(0, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(events_read(&gpu), 0);

        handle.set_display_size(1920, 1080).unwrap();

        assert_eq!(irq.count(InterruptKind::Config), 1);
        assert_eq!(events_read(&gpu), EVENT_DISPLAY);
        assert_eq!(
            gpu.state.execute(&mem, Command::GetDisplayInfo),
            Response::DisplayInfo(vec![Some((1920, 1080))])
        );
        gpu.write_config(4, &EVENT_DISPLAY.to_le_bytes());
        assert_eq!(events_read(&gpu), 0);
        assert!(matches!(
            handle.set_display_size(0, 1080),
            Err(GpuError::BadDisplaySize { .. })
        ));
    }

    fn request(ty: u32, flags: u32, fence: u64, fields: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&fence.to_le_bytes());
        b.extend_from_slice(&[0; 8]);
        for f in fields {
            b.extend_from_slice(&f.to_le_bytes());
        }
        b
    }

    /// Guest address of request `i`'s response buffer (0x100 bytes each).
    fn response_addr(i: usize) -> u64 {
        0x9_0000 + i as u64 * 0x100
    }

    /// Posts `requests` as requests number `first`.. (one page each from 0x8_0000), each with
    /// its response buffer at [`response_addr`].
    fn post_numbered(ctrl: &mut DriverQueue<'_>, requests: &[Vec<u8>], first: usize) {
        for (i, r) in requests.iter().enumerate() {
            let i = first + i;
            ctrl.post_request(0x8_0000 + i as u64 * 0x1000, r, response_addr(i), 0x100);
        }
    }

    /// The whole path through real queues: create, attach scatter-gather backing, set
    /// scanout, transfer a sub-rectangle, flush with a fence; then read the frame through a
    /// second, read-only mapping of the memfd.
    #[test]
    fn frame_drawn_through_the_control_queue_is_readable_from_a_second_mapping() {
        const W: u32 = 64;
        const H: u32 = 48;
        let mem = guest_memory(MEM_SIZE);
        let (mut gpu, mut ctrl, irq) = active_gpu(&mem, W, H);
        let mut reader = FramebufferReader::new(gpu.handle().reader_fds().unwrap()).unwrap();

        // Backing in two pieces, split mid-row, in non-adjacent guest memory.
        let pixel = |x: u32, y: u32| [x as u8, y as u8, (x ^ y) as u8, 0xff];
        let image: Vec<u8> = (0..H)
            .flat_map(|y| (0..W).flat_map(move |x| pixel(x, y)))
            .collect();
        let split = 5000u32;
        let (a, b) = (0x10_0000u64, 0x30_0000u64);
        mem.write_slice(&image[..split as usize], GuestAddress(a))
            .unwrap();
        mem.write_slice(&image[split as usize..], GuestAddress(b))
            .unwrap();
        let rest = image.len() as u32 - split;

        let setup = [
            request(cmd::RESOURCE_CREATE_2D, 0, 0, &[1, 2, W, H]),
            request(
                cmd::RESOURCE_ATTACH_BACKING,
                0,
                0,
                &[1, 2, a as u32, 0, split, 0, b as u32, 0, rest, 0],
            ),
            request(cmd::SET_SCANOUT, 0, 0, &[0, 0, W, H, 0, 1]),
        ];
        post_numbered(&mut ctrl, &setup, 0);
        gpu.process_queue(CONTROL_QUEUE);
        let initial = reader.wait_frame(soon()).unwrap().expect("scanout set");
        assert!(
            initial.pixels.iter().all(|&p| p == 0),
            "new resources start black"
        );

        let (rx, ry, rw, rh) = (8u32, 4u32, 20u32, 10u32);
        let offset = (ry * W + rx) * 4;
        let draw = [
            request(
                cmd::TRANSFER_TO_HOST_2D,
                0,
                0,
                &[rx, ry, rw, rh, offset, 0, 1, 0],
            ),
            request(cmd::RESOURCE_FLUSH, FLAG_FENCE, 77, &[rx, ry, rw, rh, 1, 0]),
        ];
        post_numbered(&mut ctrl, &draw, setup.len());
        gpu.process_queue(CONTROL_QUEUE);

        let used = ctrl.used();
        assert_eq!(used.len(), 5);
        for (i, &(_, len)) in used.iter().enumerate() {
            assert_eq!(len as usize, HEADER_LEN);
            let out: [u8; HEADER_LEN] = mem.read_obj(GuestAddress(response_addr(i))).unwrap();
            let header = decoder::decode_header(&out).unwrap();
            assert_eq!(header.ty, resp::OK_NODATA, "request {i}");
        }
        let flush_resp: [u8; HEADER_LEN] = mem.read_obj(GuestAddress(response_addr(4))).unwrap();
        let flush_header = decoder::decode_header(&flush_resp).unwrap();
        assert_eq!(
            (flush_header.flags & FLAG_FENCE, flush_header.fence_id),
            (FLAG_FENCE, 77)
        );
        assert!(irq.count(InterruptKind::Queue) >= 2);

        let frame = reader.wait_frame(soon()).unwrap().expect("flushed frame");
        assert_eq!(
            frame.damage,
            vec![framebuffer::Rect {
                x: rx,
                y: ry,
                width: rw,
                height: rh
            }]
        );
        for y in 0..H {
            for x in 0..W {
                let at = (y * frame.info.stride + x * 4) as usize;
                let inside = (rx..rx + rw).contains(&x) && (ry..ry + rh).contains(&y);
                let expected = if inside { pixel(x, y) } else { [0; 4] };
                assert_eq!(frame.pixels[at..at + 4], expected, "pixel ({x}, {y})");
            }
        }
        assert_eq!(gpu.handle().metrics().values().flushes, 1);
    }

    #[test]
    fn malformed_request_on_the_queue_gets_an_error_response_with_its_fence() {
        let mem = guest_memory(MEM_SIZE);
        let (mut gpu, mut ctrl, _irq) = active_gpu(&mem, 64, 64);
        let mut truncated = request(cmd::RESOURCE_CREATE_2D, FLAG_FENCE, 5, &[1, 2]);
        truncated.truncate(HEADER_LEN + 8);
        ctrl.post_request(0x8_0000, &truncated, 0x9_0000, 0x100);
        ctrl.post_request(0x8_1000, &[1, 2, 3], 0x9_1000, 0x100);

        gpu.process_queue(CONTROL_QUEUE);

        let first: [u8; HEADER_LEN] = mem.read_obj(GuestAddress(0x9_0000)).unwrap();
        let h = decoder::decode_header(&first).unwrap();
        assert_eq!((h.ty, h.fence_id), (resp::ERR_UNSPEC, 5));
        let second: [u8; HEADER_LEN] = mem.read_obj(GuestAddress(0x9_1000)).unwrap();
        assert_eq!(
            decoder::decode_header(&second).unwrap().ty,
            resp::ERR_UNSPEC
        );
        assert_eq!(gpu.handle().metrics().values().errors, 2);
    }
}
