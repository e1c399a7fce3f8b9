//! `portway dns` and `portway relay` as real processes: dig against the DNS server, and
//! iroh endpoints that find each other by NodeID through them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use iroh::{Endpoint, SecretKey};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use portway_api::{Connector, ConnectorClass, ConnectorSpec, find_condition};
use portway_discovery::endpoint::{self, DnsLookup};
use portway_testkit::{Process, dig, eventually, kube_client};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const ZONE: &str = "portway.localhost";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

struct ControlPlane {
    _data: tempfile::TempDir,
    _apiserver: Process,
    _dns: Process,
    dns_addr: SocketAddr,
    kubeconfig: PathBuf,
}

async fn control_plane() -> ControlPlane {
    let data = tempfile::tempdir().unwrap();
    let apiserver = Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            data.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await
    .unwrap();
    let kubeconfig = PathBuf::from(apiserver.ready_str("kubeconfig"));
    let dns = Process::start(
        "dns",
        bin(),
        [
            "dns",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--zone",
            ZONE,
        ],
    )
    .await
    .unwrap();
    let dns_addr = dns.ready_str("dns").parse().unwrap();
    ControlPlane {
        _data: data,
        _apiserver: apiserver,
        _dns: dns,
        dns_addr,
        kubeconfig,
    }
}

async fn register(api: &Api<Connector>, name: &str, details: serde_json::Value) -> Connector {
    let c = Connector::new(
        name,
        ConnectorSpec {
            connector_class_name: "portway".into(),
            capabilities: vec![],
        },
    );
    if api.get_opt(name).await.unwrap().is_none() {
        api.create(&PostParams::default(), &c).await.unwrap();
    }
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(&json!({"status": {"connectionDetails": details}})),
    )
    .await
    .unwrap()
}

fn details(key: &SecretKey, relay: &str, addrs: &[&str]) -> serde_json::Value {
    let addresses: Vec<_> = addrs
        .iter()
        .map(|a| {
            let a: SocketAddr = a.parse().unwrap();
            json!({"address": a.ip().to_string(), "port": a.port()})
        })
        .collect();
    json!({"type": "PublicKey", "publicKey": {"id": key.public().to_string(), "discoveryMode": "DNS", "homeRelay": relay, "addresses": addresses}})
}

async fn condition_reason(api: &Api<Connector>, name: &str) -> anyhow::Result<String> {
    let c = api.get(name).await?;
    let conds = c.status.map(|s| s.conditions).unwrap_or_default();
    let cond =
        find_condition(&conds, "IrohDNSPublished").context("no IrohDNSPublished condition yet")?;
    Ok(cond.reason.clone())
}

#[tokio::test]
async fn dig_sees_records_that_follow_connector_status() {
    let cp = control_plane().await;
    let client = kube_client(&cp.kubeconfig).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    let key = SecretKey::generate();
    let z32 = key.public().to_z32();
    let name = format!("_iroh.{z32}.{ZONE}");
    let project_name = format!("_iroh.{z32}.default.{ZONE}");

    // The apex answers SOA and NS; unknown names are NXDOMAIN; other zones are refused.
    let soa = dig(cp.dns_addr, ZONE, "SOA", false).unwrap();
    assert_eq!(soa.status, "NOERROR");
    assert!(soa.authoritative);
    assert!(
        soa.answers[0].starts_with(&format!("ns.{ZONE}. hostmaster.{ZONE}.")),
        "{soa:?}"
    );
    assert_eq!(
        dig(cp.dns_addr, ZONE, "NS", true).unwrap().answers,
        [format!("ns.{ZONE}.")]
    );
    assert_eq!(
        dig(cp.dns_addr, &name, "TXT", false).unwrap().status,
        "NXDOMAIN"
    );
    assert_eq!(
        dig(cp.dns_addr, "example.com", "TXT", false)
            .unwrap()
            .status,
        "REFUSED"
    );

    register(
        &conns,
        "laptop",
        details(
            &key,
            "http://127.0.0.1:3340/",
            &["10.1.2.3:4000", "127.0.0.1:4000"],
        ),
    )
    .await;
    let want = vec![
        "addr=10.1.2.3:4000".to_string(),
        "addr=127.0.0.1:4000".into(),
        "relay=http://127.0.0.1:3340/".into(),
    ];
    eventually(
        "the TXT records are served over UDP and TCP",
        WAIT,
        || async {
            for (n, tcp) in [(&name, false), (&project_name, true)] {
                let a = dig(cp.dns_addr, n, "TXT", tcp)?;
                ensure!(
                    a.status == "NOERROR" && a.answers == want,
                    "{n} (tcp={tcp}): {a:?}"
                );
            }
            Ok(())
        },
    )
    .await;
    eventually("the connector says Published", WAIT, || async {
        ensure!(condition_reason(&conns, "laptop").await? == "Published");
        Ok(())
    })
    .await;
    // A name above a record exists (NODATA), and other types at a record name are empty.
    let above = dig(cp.dns_addr, &format!("{z32}.{ZONE}"), "TXT", false).unwrap();
    assert_eq!((above.status.as_str(), above.answers.len()), ("NOERROR", 0));
    let a = dig(cp.dns_addr, &name, "A", false).unwrap();
    assert_eq!((a.status.as_str(), a.answers.len()), ("NOERROR", 0));

    // A status change is served at once.
    register(
        &conns,
        "laptop",
        details(&key, "http://127.0.0.1:3340/", &["10.9.9.9:5000"]),
    )
    .await;
    eventually("the record follows the new address", WAIT, || async {
        let a = dig(cp.dns_addr, &name, "TXT", false)?;
        ensure!(
            a.answers == ["addr=10.9.9.9:5000", "relay=http://127.0.0.1:3340/"],
            "{a:?}"
        );
        Ok(())
    })
    .await;

    // The same id in another project conflicts; the older connector keeps the record.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "p2"}})).unwrap(),
        )
        .await
        .unwrap();
    let other: Api<Connector> = Api::namespaced(client.clone(), "p2");
    register(
        &other,
        "copycat",
        details(&key, "http://127.0.0.1:9999/", &[]),
    )
    .await;
    eventually("the newer claimant gets Conflict", WAIT, || async {
        ensure!(condition_reason(&other, "copycat").await? == "Conflict");
        Ok(())
    })
    .await;
    assert_eq!(
        dig(cp.dns_addr, &format!("_iroh.{z32}.p2.{ZONE}"), "TXT", false)
            .unwrap()
            .status,
        "NXDOMAIN"
    );

    // Ready=False (lease expired) withdraws the record; the other claimant then takes over.
    let not_ready = json!({"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "ConnectorNotReady", "message": "lease expired", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    conns
        .patch_status("laptop", &PatchParams::default(), &Patch::Merge(&not_ready))
        .await
        .unwrap();
    eventually(
        "the unready connector is withdrawn and the other published",
        WAIT,
        || async {
            ensure!(condition_reason(&conns, "laptop").await? == "Pending");
            ensure!(condition_reason(&other, "copycat").await? == "Published");
            let a = dig(cp.dns_addr, &name, "TXT", false)?;
            ensure!(a.answers == ["relay=http://127.0.0.1:9999/"], "{a:?}");
            Ok(())
        },
    )
    .await;

    // Deleting the connectors removes the records.
    other
        .delete("copycat", &DeleteParams::default())
        .await
        .unwrap();
    conns
        .delete("laptop", &DeleteParams::default())
        .await
        .unwrap();
    eventually("records disappear on delete", WAIT, || async {
        let a = dig(cp.dns_addr, &name, "TXT", false)?;
        ensure!(a.status == "NXDOMAIN", "{a:?}");
        Ok(())
    })
    .await;
}

async fn echo_server(ep: Endpoint) {
    while let Some(incoming) = ep.accept().await {
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let data = recv.read_to_end(1 << 20).await.unwrap_or_default();
                let _ = send.write_all(&data).await;
                let _ = send.finish();
            }
        });
    }
}

async fn round_trip(client: &Endpoint, id: iroh::EndpointId) -> anyhow::Result<()> {
    let conn = tokio::time::timeout(Duration::from_secs(10), client.connect(id, b"portway/test"))
        .await
        .context("connect timed out")??;
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(b"hello over iroh").await?;
    send.finish()?;
    let back = recv.read_to_end(1 << 20).await?;
    if back != b"hello over iroh" {
        bail!("echo mismatch: {back:?}");
    }
    Ok(())
}

#[tokio::test]
async fn endpoints_find_each_other_by_node_id_through_dns_and_relay() {
    let cp = control_plane().await;
    // Open: this test is about finding endpoints, not about who may relay.
    let relay = Process::start(
        "relay",
        bin(),
        ["relay", "--listen", "127.0.0.1:0", "--open"],
    )
    .await
    .unwrap();
    let relay_url: iroh::RelayUrl = relay.ready_str("relay").parse().unwrap();
    let client = kube_client(&cp.kubeconfig).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client, "default");
    let lookup = Some(DnsLookup {
        origin: ZONE.into(),
        nameserver: cp.dns_addr,
    });

    for (name, relay_only) in [("direct", false), ("relayed", true)] {
        let server = endpoint::bind(&endpoint::Config {
            relays: vec![relay_url.clone()],
            alpns: vec![b"portway/test".to_vec()],
            bind_addr: Some("127.0.0.1:0".parse().unwrap()),
            relay_only,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::timeout(WAIT, server.online())
            .await
            .expect("the server reaches its home relay");
        let addr = server.addr();
        if relay_only {
            assert_eq!(
                addr.ip_addrs().count(),
                0,
                "a relay-only endpoint reports no direct addresses"
            );
        }
        let details = serde_json::to_value(endpoint::connection_details(&addr)).unwrap();
        register(&conns, name, details).await;
        tokio::spawn(echo_server(server.clone()));

        // The dialer knows only the NodeID; DNS tells it the relay (and addresses).
        let dialer = endpoint::bind(&endpoint::Config {
            relays: vec![relay_url.clone()],
            dns: lookup.clone(),
            bind_addr: Some("127.0.0.1:0".parse().unwrap()),
            relay_only,
            ..Default::default()
        })
        .await
        .unwrap();
        eventually(&format!("{name}: connect by NodeID"), WAIT, || {
            round_trip(&dialer, server.id())
        })
        .await;
        dialer.close().await;
        server.close().await;
    }
}

/// The relay status of `ep`'s home relay: `Ok` once connected, the denial otherwise.
fn relay_state(ep: &Endpoint) -> anyhow::Result<Option<String>> {
    use iroh::Watcher;
    let status = ep.home_relay_status().get();
    let relay = status.first().context("no home relay")?;
    if relay.is_connected() {
        return Ok(None);
    }
    Ok(relay.auth_denied_reason().map(str::to_owned))
}

#[tokio::test]
async fn the_relay_serves_only_endpoints_the_api_knows() {
    let cp = control_plane().await;
    let relay = Process::start(
        "relay",
        bin(),
        [
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--kubeconfig",
            cp.kubeconfig.to_str().unwrap(),
        ],
    )
    .await
    .unwrap();
    let relay_url: iroh::RelayUrl = relay.ready_str("relay").parse().unwrap();
    let client = kube_client(&cp.kubeconfig).await.unwrap();
    let bind = || async {
        endpoint::bind(&endpoint::Config {
            relays: vec![relay_url.clone()],
            bind_addr: Some("127.0.0.1:0".parse().unwrap()),
            relay_only: true,
            ..Default::default()
        })
        .await
        .unwrap()
    };

    // A device: refused until its Connector reports its key.
    let device = bind().await;
    eventually("an unknown endpoint is refused", WAIT, || async {
        relay_state(&device)?.context("not refused yet")
    })
    .await;
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    let key_only = json!({"type": "PublicKey", "publicKey": {"id": device.id().to_string()}});
    register(&conns, "device", key_only).await;
    tokio::time::timeout(WAIT, device.online())
        .await
        .expect("a registered device reaches the relay");

    // A gateway: refused until a ConnectorClass lists it.
    let gateway = bind().await;
    eventually("an unlisted gateway is refused", WAIT, || async {
        relay_state(&gateway)?.context("not refused yet")
    })
    .await;
    let classes: Api<ConnectorClass> = Api::all(client);
    let class = serde_json::from_value(
        json!({"metadata": {"name": "portway"}, "spec": {"controllerName": "portway.dev/operator"}}),
    )
    .unwrap();
    if classes.get_opt("portway").await.unwrap().is_none() {
        classes
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
    }
    let gateways =
        json!({"status": {"gateways": [{"name": "test", "endpointId": gateway.id().to_string()}]}});
    classes
        .patch_status("portway", &PatchParams::default(), &Patch::Merge(&gateways))
        .await
        .unwrap();
    tokio::time::timeout(WAIT, gateway.online())
        .await
        .expect("a listed gateway reaches the relay");
    gateway.close().await;
    device.close().await;
}

#[tokio::test]
async fn relay_serves_https_with_a_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("relay.crt"), dir.path().join("relay.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let relay = Process::start(
        "relay",
        bin(),
        [
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--hostname",
            "localhost",
            "--tls-cert",
            cert_path.to_str().unwrap(),
            "--tls-key",
            key_path.to_str().unwrap(),
            "--open",
        ],
    )
    .await
    .unwrap();
    let url = relay.ready_str("relay");
    assert!(url.starts_with("https://localhost:"), "{url}");
    assert!(
        relay.ready()["quic"].is_string(),
        "QUIC address discovery runs beside HTTPS: {}",
        relay.ready()
    );
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "--cacert",
            cert_path.to_str().unwrap(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url,
        ])
        .output()
        .unwrap();
    let code = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && code == "200",
        "curl {url}: {code} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
