//! Intel MultiProcessor Specification 1.4 table, so that a guest without ACPI finds all
//! its CPUs, the IOAPIC and how ISA interrupts are routed.
//!
//! The table is built as bytes by a pure function (checksums included) and copied into the
//! EBDA, where Linux's `smp_scan_config` looks for the floating pointer.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::devices::virtio::GuestMemoryMmap;

/// Errors placing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than the table (and APIC IDs below the IOAPIC's) can describe.
    #[error("too many vCPUs for the MP table: {0} (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// The EBDA is not in guest memory.
    #[error("cannot write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// Most vCPUs the table supports.
pub const MAX_VCPUS: u8 = 254;
/// IOAPIC input pins, each routed from the ISA IRQ of the same number.
pub const IOAPIC_PINS: u8 = 24;

const MPC_SPEC_1_4: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: usize = 16;
const TABLE_HEADER_LEN: usize = 44;

fn checksum_fix(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// The floating pointer followed by the configuration table, to be placed at `base`.
pub fn mptable_bytes(base: u64, vcpus: u8) -> Result<Vec<u8>, MptableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MptableError::TooManyCpus(vcpus));
    }
    let ioapic_id = vcpus;
    let table_addr = base + FLOATING_POINTER_LEN as u64;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x0000_0600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x0000_0201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..IOAPIC_PINS {
        // Conforming polarity/trigger, ISA bus 0 IRQ n -> IOAPIC pin n.
        entries.extend_from_slice(&[MP_INTSRC, MP_IRQ_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = u16::from(vcpus) + 1 + 1 + u16::from(IOAPIC_PINS) + 2;

    let table_len = TABLE_HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(MPC_SPEC_1_4);
    table.push(0); // checksum, fixed below
    table.extend_from_slice(b"GENOS   ");
    table.extend_from_slice(b"GENOSVMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum_fix(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(MPC_SPEC_1_4);
    out.push(0); // checksum, fixed below
    out.extend_from_slice(&[0; 5]); // feature bytes: configuration table present
    out[10] = checksum_fix(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `vcpus` vCPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MptableError> {
    let bytes = mptable_bytes(EBDA_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn floating_pointer_and_table_have_valid_checksums() {
        let bytes = mptable_bytes(EBDA_START, 4).unwrap();
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0);
        let table = &bytes[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn table_lists_every_cpu_with_one_boot_processor() {
        let bytes = mptable_bytes(EBDA_START, 3).unwrap();
        let table = &bytes[16..];
        let cpus: Vec<&[u8]> = table[TABLE_HEADER_LEN..].chunks(20).take(3).collect();
        for (i, cpu) in cpus.iter().enumerate() {
            assert_eq!(cpu[0], MP_PROCESSOR);
            assert_eq!(cpu[1], i as u8);
        }
        assert_eq!(cpus[0][3], CPU_ENABLED | CPU_BOOTPROCESSOR);
        assert_eq!(cpus[1][3], CPU_ENABLED);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 3 + 1 + 1 + 24 + 2);
    }

    #[test]
    fn floating_pointer_points_just_past_itself() {
        let bytes = mptable_bytes(0x9fc00, 1).unwrap();
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
        assert_eq!(ptr, 0x9fc10);
    }

    #[test]
    fn table_for_the_largest_vm_fits_in_the_ebda() {
        let max = crate::config::MAX_VCPUS;
        let bytes = mptable_bytes(EBDA_START, max).unwrap();
        assert!(
            EBDA_START + bytes.len() as u64 <= 0xa_0000,
            "{} bytes",
            bytes.len()
        );
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(mptable_bytes(EBDA_START, 0).is_err());
        assert!(mptable_bytes(EBDA_START, 255).is_err());
    }
}
