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
//! reached through [`crate::uds::VmmSocket`] (no links followed, peer uid checked).
//!
//! The rooms: `create` (composing and admitting requests), `capacity` (admission limits),
//! `images` and `boot` (building and launching), `jail` (jail slots, cgroups, network
//! namespaces), `vm_config` (the VM's configuration), `supervise` (VMM processes: pidfds,
//! re-adoption, exits), `stop` (stop, destroy, reaping), `viewers` (stream server and viewer
//! tokens), `audit`, `metrics`, `error`.

mod audit;
mod boot;
mod capacity;
mod create;
pub mod desktop;
mod error;
mod guest;
mod images;
mod jail;
mod metrics;
mod stop;
mod supervise;
mod viewers;
mod vm_config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::spec::Catalog;

pub use audit::{audit_text, AUDIT_TEXT_MAX};
pub use capacity::{AdmissionError, Capacity};
pub use error::OrchError;
pub use guest::{EXEC_OUTPUT_LIMIT, MAX_COPY_SIZE, MAX_EXEC_TIMEOUT};
pub use metrics::{serve_metrics, ListenerLimits};
pub use supervise::{describe_exit, describe_jailed_exit, pid_alive};

use crate::composer::{Clarify, Composer};
use crate::config::Config;
use crate::store::{EnvRecord, EnvState, Store};
use jail::{decide_jail, Jail};
use metrics::Counters;
use supervise::Proc;

/// What `create` from text produced.
#[derive(Debug)]
pub enum CreateOutcome {
    Created(Box<EnvRecord>),
    Clarify(Clarify),
}

/// Cheap to clone; every clone drives the same environments.
#[derive(Clone)]
pub struct Orchestrator {
    inner: Arc<Inner>,
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
    /// What each environment that is not ready yet is doing now, for `genos up` and
    /// `genos show` (not durable: a restart rebuilds or re-adopts).
    progress: Mutex<HashMap<String, String>>,
    /// The host's KVM is the nested `kvm_pvm` kind: guest user space cannot run.
    nested_kvm: bool,
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
                progress: Mutex::new(HashMap::new()),
                nested_kvm: nested_kvm_host(),
            }),
        })
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock leaves SQLite consistent (every write is its own
        // statement or transaction), so a poisoned lock is still usable.
        self.inner.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The supervised VMMs, by environment name.
    fn procs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Proc>>> {
        self.inner.procs.lock().expect("procs lock")
    }

    pub fn capacity(&self) -> Capacity {
        self.inner.capacity
    }

    /// The state directory (the store, admin.sock, envs/), for `/v1/health`.
    pub fn state_dir(&self) -> &Path {
        &self.inner.state_dir
    }

    /// hostd's configuration, for `/v1/health`.
    pub fn config(&self) -> &Config {
        &self.inner.cfg
    }

    /// The stream server, once hostd runs one.
    pub fn stream_server(&self) -> Option<&Arc<crate::stream::StreamServer>> {
        self.inner.stream.get()
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

    pub fn list(&self) -> Result<Vec<EnvRecord>, OrchError> {
        Ok(self.store().envs(false)?)
    }

    pub fn show(&self, name: &str) -> Result<EnvRecord, OrchError> {
        self.store()
            .env(name)?
            .ok_or_else(|| OrchError::NotFound(name.into()))
    }

    /// What `name` is doing on its way to ready (a build step, a boot stage), if anything.
    pub fn progress(&self, name: &str) -> Option<String> {
        self.inner
            .progress
            .lock()
            .expect("poisoned")
            .get(name)
            .cloned()
    }

    /// Records what `name` is doing now; `None` once it is ready or gone.
    fn set_progress(&self, name: &str, what: Option<String>) {
        let mut map = self.inner.progress.lock().expect("poisoned");
        match what {
            Some(what) => {
                tracing::info!(env = name, "{what}");
                map.insert(name.to_owned(), what);
            }
            None => {
                map.remove(name);
            }
        }
    }

    /// Marks viewer activity (resets the idle clock).
    pub fn touch(&self, name: &str) -> Result<(), OrchError> {
        Ok(self.store().touch(name)?)
    }

    /// Pid of the supervised VMM (tests, `show`).
    pub fn vmm_pid(&self, name: &str) -> Option<i32> {
        self.procs()
            .get(name)
            .and_then(|p| p.vmm.get().map(|v| v.pid()))
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
        if !matches!(next, EnvState::Building | EnvState::Booting) {
            self.set_progress(name, None);
        }
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

/// Whether this host's KVM is the nested `kvm_pvm` kind (as on the development machines):
/// guest kernels run interpreted and guest user space cannot make system calls, so no
/// stock guest reaches its agent here.
fn nested_kvm_host() -> bool {
    vmm_api::config::KvmHostFacts::read().kind() == vmm_api::config::KvmKind::NestedPvm
}

#[cfg(test)]
mod tests {
    use proto::spec::{Catalog, Spec};

    use crate::composer::{Composer, Outcome};

    /// A headless spec with `vcpus` and `memory_mib`, for the unit tests.
    pub(super) fn spec(vcpus: u32, memory_mib: u32) -> Spec {
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
}
