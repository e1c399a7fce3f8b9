//! The Envoy renderer: the route model as Envoy listeners, route configuration and
//! clusters, served over ADS (state of the world, versioned).
//!
//! Design: Envoy forwards each request as plain HTTP/1.1 to the sidecar beside it, with the
//! `datum-*` headers written per route (per backend, on weighted clusters). That keeps
//! WebSocket (HTTP/1.1 upgrade to the sidecar), streaming (`timeout: 0s`) and HTTP/2 from
//! clients (terminated by Envoy) working, and each tunnel change is one route update.
//! The alternative — CONNECT to the sidecar through an internal listener — needs a
//! cluster per target and CDS plus RDS churn for every tunnel (see the notes on Envoy).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster,
    circuit_breakers::Thresholds,
    cluster::{ClusterDiscoveryType, DiscoveryType},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HeaderValue, HeaderValueOption,
    Http2ProtocolOptions, Node, SocketAddress, address, config_source,
    header_value_option::HeaderAppendAction, socket_address,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
};
use envoy_types::pb::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost, WeightedCluster, header_matcher, query_parameter_matcher, route, route_action,
    route_match, weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{CodecType, RouteSpecifier, UpgradeConfig},
    http_filter,
};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Duration as PbDuration, UInt32Value};
use futures::Stream;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::model::{Backend, HeaderFilter, PathMatch, Table};

pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// The one route configuration every listener uses.
pub const ROUTES: &str = "portway_routes";
/// A cluster without endpoints: routes whose backends are all unready point here, so
/// Envoy answers 503 by itself.
pub const UNREADY: &str = "portway_unready";

/// What one Envoy needs besides the shared routes: where its sidecar and listener are
/// (from the bootstrap's node metadata, else the server's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub sidecar: SocketAddr,
    pub listen: SocketAddr,
}

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.to_owned(),
        value: m.encode_to_vec(),
    }
}

fn socket(addr: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: addr.ip().to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(
                addr.port(),
            ))),
            ..Default::default()
        })),
    }
}

/// The sidecar cluster for backend slot `i` (weighted clusters need distinct names).
pub fn sidecar_cluster(i: usize) -> String {
    format!("portway_sidecar_{i}")
}

fn cluster(name: &str, endpoint: Option<SocketAddr>) -> Cluster {
    let lb_endpoints = endpoint
        .map(|a| LbEndpoint {
            host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(a)),
                ..Default::default()
            })),
            ..Default::default()
        })
        .into_iter()
        .collect();
    let high = Some(UInt32Value { value: 1_000_000 });
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(PbDuration {
            seconds: 2,
            nanos: 0,
        }),
        load_assignment: Some(ClusterLoadAssignment {
            cluster_name: name.to_owned(),
            endpoints: vec![LocalityLbEndpoints {
                lb_endpoints,
                ..Default::default()
            }],
            ..Default::default()
        }),
        // The sidecar is local and multiplexes everything: Envoy's default limits (1024)
        // would cap concurrency, not protect anything.
        circuit_breakers: Some(CircuitBreakers {
            thresholds: vec![Thresholds {
                max_connections: high,
                max_pending_requests: high,
                max_requests: high,
                max_retries: high,
                ..Default::default()
            }],
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Clusters: one per backend slot (all the local sidecar) and the empty one.
pub fn clusters(table: &Table, node: &NodeConfig) -> Vec<Cluster> {
    let slots = table
        .hosts()
        .flat_map(|h| h.routes.iter().map(|r| r.backends.len()))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut out: Vec<Cluster> = (0..slots)
        .map(|i| cluster(&sidecar_cluster(i), Some(node.sidecar)))
        .collect();
    out.push(cluster(UNREADY, None));
    out
}

/// The public listener: HTTP/1.1 and h2c (codec AUTO), WebSocket upgrades, routes by RDS.
pub fn listeners(node: &NodeConfig) -> Vec<Listener> {
    let hcm = HttpConnectionManager {
        stat_prefix: "portway".into(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            route_config_name: ROUTES.into(),
            config_source: Some(ConfigSource {
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                resource_api_version: ApiVersion::V3 as i32,
                ..Default::default()
            }),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(
                "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                &Router::default(),
            ))),
            ..Default::default()
        }],
        upgrade_configs: vec![UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        }],
        use_remote_address: Some(BoolValue { value: true }),
        http2_protocol_options: Some(Http2ProtocolOptions {
            allow_connect: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![Listener {
        name: "portway_http".into(),
        address: Some(socket(node.listen)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(filter::ConfigType::TypedConfig(any(
                    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    &hcm,
                ))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }]
}

fn header_options(f: &HeaderFilter) -> Vec<HeaderValueOption> {
    let opt = |n: &http::HeaderName, v: &http::HeaderValue, action: HeaderAppendAction| {
        HeaderValueOption {
            header: Some(HeaderValue {
                key: n.as_str().to_owned(),
                // Envoy formats header values: a literal % must be doubled.
                value: v.to_str().unwrap_or_default().replace('%', "%%"),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    f.set
        .iter()
        .map(|(n, v)| opt(n, v, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            f.add
                .iter()
                .map(|(n, v)| opt(n, v, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect()
}

/// A backend's user filter, then the device and target: user filters hold no reserved
/// header (the model drops them), so the routing headers cannot be overridden.
fn backend_headers(b: &Backend) -> Vec<HeaderValueOption> {
    let mut out = header_options(&b.headers);
    if let Some(t) = &b.tunnel {
        out.extend(header_options(&HeaderFilter {
            set: t.headers().into(),
            ..Default::default()
        }));
    }
    out
}

fn exact(v: &str) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(string_matcher::MatchPattern::Exact(v.to_owned())),
        ..Default::default()
    }
}

/// The shared route configuration: a virtual host per hostname, a route per match in the
/// model's precedence order, `datum-*` headers per backend.
pub fn route_configuration(table: &Table) -> RouteConfiguration {
    let mut hosts: Vec<_> = table.hosts().collect();
    hosts.sort_by(|a, b| a.hostname.cmp(&b.hostname));
    let virtual_hosts = hosts
        .into_iter()
        .map(|h| VirtualHost {
            name: h.hostname.clone(),
            domains: vec![h.hostname.clone()],
            routes: h
                .routes
                .iter()
                .map(|r| {
                    let path = match &r.path {
                        PathMatch::Exact(p) => route_match::PathSpecifier::Path(p.clone()),
                        PathMatch::Prefix(p) if p == "/" => {
                            route_match::PathSpecifier::Prefix("/".into())
                        }
                        PathMatch::Prefix(p) => route_match::PathSpecifier::PathSeparatedPrefix(
                            p.trim_end_matches('/').to_owned(),
                        ),
                    };
                    let mut headers: Vec<HeaderMatcher> = r
                        .headers
                        .iter()
                        .map(|(n, v)| HeaderMatcher {
                            name: n.clone(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(exact(v)),
                            ),
                            ..Default::default()
                        })
                        .collect();
                    if let Some(m) = &r.method {
                        headers.push(HeaderMatcher {
                            name: ":method".into(),
                            header_match_specifier: Some(
                                header_matcher::HeaderMatchSpecifier::StringMatch(exact(m)),
                            ),
                            ..Default::default()
                        });
                    }
                    let query_parameters = r
                        .query
                        .iter()
                        .map(|(n, v)| QueryParameterMatcher {
                            name: n.clone(),
                            query_parameter_match_specifier: Some(
                                query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                                    exact(v),
                                ),
                            ),
                        })
                        .collect();
                    let ready: Vec<_> = r
                        .backends
                        .iter()
                        .enumerate()
                        .filter(|(_, b)| b.ready && b.weight > 0)
                        .collect();
                    let mut request_headers_to_add = header_options(&r.filter);
                    let specifier = match ready.as_slice() {
                        [] => route_action::ClusterSpecifier::Cluster(UNREADY.into()),
                        [(i, b)] => {
                            request_headers_to_add.extend(backend_headers(b));
                            route_action::ClusterSpecifier::Cluster(sidecar_cluster(*i))
                        }
                        many => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
                            clusters: many
                                .iter()
                                .map(|(i, b)| ClusterWeight {
                                    name: sidecar_cluster(*i),
                                    weight: Some(UInt32Value { value: b.weight }),
                                    request_headers_to_add: backend_headers(b),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                    };
                    Route {
                        name: format!("{}/{}", r.route, r.rule),
                        r#match: Some(RouteMatch {
                            path_specifier: Some(path),
                            headers,
                            query_parameters,
                            ..Default::default()
                        }),
                        action: Some(route::Action::Route(RouteAction {
                            cluster_specifier: Some(specifier),
                            // Streams (SSE, uploads) must not be cut off by a route timeout.
                            timeout: Some(PbDuration {
                                seconds: 0,
                                nanos: 0,
                            }),
                            ..Default::default()
                        })),
                        request_headers_to_add,
                        request_headers_to_remove: r
                            .filter
                            .remove
                            .iter()
                            .map(|n| n.as_str().to_owned())
                            .collect(),
                        ..Default::default()
                    }
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    RouteConfiguration {
        name: ROUTES.into(),
        virtual_hosts,
        // A client must never choose the device: every route (or weighted cluster) that
        // reaches the sidecar overwrites all four datum-* headers, and the sidecar drops any
        // other datum-* or x-iroh-* header. (A global removal here would also remove the
        // values Envoy adds per weighted cluster, which are applied before it.)
        most_specific_header_mutations_wins: true,
        ignore_port_in_host_matching: true,
        ..Default::default()
    }
}

/// Every resource of one type for one node, as `Any`s.
pub fn resources(type_url: &str, table: &Table, node: &NodeConfig) -> Vec<Any> {
    match type_url {
        CLUSTER_TYPE => clusters(table, node)
            .iter()
            .map(|c| any(CLUSTER_TYPE, c))
            .collect(),
        LISTENER_TYPE => listeners(node)
            .iter()
            .map(|l| any(LISTENER_TYPE, l))
            .collect(),
        ROUTE_TYPE => vec![any(ROUTE_TYPE, &route_configuration(table))],
        _ => Vec::new(),
    }
}

/// What the server knows of one connected Envoy (by node id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envoy {
    /// Open ADS streams from this node id (Envoys sharing an id count together).
    pub streams: usize,
    /// The latest NACK per resource type, cleared when that type is next ACKed.
    pub rejected: BTreeMap<String, String>,
}

/// Every connected Envoy, by node id.
pub type Envoys = BTreeMap<String, Envoy>;

/// Shared by every stream.
struct Shared {
    table: Arc<ArcSwap<Table>>,
    version: watch::Receiver<u64>,
    defaults: NodeConfig,
    envoys: watch::Sender<Envoys>,
}

/// One stream's membership in [`Shared::envoys`]; leaving is in `Drop` so that every way a
/// stream ends (client gone, server shutting down) forgets its NACKs.
struct Registration {
    shared: Arc<Shared>,
    id: String,
}

impl Registration {
    fn new(shared: Arc<Shared>, id: String) -> Self {
        shared
            .envoys
            .send_modify(|e| e.entry(id.clone()).or_default().streams += 1);
        Self { shared, id }
    }

    fn rejected(&self, type_url: &str, message: Option<&str>) {
        self.shared.envoys.send_if_modified(|e| {
            let Some(envoy) = e.get_mut(&self.id) else {
                return false;
            };
            match message {
                Some(m) => {
                    envoy
                        .rejected
                        .insert(type_url.to_owned(), m.to_owned())
                        .as_deref()
                        != Some(m)
                }
                None => envoy.rejected.remove(type_url).is_some(),
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.envoys.send_modify(|e| {
            if let Some(envoy) = e.get_mut(&self.id) {
                envoy.streams -= 1;
                if envoy.streams == 0 {
                    e.remove(&self.id);
                }
            }
        });
    }
}

fn node_config(node: Option<&Node>, defaults: &NodeConfig) -> NodeConfig {
    let field = |k: &str| -> Option<SocketAddr> {
        let v = node?.metadata.as_ref()?.fields.get(k)?;
        match v.kind.as_ref()? {
            envoy_types::pb::google::protobuf::value::Kind::StringValue(s) => s.parse().ok(),
            _ => None,
        }
    };
    NodeConfig {
        sidecar: field("sidecar").unwrap_or(defaults.sidecar),
        listen: field("listen").unwrap_or(defaults.listen),
    }
}

#[derive(Default)]
struct Subscription {
    sent: Option<u64>,
    nonce: u64,
}

/// The order Envoy wants updates in: clusters before listeners before routes.
const ORDER: [&str; 3] = [CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE];

struct Ads(Arc<Shared>);

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, tonic::Status>> + Send>>;
type DeltaStream =
    Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let shared = self.0.clone();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, tonic::Status>>(16);
        tokio::spawn(async move {
            let mut node: Option<Node> = None;
            let mut registration: Option<Registration> = None;
            let mut subs: HashMap<String, Subscription> = HashMap::new();
            let mut version = shared.version.clone();
            let mut nonce = 0u64;
            loop {
                let send_all = tokio::select! {
                    msg = incoming.message() => match msg {
                        Ok(Some(req)) => {
                            if node.is_none() {
                                node = req.node.clone();
                            }
                            let registration = registration.get_or_insert_with(|| {
                                let id = node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
                                Registration::new(shared.clone(), id)
                            });
                            let sub = subs.entry(req.type_url.clone()).or_default();
                            let answers_last = !req.response_nonce.is_empty() && req.response_nonce == sub.nonce.to_string();
                            if !answers_last {
                                // A first request (or one after reconnect): answer this type now.
                                vec![req.type_url]
                            } else if let Some(err) = &req.error_detail {
                                tracing::warn!(node = %registration.id, type_url = %req.type_url, error = %err.message, "Envoy rejected the configuration (NACK)");
                                registration.rejected(&req.type_url, Some(&err.message));
                                continue;
                            } else {
                                registration.rejected(&req.type_url, None);
                                continue;
                            }
                        }
                        _ => return,
                    },
                    changed = version.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        ORDER.iter().filter(|t| subs.contains_key(**t)).map(|t| t.to_string()).collect()
                    }
                };
                let current = *version.borrow_and_update();
                let table = shared.table.load();
                let cfg = node_config(node.as_ref(), &shared.defaults);
                for type_url in send_all {
                    let Some(sub) = subs.get_mut(&type_url) else {
                        continue;
                    };
                    if sub.sent == Some(current) && sub.nonce != 0 {
                        continue;
                    }
                    nonce += 1;
                    sub.sent = Some(current);
                    sub.nonce = nonce;
                    let resp = DiscoveryResponse {
                        version_info: current.to_string(),
                        resources: resources(&type_url, &table, &cfg),
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "use state-of-the-world ADS (api_type: GRPC)",
        ))
    }
}

/// A running xDS server.
pub struct Server {
    addr: SocketAddr,
    envoys: watch::Receiver<Envoys>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves ADS on `listen` from `table`, pushing every time `version` moves.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn bind(
        listen: SocketAddr,
        table: Arc<ArcSwap<Table>>,
        version: watch::Receiver<u64>,
        defaults: NodeConfig,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (envoys_tx, envoys) = watch::channel(Envoys::new());
        let shared = Arc::new(Shared {
            table,
            version,
            defaults,
            envoys: envoys_tx,
        });
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(Ads(shared)))
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "xDS server stopped");
            }
        });
        tracing::info!(%addr, "xDS (ADS) listening");
        Ok(Self { addr, envoys, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connected Envoys and their standing NACKs.
    pub fn envoys(&self) -> watch::Receiver<Envoys> {
        self.envoys.clone()
    }

    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// The condition the xDS server keeps on every Gateway of its class: whether the Envoys
/// it feeds accepted the current configuration.
pub const CONDITION: &str = "XdsAccepted";

/// [`CONDITION`] for a Gateway, given the connected Envoys: `False` when any of them
/// rejected a resource type, `Unknown` when none is connected, `True` otherwise.
pub fn condition(envoys: &Envoys, generation: Option<i64>) -> Condition {
    let rejections: Vec<String> = envoys
        .iter()
        .flat_map(|(node, e)| {
            e.rejected
                .iter()
                .map(move |(t, m)| format!("Envoy {node:?} rejected {t}: {m}"))
        })
        .collect();
    if !rejections.is_empty() {
        return portway_api::condition(
            CONDITION,
            false,
            "Rejected",
            rejections.join("; "),
            generation,
        );
    }
    if envoys.is_empty() {
        let mut c = portway_api::condition(
            CONDITION,
            false,
            "NoEnvoy",
            "no Envoy is connected to the xDS server",
            generation,
        );
        c.status = "Unknown".into();
        return c;
    }
    let names: Vec<String> = envoys.keys().map(|n| format!("{n:?}")).collect();
    portway_api::condition(
        CONDITION,
        true,
        "Accepted",
        format!("accepted by every connected Envoy: {}", names.join(", ")),
        generation,
    )
}

/// Writes [`CONDITION`] on the Gateways of `class` whenever the connected Envoys or their
/// NACKs change, and every 30 s for Gateways created since (or whose status another
/// writer replaced).
pub fn spawn_reporter(
    client: kube::Client,
    class: String,
    mut envoys: watch::Receiver<Envoys>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use gateway_api::apis::standard::gateways::Gateway;
    use kube::api::{Api, ListParams};
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = envoys.changed() => if r.is_err() { return },
                _ = tick.tick() => {}
            }
            let current = envoys.borrow_and_update().clone();
            let api: Api<Gateway> = Api::all(client.clone());
            let list = match api.list(&ListParams::default()).await {
                Ok(list) => list,
                Err(e) => {
                    tracing::warn!(error = %e, "listing Gateways for XdsAccepted");
                    continue;
                }
            };
            for g in list
                .items
                .iter()
                .filter(|g| g.spec.gateway_class_name == class)
            {
                let mut conditions = g
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.clone())
                    .unwrap_or_default();
                let ours = condition(&current, g.metadata.generation);
                if !portway_api::set_condition(&mut conditions, ours.clone()) {
                    continue;
                }
                let ns = g.metadata.namespace.clone().unwrap_or_default();
                let name = g.metadata.name.clone().unwrap_or_default();
                let api: Api<Gateway> = Api::namespaced(client.clone(), &ns);
                if let Err(e) = portway_kube::patch_conditions(
                    &api,
                    Some(g),
                    &name,
                    "portway-xds",
                    &[ours],
                    None,
                )
                .await
                {
                    tracing::warn!(gateway = %format!("{ns}/{name}"), error = %e, "writing XdsAccepted");
                }
            }
        }
    })
}

/// A bootstrap that points Envoy at the xDS server; `sidecar` and `listen` travel in the
/// node metadata so one server can feed many Envoys, each with its own sidecar.
pub fn bootstrap(xds: SocketAddr, node_id: &str, node: &NodeConfig, admin: SocketAddr) -> String {
    format!(
        r#"# Generated by `portway envoy-bootstrap`. Run: envoy -c <this file>
node:
  id: {node_id}
  cluster: portway
  metadata:
    sidecar: "{sidecar}"
    listen: "{listen}"
admin:
  address: {{ socket_address: {{ address: {admin_ip}, port_value: {admin_port} }} }}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    set_node_on_first_message_only: true
    grpc_services: [ {{ envoy_grpc: {{ cluster_name: xds_cluster }} }} ]
  lds_config: {{ ads: {{}}, resource_api_version: V3 }}
  cds_config: {{ ads: {{}}, resource_api_version: V3 }}
static_resources:
  clusters:
  - name: xds_cluster
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: xds_cluster
      endpoints: [ {{ lb_endpoints: [ {{ endpoint: {{ address: {{ socket_address: {{ address: {xds_ip}, port_value: {xds_port} }} }} }} }} ] }} ]
"#,
        sidecar = node.sidecar,
        listen = node.listen,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
        xds_ip = xds.ip(),
        xds_port = xds.port(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Table {
        let gw: gateway_api::apis::standard::gateways::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "p"}, "spec": {"gatewayClassName": "portway", "listeners": []}})).unwrap();
        let backend = |svc: &str, node: &str| {
            json!({"name": svc, "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
            {"name": "datum-node-id", "value": node}, {"name": "datum-target-host", "value": "127.0.0.1"},
            {"name": "datum-target-port", "value": "3000"}]}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "datum-node-id", "value": "victim"}]}}]})
        };
        let route: gateway_api::apis::standard::httproutes::HttpRoute = serde_json::from_value(json!({
            "metadata": {"name": "r", "namespace": "p"},
            "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["app.example.com", "down.example.com"], "rules": [
                {"backendRefs": [backend("a", "n1"), backend("b", "n2")]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}, "headers": [{"name": "X-Env", "value": "dev"}], "method": "POST"}], "backendRefs": [backend("a", "n1")]},
                {"matches": [{"path": {"type": "Exact", "value": "/down"}}], "backendRefs": [backend("c", "n3")]},
            ]},
        }))
        .unwrap();
        let slice = |svc: &str, ready: bool| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(json!({"metadata": {"name": svc, "namespace": "p", "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]})).unwrap()
        };
        let slices = [slice("a", true), slice("b", true), slice("c", false)];
        crate::model::build(
            "portway",
            &[&gw],
            &[&route],
            &slices.iter().collect::<Vec<_>>(),
        )
        .0
    }

    fn node() -> NodeConfig {
        NodeConfig {
            sidecar: "127.0.0.1:4001".parse().unwrap(),
            listen: "0.0.0.0:10080".parse().unwrap(),
        }
    }

    #[test]
    fn clusters_point_every_slot_at_the_local_sidecar() {
        let c = clusters(&table(), &node());
        assert_eq!(
            c.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["portway_sidecar_0", "portway_sidecar_1", UNREADY]
        );
        let ep = &c[0].load_assignment.as_ref().unwrap().endpoints[0].lb_endpoints;
        assert_eq!(ep.len(), 1);
        assert!(
            c[2].load_assignment.as_ref().unwrap().endpoints[0]
                .lb_endpoints
                .is_empty(),
            "the unready cluster has no endpoints"
        );
    }

    #[test]
    fn routes_carry_headers_matches_and_readiness() {
        let rc = route_configuration(&table());
        assert!(rc.most_specific_header_mutations_wins && rc.ignore_port_in_host_matching);
        let app = rc
            .virtual_hosts
            .iter()
            .find(|v| v.name == "app.example.com")
            .unwrap();
        assert_eq!(app.domains, ["app.example.com"]);
        // Precedence: exact /down, then the /api/ prefix with method + header, then /.
        let paths: Vec<_> = app
            .routes
            .iter()
            .map(|r| r.r#match.as_ref().unwrap().path_specifier.clone().unwrap())
            .collect();
        assert_eq!(
            paths,
            [
                route_match::PathSpecifier::Path("/down".into()),
                route_match::PathSpecifier::PathSeparatedPrefix("/api".into()),
                route_match::PathSpecifier::Prefix("/".into()),
            ]
        );
        let action = |r: &Route| match r.action.clone().unwrap() {
            route::Action::Route(a) => a,
            _ => panic!("not a route action"),
        };
        assert_eq!(
            action(&app.routes[0]).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(UNREADY.into())),
            "all backends unready → 503"
        );
        let api = &app.routes[1];
        assert_eq!(
            api.r#match
                .as_ref()
                .unwrap()
                .headers
                .iter()
                .map(|h| h.name.as_str())
                .collect::<Vec<_>>(),
            ["x-env", ":method"]
        );
        assert_eq!(
            action(api).cluster_specifier,
            Some(route_action::ClusterSpecifier::Cluster(
                "portway_sidecar_0".into()
            ))
        );
        let node_header = api
            .request_headers_to_add
            .iter()
            .find(|h| h.header.as_ref().unwrap().key == "datum-node-id")
            .unwrap();
        assert_eq!(node_header.header.as_ref().unwrap().value, "n1");
        assert_eq!(
            api.request_headers_to_add
                .iter()
                .filter(|h| h.header.as_ref().unwrap().key.starts_with("datum-"))
                .count(),
            4,
            "the routing headers once each; a user filter naming one is dropped"
        );
        assert_eq!(
            node_header.append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        let root = action(&app.routes[2]);
        assert_eq!(
            root.timeout,
            Some(PbDuration {
                seconds: 0,
                nanos: 0
            }),
            "streams are not cut off"
        );
        let Some(route_action::ClusterSpecifier::WeightedClusters(w)) = root.cluster_specifier
        else {
            panic!("two ready backends → weighted")
        };
        let ids: Vec<_> = w
            .clusters
            .iter()
            .map(|c| {
                c.request_headers_to_add[0]
                    .header
                    .as_ref()
                    .unwrap()
                    .value
                    .clone()
            })
            .collect();
        assert_eq!(ids, ["n1", "n2"]);
    }

    #[test]
    fn node_metadata_overrides_defaults_and_resources_decode() {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let mut meta = Struct::default();
        meta.fields.insert(
            "sidecar".into(),
            Value {
                kind: Some(Kind::StringValue("10.0.0.5:4001".into())),
            },
        );
        let n = Node {
            id: "e1".into(),
            metadata: Some(meta),
            ..Default::default()
        };
        let cfg = node_config(Some(&n), &node());
        assert_eq!(cfg.sidecar, "10.0.0.5:4001".parse().unwrap());
        assert_eq!(cfg.listen, node().listen);
        let l = resources(LISTENER_TYPE, &table(), &cfg);
        let decoded = Listener::decode(l[0].value.as_slice()).unwrap();
        assert_eq!(decoded.name, "portway_http");
        let yaml = bootstrap(
            "127.0.0.1:18000".parse().unwrap(),
            "e1",
            &cfg,
            "127.0.0.1:9901".parse().unwrap(),
        );
        assert!(yaml.contains("port_value: 18000") && yaml.contains("sidecar: \"10.0.0.5:4001\""));
    }

    #[test]
    fn condition_follows_the_connected_envoys() {
        let envoy = |rejected: &[(&str, &str)]| Envoy {
            streams: 1,
            rejected: rejected
                .iter()
                .map(|(t, m)| ((*t).to_owned(), (*m).to_owned()))
                .collect(),
        };
        let cases: [(Envoys, &str, &str, &[&str]); 3] = [
            (Envoys::new(), "Unknown", "NoEnvoy", &["no Envoy"]),
            (
                [("e1".into(), envoy(&[])), ("e2".into(), envoy(&[]))].into(),
                "True",
                "Accepted",
                &["\"e1\", \"e2\""],
            ),
            (
                [
                    ("e1".into(), envoy(&[])),
                    ("e2".into(), envoy(&[(CLUSTER_TYPE, "bad cluster")])),
                ]
                .into(),
                "False",
                "Rejected",
                &["\"e2\"", CLUSTER_TYPE, "bad cluster"],
            ),
        ];
        for (envoys, status, reason, words) in cases {
            let c = condition(&envoys, Some(3));
            assert_eq!(
                (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
                (CONDITION, status, reason)
            );
            assert_eq!(c.observed_generation, Some(3));
            for w in words {
                assert!(c.message.contains(w), "{:?} lacks {w:?}", c.message);
            }
        }
    }

    /// An ADS client speaking as Envoy does: NACKs are remembered per node and type until
    /// that type is ACKed, and forgotten when the stream ends.
    #[tokio::test]
    async fn nacks_are_tracked_per_node_and_type() {
        use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
        use envoy_types::pb::google::rpc::Status;
        use std::time::Duration;

        let table = Arc::new(ArcSwap::from_pointee(table()));
        let (_version_tx, version) = watch::channel(1u64);
        let shutdown = CancellationToken::new();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            table,
            version,
            node(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut envoys = server.envoys();
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.local_addr()))
                .await
                .unwrap();
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
        let mut responses = client
            .stream_aggregated_resources(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|r| (r, rx))
            }))
            .await
            .unwrap()
            .into_inner();
        let request = |type_url: &str, nonce: &str, error: Option<&str>| DiscoveryRequest {
            node: Some(Node {
                id: "envoy-a".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| Status {
                code: 3,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let wait =
            |envoys: &mut watch::Receiver<Envoys>, what: &'static str, f: fn(&Envoys) -> bool| {
                let mut envoys = envoys.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(10), envoys.wait_for(f))
                        .await
                        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
                        .unwrap()
                        .clone()
                }
            };

        let mut nonces = HashMap::new();
        for t in [CLUSTER_TYPE, LISTENER_TYPE] {
            tx.send(request(t, "", None)).await.unwrap();
            let resp = responses.message().await.unwrap().unwrap();
            assert_eq!(resp.type_url, t);
            assert!(!resp.resources.is_empty());
            nonces.insert(t, resp.nonce);
        }
        let e = wait(&mut envoys, "envoy-a is connected", |e| {
            e.contains_key("envoy-a")
        })
        .await;
        assert!(e["envoy-a"].rejected.is_empty());

        tx.send(request(
            CLUSTER_TYPE,
            &nonces[CLUSTER_TYPE],
            Some("bad cluster"),
        ))
        .await
        .unwrap();
        let e = wait(&mut envoys, "the NACK is recorded", |e| {
            e.get("envoy-a").is_some_and(|e| !e.rejected.is_empty())
        })
        .await;
        assert_eq!(e["envoy-a"].rejected[CLUSTER_TYPE], "bad cluster");

        // An ACK of another type leaves the cluster NACK standing. The stream is handled in
        // order, so the answer to a new subscription means the ACK before it was seen.
        tx.send(request(LISTENER_TYPE, &nonces[LISTENER_TYPE], None))
            .await
            .unwrap();
        tx.send(request(ROUTE_TYPE, "", None)).await.unwrap();
        let resp = responses.message().await.unwrap().unwrap();
        assert_eq!(resp.type_url, ROUTE_TYPE);
        assert_eq!(
            envoys.borrow()["envoy-a"].rejected[CLUSTER_TYPE],
            "bad cluster"
        );
        // A NACK answering a stale nonce is not about the current configuration.
        tx.send(request(LISTENER_TYPE, "999", Some("stale")))
            .await
            .unwrap();
        tx.send(request(CLUSTER_TYPE, &nonces[CLUSTER_TYPE], None))
            .await
            .unwrap();
        let e = wait(&mut envoys, "the ACK clears the NACK", |e| {
            e.get("envoy-a").is_some_and(|e| e.rejected.is_empty())
        })
        .await;
        assert_eq!(e["envoy-a"].streams, 1);

        tx.send(request(
            CLUSTER_TYPE,
            &nonces[CLUSTER_TYPE],
            Some("bad again"),
        ))
        .await
        .unwrap();
        wait(&mut envoys, "the second NACK is recorded", |e| {
            e.get("envoy-a").is_some_and(|e| !e.rejected.is_empty())
        })
        .await;
        drop(tx);
        drop(responses);
        wait(
            &mut envoys,
            "a closed stream is forgotten",
            Envoys::is_empty,
        )
        .await;
        shutdown.cancel();
        server.join().await;
    }
}
