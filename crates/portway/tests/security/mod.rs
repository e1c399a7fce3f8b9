//! The security suite: every rule of who may do what, attacked with real processes — two
//! projects, three joined devices, people's tokens, clients through the edge, curl at the
//! API server, half-sent requests — each attack failing with the error a user would see.
//! Part of the e2e binary (one build, one `portway up`).

use super::*;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use portway_api::{Connector, ConnectorAdvertisement};
use portway_testkit::kubeconfig_with_token;

const ADMIN: &str = "admin-0123456789abcdef0123";
/// A person with the agent role in team-b.
const BOB: &str = "bob-0123456789abcdef012345";
/// A person with the agent role in team-a.
const MALLORY: &str = "mallory-0123456789abcdef01";
/// A person who may read team-a.
const VERA: &str = "vera-0123456789abcdef012345";

/// The API's refusal of a write, as `(code, message)`.
fn refusal<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected the API to refuse, got {other:?}"),
    }
}

async fn portway(args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(bin())
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct World {
    stack: Stack,
    admin_kc: PathBuf,
    admin: kube::Client,
    /// Device A's second app, which A never offers.
    secret: Origin,
    origin_b: Origin,
    /// team-b's one-use join token, spent by device-b.
    team_b_token: String,
    _devices: Vec<Process>,
}

impl World {
    async fn start() -> Self {
        let tokens = format!(
            "{ADMIN},root,admin,*\n{BOB},bob,agent,team-b\n{MALLORY},mallory,agent,team-a\n{VERA},vera,viewer,team-a\n"
        );
        let stack = Stack::start_with(Some(&tokens)).await;
        let admin_kc = PathBuf::from(stack.up.ready_str("kubeconfig"));
        let admin = kube_client(&admin_kc).await.unwrap();
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
        for ns in ["team-a", "team-b"] {
            namespaces
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
                )
                .await
                .unwrap();
        }
        let join = |project: &'static str, uses: &'static str| {
            let kc = admin_kc.clone();
            async move {
                let (ok, token, err) = portway(&[
                    "token",
                    "create",
                    "--project",
                    project,
                    "--uses",
                    uses,
                    "--kubeconfig",
                    kc.to_str().unwrap(),
                ])
                .await;
                assert!(ok && token.starts_with("pwj."), "{token}\n{err}");
                token
            }
        };
        let (team_a, team_b) = (join("team-a", "2").await, join("team-b", "1").await);
        let origin_b = Origin::spawn().await.unwrap();
        let a_web = format!(
            "web=127.0.0.1:{},http,a.localhost,app.a.localhost",
            stack.origin.addr.port()
        );
        let b_web = format!("web=127.0.0.1:{},http,b.localhost", origin_b.addr.port());
        let mut devices = Vec::new();
        for (name, project, token, tunnel) in [
            ("device-a", "team-a", &team_a, Some(a_web)),
            ("device-c", "team-a", &team_a, None),
            ("device-b", "team-b", &team_b, Some(b_web)),
        ] {
            let state = stack.dir.path().join(name);
            let relay = stack.up.ready_str("relay");
            let mut args = vec![
                "agent".to_owned(),
                "--kubeconfig".into(),
                admin_kc.display().to_string(),
                "--join-token".into(),
                token.clone(),
                "--project".into(),
                project.into(),
                "--name".into(),
                name.into(),
                "--state-dir".into(),
                state.display().to_string(),
                "--relay".into(),
                relay,
            ];
            if let Some(t) = tunnel {
                args.extend(["--tunnel".into(), t]);
            }
            devices.push(Process::start(name, bin(), args).await.unwrap());
        }
        Self {
            stack,
            admin_kc,
            admin,
            secret: Origin::spawn().await.unwrap(),
            origin_b,
            team_b_token: team_b,
            _devices: devices,
        }
    }

    /// A client with a joined device's own credential.
    async fn device(&self, name: &str) -> kube::Client {
        let kc = self.stack.dir.path().join(name).join("device.kubeconfig");
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&kc).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "{} must be private", kc.display());
        kube_client(&kc).await.unwrap()
    }

    /// A client with a person's token.
    async fn person(&self, token: &str, ns: &str) -> kube::Client {
        let kc = self
            .stack
            .dir
            .path()
            .join(format!("{ns}-{}.kubeconfig", &token[..3]));
        kubeconfig_with_token(&self.admin_kc, token, ns, &kc).unwrap();
        kube_client(&kc).await.unwrap()
    }

    async fn connector(&self, ns: &str, name: &str) -> Connector {
        Api::<Connector>::namespaced(self.admin.clone(), ns)
            .get(name)
            .await
            .unwrap()
    }

    /// Waits for a proxy's `Accepted` condition to have `status`, and returns it.
    async fn accepted(
        &self,
        ns: &str,
        name: &str,
        status: &str,
    ) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
        let api: Api<HttpProxy> = Api::namespaced(self.admin.clone(), ns);
        eventually(&format!("{ns}/{name} Accepted={status}"), WAIT, || async {
            let p = api.get(name).await?;
            let c = p
                .status
                .iter()
                .flat_map(|s| s.conditions.iter())
                .find(|c| c.type_ == "Accepted")
                .cloned()
                .context("no Accepted condition yet")?;
            ensure!(c.status == status, "{c:?}");
            Ok(c)
        })
        .await
    }

    async fn serves(&self, host: &str, origin: &Origin) {
        let want = format!("hello from {}", origin.addr.port());
        // Names under the zone have the zone's certificate: plain HTTP is redirected, so
        // they are asked over HTTPS, verified against the local CA.
        let https: SocketAddr = self.stack.up.ready_str("https").parse().unwrap();
        let ca = self.stack.data().join("pki/ca.crt");
        eventually(&format!("{host} serves {want}"), WAIT, || async {
            if host.ends_with(".portway.localhost") {
                let out = curl_https(https, host, "/hello", &ca, &[]).await;
                let body = String::from_utf8_lossy(&out.stdout);
                ensure!(
                    body == want,
                    "{body}{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                return Ok(());
            }
            let (status, body) = self.stack.get(host, "/hello").await?;
            ensure!(status == StatusCode::OK && body == want, "{status}: {body}");
            Ok(())
        })
        .await;
    }
}

fn proxy(
    name: &str,
    hosts: &[&str],
    connector: &str,
    port: u16,
    filters: serde_json::Value,
) -> HttpProxy {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"hostnames": hosts, "rules": [{"backends": [{
            "endpoint": format!("http://127.0.0.1:{port}"),
            "connector": {"name": connector},
            "filters": filters,
        }]}]},
    }))
    .unwrap()
}

#[tokio::test]
async fn attacks_on_isolation_are_refused() {
    let w = World::start().await;
    w.serves("a.localhost", &w.stack.origin).await;
    w.serves("b.localhost", &w.origin_b).await;
    let a_id = w
        .connector("team-a", "device-a")
        .await
        .endpoint_id()
        .unwrap()
        .to_owned();
    let c_id = w
        .connector("team-a", "device-c")
        .await
        .endpoint_id()
        .unwrap()
        .to_owned();
    let a_port = w.stack.origin.addr.port();
    let secret_port = w.secret.addr.port();
    let bob = w.person(BOB, "team-b").await;
    let mallory = w.person(MALLORY, "team-a").await;
    let device_c = w.device("device-c").await;
    let device_b = w.device("device-b").await;

    access_policies_stay_in_their_project(&w, &bob, &device_b).await;
    a_device_guards_only_its_own_proxies(&w, &device_c).await;

    // 1. Cross-project routing through header filters: B's proxy, B's connector, but a
    //    backend filter naming A's device and port.
    let steal = proxy(
        "steal",
        &["steal.localhost"],
        "device-b",
        w.origin_b.addr.port(),
        json!([{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
            {"name": "datum-node-id", "value": a_id}, {"name": "datum-target-port", "value": a_port.to_string()}]}}]),
    );
    let (code, msg) = refusal(
        Api::<HttpProxy>::namespaced(bob.clone(), "team-b")
            .create(&PostParams::default(), &steal)
            .await,
    );
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.contains("spec.rules[0].backends[0].filters[0].requestHeaderModifier.set[0].name")
            && msg.contains("\"datum-node-id\" is reserved"),
        "{msg}"
    );
    let (status, _) = w.stack.get("steal.localhost", "/hello").await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    // A filter that changes Host would make Envoy refuse the route configuration every
    // project shares: refused at admission.
    let freeze = proxy(
        "freeze",
        &["freeze.localhost"],
        "device-b",
        w.origin_b.addr.port(),
        json!([{"type": "ResponseHeaderModifier", "responseHeaderModifier": {"remove": ["Host"]}}]),
    );
    let (code, msg) = refusal(
        Api::<HttpProxy>::namespaced(bob.clone(), "team-b")
            .create(&PostParams::default(), &freeze)
            .await,
    );
    assert_eq!(code, 422, "{msg}");
    assert!(
        msg.contains("spec.rules[0].backends[0].filters[0].responseHeaderModifier.remove[0]"),
        "{msg}"
    );

    // 2. Allow-list injection: an advertisement for A's connector on a port A never
    //    offered, by a person of A's project and by another device of A's project.
    let inject: ConnectorAdvertisement = serde_json::from_value(json!({
        "metadata": {"name": "inject"},
        "spec": {"connectorRef": {"name": "device-a"}, "layer4": [{"name": "ssh", "services": [
            {"address": "127.0.0.1", "ports": [{"port": secret_port, "protocol": "TCP"}]}]}]},
    }))
    .unwrap();
    for (who, client) in [("mallory", &mallory), ("device-c", &device_c)] {
        let (code, msg) = refusal(
            Api::<ConnectorAdvertisement>::namespaced(client.clone(), "team-a")
                .create(&PostParams::default(), &inject)
                .await,
        );
        assert_eq!(code, 403, "{who}: {msg}");
        assert!(msg.contains("device-a"), "{who}: {msg}");
    }
    // A proxy to the unoffered port is refused by the operator...
    let reach = proxy(
        "reach",
        &["reach.localhost"],
        "device-a",
        secret_port,
        json!([]),
    );
    Api::<HttpProxy>::namespaced(mallory.clone(), "team-a")
        .create(&PostParams::default(), &reach)
        .await
        .unwrap();
    let c = w.accepted("team-a", "reach", "False").await;
    assert_eq!(c.reason, "BackendNotAdvertised", "{c:?}");
    // The same for a public TCP port: refused by the operator unless advertised; a device
    // may not name another device's connector, nor another project's; and what routes a
    // port to a device (TCPRoutes, and the EndpointSlices whose annotation names the
    // device) is written by the operator alone.
    let tcp = |connector: &str| -> portway_api::TcpProxy {
        serde_json::from_value(json!({"metadata": {"name": "reach-tcp"}, "spec": {"backends": [
            {"endpoint": format!("tcp://127.0.0.1:{secret_port}"), "connector": {"name": connector}}]}}))
        .unwrap()
    };
    for (who, client, ns) in [
        ("device-c", &device_c, "team-a"),
        ("device-b", &device_b, "team-a"),
    ] {
        let (code, msg) = refusal(
            Api::<portway_api::TcpProxy>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &tcp("device-a"))
                .await,
        );
        assert_eq!(code, 403, "{who}: {msg}");
    }
    let route: gateway_api::apis::experimental::tcproutes::TcpRoute = serde_json::from_value(json!({
        "metadata": {"name": "forged"},
        "spec": {"parentRefs": [{"name": "forged"}], "rules": [{"backendRefs": [{"name": "x", "port": 1}]}]}}))
    .unwrap();
    let tls_route: gateway_api::apis::experimental::tlsroutes::TlsRoute =
        serde_json::from_value(json!({
            "metadata": {"name": "forged"},
            "spec": {"hostnames": ["a.localhost"], "parentRefs": [{"name": "forged"}],
                     "rules": [{"backendRefs": [{"name": "x", "port": 1}]}]}}))
        .unwrap();
    let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "forged", "labels": {"kubernetes.io/service-name": "x"},
            "annotations": {(portway_api::annotations::TUNNEL_TARGET): format!("{a_id} 127.0.0.1 {secret_port}")}},
        "addressType": "IPv4", "endpoints": []}))
    .unwrap();
    for (who, client) in [("mallory", &mallory), ("device-c", &device_c)] {
        let (code, msg) = refusal(
            Api::<gateway_api::apis::experimental::tcproutes::TcpRoute>::namespaced(
                client.clone(),
                "team-a",
            )
            .create(&PostParams::default(), &route)
            .await,
        );
        assert_eq!(code, 403, "{who} wrote a TCPRoute: {msg}");
        let (code, msg) = refusal(
            Api::<gateway_api::apis::experimental::tlsroutes::TlsRoute>::namespaced(
                client.clone(),
                "team-a",
            )
            .create(&PostParams::default(), &tls_route)
            .await,
        );
        assert_eq!(code, 403, "{who} wrote a TLSRoute: {msg}");
        let (code, msg) = refusal(
            Api::<k8s_openapi::api::discovery::v1::EndpointSlice>::namespaced(
                client.clone(),
                "team-a",
            )
            .create(&PostParams::default(), &slice)
            .await,
        );
        assert_eq!(code, 403, "{who} wrote an EndpointSlice: {msg}");
    }
    Api::<portway_api::TcpProxy>::namespaced(mallory.clone(), "team-a")
        .create(&PostParams::default(), &tcp("device-a"))
        .await
        .unwrap();
    let api: Api<portway_api::TcpProxy> = Api::namespaced(w.admin.clone(), "team-a");
    eventually("reach-tcp is refused", WAIT, || async {
        let p = api.get("reach-tcp").await?;
        let status = p.status.unwrap_or_default();
        let c = portway_api::find_condition(&status.conditions, "Accepted")
            .context("no Accepted yet")?;
        ensure!(c.reason == "BackendNotAdvertised", "{c:?}");
        Ok(())
    })
    .await;
    api.delete("reach-tcp", &DeleteParams::default())
        .await
        .unwrap();
    // ...and even when an admin writes the advertisement (so the operator routes it),
    // the device serves only its own tunnels.
    Api::<ConnectorAdvertisement>::namespaced(w.admin.clone(), "team-a")
        .create(&PostParams::default(), &inject)
        .await
        .unwrap();
    w.accepted("team-a", "reach", "True").await;
    let api: Api<HttpProxy> = Api::namespaced(w.admin.clone(), "team-a");
    eventually("reach is programmed", WAIT, || async {
        let p = api.get("reach").await?;
        ensure!(
            portway_api::is_condition_true(&p.status.unwrap_or_default().conditions, "Programmed"),
            "not yet"
        );
        Ok(())
    })
    .await;
    let (status, body) = w.stack.get("reach.localhost", "/hello").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert!(
        !body.contains(&format!("hello from {secret_port}")),
        "{body}"
    );

    // 3. Connector hijack: another device's credential, or a person's token, pointing
    //    A's connector at another NodeID; a device reporting someone else's NodeID.
    let hijack = json!({"status": {"connectionDetails": {"publicKey": {"id": c_id}}}});
    for (who, client) in [("device-c", &device_c), ("mallory", &mallory)] {
        let (code, msg) = refusal(
            Api::<Connector>::namespaced(client.clone(), "team-a")
                .patch_status("device-a", &PatchParams::default(), &Patch::Merge(&hijack))
                .await,
        );
        assert_eq!(code, 403, "{who}: {msg}");
        let (code, msg) = refusal(
            Api::<Connector>::namespaced(client.clone(), "team-a")
                .delete("device-a", &DeleteParams::default())
                .await,
        );
        assert_eq!(code, 403, "{who} deleting: {msg}");
    }
    let (code, msg) = refusal(
        Api::<Connector>::namespaced(device_c.clone(), "team-a")
            .patch_status(
                "device-c",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"status": {"connectionDetails": {"publicKey": {"id": a_id}}}}),
                ),
            )
            .await,
    );
    assert_eq!(code, 403, "{msg}");
    assert!(msg.contains("may only report its own NodeID"), "{msg}");
    let (code, _) = refusal(
        Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(device_c.clone(), "team-a")
            .delete("device-a", &DeleteParams::default())
            .await,
    );
    assert_eq!(code, 403);
    let (code, _) = refusal(
        Api::<Connector>::namespaced(device_b.clone(), "team-a")
            .list(&Default::default())
            .await,
    );
    assert_eq!(code, 403, "a device sees only its own project");
    assert_eq!(
        w.connector("team-a", "device-a").await.endpoint_id(),
        Some(a_id.as_str())
    );
    w.serves("a.localhost", &w.stack.origin).await;

    // 4. Hostnames are owned: A's canonical name, A's name, and a wildcard over A's
    //    name, claimed from project B, are refused; A keeps serving them.
    let a_proxy = Api::<HttpProxy>::namespaced(w.admin.clone(), "team-a")
        .get("device-a-web")
        .await
        .unwrap();
    let canonical = a_proxy.status.unwrap().canonical_hostname.unwrap();
    for (name, host) in [
        ("canon", canonical.as_str()),
        ("same", "a.localhost"),
        ("wild", "*.a.localhost"),
    ] {
        let p = proxy(name, &[host], "device-b", w.origin_b.addr.port(), json!([]));
        Api::<HttpProxy>::namespaced(bob.clone(), "team-b")
            .create(&PostParams::default(), &p)
            .await
            .unwrap();
        let c = w.accepted("team-b", name, "False").await;
        assert_eq!(c.reason, "HostnameInUse", "{host}: {c:?}");
        assert!(
            c.message.contains("another project"),
            "{host}: {}",
            c.message
        );
        assert!(
            !c.message.contains("team-a"),
            "another project's names stay hidden: {}",
            c.message
        );
    }
    // ...nor by passing TLS through under them (a name is terminated at the edge or
    // passed through, for one proxy of either kind).
    for (name, host) in [
        ("canon-tls", canonical.as_str()),
        ("same-tls", "a.localhost"),
    ] {
        let p: portway_api::TcpProxy = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"tls": {"hostnames": [host]}, "backends": [{
                "endpoint": format!("tcp://127.0.0.1:{}", w.origin_b.addr.port()),
                "connector": {"name": "device-b"}}]}}))
        .unwrap();
        let api = Api::<portway_api::TcpProxy>::namespaced(bob.clone(), "team-b");
        api.create(&PostParams::default(), &p).await.unwrap();
        let c = eventually(&format!("{name} is refused"), WAIT, || async {
            let p = api.get(name).await?;
            let c =
                portway_api::find_condition(&p.status.unwrap_or_default().conditions, "Accepted")
                    .cloned()
                    .context("no Accepted yet")?;
            ensure!(c.status == "False", "{c:?}");
            Ok(c)
        })
        .await;
        assert_eq!(c.reason, "HostnameInUse", "{host}: {c:?}");
        assert!(
            c.message.contains("another project") && !c.message.contains("team-a"),
            "{host}: {}",
            c.message
        );
    }
    // ...nor by having a certificate signed for them: a device's request is checked
    // against the names its own proxy serves, as the operator decided them (a status the
    // device writes itself does not count).
    let tcp_b = Api::<portway_api::TcpProxy>::namespaced(device_b.clone(), "team-b");
    let device_key = portway_tls::csr::new_key().unwrap();
    let wants = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        portway_tls::csr::make(&device_key, &names).unwrap()
    };
    let cert_proxy = |request: &str| -> portway_api::TcpProxy {
        serde_json::from_value(json!({
            "metadata": {"name": "steal-cert"},
            "spec": {"tls": {"certificateRequest": request}, "backends": [{
                "endpoint": format!("tcp://127.0.0.1:{}", w.origin_b.addr.port()),
                "connector": {"name": "device-b"}}]}}))
        .unwrap()
    };
    let certificate_ready = |want: &'static str| {
        let api = tcp_b.clone();
        async move {
            eventually(
                &format!("steal-cert CertificateReady={want}"),
                WAIT,
                || async {
                    let p = api.get("steal-cert").await?;
                    let status = p.status.unwrap_or_default();
                    let c = portway_api::find_condition(&status.conditions, "CertificateReady")
                        .cloned()
                        .context("no CertificateReady yet")?;
                    ensure!(c.status == want, "{c:?}");
                    Ok((c, status))
                },
            )
            .await
        }
    };
    tcp_b
        .create(
            &PostParams::default(),
            &cert_proxy(&wants(&[&canonical, "a.localhost"])),
        )
        .await
        .unwrap();
    let (c, status) = certificate_ready("False").await;
    assert_eq!(c.reason, "NameNotServed", "{c:?}");
    assert!(
        status.certificate.is_none(),
        "signed for another project's names"
    );
    let own = status.hostnames.clone();
    assert_eq!(own.len(), 1, "{own:?}");
    // The device tries to write its proxy's status to claim the names: refused, and the
    // request for them still is.
    let forged =
        json!({"status": {"hostnames": [canonical.clone(), "a.localhost", own[0].clone()]}});
    // A proxy's status is the operator's word: the device may not write it (nor plant a
    // chain there), and a person of the project may not either.
    let bob_tcp = Api::<portway_api::TcpProxy>::namespaced(bob.clone(), "team-b");
    for (who, api) in [("device-b", &tcp_b), ("bob", &bob_tcp)] {
        let (code, msg) = refusal(
            api.patch_status(
                "steal-cert",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&forged),
            )
            .await,
        );
        assert_eq!(code, 403, "{who} wrote a proxy's status: {msg}");
        assert!(msg.contains("tcpproxies/status"), "{msg}");
    }
    let ask = |request: String| {
        let api = tcp_b.clone();
        async move {
            let patch = json!({"spec": {"tls": {"certificateRequest": request}}});
            let pp = kube::api::PatchParams::default();
            api.patch("steal-cert", &pp, &kube::api::Patch::Merge(&patch))
                .await
                .unwrap();
        }
    };
    ask(wants(&[&canonical, &own[0]])).await;
    eventually("the forged request is refused", WAIT, || async {
        let p = tcp_b.get("steal-cert").await?;
        let spec_asks_canonical = p
            .spec
            .tls
            .as_ref()
            .and_then(|t| t.certificate_request.as_deref())
            .and_then(|r| portway_tls::csr::parse(r).ok())
            .is_some_and(|r| r.names.contains(&canonical));
        let status = p.status.unwrap_or_default();
        let c =
            portway_api::find_condition(&status.conditions, "CertificateReady").context("none")?;
        // Decided for this very request (its generation), not left over from the first.
        ensure!(c.observed_generation == p.metadata.generation, "{c:?}");
        ensure!(
            spec_asks_canonical && c.reason == "NameNotServed" && c.message.contains(&canonical),
            "{c:?}"
        );
        ensure!(status.certificate.is_none(), "signed");
        Ok(())
    })
    .await;
    // Its own name alone: signed (so the refusals above are the rule, not a broken issuer).
    ask(wants(&[&own[0]])).await;
    let (c, status) = certificate_ready("True").await;
    let leaf = portway_tls::csr::leaf(status.certificate.as_deref().unwrap()).unwrap();
    assert_eq!(leaf.names, own, "{c:?}");
    assert_eq!(
        leaf.public_key,
        portway_tls::csr::public_key_of(&device_key).unwrap()
    );
    tcp_b
        .delete("steal-cert", &Default::default())
        .await
        .unwrap();
    w.serves(&canonical, &w.stack.origin).await;
    w.serves("a.localhost", &w.stack.origin).await;
    w.serves("app.a.localhost", &w.stack.origin).await;

    // 4b. Events: a device records only its own connector's story, in its own project.
    use k8s_openapi::api::events::v1::Event;
    let event = |about: &str, ns: &str| -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": format!("{about}.forged"), "namespace": ns},
            "eventTime": "2026-12-02T12:00:00.000000Z", "type": "Warning", "reason": "Compromised",
            "action": "Forge", "reportingController": "portway-agent", "reportingInstance": "x",
            "note": "forged", "regarding": {"kind": "Connector", "name": about, "namespace": ns},
        }))
        .unwrap()
    };
    for (who, client, ns, about) in [
        ("device-c", &device_c, "team-a", "device-a"),
        ("device-b", &device_b, "team-a", "device-a"),
        ("device-b", &device_b, "team-a", "device-b"),
    ] {
        let (code, msg) = refusal(
            Api::<Event>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &event(about, ns))
                .await,
        );
        assert_eq!(code, 403, "{who} about {ns}/{about}: {msg}");
    }
    Api::<Event>::namespaced(device_c.clone(), "team-a")
        .create(&PostParams::default(), &event("device-c", "team-a"))
        .await
        .expect("a device records events about its own connector");

    // 5. A used-up join token joins nothing; the error says why. The device keeps its
    //    credential, never the join token.
    let saved =
        std::fs::read_to_string(w.stack.dir.path().join("device-b/device.kubeconfig")).unwrap();
    assert!(saved.contains("pwd.") && !saved.contains("pwj."), "{saved}");
    let (ok, _, err) = portway(&[
        "agent",
        "--kubeconfig",
        w.admin_kc.to_str().unwrap(),
        "--join-token",
        &w.team_b_token,
        "--project",
        "team-b",
        "--name",
        "intruder",
        "--state-dir",
        w.stack.dir.path().join("intruder").to_str().unwrap(),
        "--relay",
        &w.stack.up.ready_str("relay"),
    ])
    .await;
    assert!(
        !ok && err.contains("join token is unknown, expired or used up"),
        "{err}"
    );

    // 7. Parser denial of service: a 3 MiB `[[[[…` YAML body, twice at once, answers 400
    //    while other requests are served as usual.
    let body = w.stack.dir.path().join("nested.yaml");
    std::fs::write(&body, "[".repeat(3 * 1024 * 1024 - 16)).unwrap();
    let api = w.stack.up.ready_str("apiserver");
    let ca = w.stack.data().join("pki/ca.crt");
    let curl = |method: &str, path: &str, data: Option<&Path>| {
        let mut c = tokio::process::Command::new("curl");
        c.args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(&ca)
        .args(["-H", &format!("Authorization: Bearer {ADMIN}")])
        .arg(format!("{api}{path}"));
        if let Some(f) = data {
            c.args(["-H", "Content-Type: application/yaml", "--data-binary"])
                .arg(format!("@{}", f.display()));
        }
        async move {
            let out = c.output().await.unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    let post = "/apis/networking.datumapis.com/v1alpha/namespaces/team-a/httpproxies";
    let (a, b, get) = tokio::join!(
        curl("POST", post, Some(&body)),
        curl("POST", post, Some(&body)),
        curl("GET", "/api/v1/namespaces/team-a", None),
    );
    for answer in [&a, &b] {
        assert!(answer.starts_with("400 "), "nested body: {answer}");
    }
    assert!(get.starts_with("200 "), "{get}");
    eprintln!("3 MiB nested YAML body: {a} / {b} (code, seconds); GET meanwhile: {get}");

    // 8. Slowloris: connections that never finish their request head neither starve
    //    the edge and the API server of answers nor stay open past the header timeout.
    let api_addr: SocketAddr = api.trim_start_matches("https://").parse().unwrap();
    let mut idle = Vec::new();
    for target in [w.stack.edge, api_addr] {
        for _ in 0..500 {
            let mut s = tokio::net::TcpStream::connect(target).await.unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut s, b"GET / HTTP/1.1\r\nHost: a.localhost\r\n")
                .await
                .unwrap();
            idle.push(s);
        }
    }
    w.serves("a.localhost", &w.stack.origin).await;
    assert!(
        curl("GET", "/api/v1/namespaces/team-a", None)
            .await
            .starts_with("200 ")
    );
    let held = std::time::Instant::now();
    for mut s in idle {
        let mut buf = [0u8; 512];
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match tokio::io::AsyncReadExt::read(&mut s, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "an idle connection outlived the header timeout"
        );
    }
    eprintln!(
        "1000 half-sent request heads all closed after {:?}",
        held.elapsed()
    );

    // 7. Certificate keys: the issuer's Secrets (portway-system), and Secrets in a
    //    project, are read by the control plane alone: not by a device, nor by a
    //    project's people, whatever their role there.
    let system: Api<Secret> = Api::namespaced(w.admin.clone(), "portway-system");
    eventually("the zone's certificate is issued", WAIT, || async {
        let issued = system.get_opt("wildcard.portway.localhost").await?;
        ensure!(issued.is_some(), "not yet");
        Ok(())
    })
    .await;
    let vera = w.person(VERA, "team-a").await;
    for (who, client) in [
        ("device-c", device_c.clone()),
        ("an agent-role person of team-a", mallory.clone()),
        ("a viewer of team-a", vera),
    ] {
        for ns in ["portway-system", "team-a"] {
            let api: Api<Secret> = Api::namespaced(client.clone(), ns);
            let (code, msg) = refusal(api.list(&Default::default()).await);
            assert_eq!(code, 403, "{who} listed Secrets in {ns}: {msg}");
            let (code, msg) = refusal(api.get("wildcard.portway.localhost").await);
            assert_eq!(code, 403, "{who} read a Secret in {ns}: {msg}");
        }
        let (code, msg) = refusal(
            Api::<Secret>::namespaced(client.clone(), "portway-system")
                .delete("wildcard.portway.localhost", &DeleteParams::default())
                .await,
        );
        assert_eq!(code, 403, "{who} deleted the zone's certificate: {msg}");
        // Nor may they write an ACME answer, which the DNS server (DNS-01) or every edge
        // (HTTP-01) would publish: a certificate for a name they do not own would follow.
        for (annotation, key) in [
            (
                json!({"portway.dev/record": "_acme-challenge.portway.localhost"}),
                "txt",
            ),
            (
                json!({"portway.dev/http01-host": "shop.test"}),
                "key-authorization",
            ),
        ] {
            let answer: Secret = serde_json::from_value(json!({
                "metadata": {"name": "forged", "labels": {"portway.dev/acme-challenge": "true"},
                    "annotations": annotation},
                "stringData": {key: "forged.token"},
            }))
            .unwrap();
            let (code, msg) = refusal(
                Api::<Secret>::namespaced(client.clone(), "portway-system")
                    .create(&PostParams::default(), &answer)
                    .await,
            );
            assert_eq!(code, 403, "{who} wrote an ACME answer ({key}): {msg}");
        }
    }

    // 8. Origins (backends without a connector) may not be the edge's own machine or
    //    link: a project's person cannot use the edge to reach a service on it (here
    //    device A's app it never offers, on this machine's loopback) or the cloud's
    //    metadata address, however the address is spelled.
    let proxies: Api<HttpProxy> = Api::namespaced(mallory.clone(), "team-a");
    for (name, endpoint) in [
        ("to-loopback", format!("http://127.0.0.1:{secret_port}")),
        ("to-localhost", format!("http://localhost:{secret_port}")),
        ("to-decimal", format!("http://2130706433:{secret_port}")),
        (
            "to-mapped",
            format!("http://[::ffff:127.0.0.1]:{secret_port}"),
        ),
        ("to-ipv6", format!("http://[::1]:{secret_port}")),
        ("to-metadata", "http://169.254.169.254".to_owned()),
    ] {
        let host = format!("{name}.localhost");
        let p: HttpProxy = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hostnames": [host], "rules": [{"backends": [{"endpoint": endpoint}]}]},
        }))
        .unwrap();
        proxies.create(&PostParams::default(), &p).await.unwrap();
        let c = w.accepted("team-a", name, "False").await;
        assert_eq!(c.reason, "OriginNotAllowed", "{endpoint}: {c:?}");
        let (status, body) = w.stack.get(&host, "/hello").await.unwrap();
        assert_eq!(status, StatusCode::NOT_FOUND, "{endpoint}: {body}");
    }
    // And the sidecar checks what a name resolves to when it connects, so a name that
    // only turns out to be this machine then (DNS the operator cannot foresee) is refused
    // too: asked directly, as the edge would ask it.
    let sidecar: SocketAddr = w.stack.up.ready_str("sidecar").parse().unwrap();
    let answer = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(sidecar).await.unwrap();
        s.write_all(format!("GET /hello HTTP/1.1\r\nHost: x\r\ndatum-node-id: direct\r\ndatum-target-host: localhost\r\ndatum-target-port: {secret_port}\r\ndatum-target-proto: http\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let answer = tokio::time::timeout(WAIT, answer).await.unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 502") && !answer.contains("hello from"),
        "{answer}"
    );

    // 6. Revoking a device: deleting its Connector cuts its credential off at once.
    Api::<Connector>::namespaced(w.admin.clone(), "team-a")
        .delete("device-c", &DeleteParams::default())
        .await
        .unwrap();
    let (code, _) = refusal(
        Api::<Connector>::namespaced(device_c, "team-a")
            .get("device-a")
            .await,
    );
    assert_eq!(code, 401);
}

/// AccessPolicies: a project's policy cannot reach another project's proxy, even one
/// named exactly (targets are names in the policy's own namespace); people and devices
/// with the agent role may write neither policies nor the Secrets basic auth reads, so a
/// device can neither loosen a policy on its proxy nor lock out another's.
async fn access_policies_stay_in_their_project(
    w: &World,
    bob: &kube::Client,
    device_b: &kube::Client,
) {
    let proxies = Api::<HttpProxy>::namespaced(w.admin.clone(), "team-a")
        .list(&Default::default())
        .await
        .unwrap();
    let a_proxy = proxies
        .items
        .iter()
        .find(|p| p.spec.hostnames.iter().any(|h| h == "a.localhost"))
        .and_then(|p| p.metadata.name.clone())
        .unwrap();
    let policy: portway_api::AccessPolicy = serde_json::from_value(json!({
        "metadata": {"name": "lock-out"},
        "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": a_proxy}],
                 "ip": {"deny": ["0.0.0.0/0", "::/0"]}},
    }))
    .unwrap();
    // An admin's policy in team-b names team-a's proxy: it finds no target and team-a's
    // tunnel stays open.
    let team_b = Api::<portway_api::AccessPolicy>::namespaced(w.admin.clone(), "team-b");
    team_b
        .create(&PostParams::default(), &policy)
        .await
        .unwrap();
    finds_no_target(&team_b, "lock-out").await;
    w.serves("a.localhost", &w.stack.origin).await;
    team_b
        .delete("lock-out", &DeleteParams::default())
        .await
        .unwrap();

    // The agent role writes no policies and no Secrets: not a person's, not a device's.
    let users: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "users"}, "type": "portway.dev/htpasswd",
        "stringData": {"htpasswd": "eve:$2y$05$abcdefghijklmnopqrstuuLBHxAyqSvrL8Q0zCD0Q26c1Y9VTn3NG"},
    }))
    .unwrap();
    for client in [bob, device_b] {
        let (code, message) = refusal(
            Api::<portway_api::AccessPolicy>::namespaced(client.clone(), "team-b")
                .create(&PostParams::default(), &policy)
                .await,
        );
        assert_eq!(code, 403, "{message}");
        let (code, message) = refusal(
            Api::<Secret>::namespaced(client.clone(), "team-b")
                .create(&PostParams::default(), &users)
                .await,
        );
        assert_eq!(code, 403, "{message}");
        let keys: Secret = serde_json::from_value(json!({
            "metadata": {"name": "keys"}, "type": "portway.dev/jwks",
            "stringData": {"jwks": r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#},
        }))
        .unwrap();
        let (code, message) = refusal(
            Api::<Secret>::namespaced(client.clone(), "team-b")
                .create(&PostParams::default(), &keys)
                .await,
        );
        assert_eq!(code, 403, "{message}");
        // Nor may it read the key the data planes sign callers' identities with: who holds
        // it can pass as anyone to every app.
        let (code, message) = refusal(
            Api::<Secret>::namespaced(client.clone(), "portway-system")
                .get("portway-identity")
                .await,
        );
        assert_eq!(code, 403, "{message}");
    }
}

/// Waits until the policy `name` is refused as `Accepted=False/TargetNotFound`.
async fn finds_no_target(policies: &Api<portway_api::AccessPolicy>, name: &str) {
    eventually(&format!("policy {name} finds no target"), WAIT, || async {
        let (status, reason) = super::access::condition(policies, name, "Accepted").await?;
        ensure!(
            status == "False" && reason == "TargetNotFound",
            "{status} {reason}"
        );
        Ok(())
    })
    .await;
}

/// A device writes AccessPolicies and htpasswd Secrets for its own proxies only
/// (`portway http --basic-auth`): device-c, in team-a beside device-a, can neither guard
/// (or lock out) device-a's proxy, nor pass a policy or Secret off as device-a's, nor
/// read or overwrite device-a's users; and a device-labelled policy naming a proxy of
/// another connector (one that took over a deleted proxy's name) guards nothing.
async fn a_device_guards_only_its_own_proxies(w: &World, device_c: &kube::Client) {
    let a_proxy = Api::<HttpProxy>::namespaced(w.admin.clone(), "team-a")
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.spec.hostnames.iter().any(|h| h == "a.localhost"))
        .and_then(|p| p.metadata.name)
        .unwrap();
    let policy = |name: &str, connector: &str| -> portway_api::AccessPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"portway.dev/connector": connector}},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": a_proxy}],
                     "ip": {"deny": ["0.0.0.0/0", "::/0"]}},
        }))
        .unwrap()
    };
    let as_c = Api::<portway_api::AccessPolicy>::namespaced(device_c.clone(), "team-a");
    for (name, label) in [("c-locks-a", "device-c"), ("c-as-a", "device-a")] {
        let (code, message) = refusal(
            as_c.create(&PostParams::default(), &policy(name, label))
                .await,
        );
        assert_eq!(code, 403, "{name}: {message}");
    }
    // device-a's users (as its one-liner writes them): device-c may not read or replace them.
    let users = |connector: &str| -> Secret {
        serde_json::from_value(json!({
            "metadata": {"name": "device-a-web-users", "labels": {"portway.dev/connector": connector}},
            "type": "portway.dev/htpasswd",
            "stringData": {"htpasswd": "ann:$2y$05$abcdefghijklmnopqrstuuLBHxAyqSvrL8Q0zCD0Q26c1Y9VTn3NG"},
        }))
        .unwrap()
    };
    Api::<Secret>::namespaced(w.admin.clone(), "team-a")
        .create(&PostParams::default(), &users("device-a"))
        .await
        .unwrap();
    let secrets_c = Api::<Secret>::namespaced(device_c.clone(), "team-a");
    let (code, message) = refusal(secrets_c.get("device-a-web-users").await);
    assert_eq!(code, 403, "{message}");
    let (code, message) = refusal(secrets_c.list(&Default::default()).await);
    assert_eq!(code, 403, "{message}");
    let apply = kube::api::PatchParams::apply("portway-agent").force();
    let (code, message) = refusal(
        secrets_c
            .patch(
                "device-a-web-users",
                &apply,
                &kube::api::Patch::Apply(users("device-c")),
            )
            .await,
    );
    assert_eq!(code, 403, "{message}");
    let (code, message) = refusal(
        secrets_c
            .delete("device-a-web-users", &Default::default())
            .await,
    );
    assert_eq!(code, 403, "{message}");
    // Nor read it through a write that changes nothing (the no-op answer is the object).
    let (code, message) = refusal(
        secrets_c
            .patch(
                "device-a-web-users",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({})),
            )
            .await,
    );
    assert_eq!(code, 403, "an empty patch read another's Secret: {message}");
    // Its own users it may write: the rule is the label, not a ban.
    let mut own = users("device-c");
    own.metadata.name = Some("device-c-web-users".into());
    secrets_c
        .create(&PostParams::default(), &own)
        .await
        .expect("a device writes its own users");

    // Its own proxy, waiting for its policy (as the one-liner writes it). A policy of any
    // other name, even `<proxy>-access` written by someone else, does not guard it: it
    // answers 500 until its own policy names it.
    let ad: portway_api::ConnectorAdvertisement = serde_json::from_value(json!({
        "metadata": {"name": "c-web"},
        "spec": {"connectorRef": {"name": "device-c"}, "layer4": [{"name": "web", "services": [
            {"address": "127.0.0.1", "ports": [{"name": "http", "port": 9, "protocol": "TCP"}]}]}]},
    }))
    .unwrap();
    Api::<portway_api::ConnectorAdvertisement>::namespaced(device_c.clone(), "team-a")
        .create(&PostParams::default(), &ad)
        .await
        .unwrap();
    let mut c_web = proxy("c-web", &["c.localhost"], "device-c", 9, json!([]));
    c_web.metadata.annotations = Some(
        [(
            "portway.dev/access-policy".to_owned(),
            "c-web-access".to_owned(),
        )]
        .into(),
    );
    Api::<HttpProxy>::namespaced(device_c.clone(), "team-a")
        .create(&PostParams::default(), &c_web)
        .await
        .unwrap();
    let squat: portway_api::AccessPolicy = serde_json::from_value(json!({
        "metadata": {"name": "c-web-access", "labels": {"portway.dev/connector": "device-a"}},
        "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": a_proxy}],
                 "methods": ["GET"]},
    }))
    .unwrap();
    Api::<portway_api::AccessPolicy>::namespaced(w.admin.clone(), "team-a")
        .create(&PostParams::default(), &squat)
        .await
        .unwrap();
    eventually("a proxy awaiting its policy answers 500", WAIT, || async {
        let (status, body) = w.stack.get("c.localhost", "/hello").await?;
        ensure!(
            status == StatusCode::INTERNAL_SERVER_ERROR,
            "{status}: {body}"
        );
        Ok(())
    })
    .await;
    // Its policy may read only its own Secrets: naming device-a's users is refused.
    let guard = |users: &str| -> portway_api::AccessPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "c-web-guard", "labels": {"portway.dev/connector": "device-c"}},
            "spec": {"targetRefs": [{"group": "networking.datumapis.com", "kind": "HTTPProxy", "name": "c-web"}],
                     "basicAuth": {"secretRef": {"name": users}}},
        }))
        .unwrap()
    };
    let (code, message) = refusal(
        as_c.create(&PostParams::default(), &guard("device-a-web-users"))
            .await,
    );
    assert_eq!(code, 403, "{message}");
    as_c.create(&PostParams::default(), &guard("device-c-web-users"))
        .await
        .expect("a device guards its own proxy with its own users");
    eventually("its own policy guards it", WAIT, || async {
        let (status, body) = w.stack.get("c.localhost", "/hello").await?;
        ensure!(status == StatusCode::UNAUTHORIZED, "{status}: {body}");
        Ok(())
    })
    .await;

    // A policy labelled device-c that names device-a's proxy (written before that name
    // changed hands): it guards nothing there, and device-a's tunnel stays open.
    let team_a = Api::<portway_api::AccessPolicy>::namespaced(w.admin.clone(), "team-a");
    team_a
        .create(&PostParams::default(), &policy("stale", "device-c"))
        .await
        .unwrap();
    finds_no_target(&team_a, "stale").await;
    w.serves("a.localhost", &w.stack.origin).await;
    team_a
        .delete("stale", &DeleteParams::default())
        .await
        .unwrap();
}

/// An installation that checks no proofs of control (`portway operator` without
/// `--hostname-resolver`) serves a custom name a project claims, but its issuer vouches
/// for none: a device's certificate request naming it is refused (`NameNotProven`),
/// nothing is signed, and a request for the proxy's own zone name alone is signed (so the
/// refusal is the rule, not a broken issuer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_served_without_proof_gets_no_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).display().to_string();
    // No --hostname-resolver: names outside the zone are served unproven. The API
    // server's own CA (it signs its serving certificate) issues.
    let ca = path("api/pki");
    let plane = super::edge_tier::ControlPlane::start(dir.path(), 1, &["--local-ca", &ca]).await;
    let (kc, relay_url, dns_addr) = (
        plane.kc.clone(),
        plane.relay_urls[0].clone(),
        plane.dns.clone(),
    );
    let _edge = Process::start(
        "edge",
        bin(),
        [
            "edge",
            "--kubeconfig",
            &kc,
            "--relay",
            &relay_url,
            "--dns",
            &dns_addr,
            "--http",
            "127.0.0.1:0",
            "--https",
            "127.0.0.1:0",
            "--state-dir",
            &path("edge"),
        ],
    )
    .await
    .unwrap();
    // A device asking for a certificate for its passthrough names, one of them custom.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tunnel = format!(
        "mail=127.0.0.1:{},tls,mail.unproven.test,cert-dir={}",
        target.local_addr().unwrap().port(),
        path("device-cert")
    );
    let _device = Process::start(
        "agent",
        bin(),
        [
            "agent",
            "--kubeconfig",
            &kc,
            "--project",
            "default",
            "--name",
            "laptop",
            "--state-dir",
            &path("device"),
            "--relay",
            &relay_url,
            "--tunnel",
            &tunnel,
        ],
    )
    .await
    .unwrap();
    let admin = kube_client(Path::new(&kc)).await.unwrap();
    let tcp: Api<portway_api::TcpProxy> = Api::namespaced(admin, "default");
    let (proxy, c) = eventually("the request is decided", WAIT, || async {
        let list = tcp.list(&Default::default()).await?;
        let p = list.items.into_iter().next().context("no TCPProxy yet")?;
        let status = p.status.clone().unwrap_or_default();
        let c = portway_api::find_condition(&status.conditions, "CertificateReady")
            .cloned()
            .context("no CertificateReady yet")?;
        ensure!(c.status == "False", "{c:?}");
        Ok((p, c))
    })
    .await;
    let status = proxy.status.clone().unwrap_or_default();
    assert!(
        status.hostnames.iter().any(|h| h == "mail.unproven.test"),
        "the custom name is served (no proofs checked here): {:?}",
        status.hostnames
    );
    assert_eq!(c.reason, "NameNotProven", "{c:?}");
    assert!(
        c.message.contains("mail.unproven.test")
            && c.message.contains("spec.tls.certificateRequest"),
        "{}",
        c.message
    );
    assert!(status.certificate.is_none(), "signed an unproven name");
    assert!(!Path::new(&path("device-cert")).join("cert.pem").exists());
    // A proxy's own name in the zone alone is signed by the same issuer. (The device's
    // agent keeps its own request in its proxy's spec, so this goes in a second proxy for
    // the same connector and target, asking once its name is known.)
    let name = format!("{}-own", proxy.metadata.name.clone().unwrap());
    let mut own = proxy.clone();
    own.metadata = kube::api::ObjectMeta {
        name: Some(name.clone()),
        ..Default::default()
    };
    own.status = None;
    if let Some(tls) = own.spec.tls.as_mut() {
        tls.hostnames.clear();
        tls.certificate_request = None;
    }
    tcp.create(&PostParams::default(), &own).await.unwrap();
    let names = eventually("the second proxy's name", WAIT, || async {
        let p = tcp.get(&name).await?;
        let names = p.status.unwrap_or_default().hostnames;
        ensure!(!names.is_empty(), "no hostnames yet");
        Ok(names)
    })
    .await;
    let key = portway_tls::csr::new_key().unwrap();
    let request = portway_tls::csr::make(&key, &names).unwrap();
    let patch = json!({"spec": {"tls": {"certificateRequest": request}}});
    tcp.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("its own zone name is signed", WAIT, || async {
        let p = tcp.get(&name).await?;
        let status = p.status.unwrap_or_default();
        let c = portway_api::find_condition(&status.conditions, "CertificateReady")
            .context("no CertificateReady yet")?;
        ensure!(c.status == "True", "{c:?}");
        let leaf = portway_tls::csr::leaf(status.certificate.as_deref().context("no chain")?)?;
        ensure!(leaf.names == names, "{:?}", leaf.names);
        Ok(())
    })
    .await;
}

/// The holder of one join token cannot keep other devices from joining: asking for
/// challenges (and answering them with a bad signature, which spends them) runs out that
/// token's own allowance (128 a minute, 429) and nobody else's. And a NodeID of small
/// order, whose forged signature would verify, is refused.
#[tokio::test]
async fn one_join_tokens_holder_cannot_crowd_out_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("api");
    let api = Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await
    .unwrap();
    let kc = api.ready_str("kubeconfig");
    let url = api.ready_str("apiserver");
    let token = || async {
        let (ok, token, err) = portway(&[
            "token",
            "create",
            "--project",
            "default",
            "--kubeconfig",
            &kc,
        ])
        .await;
        assert!(ok, "{err}");
        token.trim().to_owned()
    };
    let (mine, theirs) = (token().await, token().await);
    let ca = data.join("pki/ca.crt");
    let post = |path: &'static str, body: serde_json::Value| {
        let (url, ca) = (url.clone(), ca.clone());
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "-w", "\n%{http_code}", "-X", "POST", "--cacert"])
                .arg(&ca)
                .args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(body.to_string())
                .arg(format!("{url}{path}"))
                .output()
                .await
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let (body, code) = text.rsplit_once('\n').unwrap_or_default();
            (code.to_owned(), body.to_owned())
        }
    };
    let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let node = hex(ring::signature::KeyPair::public_key(&key).as_ref());
    // A key of small order (all zeros) verifies a forged all-zero signature: refused, so
    // no credential is bound to a NodeID nobody holds.
    let (code, body) = post("/portway/v1/join/challenge", json!({"joinToken": theirs})).await;
    assert_eq!(code, "200", "{body}");
    let nonce = serde_json::from_str::<serde_json::Value>(&body).unwrap()["nonce"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, body) = post(
        "/portway/v1/join",
        json!({"joinToken": theirs, "connector": "x", "nodeId": "00".repeat(32),
               "nonce": nonce, "signature": "00".repeat(64)}),
    )
    .await;
    assert_eq!(code, "400", "joined with a forged signature: {body}");
    assert!(body.contains("nodeId"), "{body}");
    for i in 0..128 {
        let (code, body) = post("/portway/v1/join/challenge", json!({"joinToken": mine})).await;
        assert_eq!(code, "200", "challenge {i}: {body}");
        let nonce = serde_json::from_str::<serde_json::Value>(&body).unwrap()["nonce"]
            .as_str()
            .unwrap()
            .to_owned();
        // Answered with a bad signature: refused, the nonce spent, and still counted.
        let (code, body) = post(
            "/portway/v1/join",
            json!({"joinToken": mine, "connector": "x", "nodeId": node, "nonce": nonce,
                   "signature": "00".repeat(64)}),
        )
        .await;
        assert_eq!(code, "401", "{body}");
    }
    let (code, body) = post("/portway/v1/join/challenge", json!({"joinToken": mine})).await;
    assert_eq!(code, "429", "the token's allowance is spent: {body}");
    let (code, body) = post("/portway/v1/join/challenge", json!({"joinToken": theirs})).await;
    assert_eq!(code, "200", "another token's holder is kept out: {body}");
}
