//! The jail for one VM, computed from the options before anything is changed.
//!
//! Layout inside the jail (a fresh tmpfs, so nothing is left on the host when the
//! mount namespace ends):
//! ```text
//! /genos-vmm            the VMM binary (read-only bind)
//! /images/...           kernel, initrd, disks (read-only unless a disk is writable)
//! /run/                 bound from <jail dir>/run on the host: API socket, console file
//! /dev/kvm, /dev/net/tun, /dev/urandom
//! /lib64/ld-linux-x86-64.so.2, /lib/x86_64-linux-gnu   only for a dynamically linked VMM
//! ```

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::cgroup::{self, Mounts};
use crate::cli::{Options, Rlimit};
use crate::vmm_args::{self, Bind};

/// Errors found while planning the jail.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The VMM arguments cannot be jailed.
    #[error(transparent)]
    VmmArgs(#[from] vmm_args::VmmArgsError),
    /// Cgroup settings cannot be applied on this host.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// A file the VMM needs cannot be used.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
}

/// A device node to create in the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceNode {
    /// Path inside the jail.
    pub path: PathBuf,
    /// Device number major.
    pub major: u32,
    /// Device number minor.
    pub minor: u32,
    /// Permission bits.
    pub mode: u32,
}

/// Everything the jailer will do for one VM.
#[derive(Clone, Debug)]
pub struct JailPlan {
    /// `<chroot base>/genos-vmm/<id>`: host directory of this jail.
    pub jail_dir: PathBuf,
    /// `<jail dir>/root`: the tmpfs that becomes `/`.
    pub root: PathBuf,
    /// `<jail dir>/run`: host directory shared as `/run`.
    pub run_dir: PathBuf,
    /// Bind mounts, the VMM binary first.
    pub binds: Vec<Bind>,
    /// Device nodes.
    pub devices: Vec<DeviceNode>,
    /// argv for the VMM, argv[0] first.
    pub argv: Vec<String>,
    /// Host path to link to the API socket inside the jail, with the link's target.
    pub api_socket_link: Option<(PathBuf, PathBuf)>,
    /// Cgroup work.
    pub cgroups: Option<cgroup::Plan>,
    /// Rlimits.
    pub rlimits: Vec<Rlimit>,
    /// Hostname inside the uts namespace.
    pub hostname: String,
}

/// Path of the VMM binary inside the jail.
pub const VMM_IN_JAIL: &str = "/genos-vmm";

fn file_err(path: &Path, reason: impl Into<String>) -> PlanError {
    PlanError::File {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Plans the jail for `opts` on this host.
pub fn plan(opts: &Options, mounts: &Mounts) -> Result<JailPlan, PlanError> {
    let jail_dir = opts.chroot_base.join("genos-vmm").join(&opts.id);
    let root = jail_dir.join("root");
    let run_dir = jail_dir.join("run");
    let jailed = vmm_args::rewrite(&opts.vmm_args)?;

    let exec =
        fs::canonicalize(&opts.exec_file).map_err(|e| file_err(&opts.exec_file, e.to_string()))?;
    let mut binds = vec![Bind {
        source: exec.clone(),
        target: PathBuf::from(VMM_IN_JAIL),
        read_only: true,
    }];
    if let Some(interp) = elf_interpreter(&exec).map_err(|e| file_err(&exec, e.to_string()))? {
        binds.extend(dynamic_loader_binds(&interp)?);
    }
    for bind in &jailed.binds {
        check_accessible(
            &bind.source,
            bind.read_only,
            opts.uid,
            opts.gid,
            bind.target.starts_with("/run"),
        )?;
    }
    binds.extend(jailed.binds.iter().cloned());

    let mut devices = Vec::new();
    for (path, mode) in [
        ("/dev/kvm", 0o660),
        ("/dev/net/tun", 0o660),
        ("/dev/urandom", 0o666),
    ] {
        // A node missing on the host is left out; the VMM reports what it then lacks.
        if let Ok(meta) = fs::metadata(path) {
            if meta.file_type().is_char_device() {
                let rdev = meta.rdev();
                devices.push(DeviceNode {
                    path: PathBuf::from(path),
                    major: libc::major(rdev),
                    minor: libc::minor(rdev),
                    mode,
                });
            }
        }
    }

    let mut argv = vec![VMM_IN_JAIL.to_string()];
    argv.extend(jailed.args);
    let api_socket_link = jailed.api_socket.map(|(host, inside)| {
        let name = inside.file_name().map(PathBuf::from).unwrap_or_default();
        (host, run_dir.join(name))
    });
    let cgroups = cgroup::plan(
        mounts,
        opts.cgroup_version,
        &opts.parent_cgroup,
        &opts.id,
        &opts.cgroups,
    )?;

    Ok(JailPlan {
        jail_dir,
        root,
        run_dir,
        binds,
        devices,
        argv,
        api_socket_link,
        cgroups,
        rlimits: opts.rlimits.clone(),
        hostname: opts.id.clone(),
    })
}

/// Binds that let a dynamically linked VMM start: its loader and the multiarch library
/// directory, read-only.
fn dynamic_loader_binds(interp: &Path) -> Result<Vec<Bind>, PlanError> {
    let real = fs::canonicalize(interp).map_err(|e| file_err(interp, e.to_string()))?;
    let mut binds = vec![Bind {
        source: real,
        target: interp.to_path_buf(),
        read_only: true,
    }];
    let libdir = Path::new("/lib/x86_64-linux-gnu");
    if let Ok(real) = fs::canonicalize(libdir) {
        binds.push(Bind {
            source: real,
            target: libdir.to_path_buf(),
            read_only: true,
        });
    }
    Ok(binds)
}

/// The ELF program interpreter (PT_INTERP) of `path`, or None for a static binary.
pub fn elf_interpreter(path: &Path) -> io::Result<Option<PathBuf>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(64 * 1024)
        .read_to_end(&mut bytes)?;
    Ok(parse_interp(&bytes))
}

fn parse_interp(b: &[u8]) -> Option<PathBuf> {
    let u16_at = |o: usize| {
        b.get(o..o + 2)
            .map(|s| u16::from_le_bytes([s[0], s[1]]) as usize)
    };
    let u32_at = |o: usize| {
        b.get(o..o + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
    };
    let u64_at = |o: usize| {
        b.get(o..o + 8)
            .map(|s| u64::from_le_bytes(s.try_into().unwrap()) as usize)
    };
    // Only 64-bit little-endian ELF: the VMM is an x86_64 binary.
    if b.get(0..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(0x20)?, u16_at(0x36)?, u16_at(0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(ph)? == 3 {
            let (off, size) = (u64_at(ph + 8)?, u64_at(ph + 32)?);
            let raw = b.get(off..off.checked_add(size)?)?;
            let raw = raw.split(|&c| c == 0).next()?;
            return Some(PathBuf::from(std::str::from_utf8(raw).ok()?));
        }
    }
    None
}

/// Refuses files the unprivileged VMM could not use, with the reason, before anything
/// starts (otherwise the VMM would fail inside the jail with a less helpful error).
fn check_accessible(
    path: &Path,
    read_only: bool,
    uid: u32,
    gid: u32,
    create: bool,
) -> Result<(), PlanError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if create && e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(file_err(path, e.to_string())),
    };
    if !meta.is_file() {
        return Err(file_err(path, "not a regular file"));
    }
    let mode = meta.mode();
    let (r, w) = if meta.uid() == uid {
        (mode & 0o400 != 0, mode & 0o200 != 0)
    } else if meta.gid() == gid {
        (mode & 0o040 != 0, mode & 0o020 != 0)
    } else {
        (mode & 0o004 != 0, mode & 0o002 != 0)
    };
    let perms = format!(
        "owner {} group {} mode {:o}",
        meta.uid(),
        meta.gid(),
        mode & 0o7777
    );
    if !r {
        return Err(file_err(
            path,
            format!("not readable by uid {uid} gid {gid} ({perms})"),
        ));
    }
    if !read_only && !w {
        return Err(file_err(
            path,
            format!("not writable by uid {uid} gid {gid} ({perms}); change its owner or add :ro"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_of_a_dynamic_binary_is_found() {
        let exe = std::env::current_exe().unwrap();
        let interp = elf_interpreter(&exe).unwrap();
        assert!(interp.unwrap().to_string_lossy().contains("ld-linux"));
    }

    #[test]
    fn non_elf_files_have_no_loader() {
        assert_eq!(parse_interp(b"#!/bin/sh\n"), None);
        assert_eq!(parse_interp(b"\x7fELF\x02\x01"), None);
    }

    #[test]
    fn a_writable_disk_not_writable_by_the_vmm_user_is_refused_with_the_fix() {
        let path = std::env::temp_dir().join(format!("genos-jail-plan-{}", std::process::id()));
        fs::write(&path, b"disk").unwrap();
        std::os::unix::fs::PermissionsExt::set_mode(
            &mut fs::metadata(&path).unwrap().permissions(),
            0o644,
        );
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

        let ro = check_accessible(&path, true, 4321, 4321, false);
        let rw = check_accessible(&path, false, 4321, 4321, false).unwrap_err();

        assert!(ro.is_ok());
        assert!(rw.to_string().contains("not writable by uid 4321"), "{rw}");
        assert!(rw.to_string().contains(":ro"), "{rw}");
        fs::remove_file(&path).unwrap();
    }
}
