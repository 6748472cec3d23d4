//! Command-line parsing: `genos-vmm` arguments (and an optional `--config` JSON file) into
//! a validated [`VmConfig`] plus the API socket path.
//!
//! The `--config` file is a [`ConfigPatch`]; flags given on the command line override its
//! fields (`--disk` flags replace the file's disk list). With a kernel the VM boots at
//! once; with only `--api-sock` the VMM waits to be configured over the API. Every error
//! is one line on stderr and exit status 2 ([`parse_or_exit`]).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Parser;

use crate::sandbox::seccomp::{SeccompMode, ThreadRole};
use crate::sandbox::SandboxOptions;

use crate::config::{
    ConfigError, ConfigPatch, CpuTemplate, DiskConfig, DisplaySize, NetConfig, SerialConfig,
    VmConfig, VsockConfig,
};

/// Exit status for bad arguments, configuration or files.
pub const EXIT_USAGE: i32 = 2;

/// `genos-vmm` command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "genos-vmm",
    version,
    about = "GenOS microVM monitor: boots one Linux VM on KVM",
    color = clap::ColorChoice::Never
)]
pub struct Args {
    /// Guest kernel (ELF vmlinux or bzImage); the VM boots at once.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Number of vCPUs (1..=32).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u64>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "N")]
    pub mem_mib: Option<u64>,
    /// virtio-blk disk backed by a raw image; `:ro` makes it read-only. Repeatable.
    #[arg(long, value_name = "PATH[:ro]")]
    pub disk: Vec<DiskConfig>,
    /// Adds a virtio-rng device.
    #[arg(long)]
    pub rng: bool,
    /// CPUID template: auto (host on real KVM, baseline on nested kvm_pvm), host, baseline.
    #[arg(long, value_name = "auto|host|baseline")]
    pub cpu_template: Option<CpuTemplate>,
    /// Where the guest console (COM1) goes.
    #[arg(long, value_name = "stdout|file:PATH|none")]
    pub serial: Option<SerialConfig>,
    /// Serve the control API on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,
    /// JSON configuration file (see docs/vmm-api.md); flags override its fields.
    #[arg(long, value_name = "FILE.json")]
    pub config: Option<PathBuf>,
    /// Adds a virtio-gpu display of this size.
    #[arg(long, value_name = "WIDTHxHEIGHT")]
    pub gpu: Option<DisplaySize>,
    /// Adds the virtio-input keyboard, tablet and touch screen.
    #[arg(long)]
    pub input: bool,
    /// Adds a virtio-net NIC on this existing TAP device (owned by the VMM's user).
    #[arg(long, value_name = "TAP[,mac=MAC]")]
    pub net: Option<NetConfig>,
    /// Adds a virtio-vsock device for guest CID (≥ 3) listening on the Unix socket SOCKET
    /// (host programs write `CONNECT <port>`; guest connections to port P reach SOCKET_P).
    #[arg(long, value_name = "CID:SOCKET")]
    pub vsock: Option<VsockConfig>,
    /// What the seccomp filters do with a system call off their lists (`log`: allow it
    /// and log it to the kernel log, for developing the filters; `off`: no filters).
    #[arg(long, value_name = "kill|log|off", default_value = "kill")]
    pub seccomp: SeccompMode,
    /// Test only: once its filter is installed, this thread makes a forbidden call.
    #[arg(long, value_name = "main|vcpu|api", hide = true)]
    pub seccomp_selftest: Option<ThreadRole>,
    /// Runs without Landlock file restrictions.
    #[arg(long)]
    pub no_landlock: bool,
    /// Restores the VM snapshotted in DIR (files `snapshot` and `memory`, see
    /// docs/snapshots.md) and runs it; only --serial, --api-sock and the sandbox options
    /// go with it.
    #[arg(long, value_name = "DIR")]
    pub restore: Option<PathBuf>,
}

impl Args {
    /// The fields the flags set, as a patch to lay over the `--config` file.
    fn to_patch(&self) -> ConfigPatch {
        ConfigPatch {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone().map(Some),
            cmdline: self.cmdline.clone(),
            vcpus: self.vcpus,
            mem_mib: self.mem_mib,
            disks: (!self.disk.is_empty()).then(|| self.disk.clone()),
            rng: self.rng.then_some(true),
            cpu_template: self.cpu_template,
            serial: self.serial.clone(),
            gpu: self.gpu.map(Some),
            input: self.input.then_some(true),
            net: self.net.clone().map(Some),
            vsock: self.vsock.clone().map(Some),
        }
    }
}

/// `--restore DIR`: the snapshot to run.
#[derive(Debug, PartialEq, Eq)]
pub struct Restore {
    /// The directory with the `snapshot` and `memory` files.
    pub dir: PathBuf,
    /// `--serial`: this VM's console instead of the snapshotted VM's.
    pub serial: Option<SerialConfig>,
}

/// What the VMM is asked to do.
#[derive(Debug, PartialEq, Eq)]
pub struct Launch {
    /// The VM to boot at once; `None` waits for `PUT /vm/config` on the API socket.
    pub config: Option<VmConfig>,
    /// The snapshot to restore at once (never with `config`).
    pub restore: Option<Restore>,
    /// Where to serve the control API.
    pub api_sock: Option<PathBuf>,
    /// seccomp and Landlock options.
    pub sandbox: SandboxOptions,
}

/// Errors in the command line or the files it names.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// clap's own error (unknown flag, bad value, `--help`, `--version`).
    #[error("{}", first_line(.0))]
    Args(#[from] clap::Error),
    /// The configuration (file, values or the files it names) is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Neither a kernel nor an API socket was given.
    #[error("nothing to run: give --kernel PATH (or a --config with a kernel) or --api-sock PATH")]
    NothingToRun,
    /// VM options were given without a kernel.
    #[error("VM options need a kernel (--kernel PATH); without one, configure the VM through --api-sock")]
    OptionsWithoutKernel,
    /// The API socket's directory does not exist.
    #[error("api socket {0}: directory does not exist")]
    ApiSockDir(PathBuf),
    /// VM options were given with `--restore`.
    #[error("--restore takes the VM from its snapshot: only --serial, --api-sock and the sandbox options go with it")]
    OptionsWithRestore,
    /// The `--restore` directory does not exist.
    #[error("--restore {0}: not a directory")]
    RestoreDir(PathBuf),
}

/// clap's message without the `error: ` prefix, usage and tips.
fn first_line(e: &clap::Error) -> String {
    let rendered = e.to_string();
    let line = rendered.lines().next().unwrap_or("invalid arguments");
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Parses `args` (program name first) into a [`Launch`], reading and validating every file.
pub fn parse<I, T>(args: I) -> Result<Launch, CliError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = Args::try_parse_from(args)?;
    let file = match &args.config {
        Some(path) => ConfigPatch::from_file(path)?,
        None => ConfigPatch::default(),
    };
    let merged = file.merge(args.to_patch());

    if let Some(sock) = &args.api_sock {
        let dir = match sock.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        if !dir.is_dir() {
            return Err(CliError::ApiSockDir(sock.clone()));
        }
    }

    if let Some(dir) = &args.restore {
        let mut vm_options = merged.clone();
        vm_options.serial = None;
        if !vm_options.is_empty() {
            return Err(CliError::OptionsWithRestore);
        }
        if !dir.is_dir() {
            return Err(CliError::RestoreDir(dir.clone()));
        }
        return Ok(Launch {
            config: None,
            restore: Some(Restore {
                dir: dir.clone(),
                serial: merged.serial,
            }),
            api_sock: args.api_sock,
            sandbox: SandboxOptions {
                seccomp: args.seccomp,
                selftest: args.seccomp_selftest,
                landlock: !args.no_landlock,
            },
        });
    }

    let config = if merged.kernel.is_some() {
        let config = merged.apply(None)?;
        config.validate()?;
        Some(config)
    } else if args.api_sock.is_none() {
        return Err(CliError::NothingToRun);
    } else if !merged.is_empty() {
        return Err(CliError::OptionsWithoutKernel);
    } else {
        None
    };
    Ok(Launch {
        config,
        restore: None,
        api_sock: args.api_sock,
        sandbox: SandboxOptions {
            seccomp: args.seccomp,
            selftest: args.seccomp_selftest,
            landlock: !args.no_landlock,
        },
    })
}

/// Parses the process's arguments. `--help` and `--version` print and exit 0; any error
/// prints `genos-vmm: <reason>` (one line) to stderr and exits with status 2.
pub fn parse_or_exit() -> Launch {
    match parse(std::env::args_os()) {
        Ok(launch) => launch,
        Err(CliError::Args(e)) if !e.use_stderr() => {
            // --help / --version: clap prints to stdout.
            let _ = e.print();
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("genos-vmm: {e}");
            std::process::exit(EXIT_USAGE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempfile::TempFile;

    fn parse_args(args: &[&str]) -> Result<Launch, CliError> {
        parse(std::iter::once("genos-vmm").chain(args.iter().copied()))
    }

    fn path_str(file: &TempFile) -> &str {
        file.as_path().to_str().unwrap()
    }

    #[test]
    fn restore_takes_a_directory_and_a_console() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-cli-").unwrap();
        let dir_str = dir.as_path().to_str().unwrap();

        let launch = parse_args(&["--restore", dir_str, "--serial", "none"]).unwrap();

        assert_eq!(
            launch.restore,
            Some(Restore {
                dir: dir.as_path().to_owned(),
                serial: Some(SerialConfig::None),
            })
        );
        assert_eq!(launch.config, None);
    }

    #[test]
    fn restore_refuses_vm_options_and_a_missing_directory() {
        let dir = vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/genos-cli-").unwrap();
        let dir_str = dir.as_path().to_str().unwrap();

        let with_options = parse_args(&["--restore", dir_str, "--mem-mib", "64"]).unwrap_err();
        let missing = parse_args(&["--restore", "/nonexistent/snap"]).unwrap_err();

        assert!(matches!(with_options, CliError::OptionsWithRestore));
        assert_eq!(
            missing.to_string(),
            "--restore /nonexistent/snap: not a directory"
        );
    }

    #[test]
    fn kernel_alone_boots_with_defaults() {
        let kernel = TempFile::new().unwrap();
        let launch = parse_args(&["--kernel", path_str(&kernel)]).unwrap();
        assert_eq!(launch.config, Some(VmConfig::new(kernel.as_path())));
        assert_eq!(launch.api_sock, None);
    }

    #[test]
    fn every_flag_lands_in_the_config() {
        let kernel = TempFile::new().unwrap();
        let initrd = TempFile::new().unwrap();
        let disk_a = TempFile::new().unwrap();
        let disk_b = TempFile::new().unwrap();
        let ro = format!("{}:ro", path_str(&disk_b));
        let launch = parse_args(&[
            "--kernel",
            path_str(&kernel),
            "--initrd",
            path_str(&initrd),
            "--cmdline",
            "console=ttyS0 quiet",
            "--vcpus",
            "4",
            "--mem-mib",
            "512",
            "--disk",
            path_str(&disk_a),
            "--disk",
            &ro,
            "--rng",
            "--cpu-template",
            "baseline",
            "--serial",
            "none",
            "--api-sock",
            "/tmp/genos-test.sock",
            "--gpu",
            "1280x800",
            "--input",
        ])
        .unwrap();
        let config = launch.config.unwrap();
        assert_eq!(config.initrd.as_deref(), Some(initrd.as_path()));
        assert_eq!(config.cmdline, "console=ttyS0 quiet");
        assert_eq!(config.vcpus, 4);
        assert_eq!(config.mem_mib, 512);
        assert_eq!(
            config.disks,
            vec![
                DiskConfig {
                    path: disk_a.as_path().into(),
                    read_only: false
                },
                DiskConfig {
                    path: disk_b.as_path().into(),
                    read_only: true
                },
            ]
        );
        assert!(config.rng && config.input);
        assert_eq!(config.cpu_template, CpuTemplate::Baseline);
        assert_eq!(config.serial, SerialConfig::None);
        assert_eq!(
            config.gpu,
            Some(DisplaySize {
                width: 1280,
                height: 800
            })
        );
        assert_eq!(
            launch.api_sock.as_deref(),
            Some(std::path::Path::new("/tmp/genos-test.sock"))
        );
    }

    #[test]
    fn a_config_rendered_as_flags_parses_back_to_itself() {
        let kernel = TempFile::new().unwrap();
        let initrd = TempFile::new().unwrap();
        let disk_a = TempFile::new().unwrap();
        let disk_b = TempFile::new().unwrap();
        let mut full = VmConfig::new(kernel.as_path());
        full.initrd = Some(initrd.as_path().into());
        full.cmdline = "console=ttyS0 ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off".into();
        full.vcpus = 3;
        full.mem_mib = 768;
        full.disks = vec![
            DiskConfig {
                path: disk_a.as_path().into(),
                read_only: false,
            },
            DiskConfig {
                path: disk_b.as_path().into(),
                read_only: true,
            },
        ];
        full.rng = true;
        full.cpu_template = CpuTemplate::Baseline;
        full.serial = SerialConfig::File(std::env::temp_dir().join("console.log"));
        full.gpu = Some(DisplaySize {
            width: 1280,
            height: 800,
        });
        full.input = true;
        full.net = Some("tap0,mac=06:00:ac:10:00:09".parse().unwrap());
        full.vsock = Some(VsockConfig {
            guest_cid: 3,
            uds_path: std::env::temp_dir().join("genos-cli-test.vsock"),
        });
        let minimal = VmConfig::new(kernel.as_path());

        for config in [full, minimal] {
            let args = config.to_cli_args();
            let launch = parse(std::iter::once("genos-vmm".into()).chain(args)).unwrap();
            assert_eq!(launch.config.as_ref(), Some(&config));
        }
    }

    #[test]
    fn vsock_takes_a_cid_of_3_or_more_and_a_socket_in_an_existing_directory() {
        let kernel = TempFile::new().unwrap();
        let k = path_str(&kernel);
        let sock = std::env::temp_dir().join("genos-cli-vsock.sock");

        let ok = parse_args(&["--kernel", k, "--vsock", &format!("3:{}", sock.display())]);
        let host_cid = parse_args(&["--kernel", k, "--vsock", "2:/tmp/v.sock"]).unwrap_err();
        let no_dir = parse_args(&["--kernel", k, "--vsock", "3:/nonexistent-dir/v.sock"]);

        let vsock = ok.unwrap().config.unwrap().vsock.unwrap();
        assert_eq!((vsock.guest_cid, vsock.uds_path), (3, sock));
        assert!(
            host_cid
                .to_string()
                .contains("vsock guest_cid must be between 3 and 4294967294, got 2"),
            "{host_cid}"
        );
        assert_eq!(
            no_dir.unwrap_err().to_string(),
            "vsock uds_path \"/nonexistent-dir/v.sock\": directory does not exist"
        );
    }

    #[test]
    fn api_sock_alone_waits_for_configuration() {
        let launch = parse_args(&["--api-sock", "/tmp/x.sock"]).unwrap();
        assert_eq!(launch.config, None);
    }

    #[test]
    fn config_file_is_merged_under_flags() {
        let kernel = TempFile::new().unwrap();
        let file = TempFile::new().unwrap();
        let json = format!(
            r#"{{"kernel":"{}","vcpus":2,"mem_mib":256,"rng":true,"serial":"none"}}"#,
            path_str(&kernel)
        );
        std::fs::write(file.as_path(), json).unwrap();
        let cfg_path = path_str(&file);
        let launch = parse_args(&["--config", cfg_path, "--vcpus", "8"]).unwrap();
        let config = launch.config.unwrap();
        assert_eq!(config.vcpus, 8, "flag wins");
        assert_eq!(config.mem_mib, 256, "file value kept");
        assert!(config.rng);
        assert_eq!(config.serial, SerialConfig::None);
    }

    #[test]
    fn config_file_errors_name_the_file() {
        let err = parse_args(&["--config", "/nonexistent/vm.json"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "config file /nonexistent/vm.json: No such file or directory (os error 2)"
        );
        let bad = TempFile::new().unwrap();
        std::fs::write(bad.as_path(), b"{\"kernel\": 5}").unwrap();
        let err = parse_args(&["--config", path_str(&bad)]).unwrap_err();
        assert!(
            err.to_string().contains("invalid type: integer `5`"),
            "{err}"
        );
        assert!(err.to_string().contains("line 1 column"), "{err}");
    }

    #[test]
    fn errors_are_one_line() {
        let kernel = TempFile::new().unwrap();
        let k = path_str(&kernel);
        let cases: &[(&[&str], &str)] = &[
            (
                &["--kernel", k, "--bogus"],
                "unexpected argument '--bogus' found",
            ),
            (
                &["--kernel", k, "--vcpus", "x"],
                "invalid value 'x' for '--vcpus <N>'",
            ),
            (
                &["--kernel", k, "--vcpus", "0"],
                "vcpus must be between 1 and 32, got 0",
            ),
            (
                &["--kernel", k, "--vcpus", "300"],
                "vcpus must be between 1 and 32, got 300",
            ),
            (
                &["--kernel", k, "--mem-mib", "1"],
                "mem_mib must be between",
            ),
            (
                &["--kernel", k, "--cpu-template", "fast"],
                "cpu_template must be auto, host or baseline",
            ),
            (
                &["--kernel", k, "--serial", "tty"],
                "serial must be stdout, none or file:PATH",
            ),
            (
                &["--kernel", k, "--gpu", "big"],
                "display size must look like WIDTHxHEIGHT",
            ),
            (
                &["--kernel", k, "--gpu", "10x10"],
                "display size must be between",
            ),
            (
                &["--kernel", k, "--disk", ":ro"],
                "disk must look like PATH or PATH:ro",
            ),
            (
                &["--kernel", k, "--disk", "/nonexistent.img"],
                "disk 0 /nonexistent.img: No such file",
            ),
            (
                &["--kernel", "/nonexistent/vmlinux"],
                "kernel /nonexistent/vmlinux: No such file",
            ),
            (
                &["--kernel", k, "--initrd", "/"],
                "initrd /: not a regular file",
            ),
            (&["--kernel"], "a value is required for '--kernel <PATH>'"),
            (&[], "nothing to run"),
            (&["--vcpus", "2"], "nothing to run"),
            (
                &["--api-sock", "/tmp/a.sock", "--vcpus", "2"],
                "VM options need a kernel",
            ),
            (
                &["--api-sock", "/nonexistent/dir/a.sock"],
                "api socket /nonexistent/dir/a.sock: directory",
            ),
        ];
        for (args, expected) in cases {
            let message = parse_args(args).unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{args:?}: {message:?} lacks {expected:?}"
            );
            assert!(
                !message.contains('\n'),
                "{args:?}: {message:?} is not one line"
            );
        }
    }

    #[test]
    fn sandbox_defaults_to_kill_and_landlock() {
        let launch = parse_args(&["--api-sock", "/tmp/x.sock"]).unwrap();
        assert_eq!(
            launch.sandbox,
            SandboxOptions {
                seccomp: SeccompMode::Kill,
                selftest: None,
                landlock: true
            }
        );
    }

    #[test]
    fn sandbox_flags_land_in_the_options() {
        let launch = parse_args(&[
            "--api-sock",
            "/tmp/x.sock",
            "--seccomp",
            "log",
            "--seccomp-selftest",
            "vcpu",
            "--no-landlock",
        ])
        .unwrap();
        assert_eq!(
            launch.sandbox,
            SandboxOptions {
                seccomp: SeccompMode::Log,
                selftest: Some(ThreadRole::Vcpu),
                landlock: false
            }
        );
        let err = parse_args(&["--api-sock", "/tmp/x.sock", "--seccomp", "warn"]).unwrap_err();
        assert!(
            err.to_string().contains("expected kill, log or off"),
            "{err}"
        );
    }

    #[test]
    fn help_is_not_reported_on_stderr() {
        let Err(CliError::Args(e)) = parse_args(&["--help"]) else {
            panic!("expected clap's help");
        };
        assert!(!e.use_stderr());
        assert!(e
            .to_string()
            .contains("--cpu-template <auto|host|baseline>"));
    }
}
