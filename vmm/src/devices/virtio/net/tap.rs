//! The host side of virtio-net: a TAP device carrying Ethernet frames, each prefixed with
//! a 12-byte `virtio_net_hdr_v1`.
//!
//! [`FrameBackend`] is what the device needs from its host side; [`Tap`] implements it
//! over an existing TAP interface (created by the jailer in the VM's network namespace)
//! so the device model can be tested against an in-memory backend.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The TUN/TAP control device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// Bytes of `struct virtio_net_hdr_v1` in front of every frame, on both sides.
pub const VNET_HDR_LEN: usize = 12;

/// Where the host's frames come from and go to.
pub trait FrameBackend: AsRawFd + Send {
    /// Reads one frame (virtio-net header + Ethernet frame) into `buf`; returns its length.
    /// `ErrorKind::WouldBlock` means no frame is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame (virtio-net header + Ethernet frame).
    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()>;
}

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot name a network interface.
    #[error("TAP name {0:?} is not a valid interface name (1 to 15 bytes, no NUL)")]
    BadName(String),
    /// The TUN/TAP control device could not be opened.
    #[error("cannot open {path}")]
    OpenTun {
        /// The device node.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No interface of that name exists in this network namespace.
    #[error("no network interface named {0} (the TAP device must exist before the VMM starts)")]
    Missing(String),
    /// Attaching to the interface failed (not a TAP, or owned by another user).
    #[error("cannot attach to TAP device {name}")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Configuring the attached device failed.
    #[error("cannot configure TAP device {name} ({what})")]
    Configure {
        /// The interface.
        name: String,
        /// Which setting.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// An open, nonblocking TAP queue with virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP interface `name` in the calling thread's network
    /// namespace: no packet information, a 12-byte virtio-net header on every frame, no
    /// offloads (the device offers none to the guest).
    pub fn open(name: &str) -> Result<Self, TapError> {
        Self::open_via(Path::new(TUN_DEVICE), name)
    }

    /// As [`Tap::open`], through the TUN/TAP control device node at `tun_device`.
    pub(super) fn open_via(tun_device: &Path, name: &str) -> Result<Self, TapError> {
        let bad_name = || TapError::BadName(name.to_string());
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(bad_name());
        }
        let c_name = CString::new(name).map_err(|_| bad_name())?;

        // TUNSETIFF on an unknown name would create a new, unconnected TAP (given
        // CAP_NET_ADMIN): refuse instead, the device is the jailer's to create.
        // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_string()));
        }

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(tun_device)
            .map_err(|source| TapError::OpenTun {
                path: tun_device.to_owned(),
                source,
            })?;

        // SAFETY: `ifreq` is a C struct of byte arrays and a union of plain data; all
        // zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(c_name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes one `ifreq`, which lives on the stack for the
        // duration of the call; the descriptor is owned by `file`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        if ret < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }

        let configured = |what, ret: libc::c_int| {
            if ret < 0 {
                Err(TapError::Configure {
                    name: name.to_string(),
                    what,
                    source: io::Error::last_os_error(),
                })
            } else {
                Ok(())
            }
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, which points to a
        // live local; the descriptor is owned by `file`.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        configured("virtio-net header size", ret)?;
        // The guest is offered no checksum or segmentation offloads, so the kernel must not
        // hand us partial checksums or GSO frames either.
        // SAFETY: TUNSETOFFLOAD takes its flags by value; no memory is passed.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) };
        configured("offloads", ret)?;

        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl FrameBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // One read returns exactly one frame (truncated if `buf` is too short).
        self.file.read(buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> io::Result<()> {
        // One write sends exactly one frame; a TAP never accepts part of one.
        let n = self.file.write(frame)?;
        if n == frame.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("TAP accepted {n} of {} bytes", frame.len()),
            ))
        }
    }
}
