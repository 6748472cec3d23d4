//! Jailing VMMs: whether and how (`[jail]` against this host), the slot, uid/gid, cgroup
//! limits and network namespace of each jailed environment, recorded in
//! `envs/NAME/jail.json` and released when its VMM ends, and where a VMM's control socket is.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::spec::Spec;
use serde::Serialize;

use super::Orchestrator;
use crate::config::{Config, JailMode};
use crate::uds::VmmSocket;

/// Whether and how VMMs are jailed, decided once from `[jail]` and the host.
#[derive(Debug, Clone)]
pub(super) enum Jail {
    Off,
    On(JailSetup),
    /// `jailer = "always"` but the jail cannot be used: every boot fails with this.
    Unusable(JailProblem),
}

/// Why this host cannot jail VMMs.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub(super) enum JailProblem {
    #[error("genos-jailer was not found (set jail.binary)")]
    NoJailer,
    #[error("hostd does not run as root, which the jailer needs")]
    NotRoot,
}

/// Why an environment's jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub(super) enum JailError {
    #[error("all {0} jail slots are in use")]
    NoSlot(u32),
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("network allowlist")]
    Allowlist(#[source] jailer::net::NetError),
    #[error("network")]
    Addressing(#[source] jailer::net::NetError),
    #[error("cannot build the network namespace")]
    Netns(#[source] jailer::net::NetError),
    #[error("cannot start the environment's resolver")]
    Resolver(#[source] jailer::net::NetError),
    #[error(
        "the allowlist's wildcard entries need the environment's resolver, and this host has \
         no nameserver it could forward to (none but loopback in /etc/resolv.conf)"
    )]
    NoNameserver,
}

/// The environment's resolver's pid file, in its directory.
pub(super) const RESOLVER_PID: &str = "resolver.pid";

#[derive(Debug, Clone)]
pub(super) struct JailSetup {
    pub(super) binary: PathBuf,
    pub(super) chroot_base: PathBuf,
    pub(super) cgroup_version: Option<jailer::cgroup::Version>,
}

/// What was set up for one jailed environment (`envs/NAME/jail.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub(super) struct JailRecord {
    pub(super) slot: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) jail_dir: PathBuf,
    /// `jailer::net` id and index of the environment's network namespace, if any.
    pub(super) net_id: Option<String>,
    /// Whether a resolver runs in that namespace on the guest's gateway address.
    #[serde(default)]
    pub(super) resolver: bool,
}

impl JailRecord {
    pub(super) fn addressing(&self) -> Option<jailer::net::Addressing> {
        let id = self.net_id.as_deref()?;
        jailer::net::Addressing::new(id, self.slot).ok()
    }
}

/// Resolves `[jail]` against this host.
pub(super) fn decide_jail(cfg: &Config, state_dir: &Path) -> Jail {
    let j = &cfg.jail;
    if j.jailer == JailMode::Never {
        return Jail::Off;
    }
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let binary = if j.binary.is_empty() {
        let beside = Path::new(&cfg.vmm.binary)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| p.join("genos-jailer"));
        beside
            .filter(|p| p.is_file())
            .or_else(|| find_on_path("genos-jailer"))
    } else {
        let p = PathBuf::from(&j.binary);
        if p.components().count() > 1 {
            Some(p).filter(|p| p.is_file())
        } else {
            find_on_path(&j.binary)
        }
    };
    let problem = match (&binary, root) {
        (None, _) => Some(JailProblem::NoJailer),
        (_, false) => Some(JailProblem::NotRoot),
        _ => None,
    };
    if let Some(problem) = problem {
        return match j.jailer {
            JailMode::Always => Jail::Unusable(problem),
            _ => Jail::Off,
        };
    }
    let chroot_base = if j.chroot_base.is_empty() {
        state_dir.join("jail")
    } else {
        PathBuf::from(&j.chroot_base)
    };
    let cgroup_version = jailer::cgroup::Mounts::of_this_host()
        .and_then(|m| m.preferred_version())
        .ok();
    Jail::On(JailSetup {
        binary: binary.expect("checked above"),
        chroot_base,
        cgroup_version,
    })
}

/// The VMM binary as a path (the jailer bind-mounts it): PATH lookup for a bare name.
pub(super) fn exec_file(binary: &str) -> PathBuf {
    let p = PathBuf::from(binary);
    if p.components().count() > 1 {
        return p;
    }
    find_on_path(binary).unwrap_or(p)
}

pub(super) fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The jailer's `--cgroup` settings for `spec`: memory = guest memory + the VMM overhead,
/// CPU quota = one CPU per vCPU, a task limit.
pub(super) fn cgroup_settings(
    version: Option<jailer::cgroup::Version>,
    spec: &Spec,
    overhead_mib: u64,
    pids_max: u32,
) -> Vec<String> {
    const PERIOD_US: u64 = 100_000;
    let mem = (u64::from(spec.memory_mib) + overhead_mib) << 20;
    let quota = u64::from(spec.vcpus) * PERIOD_US;
    match version {
        Some(jailer::cgroup::Version::V1) => vec![
            format!("memory.limit_in_bytes={mem}"),
            format!("cpu.cfs_quota_us={quota}"),
            format!("pids.max={pids_max}"),
        ],
        Some(jailer::cgroup::Version::V2) => vec![
            format!("memory.max={mem}"),
            format!("cpu.max={quota} {PERIOD_US}"),
            format!("pids.max={pids_max}"),
        ],
        // No cgroup hierarchy mounted: nothing to limit with.
        None => vec![],
    }
}

/// File name of a VM's virtio-vsock socket, beside its control socket (jailed: in the
/// jail's `run/`, where the jailer puts it): hostd reaches the guest agent through it.
pub(super) const AGENT_SOCKET: &str = "vsock.sock";

/// The control socket of a jailed VMM: `run/api.sock` inside its jail directory (the
/// directory is root's, `run/` the VMM's). `envs/NAME/api.sock` is the jailer's symlink
/// to it, kept for operators; hostd never follows it.
pub(super) fn jailed_socket(record: &JailRecord) -> VmmSocket {
    VmmSocket {
        base: record.jail_dir.clone(),
        rel: vec!["run".into(), "api.sock".into()],
        uid: record.uid,
    }
}

/// The control socket of an unjailed VMM running as `uid`: `api.sock` in its environment
/// directory.
pub(super) fn unjailed_socket(env_dir: &Path, uid: u32) -> VmmSocket {
    VmmSocket {
        base: env_dir.to_owned(),
        rel: vec!["api.sock".into()],
        uid,
    }
}

const JAIL_RECORD: &str = "jail.json";

pub(super) fn read_jail_record(env_dir: &Path) -> Option<JailRecord> {
    let text = std::fs::read(env_dir.join(JAIL_RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_jail_record(env_dir: &Path, r: &JailRecord) -> Result<(), JailError> {
    let path = env_dir.join(JAIL_RECORD);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(r).expect("jail record json"),
    )
    .map_err(|source| JailError::Write { path, source })
}

impl Orchestrator {
    /// Picks a slot no other jailed environment holds, records it in `jail.json` and, for
    /// `policy`, builds the environment's network namespace. Blocking (runs `ip`/`nft`).
    ///
    /// Network namespace names and addresses are host-wide, so a slot whose namespace or
    /// uplink veth exists (another hostd, a leftover) is skipped too, and the choice and the
    /// build happen under one process-wide lock: `net::apply` undoes a failed build by
    /// deleting the namespace, which must never be someone else's.
    pub(super) fn allocate_jail(
        state_dir: &Path,
        name: &str,
        cfg: &crate::config::JailConfig,
        setup: &JailSetup,
        net: Option<(jailer::net::Policy, Vec<jailer::net::Cidr>)>,
    ) -> Result<(JailRecord, Option<jailer::net::Addressing>), JailError> {
        static SLOTS: Mutex<()> = Mutex::new(());
        let _guard = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        let mut used = std::collections::HashSet::new();
        if let Ok(entries) = std::fs::read_dir(state_dir.join("envs")) {
            for e in entries.flatten() {
                if let Some(r) = read_jail_record(&e.path()) {
                    used.insert(r.slot);
                }
            }
        }
        let host_taken = |slot: u32| {
            Path::new(&format!("/run/netns/genos-e{slot}")).exists()
                || Path::new(&format!("/sys/class/net/gvh-e{slot}")).exists()
        };
        let slot = (0..cfg.slots)
            .find(|s| !used.contains(s) && !host_taken(*s))
            .ok_or(JailError::NoSlot(cfg.slots))?;
        let mut record = JailRecord {
            slot,
            uid: cfg.uid_base + slot,
            gid: cfg.gid_base + slot,
            jail_dir: setup.chroot_base.join("genos-vmm").join(name),
            net_id: None,
            resolver: false,
        };
        let env_dir = state_dir.join("envs").join(name);
        let Some((policy, allowed)) = net else {
            write_jail_record(&env_dir, &record)?;
            return Ok((record, None));
        };
        let id = format!("e{slot}");
        let addr = jailer::net::Addressing::new(&id, slot).map_err(JailError::Addressing)?;
        // The slot is recorded before the build, the namespace only once it exists: a failed
        // build has removed its own pieces, and a later release must not delete a namespace
        // of the same name that someone else has built since.
        write_jail_record(&env_dir, &record)?;
        jailer::net::apply(
            &addr,
            &policy,
            &jailer::net::Uplink::Host,
            record.uid,
            &allowed,
        )
        .map_err(JailError::Netns)?;
        record.net_id = Some(id);
        write_jail_record(&env_dir, &record)?;
        // The guest's resolver, forwarding to the host's nameservers; without any, a nat
        // guest gets no resolver (and is told none), a wildcard allowlist cannot work.
        let wildcards = match &policy {
            jailer::net::Policy::Allowlist(entries) => {
                jailer::net::wildcard_domains(entries).map_err(JailError::Allowlist)?
            }
            _ => vec![],
        };
        let upstreams = jailer::net::host_nameservers();
        if upstreams.is_empty() {
            if !wildcards.is_empty() {
                return Err(JailError::NoNameserver);
            }
        } else {
            jailer::net::start_resolver(&addr, &upstreams, &wildcards, &env_dir.join(RESOLVER_PID))
                .map_err(JailError::Resolver)?;
            record.resolver = true;
            write_jail_record(&env_dir, &record)?;
        }
        Ok((record, Some(addr)))
    }

    /// Tears down what `boot_jailed` set up outside the jail (the network namespace) and
    /// frees the slot. The jailer itself removes its directory and cgroup.
    pub(super) fn release_jail(&self, name: &str) {
        let dir = self.env_dir(name);
        let Some(record) = read_jail_record(&dir) else {
            return;
        };
        if let Some(a) = record.addressing() {
            jailer::net::stop_resolver(&dir.join(RESOLVER_PID));
            jailer::net::teardown(&a, &jailer::net::Uplink::Host);
            let _ = self.audit("hostd", "network", name, &format!("removed {}", a.netns));
        }
        let _ = std::fs::remove_file(dir.join(JAIL_RECORD));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::tests::spec;

    #[test]
    fn cgroup_limits_follow_the_spec_in_either_interface() {
        use jailer::cgroup::Version;
        let s = spec(2, 512);
        assert_eq!(
            cgroup_settings(Some(Version::V1), &s, 128, 64),
            [
                "memory.limit_in_bytes=671088640",
                "cpu.cfs_quota_us=200000",
                "pids.max=64"
            ]
        );
        assert_eq!(
            cgroup_settings(Some(Version::V2), &s, 128, 64),
            [
                "memory.max=671088640",
                "cpu.max=200000 100000",
                "pids.max=64"
            ]
        );
        assert!(cgroup_settings(None, &s, 128, 64).is_empty());
        // Every setting is one the jailer accepts.
        for v in [Version::V1, Version::V2] {
            for c in cgroup_settings(Some(v), &s, 128, 64) {
                jailer::cgroup::Setting::parse(&c).unwrap();
            }
        }
    }
}
