//! TLS on the API port (`[api.tls]`, rustls): a certificate and key from
//! files, HTTP/2 or HTTP/1.1 by ALPN, and, with `client_ca_file`, client
//! certificates checked against that CA. A client without a certificate
//! still connects (an operator's or tenant's token needs none); one that
//! shows a certificate the CA did not sign, or one out of its validity, is
//! refused in the handshake, and each request of a connection whose
//! certificate was verified carries [`VerifiedClientCertificate`], which
//! the daemon can require of some callers (a host requires it of gateways).
//!
//! [`TlsTerminator::reload`] reads the files again (on SIGHUP): new
//! connections get the new certificate, open ones keep theirs, and files
//! that do not make a configuration leave the old one serving.

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// `[api.tls]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The port's certificate chain (PEM), leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates (PEM) client certificates are checked against; unset: no client certificates are asked for.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("api.tls.{setting}: cannot read {path}: {source}")]
    Unreadable { setting: &'static str, path: PathBuf, source: rustls::pki_types::pem::Error },
    #[error("api.tls.{setting}: {path} holds no {what}")]
    Empty { setting: &'static str, path: PathBuf, what: &'static str },
    #[error("api.tls.client_ca_file: {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
    #[error("api.tls: the certificate in {cert} and the key in {key} do not make a TLS configuration: {source}")]
    Config { cert: PathBuf, key: PathBuf, source: rustls::Error },
}

/// Put into each request's extensions when its connection showed a client
/// certificate that `client_ca_file` signed and that is valid now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedClientCertificate;

/// The port's TLS configuration, reloadable.
#[derive(Debug)]
pub struct TlsTerminator {
    settings: TlsSettings,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

/// Every PEM certificate in `path`, in order; a TLS client of ours reads its files with this too.
pub fn pem_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_file_iter(path)?.collect()
}

fn certificates(setting: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certificates = pem_certificates(path).map_err(|source| TlsError::Unreadable { setting, path: path.to_path_buf(), source })?;
    if certificates.is_empty() {
        return Err(TlsError::Empty { setting, path: path.to_path_buf(), what: "PEM certificate" });
    }
    Ok(certificates)
}

fn server_config(settings: &TlsSettings) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates("cert_file", &settings.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key_file).map_err(|source| match source {
        rustls::pki_types::pem::Error::NoItemsFound => {
            TlsError::Empty { setting: "key_file", path: settings.key_file.clone(), what: "PEM private key" }
        }
        source => TlsError::Unreadable { setting: "key_file", path: settings.key_file.clone(), source },
    })?;
    let builder = rustls::ServerConfig::builder();
    let builder = match &settings.client_ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates("client_ca_file", path)? {
                roots.add(certificate).map_err(|error| TlsError::ClientCa { path: path.clone(), reason: error.to_string() })?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .allow_unauthenticated()
                .build()
                .map_err(|error| TlsError::ClientCa { path: path.clone(), reason: error.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|source| TlsError::Config {
        cert: settings.cert_file.clone(),
        key: settings.key_file.clone(),
        source,
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsTerminator {
    pub fn load(settings: TlsSettings) -> Result<Self, TlsError> {
        let config = server_config(&settings)?;
        Ok(Self { settings, current: RwLock::new(Arc::new(config)) })
    }

    /// Reads the files again; on an error the configuration serving now stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner)))
    }

    pub fn settings(&self) -> &TlsSettings {
        &self.settings
    }
}
