//! Writer for the "newc" cpio format the kernel unpacks as an initramfs.
//!
//! Entries are written with fixed inode numbers, owner root and mtime 0, so the same
//! entry list always gives the same bytes. Device nodes are plain headers here, which
//! is why building an initramfs needs no privileges.

use std::io::{self, Write};

/// Errors from writing an archive.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("entry name {0:?} must be relative, non-empty and free of NUL bytes")]
    BadName(String),
    #[error("entry {0:?} is larger than the 4 GiB newc limit")]
    TooLarge(String),
    #[error("writing archive: {0}")]
    Io(#[from] io::Error),
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// One archive member; paths are relative to the archive root (no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDevice {
        path: String,
        mode: u32,
        major: u32,
        minor: u32,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Symlink { path, .. }
            | Entry::CharDevice { path, .. } => path,
        }
    }
}

/// Writes `entries` followed by the trailer to `out`.
pub fn write_archive<W: Write>(out: &mut W, entries: &[Entry]) -> Result<(), CpioError> {
    let mut offset = 0u64;
    for (index, entry) in entries.iter().enumerate() {
        let name = entry.path();
        if name.is_empty() || name.starts_with('/') || name.contains('\0') {
            return Err(CpioError::BadName(name.to_string()));
        }
        let ino = index as u32 + 1;
        let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match entry {
            Entry::Dir { mode, .. } => (S_IFDIR | (mode & 0o7777), 2, &[], (0, 0)),
            Entry::File { mode, data, .. } => (S_IFREG | (mode & 0o7777), 1, data, (0, 0)),
            Entry::Symlink { target, .. } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
            Entry::CharDevice {
                mode, major, minor, ..
            } => (S_IFCHR | (mode & 0o7777), 1, &[], (*major, *minor)),
        };
        let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(name.to_string()))?;
        write_member(out, &mut offset, ino, mode, nlink, rdev, name, data, size)?;
    }
    write_member(out, &mut offset, 0, 0, 1, (0, 0), "TRAILER!!!", &[], 0)?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn write_member<W: Write>(
    out: &mut W,
    offset: &mut u64,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
    size: u32,
) -> Result<(), CpioError> {
    let name_size = name.len() as u32 + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
         {maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{name_size:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        maj = 0,
        min = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        check = 0,
    );
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    *offset += header.len() as u64 + u64::from(name_size);
    pad(out, offset)?;
    out.write_all(data)?;
    *offset += data.len() as u64;
    pad(out, offset)
}

fn pad<W: Write>(out: &mut W, offset: &mut u64) -> Result<(), CpioError> {
    let padding = (4 - (*offset % 4) as usize) % 4;
    out.write_all(&[0; 3][..padding])?;
    *offset += padding as u64;
    Ok(())
}

/// A member read back by [`parse_archive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedMember {
    pub name: String,
    pub mode: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Errors from reading an archive.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("archive truncated at byte {0}")]
    Truncated(usize),
    #[error("bad magic or header field at byte {0}")]
    BadHeader(usize),
}

/// Reads a newc archive up to its trailer (used to inspect built images).
pub fn parse_archive(bytes: &[u8]) -> Result<Vec<ParsedMember>, ParseError> {
    let mut members = Vec::new();
    let mut pos = 0usize;
    loop {
        let header = bytes
            .get(pos..pos + 110)
            .ok_or(ParseError::Truncated(pos))?;
        if &header[..6] != b"070701" {
            return Err(ParseError::BadHeader(pos));
        }
        let field = |i: usize| -> Result<u32, ParseError> {
            let text = std::str::from_utf8(&header[6 + i * 8..14 + i * 8])
                .map_err(|_| ParseError::BadHeader(pos))?;
            u32::from_str_radix(text, 16).map_err(|_| ParseError::BadHeader(pos))
        };
        let (mode, size, rmaj, rmin, name_size) =
            (field(1)?, field(6)?, field(9)?, field(10)?, field(11)?);
        let name_start = pos + 110;
        let name_end = name_start + name_size as usize;
        let name_bytes = bytes
            .get(name_start..name_end.saturating_sub(1))
            .ok_or(ParseError::Truncated(name_start))?;
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let data_start = name_end.div_ceil(4) * 4;
        let data_end = data_start + size as usize;
        let data = bytes
            .get(data_start..data_end)
            .ok_or(ParseError::Truncated(data_start))?
            .to_vec();
        pos = data_end.div_ceil(4) * 4;
        if name == "TRAILER!!!" {
            return Ok(members);
        }
        members.push(ParsedMember {
            name,
            mode,
            rdev: (rmaj, rmin),
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry::Dir {
                path: "bin".into(),
                mode: 0o755,
            },
            Entry::File {
                path: "bin/hello".into(),
                mode: 0o755,
                data: b"hello world".to_vec(),
            },
            Entry::Symlink {
                path: "bin/sh".into(),
                target: "hello".into(),
            },
            Entry::CharDevice {
                path: "console".into(),
                mode: 0o600,
                major: 5,
                minor: 1,
            },
        ]
    }

    #[test]
    fn archive_round_trips_through_the_parser() {
        let mut bytes = Vec::new();
        write_archive(&mut bytes, &sample()).unwrap();

        let members = parse_archive(&bytes).unwrap();

        assert_eq!(members.len(), 4);
        assert_eq!(members[1].name, "bin/hello");
        assert_eq!(members[1].mode, 0o100_755);
        assert_eq!(members[1].data, b"hello world");
        assert_eq!(members[2].data, b"hello");
        assert_eq!(members[3].mode, 0o020_600);
        assert_eq!(members[3].rdev, (5, 1));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn archive_is_byte_for_byte_reproducible() {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        write_archive(&mut a, &sample()).unwrap();
        write_archive(&mut b, &sample()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn absolute_names_are_refused() {
        let err = write_archive(
            &mut Vec::new(),
            &[Entry::Dir {
                path: "/bin".into(),
                mode: 0o755,
            }],
        )
        .unwrap_err();
        assert!(matches!(err, CpioError::BadName(_)));
    }

    #[test]
    fn system_cpio_lists_our_archive() {
        if crate::tools::find("cpio").is_none() {
            testkit::skip(testkit::Need::Tools, "cpio not installed");
            return;
        }
        let mut bytes = Vec::new();
        write_archive(&mut bytes, &sample()).unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "bin\nbin/hello\nbin/sh\nconsole\n"
        );
    }
}
