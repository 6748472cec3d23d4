//! The lines of Firecracker's hybrid vsock handshake on genos-vmm's vsock Unix socket, for
//! both ends: a host program sends `CONNECT <port>\n` (the guest port in decimal,
//! [`connect_line`]) and the VMM answers `OK <host port>\n` ([`ok_line`]) once the guest
//! accepted. Sans-IO: bytes in, the port (and where the line ended) out. The line is bounded,
//! so a host program that never ends it costs the VMM at most [`MAX_LINE`] bytes.

use std::time::Duration;

/// Longest line accepted, newline included ("CONNECT 4294967295\n" is 19 bytes).
pub const MAX_LINE: usize = 32;
/// How long a host program has to send the whole line after connecting.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a `CONNECT` line was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_LINE`] bytes.
    #[error("no newline in the first {MAX_LINE} bytes")]
    TooLong,
    /// A line that is not `CONNECT <port>`.
    #[error("expected \"CONNECT <port>\", got {0:?}")]
    Malformed(String),
}

/// The line a host program sends to reach guest `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The VMM's answer once the guest accepted: the host-side port of the connection.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// The port of an `OK <port>` answer (without its newline; a trailing CR is allowed), or
/// `None` for anything else.
pub fn parse_ok(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    text.strip_prefix("OK ")
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse().ok())
}

/// Reads the `CONNECT` line from the start of `buf` (everything the host program sent so
/// far). `Ok(None)`: the line is not complete yet. `Ok(Some((port, len)))`: the guest
/// port, and the line's length; bytes after it are the connection's first data.
pub fn parse(buf: &[u8]) -> Result<Option<(u32, usize)>, HandshakeError> {
    let window = &buf[..buf.len().min(MAX_LINE)];
    let Some(end) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= MAX_LINE {
            Err(HandshakeError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = &window[..end];
    let malformed = || HandshakeError::Malformed(String::from_utf8_lossy(line).into_owned());
    let text = std::str::from_utf8(line).map_err(|_| malformed())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    let port = text
        .strip_prefix("CONNECT ")
        .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|p| p.parse::<u32>().ok())
        .ok_or_else(malformed)?;
    Ok(Some((port, end + 1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_complete_line_gives_the_port_and_its_length() {
        assert_eq!(parse(b"CONNECT 52\n"), Ok(Some((52, 11))));
    }

    #[test]
    fn bytes_after_the_line_are_left_as_data() {
        let buf = b"CONNECT 1024\nhello";

        let (port, len) = parse(buf).unwrap().unwrap();

        assert_eq!(port, 1024);
        assert_eq!(&buf[len..], b"hello");
    }

    #[test]
    fn a_partial_line_waits_for_more() {
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"CONNECT 5"), Ok(None));
    }

    #[test]
    fn a_crlf_line_is_accepted() {
        assert_eq!(parse(b"CONNECT 7\r\n"), Ok(Some((7, 11))));
    }

    #[test]
    fn a_line_without_newline_in_the_limit_is_refused() {
        let long = [b'C'; MAX_LINE];

        assert_eq!(parse(&long), Err(HandshakeError::TooLong));
    }

    #[test]
    fn malformed_lines_are_refused() {
        for bad in [
            &b"CONNECT\n"[..],
            b"CONNECT \n",
            b"connect 5\n",
            b"CONNECT -5\n",
            b"CONNECT +5\n",
            b"CONNECT 4294967296\n",
            b"CONNECT 5 6\n",
            b"CONNECT \xff\n",
        ] {
            assert!(
                matches!(parse(bad), Err(HandshakeError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn the_largest_port_fits() {
        assert_eq!(parse(b"CONNECT 4294967295\n"), Ok(Some((u32::MAX, 19))));
    }
}
