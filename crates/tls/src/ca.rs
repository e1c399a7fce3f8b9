//! Portway's local CA: made on first use in the data directory (`pki/ca.{crt,key}`); it
//! signs the API server's serving certificate and, when no ACME directory is configured,
//! the edges' certificates, so `https://*.portway.localhost` works with one root to trust.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
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
    #[error("generating a certificate")]
    Generate(#[from] rcgen::Error),
}

/// A certificate the CA signed, with its fresh key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: SystemTime,
}

pub struct LocalCa {
    pub cert_pem: String,
    key: KeyPair,
}

fn params() -> Result<CertificateParams, rcgen::Error> {
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

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Read {
        path: path.to_owned(),
        source,
    })
}

impl LocalCa {
    /// The CA in `dir`, made there (0700 directory, 0600 files) if it is not yet.
    ///
    /// # Errors
    /// When files cannot be read or written, or generation fails.
    pub fn load_or_create(dir: &Path) -> Result<Self, CaError> {
        use std::os::unix::fs::DirBuilderExt;
        let write_err = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Write { path, source }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(write_err(dir))?;
        let (key_path, cert_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let key = if key_path.exists() {
            KeyPair::from_pem(&read(&key_path)?)?
        } else {
            let key = KeyPair::generate()?;
            crate::write_private(&key_path, key.serialize_pem().as_bytes())
                .map_err(write_err(&key_path))?;
            key
        };
        let cert_pem = if cert_path.exists() {
            read(&cert_path)?
        } else {
            let pem = params()?.self_signed(&key)?.pem();
            crate::write_private(&cert_path, pem.as_bytes()).map_err(write_err(&cert_path))?;
            pem
        };
        Ok(Self { cert_pem, key })
    }

    /// The CA already in `dir`; never makes one.
    ///
    /// # Errors
    /// When `ca.crt` or `ca.key` cannot be read or parsed.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        Ok(Self {
            key: KeyPair::from_pem(&read(&dir.join("ca.key"))?)?,
            cert_pem: read(&dir.join("ca.crt"))?,
        })
    }

    /// Signs a certificate for `sans` (DNS names, `*.x` wildcards, IP addresses), valid
    /// from an hour ago (clock skew) for `validity`.
    ///
    /// # Errors
    /// When a name is not valid in a certificate.
    pub fn issue(
        &self,
        sans: &[String],
        common_name: &str,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let issuer = Issuer::new(params()?, &self.key);
        let mut params = CertificateParams::new(sans.to_vec())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let now = SystemTime::now();
        let not_after = now + validity;
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after,
        })
    }
}

impl LocalCa {
    /// Signs a device's verified request for its own names (the key stays on the device),
    /// valid from an hour ago for `validity`. Only the request's key and names are taken:
    /// whatever else it asks for (extensions, a subject) is not.
    ///
    /// # Errors
    /// When the request's key type cannot be used, or a name cannot be in a certificate.
    pub fn sign(
        &self,
        request: &crate::csr::Request,
        validity: Duration,
    ) -> Result<Issued, CaError> {
        let issuer = Issuer::new(params()?, &self.key);
        let der = rustls::pki_types::CertificateSigningRequestDer::from(request.der.clone());
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)?;
        let mut params = CertificateParams::new(request.names.clone())?;
        params
            .distinguished_name
            .push(DnType::CommonName, request.names[0].clone());
        let now = SystemTime::now();
        let not_after = now + validity;
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = not_after.into();
        // A TLS server's certificate, and nothing else (not a client's, not a signer's).
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        csr.params = params;
        let cert = csr.signed_by(&issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: String::new(),
            not_after,
        })
    }
}
