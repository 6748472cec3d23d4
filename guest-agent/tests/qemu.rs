//! genos-agent in a real Linux guest: the GenOS guest kernel and an initramfs built by
//! genos-image with the static agent (scripts/build-agent), booted under
//! `qemu-system-x86_64 -accel tcg`, and driven by proto's HostSession: readiness, an exec, a
//! file put and get, and a reboot that ends the VM. Once through QEMU's virtio-serial port
//! `org.genos.agent`, once through AF_VSOCK via QEMU's vhost-user vsock and rust-vmm's
//! `vhost-device-vsock` (the hybrid `CONNECT <port>` socket hostd uses with genos-vmm).
//!
//! Needs the guest kernel (`GENOS_GUEST_KERNEL`, set by scripts/test), QEMU, busybox and
//! vhost-device-vsock (scripts/install-deps). The static agent is `GENOS_AGENT_STATIC` when
//! set, else built here.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image_builder::cache::Cache;
use image_builder::initramfs::{self, InitramfsOptions, DEFAULT_BUSYBOX};
use proto::agent::session::HostSession;
use proto::agent::{
    AgentMessage, ExecRequest, ExitStatus, FileGetRequest, FilePutRequest, Frame, HostMessage,
    OutputFd, PowerAction, RequestId, Stage, VIRTIO_SERIAL_NAME, VSOCK_PORT,
};
use testkit::{skip, Need};

struct Vm {
    qemu: Child,
    /// The vsock backend, when the guest has vsock.
    backend: Option<Child>,
    dir: PathBuf,
    started: Instant,
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in [Some(&mut self.qemu), self.backend.as_mut()]
            .into_iter()
            .flatten()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether the host can run these tests; skips (saying why) when not.
fn guest_kernel(extra_tool: Option<&str>) -> Option<PathBuf> {
    let Some(kernel) = std::env::var_os("GENOS_GUEST_KERNEL").map(PathBuf::from) else {
        skip(
            Need::Kernel,
            "GENOS_GUEST_KERNEL is not set (scripts/test sets it)",
        );
        return None;
    };
    let runs = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    if !runs("qemu-system-x86_64")
        || !Path::new(DEFAULT_BUSYBOX).exists()
        || extra_tool.is_some_and(|t| !runs(t))
    {
        skip(
            Need::Tools,
            format!(
                "qemu-system-x86_64, busybox-static or {} is missing",
                extra_tool.unwrap_or("-")
            ),
        );
        return None;
    }
    Some(kernel)
}

/// Boots the kernel with an initramfs holding the static agent, plus `devices` (QEMU args).
fn boot(
    name: &str,
    kernel: &Path,
    machine: &str,
    devices: &[String],
    backend: Option<Child>,
) -> Vm {
    let dir = scratch(name);
    let cache = Cache::open(Some(&dir.join("cache"))).unwrap();
    let initrd = initramfs::build(
        &cache,
        &InitramfsOptions {
            busybox: DEFAULT_BUSYBOX.into(),
            agent: Some(testkit::static_agent()),
        },
    )
    .expect("initramfs with the agent")
    .path();
    let console = std::fs::File::create(dir.join("console.log")).unwrap();
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", machine, "-accel", "tcg", "-m", "256"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(devices)
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu");
    Vm {
        qemu,
        backend,
        dir,
        started: Instant::now(),
    }
}

fn scratch(name: &str) -> PathBuf {
    testkit::fresh_dir(
        std::env::temp_dir().join(format!("genos-agent-{name}-{}", std::process::id())),
    )
}

fn wait_for(path: &Path) {
    testkit::wait_for_path(path, Duration::from_secs(20));
}

struct Client {
    stream: UnixStream,
    session: HostSession,
    pending: Vec<Frame<AgentMessage>>,
}

impl Client {
    fn flush(&mut self) {
        let out = self.session.take_output();
        self.stream.write_all(&out).unwrap();
    }
    fn send(&mut self, id: u32, m: HostMessage) {
        self.session.send(RequestId(id), m).unwrap();
        self.flush();
    }
    fn next_of(&mut self, id: u32) -> AgentMessage {
        if let Some(i) = self.pending.iter().position(|f| f.id.0 == id) {
            return self.pending.remove(i).message;
        }
        loop {
            while let Some(f) = self.session.poll().expect("agent speaks the protocol") {
                if let AgentMessage::ExecOutput { data, .. } | AgentMessage::FileData(data) =
                    &f.message
                {
                    self.session.consumed(f.id, data.len());
                    self.flush();
                }
                if f.id.0 == id {
                    return f.message;
                }
                self.pending.push(f);
            }
            let mut buf = [0u8; 65536];
            let n = self.stream.read(&mut buf).expect("read from the guest");
            assert!(n > 0, "the guest's port closed");
            self.session.receive(&buf[..n]);
        }
    }
}

/// Ready, an exec, a put and a get, then a reboot that ends QEMU (-no-reboot).
fn exercise(vm: &mut Vm, stream: UnixStream, transport: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    eprintln!("transport: {transport} under qemu tcg");
    let mut client = Client {
        stream,
        session: HostSession::new(),
        pending: Vec::new(),
    };
    client.flush();
    let hello = client.next_of(0);
    assert!(
        matches!(hello, AgentMessage::Hello { major: 1, .. }),
        "{hello:?}"
    );
    assert_eq!(client.next_of(0), AgentMessage::Ready(Stage::System));
    eprintln!(
        "agent ready (system) {:?} after qemu started",
        vm.started.elapsed()
    );

    client.send(
        1,
        HostMessage::Exec(ExecRequest {
            argv: vec!["/bin/busybox".into(), "uname".into(), "-s".into()],
            ..ExecRequest::default()
        }),
    );
    let mut out = Vec::new();
    let status = loop {
        match client.next_of(1) {
            AgentMessage::ExecStarted { .. } => {}
            AgentMessage::ExecOutput {
                fd: OutputFd::Stdout,
                data,
            } => out.extend(data),
            AgentMessage::ExecExit { status, .. } => break status,
            other => panic!("exec: {other:?}"),
        }
    };
    assert_eq!(
        (status, out.as_slice()),
        (ExitStatus::Code(0), &b"Linux\n"[..])
    );

    let contents = format!("put through {transport}\n").into_bytes();
    client.send(
        2,
        HostMessage::FilePut(FilePutRequest {
            path: "/tmp/genos-agent-test".into(),
            mode: 0o604,
            size: contents.len() as u64,
            as_root: true,
            ..FilePutRequest::default()
        }),
    );
    client.send(2, HostMessage::FileData(contents.clone()));
    client.send(2, HostMessage::FileEnd);
    assert_eq!(client.next_of(2), AgentMessage::Done);
    client.send(
        3,
        HostMessage::FileGet(FileGetRequest {
            path: "/tmp/genos-agent-test".into(),
            as_root: true,
            ..FileGetRequest::default()
        }),
    );
    assert_eq!(
        client.next_of(3),
        AgentMessage::FileInfo {
            size: contents.len() as u64,
            mode: 0o604
        }
    );
    assert_eq!(client.next_of(3), AgentMessage::FileData(contents));
    assert_eq!(client.next_of(3), AgentMessage::FileEnd);

    client.send(4, HostMessage::Power(PowerAction::Reboot));
    assert_eq!(client.next_of(4), AgentMessage::Done);
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = vm.qemu.try_wait().unwrap() {
            eprintln!(
                "qemu exited ({status}) {:?} after start",
                vm.started.elapsed()
            );
            break;
        }
        assert!(Instant::now() < deadline, "the guest did not reboot");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_as_initramfs_service_answers_over_virtio_serial_in_a_qemu_guest() {
    let Some(kernel) = guest_kernel(None) else {
        return;
    };
    let dir = scratch("serial-sock");
    let port = dir.join("agent.sock");
    let devices = [
        "-device".to_string(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!("socket,id=agent,path={},server=on,wait=off", port.display()),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={VIRTIO_SERIAL_NAME}"),
    ];
    let mut vm = boot("serial", &kernel, "microvm,acpi=off", &devices, None);
    wait_for(&port);
    let stream = UnixStream::connect(&port).unwrap();
    exercise(
        &mut vm,
        stream,
        &format!("virtio-serial ({VIRTIO_SERIAL_NAME})"),
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn agent_as_initramfs_service_answers_over_vsock_in_a_qemu_guest() {
    let Some(kernel) = guest_kernel(Some("vhost-device-vsock")) else {
        return;
    };
    let dir = scratch("vsock-sock");
    let (vhost, uds) = (dir.join("vhost.sock"), dir.join("vm.vsock"));
    let backend = Command::new("vhost-device-vsock")
        .arg("--vm")
        .arg(format!(
            "guest-cid=3,socket={},uds-path={}",
            vhost.display(),
            uds.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start vhost-device-vsock");
    let mut backend = Some(backend);
    wait_for(&vhost);
    let devices = [
        "-object".to_string(),
        "memory-backend-memfd,id=mem,size=256M,share=on".into(),
        "-chardev".into(),
        format!("socket,id=vsock,path={}", vhost.display()),
        "-device".into(),
        "vhost-user-vsock-device,chardev=vsock".into(),
    ];
    let mut vm = boot(
        "vsock",
        &kernel,
        "microvm,acpi=off,memory-backend=mem",
        &devices,
        backend.take(),
    );
    wait_for(&uds);
    // The hybrid handshake; refused (closed) until the agent listens in the guest.
    let deadline = Instant::now() + Duration::from_secs(90);
    let stream = loop {
        assert!(
            Instant::now() < deadline,
            "the guest's agent never accepted on vsock"
        );
        let mut s = UnixStream::connect(&uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        // The backend closes a connection it cannot forward yet: try again.
        if s.write_all(format!("CONNECT {VSOCK_PORT}\n").as_bytes())
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            match s.read(&mut byte) {
                Ok(1) => line.push(byte[0]),
                _ => break,
            }
        }
        if line.starts_with(b"OK ") {
            break s;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    exercise(
        &mut vm,
        stream,
        &format!("AF_VSOCK port {VSOCK_PORT} (vhost-device-vsock)"),
    );
    let _ = std::fs::remove_dir_all(dir);
}
