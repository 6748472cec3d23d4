//! Root filesystems for environment specs: Debian via debootstrap, the catalog's
//! packages, a user with autologin into the chosen session, written as an ext4 image
//! with `mkfs.ext4 -d` (no loop mounts).
//!
//! Two cached layers: the *base* (a debootstrap tarball per suite and mirror, shared by
//! every spec with that base) and the *rootfs* image per spec. A spec that only adds an
//! app therefore skips debootstrap and pays only for its extra packages.
//! Commands inside the tree run under `unshare --mount --pid` + `chroot`, so the
//! `/proc` they need disappears with them and nothing stays mounted after a failure.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use proto::spec::{Catalog, Spec, SpecError};

use crate::cache::{sha256_hex, Artifact, ArtifactKind, Cache, CacheError, InputHasher};
use crate::tools::{self, ToolError};

/// Default Debian mirror; override with `--mirror` or `GENOS_DEBIAN_MIRROR`.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable naming the Debian mirror.
pub const MIRROR_ENV: &str = "GENOS_DEBIAN_MIRROR";
/// The account every environment logs into.
pub const DEFAULT_USER: &str = "genos";
/// File names of the two layers' artifacts.
pub const BASE_ARTIFACT: &str = "base.tar";
pub const ROOTFS_ARTIFACT: &str = "rootfs.ext4";
/// Host name baked into images (environments override it on the kernel command line).
pub const DEFAULT_HOSTNAME: &str = "genos";
/// Label of the ext4 file system.
pub const FS_LABEL: &str = "genos-root";

/// Packages every base gets on top of minbase: an init, device manager, networking,
/// privilege escalation for the user and TLS roots for apps.
pub const BASE_PACKAGES: &[&str] = &[
    "systemd-sysv",
    "udev",
    "dbus",
    "sudo",
    "iproute2",
    "ca-certificates",
];
/// Packages an X11 session needs besides the desktop's own.
const X11_SESSION_PACKAGES: &[&str] = &[
    "xserver-xorg-core",
    "xserver-xorg-input-libinput",
    "xinit",
    "libpam-systemd",
    "fonts-dejavu-core",
];
/// Packages a Wayland kiosk (cage) session needs besides cage.
const KIOSK_SESSION_PACKAGES: &[&str] = &["libpam-systemd", "fonts-dejavu-core"];

const BASE_RECIPE: &str = "genos-base-v1";
/// Bump when `customise` changes what goes into an image, so cached images are rebuilt.
const ROOTFS_RECIPE: &str = "genos-rootfs-v2";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Free space a base build needs in the cache (debootstrap tree plus its tarball).
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
    #[error(
        "building a root filesystem needs root (debootstrap creates device nodes and runs chroot)"
    )]
    NotRoot,
    #[error("desktop {0:?} has no session recipe in genos-image")]
    NoSession(String),
    #[error("the kiosk desktop needs an app to show full screen; the spec lists none")]
    KioskWithoutApp,
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
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
            RootfsError::Io {
                action,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Build settings that are not part of the spec.
#[derive(Debug, Clone)]
pub struct RootfsOptions {
    pub catalog: Catalog,
    pub mirror: String,
    pub user: String,
    /// `genos-agent` binary to install with a systemd service.
    pub agent: Option<PathBuf>,
}

impl Default for RootfsOptions {
    fn default() -> Self {
        RootfsOptions {
            catalog: Catalog::embedded(),
            mirror: std::env::var(MIRROR_ENV)
                .ok()
                .filter(|m| !m.is_empty())
                .unwrap_or(DEFAULT_MIRROR.into()),
            user: DEFAULT_USER.into(),
            agent: None,
        }
    }
}

/// What the session recipe does for a desktop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Extra packages besides the catalog's.
    pub packages: Vec<String>,
    /// Command the autologin shell on tty1 execs; `None` leaves the user at a shell.
    pub command: Option<String>,
}

/// The session for `spec`'s desktop: X11 desktops start through `startx`, the kiosk runs
/// the spec's first app full screen under cage, `none` is a console login.
pub fn session_for(spec: &Spec, catalog: &Catalog) -> Result<Session, RootfsError> {
    let x11 = |program: &str| Session {
        packages: X11_SESSION_PACKAGES.iter().map(|p| p.to_string()).collect(),
        command: Some(format!("startx {program} -- -nolisten tcp vt1")),
    };
    match spec.desktop.as_str() {
        "none" => Ok(Session {
            packages: Vec::new(),
            command: None,
        }),
        "xfce" => Ok(x11("/usr/bin/startxfce4")),
        "lxqt" => Ok(x11("/usr/bin/startlxqt")),
        "kde" => Ok(x11("/usr/bin/startplasma-x11")),
        "gnome" => Ok(x11("/usr/bin/gnome-session")),
        "kiosk" => {
            // The app's first package names its executable for every graphical app in
            // the catalog (firefox-esr, chromium, vlc, ...).
            let app = spec.apps.first().ok_or(RootfsError::KioskWithoutApp)?;
            let program = catalog
                .apps
                .get(app)
                .and_then(|entry| entry.packages.first())
                .cloned()
                .unwrap_or_else(|| app.clone());
            Ok(Session {
                packages: KIOSK_SESSION_PACKAGES
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                command: Some(format!("cage -- {program}")),
            })
        }
        other => Err(RootfsError::NoSession(other.to_string())),
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
    Err(RootfsError::Spec { error, suggestions })
}

/// Everything that determines a spec's image, resolved from the spec and catalog.
#[derive(Debug, Clone)]
struct Plan {
    suite: String,
    packages: Vec<String>,
    session: Session,
}

fn plan(spec: &Spec, options: &RootfsOptions) -> Result<Plan, RootfsError> {
    check_spec(spec, &options.catalog)?;
    let base = &options.catalog.bases[&spec.base];
    let suite = base.suite.clone().unwrap_or_else(|| "bookworm".into());
    let session = session_for(spec, &options.catalog)?;
    let mut packages = options.catalog.packages_for(spec);
    for p in &session.packages {
        if !packages.contains(p) {
            packages.push(p.clone());
        }
    }
    packages.sort();
    Ok(Plan {
        suite,
        packages,
        session,
    })
}

fn require_root_and_tools() -> Result<(), RootfsError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(RootfsError::NotRoot);
    }
    tools::require(&[
        ("debootstrap", "debootstrap"),
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

/// Returns the cached base layer for `suite`, debootstrapping it on a miss.
pub fn build_base(cache: &Cache, suite: &str, mirror: &str) -> Result<Artifact, RootfsError> {
    let mut hasher = InputHasher::new(BASE_RECIPE);
    hasher
        .add("suite", suite.as_bytes())
        .add("mirror", mirror.as_bytes());
    hasher.add("packages", BASE_PACKAGES.join(",").as_bytes());
    let hash = hasher.finish();
    if let Some(hit) = cache.lookup(ArtifactKind::Base, &hash)? {
        return Ok(hit);
    }
    let _lock = cache.lock(ArtifactKind::Base, &hash)?;
    if let Some(hit) = cache.lookup(ArtifactKind::Base, &hash)? {
        return Ok(hit);
    }
    check_space(cache.root(), BASE_SPACE_NEEDED)?;
    let started = Instant::now();
    let staging = cache.stage(ArtifactKind::Base, &hash)?;
    let root = staging.path().join("root");
    eprintln!("genos-image: debootstrap {suite} (minbase) from {mirror}; this takes a few minutes");
    let debootstrap = tools::run(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", BASE_PACKAGES.join(",")))
            .arg(suite)
            .arg(&root)
            .arg(mirror),
    );
    if let Err(err) = debootstrap {
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
    let inputs = serde_json::json!({ "suite": suite, "mirror": mirror, "packages": BASE_PACKAGES });
    Ok(cache.publish(
        staging,
        ArtifactKind::Base,
        &hash,
        BASE_ARTIFACT,
        started.elapsed(),
        inputs,
    )?)
}

/// Returns the cached root filesystem image for `spec`, building it (and its base
/// layer) on a miss.
pub fn build(cache: &Cache, spec: &Spec, options: &RootfsOptions) -> Result<Artifact, RootfsError> {
    let plan = plan(spec, options)?;
    let agent = match &options.agent {
        Some(path) => Some(fs::read(path).map_err(io_err("reading", path))?),
        None => None,
    };
    require_root_and_tools()?;
    let base = build_base(cache, &plan.suite, &options.mirror)?;

    let mut hasher = InputHasher::new(ROOTFS_RECIPE);
    hasher.add("base", base.manifest.input_hash.as_bytes());
    hasher.add("packages", plan.packages.join(",").as_bytes());
    hasher.add(
        "session",
        plan.session.command.as_deref().unwrap_or("").as_bytes(),
    );
    hasher.add("user", options.user.as_bytes());
    if let Some(agent) = &agent {
        hasher.add("agent", sha256_hex(agent).as_bytes());
    }
    let hash = hasher.finish();
    if let Some(hit) = cache.lookup(ArtifactKind::Rootfs, &hash)? {
        return Ok(hit);
    }
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
    customise(&root, &plan, options, agent.as_deref())?;

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
        "packages": plan.packages,
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

/// Turns an unpacked base into the spec's tree: packages, user, autologin, session.
fn customise(
    root: &Path,
    plan: &Plan,
    options: &RootfsOptions,
    agent: Option<&[u8]>,
) -> Result<(), RootfsError> {
    // Keep package maintainer scripts from starting services inside the build chroot.
    write(root, "usr/sbin/policy-rc.d", "#!/bin/sh\nexit 101\n", 0o755)?;
    if let Ok(resolv) = fs::read_to_string("/etc/resolv.conf") {
        let _ = fs::remove_file(root.join("etc/resolv.conf"));
        write(root, "etc/resolv.conf", &resolv, 0o644)?;
    }
    if !plan.packages.is_empty() {
        eprintln!(
            "genos-image: installing {} packages: {}",
            plan.packages.len(),
            plan.packages.join(" ")
        );
        in_chroot(
            root,
            &format!(
                "apt-get update -q\napt-get install -y -q --no-install-recommends {}\napt-get clean",
                plan.packages.join(" ")
            ),
        )?;
    }
    let user = &options.user;
    // The image is shared by every environment with the same packages; the VM gets its
    // own name from `systemd.hostname=` on the kernel command line.
    write(
        root,
        "etc/hostname",
        &format!("{DEFAULT_HOSTNAME}\n"),
        0o644,
    )?;
    write(
        root,
        "etc/hosts",
        "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    write(
        root,
        "etc/fstab",
        "# The root file system is mounted by the GenOS initramfs.\n",
        0o644,
    )?;
    write(
        root,
        "etc/systemd/network/20-wired.network",
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n",
        0o644,
    )?;
    write(
        root,
        &format!("etc/sudoers.d/{user}"),
        &format!("{user} ALL=(ALL) NOPASSWD:ALL\n"),
        0o440,
    )?;
    let autologin = |agetty_args: &str| {
        format!("[Service]\nExecStart=\nExecStart=-/sbin/agetty --autologin {user} {agetty_args}\n")
    };
    write(
        root,
        "etc/systemd/system/getty@tty1.service.d/autologin.conf",
        &autologin("--noclear %I $TERM"),
        0o644,
    )?;
    write(
        root,
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf",
        &autologin("--keep-baud 115200,57600,38400,9600 %I $TERM"),
        0o644,
    )?;
    let mut profile = String::from("# Written by genos-image.\n[ -f ~/.bashrc ] && . ~/.bashrc\n");
    if let Some(command) = &plan.session.command {
        profile.push_str(&format!(
            "if [ \"$(tty)\" = /dev/tty1 ] && [ -z \"$DISPLAY\" ] && [ -z \"$WAYLAND_DISPLAY\" ]; then\n    exec {command}\nfi\n"
        ));
    }
    let mut script = format!(
        "useradd --create-home --shell /bin/bash {user}\n\
         usermod --password '*' {user}\n\
         for g in sudo video input render audio; do getent group $g >/dev/null && usermod -aG $g {user}; done\n\
         systemctl enable systemd-networkd\n\
         systemctl set-default multi-user.target\n\
         systemctl mask e2scrub_reap.service e2scrub_all.timer\n"
    );
    if let Some(agent) = agent {
        let bin = root.join("usr/local/bin/genos-agent");
        fs::create_dir_all(bin.parent().expect("has parent")).map_err(io_err("creating", &bin))?;
        fs::write(&bin, agent).map_err(io_err("writing", &bin))?;
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod", &bin))?;
        write(
            root,
            "etc/systemd/system/genos-agent.service",
            "[Unit]\nDescription=GenOS guest agent\n\n[Service]\nExecStart=/usr/local/bin/genos-agent\nRestart=always\n\n[Install]\nWantedBy=multi-user.target\n",
            0o644,
        )?;
        script.push_str("systemctl enable genos-agent.service\n");
    }
    in_chroot(root, &script)?;
    write(root, &format!("home/{user}/.bash_profile"), &profile, 0o644)?;
    in_chroot(
        root,
        &format!("chown {user}:{user} /home/{user}/.bash_profile"),
    )?;
    // Leave a clean tree: no build-only policy, no package lists, a fresh machine id.
    for rel in ["usr/sbin/policy-rc.d", "etc/machine-id"] {
        let _ = fs::remove_file(root.join(rel));
    }
    write(root, "etc/machine-id", "", 0o444)?;
    let lists = root.join("var/lib/apt/lists");
    if lists.is_dir() {
        for entry in fs::read_dir(&lists)
            .map_err(io_err("listing", &lists))?
            .flatten()
        {
            if entry.path().is_file() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(desktop: &str, apps: &[&str]) -> Spec {
        let json = serde_json::json!({
            "version": 1, "name": "t", "base": "debian-12", "desktop": desktop,
            "apps": apps, "vcpus": 1, "memory_mib": 512, "disk_gib": 1,
            "display": {"width": 1280, "height": 720, "fps": 30},
            "network": {"mode": "none", "allow": []},
            "lifetime": {"ttl_s": null, "idle_s": null},
            "persistence": "ephemeral", "assumptions": []
        });
        Spec::from_json(&json.to_string()).unwrap()
    }

    #[test]
    fn unknown_app_gets_a_suggestion() {
        let err = check_spec(&spec("xfce", &["fierfox"]), &Catalog::embedded()).unwrap_err();
        assert!(err.to_string().contains("did you mean firefox?"), "{err}");
    }

    #[test]
    fn unknown_base_gets_a_suggestion() {
        let mut s = spec("none", &[]);
        s.base = "debian-13".into();
        let err = check_spec(&s, &Catalog::embedded()).unwrap_err();
        assert!(err.to_string().contains("did you mean debian-12?"), "{err}");
    }

    #[test]
    fn unbuildable_base_is_refused_with_reason() {
        let mut s = spec("none", &[]);
        s.base = "fedora-40".into();
        let err = check_spec(&s, &Catalog::embedded()).unwrap_err();
        assert!(err.to_string().contains("cannot be built yet"), "{err}");
    }

    #[test]
    fn xfce_session_starts_x_with_the_desktop() {
        let session = session_for(&spec("xfce", &[]), &Catalog::embedded()).unwrap();
        assert!(session
            .command
            .unwrap()
            .starts_with("startx /usr/bin/startxfce4"));
        assert!(session.packages.iter().any(|p| p == "xserver-xorg-core"));
    }

    #[test]
    fn kiosk_session_runs_the_first_app_under_cage() {
        let catalog = Catalog::embedded();
        let session = session_for(&spec("kiosk", &["firefox"]), &catalog).unwrap();
        let program = catalog.apps["firefox"].packages[0].clone();
        assert_eq!(session.command.unwrap(), format!("cage -- {program}"));
    }

    #[test]
    fn kiosk_without_app_is_an_error() {
        let err = session_for(&spec("kiosk", &[]), &Catalog::embedded()).unwrap_err();
        assert!(matches!(err, RootfsError::KioskWithoutApp));
    }

    #[test]
    fn plan_merges_catalog_and_session_packages_sorted() {
        let options = RootfsOptions::default();
        let plan = plan(&spec("xfce", &["git"]), &options).unwrap();
        let mut sorted = plan.packages.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(plan.packages, sorted);
        assert!(plan.packages.iter().any(|p| p == "xfce4"));
        assert!(plan.packages.iter().any(|p| p == "xinit"));
    }

    #[test]
    fn uuid_from_hash_is_well_formed() {
        let uuid = uuid_from_hash(&"ab".repeat(32));
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.matches('-').count(), 4);
    }
}
