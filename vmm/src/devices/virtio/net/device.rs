//! The virtio-net device: MAC and link status in the configuration space, an RX and a TX
//! queue, and frames moved between those queues and a [`FrameBackend`].
//!
//! No offloads are offered, so every frame carries an all-zero virtio-net header in both
//! directions (the device rewrites it rather than trusting either side's). A frame read
//! from the backend while the guest has no RX buffers is held until the guest adds some:
//! the backend is watched edge-triggered, and an RX queue notification resumes reading.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP};

use super::chain::{
    gather, rx_segments, scatter, tx_segments, ChainError, MAX_FRAME_LEN, MIN_FRAME_LEN,
};
use super::tap::{FrameBackend, Tap, TapError, VNET_HDR_LEN};
use crate::devices::virtio::{
    read_config_bytes, ActivateError, DeviceQueue, GuestMemoryMmap, QueueError, QueueMetrics,
    VirtioCommon, VirtioDevice,
};
use crate::devices::DeviceMetrics;

/// Size of each of the two queues.
pub const NET_QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Bytes of `struct virtio_net_config` exposed: mac (6), status (u16).
const CONFIG_LEN: usize = 8;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

pub use vmm_api::config::{MacAddr, MacParseError};

/// Errors creating a virtio-net device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP device could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// A queue eventfd could not be created.
    #[error("cannot create the virtio-net queue eventfds")]
    EventFd(#[source] io::Error),
}

/// Counters of one virtio-net device.
#[derive(Debug, Default, Serialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Ethernet bytes delivered to the guest (virtio-net headers excluded).
    pub rx_bytes: AtomicU64,
    /// Frames the guest sent out through the backend.
    pub tx_packets: AtomicU64,
    /// Ethernet bytes the guest sent out.
    pub tx_bytes: AtomicU64,
    /// Received frames dropped: larger than the guest's buffer, or shorter than a header.
    pub rx_dropped: AtomicU64,
    /// Frames the backend refused to send.
    pub tx_dropped: AtomicU64,
    /// RX chains returned unused as malformed.
    pub rx_malformed_chains: AtomicU64,
    /// TX chains dropped as malformed (direction, memory, too short).
    pub tx_malformed_chains: AtomicU64,
    /// TX chains dropped as longer than the largest frame.
    pub tx_oversized_frames: AtomicU64,
    /// Times a received frame had to wait for the guest to add RX buffers.
    pub rx_deferred: AtomicU64,
    /// Errors reading from the backend.
    pub backend_errors: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    #[serde(skip)]
    pub queues: Arc<QueueMetrics>,
}

impl DeviceMetrics for NetMetrics {
    fn snapshot(&self) -> serde_json::Value {
        self.queues.snapshot_with(self)
    }
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// What became of a received frame.
enum Delivery {
    /// In a guest buffer, or dropped: either way, done with.
    Done,
    /// No guest buffer yet: keep it.
    NoBuffers,
}

/// A virtio-net device over a frame backend (a TAP device in the VMM).
pub struct Net<B: FrameBackend = Tap> {
    common: VirtioCommon,
    mac: MacAddr,
    /// `struct virtio_net_config` up to and including `status` (little endian).
    config: [u8; CONFIG_LEN],
    link: Link<B>,
}

/// The backend and the frames in flight between it and the guest's queues.
struct Link<B> {
    backend: B,
    /// The frame being received; `rx_pending` bytes of it wait for a guest buffer.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    tx_buf: Vec<u8>,
    metrics: Arc<NetMetrics>,
}

impl Net<Tap> {
    /// Attaches to the TAP interface `tap_name` (in the calling thread's network
    /// namespace) and presents it to the guest with address `mac`.
    pub fn new(tap_name: &str, mac: MacAddr) -> Result<Self, NetError> {
        Self::with_backend(Tap::open(tap_name)?, mac)
    }
}

impl<B: FrameBackend> Net<B> {
    /// A device moving frames to and from `backend`.
    pub fn with_backend(backend: B, mac: MacAddr) -> Result<Self, NetError> {
        let mut config = [0u8; CONFIG_LEN];
        config[..6].copy_from_slice(&mac.0);
        config[6..].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        let common = VirtioCommon::new(
            "virtio-net",
            VIRTIO_ID_NET,
            (1u64 << VIRTIO_F_VERSION_1)
                | (1u64 << VIRTIO_NET_F_MAC)
                | (1u64 << VIRTIO_NET_F_STATUS),
            &[NET_QUEUE_SIZE, NET_QUEUE_SIZE],
        )
        .map_err(NetError::EventFd)?;
        let metrics = Arc::new(NetMetrics {
            queues: common.metrics(),
            ..NetMetrics::default()
        });
        Ok(Self {
            common,
            mac,
            config,
            link: Link {
                backend,
                rx_buf: vec![0; MAX_FRAME_LEN as usize],
                rx_pending: None,
                tx_buf: vec![0; MAX_FRAME_LEN as usize],
                metrics,
            },
        })
    }

    /// The device's counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.link.metrics.clone()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The frame backend.
    pub fn backend(&self) -> &B {
        &self.link.backend
    }

    /// Sends every frame the guest queued for transmission and interrupts the guest if it
    /// asked for it. Does nothing before activation.
    pub fn process_tx(&mut self) {
        let link = &mut self.link;
        self.common.serve_queue(TX_QUEUE, |tx, mem| {
            let mut used_any = false;
            while let Some(chain) = tx.pop(mem)? {
                let head = chain.head_index();
                link.transmit(mem, chain);
                tx.add_used(mem, head, 0)?;
                used_any = true;
            }
            Ok(used_any)
        });
    }

    /// Moves frames from the backend into the guest's RX buffers until the backend has
    /// none left or the guest has no buffers (the frame in hand then waits). Does nothing
    /// before activation.
    pub fn process_rx(&mut self) {
        let link = &mut self.link;
        self.common
            .serve_queue(RX_QUEUE, |rx, mem| link.receive(rx, mem));
    }
}

impl<B: FrameBackend> Link<B> {
    fn transmit<M>(&mut self, mem: &GuestMemoryMmap, chain: virtio_queue::DescriptorChain<M>)
    where
        M: std::ops::Deref<Target = GuestMemoryMmap>,
    {
        let (segments, len) = match tx_segments(mem, chain) {
            Ok(checked) => checked,
            Err(e) => {
                let counter = match e {
                    ChainError::TooLong(_) => &self.metrics.tx_oversized_frames,
                    _ => &self.metrics.tx_malformed_chains,
                };
                bump(counter, 1);
                tracing::debug!("virtio-net: TX chain dropped: {e}");
                return;
            }
        };
        // Bounded by MAX_FRAME_LEN, the buffer's size.
        let frame = &mut self.tx_buf[..len as usize];
        if let Err(e) = gather(mem, &segments, frame) {
            bump(&self.metrics.tx_malformed_chains, 1);
            tracing::debug!("virtio-net: TX chain unreadable: {e}");
            return;
        }
        // No offloads were negotiated, so the guest's header may ask for nothing: send a
        // clean one instead of letting the guest drive the host's GSO and checksum code.
        frame[..VNET_HDR_LEN].fill(0);
        match self.backend.write_frame(frame) {
            Ok(()) => {
                bump(&self.metrics.tx_packets, 1);
                bump(&self.metrics.tx_bytes, len - VNET_HDR_LEN as u64);
            }
            Err(e) => {
                bump(&self.metrics.tx_dropped, 1);
                tracing::debug!("virtio-net: backend refused a {len}-byte frame: {e}");
            }
        }
    }

    /// One RX pass: frames from the backend into the buffers of `rx`; returns whether
    /// any buffer was used.
    fn receive(&mut self, rx: &mut DeviceQueue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used_any = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(len) if len >= MIN_FRAME_LEN => len,
                    Ok(0) => break,
                    Ok(len) => {
                        bump(&self.metrics.rx_dropped, 1);
                        tracing::debug!("virtio-net: dropped a {len}-byte frame from the backend");
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        bump(&self.metrics.backend_errors, 1);
                        crate::guest_warn!("virtio-net: cannot read from the backend: {e}");
                        break;
                    }
                },
            };
            match self.deliver(rx, mem, len, &mut used_any) {
                Ok(Delivery::Done) => self.rx_pending = None,
                Err(e) => {
                    // The frame stays pending; the reset the driver owes us drops it.
                    self.rx_pending = Some(len);
                    return Err(e);
                }
                Ok(Delivery::NoBuffers) => {
                    if self.rx_pending.is_none() {
                        bump(&self.metrics.rx_deferred, 1);
                    }
                    self.rx_pending = Some(len);
                    break;
                }
            }
        }
        Ok(used_any)
    }

    /// Puts the `len`-byte frame in `rx_buf` into the guest's next usable RX chain.
    fn deliver(
        &mut self,
        rx: &mut DeviceQueue,
        mem: &GuestMemoryMmap,
        len: usize,
        used_any: &mut bool,
    ) -> Result<Delivery, QueueError> {
        let frame = &mut self.rx_buf[..len];
        // No offloads were negotiated: the header says nothing but "one buffer".
        frame[..VNET_HDR_LEN].fill(0);
        frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
        loop {
            let Some(chain) = rx.pop(mem)? else {
                return Ok(Delivery::NoBuffers);
            };
            let head = chain.head_index();
            let (used_len, done) = match rx_segments(mem, chain) {
                Err(e) => {
                    // Returned unused so the guest gets its buffer back; try the next.
                    bump(&self.metrics.rx_malformed_chains, 1);
                    tracing::debug!("virtio-net: RX chain refused: {e}");
                    (0, false)
                }
                Ok((_, capacity)) if capacity < len as u64 => {
                    // The guest's buffers are smaller than this frame (and likely every
                    // frame of its size): drop the frame, keep the chain for the next one.
                    rx.undo_pop();
                    bump(&self.metrics.rx_dropped, 1);
                    tracing::debug!(
                        "virtio-net: dropped a {len}-byte frame: RX buffer holds {capacity}"
                    );
                    return Ok(Delivery::Done);
                }
                Ok((segments, _)) => match scatter(mem, &segments, frame) {
                    Ok(written) => {
                        bump(&self.metrics.rx_packets, 1);
                        bump(&self.metrics.rx_bytes, (len - VNET_HDR_LEN) as u64);
                        // At most MAX_FRAME_LEN.
                        (written as u32, true)
                    }
                    Err(e) => {
                        bump(&self.metrics.rx_dropped, 1);
                        tracing::debug!("virtio-net: cannot write an RX buffer: {e}");
                        (0, true)
                    }
                },
            };
            rx.add_used(mem, head, used_len)?;
            *used_any = true;
            if done {
                return Ok(Delivery::Done);
            }
        }
    }
}

impl<B: FrameBackend> VirtioDevice for Net<B> {
    fn common(&self) -> &VirtioCommon {
        &self.common
    }

    fn common_mut(&mut self) -> &mut VirtioCommon {
        &mut self.common
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    // The MAC is read-only to a VERSION_1 driver, and so is the status: the default
    // write_config ignores writes.

    fn on_activate(&mut self) -> Result<(), ActivateError> {
        // Buffers posted and frames waiting before activation raised no event the
        // device could act on then (and the backend is watched edge-triggered): serve
        // them now.
        self.process_tx();
        self.process_rx();
        Ok(())
    }

    fn on_reset(&mut self) {
        if self.link.rx_pending.take().is_some() {
            bump(&self.link.metrics.rx_dropped, 1);
        }
    }

    /// The MAC the guest has seen (checked on restore) and the frame read from the backend
    /// that waits for an RX buffer, if any. Frames still in the backend (the TAP's queue)
    /// are not the VM's: a copy starts on its own, empty backend.
    fn save_state(&mut self) -> serde_json::Value {
        let pending = self.link.rx_pending.map(|len| &self.link.rx_buf[..len]);
        serde_json::json!({ "mac": self.mac, "rx_pending": pending })
    }

    /// Refuses another MAC; takes back the waiting frame, which goes out at re-activation
    /// (`on_activate` serves RX) if the guest posted buffers before the snapshot.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Saved {
            mac: MacAddr,
            rx_pending: Option<Vec<u8>>,
        }
        let saved: Saved = serde_json::from_value(state.clone())
            .map_err(|e| format!("invalid virtio-net state: {e}"))?;
        if saved.mac != self.mac {
            return Err(format!(
                "the snapshot's MAC is {}, this device's {}",
                saved.mac, self.mac
            ));
        }
        self.link.rx_pending = match saved.rx_pending {
            Some(frame) if (MIN_FRAME_LEN..=self.link.rx_buf.len()).contains(&frame.len()) => {
                self.link.rx_buf[..frame.len()].copy_from_slice(&frame);
                Some(frame.len())
            }
            Some(frame) => return Err(format!("a pending frame of {} bytes", frame.len())),
            None => None,
        };
        Ok(())
    }
}
