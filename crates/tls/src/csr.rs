//! Certificate signing requests for a device's own key (`portway tls --cert-dir`): the
//! device makes the key and the request, the control plane has the request signed, and
//! the device checks that what comes back is for its key and names. The private key never
//! leaves the device.

use std::collections::BTreeSet;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("not a PEM certificate request: {0}")]
    Pem(String),
    #[error("not a certificate request: {0}")]
    Parse(String),
    #[error("the request's signature does not verify with its own public key")]
    Signature,
    #[error("{0}")]
    Names(String),
    #[error("making the request: {0}")]
    Make(#[from] rcgen::Error),
}

/// A verified request: signed by the key it names, for DNS names only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub der: Vec<u8>,
    /// Its DNS names, lowercased, sorted, without repeats.
    pub names: Vec<String>,
    /// The DER `SubjectPublicKeyInfo` a certificate for it must carry.
    pub public_key: Vec<u8>,
}

/// Parses and verifies a PEM request.
///
/// # Errors
/// When it is not one, its signature does not verify, it asks to be a CA, or it names
/// anything but DNS names (or none; or a common name that is not among them).
pub fn parse(pem: &str) -> Result<Request, CsrError> {
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    let (_, csr) =
        X509CertificationRequest::from_der(&der).map_err(|e| CsrError::Parse(e.to_string()))?;
    csr.verify_signature().map_err(|_| CsrError::Signature)?;
    let info = &csr.certification_request_info;
    let mut names = BTreeSet::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        // As written, or refused: the request goes to the CA as it is,
                        // so a name read differently here would be checked as another.
                        GeneralName::DNSName(n)
                            if !n.ends_with('.') && *n == n.to_ascii_lowercase() =>
                        {
                            names.insert((*n).to_owned());
                        }
                        GeneralName::DNSName(n) => {
                            return Err(CsrError::Names(format!(
                                "its name {n:?} must be lowercase, without a trailing dot"
                            )));
                        }
                        other => {
                            return Err(CsrError::Names(format!(
                                "it names {other}: only DNS names are issued"
                            )));
                        }
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(CsrError::Names(
                    "it asks to be a certificate authority".into(),
                ));
            }
            _ => {}
        }
    }
    if names.is_empty() {
        return Err(CsrError::Names(
            "it names no DNS name (subjectAltName)".into(),
        ));
    }
    for cn in info.subject.iter_common_name() {
        let cn = cn.as_str().map_err(|e| CsrError::Parse(e.to_string()))?;
        if !names.contains(cn) {
            return Err(CsrError::Names(format!(
                "its common name {cn} is not among its DNS names"
            )));
        }
    }
    Ok(Request {
        der: der.as_ref().to_vec(),
        names: names.into_iter().collect(),
        public_key: info.subject_pki.raw.to_vec(),
    })
}

/// A PEM request for `names`, signed with the PEM private key `key_pem`.
///
/// # Errors
/// When the key cannot be read or a name cannot be in a certificate.
pub fn make(key_pem: &str, names: &[String]) -> Result<String, CsrError> {
    let key = rcgen::KeyPair::from_pem(key_pem)?;
    let mut params = rcgen::CertificateParams::new(names.to_vec())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    Ok(params.serialize_request(&key)?.pem()?)
}

/// A fresh private key for requests (ECDSA P-256, which every ACME CA takes), PEM.
///
/// # Errors
/// When the system's randomness fails.
pub fn new_key() -> Result<String, CsrError> {
    Ok(rcgen::KeyPair::generate()?.serialize_pem())
}

/// What a chain's first certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leaf {
    pub public_key: Vec<u8>,
    /// Its DNS names, lowercased and sorted.
    pub names: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// Reads the first certificate of a PEM chain.
///
/// # Errors
/// When there is none, or it does not parse.
pub fn leaf(chain_pem: &str) -> Result<Leaf, CsrError> {
    let der = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or_else(|| CsrError::Pem("no certificate".into()))?
        .map_err(|e| CsrError::Pem(e.to_string()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| CsrError::Parse(e.to_string()))?;
    let mut names = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.insert(n.to_ascii_lowercase());
            }
        }
    }
    let time = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs)
    };
    Ok(Leaf {
        public_key: cert.public_key().raw.to_vec(),
        names: names.into_iter().collect(),
        not_before: time(cert.validity().not_before),
        not_after: time(cert.validity().not_after),
    })
}

impl Leaf {
    /// Whether this certificate is what `request` asked for: its key, exactly its names.
    pub fn answers(&self, request: &Request) -> bool {
        self.public_key == request.public_key && self.names == request.names
    }
}

/// The DER `SubjectPublicKeyInfo` of a PEM private key, to compare with [`Leaf`]'s.
///
/// # Errors
/// When the key cannot be read.
pub fn public_key_of(key_pem: &str) -> Result<Vec<u8>, CsrError> {
    use rcgen::PublicKeyData as _;
    Ok(rcgen::KeyPair::from_pem(key_pem)?.subject_public_key_info())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_request_made_here_parses_back_with_its_key_and_names() {
        let key = new_key().unwrap();
        let pem = make(&key, &names(&["b.example.com", "a.example.com"])).unwrap();
        let req = parse(&pem).unwrap();
        assert_eq!(req.names, names(&["a.example.com", "b.example.com"]));
        let upper = make(&key, &names(&["B.example.com"])).unwrap();
        assert!(matches!(parse(&upper), Err(CsrError::Names(m)) if m.contains("lowercase")));
        assert_eq!(req.public_key, public_key_of(&key).unwrap());
    }

    #[test]
    fn a_tampered_or_malformed_request_is_refused() {
        use base64::Engine as _;
        let key = new_key().unwrap();
        let pem = make(&key, &names(&["a.example.com"])).unwrap();
        // Another name in place of the signed one: the signature no longer verifies.
        let mut der = parse(&pem).unwrap().der;
        let at = der
            .windows(b"a.example.com".len())
            .position(|w| w == b"a.example.com")
            .unwrap();
        der[at] = b'b';
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert!(matches!(parse(&tampered), Err(CsrError::Signature)));
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(parse(garbage), Err(CsrError::Parse(_))));
        assert!(matches!(parse("hello"), Err(CsrError::Pem(_))));
    }

    #[test]
    fn a_certificate_answers_only_its_own_key_and_names() {
        let key = new_key().unwrap();
        let req = parse(&make(&key, &names(&["a.example.com"])).unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca = crate::ca::LocalCa::load_or_create(dir.path()).unwrap();
        let issued = ca.sign(&req, std::time::Duration::from_secs(3600)).unwrap();
        let leaf = leaf(&issued.cert_pem).unwrap();
        assert!(leaf.answers(&req));
        assert!(leaf.not_after > SystemTime::now());
        let other = parse(&make(&new_key().unwrap(), &names(&["a.example.com"])).unwrap()).unwrap();
        assert!(!leaf.answers(&other), "another key");
        let more =
            parse(&make(&key, &names(&["a.example.com", "b.example.com"])).unwrap()).unwrap();
        assert!(!leaf.answers(&more), "other names");
    }
}
