//! Readiness: which [`Stage`] the guest reached.
//!
//! `system`: an agent running as PID 1 (the initramfs) is there at once; otherwise when
//! `systemctl is-system-running` says `running` or `degraded` (systemd reached its default
//! target; `degraded` means a unit failed, which hostd reports but does not wait on).
//! `session`: the desktop's display server answers and a top-level window of another client
//! is mapped, as the X side ([`crate::x11`]) sees it in the agent or in its session part;
//! [`combine`] makes the stage announced from the two.

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

/// Longest wait for `systemctl is-system-running` (it blocks the agent's loop meanwhile).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs `systemctl is-system-running` and returns what it printed; killed after
/// [`ASK_TIMEOUT`] so a systemd that does not answer cannot stall the agent.
fn ask(systemctl: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut child = Command::new(systemctl)
        .arg("is-system-running")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + ASK_TIMEOUT;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {ASK_TIMEOUT:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = String::new();
    if let Some(stdout) = child.stdout.take() {
        // Bounded: systemctl prints one word; a pipe holds at most 64 KiB anyway.
        stdout.take(4096).read_to_string(&mut out)?;
    }
    Ok(out)
}

/// The stage to announce: the init system's, raised to `session` while a desktop session
/// (the session part, or the agent's own X connection) says its first window is mapped. A
/// session part that is gone or still starting leaves the init system's stage; it never
/// lowers it.
pub fn combine(system: Stage, desktop: Option<Stage>) -> Stage {
    match desktop {
        Some(Stage::Session) => Stage::Session,
        _ => system,
    }
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
        match ask(&self.systemctl) {
            Ok(out) if system_running(&out) => {
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
    fn a_desktop_session_raises_the_stage_and_its_absence_keeps_the_systems() {
        assert_eq!(combine(Stage::System, Some(Stage::Session)), Stage::Session);
        assert_eq!(
            combine(Stage::Booting, Some(Stage::Session)),
            Stage::Session
        );
        assert_eq!(combine(Stage::System, Some(Stage::System)), Stage::System);
        assert_eq!(combine(Stage::System, Some(Stage::Booting)), Stage::System);
        assert_eq!(combine(Stage::System, None), Stage::System);
        assert_eq!(combine(Stage::Booting, None), Stage::Booting);
    }

    #[test]
    fn pid1_is_at_system_at_once_and_never_asks() {
        let mut r = Readiness::new(true, "/nonexistent".into(), Instant::now());
        assert_eq!(r.stage(), Stage::System);
        assert_eq!(r.poll(Instant::now()), None);
        assert_eq!(r.next_check(), None);
    }

    #[test]
    fn a_systemctl_that_hangs_is_given_up_on() {
        let dir = std::env::temp_dir().join(format!("genos-agent-ready-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hang = dir.join("systemctl");
        std::fs::write(&hang, "#!/bin/sh\nexec sleep 30\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = Instant::now();
        let err = ask(&hang).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() < ASK_TIMEOUT + Duration::from_secs(2));
        std::fs::remove_dir_all(dir).unwrap();
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
