//! The sans-IO fleet core: the nodes this hostd knows of (from etcd), the environments
//! placed on them, where a new environment goes, and what happens when a node's lease lapses
//! or the node comes back. Time is passed in (`now`, a [`Duration`] from any fixed origin);
//! nothing here does I/O, so every rule is tested with simulated time.
//!
//! Placement is **least-loaded by dominant share**: among the live, uncordoned nodes whose
//! labels match and that admit the request after overcommit, the one whose larger of CPU and
//! memory use (as a fraction of its limit, after the request) is smallest; ties go to the
//! smaller node name. Spreading bounds what one host's loss takes down (#17 §3) and keeps
//! viewers' encoders on different hosts; bin-packing's gain, room for a later large request,
//! is small when specs are a few vCPUs and GiB and hosts hold dozens.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What a node publishes under its lease (`<prefix>nodes/<name>`, JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    /// Where viewers reach the node's stream server (`host:port`).
    pub address: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
    /// Operator labels, e.g. `zone=a`, `gpu=false`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// No new placements (drain/cordon); existing environments stay.
    #[serde(default)]
    pub cordoned: bool,
    /// The lease's time to live, in seconds.
    pub ttl_s: u64,
    /// What the node runs now (its own environments, as its store holds them).
    #[serde(default)]
    pub load: Load,
}

/// A node's live environments that no fleet placement on it covers (created through its own
/// admin socket), and what they hold, as the node publishes it. Placement counts a node's
/// use as this plus its placements, so each environment is counted once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Environments not stopped, destroyed or failed.
    pub running: u32,
    pub vcpus: u64,
    pub memory_mib: u64,
}

/// Whether placement may choose a node: an operator's decision, kept in etcd under
/// `<prefix>schedule/<node>` (absent: `Ready`), so every member honours it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    #[default]
    Ready,
    /// No new placements; what runs stays.
    Cordoned,
    /// No new placements; what runs finishes there and is not replaced.
    Draining,
}

impl Schedule {
    /// The value stored in etcd (`cordoned`, `draining`); `Ready` is the key's absence.
    pub fn as_str(self) -> &'static str {
        match self {
            Schedule::Ready => "ready",
            Schedule::Cordoned => "cordoned",
            Schedule::Draining => "draining",
        }
    }

    /// Reads a stored value; anything unknown counts as cordoned (never placed on).
    pub fn parse(value: &[u8]) -> Schedule {
        match value {
            b"ready" => Schedule::Ready,
            b"draining" => Schedule::Draining,
            _ => Schedule::Cordoned,
        }
    }
}

impl NodeRecord {
    /// vCPUs admitted after overcommit.
    pub fn cpu_limit(&self) -> u64 {
        (f64::from(self.vcpus) * self.cpu_overcommit).floor() as u64
    }
    /// MiB admitted after overcommit.
    pub fn mem_limit(&self) -> u64 {
        (self.memory_mib as f64 * self.memory_overcommit).floor() as u64
    }
}

/// What an environment needs from the node it runs on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Needs {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Labels the node must carry with these values.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Whether a node's lease is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum NodeState {
    Alive,
    /// Its key vanished (lease lapsed or revoked) at `since`.
    Gone {
        since: Duration,
    },
}

/// A node as the core sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    pub record: NodeRecord,
    pub state: NodeState,
    pub last_seen: Duration,
}

/// Where an environment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PlacementState {
    Placed,
    /// Its node was lost at `since`; it is not running anywhere the fleet knows of.
    Lost {
        since: Duration,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    pub node: String,
    pub needs: Needs,
    pub state: PlacementState,
}

/// What the fleet does with a lost node's environments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossPolicy {
    /// Mark them lost and leave them so (an operator or the node's return decides).
    MarkLost,
    /// Mark them lost; once lost for `after` with the node still gone, place them anew on
    /// another node (the driver then creates them there, e.g. from their spec and disk).
    Reschedule { after: Duration },
}

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `env` on `node` is lost (its node's lease lapsed).
    Lost { env: String, node: String },
    /// `env` goes to `to` (was on the lost `from`).
    Rescheduled {
        env: String,
        from: String,
        to: String,
    },
    /// No node can take lost `env` now; it stays lost and is tried again on the next tick.
    Unplaceable { env: String },
    /// `node` came back and still holds `env`, which is placed there again.
    Readopted { env: String, node: String },
    /// `node` came back but `env` was rescheduled meanwhile: `node` must stop its copy.
    StopStale { env: String, node: String },
}

/// Why no node was chosen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlaceError {
    #[error("the fleet has no live node")]
    NoNodes,
    #[error("no live node carries the labels {0}")]
    NoLabels(String),
    #[error("no node has room for {vcpus} vCPUs and {memory_mib} MiB ({nodes} live nodes with matching labels; all cordoned or full)")]
    NoRoom {
        vcpus: u32,
        memory_mib: u64,
        nodes: usize,
    },
    #[error("environment {0} is already placed")]
    Exists(String),
}

/// The fleet as one hostd sees it.
#[derive(Debug, Clone)]
pub struct Fleet {
    nodes: BTreeMap<String, Node>,
    placements: BTreeMap<String, Placement>,
    /// (environment, node it was rescheduled away from while that node was gone).
    stale: Vec<(String, String)>,
    /// Operators' cordons and drains, by node (absent: ready).
    schedule: BTreeMap<String, Schedule>,
    /// Nodes that said they were leaving before their record went (a clean shutdown, not
    /// a loss); cleared when the node is seen again.
    left: std::collections::BTreeSet<String>,
    policy: LossPolicy,
}

impl Fleet {
    pub fn new(policy: LossPolicy) -> Fleet {
        Fleet {
            nodes: BTreeMap::new(),
            placements: BTreeMap::new(),
            stale: Vec::new(),
            schedule: BTreeMap::new(),
            left: Default::default(),
            policy,
        }
    }

    /// `node` announced (or withdrew) that it is leaving: its record going next is a clean
    /// shutdown rather than a lapsed lease. Its environments are handled as for a loss.
    pub fn set_left(&mut self, node: &str, left: bool) {
        if left {
            self.left.insert(node.to_string());
        } else {
            self.left.remove(node);
        }
    }

    /// Whether `node` left on purpose (and has not come back).
    pub fn has_left(&self, node: &str) -> bool {
        self.left.contains(node)
    }

    /// An operator cordoned, drained or uncordoned `node` (it need not be known yet).
    pub fn set_schedule(&mut self, node: &str, schedule: Schedule) {
        if schedule == Schedule::Ready {
            self.schedule.remove(node);
        } else {
            self.schedule.insert(node.to_string(), schedule);
        }
    }

    /// Whether placement may choose `node`, as operators decided.
    pub fn schedule(&self, node: &str) -> Schedule {
        self.schedule.get(node).copied().unwrap_or_default()
    }

    pub fn nodes(&self) -> &BTreeMap<String, Node> {
        &self.nodes
    }

    pub fn placements(&self) -> &BTreeMap<String, Placement> {
        &self.placements
    }

    /// Names of the nodes whose lease is live.
    pub fn alive(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Alive)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The environments placed on `node`, by name.
    pub fn placed_on(&self, node: &str) -> Vec<String> {
        self.placements
            .iter()
            .filter(|(_, p)| p.node == node)
            .map(|(env, _)| env.clone())
            .collect()
    }

    /// vCPUs and MiB committed on `node`: its placed environments and what it publishes it
    /// runs besides them ([`Load`]).
    pub fn committed(&self, node: &str) -> (u64, u64) {
        let local = self
            .nodes
            .get(node)
            .map_or((0, 0), |n| (n.record.load.vcpus, n.record.load.memory_mib));
        self.placements
            .values()
            .filter(|p| p.node == node && p.state == PlacementState::Placed)
            .fold(local, |(c, m), p| {
                (c + u64::from(p.needs.vcpus), m + p.needs.memory_mib)
            })
    }

    /// A node's record was written (joined, or changed): it is alive. A node that returns
    /// after being lost gets its environments back, except those placed elsewhere meanwhile.
    pub fn node_seen(&mut self, now: Duration, record: NodeRecord) -> Vec<Decision> {
        let name = record.name.clone();
        self.left.remove(&name);
        let returned = matches!(
            self.nodes.get(&name).map(|n| n.state),
            Some(NodeState::Gone { .. })
        );
        self.nodes.insert(
            name.clone(),
            Node {
                record,
                state: NodeState::Alive,
                last_seen: now,
            },
        );
        if !returned {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (env, p) in self.placements.iter_mut() {
            if p.node == name && matches!(p.state, PlacementState::Lost { .. }) {
                p.state = PlacementState::Placed;
                out.push(Decision::Readopted {
                    env: env.clone(),
                    node: name.clone(),
                });
            }
        }
        let (stale, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stale)
            .into_iter()
            .partition(|(_, node)| *node == name);
        self.stale = keep;
        out.extend(
            stale
                .into_iter()
                .map(|(env, node)| Decision::StopStale { env, node }),
        );
        out
    }

    /// The node's key is gone (its lease lapsed or was revoked): its environments are lost.
    pub fn node_gone(&mut self, now: Duration, name: &str) -> Vec<Decision> {
        let Some(node) = self.nodes.get_mut(name) else {
            return Vec::new();
        };
        if node.state != NodeState::Alive {
            return Vec::new();
        }
        node.state = NodeState::Gone { since: now };
        let mut out = Vec::new();
        for (env, p) in self.placements.iter_mut() {
            if p.node == name && p.state == PlacementState::Placed {
                p.state = PlacementState::Lost { since: now };
                out.push(Decision::Lost {
                    env: env.clone(),
                    node: name.to_string(),
                });
            }
        }
        out
    }

    /// Under [`LossPolicy::Reschedule`], places the environments lost for long enough.
    pub fn tick(&mut self, now: Duration) -> Vec<Decision> {
        let LossPolicy::Reschedule { after } = self.policy else {
            return Vec::new();
        };
        let due: Vec<String> = self
            .placements
            .iter()
            .filter(
                |(_, p)| matches!(p.state, PlacementState::Lost { since } if now >= since + after),
            )
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for env in due {
            let p = self.placements[&env].clone();
            match self.choose(&p.needs) {
                Ok(to) => {
                    out.push(Decision::Rescheduled {
                        env: env.clone(),
                        from: p.node.clone(),
                        to: to.clone(),
                    });
                    let slot = self.placements.get_mut(&env).expect("due env exists");
                    slot.node = to;
                    slot.state = PlacementState::Placed;
                    // The old node, should it return, must stop its copy.
                    self.stale.push((env, p.node));
                }
                Err(_) => out.push(Decision::Unplaceable { env }),
            }
        }
        out
    }

    /// The node `needs` should go to, without recording anything.
    pub fn choose(&self, needs: &Needs) -> Result<String, PlaceError> {
        let live: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Alive)
            .collect();
        if live.is_empty() {
            return Err(PlaceError::NoNodes);
        }
        let labelled: Vec<&Node> = live
            .into_iter()
            .filter(|n| {
                needs
                    .labels
                    .iter()
                    .all(|(k, v)| n.record.labels.get(k) == Some(v))
            })
            .collect();
        if labelled.is_empty() {
            let want: Vec<String> = needs
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Err(PlaceError::NoLabels(want.join(",")));
        }
        let mut best: Option<(f64, &str)> = None;
        for n in &labelled {
            if n.record.cordoned || self.schedule(&n.record.name) != Schedule::Ready {
                continue;
            }
            let (cpu, mem) = self.committed(&n.record.name);
            let (cpu, mem) = (cpu + u64::from(needs.vcpus), mem + needs.memory_mib);
            let (cl, ml) = (n.record.cpu_limit(), n.record.mem_limit());
            if cpu > cl || mem > ml {
                continue;
            }
            let share = |used: u64, limit: u64| {
                if limit == 0 {
                    0.0
                } else {
                    used as f64 / limit as f64
                }
            };
            let score = share(cpu, cl).max(share(mem, ml));
            // Nodes are visited in name order, so a tie keeps the smaller name.
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, &n.record.name));
            }
        }
        best.map(|(_, name)| name.to_string())
            .ok_or(PlaceError::NoRoom {
                vcpus: needs.vcpus,
                memory_mib: needs.memory_mib,
                nodes: labelled.len(),
            })
    }

    /// Chooses a node for `env` and records the placement.
    pub fn place(&mut self, env: &str, needs: Needs) -> Result<String, PlaceError> {
        if self.placements.contains_key(env) {
            return Err(PlaceError::Exists(env.to_string()));
        }
        let node = self.choose(&needs)?;
        self.placements.insert(
            env.to_string(),
            Placement {
                node: node.clone(),
                needs,
                state: PlacementState::Placed,
            },
        );
        Ok(node)
    }

    /// Records a placement made elsewhere (read from etcd), replacing any earlier one.
    pub fn insert_placement(&mut self, env: &str, node: &str, needs: Needs) {
        self.placements.insert(
            env.to_string(),
            Placement {
                node: node.to_string(),
                needs,
                state: PlacementState::Placed,
            },
        );
    }

    /// The environment was destroyed: its resources are free again.
    pub fn release(&mut self, env: &str) -> Option<Placement> {
        self.placements.remove(env)
    }
}
