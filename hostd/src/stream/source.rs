//! What the stream server streams from: a frame source paired with an input sink.
//!
//! The frame side is `encoder::FrameSource` (VM framebuffer reader, synthetic scenes), which
//! also reports the pointer apart from the frames (`FrameSource::cursor_update`); the
//! input side receives the events viewers with the `input` right send, in order. The VM
//! implementation forwards them to the VMM's virtio-input devices; the synthetic one records
//! them so tests can check what arrived.

use std::sync::{Arc, Mutex};

use encoder::FrameSource;
use proto::stream::InputEvent;
use scenes::{Scene, SyntheticSource};

/// Why an input event could not be delivered.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("input device is gone")]
    Closed,
    #[error("input delivery failed: {0}")]
    Other(String),
    /// The environment has no means for this request; the text says why, for the viewer.
    #[error("{0}")]
    Unavailable(String),
}

/// Receives viewers' input for one environment. Called from async tasks: must not block long.
pub trait InputSink: Send + Sync {
    /// Delivers events in the order given (and in arrival order across calls).
    fn inject(&self, events: &[InputEvent]) -> Result<(), InputError>;
    /// Puts text on the environment's clipboard. A sink without a clipboard says so (the
    /// viewer is told, never silently dropped).
    fn set_clipboard(&self, _text: &str) -> Result<(), InputError> {
        Err(InputError::Unavailable(
            "this environment has no guest agent to take the clipboard".into(),
        ))
    }
    /// Asks the environment to change its display size. A sink whose size is fixed says so.
    fn request_resize(&self, _width: u32, _height: u32) -> Result<(), InputError> {
        Err(InputError::Unavailable(
            "this environment's display size is fixed".into(),
        ))
    }
}

/// One environment's frames and input.
pub struct EnvironmentSource {
    pub frames: Box<dyn FrameSource>,
    pub input: Arc<dyn InputSink>,
}

/// Input sink that keeps every event it receives, in order.
#[derive(Debug, Default)]
pub struct RecordingInput {
    events: Mutex<Vec<InputEvent>>,
    clipboard: Mutex<Option<String>>,
}

impl RecordingInput {
    pub fn events(&self) -> Vec<InputEvent> {
        self.events.lock().expect("poisoned").clone()
    }
    pub fn clipboard(&self) -> Option<String> {
        self.clipboard.lock().expect("poisoned").clone()
    }
}

impl InputSink for RecordingInput {
    fn inject(&self, events: &[InputEvent]) -> Result<(), InputError> {
        self.events
            .lock()
            .expect("poisoned")
            .extend_from_slice(events);
        Ok(())
    }
    fn set_clipboard(&self, text: &str) -> Result<(), InputError> {
        *self.clipboard.lock().expect("poisoned") = Some(text.to_owned());
        Ok(())
    }
}

/// A synthetic scene with a recording input sink; returns the sink so callers can inspect it.
pub fn synthetic(
    scene: Scene,
    width: u32,
    height: u32,
    fps: f32,
) -> (EnvironmentSource, Arc<RecordingInput>) {
    let input = Arc::new(RecordingInput::default());
    (
        EnvironmentSource {
            frames: Box::new(SyntheticSource::new(scene, width, height, fps)),
            input: input.clone(),
        },
        input,
    )
}
