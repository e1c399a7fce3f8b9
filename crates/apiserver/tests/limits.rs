//! The API server under hostile or early requests: deeply nested bodies and resource
//! versions from the future, against a real server on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portway_apiserver::{Config, Server, TlsMode};
use serde_json::{Value, json};

const TOKEN: &str = "limits-test-token";
const MIB3: usize = 3 * 1024 * 1024;

struct Api {
    _dir: tempfile::TempDir,
    server: Server,
    client: Client<HttpConnector, Full<Bytes>>,
}

async fn start() -> Api {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, format!("{TOKEN},admin,admin,*\n")).unwrap();
    let mut config = Config::new(dir.path().join("data"));
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.tls = TlsMode::PlainLoopback;
    config.tokens_file = Some(tokens);
    let server = Server::bind(config).await.unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    Api {
        _dir: dir,
        server,
        client,
    }
}

impl Api {
    async fn send(&self, method: &str, path: &str, ct: &str, body: Vec<u8>) -> (u16, Bytes) {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.server.url()))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("content-type", ct)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = self.client.request(req).await.unwrap();
        let code = resp.status().as_u16();
        (code, resp.into_body().collect().await.unwrap().to_bytes())
    }

    async fn json(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let (code, bytes) = self
            .send(
                method,
                path,
                "application/json",
                body.to_string().into_bytes(),
            )
            .await;
        (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn nested_bodies_are_refused_quickly_and_other_requests_go_on() {
    let api = start().await;
    let path = "/api/v1/namespaces";
    for ct in ["application/json", "application/yaml"] {
        let start = Instant::now();
        let (code, body) = api.send("POST", path, ct, vec![b'['; MIB3]).await;
        let took = start.elapsed();
        println!("3 MiB of `[` as {ct}: {code} in {took:?}");
        let status: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(code, 400, "{status}");
        assert_eq!(status["reason"], "BadRequest");
        assert_eq!(
            status["message"],
            "request body nested deeper than 100 levels"
        );
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    // Two large YAML bodies in flight do not hold up a small request.
    let big = "{a: ".repeat(MIB3 / 4 - 1).into_bytes();
    let wide = {
        let mut s = String::from("metadata: {name: wide, labels: {");
        let mut i = 0;
        while s.len() < MIB3 - 100 {
            s.push_str(&format!("k{i}: v, "));
            i += 1;
        }
        s.push_str("last: v}}\n");
        s.into_bytes()
    };
    let started = Instant::now();
    let nested = api.send("POST", path, "application/yaml", big);
    let wide = api.send("POST", path, "application/yaml", wide);
    let small = async {
        let start = Instant::now();
        let (code, _) = api
            .json("GET", "/api/v1/namespaces/default", json!({}))
            .await;
        (code, start.elapsed())
    };
    let ((nested_code, _), (wide_code, _), (small_code, small_took)) =
        tokio::join!(nested, wide, small);
    println!(
        "3 MiB `{{a: ` → {nested_code}, 3 MiB wide YAML → {wide_code}, both in {:?}; a GET alongside took {small_took:?}",
        started.elapsed()
    );
    assert_eq!(nested_code, 400);
    assert_eq!(small_code, 200);
    assert!(small_took < Duration::from_secs(2), "{small_took:?}");
}

#[tokio::test]
async fn a_watch_or_list_from_a_future_resource_version_waits_then_times_out() {
    let api = start().await;
    let (_, list) = api.json("GET", "/api/v1/namespaces", json!({})).await;
    let current: u64 = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let future = current + 1000;

    let start = Instant::now();
    let (code, status) = api
        .json(
            "GET",
            &format!(
                "/api/v1/namespaces?resourceVersion={future}&resourceVersionMatch=NotOlderThan"
            ),
            json!({}),
        )
        .await;
    let took = start.elapsed();
    assert_eq!(code, 504, "{status}");
    assert_eq!(status["reason"], "Timeout");
    assert_eq!(
        status["message"],
        format!("Timeout: Too large resource version: {future}, current: {current}")
    );
    assert_eq!(
        status["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );
    assert_eq!(status["details"]["retryAfterSeconds"], 1);
    assert!(
        took >= Duration::from_secs(2),
        "answered before waiting: {took:?}"
    );

    // A watch answers the same Status as an ERROR event, as Kubernetes' watch cache does.
    let (code, body) = api
        .send(
            "GET",
            &format!("/api/v1/namespaces?watch=true&resourceVersion={future}"),
            "",
            Vec::new(),
        )
        .await;
    assert_eq!(code, 200);
    let event: Value = serde_json::from_slice(body.split(|&b| b == b'\n').next().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&body)));
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 504);
    assert_eq!(
        event["object"]["details"]["causes"][0]["reason"],
        "ResourceVersionTooLarge"
    );

    // A revision the store reaches while the request waits is served normally.
    let next = api.server.store().revision() + 1;
    let path = format!("/api/v1/namespaces?watch=true&resourceVersion={next}&timeoutSeconds=2");
    let watch = api.send("GET", &path, "", Vec::new());
    let create = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ns = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "late"}});
        api.json("POST", "/api/v1/namespaces", ns).await
    };
    let ((code, body), (created, _)) = tokio::join!(watch, create);
    assert_eq!(created, 201);
    assert_eq!(code, 200);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.contains("ERROR"), "{text}");
}
