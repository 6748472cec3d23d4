//! x86_64 VM set-up: memory layout, CPUID and CPU templates, MSRs, LAPIC, boot registers,
//! the zero page and the MP table, and completing instructions KVM cannot emulate.

pub mod boot;
pub mod cpuid;
pub mod emulation;
pub mod lapic;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
