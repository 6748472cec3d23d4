//! The sans-IO fleet core (hostd::fleet::placement) under simulated time: which node a
//! request goes to, and what a node's loss and return do to its environments.

use std::collections::BTreeMap;
use std::time::Duration;

use hostd::fleet::{
    Decision, Fleet, Load, LossPolicy, Needs, NodeRecord, PlaceError, PlacementState,
};

fn node(name: &str, vcpus: u32, memory_mib: u64) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: format!("{name}.lan:4433"),
        vcpus,
        memory_mib,
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        labels: BTreeMap::new(),
        cordoned: false,
        ttl_s: 10,
        load: Default::default(),
    }
}

fn needs(vcpus: u32, memory_mib: u64) -> Needs {
    Needs {
        vcpus,
        memory_mib,
        labels: BTreeMap::new(),
    }
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn fleet_of(nodes: &[NodeRecord]) -> Fleet {
    let mut f = Fleet::new(LossPolicy::MarkLost);
    for n in nodes {
        assert!(f.node_seen(s(0), n.clone()).is_empty());
    }
    f
}

#[test]
fn empty_fleet_refuses_saying_no_node() {
    let mut f = Fleet::new(LossPolicy::MarkLost);
    assert_eq!(f.place("e1", needs(1, 512)), Err(PlaceError::NoNodes));
}

#[test]
fn placement_spreads_to_least_loaded_node() {
    let mut f = fleet_of(&[node("a", 8, 16384), node("b", 8, 16384)]);
    let picks: Vec<String> = (0..4)
        .map(|i| f.place(&format!("e{i}"), needs(2, 2048)).unwrap())
        .collect();
    assert_eq!(picks, ["a", "b", "a", "b"]);
    assert_eq!(f.committed("a"), (4, 4096));
    assert_eq!(f.committed("b"), (4, 4096));
}

#[test]
fn ties_go_to_the_smaller_name_whatever_the_arrival_order() {
    let mut f = fleet_of(&[node("c", 4, 4096), node("a", 4, 4096), node("b", 4, 4096)]);
    assert_eq!(f.place("e", needs(1, 1024)).unwrap(), "a");
}

#[test]
fn dominant_share_counts_memory_as_well_as_cpu() {
    // a: few CPUs used but memory nearly full; b: more CPUs used, memory free.
    let mut f = fleet_of(&[node("a", 16, 8192), node("b", 16, 8192)]);
    f.place("big-mem", needs(1, 6144)).unwrap(); // -> a (tie)
    f.place("cpu", needs(4, 512)).unwrap(); // -> b
    assert_eq!(f.placements()["cpu"].node, "b");
    // a's memory share would be 7168/8192; b's cpu share 5/16, mem 1536/8192.
    assert_eq!(f.place("next", needs(1, 1024)).unwrap(), "b");
}

#[test]
fn a_larger_node_takes_more_before_a_smaller_one_is_used() {
    let mut f = fleet_of(&[node("big", 16, 32768), node("small", 4, 8192)]);
    let picks: Vec<String> = (0..5)
        .map(|i| f.place(&format!("e{i}"), needs(2, 2048)).unwrap())
        .collect();
    // big after 1: 1/8; small after 1: 1/2. big wins until its share passes small's 1/2.
    assert_eq!(picks, ["big", "big", "big", "big", "small"]);
}

#[test]
fn overcommit_raises_the_cpu_limit_and_full_nodes_refuse() {
    let mut n = node("a", 2, 8192);
    n.cpu_overcommit = 2.0;
    let mut f = fleet_of(&[n]);
    f.place("e1", needs(2, 1024)).unwrap();
    f.place("e2", needs(2, 1024)).unwrap();
    let err = f.place("e3", needs(1, 1024)).unwrap_err();
    assert_eq!(
        err,
        PlaceError::NoRoom {
            vcpus: 1,
            memory_mib: 1024,
            nodes: 1
        }
    );
    assert!(err.to_string().contains("no node has room for 1 vCPUs"));
}

#[test]
fn a_request_larger_than_every_node_is_refused_even_when_idle() {
    let mut f = fleet_of(&[node("a", 4, 4096), node("b", 4, 4096)]);
    assert!(matches!(
        f.place("huge", needs(2, 8192)),
        Err(PlaceError::NoRoom { nodes: 2, .. })
    ));
    assert!(f.placements().is_empty());
}

#[test]
fn labels_restrict_the_candidates() {
    let mut a = node("a", 8, 8192);
    a.labels.insert("zone".into(), "a".into());
    let mut b = node("b", 8, 8192);
    b.labels.insert("zone".into(), "b".into());
    b.labels.insert("gpu".into(), "false".into());
    let mut f = fleet_of(&[a, b]);
    let mut want = needs(1, 512);
    want.labels.insert("zone".into(), "b".into());
    assert_eq!(f.place("e1", want.clone()).unwrap(), "b");
    assert_eq!(f.place("e2", want).unwrap(), "b");
    let mut missing = needs(1, 512);
    missing.labels.insert("gpu".into(), "true".into());
    assert_eq!(
        f.place("e3", missing),
        Err(PlaceError::NoLabels("gpu=true".into()))
    );
}

#[test]
fn cordoned_nodes_take_nothing_new_but_keep_their_environments() {
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    f.place("on-a", needs(1, 512)).unwrap();
    let mut a = node("a", 8, 8192);
    a.cordoned = true;
    assert!(f.node_seen(s(1), a).is_empty());
    for i in 0..3 {
        assert_eq!(f.place(&format!("e{i}"), needs(1, 512)).unwrap(), "b");
    }
    assert_eq!(f.placements()["on-a"].node, "a");
    assert_eq!(f.placements()["on-a"].state, PlacementState::Placed);
}

#[test]
fn the_same_environment_is_never_placed_twice() {
    let mut f = fleet_of(&[node("a", 8, 8192)]);
    f.place("e", needs(1, 512)).unwrap();
    assert_eq!(
        f.place("e", needs(1, 512)),
        Err(PlaceError::Exists("e".into()))
    );
    assert_eq!(f.committed("a"), (1, 512));
}

#[test]
fn release_frees_the_room() {
    let mut f = fleet_of(&[node("a", 2, 2048)]);
    f.place("e1", needs(2, 2048)).unwrap();
    assert!(f.place("e2", needs(2, 2048)).is_err());
    assert!(f.release("e1").is_some());
    assert_eq!(f.place("e2", needs(2, 2048)).unwrap(), "a");
}

#[test]
fn a_gone_node_marks_its_environments_lost_with_the_time_and_takes_no_more() {
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    f.place("e1", needs(1, 512)).unwrap(); // a
    f.place("e2", needs(1, 512)).unwrap(); // b
    f.place("e3", needs(1, 512)).unwrap(); // a
    let out = f.node_gone(s(42), "a");
    assert_eq!(
        out,
        vec![
            Decision::Lost {
                env: "e1".into(),
                node: "a".into()
            },
            Decision::Lost {
                env: "e3".into(),
                node: "a".into()
            },
        ]
    );
    assert_eq!(
        f.placements()["e1"].state,
        PlacementState::Lost { since: s(42) }
    );
    assert_eq!(f.placements()["e2"].state, PlacementState::Placed);
    assert_eq!(f.alive(), ["b"]);
    assert_eq!(f.place("e4", needs(1, 512)).unwrap(), "b");
    // A second delete of the same key changes nothing.
    assert!(f.node_gone(s(43), "a").is_empty());
    assert!(f.node_gone(s(43), "never-seen").is_empty());
}

#[test]
fn mark_lost_policy_never_moves_a_lost_environment() {
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    f.place("e1", needs(1, 512)).unwrap();
    f.node_gone(s(10), "a");
    for t in [11, 100, 10_000] {
        assert!(f.tick(s(t)).is_empty());
    }
    assert_eq!(f.placements()["e1"].node, "a");
}

#[test]
fn a_returning_node_readopts_its_lost_environments() {
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    f.place("e1", needs(1, 512)).unwrap();
    f.node_gone(s(10), "a");
    let out = f.node_seen(s(20), node("a", 8, 8192));
    assert_eq!(
        out,
        vec![Decision::Readopted {
            env: "e1".into(),
            node: "a".into()
        }]
    );
    assert_eq!(f.placements()["e1"].state, PlacementState::Placed);
    assert_eq!(f.committed("a"), (1, 512));
}

#[test]
fn reschedule_waits_for_the_grace_period_then_moves_once() {
    let mut f = Fleet::new(LossPolicy::Reschedule { after: s(30) });
    f.node_seen(s(0), node("a", 8, 8192));
    f.node_seen(s(0), node("b", 8, 8192));
    f.place("e1", needs(2, 1024)).unwrap(); // a
    f.node_gone(s(100), "a");
    assert!(f.tick(s(129)).is_empty(), "still within the grace period");
    let out = f.tick(s(130));
    assert_eq!(
        out,
        vec![Decision::Rescheduled {
            env: "e1".into(),
            from: "a".into(),
            to: "b".into()
        }]
    );
    assert_eq!(f.committed("b"), (2, 1024));
    assert!(
        f.tick(s(200)).is_empty(),
        "a placed environment is not moved again"
    );
    // a comes back: its copy of e1 must stop, and it is not readopted.
    let back = f.node_seen(s(300), node("a", 8, 8192));
    assert_eq!(
        back,
        vec![Decision::StopStale {
            env: "e1".into(),
            node: "a".into()
        }]
    );
    assert_eq!(f.placements()["e1"].node, "b");
    assert_eq!(f.committed("a"), (0, 0));
}

#[test]
fn reschedule_with_no_room_stays_lost_and_retries() {
    let mut f = Fleet::new(LossPolicy::Reschedule { after: s(5) });
    f.node_seen(s(0), node("a", 4, 4096));
    f.node_seen(s(0), node("b", 2, 2048));
    f.place("small", needs(2, 2048)).unwrap(); // a (share 1/2 vs b 1)
    f.place("fill", needs(2, 2048)).unwrap(); // a (1 vs 1: tie -> a)
    assert_eq!(f.placements()["fill"].node, "a");
    f.place("b-full", needs(2, 2048)).unwrap(); // b
    f.node_gone(s(10), "a");
    let out = f.tick(s(15));
    assert_eq!(
        out,
        vec![
            Decision::Unplaceable { env: "fill".into() },
            Decision::Unplaceable {
                env: "small".into()
            },
        ]
    );
    f.release("b-full");
    let out = f.tick(s(16));
    assert_eq!(
        out,
        vec![
            Decision::Rescheduled {
                env: "fill".into(),
                from: "a".into(),
                to: "b".into()
            },
            Decision::Unplaceable {
                env: "small".into()
            },
        ]
    );
}

#[test]
fn node_record_round_trips_as_json_with_defaults() {
    let json = r#"{"name":"n1","address":"10.0.0.1:4433","vcpus":4,"memory_mib":8192,
        "cpu_overcommit":4.0,"memory_overcommit":1.0,"ttl_s":10}"#;
    let r: NodeRecord = serde_json::from_str(json).unwrap();
    assert!(!r.cordoned);
    assert!(r.labels.is_empty());
    let back: NodeRecord = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
    assert_eq!(back, r);
}

#[test]
fn placements_read_from_etcd_count_toward_load() {
    let mut f = fleet_of(&[node("a", 4, 4096), node("b", 4, 4096)]);
    f.insert_placement("elsewhere", "a", needs(3, 1024));
    assert_eq!(f.committed("a"), (3, 1024));
    assert_eq!(f.place("e", needs(2, 512)).unwrap(), "b");
    assert!(matches!(
        f.place("elsewhere", needs(1, 1)),
        Err(PlaceError::Exists(_))
    ));
}

#[test]
fn an_operators_cordon_or_drain_keeps_new_placements_off_a_node_until_uncordoned() {
    use hostd::fleet::Schedule;
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    // Set before anything is placed: a schedule may name a node not seen yet, too.
    f.set_schedule("a", Schedule::Cordoned);
    f.set_schedule("zz", Schedule::Draining);
    assert_eq!(f.schedule("a"), Schedule::Cordoned);
    assert_eq!(f.schedule("b"), Schedule::Ready);
    for i in 0..3 {
        assert_eq!(f.place(&format!("e{i}"), needs(1, 256)).unwrap(), "b");
    }
    f.set_schedule("b", Schedule::Draining);
    assert!(matches!(
        f.place("e9", needs(1, 256)),
        Err(PlaceError::NoRoom { nodes: 2, .. })
    ));
    // What runs on a draining node stays placed there.
    assert_eq!(f.committed("b"), (3, 768));
    f.set_schedule("a", Schedule::Ready);
    assert_eq!(f.schedule("a"), Schedule::Ready);
    assert_eq!(f.place("e9", needs(1, 256)).unwrap(), "a");
}

#[test]
fn stored_schedules_read_back_and_an_unknown_value_never_admits_placements() {
    use hostd::fleet::Schedule;
    for s in [Schedule::Ready, Schedule::Cordoned, Schedule::Draining] {
        assert_eq!(Schedule::parse(s.as_str().as_bytes()), s);
    }
    assert_eq!(Schedule::parse(b"maintenance"), Schedule::Cordoned);
}

#[test]
fn a_node_that_said_it_left_is_told_from_a_lost_one_until_it_returns() {
    let mut f = fleet_of(&[node("a", 8, 8192), node("b", 8, 8192)]);
    f.place("e1", needs(1, 256)).unwrap();
    f.set_left("a", true);
    // Its environments are handled as for any loss (nothing is started twice).
    assert_eq!(
        f.node_gone(s(5), "a"),
        vec![Decision::Lost {
            env: "e1".into(),
            node: "a".into()
        }]
    );
    assert!(f.has_left("a") && !f.has_left("b"));
    f.node_seen(s(9), node("a", 8, 8192));
    assert!(!f.has_left("a"), "a returned");
}

#[test]
fn what_a_node_runs_outside_the_fleet_counts_with_its_placements() {
    let mut busy = node("a", 4, 4096);
    busy.load = Load {
        running: 2,
        vcpus: 3,
        memory_mib: 2048,
    };
    let mut f = fleet_of(&[busy, node("b", 4, 4096)]);
    f.insert_placement("placed", "a", needs(1, 512));

    let committed = f.committed("a");
    let small = f.place("small", needs(1, 256));
    let big = f.place("big", needs(4, 1024));

    assert_eq!(committed, (4, 2560), "3 local vCPUs and 1 placed");
    assert_eq!(small.unwrap(), "b", "a is full: its own environments count");
    assert!(
        matches!(big, Err(PlaceError::NoRoom { .. })),
        "{big:?}: b has 3 vCPUs left and a none"
    );
}
