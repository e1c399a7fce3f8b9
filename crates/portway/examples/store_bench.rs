//! The API server's store, SQLite beside etcd (a 3-member cluster on loopback), in one run:
//! write throughput (objects created per second by 32 clients at once) and watch latency
//! (from a create's request to the event at a watch on another connection).
//!
//! ```sh
//! cargo build --release -p portway --bins --examples
//! target/release/examples/store_bench [--objects 5000]
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)]

use portway_testkit::bench::{arg, percentile};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PostParams, WatchEvent, WatchParams};
use parking_lot::Mutex;
use serde_json::json;

struct Figures {
    per_second: f64,
    p50: Duration,
    p99: Duration,
}

async fn run(
    bin: &std::path::Path,
    dir: &std::path::Path,
    etcd: Option<String>,
    n: usize,
) -> Figures {
    let mut args = vec![
        "apiserver".to_owned(),
        "--data".into(),
        dir.display().to_string(),
        "--listen".into(),
        "127.0.0.1:0".into(),
    ];
    if let Some(e) = etcd {
        args.extend(["--etcd-servers".to_owned(), e]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_api, ready) = portway_testkit::start_quiet(bin, &args, "apiserver").await;
    let kubeconfig = ready["kubeconfig"].as_str().unwrap().to_owned();
    let client = || async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).unwrap();
        kube::Client::try_from(
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .unwrap(),
        )
        .unwrap()
    };
    let writer = client().await;
    let watcher = client().await;
    Api::<Namespace>::all(writer.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "bench"}})).unwrap(),
        )
        .await
        .unwrap();
    let sent: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let watch = {
        let (sent, seen) = (sent.clone(), seen.clone());
        let api: Api<Lease> = Api::namespaced(watcher, "bench");
        let rv = api
            .list(&Default::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        tokio::spawn(async move {
            let stream = api
                .watch(&WatchParams::default().timeout(290), &rv)
                .await
                .unwrap();
            let mut stream = std::pin::pin!(stream);
            while let Some(Ok(WatchEvent::Added(l))) = stream.next().await {
                let name = l.metadata.name.unwrap();
                if let Some(at) = sent.lock().get(&name) {
                    seen.lock().push(at.elapsed());
                }
            }
        })
    };
    let api: Api<Lease> = Api::namespaced(writer, "bench");
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, sent) = (api.clone(), sent.clone());
            async move {
                let name = format!("l{i}");
                sent.lock().insert(name.clone(), Instant::now());
                let lease: Lease = serde_json::from_value(
                    json!({"metadata": {"name": name}, "spec": {"holderIdentity": "bench"}}),
                )
                .unwrap();
                api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    watch.abort();
    let mut latencies = seen.lock().clone();
    assert_eq!(latencies.len(), n, "the watch missed events");
    latencies.sort();
    Figures {
        per_second: n as f64 / elapsed.as_secs_f64(),
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    }
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n = arg("--objects", 5_000);
    let bin = portway_testkit::bench::release_bin();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = run(&bin, &dir.path().join("sqlite"), None, n).await;
    let etcd = portway_testkit::etcd::Cluster::start(&dir.path().join("etcd"), 3)
        .await
        .unwrap();
    let on_etcd = run(
        &bin,
        &dir.path().join("etcd-api"),
        Some(etcd.endpoints().join(",")),
        n,
    )
    .await;
    println!(
        "machine: {} cores; {n} Leases created by 32 clients at once",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| store | objects/s | watch latency p50 / p99 |");
    println!("|---|---|---|");
    for (name, f) in [("SQLite", &sqlite), ("etcd, 3 members", &on_etcd)] {
        println!(
            "| {name} | {:.0} | {:.1} / {:.1} ms |",
            f.per_second,
            f.p50.as_secs_f64() * 1000.0,
            f.p99.as_secs_f64() * 1000.0
        );
    }
    println!(
        "etcd / SQLite: {:.2} x the throughput, {:.2} x the p50 watch latency",
        on_etcd.per_second / sqlite.per_second,
        on_etcd.p50.as_secs_f64() / sqlite.p50.as_secs_f64()
    );
}
