//! One way to write status: start from what we know of the object (a cached copy, or a
//! fresh read), decide the new status from it, write guarded on its `resourceVersion`,
//! and on 409 read it again, decide again and retry. Several controllers own different
//! conditions of the same objects (the edge and the xDS reporter on Gateways, the
//! operator and the DNS server on Connectors); written this way none loses another's.

use std::fmt::Debug;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

/// Attempts before giving up on a status that keeps changing underneath.
const ATTEMPTS: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the status changed under every one of {0} attempts (409 Conflict)")]
    Conflicts(u32),
}

impl StatusError {
    /// Whether the object is gone (deleted meanwhile).
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::Api(kube::Error::Api(e)) if e.code == 404)
    }
}

/// Writes the status `decide` returns for the object as it is: first for `current` (a
/// cached copy, saving a read) or, without one, a fresh read. `decide` returns `None`
/// when the status is already right. Returns whether it wrote.
///
/// # Errors
/// The API's refusal, or [`StatusError::Conflicts`] after [`ATTEMPTS`] lost races.
pub async fn patch_status_with<K, F>(
    api: &Api<K>,
    current: Option<&K>,
    name: &str,
    manager: &str,
    mut decide: F,
) -> Result<bool, StatusError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    F: FnMut(&K) -> Option<Value>,
{
    let params = PatchParams {
        field_manager: Some(manager.to_owned()),
        ..Default::default()
    };
    let mut obj = match current {
        Some(o) => o.clone(),
        None => api.get_status(name).await?,
    };
    for _ in 0..ATTEMPTS {
        let Some(status) = decide(&obj) else {
            return Ok(false);
        };
        let patch = json!({
            "metadata": {"resourceVersion": obj.meta().resource_version},
            "status": status,
        });
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => obj = api.get_status(name).await?,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StatusError::Conflicts(ATTEMPTS))
}

/// Merges `conditions` into the object's `status.conditions` (transition times kept) and
/// writes them, with the other status fields in `rest` (written whenever given).
/// Returns whether it wrote.
///
/// # Errors
/// As [`patch_status_with`].
pub async fn patch_conditions<K>(
    api: &Api<K>,
    current: Option<&K>,
    name: &str,
    manager: &str,
    conditions: &[Condition],
    rest: Option<&Map<String, Value>>,
) -> Result<bool, StatusError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    patch_status_with(api, current, name, manager, |obj| {
        let mut merged = conditions_of(obj);
        let mut changed = false;
        for c in conditions {
            changed |= portway_api::set_condition(&mut merged, c.clone());
        }
        if !changed && rest.is_none() {
            return None;
        }
        let mut status = rest.cloned().unwrap_or_default();
        status.insert("conditions".into(), json!(merged));
        Some(Value::Object(status))
    })
    .await
}

/// `status.conditions` of any kind that has them.
pub fn conditions_of<K: Serialize>(obj: &K) -> Vec<Condition> {
    serde_json::to_value(obj)
        .ok()
        .and_then(|mut v| v.pointer_mut("/status/conditions").map(Value::take))
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_api::apis::standard::gateways::Gateway;
    use kube::api::PostParams;

    async fn server() -> (portway_apiserver::Server, kube::Client, tempfile::TempDir) {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut config = portway_apiserver::Config::new(dir.path().to_owned());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let server = portway_apiserver::Server::bind(config).await.unwrap();
        let client = crate::client(server.kubeconfig()).await.unwrap();
        (server, client, dir)
    }

    async fn gateway(api: &Api<Gateway>) -> Gateway {
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw"},
            "spec": {"gatewayClassName": "portway", "listeners": []},
        }))
        .unwrap();
        api.create(&PostParams::default(), &gw).await.unwrap()
    }

    /// Two writers, each owning one condition type, write concurrently many times: the
    /// Gateway ends with both, each at its writer's last value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_writers_of_gateway_conditions_lose_nothing() {
        let (server, client, _dir) = server().await;
        let api: Api<Gateway> = Api::namespaced(client, "default");
        let created = gateway(&api).await;
        const ROUNDS: usize = 40;
        let writer = |type_: &'static str, manager: &'static str| {
            let (api, created) = (api.clone(), created.clone());
            tokio::spawn(async move {
                for i in 0..ROUNDS {
                    let c =
                        portway_api::condition(type_, i % 2 == 0, "Round", format!("{i}"), None);
                    let rest = (type_ == "Programmed").then(|| {
                        let mut m = Map::new();
                        m.insert(
                            "addresses".into(),
                            json!([{"type": "IPAddress", "value": format!("10.0.0.{i}")}]),
                        );
                        m
                    });
                    // Every write starts from the stale copy of creation time, as a
                    // controller's cache may: the guard must catch it.
                    patch_conditions(&api, Some(&created), "gw", manager, &[c], rest.as_ref())
                        .await
                        .unwrap();
                }
            })
        };
        let (a, b) = (
            writer("Programmed", "portway-edge"),
            writer("XdsAccepted", "portway-xds"),
        );
        a.await.unwrap();
        b.await.unwrap();
        let conds = conditions_of(&api.get_status("gw").await.unwrap());
        let last = format!("{}", ROUNDS - 1);
        for t in ["Programmed", "XdsAccepted"] {
            let c = conds
                .iter()
                .find(|c| c.type_ == t)
                .unwrap_or_else(|| panic!("{t} lost: {conds:?}"));
            assert_eq!(c.message, last, "{t} is its writer's last value");
        }
        server.shutdown();
    }

    #[tokio::test]
    async fn unchanged_conditions_are_not_written_and_gone_objects_say_so() {
        let (server, client, _dir) = server().await;
        let api: Api<Gateway> = Api::namespaced(client, "default");
        gateway(&api).await;
        let c = portway_api::condition("Programmed", true, "Ok", "", None);
        let write = || patch_conditions(&api, None, "gw", "m", std::slice::from_ref(&c), None);
        assert!(write().await.unwrap(), "first write");
        assert!(!write().await.unwrap(), "nothing changed");
        let err = patch_conditions(&api, None, "nope", "m", &[c], None)
            .await
            .unwrap_err();
        assert!(err.is_not_found(), "{err}");
        server.shutdown();
    }
}
