//! Operator scale benchmark: N HTTPProxies across M projects against the real API server
//! and operator processes; reports convergence time, single-change latency and RSS.
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/operator_scale --proxies 10000 --projects 1000 [--etcd 3]
//! ```
//!
//! With `--etcd N` the API server keeps its objects in an etcd cluster of N members
//! started here (Debian's etcd 3.4) instead of SQLite.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use portway_testkit::bench::{arg, percentile};

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use gateway_api::apis::standard::httproutes::HttpRoute;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use portway_api::{Connector, ConnectorAdvertisement, HttpProxy, is_condition_true};
use serde_json::json;

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Objects of one kind in the API server.
async fn count<K>(client: &kube::Client) -> usize
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Api::<K>::all(client.clone())
        .list_metadata(&Default::default())
        .await
        .unwrap()
        .items
        .len()
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let proxies_n = arg("--proxies", 10_000);
    let projects = arg("--projects", 1_000).max(1);
    let changes = arg("--changes", 30);
    let bin = portway_testkit::bench::release_bin();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = arg("--etcd", 0);
    let etcd = if members > 0 {
        Some(
            portway_testkit::etcd::Cluster::start(&d.join("etcd"), members)
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let endpoints = etcd.as_ref().map(|e| e.endpoints().join(","));
    let mut api_args = vec![
        "apiserver",
        "--data",
        d.join("api").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    if let Some(e) = &endpoints {
        api_args.extend(["--etcd-servers".to_owned(), e.clone()]);
    }
    let api_args: Vec<&str> = api_args.iter().map(String::as_str).collect();
    let (apiserver, ready) = portway_testkit::start_quiet(&bin, &api_args, "apiserver").await;
    println!(
        "store: {}",
        endpoints.map_or("SQLite".to_owned(), |_| format!(
            "etcd, {members} member(s)"
        ))
    );
    let kubeconfig = ready["kubeconfig"].as_str().unwrap().to_owned();
    let (operator, _) = portway_testkit::start_quiet(
        &bin,
        &[
            "operator",
            "--kubeconfig",
            &kubeconfig,
            "--sidecar",
            "127.0.0.1:4001",
        ],
        "operator",
    )
    .await;
    let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    println!(
        "machine: {} cores; {proxies_n} proxies across {projects} projects",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let idle_rss = rss_mib(operator.pid());

    let t0 = Instant::now();
    futures::stream::iter(0..projects)
        .map(|p| {
            let client = client.clone();
            async move {
                let ns = format!("p{p}");
                let nss: Api<Namespace> = Api::all(client.clone());
                nss.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap()).await?;
                let conns: Api<Connector> = Api::namespaced(client.clone(), &ns);
                conns
                    .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "dev"}, "spec": {"connectorClassName": "portway"}})).unwrap())
                    .await?;
                let id = format!("{:064x}", p + 1);
                conns
                    .patch_status("dev", &PatchParams::default(), &Patch::Merge(json!({"status": {"connectionDetails": {"type": "PublicKey", "publicKey": {"id": id, "homeRelay": "http://127.0.0.1:3340/"}}, "leaseRef": {"name": "dev"}}})))
                    .await?;
                // Applied, not created: the operator makes a heartbeat Lease for an
                // accepted connector that names none yet, and may have just done so.
                let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
                leases
                    .patch("dev", &PatchParams::apply("bench").force(), &Patch::Apply(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": "dev"}, "spec": {"holderIdentity": "dev", "leaseDurationSeconds": 36000, "renewTime": MicroTime(Timestamp::now())}})))
                    .await?;
                let ads: Api<ConnectorAdvertisement> = Api::namespaced(client.clone(), &ns);
                ads.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "dev"}, "spec": {"connectorRef": {"name": "dev"}, "layer4": [{"name": "web", "services": [{"address": "127.0.0.1", "ports": [{"port": 3000}]}]}]}})).unwrap())
                    .await?;
                Ok::<_, kube::Error>(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    futures::stream::iter(0..proxies_n)
        .map(|i| {
            let client = client.clone();
            async move {
                let ns = format!("p{}", i % projects);
                let api: Api<HttpProxy> = Api::namespaced(client, &ns);
                let p = serde_json::from_value(json!({
                    "metadata": {"name": format!("web{i}")},
                    "spec": {"hostnames": [format!("app{i}.example.com")], "rules": [{"backends": [{"endpoint": "http://127.0.0.1:3000", "connector": {"name": "dev"}}]}]},
                }))
                .unwrap();
                api.create(&PostParams::default(), &p).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let created = t0.elapsed();
    let revision = || {
        let client = client.clone();
        async move {
            let list = Api::<Namespace>::all(client)
                .list_metadata(&kube::api::ListParams::default().limit(1))
                .await
                .unwrap();
            list.metadata
                .resource_version
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        }
    };
    let rv_created = revision().await;
    // Convergence seen through watches, as a controller would: polling with full lists
    // would itself load the API server (20 000 objects serialised per poll) and slow what
    // it measures.
    use kube::runtime::watcher::{self, Event};
    enum Seen {
        Proxy(Event<HttpProxy>),
        Route(Event<HttpRoute>),
    }
    let proxies_seen = watcher::watcher(Api::<HttpProxy>::all(client.clone()), Default::default())
        .map_ok(Seen::Proxy);
    let routes_seen = watcher::watcher(Api::<HttpRoute>::all(client.clone()), Default::default())
        .map_ok(Seen::Route);
    let mut seen = std::pin::pin!(futures::stream::select(proxies_seen, routes_seen));
    let key = |m: &kube::api::ObjectMeta| (m.namespace.clone(), m.name.clone());
    let mut accepted = std::collections::HashSet::new();
    let mut routed = std::collections::HashSet::new();
    while accepted.len() < proxies_n || routed.len() < proxies_n {
        match seen.next().await.unwrap().unwrap() {
            Seen::Proxy(Event::Apply(p) | Event::InitApply(p)) => {
                let ok = p
                    .status
                    .as_ref()
                    .is_some_and(|s| is_condition_true(&s.conditions, "Accepted"));
                if ok {
                    accepted.insert(key(&p.metadata));
                } else {
                    accepted.remove(&key(&p.metadata));
                }
            }
            Seen::Proxy(Event::Delete(p)) => {
                accepted.remove(&key(&p.metadata));
            }
            Seen::Route(Event::Apply(r) | Event::InitApply(r)) => {
                routed.insert(key(&r.metadata));
            }
            Seen::Route(Event::Delete(r)) => {
                routed.remove(&key(&r.metadata));
            }
            Seen::Proxy(_) | Seen::Route(_) => {}
        }
    }
    let converged = t0.elapsed();
    let rv_converged = revision().await;
    let rss_after_sync = rss_mib(operator.pid());

    // One change at a time: a new hostname on one proxy, until its route shows it.
    let mut latencies = Vec::new();
    for n in 0..changes {
        let i = (n * 7919) % proxies_n;
        let ns = format!("p{}", i % projects);
        let proxies: Api<HttpProxy> = Api::namespaced(client.clone(), &ns);
        let ns_routes: Api<HttpRoute> = Api::namespaced(client.clone(), &ns);
        let host = format!("changed{n}-app{i}.example.com");
        let start = Instant::now();
        proxies
            .patch(
                &format!("web{i}"),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"hostnames": [host]}})),
            )
            .await
            .unwrap();
        loop {
            let r = ns_routes.get(&format!("web{i}")).await.unwrap();
            if r.spec.hostnames.unwrap_or_default().contains(&host) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(start.elapsed());
    }
    latencies.sort();
    let rss_after_changes = rss_mib(operator.pid());
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| create {projects} projects (connector, lease, advertisement) + {proxies_n} proxies | {:.1} s |",
        created.as_secs_f64()
    );
    println!(
        "| all proxies Accepted and routed (from first write) | {:.1} s |",
        converged.as_secs_f64()
    );
    println!(
        "| API writes: to create / to converge (per proxy) | {rv_created} / {} ({:.1}) |",
        rv_converged - rv_created,
        (rv_converged - rv_created) as f64 / proxies_n as f64
    );
    println!(
        "| one change → route updated (n={changes}) | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().unwrap().as_secs_f64() * 1e3
    );
    println!(
        "| operator RSS: idle / after sync / after {changes} changes | {idle_rss:.0} / {rss_after_sync:.0} / {rss_after_changes:.0} MiB |"
    );
    let objects = count::<Namespace>(&client).await
        + count::<Connector>(&client).await
        + count::<Lease>(&client).await
        + count::<ConnectorAdvertisement>(&client).await
        + count::<HttpProxy>(&client).await
        + count::<HttpRoute>(&client).await
        + count::<gateway_api::apis::standard::gateways::Gateway>(&client).await
        + count::<k8s_openapi::api::core::v1::Service>(&client).await
        + count::<k8s_openapi::api::discovery::v1::EndpointSlice>(&client).await
        + count::<portway_api::BackendTrafficPolicy>(&client).await
        + count::<k8s_openapi::api::core::v1::Event>(&client).await
        + count::<k8s_openapi::api::events::v1::Event>(&client).await;
    let rss = rss_mib(apiserver.pid());
    println!(
        "| API server RSS after the run / per stored object ({objects} objects) | {rss:.0} MiB / {:.1} KiB |",
        rss * 1024.0 / objects as f64
    );
}
