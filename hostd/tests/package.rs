//! The Debian package (scripts/build-deb) installed into a fresh Debian 12 root: built from
//! the workspace's debug builds (`--profile dev`: the suite has made them already, so the
//! package costs no release build; the packaging is what is checked) or taken from
//! `GENOS_DEB` (e.g. the release package), installed with `dpkg -i` in a chroot of a debootstrapped
//! bookworm (its tarball cached under ~/.cache/genos/debootstrap, so reruns skip the
//! download), its files, group, directories and enabled unit checked, the installed unit
//! verified by `systemd-analyze verify` inside the root, `genos doctor --json` run there,
//! then purged and the root compared with what it was before the install.
//!
//! Needs root (chroot, mounts) and debootstrap, dpkg, unshare and systemd-analyze: skipped
//! without them unless `GENOS_REQUIRE` names `root` / `tools`. Each stage has a time
//! limit and prints how long it took.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use testkit::Need;

/// What debootstrap puts in the base beyond minbase: the package's dependencies, so that
/// `dpkg -i` needs no network. Part of the cache key.
const INCLUDE: &str = "systemd,init-system-helpers,nftables,iproute2";
const SUITE: &str = "bookworm";

/// The whole test, build included (with the debug builds and the shipped genos-vmm and
/// genos-agent already there, a few minutes at most).
const TOTAL_LIMIT: Duration = Duration::from_secs(20 * 60);

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `cmd` to completion within `limit`, killing it (and failing the test) past it.
fn run(what: &str, cmd: &mut Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out = pipe(child.stdout.take().map(|s| Box::new(s) as _));
    let err = pipe(child.stderr.take().map(|s| Box::new(s) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what}: still running after {limit:?}, killed");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// As [`run`], failing the test unless `cmd` succeeds.
fn run_ok(what: &str, cmd: &mut Command, limit: Duration) -> Output {
    let o = run(what, cmd, limit);
    assert!(
        o.status.success(),
        "{what}: {}\n{}{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// `args` run by chroot in `root`, in a private mount namespace with /proc, /sys and /dev
/// of the host mounted inside (gone with the namespace: nothing to unmount).
fn in_root(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-ec"])
        .arg(
            r#"r="$1"; shift
mount -t proc proc "$r/proc"
mount --rbind /sys "$r/sys"
mount --rbind /dev "$r/dev"
exec chroot "$r" "$@""#,
        )
        .arg("sh")
        .arg(root)
        .args(args)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    c
}

/// Stage times, printed as they come and at the end.
struct Stages {
    start: Instant,
    last: Instant,
    done: Vec<(&'static str, Duration)>,
}

impl Stages {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            done: Vec::new(),
        }
    }
    fn end(&mut self, name: &'static str) {
        let took = self.last.elapsed();
        self.last = Instant::now();
        eprintln!("package: {name}: {:.1} s", took.as_secs_f64());
        self.done.push((name, took));
        assert!(
            self.start.elapsed() < TOTAL_LIMIT,
            "over the test's {TOTAL_LIMIT:?}"
        );
    }
    fn summary(&self) {
        for (name, took) in &self.done {
            eprintln!("  {:>7.1} s  {name}", took.as_secs_f64());
        }
        eprintln!("  {:>7.1} s  total", self.start.elapsed().as_secs_f64());
    }
}

/// Every path under `root` (outside /proc, /sys, /dev, /tmp, /run) with its kind, mode and
/// owner, and for regular files the size.
fn tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            if ["proc", "sys", "dev", "tmp", "run"].contains(&rel.as_str()) {
                continue;
            }
            let m = std::fs::symlink_metadata(&path).unwrap();
            let kind = if m.is_symlink() {
                format!("-> {}", std::fs::read_link(&path).unwrap().display())
            } else if m.is_dir() {
                "dir".into()
            } else {
                format!("{} bytes", m.len())
            };
            out.insert(
                rel,
                format!("{kind} {:o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid()),
            );
            if m.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// dpkg's and the system's own bookkeeping, which any install and purge changes.
fn bookkeeping(path: &str) -> bool {
    [
        "var/lib/dpkg/",
        "var/log/",
        "var/cache/debconf/",
        "var/cache/ldconfig/",
        "etc/ld.so.cache",
        // shadow's backups of the files groupadd/groupdel rewrite (compared separately).
        "etc/group-",
        "etc/gshadow-",
    ]
    .iter()
    .any(|p| path.starts_with(p))
}

/// The base root's tarball, made by debootstrap on first use.
fn base_tarball(scratch: &Path) -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    let dir = home.join(".cache/genos/debootstrap");
    std::fs::create_dir_all(&dir).unwrap();
    // The key: what is in the base (FNV-1a of suite, variant and packages).
    let key = format!("{SUITE} minbase {INCLUDE}")
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    let tarball = dir.join(format!("{SUITE}-minbase-{key:016x}.tar"));
    if tarball.is_file() {
        return tarball;
    }
    let mirror = std::env::var("GENOS_DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".into());
    let base = scratch.join("base");
    run_ok(
        "debootstrap",
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
            .arg(&base)
            .arg(&mirror),
        Duration::from_secs(15 * 60),
    );
    let partial = tarball.with_extension("tar.partial");
    run_ok(
        "tar the base",
        Command::new("tar")
            .args(["--numeric-owner", "-cf"])
            .arg(&partial)
            .arg("-C")
            .arg(&base)
            .arg("."),
        Duration::from_secs(5 * 60),
    );
    std::fs::rename(&partial, &tarball).unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    tarball
}

fn tools_missing() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        testkit::skip(Need::Root, "the package test needs root (chroot, mounts)");
        return Some("root".into());
    }
    for (tool, arg) in [
        ("debootstrap", "--version"),
        ("dpkg-deb", "--version"),
        ("help2man", "--version"),
        ("unshare", "--version"),
        ("systemd-analyze", "--version"),
    ] {
        let ok = Command::new(tool)
            .arg(arg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            testkit::skip(
                Need::Tools,
                format!("{tool} not installed (scripts/install-deps)"),
            );
            return Some(tool.into());
        }
    }
    None
}

/// Whether this host's cgroups are v2 only: the doctor's `cgroup` check fails elsewhere,
/// in the chroot as outside it (it reports the host).
fn host_cgroup_v2() -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let v1 = mounts.lines().any(|l| l.contains(" - cgroup "));
    let v2 = mounts.lines().any(|l| l.contains(" - cgroup2 "));
    v2 && !v1
}

#[test]
fn the_package_installs_on_debian_12_and_purges_without_leftovers() {
    if tools_missing().is_some() {
        return;
    }
    let mut stages = Stages::new();
    let scratch = tempfile::tempdir().unwrap();

    // Build (or take) the package.
    let deb = match std::env::var_os("GENOS_DEB") {
        Some(p) => PathBuf::from(p),
        None => {
            let o = run_ok(
                "scripts/build-deb",
                Command::new(workspace().join("scripts/build-deb"))
                    .args(["--profile", "dev"])
                    .arg(scratch.path().join("out")),
                Duration::from_secs(15 * 60),
            );
            eprint!("{}", String::from_utf8_lossy(&o.stderr));
            PathBuf::from(String::from_utf8(o.stdout).unwrap().trim())
        }
    };
    assert!(deb.is_file(), "no package at {}", deb.display());
    stages.end("package built");

    let tarball = base_tarball(scratch.path());
    stages.end("base root (cached tarball)");
    let root = scratch.path().join("root");
    std::fs::create_dir(&root).unwrap();
    run_ok(
        "unpack the base",
        Command::new("tar")
            .args(["--numeric-owner", "-xf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&root),
        Duration::from_secs(5 * 60),
    );
    // No service starts inside the chroot (invoke-rc.d, deb-systemd-invoke ask this).
    let policy = root.join("usr/sbin/policy-rc.d");
    std::fs::write(&policy, "#!/bin/sh\nexit 101\n").unwrap();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(0o755)).unwrap();
    let group_before = std::fs::read_to_string(root.join("etc/group")).unwrap();
    let gshadow_before = std::fs::read_to_string(root.join("etc/gshadow")).unwrap();
    let before = tree(&root);
    std::fs::copy(&deb, root.join("tmp/genos.deb")).unwrap();
    stages.end("fresh root unpacked");

    // Install.
    let install = run_ok(
        "dpkg -i",
        &mut in_root(&root, &["dpkg", "-i", "/tmp/genos.deb"]),
        Duration::from_secs(5 * 60),
    );
    eprint!("{}", String::from_utf8_lossy(&install.stdout));
    stages.end("dpkg -i");

    // Files.
    for bin in [
        "genos-hostd",
        "genos",
        "genos-image",
        "genos-jailer",
        "genos-vmm",
        "genos-agent",
    ] {
        let m = std::fs::metadata(root.join("usr/bin").join(bin))
            .unwrap_or_else(|e| panic!("/usr/bin/{bin}: {e}"));
        assert_eq!(m.mode() & 0o7777, 0o755, "/usr/bin/{bin}");
    }
    for bin in ["genos-vmm", "genos-agent"] {
        let bytes = std::fs::read(root.join("usr/bin").join(bin)).unwrap();
        let interp = b"/lib64/ld-linux-x86-64.so.2";
        assert!(
            !bytes.windows(interp.len()).any(|w| w == interp),
            "{bin} is not static"
        );
    }
    for file in [
        "usr/lib/systemd/system/genos-hostd.service",
        "usr/lib/tmpfiles.d/genos.conf",
        "usr/lib/sysusers.d/genos.conf",
        "usr/share/genos/catalog.toml",
        "usr/share/doc/genos/copyright",
        "usr/share/doc/genos/appliance.md",
        "usr/share/man/man1/genos.1.gz",
        "usr/share/man/man1/genos-image.1.gz",
        "usr/share/man/man1/genos-vmm.1.gz",
        "usr/share/man/man8/genos-hostd.8.gz",
        "usr/share/man/man8/genos-jailer.8.gz",
    ] {
        assert!(root.join(file).is_file(), "/{file} missing");
    }
    let conffile = std::fs::read_to_string(root.join("etc/genos/hostd.toml")).unwrap();
    if std::env::var_os("GENOS_DEB").is_none() {
        // Built just now from this tree (a given package may predate edits of the file).
        let source = std::fs::read_to_string(workspace().join("configs/hostd.toml")).unwrap();
        assert_eq!(conffile, source);
    }
    assert!(conffile.contains("\n[admin]\n"), "{conffile}");
    let status = run_ok(
        "dpkg-query",
        &mut in_root(
            &root,
            &[
                "dpkg-query",
                "-W",
                "-f=${Status} ${Version}\n${Conffiles}\n",
                "genos",
            ],
        ),
        Duration::from_secs(60),
    );
    let status = String::from_utf8(status.stdout).unwrap();
    assert!(
        status.starts_with(&format!(
            "install ok installed {}\n",
            env!("CARGO_PKG_VERSION")
        )),
        "{status}"
    );
    assert!(status.contains(" /etc/genos/hostd.toml "), "{status}");
    let version = run_ok(
        "genos-hostd --version",
        &mut in_root(&root, &["genos-hostd", "--version"]),
        Duration::from_secs(60),
    );
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("genos-hostd {}", env!("CARGO_PKG_VERSION"))
    );

    // The group and directories.
    let group = run_ok(
        "getent group genos",
        &mut in_root(&root, &["getent", "group", "genos"]),
        Duration::from_secs(60),
    );
    let gid: u32 = String::from_utf8_lossy(&group.stdout)
        .split(':')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .expect("the genos group has a gid");
    let state = std::fs::metadata(root.join("var/lib/genos")).unwrap();
    assert_eq!(
        (state.mode() & 0o7777, state.uid(), state.gid()),
        (0o710, 0, gid)
    );
    assert!(root.join("var/cache/genos/images").is_dir());

    // The unit: enabled, not started, verified.
    let wants = root.join("etc/systemd/system/multi-user.target.wants/genos-hostd.service");
    let target = std::fs::read_link(&wants)
        .unwrap_or_else(|e| panic!("genos-hostd.service is not enabled ({e})"));
    assert!(
        target.ends_with("genos-hostd.service")
            && root.join(target.strip_prefix("/").unwrap()).is_file(),
        "{}",
        target.display()
    );
    let verify = run(
        "systemd-analyze verify",
        &mut in_root(
            &root,
            &[
                "systemd-analyze",
                "verify",
                "/usr/lib/systemd/system/genos-hostd.service",
            ],
        ),
        Duration::from_secs(2 * 60),
    );
    let text = String::from_utf8_lossy(&verify.stderr).into_owned()
        + &String::from_utf8_lossy(&verify.stdout);
    assert!(verify.status.success(), "{text}");
    let about_ours: Vec<_> = text.lines().filter(|l| l.contains("genos")).collect();
    assert!(about_ours.is_empty(), "{about_ours:?}");
    stages.end("files, group, unit checked");

    // genos doctor inside the root: only checks that need real KVM (and, on a host that is
    // not cgroup v2, the cgroup check, which reports the host) may fail.
    let doctor = run(
        "genos doctor --json",
        &mut in_root(&root, &["genos", "doctor", "--json"]),
        Duration::from_secs(2 * 60),
    );
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor's JSON: {e}\n{}{}",
            String::from_utf8_lossy(&doctor.stdout),
            String::from_utf8_lossy(&doctor.stderr)
        )
    });
    let findings = report["findings"].as_array().expect("findings");
    assert_eq!(findings.len(), 10, "{report}");
    let failed: Vec<&str> = findings
        .iter()
        .filter(|f| f["verdict"] == "fail")
        .map(|f| f["check"].as_str().unwrap())
        .collect();
    let mut may_fail = vec!["kvm", "cpu"];
    if !host_cgroup_v2() {
        may_fail.push("cgroup");
    }
    for f in findings {
        eprintln!("  doctor: {} {}: {}", f["check"], f["verdict"], f["found"]);
    }
    assert!(
        failed.iter().all(|c| may_fail.contains(c)),
        "failed {failed:?}, only {may_fail:?} may: {report}"
    );
    assert_eq!(doctor.status.success(), failed.is_empty(), "{report}");
    let nft = findings.iter().find(|f| f["check"] == "nftables").unwrap();
    assert_eq!(nft["verdict"], "ok", "{nft}");
    // The package made the state dir; `warn` only for this machine's own disk (under 20 GiB
    // free, as during a CI run).
    let state = findings.iter().find(|f| f["check"] == "state dir").unwrap();
    assert!(
        state["verdict"] == "ok"
            || (state["verdict"] == "warn"
                && state["found"].as_str().unwrap().ends_with("GiB free")),
        "{state}"
    );
    assert!(
        report["config"] == "/etc/genos/hostd.toml",
        "doctor read {}",
        report["config"]
    );
    stages.end("genos doctor");

    // Purge: nothing of the package is left.
    std::fs::remove_file(root.join("tmp/genos.deb")).unwrap();
    run_ok(
        "dpkg --purge",
        &mut in_root(&root, &["dpkg", "--purge", "genos"]),
        Duration::from_secs(5 * 60),
    );
    let after = tree(&root);
    let changed: Vec<String> = before
        .iter()
        .filter(|(p, v)| !bookkeeping(p) && after.get(*p) != Some(*v))
        .map(|(p, v)| format!("{p}: was {v}, now {:?}", after.get(p)))
        .chain(
            after
                .iter()
                .filter(|(p, _)| !bookkeeping(p) && !before.contains_key(*p))
                .map(|(p, v)| format!("{p}: left ({v})")),
        )
        .filter(|line| !line.starts_with("usr/sbin/policy-rc.d"))
        .collect();
    assert!(changed.is_empty(), "after purge:\n{}", changed.join("\n"));
    assert!(!after.keys().any(|p| p.contains("genos") && !bookkeeping(p)));
    assert_eq!(
        std::fs::read_to_string(root.join("etc/group")).unwrap(),
        group_before
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/gshadow")).unwrap(),
        gshadow_before
    );
    stages.end("purged, root compared");
    stages.summary();
}
