//! The etcd cluster helper: three members keep quorum through a `kill -9` of one.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use portway_testkit::etcd::Cluster;
use portway_testkit::eventually;
use serde_json::{Value, json};

/// One request to etcd's JSON gateway (or `/health` when `body` is `None`).
async fn call(url: String, body: Option<Value>) -> Result<Value> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = match body {
        Some(b) => http::Request::post(&url).body(Full::from(b.to_string()))?,
        None => http::Request::get(&url).body(Full::default())?,
    };
    let resp = tokio::time::timeout(Duration::from_secs(2), async {
        let resp = client.request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .with_context(|| format!("{url}: no answer within 2 s"))??;
    let (status, body) = resp;
    if !status.is_success() {
        bail!("{url}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(serde_json::from_slice(&body)?)
}

async fn healthy(endpoint: &str) -> Result<()> {
    let v = call(format!("{endpoint}/health"), None).await?;
    if v["health"] != "true" {
        bail!("{endpoint}: {v}");
    }
    Ok(())
}

async fn put(endpoint: &str, key: &str, value: &str) -> Result<()> {
    let body = json!({"key": B64.encode(key), "value": B64.encode(value)});
    call(format!("{endpoint}/v3/kv/put"), Some(body)).await?;
    Ok(())
}

/// A linearizable read, so it sees every write acknowledged by any member.
async fn get(endpoint: &str, key: &str) -> Result<Option<String>> {
    let v = call(
        format!("{endpoint}/v3/kv/range"),
        Some(json!({"key": B64.encode(key)})),
    )
    .await?;
    let Some(value) = v["kvs"][0]["value"].as_str() else {
        return Ok(None);
    };
    Ok(Some(String::from_utf8(B64.decode(value)?)?))
}

#[tokio::test]
async fn three_members_keep_quorum_through_kill9_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut cluster = Cluster::start(dir.path(), 3).await.unwrap();
    eprintln!("3 etcd members healthy after {:?}", started.elapsed());
    let ep = cluster.endpoints();
    assert_eq!(ep.len(), 3);
    for e in &ep {
        healthy(e).await.unwrap();
    }

    put(&ep[0], "/portway/a", "one").await.unwrap();
    assert_eq!(
        get(&ep[1], "/portway/a").await.unwrap().as_deref(),
        Some("one")
    );

    cluster.kill9(0);
    assert!(healthy(&ep[0]).await.is_err(), "a killed member answers");
    // If m0 led, m1 and m2 elect a new leader first.
    for e in &ep[1..] {
        eventually(
            "a surviving member is healthy",
            Duration::from_secs(10),
            || healthy(e),
        )
        .await;
    }
    eventually(
        "two of three members accept a write",
        Duration::from_secs(10),
        || put(&ep[1], "/portway/b", "two"),
    )
    .await;
    assert_eq!(
        get(&ep[2], "/portway/b").await.unwrap().as_deref(),
        Some("two")
    );

    let restarted = Instant::now();
    cluster.restart(0).await.unwrap();
    eprintln!("m0 healthy {:?} after restart", restarted.elapsed());
    for e in &ep {
        healthy(e).await.unwrap();
    }
    // m0 caught up on the write it missed while it was down.
    assert_eq!(
        get(&ep[0], "/portway/b").await.unwrap().as_deref(),
        Some("two")
    );
    assert_eq!(
        get(&ep[0], "/portway/a").await.unwrap().as_deref(),
        Some("one")
    );
}
