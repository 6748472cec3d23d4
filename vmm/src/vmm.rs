//! The VMM's main thread: an epoll event loop (event-manager) that runs device work,
//! control-API requests, SIGTERM/SIGINT and VM-exit notifications, the lifecycle state
//! machine, and the [`VmmController`] the API server talks to.
//!
//! Every way a VM can end funnels into one [`ExitSignal`]; the loop returns the first
//! [`VmExit`] recorded, after which the caller stops the vCPUs and exits the process with
//! the exit's status.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use crate::builder::{build_and_start, restore_and_start, BuildError, BuiltVm};
use crate::config::VmConfig;
use crate::device_manager::EventManager;
use crate::devices::virtio::input::InputChannel;
use crate::devices::DeviceMetrics;
use crate::rpc::{
    ActionError, ApiReceiver, FramebufferFds, Lifecycle, VmDescription, VmMetrics, VmState,
    VmmAction, VmmController, VmmResponse,
};
use crate::vstate::lifecycle::{ExitSignal, ExitStatus, VmExit};

/// How long pause waits for every vCPU to leave `KVM_RUN`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the VMM waits for vCPU threads to end before exiting anyway.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the VMM waits for the API thread to write the last answers before exiting.
const REPLY_TIMEOUT: Duration = Duration::from_millis(500);

/// Errors setting up the VMM's event loop.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// The event manager could not be created or run.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// Blocking the termination signals or creating their signalfd failed.
    #[error("cannot set up the termination signal handling")]
    Signals(#[source] std::io::Error),
    /// The exit eventfd could not be created.
    #[error("cannot create the exit eventfd")]
    ExitEvent(#[source] std::io::Error),
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot files are unusable or do not fit this VMM.
    #[error("cannot restore the snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Building the VM from it failed.
    #[error("cannot restore the snapshot")]
    Build(#[from] BuildError),
}

impl RestoreError {
    /// Whether the files or the request are at fault (rather than KVM or the VMM).
    pub fn is_user_error(&self) -> bool {
        match self {
            Self::Snapshot(_) => true,
            Self::Build(e) => e.exit_status() == ExitStatus::BadConfig,
        }
    }

    /// The process exit status when this error ends the VMM (`--restore`).
    pub fn exit_status(&self) -> ExitStatus {
        match self.is_user_error() {
            true => ExitStatus::BadConfig,
            false => ExitStatus::InternalError,
        }
    }
}

/// What woke the main thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// SIGTERM or SIGINT arrived.
    Terminate,
    /// The API thread queued a request.
    Api,
    /// The guest asked for a reset through the i8042.
    Reset,
    /// An exit was recorded in the [`ExitSignal`].
    Exit,
}

/// An event-loop subscriber for one file descriptor that only records that it fired.
struct Waker {
    fd: RawFd,
    /// Keeps the descriptor open while it is registered.
    _owner: OwnedFd,
    wake: Wake,
    fired: Arc<Mutex<Vec<Wake>>>,
}

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!("cannot watch {:?} events: {e:?}", self.wake);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the eventfd counter or one signalfd record (128 bytes); both are
        // non-blocking, and a failed read just means another wake-up consumed it.
        let mut buf = [0u8; 128];
        // SAFETY: buf is a valid writable buffer of buf.len() bytes; fd is open (owned).
        let _ = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
        self.fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.wake);
    }
}

/// Blocks SIGTERM and SIGINT in the calling thread (and every thread it spawns later) and
/// returns a non-blocking signalfd that receives them.
fn termination_signalfd() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
    }
    // SAFETY: `set` is initialised; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new signalfd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by signalfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn dup_fd(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on an open descriptor has no memory-safety requirements.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// The VMM: lifecycle state, the configuration, the running VM and the event loop.
pub struct Vmm {
    vmm_start: Instant,
    state: VmState,
    config: Option<VmConfig>,
    vm: Option<BuiltVm>,
    exit: Arc<ExitSignal>,
    fired: Arc<Mutex<Vec<Wake>>>,
    api: Option<ApiReceiver>,
    event_manager: EventManager,
    /// The raw input channel (`GET /input/socket`).
    input_channel: InputChannel,
}

impl Vmm {
    /// A VMM with no VM yet. Blocks SIGTERM/SIGINT for the whole process (call it before
    /// spawning threads) and watches them through a signalfd.
    pub fn new(vmm_start: Instant) -> Result<Self, VmmError> {
        let sigfd = termination_signalfd().map_err(VmmError::Signals)?;
        let event_manager =
            EventManager::new().map_err(|e| VmmError::EventLoop(format!("{e:?}")))?;
        let exit = Arc::new(ExitSignal::new().map_err(VmmError::ExitEvent)?);
        let mut vmm = Self {
            vmm_start,
            state: VmState::NotConfigured,
            config: None,
            vm: None,
            exit,
            fired: Arc::new(Mutex::new(Vec::new())),
            api: None,
            event_manager,
            input_channel: InputChannel::new(),
        };
        vmm.watch(sigfd, Wake::Terminate);
        let exit_fd = dup_fd(vmm.exit.event_fd().as_raw_fd()).map_err(VmmError::ExitEvent)?;
        vmm.watch(exit_fd, Wake::Exit);
        Ok(vmm)
    }

    fn watch(&mut self, fd: OwnedFd, wake: Wake) {
        let waker = Waker {
            fd: fd.as_raw_fd(),
            _owner: fd,
            wake,
            fired: self.fired.clone(),
        };
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(waker)));
    }

    /// Serves the control API: requests arriving on `receiver` are handled on this thread.
    pub fn attach_api(&mut self, receiver: ApiReceiver) -> std::io::Result<()> {
        let fd = dup_fd(receiver.as_raw_fd())?;
        self.watch(fd, Wake::Api);
        self.api = Some(receiver);
        Ok(())
    }

    /// Sets the configuration (from the command line) before start.
    pub fn configure(&mut self, config: VmConfig) {
        self.config = Some(config);
        self.state = VmState::Configured;
    }

    /// Builds and starts the configured VM.
    pub fn start_vm(&mut self) -> Result<(), BuildError> {
        let Some(config) = &self.config else {
            return Err(BuildError::Unsupported("starting without a configuration"));
        };
        let vm = build_and_start(
            config,
            self.vmm_start,
            &mut self.event_manager,
            self.exit.clone(),
        )?;
        tracing::info!("kernel command line: {}", vm.cmdline);
        match dup_fd(vm.reset_evt.as_raw_fd()) {
            Ok(fd) => self.watch(fd, Wake::Reset),
            Err(e) => tracing::error!("cannot watch the i8042 reset: {e}"),
        }
        // The vCPU threads run: from here on this thread handles guest-driven work.
        crate::sandbox::runtime::enter_or_exit(crate::sandbox::seccomp::ThreadRole::Main);
        self.vm = Some(vm);
        self.state = VmState::Running;
        Ok(())
    }

    /// Builds the VM of a snapshot ([`crate::snapshot`]) and starts it, paused unless
    /// `load.resume_vm`. The state file is checked whole, and against the configuration
    /// given before (if any), before anything of the VM is built.
    pub fn restore_vm(&mut self, load: &vmm_api::SnapshotLoad) -> Result<(), RestoreError> {
        let snapshot = crate::snapshot::read(&load.snapshot_path)?;
        snapshot.check_config(self.config.as_ref())?;
        let mut config = snapshot.config.clone();
        if let Some(serial) = load
            .serial
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.serial.clone()))
        {
            config.serial = serial;
        }
        if let Some(path) = &load.vsock_uds_path {
            let Some(vsock) = &mut config.vsock else {
                return Err(RestoreError::Snapshot(
                    crate::snapshot::SnapshotError::Invalid {
                        path: load.snapshot_path.clone(),
                        reason: "vsock_uds_path given, but the VM has no vsock device".into(),
                    },
                ));
            };
            vsock.uds_path = path.clone();
        }
        if let Some(tap) = &load.net_tap {
            let Some(net) = &mut config.net else {
                return Err(RestoreError::Snapshot(
                    crate::snapshot::SnapshotError::Invalid {
                        path: load.snapshot_path.clone(),
                        reason: "net_tap given, but the VM has no network device".into(),
                    },
                ));
            };
            net.tap = tap.clone();
        }
        // The overrides are the request's: checked like a configuration's.
        config.validate_values().map_err(|e| {
            RestoreError::Snapshot(crate::snapshot::SnapshotError::Invalid {
                path: load.snapshot_path.clone(),
                reason: e.to_string(),
            })
        })?;
        let vm = restore_and_start(
            &snapshot,
            &config,
            &load.mem_file_path,
            load.resume_vm,
            self.vmm_start,
            &mut self.event_manager,
            self.exit.clone(),
        )?;
        tracing::info!(
            "restored the VM of {} ({} vCPUs, {} MiB){}",
            load.snapshot_path.display(),
            config.vcpus,
            config.mem_mib,
            if load.resume_vm { "" } else { ", paused" }
        );
        match dup_fd(vm.reset_evt.as_raw_fd()) {
            Ok(fd) => self.watch(fd, Wake::Reset),
            Err(e) => tracing::error!("cannot watch the i8042 reset: {e}"),
        }
        crate::sandbox::runtime::enter_or_exit(crate::sandbox::seccomp::ThreadRole::Main);
        self.vm = Some(vm);
        self.config = Some(config);
        self.state = match load.resume_vm {
            true => VmState::Running,
            false => VmState::Paused,
        };
        Ok(())
    }

    /// Runs the event loop until the VM ends (guest exit, API stop, SIGTERM), then stops
    /// the vCPUs and returns why it ended.
    pub fn run(&mut self) -> VmExit {
        let exit = loop {
            if let Some(exit) = self.exit.exit() {
                break exit;
            }
            if let Err(e) = self.event_manager.run() {
                // EINTR-like hiccups aside, a broken epoll cannot recover.
                break VmExit::new(
                    ExitStatus::InternalError,
                    format!("event loop failed: {e:?}"),
                );
            }
            let fired: Vec<Wake> =
                std::mem::take(&mut *self.fired.lock().unwrap_or_else(|e| e.into_inner()));
            for wake in fired {
                match wake {
                    Wake::Terminate => self
                        .exit
                        .report(VmExit::new(ExitStatus::Ok, "stopped by signal")),
                    Wake::Reset => self.exit.report(VmExit::new(
                        ExitStatus::Reboot,
                        "guest reset through the i8042",
                    )),
                    Wake::Api => {
                        if let Some(api) = self.api.take() {
                            api.drain_into(self);
                            self.api = Some(api);
                        }
                    }
                    Wake::Exit => {}
                }
            }
        };
        self.state = VmState::Stopped;
        if let Some(vm) = &mut self.vm {
            vm.vcpus.stop(STOP_TIMEOUT);
        }
        if let Some(api) = self.api.take() {
            // Answer what is already queued (e.g. requests racing the guest's exit)...
            api.drain_into(self);
            // ...and let the API thread write the answers (the reply to `stop` above all).
            if !api.wait_responses_sent(REPLY_TIMEOUT) {
                tracing::warn!("exiting before the last API response was written");
            }
            self.api = Some(api);
        }
        exit
    }

    fn display(&self) -> Result<&crate::devices::virtio::gpu::GpuHandle, ActionError> {
        self.vm
            .as_ref()
            .and_then(|vm| vm.display.as_ref())
            .ok_or_else(|| ActionError::NoSuchDevice("the VM has no display".into()))
    }

    fn input(&self) -> Result<&crate::devices::virtio::input::InputHandles, ActionError> {
        self.vm
            .as_ref()
            .and_then(|vm| vm.input.as_ref())
            .ok_or_else(|| ActionError::NoSuchDevice("the VM has no input devices".into()))
    }

    fn boot_time_us(&self) -> Option<u64> {
        self.vm
            .as_ref()
            .and_then(|vm| vm.boot_time.get())
            .map(|d| d.as_micros() as u64)
    }

    fn metrics(&self) -> VmMetrics {
        let Some(vm) = &self.vm else {
            return VmMetrics {
                state: self.state,
                boot_time_us: None,
                uptime_us: None,
                vcpu_exits: None,
                devices: serde_json::Map::new(),
            };
        };
        let mut devices = match vm.devices.device_metrics() {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        for (name, m) in &vm.legacy_metrics {
            devices.insert((*name).to_owned(), m.snapshot());
        }
        if vm.input.is_some() {
            let channel = self.input_channel.metrics().snapshot();
            devices.insert("input_socket".to_owned(), channel);
        }
        VmMetrics {
            state: self.state,
            boot_time_us: self.boot_time_us(),
            uptime_us: Some(self.vmm_start.elapsed().as_micros() as u64),
            vcpu_exits: Some(vm.counters.snapshot()),
            devices,
        }
    }
}

impl VmmController for Vmm {
    fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, ActionError> {
        self.state.check(&action)?;
        let response = match &action {
            VmmAction::Configure(config) => {
                config.validate()?;
                self.config = Some(config.clone());
                VmmResponse::Empty
            }
            VmmAction::UpdateConfig(update) => {
                self.config = Some(update.clone().apply(self.config.as_ref())?);
                VmmResponse::Empty
            }
            VmmAction::Start => {
                self.start_vm().map_err(|e| match e.exit_status() {
                    ExitStatus::BadConfig => ActionError::InvalidRequest(error_chain(&e)),
                    _ => ActionError::Internal(error_chain(&e)),
                })?;
                VmmResponse::Empty
            }
            VmmAction::Pause => {
                let vm = self.vm.as_ref().ok_or(ActionError::Unavailable)?;
                vm.vcpus
                    .pause(PAUSE_TIMEOUT)
                    .map_err(|e| ActionError::Internal(e.to_string()))?;
                VmmResponse::Empty
            }
            VmmAction::Resume => {
                let vm = self.vm.as_ref().ok_or(ActionError::Unavailable)?;
                vm.vcpus.resume();
                VmmResponse::Empty
            }
            VmmAction::Stop => {
                self.exit
                    .report(VmExit::new(ExitStatus::Ok, "stopped through the API"));
                VmmResponse::Empty
            }
            VmmAction::Describe => VmmResponse::Description(VmDescription {
                state: self.state,
                config: self.config.clone(),
                boot_time_us: self.boot_time_us(),
                uptime_us: self.vmm_start.elapsed().as_micros() as u64,
                sandbox: crate::sandbox::runtime::status(),
            }),
            VmmAction::Metrics => VmmResponse::Metrics(self.metrics()),
            VmmAction::InjectInput { device, events } => {
                self.input()?
                    .get(*device)
                    .inject(events)
                    .map_err(|e| ActionError::InvalidRequest(error_chain(&e)))?;
                VmmResponse::Empty
            }
            VmmAction::SetDisplaySize { width, height } => {
                self.display()?
                    .set_display_size(*width, *height)
                    .map_err(|e| ActionError::InvalidRequest(error_chain(&e)))?;
                VmmResponse::Empty
            }
            VmmAction::GetInputSocket => {
                let devices = self.input()?.clone();
                let fd = self
                    .input_channel
                    .handoff(&devices, &mut self.event_manager)
                    .map_err(|e| ActionError::Internal(error_chain(&e)))?;
                VmmResponse::InputSocket(fd)
            }
            VmmAction::CreateSnapshot(request) => {
                let (Some(vm), Some(config)) = (&self.vm, &self.config) else {
                    return Err(ActionError::Unavailable);
                };
                let started = Instant::now();
                crate::snapshot::create(vm, config, request).map_err(|e| {
                    use crate::snapshot::SnapshotError as E;
                    match e {
                        E::Invalid { .. } | E::File { .. } => {
                            ActionError::InvalidRequest(error_chain(&e))
                        }
                        _ => ActionError::Internal(error_chain(&e)),
                    }
                })?;
                tracing::info!(
                    "snapshot written to {} and {} in {} ms",
                    request.snapshot_path.display(),
                    request.mem_file_path.display(),
                    started.elapsed().as_millis()
                );
                VmmResponse::Empty
            }
            VmmAction::LoadSnapshot(load) => {
                self.restore_vm(load).map_err(|e| match e.is_user_error() {
                    true => ActionError::InvalidRequest(error_chain(&e)),
                    false => ActionError::Internal(error_chain(&e)),
                })?;
                VmmResponse::Empty
            }
            VmmAction::GetFramebuffer => {
                let fds = self
                    .display()?
                    .reader_fds()
                    .map_err(|e| ActionError::Internal(error_chain(&e)))?;
                VmmResponse::Framebuffer(FramebufferFds {
                    memfd: fds.memfd,
                    flush_eventfd: fds.notify,
                })
            }
        };
        self.state = self.state.after(&action);
        Ok(response)
    }
}

/// `e` and its sources on one line: "a: b: c".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
