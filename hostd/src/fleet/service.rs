//! hostd's membership in a fleet while it runs (`[fleet] etcd` set): joins at start and keeps
//! trying while etcd cannot be reached (local environments are served meanwhile), publishes
//! this node's load as it changes, joins again under a new lease when the old one expired or
//! its watch ended, and leaves on shutdown. Also the operators' view and verbs (`genos fleet
//! nodes|cordon|uncordon|drain`), which read and write etcd directly so that they fail at
//! once, naming the endpoints, when etcd is unreachable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp};
use serde::Serialize;

use super::member::{
    node_key, schedule_key, Claim, FleetEnv, Member, MemberError, RelayAnswer, Relayed,
};
use super::placement::{Load, NodeRecord, NodeState, Schedule};
use crate::config::FleetConfig;
use crate::orchestrator::{OrchError, Orchestrator};
use crate::store::EnvRecord;

/// How long an operator's fleet request may wait for etcd.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the member checks its lease and watch and republishes a changed load.
const REFRESH: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to join.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("this host is not in a fleet ([fleet] etcd is empty in hostd.toml)")]
    NotInFleet,
    #[error("[fleet] node {0:?} is not a node name (letters, digits, '.', '_', '-'; at most 63)")]
    BadName(String),
    #[error("cannot reach etcd at {endpoints} (local environments keep running)")]
    Unreachable {
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot reach etcd at {endpoints}: no answer within {secs} s (local environments keep running)")]
    Timeout { endpoints: String, secs: u64 },
    #[error("no live node {node} in the fleet (live: {live})")]
    NoNode { node: String, live: String },
    #[error("this node has not joined the fleet yet (is etcd at {endpoints} up?): nothing can be placed")]
    NotJoined { endpoints: String },
    #[error("cannot place {env}")]
    Place {
        env: String,
        #[source]
        source: Box<MemberError>,
    },
    #[error("creating {env} here failed")]
    Local {
        env: String,
        #[source]
        source: Box<OrchError>,
    },
    #[error("node {node} could not take {env}: {reason}")]
    Refused {
        env: String,
        node: String,
        reason: String,
    },
    #[error("{env} was placed on node {node}, which has not taken it within {secs} s (is its hostd up? `genos fleet nodes`)")]
    NotTaken {
        env: String,
        node: String,
        secs: u64,
    },
    #[error("cannot relay {op} of {env} to node {node}")]
    Relay {
        op: String,
        env: String,
        node: String,
        #[source]
        source: Box<MemberError>,
    },
    #[error("node {node} has not answered {op} of {env} within {secs} s (is its hostd up? `genos fleet nodes`)")]
    NotAnswered {
        op: String,
        env: String,
        node: String,
        secs: u64,
    },
}

/// How long a relayed request waits for the node that runs the environment (it looks once
/// per refresh, [`REFRESH`]).
const RELAY_TIMEOUT: Duration = Duration::from_secs(15);

/// Where a create through the fleet went.
#[derive(Debug)]
pub enum Created {
    /// This node: its store's record.
    Here(EnvRecord),
    /// Another node, which took it: what it reports.
    Elsewhere(FleetEnv),
}

/// How long a requester waits for the chosen node to take an environment (it looks once
/// per refresh, [`REFRESH`]).
const TAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// One node as `genos fleet nodes` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub name: String,
    pub address: String,
    /// `ready`, `cordoned`, `draining` or `lost`.
    pub state: &'static str,
    /// The operators' decision, which outlives the node's lease.
    pub schedule: Schedule,
    /// vCPUs and MiB admitted after overcommit.
    pub vcpus: u64,
    pub memory_mib: u64,
    /// What the node runs, as it last published.
    pub load: Load,
    /// Placements claimed on the node through the fleet.
    pub placements: u32,
    pub labels: BTreeMap<String, String>,
    /// Unix time the lease was seen to lapse (lost nodes).
    pub lost_at: Option<u64>,
    /// Whether this is the node that answered.
    pub this: bool,
    /// Whether the answering node's placement core, fed by its watch, would place on this
    /// node now (alive there, not cordoned or draining, whatever its room).
    pub placeable: bool,
}

/// This hostd's part in the fleet; cheap to clone.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: FleetConfig,
    name: String,
    address: String,
    orch: Orchestrator,
    member: tokio::sync::Mutex<Option<Member>>,
    /// Nodes this hostd saw leave (record as last seen, unix time of the loss), kept across
    /// re-joins; a node that comes back is removed.
    lost: Mutex<BTreeMap<String, (NodeRecord, u64)>>,
    /// The member's core as of its last refresh (not behind the member's lock, which a
    /// publish to an unreachable etcd may hold for seconds).
    view: Mutex<Option<super::placement::Fleet>>,
    /// Environments seen in this node's store: one placed here that leaves the store was
    /// destroyed, and its placement is released.
    seen: Mutex<BTreeSet<String>>,
    /// Placements on this node already taken (created) or refused, so each is tried once.
    taken: Mutex<BTreeSet<String>>,
    /// Set while a join is under way (its record may be in etcd before the member is held):
    /// a shutdown waits for it, so that the record is withdrawn rather than left to lapse.
    joining: std::sync::atomic::AtomicBool,
    /// What this node last reported of each environment placed on it (state, reason).
    reported: Mutex<BTreeMap<String, (String, Option<String>)>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// The node name `[fleet] node` gives, else the host name; refused unless it can be a key.
pub fn node_name(cfg: &FleetConfig) -> Result<String, FleetError> {
    let name = if cfg.node.is_empty() {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default()
    } else {
        cfg.node.clone()
    };
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(FleetError::BadName(name))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Membership {
    /// Starts membership for `cfg` (which must name endpoints): the join runs in the
    /// background and is retried until it succeeds, so an unreachable fleet never keeps
    /// hostd from serving. `stream_port` makes the default address (`<node>:<port>`).
    pub fn start(
        cfg: &FleetConfig,
        orch: Orchestrator,
        stream_port: Option<u16>,
    ) -> Result<Membership, FleetError> {
        if cfg.etcd.is_empty() {
            return Err(FleetError::NotInFleet);
        }
        let name = node_name(cfg)?;
        let address = if cfg.public_address.is_empty() {
            stream_port
                .map(|p| format!("{name}:{p}"))
                .unwrap_or_default()
        } else {
            cfg.public_address.clone()
        };
        let m = Membership {
            inner: Arc::new(Inner {
                cfg: cfg.clone(),
                name,
                address,
                orch,
                member: tokio::sync::Mutex::new(None),
                lost: Mutex::new(BTreeMap::new()),
                view: Mutex::new(None),
                seen: Mutex::new(BTreeSet::new()),
                taken: Mutex::default(),
                joining: Default::default(),
                reported: Mutex::default(),
                task: Mutex::new(None),
            }),
        };
        let task = tokio::spawn(m.clone().run());
        *m.inner.task.lock().expect("task lock") = Some(task);
        Ok(m)
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Creates `spec` where the fleet places it: claims a node for it in etcd (least loaded
    /// by dominant share among the ready nodes with room, this one included; never a
    /// cordoned or draining one); on this node it is created here, on another the claim
    /// carries the spec, that node creates it at its next refresh and reports it under
    /// `envs/<name>`, which this waits for. A name another placement holds gets a suffix,
    /// as local names do.
    pub async fn create(
        &self,
        mut spec: proto::spec::Spec,
        actor: &str,
    ) -> Result<Created, FleetError> {
        let needs = super::placement::Needs {
            vcpus: spec.vcpus,
            memory_mib: u64::from(spec.memory_mib),
            labels: BTreeMap::new(),
        };
        let base = spec.name.clone();
        let node = {
            let guard = self.inner.member.lock().await;
            let Some(m) = guard.as_ref() else {
                return Err(FleetError::NotJoined {
                    endpoints: self.endpoints(),
                });
            };
            let mut n = 1;
            loop {
                // A name this node's store holds (outside the fleet) is taken too.
                let local = self.inner.orch.show(&spec.name).is_ok();
                if !local {
                    match m
                        .claim_with_spec(&spec.name, needs.clone(), Some(&spec))
                        .await
                    {
                        Ok(node) => break node,
                        Err(MemberError::Place(super::placement::PlaceError::Exists(_))) => {}
                        Err(source) => {
                            return Err(FleetError::Place {
                                env: spec.name.clone(),
                                source: Box::new(source),
                            })
                        }
                    }
                }
                n += 1;
                let suffix = format!("-{n}");
                spec.name = format!("{}{suffix}", &base[..base.len().min(63 - suffix.len())]);
            }
        };
        let name = spec.name.clone();
        if node == self.inner.name {
            return match self.inner.orch.create(spec, actor) {
                Ok(record) => {
                    self.inner.taken.lock().expect("taken lock").insert(name);
                    Ok(Created::Here(record))
                }
                Err(source) => {
                    self.release_claim(&name).await;
                    Err(FleetError::Local {
                        env: name,
                        source: Box::new(source),
                    })
                }
            };
        }
        self.audit("fleet-forward", &format!("{name} placed on node {node}"));
        let deadline = tokio::time::Instant::now() + TAKE_TIMEOUT;
        loop {
            let reported = {
                let guard = self.inner.member.lock().await;
                match guard.as_ref() {
                    Some(m) => m.env(&name).await.ok().flatten(),
                    None => None,
                }
            };
            match reported {
                Some(e) if e.state == "failed" => {
                    let guard = self.inner.member.lock().await;
                    if let Some(m) = guard.as_ref() {
                        let _ = m.delete_env(&name).await;
                    }
                    return Err(FleetError::Refused {
                        env: name,
                        node,
                        reason: e.reason.unwrap_or_default(),
                    });
                }
                Some(e) => return Ok(Created::Elsewhere(e)),
                None if tokio::time::Instant::now() >= deadline => {
                    return Err(FleetError::NotTaken {
                        env: name,
                        node,
                        secs: TAKE_TIMEOUT.as_secs(),
                    })
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// Every environment placed through the fleet on other nodes, as they report them
    /// (within [`OP_TIMEOUT`]: a listing never waits on an unreachable etcd for long).
    pub async fn elsewhere(&self) -> Result<Vec<FleetEnv>, FleetError> {
        let read = async {
            let guard = self.inner.member.lock().await;
            let Some(m) = guard.as_ref() else {
                return Err(FleetError::NotJoined {
                    endpoints: self.endpoints(),
                });
            };
            m.envs().await.map_err(|source| FleetError::Place {
                env: "*".into(),
                source: Box::new(source),
            })
        };
        let envs =
            tokio::time::timeout(OP_TIMEOUT, read)
                .await
                .map_err(|_| FleetError::Timeout {
                    endpoints: self.endpoints(),
                    secs: OP_TIMEOUT.as_secs(),
                })??;
        Ok(envs
            .into_iter()
            .filter(|e| e.node != self.inner.name)
            .collect())
    }

    /// What another node reports of `name`, if the fleet placed it there (`None` also when
    /// etcd does not answer within [`OP_TIMEOUT`]).
    pub async fn elsewhere_env(&self, name: &str) -> Option<FleetEnv> {
        let read = async {
            let guard = self.inner.member.lock().await;
            guard.as_ref()?.env(name).await.ok().flatten()
        };
        let e = tokio::time::timeout(OP_TIMEOUT, read)
            .await
            .ok()
            .flatten()?;
        (e.node != self.inner.name).then_some(e)
    }

    /// Runs `op` (`stop`, `destroy`, `token`) of `env` on `node`, which runs it: the request
    /// goes through etcd, that node runs it at its next refresh and answers with the status
    /// and body its own admin API would have given. (A token crosses etcd in the answer,
    /// under a 60 s lease, read and deleted at once: etcd is the fleet's trusted store, as
    /// Kubernetes keeps its secrets there; give it TLS, docs/fleet.md.)
    pub async fn relay(
        &self,
        node: &str,
        op: &str,
        env: &str,
        actor: &str,
        args: serde_json::Value,
    ) -> Result<(u16, serde_json::Value), FleetError> {
        let failed = |source| FleetError::Relay {
            op: op.into(),
            env: env.into(),
            node: node.into(),
            source: Box::new(source),
        };
        let req = Relayed {
            op: op.into(),
            env: env.into(),
            actor: actor.into(),
            by: self.inner.name.clone(),
            args,
        };
        let id = {
            let guard = self.inner.member.lock().await;
            let Some(m) = guard.as_ref() else {
                return Err(FleetError::NotJoined {
                    endpoints: self.endpoints(),
                });
            };
            m.relay(node, &req).await.map_err(failed)?
        };
        let deadline = tokio::time::Instant::now() + RELAY_TIMEOUT;
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let answer = {
                let guard = self.inner.member.lock().await;
                match guard.as_ref() {
                    Some(m) => m.take_answer(&id).await.map_err(failed)?,
                    None => None,
                }
            };
            if let Some(a) = answer {
                return Ok((a.status, a.body));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(FleetError::NotAnswered {
                    op: op.into(),
                    env: env.into(),
                    node: node.into(),
                    secs: RELAY_TIMEOUT.as_secs(),
                });
            }
        }
    }

    /// Runs the requests other members relayed here and answers each.
    async fn serve_relayed(&self, m: &Member) {
        let requests = match m.relayed_here().await {
            Ok(r) => r,
            Err(e) => {
                return tracing::warn!(error = %crate::error_chain(&e), "fleet: cannot read relayed requests")
            }
        };
        for (id, req) in requests {
            let actor = format!("{}@{}", req.actor, req.by);
            let orch = &self.inner.orch;
            let done = match req.op.as_str() {
                "stop" => orch
                    .stop(&req.env, &actor)
                    .await
                    .map(|e| serde_json::json!({"env": e})),
                "destroy" => orch
                    .destroy(&req.env, &actor)
                    .await
                    .map(|e| serde_json::json!({"env": e})),
                "token" => orch.mint_token(
                    &req.env,
                    &actor,
                    req.args["ttl_s"].as_u64().unwrap_or(3600),
                    req.args["rights"]
                        .as_str()
                        .unwrap_or("view,input,clipboard"),
                ),
                other => {
                    let answer = RelayAnswer {
                        status: 400,
                        body: serde_json::json!({"error": format!("no relayed operation {other:?} (stop, destroy, token)")}),
                    };
                    if let Err(e) = m.answer(&id, &answer).await {
                        tracing::warn!(id, error = %crate::error_chain(&e), "fleet: cannot answer a relayed request");
                    }
                    continue;
                }
            };
            let answer = match done {
                Ok(body) => RelayAnswer { status: 200, body },
                Err(e) => RelayAnswer {
                    status: crate::admin::orch_status(&e).as_u16(),
                    body: serde_json::json!({"error": crate::error_chain(&e)}),
                },
            };
            if let Err(e) = m.answer(&id, &answer).await {
                tracing::warn!(id, error = %crate::error_chain(&e), "fleet: cannot answer a relayed request");
            }
        }
    }

    async fn release_claim(&self, env: &str) {
        let guard = self.inner.member.lock().await;
        if let Some(m) = guard.as_ref() {
            if let Err(e) = m.release(env).await {
                tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot release a failed placement");
            }
        }
    }

    /// Creates the environments other nodes placed here (each once), and reports the state
    /// of every environment placed here whenever it changed.
    async fn take_placed(&self, m: &Member, names: &BTreeSet<String>) {
        let mine = m.fleet().placed_on(&self.inner.name);
        for env in &mine {
            let fresh = !names.contains(env)
                && self
                    .inner
                    .taken
                    .lock()
                    .expect("taken lock")
                    .insert(env.clone());
            if !fresh {
                continue;
            }
            let claim = match m.claimed(env).await {
                Ok(Some(c)) => c,
                Ok(None) => continue,
                Err(e) => {
                    self.inner.taken.lock().expect("taken lock").remove(env);
                    tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot read a placement; retrying");
                    continue;
                }
            };
            // Claimed here by this node: created (or being created) through `create`.
            let Some(spec) = claim.spec else { continue };
            let failure = match self
                .inner
                .orch
                .create(spec.clone(), &format!("fleet:{}", claim.by))
            {
                Ok(record) if record.name == *env => {
                    self.audit(
                        "fleet-take",
                        &format!("{env} placed here by node {}", claim.by),
                    );
                    None
                }
                Ok(record) => {
                    // The store renamed it: a local environment holds the name.
                    let _ = self.inner.orch.destroy(&record.name, "hostd").await;
                    Some(format!(
                        "an environment named {env} exists on node {} outside the fleet",
                        self.inner.name
                    ))
                }
                Err(e) => Some(crate::error_chain(&e)),
            };
            if let Some(reason) = failure {
                tracing::warn!(env, reason, "fleet: cannot take a placement");
                let report = FleetEnv {
                    name: env.clone(),
                    node: self.inner.name.clone(),
                    address: self.inner.address.clone(),
                    state: "failed".into(),
                    reason: Some(reason),
                    spec,
                };
                if let Err(e) = m.put_env(&report).await {
                    tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot report a refused placement");
                }
                if let Err(e) = m.release(env).await {
                    tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot release a refused placement");
                }
            }
        }
        // Reports: the store's state of each environment placed here, when it changed.
        let Ok(envs) = self.inner.orch.list() else {
            return;
        };
        for e in envs.into_iter().filter(|e| mine.contains(&e.name)) {
            let now = (e.state.as_str().to_string(), e.reason.clone());
            if self
                .inner
                .reported
                .lock()
                .expect("reported lock")
                .get(&e.name)
                == Some(&now)
            {
                continue;
            }
            let report = FleetEnv {
                name: e.name.clone(),
                node: self.inner.name.clone(),
                address: self.inner.address.clone(),
                state: now.0.clone(),
                reason: now.1.clone(),
                spec: e.spec,
            };
            match m.put_env(&report).await {
                Ok(()) => {
                    self.inner
                        .reported
                        .lock()
                        .expect("reported lock")
                        .insert(e.name, now);
                }
                Err(err) => {
                    tracing::warn!(env = e.name, error = %crate::error_chain(&err), "fleet: cannot report an environment's state")
                }
            }
        }
    }

    fn endpoints(&self) -> String {
        self.inner.cfg.etcd.join(",")
    }

    /// This node's record now (capacity from the admission limits; load: the store's live
    /// environments that no placement on this node covers, which the fleet counts already)
    /// and the names of its environments not destroyed (`None`: the store did not answer).
    fn local(&self) -> (NodeRecord, Option<BTreeSet<String>>) {
        let placed: BTreeSet<String> = self
            .inner
            .view
            .lock()
            .expect("view lock")
            .as_ref()
            .map(|f| f.placed_on(&self.inner.name).into_iter().collect())
            .unwrap_or_default();
        let mut load = Load::default();
        let names = match self.inner.orch.list() {
            Ok(envs) => {
                for e in envs
                    .iter()
                    .filter(|e| e.state.is_live() && !placed.contains(&e.name))
                {
                    load.running += 1;
                    load.vcpus += u64::from(e.spec.vcpus);
                    load.memory_mib += u64::from(e.spec.memory_mib);
                }
                Some(envs.into_iter().map(|e| e.name).collect())
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "fleet: cannot count environments");
                None
            }
        };
        (self.record_with(load), names)
    }

    fn record_with(&self, load: Load) -> NodeRecord {
        let cap = self.inner.orch.capacity();
        NodeRecord {
            name: self.inner.name.clone(),
            address: self.inner.address.clone(),
            vcpus: cap.vcpus,
            memory_mib: cap.memory_mib,
            cpu_overcommit: cap.cpu_overcommit,
            memory_overcommit: cap.memory_overcommit,
            labels: self.inner.cfg.labels.clone(),
            cordoned: false,
            ttl_s: self.inner.cfg.lease_ttl_s,
            load,
        }
    }

    fn audit(&self, action: &str, detail: &str) {
        if let Err(e) = self
            .inner
            .orch
            .audit("hostd", action, &self.inner.name, detail)
        {
            tracing::warn!(error = %crate::error_chain(&e), action, "fleet: cannot write the audit log");
        }
    }

    /// Joins (retrying with backoff), then keeps the membership up until aborted.
    async fn run(self) {
        let name = self.inner.name.clone();
        let endpoints = self.endpoints();
        let mut backoff = Duration::from_secs(1);
        let mut rejoin: Option<&'static str> = None;
        loop {
            let (record, _) = self.local();
            self.inner
                .joining
                .store(true, std::sync::atomic::Ordering::Release);
            let joined = Member::join(&self.inner.cfg, record.clone()).await;
            if joined.is_err() {
                self.inner
                    .joining
                    .store(false, std::sync::atomic::Ordering::Release);
            }
            let member = match joined {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(
                        node = name, endpoints, error = %crate::error_chain(&e),
                        retry_s = backoff.as_secs(),
                        "cannot join the fleet; local environments are served meanwhile, retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = Duration::from_secs(1);
            // Held at once, before anything slower (the audit log's write): a shutdown that
            // comes now finds the member and leaves, instead of letting its lease lapse.
            let old = {
                let mut guard = self.inner.member.lock().await;
                self.note_losses(&member);
                let old = guard.replace(member);
                self.inner
                    .joining
                    .store(false, std::sync::atomic::Ordering::Release);
                old
            };
            let detail = match rejoin {
                Some(why) => format!("re-joined {endpoints} under a new lease ({why})"),
                None => format!("joined {endpoints}"),
            };
            tracing::info!(node = name, endpoints, "{detail}");
            self.audit("fleet-join", &detail);
            if let Some(old) = old {
                // The new record already holds the key: revoking the old lease drops nothing.
                old.abandon(OP_TIMEOUT).await;
            }
            let mut published = record;
            loop {
                tokio::time::sleep(REFRESH).await;
                let guard = self.inner.member.lock().await;
                let Some(m) = guard.as_ref() else { return };
                if let Some(why) = m.broken() {
                    // Not placeable from a frozen view until joined again.
                    *self.inner.view.lock().expect("view lock") = None;
                    tracing::warn!(
                        node = name,
                        endpoints,
                        "{why}; joining again under a new lease"
                    );
                    self.audit("fleet-lost", why);
                    rejoin = Some(why);
                    break;
                }
                self.note_losses(m);
                let (_, names) = self.local();
                if let Some(names) = &names {
                    self.take_placed(m, names).await;
                }
                self.serve_relayed(m).await;
                let (record, names) = self.local();
                if let Some(names) = names {
                    self.release_destroyed(m, names).await;
                }
                if record != published {
                    match m.publish(&record).await {
                        Ok(()) => published = record,
                        Err(e) => {
                            tracing::warn!(node = name, error = %crate::error_chain(&e), "fleet: cannot publish this node's load")
                        }
                    }
                }
            }
        }
    }

    /// Releases the placements on this node of environments destroyed here: those this
    /// member saw in the store and that are gone from it now. (An environment claimed here
    /// but not created yet was never seen, so its claim stays.)
    async fn release_destroyed(&self, m: &Member, names: BTreeSet<String>) {
        let mine = m.fleet().placed_on(&self.inner.name);
        let gone: Vec<String> = {
            let seen = self.inner.seen.lock().expect("seen lock");
            mine.iter()
                .filter(|env| seen.contains(*env) && !names.contains(*env))
                .cloned()
                .collect()
        };
        for env in gone {
            if self
                .inner
                .reported
                .lock()
                .expect("reported lock")
                .remove(&env)
                .is_some()
            {
                if let Err(e) = m.delete_env(&env).await {
                    tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot forget a destroyed environment's report");
                }
            }
            match m.release(&env).await {
                Ok(released) => {
                    self.inner.seen.lock().expect("seen lock").remove(&env);
                    if released {
                        tracing::info!(
                            env,
                            "fleet: released the placement of a destroyed environment"
                        );
                        if let Err(e) = self.inner.orch.audit(
                            "hostd",
                            "fleet-release",
                            &env,
                            &format!("placement on node {} released", self.inner.name),
                        ) {
                            tracing::warn!(error = %crate::error_chain(&e), "fleet: cannot write the audit log");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(env, error = %crate::error_chain(&e), "fleet: cannot release a placement; retrying")
                }
            }
        }
        let mut seen = self.inner.seen.lock().expect("seen lock");
        // Kept: what the store holds, and what is placed here and not released yet.
        seen.retain(|env| names.contains(env) || mine.contains(env));
        seen.extend(names);
    }

    /// Records the nodes the member saw go (and forgets those back), for `fleet nodes`.
    fn note_losses(&self, m: &Member) {
        let fleet = m.fleet();
        *self.inner.view.lock().expect("view lock") = Some(fleet.clone());
        let (now, wall) = (m.now(), unix_now());
        let mut lost = self.inner.lost.lock().expect("lost lock");
        for (name, n) in fleet.nodes() {
            match n.state {
                // A clean shutdown: gone from the listing, not lost.
                NodeState::Gone { .. } if fleet.has_left(name) => {
                    lost.remove(name);
                }
                NodeState::Gone { since } => {
                    lost.entry(name.clone()).or_insert_with(|| {
                        let ago = now.saturating_sub(since).as_secs();
                        (n.record.clone(), wall.saturating_sub(ago))
                    });
                }
                NodeState::Alive => {
                    lost.remove(name);
                }
            }
        }
    }

    /// Leaves the fleet (revokes the lease: the key goes at once) if etcd answers in time.
    pub async fn leave(&self) {
        // A join under way finishes first (within OP_TIMEOUT), so that its record is
        // withdrawn now instead of lapsing with its lease.
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        while self
            .inner
            .joining
            .load(std::sync::atomic::Ordering::Acquire)
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(t) = self.inner.task.lock().expect("task lock").take() {
            t.abort();
        }
        let member = self.inner.member.lock().await.take();
        if let Some(m) = member {
            match tokio::time::timeout(OP_TIMEOUT, m.leave()).await {
                Ok(Ok(())) => tracing::info!(node = self.inner.name, "left the fleet"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %crate::error_chain(&e), "cannot leave the fleet; the lease will lapse")
                }
                Err(_) => tracing::warn!("etcd did not answer the leave; the lease will lapse"),
            }
        }
    }

    /// A client for one operator request, connected within [`OP_TIMEOUT`].
    async fn client(&self) -> Result<Client, FleetError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(OP_TIMEOUT)
            .with_timeout(OP_TIMEOUT);
        self.within(Client::connect(&self.inner.cfg.etcd, Some(opts)))
            .await
    }

    /// Runs one etcd request of an operator's, bounded by [`OP_TIMEOUT`].
    async fn within<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, FleetError> {
        match tokio::time::timeout(OP_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(FleetError::Unreachable {
                endpoints: self.endpoints(),
                source: Box::new(e),
            }),
            Err(_) => Err(FleetError::Timeout {
                endpoints: self.endpoints(),
                secs: OP_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Every node: the live ones as etcd holds them now, then those this hostd saw go.
    pub async fn nodes(&self) -> Result<Vec<NodeView>, FleetError> {
        let mut c = self.client().await?;
        let prefix = self.inner.cfg.prefix.clone();
        let got = self
            .within(c.get(prefix.clone(), Some(GetOptions::new().with_prefix())))
            .await?;
        let (nodes, schedule, placements) = (
            format!("{prefix}nodes/"),
            format!("{prefix}schedule/"),
            format!("{prefix}placements/"),
        );
        let mut live = BTreeMap::new();
        let mut schedules = BTreeMap::new();
        let mut placed = BTreeMap::<String, u32>::new();
        for kv in got.kvs() {
            let key = String::from_utf8_lossy(kv.key());
            if let Some(name) = key.strip_prefix(&nodes) {
                if let Ok(r) = serde_json::from_slice::<NodeRecord>(kv.value()) {
                    if r.name == name {
                        live.insert(name.to_string(), r);
                    }
                }
            } else if let Some(name) = key.strip_prefix(&schedule) {
                schedules.insert(name.to_string(), Schedule::parse(kv.value()));
            } else if let Some(_env) = key.strip_prefix(&placements) {
                if let Ok(p) = serde_json::from_slice::<Claim>(kv.value()) {
                    *placed.entry(p.node).or_default() += 1;
                }
            }
        }
        let lost = self.inner.lost.lock().expect("lost lock").clone();
        let core = self.inner.view.lock().expect("view lock").clone();
        let placeable = |name: &str| {
            core.as_ref().is_some_and(|f| {
                f.schedule(name) == Schedule::Ready
                    && f.nodes()
                        .get(name)
                        .is_some_and(|n| n.state == NodeState::Alive && !n.record.cordoned)
            })
        };
        let mut out = Vec::new();
        let view = |r: &NodeRecord, lost_at: Option<u64>| {
            let s = schedules.get(&r.name).copied().unwrap_or_default();
            NodeView {
                name: r.name.clone(),
                address: r.address.clone(),
                state: match (lost_at, s) {
                    (Some(_), _) => "lost",
                    (None, Schedule::Draining) => "draining",
                    (None, Schedule::Cordoned) => "cordoned",
                    (None, Schedule::Ready) if r.cordoned => "cordoned",
                    (None, Schedule::Ready) => "ready",
                },
                schedule: s,
                vcpus: r.cpu_limit(),
                memory_mib: r.mem_limit(),
                load: r.load,
                placements: placed.get(&r.name).copied().unwrap_or(0),
                labels: r.labels.clone(),
                lost_at,
                this: r.name == self.inner.name,
                placeable: placeable(&r.name),
            }
        };
        for r in live.values() {
            out.push(view(r, None));
        }
        for (name, (r, at)) in &lost {
            if !live.contains_key(name) {
                out.push(view(r, Some(*at)));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Writes `node`'s schedule in etcd (every member's placement honours it from its
    /// watch). Cordoning or draining needs a live node; uncordoning also clears the
    /// schedule of one that is gone.
    pub async fn set_schedule(&self, node: &str, s: Schedule) -> Result<NodeView, FleetError> {
        let mut c = self.client().await?;
        let prefix = &self.inner.cfg.prefix;
        let (nk, sk) = (node_key(prefix, node), schedule_key(prefix, node));
        let txn = match s {
            Schedule::Ready => Txn::new()
                .when([Compare::create_revision(nk, CompareOp::Greater, 0)])
                .and_then([TxnOp::delete(sk.clone(), None)])
                .or_else([TxnOp::delete(sk, None)]),
            _ => Txn::new()
                .when([Compare::create_revision(nk, CompareOp::Greater, 0)])
                .and_then([TxnOp::put(sk, s.as_str(), None)]),
        };
        let resp = self.within(c.txn(txn)).await?;
        let cleared_gone = !resp.succeeded()
            && resp
                .op_responses()
                .iter()
                .any(|r| matches!(r, etcd_client::TxnOpResponse::Delete(d) if d.deleted() > 0));
        let nodes = self.nodes().await?;
        if resp.succeeded() || cleared_gone {
            if let Some(v) = nodes.iter().find(|v| v.name == node) {
                return Ok(v.clone());
            }
            // A node gone before this hostd knew it: only its schedule was left.
            return Ok(NodeView {
                name: node.to_string(),
                address: String::new(),
                state: "lost",
                schedule: Schedule::Ready,
                vcpus: 0,
                memory_mib: 0,
                load: Load::default(),
                placements: 0,
                labels: BTreeMap::new(),
                lost_at: None,
                this: false,
                placeable: false,
            });
        }
        let live: Vec<&str> = nodes
            .iter()
            .filter(|v| v.lost_at.is_none())
            .map(|v| v.name.as_str())
            .collect();
        Err(FleetError::NoNode {
            node: node.to_string(),
            live: if live.is_empty() {
                "none".into()
            } else {
                live.join(", ")
            },
        })
    }
}
