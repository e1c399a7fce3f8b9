//! The certificates the edge serves by SNI: files from `--cert-dir` (served first), and
//! the certificate Secrets the issuer keeps in `portway-system`
//! ([`portway_api::certificates`]), watched so that a new or renewed certificate is
//! served at the next handshake, with no restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::runtime::watcher;
use portway_api::certificates::{Info, LABEL, SYSTEM_NAMESPACE};
use rustls::crypto::KeyProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading certificates from {dir}: {reason}")]
    Dir { dir: PathBuf, reason: String },
    #[error(transparent)]
    Pem(#[from] portway_tls::PemError),
}

/// Per-hostname certificates.
#[derive(Debug, Default)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.x`, keyed by `x`: a wildcard covers one label, as clients check.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl Certs {
    /// Exact name, then the wildcard of its parent; never the default.
    fn named(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let name = name.to_ascii_lowercase();
        self.exact
            .get(&name)
            .or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent)
            })
            .cloned()
    }

    fn insert(&mut self, name: &str, ck: Arc<CertifiedKey>) {
        match name.strip_prefix("*.") {
            Some(parent) => self.wildcard.insert(parent.to_owned(), ck),
            None => self.exact.insert(name.to_owned(), ck),
        };
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.wildcard.is_empty() && self.default.is_none()
    }
}

/// `<hostname>.crt` + `<hostname>.key` pairs in `dir` (`_.example.com` for
/// `*.example.com`, `default` for any other name).
///
/// # Errors
/// When the directory holds no pair, or a pair does not parse (its path is named).
pub fn load_dir(dir: &Path) -> Result<Certs, Error> {
    let err = |reason: String| Error::Dir {
        dir: dir.to_owned(),
        reason,
    };
    let keys = rustls::crypto::ring::default_provider().key_provider;
    let mut certs = Certs::default();
    for entry in std::fs::read_dir(dir).map_err(|e| err(e.to_string()))? {
        let path = entry.map_err(|e| err(e.to_string()))?.path();
        if path.extension().is_none_or(|e| e != "crt") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let key_path = path.with_extension("key");
        let pair = portway_tls::read(&path, &key_path)?;
        let ck = certified(keys, pair).map_err(|e| err(format!("{}: {e}", key_path.display())))?;
        match stem.strip_prefix("_.") {
            _ if stem == "default" => certs.default = Some(ck),
            Some(suffix) => certs.insert(&format!("*.{suffix}"), ck),
            None => certs.insert(&stem, ck),
        }
    }
    if certs.is_empty() {
        return Err(err("no <hostname>.crt/.key pairs found".into()));
    }
    Ok(certs)
}

fn certified(
    keys: &dyn KeyProvider,
    pair: portway_tls::Pair,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let signer = keys.load_private_key(pair.key)?;
    Ok(Arc::new(CertifiedKey::new(pair.chain, signer)))
}

/// The certificate a Secret holds, with the names it covers; `None` (logged) when it is
/// not one of ours or does not parse: one bad Secret must not stop the others.
fn from_secret(secret: &Secret) -> Option<(Info, Arc<CertifiedKey>)> {
    let info = Info::of(secret)?;
    let data = secret.data.as_ref()?;
    let (crt, key) = (data.get("tls.crt")?, data.get("tls.key")?);
    let source = PathBuf::from(format!("secret/{SYSTEM_NAMESPACE}/{}", info.name));
    let parsed = portway_tls::parse(&crt.0, &source, &key.0, &source)
        .map_err(|e| e.to_string())
        .and_then(|pair| {
            certified(rustls::crypto::ring::default_provider().key_provider, pair)
                .map_err(|e| e.to_string())
        });
    match parsed {
        Ok(ck) => Some((info, ck)),
        Err(error) => {
            tracing::warn!(secret = %info.name, %error, "certificate Secret not served");
            None
        }
    }
}

/// What rustls asks at each handshake; swapped whole when a Secret changes.
#[derive(Debug)]
pub struct Resolver {
    files: Certs,
    current: ArcSwap<Certs>,
}

impl Resolver {
    pub fn new(files: Certs) -> Self {
        Self {
            current: ArcSwap::from_pointee(Certs::default()),
            files,
        }
    }

    /// Serves `secrets` (besides the files) from now on.
    pub fn update<'a>(&self, secrets: impl IntoIterator<Item = &'a Secret>) {
        let mut certs = Certs::default();
        for (info, ck) in secrets.into_iter().filter_map(from_secret) {
            for name in &info.hostnames {
                certs.insert(name, ck.clone());
            }
        }
        self.current.store(Arc::new(certs));
    }

    /// Whether an issued certificate (not a `--cert-dir` file) covers `name`: such names
    /// are redirected from HTTP to HTTPS.
    pub fn issued_covers(&self, name: &str) -> bool {
        self.current.load().named(name).is_some()
    }

    pub fn lookup(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        // Files first, but a file `default` must not hide an issued certificate.
        name.and_then(|n| self.files.named(n).or_else(|| self.current.load().named(n)))
            .or_else(|| self.files.default.clone())
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.lookup(hello.server_name())
    }
}

/// Watches the certificate Secrets until `shutdown`, handing every current one to
/// `changed` after each change (and after each relist).
pub fn watch_secrets(
    client: kube::Client,
    changed: impl Fn(Vec<Arc<Secret>>) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let api: Api<Secret> = Api::namespaced(client, SYSTEM_NAMESPACE);
    watch_labelled(api, &format!("{LABEL}=true"), changed, shutdown)
}

/// Watches the Secrets `selector` picks until `shutdown`, handing every current one to
/// `changed` after each change (and after each relist).
pub(crate) fn watch_labelled(
    api: Api<Secret>,
    selector: &str,
    changed: impl Fn(Vec<Arc<Secret>>) + Send + Sync + 'static,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let config = watcher::Config::default().labels(selector);
    let (store, events) = portway_kube::watch::reflect(api, config);
    let update: portway_kube::watch::Subscriber<Secret> = Box::new(move |e| match e {
        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone => {
            changed(store.state());
        }
        watcher::Event::Init | watcher::Event::InitApply(_) => {}
    });
    tokio::spawn(portway_kube::watch::drive(events, vec![update], shutdown))
}

/// Watches the certificate Secrets into `resolver` until `shutdown`.
pub fn spawn_watch(
    client: kube::Client,
    resolver: Arc<Resolver>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    watch_secrets(
        client,
        move |secrets| resolver.update(secrets.iter().map(AsRef::as_ref)),
        shutdown,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn write_pair(dir: &Path, stem: &str, san: &str) {
        let c = rcgen::generate_simple_self_signed(vec![san.to_owned()]).unwrap();
        std::fs::write(dir.join(format!("{stem}.crt")), c.cert.pem()).unwrap();
        std::fs::write(
            dir.join(format!("{stem}.key")),
            c.signing_key.serialize_pem(),
        )
        .unwrap();
    }

    #[test]
    fn certificates_by_exact_name_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(
            matches!(load_dir(d), Err(Error::Dir { .. })),
            "an empty directory is an error"
        );
        write_pair(d, "app.example.com", "app.example.com");
        write_pair(d, "_.example.com", "*.example.com");
        write_pair(d, "_.eu.example.com", "*.eu.example.com");
        let certs = Resolver::new(load_dir(d).unwrap());
        let leaf = |name: Option<&str>| certs.lookup(name).map(|k| k.cert[0].clone());
        let by_stem = |stem: &str| {
            portway_tls::read(
                &d.join(format!("{stem}.crt")),
                &d.join(format!("{stem}.key")),
            )
            .unwrap()
            .chain[0]
                .clone()
        };
        assert_eq!(
            leaf(Some("App.Example.com")),
            Some(by_stem("app.example.com"))
        );
        assert_eq!(leaf(Some("x.example.com")), Some(by_stem("_.example.com")));
        assert_eq!(
            leaf(Some("x.eu.example.com")),
            Some(by_stem("_.eu.example.com"))
        );
        assert_eq!(
            leaf(Some("example.com")),
            None,
            "a wildcard does not cover its apex"
        );
        assert_eq!(
            leaf(Some("a.b.example.com")),
            None,
            "nor names two labels below"
        );
        assert_eq!(leaf(None), None);
        write_pair(d, "default", "fallback");
        let certs = Resolver::new(load_dir(d).unwrap());
        let default = certs.lookup(None).map(|k| k.cert[0].clone());
        assert_eq!(default, Some(by_stem("default")));
        assert_eq!(
            certs.lookup(Some("other.org")).map(|k| k.cert[0].clone()),
            default
        );

        // A certificate without its key is named, not skipped.
        std::fs::remove_file(d.join("default.key")).unwrap();
        let err = load_dir(d).unwrap_err();
        assert!(
            matches!(&err, Error::Pem(portway_tls::PemError::Read { path, .. }) if path.ends_with("default.key")),
            "{err:?}"
        );
    }

    fn secret(name: &str, hosts: &str, pem: Option<(String, String)>) -> Secret {
        let (crt, key) = pem.unwrap_or_else(|| {
            let c = rcgen::generate_simple_self_signed(vec![hosts.to_owned()]).unwrap();
            (c.cert.pem(), c.signing_key.serialize_pem())
        });
        let mut s: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": SYSTEM_NAMESPACE,
                "labels": {LABEL: "true"},
                "annotations": {portway_api::certificates::HOSTNAMES: hosts,
                    portway_api::certificates::NOT_AFTER: "2030-01-01T00:00:00Z"}},
            "type": "kubernetes.io/tls",
        }))
        .unwrap();
        s.data = Some(
            [
                ("tls.crt".into(), ByteString(crt.into_bytes())),
                ("tls.key".into(), ByteString(key.into_bytes())),
            ]
            .into(),
        );
        s
    }

    #[test]
    fn issued_certificates_are_served_after_files_and_broken_ones_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        write_pair(dir.path(), "app.p.localhost", "app.p.localhost");
        write_pair(dir.path(), "default", "fallback");
        let resolver = Resolver::new(load_dir(dir.path()).unwrap());
        let file_leaf = resolver.lookup(Some("app.p.localhost")).unwrap().cert[0].clone();
        let fallback = resolver.lookup(Some("x.p.localhost")).unwrap().cert[0].clone();

        let wildcard = secret("wildcard.p.localhost", "*.p.localhost", None);
        let broken = secret(
            "broken",
            "broken.example.com",
            Some(("not a pem".into(), "nor this".into())),
        );
        resolver.update([&wildcard, &broken]);
        let issued = resolver.lookup(Some("x.p.localhost")).unwrap().cert[0].clone();
        assert_ne!(
            issued, fallback,
            "an issued wildcard beats the file default"
        );
        assert_eq!(
            resolver.lookup(Some("app.p.localhost")).unwrap().cert[0],
            file_leaf,
            "a file for the exact name is served first"
        );
        assert_eq!(
            resolver.lookup(Some("broken.example.com")).unwrap().cert[0],
            fallback,
            "a Secret that does not parse is not served"
        );
        resolver.update([]);
        assert_eq!(
            resolver.lookup(Some("x.p.localhost")).unwrap().cert[0],
            fallback,
            "a deleted Secret is no longer served"
        );
    }
}
