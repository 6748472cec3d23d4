//! Sans-IO HTTP/1.1 request parsing and response encoding for the control API.
//!
//! [`parse_request`] is a pure function from the bytes received so far on a connection to
//! either a complete [`Request`] (and how many bytes it used), "need more bytes", or a
//! [`ParseError`] that maps to a 4xx/5xx status. The request line and headers are parsed
//! by `httparse`; this module adds the limits (head size, header count, body size), body
//! framing by `Content-Length` only, keep-alive and `Expect: 100-continue` handling.

use std::fmt::Write as _;

/// Size limits applied while parsing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line plus headers, final CRLF included.
    pub max_head_bytes: usize,
    /// Most header fields.
    pub max_headers: usize,
    /// Longest body.
    pub max_body_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8 * 1024,
            max_headers: 32,
            max_body_bytes: 256 * 1024,
        }
    }
}

/// Request method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    /// `GET`
    Get,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// Any other method, as sent.
    Other(String),
}

impl Method {
    fn from_token(token: &str) -> Self {
        match token {
            "GET" => Self::Get,
            "PUT" => Self::Put,
            "PATCH" => Self::Patch,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The method as it appears on the request line.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Get => "GET",
            Self::Put => "PUT",
            Self::Patch => "PATCH",
            Self::Other(s) => s,
        }
    }
}

/// HTTP version of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// HTTP/1.0: connections close after each response unless keep-alive is asked for.
    Http10,
    /// HTTP/1.1: connections persist unless `Connection: close`.
    Http11,
}

/// A complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Method,
    /// Path part of the request target (always starts with `/`).
    pub path: String,
    /// Query string after `?`, if any (the API ignores it).
    pub query: Option<String>,
    /// HTTP version.
    pub version: Version,
    /// Header fields in order: name (lowercased) and raw value.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body (`Content-Length` bytes).
    pub body: Vec<u8>,
    /// Whether a `Content-Length` header was present.
    pub has_content_length: bool,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

impl Request {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Outcome of parsing the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole request; `consumed` bytes of the buffer belong to it.
    Complete {
        /// The request.
        request: Request,
        /// Bytes used (head and body); the rest starts the next request.
        consumed: usize,
    },
    /// More bytes are needed. `expect_continue` is true once the head is complete, carries
    /// `Expect: 100-continue` and the body is still missing: the server should send
    /// `100 Continue`.
    Partial {
        /// Whether the client waits for `100 Continue` before sending the body.
        expect_continue: bool,
    },
}

/// Why a request cannot be parsed. The connection is answered with [`ParseError::status`]
/// and closed, since the framing of what follows is unknown.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The request line or a header is not valid HTTP/1.x.
    #[error("malformed request: {0}")]
    Malformed(httparse::Error),
    /// The request line and headers exceed [`Limits::max_head_bytes`].
    #[error("request head exceeds {0} bytes")]
    HeadTooLarge(usize),
    /// More than [`Limits::max_headers`] header fields.
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
    /// `Content-Length` is not a decimal number, or appears twice with different values.
    #[error("invalid Content-Length")]
    BadContentLength,
    /// The body exceeds [`Limits::max_body_bytes`].
    #[error("body of {len} bytes exceeds the limit of {limit} bytes")]
    BodyTooLarge {
        /// Announced length.
        len: u64,
        /// The limit.
        limit: usize,
    },
    /// `Transfer-Encoding` is present (only `Content-Length` bodies are supported).
    #[error("Transfer-Encoding is not supported; send Content-Length")]
    TransferEncoding,
    /// An `Expect` other than `100-continue`.
    #[error("unsupported Expect header")]
    Expectation,
    /// The request target is not an absolute path.
    #[error("request target must be an absolute path")]
    BadTarget,
    /// Not HTTP/1.0 or HTTP/1.1.
    #[error("only HTTP/1.0 and HTTP/1.1 are supported")]
    Version,
}

impl ParseError {
    /// HTTP status code for this error.
    pub fn status(&self) -> u16 {
        match self {
            Self::Malformed(_) | Self::BadContentLength | Self::BadTarget => 400,
            Self::BodyTooLarge { .. } => 413,
            Self::Expectation => 417,
            Self::HeadTooLarge(_) | Self::TooManyHeaders(_) => 431,
            Self::TransferEncoding => 501,
            Self::Version => 505,
        }
    }
}

/// Whether the comma-separated header `value` contains `token` (case-insensitive).
fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses one request from the start of `buf`.
pub fn parse_request(buf: &[u8], limits: &Limits) -> Result<Parsed, ParseError> {
    let mut header_slots = vec![httparse::EMPTY_HEADER; limits.max_headers];
    let mut raw = httparse::Request::new(&mut header_slots);
    let head_len = match raw.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_head_bytes {
                return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
            }
            return Ok(Parsed::Partial {
                expect_continue: false,
            });
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Err(ParseError::TooManyHeaders(limits.max_headers))
        }
        Err(httparse::Error::Version) => return Err(ParseError::Version),
        Err(e) => return Err(ParseError::Malformed(e)),
    };
    if head_len > limits.max_head_bytes {
        return Err(ParseError::HeadTooLarge(limits.max_head_bytes));
    }

    // httparse guarantees these are set on a complete parse.
    let (Some(method), Some(target), Some(minor)) = (raw.method, raw.path, raw.version) else {
        return Err(ParseError::Malformed(httparse::Error::Token));
    };
    let version = if minor == 0 {
        Version::Http10
    } else {
        Version::Http11
    };
    if !target.starts_with('/') {
        return Err(ParseError::BadTarget);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };

    let mut content_length: Option<u64> = None;
    let mut keep_alive = version == Version::Http11;
    let mut expect_continue = false;
    let mut headers = Vec::with_capacity(raw.headers.len());
    for h in raw.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        match name.as_str() {
            "content-length" => {
                let text =
                    std::str::from_utf8(h.value).map_err(|_| ParseError::BadContentLength)?;
                let text = text.trim_matches([' ', '\t']);
                if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(ParseError::BadContentLength);
                }
                let len: u64 = text.parse().map_err(|_| ParseError::BadContentLength)?;
                if content_length.is_some_and(|prev| prev != len) {
                    return Err(ParseError::BadContentLength);
                }
                content_length = Some(len);
            }
            "transfer-encoding" => return Err(ParseError::TransferEncoding),
            "connection" => {
                if has_token(h.value, "close") {
                    keep_alive = false;
                } else if has_token(h.value, "keep-alive") {
                    keep_alive = true;
                }
            }
            "expect" => {
                if has_token(h.value, "100-continue") {
                    expect_continue = version == Version::Http11;
                } else {
                    return Err(ParseError::Expectation);
                }
            }
            _ => {}
        }
        headers.push((name, h.value.to_vec()));
    }

    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_body_bytes as u64 {
        return Err(ParseError::BodyTooLarge {
            len: body_len,
            limit: limits.max_body_bytes,
        });
    }
    // Fits in usize: bounded by max_body_bytes.
    let body_len = body_len as usize;
    let available = buf.len() - head_len;
    if available < body_len {
        return Ok(Parsed::Partial {
            expect_continue: expect_continue && available == 0,
        });
    }
    Ok(Parsed::Complete {
        request: Request {
            method: Method::from_token(method),
            path,
            query,
            version,
            headers,
            body: buf[head_len..head_len + body_len].to_vec(),
            has_content_length: content_length.is_some(),
            keep_alive,
        },
        consumed: head_len + body_len,
    })
}

/// The interim response sent when a client waits for `100 Continue`.
pub const CONTINUE_RESPONSE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A response to encode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body (empty for 204).
    pub body: Vec<u8>,
    /// Value of an `Allow` header (for 405).
    pub allow: Option<&'static str>,
    /// Whether to send `Connection: close` (the server then closes after writing).
    pub close: bool,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: Vec::new(),
            allow: None,
            close: false,
        }
    }

    /// A JSON body with `status`.
    pub fn json<T: serde::Serialize + ?Sized>(status: u16, value: &T) -> Self {
        // Serialising plain data (no maps with non-string keys) cannot fail.
        let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
        Self {
            status,
            body,
            allow: None,
            close: false,
        }
    }

    /// An error: `{"error": reason}` with `status`.
    pub fn error(status: u16, reason: &str) -> Self {
        Self::json(
            status,
            &vmm_api::ErrorBody {
                error: reason.to_owned(),
            },
        )
    }

    /// Encodes status line, headers and body.
    pub fn encode(&self) -> Vec<u8> {
        let mut head = String::with_capacity(128);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        head.push_str("Server: genos-vmm\r\n");
        if self.status != 204 {
            if !self.body.is_empty() {
                head.push_str("Content-Type: application/json\r\n");
            }
            let _ = write!(head, "Content-Length: {}\r\n", self.body.len());
        }
        if let Some(allow) = self.allow {
            let _ = write!(head, "Allow: {allow}\r\n");
        }
        if self.close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        if self.status != 204 {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

/// Standard reason phrase for the status codes the API uses.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(bytes: &[u8]) -> Result<Parsed, ParseError> {
        parse_request(bytes, &Limits::default())
    }

    fn complete(bytes: &[u8]) -> (Request, usize) {
        match parse(bytes).unwrap() {
            Parsed::Complete { request, consumed } => (request, consumed),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    #[test]
    fn get_without_body_is_complete() {
        let (req, used) = complete(b"GET /vm HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(req.method, Method::Get);
        assert_eq!(req.path, "/vm");
        assert_eq!(req.version, Version::Http11);
        assert!(req.keep_alive);
        assert!(req.body.is_empty());
        assert!(!req.has_content_length);
        assert_eq!(req.header("HOST"), Some(&b"localhost"[..]));
        assert_eq!(used, 37);
    }

    #[test]
    fn put_with_content_length_body_is_complete() {
        let bytes = b"PUT /vm/actions HTTP/1.1\r\nContent-Length: 18\r\n\r\n{\"action\":\"start\"}";
        let (req, used) = complete(bytes);
        assert_eq!(req.method, Method::Put);
        assert_eq!(req.body, b"{\"action\":\"start\"}");
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn query_is_split_from_path() {
        let (req, _) = complete(b"GET /metrics?pretty=1 HTTP/1.1\r\n\r\n");
        assert_eq!(req.path, "/metrics");
        assert_eq!(req.query.as_deref(), Some("pretty=1"));
    }

    #[test]
    fn request_split_across_reads_completes_only_at_the_end() {
        let body = r#"{"width":800,"height":600}"#;
        let text = format!(
            "PUT /display HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let bytes = text.as_bytes();
        for cut in 0..bytes.len() {
            assert_eq!(
                parse(&bytes[..cut]).unwrap(),
                Parsed::Partial {
                    expect_continue: false
                },
                "cut at {cut}"
            );
        }
        let (req, used) = complete(bytes);
        assert_eq!(req.body, body.as_bytes());
        assert_eq!(used, bytes.len());
    }

    #[test]
    fn pipelined_requests_are_parsed_one_at_a_time() {
        let bytes = b"GET /vm HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n";
        let (first, used) = complete(bytes);
        assert_eq!(first.path, "/vm");
        let (second, _) = complete(&bytes[used..]);
        assert_eq!(second.path, "/metrics");
    }

    #[test]
    fn connection_header_controls_keep_alive() {
        let (req, _) = complete(b"GET /vm HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!req.keep_alive);
        let (req, _) = complete(b"GET /vm HTTP/1.0\r\n\r\n");
        assert!(!req.keep_alive);
        let (req, _) = complete(b"GET /vm HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(req.keep_alive);
    }

    #[test]
    fn expect_continue_is_reported_until_body_bytes_arrive() {
        let head = b"PUT /vm/config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(
            parse(head).unwrap(),
            Parsed::Partial {
                expect_continue: true
            }
        );
        let mut with_some = head.to_vec();
        with_some.push(b'{');
        assert_eq!(
            parse(&with_some).unwrap(),
            Parsed::Partial {
                expect_continue: false
            }
        );
        with_some.push(b'}');
        assert!(matches!(
            parse(&with_some).unwrap(),
            Parsed::Complete { .. }
        ));
    }

    #[test]
    fn unknown_expectation_is_417() {
        let err = parse(b"PUT /vm HTTP/1.1\r\nExpect: magic\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), 417);
    }

    #[test]
    fn oversized_head_is_431_even_before_it_ends() {
        let mut bytes = b"GET /vm HTTP/1.1\r\nX-Long: ".to_vec();
        bytes.extend(std::iter::repeat_n(b'a', 9000));
        assert_eq!(parse(&bytes).unwrap_err(), ParseError::HeadTooLarge(8192));
        bytes.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&bytes).unwrap_err().status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut bytes = b"GET /vm HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            bytes.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        bytes.extend_from_slice(b"\r\n");
        assert_eq!(parse(&bytes).unwrap_err(), ParseError::TooManyHeaders(32));
    }

    #[test]
    fn oversized_body_is_413_without_waiting_for_it() {
        let err = parse(b"PUT /input HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), 413);
        let err = parse(b"PUT /input HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n")
            .unwrap_err();
        assert_eq!(err, ParseError::BadContentLength);
    }

    #[test]
    fn bad_content_length_is_400() {
        for value in ["abc", "-1", "+5", "", "1 2", "0x10"] {
            let bytes = format!("PUT /vm HTTP/1.1\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(
                parse(bytes.as_bytes()).unwrap_err(),
                ParseError::BadContentLength,
                "{value:?}"
            );
        }
        let conflicting = b"PUT /vm HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab";
        assert_eq!(
            parse(conflicting).unwrap_err(),
            ParseError::BadContentLength
        );
        let repeated = b"PUT /vm HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab";
        assert!(matches!(parse(repeated).unwrap(), Parsed::Complete { .. }));
    }

    #[test]
    fn missing_body_bytes_leave_the_request_partial() {
        let bytes = b"PUT /vm/config HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}";
        assert_eq!(
            parse(bytes).unwrap(),
            Parsed::Partial {
                expect_continue: false
            }
        );
    }

    #[test]
    fn put_without_content_length_has_empty_body() {
        let (req, _) = complete(b"PUT /vm/actions HTTP/1.1\r\n\r\n");
        assert!(req.body.is_empty());
        assert!(!req.has_content_length);
    }

    #[test]
    fn chunked_transfer_encoding_is_501() {
        let err = parse(b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), 501);
    }

    #[test]
    fn garbage_is_400() {
        for bytes in [
            &b"\x00\x01\x02\x03\r\n\r\n"[..],
            b"GET\r\n\r\n",
            b"GET /vm HTTP/1.1\r\nBad Header\r\n\r\n",
            b"\xff\xfe GET / HTTP/1.1\r\n\r\n",
        ] {
            let err = parse(bytes).unwrap_err();
            assert_eq!(err.status(), 400, "{bytes:?}");
        }
    }

    #[test]
    fn other_http_versions_are_505() {
        let err = parse(b"GET /vm HTTP/2.0\r\n\r\n").unwrap_err();
        assert_eq!(err.status(), 505);
    }

    #[test]
    fn non_absolute_target_is_400() {
        let err = parse(b"GET http://host/vm HTTP/1.1\r\n\r\n").unwrap_err();
        assert_eq!(err, ParseError::BadTarget);
        assert_eq!(
            parse(b"OPTIONS * HTTP/1.1\r\n\r\n").unwrap_err(),
            ParseError::BadTarget
        );
    }

    #[test]
    fn responses_encode_length_type_and_close() {
        let mut resp = Response::error(404, "no such endpoint: /x");
        resp.close = true;
        let text = String::from_utf8(resp.encode()).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("Content-Type: application/json\r\n"));
        assert!(text.contains("Content-Length: 32\r\n"));
        assert!(text.contains("Connection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{\"error\":\"no such endpoint: /x\"}"));

        let text = String::from_utf8(Response::no_content().encode()).unwrap();
        assert_eq!(text, "HTTP/1.1 204 No Content\r\nServer: genos-vmm\r\n\r\n");
    }
}
