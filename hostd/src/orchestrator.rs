//! Orchestrator: moves environments through their lifecycle and supervises one genos-vmm
//! process per environment.
//!
//! requested → building (images from genos-image) → booting (genos-vmm spawned, configured
//! and started over its control socket) → ready (the guest signalled the boot timer) →
//! stopped → destroyed; any live state may become failed, with the reason. Admission
//! control runs before anything is stored. Each VMM runs in its own process group with its
//! output in files, so it outlives a hostd restart; on start hostd re-adopts every VMM whose
//! control socket still answers and fails the environments whose VMM is gone.
//!
//! When jailing is on (`[jail]`, see docs/sandbox.md) each VMM is started through
//! `genos-jailer` with its own uid/gid slot, cgroup limits derived from the spec and, for
//! `nat`/`allowlist` networks, a network namespace built with `jailer::net`; what was set
//! up is recorded in `envs/NAME/jail.json` so it can be torn down after a restart too.
//!
//! VMMs are untrusted: processes are held by pidfd ([`crate::pidfd`]), never signalled by
//! number, and re-adopted only when the recorded process identity (`envs/NAME/vmm.json`:
//! pid, start time, boot) and the control socket's peer both match; control sockets are
//! reached through [`uds::VmmSocket`] (no links followed, peer uid checked).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use proto::spec::{Catalog, Spec, SpecError};
use serde::Serialize;
use tokio::sync::watch;
use vmm_api::{
    DiskConfig, DisplaySize, LifecycleAction, NetConfig, Request, SerialConfig, VmConfig, VmState,
};

use crate::composer::{Clarify, Composer, Composition, Outcome};
use crate::config::{Config, JailMode};
use crate::pidfd::{Pidfd, ProcessId};
use crate::store::{now_s, AuditReport, EnvRecord, EnvState, Store, StoreError};
use crate::uds::VmmSocket;
use crate::vmm_client::{self, VmmClientError};

#[derive(Debug, thiserror::Error)]
pub enum OrchError {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error("{0}")]
    Admission(String),
    #[error("no environment named {0:?}")]
    NotFound(String),
    #[error("cannot {action} {name}: it is {state}")]
    WrongState {
        name: String,
        action: &'static str,
        state: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("viewer tokens: {0}")]
    Token(String),
    #[error("cannot revoke the token")]
    Revoke(#[source] crate::stream::TokenError),
    #[error("configuration: {0}")]
    Config(String),
}

/// Host resources available to environments (after the overcommit ratios).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cpu_overcommit: f64,
    pub memory_overcommit: f64,
}

impl Capacity {
    pub fn from_config(cfg: &Config) -> Capacity {
        let c = &cfg.capacity;
        let vcpus = if c.vcpus > 0 {
            c.vcpus
        } else {
            std::thread::available_parallelism()
                .map(|n| n.get() as u32)
                .unwrap_or(1)
        };
        let memory_mib = if c.memory_mib > 0 {
            c.memory_mib
        } else {
            host_memory_mib().saturating_sub(c.reserve_memory_mib)
        };
        Capacity {
            vcpus,
            memory_mib,
            cpu_overcommit: c.cpu_overcommit,
            memory_overcommit: c.memory_overcommit,
        }
    }

    /// Refuses `spec` when it and the live environments would exceed capacity × overcommit.
    pub fn admit(&self, used_vcpus: u64, used_mib: u64, spec: &Spec) -> Result<(), String> {
        let cpu_limit = (f64::from(self.vcpus) * self.cpu_overcommit).floor() as u64;
        let mem_limit = (self.memory_mib as f64 * self.memory_overcommit).floor() as u64;
        let (want_cpu, want_mib) = (u64::from(spec.vcpus), u64::from(spec.memory_mib));
        if used_vcpus + want_cpu > cpu_limit {
            return Err(format!(
                "not enough CPU: {} asks for {want_cpu} vCPUs, {used_vcpus} of {cpu_limit} are in use ({} host CPUs x overcommit {})",
                spec.name, self.vcpus, self.cpu_overcommit
            ));
        }
        if used_mib + want_mib > mem_limit {
            return Err(format!(
                "not enough memory: {} asks for {want_mib} MiB, {used_mib} of {mem_limit} MiB are in use ({} MiB x overcommit {})",
                spec.name, self.memory_mib, self.memory_overcommit
            ));
        }
        Ok(())
    }
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}

/// What `create` from text produced.
#[derive(Debug)]
pub enum CreateOutcome {
    Created(Box<EnvRecord>),
    Clarify(Clarify),
}

/// A supervised VMM process.
struct Proc {
    /// The VMM (under the jailer: opened once the jail's pid file names it).
    vmm: OnceLock<Arc<Pidfd>>,
    /// The jailer (our child) when the VMM runs jailed.
    jailer: Option<Pidfd>,
    /// Its control socket.
    socket: VmmSocket,
    /// Set before hostd itself stops the VMM, so its exit is not a failure.
    stopping: AtomicBool,
    exited: watch::Receiver<bool>,
}

/// Which process an environment's VMM is and which uid serves its socket
/// (`envs/NAME/vmm.json`), for re-adoption after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct VmmRecord {
    process: ProcessId,
    uid: u32,
}

const VMM_RECORD: &str = "vmm.json";

/// Longest request text the audit log keeps verbatim; longer texts are cut there and
/// recorded with their length and SHA-256.
pub const AUDIT_TEXT_MAX: usize = 1024;

/// What the audit log records of a request's text: all of it up to [`AUDIT_TEXT_MAX`]
/// bytes, else its first bytes (at a character boundary), its length and its SHA-256.
pub fn audit_text(text: &str) -> String {
    if text.len() <= AUDIT_TEXT_MAX {
        return text.to_string();
    }
    let mut end = AUDIT_TEXT_MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    format!(
        "{}... ({} bytes, sha256 {})",
        &text[..end],
        text.len(),
        hex::encode(digest)
    )
}

/// The control socket of a jailed VMM: `run/api.sock` inside its jail directory (the
/// directory is root's, `run/` the VMM's). `envs/NAME/api.sock` is the jailer's symlink
/// to it, kept for operators; hostd never follows it.
fn jailed_socket(record: &JailRecord) -> VmmSocket {
    VmmSocket {
        base: record.jail_dir.clone(),
        rel: vec!["run".into(), "api.sock".into()],
        uid: record.uid,
    }
}

/// The control socket of an unjailed VMM running as `uid`: `api.sock` in its environment
/// directory.
fn unjailed_socket(env_dir: &Path, uid: u32) -> VmmSocket {
    VmmSocket {
        base: env_dir.to_owned(),
        rel: vec!["api.sock".into()],
        uid,
    }
}

/// Creates `dir` (and missing parents) readable by hostd's user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

#[derive(Default)]
struct Counters {
    created: AtomicU64,
    refused: AtomicU64,
    vmm_failures: AtomicU64,
    composed: AtomicU64,
    clarified: AtomicU64,
    reaped: AtomicU64,
}

struct Inner {
    cfg: Config,
    state_dir: PathBuf,
    store: Mutex<Store>,
    composer: Composer,
    capacity: Capacity,
    procs: Mutex<HashMap<String, Arc<Proc>>>,
    counters: Counters,
    jail: Jail,
    /// The stream server graphical environments are published on, once hostd runs one.
    stream: std::sync::OnceLock<Arc<crate::stream::StreamServer>>,
}

/// Whether and how VMMs are jailed, decided once from `[jail]` and the host.
#[derive(Debug, Clone)]
enum Jail {
    Off,
    On(JailSetup),
    /// `jailer = "always"` but the jail cannot be used: every boot fails with this.
    Unusable(String),
}

#[derive(Debug, Clone)]
struct JailSetup {
    binary: PathBuf,
    chroot_base: PathBuf,
    cgroup_version: Option<jailer::cgroup::Version>,
}

/// What was set up for one jailed environment (`envs/NAME/jail.json`).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct JailRecord {
    slot: u32,
    uid: u32,
    gid: u32,
    jail_dir: PathBuf,
    /// `jailer::net` id and index of the environment's network namespace, if any.
    net_id: Option<String>,
}

impl JailRecord {
    fn addressing(&self) -> Option<jailer::net::Addressing> {
        let id = self.net_id.as_deref()?;
        jailer::net::Addressing::new(id, self.slot).ok()
    }
}

/// Resolves `[jail]` against this host.
fn decide_jail(cfg: &Config, state_dir: &Path) -> Jail {
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
        (None, _) => Some("genos-jailer was not found (set jail.binary)".to_string()),
        (_, false) => Some("hostd does not run as root, which the jailer needs".to_string()),
        _ => None,
    };
    if let Some(problem) = problem {
        return match j.jailer {
            JailMode::Always => Jail::Unusable(format!("cannot jail genos-vmm: {problem}")),
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
fn exec_file(binary: &str) -> PathBuf {
    let p = PathBuf::from(binary);
    if p.components().count() > 1 {
        return p;
    }
    find_on_path(binary).unwrap_or(p)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The jailer's `--cgroup` settings for `spec`: memory = guest memory + the VMM overhead,
/// CPU quota = one CPU per vCPU, a task limit.
fn cgroup_settings(
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

/// Reads the jailer's exit status (docs/sandbox.md), with the last line it or the VMM wrote
/// on stderr where that says more.
pub fn describe_jailed_exit(status: Option<std::process::ExitStatus>, last_stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(code) = status.and_then(|s| s.code()) else {
        return match status.and_then(|s| s.signal()) {
            Some(sig) => format!("genos-jailer was killed by signal {sig}"),
            None => describe_exit(status),
        };
    };
    match code {
        159 => "genos-vmm was killed by its seccomp filter (a system call outside its allow-list)"
            .into(),
        71 => format!("the jail could not be set up: {last_stderr}"),
        c if c > 128 => format!("genos-vmm was killed by signal {}", c - 128),
        c @ (1 | 2) if !last_stderr.is_empty() => {
            format!(
                "{}: {last_stderr}",
                describe_exit(Some(std::process::ExitStatus::from_raw(c << 8)))
            )
        }
        c => describe_exit(Some(std::process::ExitStatus::from_raw(c << 8))),
    }
}

/// The last non-empty line of `path` (at most 500 bytes of it).
fn last_line(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    let line = String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    line.chars().take(500).collect()
}

/// Cheap to clone; every clone drives the same environments.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
}

/// Reads an exit status the way docs/vmm.md defines them.
pub fn describe_exit(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "genos-vmm disappeared".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(0), _) => "genos-vmm exited: the guest powered off".into(),
            (Some(1), _) => "genos-vmm exited with status 1 (internal VMM error)".into(),
            (Some(2), _) => {
                "genos-vmm exited with status 2 (bad arguments, configuration or files)".into()
            }
            (Some(3), _) => "genos-vmm exited with status 3 (the guest rebooted)".into(),
            (Some(4), _) => "genos-vmm exited with status 4 (triple fault)".into(),
            (Some(5), _) => "genos-vmm exited with status 5 (guest kernel panic)".into(),
            (Some(6), _) => "genos-vmm exited with status 6 (unhandled emulation failure)".into(),
            (Some(c), _) => format!("genos-vmm exited with status {c}"),
            (None, Some(sig)) => format!("genos-vmm was killed by signal {sig}"),
            (None, None) => "genos-vmm ended".into(),
        },
    }
}

impl Orchestrator {
    /// Opens the store under `state_dir`. Call [`Orchestrator::start`] inside a tokio
    /// runtime to re-adopt VMMs and run the reaper.
    pub fn new(cfg: Config, state_dir: &Path) -> Result<Orchestrator, OrchError> {
        let catalog = cfg
            .load_catalog()
            .map_err(|e| OrchError::Config(e.to_string()))?;
        cfg.check_images(&catalog)
            .map_err(|e| OrchError::Config(e.to_string()))?;
        let store = Store::open(state_dir)?;
        let composer = Composer::new(catalog, cfg.composer.clone());
        let capacity = Capacity::from_config(&cfg);
        let jail = decide_jail(&cfg, state_dir);
        let envs = state_dir.join("envs");
        if envs.exists() {
            // Made 0700 by every version since; fix directories left readable earlier.
            create_private_dir(&envs).map_err(|e| {
                OrchError::Config(format!("cannot restrict {}: {e}", envs.display()))
            })?;
        }
        Ok(Orchestrator {
            inner: Arc::new(Inner {
                cfg,
                state_dir: state_dir.into(),
                store: Mutex::new(store),
                composer,
                capacity,
                procs: Mutex::new(HashMap::new()),
                counters: Counters::default(),
                jail,
                stream: std::sync::OnceLock::new(),
            }),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock leaves SQLite consistent (every write is its own
        // statement or transaction), so a poisoned lock is still usable.
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn capacity(&self) -> Capacity {
        self.inner.capacity
    }

    pub fn catalog(&self) -> &Catalog {
        self.inner.composer.catalog()
    }

    /// Re-adopts running VMMs, resumes interrupted builds, and starts the reaper.
    pub async fn start(&self) -> Result<(), OrchError> {
        let envs = self.store().envs(false)?;
        for env in envs {
            match env.state {
                EnvState::Requested | EnvState::Building => {
                    self.audit(
                        "hostd",
                        "resume",
                        &env.name,
                        "build interrupted by a restart",
                    )?;
                    self.spawn_provision(env.name.clone());
                }
                EnvState::Booting | EnvState::Ready => self.readopt(&env).await?,
                // A VMM that ended while hostd was down (or as it went down) may have left
                // its network namespace and slot behind.
                _ => self.release_jail(&env.name),
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            let every = Duration::from_secs(me.inner.cfg.reaper.interval_s.max(1));
            loop {
                tokio::time::sleep(every).await;
                if let Err(e) = me.reap_once().await {
                    tracing::warn!("reaper: {e}");
                }
            }
        });
        Ok(())
    }

    /// Re-adopts `env`'s VMM when it is provably the one hostd started: the recorded
    /// process identity (pid, start time, boot) opens a pidfd, its control socket is served
    /// by the expected uid from that very pid, and it reports running or paused. Anything
    /// else fails the environment without signalling anyone.
    async fn readopt(&self, env: &EnvRecord) -> Result<(), OrchError> {
        let (pidfd, socket) = match self.identify_vmm(env).await {
            Ok(found) => found,
            Err(why) => {
                self.release_jail(&env.name);
                let reason = "its genos-vmm was gone when hostd restarted";
                tracing::warn!(env = env.name, why, "not re-adopted");
                self.transition(&env.name, EnvState::Failed, Some(reason))?;
                self.audit("hostd", "fail", &env.name, &format!("{reason} ({why})"))?;
                let _ = self.store().set_vmm(&env.name, None, None);
                return Ok(());
            }
        };
        let pid = pidfd.pid();
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            vmm: OnceLock::from(pidfd.clone()),
            jailer: None,
            socket: socket.clone(),
            stopping: false.into(),
            exited: rx,
        });
        self.inner
            .procs
            .lock()
            .expect("procs lock")
            .insert(env.name.clone(), proc);
        self.audit(
            "hostd",
            "adopt",
            &env.name,
            &format!("re-adopted genos-vmm pid {pid}"),
        )?;
        let me = self.clone();
        let name = env.name.clone();
        tokio::spawn(async move {
            // Not our child: its pidfd polls readable when it ends.
            if let Err(e) = pidfd.exited().await {
                tracing::warn!(env = name, error = %e, "cannot wait on the adopted VMM");
            }
            me.on_vmm_exit(&name, describe_exit(None));
            let _ = tx.send(true);
        });
        if env.state == EnvState::Booting {
            let me = self.clone();
            let name = env.name.clone();
            tokio::spawn(async move { me.wait_ready(&name, &socket).await });
        } else if env.state == EnvState::Ready {
            self.stream_environment(&env.name, &socket).await;
        }
        Ok(())
    }

    /// The pidfd and control socket of `env`'s recorded VMM, or why it cannot be adopted.
    async fn identify_vmm(&self, env: &EnvRecord) -> Result<(Pidfd, VmmSocket), String> {
        let dir = self.env_dir(&env.name);
        let record = read_vmm_record(&dir).ok_or("no readable vmm.json")?;
        let pid = record.process.pid;
        if env.vmm_pid != Some(pid) {
            return Err(format!(
                "vmm.json names pid {pid}, the store {:?}",
                env.vmm_pid
            ));
        }
        let pidfd = record.process.open().map_err(|e| e.to_string())?;
        let socket = match read_jail_record(&dir) {
            Some(jail) if jail.uid == record.uid => jailed_socket(&jail),
            Some(jail) => {
                return Err(format!(
                    "vmm.json names uid {}, jail.json uid {}",
                    record.uid, jail.uid
                ))
            }
            None => unjailed_socket(&dir, record.uid),
        };
        let (peer, vm) = vmm_client::run(&socket, Duration::from_secs(3), |c| {
            let peer = c.peer();
            Ok((peer, c.describe()?))
        })
        .await
        .map_err(|e| error_chain(&e))?;
        if peer.pid != pid {
            return Err(format!(
                "its control socket is served by pid {}, not {pid}",
                peer.pid
            ));
        }
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(format!("GET /vm says the VM is {}", vm.state));
        }
        Ok((pidfd, socket))
    }

    // ---- requests ------------------------------------------------------------------------

    pub fn compose(&self, text: &str) -> Composition {
        let c = self.inner.composer.compose(text);
        self.inner.counters.composed.fetch_add(1, Ordering::Relaxed);
        if matches!(c.outcome, Outcome::Clarify(_)) {
            self.inner
                .counters
                .clarified
                .fetch_add(1, Ordering::Relaxed);
        }
        c
    }

    /// Composes with the LLM backend when it is enabled, falling back to the rules when it
    /// fails or proposes anything invalid; with the rules alone otherwise.
    pub async fn compose_text(&self, text: &str) -> Composition {
        let llm = &self.inner.cfg.llm;
        if !llm.enabled {
            return self.compose(text);
        }
        match crate::llm::propose(llm, self.catalog(), text).await {
            Ok(p) => {
                self.inner.counters.composed.fetch_add(1, Ordering::Relaxed);
                let explain = vec![format!(
                    "proposed by the LLM backend ({}), validated against the schema and catalog",
                    llm.model
                )];
                let outcome = match p {
                    crate::llm::Proposal::Spec(s) => Outcome::Spec(s),
                    crate::llm::Proposal::Clarify(q) => {
                        self.inner
                            .counters
                            .clarified
                            .fetch_add(1, Ordering::Relaxed);
                        Outcome::Clarify(q)
                    }
                };
                Composition { outcome, explain }
            }
            Err(e) => {
                let mut c = self.compose(text);
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg.push_str(": ");
                    msg.push_str(&s.to_string());
                    src = s.source();
                }
                c.explain.insert(
                    0,
                    format!("LLM backend not used ({msg}); composed by the rules"),
                );
                c
            }
        }
    }

    pub async fn create_from_text(
        &self,
        text: &str,
        actor: &str,
    ) -> Result<CreateOutcome, OrchError> {
        match self.compose_text(text).await.outcome {
            Outcome::Spec(spec) => {
                self.audit(actor, "compose", &spec.name, &audit_text(text))?;
                Ok(CreateOutcome::Created(Box::new(self.create(*spec, actor)?)))
            }
            Outcome::Clarify(q) => Ok(CreateOutcome::Clarify(q)),
        }
    }

    /// Validates, admits and stores `spec`, then builds and boots it in the background.
    pub fn create(&self, mut spec: Spec, actor: &str) -> Result<EnvRecord, OrchError> {
        spec.validate()?;
        self.catalog().check_spec(&spec)?;
        let record = {
            let mut store = self.store();
            // Names are unique among environments not destroyed: "firefox", "firefox-2", ...
            let base = spec.name.clone();
            let mut n = 1;
            while store.name_taken(&spec.name)? {
                n += 1;
                let suffix = format!("-{n}");
                spec.name = format!("{}{suffix}", &base[..base.len().min(63 - suffix.len())]);
            }
            let live: Vec<EnvRecord> = store
                .envs(false)?
                .into_iter()
                .filter(|e| e.state.is_live())
                .collect();
            let used_cpu: u64 = live.iter().map(|e| u64::from(e.spec.vcpus)).sum();
            let used_mib: u64 = live.iter().map(|e| u64::from(e.spec.memory_mib)).sum();
            if let Err(why) = self.inner.capacity.admit(used_cpu, used_mib, &spec) {
                drop(store);
                self.inner.counters.refused.fetch_add(1, Ordering::Relaxed);
                self.audit(actor, "refuse", &spec.name, &why)?;
                return Err(OrchError::Admission(why));
            }
            store.insert_env(&spec)?
        };
        self.inner.counters.created.fetch_add(1, Ordering::Relaxed);
        self.audit(
            actor,
            "create",
            &record.name,
            &serde_json::to_string(&record.spec).expect("spec json"),
        )?;
        self.spawn_provision(record.name.clone());
        Ok(record)
    }

    pub fn list(&self) -> Result<Vec<EnvRecord>, OrchError> {
        Ok(self.store().envs(false)?)
    }

    pub fn show(&self, name: &str) -> Result<EnvRecord, OrchError> {
        self.store()
            .env(name)?
            .ok_or_else(|| OrchError::NotFound(name.into()))
    }

    /// Stops the VMM (the environment keeps its record, and its disk when persistent).
    pub async fn stop(&self, name: &str, actor: &str) -> Result<EnvRecord, OrchError> {
        let env = self.show(name)?;
        if !env.state.can_become(EnvState::Stopped) {
            return Err(OrchError::WrongState {
                name: name.into(),
                action: "stop",
                state: env.state.as_str(),
            });
        }
        self.audit(actor, "stop", name, "")?;
        self.halt_vmm(&env).await;
        self.release_jail(name);
        self.transition(name, EnvState::Stopped, None)?;
        self.store().set_vmm(name, None, None)?;
        if env.spec.persistence == proto::spec::Persistence::Ephemeral {
            // Ephemeral files end with the VM; a persistent disk stays until destroy.
            let _ = std::fs::remove_file(self.env_dir(name).join("rootfs.ext4"));
        }
        self.show(name)
    }

    /// Stops the VMM if running, removes the environment's files, marks it destroyed.
    pub async fn destroy(&self, name: &str, actor: &str) -> Result<EnvRecord, OrchError> {
        let env = self.show(name)?;
        if env.state == EnvState::Destroyed {
            return Err(OrchError::WrongState {
                name: name.into(),
                action: "destroy",
                state: "destroyed",
            });
        }
        self.audit(actor, "destroy", name, "")?;
        if env.state.is_live() {
            self.halt_vmm(&env).await;
            self.transition(name, EnvState::Stopped, Some("destroying"))?;
        }
        self.release_jail(name);
        let _ = std::fs::remove_dir_all(self.env_dir(name));
        self.transition(name, EnvState::Destroyed, None)?;
        self.store().set_vmm(name, None, None)?;
        // Every token of this environment is revoked: a destroyed environment's id counts as
        // revoked in the store (`destroyed_env_ids`), and open sessions end now.
        if let Some(server) = self.inner.stream.get() {
            server.revoke_environment(env.id as u64);
        }
        self.show(name)
    }

    /// Mints a viewer token for a ready environment (token format: `hostd::stream`).
    pub fn mint_token(
        &self,
        name: &str,
        actor: &str,
        ttl_s: u64,
        rights: &str,
    ) -> Result<serde_json::Value, OrchError> {
        let env = self.show(name)?;
        if env.state != EnvState::Ready {
            return Err(OrchError::WrongState {
                name: name.into(),
                action: "mint a token for",
                state: env.state.as_str(),
            });
        }
        let rights: proto::stream::Rights = rights.parse().map_err(OrchError::Token)?;
        let dir = self.inner.state_dir.join("stream");
        std::fs::create_dir_all(&dir).map_err(|e| OrchError::Token(e.to_string()))?;
        let key = crate::stream::TokenKey::load_or_create(&dir.join("token.key"))
            .map_err(|e| OrchError::Token(e.to_string()))?;
        // Signed over the environment's unique id: a later environment of the same name is
        // not opened by this token.
        let env_ref = crate::stream::EnvRef::new(name, env.id as u64);
        let token = key
            .issue(&env_ref, rights, Duration::from_secs(ttl_s))
            .map_err(|e| OrchError::Token(e.to_string()))?;
        let token_id = key
            .decode(&token)
            .map_err(|e| OrchError::Token(e.to_string()))?
            .id;
        let fingerprint = crate::stream::Identity::load_or_create(&dir)
            .map(|i| i.fingerprint)
            .ok();
        self.store().touch(name)?;
        self.audit(
            actor,
            "token",
            name,
            &format!("rights={rights:?} ttl_s={ttl_s} token_id={token_id}"),
        )?;
        let url = self
            .inner
            .stream
            .get()
            .and_then(|s| s.connect_url(name, &token).ok());
        Ok(serde_json::json!({
            "env": name, "token": token, "token_id": token_id.to_string(),
            "expires_at": now_s() + ttl_s as i64, "cert_sha256": fingerprint, "url": url,
        }))
    }

    /// Revokes a viewer token, given whole or by its id (16 hex digits, as minting printed
    /// it): recorded in the store and pushed to the stream server, which ends sessions using
    /// it at once. A token given whole must be one this host signed.
    pub fn revoke_token(&self, token: &str, actor: &str) -> Result<serde_json::Value, OrchError> {
        use crate::stream::token::{TokenId, MAX_TTL};
        let key = crate::stream::TokenKey::load_or_create(
            &self.inner.state_dir.join("stream").join("token.key"),
        )
        .map_err(|e| OrchError::Token(e.to_string()))?;
        let token = token.trim();
        let (id, env_id, expires_at) = match token.parse::<TokenId>() {
            // Only the id: the token cannot outlive the longest lifetime minting allows.
            Ok(id) => (id, None, now_s() + MAX_TTL.as_secs() as i64),
            Err(_) => {
                let claims = key.decode(token).map_err(OrchError::Revoke)?;
                (
                    claims.id,
                    Some(claims.env.uid as i64),
                    i64::try_from(claims.expires_unix).unwrap_or(i64::MAX),
                )
            }
        };
        let id_hex = id.to_string();
        let newly = self
            .store()
            .revoke_token(&id_hex, env_id, expires_at, actor)?;
        self.audit(
            actor,
            "revoke-token",
            &id_hex,
            &format!("expires_at={expires_at}"),
        )?;
        if let Some(server) = self.inner.stream.get() {
            server.revoke_token(id, expires_at.max(0) as u64);
        }
        Ok(serde_json::json!({
            "token_id": id_hex, "revoked": true, "already_revoked": !newly, "expires_at": expires_at,
        }))
    }

    /// The store's revocation list, as the stream server checks it.
    fn revocations(&self) -> Result<crate::stream::Revocations, OrchError> {
        let mut list = crate::stream::Revocations::default();
        let mut store = self.store();
        for r in store.token_revocations(now_s())? {
            match r.token_id.parse() {
                Ok(id) => list.revoke_token(id, r.expires_at.max(0) as u64),
                Err(e) => {
                    tracing::warn!(token_id = %r.token_id, error = %e, "unreadable revocation")
                }
            }
        }
        for id in store.destroyed_env_ids()? {
            list.revoke_environment(id as u64);
        }
        Ok(list)
    }

    pub fn verify_audit(&self) -> Result<AuditReport, OrchError> {
        Ok(self.store().verify_audit()?)
    }

    pub fn audit_entries(&self, limit: i64) -> Result<Vec<crate::store::AuditEntry>, OrchError> {
        Ok(self.store().audit_entries(Some(limit))?)
    }

    /// Records an operator or client action in the audit chain.
    pub fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Result<(), OrchError> {
        self.store().audit(actor, action, target, detail)?;
        Ok(())
    }

    /// Prometheus text exposition.
    pub fn metrics_text(&self) -> Result<String, OrchError> {
        let envs = self.store().envs(true)?;
        let mut out = String::new();
        out.push_str("# HELP genos_environments Environments by lifecycle state.\n# TYPE genos_environments gauge\n");
        for st in EnvState::ALL {
            let n = envs.iter().filter(|e| e.state == st).count();
            out.push_str(&format!(
                "genos_environments{{state=\"{}\"}} {n}\n",
                st.as_str()
            ));
        }
        let live: Vec<&EnvRecord> = envs.iter().filter(|e| e.state.is_live()).collect();
        let c = &self.inner.counters;
        let cap = self.inner.capacity;
        let lines: [(&str, &str, &str, f64); 10] = [
            (
                "genos_vcpus_allocated",
                "gauge",
                "vCPUs promised to live environments.",
                live.iter().map(|e| f64::from(e.spec.vcpus)).sum(),
            ),
            (
                "genos_memory_allocated_mib",
                "gauge",
                "Memory promised to live environments.",
                live.iter().map(|e| f64::from(e.spec.memory_mib)).sum(),
            ),
            (
                "genos_capacity_vcpus",
                "gauge",
                "Host vCPUs before overcommit.",
                f64::from(cap.vcpus),
            ),
            (
                "genos_capacity_memory_mib",
                "gauge",
                "Host memory for environments before overcommit.",
                cap.memory_mib as f64,
            ),
            (
                "genos_environments_created_total",
                "counter",
                "Environments admitted.",
                c.created.load(Ordering::Relaxed) as f64,
            ),
            (
                "genos_admission_refusals_total",
                "counter",
                "Requests refused by admission control.",
                c.refused.load(Ordering::Relaxed) as f64,
            ),
            (
                "genos_vmm_failures_total",
                "counter",
                "VMMs that ended without being asked to.",
                c.vmm_failures.load(Ordering::Relaxed) as f64,
            ),
            (
                "genos_compose_requests_total",
                "counter",
                "Requests composed.",
                c.composed.load(Ordering::Relaxed) as f64,
            ),
            (
                "genos_compose_clarifications_total",
                "counter",
                "Composed requests answered with a question.",
                c.clarified.load(Ordering::Relaxed) as f64,
            ),
            (
                "genos_reaped_total",
                "counter",
                "Environments stopped or destroyed by TTL/idle reaping.",
                c.reaped.load(Ordering::Relaxed) as f64,
            ),
        ];
        for (name, kind, help, v) in lines {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
            ));
        }
        Ok(out)
    }

    // ---- lifecycle -------------------------------------------------------------------------

    /// Publishes ready graphical environments on `server` from now on, with the store's
    /// revocation list.
    pub fn set_stream_server(
        &self,
        server: Arc<crate::stream::StreamServer>,
    ) -> Result<(), OrchError> {
        server.set_revocations(self.revocations()?);
        let _ = self.inner.stream.set(server);
        Ok(())
    }

    /// Puts a ready graphical environment's screen and input on the stream server. Called
    /// once per environment: the VMM serves a bounded number of framebuffer readers.
    async fn stream_environment(&self, name: &str, sock: &VmmSocket) {
        let Some(server) = self.inner.stream.get().cloned() else {
            return;
        };
        let Some(env_ref) = self
            .show(name)
            .ok()
            .filter(|e| self.graphical(&e.spec))
            .map(|e| crate::stream::EnvRef::new(name, e.id as u64))
        else {
            return;
        };
        let sock = sock.clone();
        let fps = self.inner.cfg.stream.fps;
        match tokio::task::spawn_blocking(move || crate::vm_source::environment(&sock)).await {
            Ok(Ok(source)) => {
                if let Err(e) = server.add_environment(&env_ref, source, fps) {
                    tracing::warn!(env = name, error = %e, "cannot stream environment");
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(env = name, error = %e, "cannot read the VM's framebuffer")
            }
            Err(e) => tracing::warn!(env = name, error = %e, "framebuffer task failed"),
        }
    }

    fn transition(
        &self,
        name: &str,
        next: EnvState,
        reason: Option<&str>,
    ) -> Result<bool, OrchError> {
        let mut store = self.store();
        let Some(env) = store.env(name)? else {
            return Err(OrchError::NotFound(name.into()));
        };
        if env.state == next || !env.state.can_become(next) {
            return Ok(false);
        }
        store.set_state(name, next, reason)?;
        drop(store);
        if env.state == EnvState::Ready {
            if let Some(server) = self.inner.stream.get() {
                server.remove_environment(name);
            }
        }
        tracing::info!(
            env = name,
            from = env.state.as_str(),
            to = next.as_str(),
            reason,
            "transition"
        );
        Ok(true)
    }

    fn fail(&self, name: &str, reason: &str) {
        if let Ok(true) = self.transition(name, EnvState::Failed, Some(reason)) {
            let _ = self.audit("hostd", "fail", name, reason);
        }
    }

    fn env_dir(&self, name: &str) -> PathBuf {
        self.inner.state_dir.join("envs").join(name)
    }

    fn spawn_provision(&self, name: String) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(reason) = me.provision(&name).await {
                me.fail(&name, &reason);
            }
        });
    }

    async fn provision(&self, name: &str) -> Result<(), String> {
        let env = self.show(name).map_err(|e| e.to_string())?;
        self.transition(name, EnvState::Building, None)
            .map_err(|e| e.to_string())?;
        let dir = self.env_dir(name);
        create_private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let images = self.build_images(&env.spec, &dir).await?;
        if !matches!(self.show(name).map(|e| e.state), Ok(EnvState::Building)) {
            return Ok(()); // stopped or destroyed meanwhile
        }
        self.transition(name, EnvState::Booting, None)
            .map_err(|e| e.to_string())?;
        let sock = self.boot(name, &env.spec, &dir, &images).await?;
        self.wait_ready(name, &sock).await;
        Ok(())
    }

    async fn build_images(&self, spec: &Spec, dir: &Path) -> Result<Images, String> {
        let cfg = &self.inner.cfg.images;
        let kernel = if cfg.kernel.is_empty() {
            run_image_builder(&cfg.builder, &["kernel"]).await?
        } else {
            PathBuf::from(&cfg.kernel)
        };
        let initramfs = if !cfg.initramfs.is_empty() {
            Some(PathBuf::from(&cfg.initramfs))
        } else if cfg.kernel.is_empty() {
            Some(run_image_builder(&cfg.builder, &["initramfs"]).await?)
        } else {
            None
        };
        let rootfs = if cfg.build_rootfs {
            let spec_path = dir.join("spec.json");
            std::fs::write(
                &spec_path,
                serde_json::to_vec_pretty(spec).expect("spec json"),
            )
            .map_err(|e| format!("cannot write {}: {e}", spec_path.display()))?;
            let out = dir.join("rootfs.ext4");
            let (s, o) = (spec_path.display().to_string(), out.display().to_string());
            let args = self.inner.cfg.rootfs_args(&spec.base, &s, &o);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_image_builder(&cfg.builder, &args).await?;
            Some(out)
        } else {
            None
        };
        Ok(Images {
            kernel,
            initramfs,
            rootfs,
        })
    }

    async fn boot(
        &self,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, String> {
        match &self.inner.jail {
            Jail::Off => self.boot_direct(name, spec, dir, images).await,
            Jail::On(setup) => {
                let setup = setup.clone();
                let r = self.boot_jailed(&setup, name, spec, dir, images).await;
                if r.is_err()
                    && !self
                        .inner
                        .procs
                        .lock()
                        .expect("procs lock")
                        .contains_key(name)
                {
                    // Nothing supervises the jail (it never started): release it here.
                    self.release_jail(name);
                }
                r
            }
            Jail::Unusable(why) => Err(why.clone()),
        }
    }

    /// Spawns `cmd` in its own process group (so a signal to hostd's group, e.g. Ctrl-C, does
    /// not reach the VMM, which must outlive a hostd restart) and supervises it: its exit is
    /// described by `describe` and fails the environment unless hostd asked for it.
    ///
    /// The child's pidfd is opened before anything waits for it, so it cannot have been
    /// reaped and its pid reused: it is the process just spawned.
    fn spawn_supervised(
        &self,
        name: &str,
        mut cmd: std::process::Command,
        socket: VmmSocket,
        jailed: bool,
        describe: impl FnOnce(Option<std::process::ExitStatus>) -> String + Send + 'static,
    ) -> Result<Arc<Proc>, String> {
        use std::os::unix::process::CommandExt as _;
        cmd.stdin(std::process::Stdio::null()).process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {program}: {e}"))?;
        let pidfd = child
            .id()
            .ok_or_else(|| "the child has no pid".to_string())
            .and_then(|pid| Pidfd::open(pid as i32).map_err(|e| error_chain(&e)));
        let pidfd = match pidfd {
            Ok(p) => p,
            Err(e) => {
                let _ = child.start_kill();
                return Err(format!("cannot hold {program}: {e}"));
            }
        };
        let (tx, rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            vmm: if jailed {
                OnceLock::new()
            } else {
                OnceLock::from(Arc::new(Pidfd::open(pidfd.pid()).map_err(|e| {
                    let _ = child.start_kill();
                    error_chain(&e)
                })?))
            },
            jailer: jailed.then_some(pidfd),
            socket,
            stopping: false.into(),
            exited: rx,
        });
        self.inner
            .procs
            .lock()
            .expect("procs lock")
            .insert(name.into(), proc.clone());
        let me = self.clone();
        let n = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let reason = describe(status);
            // Record the failure before anyone waiting on `exited` looks at the state.
            me.on_vmm_exit(&n, reason);
            let _ = tx.send(true);
        });
        Ok(proc)
    }

    fn log_file(dir: &Path, n: &str) -> Result<std::fs::File, String> {
        std::fs::File::create(dir.join(n))
            .map_err(|e| format!("cannot create {}: {e}", dir.join(n).display()))
    }

    /// Waits for the control socket to answer `GET /vm`, or the VMM to end.
    async fn wait_api(&self, name: &str, proc: &Proc) -> Result<(), String> {
        let timeout = self.inner.cfg.vmm.api_timeout_s;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let r = vmm_client::run(&proc.socket, Duration::from_secs(1), |c| c.describe()).await;
            if r.is_ok() {
                return Ok(());
            }
            if *proc.exited.borrow() {
                // The supervisor has failed the environment with the exit's meaning.
                let reason = self.show(name).ok().and_then(|e| e.reason);
                return Err(reason.unwrap_or_else(|| "genos-vmm ended during start-up".into()));
            }
            if tokio::time::Instant::now() > deadline {
                self.kill_vmm(name);
                return Err(format!(
                    "genos-vmm's control socket did not answer within {timeout} s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn graphical(&self, spec: &Spec) -> bool {
        self.catalog()
            .desktops
            .get(&spec.desktop)
            .is_some_and(|d| d.graphical)
    }

    /// Unjailed: genos-vmm with only its API socket, configured and started over it.
    async fn boot_direct(
        &self,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, String> {
        let vmm = &self.inner.cfg.vmm;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let socket = unjailed_socket(dir, unsafe { libc::geteuid() });
        let mut cmd = std::process::Command::new(&vmm.binary);
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(&vmm.extra_args)
            .stdout(Self::log_file(dir, "vmm.stdout")?)
            .stderr(Self::log_file(dir, "vmm.log")?);
        let proc = self.spawn_supervised(name, cmd, socket.clone(), false, describe_exit)?;
        let vmm_fd = proc
            .vmm
            .get()
            .expect("unjailed: the child is the VMM")
            .clone();
        let pid = self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))
            .map_err(|e| e.to_string())?;
        self.audit("hostd", "spawn", name, &format!("genos-vmm pid {pid}"))
            .map_err(|e| e.to_string())?;
        self.wait_api(name, &proc).await?;

        let config = vm_config(&VmSettings {
            spec,
            images,
            cpu_template: &vmm.cpu_template,
            cmdline: vmm.cmdline.clone(),
            console: dir.join("console.log"),
            graphical: self.graphical(spec),
            tap: None,
        });
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                self.kill_vmm(name);
                return Err(e);
            }
        };
        let started = vmm_client::run(&socket, Duration::from_secs(10), move |c| {
            c.send(&Request::Configure(config))?;
            c.send(&Request::Action(LifecycleAction::Start))
        })
        .await;
        match started {
            Ok(()) => Ok(socket),
            Err(e) => {
                if matches!(e, VmmClientError::Answer(_)) {
                    self.kill_vmm(name);
                }
                Err(format!("genos-vmm: {}", error_chain(&e)))
            }
        }
    }

    /// Writes `envs/NAME/vmm.json` for the VMM behind `pidfd`; returns its pid.
    fn record_vmm(&self, name: &str, proc: &Proc, pidfd: &Pidfd) -> Result<i32, String> {
        let process = ProcessId::of(pidfd).map_err(|e| error_chain(&e))?;
        let pid = process.pid;
        let record = VmmRecord {
            process,
            uid: proc.socket.uid,
        };
        let path = self.env_dir(name).join(VMM_RECORD);
        std::fs::write(&path, serde_json::to_vec(&record).expect("vmm record json"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(pid)
    }

    /// Picks a slot no other jailed environment holds, records it in `jail.json` and, for
    /// `policy`, builds the environment's network namespace. Blocking (runs `ip`/`nft`).
    ///
    /// Network namespace names and addresses are host-wide, so a slot whose namespace or
    /// uplink veth exists (another hostd, a leftover) is skipped too, and the choice and the
    /// build happen under one process-wide lock: `net::apply` undoes a failed build by
    /// deleting the namespace, which must never be someone else's.
    fn allocate_jail(
        state_dir: &Path,
        name: &str,
        cfg: &crate::config::JailConfig,
        setup: &JailSetup,
        net: Option<(jailer::net::Policy, Vec<jailer::net::Cidr>)>,
    ) -> Result<(JailRecord, Option<jailer::net::Addressing>), String> {
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
            .ok_or_else(|| format!("all {} jail slots are in use", cfg.slots))?;
        let mut record = JailRecord {
            slot,
            uid: cfg.uid_base + slot,
            gid: cfg.gid_base + slot,
            jail_dir: setup.chroot_base.join("genos-vmm").join(name),
            net_id: None,
        };
        let env_dir = state_dir.join("envs").join(name);
        let Some((policy, allowed)) = net else {
            write_jail_record(&env_dir, &record)?;
            return Ok((record, None));
        };
        let id = format!("e{slot}");
        let addr = jailer::net::Addressing::new(&id, slot).map_err(|e| format!("network: {e}"))?;
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
        .map_err(|e| format!("cannot build the network namespace: {e}"))?;
        record.net_id = Some(id);
        write_jail_record(&env_dir, &record)?;
        Ok((record, Some(addr)))
    }

    /// Jailed: `genos-jailer ... -- genos-vmm` with the VM's configuration rendered as flags
    /// ([`VmConfig::to_cli_args`]: host paths the jailer rewrites; it takes no `--config`),
    /// so the VM boots at once; hostd only waits for the API.
    async fn boot_jailed(
        &self,
        setup: &JailSetup,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, String> {
        use proto::spec::NetworkMode;
        let cfg = &self.inner.cfg;
        let mut cmdline = cfg.vmm.cmdline.clone();

        // Network namespace first: the jailer joins it.
        let policy = match spec.network.mode {
            NetworkMode::None => None,
            NetworkMode::Nat => Some(jailer::net::Policy::Nat),
            NetworkMode::Allowlist => {
                Some(jailer::net::Policy::Allowlist(spec.network.allow.clone()))
            }
        };
        let (state_dir, env_name) = (self.inner.state_dir.clone(), name.to_string());
        let (jail_cfg, setup_c) = (cfg.jail.clone(), setup.clone());
        let allow = spec.network.allow.clone();
        let (record, addr) = tokio::task::spawn_blocking(move || {
            let net = match policy {
                None => None,
                Some(p @ jailer::net::Policy::Allowlist(_)) => {
                    let allowed =
                        jailer::net::resolve_allowlist(&allow, jailer::net::system_resolve)
                            .map_err(|e| format!("network allowlist: {e}"))?;
                    Some((p, allowed))
                }
                Some(p) => Some((p, vec![])),
            };
            Self::allocate_jail(&state_dir, &env_name, &jail_cfg, &setup_c, net)
        })
        .await
        .map_err(|e| format!("jail set-up task: {e}"))??;
        if let Some(addr) = &addr {
            cmdline.push(' ');
            cmdline.push_str(&addr.guest_kernel_ip_arg());
            self.audit(
                "hostd",
                "network",
                name,
                &format!(
                    "{:?} namespace {} guest {} gateway {}{}",
                    spec.network.mode,
                    addr.netns,
                    addr.guest,
                    addr.gateway,
                    if spec.network.allow.is_empty() {
                        String::new()
                    } else {
                        format!(" allow {}", spec.network.allow.join(","))
                    }
                ),
            )
            .map_err(|e| e.to_string())?;
        }

        // Files the VMM writes must be its uid's.
        let console = dir.join("console.log");
        std::fs::File::create(&console)
            .map_err(|e| format!("cannot create {}: {e}", console.display()))?;
        let mut owned = vec![console.clone()];
        owned.extend(images.rootfs.clone());
        for f in &owned {
            std::os::unix::fs::chown(f, Some(record.uid), Some(record.gid))
                .map_err(|e| format!("cannot give {} to uid {}: {e}", f.display(), record.uid))?;
        }

        let config = vm_config(&VmSettings {
            spec,
            images,
            cpu_template: &cfg.vmm.cpu_template,
            cmdline,
            console,
            graphical: self.graphical(spec),
            // The jail's network namespace holds the TAP device, owned by the VMM's uid.
            tap: record.addressing().map(|a| a.tap),
        })?;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(&setup.binary);
        cmd.arg("--id")
            .arg(name)
            .arg("--uid")
            .arg(record.uid.to_string())
            .arg("--gid")
            .arg(record.gid.to_string())
            .arg("--chroot-base")
            .arg(&setup.chroot_base)
            .arg("--exec-file")
            .arg(exec_file(&cfg.vmm.binary))
            .arg("--parent-cgroup")
            .arg(&cfg.jail.parent_cgroup);
        for c in cgroup_settings(
            setup.cgroup_version,
            spec,
            cfg.jail.vmm_overhead_mib,
            cfg.jail.pids_max,
        ) {
            cmd.arg("--cgroup").arg(c);
        }
        match setup.cgroup_version {
            Some(jailer::cgroup::Version::V1) => cmd.args(["--cgroup-version", "1"]),
            Some(jailer::cgroup::Version::V2) => cmd.args(["--cgroup-version", "2"]),
            None => &mut cmd,
        };
        if let Some(a) = record.addressing() {
            cmd.arg("--netns")
                .arg(Path::new("/var/run/netns").join(&a.netns));
        }
        cmd.arg("--")
            .arg("--api-sock")
            .arg(&sock)
            .args(config.to_cli_args())
            .args(&cfg.vmm.extra_args)
            .stdout(Self::log_file(dir, "vmm.stdout")?)
            .stderr(Self::log_file(dir, "vmm.log")?);
        let log = dir.join("vmm.log");
        let proc =
            self.spawn_supervised(name, cmd, jailed_socket(&record), true, move |status| {
                describe_jailed_exit(status, &last_line(&log))
            })?;

        // The VMM's own pid comes from the jail's pid file.
        let pid_file = record.jail_dir.join("genos-vmm.pid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.vmm.api_timeout_s);
        let pid = loop {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                break pid;
            }
            if *proc.exited.borrow() {
                let reason = self.show(name).ok().and_then(|e| e.reason);
                return Err(reason.unwrap_or_else(|| "genos-jailer ended during start-up".into()));
            }
            if tokio::time::Instant::now() > deadline {
                self.kill_vmm(name);
                return Err(format!(
                    "genos-jailer wrote no pid file ({}) within {} s",
                    pid_file.display(),
                    cfg.vmm.api_timeout_s
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let jailer_pid = proc.jailer.as_ref().map_or(0, Pidfd::pid);
        let vmm_fd = match jailed_vmm_pidfd(pid, jailer_pid) {
            Ok(fd) => Arc::new(fd),
            Err(why) => {
                self.kill_vmm(name);
                return Err(format!("{}: {why}", pid_file.display()));
            }
        };
        let _ = proc.vmm.set(vmm_fd.clone());
        self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))
            .map_err(|e| e.to_string())?;
        self.audit(
            "hostd",
            "spawn",
            name,
            &format!(
                "genos-vmm pid {pid} jailed by genos-jailer pid {jailer_pid} as uid {} gid {} in {}",
                record.uid,
                record.gid,
                record.jail_dir.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        self.wait_api(name, &proc).await?;
        Ok(proc.socket.clone())
    }

    /// Tears down what `boot_jailed` set up outside the jail (the network namespace) and
    /// frees the slot. The jailer itself removes its directory and cgroup.
    fn release_jail(&self, name: &str) {
        let dir = self.env_dir(name);
        let Some(record) = read_jail_record(&dir) else {
            return;
        };
        if let Some(a) = record.addressing() {
            jailer::net::teardown(&a, &jailer::net::Uplink::Host);
            let _ = self.audit("hostd", "network", name, &format!("removed {}", a.netns));
        }
        let _ = std::fs::remove_file(dir.join(JAIL_RECORD));
    }

    /// Polls the VMM until the guest signals the boot timer (→ ready) or the boot timeout.
    async fn wait_ready(&self, name: &str, sock: &VmmSocket) {
        let timeout = Duration::from_secs(self.inner.cfg.vmm.boot_timeout_s);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.show(name).map(|e| e.state) {
                Ok(EnvState::Booting) => {}
                // Failed, stopped or destroyed meanwhile. A stop that raced with the spawn
                // may have found no VMM to halt: make sure none is left running.
                _ => {
                    self.kill_vmm(name);
                    return;
                }
            }
            let described = vmm_client::run(sock, Duration::from_secs(2), |c| c.describe()).await;
            if let Ok(vm) = described {
                if let Some(boot_us) = vm.boot_time_us {
                    if let Ok(true) = self.transition(name, EnvState::Ready, None) {
                        self.stream_environment(name, sock).await;
                        let _ = self.store().touch(name);
                        let _ = self.audit(
                            "hostd",
                            "ready",
                            name,
                            &format!("guest booted in {} ms", boot_us / 1000),
                        );
                    }
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                self.fail(
                    name,
                    &format!(
                        "the guest did not finish booting within {} s",
                        timeout.as_secs()
                    ),
                );
                self.kill_vmm(name);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn on_vmm_exit(&self, name: &str, reason: String) {
        let proc = self.inner.procs.lock().expect("procs lock").remove(name);
        self.release_jail(name);
        let _ = std::fs::remove_file(self.env_dir(name).join(VMM_RECORD));
        let asked = proc
            .as_ref()
            .is_some_and(|p| p.stopping.load(Ordering::SeqCst));
        if asked {
            return;
        }
        let live = self.show(name).map(|e| e.state.is_live()).unwrap_or(false);
        if live {
            self.inner
                .counters
                .vmm_failures
                .fetch_add(1, Ordering::Relaxed);
            self.fail(name, &reason);
            let _ = self.store().set_vmm(name, None, None);
        }
    }

    fn kill_vmm(&self, name: &str) {
        if let Some(p) = self.inner.procs.lock().expect("procs lock").get(name) {
            p.stopping.store(true, Ordering::SeqCst);
            p.kill();
        }
    }

    /// Asks the VMM to stop over its socket; kills it if it has not exited in 5 s.
    async fn halt_vmm(&self, env: &EnvRecord) {
        let proc = self
            .inner
            .procs
            .lock()
            .expect("procs lock")
            .get(&env.name)
            .cloned();
        let Some(proc) = proc else { return };
        proc.stopping.store(true, Ordering::SeqCst);
        let stop = Request::Action(LifecycleAction::Stop);
        let _ = vmm_client::run(&proc.socket, Duration::from_secs(2), move |c| c.send(&stop)).await;
        let mut exited = proc.exited.clone();
        let waited = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !waited {
            proc.kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
        }
    }

    /// One pass of TTL (destroy) and idle (stop) reaping.
    pub async fn reap_once(&self) -> Result<(), OrchError> {
        self.reap_at(now_s()).await
    }

    /// Reaping as if the time were `now` (unix seconds).
    pub async fn reap_at(&self, now: i64) -> Result<(), OrchError> {
        for env in self.list()? {
            if !env.state.is_live() && env.state != EnvState::Stopped {
                continue;
            }
            if let Some(ttl) = env.spec.lifetime.ttl_s {
                if now >= env.created_at + ttl as i64 {
                    self.inner.counters.reaped.fetch_add(1, Ordering::Relaxed);
                    self.destroy(&env.name, "reaper:ttl").await?;
                    continue;
                }
            }
            if let Some(idle) = env.spec.lifetime.idle_s {
                if env.state == EnvState::Ready && now >= env.last_active_at + idle as i64 {
                    self.inner.counters.reaped.fetch_add(1, Ordering::Relaxed);
                    self.stop(&env.name, "reaper:idle").await?;
                }
            }
        }
        Ok(())
    }

    /// Marks viewer activity (resets the idle clock).
    pub fn touch(&self, name: &str) -> Result<(), OrchError> {
        Ok(self.store().touch(name)?)
    }

    /// Pid of the supervised VMM (tests, `show`).
    pub fn vmm_pid(&self, name: &str) -> Option<i32> {
        self.inner
            .procs
            .lock()
            .expect("procs lock")
            .get(name)
            .and_then(|p| p.vmm.get().map(|v| v.pid()))
    }
}

impl Proc {
    /// SIGKILLs the VMM through its pidfd; the jailer then exits with 137. Before the VMM
    /// is known the jailer itself is killed (it has not started the VM yet). A process that
    /// is already gone is not signalled (ESRCH), whoever has its pid now.
    fn kill(&self) {
        let target = self.vmm.get().map(|v| &**v).or(self.jailer.as_ref());
        if let Some(p) = target {
            let _ = p.signal(libc::SIGKILL);
        }
    }
}

/// A pidfd for the VMM pid `pid` named by the jail's pid file, checked to be genos-jailer's
/// child: the jailer is our unreaped child, so its pid is its own, and a process whose
/// parent it is (checked after the pidfd is open, confirmed alive through the pidfd after
/// the check) is the VMM it forked.
fn jailed_vmm_pidfd(pid: i32, jailer_pid: i32) -> Result<Pidfd, String> {
    let pidfd = Pidfd::open(pid).map_err(|e| error_chain(&e))?;
    let parent = crate::pidfd::parent_pid(pid);
    if parent != Some(jailer_pid) || pidfd.signal(0).is_err() {
        return Err(format!(
            "pid {pid} is not genos-jailer's child (parent {parent:?}, jailer {jailer_pid})"
        ));
    }
    Ok(pidfd)
}

fn read_vmm_record(env_dir: &Path) -> Option<VmmRecord> {
    let text = std::fs::read(env_dir.join(VMM_RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

const JAIL_RECORD: &str = "jail.json";

fn read_jail_record(env_dir: &Path) -> Option<JailRecord> {
    let text = std::fs::read(env_dir.join(JAIL_RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

fn write_jail_record(env_dir: &Path, r: &JailRecord) -> Result<(), String> {
    let path = env_dir.join(JAIL_RECORD);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(r).expect("jail record json"),
    )
    .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

struct Images {
    kernel: PathBuf,
    initramfs: Option<PathBuf>,
    rootfs: Option<PathBuf>,
}

/// What one environment's VM is made of, for [`vm_config`].
struct VmSettings<'a> {
    spec: &'a Spec,
    images: &'a Images,
    /// `[vmm] cpu_template`.
    cpu_template: &'a str,
    /// The kernel command line (`[vmm] cmdline`, plus the guest's `ip=` when jailed).
    cmdline: String,
    /// The console log (COM1), on the host.
    console: PathBuf,
    /// Whether the desktop is graphical: a display of the spec's size and input devices.
    graphical: bool,
    /// The TAP device of the jail's network namespace, if it has one.
    tap: Option<String>,
}

/// The one VM configuration of an environment, in host paths: sent as `PUT /vm/config`
/// when unjailed, rendered as genos-vmm flags under the jailer. Every environment gets
/// virtio-rng and its root filesystem as a writable disk.
fn vm_config(s: &VmSettings<'_>) -> Result<VmConfig, String> {
    let bad = |field: &str, value: u32| format!("{field} {value} is out of range for genos-vmm");
    let config = VmConfig {
        kernel: s.images.kernel.clone(),
        initrd: s.images.initramfs.clone(),
        cmdline: s.cmdline.clone(),
        vcpus: u8::try_from(s.spec.vcpus).map_err(|_| bad("vcpus", s.spec.vcpus))?,
        mem_mib: s.spec.memory_mib,
        disks: s
            .images
            .rootfs
            .iter()
            .map(|path| DiskConfig {
                path: path.clone(),
                read_only: false,
            })
            .collect(),
        rng: true,
        cpu_template: s.cpu_template.parse().map_err(|e| format!("[vmm] {e}"))?,
        serial: SerialConfig::File(s.console.clone()),
        gpu: s.graphical.then_some(DisplaySize {
            width: s.spec.display.width,
            height: s.spec.display.height,
        }),
        input: s.graphical,
        net: s.tap.clone().map(|tap| NetConfig { tap, mac: None }),
    };
    config
        .validate_values()
        .map_err(|e| format!("VM configuration: {e}"))?;
    Ok(config)
}

async fn run_image_builder(binary: &str, args: &[&str]) -> Result<PathBuf, String> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {binary}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        return Err(format!("{binary} {} failed: {last}", args.join(" ")));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    if path.is_empty() {
        return Err(format!(
            "{binary} {} printed no artifact path",
            args.join(" ")
        ));
    }
    Ok(PathBuf::from(path))
}

/// Whether `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 (after the parenthesised name) is the state; Z and X are dead.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vcpus: u32, memory_mib: u32) -> Spec {
        let c = Composer::new(Catalog::embedded(), Default::default());
        match c.compose("python headless").outcome {
            Outcome::Spec(s) => Spec {
                vcpus,
                memory_mib,
                ..*s
            },
            o => panic!("{o:?}"),
        }
    }

    fn images() -> Images {
        Images {
            kernel: "/var/lib/genos/vmlinux".into(),
            initramfs: Some("/var/lib/genos/initramfs.cpio".into()),
            rootfs: Some("/var/lib/genos/envs/a/rootfs.ext4".into()),
        }
    }

    fn settings<'a>(spec: &'a Spec, images: &'a Images, graphical: bool) -> VmSettings<'a> {
        VmSettings {
            spec,
            images,
            cpu_template: "baseline",
            cmdline: "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off".into(),
            console: "/var/lib/genos/envs/a/console.log".into(),
            graphical,
            tap: Some("gvt-e3".into()),
        }
    }

    #[test]
    fn a_graphical_spec_becomes_one_typed_vm_config() {
        let mut spec = spec(2, 1024);
        (spec.display.width, spec.display.height) = (1280, 800);
        let images = images();

        let config = vm_config(&settings(&spec, &images, true)).unwrap();

        assert_eq!(config.kernel, images.kernel);
        assert_eq!(config.initrd, images.initramfs);
        assert_eq!((config.vcpus, config.mem_mib), (2, 1024));
        assert_eq!(
            config.disks,
            vec![DiskConfig {
                path: "/var/lib/genos/envs/a/rootfs.ext4".into(),
                read_only: false
            }]
        );
        assert!(config.rng && config.input);
        assert_eq!(config.cpu_template, vmm_api::CpuTemplate::Baseline);
        assert_eq!(
            config.serial,
            SerialConfig::File("/var/lib/genos/envs/a/console.log".into())
        );
        assert_eq!(
            config.gpu,
            Some(DisplaySize {
                width: 1280,
                height: 800
            })
        );
        assert_eq!(config.net.map(|n| n.tap).as_deref(), Some("gvt-e3"));
    }

    #[test]
    fn a_headless_spec_has_no_display_or_input() {
        let spec = spec(1, 256);
        let images = images();

        let config = vm_config(&settings(&spec, &images, false)).unwrap();

        assert_eq!((config.gpu, config.input), (None, false));
    }

    #[test]
    fn the_jailed_flags_are_the_config_and_the_jailer_rewrites_its_paths() {
        let spec = spec(2, 512);
        let images = images();
        let config = vm_config(&settings(&spec, &images, true)).unwrap();

        let args: Vec<String> = config
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let jailed = jailer::vmm_args::rewrite(&args).unwrap();

        let mounted: Vec<_> = jailed.binds.iter().map(|b| b.source.clone()).collect();
        for host in [
            &images.kernel,
            images.initramfs.as_ref().unwrap(),
            images.rootfs.as_ref().unwrap(),
        ] {
            assert!(mounted.contains(host), "{} not mounted", host.display());
        }
        for flag in ["--rng", "--input", "--gpu", "--net", "--cpu-template"] {
            assert!(jailed.args.iter().any(|a| a == flag), "{flag} missing");
        }
        assert!(!args.iter().any(|a| a == "--config"));
    }

    #[test]
    fn an_unknown_cpu_template_or_too_many_vcpus_is_refused() {
        let spec_ok = spec(2, 512);
        let spec_wide = spec(300, 512);
        let images = images();
        let bad_template = VmSettings {
            cpu_template: "fast",
            ..settings(&spec_ok, &images, false)
        };

        let template = vm_config(&bad_template).unwrap_err();
        let vcpus = vm_config(&settings(&spec_wide, &images, false)).unwrap_err();

        assert!(
            template.contains("cpu_template must be host or baseline"),
            "{template}"
        );
        assert!(vcpus.contains("vcpus 300"), "{vcpus}");
    }

    #[test]
    fn admission_counts_overcommit() {
        let cap = Capacity {
            vcpus: 2,
            memory_mib: 4096,
            cpu_overcommit: 2.0,
            memory_overcommit: 1.0,
        };
        assert!(cap.admit(0, 0, &spec(4, 4096)).is_ok());
        let err = cap.admit(2, 0, &spec(4, 1024)).unwrap_err();
        assert!(err.starts_with("not enough CPU"), "{err}");
        let err = cap.admit(0, 2048, &spec(1, 4096)).unwrap_err();
        assert!(err.starts_with("not enough memory"), "{err}");
    }

    #[test]
    fn exit_statuses_are_described() {
        use std::os::unix::process::ExitStatusExt;
        let s = std::process::ExitStatus::from_raw(5 << 8);
        assert!(describe_exit(Some(s)).contains("kernel panic"));
        let s = std::process::ExitStatus::from_raw(9);
        assert_eq!(describe_exit(Some(s)), "genos-vmm was killed by signal 9");
    }

    #[test]
    fn jailer_statuses_name_seccomp_jail_and_signals() {
        use std::os::unix::process::ExitStatusExt;
        let code = |c: i32| Some(std::process::ExitStatus::from_raw(c << 8));
        assert_eq!(
            describe_jailed_exit(code(159), ""),
            "genos-vmm was killed by its seccomp filter (a system call outside its allow-list)"
        );
        assert_eq!(
            describe_jailed_exit(code(71), "genos-jailer: mount /dev/kvm: Permission denied"),
            "the jail could not be set up: genos-jailer: mount /dev/kvm: Permission denied"
        );
        assert_eq!(
            describe_jailed_exit(code(137), "x"),
            "genos-vmm was killed by signal 9"
        );
        assert_eq!(
            describe_jailed_exit(code(3), "x"),
            "genos-vmm exited with status 3 (the guest rebooted)"
        );
        assert_eq!(
            describe_jailed_exit(code(2), "genos-vmm: kernel /images/k: not found"),
            "genos-vmm exited with status 2 (bad arguments, configuration or files): genos-vmm: kernel /images/k: not found"
        );
    }

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

    #[test]
    fn pid_alive_sees_self_and_not_nonsense() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(i32::MAX));
    }
}
