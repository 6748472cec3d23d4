//! Feeds arbitrary bytes to the streaming protocol's decoders: they must never panic, and
//! whatever decodes must re-encode to a message that decodes to the same value.

use proto::stream::{ClientMessage, FrameHeader, Message, MessageReader, ServerMessage};

fn round_trip<M: Message + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.to_bytes();
    let mut r = MessageReader::new();
    r.push(&bytes);
    let again = r
        .next_message::<M>()
        .expect("re-encoded message decodes")
        .expect("complete");
    assert_eq!(&again, m);
}

/// The target body: any input, no panic, and the round trip above.
pub fn run(data: &[u8]) {
    // First byte picks how the rest is chunked, exercising reassembly.
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut client = MessageReader::new();
    let mut server = MessageReader::new();
    let (mut client_ok, mut server_ok) = (true, true);
    for piece in rest.chunks(chunk) {
        client.push(piece);
        server.push(piece);
        while client_ok {
            match client.next_message::<ClientMessage>() {
                Ok(Some(m)) => round_trip(&m),
                Ok(None) => break,
                Err(_) => client_ok = false,
            }
        }
        while server_ok {
            match server.next_message::<ServerMessage>() {
                Ok(Some(m)) => round_trip(&m),
                Ok(None) => break,
                Err(_) => server_ok = false,
            }
        }
    }
    if let Ok(h) = FrameHeader::decode(rest.get(..proto::stream::FRAME_HEADER_LEN).unwrap_or(rest))
    {
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
    }
}
