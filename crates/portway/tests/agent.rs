//! `portway agent` as a real process against the real API server and relay, dialed by a
//! gateway-like iroh endpoint speaking the tunnel protocol on the wire.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use iroh::endpoint::Connection;
use iroh::{Endpoint, EndpointAddr, EndpointId, RelayUrl};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use portway_api::{Connector, ConnectorAdvertisement, ConnectorClass, HttpProxy};
use portway_discovery::endpoint;
use portway_testkit::{
    HttpTarget, LocalUi, Process, eventually, kube_client, kubeconfig_with_token,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const AGENT_TOKEN: &str = "agent-token-for-tests-0001";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

/// API server (admin + an agent token for project `default`), a relay, and the
/// `portway` ConnectorClass.
struct Env {
    dir: tempfile::TempDir,
    apiserver: Process,
    relay_process: Process,
    relay: RelayUrl,
    admin: kube::Client,
    agent_kubeconfig: PathBuf,
}

async fn apiserver(dir: &Path, listen: &str) -> Process {
    let tokens = dir.join("tokens.csv");
    Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            dir.join("api").to_str().unwrap(),
            "--listen",
            listen,
            "--tokens",
            tokens.to_str().unwrap(),
        ],
    )
    .await
    .unwrap()
}

async fn env() -> Env {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokens.csv"),
        format!("admin-token-for-tests-0001,root,admin,*\n{AGENT_TOKEN},laptop,agent,default\n"),
    )
    .unwrap();
    let apiserver = apiserver(dir.path(), "127.0.0.1:0").await;
    let admin_kubeconfig = PathBuf::from(apiserver.ready_str("kubeconfig"));
    let agent_kubeconfig = dir.path().join("agent.kubeconfig");
    kubeconfig_with_token(&admin_kubeconfig, AGENT_TOKEN, "default", &agent_kubeconfig).unwrap();
    let admin = kube_client(&admin_kubeconfig).await.unwrap();
    let classes: Api<ConnectorClass> = Api::all(admin.clone());
    classes
        .create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "portway"}, "spec": {"controllerName": "portway.dev/operator"}})).unwrap())
        .await
        .unwrap();
    // Open: these tests are about whom the agent lets in, not the relay.
    let relay = Process::start(
        "relay",
        bin(),
        ["relay", "--listen", "127.0.0.1:0", "--open"],
    )
    .await
    .unwrap();
    let relay_url = relay.ready_str("relay").parse().unwrap();
    Env {
        dir,
        apiserver,
        relay_process: relay,
        relay: relay_url,
        admin,
        agent_kubeconfig,
    }
}

impl Env {
    async fn agent(&self, config: &Path, extra: &[&str]) -> anyhow::Result<Process> {
        let mut args = vec![
            "agent".to_owned(),
            "--kubeconfig".into(),
            self.agent_kubeconfig.display().to_string(),
            "--project".into(),
            "default".into(),
            "--name".into(),
            "laptop".into(),
            "--state-dir".into(),
            self.dir.path().join("state").display().to_string(),
            "--config".into(),
            config.display().to_string(),
            "--relay".into(),
            self.relay.to_string(),
            "--bind".into(),
            "127.0.0.1:0".into(),
            "--lease-seconds".into(),
            "4".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Process::start("agent", bin(), args).await
    }

    async fn authorize(&self, gateway: EndpointId) {
        self.authorize_many(&[gateway]).await;
    }

    async fn authorize_many(&self, gateways: &[EndpointId]) {
        let classes: Api<ConnectorClass> = Api::all(self.admin.clone());
        let list: Vec<_> = gateways
            .iter()
            .enumerate()
            .map(|(i, g)| json!({"name": format!("test-gateway-{i}"), "endpointId": g.to_string()}))
            .collect();
        classes
            .patch_status(
                "portway",
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"gateways": list}})),
            )
            .await
            .unwrap();
    }
}

fn tunnel_config(tunnels: &[(&str, u16, &str, &[&str])]) -> String {
    let mut out = String::from("[labels]\nteam = \"blue\"\n");
    for (name, port, protocol, hosts) in tunnels {
        let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
        out.push_str(&format!(
            "\n[[tunnel]]\nname = \"{name}\"\ntarget = \"127.0.0.1:{port}\"\nprotocol = \"{protocol}\"\nhostnames = [{}]\n",
            hosts.join(", ")
        ));
    }
    out
}

async fn gateway(relay: &RelayUrl) -> Endpoint {
    endpoint::bind(&endpoint::Config {
        relays: vec![relay.clone()],
        bind_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap()
}

async fn connect(gw: &Endpoint, agent: EndpointId, relay: &RelayUrl) -> anyhow::Result<Connection> {
    let addr = EndpointAddr::new(agent).with_relay_url(relay.clone());
    Ok(tokio::time::timeout(
        Duration::from_secs(10),
        gw.connect(addr, portway_api::TUNNEL_ALPN),
    )
    .await??)
}

/// Sends one request head on a new stream; returns the status code and whatever the
/// stream carries after the response head (read to the end when `then` is given).
async fn request(
    conn: &Connection,
    head: &str,
    then: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(head.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match recv.read(&mut chunk).await? {
            Some(n) => buf.extend_from_slice(&chunk[..n]),
            None => bail!(
                "stream ended before a response head: {:?}",
                String::from_utf8_lossy(&buf)
            ),
        }
    };
    let text = String::from_utf8_lossy(&buf[..end]).to_string();
    let code: u16 = text
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let mut rest = buf[end..].to_vec();
    if code == 200 {
        if let Some(payload) = then {
            send.write_all(payload.as_bytes()).await?;
        }
        loop {
            match recv.read(&mut chunk).await {
                Ok(Some(n)) => rest.extend_from_slice(&chunk[..n]),
                // A stream whose end was already delivered reports itself closed.
                Ok(None) | Err(iroh::endpoint::ReadError::ClosedStream) => break,
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok((code, String::from_utf8_lossy(&rest).to_string()))
}

async fn connect_status(conn: &Connection, port: u16) -> anyhow::Result<u16> {
    let head = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let get = "GET /via-connect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let (code, body) = request(conn, &head, Some(get)).await?;
    if code == 200 {
        ensure!(
            body.contains(&format!("target {port} saw GET /via-connect")),
            "unexpected body {body:?}"
        );
    }
    Ok(code)
}

async fn lease_renewed(api: &Api<Lease>) -> anyhow::Result<(String, i64)> {
    let spec = api.get("laptop").await?.spec.context("no spec")?;
    let holder = spec.holder_identity.context("no holder")?;
    let renew = spec.renew_time.context("no renewTime")?.0.as_microsecond();
    Ok((holder, renew))
}

#[tokio::test]
async fn agent_registers_heartbeats_and_serves_only_what_it_may() {
    let env = env().await;
    let web = HttpTarget::spawn().await.unwrap();
    let api_target = HttpTarget::spawn().await.unwrap();
    let config = env.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        tunnel_config(&[("web", web.addr.port(), "http", &["web.localhost"])]),
    )
    .unwrap();
    let mut agent = env.agent(&config, &["--label", "floor=3"]).await.unwrap();
    let node_id: EndpointId = agent.ready_str("node_id").parse().unwrap();

    // Key file, registration and status.
    let key = env.dir.path().join("state/key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let conns: Api<Connector> = Api::namespaced(env.admin.clone(), "default");
    let c = eventually(
        "the connector carries the agent's id and relay",
        WAIT,
        || async {
            let c = conns.get("laptop").await?;
            let pk = c
                .status
                .as_ref()
                .and_then(|s| s.connection_details.as_ref())
                .and_then(|d| d.public_key.as_ref())
                .context("no details")?;
            ensure!(
                pk.id == node_id.to_string()
                    && pk.home_relay.as_deref() == Some(env.relay.as_str()),
                "{pk:?}"
            );
            ensure!(
                c.status
                    .as_ref()
                    .and_then(|s| s.lease_ref.as_ref())
                    .is_some_and(|l| l.name == "laptop")
            );
            Ok(c)
        },
    )
    .await;
    let labels = c.metadata.labels.clone().unwrap();
    assert_eq!(labels["team"], "blue");
    assert_eq!(labels["floor"], "3");
    assert_eq!(labels["portway.dev/os"], std::env::consts::OS);
    assert!(
        labels.contains_key("portway.dev/hostname")
            && labels.contains_key("portway.dev/agent-version")
    );
    assert_eq!(c.spec.connector_class_name, "portway");

    // Heartbeat: the lease is renewed at half its duration.
    let leases: Api<Lease> = Api::namespaced(env.admin.clone(), "default");
    let (holder, first) = eventually("the lease exists", WAIT, || lease_renewed(&leases)).await;
    assert_eq!(holder, node_id.to_string());
    eventually("the lease is renewed", WAIT, || async {
        let (_, t) = lease_renewed(&leases).await?;
        ensure!(t > first, "not renewed yet");
        Ok(())
    })
    .await;

    // The tunnel's objects, owned by the connector.
    let ads: Api<ConnectorAdvertisement> = Api::namespaced(env.admin.clone(), "default");
    let proxies: Api<HttpProxy> = Api::namespaced(env.admin.clone(), "default");
    let ad = ads.get("laptop-web").await.unwrap();
    assert_eq!(
        ad.metadata.owner_references.unwrap()[0].uid,
        c.metadata.uid.clone().unwrap()
    );
    assert!(
        ad.spec
            .allows("127.0.0.1", web.addr.port(), portway_api::Protocol::Tcp)
    );
    assert_eq!(
        proxies.get("laptop-web").await.unwrap().spec.hostnames,
        ["web.localhost"]
    );

    // An endpoint that is not a listed gateway is refused even for advertised targets.
    let gw = gateway(&env.relay).await;
    let conn = eventually("the gateway reaches the agent", WAIT, || {
        connect(&gw, node_id, &env.relay)
    })
    .await;
    assert_eq!(connect_status(&conn, web.addr.port()).await.unwrap(), 403);
    // The device says so on its connector: a Warning event naming the dialer and why.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(env.admin.clone(), "default");
    let dialer = gw.id().to_string();
    // By uid too, as `kubectl describe connector` asks.
    let by_uid = format!(
        "involvedObject.name=laptop,involvedObject.uid={},reason=TunnelRefused",
        c.metadata.uid.clone().unwrap()
    );
    eventually("the refusal is an event on the connector", WAIT, || async {
        let list = events
            .list(&kube::api::ListParams::default().fields(&by_uid))
            .await?;
        let e = list.items.first().context("no TunnelRefused event yet")?;
        let message = e.message.clone().unwrap_or_default();
        ensure!(
            e.type_.as_deref() == Some("Warning")
                && message.contains(&dialer)
                && message.contains("not an authorised gateway"),
            "{e:?}"
        );
        Ok(())
    })
    .await;

    // Once listed in the ConnectorClass, it reaches advertised targets, and only those.
    env.authorize(gw.id()).await;
    eventually("CONNECT to the advertised target works", WAIT, || async {
        ensure!(connect_status(&conn, web.addr.port()).await? == 200);
        Ok(())
    })
    .await;
    let port = web.addr.port();
    let abs =
        format!("GET http://127.0.0.1:{port}/absolute HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    let (code, body) = request(&conn, &abs, None).await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("saw GET /absolute"), "{body}");
    assert_eq!(
        connect_status(&conn, api_target.addr.port()).await.unwrap(),
        403,
        "not advertised"
    );
    let by_name = format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    assert_eq!(
        request(&conn, &by_name, None).await.unwrap().0,
        403,
        "another name for the same host is not advertised"
    );

    // Editing the config applies at once: a new tunnel is served, a removed one is not.
    std::fs::write(
        &config,
        tunnel_config(&[("api", api_target.addr.port(), "tcp", &[])]),
    )
    .unwrap();
    eventually(
        "the new tunnel is served and the old one withdrawn",
        WAIT,
        || async {
            ensure!(
                connect_status(&conn, api_target.addr.port()).await? == 200,
                "api not served yet"
            );
            ensure!(
                connect_status(&conn, web.addr.port()).await? == 403,
                "web still served"
            );
            ensure!(
                ads.get_opt("laptop-web").await?.is_none()
                    && proxies.get_opt("laptop-web").await?.is_none(),
                "web objects remain"
            );
            ensure!(
                ads.get_opt("laptop-api").await?.is_some(),
                "api advertisement missing"
            );
            Ok(())
        },
    )
    .await;

    // SIGTERM releases the lease and deletes nothing; the next start keeps the NodeID.
    agent.terminate(WAIT).await.unwrap();
    let spec = leases.get("laptop").await.unwrap().spec.unwrap();
    // Released: no holder; the last renewal stays, dating the departure.
    assert!(
        spec.holder_identity.is_none() && spec.renew_time.is_some(),
        "lease released: {spec:?}"
    );
    assert!(
        conns.get_opt("laptop").await.unwrap().is_some()
            && ads.get_opt("laptop-api").await.unwrap().is_some()
    );
    let again = env.agent(&config, &[]).await.unwrap();
    assert_eq!(again.ready_str("node_id"), node_id.to_string());
}

#[tokio::test]
async fn agent_rides_out_an_api_outage() {
    let mut env = env().await;
    let web = HttpTarget::spawn().await.unwrap();
    let config = env.dir.path().join("agent.toml");
    std::fs::write(
        &config,
        tunnel_config(&[("web", web.addr.port(), "http", &[])]),
    )
    .unwrap();
    let agent = env.agent(&config, &[]).await.unwrap();
    let node_id: EndpointId = agent.ready_str("node_id").parse().unwrap();
    let gw = gateway(&env.relay).await;
    env.authorize(gw.id()).await;
    let conn = eventually("the gateway reaches the agent", WAIT, || {
        connect(&gw, node_id, &env.relay)
    })
    .await;
    eventually("the tunnel serves", WAIT, || async {
        ensure!(connect_status(&conn, web.addr.port()).await? == 200);
        Ok(())
    })
    .await;

    // The API server dies: the tunnel keeps serving.
    let listen = env.apiserver.ready_str("listen");
    env.apiserver.kill9();
    assert_eq!(connect_status(&conn, web.addr.port()).await.unwrap(), 200);

    // It comes back on the same address: the agent resumes heartbeats without a restart.
    env.apiserver = apiserver(env.dir.path(), &listen).await;
    let admin = kube_client(&PathBuf::from(env.apiserver.ready_str("kubeconfig")))
        .await
        .unwrap();
    let leases: Api<Lease> = Api::namespaced(admin, "default");
    let (_, at_restart) = lease_renewed(&leases).await.unwrap();
    eventually("the agent renews its lease again", WAIT, || async {
        let (_, t) = lease_renewed(&leases).await?;
        ensure!(t > at_restart, "no renewal since the restart");
        Ok(())
    })
    .await;
    assert_eq!(connect_status(&conn, web.addr.port()).await.unwrap(), 200);

    // The relay dies: a gateway that knows the device's direct addresses still gets in.
    let conns: Api<Connector> = Api::namespaced(env.admin.clone(), "default");
    let status = conns.get("laptop").await.unwrap().status.unwrap();
    let pk = status.connection_details.unwrap().public_key.unwrap();
    let direct = pk
        .addresses
        .iter()
        .map(|a| std::net::SocketAddr::new(a.address.parse().unwrap(), a.port as u16));
    assert!(direct.len() > 0, "the agent reports direct addresses");
    env.relay_process.kill9();
    let addr = EndpointAddr::new(node_id).with_addrs(direct.map(iroh::TransportAddr::Ip));
    let direct_gw = endpoint::bind(&endpoint::Config {
        bind_addr: Some("127.0.0.1:0".parse().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    env.authorize_many(&[gw.id(), direct_gw.id()]).await;
    let direct_conn = eventually("a direct path works without the relay", WAIT, || async {
        Ok(tokio::time::timeout(
            Duration::from_secs(5),
            direct_gw.connect(addr.clone(), portway_api::TUNNEL_ALPN),
        )
        .await??)
    })
    .await;
    eventually("the tunnel serves over the direct path", WAIT, || async {
        ensure!(connect_status(&direct_conn, web.addr.port()).await? == 200);
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn bad_config_and_corrupt_keys_fail_at_start_with_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[[tunnel]]\nname = \"web\"\ntarget = \"localhost\"\n",
    )
    .unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (ok, err, _) = run(&[
        "agent",
        "--project",
        "p",
        "--relay",
        "http://127.0.0.1:1/",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains(&format!("{}:3: tunnel[0].target", config.display())),
        "{err}"
    );
    std::fs::write(
        &config,
        "[[tunnel]]\nname = \"web\"\ntarget = \"localhost:80\"\nport = 3\n",
    )
    .unwrap();
    let (ok, err, _) = run(&[
        "agent",
        "--project",
        "p",
        "--relay",
        "http://127.0.0.1:1/",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains(":4:") && err.contains("unknown field `port`"),
        "{err}"
    );
    let (ok, err, _) = run(&[
        "agent",
        "--project",
        "p",
        "--relay",
        "http://127.0.0.1:1/",
        "--tunnel",
        "web=localhost:99999",
    ]);
    assert!(!ok && err.contains("--tunnel web: target"), "{err}");

    // Key: shown, rotated, and a corrupt file is an error that leaves the file alone.
    let state = dir.path().join("state");
    let (ok, _, shown) = run(&[
        "agent",
        "key",
        "show",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok && shown.contains("node id:"), "{shown}");
    let (_, _, shown_again) = run(&[
        "agent",
        "key",
        "show",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(shown, shown_again, "the key is reused");
    let (ok, _, rotated) = run(&[
        "agent",
        "key",
        "rotate",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(ok && rotated != shown);
    std::fs::write(state.join("key"), "garbage").unwrap();
    let (ok, err, _) = run(&[
        "agent",
        "key",
        "show",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("corrupt"), "{err}");
    assert_eq!(
        std::fs::read_to_string(state.join("key")).unwrap(),
        "garbage"
    );
}

/// The local UI of `portway agent --config FILE` adds, edits and removes tunnels in that
/// file (comments and other entries kept), and the agent applies them at once: objects
/// written, then removed. A bad edit names its field and leaves the file alone.
#[tokio::test]
async fn the_local_ui_edits_the_agents_config_file() {
    let env = env().await;
    let config = env.dir.path().join("agent.toml");
    let original = "# laptop\n[[tunnel]]\nname = \"web\"  # the blog\ntarget = \"127.0.0.1:3000\"\nhostnames = [\"web.example.com\"]\n";
    std::fs::write(&config, original).unwrap();
    let agent = env
        .agent(
            &config,
            &["--ui", "127.0.0.1:0", "--tunnel", "cli=127.0.0.1:9"],
        )
        .await
        .unwrap();
    let ui = LocalUi::of(&agent);
    let (_, info) = ui.get("/api/info").await;
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        (info["mode"].as_str(), info["editable"].as_bool()),
        (Some("agent"), Some(true))
    );

    let (status, body) = ui.send(
        "POST",
        "/api/tunnels",
        r#"{"name":"api","target":"127.0.0.1:8000","protocol":"http","hostnames":["api.example.com"]}"#,
    ).await;
    assert_eq!(status, 201, "{body}");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(
        text.starts_with(original),
        "the rest of the file is kept:\n{text}"
    );
    assert!(text.contains("name = \"api\""), "{text}");
    let proxies: Api<HttpProxy> = Api::namespaced(env.admin.clone(), "default");
    eventually("the new tunnel's proxy", WAIT, || async {
        let p = proxies.get_opt("laptop-api").await?.context("not yet")?;
        ensure!(
            p.spec.hostnames == ["api.example.com"],
            "{:?}",
            p.spec.hostnames
        );
        Ok(())
    })
    .await;

    let (status, body) = ui
        .send(
            "PUT",
            "/api/tunnels/api",
            r#"{"name":"api","target":"127.0.0.1:8001","hostnames":["api2.example.com"]}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("127.0.0.1:8001")
    );
    eventually("the edited proxy", WAIT, || async {
        let p = proxies.get("laptop-api").await?;
        ensure!(
            p.spec.hostnames == ["api2.example.com"],
            "{:?}",
            p.spec.hostnames
        );
        Ok(())
    })
    .await;

    // Refused, naming the field; the file is untouched.
    let before = std::fs::read_to_string(&config).unwrap();
    for (method, path, body, status, field) in [
        (
            "POST",
            "/api/tunnels",
            r#"{"name":"x","target":"nowhere"}"#,
            422,
            Some("target"),
        ),
        (
            "POST",
            "/api/tunnels",
            r#"{"name":"web","target":"127.0.0.1:1"}"#,
            409,
            Some("name"),
        ),
        (
            "PUT",
            "/api/tunnels/cli",
            r#"{"name":"cli","target":"127.0.0.1:1"}"#,
            404,
            None,
        ),
        (
            "POST",
            "/api/tunnels",
            r#"{"name":"cli","target":"127.0.0.1:1"}"#,
            409,
            None,
        ),
    ] {
        let (got, answer) = ui.send(method, path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["field"].as_str(), field, "{answer}");
    }
    assert_eq!(std::fs::read_to_string(&config).unwrap(), before);

    let (status, body) = ui.send("DELETE", "/api/tunnels/api", "").await;
    assert_eq!(status, 204, "{body}");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), original);
    eventually("the removed tunnel's proxy is gone", WAIT, || async {
        ensure!(
            proxies.get_opt("laptop-api").await?.is_none(),
            "still there"
        );
        Ok(())
    })
    .await;
    let (_, all) = ui.get("/api/tunnels").await;
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let names: Vec<&str> = all["tunnels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "cli"]);
    assert_eq!(
        all["tunnels"][1]["editable"], false,
        "flag tunnels are not edited"
    );
}
