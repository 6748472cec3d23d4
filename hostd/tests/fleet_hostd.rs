//! Two real genos-hostd daemons in one fleet over a real etcd (Debian's etcd-server, in a
//! temp dir on free loopback ports; no guests): a daemon started before etcd serves its
//! admin socket and joins once etcd is there; `genos fleet nodes` on either lists both; a
//! cordon written on one is honoured by the other's placement core; a killed hostd is `lost`
//! after its lease; with etcd stopped `genos fleet` fails at once naming the endpoint while
//! `genos list` still answers, and after etcd is back the node is in the fleet again.

mod common;
#[path = "common/daemon.rs"]
mod daemon;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{find_etcd, free_port};
use daemon::{json, stderr, stdout, Hostd};
use serde_json::Value;
use testkit::{skip, Need};

const TTL_S: u64 = 3;

struct Etcd {
    child: Option<Child>,
    client_url: String,
    peer_url: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts (or restarts, over the same data) a one-member etcd and waits until it serves.
    fn start(&mut self, binary: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new(binary)
            .args(["--name", "t0", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &self.client_url])
            .args(["--advertise-client-urls", &self.client_url])
            .args(["--listen-peer-urls", &self.peer_url])
            .args(["--initial-advertise-peer-urls", &self.peer_url])
            .args(["--initial-cluster", &format!("t0={}", self.peer_url)])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        loop {
            let up = rt.block_on(async {
                match etcd_client::Client::connect([&self.client_url], None).await {
                    Ok(mut c) => c.status().await.is_ok(),
                    Err(_) => false,
                }
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not serve {} within 20 s: {}",
                self.client_url,
                std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn config(etcd: &str, node: &str, labels: &str) -> String {
    format!(
        "[images]\nbuilder = \"/nonexistent/genos-image\"\n\
         [capacity]\nvcpus = 2\nmemory_mib = 8192\ncpu_overcommit = 1.5\n\
         [stream]\nlisten = \"127.0.0.1:0\"\n\
         [fleet]\netcd = [\"{etcd}\"]\nnode = \"{node}\"\npublic_address = \"{node}.test:4433\"\n\
         lease_ttl_s = {TTL_S}\n[fleet.labels]\n{labels}\n"
    )
}

/// `genos --json fleet nodes` on `h`: the nodes by name, or the failed command.
fn nodes(h: &Hostd) -> Result<Vec<Value>, Output> {
    let o = h.genos(&["--json", "fleet", "nodes"]);
    if !o.status.success() {
        return Err(o);
    }
    Ok(json(&o)["nodes"].as_array().cloned().unwrap_or_default())
}

fn node<'a>(nodes: &'a [Value], name: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["name"] == name)
}

/// Polls `h`'s `fleet nodes` until `pred` holds; fails after `limit`, showing the last
/// answer. Returns how long it took.
fn wait_nodes(h: &Hostd, what: &str, limit: Duration, pred: impl Fn(&[Value]) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let got = nodes(h);
        if got.as_deref().is_ok_and(&pred) {
            let took = started.elapsed();
            eprintln!("{what}: {took:?}");
            return took;
        }
        assert!(
            started.elapsed() < limit,
            "{what}: not within {limit:?}; last answer: {}",
            match got {
                Ok(n) => serde_json::to_string_pretty(&n).unwrap(),
                Err(o) => stderr(&o),
            }
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `h`'s audit log until an entry satisfies `pred` (entries written after the
/// effect a test saw, e.g. the etcd delete of a release, may lag it by a moment).
fn wait_audit(h: &Hostd, what: &str, pred: impl Fn(&Value) -> bool) {
    let started = Instant::now();
    loop {
        let audit = json(&h.genos(&["--json", "audit", "list"]));
        if audit["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(&pred))
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "no audit entry {what} within 5 s: {audit}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn two_hostds_share_a_fleet_cordon_lose_a_node_and_survive_an_etcd_outage() {
    let Some(binary) = find_etcd() else {
        skip(
            Need::Tools,
            "etcd is not installed (scripts/install-deps: etcd-server)",
        );
        return;
    };
    let binary = binary.display().to_string();
    let t0 = Instant::now();
    let mut etcd = Etcd {
        child: None,
        client_url: format!("http://127.0.0.1:{}", free_port()),
        peer_url: format!("http://127.0.0.1:{}", free_port()),
        dir: tempfile::tempdir().unwrap(),
    };
    let url = etcd.client_url.clone();

    // A hostd whose etcd is not there yet serves its own socket and says why it has no fleet.
    let a = Hostd::start(&config(&url, "a", "zone = \"a\""));
    let o = a.genos(&["list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = a.genos(&["fleet", "nodes"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains(&format!("cannot reach etcd at {url}")),
        "{}",
        stderr(&o)
    );

    // Arrange: etcd comes up; a joins on its next attempt, b at its start.
    etcd.start(&binary);
    eprintln!("etcd serving: {:?}", t0.elapsed());
    let b = Hostd::start(&config(&url, "b", "zone = \"b\"\ngpu = \"false\""));
    let both = |n: &[Value]| node(n, "a").is_some() && node(n, "b").is_some();
    wait_nodes(&a, "a lists both nodes", Duration::from_secs(20), both);
    wait_nodes(&b, "b lists both nodes", Duration::from_secs(20), both);

    // Both nodes' records as the other sees them: capacity after overcommit, labels, state.
    let seen = nodes(&b).unwrap();
    let na = node(&seen, "a").unwrap();
    assert_eq!(na["state"], "ready");
    assert_eq!(na["address"], "a.test:4433");
    assert_eq!(na["vcpus"], 3, "2 vCPUs at 1.5 overcommit");
    assert_eq!(na["memory_mib"], 8192);
    assert_eq!(na["load"]["running"], 0);
    assert_eq!(na["labels"]["zone"], "a");
    assert_eq!(na["this"], false);
    assert_eq!(node(&seen, "b").unwrap()["this"], true);
    let table = stdout(&b.genos(&["fleet", "nodes"]));
    assert!(table.starts_with("NAME"), "{table}");
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no {name} in {table}"))
            .to_string()
    };
    let la = line("a ");
    for part in ["a.test:4433", "ready", "0/3", "0/8192", "zone=a"] {
        assert!(la.contains(part), "{part} missing from {la:?}");
    }
    assert!(line("b *").contains("gpu=false,zone=b"), "{table}");

    // Act: cordon b from a. Assert: b's own placement core (its watch) honours it.
    let o = a.genos(&["fleet", "cordon", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("b cordoned"), "{}", stdout(&o));
    wait_nodes(
        &b,
        "b's core sees b cordoned",
        Duration::from_secs(5),
        |n| {
            node(n, "b").is_some_and(|v| v["state"] == "cordoned" && v["placeable"] == false)
                && node(n, "a").is_some_and(|v| v["placeable"] == true)
        },
    );
    // Draining a from b, then uncordoning both from either side.
    let o = b.genos(&["fleet", "drain", "a"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_nodes(
        &a,
        "a's core sees a draining",
        Duration::from_secs(5),
        |n| node(n, "a").is_some_and(|v| v["state"] == "draining" && v["placeable"] == false),
    );
    // With b cordoned and a draining, nothing can be placed, and a create says so.
    let o = a.genos(&["create", "--text", "python headless, 1 core"]);
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("no node has room") && stderr(&o).contains("all cordoned or full"),
        "{}",
        stderr(&o)
    );
    for (h, n) in [(&b, "b"), (&a, "a")] {
        let o = h.genos(&["fleet", "uncordon", n]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    wait_nodes(
        &a,
        "a's core sees both ready",
        Duration::from_secs(5),
        |n| {
            n.iter()
                .all(|v| v["state"] == "ready" && v["placeable"] == true)
        },
    );
    // An unknown node is refused, naming the live ones.
    let o = a.genos(&["fleet", "cordon", "zz"]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("no live node zz in the fleet (live: a, b)"),
        "{}",
        stderr(&o)
    );
    // The audit log of the node that was asked carries the node acted on.
    wait_audit(&a, "fleet-cordon of b", |e| {
        e["action"] == "fleet-cordon" && e["target"] == "b"
    });
    wait_audit(&a, "fleet-join of a", |e| {
        e["action"] == "fleet-join" && e["target"] == "a"
    });

    // Placements claimed on a count in every node's listing; destroying the environment on
    // a releases its placement, while a claim on a for an environment a never had stays.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let etcd_put = |key: &str, value: &str| {
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([&url], None).await.unwrap();
            c.put(key, value, None).await.unwrap();
        })
    };
    let etcd_has = |key: &str| {
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([&url], None).await.unwrap();
            !c.get(key, None).await.unwrap().kvs().is_empty()
        })
    };
    let o = a.genos(&["--json", "create", "--text", "python headless, 1 core"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let env = json(&o)["env"]["name"].as_str().unwrap().to_string();
    let claim = r#"{"node":"a","needs":{"vcpus":1,"memory_mib":512}}"#;
    etcd_put(&format!("/genos/fleet/placements/{env}"), claim);
    etcd_put("/genos/fleet/placements/pending", claim);
    wait_nodes(&b, "b counts a's placements", Duration::from_secs(5), |n| {
        node(n, "a").is_some_and(|v| v["placements"] == 2)
    });
    // a notes its environments once a second: let it see this one before it goes.
    std::thread::sleep(Duration::from_secs(2));
    let o = a.genos(&["destroy", &env]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_nodes(
        &b,
        "a's placement released on destroy",
        Duration::from_secs(10),
        |n| node(n, "a").is_some_and(|v| v["placements"] == 1),
    );
    assert!(!etcd_has(&format!("/genos/fleet/placements/{env}")));
    assert!(
        etcd_has("/genos/fleet/placements/pending"),
        "an uncreated claim was released"
    );
    wait_audit(&a, "fleet-release", |e| {
        e["action"] == "fleet-release" && e["target"] == env.as_str()
    });

    // Forwarding: with a cordoned, a create on a's socket is placed on b, which creates it
    // and reports it; a lists and shows it with its node, b has it in its own store, and
    // once b destroys it a lists it no more.
    let o = a.genos(&["fleet", "cordon", "a"]);
    assert!(o.status.success(), "{}", stderr(&o));
    wait_nodes(
        &a,
        "a's core sees a cordoned",
        Duration::from_secs(5),
        |n| node(n, "a").is_some_and(|v| v["placeable"] == false),
    );
    let forwarded_at = Instant::now();
    let o = a.genos(&["--json", "create", "--text", "python headless, 1 core"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let created = json(&o)["env"].clone();
    eprintln!(
        "fleet_hostd: a create on a was taken by b in {:.1} s",
        forwarded_at.elapsed().as_secs_f64()
    );
    let far = created["name"].as_str().unwrap().to_string();
    assert_eq!(created["node"], "b", "{created}");
    let on_b = json(&b.genos(&["--json", "list"]));
    assert!(
        on_b["envs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == far.as_str()),
        "{on_b}"
    );
    let on_a = json(&a.genos(&["--json", "list"]));
    assert!(
        on_a["elsewhere"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == far.as_str() && e["node"] == "b"),
        "{on_a}"
    );
    let table = stdout(&a.genos(&["list"]));
    assert!(
        table.contains(&far) && table.contains("on node b ("),
        "{table}"
    );
    let shown = json(&a.genos(&["--json", "show", &far]));
    assert_eq!(shown["env"]["node"], "b", "{shown}");
    wait_audit(&b, "fleet-take", |e| e["action"] == "fleet-take");
    // A token and the destroy asked on a run on b, which answers through etcd: b's own
    // refusal (the environment failed: this test has no guest images) reaches a's caller
    // naming the node, and the destroy succeeds.
    let relayed_at = Instant::now();
    let o = a.genos(&["token", &far]);
    eprintln!(
        "fleet_hostd: a token request relayed to b and answered in {:.1} s",
        relayed_at.elapsed().as_secs_f64()
    );
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(
        stderr(&o).contains(&format!("on node b: cannot mint a token for {far}")),
        "{}",
        stderr(&o)
    );
    // b notes its environments once a second: let it see this one before it goes.
    std::thread::sleep(Duration::from_secs(2));
    let o = a.genos(&["destroy", &far]);
    assert!(o.status.success(), "{}", stderr(&o));
    let gone = json(&b.genos(&["--json", "list"]));
    assert!(
        !gone["envs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == far.as_str()),
        "{gone}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let on_a = json(&a.genos(&["--json", "list"]));
        let listed = on_a["elsewhere"]
            .as_array()
            .is_some_and(|v| v.iter().any(|e| e["name"] == far.as_str()));
        if !listed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b's destroyed {far} still listed on a: {on_a}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = a.genos(&["fleet", "uncordon", "a"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Act: b's hostd dies without leaving. Assert: a sees it lost once its lease lapses.
    let killed = Instant::now();
    // SAFETY: kill(2) on the hostd this test spawned (a zombie until `b` is dropped).
    unsafe { libc::kill(b.child.id() as i32, libc::SIGKILL) };
    let took = wait_nodes(
        &a,
        "a sees b lost after its lease",
        Duration::from_secs(TTL_S + 10),
        |n| node(n, "b").is_some_and(|v| v["state"] == "lost"),
    );
    assert!(
        took >= Duration::from_millis(TTL_S * 1000 / 2),
        "b lost {took:?} after the kill, before its {TTL_S} s lease could lapse"
    );
    eprintln!("b killed to lost on a: {:?}", killed.elapsed());
    // The table says so too.
    let table = stdout(&a.genos(&["fleet", "nodes"]));
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("b ") && l.contains(" lost ")),
        "{table}"
    );

    // Act: b's node comes back (a new hostd under the same name). Assert: ready again on a.
    let b2 = Hostd::start(&config(&url, "b", "zone = \"b\""));
    wait_nodes(
        &a,
        "b back after its restart",
        Duration::from_secs(10),
        |n| node(n, "b").is_some_and(|v| v["state"] == "ready" && v["lost_at"].is_null()),
    );
    drop(b2);
    wait_nodes(
        &a,
        "b absent, not lost, after leaving",
        Duration::from_secs(3),
        |n| node(n, "b").is_none(),
    );

    // Act: etcd stops. Assert: `genos fleet` fails at once naming the endpoint; the daemon
    // still answers for its own environments.
    etcd.stop();
    for args in [&["fleet", "nodes"][..], &["fleet", "cordon", "a"]] {
        let started = Instant::now();
        let o = a.genos(args);
        let took = started.elapsed();
        assert!(!o.status.success(), "{args:?} worked without etcd");
        assert!(
            stderr(&o).contains(&format!("cannot reach etcd at {url}")),
            "{}",
            stderr(&o)
        );
        assert!(took < Duration::from_secs(5), "{args:?} took {took:?}");
        eprintln!(
            "genos {args:?} without etcd failed in {took:?}: {}",
            stderr(&o).trim()
        );
    }
    let o = a.genos(&["list"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Act: etcd comes back after a's lease could have lapsed. Assert: a is in the fleet
    // again (its old lease kept alive, or a new one taken) and ready.
    std::thread::sleep(Duration::from_secs(TTL_S + 1));
    etcd.start(&binary);
    wait_nodes(
        &a,
        "a back in the fleet after the outage",
        Duration::from_secs(30),
        |n| node(n, "a").is_some_and(|v| v["state"] == "ready" && v["placeable"] == true),
    );

    // Act: a's lease expires while a is cut off (revoked here: etcd's own restart renews
    // leases). Assert: a takes a new lease and its record is back under it.
    let lease_of_a = || {
        rt.block_on(async {
            let mut c = etcd_client::Client::connect([&url], None).await.unwrap();
            let got = c.get("/genos/fleet/nodes/a", None).await.unwrap();
            got.kvs().first().map(|kv| kv.lease())
        })
    };
    let old = lease_of_a().expect("a's record is in etcd");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([&url], None).await.unwrap();
        c.lease_revoke(old).await.unwrap();
    });
    let revoked = Instant::now();
    loop {
        match lease_of_a() {
            Some(l) if l != old => break,
            _ => {}
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(TTL_S + 10),
            "a did not join again after its lease {old:x} expired"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("a re-joined under a new lease: {:?}", revoked.elapsed());
    wait_nodes(&a, "a's core live again", Duration::from_secs(10), |n| {
        node(n, "a").is_some_and(|v| v["state"] == "ready" && v["placeable"] == true)
    });
    wait_audit(&a, "re-joined", |e| {
        e["action"] == "fleet-join" && e["detail"].as_str().unwrap_or("").contains("re-joined")
    });

    // Act: a's record is deleted by hand (its lease lives on). Assert: a puts it back under
    // a new lease.
    let before = lease_of_a().expect("a's record is back");
    rt.block_on(async {
        let mut c = etcd_client::Client::connect([&url], None).await.unwrap();
        c.delete("/genos/fleet/nodes/a", None).await.unwrap();
    });
    let deleted = Instant::now();
    loop {
        match lease_of_a() {
            Some(l) if l != before => break,
            _ => {}
        }
        assert!(
            deleted.elapsed() < Duration::from_secs(10),
            "a did not publish its record again after it was deleted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("a's deleted record back: {:?}", deleted.elapsed());

    // Act: a is told to stop. Assert: it left (revoked its lease) before it exited, sooner
    // than the lease could have lapsed (at least 2 of its 3 s after the last keep-alive).
    let stopping = Instant::now();
    // SAFETY: kill(2) on the hostd this test spawned (it stays a zombie until dropped).
    unsafe { libc::kill(a.child.id() as i32, libc::SIGTERM) };
    let stat = format!("/proc/{}/stat", a.child.id());
    while !std::fs::read_to_string(&stat)
        .unwrap_or_default()
        .contains(") Z ")
    {
        assert!(
            stopping.elapsed() < Duration::from_secs(10),
            "a did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let exited = stopping.elapsed();
    assert_eq!(lease_of_a(), None, "a's record outlived its hostd");
    assert!(exited < Duration::from_secs(2), "a took {exited:?} to exit");
    eprintln!("a left the fleet and exited {exited:?} after SIGTERM");
    eprintln!("whole test: {:?}", t0.elapsed());
}

#[test]
fn a_host_without_a_fleet_says_so() {
    let h = Hostd::start(
        "[images]\nbuilder = \"/nonexistent/genos-image\"\n[stream]\nlisten = \"127.0.0.1:0\"\n",
    );
    for args in [&["fleet", "nodes"][..], &["fleet", "drain", "x"]] {
        let o = h.genos(args);
        assert!(!o.status.success());
        assert!(
            stderr(&o)
                .contains("this host is not in a fleet ([fleet] etcd is empty in hostd.toml)"),
            "{}",
            stderr(&o)
        );
    }
}
