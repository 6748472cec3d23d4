//! The sandbox as the running VMM applies it. `main` compiles the seccomp filters once
//! ([`init`]); each thread installs its role's filter itself ([`enter`]) once its set-up is
//! done; the main thread restricts the process's files with Landlock once the VM is built
//! and before the vCPU threads exist ([`restrict_files`]), so that they inherit it.
//!
//! The state is process-wide (set once by `main`): the VMM's threads are spawned in
//! several modules, and a library user that never calls [`init`] (unit and tiny-guest
//! tests building a VM in-process) gets no sandbox at all.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::landlock::{restrict_to, LandlockError, LandlockStatus, PathAccess};
use super::seccomp::{
    make_forbidden_syscall, SeccompError, SeccompFilters, SeccompMode, ThreadRole,
};
use crate::config::{SerialConfig, VmConfig};

/// Device nodes the VMM uses once running, when they exist on this host.
const DEVICE_NODES: [&str; 3] = ["/dev/kvm", "/dev/net/tun", "/dev/urandom"];

/// Exit status when a thread cannot install its filter (internal VMM error).
const EXIT_INTERNAL: i32 = 1;

/// Errors setting up or applying the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Compiling or installing a seccomp filter failed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// Building or applying the Landlock ruleset failed.
    #[error(transparent)]
    Landlock(#[from] LandlockError),
    /// [`init`] ran twice.
    #[error("the sandbox is already initialised")]
    AlreadyInitialised,
}

/// The command line's sandbox options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxOptions {
    /// What the seccomp filters do with a call off their lists.
    pub seccomp: SeccompMode,
    /// Test only: this role's thread makes a forbidden call once its filter is installed.
    pub selftest: Option<ThreadRole>,
    /// Whether to restrict file access with Landlock.
    pub landlock: bool,
}

pub use vmm_api::SandboxStatus;

struct Sandbox {
    filters: SeccompFilters,
    selftest: Option<ThreadRole>,
    landlock: bool,
    api_sock_dir: Option<PathBuf>,
    landlock_status: OnceLock<LandlockStatus>,
}

static SANDBOX: OnceLock<Sandbox> = OnceLock::new();

/// Compiles the filters for `options`; call once from `main`, before any thread exists.
/// `api_sock` is the control socket, whose directory stays reachable so that the VMM can
/// remove the socket when it ends.
pub fn init(options: &SandboxOptions, api_sock: Option<&Path>) -> Result<(), SandboxError> {
    let filters = SeccompFilters::compile(options.seccomp)?;
    let api_sock_dir = api_sock.map(|sock| match sock.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    });
    SANDBOX
        .set(Sandbox {
            filters,
            selftest: options.selftest,
            landlock: options.landlock,
            api_sock_dir,
            landlock_status: OnceLock::new(),
        })
        .map_err(|_| SandboxError::AlreadyInitialised)
}

/// Confines the calling thread as `role`: the API thread also drops all file access
/// (it needs none), then the role's seccomp filter is installed. A no-op without [`init`].
pub fn enter(role: ThreadRole) -> Result<(), SandboxError> {
    let Some(sandbox) = SANDBOX.get() else {
        return Ok(());
    };
    if role == ThreadRole::Api && sandbox.landlock {
        restrict_to(&[])?;
    }
    sandbox.filters.apply(role)?;
    if sandbox.selftest == Some(role) {
        tracing::warn!(
            "seccomp self-test: the {} thread makes a forbidden call",
            role.name()
        );
        make_forbidden_syscall();
    }
    Ok(())
}

/// Confines a short-lived helper thread with `role`'s seccomp filter (no self-test: that
/// belongs to the role's own thread). A no-op without [`init`].
pub fn confine_helper(role: ThreadRole) -> Result<(), SandboxError> {
    match SANDBOX.get() {
        Some(sandbox) => Ok(sandbox.filters.apply(role)?),
        None => Ok(()),
    }
}

/// [`enter`], for threads with no one to report to: a thread that cannot be confined
/// must not run guest or client input, so the process exits (status 1).
pub fn enter_or_exit(role: ThreadRole) {
    if let Err(e) = enter(role) {
        eprintln!("genos-vmm: {}", crate::vmm::error_chain(&e));
        std::process::exit(EXIT_INTERNAL);
    }
}

/// The files the VM built from `config` uses after start.
fn allowed_paths(config: &VmConfig, api_sock_dir: Option<&Path>) -> Vec<PathAccess> {
    let mut paths = vec![PathAccess::ReadFile(config.kernel.clone())];
    paths.extend(config.initrd.iter().cloned().map(PathAccess::ReadFile));
    paths.extend(config.disks.iter().map(|disk| match disk.read_only {
        true => PathAccess::ReadFile(disk.path.clone()),
        false => PathAccess::ReadWriteFile(disk.path.clone()),
    }));
    if let SerialConfig::File(path) = &config.serial {
        paths.push(PathAccess::ReadWriteFile(path.clone()));
    }
    paths.extend(
        DEVICE_NODES
            .iter()
            .map(Path::new)
            .filter(|node| node.exists())
            .map(|node| match node.ends_with("urandom") {
                true => PathAccess::ReadFile(node.to_path_buf()),
                false => PathAccess::ReadWriteFile(node.to_path_buf()),
            }),
    );
    paths.extend(api_sock_dir.map(|dir| PathAccess::SocketDir(dir.to_path_buf())));
    // Snapshot files (`PUT /snapshot/create`) go beside the API socket.
    paths.extend(api_sock_dir.map(|dir| PathAccess::FileDir(dir.to_path_buf())));
    paths
}

/// Restricts the process's file access to what the VM built from `config` uses. Call it
/// on the main thread after every file is opened and before the vCPU threads are spawned.
/// A no-op without [`init`]; returns the status (also logged once).
pub fn restrict_files(config: &VmConfig) -> Result<Option<LandlockStatus>, SandboxError> {
    restrict_files_with(|api_sock_dir| allowed_paths(config, api_sock_dir))
}

/// [`restrict_files`] for a VM restored from a snapshot: its memory comes from
/// `mem_file` and no kernel or initrd is read (they need not exist on this host).
pub fn restrict_files_restored(
    config: &VmConfig,
    mem_file: &Path,
) -> Result<Option<LandlockStatus>, SandboxError> {
    restrict_files_with(|api_sock_dir| {
        let mut paths: Vec<PathAccess> = allowed_paths(config, api_sock_dir)
            .into_iter()
            .filter(|p| {
                !matches!(p, PathAccess::ReadFile(f)
                        if *f == config.kernel || Some(f) == config.initrd.as_ref())
            })
            .collect();
        paths.push(PathAccess::ReadFile(mem_file.to_path_buf()));
        paths
    })
}

/// Applies the Landlock ruleset over the paths `allowed` lists (given the API socket's
/// directory) when the sandbox has Landlock on, and records and logs the status.
fn restrict_files_with(
    allowed: impl FnOnce(Option<&Path>) -> Vec<PathAccess>,
) -> Result<Option<LandlockStatus>, SandboxError> {
    let Some(sandbox) = SANDBOX.get() else {
        return Ok(None);
    };
    let status = match sandbox.landlock {
        true => restrict_to(&allowed(sandbox.api_sock_dir.as_deref()))?,
        false => LandlockStatus::Disabled,
    };
    let _ = sandbox.landlock_status.set(status);
    tracing::info!(
        "sandbox: seccomp {}, landlock {status}",
        sandbox.filters.mode()
    );
    Ok(Some(status))
}

/// The sandbox's state for `describe`; `None` when the VMM runs without [`init`].
pub fn status() -> Option<SandboxStatus> {
    SANDBOX.get().map(|sandbox| SandboxStatus {
        seccomp: sandbox.filters.mode(),
        landlock: sandbox.landlock_status.get().copied(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DiskConfig;

    #[test]
    fn allowed_paths_name_every_file_the_config_uses() {
        let mut config = VmConfig::new("/images/vmlinux");
        config.initrd = Some("/images/initrd".into());
        config.disks = vec![
            DiskConfig {
                path: "/images/root.img".into(),
                read_only: true,
            },
            DiskConfig {
                path: "/images/data.img".into(),
                read_only: false,
            },
        ];
        config.serial = SerialConfig::File("/run/console.log".into());

        let paths = allowed_paths(&config, Some(Path::new("/run")));

        for expected in [
            PathAccess::ReadFile("/images/vmlinux".into()),
            PathAccess::ReadFile("/images/initrd".into()),
            PathAccess::ReadFile("/images/root.img".into()),
            PathAccess::ReadWriteFile("/images/data.img".into()),
            PathAccess::ReadWriteFile("/run/console.log".into()),
            PathAccess::SocketDir("/run".into()),
        ] {
            assert!(
                paths.contains(&expected),
                "{expected:?} missing from {paths:?}"
            );
        }
        assert!(!paths.contains(&PathAccess::ReadWriteFile("/dev/urandom".into())));
    }
}
