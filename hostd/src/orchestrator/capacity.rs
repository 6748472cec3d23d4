//! Admission control: the host's capacity for environments (after the overcommit ratios)
//! and the check that refuses a spec the live environments leave no room for.

use proto::spec::Spec;
use serde::Serialize;

use crate::config::Config;

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
    pub fn admit(&self, used_vcpus: u64, used_mib: u64, spec: &Spec) -> Result<(), AdmissionError> {
        let cpu_limit = (f64::from(self.vcpus) * self.cpu_overcommit).floor() as u64;
        let mem_limit = (self.memory_mib as f64 * self.memory_overcommit).floor() as u64;
        let (want_cpu, want_mib) = (u64::from(spec.vcpus), u64::from(spec.memory_mib));
        if used_vcpus + want_cpu > cpu_limit {
            return Err(AdmissionError::Cpu {
                name: spec.name.clone(),
                want: want_cpu,
                used: used_vcpus,
                limit: cpu_limit,
                host: self.vcpus,
                overcommit: self.cpu_overcommit,
            });
        }
        if used_mib + want_mib > mem_limit {
            return Err(AdmissionError::Memory {
                name: spec.name.clone(),
                want: want_mib,
                used: used_mib,
                limit: mem_limit,
                host: self.memory_mib,
                overcommit: self.memory_overcommit,
            });
        }
        Ok(())
    }
}

/// Why [`Capacity::admit`] refused a spec.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("not enough CPU: {name} asks for {want} vCPUs, {used} of {limit} are in use ({host} host CPUs x overcommit {overcommit})")]
    Cpu {
        name: String,
        want: u64,
        used: u64,
        limit: u64,
        host: u32,
        overcommit: f64,
    },
    #[error("not enough memory: {name} asks for {want} MiB, {used} of {limit} MiB are in use ({host} MiB x overcommit {overcommit})")]
    Memory {
        name: String,
        want: u64,
        used: u64,
        limit: u64,
        host: u64,
        overcommit: f64,
    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::tests::spec;

    #[test]
    fn admission_counts_overcommit() {
        let cap = Capacity {
            vcpus: 2,
            memory_mib: 4096,
            cpu_overcommit: 2.0,
            memory_overcommit: 1.0,
        };
        assert!(cap.admit(0, 0, &spec(4, 4096)).is_ok());
        let err = cap.admit(2, 0, &spec(4, 1024)).unwrap_err().to_string();
        assert!(err.starts_with("not enough CPU"), "{err}");
        let err = cap.admit(0, 2048, &spec(1, 4096)).unwrap_err().to_string();
        assert!(err.starts_with("not enough memory"), "{err}");
    }
}
