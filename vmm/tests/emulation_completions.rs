//! Instructions the nested KVM cannot emulate, completed by the VMM as the CPU would
//! (`vmm::arch::x86_64::emulation`), checked with a tiny guest under the real `/dev/kvm`
//! through the `genos-vmm` binary. Skipped (with a message) without `/dev/kvm`.

mod common;

use std::time::Duration;

use common::{build_guest, kvm_available, run_vmm};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn fwait_and_ud1_are_completed_with_the_cpus_exceptions() {
    if !kvm_available("fwait_and_ud1_are_completed_with_the_cpus_exceptions") {
        return;
    }
    let guest = build_guest("completions", &[]);

    let run = run_vmm(
        &["--kernel", guest.to_str().unwrap(), "--mem-mib", "32"],
        TIMEOUT,
    );

    assert_eq!(run.status, Some(3), "{run:?}");
    assert!(run.stderr.contains("completing fwait"), "{run:?}");
    assert!(run.stderr.contains("completing ud1"), "{run:?}");
    assert!(
        run.stdout.contains(
            "fwait completed\n\
             invalid opcode handled\nresumed after ud2\n\
             invalid opcode handled\nresumed after ud1\n\
             math fault at the fwait\n"
        ),
        "{run:?}"
    );
}
