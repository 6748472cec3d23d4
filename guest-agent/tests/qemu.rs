//! genos-agent in a real Linux guest: the GenOS guest kernel and an initramfs built by
//! genos-image with the static agent (scripts/build-agent), booted under
//! `qemu-system-x86_64 -accel tcg`, reached through QEMU's virtio-serial port
//! `org.genos.agent` and driven by proto's HostSession: readiness, an exec, a file put and
//! get, and a reboot that ends the VM.
//!
//! Needs the guest kernel (`GENOS_GUEST_KERNEL`, set by scripts/test) and QEMU with busybox
//! (scripts/install-deps). The static agent is `GENOS_AGENT_STATIC` when set, else built here.

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
    OutputFd, PowerAction, RequestId, Stage, VIRTIO_SERIAL_NAME,
};
use testkit::{skip, Need};

struct Vm {
    qemu: Child,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qemu.kill();
        let _ = self.qemu.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn static_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("GENOS_AGENT_STATIC") {
        return path.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-agent");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/build-agent");
    assert!(out.status.success(), "scripts/build-agent failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
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

#[test]
fn agent_as_initramfs_service_answers_over_virtio_serial_in_a_qemu_guest() {
    let Some(kernel) = std::env::var_os("GENOS_GUEST_KERNEL").map(PathBuf::from) else {
        return skip(
            Need::Kernel,
            "GENOS_GUEST_KERNEL is not set (scripts/test sets it)",
        );
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
        || !Path::new(DEFAULT_BUSYBOX).exists()
    {
        return skip(
            Need::Tools,
            "qemu-system-x86_64 or busybox-static is missing",
        );
    }
    let dir = std::env::temp_dir().join(format!("genos-agent-qemu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let cache = Cache::open(Some(&dir.join("cache"))).unwrap();
    let initrd = initramfs::build(
        &cache,
        &InitramfsOptions {
            busybox: DEFAULT_BUSYBOX.into(),
            agent: Some(static_agent()),
        },
    )
    .expect("initramfs with the agent")
    .path();
    let port = dir.join("agent.sock");
    let console = std::fs::File::create(dir.join("console.log")).unwrap();
    let qemu = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=off", "-accel", "tcg", "-m", "256"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            port.display()
        ))
        .arg("-device")
        .arg(format!(
            "virtserialport,chardev=agent,name={VIRTIO_SERIAL_NAME}"
        ))
        .stdin(Stdio::null())
        .stdout(console)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu");
    let mut vm = Vm { qemu, dir };
    let started = Instant::now();
    let stream = loop {
        match UnixStream::connect(&port) {
            Ok(s) => break s,
            Err(_) if started.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("qemu's chardev {}: {e}", port.display()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    eprintln!("transport: virtio-serial ({VIRTIO_SERIAL_NAME}) under qemu tcg");
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
        started.elapsed()
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

    let contents = b"put through virtio-serial\n".to_vec();
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
    // -no-reboot: the guest's reboot(2) ends QEMU.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = vm.qemu.try_wait().unwrap() {
            eprintln!("qemu exited ({status}) {:?} after start", started.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "the guest did not reboot");
        std::thread::sleep(Duration::from_millis(100));
    }
}
