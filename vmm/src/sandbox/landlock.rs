//! Landlock: once the VM is built, the VMM may touch only the files its configuration
//! names (kernel, initrd, disks, console file, API socket directory) and the device
//! nodes it uses, may neither bind nor connect TCP, and may not signal or reach abstract
//! sockets outside itself.
//!
//! Rules are best effort: on a kernel with an older Landlock ABI the VMM runs with what
//! that kernel enforces and reports it; callers decide whether that is acceptable.

use std::path::PathBuf;

use landlock::{
    Access, AccessFs, AccessNet, BitFlags, PathBeneath, PathFd, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

/// Errors from building or applying the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The ruleset could not be built or applied.
    #[error("landlock ruleset: {0}")]
    Ruleset(#[from] landlock::RulesetError),
    /// A path to allow could not be opened.
    #[error("landlock rule for {path}: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: landlock::PathFdError,
    },
}

pub use vmm_api::LandlockStatus;

/// What the VMM may do with one path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathAccess {
    /// Read a file (kernel, read-only disk, /dev/urandom).
    ReadFile(PathBuf),
    /// Read and write a file (writable disk, console file, /dev/kvm, /dev/net/tun).
    ReadWriteFile(PathBuf),
    /// Create and remove Unix sockets in a directory (the API socket).
    SocketDir(PathBuf),
    /// Create, write and read regular files in a directory (snapshot files).
    FileDir(PathBuf),
}

/// The newest ABI this VMM knows; older kernels get what they support.
const ABI_TARGET: ABI = ABI::V6;

/// Restricts the calling process (all threads created after this call, and the caller)
/// to `paths`. Call it from the main thread before spawning threads that must be bound
/// too (Landlock, like seccomp, applies to the calling thread and its future children).
pub fn restrict_to(paths: &[PathAccess]) -> Result<LandlockStatus, LandlockError> {
    let file_read = AccessFs::ReadFile;
    let file_rw: BitFlags<AccessFs> =
        AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let dir_sock: BitFlags<AccessFs> =
        AccessFs::MakeSock | AccessFs::RemoveFile | AccessFs::ReadDir;
    let dir_files: BitFlags<AccessFs> = AccessFs::MakeReg
        | AccessFs::ReadFile
        | AccessFs::WriteFile
        | AccessFs::Truncate
        | AccessFs::ReadDir;
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(ABI_TARGET))?
        .handle_access(AccessNet::from_all(ABI_TARGET))?
        .scope(Scope::AbstractUnixSocket | Scope::Signal)?
        .create()?;
    for access in paths {
        let (path, rights): (&PathBuf, BitFlags<AccessFs>) = match access {
            PathAccess::ReadFile(p) => (p, file_read.into()),
            PathAccess::ReadWriteFile(p) => (p, file_rw),
            PathAccess::SocketDir(p) => (p, dir_sock),
            PathAccess::FileDir(p) => (p, dir_files),
        };
        let fd = PathFd::new(path).map_err(|source| LandlockError::Path {
            path: path.clone(),
            source,
        })?;
        ruleset = ruleset.add_rule(PathBeneath::new(fd, rights))?;
    }
    let status = ruleset.restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockStatus::Enforced,
        RulesetStatus::PartiallyEnforced => LandlockStatus::Partially,
        RulesetStatus::NotEnforced => LandlockStatus::NotSupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Runs `f` in a forked child (Landlock cannot be lifted once applied) and returns
    /// its exit code.
    fn in_child(f: impl FnOnce() -> i32) -> i32 {
        let (code, signal) = super::super::in_child(f);
        code.unwrap_or_else(|| panic!("the child was killed by signal {signal:?}"))
    }

    #[test]
    fn only_the_allowed_files_can_be_opened_afterwards() {
        let dir = std::env::temp_dir().join(format!("genos-landlock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let allowed = dir.join("allowed.img");
        let denied = dir.join("denied.img");
        fs::write(&allowed, b"a").unwrap();
        fs::write(&denied, b"d").unwrap();

        let code = in_child(|| {
            let status = match restrict_to(&[PathAccess::ReadFile(allowed.clone())]) {
                Ok(s) => s,
                Err(_) => return 10,
            };
            if status != LandlockStatus::Enforced {
                return 11;
            }
            let can_read_allowed = fs::read(&allowed).is_ok();
            let can_write_allowed = fs::OpenOptions::new().write(true).open(&allowed).is_ok();
            let can_read_denied = fs::read(&denied).is_ok();
            let can_read_etc = fs::read("/etc/hostname").is_ok();
            match (
                can_read_allowed,
                can_write_allowed,
                can_read_denied,
                can_read_etc,
            ) {
                (true, false, false, false) => 0,
                _ => 12,
            }
        });

        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            code, 0,
            "10: ruleset failed, 11: not fully enforced, 12: wrong access"
        );
    }

    /// virtio-vsock connects to `<uds_path>_<port>` after the VM is built, with no rule for
    /// it: Landlock must leave pathname Unix sockets connectable (should a newer ABI handled
    /// here start restricting them, this fails and the vsock directory needs a rule).
    #[test]
    fn a_unix_socket_outside_the_rules_can_still_be_connected() {
        let dir = std::env::temp_dir().join(format!("genos-landlock-sock-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock_52");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();

        let code = in_child(|| {
            if restrict_to(&[]).is_err() {
                return 10;
            }
            match crate::devices::virtio::vsock::host::connect_nonblocking(&path) {
                Ok(_) if listener.accept().is_ok() => 0,
                _ => 12,
            }
        });

        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(code, 0, "10: ruleset failed, 12: connect refused");
    }
}
