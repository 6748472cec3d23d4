//! Completing guest instructions that KVM's instruction emulator cannot run.
//!
//! On the nested KVM of our machines guest kernel code is interpreted by KVM's emulator, and
//! an instruction it lacks ends `KVM_RUN` with an emulation failure (`KVM_EXIT_INTERNAL_ERROR`,
//! suberror 1). A few such instructions have an architectural effect that the VMM can
//! reproduce exactly from outside the guest, because it is either an exception or nothing
//! at all in the vCPU's current state:
//!
//! - `INT3` raises #BP as a trap (the return address is after the instruction);
//! - `UD0`, `UD1`, `UD2` raise #UD as a fault (Linux's `BUG()` and `WARN()` are `UD2`);
//! - `WAIT`/`FWAIT` raises #NM when CR0.TS and CR0.MP are both set, #MF when an unmasked x87
//!   exception is pending (with CR0.NE set), and otherwise does nothing.
//!
//! Found by booting and with the tiny guest `vmm/tests/guests/completions.S`: this KVM fails
//! on INT3, UD1 and FWAIT, and emulates UD2 and the fences itself.
//!
//! [`complete`] decides, from the instruction bytes and the few bits of state those
//! instructions depend on, what the CPU would have done; the vCPU loop applies it (RIP and
//! `KVM_SET_VCPU_EVENTS`). Anything else is refused and stops the VM: injecting a #UD for an
//! instruction that exists on the CPU would change what the guest runs. [`mnemonic`] names
//! the instruction for the failure message. Both are pure functions of their inputs.

/// The CR0 bits `WAIT` depends on.
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// RFLAGS.TF: single-step; a completed instruction would end in a #DB trap.
const RFLAGS_TF: u64 = 1 << 8;
/// x87 status word: exception summary (an unmasked exception flag is set).
const FSW_ES: u16 = 1 << 7;
/// x87 exception flags (status word) and masks (control word): IE, DE, ZE, OE, UE, PE.
const X87_EXCEPTIONS: u16 = 0x3f;

/// Exception vectors injected here.
const BP_VECTOR: u8 = 3;
const UD_VECTOR: u8 = 6;
const NM_VECTOR: u8 = 7;
const MF_VECTOR: u8 = 16;

/// The LOCK prefix: on any instruction completed here it makes the instruction #UD.
const LOCK: u8 = 0xf0;

/// The vCPU state the completions depend on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// Control register 0.
    pub cr0: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// x87 FPU status word.
    pub fsw: u16,
    /// x87 FPU control word.
    pub fcw: u16,
}

impl CpuState {
    /// Whether an unmasked x87 exception is pending: a flag in FSW whose mask in FCW is
    /// clear, or FSW.ES, the summary bit the FPU latches for it (as restored by FXRSTOR).
    fn x87_exception_pending(&self) -> bool {
        self.fsw & FSW_ES != 0 || self.fsw & !self.fcw & X87_EXCEPTIONS != 0
    }
}

/// What the VMM does in place of the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// The instruction has no effect in this state: advance RIP by `len` and continue.
    Skip {
        /// Instruction length in bytes.
        len: u8,
        /// The instruction, for the log.
        mnemonic: &'static str,
    },
    /// Deliver exception `vector` (none of those has an error code) after advancing RIP by
    /// `rip_advance`: the instruction's length for a trap, 0 for a fault.
    Exception {
        /// Exception vector.
        vector: u8,
        /// Bytes to add to RIP before delivery.
        rip_advance: u8,
        /// The instruction, for the log.
        mnemonic: &'static str,
    },
}

impl Completion {
    /// The instruction that was completed.
    pub fn mnemonic(&self) -> &'static str {
        match *self {
            Completion::Skip { mnemonic, .. } | Completion::Exception { mnemonic, .. } => mnemonic,
        }
    }
}

/// Why an instruction cannot be completed by the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// KVM gave no instruction bytes and they could not be read from guest memory.
    #[error("the instruction bytes are unavailable")]
    NoBytes,
    /// Not one of the instructions completed here.
    #[error("not an instruction the VMM completes")]
    Unsupported,
    /// `WAIT` with a pending x87 exception and CR0.NE clear: the CPU would report it
    /// through the FERR# pin and an external interrupt, which this VMM does not model.
    #[error("WAIT with a pending x87 exception while CR0.NE is clear (FERR# reporting)")]
    LegacyFpuErrorReporting,
    /// The guest is single-stepping (RFLAGS.TF): the skipped instruction would end in a
    /// #DB trap, which this VMM does not synthesise.
    #[error("the guest is single-stepping (RFLAGS.TF set)")]
    SingleStep,
}

/// Instruction prefixes in front of `bytes`: (legacy prefixes seen, bytes consumed).
/// REX prefixes (0x40-0x4f) are treated as prefixes: the vCPU runs the 64-bit kernel.
fn prefixes(bytes: &[u8]) -> (&[u8], usize) {
    let n = bytes
        .iter()
        .take_while(|&&b| {
            matches!(
                b,
                0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3
            ) || (0x40..=0x4f).contains(&b)
        })
        .count();
    (&bytes[..n], n)
}

/// Decides what the CPU would have done with the instruction `bytes` (starting at RIP) in
/// vCPU state `cpu`, for the instructions listed in the module docs.
pub fn complete(bytes: &[u8], cpu: CpuState) -> Result<Completion, Refusal> {
    let completion = decide(bytes, cpu)?;
    // Delivering an exception clears TF on the way into the handler (a fault before the
    // instruction, INT3's trap without a single-step trap); only a skipped instruction
    // would also owe the guest a #DB.
    if matches!(completion, Completion::Skip { .. }) && cpu.rflags & RFLAGS_TF != 0 {
        return Err(Refusal::SingleStep);
    }
    Ok(completion)
}

fn decide(bytes: &[u8], cpu: CpuState) -> Result<Completion, Refusal> {
    if bytes.is_empty() {
        return Err(Refusal::NoBytes);
    }
    let (prefix, n) = prefixes(bytes);
    let opcode = &bytes[n..];
    let locked = prefix.contains(&LOCK);
    let len = |opcode_len: usize| u8::try_from(n + opcode_len).unwrap_or(u8::MAX);
    let fault = |vector, mnemonic| {
        Ok(Completion::Exception {
            vector,
            rip_advance: 0,
            mnemonic,
        })
    };
    match opcode {
        [0xcc, ..] if locked => fault(UD_VECTOR, "lock int3"),
        [0xcc, ..] => Ok(Completion::Exception {
            vector: BP_VECTOR,
            rip_advance: len(1),
            mnemonic: "int3",
        }),
        // #UD is a fault whatever follows the opcode, so the ModRM of UD0/UD1 needs no
        // decoding: RIP stays on the instruction.
        [0x0f, 0x0b, ..] => fault(UD_VECTOR, "ud2"),
        [0x0f, 0xb9, ..] => fault(UD_VECTOR, "ud1"),
        [0x0f, 0xff, ..] => fault(UD_VECTOR, "ud0"),
        [0x9b, ..] if locked => fault(UD_VECTOR, "lock fwait"),
        [0x9b, ..] => wait(cpu, len(1)),
        _ => Err(Refusal::Unsupported),
    }
}

/// `WAIT`/`FWAIT` (Intel SDM vol. 2, "WAIT/FWAIT"; vol. 1 §8.7 for x87 error reporting).
fn wait(cpu: CpuState, len: u8) -> Result<Completion, Refusal> {
    const MNEMONIC: &str = "fwait";
    if cpu.cr0 & CR0_TS != 0 && cpu.cr0 & CR0_MP != 0 {
        return Ok(Completion::Exception {
            vector: NM_VECTOR,
            rip_advance: 0,
            mnemonic: MNEMONIC,
        });
    }
    if cpu.x87_exception_pending() {
        if cpu.cr0 & CR0_NE == 0 {
            return Err(Refusal::LegacyFpuErrorReporting);
        }
        return Ok(Completion::Exception {
            vector: MF_VECTOR,
            rip_advance: 0,
            mnemonic: MNEMONIC,
        });
    }
    Ok(Completion::Skip {
        len,
        mnemonic: MNEMONIC,
    })
}

/// A best guess at the instruction `bytes` start with, for failure messages: the
/// instructions this machine's KVM is known to lack, and the families they belong to.
pub fn mnemonic(bytes: &[u8]) -> Option<&'static str> {
    let (prefix, n) = prefixes(bytes);
    let has = |p: u8| prefix.contains(&p);
    let rex_w = prefix.iter().any(|&b| (0x48..=0x4f).contains(&b));
    let op = &bytes[n..];
    let reg = |modrm: u8| (modrm >> 3) & 7;
    let is_reg = |modrm: u8| modrm >> 6 == 3;
    Some(match op {
        [] => return None,
        [0xcc, ..] => "int3",
        [0x9b, ..] => "fwait",
        [0xf4, ..] => "hlt",
        [0xd8..=0xdf, ..] => "x87 floating-point instruction",
        [0xc4 | 0xc5, ..] => "VEX-encoded (AVX) instruction",
        [0x62, ..] => "EVEX-encoded (AVX-512) instruction",
        [0x0f, rest @ ..] => match rest {
            [0x0b, ..] => "ud2",
            [0xb9, ..] => "ud1",
            [0xff, ..] => "ud0",
            [0x05, ..] => "syscall",
            [0x07, ..] => "sysret",
            [0x31, ..] => "rdtsc",
            [0xa2, ..] => "cpuid",
            [0x0d, ..] => "prefetch",
            [0xb8, ..] if has(0xf3) => "popcnt",
            [0xbc, ..] if has(0xf3) => "tzcnt",
            [0xbd, ..] if has(0xf3) => "lzcnt",
            [0x01, 0xca, ..] => "clac",
            [0x01, 0xcb, ..] => "stac",
            [0x01, 0xd0, ..] => "xgetbv",
            [0x01, 0xd1, ..] => "xsetbv",
            [0x01, 0xe8, ..] => "serialize",
            [0x01, 0xf9, ..] => "rdtscp",
            [0x01, 0xc1, ..] => "vmcall",
            [0x01, 0xd9, ..] => "vmmcall",
            [0x01, 0xee, ..] => "rdpkru",
            [0x01, 0xef, ..] => "wrpkru",
            [0xae, m, ..] if is_reg(*m) && prefix.is_empty() => match reg(*m) {
                5 => "lfence",
                6 => "mfence",
                7 => "sfence",
                _ => return None,
            },
            [0xae, m, ..] if is_reg(*m) && has(0xf3) => "rd/wr fs/gs base",
            [0xae, m, ..] if !is_reg(*m) => match reg(*m) {
                0 => "fxsave",
                1 => "fxrstor",
                2 => "ldmxcsr",
                3 => "stmxcsr",
                4 => "xsave",
                5 => "xrstor",
                6 if has(0x66) => "clwb",
                6 => "xsaveopt",
                7 if has(0x66) => "clflushopt",
                7 => "clflush",
                _ => return None,
            },
            [0xc7, m, ..] => match (reg(*m), is_reg(*m)) {
                (1, false) if rex_w => "cmpxchg16b",
                (1, false) => "cmpxchg8b",
                (3, false) => "xrstors",
                (4, false) => "xsavec",
                (5, false) => "xsaves",
                (6, true) => "rdrand",
                (7, true) if has(0xf3) => "rdpid",
                (7, true) => "rdseed",
                _ => return None,
            },
            [0x38, 0xf0 | 0xf1, ..] if has(0xf2) => "crc32",
            [0x38, 0xf0 | 0xf1, ..] => "movbe",
            [0x38, ..] | [0x3a, ..] => "SSSE3/SSE4 instruction",
            _ => return None,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CR0 as Linux runs: PE, MP, ET, NE, WP, AM, PG.
    const LINUX_CR0: u64 = 0x8005_0033;
    /// FCW after FNINIT: every exception masked.
    const FCW_INIT: u16 = 0x037f;

    fn linux() -> CpuState {
        CpuState {
            cr0: LINUX_CR0,
            rflags: 0x2,
            fsw: 0,
            fcw: FCW_INIT,
        }
    }

    #[test]
    fn int3_is_a_breakpoint_trap_after_the_instruction() {
        assert_eq!(
            complete(&[0xcc, 0x90], linux()),
            Ok(Completion::Exception {
                vector: BP_VECTOR,
                rip_advance: 1,
                mnemonic: "int3"
            })
        );
    }

    #[test]
    fn ud2_and_its_siblings_raise_invalid_opcode_without_moving_rip() {
        for bytes in [
            &[0x0f, 0x0b][..],
            &[0x0f, 0xb9, 0x40, 0x10],
            &[0x0f, 0xff, 0xc0],
        ] {
            let Ok(Completion::Exception {
                vector,
                rip_advance,
                ..
            }) = complete(bytes, linux())
            else {
                panic!("{bytes:x?} not completed");
            };
            assert_eq!((vector, rip_advance), (UD_VECTOR, 0), "{bytes:x?}");
        }
    }

    #[test]
    fn fwait_without_pending_x87_exception_is_skipped() {
        assert_eq!(
            complete(&[0x9b, 0xdf, 0xe0], linux()),
            Ok(Completion::Skip {
                len: 1,
                mnemonic: "fwait"
            })
        );
    }

    #[test]
    fn fwait_with_a_pending_unmasked_exception_raises_math_fault() {
        let cpu = CpuState {
            fsw: FSW_ES | 0x4, // ZE flagged and unmasked
            fcw: FCW_INIT & !0x4,
            ..linux()
        };
        assert_eq!(
            complete(&[0x9b], cpu),
            Ok(Completion::Exception {
                vector: MF_VECTOR,
                rip_advance: 0,
                mnemonic: "fwait"
            })
        );
    }

    #[test]
    fn fwait_with_an_unmasked_flag_but_es_not_latched_raises_math_fault() {
        let cpu = CpuState {
            fsw: 0x1, // IE flagged, unmasked below
            fcw: FCW_INIT & !0x1,
            ..linux()
        };
        assert!(matches!(
            complete(&[0x9b], cpu),
            Ok(Completion::Exception {
                vector: MF_VECTOR,
                ..
            })
        ));
    }

    #[test]
    fn fwait_with_masked_exception_flags_only_is_skipped() {
        // Flags set but masked in FCW, ES clear.
        let cpu = CpuState {
            fsw: 0x20 | 0x4,
            ..linux()
        };
        assert!(matches!(
            complete(&[0x9b], cpu),
            Ok(Completion::Skip { len: 1, .. })
        ));
    }

    #[test]
    fn fwait_with_ts_and_mp_set_raises_device_not_available_first() {
        let cpu = CpuState {
            cr0: LINUX_CR0 | CR0_TS,
            fsw: FSW_ES,
            ..linux()
        };
        assert!(matches!(
            complete(&[0x9b], cpu),
            Ok(Completion::Exception {
                vector: NM_VECTOR,
                rip_advance: 0,
                ..
            })
        ));
    }

    #[test]
    fn fwait_with_ts_but_not_mp_ignores_ts() {
        let cpu = CpuState {
            cr0: (LINUX_CR0 | CR0_TS) & !CR0_MP,
            ..linux()
        };
        assert!(matches!(
            complete(&[0x9b], cpu),
            Ok(Completion::Skip { len: 1, .. })
        ));
    }

    #[test]
    fn fwait_with_pending_exception_and_ne_clear_is_refused() {
        let cpu = CpuState {
            cr0: LINUX_CR0 & !CR0_NE,
            fsw: FSW_ES,
            ..linux()
        };
        assert_eq!(
            complete(&[0x9b], cpu),
            Err(Refusal::LegacyFpuErrorReporting)
        );
    }

    #[test]
    fn prefixes_count_toward_the_length_of_skipped_and_trapping_instructions() {
        assert!(matches!(
            complete(&[0x3e, 0x9b], linux()),
            Ok(Completion::Skip { len: 2, .. })
        ));
        assert!(matches!(
            complete(&[0x2e, 0xcc], linux()),
            Ok(Completion::Exception { rip_advance: 2, .. })
        ));
    }

    #[test]
    fn lock_prefix_makes_completed_instructions_invalid_opcode() {
        for bytes in [&[0xf0, 0x9b][..], &[0xf0, 0xcc]] {
            assert!(
                matches!(
                    complete(bytes, linux()),
                    Ok(Completion::Exception {
                        vector: UD_VECTOR,
                        rip_advance: 0,
                        ..
                    })
                ),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn fences_are_left_to_kvm() {
        for modrm in [0xe8, 0xf0, 0xf8] {
            assert_eq!(
                complete(&[0x0f, 0xae, modrm], linux()),
                Err(Refusal::Unsupported)
            );
        }
    }

    #[test]
    fn memory_forms_of_0f_ae_are_refused() {
        // fxsave [rax], xsave [rax], clflush [rax]
        for modrm in [0x00, 0x20, 0x38] {
            assert_eq!(
                complete(&[0x0f, 0xae, modrm], linux()),
                Err(Refusal::Unsupported)
            );
        }
    }

    #[test]
    fn instructions_the_cpu_has_are_refused() {
        // popcnt rax, [rax]; xsaves [rax]; stac; cmpxchg16b [rdi]
        for bytes in [
            &[0xf3, 0x48, 0x0f, 0xb8, 0x00][..],
            &[0x0f, 0xc7, 0x28],
            &[0x0f, 0x01, 0xcb],
            &[0x48, 0x0f, 0xc7, 0x0f],
        ] {
            assert_eq!(
                complete(bytes, linux()),
                Err(Refusal::Unsupported),
                "{bytes:x?}"
            );
        }
    }

    #[test]
    fn single_stepping_refuses_skipped_instructions_but_not_exceptions() {
        let cpu = CpuState {
            rflags: 0x2 | RFLAGS_TF,
            ..linux()
        };
        assert_eq!(complete(&[0x9b], cpu), Err(Refusal::SingleStep));
        assert!(matches!(
            complete(&[0xcc], cpu),
            Ok(Completion::Exception {
                vector: BP_VECTOR,
                ..
            })
        ));
        assert!(matches!(
            complete(&[0x0f, 0x0b], cpu),
            Ok(Completion::Exception {
                vector: UD_VECTOR,
                ..
            })
        ));
    }

    #[test]
    fn missing_bytes_are_refused() {
        assert_eq!(complete(&[], linux()), Err(Refusal::NoBytes));
        assert_eq!(complete(&[0x66, 0x2e], linux()), Err(Refusal::Unsupported));
    }

    #[test]
    fn mnemonic_names_the_instructions_this_kvm_lacks() {
        let cases: [(&[u8], &str); 12] = [
            (&[0xf3, 0x48, 0x0f, 0xb8, 0x00], "popcnt"),
            (&[0x0f, 0x01, 0xca], "clac"),
            (&[0x0f, 0x01, 0xcb], "stac"),
            (&[0x0f, 0xae, 0x27], "xsave"),
            (&[0x48, 0x0f, 0xae, 0x2f], "xrstor"),
            (&[0x0f, 0xc7, 0x2f], "xsaves"),
            (&[0x48, 0x0f, 0xc7, 0x0f], "cmpxchg16b"),
            (&[0x9b], "fwait"),
            (&[0xcc], "int3"),
            (&[0x0f, 0x0b], "ud2"),
            (&[0x0f, 0xae, 0xf0], "mfence"),
            (&[0xdd, 0x30], "x87 floating-point instruction"),
        ];
        for (bytes, name) in cases {
            assert_eq!(mnemonic(bytes), Some(name), "{bytes:x?}");
        }
    }

    #[test]
    fn mnemonic_admits_ignorance() {
        assert_eq!(mnemonic(&[]), None);
        assert_eq!(mnemonic(&[0x90]), None);
        assert_eq!(mnemonic(&[0x0f, 0x1f, 0x00]), None);
    }
}
