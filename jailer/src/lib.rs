//! genos-jailer: starts one `genos-vmm` with the least it needs.
//!
//! Before any guest code runs the jailer gives the VMM its own mount, pid, ipc, uts and
//! network namespaces, a root directory holding only the VMM binary, the guest images it
//! was given and two device nodes, cgroup limits (v1 or v2), rlimits, no inherited file
//! descriptors, an unprivileged uid/gid and `no_new_privs`. Seccomp and landlock are
//! applied by the VMM itself, which knows its threads and paths.
//!
//! The plan (which paths go where, which cgroup files get which values) is computed by
//! pure code in [`vmm_args`], [`cgroup`] and [`plan`]; [`sys`] holds every system call.

pub mod cgroup;
pub mod cli;
pub mod net;
pub mod plan;
pub mod run;
pub mod sys;
pub mod vmm_args;
