//! Counters of the vsock device, shown under its name in `GET /metrics`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::devices::virtio::QueueMetrics;
use crate::devices::DeviceMetrics;

/// Counters of one vsock device.
#[derive(Debug, Default, Serialize)]
pub struct VsockMetrics {
    /// Connections established (either side asked).
    pub connections_opened: AtomicU64,
    /// Connections removed (closed, reset or timed out).
    pub connections_closed: AtomicU64,
    /// Packets put on the RX queue.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Packets taken from the TX queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes the guest sent.
    pub tx_bytes: AtomicU64,
    /// RST packets sent to the guest.
    pub rst_sent: AtomicU64,
    /// TX packets refused as malformed (header, CIDs, length, chain).
    pub tx_malformed: AtomicU64,
    /// RX chains returned unused as malformed (readable descriptors, too short, outside memory).
    pub rx_malformed_chains: AtomicU64,
    /// Connections reset because the guest sent beyond its credit.
    pub credit_overruns: AtomicU64,
    /// Connections reset for an operation that did not fit their state.
    pub protocol_errors: AtomicU64,
    /// RSTs for unknown connections dropped because too many waited for RX buffers.
    pub rst_dropped: AtomicU64,
    /// Host-initiated connections the guest did not answer in time.
    pub connect_timeouts: AtomicU64,
    /// Host programs dropped during the `CONNECT` line (malformed, too long, too slow).
    pub handshake_failures: AtomicU64,
    /// Guest connections to a host port with no listening socket.
    pub host_connect_failures: AtomicU64,
    /// Errors reading or writing host streams.
    pub host_stream_errors: AtomicU64,
    /// Transport reset events sent.
    pub transport_resets: AtomicU64,
    /// Queue notifications and broken queues (the common part's counters).
    #[serde(skip)]
    pub queues: Arc<QueueMetrics>,
}

impl DeviceMetrics for VsockMetrics {
    fn snapshot(&self) -> serde_json::Value {
        self.queues.snapshot_with(self)
    }
}

/// Adds `by` to `counter`.
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}
