//! Running the external tools the builder drives (make, debootstrap, mkfs.ext4, ...).
//!
//! Children inherit stderr and have their stdout redirected to our stderr, so their
//! progress is visible on the terminal while our stdout stays reserved for the
//! artifact path.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors from running external tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("required tool `{tool}` not found in PATH (install the Debian package `{package}`)")]
    Missing { tool: String, package: String },
    #[error("cannot start `{tool}`: {source}")]
    Spawn {
        tool: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed ({status}){hint}")]
    Failed {
        command: String,
        status: String,
        hint: String,
    },
}

/// Finds `tool` in PATH.
pub fn find(tool: &str) -> Option<PathBuf> {
    if tool.contains('/') {
        return Path::new(tool).is_file().then(|| PathBuf::from(tool));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    // Debian's PATH for non-root users lacks the sbin directories where mkfs and
    // debootstrap live; look there too.
    let extra = std::env::join_paths(["/usr/sbin", "/sbin"]).expect("static paths join");
    std::env::split_paths(&path)
        .chain(std::env::split_paths(&extra))
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Checks that every `(tool, debian package)` pair is installed.
pub fn require(tools: &[(&str, &str)]) -> Result<(), ToolError> {
    for (tool, package) in tools {
        if find(tool).is_none() {
            return Err(ToolError::Missing {
                tool: tool.to_string(),
                package: package.to_string(),
            });
        }
    }
    Ok(())
}

/// Renders a command line for messages.
pub fn describe(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    if text.len() > 200 {
        text.truncate(200);
        text.push_str("...");
    }
    text
}

/// Runs `cmd` with its output shown on our stderr; fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<(), ToolError> {
    run_with_hint(cmd, "")
}

/// Like [`run`], with `hint` appended to the failure message.
pub fn run_with_hint(cmd: &mut Command, hint: &str) -> Result<(), ToolError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    if let Ok(stderr) = io::stderr().as_fd().try_clone_to_owned() {
        cmd.stdout(Stdio::from(stderr));
    }
    cmd.stdin(Stdio::null());
    let status = cmd.status().map_err(|source| spawn_error(&tool, source))?;
    if status.success() {
        Ok(())
    } else {
        Err(ToolError::Failed {
            command: describe(cmd),
            status: status.to_string(),
            hint: hint.to_string(),
        })
    }
}

/// Runs `cmd` and returns its stdout; stderr is shown on ours.
pub fn output(cmd: &mut Command) -> Result<String, ToolError> {
    let tool = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| spawn_error(&tool, source))?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            command: describe(cmd),
            status: out.status.to_string(),
            hint: String::new(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn spawn_error(tool: &str, source: io::Error) -> ToolError {
    if source.kind() == io::ErrorKind::NotFound {
        ToolError::Missing {
            tool: tool.to_string(),
            package: package_hint(tool).to_string(),
        }
    } else {
        ToolError::Spawn {
            tool: tool.to_string(),
            source,
        }
    }
}

fn package_hint(tool: &str) -> &'static str {
    match Path::new(tool)
        .file_name()
        .and_then(OsStr::to_str)
        .unwrap_or(tool)
    {
        "debootstrap" => "debootstrap",
        "mkfs.ext4" | "e2fsck" | "debugfs" => "e2fsprogs",
        "busybox" => "busybox-static",
        "make" | "gcc" => "build-essential",
        "flex" => "flex",
        "bison" => "bison",
        "bc" => "bc",
        "tar" => "tar",
        "xz" => "xz-utils",
        "qemu-system-x86_64" => "qemu-system-x86",
        _ => "providing it",
    }
}

/// Free bytes available to unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points to writable
    // memory of the right size; statvfs initialises it when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it fully initialised `stat`.
    let stat = unsafe { stat.assume_init() };
    // The field types differ between libc targets, hence the conversions.
    #[allow(clippy::useless_conversion)]
    let free = u64::from(stat.f_bavail) * u64::from(stat.f_frsize);
    Ok(free)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_its_package() {
        let err = require(&[("sh", "dash"), ("genos-no-such-tool", "genos-pkg")]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "required tool `genos-no-such-tool` not found in PATH (install the Debian package `genos-pkg`)"
        );
    }

    #[test]
    fn failing_command_reports_its_status() {
        let err = run(Command::new("sh").args(["-c", "exit 3"])).unwrap_err();
        assert!(err.to_string().contains("exit status: 3"), "{err}");
    }

    #[test]
    fn free_bytes_of_root_is_positive() {
        assert!(free_bytes(Path::new("/")).unwrap() > 0);
    }
}
