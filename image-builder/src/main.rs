//! `genos-image`: builds and caches GenOS guest images.
//!
//! Every build command prints the artifact's path as the last line of stdout;
//! progress goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use image_builder::cache::Cache;
use image_builder::{initramfs, kernel, nested_test, rootfs};
use proto::spec::{Catalog, Spec};

#[derive(Parser)]
#[command(name = "genos-image", about = "Build and cache GenOS guest images")]
struct Cli {
    /// Cache directory (default: $GENOS_IMAGE_CACHE, else ~/.cache/genos/images).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

/// Which guest kernel (and initramfs) to build.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Flavour {
    /// The shipped guest kernel and busybox initramfs.
    Shipped,
    /// TEST ONLY, for nested kvm_pvm hosts: kernel with the syscall shim, agent as /init.
    NestedTest,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the guest kernel (vmlinux) from linux-source-6.1.
    Kernel {
        /// Kernel config fragment (default: the one built into this binary,
        /// configs/guest-kernel.config).
        #[arg(long, conflicts_with = "flavour")]
        config: Option<PathBuf>,
        /// Which kernel; nested-test is built from its own patched source tree and cached apart.
        #[arg(long, value_enum, default_value = "shipped")]
        flavour: Flavour,
        /// Parallel make jobs (default: number of CPUs).
        #[arg(long)]
        jobs: Option<usize>,
        /// Print bzImage's path instead of vmlinux's.
        #[arg(long)]
        bzimage: bool,
    },
    /// Build the initramfs (busybox, init, optional agent).
    Initramfs {
        /// Static busybox binary.
        #[arg(long, default_value = initramfs::DEFAULT_BUSYBOX)]
        busybox: PathBuf,
        /// Statically linked genos-agent to include as /sbin/genos-agent (nested-test:
        /// as /init, required).
        #[arg(long, required_if_eq("flavour", "nested-test"))]
        agent: Option<PathBuf>,
        /// Which initramfs; nested-test holds only the agent (PID 1), busybox for /init and root's account.
        #[arg(long, value_enum, default_value = "shipped")]
        flavour: Flavour,
    },
    /// Build the root filesystem image for an environment spec.
    Rootfs {
        /// Environment spec (JSON, as produced by `genos compose`).
        #[arg(long)]
        spec: PathBuf,
        /// Where to write the ext4 image.
        #[arg(long)]
        out: PathBuf,
        /// Catalog (default: the copy built in, from configs/catalog.toml).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Archive of the spec's base (default: the catalog's `mirror`; for debian-12
        /// $GENOS_DEBIAN_MIRROR when set).
        #[arg(long)]
        mirror: Option<String>,
        /// Signing keys of the base's archive (default: the catalog's `keyring`).
        #[arg(long)]
        keyring: Option<PathBuf>,
        /// genos-agent binary to install with its systemd service.
        #[arg(long)]
        agent: Option<PathBuf>,
    },
    /// List cached artifacts.
    Ls {
        /// Print the manifests as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove abandoned temporaries and all but the newest artifacts of each kind.
    Gc {
        /// Artifacts to keep per kind.
        #[arg(long, default_value_t = 1)]
        keep: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let mut message = err.to_string();
            let mut source = err.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !message.contains(&text) {
                    message.push_str(": ");
                    message.push_str(&text);
                }
                source = cause.source();
            }
            eprintln!("genos-image: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let cache = Cache::open(cli.cache_dir.as_deref())?;
    match cli.command {
        Cmd::Kernel {
            config,
            flavour,
            jobs,
            bzimage,
        } => {
            let mut options = match flavour {
                Flavour::Shipped => kernel::KernelOptions::default(),
                Flavour::NestedTest => nested_test::kernel_options(),
            };
            if let Some(path) = config {
                options.config_fragment = std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
            }
            if let Some(jobs) = jobs {
                options.jobs = jobs.max(1);
            }
            let artifact = kernel::build(&cache, &options)?;
            let path = if bzimage {
                artifact.dir.join("bzImage")
            } else {
                artifact.path()
            };
            println!("{}", path.display());
        }
        Cmd::Initramfs {
            busybox,
            agent,
            flavour,
        } => {
            let artifact = match (flavour, agent) {
                (Flavour::NestedTest, Some(agent)) => {
                    nested_test::build_initramfs(&cache, &busybox, &agent)?
                }
                (_, agent) => {
                    initramfs::build(&cache, &initramfs::InitramfsOptions { busybox, agent })?
                }
            };
            eprintln!(
                "genos-image: initramfs is {} bytes",
                artifact.manifest.size_bytes
            );
            println!("{}", artifact.path().display());
        }
        Cmd::Rootfs {
            spec,
            out,
            catalog,
            mirror,
            keyring,
            agent,
        } => {
            let text = std::fs::read_to_string(&spec)
                .map_err(|e| format!("reading {}: {e}", spec.display()))?;
            let spec = Spec::from_json(&text).map_err(|e| format!("{}: {e}", spec.display()))?;
            let mut options = rootfs::RootfsOptions {
                agent,
                mirror,
                keyring,
                ..Default::default()
            };
            if let Some(path) = catalog {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("reading {}: {e}", path.display()))?;
                options.catalog =
                    Catalog::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let artifact = rootfs::build(&cache, &spec, &options)?;
            rootfs::write_out(&artifact, &out, u64::from(spec.disk_gib))?;
            println!("{}", out.display());
        }
        Cmd::Ls { json } => {
            let artifacts = cache.list()?;
            if json {
                let manifests: Vec<_> = artifacts.iter().map(|a| &a.manifest).collect();
                println!("{}", serde_json::to_string_pretty(&manifests)?);
            } else {
                println!(
                    "{:<10} {:<16} {:>12} {:>9}  PATH",
                    "KIND", "HASH", "SIZE", "BUILD_S"
                );
                for a in &artifacts {
                    let m = &a.manifest;
                    println!(
                        "{:<10} {:<16} {:>12} {:>9.1}  {}",
                        m.kind.as_str(),
                        &m.input_hash[..16.min(m.input_hash.len())],
                        m.size_bytes,
                        m.build_seconds,
                        a.path().display()
                    );
                }
            }
        }
        Cmd::Gc { keep } => {
            for path in cache.gc(keep)? {
                println!("removed {}", path.display());
            }
        }
    }
    Ok(())
}
