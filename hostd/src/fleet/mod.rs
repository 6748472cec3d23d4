//! Fleet membership and placement (#17, docs/fleet.md). `placement` is the sans-IO core
//! (nodes, leases, where an environment goes, what a lost node means); `member` is its etcd
//! driver: it registers this node under a lease, keeps the lease alive and feeds the
//! others' records from a watch into the core.

pub mod member;
pub mod placement;

pub use member::{Claim, Member, MemberError};
pub use placement::{
    Decision, Fleet, LossPolicy, Needs, Node, NodeRecord, NodeState, PlaceError, Placement,
    PlacementState,
};
