//! `genos doctor` and the checks behind `/v1/health`: what a host needs to run GenOS, each
//! check a pure function from gathered facts to a [`Finding`] (ok / warn / fail, what was
//! found, what to fix). Gathering is thin and kept apart ([`gather`] and the `read_*`
//! functions): files under /proc and /sys, `statvfs`, `adjtimex`, and the `nft` and
//! `timedatectl` commands. Works without hostd running.

use std::ffi::CString;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use vmm_api::config::{KvmHostFacts, KvmKind};

use crate::config::Config;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Self::Ok => "ok",
            Self::Warn => "warn",
            Self::Fail => "FAIL",
        })
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Short name of the check (`kvm`, `cgroup`, ...).
    pub check: &'static str,
    pub verdict: Verdict,
    /// What was found.
    pub found: String,
    /// What to do about it (empty when ok).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub fix: String,
}

impl Finding {
    fn ok(check: &'static str, found: impl Into<String>) -> Self {
        Self {
            check,
            verdict: Verdict::Ok,
            found: found.into(),
            fix: String::new(),
        }
    }
    fn warn(check: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            verdict: Verdict::Warn,
            found: found.into(),
            fix: fix.into(),
        }
    }
    fn fail(check: &'static str, found: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            verdict: Verdict::Fail,
            found: found.into(),
            fix: fix.into(),
        }
    }
}

/// The worst verdict of `findings` (ok for none).
pub fn worst(findings: &[Finding]) -> Verdict {
    findings
        .iter()
        .map(|f| f.verdict)
        .max()
        .unwrap_or(Verdict::Ok)
}

// ---------------------------------------------------------------------------------------
// Facts

/// `/dev/kvm` as a process sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmFacts {
    pub host: KvmHostFacts,
    /// Opening `/dev/kvm` read-write and `KVM_GET_API_VERSION`: the version, or why not.
    pub api: Result<i32, String>,
}

/// CPU flags from /proc/cpuinfo that matter here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFlags {
    pub vmx: bool,
    pub svm: bool,
    /// The host is itself a virtual machine.
    pub hypervisor: bool,
}

/// Which cgroup hierarchies are mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupFacts {
    /// Only the unified hierarchy.
    V2,
    /// Controllers on v1 hierarchies (perhaps beside an empty v2 one: hybrid).
    V1 { hybrid: bool },
    /// No cgroup file system.
    None,
}

/// A directory GenOS writes to, and the file system it is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirFacts {
    /// What it is for ("state", "image cache").
    pub role: &'static str,
    pub path: PathBuf,
    pub exists: bool,
    /// The directory (or, when it does not exist yet, its nearest existing ancestor) is
    /// writable by this process.
    pub writable: bool,
    /// Free bytes for this process on its file system (None: not measurable).
    pub free_bytes: Option<u64>,
}

/// The image cache's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheFacts {
    pub dir: DirFacts,
    /// Built artifacts found (entries of the cache's kind directories: `kernel/HASH`, ...).
    pub artifacts: usize,
    /// `[images] kernel` when the config names one (the cache is then not used for it),
    /// and whether that file exists.
    pub configured_kernel: Option<(PathBuf, bool)>,
}

/// Whether the system clock is synchronised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimeFacts {
    /// The kernel's view (`adjtimex`: STA_UNSYNC clear and not TIME_ERROR).
    pub kernel_synced: Option<bool>,
    /// `timedatectl show -p NTPSynchronized` and `-p NTP` when timedatectl answers.
    pub timedatectl: Option<(bool, bool)>,
}

/// The stream server's address and how viewers are meant to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamFacts {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// The public host name viewers use, when one is configured.
    pub public_host: Option<String>,
    /// What the public host name resolves to (or why it does not).
    pub resolved: Result<Vec<IpAddr>, String>,
    /// The resolved addresses that belong to this machine (a UDP socket binds to them).
    pub local: Vec<IpAddr>,
    /// Something (hostd's stream server, when it runs) holds the listen port.
    pub port_in_use: bool,
}

/// Everything `genos doctor` looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFacts {
    pub kvm: KvmFacts,
    pub cpu: CpuFlags,
    pub cgroup: CgroupFacts,
    /// `nft list tables` worked, or why not.
    pub nft: Result<(), String>,
    /// MemAvailable and MemTotal from /proc/meminfo, bytes.
    pub memory: Option<(u64, u64)>,
    pub state: DirFacts,
    pub cache: CacheFacts,
    pub time: TimeFacts,
    pub stream: StreamFacts,
}

// ---------------------------------------------------------------------------------------
// Checks: pure

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Free disk below which a directory is a failure: one root filesystem does not fit.
const DISK_FAIL_BYTES: u64 = 4 * GIB;
/// Free disk below which a directory is a warning: a few environments' root filesystems.
const DISK_WARN_BYTES: u64 = 20 * GIB;
/// Available memory below which the host cannot start a desktop (4 GiB default + VMM).
const MEM_FAIL_BYTES: u64 = 2 * GIB;
const MEM_WARN_BYTES: u64 = 5 * GIB;

/// KVM present, usable, and of which kind.
pub fn check_kvm(k: &KvmFacts) -> Finding {
    const C: &str = "kvm";
    let kind = k.host.kind();
    if kind == KvmKind::Missing {
        return Finding::fail(
            C,
            "no /dev/kvm",
            "enable VT-x/AMD-V in the firmware and load kvm_intel or kvm_amd (modprobe)",
        );
    }
    let api = match &k.api {
        Ok(v) if *v == 12 => format!("/dev/kvm opens read-write, API {v}"),
        Ok(v) => {
            return Finding::fail(
                C,
                format!("KVM API version {v}, not 12"),
                "run a Linux kernel whose KVM has API 12 (every kernel since 2.6.22)",
            )
        }
        Err(e) => {
            return Finding::fail(
                C,
                format!("{kind}, but /dev/kvm cannot be used: {e}"),
                "run as root or as a member of the kvm group (genos-hostd's unit runs as root)",
            )
        }
    };
    match kind {
        KvmKind::Real => Finding::ok(C, format!("{kind}, {api}")),
        KvmKind::NestedPvm => Finding::warn(
            C,
            format!("{kind}, {api}: guest kernels are interpreted and guest user space cannot make system calls"),
            "for development only; on a server use real KVM (cpu_template auto takes baseline here)",
        ),
        KvmKind::Unknown | KvmKind::Missing => Finding::warn(
            C,
            format!("{kind} (neither kvm_intel, kvm_amd nor kvm_pvm in /sys/module), {api}"),
            "check which module serves /dev/kvm; cpu_template auto takes baseline until it can tell",
        ),
    }
}

/// Hardware virtualisation in the CPU flags.
pub fn check_cpu_virt(cpu: &CpuFlags, kind: KvmKind) -> Finding {
    const C: &str = "cpu";
    match (cpu.vmx, cpu.svm) {
        (true, _) => Finding::ok(C, "vmx (Intel VT-x)"),
        (_, true) => Finding::ok(C, "svm (AMD-V)"),
        _ if kind == KvmKind::NestedPvm => Finding::warn(
            C,
            "no vmx or svm flag (expected under the nested kvm_pvm, which needs neither)",
            "on a server: enable VT-x/AMD-V in the firmware",
        ),
        _ => Finding::fail(
            C,
            format!(
                "no vmx or svm flag{}",
                if cpu.hypervisor {
                    " (this host is a VM without nested virtualisation)"
                } else {
                    ""
                }
            ),
            if cpu.hypervisor {
                "enable nested virtualisation for this VM, or run on bare metal"
            } else {
                "enable VT-x/AMD-V (\"virtualisation technology\", SVM) in the firmware setup"
            },
        ),
    }
}

/// cgroup v2 is what the appliance supports.
pub fn check_cgroup(c: CgroupFacts) -> Finding {
    const C: &str = "cgroup";
    const FIX: &str = "boot with systemd.unified_cgroup_hierarchy=1 (the default on Debian 12)";
    match c {
        CgroupFacts::V2 => Finding::ok(C, "cgroup v2 (unified)"),
        CgroupFacts::V1 { hybrid } => Finding::fail(
            C,
            format!(
                "cgroup v1{}: unsupported on the appliance (the jailer can limit VMMs there, but the unit's cgroup placement is made for v2)",
                if hybrid { " (hybrid: controllers on v1)" } else { "" }
            ),
            FIX,
        ),
        CgroupFacts::None => Finding::fail(C, "no cgroup file system mounted", FIX),
    }
}

/// nftables usable (the jailer's per-environment network rules).
pub fn check_nft(nft: &Result<(), String>) -> Finding {
    match nft {
        Ok(()) => Finding::ok("nftables", "nft lists the ruleset"),
        Err(e) => Finding::fail(
            "nftables",
            format!("nft does not work: {e}"),
            "apt-get install nftables; run as root (CAP_NET_ADMIN)",
        ),
    }
}

/// Free memory for guests.
pub fn check_memory(mem: Option<(u64, u64)>) -> Finding {
    const C: &str = "memory";
    let Some((avail, total)) = mem else {
        return Finding::warn(C, "MemAvailable not in /proc/meminfo", "");
    };
    let found = format!("{} MiB available of {} MiB", avail / MIB, total / MIB);
    if avail < MEM_FAIL_BYTES {
        Finding::fail(
            C,
            found,
            "free memory: a desktop guest takes 4 GiB by default",
        )
    } else if avail < MEM_WARN_BYTES {
        Finding::warn(
            C,
            found,
            "room for about one desktop guest; add memory for more",
        )
    } else {
        Finding::ok(C, found)
    }
}

/// A directory GenOS writes to: writable, and room on its file system.
pub fn check_dir(d: &DirFacts) -> Finding {
    let check = match d.role {
        "state" => "state dir",
        "store" => "store",
        _ => "cache dir",
    };
    let path = d.path.display();
    if !d.writable {
        return Finding::fail(
            check,
            format!(
                "{path} {} not writable",
                if d.exists { "is" } else { "cannot be created:" }
            ),
            format!("make {path} writable for genos-hostd's user (root under the unit; systemd-tmpfiles creates it)"),
        );
    }
    let state = if d.exists { "" } else { " (not created yet)" };
    match d.free_bytes {
        None => Finding::warn(check, format!("{path}{state}: free space unknown"), ""),
        Some(free) if free < DISK_FAIL_BYTES => Finding::fail(
            check,
            format!("{path}{state}: {} MiB free", free / MIB),
            "free disk: one root filesystem takes up to 16 GiB",
        ),
        Some(free) if free < DISK_WARN_BYTES => Finding::warn(
            check,
            format!("{path}{state}: {} GiB free", free / GIB),
            "room for few environments' root filesystems; add disk",
        ),
        Some(free) => Finding::ok(check, format!("{path}{state}: {} GiB free", free / GIB)),
    }
}

/// The image cache: used or not, warm or cold.
pub fn check_image_cache(c: &CacheFacts) -> Finding {
    const C: &str = "image cache";
    if let Some((kernel, exists)) = &c.configured_kernel {
        if !exists {
            return Finding::fail(
                C,
                format!("[images] kernel = {} does not exist", kernel.display()),
                "fix [images] kernel, or empty it to let genos-image build one",
            );
        }
    }
    let path = c.dir.path.display();
    if !c.dir.exists {
        return Finding::warn(
            C,
            format!(
                "{path} does not exist: the first environment builds the guest kernel (minutes)"
            ),
            "optional: warm it with `genos-image kernel` as the user hostd runs as",
        );
    }
    if c.artifacts == 0 {
        return Finding::warn(
            C,
            format!("{path} is empty: the first environment builds the guest kernel (minutes)"),
            "optional: warm it with `genos-image kernel`",
        );
    }
    Finding::ok(C, format!("{path}: {} built artifacts", c.artifacts))
}

/// The clock is synchronised (tokens expire, TLS, and guests take their clock from it).
pub fn check_time(t: &TimeFacts) -> Finding {
    const C: &str = "time sync";
    const FIX: &str = "enable NTP: timedatectl set-ntp true (systemd-timesyncd) or install chrony";
    match (t.timedatectl, t.kernel_synced) {
        (Some((true, _)), _) | (None, Some(true)) => {
            Finding::ok(C, "system clock synchronised (NTP)")
        }
        (Some((false, ntp)), kernel) => Finding::warn(
            C,
            format!(
                "timedatectl: not synchronised{}{}",
                if ntp {
                    " (NTP on, not synchronised yet)"
                } else {
                    ", NTP off"
                },
                match kernel {
                    Some(true) => "; the kernel says synchronised",
                    _ => "",
                }
            ),
            FIX,
        ),
        (None, Some(false)) => Finding::warn(C, "kernel clock not synchronised (adjtimex)", FIX),
        (None, None) => Finding::warn(C, "cannot tell (no timedatectl, adjtimex failed)", FIX),
    }
}

/// Whether viewers can reach the stream port through the public host name.
pub fn check_stream(s: &StreamFacts) -> Finding {
    const C: &str = "stream port";
    if !s.enabled {
        return Finding::ok(C, "stream server disabled ([stream] enabled = false)");
    }
    let port = s.listen.port();
    let Some(host) = &s.public_host else {
        return Finding::warn(
            C,
            format!(
                "no public host name configured: viewers get URLs naming the listen address {}",
                s.listen
            ),
            "set `[stream] public_host` in hostd.toml to the name viewers use (links name it), \
             or pass `genos doctor --public-host NAME` to check a name",
        );
    };
    if s.listen.ip().is_loopback() {
        return Finding::fail(
            C,
            format!(
                "[stream] listen = {}: nothing outside this machine reaches it",
                s.listen
            ),
            format!("set [stream] listen = \"0.0.0.0:{port}\" (and allow UDP {port} inbound)"),
        );
    }
    let resolved = match &s.resolved {
        Ok(a) if !a.is_empty() => a,
        Ok(_) => {
            return Finding::fail(
                C,
                format!("{host} resolves to no address"),
                "fix its DNS records",
            )
        }
        Err(e) => {
            return Finding::fail(
                C,
                format!("{host} does not resolve: {e}"),
                "fix its DNS records or /etc/hosts",
            )
        }
    };
    let list = resolved
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if !s.listen.ip().is_unspecified() && !resolved.contains(&s.listen.ip()) {
        return Finding::fail(
            C,
            format!(
                "{host} resolves to {list}, but the stream server listens on {} only",
                s.listen
            ),
            format!("set [stream] listen = \"0.0.0.0:{port}\" or to the address {host} names"),
        );
    }
    let serving = if s.port_in_use {
        format!("UDP {port} is bound (stream server up)")
    } else {
        format!("UDP {port} is free (hostd not running?)")
    };
    if s.local.is_empty() {
        return Finding::warn(
            C,
            format!("{host} resolves to {list}, not an address of this host; {serving}"),
            format!("behind NAT: forward UDP {port} from {list} to this host"),
        );
    }
    if s.port_in_use {
        Finding::ok(
            C,
            format!("{host} resolves to {list} on this host; {serving}"),
        )
    } else {
        Finding::warn(
            C,
            format!("{host} resolves to {list} on this host; {serving}"),
            "start genos-hostd (systemctl start genos-hostd)",
        )
    }
}

/// Every check over `facts`, in the order `genos doctor` prints them.
pub fn check_all(facts: &HostFacts) -> Vec<Finding> {
    vec![
        check_kvm(&facts.kvm),
        check_cpu_virt(&facts.cpu, facts.kvm.host.kind()),
        check_cgroup(facts.cgroup),
        check_nft(&facts.nft),
        check_memory(facts.memory),
        check_dir(&facts.state),
        check_dir(&facts.cache.dir),
        check_image_cache(&facts.cache),
        check_time(&facts.time),
        check_stream(&facts.stream),
    ]
}

/// What `/v1/health` looks at in a running hostd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthFacts {
    /// The state directory, probed by writing a file (the store's database lives there).
    pub store: DirFacts,
    /// The image cache, when hostd builds images (None: `[images]` names prebuilt ones).
    pub cache: Option<DirFacts>,
    /// The stream server's bound address (None: disabled, or not started).
    pub stream: Option<Result<SocketAddr, String>>,
    /// Whether streaming is enabled in the configuration.
    pub stream_enabled: bool,
    pub kvm: KvmFacts,
}

/// The checks of `/v1/health`: store writable, image cache usable, stream server accepting,
/// KVM usable. Unlike `genos doctor`, a nested kvm_pvm is fine here (hostd works on it).
pub fn health_checks(h: &HealthFacts) -> Vec<Finding> {
    let store = if h.store.writable {
        Finding {
            check: "store",
            ..check_dir(&h.store)
        }
    } else {
        Finding::fail(
            "store",
            format!(
                "{} is not writable: the store cannot record anything",
                h.store.path.display()
            ),
            "check the file system (read-only? full?) and the directory's owner",
        )
    };
    let cache = match &h.cache {
        None => Finding::ok("image cache", "not used ([images] names prebuilt images)"),
        Some(d) if d.exists && d.writable => {
            Finding::ok("image cache", format!("{} writable", d.path.display()))
        }
        Some(d) if d.writable => Finding::ok(
            "image cache",
            format!(
                "{} not created yet; the first build creates it",
                d.path.display()
            ),
        ),
        Some(d) => Finding::fail(
            "image cache",
            format!(
                "{} is not writable: no image can be built",
                d.path.display()
            ),
            "set GENOS_IMAGE_CACHE to a writable directory for genos-hostd",
        ),
    };
    let stream = match (&h.stream, h.stream_enabled) {
        (_, false) => Finding::ok("stream", "disabled ([stream] enabled = false)"),
        (None, true) => Finding::fail("stream", "enabled but not running", "see genos-hostd's log"),
        (Some(Ok(addr)), true) => Finding::ok("stream", format!("accepting on UDP {addr}")),
        (Some(Err(e)), true) => Finding::fail(
            "stream",
            format!("stream server socket is gone: {e}"),
            "restart genos-hostd",
        ),
    };
    let kvm = match (&h.kvm.api, h.kvm.host.kind()) {
        (Ok(12), kind) => Finding::ok("kvm", format!("{kind}, /dev/kvm usable (API 12)")),
        (Ok(v), _) => Finding::fail(
            "kvm",
            format!("KVM API {v}, not 12"),
            "run a kernel with KVM API 12",
        ),
        (Err(e), kind) => Finding::fail(
            "kvm",
            format!("{kind}: /dev/kvm cannot be used: {e}"),
            "load kvm_intel or kvm_amd; run genos-hostd as root",
        ),
    };
    vec![store, cache, stream, kvm]
}

/// `/v1/health`'s one-word status for `findings`.
pub fn health_status(findings: &[Finding]) -> &'static str {
    match worst(findings) {
        Verdict::Ok => "ok",
        Verdict::Warn => "degraded",
        Verdict::Fail => "failing",
    }
}

// ---------------------------------------------------------------------------------------
// Parsing: pure

/// The flags of the first processor in /proc/cpuinfo text.
pub fn parse_cpu_flags(cpuinfo: &str) -> CpuFlags {
    let flags = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f)
        .unwrap_or("");
    let has = |name: &str| flags.split_whitespace().any(|f| f == name);
    CpuFlags {
        vmx: has("vmx"),
        svm: has("svm"),
        hypervisor: has("hypervisor"),
    }
}

/// MemAvailable and MemTotal, bytes, from /proc/meminfo text.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemAvailable:")?, field("MemTotal:")?))
}

/// The cgroup layout from /proc/self/mountinfo text.
pub fn parse_cgroups(mountinfo: &str) -> CgroupFacts {
    let mounts = jailer::cgroup::Mounts::parse_mountinfo(mountinfo);
    let v1 = mounts.v1.iter().any(|(c, _)| !c.is_empty());
    match (v1, mounts.v2.is_some()) {
        (true, hybrid) => CgroupFacts::V1 { hybrid },
        (false, true) => CgroupFacts::V2,
        (false, false) => CgroupFacts::None,
    }
}

// ---------------------------------------------------------------------------------------
// Gathering: thin

/// Where genos-image keeps its cache for a process with this environment: `$GENOS_IMAGE_CACHE`,
/// else `~/.cache/genos/images` (hostd runs genos-image with its own environment).
pub fn image_cache_dir() -> Option<PathBuf> {
    match std::env::var_os("GENOS_IMAGE_CACHE") {
        Some(d) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/genos/images")),
    }
}

/// Opens `/dev/kvm` read-write and asks its API version.
pub fn read_kvm() -> KvmFacts {
    KvmFacts {
        host: KvmHostFacts::read(),
        api: kvm_api_version(),
    }
}

fn kvm_api_version() -> Result<i32, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| e.to_string())?;
    const KVM_GET_API_VERSION: libc::c_ulong = 0xae00;
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns a number; the fd is a
    // live /dev/kvm descriptor owned by `f`.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    if v < 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(v)
}

/// A directory's facts; `probe` also writes and removes a file in it (health), instead of
/// asking `access(W_OK)` only.
pub fn read_dir(role: &'static str, path: &Path, probe: bool) -> DirFacts {
    let exists = path.is_dir();
    // The nearest thing that exists: a directory the missing part can be made in, or a
    // file in the way (then nothing can be made).
    let nearest = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let writable = if exists && probe {
        let f = path.join(format!(".genos-health-{}", std::process::id()));
        let ok = std::fs::write(&f, b"ok").is_ok();
        let _ = std::fs::remove_file(&f);
        ok
    } else {
        nearest.is_dir() && access_w(nearest)
    };
    DirFacts {
        role,
        path: path.to_owned(),
        exists,
        writable,
        free_bytes: free_bytes(nearest),
    }
}

fn access_w(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

fn free_bytes(path: &Path) -> Option<u64> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs is plain data; all-zero is valid and the call overwrites it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a live, writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail.saturating_mul(st.f_frsize))
}

fn count_artifacts(cache: &Path) -> usize {
    let Ok(kinds) = std::fs::read_dir(cache) else {
        return 0;
    };
    kinds
        .flatten()
        .filter(|k| {
            let name = k.file_name();
            k.path().is_dir() && !matches!(name.to_str(), Some("tmp" | "work" | "locks"))
        })
        .map(|k| {
            std::fs::read_dir(k.path())
                .map(|d| d.flatten().count())
                .unwrap_or(0)
        })
        .sum()
}

fn read_time() -> TimeFacts {
    // SAFETY: timex is plain data; modes = 0 makes adjtimex read only.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    // SAFETY: `tx` is a live, writable timex with modes 0 (no change is requested).
    let state = unsafe { libc::adjtimex(&mut tx) };
    let kernel_synced =
        (state >= 0).then_some(state != libc::TIME_ERROR && tx.status & libc::STA_UNSYNC == 0);
    let prop = |p: &str| {
        Command::new("timedatectl")
            .args(["show", "-p", p, "--value"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "yes")
    };
    let timedatectl = prop("NTPSynchronized").map(|s| (s, prop("NTP").unwrap_or(false)));
    TimeFacts {
        kernel_synced,
        timedatectl,
    }
}

fn read_nft() -> Result<(), String> {
    let out = Command::new("nft")
        .args(["list", "tables"])
        .output()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Resolves `public_host` and sees which of its addresses are this machine's.
pub fn read_stream(enabled: bool, listen: SocketAddr, public_host: Option<&str>) -> StreamFacts {
    let resolved = match public_host {
        None => Ok(Vec::new()),
        Some(h) => (h, listen.port())
            .to_socket_addrs()
            .map(|a| {
                let mut v: Vec<IpAddr> = a.map(|a| a.ip()).collect();
                v.dedup();
                v
            })
            .map_err(|e| e.to_string()),
    };
    let local = resolved
        .as_ref()
        .map(|a| {
            a.iter()
                .copied()
                .filter(|ip| UdpSocket::bind((*ip, 0)).is_ok())
                .collect()
        })
        .unwrap_or_default();
    let port_in_use = enabled
        && listen.port() != 0
        && matches!(UdpSocket::bind(listen), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse);
    StreamFacts {
        enabled,
        listen,
        public_host: public_host.map(str::to_owned),
        resolved,
        local,
        port_in_use,
    }
}

/// Where `genos doctor` looks.
pub struct DoctorInputs<'a> {
    pub config: &'a Config,
    pub state_dir: &'a Path,
    pub cache_dir: &'a Path,
    pub public_host: Option<&'a str>,
}

/// Gathers every fact `genos doctor` checks.
pub fn gather(i: &DoctorInputs<'_>) -> HostFacts {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let configured_kernel = (!i.config.images.kernel.is_empty()).then(|| {
        let k = PathBuf::from(&i.config.images.kernel);
        let exists = k.is_file();
        (k, exists)
    });
    HostFacts {
        kvm: read_kvm(),
        cpu: parse_cpu_flags(&read("/proc/cpuinfo")),
        cgroup: parse_cgroups(&read("/proc/self/mountinfo")),
        nft: read_nft(),
        memory: parse_meminfo(&read("/proc/meminfo")),
        state: read_dir("state", i.state_dir, false),
        cache: CacheFacts {
            dir: read_dir("image cache", i.cache_dir, false),
            artifacts: count_artifacts(i.cache_dir),
            configured_kernel,
        },
        time: read_time(),
        stream: read_stream(
            i.config.stream.enabled,
            i.config.stream.listen,
            public_host(i),
        ),
    }
}

/// The host name viewers use: `--public-host` when given, else the configuration's
/// `[stream] public_host` (what hostd puts in links).
pub fn public_host<'a>(i: &DoctorInputs<'a>) -> Option<&'a str> {
    i.public_host.or(i.config.stream.public_host.as_deref())
}

/// The findings as `genos doctor` prints them: one line each, the fix indented below.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!("{:<4}  {:<11}  {}\n", f.verdict, f.check, f.found));
        if !f.fix.is_empty() {
            out.push_str(&format!("{:<4}  {:<11}  fix: {}\n", "", "", f.fix));
        }
    }
    let fails = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Fail)
        .count();
    let warns = findings
        .iter()
        .filter(|f| f.verdict == Verdict::Warn)
        .count();
    out.push_str(&format!(
        "{} checks: {} ok, {warns} warnings, {fails} failed\n",
        findings.len(),
        findings.len() - fails - warns
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kvm(kvm_pvm: bool, intel: bool, api: Result<i32, String>) -> KvmFacts {
        KvmFacts {
            host: KvmHostFacts {
                dev_kvm: true,
                modules_visible: true,
                kvm_pvm,
                kvm_intel: intel,
                kvm_amd: false,
            },
            api,
        }
    }

    fn dir(exists: bool, writable: bool, free_gib: u64) -> DirFacts {
        DirFacts {
            role: "state",
            path: "/var/lib/genos".into(),
            exists,
            writable,
            free_bytes: Some(free_gib * GIB),
        }
    }

    fn stream(listen: &str, host: Option<&str>, resolved: &[&str], local: &[&str]) -> StreamFacts {
        let ips = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().unwrap())
                .collect::<Vec<IpAddr>>()
        };
        StreamFacts {
            enabled: true,
            listen: listen.parse().unwrap(),
            public_host: host.map(str::to_owned),
            resolved: Ok(ips(resolved)),
            local: ips(local),
            port_in_use: true,
        }
    }

    #[test]
    fn real_kvm_that_opens_is_ok() {
        let f = check_kvm(&kvm(false, true, Ok(12)));
        assert_eq!(f.verdict, Verdict::Ok);
        assert!(f.found.starts_with("real KVM"), "{}", f.found);
    }

    #[test]
    fn nested_kvm_pvm_is_a_warning_that_says_development_only() {
        let f = check_kvm(&kvm(true, false, Ok(12)));
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(f.found.contains("nested kvm_pvm"), "{}", f.found);
        assert!(f.fix.contains("development only"), "{}", f.fix);
    }

    #[test]
    fn missing_or_unopenable_kvm_fails_with_a_fix() {
        let missing = check_kvm(&KvmFacts {
            host: KvmHostFacts::default(),
            api: Err("No such file or directory".into()),
        });
        let denied = check_kvm(&kvm(false, true, Err("Permission denied".into())));
        assert_eq!(missing.verdict, Verdict::Fail);
        assert!(missing.fix.contains("VT-x"), "{}", missing.fix);
        assert_eq!(denied.verdict, Verdict::Fail);
        assert!(denied.found.contains("Permission denied"));
        assert!(denied.fix.contains("kvm group"));
    }

    #[test]
    fn cpu_without_virtualisation_fails_except_under_kvm_pvm() {
        let none = CpuFlags::default();
        assert_eq!(check_cpu_virt(&none, KvmKind::Real).verdict, Verdict::Fail);
        assert_eq!(
            check_cpu_virt(&none, KvmKind::NestedPvm).verdict,
            Verdict::Warn
        );
        let vm = CpuFlags {
            hypervisor: true,
            ..none
        };
        assert!(check_cpu_virt(&vm, KvmKind::Missing).fix.contains("nested"));
        let intel = CpuFlags { vmx: true, ..none };
        assert_eq!(check_cpu_virt(&intel, KvmKind::Real).verdict, Verdict::Ok);
    }

    #[test]
    fn cpu_flags_are_read_from_the_flags_line() {
        let text = "processor\t: 0\nflags\t\t: fpu vme svm hypervisor sse2\nbugs\t: vmx\n";
        let f = parse_cpu_flags(text);
        assert_eq!(
            f,
            CpuFlags {
                vmx: false,
                svm: true,
                hypervisor: true
            }
        );
    }

    #[test]
    fn cgroup_v1_is_unsupported_and_v2_is_ok() {
        let v1 = "25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                  27 25 0:25 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let v2 = "35 1 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        let f = check_cgroup(parse_cgroups(v1));
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.found.contains("unsupported"), "{}", f.found);
        assert_eq!(check_cgroup(parse_cgroups(v2)).verdict, Verdict::Ok);
        assert_eq!(parse_cgroups(""), CgroupFacts::None);
    }

    #[test]
    fn nft_that_fails_names_the_package() {
        let f = check_nft(&Err("cannot run nft: No such file or directory".into()));
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.fix.contains("nftables"));
        assert_eq!(check_nft(&Ok(())).verdict, Verdict::Ok);
    }

    #[test]
    fn memory_thresholds() {
        let text = "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   1048576 kB\n";
        let mem = parse_meminfo(text);
        assert_eq!(mem, Some((GIB, 24_000_000 * 1024)));
        assert_eq!(check_memory(mem).verdict, Verdict::Fail);
        assert_eq!(
            check_memory(Some((4 * GIB, 8 * GIB))).verdict,
            Verdict::Warn
        );
        assert_eq!(
            check_memory(Some((16 * GIB, 24 * GIB))).verdict,
            Verdict::Ok
        );
    }

    #[test]
    fn directories_must_be_writable_and_roomy() {
        assert_eq!(check_dir(&dir(true, true, 100)).verdict, Verdict::Ok);
        assert_eq!(check_dir(&dir(false, true, 100)).verdict, Verdict::Ok);
        assert_eq!(check_dir(&dir(true, true, 10)).verdict, Verdict::Warn);
        assert_eq!(check_dir(&dir(true, true, 1)).verdict, Verdict::Fail);
        let ro = check_dir(&dir(true, false, 100));
        assert_eq!(ro.verdict, Verdict::Fail);
        assert!(
            ro.found.contains("/var/lib/genos is not writable"),
            "{}",
            ro.found
        );
    }

    #[test]
    fn image_cache_cold_is_a_warning_and_a_missing_configured_kernel_fails() {
        let cache = |exists, artifacts, kernel: Option<(PathBuf, bool)>| CacheFacts {
            dir: dir(exists, true, 100),
            artifacts,
            configured_kernel: kernel,
        };
        assert_eq!(
            check_image_cache(&cache(true, 3, None)).verdict,
            Verdict::Ok
        );
        assert_eq!(
            check_image_cache(&cache(true, 0, None)).verdict,
            Verdict::Warn
        );
        assert_eq!(
            check_image_cache(&cache(false, 0, None)).verdict,
            Verdict::Warn
        );
        let gone = check_image_cache(&cache(true, 3, Some(("/k".into(), false))));
        assert_eq!(gone.verdict, Verdict::Fail);
        assert!(gone.found.contains("/k"));
    }

    #[test]
    fn time_sync_prefers_timedatectl_and_falls_back_to_the_kernel() {
        let t = |timedatectl, kernel_synced| TimeFacts {
            kernel_synced,
            timedatectl,
        };
        assert_eq!(
            check_time(&t(Some((true, true)), Some(false))).verdict,
            Verdict::Ok
        );
        assert_eq!(check_time(&t(None, Some(true))).verdict, Verdict::Ok);
        let off = check_time(&t(Some((false, false)), None));
        assert_eq!(off.verdict, Verdict::Warn);
        assert!(off.found.contains("NTP off") && off.fix.contains("set-ntp"));
        assert_eq!(check_time(&t(None, Some(false))).verdict, Verdict::Warn);
    }

    #[test]
    fn the_public_host_is_the_flag_else_the_configured_one() {
        let unset = Config::embedded();
        let mut set = Config::embedded();
        set.stream.public_host = Some("genos.example".into());
        let inputs = |config, flag| DoctorInputs {
            config,
            state_dir: Path::new("/s"),
            cache_dir: Path::new("/c"),
            public_host: flag,
        };

        assert_eq!(public_host(&inputs(&unset, None)), None);
        assert_eq!(public_host(&inputs(&set, None)), Some("genos.example"));
        assert_eq!(
            public_host(&inputs(&set, Some("other.example"))),
            Some("other.example")
        );
    }

    #[test]
    fn an_unset_public_host_is_said_so() {
        let f = check_stream(&stream("0.0.0.0:4433", None, &[], &[]));
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(
            f.found.contains("no public host name configured"),
            "{}",
            f.found
        );
    }

    #[test]
    fn a_public_host_with_a_loopback_listener_fails() {
        let f = check_stream(&stream(
            "127.0.0.1:4433",
            Some("genos.example"),
            &["192.0.2.7"],
            &[],
        ));
        assert_eq!(f.verdict, Verdict::Fail);
        assert!(f.fix.contains("0.0.0.0:4433"), "{}", f.fix);
    }

    #[test]
    fn a_public_host_on_this_machine_with_the_port_bound_is_ok() {
        let f = check_stream(&stream(
            "0.0.0.0:4433",
            Some("genos.example"),
            &["192.0.2.7"],
            &["192.0.2.7"],
        ));
        assert_eq!(f.verdict, Verdict::Ok, "{f:?}");
        assert!(f.fix.is_empty());
    }

    #[test]
    fn a_public_host_elsewhere_asks_for_port_forwarding() {
        let f = check_stream(&stream(
            "0.0.0.0:4433",
            Some("genos.example"),
            &["198.51.100.1"],
            &[],
        ));
        assert_eq!(f.verdict, Verdict::Warn);
        assert!(f.fix.contains("forward UDP 4433"), "{}", f.fix);
    }

    #[test]
    fn a_listener_on_another_address_than_the_public_host_fails() {
        let f = check_stream(&stream(
            "192.0.2.8:4433",
            Some("genos.example"),
            &["192.0.2.7"],
            &["192.0.2.7"],
        ));
        assert_eq!(f.verdict, Verdict::Fail);
        let unresolved = StreamFacts {
            resolved: Err("failed to lookup address information".into()),
            ..stream("0.0.0.0:4433", Some("nowhere.invalid"), &[], &[])
        };
        assert_eq!(check_stream(&unresolved).verdict, Verdict::Fail);
    }

    #[test]
    fn render_prints_fixes_and_a_summary_and_worst_picks_fail() {
        let findings = vec![
            Finding::ok("kvm", "real KVM"),
            Finding::fail("cgroup", "cgroup v1", "boot with v2"),
        ];
        let text = render(&findings);
        assert!(text.contains("FAIL  cgroup       cgroup v1\n"), "{text}");
        assert!(text.contains("fix: boot with v2"), "{text}");
        assert!(
            text.ends_with("2 checks: 1 ok, 0 warnings, 1 failed\n"),
            "{text}"
        );
        assert_eq!(worst(&findings), Verdict::Fail);
        assert_eq!(worst(&findings[..1]), Verdict::Ok);
    }

    fn healthy() -> HealthFacts {
        HealthFacts {
            store: dir(true, true, 100),
            cache: Some(dir(true, true, 100)),
            stream: Some(Ok("127.0.0.1:4433".parse().unwrap())),
            stream_enabled: true,
            kvm: kvm(true, false, Ok(12)),
        }
    }

    #[test]
    fn a_healthy_hostd_on_nested_kvm_is_ok() {
        let checks = health_checks(&healthy());
        let names: Vec<_> = checks.iter().map(|f| f.check).collect();
        assert_eq!(names, ["store", "image cache", "stream", "kvm"]);
        assert_eq!(health_status(&checks), "ok", "{checks:?}");
    }

    #[test]
    fn each_broken_part_makes_health_failing_and_is_named() {
        let broken = [
            HealthFacts {
                store: dir(true, false, 100),
                ..healthy()
            },
            HealthFacts {
                cache: Some(dir(false, false, 100)),
                ..healthy()
            },
            HealthFacts {
                stream: None,
                ..healthy()
            },
            HealthFacts {
                kvm: kvm(false, true, Err("Permission denied".into())),
                ..healthy()
            },
        ];
        for (h, name) in broken.iter().zip(["store", "image cache", "stream", "kvm"]) {
            let checks = health_checks(h);
            assert_eq!(health_status(&checks), "failing", "{name}");
            let failed: Vec<_> = checks
                .iter()
                .filter(|f| f.verdict == Verdict::Fail)
                .map(|f| f.check)
                .collect();
            assert_eq!(failed, [name]);
        }
    }

    #[test]
    fn an_unused_cache_and_a_disabled_stream_are_fine() {
        let h = HealthFacts {
            cache: None,
            stream: None,
            stream_enabled: false,
            ..healthy()
        };
        assert_eq!(health_status(&health_checks(&h)), "ok");
    }

    #[test]
    fn read_dir_probes_a_real_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let d = read_dir("state", tmp.path(), true);
        let absent = read_dir("state", &tmp.path().join("a/b"), true);
        assert!(d.exists && d.writable && d.free_bytes.is_some());
        assert!(
            !absent.exists && absent.writable,
            "its ancestor is writable"
        );
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "probe removed"
        );
    }
}
