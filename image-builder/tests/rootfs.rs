//! Root filesystem images built from specs with debootstrap and `mkfs.ext4 -d`.
//!
//! These need root (debootstrap, chroot) and Debian's mirror (the Ubuntu one, ignored by
//! default, Ubuntu's archive and Debian's `ubuntu-keyring`); they skip with a message
//! otherwise. They use the default cache (`GENOS_IMAGE_CACHE` or ~/.cache/genos/images)
//! so the base layer is downloaded once per machine, not per run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use image_builder::cache::{Artifact, ArtifactKind, Cache};
use image_builder::rootfs::{self, RootfsError, RootfsOptions};
use proto::spec::Spec;

fn spec(name: &str, desktop: &str, apps: &[&str]) -> Spec {
    common::spec_on("debian-12", name, desktop, apps)
}

fn can_build() -> bool {
    if !common::root_or_skip("building root filesystems needs root") {
        return false;
    }
    for tool in ["debootstrap", "mkfs.ext4", "e2fsck", "debugfs"] {
        if image_builder::tools::find(tool).is_none() {
            testkit::skip(
                testkit::Need::Tools,
                format!("{tool} missing (install debootstrap and e2fsprogs)"),
            );
            return false;
        }
    }
    true
}

fn debugfs(image: &Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    assert!(out.status.success(), "debugfs -R {request:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn temp_dir(name: &str) -> PathBuf {
    common::temp_dir("rootfs", name)
}

/// Builds `spec` with the default options into the machine's cache and writes it out, grown
/// by `grow_gib`, as `<name>.ext4` in a scratch directory; checks that e2fsck finds it
/// clean. The scratch directory, the image and the artifact.
fn build_clean_image(name: &str, spec: &Spec, grow_gib: u32) -> (PathBuf, PathBuf, Artifact) {
    let cache = Cache::open(None).unwrap();
    let out_dir = temp_dir(name);
    let out = out_dir.join(format!("{name}.ext4"));
    let artifact = rootfs::build(&cache, spec, &RootfsOptions::default()).unwrap();
    rootfs::write_out(&artifact, &out, u64::from(grow_gib)).unwrap();
    assert_fsck_clean(&out);
    (out_dir, out, artifact)
}

/// Checks that `e2fsck -fn` finds the image clean.
fn assert_fsck_clean(image: &Path) {
    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

/// Checks that the image's user genos exists and is logged in automatically on `getty`
/// (`getty@tty1`, `serial-getty@ttyS0`).
fn assert_autologin(image: &Path, getty: &str) {
    assert!(debugfs(image, "cat /etc/passwd").contains("genos:x:1000:1000::/home/genos:/bin/bash"));
    let dropin = format!("cat /etc/systemd/system/{getty}.service.d/autologin.conf");
    assert!(debugfs(image, &dropin).contains("--autologin genos"));
}

#[test]
fn minimal_spec_builds_a_clean_ext4_image_and_hits_the_cache_next_time() {
    if !can_build() {
        return;
    }
    let minimal = spec("minimal", "none", &[]);

    let (out_dir, out, artifact) = build_clean_image("minimal", &minimal, minimal.disk_gib);

    let root = debugfs(&out, "ls -l /");
    for entry in ["etc", "usr", "home", "var"] {
        assert!(
            root.contains(&format!(" {entry}\n")) || root.contains(&format!(" {entry} ")),
            "{entry}: {root}"
        );
    }
    assert_eq!(debugfs(&out, "cat /etc/hostname"), "genos\n");
    assert_autologin(&out, "getty@tty1");
    assert!(debugfs(&out, "stat /usr/lib/systemd/systemd").contains("Type: regular"));
    let grown = u64::from(minimal.disk_gib) << 30;
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        artifact.manifest.size_bytes + grown
    );
    let stats = debugfs(&out, "stats");
    let blocks: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .map(|v| v.trim().parse().unwrap())
        .unwrap();
    assert!(
        blocks * 4096 >= artifact.manifest.size_bytes + grown - (64 << 20),
        "file system not grown: {blocks} blocks"
    );

    let cache = Cache::open(None).unwrap();
    let again = rootfs::build(&cache, &minimal, &RootfsOptions::default()).unwrap();
    assert_eq!(again.dir, artifact.dir, "second build must hit the cache");
    assert_eq!(again.manifest, artifact.manifest);
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn debootstrap_failure_leaves_no_partial_artifact() {
    if !can_build() {
        return;
    }
    let cache_dir = temp_dir("failure-cache");
    let cache = Cache::at(cache_dir.clone()).unwrap();
    // A local "mirror" with an unsigned Release file and nothing else: the probe finds the
    // Release file, debootstrap then fails at once, without network traffic.
    let mirror_dir = temp_dir("failure-mirror");
    std::fs::create_dir_all(mirror_dir.join("dists/bookworm")).unwrap();
    std::fs::write(
        mirror_dir.join("dists/bookworm/Release"),
        "Suite: bookworm\n",
    )
    .unwrap();
    let options = RootfsOptions {
        mirror: Some(format!("file://{}", mirror_dir.display())),
        ..Default::default()
    };
    let out = cache_dir.join("never.ext4");

    let err = rootfs::build(&cache, &spec("broken", "none", &[]), &options).unwrap_err();

    assert!(matches!(err, RootfsError::Tool(_)), "{err:?}");
    assert!(err.to_string().contains("debootstrap"), "{err}");
    assert!(cache.list().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(cache_dir.join("tmp")).unwrap().count(),
        0,
        "staging left behind"
    );
    for kind in [ArtifactKind::Base, ArtifactKind::Rootfs] {
        let dir = cache_dir.join(kind.as_str());
        assert!(
            !dir.exists() || std::fs::read_dir(&dir).unwrap().count() == 0,
            "{kind} dir not empty"
        );
    }
    assert!(!out.exists());
    std::fs::remove_dir_all(&cache_dir).unwrap();
    std::fs::remove_dir_all(&mirror_dir).unwrap();
}

#[test]
fn unknown_app_is_refused_before_any_work() {
    let cache_dir = temp_dir("unknown-app");
    let cache = Cache::at(cache_dir.clone()).unwrap();
    let mut bad = spec("bad", "xfce", &[]);
    bad.apps = vec!["gimpp".into()];

    let err = rootfs::build(&cache, &bad, &RootfsOptions::default()).unwrap_err();

    assert_eq!(
        err.to_string(),
        "unknown app \"gimpp\"; see the catalog for known apps (did you mean gimp?)"
    );
    assert!(cache.list().unwrap().is_empty());
    std::fs::remove_dir_all(&cache_dir).unwrap();
}

/// Slow (downloads and installs Xfce and Xorg, several minutes): run with
/// `cargo test -p genos-image --test rootfs -- --ignored`.
#[test]
#[ignore]
fn xfce_desktop_spec_builds_with_autologin_into_x() {
    if !can_build() {
        return;
    }
    let desktop = spec("desktop", "xfce", &["firefox"]);

    let (out_dir, out, _) = build_clean_image("xfce", &desktop, desktop.disk_gib);

    for binary in [
        "/usr/bin/startxfce4",
        "/usr/bin/Xorg",
        "/usr/bin/startx",
        "/usr/bin/firefox-esr",
    ] {
        assert!(
            !debugfs(&out, &format!("stat {binary}")).is_empty(),
            "{binary} missing"
        );
    }
    assert!(debugfs(&out, "cat /home/genos/.bash_profile")
        .contains("exec startx /usr/local/bin/genos-x-session /usr/bin/startxfce4"));
    std::fs::remove_dir_all(&out_dir).unwrap();
}

/// Slow (debootstraps Ubuntu 24.04 from Ubuntu's archive, about 2 minutes, then installs
/// git): run with `cargo test -p genos-image --test rootfs -- --ignored`. Needs Ubuntu's
/// archive keyring from Debian's `ubuntu-keyring` package (Debian 13; on Debian 12 the
/// trixie package installs as it is: it only ships the keyrings).
#[test]
#[ignore]
fn ubuntu_noble_spec_builds_from_ubuntus_archive_with_autologin() {
    if !can_build() {
        return;
    }
    if !Path::new("/usr/share/keyrings/ubuntu-archive-keyring.gpg").is_file() {
        testkit::skip(
            testkit::Need::Tools,
            "Ubuntu's archive keyring is missing (install ubuntu-keyring)",
        );
        return;
    }
    let noble = common::spec_on("ubuntu-24.04", "noble", "none", &["git"]);

    let (out_dir, out, _) = build_clean_image("ubuntu", &noble, 0);

    // /etc/os-release is a symlink, which debugfs does not follow.
    let release = debugfs(&out, "cat /usr/lib/os-release");
    assert!(release.contains("VERSION_ID=\"24.04\""), "{release}");
    assert!(debugfs(&out, "cat /etc/apt/sources.list").contains("noble-security main universe"));
    assert!(
        !debugfs(&out, "stat /usr/bin/git").is_empty(),
        "git missing"
    );
    assert_autologin(&out, "serial-getty@ttyS0");
    std::fs::remove_dir_all(&out_dir).unwrap();
}
