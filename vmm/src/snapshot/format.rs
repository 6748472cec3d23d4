//! The snapshot file's container: a versioned header, the serialised state and a checksum.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "GENOSNAP"
//!      8     4  format version (u32 LE), FORMAT_VERSION
//!     12     2  length V of the VMM version string (u16 LE), at most 64
//!     14     V  VMM version (UTF-8), the crate version of the genos-vmm that wrote it
//!   14+V     8  length P of the state (u64 LE), at most MAX_STATE_LEN (1 GiB)
//!   22+V     P  the state: JSON of crate::snapshot::SnapshotState
//! 22+V+P     8  CRC-64/XZ (u64 LE) of every byte before it
//! ```
//!
//! [`decode`] checks all of it before a byte of state is interpreted: a file that is
//! short, has another magic, format or VMM version, trailing bytes or a wrong checksum is
//! refused, each with its own message.

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"GENOSNAP";
/// The layout version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The version of the VMM writing snapshots; only snapshots of the same version load.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Longest VMM version string accepted.
const MAX_VERSION_LEN: usize = 64;
/// Largest state accepted: vCPU state is a few tens of KiB per vCPU, a virtio-gpu's
/// resources twice their pixels (hex), 66 MB for one 3840x2160 resource.
pub const MAX_STATE_LEN: u64 = 1 << 30;

/// Why a snapshot file is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// The file ends inside the header.
    #[error("truncated: {len} bytes, shorter than the snapshot header")]
    ShortHeader {
        /// File length.
        len: usize,
    },
    /// Not a genos-vmm snapshot.
    #[error("not a genos-vmm snapshot (bad magic)")]
    Magic,
    /// Another layout version.
    #[error("snapshot format version {found}, this VMM reads version {FORMAT_VERSION}")]
    FormatVersion {
        /// The file's version.
        found: u32,
    },
    /// The version string is too long or not UTF-8.
    #[error("corrupt header: bad VMM version field")]
    VersionField,
    /// Written by another VMM version.
    #[error("snapshot written by genos-vmm {found}, this is genos-vmm {VMM_VERSION}")]
    VmmVersion {
        /// The writer's version.
        found: String,
    },
    /// The state length is implausible.
    #[error("corrupt header: state length {len} exceeds {MAX_STATE_LEN}")]
    StateTooLong {
        /// The header's length.
        len: u64,
    },
    /// The file ends before the state and checksum the header announces.
    #[error("truncated: header announces {want} bytes, file has {have}")]
    Truncated {
        /// Bytes the header announces (header, state, checksum).
        want: u64,
        /// Bytes in the file.
        have: usize,
    },
    /// Bytes after the checksum.
    #[error("corrupt: {extra} bytes after the checksum")]
    Trailing {
        /// How many.
        extra: u64,
    },
    /// The checksum does not match.
    #[error("corrupt: checksum {found:#018x}, contents hash to {computed:#018x}")]
    Checksum {
        /// Stored.
        found: u64,
        /// Computed.
        computed: u64,
    },
}

/// CRC-64/XZ (ECMA-182 polynomial, reflected, initial and final XOR all ones).
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0xc96c_5795_d787_0f42;
    static TABLE: std::sync::OnceLock<[u64; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u64; 256];
        for (i, entry) in table.iter_mut().enumerate() {
            let mut crc = i as u64;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ POLY
                } else {
                    crc >> 1
                };
            }
            *entry = crc;
        }
        table
    });
    let mut crc = !0u64;
    for &b in data {
        crc = table[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The whole file for `state` (the serialised state).
pub fn encode(state: &[u8]) -> Vec<u8> {
    encode_with(FORMAT_VERSION, VMM_VERSION, state)
}

fn encode_with(format: u32, vmm_version: &str, state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(30 + vmm_version.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&format.to_le_bytes());
    out.extend_from_slice(&(vmm_version.len() as u16).to_le_bytes());
    out.extend_from_slice(vmm_version.as_bytes());
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(state);
    let crc = crc64(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Takes `n` bytes from the front of `rest`.
fn take<'a>(rest: &mut &'a [u8], n: usize, len: usize) -> Result<&'a [u8], FormatError> {
    if rest.len() < n {
        return Err(FormatError::ShortHeader { len });
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// Checks a whole snapshot file and returns its state bytes.
pub fn decode(file: &[u8]) -> Result<&[u8], FormatError> {
    let len = file.len();
    let mut rest = file;
    if take(&mut rest, 8, len)? != MAGIC {
        return Err(FormatError::Magic);
    }
    let format = u32::from_le_bytes(take(&mut rest, 4, len)?.try_into().unwrap_or_default());
    if format != FORMAT_VERSION {
        return Err(FormatError::FormatVersion { found: format });
    }
    let vlen = u16::from_le_bytes(take(&mut rest, 2, len)?.try_into().unwrap_or_default());
    let vlen = usize::from(vlen);
    if vlen > MAX_VERSION_LEN {
        return Err(FormatError::VersionField);
    }
    let version =
        std::str::from_utf8(take(&mut rest, vlen, len)?).map_err(|_| FormatError::VersionField)?;
    let state_len = u64::from_le_bytes(take(&mut rest, 8, len)?.try_into().unwrap_or_default());
    if state_len > MAX_STATE_LEN {
        return Err(FormatError::StateTooLong { len: state_len });
    }
    let header_len = len - rest.len();
    let want = header_len as u64 + state_len + 8;
    if (len as u64) < want {
        return Err(FormatError::Truncated { want, have: len });
    }
    if len as u64 > want {
        return Err(FormatError::Trailing {
            extra: len as u64 - want,
        });
    }
    // `want` fits in the file's length, so these are in range.
    let body_end = len - 8;
    let found = u64::from_le_bytes(file[body_end..].try_into().unwrap_or_default());
    let computed = crc64(&file[..body_end]);
    if found != computed {
        return Err(FormatError::Checksum { found, computed });
    }
    // The version is checked after the checksum: a corrupt version byte is corruption.
    if version != VMM_VERSION {
        return Err(FormatError::VmmVersion {
            found: version.to_owned(),
        });
    }
    Ok(&file[header_len..body_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc64_matches_the_xz_check_value() {
        // The catalogue's check value for CRC-64/XZ over "123456789".
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
    }

    #[test]
    fn a_file_round_trips_its_state() {
        let file = encode(b"{\"state\":1}");

        assert_eq!(decode(&file).unwrap(), b"{\"state\":1}");
    }

    #[test]
    fn every_truncation_is_refused() {
        let file = encode(b"some state");
        for cut in 0..file.len() {
            let err = decode(&file[..cut]).unwrap_err();
            assert!(
                matches!(
                    err,
                    FormatError::ShortHeader { .. } | FormatError::Truncated { .. }
                ),
                "cut at {cut}: {err:?}"
            );
        }
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let file = encode(b"some state");
        for i in 0..file.len() * 8 {
            let mut bad = file.clone();
            bad[i / 8] ^= 1 << (i % 8);
            assert!(decode(&bad).is_err(), "bit {i} flipped was accepted");
        }
    }

    #[test]
    fn another_format_version_is_refused_by_name() {
        let file = encode_with(2, VMM_VERSION, b"x");

        let err = decode(&file).unwrap_err();

        assert_eq!(err, FormatError::FormatVersion { found: 2 });
        assert_eq!(
            err.to_string(),
            "snapshot format version 2, this VMM reads version 1"
        );
    }

    #[test]
    fn another_vmm_version_is_refused_by_name() {
        let file = encode_with(FORMAT_VERSION, "0.0.1-other", b"x");

        let err = decode(&file).unwrap_err();

        assert_eq!(
            err,
            FormatError::VmmVersion {
                found: "0.0.1-other".into()
            }
        );
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut file = encode(b"x");
        file.push(0);

        assert_eq!(decode(&file), Err(FormatError::Trailing { extra: 1 }));
    }
}
