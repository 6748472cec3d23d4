//! Counters of what the orchestrator did and the Prometheus text built from them and the
//! store.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{OrchError, Orchestrator};
use crate::store::{EnvRecord, EnvState};

#[derive(Default)]
pub(super) struct Counters {
    pub(super) created: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) vmm_failures: AtomicU64,
    pub(super) composed: AtomicU64,
    pub(super) clarified: AtomicU64,
    pub(super) reaped: AtomicU64,
}

impl Orchestrator {
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
}
