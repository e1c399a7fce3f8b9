//! The thin shell around [`super::desired`]: take the port from the index, read stores,
//! decide, apply what differs, delete what is no longer wanted, write status.

use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::experimental::tcproutes::TcpRoute;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use portway_api::{Connector, ConnectorAdvertisement, TcpProxy, TcpProxyStatus};
use serde_json::{Value, json};

use super::desired::{Inputs, child_name, desired, name_taken_by};
use crate::proxy::desired::merged_conditions;
use crate::proxy::reconcile::{
    Shared, apply, apply_shared, names, prune, prune_shared, write_status,
};
use crate::{Ctx, Error};

pub(crate) async fn reconcile(proxy: Arc<TcpProxy>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if proxy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = proxy.namespace().unwrap_or_default();
    let name = proxy.name_any();
    // Taken (and recorded) first, so no proxy reconciled meanwhile is given the same port;
    // a port freed or contested wakes the proxies waiting for it.
    let (port, touched) = ctx.tcp_ports.assign(&proxy);
    crate::send_keys(&ctx.tcp_requeue, touched);
    let connectors: Vec<Arc<Connector>> = ctx.connectors.get(&ns);
    let ads: Vec<Arc<ConnectorAdvertisement>> = ctx.advertisements.get(&ns);
    let connector_refs: Vec<&Connector> = connectors.iter().map(AsRef::as_ref).collect();
    let ad_refs: Vec<&ConnectorAdvertisement> = ads.iter().map(AsRef::as_ref).collect();
    let child = child_name(&name);
    let route = ctx
        .tcp_routes
        .store()
        .get(&ObjectRef::new(&child).within(&ns));
    let gateway = ctx
        .gateways
        .store()
        .get(&ObjectRef::new(&child).within(&ns));
    let taken = name_taken_by(
        &proxy,
        &[
            ("Gateway", gateway.as_ref().map(|g| &g.metadata)),
            ("TCPRoute", route.as_ref().map(|r| &r.metadata)),
        ],
    );
    let d = desired(&Inputs {
        proxy: &proxy,
        connectors: &connector_refs,
        advertisements: &ad_refs,
        port: &port,
        name_taken_by: taken.as_deref(),
        route_status: route.as_ref().and_then(|r| r.status.as_ref()),
        config: &ctx.config.proxy,
        now: Timestamp::now(),
    });

    // Children first (status may only claim what exists).
    let shared = Shared::new(&d.gateway, &d.services, &d.slices);
    apply_shared(&ctx, &shared).await?;
    if let Some(r) = &d.route {
        apply(&ctx, ctx.tcp_routes.store(), r).await?;
    }
    let owner = &*proxy;
    prune::<TcpRoute, _>(&ctx, &ctx.tcp_routes, owner, &names(&d.route)).await?;
    prune_shared(&ctx, owner, &shared).await?;

    let old = proxy.status.as_ref().map(|s| s.conditions.as_slice());
    let exists = write_status(
        &ctx,
        owner,
        old.unwrap_or_default(),
        &d.status.conditions,
        |p: &TcpProxy| {
            let current = p.status.clone().unwrap_or_default();
            let status = TcpProxyStatus {
                conditions: merged_conditions(&current.conditions, &d.status.conditions),
                port: d.status.port,
            };
            (status != current).then(|| status_patch(&status))
        },
    )
    .await?;
    if !exists {
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(Duration::from_secs(15 * 60)))
}

/// The merge patch of a status: a port the proxy lost is removed, which a merge patch
/// does only when told so with `null`.
fn status_patch(status: &TcpProxyStatus) -> Value {
    let mut v = json!(status);
    if status.port.is_none() {
        v["port"] = Value::Null;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_port_is_removed_from_status() {
        let lost = TcpProxyStatus {
            conditions: vec![],
            port: None,
        };
        assert_eq!(status_patch(&lost), json!({"port": null}));
        let kept = TcpProxyStatus {
            conditions: vec![],
            port: Some(20000),
        };
        assert_eq!(status_patch(&kept), json!({"port": 20000}));
    }
}
