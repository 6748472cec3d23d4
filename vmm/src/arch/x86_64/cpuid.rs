//! CPUID for the guest: KVM's supported set, normalised for the VM's topology, then
//! filtered by a CPU template.
//!
//! Normalisation sets each vCPU's APIC ID and the package topology (leaves 0x1, 0x4, 0xb,
//! 0x1f, 0x8000_0008) to "one socket, one thread per core, `vcpu_count` cores", makes
//! sure the hypervisor bit and KVM signature leaf are present, and clears what describes
//! the host's physical package rather than a vCPU (thermal and power management, debug
//! store, MONITOR/MWAIT, VMX/SMX), as Firecracker and Cloud Hypervisor do. KVM's own
//! paravirtual leaf (kvmclock among it) is kept. A template then hides features.
//! `baseline` hides what the nested KVM of our development machines cannot emulate;
//! because that KVM ignores `KVM_SET_CPUID2`, the template also carries the equivalent
//! `clearcpuid=` kernel arguments, which work everywhere. `auto` is resolved to one of the
//! two from the host's facts ([`effective_template`]) before any of this runs.

use kvm_bindings::kvm_cpuid_entry2;
use vmm_api::config::KvmHostFacts;

pub use crate::config::CpuTemplate;

/// The template a VM on this host gets for `requested`: `auto` becomes `host` on real KVM
/// and `baseline` on the nested `kvm_pvm` kind or where the kind cannot be told (a jail
/// without `/sys`: hostd resolves `auto` before it starts a jailed VMM). The host's facts
/// are read here; the decision is [`CpuTemplate::resolve`].
pub fn effective_template(requested: CpuTemplate) -> (CpuTemplate, KvmHostFacts) {
    let facts = KvmHostFacts::read();
    (requested.resolve(&facts), facts)
}

/// Which register of a CPUID leaf a feature bit is in.
#[derive(Clone, Copy, Debug)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

/// How the guest kernel is told not to use a hidden feature.
#[derive(Clone, Copy, Debug)]
enum KernelOff {
    /// A boolean kernel parameter (`noxsave`, ...).
    Param(&'static str),
    /// A `clearcpuid=` entry: the kernel's X86_FEATURE number (word * 32 + bit). Numbers,
    /// not names, because Linux copies the `clearcpuid=` value into a 128-byte buffer and
    /// the names of all these features do not fit.
    Bit(u16),
    /// Implied by another entry (the AVX-512 family goes with AVX-512F).
    Implied,
}

/// One feature the baseline template hides.
#[derive(Clone, Copy, Debug)]
struct Hidden {
    /// Linux's name for the feature (documentation, checked by the tests).
    #[cfg_attr(not(test), allow(dead_code))]
    name: &'static str,
    leaf: u32,
    reg: Reg,
    bit: u32,
    kernel: KernelOff,
}

const fn hide(name: &'static str, leaf: u32, reg: Reg, bit: u32, kernel: KernelOff) -> Hidden {
    Hidden {
        name,
        leaf,
        reg,
        bit,
        kernel,
    }
}

use KernelOff::{Bit, Implied, Param};

/// Features the baseline template hides: those machine-facts lists as unusable under the
/// nested KVM of our machines, plus `cx16` (CMPXCHG16B, used by SLUB, which that KVM cannot
/// emulate either). Leaf 7 entries are subleaf 0.
const BASELINE_HIDDEN: &[Hidden] = &[
    hide("pclmulqdq", 1, Reg::Ecx, 1, Bit(4 * 32 + 1)),
    hide("ssse3", 1, Reg::Ecx, 9, Bit(4 * 32 + 9)),
    hide("fma", 1, Reg::Ecx, 12, Bit(4 * 32 + 12)),
    hide("cx16", 1, Reg::Ecx, 13, Bit(4 * 32 + 13)),
    hide("pcid", 1, Reg::Ecx, 17, Param("nopcid")),
    hide("sse4_1", 1, Reg::Ecx, 19, Bit(4 * 32 + 19)),
    hide("sse4_2", 1, Reg::Ecx, 20, Bit(4 * 32 + 20)),
    hide("movbe", 1, Reg::Ecx, 22, Bit(4 * 32 + 22)),
    hide("popcnt", 1, Reg::Ecx, 23, Bit(4 * 32 + 23)),
    hide("aes", 1, Reg::Ecx, 25, Bit(4 * 32 + 25)),
    hide("xsave", 1, Reg::Ecx, 26, Param("noxsave")),
    hide("osxsave", 1, Reg::Ecx, 27, Implied),
    hide("avx", 1, Reg::Ecx, 28, Bit(4 * 32 + 28)),
    hide("f16c", 1, Reg::Ecx, 29, Bit(4 * 32 + 29)),
    hide("rdrand", 1, Reg::Ecx, 30, Bit(4 * 32 + 30)),
    hide("fsgsbase", 7, Reg::Ebx, 0, Param("nofsgsbase")),
    hide("bmi1", 7, Reg::Ebx, 3, Bit(9 * 32 + 3)),
    hide("avx2", 7, Reg::Ebx, 5, Bit(9 * 32 + 5)),
    hide("smep", 7, Reg::Ebx, 7, Bit(9 * 32 + 7)),
    hide("bmi2", 7, Reg::Ebx, 8, Bit(9 * 32 + 8)),
    hide("erms", 7, Reg::Ebx, 9, Bit(9 * 32 + 9)),
    hide("invpcid", 7, Reg::Ebx, 10, Param("noinvpcid")),
    hide("avx512f", 7, Reg::Ebx, 16, Bit(9 * 32 + 16)),
    hide("avx512dq", 7, Reg::Ebx, 17, Implied),
    hide("rdseed", 7, Reg::Ebx, 18, Bit(9 * 32 + 18)),
    hide("adx", 7, Reg::Ebx, 19, Bit(9 * 32 + 19)),
    hide("smap", 7, Reg::Ebx, 20, Bit(9 * 32 + 20)),
    hide("avx512ifma", 7, Reg::Ebx, 21, Implied),
    hide("clflushopt", 7, Reg::Ebx, 23, Bit(9 * 32 + 23)),
    hide("clwb", 7, Reg::Ebx, 24, Bit(9 * 32 + 24)),
    hide("avx512pf", 7, Reg::Ebx, 26, Implied),
    hide("avx512er", 7, Reg::Ebx, 27, Implied),
    hide("avx512cd", 7, Reg::Ebx, 28, Implied),
    hide("sha_ni", 7, Reg::Ebx, 29, Bit(9 * 32 + 29)),
    hide("avx512bw", 7, Reg::Ebx, 30, Implied),
    hide("avx512vl", 7, Reg::Ebx, 31, Implied),
    hide("avx512vbmi", 7, Reg::Ecx, 1, Implied),
    hide("umip", 7, Reg::Ecx, 2, Bit(16 * 32 + 2)),
    hide("pku", 7, Reg::Ecx, 3, Param("nopku")),
    hide("ospke", 7, Reg::Ecx, 4, Implied),
    hide("avx512_vbmi2", 7, Reg::Ecx, 6, Implied),
    hide("avx512_vnni", 7, Reg::Ecx, 11, Implied),
    hide("avx512_bitalg", 7, Reg::Ecx, 12, Implied),
    hide("avx512_vpopcntdq", 7, Reg::Ecx, 14, Implied),
    hide("rdpid", 7, Reg::Ecx, 22, Bit(16 * 32 + 22)),
    hide("fsrm", 7, Reg::Edx, 4, Bit(18 * 32 + 4)),
    hide("abm", 0x8000_0001, Reg::Ecx, 5, Bit(6 * 32 + 5)),
];

/// KVM paravirtual features (leaf 0x4000_0001 EAX) the baseline template hides: the
/// kvmclock MSRs (old and new). With kvmclock in use, Linux's ptp_kvm driver issues the
/// KVM_HC_CLOCK_PAIRING hypercall at boot, on which the nested KVM of our machines hangs
/// the guest; without kvmclock the driver stops before the hypercall. The kernel is told
/// with `no-kvmclock` (the CPUID change alone has no effect there).
const BASELINE_HIDDEN_KVM_FEATURES: u32 = (1 << 0) | KVM_FEATURE_CLOCKSOURCE2;

/// KVM_FEATURE_CLOCKSOURCE2 (leaf 0x4000_0001 EAX bit 3): kvmclock through the new MSRs.
/// The `host` template keeps it (and the stable bit, 24), so a guest on real KVM gets
/// kvmclock as its clocksource and its wall clock at boot.
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// Longest `clearcpuid=` value Linux 6.1 reads (its buffer is 128 bytes with the NUL).
const CLEARCPUID_MAX: usize = 127;

/// Kernel command-line arguments that make the guest kernel itself avoid the features
/// `template` hides (needed where KVM ignores the CPUID table). `template` is resolved
/// ([`effective_template`]); an unresolved `auto` is taken as `baseline`, the template that
/// boots on every host.
pub fn template_kernel_args(template: CpuTemplate) -> Option<String> {
    match template {
        CpuTemplate::Host => None,
        CpuTemplate::Baseline | CpuTemplate::Auto => {
            let mut args: Vec<String> = BASELINE_HIDDEN
                .iter()
                .filter_map(|h| match h.kernel {
                    Param(p) => Some(p.to_owned()),
                    _ => None,
                })
                .collect();
            let bits: Vec<String> = BASELINE_HIDDEN
                .iter()
                .filter_map(|h| match h.kernel {
                    Bit(b) => Some(b.to_string()),
                    _ => None,
                })
                .collect();
            let clear = bits.join(",");
            debug_assert!(clear.len() <= CLEARCPUID_MAX, "clearcpuid= value too long");
            args.push(format!("clearcpuid={clear}"));
            args.push("no-kvmclock mitigations=off nopti".to_owned());
            Some(args.join(" "))
        }
    }
}

/// KVM's hypervisor signature, as EBX, ECX, EDX of leaf 0x4000_0000.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];
const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// Leaf 1 ECX bits of the host's package that a vCPU does not have: DTES64 (2),
/// MONITOR/MWAIT (3), DS-CPL (4), VMX (5, no nested virtualisation), SMX (6), EST (7),
/// TM2 (8), xTPR update control (14), PDCM (15).
const LEAF1_ECX_HOST_ONLY: u32 = (1 << 2)
    | (1 << 3)
    | (1 << 4)
    | (1 << 5)
    | (1 << 6)
    | (1 << 7)
    | (1 << 8)
    | (1 << 14)
    | (1 << 15);
/// Leaf 1 EDX bits of the host's package: DS (21), ACPI thermal control (22), TM (29),
/// PBE (31).
const LEAF1_EDX_HOST_ONLY: u32 = (1 << 21) | (1 << 22) | (1 << 29) | (1 << 31);
/// Leaf 6 EAX turbo boost (1) and ECX performance-energy bias (3): power management of the
/// host's package, which the guest cannot drive (Firecracker clears the same).
const LEAF6_EAX_TURBO: u32 = 1 << 1;
const LEAF6_ECX_EPB: u32 = 1 << 3;
/// AMD leaf 0x8000_0001 ECX SVM (2): no nested virtualisation.
const LEAF_EXT1_ECX_SVM: u32 = 1 << 2;

/// Turns KVM's supported CPUID entries into vCPU `vcpu_id`'s table for a VM of
/// `vcpu_count` vCPUs under `template` (resolved; an unresolved `auto` is taken as
/// `baseline`). Pure: the caller does the ioctls.
pub fn build_cpuid(
    supported: &[kvm_cpuid_entry2],
    vcpu_id: u8,
    vcpu_count: u8,
    template: CpuTemplate,
) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.to_vec();
    normalise_topology(&mut entries, vcpu_id, vcpu_count);
    ensure_hypervisor_leaf(&mut entries);
    clear_host_only(&mut entries);
    if template != CpuTemplate::Host {
        apply_baseline(&mut entries);
    }
    entries
}

/// Clears the features that describe the host's physical package, not a vCPU.
fn clear_host_only(entries: &mut [kvm_cpuid_entry2]) {
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ecx &= !LEAF1_ECX_HOST_ONLY;
                e.edx &= !LEAF1_EDX_HOST_ONLY;
            }
            6 => {
                e.eax &= !LEAF6_EAX_TURBO;
                e.ecx &= !LEAF6_ECX_EPB;
            }
            0x8000_0001 => e.ecx &= !LEAF_EXT1_ECX_SVM,
            _ => {}
        }
    }
}

/// Bits needed to hold numbers below `count` (the APIC-ID shift for `count` cores).
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

fn normalise_topology(entries: &mut [kvm_cpuid_entry2], vcpu_id: u8, vcpu_count: u8) {
    let apic_id = u32::from(vcpu_id);
    let count = u32::from(vcpu_count.max(1));
    let core_shift = id_bits(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                // EBX: [31:24] initial APIC ID, [23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((count & 0xff) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Deterministic cache parameters: [31:26] cores per package - 1,
                // [25:14] logical processors sharing this cache - 1.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (((count - 1) & 0x3f) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                // Extended topology: level 0 = SMT (one thread per core), level 1 = core.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_shift;
                        e.ebx = count;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: [7:0] cores - 1, [15:12] APIC-ID core bits.
                e.ecx = (e.ecx & !0xf0ff) | (core_shift << 12) | ((count - 1) & 0xff);
            }
            _ => {}
        }
    }
}

fn ensure_hypervisor_leaf(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_hv_leaf = entries
        .iter()
        .filter(|e| (HYPERVISOR_LEAF..HYPERVISOR_LEAF + 0x100).contains(&e.function))
        .map(|e| e.function)
        .max()
        .unwrap_or(HYPERVISOR_LEAF);
    match entries.iter_mut().find(|e| e.function == HYPERVISOR_LEAF) {
        Some(e) => {
            e.eax = max_hv_leaf;
            [e.ebx, e.ecx, e.edx] = KVM_SIGNATURE;
        }
        None => entries.push(kvm_cpuid_entry2 {
            function: HYPERVISOR_LEAF,
            eax: max_hv_leaf,
            ebx: KVM_SIGNATURE[0],
            ecx: KVM_SIGNATURE[1],
            edx: KVM_SIGNATURE[2],
            ..Default::default()
        }),
    }
}

fn apply_baseline(entries: &mut [kvm_cpuid_entry2]) {
    for h in BASELINE_HIDDEN {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == h.leaf && e.index == 0)
        {
            let r = match h.reg {
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !(1u32 << h.bit);
        }
    }
    for e in entries
        .iter_mut()
        .filter(|e| e.function == HYPERVISOR_LEAF + 1)
    {
        e.eax &= !BASELINE_HIDDEN_KVM_FEATURES;
    }
    // Without XSAVE the XSAVE state-components leaf must not advertise anything.
    for e in entries.iter_mut().filter(|e| e.function == 0xd) {
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf present")
    }

    fn host_like() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, [0xd, 0, 0, 0]),
            entry(1, 0, [0x806f8, 0x0840_0800, 0xffff_ffff, 0xffff_ffff]),
            entry(4, 0, [0x121, 0, 0, 0]),
            entry(4, 3, [0x163, 0, 0, 0]),
            entry(7, 0, [0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff]),
            entry(0xb, 0, [1, 2, 0x100, 9]),
            entry(0xb, 1, [4, 16, 0x201, 9]),
            entry(0xd, 0, [7, 0x340, 0x340, 0]),
            entry(0x8000_0001, 0, [0, 0, 0xffff_ffff, 0xffff_ffff]),
            entry(0x4000_0001, 0, [0x0100_00fb, 0, 0, 0]),
            entry(6, 0, [0x77, 0, 0x9, 0]),
        ]
    }

    #[test]
    fn leaf_1_carries_the_vcpu_apic_id_count_and_hypervisor_bit() {
        let out = build_cpuid(&host_like(), 3, 4, CpuTemplate::Host);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size and brand index kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
    }

    #[test]
    fn extended_topology_describes_one_thread_per_core() {
        let out = build_cpuid(&host_like(), 2, 5, CpuTemplate::Host);
        let smt = find(&out, 0xb, 0);
        let core = find(&out, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (3, 5, 0x201, 2));
    }

    #[test]
    fn cache_leaf_reports_cores_and_llc_sharing() {
        let out = build_cpuid(&host_like(), 0, 8, CpuTemplate::Host);
        let l1d = find(&out, 4, 0);
        let l3 = find(&out, 4, 3);
        assert_eq!(l1d.eax >> 26, 7);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        assert_eq!((l3.eax >> 14) & 0xfff, 7);
        assert_eq!(l3.eax & 0x3fff, 0x163);
    }

    #[test]
    fn hypervisor_signature_leaf_is_added_when_missing() {
        let out = build_cpuid(&host_like(), 0, 1, CpuTemplate::Host);
        let hv = find(&out, HYPERVISOR_LEAF, 0);
        let sig: Vec<u8> = [hv.ebx, hv.ecx, hv.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(&sig[..9], b"KVMKVMKVM");
    }

    #[test]
    fn baseline_hides_the_listed_features_and_xsave_state() {
        let out = build_cpuid(&host_like(), 0, 1, CpuTemplate::Baseline);
        let l1 = find(&out, 1, 0);
        let l7 = find(&out, 7, 0);
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 23), 0, "popcnt");
        assert_ne!(l1.ecx & 1, 0, "sse3 is kept");
        assert_eq!(l7.ebx & (1 << 20), 0, "smap");
        assert_eq!(l7.ebx & (1 << 7), 0, "smep");
        assert_eq!(l7.ecx & (1 << 2), 0, "umip");
        assert_eq!(find(&out, 0x8000_0001, 0).ecx & (1 << 5), 0, "abm");
        assert_eq!(find(&out, 0xd, 0).eax, 0);
        assert_eq!(find(&out, 0x4000_0001, 0).eax & 0b1001, 0, "kvmclock");
        assert_ne!(
            find(&out, 0x4000_0001, 0).eax & 0b0010,
            0,
            "NOP_IO_DELAY kept"
        );
    }

    #[test]
    fn host_template_keeps_features() {
        let out = build_cpuid(&host_like(), 0, 1, CpuTemplate::Host);
        assert_ne!(find(&out, 1, 0).ecx & (1 << 26), 0);
        assert_ne!(find(&out, 7, 0).ebx & (1 << 20), 0);
        assert_ne!(find(&out, 1, 0).ecx & (1 << 20), 0, "sse4_2");
        assert_ne!(find(&out, 1, 0).ecx & (1 << 25), 0, "aes");
    }

    #[test]
    fn host_template_offers_kvmclock() {
        let out = build_cpuid(&host_like(), 0, 1, CpuTemplate::Host);
        let kvm = find(&out, 0x4000_0001, 0);
        assert_ne!(kvm.eax & KVM_FEATURE_CLOCKSOURCE2, 0, "kvmclock (new MSRs)");
        assert_ne!(kvm.eax & 1, 0, "kvmclock (old MSRs)");
        assert_ne!(kvm.eax & (1 << 24), 0, "clocksource stable bit");
    }

    #[test]
    fn every_template_clears_what_only_the_host_package_has() {
        for template in [CpuTemplate::Host, CpuTemplate::Baseline] {
            let out = build_cpuid(&host_like(), 0, 2, template);
            let l1 = find(&out, 1, 0);
            assert_eq!(l1.ecx & LEAF1_ECX_HOST_ONLY, 0, "{template}");
            assert_eq!(l1.ecx & (1 << 5), 0, "vmx under {template}");
            assert_eq!(l1.edx & LEAF1_EDX_HOST_ONLY, 0, "{template}");
            assert_ne!(l1.edx & 1, 0, "fpu kept under {template}");
            let l6 = find(&out, 6, 0);
            assert_eq!(l6.eax & LEAF6_EAX_TURBO, 0);
            assert_ne!(l6.eax & (1 << 2), 0, "ARAT kept");
            assert_eq!(l6.ecx & LEAF6_ECX_EPB, 0);
            assert_eq!(find(&out, 0x8000_0001, 0).ecx & LEAF_EXT1_ECX_SVM, 0);
        }
    }

    #[test]
    fn an_unresolved_auto_is_filtered_as_baseline() {
        let auto = build_cpuid(&host_like(), 0, 1, CpuTemplate::Auto);
        let baseline = build_cpuid(&host_like(), 0, 1, CpuTemplate::Baseline);
        let regs = |v: &[kvm_cpuid_entry2]| -> Vec<[u32; 4]> {
            v.iter().map(|e| [e.eax, e.ebx, e.ecx, e.edx]).collect()
        };
        assert_eq!(regs(&auto), regs(&baseline));
        assert_eq!(
            template_kernel_args(CpuTemplate::Auto),
            template_kernel_args(CpuTemplate::Baseline)
        );
    }

    #[test]
    fn baseline_kernel_args_fit_linux_clearcpuid_buffer() {
        let args = template_kernel_args(CpuTemplate::Baseline).unwrap();
        let value = args
            .split(' ')
            .find_map(|a| a.strip_prefix("clearcpuid="))
            .unwrap();
        assert!(value.len() <= CLEARCPUID_MAX, "{} chars", value.len());
        assert!(
            value.split(',').any(|b| b == "141"),
            "cx16 (4*32+13) hidden"
        );
        for p in [
            "noxsave",
            "nopku",
            "nofsgsbase",
            "nopcid",
            "noinvpcid",
            "mitigations=off",
            "nopti",
        ] {
            assert!(args.split(' ').any(|a| a == p), "{p} missing in {args}");
        }
        assert_eq!(template_kernel_args(CpuTemplate::Host), None);
    }

    #[test]
    fn every_machine_facts_feature_is_hidden() {
        let facts = "xsave,smap,smep,umip,pku,popcnt,avx,avx2,avx512f,bmi1,bmi2,movbe,erms,\
fsrm,rdrand,rdseed,f16c,fma,aes,pclmulqdq,sha_ni,adx,abm,sse4_2,sse4_1,ssse3,rdpid,clwb,\
clflushopt,fsgsbase,invpcid,pcid";
        for name in facts.split(',') {
            let h = BASELINE_HIDDEN.iter().find(|h| h.name == name);
            assert!(
                matches!(h, Some(h) if !matches!(h.kernel, Implied)),
                "{name} not hidden from the kernel"
            );
        }
    }
}
