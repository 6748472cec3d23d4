//! Requests from the control API to the VMM's main thread, and their answers.
//!
//! The API server thread turns each HTTP request into a [`VmmAction`] and calls
//! [`ApiSender::call`]: the action and a reply channel go over an mpsc channel and an
//! [`EventFd`] is signalled. The main thread registers [`ApiReceiver::event_fd`] in its
//! event loop; when it fires it calls [`ApiReceiver::drain`] (or
//! [`ApiReceiver::drain_into`] with its [`VmmController`]), which runs every queued action
//! and sends each result back. The lifecycle rules (what is allowed in which
//! [`VmState`]) live in [`Lifecycle::check`] so that every controller enforces the same
//! state machine: `not-configured → configured → running ⇄ paused → stopped`.
//!
//! The wire types (input events and devices, [`VmState`], [`VmDescription`],
//! [`VmMetrics`]) are the `genos-vmm-api` crate's, re-exported here under their old paths.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{ConfigError, ConfigPatch, DiskConfig, DisplaySize, VmConfig, VsockConfig};

pub use vmm_api::input::{EV_SYN, SYN_REPORT};
pub use vmm_api::{InputDevice, InputEvent, VmDescription, VmMetrics, VmState, MAX_INPUT_BATCH};

/// Checks that an input batch is non-empty, not too long and ends with `SYN_REPORT`.
pub fn validate_input_batch(events: &[InputEvent]) -> Result<(), ActionError> {
    vmm_api::input::validate_events(events).map_err(|e| ActionError::InvalidRequest(e.to_string()))
}

/// A change to the pending configuration, from the API's partial endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigUpdate {
    /// `PATCH /vm/config`: replace the fields the patch names.
    Patch(ConfigPatch),
    /// `PUT /vm/disks/{index}`: replace disk `index`, or append when it equals the count.
    Disk {
        /// Position in [`VmConfig::disks`].
        index: usize,
        /// The disk.
        disk: DiskConfig,
    },
    /// `PUT /vsock`: set or replace the vsock device.
    Vsock(VsockConfig),
}

impl ConfigUpdate {
    /// Applies the update to the current configuration (if any) and validates the result,
    /// files included. The controller stores the returned configuration.
    pub fn apply(self, current: Option<&VmConfig>) -> Result<VmConfig, ActionError> {
        let config = match self {
            Self::Patch(patch) => patch.apply(current)?,
            Self::Disk { index, disk } => {
                let base = current.ok_or(ActionError::InvalidState {
                    action: "configure a disk",
                    state: VmState::NotConfigured,
                })?;
                crate::config::put_disk(base, index, disk)?
            }
            Self::Vsock(vsock) => {
                let base = current.ok_or(ActionError::InvalidState {
                    action: "configure vsock",
                    state: VmState::NotConfigured,
                })?;
                crate::config::put_vsock(base, vsock)?
            }
        };
        config.validate()?;
        Ok(config)
    }
}

/// What the control API asks the VMM to do.
#[derive(Debug, PartialEq, Eq)]
pub enum VmmAction {
    /// `PUT /vm/config`: set the whole configuration (values already validated by the API
    /// thread; the controller checks the files, as the API thread may open none). Allowed
    /// before start only.
    Configure(VmConfig),
    /// `PATCH /vm/config`, `PUT /vm/disks/{index}`: change part of the configuration.
    /// The controller calls [`ConfigUpdate::apply`] with its current configuration.
    UpdateConfig(ConfigUpdate),
    /// Build the VM from the configuration and run it.
    Start,
    /// Stop running the vCPUs; devices keep their state.
    Pause,
    /// Continue after [`VmmAction::Pause`].
    Resume,
    /// End the VM; the process exits with status 0 once the reply is sent.
    Stop,
    /// `GET /vm`: state, configuration, boot time.
    Describe,
    /// `GET /metrics`.
    Metrics,
    /// `PUT /input`: queue a batch of events on one input device (already validated with
    /// [`validate_input_batch`]).
    InjectInput {
        /// Target device.
        device: InputDevice,
        /// Events, ending with `SYN_REPORT`.
        events: Vec<InputEvent>,
    },
    /// `PUT /display`: ask the guest to switch resolution (virtio-gpu display-changed event).
    SetDisplaySize {
        /// Width in pixels (validated against the config limits).
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// `GET /framebuffer`: the shared framebuffer memfd and flush eventfd.
    GetFramebuffer,
    /// `GET /input/socket`: a new raw input channel (replacing the previous one).
    GetInputSocket,
    /// `PUT /snapshot/create`: write the paused VM's state and memory files.
    CreateSnapshot(vmm_api::SnapshotCreate),
    /// `PUT /snapshot/load`: build the VM from a snapshot (before any VM started).
    LoadSnapshot(vmm_api::SnapshotLoad),
}

impl VmmAction {
    /// Short name of the action for messages ("start", "inject input", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Configure(_) | Self::UpdateConfig(_) => "configure",
            Self::Start => "start",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Stop => "stop",
            Self::Describe => "describe",
            Self::Metrics => "read metrics",
            Self::InjectInput { .. } => "inject input",
            Self::SetDisplaySize { .. } => "resize the display",
            Self::GetFramebuffer => "get the framebuffer",
            Self::GetInputSocket => "get the input socket",
            Self::CreateSnapshot(_) => "create a snapshot",
            Self::LoadSnapshot(_) => "load a snapshot",
        }
    }
}

/// The lifecycle rules: which [`VmmAction`] each [`VmState`] allows, and the state after
/// it. A trait because [`VmState`] is the API crate's; import it to call `state.check(..)`.
pub trait Lifecycle: Sized {
    /// Checks whether `action` is allowed in this state; controllers call this first.
    /// Errors are [`ActionError::InvalidState`] (HTTP 409).
    fn check(self, action: &VmmAction) -> Result<(), ActionError>;
    /// The state after `action` succeeded in this state.
    fn after(self, action: &VmmAction) -> Self;
}

impl Lifecycle for VmState {
    fn check(self, action: &VmmAction) -> Result<(), ActionError> {
        use VmState::*;
        let allowed = match action {
            VmmAction::Describe | VmmAction::Metrics => true,
            VmmAction::Configure(_) | VmmAction::UpdateConfig(_) => {
                matches!(self, NotConfigured | Configured)
            }
            VmmAction::Start => self == Configured,
            VmmAction::Pause => self == Running,
            VmmAction::Resume => self == Paused,
            VmmAction::Stop => self != Stopped,
            VmmAction::InjectInput { .. }
            | VmmAction::SetDisplaySize { .. }
            | VmmAction::GetFramebuffer
            | VmmAction::GetInputSocket => matches!(self, Running | Paused),
            VmmAction::CreateSnapshot(_) => self == Paused,
            VmmAction::LoadSnapshot(_) => matches!(self, NotConfigured | Configured),
        };
        if allowed {
            Ok(())
        } else {
            Err(ActionError::InvalidState {
                action: action.name(),
                state: self,
            })
        }
    }

    fn after(self, action: &VmmAction) -> VmState {
        match action {
            VmmAction::Configure(_) | VmmAction::UpdateConfig(_) => VmState::Configured,
            VmmAction::Start | VmmAction::Resume => VmState::Running,
            VmmAction::Pause => VmState::Paused,
            VmmAction::Stop => VmState::Stopped,
            VmmAction::LoadSnapshot(load) if load.resume_vm => VmState::Running,
            VmmAction::LoadSnapshot(_) => VmState::Paused,
            _ => self,
        }
    }
}

/// The framebuffer file descriptors `GET /framebuffer` passes to the client.
#[derive(Debug)]
pub struct FramebufferFds {
    /// Shared framebuffer memfd (layout in `docs/framebuffer.md`); the client maps it read-only.
    pub memfd: OwnedFd,
    /// Eventfd the VMM signals after every flush.
    pub flush_eventfd: OwnedFd,
}

impl FramebufferFds {
    /// Duplicates (close-on-exec) the VMM's framebuffer memfd and flush eventfd for one
    /// `GET /framebuffer` answer; the VMM keeps its own descriptors.
    pub fn duplicate(memfd: &impl AsRawFd, flush_eventfd: &impl AsRawFd) -> std::io::Result<Self> {
        Ok(Self {
            memfd: dup_cloexec(memfd.as_raw_fd())?,
            flush_eventfd: dup_cloexec(flush_eventfd.as_raw_fd())?,
        })
    }
}

fn dup_cloexec(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor number; an invalid one yields EBADF.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a freshly duplicated descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// A successful answer to a [`VmmAction`].
#[derive(Debug)]
pub enum VmmResponse {
    /// Done; nothing to return (HTTP 204).
    Empty,
    /// Answer to [`VmmAction::Describe`].
    Description(VmDescription),
    /// Answer to [`VmmAction::Metrics`]: exits by kind, device counters.
    Metrics(VmMetrics),
    /// Answer to [`VmmAction::GetFramebuffer`]: descriptors owned by the response (the
    /// controller passes duplicates; the server closes them after sending).
    Framebuffer(FramebufferFds),
    /// Answer to [`VmmAction::GetInputSocket`]: the client's end of the new channel.
    InputSocket(OwnedFd),
}

/// Why an action failed. Each maps to an HTTP status ([`ActionError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    /// The request is well-formed but its content is not acceptable (400).
    #[error("{0}")]
    InvalidRequest(String),
    /// The configuration is invalid (400).
    #[error(transparent)]
    InvalidConfig(#[from] ConfigError),
    /// The action is not allowed in the VM's current state (409).
    #[error("cannot {action} while the VM is {state}")]
    InvalidState {
        /// What was asked ([`VmmAction::name`]).
        action: &'static str,
        /// The state the VM is in.
        state: VmState,
    },
    /// The VM has no such device, e.g. input without `--input` (404).
    #[error("{0}")]
    NoSuchDevice(String),
    /// The VMM failed doing something it should be able to do (500).
    #[error("{0}")]
    Internal(String),
    /// The VMM's main thread is gone or shutting down (503).
    #[error("the VMM is shutting down")]
    Unavailable,
}

impl ActionError {
    /// HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::InvalidRequest(_) | Self::InvalidConfig(_) => 400,
            Self::NoSuchDevice(_) => 404,
            Self::InvalidState { .. } => 409,
            Self::Internal(_) => 500,
            Self::Unavailable => 503,
        }
    }
}

/// The VMM side of the control API; implemented by vmm-core's `Vmm`.
pub trait VmmController {
    /// Runs one action on the main thread. Implementations start with
    /// `self.state.check(&action)?` and set `state = state.after(&action)` on success.
    fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, ActionError>;
}

/// Result of one action, as sent back to the API thread.
pub type ActionResult = Result<VmmResponse, ActionError>;

struct ApiRequest {
    action: VmmAction,
    reply: mpsc::SyncSender<ActionResult>,
}

/// Counts replies handed to the API thread and responses it has written, so that the main
/// thread can let the answer to `stop` reach the client before the process exits.
#[derive(Default)]
struct Delivery {
    written: Mutex<u64>,
    cond: Condvar,
    replied: AtomicU64,
}

/// API-thread end of the channel.
pub struct ApiSender {
    requests: mpsc::Sender<ApiRequest>,
    wake: EventFd,
    delivery: Arc<Delivery>,
}

/// Main-thread end of the channel.
pub struct ApiReceiver {
    requests: mpsc::Receiver<ApiRequest>,
    wake: EventFd,
    delivery: Arc<Delivery>,
}

/// Creates a connected sender/receiver pair sharing one non-blocking eventfd.
pub fn channel() -> std::io::Result<(ApiSender, ApiReceiver)> {
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let (tx, rx) = mpsc::channel();
    let delivery = Arc::new(Delivery::default());
    Ok((
        ApiSender {
            requests: tx,
            wake: wake.try_clone()?,
            delivery: delivery.clone(),
        },
        ApiReceiver {
            requests: rx,
            wake,
            delivery,
        },
    ))
}

impl ApiSender {
    /// Sends `action` to the main thread, wakes its event loop and waits for the answer.
    /// Returns [`ActionError::Unavailable`] when the main thread has dropped its receiver.
    pub fn call(&self, action: VmmAction) -> ActionResult {
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(ApiRequest { action, reply })
            .map_err(|_| ActionError::Unavailable)?;
        self.wake
            .write(1)
            .map_err(|e| ActionError::Internal(format!("cannot wake the VMM: {e}")))?;
        answer.recv().unwrap_or(Err(ActionError::Unavailable))
    }

    /// Records that the response to one [`ApiSender::call`] was written (or its
    /// connection dropped). The server calls this once per answered call.
    pub fn response_sent(&self) {
        let mut written = self
            .delivery
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *written += 1;
        self.delivery.cond.notify_all();
    }
}

impl ApiReceiver {
    /// The eventfd to register (readable) in the main thread's event loop.
    pub fn event_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Raw form of [`ApiReceiver::event_fd`].
    pub fn as_raw_fd(&self) -> RawFd {
        self.wake.as_raw_fd()
    }

    /// Clears the eventfd, then runs `handle` on every queued action and sends each result
    /// back. Never blocks. Returns the number of actions handled.
    pub fn drain(&self, mut handle: impl FnMut(VmmAction) -> ActionResult) -> usize {
        // EAGAIN just means another drain already consumed the wake-up.
        let _ = self.wake.read();
        let mut handled = 0;
        while let Ok(ApiRequest { action, reply }) = self.requests.try_recv() {
            let result = handle(action);
            self.delivery.replied.fetch_add(1, Ordering::SeqCst);
            // A send error means the API thread is gone; nobody is left to tell.
            let _ = reply.send(result);
            handled += 1;
        }
        handled
    }

    /// [`ApiReceiver::drain`] with a [`VmmController`].
    pub fn drain_into<C: VmmController + ?Sized>(&self, controller: &mut C) -> usize {
        self.drain(|action| controller.handle(action))
    }

    /// Waits until the API thread has written every reply sent so far (e.g. the answer to
    /// `stop`, before the process exits), or `timeout` passes. Returns whether it did.
    pub fn wait_responses_sent(&self, timeout: Duration) -> bool {
        let target = self.delivery.replied.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut written = self
            .delivery
            .written
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while *written < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            written = match self.delivery.cond.wait_timeout(written, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// Checks a display size request against the configuration limits.
pub fn validate_display_size(width: u32, height: u32) -> Result<(), ActionError> {
    DisplaySize { width, height }.validate()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn syn() -> InputEvent {
        InputEvent {
            ty: 0,
            code: 0,
            value: 0,
        }
    }

    #[test]
    fn input_batch_must_end_with_syn_report() {
        let key = InputEvent {
            ty: 1,
            code: 30,
            value: 1,
        };
        assert!(validate_input_batch(&[key, syn()]).is_ok());
        assert!(validate_input_batch(&[]).is_err());
        let err = validate_input_batch(&[syn(), key]).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("SYN_REPORT"));
        let long = vec![syn(); MAX_INPUT_BATCH + 1];
        assert!(validate_input_batch(&long).is_err());
    }

    #[test]
    fn state_machine_allows_the_documented_order() {
        let mut state = VmState::NotConfigured;
        let steps = [
            VmmAction::Configure(VmConfig::new("/k")),
            VmmAction::Start,
            VmmAction::Pause,
            VmmAction::Resume,
            VmmAction::Stop,
        ];
        for action in &steps {
            state.check(action).unwrap();
            state = state.after(action);
        }
        assert_eq!(state, VmState::Stopped);
    }

    #[test]
    fn state_machine_rejects_out_of_order_actions_with_409() {
        let cases = [
            (VmState::NotConfigured, VmmAction::Start),
            (VmState::Configured, VmmAction::Pause),
            (VmState::Configured, VmmAction::Resume),
            (VmState::Running, VmmAction::Configure(VmConfig::new("/k"))),
            (VmState::Running, VmmAction::Start),
            (VmState::Running, VmmAction::Resume),
            (VmState::Paused, VmmAction::Pause),
            (VmState::Stopped, VmmAction::Stop),
            (VmState::Configured, VmmAction::GetFramebuffer),
            (VmState::Stopped, VmmAction::GetInputSocket),
            (
                VmState::Running,
                VmmAction::CreateSnapshot(vmm_api::SnapshotCreate {
                    snapshot_path: "/s".into(),
                    mem_file_path: "/m".into(),
                }),
            ),
            (
                VmState::Paused,
                VmmAction::LoadSnapshot(vmm_api::SnapshotLoad::new("/s", "/m")),
            ),
            (
                VmState::NotConfigured,
                VmmAction::InjectInput {
                    device: InputDevice::Keyboard,
                    events: vec![syn()],
                },
            ),
        ];
        for (state, action) in cases {
            let err = state.check(&action).unwrap_err();
            assert_eq!(err.status(), 409, "{state:?} {action:?}");
        }
        let err = VmState::NotConfigured.check(&VmmAction::Start).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot start while the VM is not configured"
        );
    }

    #[test]
    fn describe_and_metrics_are_always_allowed() {
        for state in [
            VmState::NotConfigured,
            VmState::Configured,
            VmState::Running,
            VmState::Paused,
            VmState::Stopped,
        ] {
            assert!(state.check(&VmmAction::Describe).is_ok());
            assert!(state.check(&VmmAction::Metrics).is_ok());
        }
    }

    #[test]
    fn disk_update_without_configuration_is_409() {
        let update = ConfigUpdate::Disk {
            index: 0,
            disk: DiskConfig {
                path: "/d".into(),
                read_only: true,
            },
        };
        assert_eq!(update.apply(None).unwrap_err().status(), 409);
    }

    #[test]
    fn call_is_answered_by_drain_on_another_thread() {
        let (sender, receiver) = channel().unwrap();
        let main = thread::spawn(move || {
            let mut handled = 0;
            while handled == 0 {
                handled = receiver.drain(|action| {
                    assert_eq!(action, VmmAction::Pause);
                    Err(ActionError::Internal("boom".into()))
                });
                thread::yield_now();
            }
            receiver
        });
        let err = sender.call(VmmAction::Pause).unwrap_err();
        assert_eq!(err.status(), 500);
        let receiver = main.join().unwrap();
        sender.response_sent();
        assert!(receiver.wait_responses_sent(Duration::from_millis(0)));
    }

    #[test]
    fn call_after_receiver_dropped_is_unavailable() {
        let (sender, receiver) = channel().unwrap();
        drop(receiver);
        assert!(matches!(
            sender.call(VmmAction::Start),
            Err(ActionError::Unavailable)
        ));
    }

    #[test]
    fn wait_responses_sent_times_out_when_a_reply_is_not_written() {
        let (sender, receiver) = channel().unwrap();
        let caller = thread::spawn(move || {
            let _ = sender.call(VmmAction::Stop);
        });
        while receiver.drain(|_| Ok(VmmResponse::Empty)) == 0 {
            thread::yield_now();
        }
        caller.join().unwrap();
        assert!(!receiver.wait_responses_sent(Duration::from_millis(10)));
    }
}
