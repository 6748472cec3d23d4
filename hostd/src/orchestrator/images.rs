//! The images an environment boots from: the configured kernel and initramfs, or what
//! genos-image builds, and the environment's own root filesystem.

use std::path::{Path, PathBuf};

use proto::spec::Spec;

use super::jail::find_on_path;
use super::Orchestrator;
use crate::config::ReadyWhen;

/// Why an environment's images could not be had.
#[derive(Debug, thiserror::Error)]
pub(super) enum ImageError {
    #[error("cannot run {binary}")]
    Run {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed: {last}")]
    Failed { command: String, last: String },
    #[error("{command} printed no artifact path")]
    NoPath { command: String },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("images.agent {0:?} was not found: build the static agent with scripts/build-agent and set images.agent to its path")]
    NoAgent(String),
    #[error("images.agent is empty, but [vmm] ready = \"agent\" waits for the guest agent: set images.agent, or ready = \"boot\" for guests without one")]
    AgentRequired,
}

pub(super) struct Images {
    pub(super) kernel: PathBuf,
    pub(super) initramfs: Option<PathBuf>,
    pub(super) rootfs: Option<PathBuf>,
}

impl Orchestrator {
    pub(super) async fn build_images(
        &self,
        name: &str,
        spec: &Spec,
        dir: &Path,
    ) -> Result<Images, ImageError> {
        let cfg = &self.inner.cfg.images;
        let kernel = if cfg.kernel.is_empty() {
            self.set_progress(name, Some("building the guest kernel (genos-image kernel; cached after the first build, which takes minutes)".into()));
            run_image_builder(&cfg.builder, &["kernel"]).await?
        } else {
            PathBuf::from(&cfg.kernel)
        };
        // Whatever hostd builds for the guest carries the agent.
        let builds = cfg.build_rootfs || (cfg.kernel.is_empty() && cfg.initramfs.is_empty());
        let agent = if builds { self.agent_binary()? } else { None };
        let initramfs = if !cfg.initramfs.is_empty() {
            Some(PathBuf::from(&cfg.initramfs))
        } else if cfg.kernel.is_empty() {
            let mut args = vec!["initramfs".to_string()];
            if let Some(agent) = &agent {
                args.extend(["--agent".to_string(), agent.display().to_string()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.set_progress(
                name,
                Some("building the initramfs (genos-image initramfs)".into()),
            );
            Some(run_image_builder(&cfg.builder, &args).await?)
        } else {
            None
        };
        let rootfs = if cfg.build_rootfs {
            let spec_path = dir.join("spec.json");
            std::fs::write(
                &spec_path,
                serde_json::to_vec_pretty(spec).expect("spec json"),
            )
            .map_err(|source| ImageError::Write {
                path: spec_path.clone(),
                source,
            })?;
            let out = dir.join("rootfs.ext4");
            let (s, o) = (spec_path.display().to_string(), out.display().to_string());
            let args = self
                .inner
                .cfg
                .rootfs_args(&spec.base, &s, &o, agent.as_deref());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.set_progress(
                name,
                Some(format!(
                    "building the {} root filesystem (genos-image rootfs; the first of a base downloads its packages)",
                    spec.base
                )),
            );
            run_image_builder(&cfg.builder, &args).await?;
            Some(out)
        } else {
            None
        };
        Ok(Images {
            kernel,
            initramfs,
            rootfs,
        })
    }

    /// The genos-agent to build into guests (`images.agent`, PATH lookup for a bare name);
    /// none only where readiness does not wait for it.
    fn agent_binary(&self) -> Result<Option<PathBuf>, ImageError> {
        let name = &self.inner.cfg.images.agent;
        if name.is_empty() {
            return match self.inner.cfg.vmm.ready {
                ReadyWhen::Agent => Err(ImageError::AgentRequired),
                ReadyWhen::Boot => Ok(None),
            };
        }
        let path = PathBuf::from(name);
        let found = if path.components().count() > 1 {
            path.is_file().then_some(path)
        } else {
            find_on_path(name)
        };
        found
            .map(Some)
            .ok_or_else(|| ImageError::NoAgent(name.clone()))
    }
}

async fn run_image_builder(binary: &str, args: &[&str]) -> Result<PathBuf, ImageError> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| ImageError::Run {
            binary: binary.into(),
            source,
        })?;
    let command = || format!("{binary} {}", args.join(" "));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().last().unwrap_or("").to_string();
        return Err(ImageError::Failed {
            command: command(),
            last,
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or("").trim();
    if path.is_empty() {
        return Err(ImageError::NoPath { command: command() });
    }
    Ok(PathBuf::from(path))
}
