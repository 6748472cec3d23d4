//! Stopping and destroying environments, by request or by the TTL/idle reaper.

use super::metrics::bump;
use super::{OrchError, Orchestrator};
use crate::store::{now_s, EnvRecord, EnvState};

impl Orchestrator {
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
                    bump(&self.inner.counters.reaped);
                    self.destroy(&env.name, "reaper:ttl").await?;
                    continue;
                }
            }
            if let Some(idle) = env.spec.lifetime.idle_s {
                let watched = self
                    .inner
                    .stream
                    .get()
                    .is_some_and(|s| s.is_watched(&env.name));
                if watched {
                    // Someone is looking at it: the idle clock starts when the last one leaves
                    // (their leave touches it again).
                    self.touch(&env.name)?;
                } else if env.state == EnvState::Ready && now >= env.last_active_at + idle as i64 {
                    bump(&self.inner.counters.reaped);
                    self.stop(&env.name, "reaper:idle").await?;
                }
            }
        }
        Ok(())
    }
}
