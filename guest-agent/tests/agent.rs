//! genos-agent as a host process over a Unix socket, driven through the protocol's own host
//! session (`proto::agent::HostSession`), as hostd's agent client will drive it.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::agent::session::HostSession;
use proto::agent::{
    AgentMessage, ClipboardContent, ErrorCode, ExecRequest, ExitStatus, FileGetRequest,
    FilePutRequest, Frame, HostMessage, Message, OutputFd, RequestId, Stage, INITIAL_WINDOW,
    MAX_CHUNK_LEN, MIME_TEXT_UTF8,
};
use testkit::{skip, Need};

/// A scratch directory with a home, a fake systemctl and the agent's socket.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("genos-agent-it-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("home")).unwrap();
        Scratch { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.join("home").canonicalize().unwrap()
    }
    /// A systemctl that answers `is-system-running` with `state`.
    fn systemctl(&self, state: &str) -> PathBuf {
        let path = self.dir.join("systemctl");
        std::fs::write(&path, format!("#!/bin/sh\necho {state}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running agent and one connection to it.
struct Agent {
    child: Child,
    stream: UnixStream,
    session: HostSession,
    next_id: u32,
    /// Frames read but not yet asked for, by request.
    pending: Vec<Frame<AgentMessage>>,
    /// Whether data is reported consumed as soon as it is read (a reader that keeps up).
    keep_up: bool,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(scratch: &Scratch, systemctl_state: &str, extra: &[&str]) -> Agent {
    start_in(&[], scratch, systemctl_state, extra)
}

/// Starts the agent under `wrapper` (e.g. `ip netns exec NS`), if any.
fn start_in(wrapper: &[&str], scratch: &Scratch, systemctl_state: &str, extra: &[&str]) -> Agent {
    let socket = scratch.dir.join("agent.sock");
    let agent = env!("CARGO_BIN_EXE_genos-agent");
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(agent);
            c
        }
        None => Command::new(agent),
    };
    let child = command
        .args(["--no-vsock", "--unix"])
        .arg(&socket)
        .arg("--systemctl")
        .arg(scratch.systemctl(systemctl_state))
        .arg("--session-socket")
        .arg(scratch.dir.join("session.sock"))
        .args(extra)
        .env("HOME", scratch.home())
        .stdin(Stdio::null())
        .spawn()
        .expect("start genos-agent");
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("agent socket {}: {e}", socket.display()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut agent = Agent {
        child,
        stream,
        session: HostSession::new(),
        next_id: 1,
        pending: Vec::new(),
        keep_up: true,
    };
    agent.flush();
    match agent.next_frame().message {
        AgentMessage::Hello { major: 1, .. } => {}
        other => panic!("expected the agent's Hello, got {other:?}"),
    }
    agent
}

impl Agent {
    fn flush(&mut self) {
        let out = self.session.take_output();
        self.stream.write_all(&out).unwrap();
    }

    fn send(&mut self, id: RequestId, m: HostMessage) {
        self.session.send(id, m).unwrap();
        self.flush();
    }

    fn request(&mut self, m: HostMessage) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        self.send(id, m);
        id
    }

    /// The next frame from the agent, whatever its request; data is reported consumed at
    /// once (this client never lags), so credit flows back.
    fn next_frame(&mut self) -> Frame<AgentMessage> {
        loop {
            if let Some(f) = self.session.poll().expect("agent speaks the protocol") {
                if let (
                    true,
                    AgentMessage::ExecOutput { data, .. } | AgentMessage::FileData(data),
                ) = (self.keep_up, &f.message)
                {
                    self.session.consumed(f.id, data.len());
                    self.flush();
                }
                return f;
            }
            let mut buf = [0u8; 65536];
            let n = self.stream.read(&mut buf).expect("read from the agent");
            assert!(n > 0, "agent closed the connection");
            self.session.receive(&buf[..n]);
        }
    }

    /// The next frame of request `id` (frames of other requests are kept for later).
    fn next_of(&mut self, id: RequestId) -> AgentMessage {
        if let Some(i) = self.pending.iter().position(|f| f.id == id) {
            return self.pending.remove(i).message;
        }
        loop {
            let f = self.next_frame();
            if f.id == id {
                return f.message;
            }
            self.pending.push(f);
        }
    }

    /// Runs an exec to its end: stdout, stderr, exit status, timed out.
    fn exec_output(&mut self, id: RequestId) -> (Vec<u8>, Vec<u8>, ExitStatus, bool) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        loop {
            match self.next_of(id) {
                AgentMessage::ExecStarted { .. } => {}
                AgentMessage::ExecOutput { fd, data } => match fd {
                    OutputFd::Stdout => out.extend(data),
                    OutputFd::Stderr => err.extend(data),
                },
                AgentMessage::ExecExit { status, timed_out } => {
                    return (out, err, status, timed_out)
                }
                other => panic!("exec {id}: unexpected {other:?}"),
            }
        }
    }

    fn put(&mut self, req: FilePutRequest, contents: &[u8]) -> AgentMessage {
        let id = self.request(HostMessage::FilePut(req));
        for chunk in contents.chunks(MAX_CHUNK_LEN) {
            while self.session.send_credit(id) < chunk.len() as u64 {
                // Waiting for credit: only an Error (the put refused) can arrive meanwhile.
                let f = self.next_frame();
                if f.id == id {
                    return f.message;
                }
                self.pending.push(f);
            }
            if !self.session.stream_open(id) {
                break;
            }
            self.send(id, HostMessage::FileData(chunk.to_vec()));
        }
        if self.session.stream_open(id) {
            self.send(id, HostMessage::FileEnd);
        }
        self.next_of(id)
    }

    fn get(&mut self, req: FileGetRequest) -> Result<(u32, Vec<u8>), AgentMessage> {
        let id = self.request(HostMessage::FileGet(req));
        let (size, mode) = match self.next_of(id) {
            AgentMessage::FileInfo { size, mode } => (size, mode),
            other => return Err(other),
        };
        let mut data = Vec::new();
        loop {
            match self.next_of(id) {
                AgentMessage::FileData(d) => data.extend(d),
                AgentMessage::FileEnd => break,
                other => panic!("get: unexpected {other:?}"),
            }
        }
        assert_eq!(data.len() as u64, size);
        Ok((mode, data))
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        ..ExecRequest::default()
    }
}

fn error_code(m: &AgentMessage) -> ErrorCode {
    match m {
        AgentMessage::Error { code, .. } => *code,
        other => panic!("expected an Error, got {other:?}"),
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn hello_is_followed_by_the_stage_and_ready_reaches_system_when_systemd_is_running() {
    let scratch = Scratch::new("ready");
    let mut agent = start(&scratch, "running", &[]);
    let mut stages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stages.contains(&Stage::System) && Instant::now() < deadline {
        match agent.next_of(RequestId::CONNECTION) {
            AgentMessage::Ready(stage) => stages.push(stage),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stages.last(), Some(&Stage::System));
    let id = agent.request(HostMessage::ReadyQuery);
    assert_eq!(agent.next_of(id), AgentMessage::Ready(Stage::System));
}

#[test]
fn ready_stays_below_system_while_systemd_is_starting() {
    let scratch = Scratch::new("starting");
    let mut agent = start(&scratch, "starting", &[]);
    assert_eq!(
        agent.next_of(RequestId::CONNECTION),
        AgentMessage::Ready(Stage::Booting)
    );
    std::thread::sleep(Duration::from_millis(700));
    let id = agent.request(HostMessage::ReadyQuery);
    assert_eq!(agent.next_of(id), AgentMessage::Ready(Stage::Booting));
}

#[test]
fn initramfs_agent_is_at_system_at_once() {
    let scratch = Scratch::new("initramfs");
    let mut agent = start(&scratch, "starting", &["--initramfs"]);
    assert_eq!(
        agent.next_of(RequestId::CONNECTION),
        AgentMessage::Ready(Stage::System)
    );
}

#[test]
fn exec_streams_stdin_stdout_stderr_and_reports_the_exit_code() {
    let scratch = Scratch::new("exec");
    let mut agent = start(&scratch, "running", &[]);
    let id = agent.request(HostMessage::Exec(ExecRequest {
        stdin: true,
        ..sh("tr a-z A-Z; echo oops >&2; exit 3")
    }));
    agent.send(id, HostMessage::ExecStdin(b"hello ".to_vec()));
    agent.send(id, HostMessage::ExecStdin(b"agent".to_vec()));
    agent.send(id, HostMessage::ExecStdinEof);
    let (out, err, status, timed_out) = agent.exec_output(id);
    assert_eq!(out, b"HELLO AGENT");
    assert_eq!(err, b"oops\n");
    assert_eq!((status, timed_out), (ExitStatus::Code(3), false));
}

#[test]
fn exec_runs_in_the_requested_directory_with_exactly_the_given_environment() {
    let scratch = Scratch::new("env");
    let mut agent = start(&scratch, "running", &[]);
    let mut req = sh("pwd; env | sort");
    req.env.push(("GENOS_X".into(), "1".into()));
    req.cwd = scratch.dir.display().to_string();
    let id = agent.request(HostMessage::Exec(req));
    let (out, _, status, _) = agent.exec_output(id);
    let out = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(status, ExitStatus::Code(0));
    assert_eq!(
        lines[0],
        scratch.dir.canonicalize().unwrap().to_str().unwrap()
    );
    assert!(lines.contains(&"GENOS_X=1") && lines.contains(&"PATH=/usr/bin:/bin"));
    assert!(!lines.iter().any(|l| l.starts_with("HOME=")), "{out}");
}

#[test]
fn a_missing_program_is_a_not_found_error() {
    let scratch = Scratch::new("missing");
    let mut agent = start(&scratch, "running", &[]);
    let id = agent.request(HostMessage::Exec(ExecRequest {
        argv: vec!["genos-no-such-program".into()],
        ..ExecRequest::default()
    }));
    assert_eq!(error_code(&agent.next_of(id)), ErrorCode::NotFound);
}

#[test]
fn exec_timeout_kills_the_whole_process_group() {
    let scratch = Scratch::new("timeout");
    let mut agent = start(&scratch, "running", &[]);
    let started = Instant::now();
    let id = agent.request(HostMessage::Exec(ExecRequest {
        timeout_ms: 300,
        ..sh("sleep 30 & echo $!; wait")
    }));
    let (out, _, status, timed_out) = agent.exec_output(id);
    assert_eq!((status, timed_out), (ExitStatus::Signal(9), true));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The background sleep was in the group too: gone, or a zombie awaiting its reaper.
    let pid = String::from_utf8(out).unwrap().trim().to_owned();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "sleep {pid} survived: {stat}"
    );
}

#[test]
fn exec_kill_sends_the_signal_asked_for() {
    let scratch = Scratch::new("kill");
    let mut agent = start(&scratch, "running", &[]);
    let id = agent.request(HostMessage::Exec(ExecRequest {
        argv: vec!["sleep".into(), "30".into()],
        ..ExecRequest::default()
    }));
    assert!(matches!(
        agent.next_of(id),
        AgentMessage::ExecStarted { .. }
    ));
    agent.send(id, HostMessage::ExecKill { signal: 15 });
    let (_, _, status, timed_out) = agent.exec_output(id);
    assert_eq!((status, timed_out), (ExitStatus::Signal(15), false));
}

#[test]
fn output_larger_than_the_window_arrives_whole_through_credit() {
    let scratch = Scratch::new("bulk");
    let mut agent = start(&scratch, "running", &[]);
    let id = agent.request(HostMessage::Exec(sh(
        "head -c 3000000 /dev/zero; echo end >&2",
    )));
    // A clipboard request in the middle of the stream is answered in between.
    let clip = agent.request(HostMessage::ClipboardGet {
        mime: MIME_TEXT_UTF8.into(),
    });
    let (out, err, status, _) = agent.exec_output(id);
    assert_eq!(out.len(), 3_000_000);
    assert!(out.iter().all(|&b| b == 0));
    assert_eq!(
        (err.as_slice(), status),
        (&b"end\n"[..], ExitStatus::Code(0))
    );
    assert_eq!(error_code(&agent.next_of(clip)), ErrorCode::NotSupported);
}

#[test]
fn a_host_that_stops_reading_stops_the_process_at_one_window() {
    let scratch = Scratch::new("slow");
    let mut agent = start(&scratch, "running", &[]);
    agent.keep_up = false;
    let id = agent.request(HostMessage::Exec(sh("head -c 5000000 /dev/zero")));
    let mut received = 0usize;
    agent
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let mut buf = [0u8; 65536];
        if let Ok(n) = agent.stream.read(&mut buf) {
            agent.session.receive(&buf[..n]);
        }
        while let Some(f) = agent.session.poll().unwrap() {
            if f.id != id {
                continue; // stage notifications
            }
            match f.message {
                AgentMessage::ExecOutput { data, .. } => received += data.len(),
                AgentMessage::ExecStarted { .. } => {}
                other => panic!("the process cannot have ended: {other:?}"),
            }
        }
    }
    assert_eq!(
        received, INITIAL_WINDOW as usize,
        "exactly one window, then nothing"
    );
    // Reading again lets it finish with nothing lost.
    agent.session.consumed(id, received);
    agent.flush();
    agent.keep_up = true;
    agent
        .stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (out, _, status, _) = agent.exec_output(id);
    assert_eq!(received + out.len(), 5_000_000);
    assert_eq!(status, ExitStatus::Code(0));
}

#[test]
fn a_put_file_comes_back_from_a_get_with_its_mode() {
    let scratch = Scratch::new("files");
    let mut agent = start(&scratch, "running", &[]);
    let path = scratch.home().join("notes.txt");
    let contents: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let reply = agent.put(
        FilePutRequest {
            path: path.display().to_string(),
            mode: 0o640,
            size: contents.len() as u64,
            ..FilePutRequest::default()
        },
        &contents,
    );
    assert_eq!(reply, AgentMessage::Done);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o640);
    assert_eq!(std::fs::read(&path).unwrap(), contents);
    let (mode, data) = agent
        .get(FileGetRequest {
            path: path.display().to_string(),
            ..FileGetRequest::default()
        })
        .unwrap();
    assert_eq!((mode, data), (0o640, contents));
    // Nothing but the file is left in the directory (the temporary file was renamed).
    assert_eq!(std::fs::read_dir(scratch.home()).unwrap().count(), 1);
}

#[test]
fn paths_outside_the_home_are_refused_unless_asked_as_root() {
    let scratch = Scratch::new("refused");
    let mut agent = start(&scratch, "running", &[]);
    let outside = scratch.dir.join("outside.txt");
    let req = FilePutRequest {
        path: outside.display().to_string(),
        mode: 0o600,
        size: 3,
        ..FilePutRequest::default()
    };
    let reply = agent.put(req.clone(), b"abc");
    assert_eq!(error_code(&reply), ErrorCode::PermissionDenied);
    assert!(!outside.exists());
    let get = agent.get(FileGetRequest {
        path: "/etc/passwd".into(),
        ..FileGetRequest::default()
    });
    assert_eq!(error_code(&get.unwrap_err()), ErrorCode::PermissionDenied);
    // The same put as root is allowed.
    let reply = agent.put(
        FilePutRequest {
            as_root: true,
            ..req
        },
        b"abc",
    );
    assert_eq!(reply, AgentMessage::Done);
    assert_eq!(std::fs::read(&outside).unwrap(), b"abc");
}

#[test]
fn a_put_shorter_than_announced_fails_and_leaves_no_file() {
    let scratch = Scratch::new("short");
    let mut agent = start(&scratch, "running", &[]);
    let path = scratch.home().join("short.bin");
    let reply = agent.put(
        FilePutRequest {
            path: path.display().to_string(),
            mode: 0o600,
            size: 10,
            ..FilePutRequest::default()
        },
        b"12345",
    );
    assert_eq!(error_code(&reply), ErrorCode::InvalidArgument);
    assert_eq!(std::fs::read_dir(scratch.home()).unwrap().count(), 0);
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let scratch = Scratch::new("limit");
    let mut agent = start(&scratch, "running", &["--max-file-size", "4"]);
    let reply = agent.put(
        FilePutRequest {
            path: scratch.home().join("big").display().to_string(),
            mode: 0o600,
            size: 5,
            ..FilePutRequest::default()
        },
        b"12345",
    );
    assert_eq!(error_code(&reply), ErrorCode::TooLarge);
}

#[test]
fn clipboard_and_display_without_a_session_part_are_refused_saying_so() {
    let scratch = Scratch::new("x11");
    let mut agent = start(&scratch, "running", &[]);
    let set = agent.request(HostMessage::ClipboardSet(ClipboardContent {
        mime: MIME_TEXT_UTF8.into(),
        data: b"x".to_vec(),
    }));
    let mode = agent.request(HostMessage::DisplaySetMode {
        width: 800,
        height: 600,
    });
    for id in [set, mode] {
        match agent.next_of(id) {
            AgentMessage::Error { code, message } => {
                assert_eq!(code, ErrorCode::NotSupported);
                assert!(
                    message.contains("no desktop session is connected"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn an_unknown_major_version_is_refused_with_a_clear_error() {
    let scratch = Scratch::new("version");
    let socket = scratch.dir.join("agent.sock");
    let agent = start(&scratch, "running", &[]);
    let mut raw = UnixStream::connect(&socket).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&Frame::new(RequestId(0), HostMessage::Hello { major: 9, minor: 0 }).to_bytes())
        .unwrap();
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).unwrap();
    let frame = Frame::<AgentMessage>::decode_body(&reply[4..]).unwrap();
    match frame.message {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::UnsupportedVersion);
            assert!(message.contains("9.x"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    drop(agent);
}

/// An account file set with one user, `genostest` (uid/gid 4242), home in the scratch dir.
fn test_accounts(scratch: &Scratch) -> (PathBuf, PathBuf) {
    let etc = scratch.dir.join("etc");
    std::fs::create_dir_all(&etc).unwrap();
    let home = scratch.dir.join("genostest");
    std::fs::create_dir_all(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(4242), Some(4242)).unwrap();
    std::fs::set_permissions(&scratch.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        etc.join("passwd"),
        format!(
            "root:x:0:0:root:/root:/bin/sh\ngenostest:x:4242:4242::{}:/bin/sh\n",
            home.display()
        ),
    )
    .unwrap();
    std::fs::write(
        etc.join("group"),
        "genostest:x:4242:\nextra:x:4343:genostest\n",
    )
    .unwrap();
    (etc, home)
}

#[test]
fn exec_as_a_user_takes_its_uid_gid_groups_and_home() {
    if !is_root() {
        return skip(Need::Root, "exec as another user needs root");
    }
    let scratch = Scratch::new("user");
    let (etc, home) = test_accounts(&scratch);
    let mut agent = start(&scratch, "running", &["--etc", etc.to_str().unwrap()]);
    let id = agent.request(HostMessage::Exec(ExecRequest {
        user: "genostest".into(),
        ..sh("id -u; id -g; id -G; pwd")
    }));
    let (out, err, status, _) = agent.exec_output(id);
    assert_eq!(
        status,
        ExitStatus::Code(0),
        "{}",
        String::from_utf8_lossy(&err)
    );
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("4242\n4242\n4242 4343\n{}\n", home.display())
    );
    let id = agent.request(HostMessage::Exec(ExecRequest {
        user: "nobody-here".into(),
        ..sh("true")
    }));
    assert_eq!(error_code(&agent.next_of(id)), ErrorCode::PermissionDenied);
}

#[test]
fn a_put_for_a_user_is_owned_by_that_user() {
    if !is_root() {
        return skip(Need::Root, "chown to another user needs root");
    }
    let scratch = Scratch::new("owner");
    let (etc, home) = test_accounts(&scratch);
    let mut agent = start(&scratch, "running", &["--etc", etc.to_str().unwrap()]);
    let path = home.join("mine.txt");
    let reply = agent.put(
        FilePutRequest {
            path: path.display().to_string(),
            user: "genostest".into(),
            mode: 0o600,
            size: 2,
            as_root: false,
        },
        b"ok",
    );
    assert_eq!(reply, AgentMessage::Done);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (4242, 4242, 0o600)
    );
    // That user's home does not reach the scratch directory's other files.
    let reply = agent.put(
        FilePutRequest {
            path: scratch.dir.join("x").display().to_string(),
            user: "genostest".into(),
            mode: 0o600,
            size: 1,
            as_root: false,
        },
        b"x",
    );
    assert_eq!(error_code(&reply), ErrorCode::PermissionDenied);
}

#[test]
fn time_set_sets_the_clock() {
    if !is_root() {
        return skip(Need::Root, "setting the clock needs root");
    }
    let scratch = Scratch::new("time");
    let mut agent = start(&scratch, "running", &[]);
    // Today's time (plus the few milliseconds the request takes): the host clock barely moves.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let id = agent.request(HostMessage::TimeSet {
        utc_ns: now + 2_000_000,
    });
    assert_eq!(agent.next_of(id), AgentMessage::Done);
}

/// A network namespace with a veth pair (`ga0` and its peer `ga1`), removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> Option<Netns> {
        let name = format!("genos-agent-test-{}", std::process::id());
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns(name);
        let ok = ip(&[
            "-n", &ns.0, "link", "add", "ga0", "type", "veth", "peer", "name", "ga1",
        ]) && ip(&["-n", &ns.0, "link", "set", "ga1", "up"]);
        ok.then_some(ns)
    }
    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn network_configure_sets_address_route_and_resolver_in_a_network_namespace() {
    if !is_root() {
        return skip(Need::Root, "network namespaces need root");
    }
    let Some(ns) = Netns::new() else {
        return skip(Need::Tools, "ip netns with a veth pair could not be set up");
    };
    let scratch = Scratch::new("net");
    let resolv = scratch.dir.join("resolv.conf");
    let mut agent = start_in(
        &["ip", "netns", "exec", &ns.0],
        &scratch,
        "running",
        &["--resolv-conf", resolv.to_str().unwrap()],
    );
    let net = |interface: &str| {
        HostMessage::NetworkConfigure(proto::agent::NetworkConfig {
            interface: interface.into(),
            address: "10.77.0.2".parse().unwrap(),
            prefix: 24,
            gateway: Some("10.77.0.1".parse().unwrap()),
            resolvers: vec!["10.77.0.53".parse().unwrap()],
        })
    };
    let id = agent.request(net("ga0"));
    assert_eq!(agent.next_of(id), AgentMessage::Done);
    assert!(ns
        .ip(&["addr", "show", "ga0"])
        .contains("inet 10.77.0.2/24"));
    assert!(ns.ip(&["route"]).contains("default via 10.77.0.1 dev ga0"));
    assert!(std::fs::read_to_string(&resolv)
        .unwrap()
        .contains("nameserver 10.77.0.53\n"));
    // Applying the same plan again (after a restore) is not an error.
    let id = agent.request(net("ga0"));
    assert_eq!(agent.next_of(id), AgentMessage::Done);
    // A missing interface fails with ip's own words.
    let id = agent.request(net("nosuch0"));
    match agent.next_of(id) {
        AgentMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::Io);
            assert!(message.contains("nosuch0"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}
