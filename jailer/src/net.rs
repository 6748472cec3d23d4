//! Per-environment networks: a network namespace per VM holding the VM's TAP device,
//! with exactly the reach its spec allows.
//!
//! - `none`: the namespace has only loopback; the VM gets no NIC.
//! - `nat`: a TAP device for the guest, a veth pair to the uplink (the host, or a test
//!   namespace), masquerade at both ends, and a forward chain that lets the guest out and
//!   only replies back in.
//! - `allowlist`: as `nat`, but the forward chain admits only the listed CIDRs, the
//!   addresses the listed names resolve to when the environment starts, and for a wildcard
//!   entry (`*.pypi.org`) the addresses the environment's resolver hands out for names under
//!   it (dnsmasq's nftset fills the namespace's `allow4`/`allow6` sets as it answers).
//!
//! `nat` and `allowlist` namespaces run a resolver (dnsmasq, [`start_resolver`]) on the
//! guest's gateway address, forwarding to the host's nameservers; the guest is told to use
//! it.
//!
//! All filtering happens inside the environment's namespace, where the (unprivileged)
//! VMM cannot change it. The plan — commands and nftables rulesets — is computed by pure
//! functions; [`apply`] runs `ip` and `nft`.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, ToSocketAddrs};
use std::process::{Command, Stdio};

/// Errors from planning or building a network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// An allowlist entry is neither a CIDR, an address nor a host name.
    #[error("allowlist entry {0:?} is not an address, CIDR or host name")]
    BadEntry(String),
    /// A host name in the allowlist did not resolve.
    #[error("allowlist name {name} did not resolve: {reason}")]
    Resolve { name: String, reason: String },
    /// The environment index is outside the address plan.
    #[error("environment index {0} is out of range (0..16384)")]
    Index(u32),
    /// The id cannot name interfaces and namespaces.
    #[error("network id {0:?}: use 1 to 8 lowercase letters or digits")]
    BadId(String),
    /// `ip` or `nft` failed.
    #[error("{command}: {stderr}")]
    Command { command: String, stderr: String },
    /// `ip` or `nft` could not be run.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: std::io::Error,
    },
}

/// The spec's network mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Policy {
    /// No network at all.
    None,
    /// Outbound to anywhere, replies back.
    Nat,
    /// Outbound only to these destinations.
    Allowlist(Vec<String>),
}

/// Where the environment's traffic leaves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uplink {
    /// The host's own network namespace.
    Host,
    /// A named network namespace (tests use one standing in for the host).
    Netns(String),
}

/// Prefix length of the guest's link and of the veth link: a /30 holds the two ends.
pub const LINK_PREFIX: u8 = 30;

/// Addresses and names for one environment, derived from its index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// Namespace name (`genos-<id>`).
    pub netns: String,
    /// TAP device inside the namespace, handed to the VMM.
    pub tap: String,
    /// veth end in the uplink.
    pub veth_uplink: String,
    /// veth end in the environment namespace.
    pub veth_env: String,
    /// Uplink-side veth address (/30).
    pub uplink_addr: Ipv4Addr,
    /// Environment-side veth address (/30).
    pub env_addr: Ipv4Addr,
    /// Gateway address on the TAP device, as the guest sees it (/30).
    pub gateway: Ipv4Addr,
    /// The guest's address (/30).
    pub guest: Ipv4Addr,
}

impl Addressing {
    /// Addresses for environment `index` named `id`: veth links from 10.200.0.0/16 and
    /// guest links from 10.201.0.0/16, four addresses each.
    pub fn new(id: &str, index: u32) -> Result<Self, NetError> {
        if !(1..=8).contains(&id.len())
            || !id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(NetError::BadId(id.to_string()));
        }
        if index >= 16384 {
            return Err(NetError::Index(index));
        }
        let base = index * 4;
        let addr = |second: u8, host: u32| {
            let v = base + host;
            Ipv4Addr::new(10, second, (v >> 8) as u8, (v & 0xff) as u8)
        };
        Ok(Self {
            netns: format!("genos-{id}"),
            tap: "tap0".to_string(),
            // Interface names are limited to 15 bytes.
            veth_uplink: format!("gvh-{id}"),
            veth_env: "uplink0".to_string(),
            uplink_addr: addr(200, 1),
            env_addr: addr(200, 2),
            gateway: addr(201, 1),
            guest: addr(201, 2),
        })
    }
}

/// One allowed destination, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Resolves allowlist entries: CIDRs and addresses as they are, names through `resolve`.
pub fn resolve_allowlist(
    entries: &[String],
    resolve: impl Fn(&str) -> Result<Vec<IpAddr>, String>,
) -> Result<Vec<Cidr>, NetError> {
    let mut out = Vec::new();
    for entry in entries {
        let (host, prefix) = match entry.split_once('/') {
            Some((h, p)) => (
                h,
                Some(
                    p.parse::<u8>()
                        .map_err(|_| NetError::BadEntry(entry.clone()))?,
                ),
            ),
            None => (entry.as_str(), None),
        };
        if let Ok(addr) = host.parse::<IpAddr>() {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = prefix.unwrap_or(max);
            if prefix > max {
                return Err(NetError::BadEntry(entry.clone()));
            }
            out.push(Cidr { addr, prefix });
            continue;
        }
        if prefix.is_none() && host.strip_prefix("*.").is_some_and(valid_name) {
            // Admitted as the environment's resolver answers ([`wildcard_domains`]).
            continue;
        }
        if prefix.is_some() || !valid_name(host) {
            return Err(NetError::BadEntry(entry.clone()));
        }
        let addrs = resolve(host).map_err(|reason| NetError::Resolve {
            name: host.to_string(),
            reason,
        })?;
        for addr in addrs {
            let prefix = if addr.is_ipv4() { 32 } else { 128 };
            let cidr = Cidr { addr, prefix };
            if !out.contains(&cidr) {
                out.push(cidr);
            }
        }
    }
    Ok(out)
}

fn valid_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The domains of an allowlist's wildcard entries (`*.pypi.org` → `pypi.org`), whose
/// names' addresses the environment's resolver admits as it hands them out.
pub fn wildcard_domains(entries: &[String]) -> Result<Vec<String>, NetError> {
    let mut out: Vec<String> = Vec::new();
    for entry in entries {
        if let Some(domain) = entry.strip_prefix("*.") {
            if !valid_name(domain) {
                return Err(NetError::BadEntry(entry.clone()));
            }
            let domain = domain.to_ascii_lowercase();
            if !out.contains(&domain) {
                out.push(domain);
            }
        }
    }
    Ok(out)
}

/// The nameservers of a `resolv.conf` text, in order; loopback ones are left out (a
/// resolver on the host's loopback, such as systemd-resolved's stub, cannot be reached from
/// an environment's namespace).
pub fn nameservers(resolv_conf: &str) -> Vec<IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            words.next()?.parse::<IpAddr>().ok()
        })
        .filter(|a| !a.is_loopback())
        .collect()
}

/// The host's nameservers an environment's resolver forwards to: `/etc/resolv.conf`'s, or
/// systemd-resolved's upstream ones when that file only names its local stub.
pub fn host_nameservers() -> Vec<IpAddr> {
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"]
        .iter()
        .map(|p| nameservers(&std::fs::read_to_string(p).unwrap_or_default()))
        .find(|n| !n.is_empty())
        .unwrap_or_default()
}

/// The environment's resolver: dnsmasq in its namespace on the guest's gateway address,
/// forwarding to `upstreams`, putting the addresses it answers for names under `wildcards`
/// into the namespace's allow sets; it forks and writes its pid to `pid_file`.
pub fn resolver_command(
    a: &Addressing,
    upstreams: &[IpAddr],
    wildcards: &[String],
    pid_file: &std::path::Path,
) -> Vec<String> {
    let mut cmd: Vec<String> = ["ip", "netns", "exec", &a.netns, "dnsmasq"]
        .map(String::from)
        .to_vec();
    cmd.extend(
        [
            "--conf-file=/dev/null",
            "--no-hosts",
            "--no-resolv",
            "--bind-interfaces",
            "--cache-size=1000",
            // Answers pointing into private ranges from public names are refused (DNS
            // rebinding onto the operator's own networks).
            "--stop-dns-rebind",
        ]
        .map(String::from),
    );
    cmd.push(format!("--listen-address={}", a.gateway));
    cmd.push(format!("--pid-file={}", pid_file.display()));
    for up in upstreams {
        cmd.push(format!("--server={up}"));
    }
    if !wildcards.is_empty() {
        cmd.push(format!(
            "--nftset=/{}/4#inet#genos#{ALLOW4_SET},6#inet#genos#{ALLOW6_SET}",
            wildcards.join("/")
        ));
    }
    cmd
}

/// Starts the environment's resolver ([`resolver_command`]); it runs until
/// [`stop_resolver`].
pub fn start_resolver(
    a: &Addressing,
    upstreams: &[IpAddr],
    wildcards: &[String],
    pid_file: &std::path::Path,
) -> Result<(), NetError> {
    run(&resolver_command(a, upstreams, wildcards, pid_file), None)
}

/// Stops the resolver whose pid `pid_file` holds, if that process is still a dnsmasq (a
/// pid reused by another program is left alone). Best effort.
pub fn stop_resolver(pid_file: &std::path::Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .filter(|p| *p > 1)
    else {
        return;
    };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "dnsmasq" {
        // SAFETY: kill(2) with a plain pid and signal; no memory is passed.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let _ = std::fs::remove_file(pid_file);
}

/// Names of the sets in the namespace's `inet genos` table that the resolver fills.
pub const ALLOW4_SET: &str = "allow4";
pub const ALLOW6_SET: &str = "allow6";

/// Resolves a name with the host's resolver.
pub fn system_resolve(name: &str) -> Result<Vec<IpAddr>, String> {
    (name, 0)
        .to_socket_addrs()
        .map(|it| it.map(|s| s.ip()).collect())
        .map_err(|e| e.to_string())
}

/// The nftables ruleset loaded into the environment's namespace.
pub fn env_ruleset(a: &Addressing, allowed: Option<&[Cidr]>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "table inet genos {{");
    let _ = writeln!(s, "  chain input {{");
    let _ = writeln!(s, "    type filter hook input priority 0; policy drop;");
    let _ = writeln!(s, "    iifname \"lo\" accept");
    let _ = writeln!(s, "    ct state established,related accept");
    // The environment's resolver, on the gateway address.
    let _ = writeln!(
        s,
        "    iifname \"{}\" ip daddr {} meta l4proto {{ udp, tcp }} th dport 53 accept",
        a.tap, a.gateway
    );
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "  set {ALLOW4_SET} {{ type ipv4_addr; }}");
    let _ = writeln!(s, "  set {ALLOW6_SET} {{ type ipv6_addr; }}");
    let _ = writeln!(s, "  chain forward {{");
    let _ = writeln!(s, "    type filter hook forward priority 0; policy drop;");
    let _ = writeln!(
        s,
        "    iifname \"{}\" oifname \"{}\" ct state established,related accept",
        a.veth_env, a.tap
    );
    match allowed {
        None => {
            let _ = writeln!(
                s,
                "    iifname \"{}\" oifname \"{}\" accept",
                a.tap, a.veth_env
            );
        }
        Some(list) => {
            let v4: Vec<String> = list
                .iter()
                .filter(|c| c.addr.is_ipv4())
                .map(Cidr::to_string)
                .collect();
            let v6: Vec<String> = list
                .iter()
                .filter(|c| c.addr.is_ipv6())
                .map(Cidr::to_string)
                .collect();
            if !v4.is_empty() {
                let _ = writeln!(
                    s,
                    "    iifname \"{}\" oifname \"{}\" ip daddr {{ {} }} accept",
                    a.tap,
                    a.veth_env,
                    v4.join(", ")
                );
            }
            if !v6.is_empty() {
                let _ = writeln!(
                    s,
                    "    iifname \"{}\" oifname \"{}\" ip6 daddr {{ {} }} accept",
                    a.tap,
                    a.veth_env,
                    v6.join(", ")
                );
            }
            // What the resolver handed out for the wildcard entries.
            let _ = writeln!(
                s,
                "    iifname \"{}\" oifname \"{}\" ip daddr @{ALLOW4_SET} accept",
                a.tap, a.veth_env
            );
            let _ = writeln!(
                s,
                "    iifname \"{}\" oifname \"{}\" ip6 daddr @{ALLOW6_SET} accept",
                a.tap, a.veth_env
            );
        }
    }
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    let _ = writeln!(s, "table ip genos_nat {{");
    let _ = writeln!(s, "  chain postrouting {{");
    let _ = writeln!(
        s,
        "    type nat hook postrouting priority 100; policy accept;"
    );
    let _ = writeln!(s, "    oifname \"{}\" masquerade", a.veth_env);
    let _ = writeln!(s, "  }}");
    let _ = writeln!(s, "}}");
    s
}

/// The nftables table loaded into the uplink: masquerade what comes from this
/// environment's veth and let it be forwarded, but never let it reach the uplink itself
/// (the host's own services are not part of any environment's network).
pub fn uplink_ruleset(a: &Addressing) -> String {
    format!(
        "table ip genos_{ns} {{\n  chain input {{\n    type filter hook input priority 0; policy accept;\n    \
         iifname \"{veth}\" ct state established,related accept\n    iifname \"{veth}\" drop\n  }}\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    \
         iifname \"{veth}\" accept\n    oifname \"{veth}\" ct state established,related accept\n    \
         oifname \"{veth}\" drop\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority 100; policy accept;\n    \
         ip saddr {env}/32 oifname != \"{veth}\" masquerade\n  }}\n}}\n",
        ns = a.netns.replace('-', "_"),
        veth = a.veth_uplink,
        env = a.env_addr,
    )
}

/// Commands (argv) that build the namespace and its links. The rulesets are loaded
/// separately with `nft -f -`.
pub fn setup_commands(
    a: &Addressing,
    policy: &Policy,
    uplink: &Uplink,
    vmm_uid: u32,
) -> Vec<Vec<String>> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    let mut cmd = |v: &[&str]| cmds.push(v.iter().map(|s| s.to_string()).collect());
    let ns = a.netns.as_str();
    cmd(&["ip", "netns", "add", ns]);
    cmd(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    if *policy == Policy::None {
        return cmds;
    }
    let uid = vmm_uid.to_string();
    cmd(&[
        "ip", "-n", ns, "tuntap", "add", "dev", &a.tap, "mode", "tap", "user", &uid,
    ]);
    cmd(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{LINK_PREFIX}", a.gateway),
        "dev",
        &a.tap,
    ]);
    cmd(&["ip", "-n", ns, "link", "set", &a.tap, "up"]);
    let uplink_ns: Vec<&str> = match uplink {
        Uplink::Host => vec![],
        Uplink::Netns(n) => vec!["-n", n.as_str()],
    };
    let mut up = |rest: &[&str]| {
        let mut v = vec!["ip"];
        v.extend(&uplink_ns);
        v.extend(rest);
        cmds.push(v.iter().map(|s| s.to_string()).collect());
    };
    up(&[
        "link",
        "add",
        &a.veth_uplink,
        "type",
        "veth",
        "peer",
        "name",
        &a.veth_env,
        "netns",
        ns,
    ]);
    up(&[
        "addr",
        "add",
        &format!("{}/{LINK_PREFIX}", a.uplink_addr),
        "dev",
        &a.veth_uplink,
    ]);
    up(&["link", "set", &a.veth_uplink, "up"]);
    let guest_net = Ipv4Addr::from(u32::from(a.guest) & !3);
    up(&[
        "route",
        "add",
        &format!("{guest_net}/{LINK_PREFIX}"),
        "via",
        &a.env_addr.to_string(),
    ]);
    let mut cmd = |v: &[&str]| cmds.push(v.iter().map(|s| s.to_string()).collect());
    cmd(&[
        "ip",
        "-n",
        ns,
        "addr",
        "add",
        &format!("{}/{LINK_PREFIX}", a.env_addr),
        "dev",
        &a.veth_env,
    ]);
    cmd(&["ip", "-n", ns, "link", "set", &a.veth_env, "up"]);
    cmd(&[
        "ip",
        "-n",
        ns,
        "route",
        "add",
        "default",
        "via",
        &a.uplink_addr.to_string(),
    ]);
    cmd(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    match uplink {
        Uplink::Host => cmd(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
        Uplink::Netns(n) => cmd(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]),
    }
    cmds
}

fn run(argv: &[String], stdin: Option<&str>) -> Result<(), NetError> {
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::Spawn {
            tool: argv[0].clone(),
            source,
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| NetError::Spawn {
        tool: argv[0].clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command: argv.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Builds the environment's network. On failure everything built so far is removed.
pub fn apply(
    a: &Addressing,
    policy: &Policy,
    uplink: &Uplink,
    vmm_uid: u32,
    allowed: &[Cidr],
) -> Result<(), NetError> {
    let result = (|| {
        for argv in setup_commands(a, policy, uplink, vmm_uid) {
            run(&argv, None)?;
        }
        if *policy != Policy::None {
            let allowed = matches!(policy, Policy::Allowlist(_)).then_some(allowed);
            let ns = a.netns.clone();
            run(
                &["ip", "netns", "exec", &ns, "nft", "-f", "-"].map(String::from),
                Some(&env_ruleset(a, allowed)),
            )?;
            let mut nft: Vec<String> = match uplink {
                Uplink::Host => vec![],
                Uplink::Netns(n) => vec!["ip".into(), "netns".into(), "exec".into(), n.clone()],
            };
            nft.extend(["nft", "-f", "-"].map(String::from));
            run(&nft, Some(&uplink_ruleset(a)))?;
        }
        Ok(())
    })();
    if result.is_err() {
        teardown(a, uplink);
    }
    result
}

/// Removes the environment's namespace (which takes its TAP and veth end with it), the
/// uplink's veth end and its nftables table. Best effort: missing pieces are fine.
pub fn teardown(a: &Addressing, uplink: &Uplink) {
    let prefix: Vec<String> = match uplink {
        Uplink::Host => vec![],
        Uplink::Netns(n) => vec!["ip".into(), "netns".into(), "exec".into(), n.clone()],
    };
    let mut nft = prefix.clone();
    nft.extend(["nft", "delete", "table", "ip"].map(String::from));
    nft.push(format!("genos_{}", a.netns.replace('-', "_")));
    let _ = run(&nft, None);
    let mut del = prefix;
    del.extend(["ip", "link", "del"].map(String::from));
    del.push(a.veth_uplink.clone());
    let _ = run(&del, None);
    let _ = run(&["ip", "netns", "del", &a.netns].map(String::from), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_derived_from_the_index_without_overlap() {
        let a = Addressing::new("a", 0).unwrap();
        let b = Addressing::new("b", 65).unwrap();

        assert_eq!(
            (a.uplink_addr, a.env_addr),
            (Ipv4Addr::new(10, 200, 0, 1), Ipv4Addr::new(10, 200, 0, 2))
        );
        assert_eq!(
            (a.gateway, a.guest),
            (Ipv4Addr::new(10, 201, 0, 1), Ipv4Addr::new(10, 201, 0, 2))
        );
        assert_eq!(b.uplink_addr, Ipv4Addr::new(10, 200, 1, 5));
        assert!(Addressing::new("a", 16384).is_err());
        assert!(Addressing::new("Bad-id", 1).is_err());
    }

    #[test]
    fn wildcard_entries_go_to_the_resolver_not_to_start_up_resolution() {
        let entries: Vec<String> = ["*.pypi.org", "*.PyPI.org", "192.0.2.0/24", "*.x.example"]
            .map(String::from)
            .to_vec();

        let resolved = resolve_allowlist(&entries, |n| Err(format!("{n} asked")));
        let domains = wildcard_domains(&entries).unwrap();

        assert_eq!(resolved.unwrap().len(), 1, "only the CIDR");
        assert_eq!(domains, vec!["pypi.org", "x.example"]);
        for bad in ["*.", "*.-x..org", "a.*.org", "*.org/8"] {
            let entries = vec![bad.to_string()];
            assert!(
                resolve_allowlist(&entries, |_| Ok(vec![])).is_err()
                    || wildcard_domains(&entries).is_err(),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn host_nameservers_skip_loopback_stubs() {
        let conf = "# comment\nnameserver 127.0.0.53\nnameserver 192.0.2.53\noptions edns0\nnameserver 2001:db8::53\nnameserver bogus\n";

        assert_eq!(
            nameservers(conf),
            vec![
                "192.0.2.53".parse::<IpAddr>().unwrap(),
                "2001:db8::53".parse().unwrap()
            ]
        );
        assert!(nameservers("nameserver 127.0.0.53\n").is_empty());
    }

    #[test]
    fn the_resolver_listens_on_the_gateway_and_fills_the_allow_sets_for_wildcards() {
        let a = Addressing::new("e3", 3).unwrap();
        let up: Vec<IpAddr> = vec!["192.0.2.53".parse().unwrap()];

        let plain = resolver_command(&a, &up, &[], std::path::Path::new("/s/r.pid"));
        let wild = resolver_command(
            &a,
            &up,
            &["pypi.org".into(), "pythonhosted.org".into()],
            std::path::Path::new("/s/r.pid"),
        );

        assert_eq!(plain[..5], ["ip", "netns", "exec", "genos-e3", "dnsmasq"]);
        for arg in [
            "--listen-address=10.201.0.13",
            "--server=192.0.2.53",
            "--no-resolv",
            "--pid-file=/s/r.pid",
        ] {
            assert!(plain.iter().any(|x| x == arg), "{arg} missing: {plain:?}");
        }
        assert!(!plain.iter().any(|x| x.starts_with("--nftset")));
        assert!(wild.contains(
            &"--nftset=/pypi.org/pythonhosted.org/4#inet#genos#allow4,6#inet#genos#allow6"
                .to_string()
        ));
        let rules = env_ruleset(&a, Some(&[]));
        assert!(rules.contains("set allow4 { type ipv4_addr; }"), "{rules}");
        assert!(rules.contains("ip daddr @allow4 accept"), "{rules}");
        assert!(
            rules.contains("iifname \"tap0\" ip daddr 10.201.0.13 meta l4proto { udp, tcp } th dport 53 accept"),
            "{rules}"
        );
    }

    #[test]
    fn allowlist_keeps_cidrs_and_resolves_names_once() {
        let entries: Vec<String> = ["192.0.2.0/24", "2001:db8::1", "github.com", "github.com"]
            .map(String::from)
            .to_vec();

        let out = resolve_allowlist(&entries, |name| {
            assert_eq!(name, "github.com");
            Ok(vec!["198.51.100.7".parse().unwrap()])
        })
        .unwrap();

        let shown: Vec<String> = out.iter().map(Cidr::to_string).collect();
        assert_eq!(
            shown,
            ["192.0.2.0/24", "2001:db8::1/128", "198.51.100.7/32"]
        );
    }

    #[test]
    fn bad_allowlist_entries_and_failed_lookups_are_named() {
        let err = resolve_allowlist(&["10.0.0.0/40".into()], |_| Ok(vec![])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "allowlist entry \"10.0.0.0/40\" is not an address, CIDR or host name"
        );
        let err =
            resolve_allowlist(&["no.such.name".into()], |_| Err("not found".into())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "allowlist name no.such.name did not resolve: not found"
        );
        assert!(resolve_allowlist(&["a b".into()], |_| Ok(vec![])).is_err());
    }

    #[test]
    fn the_allowlist_ruleset_admits_only_listed_destinations() {
        let a = Addressing::new("x", 3).unwrap();
        let allowed = vec![Cidr {
            addr: "192.0.2.10".parse().unwrap(),
            prefix: 32,
        }];

        let rules = env_ruleset(&a, Some(&allowed));

        assert!(rules.contains("policy drop;"));
        assert!(rules
            .contains("iifname \"tap0\" oifname \"uplink0\" ip daddr { 192.0.2.10/32 } accept"));
        assert!(!rules.contains("iifname \"tap0\" oifname \"uplink0\" accept"));
    }

    #[test]
    fn no_network_means_a_namespace_with_loopback_only() {
        let a = Addressing::new("n", 1).unwrap();
        let cmds = setup_commands(&a, &Policy::None, &Uplink::Host, 1000);
        assert_eq!(cmds.len(), 2);
        assert!(cmds
            .iter()
            .all(|c| !c.contains(&"tuntap".to_string()) && !c.contains(&"veth".to_string())));
    }
}
