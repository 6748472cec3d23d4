//! Root filesystems for environment specs, built by executing a [`Plan`]: the base layer
//! from the distribution's own tool (debootstrap for Debian and Ubuntu, dnf for Fedora,
//! apk for Alpine), the catalog's packages for the spec on top, a user with autologin into
//! the chosen session, written as an ext4 image with `mkfs.ext4 -d` (no loop mounts).
//!
//! Two cached layers: the *base* (a tarball per builder, release and mirror, shared by
//! every spec with that base) and the *rootfs* image per spec. A spec that only adds an
//! app therefore skips the base build and pays only for its extra packages.
//! Before anything downloads, every archive the build needs is probed with short timeouts
//! ([`crate::probe`]), so an unreachable mirror fails the build within seconds, saying so.
//! Commands inside the tree run under `unshare --mount --pid` + `chroot`, so the
//! `/proc` they need disappears with them and nothing stays mounted after a failure.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::spec::{Catalog, Spec, SpecError};

use crate::apk_bootstrap::{self, ApkBootstrapError};
use crate::cache::{sha256_hex, Artifact, ArtifactKind, Cache, CacheError, Cached, InputHasher};
use crate::path_error::PathIoError;
use crate::plan::{self, BasePlan, Plan, PlanError, PlanOptions, Prepared};
use crate::probe::{self, ProbeError};
use crate::tools::{self, ToolError};

pub use crate::plan::{DEFAULT_HOSTNAME, DEFAULT_USER};

/// Environment variable overriding the mirror of Debian-family bases (`debian-12`) when no
/// `--mirror` is given.
pub const MIRROR_ENV: &str = "GENOS_DEBIAN_MIRROR";
/// File names of the two layers' artifacts.
pub const BASE_ARTIFACT: &str = "base.tar";
pub const ROOTFS_ARTIFACT: &str = "rootfs.ext4";
/// Label of the ext4 file system.
pub const FS_LABEL: &str = "genos-root";

const BASE_RECIPE: &str = "genos-base-v1";
/// Bump when the executor changes what goes into an image beyond what the plan hashes.
const ROOTFS_RECIPE: &str = "genos-rootfs-v3";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Free space a base build needs in the cache (the tree plus its tarball).
const BASE_SPACE_NEEDED: u64 = 2 * GIB;

/// Errors from building a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error("{error}{}", suggestion_text(.suggestions))]
    Spec {
        #[source]
        error: SpecError,
        suggestions: Vec<String>,
    },
    #[error(transparent)]
    Plan(PlanError),
    #[error(
        "building a root filesystem needs root (the base builders create device nodes and run chroot)"
    )]
    NotRoot,
    #[error("the archive of {base} is not usable, so nothing was built: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: ProbeError,
    },
    #[error("required tool {names} not found in PATH ({hint})")]
    MissingTool { names: String, hint: String },
    #[error("apk.static is not on PATH and could not be obtained from the Alpine mirror {mirror}: {source} (install apk.static from Alpine's apk-tools-static package, or use a reachable mirror)")]
    ApkStatic {
        mirror: String,
        #[source]
        source: ApkBootstrapError,
    },
    #[error("the archive keys of {base} are missing: {path} does not exist (install the Debian package `{package}`, or give the keys with --keyring)")]
    NoKeyring {
        base: String,
        path: PathBuf,
        package: String,
    },
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("not enough disk space in {dir}: {needed_mib} MiB needed, {free_mib} MiB free")]
    NoSpace {
        dir: PathBuf,
        needed_mib: u64,
        free_mib: u64,
    },
    #[error(transparent)]
    Io(#[from] PathIoError),
}

fn suggestion_text(suggestions: &[String]) -> String {
    if suggestions.is_empty() {
        String::new()
    } else {
        format!(" (did you mean {}?)", suggestions.join(" or "))
    }
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> RootfsError + 'a {
    move |source| {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            let free = tools::free_bytes(path.parent().unwrap_or(path)).unwrap_or(0);
            RootfsError::NoSpace {
                dir: path.to_path_buf(),
                needed_mib: 0,
                free_mib: free / MIB,
            }
        } else {
            RootfsError::Io(PathIoError::new(action, path, source))
        }
    }
}

/// Build settings that are not part of the spec.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    pub catalog: Catalog,
    /// The spec's base's archive instead of the catalog's (an operator's mirror).
    pub mirror: Option<String>,
    /// The base's archive keys instead of the catalog's.
    pub keyring: Option<PathBuf>,
    pub user: String,
    /// `genos-agent` binary to install with a service.
    pub agent: Option<PathBuf>,
    /// Time each step of the archive probe may take.
    pub probe_timeout: Duration,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            catalog: Catalog::embedded(),
            mirror: None,
            keyring: None,
            user: DEFAULT_USER.into(),
            agent: None,
            probe_timeout: probe::DEFAULT_TIMEOUT,
        }
    }
}

/// Catalog names (keys and synonyms) close to `wanted`, best first.
pub fn suggest<'a>(
    wanted: &str,
    names: impl Iterator<Item = (&'a String, &'a [String])>,
) -> Vec<String> {
    let wanted = wanted.to_lowercase();
    let mut scored: Vec<(usize, String)> = Vec::new();
    for (key, synonyms) in names {
        let best = std::iter::once(key)
            .chain(synonyms)
            .map(|candidate| strsim::levenshtein(&wanted, &candidate.to_lowercase()))
            .min()
            .unwrap_or(usize::MAX);
        if best <= (wanted.len() / 3).max(2) {
            scored.push((best, key.clone()));
        }
    }
    scored.sort();
    scored.into_iter().take(3).map(|(_, key)| key).collect()
}

/// Checks `spec` against the catalog, turning unknown names into errors with suggestions.
pub fn check_spec(spec: &Spec, catalog: &Catalog) -> Result<(), RootfsError> {
    let error = match catalog.check_spec(spec) {
        Ok(()) => return Ok(()),
        Err(error) => error,
    };
    Err(spec_error(error, catalog))
}

fn spec_error(error: SpecError, catalog: &Catalog) -> RootfsError {
    let suggestions = match &error {
        SpecError::UnknownBase(name, _) => suggest(
            name,
            catalog
                .bases
                .iter()
                .map(|(k, v)| (k, v.synonyms.as_slice())),
        ),
        SpecError::UnknownDesktop(name, _) => suggest(
            name,
            catalog
                .desktops
                .iter()
                .map(|(k, v)| (k, v.synonyms.as_slice())),
        ),
        SpecError::UnknownApp(name) => suggest(
            name,
            catalog.apps.iter().map(|(k, v)| (k, v.synonyms.as_slice())),
        ),
        _ => Vec::new(),
    };
    RootfsError::Spec { error, suggestions }
}

/// The plan `build` executes for `spec`.
pub fn plan_for(spec: &Spec, options: &RootfsOptions) -> Result<Plan, RootfsError> {
    let env_mirror = std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty());
    let family = options
        .catalog
        .bases
        .get(&spec.base)
        .map(|b| b.family.as_str());
    let mirror = options
        .mirror
        .clone()
        .or(env_mirror.filter(|_| family == Some("debian")));
    plan::plan(
        spec,
        &options.catalog,
        &PlanOptions {
            mirror: mirror.as_deref(),
            keyring: options.keyring.as_deref(),
            agent: options.agent.is_some(),
            user: Some(&options.user),
        },
    )
    .map_err(|e| match e {
        PlanError::Spec(error) => spec_error(error, &options.catalog),
        other => RootfsError::Plan(other),
    })
}

fn require_root() -> Result<(), RootfsError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RootfsError::NotRoot);
    }
    tools::require(&[
        ("mkfs.ext4", "e2fsprogs"),
        ("tar", "tar"),
        ("chroot", "coreutils"),
        ("unshare", "util-linux"),
        ("cp", "coreutils"),
    ])?;
    Ok(())
}

fn check_space(dir: &Path, needed: u64) -> Result<(), RootfsError> {
    let free = tools::free_bytes(dir).map_err(io_err("inspecting", dir))?;
    if free < needed {
        return Err(RootfsError::NoSpace {
            dir: dir.to_path_buf(),
            needed_mib: needed / MIB,
            free_mib: free / MIB,
        });
    }
    Ok(())
}

fn probe_all(base: &str, urls: &[String], timeout: Duration) -> Result<(), RootfsError> {
    for url in urls {
        eprintln!("genos-image: checking {url}");
        probe::probe(url, timeout).map_err(|source| RootfsError::Unreachable {
            base: base.to_string(),
            source,
        })?;
    }
    Ok(())
}

fn base_hash(base: &BasePlan) -> String {
    let mut hasher = InputHasher::new(BASE_RECIPE);
    for (key, value) in base.hash_inputs() {
        hasher.add(key, value.as_bytes());
    }
    hasher.finish()
}

/// Returns the cached base layer for `plan`, building it on a miss.
/// The caller has probed the archive.
fn build_base(
    cache: &Cache,
    spec_base: &str,
    plan: &BasePlan,
    probe_timeout: Duration,
) -> Result<Artifact, RootfsError> {
    let hash = base_hash(plan);
    let _lock = match cache.lookup_or_lock(ArtifactKind::Base, &hash)? {
        Cached::Hit(hit) => return Ok(hit),
        Cached::Miss(lock) => lock,
    };
    if let Some(keyring) = &plan.keyring {
        if !keyring.exists() {
            return Err(RootfsError::NoKeyring {
                base: spec_base.to_string(),
                path: keyring.clone(),
                package: plan.keyring_package.clone().unwrap_or_default(),
            });
        }
    }
    let tools = plan.tools();
    let mut program = None;
    for tool in &tools {
        let found = tool.names.iter().find_map(|n| tools::find(n));
        let path = match (found, &plan.apk_static) {
            (Some(path), _) => path,
            // No apk on this host: fetch Alpine's apk.static and check its signature.
            (None, Some(apk_static)) => apk_bootstrap::obtain(cache, apk_static, probe_timeout)
                .map_err(|source| RootfsError::ApkStatic {
                    mirror: apk_static.mirror.clone(),
                    source,
                })?,
            (None, None) => {
                return Err(RootfsError::MissingTool {
                    names: tool.names.join(" or "),
                    hint: tool.hint.to_string(),
                })
            }
        };
        program.get_or_insert(path);
    }
    check_space(cache.root(), BASE_SPACE_NEEDED)?;
    let started = Instant::now();
    let staging = cache.stage(ArtifactKind::Base, &hash)?;
    let root = staging.path().join("root");
    let work = staging.path().join("work");
    for dir in [&root, &work] {
        fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    }
    for file in plan.host_files() {
        write(&work, &file.path, &file.contents, file.mode)?;
    }
    for prepared in plan.before() {
        match prepared {
            Prepared::Dir(rel) => {
                let dir = root.join(rel);
                fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            }
            Prepared::Symlink { path, target } => {
                let link = root.join(path);
                std::os::unix::fs::symlink(&target, &link).map_err(io_err("linking", &link))?;
            }
        }
    }
    let argv = plan.command(&root, &work);
    let program = program.unwrap_or_else(|| PathBuf::from(&argv[0]));
    eprintln!(
        "genos-image: {} {} from {}; this takes a few minutes",
        plan.builder.name(),
        plan.release,
        plan.mirror
    );
    let result = tools::run(Command::new(&program).args(&argv[1..]));
    if let Err(err) = result {
        // debootstrap keeps its own log in the tree; its end says what went wrong.
        let log = fs::read_to_string(root.join("debootstrap/debootstrap.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        return Err(match err {
            ToolError::Failed {
                command, status, ..
            } => ToolError::Failed {
                command,
                status,
                hint: if tail.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; debootstrap.log ends with: {}",
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    )
                },
            }
            .into(),
            other => other.into(),
        });
    }
    for file in plan.after() {
        let _ = fs::remove_file(root.join(&file.path));
        write(&root, &file.path, &file.contents, file.mode)?;
    }
    eprintln!("genos-image: packing the base layer");
    let tarball = staging.path().join(BASE_ARTIFACT);
    tools::run(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&root)
            .arg("."),
    )?;
    crate::cache::remove_tree(&root)?;
    crate::cache::remove_tree(&work)?;
    let inputs: serde_json::Map<String, serde_json::Value> = plan
        .hash_inputs()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into()))
        .collect();
    Ok(cache.publish(
        staging,
        ArtifactKind::Base,
        &hash,
        BASE_ARTIFACT,
        started.elapsed(),
        inputs.into(),
    )?)
}

/// Returns the cached root filesystem image for `spec`, building it (and its base
/// layer) on a miss.
pub fn build(cache: &Cache, spec: &Spec, options: &RootfsOptions) -> Result<Artifact, RootfsError> {
    let plan = plan_for(spec, options)?;
    let agent = match &options.agent {
        Some(path) => Some(fs::read(path).map_err(io_err("reading", path))?),
        None => None,
    };
    let base_hash = base_hash(&plan.base);
    let mut hasher = InputHasher::new(ROOTFS_RECIPE);
    hasher.add("base", base_hash.as_bytes());
    hasher.add("packages", plan.packages.join(",").as_bytes());
    hasher.add(
        "install",
        plan.install_script.as_deref().unwrap_or("").as_bytes(),
    );
    for file in plan
        .build_files
        .iter()
        .chain(&plan.files)
        .chain(&plan.user_files)
    {
        hasher.add(
            &file.path,
            format!("{:o}\n{}", file.mode, file.contents).as_bytes(),
        );
    }
    hasher.add("setup", plan.setup_script.as_bytes());
    hasher.add("chown", plan.chown_script.as_bytes());
    if let Some(agent) = &agent {
        hasher.add("agent", sha256_hex(agent).as_bytes());
    }
    let hash = hasher.finish();
    if let Some(hit) = cache.lookup(ArtifactKind::Rootfs, &hash)? {
        return Ok(hit);
    }
    // Find out now, in seconds, whether the archives answer; the base is probed by
    // `build_base` only when it has to be built.
    let mut urls = Vec::new();
    if cache.lookup(ArtifactKind::Base, &base_hash)?.is_none() {
        urls.push(plan.base.probe_url.clone());
    }
    for url in &plan.probe_urls {
        if !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    probe_all(&spec.base, &urls, options.probe_timeout)?;
    require_root()?;
    let base = build_base(cache, &spec.base, &plan.base, options.probe_timeout)?;

    let _lock = cache.lock(ArtifactKind::Rootfs, &hash)?;
    if let Some(hit) = cache.lookup(ArtifactKind::Rootfs, &hash)? {
        return Ok(hit);
    }
    check_space(cache.root(), base.manifest.size_bytes * 2 + GIB)?;
    let started = Instant::now();
    let staging = cache.stage(ArtifactKind::Rootfs, &hash)?;
    let root = staging.path().join("root");
    fs::create_dir_all(&root).map_err(io_err("creating", &root))?;

    eprintln!(
        "genos-image: unpacking base layer {}",
        &base.manifest.input_hash[..16]
    );
    tools::run(
        Command::new("tar")
            .args(["--numeric-owner", "--xattrs", "--xattrs-include=*", "-xpf"])
            .arg(base.path())
            .arg("-C")
            .arg(&root),
    )?;
    customise(&root, &plan, agent.as_deref())?;

    let content = tree_bytes(&root).map_err(io_err("measuring", &root))?;
    // Room for file system metadata and a little slack; `write_out` grows the copy to
    // the spec's disk size, so one cached image serves every disk size.
    let size_mib = (content + content / 10 + 256 * MIB).div_ceil(MIB);
    check_space(staging.path(), content + content / 5)?;
    eprintln!(
        "genos-image: writing ext4 image ({} MiB content, {size_mib} MiB file system)",
        content / MIB
    );
    let image = staging.path().join(ROOTFS_ARTIFACT);
    let uuid = uuid_from_hash(&hash);
    tools::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", FS_LABEL, "-U", &uuid, "-d"])
            .arg(&root)
            .arg(&image)
            .arg(format!("{size_mib}M")),
    )?;
    crate::cache::remove_tree(&root)?;
    let inputs = serde_json::json!({
        "base": base.manifest.input_hash,
        "base_name": spec.base,
        "packages": plan.packages,
        "repos": plan.repos.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        "session": plan.session.command,
        "user": options.user,
        "content_bytes": content,
    });
    Ok(cache.publish(
        staging,
        ArtifactKind::Rootfs,
        &hash,
        ROOTFS_ARTIFACT,
        started.elapsed(),
        inputs,
    )?)
}

/// Turns an unpacked base into the spec's tree by executing the plan: build-only files,
/// the install, the set-up files and script, the user's files, then a clean-up.
fn customise(root: &Path, plan: &Plan, agent: Option<&[u8]>) -> Result<(), RootfsError> {
    for file in &plan.build_files {
        write(root, &file.path, &file.contents, file.mode)?;
    }
    if let Ok(resolv) = fs::read_to_string("/etc/resolv.conf") {
        let _ = fs::remove_file(root.join("etc/resolv.conf"));
        write(root, "etc/resolv.conf", &resolv, 0o644)?;
    }
    if let Some(script) = &plan.install_script {
        eprintln!(
            "genos-image: installing {} packages: {}",
            plan.packages.len(),
            plan.packages.join(" ")
        );
        in_chroot(root, script)?;
    }
    for file in &plan.files {
        write(root, &file.path, &file.contents, file.mode)?;
    }
    if let Some(agent) = agent {
        let bin = root.join(plan::AGENT_PATH);
        fs::create_dir_all(bin.parent().expect("has parent")).map_err(io_err("creating", &bin))?;
        fs::write(&bin, agent).map_err(io_err("writing", &bin))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &bin))?;
    }
    in_chroot(root, &plan.setup_script)?;
    for file in &plan.user_files {
        write(root, &file.path, &file.contents, file.mode)?;
    }
    in_chroot(root, &plan.chown_script)?;
    // Leave a clean tree: no build-only files, no package lists, a fresh machine id.
    for file in &plan.build_files {
        let _ = fs::remove_file(root.join(&file.path));
    }
    let _ = fs::remove_file(root.join("etc/machine-id"));
    write(root, "etc/machine-id", "", 0o444)?;
    for rel in &plan.clean_dirs {
        let dir = root.join(rel);
        if dir.is_dir() {
            for entry in fs::read_dir(&dir)
                .map_err(io_err("listing", &dir))?
                .flatten()
            {
                if entry.path().is_file() {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
    Ok(())
}

/// Copies a cached image to `out` (sparse) and grows its file system by `disk_gib`
/// GiB of free space (the spec's disk), via a temporary file renamed into place.
pub fn write_out(artifact: &Artifact, out: &Path, disk_gib: u64) -> Result<(), RootfsError> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rootfs".into());
    let tmp = parent.join(format!(".{name}.partial.{}", std::process::id()));
    let result = copy_and_grow(&artifact.path(), &tmp, disk_gib)
        .and_then(|()| fs::rename(&tmp, out).map_err(io_err("renaming into", out)));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn copy_and_grow(image: &Path, dest: &Path, disk_gib: u64) -> Result<(), RootfsError> {
    tools::run(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(image)
            .arg(dest),
    )?;
    if disk_gib == 0 {
        return Ok(());
    }
    let current = fs::metadata(dest)
        .map_err(io_err("inspecting", dest))?
        .len();
    let target = current + disk_gib * GIB;
    let file = fs::OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(io_err("opening", dest))?;
    file.set_len(target).map_err(io_err("growing", dest))?;
    drop(file);
    tools::require(&[("resize2fs", "e2fsprogs")])?;
    // resize2fs insists on a freshly checked file system; the copy is clean, so the
    // forced check only confirms it.
    tools::run(Command::new("e2fsck").args(["-f", "-p"]).arg(dest))?;
    tools::run(Command::new("resize2fs").arg("-p").arg(dest))?;
    Ok(())
}

/// A stable UUID derived from the input hash (reproducible images).
fn uuid_from_hash(hash: &str) -> String {
    let h = &hash[..32];
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Bytes the files under `root` occupy (hard links counted once).
fn tree_bytes(root: &Path) -> std::io::Result<u64> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                stack.push(entry.path());
            }
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

/// Runs a shell script inside `root` with its own mount and pid namespaces.
fn in_chroot(root: &Path, script: &str) -> Result<(), RootfsError> {
    let mut proc_dir = root.as_os_str().to_owned();
    proc_dir.push("/proc");
    let mut mount_proc = std::ffi::OsString::from("--mount-proc=");
    mount_proc.push(&proc_dir);
    tools::run(
        Command::new("unshare")
            .args(["--mount", "--pid", "--fork"])
            .arg(mount_proc)
            .arg("chroot")
            .arg(root)
            .args([
                "/usr/bin/env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME=/root",
                "LANG=C.UTF-8",
            ])
            .args(["DEBIAN_FRONTEND=noninteractive", "/bin/sh", "-euc", script]),
    )?;
    Ok(())
}

fn write(root: &Path, rel: &str, contents: &str, mode: u32) -> Result<(), RootfsError> {
    let path = root.join(rel);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    fs::write(&path, contents).map_err(io_err("writing", &path))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::spec;

    #[test]
    fn unknown_app_gets_a_suggestion() {
        let err = check_spec(
            &spec("debian-12", "xfce", &["fierfox"]),
            &Catalog::embedded(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("did you mean firefox?"), "{err}");
    }

    #[test]
    fn unknown_base_gets_a_suggestion() {
        let mut s = spec("debian-12", "none", &[]);
        s.base = "debian-13".into();
        let err = check_spec(&s, &Catalog::embedded()).unwrap_err();
        assert!(err.to_string().contains("did you mean debian-12?"), "{err}");
    }

    #[test]
    fn a_base_without_a_builder_is_refused_naming_the_builder() {
        let mut options = RootfsOptions::default();
        options.catalog.bases.get_mut("fedora-40").unwrap().builder = "rpm-ostree".into();
        let err = plan_for(&spec("fedora-40", "none", &[]), &options).unwrap_err();
        assert!(
            err.to_string().contains("no \"rpm-ostree\" builder"),
            "{err}"
        );
    }

    #[test]
    fn the_mirror_option_overrides_the_catalogs_for_any_base() {
        let options = RootfsOptions {
            mirror: Some("http://mirror.lan/alpine".into()),
            ..Default::default()
        };
        let plan = plan_for(&spec("alpine-3.20", "none", &["git"]), &options).unwrap();
        assert_eq!(
            plan.base.probe_url,
            "http://mirror.lan/alpine/v3.20/main/x86_64/APKINDEX.tar.gz"
        );
    }

    #[test]
    fn uuid_from_hash_is_well_formed() {
        let uuid = uuid_from_hash(&"ab".repeat(32));
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
    }
}
