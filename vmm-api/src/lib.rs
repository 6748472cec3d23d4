//! genos-vmm's control API contract, shared by the VMM (which serves it) and hostd (which
//! calls it): the VM configuration ([`config`]), input devices and events ([`input`]), the
//! VM's state, description, metrics, framebuffer hand-off and error body ([`vm`]), and the
//! requests with their paths and typed answers ([`request`]). No KVM, no I/O: types, their
//! serde shape and their validation. `docs/vmm-api.md` describes the wire.

pub mod config;
pub mod input;
pub mod input_socket;
pub mod request;
pub mod snapshot;
pub mod vm;
pub mod vsock_handshake;

pub use config::{
    ConfigError, ConfigPatch, CpuTemplate, DiskConfig, DisplaySize, MacAddr, NetConfig,
    SerialConfig, VmConfig, VsockConfig,
};
pub use input::{InputBatch, InputBatchError, InputDevice, InputEvent, MAX_INPUT_BATCH};
pub use request::{paths, Method, Request, ResponseError};
pub use snapshot::{SnapshotCreate, SnapshotLoad};
pub use vm::{
    ActionBody, ErrorBody, FramebufferFd, FramebufferHandoff, LandlockStatus, LifecycleAction,
    SandboxStatus, SeccompMode, SeccompModeError, VmDescription, VmMetrics, VmState,
};
