//! A Kubernetes-compatible REST and watch API server on an embedded SQLite store.
//!
//! Serves discovery (`/api`, `/apis`, aggregated v2), OpenAPI v3, and the REST verbs
//! (get, list, watch, create, update, patch — merge, JSON, strategic, server-side apply —,
//! delete, deletecollection, `/status`) for Portway's kinds and the built-in and Gateway
//! API kinds it needs (bodies as JSON, YAML, or for built-in kinds Kubernetes protobuf),
//! the reviews behind `kubectl auth can-i` and `whoami`, and a read-only view of its
//! CRDs, so kubectl and kube-rs work against it unchanged. Authentication is
//! by bearer token from a tokens file; authorisation by role (see [`auth`]). Connections
//! keep to [`Config::limits`] (see [`portway_serve`]); request bodies to the bounds of
//! [`decode`].
//!
//! ```no_run
//! # async fn run() -> Result<(), portway_apiserver::Error> {
//! let config = portway_apiserver::Config::new("/var/lib/portway".into());
//! let server = portway_apiserver::Server::bind(config).await?;
//! println!("serving at {}, kubeconfig {:?}", server.url(), server.kubeconfig());
//! server.join().await;
//! # Ok(()) }
//! ```

mod app;
pub mod apply;
pub mod auth;
pub mod decode;
pub mod devices;
mod discovery;
pub mod error;
pub mod events;
pub mod files;
mod http;
pub mod patch;
pub mod protobuf;
pub mod registry;
pub mod selector;
pub mod store;
mod table;
pub mod tls;
mod watch;
pub mod write;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub use auth::Tokens;
pub use store::Store;

/// Where the server keeps its state and how it listens.
#[derive(Clone, Debug)]
pub struct Config {
    /// Holds `portway.db`, and when generated: `tokens.csv`, `kubeconfig`, `pki/`.
    pub data_dir: PathBuf,
    /// Default `127.0.0.1:6443`.
    pub listen: SocketAddr,
    /// Tokens file (`token,user,roles,namespaces`); absent means `DATA/tokens.csv`,
    /// created with one admin token on first start.
    pub tokens_file: Option<PathBuf>,
    /// How to serve TLS (default: a self-signed CA in `DATA/pki`).
    pub tls: TlsMode,
    /// Extra names for the generated serving certificate.
    pub tls_sans: Vec<String>,
    /// Revisions of history kept for watches to resume from (default 10 000).
    pub history: u64,
    /// Largest request body accepted (default 3 MiB, as Kubernetes).
    pub max_body_bytes: usize,
    /// Connection limits (default: [`portway_serve::Limits`] with at most 10 000
    /// connections).
    pub limits: portway_serve::Limits,
    /// How long an Event lives after it was last seen (default one hour).
    pub event_ttl: std::time::Duration,
    /// Keep objects in this etcd cluster, shared with other replicas, instead of
    /// `DATA/portway.db`.
    pub etcd: Option<store::etcd::Config>,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6443)),
            tokens_file: None,
            tls: TlsMode::SelfSigned,
            tls_sans: Vec::new(),
            history: 10_000,
            max_body_bytes: 3 * 1024 * 1024,
            limits: portway_serve::Limits {
                max_connections: 10_000,
                ..Default::default()
            },
            event_ttl: events::DEFAULT_TTL,
            etcd: None,
        }
    }
}

/// How the server secures its listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// A CA generated on first start and kept in `DATA/pki` signs a serving certificate
    /// on every start; kubeconfigs carry the CA.
    SelfSigned,
    /// Certificate and key files (PEM).
    Files { cert: PathBuf, key: PathBuf },
    /// Plain HTTP, allowed on loopback only. kubectl (client-go) never sends bearer
    /// tokens over plain HTTP, so only kube-rs and curl can use such a server.
    PlainLoopback,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("plain HTTP is only allowed on a loopback address, not {0}")]
    PlainNotLoopback(SocketAddr),
    #[error("creating data directory {path}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the store")]
    Store(#[from] store::StoreError),
    #[error("loading tokens")]
    Tokens(#[from] auth::TokensError),
    #[error("opening device credentials")]
    Devices(#[from] devices::DevicesError),
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setting up TLS")]
    Tls(#[from] tls::TlsError),
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("creating the default namespace: {0}")]
    Bootstrap(String),
}

/// A running API server.
pub struct Server {
    addr: SocketAddr,
    url: String,
    kubeconfig: Option<PathBuf>,
    ca_pem: Option<String>,
    store: Store,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// The first admin token in the tokens file, for the kubeconfig we write.
fn admin_token(text: &str) -> Option<String> {
    text.lines().find_map(|l| match auth::TokenLine::parse(l)? {
        Ok(line) if line.roles.contains(&auth::Role::Admin) => Some(line.token),
        _ => None,
    })
}

impl Server {
    /// Opens the store, loads tokens and certificates, binds, and starts serving.
    ///
    /// # Errors
    /// When any of those steps fails; nothing is left running.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let dir = &config.data_dir;
        files::prepare_data_dir(dir).map_err(|source| Error::DataDir {
            path: dir.clone(),
            source,
        })?;
        let store = match &config.etcd {
            Some(etcd) => Store::open_etcd(etcd, config.history).await?,
            None => Store::open(&dir.join("portway.db"), config.history)?,
        };
        let devices =
            Arc::new(devices::Devices::open(store.clone(), Some(&dir.join("portway.db"))).await?);

        let tokens_path = config
            .tokens_file
            .clone()
            .unwrap_or_else(|| dir.join("tokens.csv"));
        if config.tokens_file.is_none() && !tokens_path.exists() {
            let text = format!(
                "# token,user,roles,namespaces — see `portway apiserver --help`\n{},admin,admin,*\n",
                files::new_token()
            );
            files::write_private(&tokens_path, text.as_bytes()).map_err(|source| Error::Write {
                path: tokens_path.clone(),
                source,
            })?;
        }
        let tokens = Tokens::load(&tokens_path)?;

        let material = match &config.tls {
            TlsMode::Files { cert, key } => Some(tls::from_files(cert, key)?),
            TlsMode::PlainLoopback if config.listen.ip().is_loopback() => None,
            TlsMode::PlainLoopback => return Err(Error::PlainNotLoopback(config.listen)),
            TlsMode::SelfSigned => {
                let mut sans = vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ];
                if !config.listen.ip().is_unspecified() {
                    sans.push(config.listen.ip().to_string());
                }
                sans.extend(config.tls_sans.iter().cloned());
                Some(tls::self_signed(&dir.join("pki"), &sans)?)
            }
        };
        let acceptor = match &material {
            Some(m) => Some(TlsAcceptor::from(tls::server_config(m, dir)?)),
            None => None,
        };

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Bind {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: config.listen,
            source,
        })?;
        let host = match addr.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", SocketAddr::new(host, addr.port()));
        let ca_pem = material.as_ref().and_then(|m| m.ca_pem.clone());

        let text = std::fs::read_to_string(&tokens_path).unwrap_or_default();
        let kubeconfig = match admin_token(&text) {
            Some(token) => {
                let path = dir.join("kubeconfig");
                let yaml = files::kubeconfig(&url, ca_pem.as_deref(), "admin", &token, "default");
                files::write_private(&path, yaml.as_bytes()).map_err(|source| Error::Write {
                    path: path.clone(),
                    source,
                })?;
                Some(path)
            }
            None => None,
        };

        // `portway-system` holds what only the control plane reads (certificates), as
        // kube-system does in Kubernetes.
        for ns in ["default", portway_api::certificates::SYSTEM_NAMESPACE] {
            ensure_namespace(&store, ns)
                .await
                .map_err(|e| Error::Bootstrap(e.to_string()))?;
        }

        let shutdown = CancellationToken::new();
        let app = Arc::new(app::App {
            store: store.clone(),
            tokens,
            devices,
            address: SocketAddr::new(host, addr.port()).to_string(),
            max_body: config.max_body_bytes,
            started: write::now(),
            shutdown: shutdown.clone(),
        });
        let router = Router::new().fallback(http::handle).with_state(app);
        tokio::spawn(events::expire_until(
            store.clone(),
            config.event_ttl,
            shutdown.clone(),
        ));
        tokio::spawn(write::collect_until(store.clone(), shutdown.clone()));
        let service = move |_: &portway_serve::Peer| TowerToHyperService::new(router.clone());
        let task = tokio::spawn(portway_serve::serve(
            listener,
            acceptor,
            service,
            shutdown.clone(),
            config.limits.clone(),
        ));
        tracing::info!(%url, data = %dir.display(), "apiserver listening");
        Ok(Self {
            addr,
            url,
            kubeconfig,
            ca_pem,
            store,
            shutdown,
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://host:port` to reach the server at.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The admin kubeconfig written into the data directory, if an admin token is known.
    pub fn kubeconfig(&self) -> Option<&Path> {
        self.kubeconfig.as_deref()
    }

    /// The CA certificate (PEM) clients need, when the server made its own.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    /// The store, for embedding processes that need to bootstrap objects.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Stops accepting, ends watches and lets requests in flight finish.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelling it is [`Server::shutdown`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until the server has stopped.
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Creates a namespace if it does not exist.
///
/// # Errors
/// When the write fails.
pub async fn ensure_namespace(store: &Store, name: &str) -> Result<(), error::ApiError> {
    let ns = registry::registry().namespaces();
    if store.get(ns, "", name).is_some() {
        return Ok(());
    }
    let ctx = write::WriteCtx {
        res: ns,
        ns: String::new(),
        manager: "portway".into(),
        validation: write::FieldValidation::Strict,
        dry_run: false,
        now: write::now(),
        guard: None,
    };
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
    store
        .write(move |txn| match write::create(txn, &ctx, body.clone()) {
            Err(e) if e.reason == "AlreadyExists" => Ok(()),
            other => other.map(drop),
        })
        .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn admin_token_is_the_first_line_with_the_admin_role() {
        let text = "# token,user,roles,namespaces\n\
                    viewertoken-00000000,v,viewer,*\n\
                    admintoken-000000000,a,\"viewer,admin\",*\n\
                    admintoken-111111111,b,admin\n";
        assert_eq!(
            super::admin_token(text).as_deref(),
            Some("admintoken-000000000")
        );
        assert_eq!(
            super::admin_token("viewertoken-00000000,v,viewer,*\n"),
            None
        );
    }
}
