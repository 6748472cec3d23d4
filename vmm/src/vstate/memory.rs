//! Guest RAM backed by one memfd, mapped shared so that another process (a snapshotter,
//! a framebuffer reader) can map the same pages.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress};

use crate::arch::x86_64::layout::ram_ranges;
use crate::devices::virtio::GuestMemoryMmap;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// `memfd_create` failed.
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// Sizing the memfd failed.
    #[error("cannot size the guest memory memfd to {size} bytes")]
    Truncate {
        /// Requested size.
        size: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The memfd holding all of guest RAM, regions back to back from offset 0.
    pub memfd: File,
}

/// Creates `mem_bytes` of guest RAM laid out by [`ram_ranges`], backed by one memfd.
pub fn create_guest_ram(mem_bytes: u64) -> Result<GuestRam, MemoryError> {
    const NAME: &CStr = c"genos-guest-ram";
    // SAFETY: NAME is a valid NUL-terminated string; the flags are valid. The return value
    // is checked before use.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and nothing else owns it.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd
        .set_len(mem_bytes)
        .map_err(|source| MemoryError::Truncate {
            size: mem_bytes,
            source,
        })?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        regions.push((
            GuestAddress(start),
            len as usize,
            Some(FileOffset::new(file, offset)),
        ));
        offset += len;
    }
    let memory = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
    Ok(GuestRam { memory, memfd })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestMemoryBackend};

    use super::*;

    #[test]
    fn guest_writes_are_visible_through_the_memfd() {
        let ram = create_guest_ram(4 << 20).unwrap();
        ram.memory
            .write_slice(b"genos", GuestAddress(0x1234))
            .unwrap();
        let mut buf = [0u8; 5];
        ram.memfd.read_exact_at(&mut buf, 0x1234).unwrap();
        assert_eq!(&buf, b"genos");
        assert_eq!(ram.memory.num_regions(), 1);
        assert_eq!(ram.memfd.metadata().unwrap().len(), 4 << 20);
    }
}
