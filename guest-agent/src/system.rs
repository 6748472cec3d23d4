//! Whole-guest actions: the clock, the network interface and resolver, power, and the
//! set-up an agent running as PID 1 needs (the essential mounts).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use proto::agent::{ErrorCode, NetworkConfig, PowerAction};

/// Why a system action failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    #[error("setting the clock: {0}")]
    Clock(#[source] std::io::Error),
    #[error("{0:?} is not an interface name")]
    BadInterface(String),
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Command {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting {target}: {source}")]
    Mount {
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl SystemError {
    /// The protocol's error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            SystemError::BadInterface(_) => ErrorCode::InvalidArgument,
            SystemError::Clock(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                ErrorCode::PermissionDenied
            }
            _ => ErrorCode::Io,
        }
    }
}

/// Sets `CLOCK_REALTIME` to `utc_ns` nanoseconds after the Unix epoch.
pub fn set_time(utc_ns: u64) -> Result<(), SystemError> {
    let ts = libc::timespec {
        tv_sec: (utc_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (utc_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the timespec we pass and nothing else.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(SystemError::Clock(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `name` is a Linux interface name (at most 15 bytes, no `/`, space or `:`).
pub fn valid_interface(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

/// The `ip` invocations (arguments after `ip`) that apply `net`.
pub fn ip_commands(net: &NetworkConfig) -> Vec<Vec<String>> {
    let dev = net.interface.clone();
    let mut cmds = vec![
        vec!["link".into(), "set".into(), dev.clone(), "up".into()],
        vec![
            "addr".into(),
            "replace".into(),
            format!("{}/{}", net.address, net.prefix),
            "dev".into(),
            dev.clone(),
        ],
    ];
    if let Some(gw) = net.gateway {
        let family = if gw.is_ipv4() { "-4" } else { "-6" };
        cmds.push(vec![
            family.into(),
            "route".into(),
            "replace".into(),
            "default".into(),
            "via".into(),
            gw.to_string(),
            "dev".into(),
            dev,
        ]);
    }
    cmds
}

/// `/etc/resolv.conf` for `net`'s resolvers.
pub fn resolv_conf(net: &NetworkConfig) -> String {
    let mut text = String::from("# written by genos-agent from hostd's network plan\n");
    for r in &net.resolvers {
        text.push_str(&format!("nameserver {r}\n"));
    }
    text
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, contents: &str) -> Result<(), SystemError> {
    let tmp = path.with_extension("genos-tmp");
    let err = |source| SystemError::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, contents).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

fn run(program: &Path, args: &[String]) -> Result<(), SystemError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| SystemError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(SystemError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Configures the interface with `ip` and writes the resolver file (when resolvers are given).
pub fn configure_network(net: &NetworkConfig, ip: &Path, resolv: &Path) -> Result<(), SystemError> {
    if !valid_interface(&net.interface) {
        return Err(SystemError::BadInterface(net.interface.clone()));
    }
    for args in ip_commands(net) {
        run(ip, &args)?;
    }
    if !net.resolvers.is_empty() {
        write_atomic(resolv, &resolv_conf(net))?;
    }
    Ok(())
}

/// Powers off or reboots: `reboot(2)` as PID 1 (after `sync`), else through systemd.
pub fn power(action: PowerAction, pid1: bool, systemctl: &Path) -> Result<(), SystemError> {
    if pid1 {
        let cmd = match action {
            PowerAction::Poweroff => libc::RB_POWER_OFF,
            PowerAction::Reboot => libc::RB_AUTOBOOT,
        };
        // SAFETY: sync and reboot take no pointers; reboot returns only on failure.
        unsafe {
            libc::sync();
            libc::reboot(cmd);
        }
        return Err(SystemError::Spawn {
            command: "reboot(2)".into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let verb = match action {
        PowerAction::Poweroff => "poweroff",
        PowerAction::Reboot => "reboot",
    };
    run(systemctl, &[verb.to_owned()])
}

/// As PID 1: mounts `/proc`, `/sys` and `/dev` where nothing is mounted yet.
pub fn mount_essentials() -> Result<(), SystemError> {
    for (target, fstype, probe) in [
        ("/proc", "proc", "/proc/self"),
        ("/sys", "sysfs", "/sys/kernel"),
        ("/dev", "devtmpfs", "/dev/null"),
    ] {
        if Path::new(probe).exists() {
            continue;
        }
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (src, tgt, fs) = (c(fstype), c(target), c(fstype));
        // SAFETY: the strings are NUL-terminated and live across the call; no data argument.
        let rc =
            unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(SystemError::Mount {
                target,
                source: std::io::Error::last_os_error(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    fn net() -> NetworkConfig {
        NetworkConfig {
            interface: "eth0".into(),
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 2, 15)),
            prefix: 24,
            gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 2))),
            resolvers: vec![
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        }
    }

    #[test]
    fn network_plan_brings_the_link_up_then_address_then_route() {
        let cmds: Vec<String> = ip_commands(&net()).iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "link set eth0 up",
                "addr replace 10.0.2.15/24 dev eth0",
                "-4 route replace default via 10.0.2.2 dev eth0",
            ]
        );
        let no_gw = NetworkConfig {
            gateway: None,
            ..net()
        };
        assert_eq!(ip_commands(&no_gw).len(), 2);
    }

    #[test]
    fn resolv_conf_lists_every_resolver() {
        assert!(resolv_conf(&net()).ends_with("nameserver 10.0.2.3\nnameserver ::1\n"));
    }

    #[test]
    fn interface_names_that_could_be_options_or_paths_are_refused() {
        assert!(valid_interface("eth0") && valid_interface("enp0s3"));
        for bad in ["", "a/b", "eth0:1", "with space", "sixteen-chars-xx", ".."] {
            assert!(!valid_interface(bad), "{bad}");
        }
        let bad = NetworkConfig {
            interface: "a b".into(),
            ..net()
        };
        let err = configure_network(&bad, Path::new("/nonexistent"), Path::new("/nonexistent"))
            .unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument);
    }

    #[test]
    fn a_failing_ip_command_reports_its_stderr() {
        let dir = std::env::temp_dir().join(format!("genos-agent-ip-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("ip");
        std::fs::write(&fake, "#!/bin/sh\necho \"no such device $3\" >&2\nexit 1\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = configure_network(&net(), &fake, &dir.join("resolv.conf")).unwrap_err();
        assert!(err.to_string().contains("no such device eth0"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_working_ip_writes_the_resolver_file() {
        let dir = std::env::temp_dir().join(format!("genos-agent-ip-ok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let fake = dir.join("ip");
        std::fs::write(
            &fake,
            format!("#!/bin/sh\necho \"$@\" >> {}\n", log.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        configure_network(&net(), &fake, &dir.join("resolv.conf")).unwrap();
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), 3);
        assert!(std::fs::read_to_string(dir.join("resolv.conf"))
            .unwrap()
            .contains("nameserver 10.0.2.3"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
