//! One process run for an Exec request: spawning it as the requested user in its own
//! process group, its pipes (non-blocking, driven by the server's poll loop), signals, the
//! timeout and its exit status.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent::{ErrorCode, ExecRequest, ExitStatus, OutputFd};

use crate::users::{Accounts, UserError};

/// `PATH` searched when the request's environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output pipes may stay open after the process exited (a background grandchild
/// holding them) before the exit is reported anyway.
pub const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Why a process was not started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("argv is empty")]
    EmptyArgv,
    #[error("{0:?} contains a NUL byte")]
    Nul(String),
    #[error(transparent)]
    User(#[from] UserError),
    #[error("the agent runs as uid {agent} and cannot start processes as {user} (uid {uid})")]
    NotRoot { agent: u32, user: String, uid: u32 },
    #[error("no {0:?} in PATH")]
    NotFound(String),
    #[error("starting {program}: {source}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ExecError {
    /// The protocol's error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            ExecError::EmptyArgv | ExecError::Nul(_) => ErrorCode::InvalidArgument,
            ExecError::User(UserError::NoSuchUser(_)) | ExecError::NotRoot { .. } => {
                ErrorCode::PermissionDenied
            }
            ExecError::User(UserError::Read { .. }) => ErrorCode::Io,
            ExecError::NotFound(_) => ErrorCode::NotFound,
            ExecError::Spawn { source, .. } if source.kind() == ErrorKind::NotFound => {
                ErrorCode::NotFound
            }
            ExecError::Spawn { .. } => ErrorCode::Io,
        }
    }
}

/// `program` as `execvp` would find it in `path`.
pub fn find_program(program: &str, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor we own; F_GETFL/F_SETFL touch only its flags.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

fn pipe_file(fd: impl Into<OwnedFd>) -> std::io::Result<File> {
    let file = File::from(fd.into());
    set_nonblocking(&file)?;
    Ok(file)
}

/// A running (or just ended) process of one request.
#[derive(Debug)]
pub struct Exec {
    pub pid: i32,
    stdin: Option<File>,
    stdin_buf: VecDeque<u8>,
    stdin_eof: bool,
    stdout: Option<File>,
    stderr: Option<File>,
    deadline: Option<Instant>,
    pub timed_out: bool,
    status: Option<(ExitStatus, Instant)>,
}

/// Outcome of reading one output pipe.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Data(Vec<u8>),
    /// Nothing to read now.
    Idle,
    /// The pipe closed.
    Closed,
}

impl Exec {
    /// Starts `req` (argv checked, user resolved from the account files, program found).
    pub fn spawn(req: &ExecRequest, accounts: &Accounts, now: Instant) -> Result<Exec, ExecError> {
        let Some(arg0) = req.argv.first() else {
            return Err(ExecError::EmptyArgv);
        };
        for s in req
            .argv
            .iter()
            .chain(req.env.iter().flat_map(|(k, v)| [k, v]))
            .chain([&req.cwd, &req.user])
        {
            if s.contains('\0') {
                return Err(ExecError::Nul(s.clone()));
            }
        }
        let user = accounts.resolve(&req.user)?;
        // SAFETY: getuid has no preconditions.
        let agent_uid = unsafe { libc::getuid() };
        let switch = agent_uid != user.uid || !req.user.is_empty() && agent_uid == 0;
        if switch && agent_uid != 0 {
            return Err(ExecError::NotRoot {
                agent: agent_uid,
                user: req.user.clone(),
                uid: user.uid,
            });
        }
        let path = req
            .env
            .iter()
            .rev()
            .find(|(k, _)| k == "PATH")
            .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
        let program = find_program(arg0, path).ok_or_else(|| ExecError::NotFound(arg0.clone()))?;
        let cwd = if req.cwd.is_empty() {
            user.home.clone()
        } else {
            PathBuf::from(&req.cwd)
        };

        let mut cmd = Command::new(&program);
        cmd.arg0(arg0)
            .args(&req.argv[1..])
            .env_clear()
            .envs(req.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&cwd)
            .stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
        // SAFETY: the closure runs in the forked child before exec and only makes system
        // calls (async-signal-safe); `groups` was allocated before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let empty: libc::sigset_t = std::mem::zeroed();
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                if switch
                    && (libc::setgroups(groups.len(), groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawn_err = |source| ExecError::Spawn {
            program: program.clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let pid = child.id() as i32;
        // The server reaps by pid (waitpid(-1), which also reaps orphans as PID 1), so the
        // Child handle is only a source of pipes; dropping it neither waits nor kills.
        let stdin = child.stdin.take().map(pipe_file).transpose();
        let stdout = child.stdout.take().map(pipe_file).transpose();
        let stderr = child.stderr.take().map(pipe_file).transpose();
        let (stdin, stdout, stderr) = match (stdin, stdout, stderr) {
            (Ok(i), Ok(o), Ok(e)) => (i, o, e),
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                kill_group(pid, libc::SIGKILL);
                return Err(spawn_err(e));
            }
        };
        Ok(Exec {
            pid,
            stdin,
            stdin_buf: VecDeque::new(),
            stdin_eof: false,
            stdout,
            stderr,
            deadline: (req.timeout_ms > 0)
                .then(|| now + Duration::from_millis(req.timeout_ms.into())),
            timed_out: false,
            status: None,
        })
    }

    /// The output pipe `fd`, while open.
    pub fn output_fd(&self, fd: OutputFd) -> Option<&File> {
        match fd {
            OutputFd::Stdout => self.stdout.as_ref(),
            OutputFd::Stderr => self.stderr.as_ref(),
        }
    }

    /// The stdin pipe while it has bytes to write.
    pub fn stdin_wants_write(&self) -> Option<&File> {
        self.stdin.as_ref().filter(|_| !self.stdin_buf.is_empty())
    }

    /// Whether stdin still takes bytes.
    pub fn stdin_open(&self) -> bool {
        self.stdin.is_some() && !self.stdin_eof
    }

    /// Reads at most `max` bytes from output pipe `fd`.
    pub fn read_output(&mut self, fd: OutputFd, max: usize) -> std::io::Result<Output> {
        let pipe = match fd {
            OutputFd::Stdout => &mut self.stdout,
            OutputFd::Stderr => &mut self.stderr,
        };
        let Some(file) = pipe.as_mut() else {
            return Ok(Output::Closed);
        };
        let mut buf = vec![0; max];
        match file.read(&mut buf) {
            Ok(0) => {
                *pipe = None;
                Ok(Output::Closed)
            }
            Ok(n) => {
                buf.truncate(n);
                Ok(Output::Data(buf))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                Ok(Output::Idle)
            }
            Err(e) => {
                *pipe = None;
                Err(e)
            }
        }
    }

    /// Queues stdin bytes (bounded by the request's flow-control window).
    pub fn queue_stdin(&mut self, data: &[u8]) {
        self.stdin_buf.extend(data);
    }

    /// Closes stdin once the queued bytes are written.
    pub fn stdin_eof(&mut self) {
        self.stdin_eof = true;
        if self.stdin_buf.is_empty() {
            self.stdin = None;
        }
    }

    /// Writes queued stdin; returns how many queued bytes are done with (written, or dropped
    /// because the process closed its stdin), for flow-control credit.
    pub fn flush_stdin(&mut self) -> usize {
        let mut done = 0;
        while let Some(file) = self.stdin.as_mut() {
            let (front, _) = self.stdin_buf.as_slices();
            if front.is_empty() {
                break;
            }
            match file.write(front) {
                Ok(n) => {
                    self.stdin_buf.drain(..n);
                    done += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // EPIPE: the process no longer reads stdin, as with any pipe.
                    done += self.stdin_buf.len();
                    self.stdin_buf.clear();
                    self.stdin = None;
                }
            }
        }
        if self.stdin_eof && self.stdin_buf.is_empty() {
            self.stdin = None;
        }
        done
    }

    /// Sends `signal` to the process group while the process has not been reaped.
    pub fn signal(&self, signal: i32) {
        if self.status.is_none() {
            kill_group(self.pid, signal);
        }
    }

    /// Records the process's wait status.
    pub fn exited(&mut self, status: ExitStatus, now: Instant) {
        self.status = Some((status, now));
        self.stdin = None;
    }

    /// Kills the group when the timeout passed; the exit is then reported as timed out.
    pub fn check_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.deadline {
            if now >= deadline {
                self.deadline = None;
                self.timed_out = true;
                // Also after the process exited: grandchildren may still hold its pipes.
                kill_group(self.pid, libc::SIGKILL);
            }
        }
    }

    /// When the request's timers next need a look.
    pub fn next_deadline(&self) -> Option<Instant> {
        let grace = self.status.map(|(_, at)| at + EXIT_GRACE);
        match (self.deadline, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The exit to report once the process was reaped and its output drained (or the grace
    /// after its exit is over).
    pub fn finished(&self, now: Instant) -> Option<ExitStatus> {
        let (status, at) = self.status?;
        let drained = self.stdout.is_none() && self.stderr.is_none();
        (drained || now >= at + EXIT_GRACE).then_some(status)
    }
}

/// Signals process group `pgid` (errors mean it is gone already).
pub fn kill_group(pgid: i32, signal: i32) {
    if pgid > 0 {
        // SAFETY: kill has no memory preconditions; a negative pid names the group.
        unsafe { libc::kill(-pgid, signal) };
    }
}

/// Converts a `waitpid` status.
pub fn exit_status(raw: i32) -> ExitStatus {
    if libc::WIFSIGNALED(raw) {
        ExitStatus::Signal(libc::WTERMSIG(raw))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(raw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_found_in_path_like_execvp() {
        assert_eq!(find_program("./x", ""), Some(PathBuf::from("./x")));
        assert_eq!(
            find_program("sh", "/nonexistent::/bin"),
            Some("/bin/sh".into())
        );
        assert_eq!(find_program("no-such-program-genos", DEFAULT_PATH), None);
    }

    #[test]
    fn wait_statuses_convert_to_codes_and_signals() {
        assert_eq!(exit_status(3 << 8), ExitStatus::Code(3));
        assert_eq!(exit_status(9), ExitStatus::Signal(9));
    }
}
