//! Rewrites the VMM's command line so that every host path it names is reachable inside
//! the jail, and lists the bind mounts that make it so.
//!
//! The operator (or hostd) passes host paths, as it would to an unjailed VMM. Files the
//! VMM reads (kernel, initrd, disks, config) are bind-mounted into `/images`, read-only
//! unless a disk is writable; the console file is bind-mounted into `/run`; the API
//! socket is created inside the jail at `/run/<name>` and reached from the host through
//! the jail directory (the jailer links the requested host path to it).

use std::path::{Path, PathBuf};

/// Errors in the VMM arguments the jailer must understand.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VmmArgsError {
    /// A path flag was the last argument.
    #[error("VMM argument {0} needs a value")]
    MissingValue(String),
    /// A path has no file name to name it by inside the jail.
    #[error("VMM argument {flag} has no file name: {path}")]
    NoFileName { flag: String, path: String },
    /// `--config` files carry their own paths, which the jailer cannot rewrite.
    #[error("--config is not supported under the jailer: pass the VM's settings as flags")]
    ConfigFile,
}

/// One bind mount from the host into the jail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bind {
    /// Host path.
    pub source: PathBuf,
    /// Path inside the jail root (absolute, as the VMM sees it).
    pub target: PathBuf,
    /// Mounted read-only.
    pub read_only: bool,
}

/// The VMM's arguments as seen inside the jail, and what must be mounted for them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailedArgs {
    /// Arguments to exec the VMM with.
    pub args: Vec<String>,
    /// Files to bind-mount into the jail.
    pub binds: Vec<Bind>,
    /// The API socket: (path the host asked for, path inside the jail).
    pub api_socket: Option<(PathBuf, PathBuf)>,
}

/// Rewrites `args` (everything after `--`). Flags the jailer does not know are passed on
/// untouched; both `--flag value` and `--flag=value` forms are understood.
pub fn rewrite(args: &[String]) -> Result<JailedArgs, VmmArgsError> {
    let mut out = JailedArgs::default();
    let mut used_names: Vec<String> = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let (flag, inline_value) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let takes_path = matches!(
            flag.as_str(),
            "--kernel" | "--initrd" | "--disk" | "--serial" | "--api-sock" | "--vsock" | "--config"
        );
        if !takes_path {
            out.args.push(arg.clone());
            i += 1;
            continue;
        }
        if flag == "--config" {
            return Err(VmmArgsError::ConfigFile);
        }
        let value = match inline_value {
            Some(v) => v,
            None => {
                i += 1;
                args.get(i)
                    .cloned()
                    .ok_or_else(|| VmmArgsError::MissingValue(flag.clone()))?
            }
        };
        let new_value = match flag.as_str() {
            "--kernel" | "--initrd" => {
                let target = image_target(&flag, &value, &mut used_names)?;
                out.binds.push(Bind {
                    source: PathBuf::from(&value),
                    target: target.clone(),
                    read_only: true,
                });
                target.display().to_string()
            }
            "--disk" => {
                let (path, read_only) = match value.strip_suffix(":ro") {
                    Some(p) => (p.to_string(), true),
                    None => (value.clone(), false),
                };
                let target = image_target(&flag, &path, &mut used_names)?;
                out.binds.push(Bind {
                    source: PathBuf::from(&path),
                    target: target.clone(),
                    read_only,
                });
                format!("{}{}", target.display(), if read_only { ":ro" } else { "" })
            }
            "--serial" => match value.strip_prefix("file:") {
                Some(path) => {
                    let name = file_name(&flag, path)?;
                    let target = Path::new("/run").join(name);
                    out.binds.push(Bind {
                        source: PathBuf::from(path),
                        target: target.clone(),
                        read_only: false,
                    });
                    format!("file:{}", target.display())
                }
                None => value.clone(),
            },
            "--api-sock" => {
                let name = file_name(&flag, &value)?;
                let target = Path::new("/run").join(name);
                out.api_socket = Some((PathBuf::from(&value), target.clone()));
                target.display().to_string()
            }
            // CID:SOCKET: the VMM makes its socket (and connects to SOCKET_<port>) in the
            // jail's /run, which the host reaches under the jail directory.
            "--vsock" => match value.split_once(':') {
                Some((cid, path)) => {
                    let name = file_name(&flag, path)?;
                    format!("{cid}:{}", Path::new("/run").join(name).display())
                }
                None => value.clone(),
            },
            _ => unreachable!("flag list above"),
        };
        out.args.push(flag);
        out.args.push(new_value);
        i += 1;
    }
    Ok(out)
}

fn file_name<'a>(flag: &str, path: &'a str) -> Result<&'a str, VmmArgsError> {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| VmmArgsError::NoFileName {
            flag: flag.to_string(),
            path: path.to_string(),
        })
}

/// `/images/<name>`, made unique when two images share a file name.
fn image_target(flag: &str, path: &str, used: &mut Vec<String>) -> Result<PathBuf, VmmArgsError> {
    let base = file_name(flag, path)?;
    let mut name = base.to_string();
    let mut n = 1;
    while used.contains(&name) {
        n += 1;
        name = format!("{n}-{base}");
    }
    used.push(name.clone());
    Ok(Path::new("/images").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn image_paths_are_bound_into_images_and_rewritten() {
        let args = strings(&[
            "--kernel",
            "/var/lib/k/vmlinux",
            "--initrd=/var/lib/k/initrd.img",
            "--vcpus",
            "2",
            "--disk",
            "/srv/a/root.ext4:ro",
            "--disk",
            "/srv/b/root.ext4",
        ]);

        let jailed = rewrite(&args).unwrap();

        assert_eq!(
            jailed.args,
            strings(&[
                "--kernel",
                "/images/vmlinux",
                "--initrd",
                "/images/initrd.img",
                "--vcpus",
                "2",
                "--disk",
                "/images/root.ext4:ro",
                "--disk",
                "/images/2-root.ext4",
            ])
        );
        assert_eq!(jailed.binds.len(), 4);
        assert!(jailed.binds[2].read_only);
        assert!(!jailed.binds[3].read_only);
        assert_eq!(jailed.binds[3].source, PathBuf::from("/srv/b/root.ext4"));
    }

    #[test]
    fn api_socket_and_console_file_land_in_run() {
        let args = strings(&[
            "--api-sock",
            "/tmp/x/vm.sock",
            "--serial",
            "file:/tmp/x/console.log",
        ]);

        let jailed = rewrite(&args).unwrap();

        assert_eq!(
            jailed.args,
            strings(&[
                "--api-sock",
                "/run/vm.sock",
                "--serial",
                "file:/run/console.log"
            ])
        );
        assert_eq!(
            jailed.api_socket,
            Some((
                PathBuf::from("/tmp/x/vm.sock"),
                PathBuf::from("/run/vm.sock")
            ))
        );
        assert_eq!(jailed.binds[0].target, PathBuf::from("/run/console.log"));
    }

    #[test]
    fn the_vsock_socket_lands_in_run_with_its_cid() {
        let args = strings(&["--vsock", "3:/var/lib/genos/envs/a/vsock.sock"]);

        let jailed = rewrite(&args).unwrap();

        assert_eq!(jailed.args, strings(&["--vsock", "3:/run/vsock.sock"]));
        assert!(
            jailed.binds.is_empty(),
            "the VMM creates it; nothing to bind"
        );
    }

    #[test]
    fn serial_to_stdout_and_unknown_flags_pass_through() {
        let args = strings(&["--serial", "stdout", "--rng", "--cpu-template", "baseline"]);
        assert_eq!(rewrite(&args).unwrap().args, args);
    }

    #[test]
    fn a_path_flag_without_value_is_an_error() {
        assert_eq!(
            rewrite(&strings(&["--kernel"])),
            Err(VmmArgsError::MissingValue("--kernel".into()))
        );
    }

    #[test]
    fn config_files_are_refused_with_a_reason() {
        assert_eq!(
            rewrite(&strings(&["--config", "vm.json"])),
            Err(VmmArgsError::ConfigFile)
        );
    }
}
