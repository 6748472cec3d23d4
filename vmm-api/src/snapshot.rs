//! Snapshot requests: `PUT /snapshot/create` writes a paused VM's state and memory to two
//! files, `PUT /snapshot/load` restores them into a VMM that has not started a VM
//! (Firecracker's bodies). `docs/snapshots.md` describes the files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::SerialConfig;

/// `PUT /snapshot/create` body. The VM must be paused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Where the VM state file goes (created or truncated).
    pub snapshot_path: PathBuf,
    /// Where guest memory goes (created or truncated).
    pub mem_file_path: PathBuf,
}

/// `PUT /snapshot/load` body. Only a VMM that has not started a VM takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    /// The VM state file written by `PUT /snapshot/create`.
    pub snapshot_path: PathBuf,
    /// The guest memory file written with it; mapped copy-on-write, never modified.
    pub mem_file_path: PathBuf,
    /// Run the vCPUs once restored (otherwise the VM is paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Where this copy's COM1 output goes, instead of the snapshotted VM's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// The Unix socket this copy's vsock device listens on, instead of the snapshotted
    /// VM's (two copies cannot share one). The guest CID stays the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_uds_path: Option<PathBuf>,
    /// The TAP device this copy's NIC uses, instead of the snapshotted VM's (two copies
    /// cannot share one). The MAC stays the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tap: Option<String>,
}

impl SnapshotLoad {
    /// A load of the two files with defaults: paused, the snapshot's console.
    pub fn new(snapshot_path: impl Into<PathBuf>, mem_file_path: impl Into<PathBuf>) -> Self {
        Self {
            snapshot_path: snapshot_path.into(),
            mem_file_path: mem_file_path.into(),
            resume_vm: false,
            serial: None,
            vsock_uds_path: None,
            net_tap: None,
        }
    }
}

/// The file names `genos-vmm --restore DIR` reads in DIR.
pub mod restore_dir {
    /// The VM state file.
    pub const SNAPSHOT: &str = "snapshot";
    /// The guest memory file.
    pub const MEMORY: &str = "memory";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_body_defaults_to_paused_with_the_snapshots_console() {
        let body = br#"{"snapshot_path":"/s/snapshot","mem_file_path":"/s/memory"}"#;

        let load: SnapshotLoad = serde_json::from_slice(body).unwrap();

        assert_eq!(load, SnapshotLoad::new("/s/snapshot", "/s/memory"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let body = br#"{"snapshot_path":"/s","mem_file_path":"/m","diff":true}"#;

        let err = serde_json::from_slice::<SnapshotCreate>(body).unwrap_err();

        assert!(err.to_string().contains("unknown field `diff`"), "{err}");
    }
}
