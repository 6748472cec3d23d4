//! Wire encoding of agent frames: `u32 length`, `u8 type`, `u32 request id`, body.
//!
//! Framing (the length prefix and its limit) is the stream protocol's
//! ([`crate::stream::Message`], [`crate::stream::MessageReader`]); this module only lays out
//! the type, request id and body of each message. Decoding checks every length against its
//! field's limit before taking bytes, so a hostile peer cannot make a receiver allocate more
//! than the frame it already buffered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::wire::{bad, put_bytes32, put_str16, Reader};

use super::{
    AgentMessage, ClipboardContent, DecodeError, ErrorCode, ExecRequest, ExitStatus, Features,
    FileGetRequest, FilePutRequest, HostMessage, Message, NetworkConfig, OutputFd, PowerAction,
    RequestId, Stage, MAX_ARGS, MAX_CHUNK_LEN, MAX_CLIPBOARD_LEN, MAX_RESOLVERS,
};

/// One frame: a message and the request it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<M> {
    pub id: RequestId,
    pub message: M,
}

impl<M> Frame<M> {
    pub fn new(id: RequestId, message: M) -> Self {
        Frame { id, message }
    }
}

/// Type bytes: host messages below 0x80, agent messages from 0x80.
pub(super) mod ty {
    pub const HELLO: u8 = 0x01;
    pub const READY_QUERY: u8 = 0x02;
    pub const CREDIT: u8 = 0x03;
    pub const EXEC: u8 = 0x10;
    pub const EXEC_STDIN: u8 = 0x11;
    pub const EXEC_STDIN_EOF: u8 = 0x12;
    pub const EXEC_KILL: u8 = 0x13;
    pub const FILE_PUT: u8 = 0x20;
    pub const FILE_GET: u8 = 0x21;
    pub const FILE_DATA: u8 = 0x22;
    pub const FILE_END: u8 = 0x23;
    pub const CLIPBOARD_GET: u8 = 0x30;
    pub const CLIPBOARD_SET: u8 = 0x31;
    pub const DISPLAY_SET_MODE: u8 = 0x40;
    pub const TIME_SET: u8 = 0x41;
    pub const NETWORK_CONFIGURE: u8 = 0x42;
    pub const POWER: u8 = 0x43;

    pub const A_HELLO: u8 = 0x81;
    pub const A_READY: u8 = 0x82;
    pub const A_CREDIT: u8 = 0x83;
    pub const A_EXEC_STARTED: u8 = 0x90;
    pub const A_EXEC_OUTPUT: u8 = 0x91;
    pub const A_EXEC_EXIT: u8 = 0x92;
    pub const A_FILE_INFO: u8 = 0xa0;
    pub const A_FILE_DATA: u8 = 0xa2;
    pub const A_FILE_END: u8 = 0xa3;
    pub const A_CLIPBOARD: u8 = 0xb0;
    pub const A_CLIPBOARD_CHANGED: u8 = 0xb1;
    pub const A_DONE: u8 = 0xc0;
    pub const A_ERROR: u8 = 0xff;
}

/// An optional address: 0 (none), 4 and four bytes, or 6 and sixteen.
fn read_ip(r: &mut Reader<'_>, field: &'static str) -> Result<Option<IpAddr>, DecodeError> {
    match r.u8()? {
        0 => Ok(None),
        4 => Ok(Some(IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)))),
        6 => Ok(Some(IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)))),
        v => Err(bad(field, v)),
    }
}

fn put_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => out.push(0),
        Some(IpAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.octets());
        }
        Some(IpAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.octets());
        }
    }
}

fn put_clipboard(out: &mut Vec<u8>, c: &ClipboardContent) {
    put_str16(out, &c.mime);
    put_bytes32(out, &c.data);
}

fn read_clipboard(r: &mut Reader<'_>) -> Result<ClipboardContent, DecodeError> {
    Ok(ClipboardContent {
        mime: r.str16()?,
        data: r.bytes32(MAX_CLIPBOARD_LEN, "clipboard length")?,
    })
}

fn read_mode(r: &mut Reader<'_>) -> Result<u32, DecodeError> {
    let mode = r.u32()?;
    if mode > 0o7777 {
        return Err(bad("mode", mode));
    }
    Ok(mode)
}

fn header(out: &mut Vec<u8>, ty: u8, id: RequestId) {
    out.push(ty);
    out.extend_from_slice(&id.0.to_le_bytes());
}

/// Splits a frame into type, request id and a reader over the body.
fn open(frame: &[u8]) -> Result<(u8, RequestId, Reader<'_>), DecodeError> {
    let mut r = Reader::new(frame);
    let ty = r.u8().map_err(|_| DecodeError::Empty)?;
    let id = RequestId(r.u32()?);
    Ok((ty, id, r))
}

/// The major and minor version of a Hello frame of either side, read without decoding the
/// rest: the first four bytes of a Hello body are the same in every version, so a peer of
/// another major is refused with a clear error rather than a decode failure.
pub fn hello_version(frame: &[u8]) -> Option<(u16, u16)> {
    let (ty, _, mut r) = open(frame).ok()?;
    if ty != ty::HELLO && ty != ty::A_HELLO {
        return None;
    }
    Some((r.u16().ok()?, r.u16().ok()?))
}

impl Message for Frame<HostMessage> {
    fn encode_body(&self, out: &mut Vec<u8>) {
        use HostMessage as H;
        let id = self.id;
        match &self.message {
            H::Hello { major, minor } => {
                header(out, ty::HELLO, id);
                out.extend_from_slice(&major.to_le_bytes());
                out.extend_from_slice(&minor.to_le_bytes());
            }
            H::ReadyQuery => header(out, ty::READY_QUERY, id),
            H::Credit { bytes } => {
                header(out, ty::CREDIT, id);
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            H::Exec(e) => {
                header(out, ty::EXEC, id);
                out.extend_from_slice(&(e.argv.len() as u16).to_le_bytes());
                for a in &e.argv {
                    put_str16(out, a);
                }
                out.extend_from_slice(&(e.env.len() as u16).to_le_bytes());
                for (k, v) in &e.env {
                    put_str16(out, k);
                    put_str16(out, v);
                }
                put_str16(out, &e.cwd);
                put_str16(out, &e.user);
                out.extend_from_slice(&e.timeout_ms.to_le_bytes());
                out.push(u8::from(e.stdin));
            }
            H::ExecStdin(data) => {
                header(out, ty::EXEC_STDIN, id);
                put_bytes32(out, data);
            }
            H::ExecStdinEof => header(out, ty::EXEC_STDIN_EOF, id),
            H::ExecKill { signal } => {
                header(out, ty::EXEC_KILL, id);
                out.push(*signal);
            }
            H::FilePut(p) => {
                header(out, ty::FILE_PUT, id);
                put_str16(out, &p.path);
                put_str16(out, &p.user);
                out.extend_from_slice(&p.mode.to_le_bytes());
                out.extend_from_slice(&p.size.to_le_bytes());
                out.push(u8::from(p.as_root));
            }
            H::FileGet(g) => {
                header(out, ty::FILE_GET, id);
                put_str16(out, &g.path);
                put_str16(out, &g.user);
                out.push(u8::from(g.as_root));
            }
            H::FileData(data) => {
                header(out, ty::FILE_DATA, id);
                put_bytes32(out, data);
            }
            H::FileEnd => header(out, ty::FILE_END, id),
            H::ClipboardGet { mime } => {
                header(out, ty::CLIPBOARD_GET, id);
                put_str16(out, mime);
            }
            H::ClipboardSet(c) => {
                header(out, ty::CLIPBOARD_SET, id);
                put_clipboard(out, c);
            }
            H::DisplaySetMode { width, height } => {
                header(out, ty::DISPLAY_SET_MODE, id);
                out.extend_from_slice(&width.to_le_bytes());
                out.extend_from_slice(&height.to_le_bytes());
            }
            H::TimeSet { utc_ns } => {
                header(out, ty::TIME_SET, id);
                out.extend_from_slice(&utc_ns.to_le_bytes());
            }
            H::NetworkConfigure(n) => {
                header(out, ty::NETWORK_CONFIGURE, id);
                put_str16(out, &n.interface);
                put_ip(out, Some(n.address));
                out.push(n.prefix);
                put_ip(out, n.gateway);
                out.push(n.resolvers.len() as u8);
                for r in &n.resolvers {
                    put_ip(out, Some(*r));
                }
            }
            H::Power(action) => {
                header(out, ty::POWER, id);
                out.push(*action as u8);
            }
        }
    }

    fn decode_body(frame: &[u8]) -> Result<Self, DecodeError> {
        use HostMessage as H;
        let (t, id, mut r) = open(frame)?;
        let message = match t {
            ty::HELLO => H::Hello {
                major: r.u16()?,
                minor: r.u16()?,
            },
            ty::READY_QUERY => H::ReadyQuery,
            ty::CREDIT => H::Credit { bytes: r.u32()? },
            ty::EXEC => {
                let argc = usize::from(r.u16()?);
                if argc > MAX_ARGS {
                    return Err(bad("argc", argc as u64));
                }
                let argv = (0..argc).map(|_| r.str16()).collect::<Result<_, _>>()?;
                let envc = usize::from(r.u16()?);
                if envc > MAX_ARGS {
                    return Err(bad("envc", envc as u64));
                }
                let env = (0..envc)
                    .map(|_| Ok((r.str16()?, r.str16()?)))
                    .collect::<Result<_, DecodeError>>()?;
                H::Exec(ExecRequest {
                    argv,
                    env,
                    cwd: r.str16()?,
                    user: r.str16()?,
                    timeout_ms: r.u32()?,
                    stdin: r.bool("stdin")?,
                })
            }
            ty::EXEC_STDIN => H::ExecStdin(r.bytes32(MAX_CHUNK_LEN, "chunk length")?),
            ty::EXEC_STDIN_EOF => H::ExecStdinEof,
            ty::EXEC_KILL => match r.u8()? {
                signal @ 1..=64 => H::ExecKill { signal },
                v => return Err(bad("signal", v)),
            },
            ty::FILE_PUT => H::FilePut(FilePutRequest {
                path: r.str16()?,
                user: r.str16()?,
                mode: read_mode(&mut r)?,
                size: r.u64()?,
                as_root: r.bool("as_root")?,
            }),
            ty::FILE_GET => H::FileGet(FileGetRequest {
                path: r.str16()?,
                user: r.str16()?,
                as_root: r.bool("as_root")?,
            }),
            ty::FILE_DATA => H::FileData(r.bytes32(MAX_CHUNK_LEN, "chunk length")?),
            ty::FILE_END => H::FileEnd,
            ty::CLIPBOARD_GET => H::ClipboardGet { mime: r.str16()? },
            ty::CLIPBOARD_SET => H::ClipboardSet(read_clipboard(&mut r)?),
            ty::DISPLAY_SET_MODE => H::DisplaySetMode {
                width: r.u16()?,
                height: r.u16()?,
            },
            ty::TIME_SET => H::TimeSet { utc_ns: r.u64()? },
            ty::NETWORK_CONFIGURE => {
                let interface = r.str16()?;
                let address =
                    read_ip(&mut r, "address family")?.ok_or(bad("address family", 0u8))?;
                let prefix = r.u8()?;
                let max_prefix = if address.is_ipv4() { 32 } else { 128 };
                if prefix > max_prefix {
                    return Err(bad("prefix", prefix));
                }
                let gateway = read_ip(&mut r, "gateway family")?;
                let n = usize::from(r.u8()?);
                if n > MAX_RESOLVERS {
                    return Err(bad("resolvers", n as u64));
                }
                let resolvers = (0..n)
                    .map(|_| read_ip(&mut r, "resolver family")?.ok_or(bad("resolver family", 0u8)))
                    .collect::<Result<_, _>>()?;
                H::NetworkConfigure(NetworkConfig {
                    interface,
                    address,
                    prefix,
                    gateway,
                    resolvers,
                })
            }
            ty::POWER => H::Power(match r.u8()? {
                1 => PowerAction::Poweroff,
                2 => PowerAction::Reboot,
                v => return Err(bad("power action", v)),
            }),
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(Frame { id, message })
    }
}

impl Message for Frame<AgentMessage> {
    fn encode_body(&self, out: &mut Vec<u8>) {
        use AgentMessage as A;
        let id = self.id;
        match &self.message {
            A::Hello {
                major,
                minor,
                agent,
                features,
            } => {
                header(out, ty::A_HELLO, id);
                out.extend_from_slice(&major.to_le_bytes());
                out.extend_from_slice(&minor.to_le_bytes());
                put_str16(out, agent);
                out.extend_from_slice(&features.bits().to_le_bytes());
            }
            A::Ready(stage) => {
                header(out, ty::A_READY, id);
                out.push(*stage as u8);
            }
            A::Credit { bytes } => {
                header(out, ty::A_CREDIT, id);
                out.extend_from_slice(&bytes.to_le_bytes());
            }
            A::ExecStarted { pid } => {
                header(out, ty::A_EXEC_STARTED, id);
                out.extend_from_slice(&pid.to_le_bytes());
            }
            A::ExecOutput { fd, data } => {
                header(out, ty::A_EXEC_OUTPUT, id);
                out.push(*fd as u8);
                put_bytes32(out, data);
            }
            A::ExecExit { status, timed_out } => {
                header(out, ty::A_EXEC_EXIT, id);
                let (kind, value) = match status {
                    ExitStatus::Code(c) => (0u8, *c),
                    ExitStatus::Signal(s) => (1u8, *s),
                };
                out.push(kind);
                out.extend_from_slice(&value.to_le_bytes());
                out.push(u8::from(*timed_out));
            }
            A::FileInfo { size, mode } => {
                header(out, ty::A_FILE_INFO, id);
                out.extend_from_slice(&size.to_le_bytes());
                out.extend_from_slice(&mode.to_le_bytes());
            }
            A::FileData(data) => {
                header(out, ty::A_FILE_DATA, id);
                put_bytes32(out, data);
            }
            A::FileEnd => header(out, ty::A_FILE_END, id),
            A::Clipboard(c) => {
                header(out, ty::A_CLIPBOARD, id);
                put_clipboard(out, c);
            }
            A::ClipboardChanged(c) => {
                header(out, ty::A_CLIPBOARD_CHANGED, id);
                put_clipboard(out, c);
            }
            A::Done => header(out, ty::A_DONE, id),
            A::Error { code, message } => {
                header(out, ty::A_ERROR, id);
                out.extend_from_slice(&(*code as u16).to_le_bytes());
                put_str16(out, message);
            }
        }
    }

    fn decode_body(frame: &[u8]) -> Result<Self, DecodeError> {
        use AgentMessage as A;
        let (t, id, mut r) = open(frame)?;
        let message = match t {
            ty::A_HELLO => A::Hello {
                major: r.u16()?,
                minor: r.u16()?,
                agent: r.str16()?,
                features: Features::from_bits_retain(r.u32()?),
            },
            ty::A_READY => A::Ready(match r.u8()? {
                0 => Stage::Booting,
                1 => Stage::System,
                2 => Stage::Session,
                v => return Err(bad("stage", v)),
            }),
            ty::A_CREDIT => A::Credit { bytes: r.u32()? },
            ty::A_EXEC_STARTED => A::ExecStarted { pid: r.u32()? },
            ty::A_EXEC_OUTPUT => A::ExecOutput {
                fd: match r.u8()? {
                    1 => OutputFd::Stdout,
                    2 => OutputFd::Stderr,
                    v => return Err(bad("fd", v)),
                },
                data: r.bytes32(MAX_CHUNK_LEN, "chunk length")?,
            },
            ty::A_EXEC_EXIT => {
                let kind = r.u8()?;
                let value = r.i32()?;
                let status = match kind {
                    0 => ExitStatus::Code(value),
                    1 => ExitStatus::Signal(value),
                    v => return Err(bad("exit kind", v)),
                };
                A::ExecExit {
                    status,
                    timed_out: r.bool("timed_out")?,
                }
            }
            ty::A_FILE_INFO => A::FileInfo {
                size: r.u64()?,
                mode: read_mode(&mut r)?,
            },
            ty::A_FILE_DATA => A::FileData(r.bytes32(MAX_CHUNK_LEN, "chunk length")?),
            ty::A_FILE_END => A::FileEnd,
            ty::A_CLIPBOARD => A::Clipboard(read_clipboard(&mut r)?),
            ty::A_CLIPBOARD_CHANGED => A::ClipboardChanged(read_clipboard(&mut r)?),
            ty::A_DONE => A::Done,
            ty::A_ERROR => A::Error {
                code: ErrorCode::from_u16(r.u16()?),
                message: r.str16()?,
            },
            other => return Err(DecodeError::UnknownType(other)),
        };
        r.finish()?;
        Ok(Frame { id, message })
    }
}
