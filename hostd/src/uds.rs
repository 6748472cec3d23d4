//! HTTP/1.1 client over a Unix socket: the CLI's side of admin.sock and hostd's side of each
//! genos-vmm control socket.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum UdsError {
    #[error("cannot connect to {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange with {path} failed")]
    Http {
        path: PathBuf,
        #[source]
        source: hyper::Error,
    },
    #[error("bad request for {0}")]
    Request(String),
    #[error("{path} did not answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
}

/// One response: status and body bytes.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// Sends one request on a fresh connection, with a deadline.
pub async fn request(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
    timeout: Duration,
) -> Result<Response, UdsError> {
    match tokio::time::timeout(timeout, request_inner(sock, method, uri, body)).await {
        Ok(r) => r,
        Err(_) => Err(UdsError::Timeout {
            path: sock.into(),
            secs: timeout.as_secs(),
        }),
    }
}

async fn request_inner(
    sock: &Path,
    method: &str,
    uri: &str,
    body: Option<&serde_json::Value>,
) -> Result<Response, UdsError> {
    let stream = UnixStream::connect(sock)
        .await
        .map_err(|source| UdsError::Connect {
            path: sock.into(),
            source,
        })?;
    let http = |source| UdsError::Http {
        path: sock.into(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    tokio::spawn(async move {
        // The connection ends when the response is read; its error (if any) surfaces there.
        let _ = conn.await;
    });
    let bytes = body
        .map(|b| serde_json::to_vec(b).expect("json serialises"))
        .unwrap_or_default();
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "localhost");
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .header("content-length", bytes.len())
        .body(Full::new(Bytes::from(bytes)))
        .map_err(|e| UdsError::Request(e.to_string()))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(http)?
        .to_bytes()
        .to_vec();
    Ok(Response { status, body })
}
