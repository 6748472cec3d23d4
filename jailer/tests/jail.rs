//! The jailer against the real kernel: namespaces, root, uid, cgroups, descriptors and
//! exit statuses, observed from inside (a probe binary in place of the VMM) and from the
//! host (/proc). Needs root; prints why and skips otherwise.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

const NOBODY: &str = "65534";

fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        testkit::skip(testkit::Need::Root, "the jailer tests need root");
    }
    root
}

fn probe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_genos-jail-probe"))
}

struct Jail {
    base: PathBuf,
    id: String,
}

impl Jail {
    fn new(id: &str) -> Self {
        let base =
            std::env::temp_dir().join(format!("genos-jail-test-{}-{id}", std::process::id()));
        fs::create_dir_all(&base).unwrap();
        Self {
            base,
            id: id.to_string(),
        }
    }

    fn command(&self, extra: &[&str], vmm_args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_genos-jailer"));
        cmd.args([
            "--id",
            &self.id,
            "--uid",
            NOBODY,
            "--gid",
            NOBODY,
            "--chroot-base",
        ])
        .arg(&self.base)
        .arg("--exec-file")
        .arg(probe())
        .args(extra)
        .arg("--")
        .args(vmm_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        cmd
    }

    fn pid_file(&self) -> PathBuf {
        self.base
            .join("genos-vmm")
            .join(&self.id)
            .join("genos-vmm.pid")
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    line
}

fn field<'a>(json: &'a str, key: &str) -> &'a str {
    let start = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} not in {json}"))
        + key.len()
        + 3;
    let rest = &json[start..];
    let end = rest.find([',', '}']).unwrap();
    &rest[..end]
}

fn wait_for(path: &Path) -> String {
    for _ in 0..500 {
        if let Ok(s) = fs::read_to_string(path) {
            if !s.is_empty() {
                return s;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{} never appeared", path.display());
}

#[test]
fn the_vmm_sees_only_its_jail_as_an_unprivileged_user_without_inherited_descriptors() {
    if !is_root() {
        return;
    }
    let jail = Jail::new("inside");
    let image = jail.base.join("vmlinux");
    fs::write(&image, b"kernel").unwrap();
    // A descriptor without close-on-exec, as a careless parent might leak.
    let leaked = fs::File::open(&image).unwrap();
    // SAFETY: dup of a descriptor this test owns; the copy is closed below.
    let leaked_copy = unsafe { libc::dup(leaked.as_raw_fd()) };
    assert!(leaked_copy > 2);

    let out = jail
        .command(
            &[],
            &["--kernel", image.to_str().unwrap(), "--exit-with", "0"],
        )
        .output()
        .unwrap();

    // SAFETY: closing the descriptor dup'ed above, owned by this test.
    unsafe { libc::close(leaked_copy) };
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(field(&report, "pid"), "1", "pid namespace");
    assert_eq!(field(&report, "uid"), NOBODY);
    assert_eq!(field(&report, "gid"), NOBODY);
    assert_eq!(field(&report, "open_fds"), "0");
    assert_eq!(field(&report, "host_file_visible"), "false");
    assert_eq!(field(&report, "root_writable"), "false");
    assert_eq!(field(&report, "hostname"), "\"inside\"");
    assert!(report.contains("\"images\":[\"vmlinux\"]"), "{report}");
    assert!(
        report.contains("\"--kernel\", \"/images/vmlinux\""),
        "{report}"
    );
}

#[test]
fn from_the_host_the_vmm_has_new_namespaces_no_new_privs_and_its_cgroup_limits() {
    if !is_root() {
        return;
    }
    let jail = Jail::new("hostview");
    let v1 = Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists();
    let (mem, pids) = if v1 {
        ("memory.limit_in_bytes=67108864", "pids.max=32")
    } else {
        ("memory.max=67108864", "pids.max=32")
    };
    let mut child = jail
        .command(&["--cgroup", mem, "--cgroup", pids], &["--rng"])
        .spawn()
        .unwrap();
    let _ = first_line(&mut child);
    let pid = wait_for(&jail.pid_file()).trim().to_string();

    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let ns_differs = |ns: &str| {
        fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
            != fs::read_link(format!("/proc/self/ns/{ns}")).unwrap()
    };
    let shared: Vec<&str> = ["mnt", "pid", "net", "ipc", "uts"]
        .into_iter()
        .filter(|ns| !ns_differs(ns))
        .collect();
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let limit = if v1 {
        fs::read_to_string("/sys/fs/cgroup/memory/genos/hostview/memory.limit_in_bytes").unwrap()
    } else {
        fs::read_to_string("/sys/fs/cgroup/genos/hostview/memory.max").unwrap()
    };
    // SAFETY: signalling the jailer we spawned; it forwards SIGTERM to the VMM.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exit = child.wait().unwrap();

    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("Uid:") && l.contains(NOBODY)),
        "{status}"
    );
    assert!(
        shared.is_empty(),
        "namespaces shared with the host: {shared:?}"
    );
    assert!(cgroups.contains("genos/hostview"), "{cgroups}");
    assert_eq!(limit.trim(), "67108864");
    assert!(
        exit.success(),
        "SIGTERM should stop the VMM cleanly: {exit:?}"
    );
    assert!(!jail.pid_file().exists(), "pid file left behind");
}

#[test]
fn the_vmm_exit_status_is_the_jailer_exit_status() {
    if !is_root() {
        return;
    }
    let jail = Jail::new("status");
    let out = jail.command(&[], &["--exit-with", "4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(4));
}

#[test]
fn a_second_jailer_with_the_same_id_is_refused() {
    if !is_root() {
        return;
    }
    let jail = Jail::new("twice");
    let mut first = jail.command(&[], &["--rng"]).spawn().unwrap();
    let _ = first_line(&mut first);
    wait_for(&jail.pid_file());

    let second = jail.command(&[], &["--rng"]).output().unwrap();

    // SAFETY: signalling the jailer we spawned.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    first.wait().unwrap();
    assert_eq!(second.status.code(), Some(71));
    assert!(String::from_utf8_lossy(&second.stderr).contains("already in use"));
}

#[test]
fn a_writable_disk_the_vmm_user_cannot_write_is_refused_before_starting() {
    if !is_root() {
        return;
    }
    let jail = Jail::new("perm");
    let disk = jail.base.join("root.ext4");
    fs::write(&disk, b"disk").unwrap();
    fs::set_permissions(&disk, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    let out = jail
        .command(&[], &["--disk", disk.to_str().unwrap()])
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not writable by uid 65534"), "{err}");
}
