//! virtio-input over virtio-mmio: a keyboard, an absolute pointer (tablet) and a multi-touch
//! screen, each one device built from an [`InputProfile`].
//!
//! `profile` answers the driver's config-space queries and validates injected events,
//! `pending` is the bounded queue of events waiting for guest buffers, `device` the virtio
//! device, `event_handler` the event-loop wiring, `socket` the raw input channel's reader
//! (`GET /input/socket`). The VMM injects through [`InputHandle`].

pub mod device;
mod event_handler;
pub mod pending;
pub mod profile;
pub mod socket;

pub use device::{Input, InputError, InputHandle, InputMetrics};
pub use profile::{InputKind, InputProfile};
pub use socket::{InputChannel, InputSocketMetrics};

use crate::rpc::InputDevice;

/// The three input devices a VM gets with `--input`, before they are attached.
#[derive(Debug)]
pub struct InputDevices {
    pub keyboard: Input,
    pub tablet: Input,
    pub touch: Input,
}

impl InputDevices {
    /// A keyboard, a tablet and a touch screen.
    pub fn new() -> Result<Self, InputError> {
        Ok(Self {
            keyboard: Input::new(InputProfile::keyboard())?,
            tablet: Input::new(InputProfile::tablet())?,
            touch: Input::new(InputProfile::touch())?,
        })
    }

    /// Handles for injecting into each device.
    pub fn handles(&self) -> InputHandles {
        InputHandles {
            keyboard: self.keyboard.handle(),
            tablet: self.tablet.handle(),
            touch: self.touch.handle(),
        }
    }

    /// The devices with the names they get in metrics, in attach order.
    pub fn into_named(self) -> [(&'static str, Input); 3] {
        [
            ("keyboard", self.keyboard),
            ("tablet", self.tablet),
            ("touch", self.touch),
        ]
    }
}

/// The VMM's handles on the three input devices.
#[derive(Clone, Debug)]
pub struct InputHandles {
    pub keyboard: InputHandle,
    pub tablet: InputHandle,
    pub touch: InputHandle,
}

impl InputHandles {
    /// The handle of the device an API request names.
    pub fn get(&self, device: InputDevice) -> &InputHandle {
        match device {
            InputDevice::Keyboard => &self.keyboard,
            InputDevice::Tablet => &self.tablet,
            InputDevice::Touch => &self.touch,
        }
    }
}
