//! Receiving an API answer's first bytes with its SCM_RIGHTS descriptors (`GET /framebuffer`,
//! `GET /input/socket`), for the tests that take the descriptors apart.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// The first bytes of a response (up to 4 KiB) and the descriptors passed with them.
pub fn recv_with_fds(stream: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut buf = vec![0u8; 4096];
    let mut raw: [RawFd; 4] = [-1; 4];
    let mut iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: the iovec points into `buf`, which is live and writable for its length.
    let (n, nfds) = unsafe { stream.recv_with_fds(&mut iov, &mut raw) }.unwrap();
    buf.truncate(n);
    let fds = raw[..nfds]
        .iter()
        // SAFETY: recvmsg installed these descriptors in this process; we own them now.
        .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    (buf, fds)
}
