//! Datum compatibility: datum-connect's own requests, replayed byte for byte against
//! Portway's API (from its source, datum-cloud/datum-connect `lib/src/tunnels.rs` and
//! `lib/src/heartbeat.rs`), and a device built as datum-connect builds its own (an iroh
//! endpoint serving `iroh-http-proxy/1` through `iroh-proxy-utils`' upstream proxy, allowing
//! only the host:port of its enabled tunnels, whoever dials).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use http::Method;
use http_body_util::BodyExt;
use iroh::EndpointId;
use iroh_proxy_utils::upstream::{AuthError, AuthHandler, UpstreamProxy};
use iroh_proxy_utils::{HttpProxyRequest, HttpProxyRequestKind};
use serde_json::{Value, json};

use super::*;

const ADMIN: &str = "admin-datum-0123456789abcdef";
/// A person of the `default` project with the agent role: who datum-connect acts as (it
/// signs in as its user and acts with that user's token).
const DANA: &str = "dana-datum-0123456789abcdef";

/// datum-connect's `AuthHandler`: the dialer's id is not asked; only a CONNECT or absolute
/// request to the host:port of an enabled tunnel passes.
struct Enabled(Arc<Mutex<HashSet<(String, u16)>>>);

impl AuthHandler for Enabled {
    async fn authorize<'a>(
        &'a self,
        _remote_id: EndpointId,
        req: &'a HttpProxyRequest,
    ) -> Result<(), AuthError> {
        let authority = match &req.kind {
            HttpProxyRequestKind::Tunnel { target } => target.clone(),
            HttpProxyRequestKind::Absolute { .. } => {
                req.kind.authority().map_err(|_| AuthError::BadRequest)?
            }
        };
        let wanted = (authority.host, authority.port);
        if self.0.lock().unwrap().contains(&wanted) {
            Ok(())
        } else {
            Err(AuthError::Forbidden)
        }
    }
}

/// One request as kube 2 sends it for datum-connect: the exact path (with kube's bare `?`
/// on lists, creates and patches) and body. The status and the answer's JSON.
async fn send(
    client: &kube::Client,
    method: Method,
    path: &str,
    content_type: &str,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = http::Request::builder().method(method).uri(path);
    if body.is_some() {
        req = req.header(http::header::CONTENT_TYPE, content_type);
    }
    let req = req
        .body(kube::client::Body::from(
            body.unwrap_or_default().as_bytes().to_vec(),
        ))
        .unwrap();
    let resp = client.send(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| json!({"unparsed": String::from_utf8_lossy(&bytes)}));
    (status, value)
}

const NA: &str = "/apis/networking.datumapis.com/v1alpha1/namespaces/default";
const HTTPPROXIES: &str = "/apis/networking.datumapis.com/v1alpha/namespaces/default/httpproxies";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
const JSON: &str = "application/json";
const MERGE: &str = "application/merge-patch+json";

/// The whole of datum-connect's conversation, then a public request through the edge to
/// the device it registered: class (made by an admin, as Datum's installation does),
/// connector with nulls, status patch, wait for the Lease the control plane makes,
/// renewal, proxy with nulls, advertisement, and the public URL from `status.hostnames`.
#[tokio::test]
async fn datum_connects_requests_replayed_serve_a_device() {
    let tokens = format!("{ADMIN},root,admin,*\n{DANA},dana,agent,default\n");
    let stack = Stack::start_with(Some(&tokens)).await;
    let admin_kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
    let admin = kube_client(&admin_kc).await.unwrap();
    let dana_kc = stack.dir.path().join("dana.kubeconfig");
    portway_testkit::kubeconfig_with_token(&admin_kc, DANA, "default", &dana_kc).unwrap();
    let dana = kube_client(&dana_kc).await.unwrap();

    // Datum's class, as its e2e tests write it: the controller name is defaulted.
    let (code, class) = send(
        &admin,
        Method::POST,
        "/apis/networking.datumapis.com/v1alpha1/connectorclasses?",
        JSON,
        Some(r#"{"apiVersion":"networking.datumapis.com/v1alpha1","kind":"ConnectorClass","metadata":{"name":"datum-connect"},"spec":{}}"#),
    )
    .await;
    assert_eq!(code, 201, "{class}");
    assert_eq!(
        class["spec"]["controllerName"], "networking.datumapis.com/datum-connect",
        "{class}"
    );

    // A connector whose class appears later is accepted on its own once it does.
    let accepted = |name: &'static str| {
        let admin = admin.clone();
        async move {
            let (_, c) = send(
                &admin,
                Method::GET,
                &format!("{NA}/connectors/{name}"),
                JSON,
                None,
            )
            .await;
            c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Accepted")
                .cloned()
                .unwrap_or_default()
        }
    };
    let (code, early) = send(
        &admin,
        Method::POST,
        &format!("{NA}/connectors?"),
        JSON,
        Some(r#"{"apiVersion":"networking.datumapis.com/v1alpha1","kind":"Connector","metadata":{"name":"early"},"spec":{"connectorClassName":"late"}}"#),
    )
    .await;
    assert_eq!(code, 201, "{early}");
    eventually("the class is not found yet", WAIT, || async {
        let c = accepted("early").await;
        ensure!(c["reason"] == "ConnectorClassNotFound", "{c}");
        Ok(())
    })
    .await;
    let (code, late) = send(
        &admin,
        Method::POST,
        "/apis/networking.datumapis.com/v1alpha1/connectorclasses?",
        JSON,
        Some(r#"{"apiVersion":"networking.datumapis.com/v1alpha1","kind":"ConnectorClass","metadata":{"name":"late"},"spec":{}}"#),
    )
    .await;
    assert_eq!(code, 201, "{late}");
    eventually("accepted once its class exists", WAIT, || async {
        let c = accepted("early").await;
        ensure!(c["status"] == "True", "{c}");
        Ok(())
    })
    .await;

    // The device: an iroh endpoint on Portway's relay, serving tunnels as datum-connect does.
    let relay: iroh::RelayUrl = stack.up.ready_str("relay").parse().unwrap();
    let ep = portway_discovery::endpoint::bind(&portway_discovery::endpoint::Config {
        relays: vec![relay],
        alpns: vec![portway_api::TUNNEL_ALPN.to_vec()],
        ..Default::default()
    })
    .await
    .unwrap();
    let enabled = Arc::new(Mutex::new(HashSet::new()));
    let _router = iroh::protocol::Router::builder(ep.clone())
        .accept(
            portway_api::TUNNEL_ALPN,
            UpstreamProxy::new(Enabled(enabled.clone())).unwrap(),
        )
        .spawn();
    // Portway's relay serves only known NodeIDs: the device gets in once its Connector
    // says who it is (iroh keeps trying meanwhile).
    let id = ep.id().to_string();

    // find_connector: by NodeID, then every connector; neither finds one.
    let (code, found) = send(
        &dana,
        Method::GET,
        &format!("{NA}/connectors?fieldSelector=status.connectionDetails.publicKey.id%3D{id}"),
        JSON,
        None,
    )
    .await;
    assert_eq!(
        (code, found["items"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{found}"
    );
    let (code, all) = send(&dana, Method::GET, &format!("{NA}/connectors?"), JSON, None).await;
    assert_eq!(code, 200, "{all}");

    // ensure_connector: explicit nulls, a generated name.
    let (code, created) = send(
        &dana,
        Method::POST,
        &format!("{NA}/connectors?"),
        JSON,
        Some(r#"{"apiVersion":"networking.datumapis.com/v1alpha1","kind":"Connector","metadata":{"generateName":"datum-connect-"},"spec":{"connectorClassName":"datum-connect","capabilities":null},"status":null}"#),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let connector = created["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(connector.starts_with("datum-connect-"), "{connector}");
    let addresses: Vec<Value> = ep
        .addr()
        .ip_addrs()
        .map(|a| json!({"address": a.ip().to_string(), "port": a.port()}))
        .collect();
    // serde_json without preserve_order: keys sorted, as datum-connect sends them.
    let status = json!({"status": {"connectionDetails": {"publicKey": {
        "addresses": addresses, "discoveryMode": "DNS",
        "homeRelay": stack.up.ready_str("relay"), "id": id},
        "type": "PublicKey"}}});
    let (code, patched) = send(
        &dana,
        Method::PATCH,
        &format!("{NA}/connectors/{connector}/status?"),
        MERGE,
        Some(&status.to_string()),
    )
    .await;
    assert_eq!(code, 200, "{patched}");

    // The heartbeat waits for the control plane to make the Lease and name it.
    let lease = eventually("the operator names the connector's Lease", WAIT, || async {
        let (code, c) = send(
            &dana,
            Method::GET,
            &format!("{NA}/connectors/{connector}"),
            JSON,
            None,
        )
        .await;
        ensure!(code == 200, "{c}");
        c["status"]["leaseRef"]["name"]
            .as_str()
            .map(str::to_owned)
            .context(format!("no leaseRef yet: {}", c["status"]))
    })
    .await;
    assert_eq!(lease, connector);
    let (code, l) = send(&dana, Method::GET, &format!("{LEASES}/{lease}"), JSON, None).await;
    assert_eq!(code, 200, "{l}");
    assert_eq!(l["spec"]["leaseDurationSeconds"], 30, "{l}");
    assert_eq!(
        l["metadata"]["ownerReferences"][0]["name"], connector,
        "owned by the connector: {l}"
    );
    let renew = || async {
        let now = k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ");
        let (code, l) = send(
            &dana,
            Method::PATCH,
            &format!("{LEASES}/{lease}?"),
            MERGE,
            Some(&format!(r#"{{"spec":{{"renewTime":"{now}"}}}}"#)),
        )
        .await;
        assert_eq!(code, 200, "{l}");
    };
    renew().await;
    eventually(
        "the connector is Ready once its Lease is renewed",
        WAIT,
        || async {
            let (_, c) = send(
                &dana,
                Method::GET,
                &format!("{NA}/connectors/{connector}"),
                JSON,
                None,
            )
            .await;
            let ready = c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .cloned()
                .unwrap_or_default();
            ensure!(ready["status"] == "True", "{ready}");
            Ok(())
        },
    )
    .await;

    // create_active: the proxy with nulls, then the same-named advertisement.
    let port = stack.origin.addr.port();
    let (code, proxy) = send(
        &dana,
        Method::POST,
        &format!("{HTTPPROXIES}?"),
        JSON,
        Some(&format!(r#"{{"apiVersion":"networking.datumapis.com/v1alpha","kind":"HTTPProxy","metadata":{{"annotations":{{"app.kubernetes.io/name":"my app"}},"generateName":"tunnel-"}},"spec":{{"hostnames":null,"rules":[{{"name":null,"matches":[{{"path":{{"type":"PathPrefix","value":"/"}}}}],"filters":null,"backends":[{{"endpoint":"http://127.0.0.1:{port}","connector":{{"name":"{connector}"}},"filters":null}}]}}]}}}}"#)),
    )
    .await;
    assert_eq!(code, 201, "{proxy}");
    let proxy = proxy["metadata"]["name"].as_str().unwrap().to_owned();
    let (code, ad) = send(
        &dana,
        Method::POST,
        &format!("{NA}/connectoradvertisements?"),
        JSON,
        Some(&format!(r#"{{"apiVersion":"networking.datumapis.com/v1alpha1","kind":"ConnectorAdvertisement","metadata":{{"name":"{proxy}"}},"spec":{{"connectorRef":{{"name":"{connector}"}},"layer4":[{{"name":"default","services":[{{"address":"127.0.0.1","ports":[{{"name":"tcp-{port}","port":{port},"protocol":"TCP"}}]}}]}}]}}}}"#)),
    )
    .await;
    assert_eq!(code, 201, "{ad}");
    enabled
        .lock()
        .unwrap()
        .insert(("127.0.0.1".to_owned(), port));

    // list_project: the advertisement by its connector, the proxies until the URL shows.
    let (code, ads) = send(
        &dana,
        Method::GET,
        &format!("{NA}/connectoradvertisements?fieldSelector=spec.connectorRef.name%3D{connector}"),
        JSON,
        None,
    )
    .await;
    assert_eq!(
        (code, ads["items"][0]["metadata"]["name"].as_str()),
        (200, Some(proxy.as_str())),
        "{ads}"
    );
    let hostname = eventually(
        "status.hostnames, Accepted, Programmed and CertificatesReady",
        WAIT,
        || async {
            renew().await;
            let (code, list) =
                send(&dana, Method::GET, &format!("{HTTPPROXIES}?"), JSON, None).await;
            ensure!(code == 200, "{list}");
            let p = list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["metadata"]["name"] == proxy.as_str())
                .context("the proxy is not listed")?;
            let is_true = |t: &str| {
                p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            // CertificatesReady too: the zone's wildcard (local CA) covers the name.
            ensure!(
                is_true("Accepted") && is_true("Programmed") && is_true("CertificatesReady"),
                "{}",
                p["status"]
            );
            // As datum-connect picks it: the first not starting with v4. or v6.
            p["status"]["hostnames"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .find(|h| !h.starts_with("v4.") && !h.starts_with("v6."))
                .map(str::to_owned)
                .context(format!("no hostnames yet: {}", p["status"]))
        },
    )
    .await;
    let proxies = Api::<HttpProxy>::namespaced(admin, "default");
    let canonical = proxies
        .get(&proxy)
        .await
        .unwrap()
        .status
        .unwrap()
        .canonical_hostname
        .unwrap();
    // status.addresses: where the gateway serving it listens, as it reported.
    eventually("status.addresses", WAIT, || async {
        let status = proxies.get(&proxy).await?.status.unwrap_or_default();
        ensure!(!status.addresses.is_empty(), "{status:?}");
        Ok(())
    })
    .await;
    assert_eq!(
        hostname, canonical,
        "the generated name is the canonical one"
    );

    // It opens https://<hostname>: through the edge, the tunnel, to the app.
    let https: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let ca = stack.data().join("pki/ca.crt");
    let body = eventually(
        "the public URL reaches the app on the device",
        WAIT,
        || async {
            let out = curl_https(https, &hostname, "/hello", &ca, &[]).await;
            ensure!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        },
    )
    .await;
    assert_eq!(body, format!("hello from {port}"));
    eprintln!("datum-connect replay: {hostname} answered {body:?}");

    // Behind Datum's Envoy configuration, the sidecar stands in for Datum's iroh-gateway:
    // its headers (`x-iroh-endpoint-id`, `x-datum-target-*`) on the internal listener, on
    // a plain request and on a CONNECT, reach the same app.
    let sidecar: SocketAddr = stack.up.ready_str("sidecar").parse().unwrap();
    let plain = exchange(
        sidecar,
        None,
        &format!("GET /hello HTTP/1.1\r\nHost: app\r\nx-iroh-endpoint-id: {id}\r\nx-datum-target-host: 127.0.0.1\r\nx-datum-target-port: {port}\r\nx-datum-target-proto: http\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(
        plain.starts_with("HTTP/1.1 200") && plain.ends_with(&format!("hello from {port}")),
        "{plain}"
    );
    let tunneled = exchange(
        sidecar,
        Some(&format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-iroh-endpoint-id: {id}\r\n\r\n")),
        "GET /hello HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        tunneled.starts_with("HTTP/1.1 200") && tunneled.ends_with(&format!("hello from {port}")),
        "{tunneled}"
    );
    drop(ep);
}

/// One HTTP/1.1 exchange on a new connection, after a CONNECT when one is given (its
/// answer must be 200): everything the server sent until it closed.
async fn exchange(addr: SocketAddr, connect: Option<&str>, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let talk = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if let Some(head) = connect {
            s.write_all(head.as_bytes()).await.unwrap();
            let mut answer = Vec::new();
            while !answer.ends_with(b"\r\n\r\n") {
                answer.push(s.read_u8().await.unwrap());
            }
            let answer = String::from_utf8_lossy(&answer);
            assert!(answer.starts_with("HTTP/1.1 200"), "CONNECT: {answer}");
        }
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8_lossy(&out).into_owned()
    };
    tokio::time::timeout(WAIT, talk)
        .await
        .expect("the sidecar answers in time")
}
