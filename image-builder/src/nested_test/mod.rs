//! TEST ONLY: the `nested-test` guest kernel flavour and its initramfs, for hosts whose KVM
//! is a nested `kvm_pvm` in "native" mode (this project's development and CI machines).
//!
//! That KVM interprets guest kernel code and delivers a `syscall` from guest user mode to
//! `MSR_LSTAR` still in user mode, where it faults. `syscall-via-pf.patch` (Linux 6.1,
//! `arch/x86/mm/fault.c`) turns exactly that fault back into the system call when the kernel
//! is booted with `pvm_syscall_pf=1`, which this flavour builds into its command line. The
//! config (`nested-test.config`) is tinyconfig plus the least the agent's vsock test needs,
//! since every guest kernel instruction costs ~2 µs here. Real KVM hosts never need any of
//! it: the shipped kernel (`configs/guest-kernel.config`, [`crate::kernel::DEFAULT_CONFIG_FRAGMENT`])
//! has neither the patch nor this config, and is built from a separate source tree.
//!
//! The initramfs holds the static `genos-agent`, made PID 1 by a two-line `/init` (static
//! busybox `sh`, then `exec`: the kernel passes its unknown boot options to init as arguments,
//! which the agent refuses), and nothing else that runs: a guest system call costs ~1.2 ms.
//! It is an uncompressed cpio archive, since gunzip in the interpreted guest kernel is slow.

use std::fs;
use std::path::Path;
use std::time::Instant;

use crate::cache::{sha256_hex, Artifact, ArtifactKind, Cache, Cached, InputHasher};
use crate::cpio::{self, Entry};
use crate::initramfs::{self, InitramfsError};
use crate::kernel::{KernelOptions, PatchedTree};

/// The flavour's name (`genos-image kernel --flavour nested-test`) and its work trees' suffix.
pub const NAME: &str = "nested-test";
/// Config fragment merged onto tinyconfig.
pub const CONFIG_FRAGMENT: &str = include_str!("nested-test.config");
/// The guest-kernel shim (copy of the nested-KVM notes' patch).
pub const SYSCALL_VIA_PF_PATCH: &str = include_str!("syscall-via-pf.patch");
/// The kernel argument that turns the shim on; built into the flavour's command line.
pub const SHIM_ARG: &str = "pvm_syscall_pf=1";
/// `/init`: execs the agent (as PID 1) with its own arguments.
pub const INIT_SCRIPT: &str = include_str!("init.sh");
/// The patched source tree the flavour is built in.
pub const PATCHED_TREE: PatchedTree = PatchedTree {
    name: NAME,
    patches: &[("syscall-via-pf.patch", SYSCALL_VIA_PF_PATCH)],
};
/// Accounts the agent resolves (`/etc/passwd`, `/etc/group`): root only, home `/root`.
pub const PASSWD: &str = "root:x:0:0:root:/root:/init\n";
pub const GROUP: &str = "root:x:0:\n";
const INITRAMFS_RECIPE: &str = "genos-nested-test-initramfs-v2";
/// Uncompressed: the interpreted guest kernel took 160 s to gunzip 1.7 MB (measured here).
pub const INITRAMFS_ARTIFACT: &str = "initramfs.cpio";

/// What `genos-image kernel --flavour nested-test` builds.
pub fn kernel_options() -> KernelOptions {
    KernelOptions {
        config_fragment: CONFIG_FRAGMENT.to_string(),
        patched: Some(PATCHED_TREE),
        ..KernelOptions::default()
    }
}

/// The archive's entries: the mount points the agent uses as PID 1, the console, root's
/// account, busybox for `/init` and as the `ip` the agent configures the network with, and
/// the agent.
pub fn initramfs_entries(busybox: Vec<u8>, agent: Vec<u8>) -> Vec<Entry> {
    let dir = |path: &str, mode| Entry::Dir {
        path: path.to_string(),
        mode,
    };
    let file = |path: &str, mode, data: Vec<u8>| Entry::File {
        path: path.to_string(),
        mode,
        data,
    };
    vec![
        dir("bin", 0o755),
        file("bin/busybox", 0o755, busybox),
        Entry::Symlink {
            path: "bin/ip".into(),
            target: "busybox".into(),
        },
        dir("dev", 0o755),
        Entry::CharDevice {
            path: "dev/console".into(),
            mode: 0o600,
            major: 5,
            minor: 1,
        },
        dir("etc", 0o755),
        file("etc/passwd", 0o644, PASSWD.as_bytes().to_vec()),
        file("etc/group", 0o644, GROUP.as_bytes().to_vec()),
        dir("proc", 0o755),
        dir("root", 0o700),
        dir("run", 0o755),
        dir("sbin", 0o755),
        file("sbin/genos-agent", 0o755, agent),
        dir("sys", 0o755),
        dir("tmp", 0o1777),
        file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec()),
    ]
}

/// Returns the cached test initramfs for the static busybox and agent, building it on a miss.
pub fn build_initramfs(
    cache: &Cache,
    busybox: &Path,
    agent: &Path,
) -> Result<Artifact, InitramfsError> {
    let busybox_bytes = fs::read(busybox).map_err(|source| InitramfsError::Busybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    if initramfs::elf_is_static(&busybox_bytes) != Some(true) {
        return Err(InitramfsError::BusyboxNotStatic(busybox.to_path_buf()));
    }
    let bytes = fs::read(agent).map_err(|source| InitramfsError::Agent {
        path: agent.to_path_buf(),
        source,
    })?;
    if initramfs::elf_is_static(&bytes) != Some(true) {
        return Err(InitramfsError::AgentNotStatic(agent.to_path_buf()));
    }
    let agent_sha = sha256_hex(&bytes);
    let busybox_sha = sha256_hex(&busybox_bytes);
    let mut hasher = InputHasher::new(INITRAMFS_RECIPE);
    hasher
        .add("busybox", busybox_sha.as_bytes())
        .add("init", INIT_SCRIPT.as_bytes())
        .add("agent", agent_sha.as_bytes())
        .add("passwd", PASSWD.as_bytes())
        .add("group", GROUP.as_bytes());
    let hash = hasher.finish();
    let _lock = match cache.lookup_or_lock(ArtifactKind::Initramfs, &hash)? {
        Cached::Hit(hit) => return Ok(hit),
        Cached::Miss(lock) => lock,
    };
    let started = Instant::now();
    let mut packed = Vec::new();
    cpio::write_archive(&mut packed, &initramfs_entries(busybox_bytes, bytes))?;
    let staging = cache.stage(ArtifactKind::Initramfs, &hash)?;
    let path = staging.path().join(INITRAMFS_ARTIFACT);
    fs::write(&path, &packed).map_err(|source| InitramfsError::Write {
        path: path.clone(),
        source,
    })?;
    let inputs = serde_json::json!({
        "flavour": NAME,
        "busybox": busybox,
        "busybox_sha256": busybox_sha,
        "agent": agent,
        "agent_sha256": agent_sha,
    });
    Ok(cache.publish(
        staging,
        ArtifactKind::Initramfs,
        &hash,
        INITRAMFS_ARTIFACT,
        started.elapsed(),
        inputs,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel;

    fn requires(fragment: &str, line: &str) -> bool {
        let reqs = kernel::parse_fragment(fragment);
        let want = kernel::parse_fragment(line);
        want.iter().all(|w| reqs.contains(w))
    }

    #[test]
    fn the_flavour_turns_the_shim_on_and_has_the_test_devices() {
        assert!(requires(CONFIG_FRAGMENT, "CONFIG_CMDLINE_BOOL=y"));
        assert!(requires(
            CONFIG_FRAGMENT,
            &format!("CONFIG_CMDLINE=\"{SHIM_ARG}\"")
        ));
        for line in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y",
            "CONFIG_VIRTIO_VSOCKETS=y",
            "CONFIG_BLK_DEV_INITRD=y",
            "CONFIG_SERIAL_8250_CONSOLE=y",
            "CONFIG_DEVTMPFS=y",
            "# CONFIG_SMP is not set",
            "# CONFIG_PARAVIRT is not set",
        ] {
            assert!(requires(CONFIG_FRAGMENT, line), "{line}");
        }
    }

    #[test]
    fn the_shipped_kernel_has_neither_the_shim_nor_its_argument() {
        let shipped = KernelOptions::default();

        assert!(shipped.patched.is_none());
        assert!(!shipped.config_fragment.contains("pvm_syscall_pf"));
        assert!(!shipped.config_fragment.contains("CONFIG_CMDLINE"));
    }

    #[test]
    fn the_patch_is_the_fault_handler_shim() {
        assert!(SYSCALL_VIA_PF_PATCH.starts_with("TEST ONLY"));
        assert!(SYSCALL_VIA_PF_PATCH.contains("\n--- a/arch/x86/mm/fault.c\n"));
        assert!(SYSCALL_VIA_PF_PATCH.contains("__setup(\"pvm_syscall_pf=\""));
    }

    #[test]
    fn the_flavour_is_cached_apart_from_the_shipped_kernel() {
        let shipped = KernelOptions::default();
        let without_patch = KernelOptions {
            patched: None,
            ..kernel_options()
        };

        let flavour = kernel::input_hash("1", &kernel_options());

        assert_ne!(flavour, kernel::input_hash("1", &shipped));
        assert_ne!(flavour, kernel::input_hash("1", &without_patch));
    }

    #[test]
    fn the_initramfs_execs_the_agent_as_pid1_and_knows_root() {
        let entries = initramfs_entries(vec![0x7e], vec![0x7f]);
        let find = |path: &str| entries.iter().find(|e| e.path() == path);

        assert!(matches!(
            find("sbin/genos-agent"),
            Some(Entry::File { mode: 0o755, data, .. }) if data == &[0x7f]
        ));
        assert!(matches!(
            find("bin/busybox"),
            Some(Entry::File { mode: 0o755, data, .. }) if data == &[0x7e]
        ));
        assert!(matches!(
            find("init"),
            Some(Entry::File { mode: 0o755, .. })
        ));
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh\n"));
        assert!(INIT_SCRIPT.contains("\nexec /sbin/genos-agent --initramfs\n"));
        assert!(matches!(
            find("etc/passwd"),
            Some(Entry::File { data, .. }) if data.starts_with(b"root:x:0:0:root:/root:")
        ));
        assert!(find("dev/console").is_some());
        assert!(matches!(
            find("bin/ip"),
            Some(Entry::Symlink { target, .. }) if target == "busybox"
        ));
    }
}
