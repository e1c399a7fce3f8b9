//! One way to write a Gateway's status: read it fresh, merge our conditions into the
//! current list (transition times kept), write guarded on its `resourceVersion`, and on
//! 409 read again and retry. The route status writer and the xDS reporter each own some
//! condition types of the same Gateways; written this way neither loses the other's.

use gateway_api::apis::standard::gateways::Gateway;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
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

/// Merges `conditions` into the Gateway's status conditions and writes them, with the
/// other status fields in `rest` (written whenever given). Returns whether it wrote.
///
/// # Errors
/// The API's refusal, or [`StatusError::Conflicts`] after [`ATTEMPTS`] lost races.
pub async fn write_gateway(
    api: &Api<Gateway>,
    name: &str,
    manager: &str,
    conditions: &[Condition],
    rest: Option<&Map<String, Value>>,
) -> Result<bool, StatusError> {
    let params = PatchParams {
        field_manager: Some(manager.to_owned()),
        ..Default::default()
    };
    for _ in 0..ATTEMPTS {
        let g = api.get_status(name).await?;
        let mut merged = g
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let mut changed = false;
        for c in conditions {
            changed |= portway_api::set_condition(&mut merged, c.clone());
        }
        if !changed && rest.is_none() {
            return Ok(false);
        }
        let mut status = rest.cloned().unwrap_or_default();
        status.insert("conditions".into(), json!(merged));
        let patch = json!({
            "metadata": {"resourceVersion": g.metadata.resource_version},
            "status": status,
        });
        match api.patch_status(name, &params, &Patch::Merge(&patch)).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(StatusError::Conflicts(ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::PostParams;

    /// Two writers, each owning one condition type, write concurrently many times: the
    /// Gateway ends with both, each at its writer's last value.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_writers_of_gateway_conditions_lose_nothing() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let mut config = portway_apiserver::Config::new(dir.path().to_owned());
        config.listen = "127.0.0.1:0".parse().unwrap();
        let server = portway_apiserver::Server::bind(config).await.unwrap();
        let kc = kube::config::Kubeconfig::read_from(server.kubeconfig().unwrap()).unwrap();
        let client = kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap(),
        )
        .unwrap();
        let api: Api<Gateway> = Api::namespaced(client, "default");
        let gw: Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw"},
            "spec": {"gatewayClassName": "portway", "listeners": []},
        }))
        .unwrap();
        api.create(&PostParams::default(), &gw).await.unwrap();
        const ROUNDS: usize = 40;
        let writer = |type_: &'static str, manager: &'static str| {
            let api = api.clone();
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
                    write_gateway(&api, "gw", manager, &[c], rest.as_ref())
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
        let conds = api
            .get_status("gw")
            .await
            .unwrap()
            .status
            .unwrap()
            .conditions
            .unwrap();
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
}
