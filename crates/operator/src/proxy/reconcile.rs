//! The thin shell around [`super::desired`]: read stores, decide, apply what differs,
//! delete what is no longer wanted, write status.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use portway_api::{
    BackendTrafficPolicy, Connector, ConnectorAdvertisement, HttpProxy, HttpProxyStatus, labels,
    managers,
};
use portway_kube::watch::Index;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::desired::{Inputs, desired, merged_conditions};
use crate::hostnames::Claim;
use crate::{Ctx, Error};

/// Whether `have` already says everything `want` says (objects compared key by key,
/// arrays element by element), so applying `want` would change nothing.
pub fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| h.get(k).is_some_and(|hv| contains(hv, wv)) || wv.is_null()),
        (Value::Array(h), Value::Array(w)) => {
            h.len() == w.len() && h.iter().zip(w).all(|(a, b)| contains(a, b))
        }
        (h, w) => h == w,
    }
}

/// Server-side applies `want` unless the store's copy already matches.
pub(crate) async fn apply<K>(ctx: &Ctx, store: &Store<K>, want: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
{
    let name = want.name_any();
    let ns = want.namespace().unwrap_or_default();
    let want_value = serde_json::to_value(want)?;
    if let Some(have) = store.get(&ObjectRef::new(&name).within(&ns))
        && contains(&serde_json::to_value(have.as_ref())?, &want_value)
    {
        return Ok(());
    }
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply(managers::OPERATOR).force(),
        &Patch::Apply(&want_value),
    )
    .await?;
    ctx.metrics.writes.inc();
    Ok(())
}

/// Deletes the children of one kind that `owner` (a proxy of either kind) controls and
/// that are not in `keep`.
pub(crate) async fn prune<K, O>(
    ctx: &Ctx,
    by_owner: &Index<K>,
    owner: &O,
    keep: &HashSet<String>,
) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: Resource<Scope = kube::core::NamespaceResourceScope>,
    O: Resource,
{
    let ns = owner.namespace().unwrap_or_default();
    let uid = owner.uid().unwrap_or_default();
    let stale: Vec<String> = by_owner
        .get(&uid)
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(ns.as_str()))
        // The cache may already hold a newer version than the index saw.
        .filter(|o| o.owner_references().iter().any(|r| r.uid == uid))
        .filter(|o| {
            o.labels().get(labels::MANAGED_BY).map(String::as_str) == Some(managers::OPERATOR)
        })
        .map(|o| o.name_any())
        .filter(|n| !keep.contains(n))
        .collect();
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &ns);
    for name in stale {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                ctx.metrics.writes.inc();
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(crate) fn names<'a, K: Resource + 'a>(
    objs: impl IntoIterator<Item = &'a K>,
) -> HashSet<String> {
    objs.into_iter()
        .map(|o| o.meta().name.clone().unwrap_or_default())
        .collect()
}

/// The children both proxy kinds generate: a Gateway, and per backend a Service and its
/// EndpointSlices.
pub(crate) struct Shared<'a> {
    pub gateway: &'a Option<Gateway>,
    pub services: &'a [Service],
    pub slices: &'a [EndpointSlice],
}

impl<'a> Shared<'a> {
    pub fn new(
        gateway: &'a Option<Gateway>,
        services: &'a [Service],
        slices: &'a [EndpointSlice],
    ) -> Self {
        Self {
            gateway,
            services,
            slices,
        }
    }
}

/// Applies the shared children; before the route that names them, as status may only
/// claim what exists.
pub(crate) async fn apply_shared(ctx: &Ctx, shared: &Shared<'_>) -> Result<(), Error> {
    if let Some(g) = shared.gateway {
        apply(ctx, ctx.gateways.store(), g).await?;
    }
    for s in shared.services {
        apply(ctx, ctx.services.store(), s).await?;
    }
    for s in shared.slices {
        apply(ctx, ctx.slices.store(), s).await?;
    }
    Ok(())
}

/// Deletes what `owner` (a proxy of either kind) controls of the shared kinds that
/// `shared` no longer holds; after its route, which stops naming them first.
pub(crate) async fn prune_shared<O: Resource>(
    ctx: &Ctx,
    owner: &O,
    shared: &Shared<'_>,
) -> Result<(), Error> {
    prune::<Gateway, _>(ctx, &ctx.gateways, owner, &names(shared.gateway)).await?;
    prune::<EndpointSlice, _>(ctx, &ctx.slices, owner, &names(shared.slices)).await?;
    prune::<Service, _>(ctx, &ctx.services, owner, &names(shared.services)).await
}

pub(crate) async fn reconcile(proxy: Arc<HttpProxy>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if proxy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = proxy.namespace().unwrap_or_default();
    let name = proxy.name_any();
    let connectors: Vec<Arc<Connector>> = ctx.connectors.get(&ns);
    let ads: Vec<Arc<ConnectorAdvertisement>> = ctx.advertisements.get(&ns);
    let route = ctx.routes.store().get(&ObjectRef::new(&name).within(&ns));
    let gateway = ctx.gateways.store().get(&ObjectRef::new(&name).within(&ns));
    let me = Claim::of(&*proxy);
    let claimed_by = |h: &str| ctx.hostnames.claimed_by(h, &me).map(|o| o.to_string());
    let connector_refs: Vec<&Connector> = connectors.iter().map(AsRef::as_ref).collect();
    let ad_refs: Vec<&ConnectorAdvertisement> = ads.iter().map(AsRef::as_ref).collect();
    let addresses = gateway
        .as_ref()
        .and_then(|g| g.status.as_ref())
        .and_then(|s| s.addresses.clone())
        .unwrap_or_default();
    // Names outside the zone count only once proven; a changed verdict changes claims,
    // which may free or take a name another proxy waits for.
    let canonical = proxy
        .metadata
        .uid
        .as_ref()
        .map(|uid| format!("{uid}.{}", ctx.config.proxy.zone));
    let mut requeue_after = Duration::from_secs(15 * 60);
    if let Some(v) = &ctx.verifier {
        let mut changed = false;
        // A proxy whose status does not tell its current spec yet is looked up at once:
        // the user who just published the record and retries must not wait.
        let told = |h: &str| {
            proxy.status.as_ref().is_some_and(|s| {
                s.hostname_statuses.iter().any(|hs| {
                    hs.hostname.eq_ignore_ascii_case(h)
                        && hs.conditions.iter().any(|c| {
                            c.type_ == crate::verify::reasons::HOSTNAMES_VERIFIED
                                && c.observed_generation == proxy.metadata.generation
                        })
                })
            })
        };
        // All names at once: a proxy's lookups cost one timeout, not one per name.
        let looks = proxy
            .spec
            .hostnames
            .iter()
            .map(|h| v.refresh(&ns, h, canonical.as_deref(), !told(h)));
        changed |= futures::future::join_all(looks)
            .await
            .into_iter()
            .any(|c| c);
        for h in &proxy.spec.hostnames {
            if let Some(next) = v.next_look(&ns, h) {
                requeue_after = requeue_after.min(next.max(Duration::from_secs(1)));
            }
        }
        if changed {
            ctx.certs_wake.notify_one();
            crate::send_claimants(
                &ctx.requeue,
                &ctx.tcp_requeue,
                ctx.hostnames.refresh(&*proxy),
            );
        }
    }
    let verification = ctx.verifier.as_deref().map(|v| {
        let (ns, canonical) = (ns.clone(), canonical.clone());
        move |h: &str| v.state(&ns, h, canonical.as_deref())
    });
    let now = Timestamp::now();
    // A proven name the issuer has not taken up yet is being issued, not "not covered".
    let certificate = ctx.certificates.as_deref().map(|c| {
        let (ns, verifier) = (ns.clone(), ctx.verifier.clone());
        move |h: &str| {
            let said = c.condition(h, now);
            let proven = verifier.as_deref().is_some_and(|v| {
                matches!(
                    v.state(&ns, h, None),
                    crate::verify::Verification::Verified(_)
                )
            });
            if said.1 == crate::certs::reasons::NOT_COVERED && proven {
                (
                    false,
                    crate::certs::reasons::PENDING,
                    format!("the certificate for {h} is being issued"),
                )
            } else {
                said
            }
        }
    });
    let policies = ctx.access.get(&ns);
    let policy_refs: Vec<&portway_api::AccessPolicy> = policies.iter().map(AsRef::as_ref).collect();
    let guard = crate::access::route_policy(&proxy, &policy_refs);
    let d = desired(&Inputs {
        proxy: &proxy,
        connectors: &connector_refs,
        advertisements: &ad_refs,
        claimed_by: &claimed_by,
        route_status: route.as_ref().and_then(|r| r.status.as_ref()),
        gateway_addresses: &addresses,
        config: &ctx.config.proxy,
        certificate: certificate.as_ref().map(|c| c as &dyn Fn(&str) -> _),
        verification: verification.as_ref().map(|v| v as &dyn Fn(&str) -> _),
        access: guard.as_deref(),
        now,
    });

    // Children first (status may only claim what exists).
    let shared = Shared::new(&d.gateway, &d.services, &d.slices);
    apply_shared(&ctx, &shared).await?;
    if let Some(r) = &d.route {
        apply(&ctx, ctx.routes.store(), r).await?;
    }
    if let Some(p) = &d.policy {
        apply(&ctx, ctx.policies.store(), p).await?;
    }
    prune::<HttpRoute, _>(&ctx, &ctx.routes, &*proxy, &names(&d.route)).await?;
    prune::<BackendTrafficPolicy, _>(&ctx, &ctx.policies, &*proxy, &names(&d.policy)).await?;
    prune_shared(&ctx, &*proxy, &shared).await?;

    let old = proxy.status.as_ref().map(|s| s.conditions.as_slice());
    let exists = write_status(
        &ctx,
        &*proxy,
        old.unwrap_or_default(),
        &d.status.conditions,
        |p: &HttpProxy| {
            let current = p.status.clone().unwrap_or_default();
            let status = merged_status(&current, &d.status);
            (status != current).then(|| json!(status))
        },
    )
    .await?;
    if !exists {
        return Ok(Action::await_change());
    }
    Ok(Action::requeue(requeue_after))
}

/// Writes the status `decide` returns for a proxy of either kind as stored (`None`: it is
/// right already), and records one event for the conditions that changed from `old` to
/// `new`. Returns `false` when the proxy is gone (deleted meanwhile: its children go with
/// it).
pub(crate) async fn write_status<K, F>(
    ctx: &Ctx,
    proxy: &K,
    old: &[Condition],
    new: &[Condition],
    decide: F,
) -> Result<bool, Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    K: Clone + DeserializeOwned + std::fmt::Debug,
    F: FnMut(&K) -> Option<Value>,
{
    // Decided again from the object as stored if another writer got there first.
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &proxy.namespace().unwrap_or_default());
    let name = proxy.name_any();
    match portway_kube::patch_status_with(&api, Some(proxy), &name, managers::OPERATOR, decide)
        .await
    {
        Ok(true) => {
            ctx.metrics.writes.inc();
            ctx.events
                .conditions_changed(&proxy.object_ref(&()), old, new)
                .await;
            Ok(true)
        }
        Ok(false) => Ok(true),
        Err(e) if e.is_not_found() => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The decided status with the transition times of the current one kept where a
/// condition did not change.
fn merged_status(current: &HttpProxyStatus, decided: &HttpProxyStatus) -> HttpProxyStatus {
    let mut status = decided.clone();
    status.conditions = merged_conditions(&current.conditions, &status.conditions);
    // The summaries come and go with spec hostnames and the issuer: one not decided now
    // is stale, not someone else's.
    let summaries = [
        crate::verify::reasons::HOSTNAMES_VERIFIED,
        crate::certs::reasons::CERTIFICATES_READY,
    ];
    status.conditions.retain(|c| {
        !summaries.contains(&c.type_.as_str())
            || decided.conditions.iter().any(|d| d.type_ == c.type_)
    });
    for hs in &mut status.hostname_statuses {
        let old = current
            .hostname_statuses
            .iter()
            .find(|o| o.hostname == hs.hostname);
        hs.conditions = merged_conditions(
            old.map(|o| o.conditions.as_slice()).unwrap_or_default(),
            &hs.conditions,
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_compares_what_we_set() {
        let have = json!({"metadata": {"name": "a", "uid": "x", "labels": {"a": "1", "b": "2"}}, "spec": {"list": [{"x": 1, "d": 0}]}});
        assert!(contains(
            &have,
            &json!({"metadata": {"labels": {"a": "1"}}, "spec": {"list": [{"x": 1}]}})
        ));
        assert!(!contains(&have, &json!({"spec": {"list": [{"x": 2}]}})));
        assert!(!contains(
            &have,
            &json!({"spec": {"list": [{"x": 1}, {"x": 1}]}})
        ));
        assert!(!contains(&have, &json!({"spec": {"missing": 1}})));
        assert!(contains(&have, &json!({"status": null})));
    }
}
