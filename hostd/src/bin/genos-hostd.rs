//! `genos-hostd`: the GenOS host daemon. Serves the admin socket, runs the orchestrator.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hostd::admin::{self, AccessPolicy};
use hostd::config::Config;
use hostd::orchestrator::Orchestrator;

#[derive(Parser)]
#[command(name = "genos-hostd", version, about = "GenOS host daemon")]
struct Args {
    /// Configuration file (default: the built-in copy of configs/hostd.toml).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// State directory (default: $XDG_STATE_HOME/genos, else ~/.local/state/genos).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Stream a synthetic scene (no VM) to genos-view clients.
    ServeDemo(hostd::stream::demo::DemoArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Some(Cmd::ServeDemo(demo)) = args.command {
        return match hostd::stream::demo::run(demo) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        };
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.as_ref()),
    }
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("genos-hostd: {}", hostd::error_chain(e));
    ExitCode::FAILURE
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::embedded(),
    };
    let state_dir = cfg.state_dir(args.state_dir.as_deref())?;
    let socket = state_dir.join("admin.sock");
    let policy = AccessPolicy::new(&cfg.admin.group);
    let stream_cfg = cfg.stream.clone();
    let orch = Orchestrator::new(cfg, &state_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = admin::bind(&socket, &policy).await?;
        if stream_cfg.enabled {
            let stream_dir = state_dir.join("stream");
            let identity = hostd::stream::Identity::load_or_create(&stream_dir)?;
            let tokens = std::sync::Arc::new(hostd::stream::TokenKey::load_or_create(
                &stream_dir.join("token.key"),
            )?);
            let server_cfg = hostd::stream::ServerConfig {
                listen: stream_cfg.listen,
                usage: stream_cfg.encoder.into(),
                encoder_threads: stream_cfg.encoder_threads.fixed(),
                ..Default::default()
            };
            let server = hostd::stream::StreamServer::bind(server_cfg, &identity, tokens)?;
            tracing::info!(listen = %stream_cfg.listen, "stream server ready");
            orch.set_stream_server(std::sync::Arc::new(server))?;
        }
        orch.start().await?;
        tracing::info!(socket = %socket.display(), "genos-hostd ready");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let result = tokio::select! {
            r = admin::serve_on(orch, listener, policy) => r.map_err(|e| Box::new(e) as Box<dyn std::error::Error>),
            r = tokio::signal::ctrl_c() => r.map_err(Into::into),
            _ = term.recv() => Ok(()),
        };
        // VMMs keep running: the next hostd re-adopts them.
        let _ = std::fs::remove_file(&socket);
        result
    })
}
