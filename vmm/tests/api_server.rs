//! The control API server thread over a real Unix socket, with a controller defined here
//! (the real one, vmm-core's `Vmm`, is covered by its own tests). Checks the lifecycle
//! order rules, every endpoint, error handling on hostile input, keep-alive, pipelining,
//! `Expect: 100-continue`, and passing the framebuffer fds with SCM_RIGHTS.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[path = "common/scm.rs"]
mod scm;

use scm::get_with_fds;
use vmm::api::server;
use vmm::config::VmConfig;
use vmm::rpc::{
    self, ActionError, ApiReceiver, FramebufferFds, InputDevice, InputEvent, Lifecycle,
    VmDescription, VmMetrics, VmState, VmmAction, VmmController, VmmResponse,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempdir::TempDir;
use vmm_sys_util::tempfile::TempFile;

const FB_SIZE: u64 = 64 * 1024;
const FB_MARKER: &[u8] = b"genos-fb";

/// A controller that follows the documented state machine and records what it was asked.
struct FakeVmm {
    state: VmState,
    config: Option<VmConfig>,
    input: Vec<(InputDevice, Vec<InputEvent>)>,
    display: Option<(u32, u32)>,
    framebuffer: File,
    flush: EventFd,
}

impl FakeVmm {
    fn new() -> Self {
        // SAFETY: memfd_create takes a valid NUL-terminated name and flags; it returns a
        // new descriptor or -1, checked below.
        let fd = unsafe { libc::memfd_create(c"test-fb".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let framebuffer = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        framebuffer.set_len(FB_SIZE).unwrap();
        framebuffer.write_all_at(FB_MARKER, 0).unwrap();
        Self {
            state: VmState::NotConfigured,
            config: None,
            input: Vec::new(),
            display: None,
            framebuffer,
            flush: EventFd::new(0).unwrap(),
        }
    }
}

impl VmmController for FakeVmm {
    fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, ActionError> {
        self.state.check(&action)?;
        let next = self.state.after(&action);
        let response = match action {
            VmmAction::Configure(config) => {
                self.config = Some(config);
                VmmResponse::Empty
            }
            VmmAction::UpdateConfig(update) => {
                self.config = Some(update.apply(self.config.as_ref())?);
                VmmResponse::Empty
            }
            VmmAction::Start | VmmAction::Pause | VmmAction::Resume | VmmAction::Stop => {
                VmmResponse::Empty
            }
            VmmAction::Describe => VmmResponse::Description(VmDescription {
                state: self.state,
                config: self.config.clone(),
                boot_time_us: None,
                uptime_us: 1,
                sandbox: None,
            }),
            VmmAction::Metrics => VmmResponse::Metrics(VmMetrics {
                state: self.state,
                boot_time_us: None,
                uptime_us: None,
                vcpu_exits: Some(serde_json::json!({"io": 3})),
                devices: serde_json::Map::new(),
            }),
            VmmAction::InjectInput { device, events } => {
                if !self.config.as_ref().is_some_and(|c| c.input) {
                    return Err(ActionError::NoSuchDevice(
                        "the VM has no input devices".into(),
                    ));
                }
                self.input.push((device, events));
                VmmResponse::Empty
            }
            VmmAction::SetDisplaySize { width, height } => {
                self.display = Some((width, height));
                VmmResponse::Empty
            }
            VmmAction::GetFramebuffer => VmmResponse::Framebuffer(
                FramebufferFds::duplicate(&self.framebuffer, &self.flush)
                    .map_err(|e| ActionError::Internal(e.to_string()))?,
            ),
            // Served for real in tests/input_socket.rs.
            VmmAction::GetInputSocket => {
                return Err(ActionError::NoSuchDevice("no input socket here".into()))
            }
            // Served for real in tests/snapshot.rs.
            VmmAction::CreateSnapshot(_) | VmmAction::LoadSnapshot(_) => {
                return Err(ActionError::InvalidRequest("no snapshots here".into()))
            }
        };
        self.state = next;
        Ok(response)
    }
}

/// The VMM main thread: waits on the API eventfd and drains, until stopped.
fn run_vmm(receiver: ApiReceiver, mut vmm: FakeVmm) -> JoinHandle<FakeVmm> {
    std::thread::spawn(move || loop {
        let mut pfd = libc::pollfd {
            fd: receiver.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, living across the call.
        unsafe { libc::poll(&mut pfd, 1, 5000) };
        receiver.drain_into(&mut vmm);
        if vmm.state == VmState::Stopped {
            assert!(receiver.wait_responses_sent(Duration::from_secs(5)));
            return vmm;
        }
    })
}

struct Fixture {
    _dir: TempDir,
    sock: PathBuf,
    vmm: JoinHandle<FakeVmm>,
}

fn start() -> Fixture {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (sender, receiver) = rpc::channel().unwrap();
    server::start(&sock, sender).unwrap();
    let vmm = run_vmm(receiver, FakeVmm::new());
    Fixture {
        _dir: dir,
        sock,
        vmm,
    }
}

struct Reply {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (head + Content-Length body) from `stream`.
fn read_reply(stream: &mut UnixStream) -> Reply {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "connection closed mid-head: {buf:?}"
        );
        buf.push(byte[0]);
    }
    let head = String::from_utf8(buf).unwrap();
    let status = head[9..12].parse().unwrap();
    let len = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; len];
    stream.read_exact(&mut body).unwrap();
    Reply {
        status,
        head,
        body: String::from_utf8(body).unwrap(),
    }
}

fn send(stream: &mut UnixStream, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
    if let Some(body) = body {
        req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    } else {
        req.push_str("\r\n");
    }
    stream.write_all(req.as_bytes()).unwrap();
    read_reply(stream)
}

fn connect(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn config_json(kernel: &TempFile, extra: &str) -> String {
    format!(r#"{{"kernel":"{}"{extra}}}"#, kernel.as_path().display())
}

#[test]
fn lifecycle_follows_the_state_machine_over_the_socket() {
    let fx = start();
    let kernel = TempFile::new().unwrap();
    let disk = TempFile::new().unwrap();
    let mut c = connect(&fx.sock);

    let r = send(&mut c, "GET", "/vm", None);
    assert_eq!(r.status, 200);
    let d: VmDescription = serde_json::from_str(&r.body).unwrap();
    assert_eq!(d.state, VmState::NotConfigured);

    let r = send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"start"}"#));
    assert_eq!(r.status, 409);
    assert_eq!(
        r.body,
        r#"{"error":"cannot start while the VM is not configured"}"#
    );

    let r = send(
        &mut c,
        "PUT",
        "/vm/config",
        Some(&config_json(&kernel, r#","input":true"#)),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let r = send(
        &mut c,
        "PATCH",
        "/vm/config",
        Some(r#"{"vcpus":2,"mem_mib":256}"#),
    );
    assert_eq!(r.status, 204, "{}", r.body);
    let disk_body = format!(
        r#"{{"path":"{}","read_only":true}}"#,
        disk.as_path().display()
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/disks/0", Some(&disk_body)).status,
        204
    );
    let r = send(&mut c, "PUT", "/vm/disks/5", Some(&disk_body));
    assert_eq!(r.status, 400);
    assert!(r.body.contains("disk index 5 out of range"), "{}", r.body);
    let r = send(&mut c, "PATCH", "/vm/config", Some(r#"{"vcpus":64}"#));
    assert_eq!(r.status, 400);

    let r = send(
        &mut c,
        "PUT",
        "/input",
        Some(r#"{"device":"keyboard","events":[{"type":0,"code":0,"value":0}]}"#),
    );
    assert_eq!(r.status, 409, "input before start");

    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"start"}"#)).status,
        204
    );
    let r = send(&mut c, "PUT", "/vm/config", Some(&config_json(&kernel, "")));
    assert_eq!(r.status, 409);
    assert!(r.body.contains("cannot configure while the VM is running"));
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"resume"}"#)).status,
        409
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"pause"}"#)).status,
        204
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"pause"}"#)).status,
        409
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"resume"}"#)).status,
        204
    );

    let r = send(&mut c, "GET", "/vm", None);
    let d: VmDescription = serde_json::from_str(&r.body).unwrap();
    assert_eq!(d.state, VmState::Running);
    let config = d.config.unwrap();
    assert_eq!(
        (config.vcpus, config.mem_mib, config.disks.len()),
        (2, 256, 1)
    );

    let events = r#"{"device":"tablet","events":[{"type":3,"code":0,"value":100},{"type":3,"code":1,"value":200},{"type":0,"code":0,"value":0}]}"#;
    assert_eq!(send(&mut c, "PUT", "/input", Some(events)).status, 204);
    assert_eq!(
        send(
            &mut c,
            "PUT",
            "/display",
            Some(r#"{"width":1024,"height":768}"#)
        )
        .status,
        204
    );
    let r = send(&mut c, "GET", "/metrics", None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (
            200,
            r#"{"state":"running","boot_time_us":null,"vcpu_exits":{"io":3},"devices":{}}"#
        )
    );
    assert!(r.head.contains("Content-Type: application/json\r\n"));

    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"stop"}"#)).status,
        204
    );
    let vmm = fx.vmm.join().unwrap();
    assert_eq!(vmm.input.len(), 1);
    assert_eq!(vmm.input[0].0, InputDevice::Tablet);
    assert_eq!(
        vmm.input[0].1[1],
        InputEvent {
            ty: 3,
            code: 1,
            value: 200
        }
    );
    assert_eq!(vmm.display, Some((1024, 768)));
}

#[test]
fn input_without_input_device_is_404() {
    let fx = start();
    let kernel = TempFile::new().unwrap();
    let mut c = connect(&fx.sock);
    assert_eq!(
        send(&mut c, "PUT", "/vm/config", Some(&config_json(&kernel, ""))).status,
        204
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"start"}"#)).status,
        204
    );
    let r = send(
        &mut c,
        "PUT",
        "/input",
        Some(r#"{"device":"touch","events":[{"type":0,"code":0,"value":0}]}"#),
    );
    assert_eq!(
        (r.status, r.body.as_str()),
        (404, r#"{"error":"the VM has no input devices"}"#)
    );
}

#[test]
fn router_errors_keep_the_connection_open() {
    let fx = start();
    let mut c = connect(&fx.sock);
    let r = send(&mut c, "GET", "/nope", None);
    assert_eq!(r.status, 404);
    let r = send(&mut c, "DELETE", "/vm", None);
    assert_eq!(r.status, 405);
    assert!(r.head.contains("Allow: GET\r\n"));
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some("{not json")).status,
        400
    );
    assert_eq!(send(&mut c, "PUT", "/vm/actions", None).status, 411);
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
}

#[test]
fn garbage_gets_400_and_close_and_the_server_keeps_serving() {
    let fx = start();
    let hostile: &[&[u8]] = &[
        b"\x00\xff\x13garbage\r\n\r\n",
        b"GET /vm HTTP/1.1\r\nContent-Length: -4\r\n\r\n",
        b"PUT /vm/config HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n",
        b"PUT /vm/config HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    for bytes in hostile {
        let mut c = connect(&fx.sock);
        c.write_all(bytes).unwrap();
        let r = read_reply(&mut c);
        assert!((400..=501).contains(&r.status), "{bytes:?} -> {}", r.status);
        assert!(r.head.contains("Connection: close\r\n"));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "server closes after a parse error");
    }

    // An endless header is cut off at the head limit.
    let mut c = connect(&fx.sock);
    c.write_all(b"GET /vm HTTP/1.1\r\nX: ").unwrap();
    let filler = vec![b'a'; 16 * 1024];
    let _ = c.write_all(&filler);
    assert_eq!(read_reply(&mut c).status, 431);

    // Clients that vanish mid-request, or without reading the answer.
    for _ in 0..3 {
        let mut c = connect(&fx.sock);
        c.write_all(b"PUT /vm/config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
            .unwrap();
        drop(c);
        let mut c = connect(&fx.sock);
        c.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
        drop(c);
    }

    let mut c = connect(&fx.sock);
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
}

#[test]
fn idle_and_stalled_clients_cannot_lock_others_out() {
    let fx = start();
    let mut hogs: Vec<UnixStream> = (0..server::MAX_CONNECTIONS)
        .map(|_| connect(&fx.sock))
        .collect();
    // Half a request each: slots taken by clients that never finish.
    for hog in &mut hogs {
        hog.write_all(b"GET /vm HTTP/1.1\r\n").unwrap();
    }
    let mut newcomers = Vec::new();
    for _ in 0..3 {
        let mut c = connect(&fx.sock);
        assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
        newcomers.push(c);
    }
    // The quietest hogs were closed to make room.
    let mut closed = 0;
    for hog in &mut hogs {
        hog.set_read_timeout(Some(Duration::from_millis(10)))
            .unwrap();
        let mut byte = [0u8; 1];
        match hog.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert_eq!(closed, 3, "one hog closed per newcomer");
}

/// Reads `stream` to its end: the server closed it (EOF or reset) within the read timeout.
fn closed_by_server(stream: &mut UnixStream) -> Vec<u8> {
    let mut rest = Vec::new();
    match stream.read_to_end(&mut rest) {
        Ok(_) => rest,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => rest,
        Err(e) => panic!("connection still open: {e} (read {rest:?})"),
    }
}

#[test]
fn clients_that_never_finish_a_request_get_408_and_are_closed() {
    let fx = start();
    let started = Instant::now();
    let mut silent = connect(&fx.sock);
    let mut partial = connect(&fx.sock);
    partial.write_all(b"GET /vm HTTP/1.1\r\nHost: loc").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    // More bytes of the same request do not move its deadline.
    partial.write_all(b"alhost\r\n").unwrap();

    for client in [&mut silent, &mut partial] {
        let reply = read_reply(client);
        assert_eq!(reply.status, 408, "{}", reply.head);
        assert!(reply.body.contains("not complete"), "{}", reply.body);
        assert_eq!(closed_by_server(client), b"");
    }
    assert!(started.elapsed() >= server::HEADER_TIMEOUT);

    let mut c = connect(&fx.sock);
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
}

#[test]
fn many_silent_connections_neither_block_a_real_request_nor_stay_open() {
    let fx = start();
    let mut silent: Vec<UnixStream> = (0..server::MAX_CONNECTIONS * 8)
        .map(|_| connect(&fx.sock))
        .collect();

    let mut c = connect(&fx.sock);
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);

    // Replaced by newcomers at once, or answered 408 at their deadline: none stays.
    for s in &mut silent {
        closed_by_server(s);
    }
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
}

#[test]
fn keep_alive_connection_idle_between_requests_stays_open() {
    let fx = start();
    let mut c = connect(&fx.sock);
    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);

    std::thread::sleep(server::HEADER_TIMEOUT + Duration::from_secs(1));

    assert_eq!(send(&mut c, "GET", "/vm", None).status, 200);
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let fx = start();
    let mut c = connect(&fx.sock);
    c.write_all(b"GET /metrics HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET /vm HTTP/1.1\r\n\r\n")
        .unwrap();
    assert_eq!(read_reply(&mut c).status, 200);
    assert_eq!(read_reply(&mut c).status, 404);
    let r = read_reply(&mut c);
    assert!(r.body.contains("not-configured"), "{}", r.body);
}

#[test]
fn request_split_across_writes_is_served() {
    let fx = start();
    let mut c = connect(&fx.sock);
    for part in [&b"GET /v"[..], b"m HTTP/1.1\r", b"\nHost: x\r\n", b"\r\n"] {
        c.write_all(part).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(read_reply(&mut c).status, 200);
}

#[test]
fn connection_close_and_http10_close_after_the_response() {
    let fx = start();
    for req in [
        &b"GET /vm HTTP/1.1\r\nConnection: close\r\n\r\n"[..],
        b"GET /vm HTTP/1.0\r\n\r\n",
    ] {
        let mut c = connect(&fx.sock);
        c.write_all(req).unwrap();
        let r = read_reply(&mut c);
        assert_eq!(r.status, 200);
        assert!(r.head.contains("Connection: close\r\n"));
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }
}

#[test]
fn expect_continue_gets_100_before_the_body() {
    let fx = start();
    let mut c = connect(&fx.sock);
    let body = r#"{"action":"start"}"#;
    let head = format!(
        "PUT /vm/actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    let mut interim = [0u8; 25];
    c.read_exact(&mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.write_all(body.as_bytes()).unwrap();
    assert_eq!(read_reply(&mut c).status, 409, "start before configure");
}

#[test]
fn request_sent_before_half_close_is_still_answered() {
    let fx = start();
    let mut c = connect(&fx.sock);
    c.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_reply(&mut c).status, 200);
}

#[test]
fn framebuffer_fds_are_passed_with_the_response() {
    let fx = start();
    let kernel = TempFile::new().unwrap();
    let mut c = connect(&fx.sock);
    assert_eq!(
        send(&mut c, "GET", "/framebuffer", None).status,
        409,
        "no framebuffer before start"
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/config", Some(&config_json(&kernel, ""))).status,
        204
    );
    assert_eq!(
        send(&mut c, "PUT", "/vm/actions", Some(r#"{"action":"start"}"#)).status,
        204
    );

    let (body, fds) = get_with_fds(&c, "/framebuffer");
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"memfd_size": FB_SIZE, "fds": ["memfd", "flush_eventfd"]})
    );
    assert_eq!(fds.len(), 2);

    let mut fds = fds.into_iter();
    let memfd = File::from(fds.next().unwrap());
    let mut marker = vec![0u8; FB_MARKER.len()];
    memfd.read_exact_at(&mut marker, 0).unwrap();
    assert_eq!(marker, FB_MARKER, "the memfd is the VMM's framebuffer");

    let flush = File::from(fds.next().unwrap());
    let vmm_flush = {
        // The VMM side signals a flush; the client's copy observes it.
        let mut c2 = connect(&fx.sock);
        send(&mut c2, "PUT", "/vm/actions", Some(r#"{"action":"stop"}"#));
        fx.vmm.join().unwrap().flush
    };
    vmm_flush.write(1).unwrap();
    let mut counter = [0u8; 8];
    (&flush).read_exact(&mut counter).unwrap();
    assert_eq!(u64::from_ne_bytes(counter), 1);
}

#[test]
fn vmm_gone_is_503() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (sender, receiver) = rpc::channel().unwrap();
    server::start(&sock, sender).unwrap();
    drop(receiver);
    let mut c = connect(&sock);
    let r = send(&mut c, "GET", "/vm", None);
    assert_eq!(
        (r.status, r.body.as_str()),
        (503, r#"{"error":"the VMM is shutting down"}"#)
    );
}

#[test]
fn bind_replaces_stale_sockets_and_refuses_live_ones_and_files() {
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap()); // leaves a stale socket file
    let live = server::bind(&sock).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "only the owner may control the VM");
    assert!(matches!(
        server::bind(&sock),
        Err(server::ServerError::InUse(_))
    ));
    drop(live);

    let file = dir.as_path().join("regular");
    std::fs::write(&file, b"x").unwrap();
    let err = server::bind(&file).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("api socket {}: exists and is not a socket", file.display())
    );
}
