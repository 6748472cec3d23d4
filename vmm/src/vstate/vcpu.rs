//! vCPUs: per-vCPU set-up (CPUID, MSRs, registers, FPU, LAPIC), one thread per vCPU
//! running the exit-handling loop, and pause/resume/stop through a control block plus a
//! signal that kicks the thread out of `KVM_RUN`.
//!
//! Kicking: the controller records the request, then sends [`kick_signal`] to the vCPU
//! thread. The signal handler sets `kvm_run.immediate_exit` through a thread-local pointer,
//! so a kick that lands between the thread's last check and its next `KVM_RUN` still makes
//! that `KVM_RUN` return `EINTR` at once instead of being lost.

use std::cell::Cell;
use std::collections::BTreeSet;
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_run, CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::lifecycle::{ExitCounters, ExitSignal, ExitStatus, VmExit};
use super::snapshot::{restore_vcpu, save_vcpu, KvmFacts, StateError, VcpuCaps, VcpuState};
use super::vm::Vm;
use crate::arch::x86_64::cpuid::{build_cpuid, CpuTemplate};
use crate::arch::x86_64::{emulation, lapic, msr, regs};
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMemoryMmap;

/// Errors setting up or controlling vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: KVM {what} failed")]
    Kvm {
        /// vCPU index.
        id: u8,
        /// Which call.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("vCPU {id}: KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        id: u8,
        /// MSRs accepted.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// Building a FAM wrapper failed (too many entries).
    #[error("vCPU {id}: too many {what} entries")]
    Fam {
        /// vCPU index.
        id: u8,
        /// CPUID or MSRs.
        what: &'static str,
    },
    /// The vCPU thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU thread did not confine itself in time (a thread that cannot, exits the VMM).
    #[error("vCPU threads did not install their seccomp filters within {0:?}")]
    Confine(Duration),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    /// vCPUs did not acknowledge a pause in time.
    #[error("vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
    /// Saving state needs every vCPU parked by a pause.
    #[error("the vCPUs are not paused")]
    NotPaused,
    /// vCPUs did not hand over their state in time.
    #[error("vCPUs did not save their state within {0:?}")]
    SaveTimeout(Duration),
    /// Reading or writing a vCPU's KVM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// The VM ended while its vCPUs' state was being saved.
    #[error("vCPU {0} ended before saving its state")]
    Ended(u8),
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run` mapping, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a const-initialised thread-local read and a
    // volatile store.
    let ptr = KVM_RUN_PTR.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer was set by this thread to its vCPU's kvm_run mapping, which
        // stays mapped until the thread clears the pointer before dropping the vCPU.
        unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    let result = INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick));
    (*result).map_err(VcpuError::Signal)
}

/// What the controller wants the vCPU threads to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// How long starting the vCPUs may wait for their threads to confine themselves.
const CONFINE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct ControlState {
    request: Request,
    /// vCPU threads currently parked (paused or finished).
    parked: usize,
    /// vCPU threads whose loop has ended.
    exited: usize,
    /// vCPU threads that installed their seccomp filter.
    confined: usize,
    /// Bumped by [`Vcpus::save_state`]: each parked thread that has not served this round
    /// saves its state into `saved`.
    save_round: u64,
    /// What the MSR list and capabilities of this round's save are.
    save_facts: Option<Arc<KvmFacts>>,
    /// The states of this round, in the order the threads delivered them.
    saved: Vec<Result<VcpuState, VcpuError>>,
}

/// Shared between the controller and all vCPU threads.
#[derive(Debug)]
struct Control {
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Control {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn request(&self) -> Request {
        self.lock().request
    }

    /// Waits on `st` until `done` holds of the state (true) or `deadline` passes (false).
    fn wait_until<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, ControlState>,
        deadline: Instant,
        done: impl Fn(&ControlState) -> bool,
    ) -> (std::sync::MutexGuard<'a, ControlState>, bool) {
        while !done(&st) {
            let now = Instant::now();
            if now >= deadline {
                return (st, false);
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        (st, true)
    }

    /// Parks the calling vCPU thread while the request is `Pause` (or, when `finished`,
    /// until it is `Stop`). Returns the request that released it.
    fn park(&self, finished: bool) -> Request {
        let mut st = self.lock();
        st.parked += 1;
        self.changed.notify_all();
        while st.request == Request::Pause || (finished && st.request != Request::Stop) {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        st.request
    }
}

/// Everything a vCPU thread shares with the rest of the VMM.
#[derive(Clone)]
pub struct VcpuShared {
    /// Port-I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus.
    pub mmio_bus: Arc<Bus>,
    /// Guest memory (for reading instruction bytes after an emulation failure).
    pub memory: GuestMemoryMmap,
    /// Exit counters of the VM.
    pub counters: Arc<ExitCounters>,
    /// Where the VM's end is reported.
    pub exit: Arc<ExitSignal>,
    /// When the VMM process started (for the first-entry log line).
    pub vmm_start: Instant,
}

/// One configured, not yet running vCPU.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` of `vm`.
    pub fn new(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                what: "create vCPU",
                source,
            })?;
        Ok(Self { id, fd })
    }

    /// Sets CPUID, MSRs, FPU and LAPIC; for the boot vCPU (`entry` given) also the long-mode
    /// registers that enter the kernel at `entry`.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        template: CpuTemplate,
        entry: Option<u64>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm = |what: &'static str| move |source| VcpuError::Kvm { id, what, source };
        let entries = build_cpuid(supported_cpuid.as_slice(), id, vcpu_count, template);
        let cpuid =
            CpuId::from_entries(&entries).map_err(|_| VcpuError::Fam { id, what: "CPUID" })?;
        self.fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;

        let msr_entries = msr::boot_msrs();
        let msrs =
            Msrs::from_entries(&msr_entries).map_err(|_| VcpuError::Fam { id, what: "MSR" })?;
        let set = self.fd.set_msrs(&msrs).map_err(kvm("set MSRs"))?;
        if set != msr_entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: msr_entries.len(),
            });
        }
        self.fd.set_fpu(&regs::boot_fpu()).map_err(kvm("set FPU"))?;
        let lapic_state = self.fd.get_lapic().map_err(kvm("get LAPIC"))?;
        self.fd
            .set_lapic(&lapic::configure_lint(lapic_state))
            .map_err(kvm("set LAPIC"))?;
        if let Some(entry) = entry {
            let sregs = self.fd.get_sregs().map_err(kvm("get sregs"))?;
            self.fd
                .set_sregs(&regs::long_mode_sregs(sregs))
                .map_err(kvm("set sregs"))?;
            self.fd
                .set_regs(&regs::boot_regs(entry))
                .map_err(kvm("set regs"))?;
        }
        Ok(())
    }
}

impl Vcpu {
    /// Writes a snapshot's state into this new vCPU (instead of [`Vcpu::configure`]).
    pub fn restore(&self, state: &VcpuState, caps: VcpuCaps) -> Result<(), VcpuError> {
        Ok(restore_vcpu(&self.fd, state, caps)?)
    }

    /// This vCPU's index.
    pub fn id(&self) -> u8 {
        self.id
    }
}

/// A running vCPU thread.
struct VcpuThread {
    id: u8,
    handle: JoinHandle<()>,
}

/// The running vCPU threads of a VM and their control block.
pub struct Vcpus {
    threads: Vec<VcpuThread>,
    control: Arc<Control>,
}

impl Vcpus {
    /// Spawns one thread per vCPU, each running its exit loop.
    pub fn start(vcpus: Vec<Vcpu>, shared: VcpuShared) -> Result<Self, VcpuError> {
        Self::spawn(vcpus, shared, Request::Run)
    }

    /// Spawns the vCPU threads paused: none enters `KVM_RUN` before [`Vcpus::resume`].
    pub fn start_paused(vcpus: Vec<Vcpu>, shared: VcpuShared) -> Result<Self, VcpuError> {
        Self::spawn(vcpus, shared, Request::Pause)
    }

    fn spawn(vcpus: Vec<Vcpu>, shared: VcpuShared, initial: Request) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let control = Arc::new(Control {
            state: Mutex::new(ControlState {
                request: initial,
                parked: 0,
                exited: 0,
                confined: 0,
                save_round: 0,
                save_facts: None,
                saved: Vec::new(),
            }),
            changed: Condvar::new(),
        });
        let mut running = Self {
            threads: Vec::new(),
            control: control.clone(),
        };
        for vcpu in vcpus {
            let id = vcpu.id;
            let runner = VcpuRunner {
                id,
                fd: vcpu.fd,
                shared: shared.clone(),
                control: control.clone(),
                completed: BTreeSet::new(),
                save_round: 0,
                interrupted: false,
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || runner.run())
                .map_err(|source| VcpuError::Spawn { id, source });
            match handle {
                Ok(handle) => running.threads.push(VcpuThread { id, handle }),
                Err(e) => {
                    running.stop(Duration::from_secs(1));
                    return Err(e);
                }
            }
        }
        // Once this returns the VM counts as running: every thread of it must be confined
        // by then (the vCPUs confine themselves before their first KVM_RUN).
        let all = running.threads.len();
        let deadline = Instant::now() + CONFINE_TIMEOUT;
        let mut st = control.lock();
        while st.confined < all {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(st);
                running.stop(Duration::from_secs(1));
                return Err(VcpuError::Confine(CONFINE_TIMEOUT));
            }
            st = control
                .changed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(st);
        Ok(running)
    }

    fn set_request(&self, request: Request) {
        let mut st = self.control.lock();
        if st.request != Request::Stop {
            st.request = request;
        }
        self.control.changed.notify_all();
    }

    fn kick_all(&self) {
        for t in &self.threads {
            if t.handle.is_finished() {
                continue;
            }
            // SAFETY: the pthread handle belongs to a thread we spawned and have not joined
            // (we own its JoinHandle), so it is valid; the signal has a handler installed.
            let rc = unsafe { libc::pthread_kill(t.handle.as_pthread_t(), kick_signal()) };
            if rc != 0 {
                tracing::warn!("cannot kick vCPU {}: error {rc}", t.id);
            }
        }
    }

    /// Takes every vCPU out of `KVM_RUN` and waits until all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), VcpuError> {
        self.set_request(Request::Pause);
        self.kick_all();
        let all = self.threads.len();
        let st = self.control.lock();
        let (_st, parked) = self
            .control
            .wait_until(st, Instant::now() + timeout, |st| st.parked >= all);
        if !parked {
            return Err(VcpuError::PauseTimeout(timeout));
        }
        Ok(())
    }

    /// Reads every vCPU's state; the vCPUs must be paused ([`Vcpus::pause`]). Each vCPU
    /// thread first completes the instruction of its last exit (as the next `KVM_RUN`
    /// would), then reads its own state, so nothing of an exit in flight is lost.
    pub fn save_state(
        &self,
        facts: Arc<KvmFacts>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuError> {
        let all = self.threads.len();
        let mut st = self.control.lock();
        if st.request != Request::Pause || st.parked < all {
            return Err(VcpuError::NotPaused);
        }
        st.saved.clear();
        st.save_facts = Some(facts);
        st.save_round += 1;
        self.control.changed.notify_all();
        let (mut st, saved) = self
            .control
            .wait_until(st, Instant::now() + timeout, |st| st.saved.len() >= all);
        if !saved {
            return Err(VcpuError::SaveTimeout(timeout));
        }
        st.save_facts = None;
        let mut states = std::mem::take(&mut st.saved)
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.set_request(Request::Run);
    }

    /// Stops every vCPU thread and joins them if all end within `timeout`. Threads stuck
    /// in the kernel past the timeout are left behind (the process is about to exit).
    pub fn stop(&mut self, timeout: Duration) {
        {
            let mut st = self.control.lock();
            st.request = Request::Stop;
            self.control.changed.notify_all();
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.control.lock();
        while st.exited < self.threads.len() {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!("vCPU threads did not stop within {timeout:?}");
                return;
            }
            // Kick again on every round: a thread may have been between its request
            // check and KVM_RUN when the previous kick landed on a parked thread.
            drop(st);
            self.kick_all();
            st = self.control.lock();
            if st.exited < self.threads.len() {
                let wait = (deadline - now).min(Duration::from_millis(1));
                st = self
                    .control
                    .changed
                    .wait_timeout(st, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|e| e.into_inner().0);
            }
        }
        drop(st);
        for t in self.threads.drain(..) {
            if t.handle.join().is_err() {
                tracing::error!("vCPU {} thread panicked", t.id);
            }
        }
    }

    /// Number of vCPU threads.
    pub fn len(&self) -> usize {
        self.threads.len()
    }

    /// Whether there are no vCPU threads.
    pub fn is_empty(&self) -> bool {
        self.threads.is_empty()
    }
}

/// What one exit asks the loop to do.
enum Next {
    Continue,
    Exit(VmExit),
}

struct VcpuRunner {
    id: u8,
    fd: VcpuFd,
    shared: VcpuShared,
    control: Arc<Control>,
    /// Instructions this vCPU has completed for KVM (each is logged the first time).
    completed: BTreeSet<&'static str>,
    /// The last save round this thread served.
    save_round: u64,
    /// The last `KVM_RUN` returned EINTR.
    interrupted: bool,
}

impl VcpuRunner {
    fn run(mut self) {
        crate::sandbox::runtime::enter_or_exit(crate::sandbox::seccomp::ThreadRole::Vcpu);
        {
            let mut st = self.control.lock();
            st.confined += 1;
            self.control.changed.notify_all();
        }
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let mut entered = false;
        loop {
            match self.control.request() {
                Request::Run => {}
                Request::Pause => {
                    if self.park_serving_saves() == Request::Stop {
                        break;
                    }
                    continue;
                }
                Request::Stop => break,
            }
            if !entered && self.id == 0 {
                entered = true;
                log_first_entry(self.shared.vmm_start);
            }
            match self.run_once() {
                Next::Continue => {}
                Next::Exit(exit) => {
                    self.shared.exit.report(exit);
                    self.control.park(true);
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        let mut st = self.control.lock();
        st.exited += 1;
        self.control.changed.notify_all();
    }

    /// Parks while paused like [`Control::park`], and saves this vCPU's state for every
    /// save round started meanwhile.
    fn park_serving_saves(&mut self) -> Request {
        let control = self.control.clone();
        let mut st = control.lock();
        st.parked += 1;
        control.changed.notify_all();
        while st.request == Request::Pause {
            if st.save_round != self.save_round {
                self.save_round = st.save_round;
                let facts = st.save_facts.clone();
                drop(st);
                let result = match facts {
                    Some(facts) => self.save(&facts),
                    None => Err(VcpuError::NotPaused),
                };
                st = control.lock();
                st.saved.push(result);
                control.changed.notify_all();
                continue;
            }
            st = control.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
        st.request
    }

    /// Completes the last exit's instruction, then reads the vCPU's state.
    fn save(&mut self, facts: &KvmFacts) -> Result<VcpuState, VcpuError> {
        // KVM finishes an I/O or MMIO instruction (the value read lands in its register,
        // RIP moves past it) only on the next KVM_RUN; with immediate_exit set, that
        // KVM_RUN does just this and returns EINTR. A string instruction may exit again
        // first: that exit is served like any other.
        for _ in 0..64 {
            self.fd.set_kvm_immediate_exit(1);
            self.interrupted = false;
            if let Next::Exit(exit) = self.run_once() {
                let id = self.id;
                self.shared.exit.report(exit);
                return Err(VcpuError::Ended(id));
            }
            if self.interrupted {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
        Ok(save_vcpu(&self.fd, self.id, facts)?)
    }

    fn run_once(&mut self) -> Next {
        let id = self.id;
        let counters = &*self.shared.counters;
        let result = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    ExitCounters::bump(&counters.io_in);
                    if !self.shared.io_bus.read(u64::from(port), data) {
                        ExitCounters::bump(&counters.io_unclaimed);
                        data.fill(0xff);
                    }
                    Ok(None)
                }
                VcpuExit::IoOut(port, data) => {
                    ExitCounters::bump(&counters.io_out);
                    if !self.shared.io_bus.write(u64::from(port), data) {
                        ExitCounters::bump(&counters.io_unclaimed);
                    }
                    Ok(None)
                }
                VcpuExit::MmioRead(addr, data) => {
                    ExitCounters::bump(&counters.mmio_read);
                    if !self.shared.mmio_bus.read(addr, data) {
                        ExitCounters::bump(&counters.mmio_unclaimed);
                        data.fill(0xff);
                    }
                    Ok(None)
                }
                VcpuExit::MmioWrite(addr, data) => {
                    ExitCounters::bump(&counters.mmio_write);
                    if !self.shared.mmio_bus.write(addr, data) {
                        ExitCounters::bump(&counters.mmio_unclaimed);
                    }
                    Ok(None)
                }
                VcpuExit::Hlt => {
                    // Only seen without an in-kernel LAPIC: the CPU stopped for good.
                    ExitCounters::bump(&counters.hlt);
                    Ok(Some(VmExit::new(
                        ExitStatus::Ok,
                        format!("vCPU {id} halted"),
                    )))
                }
                VcpuExit::Shutdown => {
                    ExitCounters::bump(&counters.shutdown);
                    Ok(Some(VmExit::new(
                        ExitStatus::TripleFault,
                        format!("vCPU {id} triple fault"),
                    )))
                }
                VcpuExit::SystemEvent(kind, _) => {
                    ExitCounters::bump(&counters.system_event);
                    Ok(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => {
                            Some(VmExit::new(ExitStatus::Ok, "guest powered off"))
                        }
                        KVM_SYSTEM_EVENT_RESET => {
                            Some(VmExit::new(ExitStatus::Reboot, "guest reset"))
                        }
                        KVM_SYSTEM_EVENT_CRASH => {
                            Some(VmExit::new(ExitStatus::GuestPanic, "guest crash event"))
                        }
                        _ => None,
                    })
                }
                VcpuExit::InternalError => {
                    ExitCounters::bump(&counters.internal_error);
                    Err(InternalError)
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    ExitCounters::bump(&counters.fail_entry);
                    Ok(Some(VmExit::new(
                        ExitStatus::InternalError,
                        format!("vCPU {id}: VM entry failed on host CPU {cpu}, reason {reason:#x}"),
                    )))
                }
                VcpuExit::Intr | VcpuExit::IrqWindowOpen => {
                    ExitCounters::bump(&counters.interrupted);
                    Ok(None)
                }
                other => {
                    ExitCounters::bump(&counters.other);
                    Ok(Some(VmExit::new(
                        ExitStatus::InternalError,
                        format!("vCPU {id}: unexpected KVM exit {other:?}"),
                    )))
                }
            },
            Err(e) if e.errno() == libc::EINTR => {
                ExitCounters::bump(&counters.interrupted);
                self.fd.set_kvm_immediate_exit(0);
                self.interrupted = true;
                Ok(None)
            }
            Err(e) if e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => Ok(Some(VmExit::new(
                ExitStatus::InternalError,
                format!("vCPU {id}: KVM_RUN failed: {e}"),
            ))),
        };
        match result {
            Ok(None) => Next::Continue,
            Ok(Some(exit)) => Next::Exit(exit),
            Err(InternalError) => match self.handle_internal_error() {
                None => Next::Continue,
                Some(exit) => Next::Exit(exit),
            },
        }
    }

    /// Completes an instruction KVM could not emulate when the VMM can do what the CPU
    /// would have done (see [`emulation`]); anything else ends the VM with a message naming
    /// RIP, the instruction bytes and a guess at the instruction.
    fn handle_internal_error(&mut self) -> Option<VmExit> {
        let id = self.id;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, for which KVM fills the
        // `internal` member of the exit union (and `emulation_failure`, which shares its
        // first fields, when the suberror is an emulation failure). Both are plain data.
        let (suberror, internal, failure) = unsafe {
            (
                run.__bindgen_anon_1.internal.suberror,
                run.__bindgen_anon_1.internal,
                run.__bindgen_anon_1.emulation_failure,
            )
        };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            let n = (internal.ndata as usize).min(internal.data.len());
            return Some(VmExit::new(
                ExitStatus::InternalError,
                format!(
                    "vCPU {id}: KVM internal error, suberror {suberror}, data {:x?}",
                    &internal.data[..n]
                ),
            ));
        }
        let regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Some(VmExit::new(
                    ExitStatus::InternalError,
                    format!("vCPU {id}: cannot read registers after emulation failure: {e}"),
                ))
            }
        };
        let bytes = if u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            & failure.flags
            != 0
        {
            // SAFETY: the flag says KVM filled the instruction-bytes member of the union.
            let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
            insn.insn_bytes[..usize::from(insn.insn_size).min(insn.insn_bytes.len())].to_vec()
        } else {
            self.guest_bytes_at(regs.rip)
        };
        let decision = self
            .emulation_state(&regs)
            .map_err(|e| format!("cannot read vCPU state: {e}"))
            .and_then(|cpu| emulation::complete(&bytes, cpu).map_err(|r| r.to_string()));
        let why = match decision {
            Ok(completion) => match self.apply(completion, regs) {
                Ok(()) => {
                    ExitCounters::bump(&self.shared.counters.emulation_completed);
                    if self.completed.insert(completion.mnemonic()) {
                        tracing::info!(
                            "vCPU {id}: completing {} that KVM cannot emulate (first at RIP \
                             {:#x}; further ones are counted as emulation_completed)",
                            completion.mnemonic(),
                            regs.rip
                        );
                    }
                    return None;
                }
                Err(e) => format!("completing {} failed: {e}", completion.mnemonic()),
            },
            Err(why) => why,
        };
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let guess = emulation::mnemonic(&bytes).unwrap_or("an instruction not in the VMM's table");
        let reason = format!(
            "vCPU {id}: KVM cannot emulate the instruction at RIP {:#x} (bytes: {}; looks like \
             {guess}; {why})",
            regs.rip,
            if hex.is_empty() {
                "unavailable".to_owned()
            } else {
                hex.join(" ")
            }
        );
        // genos-vmm logs the exit's reason when the VM ends.
        Some(VmExit::new(ExitStatus::EmulationFailure, reason))
    }

    /// The vCPU state the emulation completions depend on.
    fn emulation_state(
        &self,
        regs: &kvm_bindings::kvm_regs,
    ) -> Result<emulation::CpuState, kvm_ioctls::Error> {
        let sregs = self.fd.get_sregs()?;
        let fpu = self.fd.get_fpu()?;
        Ok(emulation::CpuState {
            cr0: sregs.cr0,
            rflags: regs.rflags,
            fsw: fpu.fsw,
            fcw: fpu.fcw,
        })
    }

    /// Does what the CPU would have done: moves RIP past the instruction when it completed
    /// or trapped, and delivers the exception if there is one. Either way the instruction
    /// ends any interrupt shadow it was in, as on hardware.
    fn apply(
        &self,
        completion: emulation::Completion,
        mut regs: kvm_bindings::kvm_regs,
    ) -> Result<(), kvm_ioctls::Error> {
        let (advance, exception) = match completion {
            emulation::Completion::Skip { len, .. } => (len, None),
            emulation::Completion::Exception {
                vector,
                rip_advance,
                ..
            } => (rip_advance, Some(vector)),
        };
        if advance != 0 {
            regs.rip = regs.rip.wrapping_add(u64::from(advance));
            self.fd.set_regs(&regs)?;
        }
        let mut events = self.fd.get_vcpu_events()?;
        events.interrupt.shadow = 0;
        if let Some(vector) = exception {
            events.exception.injected = 1;
            events.exception.nr = vector;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
        }
        self.fd.set_vcpu_events(&events)
    }

    /// Up to 15 instruction bytes at guest virtual address `rip`, as far as they can be read.
    fn guest_bytes_at(&self, rip: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for i in 0..15u64 {
            let Ok(tr) = self.fd.translate_gva(rip.wrapping_add(i)) else {
                break;
            };
            if tr.valid == 0 {
                break;
            }
            match self
                .shared
                .memory
                .read_obj::<u8>(GuestAddress(tr.physical_address))
            {
                Ok(b) => out.push(b),
                Err(_) => break,
            }
        }
        out
    }
}

/// Marker for an internal-error exit, handled once the exit's borrow of the vCPU ends.
struct InternalError;

fn log_first_entry(vmm_start: Instant) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always available.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let mono_ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    tracing::info!(
        "first vCPU entry: {} us after VMM start (monotonic {} ns)",
        vmm_start.elapsed().as_micros(),
        mono_ns
    );
}
