//! The API's requests as values, and its answers decoded into types: transport-agnostic,
//! so that genos-vmm's router and any client agree on one list of paths, methods, bodies
//! and success statuses. A client renders a [`Request`] with [`Request::method`],
//! [`Request::path`] and [`Request::body`], sends it however it likes, and hands the status
//! and body back to [`Request::decode`] or [`Request::check`].

use std::fmt;

use serde::de::DeserializeOwned;

use crate::config::{ConfigPatch, DiskConfig, DisplaySize, VmConfig, VsockConfig};
use crate::input::InputBatch;
use crate::snapshot::{SnapshotCreate, SnapshotLoad};
use crate::vm::{ActionBody, ErrorBody, LifecycleAction};

/// The API's paths (`docs/vmm-api.md`).
pub mod paths {
    /// `GET`: [`crate::VmDescription`].
    pub const VM: &str = "/vm";
    /// `PUT` a [`crate::VmConfig`], `PATCH` a [`crate::ConfigPatch`].
    pub const VM_CONFIG: &str = "/vm/config";
    /// `PUT` a [`crate::ActionBody`].
    pub const VM_ACTIONS: &str = "/vm/actions";
    /// `PUT /vm/disks/{index}` a [`crate::DiskConfig`]: this prefix and the index.
    pub const VM_DISKS: &str = "/vm/disks/";
    /// `PUT` a [`crate::VsockConfig`] before start (Firecracker's `/vsock`).
    pub const VSOCK: &str = "/vsock";
    /// `GET`: [`crate::VmMetrics`].
    pub const METRICS: &str = "/metrics";
    /// `PUT` an [`crate::InputBatch`].
    pub const INPUT: &str = "/input";
    /// `PUT` a [`crate::DisplaySize`].
    pub const DISPLAY: &str = "/display";
    /// `GET`: [`crate::FramebufferHandoff`] and two descriptors.
    pub const FRAMEBUFFER: &str = "/framebuffer";
    /// `GET`: [`crate::input_socket::InputSocketHandoff`] and one descriptor.
    pub const INPUT_SOCKET: &str = crate::input_socket::PATH;
    /// `PUT` a [`crate::SnapshotCreate`] while paused.
    pub const SNAPSHOT_CREATE: &str = "/snapshot/create";
    /// `PUT` a [`crate::SnapshotLoad`] before any VM started.
    pub const SNAPSHOT_LOAD: &str = "/snapshot/load";
}

/// HTTP methods the API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Patch,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
        }
    }
}

/// One API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /vm`.
    Describe,
    /// `PUT /vm/config`.
    Configure(VmConfig),
    /// `PATCH /vm/config`.
    PatchConfig(ConfigPatch),
    /// `PUT /vm/disks/{index}`.
    PutDisk {
        /// Position in [`VmConfig::disks`] (the count appends).
        index: usize,
        /// The disk.
        disk: DiskConfig,
    },
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `PUT /vm/actions`.
    Action(LifecycleAction),
    /// `GET /metrics`.
    Metrics,
    /// `PUT /input`.
    Input(InputBatch),
    /// `PUT /display`.
    Display(DisplaySize),
    /// `GET /framebuffer`.
    Framebuffer,
    /// `GET /input/socket`.
    InputSocket,
    /// `PUT /snapshot/create`.
    SnapshotCreate(SnapshotCreate),
    /// `PUT /snapshot/load`.
    SnapshotLoad(SnapshotLoad),
}

impl Request {
    /// The request's method.
    pub fn method(&self) -> Method {
        match self {
            Self::Describe | Self::Metrics | Self::Framebuffer | Self::InputSocket => Method::Get,
            Self::PatchConfig(_) => Method::Patch,
            Self::Configure(_)
            | Self::PutDisk { .. }
            | Self::PutVsock(_)
            | Self::Action(_)
            | Self::Input(_)
            | Self::Display(_)
            | Self::SnapshotCreate(_)
            | Self::SnapshotLoad(_) => Method::Put,
        }
    }

    /// The request's path.
    pub fn path(&self) -> String {
        match self {
            Self::Describe => paths::VM.into(),
            Self::Configure(_) | Self::PatchConfig(_) => paths::VM_CONFIG.into(),
            Self::PutDisk { index, .. } => format!("{}{index}", paths::VM_DISKS),
            Self::PutVsock(_) => paths::VSOCK.into(),
            Self::Action(_) => paths::VM_ACTIONS.into(),
            Self::Metrics => paths::METRICS.into(),
            Self::Input(_) => paths::INPUT.into(),
            Self::Display(_) => paths::DISPLAY.into(),
            Self::Framebuffer => paths::FRAMEBUFFER.into(),
            Self::InputSocket => paths::INPUT_SOCKET.into(),
            Self::SnapshotCreate(_) => paths::SNAPSHOT_CREATE.into(),
            Self::SnapshotLoad(_) => paths::SNAPSHOT_LOAD.into(),
        }
    }

    /// The JSON body, for the requests that have one.
    pub fn body(&self) -> Option<Vec<u8>> {
        let json = match self {
            Self::Describe | Self::Metrics | Self::Framebuffer | Self::InputSocket => return None,
            Self::Configure(config) => serde_json::to_vec(config),
            Self::PatchConfig(patch) => serde_json::to_vec(patch),
            Self::PutDisk { disk, .. } => serde_json::to_vec(disk),
            Self::PutVsock(vsock) => serde_json::to_vec(vsock),
            Self::Action(action) => serde_json::to_vec(&ActionBody { action: *action }),
            Self::Input(batch) => serde_json::to_vec(batch),
            Self::Display(size) => serde_json::to_vec(size),
            Self::SnapshotCreate(create) => serde_json::to_vec(create),
            Self::SnapshotLoad(load) => serde_json::to_vec(load),
        };
        // Plain structs with string keys: serialising them cannot fail.
        Some(json.expect("API bodies serialise"))
    }

    /// The status a successful answer has: 200 with a body for `GET`, 204 otherwise.
    pub fn success_status(&self) -> u16 {
        match self.method() {
            Method::Get => 200,
            Method::Put | Method::Patch => 204,
        }
    }

    /// Checks that `status` is the success status; otherwise the VMM's reason from `body`.
    pub fn check(&self, status: u16, body: &[u8]) -> Result<(), ResponseError> {
        if status == self.success_status() {
            return Ok(());
        }
        let reason = serde_json::from_slice::<ErrorBody>(body)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        Err(ResponseError::Refused {
            request: self.to_string(),
            status,
            reason,
        })
    }

    /// [`Request::check`], then the body as `T`: [`crate::VmDescription`] for
    /// [`Request::Describe`], [`crate::VmMetrics`] for [`Request::Metrics`],
    /// [`crate::FramebufferHandoff`] for [`Request::Framebuffer`],
    /// [`crate::input_socket::InputSocketHandoff`] for [`Request::InputSocket`].
    pub fn decode<T: DeserializeOwned>(
        &self,
        status: u16,
        body: &[u8],
    ) -> Result<T, ResponseError> {
        self.check(status, body)?;
        serde_json::from_slice(body).map_err(|source| ResponseError::Body {
            request: self.to_string(),
            source,
        })
    }
}

impl fmt::Display for Request {
    /// `METHOD PATH`, for messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method().as_str(), self.path())
    }
}

/// Why an answer is not the success the request expects.
#[derive(Debug, thiserror::Error)]
pub enum ResponseError {
    /// The VMM answered with another status; `reason` is its `{"error": ...}`.
    #[error("VMM answered {request} with {status}: {reason}")]
    Refused {
        /// `METHOD PATH`.
        request: String,
        /// The status it answered with.
        status: u16,
        /// Its reason.
        reason: String,
    },
    /// The success body is not the type the request answers with.
    #[error("VMM's answer to {request} is not what the API defines")]
    Body {
        /// `METHOD PATH`.
        request: String,
        /// What does not parse.
        #[source]
        source: serde_json::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::input::{InputDevice, InputEvent};
    use crate::vm::VmDescription;

    #[test]
    fn each_request_has_its_method_path_and_success_status() {
        let cases = [
            (Request::Describe, "GET /vm", 200),
            (
                Request::Configure(VmConfig::new("/k")),
                "PUT /vm/config",
                204,
            ),
            (
                Request::PatchConfig(ConfigPatch::default()),
                "PATCH /vm/config",
                204,
            ),
            (
                Request::PutDisk {
                    index: 2,
                    disk: DiskConfig {
                        path: "/d".into(),
                        read_only: true,
                    },
                },
                "PUT /vm/disks/2",
                204,
            ),
            (
                Request::PutVsock(VsockConfig {
                    guest_cid: 3,
                    uds_path: "/run/v.sock".into(),
                }),
                "PUT /vsock",
                204,
            ),
            (
                Request::Action(LifecycleAction::Start),
                "PUT /vm/actions",
                204,
            ),
            (Request::Metrics, "GET /metrics", 200),
            (
                Request::Input(InputBatch {
                    device: InputDevice::Keyboard,
                    events: vec![InputEvent::SYN_REPORT],
                }),
                "PUT /input",
                204,
            ),
            (
                Request::Display(DisplaySize {
                    width: 800,
                    height: 600,
                }),
                "PUT /display",
                204,
            ),
            (Request::Framebuffer, "GET /framebuffer", 200),
            (Request::InputSocket, "GET /input/socket", 200),
            (
                Request::SnapshotCreate(SnapshotCreate {
                    snapshot_path: "/s".into(),
                    mem_file_path: "/m".into(),
                }),
                "PUT /snapshot/create",
                204,
            ),
            (
                Request::SnapshotLoad(SnapshotLoad::new("/s", "/m")),
                "PUT /snapshot/load",
                204,
            ),
        ];
        for (request, line, status) in cases {
            assert_eq!(request.to_string(), line);
            assert_eq!(request.success_status(), status, "{line}");
            assert_eq!(
                request.body().is_some(),
                request.method() != Method::Get,
                "{line}"
            );
        }
    }

    #[test]
    fn bodies_are_the_types_the_vmm_parses() {
        let config = VmConfig::new("/k");
        let action = Request::Action(LifecycleAction::Stop).body().unwrap();
        let configure = Request::Configure(config.clone()).body().unwrap();

        assert_eq!(action, br#"{"action":"stop"}"#);
        assert_eq!(VmConfig::from_json(&configure, "body").unwrap(), config);
    }

    #[test]
    fn a_refusal_carries_the_vmms_reason() {
        let err = Request::Describe
            .decode::<VmDescription>(409, br#"{"error":"cannot start while the VM is stopped"}"#)
            .unwrap_err();
        let raw = Request::Metrics.check(500, b"oops").unwrap_err();

        assert_eq!(
            err.to_string(),
            "VMM answered GET /vm with 409: cannot start while the VM is stopped"
        );
        assert_eq!(raw.to_string(), "VMM answered GET /metrics with 500: oops");
    }

    #[test]
    fn a_success_body_of_the_wrong_shape_is_an_error() {
        let err = Request::Describe
            .decode::<VmDescription>(200, br#"{"state":"idle"}"#)
            .unwrap_err();

        assert!(matches!(err, ResponseError::Body { .. }), "{err:?}");
    }
}
