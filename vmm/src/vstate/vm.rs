//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC + IOAPIC + LAPICs) and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_reinject_control, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY,
};
use std::os::fd::{AsRawFd, BorrowedFd};

use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;
use crate::devices::virtio::GuestMemoryMmap;
use crate::sandbox::seccomp::ThreadRole;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// KVM lacks something the VMM needs.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// A thread doing part of the VM set-up could not start or panicked.
    #[error("a VM set-up thread failed to start or panicked")]
    SetupThread,
    /// The PIT set-up thread could not confine itself.
    #[error("cannot confine the PIT set-up thread")]
    Confine(#[source] crate::sandbox::runtime::SandboxError),
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

/// The PIT set-up thread started by [`Vm::start_pit_setup`].
pub struct PitSetup {
    ready: std::sync::mpsc::Receiver<Result<(), VmError>>,
}

impl PitSetup {
    /// Waits until the set-up thread is confined (the vCPUs must not run before).
    pub fn wait(self) -> Result<(), VmError> {
        self.ready.recv().unwrap_or(Err(VmError::SetupThread))
    }
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
    /// its TSS and in-kernel irqchip. The PIT comes separately ([`Vm::start_pit_setup`]).
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

    /// Creates the in-kernel PIT (speaker port dummy), then starts a helper thread that turns
    /// off its catch-up of missed ticks ("lost tick policy: discard"); the returned
    /// [`PitSetup`] says when that thread is confined.
    ///
    /// Linux keeps time with the TSC and the LAPIC timer and only reads the PIT while
    /// calibrating, so catch-up ticks buy nothing. But turning catch-up off unregisters the
    /// PIT's interrupt-acknowledge notifiers, two SRCU grace periods (10–20 ms under nested
    /// KVM), and left on, KVM does that while destroying the VM, which made every VMM's
    /// exit that much slower. The thread confines itself with the main thread's seccomp
    /// filter before it reports, so no unconfined thread is left when the vCPUs start, and
    /// then waits out the grace periods alongside the VM's set-up and boot. Call it before
    /// registering memory: the PIT's port registration waits for the lock a slot
    /// registration holds through its own grace period.
    pub fn start_pit_setup(&self) -> Result<PitSetup, VmError> {
        // SAFETY: the VM fd stays open for `self`'s life, longer than this borrow, which only
        // lives to duplicate it; the duplicate keeps the VM alive for the thread.
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) };
        let fd = borrowed.try_clone_to_owned().map_err(|e| VmError::Kvm {
            what: "duplicate the VM fd",
            source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)),
        })?;
        // Here rather than on the thread: before the memory slot's registration starts, which
        // holds the lock the PIT's port registration needs for a grace period.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(kvm_err("create PIT"))?;
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("pit-setup".into())
            .spawn(move || {
                let confined = crate::sandbox::runtime::confine_helper(ThreadRole::Main)
                    .map_err(VmError::Confine);
                let ok = confined.is_ok();
                let _ = ready_tx.send(confined);
                if ok {
                    if let Err(e) = disable_pit_reinjection(&fd) {
                        // KVM's default (catch-up on) is correct, only slower to tear down.
                        tracing::warn!("{}", crate::vmm::error_chain(&e));
                    }
                }
            })
            .map_err(|_| VmError::SetupThread)?;
        Ok(PitSetup { ready: ready_rx })
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
