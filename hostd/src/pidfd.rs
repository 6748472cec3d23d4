//! Process handles that pid reuse cannot fool: hostd supervises and kills VMMs only through
//! pidfds (`pidfd_open(2)`, `pidfd_send_signal(2)`, and poll for the exit), never by number.
//!
//! A pidfd refers to one process for as long as it is open: once that process is reaped
//! its pid may be reused, but signals sent through the pidfd fail with ESRCH instead of
//! reaching the newcomer. What remains is making sure the pidfd was opened for the right
//! process in the first place. A child of ours cannot be reaped (so its pid not reused)
//! before we wait for it; any other process is identified by [`ProcessId`]: its pid, its
//! start time (`/proc/PID/stat` field 22) and the boot it started in, read after the pidfd
//! is open and confirmed with a signal 0 through the pidfd afterwards (so the `/proc`
//! entry read was the pidfd's own process, not a successor's).

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

#[derive(Debug, thiserror::Error)]
pub enum PidfdError {
    #[error("pidfd_open({pid})")]
    Open {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("cannot read /proc/{pid}/stat")]
    Stat {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("pid {pid} is another process now (started at tick {found}, not {want})")]
    Reused { pid: i32, found: u64, want: u64 },
    #[error("pid {pid} was recorded during another boot")]
    OtherBoot { pid: i32 },
    #[error("process {pid} ended while it was being identified")]
    Gone { pid: i32 },
}

/// An open pidfd.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
    pid: i32,
}

impl Pidfd {
    /// `pidfd_open(pid, 0)`. The caller must know `pid` cannot have been reused (a child
    /// it has not waited for), or check the process with [`ProcessId`] afterwards.
    pub fn open(pid: i32) -> Result<Pidfd, PidfdError> {
        if pid <= 0 {
            return Err(PidfdError::Open {
                pid,
                source: io::ErrorKind::InvalidInput.into(),
            });
        }
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(PidfdError::Open {
                pid,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: the kernel returned a new descriptor (a pidfd is CLOEXEC) owned by no one.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        Ok(Pidfd { fd, pid })
    }

    /// The pid the process had when the pidfd was opened.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `sig` to exactly this process; ESRCH once it has been reaped.
    pub fn signal(&self, sig: libc::c_int) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a pidfd we own, a signal number, no siginfo and no
        // flags reads no memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether the process has exited (the pidfd polls readable from then on).
    pub fn has_exited(&self) -> bool {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        n > 0 && p.revents != 0
    }

    /// Completes when the process exits.
    pub async fn exited(&self) -> io::Result<()> {
        // SAFETY: the borrowed descriptor is `self.fd`, which stays open and unchanged for
        // as long as `afd` (a local of this borrow of `self`) lives.
        let afd = unsafe {
            AsyncFd::register_with_interest(self.fd.as_fd(), tokio::io::Interest::READABLE)
        }?;
        loop {
            if self.has_exited() {
                return Ok(());
            }
            let mut guard = afd.readable().await?;
            guard.clear_ready();
        }
    }
}

/// A process's identity across pid reuse and reboots, as recorded for re-adoption.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Clock ticks after boot at which the process started (`/proc/PID/stat` field 22).
    pub start_time: u64,
    /// `/proc/sys/kernel/random/boot_id` when it was recorded.
    pub boot_id: String,
}

impl ProcessId {
    /// The identity of the process behind `pidfd`.
    pub fn of(pidfd: &Pidfd) -> Result<ProcessId, PidfdError> {
        let pid = pidfd.pid;
        let start_time = start_time(pid)?;
        // Still attached to its pid (alive or a zombie not yet reaped): the /proc entry
        // read above was this process's.
        pidfd.signal(0).map_err(|_| PidfdError::Gone { pid })?;
        Ok(ProcessId {
            pid,
            start_time,
            boot_id: boot_id(),
        })
    }

    /// Opens a pidfd for the recorded process, refusing any other process that now has
    /// its pid.
    pub fn open(&self) -> Result<Pidfd, PidfdError> {
        if self.boot_id != boot_id() {
            return Err(PidfdError::OtherBoot { pid: self.pid });
        }
        let pidfd = Pidfd::open(self.pid)?;
        let now = ProcessId::of(&pidfd)?;
        if now.start_time != self.start_time {
            return Err(PidfdError::Reused {
                pid: self.pid,
                found: now.start_time,
                want: self.start_time,
            });
        }
        Ok(pidfd)
    }
}

/// Field 22 of `/proc/PID/stat`.
fn start_time(pid: i32) -> Result<u64, PidfdError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|source| PidfdError::Stat { pid, source })?;
    let bad = || PidfdError::Stat {
        pid,
        source: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
    };
    // The name (field 2) is parenthesised and may hold spaces: count after its `)`.
    let (_, rest) = stat.rsplit_once(')').ok_or_else(bad)?;
    rest.split_whitespace()
        .nth(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(bad)
}

/// The Parent pid of a live process (`PPid:` in `/proc/PID/status`).
pub fn parent_pid(pid: i32) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sleeper() -> std::process::Child {
        Command::new("sleep").arg("600").spawn().unwrap()
    }

    #[test]
    fn signal_reaches_the_process_and_exit_is_seen() {
        let mut child = sleeper();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        assert!(!pidfd.has_exited());
        pidfd.signal(libc::SIGKILL).unwrap();
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(pidfd.has_exited());
    }

    #[test]
    fn a_reaped_process_is_never_signalled_through_its_pidfd() {
        let mut child = sleeper();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        // Its pid may belong to anyone now; the pidfd refuses instead of signalling them.
        let err = pidfd.signal(libc::SIGKILL).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn a_recorded_process_is_reopened_and_a_successor_on_its_pid_is_refused() {
        let mut child = sleeper();
        let pid = child.id() as i32;
        let id = ProcessId::of(&Pidfd::open(pid).unwrap()).unwrap();
        assert_eq!(id.open().unwrap().pid(), pid);
        // Another process under the recorded pid: same number, other start time.
        let successor = ProcessId {
            start_time: id.start_time + 1,
            ..id.clone()
        };
        assert!(matches!(successor.open(), Err(PidfdError::Reused { .. })));
        let other_boot = ProcessId {
            boot_id: "another-boot".into(),
            ..id.clone()
        };
        assert!(matches!(
            other_boot.open(),
            Err(PidfdError::OtherBoot { .. })
        ));
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(id.open().is_err(), "a reaped process cannot be reopened");
    }

    #[tokio::test]
    async fn exited_completes_when_the_process_ends() {
        let mut child = sleeper();
        let pidfd = Pidfd::open(child.id() as i32).unwrap();
        let waiter = tokio::spawn(async move { pidfd.exited().await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        child.kill().unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(30), waiter)
            .await
            .expect("exit seen")
            .unwrap()
            .unwrap();
        child.wait().unwrap();
    }
}
