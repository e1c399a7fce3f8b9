//! `portway up`: API server, DNS, relay, operator, edge and sidecar in one process, on one
//! SQLite file. They still talk to each other over the Kubernetes API, as they would on
//! separate machines.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portway_apiserver::auth::{Namespaces, TokenLine};
use portway_apiserver::files;
use portway_discovery::endpoint;
use portway_gateway::{EdgeStack, EdgeStackConfig, edge, sidecar};
use portway_serve::supervise::Supervisor;
use serde::{Deserialize, Serialize};
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
    /// How long a `portway http` tunnel whose process died is kept (its connector,
    /// proxy and hostname) before it is deleted; default 15 min.
    pub ephemeral_ttl: Duration,
    /// The edge's access log (`portway::access` events); default off.
    pub access_log: bool,
    /// With `https`: issue from this ACME directory instead of the local CA (DNS-01
    /// through our DNS server).
    pub acme: Option<portway_operator::acme::Config>,
    /// Checks hostnames outside the zone before they are routed; `None`: the system's
    /// resolver ([`system_resolver`]).
    pub hostname_resolver: Option<SocketAddr>,
    /// Origins (backends without a connector): the networks allowed although forbidden
    /// by default, and the roots trusted for their certificates.
    pub origins: portway_gateway::origin::Config,
    /// Validity asked of the local CA (default 90 days) and how long before expiry a
    /// certificate is renewed (default 30 days).
    pub certificate_validity: Option<Duration>,
    pub renew_before: Option<Duration>,
    /// How long an Event lives after it was last seen; default one hour.
    pub event_ttl: Duration,
    /// The public ports TCPProxies may have; default 20000-20999.
    pub tcp_ports: std::ops::RangeInclusive<u16>,
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
            ephemeral_ttl: Duration::from_secs(15 * 60),
            access_log: false,
            acme: None,
            hostname_resolver: None,
            origins: portway_gateway::origin::Config::default(),
            certificate_validity: None,
            renew_before: None,
            event_ttl: portway_apiserver::events::DEFAULT_TTL,
            tcp_ports: portway_operator::tcp::ports::DEFAULT_RANGE,
        }
    }
}

/// The first `nameserver` of `/etc/resolv.conf` (port 53), else `127.0.0.1:53` as glibc
/// assumes.
pub fn system_resolver() -> SocketAddr {
    std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|l| l.trim().strip_prefix("nameserver"))
                .find_map(|ip| ip.trim().parse::<std::net::IpAddr>().ok())
        })
        .map_or_else(
            || SocketAddr::from(([127, 0, 0, 1], 53)),
            |ip| SocketAddr::new(ip, 53),
        )
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
    #[error("the local CA (for HTTPS)")]
    Ca(#[source] portway_tls::ca::CaError),
    #[error("operator")]
    Operator(#[from] portway_operator::Error),
    #[error("edge")]
    Edge(#[from] portway_gateway::EdgeStackError),
    #[error("binding {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("the operator did not list every kind within {0:?}")]
    NotSynced(Duration),
    #[error(transparent)]
    Died(portway_serve::supervise::Died),
}

/// How long each part may take to stop before it is aborted.
const GRACE: Duration = Duration::from_secs(15);

/// How long the operator may take to list every kind once.
const SYNC: Duration = Duration::from_secs(60);

/// Everything running, as one: see [`Up::run`].
pub struct Up {
    pub info: Info,
    parts: Supervisor,
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
    /// Starts every part and returns once all listen and the operator's caches are synced.
    ///
    /// # Errors
    /// When any part fails to start; the ones already started are stopped first.
    pub async fn start(config: Config) -> Result<Self, Error> {
        let mut parts = Supervisor::new();
        match start_parts(&config, &mut parts).await {
            Ok(info) => Ok(Self { info, parts }),
            Err(e) => {
                parts.shutdown(GRACE).await;
                Err(e)
            }
        }
    }

    /// Runs until `stop` resolves or a part stops on its own; then stops everything, last
    /// started first (the edge before the API server).
    ///
    /// # Errors
    /// [`Error::Died`] naming the part that stopped on its own.
    pub async fn run(mut self, stop: impl Future<Output = ()>) -> Result<(), Error> {
        let died = tokio::select! {
            () = stop => None,
            died = self.parts.died() => Some(died),
        };
        if let Some(d) = &died {
            tracing::error!(part = d.part, reason = %d, "a part stopped; stopping everything");
        }
        self.shutdown().await;
        died.map_or(Ok(()), |d| Err(Error::Died(d)))
    }

    /// Stops everything, last started first.
    pub async fn shutdown(self) {
        let aborted = self.parts.shutdown(GRACE).await;
        if !aborted.is_empty() {
            tracing::warn!(?aborted, ?GRACE, "parts aborted after the grace period");
        }
    }
}

/// Starts each part and hands it to `parts` at once, so a later failure stops it.
async fn start_parts(config: &Config, parts: &mut Supervisor) -> Result<Info, Error> {
    let dir = &config.data_dir;
    files::prepare_data_dir(dir).map_err(|e| Error::Write(dir.clone(), e))?;
    let tokens = dir.join("tokens.csv");
    ensure_tokens(&tokens, dir)?;
    let mut api_config = portway_apiserver::Config::new(dir.clone());
    api_config.listen = config.apiserver;
    api_config.tokens_file = Some(tokens);
    api_config.event_ttl = config.event_ttl;
    let apiserver = portway_apiserver::Server::bind(api_config).await?;
    let kubeconfig = apiserver
        .kubeconfig()
        .map(Path::to_path_buf)
        .ok_or_else(|| Error::Kubeconfig("no admin token".into()));
    let api_url = apiserver.url().to_owned();
    parts.spawn("API server", apiserver.shutdown_token(), apiserver.join());
    let kubeconfig = kubeconfig?;
    let client = portway_kube::client(Some(&kubeconfig)).await?;

    let relay = portway_discovery::relay::Server::bind(portway_discovery::relay::Config {
        listen: config.relay,
        access: portway_discovery::relay::Access::Api(client.clone()),
        ..Default::default()
    })
    .await?;
    let relay_url = relay.url().clone();
    let stop = CancellationToken::new();
    parts.spawn("relay", stop.clone(), relay.run(stop));

    let mut dns_config = portway_discovery::dns::Config::new(config.zone.clone());
    dns_config.listen = config.dns;
    let dns = portway_discovery::dns::Server::bind(dns_config, client.clone()).await?;
    let dns_addr = dns.local_addr();
    parts.spawn("DNS server", dns.shutdown_token(), dns.join());

    let sidecar_listener = tokio::net::TcpListener::bind(config.sidecar)
        .await
        .map_err(|e| Error::Bind(config.sidecar, e))?;
    let sidecar_addr = sidecar_listener
        .local_addr()
        .map_err(|e| Error::Bind(config.sidecar, e))?;
    let mut operator_config = portway_operator::Config::new(vec![sidecar_addr]);
    operator_config.proxy.zone = config.zone.clone();
    operator_config.ephemeral_ttl = config.ephemeral_ttl;
    operator_config.proxy.allowed_origins = config.origins.allowed.clone();
    operator_config.tcp_ports = config.tcp_ports.clone();
    // Names outside the zone must be proven: on by default, as a public edge needs.
    let resolver = config.hostname_resolver.unwrap_or_else(system_resolver);
    operator_config.verification = Some(portway_operator::verify::Config::new(resolver));
    if config.https.is_some() {
        let issuer = match config.acme.clone() {
            Some(mut acme) => {
                acme.dns = Some(dns_addr);
                acme.resolver = Some(resolver);
                portway_operator::certs::Issuer::Acme(Arc::new(portway_operator::acme::Acme::new(
                    acme,
                    client.clone(),
                )))
            }
            // The CA the API server made: one root for the API and every tunnel's HTTPS.
            None => portway_operator::certs::Issuer::LocalCa(Arc::new(
                portway_tls::ca::LocalCa::load(&dir.join("pki")).map_err(Error::Ca)?,
            )),
        };
        let mut certs = portway_operator::certs::Config::new(issuer);
        certs.validity = config.certificate_validity.unwrap_or(certs.validity);
        certs.renew_before = config.renew_before.unwrap_or(certs.renew_before);
        operator_config.certificates = Some(certs);
    }
    let stop = CancellationToken::new();
    let operator =
        portway_operator::Operator::start_until(operator_config, client.clone(), stop.clone())
            .await?;
    let operator_metrics = operator.metrics().clone();
    match tokio::time::timeout(SYNC, operator.ready()).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) | Err(_) => {
            operator.shutdown();
            operator.join().await;
            return Err(Error::NotSynced(SYNC));
        }
    }
    parts.spawn("operator", stop, operator.join());

    let setup = sidecar::Setup {
        key: dir.join("sidecar.key"),
        relays: vec![relay_url.clone()],
        dns: endpoint::DnsLookup {
            origin: config.zone.clone(),
            nameserver: dns_addr,
        },
        n0: false,
        class: portway_api::DEFAULT_CLASS.into(),
        name: "local".into(),
    };
    let edge_config = EdgeStackConfig {
        sidecar: setup,
        edge: edge::Config {
            http: Some(config.http),
            https: config.https,
            cert_dir: config.cert_dir.clone(),
            access_log: config.access_log,
            ..Default::default()
        },
        class: portway_api::DEFAULT_CLASS.into(),
        addresses: Vec::new(),
        origins: config.origins.clone(),
    };
    let edge = EdgeStack::start(edge_config, client.clone(), Some(sidecar_listener)).await?;
    let (http, https, sidecar_id) = (
        edge.http_addr().unwrap_or(config.http),
        edge.https_addr(),
        edge.sidecar_id().to_string(),
    );
    let mut registry = prometheus_client::registry::Registry::default();
    edge.metrics().register(&mut registry);
    operator_metrics.register(&mut registry);
    parts.spawn("edge", edge.shutdown_token(), edge.join());

    let stop = CancellationToken::new();
    let (metrics_addr, metrics_task) =
        portway_gateway::serve_metrics(config.metrics, Arc::new(registry), stop.clone())
            .await
            .map_err(|e| Error::Bind(config.metrics, e))?;
    parts.spawn("metrics", stop, async move {
        let _ = metrics_task.await;
    });

    let info = Info {
        apiserver: api_url,
        kubeconfig,
        dns: dns_addr,
        zone: config.zone.clone(),
        relay: relay_url.to_string(),
        http,
        https,
        sidecar: sidecar_addr,
        sidecar_id,
        metrics: metrics_addr,
    };
    let path = dir.join(Info::FILE);
    let json = serde_json::to_vec_pretty(&info).unwrap_or_default();
    files::write_private(&path, &json).map_err(|e| Error::Write(path, e))?;
    Ok(info)
}
