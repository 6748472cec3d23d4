//! Capability tokens: HMAC-SHA256-signed, expiring, scoped to one environment.
//!
//! Wire form: `base64url(payload) "." base64url(tag)` (no padding), where payload is
//! `version:u8 rights:u8 expires_unix:u64le id:[u8;8] env_id:utf8` and tag is
//! HMAC-SHA256(key, "genos-stream-token\0" || payload). Clients treat tokens as opaque.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use proto::stream::{ErrorCode, Rights};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

const TOKEN_VERSION: u8 = 1;
const DOMAIN: &[u8] = b"genos-stream-token\0";
const KEY_LEN: usize = 32;
const FIXED_LEN: usize = 1 + 1 + 8 + 8;

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid (forged or signed by another host)")]
    Forged,
    #[error("token expired {0} s ago")]
    Expired(u64),
    #[error("token is for environment {token_env:?}, not {requested:?}")]
    WrongEnvironment {
        token_env: String,
        requested: String,
    },
}

/// Why the signing key could not be loaded or a token not issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenKeyError {
    #[error("token key file {path}")]
    KeyFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("token key file {0} has the wrong length")]
    KeyLength(String),
    #[error("system random generator failed")]
    Random,
}

impl TokenError {
    /// The protocol error code a client receives for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Malformed => ErrorCode::BadToken,
            TokenError::Forged => ErrorCode::TokenForged,
            TokenError::Expired(_) => ErrorCode::TokenExpired,
            TokenError::WrongEnvironment { .. } => ErrorCode::WrongEnvironment,
        }
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub env_id: String,
    pub rights: Rights,
    pub expires_unix: u64,
    pub id: [u8; 8],
}

/// The host's token signing key.
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl TokenKey {
    /// A fresh random key (tests, ephemeral demos).
    pub fn generate() -> Result<Self, TokenKeyError> {
        let mut bytes = [0u8; KEY_LEN];
        SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| TokenKeyError::Random)?;
        Ok(Self::from_bytes(&bytes))
    }

    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, bytes),
        }
    }

    /// Loads the key from `path`, creating it (mode 0600) if absent.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenKeyError> {
        let io = |source| TokenKeyError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == KEY_LEN => Ok(Self::from_bytes(&bytes)),
            Ok(_) => Err(TokenKeyError::KeyLength(path.display().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| TokenKeyError::Random)?;
                super::identity::write_private(path, &bytes).map_err(io)?;
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Issues a token for `env_id` with `rights`, valid for `ttl` from now.
    pub fn issue(
        &self,
        env_id: &str,
        rights: Rights,
        ttl: Duration,
    ) -> Result<String, TokenKeyError> {
        self.issue_expiring_at(env_id, rights, now_unix().saturating_add(ttl.as_secs()))
    }

    /// Issues a token that expires at `expires_unix` (seconds since the epoch).
    pub fn issue_expiring_at(
        &self,
        env_id: &str,
        rights: Rights,
        expires_unix: u64,
    ) -> Result<String, TokenKeyError> {
        let mut id = [0u8; 8];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| TokenKeyError::Random)?;
        let mut payload = Vec::with_capacity(FIXED_LEN + env_id.len());
        payload.push(TOKEN_VERSION);
        payload.push(rights.bits());
        payload.extend_from_slice(&expires_unix.to_le_bytes());
        payload.extend_from_slice(&id);
        payload.extend_from_slice(env_id.as_bytes());
        let tag = hmac::sign(&self.key, &[DOMAIN, &payload].concat());
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// Checks signature, then expiry, then scope, in that order: a forged token learns nothing.
    pub fn verify(&self, token: &str, env_id: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, env_id, now_unix())
    }

    pub fn verify_at(
        &self,
        token: &str,
        env_id: &str,
        now_unix: u64,
    ) -> Result<Claims, TokenError> {
        let (p, t) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(t)
            .map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.key, &[DOMAIN, &payload].concat(), &tag)
            .map_err(|_| TokenError::Forged)?;
        if payload.len() < FIXED_LEN || payload[0] != TOKEN_VERSION {
            return Err(TokenError::Malformed);
        }
        let rights = Rights::from_bits(payload[1]).ok_or(TokenError::Malformed)?;
        let expires_unix = u64::from_le_bytes(payload[2..10].try_into().expect("8 bytes"));
        let id: [u8; 8] = payload[10..18].try_into().expect("8 bytes");
        let token_env =
            String::from_utf8(payload[FIXED_LEN..].to_vec()).map_err(|_| TokenError::Malformed)?;
        if now_unix >= expires_unix {
            return Err(TokenError::Expired(now_unix - expires_unix));
        }
        if token_env != env_id {
            return Err(TokenError::WrongEnvironment {
                token_env,
                requested: env_id.to_owned(),
            });
        }
        Ok(Claims {
            env_id: token_env,
            rights,
            expires_unix,
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn issued_token_verifies_with_its_claims() {
        let key = TokenKey::generate().unwrap();
        let t = key
            .issue("env-a", Rights::VIEW | Rights::INPUT, HOUR)
            .unwrap();
        let c = key.verify(&t, "env-a").unwrap();
        assert_eq!(c.env_id, "env-a");
        assert_eq!(c.rights, Rights::VIEW | Rights::INPUT);
    }

    #[test]
    fn token_from_another_key_is_forged() {
        let t = TokenKey::generate()
            .unwrap()
            .issue("env-a", Rights::all(), HOUR)
            .unwrap();
        let other = TokenKey::generate().unwrap();
        assert_eq!(other.verify(&t, "env-a"), Err(TokenError::Forged));
    }

    #[test]
    fn tampered_rights_are_forged() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue("env-a", Rights::VIEW, HOUR).unwrap();
        let (p, sig) = t.split_once('.').unwrap();
        let mut payload = URL_SAFE_NO_PAD.decode(p).unwrap();
        payload[1] = Rights::all().bits();
        let tampered = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(payload));
        assert_eq!(key.verify(&tampered, "env-a"), Err(TokenError::Forged));
    }

    #[test]
    fn expired_token_is_refused() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue_expiring_at("env-a", Rights::VIEW, 1000).unwrap();
        assert_eq!(
            key.verify_at(&t, "env-a", 1010),
            Err(TokenError::Expired(10))
        );
        assert!(key.verify_at(&t, "env-a", 999).is_ok());
    }

    #[test]
    fn token_for_another_environment_is_refused() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue("env-a", Rights::VIEW, HOUR).unwrap();
        assert!(matches!(
            key.verify(&t, "env-b"),
            Err(TokenError::WrongEnvironment { .. })
        ));
    }

    #[test]
    fn garbage_is_malformed() {
        let key = TokenKey::generate().unwrap();
        for t in ["", "abc", "a.b.c", "!!!.###"] {
            assert!(matches!(
                key.verify(t, "env-a"),
                Err(TokenError::Malformed | TokenError::Forged)
            ));
        }
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let a = TokenKey::load_or_create(&path).unwrap();
        let t = a.issue("e", Rights::VIEW, HOUR).unwrap();
        let b = TokenKey::load_or_create(&path).unwrap();
        assert!(b.verify(&t, "e").is_ok());
    }
}
