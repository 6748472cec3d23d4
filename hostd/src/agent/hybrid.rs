//! The host end of the vsock handshake on genos-vmm's virtio-vsock Unix socket
//! (Firecracker's hybrid design): write `CONNECT <port>\n`, read `OK <host port>\n`. The VMM
//! closes the connection instead when nothing in the guest accepts on that port.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use vmm_api::vsock_handshake;

/// Longest answer line read, newline included ("OK 4294967295\n" is 14 bytes).
const MAX_ANSWER: usize = vsock_handshake::MAX_LINE;

/// Why the handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("writing CONNECT")]
    Write(#[source] std::io::Error),
    #[error("reading the answer to CONNECT")]
    Read(#[source] std::io::Error),
    /// The VMM closed the connection: no guest program accepted on the port (yet).
    #[error("nothing in the guest accepted a connection on vsock port {0}")]
    Refused(u32),
    #[error("the VMM answered {0:?}, not \"OK <port>\"")]
    Malformed(String),
}

/// Asks the VMM on `stream` for a connection to guest `port`; returns the host-side port
/// the VMM allocated for it. Reads byte by byte so nothing after the line is consumed.
pub async fn connect(stream: &mut UnixStream, port: u32) -> Result<u32, HandshakeError> {
    stream
        .write_all(vsock_handshake::connect_line(port).as_bytes())
        .await
        .map_err(HandshakeError::Write)?;
    let mut line = Vec::with_capacity(MAX_ANSWER);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(HandshakeError::Read)?;
        if n == 0 {
            return Err(if line.is_empty() {
                HandshakeError::Refused(port)
            } else {
                HandshakeError::Malformed(String::from_utf8_lossy(&line).into_owned())
            });
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() >= MAX_ANSWER {
            return Err(HandshakeError::Malformed(
                String::from_utf8_lossy(&line).into_owned(),
            ));
        }
    }
    vsock_handshake::parse_ok(&line)
        .ok_or_else(|| HandshakeError::Malformed(String::from_utf8_lossy(&line).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn answered(answer: &'static [u8]) -> (Result<u32, HandshakeError>, Vec<u8>) {
        let (mut host, mut vmm) = UnixStream::pair().unwrap();
        let vmm_side = tokio::spawn(async move {
            let mut line = vec![0u8; 13];
            vmm.read_exact(&mut line).await.unwrap();
            vmm.write_all(answer).await.unwrap();
            line
        });
        let result = connect(&mut host, 1024).await;
        (result, vmm_side.await.unwrap())
    }

    #[tokio::test]
    async fn an_ok_line_gives_the_host_port_after_a_connect_line() {
        let (result, sent) = answered(b"OK 1073741824\n").await;

        assert_eq!(sent, b"CONNECT 1024\n");
        assert_eq!(result.unwrap(), 1_073_741_824);
    }

    #[tokio::test]
    async fn a_closed_connection_means_nothing_listens_on_the_port() {
        let (result, _) = answered(b"").await;

        assert!(matches!(result, Err(HandshakeError::Refused(1024))));
    }

    #[tokio::test]
    async fn anything_but_ok_and_a_port_is_refused() {
        for answer in [&b"NO 5\n"[..], b"OK \n", b"OK 12x\n", b"OK 99999999999\n"] {
            let (result, _) = answered(answer).await;
            assert!(
                matches!(result, Err(HandshakeError::Malformed(_))),
                "{answer:?}"
            );
        }
        const LONG: &[u8] = &[b'O'; 40];
        let (long, _) = answered(LONG).await;
        assert!(matches!(long, Err(HandshakeError::Malformed(_))));
    }

    #[tokio::test]
    async fn bytes_after_the_answer_stay_in_the_stream() {
        let (mut host, mut vmm) = UnixStream::pair().unwrap();
        tokio::spawn(async move {
            let mut line = vec![0u8; 13];
            vmm.read_exact(&mut line).await.unwrap();
            vmm.write_all(b"OK 7\nhello").await.unwrap();
        });

        connect(&mut host, 1024).await.unwrap();
        let mut rest = [0u8; 5];
        host.read_exact(&mut rest).await.unwrap();

        assert_eq!(&rest, b"hello");
    }
}
