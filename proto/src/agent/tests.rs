//! Codec and session tests: every message round-trips, hostile frames are refused with the
//! right error, and flow control bounds what a peer can make the other side buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::session::{Agent, Host, Session};
use super::*;

fn all_host_messages() -> Vec<HostMessage> {
    use HostMessage as H;
    vec![
        H::Hello { major: 1, minor: 7 },
        H::ReadyQuery,
        H::Credit { bytes: 4096 },
        H::Exec(ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), "echo é".into()],
            env: vec![
                ("PATH".into(), "/bin".into()),
                ("LANG".into(), "C.UTF-8".into()),
            ],
            cwd: "/tmp".into(),
            user: "alice".into(),
            timeout_ms: 1500,
            stdin: true,
        }),
        H::ExecStdin(b"input".to_vec()),
        H::ExecStdinEof,
        H::ExecKill { signal: 15 },
        H::FilePut(FilePutRequest {
            path: "/home/alice/a.txt".into(),
            user: "alice".into(),
            mode: 0o640,
            size: 12,
            as_root: false,
        }),
        H::FileGet(FileGetRequest {
            path: "/etc/hostname".into(),
            user: String::new(),
            as_root: true,
        }),
        H::FileData(vec![0, 1, 2, 255]),
        H::FileEnd,
        H::ClipboardGet {
            mime: MIME_TEXT_UTF8.into(),
        },
        H::ClipboardSet(ClipboardContent {
            mime: MIME_TEXT_UTF8.into(),
            data: "héllo".as_bytes().to_vec(),
        }),
        H::DisplaySetMode {
            width: 1920,
            height: 1080,
        },
        H::TimeSet {
            utc_ns: 1_796_000_000_123_456_789,
        },
        H::NetworkConfigure(NetworkConfig {
            interface: "eth0".into(),
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15)),
            prefix: 24,
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))),
            resolvers: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        }),
        H::NetworkConfigure(NetworkConfig {
            interface: "eth1".into(),
            address: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)),
            prefix: 64,
            gateway: None,
            resolvers: vec![],
        }),
        H::Power(PowerAction::Poweroff),
        H::Power(PowerAction::Reboot),
    ]
}

fn all_agent_messages() -> Vec<AgentMessage> {
    use AgentMessage as A;
    vec![
        A::Hello {
            major: 1,
            minor: 0,
            agent: "genos-agent 0.1.0".into(),
            features: Features::EXEC | Features::FILES,
        },
        A::Ready(Stage::Booting),
        A::Ready(Stage::System),
        A::Ready(Stage::Session),
        A::Credit { bytes: 1 },
        A::ExecStarted { pid: 4242 },
        A::ExecOutput {
            fd: OutputFd::Stdout,
            data: b"out".to_vec(),
        },
        A::ExecOutput {
            fd: OutputFd::Stderr,
            data: vec![],
        },
        A::ExecExit {
            status: ExitStatus::Code(-1),
            timed_out: false,
        },
        A::ExecExit {
            status: ExitStatus::Signal(9),
            timed_out: true,
        },
        A::FileInfo {
            size: 1 << 40,
            mode: 0o4755,
        },
        A::FileData(vec![9; 100]),
        A::FileEnd,
        A::Clipboard(ClipboardContent {
            mime: "image/png".into(),
            data: vec![0x89, b'P', b'N', b'G'],
        }),
        A::ClipboardChanged(ClipboardContent {
            mime: MIME_TEXT_UTF8.into(),
            data: b"copied".to_vec(),
        }),
        A::Done,
        A::Error {
            code: ErrorCode::PermissionDenied,
            message: "/etc/shadow is outside /home/alice".into(),
        },
    ]
}

fn decode_host(bytes: &[u8]) -> Result<Frame<HostMessage>, DecodeError> {
    Frame::<HostMessage>::decode_body(&bytes[4..])
}

fn decode_agent(bytes: &[u8]) -> Result<Frame<AgentMessage>, DecodeError> {
    Frame::<AgentMessage>::decode_body(&bytes[4..])
}

#[test]
fn every_host_message_round_trips() {
    for (i, m) in all_host_messages().into_iter().enumerate() {
        let frame = Frame::new(RequestId(i as u32 + 7), m);
        assert_eq!(decode_host(&frame.to_bytes()), Ok(frame));
    }
}

#[test]
fn every_agent_message_round_trips() {
    for (i, m) in all_agent_messages().into_iter().enumerate() {
        let frame = Frame::new(RequestId(u32::MAX - i as u32), m);
        assert_eq!(decode_agent(&frame.to_bytes()), Ok(frame));
    }
}

#[test]
fn truncated_frames_are_rejected_and_trailing_bytes_too() {
    for m in all_host_messages() {
        let bytes = Frame::new(RequestId(1), m).to_bytes();
        let body = &bytes[4..];
        for cut in 0..body.len() {
            assert!(
                Frame::<HostMessage>::decode_body(&body[..cut]).is_err(),
                "{cut} of {body:?}"
            );
        }
        let mut long = body.to_vec();
        long.push(0);
        assert_eq!(
            Frame::<HostMessage>::decode_body(&long),
            Err(DecodeError::TrailingBytes(1))
        );
    }
}

#[test]
fn out_of_range_values_are_rejected() {
    let bad_mode = {
        let mut b = Frame::new(
            RequestId(1),
            AgentMessage::FileInfo {
                size: 1,
                mode: 0o777,
            },
        )
        .to_bytes();
        let at = b.len() - 4;
        b[at..].copy_from_slice(&0o10000u32.to_le_bytes());
        b
    };
    assert!(matches!(
        decode_agent(&bad_mode),
        Err(DecodeError::BadValue { field: "mode", .. })
    ));
    let mut prefix = Frame::new(
        RequestId(1),
        HostMessage::NetworkConfigure(NetworkConfig {
            interface: "e".into(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            prefix: 8,
            gateway: None,
            resolvers: vec![],
        }),
    )
    .to_bytes();
    // type, id, str16 "e", family, 4 bytes: the prefix follows.
    prefix[4 + 1 + 4 + 3 + 1 + 4] = 33;
    assert!(matches!(
        decode_host(&prefix),
        Err(DecodeError::BadValue {
            field: "prefix",
            value: 33
        })
    ));
    let unknown = [0x7e, 0, 0, 0, 0];
    assert_eq!(
        Frame::<HostMessage>::decode_body(&unknown),
        Err(DecodeError::UnknownType(0x7e))
    );
    // Host messages are not agent messages.
    assert_eq!(
        Frame::<AgentMessage>::decode_body(&[0x10, 0, 0, 0, 0]),
        Err(DecodeError::UnknownType(0x10))
    );
}

#[test]
fn oversized_chunk_length_is_refused_before_reading_it() {
    let mut b = vec![0x11, 1, 0, 0, 0];
    b.extend_from_slice(&(MAX_CHUNK_LEN as u32 + 1).to_le_bytes());
    assert!(matches!(
        Frame::<HostMessage>::decode_body(&b),
        Err(DecodeError::BadValue {
            field: "chunk length",
            ..
        })
    ));
}

/// A host and an agent session wired back to back.
struct Pair {
    host: Session<Host>,
    agent: Session<Agent>,
}

impl Pair {
    fn open() -> Pair {
        let mut p = Pair {
            host: HostSession::new(),
            agent: AgentSession::new("test-agent", Features::EXEC),
        };
        p.deliver_to_agent();
        let hello = p.agent.poll().unwrap().unwrap();
        assert!(matches!(hello.message, HostMessage::Hello { major: 1, .. }));
        p.deliver_to_host();
        let hello = p.host.poll().unwrap().unwrap();
        assert!(matches!(hello.message, AgentMessage::Hello { .. }));
        assert!(p.host.is_open() && p.agent.is_open());
        p
    }
    fn deliver_to_agent(&mut self) {
        let bytes = self.host.take_output();
        self.agent.receive(&bytes);
    }
    fn deliver_to_host(&mut self) {
        let bytes = self.agent.take_output();
        self.host.receive(&bytes);
    }
    fn agent_frames(&mut self) -> Vec<Frame<HostMessage>> {
        self.deliver_to_agent();
        std::iter::from_fn(|| self.agent.poll().unwrap()).collect()
    }
    fn host_frames(&mut self) -> Vec<Frame<AgentMessage>> {
        self.deliver_to_host();
        std::iter::from_fn(|| self.host.poll().unwrap()).collect()
    }
}

fn exec() -> HostMessage {
    HostMessage::Exec(ExecRequest {
        argv: vec!["cat".into()],
        stdin: true,
        ..ExecRequest::default()
    })
}

#[test]
fn hello_exchange_opens_both_sides() {
    let p = Pair::open();
    assert_eq!(p.agent.peer_minor(), VERSION_MINOR);
}

#[test]
fn agent_refuses_an_unknown_major_with_a_clear_error() {
    let mut agent = AgentSession::new("a", Features::empty());
    // A version-2 Hello with a body this version does not know.
    let mut hello = Frame::new(RequestId(0), HostMessage::Hello { major: 2, minor: 0 }).to_bytes();
    hello.extend_from_slice(b"future");
    let len = (hello.len() - 4) as u32;
    hello[..4].copy_from_slice(&len.to_le_bytes());
    agent.receive(&hello);
    assert_eq!(
        agent.poll(),
        Err(SessionError::UnsupportedVersion { ours: 1, theirs: 2 })
    );
    let reply = decode_agent(agent.output()).unwrap();
    match reply.message {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(
                message.contains("2.x") && message.contains("1.x"),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The host side reads that reply as a refusal.
    let mut host = HostSession::new();
    host.receive(agent.output());
    assert!(matches!(
        host.poll(),
        Err(SessionError::Refused {
            code: ErrorCode::UnsupportedVersion,
            ..
        })
    ));
    assert_eq!(agent.poll(), Err(SessionError::Closed));
}

#[test]
fn host_refuses_an_agent_of_another_major() {
    let mut host = HostSession::new();
    host.receive(
        &Frame::new(
            RequestId(0),
            AgentMessage::Hello {
                major: 3,
                minor: 0,
                agent: "x".into(),
                features: Features::empty(),
            },
        )
        .to_bytes(),
    );
    assert_eq!(
        host.poll(),
        Err(SessionError::UnsupportedVersion { ours: 1, theirs: 3 })
    );
}

#[test]
fn a_request_before_hello_is_a_violation() {
    let mut agent = AgentSession::new("a", Features::empty());
    agent.receive(&Frame::new(RequestId(1), HostMessage::ReadyQuery).to_bytes());
    assert!(matches!(agent.poll(), Err(SessionError::Violation(_))));
    assert!(matches!(
        decode_agent(agent.output()).unwrap().message,
        AgentMessage::Error {
            code: ErrorCode::ProtocolViolation,
            ..
        }
    ));
}

#[test]
fn agent_cannot_send_before_the_hello() {
    let mut agent = AgentSession::new("a", Features::empty());
    assert_eq!(
        agent.send(RequestId(0), AgentMessage::Ready(Stage::System)),
        Err(SendError::NotReady)
    );
}

#[test]
fn an_oversized_hello_length_is_refused_before_its_body_arrives() {
    let mut agent = AgentSession::new("a", Features::empty());
    agent.receive(&(MAX_HELLO_LEN as u32 + 1).to_le_bytes());
    assert!(matches!(
        agent.poll(),
        Err(SessionError::Decode(DecodeError::TooLong { .. }))
    ));
}

#[test]
fn an_oversized_frame_is_refused_after_the_hello() {
    let mut p = Pair::open();
    p.agent.receive(&(MAX_FRAME_LEN as u32 + 1).to_le_bytes());
    assert!(matches!(
        p.agent.poll(),
        Err(SessionError::Decode(DecodeError::TooLong { .. }))
    ));
}

#[test]
fn frames_split_at_every_byte_reassemble() {
    let mut host = HostSession::new();
    host.send(RequestId(1), HostMessage::ReadyQuery).unwrap();
    host.send(RequestId(2), exec()).unwrap();
    let bytes = host.take_output();
    let mut agent = AgentSession::new("a", Features::empty());
    let mut got = Vec::new();
    for b in bytes {
        agent.receive(&[b]);
        while let Some(f) = agent.poll().unwrap() {
            got.push(f);
        }
    }
    assert_eq!(got.len(), 3);
    assert_eq!(got[2], Frame::new(RequestId(2), exec()));
}

#[test]
fn interleaved_streams_keep_their_request_ids_and_windows() {
    let mut p = Pair::open();
    p.host.send(RequestId(1), exec()).unwrap();
    p.host.send(RequestId(2), exec()).unwrap();
    p.host
        .send(RequestId(1), HostMessage::ExecStdin(b"one".to_vec()))
        .unwrap();
    p.host
        .send(RequestId(3), HostMessage::ClipboardGet { mime: "t".into() })
        .unwrap();
    p.host
        .send(RequestId(2), HostMessage::ExecStdin(b"two!".to_vec()))
        .unwrap();
    let frames = p.agent_frames();
    let ids: Vec<u32> = frames.iter().map(|f| f.id.0).collect();
    assert_eq!(ids, [1, 2, 1, 3, 2]);
    assert_eq!(
        p.host.send_credit(RequestId(1)),
        u64::from(INITIAL_WINDOW) - 3
    );
    assert_eq!(
        p.host.send_credit(RequestId(2)),
        u64::from(INITIAL_WINDOW) - 4
    );
    // The agent answers on both while the clipboard reply goes in between.
    for (id, m) in [
        (
            2,
            AgentMessage::ExecOutput {
                fd: OutputFd::Stdout,
                data: b"two!".to_vec(),
            },
        ),
        (
            3,
            AgentMessage::Error {
                code: ErrorCode::NotSupported,
                message: "no X".into(),
            },
        ),
        (
            1,
            AgentMessage::ExecExit {
                status: ExitStatus::Code(0),
                timed_out: false,
            },
        ),
    ] {
        p.agent.send(RequestId(id), m).unwrap();
    }
    let frames = p.host_frames();
    assert_eq!(frames.len(), 3);
    assert!(!p.host.stream_open(RequestId(1)) && !p.agent.stream_open(RequestId(1)));
    assert!(p.host.stream_open(RequestId(2)) && p.agent.stream_open(RequestId(2)));
}

#[test]
fn a_sender_cannot_exceed_its_credit_and_gets_more_as_the_reader_consumes() {
    let mut p = Pair::open();
    let id = RequestId(5);
    p.host.send(id, exec()).unwrap();
    let chunk = vec![7u8; MAX_CHUNK_LEN];
    let chunks = INITIAL_WINDOW as usize / MAX_CHUNK_LEN;
    for _ in 0..chunks {
        p.host
            .send(id, HostMessage::ExecStdin(chunk.clone()))
            .unwrap();
    }
    assert_eq!(p.host.send_credit(id), 0);
    assert_eq!(
        p.host.send(id, HostMessage::ExecStdin(vec![1])),
        Err(SendError::NoCredit {
            id,
            credit: 0,
            len: 1
        })
    );
    assert_eq!(p.agent_frames().len(), 1 + chunks);
    // Consuming less than half a window grants nothing yet.
    p.agent.consumed(id, MAX_CHUNK_LEN);
    assert!(p.agent.output().is_empty());
    p.agent.consumed(id, MAX_CHUNK_LEN);
    assert!(p.host_frames().is_empty(), "credit is not passed up");
    assert_eq!(p.host.send_credit(id), 2 * MAX_CHUNK_LEN as u64);
    // Consuming more than was received grants only what was received.
    p.agent.consumed(id, usize::MAX);
    p.host_frames();
    assert_eq!(p.host.send_credit(id), u64::from(INITIAL_WINDOW));
}

#[test]
fn data_beyond_the_window_is_a_violation() {
    let mut p = Pair::open();
    let id = RequestId(9);
    p.host.send(id, exec()).unwrap();
    p.agent_frames();
    // A hostile host ignores its credit: frames encoded by hand.
    let mut flood = Vec::new();
    for _ in 0..=(INITIAL_WINDOW as usize / MAX_CHUNK_LEN) {
        Frame::new(id, HostMessage::ExecStdin(vec![0; MAX_CHUNK_LEN])).encode(&mut flood);
    }
    p.agent.receive(&flood);
    let err = loop {
        match p.agent.poll() {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("flood accepted"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err, SessionError::Violation(ref m) if m.contains("beyond")),
        "{err}"
    );
}

#[test]
fn credit_beyond_the_maximum_window_is_a_violation() {
    let mut p = Pair::open();
    let id = RequestId(2);
    p.host.send(id, exec()).unwrap();
    p.agent_frames();
    let mut credits = Vec::new();
    for _ in 0..(MAX_WINDOW / u64::from(u32::MAX) + 2) {
        Frame::new(id, AgentMessage::Credit { bytes: u32::MAX }).encode(&mut credits);
    }
    p.host.receive(&credits);
    assert!(matches!(p.host.poll(), Err(SessionError::Violation(_))));
}

#[test]
fn agent_data_on_a_request_without_a_stream_is_a_violation_at_the_host() {
    let mut p = Pair::open();
    p.host
        .receive(&Frame::new(RequestId(4), AgentMessage::FileData(vec![1])).to_bytes());
    assert!(matches!(p.host.poll(), Err(SessionError::Violation(_))));
}

#[test]
fn late_host_data_after_the_request_ended_reaches_the_agent_application() {
    let mut p = Pair::open();
    let id = RequestId(3);
    p.host.send(id, exec()).unwrap();
    p.agent_frames();
    p.agent
        .send(
            id,
            AgentMessage::ExecExit {
                status: ExitStatus::Code(0),
                timed_out: false,
            },
        )
        .unwrap();
    // The host sent stdin before it saw the exit.
    p.agent
        .receive(&Frame::new(id, HostMessage::ExecStdin(b"late".to_vec())).to_bytes());
    let late = p.agent.poll().unwrap().unwrap();
    assert_eq!(late.message, HostMessage::ExecStdin(b"late".to_vec()));
    assert!(!p.agent.stream_open(id));
}

#[test]
fn request_ids_are_checked_when_sending() {
    let mut p = Pair::open();
    assert_eq!(
        p.host.send(RequestId(0), exec()),
        Err(SendError::ReservedId)
    );
    p.host.send(RequestId(1), exec()).unwrap();
    assert_eq!(
        p.host.send(RequestId(1), exec()),
        Err(SendError::IdInUse { id: RequestId(1) })
    );
    assert_eq!(
        p.host.send(RequestId(8), HostMessage::FileData(vec![1])),
        Err(SendError::NotOpen { id: RequestId(8) })
    );
    for i in 2..=MAX_OPEN_STREAMS as u32 {
        p.host.send(RequestId(i), exec()).unwrap();
    }
    assert_eq!(
        p.host.send(RequestId(1000), exec()),
        Err(SendError::TooManyStreams)
    );
}

#[test]
fn the_agent_refuses_a_request_over_the_open_limit_without_closing() {
    let mut p = Pair::open();
    let mut opens = Vec::new();
    for i in 1..=MAX_OPEN_STREAMS as u32 + 1 {
        Frame::new(RequestId(i), exec()).encode(&mut opens);
    }
    p.agent.receive(&opens);
    let mut passed = 0;
    while p.agent.poll().unwrap().is_some() {
        passed += 1;
    }
    assert_eq!(passed, MAX_OPEN_STREAMS);
    let refusal = decode_agent(p.agent.output()).unwrap();
    assert_eq!(refusal.id, RequestId(MAX_OPEN_STREAMS as u32 + 1));
    assert!(matches!(
        refusal.message,
        AgentMessage::Error {
            code: ErrorCode::TooLarge,
            ..
        }
    ));
}

#[test]
fn reopening_an_open_request_is_a_violation() {
    let mut p = Pair::open();
    let mut twice = Frame::new(RequestId(1), exec()).to_bytes();
    twice.extend(Frame::new(RequestId(1), exec()).to_bytes());
    p.agent.receive(&twice);
    assert!(p.agent.poll().unwrap().is_some());
    assert!(matches!(p.agent.poll(), Err(SessionError::Violation(_))));
}

#[test]
fn unsendable_values_are_refused_not_cut() {
    let mut p = Pair::open();
    let long = "x".repeat(usize::from(u16::MAX) + 1);
    let m = HostMessage::ClipboardGet { mime: long };
    assert_eq!(p.host.send(RequestId(1), m), Err(SendError::Cut));
    let big = HostMessage::ClipboardSet(ClipboardContent {
        mime: MIME_TEXT_UTF8.into(),
        data: vec![0; MAX_CLIPBOARD_LEN + 1],
    });
    assert!(matches!(
        p.host.send(RequestId(1), big),
        Err(SendError::Invalid(_))
    ));
    assert!(p.host.output().is_empty());
}

#[test]
fn a_request_on_an_id_in_use_or_id_0_is_refused() {
    let mut p = Pair::open();
    p.host.send(RequestId(1), exec()).unwrap();
    assert_eq!(
        p.host.send(RequestId(1), HostMessage::ReadyQuery),
        Err(SendError::IdInUse { id: RequestId(1) })
    );
    assert_eq!(
        p.host.send(RequestId(0), HostMessage::ReadyQuery),
        Err(SendError::ReservedId)
    );
    p.agent_frames();
    // A hostile host does it anyway.
    p.agent
        .receive(&Frame::new(RequestId(1), HostMessage::TimeSet { utc_ns: 1 }).to_bytes());
    assert!(matches!(p.agent.poll(), Err(SessionError::Violation(m)) if m.contains("in use")));
    let mut q = Pair::open();
    q.agent
        .receive(&Frame::new(RequestId(0), HostMessage::ReadyQuery).to_bytes());
    assert!(matches!(q.agent.poll(), Err(SessionError::Violation(_))));
}
