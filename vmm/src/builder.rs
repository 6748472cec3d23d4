//! Turns a [`VmConfig`] into a running VM: guest memory, the KVM VM, the kernel (ELF
//! `vmlinux` or bzImage) and initrd, the command line, the zero page and MP table,
//! devices, and one started thread per vCPU.
//!
//! The legacy devices (COM1, i8042, boot timer) are built here rather than by
//! [`DeviceManager::attach_legacy_devices`] because the console output goes through a
//! [`ConsoleTap`] that recognises kernel panics and poweroffs; virtio devices come from
//! the device manager and share its buses.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::SubscriberOps;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::boot::{write_boot_params, BootConfig, BootError};
use crate::arch::x86_64::cpuid::{effective_template, template_kernel_args, CpuTemplate};
use crate::arch::x86_64::layout::{
    BOOT_TIMER_SIZE, BOOT_TIMER_START, CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START,
};
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::arch::x86_64::regs::{write_boot_tables, RegsError};
use crate::config::{SerialConfig, VmConfig};
use crate::device_manager::{DeviceManager, DeviceManagerError, EventManager};
use crate::devices::legacy::{stdin_input, BootTimer, Serial, SerialOutput, I8042};
use crate::devices::virtio::gpu::{Gpu, GpuConfig, GpuError, GpuHandle};
use crate::devices::virtio::input::{InputDevices, InputError, InputHandles};
use crate::devices::virtio::net::MacAddr;
use crate::devices::DeviceMetrics;
use crate::snapshot::{DeviceStates, SnapshotState};
use crate::vstate::lifecycle::{ConsoleTap, ExitCounters, ExitSignal, ExitStatus};
use crate::vstate::memory::{create_guest_ram, restore_guest_ram, GuestRam, MemoryError};
use crate::vstate::snapshot::{restore_vm, KvmFacts, StateError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuShared, Vcpus};
use crate::vstate::vm::{Vm, VmError};

/// COM1 ports and IRQ, and the i8042 ports (LAYOUT.md).
const SERIAL_PORT: u64 = 0x3f8;
const SERIAL_PORT_LEN: u64 = 8;
const SERIAL_IRQ: u32 = 4;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;
/// Offset of the 64-bit entry point from the start of a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Creating or configuring the KVM VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A file named in the configuration could not be opened.
    #[error("cannot open {what} {path}")]
    Open {
        /// Kernel, initrd.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error(
        "cannot load kernel {path}: not a loadable ELF vmlinux ({elf}) nor bzImage ({bzimage})"
    )]
    Kernel {
        /// The kernel file.
        path: PathBuf,
        /// Why ELF loading failed.
        elf: loader::Error,
        /// Why bzImage loading failed.
        bzimage: loader::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The initrd.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot read initrd {path} into guest memory")]
    InitrdRead {
        /// The initrd.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing the zero page failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing the MP table failed.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// Writing the boot page tables failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// A device could not be set up.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// A legacy device could not be set up.
    #[error("cannot set up {device}")]
    Legacy {
        /// The device.
        device: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A vCPU could not be created, configured or started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The configuration asks for a device this VMM cannot provide.
    #[error("{0} is not available in this VMM")]
    Unsupported(&'static str),
    /// The virtio-gpu device could not be created.
    #[error("cannot create the virtio-gpu device")]
    Gpu(#[source] GpuError),
    /// The virtio-input devices could not be created.
    #[error("cannot create the virtio-input devices")]
    Input(#[source] InputError),
    /// The Landlock restriction could not be applied.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// Reading KVM facts or writing a snapshot's KVM state failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A snapshot's virtio device state does not fit the device built for it.
    #[error(transparent)]
    VirtioState(#[from] crate::devices::virtio::mmio::MmioError),
    /// The snapshot's virtio devices are not the ones its configuration builds.
    #[error("snapshot has virtio device {snapshot:?} where the configuration builds {built:?}")]
    VirtioMismatch {
        /// The snapshot's device name.
        snapshot: String,
        /// The device built in its slot.
        built: String,
    },
}

impl BuildError {
    /// The process exit status when this error ends the VMM: files and configuration the
    /// user gave are status 2, the rest 1.
    pub fn exit_status(&self) -> ExitStatus {
        match self {
            Self::Open { .. }
            | Self::Kernel { .. }
            | Self::InitrdTooLarge { .. }
            | Self::Cmdline(_)
            | Self::Unsupported(_)
            | Self::Devices(DeviceManagerError::Block(_))
            | Self::Devices(DeviceManagerError::SerialOutput(_))
            | Self::Memory(MemoryError::OpenFile { .. } | MemoryError::FileSize { .. })
            | Self::VirtioState(_)
            | Self::VirtioMismatch { .. } => ExitStatus::BadConfig,
            _ => ExitStatus::InternalError,
        }
    }
}

/// A running VM and what the VMM needs to control and observe it. Field order is drop
/// order: vCPUs and devices go before the VM, the VM before guest memory.
pub struct BuiltVm {
    /// The vCPU threads.
    pub vcpus: Vcpus,
    /// Virtio devices and their metrics.
    pub devices: DeviceManager,
    /// The virtio-gpu device's handle (resize, framebuffer descriptors), with `gpu`.
    pub display: Option<GpuHandle>,
    /// The virtio-input devices' handles, with `input`.
    pub input: Option<InputHandles>,
    /// Counters of the legacy devices, by name.
    pub legacy_metrics: Vec<(&'static str, Arc<dyn DeviceMetrics>)>,
    /// Written when the guest resets through the i8042.
    pub reset_evt: EventFd,
    /// Set when the guest signals the boot timer.
    pub boot_time: Arc<OnceLock<Duration>>,
    /// vCPU exit counters.
    pub counters: Arc<ExitCounters>,
    /// The command line the kernel got.
    pub cmdline: String,
    /// The legacy devices, for snapshots.
    pub legacy: LegacyDevices,
    /// What snapshots need from KVM (read before the sandbox closes `/dev/kvm` ioctls).
    pub kvm_facts: Arc<KvmFacts>,
    /// The KVM VM.
    pub vm: Vm,
    /// Guest RAM.
    pub ram: GuestRam,
}

struct LoadedKernel {
    entry: u64,
    end: u64,
    setup_header: Option<setup_header>,
}

fn load_kernel(ram: &GuestRam, path: &Path) -> Result<LoadedKernel, BuildError> {
    let open = || {
        File::open(path).map_err(|source| BuildError::Open {
            what: "kernel",
            path: path.to_owned(),
            source,
        })
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let elf = match Elf::load(&ram.memory, None, &mut open()?, himem) {
        Ok(r) => {
            return Ok(LoadedKernel {
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        Err(e) => e,
    };
    match BzImage::load(&ram.memory, None, &mut open()?, himem) {
        Ok(r) => Ok(LoadedKernel {
            entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            end: r.kernel_end,
            setup_header: r.setup_header,
        }),
        Err(bzimage) => Err(BuildError::Kernel {
            path: path.to_owned(),
            elf,
            bzimage,
        }),
    }
}

/// Places the initrd page-aligned at the top of low RAM. Returns (address, size).
fn load_initrd(
    ram: &GuestRam,
    path: &Path,
    mem_bytes: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BuildError> {
    let mut file = File::open(path).map_err(|source| BuildError::Open {
        what: "initrd",
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BuildError::Open {
            what: "initrd",
            path: path.to_owned(),
            source,
        })?
        .len();
    let low_end = mem_bytes.min(MMIO_GAP_START);
    let addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end.max(HIMEM_START))
        .ok_or_else(|| BuildError::InitrdTooLarge {
            path: path.to_owned(),
            size,
        })?;
    ram.memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BuildError::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

/// The full kernel command line: the configured one, the arguments of the (resolved) CPU
/// template and the virtio-mmio device announcements.
pub fn kernel_cmdline(
    config: &VmConfig,
    template: CpuTemplate,
    devices_fragment: &str,
) -> Result<Cmdline, BuildError> {
    let mut cmdline = Cmdline::try_from(&config.cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    if let Some(args) = template_kernel_args(template) {
        cmdline
            .insert_str(args)
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    }
    let fragment = devices_fragment.trim();
    if !fragment.is_empty() {
        cmdline
            .insert_str(fragment)
            .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    }
    Ok(cmdline)
}

fn stdin_is_pollable() -> bool {
    // SAFETY: `st` is plain data that fstat fills; fd 0 may be closed, which fstat reports.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(libc::STDIN_FILENO, &mut st) } != 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFIFO | libc::S_IFSOCK)
        || (st.st_mode & libc::S_IFMT == libc::S_IFCHR
        // SAFETY: isatty only inspects the descriptor.
        && unsafe { libc::isatty(libc::STDIN_FILENO) } == 1)
}

/// The legacy devices and what the VMM keeps of them.
struct Legacy {
    reset_evt: EventFd,
    boot_time: Arc<OnceLock<Duration>>,
    metrics: Vec<(&'static str, Arc<dyn DeviceMetrics>)>,
    devices: LegacyDevices,
}

/// The legacy devices as they sit on the buses.
pub struct LegacyDevices {
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    boot_timer: Arc<Mutex<BootTimer>>,
}

impl LegacyDevices {
    /// Their states, for a snapshot.
    pub fn save(&self) -> DeviceStates {
        fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
            m.lock().unwrap_or_else(|e| e.into_inner())
        }
        DeviceStates {
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            boot_timer: lock(&self.boot_timer).save(),
            virtio: Vec::new(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn attach_legacy(
    vm: &Vm,
    em: &mut EventManager,
    serial_config: &SerialConfig,
    exit: &Arc<ExitSignal>,
    vmm_start: Instant,
    pio: &mut crate::devices::bus::Bus,
    mmio: &mut crate::devices::bus::Bus,
    restored: Option<&DeviceStates>,
) -> Result<Legacy, BuildError> {
    let legacy_err = |device| move |source| BuildError::Legacy { device, source };
    let bus_err = |device: &'static str| {
        move |e: crate::devices::bus::BusError| BuildError::Legacy {
            device,
            source: std::io::Error::other(e),
        }
    };

    let output = match serial_config {
        SerialConfig::Stdout => SerialOutput::Stdout,
        SerialConfig::File(path) => SerialOutput::File(path.clone()),
        SerialConfig::None => SerialOutput::Sink,
    };
    let out: Box<dyn Write + Send> = Box::new(ConsoleTap::new(
        output.open().map_err(DeviceManagerError::from)?,
        exit.clone(),
    ));
    // Console input only from something epoll can watch (a terminal, pipe or socket);
    // /dev/null or a regular file as stdin means "no input".
    let input = match serial_config {
        SerialConfig::Stdout if stdin_is_pollable() => stdin_input().ok(),
        _ => None,
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(legacy_err("serial"))?;
    vm.fd()
        .register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(|e| legacy_err("serial")(std::io::Error::from_raw_os_error(e.errno())))?;
    let serial = match restored {
        Some(states) => Serial::restore(&states.serial, serial_irq, out, input),
        None => Serial::new(serial_irq, out, input),
    }
    .map_err(legacy_err("serial"))?;
    let serial_metrics = serial.metrics();
    let serial = Arc::new(Mutex::new(serial));
    pio.insert(serial.clone(), SERIAL_PORT, SERIAL_PORT_LEN)
        .map_err(bus_err("serial"))?;
    em.add_subscriber(serial.clone());

    let reset_evt = EventFd::new(EFD_NONBLOCK).map_err(legacy_err("i8042"))?;
    let i8042_reset = reset_evt.try_clone().map_err(legacy_err("i8042"))?;
    let i8042 = match restored {
        Some(states) => I8042::restore(&states.i8042, i8042_reset),
        None => I8042::new(i8042_reset),
    };
    let i8042_metrics = i8042.metrics();
    let i8042 = Arc::new(Mutex::new(i8042));
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
        .map_err(bus_err("i8042"))?;

    let timer = match restored {
        Some(states) => BootTimer::restore(vmm_start, &states.boot_timer),
        None => BootTimer::new(vmm_start),
    };
    let boot_time = timer.boot_time_handle();
    let boot_timer = Arc::new(Mutex::new(timer));
    mmio.insert(boot_timer.clone(), BOOT_TIMER_START, BOOT_TIMER_SIZE)
        .map_err(bus_err("boot timer"))?;

    Ok(Legacy {
        reset_evt,
        boot_time,
        metrics: vec![("serial", serial_metrics), ("i8042", i8042_metrics)],
        devices: LegacyDevices {
            serial,
            i8042,
            boot_timer,
        },
    })
}

/// The configured virtio devices, attached in one fixed order (block, net, rng, vsock, gpu,
/// input): boot and restore both use it, so a snapshot's device slots and names are the ones
/// a restore builds again.
fn attach_devices(
    config: &VmConfig,
    vmm_start: Instant,
    em: &mut EventManager,
    vm: &Vm,
    ram: &GuestRam,
) -> Result<(DeviceManager, Option<GpuHandle>, Option<InputHandles>), BuildError> {
    let mut devices = DeviceManager::new(ram.memory.clone(), vmm_start);
    for disk in &config.disks {
        devices.attach_block(vm.fd(), em, &disk.path, disk.read_only)?;
    }
    if let Some(net) = &config.net {
        devices.attach_net(
            vm.fd(),
            em,
            &net.tap,
            net.mac.map_or(MacAddr::DEFAULT, |mac| MacAddr(mac.0)),
        )?;
    }
    if config.rng {
        devices.attach_rng(vm.fd(), em)?;
    }
    if let Some(vsock) = &config.vsock {
        devices.attach_vsock(vm.fd(), em, vsock.guest_cid, &vsock.uds_path)?;
    }
    let display = match config.gpu {
        Some(size) => {
            let gpu =
                Gpu::new(GpuConfig::with_size(size.width, size.height)).map_err(BuildError::Gpu)?;
            let handle = gpu.handle();
            devices.attach_virtio_device(
                vm.fd(),
                em,
                "gpu",
                Arc::new(Mutex::new(gpu)),
                handle.metrics(),
            )?;
            Some(handle)
        }
        None => None,
    };
    let input = if config.input {
        let inputs = InputDevices::new().map_err(BuildError::Input)?;
        let handles = inputs.handles();
        for (name, dev) in inputs.into_named() {
            let metrics = dev.handle().metrics();
            devices.attach_virtio_device(vm.fd(), em, name, Arc::new(Mutex::new(dev)), metrics)?;
        }
        Some(handles)
    } else {
        None
    };
    Ok((devices, display, input))
}

/// Everything the VM needs before its vCPUs run, apart from the PIT and the memory slot:
/// kernel and initrd in guest memory, devices, legacy ports, boot tables, configured vCPUs.
struct Assembled {
    devices: DeviceManager,
    display: Option<GpuHandle>,
    input: Option<InputHandles>,
    legacy: Legacy,
    pio: crate::devices::bus::Bus,
    mmio: crate::devices::bus::Bus,
    cmdline: String,
    vcpus: Vec<Vcpu>,
}

fn assemble(
    config: &VmConfig,
    vmm_start: Instant,
    em: &mut EventManager,
    exit: &Arc<ExitSignal>,
    vm: &Vm,
    ram: &GuestRam,
    mem_bytes: u64,
) -> Result<Assembled, BuildError> {
    let kernel = load_kernel(ram, &config.kernel)?;
    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(ram, path, mem_bytes, kernel.end)?),
        None => None,
    };
    let supported = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm {
            what: "get supported CPUID",
            source,
        })?;

    let (devices, display, input) = attach_devices(config, vmm_start, em, vm, ram)?;
    let mut pio = devices.pio_bus().clone();
    let mut mmio = devices.mmio_bus().clone();
    let legacy = attach_legacy(
        vm,
        em,
        &config.serial,
        exit,
        vmm_start,
        &mut pio,
        &mut mmio,
        None,
    )?;

    let (template, facts) = effective_template(config.cpu_template);
    tracing::info!(
        requested = %config.cpu_template,
        template = %template,
        kvm = %facts.kind(),
        "CPU template"
    );
    let cmdline = kernel_cmdline(config, template, &devices.kernel_cmdline())?;
    let cmdline_str = cmdline
        .as_cstring()
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    let cmdline_size = cmdline_str.as_bytes_with_nul().len() as u32;
    loader::load_cmdline(&ram.memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BuildError::Cmdline(e.to_string()))?;
    write_boot_params(
        &ram.memory,
        &BootConfig {
            mem_bytes,
            cmdline_size,
            initrd,
            setup_header: kernel.setup_header,
        },
    )?;
    setup_mptable(&ram.memory, config.vcpus)?;
    write_boot_tables(&ram.memory)?;

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        let vcpu = Vcpu::new(vm, id)?;
        let entry = (id == 0).then_some(kernel.entry);
        vcpu.configure(&supported, config.vcpus, template, entry)?;
        vcpus.push(vcpu);
    }
    Ok(Assembled {
        devices,
        display,
        input,
        legacy,
        pio,
        mmio,
        cmdline: cmdline_str.to_string_lossy().into_owned(),
        vcpus,
    })
}

/// Builds the VM described by `config` and starts its vCPUs. Device event handlers join
/// `em`; the VM's end is reported through `exit`.
pub fn build_and_start(
    config: &VmConfig,
    vmm_start: Instant,
    em: &mut EventManager,
    exit: Arc<ExitSignal>,
) -> Result<BuiltVm, BuildError> {
    let mem_bytes = u64::from(config.mem_mib) << 20;
    let vm = Vm::new()?;
    let ram = create_guest_ram(mem_bytes)?;
    // Finishing the PIT and registering the memory slot each take milliseconds under nested
    // KVM (they wait for SRCU grace periods): they run on helper threads while this thread
    // loads the kernel, attaches the devices and creates the vCPUs, none of which needs
    // the slot. Only running a vCPU does. The PIT comes first (see `start_pit_setup`).
    let assembled = std::thread::scope(|s| {
        let pit = vm.start_pit_setup();
        let slots = s.spawn(|| vm.register_memory(&ram.memory));
        let assembled = assemble(config, vmm_start, em, &exit, &vm, &ram, mem_bytes);
        let slots = slots.join().unwrap_or(Err(VmError::SetupThread));
        let pit = pit.and_then(|setup| setup.wait());
        let assembled = assembled?;
        pit?;
        slots?;
        Ok::<_, BuildError>(assembled)
    })?;
    let kvm_facts = Arc::new(KvmFacts::read(vm.kvm())?);
    // Every file is open; the vCPU threads spawned next inherit the restriction.
    crate::sandbox::runtime::restrict_files(config)?;
    let counters = Arc::new(ExitCounters::default());
    let vcpus = Vcpus::start(
        assembled.vcpus,
        VcpuShared {
            io_bus: Arc::new(assembled.pio),
            mmio_bus: Arc::new(assembled.mmio),
            memory: ram.memory.clone(),
            counters: counters.clone(),
            exit,
            vmm_start,
        },
    )?;
    Ok(BuiltVm {
        vcpus,
        devices: assembled.devices,
        display: assembled.display,
        input: assembled.input,
        legacy_metrics: assembled.legacy.metrics,
        reset_evt: assembled.legacy.reset_evt,
        boot_time: assembled.legacy.boot_time,
        counters,
        cmdline: assembled.cmdline,
        legacy: assembled.legacy.devices,
        kvm_facts,
        vm,
        ram,
    })
}

/// Builds the VM a snapshot describes (its configuration, with `config`'s host-side
/// choices such as the console) over `mem_file` mapped copy-on-write, writes the saved
/// KVM and device state into it and starts its vCPUs, paused unless `resume`. The
/// snapshot has been checked ([`crate::snapshot::read`]); anything KVM refuses here fails
/// the whole restore, and the half-built VM is dropped with the error.
pub fn restore_and_start(
    snapshot: &SnapshotState,
    config: &VmConfig,
    mem_file: &Path,
    resume: bool,
    vmm_start: Instant,
    em: &mut EventManager,
    exit: Arc<ExitSignal>,
) -> Result<BuiltVm, BuildError> {
    let vm = Vm::new()?;
    let ram = restore_guest_ram(mem_file, snapshot.mem_bytes)?;
    let kvm_facts = Arc::new(KvmFacts::read(vm.kvm())?);
    let (vcpus, devices, display, input, legacy, pio, mmio) = std::thread::scope(|s| {
        let pit = vm.start_pit_setup();
        let slots = s.spawn(|| vm.register_memory(&ram.memory));
        let built = (|| {
            // The devices the configuration builds, in the order the boot path attaches them
            // (the same slots, names and order as the snapshotted VM).
            let (devices, display, input) = attach_devices(config, vmm_start, em, &vm, &ram)?;
            let built: Vec<_> = devices.transports().collect();
            if built.len() != snapshot.devices.virtio.len() {
                return Err(BuildError::VirtioMismatch {
                    snapshot: format!("{} devices", snapshot.devices.virtio.len()),
                    built: format!("{} devices", built.len()),
                });
            }
            for ((name, transport), saved) in built.into_iter().zip(&snapshot.devices.virtio) {
                if name != saved.name {
                    return Err(BuildError::VirtioMismatch {
                        snapshot: saved.name.clone(),
                        built: name.to_owned(),
                    });
                }
                transport
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore(&saved.transport)?;
            }
            let mut pio = devices.pio_bus().clone();
            let mut mmio = devices.mmio_bus().clone();
            let legacy = attach_legacy(
                &vm,
                em,
                &config.serial,
                &exit,
                vmm_start,
                &mut pio,
                &mut mmio,
                Some(&snapshot.devices),
            )?;
            let mut vcpus = Vec::with_capacity(snapshot.vcpus.len());
            for state in &snapshot.vcpus {
                let vcpu = Vcpu::new(&vm, state.id)?;
                vcpu.restore(state, kvm_facts.caps)?;
                vcpus.push(vcpu);
            }
            Ok::<_, BuildError>((vcpus, devices, display, input, legacy, pio, mmio))
        })();
        let slots = slots.join().unwrap_or(Err(VmError::SetupThread));
        let pit = pit.and_then(|setup| setup.wait());
        let built = built?;
        pit?;
        slots?;
        Ok::<_, BuildError>(built)
    })?;
    // The PIT exists now: its saved channels, the clock and the irqchip go in last.
    restore_vm(vm.fd(), &snapshot.vm)?;
    crate::sandbox::runtime::restrict_files_restored(config, mem_file)?;
    let counters = Arc::new(ExitCounters::default());
    let shared = VcpuShared {
        io_bus: Arc::new(pio),
        mmio_bus: Arc::new(mmio),
        memory: ram.memory.clone(),
        counters: counters.clone(),
        exit,
        vmm_start,
    };
    let vcpus = match resume {
        true => Vcpus::start(vcpus, shared)?,
        false => Vcpus::start_paused(vcpus, shared)?,
    };
    Ok(BuiltVm {
        vcpus,
        devices,
        display,
        input,
        legacy_metrics: legacy.metrics,
        reset_evt: legacy.reset_evt,
        boot_time: legacy.boot_time,
        counters,
        cmdline: String::new(),
        legacy: legacy.devices,
        kvm_facts,
        vm,
        ram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_gets_template_args_and_device_fragment() {
        let mut config = VmConfig::new("/k");
        config.cmdline = "console=ttyS0 reboot=k panic=-1".into();
        let cmdline = kernel_cmdline(
            &config,
            CpuTemplate::Baseline,
            " virtio_mmio.device=4K@0xd0001000:5",
        )
        .unwrap();
        let s = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert!(
            s.starts_with("console=ttyS0 reboot=k panic=-1 nopcid noxsave "),
            "{s}"
        );
        assert!(s.contains(" clearcpuid="), "{s}");
        assert!(s.contains(" mitigations=off nopti "));
        assert!(s.ends_with(" virtio_mmio.device=4K@0xd0001000:5"));
    }

    #[test]
    fn host_template_leaves_the_cmdline_alone() {
        let mut config = VmConfig::new("/k");
        config.cmdline = "console=ttyS0".into();
        let s = kernel_cmdline(&config, CpuTemplate::Host, "")
            .unwrap()
            .as_cstring()
            .unwrap();
        assert_eq!(s.to_str().unwrap(), "console=ttyS0");
    }

    #[test]
    fn missing_kernel_is_a_configuration_error() {
        let err = BuildError::Open {
            what: "kernel",
            path: "/nonexistent".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(err.exit_status(), ExitStatus::BadConfig);
        assert_eq!(err.to_string(), "cannot open kernel /nonexistent");
    }
}
