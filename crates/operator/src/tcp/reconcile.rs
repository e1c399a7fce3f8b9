//! The thin shell around [`super::desired`]: take the port from the index, read stores,
//! decide, apply what differs, delete what is no longer wanted, write status.

use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::experimental::tcproutes::{TcpRoute, TcpRouteStatus};
use gateway_api::apis::experimental::tlsroutes::TlsRoute;
use gateway_api::apis::experimental::udproutes::UdpRoute;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use portway_api::{Connector, ConnectorAdvertisement, TcpProxy, TcpProxyStatus, condition_at};
use serde_json::{Value, json};

use super::certificate;
use super::desired::{Inputs, Listen, TlsNames, child_name, desired, name_taken_by};
use crate::hostnames::Claim;
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
    // a port freed or contested wakes the proxies waiting for it. A passthrough proxy
    // holds none (one that was given a port before lets it go).
    let passthrough = proxy.spec.tls.is_some();
    let (port, touched) = if passthrough {
        (None, ctx.tcp_ports.forget(&proxy))
    } else {
        let (verdict, touched) = ctx.tcp_ports.assign(&proxy);
        (Some(verdict), touched)
    };
    crate::send_keys(&ctx.tcp_requeue, touched);
    let canonical = proxy
        .metadata
        .uid
        .as_ref()
        .map(|uid| format!("{uid}.{}", ctx.config.proxy.zone));
    let mut requeue_after = Duration::from_secs(15 * 60);
    if passthrough {
        requeue_after = refresh_proofs(&ctx, &proxy, canonical.as_deref()).await;
    }
    let connectors: Vec<Arc<Connector>> = ctx.connectors.get(&ns);
    let ads: Vec<Arc<ConnectorAdvertisement>> = ctx.advertisements.get(&ns);
    let connector_refs: Vec<&Connector> = connectors.iter().map(AsRef::as_ref).collect();
    let ad_refs: Vec<&ConnectorAdvertisement> = ads.iter().map(AsRef::as_ref).collect();
    let child = child_name(&name);
    let route = ctx
        .tcp_routes
        .store()
        .get(&ObjectRef::new(&child).within(&ns));
    let tls_route = ctx
        .tls_routes
        .store()
        .get(&ObjectRef::new(&child).within(&ns));
    let udp_route = ctx
        .udp_routes
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
            ("TLSRoute", tls_route.as_ref().map(|r| &r.metadata)),
            ("UDPRoute", udp_route.as_ref().map(|r| &r.metadata)),
        ],
    );
    let me = Claim::of(&*proxy);
    let claimed_by = |h: &str| ctx.hostnames.claimed_by(h, &me).map(|o| o.to_string());
    let verification = ctx.verifier.as_deref().map(|v| {
        let (ns, canonical) = (ns.clone(), canonical.clone());
        move |h: &str| v.state(&ns, h, canonical.as_deref())
    });
    let listen = match &port {
        Some(verdict) => Listen::Port(verdict),
        None => Listen::Tls(TlsNames {
            canonical: canonical.as_deref(),
            claimed_by: &claimed_by,
            verification: verification
                .as_ref()
                .map(|v| v as &dyn Fn(&str) -> crate::verify::Verification),
        }),
    };
    // TLSRoute's and UDPRoute's status have a TCPRoute's shape: read through one type.
    let as_tcp = |s: Option<serde_json::Value>| -> Option<TcpRouteStatus> {
        s.and_then(|v| serde_json::from_value(v).ok())
    };
    let tls_status = as_tcp(
        tls_route
            .as_ref()
            .and_then(|r| r.status.as_ref())
            .and_then(|s| serde_json::to_value(s).ok()),
    );
    let udp_status = as_tcp(
        udp_route
            .as_ref()
            .and_then(|r| r.status.as_ref())
            .and_then(|s| serde_json::to_value(s).ok()),
    );
    let route_status = if passthrough {
        tls_status.as_ref()
    } else {
        route
            .as_ref()
            .and_then(|r| r.status.as_ref())
            .or(udp_status.as_ref())
    };
    let d = desired(&Inputs {
        proxy: &proxy,
        connectors: &connector_refs,
        advertisements: &ad_refs,
        listen,
        name_taken_by: taken.as_deref(),
        route_status,
        config: &ctx.config.proxy,
        now: Timestamp::now(),
    });

    // Children first (status may only claim what exists).
    let shared = Shared::new(&d.gateway, &d.services, &d.slices);
    apply_shared(&ctx, &shared).await?;
    if let Some(r) = &d.route {
        apply(&ctx, ctx.tcp_routes.store(), r).await?;
    }
    if let Some(r) = &d.tls_route {
        apply(&ctx, ctx.tls_routes.store(), r).await?;
    }
    if let Some(r) = &d.udp_route {
        apply(&ctx, ctx.udp_routes.store(), r).await?;
    }
    let owner = &*proxy;
    prune::<TcpRoute, _>(&ctx, &ctx.tcp_routes, owner, &names(&d.route)).await?;
    prune::<TlsRoute, _>(&ctx, &ctx.tls_routes, owner, &names(&d.tls_route)).await?;
    prune::<UdpRoute, _>(&ctx, &ctx.udp_routes, owner, &names(&d.udp_route)).await?;
    prune_shared(&ctx, owner, &shared).await?;

    // The device's own certificate, for the names just decided (never the status a
    // device could write).
    let request = proxy
        .spec
        .tls
        .as_ref()
        .and_then(|t| t.certificate_request.as_deref());
    let issuer = ctx.config.certificates.as_ref();
    let proven = |h: &str| {
        crate::verify::exempt(h, &ctx.config.proxy.zone).is_some()
            || ctx.verifier.as_deref().is_some_and(|v| {
                matches!(
                    v.state(&ns, h, canonical.as_deref()),
                    crate::verify::Verification::Verified(_)
                )
            })
    };
    let verdict = certificate::check(request, &d.status.hostnames, &proven, issuer.is_some());
    let cert = ctx.device_certificates.observe(
        (&ns, &name),
        verdict,
        proxy.status.as_ref().and_then(|s| s.certificate.as_deref()),
        &issuer.map(|c| c.issuer.name()).unwrap_or_default(),
        issuer.map_or(Duration::ZERO, |c| c.renew_before),
    );
    let mut conditions = d.status.conditions.clone();
    if let Some((status, reason, message)) = &cert.condition {
        conditions.push(condition_at(
            certificate::CERTIFICATE_READY,
            *status,
            reason,
            message.clone(),
            proxy.metadata.generation,
            Timestamp::now(),
        ));
    }

    let old = proxy.status.as_ref().map(|s| s.conditions.as_slice());
    let exists = write_status(
        &ctx,
        owner,
        old.unwrap_or_default(),
        &conditions,
        |p: &TcpProxy| {
            let current = p.status.clone().unwrap_or_default();
            let mut merged = merged_conditions(&current.conditions, &conditions);
            if cert.condition.is_none() {
                merged.retain(|c| c.type_ != certificate::CERTIFICATE_READY);
            }
            let status = TcpProxyStatus {
                conditions: merged,
                port: d.status.port,
                hostnames: d.status.hostnames.clone(),
                certificate: cert.chain.clone(),
            };
            (status != current).then(|| status_patch(&status))
        },
    )
    .await?;
    if !exists {
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(requeue_after))
}

/// Looks a passthrough proxy's names outside the zone up again when due (as HTTPProxies'
/// names are: one proof serves both kinds); a changed verdict changes claims, so the
/// proxies that share a name decide again. Returns when to look next.
async fn refresh_proofs(ctx: &Ctx, proxy: &TcpProxy, canonical: Option<&str>) -> Duration {
    let mut next = Duration::from_secs(15 * 60);
    let Some(v) = &ctx.verifier else {
        return next;
    };
    let ns = proxy.namespace().unwrap_or_default();
    let names = proxy.spec.tls.iter().flat_map(|t| t.hostnames.iter());
    // Not told yet (new or changed): look at once, so the user who just published the
    // record does not wait.
    let told = proxy.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .all(|c| c.observed_generation == proxy.metadata.generation)
            && !s.conditions.is_empty()
    });
    let looks = names.clone().map(|h| v.refresh(&ns, h, canonical, !told));
    let changed = futures::future::join_all(looks)
        .await
        .into_iter()
        .any(|c| c);
    for h in names {
        if let Some(at) = v.next_look(&ns, h) {
            next = next.min(at.max(Duration::from_secs(1)));
        }
    }
    if changed {
        crate::send_claimants(&ctx.requeue, &ctx.tcp_requeue, ctx.hostnames.refresh(proxy));
    }
    next
}

/// The merge patch of a status: a port the proxy lost (or a certificate) is removed,
/// which a merge patch does only when told so with `null`.
fn status_patch(status: &TcpProxyStatus) -> Value {
    let mut v = json!(status);
    if status.port.is_none() {
        v["port"] = Value::Null;
    }
    if status.certificate.is_none() {
        v["certificate"] = Value::Null;
    }
    // Names lost are removed too (the agent asks for certificates for what is listed).
    if status.hostnames.is_empty() {
        v["hostnames"] = Value::Null;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_port_is_removed_from_status() {
        let lost = TcpProxyStatus {
            port: None,
            ..Default::default()
        };
        assert_eq!(
            status_patch(&lost),
            json!({"port": null, "certificate": null, "hostnames": null})
        );
        let kept = TcpProxyStatus {
            port: Some(20000),
            ..Default::default()
        };
        assert_eq!(
            status_patch(&kept),
            json!({"port": 20000, "certificate": null, "hostnames": null})
        );
    }
}
