//! The agent's transports: an AF_VSOCK listener (genos-vmm guests), a Unix socket listener
//! (tests) and a virtio-serial port (QEMU guests). Each yields non-blocking byte streams;
//! the protocol does not depend on which.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;

fn cvt(rc: libc::c_int) -> std::io::Result<libc::c_int> {
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A listening socket.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    pub name: String,
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Listener {
    /// Listens on AF_VSOCK `port` for any CID.
    pub fn vsock(port: u32) -> std::io::Result<Listener> {
        // SAFETY: socket() takes no pointers; the result is checked and owned at once.
        let fd = unsafe {
            OwnedFd::from_raw_fd(cvt(libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                0,
            ))?)
        };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        // SAFETY: the address points to a live sockaddr_vm of the length given.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen on a socket we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 16) })?;
        Ok(Listener {
            fd,
            name: format!("vsock port {port}"),
        })
    }

    /// Listens on a Unix stream socket at `path` (a stale socket file is replaced).
    pub fn unix(path: &Path) -> std::io::Result<Listener> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(Listener {
            fd: listener.into(),
            name: format!("unix socket {}", path.display()),
        })
    }

    /// Listens on the session parts' socket at `path`: its directory is made (mode 0755) if
    /// missing and the socket is connectable by anyone (mode 0666); who may stay is decided
    /// per connection by its peer credentials.
    pub fn session(path: &Path) -> std::io::Result<Listener> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        let mut l = Listener::unix(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
        l.name = format!("session socket {}", path.display());
        Ok(l)
    }

    /// Accepts one connection, non-blocking; `None` when none is waiting.
    pub fn accept(&self) -> std::io::Result<Option<File>> {
        // SAFETY: accept4 with null address pointers; the result is checked and owned.
        let rc = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        match cvt(rc) {
            // SAFETY: a fresh descriptor from accept4, owned from here on.
            Ok(fd) => Ok(Some(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            // A peer that went away between connect and accept is not the listener's fault.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The uid of the process at the other end of a connected Unix socket (SO_PEERCRED).
pub fn peer_uid(socket: &impl AsRawFd) -> std::io::Result<u32> {
    // SAFETY: ucred is plain data; getsockopt writes at most `len` bytes into it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the pointers are to live locals of the sizes given.
    cvt(unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    })?;
    Ok(cred.uid)
}

/// Connects to a Unix stream socket, non-blocking once connected.
pub fn connect_unix(path: &Path) -> std::io::Result<File> {
    let stream = std::os::unix::net::UnixStream::connect(path)?;
    stream.set_nonblocking(true)?;
    Ok(File::from(OwnedFd::from(stream)))
}

/// Opens a virtio-serial port (or any character device), non-blocking.
pub fn open_serial(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
}

/// The character device of the virtio-serial port named `name`: udev's
/// `/dev/virtio-ports/<name>` link where udev runs, else the `vportNpM` whose sysfs `name`
/// matches (an initramfs has no udev). `sys` and `dev` are `/sys` and `/dev` outside tests.
pub fn find_virtio_port(name: &str, sys: &Path, dev: &Path) -> Option<std::path::PathBuf> {
    let link = dev.join("virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    let ports = std::fs::read_dir(sys.join("class/virtio-ports")).ok()?;
    ports.filter_map(Result::ok).find_map(|port| {
        let port_name = std::fs::read_to_string(port.path().join("name")).ok()?;
        (port_name.trim_end() == name).then(|| dev.join(port.file_name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtio_port_is_found_by_its_sysfs_name_without_udev() {
        let root = std::env::temp_dir().join(format!("genos-agent-vport-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (sys, dev) = (root.join("sys"), root.join("dev"));
        for (port, name) in [("vport0p0", ""), ("vport0p1", "org.genos.agent")] {
            let d = sys.join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        std::fs::create_dir_all(&dev).unwrap();
        assert_eq!(
            find_virtio_port("org.genos.agent", &sys, &dev),
            Some(dev.join("vport0p1"))
        );
        assert_eq!(find_virtio_port("other", &sys, &dev), None);
        std::fs::create_dir_all(dev.join("virtio-ports")).unwrap();
        std::fs::write(dev.join("virtio-ports/org.genos.agent"), "").unwrap();
        assert_eq!(
            find_virtio_port("org.genos.agent", &sys, &dev),
            Some(dev.join("virtio-ports/org.genos.agent"))
        );
        std::fs::remove_dir_all(root).unwrap();
    }
}
