//! Carries out a [`JailPlan`]: the parent stays outside to supervise, the child builds
//! the jail inside new namespaces and becomes the VMM.
//!
//! Exit status of `genos-jailer`: the VMM's own status when it ran (so a supervisor sees
//! the guest's fate), 128+N when the VMM was killed by signal N, 2 for bad arguments and
//! 71 when the jail could not be set up (the message says which step failed).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::cli::{Options, Rlimit};
use crate::plan::JailPlan;
use crate::sys::{self, Exit, Fork};

/// Exit status when the jail could not be built.
pub const EXIT_SETUP_FAILED: i32 = 71;

/// A failed step, with what it was doing.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct StepError {
    step: String,
    #[source]
    source: io::Error,
}

trait Step<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, StepError>;
}

impl<T> Step<T> for io::Result<T> {
    fn step(self, what: impl FnOnce() -> String) -> Result<T, StepError> {
        self.map_err(|source| StepError {
            step: what(),
            source,
        })
    }
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // Only kill(2) here: it is async-signal-safe.
        let _ = sys::kill(child, signal);
    }
}

/// Runs the VMM in its jail and returns the jailer's exit status.
pub fn run(opts: &Options, plan: &JailPlan) -> Result<i32, StepError> {
    if opts.daemonize {
        match sys::fork().step(|| "fork to daemonize".into())? {
            Fork::Parent(_) => return Ok(0),
            Fork::Child => {
                sys::setsid().step(|| "setsid".into())?;
                sys::stdio_to_null().step(|| "redirect standard streams".into())?;
            }
        }
    }

    let pid_file = plan.jail_dir.join("genos-vmm.pid");
    refuse_if_running(&pid_file)?;
    fs::create_dir_all(&plan.root).step(|| format!("create {}", plan.root.display()))?;
    fs::create_dir_all(&plan.run_dir).step(|| format!("create {}", plan.run_dir.display()))?;
    sys::chown(&plan.run_dir, opts.uid, opts.gid)
        .step(|| format!("chown {}", plan.run_dir.display()))?;
    for bind in plan
        .binds
        .iter()
        .filter(|b| b.target.starts_with("/run") && !b.source.exists())
    {
        // A console file the VMM will write: create it owned by the VMM's user.
        fs::File::create(&bind.source).step(|| format!("create {}", bind.source.display()))?;
        sys::chown(&bind.source, opts.uid, opts.gid)
            .step(|| format!("chown {}", bind.source.display()))?;
    }
    if let Some(cgroups) = &plan.cgroups {
        // The jailer joins first so its child, and so the VMM, start inside the limits.
        cgroups.apply(std::process::id()).map_err(|e| StepError {
            step: "cgroups".into(),
            source: io::Error::other(e),
        })?;
    }
    let netns = match &opts.netns {
        Some(path) => Some(
            fs::File::open(path).step(|| format!("open network namespace {}", path.display()))?,
        ),
        None => None,
    };

    sys::unshare(libc::CLONE_NEWPID).step(|| "new pid namespace".into())?;
    let child = match sys::fork().step(|| "fork the VMM".into())? {
        Fork::Child => {
            let err = become_vmm(opts, plan, netns.as_ref());
            eprintln!("genos-jailer: {err}");
            // SAFETY: _exit ends the forked child without running the parent's atexit
            // handlers or flushing its copied stdio buffers twice.
            unsafe { libc::_exit(EXIT_SETUP_FAILED) };
        }
        Fork::Parent(pid) => pid,
    };
    CHILD.store(child, Ordering::Relaxed);
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only loads an atomic and calls kill(2), both async-signal-safe.
        unsafe { libc::signal(signal, forward_signal as *const () as libc::sighandler_t) };
    }
    fs::write(&pid_file, child.to_string()).step(|| format!("write {}", pid_file.display()))?;
    let link = plan.api_socket_link.as_ref();
    if let Some((host, inside)) = link {
        let _ = fs::remove_file(host);
        std::os::unix::fs::symlink(inside, host).step(|| format!("link {}", host.display()))?;
    }

    let exit = sys::wait(child).step(|| "wait for the VMM".into())?;

    let _ = fs::remove_file(&pid_file);
    if let Some((host, inside)) = link {
        let _ = fs::remove_file(host);
        let _ = fs::remove_file(inside);
    }
    if let Some(cgroups) = &plan.cgroups {
        cgroups.remove(std::process::id());
    }
    let _ = fs::remove_dir(&plan.root);
    Ok(match exit {
        Exit::Code(code) => code,
        Exit::Signal(signal) => 128 + signal,
    })
}

fn refuse_if_running(pid_file: &Path) -> Result<(), StepError> {
    let Ok(text) = fs::read_to_string(pid_file) else {
        return Ok(());
    };
    if let Ok(pid) = text.trim().parse::<i32>() {
        if sys::kill(pid, 0).is_ok() {
            return Err(StepError {
                step: format!("jail already in use by pid {pid} ({})", pid_file.display()),
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
    }
    Ok(())
}

/// In the child (pid 1 of the new pid namespace): builds the jail and execs the VMM.
/// Returns only on failure.
fn become_vmm(opts: &Options, plan: &JailPlan, netns: Option<&fs::File>) -> StepError {
    match build_jail(opts, plan, netns) {
        Ok(()) => StepError {
            step: format!("exec {}", plan.argv[0]),
            source: sys::exec(Path::new(&plan.argv[0]), &plan.argv, &[]),
        },
        Err(e) => e,
    }
}

fn build_jail(opts: &Options, plan: &JailPlan, netns: Option<&fs::File>) -> Result<(), StepError> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    if netns.is_none() {
        flags |= libc::CLONE_NEWNET;
    }
    sys::unshare(flags).step(|| "new mount, ipc, uts and network namespaces".into())?;
    if let Some(ns) = netns {
        sys::setns(ns, libc::CLONE_NEWNET).step(|| "join the network namespace".into())?;
    }
    sys::sethostname(&plan.hostname).step(|| "set hostname".into())?;
    // Nothing mounted from here on may propagate back to the host.
    sys::mount(None, Path::new("/"), None, libc::MS_SLAVE | libc::MS_REC)
        .step(|| "make / a slave mount".into())?;
    let root = &plan.root;
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
    )
    .step(|| format!("mount tmpfs on {}", root.display()))?;
    let inside = |p: &Path| -> PathBuf { root.join(p.strip_prefix("/").unwrap_or(p)) };

    // tmpfs roots are world-writable by default; the jail's root is not.
    fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .step(|| "chmod /".into())?;
    for dir in ["run", "images", "dev/net"] {
        fs::create_dir_all(root.join(dir)).step(|| format!("create /{dir}"))?;
    }
    sys::mount(Some(&plan.run_dir), &root.join("run"), None, libc::MS_BIND)
        .step(|| format!("bind {} on /run", plan.run_dir.display()))?;
    for bind in &plan.binds {
        let target = inside(&bind.target);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).step(|| format!("create {}", parent.display()))?;
        }
        let is_dir = bind.source.is_dir();
        if is_dir {
            fs::create_dir_all(&target)
        } else {
            fs::File::create(&target).map(drop)
        }
        .step(|| format!("create mount point {}", bind.target.display()))?;
        sys::mount(
            Some(&bind.source),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
        )
        .step(|| {
            format!(
                "bind {} on {}",
                bind.source.display(),
                bind.target.display()
            )
        })?;
        let mut remount = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID | libc::MS_NODEV;
        if bind.read_only {
            remount |= libc::MS_RDONLY;
        }
        sys::mount(None, &target, None, remount)
            .step(|| format!("remount {}", bind.target.display()))?;
    }
    for dev in &plan.devices {
        let path = inside(&dev.path);
        sys::mknod_char(&path, dev.mode, dev.major, dev.minor)
            .step(|| format!("mknod {}", dev.path.display()))?;
        sys::chown(&path, opts.uid, opts.gid).step(|| format!("chown {}", dev.path.display()))?;
        // mknod applies the umask; the mode must be exact.
        fs::set_permissions(
            &path,
            std::os::unix::fs::PermissionsExt::from_mode(dev.mode),
        )
        .step(|| format!("chmod {}", dev.path.display()))?;
    }
    // The root itself read-only: the VMM writes only to /run and writable disks.
    let old = root.join("old_root");
    fs::create_dir(&old).step(|| "create old_root".into())?;
    std::env::set_current_dir(root).step(|| format!("chdir {}", root.display()))?;
    sys::pivot_root(Path::new("."), Path::new("old_root")).step(|| "pivot_root".into())?;
    std::env::set_current_dir("/").step(|| "chdir /".into())?;
    sys::umount2(Path::new("/old_root"), libc::MNT_DETACH)
        .step(|| "detach the host root".into())?;
    fs::remove_dir("/old_root").step(|| "remove old_root".into())?;
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
    )
    .step(|| "remount / read-only".into())?;

    for limit in &plan.rlimits {
        let (resource, value, name) = match *limit {
            Rlimit::NoFile(v) => (libc::RLIMIT_NOFILE, v, "no-file"),
            Rlimit::FileSize(v) => (libc::RLIMIT_FSIZE, v, "fsize"),
        };
        sys::setrlimit(resource, value).step(|| format!("rlimit {name}"))?;
    }
    sys::close_from(3).step(|| "close inherited descriptors".into())?;
    sys::drop_privileges(opts.uid, opts.gid)
        .step(|| format!("switch to uid {} gid {}", opts.uid, opts.gid))?;
    sys::set_no_new_privs().step(|| "no_new_privs".into())?;
    Ok(())
}
