//! The agent at runtime: the tunnel server (always up), and a control loop that
//! registers, heartbeats and writes tunnel objects, restarting with capped backoff
//! whenever the API is unreachable.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures::StreamExt;
use iroh::protocol::Router;
use iroh::{Endpoint, EndpointAddr, RelayUrl, Watcher};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use portway_api::{
    Connector, ConnectorAdvertisement, ConnectorClass, ConnectorSpec, HttpProxy, TUNNEL_ALPN,
    labels, managers,
};
use portway_discovery::endpoint;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::certificate;
use crate::inspect::{Inspector, Traffic};
use crate::objects;
use crate::policy::{Gatekeeper, Offer, Policy};
use crate::server::{Counters, GatewayPath, Server};
use crate::tunnel::Tunnel;

/// Annotation listing the label keys the agent set, so it can remove ones dropped from
/// its configuration without touching labels others set.
const MANAGED_LABELS: &str = "portway.dev/agent-labels";

#[derive(Clone, Debug)]
pub struct Config {
    /// The project (namespace) the connector lives in.
    pub project: String,
    /// Connector name; default: this machine's hostname.
    pub name: String,
    /// Default `portway`.
    pub connector_class: String,
    /// Holds `key` (the iroh identity, mode 0600) and `policy.json` (the last known
    /// allow-lists, so tunnels serve through API outages and restarts).
    pub state_dir: PathBuf,
    /// The user's labels, added to the device labels.
    pub labels: BTreeMap<String, String>,
    pub tunnels: Vec<Tunnel>,
    pub relays: Vec<RelayUrl>,
    /// Also use n0's public relays and discovery.
    pub n0: bool,
    /// Local UDP address for direct paths; default all interfaces, random port.
    pub bind_addr: Option<SocketAddr>,
    /// Reach gateways only through the relay, never on a direct UDP path (for networks
    /// that drop UDP, and to measure or debug the relay path).
    pub relay_only: bool,
    /// Default 30 s; renewed at half of it.
    pub lease_duration: Duration,
    /// Record http tunnels' exchanges for the local inspector.
    pub inspect: bool,
}

impl Config {
    pub fn new(project: impl Into<String>, state_dir: PathBuf) -> Self {
        Self {
            project: project.into(),
            name: default_name(),
            connector_class: portway_api::DEFAULT_CLASS.into(),
            state_dir,
            labels: BTreeMap::new(),
            tunnels: Vec::new(),
            relays: Vec::new(),
            n0: false,
            bind_addr: None,
            relay_only: false,
            lease_duration: Duration::from_secs(30),
            inspect: false,
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// This machine's hostname as a DNS label, or `device`.
pub fn default_name() -> String {
    let cleaned: String = hostname()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let cleaned = cleaned
        .split('.')
        .next()
        .unwrap_or_default()
        .trim_matches('-')
        .chars()
        .take(63)
        .collect::<String>();
    let cleaned = cleaned.trim_matches('-').to_owned();
    if cleaned.is_empty() {
        "device".into()
    } else {
        cleaned
    }
}

/// The labels describing this device.
pub fn device_labels() -> BTreeMap<String, String> {
    let host: String = hostname()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    let host = host
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned();
    BTreeMap::from([
        (labels::HOSTNAME.to_owned(), host),
        (labels::OS.to_owned(), std::env::consts::OS.to_owned()),
        (
            labels::AGENT_VERSION.to_owned(),
            env!("CARGO_PKG_VERSION").to_owned(),
        ),
    ])
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the agent key")]
    Key(#[from] endpoint::KeyError),
    #[error("starting the iroh endpoint")]
    Bind(#[from] endpoint::BindError),
    #[error("API request failed")]
    Kube(#[from] kube::Error),
    #[error("building the lease object")]
    Lease(#[from] serde_json::Error),
    #[error(
        "connector {project}/{name} belongs to another device (endpoint {other}) whose lease is current; \
         choose another name with --name"
    )]
    NameTaken {
        project: String,
        name: String,
        other: String,
    },
}

/// The connector the agent registered as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub project: String,
    pub connector: String,
    /// The connector's uid: `kubectl describe` finds events by it.
    pub uid: Option<String>,
}

/// Counters for status displays.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub requests: u64,
    pub active: u64,
    pub denied: u64,
}

struct Shared {
    config: Config,
    client: kube::Client,
    endpoint: Endpoint,
    tunnels: watch::Receiver<Vec<Tunnel>>,
    policy: watch::Sender<Arc<Policy>>,
    registered: watch::Sender<Option<Registration>>,
    /// Session state as a word ("registering", "online", "reconnecting… (why)").
    state: watch::Sender<String>,
    shutdown: CancellationToken,
    /// Its Connector's life (connected, back after a failure, stopped), for `kubectl
    /// describe connector` and `get events -w`.
    events: portway_kube::Events,
    /// Each tls tunnel's certificate request (with a `cert_dir`), by tunnel name.
    requests: watch::Sender<BTreeMap<String, String>>,
}

/// A running agent.
pub struct Agent {
    shared: Arc<Shared>,
    router: Router,
    counters: Arc<Counters>,
    denied: Arc<AtomicU64>,
    control: JoinHandle<()>,
    handle: Handle,
}

/// What the local UI reads and changes of a running agent.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    tunnels: watch::Sender<Vec<Tunnel>>,
    server: Server,
    traffic: Arc<Traffic>,
    inspector: Option<Arc<Inspector>>,
}

impl Handle {
    pub fn project(&self) -> &str {
        &self.shared.config.project
    }

    pub fn node_id(&self) -> iroh::EndpointId {
        self.shared.endpoint.id()
    }

    /// A short word on the control loop's state ("online", "reconnecting… (why)").
    pub fn state(&self) -> String {
        self.shared.state.borrow().clone()
    }

    pub fn registered(&self) -> Option<Registration> {
        self.shared.registered.borrow().clone()
    }

    /// The agent's own API client (its device credential).
    pub fn client(&self) -> kube::Client {
        self.shared.client.clone()
    }

    /// The tunnels in effect.
    pub fn tunnels(&self) -> Vec<Tunnel> {
        self.tunnels.borrow().clone()
    }

    /// Replaces the tunnels; the control loop writes (and prunes) their objects.
    pub fn set_tunnels(&self, tunnels: Vec<Tunnel>) {
        self.tunnels.send_replace(tunnels);
    }

    pub fn traffic(&self) -> &Arc<Traffic> {
        &self.traffic
    }

    /// Present when the agent was started with `inspect`.
    pub fn inspector(&self) -> Option<&Arc<Inspector>> {
        self.inspector.as_ref()
    }

    /// The path each gateway's connection to this device takes now.
    pub fn paths(&self) -> Vec<GatewayPath> {
        self.server.paths()
    }
}

impl Agent {
    /// Loads the key, binds the endpoint, starts serving tunnels (with the cached policy)
    /// and starts the control loop. Returns once the endpoint is bound.
    ///
    /// # Errors
    /// When the key cannot be loaded (a corrupt key is never replaced) or the endpoint
    /// cannot be bound.
    pub async fn start(config: Config, client: kube::Client) -> Result<Self, Error> {
        let (key, created) = endpoint::load_or_create_key(&config.state_dir.join("key"))?;
        if created {
            tracing::info!(node_id = %key.public(), "created a new agent key");
        }
        let mut cached = load_policy(&config);
        cached.targets = targets(&config.tunnels);
        let (policy_tx, policy_rx) = watch::channel(Arc::new(cached));
        let ep = endpoint::bind(&endpoint::Config {
            secret_key: Some(key),
            relays: config.relays.clone(),
            dns: None,
            n0: config.n0,
            alpns: vec![TUNNEL_ALPN.to_vec()],
            bind_addr: config.bind_addr,
            relay_only: config.relay_only,
            max_streams: Some(16_384),
            idle_timeout: None,
            keep_alive: None,
        })
        .await?;
        let denied = Arc::new(AtomicU64::new(0));
        let (refusals_tx, refusals) = tokio::sync::mpsc::channel(64);
        let traffic = Arc::new(Traffic::default());
        let inspector = config.inspect.then(|| Arc::new(Inspector::default()));
        let server = Server::new(
            Gatekeeper {
                policy: policy_rx,
                denied: denied.clone(),
                refusals: Some(refusals_tx),
            },
            config.name.clone(),
            traffic.clone(),
            inspector.clone(),
        );
        let counters = server.counters();
        let router = Router::builder(ep.clone())
            .accept(TUNNEL_ALPN, server.clone())
            .spawn();
        let (tunnels_tx, tunnels_rx) = watch::channel(config.tunnels.clone());
        // A request made by an earlier run is asked again, not replaced by a new one.
        let stored: BTreeMap<String, String> = config
            .tunnels
            .iter()
            .filter_map(|t| {
                Some((
                    t.name.clone(),
                    certificate::stored_request(t.cert_dir.as_ref()?)?,
                ))
            })
            .collect();
        let events = portway_kube::Events::new(
            client.clone(),
            "portway-agent",
            Some(ep.id().fmt_short().to_string()),
        );
        let shared = Arc::new(Shared {
            events,
            config,
            client,
            endpoint: ep,
            tunnels: tunnels_rx,
            policy: policy_tx,
            registered: watch::channel(None).0,
            state: watch::channel("starting".to_owned()).0,
            shutdown: CancellationToken::new(),
            requests: watch::channel(stored).0,
        });
        tokio::spawn(follow_tunnels(shared.clone()));
        tokio::spawn(report_refusals(shared.clone(), refusals));
        let control = tokio::spawn(control_loop(shared.clone()));
        tracing::info!(node_id = %shared.endpoint.id(), "agent started");
        let handle = Handle {
            shared: shared.clone(),
            tunnels: tunnels_tx,
            server,
            traffic,
            inspector,
        };
        Ok(Self {
            shared,
            router,
            counters,
            denied,
            control,
            handle,
        })
    }

    pub fn node_id(&self) -> iroh::EndpointId {
        self.shared.endpoint.id()
    }

    /// For the local UI.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// Resolves with the connector once the agent has registered.
    pub async fn registered(&self) -> Registration {
        let mut rx = self.shared.registered.subscribe();
        loop {
            if let Some(r) = rx.borrow_and_update().clone() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// A short word on the control loop's state.
    pub fn state(&self) -> watch::Receiver<String> {
        self.shared.state.subscribe()
    }

    pub fn stats(&self) -> Stats {
        Stats {
            requests: self
                .counters
                .accepted
                .load(std::sync::atomic::Ordering::Relaxed),
            active: self
                .counters
                .active
                .load(std::sync::atomic::Ordering::Relaxed),
            denied: self.denied.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Replaces the tunnels; the control loop writes (and prunes) their objects.
    pub fn set_tunnels(&self, tunnels: Vec<Tunnel>) {
        self.handle.set_tunnels(tunnels);
    }

    /// Re-reads `path` every two seconds when it changed, and applies its tunnels (plus
    /// `extra`, the ones from flags). An invalid file is reported and ignored: the
    /// tunnels in effect stay.
    pub fn follow_config_file(&self, path: PathBuf, extra: Vec<Tunnel>) -> JoinHandle<()> {
        let tunnels = self.handle.tunnels.clone();
        let shutdown = self.shared.shutdown.clone();
        tokio::spawn(async move {
            let modified = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let mut last = modified(&path);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                let now = modified(&path);
                if now == last {
                    continue;
                }
                last = now;
                match crate::config::load(&path) {
                    Ok(file) => {
                        let mut next = file.tunnels;
                        next.extend(extra.iter().cloned());
                        tracing::info!(path = %path.display(), tunnels = next.len(), "config changed; applying its tunnels");
                        tunnels.send_replace(next);
                    }
                    Err(e) => tracing::error!("{}; keeping the tunnels in effect", error_chain(&e)),
                }
            }
        })
    }

    /// Stops: releases the lease so gateways see the device offline at once, optionally
    /// deletes the tunnels' advertisements and proxies (never the connector), closes the
    /// endpoint.
    pub async fn shutdown(self, remove_tunnels: bool) {
        self.shared.shutdown.cancel();
        let _ = self.control.await;
        if let Some(reg) = self.shared.registered.borrow().clone() {
            let s = &self.shared;
            let cleanup = async {
                release_lease(s, &reg).await;
                if remove_tunnels {
                    prune(s, &reg.connector, &HashSet::new()).await.ok();
                }
            };
            if tokio::time::timeout(Duration::from_secs(5), cleanup)
                .await
                .is_err()
            {
                tracing::warn!(
                    "API did not answer during shutdown; the lease will expire on its own"
                );
            }
        }
        let _ = self.router.shutdown().await;
        self.shared.endpoint.close().await;
    }
}

fn policy_path(config: &Config) -> PathBuf {
    config.state_dir.join("policy.json")
}

fn load_policy(config: &Config) -> Policy {
    std::fs::read(policy_path(config))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn store_policy(config: &Config, policy: &Policy) {
    let path = policy_path(config);
    let tmp = path.with_extension("tmp");
    let ok = serde_json::to_vec(policy)
        .ok()
        .is_some_and(|b| std::fs::write(&tmp, b).is_ok() && std::fs::rename(&tmp, &path).is_ok());
    if !ok {
        tracing::warn!(path = %path.display(), "could not cache the tunnel policy");
    }
}

/// Capped exponential backoff with jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(30);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn step(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        d.mul_f64(rand::random_range(0.75..1.25))
    }
}

async fn control_loop(s: Arc<Shared>) {
    let mut backoff = Backoff::new();
    let mut watchers: Option<(String, Vec<JoinHandle<()>>)> = None;
    // The same failure again and again is said once; the state line shows it meanwhile.
    let mut last_failure = None;
    loop {
        // "Reconnected" only after a session of this process got through.
        let after = last_failure
            .as_deref()
            .filter(|_| s.registered.borrow().is_some());
        let result = session(&s, &mut backoff, &mut watchers, after).await;
        if s.shutdown.is_cancelled() {
            break;
        }
        let wait = backoff.step();
        match result {
            Ok(()) => break,
            Err(e) => {
                let why = error_chain(&e);
                if last_failure.as_ref() == Some(&why) {
                    tracing::debug!(error = %why, retry_in = ?wait, "control plane session failed again");
                } else {
                    tracing::warn!(error = %why, retry_in = ?wait, "control plane session failed; retrying quietly");
                }
                s.state.send_replace(format!("reconnecting… ({why})"));
                last_failure = Some(why);
            }
        }
        tokio::select! {
            () = s.shutdown.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
    }
    for w in watchers.into_iter().flat_map(|(_, w)| w) {
        w.abort();
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn pp() -> PatchParams {
    PatchParams {
        field_manager: Some(managers::AGENT.into()),
        ..Default::default()
    }
}

async fn session(
    s: &Arc<Shared>,
    backoff: &mut Backoff,
    watchers: &mut Option<(String, Vec<JoinHandle<()>>)>,
    after: Option<&str>,
) -> Result<(), Error> {
    s.state.send_replace("registering".into());
    let connector = register(s).await?;
    let name = connector.metadata.name.clone().unwrap_or_default();
    if watchers.as_ref().is_none_or(|(n, _)| *n != name) {
        for old in watchers.take().into_iter().flat_map(|(_, w)| w) {
            old.abort();
        }
        let tasks = vec![
            tokio::spawn(watch_policy(s.clone())),
            tokio::spawn(keep_certificates(s.clone(), name.clone())),
        ];
        *watchers = Some((name.clone(), tasks));
    }
    let reg = Registration {
        project: s.config.project.clone(),
        connector: name.clone(),
        uid: connector.metadata.uid.clone(),
    };
    let mut tunnels = s.tunnels.clone();
    let mut requests = s.requests.subscribe();
    let current = tunnels.borrow_and_update().clone();
    sync_tunnels(s, &connector, &current).await?;
    renew_lease(s, &connector).await?;
    let mut addrs = s.endpoint.watch_addr();
    patch_status(s, &name, &addrs.get()).await?;
    s.registered.send_replace(Some(reg));
    s.state.send_replace("online".into());
    backoff.reset();
    tracing::info!(connector = %format!("{}/{name}", s.config.project), node_id = %s.endpoint.id(), "registered");
    let (reason, note) = match after {
        None => (
            "Connected",
            format!(
                "endpoint {} holds the lease; {} tunnel(s)",
                s.endpoint.id(),
                current.len()
            ),
        ),
        Some(why) => (
            "Reconnected",
            format!(
                "endpoint {} holds the lease again, after: {why}",
                s.endpoint.id()
            ),
        ),
    };
    s.events
        .record(
            &connector.object_ref(&()),
            portway_kube::events::Kind::Normal,
            reason,
            "Connect",
            note,
        )
        .await;

    let half = s.config.lease_duration / 2;
    let jitter = || half.mul_f64(rand::random_range(0.8..1.0));
    let mut next_renew = tokio::time::Instant::now() + jitter();
    let mut resync = tokio::time::interval(Duration::from_secs(60));
    resync.reset();
    loop {
        tokio::select! {
            () = s.shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(next_renew) => {
                renew_lease(s, &connector).await?;
                next_renew = tokio::time::Instant::now() + jitter();
            }
            addr = addrs.updated() => {
                if let Ok(addr) = addr {
                    patch_status(s, &name, &addr).await?;
                }
            }
            changed = tunnels.changed() => {
                if changed.is_ok() {
                    let current = tunnels.borrow_and_update().clone();
                    sync_tunnels(s, &connector, &current).await?;
                }
            }
            changed = requests.changed() => {
                if changed.is_ok() {
                    requests.borrow_and_update();
                    let current = tunnels.borrow().clone();
                    sync_tunnels(s, &connector, &current).await?;
                }
            }
            _ = resync.tick() => {
                patch_status(s, &name, &s.endpoint.addr()).await?;
                let current = tunnels.borrow().clone();
                sync_tunnels(s, &connector, &current).await?;
            }
        }
    }
}

/// Finds the connector by this endpoint's id, or by name, or creates it; then brings its
/// class and labels up to date.
async fn register(s: &Shared) -> Result<Connector, Error> {
    let api: Api<Connector> = Api::namespaced(s.client.clone(), &s.config.project);
    let id = s.endpoint.id().to_string();
    let by_id = api
        .list(&ListParams::default().fields(&format!("status.connectionDetails.publicKey.id={id}")))
        .await?;
    let existing = match by_id.items.into_iter().next() {
        Some(c) => Some(c),
        None => match api.get_opt(&s.config.name).await? {
            Some(c) => {
                check_takeover(s, &c).await?;
                Some(c)
            }
            None => None,
        },
    };
    let connector = match existing {
        Some(c) => c,
        None => {
            let c = Connector::new(
                &s.config.name,
                ConnectorSpec {
                    connector_class_name: s.config.connector_class.clone(),
                    capabilities: vec![],
                },
            );
            match api
                .create(
                    &PostParams {
                        field_manager: Some(managers::AGENT.into()),
                        ..Default::default()
                    },
                    &c,
                )
                .await
            {
                Ok(c) => c,
                Err(kube::Error::Api(e)) if e.code == 409 => api.get(&s.config.name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let name = connector.metadata.name.clone().unwrap_or_default();
    let mut wanted = device_labels();
    wanted.extend(s.config.labels.clone());
    let previous: Vec<String> = connector
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MANAGED_LABELS))
        .map(|v| {
            v.split(',')
                .filter(|k| !k.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let mut label_patch = serde_json::Map::new();
    for k in previous.iter().filter(|k| !wanted.contains_key(*k)) {
        label_patch.insert(k.clone(), serde_json::Value::Null);
    }
    for (k, v) in &wanted {
        label_patch.insert(k.clone(), json!(v));
    }
    let patch = json!({
        "metadata": {
            "labels": label_patch,
            "annotations": {MANAGED_LABELS: wanted.keys().cloned().collect::<Vec<_>>().join(",")},
        },
        "spec": {"connectorClassName": s.config.connector_class},
    });
    Ok(api.patch(&name, &pp(), &Patch::Merge(&patch)).await?)
}

/// Refuses to adopt a connector another device still holds.
async fn check_takeover(s: &Shared, c: &Connector) -> Result<(), Error> {
    let Some(other) = c
        .endpoint_id()
        .filter(|o| *o != s.endpoint.id().to_string())
    else {
        return Ok(());
    };
    let name = c.metadata.name.clone().unwrap_or_default();
    let leases: Api<Lease> = Api::namespaced(s.client.clone(), &s.config.project);
    let me = s.endpoint.id().to_string();
    let held = leases.get_opt(&name).await?.is_some_and(|l| {
        portway_kube::lease::current_holder(&l, Timestamp::now()).is_some_and(|h| h != me)
    });
    if held {
        return Err(Error::NameTaken {
            project: s.config.project.clone(),
            name,
            other: other.to_owned(),
        });
    }
    tracing::info!(connector = %name, previous = other, "taking over a connector whose device is gone (or whose key was rotated)");
    Ok(())
}

async fn patch_status(s: &Shared, name: &str, addr: &EndpointAddr) -> Result<(), Error> {
    let api: Api<Connector> = Api::namespaced(s.client.clone(), &s.config.project);
    let details = endpoint::connection_details(addr);
    let patch = json!({"status": {"connectionDetails": details, "leaseRef": {"name": name}}});
    api.patch_status(name, &pp(), &Patch::Merge(&patch)).await?;
    Ok(())
}

fn now() -> serde_json::Value {
    serde_json::to_value(MicroTime(Timestamp::now())).unwrap_or_default()
}

/// Creates or renews the heartbeat Lease (named after the connector, owned by it).
async fn renew_lease(s: &Shared, connector: &Connector) -> Result<(), Error> {
    let name = connector.metadata.name.clone().unwrap_or_default();
    let api: Api<Lease> = Api::namespaced(s.client.clone(), &s.config.project);
    let holder = s.endpoint.id().to_string();
    let duration = i32::try_from(s.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
    // The owner is set on every renewal: a lease left by an earlier connector of this
    // name (deleted, the lease not yet collected) becomes this one's.
    let owner = kube::Resource::controller_owner_ref(connector, &()).map(|o| vec![o]);
    let renew = json!({
        "metadata": {"ownerReferences": owner},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "renewTime": now()},
    });
    match api.patch(&name, &pp(), &Patch::Merge(&renew)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            let mut lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {labels::MANAGED_BY: managers::AGENT}},
                "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration, "acquireTime": now(), "renewTime": now()},
            }))?;
            lease.metadata.owner_references =
                kube::Resource::controller_owner_ref(connector, &()).map(|o| vec![o]);
            match api
                .create(
                    &PostParams {
                        field_manager: Some(managers::AGENT.into()),
                        ..Default::default()
                    },
                    &lease,
                )
                .await
            {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// The registered connector, as events name it.
fn connector_ref(reg: &Registration) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some(Connector::api_version(&()).into_owned()),
        kind: Some("Connector".into()),
        name: Some(reg.connector.clone()),
        namespace: Some(reg.project.clone()),
        uid: reg.uid.clone(),
        ..Default::default()
    }
}

/// How often refused tunnel requests are reported at most.
const REFUSALS_EVERY: Duration = Duration::from_secs(60);

/// Refused tunnel requests as Warning events on this device's Connector: the first at
/// once, then at most one event per [`REFUSALS_EVERY`] counting the others, so whoever
/// probes the device cannot flood its project's events.
async fn report_refusals(s: Arc<Shared>, mut refusals: tokio::sync::mpsc::Receiver<String>) {
    let mut last: Option<tokio::time::Instant> = None;
    let (mut pending, mut latest) = (0u64, String::new());
    loop {
        let due = last.map(|t| t + REFUSALS_EVERY);
        tokio::select! {
            () = s.shutdown.cancelled() => return,
            got = refusals.recv() => match got {
                None => return,
                Some(why) => {
                    pending += 1;
                    latest = why;
                }
            },
            () = async {
                match due {
                    Some(at) if pending > 0 => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            } => {}
        }
        if pending == 0 || due.is_some_and(|at| tokio::time::Instant::now() < at) {
            continue;
        }
        let Some(reg) = s.registered.borrow().clone() else {
            continue;
        };
        let note = if pending == 1 {
            format!("tunnel request refused: {latest}")
        } else {
            format!("{pending} tunnel requests refused; the latest: {latest}")
        };
        s.events
            .record(
                &connector_ref(&reg),
                portway_kube::events::Kind::Warning,
                "TunnelRefused",
                "Refuse",
                note,
            )
            .await;
        pending = 0;
        last = Some(tokio::time::Instant::now());
    }
}

/// Gives the lease up, so the connector goes not-ready at once instead of at expiry.
async fn release_lease(s: &Shared, reg: &Registration) {
    let api: Api<Lease> = Api::namespaced(s.client.clone(), &reg.project);
    // The last renewal stays: it dates the departure (an ephemeral connector is
    // collected a TTL after it).
    let release = json!({"spec": {"holderIdentity": null}});
    match api
        .patch(&reg.connector, &pp(), &Patch::Merge(&release))
        .await
    {
        Ok(_) => {
            tracing::info!(connector = %reg.connector, "lease released");
            let note = "the agent stopped and released its lease".to_owned();
            s.events
                .record(
                    &connector_ref(reg),
                    portway_kube::events::Kind::Normal,
                    "Disconnected",
                    "Disconnect",
                    note,
                )
                .await;
        }
        Err(e) => tracing::warn!(error = %e, "releasing the lease"),
    }
}

/// Applies the tunnels' advertisements and proxies, and deletes ones no longer wanted.
async fn sync_tunnels(s: &Shared, connector: &Connector, tunnels: &[Tunnel]) -> Result<(), Error> {
    let requests = s.requests.borrow().clone();
    let wanted = objects::desired(connector, tunnels, &requests);
    let mut keep = HashSet::new();
    apply_all(s, "ad", &wanted.advertisements, &mut keep).await?;
    // Users before the proxy, the proxy (which names its policy, so it answers 500 until
    // the policy is there) before the policy (which may name only an existing proxy).
    apply_all(s, "secret", &wanted.secrets, &mut keep).await?;
    apply_all(s, "proxy", &wanted.proxies, &mut keep).await?;
    apply_all(s, "policy", &wanted.policies, &mut keep).await?;
    apply_all(s, "tcpproxy", &wanted.tcp_proxies, &mut keep).await?;
    prune(
        s,
        connector.metadata.name.as_deref().unwrap_or_default(),
        &keep,
    )
    .await
}

/// Server-side applies `objects` (of one kind, noted in `keep` under `tag`).
async fn apply_all<'a, K>(
    s: &Shared,
    tag: &'a str,
    objects: &[K],
    keep: &mut HashSet<(&'a str, String)>,
) -> Result<(), Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let apply = PatchParams::apply(managers::AGENT).force();
    let api: Api<K> = Api::namespaced(s.client.clone(), &s.config.project);
    for o in objects {
        let name = o.meta().name.clone().unwrap_or_default();
        api.patch(&name, &apply, &Patch::Apply(o)).await?;
        keep.insert((tag, name));
    }
    Ok(())
}

async fn prune(s: &Shared, connector: &str, keep: &HashSet<(&str, String)>) -> Result<(), Error> {
    prune_kind::<ConnectorAdvertisement>(s, connector, "ad", keep).await?;
    // Policies first: a proxy is never left without its policy while it lives. (A
    // Secret of users left behind is not listed, as a device may not list Secrets; the
    // Connector owns it, and it is rewritten when the tunnel is published again.)
    prune_kind::<portway_api::AccessPolicy>(s, connector, "policy", keep).await?;
    prune_kind::<HttpProxy>(s, connector, "proxy", keep).await?;
    prune_kind::<portway_api::TcpProxy>(s, connector, "tcpproxy", keep).await
}

/// Deletes this connector's objects of kind `K` that `keep` does not hold under `tag`.
async fn prune_kind<K>(
    s: &Shared,
    connector: &str,
    tag: &str,
    keep: &HashSet<(&str, String)>,
) -> Result<(), Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&objects::selector(connector));
    let api: Api<K> = Api::namespaced(s.client.clone(), &s.config.project);
    for o in api.list(&lp).await? {
        let name = o.meta().name.clone().unwrap_or_default();
        if !keep.contains(&(tag, name.clone())) {
            tracing::info!(kind = %K::kind(&()), name = %name, "removing an object of a tunnel no longer configured");
            api.delete(&name, &DeleteParams::default()).await?;
        }
    }
    Ok(())
}

/// What the device offers: its own tunnels' targets.
fn targets(tunnels: &[Tunnel]) -> Vec<Offer> {
    tunnels
        .iter()
        .map(|t| Offer {
            proxy_protocol: t.proxy_protocol,
            udp: t.protocol == crate::tunnel::Protocol::Udp,
            tunnel: t.name.clone(),
            http: t.protocol == crate::tunnel::Protocol::Http,
            ..Offer::new(&t.target.host, t.target.port)
        })
        .collect()
}

/// Keeps the policy's targets equal to the tunnels in effect: a tunnel removed from the
/// configuration stops serving at once, before (and whether or not) the API hears of it.
async fn follow_tunnels(s: Arc<Shared>) {
    let mut tunnels = s.tunnels.clone();
    loop {
        let next = targets(&tunnels.borrow_and_update());
        s.policy.send_if_modified(|p| {
            let changed = p.targets != next;
            if changed {
                Arc::make_mut(p).targets = next;
            }
            changed
        });
        tokio::select! {
            r = tunnels.changed() => if r.is_err() { return },
            () = s.shutdown.cancelled() => return,
        }
    }
}

/// Keeps each tls tunnel's certificate files in step with its TCPProxy (see
/// [`certificate`]): a request for the names it serves, and the chain issued for it.
async fn keep_certificates(s: Arc<Shared>, connector: String) {
    let api: Api<portway_api::TcpProxy> = Api::namespaced(s.client.clone(), &s.config.project);
    let cfg = watcher::Config::default().labels(&objects::selector(&connector));
    let (store, mut events) = portway_kube::watch::reflect(api, cfg);
    let mut tunnels = s.tunnels.clone();
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "proxy watch interrupted");
                    continue;
                }
                Some(Ok(_)) => {}
            },
            r = tunnels.changed() => if r.is_err() { return },
        }
        if !portway_kube::watch::is_ready(&store) {
            continue;
        }
        let current = tunnels.borrow().clone();
        for t in &current {
            let Some(dir) = t.cert_dir.as_deref() else {
                continue;
            };
            let name = objects::object_name(&connector, &t.name);
            let proxy = store.get(&ObjectRef::new(&name).within(&s.config.project));
            let status = proxy.as_ref().and_then(|p| p.status.as_ref());
            let served = status.map(|st| st.hostnames.clone()).unwrap_or_default();
            let chain = status.and_then(|st| st.certificate.as_deref());
            let request = s.requests.borrow().get(&t.name).cloned();
            match certificate::step(dir, request.as_deref(), &served, chain) {
                Ok(step) => {
                    if let Some((names, until)) = step.written {
                        let until = Timestamp::try_from(until)
                            .map(|t| t.to_string())
                            .unwrap_or_default();
                        tracing::info!(tunnel = %t.name, path = %dir.join(certificate::CERT).display(), names = %names.join(", "), %until, "certificate written");
                    }
                    if let Some(request) = step.request {
                        tracing::info!(tunnel = %t.name, names = %served.join(", "), "asking for a certificate");
                        s.requests.send_modify(|r| {
                            r.insert(t.name.clone(), request);
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(tunnel = %t.name, error = %e, "keeping the tunnel's certificate")
                }
            }
        }
    }
}

/// Keeps the authorised gateways in step with the ConnectorClass. Until the watch has
/// listed once, the cached list stands.
async fn watch_policy(s: Arc<Shared>) {
    let classes: Api<ConnectorClass> = Api::all(s.client.clone());
    let class_cfg =
        watcher::Config::default().fields(&format!("metadata.name={}", s.config.connector_class));
    let (class_store, mut events) = portway_kube::watch::reflect(classes, class_cfg);
    while let Some(event) = events.next().await {
        if let Err(e) = event {
            tracing::debug!(error = %e, "gateway watch interrupted; keeping the last list");
            continue;
        }
        if !portway_kube::watch::is_ready(&class_store) {
            continue;
        }
        let gateways: HashSet<String> = class_store
            .state()
            .iter()
            .flat_map(|c| {
                c.status
                    .iter()
                    .flat_map(|st| st.gateways.iter().map(|g| g.endpoint_id.clone()))
            })
            .collect();
        if s.policy.borrow().gateways != gateways {
            tracing::info!(gateways = gateways.len(), "authorised gateways updated");
            s.policy
                .send_modify(|p| Arc::make_mut(p).gateways = gateways);
            store_policy(&s.config, &s.policy.borrow());
        }
    }
}
