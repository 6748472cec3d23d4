//! The KVM half of a snapshot: each vCPU's state and the VM's in-kernel irqchip (PIC,
//! IOAPIC), PIT and kvmclock, read from a paused VM and written into a new one.
//!
//! Every ioctl's failure is an error naming the ioctl: a snapshot is either complete or
//! not written. What KVM lacks as a capability (XSAVE, XCRs, TSC frequency) is recorded
//! as absent rather than failed, and a restore onto a KVM that lacks what the snapshot
//! has is refused. MSRs are the ones `KVM_GET_MSR_INDEX_LIST` names; those KVM lists but
//! cannot read for this vCPU (features the vCPU does not have) are left out and logged.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// IA32_TSC: written first on restore, so that the deadline below is relative to it.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: written last (KVM interprets it against the current TSC).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per ioctl.
const MSR_CHUNK: usize = 64;

/// A KVM call of the snapshot or restore path failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An ioctl failed; `what` is its name.
    #[error("{}{what} failed", vcpu_prefix(*.vcpu))]
    Ioctl {
        /// The vCPU, for vCPU ioctls.
        vcpu: Option<u8>,
        /// The ioctl (`KVM_GET_XSAVE`, ...).
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM took only part of the MSRs.
    #[error("vCPU {vcpu}: KVM_SET_MSRS refused MSR {msr:#x} ({set} of {wanted} set)")]
    Msrs {
        /// The vCPU.
        vcpu: u8,
        /// The first MSR KVM refused.
        msr: u32,
        /// MSRs set before it.
        set: usize,
        /// MSRs in the snapshot.
        wanted: usize,
    },
    /// The snapshot has state this KVM cannot take.
    #[error("vCPU {vcpu}: the snapshot has {what} state but this KVM lacks {cap}")]
    Missing {
        /// The vCPU.
        vcpu: u8,
        /// The state.
        what: &'static str,
        /// The capability.
        cap: &'static str,
    },
    /// A FAM wrapper could not hold the entries.
    #[error("vCPU {vcpu}: too many {what} entries")]
    Fam {
        /// The vCPU.
        vcpu: u8,
        /// CPUID or MSRs.
        what: &'static str,
    },
}

fn vcpu_prefix(vcpu: Option<u8>) -> String {
    vcpu.map(|id| format!("vCPU {id}: ")).unwrap_or_default()
}

fn vcpu_err(id: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl {
        vcpu: Some(id),
        what,
        source,
    }
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Ioctl {
        vcpu: None,
        what,
        source,
    }
}

/// `kvm_fpu` field by field (kvm-bindings has no serde for it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Which optional vCPU state this KVM has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuCaps {
    /// KVM_GET/SET_XSAVE.
    pub xsave: bool,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// KVM_GET_TSC_KHZ.
    pub tsc_khz: bool,
    /// KVM_SET_TSC_KHZ.
    pub tsc_control: bool,
}

impl VcpuCaps {
    /// What `kvm` offers.
    pub fn probe(kvm: &Kvm) -> Self {
        Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            tsc_khz: kvm.check_extension(Cap::GetTscKhz),
            tsc_control: kvm.check_extension(Cap::TscControl),
        }
    }
}

/// What the snapshot path needs from KVM beyond the vCPU fds, read once when the VM is built
/// (the running VMM's seccomp filters allow no `/dev/kvm` ioctls).
#[derive(Clone, Debug)]
pub struct KvmFacts {
    /// The optional state KVM has.
    pub caps: VcpuCaps,
    /// MSR indices to save (`KVM_GET_MSR_INDEX_LIST`), TSC first, TSC deadline last.
    pub msrs: Vec<u32>,
}

impl KvmFacts {
    /// Reads them from `kvm`.
    pub fn read(kvm: &Kvm) -> Result<Self, StateError> {
        let list = kvm
            .get_msr_index_list()
            .map_err(vm_err("KVM_GET_MSR_INDEX_LIST"))?;
        Ok(Self {
            caps: VcpuCaps::probe(kvm),
            msrs: order_msrs(list.as_slice()),
        })
    }
}

/// `list` with IA32_TSC first and IA32_TSC_DEADLINE last, otherwise in KVM's order.
fn order_msrs(list: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = list
        .iter()
        .copied()
        .filter(|m| *m != MSR_IA32_TSC && *m != MSR_IA32_TSC_DEADLINE)
        .collect();
    if list.contains(&MSR_IA32_TSC) {
        out.insert(0, MSR_IA32_TSC);
    }
    if list.contains(&MSR_IA32_TSC_DEADLINE) {
        out.push(MSR_IA32_TSC_DEADLINE);
    }
    out
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// MSRs, in restore order.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (superseded by `xsave` when present).
    pub fpu: FpuState,
    /// XSAVE area, when KVM has KVM_CAP_XSAVE.
    pub xsave: Option<kvm_xsave>,
    /// Extended control registers, when KVM has KVM_CAP_XCRS.
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs and SMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// DR0–DR3, DR6, DR7.
    pub debug_regs: kvm_debugregs,
    /// TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Reads vCPU `id`'s state. Call it on the vCPU's own thread with the vCPU out of
/// `KVM_RUN` and its last exit completed.
pub fn save_vcpu(fd: &VcpuFd, id: u8, facts: &KvmFacts) -> Result<VcpuState, StateError> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err(id, "KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let msrs = save_msrs(fd, id, &facts.msrs)?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(vcpu_err(id, "KVM_GET_FPU"))?);
    let xsave = match facts.caps.xsave {
        true => Some(fd.get_xsave().map_err(vcpu_err(id, "KVM_GET_XSAVE"))?),
        false => None,
    };
    let xcrs = match facts.caps.xcrs {
        true => Some(fd.get_xcrs().map_err(vcpu_err(id, "KVM_GET_XCRS"))?),
        false => None,
    };
    let tsc_khz = match facts.caps.tsc_khz {
        true => Some(fd.get_tsc_khz().map_err(vcpu_err(id, "KVM_GET_TSC_KHZ"))?),
        false => None,
    };
    Ok(VcpuState {
        id,
        cpuid,
        msrs,
        regs: fd.get_regs().map_err(vcpu_err(id, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(vcpu_err(id, "KVM_GET_SREGS"))?,
        fpu,
        xsave,
        xcrs,
        lapic: fd.get_lapic().map_err(vcpu_err(id, "KVM_GET_LAPIC"))?,
        events: fd
            .get_vcpu_events()
            .map_err(vcpu_err(id, "KVM_GET_VCPU_EVENTS"))?,
        mp_state: fd
            .get_mp_state()
            .map_err(vcpu_err(id, "KVM_GET_MP_STATE"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(vcpu_err(id, "KVM_GET_DEBUGREGS"))?,
        tsc_khz,
    })
}

/// Reads every MSR of `list` KVM can read for this vCPU, chunk by chunk; an MSR KVM
/// refuses ends a chunk early and is skipped.
fn save_msrs(fd: &VcpuFd, id: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(list.len());
    let mut skipped = Vec::new();
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::Fam {
            vcpu: id,
            what: "MSR",
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(id, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            skipped.push(chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    if !skipped.is_empty() {
        tracing::debug!("vCPU {id}: MSRs KVM lists but cannot read, not saved: {skipped:x?}");
    }
    Ok(out)
}

/// Writes `state` into a new, not yet run vCPU (Firecracker's order: CPUID, then the
/// registers, the LAPIC, the MSRs and last the pending events).
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState, caps: VcpuCaps) -> Result<(), StateError> {
    let id = state.id;
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError::Fam {
        vcpu: id,
        what: "CPUID",
    })?;
    fd.set_cpuid2(&cpuid)
        .map_err(vcpu_err(id, "KVM_SET_CPUID2"))?;
    if let Some(khz) = state.tsc_khz {
        let here = match caps.tsc_khz {
            true => Some(fd.get_tsc_khz().map_err(vcpu_err(id, "KVM_GET_TSC_KHZ"))?),
            false => None,
        };
        if here != Some(khz) {
            if !caps.tsc_control {
                return Err(StateError::Missing {
                    vcpu: id,
                    what: "another TSC frequency's",
                    cap: "KVM_CAP_TSC_CONTROL",
                });
            }
            fd.set_tsc_khz(khz)
                .map_err(vcpu_err(id, "KVM_SET_TSC_KHZ"))?;
        }
    }
    fd.set_mp_state(state.mp_state)
        .map_err(vcpu_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs)
        .map_err(vcpu_err(id, "KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs)
        .map_err(vcpu_err(id, "KVM_SET_SREGS"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(vcpu_err(id, "KVM_SET_FPU"))?;
    if let Some(xsave) = &state.xsave {
        if !caps.xsave {
            return Err(StateError::Missing {
                vcpu: id,
                what: "XSAVE",
                cap: "KVM_CAP_XSAVE",
            });
        }
        // SAFETY: a kvm_xsave as KVM_GET_XSAVE returned it; the legacy-size ioctl reads
        // exactly one kvm_xsave (no dynamically sized AMX state follows it).
        unsafe { fd.set_xsave(xsave) }.map_err(vcpu_err(id, "KVM_SET_XSAVE"))?;
    }
    if let Some(xcrs) = &state.xcrs {
        if !caps.xcrs {
            return Err(StateError::Missing {
                vcpu: id,
                what: "XCR",
                cap: "KVM_CAP_XCRS",
            });
        }
        fd.set_xcrs(xcrs).map_err(vcpu_err(id, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(vcpu_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(vcpu_err(id, "KVM_SET_LAPIC"))?;
    let mut set = 0;
    for chunk in state.msrs.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::Fam {
            vcpu: id,
            what: "MSR",
        })?;
        let n = fd.set_msrs(&msrs).map_err(vcpu_err(id, "KVM_SET_MSRS"))?;
        if n < chunk.len() {
            return Err(StateError::Msrs {
                vcpu: id,
                msr: chunk[n].index,
                set: set + n,
                wanted: state.msrs.len(),
            });
        }
        set += n;
    }
    fd.set_vcpu_events(&state.events)
        .map_err(vcpu_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT channels.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(vm_err(what))?;
    Ok(chip)
}

/// Reads the irqchip, PIT and clock of a paused VM.
pub fn save_vm(fd: &VmFd) -> Result<VmKvmState, StateError> {
    Ok(VmKvmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: fd.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

/// Writes `state` into a new VM that has its irqchip and PIT.
pub fn restore_vm(fd: &VmFd, state: &VmKvmState) -> Result<(), StateError> {
    fd.set_pit2(&state.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    // Flags describe how KVM read the clock (TSC-stable, realtime); none are inputs here
    // but KVM_CLOCK_REALTIME, which would move the clock by the time spent in the file.
    let clock = kvm_clock_data {
        flags: 0,
        ..state.clock
    };
    fd.set_clock(&clock).map_err(vm_err("KVM_SET_CLOCK"))?;
    fd.set_irqchip(&state.pic_master)
        .map_err(vm_err("KVM_SET_IRQCHIP (PIC master)"))?;
    fd.set_irqchip(&state.pic_slave)
        .map_err(vm_err("KVM_SET_IRQCHIP (PIC slave)"))?;
    fd.set_irqchip(&state.ioapic)
        .map_err(vm_err("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_comes_first_and_its_deadline_last() {
        let ordered = order_msrs(&[0x6e0, 0x174, 0x10, 0xc000_0080]);

        assert_eq!(ordered, vec![0x10, 0x174, 0xc000_0080, 0x6e0]);
    }

    #[test]
    fn fpu_state_round_trips_through_json() {
        let mut fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        fpu.xmm[3][7] = 0xab;

        let json = serde_json::to_vec(&FpuState::from(&fpu)).unwrap();
        let back: FpuState = serde_json::from_slice(&json).unwrap();

        let restored = kvm_fpu::from(&back);
        assert_eq!(
            (restored.fcw, restored.mxcsr, restored.xmm[3][7]),
            (0x37f, 0x1f80, 0xab)
        );
    }
}
