//! `portway relay`: a self-hosted iroh relay (the `iroh-relay` server), plain HTTP for
//! local use or HTTPS with a given certificate, serving only the endpoints the API knows.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use futures::StreamExt;
use iroh::{EndpointId, RelayUrl};
use iroh_relay::server::{self as relay, CertConfig, QuicConfig, ServerConfig, TlsConfig};
use kube::Api;
use kube::runtime::watcher;
use portway_api::{Connector, ConnectorClass};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Who may use the relay.
#[derive(Clone)]
pub enum Access {
    /// Every endpoint (standalone use: `portway relay --open`).
    Open,
    /// Only the endpoints in this set, which the caller keeps current.
    Known(KnownEndpoints),
    /// Only the endpoints the API knows (see [`watch_known_endpoints`]), watched while the
    /// relay runs.
    Api(kube::Client),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Open => f.write_str("Open"),
            Self::Known(k) => write!(f, "Known({} endpoints)", k.len()),
            Self::Api(_) => f.write_str("Api"),
        }
    }
}

/// A shared set of endpoint ids, swapped whole; lookups never lock.
#[derive(Clone, Debug, Default)]
pub struct KnownEndpoints(Arc<ArcSwap<HashSet<EndpointId>>>);

impl KnownEndpoints {
    pub fn contains(&self, id: &EndpointId) -> bool {
        self.0.load().contains(id)
    }

    pub fn insert(&self, id: EndpointId) {
        self.0.rcu(|set| {
            let mut set = HashSet::clone(set);
            set.insert(id);
            set
        });
    }

    /// Replaces the whole set.
    pub fn set(&self, ids: HashSet<EndpointId>) {
        self.0.store(Arc::new(ids));
    }

    pub fn len(&self) -> usize {
        self.0.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The relay's gate: admits the endpoints in the set.
#[derive(Debug)]
struct Gate(KnownEndpoints);

impl relay::AccessControl for Gate {
    async fn on_connect(&self, request: &relay::ClientRequest) -> relay::Access {
        let id = request.endpoint_id();
        if self.0.contains(&id) {
            relay::Access::Allow
        } else {
            tracing::debug!(endpoint = %id.fmt_short(), "refused an unknown endpoint");
            relay::Access::Deny {
                reason: Some("unknown endpoint".into()),
            }
        }
    }
}

/// The endpoints the API knows: every Connector's reported key and every gateway listed in
/// a ConnectorClass. Ids that do not parse are skipped.
pub fn known_ids<'a>(
    connectors: impl IntoIterator<Item = &'a Connector>,
    classes: impl IntoIterator<Item = &'a ConnectorClass>,
) -> HashSet<EndpointId> {
    let connectors = connectors.into_iter().filter_map(Connector::endpoint_id);
    let gateways = classes
        .into_iter()
        .filter_map(|c| c.status.as_ref())
        .flat_map(|s| s.gateways.iter().map(|g| g.endpoint_id.as_str()));
    connectors
        .chain(gateways)
        .filter_map(|id| id.parse().ok())
        .collect()
}

/// Keeps `known` equal to [`known_ids`] of all Connectors (every namespace) and
/// ConnectorClasses. Watch errors are logged and retried with backoff, keeping the last
/// set; runs until the watches end (in practice, until dropped).
pub async fn watch_known_endpoints(client: kube::Client, known: KnownEndpoints) {
    let (connectors, connector_events) = portway_kube::watch::reflect(
        Api::<Connector>::all(client.clone()),
        watcher::Config::default(),
    );
    let (classes, class_events) = portway_kube::watch::reflect(
        Api::<ConnectorClass>::all(client),
        watcher::Config::default(),
    );
    let (connector_events, class_events) = (
        connector_events.map(|e| e.map(drop)),
        class_events.map(|e| e.map(drop)),
    );
    let mut events = futures::stream::select(connector_events, class_events)
        .ready_chunks(1024)
        .boxed();
    while let Some(batch) = events.next().await {
        for e in batch {
            if let Err(err) = e {
                tracing::warn!(error = %err, "watching the endpoints the relay serves");
            }
        }
        let connectors = connectors.state();
        let classes = classes.state();
        let ids = known_ids(
            connectors.iter().map(AsRef::as_ref),
            classes.iter().map(AsRef::as_ref),
        );
        if ids.len() != known.len() || ids.iter().any(|id| !known.contains(id)) {
            tracing::debug!(endpoints = ids.len(), "relay access updated");
            known.set(ids);
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Where the relay (HTTP, or HTTPS with `tls`) listens; default `127.0.0.1:3340`.
    pub listen: SocketAddr,
    /// Certificate chain and key (PEM). With them the relay serves HTTPS on `listen` and
    /// QUIC address discovery on the same port over UDP; plain HTTP then moves to
    /// `http_listen`.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Plain HTTP listener used alongside TLS (captive-portal checks); default port 0.
    pub http_listen: Option<SocketAddr>,
    /// The hostname clients use in the relay URL (default: the listen address).
    pub hostname: Option<String>,
    /// Who may relay; default an empty [`Access::Known`] set (nobody until it is filled).
    /// The relay is open only when asked for with [`Access::Open`].
    pub access: Access,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3340)),
            tls: None,
            http_listen: None,
            hostname: None,
            access: Access::Known(KnownEndpoints::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Pem(#[from] portway_tls::PemError),
    #[error("building the TLS configuration")]
    Tls(#[from] rustls::Error),
    #[error("starting the relay")]
    Spawn(#[from] relay::SpawnError),
    #[error("relay URL {0:?} is invalid")]
    Url(String),
}

/// A running relay.
pub struct Server {
    inner: relay::Server,
    url: RelayUrl,
    /// The watch that keeps the access set current, with [`Access::Api`].
    _watch: Option<AbortOnDropHandle<()>>,
}

fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, Error> {
    let pair = portway_tls::read(cert, key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(pair.chain, pair.key)?;
    // The relay protocol is an HTTP/1.1 upgrade.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl Server {
    /// Starts the relay; returns once it listens.
    ///
    /// # Errors
    /// When the certificate cannot be loaded or the sockets cannot be bound.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let (gate, watch): (Arc<dyn relay::DynAccessControl>, _) = match config.access.clone() {
            Access::Open => (Arc::new(relay::AllowAll), None),
            Access::Known(known) => (Arc::new(Gate(known)), None),
            Access::Api(client) => {
                let known = KnownEndpoints::default();
                let watch = tokio::spawn(watch_known_endpoints(client, known.clone()));
                (Arc::new(Gate(known)), Some(AbortOnDropHandle::new(watch)))
            }
        };
        let mut server_config = ServerConfig::default();
        match &config.tls {
            None => {
                let mut rc = relay::RelayConfig::new(config.listen);
                rc.access = gate;
                server_config.relay = Some(rc);
            }
            Some((cert, key)) => {
                let tls = tls_config(cert, key)?;
                let http = config
                    .http_listen
                    .unwrap_or_else(|| SocketAddr::new(config.listen.ip(), 0));
                let mut rc = relay::RelayConfig::new(http);
                rc.access = gate;
                rc.tls = Some(TlsConfig::new(
                    config.listen,
                    CertConfig::Manual {
                        server_config: tls.clone(),
                    },
                ));
                server_config.relay = Some(rc);
                let mut quic = QuicConfig::new(config.listen);
                quic.server_config = Some(tls);
                server_config.quic = Some(quic);
            }
        }
        let inner = relay::Server::spawn(server_config).await?;
        let (scheme, addr) = match (inner.https_addr(), inner.http_addr()) {
            (Some(a), _) => ("https", a),
            (None, Some(a)) => ("http", a),
            (None, None) => return Err(Error::Url("the relay bound no listener".into())),
        };
        let host = config.hostname.clone().unwrap_or_else(|| match addr.ip() {
            ip if ip.is_unspecified() => "127.0.0.1".into(),
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
        let text = format!("{scheme}://{host}:{}/", addr.port());
        let url = text.parse().map_err(|_| Error::Url(text))?;
        tracing::info!(%url, access = ?config.access, "relay listening");
        Ok(Self {
            inner,
            url,
            _watch: watch,
        })
    }

    /// The URL endpoints use to reach this relay.
    pub fn url(&self) -> &RelayUrl {
        &self.url
    }

    /// The QUIC address-discovery port, when TLS is on.
    pub fn quic_addr(&self) -> Option<SocketAddr> {
        self.inner.quic_addr()
    }

    /// Stops the relay.
    pub async fn shutdown(self) {
        let _ = self.inner.shutdown().await;
    }

    /// Serves until `stop`, then shuts down; returns early if the relay ends on its own.
    pub async fn run(mut self, stop: CancellationToken) {
        let asked = tokio::select! {
            () = stop.cancelled() => true,
            r = self.inner.join() => {
                tracing::error!(result = ?r, "the relay stopped on its own");
                false
            }
        };
        if asked {
            self.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iroh::SecretKey;
    use iroh_relay::client::{ClientBuilder, ConnectError};
    use iroh_relay::protos::handshake;

    async fn connect(relay: &Server, key: &SecretKey) -> Result<(), ConnectError> {
        // Plain HTTP: the TLS configuration is required but unused.
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        ClientBuilder::new(
            relay.url().clone(),
            key.clone(),
            iroh::dns::DnsResolver::new(),
        )
        .tls_client_config(tls)
        .connect()
        .await
        .map(drop)
    }

    fn local(access: Access) -> Config {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            access,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_restricted_relay_refuses_unknown_endpoints_until_they_are_known() {
        let known = KnownEndpoints::default();
        let relay = Server::bind(local(Access::Known(known.clone())))
            .await
            .unwrap();
        let key = SecretKey::from_bytes(&[7; 32]);
        let refused = connect(&relay, &key).await;
        assert!(
            matches!(
                &refused,
                Err(ConnectError::Handshake {
                    source: handshake::Error::ServerDeniedAuth { .. },
                    ..
                })
            ),
            "{refused:?}"
        );
        known.insert(key.public());
        connect(&relay, &key).await.unwrap();
        assert!(
            connect(&relay, &SecretKey::from_bytes(&[8; 32]))
                .await
                .is_err(),
            "another key is still refused"
        );
        relay.shutdown().await;
    }

    #[tokio::test]
    async fn an_open_relay_serves_everyone() {
        let relay = Server::bind(local(Access::Open)).await.unwrap();
        connect(&relay, &SecretKey::from_bytes(&[9; 32]))
            .await
            .unwrap();
        relay.shutdown().await;
    }

    #[test]
    fn connectors_and_class_gateways_are_known() {
        let id = |b: u8| SecretKey::from_bytes(&[b; 32]).public();
        let connector = |v: serde_json::Value| -> Connector {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "c", "namespace": "p"},
                "spec": {"connectorClassName": "portway"},
                "status": v,
            }))
            .unwrap()
        };
        let connectors = [
            connector(
                serde_json::json!({"connectionDetails": {"type": "PublicKey", "publicKey": {"id": id(1).to_string()}}}),
            ),
            connector(serde_json::json!({})),
            connector(
                serde_json::json!({"connectionDetails": {"type": "PublicKey", "publicKey": {"id": "not-a-key"}}}),
            ),
        ];
        let class: ConnectorClass = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "portway"},
            "spec": {"controllerName": "portway.dev/operator"},
            "status": {"gateways": [
                {"name": "edge-a", "endpointId": id(2).to_string()},
                {"name": "edge-b", "endpointId": id(3).to_string()},
            ]},
        }))
        .unwrap();
        assert_eq!(
            known_ids(&connectors, [&class]),
            HashSet::from([id(1), id(2), id(3)])
        );
    }
}
