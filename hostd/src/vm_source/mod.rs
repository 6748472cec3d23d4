//! A VM as a stream environment: its virtio-gpu scanout as an [`encoder::FrameSource`]
//! ([`frames`]) and its virtio-input devices as a [`crate::stream::InputSink`] ([`input`],
//! fed by the sans-IO [`translate`]).
//!
//! Both are reached through hostd's one VMM client, [`crate::vmm_client`] (`docs/vmm-api.md`,
//! types in [`vmm_api`]): `GET /framebuffer` hands over the shared framebuffer's memfd and
//! flush eventfd, `GET /input/socket` the raw input channel; both descriptors come with the
//! answer (SCM_RIGHTS), after which frames and input flow without HTTP.

mod frames;
mod input;
mod translate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use framebuffer::ReaderError;

pub use frames::VmFramebufferSource;
pub use input::VmInput;
pub use translate::InputTranslator;

use crate::stream::source::EnvironmentSource;
use crate::uds::VmmSocket;
use crate::vmm_client::{VmmClient, VmmClientError};

/// How long one API request may take before the VMM is considered stuck.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors talking to a VMM or reading its framebuffer.
#[derive(Debug, thiserror::Error)]
pub enum VmSourceError {
    #[error(transparent)]
    Vmm(#[from] VmmClientError),
    #[error("the VM has no display (its config has no gpu)")]
    NoDisplay,
    #[error("shared framebuffer")]
    Reader(#[from] ReaderError),
    #[error("starting the input thread failed")]
    Thread(#[source] std::io::Error),
}

type Result<T, E = VmSourceError> = std::result::Result<T, E>;

/// The display size the VM was configured with (`GET /vm`, `config.gpu`).
fn configured_display(api: &mut VmmClient) -> Result<(u32, u32)> {
    let gpu = api.describe()?.config.and_then(|c| c.gpu);
    let size = gpu.ok_or(VmSourceError::NoDisplay)?;
    Ok((size.width, size.height))
}

/// The stream's current frame size, shared by the frame source (which learns it) and the
/// input sink (which scales pointer coordinates with it).
#[derive(Debug, Default)]
pub struct SharedSize(AtomicU64);

impl SharedSize {
    pub fn new(width: u32, height: u32) -> Self {
        let s = Self::default();
        s.set(width, height);
        s
    }
    pub fn get(&self) -> (u32, u32) {
        let v = self.0.load(Ordering::Relaxed);
        ((v >> 32) as u32, v as u32)
    }
    pub fn set(&self, width: u32, height: u32) {
        self.0.store(
            u64::from(width) << 32 | u64::from(height),
            Ordering::Relaxed,
        );
    }
}

/// A running VM's framebuffer reader and input sink, sharing the frame size.
pub fn open(api_sock: &VmmSocket) -> Result<(VmFramebufferSource, VmInput)> {
    let frames = VmFramebufferSource::connect(api_sock)?;
    let input = VmInput::start(api_sock, frames.shared_size())?;
    Ok((frames, input))
}

/// A running VM as a stream environment: its framebuffer and its input devices, both through
/// the control API at `api_sock`. Register it with
/// [`crate::stream::StreamServer::add_environment`].
pub fn environment(api_sock: &VmmSocket) -> Result<EnvironmentSource> {
    let (frames, input) = open(api_sock)?;
    Ok(EnvironmentSource {
        frames: Box::new(frames),
        input: Arc::new(input),
    })
}
