//! Receiving an API answer's first bytes with its SCM_RIGHTS descriptors (`GET /framebuffer`,
//! `GET /input/socket`), for the tests that take the descriptors apart.

use std::io::{Read, Write};
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

/// Sends `GET uri` on `stream` and returns the `200 OK` answer's body with the descriptors
/// that came with its first bytes (the rest of a longer answer follows as plain bytes).
pub fn get_with_fds(stream: &UnixStream, uri: &str) -> (Vec<u8>, Vec<OwnedFd>) {
    let mut writer = stream;
    write!(writer, "GET {uri} HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let (mut buf, fds) = recv_with_fds(stream);
    let more = |buf: &mut Vec<u8>, what: &str| {
        let mut chunk = [0u8; 1024];
        let n = (&*stream).read(&mut chunk).unwrap();
        assert!(n > 0, "closed mid-{what}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        more(&mut buf, "head");
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    while buf.len() < head_end + len {
        more(&mut buf, "body");
    }
    (buf[head_end..head_end + len].to_vec(), fds)
}
