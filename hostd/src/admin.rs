//! Admin socket: HTTP/JSON on `admin.sock` in the state directory, for the `genos` CLI.
//!
//! Every connection's peer credentials (SO_PEERCRED) are checked before any handler runs:
//! root, the user hostd runs as, and members of the configured group are allowed; everyone
//! else gets 403. Endpoints are listed in docs/hostd.md.
//!
//! Connections are bounded: at most [`MAX_CONNECTIONS`] at once (at the limit the oldest
//! one that is not in the middle of a request is closed for the newcomer), a request head
//! must arrive within [`HEADER_TIMEOUT`], and a request body must be at most
//! [`MAX_REQUEST_BODY`] bytes and arrive within [`BODY_TIMEOUT`], read before any handler
//! runs — except a file upload (`genos cp` into a guest), which streams to the guest with
//! [`BODY_TIMEOUT`] between its pieces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::orchestrator::{CreateOutcome, OrchError, Orchestrator};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another hostd is already serving {0}")]
    InUse(PathBuf),
}

/// Credentials of the process at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send a request head: on a new connection, and between requests on
/// a kept-alive one.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (a spec or a request text is a few KiB).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;
/// Time a client has to send a request body once its head arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

impl Peer {
    fn of(stream: &UnixStream) -> Peer {
        match stream.peer_cred() {
            Ok(c) => Peer {
                uid: c.uid(),
                gid: c.gid(),
                pid: c.pid(),
            },
            // Unknown credentials are never allowed: u32::MAX is no real user.
            Err(_) => Peer {
                uid: u32::MAX,
                gid: u32::MAX,
                pid: None,
            },
        }
    }
}

/// Who may use the socket.
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    pub group_name: String,
    pub group_gid: Option<u32>,
    pub own_uid: u32,
}

impl AccessPolicy {
    pub fn new(group_name: &str) -> AccessPolicy {
        // SAFETY: getuid has no preconditions and cannot fail.
        let own_uid = unsafe { libc::getuid() };
        AccessPolicy {
            group_name: group_name.into(),
            group_gid: group_gid(group_name),
            own_uid,
        }
    }

    pub fn allows(&self, peer: &Peer) -> bool {
        if peer.uid == 0 || peer.uid == self.own_uid {
            return true;
        }
        let Some(gid) = self.group_gid else {
            return false;
        };
        peer.gid == gid
            || peer
                .pid
                .is_some_and(|pid| supplementary_groups(pid).contains(&gid))
    }
}

/// Looks a group up by name (NSS aware).
pub fn group_gid(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: `group` is a plain C struct of integers and pointers; all-zero is a valid
    // value, and getgrnam_r overwrites it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `cname` is NUL-terminated, `grp` and
    // `result` are live locals, and `buf` is writable for `buf.len()` bytes.
    let rc = unsafe {
        libc::getgrnam_r(
            cname.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    (rc == 0 && !result.is_null()).then_some(grp.gr_gid)
}

/// The supplementary groups of a live process, from /proc.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Groups:")).map(|l| {
                l[7..]
                    .split_whitespace()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[derive(Clone)]
struct AppState {
    orch: Orchestrator,
    policy: Arc<AccessPolicy>,
    /// This host's fleet membership, when `[fleet] etcd` is set.
    fleet: Option<crate::fleet::Membership>,
}

/// Binds `path` (replacing a stale socket, refusing a live one) and serves until the
/// future is dropped.
pub async fn serve(
    orch: Orchestrator,
    path: &Path,
    policy: AccessPolicy,
) -> Result<(), AdminError> {
    let listener = bind(path, &policy).await?;
    serve_on(orch, listener, policy).await
}

/// Binds the socket with mode 0660 (group: the configured group, when it exists, which
/// may then also search the socket's directory: 0710).
pub async fn bind(path: &Path, policy: &AccessPolicy) -> Result<UnixListener, AdminError> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(AdminError::InUse(path.into()));
        }
        let _ = std::fs::remove_file(path);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| AdminError::Bind {
            path: path.into(),
            source,
        })?;
    }
    let listener = UnixListener::bind(path).map_err(|source| AdminError::Bind {
        path: path.into(),
        source,
    })?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660));
    if let Some(gid) = policy.group_gid {
        let _ = std::os::unix::fs::chown(path, None, Some(gid));
        // The state directory is 0700 (store::Store::open); the group may pass through it
        // to reach this socket, but not list or read anything in it.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::os::unix::fs::chown(dir, None, Some(gid));
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710));
        }
    }
    Ok(listener)
}

/// Serves `listener` until the future is dropped (a failed accept is logged and retried:
/// connections already open go on), for a host that is not in a fleet.
pub async fn serve_on(
    orch: Orchestrator,
    listener: UnixListener,
    policy: AccessPolicy,
) -> Result<(), AdminError> {
    serve_fleet_on(orch, listener, policy, None).await
}

/// [`serve_on`] for a host whose `fleet` membership answers `/v1/fleet/...` (without one
/// they say this host is not in a fleet).
pub async fn serve_fleet_on(
    orch: Orchestrator,
    listener: UnixListener,
    policy: AccessPolicy,
    fleet: Option<crate::fleet::Membership>,
) -> Result<(), AdminError> {
    let policy = Arc::new(policy);
    let state = AppState {
        orch,
        policy: policy.clone(),
        fleet,
    };
    let app = TowerToHyperService::new(router(state));
    let table = Arc::new(Connections::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors and the like: connections already open go on.
                tracing::warn!(error = %e, "admin socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // At the limit this closes the oldest idle connection, or waits for one to end
        // (taking nothing more off the backlog meanwhile).
        let slot = table.admit(MAX_CONNECTIONS).await;
        let peer = Peer::of(&stream);
        let (app, policy) = (app.clone(), policy.clone());
        tokio::spawn(async move {
            let busy = slot.state.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (app, busy) = (app.clone(), busy.clone());
                    let allowed = policy.allows(&peer);
                    async move {
                        let _busy = Busy::new(busy);
                        let (parts, body) = req.into_parts();
                        // A refused peer's body is never read: the router answers 403. A
                        // file upload streams through its handler; every other body is read
                        // whole first.
                        let body = if !allowed {
                            axum::body::Body::empty()
                        } else if is_file_upload(&parts) {
                            axum::body::Body::new(body)
                        } else {
                            match read_body(body).await {
                                Ok(b) => axum::body::Body::new(Full::new(b)),
                                Err(e) => {
                                    return Ok::<_, std::convert::Infallible>(e.into_response())
                                }
                            }
                        };
                        let mut req = hyper::Request::from_parts(parts, body);
                        req.extensions_mut().insert(ConnectInfo(peer));
                        hyper::service::Service::call(&app, req).await
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = slot.state.evict.notified() => {}
            }
        });
    }
}

/// Whether a request is `PUT /v1/envs/NAME/files`, whose body streams to the guest.
fn is_file_upload(parts: &axum::http::request::Parts) -> bool {
    let path = parts.uri.path();
    parts.method == axum::http::Method::PUT
        && path.starts_with("/v1/envs/")
        && path.ends_with("/files")
}

/// The whole request body, within [`MAX_REQUEST_BODY`] and [`BODY_TIMEOUT`].
async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, MAX_REQUEST_BODY).collect()).await {
        Ok(Ok(b)) => Ok(b.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_REQUEST_BODY} bytes"),
        )),
        Ok(Err(e)) => Err(bad_request(format!("reading the request body: {e}"))),
        Err(_) => Err(ApiError(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// The admin socket's open connections, oldest first.
#[derive(Default)]
struct Connections {
    table: Mutex<(u64, BTreeMap<u64, Arc<ConnState>>)>,
    freed: Notify,
}

#[derive(Default)]
struct ConnState {
    /// Requests being handled.
    busy: AtomicUsize,
    /// Closes the connection.
    evict: Notify,
}

/// A connection's place in [`Connections`], given back when dropped.
struct Slot {
    id: u64,
    state: Arc<ConnState>,
    table: Arc<Connections>,
}

impl Connections {
    /// A slot for a new connection. At `max` the oldest connection not handling a request
    /// is closed for it; when every connection is busy this waits until one ends.
    async fn admit(self: &Arc<Self>, max: usize) -> Slot {
        loop {
            let freed = self.freed.notified();
            {
                let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
                if t.1.len() >= max {
                    let idle =
                        t.1.iter()
                            .find(|(_, c)| c.busy.load(Ordering::SeqCst) == 0)
                            .map(|(id, _)| *id);
                    if let Some(id) = idle {
                        let c = t.1.remove(&id).expect("found above");
                        // A stored permit: the connection ends even if it is not waiting yet.
                        c.evict.notify_one();
                    }
                }
                if t.1.len() < max {
                    t.0 += 1;
                    let (id, state) = (t.0, Arc::new(ConnState::default()));
                    t.1.insert(id, state.clone());
                    return Slot {
                        id,
                        state,
                        table: self.clone(),
                    };
                }
            }
            freed.await;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).1.len()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut t = self.table.table.lock().unwrap_or_else(|e| e.into_inner());
        t.1.remove(&self.id);
        drop(t);
        self.table.freed.notify_one();
    }
}

/// Marks a connection busy while one of its requests is handled.
struct Busy(Arc<ConnState>);

impl Busy {
    fn new(state: Arc<ConnState>) -> Busy {
        state.busy.fetch_add(1, Ordering::SeqCst);
        Busy(state)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/compose", post(compose))
        .route("/v1/envs", get(list).post(create))
        .route("/v1/envs/{name}", get(show).delete(destroy))
        .route("/v1/envs/{name}/stop", post(stop))
        .route("/v1/envs/{name}/token", post(token))
        .route("/v1/envs/{name}/exec", post(exec))
        .route("/v1/envs/{name}/files", get(file_get).put(file_put))
        .route("/v1/tokens/revoke", post(revoke_token))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/fleet/nodes", get(fleet_nodes))
        .route("/v1/fleet/nodes/{node}/{verb}", post(fleet_schedule))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            check_peer,
        ))
        .with_state(state)
}

async fn check_peer(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut req: Request,
    next: Next,
) -> Response {
    if !st.policy.allows(&peer) {
        let msg = format!(
            "permission denied: uid {} is not root and not in group {:?}{}",
            peer.uid,
            st.policy.group_name,
            if st.policy.group_gid.is_none() {
                " (which does not exist on this host)"
            } else {
                ""
            }
        );
        tracing::warn!(uid = peer.uid, pid = peer.pid, "admin socket: refused");
        return (StatusCode::FORBIDDEN, Json(json!({"error": msg}))).into_response();
    }
    req.extensions_mut()
        .insert(Actor(format!("uid:{}", peer.uid)));
    next.run(req).await
}

#[derive(Clone)]
struct Actor(String);

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<OrchError> for ApiError {
    fn from(e: OrchError) -> Self {
        ApiError(orch_status(&e), crate::error_chain(&e))
    }
}

/// The HTTP status of an orchestrator error.
pub(crate) fn orch_status(e: &OrchError) -> StatusCode {
    match e {
        OrchError::NotFound(_) => StatusCode::NOT_FOUND,
        OrchError::WrongState { .. } | OrchError::Admission(_) => StatusCode::CONFLICT,
        OrchError::Spec(_) | OrchError::Revoke(_) => StatusCode::UNPROCESSABLE_ENTITY,
        OrchError::Token(_) | OrchError::Store(_) | OrchError::Config(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        // The agent said no (a refused path, an unknown user): the request's fault.
        OrchError::Agent {
            source: crate::agent::AgentError::Refused { .. },
            ..
        } => StatusCode::UNPROCESSABLE_ENTITY,
        // The guest did not answer as it should.
        OrchError::Agent { .. } => StatusCode::BAD_GATEWAY,
    }
}

type ApiResult = Result<Response, ApiError>;

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// `GET /v1/health`: the store is writable, the image cache usable, the stream server
/// accepting and KVM usable (crate::doctor::health_checks); `status` is the worst of them
/// (`ok`, `degraded`, `failing`).
async fn health(State(st): State<AppState>) -> ApiResult {
    use crate::doctor;
    let envs = st.orch.list()?;
    let orch = st.orch.clone();
    let facts = tokio::task::spawn_blocking(move || {
        let images = &orch.config().images;
        let builds = images.kernel.is_empty() || images.initramfs.is_empty() || images.build_rootfs;
        doctor::HealthFacts {
            store: doctor::read_dir("store", orch.state_dir(), true),
            cache: builds
                .then(doctor::image_cache_dir)
                .flatten()
                .map(|d| doctor::read_dir("image cache", &d, true)),
            stream: orch
                .stream_server()
                .map(|s| s.local_addr().map_err(|e| e.to_string())),
            stream_enabled: orch.config().stream.enabled,
            kvm: doctor::read_kvm(),
        }
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("health checks: {e}"),
        )
    })?;
    let checks = doctor::health_checks(&facts);
    Ok(Json(json!({
        "status": doctor::health_status(&checks),
        "version": env!("CARGO_PKG_VERSION"),
        "environments": envs.len(),
        "capacity": st.orch.capacity(),
        "checks": checks,
    }))
    .into_response())
}

async fn metrics(State(st): State<AppState>) -> ApiResult {
    let text = st.orch.metrics_text()?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ComposeBody {
    text: String,
    #[serde(default)]
    explain: bool,
}

async fn compose(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    body: Result<Json<ComposeBody>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    let c = st.orch.compose_text(&body.text).await;
    let text = crate::orchestrator::audit_text(&body.text);
    st.orch.audit(&actor.0, "compose", "-", &text)?;
    Ok(Json(c.to_output(body.explain)).into_response())
}

async fn create(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| ApiError(e.status(), e.body_text()))?;
    if let Some(fleet) = &st.fleet {
        return create_in_fleet(&st, fleet, &actor.0, &body).await;
    }
    match (body.get("text"), body.get("spec")) {
        (Some(Value::String(text)), None) => {
            match st.orch.create_from_text(text, &actor.0).await? {
                CreateOutcome::Created(env) => {
                    Ok((StatusCode::CREATED, Json(json!({"env": env}))).into_response())
                }
                CreateOutcome::Clarify(q) => Ok(Json(json!({"clarify": q})).into_response()),
            }
        }
        (None, Some(spec)) => {
            let spec = proto::spec::Spec::from_json(&spec.to_string()).map_err(OrchError::from)?;
            let env = st.orch.create(spec, &actor.0)?;
            Ok((StatusCode::CREATED, Json(json!({"env": env}))).into_response())
        }
        _ => Err(bad_request(
            "body must be {\"text\": \"...\"} or {\"spec\": {...}}",
        )),
    }
}

/// `POST /v1/envs` on a fleet member: composed here, placed where the fleet chooses.
async fn create_in_fleet(
    st: &AppState,
    fleet: &crate::fleet::Membership,
    actor: &str,
    body: &Value,
) -> ApiResult {
    let spec = match (body.get("text"), body.get("spec")) {
        (Some(Value::String(text)), None) => match st.orch.compose_text(text).await.outcome {
            crate::composer::Outcome::Spec(spec) => {
                let detail = crate::orchestrator::audit_text(text);
                st.orch.audit(actor, "compose", &spec.name, &detail)?;
                *spec
            }
            crate::composer::Outcome::Clarify(q) => {
                return Ok(Json(json!({"clarify": q})).into_response())
            }
        },
        (None, Some(spec)) => {
            proto::spec::Spec::from_json(&spec.to_string()).map_err(OrchError::from)?
        }
        _ => {
            return Err(bad_request(
                "body must be {\"text\": \"...\"} or {\"spec\": {...}}",
            ))
        }
    };
    let env = match fleet.create(spec, actor).await? {
        crate::fleet::Created::Here(env) => json!(env),
        crate::fleet::Created::Elsewhere(e) => json!(e),
    };
    Ok((StatusCode::CREATED, Json(json!({"env": env}))).into_response())
}

/// `GET /v1/envs`: this node's environments; on a fleet member also `elsewhere`, those the
/// fleet placed on other nodes as they report them (each with its `node` and `address`),
/// or `elsewhere_unavailable` saying why they could not be read.
async fn list(State(st): State<AppState>) -> ApiResult {
    let envs = st.orch.list()?;
    let Some(fleet) = &st.fleet else {
        return Ok(Json(json!({"envs": envs})).into_response());
    };
    // This node's environments are listed whatever etcd does.
    Ok(Json(match fleet.elsewhere().await {
        Ok(elsewhere) => json!({"envs": envs, "elsewhere": elsewhere}),
        Err(e) => json!({"envs": envs, "elsewhere_unavailable": crate::error_chain(&e)}),
    })
    .into_response())
}

/// `GET /v1/envs/NAME`: from this node's store, else (a fleet member) as the node the fleet
/// placed it on reports it.
async fn show(State(st): State<AppState>, UrlPath(name): UrlPath<String>) -> ApiResult {
    match st.orch.show(&name) {
        Ok(env) => {
            Ok(Json(json!({"env": env, "progress": st.orch.progress(&name)})).into_response())
        }
        Err(OrchError::NotFound(n)) => match &st.fleet {
            Some(fleet) => match fleet.elsewhere_env(&name).await {
                Some(e) => Ok(Json(json!({"env": e, "progress": null})).into_response()),
                None => Err(OrchError::NotFound(n).into()),
            },
            None => Err(OrchError::NotFound(n).into()),
        },
        Err(e) => Err(e.into()),
    }
}

async fn stop(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    match st.orch.stop(&name, &actor.0).await {
        Err(OrchError::NotFound(n)) => relay_or(&st, "stop", &name, &actor.0, json!({}), n).await,
        done => Ok(Json(json!({"env": done?})).into_response()),
    }
}

async fn destroy(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    match st.orch.destroy(&name, &actor.0).await {
        Err(OrchError::NotFound(n)) => {
            relay_or(&st, "destroy", &name, &actor.0, json!({}), n).await
        }
        done => Ok(Json(json!({"env": done?})).into_response()),
    }
}

/// For an environment not in this node's store: on a fleet member whose fleet placed it on
/// another node, `op` runs there ([`crate::fleet::Membership::relay`]) and its answer is
/// this one; otherwise not found.
async fn relay_or(
    st: &AppState,
    op: &str,
    name: &str,
    actor: &str,
    args: Value,
    not_found: String,
) -> ApiResult {
    let Some(fleet) = &st.fleet else {
        return Err(OrchError::NotFound(not_found).into());
    };
    let Some(e) = fleet.elsewhere_env(name).await else {
        return Err(OrchError::NotFound(not_found).into());
    };
    let (status, body) = fleet.relay(&e.node, op, name, actor, args).await?;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        return Ok((status, Json(body)).into_response());
    }
    let why = body["error"].as_str().unwrap_or("failed").to_string();
    Err(ApiError(status, format!("on node {}: {why}", e.node)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    ttl_s: Option<u64>,
    rights: Option<String>,
}

async fn token(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
    body: Option<Json<TokenBody>>,
) -> ApiResult {
    let body = body.map(|b| b.0).unwrap_or_default();
    use crate::stream::token::{MAX_TTL, MIN_TTL};
    let ttl = body
        .ttl_s
        .unwrap_or(3600)
        .clamp(MIN_TTL.as_secs(), MAX_TTL.as_secs());
    let rights = body.rights.unwrap_or_else(|| "view,input,clipboard".into());
    match st.orch.mint_token(&name, &actor.0, ttl, &rights) {
        Err(OrchError::NotFound(n)) => {
            let args = json!({"ttl_s": ttl, "rights": rights});
            relay_or(&st, "token", &name, &actor.0, args, n).await
        }
        minted => Ok(Json(minted?).into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecBody {
    argv: Vec<String>,
    /// The whole environment of the process; default `PATH` only.
    #[serde(default)]
    env: Option<Vec<(String, String)>>,
    /// Working directory; default the user's home.
    #[serde(default)]
    cwd: String,
    /// Guest user; default the agent's (root).
    #[serde(default)]
    user: String,
    /// Seconds before the process group is killed (default 60, at most an hour).
    #[serde(default)]
    timeout_s: Option<u64>,
    /// Standard input, base64; absent: /dev/null. Bounded by the admin body limit.
    #[serde(default)]
    stdin_b64: Option<String>,
}

/// `PATH` of a command run without an explicit environment.
const EXEC_DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

async fn exec(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
    Json(body): Json<ExecBody>,
) -> ApiResult {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    if body.argv.is_empty() {
        return Err(bad_request("argv is empty: name the program to run"));
    }
    let stdin = body
        .stdin_b64
        .map(|s| b64.decode(s))
        .transpose()
        .map_err(|e| bad_request(format!("stdin_b64 is not base64: {e}")))?;
    let request = proto::agent::ExecRequest {
        argv: body.argv,
        env: body
            .env
            .unwrap_or_else(|| vec![("PATH".into(), EXEC_DEFAULT_PATH.into())]),
        cwd: body.cwd,
        user: body.user,
        ..Default::default()
    };
    let timeout = Duration::from_secs(body.timeout_s.unwrap_or(60).max(1));
    let out = st
        .orch
        .exec(&name, &actor.0, request, stdin, timeout)
        .await?;
    let (exit_code, signal) = match out.status {
        Some(proto::agent::ExitStatus::Code(c)) => (Some(c), None),
        Some(proto::agent::ExitStatus::Signal(s)) => (None, Some(s)),
        None => (None, None),
    };
    Ok(Json(json!({
        "exit_code": exit_code,
        "signal": signal,
        "timed_out": out.timed_out,
        "stdout_b64": b64.encode(&out.stdout),
        "stderr_b64": b64.encode(&out.stderr),
        "dropped": out.dropped,
    }))
    .into_response())
}

/// Where a file goes in (or comes from) the guest: `genos cp`'s query.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileQuery {
    path: String,
    /// Guest user that owns the file (default: root); a path outside that user's home is
    /// refused unless `as_root`.
    #[serde(default)]
    user: String,
    #[serde(default)]
    as_root: bool,
    /// Permission bits of a file put, in octal (default 644).
    mode: Option<String>,
}

/// Header carrying a got file's permission bits, in octal.
pub const FILE_MODE_HEADER: &str = "x-genos-mode";

/// `PUT /v1/envs/NAME/files?path=...`: the body, of the `Content-Length` it announces (at
/// most [`crate::orchestrator::MAX_COPY_SIZE`]), becomes the file; each piece must arrive
/// within [`BODY_TIMEOUT`] of the one before. The guest has the file only if all of it came.
async fn file_put(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<FileQuery>,
    req: Request,
) -> ApiResult {
    use crate::orchestrator::MAX_COPY_SIZE;
    let size = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .ok_or_else(|| {
            ApiError(
                StatusCode::LENGTH_REQUIRED,
                "a file upload needs its Content-Length".into(),
            )
        })?;
    if size > MAX_COPY_SIZE {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the file is {size} bytes, more than the {MAX_COPY_SIZE} genos cp moves"),
        ));
    }
    let mode = match q.mode.as_deref() {
        None => 0o644,
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| bad_request(format!("mode {m:?} is not octal permission bits")))?,
    };
    let path = q.path.clone();
    let put = proto::agent::FilePutRequest {
        path: q.path,
        user: q.user,
        mode,
        size,
        as_root: q.as_root,
    };
    // The body goes through a pipe the agent client reads: a client that stalls or
    // stops early leaves the agent short, which it refuses.
    let (mut reader, mut writer) = tokio::io::duplex(256 * 1024);
    let mut body = req.into_body();
    let pump = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut got = 0u64;
        loop {
            let frame = tokio::time::timeout(BODY_TIMEOUT, body.frame())
                .await
                .map_err(|_| {
                    format!(
                        "the upload stalled for {} s after {got} of {size} bytes",
                        BODY_TIMEOUT.as_secs()
                    )
                })?;
            match frame {
                None => return Ok(got),
                Some(Err(e)) => return Err(format!("reading the upload after {got} bytes: {e}")),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        got += data.len() as u64;
                        if writer.write_all(&data).await.is_err() {
                            // The agent side ended (a refusal): its error is the answer.
                            return Ok(got);
                        }
                    }
                }
            }
        }
    });
    let put_result = st
        .orch
        .put_file_from(&name, &actor.0, put, &mut reader)
        .await;
    drop(reader);
    let pumped = pump.await.unwrap_or_else(|e| Err(e.to_string()));
    match (put_result, pumped) {
        (Ok(()), _) => Ok(
            Json(json!({"path": path, "size": size, "mode": format!("{mode:o}")})).into_response(),
        ),
        // The client's failure explains a short file better than the agent's count.
        (Err(_), Err(why)) => Err(bad_request(why)),
        (Err(e), Ok(_)) => Err(e.into()),
    }
}

/// `GET /v1/envs/NAME/files?path=...`: the file as it streams from the guest, with its
/// `Content-Length` and its mode in [`FILE_MODE_HEADER`]. A failure after the first byte
/// cuts the body short of its length, which the client must treat as a failed copy.
async fn file_get(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<FileQuery>,
) -> ApiResult {
    if q.mode.is_some() {
        return Err(bad_request("mode applies to a file put, not a get"));
    }
    let get = proto::agent::FileGetRequest {
        path: q.path,
        user: q.user,
        as_root: q.as_root,
    };
    let mut file = st
        .orch
        .open_file(&name, &actor.0, get, crate::orchestrator::MAX_COPY_SIZE)
        .await?;
    let (size, mode) = (file.size, file.mode);
    let (tx, body) = crate::body_channel::channel();
    let env = name.clone();
    tokio::spawn(async move {
        loop {
            let chunk = match file.next_chunk().await {
                Ok(Some(data)) => Ok(Bytes::from(data)),
                Ok(None) => return,
                Err(e) => {
                    let why = crate::error_chain(&e);
                    tracing::warn!(env = %env, error = %why, "file get cut short");
                    Err(std::io::Error::other(why))
                }
            };
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_LENGTH, size)
        .header(axum::http::header::CONTENT_TYPE, "application/octet-stream")
        .header(FILE_MODE_HEADER, format!("{:o}", mode & 0o7777))
        .body(axum::body::Body::new(body))
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    /// The token itself, or its id (16 hex digits).
    token: String,
}

async fn revoke_token(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    Json(body): Json<RevokeBody>,
) -> ApiResult {
    Ok(Json(st.orch.revoke_token(&body.token, &actor.0)?).into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

async fn audit_list(State(st): State<AppState>, Query(q): Query<AuditQuery>) -> ApiResult {
    Ok(Json(json!({"entries": st.orch.audit_entries(q.limit.unwrap_or(50))?})).into_response())
}

async fn audit_verify(State(st): State<AppState>) -> ApiResult {
    Ok(Json(st.orch.verify_audit()?).into_response())
}

impl From<crate::fleet::FleetError> for ApiError {
    fn from(e: crate::fleet::FleetError) -> Self {
        use crate::fleet::FleetError;
        let status = match &e {
            FleetError::NotInFleet => StatusCode::CONFLICT,
            FleetError::BadName(_) => StatusCode::INTERNAL_SERVER_ERROR,
            FleetError::Unreachable { .. } | FleetError::Timeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            FleetError::NoNode { .. } => StatusCode::NOT_FOUND,
            FleetError::NotJoined { .. } => StatusCode::SERVICE_UNAVAILABLE,
            FleetError::Place { source, .. }
                if matches!(**source, crate::fleet::MemberError::Place(_)) =>
            {
                StatusCode::CONFLICT
            }
            FleetError::Refused { .. } => StatusCode::CONFLICT,
            FleetError::Place { .. } => StatusCode::SERVICE_UNAVAILABLE,
            FleetError::Local { source, .. } => orch_status(source),
            FleetError::NotTaken { .. } | FleetError::NotAnswered { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            FleetError::Relay { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, crate::error_chain(&e))
    }
}

/// This host's membership, or the error saying it has none.
fn membership(st: &AppState) -> Result<&crate::fleet::Membership, ApiError> {
    st.fleet
        .as_ref()
        .ok_or_else(|| crate::fleet::FleetError::NotInFleet.into())
}

/// `GET /v1/fleet/nodes`: every node as etcd holds it now, and those this host saw go.
async fn fleet_nodes(State(st): State<AppState>) -> ApiResult {
    let m = membership(&st)?;
    let nodes = m.nodes().await?;
    Ok(Json(json!({"node": m.name(), "nodes": nodes})).into_response())
}

/// `POST /v1/fleet/nodes/NODE/{cordon,uncordon,drain}`: NODE's schedule, in etcd.
async fn fleet_schedule(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath((node, verb)): UrlPath<(String, String)>,
) -> ApiResult {
    use crate::fleet::Schedule;
    let m = membership(&st)?;
    let schedule = match verb.as_str() {
        "cordon" => Schedule::Cordoned,
        "uncordon" => Schedule::Ready,
        "drain" => Schedule::Draining,
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no fleet verb {verb:?} (cordon, uncordon, drain)"),
            ))
        }
    };
    let view = m.set_schedule(&node, schedule).await?;
    st.orch.audit(
        &actor.0,
        &format!("fleet-{verb}"),
        &node,
        &format!("node {node} {} (from node {})", schedule.as_str(), m.name()),
    )?;
    Ok(Json(json!({"node": view})).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(gid: Option<u32>) -> AccessPolicy {
        AccessPolicy {
            group_name: "genos".into(),
            group_gid: gid,
            own_uid: 4242,
        }
    }

    #[test]
    fn root_and_own_user_are_allowed() {
        let p = policy(None);
        assert!(p.allows(&Peer {
            uid: 0,
            gid: 0,
            pid: None
        }));
        assert!(p.allows(&Peer {
            uid: 4242,
            gid: 4242,
            pid: None
        }));
    }

    #[test]
    fn group_member_is_allowed_and_others_refused() {
        let p = policy(Some(777));
        assert!(p.allows(&Peer {
            uid: 1000,
            gid: 777,
            pid: None
        }));
        assert!(!p.allows(&Peer {
            uid: 1000,
            gid: 1000,
            pid: None
        }));
        assert!(!policy(None).allows(&Peer {
            uid: 1000,
            gid: 777,
            pid: None
        }));
    }

    #[tokio::test]
    async fn a_full_table_closes_its_oldest_idle_connection_for_a_newcomer() {
        let table = Arc::new(Connections::default());
        let oldest = table.admit(2).await;
        let busy = table.admit(2).await;
        let _handling = Busy::new(busy.state.clone());
        let newest = table.admit(2).await;
        assert_eq!(table.len(), 2);
        // The oldest was idle: told to close (a stored permit, so this completes at once).
        tokio::time::timeout(Duration::from_secs(5), oldest.state.evict.notified())
            .await
            .expect("the oldest idle connection is closed");
        drop(oldest);
        assert_eq!(table.len(), 2, "the evicted slot was already given up");
        drop(newest);
        assert_eq!(table.len(), 1);
    }

    #[tokio::test]
    async fn a_table_of_busy_connections_waits_until_one_ends() {
        let table = Arc::new(Connections::default());
        let a = table.admit(1).await;
        let _handling = Busy::new(a.state.clone());
        let t = table.clone();
        let waiter = tokio::spawn(async move { t.admit(1).await.id });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "admitted past the limit");
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("admitted once a slot was freed")
            .unwrap();
    }

    #[test]
    fn unknown_peer_credentials_are_refused() {
        assert!(!policy(Some(777)).allows(&Peer {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None
        }));
    }
}
