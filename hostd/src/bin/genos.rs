//! `genos`: the operator CLI. Talks to genos-hostd over its admin socket (found through
//! `--socket`, `GENOS_SOCKET`, or `$XDG_STATE_HOME/genos/admin.sock`, else
//! `~/.local/state/genos/admin.sock`); `compose` and `schema` work offline.
//!
//! Exit status: 0 success, 1 error, 2 bad usage, 3 the request needs an answer (a question
//! was printed), 4 the environment failed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use hostd::composer::{Composer, Defaults};
use hostd::config::admin_socket_path;
use hostd::error_chain;
use hostd::uds;
use proto::spec::{Catalog, Spec};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "genos", version, about = "Operate GenOS environments")]
struct Cli {
    /// Admin socket of genos-hostd.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Print the raw JSON answers.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Turn a request into a spec (or a question), offline. Prints JSON.
    Compose {
        text: String,
        /// Add the composer's reasoning.
        #[arg(long)]
        explain: bool,
        /// Ask the running hostd instead of composing locally.
        #[arg(long, conflicts_with = "config")]
        remote: bool,
        /// hostd configuration whose catalog and defaults to use (default: the built-in ones).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Compose, create, wait until ready, and print how to view it.
    Up {
        text: String,
        /// Seconds to wait for "ready".
        #[arg(long, default_value_t = 900)]
        timeout: u64,
    },
    /// Create an environment from a request or a spec file.
    Create {
        /// Plain-words request.
        #[arg(long, conflicts_with = "spec", required_unless_present = "spec")]
        text: Option<String>,
        /// Spec JSON file ("-" for stdin).
        #[arg(long)]
        spec: Option<PathBuf>,
    },
    /// List environments.
    #[command(alias = "ls")]
    List,
    /// Run a command in a ready environment's guest (through its agent): its output is
    /// printed as it ends, and genos exits with its status (128+N for signal N, 124 when
    /// it was killed for running past --timeout).
    Exec {
        name: String,
        /// Guest user to run as (default: root).
        #[arg(long, default_value = "")]
        user: String,
        /// Working directory (default: the user's home).
        #[arg(long, default_value = "")]
        cwd: String,
        /// Seconds before the command's process group is killed.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Pass this program's standard input to the command (at most 45 KiB).
        #[arg(long)]
        stdin: bool,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Copy a file into or out of a ready environment's guest (through its agent):
    /// `genos cp FILE NAME:PATH` or `genos cp NAME:PATH FILE` (`-` for stdout). A copy out
    /// appears at FILE only when complete.
    Cp {
        /// Source: a local file, or NAME:PATH in a guest.
        src: String,
        /// Destination: NAME:PATH in a guest, or a local file.
        dst: String,
        /// Guest user owning the file (default: root); a path outside that user's home needs
        /// --root.
        #[arg(long, default_value = "")]
        user: String,
        /// Allow a path outside the user's home.
        #[arg(long)]
        root: bool,
        /// Permission bits of a file copied in, in octal (default: the local file's).
        #[arg(long)]
        mode: Option<String>,
    },
    /// Show one environment.
    Show { name: String },
    /// Stop an environment's VM.
    Stop { name: String },
    /// Stop and delete an environment.
    #[command(alias = "rm")]
    Destroy { name: String },
    /// Mint a viewer token (`genos token NAME`), or revoke one (`genos token revoke TOKEN`).
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Token {
        #[command(subcommand)]
        cmd: Option<TokenCmd>,
        /// Environment to mint a token for.
        #[arg(required = true)]
        name: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// Comma-separated rights: view,input,clipboard,admin.
        #[arg(long, default_value = "view,input,clipboard")]
        rights: String,
        /// Print only the browser link, https://HOST:PORT/#env=..&token=.. (HOST: `[stream]
        /// public_host` of /etc/genos/hostd.toml if set, else the stream server's address).
        #[arg(long)]
        web: bool,
    },
    /// Daemon health: the checks hostd runs (store, image cache, stream server, KVM).
    Health,
    /// Check this host for GenOS (KVM, CPU, cgroups, nftables, memory, disk, image cache,
    /// time sync, stream port) and say what to fix; exits 1 when a check fails. Works
    /// without genos-hostd running.
    Doctor {
        /// hostd configuration (default: /etc/genos/hostd.toml if present, else built-in).
        #[arg(long)]
        config: Option<PathBuf>,
        /// State directory (default: the config's, else /var/lib/genos if present, else
        /// the XDG default hostd uses).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Image cache (default: $GENOS_IMAGE_CACHE, else /var/cache/genos/images if
        /// present, else ~/.cache/genos/images).
        #[arg(long)]
        image_cache: Option<PathBuf>,
        /// The host name viewers connect to, to check the stream port against (default: the
        /// config's `[stream] public_host`).
        #[arg(long)]
        public_host: Option<String>,
    },
    /// Prometheus metrics.
    Metrics,
    /// The audit log.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Print the spec's JSON Schema.
    Schema,
    /// The fleet of hosts this one belongs to (`[fleet]` in hostd.toml, docs/fleet.md);
    /// works from any node.
    Fleet {
        #[command(subcommand)]
        cmd: FleetCmd,
    },
}

#[derive(Subcommand)]
enum FleetCmd {
    /// List the nodes: address, state (ready, cordoned, draining, lost), capacity used and
    /// total after overcommit, environments running, placements claimed, labels. `*` marks
    /// the node that answered.
    Nodes,
    /// No new placements on NODE; what runs there stays.
    Cordon { node: String },
    /// Let placements choose NODE again (ends a cordon or a drain).
    Uncordon { node: String },
    /// No new placements on NODE; the environments it runs finish there.
    Drain { node: String },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Revoke a viewer token: it opens no new session, and sessions using it end at once.
    Revoke {
        /// The token, or its id (16 hex digits, as minting printed it).
        token: String,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Check the hash chain; exits 1 if it was tampered with.
    Verify,
    /// Show the newest entries.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
}

#[derive(Debug)]
enum CliError {
    Msg(String),
    Clarify,
    Failed(String),
    /// Exit with this status (a guest command's).
    Exit(u8),
}

impl From<uds::UdsError> for CliError {
    fn from(e: uds::UdsError) -> Self {
        let mut msg = error_chain(&e);
        if matches!(e, uds::UdsError::Connect { .. }) {
            msg.push_str(" (is genos-hostd running? set --socket or GENOS_SOCKET)");
        }
        CliError::Msg(msg)
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`genos list | head`) instead of panicking on EPIPE.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts has no
    // memory-safety preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("genos: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Msg(m)) => {
            eprintln!("genos: {m}");
            ExitCode::FAILURE
        }
        Err(CliError::Clarify) => ExitCode::from(3),
        Err(CliError::Failed(m)) => {
            eprintln!("genos: {m}");
            ExitCode::from(4)
        }
        Err(CliError::Exit(code)) => ExitCode::from(code),
    }
}

struct Client {
    socket: PathBuf,
}

/// Most stdin `genos exec --stdin` passes: what fits the admin socket's body limit as
/// base64, with room for the rest of the request.
const EXEC_STDIN_MAX: usize = (hostd::admin::MAX_REQUEST_BODY - 4096) / 4 * 3;

impl Client {
    async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> Result<Value, CliError> {
        self.call_within(method, uri, body, Duration::from_secs(60))
            .await
    }

    async fn call_within(
        &self,
        method: &str,
        uri: &str,
        body: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, CliError> {
        let r = uds::request(&self.socket, method, uri, body.as_ref(), timeout).await?;
        let v = r.json();
        if !r.ok() {
            let why = v["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into());
            return Err(CliError::Msg(why));
        }
        Ok(v)
    }

    async fn text(&self, uri: &str) -> Result<String, CliError> {
        let r = uds::request(&self.socket, "GET", uri, None, Duration::from_secs(30)).await?;
        if !r.ok() {
            return Err(CliError::Msg(
                r.json()["error"]
                    .as_str()
                    .unwrap_or("request failed")
                    .into(),
            ));
        }
        Ok(String::from_utf8_lossy(&r.body).into())
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let socket = admin_socket_path(cli.socket.as_deref()).ok_or_else(|| {
        CliError::Msg("no admin socket: set --socket, GENOS_SOCKET or HOME".into())
    })?;
    let client = Client { socket };
    let json_out = cli.json;
    match cli.cmd {
        Cmd::Compose {
            text,
            explain,
            remote,
            config,
        } => {
            let out: hostd::composer::ComposeOutput = if remote {
                let v = client
                    .call(
                        "POST",
                        "/v1/compose",
                        Some(json!({"text": text, "explain": explain})),
                    )
                    .await?;
                serde_json::from_value(v)
                    .map_err(|e| CliError::Msg(format!("unexpected answer from hostd: {e}")))?
            } else {
                let composer = match config {
                    None => Composer::new(Catalog::embedded(), Defaults::default()),
                    Some(p) => {
                        let cfg = hostd::config::Config::load(&p)
                            .map_err(|e| CliError::Msg(error_chain(&e)))?;
                        let catalog = cfg
                            .load_catalog()
                            .map_err(|e| CliError::Msg(error_chain(&e)))?;
                        Composer::new(catalog, cfg.composer)
                    }
                };
                composer.compose(&text).to_output(explain)
            };
            // Printed from the typed value so fields keep the spec's documented order.
            println!("{}", serde_json::to_string_pretty(&out).expect("json"));
        }
        Cmd::Schema => println!(
            "{}",
            serde_json::to_string_pretty(&Spec::json_schema()).expect("json")
        ),
        Cmd::Up { text, timeout } => up(&client, &text, timeout, json_out).await?,
        Cmd::Create { text, spec } => {
            let body = match (text, spec) {
                (Some(t), _) => json!({"text": t}),
                (None, Some(p)) => json!({"spec": read_spec(&p)?}),
                (None, None) => unreachable!("clap requires one"),
            };
            let v = client.call("POST", "/v1/envs", Some(body)).await?;
            if json_out {
                print_json(&v);
            }
            if let Some(q) = v.get("clarify") {
                if !json_out {
                    print_question(q);
                }
                return Err(CliError::Clarify);
            }
            if !json_out {
                println!(
                    "created {} ({})",
                    v["env"]["name"].as_str().unwrap_or("?"),
                    v["env"]["state"].as_str().unwrap_or("?")
                );
            }
        }
        Cmd::List => {
            let v = client.call("GET", "/v1/envs", None).await?;
            if json_out {
                print_json(&v);
            } else {
                let rows = |k: &str| v[k].as_array().cloned().unwrap_or_default();
                // Environments the fleet placed on other nodes say where, in REASON.
                let elsewhere = rows("elsewhere").into_iter().map(|mut e| {
                    let on = format!(
                        "on node {} ({})",
                        e["node"].as_str().unwrap_or("?"),
                        e["address"].as_str().unwrap_or("?")
                    );
                    e["reason"] = match e["reason"].as_str() {
                        Some(r) => json!(format!("{on}: {r}")),
                        None => json!(on),
                    };
                    e
                });
                print_table(
                    &rows("envs")
                        .into_iter()
                        .chain(elsewhere)
                        .collect::<Vec<_>>(),
                );
                if let Some(why) = v["elsewhere_unavailable"].as_str() {
                    eprintln!("genos: other nodes' environments not listed: {why}");
                }
            }
        }
        Cmd::Show { name } => {
            let v = client
                .call("GET", &format!("/v1/envs/{}", enc(&name)), None)
                .await?;
            if json_out {
                print_json(&v);
            } else {
                print_env(&v["env"]);
            }
        }
        Cmd::Stop { name } => {
            let v = client
                .call("POST", &format!("/v1/envs/{}/stop", enc(&name)), None)
                .await?;
            done(&v, json_out, "stopped");
        }
        Cmd::Destroy { name } => {
            let v = client
                .call("DELETE", &format!("/v1/envs/{}", enc(&name)), None)
                .await?;
            done(&v, json_out, "destroyed");
        }
        Cmd::Token {
            cmd: Some(TokenCmd::Revoke { token }),
            ..
        } => {
            let v = client
                .call("POST", "/v1/tokens/revoke", Some(json!({ "token": token })))
                .await?;
            if json_out {
                print_json(&v);
            } else if v["already_revoked"].as_bool() == Some(true) {
                println!(
                    "token {} was already revoked",
                    v["token_id"].as_str().unwrap_or("?")
                );
            } else {
                println!("revoked token {}", v["token_id"].as_str().unwrap_or("?"));
            }
        }
        Cmd::Token {
            cmd: None,
            name,
            ttl,
            rights,
            web,
        } => {
            let name = name.expect("clap requires a name without a subcommand");
            let v = client
                .call(
                    "POST",
                    &format!("/v1/envs/{}/token", enc(&name)),
                    Some(json!({"ttl_s": ttl, "rights": rights})),
                )
                .await?;
            if web {
                let url = web_link(&v).ok_or_else(|| {
                    CliError::Msg(format!(
                        "hostd streams no screen for {name}: it has no display, or streaming is off"
                    ))
                })?;
                if json_out {
                    let mut v = v;
                    v["web_url"] = json!(url);
                    print_json(&v);
                } else {
                    println!("{url}");
                }
            } else if json_out {
                print_json(&v);
            } else {
                print_token(&v);
            }
        }
        Cmd::Exec {
            name,
            user,
            cwd,
            timeout,
            stdin,
            command,
        } => {
            use base64::Engine;
            use std::io::{Read, Write};
            let b64 = base64::engine::general_purpose::STANDARD;
            let input = if stdin {
                let mut buf = Vec::new();
                std::io::stdin()
                    .take(EXEC_STDIN_MAX as u64 + 1)
                    .read_to_end(&mut buf)
                    .map_err(|e| CliError::Msg(format!("reading stdin: {e}")))?;
                if buf.len() > EXEC_STDIN_MAX {
                    return Err(CliError::Msg(format!(
                        "stdin is over {} KiB, the most `genos exec --stdin` passes",
                        EXEC_STDIN_MAX / 1024
                    )));
                }
                Some(b64.encode(buf))
            } else {
                None
            };
            let body = json!({
                "argv": command, "user": user, "cwd": cwd, "timeout_s": timeout,
                "stdin_b64": input,
            });
            // The answer comes when the command ended: wait a little past its timeout.
            let v = client
                .call_within(
                    "POST",
                    &format!("/v1/envs/{}/exec", enc(&name)),
                    Some(body),
                    Duration::from_secs(timeout.saturating_add(30)),
                )
                .await?;
            if json_out {
                print_json(&v);
                return Ok(());
            }
            let decode = |field: &str| {
                b64.decode(v[field].as_str().unwrap_or_default())
                    .map_err(|e| CliError::Msg(format!("hostd sent a bad {field}: {e}")))
            };
            let (out, err) = (decode("stdout_b64")?, decode("stderr_b64")?);
            let _ = std::io::stdout().write_all(&out);
            let _ = std::io::stderr().write_all(&err);
            if let Some(n) = v["dropped"].as_u64().filter(|n| *n > 0) {
                eprintln!("genos: {n} bytes of output beyond the limit were not kept");
            }
            if v["timed_out"].as_bool() == Some(true) {
                eprintln!("genos: the command ran past {timeout} s and was killed");
                return Err(CliError::Exit(124));
            }
            let code = match (v["exit_code"].as_i64(), v["signal"].as_i64()) {
                (Some(c), _) => c.clamp(0, 255) as u8,
                (None, Some(sig)) => (128 + sig).clamp(0, 255) as u8,
                (None, None) => 1,
            };
            if code != 0 {
                return Err(CliError::Exit(code));
            }
        }
        Cmd::Cp {
            src,
            dst,
            user,
            root,
            mode,
        } => copy(&client, &src, &dst, &user, root, mode, json_out).await?,
        Cmd::Doctor {
            config,
            state_dir,
            image_cache,
            public_host,
        } => doctor(config, state_dir, image_cache, public_host, json_out)?,
        Cmd::Health => {
            let v = client.call("GET", "/v1/health", None).await?;
            if json_out {
                print_json(&v);
            } else {
                println!(
                    "{} (genos-hostd {}), {} environments, capacity {} vCPUs / {} MiB",
                    v["status"].as_str().unwrap_or("?"),
                    v["version"].as_str().unwrap_or("?"),
                    v["environments"],
                    v["capacity"]["vcpus"],
                    v["capacity"]["memory_mib"]
                );
                for c in v["checks"].as_array().into_iter().flatten() {
                    let verdict = c["verdict"].as_str().unwrap_or("?");
                    println!(
                        "  {:<4}  {:<11}  {}",
                        if verdict == "fail" { "FAIL" } else { verdict },
                        c["check"].as_str().unwrap_or("?"),
                        c["found"].as_str().unwrap_or("")
                    );
                    if let Some(fix) = c["fix"].as_str() {
                        println!("  {:<4}  {:<11}  fix: {fix}", "", "");
                    }
                }
            }
            if v["status"] == "failing" {
                return Err(CliError::Exit(1));
            }
        }
        Cmd::Metrics => print!("{}", client.text("/metrics").await?),
        Cmd::Fleet {
            cmd: FleetCmd::Nodes,
        } => {
            let v = client.call("GET", "/v1/fleet/nodes", None).await?;
            if json_out {
                print_json(&v);
            } else {
                print_nodes(v["nodes"].as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
        }
        Cmd::Fleet { cmd } => {
            let (verb, node) = match cmd {
                FleetCmd::Cordon { node } => ("cordon", node),
                FleetCmd::Uncordon { node } => ("uncordon", node),
                FleetCmd::Drain { node } => ("drain", node),
                FleetCmd::Nodes => unreachable!("matched above"),
            };
            let v = client
                .call(
                    "POST",
                    &format!("/v1/fleet/nodes/{}/{verb}", enc(&node)),
                    None,
                )
                .await?;
            if json_out {
                print_json(&v);
            } else {
                let n = &v["node"];
                let running = n["load"]["running"].as_u64().unwrap_or(0);
                match verb {
                    "uncordon" => println!("{node} takes new placements again"),
                    "cordon" => println!(
                        "{node} cordoned: no new placements; its {running} environments stay"
                    ),
                    _ => println!(
                        "{node} draining: no new placements; {running} environments still run there"
                    ),
                }
            }
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify,
        } => {
            let v = client.call("GET", "/v1/audit/verify", None).await?;
            if json_out {
                print_json(&v);
            }
            if v["ok"].as_bool() == Some(true) {
                if !json_out {
                    println!("audit log intact: {} entries", v["entries"]);
                }
            } else {
                return Err(CliError::Msg(format!(
                    "audit log TAMPERED: {}",
                    v["problem"].as_str().unwrap_or("unknown problem")
                )));
            }
        }
        Cmd::Audit {
            cmd: AuditCmd::List { limit },
        } => {
            let v = client
                .call("GET", &format!("/v1/audit?limit={limit}"), None)
                .await?;
            if json_out {
                print_json(&v);
            } else {
                for e in v["entries"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                    println!(
                        "{:>5} {} {:<10} {:<9} {:<16} {}",
                        e["seq"].to_string(),
                        e["ts"],
                        e["actor"].as_str().unwrap_or(""),
                        e["action"].as_str().unwrap_or(""),
                        e["target"].as_str().unwrap_or(""),
                        truncate(e["detail"].as_str().unwrap_or(""), 60)
                    );
                }
            }
        }
    }
    Ok(())
}

async fn up(client: &Client, text: &str, timeout: u64, json_out: bool) -> Result<(), CliError> {
    let v = client
        .call("POST", "/v1/envs", Some(json!({"text": text})))
        .await?;
    if let Some(q) = v.get("clarify") {
        if json_out {
            print_json(&v);
        } else {
            print_question(q);
        }
        return Err(CliError::Clarify);
    }
    let name = v["env"]["name"].as_str().unwrap_or_default().to_string();
    if !json_out {
        eprintln!("creating {name}: {}", summary(&v["env"]["spec"]));
        // What the composer assumed or could not do (an app the base cannot install) is
        // said before the wait, not found missing after it.
        for a in assumptions(&v["env"]["spec"]) {
            eprintln!("  assumed: {a}");
        }
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(timeout);
    let mut last = String::new();
    loop {
        let env = client
            .call("GET", &format!("/v1/envs/{}", enc(&name)), None)
            .await?;
        let state = env["env"]["state"].as_str().unwrap_or("?").to_string();
        // The state and what it is doing now (a build step, a boot stage), as it changes.
        let line = match env["progress"].as_str() {
            Some(p) => format!("{state}: {p}"),
            None => state.clone(),
        };
        if line != last && !json_out {
            eprintln!("  [{:>4} s] {line}", started.elapsed().as_secs());
            last = line;
        }
        match state.as_str() {
            "ready" => break,
            "failed" | "stopped" | "destroyed" => {
                return Err(CliError::Failed(format!(
                    "{name} {state}: {}",
                    env["env"]["reason"]
                        .as_str()
                        .unwrap_or("no reason recorded")
                )))
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "{name} was not ready after {timeout} s (still {state})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let tok = client
        .call(
            "POST",
            &format!("/v1/envs/{}/token", enc(&name)),
            Some(json!({})),
        )
        .await?;
    if json_out {
        print_json(&json!({"env": name, "token": tok}));
    } else {
        println!("{name} is ready.");
        print_token(&tok);
    }
    Ok(())
}

/// `NAME:PATH` of a guest, or `None` for a local path (one with a `/` before any `:`, or
/// no `:` at all, as scp reads it).
fn guest_path(arg: &str) -> Option<(&str, &str)> {
    let (name, path) = arg.split_once(':')?;
    (!name.is_empty() && !name.contains('/')).then_some((name, path))
}

/// How long a copy may go without progress before it is given up.
const COPY_IDLE: Duration = Duration::from_secs(120);

async fn copy(
    client: &Client,
    src: &str,
    dst: &str,
    user: &str,
    as_root: bool,
    mode: Option<String>,
    json_out: bool,
) -> Result<(), CliError> {
    let query = |name: &str, path: &str, mode: Option<&str>| {
        let mut q = format!(
            "/v1/envs/{}/files?path={}&user={}&as_root={as_root}",
            enc(name),
            enc(path),
            enc(user)
        );
        if let Some(m) = mode {
            q.push_str(&format!("&mode={}", enc(m)));
        }
        q
    };
    let failed = |status: u16, body: &[u8]| {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        CliError::Msg(
            v["error"]
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| format!("hostd answered {status}")),
        )
    };
    match (guest_path(src), guest_path(dst)) {
        (Some(_), Some(_)) => Err(CliError::Msg(
            "both sides are in a guest: copy through a local file".into(),
        )),
        (None, None) => Err(CliError::Msg(
            "neither side is in a guest: write one as NAME:PATH".into(),
        )),
        (None, Some((name, path))) => {
            use std::os::unix::fs::PermissionsExt;
            let file = tokio::fs::File::open(src)
                .await
                .map_err(|e| CliError::Msg(format!("{src}: {e}")))?;
            let meta = file
                .metadata()
                .await
                .map_err(|e| CliError::Msg(format!("{src}: {e}")))?;
            if !meta.is_file() {
                return Err(CliError::Msg(format!("{src} is not a regular file")));
            }
            let mode = mode.unwrap_or_else(|| format!("{:o}", meta.permissions().mode() & 0o7777));
            let uri = query(name, path, Some(&mode));
            let r = uds::upload(&client.socket, &uri, file, meta.len(), COPY_IDLE).await?;
            if !r.ok() {
                return Err(failed(r.status, &r.body));
            }
            if json_out {
                print_json(&r.json());
            }
            Ok(())
        }
        (Some((name, path)), None) => {
            if mode.is_some() {
                return Err(CliError::Msg(
                    "--mode applies to a copy into a guest (a copy out keeps the guest's mode)"
                        .into(),
                ));
            }
            let uri = query(name, path, None);
            if dst == "-" {
                use tokio::io::AsyncWriteExt;
                let mut out = tokio::io::stdout();
                let d = uds::download(&client.socket, &uri, &mut out, COPY_IDLE).await?;
                let _ = out.flush().await;
                if d.status >= 300 {
                    return Err(failed(d.status, &d.error_body));
                }
                return check_download(&d, name, path);
            }
            let target = PathBuf::from(dst);
            let target = if target.is_dir() {
                target.join(Path::new(path).file_name().ok_or_else(|| {
                    CliError::Msg(format!("{path} names no file to copy into {dst}"))
                })?)
            } else {
                target
            };
            // Written beside the target and renamed over it only when complete: a failed
            // copy never leaves a partial file under the name asked for.
            let dir = target
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let partial = dir.join(format!(
                ".{}.genos-cp-{}",
                target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id()
            ));
            let mut out = tokio::fs::File::create(&partial)
                .await
                .map_err(|e| CliError::Msg(format!("{}: {e}", partial.display())))?;
            let result = async {
                let d = uds::download(&client.socket, &uri, &mut out, COPY_IDLE).await?;
                if d.status >= 300 {
                    return Err(failed(d.status, &d.error_body));
                }
                check_download(&d, name, path)?;
                use std::os::unix::fs::PermissionsExt;
                let mode = d
                    .mode
                    .as_deref()
                    .and_then(|m| u32::from_str_radix(m, 8).ok())
                    .unwrap_or(0o644);
                out.set_permissions(std::fs::Permissions::from_mode(mode))
                    .await
                    .and(out.sync_all().await)
                    .map_err(|e| CliError::Msg(format!("{}: {e}", partial.display())))?;
                tokio::fs::rename(&partial, &target)
                    .await
                    .map_err(|e| CliError::Msg(format!("{}: {e}", target.display())))?;
                if json_out {
                    print_json(&json!({"path": target, "size": d.written, "mode": d.mode}));
                }
                Ok(())
            }
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&partial).await;
            }
            result
        }
    }
}

/// Whether a download of `name:path` arrived whole.
fn check_download(d: &uds::Download, name: &str, path: &str) -> Result<(), CliError> {
    match d.length {
        Some(n) if n == d.written => Ok(()),
        Some(n) => Err(CliError::Msg(format!(
            "the copy of {name}:{path} was cut short after {} of {n} bytes (see hostd's log)",
            d.written
        ))),
        None => Err(CliError::Msg("hostd sent no Content-Length".into())),
    }
}

fn read_spec(p: &Path) -> Result<Value, CliError> {
    let text = if p == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CliError::Msg(format!("stdin: {e}")))?
    } else {
        std::fs::read_to_string(p).map_err(|e| CliError::Msg(format!("{}: {e}", p.display())))?
    };
    let spec =
        Spec::from_json(&text).map_err(|e| CliError::Msg(format!("{}: {e}", p.display())))?;
    Ok(serde_json::to_value(spec).expect("json"))
}

fn enc(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `genos doctor`: gathers the host's facts, prints each check's finding, fails on a failed
/// check. Paths default to the appliance's when they exist (docs/appliance.md).
fn doctor(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    image_cache: Option<PathBuf>,
    public_host: Option<String>,
    json_out: bool,
) -> Result<(), CliError> {
    use hostd::doctor;
    let msg = |e: &dyn std::error::Error| CliError::Msg(error_chain(e));
    let config = config.or_else(|| {
        let etc = PathBuf::from("/etc/genos/hostd.toml");
        etc.is_file().then_some(etc)
    });
    let cfg = match &config {
        Some(p) => hostd::config::Config::load(p).map_err(|e| msg(&e))?,
        None => hostd::config::Config::embedded(),
    };
    let appliance = |p: &str| Some(PathBuf::from(p)).filter(|p| p.is_dir());
    let state_dir = match state_dir {
        Some(d) => d,
        None if !cfg.state_dir.is_empty() => PathBuf::from(&cfg.state_dir),
        None => match appliance("/var/lib/genos") {
            Some(d) => d,
            None => cfg.state_dir(None).map_err(|e| msg(&e))?,
        },
    };
    let cache_dir = image_cache
        .or_else(|| std::env::var_os("GENOS_IMAGE_CACHE").map(PathBuf::from))
        .or_else(|| appliance("/var/cache/genos/images"))
        .or_else(doctor::image_cache_dir)
        .ok_or_else(|| CliError::Msg("no image cache: set --image-cache or HOME".into()))?;
    let facts = doctor::gather(&doctor::DoctorInputs {
        config: &cfg,
        state_dir: &state_dir,
        cache_dir: &cache_dir,
        public_host: public_host.as_deref(),
    });
    let findings = doctor::check_all(&facts);
    if json_out {
        print_json(&json!({
            "config": config.as_ref().map(|p| p.display().to_string()),
            "findings": findings,
        }));
    } else {
        println!(
            "genos doctor: config {}, state {}, image cache {}",
            config
                .as_ref()
                .map_or("built-in".into(), |p| p.display().to_string()),
            state_dir.display(),
            cache_dir.display()
        );
        print!("{}", doctor::render(&findings));
    }
    if doctor::worst(&findings) == doctor::Verdict::Fail {
        return Err(CliError::Exit(1));
    }
    Ok(())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

fn print_question(q: &Value) {
    println!("{}", q["question"].as_str().unwrap_or(""));
    for o in q["options"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        println!("  - {}", o.as_str().unwrap_or(""));
    }
}

/// The browser link for a minted token (`genos token --web`): the stream server's
/// `genos://` link turned into `https://HOST:PORT/#env=..&token=..`, with `[stream]
/// public_host` from /etc/genos/hostd.toml as HOST when that file sets it.
fn web_link(v: &Value) -> Option<String> {
    if let Some(url) = v["web_url"].as_str() {
        return Some(url.to_owned());
    }
    let etc = PathBuf::from("/etc/genos/hostd.toml");
    let public_host = etc
        .is_file()
        .then(|| hostd::config::Config::load(&etc).ok())
        .flatten()
        .and_then(|c| c.stream.public_host);
    hostd::web::web_url_from_connect_url(v["url"].as_str()?, public_host.as_deref())
}

fn print_token(v: &Value) {
    println!(
        "viewer token for {} (expires at unix time {}):",
        v["env"].as_str().unwrap_or("?"),
        v["expires_at"]
    );
    println!("  {}", v["token"].as_str().unwrap_or(""));
    if let Some(id) = v["token_id"].as_str() {
        println!("  token id (to revoke it: genos token revoke {id})");
    }
    if let Some(fp) = v["cert_sha256"].as_str() {
        println!("  host certificate sha256: {fp}");
    }
    match v["url"].as_str() {
        Some(url) => {
            println!("view it with:");
            println!("  genos-view '{url}'");
            if let Some(web) = v["web_url"].as_str() {
                println!("or in a browser:");
                println!("  {web}");
            }
        }
        None => println!("  (hostd streams no screen for this environment: it has no display, or streaming is off)"),
    }
}

fn done(v: &Value, json_out: bool, what: &str) {
    if json_out {
        print_json(v);
    } else {
        println!("{what} {}", v["env"]["name"].as_str().unwrap_or("?"));
    }
}

fn summary(spec: &Value) -> String {
    let apps: Vec<&str> = spec["apps"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!(
        "{} {}, {} vCPUs, {} MiB, {} GiB disk, network {}{}",
        spec["base"].as_str().unwrap_or("?"),
        spec["desktop"].as_str().unwrap_or("?"),
        spec["vcpus"],
        spec["memory_mib"],
        spec["disk_gib"],
        spec["network"]["mode"].as_str().unwrap_or("?"),
        if apps.is_empty() {
            String::new()
        } else {
            format!(", apps {}", apps.join(" "))
        }
    )
}

fn print_table(envs: &[Value]) {
    println!(
        "{:<20} {:<10} {:>5} {:>8} {:<8} {:<24} REASON",
        "NAME", "STATE", "VCPUS", "MEM_MIB", "DESKTOP", "APPS"
    );
    for e in envs {
        let apps: Vec<&str> = e["spec"]["apps"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "{:<20} {:<10} {:>5} {:>8} {:<8} {:<24} {}",
            e["name"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            e["spec"]["vcpus"].to_string(),
            e["spec"]["memory_mib"].to_string(),
            e["spec"]["desktop"].as_str().unwrap_or(""),
            truncate(&apps.join(","), 24),
            e["reason"].as_str().unwrap_or("")
        );
    }
}

fn print_nodes(nodes: &[Value]) {
    println!(
        "{:<20} {:<24} {:<9} {:>9} {:>13} {:>5} {:>6} LABELS",
        "NAME", "ADDRESS", "STATE", "VCPUS", "MEM_MIB", "ENVS", "PLACED"
    );
    for n in nodes {
        let labels: Vec<String> = n["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        let name = format!(
            "{}{}",
            n["name"].as_str().unwrap_or(""),
            if n["this"] == true { " *" } else { "" }
        );
        println!(
            "{:<20} {:<24} {:<9} {:>9} {:>13} {:>5} {:>6} {}",
            name,
            n["address"].as_str().unwrap_or(""),
            n["state"].as_str().unwrap_or(""),
            format!("{}/{}", n["load"]["vcpus"], n["vcpus"]),
            format!("{}/{}", n["load"]["memory_mib"], n["memory_mib"]),
            n["load"]["running"].to_string(),
            n["placements"].to_string(),
            labels.join(",")
        );
    }
}

fn print_env(e: &Value) {
    println!("name:     {}", e["name"].as_str().unwrap_or(""));
    println!("state:    {}", e["state"].as_str().unwrap_or(""));
    if let Some(r) = e["reason"].as_str() {
        println!("reason:   {r}");
    }
    println!("spec:     {}", summary(&e["spec"]));
    if let Some(p) = e["vmm_pid"].as_i64() {
        println!("vmm pid:  {p}");
    }
    let assumptions = assumptions(&e["spec"]);
    if !assumptions.is_empty() {
        println!("assumed:");
        for a in assumptions {
            println!("  - {a}");
        }
    }
}

/// A spec's `assumptions`, as text.
fn assumptions(spec: &Value) -> Vec<&str> {
    spec["assumptions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}
