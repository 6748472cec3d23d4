//! Guest RAM backed by one memfd, mapped shared so that another process (a snapshotter,
//! a framebuffer reader) can map the same pages; or, for a VM restored from a snapshot,
//! the snapshot's memory file mapped copy-on-write (MAP_PRIVATE), so that every VM restored
//! from it shares the file's page cache and only the pages a VM writes are its own.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

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
    /// Writing guest memory to the snapshot's memory file failed.
    #[error("cannot write guest memory to {path}")]
    Save {
        /// The memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file cannot be opened or read.
    #[error("cannot open memory file {path}")]
    OpenFile {
        /// The memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The memory file's size is not the snapshotted VM's memory size.
    #[error("memory file {path} has {found} bytes, the snapshot's VM has {want}")]
    FileSize {
        /// The memory file.
        path: std::path::PathBuf,
        /// Its size.
        found: u64,
        /// The VM's memory size.
        want: u64,
    },
    /// Mapping the memory file failed.
    #[error("cannot map memory file {path}")]
    MapFile {
        /// The memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub memory: GuestMemoryMmap,
    /// The memfd holding all of guest RAM, regions back to back from offset 0; for a
    /// restored VM, the snapshot's memory file (read-only: the guest's writes are not in it).
    pub memfd: File,
    /// Whether `memfd` holds what the guest wrote (a memfd mapped shared), so that its
    /// holes are pages the guest never touched.
    pub file_is_current: bool,
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
    Ok(GuestRam {
        memory,
        memfd,
        file_is_current: true,
    })
}

/// Writes guest RAM to `file`, regions back to back from offset 0, the layout
/// [`restore_guest_ram`] maps. The file is sized first and only pages that hold data are
/// written: for a memfd-backed VM the memfd's holes (pages the guest never touched) stay
/// holes in the file, so a freshly booted guest's memory file is as small as what it used.
/// The vCPUs must be paused.
pub fn save_guest_ram(ram: &GuestRam, file: &File, path: &Path) -> Result<(), MemoryError> {
    use std::os::unix::fs::FileExt;
    let err = |source| MemoryError::Save {
        path: path.to_owned(),
        source,
    };
    let total: u64 = ram.memory.iter().map(|r| r.len()).sum();
    file.set_len(0).map_err(err)?;
    file.set_len(total).map_err(err)?;
    let mut offset = 0u64;
    for region in ram.memory.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| err(std::io::Error::other(e)))?;
        let len = region.len();
        // SAFETY: the region is a live mapping of `len` bytes that `ram` owns for this
        // borrow. The vCPUs are paused and devices run on this thread, so nothing writes
        // the memory while it is read here.
        let bytes = unsafe { std::slice::from_raw_parts(host, len as usize) };
        let extents = match ram.file_is_current {
            true => data_extents(&ram.memfd, offset, len).map_err(err)?,
            false => vec![(0, len)],
        };
        for (start, end) in extents {
            file.write_all_at(&bytes[start as usize..end as usize], offset + start)
                .map_err(err)?;
        }
        offset += len;
    }
    Ok(())
}

/// The parts of `[base, base + len)` of `file` that hold data (SEEK_DATA/SEEK_HOLE), as
/// offsets relative to `base`.
fn data_extents(file: &File, base: u64, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let end = base + len;
    let mut out = Vec::new();
    let mut pos = base;
    while pos < end {
        // SAFETY: lseek on an open descriptor has no memory-safety requirements.
        let data = unsafe { libc::lseek(file.as_raw_fd(), pos as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            // ENXIO: no data at or after `pos`.
            if e.raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data as i64, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        out.push((data - base, hole - base));
        pos = hole;
    }
    Ok(out)
}

/// Maps the memory file `path` of a snapshotted VM with `mem_bytes` of RAM copy-on-write
/// (MAP_PRIVATE | MAP_NORESERVE): nothing is copied, the guest's writes stay in this
/// process and the file is never modified.
pub fn restore_guest_ram(path: &Path, mem_bytes: u64) -> Result<GuestRam, MemoryError> {
    let file = File::open(path).map_err(|source| MemoryError::OpenFile {
        path: path.to_owned(),
        source,
    })?;
    let found = file
        .metadata()
        .map_err(|source| MemoryError::OpenFile {
            path: path.to_owned(),
            source,
        })?
        .len();
    if found != mem_bytes {
        return Err(MemoryError::FileSize {
            path: path.to_owned(),
            found,
            want: mem_bytes,
        });
    }
    let map_err = |source| MemoryError::MapFile {
        path: path.to_owned(),
        source,
    };
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (start, len) in ram_ranges(mem_bytes) {
        let fd = file.try_clone().map_err(map_err)?;
        let region = MmapRegionBuilder::new(len as usize)
            .with_file_offset(FileOffset::new(fd, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(std::io::Error::other(e)))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| map_err(std::io::Error::other("region wraps the address space")))?;
        regions.push(region);
        offset += len;
    }
    let memory =
        GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(std::io::Error::other(e)))?;
    Ok(GuestRam {
        memory,
        memfd: file,
        file_is_current: false,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

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

    #[test]
    fn restored_ram_has_the_saved_contents_and_writes_stay_private() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-mem-").unwrap();
        let path = dir.as_path().join("memory");
        let ram = create_guest_ram(4 << 20).unwrap();
        ram.memory
            .write_slice(b"before", GuestAddress(0x2000))
            .unwrap();
        let file = File::create(&path).unwrap();
        save_guest_ram(&ram, &file, &path).unwrap();

        let a = restore_guest_ram(&path, 4 << 20).unwrap();
        let b = restore_guest_ram(&path, 4 << 20).unwrap();
        a.memory
            .write_slice(b"after!", GuestAddress(0x2000))
            .unwrap();

        let mut seen_a = [0u8; 6];
        let mut seen_b = [0u8; 6];
        a.memory
            .read_slice(&mut seen_a, GuestAddress(0x2000))
            .unwrap();
        b.memory
            .read_slice(&mut seen_b, GuestAddress(0x2000))
            .unwrap();
        let mut on_disk = [0u8; 6];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut on_disk, 0x2000)
            .unwrap();
        assert_eq!(&seen_a, b"after!");
        assert_eq!(&seen_b, b"before");
        assert_eq!(&on_disk, b"before");
    }

    #[test]
    fn untouched_guest_pages_stay_holes_in_the_memory_file() {
        use std::os::unix::fs::MetadataExt;
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-mem-").unwrap();
        let path = dir.as_path().join("memory");
        let ram = create_guest_ram(64 << 20).unwrap();
        ram.memory
            .write_slice(b"x", GuestAddress(0x30_0000))
            .unwrap();
        let file = File::create(&path).unwrap();

        save_guest_ram(&ram, &file, &path).unwrap();

        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(meta.blocks() * 512 < 1 << 20, "{} blocks", meta.blocks());
        let back = restore_guest_ram(&path, 64 << 20).unwrap();
        let mut b = [0u8; 1];
        back.memory
            .read_slice(&mut b, GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(&b, b"x");
    }

    #[test]
    fn a_restored_vm_saves_what_it_wrote_itself() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-mem-").unwrap();
        let (first, second) = (dir.as_path().join("m1"), dir.as_path().join("m2"));
        let ram = create_guest_ram(4 << 20).unwrap();
        save_guest_ram(&ram, &File::create(&first).unwrap(), &first).unwrap();
        let restored = restore_guest_ram(&first, 4 << 20).unwrap();
        restored
            .memory
            .write_slice(b"late", GuestAddress(0x1000))
            .unwrap();

        save_guest_ram(&restored, &File::create(&second).unwrap(), &second).unwrap();

        let again = restore_guest_ram(&second, 4 << 20).unwrap();
        let mut b = [0u8; 4];
        again
            .memory
            .read_slice(&mut b, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(&b, b"late");
    }

    #[test]
    fn a_memory_file_of_another_size_is_refused() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-mem-").unwrap();
        let path = dir.as_path().join("memory");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();

        let err = restore_guest_ram(&path, 4 << 20).err().unwrap();

        assert!(
            matches!(err, MemoryError::FileSize { found: 4096, .. }),
            "{err}"
        );
    }
}
