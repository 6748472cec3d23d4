//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_reinject_control, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use std::os::fd::AsRawFd;

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::devices::virtio::GuestMemoryMmap;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something the VMM needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A thread doing part of the VM set-up panicked.
    #[error("a VM set-up thread panicked")]
    SetupThread,
    /// A KVM ioctl on the VM failed.
    #[error("KVM {what} failed")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// KVM_REINJECT_CONTROL with `pit_reinject = 0` on the VM `vm_fd`.
fn disable_pit_reinjection(vm_fd: &impl AsRawFd) -> Result<(), VmError> {
    // Linux declares it `_IO`, without a size, even though it takes an argument.
    vmm_sys_util::ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);
    let control = kvm_reinject_control::default();
    // SAFETY: KVM_REINJECT_CONTROL reads one `kvm_reinject_control` from the pointer, which
    // refers to a live value of that type; `vm_fd` is an open KVM VM fd.
    let ret =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm_fd, KVM_REINJECT_CONTROL(), &control) };
    if ret < 0 {
        return Err(VmError::Kvm {
            what: "disable PIT tick reinjection",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// An x86_64 KVM VM with its irqchip and PIT.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm`, checks the capabilities the VMM relies on and creates the VM with
    /// its TSS and in-kernel irqchip. The PIT comes separately ([`Vm::create_pit`]).
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "irqchip"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Pit2, "PIT2"),
            (Cap::UserMemory, "user memory"),
            (Cap::SetTssAddr, "TSS address"),
            (Cap::ImmediateExit, "immediate exit"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let fd = kvm.create_vm().map_err(kvm_err("create VM"))?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("set TSS address"))?;
        fd.create_irq_chip().map_err(kvm_err("create irqchip"))?;
        Ok(Self { kvm, fd })
    }

    /// Creates the in-kernel PIT (speaker port dummy). Separate from [`Vm::new`] because
    /// it is slow under nested KVM (KVM starts a worker thread): the builder overlaps it
    /// with other set-up. Must happen before the vCPUs run.
    pub fn create_pit(&self) -> Result<(), VmError> {
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm_err("create PIT"))
    }

    /// Turns off the PIT's catch-up of missed ticks ("lost tick policy: discard").
    ///
    /// Linux keeps time with the TSC and the LAPIC timer and only reads the PIT while
    /// calibrating, so catch-up ticks buy nothing. Turning catch-up off unregisters the
    /// PIT's interrupt-acknowledge notifiers, one SRCU grace period each (10–20 ms under
    /// nested KVM); left on, KVM does that while destroying the VM, which made every
    /// VMM's exit that much slower. The VMM calls this once the vCPUs run, so the wait
    /// overlaps the guest's start instead of delaying it or the exit.
    pub fn disable_pit_reinjection(&self) -> Result<(), VmError> {
        disable_pit_reinjection(&self.fd)
    }

    /// The `/dev/kvm` handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor (for irqfds, ioeventfds and vCPUs).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MissingCap("host mapping of guest memory"))?;
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes owned by `mem`,
            // which the VMM keeps alive for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("set user memory region"))?;
        }
        Ok(())
    }
}
