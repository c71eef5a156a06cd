//! Mutual TLS from the gateway to its hosts (`[hosts_tls]`): the gateway
//! checks each host's certificate against `ca_file` (and the host's name
//! or address in its URL), and shows its own client certificate, which a
//! host with `api.tls.client_ca_file` requires of every gateway call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// `[hosts_tls]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostTlsSettings {
    /// CA certificates (PEM) the hosts' certificates must chain to.
    pub ca_file: PathBuf,
    /// The gateway's client certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum HostTlsError {
    #[error("hosts_tls.{setting}: cannot read {path}: {source}")]
    Unreadable { setting: &'static str, path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("hosts_tls.ca_file: {path}: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error("hosts_tls: the certificate in {cert} and the key in {key} do not make a client configuration: {source}")]
    Config { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

fn certificates(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, HostTlsError> {
    metald_serve::tls::pem_certificates(path).map_err(|source| HostTlsError::Unreadable { setting, path: path.to_path_buf(), source })
}

/// The client configuration every host link uses.
pub fn client_config(settings: &HostTlsSettings) -> Result<Arc<rustls::ClientConfig>, HostTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in certificates("ca_file", &settings.ca_file)? {
        roots.add(certificate).map_err(|error| HostTlsError::Ca { path: settings.ca_file.clone(), reason: error.to_string() })?;
    }
    if roots.is_empty() {
        return Err(HostTlsError::Ca { path: settings.ca_file.clone(), reason: "holds no PEM certificate".to_owned() });
    }
    let chain = certificates("cert_file", &settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|source| HostTlsError::Unreadable {
        setting: "key_file",
        path: settings.key_file.clone(),
        source,
    })?;
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|source| HostTlsError::Config { cert: settings.cert_file.clone(), key: settings.key_file.clone(), source })?;
    Ok(Arc::new(config))
}
