//! The session part under the kiosk (cage, Wayland). cage starts its one program only once
//! its compositor runs, and the program is the kiosk session's whole life; the session part
//! is started beside it by the wrapper the program runs through (`genos-kiosk-session`,
//! which then execs the app, so the app is the session part's parent). So `session` here
//! means: the compositor's Wayland socket accepts a connection and the kiosk app's process
//! runs. Its window cannot be seen from outside the compositor (cage offers no protocol
//! for listing toplevels), and the agent has no clipboard or display control under Wayland.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How often the app and the compositor are looked at.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);

/// The compositor's socket: `$WAYLAND_DISPLAY` if absolute, else under `$XDG_RUNTIME_DIR`.
pub fn wayland_socket(display: Option<&str>, runtime_dir: Option<&str>) -> Option<PathBuf> {
    let display = display.filter(|d| !d.is_empty()).unwrap_or("wayland-0");
    if display.starts_with('/') {
        return Some(display.into());
    }
    runtime_dir
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d).join(display))
}

/// What a look at the kiosk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KioskState {
    /// Not yet: the compositor does not answer.
    Waiting,
    /// The compositor answers and the app runs.
    Running,
    /// The app is gone: the session is over.
    Ended,
}

/// Watches the kiosk app (the session part's parent) and the compositor.
#[derive(Debug)]
pub struct Kiosk {
    app: i32,
    socket: Option<PathBuf>,
    running: bool,
    next_check: Instant,
}

impl Kiosk {
    /// The app is this process's parent; the socket comes from the environment.
    pub fn from_env(now: Instant) -> Kiosk {
        let env = |k: &str| std::env::var(k).ok();
        Kiosk {
            // SAFETY: getppid has no preconditions.
            app: unsafe { libc::getppid() },
            socket: wayland_socket(
                env("WAYLAND_DISPLAY").as_deref(),
                env("XDG_RUNTIME_DIR").as_deref(),
            ),
            running: false,
            next_check: now,
        }
    }

    pub fn running(&self) -> bool {
        self.running
    }

    pub fn next_check(&self) -> Instant {
        self.next_check
    }

    /// Looks again when due.
    pub fn poll(&mut self, now: Instant) -> KioskState {
        if now >= self.next_check {
            self.next_check = now + CHECK_INTERVAL;
            // SAFETY: getppid has no preconditions. A parent that exited re-parents us.
            if unsafe { libc::getppid() } != self.app {
                return KioskState::Ended;
            }
            if !self.running {
                self.running = self
                    .socket
                    .as_ref()
                    .is_some_and(|s| UnixStream::connect(s).is_ok());
            }
        }
        if self.running {
            KioskState::Running
        } else {
            KioskState::Waiting
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wayland_socket_is_found_like_clients_find_it() {
        assert_eq!(
            wayland_socket(Some("wayland-1"), Some("/run/user/1000")),
            Some("/run/user/1000/wayland-1".into())
        );
        assert_eq!(
            wayland_socket(None, Some("/run/user/1000")),
            Some("/run/user/1000/wayland-0".into())
        );
        assert_eq!(wayland_socket(Some("/tmp/w"), None), Some("/tmp/w".into()));
        assert_eq!(wayland_socket(Some("wayland-0"), None), None);
    }
}
