//! The API server as a real process, driven by kube-rs, kubectl and raw HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, ensure};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use portway_api::{
    Connector, ConnectorAdvertisement, ConnectorAdvertisementSpec, ConnectorSpec, HttpProxy,
    Layer4Advertisement, Layer4Service, LocalObjectReference, Protocol, ServicePort,
};
use portway_testkit::{Kubectl, Process, eventually, kube_client, kubectls};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portway"))
}

async fn apiserver(data: &Path, listen: &str, extra: &[&str]) -> Process {
    let mut args = vec![
        "apiserver",
        "--data",
        data.to_str().unwrap(),
        "--listen",
        listen,
    ];
    args.extend_from_slice(extra);
    Process::start("apiserver", bin(), args).await.unwrap()
}

/// One user per role; the agent and the viewer keep to namespace `p1`.
const USERS: &str = "admin-token-0000000000,root,admin,*\n\
                     operator-token-00000000,op,operator,*\n\
                     agent-token-00000000000,dev,agent,p1\n\
                     viewer-token-0000000000,eve,viewer,p1\n";

/// An API server whose tokens file holds [`USERS`].
async fn apiserver_with_users(data: &Path) -> Process {
    let tokens = data.join("tokens.csv");
    std::fs::write(&tokens, USERS).unwrap();
    apiserver(data, "127.0.0.1:0", &["--tokens", tokens.to_str().unwrap()]).await
}

fn kubeconfig(p: &Process) -> PathBuf {
    PathBuf::from(p.ready_str("kubeconfig"))
}

fn connector(name: &str, labels: &[(&str, &str)]) -> Connector {
    let mut c = Connector::new(
        name,
        ConnectorSpec {
            connector_class_name: "portway".into(),
            capabilities: vec![],
        },
    );
    c.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    c
}

fn advertisement(name: &str, connector: &Connector, port: i32) -> ConnectorAdvertisement {
    let mut a = ConnectorAdvertisement::new(
        name,
        ConnectorAdvertisementSpec {
            connector_ref: LocalObjectReference {
                name: connector.metadata.name.clone().unwrap(),
            },
            layer4: vec![Layer4Advertisement {
                name: "web".into(),
                services: vec![Layer4Service {
                    address: "127.0.0.1".into(),
                    ports: vec![ServicePort {
                        name: None,
                        port,
                        protocol: Protocol::Tcp,
                    }],
                }],
            }],
        },
    );
    a.metadata.owner_references = Some(vec![
        kube::Resource::controller_owner_ref(connector, &()).unwrap(),
    ]);
    a
}

fn hex_id(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

fn code(e: &kube::Error) -> u16 {
    match e {
        kube::Error::Api(s) => s.code,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_rs_crud_selectors_conflicts_status_and_cascade() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    let advs: Api<ConnectorAdvertisement> = Api::namespaced(client.clone(), "default");
    let pp = PostParams::default();

    let c1 = conns
        .create(&pp, &connector("c1", &[("app", "web")]))
        .await
        .unwrap();
    conns
        .create(&pp, &connector("c2", &[("app", "db")]))
        .await
        .unwrap();
    assert_eq!(c1.metadata.generation, Some(1));
    assert!(c1.metadata.uid.is_some() && c1.metadata.creation_timestamp.is_some());
    assert_eq!(
        code(&conns.create(&pp, &connector("c1", &[])).await.unwrap_err()),
        409
    );
    assert_eq!(
        conns.get("c1").await.unwrap().metadata.labels.unwrap()["app"],
        "web"
    );

    let names = |list: kube::core::ObjectList<Connector>| -> Vec<String> {
        list.items
            .into_iter()
            .map(|c| c.metadata.name.unwrap())
            .collect()
    };
    assert_eq!(
        names(
            conns
                .list(&ListParams::default().labels("app=web"))
                .await
                .unwrap()
        ),
        ["c1"]
    );
    assert_eq!(
        names(
            conns
                .list(&ListParams::default().labels("app in (web,db)"))
                .await
                .unwrap()
        ),
        ["c1", "c2"]
    );
    assert_eq!(
        names(
            conns
                .list(&ListParams::default().fields("metadata.name=c2"))
                .await
                .unwrap()
        ),
        ["c2"]
    );
    let page = conns.list(&ListParams::default().limit(1)).await.unwrap();
    assert_eq!(names(page.clone()), ["c1"]);
    let rest = conns
        .list(
            &ListParams::default()
                .limit(1)
                .continue_token(page.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(names(rest.clone()), ["c2"]);
    assert_eq!(
        rest.metadata.resource_version,
        page.metadata.resource_version
    );

    // Status: written through /status only; the main resource ignores it.
    let status = json!({"status": {"connectionDetails": {"type": "PublicKey", "publicKey": {
        "id": hex_id(0xab), "discoveryMode": "DNS", "homeRelay": "http://127.0.0.1:3340/",
        "addresses": [{"address": "127.0.0.1", "port": 4000}]}}}});
    let patched = conns
        .patch_status("c1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(patched.endpoint_id(), Some(hex_id(0xab).as_str()));
    assert_eq!(
        patched.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );
    let by_id = conns
        .list(&ListParams::default().fields(&format!(
            "status.connectionDetails.publicKey.id={}",
            hex_id(0xab)
        )))
        .await
        .unwrap();
    assert_eq!(names(by_id), ["c1"]);
    let spec_and_status =
        json!({"spec": {"connectorClassName": "other"}, "status": {"leaseRef": {"name": "x"}}});
    let p = conns
        .patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(&spec_and_status),
        )
        .await
        .unwrap();
    assert_eq!(p.spec.connector_class_name, "other");
    assert!(
        p.status.unwrap().lease_ref.is_none(),
        "the main resource must not write status"
    );
    assert_eq!(
        p.metadata.generation,
        Some(2),
        "a spec change bumps generation"
    );
    let p = conns
        .patch_status(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"connectorClassName": "x"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        p.spec.connector_class_name, "other",
        "/status must not write spec"
    );

    // Optimistic concurrency: a replace carrying an old resourceVersion is refused.
    let mut stale = c1.clone();
    stale.spec.connector_class_name = "stale".into();
    let err = conns.replace("c1", &pp, &stale).await.unwrap_err();
    assert_eq!(code(&err), 409);
    let mut fresh = conns.get("c1").await.unwrap();
    fresh.spec.connector_class_name = "portway".into();
    let replaced = conns.replace("c1", &pp, &fresh).await.unwrap();
    assert_ne!(
        replaced.metadata.resource_version,
        fresh.metadata.resource_version
    );

    // Deleting the connector deletes the advertisement it owns, not the other one.
    let c1 = conns.get("c1").await.unwrap();
    let c2 = conns.get("c2").await.unwrap();
    advs.create(&pp, &advertisement("c1-web", &c1, 3000))
        .await
        .unwrap();
    advs.create(&pp, &advertisement("c2-web", &c2, 3000))
        .await
        .unwrap();
    let by_ref = advs
        .list(&ListParams::default().fields("spec.connectorRef.name=c1"))
        .await
        .unwrap();
    assert_eq!(by_ref.items.len(), 1);
    conns.delete("c1", &DeleteParams::default()).await.unwrap();
    eventually("the owned advertisement is collected", WAIT, || async {
        let left: Vec<String> = advs
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|a| a.metadata.name.unwrap())
            .collect();
        ensure!(left == ["c2-web"], "left: {left:?}");
        Ok(())
    })
    .await;
    assert_eq!(code(&conns.get("c1").await.unwrap_err()), 404);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client, "default");
    let mut c = connector("held", &[]);
    c.metadata.finalizers = Some(vec!["portway.dev/test".into()]);
    conns.create(&PostParams::default(), &c).await.unwrap();
    conns
        .delete("held", &DeleteParams::default())
        .await
        .unwrap();
    let marked = conns.get("held").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    let add = json!({"metadata": {"finalizers": ["portway.dev/test", "portway.dev/new"]}});
    assert_eq!(
        code(
            &conns
                .patch("held", &PatchParams::default(), &Patch::Merge(&add))
                .await
                .unwrap_err()
        ),
        422
    );
    let clear = json!([{"op": "remove", "path": "/metadata/finalizers"}]);
    conns
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(clear).unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(code(&conns.get("held").await.unwrap_err()), 404);
}

#[tokio::test]
async fn server_side_apply_tracks_owners_and_conflicts() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let proxies: Api<HttpProxy> = Api::namespaced(client, "default");
    let manifest = |hosts: &[&str], label: Option<&str>| {
        let mut m = json!({
            "apiVersion": "networking.datumapis.com/v1alpha", "kind": "HTTPProxy",
            "metadata": {"name": "web"},
            "spec": {"hostnames": hosts, "rules": [{"backends": [{"endpoint": "http://127.0.0.1:3000", "connector": {"name": "c"}}]}]},
        });
        if let Some(l) = label {
            m["metadata"]["labels"] = json!({"team": l});
        }
        m
    };
    let alice = PatchParams::apply("alice");
    let created = proxies
        .patch(
            "web",
            &alice,
            &Patch::Apply(manifest(&["a.example.com"], Some("x"))),
        )
        .await
        .unwrap();
    assert_eq!(created.spec.hostnames, ["a.example.com"]);
    let managed = created.metadata.managed_fields.unwrap();
    assert_eq!(managed[0].manager.as_deref(), Some("alice"));
    assert_eq!(managed[0].operation.as_deref(), Some("Apply"));

    let err = proxies
        .patch(
            "web",
            &PatchParams::apply("bob"),
            &Patch::Apply(manifest(&["b.example.com"], None)),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(status.code, 409);
    assert!(
        status.message.contains("conflict with \"alice\"")
            && status.message.contains(".spec.hostnames"),
        "{}",
        status.message
    );

    let forced = proxies
        .patch(
            "web",
            &PatchParams::apply("bob").force(),
            &Patch::Apply(manifest(&["b.example.com"], None)),
        )
        .await
        .unwrap();
    assert_eq!(forced.spec.hostnames, ["b.example.com"]);
    // Alice drops her label from her next apply; the field goes away because only she owned it.
    let mut alice_again = manifest(&["b.example.com"], None);
    alice_again["spec"]
        .as_object_mut()
        .unwrap()
        .remove("hostnames");
    let after = proxies
        .patch("web", &alice, &Patch::Apply(alice_again))
        .await
        .unwrap();
    assert!(after.metadata.labels.unwrap_or_default().is_empty());
    assert_eq!(
        after.spec.hostnames,
        ["b.example.com"],
        "bob still owns the hostnames"
    );
}

/// Collects watcher events as compact strings, for order checks.
fn describe(event: &watcher::Event<Connector>) -> String {
    match event {
        watcher::Event::Init => "init".into(),
        watcher::Event::InitApply(c) => format!(
            "init-apply {}",
            c.metadata.name.as_deref().unwrap_or_default()
        ),
        watcher::Event::InitDone => "init-done".into(),
        watcher::Event::Apply(c) => format!(
            "apply {} {}",
            c.metadata.name.as_deref().unwrap_or_default(),
            c.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("v"))
                .map_or("-", String::as_str)
        ),
        watcher::Event::Delete(c) => {
            format!("delete {}", c.metadata.name.as_deref().unwrap_or_default())
        }
    }
}

#[tokio::test]
async fn watcher_sees_every_change_in_order_and_survives_a_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let listen = server.ready_str("listen");
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    conns
        .create(&PostParams::default(), &connector("before", &[]))
        .await
        .unwrap();

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let watch_api = conns.clone();
    let task = tokio::spawn(async move {
        let mut stream = watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(item) = stream.next().await {
            if let Ok(event) = item {
                let _ = tx.send(describe(&event));
            }
        }
    });
    let mut next = async || {
        tokio::time::timeout(WAIT, rx.recv())
            .await
            .expect("watch event")
            .expect("watch open")
    };
    assert_eq!(next().await, "init");
    assert_eq!(next().await, "init-apply before");
    assert_eq!(next().await, "init-done");

    conns
        .create(&PostParams::default(), &connector("w", &[("v", "1")]))
        .await
        .unwrap();
    for v in 2..=4 {
        let p = json!({"metadata": {"labels": {"v": v.to_string()}}});
        conns
            .patch("w", &PatchParams::default(), &Patch::Merge(&p))
            .await
            .unwrap();
    }
    conns.delete("w", &DeleteParams::default()).await.unwrap();
    for expected in [
        "apply w 1",
        "apply w 2",
        "apply w 3",
        "apply w 4",
        "delete w",
    ] {
        assert_eq!(next().await, expected);
    }

    // Restart on the same port; the watcher resumes (from history, or by relisting).
    server.terminate(WAIT).await.unwrap();
    let _server = apiserver(data.path(), &listen, &[]).await;
    let conns: Api<Connector> = Api::namespaced(client, "default");
    eventually("the API server accepts writes again", WAIT, || async {
        conns
            .create(&PostParams::default(), &connector("after", &[]))
            .await
            .context("create")?;
        Ok(())
    })
    .await;
    loop {
        let e = next().await;
        if e == "apply after -" || e == "init-apply after" {
            break;
        }
        assert!(
            ["init", "init-apply before", "init-done", "apply before -"].contains(&e.as_str()),
            "unexpected {e}"
        );
    }
    task.abort();
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() {
    let data = tempfile::tempdir().unwrap();
    let mut server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client, "default");
    let writes = futures::stream::iter(0..40)
        .map(|i| {
            let conns = conns.clone();
            async move {
                conns
                    .create(&PostParams::default(), &connector(&format!("c{i}"), &[]))
                    .await
            }
        })
        .buffer_unordered(8)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let mut acked: Vec<(String, String)> = writes
        .into_iter()
        .map(|c| {
            (
                c.metadata.name.unwrap(),
                c.metadata.resource_version.unwrap(),
            )
        })
        .collect();
    acked.sort();
    server.kill9();

    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client, "default");
    let mut stored: Vec<(String, String)> = conns
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|c| {
            (
                c.metadata.name.unwrap(),
                c.metadata.resource_version.unwrap(),
            )
        })
        .collect();
    stored.sort();
    assert_eq!(stored, acked);
}

/// Sends a raw request with the admin client; returns status code and JSON body.
async fn raw(
    client: &kube::Client,
    method: &str,
    path: &str,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, Value) {
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body)
        .unwrap();
    let resp = client
        .send(req.map(kube::client::Body::from))
        .await
        .unwrap();
    let code = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (code, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_stores_nothing() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns_path = "/apis/networking.datumapis.com/v1alpha1/namespaces/default/connectors";
    let proxies_path = "/apis/networking.datumapis.com/v1alpha/namespaces/default/httpproxies";
    let advs_path =
        "/apis/networking.datumapis.com/v1alpha1/namespaces/default/connectoradvertisements";
    let conn = |name: &str| json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector", "metadata": {"name": name}, "spec": {"connectorClassName": "portway"}});
    let json_ct = "application/json";
    let to_vec = |v: &Value| serde_json::to_vec(v).unwrap();

    // (what, path, content type, body, code, reason, a word the message must contain)
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        (
            "invalid name",
            conns_path,
            json_ct,
            to_vec(&conn("Bad_Name")),
            422,
            "Invalid",
            "metadata.name",
        ),
        (
            "invalid hostname",
            proxies_path,
            json_ct,
            to_vec(
                &json!({"apiVersion": "networking.datumapis.com/v1alpha", "kind": "HTTPProxy", "metadata": {"name": "p"},
                "spec": {"hostnames": ["bad host"], "rules": [{"backends": [{"endpoint": "http://127.0.0.1:1"}]}]}}),
            ),
            422,
            "Invalid",
            "spec.hostnames[0]",
        ),
        (
            "invalid port",
            advs_path,
            json_ct,
            to_vec(
                &json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "ConnectorAdvertisement", "metadata": {"name": "a"},
                "spec": {"connectorRef": {"name": "c"}, "layer4": [{"name": "web", "services": [{"address": "127.0.0.1", "ports": [{"port": 70000}]}]}]}}),
            ),
            422,
            "Invalid",
            "spec.layer4[0].services[0].ports[0].port",
        ),
        (
            "unknown field",
            conns_path,
            json_ct,
            to_vec(
                &json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector", "metadata": {"name": "u"},
                "spec": {"connectorClassName": "portway", "colour": "blue"}}),
            ),
            400,
            "BadRequest",
            "spec.colour",
        ),
        (
            "wrong type",
            conns_path,
            json_ct,
            to_vec(
                &json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector", "metadata": {"name": "t"}, "spec": {"connectorClassName": 7}}),
            ),
            422,
            "Invalid",
            "spec.connectorClassName",
        ),
        (
            "wrong content type",
            conns_path,
            "text/plain",
            to_vec(&conn("ct")),
            415,
            "UnsupportedMediaType",
            "text/plain",
        ),
        (
            "protobuf body",
            conns_path,
            "application/vnd.kubernetes.protobuf",
            vec![0x6b, 0x38, 0x73, 0],
            415,
            "UnsupportedMediaType",
            "protobuf",
        ),
        (
            "invalid JSON",
            conns_path,
            json_ct,
            b"{\"apiVersion\": ".to_vec(),
            400,
            "BadRequest",
            "JSON",
        ),
        (
            "not an object",
            conns_path,
            json_ct,
            b"[1,2]".to_vec(),
            400,
            "BadRequest",
            "object",
        ),
        (
            "oversized body",
            conns_path,
            json_ct,
            vec![b' '; 4 * 1024 * 1024],
            413,
            "RequestEntityTooLarge",
            "limit",
        ),
        (
            "kind mismatch",
            conns_path,
            json_ct,
            to_vec(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}})),
            400,
            "BadRequest",
            "API version",
        ),
    ];
    for (what, path, ct, body, want_code, want_reason, mention) in cases {
        let (code, status) = raw(&client, "POST", path, ct, body).await;
        assert_eq!(code, want_code, "{what}: {status}");
        assert_eq!(status["kind"], "Status", "{what}: {status}");
        assert_eq!(status["reason"], want_reason, "{what}: {status}");
        assert!(
            status.to_string().contains(mention),
            "{what}: status should mention {mention:?}: {status}"
        );
    }
    let (code, status) = raw(
        &client,
        "PATCH",
        &format!("{conns_path}/nope"),
        "application/strategic-merge-patch+json",
        b"{}".to_vec(),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (415, Some("UnsupportedMediaType"))
    );
    let (code, _) = raw(
        &client,
        "GET",
        "/apis/networking.datumapis.com/v1alpha1/namespaces/default/gadgets",
        json_ct,
        vec![],
    )
    .await;
    assert_eq!(code, 404);

    for path in [conns_path, proxies_path, advs_path] {
        let (code, list) = raw(&client, "GET", path, json_ct, vec![]).await;
        assert_eq!(code, 200);
        assert_eq!(list["items"], json!([]), "nothing may be stored at {path}");
    }
}

#[tokio::test]
async fn roles_are_enforced_per_namespace() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver_with_users(data.path()).await;
    let admin_client = kube_client(&kubeconfig(&server)).await.unwrap();
    let namespaces: Api<Namespace> = Api::all(admin_client.clone());
    for ns in ["p1", "p2"] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
            )
            .await
            .unwrap();
    }
    let client_for = |token: &str| {
        let mut config = kube::Config::new(server.ready_str("apiserver").parse().unwrap());
        config.root_cert = None;
        config.accept_invalid_certs = true;
        config.auth_info.token = Some(token.to_owned().into());
        kube::Client::try_from(config).unwrap()
    };

    let no_token = {
        let mut config = kube::Config::new(server.ready_str("apiserver").parse().unwrap());
        config.accept_invalid_certs = true;
        kube::Client::try_from(config).unwrap()
    };
    let err = Api::<Connector>::namespaced(no_token, "p1")
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 401);
    let bad = client_for("wrong-token-000000000000");
    assert_eq!(
        code(
            &Api::<Connector>::all(bad)
                .list(&ListParams::default())
                .await
                .unwrap_err()
        ),
        401
    );

    // (role, namespace, kind, operation, allowed)
    type Op = &'static str;
    let table: Vec<(&str, Option<&str>, &str, Op, bool)> = vec![
        (
            "admin-token-0000000000",
            Some("p2"),
            "Connector",
            "create",
            true,
        ),
        ("admin-token-0000000000", None, "Namespace", "create", true),
        (
            "operator-token-00000000",
            Some("p2"),
            "HTTPRoute",
            "create",
            true,
        ),
        ("operator-token-00000000", None, "Connector", "list", true),
        (
            "operator-token-00000000",
            None,
            "Namespace",
            "create",
            false,
        ),
        (
            "agent-token-00000000000",
            Some("p1"),
            "Connector",
            "create",
            true,
        ),
        (
            "agent-token-00000000000",
            Some("p1"),
            "Lease",
            "create",
            true,
        ),
        (
            "agent-token-00000000000",
            Some("p1"),
            "HTTPProxy",
            "list",
            true,
        ),
        (
            "agent-token-00000000000",
            Some("p2"),
            "Connector",
            "list",
            false,
        ),
        (
            "agent-token-00000000000",
            Some("p2"),
            "Connector",
            "create",
            false,
        ),
        ("agent-token-00000000000", None, "Connector", "list", false),
        (
            "agent-token-00000000000",
            Some("p1"),
            "HTTPRoute",
            "list",
            false,
        ),
        (
            "agent-token-00000000000",
            Some("p1"),
            "HTTPRoute",
            "create",
            false,
        ),
        (
            "agent-token-00000000000",
            None,
            "ConnectorClass",
            "list",
            true,
        ),
        (
            "agent-token-00000000000",
            None,
            "ConnectorClass",
            "create",
            false,
        ),
        (
            "viewer-token-0000000000",
            Some("p1"),
            "Connector",
            "list",
            true,
        ),
        (
            "viewer-token-0000000000",
            Some("p1"),
            "HTTPRoute",
            "list",
            true,
        ),
        (
            "viewer-token-0000000000",
            Some("p1"),
            "Connector",
            "create",
            false,
        ),
        (
            "viewer-token-0000000000",
            Some("p2"),
            "Connector",
            "list",
            false,
        ),
    ];
    let mut n = 0;
    for (token, ns, kind, op, allowed) in table {
        n += 1;
        let client = client_for(token);
        let name = format!("obj{n}");
        let (gvk_path, body) = match kind {
            "Connector" => (
                "apis/networking.datumapis.com/v1alpha1",
                json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "Connector", "metadata": {"name": name}, "spec": {"connectorClassName": "portway"}}),
            ),
            "Lease" => (
                "apis/coordination.k8s.io/v1",
                json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": name}, "spec": {}}),
            ),
            "HTTPProxy" => ("apis/networking.datumapis.com/v1alpha", json!({})),
            "HTTPRoute" => (
                "apis/gateway.networking.k8s.io/v1",
                json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": name}, "spec": {}}),
            ),
            "ConnectorClass" => (
                "apis/networking.datumapis.com/v1alpha1",
                json!({"apiVersion": "networking.datumapis.com/v1alpha1", "kind": "ConnectorClass", "metadata": {"name": name}, "spec": {"controllerName": "x.dev/y"}}),
            ),
            "Namespace" => (
                "api/v1",
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
            ),
            _ => unreachable!(),
        };
        let plural = match kind {
            "HTTPProxy" => "httpproxies".to_owned(),
            "ConnectorClass" => "connectorclasses".to_owned(),
            k => format!("{}s", k.to_lowercase()),
        };
        let path = match ns {
            Some(ns) => format!("/{gvk_path}/namespaces/{ns}/{plural}"),
            None => format!("/{gvk_path}/{plural}"),
        };
        let (method, body) = if op == "create" {
            ("POST", serde_json::to_vec(&body).unwrap())
        } else {
            ("GET", vec![])
        };
        let (code, status) = raw(&client, method, &path, "application/json", body).await;
        if allowed {
            assert!(
                code == 200 || code == 201,
                "{token} {op} {kind} in {ns:?} should be allowed: {code} {status}"
            );
        } else {
            assert_eq!(
                code, 403,
                "{token} {op} {kind} in {ns:?} should be forbidden: {status}"
            );
            assert!(
                status["message"]
                    .as_str()
                    .unwrap()
                    .contains("is forbidden: User"),
                "{status}"
            );
        }
    }
}

#[tokio::test]
async fn kubectl_get_apply_describe_watch_delete() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let kubeconfig = kubeconfig(&server);
    let client = kube_client(&kubeconfig).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client, "default");
    let manifest = |label: &str| {
        format!(
            "apiVersion: networking.datumapis.com/v1alpha1\nkind: Connector\nmetadata:\n  name: laptop\n  labels: {{team: {label}}}\nspec:\n  connectorClassName: portway\n\
             ---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - {{name: http, port: 80}}\n  - {{name: https, port: 443}}\n"
        )
    };
    for bin in kubectls() {
        let k = Kubectl::new(bin.clone(), &kubeconfig);
        let out = k.ok(&["apply", "-f", "-"], Some(&manifest("a")));
        assert!(
            out.contains("connector.networking.datumapis.com/laptop created"),
            "{bin:?}: {out}"
        );
        let status = json!({"status": {"connectionDetails": {"type": "PublicKey", "publicKey": {"id": hex_id(7), "homeRelay": "http://127.0.0.1:3340/"}}}});
        conns
            .patch_status("laptop", &PatchParams::default(), &Patch::Merge(&status))
            .await
            .unwrap();

        let table = k.ok(&["get", "connectors"], None);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["NAME", "READY", "NODE-ID", "RELAY", "AGE"],
            "{bin:?}: {table}"
        );
        assert!(
            table.contains(&hex_id(7)) && table.contains("http://127.0.0.1:3340/"),
            "{bin:?}: {table}"
        );
        let all = k.ok(&["get", "conn", "-A"], None);
        assert!(
            all.starts_with("NAMESPACE") && all.contains("default"),
            "{bin:?}: {all}"
        );

        // Changing the manifest patches the object; Service ports merge by key.
        let out = k.ok(
            &["apply", "-f", "-"],
            Some(&manifest("b").replace("port: 443", "port: 8443")),
        );
        assert!(
            out.contains("connector.networking.datumapis.com/laptop configured"),
            "{bin:?}: {out}"
        );
        assert_eq!(
            conns.get("laptop").await.unwrap().metadata.labels.unwrap()["team"],
            "b"
        );
        let ports = k.ok(
            &[
                "get",
                "service",
                "web",
                "-o",
                "jsonpath={.spec.ports[*].port}",
            ],
            None,
        );
        assert_eq!(ports, "80 8443", "{bin:?}");

        let described = k.ok(&["describe", "connector", "laptop"], None);
        assert!(
            described.contains("Name:")
                && described.contains("laptop")
                && described.contains(&hex_id(7)),
            "{bin:?}: {described}"
        );

        // `get -w` prints a change made while it watches.
        let mut watch = std::process::Command::new(&k.bin)
            .args(["get", "connectors", "-w"])
            .env("KUBECONFIG", &kubeconfig)
            .env("KUBECACHEDIR", data.path().join("kc-cache"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = watch.stdout.take().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let _ = tx.send(line);
            }
        });
        let first = tokio::time::timeout(WAIT, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(first.starts_with("NAME"), "{first}");
        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "ConnectorReady", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
        conns
            .patch_status("laptop", &PatchParams::default(), &Patch::Merge(&ready))
            .await
            .unwrap();
        loop {
            let line = tokio::time::timeout(WAIT, rx.recv())
                .await
                .expect("kubectl get -w shows the change")
                .unwrap();
            if line.starts_with("laptop") && line.split_whitespace().nth(1) == Some("True") {
                break;
            }
        }
        let _ = watch.kill();
        let _ = watch.wait();

        let out = k.ok(&["delete", "connector", "laptop"], None);
        assert!(out.contains("deleted"), "{bin:?}: {out}");
        k.ok(&["delete", "service", "web"], None);
        let (ok, _, err) = k.run(&["get", "connector", "laptop"], None);
        assert!(!ok && err.contains("NotFound"), "{bin:?}: {err}");
        let (ok, _, err) = k.run(
            &["apply", "-f", "-"],
            Some(&manifest("c").replace(
                "connectorClassName: portway",
                "connectorClassName: portway\n  extra: 1",
            )),
        );
        assert!(
            !ok && err.contains("unknown field"),
            "{bin:?} must reject unknown fields: {err}"
        );
    }
}

#[tokio::test]
async fn watch_from_compacted_history_gets_410_in_stream() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &["--history", "5"]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    let first = conns
        .create(&PostParams::default(), &connector("c0", &[]))
        .await
        .unwrap();
    let first_rv: u64 = first.metadata.resource_version.unwrap().parse().unwrap();
    for i in 1..10 {
        conns
            .create(&PostParams::default(), &connector(&format!("c{i}"), &[]))
            .await
            .unwrap();
    }
    let path = format!(
        "/apis/networking.datumapis.com/v1alpha1/namespaces/default/connectors?watch=true&resourceVersion={first_rv}&timeoutSeconds=5"
    );
    let req = http::Request::get(path)
        .body(kube::client::Body::empty())
        .unwrap();
    let resp = client.send(req).await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the 410 travels inside the stream, where kube-rs looks for it"
    );
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let event: Value =
        serde_json::from_slice(bytes.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");

    // A recent revision still resumes, replaying only later changes.
    let recent = conns
        .get("c8")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let path = format!(
        "/apis/networking.datumapis.com/v1alpha1/namespaces/default/connectors?watch=true&resourceVersion={recent}&timeoutSeconds=1"
    );
    let resp = client
        .send(
            http::Request::get(path)
                .body(kube::client::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    let bytes = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    let names: Vec<String> = bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice::<Value>(l).unwrap()["object"]["metadata"]["name"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(names, ["c9"]);
}

#[tokio::test]
async fn kubectl_server_side_apply_and_namespace_teardown() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let kubeconfig = kubeconfig(&server);
    let client = kube_client(&kubeconfig).await.unwrap();
    let k = Kubectl::new(PathBuf::from("kubectl"), &kubeconfig);
    k.ok(
        &["create", "-f", "-"],
        Some("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: proj\n"),
    );
    let manifest = "apiVersion: networking.datumapis.com/v1alpha\nkind: HTTPProxy\nmetadata:\n  name: web\n  namespace: proj\nspec:\n  hostnames: [web.example.com]\n  rules:\n  - backends:\n    - endpoint: http://127.0.0.1:3000\n      connector: {name: laptop}\n";
    let out = k.ok(&["apply", "--server-side", "-f", "-"], Some(manifest));
    assert!(out.contains("serverside-applied"), "{out}");
    let out = k.ok(
        &["apply", "--server-side", "-f", "-"],
        Some(&manifest.replace("web.example.com", "www.example.com")),
    );
    assert!(out.contains("serverside-applied"), "{out}");
    let proxies: Api<HttpProxy> = Api::namespaced(client.clone(), "proj");
    assert_eq!(
        proxies.get("web").await.unwrap().spec.hostnames,
        ["www.example.com"]
    );

    // Deleting a namespace (a project) deletes what is in it.
    k.ok(&["delete", "namespace", "proj"], None);
    eventually("the project and its contents are gone", WAIT, || async {
        ensure!(
            proxies.list(&ListParams::default()).await?.items.is_empty(),
            "proxies remain"
        );
        let ns: Api<Namespace> = Api::all(client.clone());
        ensure!(ns.get_opt("proj").await?.is_none(), "namespace remains");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn kubectl_create_sends_protobuf_for_built_in_kinds() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let kubeconfig = kubeconfig(&server);
    let client = kube_client(&kubeconfig).await.unwrap();
    for (i, bin) in kubectls().into_iter().enumerate() {
        // kubectl 1.32 sends these as Kubernetes protobuf; 1.20 as JSON.
        let k = Kubectl::new(bin.clone(), &kubeconfig);
        let ns = format!("team-{i}");
        let out = k.ok(&["create", "namespace", &ns], None);
        assert!(
            out.contains(&format!("namespace/{ns} created")),
            "{bin:?}: {out}"
        );
        let created = Api::<Namespace>::all(client.clone())
            .get(&ns)
            .await
            .unwrap();
        assert_eq!(
            created.status.unwrap().phase.as_deref(),
            Some("Active"),
            "{bin:?}"
        );
        let out = k.ok(
            &[
                "create",
                "service",
                "clusterip",
                "web",
                "--tcp=80:8080",
                "--tcp=443:https",
                "-n",
                &ns,
            ],
            None,
        );
        assert!(out.contains("service/web created"), "{bin:?}: {out}");
        let ports = k.ok(
            &[
                "get",
                "service",
                "web",
                "-n",
                &ns,
                "-o",
                "jsonpath={.spec.ports[*].port} {.spec.ports[*].targetPort} {.spec.selector.app}",
            ],
            None,
        );
        assert_eq!(ports, "80 443 8080 https web", "{bin:?}");
        let (ok, _, err) = k.run(&["create", "namespace", &ns], None);
        assert!(!ok && err.contains("AlreadyExists"), "{bin:?}: {err}");
    }

    // Custom resources take no protobuf, as in Kubernetes; a built-in kind says what it
    // takes when a body is not valid protobuf.
    let magic_only = vec![0x6b, 0x38, 0x73, 0];
    let (code, status) = raw(
        &client,
        "POST",
        "/api/v1/namespaces",
        "application/vnd.kubernetes.protobuf",
        [magic_only.as_slice(), &[0x12, 0x05, 0x0a]].concat(),
    )
    .await;
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")));
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .contains("error decoding the request body as protobuf"),
        "{status}"
    );
}

/// A kubeconfig like the admin one, for another token.
fn kubeconfig_for(admin: &Path, admin_token: &str, token: &str, dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(admin).unwrap();
    assert!(text.contains(admin_token));
    let path = dir.join(format!("kubeconfig-{token}"));
    std::fs::write(&path, text.replace(admin_token, token)).unwrap();
    path
}

#[tokio::test]
async fn kubectl_auth_can_i_and_whoami_answer_from_roles() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver_with_users(data.path()).await;
    let admin = kubeconfig(&server);
    let viewer = kubeconfig_for(
        &admin,
        "admin-token-0000000000",
        "viewer-token-0000000000",
        data.path(),
    );
    let agent = kubeconfig_for(
        &admin,
        "admin-token-0000000000",
        "agent-token-00000000000",
        data.path(),
    );
    for bin in kubectls() {
        let as_admin = Kubectl::new(bin.clone(), &admin);
        let as_viewer = Kubectl::new(bin.clone(), &viewer);
        let as_agent = Kubectl::new(bin.clone(), &agent);
        // (who, arguments after `auth can-i`, allowed)
        let cases: Vec<(&Kubectl, Vec<&str>, bool)> = vec![
            (&as_admin, vec!["create", "namespaces"], true),
            (&as_admin, vec!["*", "*"], true),
            (&as_viewer, vec!["list", "connectors", "-n", "p1"], true),
            (&as_viewer, vec!["watch", "httpproxies", "-n", "p1"], true),
            (&as_viewer, vec!["create", "connectors", "-n", "p1"], false),
            (&as_viewer, vec!["list", "connectors", "-n", "p2"], false),
            (&as_viewer, vec!["get", "namespace/p1"], true),
            (&as_viewer, vec!["delete", "namespace/p1"], false),
            (&as_viewer, vec!["list", "crd"], true),
            (&as_viewer, vec!["delete", "crd"], false),
            (&as_agent, vec!["update", "leases", "-n", "p1"], true),
            (
                &as_agent,
                vec!["update", "connectors", "--subresource=status", "-n", "p1"],
                true,
            ),
            (&as_agent, vec!["get", "httproutes", "-n", "p1"], false),
            (&as_agent, vec!["get", "/healthz"], true),
        ];
        for (k, args, allowed) in cases {
            let mut full = vec!["auth", "can-i"];
            full.extend(&args);
            let (ok, out, err) = k.run(&full, None);
            let answer = out.lines().next().unwrap_or_default();
            assert_eq!(
                ok, allowed,
                "{bin:?} {:?} can-i {args:?}: {out} {err}",
                k.kubeconfig
            );
            if allowed {
                assert_eq!(answer, "yes", "{bin:?} {args:?}: {err}");
            } else {
                assert!(answer.starts_with("no"), "{bin:?} {args:?}: {out} {err}");
            }
        }
        let (_, out, _) =
            as_viewer.run(&["auth", "can-i", "create", "connectors", "-n", "p1"], None);
        assert!(
            out.contains("User \"eve\" cannot create resource \"connectors\""),
            "{bin:?}: the reason names the user: {out}"
        );

        // `auth whoami` exists from kubectl 1.26.
        if as_viewer.minor() >= 26 {
            let out = as_viewer.ok(&["auth", "whoami"], None);
            let rows: Vec<Vec<&str>> = out
                .lines()
                .map(|l| l.split_whitespace().collect())
                .collect();
            assert!(rows.contains(&vec!["Username", "eve"]), "{out}");
            assert!(rows.contains(&vec!["Groups", "[viewer]"]), "{out}");
            assert!(
                rows.contains(&vec!["Extra:", "portway.dev/namespaces", "[p1]"]),
                "{out}"
            );
            let out = as_admin.ok(
                &["auth", "whoami", "-o", "jsonpath={.status.userInfo}"],
                None,
            );
            let info: Value = serde_json::from_str(&out).unwrap();
            assert_eq!(
                info,
                json!({"username": "root", "groups": ["admin"], "extra": {"portway.dev/namespaces": ["*"]}})
            );
        }
    }
}

#[tokio::test]
async fn kubectl_get_crd_lists_the_built_in_crds_read_only() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let kubeconfig = kubeconfig(&server);
    let names: Vec<String> = portway_api::all_crds()
        .into_iter()
        .map(|c| c.metadata.name.unwrap())
        .collect();
    for bin in kubectls() {
        let k = Kubectl::new(bin.clone(), &kubeconfig);
        let table = k.ok(&["get", "crd"], None);
        let mut lines = table.lines();
        let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
        assert_eq!(header, ["NAME", "CREATED", "AT"], "{bin:?}: {table}");
        let listed: Vec<&str> = lines
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(listed, names, "{bin:?}: {table}");
        assert!(
            table.lines().nth(1).unwrap().trim_end().ends_with('Z'),
            "CREATED AT is a timestamp: {table}"
        );

        let kind = k.ok(
            &[
                "get",
                "crd",
                "connectors.networking.datumapis.com",
                "-o",
                "jsonpath={.spec.names.kind} {.status.conditions[?(@.type==\"Established\")].status}",
            ],
            None,
        );
        assert_eq!(kind, "Connector True", "{bin:?}");
        let (ok, _, err) = k.run(&["get", "crd", "gadgets.example.com"], None);
        assert!(!ok && err.contains("NotFound"), "{bin:?}: {err}");

        let crd = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: gadgets.example.com\nspec:\n  group: example.com\n  names: {kind: Gadget, plural: gadgets}\n  scope: Namespaced\n  versions:\n  - {name: v1, served: true, storage: true, schema: {openAPIV3Schema: {type: object}}}\n";
        // Datum's own CRD for a kind Portway serves: applied, it is answered as built in.
        let datum = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: connectors.networking.datumapis.com\nspec:\n  group: networking.datumapis.com\n  names: {kind: Connector, listKind: ConnectorList, plural: connectors, singular: connector}\n  scope: Namespaced\n  versions:\n  - {name: v1alpha1, served: true, storage: true, schema: {openAPIV3Schema: {type: object}}, subresources: {status: {}}}\n";
        for (args, stdin) in [
            (vec!["create", "-f", "-"], Some(crd)),
            (vec!["apply", "-f", "-"], Some(datum)),
            (
                vec!["delete", "crd", "connectors.networking.datumapis.com"],
                None,
            ),
            (
                vec!["label", "crd", "connectors.networking.datumapis.com", "a=b"],
                None,
            ),
        ] {
            let (ok, _, err) = k.run(&args, stdin);
            assert!(
                !ok && err.contains("MethodNotAllowed") && err.contains("built in"),
                "{bin:?} {args:?}: {err}"
            );
        }
    }
}

#[tokio::test]
async fn kubectl_get_wide_adds_the_priority_columns() {
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &[]).await;
    let kubeconfig = kubeconfig(&server);
    let client = kube_client(&kubeconfig).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    conns
        .create(&PostParams::default(), &connector("laptop", &[]))
        .await
        .unwrap();
    let status = json!({"status": {"connectionDetails": {"type": "PublicKey", "publicKey": {
        "id": hex_id(1), "addresses": [{"address": "192.0.2.1", "port": 4000}, {"address": "192.0.2.2", "port": 4000}]}}}});
    conns
        .patch_status("laptop", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    let proxy = "apiVersion: networking.datumapis.com/v1alpha\nkind: HTTPProxy\nmetadata:\n  name: web\nspec:\n  hostnames: [web.example.com]\n  rules:\n  - backends:\n    - endpoint: http://127.0.0.1:3000\n      connector: {name: laptop}\n";
    let proxies: Api<HttpProxy> = Api::namespaced(client.clone(), "default");
    let ready = json!({"status": {"canonicalHostname": "abc.portway.localhost", "conditions": [{"type": "BackendsReady", "status": "False", "reason": "NoReadyBackend", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let header = |table: &str| -> Vec<String> {
        table
            .lines()
            .next()
            .unwrap()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    for bin in kubectls() {
        let k = Kubectl::new(bin.clone(), &kubeconfig);
        k.ok(&["apply", "-f", "-"], Some(proxy));
        proxies
            .patch_status("web", &PatchParams::default(), &Patch::Merge(&ready))
            .await
            .unwrap();

        let narrow = k.ok(&["get", "connectors"], None);
        assert_eq!(
            header(&narrow),
            ["NAME", "READY", "NODE-ID", "RELAY", "AGE"],
            "{bin:?}"
        );
        let wide = k.ok(&["get", "connectors", "-o", "wide"], None);
        assert_eq!(
            header(&wide),
            [
                "NAME",
                "READY",
                "NODE-ID",
                "RELAY",
                "AGE",
                "CLASS",
                "ADDRESSES"
            ],
            "{bin:?}: {wide}"
        );
        assert!(
            wide.contains("portway") && wide.contains("192.0.2.1,192.0.2.2"),
            "{bin:?}: {wide}"
        );

        let narrow = k.ok(&["get", "httpproxies"], None);
        assert_eq!(
            header(&narrow),
            ["NAME", "HOSTNAMES", "ACCEPTED", "PROGRAMMED", "AGE"],
            "{bin:?}: {narrow}"
        );
        let wide = k.ok(&["get", "httpproxies", "-o", "wide"], None);
        assert_eq!(
            header(&wide),
            [
                "NAME",
                "HOSTNAMES",
                "ACCEPTED",
                "PROGRAMMED",
                "AGE",
                "BACKENDSREADY",
                "CANONICAL-HOSTNAME",
                "ADDRESSES"
            ],
            "{bin:?}: {wide}"
        );
        assert!(
            wide.contains("False") && wide.contains("abc.portway.localhost"),
            "{bin:?}: {wide}"
        );

        k.ok(&["delete", "httpproxy", "web"], None);
    }
    let conn = conns.get("laptop").await.unwrap();
    let advs: Api<ConnectorAdvertisement> = Api::namespaced(client, "default");
    advs.create(&PostParams::default(), &advertisement("web", &conn, 3000))
        .await
        .unwrap();
    for bin in kubectls() {
        let k = Kubectl::new(bin.clone(), &kubeconfig);
        let wide = k.ok(&["get", "connectoradvertisements", "-o", "wide"], None);
        assert_eq!(
            header(&wide),
            [
                "NAME",
                "CONNECTOR",
                "ACCEPTED",
                "AGE",
                "SERVICES",
                "ADDRESSES",
                "PORTS"
            ],
            "{bin:?}: {wide}"
        );
        let row: Vec<&str> = wide.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(
            row[row.len() - 3..],
            ["web", "127.0.0.1", "3000"],
            "{bin:?}: {wide}"
        );
    }
}

/// Events are one record under two APIs: what kube-rs's Recorder writes to
/// events.k8s.io/v1, kubectl reads from core/v1 (with its field selectors and columns,
/// on every kubectl), and each expires `--event-ttl` after it was last seen.
#[tokio::test]
async fn events_are_served_under_both_apis_and_expire() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType, Recorder, Reporter};
    let data = tempfile::tempdir().unwrap();
    let server = apiserver(data.path(), "127.0.0.1:0", &["--event-ttl", "30"]).await;
    let client = kube_client(&kubeconfig(&server)).await.unwrap();
    let conns: Api<Connector> = Api::namespaced(client.clone(), "default");
    let c = conns
        .create(&PostParams::default(), &connector("laptop", &[]))
        .await
        .unwrap();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "portway-test".into(),
            instance: None,
        },
    );
    let event = |reason: &str, note: &str| Event {
        type_: EventType::Warning,
        reason: reason.into(),
        note: Some(note.into()),
        action: "Test".into(),
        secondary: None,
    };
    recorder
        .publish(
            &event("LeaseExpired", "the agent stopped"),
            &c.object_ref(&()),
        )
        .await
        .unwrap();

    // core/v1, by the field selector kubectl describe sends.
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), "default");
    let uid = c.metadata.uid.clone().unwrap();
    let found = core
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Connector,involvedObject.name=laptop,involvedObject.uid={uid}"
        )))
        .await
        .unwrap()
        .items;
    assert_eq!(found.len(), 1, "{found:?}");
    let e = &found[0];
    assert_eq!(e.message.as_deref(), Some("the agent stopped"));
    assert_eq!(e.reason.as_deref(), Some("LeaseExpired"));
    assert_eq!(e.reporting_component.as_deref(), Some("portway-test"));
    assert_eq!(e.count, Some(1));
    assert!(e.last_timestamp.is_some());
    let other = core
        .list(&ListParams::default().fields("involvedObject.name=desktop"))
        .await
        .unwrap();
    assert!(other.items.is_empty());

    for bin in kubectls() {
        let k = Kubectl::new(bin.clone(), &kubeconfig(&server));
        let table = k.ok(&["get", "events"], None);
        let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            header,
            ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
            "{bin:?}: {table}"
        );
        assert!(
            table.contains("connector/laptop") && table.contains("the agent stopped"),
            "{bin:?}: {table}"
        );
        let described = k.ok(&["describe", "connector", "laptop"], None);
        let events = described.split("Events:").nth(1).unwrap_or_default();
        assert!(
            events.contains("LeaseExpired") && events.contains("the agent stopped"),
            "{bin:?}: {described}"
        );
    }

    // A core/v1 write shows under events.k8s.io too, and a delete removes both.
    let legacy: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "legacy.1"},
        "involvedObject": {"kind": "Connector", "name": "laptop", "namespace": "default"},
        "reason": "Legacy", "message": "from an old client", "type": "Normal",
        "source": {"component": "old"}, "firstTimestamp": "2026-12-02T12:00:00Z",
    }))
    .unwrap();
    core.create(&PostParams::default(), &legacy).await.unwrap();
    let modern: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let m = modern.get("legacy.1").await.unwrap();
    assert_eq!(m.note.as_deref(), Some("from an old client"));
    assert_eq!(m.reporting_controller.as_deref(), Some("old"));
    modern
        .delete("legacy.1", &Default::default())
        .await
        .unwrap();
    assert!(core.get_opt("legacy.1").await.unwrap().is_none());

    // As Kubernetes' garbage collector: an object whose every owner is gone (created by a
    // controller that raced the owner's deletion) goes too; an owner of a kind this
    // server does not serve cannot be checked, so that object stays.
    let services: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(client.clone(), "default");
    for (name, api_version, kind) in [
        ("orphan", "networking.datumapis.com/v1alpha1", "Connector"),
        ("foreign", "apps/v1", "Deployment"),
    ] {
        let svc = serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": [
                {"apiVersion": api_version, "kind": kind, "name": "gone", "uid": "no-such-uid"}]},
            "spec": {"ports": [{"port": 80}]},
        }))
        .unwrap();
        services.create(&PostParams::default(), &svc).await.unwrap();
    }
    assert!(services.get_opt("orphan").await.unwrap().is_none());
    assert!(services.get_opt("foreign").await.unwrap().is_some());

    // Expiry, from both APIs.
    eventually(
        "events expire after --event-ttl",
        Duration::from_secs(60),
        || async {
            let (a, b) = (
                core.list(&ListParams::default()).await?.items.len(),
                modern.list(&ListParams::default()).await?.items.len(),
            );
            ensure!(
                (a, b) == (0, 0),
                "{a} core and {b} events.k8s.io events left"
            );
            Ok(())
        },
    )
    .await;
}
