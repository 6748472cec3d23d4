//! VM configuration: what genos-vmm's CLI, a `--config` JSON file and the control API
//! (`PUT /vm/config`, `PATCH /vm/config`, `GET /vm`) describe.
//!
//! [`VmConfig`] is the complete, validated description of one VM. Its JSON shape (used by
//! `--config FILE.json`, `PUT /vm/config` and `GET /vm`) is:
//!
//! ```json
//! {
//!   "kernel": "/path/vmlinux",            // required
//!   "initrd": "/path/initramfs.cpio",     // optional
//!   "cmdline": "console=ttyS0",           // optional, default "console=ttyS0 reboot=k panic=-1"
//!   "vcpus": 1,                           // 1..=32, default 1
//!   "mem_mib": 128,                       // 16..=262144, default 128
//!   "disks": [{"path": "/path/rootfs.ext4", "read_only": false}],
//!   "rng": false,
//!   "cpu_template": "auto",               // "auto" | "host" | "baseline"
//!   "serial": "stdout",                   // "stdout" | "file:PATH" | "none"
//!   "gpu": {"width": 1280, "height": 800},// optional: adds virtio-gpu
//!   "input": false,                       // adds virtio-input keyboard, tablet, touch
//!   "vsock": {"guest_cid": 3, "uds_path": "/run/vm.vsock"} // optional: adds virtio-vsock
//! }
//! ```
//!
//! [`ConfigPatch`] is the same shape with every field optional: a `--config` file may leave
//! out the kernel when `--kernel` is given, and `PATCH /vm/config` changes only what it names.
//! [`VmConfig::validate`] checks ranges and that every file can be opened as the VM will
//! open it; each error is one line naming the field.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Fewest vCPUs a VM can have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a VM can have.
pub const MAX_VCPUS: u8 = 32;
/// Least guest memory, in MiB (room for boot structures, a kernel and an initramfs).
pub const MIN_MEM_MIB: u32 = 16;
/// Most guest memory, in MiB (256 GiB).
pub const MAX_MEM_MIB: u32 = 256 * 1024;
/// Longest kernel command line in bytes, NUL excluded (x86 `COMMAND_LINE_SIZE` is 2048).
pub const MAX_CMDLINE_LEN: usize = 2047;
/// Most virtio-blk disks (each takes one virtio-mmio slot and one GSI).
pub const MAX_DISKS: usize = 16;
/// Smallest display width or height in pixels.
pub const MIN_DISPLAY_DIM: u32 = 64;
/// Largest display width in pixels (8K UHD).
pub const MAX_DISPLAY_WIDTH: u32 = 7680;
/// Largest display height in pixels (8K UHD).
pub const MAX_DISPLAY_HEIGHT: u32 = 4320;

/// Smallest guest CID (0, 1 and 2 are the hypervisor, local and host addresses).
pub const MIN_GUEST_CID: u64 = 3;
/// Largest guest CID: Linux keeps CIDs in 32 bits and `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;
/// Longest vsock socket path in bytes: the device also connects to `<path>_<port>`
/// (up to 11 more bytes), and a Unix socket path holds at most 107.
pub const MAX_VSOCK_PATH_LEN: usize = 96;

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// vCPU count used when none is given.
pub const DEFAULT_VCPUS: u8 = 1;
/// Guest memory used when none is given, in MiB.
pub const DEFAULT_MEM_MIB: u32 = 128;

/// Errors in a VM configuration. Messages are one line and name the offending field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// No kernel image was given.
    #[error("kernel is required (--kernel PATH or \"kernel\" in the config)")]
    MissingKernel,
    /// vCPU count out of range.
    #[error("vcpus must be between {MIN_VCPUS} and {MAX_VCPUS}, got {0}")]
    Vcpus(u64),
    /// Memory size out of range.
    #[error("mem_mib must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}, got {0}")]
    MemMib(u64),
    /// Command line too long or containing a NUL byte.
    #[error("cmdline {0}")]
    Cmdline(&'static str),
    /// Too many disks.
    #[error("at most {MAX_DISKS} disks are supported, got {0}")]
    TooManyDisks(usize),
    /// A file the VM needs cannot be opened as needed.
    #[error("{what} {path}: {source}")]
    File {
        /// Which file ("kernel", "initrd", "disk 0", "serial file").
        what: String,
        /// The path as given.
        path: String,
        /// Why opening it failed.
        #[source]
        source: std::io::Error,
    },
    /// A path that must be a regular file is something else.
    #[error("{what} {path}: not a regular file")]
    NotAFile {
        /// Which file.
        what: String,
        /// The path as given.
        path: String,
    },
    /// Display size out of range.
    #[error(
        "display size must be between {MIN_DISPLAY_DIM}x{MIN_DISPLAY_DIM} and \
         {MAX_DISPLAY_WIDTH}x{MAX_DISPLAY_HEIGHT}, got {0}x{1}"
    )]
    DisplaySize(u32, u32),
    /// A `WIDTHxHEIGHT` string that does not parse.
    #[error("display size must look like WIDTHxHEIGHT (e.g. 1280x800), got {0:?}")]
    DisplaySyntax(String),
    /// `--net` is not `TAP[,mac=aa:bb:cc:dd:ee:ff]` with a valid interface name.
    #[error("bad net device {0:?}: expected TAP[,mac=aa:bb:cc:dd:ee:ff] with a 1-15 character interface name")]
    NetSyntax(String),
    /// A `--vsock` value that is not `CID:SOCKET`.
    #[error("vsock must look like CID:SOCKET (e.g. 3:/run/vm.vsock), got {0:?}")]
    VsockSyntax(String),
    /// A guest CID out of range.
    #[error("vsock guest_cid must be between {MIN_GUEST_CID} and {MAX_GUEST_CID}, got {0}")]
    VsockCid(u64),
    /// A vsock socket path that cannot be used.
    #[error("vsock uds_path {path:?}: {why}")]
    VsockPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A serial setting that is not `stdout`, `none` or `file:PATH`.
    #[error("serial must be stdout, none or file:PATH, got {0:?}")]
    Serial(String),
    /// A CPU template name that is not known.
    #[error("cpu_template must be auto, host or baseline, got {0:?}")]
    CpuTemplate(String),
    /// A `PATH[:ro]` disk argument that does not parse.
    #[error("disk must look like PATH or PATH:ro, got {0:?}")]
    DiskSyntax(String),
    /// A disk index in `PUT /vm/disks/{index}` that leaves a gap.
    #[error("disk index {index} out of range: {len} disks configured, use 0..={len}")]
    DiskIndex {
        /// Requested index.
        index: usize,
        /// Current number of disks.
        len: usize,
    },
    /// The configuration file could not be read.
    #[error("config file {path}: {source}")]
    ReadFile {
        /// The path as given.
        path: String,
        /// Why reading failed.
        #[source]
        source: std::io::Error,
    },
    /// The configuration JSON is malformed or has unknown/mistyped fields.
    #[error("config {origin}: {source}")]
    Json {
        /// Where the JSON came from (file path or "body").
        origin: String,
        /// The parser's one-line description (with line and column).
        #[source]
        source: serde_json::Error,
    },
}

/// CPU template: which CPUID features the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuTemplate {
    /// `host` on real KVM, `baseline` on the nested `kvm_pvm` kind (and wherever the kind
    /// cannot be told): see [`CpuTemplate::resolve`].
    #[default]
    Auto,
    /// Everything KVM supports, normalised.
    Host,
    /// Hides the features this nested KVM cannot emulate (see machine-facts), and adds the
    /// matching `clearcpuid=` to the kernel command line.
    Baseline,
}

/// What kind of KVM a host has, as far as CPU templates and `genos doctor` care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// The hardware-assisted kind (`kvm_intel` or `kvm_amd`): CPUID filtering works and the
    /// guest runs natively.
    Real,
    /// The nested, software-assisted `kvm_pvm` of the development machines: `KVM_SET_CPUID2`
    /// is ignored and many instructions cannot be emulated.
    NestedPvm,
    /// `/dev/kvm` is there but the module list says neither (or cannot be read, as in a
    /// jail's chroot).
    Unknown,
    /// No `/dev/kvm`.
    Missing,
}

impl fmt::Display for KvmKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Real => "real KVM",
            Self::NestedPvm => "nested kvm_pvm",
            Self::Unknown => "KVM of an unknown kind",
            Self::Missing => "no KVM",
        })
    }
}

/// What the host reports about its KVM: the facts [`KvmKind`] is decided from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KvmHostFacts {
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/sys/module` could be read (not in a chroot without `/sys`).
    pub modules_visible: bool,
    /// `/sys/module/kvm_pvm` exists.
    pub kvm_pvm: bool,
    /// `/sys/module/kvm_intel` exists.
    pub kvm_intel: bool,
    /// `/sys/module/kvm_amd` exists.
    pub kvm_amd: bool,
}

impl KvmHostFacts {
    /// Reads the facts of this host: four `stat` calls, the one place they are read.
    pub fn read() -> Self {
        let exists = |p: &str| Path::new(p).exists();
        Self {
            dev_kvm: exists("/dev/kvm"),
            modules_visible: Path::new("/sys/module").is_dir(),
            kvm_pvm: exists("/sys/module/kvm_pvm"),
            kvm_intel: exists("/sys/module/kvm_intel"),
            kvm_amd: exists("/sys/module/kvm_amd"),
        }
    }

    /// The kind of KVM these facts describe. `kvm_pvm` wins over the hardware modules: it is
    /// what serves `/dev/kvm` when it is loaded.
    pub fn kind(&self) -> KvmKind {
        if !self.dev_kvm {
            KvmKind::Missing
        } else if !self.modules_visible {
            KvmKind::Unknown
        } else if self.kvm_pvm {
            KvmKind::NestedPvm
        } else if self.kvm_intel || self.kvm_amd {
            KvmKind::Real
        } else {
            KvmKind::Unknown
        }
    }
}

impl CpuTemplate {
    /// The template a VM gets on a host with `facts`: `auto` becomes `host` on real KVM and
    /// `baseline` everywhere else (nested `kvm_pvm`, or a kind that cannot be told, where
    /// `baseline` is the one that boots); `host` and `baseline` stay as they are. Never
    /// returns `Auto`.
    pub fn resolve(self, facts: &KvmHostFacts) -> CpuTemplate {
        match self {
            Self::Auto => match facts.kind() {
                KvmKind::Real => Self::Host,
                KvmKind::NestedPvm | KvmKind::Unknown | KvmKind::Missing => Self::Baseline,
            },
            concrete => concrete,
        }
    }
}

impl FromStr for CpuTemplate {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "host" => Ok(Self::Host),
            "baseline" => Ok(Self::Baseline),
            _ => Err(ConfigError::CpuTemplate(s.to_owned())),
        }
    }
}

impl fmt::Display for CpuTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Host => "host",
            Self::Baseline => "baseline",
        })
    }
}

/// Where the guest's COM1 output goes. JSON: `"stdout"`, `"none"` or `"file:PATH"`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SerialConfig {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated when the VM is built.
    File(PathBuf),
    /// Discarded.
    None,
}

impl FromStr for SerialConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdout" => Ok(Self::Stdout),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::Serial(s.to_owned())),
            },
        }
    }
}

impl TryFrom<String> for SerialConfig {
    type Error = ConfigError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SerialConfig> for String {
    fn from(s: SerialConfig) -> String {
        s.to_string()
    }
}

impl fmt::Display for SerialConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::None => f.write_str("none"),
            Self::File(path) => write!(f, "file:{}", path.display()),
        }
    }
}

/// One virtio-blk disk backed by a raw image file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    /// Whether the guest may only read (the device offers `VIRTIO_BLK_F_RO`).
    #[serde(default)]
    pub read_only: bool,
}

impl FromStr for DiskConfig {
    type Err = ConfigError;
    /// Parses the CLI form `PATH` or `PATH:ro`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (path, read_only) = match s.strip_suffix(":ro") {
            Some(path) => (path, true),
            None => (s, false),
        };
        if path.is_empty() {
            return Err(ConfigError::DiskSyntax(s.to_owned()));
        }
        Ok(Self {
            path: PathBuf::from(path),
            read_only,
        })
    }
}

/// Size of a display in pixels. CLI form `WIDTHxHEIGHT`; JSON `{"width": W, "height": H}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplaySize {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl DisplaySize {
    /// Checks that both dimensions are within the supported range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let ok = (MIN_DISPLAY_DIM..=MAX_DISPLAY_WIDTH).contains(&self.width)
            && (MIN_DISPLAY_DIM..=MAX_DISPLAY_HEIGHT).contains(&self.height);
        if ok {
            Ok(())
        } else {
            Err(ConfigError::DisplaySize(self.width, self.height))
        }
    }
}

impl FromStr for DisplaySize {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ConfigError::DisplaySyntax(s.to_owned());
        let (w, h) = s.split_once(['x', 'X']).ok_or_else(syntax)?;
        let digits = |v: &str| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit());
        if !digits(w) || !digits(h) {
            return Err(syntax());
        }
        let size = Self {
            width: w.parse().map_err(|_| syntax())?,
            height: h.parse().map_err(|_| syntax())?,
        };
        size.validate()?;
        Ok(size)
    }
}

impl fmt::Display for DisplaySize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// An Ethernet MAC address, written `aa:bb:cc:dd:ee:ff` (unicast only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A locally administered unicast address: the default guest MAC.
    pub const DEFAULT: MacAddr = MacAddr([0x06, 0x00, 0xac, 0x10, 0x00, 0x02]);
}

/// A string that is not a MAC address.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex byte pairs separated by ':', unicast)")]
pub struct MacParseError(String);

impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        // A multicast source address would make the guest's frames undeliverable.
        if parts.next().is_some() || bytes[0] & 1 != 0 {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net NIC on an existing TAP device (`--net TAP[,mac=MAC]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Name of the TAP interface in the VMM's network namespace, owned by its user.
    pub tap: String,
    /// The guest's MAC address; a fixed locally administered one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

impl NetConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let ok = (1..=15).contains(&self.tap.len())
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if ok {
            Ok(())
        } else {
            Err(ConfigError::NetSyntax(self.tap.clone()))
        }
    }
}

impl fmt::Display for NetConfig {
    /// The CLI form `TAP[,mac=MAC]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.tap)?;
        match &self.mac {
            Some(mac) => write!(f, ",mac={mac}"),
            None => Ok(()),
        }
    }
}

impl FromStr for NetConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let tap = parts.next().unwrap_or_default().to_owned();
        let mut mac = None;
        for part in parts {
            match part.split_once('=') {
                Some(("mac", v)) => {
                    mac = Some(
                        v.parse()
                            .map_err(|_| ConfigError::NetSyntax(s.to_owned()))?,
                    )
                }
                _ => return Err(ConfigError::NetSyntax(s.to_owned())),
            }
        }
        let net = Self { tap, mac };
        net.validate()?;
        Ok(net)
    }
}

/// A virtio-vsock device (`--vsock CID:SOCKET`, `PUT /vsock`), in Firecracker's hybrid
/// design: the VMM listens on `uds_path`, where a host program connects and writes
/// `CONNECT <guest port>\n` (answered `OK <host port>\n`); a guest connecting to host
/// (CID 2) port P reaches the Unix socket `<uds_path>_P`. JSON as Firecracker's `/vsock`
/// body: `{"guest_cid": 3, "uds_path": "/run/vm.vsock"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID, [`MIN_GUEST_CID`]..=[`MAX_GUEST_CID`].
    pub guest_cid: u64,
    /// The Unix socket the VMM listens on (at most [`MAX_VSOCK_PATH_LEN`] bytes); a stale
    /// socket there is replaced.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the CID's range and the path's form (no file system access).
    pub fn validate_values(&self) -> Result<(), ConfigError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(ConfigError::VsockCid(self.guest_cid));
        }
        let path_error = |why| ConfigError::VsockPath {
            path: self.uds_path.display().to_string(),
            why,
        };
        let len = self.uds_path.as_os_str().len();
        if len == 0 {
            return Err(path_error("is empty"));
        }
        if len > MAX_VSOCK_PATH_LEN {
            return Err(path_error("is longer than 96 bytes"));
        }
        if self.uds_path.as_os_str().as_encoded_bytes().contains(&0) {
            return Err(path_error("contains a NUL byte"));
        }
        if self.uds_path.file_name().is_none() {
            return Err(path_error("names no file"));
        }
        Ok(())
    }

    /// Checks, beyond the values, that the socket can be created: its directory exists
    /// and nothing but a (stale) socket is in its place.
    pub fn validate(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::FileTypeExt;
        self.validate_values()?;
        let path_error = |why| ConfigError::VsockPath {
            path: self.uds_path.display().to_string(),
            why,
        };
        let dir = match self.uds_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(path_error("directory does not exist"));
        }
        match std::fs::symlink_metadata(&self.uds_path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                Err(path_error("exists and is not a socket"))
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Display for VsockConfig {
    /// The CLI form `CID:SOCKET`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.guest_cid, self.uds_path.display())
    }
}

impl FromStr for VsockConfig {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || ConfigError::VsockSyntax(s.to_owned());
        let (cid, path) = s.split_once(':').ok_or_else(syntax)?;
        if cid.is_empty() || !cid.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let vsock = Self {
            guest_cid: cid.parse().map_err(|_| ConfigError::VsockCid(u64::MAX))?,
            uds_path: PathBuf::from(path),
        };
        vsock.validate_values()?;
        Ok(vsock)
    }
}

/// The complete description of one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest kernel: ELF `vmlinux` or `bzImage`.
    pub kernel: PathBuf,
    /// Initial ramdisk loaded after the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the VMM appends its virtio-mmio device and CPU-template arguments).
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    /// Number of vCPUs, [`MIN_VCPUS`]..=[`MAX_VCPUS`].
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory in MiB, [`MIN_MEM_MIB`]..=[`MAX_MEM_MIB`].
    #[serde(default = "default_mem_mib")]
    pub mem_mib: u32,
    /// virtio-blk disks, in the order the guest sees them (`vda`, `vdb`, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// Adds a virtio-rng device.
    #[serde(default)]
    pub rng: bool,
    /// CPUID template.
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// Where COM1 output goes.
    #[serde(default)]
    pub serial: SerialConfig,
    /// Adds a virtio-gpu device with this initial display size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<DisplaySize>,
    /// Adds the virtio-input keyboard, tablet and touch screen.
    #[serde(default)]
    pub input: bool,
    /// Adds a virtio-net NIC on a TAP device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<NetConfig>,
    /// Adds a virtio-vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_owned()
}
fn default_vcpus() -> u8 {
    DEFAULT_VCPUS
}
fn default_mem_mib() -> u32 {
    DEFAULT_MEM_MIB
}

impl VmConfig {
    /// A configuration with `kernel` and every other field at its default.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: default_cmdline(),
            vcpus: DEFAULT_VCPUS,
            mem_mib: DEFAULT_MEM_MIB,
            disks: Vec::new(),
            rng: false,
            cpu_template: CpuTemplate::default(),
            serial: SerialConfig::default(),
            gpu: None,
            input: false,
            net: None,
            vsock: None,
        }
    }

    /// Parses a complete configuration from JSON; `origin` names the source in errors.
    pub fn from_json(json: &[u8], origin: &str) -> Result<Self, ConfigError> {
        serde_json::from_slice(json).map_err(|source| ConfigError::Json {
            origin: origin.to_owned(),
            source,
        })
    }

    /// Checks value ranges only (no file system access).
    pub fn validate_values(&self) -> Result<(), ConfigError> {
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::MissingKernel);
        }
        if !(MIN_VCPUS..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(ConfigError::Vcpus(self.vcpus.into()));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemMib(self.mem_mib.into()));
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::Cmdline("is longer than 2047 bytes"));
        }
        if self.cmdline.contains('\0') {
            return Err(ConfigError::Cmdline("contains a NUL byte"));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        if let Some(gpu) = &self.gpu {
            gpu.validate()?;
        }
        if let Some(net) = &self.net {
            net.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate_values()?;
        }
        Ok(())
    }

    /// Checks value ranges and that every file can be opened the way the VM will open it:
    /// kernel and initrd readable regular files, disks readable (and writable unless
    /// read-only) regular files, the serial file's directory existing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_values()?;
        check_file("kernel", &self.kernel, false)?;
        if let Some(initrd) = &self.initrd {
            check_file("initrd", initrd, false)?;
        }
        for (i, disk) in self.disks.iter().enumerate() {
            check_file(&format!("disk {i}"), &disk.path, !disk.read_only)?;
        }
        if let SerialConfig::File(path) = &self.serial {
            let dir = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !dir.is_dir() {
                return Err(ConfigError::File {
                    what: "serial file".to_owned(),
                    path: path.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "directory does not exist",
                    ),
                });
            }
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        Ok(())
    }
}

impl VmConfig {
    /// The `genos-vmm` flags that describe exactly this configuration: parsing them with
    /// genos-vmm's CLI gives back an equal [`VmConfig`] (its tests check that). For
    /// launchers that must pass the VM's settings as flags, e.g. under `genos-jailer`,
    /// which rewrites the host paths in `--kernel`, `--initrd`, `--disk` and `--serial
    /// file:` and refuses `--config`. Fields at their default are left out.
    pub fn to_cli_args(&self) -> Vec<OsString> {
        fn flag(args: &mut Vec<OsString>, name: &str, value: impl Into<OsString>) {
            args.push(name.into());
            args.push(value.into());
        }
        let mut args = Vec::new();
        flag(&mut args, "--kernel", &self.kernel);
        if let Some(initrd) = &self.initrd {
            flag(&mut args, "--initrd", initrd);
        }
        flag(&mut args, "--cmdline", &self.cmdline);
        flag(&mut args, "--vcpus", self.vcpus.to_string());
        flag(&mut args, "--mem-mib", self.mem_mib.to_string());
        for disk in &self.disks {
            let mut value = disk.path.clone().into_os_string();
            if disk.read_only {
                value.push(":ro");
            }
            flag(&mut args, "--disk", value);
        }
        if self.rng {
            args.push("--rng".into());
        }
        flag(&mut args, "--cpu-template", self.cpu_template.to_string());
        flag(&mut args, "--serial", self.serial.to_string());
        if let Some(gpu) = &self.gpu {
            flag(&mut args, "--gpu", gpu.to_string());
        }
        if self.input {
            args.push("--input".into());
        }
        if let Some(net) = &self.net {
            flag(&mut args, "--net", net.to_string());
        }
        if let Some(vsock) = &self.vsock {
            flag(&mut args, "--vsock", vsock.to_string());
        }
        args
    }
}

/// Opens `path` as the VM will (read, or read-write) and checks it is a regular file.
fn check_file(what: &str, path: &Path, write: bool) -> Result<(), ConfigError> {
    let file_error = |source| ConfigError::File {
        what: what.to_owned(),
        path: path.display().to_string(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(file_error)?;
    let meta = file.metadata().map_err(file_error)?;
    if !meta.is_file() {
        return Err(ConfigError::NotAFile {
            what: what.to_owned(),
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// A partial configuration: every [`VmConfig`] field, each optional. Fields that are
/// present replace the base's; `disks` replaces the whole list. Used for `--config` files
/// (merged under the CLI flags) and `PATCH /vm/config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    /// See [`VmConfig::kernel`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// See [`VmConfig::initrd`]; `Some(None)` (JSON `null`) removes it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub initrd: Option<Option<PathBuf>>,
    /// See [`VmConfig::cmdline`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
    /// See [`VmConfig::vcpus`]. Wider than `u8` so that 300 reports "out of range".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u64>,
    /// See [`VmConfig::mem_mib`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// See [`VmConfig::disks`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskConfig>>,
    /// See [`VmConfig::rng`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rng: Option<bool>,
    /// See [`VmConfig::cpu_template`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// See [`VmConfig::serial`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// See [`VmConfig::gpu`]; `Some(None)` (JSON `null`) removes the display.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub gpu: Option<Option<DisplaySize>>,
    /// See [`VmConfig::input`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<bool>,
    /// See [`VmConfig::net`]; `Some(None)` (JSON `null`) removes the NIC.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub net: Option<Option<NetConfig>>,
    /// See [`VmConfig::vsock`]; `Some(None)` (JSON `null`) removes the device.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub vsock: Option<Option<VsockConfig>>,
}

/// Deserialises a field that is present (possibly `null`) as `Some(value)`; an absent
/// field stays `None` through `#[serde(default)]`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl ConfigPatch {
    /// Parses a patch from JSON; `origin` names the source in errors.
    pub fn from_json(json: &[u8], origin: &str) -> Result<Self, ConfigError> {
        serde_json::from_slice(json).map_err(|source| ConfigError::Json {
            origin: origin.to_owned(),
            source,
        })
    }

    /// Reads and parses a `--config` file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&bytes, &path.display().to_string())
    }

    /// Whether the patch sets nothing.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Overlays `other` on `self`: fields `other` sets win.
    pub fn merge(mut self, other: ConfigPatch) -> ConfigPatch {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        take!(
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_mib,
            disks,
            rng,
            cpu_template,
            serial,
            gpu,
            input,
            net,
            vsock
        );
        self
    }

    /// Applies the patch to `base` (or to the defaults when there is none) and checks the
    /// result's values (not its files: call [`VmConfig::validate`] for that).
    pub fn apply(self, base: Option<&VmConfig>) -> Result<VmConfig, ConfigError> {
        let mut config = match (base, &self.kernel) {
            (Some(base), _) => base.clone(),
            (None, Some(kernel)) => VmConfig::new(kernel.clone()),
            (None, None) => return Err(ConfigError::MissingKernel),
        };
        if let Some(v) = self.kernel {
            config.kernel = v;
        }
        if let Some(v) = self.initrd {
            config.initrd = v;
        }
        if let Some(v) = self.cmdline {
            config.cmdline = v;
        }
        if let Some(v) = self.vcpus {
            config.vcpus = u8::try_from(v).map_err(|_| ConfigError::Vcpus(v))?;
        }
        if let Some(v) = self.mem_mib {
            config.mem_mib = u32::try_from(v).map_err(|_| ConfigError::MemMib(v))?;
        }
        if let Some(v) = self.disks {
            config.disks = v;
        }
        if let Some(v) = self.rng {
            config.rng = v;
        }
        if let Some(v) = self.cpu_template {
            config.cpu_template = v;
        }
        if let Some(v) = self.serial {
            config.serial = v;
        }
        if let Some(v) = self.gpu {
            config.gpu = v;
        }
        if let Some(v) = self.input {
            config.input = v;
        }
        if let Some(v) = self.net {
            config.net = v;
        }
        if let Some(v) = self.vsock {
            config.vsock = v;
        }
        config.validate_values()?;
        Ok(config)
    }
}

/// Sets (or replaces) the vsock device of `base`; `PUT /vsock`.
pub fn put_vsock(base: &VmConfig, vsock: VsockConfig) -> Result<VmConfig, ConfigError> {
    let mut config = base.clone();
    config.vsock = Some(vsock);
    config.validate_values()?;
    Ok(config)
}

/// Sets disk `index` of `base` (replacing it, or appending when `index == len`) and
/// returns the new configuration; `PUT /vm/disks/{index}`.
pub fn put_disk(base: &VmConfig, index: usize, disk: DiskConfig) -> Result<VmConfig, ConfigError> {
    let mut config = base.clone();
    let len = config.disks.len();
    match index.cmp(&len) {
        std::cmp::Ordering::Less => config.disks[index] = disk,
        std::cmp::Ordering::Equal => config.disks.push(disk),
        std::cmp::Ordering::Greater => return Err(ConfigError::DiskIndex { index, len }),
    }
    config.validate_values()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::NamedTempFile;

    fn temp_file() -> NamedTempFile {
        NamedTempFile::new().unwrap()
    }

    #[test]
    fn minimal_json_gets_defaults() {
        let config = VmConfig::from_json(br#"{"kernel":"/k"}"#, "body").unwrap();
        assert_eq!(config, VmConfig::new("/k"));
        assert_eq!(config.cmdline, DEFAULT_CMDLINE);
        assert_eq!(config.vcpus, 1);
        assert_eq!(config.mem_mib, 128);
    }

    #[test]
    fn full_json_round_trips() {
        let json = r#"{"kernel":"/k","initrd":"/i","cmdline":"quiet","vcpus":4,"mem_mib":512,
            "disks":[{"path":"/d","read_only":true}],"rng":true,"cpu_template":"baseline",
            "serial":"file:/tmp/s.log","gpu":{"width":1280,"height":800},"input":true}"#;
        let config = VmConfig::from_json(json.as_bytes(), "body").unwrap();
        assert_eq!(config.serial, SerialConfig::File("/tmp/s.log".into()));
        assert_eq!(config.cpu_template, CpuTemplate::Baseline);
        assert_eq!(
            config.gpu,
            Some(DisplaySize {
                width: 1280,
                height: 800
            })
        );
        let again = serde_json::to_vec(&config).unwrap();
        assert_eq!(VmConfig::from_json(&again, "again").unwrap(), config);
    }

    fn facts(kvm_pvm: bool, kvm_intel: bool, kvm_amd: bool) -> KvmHostFacts {
        KvmHostFacts {
            dev_kvm: true,
            modules_visible: true,
            kvm_pvm,
            kvm_intel,
            kvm_amd,
        }
    }

    #[test]
    fn auto_is_the_default_and_parses_and_prints() {
        assert_eq!(VmConfig::new("/k").cpu_template, CpuTemplate::Auto);
        assert_eq!("auto".parse::<CpuTemplate>().unwrap(), CpuTemplate::Auto);
        assert_eq!(CpuTemplate::Auto.to_string(), "auto");
        let err = "fast".parse::<CpuTemplate>().unwrap_err().to_string();
        assert!(err.contains("auto, host or baseline"), "{err}");
    }

    #[test]
    fn auto_on_real_kvm_passes_the_host_cpu_through() {
        for f in [facts(false, true, false), facts(false, false, true)] {
            assert_eq!(f.kind(), KvmKind::Real);
            assert_eq!(CpuTemplate::Auto.resolve(&f), CpuTemplate::Host);
        }
    }

    #[test]
    fn auto_on_nested_kvm_pvm_is_baseline_even_beside_a_hardware_module() {
        for f in [facts(true, false, false), facts(true, true, false)] {
            assert_eq!(f.kind(), KvmKind::NestedPvm);
            assert_eq!(CpuTemplate::Auto.resolve(&f), CpuTemplate::Baseline);
        }
    }

    #[test]
    fn auto_where_the_kind_cannot_be_told_is_baseline() {
        let hidden = KvmHostFacts {
            modules_visible: false,
            ..facts(false, true, false)
        };
        assert_eq!(hidden.kind(), KvmKind::Unknown);
        assert_eq!(facts(false, false, false).kind(), KvmKind::Unknown);
        assert_eq!(KvmHostFacts::default().kind(), KvmKind::Missing);
        for f in [hidden, facts(false, false, false), KvmHostFacts::default()] {
            assert_eq!(CpuTemplate::Auto.resolve(&f), CpuTemplate::Baseline);
        }
    }

    #[test]
    fn explicit_templates_are_kept_on_every_host() {
        for f in [facts(true, false, false), facts(false, true, false)] {
            assert_eq!(CpuTemplate::Host.resolve(&f), CpuTemplate::Host);
            assert_eq!(CpuTemplate::Baseline.resolve(&f), CpuTemplate::Baseline);
        }
    }

    #[test]
    fn unknown_field_is_rejected_with_its_name() {
        let err = VmConfig::from_json(br#"{"kernel":"/k","vcpu":2}"#, "body").unwrap_err();
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
    }

    #[test]
    fn bad_serial_and_template_are_rejected() {
        let err = VmConfig::from_json(br#"{"kernel":"/k","serial":"tty"}"#, "b").unwrap_err();
        assert!(err.to_string().contains("serial must be"), "{err}");
        let err = VmConfig::from_json(br#"{"kernel":"/k","cpu_template":"x"}"#, "b").unwrap_err();
        assert!(err.to_string().contains("unknown variant"), "{err}");
        assert!("file:".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn value_ranges_are_enforced() {
        let mut config = VmConfig::new("/k");
        config.vcpus = 0;
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::Vcpus(0))
        ));
        config.vcpus = 33;
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::Vcpus(33))
        ));
        config.vcpus = 32;
        config.mem_mib = 8;
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::MemMib(8))
        ));
        config.mem_mib = 128;
        config.cmdline = "a".repeat(2048);
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::Cmdline(_))
        ));
        config.cmdline = "a\0b".into();
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::Cmdline(_))
        ));
        config.cmdline = String::new();
        config.gpu = Some(DisplaySize {
            width: 10,
            height: 10,
        });
        assert!(matches!(
            config.validate_values(),
            Err(ConfigError::DisplaySize(10, 10))
        ));
        config.gpu = None;
        assert!(config.validate_values().is_ok());
    }

    #[test]
    fn validate_checks_files() {
        let kernel = temp_file();
        let mut config = VmConfig::new(kernel.path());
        assert!(config.validate().is_ok());

        config.initrd = Some("/nonexistent/initrd".into());
        let err = config.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "initrd /nonexistent/initrd: No such file or directory (os error 2)"
        );
        config.initrd = None;

        config.disks.push(DiskConfig {
            path: "/".into(),
            read_only: true,
        });
        let err = config.validate().unwrap_err();
        assert_eq!(err.to_string(), "disk 0 /: not a regular file");
        config.disks.clear();

        config.serial = SerialConfig::File("/nonexistent/dir/log".into());
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("serial file"));
    }

    #[test]
    fn disk_cli_form_parses() {
        let disk: DiskConfig = "/a/b.img:ro".parse().unwrap();
        assert_eq!(
            disk,
            DiskConfig {
                path: "/a/b.img".into(),
                read_only: true
            }
        );
        let disk: DiskConfig = "b.img".parse().unwrap();
        assert!(!disk.read_only);
        assert!(":ro".parse::<DiskConfig>().is_err());
        assert!("".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn display_size_cli_form_parses_and_checks_limits() {
        assert_eq!(
            "1920x1080".parse::<DisplaySize>().unwrap(),
            DisplaySize {
                width: 1920,
                height: 1080
            }
        );
        for bad in [
            "1920",
            "x1080",
            "1920x",
            "-1x5",
            "+100x100",
            "1920x1080x1",
            "axb",
        ] {
            assert!(
                matches!(
                    bad.parse::<DisplaySize>(),
                    Err(ConfigError::DisplaySyntax(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            "99999x100".parse::<DisplaySize>(),
            Err(ConfigError::DisplaySize(..))
        ));
        assert!(matches!(
            "99999999999999x100".parse::<DisplaySize>(),
            Err(ConfigError::DisplaySyntax(_))
        ));
    }

    #[test]
    fn patch_merge_lets_later_fields_win() {
        let file = ConfigPatch {
            vcpus: Some(2),
            rng: Some(true),
            ..Default::default()
        };
        let flags = ConfigPatch {
            vcpus: Some(4),
            ..Default::default()
        };
        let merged = file.merge(flags);
        assert_eq!(merged.vcpus, Some(4));
        assert_eq!(merged.rng, Some(true));
    }

    #[test]
    fn patch_apply_needs_a_kernel_without_base() {
        let patch = ConfigPatch {
            vcpus: Some(2),
            ..Default::default()
        };
        assert!(matches!(patch.apply(None), Err(ConfigError::MissingKernel)));
    }

    #[test]
    fn patch_apply_changes_only_named_fields() {
        let base = VmConfig::new("/k");
        let patch = ConfigPatch::from_json(br#"{"mem_mib":256}"#, "body").unwrap();
        let config = patch.apply(Some(&base)).unwrap();
        assert_eq!(config.mem_mib, 256);
        assert_eq!(config.kernel, base.kernel);
    }

    #[test]
    fn patch_null_removes_optional_fields() {
        let mut base = VmConfig::new("/k");
        base.initrd = Some("/i".into());
        base.gpu = Some(DisplaySize {
            width: 800,
            height: 600,
        });
        let patch = ConfigPatch::from_json(br#"{"initrd":null,"gpu":null}"#, "body").unwrap();
        assert_eq!(patch.initrd, Some(None));
        let config = patch.apply(Some(&base)).unwrap();
        assert_eq!((config.initrd, config.gpu), (None, None));

        let absent = ConfigPatch::from_json(br#"{"vcpus":2}"#, "body").unwrap();
        let config = absent.apply(Some(&base)).unwrap();
        assert_eq!(config.initrd.as_deref(), Some(Path::new("/i")));
    }

    #[test]
    fn patch_apply_rejects_out_of_range_wide_values() {
        let base = VmConfig::new("/k");
        let patch = ConfigPatch {
            vcpus: Some(300),
            ..Default::default()
        };
        assert_eq!(
            patch.apply(Some(&base)).unwrap_err().to_string(),
            "vcpus must be between 1 and 32, got 300"
        );
    }

    #[test]
    fn put_disk_replaces_appends_and_rejects_gaps() {
        let base = VmConfig::new("/k");
        let disk = DiskConfig {
            path: "/d".into(),
            read_only: false,
        };
        let one = put_disk(&base, 0, disk.clone()).unwrap();
        assert_eq!(one.disks.len(), 1);
        let replaced = put_disk(
            &one,
            0,
            DiskConfig {
                read_only: true,
                ..disk.clone()
            },
        )
        .unwrap();
        assert!(replaced.disks[0].read_only);
        assert!(matches!(
            put_disk(&one, 5, disk),
            Err(ConfigError::DiskIndex { index: 5, len: 1 })
        ));
    }

    #[test]
    fn cli_args_leave_out_what_is_off_and_mark_read_only_disks() {
        let mut config = VmConfig::new("/k");
        let plain: Vec<String> = config
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        config.disks.push(DiskConfig {
            path: "/d.img".into(),
            read_only: true,
        });
        config.net = Some("tap0,mac=06:00:ac:10:00:09".parse().unwrap());
        let with_devices: Vec<String> = config
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();

        for off in ["--rng", "--input", "--gpu", "--net", "--initrd", "--disk"] {
            assert!(!plain.iter().any(|a| a == off), "{off} in {plain:?}");
        }
        assert!(plain.windows(2).any(|w| w == ["--kernel", "/k"]));
        assert!(with_devices
            .windows(2)
            .any(|w| w == ["--disk", "/d.img:ro"]));
        assert!(with_devices
            .windows(2)
            .any(|w| w == ["--net", "tap0,mac=06:00:ac:10:00:09"]));
    }

    #[test]
    fn vsock_parses_from_cid_and_socket_and_renders_back() {
        let vsock: VsockConfig = "3:/run/vm.vsock".parse().unwrap();

        assert_eq!(
            vsock,
            VsockConfig {
                guest_cid: 3,
                uds_path: "/run/vm.vsock".into()
            }
        );
        assert_eq!(vsock.to_string(), "3:/run/vm.vsock");
        let mut config = VmConfig::new("/k");
        config.vsock = Some(vsock);
        let args: Vec<String> = config
            .to_cli_args()
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(args.windows(2).any(|w| w == ["--vsock", "3:/run/vm.vsock"]));
    }

    #[test]
    fn vsock_refuses_reserved_cids_and_unusable_paths() {
        for (bad, expected) in [
            (
                "2:/run/v.sock",
                "vsock guest_cid must be between 3 and 4294967294, got 2",
            ),
            (
                "4294967295:/v",
                "vsock guest_cid must be between 3 and 4294967294, got 4294967295",
            ),
            ("3:", "vsock uds_path \"\": is empty"),
            (
                "x:/v",
                "vsock must look like CID:SOCKET (e.g. 3:/run/vm.vsock), got \"x:/v\"",
            ),
            (
                "/run/v.sock",
                "vsock must look like CID:SOCKET (e.g. 3:/run/vm.vsock), got \"/run/v.sock\"",
            ),
        ] {
            let err = bad.parse::<VsockConfig>().unwrap_err();
            assert_eq!(err.to_string(), expected, "{bad}");
        }
        let long = format!("3:/{}", "a".repeat(MAX_VSOCK_PATH_LEN));
        assert!(matches!(
            long.parse::<VsockConfig>(),
            Err(ConfigError::VsockPath {
                why: "is longer than 96 bytes",
                ..
            })
        ));
    }

    #[test]
    fn vsock_validate_checks_the_directory_and_what_is_in_the_way() {
        let file = temp_file();
        let in_the_way = VsockConfig {
            guest_cid: 3,
            uds_path: file.path().to_owned(),
        };
        let no_dir = VsockConfig {
            guest_cid: 3,
            uds_path: "/nonexistent-genos-dir/v.sock".into(),
        };
        let fine = VsockConfig {
            guest_cid: 3,
            uds_path: file.path().with_extension("vsock"),
        };

        assert!(matches!(
            in_the_way.validate(),
            Err(ConfigError::VsockPath {
                why: "exists and is not a socket",
                ..
            })
        ));
        assert!(matches!(
            no_dir.validate(),
            Err(ConfigError::VsockPath {
                why: "directory does not exist",
                ..
            })
        ));
        fine.validate().unwrap();
    }

    #[test]
    fn vsock_json_is_firecrackers_body_and_patches_can_remove_it() {
        let config = VmConfig::from_json(
            br#"{"kernel":"/k","vsock":{"guest_cid":7,"uds_path":"/run/v.sock"}}"#,
            "body",
        )
        .unwrap();
        let patch = ConfigPatch::from_json(br#"{"vsock":null}"#, "body").unwrap();

        assert_eq!(config.vsock.as_ref().unwrap().guest_cid, 7);
        assert_eq!(patch.apply(Some(&config)).unwrap().vsock, None);
        let put = put_vsock(
            &VmConfig::new("/k"),
            VsockConfig {
                guest_cid: 1,
                uds_path: "/v".into(),
            },
        );
        assert!(matches!(put, Err(ConfigError::VsockCid(1))));
    }

    #[test]
    fn net_devices_parse_from_tap_and_optional_mac() {
        let plain: NetConfig = "tap0".parse().unwrap();
        let with_mac: NetConfig = "tap0,mac=06:00:ac:10:00:09".parse().unwrap();

        assert_eq!(
            plain,
            NetConfig {
                tap: "tap0".into(),
                mac: None
            }
        );
        assert_eq!(with_mac.mac.unwrap().to_string(), "06:00:ac:10:00:09");
        for bad in [
            "",
            "tap0,mtu=9000",
            "tap0,mac=zz",
            "a-name-longer-than-15",
            "tap/0",
        ] {
            assert!(
                matches!(bad.parse::<NetConfig>(), Err(ConfigError::NetSyntax(_))),
                "{bad} accepted"
            );
        }
    }
}
