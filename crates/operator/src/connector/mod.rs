//! Connector readiness (from its Lease, requeued at expiry) and acceptance, and
//! ConnectorAdvertisement acceptance.

pub mod desired;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use portway_api::{Connector, ConnectorAdvertisement, managers, set_condition};
use serde_json::json;

use crate::{Ctx, Error};

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(managers::OPERATOR.into()),
        ..Default::default()
    }
}

pub(crate) async fn reconcile_connector(c: Arc<Connector>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let ns = c.namespace().unwrap_or_default();
    let name = c.name_any();
    let class = ctx
        .classes
        .get(&ObjectRef::new(&c.spec.connector_class_name));
    let lease_name = c
        .status
        .as_ref()
        .and_then(|s| s.lease_ref.as_ref())
        .map_or(name.clone(), |l| l.name.clone());
    let lease = ctx.leases.get(&ObjectRef::new(&lease_name).within(&ns));
    let Some(decision) = desired::connector(
        &c,
        class.as_deref(),
        lease.as_deref(),
        &ctx.config.proxy.controller_name,
        Timestamp::now(),
    ) else {
        return Ok(Action::await_change());
    };
    let mut conditions = c
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    for cond in decision.conditions {
        changed |= set_condition(&mut conditions, cond);
    }
    if changed {
        // Guarded by resourceVersion: the DNS server writes conditions on connectors too.
        let api: Api<Connector> = Api::namespaced(ctx.client.clone(), &ns);
        let patch = json!({"metadata": {"resourceVersion": c.resource_version()}, "status": {"conditions": conditions}});
        api.patch_status(&name, &params(), &Patch::Merge(&patch))
            .await?;
        ctx.metrics.writes.inc();
    }
    Ok(match decision.requeue_after {
        Some(after) => Action::requeue(after),
        None => Action::requeue(Duration::from_secs(15 * 60)),
    })
}

pub(crate) async fn reconcile_advertisement(
    a: Arc<ConnectorAdvertisement>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = a.namespace().unwrap_or_default();
    let exists = ctx
        .connectors
        .get(&ObjectRef::new(&a.spec.connector_ref.name).within(&ns))
        .is_some();
    let mut conditions = a
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    if set_condition(&mut conditions, desired::advertisement(&a, exists)) {
        let api: Api<ConnectorAdvertisement> = Api::namespaced(ctx.client.clone(), &ns);
        api.patch_status(
            &a.name_any(),
            &params(),
            &Patch::Merge(&json!({"status": {"conditions": conditions}})),
        )
        .await?;
        ctx.metrics.writes.inc();
    }
    Ok(Action::requeue(Duration::from_secs(15 * 60)))
}
