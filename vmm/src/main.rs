//! `genos-vmm` command-line front end: parse arguments, serve the control API if asked,
//! boot the VM if configured, run the event loop, exit with the VM's exit status
//! (statuses in `docs/vmm.md`).

use std::time::Instant;

use vmm::cli;
use vmm::rpc;
use vmm::vmm::{error_chain, Vmm};
use vmm::vstate::lifecycle::ExitStatus;

fn init_logging() {
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(false);
    // Parsing a filter costs start-up time; only do it when one is asked for.
    match std::env::var("RUST_LOG") {
        Ok(filter) => builder
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .init(),
        Err(_) => builder.with_max_level(tracing::Level::INFO).init(),
    }
}

fn run(vmm_start: Instant) -> ExitStatus {
    let launch = cli::parse_or_exit();
    if let Err(e) = vmm::sandbox::runtime::init(&launch.sandbox, launch.api_sock.as_deref()) {
        eprintln!("genos-vmm: {}", error_chain(&e));
        return ExitStatus::InternalError;
    }
    // Before any thread exists: SIGTERM/SIGINT get blocked and routed to the event loop.
    let mut vmm = match Vmm::new(vmm_start) {
        Ok(vmm) => vmm,
        Err(e) => {
            eprintln!("genos-vmm: {}", error_chain(&e));
            return ExitStatus::InternalError;
        }
    };
    let _api_thread = match &launch.api_sock {
        Some(path) => {
            let (sender, receiver) = match rpc::channel() {
                Ok(pair) => pair,
                Err(e) => {
                    eprintln!("genos-vmm: cannot create the API channel: {e}");
                    return ExitStatus::InternalError;
                }
            };
            if let Err(e) = vmm.attach_api(receiver) {
                eprintln!("genos-vmm: cannot watch the API channel: {e}");
                return ExitStatus::InternalError;
            }
            match vmm::api::server::start(path, sender) {
                Ok(handle) => Some(handle),
                Err(e) => {
                    eprintln!("genos-vmm: {}", error_chain(&e));
                    return ExitStatus::BadConfig;
                }
            }
        }
        None => None,
    };
    if let Some(restore) = &launch.restore {
        let (snapshot, memory) = vmm::snapshot::restore_dir_files(&restore.dir);
        let mut load = vmm_api::SnapshotLoad::new(snapshot, memory);
        load.resume_vm = true;
        load.serial = restore.serial.clone();
        if let Err(e) = vmm.restore_vm(&load) {
            eprintln!("genos-vmm: {}", error_chain(&e));
            return e.exit_status();
        }
    }
    if let Some(config) = launch.config {
        vmm.configure(config);
        if let Err(e) = vmm.start_vm() {
            eprintln!("genos-vmm: {}", error_chain(&e));
            return e.exit_status();
        }
    }
    let exit = vmm.run();
    if exit.status == ExitStatus::Ok {
        tracing::info!("VM ended: {}", exit.reason);
    } else {
        eprintln!("genos-vmm: VM ended: {}", exit.reason);
    }
    if let Some(path) = &launch.api_sock {
        // The socket is ours; a stale one would only make the next VMM clean up.
        let _ = std::fs::remove_file(path);
    }
    exit.status
}

fn main() {
    let vmm_start = Instant::now();
    init_logging();
    let status = run(vmm_start);
    // vCPU threads stuck in the kernel must not keep the process alive.
    std::process::exit(status.code());
}
