//! Connect URLs: `genos://HOST:PORT/ENV_ID?token=TOKEN&cert=SHA256HEX`.

/// Why a connect URL was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("not a URL: {0}")]
    Syntax(String),
    #[error("scheme must be genos://, not {0}://")]
    Scheme(String),
    #[error("URL has no host")]
    NoHost,
    #[error("URL has no port")]
    NoPort,
    #[error("URL has no environment id in its path")]
    NoEnvironment,
    #[error("URL has no token= parameter")]
    NoToken,
    #[error("URL has no cert= parameter (the server certificate's SHA-256 fingerprint)")]
    NoCert,
    #[error("cert= must be 64 hex digits (SHA-256), got {0:?}")]
    BadCert(String),
}

/// A parsed connect URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectUrl {
    /// Host name or IP literal (IPv6 without brackets).
    pub host: String,
    pub port: u16,
    pub env_id: String,
    pub token: String,
    /// SHA-256 of the server certificate's DER encoding.
    pub cert_sha256: [u8; 32],
}

impl std::str::FromStr for ConnectUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let u = url::Url::parse(s.trim()).map_err(|e| UrlError::Syntax(e.to_string()))?;
        if u.scheme() != "genos" {
            return Err(UrlError::Scheme(u.scheme().to_owned()));
        }
        let host = match u.host() {
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            Some(h) => h.to_string(),
            None => return Err(UrlError::NoHost),
        };
        let port = u.port().ok_or(UrlError::NoPort)?;
        let env_id = percent_decode(u.path().trim_start_matches('/'));
        if env_id.is_empty() || env_id.contains('/') {
            return Err(UrlError::NoEnvironment);
        }
        let mut token = None;
        let mut cert = None;
        for (k, v) in u.query_pairs() {
            match &*k {
                "token" => token = Some(v.into_owned()),
                "cert" => cert = Some(v.into_owned()),
                _ => {}
            }
        }
        let token = token.filter(|t| !t.is_empty()).ok_or(UrlError::NoToken)?;
        let cert = cert.ok_or(UrlError::NoCert)?;
        Ok(ConnectUrl {
            host,
            port,
            env_id,
            token,
            cert_sha256: parse_hex32(&cert).ok_or(UrlError::BadCert(cert))?,
        })
    }
}

fn percent_decode(s: &str) -> String {
    url::form_urlencoded::parse(format!("x={s}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Parses 64 hex digits (colons allowed between bytes, as `openssl x509 -fingerprint` prints).
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = s.bytes().filter(|&b| b != b':').collect();
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in digits.chunks(2).enumerate() {
        let hex = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn full_url_parses() {
        let u: ConnectUrl = format!("genos://127.0.0.1:4433/demo?token=abc.def&cert={FP}")
            .parse()
            .unwrap();
        assert_eq!(u.host, "127.0.0.1");
        assert_eq!(u.port, 4433);
        assert_eq!(u.env_id, "demo");
        assert_eq!(u.token, "abc.def");
        assert_eq!(u.cert_sha256[0], 0xba);
    }

    #[test]
    fn ipv6_host_is_unbracketed() {
        let u: ConnectUrl = format!("genos://[::1]:1/e?token=t&cert={FP}")
            .parse()
            .unwrap();
        assert_eq!(u.host, "::1");
    }

    #[test]
    fn missing_parts_are_named() {
        let cases = [
            (
                format!("http://h:1/e?token=t&cert={FP}"),
                UrlError::Scheme("http".into()),
            ),
            (format!("genos://h/e?token=t&cert={FP}"), UrlError::NoPort),
            (
                format!("genos://h:1/?token=t&cert={FP}"),
                UrlError::NoEnvironment,
            ),
            (format!("genos://h:1/e?cert={FP}"), UrlError::NoToken),
            ("genos://h:1/e?token=t".to_owned(), UrlError::NoCert),
            (
                "genos://h:1/e?token=t&cert=abc".to_owned(),
                UrlError::BadCert("abc".into()),
            ),
        ];
        for (url, want) in cases {
            assert_eq!(url.parse::<ConnectUrl>(), Err(want), "{url}");
        }
    }
}
