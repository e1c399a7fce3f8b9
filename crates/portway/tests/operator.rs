//! `portway operator` as a real process against the real API server: the objects it
//! writes and the conditions it sets, driven only through the API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use gateway_api::apis::standard::gatewayclasses::GatewayClass;
use gateway_api::apis::standard::gateways::Gateway;
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use portway_api::{
    BackendTrafficPolicy, Connector, ConnectorAdvertisement, ConnectorClass, HttpProxy,
    find_condition,
};
use portway_testkit::{Process, eventually, kube_client};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

struct Env {
    _dir: tempfile::TempDir,
    _apiserver: Process,
    _operator: Process,
    client: kube::Client,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let apiserver = Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await
    .unwrap();
    let kubeconfig = PathBuf::from(apiserver.ready_str("kubeconfig"));
    let operator = Process::start(
        "operator",
        bin(),
        [
            "operator",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--sidecar",
            "127.0.0.1:4001,127.0.0.2:4001",
        ],
    )
    .await
    .unwrap();
    let client = kube_client(&kubeconfig).await.unwrap();
    Env {
        _dir: dir,
        _apiserver: apiserver,
        _operator: operator,
        client,
    }
}

fn hex(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

impl Env {
    async fn project(&self, ns: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        if api.get_opt(ns).await.unwrap().is_none() {
            api.create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
        }
    }

    /// A connector that reported its id, with a lease renewed now, and an advertisement.
    async fn device(
        &self,
        ns: &str,
        name: &str,
        id: u8,
        labels: Value,
        port: i32,
        lease_secs: i32,
    ) {
        let conns: Api<Connector> = Api::namespaced(self.client.clone(), ns);
        let c = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"connectorClassName": "portway"},
        }))
        .unwrap();
        conns.create(&PostParams::default(), &c).await.unwrap();
        let status = json!({"status": {"connectionDetails": {"type": "PublicKey", "publicKey": {"id": hex(id), "homeRelay": "http://127.0.0.1:3340/"}}, "leaseRef": {"name": name}}});
        conns
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();
        self.renew(ns, name, lease_secs).await;
        let ads: Api<ConnectorAdvertisement> = Api::namespaced(self.client.clone(), ns);
        let ad = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-web")},
            "spec": {"connectorRef": {"name": name}, "layer4": [{"name": "web", "services": [{"address": "127.0.0.1", "ports": [{"port": port}]}]}]},
        }))
        .unwrap();
        ads.create(&PostParams::default(), &ad).await.unwrap();
    }

    async fn renew(&self, ns: &str, name: &str, secs: i32) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), ns);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name},
            "spec": {"holderIdentity": "agent", "leaseDurationSeconds": secs, "renewTime": MicroTime(Timestamp::now())},
        });
        leases
            .patch(
                name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&lease),
            )
            .await
            .unwrap();
    }

    async fn proxy(
        &self,
        ns: &str,
        name: &str,
        hostnames: &[&str],
        endpoint: &str,
        connector: Value,
    ) {
        let api: Api<HttpProxy> = Api::namespaced(self.client.clone(), ns);
        let p = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hostnames": hostnames, "rules": [{"backends": [{"endpoint": endpoint, "connector": connector}]}]},
        }))
        .unwrap();
        api.create(&PostParams::default(), &p).await.unwrap();
    }

    async fn condition(
        &self,
        ns: &str,
        proxy: &str,
        type_: &str,
    ) -> anyhow::Result<(String, String, String)> {
        let api: Api<HttpProxy> = Api::namespaced(self.client.clone(), ns);
        let p = api.get(proxy).await?;
        let conds = p.status.map(|s| s.conditions).unwrap_or_default();
        let c = find_condition(&conds, type_).with_context(|| format!("no {type_} yet"))?;
        ensure!(
            c.observed_generation == p.metadata.generation,
            "stale observedGeneration"
        );
        Ok((c.status.clone(), c.reason.clone(), c.message.clone()))
    }
}

fn header_sets(route: &HttpRoute) -> Vec<Vec<(String, String)>> {
    route
        .spec
        .rules
        .iter()
        .flatten()
        .flat_map(|r| r.backend_refs.iter().flatten())
        .map(|b| {
            b.filters
                .iter()
                .flatten()
                .flat_map(|f| f.request_header_modifier.iter())
                .flat_map(|m| m.set.iter().flatten())
                .map(|s| (s.name.clone(), s.value.clone()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn proxy_becomes_gateway_api_objects_with_headers_and_sidecar_endpoints() {
    let env = env().await;
    // The operator creates the default classes.
    let classes: Api<ConnectorClass> = Api::all(env.client.clone());
    assert_eq!(
        classes.get("portway").await.unwrap().spec.controller_name,
        "portway.dev/operator"
    );
    let gcs: Api<GatewayClass> = Api::all(env.client.clone());
    assert!(gcs.get("portway").await.is_ok());

    env.device("default", "laptop", 0xab, json!({}), 3000, 60)
        .await;
    env.proxy(
        "default",
        "web",
        &["web.example.com"],
        "http://127.0.0.1:3000",
        json!({"name": "laptop"}),
    )
    .await;
    let routes: Api<HttpRoute> = Api::namespaced(env.client.clone(), "default");
    let route = eventually("the route carries the datum headers", WAIT, || async {
        let r = routes.get("web").await?;
        ensure!(!header_sets(&r).is_empty(), "no backends yet");
        Ok(r)
    })
    .await;
    assert_eq!(
        header_sets(&route),
        vec![vec![
            ("datum-node-id".to_string(), hex(0xab)),
            ("datum-target-host".into(), "127.0.0.1".into()),
            ("datum-target-port".into(), "3000".into()),
            ("datum-target-proto".into(), "http".into()),
        ]]
    );
    let proxies: Api<HttpProxy> = Api::namespaced(env.client.clone(), "default");
    let proxy = proxies.get("web").await.unwrap();
    let canonical = format!("{}.portway.localhost", proxy.metadata.uid.clone().unwrap());
    assert_eq!(
        route.spec.hostnames.clone().unwrap(),
        ["web.example.com".to_string(), canonical.clone()]
    );
    let backend = route.spec.rules.as_ref().unwrap()[0]
        .backend_refs
        .as_ref()
        .unwrap()[0]
        .name
        .clone();
    let services: Api<Service> = Api::namespaced(env.client.clone(), "default");
    services.get(&backend).await.unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), "default");
    let slice = eventually("the slice lists the sidecars as ready", WAIT, || async {
        let list = slices
            .list(&ListParams::default().labels(&format!("kubernetes.io/service-name={backend}")))
            .await?;
        let s = list.items.into_iter().next().context("no slice")?;
        let ready: Vec<_> = s
            .endpoints
            .iter()
            .flatten()
            .map(|e| e.conditions.as_ref().and_then(|c| c.ready))
            .collect();
        ensure!(ready == [Some(true), Some(true)], "{ready:?}");
        Ok(s)
    })
    .await;
    let addrs: Vec<&str> = slice
        .endpoints
        .iter()
        .flatten()
        .map(|e| e.addresses[0].as_str())
        .collect();
    assert_eq!(addrs, ["127.0.0.1", "127.0.0.2"]);
    assert_eq!(slice.ports.unwrap()[0].port, Some(4001));
    let gateways: Api<Gateway> = Api::namespaced(env.client.clone(), "default");
    assert_eq!(
        gateways.get("web").await.unwrap().spec.gateway_class_name,
        "portway"
    );
    let btps: Api<BackendTrafficPolicy> = Api::namespaced(env.client.clone(), "default");
    assert!(
        btps.get("web")
            .await
            .unwrap()
            .spec
            .http_upgrade
            .iter()
            .any(|u| u.type_ == "CONNECT")
    );

    eventually(
        "status says accepted, metadata programmed, waiting for the gateway",
        WAIT,
        || async {
            ensure!(env.condition("default", "web", "Accepted").await?.0 == "True");
            ensure!(
                env.condition("default", "web", "ConnectorMetadataProgrammed")
                    .await?
                    .0
                    == "True"
            );
            let programmed = env.condition("default", "web", "Programmed").await?;
            ensure!(
                programmed.0 == "False" && programmed.1 == "Pending",
                "{programmed:?}"
            );
            Ok(())
        },
    )
    .await;
    assert_eq!(
        proxies
            .get("web")
            .await
            .unwrap()
            .status
            .unwrap()
            .canonical_hostname
            .as_deref(),
        Some(canonical.as_str())
    );

    // The gateway reports the route accepted: the proxy is Programmed.
    let accepted = json!({"status": {"parents": [{
        "controllerName": "portway.dev/operator",
        "parentRef": {"name": "web", "group": "gateway.networking.k8s.io", "kind": "Gateway"},
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
    }]}});
    routes
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&accepted))
        .await
        .unwrap();
    eventually("Programmed once the gateway accepts", WAIT, || async {
        ensure!(env.condition("default", "web", "Programmed").await?.0 == "True");
        Ok(())
    })
    .await;

    // Deleting the proxy deletes everything it generated.
    proxies
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually("generated objects are gone", WAIT, || async {
        ensure!(routes.get_opt("web").await?.is_none() && gateways.get_opt("web").await?.is_none());
        ensure!(
            btps.get_opt("web").await?.is_none() && services.get_opt(&backend).await?.is_none()
        );
        ensure!(slices.list(&ListParams::default()).await?.items.is_empty());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn unadvertised_backends_are_refused_and_selectors_fan_out() {
    let env = env().await;
    env.device("default", "laptop", 1, json!({"app": "web"}), 3000, 60)
        .await;
    env.device("default", "desktop", 2, json!({"app": "web"}), 3000, 60)
        .await;
    env.proxy(
        "default",
        "sneaky",
        &[],
        "http://127.0.0.1:22",
        json!({"name": "laptop"}),
    )
    .await;
    eventually(
        "a backend the device did not offer is refused",
        WAIT,
        || async {
            let (status, reason, message) = env.condition("default", "sneaky", "Accepted").await?;
            ensure!(
                status == "False" && reason == "BackendNotAdvertised",
                "{reason}"
            );
            ensure!(
                message.contains("http://127.0.0.1:22") && message.contains("laptop"),
                "{message}"
            );
            Ok(())
        },
    )
    .await;
    let routes: Api<HttpRoute> = Api::namespaced(env.client.clone(), "default");
    assert!(
        routes.get_opt("sneaky").await.unwrap().is_none(),
        "nothing is programmed for a refused proxy"
    );

    env.proxy(
        "default",
        "ghost",
        &[],
        "http://127.0.0.1:3000",
        json!({"name": "nobody"}),
    )
    .await;
    eventually("a missing connector is reported", WAIT, || async {
        ensure!(env.condition("default", "ghost", "Accepted").await?.1 == "ConnectorNotFound");
        Ok(())
    })
    .await;

    env.proxy(
        "default",
        "both",
        &[],
        "http://127.0.0.1:3000",
        json!({"selector": {"matchLabels": {"app": "web"}}}),
    )
    .await;
    let route = eventually(
        "a selector with two connectors gives two backends",
        WAIT,
        || async {
            let r = routes.get("both").await?;
            ensure!(
                header_sets(&r).len() == 2,
                "{} backends",
                header_sets(&r).len()
            );
            Ok(r)
        },
    )
    .await;
    let ids: Vec<String> = header_sets(&route).iter().map(|h| h[0].1.clone()).collect();
    assert_eq!(ids, [hex(2), hex(1)], "desktop, then laptop (by name)");

    // Advertising the port later fixes the refused proxy without touching it.
    let ads: Api<ConnectorAdvertisement> = Api::namespaced(env.client.clone(), "default");
    let more = json!({"spec": {"layer4": [{"name": "web", "services": [{"address": "127.0.0.1", "ports": [{"port": 3000}, {"port": 22}]}]}]}});
    ads.patch("laptop-web", &PatchParams::default(), &Patch::Merge(&more))
        .await
        .unwrap();
    eventually(
        "the proxy is accepted once the port is advertised",
        WAIT,
        || async {
            ensure!(env.condition("default", "sneaky", "Accepted").await?.0 == "True");
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_expired_lease_turns_the_backend_unready() {
    let env = env().await;
    env.device("default", "laptop", 1, json!({}), 3000, 2).await;
    env.proxy(
        "default",
        "web",
        &[],
        "http://127.0.0.1:3000",
        json!({"name": "laptop"}),
    )
    .await;
    let slices: Api<EndpointSlice> = Api::namespaced(env.client.clone(), "default");
    let ready = || async {
        let list = slices.list(&ListParams::default()).await?;
        let s = list.items.first().context("no slice yet")?;
        Ok::<_, anyhow::Error>(
            s.endpoints
                .iter()
                .flatten()
                .all(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true)),
        )
    };
    eventually("ready while the lease is fresh", WAIT, || async {
        env.renew("default", "laptop", 2).await;
        ensure!(ready().await?, "not ready");
        Ok(())
    })
    .await;
    // No more renewals: within the 2 s lease (plus the operator's reaction) it flips.
    let conns: Api<Connector> = Api::namespaced(env.client.clone(), "default");
    eventually(
        "unready after the lease expires",
        Duration::from_secs(6),
        || async {
            ensure!(!ready().await?, "still ready");
            let c = conns.get("laptop").await?;
            let r = find_condition(&c.status.unwrap().conditions, "Ready")
                .cloned()
                .context("no Ready")?;
            ensure!(
                r.status == "False" && r.reason == "ConnectorNotReady",
                "{r:?}"
            );
            Ok(())
        },
    )
    .await;
    env.renew("default", "laptop", 30).await;
    eventually("ready again after a renewal", WAIT, || async {
        ensure!(ready().await?, "not ready");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn hostnames_conflict_across_projects_and_are_released() {
    let env = env().await;
    for ns in ["p1", "p2"] {
        env.project(ns).await;
        env.device(
            ns,
            "laptop",
            if ns == "p1" { 1 } else { 2 },
            json!({}),
            3000,
            60,
        )
        .await;
    }
    env.proxy(
        "p1",
        "first",
        &["shared.example.com"],
        "http://127.0.0.1:3000",
        json!({"name": "laptop"}),
    )
    .await;
    let routes1: Api<HttpRoute> = Api::namespaced(env.client.clone(), "p1");
    eventually("the first proxy gets the hostname", WAIT, || async {
        let r = routes1.get("first").await?;
        ensure!(
            r.spec
                .hostnames
                .unwrap_or_default()
                .contains(&"shared.example.com".to_string())
        );
        Ok(())
    })
    .await;
    env.proxy(
        "p2",
        "second",
        &["shared.example.com", "own.example.com"],
        "http://127.0.0.1:3000",
        json!({"name": "laptop"}),
    )
    .await;
    let routes2: Api<HttpRoute> = Api::namespaced(env.client.clone(), "p2");
    let proxies2: Api<HttpProxy> = Api::namespaced(env.client.clone(), "p2");
    eventually(
        "the second proxy is refused, without naming the other project's proxy",
        WAIT,
        || async {
            let (status, reason, message) = env.condition("p2", "second", "Accepted").await?;
            ensure!(
                status == "False"
                    && reason == "HostnameInUse"
                    && message.contains("shared.example.com is already claimed by another project")
                    && !message.contains("p1"),
                "{status} {reason}: {message}"
            );
            ensure!(env.condition("p2", "second", "HostnamesInUse").await?.0 == "True");
            let p = proxies2.get("second").await?;
            let hs = p.status.unwrap().hostname_statuses;
            let shared = hs
                .iter()
                .find(|h| h.hostname == "shared.example.com")
                .context("no hostname status")?;
            ensure!(shared.conditions[0].status == "True");
            ensure!(
                routes2.get_opt("second").await?.is_none(),
                "a refused proxy gets no route"
            );
            Ok(())
        },
    )
    .await;
    // The older claimant goes away: the hostname passes to the other project.
    let proxies1: Api<HttpProxy> = Api::namespaced(env.client.clone(), "p1");
    proxies1
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        "the hostname is released to the other proxy",
        WAIT,
        || async {
            let hosts = routes2
                .get("second")
                .await?
                .spec
                .hostnames
                .unwrap_or_default();
            ensure!(
                hosts.contains(&"shared.example.com".to_string())
                    && hosts.contains(&"own.example.com".to_string()),
                "{hosts:?}"
            );
            ensure!(env.condition("p2", "second", "HostnamesInUse").await?.0 == "False");
            ensure!(env.condition("p2", "second", "Accepted").await?.0 == "True");
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn connectors_and_advertisements_get_accepted_conditions() {
    let env = env().await;
    let conns: Api<Connector> = Api::namespaced(env.client.clone(), "default");
    let orphan = serde_json::from_value(
        json!({"metadata": {"name": "odd"}, "spec": {"connectorClassName": "missing"}}),
    )
    .unwrap();
    conns.create(&PostParams::default(), &orphan).await.unwrap();
    let ads: Api<ConnectorAdvertisement> = Api::namespaced(env.client.clone(), "default");
    let ad = serde_json::from_value(json!({"metadata": {"name": "lonely"}, "spec": {"connectorRef": {"name": "nobody"}, "layer4": []}})).unwrap();
    ads.create(&PostParams::default(), &ad).await.unwrap();
    eventually("conditions explain what is missing", WAIT, || async {
        let c = conns.get("odd").await?;
        let conds = c.status.map(|s| s.conditions).unwrap_or_default();
        ensure!(
            find_condition(&conds, "Accepted")
                .is_some_and(|c| c.reason == "ConnectorClassNotFound"),
            "{conds:?}"
        );
        ensure!(
            find_condition(&conds, "Ready").is_some_and(|c| c.status == "False"),
            "{conds:?}"
        );
        let a = ads.get("lonely").await?;
        let conds = a.status.map(|s| s.conditions).unwrap_or_default();
        ensure!(
            find_condition(&conds, "Accepted").is_some_and(|c| c.reason == "ConnectorNotFound"),
            "{conds:?}"
        );
        Ok(())
    })
    .await;
    let present = serde_json::from_value(
        json!({"metadata": {"name": "nobody"}, "spec": {"connectorClassName": "portway"}}),
    )
    .unwrap();
    conns
        .create(&PostParams::default(), &present)
        .await
        .unwrap();
    eventually(
        "the advertisement is accepted once its connector exists",
        WAIT,
        || async {
            let a = ads.get("lonely").await?;
            let conds = a.status.map(|s| s.conditions).unwrap_or_default();
            ensure!(
                find_condition(&conds, "Accepted").is_some_and(|c| c.status == "True"),
                "{conds:?}"
            );
            Ok(())
        },
    )
    .await;
}
