//! The VM as the API reports and drives it: lifecycle state and actions, `GET /vm`'s
//! description (with the sandbox status), `GET /metrics`' body, `GET /framebuffer`'s
//! hand-off and the error body every 4xx/5xx answer carries.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;

/// Lifecycle state of the VM: `not-configured → configured → running ⇄ paused → stopped`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    /// Started with only `--api-sock`: waiting for a configuration.
    NotConfigured,
    /// Has a configuration; not started.
    Configured,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
    /// Stopped (the process is about to exit).
    Stopped,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotConfigured => "not configured",
            Self::Configured => "configured",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
        })
    }
}

/// `PUT /vm/actions` `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifecycleAction {
    /// Build the VM from the configuration and run it.
    Start,
    /// Stop running the vCPUs; devices keep their state.
    Pause,
    /// Continue after a pause.
    Resume,
    /// End the VM; the VMM exits once the answer is sent.
    Stop,
}

/// `PUT /vm/actions` body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionBody {
    /// What to do.
    pub action: LifecycleAction,
}

/// What the seccomp filters do with a system call off their lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// Kill the process (production).
    #[default]
    Kill,
    /// Allow the call and log it to the kernel log (developing the lists).
    Log,
    /// Install no filter (debugging only).
    Off,
}

/// A seccomp mode name that is not `kill`, `log` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown seccomp mode {0:?}: expected kill, log or off")]
pub struct SeccompModeError(String);

impl FromStr for SeccompMode {
    type Err = SeccompModeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "kill" => Ok(Self::Kill),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(SeccompModeError(s.to_owned())),
        }
    }
}

impl fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kill => "kill",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// How much of the requested Landlock restriction the running kernel enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LandlockStatus {
    /// Every requested restriction is in force.
    Enforced,
    /// The kernel's Landlock ABI enforces only part of it.
    Partially,
    /// Landlock is unavailable (kernel too old or disabled).
    NotSupported,
    /// The VMM was started without Landlock.
    Disabled,
}

impl fmt::Display for LandlockStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LandlockStatus::Enforced => "enforced",
            LandlockStatus::Partially => "partially enforced",
            LandlockStatus::NotSupported => "not supported",
            LandlockStatus::Disabled => "disabled",
        })
    }
}

/// What `GET /vm` reports about the sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxStatus {
    /// The seccomp filters' mode.
    pub seccomp: SeccompMode,
    /// Landlock's status; `None` until the VM is built (it is applied then).
    pub landlock: Option<LandlockStatus>,
}

/// What `GET /vm` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDescription {
    /// Lifecycle state.
    pub state: VmState,
    /// The configuration, once there is one.
    pub config: Option<VmConfig>,
    /// Microseconds from VMM process start to the guest's boot-timer write, once it happened.
    pub boot_time_us: Option<u64>,
    /// Microseconds since the VMM process started.
    pub uptime_us: u64,
    /// seccomp mode and Landlock status; `None` when the VMM runs unsandboxed (in-process).
    #[serde(default)]
    pub sandbox: Option<SandboxStatus>,
}

/// What `GET /metrics` returns. The counters' names are each device's own (see
/// `docs/vmm-api.md`), so they stay JSON objects here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmMetrics {
    /// Lifecycle state.
    pub state: VmState,
    /// As in [`VmDescription::boot_time_us`]; `None` before the VM is built, too.
    #[serde(default)]
    pub boot_time_us: Option<u64>,
    /// Microseconds since the VMM process started; `None` before the VM is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_us: Option<u64>,
    /// vCPU exits by kind (`io_in`, `mmio_read`, `hlt`, ...); `None` before the VM is built.
    pub vcpu_exits: Option<serde_json::Value>,
    /// Each device's counters, by device name (`blk0`, `net0`, `keyboard`, `serial`, ...).
    #[serde(default)]
    pub devices: serde_json::Map<String, serde_json::Value>,
}

/// One descriptor `GET /framebuffer` passes (SCM_RIGHTS), in [`FramebufferHandoff::fds`]
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FramebufferFd {
    /// The shared framebuffer memfd (layout in `docs/framebuffer.md`); map it read-only.
    Memfd,
    /// The eventfd the VMM signals after every flush.
    FlushEventfd,
}

/// Body of a `GET /framebuffer` answer; the descriptors themselves travel in one
/// `SCM_RIGHTS` control message with the response's first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FramebufferHandoff {
    /// Size of the memfd in bytes.
    pub memfd_size: u64,
    /// What each passed descriptor is, in the order they are passed.
    pub fds: [FramebufferFd; 2],
}

impl FramebufferHandoff {
    /// The order the VMM passes the descriptors in.
    pub const FD_ORDER: [FramebufferFd; 2] = [FramebufferFd::Memfd, FramebufferFd::FlushEventfd];

    /// The hand-off of a memfd of `memfd_size` bytes.
    pub fn new(memfd_size: u64) -> Self {
        Self {
            memfd_size,
            fds: Self::FD_ORDER,
        }
    }
}

/// Body of every error answer: `{"error": "one-line reason"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The reason, one line.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn description_round_trips_with_kebab_case_state() {
        let description = VmDescription {
            state: VmState::NotConfigured,
            config: Some(VmConfig::new("/k")),
            boot_time_us: None,
            uptime_us: 7,
            sandbox: Some(SandboxStatus {
                seccomp: SeccompMode::Log,
                landlock: Some(LandlockStatus::NotSupported),
            }),
        };

        let json = serde_json::to_value(&description).unwrap();

        assert_eq!(json["state"], "not-configured");
        assert_eq!(json["sandbox"]["landlock"], "not_supported");
        assert_eq!(
            serde_json::from_value::<VmDescription>(json).unwrap(),
            description
        );
    }

    #[test]
    fn action_body_refuses_unknown_actions_and_fields() {
        let start: ActionBody = serde_json::from_str(r#"{"action":"start"}"#).unwrap();

        assert_eq!(start.action, LifecycleAction::Start);
        assert!(serde_json::from_str::<ActionBody>(r#"{"action":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<ActionBody>(r#"{"action":"stop","now":true}"#).is_err());
    }

    #[test]
    fn seccomp_mode_names_parse_and_print_alike() {
        for mode in [SeccompMode::Kill, SeccompMode::Log, SeccompMode::Off] {
            assert_eq!(mode.to_string().parse::<SeccompMode>(), Ok(mode));
        }
        assert_eq!(
            "warn".parse::<SeccompMode>().unwrap_err().to_string(),
            "unknown seccomp mode \"warn\": expected kill, log or off"
        );
    }

    #[test]
    fn framebuffer_handoff_names_the_descriptor_order() {
        let json = serde_json::to_string(&FramebufferHandoff::new(4096)).unwrap();

        assert_eq!(
            json,
            r#"{"memfd_size":4096,"fds":["memfd","flush_eventfd"]}"#
        );
        assert_eq!(
            serde_json::from_str::<FramebufferHandoff>(&json)
                .unwrap()
                .fds,
            FramebufferHandoff::FD_ORDER
        );
    }

    #[test]
    fn metrics_before_the_vm_is_built_parse() {
        let json = r#"{"state":"configured","vcpu_exits":null,"devices":{}}"#;

        let metrics: VmMetrics = serde_json::from_str(json).unwrap();

        assert_eq!(metrics.state, VmState::Configured);
        assert_eq!((metrics.boot_time_us, metrics.uptime_us), (None, None));
        assert!(metrics.vcpu_exits.is_none() && metrics.devices.is_empty());
    }
}
