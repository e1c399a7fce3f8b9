//! `Operator::ready` against a real API server on loopback: it resolves once the caches
//! have synced, and never leaves a caller hanging once the operator has stopped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use portway_operator::{Config, Operator};

async fn apiserver(dir: &Path) -> (portway_apiserver::Server, kube::Client) {
    let mut config = portway_apiserver::Config::new(dir.to_path_buf());
    config.listen = "127.0.0.1:0".parse().unwrap();
    let server = portway_apiserver::Server::bind(config).await.unwrap();
    let client = portway_testkit::kube_client(server.kubeconfig().unwrap())
        .await
        .unwrap();
    (server, client)
}

fn config() -> Config {
    Config::new(vec!["127.0.0.1:4001".parse().unwrap()])
}

#[tokio::test]
async fn ready_once_the_caches_have_synced() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = apiserver(dir.path()).await;
    let operator = Operator::start(config(), client).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), operator.ready())
        .await
        .expect("ready within 30 s")
        .expect("not stopped");
    // Asking again after the fact answers at once.
    tokio::time::timeout(Duration::from_secs(1), operator.ready())
        .await
        .unwrap()
        .unwrap();
    operator.shutdown();
    operator.join().await;
    server.shutdown();
    server.join().await;
}

#[tokio::test]
async fn ready_answers_once_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = apiserver(dir.path()).await;
    let operator = Operator::start(config(), client).await.unwrap();
    operator.shutdown();
    // Synced or not by then, the answer comes: a stopped operator is never awaited forever.
    tokio::time::timeout(Duration::from_secs(10), operator.ready())
        .await
        .expect("ready answers after shutdown")
        .ok();
    operator.join().await;
    server.shutdown();
    server.join().await;
}
