//! TLS for client connections (rustls). A server with a certificate
//! speaks TLS on its port; clients trust it through a CA certificate file
//! (the PEM of the CA that signed the server's certificate).

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls;

/// Errors loading certificates or keys: say which file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct TlsError {
    pub path: String,
    pub reason: String,
}

fn err(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError { path: path.display().to_string(), reason: reason.to_string() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client configuration that trusts the CA certificate(s) in `ca_pem`.
pub fn client_config(ca_pem: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| err(ca_pem, e))? {
        roots.add(cert.map_err(|e| err(ca_pem, e))?).map_err(|e| err(ca_pem, e))?;
    }
    if roots.is_empty() {
        return Err(err(ca_pem, "no certificate in the file"));
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(ca_pem, e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A server configuration from a certificate chain and its private key.
pub fn server_config(cert_pem: &Path, key_pem: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .map_err(|e| err(cert_pem, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| err(cert_pem, e))?;
    if certs.is_empty() {
        return Err(err(cert_pem, "no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(|e| err(key_pem, e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(cert_pem, e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| err(cert_pem, e))?;
    Ok(Arc::new(config))
}

/// The name to check the server's certificate against: the host part of
/// `addr` (`host:port`), an IP address or a DNS name.
pub fn server_name(addr: &str) -> Result<ServerName<'static>, TlsError> {
    let host = addr.rsplit_once(':').map_or(addr, |(host, _)| host).trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| TlsError { path: addr.to_string(), reason: e.to_string() })
}
