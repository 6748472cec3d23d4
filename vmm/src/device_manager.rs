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
use crate::devices::virtio::net::{MacAddr, Net, NetError};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::vsock::{Vsock, VsockError};
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
    /// The network device could not be created (TAP missing or not ours).
    #[error("cannot create the virtio-net device")]
    Net(#[source] NetError),
    /// The vsock device could not be created (its Unix socket in use or not creatable).
    #[error("cannot create the virtio-vsock device")]
    Vsock(#[source] VsockError),
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
    block_count: usize,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    metrics: BTreeMap<String, Arc<dyn DeviceMetrics>>,
    vsock: Option<Arc<Mutex<Vsock>>>,
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
            block_count: 0,
            transports: Vec::new(),
            metrics: BTreeMap::new(),
            vsock: None,
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
        self.register_metrics("serial", serial.metrics())?;
        let serial = Arc::new(Mutex::new(serial));
        self.insert_pio(
            "serial",
            serial.clone(),
            layout.serial_port,
            SERIAL_PORT_LEN,
        )?;
        event_manager.add_subscriber(serial);

        let reset_evt = new_eventfd()?;
        let i8042 = I8042::new(reset_evt.try_clone().map_err(DeviceManagerError::EventFd)?);
        self.register_metrics("i8042", i8042.metrics())?;
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
        let name = format!("block{}", self.block_count);
        let block = Block::new(path, read_only, &name)?;
        let metrics = block.metrics();
        let block = Arc::new(Mutex::new(block));
        let slot = self.attach_virtio_device(vm, event_manager, &name, block, metrics)?;
        self.block_count += 1;
        Ok(slot)
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

    /// Adds a virtio-net NIC on the existing TAP device `tap`, named `net0`.
    pub fn attach_net<V, E>(
        &mut self,
        vm: &V,
        event_manager: &mut E,
        tap: &str,
        mac: MacAddr,
    ) -> Result<MmioSlot>
    where
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        let net = Net::new(tap, mac).map_err(DeviceManagerError::Net)?;
        let metrics = net.metrics();
        self.attach_virtio_device(
            vm,
            event_manager,
            "net0",
            Arc::new(Mutex::new(net)),
            metrics,
        )
    }

    /// Adds a virtio-vsock device named `vsock` for guest `guest_cid`, listening on the
    /// Unix socket `path`; [`DeviceManager::vsock`] hands it out afterwards (for its
    /// transport reset after a restore).
    pub fn attach_vsock<V, E>(
        &mut self,
        vm: &V,
        event_manager: &mut E,
        guest_cid: u64,
        path: &std::path::Path,
    ) -> Result<MmioSlot>
    where
        V: VmIoRegistrar + ?Sized,
        E: SubscriberOps<Subscriber = Arc<Mutex<dyn MutEventSubscriber>>>,
    {
        let vsock = Vsock::new(guest_cid, path).map_err(DeviceManagerError::Vsock)?;
        let metrics = vsock.metrics();
        let vsock = Arc::new(Mutex::new(vsock));
        let slot = self.attach_virtio_device(vm, event_manager, "vsock", vsock.clone(), metrics)?;
        self.vsock = Some(vsock);
        Ok(slot)
    }

    /// The vsock device, if one is attached.
    pub fn vsock(&self) -> Option<&Arc<Mutex<Vsock>>> {
        self.vsock.as_ref()
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

        // Build (and so validate) the transport before telling KVM about any fd.
        let irq_evt = new_eventfd()?;
        let interrupt = Arc::new(MmioInterrupt::new(irq_evt));
        let mut transport = MmioTransport::new(device.clone(), self.mem.clone(), interrupt)
            .map_err(|source| DeviceManagerError::Transport {
                device: name.into(),
                source,
            })?;
        transport.set_name(name);
        vm.register_irqfd(transport.interrupt().irq_evt(), irq)
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

    /// Adds counters of a device built outside the device manager to
    /// [`DeviceManager::device_metrics`] under `name`.
    pub fn register_metrics(&mut self, name: &str, metrics: Arc<dyn DeviceMetrics>) -> Result<()> {
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

    /// Each virtio-mmio device's name and transport, in slot order (for snapshots).
    pub fn transports(&self) -> impl Iterator<Item = (&str, &Arc<Mutex<MmioTransport>>)> {
        self.slots
            .iter()
            .map(|slot| slot.name.as_str())
            .zip(&self.transports)
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::os::fd::AsRawFd;

    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    /// Records what would have been registered with KVM, keeping clones of the eventfds.
    #[derive(Default)]
    struct Recorder {
        ioevents: RefCell<Vec<(EventFd, u64, u32)>>,
        irqfds: RefCell<Vec<(EventFd, u32)>>,
        fail_irqfd: bool,
    }

    impl VmIoRegistrar for Recorder {
        fn register_mmio_ioevent(&self, fd: &EventFd, addr: u64, datamatch: u32) -> io::Result<()> {
            self.ioevents
                .borrow_mut()
                .push((fd.try_clone()?, addr, datamatch));
            Ok(())
        }
        fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
            if self.fail_irqfd {
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            self.irqfds.borrow_mut().push((fd.try_clone()?, gsi));
            Ok(())
        }
    }

    impl Recorder {
        fn irq(&self, gsi: u32) -> EventFd {
            let irqfds = self.irqfds.borrow();
            let (fd, _) = irqfds.iter().find(|(_, g)| *g == gsi).unwrap();
            fd.try_clone().unwrap()
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn legacy() -> LegacyDevicesConfig {
        LegacyDevicesConfig {
            serial: SerialOutput::Sink,
            serial_input: None,
        }
    }

    fn read32(bus: &Bus, addr: u64) -> u32 {
        let mut b = [0u8; 4];
        assert!(bus.read(addr, &mut b), "nothing at {addr:#x}");
        u32::from_le_bytes(b)
    }

    fn write32(bus: &Bus, addr: u64, value: u32) {
        assert!(bus.write(addr, &value.to_le_bytes()));
    }

    fn disk() -> TempFile {
        let file = TempFile::new().unwrap();
        file.as_file().set_len(4096).unwrap();
        file
    }

    #[test]
    fn legacy_devices_sit_at_their_layout_addresses() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());

        dm.attach_legacy_devices(&vm, &mut em, legacy()).unwrap();

        // COM1: LSR says the transmitter is empty.
        let mut lsr = [0u8];
        assert!(dm.pio_bus().read(0x3fd, &mut lsr));
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(vm.irqfds.borrow()[0].1, 4);
        // i8042 reset.
        assert!(dm.pio_bus().write(0x64, &[0xfe]));
        assert_eq!(dm.reset_evt().unwrap().read().unwrap(), 1);
        // Boot timer.
        assert_eq!(dm.boot_time(), None);
        assert!(dm.mmio_bus().write(0xd000_0000, &[123]));
        assert!(dm.boot_time().is_some());
        assert_eq!(dm.kernel_cmdline(), "");
    }

    #[test]
    fn virtio_devices_get_consecutive_slots_irqs_and_cmdline_entries() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        let image = disk();

        let blk = dm
            .attach_block(&vm, &mut em, image.as_path(), false)
            .unwrap();
        let rng = dm.attach_rng(&vm, &mut em).unwrap();

        assert_eq!((blk.base, blk.irq), (0xd000_1000, 5));
        assert_eq!((rng.base, rng.irq), (0xd000_2000, 6));
        assert_eq!(
            dm.kernel_cmdline(),
            " virtio_mmio.device=4K@0xd0001000:5 virtio_mmio.device=4K@0xd0002000:6"
        );
        assert_eq!(read32(dm.mmio_bus(), 0xd000_1000), 0x7472_6976);
        assert_eq!(read32(dm.mmio_bus(), 0xd000_1008), 2);
        assert_eq!(read32(dm.mmio_bus(), 0xd000_2008), 4);
        let gsis: Vec<u32> = vm.irqfds.borrow().iter().map(|(_, g)| *g).collect();
        assert_eq!(gsis, vec![5, 6]);
        let ioevents: Vec<(u64, u32)> = vm
            .ioevents
            .borrow()
            .iter()
            .map(|(_, a, d)| (*a, *d))
            .collect();
        assert_eq!(ioevents, vec![(0xd000_1050, 0), (0xd000_2050, 0)]);
    }

    #[test]
    fn ioeventfd_is_the_queue_eventfd_of_the_device() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let metrics = rng.lock().unwrap().metrics();
        dm.attach_virtio_device(&vm, &mut em, "rng", rng.clone(), metrics)
            .unwrap();

        // What KVM would do on the guest's QUEUE_NOTIFY write.
        vm.ioevents.borrow()[0].0.write(1).unwrap();

        assert_eq!(rng.lock().unwrap().queue_events()[0].read().unwrap(), 1);
    }

    #[test]
    fn guest_driver_runs_a_block_request_end_to_end() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let memory = mem();
        let mut dm = DeviceManager::new(memory.clone(), Instant::now());
        let image = disk();
        std::fs::write(image.as_path(), [0x42u8; 4096]).unwrap();
        let slot = dm
            .attach_block(&vm, &mut em, image.as_path(), false)
            .unwrap();
        let irq = vm.irq(slot.irq);
        let bus = dm.mmio_bus().clone();
        let base = slot.base;

        // Driver: reset, negotiate VERSION_1, set up queue 0, DRIVER_OK.
        let vq = MockSplitQueue::new(&memory, 16);
        write32(&bus, base + 0x70, 0);
        write32(&bus, base + 0x70, 1);
        write32(&bus, base + 0x70, 3);
        write32(&bus, base + 0x24, 1);
        write32(&bus, base + 0x20, 1); // VERSION_1 is bit 32
        write32(&bus, base + 0x70, 11);
        assert_eq!(read32(&bus, base + 0x70), 11);
        write32(&bus, base + 0x30, 0);
        write32(&bus, base + 0x38, 16);
        write32(&bus, base + 0x80, vq.desc_table_addr().0 as u32);
        write32(&bus, base + 0x90, vq.avail_addr().0 as u32);
        write32(&bus, base + 0xa0, vq.used_addr().0 as u32);
        write32(&bus, base + 0x44, 1);
        write32(&bus, base + 0x70, 15);
        assert_eq!(read32(&bus, base + 0x70), 15);

        // A one-sector read.
        let (hdr, data, status) = (0x10_0000u64, 0x10_1000u64, 0x10_2000u64);
        memory.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
        let chain = [
            (hdr, 16, 0u16),
            (
                data,
                512,
                virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
            ),
            (
                status,
                1,
                virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
            ),
        ];
        let descs: Vec<_> = chain
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i < 2 {
                    virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                } else {
                    0
                };
                virtio_queue::desc::RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(
                    addr,
                    len,
                    flags | next,
                    i as u16 + 1,
                ))
            })
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        write32(&bus, base + 0x50, 0);
        em.run_with_timeout(1000).unwrap();

        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(status)).unwrap(), 0);
        let mut got = [0u8; 512];
        memory.read_slice(&mut got, GuestAddress(data)).unwrap();
        assert_eq!(got, [0x42; 512]);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read32(&bus, base + 0x60), 1);
        write32(&bus, base + 0x64, 1);
        assert_eq!(read32(&bus, base + 0x60), 0);

        let metrics = dm.device_metrics();
        assert_eq!(metrics["block0"]["device"]["reads"], 1);
        assert_eq!(metrics["block0"]["transport"]["activations"], 1);
    }

    #[test]
    fn metrics_are_keyed_by_device_name() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        let (a, b) = (disk(), disk());
        dm.attach_legacy_devices(&vm, &mut em, legacy()).unwrap();
        dm.attach_block(&vm, &mut em, a.as_path(), true).unwrap();
        dm.attach_block(&vm, &mut em, b.as_path(), false).unwrap();
        dm.attach_rng(&vm, &mut em).unwrap();

        let metrics = dm.device_metrics();

        let keys: Vec<&String> = metrics.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["block0", "block1", "i8042", "rng", "serial"]);
        assert_eq!(metrics["serial"]["bytes_out"], 0);
        assert_eq!(metrics["rng"]["device"]["requests"], 0);
    }

    #[test]
    fn slots_run_out_when_irqs_do() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        for i in 0..19 {
            let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
            let m = rng.lock().unwrap().metrics();
            dm.attach_virtio_device(&vm, &mut em, &format!("rng{i}"), rng, m)
                .unwrap();
        }
        let rng = Arc::new(Mutex::new(Rng::new().unwrap()));
        let m = rng.lock().unwrap().metrics();

        let err = dm
            .attach_virtio_device(&vm, &mut em, "one-too-many", rng, m)
            .unwrap_err();

        assert!(matches!(err, DeviceManagerError::NoSlot(_)));
        assert_eq!(dm.virtio_slots().last().unwrap().irq, 23);
    }

    #[test]
    fn device_manager_can_move_between_threads() {
        fn assert_send<T: Send>() {}
        assert_send::<DeviceManager>();
    }

    #[test]
    fn duplicate_names_are_refused() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        dm.attach_rng(&vm, &mut em).unwrap();
        let err = dm.attach_rng(&vm, &mut em).unwrap_err();
        assert!(matches!(err, DeviceManagerError::DuplicateName(_)));
    }

    #[test]
    fn kvm_refusals_are_reported_with_the_device() {
        let vm = Recorder {
            fail_irqfd: true,
            ..Recorder::default()
        };
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        let err = dm.attach_rng(&vm, &mut em).unwrap_err();
        assert!(err.to_string().contains("rng"), "{err}");
        assert!(err.to_string().contains("GSI 5"), "{err}");
    }

    #[test]
    fn missing_disk_image_is_a_block_error() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        let err = dm
            .attach_block(&vm, &mut em, Path::new("/nonexistent.img"), false)
            .unwrap_err();
        assert!(matches!(err, DeviceManagerError::Block(_)));
        assert!(dm.virtio_slots().is_empty());
    }

    #[test]
    fn serial_irq_eventfd_is_the_registered_irqfd() {
        let vm = Recorder::default();
        let mut em = EventManager::new().unwrap();
        let mut dm = DeviceManager::new(mem(), Instant::now());
        dm.attach_legacy_devices(&vm, &mut em, legacy()).unwrap();
        let irq = vm.irq(4);

        // Enable the THR-empty interrupt: the UART raises its line at once.
        assert!(dm.pio_bus().write(0x3f9, &[0x02]));

        assert_eq!(irq.read().unwrap(), 1);
        assert!(irq.as_raw_fd() >= 0);
    }
}
