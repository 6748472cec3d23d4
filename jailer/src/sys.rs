//! Every system call the jailer makes, each wrapped to return `io::Result`.
//!
//! Platform code stays here so the rest of the jailer reads as a plan.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A path as a C string; paths with interior NULs cannot name files.
pub fn cstring(path: &Path) -> io::Result<CString> {
    cstr(path.as_os_str())
}

fn cstr(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// unshare(2).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes only flags and affects only the calling thread's namespaces.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// setns(2) into the namespace `fd` refers to.
pub fn setns(fd: &impl AsRawFd, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is borrowed for the call and stays open; setns does not keep it.
    check(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

/// Result of [`fork`].
pub enum Fork {
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// fork(2). The jailer is single-threaded when it forks, so the child may do anything.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: the jailer has one thread (it never spawns any), so the child inherits a
    // consistent address space with no locks held by other threads.
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Fork::Child
    } else {
        Fork::Parent(pid)
    })
}

/// How a waited-for child ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

/// waitpid(2) until `pid` ends, retrying on EINTR.
pub fn wait(pid: libc::pid_t) -> io::Result<Exit> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) if libc::WIFEXITED(status) => return Ok(Exit::Code(libc::WEXITSTATUS(status))),
            Ok(_) if libc::WIFSIGNALED(status) => return Ok(Exit::Signal(libc::WTERMSIG(status))),
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// kill(2).
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// mount(2) with no data.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    let fstype = fstype.map(|s| cstr(OsStr::new(s))).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mount(
            source.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            std::ptr::null(),
        )
    })
    .map(drop)
}

/// umount2(2).
pub fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cstring(target)?;
    // SAFETY: target is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// pivot_root(2), which libc does not wrap.
pub fn pivot_root(new_root: &Path, put_old: &Path) -> io::Result<()> {
    let new_root = cstring(new_root)?;
    let put_old = cstring(put_old)?;
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) };
    check(ret as libc::c_int).map(drop)
}

/// mknod(2) of a character device.
pub fn mknod_char(path: &Path, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let c = cstring(path)?;
    // SAFETY: path is a NUL-terminated string that outlives the call.
    check(unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    })
    .map(drop)
}

/// chown(2).
pub fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

/// setrlimit(2) with soft = hard = `value`.
pub fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    check(unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

/// Closes every descriptor from `first` up.
pub fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; the caller owns no Rust objects wrapping
    // descriptors >= first that are used afterwards (it is about to exec).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0,
        )
    };
    check(ret as libc::c_int).map(drop)
}

/// Drops to `uid`/`gid` with no supplementary groups, irrevocably.
pub fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: an empty group list with a null pointer is valid for setgroups.
    check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    Ok(())
}

/// PR_SET_NO_NEW_PRIVS: exec can never grant privileges again.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// sethostname(2) (inside the new uts namespace).
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// setsid(2).
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Points stdin, stdout and stderr at /dev/null.
pub fn stdio_to_null() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `null` stays open during the call.
        check(unsafe { libc::dup2(null.as_raw_fd(), fd) })?;
    }
    Ok(())
}

/// execve(2); returns only on failure.
pub fn exec(path: &Path, args: &[String], env: &[String]) -> io::Error {
    let to_c = |v: &[String]| -> io::Result<Vec<CString>> {
        v.iter().map(|s| cstr(OsStr::new(s))).collect()
    };
    let (path, args, env) = match (cstring(path), to_c(args), to_c(env)) {
        (Ok(p), Ok(a), Ok(e)) => (p, a, e),
        (Err(e), ..) | (_, Err(e), _) | (.., Err(e)) => return e,
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: argv and envp are null-terminated arrays of NUL-terminated strings, all of
    // which outlive the call (execve does not return on success).
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}
