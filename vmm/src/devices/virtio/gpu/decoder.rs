//! Sans-IO wire format of the virtio-gpu 2D control and cursor queues: request bytes to a
//! typed [`Request`], and typed [`Response`]s back to bytes (virtio 1.2, section 5.7.6).
//!
//! The decoder checks everything that can be checked without device state: lengths, known
//! commands and formats, rectangle and size arithmetic. Checks that need state (does the
//! resource exist, is the backing inside guest memory, does a rectangle fit the resource)
//! are the device's.

/// Size of `virtio_gpu_ctrl_hdr`.
pub const HEADER_LEN: usize = 24;
/// Size of one `virtio_gpu_mem_entry`.
pub const MEM_ENTRY_LEN: usize = 16;
/// Most backing entries one RESOURCE_ATTACH_BACKING may carry (QEMU's limit too).
pub const MAX_MEM_ENTRIES: u32 = 16384;
/// Largest resource width or height accepted.
pub const MAX_DIMENSION: u32 = 16384;
/// Number of scanouts the device reports in GET_DISPLAY_INFO.
pub const MAX_SCANOUTS: usize = 16;
/// Size of the EDID blob in an OK_EDID response.
pub const EDID_BLOB_LEN: usize = 1024;

/// `VIRTIO_GPU_FLAG_FENCE`: the driver wants the response to signal `fence_id`.
pub const FLAG_FENCE: u32 = 1;
/// `VIRTIO_GPU_FLAG_INFO_RING_IDX`: `ring_idx` is valid.
pub const FLAG_INFO_RING_IDX: u32 = 2;

/// Command type codes.
pub mod cmd {
    pub const GET_DISPLAY_INFO: u32 = 0x0100;
    pub const RESOURCE_CREATE_2D: u32 = 0x0101;
    pub const RESOURCE_UNREF: u32 = 0x0102;
    pub const SET_SCANOUT: u32 = 0x0103;
    pub const RESOURCE_FLUSH: u32 = 0x0104;
    pub const TRANSFER_TO_HOST_2D: u32 = 0x0105;
    pub const RESOURCE_ATTACH_BACKING: u32 = 0x0106;
    pub const RESOURCE_DETACH_BACKING: u32 = 0x0107;
    pub const GET_CAPSET_INFO: u32 = 0x0108;
    pub const GET_CAPSET: u32 = 0x0109;
    pub const GET_EDID: u32 = 0x010a;
    pub const UPDATE_CURSOR: u32 = 0x0300;
    pub const MOVE_CURSOR: u32 = 0x0301;
}

/// Response type codes.
pub mod resp {
    pub const OK_NODATA: u32 = 0x1100;
    pub const OK_DISPLAY_INFO: u32 = 0x1101;
    pub const OK_EDID: u32 = 0x1104;
    pub const ERR_UNSPEC: u32 = 0x1200;
    pub const ERR_OUT_OF_MEMORY: u32 = 0x1201;
    pub const ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
    pub const ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
    pub const ERR_INVALID_PARAMETER: u32 = 0x1205;
}

/// Errors decoding a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a control header.
    #[error("request of {0} bytes is shorter than the 24-byte header")]
    ShortHeader(usize),
    /// The request is shorter than its command needs.
    #[error("command {command:#x} needs {needed} bytes, got {got}")]
    Truncated {
        command: u32,
        needed: usize,
        got: usize,
    },
    /// Not a command this 2D device knows.
    #[error("unknown or unsupported command {0:#x}")]
    UnknownCommand(u32),
    /// Not one of the supported 32-bit formats.
    #[error("unsupported pixel format {0}")]
    UnknownFormat(u32),
    /// Resource id 0 is reserved for "no resource".
    #[error("resource id 0 is reserved")]
    ReservedResourceId,
    /// Width or height zero or above [`MAX_DIMENSION`].
    #[error("resource size {width}x{height} out of range")]
    BadSize { width: u32, height: u32 },
    /// `x + width` or `y + height` overflows.
    #[error("rectangle {0} overflows")]
    RectOverflow(Rect),
    /// Too many backing entries.
    #[error("{0} backing entries exceed the limit of {MAX_MEM_ENTRIES}")]
    TooManyEntries(u32),
    /// A backing entry's address range wraps around.
    #[error("backing entry {addr:#x}+{len:#x} wraps around")]
    EntryOverflow { addr: u64, len: u32 },
}

impl DecodeError {
    /// The response type the guest gets for this error.
    pub fn response_type(&self) -> u32 {
        match self {
            DecodeError::ShortHeader(_)
            | DecodeError::Truncated { .. }
            | DecodeError::UnknownCommand(_) => resp::ERR_UNSPEC,
            DecodeError::ReservedResourceId => resp::ERR_INVALID_RESOURCE_ID,
            DecodeError::UnknownFormat(_)
            | DecodeError::BadSize { .. }
            | DecodeError::RectOverflow(_)
            | DecodeError::TooManyEntries(_)
            | DecodeError::EntryOverflow { .. } => resp::ERR_INVALID_PARAMETER,
        }
    }
}

/// `virtio_gpu_ctrl_hdr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtrlHeader {
    /// Command or response type.
    pub ty: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Fence to signal when `flags` has [`FLAG_FENCE`].
    pub fence_id: u64,
    /// 3D context (unused in 2D, echoed).
    pub ctx_id: u32,
    /// Fence ring when `flags` has [`FLAG_INFO_RING_IDX`].
    pub ring_idx: u8,
}

impl CtrlHeader {
    /// Whether the driver asked for a fence.
    pub fn fenced(&self) -> bool {
        self.flags & FLAG_FENCE != 0
    }
}

/// A rectangle as the protocol carries it (`struct virtio_gpu_rect`): the frame path's one
/// rectangle type.
pub use framebuffer::Rect;

/// The supported 32-bit-per-pixel formats, named by memory byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    B8G8R8A8,
    B8G8R8X8,
    A8R8G8B8,
    X8R8G8B8,
    R8G8B8A8,
    X8B8G8R8,
    A8B8G8R8,
    R8G8B8X8,
}

impl Format {
    /// The format with virtio code `code`.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            1 => Format::B8G8R8A8,
            2 => Format::B8G8R8X8,
            3 => Format::A8R8G8B8,
            4 => Format::X8R8G8B8,
            67 => Format::R8G8B8A8,
            68 => Format::X8B8G8R8,
            121 => Format::A8B8G8R8,
            134 => Format::R8G8B8X8,
            _ => return None,
        })
    }

    /// The format's virtio code (the inverse of [`Format::from_code`]).
    pub fn code(self) -> u32 {
        match self {
            Format::B8G8R8A8 => 1,
            Format::B8G8R8X8 => 2,
            Format::A8R8G8B8 => 3,
            Format::X8R8G8B8 => 4,
            Format::R8G8B8A8 => 67,
            Format::X8B8G8R8 => 68,
            Format::A8B8G8R8 => 121,
            Format::R8G8B8X8 => 134,
        }
    }

    /// Bytes per pixel (all supported formats have 4).
    pub const fn bytes_per_pixel(self) -> u32 {
        4
    }
}

/// One `virtio_gpu_mem_entry`: a guest-physical range of backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemEntry {
    pub addr: u64,
    pub len: u32,
}

/// `virtio_gpu_cursor_pos`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CursorPos {
    pub scanout_id: u32,
    pub x: u32,
    pub y: u32,
}

/// A decoded command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    GetDisplayInfo,
    GetEdid {
        scanout_id: u32,
    },
    ResourceCreate2d {
        resource_id: u32,
        format: Format,
        width: u32,
        height: u32,
    },
    ResourceUnref {
        resource_id: u32,
    },
    ResourceAttachBacking {
        resource_id: u32,
        entries: Vec<MemEntry>,
    },
    ResourceDetachBacking {
        resource_id: u32,
    },
    SetScanout {
        scanout_id: u32,
        resource_id: u32,
        rect: Rect,
    },
    TransferToHost2d {
        resource_id: u32,
        rect: Rect,
        offset: u64,
    },
    ResourceFlush {
        resource_id: u32,
        rect: Rect,
    },
    UpdateCursor {
        pos: CursorPos,
        resource_id: u32,
        hot_x: u32,
        hot_y: u32,
    },
    MoveCursor {
        pos: CursorPos,
    },
}

/// A decoded request: header plus command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub header: CtrlHeader,
    pub command: Command,
}

/// Little-endian field reader over the request body (after the header).
struct Fields<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Fields<'_> {
    fn u32(&mut self) -> u32 {
        let v = u32::from_le_bytes(self.bytes[self.pos..self.pos + 4].try_into().unwrap());
        self.pos += 4;
        v
    }

    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.bytes[self.pos..self.pos + 8].try_into().unwrap());
        self.pos += 8;
        v
    }

    fn rect(&mut self) -> Rect {
        Rect {
            x: self.u32(),
            y: self.u32(),
            width: self.u32(),
            height: self.u32(),
        }
    }
}

/// Decodes just the header, so that even a malformed request gets a response carrying its
/// fence.
pub fn decode_header(bytes: &[u8]) -> Result<CtrlHeader, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::ShortHeader(bytes.len()));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    Ok(CtrlHeader {
        ty: u32_at(0),
        flags: u32_at(4),
        fence_id: u64::from_le_bytes(bytes[8..16].try_into().unwrap()),
        ctx_id: u32_at(16),
        ring_idx: bytes[20],
    })
}

/// Fixed size (header included) of each command's request struct.
fn fixed_len(command: u32) -> Option<usize> {
    Some(match command {
        cmd::GET_DISPLAY_INFO => HEADER_LEN,
        cmd::GET_EDID => HEADER_LEN + 8,
        cmd::RESOURCE_CREATE_2D => HEADER_LEN + 16,
        cmd::RESOURCE_UNREF => HEADER_LEN + 8,
        cmd::SET_SCANOUT => HEADER_LEN + 24,
        cmd::RESOURCE_FLUSH => HEADER_LEN + 24,
        cmd::TRANSFER_TO_HOST_2D => HEADER_LEN + 32,
        cmd::RESOURCE_ATTACH_BACKING => HEADER_LEN + 8,
        cmd::RESOURCE_DETACH_BACKING => HEADER_LEN + 8,
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => HEADER_LEN + 32,
        _ => return None,
    })
}

fn checked_rect(rect: Rect) -> Result<Rect, DecodeError> {
    if rect.x.checked_add(rect.width).is_none() || rect.y.checked_add(rect.height).is_none() {
        return Err(DecodeError::RectOverflow(rect));
    }
    Ok(rect)
}

fn nonzero_id(id: u32) -> Result<u32, DecodeError> {
    if id == 0 {
        return Err(DecodeError::ReservedResourceId);
    }
    Ok(id)
}

/// Decodes one request from the bytes the driver put in the device-readable descriptors.
/// Trailing bytes beyond the command's struct are ignored, as the spec allows.
pub fn decode(bytes: &[u8]) -> Result<Request, DecodeError> {
    let header = decode_header(bytes)?;
    let needed = fixed_len(header.ty).ok_or(DecodeError::UnknownCommand(header.ty))?;
    if bytes.len() < needed {
        return Err(DecodeError::Truncated {
            command: header.ty,
            needed,
            got: bytes.len(),
        });
    }
    let mut f = Fields {
        bytes,
        pos: HEADER_LEN,
    };
    let command = match header.ty {
        cmd::GET_DISPLAY_INFO => Command::GetDisplayInfo,
        cmd::GET_EDID => Command::GetEdid {
            scanout_id: f.u32(),
        },
        cmd::RESOURCE_CREATE_2D => {
            let resource_id = nonzero_id(f.u32())?;
            let code = f.u32();
            let format = Format::from_code(code).ok_or(DecodeError::UnknownFormat(code))?;
            let (width, height) = (f.u32(), f.u32());
            if width == 0 || height == 0 || width > MAX_DIMENSION || height > MAX_DIMENSION {
                return Err(DecodeError::BadSize { width, height });
            }
            Command::ResourceCreate2d {
                resource_id,
                format,
                width,
                height,
            }
        }
        cmd::RESOURCE_UNREF => Command::ResourceUnref {
            resource_id: nonzero_id(f.u32())?,
        },
        cmd::SET_SCANOUT => {
            let rect = checked_rect(f.rect())?;
            Command::SetScanout {
                scanout_id: f.u32(),
                // 0 means "disable the scanout".
                resource_id: f.u32(),
                rect,
            }
        }
        cmd::RESOURCE_FLUSH => {
            let rect = checked_rect(f.rect())?;
            Command::ResourceFlush {
                rect,
                resource_id: nonzero_id(f.u32())?,
            }
        }
        cmd::TRANSFER_TO_HOST_2D => {
            let rect = checked_rect(f.rect())?;
            let offset = f.u64();
            Command::TransferToHost2d {
                rect,
                offset,
                resource_id: nonzero_id(f.u32())?,
            }
        }
        cmd::RESOURCE_ATTACH_BACKING => {
            let resource_id = nonzero_id(f.u32())?;
            let count = f.u32();
            if count > MAX_MEM_ENTRIES {
                return Err(DecodeError::TooManyEntries(count));
            }
            let needed = needed + count as usize * MEM_ENTRY_LEN;
            if bytes.len() < needed {
                return Err(DecodeError::Truncated {
                    command: header.ty,
                    needed,
                    got: bytes.len(),
                });
            }
            let mut entries = Vec::with_capacity(count as usize);
            for _ in 0..count {
                let addr = f.u64();
                let len = f.u32();
                let _padding = f.u32();
                if addr.checked_add(u64::from(len)).is_none() {
                    return Err(DecodeError::EntryOverflow { addr, len });
                }
                entries.push(MemEntry { addr, len });
            }
            Command::ResourceAttachBacking {
                resource_id,
                entries,
            }
        }
        cmd::RESOURCE_DETACH_BACKING => Command::ResourceDetachBacking {
            resource_id: nonzero_id(f.u32())?,
        },
        cmd::UPDATE_CURSOR | cmd::MOVE_CURSOR => {
            let pos = CursorPos {
                scanout_id: f.u32(),
                x: f.u32(),
                y: f.u32(),
            };
            let _padding = f.u32();
            if header.ty == cmd::MOVE_CURSOR {
                Command::MoveCursor { pos }
            } else {
                Command::UpdateCursor {
                    pos,
                    // 0 hides the cursor.
                    resource_id: f.u32(),
                    hot_x: f.u32(),
                    hot_y: f.u32(),
                }
            }
        }
        other => return Err(DecodeError::UnknownCommand(other)),
    };
    Ok(Request { header, command })
}

/// A response to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// `OK_NODATA`.
    OkNoData,
    /// `OK_DISPLAY_INFO`: per scanout, `Some((width, height))` when enabled.
    DisplayInfo(Vec<Option<(u32, u32)>>),
    /// `OK_EDID` with the EDID bytes (at most [`EDID_BLOB_LEN`]).
    Edid(Vec<u8>),
    /// An error response of the given `resp::ERR_*` type.
    Err(u32),
}

/// Encodes `response` to the request with header `request`: the fence flag, fence id,
/// context and ring index are echoed so that fenced commands signal their fence.
pub fn encode_response(request: &CtrlHeader, response: &Response) -> Vec<u8> {
    let ty = match response {
        Response::OkNoData => resp::OK_NODATA,
        Response::DisplayInfo(_) => resp::OK_DISPLAY_INFO,
        Response::Edid(_) => resp::OK_EDID,
        Response::Err(code) => *code,
    };
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&(request.flags & (FLAG_FENCE | FLAG_INFO_RING_IDX)).to_le_bytes());
    out.extend_from_slice(&request.fence_id.to_le_bytes());
    out.extend_from_slice(&request.ctx_id.to_le_bytes());
    out.push(request.ring_idx);
    out.extend_from_slice(&[0; 3]);
    match response {
        Response::OkNoData | Response::Err(_) => {}
        Response::DisplayInfo(modes) => {
            for i in 0..MAX_SCANOUTS {
                let mode = modes.get(i).copied().flatten();
                let (w, h) = mode.unwrap_or((0, 0));
                for v in [0, 0, w, h, u32::from(mode.is_some()), 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        Response::Edid(edid) => {
            let len = edid.len().min(EDID_BLOB_LEN);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(&[0; 4]);
            out.extend_from_slice(&edid[..len]);
            out.resize(HEADER_LEN + 8 + EDID_BLOB_LEN, 0);
        }
    }
    out
}

/// A 128-byte EDID 1.4 block announcing one preferred `width` x `height` mode at 60 Hz
/// (reduced-blanking timings), named "GenOS".
pub fn edid_for(width: u32, height: u32) -> Vec<u8> {
    let (w, h) = (width.min(4095), height.min(4095));
    let (h_blank, v_blank) = (160u32, 31u32);
    let clock_10khz = ((w + h_blank) * (h + v_blank) * 60).div_ceil(10_000);
    let clock = clock_10khz.min(u32::from(u16::MAX)) as u16;
    let mut e = vec![0u8; 128];
    e[..8].copy_from_slice(&[0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00]);
    // Manufacturer "GOS": three 5-bit letters, big-endian.
    let id: u16 =
        ((u16::from(b'G' - b'@')) << 10) | ((u16::from(b'O' - b'@')) << 5) | u16::from(b'S' - b'@');
    e[8..10].copy_from_slice(&id.to_be_bytes());
    e[10] = 1; // product code
    e[16] = 1; // week
    e[17] = 36; // year 2026 - 1990
    e[18] = 1; // EDID 1.4
    e[19] = 4;
    e[20] = 0xa5; // digital, 8 bits per colour, DisplayPort
    e[21] = (w / 40).clamp(1, 255) as u8; // screen size in cm at ~100 dpi
    e[22] = (h / 40).clamp(1, 255) as u8;
    e[23] = 120; // gamma 2.2
    e[24] = 0x06; // sRGB default, preferred timing includes native mode
    e[25..35].copy_from_slice(&[0xee, 0x91, 0xa3, 0x54, 0x4c, 0x99, 0x26, 0x0f, 0x50, 0x54]);
    for i in 0..8 {
        e[38 + 2 * i] = 1;
        e[39 + 2 * i] = 1;
    }
    // Detailed timing descriptor 1: the preferred mode.
    let d = &mut e[54..72];
    d[0..2].copy_from_slice(&clock.to_le_bytes());
    d[2] = (w & 0xff) as u8;
    d[3] = (h_blank & 0xff) as u8;
    d[4] = (((w >> 8) & 0xf) << 4 | ((h_blank >> 8) & 0xf)) as u8;
    d[5] = (h & 0xff) as u8;
    d[6] = (v_blank & 0xff) as u8;
    d[7] = (((h >> 8) & 0xf) << 4 | ((v_blank >> 8) & 0xf)) as u8;
    d[8] = 48; // h front porch
    d[9] = 32; // h sync width
    d[10] = (3 << 4) | 5; // v front porch 3, v sync 5
    d[11] = 0;
    // Bytes 12..15 (image size in mm) stay 0: unknown, the basic block gives it in cm.
    d[17] = 0x1e; // digital separate sync, +hsync +vsync
                  // Descriptor 2: monitor name.
    let n = &mut e[72..90];
    n[3] = 0xfc;
    n[5..18].copy_from_slice(b"GenOS\n       ");
    // Descriptors 3 and 4: dummy.
    e[93] = 0x10;
    e[111] = 0x10;
    let sum = e[..127].iter().fold(0u8, |a, &b| a.wrapping_add(b));
    e[127] = 0u8.wrapping_sub(sum);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ty: u32, flags: u32, fence_id: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&fence_id.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes()); // ctx_id
        b.extend_from_slice(&[3, 0, 0, 0]); // ring_idx + padding
        b
    }

    fn request(ty: u32, fields: &[u32]) -> Vec<u8> {
        let mut b = header(ty, 0, 0);
        for f in fields {
            b.extend_from_slice(&f.to_le_bytes());
        }
        b
    }

    fn decoded(bytes: &[u8]) -> Command {
        decode(bytes).expect("valid request").command
    }

    #[test]
    fn header_fields_and_fence_are_decoded() {
        let bytes = header(cmd::GET_DISPLAY_INFO, FLAG_FENCE | FLAG_INFO_RING_IDX, 42);
        let req = decode(&bytes).unwrap();
        assert_eq!(
            req.header,
            CtrlHeader {
                ty: cmd::GET_DISPLAY_INFO,
                flags: FLAG_FENCE | FLAG_INFO_RING_IDX,
                fence_id: 42,
                ctx_id: 7,
                ring_idx: 3,
            }
        );
        assert!(req.header.fenced());
        assert_eq!(req.command, Command::GetDisplayInfo);
    }

    #[test]
    fn short_header_is_rejected_for_every_length_below_24() {
        let full = header(cmd::GET_DISPLAY_INFO, 0, 0);
        for len in 0..HEADER_LEN {
            assert_eq!(decode(&full[..len]), Err(DecodeError::ShortHeader(len)));
        }
    }

    #[test]
    fn each_fixed_size_command_is_rejected_one_byte_short() {
        let cases: [(u32, usize); 10] = [
            (cmd::GET_EDID, 8),
            (cmd::RESOURCE_CREATE_2D, 16),
            (cmd::RESOURCE_UNREF, 8),
            (cmd::SET_SCANOUT, 24),
            (cmd::RESOURCE_FLUSH, 24),
            (cmd::TRANSFER_TO_HOST_2D, 32),
            (cmd::RESOURCE_ATTACH_BACKING, 8),
            (cmd::RESOURCE_DETACH_BACKING, 8),
            (cmd::UPDATE_CURSOR, 32),
            (cmd::MOVE_CURSOR, 32),
        ];
        for (ty, body) in cases {
            let mut bytes = header(ty, 0, 0);
            bytes.resize(HEADER_LEN + body - 1, 0);
            assert_eq!(
                decode(&bytes),
                Err(DecodeError::Truncated {
                    command: ty,
                    needed: HEADER_LEN + body,
                    got: HEADER_LEN + body - 1
                }),
                "command {ty:#x}"
            );
        }
    }

    #[test]
    fn unknown_and_3d_commands_are_rejected() {
        for ty in [
            0,
            cmd::GET_CAPSET_INFO,
            cmd::GET_CAPSET,
            0x0200,
            0x1100,
            u32::MAX,
        ] {
            assert_eq!(
                decode(&header(ty, 0, 0)),
                Err(DecodeError::UnknownCommand(ty))
            );
        }
        assert_eq!(
            DecodeError::UnknownCommand(0).response_type(),
            resp::ERR_UNSPEC
        );
    }

    #[test]
    fn get_edid_decodes_its_scanout() {
        assert_eq!(
            decoded(&request(cmd::GET_EDID, &[0, 0])),
            Command::GetEdid { scanout_id: 0 }
        );
    }

    #[test]
    fn resource_create_2d_decodes_every_supported_format() {
        for code in [1, 2, 3, 4, 67, 68, 121, 134] {
            assert_eq!(
                decoded(&request(cmd::RESOURCE_CREATE_2D, &[5, code, 640, 480])),
                Command::ResourceCreate2d {
                    resource_id: 5,
                    format: Format::from_code(code).unwrap(),
                    width: 640,
                    height: 480
                }
            );
        }
    }

    #[test]
    fn resource_create_2d_rejects_bad_format_zero_id_and_sizes() {
        assert_eq!(
            decode(&request(cmd::RESOURCE_CREATE_2D, &[5, 99, 64, 64])),
            Err(DecodeError::UnknownFormat(99))
        );
        assert_eq!(
            decode(&request(cmd::RESOURCE_CREATE_2D, &[0, 2, 64, 64])),
            Err(DecodeError::ReservedResourceId)
        );
        for (w, h) in [
            (0, 64),
            (64, 0),
            (MAX_DIMENSION + 1, 1),
            (1, u32::MAX),
            (u32::MAX, u32::MAX),
        ] {
            let err = decode(&request(cmd::RESOURCE_CREATE_2D, &[5, 2, w, h])).unwrap_err();
            assert_eq!(
                err,
                DecodeError::BadSize {
                    width: w,
                    height: h
                }
            );
            assert_eq!(err.response_type(), resp::ERR_INVALID_PARAMETER);
        }
    }

    #[test]
    fn resource_unref_and_detach_decode_and_reject_id_zero() {
        assert_eq!(
            decoded(&request(cmd::RESOURCE_UNREF, &[9, 0])),
            Command::ResourceUnref { resource_id: 9 }
        );
        assert_eq!(
            decoded(&request(cmd::RESOURCE_DETACH_BACKING, &[9, 0])),
            Command::ResourceDetachBacking { resource_id: 9 }
        );
        for ty in [cmd::RESOURCE_UNREF, cmd::RESOURCE_DETACH_BACKING] {
            assert_eq!(
                decode(&request(ty, &[0, 0])),
                Err(DecodeError::ReservedResourceId)
            );
        }
    }

    #[test]
    fn set_scanout_decodes_and_allows_resource_zero_to_disable() {
        assert_eq!(
            decoded(&request(cmd::SET_SCANOUT, &[1, 2, 30, 40, 0, 8])),
            Command::SetScanout {
                scanout_id: 0,
                resource_id: 8,
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 30,
                    height: 40
                }
            }
        );
        assert!(matches!(
            decoded(&request(cmd::SET_SCANOUT, &[0, 0, 0, 0, 0, 0])),
            Command::SetScanout { resource_id: 0, .. }
        ));
    }

    #[test]
    fn rectangles_whose_edges_overflow_are_rejected() {
        let overflowing = [
            [u32::MAX, 0, 2, 1],
            [0, u32::MAX, 1, 2],
            [1, 1, u32::MAX, 1],
        ];
        for r in overflowing {
            for (ty, tail) in [
                (cmd::SET_SCANOUT, vec![0, 1]),
                (cmd::RESOURCE_FLUSH, vec![1, 0]),
                (cmd::TRANSFER_TO_HOST_2D, vec![0, 0, 1, 0]),
            ] {
                let mut fields = r.to_vec();
                fields.extend(tail);
                let err = decode(&request(ty, &fields)).unwrap_err();
                assert!(
                    matches!(err, DecodeError::RectOverflow(_)),
                    "{ty:#x}: {err}"
                );
            }
        }
    }

    #[test]
    fn resource_flush_and_transfer_decode() {
        assert_eq!(
            decoded(&request(cmd::RESOURCE_FLUSH, &[1, 2, 3, 4, 6, 0])),
            Command::ResourceFlush {
                resource_id: 6,
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 3,
                    height: 4
                }
            }
        );
        // offset is a u64: low word 0x10, high word 1.
        assert_eq!(
            decoded(&request(
                cmd::TRANSFER_TO_HOST_2D,
                &[1, 2, 3, 4, 0x10, 1, 6, 0]
            )),
            Command::TransferToHost2d {
                resource_id: 6,
                rect: Rect {
                    x: 1,
                    y: 2,
                    width: 3,
                    height: 4
                },
                offset: 0x1_0000_0010
            }
        );
    }

    #[test]
    fn attach_backing_decodes_its_entries() {
        let bytes = request(
            cmd::RESOURCE_ATTACH_BACKING,
            &[4, 2, 0x1000, 0, 0x2000, 0, 0, 1, 0x800, 0],
        );
        assert_eq!(
            decoded(&bytes),
            Command::ResourceAttachBacking {
                resource_id: 4,
                entries: vec![
                    MemEntry {
                        addr: 0x1000,
                        len: 0x2000
                    },
                    MemEntry {
                        addr: 0x1_0000_0000,
                        len: 0x800
                    },
                ]
            }
        );
    }

    #[test]
    fn attach_backing_with_fewer_entries_than_announced_is_truncated() {
        let bytes = request(cmd::RESOURCE_ATTACH_BACKING, &[4, 2, 0x1000, 0, 0x2000, 0]);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Truncated {
                command: cmd::RESOURCE_ATTACH_BACKING,
                needed: HEADER_LEN + 8 + 2 * MEM_ENTRY_LEN,
                got: HEADER_LEN + 8 + MEM_ENTRY_LEN
            })
        );
    }

    #[test]
    fn attach_backing_rejects_too_many_and_wrapping_entries() {
        assert_eq!(
            decode(&request(
                cmd::RESOURCE_ATTACH_BACKING,
                &[4, MAX_MEM_ENTRIES + 1]
            )),
            Err(DecodeError::TooManyEntries(MAX_MEM_ENTRIES + 1))
        );
        assert_eq!(
            decode(&request(
                cmd::RESOURCE_ATTACH_BACKING,
                &[4, 1, 0xffff_f000, 0xffff_ffff, 0x2000, 0]
            )),
            Err(DecodeError::EntryOverflow {
                addr: 0xffff_ffff_ffff_f000,
                len: 0x2000
            })
        );
    }

    #[test]
    fn cursor_commands_decode() {
        assert_eq!(
            decoded(&request(cmd::UPDATE_CURSOR, &[0, 10, 20, 0, 3, 1, 2, 0])),
            Command::UpdateCursor {
                pos: CursorPos {
                    scanout_id: 0,
                    x: 10,
                    y: 20
                },
                resource_id: 3,
                hot_x: 1,
                hot_y: 2
            }
        );
        assert_eq!(
            decoded(&request(cmd::MOVE_CURSOR, &[0, 11, 21, 0, 0, 0, 0, 0])),
            Command::MoveCursor {
                pos: CursorPos {
                    scanout_id: 0,
                    x: 11,
                    y: 21
                }
            }
        );
    }

    #[test]
    fn trailing_bytes_after_a_command_are_ignored() {
        let mut bytes = request(cmd::RESOURCE_UNREF, &[9, 0]);
        bytes.extend_from_slice(&[0xab; 40]);
        assert_eq!(decoded(&bytes), Command::ResourceUnref { resource_id: 9 });
    }

    #[test]
    fn response_echoes_fence_and_ring_but_not_other_flags() {
        let req = CtrlHeader {
            ty: cmd::RESOURCE_FLUSH,
            flags: FLAG_FENCE | FLAG_INFO_RING_IDX | 0x80,
            fence_id: 0x1234_5678_9abc,
            ctx_id: 7,
            ring_idx: 2,
        };
        let out = encode_response(&req, &Response::OkNoData);
        let back = decode_header(&out).unwrap();
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(back.ty, resp::OK_NODATA);
        assert_eq!(back.flags, FLAG_FENCE | FLAG_INFO_RING_IDX);
        assert_eq!(
            (back.fence_id, back.ctx_id, back.ring_idx),
            (0x1234_5678_9abc, 7, 2)
        );
    }

    #[test]
    fn display_info_response_lists_sixteen_scanouts() {
        let out = encode_response(
            &CtrlHeader::default(),
            &Response::DisplayInfo(vec![Some((1280, 720))]),
        );
        assert_eq!(out.len(), HEADER_LEN + MAX_SCANOUTS * 24);
        let u32_at = |o: usize| u32::from_le_bytes(out[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0), resp::OK_DISPLAY_INFO);
        assert_eq!((u32_at(32), u32_at(36), u32_at(40)), (1280, 720, 1));
        assert_eq!(u32_at(24 + 24 + 16), 0, "scanout 1 disabled");
    }

    #[test]
    fn edid_is_a_valid_block_announcing_the_mode() {
        let edid = edid_for(1920, 1080);
        assert_eq!(edid.len(), 128);
        assert_eq!(&edid[..8], &[0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
        assert_eq!(edid.iter().fold(0u8, |a, &b| a.wrapping_add(b)), 0);
        let h_active = u32::from(edid[56]) | (u32::from(edid[58] >> 4) << 8);
        let v_active = u32::from(edid[59]) | (u32::from(edid[61] >> 4) << 8);
        assert_eq!((h_active, v_active), (1920, 1080));
        let out = encode_response(&CtrlHeader::default(), &Response::Edid(edid));
        assert_eq!(out.len(), HEADER_LEN + 8 + EDID_BLOB_LEN);
        assert_eq!(u32::from_le_bytes(out[24..28].try_into().unwrap()), 128);
    }
}
