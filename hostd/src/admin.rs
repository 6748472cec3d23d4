//! Admin socket: HTTP/JSON on `admin.sock` in the state directory, for the `genos` CLI.
//!
//! Every connection's peer credentials (SO_PEERCRED) are checked before any handler runs:
//! root, the user hostd runs as, and members of the configured group are allowed; everyone
//! else gets 403. Endpoints are listed in docs/hostd.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::UnixListener;

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
    #[error("admin server")]
    Serve(#[source] std::io::Error),
}

/// Credentials of the process at the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Connected<axum::serve::IncomingStream<'_, UnixListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, UnixListener>) -> Self {
        match stream.io().peer_cred() {
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

/// Binds the socket with mode 0660 (group: the configured group, when it exists).
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
    }
    Ok(listener)
}

pub async fn serve_on(
    orch: Orchestrator,
    listener: UnixListener,
    policy: AccessPolicy,
) -> Result<(), AdminError> {
    let state = AppState {
        orch,
        policy: Arc::new(policy),
    };
    let app = router(state);
    axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
        .await
        .map_err(AdminError::Serve)
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
        .route("/v1/tokens/revoke", post(revoke_token))
        .route("/v1/audit", get(audit_list))
        .route("/v1/audit/verify", get(audit_verify))
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
        let status = match &e {
            OrchError::NotFound(_) => StatusCode::NOT_FOUND,
            OrchError::WrongState { .. } | OrchError::Admission(_) => StatusCode::CONFLICT,
            OrchError::Spec(_) | OrchError::Revoke(_) => StatusCode::UNPROCESSABLE_ENTITY,
            OrchError::Token(_) | OrchError::Store(_) | OrchError::Config(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        ApiError(status, msg)
    }
}

type ApiResult = Result<Response, ApiError>;

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn health(State(st): State<AppState>) -> ApiResult {
    let envs = st.orch.list()?;
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "environments": envs.len(),
        "capacity": st.orch.capacity(),
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
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
    let c = st.orch.compose_text(&body.text).await;
    st.orch.audit(&actor.0, "compose", "-", &body.text)?;
    Ok(Json(c.to_output(body.explain)).into_response())
}

async fn create(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> ApiResult {
    let Json(body) = body.map_err(|e| bad_request(e.body_text()))?;
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

async fn list(State(st): State<AppState>) -> ApiResult {
    Ok(Json(json!({"envs": st.orch.list()?})).into_response())
}

async fn show(State(st): State<AppState>, UrlPath(name): UrlPath<String>) -> ApiResult {
    Ok(Json(json!({"env": st.orch.show(&name)?})).into_response())
}

async fn stop(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    Ok(Json(json!({"env": st.orch.stop(&name, &actor.0).await?})).into_response())
}

async fn destroy(
    State(st): State<AppState>,
    axum::Extension(actor): axum::Extension<Actor>,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    Ok(Json(json!({"env": st.orch.destroy(&name, &actor.0).await?})).into_response())
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
    Ok(Json(st.orch.mint_token(&name, &actor.0, ttl, &rights)?).into_response())
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

    #[test]
    fn unknown_peer_credentials_are_refused() {
        assert!(!policy(Some(777)).allows(&Peer {
            uid: u32::MAX,
            gid: u32::MAX,
            pid: None
        }));
    }
}
