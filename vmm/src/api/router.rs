//! Maps a parsed HTTP request (method, path, JSON body) to a [`VmmAction`].
//!
//! Everything that can be checked without the VM is checked here and answered with a 4xx
//! and a one-line reason: unknown paths (404), wrong methods (405, with `Allow`), missing
//! `Content-Length` on requests that need a body (411), malformed or mistyped JSON and
//! invalid values (400). Ordering rules need the VM's state and are enforced by the
//! controller through [`crate::rpc::Lifecycle::check`] (409). Paths and bodies are the
//! [`vmm_api`] contract's.

use serde::Deserialize;
use vmm_api::{paths, ActionBody, InputBatch, LifecycleAction, SnapshotCreate, SnapshotLoad};

use super::http::{Method, Request};
use crate::config::{ConfigPatch, DiskConfig, DisplaySize, VmConfig, VsockConfig};
use crate::rpc::{validate_display_size, validate_input_batch, ConfigUpdate, VmmAction};

/// A request the router refuses, with its HTTP status and reason.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RouteError {
    /// HTTP status (4xx).
    pub status: u16,
    /// One-line reason, sent as `{"error": reason}`.
    pub reason: String,
    /// Methods the path accepts (for 405).
    pub allow: Option<&'static str>,
}

impl RouteError {
    fn new(status: u16, reason: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.into(),
            allow: None,
        }
    }

    fn bad_request(reason: impl Into<String>) -> Self {
        Self::new(400, reason)
    }
}

/// The body of a request that must have one (411 without `Content-Length`, 400 if empty).
fn require_body(req: &Request) -> Result<&[u8], RouteError> {
    if !req.has_content_length {
        return Err(RouteError::new(
            411,
            "a JSON body with Content-Length is required",
        ));
    }
    if req.body.is_empty() {
        return Err(RouteError::bad_request("a JSON body is required"));
    }
    Ok(&req.body)
}

/// Parses a JSON body, turning serde's message into a one-line 400.
fn json_body<'a, T: Deserialize<'a>>(req: &'a Request) -> Result<T, RouteError> {
    serde_json::from_slice(require_body(req)?)
        .map_err(|e| RouteError::bad_request(format!("invalid JSON body: {e}")))
}

/// Refuses empty paths, naming the field.
fn require_paths(fields: &[(&str, &std::path::Path)]) -> Result<(), RouteError> {
    match fields.iter().find(|(_, p)| p.as_os_str().is_empty()) {
        Some((name, _)) => Err(RouteError::bad_request(format!("{name} is empty"))),
        None => Ok(()),
    }
}

/// The endpoints and the methods each accepts.
enum Endpoint {
    Vm,
    Config,
    Disk(usize),
    Vsock,
    Actions,
    Metrics,
    Input,
    Display,
    Framebuffer,
    InputSocket,
    SnapshotCreate,
    SnapshotLoad,
}

impl Endpoint {
    fn from_path(path: &str) -> Result<Self, RouteError> {
        let trimmed = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        Ok(match trimmed {
            paths::VM => Self::Vm,
            paths::VM_CONFIG => Self::Config,
            paths::VM_ACTIONS => Self::Actions,
            paths::METRICS => Self::Metrics,
            paths::INPUT => Self::Input,
            paths::DISPLAY => Self::Display,
            paths::FRAMEBUFFER => Self::Framebuffer,
            paths::INPUT_SOCKET => Self::InputSocket,
            paths::VSOCK => Self::Vsock,
            paths::SNAPSHOT_CREATE => Self::SnapshotCreate,
            paths::SNAPSHOT_LOAD => Self::SnapshotLoad,
            _ => match trimmed.strip_prefix(paths::VM_DISKS) {
                Some(index) if !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()) => {
                    Self::Disk(index.parse().map_err(|_| {
                        RouteError::bad_request(format!("disk index {index} is too large"))
                    })?)
                }
                Some(index) => {
                    return Err(RouteError::bad_request(format!(
                        "disk index must be a number, got {index:?}"
                    )))
                }
                None => return Err(RouteError::new(404, format!("no such endpoint: {path}"))),
            },
        })
    }

    fn allowed(&self) -> &'static str {
        match self {
            Self::Vm | Self::Metrics | Self::Framebuffer | Self::InputSocket => "GET",
            Self::Config => "PUT, PATCH",
            Self::Disk(_)
            | Self::Vsock
            | Self::Actions
            | Self::Input
            | Self::Display
            | Self::SnapshotCreate
            | Self::SnapshotLoad => "PUT",
        }
    }
}

/// Maps `req` to the action it asks for.
pub fn route(req: &Request) -> Result<VmmAction, RouteError> {
    let endpoint = Endpoint::from_path(&req.path)?;
    let action = match (&endpoint, &req.method) {
        (Endpoint::Vm, Method::Get) => VmmAction::Describe,
        (Endpoint::Metrics, Method::Get) => VmmAction::Metrics,
        (Endpoint::Framebuffer, Method::Get) => VmmAction::GetFramebuffer,
        (Endpoint::InputSocket, Method::Get) => VmmAction::GetInputSocket,
        (Endpoint::Config, Method::Put) => {
            let config = VmConfig::from_json(require_body(req)?, "body")
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            // Values only: the controller checks the files on the main thread (the API
            // thread's sandbox allows it no file access).
            config
                .validate_values()
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            VmmAction::Configure(config)
        }
        (Endpoint::Config, Method::Patch) => {
            let patch = ConfigPatch::from_json(require_body(req)?, "body")
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            if patch.is_empty() {
                return Err(RouteError::bad_request("the patch changes nothing"));
            }
            VmmAction::UpdateConfig(ConfigUpdate::Patch(patch))
        }
        (Endpoint::Disk(index), Method::Put) => {
            let disk: DiskConfig = json_body(req)?;
            VmmAction::UpdateConfig(ConfigUpdate::Disk {
                index: *index,
                disk,
            })
        }
        (Endpoint::Vsock, Method::Put) => {
            let vsock: VsockConfig = json_body(req)?;
            vsock
                .validate_values()
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            VmmAction::UpdateConfig(ConfigUpdate::Vsock(vsock))
        }
        (Endpoint::Actions, Method::Put) => match json_body::<ActionBody>(req)?.action {
            LifecycleAction::Start => VmmAction::Start,
            LifecycleAction::Pause => VmmAction::Pause,
            LifecycleAction::Resume => VmmAction::Resume,
            LifecycleAction::Stop => VmmAction::Stop,
        },
        (Endpoint::Input, Method::Put) => {
            let body: InputBatch = json_body(req)?;
            validate_input_batch(&body.events)
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            VmmAction::InjectInput {
                device: body.device,
                events: body.events,
            }
        }
        (Endpoint::Display, Method::Put) => {
            let body: DisplaySize = json_body(req)?;
            validate_display_size(body.width, body.height)
                .map_err(|e| RouteError::bad_request(e.to_string()))?;
            VmmAction::SetDisplaySize {
                width: body.width,
                height: body.height,
            }
        }
        (Endpoint::SnapshotCreate, Method::Put) => {
            let body: SnapshotCreate = json_body(req)?;
            require_paths(&[
                ("snapshot_path", &body.snapshot_path),
                ("mem_file_path", &body.mem_file_path),
            ])?;
            VmmAction::CreateSnapshot(body)
        }
        (Endpoint::SnapshotLoad, Method::Put) => {
            let body: SnapshotLoad = json_body(req)?;
            require_paths(&[
                ("snapshot_path", &body.snapshot_path),
                ("mem_file_path", &body.mem_file_path),
            ])?;
            VmmAction::LoadSnapshot(body)
        }
        (_, method) => {
            let allow = endpoint.allowed();
            return Err(RouteError {
                status: 405,
                reason: format!(
                    "method {} not allowed on {} (allowed: {allow})",
                    method.as_str(),
                    req.path
                ),
                allow: Some(allow),
            });
        }
    };
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::http::{parse_request, Limits, Parsed};
    use crate::rpc::{InputDevice, InputEvent};
    use vmm_sys_util::tempfile::TempFile;

    fn request(method: &str, path: &str, body: Option<&str>) -> Request {
        let mut bytes = format!("{method} {path} HTTP/1.1\r\n");
        if let Some(body) = body {
            bytes.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
        } else {
            bytes.push_str("\r\n");
        }
        match parse_request(bytes.as_bytes(), &Limits::default()).unwrap() {
            Parsed::Complete { request, .. } => request,
            other => panic!("{other:?}"),
        }
    }

    fn route_ok(method: &str, path: &str, body: Option<&str>) -> VmmAction {
        route(&request(method, path, body)).unwrap()
    }

    fn route_err(method: &str, path: &str, body: Option<&str>) -> RouteError {
        route(&request(method, path, body)).unwrap_err()
    }

    /// Asserts that `PUT path` with `body` is refused as a bad request whose reason
    /// mentions `why`.
    fn assert_bad_request(path: &str, body: &str, why: &str) {
        let err = route_err("PUT", path, Some(body));
        assert_eq!(err.status, 400, "{path} {body}: {}", err.reason);
        assert!(err.reason.contains(why), "{path} {body}: {}", err.reason);
    }

    #[test]
    fn put_vsock_maps_to_a_config_update_and_refuses_a_reserved_cid() {
        let body = r#"{"guest_cid":3,"uds_path":"/run/v.sock"}"#;

        let action = route_ok("PUT", "/vsock", Some(body));
        let err = route_err("PUT", "/vsock", Some(r#"{"guest_cid":2,"uds_path":"/v"}"#));
        let unknown = route_err("PUT", "/vsock", Some(r#"{"guest_cid":3,"uds":"/v"}"#));

        assert_eq!(
            action,
            VmmAction::UpdateConfig(ConfigUpdate::Vsock(VsockConfig {
                guest_cid: 3,
                uds_path: "/run/v.sock".into(),
            }))
        );
        assert_eq!(
            (err.status, err.reason.as_str()),
            (
                400,
                "vsock guest_cid must be between 3 and 4294967294, got 2"
            )
        );
        assert_eq!(unknown.status, 400);
        assert_eq!(route_err("GET", "/vsock", None).status, 405);
    }

    #[test]
    fn snapshot_endpoints_map_to_their_actions_and_refuse_empty_paths() {
        let create = route_ok(
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path":"/s/snapshot","mem_file_path":"/s/memory"}"#),
        );
        let load = route_ok(
            "PUT",
            "/snapshot/load",
            Some(r#"{"snapshot_path":"/s/snapshot","mem_file_path":"/s/memory","resume_vm":true}"#),
        );
        let empty = route_err(
            "PUT",
            "/snapshot/create",
            Some(r#"{"snapshot_path":"","mem_file_path":"/m"}"#),
        );

        assert_eq!(
            create,
            VmmAction::CreateSnapshot(SnapshotCreate {
                snapshot_path: "/s/snapshot".into(),
                mem_file_path: "/s/memory".into(),
            })
        );
        let mut want = SnapshotLoad::new("/s/snapshot", "/s/memory");
        want.resume_vm = true;
        assert_eq!(load, VmmAction::LoadSnapshot(want));
        assert_eq!(
            (empty.status, empty.reason.as_str()),
            (400, "snapshot_path is empty")
        );
        assert_eq!(route_err("GET", "/snapshot/load", None).status, 405);
    }

    #[test]
    fn get_endpoints_map_to_their_actions() {
        assert_eq!(route_ok("GET", "/vm", None), VmmAction::Describe);
        assert_eq!(route_ok("GET", "/vm/", None), VmmAction::Describe);
        assert_eq!(route_ok("GET", "/metrics", None), VmmAction::Metrics);
        assert_eq!(
            route_ok("GET", "/framebuffer", None),
            VmmAction::GetFramebuffer
        );
        assert_eq!(
            route_ok("GET", "/input/socket", None),
            VmmAction::GetInputSocket
        );
    }

    #[test]
    fn put_config_maps_to_configure_leaving_files_to_the_controller() {
        let body = r#"{"kernel":"/nonexistent/k","vcpus":2}"#;

        let VmmAction::Configure(config) = route_ok("PUT", "/vm/config", Some(body)) else {
            panic!("expected Configure");
        };

        assert_eq!(config.vcpus, 2);
        assert_eq!(config.kernel, std::path::Path::new("/nonexistent/k"));
    }

    #[test]
    fn put_config_with_bad_values_is_400_naming_the_field() {
        let kernel = TempFile::new().unwrap();
        let body = format!(
            r#"{{"kernel":"{}","vcpus":33}}"#,
            kernel.as_path().display()
        );
        let err = route_err("PUT", "/vm/config", Some(&body));
        assert_eq!(
            (err.status, err.reason.as_str()),
            (400, "vcpus must be between 1 and 32, got 33")
        );
        assert_bad_request("/vm/config", r#"{"vcpus":2}"#, "missing field `kernel`");
    }

    #[test]
    fn patch_config_maps_to_update() {
        let action = route_ok(
            "PATCH",
            "/vm/config",
            Some(r#"{"mem_mib":256,"gpu":{"width":800,"height":600}}"#),
        );
        let VmmAction::UpdateConfig(ConfigUpdate::Patch(patch)) = action else {
            panic!("expected a patch");
        };
        assert_eq!(patch.mem_mib, Some(256));
        let size = DisplaySize {
            width: 800,
            height: 600,
        };
        assert_eq!(patch.gpu, Some(Some(size)));
        assert_eq!(route_err("PATCH", "/vm/config", Some("{}")).status, 400);
    }

    #[test]
    fn put_disk_maps_index_and_rejects_bad_index() {
        let action = route_ok(
            "PUT",
            "/vm/disks/1",
            Some(r#"{"path":"/d.img","read_only":true}"#),
        );
        assert_eq!(
            action,
            VmmAction::UpdateConfig(ConfigUpdate::Disk {
                index: 1,
                disk: DiskConfig {
                    path: "/d.img".into(),
                    read_only: true
                }
            })
        );
        assert_eq!(route_err("PUT", "/vm/disks/abc", Some("{}")).status, 400);
        assert_eq!(
            route_err("PUT", "/vm/disks/99999999999999999999999", Some("{}")).status,
            400
        );
        assert_eq!(
            route_err("PUT", "/vm/disks/0", Some(r#"{"read_only":true}"#)).status,
            400
        );
    }

    #[test]
    fn lifecycle_actions_map() {
        for (name, action) in [
            ("start", VmmAction::Start),
            ("pause", VmmAction::Pause),
            ("resume", VmmAction::Resume),
            ("stop", VmmAction::Stop),
        ] {
            let body = format!(r#"{{"action":"{name}"}}"#);
            assert_eq!(route_ok("PUT", "/vm/actions", Some(&body)), action);
        }
        assert_bad_request(
            "/vm/actions",
            r#"{"action":"reboot"}"#,
            "unknown variant `reboot`",
        );
    }

    #[test]
    fn input_batch_maps_and_is_validated() {
        let body = r#"{"device":"keyboard","events":[{"type":1,"code":30,"value":1},{"type":0,"code":0,"value":0}]}"#;
        let VmmAction::InjectInput { device, events } = route_ok("PUT", "/input", Some(body))
        else {
            panic!("expected InjectInput");
        };
        assert_eq!(device, InputDevice::Keyboard);
        assert_eq!(
            events[0],
            InputEvent {
                ty: 1,
                code: 30,
                value: 1
            }
        );

        let no_syn = r#"{"device":"tablet","events":[{"type":3,"code":0,"value":5}]}"#;
        assert_bad_request("/input", no_syn, "SYN_REPORT");
        let bad_device = r#"{"device":"mouse","events":[{"type":0,"code":0,"value":0}]}"#;
        assert_eq!(route_err("PUT", "/input", Some(bad_device)).status, 400);
        let out_of_range = r#"{"device":"touch","events":[{"type":70000,"code":0,"value":0}]}"#;
        assert_eq!(route_err("PUT", "/input", Some(out_of_range)).status, 400);
    }

    #[test]
    fn display_size_maps_and_is_validated() {
        assert_eq!(
            route_ok("PUT", "/display", Some(r#"{"width":1920,"height":1080}"#)),
            VmmAction::SetDisplaySize {
                width: 1920,
                height: 1080
            }
        );
        let err = route_err("PUT", "/display", Some(r#"{"width":1,"height":1080}"#));
        assert_eq!(err.status, 400);
        assert!(err.reason.starts_with("display size must be between"));
    }

    #[test]
    fn unknown_path_is_404() {
        let err = route_err("GET", "/nope", None);
        assert_eq!(
            (err.status, err.reason.as_str()),
            (404, "no such endpoint: /nope")
        );
        assert_eq!(route_err("GET", "/vm/disks", None).status, 404);
    }

    #[test]
    fn wrong_method_is_405_with_allow() {
        for (method, path, allow) in [
            ("PUT", "/vm", "GET"),
            ("GET", "/vm/config", "PUT, PATCH"),
            ("DELETE", "/vm/disks/0", "PUT"),
            ("GET", "/vm/actions", "PUT"),
            ("POST", "/metrics", "GET"),
            ("GET", "/input", "PUT"),
            ("GET", "/display", "PUT"),
            ("PUT", "/framebuffer", "GET"),
            ("PUT", "/input/socket", "GET"),
        ] {
            let err = route_err(method, path, None);
            assert_eq!(err.status, 405, "{method} {path}");
            assert_eq!(err.allow, Some(allow));
        }
    }

    #[test]
    fn body_without_content_length_is_411() {
        for path in [
            "/vm/config",
            "/vm/actions",
            "/input",
            "/display",
            "/vm/disks/0",
        ] {
            assert_eq!(route_err("PUT", path, None).status, 411, "{path}");
        }
        assert_eq!(route_err("PATCH", "/vm/config", None).status, 411);
    }

    #[test]
    fn malformed_json_is_400_with_position() {
        for path in [
            "/vm/config",
            "/vm/actions",
            "/input",
            "/display",
            "/vm/disks/0",
        ] {
            assert_bad_request(path, "{\"action\": ", "line 1 column");
        }
        assert_eq!(route_err("PUT", "/vm/actions", Some("")).status, 400);
    }

    #[test]
    fn unknown_json_fields_are_400() {
        let err = route_err(
            "PUT",
            "/vm/actions",
            Some(r#"{"action":"start","force":true}"#),
        );
        assert_eq!(err.status, 400);
        assert!(err.reason.contains("unknown field `force`"));
    }
}
