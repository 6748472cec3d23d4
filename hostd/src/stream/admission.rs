//! Who may take the stream server's resources, and when (sans-IO: the server's accept loop
//! asks, this module counts).
//!
//! A connection passes three stages, each with its own bound:
//!
//! 1. **Unvalidated handshake**: the peer's address is unproven (it may be spoofed), so it is
//!    counted only globally, never against its address: a flood with a victim's source address
//!    must not lock the victim out. Once `retry_threshold` of these are in progress, new ones
//!    get a stateless QUIC Retry instead and cost nothing until they echo its token.
//! 2. **Pending**: the address is proven (Retry token, or the handshake completed) but the
//!    peer has not authenticated yet. Capped per source prefix and in total; the server gives
//!    these a short handshake deadline and a Hello deadline.
//! 3. **Session**: a valid token Hello was accepted. Only now is the peer charged against the
//!    session caps (per prefix and total).
//!
//! Per-source limits are by prefix, not by address: IPv4 /32, IPv6 /64 (one customer line
//! usually holds a whole /64; counting single IPv6 addresses would be no limit at all).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

/// The source a limit is kept for: an IPv4 address, or the /64 around an IPv6 address.
/// IPv4-mapped IPv6 addresses (dual-stack sockets) count as their IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SourcePrefix(IpAddr);

impl SourcePrefix {
    pub fn of(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V4(v4) => SourcePrefix(IpAddr::V4(v4)),
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                SourcePrefix(IpAddr::V6(Ipv6Addr::from(bits)))
            }
        }
    }
}

impl std::fmt::Display for SourcePrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}/32"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// The bounds of each stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Unvalidated handshakes in progress before new ones must answer a Retry.
    pub retry_threshold: usize,
    /// Pending (address proven, not authenticated) connections from one prefix.
    pub max_pending_per_prefix: usize,
    /// Pending connections in total.
    pub max_pending: usize,
    /// Authenticated sessions from one prefix.
    pub max_sessions_per_prefix: usize,
    /// Authenticated sessions in total.
    pub max_sessions: usize,
}

/// What to do with a new connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Handshake it; the slot it holds is the given stage.
    Accept(Stage),
    /// Answer with a stateless Retry.
    Retry,
    /// Refuse it (CONNECTION_REFUSED).
    Refuse(Full),
}

/// The stage a connection's slot is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Unvalidated,
    Pending(SourcePrefix),
    Session(SourcePrefix),
}

/// Which bound was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    #[error("too many unauthenticated connections from {0}")]
    PendingFromPrefix(SourcePrefix),
    #[error("too many unauthenticated connections")]
    Pending,
    #[error("too many viewers from {prefix} (at most {max})")]
    SessionsFromPrefix { prefix: SourcePrefix, max: usize },
    #[error("too many viewers (at most {0})")]
    Sessions(usize),
    #[error("address validation required but not possible")]
    Unvalidatable,
}

/// Counts of every stage.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    unvalidated: usize,
    pending: usize,
    sessions: usize,
    pending_by_prefix: HashMap<SourcePrefix, usize>,
    sessions_by_prefix: HashMap<SourcePrefix, usize>,
}

fn bump(map: &mut HashMap<SourcePrefix, usize>, p: SourcePrefix) {
    *map.entry(p).or_default() += 1;
}

fn drop_one(map: &mut HashMap<SourcePrefix, usize>, p: SourcePrefix) {
    if let Some(n) = map.get_mut(&p) {
        *n -= 1;
        if *n == 0 {
            map.remove(&p);
        }
    }
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            unvalidated: 0,
            pending: 0,
            sessions: 0,
            pending_by_prefix: HashMap::new(),
            sessions_by_prefix: HashMap::new(),
        }
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    /// A new connection attempt from `ip`. `validated`: its Initial carried a valid Retry or
    /// NEW_TOKEN token. `may_retry`: a Retry can still be sent. An accepted attempt holds
    /// the returned stage's slot until [`Admission::release`].
    pub fn on_incoming(&mut self, ip: IpAddr, validated: bool, may_retry: bool) -> Decision {
        let l = self.limits();
        if !validated {
            if self.unvalidated < l.retry_threshold {
                self.unvalidated += 1;
                return Decision::Accept(Stage::Unvalidated);
            }
            if may_retry {
                return Decision::Retry;
            }
            return Decision::Refuse(Full::Unvalidatable);
        }
        let prefix = SourcePrefix::of(ip);
        match self.take_pending(prefix) {
            Ok(()) => Decision::Accept(Stage::Pending(prefix)),
            Err(full) => Decision::Refuse(full),
        }
    }

    fn take_pending(&mut self, prefix: SourcePrefix) -> Result<(), Full> {
        let l = self.limits();
        if self.pending_by_prefix.get(&prefix).copied().unwrap_or(0) >= l.max_pending_per_prefix {
            return Err(Full::PendingFromPrefix(prefix));
        }
        if self.pending >= l.max_pending {
            return Err(Full::Pending);
        }
        self.pending += 1;
        bump(&mut self.pending_by_prefix, prefix);
        Ok(())
    }

    /// The handshake completed, which proves the address: an unvalidated slot becomes a
    /// pending slot of `ip`'s prefix. On refusal the old slot is released.
    pub fn handshake_done(&mut self, stage: Stage, ip: IpAddr) -> Result<Stage, Full> {
        match stage {
            Stage::Unvalidated => {
                self.release(stage);
                let prefix = SourcePrefix::of(ip);
                self.take_pending(prefix).map(|()| Stage::Pending(prefix))
            }
            other => Ok(other),
        }
    }

    /// The peer authenticated: its pending slot becomes a session slot. On refusal the
    /// pending slot is released.
    pub fn authenticated(&mut self, stage: Stage) -> Result<Stage, Full> {
        let Stage::Pending(prefix) = stage else {
            return Ok(stage);
        };
        self.release(stage);
        let l = self.limits();
        if self.sessions_by_prefix.get(&prefix).copied().unwrap_or(0) >= l.max_sessions_per_prefix {
            return Err(Full::SessionsFromPrefix {
                prefix,
                max: l.max_sessions_per_prefix,
            });
        }
        if self.sessions >= l.max_sessions {
            return Err(Full::Sessions(l.max_sessions));
        }
        self.sessions += 1;
        bump(&mut self.sessions_by_prefix, prefix);
        Ok(Stage::Session(prefix))
    }

    /// Frees the slot of a connection that ended (or moved on).
    pub fn release(&mut self, stage: Stage) {
        match stage {
            Stage::Unvalidated => self.unvalidated -= 1,
            Stage::Pending(p) => {
                self.pending -= 1;
                drop_one(&mut self.pending_by_prefix, p);
            }
            Stage::Session(p) => {
                self.sessions -= 1;
                drop_one(&mut self.sessions_by_prefix, p);
            }
        }
    }

    /// Unvalidated handshakes, pending connections and sessions, in that order.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.unvalidated, self.pending, self.sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        retry_threshold: 2,
        max_pending_per_prefix: 2,
        max_pending: 3,
        max_sessions_per_prefix: 1,
        max_sessions: 2,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_sources_are_grouped_by_64_and_mapped_ipv4_counts_as_ipv4() {
        assert_eq!(
            SourcePrefix::of(ip("2001:db8:1:2:aaaa::1")),
            SourcePrefix::of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            SourcePrefix::of(ip("2001:db8:1:2::1")),
            SourcePrefix::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            SourcePrefix::of(ip("::ffff:192.0.2.1")),
            SourcePrefix::of(ip("192.0.2.1"))
        );
        assert_ne!(
            SourcePrefix::of(ip("192.0.2.1")),
            SourcePrefix::of(ip("192.0.2.2"))
        );
        assert_eq!(
            SourcePrefix::of(ip("2001:db8:1:2:aaaa::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn unvalidated_handshakes_beyond_the_threshold_get_a_retry_whatever_their_address() {
        let mut a = Admission::new(LIMITS);
        assert!(matches!(
            a.on_incoming(ip("192.0.2.1"), false, true),
            Decision::Accept(Stage::Unvalidated)
        ));
        assert!(matches!(
            a.on_incoming(ip("198.51.100.7"), false, true),
            Decision::Accept(Stage::Unvalidated)
        ));

        assert_eq!(
            a.on_incoming(ip("203.0.113.5"), false, true),
            Decision::Retry
        );
        assert_eq!(
            a.on_incoming(ip("192.0.2.1"), false, false),
            Decision::Refuse(Full::Unvalidatable)
        );
        // A validated peer from an address the flood used is still let in.
        assert!(matches!(
            a.on_incoming(ip("192.0.2.1"), true, false),
            Decision::Accept(Stage::Pending(_))
        ));
    }

    #[test]
    fn pending_connections_are_capped_per_prefix_and_in_total() {
        let mut a = Admission::new(LIMITS);
        let v6 = |i: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, i, 0, 0, 1));
        assert!(matches!(
            a.on_incoming(v6(1), true, false),
            Decision::Accept(_)
        ));
        assert!(matches!(
            a.on_incoming(v6(2), true, false),
            Decision::Accept(_)
        ));

        let same_64 = a.on_incoming(v6(3), true, false);
        let other = a.on_incoming(ip("192.0.2.1"), true, false);
        let over_total = a.on_incoming(ip("192.0.2.2"), true, false);

        assert!(matches!(
            same_64,
            Decision::Refuse(Full::PendingFromPrefix(_))
        ));
        assert!(matches!(other, Decision::Accept(_)));
        assert_eq!(over_total, Decision::Refuse(Full::Pending));
    }

    #[test]
    fn sessions_are_charged_only_after_authentication_and_slots_come_back() {
        let mut a = Admission::new(LIMITS);
        let Decision::Accept(s1) = a.on_incoming(ip("192.0.2.1"), false, true) else {
            panic!()
        };
        let s1 = a.handshake_done(s1, ip("192.0.2.1")).unwrap();
        assert_eq!(a.counts(), (0, 1, 0));
        let s1 = a.authenticated(s1).unwrap();
        assert_eq!(a.counts(), (0, 0, 1));

        let Decision::Accept(s2) = a.on_incoming(ip("192.0.2.1"), true, false) else {
            panic!()
        };
        let refused = a.authenticated(s2);
        assert!(matches!(
            refused,
            Err(Full::SessionsFromPrefix { max: 1, .. })
        ));
        assert_eq!(
            a.counts(),
            (0, 0, 1),
            "the refused pending slot is released"
        );

        a.release(s1);
        assert_eq!(a.counts(), (0, 0, 0));
    }
}
