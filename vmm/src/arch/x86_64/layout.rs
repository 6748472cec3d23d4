//! Guest physical memory layout (see `LAYOUT.md`, shared with the device helpers).
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT (empty)              0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 PDs
//! 0x0000_8ff0  initial stack            0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (in the EBDA)   0x0010_0000  kernel (high memory start)
//! 0xd000_0000  boot timer page          0xd000_1000  virtio-mmio slots, 4 KiB each
//! 0xfec0_0000  IOAPIC                   0xfee0_0000  LAPIC
//! RAM: [0, min(mem, 0xd000_0000)) and, above that, from 4 GiB on.
//! ```

/// Address of the GDT the VMM writes for 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Address of the (empty) IDT the VMM writes for 64-bit entry.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Linux boot protocol zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Top-level page table (PML4).
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`PDE_COUNT`] page directories, each mapping 1 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: the boot page tables identity-map the low 4 GiB so that
/// early code can reach the MMIO gap as well as RAM.
pub const PDE_COUNT: u64 = 4;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest kernel command line (including the terminating NUL).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel and everything above it may be loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap below 4 GiB.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End (exclusive) of the 32-bit MMIO gap; the IOAPIC and LAPIC follow.
pub const MMIO_GAP_END: u64 = 0xfec0_0000;
/// Where RAM continues when the guest has more than fits below the MMIO gap.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// Boot-timer MMIO page.
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// Size of the boot-timer page.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_START: u64 = 0xd000_1000;
/// Size of each virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IOAPIC MMIO address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS just below the IOAPIC-less top of the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
// The fixed boot structures must not overlap one another (checked at compile time).
const _: () = {
    assert!(BOOT_GDT_START + 4 * 8 <= BOOT_IDT_START);
    assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PDE_START + PDE_COUNT * 0x1000 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
};

/// Guest RAM ranges for `mem_bytes` of memory: below the MMIO gap and, when it does not
/// fit there, the rest from 4 GiB on.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (HIGH_RAM_START, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_range_from_zero() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn memory_beyond_the_gap_continues_at_4_gib() {
        let mem = 4u64 << 30;
        assert_eq!(
            ram_ranges(mem),
            vec![(0, MMIO_GAP_START), (HIGH_RAM_START, mem - MMIO_GAP_START)]
        );
    }
}
