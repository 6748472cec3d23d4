//! Requests: composing text into a spec (rules or the LLM backend) and creating an
//! environment from it (validation, unique naming, admission), whose build and boot then run
//! in the background.

use proto::spec::Spec;

use super::metrics::bump;
use super::{audit_text, CreateOutcome, OrchError, Orchestrator};
use crate::composer::{Composition, Outcome};
use crate::error_chain;
use crate::store::EnvRecord;

impl Orchestrator {
    pub fn compose(&self, text: &str) -> Composition {
        let c = self.inner.composer.compose(text);
        self.count_composed(&c.outcome);
        c
    }

    /// Counts a composed request, and whether it was answered with a question.
    fn count_composed(&self, outcome: &Outcome) {
        bump(&self.inner.counters.composed);
        if matches!(outcome, Outcome::Clarify(_)) {
            bump(&self.inner.counters.clarified);
        }
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
                let explain = vec![format!(
                    "proposed by the LLM backend ({}), validated against the schema and catalog",
                    llm.model
                )];
                let outcome = match p {
                    crate::llm::Proposal::Spec(s) => Outcome::Spec(s),
                    crate::llm::Proposal::Clarify(q) => Outcome::Clarify(q),
                };
                self.count_composed(&outcome);
                Composition { outcome, explain }
            }
            Err(e) => {
                let mut c = self.compose(text);
                c.explain.insert(
                    0,
                    format!(
                        "LLM backend not used ({}); composed by the rules",
                        error_chain(&e)
                    ),
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
                bump(&self.inner.counters.refused);
                self.audit(actor, "refuse", &spec.name, &why.to_string())?;
                return Err(OrchError::Admission(why));
            }
            store.insert_env(&spec)?
        };
        bump(&self.inner.counters.created);
        self.audit(
            actor,
            "create",
            &record.name,
            &serde_json::to_string(&record.spec).expect("spec json"),
        )?;
        self.spawn_provision(record.name.clone());
        Ok(record)
    }
}
