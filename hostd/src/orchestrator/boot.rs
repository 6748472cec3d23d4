//! Launching an environment: provision (images, then boot) and the two ways to boot its
//! VMM, directly (configured over its control socket) or under genos-jailer (configured by
//! flags), then waiting for its API and for the guest to finish booting.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::spec::Spec;
use vmm_api::{LifecycleAction, Request};

use super::images::Images;
use super::jail::{cgroup_settings, exec_file, jailed_socket, unjailed_socket, Jail, JailSetup};
use super::supervise::{describe_exit, describe_jailed_exit, jailed_vmm_pidfd, last_line, Proc};
use super::vm_config::{vm_config, VmSettings};
use super::{create_private_dir, error_chain, Orchestrator};
use crate::pidfd::Pidfd;
use crate::store::EnvState;
use crate::uds::VmmSocket;
use crate::vmm_client::{self, VmmClientError};

impl Orchestrator {
    pub(super) fn spawn_provision(&self, name: String) {
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(reason) = me.provision(&name).await {
                me.fail(&name, &reason);
            }
        });
    }

    async fn provision(&self, name: &str) -> Result<(), String> {
        let env = self.show(name).map_err(|e| e.to_string())?;
        self.transition(name, EnvState::Building, None)
            .map_err(|e| e.to_string())?;
        let dir = self.env_dir(name);
        create_private_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let images = self.build_images(&env.spec, &dir).await?;
        if !matches!(self.show(name).map(|e| e.state), Ok(EnvState::Building)) {
            return Ok(()); // stopped or destroyed meanwhile
        }
        self.transition(name, EnvState::Booting, None)
            .map_err(|e| e.to_string())?;
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
    ) -> Result<VmmSocket, String> {
        match &self.inner.jail {
            Jail::Off => self.boot_direct(name, spec, dir, images).await,
            Jail::On(setup) => {
                let setup = setup.clone();
                let r = self.boot_jailed(&setup, name, spec, dir, images).await;
                if r.is_err()
                    && !self
                        .inner
                        .procs
                        .lock()
                        .expect("procs lock")
                        .contains_key(name)
                {
                    // Nothing supervises the jail (it never started): release it here.
                    self.release_jail(name);
                }
                r
            }
            Jail::Unusable(why) => Err(why.clone()),
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
    ) -> Result<VmmSocket, String> {
        let vmm = &self.inner.cfg.vmm;
        let sock = dir.join("api.sock");
        let _ = std::fs::remove_file(&sock);
        // SAFETY: geteuid has no preconditions and cannot fail.
        let socket = unjailed_socket(dir, unsafe { libc::geteuid() });
        let mut cmd = std::process::Command::new(&vmm.binary);
        cmd.arg("--api-sock")
            .arg(&sock)
            .args(&vmm.extra_args)
            .stdout(Self::log_file(dir, "vmm.stdout")?)
            .stderr(Self::log_file(dir, "vmm.log")?);
        let proc = self.spawn_supervised(name, cmd, socket.clone(), false, describe_exit)?;
        let vmm_fd = proc
            .vmm
            .get()
            .expect("unjailed: the child is the VMM")
            .clone();
        let pid = self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))
            .map_err(|e| e.to_string())?;
        self.audit("hostd", "spawn", name, &format!("genos-vmm pid {pid}"))
            .map_err(|e| e.to_string())?;
        self.wait_api(name, &proc).await?;

        let config = vm_config(&VmSettings {
            spec,
            images,
            cpu_template: &vmm.cpu_template,
            cmdline: vmm.cmdline.clone(),
            console: dir.join("console.log"),
            graphical: self.graphical(spec),
            tap: None,
        });
        let config = match config {
            Ok(config) => config,
            Err(e) => {
                self.kill_vmm(name);
                return Err(e);
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
                Err(format!("genos-vmm: {}", error_chain(&e)))
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
    ) -> Result<VmmSocket, String> {
        use proto::spec::NetworkMode;
        let cfg = &self.inner.cfg;
        let mut cmdline = cfg.vmm.cmdline.clone();

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
                            .map_err(|e| format!("network allowlist: {e}"))?;
                    Some((p, allowed))
                }
                Some(p) => Some((p, vec![])),
            };
            Self::allocate_jail(&state_dir, &env_name, &jail_cfg, &setup_c, net)
        })
        .await
        .map_err(|e| format!("jail set-up task: {e}"))??;
        if let Some(addr) = &addr {
            cmdline.push(' ');
            cmdline.push_str(&addr.guest_kernel_ip_arg());
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
            )
            .map_err(|e| e.to_string())?;
        }

        // Files the VMM writes must be its uid's.
        let console = dir.join("console.log");
        std::fs::File::create(&console)
            .map_err(|e| format!("cannot create {}: {e}", console.display()))?;
        let mut owned = vec![console.clone()];
        owned.extend(images.rootfs.clone());
        for f in &owned {
            std::os::unix::fs::chown(f, Some(record.uid), Some(record.gid))
                .map_err(|e| format!("cannot give {} to uid {}: {e}", f.display(), record.uid))?;
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
            .stdout(Self::log_file(dir, "vmm.stdout")?)
            .stderr(Self::log_file(dir, "vmm.log")?);
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
            if *proc.exited.borrow() {
                let reason = self.show(name).ok().and_then(|e| e.reason);
                return Err(reason.unwrap_or_else(|| "genos-jailer ended during start-up".into()));
            }
            if tokio::time::Instant::now() > deadline {
                self.kill_vmm(name);
                return Err(format!(
                    "genos-jailer wrote no pid file ({}) within {} s",
                    pid_file.display(),
                    cfg.vmm.api_timeout_s
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let jailer_pid = proc.jailer.as_ref().map_or(0, Pidfd::pid);
        let vmm_fd = match jailed_vmm_pidfd(pid, jailer_pid) {
            Ok(fd) => Arc::new(fd),
            Err(why) => {
                self.kill_vmm(name);
                return Err(format!("{}: {why}", pid_file.display()));
            }
        };
        let _ = proc.vmm.set(vmm_fd.clone());
        self.record_vmm(name, &proc, &vmm_fd)?;
        self.store()
            .set_vmm(name, Some(pid), Some(&sock.display().to_string()))
            .map_err(|e| e.to_string())?;
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
        )
        .map_err(|e| e.to_string())?;
        self.wait_api(name, &proc).await?;
        Ok(proc.socket.clone())
    }

    fn log_file(dir: &Path, n: &str) -> Result<std::fs::File, String> {
        std::fs::File::create(dir.join(n))
            .map_err(|e| format!("cannot create {}: {e}", dir.join(n).display()))
    }

    /// Waits for the control socket to answer `GET /vm`, or the VMM to end.
    async fn wait_api(&self, name: &str, proc: &Proc) -> Result<(), String> {
        let timeout = self.inner.cfg.vmm.api_timeout_s;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
        loop {
            let r = vmm_client::run(&proc.socket, Duration::from_secs(1), |c| c.describe()).await;
            if r.is_ok() {
                return Ok(());
            }
            if *proc.exited.borrow() {
                // The supervisor has failed the environment with the exit's meaning.
                let reason = self.show(name).ok().and_then(|e| e.reason);
                return Err(reason.unwrap_or_else(|| "genos-vmm ended during start-up".into()));
            }
            if tokio::time::Instant::now() > deadline {
                self.kill_vmm(name);
                return Err(format!(
                    "genos-vmm's control socket did not answer within {timeout} s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the VMM until the guest signals the boot timer (→ ready) or the boot timeout.
    pub(super) async fn wait_ready(&self, name: &str, sock: &VmmSocket) {
        let timeout = Duration::from_secs(self.inner.cfg.vmm.boot_timeout_s);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.show(name).map(|e| e.state) {
                Ok(EnvState::Booting) => {}
                // Failed, stopped or destroyed meanwhile. A stop that raced with the spawn
                // may have found no VMM to halt: make sure none is left running.
                _ => {
                    self.kill_vmm(name);
                    return;
                }
            }
            let described = vmm_client::run(sock, Duration::from_secs(2), |c| c.describe()).await;
            if let Ok(vm) = described {
                if let Some(boot_us) = vm.boot_time_us {
                    if let Ok(true) = self.transition(name, EnvState::Ready, None) {
                        self.stream_environment(name, sock).await;
                        let _ = self.store().touch(name);
                        let _ = self.audit(
                            "hostd",
                            "ready",
                            name,
                            &format!("guest booted in {} ms", boot_us / 1000),
                        );
                    }
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                self.fail(
                    name,
                    &format!(
                        "the guest did not finish booting within {} s",
                        timeout.as_secs()
                    ),
                );
                self.kill_vmm(name);
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
