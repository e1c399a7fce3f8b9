//! The `XdsAccepted` condition on Gateways: whether the Envoys this server feeds accepted
//! the current configuration.

use std::time::Duration;

use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::Api;
use portway_kube::watch::is_ready;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::Envoys;
use crate::routes::Gateways;

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

/// The field manager of [`CONDITION`] (the edge owns the other Gateway conditions).
const MANAGER: &str = "portway-xds";

/// How often the cached Gateways are checked even without a change: a write that failed
/// (the API server was away) is made again.
const RESYNC: Duration = Duration::from_secs(30);

/// The Gateways of `class` whose [`CONDITION`] is not yet what `envoys` say, each with
/// the condition it should carry.
fn stale<'a>(
    class: &str,
    envoys: &Envoys,
    gateways: impl IntoIterator<Item = &'a Gateway>,
) -> Vec<(&'a Gateway, Condition)> {
    gateways
        .into_iter()
        .filter(|g| g.spec.gateway_class_name == class)
        .filter_map(|g| {
            let mut conditions = g
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let ours = condition(envoys, g.metadata.generation);
            portway_api::set_condition(&mut conditions, ours.clone()).then_some((g, ours))
        })
        .collect()
}

/// Writes [`CONDITION`] on the Gateways of `class` whenever the connected Envoys or their
/// NACKs change, or a Gateway changes in the route watcher's cache (created, or its
/// status replaced by another writer).
pub fn spawn_reporter(
    client: kube::Client,
    class: String,
    mut envoys: watch::Receiver<Envoys>,
    gateways: Gateways,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let mut changed = gateways.changed();
    tokio::spawn(async move {
        let mut resync = tokio::time::interval(RESYNC);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                r = envoys.changed() => if r.is_err() { return },
                r = changed.changed() => if r.is_err() { return },
                _ = resync.tick() => {}
            }
            changed.mark_unchanged();
            let current = envoys.borrow_and_update().clone();
            if !is_ready(gateways.store()) {
                continue;
            }
            let cached = gateways.store().state();
            for (g, ours) in stale(&class, &current, cached.iter().map(AsRef::as_ref)) {
                let (ns, name) = (g.namespace().unwrap_or_default(), g.name_any());
                let api: Api<Gateway> = Api::namespaced(client.clone(), &ns);
                let result =
                    portway_kube::patch_conditions(&api, Some(g), &name, MANAGER, &[ours], None)
                        .await;
                if let Err(e) = result {
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

    #[test]
    fn only_gateways_of_the_class_whose_condition_differs_are_stale() {
        let envoys: Envoys = [("e1".into(), Envoy::default())].into();
        let gateway = |name: &str, class: &str, generation: i64, carries: Option<i64>| {
            let conditions: Vec<Condition> = carries
                .map(|g| condition(&envoys, Some(g)))
                .into_iter()
                .collect();
            serde_json::from_value::<Gateway>(serde_json::json!({
                "metadata": {"name": name, "namespace": "p", "generation": generation},
                "spec": {"gatewayClassName": class, "listeners": []},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let gateways = [
            gateway("foreign", "istio", 1, None),
            gateway("new", "portway", 1, None),
            gateway("current", "portway", 1, Some(1)),
            gateway("edited", "portway", 2, Some(1)),
        ];
        let names: Vec<_> = stale("portway", &envoys, &gateways)
            .into_iter()
            .map(|(g, c)| (g.name_any(), c.observed_generation))
            .collect();
        assert_eq!(
            names,
            [("new".to_owned(), Some(1)), ("edited".to_owned(), Some(2))]
        );
        let none = Envoys::new();
        assert_eq!(
            stale("portway", &none, &gateways).len(),
            3,
            "no Envoy left: every Gateway of the class says Unknown"
        );
    }
}
