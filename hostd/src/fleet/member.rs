//! The etcd driver of the fleet core: joins the fleet (a lease, this node's record under it),
//! keeps the lease alive, and feeds every node's record from a prefix watch into a shared
//! [`Fleet`]. A node whose lease lapses has its key deleted by etcd; the watch's delete is
//! the core's `node_gone`. Keys: `<prefix>nodes/<name>` (docs/fleet.md).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::placement::{
    Decision, Fleet, LossPolicy, Needs, NodeRecord, NodeState, PlaceError, Schedule,
};
use crate::config::FleetConfig;

/// Why joining or talking to the fleet failed.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("[fleet] has no etcd endpoints")]
    NoEndpoints,
    #[error("cannot reach etcd at {endpoints}")]
    Connect {
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot take or revoke node {node}'s lease at etcd {endpoints}")]
    Lease {
        node: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot publish node {node} in etcd {endpoints}")]
    Publish {
        node: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot read or watch the fleet's nodes in etcd {endpoints}")]
    Watch {
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot claim a placement for {env} in etcd {endpoints}")]
    Claim {
        env: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot release the placement of {env} in etcd {endpoints}")]
    Release {
        env: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("cannot read or write environment {env} in etcd {endpoints}")]
    Env {
        env: String,
        endpoints: String,
        #[source]
        source: Box<etcd_client::Error>,
    },
    #[error("placement of {env} lost {attempts} races for the same nodes; try again")]
    Contended { env: String, attempts: u32 },
    #[error("cannot encode node record")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Place(#[from] PlaceError),
}

/// This hostd's membership: its lease and the fleet as the watch reports it.
pub struct Member {
    name: String,
    endpoints: String,
    prefix: String,
    client: Client,
    lease: i64,
    fleet: Arc<Mutex<Fleet>>,
    /// Bumped on every change the watch applied.
    changes: watch::Receiver<u64>,
    decisions: Arc<Mutex<Vec<Decision>>>,
    keepalive: Option<JoinHandle<()>>,
    /// Set by the keep-alive when etcd says the lease is gone.
    expired: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
    origin: Instant,
}

/// A claimed placement: the value of `<prefix>placements/<env>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub node: String,
    pub needs: Needs,
    /// What to create, when another node asked for it (the chosen node creates it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<proto::spec::Spec>,
    /// The node that asked, for the audit log.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub by: String,
}

/// An environment placed through the fleet, as the node that runs it reports it: the
/// value of `<prefix>envs/<name>` (no lease: a lost node's environments stay listed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetEnv {
    pub name: String,
    pub node: String,
    /// Where viewers reach the node's stream server (`host:port`).
    pub address: String,
    /// The node's store's state (`building`, `ready`, ...), or `failed` when the node
    /// could not take it.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub spec: proto::spec::Spec,
}

/// A request one member relays to the node that runs an environment (`stop`, `destroy`,
/// `token`): the value of `<prefix>relay/<node>/<id>`, under the requester's lease (a
/// requester that is gone asks nothing).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relayed {
    pub op: String,
    pub env: String,
    /// Who asked, on the requesting node, for the audit log.
    pub actor: String,
    /// The requesting node.
    pub by: String,
    /// The operation's arguments (a token's `ttl_s` and `rights`).
    #[serde(default)]
    pub args: serde_json::Value,
}

/// The answer to a [`Relayed`] request: `<prefix>answers/<id>`, under a lease of its own
/// ([`ANSWER_TTL_S`]) so that an answer nobody reads goes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RelayAnswer {
    /// The HTTP status the operation had on the node that ran it.
    pub status: u16,
    pub body: serde_json::Value,
}

/// How long an unread relay answer stays in etcd.
pub const ANSWER_TTL_S: i64 = 60;

/// The key of an environment's [`FleetEnv`].
pub fn env_key(prefix: &str, name: &str) -> String {
    format!("{prefix}envs/{name}")
}

/// How often a claim is retried after losing a race for its node.
const CLAIM_ATTEMPTS: u32 = 16;

/// The key of node `name` under `prefix`.
pub fn node_key(prefix: &str, name: &str) -> String {
    format!("{prefix}nodes/{name}")
}

/// The key a node writes when it leaves on purpose (a shutdown, not a loss).
pub fn left_key(prefix: &str, name: &str) -> String {
    format!("{prefix}left/{name}")
}

/// The key of node `name`'s schedule (cordon, drain) under `prefix`.
pub fn schedule_key(prefix: &str, name: &str) -> String {
    format!("{prefix}schedule/{name}")
}

/// The kinds of keys under the prefix, and how each changes the core.
#[derive(Clone)]
struct Keys {
    nodes: String,
    left: String,
    schedule: String,
    placements: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            nodes: format!("{prefix}nodes/"),
            left: format!("{prefix}left/"),
            schedule: format!("{prefix}schedule/"),
            placements: format!("{prefix}placements/"),
        }
    }

    /// Applies one key's put (`put`) or delete to `f`; returns the core's decisions.
    fn apply(
        &self,
        f: &mut Fleet,
        now: Duration,
        put: bool,
        kv: &etcd_client::KeyValue,
    ) -> Vec<Decision> {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(name) = key.strip_prefix(&self.nodes) {
            if !put {
                return f.node_gone(now, name);
            }
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(r) if r.name == name => return f.node_seen(now, r),
                Ok(r) => {
                    tracing::warn!(%key, record = r.name, "ignoring a node record under another node's key")
                }
                Err(e) => tracing::warn!(%key, error = %e, "ignoring a bad node record"),
            }
        } else if let Some(name) = key.strip_prefix(&self.left) {
            f.set_left(name, put);
        } else if let Some(name) = key.strip_prefix(&self.schedule) {
            let s = if put {
                Schedule::parse(kv.value())
            } else {
                Schedule::Ready
            };
            f.set_schedule(name, s);
        } else if let Some(env) = key.strip_prefix(&self.placements) {
            if !put {
                f.release(env);
            } else if let Ok(p) = serde_json::from_slice::<Claim>(kv.value()) {
                f.insert_placement(env, &p.node, p.needs);
            }
        }
        Vec::new()
    }
}

impl Member {
    /// Connects, takes a lease of `cfg.lease_ttl_s`, publishes `record` under it, starts the
    /// keep-alive and the watch of every node. Returns once the existing nodes are loaded.
    pub async fn join(cfg: &FleetConfig, record: NodeRecord) -> Result<Member, MemberError> {
        if cfg.etcd.is_empty() {
            return Err(MemberError::NoEndpoints);
        }
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(5));
        let client = Client::connect(&cfg.etcd, Some(opts))
            .await
            .map_err(|source| MemberError::Connect {
                endpoints: cfg.etcd.join(","),
                source: Box::new(source),
            })?;
        let endpoints = cfg.etcd.join(",");
        let name = record.name.clone();
        let mut c = client.clone();
        let ttl = i64::try_from(cfg.lease_ttl_s.max(1)).unwrap_or(i64::MAX);
        let lease = c
            .lease_grant(ttl, None)
            .await
            .map_err(|source| MemberError::Lease {
                node: name.clone(),
                endpoints: endpoints.clone(),
                source: Box::new(source),
            })?
            .id();
        let value = serde_json::to_vec(&record).map_err(MemberError::Encode)?;
        // The record, and the withdrawal of any "left" a clean shutdown wrote, at once.
        let txn = Txn::new().and_then([
            TxnOp::put(
                node_key(&cfg.prefix, &name),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::delete(left_key(&cfg.prefix, &name), None),
        ]);
        c.txn(txn).await.map_err(|source| MemberError::Publish {
            node: name.clone(),
            endpoints: endpoints.clone(),
            source: Box::new(source),
        })?;
        let expired = Arc::new(AtomicBool::new(false));
        let keepalive = tokio::spawn(keep_alive(
            client.clone(),
            lease,
            Duration::from_secs(cfg.lease_ttl_s.max(1)) / 3,
            name.clone(),
            expired.clone(),
        ));

        let fleet = Arc::new(Mutex::new(Fleet::new(LossPolicy::MarkLost)));
        let decisions = Arc::new(Mutex::new(Vec::new()));
        let origin = Instant::now();
        let keys = Keys::new(&cfg.prefix);
        // Everything under the prefix: node records, operators' schedules, placements.
        let got = c
            .get(cfg.prefix.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| MemberError::Watch {
                endpoints: endpoints.clone(),
                source: Box::new(e),
            })?;
        let rev = got.header().map(|h| h.revision()).unwrap_or(0);
        {
            let mut f = fleet.lock().expect("fleet lock");
            for kv in got.kvs() {
                keys.apply(&mut f, origin.elapsed(), true, kv);
            }
        }
        let (etcd_watcher, stream) = c
            .watch(
                cfg.prefix.clone(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            )
            .await
            .map_err(|e| MemberError::Watch {
                endpoints: endpoints.clone(),
                source: Box::new(e),
            })?;
        let (tx, changes) = watch::channel(0u64);
        let watcher = tokio::spawn(apply_watch(
            etcd_watcher,
            stream,
            keys,
            fleet.clone(),
            decisions.clone(),
            origin,
            tx,
        ));
        Ok(Member {
            name,
            endpoints,
            prefix: cfg.prefix.clone(),
            client,
            lease,
            fleet,
            changes,
            decisions,
            keepalive: Some(keepalive),
            expired,
            watcher,
            origin,
        })
    }

    /// Why this membership no longer holds, if it does not: its lease expired (this node
    /// was cut off from etcd for longer than its TTL, and the fleet saw it go), its own
    /// record was deleted, or its watch ended (its view of the fleet is frozen). Either way
    /// the node must join again.
    pub fn broken(&self) -> Option<&'static str> {
        let gone = matches!(
            self.fleet
                .lock()
                .expect("fleet lock")
                .nodes()
                .get(&self.name)
                .map(|n| n.state),
            Some(NodeState::Gone { .. })
        );
        if self.expired.load(Ordering::SeqCst) {
            Some("this node's fleet lease expired")
        } else if gone {
            // Its lease was revoked, or the key deleted by hand (the lease may live on).
            Some("this node's record vanished from etcd")
        } else if self.watcher.is_finished() {
            Some("the watch of the fleet in etcd ended")
        } else {
            None
        }
    }

    /// Time since this member joined: the clock of its core's `since` and `last_seen`.
    pub fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// Replaces this node's record (new load, labels) under its lease.
    pub async fn publish(&self, record: &NodeRecord) -> Result<(), MemberError> {
        let value = serde_json::to_vec(record).map_err(MemberError::Encode)?;
        self.client
            .clone()
            .put(
                node_key(&self.prefix, &self.name),
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )
            .await
            .map_err(|source| self.publish_err(source))?;
        Ok(())
    }

    /// Stops the tasks and revokes the lease if etcd answers within `within`; for a member
    /// replaced by a new one (whose record already took over the key), so nothing of the
    /// old one lingers.
    pub async fn abandon(mut self, within: Duration) {
        self.stop_keepalive();
        self.watcher.abort();
        let mut c = self.client.clone();
        let _ = tokio::time::timeout(within, c.lease_revoke(self.lease)).await;
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fleet as last seen (a copy).
    pub fn fleet(&self) -> Fleet {
        self.fleet.lock().expect("fleet lock").clone()
    }

    /// Names of the live nodes.
    pub fn alive(&self) -> Vec<String> {
        self.fleet.lock().expect("fleet lock").alive()
    }

    /// Decisions the core made from watch events since the last call (e.g. lost envs).
    pub fn take_decisions(&self) -> Vec<Decision> {
        std::mem::take(&mut *self.decisions.lock().expect("decisions lock"))
    }

    /// Chooses a node for `env` in this member's view and records it (locally: the etcd
    /// claim transaction is still to come, docs/fleet.md).
    pub fn place(&self, env: &str, needs: Needs) -> Result<String, MemberError> {
        Ok(self.fleet.lock().expect("fleet lock").place(env, needs)?)
    }

    /// Chooses a node for `env` from the fleet as etcd holds it (live nodes and every
    /// claimed placement, read at one revision) and claims it in one transaction: it
    /// succeeds only if `env` has no placement yet and no other claim touched the chosen
    /// node since that read (`<prefix>commit/<node>`'s revision). A lost race re-reads and
    /// chooses again, so concurrent claims from any members never overcommit a node.
    pub async fn claim(&self, env: &str, needs: Needs) -> Result<String, MemberError> {
        self.claim_with_spec(env, needs, None).await
    }

    /// [`Member::claim`], with the spec the chosen node is to create (when it is not this
    /// node) in the claim.
    pub async fn claim_with_spec(
        &self,
        env: &str,
        needs: Needs,
        spec: Option<&proto::spec::Spec>,
    ) -> Result<String, MemberError> {
        let mut c = self.client.clone();
        let claim_err = |source| MemberError::Claim {
            env: env.to_string(),
            endpoints: self.endpoints.clone(),
            source: Box::new(source),
        };
        let keys = Keys::new(&self.prefix);
        let commits = format!("{}commit/", self.prefix);
        let env_key = format!("{}{env}", keys.placements);
        for _ in 0..CLAIM_ATTEMPTS {
            let got = c
                .get(self.prefix.clone(), Some(GetOptions::new().with_prefix()))
                .await
                .map_err(claim_err)?;
            let mut view = Fleet::new(LossPolicy::MarkLost);
            let mut revs = std::collections::BTreeMap::new();
            for kv in got.kvs() {
                let key = String::from_utf8_lossy(kv.key());
                if let Some(node) = key.strip_prefix(&commits) {
                    revs.insert(node.to_string(), kv.mod_revision());
                } else {
                    keys.apply(&mut view, Duration::ZERO, true, kv);
                }
            }
            let node = view.place(env, needs.clone())?;
            let value = serde_json::to_vec(&Claim {
                node: node.clone(),
                needs: needs.clone(),
                spec: spec.filter(|_| node != self.name).cloned(),
                by: self.name.clone(),
            })
            .map_err(MemberError::Encode)?;
            let commit_key = format!("{commits}{node}");
            let txn = Txn::new()
                .when([
                    Compare::create_revision(env_key.clone(), CompareOp::Equal, 0),
                    Compare::mod_revision(
                        commit_key.clone(),
                        CompareOp::Equal,
                        revs.get(&node).copied().unwrap_or(0),
                    ),
                ])
                .and_then([
                    TxnOp::put(env_key.clone(), value, None),
                    TxnOp::put(commit_key, env, None),
                ]);
            if c.txn(txn).await.map_err(claim_err)?.succeeded() {
                self.fleet
                    .lock()
                    .expect("fleet lock")
                    .insert_placement(env, &node, needs);
                return Ok(node);
            }
        }
        Err(MemberError::Contended {
            env: env.to_string(),
            attempts: CLAIM_ATTEMPTS,
        })
    }

    /// The claim of `env` as etcd holds it.
    pub async fn claimed(&self, env: &str) -> Result<Option<Claim>, MemberError> {
        let key = format!("{}{env}", Keys::new(&self.prefix).placements);
        let got = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|e| self.env_err(env, e))?;
        Ok(got
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Writes what this node reports of an environment it runs.
    pub async fn put_env(&self, e: &FleetEnv) -> Result<(), MemberError> {
        let value = serde_json::to_vec(e).map_err(MemberError::Encode)?;
        self.client
            .clone()
            .put(env_key(&self.prefix, &e.name), value, None)
            .await
            .map_err(|err| self.env_err(&e.name, err))?;
        Ok(())
    }

    /// What the fleet reports of `name`, if it was placed through the fleet.
    pub async fn env(&self, name: &str) -> Result<Option<FleetEnv>, MemberError> {
        let got = self
            .client
            .clone()
            .get(env_key(&self.prefix, name), None)
            .await
            .map_err(|e| self.env_err(name, e))?;
        Ok(got
            .kvs()
            .first()
            .and_then(|kv| serde_json::from_slice(kv.value()).ok()))
    }

    /// Every environment placed through the fleet, by name.
    pub async fn envs(&self) -> Result<Vec<FleetEnv>, MemberError> {
        let got = self
            .client
            .clone()
            .get(
                env_key(&self.prefix, ""),
                Some(GetOptions::new().with_prefix()),
            )
            .await
            .map_err(|e| self.env_err("*", e))?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect())
    }

    /// Forgets `name`'s report (destroyed, or a failure its requester has read).
    pub async fn delete_env(&self, name: &str) -> Result<(), MemberError> {
        self.client
            .clone()
            .delete(env_key(&self.prefix, name), None)
            .await
            .map_err(|e| self.env_err(name, e))?;
        Ok(())
    }

    /// Asks `node` to run `req`, under this member's lease; returns the request's id.
    pub async fn relay(&self, node: &str, req: &Relayed) -> Result<String, MemberError> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let unix_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{unix_ns}-{n}", self.name);
        let value = serde_json::to_vec(req).map_err(MemberError::Encode)?;
        self.client
            .clone()
            .put(
                format!("{}relay/{node}/{id}", self.prefix),
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )
            .await
            .map_err(|e| self.env_err(&req.env, e))?;
        Ok(id)
    }

    /// The answer to relayed request `id`, once there (read and deleted).
    pub async fn take_answer(&self, id: &str) -> Result<Option<RelayAnswer>, MemberError> {
        let key = format!("{}answers/{id}", self.prefix);
        let mut c = self.client.clone();
        let got = c
            .get(key.clone(), None)
            .await
            .map_err(|e| self.env_err(id, e))?;
        let Some(kv) = got.kvs().first() else {
            return Ok(None);
        };
        let answer = serde_json::from_slice(kv.value()).ok();
        c.delete(key, None).await.map_err(|e| self.env_err(id, e))?;
        Ok(answer)
    }

    /// The requests relayed to this node, with their ids (each is deleted once answered).
    pub async fn relayed_here(&self) -> Result<Vec<(String, Relayed)>, MemberError> {
        let dir = format!("{}relay/{}/", self.prefix, self.name);
        let got = self
            .client
            .clone()
            .get(dir.clone(), Some(GetOptions::new().with_prefix()))
            .await
            .map_err(|e| self.env_err("relay", e))?;
        Ok(got
            .kvs()
            .iter()
            .filter_map(|kv| {
                let id = String::from_utf8_lossy(kv.key())
                    .strip_prefix(&dir)?
                    .to_string();
                Some((id, serde_json::from_slice(kv.value()).ok()?))
            })
            .collect())
    }

    /// Answers relayed request `id` and removes the request, in one transaction.
    pub async fn answer(&self, id: &str, answer: &RelayAnswer) -> Result<(), MemberError> {
        let mut c = self.client.clone();
        let lease = c
            .lease_grant(ANSWER_TTL_S, None)
            .await
            .map_err(|e| self.env_err(id, e))?
            .id();
        let value = serde_json::to_vec(answer).map_err(MemberError::Encode)?;
        let txn = Txn::new().and_then([
            TxnOp::put(
                format!("{}answers/{id}", self.prefix),
                value,
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::delete(format!("{}relay/{}/{id}", self.prefix, self.name), None),
        ]);
        c.txn(txn).await.map_err(|e| self.env_err(id, e))?;
        Ok(())
    }

    fn publish_err(&self, source: etcd_client::Error) -> MemberError {
        MemberError::Publish {
            node: self.name.clone(),
            endpoints: self.endpoints.clone(),
            source: Box::new(source),
        }
    }

    fn env_err(&self, env: &str, source: etcd_client::Error) -> MemberError {
        MemberError::Env {
            env: env.to_string(),
            endpoints: self.endpoints.clone(),
            source: Box::new(source),
        }
    }

    /// Deletes `placements/<env>` if it places `env` on this node (a claim on another node is
    /// that node's to release); returns whether it was deleted. The delete is conditional on
    /// the key not having changed since it was read.
    pub async fn release(&self, env: &str) -> Result<bool, MemberError> {
        let mut c = self.client.clone();
        let err = |source| MemberError::Release {
            env: env.to_string(),
            endpoints: self.endpoints.clone(),
            source: Box::new(source),
        };
        let key = format!("{}placements/{env}", self.prefix);
        let got = c.get(key.clone(), None).await.map_err(err)?;
        let Some(kv) = got.kvs().first() else {
            return Ok(false);
        };
        match serde_json::from_slice::<Claim>(kv.value()) {
            Ok(claim) if claim.node == self.name => {}
            _ => return Ok(false),
        }
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                kv.mod_revision(),
            )])
            .and_then([TxnOp::delete(key, None)]);
        Ok(c.txn(txn).await.map_err(err)?.succeeded())
    }

    /// Waits until `pred` holds for the fleet, or `timeout` passes; returns whether it held.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Fleet) -> bool) -> bool {
        let mut rx = self.changes.clone();
        let deadline = Instant::now() + timeout;
        loop {
            if pred(&self.fleet.lock().expect("fleet lock")) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return pred(&self.fleet.lock().expect("fleet lock")),
            }
        }
    }

    /// Stops refreshing the lease without revoking it, as a hung or cut-off host would:
    /// etcd deletes this node's key once the TTL runs out.
    pub fn stop_keepalive(&mut self) {
        if let Some(k) = self.keepalive.take() {
            k.abort();
        }
    }

    /// Leaves at once: revokes the lease (the key goes with it) and stops the tasks.
    pub async fn leave(mut self) -> Result<(), MemberError> {
        self.stop_keepalive();
        self.watcher.abort();
        // Say so first (`left/<name>`, in the same revision as the record's delete), so the
        // others tell a shutdown from a loss.
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let txn = Txn::new().and_then([
            TxnOp::put(left_key(&self.prefix, &self.name), since.to_string(), None),
            TxnOp::delete(node_key(&self.prefix, &self.name), None),
        ]);
        self.client
            .txn(txn)
            .await
            .map_err(|source| self.publish_err(source))?;
        self.client
            .lease_revoke(self.lease)
            .await
            .map_err(|source| MemberError::Lease {
                node: self.name.clone(),
                endpoints: self.endpoints.clone(),
                source: Box::new(source),
            })?;
        Ok(())
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop_keepalive();
        self.watcher.abort();
    }
}

async fn keep_alive(
    mut client: Client,
    lease: i64,
    every: Duration,
    node: String,
    expired: Arc<AtomicBool>,
) {
    let every = every.max(Duration::from_millis(200));
    loop {
        match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut stream)) => loop {
                if let Err(e) = keeper.keep_alive().await {
                    tracing::warn!(node, error = %crate::error_chain(&e), "fleet lease keep-alive failed");
                    break;
                }
                match stream.message().await {
                    Ok(Some(r)) if r.ttl() > 0 => {}
                    Ok(_) => {
                        tracing::error!(node, "fleet lease expired: the fleet saw this node go");
                        expired.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node, error = %crate::error_chain(&e), "fleet lease keep-alive failed");
                        break;
                    }
                }
                tokio::time::sleep(every).await;
            },
            Err(e) => {
                tracing::warn!(node, error = %crate::error_chain(&e), "cannot reach etcd to keep the fleet lease")
            }
        }
        tokio::time::sleep(every).await;
    }
}

async fn apply_watch(
    _watcher: etcd_client::Watcher,
    mut stream: etcd_client::WatchStream,
    keys: Keys,
    fleet: Arc<Mutex<Fleet>>,
    decisions: Arc<Mutex<Vec<Decision>>>,
    origin: Instant,
    tx: watch::Sender<u64>,
) {
    let mut n = 0u64;
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => {
                tracing::warn!("fleet watch ended");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "fleet watch failed");
                return;
            }
        };
        if resp.canceled() {
            tracing::warn!(
                reason = resp.cancel_reason(),
                "fleet watch cancelled by etcd"
            );
            return;
        }
        let mut out = Vec::new();
        {
            let mut f = fleet.lock().expect("fleet lock");
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let put = ev.event_type() == EventType::Put;
                out.extend(keys.apply(&mut f, origin.elapsed(), put, kv));
            }
        }
        decisions.lock().expect("decisions lock").extend(out);
        n += 1;
        let _ = tx.send(n);
    }
}
