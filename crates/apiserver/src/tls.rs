//! TLS for the API server: given files, or a self-signed CA kept in the data directory
//! that signs a fresh serving certificate on every start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::ServerConfig;

use crate::files::write_private;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pem(#[from] portway_tls::PemError),
    #[error("generating certificates")]
    Generate(#[from] rcgen::Error),
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

fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "portway-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// Loads (or creates on first use) a CA in `dir` and issues a serving certificate for
/// `sans` with it.
///
/// # Errors
/// When files cannot be read or written, or generation fails.
pub fn self_signed(dir: &Path, sans: &[String]) -> Result<Material, TlsError> {
    crate::files::private_dir(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
    let ca_key = if key_path.exists() {
        KeyPair::from_pem(&read(&key_path)?)?
    } else {
        let key = KeyPair::generate()?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(|source| {
            TlsError::Write {
                path: key_path.clone(),
                source,
            }
        })?;
        key
    };
    let ca_pem = if cert_path.exists() {
        read(&cert_path)?
    } else {
        let pem = ca_params()?.self_signed(&ca_key)?.pem();
        write_private(&cert_path, pem.as_bytes()).map_err(|source| TlsError::Write {
            path: cert_path.clone(),
            source,
        })?;
        pem
    };
    let issuer = Issuer::new(ca_params()?, &ca_key);
    let mut params = CertificateParams::new(sans.to_vec())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "portway-apiserver");
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Material {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ca_pem: Some(ca_pem),
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
