//! Keeps the route table in step with the Gateway API objects of our class, and reports
//! back: `Accepted`/`Programmed` on Gateways (with the edge's addresses) and a parent
//! entry on every attached HTTPRoute.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use portway_api::{condition, managers, set_condition};
use portway_kube::watch::{is_ready, reflect};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::model::{self, Attachment, Table};

#[derive(Clone, Debug)]
pub struct Config {
    /// The GatewayClass served (`portway`).
    pub class: String,
    /// Our controller name, written into route status parents.
    pub controller_name: String,
    /// Addresses published in Gateway status (the edge's listeners), e.g. `127.0.0.1:8080`.
    pub addresses: Vec<String>,
    /// Whether to write Gateway and HTTPRoute status (the built-in edge does; an xDS server
    /// beside other writers may not).
    pub write_status: bool,
}

/// Feeds `table` (and bumps `version` on every rebuild) until `shutdown`.
pub fn spawn(
    client: kube::Client,
    config: Config,
    table: Arc<ArcSwap<Table>>,
    version: watch::Sender<u64>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let all = || watcher::Config::default();
        let (gw_store, gws) = reflect(Api::<Gateway>::all(client.clone()), all());
        let (route_store, routes) = reflect(Api::<HttpRoute>::all(client.clone()), all());
        let (slice_store, slices) = reflect(Api::<EndpointSlice>::all(client.clone()), all());
        let (gws, routes, slices) = (
            gws.map(|e| e.map(drop)),
            routes.map(|e| e.map(drop)),
            slices.map(|e| e.map(drop)),
        );
        let mut events = futures::stream::select(futures::stream::select(gws, routes), slices)
            .ready_chunks(512)
            .boxed();
        let mut resync = tokio::time::interval(Duration::from_secs(60));
        let mut n = 0u64;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                batch = events.next() => match batch {
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
            if !(is_ready(&gw_store) && is_ready(&route_store) && is_ready(&slice_store)) {
                continue;
            }
            let gws = gw_store.state();
            let routes = route_store.state();
            let slices = slice_store.state();
            let (t, attachments) = model::build(
                &config.class,
                &gws.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                &routes.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
                &slices.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            );
            tracing::debug!(hosts = t.len(), "route table rebuilt");
            table.store(Arc::new(t));
            n += 1;
            version.send_replace(n);
            if config.write_status {
                write_status(&client, &config, &gw_store, &route_store, &attachments).await;
            }
        }
    })
}

async fn write_status(
    client: &kube::Client,
    config: &Config,
    gateways: &Store<Gateway>,
    routes: &Store<HttpRoute>,
    attachments: &[Attachment],
) {
    let mut attached: HashMap<(String, String), usize> = HashMap::new();
    for a in attachments {
        *attached
            .entry((a.route_ns.clone(), a.gateway.clone()))
            .or_default() += 1;
    }
    for g in gateways
        .state()
        .iter()
        .filter(|g| g.spec.gateway_class_name == config.class)
    {
        let ns = g.namespace().unwrap_or_default();
        let name = g.name_any();
        let status = g.status.clone().unwrap_or_default();
        let ours = [
            condition(
                "Accepted",
                true,
                "Accepted",
                "served by the built-in edge",
                g.metadata.generation,
            ),
            condition(
                "Programmed",
                true,
                "Programmed",
                "routes are live",
                g.metadata.generation,
            ),
        ];
        let mut conditions = status.conditions.clone().unwrap_or_default();
        let mut changed = false;
        for c in &ours {
            changed |= set_condition(&mut conditions, c.clone());
        }
        let addresses: Vec<Value> = config
            .addresses
            .iter()
            .map(|a| json!({"type": "IPAddress", "value": a}))
            .collect();
        let current_addresses =
            serde_json::to_value(status.addresses.clone().unwrap_or_default()).unwrap_or_default();
        let count = attached
            .get(&(ns.clone(), name.clone()))
            .copied()
            .unwrap_or(0);
        let listeners: Vec<Value> = g
            .spec
            .listeners
            .iter()
            .map(|l| {
                json!({"name": l.name, "attachedRoutes": count, "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
                       "conditions": [condition("Accepted", true, "Accepted", "", g.metadata.generation), condition("Programmed", true, "Programmed", "", g.metadata.generation)]})
            })
            .collect();
        let listeners_same = status.listeners.as_ref().is_some_and(|ls| {
            ls.len() == listeners.len() && ls.iter().all(|l| l.attached_routes == count as i32)
        });
        if !changed && current_addresses == json!(addresses) && listeners_same {
            continue;
        }
        let api: Api<Gateway> = Api::namespaced(client.clone(), &ns);
        let mut rest = serde_json::Map::new();
        rest.insert("addresses".into(), json!(addresses));
        rest.insert("listeners".into(), json!(listeners));
        if let Err(e) = portway_kube::patch_conditions(
            &api,
            Some(g.as_ref()),
            &name,
            managers::EDGE,
            &ours,
            Some(&rest),
        )
        .await
        {
            tracing::warn!(gateway = %format!("{ns}/{name}"), error = %e, "writing Gateway status");
        }
    }
    for a in attachments {
        let Some(route) = routes.get(&reflector::ObjectRef::new(&a.route).within(&a.route_ns))
        else {
            continue;
        };
        let api: Api<HttpRoute> = Api::namespaced(client.clone(), &a.route_ns);
        let decide = |r: &HttpRoute| route_parents(r, &config.controller_name, a);
        if let Err(e) =
            portway_kube::patch_status_with(&api, Some(&route), &a.route, managers::EDGE, decide)
                .await
        {
            tracing::warn!(route = %format!("{}/{}", a.route_ns, a.route), error = %e, "writing HTTPRoute status");
        }
    }
}

/// The route's `status` with our parent entry for `a` accepted, or `None` when it is
/// already so. Other controllers' parent entries are kept as they are.
fn route_parents(route: &HttpRoute, controller: &str, a: &Attachment) -> Option<Value> {
    let status = route.status.clone().unwrap_or_default();
    let mine = |p: &&gateway_api::apis::standard::httproutes::HttpRouteStatusParents| {
        p.controller_name == controller && p.parent_ref.name == a.gateway
    };
    let mut conditions = status
        .parents
        .iter()
        .find(mine)
        .map(|p| p.conditions.clone())
        .unwrap_or_default();
    let generation = route.metadata.generation;
    let mut changed = set_condition(
        &mut conditions,
        condition("Accepted", true, "Accepted", "", generation),
    );
    changed |= set_condition(
        &mut conditions,
        condition("ResolvedRefs", true, "ResolvedRefs", "", generation),
    );
    if !changed && status.parents.iter().any(|p| mine(&p)) {
        return None;
    }
    let mut parents: Vec<Value> = status
        .parents
        .iter()
        .filter(|p| !mine(p))
        .filter_map(|p| serde_json::to_value(p).ok())
        .collect();
    parents.push(json!({
        "controllerName": controller,
        "parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": a.gateway, "namespace": a.route_ns},
        "conditions": conditions,
    }));
    Some(json!({"parents": parents}))
}
