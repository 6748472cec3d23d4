//! Test-only helpers shared by the workspace's test suites (a dev-dependency, never shipped).
//!
//! **Host requirements.** Some tests need what only some hosts have: `/dev/kvm`, root, the
//! guest kernel built by `genos-image`, a tool installed by `scripts/install-deps`. On a
//! developer's machine such a test skips, saying why. `GENOS_REQUIRE` turns those skips into
//! failures: a comma-separated list of [`Need`] names (`kvm,root,kernel,...`) or `all`.
//! `scripts/test` sets `GENOS_REQUIRE=all` when `CI` is set, so CI cannot pass by skipping.
//! Every skip site calls [`skip`]; nothing else reads the variable.
//!
//! **Fuzz seeds.** [`replay_seeds`] runs a fuzz target's body over its committed seed
//! corpus, so a plain `cargo test` checks every seed (including every crash ever found)
//! against the target's oracle.

pub mod x11;

use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The environment variable naming the needs that must be met.
pub const REQUIRE_VAR: &str = "GENOS_REQUIRE";

/// Something a test needs from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// A usable `/dev/kvm`.
    Kvm,
    /// Running as root (jails, namespaces, other users).
    Root,
    /// The guest kernel and initramfs (`GENOS_GUEST_KERNEL`, `GENOS_GUEST_INITRAMFS`, set by
    /// `scripts/test` after `genos-image kernel` and `genos-image initramfs`).
    Kernel,
    /// The VMM as shipped (`GENOS_VMM_SHIPPED`, set by `scripts/test` after `scripts/build-vmm`).
    Shipped,
    /// A host tool or package `scripts/install-deps` installs (qemu, busybox, cpio, ip, nft,
    /// debootstrap, e2fsprogs).
    Tools,
    /// `/dev/net/tun`.
    Tun,
    /// Workspace binaries a test runs (genos-vmm, genos-jailer), built by any workspace build.
    Bins,
}

impl Need {
    /// Every need, in the order `all` expands to.
    pub const ALL: [Need; 7] = [
        Need::Kvm,
        Need::Root,
        Need::Kernel,
        Need::Shipped,
        Need::Tools,
        Need::Tun,
        Need::Bins,
    ];

    /// The need's name in `GENOS_REQUIRE`.
    pub fn name(self) -> &'static str {
        match self {
            Need::Kvm => "kvm",
            Need::Root => "root",
            Need::Kernel => "kernel",
            Need::Shipped => "shipped",
            Need::Tools => "tools",
            Need::Tun => "tun",
            Need::Bins => "bins",
        }
    }
}

/// Why `GENOS_REQUIRE` could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequireError {
    /// A name that is not a [`Need`].
    #[error("{REQUIRE_VAR} names {0:?}; known: all, kvm, root, kernel, shipped, tools, tun, bins")]
    Unknown(String),
}

/// Whether the `GENOS_REQUIRE` value `spec` requires `need`.
pub fn requires(spec: &str, need: Need) -> Result<bool, RequireError> {
    let mut required = false;
    for name in spec.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if name == "all" || name == need.name() {
            required = true;
        } else if !Need::ALL.iter().any(|n| n.name() == name) {
            return Err(RequireError::Unknown(name.to_owned()));
        }
    }
    Ok(required)
}

/// What a test lacking a need does: skips, or fails because the need is required.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not required: the test returns early after printing this line.
    Skip(String),
    /// Required: the test fails with this message.
    Fail(String),
}

/// The verdict for a test that lacks `need` (because `why`) under the `GENOS_REQUIRE`
/// value `spec` (`None` when unset).
pub fn verdict(spec: Option<&str>, need: Need, why: &str) -> Verdict {
    match spec.map(|s| requires(s, need)) {
        None | Some(Ok(false)) => Verdict::Skip(format!("skipping: {why}")),
        Some(Ok(true)) => {
            Verdict::Fail(format!("{why} ({REQUIRE_VAR} requires {:?})", need.name()))
        }
        Some(Err(e)) => Verdict::Fail(e.to_string()),
    }
}

/// Call where a test finds `need` missing, then return from the test: prints
/// `skipping: {why}`, or panics with `why` when `GENOS_REQUIRE` requires `need` (or cannot
/// be read).
#[track_caller]
pub fn skip(need: Need, why: impl Display) {
    let spec = std::env::var(REQUIRE_VAR).ok();
    match verdict(spec.as_deref(), need, &why.to_string()) {
        Verdict::Skip(line) => eprintln!("{line}"),
        Verdict::Fail(message) => panic!("{message}"),
    }
}

/// Runs `target` over every file in `<crate_dir>/seeds/<name>/` (a fuzz target's committed
/// seed corpus) and returns how many ran. Panics naming the seed when the target does,
/// and when the corpus is missing or empty (a corpus that vanished must not pass).
#[track_caller]
pub fn replay_seeds(crate_dir: &str, name: &str, target: impl Fn(&[u8])) -> usize {
    let dir = Path::new(crate_dir).join("seeds").join(name);
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("read the seed directory").path())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "seed corpus {} is empty", dir.display());
    for seed in &seeds {
        let data = std::fs::read(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        // The panic hook has already printed the target's own message and location.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&data))).is_err() {
            panic!("fuzz target {name} failed on seed {}", seed.display());
        }
    }
    seeds.len()
}

/// Whether `/dev/kvm` can be opened; when not, skips `test` ([`skip`]), saying why.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(Need::Kvm, format!("{test}: /dev/kvm is not usable ({e})"));
            false
        }
    }
}

/// The static genos-agent for guests: `GENOS_AGENT_STATIC` when set, otherwise what
/// `scripts/build-agent` builds (or finds built) and prints.
pub fn static_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("GENOS_AGENT_STATIC") {
        return path.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-agent");
    let out = std::process::Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run scripts/build-agent");
    assert!(out.status.success(), "scripts/build-agent failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `dir`, emptied (whatever an earlier run left there is removed) and created.
pub fn fresh_dir(dir: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Waits until `path` exists (a socket a spawned process binds), failing the test after
/// `limit`.
pub fn wait_for_path(path: &Path, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_variable_skips_with_the_reason() {
        let v = verdict(None, Need::Kvm, "/dev/kvm is missing");

        assert_eq!(v, Verdict::Skip("skipping: /dev/kvm is missing".into()));
    }

    #[test]
    fn named_need_fails_and_others_still_skip() {
        let spec = Some("kvm, kernel");

        assert!(
            matches!(verdict(spec, Need::Kernel, "no kernel"), Verdict::Fail(m) if m.contains("no kernel"))
        );
        assert!(matches!(verdict(spec, Need::Kvm, "x"), Verdict::Fail(_)));
        assert!(matches!(verdict(spec, Need::Root, "x"), Verdict::Skip(_)));
    }

    #[test]
    fn all_requires_every_need() {
        for need in Need::ALL {
            assert_eq!(requires("all", need), Ok(true), "{need:?}");
        }
        assert_eq!(requires("", Need::Kvm), Ok(false));
    }

    #[test]
    fn unknown_name_fails_instead_of_skipping() {
        let v = verdict(Some("kvm,rooot"), Need::Kvm, "x");

        assert!(matches!(v, Verdict::Fail(m) if m.contains("\"rooot\"")));
    }

    #[test]
    fn replay_runs_every_seed_and_names_the_failing_one() {
        let dir = std::env::temp_dir().join(format!("testkit-seeds-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("seeds/t")).unwrap();
        std::fs::write(dir.join("seeds/t/a"), b"ok").unwrap();
        std::fs::write(dir.join("seeds/t/b"), b"boom").unwrap();
        let root = dir.to_str().unwrap();

        assert_eq!(replay_seeds(root, "t", |_| {}), 2);
        let failed = std::panic::catch_unwind(|| {
            replay_seeds(root, "t", |d| assert_ne!(d, b"boom"));
        });

        let message = *failed.unwrap_err().downcast::<String>().unwrap();
        assert!(message.ends_with("seeds/t/b"), "{message}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
