//! A tls tunnel's own certificate, kept in its `cert_dir`: the key is made here and never
//! leaves the device (`key.pem`); a request for the names the tunnel's TCPProxy serves
//! (`request.pem`) goes into `spec.tls.certificateRequest`; the chain the control plane
//! has signed comes back in `status.certificate` and is written to `cert.pem` (replaced
//! atomically at each renewal, so a server that reloads it never reads half a file).
//!
//! The request is kept on disk so a restarted agent asks for the same certificate
//! rather than a new one (ACME servers limit how many they issue).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use portway_tls::csr;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Key {
        path: PathBuf,
        source: csr::CsrError,
    },
    #[error("making the certificate request: {0}")]
    Request(csr::CsrError),
}

pub const KEY: &str = "key.pem";
pub const REQUEST: &str = "request.pem";
pub const CERT: &str = "cert.pem";

/// What a step did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// A new request to publish (none: the current one stands).
    pub request: Option<String>,
    /// A chain was written to `cert.pem`: its names and expiry.
    pub written: Option<(Vec<String>, SystemTime)>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The key in `dir`, made (with `dir`, owner-only) if there is none yet.
fn key(dir: &Path) -> Result<String, CertError> {
    let path = dir.join(KEY);
    match std::fs::read_to_string(&path) {
        Ok(pem) => Ok(pem),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
            let pem = csr::new_key().map_err(CertError::Request)?;
            portway_tls::write_private(&path, pem.as_bytes()).map_err(io(&path))?;
            tracing::info!(path = %path.display(), "made a key for the tunnel's certificate");
            Ok(pem)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// The request stored by an earlier run, if it is still one for the key in `dir`.
pub fn stored_request(dir: &Path) -> Option<String> {
    let pem = std::fs::read_to_string(dir.join(REQUEST)).ok()?;
    let key = std::fs::read_to_string(dir.join(KEY)).ok()?;
    let public_key = csr::public_key_of(&key).ok()?;
    (csr::parse(&pem).ok()?.public_key == public_key).then_some(pem)
}

/// Brings `dir` in step with the tunnel's proxy: a new request when `served` (the names
/// the proxy serves) differs from what `current` asks for, and `cert.pem` when `chain` is
/// a new certificate for this key.
///
/// # Errors
/// When the directory cannot be written, or its key cannot be read (a corrupt key is
/// never replaced: the files are the user's).
pub fn step(
    dir: &Path,
    current: Option<&str>,
    served: &[String],
    chain: Option<&str>,
) -> Result<Step, CertError> {
    let key_pem = key(dir)?;
    let public_key = csr::public_key_of(&key_pem).map_err(|source| CertError::Key {
        path: dir.join(KEY),
        source,
    })?;
    let mut out = Step::default();
    let mut wanted: Vec<String> = served.iter().map(|n| n.to_ascii_lowercase()).collect();
    wanted.sort();
    wanted.dedup();
    let fits =
        |pem: &str| csr::parse(pem).is_ok_and(|r| r.names == wanted && r.public_key == public_key);
    // Not asked yet in this run (a tunnel added since it started): the request an
    // earlier run stored will do, if it still fits.
    let stored = std::fs::read_to_string(dir.join(REQUEST)).ok();
    if current.is_none()
        && let Some(pem) = stored.filter(|pem| !wanted.is_empty() && fits(pem))
    {
        out.request = Some(pem);
    } else if !wanted.is_empty() && !current.is_some_and(fits) {
        let pem = csr::make(&key_pem, &wanted).map_err(CertError::Request)?;
        let path = dir.join(REQUEST);
        portway_tls::write_private(&path, pem.as_bytes()).map_err(io(&path))?;
        out.request = Some(pem);
    }
    // Only a chain for what this agent asks now: its key, these names, still valid.
    let asking = out.request.as_deref().or(current);
    let asked = asking.and_then(|pem| csr::parse(pem).ok());
    if let Some(chain) = chain
        && let Ok(leaf) = csr::leaf(chain)
        && let Some(asked) = &asked
        && leaf.answers(asked)
        && leaf.not_after > SystemTime::now()
    {
        let path = dir.join(CERT);
        let stored = std::fs::read_to_string(&path).unwrap_or_default();
        if stored != chain {
            portway_tls::write_private(&path, chain.as_bytes()).map_err(io(&path))?;
            out.written = Some((leaf.names, leaf.not_after));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_key_stays_the_request_follows_the_names_and_only_our_chain_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("cert");
        // Nothing served yet: a key, no request.
        let first = step(&d, None, &[], None).unwrap();
        assert_eq!(first, Step::default());
        let key = std::fs::read_to_string(d.join(KEY)).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.join(KEY)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o077, 0, "the key is the owner's alone");

        let served = names(&["u1.portway.test", "db.example.com"]);
        let request = step(&d, None, &served, None).unwrap().request.unwrap();
        let parsed = csr::parse(&request).unwrap();
        assert_eq!(parsed.names, names(&["db.example.com", "u1.portway.test"]));
        assert_eq!(parsed.public_key, csr::public_key_of(&key).unwrap());
        assert_eq!(stored_request(&d).as_deref(), Some(request.as_str()));
        // The same names: the request stands; not asked yet, the stored one is asked.
        assert_eq!(
            step(&d, Some(&request), &served, None).unwrap(),
            Step::default()
        );
        assert_eq!(
            step(&d, None, &served, None).unwrap().request.as_deref(),
            Some(request.as_str())
        );
        // A name more: a new request, same key.
        let more = names(&["u1.portway.test", "db.example.com", "x.example.com"]);
        let again = step(&d, Some(&request), &more, None)
            .unwrap()
            .request
            .unwrap();
        assert_eq!(csr::parse(&again).unwrap().public_key, parsed.public_key);

        // A chain for another key is not ours; ours is written once.
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = portway_tls::ca::LocalCa::load_or_create(ca_dir.path()).unwrap();
        let stranger = csr::make(&csr::new_key().unwrap(), &served).unwrap();
        let theirs = ca.sign(
            &csr::parse(&stranger).unwrap(),
            std::time::Duration::from_secs(60),
        );
        let theirs = theirs.unwrap().cert_pem;
        assert_eq!(
            step(&d, Some(&request), &served, Some(&theirs))
                .unwrap()
                .written,
            None
        );
        assert!(!d.join(CERT).exists());
        let ours = ca
            .sign(&parsed, std::time::Duration::from_secs(60))
            .unwrap()
            .cert_pem;
        let written = step(&d, Some(&request), &served, Some(&ours))
            .unwrap()
            .written;
        assert_eq!(written.unwrap().0, parsed.names);
        assert_eq!(std::fs::read_to_string(d.join(CERT)).unwrap(), ours);
        assert_eq!(
            step(&d, Some(&request), &served, Some(&ours))
                .unwrap()
                .written,
            None
        );
        assert_eq!(
            std::fs::read_to_string(d.join(KEY)).unwrap(),
            key,
            "never replaced"
        );
    }
}
