//! Supervising VMM processes: spawning one in its own process group and holding it by
//! pidfd, recording its identity (`envs/NAME/vmm.json`), re-adopting it after a restart,
//! stopping and killing it, and describing how it ended.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use vmm_api::{LifecycleAction, Request, VmState};

use super::jail::{jailed_socket, read_jail_record, unjailed_socket};
use super::metrics::bump;
use super::{OrchError, Orchestrator};
use crate::error_chain;
use crate::pidfd::{Pidfd, PidfdError, ProcessId};
use crate::store::{EnvRecord, EnvState};
use crate::uds::VmmSocket;
use crate::vmm_client::{self, VmmClientError};

/// Why a VMM could not be started, held, recorded or re-adopted.
#[derive(Debug, thiserror::Error)]
pub(super) enum SuperviseError {
    #[error("cannot start {program}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot hold {program}: the child has no pid")]
    NoPid { program: String },
    #[error("cannot hold {program}")]
    Hold {
        program: String,
        #[source]
        source: PidfdError,
    },
    #[error(transparent)]
    Pidfd(#[from] PidfdError),
    #[error("pid {pid} is not genos-jailer's child (parent {parent:?}, jailer {jailer})")]
    NotJailersChild {
        pid: i32,
        parent: Option<i32>,
        jailer: i32,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no readable vmm.json")]
    NoRecord,
    #[error("vmm.json names pid {pid}, the store {store:?}")]
    PidMismatch { pid: i32, store: Option<i32> },
    #[error("vmm.json names uid {vmm}, jail.json uid {jail}")]
    UidMismatch { vmm: u32, jail: u32 },
    #[error(transparent)]
    Socket(#[from] VmmClientError),
    #[error("its control socket is served by pid {peer}, not {pid}")]
    PeerMismatch { peer: i32, pid: i32 },
    #[error("GET /vm says the VM is {0}")]
    NotRunning(VmState),
}

/// A supervised VMM process.
pub(super) struct Proc {
    /// The VMM (under the jailer: opened once the jail's pid file names it).
    pub(super) vmm: OnceLock<Arc<Pidfd>>,
    /// The jailer (our child) when the VMM runs jailed.
    pub(super) jailer: Option<Pidfd>,
    /// Its control socket.
    pub(super) socket: VmmSocket,
    /// Set before hostd itself stops the VMM, so its exit is not a failure.
    pub(super) stopping: AtomicBool,
    pub(super) exited: watch::Receiver<bool>,
    /// The connection to the guest's agent, once made (readiness, or the first request
    /// after a re-adoption); replaced when it dropped.
    pub(super) agent: std::sync::Mutex<Option<crate::agent::AgentClient>>,
}

/// Which process an environment's VMM is and which uid serves its socket
/// (`envs/NAME/vmm.json`), for re-adoption after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
struct VmmRecord {
    process: ProcessId,
    uid: u32,
}

const VMM_RECORD: &str = "vmm.json";

impl Proc {
    /// SIGKILLs the VMM through its pidfd; the jailer then exits with 137. Before the VMM
    /// is known the jailer itself is killed (it has not started the VM yet). A process that
    /// is already gone is not signalled (ESRCH), whoever has its pid now.
    fn kill(&self) {
        let target = self.vmm.get().map(|v| &**v).or(self.jailer.as_ref());
        if let Some(p) = target {
            let _ = p.signal(libc::SIGKILL);
        }
    }
}

/// Whether `pid` is a live (non-zombie) process.
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3 (after the parenthesised name) is the state; Z and X are dead.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
        Err(_) => false,
    }
}

/// Reads an exit status the way docs/vmm.md defines them.
pub fn describe_exit(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        None => "genos-vmm disappeared".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(0), _) => "genos-vmm exited: the guest powered off".into(),
            (Some(1), _) => "genos-vmm exited with status 1 (internal VMM error)".into(),
            (Some(2), _) => {
                "genos-vmm exited with status 2 (bad arguments, configuration or files)".into()
            }
            (Some(3), _) => "genos-vmm exited with status 3 (the guest rebooted)".into(),
            (Some(4), _) => "genos-vmm exited with status 4 (triple fault)".into(),
            (Some(5), _) => "genos-vmm exited with status 5 (guest kernel panic)".into(),
            (Some(6), _) => "genos-vmm exited with status 6 (unhandled emulation failure)".into(),
            (Some(c), _) => format!("genos-vmm exited with status {c}"),
            (None, Some(sig)) => format!("genos-vmm was killed by signal {sig}"),
            (None, None) => "genos-vmm ended".into(),
        },
    }
}

/// Reads the jailer's exit status (docs/sandbox.md), with the last line it or the VMM wrote
/// on stderr where that says more.
pub fn describe_jailed_exit(status: Option<std::process::ExitStatus>, last_stderr: &str) -> String {
    use std::os::unix::process::ExitStatusExt;
    let Some(code) = status.and_then(|s| s.code()) else {
        return match status.and_then(|s| s.signal()) {
            Some(sig) => format!("genos-jailer was killed by signal {sig}"),
            None => describe_exit(status),
        };
    };
    match code {
        159 => "genos-vmm was killed by its seccomp filter (a system call outside its allow-list)"
            .into(),
        71 => format!("the jail could not be set up: {last_stderr}"),
        c if c > 128 => format!("genos-vmm was killed by signal {}", c - 128),
        c @ (1 | 2) if !last_stderr.is_empty() => {
            format!(
                "{}: {last_stderr}",
                describe_exit(Some(std::process::ExitStatus::from_raw(c << 8)))
            )
        }
        c => describe_exit(Some(std::process::ExitStatus::from_raw(c << 8))),
    }
}

/// The last non-empty line of `path` (at most 500 bytes of it).
pub(super) fn last_line(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(4096)..];
    let line = String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string();
    line.chars().take(500).collect()
}

/// A pidfd for the VMM pid `pid` named by the jail's pid file, checked to be genos-jailer's
/// child: the jailer is our unreaped child, so its pid is its own, and a process whose
/// parent it is (checked after the pidfd is open, confirmed alive through the pidfd after
/// the check) is the VMM it forked.
pub(super) fn jailed_vmm_pidfd(pid: i32, jailer_pid: i32) -> Result<Pidfd, SuperviseError> {
    let pidfd = Pidfd::open(pid)?;
    let parent = crate::pidfd::parent_pid(pid);
    if parent != Some(jailer_pid) || pidfd.signal(0).is_err() {
        return Err(SuperviseError::NotJailersChild {
            pid,
            parent,
            jailer: jailer_pid,
        });
    }
    Ok(pidfd)
}

fn read_vmm_record(env_dir: &Path) -> Option<VmmRecord> {
    let text = std::fs::read(env_dir.join(VMM_RECORD)).ok()?;
    serde_json::from_slice(&text).ok()
}

impl Orchestrator {
    /// Re-adopts `env`'s VMM when it is provably the one hostd started: the recorded
    /// process identity (pid, start time, boot) opens a pidfd, its control socket is served
    /// by the expected uid from that very pid, and it reports running or paused. Anything
    /// else fails the environment without signalling anyone.
    pub(super) async fn readopt(&self, env: &EnvRecord) -> Result<(), OrchError> {
        let (pidfd, socket) = match self.identify_vmm(env).await {
            Ok(found) => found,
            Err(why) => {
                let why = error_chain(&why);
                self.release_jail(&env.name);
                let reason = "its genos-vmm was gone when hostd restarted";
                tracing::warn!(env = env.name, why, "not re-adopted");
                self.transition(&env.name, EnvState::Failed, Some(reason))?;
                self.audit("hostd", "fail", &env.name, &format!("{reason} ({why})"))?;
                let _ = self.store().set_vmm(&env.name, None, None);
                return Ok(());
            }
        };
        let pid = pidfd.pid();
        let pidfd = Arc::new(pidfd);
        let (tx, rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            vmm: OnceLock::from(pidfd.clone()),
            jailer: None,
            socket: socket.clone(),
            stopping: false.into(),
            exited: rx,
            agent: std::sync::Mutex::new(None),
        });
        self.procs().insert(env.name.clone(), proc);
        self.audit(
            "hostd",
            "adopt",
            &env.name,
            &format!("re-adopted genos-vmm pid {pid}"),
        )?;
        let me = self.clone();
        let name = env.name.clone();
        tokio::spawn(async move {
            // Not our child: its pidfd polls readable when it ends.
            if let Err(e) = pidfd.exited().await {
                tracing::warn!(env = name, error = %e, "cannot wait on the adopted VMM");
            }
            me.on_vmm_exit(&name, describe_exit(None));
            let _ = tx.send(true);
        });
        if env.state == EnvState::Booting {
            let me = self.clone();
            let name = env.name.clone();
            tokio::spawn(async move { me.wait_ready(&name, &socket).await });
        } else if env.state == EnvState::Ready {
            self.stream_environment(&env.name, &socket).await;
        }
        Ok(())
    }

    /// The pidfd and control socket of `env`'s recorded VMM, or why it cannot be adopted.
    async fn identify_vmm(&self, env: &EnvRecord) -> Result<(Pidfd, VmmSocket), SuperviseError> {
        let dir = self.env_dir(&env.name);
        let record = read_vmm_record(&dir).ok_or(SuperviseError::NoRecord)?;
        let pid = record.process.pid;
        if env.vmm_pid != Some(pid) {
            return Err(SuperviseError::PidMismatch {
                pid,
                store: env.vmm_pid,
            });
        }
        let pidfd = record.process.open()?;
        let socket = match read_jail_record(&dir) {
            Some(jail) if jail.uid == record.uid => jailed_socket(&jail),
            Some(jail) => {
                return Err(SuperviseError::UidMismatch {
                    vmm: record.uid,
                    jail: jail.uid,
                })
            }
            None => unjailed_socket(&dir, record.uid),
        };
        let (peer, vm) = vmm_client::run(&socket, Duration::from_secs(3), |c| {
            let peer = c.peer();
            Ok((peer, c.describe()?))
        })
        .await?;
        if peer.pid != pid {
            return Err(SuperviseError::PeerMismatch {
                peer: peer.pid,
                pid,
            });
        }
        if !matches!(vm.state, VmState::Running | VmState::Paused) {
            return Err(SuperviseError::NotRunning(vm.state));
        }
        Ok((pidfd, socket))
    }

    /// Spawns `cmd` in its own process group (so a signal to hostd's group, e.g. Ctrl-C, does
    /// not reach the VMM, which must outlive a hostd restart) and supervises it: its exit is
    /// described by `describe` and fails the environment unless hostd asked for it.
    ///
    /// The child's pidfd is opened before anything waits for it, so it cannot have been
    /// reaped and its pid reused: it is the process just spawned.
    pub(super) fn spawn_supervised(
        &self,
        name: &str,
        mut cmd: std::process::Command,
        socket: VmmSocket,
        jailed: bool,
        describe: impl FnOnce(Option<std::process::ExitStatus>) -> String + Send + 'static,
    ) -> Result<Arc<Proc>, SuperviseError> {
        use std::os::unix::process::CommandExt as _;
        cmd.stdin(std::process::Stdio::null()).process_group(0);
        let program = cmd.get_program().to_string_lossy().into_owned();
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| SuperviseError::Start {
                program: program.clone(),
                source,
            })?;
        let pidfd = match child.id() {
            None => Err(SuperviseError::NoPid { program }),
            Some(pid) => {
                Pidfd::open(pid as i32).map_err(|source| SuperviseError::Hold { program, source })
            }
        };
        let pidfd = match pidfd {
            Ok(p) => p,
            Err(e) => {
                let _ = child.start_kill();
                return Err(e);
            }
        };
        let (tx, rx) = watch::channel(false);
        let proc = Arc::new(Proc {
            vmm: if jailed {
                OnceLock::new()
            } else {
                OnceLock::from(Arc::new(Pidfd::open(pidfd.pid()).inspect_err(|_| {
                    let _ = child.start_kill();
                })?))
            },
            jailer: jailed.then_some(pidfd),
            socket,
            stopping: false.into(),
            exited: rx,
            agent: std::sync::Mutex::new(None),
        });
        self.procs().insert(name.into(), proc.clone());
        let me = self.clone();
        let n = name.to_string();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let reason = describe(status);
            // Record the failure before anyone waiting on `exited` looks at the state.
            me.on_vmm_exit(&n, reason);
            let _ = tx.send(true);
        });
        Ok(proc)
    }

    /// Writes `envs/NAME/vmm.json` for the VMM behind `pidfd`; returns its pid.
    pub(super) fn record_vmm(
        &self,
        name: &str,
        proc: &Proc,
        pidfd: &Pidfd,
    ) -> Result<i32, SuperviseError> {
        let process = ProcessId::of(pidfd)?;
        let pid = process.pid;
        let record = VmmRecord {
            process,
            uid: proc.socket.uid,
        };
        let path = self.env_dir(name).join(VMM_RECORD);
        std::fs::write(&path, serde_json::to_vec(&record).expect("vmm record json"))
            .map_err(|source| SuperviseError::Write { path, source })?;
        Ok(pid)
    }

    fn on_vmm_exit(&self, name: &str, reason: String) {
        let proc = self.procs().remove(name);
        self.release_jail(name);
        let _ = std::fs::remove_file(self.env_dir(name).join(VMM_RECORD));
        let asked = proc
            .as_ref()
            .is_some_and(|p| p.stopping.load(Ordering::SeqCst));
        if asked {
            return;
        }
        let live = self.show(name).map(|e| e.state.is_live()).unwrap_or(false);
        if live {
            bump(&self.inner.counters.vmm_failures);
            self.fail(name, &reason);
            let _ = self.store().set_vmm(name, None, None);
        }
    }

    pub(super) fn kill_vmm(&self, name: &str) {
        if let Some(p) = self.procs().get(name) {
            p.stopping.store(true, Ordering::SeqCst);
            p.kill();
        }
    }

    /// Asks the VMM to stop over its socket; kills it if it has not exited in 5 s.
    pub(super) async fn halt_vmm(&self, env: &EnvRecord) {
        let proc = self.procs().get(&env.name).cloned();
        let Some(proc) = proc else { return };
        proc.stopping.store(true, Ordering::SeqCst);
        let stop = Request::Action(LifecycleAction::Stop);
        let _ = vmm_client::run(&proc.socket, Duration::from_secs(2), move |c| c.send(&stop)).await;
        let mut exited = proc.exited.clone();
        let waited = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !waited {
            proc.kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_are_described() {
        use std::os::unix::process::ExitStatusExt;
        let s = std::process::ExitStatus::from_raw(5 << 8);
        assert!(describe_exit(Some(s)).contains("kernel panic"));
        let s = std::process::ExitStatus::from_raw(9);
        assert_eq!(describe_exit(Some(s)), "genos-vmm was killed by signal 9");
    }

    #[test]
    fn jailer_statuses_name_seccomp_jail_and_signals() {
        use std::os::unix::process::ExitStatusExt;
        let code = |c: i32| Some(std::process::ExitStatus::from_raw(c << 8));
        let cases = [
            (
                159,
                "",
                "genos-vmm was killed by its seccomp filter (a system call outside its allow-list)",
            ),
            (
                71,
                "genos-jailer: mount /dev/kvm: Permission denied",
                "the jail could not be set up: genos-jailer: mount /dev/kvm: Permission denied",
            ),
            (137, "x", "genos-vmm was killed by signal 9"),
            (3, "x", "genos-vmm exited with status 3 (the guest rebooted)"),
            (
                2,
                "genos-vmm: kernel /images/k: not found",
                "genos-vmm exited with status 2 (bad arguments, configuration or files): genos-vmm: kernel /images/k: not found",
            ),
        ];
        for (status, stderr, want) in cases {
            assert_eq!(
                describe_jailed_exit(code(status), stderr),
                want,
                "status {status}"
            );
        }
    }

    #[test]
    fn pid_alive_sees_self_and_not_nonsense() {
        assert!(pid_alive(std::process::id() as i32));
        assert!(!pid_alive(0));
        assert!(!pid_alive(i32::MAX));
    }
}
