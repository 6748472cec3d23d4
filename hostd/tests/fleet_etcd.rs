//! Fleet membership over a real etcd (Debian's etcd-server, started in a temp dir on free
//! loopback ports): two members see each other, placement picks the node with room, and a
//! member that stops keeping its lease alive is seen leaving within the lease's TTL.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{find_etcd, free_port};
use hostd::config::FleetConfig;
use hostd::fleet::{Decision, Member, Needs, NodeRecord, NodeState};
use testkit::{skip, Need};

const TTL_S: u64 = 3;

struct Etcd {
    child: Child,
    client_url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a one-member etcd and waits until it serves clients.
async fn start_etcd(binary: &Path) -> Etcd {
    let dir = tempfile::tempdir().unwrap();
    let (cp, pp) = (free_port(), free_port());
    let client_url = format!("http://127.0.0.1:{cp}");
    let peer_url = format!("http://127.0.0.1:{pp}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let child = Command::new(binary)
        .args(["--name", "t0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &client_url])
        .args(["--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("t0={peer_url}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn etcd");
    let etcd = Etcd {
        child,
        client_url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut c) = etcd_client::Client::connect([&etcd.client_url], None).await {
            if c.status().await.is_ok() {
                return etcd;
            }
        }
        assert!(
            Instant::now() < deadline,
            "etcd did not serve {} within 20 s: {}",
            etcd.client_url,
            std::fs::read_to_string(etcd._dir.path().join("etcd.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn cfg(etcd: &Etcd, node: &str) -> FleetConfig {
    FleetConfig {
        etcd: vec![etcd.client_url.clone()],
        node: node.into(),
        public_address: format!("{node}.test:4433"),
        lease_ttl_s: TTL_S,
        ..FleetConfig::default()
    }
}

fn record(name: &str, vcpus: u32, memory_mib: u64) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        address: format!("{name}.test:4433"),
        vcpus,
        memory_mib,
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        labels: BTreeMap::new(),
        cordoned: false,
        ttl_s: TTL_S,
        load: Default::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_see_each_other_place_and_see_a_lapsed_lease_leave() {
    let Some(binary) = find_etcd() else {
        skip(
            Need::Tools,
            "etcd is not installed (scripts/install-deps: etcd-server)",
        );
        return;
    };
    let etcd = start_etcd(&binary).await;

    // Arrange: two members, b with more room than a.
    let a = Member::join(&cfg(&etcd, "a"), record("a", 2, 2048))
        .await
        .expect("a joins");
    let mut b = Member::join(&cfg(&etcd, "b"), record("b", 8, 16384))
        .await
        .expect("b joins");

    // Both see both.
    let both = |f: &hostd::fleet::Fleet| f.alive() == ["a", "b"];
    assert!(
        a.wait_until(Duration::from_secs(5), both).await,
        "a sees {:?}",
        a.alive()
    );
    assert!(
        b.wait_until(Duration::from_secs(5), both).await,
        "b sees {:?}",
        b.alive()
    );
    assert_eq!(a.fleet().nodes()["b"].record.address, "b.test:4433");

    // Placement from a: 4 vCPUs fit only on b; a small one goes to the less loaded.
    let need = |vcpus, memory_mib| Needs {
        vcpus,
        memory_mib,
        labels: BTreeMap::new(),
    };
    assert_eq!(a.place("big", need(4, 4096)).unwrap(), "b");
    assert_eq!(a.place("small", need(1, 512)).unwrap(), "a");
    assert!(a.place("huge", need(16, 1024)).is_err());

    // The lease outlives several TTLs while kept alive.
    tokio::time::sleep(Duration::from_secs(TTL_S * 2)).await;
    assert_eq!(
        a.alive(),
        ["a", "b"],
        "b stayed while its lease was kept alive"
    );

    // Act: b stops keeping its lease alive, as a hung host would.
    b.stop_keepalive();
    let stopped = Instant::now();
    let gone = |f: &hostd::fleet::Fleet| {
        matches!(
            f.nodes().get("b").map(|n| n.state),
            Some(NodeState::Gone { .. })
        )
    };
    let seen = a.wait_until(Duration::from_secs(TTL_S + 5), gone).await;
    let took = stopped.elapsed();

    // Assert: a saw b leave within the TTL (plus delivery slack), and b's environment is lost.
    assert!(
        seen,
        "a still sees b {took:?} after b stopped its keep-alive"
    );
    eprintln!("b seen gone {took:?} after its last keep-alive could have run (ttl {TTL_S} s)");
    assert!(
        took <= Duration::from_millis(TTL_S * 1000 + 1500),
        "b left after {took:?}, beyond its {TTL_S} s lease"
    );
    assert_eq!(a.alive(), ["a"]);
    assert_eq!(
        a.take_decisions(),
        vec![Decision::Lost {
            env: "big".into(),
            node: "b".into()
        }]
    );
    a.leave().await.expect("a leaves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_claims_from_two_members_never_overcommit_a_node() {
    let Some(binary) = find_etcd() else {
        skip(
            Need::Tools,
            "etcd is not installed (scripts/install-deps: etcd-server)",
        );
        return;
    };
    let etcd = start_etcd(&binary).await;
    // Arrange: room for 4 one-vCPU environments on each node, 8 in all.
    let a = std::sync::Arc::new(
        Member::join(&cfg(&etcd, "a"), record("a", 4, 16384))
            .await
            .expect("a joins"),
    );
    let b = std::sync::Arc::new(
        Member::join(&cfg(&etcd, "b"), record("b", 4, 16384))
            .await
            .expect("b joins"),
    );
    let both = |f: &hostd::fleet::Fleet| f.alive() == ["a", "b"];
    assert!(a.wait_until(Duration::from_secs(5), both).await);
    assert!(b.wait_until(Duration::from_secs(5), both).await);

    // Act: 20 claims at once, half through each member.
    let started = Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let m = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                m.claim(
                    &format!("env{i:02}"),
                    Needs {
                        vcpus: 1,
                        memory_mib: 256,
                        labels: BTreeMap::new(),
                    },
                )
                .await
            })
        })
        .collect();
    let mut placed = BTreeMap::<String, usize>::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(node) => *placed.entry(node).or_default() += 1,
            Err(hostd::fleet::MemberError::Place(hostd::fleet::PlaceError::NoRoom { .. })) => {
                refused += 1
            }
            Err(e) => panic!("unexpected claim error: {}", hostd::error_chain(&e)),
        }
    }
    eprintln!("20 concurrent claims took {:?}", started.elapsed());

    // Assert: exactly the room was used, and etcd holds the same.
    assert_eq!(placed, BTreeMap::from([("a".into(), 4), ("b".into(), 4)]));
    assert_eq!(refused, 12);
    let mut c = etcd_client::Client::connect([&etcd.client_url], None)
        .await
        .unwrap();
    let got = c
        .get(
            "/genos/fleet/placements/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let mut in_etcd = BTreeMap::<String, usize>::new();
    for kv in got.kvs() {
        let claim: hostd::fleet::Claim = serde_json::from_slice(kv.value()).unwrap();
        *in_etcd.entry(claim.node).or_default() += 1;
    }
    assert_eq!(in_etcd, placed);
    // A second claim of a placed environment is refused, not placed twice.
    let placed_env = String::from_utf8(got.kvs()[0].key().to_vec()).unwrap();
    let env = placed_env.trim_start_matches("/genos/fleet/placements/");
    let again = a
        .claim(
            env,
            Needs {
                vcpus: 1,
                memory_mib: 256,
                labels: BTreeMap::new(),
            },
        )
        .await;
    assert!(again.is_err(), "{env} claimed twice: {again:?}");
}
