//! A virtio-vsock packet header from the driver: decoding never panics and round-trips
//! byte for byte, and [`Packet::parse`] accepts exactly the headers a direct statement of
//! the rules (virtio 1.2 §5.10.6, plus the device's limits) allows.

use vmm::devices::virtio::vsock::packet::{
    Header, Op, Packet, HDR_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// The target body: a header, then the guest's CID (one byte, so it often matches) and the
/// bytes of chain after the header (le32).
pub fn run(data: &[u8]) {
    let Some((bytes, rest)) = data.split_first_chunk::<HDR_LEN>() else {
        return;
    };
    let hdr = Header::decode(bytes);
    assert_eq!(&hdr.encode(), bytes, "header does not round-trip");
    let guest_cid = u64::from(rest.first().copied().unwrap_or(3));
    let available = rest
        .get(1..5)
        .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()));

    let allowed = rules_allow(&hdr, guest_cid, u64::from(available));
    match Packet::parse(hdr, guest_cid, u64::from(available)) {
        Ok(packet) => {
            assert!(allowed, "accepted a header the rules refuse: {hdr:?}");
            assert_eq!(packet.hdr, hdr);
            assert_eq!(packet.op as u16, hdr.op);
        }
        Err(e) => {
            assert!(!allowed, "refused a header the rules allow: {hdr:?}: {e}");
            // A refusal may only be answered with RST when it can be addressed, and never
            // for an RST.
            if e.answer_rst(&hdr) {
                assert_eq!(hdr.src_cid, guest_cid);
                assert_ne!(hdr.op, Op::Rst as u16);
            }
        }
    }
}

/// The rules, stated directly.
fn rules_allow(h: &Header, guest_cid: u64, available: u64) -> bool {
    let known_op = (1..=7).contains(&h.op);
    let payload_ok = if h.op == Op::Rw as u16 {
        h.len <= MAX_PAYLOAD && u64::from(h.len) <= available
    } else {
        h.len == 0
    };
    let flags_ok = if h.op == Op::Shutdown as u16 {
        h.flags | SHUTDOWN_RCV | SHUTDOWN_SEND == SHUTDOWN_RCV | SHUTDOWN_SEND
    } else {
        h.flags == 0
    };
    h.src_cid == guest_cid
        && h.dst_cid == HOST_CID
        && h.type_ == TYPE_STREAM
        && known_op
        && payload_ok
        && flags_ok
}
