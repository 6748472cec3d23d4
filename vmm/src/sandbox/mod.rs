//! Confinement the VMM applies to itself: seccomp filters per thread role and a
//! Landlock ruleset over the files it uses. The namespaces, root, cgroups and uid come
//! from `genos-jailer`, which starts the VMM.

pub mod landlock;
pub mod runtime;
pub mod seccomp;

pub use runtime::{SandboxError, SandboxOptions, SandboxStatus};

/// Runs `f` in a forked child (a Landlock ruleset or seccomp filter a test applies there
/// cannot be lifted) and returns how the child ended: its exit code, or the signal that
/// killed it.
#[cfg(test)]
pub(crate) fn in_child(f: impl FnOnce() -> i32) -> (Option<i32>, Option<i32>) {
    // SAFETY: the child runs `f` then _exit; it never returns into the test harness, and
    // touches none of the harness's other threads.
    match unsafe { libc::fork() } {
        0 => {
            let code = f();
            // SAFETY: ends the child without running the harness's atexit hooks.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: `status` is a valid out-pointer; pid is our child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFSIGNALED(status) {
                (None, Some(libc::WTERMSIG(status)))
            } else {
                (Some(libc::WEXITSTATUS(status)), None)
            }
        }
    }
}
