//! Launching an environment: provision (images, then boot) and the two ways to boot its
//! VMM, directly (configured over its control socket) or under genos-jailer (configured by
//! flags), then waiting for its API and for the guest to finish booting.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::agent::Stage;
use proto::spec::Spec;
use vmm_api::{LifecycleAction, Request};

use super::images::{ImageError, Images};
use super::jail::{
    cgroup_settings, exec_file, jailed_socket, read_jail_record, unjailed_socket, Jail, JailError,
    JailProblem, JailSetup, AGENT_SOCKET,
};
use super::supervise::{
    describe_exit, describe_jailed_exit, jailed_vmm_pidfd, last_line, Proc, SuperviseError,
};
use super::vm_config::{vm_config, VmConfigError, VmSettings};
use super::{create_private_dir, OrchError, Orchestrator};
use crate::agent::{AgentAddress, AgentClient};
use crate::config::ReadyWhen;
use crate::error_chain;
use crate::pidfd::Pidfd;
use crate::store::{EnvState, StoreError};
use crate::uds::VmmSocket;
use crate::vmm_client::{self, VmmClientError};

/// Why an environment could not be built and booted: the reason it fails with.
#[derive(Debug, thiserror::Error)]
pub(super) enum BootError {
    #[error(transparent)]
    Orch(#[from] OrchError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot create {}", path.display())]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot give {} to uid {uid}", path.display())]
    Chown {
        path: PathBuf,
        uid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Images(#[from] ImageError),
    #[error("cannot jail genos-vmm")]
    Unusable(#[source] JailProblem),
    #[error(transparent)]
    Jail(#[from] JailError),
    #[error("jail set-up task")]
    Task(#[source] tokio::task::JoinError),
    #[error(transparent)]
    VmConfig(#[from] VmConfigError),
    #[error(transparent)]
    Supervise(#[from] SuperviseError),
    #[error("genos-vmm")]
    Vmm(#[source] VmmClientError),
    #[error("{}", path.display())]
    JailedPid {
        path: PathBuf,
        #[source]
        source: SuperviseError,
    },
    #[error("genos-jailer wrote no pid file ({}) within {seconds} s", path.display())]
    NoPidFile { path: PathBuf, seconds: u64 },
    #[error("genos-vmm's control socket did not answer within {0} s")]
    ApiTimeout(u64),
    /// The VMM (or its jailer) ended during start-up: the reason its supervisor recorded.
    #[error("{0}")]
    Ended(String),
}

/// Creates the file `path` for writing.
fn create_file(path: PathBuf) -> Result<std::fs::File, BootError> {
    std::fs::File::create(&path).map_err(|source| BootError::Create { path, source })
}

impl Orchestrator {
    pub(super) fn spawn_provision(&self, name: String) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(reason) = me.provision(&name).await {
                me.fail(&name, &error_chain(&reason));
            }
        });
    }

    async fn provision(&self, name: &str) -> Result<(), BootError> {
        let env = self.show(name)?;
        self.transition(name, EnvState::Building, None)?;
        let dir = self.env_dir(name);
        create_private_dir(&dir).map_err(|source| BootError::Create {
            path: dir.clone(),
            source,
        })?;
        let images = self.build_images(name, &env.spec, &dir).await?;
        if !matches!(self.show(name).map(|e| e.state), Ok(EnvState::Building)) {
            return Ok(()); // stopped or destroyed meanwhile
        }
        self.transition(name, EnvState::Booting, None)?;
        self.set_progress(name, Some("starting genos-vmm".into()));
        let sock = self.boot(name, &env.spec, &dir, &images).await?;
        self.wait_ready(name, &sock).await;
        Ok(())
    }

    async fn boot(
        &self,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, BootError> {
        match &self.inner.jail {
            Jail::Off => self.boot_direct(name, spec, dir, images).await,
            Jail::On(setup) => {
                let setup = setup.clone();
                let r = self.boot_jailed(&setup, name, spec, dir, images).await;
                if r.is_err() && !self.procs().contains_key(name) {
                    // Nothing supervises the jail (it never started): release it here.
                    self.release_jail(name);
                }
                r
            }
            Jail::Unusable(why) => Err(BootError::Unusable(*why)),
        }
    }

    pub(super) fn graphical(&self, spec: &Spec) -> bool {
        self.catalog()
            .desktops
            .get(&spec.desktop)
            .is_some_and(|d| d.graphical)
    }

    /// Unjailed: genos-vmm with only its API socket, configured and started over it.
    async fn boot_direct(
        &self,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, BootError> {
        let vmm = &self.inner.cfg.vmm;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let socket = unjailed_socket(dir, unsafe { libc::geteuid() });
        let mut cmd = std::process::Command::new(&vmm.binary);
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(&vmm.extra_args)
            .stdout(create_file(dir.join("vmm.stdout"))?)
            .stderr(create_file(dir.join("vmm.log"))?);
        let proc = self.spawn_supervised(name, cmd, socket.clone(), false, describe_exit)?;
        let vmm_fd = proc
            .vmm
            .get()
            .expect("unjailed: the child is the VMM")
            .clone();
        let pid = self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))?;
        self.audit("hostd", "spawn", name, &format!("genos-vmm pid {pid}"))?;
        self.wait_api(name, &proc).await?;

        let config = vm_config(&VmSettings {
            spec,
            images,
            cpu_template: &vmm.cpu_template,
            cmdline: vmm.cmdline.clone(),
            console: dir.join("console.log"),
            graphical: self.graphical(spec),
            tap: None,
            vsock: dir.join(AGENT_SOCKET),
        });
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                self.kill_vmm(name);
                return Err(e.into());
            }
        };
        let started = vmm_client::run(&socket, Duration::from_secs(10), move |c| {
            c.send(&Request::Configure(config))?;
            c.send(&Request::Action(LifecycleAction::Start))
        })
        .await;
        match started {
            Ok(()) => Ok(socket),
            Err(e) => {
                if matches!(e, VmmClientError::Answer(_)) {
                    self.kill_vmm(name);
                }
                Err(BootError::Vmm(e))
            }
        }
    }

    /// Jailed: `genos-jailer ... -- genos-vmm` with the VM's configuration rendered as flags
    /// ([`VmConfig::to_cli_args`]: host paths the jailer rewrites; it takes no `--config`),
    /// so the VM boots at once; hostd only waits for the API.
    async fn boot_jailed(
        &self,
        setup: &JailSetup,
        name: &str,
        spec: &Spec,
        dir: &Path,
        images: &Images,
    ) -> Result<VmmSocket, BootError> {
        use proto::spec::NetworkMode;
        let cfg = &self.inner.cfg;
        let cmdline = cfg.vmm.cmdline.clone();

        // Network namespace first: the jailer joins it.
        let policy = match spec.network.mode {
            NetworkMode::None => None,
            NetworkMode::Nat => Some(jailer::net::Policy::Nat),
            NetworkMode::Allowlist => {
                Some(jailer::net::Policy::Allowlist(spec.network.allow.clone()))
            }
        };
        let (state_dir, env_name) = (self.inner.state_dir.clone(), name.to_string());
        let (jail_cfg, setup_c) = (cfg.jail.clone(), setup.clone());
        let allow = spec.network.allow.clone();
        let (record, addr) = tokio::task::spawn_blocking(move || {
            let net = match policy {
                None => None,
                Some(p @ jailer::net::Policy::Allowlist(_)) => {
                    let allowed =
                        jailer::net::resolve_allowlist(&allow, jailer::net::system_resolve)
                            .map_err(JailError::Allowlist)?;
                    Some((p, allowed))
                }
                Some(p) => Some((p, vec![])),
            };
            Self::allocate_jail(&state_dir, &env_name, &jail_cfg, &setup_c, net)
        })
        .await
        .map_err(BootError::Task)??;
        // The guest's address, route and resolver go through its agent once it answers
        // (`wait_agent`); the kernel's `ip=` would need CONFIG_IP_PNP, which is off.
        if let Some(addr) = &addr {
            self.audit(
                "hostd",
                "network",
                name,
                &format!(
                    "{:?} namespace {} guest {} gateway {}{}",
                    spec.network.mode,
                    addr.netns,
                    addr.guest,
                    addr.gateway,
                    if spec.network.allow.is_empty() {
                        String::new()
                    } else {
                        format!(" allow {}", spec.network.allow.join(","))
                    }
                ),
            )?;
        }

        // Files the VMM writes must be its uid's.
        let console = dir.join("console.log");
        create_file(console.clone())?;
        let mut owned = vec![console.clone()];
        owned.extend(images.rootfs.clone());
        for f in &owned {
            std::os::unix::fs::chown(f, Some(record.uid), Some(record.gid)).map_err(|source| {
                BootError::Chown {
                    path: f.clone(),
                    uid: record.uid,
                    source,
                }
            })?;
        }

        let config = vm_config(&VmSettings {
            spec,
            images,
            cpu_template: &cfg.vmm.cpu_template,
            cmdline,
            console,
            graphical: self.graphical(spec),
            // The jail's network namespace holds the TAP device, owned by the VMM's uid.
            tap: record.addressing().map(|a| a.tap),
            // Rewritten by the jailer into the jail's /run, beside the control socket.
            vsock: dir.join(AGENT_SOCKET),
        })?;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        let mut cmd = std::process::Command::new(&setup.binary);
        cmd.arg("--id")
            .arg(name)
            .arg("--uid")
            .arg(record.uid.to_string())
            .arg("--gid")
            .arg(record.gid.to_string())
            .arg("--chroot-base")
            .arg(&setup.chroot_base)
            .arg("--exec-file")
            .arg(exec_file(&cfg.vmm.binary))
            .arg("--parent-cgroup")
            .arg(&cfg.jail.parent_cgroup);
        for c in cgroup_settings(
            setup.cgroup_version,
            spec,
            cfg.jail.vmm_overhead_mib,
            cfg.jail.pids_max,
        ) {
            cmd.arg("--cgroup").arg(c);
        }
        match setup.cgroup_version {
            Some(jailer::cgroup::Version::V1) => cmd.args(["--cgroup-version", "1"]),
            Some(jailer::cgroup::Version::V2) => cmd.args(["--cgroup-version", "2"]),
            None => &mut cmd,
        };
        if let Some(a) = record.addressing() {
            cmd.arg("--netns")
                .arg(Path::new("/var/run/netns").join(&a.netns));
        }
        cmd.arg("--")
            .arg("--api-sock")
            .arg(&sock)
            .args(config.to_cli_args())
            .args(&cfg.vmm.extra_args)
            .stdout(create_file(dir.join("vmm.stdout"))?)
            .stderr(create_file(dir.join("vmm.log"))?);
        let log = dir.join("vmm.log");
        let proc =
            self.spawn_supervised(name, cmd, jailed_socket(&record), true, move |status| {
                describe_jailed_exit(status, &last_line(&log))
            })?;

        // The VMM's own pid comes from the jail's pid file.
        let pid_file = record.jail_dir.join("genos-vmm.pid");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.vmm.api_timeout_s);
        let pid = loop {
            let pid = std::fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                break pid;
            }
            self.still_starting(name, &proc, "genos-jailer", deadline, || {
                BootError::NoPidFile {
                    path: pid_file.clone(),
                    seconds: cfg.vmm.api_timeout_s,
                }
            })?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let jailer_pid = proc.jailer.as_ref().map_or(0, Pidfd::pid);
        let vmm_fd = match jailed_vmm_pidfd(pid, jailer_pid) {
            Ok(fd) => Arc::new(fd),
            Err(source) => {
                self.kill_vmm(name);
                return Err(BootError::JailedPid {
                    path: pid_file,
                    source,
                });
            }
        };
        let _ = proc.vmm.set(vmm_fd.clone());
        self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))?;
        self.audit(
            "hostd",
            "spawn",
            name,
            &format!(
                "genos-vmm pid {pid} jailed by genos-jailer pid {jailer_pid} as uid {} gid {} in {}",
                record.uid,
                record.gid,
                record.jail_dir.display()
            ),
        )?;
        self.wait_api(name, &proc).await?;
        Ok(proc.socket.clone())
    }

    /// Waits for the control socket to answer `GET /vm`, or the VMM to end.
    async fn wait_api(&self, name: &str, proc: &Proc) -> Result<(), BootError> {
        let timeout = self.inner.cfg.vmm.api_timeout_s;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let r = vmm_client::run(&proc.socket, Duration::from_secs(1), |c| c.describe()).await;
            if r.is_ok() {
                return Ok(());
            }
            self.still_starting(name, proc, "genos-vmm", deadline, || {
                BootError::ApiTimeout(timeout)
            })?;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One check of a start-up wait: fails once `proc` has ended (with the reason its
    /// supervisor recorded, else that `who` ended) and, once `deadline` has passed, kills
    /// it and fails with `late`.
    fn still_starting(
        &self,
        name: &str,
        proc: &Proc,
        who: &str,
        deadline: tokio::time::Instant,
        late: impl FnOnce() -> BootError,
    ) -> Result<(), BootError> {
        if *proc.exited.borrow() {
            // The supervisor has failed the environment with the exit's meaning.
            let reason = self.show(name).ok().and_then(|e| e.reason);
            return Err(BootError::Ended(
                reason.unwrap_or_else(|| format!("{who} ended during start-up")),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            self.kill_vmm(name);
            return Err(late());
        }
        Ok(())
    }

    /// Waits for the guest until `boot_timeout_s`: its boot-timer write (the kernel ran the
    /// initramfs), then with `[vmm] ready = "agent"` its agent's `system` stage over vsock.
    /// Ready, or failed saying how far the guest got.
    pub(super) async fn wait_ready(&self, name: &str, sock: &VmmSocket) {
        let timeout = Duration::from_secs(self.inner.cfg.vmm.boot_timeout_s);
        let deadline = tokio::time::Instant::now() + timeout;
        let mut booting = "the guest kernel is booting".to_string();
        if self.inner.nested_kvm && self.inner.cfg.vmm.ready == ReadyWhen::Agent {
            booting.push_str(&format!(
                "; {NESTED_KVM_NOTE}, so this environment will not become ready"
            ));
        }
        self.set_progress(name, Some(booting));
        let detail = match self.inner.cfg.vmm.ready {
            ReadyWhen::Boot => match self.wait_booted(name, sock, deadline, timeout).await {
                Some(boot_us) => format!("guest booted in {} ms", boot_us / 1000),
                None => return,
            },
            // The agent is what counts; the boot-timer write (which an initramfs without the
            // GenOS init does not make) is only recorded on the way.
            ReadyWhen::Agent => match self.wait_agent(name, sock, deadline, timeout).await {
                Some(agent) => format!("agent {agent}"),
                None => return,
            },
        };
        if let Ok(true) = self.transition(name, EnvState::Ready, None) {
            self.stream_environment(name, sock).await;
            let _ = self.store().touch(name);
            let _ = self.audit("hostd", "ready", name, &detail);
        }
    }

    /// Whether `name` is still booting; else makes sure no VMM is left (a stop that raced
    /// with the spawn may have found none to halt).
    fn still_booting(&self, name: &str) -> bool {
        let booting = matches!(self.show(name).map(|e| e.state), Ok(EnvState::Booting));
        if !booting {
            self.kill_vmm(name);
        }
        booting
    }

    /// Polls the VMM for the guest's boot-timer write; its time in µs, or None (failed or
    /// no longer booting).
    async fn wait_booted(
        &self,
        name: &str,
        sock: &VmmSocket,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Option<u64> {
        loop {
            if !self.still_booting(name) {
                return None;
            }
            let described = vmm_client::run(sock, Duration::from_secs(2), |c| c.describe()).await;
            if let Some(boot_us) = described.ok().and_then(|vm| vm.boot_time_us) {
                return Some(boot_us);
            }
            if tokio::time::Instant::now() > deadline {
                self.fail_boot(
                    name,
                    format!(
                        "the guest kernel did not reach its initramfs within {} s",
                        timeout.as_secs()
                    ),
                );
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Connects to the guest's agent (retrying while the guest boots, recording the
    /// boot-timer write when it comes) and waits for its `system` stage; the agent's name, or
    /// None (failed or no longer booting).
    async fn wait_agent(
        &self,
        name: &str,
        sock: &VmmSocket,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Option<String> {
        let address = AgentAddress::vm(sock.sibling(AGENT_SOCKET));
        let mut booted_at = None;
        let client = loop {
            if !self.still_booting(name) {
                return None;
            }
            if booted_at.is_none() {
                let described =
                    vmm_client::run(sock, Duration::from_secs(2), |c| c.describe()).await;
                if let Some(boot_us) = described.ok().and_then(|vm| vm.boot_time_us) {
                    booted_at = Some(tokio::time::Instant::now());
                    let booted = format!("guest booted in {} ms", boot_us / 1000);
                    let _ = self.audit("hostd", "booted", name, &booted);
                    self.set_progress(name, Some(format!("{booted}; waiting for its agent")));
                }
            }
            let why = match AgentClient::connect(&address, AGENT_CONNECT_TIMEOUT).await {
                Ok(client) => break client,
                Err(e) => error_chain(&e),
            };
            // Here no stock guest gets to its agent: say so within a minute of the boot.
            let nested_deadline = booted_at
                .filter(|_| self.inner.nested_kvm)
                .map(|t| t + NESTED_KVM_GRACE);
            if tokio::time::Instant::now() > nested_deadline.map_or(deadline, |n| n.min(deadline)) {
                let reason = if nested_deadline.is_some() {
                    format!(
                        "{NESTED_KVM_NOTE}: the guest kernel booted but its agent never answers \
                         ({why}); run environments on a real KVM server"
                    )
                } else {
                    format!(
                        "the guest agent did not answer within {} s ({why})",
                        timeout.as_secs()
                    )
                };
                self.fail_boot(name, reason);
                return None;
            }
            tokio::time::sleep(AGENT_RETRY).await;
        };
        self.set_progress(
            name,
            Some(format!(
                "agent {} answered; waiting for the guest's init system to reach its target",
                client.info().agent
            )),
        );
        let system = "the guest's init system did not reach its target";
        if !self
            .wait_stage(name, &client, Stage::System, deadline, timeout, system)
            .await
        {
            return None;
        }
        // The guest has no clock of its own it can trust: set it from the host's.
        let clock = match set_guest_clock(&client).await {
            Ok(()) => "clock set".to_string(),
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(env = name, error = %why, "setting the guest's clock failed");
                format!("clock not set: {why}")
            }
        };
        let mut agent = format!("{} ({clock}", client.info().agent);
        match self.configure_guest_network(name, &client).await {
            Ok(None) => agent.push(')'),
            Ok(Some(net)) => agent.push_str(&format!("; network {net})")),
            Err(reason) => {
                self.fail_boot(name, reason);
                return None;
            }
        }
        // A desktop is ready when the person would see it: its session runs.
        let graphical = self.show(name).is_ok_and(|e| self.graphical(&e.spec));
        if graphical {
            self.set_progress(
                name,
                Some("the guest is up; waiting for its desktop session".into()),
            );
            let session_timeout = Duration::from_secs(self.inner.cfg.vmm.session_timeout_s);
            let session_deadline = deadline.min(tokio::time::Instant::now() + session_timeout);
            let session = "the guest's desktop session did not start";
            if !self
                .wait_stage(
                    name,
                    &client,
                    Stage::Session,
                    session_deadline,
                    session_timeout.min(timeout),
                    session,
                )
                .await
            {
                return None;
            }
            agent.push_str(" reports the desktop session up");
        } else {
            agent.push_str(" reports the system up");
        }
        if let Some(proc) = self.procs().get(name) {
            *proc.agent.lock().expect("poisoned") = Some(client);
        }
        Some(agent)
    }

    /// Gives a `nat`/`allowlist` guest the network hostd planned for it through its agent;
    /// what was set (for the ready audit entry), nothing for a guest without a network, or
    /// why it failed (the environment cannot do what its spec asks without it).
    async fn configure_guest_network(
        &self,
        name: &str,
        client: &AgentClient,
    ) -> Result<Option<String>, String> {
        let Some((addressing, resolver)) =
            read_jail_record(&self.env_dir(name)).and_then(|r| Some((r.addressing()?, r.resolver)))
        else {
            return Ok(None);
        };
        // The namespace's resolver answers on the gateway address.
        let resolvers = if resolver {
            vec![addressing.gateway.into()]
        } else {
            vec![]
        };
        let net = super::guest::guest_network(&addressing, resolvers);
        let mut summary = format!(
            "{} {}/{} via {}",
            net.interface, net.address, net.prefix, addressing.gateway
        );
        if resolver {
            summary.push_str(&format!(", resolver {}", addressing.gateway));
        }
        self.set_progress(
            name,
            Some(format!("configuring the guest's network ({summary})")),
        );
        client
            .call_done(proto::agent::HostMessage::NetworkConfigure(net))
            .await
            .map_err(|e| {
                format!(
                    "the guest agent could not configure the network ({summary}): {}",
                    error_chain(&e)
                )
            })?;
        Ok(Some(summary))
    }

    /// Waits until the agent reports `stage` (true), or fails the environment (false):
    /// the agent went away, or `deadline` passed (saying `late` and the stage reached).
    async fn wait_stage(
        &self,
        name: &str,
        client: &AgentClient,
        stage: Stage,
        deadline: tokio::time::Instant,
        timeout: Duration,
        late: &str,
    ) -> bool {
        loop {
            if !self.still_booting(name) {
                return false;
            }
            let reached =
                tokio::time::timeout(Duration::from_secs(1), client.wait_for_stage(stage)).await;
            match reached {
                Ok(Ok(_)) => return true,
                Ok(Err(e)) => {
                    self.fail_boot(
                        name,
                        format!(
                            "the guest agent went away while the guest booted ({})",
                            error_chain(&e)
                        ),
                    );
                    return false;
                }
                Err(_) if tokio::time::Instant::now() > deadline => {
                    self.fail_boot(
                        name,
                        format!(
                            "{late} within {} s (the agent reports {})",
                            timeout.as_secs(),
                            client.stage().name()
                        ),
                    );
                    return false;
                }
                Err(_) => {}
            }
        }
    }

    fn fail_boot(&self, name: &str, reason: String) {
        self.fail(name, &reason);
        self.kill_vmm(name);
    }

    /// The guest agent of the ready environment `name`: the connection readiness made, or a
    /// new one when it dropped or hostd re-adopted the VMM.
    pub async fn agent(&self, name: &str) -> Result<AgentClient, OrchError> {
        let env = self.show(name)?;
        if env.state != EnvState::Ready {
            return Err(OrchError::WrongState {
                name: name.into(),
                action: "reach the agent of",
                state: env.state.as_str(),
            });
        }
        let proc = self
            .procs()
            .get(name)
            .cloned()
            .ok_or_else(|| OrchError::WrongState {
                name: name.into(),
                action: "reach the agent of",
                state: "not supervised by this hostd",
            })?;
        if let Some(client) = proc.agent.lock().expect("poisoned").as_ref() {
            if client.is_connected() {
                return Ok(client.clone());
            }
        }
        let address = AgentAddress::vm(proc.socket.sibling(AGENT_SOCKET));
        let client = AgentClient::connect(&address, AGENT_CONNECT_TIMEOUT)
            .await
            .map_err(|source| OrchError::Agent {
                name: name.into(),
                source,
            })?;
        *proc.agent.lock().expect("poisoned") = Some(client.clone());
        Ok(client)
    }
}

/// Sets the guest's clock to the host's (UTC) through its agent.
async fn set_guest_clock(client: &AgentClient) -> Result<(), crate::agent::AgentError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let utc_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
    client
        .call_done(proto::agent::HostMessage::TimeSet { utc_ns })
        .await
}

/// How long one attempt to reach the agent may take (connect, CONNECT, Hello).
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts while the guest boots.
const AGENT_RETRY: Duration = Duration::from_millis(500);
/// How long, on a nested kvm_pvm host, hostd waits for the agent after the kernel booted
/// before saying it will not come (no stock guest user space runs there).
const NESTED_KVM_GRACE: Duration = Duration::from_secs(60);
/// What is wrong with a nested kvm_pvm host, for progress and failure reasons.
const NESTED_KVM_NOTE: &str =
    "this host's KVM is the nested kvm_pvm kind, where guest user space cannot make system calls";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_failures_read_as_one_line_with_their_causes() {
        let no_jailer = BootError::Unusable(JailProblem::NoJailer);
        let chown = BootError::Chown {
            path: "/s/envs/a/console.log".into(),
            uid: 900_001,
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let builder = BootError::from(ImageError::Failed {
            command: "genos-image kernel".into(),
            last: "no compiler".into(),
        });

        assert_eq!(
            error_chain(&no_jailer),
            "cannot jail genos-vmm: genos-jailer was not found (set jail.binary)"
        );
        assert!(
            error_chain(&chown).starts_with(
                "cannot give /s/envs/a/console.log to uid 900001: Operation not permitted"
            ),
            "{}",
            error_chain(&chown)
        );
        assert_eq!(
            error_chain(&builder),
            "genos-image kernel failed: no compiler"
        );
    }
}
