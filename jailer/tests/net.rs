//! Network policies between network namespaces on this machine only: an "uplink"
//! namespace stands in for the host and a "server" namespace for the outside world;
//! the guest is a namespace wired where the VM's TAP device would be. No packet leaves
//! the machine. Needs root, `ip` and `nft`; prints why and skips otherwise.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use jailer::net::{self, Addressing, Cidr, Policy, Uplink};

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn can_run() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = Command::new("nft").arg("--version").output().is_ok()
        && Command::new("ip").arg("-V").output().is_ok();
    if !root {
        testkit::skip(testkit::Need::Root, "network policy tests need root");
    } else if !tools {
        testkit::skip(testkit::Need::Tools, "network policy tests need ip and nft");
    }
    root && tools
}

/// Runs `f` on a thread that has joined network namespace `ns`.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: the descriptor is open for the duration of the call; setns changes only
        // this thread's network namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}");
        f()
    })
    .join()
    .unwrap()
}

struct World {
    id: String,
    uplink: String,
    server: String,
    guest: String,
    addressing: Addressing,
}

impl World {
    /// uplink <-> server on 192.0.2.0/24 (server holds .10 and .20), then the
    /// environment under test, then a guest namespace in place of the TAP device.
    fn build(id: &str, index: u32, policy: &Policy, allowed: &[Cidr]) -> Self {
        let tag = format!("{}{}", id, std::process::id() % 10000);
        let w = World {
            id: tag.clone(),
            uplink: format!("gt-up-{tag}"),
            server: format!("gt-srv-{tag}"),
            guest: format!("gt-g-{tag}"),
            addressing: Addressing::new(&tag, index).unwrap(),
        };
        w.teardown();
        sh(&["ip", "netns", "add", &w.uplink]);
        sh(&["ip", "netns", "add", &w.server]);
        sh(&["ip", "-n", &w.uplink, "link", "set", "lo", "up"]);
        sh(&["ip", "-n", &w.server, "link", "set", "lo", "up"]);
        sh(&[
            "ip", "-n", &w.uplink, "link", "add", "to-srv", "type", "veth", "peer", "name",
            "to-up", "netns", &w.server,
        ]);
        sh(&[
            "ip",
            "-n",
            &w.uplink,
            "addr",
            "add",
            "192.0.2.1/24",
            "dev",
            "to-srv",
        ]);
        sh(&["ip", "-n", &w.uplink, "link", "set", "to-srv", "up"]);
        sh(&[
            "ip",
            "-n",
            &w.server,
            "addr",
            "add",
            "192.0.2.10/24",
            "dev",
            "to-up",
        ]);
        sh(&[
            "ip",
            "-n",
            &w.server,
            "addr",
            "add",
            "192.0.2.20/24",
            "dev",
            "to-up",
        ]);
        sh(&["ip", "-n", &w.server, "link", "set", "to-up", "up"]);

        net::apply(
            &w.addressing,
            policy,
            &Uplink::Netns(w.uplink.clone()),
            65534,
            allowed,
        )
        .unwrap();

        if *policy != Policy::None {
            // The guest: a namespace whose eth0 is the peer of an interface named like
            // the TAP device, so the environment's rules see the guest's packets arrive
            // exactly as from the VM.
            let a = &w.addressing;
            sh(&["ip", "netns", "add", &w.guest]);
            sh(&["ip", "-n", &a.netns, "link", "del", &a.tap]);
            sh(&[
                "ip", "-n", &a.netns, "link", "add", &a.tap, "type", "veth", "peer", "name",
                "eth0", "netns", &w.guest,
            ]);
            sh(&[
                "ip",
                "-n",
                &a.netns,
                "addr",
                "add",
                &format!("{}/30", a.gateway),
                "dev",
                &a.tap,
            ]);
            sh(&["ip", "-n", &a.netns, "link", "set", &a.tap, "up"]);
            sh(&[
                "ip",
                "-n",
                &w.guest,
                "addr",
                "add",
                &format!("{}/30", a.guest),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &w.guest, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &w.guest, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &w.guest,
                "route",
                "add",
                "default",
                "via",
                &a.gateway.to_string(),
            ]);
        }
        w
    }

    fn serve(&self) -> Vec<std::thread::JoinHandle<()>> {
        self.serve_on(&["192.0.2.10:8080", "192.0.2.20:8080"])
    }

    fn serve_on(&self, addrs: &[&str]) -> Vec<std::thread::JoinHandle<()>> {
        addrs
            .iter()
            .map(|addr| {
                let (tx, rx) = std::sync::mpsc::channel();
                let ns = self.server.clone();
                let addr = addr.to_string();
                let h = std::thread::spawn(move || {
                    in_netns(&ns, move || {
                        let listener = TcpListener::bind(&addr).unwrap();
                        listener.set_nonblocking(true).unwrap();
                        tx.send(()).unwrap();
                        // Serve for a bounded time, then stop by itself.
                        let deadline = std::time::Instant::now() + Duration::from_secs(10);
                        while std::time::Instant::now() < deadline {
                            if let Ok((mut s, _)) = listener.accept() {
                                let _ = std::io::Write::write_all(&mut s, b"hello");
                                return;
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    })
                });
                rx.recv().unwrap();
                h
            })
            .collect()
    }

    fn guest_reaches(&self, addr: &str) -> bool {
        let addr: SocketAddr = addr.parse().unwrap();
        in_netns(&self.guest, move || {
            let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(700)) else {
                return false;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut buf = [0u8; 5];
            std::io::Read::read_exact(&mut s, &mut buf).is_ok() && &buf == b"hello"
        })
    }

    fn teardown(&self) {
        net::teardown(&self.addressing, &Uplink::Netns(self.uplink.clone()));
        for ns in [&self.guest, &self.server, &self.uplink] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[test]
fn with_no_network_the_environment_has_only_loopback() {
    if !can_run() {
        return;
    }
    let w = World::build("none", 1, &Policy::None, &[]);

    let out = Command::new("ip")
        .args(["-n", &w.addressing.netns, "-o", "link", "show"])
        .output()
        .unwrap();

    let links: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        .collect();
    assert_eq!(links, ["lo"], "id {}", w.id);
}

#[test]
fn with_nat_the_guest_reaches_servers_outside() {
    if !can_run() {
        return;
    }
    let w = World::build("nat", 2, &Policy::Nat, &[]);
    let servers = w.serve();

    let uplink = w.uplink.clone();
    let host_service = std::thread::spawn(move || {
        in_netns(&uplink, || {
            let l = TcpListener::bind("0.0.0.0:8081").unwrap();
            l.set_nonblocking(true).unwrap();
            std::thread::sleep(Duration::from_secs(2));
            l.accept().is_ok()
        })
    });
    std::thread::sleep(Duration::from_millis(200));

    let reached = (
        w.guest_reaches("192.0.2.10:8080"),
        w.guest_reaches("192.0.2.20:8080"),
    );
    let host_reached = w.guest_reaches(&format!("{}:8081", w.addressing.uplink_addr));

    for s in servers {
        s.join().unwrap();
    }
    assert_eq!(reached, (true, true));
    assert!(
        !host_reached,
        "the guest reached a service on the host itself"
    );
    assert!(!host_service.join().unwrap());
}

#[test]
fn with_an_allowlist_only_the_listed_address_is_reachable() {
    if !can_run() {
        return;
    }
    let entries = vec!["192.0.2.10".to_string()];
    let allowed = net::resolve_allowlist(&entries, |_| Err("no names here".into())).unwrap();
    let w = World::build("al", 3, &Policy::Allowlist(entries), &allowed);
    let servers = w.serve();

    let listed = w.guest_reaches("192.0.2.10:8080");
    let unlisted = w.guest_reaches("192.0.2.20:8080");
    let uplink_itself = w.guest_reaches(&format!("{}:22", w.addressing.uplink_addr));

    drop(servers);
    assert!(listed, "listed address unreachable");
    assert!(!unlisted, "unlisted address reachable");
    assert!(!uplink_itself, "uplink reachable");
}

/// dnsmasq in namespace `ns` on `listen`, with `args`, forking and writing `pid_file`.
fn dnsmasq(ns: &str, listen: &str, pid_file: &std::path::Path, args: &[&str]) {
    let pid = format!("--pid-file={}", pid_file.display());
    let listen = format!("--listen-address={listen}");
    let mut argv = vec![
        "ip",
        "netns",
        "exec",
        ns,
        "dnsmasq",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--no-resolv",
        "--bind-interfaces",
        &listen,
        &pid,
    ];
    argv.extend_from_slice(args);
    sh(&argv);
}

/// A name query from the guest to `server`: the addresses answered.
fn guest_lookup(w: &World, name: &str, server: &str) -> String {
    let out = Command::new("ip")
        .args([
            "netns", "exec", &w.guest, "busybox", "nslookup", name, server,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_wildcard_allowlist_admits_what_the_environments_resolver_answers_under_it() {
    if !can_run() {
        return;
    }
    if Command::new("dnsmasq").arg("--version").output().is_err() {
        return testkit::skip(testkit::Need::Tools, "the resolver test needs dnsmasq");
    }
    let entries = vec!["*.pypi.org".to_string()];
    let allowed =
        net::resolve_allowlist(&entries, |n| Err(format!("{n} resolved at start"))).unwrap();
    let w = World::build("wc", 5, &Policy::Allowlist(entries.clone()), &allowed);
    // Outside: a public-looking address for the name (answers in private and test
    // ranges are refused by the environment's resolver), and the upstream nameserver.
    sh(&[
        "ip",
        "-n",
        &w.uplink,
        "addr",
        "add",
        "100.64.7.1/24",
        "dev",
        "to-srv",
    ]);
    sh(&[
        "ip",
        "-n",
        &w.server,
        "addr",
        "add",
        "100.64.7.20/24",
        "dev",
        "to-up",
    ]);
    let dir = std::env::temp_dir().join(format!("genos-net-wc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let upstream_pid = dir.join("upstream.pid");
    dnsmasq(
        &w.server,
        "192.0.2.10",
        &upstream_pid,
        &[
            "--address=/pypi.org/100.64.7.20",
            "--address=/other.example/100.64.7.20",
        ],
    );
    let resolver_pid = dir.join("resolver.pid");
    let a = &w.addressing;
    net::start_resolver(
        a,
        &["192.0.2.10".parse().unwrap()],
        &net::wildcard_domains(&entries).unwrap(),
        &resolver_pid,
    )
    .unwrap();
    let servers = w.serve_on(&["100.64.7.20:8080", "192.0.2.10:8080"]);
    let gateway = a.gateway.to_string();

    let before = w.guest_reaches("100.64.7.20:8080");
    let unlisted_answer = guest_lookup(&w, "www.other.example", &gateway);
    let after_unlisted = w.guest_reaches("100.64.7.20:8080");
    let rebind = guest_lookup(&w, "lan.pypi.org", &gateway);
    let answer = guest_lookup(&w, "files.pypi.org", &gateway);
    let after = w.guest_reaches("100.64.7.20:8080");
    let elsewhere = w.guest_reaches("192.0.2.10:8080");

    net::stop_resolver(&resolver_pid);
    net::stop_resolver(&upstream_pid);
    drop(servers);
    assert!(!before, "reachable before any answer");
    assert!(unlisted_answer.contains("100.64.7.20"), "{unlisted_answer}");
    assert!(
        !after_unlisted,
        "a name outside the wildcard admitted its address"
    );
    assert!(answer.contains("100.64.7.20"), "{answer}");
    assert!(
        !rebind.contains("10.9.9.9"),
        "a private answer passed the resolver: {rebind}"
    );
    assert!(
        after,
        "the resolver's answer under *.pypi.org was not admitted"
    );
    assert!(!elsewhere, "an address nothing admitted is reachable");
    let left = resolver_pid.exists();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!left, "pid file left");
}
