//! The images an environment boots from: the configured kernel and initramfs, or what
//! genos-image builds, and the environment's own root filesystem.

use std::path::{Path, PathBuf};

use proto::spec::Spec;

use super::Orchestrator;

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
}

pub(super) struct Images {
    pub(super) kernel: PathBuf,
    pub(super) initramfs: Option<PathBuf>,
    pub(super) rootfs: Option<PathBuf>,
}

impl Orchestrator {
    pub(super) async fn build_images(&self, spec: &Spec, dir: &Path) -> Result<Images, ImageError> {
        let cfg = &self.inner.cfg.images;
        let kernel = if cfg.kernel.is_empty() {
            run_image_builder(&cfg.builder, &["kernel"]).await?
        } else {
            PathBuf::from(&cfg.kernel)
        };
        let initramfs = if !cfg.initramfs.is_empty() {
            Some(PathBuf::from(&cfg.initramfs))
        } else if cfg.kernel.is_empty() {
            Some(run_image_builder(&cfg.builder, &["initramfs"]).await?)
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
            let args = self.inner.cfg.rootfs_args(&spec.base, &s, &o);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
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
