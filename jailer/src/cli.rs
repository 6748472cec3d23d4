//! Command line of `genos-jailer`, turned into a validated [`Options`].

use std::path::PathBuf;

use clap::Parser;

use crate::cgroup::{self, Setting, Version};

/// Errors in the jailer's own arguments.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The id must be usable as a directory and cgroup name.
    #[error("--id {0:?}: use 1 to 64 letters, digits, '-' or '_'")]
    BadId(String),
    /// Refusing to run the VMM as root defeats the jail.
    #[error("--uid 0 / --gid 0: the VMM must run as an unprivileged user")]
    RootIds,
    /// A `--cgroup` value is malformed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// A `--rlimit` value is malformed.
    #[error("bad --rlimit {0:?}: expected no-file=N or fsize=N")]
    BadRlimit(String),
    /// No VMM arguments after `--`.
    #[error("no VMM arguments: put them after --")]
    NoVmmArgs,
    /// The command line does not parse (clap's message, with usage); only from [`try_parse`].
    #[error(transparent)]
    Usage(#[from] clap::Error),
}

#[derive(Parser, Debug)]
#[command(
    name = "genos-jailer",
    about = "Start one genos-vmm in its own namespaces, root, cgroups and unprivileged uid",
    after_help = "Paths given to the VMM after -- (--kernel, --initrd, --disk, --serial file:, --api-sock, --vsock CID:) are \
                  host paths; the jailer mounts them into the jail and rewrites the arguments."
)]
struct Args {
    /// Name of this VM: its jail directory and cgroup.
    #[arg(long)]
    id: String,
    /// Unprivileged user the VMM runs as.
    #[arg(long)]
    uid: u32,
    /// Unprivileged group the VMM runs as.
    #[arg(long)]
    gid: u32,
    /// Directory holding the jails (<base>/genos-vmm/<id>).
    #[arg(long, default_value = "/srv/genos-jail")]
    chroot_base: PathBuf,
    /// The VMM binary (default: genos-vmm beside this jailer).
    #[arg(long)]
    exec_file: Option<PathBuf>,
    /// Cgroup limit FILE=VALUE, e.g. memory.max=512M (v2) or memory.limit_in_bytes=512M (v1).
    #[arg(long = "cgroup", value_name = "FILE=VALUE")]
    cgroups: Vec<String>,
    /// Cgroup interface: 1 or 2 (default: v1 if its controllers are mounted, else v2).
    #[arg(long, value_parser = ["1", "2"])]
    cgroup_version: Option<String>,
    /// Parent cgroup of every jail.
    #[arg(long, default_value = "genos")]
    parent_cgroup: String,
    /// Join this network namespace (e.g. /var/run/netns/NAME) instead of a new empty one.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// Detach: new session, standard streams to /dev/null.
    #[arg(long)]
    daemonize: bool,
    /// Resource limit no-file=N or fsize=N (default no-file=2048).
    #[arg(long = "rlimit", value_name = "NAME=N")]
    rlimits: Vec<String>,
    /// Arguments for the VMM.
    #[arg(last = true)]
    vmm_args: Vec<String>,
}

/// A resource limit to set before exec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rlimit {
    /// RLIMIT_NOFILE.
    NoFile(u64),
    /// RLIMIT_FSIZE.
    FileSize(u64),
}

/// Validated jailer options.
#[derive(Clone, Debug)]
pub struct Options {
    pub id: String,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub exec_file: PathBuf,
    pub cgroups: Vec<Setting>,
    pub cgroup_version: Option<Version>,
    pub parent_cgroup: String,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub rlimits: Vec<Rlimit>,
    pub vmm_args: Vec<String>,
}

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Parses `argv`. Clap prints help and usage errors itself.
pub fn parse(argv: impl IntoIterator<Item = String>) -> Result<Options, CliError> {
    let args = Args::parse_from(argv);
    validate(args)
}

/// Parses `argv`, returning clap's errors rather than exiting (for tests).
pub fn try_parse(argv: &[&str]) -> Result<Options, CliError> {
    validate(Args::try_parse_from(argv)?)
}

fn validate(args: Args) -> Result<Options, CliError> {
    if !valid_name(&args.id) {
        return Err(CliError::BadId(args.id));
    }
    if !valid_name(&args.parent_cgroup) {
        return Err(CliError::BadId(args.parent_cgroup));
    }
    if args.uid == 0 || args.gid == 0 {
        return Err(CliError::RootIds);
    }
    if args.vmm_args.is_empty() {
        return Err(CliError::NoVmmArgs);
    }
    let cgroups = args
        .cgroups
        .iter()
        .map(|s| Setting::parse(s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut rlimits = Vec::new();
    for r in &args.rlimits {
        let bad = || CliError::BadRlimit(r.clone());
        let (name, value) = r.split_once('=').ok_or_else(bad)?;
        let value: u64 = value.parse().map_err(|_| bad())?;
        rlimits.push(match name {
            "no-file" => Rlimit::NoFile(value),
            "fsize" => Rlimit::FileSize(value),
            _ => return Err(bad()),
        });
    }
    if !rlimits.iter().any(|r| matches!(r, Rlimit::NoFile(_))) {
        rlimits.push(Rlimit::NoFile(2048));
    }
    let exec_file = match args.exec_file {
        Some(p) => p,
        None => std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("genos-vmm")))
            .unwrap_or_else(|| PathBuf::from("genos-vmm")),
    };
    Ok(Options {
        id: args.id,
        uid: args.uid,
        gid: args.gid,
        chroot_base: args.chroot_base,
        exec_file,
        cgroups,
        cgroup_version: args
            .cgroup_version
            .map(|v| if v == "1" { Version::V1 } else { Version::V2 }),
        parent_cgroup: args.parent_cgroup,
        netns: args.netns,
        daemonize: args.daemonize,
        rlimits,
        vmm_args: args.vmm_args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_command_line_is_understood() {
        let o = try_parse(&[
            "genos-jailer",
            "--id",
            "vm-1",
            "--uid",
            "1000",
            "--gid",
            "1000",
            "--cgroup",
            "memory.max=1G",
            "--rlimit",
            "fsize=1024",
            "--",
            "--kernel",
            "/k",
        ])
        .unwrap();
        assert_eq!(o.id, "vm-1");
        assert_eq!(o.cgroups[0].file, "memory.max");
        assert_eq!(
            o.rlimits,
            vec![Rlimit::FileSize(1024), Rlimit::NoFile(2048)]
        );
        assert_eq!(o.vmm_args, vec!["--kernel", "/k"]);
    }

    #[test]
    fn ids_that_could_escape_the_jail_directory_are_refused() {
        for id in ["../x", "a/b", "", "x y"] {
            let err = try_parse(&[
                "j", "--id", id, "--uid", "1", "--gid", "1", "--", "--kernel", "k",
            ])
            .unwrap_err()
            .to_string();
            assert!(err.contains("--id"), "{id}: {err}");
        }
    }

    #[test]
    fn running_the_vmm_as_root_is_refused() {
        let err = try_parse(&["j", "--id", "a", "--uid", "0", "--gid", "1", "--", "x"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unprivileged"), "{err}");
    }

    #[test]
    fn missing_vmm_arguments_are_reported() {
        let err = try_parse(&["j", "--id", "a", "--uid", "1", "--gid", "1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("after --"), "{err}");
    }
}
