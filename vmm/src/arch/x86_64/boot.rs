//! Linux boot protocol zero page: setup header, command line, initrd and the e820 map.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{
    CMDLINE_START, EBDA_START, HIGH_RAM_START, HIMEM_START, MMIO_GAP_START, ZERO_PAGE_START,
};
use crate::devices::virtio::GuestMemoryMmap;

/// Errors writing the zero page.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Guest memory does not cover the zero page.
    #[error("cannot write the boot parameters to guest memory")]
    Write(#[source] linux_loader::configurator::Error),
    /// Too little memory to hold the kernel at 1 MiB.
    #[error("guest memory of {0} bytes is too small to boot")]
    TooSmall(u64),
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What goes into the zero page.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Command line length including the NUL.
    pub cmdline_size: u32,
    /// Initrd location and size, if any.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage setup header, when booting a bzImage.
    pub setup_header: Option<setup_header>,
}

/// The e820 map for `mem_bytes` of RAM laid out as in [`super::layout`].
pub fn e820_map(mem_bytes: u64) -> Result<Vec<boot_e820_entry>, BootError> {
    if mem_bytes <= HIMEM_START {
        return Err(BootError::TooSmall(mem_bytes));
    }
    let entry = |addr: u64, size: u64, type_: u32| boot_e820_entry {
        addr,
        size,
        r#type: type_,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    let low_end = mem_bytes.min(MMIO_GAP_START);
    map.push(entry(HIMEM_START, low_end - HIMEM_START, E820_RAM));
    if mem_bytes > MMIO_GAP_START {
        map.push(entry(HIGH_RAM_START, mem_bytes - MMIO_GAP_START, E820_RAM));
    }
    Ok(map)
}

/// Builds the zero page.
pub fn boot_params_for(cfg: &BootConfig) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cfg.cmdline_size;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(cfg.mem_bytes)?;
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);
    Ok(params)
}

/// Writes the zero page for `cfg` at [`ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, cfg: &BootConfig) -> Result<(), BootError> {
    let params = boot_params_for(cfg)?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, vm_memory::GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_has_low_ram_reserved_ebda_and_ram_from_1_mib() {
        let map = e820_map(128 << 20).unwrap();
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.r#type)).collect();
        assert_eq!(
            got,
            vec![
                (0, EBDA_START, E820_RAM),
                (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
                (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_puts_ram_beyond_the_gap_at_4_gib() {
        let mem = 5u64 << 30;
        let map = e820_map(mem).unwrap();
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size),
            (HIGH_RAM_START, mem - MMIO_GAP_START)
        );
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_loader_type() {
        let p = boot_params_for(&BootConfig {
            mem_bytes: 64 << 20,
            cmdline_size: 12,
            initrd: Some((0x300_0000, 0x1234)),
            setup_header: None,
        })
        .unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!(
            ({ hdr.ramdisk_image }, { hdr.ramdisk_size }),
            (0x300_0000, 0x1234)
        );
        assert_eq!(hdr.type_of_loader, KERNEL_LOADER_OTHER);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn memory_below_1_mib_is_refused() {
        assert!(e820_map(0x8_0000).is_err());
    }
}
