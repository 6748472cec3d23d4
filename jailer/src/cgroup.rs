//! Cgroup limits for a jailed VMM, on cgroup v1 (separate hierarchies per controller)
//! and v2 (one unified hierarchy).
//!
//! Settings are given as `FILE=VALUE` where the file names the controller
//! (`memory.limit_in_bytes` on v1, `memory.max` on v2, `cpu.max`, `pids.max`, ...). The
//! plan — which directories to create and which files to write — is computed from the
//! mount table without touching the file system, so it is tested on any host.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Errors from planning or applying cgroup limits.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A `--cgroup` argument is not `FILE=VALUE` with a controller-prefixed file name.
    #[error("bad --cgroup setting {0:?}: expected CONTROLLER.FILE=VALUE, e.g. memory.max=512M")]
    BadSetting(String),
    /// No hierarchy on this host carries the controller.
    #[error("cgroup controller {controller} is not mounted (cgroup {version})")]
    NoController {
        controller: String,
        version: Version,
    },
    /// No cgroup file system is mounted at all.
    #[error("no cgroup file system is mounted")]
    NotMounted,
    /// A file system operation failed.
    #[error("cgroup {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which cgroup interface to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Version::V1 => "v1",
            Version::V2 => "v2",
        })
    }
}

/// One `FILE=VALUE` setting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Controller-prefixed file name, e.g. `memory.max`.
    pub file: String,
    /// Value written to it.
    pub value: String,
}

impl Setting {
    /// Parses `FILE=VALUE`.
    pub fn parse(s: &str) -> Result<Self, CgroupError> {
        let bad = || CgroupError::BadSetting(s.to_string());
        let (file, value) = s.split_once('=').ok_or_else(bad)?;
        let (controller, rest) = file.split_once('.').ok_or_else(bad)?;
        let valid = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.')
        };
        if !valid(controller) || !valid(rest) || controller.contains('.') || value.is_empty() {
            return Err(bad());
        }
        Ok(Self {
            file: file.to_string(),
            value: value.to_string(),
        })
    }

    /// The controller the file belongs to.
    pub fn controller(&self) -> &str {
        self.file.split_once('.').map_or("", |(c, _)| c)
    }
}

/// The cgroup file systems mounted on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mounts {
    /// v1 hierarchies: (controllers, mount point).
    pub v1: Vec<(Vec<String>, PathBuf)>,
    /// The v2 mount point, if any.
    pub v2: Option<PathBuf>,
}

impl Mounts {
    /// Reads `/proc/self/mountinfo`.
    pub fn of_this_host() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Io {
            path: path.into(),
            source,
        })?;
        Ok(Self::parse_mountinfo(&text))
    }

    /// Parses mountinfo text (see proc(5)).
    pub fn parse_mountinfo(text: &str) -> Self {
        let mut mounts = Self::default();
        for line in text.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or("");
            let super_opts = right.nth(1).unwrap_or("");
            match fstype {
                "cgroup2" => mounts.v2 = Some(PathBuf::from(mount_point)),
                "cgroup" => {
                    let controllers: Vec<String> = super_opts
                        .split(',')
                        .filter(|o| !matches!(*o, "rw" | "ro") && !o.contains('='))
                        .map(str::to_string)
                        .collect();
                    mounts.v1.push((controllers, PathBuf::from(mount_point)));
                }
                _ => {}
            }
        }
        mounts
    }

    /// v1 when any v1 controller hierarchy exists (hybrid hosts keep controllers there),
    /// else v2.
    pub fn preferred_version(&self) -> Result<Version, CgroupError> {
        if self.v1.iter().any(|(c, _)| !c.is_empty()) {
            Ok(Version::V1)
        } else if self.v2.is_some() {
            Ok(Version::V2)
        } else {
            Err(CgroupError::NotMounted)
        }
    }
}

/// What to create and write for one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Interface used.
    pub version: Version,
    /// Leaf cgroup directories to create, each with the settings written into it.
    pub leaves: Vec<Leaf>,
}

/// One leaf cgroup directory (one per v1 hierarchy used; one on v2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// The hierarchy's mount point.
    pub mount: PathBuf,
    /// Path from the mount point to the leaf, e.g. `genos/vm1`.
    pub relative: PathBuf,
    /// Settings for this leaf.
    pub settings: Vec<Setting>,
}

impl Leaf {
    /// Absolute path of the leaf directory.
    pub fn path(&self) -> PathBuf {
        self.mount.join(&self.relative)
    }
}

/// Plans cgroup `parent/id` with `settings`. No settings means no cgroup.
pub fn plan(
    mounts: &Mounts,
    version: Option<Version>,
    parent: &str,
    id: &str,
    settings: &[Setting],
) -> Result<Option<Plan>, CgroupError> {
    if settings.is_empty() {
        return Ok(None);
    }
    let version = match version {
        Some(v) => v,
        None => mounts.preferred_version()?,
    };
    let relative = Path::new(parent).join(id);
    let mut leaves: Vec<Leaf> = Vec::new();
    for setting in settings {
        let mount = match version {
            Version::V2 => mounts.v2.clone().ok_or(CgroupError::NotMounted)?,
            Version::V1 => mounts
                .v1
                .iter()
                .find(|(c, _)| c.iter().any(|c| c == setting.controller()))
                .map(|(_, m)| m.clone())
                .ok_or_else(|| CgroupError::NoController {
                    controller: setting.controller().to_string(),
                    version,
                })?,
        };
        match leaves.iter_mut().find(|l| l.mount == mount) {
            Some(leaf) => leaf.settings.push(setting.clone()),
            None => leaves.push(Leaf {
                mount,
                relative: relative.clone(),
                settings: vec![setting.clone()],
            }),
        }
    }
    Ok(Some(Plan { version, leaves }))
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CgroupError + '_ {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err(path))
}

impl Plan {
    /// Creates the leaves, writes the settings and moves process `pid` into them.
    pub fn apply(&self, pid: u32) -> Result<(), CgroupError> {
        for leaf in &self.leaves {
            // Each level must exist; on v2 each level's parent must delegate the
            // controllers used below it, on v1 cpuset needs cpus and mems copied down.
            let mut dir = leaf.mount.clone();
            for component in leaf.relative.components() {
                let parent = dir.clone();
                dir.push(component);
                match self.version {
                    Version::V2 => {
                        let controllers: Vec<String> = leaf
                            .settings
                            .iter()
                            .map(|s| format!("+{}", s.controller()))
                            .collect();
                        write(
                            &parent.join("cgroup.subtree_control"),
                            &controllers.join(" "),
                        )?;
                    }
                    Version::V1 => {}
                }
                match fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err(&dir)(e)),
                }
                if self.version == Version::V1
                    && leaf.settings.iter().any(|s| s.controller() == "cpuset")
                {
                    for file in ["cpuset.cpus", "cpuset.mems"] {
                        let inherited =
                            fs::read_to_string(parent.join(file)).map_err(io_err(&parent))?;
                        if fs::read_to_string(dir.join(file))
                            .map_err(io_err(&dir))?
                            .trim()
                            .is_empty()
                        {
                            write(&dir.join(file), inherited.trim())?;
                        }
                    }
                }
            }
            for setting in &leaf.settings {
                write(&dir.join(&setting.file), &setting.value)?;
            }
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Moves `pid` back to the hierarchy roots and removes the leaves. Best effort: a
    /// leaf still holding processes stays.
    pub fn remove(&self, pid: u32) {
        for leaf in &self.leaves {
            let _ = fs::write(leaf.mount.join("cgroup.procs"), pid.to_string());
            let _ = fs::remove_dir(leaf.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
27 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
28 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
29 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
30 25 0:28 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";
    const UNIFIED: &str = "35 1 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    fn settings(s: &[&str]) -> Vec<Setting> {
        s.iter().map(|s| Setting::parse(s).unwrap()).collect()
    }

    #[test]
    fn v1_settings_go_to_the_hierarchy_of_their_controller() {
        let mounts = Mounts::parse_mountinfo(HYBRID);

        let plan = plan(
            &mounts,
            None,
            "genos",
            "vm1",
            &settings(&[
                "memory.limit_in_bytes=256M",
                "cpu.cfs_quota_us=50000",
                "pids.max=64",
            ]),
        )
        .unwrap()
        .unwrap();

        assert_eq!(plan.version, Version::V1);
        let paths: Vec<PathBuf> = plan.leaves.iter().map(Leaf::path).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("/sys/fs/cgroup/memory/genos/vm1"),
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/genos/vm1"),
                PathBuf::from("/sys/fs/cgroup/pids/genos/vm1"),
            ]
        );
    }

    #[test]
    fn v2_settings_share_one_leaf() {
        let mounts = Mounts::parse_mountinfo(UNIFIED);

        let plan = plan(
            &mounts,
            None,
            "genos",
            "vm1",
            &settings(&["memory.max=1G", "pids.max=64"]),
        )
        .unwrap()
        .unwrap();

        assert_eq!(plan.version, Version::V2);
        assert_eq!(plan.leaves.len(), 1);
        assert_eq!(
            plan.leaves[0].path(),
            PathBuf::from("/sys/fs/cgroup/genos/vm1")
        );
        assert_eq!(plan.leaves[0].settings.len(), 2);
    }

    #[test]
    fn an_unmounted_controller_is_named_in_the_error() {
        let mounts = Mounts::parse_mountinfo(HYBRID);
        let err = plan(
            &mounts,
            None,
            "genos",
            "vm1",
            &settings(&["hugetlb.limit=1"]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "cgroup controller hugetlb is not mounted (cgroup v1)"
        );
    }

    #[test]
    fn malformed_settings_are_refused() {
        for bad in [
            "memory",
            "memory.max",
            "=1",
            "../x.y=1",
            "memory/../x=1",
            "max=1",
            "memory.max=",
        ] {
            assert!(Setting::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn no_settings_means_no_cgroup() {
        assert_eq!(
            plan(&Mounts::parse_mountinfo(UNIFIED), None, "genos", "x", &[]).unwrap(),
            None
        );
    }

    #[test]
    fn v2_apply_delegates_controllers_writes_limits_and_moves_the_process() {
        let root = std::env::temp_dir().join(format!("genos-cg-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        let mounts = Mounts {
            v1: vec![],
            v2: Some(root.clone()),
        };
        let plan = plan(
            &mounts,
            None,
            "genos",
            "vm1",
            &settings(&["memory.max=1G", "pids.max=64"]),
        )
        .unwrap()
        .unwrap();

        plan.apply(4242).unwrap();

        let leaf = root.join("genos/vm1");
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(
            fs::read_to_string(root.join("genos/cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert_eq!(fs::read_to_string(leaf.join("memory.max")).unwrap(), "1G");
        assert_eq!(fs::read_to_string(leaf.join("pids.max")).unwrap(), "64");
        assert_eq!(
            fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            "4242"
        );
        fs::remove_dir_all(&root).unwrap();
    }
}
