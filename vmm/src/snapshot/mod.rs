//! VM snapshots: `PUT /snapshot/create` writes a paused VM's state file and memory file,
//! `PUT /snapshot/load` and `genos-vmm --restore DIR` build a VM from them.
//!
//! The state file is [`format`]'s container around the JSON of a [`SnapshotState`]: the
//! VM's configuration, every vCPU's KVM state, the irqchip, PIT and clock, and each
//! device's state. Everything is read before either file is written, so a failure leaves
//! no snapshot behind that looks complete; and a state file is checked whole (format and
//! VMM version, length, checksum, contents, the memory file's size, the configuration
//! against the restoring VMM's) before anything of the new VM exists. `docs/snapshots.md`
//! has the format, what is covered and what is not.

pub mod format;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::builder::BuiltVm;
use crate::config::VmConfig;
use crate::devices::legacy::{BootTimerState, I8042State, SerialState};
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::memory::{save_guest_ram, MemoryError};
use crate::vstate::snapshot::{save_vm, StateError, VcpuState, VmKvmState};
use crate::vstate::vcpu::VcpuError;

pub use format::FormatError;
pub use vmm_api::snapshot::restore_dir;
pub use vmm_api::{SnapshotCreate, SnapshotLoad};

/// How long the vCPU threads may take to hand over their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors creating or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Reading a vCPU's state failed.
    #[error("cannot read the vCPUs' state")]
    Vcpu(#[from] VcpuError),
    /// Reading the VM's KVM state failed.
    #[error("cannot read the VM's state")]
    Vm(#[from] StateError),
    /// Writing guest memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A snapshot file could not be created, written or read.
    #[error("{what} {path}{hint}")]
    File {
        /// What was done ("cannot create", "cannot read").
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// A hint for the sandbox's refusals.
        hint: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a snapshot this VMM reads.
    #[error("snapshot {path}")]
    Format {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: FormatError,
    },
    /// The state file's contents do not parse or do not add up.
    #[error("snapshot {path}: invalid state: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The snapshot's VM is not the one the restoring VMM is configured for.
    #[error("snapshot's VM has {field} {snapshot}, this VMM is configured for {here}")]
    ConfigMismatch {
        /// The configuration field.
        field: &'static str,
        /// The snapshot's value.
        snapshot: String,
        /// The restoring VMM's value.
        here: String,
    },
}

/// Each device's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialState,
    /// The i8042.
    pub i8042: I8042State,
    /// The boot timer.
    pub boot_timer: BootTimerState,
    /// The virtio-mmio devices, in slot order.
    #[serde(default)]
    pub virtio: Vec<VirtioDeviceState>,
}

/// One virtio-mmio device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioDeviceState {
    /// The device's name in the VMM (`rng`, `block0`, ...), checked on restore.
    pub name: String,
    /// Its transport, common part and own state.
    pub transport: TransportState,
}

/// Everything the state file holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The snapshotted VM's configuration.
    pub config: VmConfig,
    /// Guest memory size in bytes (the memory file's size).
    pub mem_bytes: u64,
    /// The irqchip, PIT and clock.
    pub vm: VmKvmState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DeviceStates,
}

fn create_file(path: &Path) -> Result<File, SnapshotError> {
    File::create(path).map_err(|source| SnapshotError::File {
        what: "cannot create",
        path: path.to_owned(),
        hint: match source.kind() {
            std::io::ErrorKind::PermissionDenied => {
                " (under Landlock, snapshot files must be in the API socket's directory)"
            }
            _ => "",
        },
        source,
    })
}

/// Writes a snapshot of `vm` (built from `config`, vCPUs paused) to the two files of
/// `request`. All state is read first; the memory file is written before the state file,
/// so a state file exists only once its memory file is complete.
pub fn create(
    vm: &BuiltVm,
    config: &VmConfig,
    request: &SnapshotCreate,
) -> Result<(), SnapshotError> {
    if request.snapshot_path == request.mem_file_path {
        return Err(SnapshotError::Invalid {
            path: request.snapshot_path.clone(),
            reason: "the state file and the memory file must differ".into(),
        });
    }
    let vcpus = vm.vcpus.save_state(vm.kvm_facts.clone(), SAVE_TIMEOUT)?;
    let state = SnapshotState {
        config: config.clone(),
        mem_bytes: u64::from(config.mem_mib) << 20,
        vm: save_vm(vm.vm.fd())?,
        vcpus,
        devices: DeviceStates {
            virtio: vm
                .devices
                .transports()
                .map(|(name, transport)| VirtioDeviceState {
                    name: name.to_owned(),
                    transport: transport.lock().unwrap_or_else(|e| e.into_inner()).save(),
                })
                .collect(),
            ..vm.legacy.save()
        },
    };
    let json = serde_json::to_vec(&state).map_err(|e| SnapshotError::Invalid {
        path: request.snapshot_path.clone(),
        reason: format!("cannot serialise the state: {e}"),
    })?;
    let file = format::encode(&json);

    let mem = create_file(&request.mem_file_path)?;
    save_guest_ram(&vm.ram, &mem, &request.mem_file_path)?;
    let mut out = create_file(&request.snapshot_path)?;
    out.write_all(&file).map_err(|source| SnapshotError::File {
        what: "cannot write",
        path: request.snapshot_path.clone(),
        hint: "",
        source,
    })?;
    Ok(())
}

/// Reads and checks the state file at `path` (format, checksum, contents): the
/// [`SnapshotState`] it returns is consistent in itself.
pub fn read(path: &Path) -> Result<SnapshotState, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::File {
        what: "cannot read",
        path: path.to_owned(),
        hint: "",
        source,
    })?;
    parse(&bytes).map_err(|e| match e {
        ParseError::Format(source) => SnapshotError::Format {
            path: path.to_owned(),
            source,
        },
        ParseError::Invalid(reason) => SnapshotError::Invalid {
            path: path.to_owned(),
            reason,
        },
    })
}

/// Why [`parse`] refused a state file.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The container is wrong.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// The state inside does not parse or does not add up.
    #[error("invalid state: {0}")]
    Invalid(String),
}

/// Checks a whole state file in memory and returns its state (the fuzzing entry point).
pub fn parse(bytes: &[u8]) -> Result<SnapshotState, ParseError> {
    let json = format::decode(bytes)?;
    let state: SnapshotState =
        serde_json::from_slice(json).map_err(|e| ParseError::Invalid(e.to_string()))?;
    state.validate().map_err(ParseError::Invalid)?;
    Ok(state)
}

impl SnapshotState {
    /// The checks a state must pass beyond its checksum (a VMM of this version wrote it,
    /// but a restore must not trust what it cannot afford to get wrong).
    fn validate(&self) -> Result<(), String> {
        self.config.validate_values().map_err(|e| e.to_string())?;
        if self.mem_bytes != u64::from(self.config.mem_mib) << 20 {
            return Err(format!(
                "memory size {} does not match the configuration's {} MiB",
                self.mem_bytes, self.config.mem_mib
            ));
        }
        if self.vcpus.len() != usize::from(self.config.vcpus) {
            return Err(format!(
                "{} vCPU states for a configuration of {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            ));
        }
        for (i, vcpu) in self.vcpus.iter().enumerate() {
            if usize::from(vcpu.id) != i {
                return Err(format!("vCPU state {i} has index {}", vcpu.id));
            }
        }
        let virtio = self.config.disks.len()
            + usize::from(self.config.net.is_some())
            + usize::from(self.config.rng)
            + usize::from(self.config.vsock.is_some())
            + usize::from(self.config.gpu.is_some())
            + 3 * usize::from(self.config.input);
        if self.devices.virtio.len() != virtio {
            return Err(format!(
                "{} virtio device states for a configuration of {virtio}",
                self.devices.virtio.len()
            ));
        }
        Ok(())
    }

    /// Checks the snapshot against the configuration a VMM was given before the load,
    /// if any: what the guest sees must match. Host-side choices (kernel path, console)
    /// may differ.
    pub fn check_config(&self, here: Option<&VmConfig>) -> Result<(), SnapshotError> {
        let Some(here) = here else {
            return Ok(());
        };
        let ours = &self.config;
        let mismatch = |field, snapshot: String, here: String| SnapshotError::ConfigMismatch {
            field,
            snapshot,
            here,
        };
        if ours.vcpus != here.vcpus {
            return Err(mismatch(
                "vcpus",
                ours.vcpus.to_string(),
                here.vcpus.to_string(),
            ));
        }
        if ours.mem_mib != here.mem_mib {
            return Err(mismatch(
                "mem_mib",
                ours.mem_mib.to_string(),
                here.mem_mib.to_string(),
            ));
        }
        let devices = |c: &VmConfig| {
            format!(
                "disks {}, net {}, rng {}, vsock {}, gpu {}, input {}",
                c.disks.len(),
                c.net.is_some(),
                c.rng,
                c.vsock.is_some(),
                c.gpu.is_some(),
                c.input
            )
        };
        if devices(ours) != devices(here) {
            return Err(mismatch("devices", devices(ours), devices(here)));
        }
        Ok(())
    }
}

/// The two files `genos-vmm --restore DIR` loads.
pub fn restore_dir_files(dir: &Path) -> (PathBuf, PathBuf) {
    (
        dir.join(restore_dir::SNAPSHOT),
        dir.join(restore_dir::MEMORY),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> SnapshotState {
        let mut config = VmConfig::new("/k");
        config.mem_mib = 16;
        SnapshotState {
            config,
            mem_bytes: 16 << 20,
            vm: VmKvmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: Default::default(),
            },
            vcpus: vec![serde_json::from_value(sample_vcpu_json()).unwrap()],
            devices: DeviceStates {
                serial: SerialState::default(),
                i8042: I8042State::default(),
                boot_timer: BootTimerState::default(),
                virtio: Vec::new(),
            },
        }
    }

    #[test]
    fn a_state_missing_its_virtio_devices_is_refused() {
        let mut state = sample_state();
        state.config.rng = true;

        let err = parse(&file_of(&state)).unwrap_err();

        assert_eq!(
            err,
            ParseError::Invalid("0 virtio device states for a configuration of 1".into())
        );
    }

    /// A vCPU state as JSON (kvm-bindings' types have serde but no Default for all).
    fn sample_vcpu_json() -> serde_json::Value {
        let v = VcpuStateParts::default();
        serde_json::to_value(v).unwrap()
    }

    #[derive(Default, Serialize)]
    struct VcpuStateParts {
        id: u8,
        cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
        msrs: Vec<kvm_bindings::kvm_msr_entry>,
        regs: kvm_bindings::kvm_regs,
        sregs: kvm_bindings::kvm_sregs,
        fpu: crate::vstate::snapshot::FpuState,
        xsave: Option<kvm_bindings::kvm_xsave>,
        xcrs: Option<kvm_bindings::kvm_xcrs>,
        lapic: kvm_bindings::kvm_lapic_state,
        events: kvm_bindings::kvm_vcpu_events,
        mp_state: kvm_bindings::kvm_mp_state,
        debug_regs: kvm_bindings::kvm_debugregs,
        tsc_khz: Option<u32>,
    }

    fn file_of(state: &SnapshotState) -> Vec<u8> {
        format::encode(&serde_json::to_vec(state).unwrap())
    }

    #[test]
    fn a_state_file_parses_back_to_its_state() {
        let state = sample_state();

        let parsed = parse(&file_of(&state)).unwrap();

        assert_eq!(parsed.config, state.config);
        assert_eq!(parsed.vcpus.len(), 1);
        assert_eq!(parsed.devices, state.devices);
    }

    #[test]
    fn a_state_whose_vcpus_do_not_match_its_configuration_is_refused() {
        let mut state = sample_state();
        state.config.vcpus = 2;

        let err = parse(&file_of(&state)).unwrap_err();

        assert_eq!(
            err,
            ParseError::Invalid("1 vCPU states for a configuration of 2 vCPUs".into())
        );
    }

    #[test]
    fn a_restoring_vmm_configured_for_another_memory_size_is_refused() {
        let state = sample_state();
        let mut here = state.config.clone();
        here.mem_mib = 32;

        let err = state.check_config(Some(&here)).unwrap_err();

        assert_eq!(
            err.to_string(),
            "snapshot's VM has mem_mib 16, this VMM is configured for 32"
        );
    }

    #[test]
    fn another_kernel_path_or_console_is_not_a_mismatch() {
        let state = sample_state();
        let mut here = state.config.clone();
        here.kernel = "/elsewhere/vmlinux".into();
        here.serial = crate::config::SerialConfig::None;

        assert!(state.check_config(Some(&here)).is_ok());
    }

    #[test]
    fn a_corrupted_state_file_is_refused_before_its_state_is_read() {
        let mut file = file_of(&sample_state());
        let middle = file.len() / 2;
        file[middle] ^= 0x20;

        let err = parse(&file).unwrap_err();

        assert!(
            matches!(err, ParseError::Format(FormatError::Checksum { .. })),
            "{err:?}"
        );
    }
}
