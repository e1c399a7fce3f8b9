//! The operator: validates HTTPProxies against advertisements and programs Gateway API
//! objects; keeps connector readiness.
//!
//! Four controllers on `kube::runtime::Controller`, fed by one shared watch per kind:
//! - HTTPProxy → Gateway, HTTPRoute, Service + EndpointSlice per backend connector,
//!   BackendTrafficPolicy, and the proxy's status ([`proxy::desired`] decides everything);
//! - TCPProxy → a public port from the edge's range ([`tcp::ports`]), a Gateway with a TCP
//!   listener on it, a TCPRoute, Service + EndpointSlice per backend connector, and the
//!   proxy's status ([`tcp::desired`]);
//! - Connector → `Accepted` (its class exists) and `Ready` (its Lease is current),
//!   requeued at lease expiry;
//! - ConnectorAdvertisement → `Accepted` (its connector exists).
//!
//! It also makes sure the default `portway` ConnectorClass and GatewayClass exist.
//!
//! ```no_run
//! # async fn run(client: kube::Client) -> Result<(), Box<dyn std::error::Error>> {
//! let config = portway_operator::Config::new(vec!["127.0.0.1:4001".parse().unwrap()]);
//! let operator = portway_operator::Operator::start(config, client).await?;
//! operator.ready().await?; // caches synced, controllers running
//! operator.join().await;
//! # Ok(()) }
//! ```

pub mod access;
pub mod acme;
pub mod certs;
pub mod connector;
pub mod dns;
mod hostnames;
pub mod identity;
pub mod proxy;
pub mod tcp;
pub mod verify;

use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use portway_api::{
    AccessPolicy, BackendTrafficPolicy, CONTROLLER_NAME, Connector, ConnectorAdvertisement,
    ConnectorClass, HttpProxy, TcpProxy, managers,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::hostnames::HostnameIndex;
use crate::tcp::ports::PortIndex;
use portway_kube::watch::{Index, Subscriber, by_namespace, by_owner, pending, relisted, touched};

/// What the operator needs to know.
#[derive(Clone, Debug)]
pub struct Config {
    pub proxy: proxy::desired::Config,
    /// The ConnectorClass created by default (`portway`).
    pub connector_class: String,
    /// The ConnectorClass controller names served: connectors of a class naming one of
    /// them are this operator's (default: Portway's own and Datum's `datum-connect`).
    pub connector_controllers: Vec<String>,
    /// Reconciles in flight per controller (default 16).
    pub concurrency: u16,
    /// How long an ephemeral connector (`portway http`) outlives its lease before it is
    /// deleted with its proxies (default 15 min).
    pub ephemeral_ttl: Duration,
    /// The certificate issuer; `None`: no certificates, and no `CertificatesReady`.
    pub certificates: Option<certs::Config>,
    /// Proof of control for hostnames outside the zone; `None`: every name is routed as
    /// claimed, and no `HostnamesVerified`.
    pub verification: Option<verify::Config>,
    /// The public ports TCPProxies may have (default 20000-20999): a `spec.port` outside
    /// it is refused, and a proxy without one gets the lowest free port of it.
    pub tcp_ports: RangeInclusive<u16>,
}

impl Config {
    /// Defaults: zone `portway.localhost`, classes `portway`, controller
    /// `portway.dev/operator` (and Datum's for connector classes).
    pub fn new(sidecars: Vec<SocketAddr>) -> Self {
        Self {
            proxy: proxy::desired::Config {
                sidecars,
                zone: "portway.localhost".into(),
                gateway_class: portway_api::DEFAULT_CLASS.into(),
                controller_name: CONTROLLER_NAME.into(),
                allowed_origins: Vec::new(),
            },
            connector_class: portway_api::DEFAULT_CLASS.into(),
            connector_controllers: vec![
                CONTROLLER_NAME.into(),
                portway_api::DATUM_CONNECT_CONTROLLER.into(),
            ],
            concurrency: 16,
            ephemeral_ttl: Duration::from_secs(15 * 60),
            certificates: None,
            verification: None,
            tcp_ports: tcp::ports::DEFAULT_RANGE,
        }
    }
}

/// [`Operator::ready`]: the operator was shut down before its caches synced.
#[derive(Debug, thiserror::Error)]
#[error("the operator stopped before its caches synced")]
pub struct Stopped;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("API request failed")]
    Kube(#[from] kube::Error),
    #[error("encoding an object")]
    Json(#[from] serde_json::Error),
    #[error("writing status")]
    Status(#[from] portway_kube::StatusError),
}

impl Error {
    fn label(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Self::Kube(kube::Error::Api(_)) => "api",
            Self::Kube(_) => "transport",
            Self::Json(_) => "encoding",
            Self::Status(portway_kube::StatusError::Conflicts(_)) => "conflict",
            Self::Status(portway_kube::StatusError::Api(kube::Error::Api(_))) => "api",
            Self::Status(_) => "transport",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ErrorLabels {
    controller: &'static str,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct ControllerLabel {
    controller: &'static str,
}

/// Counters exported at `/metrics` by whoever embeds the operator.
#[derive(Clone, Default)]
pub struct Metrics {
    reconciles: Family<ControllerLabel, Counter>,
    errors: Family<ErrorLabels, Counter>,
    writes: Counter,
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("portway_operator");
        sub.register(
            "reconciles",
            "Reconciles run, by controller",
            self.reconciles.clone(),
        );
        sub.register(
            "reconcile_errors",
            "Reconciles that failed, by controller and error kind",
            self.errors.clone(),
        );
        sub.register(
            "writes",
            "Objects created, changed or deleted",
            self.writes.clone(),
        );
    }
}

pub(crate) struct Ctx {
    client: kube::Client,
    config: Config,
    /// By namespace.
    connectors: Index<Connector>,
    /// By namespace.
    advertisements: Index<ConnectorAdvertisement>,
    leases: Store<Lease>,
    classes: Store<ConnectorClass>,
    /// Children, by owner uid.
    routes: Index<HttpRoute>,
    gateways: Index<Gateway>,
    services: Index<Service>,
    slices: Index<EndpointSlice>,
    policies: Index<BackendTrafficPolicy>,
    /// HTTPProxies and AccessPolicies, by namespace (a policy names proxies of its own).
    proxies: Index<HttpProxy>,
    access: Index<AccessPolicy>,
    /// Secrets of type `portway.dev/htpasswd` (basic auth users) and `portway.dev/jwks`
    /// (JWT keys), and only those.
    htpasswd: Store<Secret>,
    jwks: Store<Secret>,
    oidc_clients: Store<Secret>,
    /// TCPRoutes, by owner uid (the Gateways, Services and slices above serve both kinds).
    tcp_routes: Index<TcpRoute>,
    /// TLSRoutes of passthrough TCPProxies, by owner uid.
    tls_routes: Index<TlsRoute>,
    /// UDPRoutes of TCPProxies with `udp://` backends, by owner uid.
    udp_routes: Index<UdpRoute>,
    hostnames: Arc<HostnameIndex>,
    /// Every TCPProxy's port.
    tcp_ports: Arc<PortIndex>,
    /// What the issuer keeps, when there is one.
    certificates: Option<Arc<certs::Certificates>>,
    /// Devices' requests for their passthrough names, and what was issued.
    device_certificates: Arc<tcp::certificate::DeviceCertificates>,
    verifier: Option<Arc<verify::Verifier>>,
    /// Reconciles a proxy again (another proxy's verdict changed its claims).
    requeue: Tx<HttpProxy>,
    /// Reconciles a TCPProxy again (a port it waits for was freed or contested).
    tcp_requeue: Tx<TcpProxy>,
    /// Wakes the certificate issuer: the set of proven names may have changed.
    certs_wake: Arc<tokio::sync::Notify>,
    metrics: Metrics,
    /// Condition changes and refusals, for `kubectl describe` and `get events -w`.
    events: portway_kube::Events,
}

/// A running operator.
pub struct Operator {
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    metrics: Metrics,
    /// Set once every watch has listed and the controllers start.
    synced: watch::Receiver<bool>,
}

type Tx<K> = mpsc::UnboundedSender<ObjectRef<K>>;

fn object_ref<K: Resource<DynamicType = ()>>(o: &K) -> ObjectRef<K> {
    ObjectRef::from_obj(o)
}

/// Sends refs for every object in `by_ns` within `ns` (all namespaces with `None`) that
/// `pick` accepts.
fn send_matching<K: Resource<DynamicType = ()> + Clone + Send + Sync>(
    tx: &Tx<K>,
    by_ns: &Index<K>,
    ns: Option<&str>,
    pick: impl Fn(&K) -> bool,
) {
    let objects = match ns {
        Some(ns) => by_ns.get(ns),
        None => by_ns.store().state(),
    };
    for o in objects {
        if pick(&o) {
            let _ = tx.send(object_ref(o.as_ref()));
        }
    }
}

/// Every hostname outside the zone that a proxy holds and has proven: each gets a
/// certificate of its own.
fn proven_hostnames(
    proxies: &Index<HttpProxy>,
    verifier: Option<&verify::Verifier>,
) -> Vec<String> {
    let Some(v) = verifier else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in proxies.store().state() {
        let ns = p.metadata.namespace.as_deref().unwrap_or_default();
        for h in &p.spec.hostnames {
            if matches!(v.state(ns, h, None), verify::Verification::Verified(_)) {
                out.push(h.to_ascii_lowercase());
            }
        }
    }
    out
}

/// Sends refs for each (namespace, name).
/// Requeues the proxies of either kind whose hostname claims may have changed.
fn send_claimants(
    http: &Tx<HttpProxy>,
    tcp: &Tx<TcpProxy>,
    keys: impl IntoIterator<Item = hostnames::Key>,
) {
    for (kind, ns, name) in keys {
        if kind == TcpProxy::kind(&()) {
            let _ = tcp.send(ObjectRef::new(&name).within(&ns));
        } else {
            let _ = http.send(ObjectRef::new(&name).within(&ns));
        }
    }
}

fn send_keys<K: Resource<DynamicType = ()>>(
    tx: &Tx<K>,
    keys: impl IntoIterator<Item = (String, String)>,
) {
    for (ns, name) in keys {
        let _ = tx.send(ObjectRef::new(&name).within(&ns));
    }
}

/// Maps a child object to its owner of kind `O` (an HTTPProxy or a TCPProxy).
fn owner_subscriber<K, O>(tx: Tx<O>) -> Subscriber<K>
where
    K: Resource + Send + Sync + 'static,
    O: Resource<DynamicType = ()> + 'static,
{
    let kind = O::kind(&()).into_owned();
    Box::new(move |e| {
        if let Some(o) = touched(e) {
            let ns = o.meta().namespace.clone().unwrap_or_default();
            for r in o
                .meta()
                .owner_references
                .iter()
                .flatten()
                .filter(|r| r.kind == kind)
            {
                let _ = tx.send(ObjectRef::new(&r.name).within(&ns));
            }
        }
    })
}

async fn ensure_classes(client: &kube::Client, config: &Config) -> Result<(), Error> {
    let pp = PostParams {
        field_manager: Some(managers::OPERATOR.into()),
        ..Default::default()
    };
    let classes: Api<ConnectorClass> = Api::all(client.clone());
    if classes.get_opt(&config.connector_class).await?.is_none() {
        let cls = serde_json::from_value(json!({
            "metadata": {"name": config.connector_class},
            "spec": {"controllerName": config.proxy.controller_name},
        }))?;
        match classes.create(&pp, &cls).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let gateway_classes: Api<GatewayClass> = Api::all(client.clone());
    let name = &config.proxy.gateway_class;
    if gateway_classes.get_opt(name).await?.is_none() {
        let gc = serde_json::from_value(
            json!({"metadata": {"name": name}, "spec": {"controllerName": config.proxy.controller_name}}),
        )?;
        match gateway_classes.create(&pp, &gc).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let accepted = portway_api::condition(
        "Accepted",
        true,
        "Accepted",
        format!("handled by {}", config.proxy.controller_name),
        None,
    );
    portway_kube::patch_conditions(
        &gateway_classes,
        None,
        name,
        managers::OPERATOR,
        &[accepted],
        None,
    )
    .await?;
    Ok(())
}

impl Operator {
    /// Ensures the default classes and starts one watch per kind; the controllers start in
    /// the background once each watch has listed ([`Operator::ready`] resolves then).
    ///
    /// # Errors
    /// When the default classes cannot be read or created.
    pub async fn start(config: Config, client: kube::Client) -> Result<Self, Error> {
        Self::start_until(config, client, CancellationToken::new()).await
    }

    /// [`Operator::start`], running until `shutdown` is cancelled (or
    /// [`Operator::shutdown`] is called).
    ///
    /// # Errors
    /// As [`Operator::start`].
    pub async fn start_until(
        config: Config,
        client: kube::Client,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        ensure_classes(&client, &config).await?;
        let metrics = Metrics::default();

        let proxies = pending::<HttpProxy>();
        let connectors = pending::<Connector>();
        let ads = pending::<ConnectorAdvertisement>();
        let leases = pending::<Lease>();
        let classes = pending::<ConnectorClass>();
        let routes = pending::<HttpRoute>();
        let gateways = pending::<Gateway>();
        let services = pending::<Service>();
        let slices = pending::<EndpointSlice>();
        let policies = pending::<BackendTrafficPolicy>();
        let tcp_proxies = pending::<TcpProxy>();
        let tcp_routes = pending::<TcpRoute>();
        let tls_routes = pending::<TlsRoute>();
        let udp_routes = pending::<UdpRoute>();
        let access = pending::<AccessPolicy>();
        let htpasswd = pending::<Secret>();
        let jwks = pending::<Secret>();
        let oidc_clients = pending::<Secret>();
        let verifier = config
            .verification
            .clone()
            .map(|v| Arc::new(verify::Verifier::new(v, &config.proxy.zone)));
        let hostnames = Arc::new(HostnameIndex::new(&config.proxy.zone, verifier.clone()));
        let certs_wake = Arc::new(tokio::sync::Notify::new());
        let proxies_by_ns = Index::new(proxies.store.clone(), by_namespace);
        let conns_by_ns = Index::new(connectors.store.clone(), by_namespace);
        let ads_by_ns = Index::new(ads.store.clone(), by_namespace);
        let routes_by_owner = Index::new(routes.store.clone(), by_owner);
        let gateways_by_owner = Index::new(gateways.store.clone(), by_owner);
        let services_by_owner = Index::new(services.store.clone(), by_owner);
        let slices_by_owner = Index::new(slices.store.clone(), by_owner);
        let policies_by_owner = Index::new(policies.store.clone(), by_owner);
        let tcp_by_ns = Index::new(tcp_proxies.store.clone(), by_namespace);
        let tcp_routes_by_owner = Index::new(tcp_routes.store.clone(), by_owner);
        let tls_routes_by_owner = Index::new(tls_routes.store.clone(), by_owner);
        let udp_routes_by_owner = Index::new(udp_routes.store.clone(), by_owner);
        let tcp_ports = Arc::new(PortIndex::new(config.tcp_ports.clone()));
        let access_by_ns = Index::new(access.store.clone(), by_namespace);

        let (proxy_tx, proxy_rx) = mpsc::unbounded_channel::<ObjectRef<HttpProxy>>();
        let (conn_tx, conn_rx) = mpsc::unbounded_channel::<ObjectRef<Connector>>();
        let (ad_tx, ad_rx) = mpsc::unbounded_channel::<ObjectRef<ConnectorAdvertisement>>();
        let (tcp_tx, tcp_rx) = mpsc::unbounded_channel::<ObjectRef<TcpProxy>>();
        let (access_tx, access_rx) = mpsc::unbounded_channel::<ObjectRef<AccessPolicy>>();
        // Set once the port index holds every granted port: no TCPProxy is given a port
        // before (restart-safe, as `status.port` is what survives a restart).
        let (ports_known_tx, mut ports_known) = watch::channel(false);

        let mut tasks = Vec::new();
        let access_subs: Vec<Subscriber<AccessPolicy>> = vec![access_by_ns.subscriber(), {
            let (ptx, pstore) = (proxy_tx.clone(), proxies_by_ns.clone());
            let (atx, astore) = (access_tx.clone(), access_by_ns.clone());
            // Which policy guards a proxy depends on every policy of its namespace.
            Box::new(move |e| {
                if let Some(p) = touched(e) {
                    let ns = p.namespace();
                    send_matching(&ptx, &pstore, ns.as_deref(), |_| true);
                    send_matching(&atx, &astore, ns.as_deref(), |_| true);
                } else if relisted(e) {
                    send_matching(&ptx, &pstore, None, |_| true);
                    send_matching(&atx, &astore, None, |_| true);
                }
            })
        }];
        let proxy_subs: Vec<Subscriber<HttpProxy>> = vec![
            proxies_by_ns.subscriber(),
            {
                let (atx, astore) = (access_tx.clone(), access_by_ns.clone());
                Box::new(move |e| {
                    if let Some(p) = touched(e) {
                        send_matching(&atx, &astore, p.namespace().as_deref(), |_| true);
                    } else if relisted(e) {
                        send_matching(&atx, &astore, None, |_| true);
                    }
                })
            },
            {
                let (tx, by_ns, index) =
                    (proxy_tx.clone(), proxies_by_ns.clone(), hostnames.clone());
                let ttx = tcp_tx.clone();
                let wake = certs_wake.clone();
                Box::new(move |e| match e {
                    watcher::Event::Apply(p) => {
                        let _ = tx.send(object_ref(p));
                        send_claimants(&tx, &ttx, index.upsert(p));
                    }
                    watcher::Event::Delete(p) => {
                        wake.notify_one();
                        send_claimants(&tx, &ttx, index.remove(p));
                    }
                    watcher::Event::InitDone => {
                        let all = by_ns.store().state();
                        index.rebuild(all.iter().map(AsRef::as_ref));
                        send_matching(&tx, &by_ns, None, |_| true);
                    }
                    _ => {}
                })
            },
        ];
        let tcp_subs: Vec<Subscriber<TcpProxy>> = vec![tcp_by_ns.subscriber(), {
            let (tx, by_ns, ports) = (tcp_tx.clone(), tcp_by_ns.clone(), tcp_ports.clone());
            let (ptx, index) = (proxy_tx.clone(), hostnames.clone());
            Box::new(move |e| match e {
                // Indexed before it is reconciled: `assign` records only proxies it knows.
                watcher::Event::Apply(p) => {
                    send_keys(&tx, ports.observe(p));
                    send_claimants(&ptx, &tx, index.upsert(p));
                    let _ = tx.send(object_ref(p));
                }
                watcher::Event::Delete(p) => {
                    send_keys(&tx, ports.forget(p));
                    send_claimants(&ptx, &tx, index.remove(p));
                }
                watcher::Event::InitDone => {
                    let all = by_ns.store().state();
                    ports.rebuild(all.iter().map(AsRef::as_ref));
                    // Before the controllers start (they wait for `ports_known`), so no
                    // HTTPProxy is given a name a passthrough proxy holds.
                    index.rebuild(all.iter().map(AsRef::as_ref));
                    ports_known_tx.send_replace(true);
                    send_matching(&tx, &by_ns, None, |_| true);
                }
                _ => {}
            })
        }];
        let conn_subs: Vec<Subscriber<Connector>> = vec![conns_by_ns.subscriber(), {
            let (ptx, ctx_, atx) = (proxy_tx.clone(), conn_tx.clone(), ad_tx.clone());
            let (pstore, astore, cstore) = (
                proxies_by_ns.clone(),
                ads_by_ns.clone(),
                conns_by_ns.clone(),
            );
            let (ttx, tstore) = (tcp_tx.clone(), tcp_by_ns.clone());
            Box::new(move |e| {
                if let Some(c) = touched(e) {
                    let ns = c.namespace();
                    send_matching(&ptx, &pstore, ns.as_deref(), |_| true);
                    send_matching(&ttx, &tstore, ns.as_deref(), |_| true);
                    send_matching(&atx, &astore, ns.as_deref(), |a| {
                        a.spec.connector_ref.name == c.name_any()
                    });
                    if matches!(e, watcher::Event::Apply(_)) {
                        let _ = ctx_.send(object_ref(c));
                    }
                } else if relisted(e) {
                    send_matching(&ctx_, &cstore, None, |_| true);
                    send_matching(&ptx, &pstore, None, |_| true);
                    send_matching(&ttx, &tstore, None, |_| true);
                    send_matching(&atx, &astore, None, |_| true);
                }
            })
        }];
        let ad_subs: Vec<Subscriber<ConnectorAdvertisement>> = vec![ads_by_ns.subscriber(), {
            let (ptx, atx, pstore, astore) = (
                proxy_tx.clone(),
                ad_tx.clone(),
                proxies_by_ns.clone(),
                ads_by_ns.clone(),
            );
            let (ttx, tstore) = (tcp_tx.clone(), tcp_by_ns.clone());
            Box::new(move |e| {
                if let Some(a) = touched(e) {
                    send_matching(&ptx, &pstore, a.namespace().as_deref(), |_| true);
                    send_matching(&ttx, &tstore, a.namespace().as_deref(), |_| true);
                    if matches!(e, watcher::Event::Apply(_)) {
                        let _ = atx.send(object_ref(a));
                    }
                } else if relisted(e) {
                    send_matching(&atx, &astore, None, |_| true);
                    send_matching(&ptx, &pstore, None, |_| true);
                    send_matching(&ttx, &tstore, None, |_| true);
                }
            })
        }];
        let lease_subs: Vec<Subscriber<Lease>> = vec![{
            let (tx, cstore) = (conn_tx.clone(), conns_by_ns.clone());
            Box::new(move |e| {
                if let Some(l) = touched(e) {
                    let _ = tx.send(
                        ObjectRef::new(&l.name_any()).within(&l.namespace().unwrap_or_default()),
                    );
                } else if relisted(e) {
                    send_matching(&tx, &cstore, None, |_| true);
                }
            })
        }];
        let class_subs: Vec<Subscriber<ConnectorClass>> = vec![{
            let (tx, cstore) = (conn_tx.clone(), conns_by_ns.clone());
            Box::new(move |e| {
                if let Some(cls) = touched(e) {
                    send_matching(&tx, &cstore, None, |c| {
                        c.spec.connector_class_name == cls.name_any()
                    });
                } else if relisted(e) {
                    send_matching(&tx, &cstore, None, |_| true);
                }
            })
        }];

        let ctx = Arc::new(Ctx {
            events: portway_kube::Events::new(client.clone(), "portway-operator", None),
            client: client.clone(),
            config: config.clone(),
            connectors: conns_by_ns,
            advertisements: ads_by_ns,
            leases: leases.store.clone(),
            classes: classes.store.clone(),
            routes: routes_by_owner.clone(),
            gateways: gateways_by_owner.clone(),
            services: services_by_owner.clone(),
            slices: slices_by_owner.clone(),
            policies: policies_by_owner.clone(),
            proxies: proxies_by_ns.clone(),
            access: access_by_ns.clone(),
            htpasswd: htpasswd.store.clone(),
            jwks: jwks.store.clone(),
            oidc_clients: oidc_clients.store.clone(),
            tcp_routes: tcp_routes_by_owner.clone(),
            tls_routes: tls_routes_by_owner.clone(),
            udp_routes: udp_routes_by_owner.clone(),
            hostnames,
            tcp_ports,
            verifier,
            requeue: proxy_tx.clone(),
            tcp_requeue: tcp_tx.clone(),
            certs_wake: certs_wake.clone(),
            device_certificates: Arc::default(),
            certificates: config
                .certificates
                .as_ref()
                .map(|_| Arc::new(certs::Certificates::default())),
            metrics: metrics.clone(),
        });
        let stores_ready = {
            let (a, b, c, d, e) = (
                proxies.store.clone(),
                connectors.store.clone(),
                ads.store.clone(),
                leases.store.clone(),
                classes.store.clone(),
            );
            let (f, g, h, i, j) = (
                routes.store.clone(),
                gateways.store.clone(),
                services.store.clone(),
                slices.store.clone(),
                policies.store.clone(),
            );
            let (k, l, m, n, o, p, q, r) = (
                tcp_proxies.store.clone(),
                tcp_routes.store.clone(),
                tls_routes.store.clone(),
                udp_routes.store.clone(),
                access.store.clone(),
                htpasswd.store.clone(),
                jwks.store.clone(),
                oidc_clients.store.clone(),
            );
            async move {
                let _ = futures::join!(
                    a.wait_until_ready(),
                    b.wait_until_ready(),
                    c.wait_until_ready(),
                    d.wait_until_ready(),
                    e.wait_until_ready(),
                    f.wait_until_ready(),
                    g.wait_until_ready(),
                    h.wait_until_ready(),
                    i.wait_until_ready(),
                    j.wait_until_ready(),
                    k.wait_until_ready(),
                    l.wait_until_ready(),
                    m.wait_until_ready(),
                    n.wait_until_ready(),
                    o.wait_until_ready(),
                    p.wait_until_ready(),
                    q.wait_until_ready(),
                    r.wait_until_ready(),
                    async move {
                        let _ = ports_known.wait_for(|known| *known).await;
                    },
                );
            }
        };
        let proxy_store = proxies.store.clone();
        let conn_store = connectors.store.clone();
        let ad_store = ads.store.clone();
        let tcp_store = tcp_proxies.store.clone();
        let access_store = access.store.clone();
        let (tcp_store_for_certs, tcp_tx_for_certs) = (tcp_store.clone(), tcp_tx.clone());
        let s = &shutdown;
        tasks.push(proxies.spawn(Api::all(client.clone()), proxy_subs, s.clone()));
        tasks.push(connectors.spawn(Api::all(client.clone()), conn_subs, s.clone()));
        tasks.push(ads.spawn(Api::all(client.clone()), ad_subs, s.clone()));
        tasks.push(leases.spawn(Api::all(client.clone()), lease_subs, s.clone()));
        tasks.push(classes.spawn(Api::all(client.clone()), class_subs, s.clone()));
        tasks.push(tcp_proxies.spawn(Api::all(client.clone()), tcp_subs, s.clone()));
        tasks.push(access.spawn(Api::all(client.clone()), access_subs, s.clone()));
        // A policy's ResolvedRefs follows its Secrets.
        let secret_subs = || -> Vec<Subscriber<Secret>> {
            let (atx, astore) = (access_tx.clone(), access_by_ns.clone());
            vec![Box::new(move |e| {
                if let Some(secret) = touched(e) {
                    send_matching(&atx, &astore, secret.namespace().as_deref(), |_| true);
                } else if relisted(e) {
                    send_matching(&atx, &astore, None, |_| true);
                }
            })]
        };
        for (store, kind) in [
            (htpasswd, portway_api::access::HTPASSWD_TYPE),
            (jwks, portway_api::access::JWKS_TYPE),
            (oidc_clients, portway_api::access::OIDC_CLIENT_TYPE),
        ] {
            tasks.push(store.spawn_with(
                Api::all(client.clone()),
                watcher::Config::default().fields(&format!("type={kind}")),
                secret_subs(),
                s.clone(),
            ));
        }
        tasks.push(routes.spawn(
            Api::all(client.clone()),
            vec![
                routes_by_owner.subscriber(),
                owner_subscriber(proxy_tx.clone()),
            ],
            s.clone(),
        ));
        tasks.push(tcp_routes.spawn(
            Api::all(client.clone()),
            vec![
                tcp_routes_by_owner.subscriber(),
                owner_subscriber(tcp_tx.clone()),
            ],
            s.clone(),
        ));
        tasks.push(tls_routes.spawn(
            Api::all(client.clone()),
            vec![
                tls_routes_by_owner.subscriber(),
                owner_subscriber(tcp_tx.clone()),
            ],
            s.clone(),
        ));
        tasks.push(udp_routes.spawn(
            Api::all(client.clone()),
            vec![
                udp_routes_by_owner.subscriber(),
                owner_subscriber(tcp_tx.clone()),
            ],
            s.clone(),
        ));
        // Gateways, Services and slices are generated for both proxy kinds.
        tasks.push(gateways.spawn(
            Api::all(client.clone()),
            vec![
                gateways_by_owner.subscriber(),
                owner_subscriber(proxy_tx.clone()),
                owner_subscriber(tcp_tx.clone()),
            ],
            s.clone(),
        ));
        tasks.push(services.spawn(
            Api::all(client.clone()),
            vec![
                services_by_owner.subscriber(),
                owner_subscriber(proxy_tx.clone()),
                owner_subscriber(tcp_tx.clone()),
            ],
            s.clone(),
        ));
        tasks.push(slices.spawn(
            Api::all(client.clone()),
            vec![
                slices_by_owner.subscriber(),
                owner_subscriber(proxy_tx.clone()),
                owner_subscriber(tcp_tx),
            ],
            s.clone(),
        ));
        if let (Some(cert_config), Some(certificates)) =
            (config.certificates.clone(), ctx.certificates.clone())
        {
            certs::ensure_namespace(&client).await?;
            let (tx, by_ns) = (proxy_tx.clone(), proxies_by_ns.clone());
            let run = certs::Run {
                client: client.clone(),
                config: cert_config,
                zone: config.proxy.zone.clone(),
                certificates,
                events: ctx.events.clone(),
                changed: Box::new(move || send_matching(&tx, &by_ns, None, |_| true)),
                wanted: {
                    let (by_ns, verifier) = (proxies_by_ns.clone(), ctx.verifier.clone());
                    Box::new(move || proven_hostnames(&by_ns, verifier.as_deref()))
                },
                wake: certs_wake.clone(),
            };
            let devices = tcp::certificate::Run {
                certificates: ctx.device_certificates.clone(),
                issuer: run.config.issuer.clone(),
                zone: config.proxy.zone.clone(),
                validity: run.config.validity,
                retry: tcp::certificate::Retry {
                    first: run.config.retry,
                    max: run.config.max_retry,
                    renew_before: run.config.renew_before,
                },
                proxies: tcp_store_for_certs,
                requeue: tcp_tx_for_certs,
                events: ctx.events.clone(),
            };
            tasks.push(tokio::spawn(certs::run(run, shutdown.clone())));
            tasks.push(tokio::spawn(tcp::certificate::run(
                devices,
                shutdown.clone(),
            )));
        }
        tasks.push(policies.spawn(
            Api::all(client.clone()),
            vec![policies_by_owner.subscriber(), owner_subscriber(proxy_tx)],
            s.clone(),
        ));

        let cfg = kube::runtime::controller::Config::default().concurrency(config.concurrency);
        let stop = {
            let s = shutdown.clone();
            move || {
                let s = s.clone();
                async move { s.cancelled().await }
            }
        };
        let proxy_controller = Controller::for_stream(futures::stream::pending(), proxy_store)
            .with_config(cfg.clone())
            .reconcile_on(UnboundedReceiverStream::new(proxy_rx))
            .graceful_shutdown_on(stop())
            .run(
                counted("httpproxy", proxy::reconcile::reconcile),
                error_policy("httpproxy"),
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        let connector_controller = Controller::for_stream(futures::stream::pending(), conn_store)
            .with_config(cfg.clone())
            .reconcile_on(UnboundedReceiverStream::new(conn_rx))
            .graceful_shutdown_on(stop())
            .run(
                counted("connector", connector::reconcile_connector),
                error_policy("connector"),
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        let tcp_controller = Controller::for_stream(futures::stream::pending(), tcp_store)
            .with_config(cfg.clone())
            .reconcile_on(UnboundedReceiverStream::new(tcp_rx))
            .graceful_shutdown_on(stop())
            .run(
                counted("tcpproxy", tcp::reconcile::reconcile),
                error_policy("tcpproxy"),
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        let access_controller = Controller::for_stream(futures::stream::pending(), access_store)
            .with_config(cfg.clone())
            .reconcile_on(UnboundedReceiverStream::new(access_rx))
            .graceful_shutdown_on(stop())
            .run(
                counted("accesspolicy", access::reconcile),
                error_policy("accesspolicy"),
                ctx.clone(),
            )
            .for_each(|_| futures::future::ready(()));
        let ad_controller = Controller::for_stream(futures::stream::pending(), ad_store)
            .with_config(cfg)
            .reconcile_on(UnboundedReceiverStream::new(ad_rx))
            .graceful_shutdown_on(stop())
            .run(
                counted("advertisement", connector::reconcile_advertisement),
                error_policy("advertisement"),
                ctx,
            )
            .for_each(|_| futures::future::ready(()));
        tasks.push(tokio::spawn(identity::ensure_key(
            client.clone(),
            shutdown.clone(),
        )));
        let shutdown_wait = shutdown.clone();
        let (synced_tx, synced) = watch::channel(false);
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                () = stores_ready => {}
                () = shutdown_wait.cancelled() => return,
            }
            tracing::info!("operator caches synced; reconciling");
            synced_tx.send_replace(true);
            futures::join!(
                proxy_controller,
                tcp_controller,
                connector_controller,
                ad_controller,
                access_controller
            );
        }));
        Ok(Self {
            shutdown,
            tasks,
            metrics,
            synced,
        })
    }

    /// Resolves once every watch has listed once and the controllers run: from then on the
    /// operator acts on complete caches (what a ready file should promise).
    ///
    /// # Errors
    /// [`Stopped`] when the operator was shut down before that.
    pub async fn ready(&self) -> Result<(), Stopped> {
        let mut synced = self.synced.clone();
        synced
            .wait_for(|s| *s)
            .await
            .map(|_| ())
            .map_err(|_| Stopped)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Wraps a reconcile function to count its runs.
fn counted<K, F, Fut>(
    controller: &'static str,
    f: F,
) -> impl Fn(Arc<K>, Arc<Ctx>) -> futures::future::BoxFuture<'static, Result<Action, Error>>
where
    K: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + Copy + 'static,
    Fut: std::future::Future<Output = Result<Action, Error>> + Send + 'static,
{
    move |obj, ctx| {
        ctx.metrics
            .reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
        Box::pin(f(obj, ctx))
    }
}

/// Backs off and counts the error by controller and kind. Conflicts (someone wrote the
/// object meanwhile) retry at once: the next read sees the new version.
fn error_policy<K>(controller: &'static str) -> impl Fn(Arc<K>, &Error, Arc<Ctx>) -> Action
where
    K: Resource,
{
    move |obj, err, ctx| {
        ctx.metrics
            .errors
            .get_or_create(&ErrorLabels {
                controller,
                error: err.label(),
            })
            .inc();
        let name = obj.meta().name.clone().unwrap_or_default();
        tracing::warn!(controller, object = %name, error = %err, cause = ?std::error::Error::source(err), "reconcile failed");
        match err.label() {
            "conflict" => Action::requeue(Duration::from_millis(50)),
            _ => Action::requeue(Duration::from_secs(2)),
        }
    }
}
