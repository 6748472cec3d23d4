//! Capability tokens: HMAC-SHA256-signed, expiring, scoped to one environment instance, and
//! the host's list of revoked tokens.
//!
//! Wire form: `base64url(payload) "." base64url(tag)` (no padding), where payload is
//! `version:u8(=2) rights:u8 expires_unix:u64le id:[u8;8] env_uid:u64le env_name:utf8` and
//! tag is HMAC-SHA256(key, "genos-stream-token\0" || payload). `env_uid` is the store's id of
//! the environment, never reused, so a token for a destroyed environment does not open a
//! new one of the same name; the name is signed too so a refusal can say what the token was
//! for. Clients treat tokens as opaque.
//!
//! A [`Revocations`] list says which tokens no longer count before they expire: single tokens
//! (by id, `genos token revoke`) and every token of a destroyed environment (by `env_uid`).
//! The stream server checks it at Hello and whenever it changes, for every open session.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use proto::stream::{ErrorCode, Rights};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

const TOKEN_VERSION: u8 = 2;
const DOMAIN: &[u8] = b"genos-stream-token\0";
const KEY_LEN: usize = 32;
/// The longest lifetime hostd issues tokens for.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// The shortest lifetime hostd issues tokens for.
pub const MIN_TTL: Duration = Duration::from_secs(60);
const FIXED_LEN: usize = 1 + 1 + 8 + 8 + 8;

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
    #[error("token is for an earlier environment named {0:?}, destroyed since")]
    StaleEnvironment(String),
    #[error("token {0} was revoked")]
    Revoked(TokenId),
    #[error("token {0} was revoked: its environment was destroyed")]
    EnvironmentDestroyed(TokenId),
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
            TokenError::WrongEnvironment { .. } | TokenError::StaleEnvironment(_) => {
                ErrorCode::WrongEnvironment
            }
            TokenError::Revoked(_) | TokenError::EnvironmentDestroyed(_) => ErrorCode::TokenRevoked,
        }
    }
}

/// Which environment a token opens: the name clients ask for and the host's unique id of
/// this environment (the store's row id), which is never reused although names are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EnvRef {
    pub name: String,
    pub uid: u64,
}

impl EnvRef {
    pub fn new(name: impl Into<String>, uid: u64) -> Self {
        Self {
            name: name.into(),
            uid,
        }
    }
}

/// A token's random identifier (what revocation names), shown as 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(pub [u8; 8]);

impl std::fmt::Display for TokenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A string that is not 16 hex digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a token id is 16 hex digits")]
pub struct TokenIdError;

impl std::str::FromStr for TokenId {
    type Err = TokenIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.is_ascii() {
            return Err(TokenIdError);
        }
        let mut id = [0u8; 8];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| TokenIdError)?;
        }
        Ok(TokenId(id))
    }
}

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub env: EnvRef,
    pub rights: Rights,
    pub expires_unix: u64,
    pub id: TokenId,
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

    /// Issues a token for `env` with `rights`, valid for `ttl` from now.
    pub fn issue(
        &self,
        env: &EnvRef,
        rights: Rights,
        ttl: Duration,
    ) -> Result<String, TokenKeyError> {
        self.issue_expiring_at(env, rights, now_unix().saturating_add(ttl.as_secs()))
    }

    /// Issues a token that expires at `expires_unix` (seconds since the epoch).
    pub fn issue_expiring_at(
        &self,
        env: &EnvRef,
        rights: Rights,
        expires_unix: u64,
    ) -> Result<String, TokenKeyError> {
        let mut id = [0u8; 8];
        SystemRandom::new()
            .fill(&mut id)
            .map_err(|_| TokenKeyError::Random)?;
        let mut payload = Vec::with_capacity(FIXED_LEN + env.name.len());
        payload.push(TOKEN_VERSION);
        payload.push(rights.bits());
        payload.extend_from_slice(&expires_unix.to_le_bytes());
        payload.extend_from_slice(&id);
        payload.extend_from_slice(&env.uid.to_le_bytes());
        payload.extend_from_slice(env.name.as_bytes());
        let tag = hmac::sign(&self.key, &[DOMAIN, &payload].concat());
        Ok(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        ))
    }

    /// Checks signature, then expiry, then scope, in that order: a forged token learns nothing.
    /// Revocation is the caller's second step ([`Revocations::check`]).
    pub fn verify(&self, token: &str, env: &EnvRef) -> Result<Claims, TokenError> {
        self.verify_at(token, env, now_unix())
    }

    pub fn verify_at(
        &self,
        token: &str,
        env: &EnvRef,
        now_unix: u64,
    ) -> Result<Claims, TokenError> {
        let claims = self.decode(token)?;
        if now_unix >= claims.expires_unix {
            return Err(TokenError::Expired(now_unix - claims.expires_unix));
        }
        if claims.env.name != env.name {
            return Err(TokenError::WrongEnvironment {
                token_env: claims.env.name,
                requested: env.name.clone(),
            });
        }
        if claims.env.uid != env.uid {
            return Err(TokenError::StaleEnvironment(claims.env.name));
        }
        Ok(claims)
    }

    /// The claims of a token this key signed, whatever its expiry and scope (to revoke it).
    pub fn decode(&self, token: &str) -> Result<Claims, TokenError> {
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
        let u64_at =
            |at: usize| u64::from_le_bytes(payload[at..at + 8].try_into().expect("8 bytes"));
        let expires_unix = u64_at(2);
        let id = TokenId(payload[10..18].try_into().expect("8 bytes"));
        let uid = u64_at(18);
        let name =
            String::from_utf8(payload[FIXED_LEN..].to_vec()).map_err(|_| TokenError::Malformed)?;
        Ok(Claims {
            env: EnvRef { name, uid },
            rights,
            expires_unix,
            id,
        })
    }
}

/// Tokens that no longer count although unexpired: single tokens and whole environments.
/// Entries for single tokens carry the token's expiry so they can be pruned after it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    tokens: std::collections::HashMap<TokenId, u64>,
    envs: std::collections::HashSet<u64>,
}

impl Revocations {
    /// Revokes one token (until `expires_unix`, after which expiry refuses it anyway).
    pub fn revoke_token(&mut self, id: TokenId, expires_unix: u64) {
        self.tokens.insert(id, expires_unix);
    }

    /// Revokes every token of the environment with store id `uid`.
    pub fn revoke_environment(&mut self, uid: u64) {
        self.envs.insert(uid);
    }

    /// Whether `claims` still count.
    pub fn check(&self, claims: &Claims) -> Result<(), TokenError> {
        if self.envs.contains(&claims.env.uid) {
            return Err(TokenError::EnvironmentDestroyed(claims.id));
        }
        if self.tokens.contains_key(&claims.id) {
            return Err(TokenError::Revoked(claims.id));
        }
        Ok(())
    }

    /// Drops single-token entries whose token has expired.
    pub fn prune(&mut self, now_unix: u64) {
        self.tokens.retain(|_, &mut expires| expires > now_unix);
    }

    pub fn len(&self) -> usize {
        self.tokens.len() + self.envs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn env_a() -> EnvRef {
        EnvRef::new("env-a", 7)
    }

    #[test]
    fn issued_token_verifies_with_its_claims() {
        let key = TokenKey::generate().unwrap();
        let t = key
            .issue(&env_a(), Rights::VIEW | Rights::INPUT, HOUR)
            .unwrap();
        let c = key.verify(&t, &env_a()).unwrap();
        assert_eq!(c.env, env_a());
        assert_eq!(c.rights, Rights::VIEW | Rights::INPUT);
        assert_eq!(key.decode(&t).unwrap(), c);
    }

    #[test]
    fn token_from_another_key_is_forged() {
        let t = TokenKey::generate()
            .unwrap()
            .issue(&env_a(), Rights::all(), HOUR)
            .unwrap();
        let other = TokenKey::generate().unwrap();
        assert_eq!(other.verify(&t, &env_a()), Err(TokenError::Forged));
    }

    #[test]
    fn tampered_rights_are_forged() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue(&env_a(), Rights::VIEW, HOUR).unwrap();
        let (p, sig) = t.split_once('.').unwrap();
        let mut payload = URL_SAFE_NO_PAD.decode(p).unwrap();
        payload[1] = Rights::all().bits();
        let tampered = format!("{}.{sig}", URL_SAFE_NO_PAD.encode(payload));
        assert_eq!(key.verify(&tampered, &env_a()), Err(TokenError::Forged));
    }

    #[test]
    fn expired_token_is_refused() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue_expiring_at(&env_a(), Rights::VIEW, 1000).unwrap();
        assert_eq!(
            key.verify_at(&t, &env_a(), 1010),
            Err(TokenError::Expired(10))
        );
        assert!(key.verify_at(&t, &env_a(), 999).is_ok());
    }

    #[test]
    fn token_for_another_environment_is_refused() {
        let key = TokenKey::generate().unwrap();
        let t = key.issue(&env_a(), Rights::VIEW, HOUR).unwrap();
        assert!(matches!(
            key.verify(&t, &EnvRef::new("env-b", 7)),
            Err(TokenError::WrongEnvironment { .. })
        ));
    }

    #[test]
    fn token_for_a_destroyed_environment_does_not_open_a_new_one_of_the_same_name() {
        let key = TokenKey::generate().unwrap();
        let old = key
            .issue(&EnvRef::new("dev", 1), Rights::all(), HOUR)
            .unwrap();

        let r = key.verify(&old, &EnvRef::new("dev", 2));

        assert_eq!(r, Err(TokenError::StaleEnvironment("dev".into())));
        assert_eq!(r.unwrap_err().code(), ErrorCode::WrongEnvironment);
    }

    #[test]
    fn version_1_tokens_signed_over_the_name_alone_are_refused() {
        let key = TokenKey::from_bytes(&[9; KEY_LEN]);
        let mut payload = vec![1u8, Rights::VIEW.bits()];
        payload.extend_from_slice(&u64::MAX.to_le_bytes());
        payload.extend_from_slice(&[0; 8]);
        payload.extend_from_slice(b"dev-environment");
        let tag = hmac::sign(&key.key, &[DOMAIN, &payload].concat());
        let v1 = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag.as_ref())
        );

        assert_eq!(
            key.verify(&v1, &EnvRef::new("dev-environment", 1)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let key = TokenKey::generate().unwrap();
        for t in ["", "abc", "a.b.c", "!!!.###"] {
            assert!(matches!(
                key.verify(t, &env_a()),
                Err(TokenError::Malformed | TokenError::Forged)
            ));
        }
    }

    #[test]
    fn key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let a = TokenKey::load_or_create(&path).unwrap();
        let t = a.issue(&env_a(), Rights::VIEW, HOUR).unwrap();
        let b = TokenKey::load_or_create(&path).unwrap();
        assert!(b.verify(&t, &env_a()).is_ok());
    }

    #[test]
    fn revoked_tokens_and_tokens_of_destroyed_environments_no_longer_count() {
        let key = TokenKey::generate().unwrap();
        let a = key
            .decode(&key.issue(&env_a(), Rights::VIEW, HOUR).unwrap())
            .unwrap();
        let b = key
            .decode(&key.issue(&env_a(), Rights::VIEW, HOUR).unwrap())
            .unwrap();
        let other = key
            .decode(
                &key.issue(&EnvRef::new("env-b", 8), Rights::VIEW, HOUR)
                    .unwrap(),
            )
            .unwrap();
        let mut list = Revocations::default();

        list.revoke_token(a.id, a.expires_unix);
        assert_eq!(list.check(&a), Err(TokenError::Revoked(a.id)));
        assert_eq!(list.check(&b), Ok(()));
        list.revoke_environment(7);

        assert_eq!(list.check(&b), Err(TokenError::EnvironmentDestroyed(b.id)));
        assert_eq!(list.check(&other), Ok(()));
        assert_eq!(list.check(&a).unwrap_err().code(), ErrorCode::TokenRevoked);
    }

    #[test]
    fn revocations_of_expired_tokens_are_pruned() {
        let mut list = Revocations::default();
        list.revoke_token(TokenId([1; 8]), 100);
        list.revoke_token(TokenId([2; 8]), 300);
        list.revoke_environment(5);

        list.prune(200);

        assert_eq!(list.len(), 2);
    }

    #[test]
    fn token_ids_print_and_parse_as_hex() {
        let id = TokenId([0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 0xff]);
        assert_eq!(id.to_string(), "deadbeef000102ff");
        assert_eq!("deadbeef000102ff".parse(), Ok(id));
        assert_eq!("deadbeef".parse::<TokenId>(), Err(TokenIdError));
        assert_eq!("zzadbeef000102ff".parse::<TokenId>(), Err(TokenIdError));
    }
}
