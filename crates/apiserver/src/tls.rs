//! TLS for the API server: given files, or a self-signed CA kept in the data directory
//! that signs a fresh serving certificate on every start.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portway_tls::ca::LocalCa;
use rustls::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pem(#[from] portway_tls::PemError),
    #[error("the local CA")]
    Ca(#[from] portway_tls::ca::CaError),
    #[error("building the TLS configuration")]
    Config(#[from] rustls::Error),
}

/// Serving certificate and key (PEM), and the CA that signed it, if we made it.
pub struct Material {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: Option<String>,
}

fn read(path: &Path) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// # Errors
/// When the files cannot be read.
pub fn from_files(cert: &Path, key: &Path) -> Result<Material, TlsError> {
    Ok(Material {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
        ca_pem: None,
    })
}

/// Loads (or creates on first use) a CA in `dir` and issues a serving certificate for
/// `sans` with it.
///
/// # Errors
/// When files cannot be read or written, or generation fails.
pub fn self_signed(dir: &Path, sans: &[String]) -> Result<Material, TlsError> {
    let ca = LocalCa::load_or_create(dir)?;
    // The API server signs a fresh one on every start: a long validity costs nothing.
    let issued = ca.issue(
        sans,
        "portway-apiserver",
        Duration::from_secs(10 * 365 * 86_400),
    )?;
    Ok(Material {
        cert_pem: issued.cert_pem,
        key_pem: issued.key_pem,
        ca_pem: Some(ca.cert_pem),
    })
}

/// A rustls server configuration offering HTTP/2 and HTTP/1.1.
///
/// # Errors
/// When the PEM holds no certificate or key, or rustls rejects them.
pub fn server_config(m: &Material, source: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let pair = portway_tls::parse(m.cert_pem.as_bytes(), source, m.key_pem.as_bytes(), source)?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(pair.chain, pair.key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
