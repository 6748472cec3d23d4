//! TLS for the client: trust exactly the server certificate whose SHA-256 the URL pins.
//!
//! Names and CAs are irrelevant for a pinned self-signed certificate; the handshake signature
//! is still verified (TLS 1.3 only, ring provider) so the server must hold the key.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Accepts only the certificate with the pinned fingerprint; remembers what it saw.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
    /// Fingerprint of a certificate that did not match, for a clear error message.
    pub mismatch: Mutex<Option<String>>,
}

impl PinnedVerifier {
    pub fn new(expected: [u8; 32], provider: Arc<CryptoProvider>) -> Self {
        Self {
            expected,
            provider,
            mismatch: Mutex::new(None),
        }
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = ring::digest::digest(&ring::digest::SHA256, end_entity.as_ref());
        // Comparing public fingerprints: no secret, constant time not needed.
        if got.as_ref() == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().expect("poisoned") = Some(hex(got.as_ref()));
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A rustls client config (TLS 1.3, ring, our ALPN) pinned to `cert_sha256`.
pub fn client_config(
    cert_sha256: [u8; 32],
) -> Result<(rustls::ClientConfig, Arc<PinnedVerifier>), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedVerifier::new(cert_sha256, provider.clone()));
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![proto::stream::ALPN.to_vec()];
    Ok((cfg, verifier))
}
