//! What a session holds down and what a dropped session leaves behind: the keys and buttons
//! to release when a session ends for good, and the sessions kept for resumption.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proto::stream::{Button, ErrorCode, InputEvent};

use super::Refusal;

/// Keys and buttons a session holds down, released when the session ends for good.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HeldInput {
    keys: HashSet<u16>,
    buttons: HashSet<u8>,
}

impl HeldInput {
    /// Follows one event the guest received.
    pub fn track(&mut self, ev: &InputEvent) {
        match *ev {
            InputEvent::Key { code, pressed } => {
                if pressed {
                    self.keys.insert(code);
                } else {
                    self.keys.remove(&code);
                }
            }
            InputEvent::PointerButton { button, pressed } => {
                if pressed {
                    self.buttons.insert(button as u8);
                } else {
                    self.buttons.remove(&(button as u8));
                }
            }
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.buttons.is_empty()
    }

    /// The events that let go of everything held.
    pub fn releases(&self) -> Vec<InputEvent> {
        let mut evs: Vec<InputEvent> = self
            .keys
            .iter()
            .map(|&code| InputEvent::Key {
                code,
                pressed: false,
            })
            .collect();
        for b in &self.buttons {
            let button = match b {
                1 => Button::Left,
                2 => Button::Middle,
                3 => Button::Right,
                4 => Button::Back,
                _ => Button::Forward,
            };
            evs.push(InputEvent::PointerButton {
                button,
                pressed: false,
            });
        }
        evs
    }
}

/// A session whose connection dropped, kept for resumption until `until`.
#[derive(Debug)]
struct Parked<E> {
    env_id: String,
    env: E,
    held: HeldInput,
    until: Instant,
}

/// Dropped sessions within their resume window. `E` is what the owner needs to release a
/// session's input when its window closes (the server keeps the environment).
#[derive(Debug)]
pub struct ParkedSessions<E> {
    grace: Duration,
    parked: HashMap<[u8; 16], Parked<E>>,
}

/// The session a Hello opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub id: [u8; 16],
    /// Whether `id` is a parked session taken up again.
    pub resumed: bool,
    /// What the resumed session held down.
    pub held: HeldInput,
}

/// A parked session whose window closed: release `releases` into `env`.
#[derive(Debug)]
pub struct Expired<E> {
    pub env: E,
    pub releases: Vec<InputEvent>,
}

impl<E> ParkedSessions<E> {
    /// Sessions are kept for `grace` after their connection drops.
    pub fn new(grace: Duration) -> Self {
        Self {
            grace,
            parked: HashMap::new(),
        }
    }

    /// Keeps session `id` of `env_id` from `now` for the resume window; parking the same id
    /// again restarts its window.
    pub fn park(&mut self, id: [u8; 16], env_id: &str, env: E, held: HeldInput, now: Instant) {
        self.parked.insert(
            id,
            Parked {
                env_id: env_id.to_owned(),
                env,
                held,
                until: now + self.grace,
            },
        );
    }

    /// Takes session `id` up again for `env_id`: what it held (`None` for an unknown or
    /// expired id: the client starts afresh). A session of another environment stays parked
    /// and the attempt is refused.
    pub fn resume(
        &mut self,
        id: [u8; 16],
        env_id: &str,
        now: Instant,
    ) -> Result<Option<HeldInput>, Refusal> {
        match self.parked.get(&id) {
            Some(p) if p.until <= now => Ok(None),
            Some(p) if p.env_id != env_id => Err(Refusal::new(
                ErrorCode::ResumeRejected,
                "session belongs to another environment",
            )),
            Some(_) => Ok(self.parked.remove(&id).map(|p| p.held)),
            None => Ok(None),
        }
    }

    /// The session a Hello for `env_id` opens: the parked one it names (with what it held),
    /// else a fresh one under `fresh_id()`.
    pub fn open(
        &mut self,
        resume: Option<[u8; 16]>,
        env_id: &str,
        now: Instant,
        fresh_id: impl FnOnce() -> Result<[u8; 16], Refusal>,
    ) -> Result<Opened, Refusal> {
        if let Some(id) = resume {
            if let Some(held) = self.resume(id, env_id, now)? {
                return Ok(Opened {
                    id,
                    resumed: true,
                    held,
                });
            }
        }
        Ok(Opened {
            id: fresh_id()?,
            resumed: false,
            held: HeldInput::default(),
        })
    }

    /// Removes every session whose window closed by `now`, with what to release.
    pub fn expire(&mut self, now: Instant) -> Vec<Expired<E>> {
        let ids: Vec<[u8; 16]> = self
            .parked
            .iter()
            .filter(|(_, p)| p.until <= now)
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.parked.remove(&id))
            .map(|p| Expired {
                releases: p.held.releases(),
                env: p.env,
            })
            .collect()
    }

    /// When the next window closes.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.parked.values().map(|p| p.until).min()
    }

    pub fn len(&self) -> usize {
        self.parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parked.is_empty()
    }
}
