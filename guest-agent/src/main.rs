//! `genos-agent`: parses the command line, does PID 1's set-up when it is PID 1, and runs
//! the server until killed. `genos-agent session` is the part started inside the user's X
//! session: it serves clipboard, display and the `session` stage to the system agent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use guest_agent::files::DEFAULT_MAX_FILE_SIZE;
use guest_agent::server::{Config, Role, Server, ServerError, DEFAULT_SESSION_SOCKET};
use guest_agent::users::Accounts;
use guest_agent::{system, transport};
use proto::agent::{VIRTIO_SERIAL_NAME, VSOCK_PORT};

/// The GenOS guest agent (protocol: docs/agent.md).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// AF_VSOCK port to listen on [default: 1024, the protocol's port].
    #[arg(long, conflicts_with = "no_vsock")]
    vsock_port: Option<u32>,
    /// Do not listen on AF_VSOCK.
    #[arg(long)]
    no_vsock: bool,
    /// Also listen on this Unix socket (tests).
    #[arg(long)]
    unix: Option<PathBuf>,
    /// virtio-serial port to serve [default: the port named org.genos.agent, if present].
    #[arg(long)]
    serial: Option<PathBuf>,
    /// Largest file a put or get may move, in bytes.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_SIZE)]
    max_file_size: u64,
    /// Running in the initramfs: `system` at once, power through reboot(2) (implied as PID 1).
    #[arg(long)]
    initramfs: bool,
    /// systemctl to ask for readiness and power.
    #[arg(long, default_value = "systemctl")]
    systemctl: PathBuf,
    /// `ip` (iproute2 or busybox) for network configuration.
    #[arg(long, default_value = "ip")]
    ip: PathBuf,
    /// Resolver file written by network configuration.
    #[arg(long, default_value = "/etc/resolv.conf")]
    resolv_conf: PathBuf,
    /// Directory holding passwd and group.
    #[arg(long, default_value = "/etc")]
    etc: PathBuf,
    /// Unix socket the session part (`genos-agent session`) connects to
    /// [default: /run/genos-agent/session.sock].
    #[arg(long, conflicts_with = "no_session_socket")]
    session_socket: Option<PathBuf>,
    /// Do not listen for a session part (clipboard and display stay off).
    #[arg(long)]
    no_session_socket: bool,
    /// The user, besides root, whose session part is accepted.
    #[arg(long, default_value = "genos")]
    session_user: String,
    /// Serve clipboard, display and the session stage from this X display directly
    /// ("" = $DISPLAY) instead of through a session part.
    #[arg(long)]
    x11: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// The user-session part: runs inside the X session (DISPLAY and XAUTHORITY from its
    /// environment) and serves clipboard, display and the session stage to the system
    /// agent over its session socket. Exits when the display closes.
    Session {
        /// The system agent's session socket.
        #[arg(long, default_value = DEFAULT_SESSION_SOCKET)]
        socket: PathBuf,
        /// The X display [default: $DISPLAY].
        #[arg(long, conflicts_with = "kiosk")]
        display: Option<String>,
        /// Under the kiosk (cage, Wayland): no X; `session` while the compositor answers
        /// and the parent (the kiosk app) runs, and the part ends with the app.
        #[arg(long)]
        kiosk: bool,
    },
}

/// The options of an agent that is PID 1. The kernel hands init every boot option it does
/// not know (`noxsave`, `nopcid`, ...) before the ones after `--` on its command line, and an
/// init that exits on them panics the kernel: those are dropped (said on the console), the
/// agent's own options are read from the first `-`-led argument on, and if even those do not
/// parse the agent runs on its defaults rather than take the guest down.
fn pid1_args(argv: Vec<std::ffi::OsString>) -> Args {
    if let Ok(args) = Args::try_parse_from(&argv) {
        return args;
    }
    let first_option = argv
        .iter()
        .skip(1)
        .position(|a| a.to_string_lossy().starts_with('-'))
        .map_or(argv.len(), |i| i + 1);
    let ignored: Vec<_> = argv[1..first_option]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if !ignored.is_empty() {
        eprintln!("genos-agent: ignoring kernel arguments {ignored:?}");
    }
    let own = std::iter::once(argv[0].clone()).chain(argv[first_option..].iter().cloned());
    Args::try_parse_from(own).unwrap_or_else(|e| {
        eprintln!("genos-agent: {e}; running on the defaults");
        Args::parse_from([argv[0].clone()])
    })
}

fn main() -> ExitCode {
    // SAFETY: getpid has no preconditions.
    let pid1 = unsafe { libc::getpid() } == 1;
    let args = if pid1 {
        pid1_args(std::env::args_os().collect())
    } else {
        Args::parse()
    };
    if pid1 {
        if let Err(e) = system::mount_essentials() {
            eprintln!("genos-agent: {e}");
        }
    }
    if let Some(Mode::Session {
        socket,
        display,
        kiosk,
    }) = args.mode
    {
        return run(session_config(socket, display, kiosk));
    }
    let serial = args.serial.or_else(|| {
        transport::find_virtio_port(VIRTIO_SERIAL_NAME, Path::new("/sys"), Path::new("/dev"))
    });
    let cfg = Config {
        vsock_port: (!args.no_vsock).then_some(args.vsock_port.unwrap_or(VSOCK_PORT)),
        vsock_required: args.vsock_port.is_some(),
        unix: args.unix,
        serial,
        max_file_size: args.max_file_size,
        systemctl: args.systemctl,
        ip: args.ip,
        resolv_conf: args.resolv_conf,
        accounts: Accounts { etc: args.etc },
        initramfs: pid1 || args.initramfs,
        role: Role::System,
        x11: args.x11,
        session_socket_required: args.session_socket.is_some(),
        // An initramfs has no desktop: no session socket unless one is asked for.
        session_socket: (!args.no_session_socket
            && (args.session_socket.is_some() || !(pid1 || args.initramfs)))
            .then(|| {
                args.session_socket
                    .unwrap_or_else(|| DEFAULT_SESSION_SOCKET.into())
            }),
        session_user: args.session_user,
        uplink: None,
        kiosk: false,
    };
    run(cfg)
}

/// The session part: no listener, no init system; the X display and the system agent's
/// session socket.
fn session_config(socket: PathBuf, display: Option<String>, kiosk: bool) -> Config {
    Config {
        vsock_port: None,
        vsock_required: false,
        unix: None,
        serial: None,
        max_file_size: 0,
        systemctl: "systemctl".into(),
        ip: "ip".into(),
        resolv_conf: "/etc/resolv.conf".into(),
        accounts: Accounts { etc: "/etc".into() },
        initramfs: false,
        role: Role::Session,
        x11: Some(display.unwrap_or_default()),
        session_socket: None,
        session_socket_required: false,
        session_user: String::new(),
        uplink: Some(socket),
        kiosk,
    }
}

fn run(cfg: Config) -> ExitCode {
    let result = Server::new(cfg).and_then(|mut server| server.run());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The session part's normal end: the user logged out.
        Err(e @ ServerError::DisplayGone(_)) => {
            eprintln!("genos-agent: {e}; the session part ends");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("genos-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<std::ffi::OsString> {
        std::iter::once("genos-agent")
            .chain(args.iter().copied())
            .map(Into::into)
            .collect()
    }

    #[test]
    fn as_pid1_kernel_options_before_its_own_are_ignored() {
        let args = pid1_args(argv(&["noxsave", "nopcid", "--initramfs", "--no-vsock"]));

        assert!(args.initramfs && args.no_vsock);
    }

    #[test]
    fn as_pid1_unparseable_options_leave_the_defaults() {
        let args = pid1_args(argv(&["noxsave", "--no-such-option"]));

        assert!(!args.initramfs && !args.no_vsock && args.vsock_port.is_none());
    }
}
