//! Probing an archive before a build depends on it: one small request with short connect
//! and read timeouts, so an unreachable or silent mirror fails the build within seconds
//! with the reason, instead of debootstrap, dnf or apk retrying for many minutes.
//!
//! `http://` URLs get a `HEAD` request and must answer with a 2xx or 3xx status (through
//! `http_proxy` when it is set, as debootstrap and apt would use it). `https://` URLs are
//! checked up to an established TCP connection (this crate has no TLS client; the tool's
//! own TLS errors still come from the tool). `file://` URLs must name an existing file.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Time allowed for name resolution, for the connection, and for the answer's status line.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an archive is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("archive URL {0:?} is not an http://, https:// or file:// URL")]
    Url(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot resolve {host}: no answer within {secs} s")]
    ResolveTimeout { host: String, secs: u64 },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{addr} accepted the connection but sent no answer within {secs} s")]
    Silent { addr: SocketAddr, secs: u64 },
    #[error("talking to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: String },
    #[error("{url} does not exist on this machine")]
    NoFile { url: String },
}

/// A parsed archive URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Http {
        host: String,
        port: u16,
        path: String,
    },
    Https {
        host: String,
        port: u16,
    },
    File(String),
}

/// Splits `url` into what the probe contacts.
pub fn parse(url: &str) -> Result<Target, ProbeError> {
    let bad = || ProbeError::Url(url.to_string());
    if let Some(path) = url.strip_prefix("file://") {
        return Ok(Target::File(path.to_string()));
    }
    let (https, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let default_port = if https { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        match v6.split_once(']') {
            Some((h, "")) => (h, None),
            Some((h, p)) => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            None => return Err(bad()),
        }
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| bad())?,
        None => default_port,
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(if https {
        Target::Https {
            host: host.to_string(),
            port,
        }
    } else {
        Target::Http {
            host: host.to_string(),
            port,
            path: path.to_string(),
        }
    })
}

/// Checks that `url` answers, each step bounded by `timeout`.
pub fn probe(url: &str, timeout: Duration) -> Result<(), ProbeError> {
    match parse(url)? {
        Target::File(path) => {
            if Path::new(&path).exists() {
                Ok(())
            } else {
                Err(ProbeError::NoFile {
                    url: url.to_string(),
                })
            }
        }
        Target::Https { host, port } => connect(&host, port, timeout).map(drop),
        Target::Http { host, port, path } => {
            let proxy = ["http_proxy", "HTTP_PROXY"]
                .iter()
                .find_map(|v| std::env::var(v).ok().filter(|p| !p.is_empty()))
                .and_then(|p| match parse(&p) {
                    Ok(Target::Http { host, port, .. }) => Some((host, port)),
                    _ => None,
                });
            let (request_target, stream) = match &proxy {
                Some((phost, pport)) => (url.to_string(), connect(phost, *pport, timeout)?),
                None => (path, connect(&host, port, timeout)?),
            };
            let host_header = if port == 80 {
                host.clone()
            } else {
                format!("{host}:{port}")
            };
            let status = status_line(stream, &request_target, &host_header, timeout)?;
            let code = status.split(' ').nth(1).unwrap_or("");
            if code.starts_with('2') || code.starts_with('3') {
                Ok(())
            } else {
                Err(ProbeError::Status {
                    url: url.to_string(),
                    status: status
                        .split_once(' ')
                        .map_or(status.clone(), |(_, s)| s.to_string()),
                })
            }
        }
    }
}

/// Resolves `host` on a helper thread (getaddrinfo has no timeout of its own) and connects
/// to the first address that accepts within `timeout`.
fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<(SocketAddr, TcpStream), ProbeError> {
    let (tx, rx) = mpsc::channel();
    let name = format!("{host}:{port}");
    std::thread::spawn(move || {
        let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
    });
    let addrs = match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) => addrs,
        Ok(Err(source)) => {
            return Err(ProbeError::Resolve {
                host: host.to_string(),
                source,
            })
        }
        Err(_) => {
            return Err(ProbeError::ResolveTimeout {
                host: host.to_string(),
                secs: timeout.as_secs(),
            })
        }
    };
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => return Ok((addr, stream)),
            Err(source) => last = Some(ProbeError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or_else(|| ProbeError::Resolve {
        host: host.to_string(),
        source: io::Error::new(io::ErrorKind::NotFound, "no addresses"),
    }))
}

/// Sends a HEAD request and returns the response's status line; the whole exchange ends
/// within `timeout` after the connection.
fn status_line(
    (addr, mut stream): (SocketAddr, TcpStream),
    target: &str,
    host: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let io_err = |source| ProbeError::Io { addr, source };
    let deadline = Instant::now() + timeout;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    let request = format!(
        "HEAD {target} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: genos-image\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).map_err(io_err)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    while !buf.contains(&b'\n') && buf.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ProbeError::Silent {
                addr,
                secs: timeout.as_secs(),
            });
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ProbeError::Silent {
                    addr,
                    secs: timeout.as_secs(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_err(e)),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or("").trim().to_string();
    if !line.starts_with("HTTP/") {
        return Err(io_err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "not an HTTP answer: {:?}",
                line.chars().take(60).collect::<String>()
            ),
        )));
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn urls_split_into_host_port_and_path() {
        assert_eq!(
            parse("http://deb.debian.org/debian/dists/bookworm/Release").unwrap(),
            Target::Http {
                host: "deb.debian.org".into(),
                port: 80,
                path: "/debian/dists/bookworm/Release".into()
            }
        );
        assert_eq!(
            parse("https://mirror.local:8443/fedora").unwrap(),
            Target::Https {
                host: "mirror.local".into(),
                port: 8443
            }
        );
        assert_eq!(
            parse("http://[::1]:3142/x").unwrap(),
            Target::Http {
                host: "::1".into(),
                port: 3142,
                path: "/x".into()
            }
        );
        assert_eq!(
            parse("file:///srv/m").unwrap(),
            Target::File("/srv/m".into())
        );
        assert!(matches!(parse("ftp://x/y"), Err(ProbeError::Url(_))));
        assert!(matches!(parse("http://:80/"), Err(ProbeError::Url(_))));
        assert!(matches!(
            parse("http://[::1]/"),
            Ok(Target::Http { port: 80, .. })
        ));
    }

    fn serve_once(answer: &'static [u8]) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = listener.accept() {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf);
                let _ = s.write_all(answer);
            }
        });
        port
    }

    #[test]
    fn an_answering_archive_passes_and_a_missing_release_names_the_status() {
        let ok = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        let missing = serve_once(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");

        probe(&format!("http://127.0.0.1:{ok}/d/Release"), DEFAULT_TIMEOUT).unwrap();
        let err = probe(
            &format!("http://127.0.0.1:{missing}/d/Release"),
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();

        assert_eq!(
            err.to_string(),
            format!("http://127.0.0.1:{missing}/d/Release answered 404 Not Found")
        );
    }

    #[test]
    fn a_missing_local_mirror_is_reported() {
        let err = probe("file:///nonexistent/genos/mirror", DEFAULT_TIMEOUT).unwrap_err();
        assert!(matches!(err, ProbeError::NoFile { .. }), "{err}");
    }
}
