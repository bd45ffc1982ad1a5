//! TLS for `sslmode` require / verify-ca / verify-full, on rustls.
//!
//! libpq's semantics: `require` encrypts without checking the certificate unless a root
//! certificate file exists, in which case it behaves as `verify-ca`; `verify-ca` checks the
//! chain only; `verify-full` checks the chain and that the certificate names the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use crate::conninfo::SslMode;

/// Builds the client configuration for a mode. `Err` is a message for the user.
pub fn client_config(
    mode: SslMode,
    rootcert: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let default_root = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".postgresql/root.crt"))
        .filter(|p| p.exists());
    let root_path = rootcert.map(Path::to_path_buf).or(default_root);
    let verify = match mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Require => root_path.is_some(),
        _ => false,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if verify {
        let path = root_path.ok_or_else(|| {
            "sslmode requires a root certificate, but none was given: set sslrootcert \
             (or PGSSLROOTCERT), or put it in ~/.postgresql/root.crt"
                .to_string()
        })?;
        let mut roots = RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(&path).map_err(|e| {
            format!(
                "could not read root certificate file \"{}\": {e}",
                path.display()
            )
        })?;
        for c in certs {
            let c = c.map_err(|e| {
                format!(
                    "could not parse root certificate file \"{}\": {e}",
                    path.display()
                )
            })?;
            roots
                .add(c)
                .map_err(|e| format!("invalid certificate in \"{}\": {e}", path.display()))?;
        }
        if roots.is_empty() {
            return Err(format!(
                "root certificate file \"{}\" holds no certificate",
                path.display()
            ));
        }
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| format!("could not set up certificate verification: {e}"))?;
        Arc::new(Verifier {
            inner: Some(inner),
            check_name: mode == SslMode::VerifyFull,
            provider: provider.clone(),
        })
    } else {
        Arc::new(Verifier {
            inner: None,
            check_name: false,
            provider: provider.clone(),
        })
    };
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// The name rustls checks against the certificate (an IP address stays an IP).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_string())
        .map_err(|_| format!("\"{host}\" is not a valid host name for TLS"))
}

#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Ok(v) => Ok(v),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            Err(e) => Err(e),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
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

/// The `tls-server-end-point` channel-binding data (RFC 5929): the hash of the server's
/// certificate, with SHA-256 unless the certificate is signed with SHA-384 or SHA-512.
pub fn server_end_point(cert_der: &[u8]) -> Vec<u8> {
    match signature_hash(cert_der) {
        Some(384) => sha2::Sha384::digest(cert_der).to_vec(),
        Some(512) => sha2::Sha512::digest(cert_der).to_vec(),
        _ => sha2::Sha256::digest(cert_der).to_vec(),
    }
}

/// Reads the certificate's outer signatureAlgorithm OID and returns the SHA-2 width it names.
fn signature_hash(der: &[u8]) -> Option<u32> {
    fn header(b: &[u8]) -> Option<(u8, usize, usize)> {
        let tag = *b.first()?;
        let l0 = *b.get(1)? as usize;
        if l0 < 0x80 {
            return Some((tag, 2, l0));
        }
        let n = l0 & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        Some((tag, 2 + n, len))
    }
    let (_, h, _) = header(der)?; // Certificate SEQUENCE
    let rest = der.get(h..)?;
    let (_, th, tl) = header(rest)?; // tbsCertificate
    let rest = rest.get(th + tl..)?;
    let (_, ah, _) = header(rest)?; // AlgorithmIdentifier SEQUENCE
    let rest = rest.get(ah..)?;
    let (tag, oh, ol) = header(rest)?;
    if tag != 0x06 {
        return None;
    }
    let oid = rest.get(oh..oh + ol)?;
    // sha384WithRSAEncryption 1.2.840.113549.1.1.12, sha512WithRSAEncryption …1.13,
    // ecdsa-with-SHA384 1.2.840.10045.4.3.3, ecdsa-with-SHA512 …4.3.4
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    match oid {
        [p @ .., 12] if p == RSA => Some(384),
        [p @ .., 13] if p == RSA => Some(512),
        [p @ .., 3] if p == ECDSA => Some(384),
        [p @ .., 4] if p == ECDSA => Some(512),
        _ => Some(256),
    }
}
