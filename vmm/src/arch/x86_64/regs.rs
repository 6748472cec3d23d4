//! Boot-time register state for 64-bit entry: GDT, identity page tables, segment and
//! control registers, general-purpose registers and FPU.
//!
//! The boot vCPU starts in long mode at the kernel entry with `rsi` pointing at the zero
//! page (the Linux 64-bit boot protocol). The page tables identity-map the low 4 GiB with
//! 2 MiB pages so early code reaches both RAM and the MMIO gap.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::GuestMemoryMmap;

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};

/// Errors writing boot structures to guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory does not cover a boot structure.
    #[error("cannot write {what} to guest memory")]
    Write {
        /// Which structure.
        what: &'static str,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Packs a GDT descriptor from `flags` (access byte in bits 0..8, flags nibble in 12..16),
/// `base` and `limit` (20 bits).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// Decodes GDT entry `index` of `table` into the segment register KVM expects.
pub fn segment_from_gdt(table: &[u64], index: u8) -> kvm_segment {
    let entry = table[usize::from(index)];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let limit = if g == 1 {
        (limit_raw << 12) | 0xfff
    } else {
        limit_raw
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// Writes the GDT, an empty IDT and the identity page tables. Done once per VM.
pub fn write_boot_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let write = |what: &'static str, addr: u64, val: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|source| RegsError::Write { what, source })
    };
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        write("GDT", BOOT_GDT_START + i as u64 * 8, *entry)?;
    }
    write("IDT", BOOT_IDT_START, 0)?;
    // Present | writable for table entries; | page-size (2 MiB) for the leaves.
    write("PML4", PML4_START, PDPTE_START | 0x03)?;
    for pd in 0..PDE_COUNT {
        let pd_addr = PDE_START + pd * 0x1000;
        write("PDPT", PDPTE_START + pd * 8, pd_addr | 0x03)?;
        for i in 0..512u64 {
            let phys = ((pd << 9) + i) << 21;
            write("page directory", pd_addr + i * 8, phys | 0x83)?;
        }
    }
    Ok(())
}

/// Long-mode segment and control registers on top of `sregs` (as read from the vCPU).
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment_from_gdt(&BOOT_GDT, 1);
    let data = segment_from_gdt(&BOOT_GDT, 2);
    let tss = segment_from_gdt(&BOOT_GDT, 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// General-purpose registers for entering the kernel at `entry`.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state after reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let cs = segment_from_gdt(&BOOT_GDT, 1);
        assert_eq!(
            (cs.selector, cs.l, cs.db, cs.g, cs.present),
            (8, 1, 0, 1, 1)
        );
        assert_eq!((cs.base, cs.limit, cs.type_), (0, 0xffff_ffff, 0xb));
        let ds = segment_from_gdt(&BOOT_GDT, 2);
        assert_eq!((ds.selector, ds.db, ds.type_, ds.s), (16, 1, 3, 1));
        let null = segment_from_gdt(&BOOT_GDT, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_ram_and_the_mmio_gap() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_boot_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // 0xd000_0000 is in the fourth GiB: PDPT entry 3, PD entry 0x80.
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + 3 * 8)).unwrap();
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 0x80 * 8))
            .unwrap();
        assert_eq!(pde, 0xd000_0000 | 0x83);
    }

    #[test]
    fn sregs_enable_paging_and_long_mode() {
        let s = long_mode_sregs(kvm_sregs::default());
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
    }

    #[test]
    fn boot_regs_point_rsi_at_the_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rflags), (0x100_0000, ZERO_PAGE_START, 2));
    }
}
