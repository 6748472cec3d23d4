//! Seccomp filters for the VMM's threads.
//!
//! Each thread role (main/event loop, vCPU, API) has its own allow-list in
//! `configs/seccomp/genos-vmm.json` (seccompiler's JSON format), compiled when the VMM
//! starts. A thread installs its filter itself, once its set-up is done and before it
//! handles anything a guest or client controls; anything off its list kills the whole
//! process. `--seccomp log` logs offending calls to the kernel audit log instead, for
//! developing the lists; `--seccomp off` exists for debugging only.

use std::collections::HashMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, TargetArch};

/// The policy, as shipped in `configs/`.
const POLICY_JSON: &str = configs::SECCOMP_VMM;

/// Errors from compiling or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The JSON policy does not compile.
    #[error("seccomp policy: {0}")]
    Compile(#[source] seccompiler::Error),
    /// The JSON policy is not valid JSON.
    #[error("seccomp policy is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The policy lacks a thread role.
    #[error("seccomp policy has no filter for the {0} thread")]
    MissingRole(&'static str),
    /// The kernel refused the filter.
    #[error("installing the {role} thread's seccomp filter: {source}")]
    Apply {
        role: &'static str,
        #[source]
        source: seccompiler::Error,
    },
}

pub use vmm_api::{SeccompMode, SeccompModeError};

/// The VMM's thread roles, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// The main thread: event loop and device emulation.
    Main,
    /// A vCPU thread: KVM_RUN and the port-I/O and MMIO exits it handles.
    Vcpu,
    /// The control API thread.
    Api,
}

impl ThreadRole {
    /// Name of the role's filter in the policy file.
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Api => "api",
        }
    }
}

impl FromStr for ThreadRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "main" => Ok(Self::Main),
            "vcpu" => Ok(Self::Vcpu),
            "api" => Ok(Self::Api),
            _ => Err(format!(
                "unknown thread role {s:?}: expected main, vcpu or api"
            )),
        }
    }
}

/// Compiled filters for every role.
#[derive(Clone, Debug)]
pub struct SeccompFilters {
    mode: SeccompMode,
    programs: HashMap<ThreadRole, BpfProgram>,
}

impl SeccompFilters {
    /// Compiles the shipped policy for `mode`.
    pub fn compile(mode: SeccompMode) -> Result<Self, SeccompError> {
        Self::compile_json(POLICY_JSON, mode)
    }

    /// Compiles a policy in seccompiler's JSON format.
    pub fn compile_json(json: &str, mode: SeccompMode) -> Result<Self, SeccompError> {
        let mut programs = HashMap::new();
        if mode == SeccompMode::Off {
            return Ok(Self { mode, programs });
        }
        let mut policy: serde_json::Value = serde_json::from_str(json)?;
        if mode == SeccompMode::Log {
            if let Some(filters) = policy.as_object_mut() {
                for filter in filters.values_mut() {
                    filter["mismatch_action"] = serde_json::Value::String("log".into());
                }
            }
        }
        let bytes = serde_json::to_vec(&policy)?;
        let mut compiled = seccompiler::compile_from_json(bytes.as_slice(), TargetArch::x86_64)
            .map_err(SeccompError::Compile)?;
        for role in [ThreadRole::Main, ThreadRole::Vcpu, ThreadRole::Api] {
            let program = compiled
                .remove(role.name())
                .ok_or(SeccompError::MissingRole(role.name()))?;
            programs.insert(role, program);
        }
        Ok(Self { mode, programs })
    }

    /// The mode the filters were compiled for.
    pub fn mode(&self) -> SeccompMode {
        self.mode
    }

    /// Installs `role`'s filter on the calling thread (and sets no_new_privs).
    pub fn apply(&self, role: ThreadRole) -> Result<(), SeccompError> {
        match self.programs.get(&role) {
            Some(program) => {
                seccompiler::apply_filter(program).map_err(|source| SeccompError::Apply {
                    role: role.name(),
                    source,
                })
            }
            None => Ok(()),
        }
    }
}

/// Makes a system call no VMM thread is allowed (opening a TCP socket), for the
/// `--seccomp-selftest` option: under `kill` the process dies with SIGSYS.
pub fn make_forbidden_syscall() {
    // SAFETY: socket(2) with constant arguments; the descriptor, if any, is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        // SAFETY: closing the descriptor just returned by socket(2).
        unsafe { libc::close(fd) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::in_child;
    use super::*;

    #[test]
    fn the_shipped_policy_compiles_for_every_role() {
        let filters = SeccompFilters::compile(SeccompMode::Kill).unwrap();
        assert_eq!(filters.programs.len(), 3);
    }

    #[test]
    fn a_call_off_the_list_kills_the_process_with_sigsys() {
        let filters = SeccompFilters::compile(SeccompMode::Kill).unwrap();

        let (code, signal) = in_child(|| {
            if filters.apply(ThreadRole::Vcpu).is_err() {
                return 10;
            }
            make_forbidden_syscall();
            0
        });

        assert_eq!((code, signal), (None, Some(libc::SIGSYS)));
    }

    #[test]
    fn log_mode_lets_the_offending_call_through() {
        let filters = SeccompFilters::compile(SeccompMode::Log).unwrap();

        let (code, signal) = in_child(|| {
            if filters.apply(ThreadRole::Api).is_err() {
                return 10;
            }
            make_forbidden_syscall();
            0
        });

        assert_eq!((code, signal), (Some(0), None));
    }

    #[test]
    fn a_policy_without_every_role_is_refused() {
        let json = r#"{"main":{"mismatch_action":"kill_process","match_action":"allow","filter":[{"syscall":"read"}]}}"#;
        let err = SeccompFilters::compile_json(json, SeccompMode::Kill).unwrap_err();
        assert_eq!(
            err.to_string(),
            "seccomp policy has no filter for the vcpu thread"
        );
    }

    #[test]
    fn ioctl_numbers_in_the_policy_match_their_names() {
        use kvm_bindings::*;
        use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};
        ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
        ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
        ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
        ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
        ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
        ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
        ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
        ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
        ioctl_iowr_nr!(KVM_TRANSLATE, KVMIO, 0x85, kvm_translation);
        ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
        ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
        ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
        ioctl_io_nr!(KVM_REINJECT_CONTROL, KVMIO, 0x71);
        ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
        ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
        ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
        ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
        ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
        ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
        ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
        ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
        ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
        ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
        ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
        let expected: HashMap<&str, u64> = [
            ("KVM_RUN", KVM_RUN() as u64),
            ("KVM_GET_REGS", KVM_GET_REGS() as u64),
            ("KVM_SET_REGS", KVM_SET_REGS() as u64),
            ("KVM_GET_SREGS", KVM_GET_SREGS() as u64),
            ("KVM_SET_SREGS", KVM_SET_SREGS() as u64),
            ("KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS() as u64),
            ("KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS() as u64),
            ("KVM_GET_FPU", KVM_GET_FPU() as u64),
            ("KVM_TRANSLATE", KVM_TRANSLATE() as u64),
            ("KVM_IRQFD", KVM_IRQFD() as u64),
            ("KVM_IOEVENTFD", KVM_IOEVENTFD() as u64),
            ("KVM_IRQ_LINE", KVM_IRQ_LINE() as u64),
            ("KVM_REINJECT_CONTROL", KVM_REINJECT_CONTROL() as u64),
            ("KVM_GET_CPUID2", KVM_GET_CPUID2() as u64),
            ("KVM_GET_MSRS", KVM_GET_MSRS() as u64),
            ("KVM_GET_XSAVE", KVM_GET_XSAVE() as u64),
            ("KVM_GET_XCRS", KVM_GET_XCRS() as u64),
            ("KVM_GET_TSC_KHZ", KVM_GET_TSC_KHZ() as u64),
            ("KVM_GET_LAPIC", KVM_GET_LAPIC() as u64),
            ("KVM_GET_MP_STATE", KVM_GET_MP_STATE() as u64),
            ("KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS() as u64),
            ("KVM_GET_IRQCHIP", KVM_GET_IRQCHIP() as u64),
            ("KVM_GET_PIT2", KVM_GET_PIT2() as u64),
            ("KVM_GET_CLOCK", KVM_GET_CLOCK() as u64),
            ("TCGETS", libc::TCGETS),
            ("TIOCGWINSZ", libc::TIOCGWINSZ),
            ("FIONBIO", libc::FIONBIO),
        ]
        .into_iter()
        .collect();
        let policy: serde_json::Value = serde_json::from_str(POLICY_JSON).unwrap();

        let mut checked = 0;
        for filter in policy.as_object().unwrap().values() {
            let rules = filter["filter"].as_array().unwrap().iter();
            for rule in rules.filter(|r| r["syscall"] == "ioctl") {
                for arg in rule["args"].as_array().into_iter().flatten() {
                    let name = arg["comment"].as_str().unwrap();
                    let want = expected
                        .get(name)
                        .unwrap_or_else(|| panic!("unknown ioctl {name}"));
                    assert_eq!(arg["val"].as_u64().unwrap(), *want, "{name}");
                    checked += 1;
                }
            }
        }

        assert!(checked > 10);
    }

    #[test]
    fn the_main_thread_may_create_the_input_channels_socket_pair_and_no_other() {
        let filters = SeccompFilters::compile(SeccompMode::Kill).unwrap();
        let in_main_thread = |ty: libc::c_int| {
            in_child(|| {
                if filters.apply(ThreadRole::Main).is_err() {
                    return 10;
                }
                if ty == libc::SOCK_SEQPACKET {
                    return i32::from(
                        crate::devices::virtio::input::socket::seqpacket_pair().is_err(),
                    );
                }
                let mut fds = [-1; 2];
                // SAFETY: `fds` is a writable array of two ints.
                let rc = unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) };
                i32::from(rc != 0)
            })
        };

        assert_eq!(in_main_thread(libc::SOCK_SEQPACKET), (Some(0), None));
        assert_eq!(
            in_main_thread(libc::SOCK_STREAM),
            (None, Some(libc::SIGSYS))
        );
    }

    #[test]
    fn the_main_thread_may_connect_accept_and_shut_the_vsock_devices_unix_streams() {
        use crate::devices::virtio::vsock::host::connect_nonblocking;
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-seccomp-").unwrap();
        let path = dir.as_path().join("v.sock_52");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let filters = SeccompFilters::compile(SeccompMode::Kill).unwrap();

        let outcome = in_child(|| {
            if filters.apply(ThreadRole::Main).is_err() {
                return 10;
            }
            let Ok(sock) = connect_nonblocking(&path) else {
                return 11;
            };
            if listener.accept().is_err() {
                return 12;
            }
            i32::from(sock.shutdown(std::net::Shutdown::Write).is_err()) * 13
        });

        assert_eq!(outcome, (Some(0), None));
    }

    #[test]
    fn modes_parse_from_their_names() {
        assert_eq!("log".parse::<SeccompMode>(), Ok(SeccompMode::Log));
        assert!("permissive".parse::<SeccompMode>().is_err());
    }
}
