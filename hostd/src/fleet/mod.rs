//! Fleet membership and placement (#17, docs/fleet.md). `placement` is the sans-IO core
//! (nodes, leases, where an environment goes, what a lost node means); `member` is its etcd
//! driver: it registers this node under a lease, keeps the lease alive and feeds the
//! others' records from a watch into the core; `service` is hostd's membership while it
//! runs (join and re-join, load, leave) and the operators' `genos fleet` verbs.

pub mod member;
pub mod placement;
pub mod service;

pub use member::{Claim, Member, MemberError};
pub use member::{FleetEnv, RelayAnswer, Relayed};
pub use placement::{
    Decision, Fleet, Load, LossPolicy, Needs, Node, NodeRecord, NodeState, PlaceError, Placement,
    PlacementState, Schedule,
};
pub use service::{Created, FleetError, Membership, NodeView};
