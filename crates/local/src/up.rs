//! `portway up`: API server, DNS, relay, operator, edge and sidecar in one process, on one
//! SQLite file. They still talk to each other over the Kubernetes API, as they would on
//! separate machines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use portway_apiserver::auth::{Namespaces, TokenLine};
use portway_apiserver::files;
use portway_discovery::endpoint;
use portway_gateway::{edge, metrics::Metrics, model::Table, routes, sidecar};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Addresses every part listens on; port 0 picks a free port.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Default `127.0.0.1:6443`.
    pub apiserver: SocketAddr,
    /// Default `127.0.0.1:5353`.
    pub dns: SocketAddr,
    /// Default `portway.localhost`.
    pub zone: String,
    /// Default `127.0.0.1:3340`.
    pub relay: SocketAddr,
    /// The public edge; default `127.0.0.1:8080`.
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub cert_dir: Option<PathBuf>,
    /// The sidecar's own listener (what EndpointSlices point at, and what an Envoy would
    /// use); the built-in edge calls the sidecar in process. Default `127.0.0.1:4001`.
    pub sidecar: SocketAddr,
    /// `/metrics`; default `127.0.0.1:9090`.
    pub metrics: SocketAddr,
}

impl Config {
    pub fn new(data_dir: PathBuf) -> Self {
        let local = |port| SocketAddr::from(([127, 0, 0, 1], port));
        Self {
            data_dir,
            apiserver: local(6443),
            dns: local(5353),
            zone: "portway.localhost".into(),
            relay: local(3340),
            http: local(8080),
            https: None,
            cert_dir: None,
            sidecar: local(4001),
            metrics: local(9090),
        }
    }
}

/// What `portway up` tells its users (and `portway http`), saved as `DATA/portway.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Info {
    pub apiserver: String,
    /// The admin kubeconfig (stays on this machine; `portway http` mints join tokens
    /// with it).
    pub kubeconfig: PathBuf,
    pub dns: SocketAddr,
    pub zone: String,
    pub relay: String,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub sidecar: SocketAddr,
    pub sidecar_id: String,
    pub metrics: SocketAddr,
}

impl Info {
    pub const FILE: &'static str = "portway.json";

    /// Reads `DATA/portway.json`.
    ///
    /// # Errors
    /// When `portway up` never ran with this data directory.
    pub fn load(data_dir: &Path) -> Result<Self, Error> {
        let path = data_dir.join(Self::FILE);
        let bytes = std::fs::read(&path).map_err(|_| Error::NotUp(path.clone()))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt(path, e.to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0} not found: start `portway up` first (with the same --data)")]
    NotUp(PathBuf),
    #[error("{0} is not valid: {1}")]
    Corrupt(PathBuf, String),
    #[error("writing {0}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("API server")]
    Apiserver(#[from] portway_apiserver::Error),
    #[error("kube client")]
    Kube(#[from] kube::Error),
    #[error("kubeconfig")]
    Kubeconfig(String),
    #[error(transparent)]
    Client(#[from] portway_kube::ClientError),
    #[error("relay")]
    Relay(#[from] portway_discovery::relay::Error),
    #[error("DNS server")]
    Dns(#[from] portway_discovery::dns::Error),
    #[error("sidecar")]
    Sidecar(#[from] sidecar::SetupError),
    #[error("operator")]
    Operator(#[from] portway_operator::Error),
    #[error("edge")]
    Edge(#[from] edge::Error),
    #[error("binding {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// Everything running.
pub struct Up {
    pub info: Info,
    shutdown: CancellationToken,
    apiserver: portway_apiserver::Server,
    relay: portway_discovery::relay::Server,
    dns: portway_discovery::dns::Server,
    operator: portway_operator::Operator,
    edge: edge::Edge,
    endpoint: iroh::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Creates the tokens file with an admin token on first start. Devices never get a token
/// from here: each joins with a short-lived join token for one project and gets its own
/// credential. A token for every namespace that earlier versions wrote for agents
/// (`local-agent,agent,*`) is removed, with the kubeconfig that carried it.
fn ensure_tokens(path: &Path, dir: &Path) -> Result<(), Error> {
    let legacy = |l: &&str| match TokenLine::parse(l) {
        Some(Ok(t)) => t.user == "local-agent" && t.namespaces == Namespaces::All,
        _ => false,
    };
    match std::fs::read_to_string(path) {
        Ok(text) if text.lines().any(|l| legacy(&l)) => {
            let kept: String = text
                .lines()
                .filter(|l| !legacy(l))
                .map(|l| format!("{l}\n"))
                .collect();
            files::write_private(path, kept.as_bytes())
                .map_err(|e| Error::Write(path.to_owned(), e))?;
            let _ = std::fs::remove_file(dir.join("agent.kubeconfig"));
            tracing::warn!(path = %path.display(), "removed the all-namespaces agent token of an earlier version");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(_) => {
            let text = format!(
                "# token,user,roles,namespaces\n{},admin,admin,*\n",
                files::new_token()
            );
            files::write_private(path, text.as_bytes())
                .map_err(|e| Error::Write(path.to_owned(), e))
        }
    }
}

impl Up {
    /// Starts every part and returns once all listen.
    ///
    /// # Errors
    /// When any part fails to start; the ones already started stop.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let dir = &config.data_dir;
        files::prepare_data_dir(dir).map_err(|e| Error::Write(dir.clone(), e))?;
        let tokens = dir.join("tokens.csv");
        ensure_tokens(&tokens, dir)?;
        let mut api_config = portway_apiserver::Config::new(dir.clone());
        api_config.listen = config.apiserver;
        api_config.tokens_file = Some(tokens);
        let apiserver = portway_apiserver::Server::bind(api_config).await?;
        let kubeconfig = apiserver
            .kubeconfig()
            .map(Path::to_path_buf)
            .ok_or_else(|| Error::Kubeconfig("no admin token".into()))?;
        let client = portway_kube::client(Some(&kubeconfig)).await?;

        let relay = portway_discovery::relay::Server::bind(portway_discovery::relay::Config {
            listen: config.relay,
            access: portway_discovery::relay::Access::Api(client.clone()),
            ..Default::default()
        })
        .await?;
        let mut dns_config = portway_discovery::dns::Config::new(config.zone.clone());
        dns_config.listen = config.dns;
        let dns = portway_discovery::dns::Server::bind(dns_config, client.clone()).await?;

        let sidecar_listener = tokio::net::TcpListener::bind(config.sidecar)
            .await
            .map_err(|e| Error::Bind(config.sidecar, e))?;
        let sidecar_addr = sidecar_listener
            .local_addr()
            .map_err(|e| Error::Bind(config.sidecar, e))?;
        let mut operator_config = portway_operator::Config::new(vec![sidecar_addr]);
        operator_config.proxy.zone = config.zone.clone();
        let operator = portway_operator::Operator::start(operator_config, client.clone()).await?;

        let metrics = Metrics::default();
        let setup = sidecar::Setup {
            key: dir.join("sidecar.key"),
            relays: vec![relay.url().clone()],
            dns: endpoint::DnsLookup {
                origin: config.zone.clone(),
                nameserver: dns.local_addr(),
            },
            n0: false,
            class: portway_api::DEFAULT_CLASS.into(),
            name: "local".into(),
        };
        let sidecar = Arc::new(
            sidecar::start(&setup, &client, sidecar::Config::default(), metrics.clone()).await?,
        );
        let ep = sidecar.endpoint().clone();
        let shutdown = CancellationToken::new();
        let mut tasks = vec![portway_gateway::serve_sidecar(
            sidecar_listener,
            sidecar.clone(),
            shutdown.clone(),
        )];

        let table = Arc::new(ArcSwap::from_pointee(Table::default()));
        let edge_config = edge::Config {
            http: Some(config.http),
            https: config.https,
            cert_dir: config.cert_dir.clone(),
            ..Default::default()
        };
        let edge = edge::Edge::bind(edge_config, table.clone(), sidecar, metrics.clone()).await?;
        let http = edge.http_addr().unwrap_or(config.http);
        let mut addresses = vec![http.ip().to_string()];
        if let Some(https) = edge.https_addr() {
            addresses.push(https.ip().to_string());
        }
        addresses.dedup();
        let routes_config = routes::Config {
            class: portway_api::DEFAULT_CLASS.into(),
            controller_name: portway_api::CONTROLLER_NAME.into(),
            addresses,
            write_status: true,
        };
        let routes = routes::spawn(
            client.clone(),
            routes_config,
            table,
            watch::channel(0).0,
            shutdown.clone(),
        );
        tasks.push(tokio::spawn(routes.join()));

        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(&mut registry);
        operator.metrics().register(&mut registry);
        let (metrics_addr, metrics_task) =
            portway_gateway::serve_metrics(config.metrics, Arc::new(registry), shutdown.clone())
                .await
                .map_err(|e| Error::Bind(config.metrics, e))?;
        tasks.push(metrics_task);

        let info = Info {
            apiserver: apiserver.url().to_owned(),
            kubeconfig,
            dns: dns.local_addr(),
            zone: config.zone.clone(),
            relay: relay.url().to_string(),
            http,
            https: edge.https_addr(),
            sidecar: sidecar_addr,
            sidecar_id: ep.id().to_string(),
            metrics: metrics_addr,
        };
        let path = dir.join(Info::FILE);
        let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
        files::write_private(&path, &json).map_err(|e| Error::Write(path, e))?;
        Ok(Self {
            info,
            shutdown,
            apiserver,
            relay,
            dns,
            operator,
            edge,
            endpoint: ep,
            tasks,
        })
    }

    /// Stops everything: the edge first (no new requests), the API server last.
    pub async fn shutdown(self) {
        self.edge.shutdown();
        self.shutdown.cancel();
        self.edge.join().await;
        for t in self.tasks {
            let _ = t.await;
        }
        self.endpoint.close().await;
        self.operator.shutdown();
        self.operator.join().await;
        self.dns.shutdown();
        self.dns.join().await;
        self.relay.shutdown().await;
        self.apiserver.shutdown();
        self.apiserver.join().await;
    }
}
