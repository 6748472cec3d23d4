//! The VM's input devices as the stream server's [`InputSink`]: viewers' events are
//! translated in the caller and written, one batch per message, into the VMM's raw input
//! channel (`GET /input/socket`, a `SOCK_SEQPACKET` socket its event loop reads straight into
//! the devices; layout in [`vmm_api::input_socket`]). A send never waits: the socket is
//! non-blocking, and a VMM that stopped reading (its send buffer full) has the input refused
//! at once, as the server's async tasks must not wait on a VMM.
//!
//! Display changes (`PUT /display`) and fetching a new channel (the VMM replaces a channel when
//! another client asks for one; its old end then fails with `EPIPE`) are HTTP requests: they run
//! on a worker thread, in order.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use proto::stream::InputEvent;
use tracing::{debug, warn};
use vmm_api::input_socket::{encode_message, send_message};
use vmm_api::{DisplaySize, Request};

use super::translate::InputTranslator;
use super::{Result, SharedSize, VmSourceError, API_TIMEOUT};
use crate::stream::source::{InputError, InputSink};
use crate::uds::VmmSocket;
use crate::vmm_client::{VmmClient, VmmClientError};

/// Requests waiting for the worker thread; past this, they are refused rather than queued
/// without bound behind a stalled VMM.
const WORKER_QUEUE: usize = 16;
/// Send buffer asked for the channel: room for several hundred small batches in flight, so
/// a burst (a paste typed as keys) does not outrun a VMM that reads 64 messages per wake.
/// The kernel caps it at `net.core.wmem_max` (doubled).
const SEND_BUFFER: libc::c_int = 1 << 20;

/// Work for the worker thread.
#[derive(Debug)]
enum Work {
    Display(u32, u32),
    /// The channel failed: fetch a new one.
    Reconnect,
}

/// The channel's state, behind one lock so batches leave in the order they were made.
#[derive(Debug)]
struct Channel {
    translator: InputTranslator,
    /// `None` while the worker fetches a new channel.
    socket: Option<OwnedFd>,
    /// Message buffer, reused.
    message: Vec<u8>,
}

/// The VM's input devices as the stream server's input sink.
#[derive(Debug)]
pub struct VmInput {
    channel: Arc<Mutex<Channel>>,
    size: Arc<SharedSize>,
    work: SyncSender<Work>,
}

impl VmInput {
    /// Opens the raw input channel of the VMM at `api_sock` and starts the worker thread
    /// (it ends when this is dropped); `size` is the matching frame source's
    /// [`super::VmFramebufferSource::shared_size`].
    pub fn start(api_sock: &VmmSocket, size: Arc<SharedSize>) -> Result<Self> {
        let mut api = VmmClient::connect(api_sock, API_TIMEOUT)?;
        let socket = open_channel(&mut api)?;
        let channel = Arc::new(Mutex::new(Channel {
            translator: InputTranslator::new(),
            socket: Some(socket),
            message: Vec::new(),
        }));
        let (work, rx) = mpsc::sync_channel(WORKER_QUEUE);
        let path = api_sock.clone();
        let worker_channel = channel.clone();
        std::thread::Builder::new()
            .name("vm-input".into())
            .spawn(move || worker(&path, Some(api), &worker_channel, rx))
            .map_err(VmSourceError::Thread)?;
        Ok(Self {
            channel,
            size,
            work,
        })
    }

    fn queue(&self, work: Work) -> Result<(), InputError> {
        self.work.try_send(work).map_err(|e| match e {
            TrySendError::Full(_) => InputError::Other("the VMM is not taking requests".into()),
            TrySendError::Disconnected(_) => InputError::Closed,
        })
    }
}

impl InputSink for VmInput {
    fn inject(&self, events: &[InputEvent]) -> Result<(), InputError> {
        let mut guard = self.channel.lock().expect("poisoned");
        let channel = &mut *guard;
        let batches = channel.translator.translate(events, self.size.get());
        for (device, batch) in batches {
            let Some(socket) = &channel.socket else {
                // The last fetch failed (or is under way): ask again; the worker skips the
                // request if a channel is back by then.
                let _ = self.work.try_send(Work::Reconnect);
                return Err(InputError::Other(
                    "reconnecting to the VMM's input channel".into(),
                ));
            };
            channel.message.clear();
            encode_message(device, &batch, &mut channel.message)
                .map_err(|e| InputError::Other(format!("untranslatable input batch: {e}")))?;
            match send_message(socket.as_fd(), &channel.message) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(InputError::Other("the VMM is not taking input".into()));
                }
                Err(e) => {
                    // EPIPE: the VMM handed the channel to someone else, or it is gone.
                    debug!(error = %e, "input channel failed; fetching a new one");
                    channel.socket = None;
                    // A full queue already holds work that fetches a channel or fails.
                    let _ = self.work.try_send(Work::Reconnect);
                    return Err(InputError::Other(format!("the VMM's input channel: {e}")));
                }
            }
        }
        Ok(())
    }

    fn request_resize(&self, width: u32, height: u32) -> Result<(), InputError> {
        self.queue(Work::Display(width, height))
    }
}

/// `GET /input/socket`, made non-blocking with a large send buffer.
fn open_channel(api: &mut VmmClient) -> Result<OwnedFd, VmmClientError> {
    let socket = api.input_socket()?;
    let fd = socket.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let nonblocking = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        return Err(VmmClientError::Io(io::Error::last_os_error()));
    }
    // SAFETY: `SEND_BUFFER` outlives the call and its size is passed; a refusal (the cap) is
    // harmless, the default buffer then applies.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&SEND_BUFFER as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
    Ok(socket)
}

/// Runs display changes and channel fetches in arrival order over one API connection
/// (reconnected after a failure).
fn worker(
    path: &VmmSocket,
    mut api: Option<VmmClient>,
    channel: &Mutex<Channel>,
    rx: Receiver<Work>,
) {
    for work in rx {
        if api.is_none() {
            match VmmClient::connect(path, API_TIMEOUT) {
                Ok(a) => api = Some(a),
                Err(e) => {
                    warn!(error = %e, ?work, "VMM unreachable; request dropped");
                    continue;
                }
            }
        }
        let a = api.as_mut().expect("connected above");
        let outcome = match work {
            Work::Display(width, height) => {
                a.send(&Request::Display(DisplaySize { width, height }))
            }
            Work::Reconnect => {
                if channel.lock().expect("poisoned").socket.is_some() {
                    continue;
                }
                open_channel(a).map(|socket| {
                    channel.lock().expect("poisoned").socket = Some(socket);
                })
            }
        };
        match outcome {
            Ok(()) => {}
            // The VMM refused this one request; the connection is still good.
            Err(e @ VmmClientError::Answer(vmm_api::ResponseError::Refused { .. })) => {
                warn!(error = %e, ?work, "VMM refused the request")
            }
            Err(e) => {
                warn!(error = %e, ?work, "VMM API failed; reconnecting for the next request");
                api = None;
            }
        }
    }
    debug!(path = %path.path().display(), "vm input worker ends");
}
