//! What viewers get: ready graphical environments published on the stream server, and the
//! viewer tokens that open them (minting, revocation, the revocation list).

use std::sync::Arc;
use std::time::Duration;

use super::{OrchError, Orchestrator};
use crate::store::{now_s, EnvState};
use crate::uds::VmmSocket;

impl Orchestrator {
    /// Publishes ready graphical environments on `server` from now on, with the store's
    /// revocation list; viewers' sessions go into the audit chain and reset their
    /// environment's idle clock. Must be called within a tokio runtime.
    pub fn set_stream_server(
        &self,
        server: Arc<crate::stream::StreamServer>,
    ) -> Result<(), OrchError> {
        server.set_revocations(self.revocations()?);
        let mut records = server.viewer_records();
        let _ = self.inner.stream.set(server);
        let orch = self.clone();
        tokio::spawn(async move {
            while let Some(event) = records.recv().await {
                let orch = orch.clone();
                // The store is SQLite behind a mutex: off the async workers.
                let done = tokio::task::spawn_blocking(move || orch.record_viewer(&event)).await;
                if let Err(e) = done {
                    tracing::warn!(error = %e, "recording a viewer failed");
                }
            }
        });
        Ok(())
    }

    /// Audits a viewer's join, first use of a right or leave, and marks the activity.
    fn record_viewer(&self, event: &crate::stream::ViewerEvent) {
        use crate::stream::ViewerRecord;
        let name = event.env.name.as_str();
        let remote = event.remote;
        let (token, action, detail) = match &event.record {
            ViewerRecord::Joined {
                token,
                rights,
                resumed,
            } => (
                token,
                "viewer-join",
                format!(
                    "viewer={} remote={remote} rights={rights} resumed={resumed}",
                    event.viewer
                ),
            ),
            ViewerRecord::FirstUse { token, right } => (
                token,
                "viewer-use",
                format!("viewer={} remote={remote} right={right}", event.viewer),
            ),
            ViewerRecord::Left {
                token,
                input_events,
                clipboard_sets,
            } => (
                token,
                "viewer-leave",
                format!(
                    "viewer={} remote={remote} input_events={input_events} clipboard_sets={clipboard_sets}",
                    event.viewer
                ),
            ),
        };
        // Only a record of this very environment (not a later one of the same name).
        let current = self.show(name).is_ok_and(|e| e.id as u64 == event.env.uid);
        if current {
            if let Err(e) = self.touch(name) {
                tracing::warn!(env = name, error = %e, "marking viewer activity failed");
            }
        }
        if let Err(e) = self.audit(&format!("viewer:{token}"), action, name, &detail) {
            tracing::warn!(env = name, error = %e, action, "auditing a viewer failed");
        }
    }

    /// Puts a ready graphical environment's screen and input on the stream server, with its
    /// desktop link to the guest agent ([`super::desktop`]). Called once per environment:
    /// the VMM serves a bounded number of framebuffer readers.
    pub(super) async fn stream_environment(&self, name: &str, sock: &VmmSocket) {
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
        match tokio::task::spawn_blocking(move || crate::vm_source::open(&sock)).await {
            Ok(Ok((frames, input))) => {
                // Clipboard and guest display size go through the agent.
                let (input, link) = super::desktop::link(
                    super::desktop::Environment::new(self, name),
                    Box::new(input),
                );
                let source = crate::stream::EnvironmentSource {
                    frames: Box::new(frames),
                    input: Arc::new(input),
                };
                match server.add_environment(&env_ref, source, fps) {
                    Ok(()) => {
                        use tracing::Instrument;
                        let span = tracing::info_span!("desktop", env = name);
                        tokio::spawn(link.run().instrument(span));
                    }
                    Err(e) => tracing::warn!(env = name, error = %e, "cannot stream environment"),
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(env = name, error = %e, "cannot read the VM's framebuffer")
            }
            Err(e) => tracing::warn!(env = name, error = %e, "framebuffer task failed"),
        }
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
        let rights: proto::stream::Rights = rights
            .parse()
            .map_err(|e: proto::stream::UnknownRight| OrchError::Token(e.to_string()))?;
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
        // The browser's link: the same token, at `[stream] public_host` when set.
        let web_url = url.as_deref().and_then(|u| {
            crate::web::web_url_from_connect_url(u, self.inner.cfg.stream.public_host.as_deref())
        });
        Ok(serde_json::json!({
            "env": name, "token": token, "token_id": token_id.to_string(),
            "expires_at": now_s() + ttl_s as i64, "cert_sha256": fingerprint, "url": url,
            "web_url": web_url,
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
}
