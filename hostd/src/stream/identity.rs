//! The stream server's TLS identity: a self-signed ECDSA P-256 certificate persisted in the
//! state directory, and its SHA-256 fingerprint that clients pin (carried in connect URLs).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("generating the self-signed certificate failed")]
    Generate(#[from] rcgen::Error),
}

/// Certificate, key and fingerprint of the stream server.
#[derive(Debug)]
pub struct Identity {
    pub cert: CertificateDer<'static>,
    key_pkcs8: Vec<u8>,
    /// Lowercase hex SHA-256 of the certificate's DER encoding.
    pub fingerprint: String,
}

/// Lowercase hex SHA-256 of `der`.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` readable by the owner only (key material).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    // A temporary file left by a crash keeps its own mode if reopened: start afresh.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    // Rename so a crash never leaves a half-written key behind.
    std::fs::rename(&tmp, path)
}

impl Identity {
    /// A new certificate for `localhost` and the given names, not persisted.
    pub fn generate(names: &[String]) -> Result<Self, IdentityError> {
        let mut sans = vec!["localhost".to_owned()];
        sans.extend(names.iter().cloned());
        let ck = rcgen::generate_simple_self_signed(sans)?;
        let cert = ck.cert.der().clone();
        Ok(Self {
            fingerprint: fingerprint(&cert),
            cert,
            key_pkcs8: ck.signing_key.serialize_der(),
        })
    }

    /// Loads `cert.der`/`key.der` from `dir`, creating them on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let cert_path = dir.join("cert.der");
        let key_path = dir.join("key.der");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Io { path, source }
        };
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read(&cert_path).map_err(io(&cert_path))?;
            let key = std::fs::read(&key_path).map_err(io(&key_path))?;
            return Ok(Self {
                fingerprint: fingerprint(&cert),
                cert: CertificateDer::from(cert),
                key_pkcs8: key,
            });
        }
        let id = Self::generate(&[])?;
        // Key first: a cert without its key would be unusable after a crash in between.
        write_private(&key_path, &id.key_pkcs8).map_err(io(&key_path))?;
        write_private(&cert_path, &id.cert).map_err(io(&cert_path))?;
        Ok(id)
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.fingerprint.len(), 64);
        let mode = std::fs::metadata(dir.path().join("key.der")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn write_private_ignores_the_mode_of_a_stale_temporary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("token.key");
        // A crash left a world-readable temporary file behind.
        std::fs::write(key.with_extension("tmp"), b"old").unwrap();
        std::fs::set_permissions(
            key.with_extension("tmp"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        write_private(&key, b"secret").unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read(&key).unwrap(), b"secret");
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        assert_eq!(
            fingerprint(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
