//! genos-hostd as the appliance runs it: under systemd's notification protocol (READY=1 once
//! it serves, WATCHDOG=1 pings, STOPPING=1), `/v1/health` with its real checks, and the
//! units in packaging/ checked by systemd's own tools (skipped without them unless
//! GENOS_REQUIRE names `tools`).

use testkit::Need;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const CONFIG: &str =
    "[images]\nbuilder = \"/nonexistent/genos-image\"\n[stream]\nlisten = \"127.0.0.1:0\"\n";

/// genos-hostd over `dir`, with `env` added to its environment.
fn spawn_hostd(dir: &Path, env: &[(&str, &str)]) -> Child {
    spawn_hostd_with(dir, CONFIG, env)
}

/// genos-hostd over `dir` with the config text `config`.
fn spawn_hostd_with(dir: &Path, config: &str, env: &[(&str, &str)]) -> Child {
    let cfg = dir.join("hostd.toml");
    std::fs::write(&cfg, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_genos-hostd"));
    cmd.arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
}

fn wait_socket(sock: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while UnixStream::connect(sock).is_err() {
        assert!(Instant::now() < deadline, "admin.sock did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn genos(sock: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genos"))
        .env("GENOS_SOCKET", sock)
        .args(args)
        .output()
        .unwrap()
}

/// The next datagram on `sock`, as text, within `secs`.
fn next_message(sock: &UnixDatagram, secs: u64) -> String {
    sock.set_read_timeout(Some(Duration::from_secs(secs)))
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("a notification in time");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn hostd_notifies_ready_once_it_serves_then_pings_the_watchdog_and_says_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let sock = dir.path().join("state/admin.sock");

    let mut child = spawn_hostd(
        dir.path(),
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "600000"),
        ],
    );
    let ready = next_message(&notify, 30);
    let serves = UnixStream::connect(&sock).is_ok();
    let health = genos(&sock, &["health"]);
    let started = Instant::now();
    let ping1 = next_message(&notify, 5);
    let ping2 = next_message(&notify, 5);
    let two_pings = started.elapsed();
    terminate(&mut child);
    let stopping = next_message(&notify, 5);

    assert_eq!(ready, "READY=1");
    assert!(serves, "admin.sock accepts when READY=1 arrives");
    assert!(health.status.success() || health.status.code() == Some(1));
    assert_eq!(
        (ping1.as_str(), ping2.as_str()),
        ("WATCHDOG=1", "WATCHDOG=1")
    );
    assert!(
        two_pings < Duration::from_millis(1500),
        "pings at half of 600 ms: two took {two_pings:?}"
    );
    assert_eq!(stopping, "STOPPING=1");
}

#[test]
fn hostd_with_a_watchdog_but_no_notify_socket_serves_its_health_checks() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("state/admin.sock");
    let mut child = spawn_hostd(dir.path(), &[("WATCHDOG_USEC", "200000")]);
    wait_socket(&sock);

    let o = genos(&sock, &["--json", "health"]);
    terminate(&mut child);

    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["checks"].as_array().map(Vec::len), Some(4), "{v}");
}

#[test]
fn health_runs_real_checks_and_fails_on_an_unusable_image_cache() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"").unwrap();
    let blocked = dir.path().join("file/images");
    let sock = dir.path().join("state/admin.sock");
    let mut child = spawn_hostd(
        dir.path(),
        &[("GENOS_IMAGE_CACHE", blocked.to_str().unwrap())],
    );
    wait_socket(&sock);

    let json_out = genos(&sock, &["--json", "health"]);
    let text_out = genos(&sock, &["health"]);
    terminate(&mut child);

    let v: serde_json::Value = serde_json::from_slice(&json_out.stdout).unwrap();
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == name)
            .unwrap_or_else(|| panic!("no {name} check in {v}"))
            .clone()
    };
    assert_eq!(v["status"], "failing", "{v}");
    assert_eq!(check("image cache")["verdict"], "fail");
    assert!(check("image cache")["found"]
        .as_str()
        .unwrap()
        .contains("file/images"));
    // `warn` only for this machine's own disk (under 20 GiB free, as during a CI run).
    let store = check("store");
    assert!(
        store["verdict"] == "ok"
            || (store["verdict"] == "warn"
                && store["found"].as_str().unwrap().ends_with("GiB free")),
        "{v}"
    );
    let stream = check("stream");
    assert_eq!(stream["verdict"], "ok");
    assert!(
        stream["found"]
            .as_str()
            .unwrap()
            .starts_with("accepting on UDP 127.0.0.1:"),
        "{stream}"
    );
    assert!(
        !stream["found"].as_str().unwrap().ends_with(":0"),
        "the bound port"
    );
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    assert_eq!(check("kvm")["verdict"] == "ok", kvm_usable, "{v}");
    let text = String::from_utf8_lossy(&text_out.stdout);
    assert_eq!(text_out.status.code(), Some(1), "{text}");
    assert!(text.starts_with("failing (genos-hostd "), "{text}");
    assert!(text.contains("FAIL  image cache"), "{text}");
}

/// packaging/ in the source tree.
fn packaging() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging")
}

/// Whether `tool` runs; else the test is skipped (or fails under GENOS_REQUIRE=tools).
fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        testkit::skip(Need::Tools, format!("{tool} not installed (apt: systemd)"));
    }
    ok
}

/// The unit with ExecStart pointing at this build's genos-hostd (verify checks that the
/// binary exists), in a fresh directory.
fn unit_copy() -> (tempfile::TempDir, std::path::PathBuf) {
    let text = std::fs::read_to_string(packaging().join("systemd/genos-hostd.service")).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/genos-hostd "), "{text}");
    let text = text.replace("/usr/bin/genos-hostd", env!("CARGO_BIN_EXE_genos-hostd"));
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("genos-hostd.service");
    std::fs::write(&unit, text).unwrap();
    (dir, unit)
}

#[test]
fn the_unit_passes_systemd_analyze_verify() {
    if !have("systemd-analyze") {
        return;
    }
    let (_dir, unit) = unit_copy();

    let o = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();

    let text =
        String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    let about_ours: Vec<_> = text
        .lines()
        .filter(|l| l.contains("genos-hostd.service"))
        .collect();
    assert!(about_ours.is_empty(), "{about_ours:?}");
}

#[test]
fn the_unit_keeps_its_hardening_exposure_below_8() {
    if !have("systemd-analyze") {
        return;
    }
    let (_dir, unit) = unit_copy();

    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();

    let text = String::from_utf8_lossy(&o.stdout);
    let level: f64 = text
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for genos-hostd.service:"))
        .and_then(|(_, v)| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {text}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level < 8.0, "exposure {level}: {text}");
}

#[test]
fn sysusers_and_tmpfiles_make_the_genos_group_and_the_directories() {
    if !have("systemd-sysusers") || !have("systemd-tmpfiles") {
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = tempfile::tempdir().unwrap();
    for (kind, file) in [("sysusers.d", "genos.conf"), ("tmpfiles.d", "genos.conf")] {
        let dir = root.path().join("usr/lib").join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(packaging().join(kind).join(file), dir.join(file)).unwrap();
    }
    std::fs::create_dir_all(root.path().join("etc")).unwrap();

    let sysusers = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.path().display()))
        .output()
        .unwrap();
    let tmpfiles = Command::new("systemd-tmpfiles")
        .args(["--create"])
        .arg(format!("--root={}", root.path().display()))
        .output()
        .unwrap();

    assert!(
        sysusers.status.success(),
        "{}",
        String::from_utf8_lossy(&sysusers.stderr)
    );
    assert!(
        tmpfiles.status.success(),
        "{}",
        String::from_utf8_lossy(&tmpfiles.stderr)
    );
    let group = std::fs::read_to_string(root.path().join("etc/group")).unwrap();
    let gid: u32 = group
        .lines()
        .find_map(|l| l.strip_prefix("genos:x:"))
        .and_then(|rest| rest.split(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no genos group in {group:?}"));
    let meta = |p: &str| std::fs::metadata(root.path().join(p)).unwrap();
    let state = meta("var/lib/genos");
    assert_eq!(state.permissions().mode() & 0o7777, 0o710);
    assert_eq!((state.uid(), state.gid()), (0, gid));
    assert_eq!(
        meta("var/cache/genos/images").permissions().mode() & 0o7777,
        0o755
    );
    assert!(meta("etc/genos").is_dir());
}

#[test]
fn genos_doctor_runs_without_hostd_and_fails_exactly_when_a_check_fails() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cfg = dir.path().join("hostd.toml");
    std::fs::write(&cfg, "[stream]\nlisten = \"0.0.0.0:4433\"\n").unwrap();

    let o = Command::new(env!("CARGO_BIN_EXE_genos"))
        .env("GENOS_SOCKET", dir.path().join("no-hostd.sock"))
        .args(["--json", "doctor", "--public-host", "localhost"])
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .arg("--image-cache")
        .arg(dir.path().join("cache"))
        .output()
        .unwrap();

    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stderr)));
    let findings = v["findings"].as_array().unwrap();
    let checks: Vec<_> = findings
        .iter()
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    assert_eq!(
        checks,
        [
            "kvm",
            "cpu",
            "cgroup",
            "nftables",
            "memory",
            "state dir",
            "cache dir",
            "image cache",
            "time sync",
            "stream port"
        ]
    );
    let failed = findings.iter().any(|f| f["verdict"] == "fail");
    assert_eq!(o.status.code(), Some(if failed { 1 } else { 0 }), "{v}");
    let verdict =
        |name: &str| findings.iter().find(|f| f["check"] == name).unwrap()["verdict"].clone();
    // A fresh, creatable state dir: `warn` only for this machine's own disk (under 20 GiB
    // free, as during a CI run).
    let state_dir = findings.iter().find(|f| f["check"] == "state dir").unwrap();
    assert!(
        verdict("state dir") == "ok"
            || (verdict("state dir") == "warn"
                && state_dir["found"].as_str().unwrap().ends_with("GiB free")),
        "a fresh, creatable state dir: {v}"
    );
    assert_eq!(
        verdict("image cache"),
        "warn",
        "an absent cache is cold: {v}"
    );
    let stream = findings
        .iter()
        .find(|f| f["check"] == "stream port")
        .unwrap();
    assert!(
        stream["found"]
            .as_str()
            .unwrap()
            .contains("localhost resolves to"),
        "{stream}"
    );
    assert!(!state.exists(), "doctor creates nothing");
}

#[test]
fn hostd_logs_to_journald_natively_with_prefixed_fields_when_stderr_is_the_journal() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(Need::Root, "needs root to mount a stand-in journal socket");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    // Seen by hostd as /run/systemd (a bind mount in its own mount namespace).
    let run_systemd = dir.path().join("run-systemd");
    std::fs::create_dir_all(run_systemd.join("journal")).unwrap();
    let journal = UnixDatagram::bind(run_systemd.join("journal/socket")).unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let cfg = dir.path().join("hostd.toml");
    std::fs::write(&cfg, CONFIG).unwrap();

    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" /run/systemd && exec \"$2\" --config \"$3\" --state-dir \"$4\"")
        .arg("sh")
        .arg(&run_systemd)
        .arg(env!("CARGO_BIN_EXE_genos-hostd"))
        .arg(&cfg)
        .arg(dir.path().join("state"))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let mut entries: Vec<Vec<(String, String)>> = Vec::new();
    let has = |e: &[(String, String)], k: &str, v: &str| e.iter().any(|(a, b)| a == k && b == v);
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline
        && !entries
            .iter()
            .any(|e| has(e, "MESSAGE", "genos-hostd ready"))
    {
        journal
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        if let Ok(n) = journal.recv(&mut buf) {
            entries.push(journal_fields(&buf[..n]));
        }
    }
    // unshare execs sh, which execs genos-hostd: the child's pid is hostd's.
    terminate(&mut child);

    let stream = entries
        .iter()
        .find(|e| has(e, "MESSAGE", "stream server ready"))
        .unwrap_or_else(|| panic!("no stream-ready entry in {entries:?}"));
    assert!(has(stream, "GENOS_LISTEN", "127.0.0.1:0"), "{stream:?}");
    assert!(
        has(stream, "SYSLOG_IDENTIFIER", "genos-hostd"),
        "{stream:?}"
    );
    assert!(has(stream, "PRIORITY", "5"), "info is notice: {stream:?}");
    let ready = entries
        .iter()
        .find(|e| has(e, "MESSAGE", "genos-hostd ready"))
        .unwrap_or_else(|| panic!("no ready entry in {entries:?}"));
    assert!(
        ready
            .iter()
            .any(|(k, v)| k == "GENOS_SOCKET" && v.ends_with("state/admin.sock")),
        "{ready:?}"
    );
    let text = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(
        !text.contains("genos-hostd ready"),
        "logged as text too: {text}"
    );
}

/// The fields of one journald native-protocol datagram: `NAME=value\n`, or `NAME\n`, a
/// little-endian u64 length, the value and `\n`.
fn journal_fields(mut d: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while let Some(nl) = d.iter().position(|&b| b == b'\n') {
        let line = &d[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            let (k, v) = (&line[..eq], &line[eq + 1..]);
            fields.push((
                String::from_utf8_lossy(k).into(),
                String::from_utf8_lossy(v).into(),
            ));
            d = &d[nl + 1..];
        } else {
            let name = String::from_utf8_lossy(line).into_owned();
            let rest = &d[nl + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            let value = String::from_utf8_lossy(&rest[8..8 + len]).into_owned();
            fields.push((name, value));
            d = &rest[8 + len + 1..];
        }
    }
    fields
}

#[test]
fn a_supplementary_member_of_the_admin_group_uses_the_socket_through_its_real_modes() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(Need::Root, "needs root to run the client as another user");
        return;
    }
    // `users` (gid 100) stands in for `genos`: Debian has it, and nobody is not in it.
    let config = format!("{CONFIG}[admin]\ngroup = \"users\"\n");
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("state/admin.sock");
    let mut child = spawn_hostd_with(dir.path(), &config, &[]);
    wait_socket(&sock);
    // Only the temporary directory is opened up; the state directory and the socket keep
    // the modes hostd gave them.
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let genos = dir.path().join("genos");
    std::fs::copy(env!("CARGO_BIN_EXE_genos"), &genos).unwrap();
    std::fs::set_permissions(&genos, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |groups: &str| {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                &format!("--groups={groups}"),
            ])
            .arg(&genos)
            .arg("list")
            .env("GENOS_SOCKET", &sock)
            .output()
            .unwrap()
    };

    let member = as_nobody("65534,100");
    let outsider = as_nobody("65534");
    let state = std::fs::metadata(dir.path().join("state")).unwrap();
    let socket = std::fs::metadata(&sock).unwrap();
    terminate(&mut child);

    assert_eq!(
        (state.mode() & 0o777, state.gid()),
        (0o710, 100),
        "state dir"
    );
    assert_eq!(
        (socket.mode() & 0o777, socket.gid()),
        (0o660, 100),
        "admin.sock"
    );
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert_eq!(outsider.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&outsider.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&outsider.stderr)
    );
}
