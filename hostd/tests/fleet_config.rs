//! `[fleet]` in hostd.toml, and joining a fleet whose etcd cannot be used.

use std::time::{Duration, Instant};

use hostd::config::{Config, FleetConfig};
use hostd::fleet::{Member, MemberError, NodeRecord};

#[test]
fn without_fleet_section_hostd_is_alone() {
    let cfg = Config::embedded();
    assert!(cfg.fleet.etcd.is_empty());
    assert_eq!(cfg.fleet.lease_ttl_s, 10);
    assert_eq!(cfg.fleet.prefix, "/genos/fleet/");
}

#[test]
fn fleet_section_overrides_the_defaults() {
    let cfg = Config::from_toml(
        "[fleet]\netcd = [\"http://10.0.0.1:2379\"]\nnode = \"n1\"\nlease_ttl_s = 5\n\
         [fleet.labels]\nzone = \"a\"\n",
    )
    .unwrap();
    assert_eq!(cfg.fleet.etcd, ["http://10.0.0.1:2379"]);
    assert_eq!(cfg.fleet.node, "n1");
    assert_eq!(cfg.fleet.lease_ttl_s, 5);
    assert_eq!(cfg.fleet.labels["zone"], "a");
    assert_eq!(
        cfg.fleet.prefix, "/genos/fleet/",
        "unset keys keep defaults"
    );
}

#[test]
fn a_misspelt_fleet_key_is_refused() {
    let err = Config::from_toml("[fleet]\netcd_endpoints = []\n").unwrap_err();
    assert!(err.to_string().contains("etcd_endpoints"), "{err}");
}

fn record() -> NodeRecord {
    NodeRecord {
        name: "n1".into(),
        address: "n1:4433".into(),
        vcpus: 1,
        memory_mib: 1024,
        cpu_overcommit: 1.0,
        memory_overcommit: 1.0,
        labels: Default::default(),
        cordoned: false,
        ttl_s: 3,
        load: Default::default(),
    }
}

#[tokio::test]
async fn joining_without_endpoints_says_so() {
    let err = Member::join(&FleetConfig::default(), record())
        .await
        .err()
        .expect("no endpoints");
    assert!(matches!(err, MemberError::NoEndpoints));
    assert_eq!(err.to_string(), "[fleet] has no etcd endpoints");
}

#[tokio::test]
async fn joining_an_etcd_that_is_not_there_fails_within_the_timeout_naming_it() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = FleetConfig {
        etcd: vec![format!("http://127.0.0.1:{port}")],
        ..FleetConfig::default()
    };
    let started = Instant::now();
    let err = Member::join(&cfg, record())
        .await
        .err()
        .expect("nothing listens");
    let msg = hostd::error_chain(&err);
    assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    eprintln!("{msg} (after {:?})", started.elapsed());
}

#[test]
fn the_node_name_is_the_configured_one_else_the_host_name_and_must_fit_a_key() {
    use hostd::fleet::service::node_name;
    let named = FleetConfig {
        node: "rack1-03".into(),
        ..FleetConfig::default()
    };
    assert_eq!(node_name(&named).unwrap(), "rack1-03");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    match node_name(&FleetConfig::default()) {
        Ok(name) => assert_eq!(name, host.trim()),
        // A host name that cannot be a key (or none) must be replaced by `node`.
        Err(e) => assert!(e.to_string().contains("is not a node name"), "{e}"),
    }
    for bad in ["a/b", "a b", &"x".repeat(64)] {
        let cfg = FleetConfig {
            node: bad.to_string(),
            ..FleetConfig::default()
        };
        let err = node_name(&cfg).unwrap_err().to_string();
        assert!(err.contains("is not a node name"), "{bad}: {err}");
    }
}
