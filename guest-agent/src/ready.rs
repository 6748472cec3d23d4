//! Readiness: which [`Stage`] the guest reached.
//!
//! `system`: an agent running as PID 1 (the initramfs) is there at once; otherwise when
//! `systemctl is-system-running` says `running` or `degraded` (systemd reached its default
//! target; `degraded` means a unit failed, which hostd reports but does not wait on). The
//! `session` stage needs the display server and is not detected by this build.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent::Stage;

/// How often the init system is asked while the stage is below `system`.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// Whether `systemctl is-system-running`'s output means the system is up.
pub fn system_running(output: &str) -> bool {
    matches!(output.trim(), "running" | "degraded")
}

/// Tracks the stage, asking the init system now and then.
#[derive(Debug)]
pub struct Readiness {
    stage: Stage,
    systemctl: PathBuf,
    next_check: Option<Instant>,
    /// The last failure to run systemctl, reported once.
    last_error: Option<String>,
}

impl Readiness {
    /// As PID 1 the stage starts at `system`; else `systemctl` is asked.
    pub fn new(pid1: bool, systemctl: PathBuf, now: Instant) -> Self {
        Readiness {
            stage: if pid1 { Stage::System } else { Stage::Booting },
            systemctl,
            next_check: (!pid1).then_some(now),
            last_error: None,
        }
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// When [`Readiness::poll`] next has work.
    pub fn next_check(&self) -> Option<Instant> {
        self.next_check
    }

    /// Checks if due; returns the new stage when it rose.
    pub fn poll(&mut self, now: Instant) -> Option<Stage> {
        let due = self.next_check.is_some_and(|at| now >= at);
        if !due {
            return None;
        }
        let out = Command::new(&self.systemctl)
            .arg("is-system-running")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output();
        match out {
            Ok(out) if system_running(&String::from_utf8_lossy(&out.stdout)) => {
                self.stage = Stage::System;
                self.next_check = None;
                return Some(Stage::System);
            }
            Ok(_) => {}
            Err(e) => {
                let message = format!("running {}: {e}", self.systemctl.display());
                if self.last_error.as_deref() != Some(&message) {
                    eprintln!("genos-agent: readiness: {message}");
                    self.last_error = Some(message);
                }
            }
        }
        self.next_check = Some(now + CHECK_INTERVAL);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_and_degraded_are_up_and_the_rest_is_not() {
        assert!(system_running("running\n"));
        assert!(system_running("degraded"));
        for s in [
            "starting",
            "initializing",
            "stopping",
            "offline",
            "maintenance",
            "",
        ] {
            assert!(!system_running(s), "{s}");
        }
    }

    #[test]
    fn pid1_is_at_system_at_once_and_never_asks() {
        let mut r = Readiness::new(true, "/nonexistent".into(), Instant::now());
        assert_eq!(r.stage(), Stage::System);
        assert_eq!(r.poll(Instant::now()), None);
        assert_eq!(r.next_check(), None);
    }

    #[test]
    fn a_missing_systemctl_keeps_the_stage_and_asks_again_later() {
        let now = Instant::now();
        let mut r = Readiness::new(false, "/nonexistent/systemctl".into(), now);
        assert_eq!(r.poll(now), None);
        assert_eq!(r.stage(), Stage::Booting);
        assert_eq!(r.next_check(), Some(now + CHECK_INTERVAL));
    }
}
