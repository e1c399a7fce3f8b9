//! Keeps the route table in step with the Gateway API objects of our class, and reports
//! back: `Accepted`/`Programmed` on Gateways (with the edge's addresses) and a parent
//! entry on every attached HTTPRoute. What to write is decided in `desired`; this file
//! watches, rebuilds and applies.

mod desired;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use gateway_api::apis::experimental::tcproutes::TcpRoute;
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use portway_api::{AccessPolicy, managers};
use portway_kube::watch::{is_ready, reflect, relisted, touched};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::{self, Table};

pub use desired::{RouteRef, StatusWrite, desired};

#[derive(Clone, Debug)]
pub struct Config {
    /// The GatewayClass served (`portway`).
    pub class: String,
    /// Our controller name, written into route status parents.
    pub controller_name: String,
    /// Addresses published in Gateway status (the edge's listeners' IPs), e.g. `127.0.0.1`.
    pub addresses: Vec<String>,
    /// Whether to write Gateway and HTTPRoute status (the built-in edge does; an xDS server
    /// beside other writers may not).
    pub write_status: bool,
    /// How the public TCP ports fare, when this process binds them (the built-in edge): a
    /// TCPRoute is accepted only once its port listens, and refused with the bind error.
    pub tcp_binds: Option<watch::Receiver<crate::tcp::Binds>>,
    /// Why TLS passthrough routes cannot be served, when the data plane has no TLS port:
    /// they are refused with it rather than reported as served.
    pub no_tls_port: Option<String>,
    /// How the public UDP ports fare, when this process binds them (the built-in edge).
    pub udp_binds: Option<watch::Receiver<crate::tcp::Binds>>,
    /// Why UDP routes cannot be served, when the data plane does not carry UDP (Envoy):
    /// they are refused with it.
    pub no_udp: Option<String>,
    /// With several replicas writing status (`--leader-elect`): true while this one
    /// leads; the others serve routes but leave status to it.
    pub leading: Option<watch::Receiver<bool>>,
}

/// Resolves when `binds` (if any) changes; never when there is none or it is gone.
async fn binds_changed(binds: &mut Option<watch::Receiver<crate::tcp::Binds>>) {
    match binds {
        Some(b) => {
            if b.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Why passthrough routes cannot be served by a data plane without a TLS port.
pub fn no_tls_port(serves_tls: bool) -> Option<String> {
    (!serves_tls).then(|| {
        "this edge has no TLS port to pass TLS through: start it with an HTTPS address".to_owned()
    })
}

/// The Gateways the route watcher caches, shared with the other writer of Gateway status
/// (the xDS reporter) so that it needs no watch of its own.
#[derive(Clone)]
pub struct Gateways {
    store: Store<Gateway>,
    changed: watch::Receiver<u64>,
}

impl Gateways {
    pub fn store(&self) -> &Store<Gateway> {
        &self.store
    }

    /// Moves after the cache applies a change to a Gateway, and after each (re)list.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.clone()
    }
}

/// The running route watcher.
pub struct Routes {
    gateways: Gateways,
    task: JoinHandle<()>,
}

impl Routes {
    pub fn gateways(&self) -> Gateways {
        self.gateways.clone()
    }

    /// Waits until the watcher has stopped (after `shutdown`).
    pub async fn join(self) {
        let _ = self.task.await;
    }
}

/// Feeds `table` (and bumps `version` on every rebuild) until `shutdown`.
pub fn spawn(
    client: kube::Client,
    config: Config,
    table: Arc<ArcSwap<Table>>,
    version: watch::Sender<u64>,
    shutdown: CancellationToken,
) -> Routes {
    let all = || watcher::Config::default();
    let (gw_store, gws) = reflect(Api::<Gateway>::all(client.clone()), all());
    let (route_store, routes) = reflect(Api::<HttpRoute>::all(client.clone()), all());
    let (tcp_store, tcp_routes) = reflect(Api::<TcpRoute>::all(client.clone()), all());
    let (tls_store, tls_routes) = reflect(Api::<TlsRoute>::all(client.clone()), all());
    let (udp_store, udp_routes) = reflect(Api::<UdpRoute>::all(client.clone()), all());
    let (slice_store, slices) = reflect(Api::<EndpointSlice>::all(client.clone()), all());
    let (access_store, access) = reflect(Api::<AccessPolicy>::all(client.clone()), all());
    // Only the Secrets basic auth and JWT read: no other Secret is cached here.
    let (secret_store, secrets) = reflect(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().fields(&format!("type={}", portway_api::access::HTPASSWD_TYPE)),
    );
    let (identity_store, identity) = reflect(
        Api::<Secret>::namespaced(client.clone(), portway_api::certificates::SYSTEM_NAMESPACE),
        watcher::Config::default().fields(&format!(
            "type={}",
            portway_api::access::IDENTITY_SECRET_TYPE
        )),
    );
    let (jwks_store, jwks) = reflect(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default().fields(&format!("type={}", portway_api::access::JWKS_TYPE)),
    );
    let (oidc_store, oidc) = reflect(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default()
            .fields(&format!("type={}", portway_api::access::OIDC_CLIENT_TYPE)),
    );
    let (changed_tx, changed) = watch::channel(0u64);
    let gateways = Gateways {
        store: gw_store.clone(),
        changed,
    };
    let task = tokio::spawn(async move {
        let gws = gws.inspect(move |e| {
            if let Ok(e) = e
                && (touched(e).is_some() || relisted(e))
            {
                changed_tx.send_modify(|n| *n += 1);
            }
        });
        let (gws, routes, tcp_routes, tls_routes, udp_routes, slices, access, secrets) = (
            gws.map(|e| e.map(drop)),
            routes.map(|e| e.map(drop)),
            tcp_routes.map(|e| e.map(drop)),
            tls_routes.map(|e| e.map(drop)),
            udp_routes.map(|e| e.map(drop)),
            slices.map(|e| e.map(drop)),
            access.map(|e| e.map(drop)),
            futures::stream::select(
                futures::stream::select(secrets.map(|e| e.map(drop)), jwks.map(|e| e.map(drop))),
                futures::stream::select(identity.map(|e| e.map(drop)), oidc.map(|e| e.map(drop))),
            ),
        );
        let layer4 =
            futures::stream::select(futures::stream::select(tcp_routes, tls_routes), udp_routes);
        let mut changes = futures::stream::select(
            futures::stream::select(
                futures::stream::select(gws, routes),
                futures::stream::select(access, secrets),
            ),
            futures::stream::select(layer4, slices),
        )
        .ready_chunks(512)
        .boxed();
        let events = portway_kube::Events::new(client.clone(), "portway-edge", None);
        let mut resync = tokio::time::interval(Duration::from_secs(60));
        let mut n = 0u64;
        let mut tcp_binds = config.tcp_binds.clone();
        let mut udp_binds = config.udp_binds.clone();
        let mut leading = config.leading.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = portway_kube::leader::changed(&mut leading) => {}
                () = binds_changed(&mut tcp_binds) => {}
                () = binds_changed(&mut udp_binds) => {}
                batch = changes.next() => match batch {
                    None => return,
                    Some(batch) => {
                        for e in batch {
                            if let Err(e) = e {
                                tracing::debug!(error = %e, "route watch interrupted; retrying");
                            }
                        }
                    }
                },
                _ = resync.tick() => {}
            }
            if !(is_ready(&gw_store)
                && is_ready(&route_store)
                && is_ready(&tcp_store)
                && is_ready(&tls_store)
                && is_ready(&udp_store)
                && is_ready(&slice_store)
                && is_ready(&access_store)
                && is_ready(&secret_store)
                && is_ready(&jwks_store)
                && is_ready(&oidc_store)
                && is_ready(&identity_store))
            {
                continue;
            }
            let (gw_state, route_state, tcp_state, tls_state, udp_state, slice_state) = (
                gw_store.state(),
                route_store.state(),
                tcp_store.state(),
                tls_store.state(),
                udp_store.state(),
                slice_store.state(),
            );
            let gws: Vec<&Gateway> = gw_state.iter().map(AsRef::as_ref).collect();
            let routes: Vec<&HttpRoute> = route_state.iter().map(AsRef::as_ref).collect();
            let tcp_routes: Vec<&TcpRoute> = tcp_state.iter().map(AsRef::as_ref).collect();
            let tls_routes: Vec<&TlsRoute> = tls_state.iter().map(AsRef::as_ref).collect();
            let udp_routes: Vec<&UdpRoute> = udp_state.iter().map(AsRef::as_ref).collect();
            let l4 = crate::model::Layer4Routes {
                tcp: &tcp_routes,
                tls: &tls_routes,
                udp: &udp_routes,
            };
            let slices: Vec<&EndpointSlice> = slice_state.iter().map(AsRef::as_ref).collect();
            let access_state = access_store.state();
            let policies: Vec<&AccessPolicy> = access_state.iter().map(AsRef::as_ref).collect();
            let (secret_state, jwks_state, oidc_state) =
                (secret_store.state(), jwks_store.state(), oidc_store.state());
            let secrets: Vec<&Secret> = secret_state
                .iter()
                .chain(&jwks_state)
                .chain(&oidc_state)
                .map(AsRef::as_ref)
                .collect();
            let identity_state = identity_store.state();
            let access = model::Access {
                policies: &policies,
                secrets: &secrets,
                identity: identity_state.iter().map(AsRef::as_ref).find(|s| {
                    s.metadata.name.as_deref() == Some(portway_api::access::IDENTITY_SECRET)
                }),
            };
            let (t, attachments) =
                model::build(&config.class, &gws, &routes, &access, &l4, &slices);
            tracing::debug!(
                hosts = t.len(),
                tcp_ports = t.tcp.len(),
                tls_names = t.tls.len(),
                udp_ports = t.udp.len(),
                "route table rebuilt"
            );
            table.store(Arc::new(t));
            n += 1;
            version.send_replace(n);
            if config.write_status && portway_kube::leader::leads(leading.as_ref()) {
                let writes = desired(&config, &gws, &routes, &l4, &attachments);
                apply(&client, &events, &config.controller_name, writes).await;
            }
        }
    });
    Routes { gateways, task }
}

/// Applies `writes`, each guarded on the cached copy it was decided from. A write that
/// fails is logged and made again at the next rebuild (the resync at the latest).
async fn apply(
    client: &kube::Client,
    events: &portway_kube::Events,
    controller: &str,
    writes: Vec<StatusWrite<'_>>,
) {
    for w in writes {
        match w {
            StatusWrite::Gateway {
                gateway,
                conditions,
                rest,
            } => {
                let (ns, name) = (gateway.namespace().unwrap_or_default(), gateway.name_any());
                let api: Api<Gateway> = Api::namespaced(client.clone(), &ns);
                let result = portway_kube::patch_conditions(
                    &api,
                    Some(gateway),
                    &name,
                    managers::EDGE,
                    &conditions,
                    Some(&rest),
                )
                .await;
                match result {
                    Ok(true) => {
                        let old = gateway
                            .status
                            .as_ref()
                            .and_then(|s| s.conditions.as_deref());
                        events
                            .conditions_changed(
                                &gateway.object_ref(&()),
                                old.unwrap_or_default(),
                                &conditions,
                            )
                            .await;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(gateway = %format!("{ns}/{name}"), error = %e, "writing Gateway status");
                    }
                }
            }
            StatusWrite::RouteParents {
                route,
                gateways,
                refused,
                status,
            } => {
                let parents = Parents {
                    gateways,
                    refused,
                    status,
                };
                match route {
                    RouteRef::Http(r) => {
                        write_parents(client, events, controller, r, parents).await
                    }
                    RouteRef::Tcp(r) => write_parents(client, events, controller, r, parents).await,
                    RouteRef::Tls(r) => write_parents(client, events, controller, r, parents).await,
                    RouteRef::Udp(r) => write_parents(client, events, controller, r, parents).await,
                }
            }
        }
    }
}

/// A route's parent entries as decided: its Gateways, those refusing it (and why), and the
/// status that says so.
struct Parents {
    gateways: Vec<String>,
    refused: std::collections::HashMap<String, String>,
    status: serde_json::Value,
}

/// Writes a route's `status.parents` as decided; after a 409 the route is read again and
/// decided again.
async fn write_parents<K>(
    client: &kube::Client,
    events: &portway_kube::Events,
    controller: &str,
    route: &K,
    parents: Parents,
) where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + k8s_openapi::serde::de::DeserializeOwned
        + std::fmt::Debug,
    for<'a> RouteRef<'a>: From<&'a K>,
{
    let (ns, name) = (route.namespace().unwrap_or_default(), route.name_any());
    let api: Api<K> = Api::namespaced(client.clone(), &ns);
    let Parents {
        gateways,
        refused,
        status,
    } = parents;
    let mut decided = Some(status);
    let decide = |r: &K| {
        decided
            .take()
            .or_else(|| desired::route_parents(RouteRef::from(r), controller, &gateways, &refused))
    };
    let result =
        portway_kube::patch_status_with(&api, Some(route), &name, managers::EDGE, decide).await;
    match result {
        Ok(true) if refused.is_empty() => {
            let note = format!("attached to Gateway {} and served", gateways.join(", "));
            events
                .record(
                    &route.object_ref(&()),
                    portway_kube::events::Kind::Normal,
                    "Accepted",
                    "Reconcile",
                    note,
                )
                .await;
        }
        Ok(true) => {
            let mut why: Vec<&String> = refused.values().collect();
            why.sort();
            let note = why.into_iter().cloned().collect::<Vec<_>>().join("; ");
            events
                .record(
                    &route.object_ref(&()),
                    portway_kube::events::Kind::Warning,
                    "PortUnavailable",
                    "Reconcile",
                    note,
                )
                .await;
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(route = %format!("{ns}/{name}"), kind = %K::kind(&()), error = %e, "writing route status");
        }
    }
}
