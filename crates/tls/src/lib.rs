//! PEM certificate chains and private keys, read the same way by every TLS listener of
//! ours (the API server, the relay, the edge), so that a file holding no certificate or no
//! key is refused at start with its path, never served as a broken handshake later; and
//! [`write_private`], the one way secrets (keys, tokens, credentials) reach the disk;
//! [`csr`], a device's certificate requests for its own key.

pub mod ca;
pub mod csr;

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no {what}")]
    Missing { path: PathBuf, what: &'static str },
}

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct Pair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// Parses PEM already in memory; the paths only name the sources in errors.
///
/// # Errors
/// [`PemError::Missing`] when `cert_pem` holds no certificate or `key_pem` no private key.
pub fn parse(
    cert_pem: &[u8],
    cert_path: &Path,
    key_pem: &[u8],
    key_path: &Path,
) -> Result<Pair, PemError> {
    let missing = |path: &Path, what| PemError::Missing {
        path: path.to_owned(),
        what,
    };
    let chain: Vec<_> = rustls_pemfile::certs(&mut &*cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(missing(cert_path, "certificate"));
    }
    let key = rustls_pemfile::private_key(&mut &*key_pem)
        .ok()
        .flatten()
        .ok_or_else(|| missing(key_path, "private key"))?;
    Ok(Pair { chain, key })
}

/// Reads a certificate file and a key file.
///
/// # Errors
/// When a file cannot be read, or see [`parse`].
pub fn read(cert: &Path, key: &Path) -> Result<Pair, PemError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| PemError::Read {
            path: path.to_owned(),
            source,
        })
    };
    parse(&read(cert)?, cert, &read(key)?, key)
}

/// Writes `contents` to `path` atomically (temp file + rename), readable by the owner only.
///
/// # Errors
/// When the directory is not writable.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // `mode` applies only to a new file; a leftover temp file may be looser.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_pair_and_names_the_file_that_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["a.example.com".into()]).unwrap();
        let (crt, key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        std::fs::write(&crt, cert.cert.pem()).unwrap();
        std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
        let pair = read(&crt, &key).unwrap();
        assert_eq!(pair.chain.len(), 1);

        // Swapped files: the certificate file holds no certificate.
        let err = read(&key, &crt).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} holds no certificate", key.display())
        );
        let err = read(&crt, &crt).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("{} holds no private key", crt.display())
        );
        let gone = dir.path().join("gone.key");
        assert!(matches!(read(&crt, &gone), Err(PemError::Read { path, .. }) if path == gone));
    }
}
