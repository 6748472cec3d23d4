//! Guest kernel: `vmlinux` built from Debian's `linux-source-6.1` with
//! `configs/guest-kernel.config` merged onto `make tinyconfig`.
//!
//! The artifact is keyed by the source package version and the config fragment. The
//! extracted source and the object tree persist under the cache's `work/` directory,
//! so even a cache miss after a config change rebuilds incrementally.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::cache::{Artifact, ArtifactKind, Cache, CacheError, InputHasher};
use crate::path_error::{io_err, PathIoError};
use crate::tools::{self, ToolError};

/// The fragment compiled into this binary.
pub const DEFAULT_CONFIG_FRAGMENT: &str = configs::GUEST_KERNEL_FRAGMENT;

/// Debian package providing the source tarball.
pub const SOURCE_PACKAGE: &str = "linux-source-6.1";
/// Where that package puts the tarball.
pub const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
const SOURCE_DIR_NAME: &str = "linux-source-6.1";
const RECIPE: &str = "genos-kernel-v1";

/// Errors from building the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("{SOURCE_TARBALL} is missing and installing {SOURCE_PACKAGE} needs root: run `apt-get install {SOURCE_PACKAGE}`")]
    SourceNotInstalled,
    #[error(transparent)]
    Io(#[from] PathIoError),
    #[error("the kernel configuration dropped required options (unmet dependencies?): {}", .0.join(", "))]
    ConfigDropped(Vec<String>),
}

/// What to build.
#[derive(Debug, Clone)]
pub struct KernelOptions {
    /// Config fragment merged onto tinyconfig.
    pub config_fragment: String,
    /// Parallel make jobs.
    pub jobs: usize,
    /// Source patches of a test-only flavour, built in work trees of their own so the
    /// shipped kernel's source and objects never see them (`None` for the shipped kernel).
    pub patched: Option<PatchedTree>,
}

/// A flavour's source patches (unified diffs applied with `patch -p1`) and the name its
/// source, config and object trees carry under the cache's `work/`.
#[derive(Debug, Clone, Copy)]
pub struct PatchedTree {
    pub name: &'static str,
    pub patches: &'static [(&'static str, &'static str)],
}

impl Default for KernelOptions {
    fn default() -> Self {
        KernelOptions {
            config_fragment: DEFAULT_CONFIG_FRAGMENT.to_string(),
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            patched: None,
        }
    }
}

/// A requirement stated by one line of a config fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRequirement {
    pub symbol: String,
    /// `None` means "is not set".
    pub value: Option<String>,
}

/// Parses the `CONFIG_X=v` and `# CONFIG_X is not set` lines of a fragment.
pub fn parse_fragment(fragment: &str) -> Vec<ConfigRequirement> {
    fragment
        .lines()
        .map(str::trim)
        .filter_map(|line| {
            if let Some(rest) = line.strip_prefix("# ") {
                let symbol = rest.strip_suffix(" is not set")?;
                symbol.starts_with("CONFIG_").then(|| ConfigRequirement {
                    symbol: symbol.to_string(),
                    value: None,
                })
            } else {
                let (symbol, value) = line.split_once('=')?;
                symbol.starts_with("CONFIG_").then(|| ConfigRequirement {
                    symbol: symbol.to_string(),
                    value: Some(value.to_string()),
                })
            }
        })
        .collect()
}

/// Requirements of `fragment` that the resolved `.config` text does not meet,
/// rendered as the fragment line that was lost.
pub fn missing_options(fragment: &str, dot_config: &str) -> Vec<String> {
    let resolved: std::collections::HashMap<&str, &str> = dot_config
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .collect();
    parse_fragment(fragment)
        .into_iter()
        .filter(
            |req| match (&req.value, resolved.get(req.symbol.as_str())) {
                (None, None) => false,
                (None, Some(_)) => true,
                (Some(want), Some(got)) => want != got,
                (Some(_), None) => true,
            },
        )
        .map(|req| match req.value {
            Some(v) => format!("{}={v}", req.symbol),
            None => format!("# {} is not set", req.symbol),
        })
        .collect()
}

/// Version of the installed source package, installing it first when missing.
pub fn source_version() -> Result<String, KernelError> {
    if !Path::new(SOURCE_TARBALL).is_file() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(KernelError::SourceNotInstalled);
        }
        eprintln!("genos-image: installing {SOURCE_PACKAGE}");
        let install = || {
            tools::run(
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args([
                        "install",
                        "-y",
                        "-q",
                        "--no-install-recommends",
                        SOURCE_PACKAGE,
                    ]),
            )
        };
        if install().is_err() {
            // Usually stale or missing package lists on a fresh machine.
            tools::run(Command::new("apt-get").args(["update", "-q"]))?;
            install()?;
        }
    }
    let version =
        tools::output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    Ok(version.trim().to_string())
}

/// The cache key of the kernel for `options` with source `version`.
pub fn input_hash(version: &str, options: &KernelOptions) -> String {
    let mut hasher = InputHasher::new(RECIPE);
    hasher
        .add("source-version", version.as_bytes())
        .add("config", options.config_fragment.as_bytes());
    for (name, diff) in options.patched.iter().flat_map(|t| t.patches) {
        hasher.add(name, diff.as_bytes());
    }
    hasher.finish()
}

/// Returns the cached kernel, building it first on a miss. The artifact is `vmlinux`;
/// `bzImage` and the resolved `config` sit beside it.
pub fn build(cache: &Cache, options: &KernelOptions) -> Result<Artifact, KernelError> {
    let version = source_version()?;
    let hash = input_hash(&version, options);
    if let Some(hit) = cache.lookup(ArtifactKind::Kernel, &hash)? {
        return Ok(hit);
    }
    tools::require(&[
        ("make", "make"),
        ("gcc", "gcc"),
        ("flex", "flex"),
        ("bison", "bison"),
        ("bc", "bc"),
        ("xz", "xz-utils"),
        ("tar", "tar"),
    ])?;
    if options.patched.is_some() {
        tools::require(&[("patch", "patch")])?;
    }
    // One object tree is shared by every kernel build, so builds are serialised.
    let suffix = options
        .patched
        .map_or(String::new(), |t| format!("-{}", t.name));
    let _lock = cache.lock(ArtifactKind::Kernel, &format!("tree{suffix}"))?;
    if let Some(hit) = cache.lookup(ArtifactKind::Kernel, &hash)? {
        return Ok(hit);
    }
    let started = Instant::now();
    let source = prepare_source(cache, &version, options.patched, &suffix)?;
    // The configuration is resolved in a scratch object tree and copied into the build
    // tree only when it differs, so an unchanged config never invalidates the objects.
    let confdir = cache.work_dir().join(format!("kconfig{suffix}"));
    let objdir = cache.work_dir().join(format!("kbuild{suffix}"));
    for dir in [&confdir, &objdir] {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    let make = |dir: &Path, args: &[&str]| -> Result<(), KernelError> {
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(&source)
            .arg(format!("O={}", dir.display()))
            .args(args);
        tools::run(&mut cmd)?;
        Ok(())
    };

    eprintln!("genos-image: configuring kernel {version}");
    make(&confdir, &["-s", "tinyconfig"])?;
    let fragment_path = confdir.join("genos.fragment");
    fs::write(&fragment_path, &options.config_fragment)
        .map_err(io_err("writing", &fragment_path))?;
    let conf_config = confdir.join(".config");
    tools::run(
        Command::new(source.join("scripts/kconfig/merge_config.sh"))
            .current_dir(&source)
            .arg("-m")
            .arg("-O")
            .arg(&confdir)
            .arg(&conf_config)
            .arg(&fragment_path),
    )?;
    make(&confdir, &["-s", "olddefconfig"])?;
    let resolved = fs::read_to_string(&conf_config).map_err(io_err("reading", &conf_config))?;
    let missing = missing_options(&options.config_fragment, &resolved);
    if !missing.is_empty() {
        return Err(KernelError::ConfigDropped(missing));
    }
    let dot_config = objdir.join(".config");
    if fs::read_to_string(&dot_config).ok().as_deref() != Some(resolved.as_str()) {
        fs::write(&dot_config, &resolved).map_err(io_err("writing", &dot_config))?;
    }

    eprintln!(
        "genos-image: building vmlinux with {} jobs (about 5 minutes on 2 cores)",
        options.jobs
    );
    make(
        &objdir,
        &[&format!("-j{}", options.jobs), "vmlinux", "bzImage"],
    )?;

    let staging = cache.stage(ArtifactKind::Kernel, &hash)?;
    for (from, to) in [
        ("vmlinux", "vmlinux"),
        ("arch/x86/boot/bzImage", "bzImage"),
        (".config", "config"),
    ] {
        let src = objdir.join(from);
        fs::copy(&src, staging.path().join(to)).map_err(io_err("copying", &src))?;
    }
    let inputs = serde_json::json!({
        "source_package": SOURCE_PACKAGE,
        "source_version": version,
        "config_fragment_sha256": crate::cache::sha256_hex(options.config_fragment.as_bytes()),
    });
    Ok(cache.publish(
        staging,
        ArtifactKind::Kernel,
        &hash,
        "vmlinux",
        started.elapsed(),
        inputs,
    )?)
}

/// Extracts the source tarball (and applies the flavour's patches) once per package version.
fn prepare_source(
    cache: &Cache,
    version: &str,
    patched: Option<PatchedTree>,
    suffix: &str,
) -> Result<PathBuf, KernelError> {
    let base = cache.work_dir().join(format!("kernel-src{suffix}"));
    let tree = base.join(SOURCE_DIR_NAME);
    let stamp = base.join(".version");
    // A changed patch re-extracts the tree, as a new source version does.
    let mut wanted = version.to_string();
    for (name, diff) in patched.iter().flat_map(|t| t.patches) {
        let sha = crate::cache::sha256_hex(diff.as_bytes());
        wanted.push_str(&format!("\n{name} {sha}"));
    }
    if fs::read_to_string(&stamp).is_ok_and(|v| v == wanted) && tree.is_dir() {
        return Ok(tree);
    }
    eprintln!("genos-image: extracting {SOURCE_TARBALL}");
    crate::cache::remove_tree(&base)?;
    let partial = cache.work_dir().join(format!("kernel-src{suffix}.partial"));
    crate::cache::remove_tree(&partial)?;
    fs::create_dir_all(&partial).map_err(io_err("creating", &partial))?;
    tools::run(
        Command::new("tar")
            .arg("-xf")
            .arg(SOURCE_TARBALL)
            .arg("-C")
            .arg(&partial),
    )?;
    for (name, diff) in patched.iter().flat_map(|t| t.patches) {
        let file = partial.join(name);
        fs::write(&file, diff).map_err(io_err("writing", &file))?;
        let tree = partial.join(SOURCE_DIR_NAME);
        tools::run(
            Command::new("patch")
                .arg("-p1")
                .arg("-d")
                .arg(&tree)
                .arg("-i")
                .arg(&file),
        )?;
    }
    fs::write(partial.join(".version"), &wanted).map_err(io_err("writing", &partial))?;
    fs::rename(&partial, &base).map_err(io_err("renaming into", &base))?;
    // The object tree belongs to the old source; start afresh.
    crate::cache::remove_tree(&cache.work_dir().join(format!("kbuild{suffix}")))?;
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_parser_reads_set_and_unset_options() {
        let reqs =
            parse_fragment("# comment\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=32\nnoise=1\n");
        assert_eq!(
            reqs,
            vec![
                ConfigRequirement {
                    symbol: "CONFIG_A".into(),
                    value: Some("y".into())
                },
                ConfigRequirement {
                    symbol: "CONFIG_B".into(),
                    value: None
                },
                ConfigRequirement {
                    symbol: "CONFIG_N".into(),
                    value: Some("32".into())
                },
            ]
        );
    }

    #[test]
    fn missing_options_reports_dropped_and_unwanted_symbols() {
        let fragment =
            "CONFIG_A=y\nCONFIG_B=y\n# CONFIG_MODULES is not set\n# CONFIG_C is not set\n";
        let dot_config =
            "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_MODULES=y\n# CONFIG_C is not set\n";
        assert_eq!(
            missing_options(fragment, dot_config),
            vec!["CONFIG_B=y", "# CONFIG_MODULES is not set"]
        );
    }

    #[test]
    fn default_fragment_requires_the_essentials() {
        let reqs = parse_fragment(DEFAULT_CONFIG_FRAGMENT);
        for symbol in [
            "CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES",
            "CONFIG_VIRTIO_BLK",
            "CONFIG_DRM_VIRTIO_GPU",
            "CONFIG_VIRTIO_INPUT",
            "CONFIG_PVH",
            "CONFIG_DEVMEM",
        ] {
            assert!(
                reqs.iter()
                    .any(|r| r.symbol == symbol && r.value.as_deref() == Some("y")),
                "{symbol}"
            );
        }
        assert!(reqs
            .iter()
            .any(|r| r.symbol == "CONFIG_MODULES" && r.value.is_none()));
    }

    #[test]
    fn input_hash_changes_with_config_and_version() {
        let options = KernelOptions {
            config_fragment: "CONFIG_A=y\n".into(),
            jobs: 1,
            patched: None,
        };
        let other = KernelOptions {
            config_fragment: "CONFIG_A=n\n".into(),
            jobs: 1,
            patched: None,
        };
        assert_ne!(input_hash("1", &options), input_hash("2", &options));
        assert_ne!(input_hash("1", &options), input_hash("1", &other));
        let more_jobs = KernelOptions {
            jobs: 8,
            ..options.clone()
        };
        assert_eq!(input_hash("1", &options), input_hash("1", &more_jobs));
    }
}
