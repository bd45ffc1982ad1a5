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
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::Digest;

use crate::conninfo::{ConnConfig, SslMode};

/// Builds the client configuration for a mode. `Err` is a message for the user.
pub fn client_config(cc: &ConnConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    let mode = cc.sslmode;
    let rootcert = cc.sslrootcert.as_deref();
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
    let versions: Vec<&'static rustls::SupportedProtocolVersion> =
        [(2, &rustls::version::TLS12), (3, &rustls::version::TLS13)]
            .into_iter()
            .filter(|(v, _)| (cc.ssl_versions.0..=cc.ssl_versions.1).contains(v))
            .map(|(_, p)| p)
            .collect();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match (&cc.sslcert, &cc.sslkey) {
        (Some(cert), key) => {
            let key = key.as_ref().ok_or_else(|| {
                format!(
                    "client certificate \"{}\" given without a key: set sslkey (or PGSSLKEY)",
                    cert.display()
                )
            })?;
            let (chain, key) = client_cert(cert, key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("client certificate \"{}\" unusable: {e}", cert.display()))?
        }
        (None, _) => builder.with_no_client_auth(),
    };
    cfg.enable_sni = cc.sslsni;
    Ok(Arc::new(cfg))
}

/// Reads a client certificate chain and its private key (PEM). Like libpq, a key file that
/// others may read is refused; an encrypted key is refused (no sslpassword support).
fn client_cert(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    use std::os::unix::fs::PermissionsExt;
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| {
            format!(
                "could not open certificate file \"{}\": {e}",
                cert.display()
            )
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            format!(
                "could not read certificate file \"{}\": {e}",
                cert.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "certificate file \"{}\" holds no certificate",
            cert.display()
        ));
    }
    let meta = std::fs::metadata(key).map_err(|e| {
        format!(
            "certificate present, but not private key file \"{}\": {e}",
            key.display()
        )
    })?;
    if !meta.is_file() {
        return Err(format!(
            "private key file \"{}\" is not a regular file",
            key.display()
        ));
    }
    // libpq's rule: owned by us, u=rw (0600) or less; root-owned keys may be u=rw,g=r (0640).
    let mode = meta.permissions().mode();
    let too_open = if std::os::unix::fs::MetadataExt::uid(&meta) == 0 {
        mode & 0o137 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(format!(
            "private key file \"{}\" has group or world access; file must have permissions u=rw (0600) or less if owned by the current user, or permissions u=rw,g=r (0640) or less if owned by root",
            key.display()
        ));
    }
    let text = std::fs::read(key)
        .map_err(|e| format!("could not read private key file \"{}\": {e}", key.display()))?;
    if text.windows(9).any(|w| w == b"ENCRYPTED") {
        return Err(format!(
            "private key file \"{}\" is encrypted; pgpar has no sslpassword: decrypt it (openssl pkey -in KEY -out PLAIN) and give that as sslkey",
            key.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_slice(&text)
        .map_err(|e| format!("could not load private key file \"{}\": {e}", key.display()))?;
    Ok((chain, key))
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
