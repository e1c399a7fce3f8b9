//! Connector readiness (from its Lease, requeued at expiry) and acceptance, and
//! ConnectorAdvertisement acceptance.

pub mod desired;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use portway_api::{Connector, ConnectorAdvertisement, managers};

use crate::{Ctx, Error};

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
        &ctx.config.connector_controllers,
        Timestamp::now(),
    ) else {
        return Ok(Action::await_change());
    };
    // Guarded by resourceVersion: the DNS server writes conditions on connectors too.
    let api: Api<Connector> = Api::namespaced(ctx.client.clone(), &ns);
    ensure_lease(&ctx, &api, &c, class.is_some(), lease.is_some()).await?;
    if portway_kube::patch_conditions(
        &api,
        Some(&c),
        &name,
        managers::OPERATOR,
        &decision.conditions,
        None,
    )
    .await?
    {
        ctx.metrics.writes.inc();
        let old = c.status.as_ref().map(|s| s.conditions.as_slice());
        ctx.events
            .conditions_changed(
                &c.object_ref(&()),
                old.unwrap_or_default(),
                &decision.conditions,
            )
            .await;
    }
    let requeue = decision
        .requeue_after
        .unwrap_or(Duration::from_secs(15 * 60));
    match desired::collect(
        &c,
        lease.as_deref(),
        ctx.config.ephemeral_ttl,
        Timestamp::now(),
    ) {
        desired::Collect::Never => Ok(Action::requeue(requeue)),
        desired::Collect::After(after) => Ok(Action::requeue(requeue.min(after))),
        desired::Collect::Now => {
            tracing::info!(connector = %format!("{ns}/{name}"), ttl = ?ctx.config.ephemeral_ttl, "deleting an ephemeral connector whose device is gone");
            match api.delete(&name, &Default::default()).await {
                Ok(_) => {
                    let note = format!(
                        "deleted with its tunnels: ephemeral, and its device has been gone for {}s",
                        ctx.config.ephemeral_ttl.as_secs()
                    );
                    ctx.events
                        .record(
                            &c.object_ref(&()),
                            portway_kube::events::Kind::Normal,
                            "Collected",
                            "Delete",
                            note,
                        )
                        .await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            Ok(Action::await_change())
        }
    }
}

/// Creates the connector's heartbeat Lease and names it in `status.leaseRef` when its
/// agent has not ([`desired::lease_to_create`]): a Datum agent waits for both, then only
/// renews.
async fn ensure_lease(
    ctx: &Ctx,
    api: &Api<Connector>,
    c: &Connector,
    accepted: bool,
    exists: bool,
) -> Result<(), Error> {
    let named = c.status.as_ref().is_some_and(|s| s.lease_ref.is_some());
    if !accepted || named {
        return Ok(());
    }
    let name = c.name_any();
    if let Some(lease) = desired::lease_to_create(c, accepted, exists) {
        let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
            Api::namespaced(ctx.client.clone(), &c.namespace().unwrap_or_default());
        let pp = kube::api::PostParams {
            field_manager: Some(managers::OPERATOR.into()),
            ..Default::default()
        };
        match leases.create(&pp, &lease).await {
            Ok(_) => {
                ctx.metrics.writes.inc();
            }
            // The agent made it first: it is named after the connector all the same.
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let patch = serde_json::json!({"status": {"leaseRef": {"name": name}}});
    let pp = kube::api::PatchParams {
        field_manager: Some(managers::OPERATOR.into()),
        ..Default::default()
    };
    api.patch_status(&name, &pp, &kube::api::Patch::Merge(&patch))
        .await?;
    ctx.metrics.writes.inc();
    Ok(())
}

pub(crate) async fn reconcile_advertisement(
    a: Arc<ConnectorAdvertisement>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = a.namespace().unwrap_or_default();
    let exists = ctx
        .connectors
        .store()
        .get(&ObjectRef::new(&a.spec.connector_ref.name).within(&ns))
        .is_some();
    let api: Api<ConnectorAdvertisement> = Api::namespaced(ctx.client.clone(), &ns);
    if portway_kube::patch_conditions(
        &api,
        Some(&a),
        &a.name_any(),
        managers::OPERATOR,
        &[desired::advertisement(&a, exists, Timestamp::now())],
        None,
    )
    .await?
    {
        ctx.metrics.writes.inc();
    }
    Ok(Action::requeue(Duration::from_secs(15 * 60)))
}
