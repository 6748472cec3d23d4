//! Creates the VM's devices, puts them on the port-I/O and MMIO buses, wires their
//! eventfds into KVM (irqfd for interrupts, ioeventfd for virtio queue notifications) and
//! into the VMM's event loop, and reports their counters.
//!
//! The KVM side is reached only through [`VmIoRegistrar`], which `kvm_ioctls::VmFd`
//! implements, so the whole set-up runs in unit tests without `/dev/kvm`.
//!
//! Typical use by the VMM (after guest memory and the in-kernel irqchip exist):
//! ```ignore
//! let mut dm = DeviceManager::new(mem.clone(), vmm_start);
//! dm.attach_legacy_devices(&vm_fd, &mut event_manager, LegacyDevicesConfig {
//!     serial: SerialOutput::Stdout, serial_input: None })?;
//! dm.attach_block(&vm_fd, &mut event_manager, Path::new("disk.img"), false)?;
//! dm.attach_rng(&vm_fd, &mut event_manager)?;
//! cmdline.push_str(&dm.kernel_cmdline());          // " virtio_mmio.device=4K@0xd0001000:5 ..."
//! event_manager.add_subscriber(reset_handler_reading(dm.reset_evt()));
//! let (pio, mmio) = (dm.pio_bus().clone(), dm.mmio_bus().clone()); // for the vCPU threads
//! ```

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use event_manager::{MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::legacy::{
    BootTimer, Serial, SerialInput, SerialOutput, SerialOutputError, I8042,
};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{
    MmioError, MmioInterrupt, MmioTransport, MMIO_SLOT_SIZE, QUEUE_NOTIFY_OFFSET,
};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::{GuestMemoryMmap, VirtioDevice};
use crate::devices::DeviceMetrics;

/// The event manager the VMM's main thread runs.
pub type EventManager = event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber>>>;

/// What the device manager needs from the VM: routing eventfds into KVM.
///
/// `kvm_ioctls::VmFd` implements it; tests use a recorder.
pub trait VmIoRegistrar {
    /// A 4-byte guest write of `datamatch` to MMIO address `addr` signals `fd` instead of
    /// exiting to the VMM (KVM_IOEVENTFD).
    fn register_mmio_ioevent(&self, fd: &EventFd, addr: u64, datamatch: u32) -> io::Result<()>;
    /// Writing `fd` raises guest interrupt `gsi` (KVM_IRQFD).
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

impl VmIoRegistrar for kvm_ioctls::VmFd {
    fn register_mmio_ioevent(&self, fd: &EventFd, addr: u64, datamatch: u32) -> io::Result<()> {
        self.register_ioevent(fd, &kvm_ioctls::IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        kvm_ioctls::VmFd::register_irqfd(self, fd, gsi)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))
    }
}

/// Where devices go in guest-physical and port space (see LAYOUT.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceLayout {
    /// COM1 base port.
    pub serial_port: u64,
    /// COM1 interrupt.
    pub serial_irq: u32,
    /// i8042 base port (0x60; the command port is base + 4).
    pub i8042_port: u64,
    /// Boot-timer MMIO page.
    pub boot_timer_addr: u64,
    /// First virtio-mmio slot.
    pub virtio_mmio_base: u64,
    /// End (exclusive) of the space for virtio-mmio slots.
    pub virtio_mmio_end: u64,
    /// GSI of the first virtio-mmio device; each further device takes the next one.
    pub virtio_first_irq: u32,
    /// Last GSI usable for virtio-mmio devices (the IOAPIC has 24 pins).
    pub virtio_last_irq: u32,
}

impl Default for DeviceLayout {
    fn default() -> Self {
        Self {
            serial_port: 0x3f8,
            serial_irq: 4,
            i8042_port: 0x60,
            boot_timer_addr: 0xd000_0000,
            virtio_mmio_base: 0xd000_1000,
            virtio_mmio_end: 0xfec0_0000,
            virtio_first_irq: 5,
            virtio_last_irq: 23,
        }
    }
}

const SERIAL_PORT_LEN: u64 = 8;
const I8042_PORT_LEN: u64 = 5;
const BOOT_TIMER_LEN: u64 = 0x1000;

/// Errors setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The serial output could not be opened.
    #[error(transparent)]
    SerialOutput(#[from] SerialOutputError),
    /// A device could not be placed on a bus.
    #[error("cannot place {device} on its bus")]
    Bus {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: BusError,
    },
    /// KVM refused an irqfd.
    #[error("cannot register the interrupt of {device} (GSI {gsi}) with KVM")]
    Irqfd {
        /// The device.
        device: String,
        /// Its GSI.
        gsi: u32,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// KVM refused a queue notification ioeventfd.
    #[error("cannot register queue {queue} notification of {device} with KVM")]
    Ioeventfd {
        /// The device.
        device: String,
        /// The queue index.
        queue: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No virtio-mmio slot or GSI is left.
    #[error("no virtio-mmio slot left for {0}")]
    NoSlot(String),
    /// Two devices were given the same name.
    #[error("a device named {0} already exists")]
    DuplicateName(String),
    /// The transport refused the device.
    #[error("virtio-mmio transport for {device}")]
    Transport {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: MmioError,
    },
    /// The disk image could not be used.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// The entropy device could not be created.
    #[error("cannot create the virtio-rng device")]
    Rng(#[source] io::Error),
    /// The serial device could not be created.
    #[error("cannot create the serial device")]
    Serial(#[source] io::Error),
}

type Result<T> = std::result::Result<T, DeviceManagerError>;

/// Legacy device options.
pub struct LegacyDevicesConfig {
    /// Where the guest console goes.
    pub serial: SerialOutput,
    /// Where guest console input comes from (see [`crate::devices::legacy::stdin_input`]).
    pub serial_input: Option<Box<dyn SerialInput>>,
}

/// A virtio device placed on the MMIO bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioSlot {
    /// The device's name in metrics.
    pub name: String,
    /// Base address of its register window.
    pub base: u64,
    /// Its GSI.
    pub irq: u32,
}

impl MmioSlot {
    /// The kernel command-line argument announcing this device.
    pub fn cmdline_arg(&self) -> String {
        format!(
            "virtio_mmio.device={}K@{:#x}:{}",
            MMIO_SLOT_SIZE / 1024,
            self.base,
            self.irq
        )
    }
}

/// The VM's devices and the buses the vCPU threads dispatch to.
pub struct DeviceManager {
    mem: GuestMemoryMmap,
    layout: DeviceLayout,
    vmm_start: Instant,
    pio_bus: Bus,
    mmio_bus: Bus,
    reset_evt: Option<EventFd>,
    boot_time: Option<Arc<OnceLock<Duration>>>,
    slots: Vec<MmioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    metrics: BTreeMap<String, Arc<dyn DeviceMetrics>>,
}

impl DeviceManager {
    /// A device manager for a guest with memory `mem`, with the LAYOUT.md layout.
    /// `vmm_start` is when the VMM process started (the boot timer measures from it).
    pub fn new(mem: GuestMemoryMmap, vmm_start: Instant) -> Self {
        Self::with_layout(mem, vmm_start, DeviceLayout::default())
    }

    /// As [`DeviceManager::new`] with another layout.
    pub fn with_layout(mem: GuestMemoryMmap, vmm_start: Instant, layout: DeviceLayout) -> Self {
        Self {
            mem,
            layout,
            vmm_start,
            pio_bus: Bus::new(),
            mmio_bus: Bus::new(),
            reset_evt: None,
            boot_time: None,
            slots: Vec::new(),
            transports: Vec::new(),
            metrics: BTreeMap::new(),
        }
    }

    /// Adds COM1 (irqfd on its IRQ, input registered with `event_manager`), the i8042
    /// and the boot timer.
    pub fn attach_legacy_devices<V, E>(
        &mut self,
        vm: &V,
        event_manager: &mut E,
        config: LegacyDevicesConfig,
    ) -> Result<()>
    where
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        let layout = self.layout;

        let serial_irq = new_eventfd()?;
        vm.register_irqfd(&serial_irq, layout.serial_irq)
            .map_err(|source| DeviceManagerError::Irqfd {
                device: "serial".into(),
                gsi: layout.serial_irq,
                source,
            })?;
        let out = config.serial.open()?;
        let serial = Serial::new(serial_irq, out, config.serial_input)
            .map_err(DeviceManagerError::Serial)?;
        self.add_metrics("serial", serial.metrics())?;
        let serial = Arc::new(Mutex::new(serial));
        self.insert_pio("serial", serial.clone(), layout.serial_port, SERIAL_PORT_LEN)?;
        event_manager.add_subscriber(serial);

        let reset_evt = new_eventfd()?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(DeviceManagerError::EventFd)?);
        self.add_metrics("i8042", i8042.metrics())?;
        self.insert_pio(
            "i8042",
            Arc::new(Mutex::new(i8042)),
            layout.i8042_port,
            I8042_PORT_LEN,
        )?;
        self.reset_evt = Some(reset_evt);

        let timer = BootTimer::new(self.vmm_start);
        self.boot_time = Some(timer.boot_time_handle());
        self.mmio_bus
            .insert(
                Arc::new(Mutex::new(timer)),
                layout.boot_timer_addr,
                BOOT_TIMER_LEN,
            )
            .map_err(|source| DeviceManagerError::Bus {
                device: "boot_timer".into(),
                source,
            })?;
        Ok(())
    }

    /// Adds a virtio-blk device backed by the raw image at `path`, named `blockN`.
    pub fn attach_block<V, E>(
        &mut self,
        vm: &V,
        event_manager: &mut E,
        path: &Path,
        read_only: bool,
    ) -> Result<MmioSlot>
    where
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        let index = self
            .metrics
            .keys()
            .filter(|name| name.starts_with("block"))
            .count();
        let name = format!("block{index}");
        let block = Block::new(path, read_only, &name)?;
        let metrics = block.metrics();
        self.attach_virtio_device(vm, event_manager, &name, Arc::new(Mutex::new(block)), metrics)
    }

    /// Adds a virtio-rng device named `rng`.
    pub fn attach_rng<V, E>(&mut self, vm: &V, event_manager: &mut E) -> Result<MmioSlot>
    where
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        let rng = Rng::new().map_err(DeviceManagerError::Rng)?;
        let metrics = rng.metrics();
        self.attach_virtio_device(vm, event_manager, "rng", Arc::new(Mutex::new(rng)), metrics)
    }

    /// Puts any virtio device behind a virtio-mmio transport in the next free slot: its
    /// interrupt becomes an irqfd on the slot's GSI, each queue's eventfd an ioeventfd on
    /// QUEUE_NOTIFY matching the queue index, and the device (its `MutEventSubscriber`
    /// side) joins the event loop. `metrics` appear under `name` in
    /// [`DeviceManager::device_metrics`].
    pub fn attach_virtio_device<D, V, E>(
        &mut self,
        vm: &V,
        event_manager: &mut E,
        name: &str,
        device: Arc<Mutex<D>>,
        metrics: Arc<dyn DeviceMetrics>,
    ) -> Result<MmioSlot>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        if self.metrics.contains_key(name) {
            return Err(DeviceManagerError::DuplicateName(name.into()));
        }
        let index = self.slots.len() as u64;
        let base = index
            .checked_mul(MMIO_SLOT_SIZE)
            .and_then(|off| self.layout.virtio_mmio_base.checked_add(off))
            .filter(|b| b.saturating_add(MMIO_SLOT_SIZE) <= self.layout.virtio_mmio_end);
        let irq = self
            .layout
            .virtio_first_irq
            .checked_add(index as u32)
            .filter(|irq| *irq <= self.layout.virtio_last_irq);
        let (Some(base), Some(irq)) = (base, irq) else {
            return Err(DeviceManagerError::NoSlot(name.into()));
        };

        let irq_evt = new_eventfd()?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|source| DeviceManagerError::Irqfd {
                device: name.into(),
                gsi: irq,
                source,
            })?;
        {
            let dev = device.lock().unwrap_or_else(|e| e.into_inner());
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY_OFFSET, queue as u32)
                    .map_err(|source| DeviceManagerError::Ioeventfd {
                        device: name.into(),
                        queue,
                        source,
                    })?;
            }
        }

        let interrupt = Arc::new(MmioInterrupt::new(irq_evt));
        let transport = MmioTransport::new(device.clone(), self.mem.clone(), interrupt)
            .map_err(|source| DeviceManagerError::Transport {
                device: name.into(),
                source,
            })?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio_bus
            .insert(transport.clone(), base, MMIO_SLOT_SIZE)
            .map_err(|source| DeviceManagerError::Bus {
                device: name.into(),
                source,
            })?;
        event_manager.add_subscriber(device);

        let slot = MmioSlot {
            name: name.into(),
            base,
            irq,
        };
        self.metrics.insert(
            name.into(),
            Arc::new(VirtioMetrics {
                device: metrics,
                transport: transport.clone(),
            }),
        );
        self.transports.push(transport);
        self.slots.push(slot.clone());
        Ok(slot)
    }

    fn insert_pio(
        &mut self,
        name: &str,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<()> {
        self.pio_bus
            .insert(device, base, len)
            .map_err(|source| DeviceManagerError::Bus {
                device: name.into(),
                source,
            })
    }

    fn add_metrics(&mut self, name: &str, metrics: Arc<dyn DeviceMetrics>) -> Result<()> {
        if self.metrics.contains_key(name) {
            return Err(DeviceManagerError::DuplicateName(name.into()));
        }
        self.metrics.insert(name.into(), metrics);
        Ok(())
    }

    /// The port-I/O bus (clone it for each vCPU thread once all devices are attached).
    pub fn pio_bus(&self) -> &Bus {
        &self.pio_bus
    }

    /// The MMIO bus (clone it for each vCPU thread once all devices are attached).
    pub fn mmio_bus(&self) -> &Bus {
        &self.mmio_bus
    }

    /// Signalled (counter incremented) when the guest resets through the i8042.
    /// `None` until [`DeviceManager::attach_legacy_devices`] ran.
    pub fn reset_evt(&self) -> Option<&EventFd> {
        self.reset_evt.as_ref()
    }

    /// Time from VMM start to the guest's boot-finished signal, once it arrived.
    pub fn boot_time(&self) -> Option<Duration> {
        self.boot_time.as_ref().and_then(|t| t.get().copied())
    }

    /// The virtio-mmio devices in slot order.
    pub fn virtio_slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// The kernel command-line fragment announcing every virtio-mmio device, each
    /// argument preceded by a space (empty without virtio devices).
    pub fn kernel_cmdline(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!(" {}", s.cmdline_arg()))
            .collect()
    }

    /// Every device's counters, as an object keyed by device name.
    pub fn device_metrics(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.metrics
                .iter()
                .map(|(name, m)| (name.clone(), m.snapshot()))
                .collect(),
        )
    }
}

/// A virtio device's counters next to its transport's.
struct VirtioMetrics {
    device: Arc<dyn DeviceMetrics>,
    transport: Arc<Mutex<MmioTransport>>,
}

impl DeviceMetrics for VirtioMetrics {
    fn snapshot(&self) -> serde_json::Value {
        let transport = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .metrics_snapshot();
        serde_json::json!({ "device": self.device.snapshot(), "transport": transport })
    }
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)
}
