//! genos-agent as PID 1 of a real Linux guest on genos-vmm, reached by hostd's agent client
//! through the VM's virtio-vsock device (`--vsock 3:SOCKET`, `CONNECT 1024`): its Hello, the
//! `system` stage, an exec of a static program (the agent's own binary, `--version`) and a
//! file put, then got back identical; and the same guest as a hostd environment (jailed when
//! root), ready only through its agent, with a command and a file through the orchestrator;
//! and a `nat` environment whose guest gets its address from hostd through the agent and
//! reaches a server in another network namespace.
//!
//! The images are genos-image's TEST-ONLY `nested-test` flavour (`GENOS_TEST_KERNEL`,
//! `GENOS_TEST_INITRAMFS`, exported by `scripts/test`): a kernel with the system-call shim this
//! machine's nested KVM needs (image-builder/src/nested_test/) and the static agent as PID 1
//! (`/init` execs it).
//! Slow by nature here: the guest kernel is interpreted (the agent answers ~70 s after genos-vmm
//! starts on an idle machine), and every guest system call costs ~1.2 ms. Skipped, saying why, without the images or `/dev/kvm`; failed
//! instead under `GENOS_REQUIRE` (CI). The console and the VMM's log stay in
//! `target/tmp/agent-vsock-guest/` and their tails are printed when the test fails.

mod common;

use std::fs::File;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostd::agent::{AgentAddress, AgentClient, AgentError};
use hostd::uds::VmmSocket;
use proto::agent::{ExecRequest, ExitStatus, Features, FileGetRequest, FilePutRequest, Stage};

const TEST: &str = "the_agent_as_pid1_of_a_real_guest_answers_hostd_over_vsock";
/// Until the agent answers: the kernel reaches `/init` in ~45 s of guest time (the agent
/// answers ~70 s after the VMM starts) on an idle machine, several times that when loaded.
const BOOT_LIMIT: Duration = Duration::from_secs(1200);
/// Each step after that (a few hundred guest system calls at ~1.2 ms, plus the exec's faults).
const STEP_LIMIT: Duration = Duration::from_secs(300);
/// One connection attempt: CONNECT, the guest's answer and the Hello exchange.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(60);
const GUEST_CID: u32 = 3;
/// Spans many vsock packets (the guest's receive buffers are 4 KiB) and several agent chunks.
const FILE_LEN: usize = 200_000;
/// What `genos cp` moves each way: far above the admin socket's 64 KiB buffered bodies.
const COPY_LEN: usize = 1 << 20;
const LOG_TAIL_LINES: usize = 40;

/// The nested-test kernel and initramfs from the environment, or `None` after skipping.
fn test_images() -> Option<(PathBuf, PathBuf)> {
    let var = |name: &str| {
        let path = std::env::var_os(name).filter(|p| !p.is_empty());
        if path.is_none() {
            testkit::skip(
                testkit::Need::Kernel,
                format!(
                    "{TEST}: {name} is not set (scripts/test builds `genos-image kernel \
                     --flavour nested-test` and its initramfs and sets it)"
                ),
            );
        }
        path.map(PathBuf::from)
    };
    let kernel = var("GENOS_TEST_KERNEL")?;
    let initramfs = var("GENOS_TEST_INITRAMFS")?;
    Some((kernel, initramfs))
}

/// A genos-vmm process booting the images; stopped when dropped, and when the test fails
/// the tails of its log and of the guest console are printed.
struct Guest {
    child: Child,
    console: PathBuf,
    vmm_log: PathBuf,
}

impl Guest {
    fn boot(vmm: &Path, kernel: &Path, initramfs: &Path, dir: &Path) -> Guest {
        let console = dir.join("console.log");
        let vmm_log = dir.join("vmm.log");
        let vsock = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&vsock);
        let log = File::create(&vmm_log).unwrap();
        let child = Command::new(vmm)
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initramfs)
            .arg("--vsock")
            .arg(format!("{GUEST_CID}:{}", vsock.display()))
            .args(["--cpu-template", "baseline", "--mem-mib", "256"])
            .arg("--serial")
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn genos-vmm");
        Guest {
            child,
            console,
            vmm_log,
        }
    }

    /// Panics with the VMM's exit status if it has ended.
    fn check_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("genos-vmm ended before the agent answered: {status}");
        }
    }

    /// The console line where the kernel starts `/init` (its printk time is the guest time).
    fn init_line(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.console).ok()?;
        text.lines()
            .find(|l| l.contains("Run /init as init process"))
            .map(|l| l.trim().to_owned())
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("({e})"));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, not reaped yet (it is reaped below).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if std::thread::panicking() {
            eprintln!(
                "{TEST}: guest console ({}), last lines:\n{}\n{TEST}: genos-vmm log ({}), \
                 last lines:\n{}",
                self.console.display(),
                tail(&self.console),
                self.vmm_log.display(),
                tail(&self.vmm_log)
            );
        }
    }
}

/// Connects to the agent through the VM's vsock socket, retrying until it listens.
async fn wait_for_agent(guest: &mut Guest, socket: &Path, started: Instant) -> AgentClient {
    let address = AgentAddress::vm(VmmSocket::unjailed(socket));
    let mut attempts = 0u32;
    let mut last: Option<AgentError> = None;
    loop {
        guest.check_running();
        let elapsed = started.elapsed();
        assert!(
            elapsed < BOOT_LIMIT,
            "the agent did not answer over vsock within {} s ({attempts} attempts; last: {})",
            BOOT_LIMIT.as_secs(),
            last.map_or("none".into(), |e| e.to_string())
        );
        if socket.exists() {
            attempts += 1;
            match AgentClient::connect(&address, ATTEMPT_LIMIT).await {
                Ok(client) => {
                    eprintln!(
                        "{TEST}: the agent answered over vsock {:.1} s after genos-vmm \
                         started (attempt {attempts}); kernel: {}",
                        started.elapsed().as_secs_f64(),
                        guest
                            .init_line()
                            .as_deref()
                            .unwrap_or("no `Run /init` line")
                    );
                    return client;
                }
                Err(e) => last = Some(e),
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Runs one step within [`STEP_LIMIT`], printing how long it took.
async fn step<T>(name: &str, work: impl Future<Output = T>) -> T {
    step_within(STEP_LIMIT, name, work).await
}

/// [`step`] with its own limit.
async fn step_within<T>(limit: Duration, name: &str, work: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| panic!("{name}: no answer within {} s", limit.as_secs()));
    eprintln!(
        "{}: {name}: {:.0} ms",
        common::test_name(),
        started.elapsed().as_secs_f64() * 1000.0
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_as_pid1_of_a_real_guest_answers_hostd_over_vsock() {
    let Some((kernel, initramfs)) = test_images() else {
        return;
    };
    if !common::kvm_available(TEST) {
        return;
    }
    let Some(vmm) = common::vmm_bin(TEST) else {
        return;
    };
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-vsock-guest");
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vsock.sock");
    let content: Vec<u8> = (0..FILE_LEN as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let started = Instant::now();
    let mut guest = Guest::boot(&vmm, &kernel, &initramfs, &dir);

    let client = wait_for_agent(&mut guest, &socket, started).await;
    let info = client.info().clone();
    let stage = step("system stage", client.wait_for_stage(Stage::System))
        .await
        .unwrap();
    let version = step("exec /sbin/genos-agent --version", async {
        client
            .exec(ExecRequest {
                argv: vec!["/sbin/genos-agent".into(), "--version".into()],
                cwd: "/".into(),
                ..ExecRequest::default()
            })
            .await?
            .collect(1 << 16)
            .await
    })
    .await
    .unwrap();
    step(
        &format!("put {FILE_LEN} bytes"),
        client.put_file(
            FilePutRequest {
                path: "/root/put.bin".into(),
                mode: 0o640,
                size: content.len() as u64,
                ..FilePutRequest::default()
            },
            &mut content.as_slice(),
        ),
    )
    .await
    .unwrap();
    let mut back = Vec::new();
    let (size, mode) = step(
        &format!("get {FILE_LEN} bytes"),
        client.get_file(
            FileGetRequest {
                path: "/root/put.bin".into(),
                ..FileGetRequest::default()
            },
            &mut back,
            1 << 20,
        ),
    )
    .await
    .unwrap();

    assert!(info.agent.starts_with("genos-agent "), "{info:?}");
    assert!(
        info.features.contains(Features::EXEC | Features::FILES),
        "{info:?}"
    );
    assert_eq!(stage, Stage::System);
    assert_eq!(version.status, Some(ExitStatus::Code(0)), "{version:?}");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("{}\n", info.agent),
        "the agent's binary, run in the guest, names the agent that answered"
    );
    assert_eq!((size, mode & 0o7777), (FILE_LEN as u64, 0o640));
    assert!(back == content, "the file came back different");
    eprintln!(
        "{TEST}: all steps done {:.1} s after genos-vmm started",
        started.elapsed().as_secs_f64()
    );
}

/// hostd's orchestrator on the nested-test images, ready through the agent (jailed when run
/// as root, as in production), with `adjust` applied to its configuration; `None` after
/// skipping (no images, no KVM, no genos-vmm), saying why.
async fn test_image_orchestrator(
    test: &str,
    dir: &Path,
    adjust: impl FnOnce(String) -> String,
) -> Option<hostd::orchestrator::Orchestrator> {
    let (kernel, initramfs) = test_images()?;
    if !common::kvm_available(test) {
        return None;
    }
    let vmm = common::vmm_bin(test)?;
    let toml = common::config_toml(&vmm, &kernel, 4, 4096)
        .replace(
            "build_rootfs = false",
            &format!(
                "build_rootfs = false\ninitramfs = \"{}\"",
                initramfs.display()
            ),
        )
        .replace("ready = \"boot\"", "ready = \"agent\"")
        .replace("cpu_template = \"host\"", "cpu_template = \"baseline\"")
        .replace(
            "boot_timeout_s = 120",
            &format!("boot_timeout_s = {}", BOOT_LIMIT.as_secs()),
        );
    let o = common::orchestrator(dir, &adjust(toml));
    o.start().await.unwrap();
    Some(o)
}

/// Creates `spec` and waits (up to [`BOOT_LIMIT`]) until it is in `state`, printing how long
/// that took.
async fn create_until(
    o: &hostd::orchestrator::Orchestrator,
    spec: proto::spec::Spec,
    state: hostd::store::EnvState,
) -> hostd::store::EnvRecord {
    let (name, started) = (spec.name.clone(), Instant::now());
    o.create(spec, "test").unwrap();
    let env = common::wait_state(o, &name, state, BOOT_LIMIT.as_secs()).await;
    eprintln!(
        "{}: {name} {} {:.1} s after create",
        common::test_name(),
        env.state.as_str(),
        started.elapsed().as_secs_f64()
    );
    env
}

/// hostd's admin socket for `o`, served by this test process, at `dir/admin.sock`.
async fn serve_admin(
    o: &hostd::orchestrator::Orchestrator,
    dir: &Path,
) -> (
    PathBuf,
    tokio::task::JoinHandle<Result<(), hostd::admin::AdminError>>,
) {
    let admin = dir.join("admin.sock");
    let policy = hostd::admin::AccessPolicy::new("genos");
    let listener = hostd::admin::bind(&admin, &policy).await.unwrap();
    (
        admin,
        tokio::spawn(hostd::admin::serve_on(o.clone(), listener, policy)),
    )
}

/// Runs the `genos` CLI against the admin socket `admin`, off the async workers.
async fn genos(admin: &Path, args: &[&str]) -> std::process::Output {
    let admin = admin.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_genos"))
            .env("GENOS_SOCKET", &admin)
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

/// The same guest through the whole product path: hostd's orchestrator boots it (jailed
/// when running as root, as in production), calls it ready only when its agent reports the
/// system stage over vsock, and runs a command and moves a file in it through the agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_is_ready_through_its_agent_and_runs_commands_in_its_guest() {
    const ORCH_TEST: &str = "an_environment_is_ready_through_its_agent";
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = test_image_orchestrator(ORCH_TEST, dir.path(), |t| t).await else {
        return;
    };
    let ready = create_until(
        &o,
        common::headless_spec("guest", true),
        hostd::store::EnvState::Ready,
    )
    .await;
    let uname = step(
        "orchestrator exec",
        o.exec(
            "guest",
            "test",
            ExecRequest {
                argv: vec!["/sbin/genos-agent".into(), "--version".into()],
                cwd: "/".into(),
                ..ExecRequest::default()
            },
            None,
            STEP_LIMIT,
        ),
    )
    .await
    .unwrap();
    step(
        "orchestrator put",
        o.put_file(
            "guest",
            "test",
            FilePutRequest {
                path: "/root/hello.txt".into(),
                mode: 0o600,
                ..FilePutRequest::default()
            },
            b"hello from hostd\n",
        ),
    )
    .await
    .unwrap();
    let (back, mode) = step(
        "orchestrator get",
        o.get_file(
            "guest",
            "test",
            FileGetRequest {
                path: "/root/hello.txt".into(),
                ..FileGetRequest::default()
            },
            1 << 10,
        ),
    )
    .await
    .unwrap();
    // `genos cp` both ways through the admin socket, with a file larger than any buffered
    // admin request body.
    let (admin, server) = serve_admin(&o, dir.path()).await;
    let big: Vec<u8> = (0..COPY_LEN).map(|i| (i * 7 % 251) as u8).collect();
    let (local, back_path) = (dir.path().join("big.bin"), dir.path().join("back.bin"));
    std::fs::write(&local, &big).unwrap();
    let (local_arg, back_arg) = (local.display().to_string(), back_path.display().to_string());
    let copied_in = step(
        "genos cp in",
        genos(
            &admin,
            &["cp", "--mode", "640", &local_arg, "guest:/root/big.bin"],
        ),
    )
    .await;
    let copied_out = step(
        "genos cp out",
        genos(&admin, &["cp", "guest:/root/big.bin", &back_arg]),
    )
    .await;
    server.abort();
    let entries: Vec<_> = o
        .audit_entries(200)
        .unwrap()
        .into_iter()
        .filter(|e| e.target == "guest")
        .collect();
    let audited: Vec<String> = entries.iter().map(|e| e.action.clone()).collect();
    let ready_detail = entries
        .iter()
        .find(|e| e.action == "ready")
        .map(|e| e.detail.clone())
        .unwrap_or_default();
    o.destroy("guest", "test").await.unwrap();

    assert_eq!(
        uname.status,
        Some(ExitStatus::Code(0)),
        "{uname:?} ({ready:?})"
    );
    assert!(
        String::from_utf8_lossy(&uname.stdout).starts_with("genos-agent "),
        "{uname:?}"
    );
    assert_eq!(
        (back.as_slice(), mode & 0o7777),
        (&b"hello from hostd\n"[..], 0o600)
    );
    assert!(
        copied_in.status.success() && copied_out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&copied_in.stderr),
        String::from_utf8_lossy(&copied_out.stderr)
    );
    assert!(
        std::fs::read(&back_path).unwrap() == big,
        "the copy came back different"
    );
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&back_path).unwrap().permissions()
        ) & 0o777,
        0o640
    );
    assert!(
        ready_detail.contains("(clock set)"),
        "the guest's clock is set at ready: {ready_detail}"
    );
    for action in ["ready", "exec", "file-put", "file-get"] {
        assert!(
            audited.iter().any(|a| a == action),
            "{action} not audited: {audited:?}"
        );
    }
}

/// A desktop is ready only when its agent reports the session: the test guest's agent (PID
/// 1 of an initramfs, no display server) reaches `system` only, so a graphical environment
/// fails once `session_timeout_s` passed after that, saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_whose_session_never_starts_fails_saying_so() {
    const SESSION_TEST: &str = "a_desktop_whose_session_never_starts";
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = test_image_orchestrator(SESSION_TEST, dir.path(), |toml| {
        toml.replace("[vmm]\n", "[vmm]\nsession_timeout_s = 5\n")
    })
    .await
    else {
        return;
    };
    let mut spec = common::headless_spec("desk", true);
    spec.desktop = "xfce".into();
    let failed = create_until(&o, spec, hostd::store::EnvState::Failed).await;

    assert_eq!(
        failed.reason.as_deref(),
        Some("the guest's desktop session did not start within 5 s (the agent reports system)")
    );
    let _ = o.destroy("desk", "test").await;
}

/// A network namespace standing in for the world outside the host, reached from the host
/// through a veth pair on the documentation network 198.51.100.0/24 (this machine only; not
/// 192.0.2.0/24, which CI machines use for their own uplink), with an HTTP server answering
/// one fixed body. Removed on drop.
struct OutsideServer {
    netns: String,
    host_veth: String,
}

impl OutsideServer {
    const HOST_ADDR: &'static str = "198.51.100.1/24";
    const SERVER_ADDR: &'static str = "198.51.100.10";
    const PORT: u16 = 8080;
    const BODY: &'static str = "hello from the other namespace\n";

    fn start() -> Self {
        let routes = Command::new("ip").args(["-4", "route"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&routes.stdout).contains("198.51.100."),
            "this host already routes 198.51.100.0/24; the test needs it free"
        );
        let tag = std::process::id() % 10_000;
        let server = OutsideServer {
            netns: format!("gt-out-{tag}"),
            host_veth: format!("gto-h{tag}"),
        };
        let peer = format!("gto-s{tag}");
        let ns = server.netns.clone();
        let server_addr = format!("{}/24", Self::SERVER_ADDR);
        for args in [
            vec!["netns", "add", &ns],
            vec!["-n", &ns, "link", "set", "lo", "up"],
            vec![
                "link",
                "add",
                &server.host_veth,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                &ns,
            ],
            vec!["addr", "add", Self::HOST_ADDR, "dev", &server.host_veth],
            vec!["link", "set", &server.host_veth, "up"],
            vec!["-n", &ns, "addr", "add", &server_addr, "dev", &peer],
            vec!["-n", &ns, "link", "set", &peer, "up"],
        ] {
            let status = Command::new("ip").args(&args).status().unwrap();
            assert!(status.success(), "ip {args:?}");
        }
        let path = format!("/var/run/netns/{ns}");
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap();
            // SAFETY: the descriptor is open for the call; setns changes only this thread's
            // network namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}");
            let listener =
                std::net::TcpListener::bind((OutsideServer::SERVER_ADDR, OutsideServer::PORT))
                    .unwrap();
            bound_tx.send(()).unwrap();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut request = [0u8; 1024];
                let _ = std::io::Read::read(&mut conn, &mut request);
                let body = OutsideServer::BODY;
                let _ = std::io::Write::write_all(
                    &mut conn,
                    format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
            }
        });
        bound_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        server
    }
}

impl Drop for OutsideServer {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// `genos up` on a headless sentence (NAT by default): the guest gets the address hostd
/// planned through its agent, and `genos exec` fetches a page from a server outside the
/// host's own namespace (a namespace on this machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_guest_is_configured_by_hostd_and_reaches_a_server_outside() {
    const NAT_TEST: &str = "a_nat_guest_is_configured_by_hostd";
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(
            testkit::Need::Root,
            format!("{NAT_TEST}: network namespaces and the jailer need root"),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(o) = test_image_orchestrator(NAT_TEST, dir.path(), |t| t).await else {
        return;
    };
    let outside = OutsideServer::start();
    let (admin, server) = serve_admin(&o, dir.path()).await;
    let started = Instant::now();

    let up = step_within(
        BOOT_LIMIT,
        "genos up",
        genos(
            &admin,
            &[
                "up",
                "--timeout",
                &BOOT_LIMIT.as_secs().to_string(),
                "headless python, 1 core, 128 MB ram, for 1 hour",
            ],
        ),
    )
    .await;
    eprintln!(
        "{NAT_TEST}: genos up returned {:.1} s after it started",
        started.elapsed().as_secs_f64()
    );
    let url = format!(
        "http://{}:{}/",
        OutsideServer::SERVER_ADDR,
        OutsideServer::PORT
    );
    // Not `-q -T`: this busybox (1.35) segfaults with them.
    let fetched = step(
        "genos exec wget",
        genos(
            &admin,
            &[
                "exec",
                "python",
                "--",
                "/bin/busybox",
                "wget",
                "-O",
                "-",
                &url,
            ],
        ),
    )
    .await;
    let addresses = step(
        "genos exec ip addr",
        genos(
            &admin,
            &[
                "exec", "python", "--", "/bin/ip", "-4", "addr", "show", "dev", "eth0",
            ],
        ),
    )
    .await;
    let resolv = step(
        "genos exec cat resolv.conf",
        genos(
            &admin,
            &[
                "exec",
                "python",
                "--",
                "/bin/busybox",
                "cat",
                "/etc/resolv.conf",
            ],
        ),
    )
    .await
    .stdout;
    let ready_detail = o
        .audit_entries(200)
        .unwrap()
        .into_iter()
        .find(|e| e.target == "python" && e.action == "ready")
        .map(|e| e.detail)
        .unwrap_or_default();
    server.abort();
    o.destroy("python", "test").await.unwrap();
    drop(outside);

    assert!(
        up.status.success(),
        "{}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("full internet access through NAT (default)"),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    let planned = ready_detail
        .split("network eth0 ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("no network in the ready entry: {ready_detail}"))
        .to_owned();
    assert!(planned.starts_with("10.201."), "{ready_detail}");
    // The namespace's resolver on the gateway (the host has a nameserver to forward to).
    let gateway = ready_detail
        .split(" via ")
        .nth(1)
        .and_then(|rest| rest.split([',', ')']).next())
        .unwrap_or_default()
        .to_owned();
    assert!(
        ready_detail.contains(&format!("resolver {gateway}")),
        "{ready_detail}"
    );
    assert!(
        String::from_utf8_lossy(&resolv).contains(&format!("nameserver {gateway}")),
        "{}",
        String::from_utf8_lossy(&resolv)
    );
    assert!(
        String::from_utf8_lossy(&addresses.stdout).contains(&format!("inet {planned}")),
        "the guest has {planned}: {addresses:?}"
    );
    assert_eq!(
        (
            fetched.status.code(),
            String::from_utf8_lossy(&fetched.stdout).into_owned()
        ),
        (Some(0), OutsideServer::BODY.to_owned()),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
}
