//! hostd's agent client against the real genos-agent, run as a host process on a Unix socket:
//! readiness as the agent reports it, processes with their output, stdin through flow
//! control, exit codes and timeouts, files both ways with their mode, and the agent's
//! refusals arriving as errors. Needs the workspace's genos-agent binary (skips with the
//! reason where it is not built).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostd::agent::{AgentAddress, AgentClient, AgentError, ExecOutput};
use proto::agent::{
    ErrorCode, ExecRequest, ExitStatus, Features, FileGetRequest, FilePutRequest, Stage,
};

/// A genos-agent process serving a Unix socket in a temporary directory.
struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the agent; `systemctl` is the program it asks for readiness.
    fn start(test: &str, systemctl: &Path) -> Option<Agent> {
        let bin = common::workspace_bin(test, "genos-agent", "GENOS_AGENT_BIN")?;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(bin)
            .args(["--no-vsock", "--unix"])
            .arg(&socket)
            .arg("--systemctl")
            .arg(systemctl)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        // Listening, not just bound: the socket file appears before listen(2).
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the agent never listened on its socket"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Some(Agent { child, dir })
    }

    fn address(&self) -> AgentAddress {
        AgentAddress::Unix(self.dir.path().join("agent.sock"))
    }

    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.address(), Duration::from_secs(10))
            .await
            .unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `systemctl` stand-in that says `starting` until `flag` exists, then `running`.
fn systemctl_until(dir: &Path, flag: &Path) -> PathBuf {
    let script = dir.join("systemctl");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ -e '{}' ]; then echo running; else echo starting; exit 1; fi\n",
            flag.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: "/".into(),
        ..ExecRequest::default()
    }
}

async fn run(client: &AgentClient, exec: ExecRequest) -> ExecOutput {
    client
        .exec(exec)
        .await
        .unwrap()
        .collect(1 << 20)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stage_rises_when_the_agent_reports_the_system_up() {
    let scratch = tempfile::tempdir().unwrap();
    let flag = scratch.path().join("up");
    let Some(agent) = Agent::start("stage", &systemctl_until(scratch.path(), &flag)) else {
        return;
    };
    let client = agent.client().await;
    let before = client.stage();

    std::fs::write(&flag, "").unwrap();
    let reached = tokio::time::timeout(
        Duration::from_secs(10),
        client.wait_for_stage(Stage::System),
    )
    .await
    .expect("the agent reports the system stage within 10 s")
    .unwrap();

    assert_eq!(before, Stage::Booting);
    assert_eq!(reached, Stage::System);
    assert!(client
        .info()
        .features
        .contains(Features::EXEC | Features::FILES));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_gives_its_output_and_exit_code_and_a_timeout_kills_it() {
    let Some(agent) = Agent::start("exec", Path::new("/bin/false")) else {
        return;
    };
    let client = agent.client().await;

    let (done, slow) = tokio::join!(
        run(&client, sh("echo out; echo err >&2; exit 3")),
        run(
            &client,
            ExecRequest {
                timeout_ms: 300,
                ..sh("sleep 30")
            }
        ),
    );

    assert_eq!(done.status, Some(ExitStatus::Code(3)));
    assert_eq!(
        (done.stdout.as_slice(), done.stderr.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    assert!(!done.timed_out);
    assert!(slow.timed_out, "{slow:?}");
    assert_eq!(slow.status, Some(ExitStatus::Signal(9)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_larger_than_the_window_goes_through_and_comes_back_whole() {
    let Some(agent) = Agent::start("stdin", Path::new("/bin/false")) else {
        return;
    };
    let client = agent.client().await;
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();

    let exec = client
        .exec(ExecRequest {
            stdin: true,
            ..sh("cat")
        })
        .await
        .unwrap();
    let stdin = exec.input();
    // Output is read while stdin is written: cat stops reading once its stdout is full.
    let (wrote, out) = tokio::join!(
        async {
            stdin.write(&input).await?;
            stdin.close().await
        },
        exec.collect(4 << 20)
    );
    wrote.unwrap();
    let out = out.unwrap();

    assert_eq!(out.status, Some(ExitStatus::Code(0)));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "cat gave back other bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_put_comes_back_from_a_get_with_its_mode() {
    let Some(agent) = Agent::start("files", Path::new("/bin/false")) else {
        return;
    };
    let client = agent.client().await;
    let target = agent.dir.path().join("data.bin");
    let content: Vec<u8> = (0..700_000u32).map(|i| (i * 7 % 256) as u8).collect();

    client
        .put_file(
            FilePutRequest {
                path: target.display().to_string(),
                mode: 0o640,
                size: content.len() as u64,
                as_root: true,
                ..FilePutRequest::default()
            },
            &mut content.as_slice(),
        )
        .await
        .unwrap();
    let mut back = Vec::new();
    let (size, mode) = client
        .get_file(
            FileGetRequest {
                path: target.display().to_string(),
                as_root: true,
                ..FileGetRequest::default()
            },
            &mut back,
            1 << 20,
        )
        .await
        .unwrap();
    let too_small = client
        .get_file(
            FileGetRequest {
                path: target.display().to_string(),
                as_root: true,
                ..FileGetRequest::default()
            },
            &mut Vec::new(),
            1000,
        )
        .await;

    assert_eq!((size, mode & 0o7777), (content.len() as u64, 0o640));
    assert!(back == content, "the file came back different");
    assert!(
        matches!(
            too_small,
            Err(AgentError::FileTooLarge {
                size: 700_000,
                limit: 1000
            })
        ),
        "{too_small:?}"
    );
    let after = run(&client, sh("echo still here")).await;
    assert_eq!(
        after.stdout, b"still here\n",
        "the connection survives a refused get"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_outside_the_home_is_refused_unless_asked_as_root() {
    let Some(agent) = Agent::start("refused", Path::new("/bin/false")) else {
        return;
    };
    let client = agent.client().await;
    let target = agent.dir.path().join("outside.txt");

    let refused = client
        .put_file(
            FilePutRequest {
                path: target.display().to_string(),
                mode: 0o600,
                size: 5,
                as_root: false,
                ..FilePutRequest::default()
            },
            &mut &b"hello"[..],
        )
        .await;

    assert!(
        matches!(
            &refused,
            Err(AgentError::Refused {
                code: ErrorCode::PermissionDenied,
                ..
            })
        ),
        "{refused:?}"
    );
    assert!(!target.exists(), "nothing was written");
}
