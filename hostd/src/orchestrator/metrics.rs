//! Counters of what the orchestrator did and the Prometheus text built from them and the
//! store.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{OrchError, Orchestrator};
use crate::store::{EnvRecord, EnvState};

/// What the orchestrator did since it started, for [`Orchestrator::metrics_text`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) created: AtomicU64,
    pub(super) refused: AtomicU64,
    pub(super) vmm_failures: AtomicU64,
    pub(super) composed: AtomicU64,
    pub(super) clarified: AtomicU64,
    pub(super) reaped: AtomicU64,
}

/// Adds one to `counter`.
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
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
        // Sums in integers: an empty f64 sum is -0.0, which would print as "-0".
        let count = |n: &AtomicU64| n.load(Ordering::Relaxed) as f64;
        let gauges = [
            (
                "genos_vcpus_allocated",
                "vCPUs promised to live environments.",
                live.iter().map(|e| u64::from(e.spec.vcpus)).sum::<u64>() as f64,
            ),
            (
                "genos_memory_allocated_mib",
                "Memory promised to live environments.",
                live.iter()
                    .map(|e| u64::from(e.spec.memory_mib))
                    .sum::<u64>() as f64,
            ),
            (
                "genos_capacity_vcpus",
                "Host vCPUs before overcommit.",
                f64::from(cap.vcpus),
            ),
            (
                "genos_capacity_memory_mib",
                "Host memory for environments before overcommit.",
                cap.memory_mib as f64,
            ),
        ];
        let counters = [
            (
                "genos_environments_created_total",
                "Environments admitted.",
                count(&c.created),
            ),
            (
                "genos_admission_refusals_total",
                "Requests refused by admission control.",
                count(&c.refused),
            ),
            (
                "genos_vmm_failures_total",
                "VMMs that ended without being asked to.",
                count(&c.vmm_failures),
            ),
            (
                "genos_compose_requests_total",
                "Requests composed.",
                count(&c.composed),
            ),
            (
                "genos_compose_clarifications_total",
                "Composed requests answered with a question.",
                count(&c.clarified),
            ),
            (
                "genos_reaped_total",
                "Environments stopped or destroyed by TTL/idle reaping.",
                count(&c.reaped),
            ),
        ];
        for (kind, metrics) in [("gauge", &gauges[..]), ("counter", &counters[..])] {
            for (name, help, v) in metrics {
                out.push_str(&format!(
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
                ));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::orchestrator::Orchestrator;

    #[test]
    fn metrics_are_gauges_then_counters_with_help_and_type() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::from_toml("[capacity]\nvcpus = 4\nmemory_mib = 8192\n").unwrap();
        let o = Orchestrator::new(cfg, dir.path()).unwrap();
        o.compose("python headless");

        let text = o.metrics_text().unwrap();

        let (states, rest) = text.split_at(text.find("# HELP genos_vcpus").unwrap());
        assert_eq!(states.lines().count(), 2 + 7, "{states}");
        assert!(states.contains("genos_environments{state=\"ready\"} 0\n"));
        let want = [
            (
                "genos_vcpus_allocated",
                "gauge",
                "vCPUs promised to live environments.",
                0,
            ),
            (
                "genos_memory_allocated_mib",
                "gauge",
                "Memory promised to live environments.",
                0,
            ),
            (
                "genos_capacity_vcpus",
                "gauge",
                "Host vCPUs before overcommit.",
                4,
            ),
            (
                "genos_capacity_memory_mib",
                "gauge",
                "Host memory for environments before overcommit.",
                8192,
            ),
            (
                "genos_environments_created_total",
                "counter",
                "Environments admitted.",
                0,
            ),
            (
                "genos_admission_refusals_total",
                "counter",
                "Requests refused by admission control.",
                0,
            ),
            (
                "genos_vmm_failures_total",
                "counter",
                "VMMs that ended without being asked to.",
                0,
            ),
            (
                "genos_compose_requests_total",
                "counter",
                "Requests composed.",
                1,
            ),
            (
                "genos_compose_clarifications_total",
                "counter",
                "Composed requests answered with a question.",
                0,
            ),
            (
                "genos_reaped_total",
                "counter",
                "Environments stopped or destroyed by TTL/idle reaping.",
                0,
            ),
        ]
        .map(|(name, kind, help, v)| {
            format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n")
        })
        .concat();
        assert_eq!(rest, want);
    }
}
