//! The virtio-vsock device: the guest's CID in the configuration space, the RX, TX and
//! event queues, and the passes that move packets between them and the connection table.
//!
//! A TX chain is device-readable only; its header is checked ([`Packet::parse`], `len`
//! against what the chain holds after the header: the CVE-2019-18960 class) before a byte
//! of payload is read. An RX chain is device-writable only and must hold a header; each
//! gets one packet. After every pass the host side is pumped and the RX queue filled
//! again, so a packet the connection table owes goes out as soon as the guest has a
//! buffer for it. The event queue carries the transport reset event
//! ([`Vsock::transport_reset`]).

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Reader, Writer};
use vmm_sys_util::timerfd::TimerFd;

use super::host::{FdChange, HostError, HostSide};
use super::metrics::{bump, VsockMetrics};
use super::muxer::{Muxer, StreamId};
use super::packet::{Header, Packet, PacketError, HDR_LEN, MAX_PAYLOAD};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, DeviceQueue, GuestMemoryMmap, QueueError, VirtioCommon,
    VirtioDevice,
};

/// Size of each queue (as Firecracker; Linux takes what the device offers).
pub const VSOCK_QUEUE_SIZE: u16 = 256;
/// Index of the receive queue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (driver to device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue.
pub const EVENT_QUEUE: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
const EVENT_LEN: usize = 4;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The Unix socket could not be set up.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A queue eventfd could not be created.
    #[error("cannot create the virtio-vsock queue eventfds")]
    EventFd(#[source] io::Error),
    /// The timer for connection deadlines could not be created.
    #[error("cannot create the virtio-vsock timer")]
    Timer(#[source] io::Error),
}

/// A virtio-vsock device in the hybrid design: guest streams reach Unix sockets.
pub struct Vsock {
    common: VirtioCommon,
    /// `struct virtio_vsock_config`: `guest_cid`, le64.
    config: [u8; 8],
    muxer: Muxer,
    host: HostSide,
    timer: TimerFd,
    timer_deadline: Option<Instant>,
    reset_event_pending: bool,
    /// Payload of the packet being moved (at most MAX_PAYLOAD bytes).
    payload: Vec<u8>,
    metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for guest `guest_cid` (validated by the configuration: ≥ 3) listening on
    /// the Unix socket `path`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockError> {
        let common = VirtioCommon::new(
            "virtio-vsock",
            VIRTIO_ID_VSOCK,
            1 << VIRTIO_F_VERSION_1,
            &[VSOCK_QUEUE_SIZE; 3],
        )
        .map_err(VsockError::EventFd)?;
        let metrics = Arc::new(VsockMetrics {
            queues: common.metrics(),
            ..VsockMetrics::default()
        });
        let timer = TimerFd::new().map_err(|e| VsockError::Timer(e.into()))?;
        // Non-blocking: an expiry may be read after the timer was re-armed.
        set_nonblocking(timer.as_raw_fd()).map_err(VsockError::Timer)?;
        let host = HostSide::bind(path)?;
        Ok(Self {
            common,
            config: guest_cid.to_le_bytes(),
            muxer: Muxer::new(guest_cid, metrics.clone()),
            host,
            timer,
            timer_deadline: None,
            reset_event_pending: false,
            payload: Vec::with_capacity(MAX_PAYLOAD as usize),
            metrics,
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<VsockMetrics> {
        self.metrics.clone()
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.muxer.guest_cid()
    }

    /// The host side (listener and streams).
    pub fn host(&self) -> &HostSide {
        &self.host
    }

    /// The deadline timer, for the event loop.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// Descriptors the event loop should start or stop watching.
    pub fn take_fd_changes(&mut self) -> Vec<FdChange> {
        self.host.take_changes()
    }

    /// The guest queued packets: each is checked and handed to the connection table.
    pub fn process_tx(&mut self, now: Instant) {
        let muxer = &mut self.muxer;
        let payload = &mut self.payload;
        let metrics = &self.metrics;
        self.common.serve_queue(TX_QUEUE, |tx, mem| {
            tx.drain(mem, |chain| {
                transmit(muxer, metrics, payload, mem, chain);
                0
            })
        });
        self.run(now);
    }

    /// The guest added RX buffers.
    pub fn process_rx(&mut self, now: Instant) {
        self.run(now);
    }

    /// The guest added event buffers: a transport reset event waiting for one goes out.
    pub fn process_event_queue(&mut self) {
        if !self.reset_event_pending {
            return;
        }
        let pending = &mut self.reset_event_pending;
        let metrics = &self.metrics;
        self.common.serve_queue(EVENT_QUEUE, |q, mem| {
            send_reset_event(q, mem, pending, metrics)
        });
    }

    /// Host programs connected to the listener.
    pub fn process_listener(&mut self, now: Instant) {
        self.host.accept_all(now, &self.metrics);
        self.run(now);
    }

    /// Host stream `id` became readable or writable (or hung up).
    pub fn process_stream(&mut self, id: StreamId, readable: bool, writable: bool, now: Instant) {
        self.host
            .stream_event(id, readable, writable, &mut self.muxer);
        self.run(now);
    }

    /// The deadline timer fired.
    pub fn process_timer(&mut self, now: Instant) {
        // The count does not matter; an empty timer (re-armed since) reads EAGAIN.
        let _ = self.timer.wait();
        self.timer_deadline = None;
        self.muxer.tick(now);
        self.host.expire_handshakes(now, &self.metrics);
        self.run(now);
    }

    /// Drops every connection and tells the guest with the transport reset event
    /// (virtio 1.2 §5.10.6.6), as after a snapshot restore: the driver then drops its
    /// connections and reads the guest CID again.
    pub fn transport_reset(&mut self, now: Instant) {
        self.muxer.reset();
        bump(&self.metrics.transport_resets, 1);
        self.reset_event_pending = true;
        self.process_event_queue();
        self.run(now);
    }

    /// Pumps the host side and fills the RX queue until neither moves, then arms the timer
    /// for the next deadline.
    fn run(&mut self, now: Instant) {
        // Each round either moves bytes or stops; a bound keeps one busy connection from
        // holding the event loop.
        for _ in 0..16 {
            self.host.pump(&mut self.muxer, now, &self.metrics);
            if !self.muxer.has_rx() || !self.common.is_activated() {
                break;
            }
            let muxer = &mut self.muxer;
            let payload = &mut self.payload;
            let metrics = &self.metrics;
            let mut delivered = false;
            self.common.serve_queue(RX_QUEUE, |rx, mem| {
                let used = receive(muxer, metrics, payload, rx, mem)?;
                delivered = used;
                Ok(used)
            });
            if !delivered {
                break;
            }
        }
        self.arm_timer(now);
    }

    fn arm_timer(&mut self, now: Instant) {
        let next = [self.muxer.next_deadline(), self.host.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        if next == self.timer_deadline {
            return;
        }
        let result = match next {
            Some(at) => {
                let wait = at
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
                self.timer.reset(wait, None)
            }
            None => self.timer.clear(),
        };
        match result {
            Ok(()) => self.timer_deadline = next,
            Err(e) => tracing::error!("virtio-vsock: cannot arm the timer: {e}"),
        }
    }
}

fn set_nonblocking(fd: std::os::fd::RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor this device owns; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One TX chain: header checked, payload read, handed to the table. Malformed chains are
/// dropped (with an RST where the packet can be answered).
fn transmit(
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    payload: &mut Vec<u8>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) {
    if chain.clone().any(|d| d.is_write_only()) {
        bump(&metrics.tx_malformed, 1);
        crate::guest_warn!("virtio-vsock: TX chain with a device-writable descriptor dropped");
        return;
    }
    let mut reader = match Reader::new(mem, chain) {
        Ok(r) => r,
        Err(e) => {
            bump(&metrics.tx_malformed, 1);
            crate::guest_warn!("virtio-vsock: TX chain dropped: {e}");
            return;
        }
    };
    let chain_len = reader.available_bytes();
    let mut bytes = [0u8; HDR_LEN];
    if chain_len < HDR_LEN || reader.read_exact(&mut bytes).is_err() {
        bump(&metrics.tx_malformed, 1);
        crate::guest_warn!("virtio-vsock: {}", PacketError::Short(chain_len));
        return;
    }
    let hdr = Header::decode(&bytes);
    let available = (chain_len - HDR_LEN) as u64;
    let packet = match Packet::parse(hdr, muxer.guest_cid(), available) {
        Ok(p) => p,
        Err(e) => {
            crate::guest_warn!("virtio-vsock: TX packet refused: {e}");
            muxer.guest_malformed(&hdr, e.answer_rst(&hdr));
            return;
        }
    };
    payload.clear();
    // len ≤ MAX_PAYLOAD and ≤ what the chain holds, checked by parse.
    payload.resize(hdr.len as usize, 0);
    if let Err(e) = reader.read_exact(payload) {
        crate::guest_warn!("virtio-vsock: TX payload unreadable: {e}");
        muxer.guest_malformed(&hdr, true);
        return;
    }
    muxer.guest_packet(&packet, payload);
}

/// Fills RX chains with the packets the table owes; returns whether a chain was used.
fn receive(
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    payload: &mut Vec<u8>,
    rx: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    while muxer.has_rx() {
        let Some(chain) = rx.pop(mem)? else {
            break;
        };
        let head = chain.head_index();
        let Some(mut writer) = rx_writer(metrics, mem, chain) else {
            rx.add_used(mem, head, 0)?;
            used_any = true;
            continue;
        };
        let room = (writer.available_bytes() - HDR_LEN).min(MAX_PAYLOAD as usize);
        let Some(hdr) = muxer.pop_rx(room, payload) else {
            // Only stale entries were queued: give the buffer back for later.
            rx.undo_pop();
            break;
        };
        let written = writer
            .write_all(&hdr.encode())
            .and_then(|()| writer.write_all(payload));
        if let Err(e) = written {
            // The chain's memory was checked when the writer was built.
            crate::guest_warn!("virtio-vsock: cannot write an RX buffer: {e}");
        }
        // A header and at most MAX_PAYLOAD bytes.
        rx.add_used(mem, head, writer.bytes_written() as u32)?;
        used_any = true;
    }
    Ok(used_any)
}

/// A writer over an RX chain that is device-writable only and holds at least a header.
fn rx_writer<'m>(
    metrics: &VsockMetrics,
    mem: &'m GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Option<Writer<'m>> {
    let refuse = |why: &dyn std::fmt::Display| {
        bump(&metrics.rx_malformed_chains, 1);
        crate::guest_warn!("virtio-vsock: RX chain returned unused: {why}");
        None
    };
    if chain.clone().any(|d| !d.is_write_only()) {
        return refuse(&"device-readable descriptor");
    }
    match Writer::new(mem, chain) {
        Ok(w) if w.available_bytes() >= HDR_LEN => Some(w),
        Ok(w) => refuse(&format_args!(
            "{} bytes cannot hold a {HDR_LEN}-byte header",
            w.available_bytes()
        )),
        Err(e) => refuse(&e),
    }
}

/// Puts the transport reset event into the next event buffer, if there is one.
fn send_reset_event(
    q: &mut DeviceQueue,
    mem: &GuestMemoryMmap,
    pending: &mut bool,
    metrics: &VsockMetrics,
) -> Result<bool, QueueError> {
    let mut used_any = false;
    while *pending {
        let Some(chain) = q.pop(mem)? else {
            break;
        };
        let head = chain.head_index();
        let Some(mut writer) = (match Writer::new(mem, chain.clone()) {
            Ok(w)
                if w.available_bytes() >= EVENT_LEN && chain.clone().all(|d| d.is_write_only()) =>
            {
                Some(w)
            }
            _ => None,
        }) else {
            bump(&metrics.rx_malformed_chains, 1);
            crate::guest_warn!(
                "virtio-vsock: event buffer returned unused: not a writable 4-byte buffer"
            );
            q.add_used(mem, head, 0)?;
            used_any = true;
            continue;
        };
        let len = match writer.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes()) {
            Ok(()) => {
                *pending = false;
                EVENT_LEN as u32
            }
            Err(e) => {
                crate::guest_warn!("virtio-vsock: cannot write the event buffer: {e}");
                0
            }
        };
        q.add_used(mem, head, len)?;
        used_any = true;
    }
    Ok(used_any)
}

impl VirtioDevice for Vsock {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // guest_cid is read-only: the default write_config ignores writes.

    fn on_activate(&mut self) -> Result<(), ActivateError> {
        // Packets owed before the driver was ready (a host CONNECT) go out now.
        self.process_tx(Instant::now());
        // A restored device owes the transport reset event (`restore_state`); the guest's
        // event buffers were posted before the snapshot, so nothing else would send it.
        self.process_event_queue();
        Ok(())
    }

    /// The guest CID; connections are not saved (their host ends belong to the
    /// snapshotted VMM's processes).
    fn save_state(&mut self) -> serde_json::Value {
        serde_json::json!({ "guest_cid": self.guest_cid() })
    }

    /// Checks the CID and owes the guest the transport reset event, which makes its
    /// driver drop the connections it had when the snapshot was taken (virtio 1.2
    /// §5.10.6.6); the event goes out as soon as the device is re-activated.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let cid = state
            .get("guest_cid")
            .and_then(serde_json::Value::as_u64)
            .ok_or("invalid virtio-vsock state: no guest_cid")?;
        if cid != self.guest_cid() {
            return Err(format!(
                "the snapshot's guest CID is {cid}, this device's {}",
                self.guest_cid()
            ));
        }
        self.muxer.reset();
        bump(&self.metrics.transport_resets, 1);
        self.reset_event_pending = true;
        Ok(())
    }

    fn on_reset(&mut self) {
        // The driver forgot its sockets: so does the device.
        self.muxer.reset();
        self.reset_event_pending = false;
        self.host
            .pump(&mut self.muxer, Instant::now(), &self.metrics);
    }
}
