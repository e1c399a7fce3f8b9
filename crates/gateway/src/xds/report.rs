//! The `XdsAccepted` condition on Gateways: whether the Envoys this server feeds accepted
//! the current configuration.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Envoys;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::{CLUSTER_TYPE, Envoy};

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
}
