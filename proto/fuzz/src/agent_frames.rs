//! Feeds arbitrary bytes to both ends of an agent session (`proto::agent::session`): they
//! must never panic; every frame a session passes up re-encodes to bytes that decode to the
//! same frame; and a peer can never make a session pass up more data on an open request
//! than the window it granted (the application here never reports data consumed).
//!
//! Input: byte 0 picks the chunk size the bytes arrive in (reassembly); bit 0 of byte 1 puts
//! a valid Hello in front (so the open state is reached) or leaves the Hello to the input
//! (version checks); the rest is the peer's frames.

use std::collections::HashMap;

use proto::agent::session::{Agent, Host};
use proto::agent::session::{Kind, Session, Side};
use proto::agent::{
    AgentMessage, ExecRequest, Features, FileGetRequest, Frame, HostMessage, Message, RequestId,
    INITIAL_WINDOW, VERSION_MAJOR, VERSION_MINOR,
};

fn round_trip<M: std::fmt::Debug + PartialEq>(frame: &Frame<M>)
where
    Frame<M>: Message,
{
    let bytes = frame.to_bytes();
    let again = Frame::<M>::decode_body(&bytes[4..]).expect("re-encoded frame decodes");
    assert_eq!(&again, frame);
}

/// Drives `session` with `input` in `chunk`-sized pieces, checking the oracles.
fn drive<S: Side>(mut session: Session<S>, input: &[u8], chunk: usize)
where
    Frame<S::In>: Message,
    Frame<S::Out>: Message,
    S::In: PartialEq,
{
    let mut passed: HashMap<RequestId, u64> = HashMap::new();
    for piece in input.chunks(chunk) {
        session.receive(piece);
        loop {
            match session.poll() {
                Ok(Some(frame)) => {
                    round_trip(&frame);
                    if let Kind::Data(len) = S::kind_in(&frame.message) {
                        if session.stream_open(frame.id) {
                            let total = passed.entry(frame.id).or_default();
                            *total += len as u64;
                            assert!(*total <= u64::from(INITIAL_WINDOW), "window overrun");
                        }
                    }
                    if !session.stream_open(frame.id) {
                        passed.remove(&frame.id);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
}

/// The target body: see the module documentation.
pub fn run(data: &[u8]) {
    let [chunk, flags, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(*chunk).max(1);
    let with_hello = flags & 1 == 1;

    // The agent end, reading what a hostile host sends.
    let mut to_agent = Vec::new();
    if with_hello {
        Frame::new(
            RequestId(0),
            HostMessage::Hello {
                major: VERSION_MAJOR,
                minor: VERSION_MINOR,
            },
        )
        .encode(&mut to_agent);
    }
    to_agent.extend_from_slice(rest);
    drive(
        Session::<Agent>::new("fuzz", Features::EXEC),
        &to_agent,
        chunk,
    );

    // The host end, with a few requests open, reading what a hostile agent sends.
    let mut host = Session::<Host>::new();
    for id in 1..=3 {
        let open = if id == 3 {
            HostMessage::FileGet(FileGetRequest::default())
        } else {
            HostMessage::Exec(ExecRequest {
                argv: vec!["x".into()],
                ..ExecRequest::default()
            })
        };
        host.send(RequestId(id), open).expect("opening a request");
    }
    let mut to_host = Vec::new();
    if with_hello {
        Frame::new(
            RequestId(0),
            AgentMessage::Hello {
                major: VERSION_MAJOR,
                minor: VERSION_MINOR,
                agent: "fuzz".into(),
                features: Features::empty(),
            },
        )
        .encode(&mut to_host);
    }
    to_host.extend_from_slice(rest);
    drive(host, &to_host, chunk);
}
