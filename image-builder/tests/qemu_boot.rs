//! Boots the guest kernel with our initramfs under QEMU (TCG, no KVM) and waits for the
//! init's ready line: proof that the archive, the init script and the kernel's initramfs
//! support work, independent of genos-vmm. Guest user space cannot run under this
//! machine's nested KVM, hence TCG.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use image_builder::cache::Cache;
use image_builder::initramfs::{self, InitramfsOptions, READY_LINE};
use image_builder::tools;

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Kills QEMU if the test fails before it exits by itself.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs QEMU and returns the console lines up to and including the first one containing
/// `until`, or every line seen if it never came.
fn boot(
    kernel: &PathBuf,
    initrd: &PathBuf,
    append: &str,
    extra: &[&str],
    until: &str,
) -> (bool, Vec<String>) {
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-M",
            "microvm,acpi=off",
            "-m",
            "256",
            "-smp",
            "1",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-nodefaults", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", append])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-x86_64");
    let mut qemu = KillOnDrop(child);
    let stdout = qemu.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut lines = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                eprintln!("guest: {line}");
                let done = line.contains(until);
                lines.push(line);
                if done {
                    return (true, lines);
                }
            }
            Err(_) => break,
        }
    }
    (false, lines)
}

fn inputs() -> Option<(PathBuf, PathBuf)> {
    if tools::find("qemu-system-x86_64").is_none() {
        testkit::skip(
            testkit::Need::Tools,
            "qemu-system-x86_64 missing (install qemu-system-x86)",
        );
        return None;
    }
    let Some(kernel) = std::env::var_os("GENOS_GUEST_KERNEL").map(PathBuf::from) else {
        testkit::skip(
            testkit::Need::Kernel,
            "GENOS_GUEST_KERNEL is unset (scripts/test sets it after `genos-image kernel`)",
        );
        return None;
    };
    let initrd = match std::env::var_os("GENOS_GUEST_INITRAMFS") {
        Some(path) => PathBuf::from(path),
        None => {
            let cache = Cache::open(None).unwrap();
            initramfs::build(&cache, &InitramfsOptions::default())
                .unwrap()
                .path()
        }
    };
    Some((kernel, initrd))
}

/// Boots our initramfs with no disk and `cmdline` until `wait_for` shows on the console:
/// whether it did, and the console's lines; None (skipped) without the guest kernel.
fn boot_initramfs(cmdline: &str, wait_for: &str) -> Option<(bool, Vec<String>)> {
    let (kernel, initrd) = inputs()?;
    Some(boot(&kernel, &initrd, cmdline, &[], wait_for))
}

#[test]
fn initramfs_init_prints_ready_line_under_qemu_tcg() {
    let cmdline = "console=ttyS0 panic=-1 genos.exit=reboot";
    let Some((ready, lines)) = boot_initramfs(cmdline, READY_LINE) else {
        return;
    };

    assert!(
        ready,
        "no {READY_LINE:?} within {BOOT_TIMEOUT:?}; console:\n{}",
        lines.join("\n")
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("Run /init as init process")),
        "{}",
        lines.join("\n")
    );
}

#[test]
fn initramfs_without_root_disk_stays_with_a_shell() {
    let Some((stayed, lines)) =
        boot_initramfs("console=ttyS0 panic=-1", "staying in the initramfs")
    else {
        return;
    };

    assert!(stayed, "console:\n{}", lines.join("\n"));
    assert!(lines.iter().any(|l| l.contains(READY_LINE)));
}

/// Slow (about two minutes of TCG): the initramfs switches into a minimal root
/// filesystem from `genos-image rootfs` and systemd logs the user in on the serial
/// console. Run with `cargo test -p genos-image --test qemu_boot -- --ignored`.
#[test]
#[ignore]
fn minimal_rootfs_boots_to_autologin_under_qemu_tcg() {
    boots_to_autologin("debian-12", &[]);
}

/// Slow, like the Debian one, and it builds Ubuntu 24.04 from Ubuntu's archive first
/// (about 3 minutes, cached after): needs Debian's `ubuntu-keyring`.
#[test]
#[ignore]
fn ubuntu_rootfs_boots_to_autologin_under_qemu_tcg() {
    if !std::path::Path::new("/usr/share/keyrings/ubuntu-archive-keyring.gpg").is_file() {
        testkit::skip(
            testkit::Need::Tools,
            "Ubuntu's archive keyring is missing (install ubuntu-keyring)",
        );
        return;
    }
    boots_to_autologin("ubuntu-24.04", &["git"]);
}

fn boots_to_autologin(base: &str, apps: &[&str]) {
    let Some((kernel, initrd)) = inputs() else {
        return;
    };
    if !common::root_or_skip("building the root filesystem needs root") {
        return;
    }
    let spec = common::spec_on(base, "minimal", "none", apps);
    let cache = Cache::open(None).unwrap();
    let artifact = image_builder::rootfs::build(&cache, &spec, &Default::default()).unwrap();
    let disk = std::env::temp_dir().join(format!(
        "genos-boot-test-{base}-{}.ext4",
        std::process::id()
    ));
    image_builder::rootfs::write_out(&artifact, &disk, 1).unwrap();
    let drive = format!("id=root,file={},format=raw,if=none", disk.display());

    let (logged_in, lines) = boot(
        &kernel,
        &initrd,
        "console=ttyS0 panic=-1 systemd.hostname=booted",
        &["-drive", &drive, "-device", "virtio-blk-device,drive=root"],
        "booted login: genos (automatic login)",
    );

    std::fs::remove_file(&disk).unwrap();
    assert!(logged_in, "{base} console:\n{}", lines.join("\n"));
    assert!(lines
        .iter()
        .any(|l| l.contains("genos-init: switching to /dev/vda")));
}
