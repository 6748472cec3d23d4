//! `GET /input/socket` through the real API server thread, served by a controller that does
//! what the VMM's does (an [`InputChannel`] on an event loop with the input devices), with
//! the keyboard activated on virtio-queue mock queues: a batch sent through the descriptor
//! the answer carries reaches the guest's event queue, and a second `GET` replaces the
//! first channel.

use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "common/scm.rs"]
mod scm;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use scm::get_with_fds;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm::device_manager::EventManager;
use vmm::devices::virtio::input::{InputChannel, InputDevices, InputHandles};
use vmm::devices::virtio::{GuestMemoryMmap, InterruptKind, InterruptTrigger, VirtioDevice};
use vmm::rpc::{self, ActionError, ApiReceiver, VmmAction, VmmController, VmmResponse};
use vmm_api::input::evdev::EV_KEY;
use vmm_api::input_socket::{encode_message, InputSocketHandoff};
use vmm_api::{InputDevice, InputEvent};
use vmm_sys_util::tempdir::TempDir;

const VRING_DESC_F_WRITE: u16 = 2;
const BUFFERS: u64 = 0x10_0000;

struct NoInterrupt;

impl InterruptTrigger for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
    fn set_needs_reset(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The VMM's input half: what `Vmm::handle` does for the two input actions.
struct InputVmm {
    devices: InputHandles,
    channel: InputChannel,
    event_manager: EventManager,
}

impl VmmController for InputVmm {
    fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, ActionError> {
        match action {
            VmmAction::GetInputSocket => self
                .channel
                .handoff(&self.devices, &mut self.event_manager)
                .map(VmmResponse::InputSocket)
                .map_err(|e| ActionError::Internal(e.to_string())),
            other => Err(ActionError::Internal(format!("unexpected {other:?}"))),
        }
    }
}

/// Marks that the API thread queued a request (the VMM's loop drains after dispatch).
struct ApiWake(RawFd);

impl MutEventSubscriber for ApiWake {
    fn init(&mut self, ops: &mut EventOps) {
        ops.add(Events::new_raw(self.0, EventSet::IN)).unwrap();
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {}
}

/// `GET /input/socket` on a new connection: the answer's body and descriptors.
fn get_input_socket(sock: &std::path::Path) -> (InputSocketHandoff, Vec<OwnedFd>) {
    let stream = UnixStream::connect(sock).unwrap();
    let (body, fds) = get_with_fds(&stream, vmm_api::input_socket::PATH);
    (serde_json::from_slice(&body).unwrap(), fds)
}

fn send(fd: &OwnedFd, message: &[u8]) -> std::io::Result<()> {
    vmm_api::input_socket::send_message(fd.as_fd(), message)
}

/// Runs the loop (device work, then queued API requests) until `done` or 10 s.
fn run_until(vmm: &mut InputVmm, api: &ApiReceiver, mut done: impl FnMut(&InputVmm) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(vmm) {
        assert!(Instant::now() < deadline, "timed out");
        vmm.event_manager.run_with_timeout(10).unwrap();
        api.drain_into(vmm);
    }
}

#[test]
fn a_batch_sent_through_the_handed_over_socket_reaches_the_guests_event_queue() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let events = MockSplitQueue::create(&mem, GuestAddress(0), 64);
    let status = MockSplitQueue::create(&mem, GuestAddress(0x8000), 64);
    let buffers: Vec<RawDescriptor> = (0..4)
        .map(|i| {
            RawDescriptor::from(SplitDescriptor::new(
                BUFFERS + i * 8,
                8,
                VRING_DESC_F_WRITE,
                0,
            ))
        })
        .collect();
    events.add_desc_chains(&buffers, 0).unwrap();
    let devices = InputDevices::new().unwrap();
    let handles = devices.handles();
    let [(_, mut keyboard), ..] = devices.into_named();
    keyboard
        .activate(
            mem.clone(),
            Arc::new(NoInterrupt),
            vec![
                events.create_queue().unwrap(),
                status.create_queue().unwrap(),
            ],
        )
        .unwrap();
    let mut event_manager = EventManager::new().unwrap();
    event_manager.add_subscriber(Arc::new(Mutex::new(keyboard)));
    let dir = TempDir::new().unwrap();
    let sock = dir.as_path().join("api.sock");
    let (sender, receiver) = rpc::channel().unwrap();
    vmm::api::server::start(&sock, sender).unwrap();
    event_manager.add_subscriber(Arc::new(Mutex::new(ApiWake(receiver.as_raw_fd()))));
    let mut vmm = InputVmm {
        devices: handles,
        channel: InputChannel::new(),
        event_manager,
    };
    let press = [InputEvent::new(EV_KEY, 30, 1), InputEvent::SYN_REPORT];
    let mut message = Vec::new();
    encode_message(InputDevice::Keyboard, &press, &mut message).unwrap();

    let client = std::thread::spawn(move || {
        let first = get_input_socket(&sock);
        let second = get_input_socket(&sock);
        (first, second)
    });
    run_until(&mut vmm, &receiver, |_| client.is_finished());
    let ((body, first), (_, second)) = client.join().unwrap();
    let replaced = send(&first[0], &message).unwrap_err();
    send(&second[0], &message).unwrap();
    run_until(&mut vmm, &receiver, |_| events.used().idx().load() == 2);

    let delivered: Vec<InputEvent> = (0..2)
        .map(|i| {
            let b: [u8; 8] = mem.read_obj(GuestAddress(BUFFERS + i * 8)).unwrap();
            InputEvent::new(
                u16::from_le_bytes([b[0], b[1]]),
                u16::from_le_bytes([b[2], b[3]]),
                i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            )
        })
        .collect();
    assert!(body.is_current(), "{body:?}");
    assert_eq!((first.len(), second.len()), (1, 1), "one descriptor each");
    assert_eq!(replaced.raw_os_error(), Some(libc::EPIPE), "{replaced}");
    assert_eq!(delivered, press);
    let metrics = vmm.channel.metrics();
    assert_eq!(metrics.handoffs.load(Ordering::Relaxed), 2);
    assert_eq!(metrics.messages.load(Ordering::Relaxed), 1);
}
