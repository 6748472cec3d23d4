//! Initramfs: static busybox, the GenOS init script and (when given) `genos-agent`,
//! packed as a gzip-compressed newc cpio archive.
//!
//! The archive is built in memory from a fixed entry list with zeroed timestamps, so
//! the same inputs always give the same bytes; no root privileges are needed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use flate2::write::GzEncoder;
use flate2::Compression;

use crate::cache::{sha256_hex, Artifact, ArtifactKind, Cache, CacheError, Cached, InputHasher};
use crate::cpio::{self, CpioError, Entry};

/// The init script, run as PID 1.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// Where Debian's busybox-static puts its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// Upper bound on the compressed archive.
pub const MAX_COMPRESSED_BYTES: u64 = 2 * 1024 * 1024;
/// The line the init prints on the console once user space runs.
pub const READY_LINE: &str = "genos-init: ready";
/// File name of the artifact in the cache.
pub const ARTIFACT_NAME: &str = "initramfs.cpio.gz";
const RECIPE: &str = "genos-initramfs-v1";

/// Errors from building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("reading {path}: {source} (install busybox-static)")]
    Busybox {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{0} is dynamically linked; the initramfs needs the static busybox from busybox-static"
    )]
    BusyboxNotStatic(PathBuf),
    #[error("reading agent {path}: {source}")]
    Agent {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} is dynamically linked; the initramfs has no C library, so build the agent statically (scripts/build-agent)")]
    AgentNotStatic(PathBuf),
    #[error(transparent)]
    Cpio(#[from] CpioError),
    #[error("compressed initramfs is {size} bytes, over the {MAX_COMPRESSED_BYTES}-byte limit")]
    TooLarge { size: u64 },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Inputs of the initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsOptions {
    pub busybox: PathBuf,
    /// Optional statically linked `genos-agent`, installed as `/sbin/genos-agent`.
    pub agent: Option<PathBuf>,
}

impl Default for InitramfsOptions {
    fn default() -> Self {
        InitramfsOptions {
            busybox: PathBuf::from(DEFAULT_BUSYBOX),
            agent: None,
        }
    }
}

/// Whether the ELF image `bytes` has no program interpreter (is statically linked).
/// Returns `None` when `bytes` is not a 64-bit little-endian ELF file.
pub fn elf_is_static(bytes: &[u8]) -> Option<bool> {
    const PT_INTERP: u32 = 3;
    if bytes.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(bytes.get(0x20..0x28)?.try_into().ok()?) as usize;
    let phentsize = usize::from(u16_at(0x36)?);
    let phnum = usize::from(u16_at(0x38)?);
    for i in 0..phnum {
        let at = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let p_type = u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?);
        if p_type == PT_INTERP {
            return Some(false);
        }
    }
    Some(true)
}

/// The archive's entries for the given binaries.
pub fn entries(busybox: Vec<u8>, agent: Option<Vec<u8>>) -> Vec<Entry> {
    let dir = |path: &str| Entry::Dir {
        path: path.to_string(),
        mode: 0o755,
    };
    let mut entries = vec![
        dir("bin"),
        dir("dev"),
        Entry::CharDevice {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        Entry::CharDevice {
            path: "dev/null".into(),
            mode: 0o666,
            major: 1,
            minor: 3,
        },
        dir("etc"),
        dir("mnt"),
        dir("mnt/root"),
        dir("proc"),
        dir("root"),
        dir("run"),
        dir("sbin"),
        dir("sys"),
        Entry::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox,
        },
        Entry::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
        },
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: INIT_SCRIPT.as_bytes().to_vec(),
        },
    ];
    if let Some(agent) = agent {
        entries.push(Entry::File {
            path: "sbin/genos-agent".into(),
            mode: 0o755,
            data: agent,
        });
    }
    entries
}

/// Packs and compresses the entries.
pub fn pack(entries: &[Entry]) -> Result<Vec<u8>, InitramfsError> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
    cpio::write_archive(&mut encoder, entries)?;
    Ok(encoder.finish().map_err(CpioError::from)?)
}

/// Returns the cached initramfs, building it on a miss.
pub fn build(cache: &Cache, options: &InitramfsOptions) -> Result<Artifact, InitramfsError> {
    let busybox = fs::read(&options.busybox).map_err(|source| InitramfsError::Busybox {
        path: options.busybox.clone(),
        source,
    })?;
    if elf_is_static(&busybox) != Some(true) {
        return Err(InitramfsError::BusyboxNotStatic(options.busybox.clone()));
    }
    let agent = match &options.agent {
        Some(path) => {
            let bytes = fs::read(path).map_err(|source| InitramfsError::Agent {
                path: path.clone(),
                source,
            })?;
            if elf_is_static(&bytes) != Some(true) {
                return Err(InitramfsError::AgentNotStatic(path.clone()));
            }
            Some(bytes)
        }
        None => None,
    };
    let mut hasher = InputHasher::new(RECIPE);
    hasher
        .add("busybox", sha256_hex(&busybox).as_bytes())
        .add("init", INIT_SCRIPT.as_bytes());
    if let Some(agent) = &agent {
        hasher.add("agent", sha256_hex(agent).as_bytes());
    }
    let hash = hasher.finish();
    let _lock = match cache.lookup_or_lock(ArtifactKind::Initramfs, &hash)? {
        Cached::Hit(hit) => return Ok(hit),
        Cached::Miss(lock) => lock,
    };
    let started = Instant::now();
    let inputs = serde_json::json!({
        "busybox": options.busybox,
        "busybox_sha256": sha256_hex(&busybox),
        "agent": options.agent,
        "agent_sha256": agent.as_deref().map(sha256_hex),
    });
    let packed = pack(&entries(busybox, agent))?;
    if packed.len() as u64 > MAX_COMPRESSED_BYTES {
        return Err(InitramfsError::TooLarge {
            size: packed.len() as u64,
        });
    }
    let staging = cache.stage(ArtifactKind::Initramfs, &hash)?;
    let path = staging.path().join(ARTIFACT_NAME);
    write_file(&path, &packed)?;
    Ok(cache.publish(
        staging,
        ArtifactKind::Initramfs,
        &hash,
        ARTIFACT_NAME,
        started.elapsed(),
        inputs,
    )?)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), InitramfsError> {
    let write = || -> std::io::Result<()> {
        let mut file = fs::File::create(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    };
    write().map_err(|source| InitramfsError::Write {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elf_with_phdrs(types: &[u32]) -> Vec<u8> {
        let mut bytes = vec![0u8; 64 + 56 * types.len()];
        bytes[..6].copy_from_slice(b"\x7fELF\x02\x01");
        bytes[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        bytes[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        bytes[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, ty) in types.iter().enumerate() {
            bytes[64 + 56 * i..68 + 56 * i].copy_from_slice(&ty.to_le_bytes());
        }
        bytes
    }

    #[test]
    fn elf_with_interpreter_is_dynamic() {
        assert_eq!(elf_is_static(&elf_with_phdrs(&[1, 3, 1])), Some(false));
        assert_eq!(elf_is_static(&elf_with_phdrs(&[1, 1])), Some(true));
    }

    #[test]
    fn non_elf_and_truncated_input_is_not_classified() {
        assert_eq!(elf_is_static(b"#!/bin/sh\n"), None);
        let mut truncated = elf_with_phdrs(&[1, 1]);
        truncated.truncate(80);
        assert_eq!(elf_is_static(&truncated), None);
    }

    #[test]
    fn init_script_signals_boot_timer_and_prints_ready_line() {
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains("devmem 0xd0000000 8 123"));
        assert!(INIT_SCRIPT.contains(&format!("echo \"{READY_LINE}\"")));
    }

    #[test]
    fn entries_include_agent_only_when_given() {
        let without = entries(vec![1], None);
        let with = entries(vec![1], Some(vec![2]));
        assert!(!without.iter().any(|e| e.path() == "sbin/genos-agent"));
        assert!(with.iter().any(|e| e.path() == "sbin/genos-agent"));
    }
}
