//! Past one machine: two `portway apiserver` replicas on a 3-member etcd cluster, behind a
//! TCP load balancer (nginx's `stream` module, as the README documents). Under a steady
//! write load through both, one etcd member and one API replica are killed with `kill -9`:
//! no acknowledged write is lost (counted), a watch that resumes through the balancer sees
//! every change once and in order (checked by resourceVersion), and kubectl keeps working
//! through the other replica. A device joins across replicas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::WatchParams;
use kube::core::WatchEvent;
use parking_lot::Mutex;
use portway_testkit::etcd::Cluster;

use super::*;

const TOKEN: &str = "admin-etcd-0123456789abcdef";

/// What a watch saw: resourceVersion, name, event type.
type Seen = Arc<Mutex<Vec<(u64, String, &'static str, Instant)>>>;

/// A kubeconfig for `server` (https), trusting `ca_pem`, with the admin token.
fn kubeconfig(path: &Path, server: SocketAddr, ca_pem: &str) {
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    token: {TOKEN}\ncontexts:\n- name: x\n  context:\n    cluster: c\n    user: admin\n    namespace: load\ncurrent-context: x\n"
    );
    std::fs::write(path, text).unwrap();
}

fn lease(name: &str) -> Lease {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"holderIdentity": name}}))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_replicas_on_etcd_lose_no_write_when_a_member_and_a_replica_die() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = Cluster::start(&dir.path().join("etcd"), 3).await.unwrap();
    let endpoints = etcd.endpoints().join(",");

    // One serving certificate and one tokens file for both replicas, as a deployment
    // would share them.
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.signing_key.serialize_pem());
    let files = dir.path().join("shared");
    std::fs::create_dir(&files).unwrap();
    std::fs::write(files.join("tls.crt"), &cert_pem).unwrap();
    std::fs::write(files.join("tls.key"), &key_pem).unwrap();
    std::fs::write(files.join("tokens.csv"), format!("{TOKEN},admin,admin,*\n")).unwrap();
    let replica = |i: usize| {
        let data = dir.path().join(format!("api{i}"));
        let files = files.clone();
        let endpoints = endpoints.clone();
        async move {
            let args = [
                "apiserver".to_owned(),
                "--data".into(),
                data.display().to_string(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--tls-cert".into(),
                files.join("tls.crt").display().to_string(),
                "--tls-key".into(),
                files.join("tls.key").display().to_string(),
                "--tokens".into(),
                files.join("tokens.csv").display().to_string(),
                "--etcd-servers".into(),
                endpoints,
            ];
            Process::start(&format!("api{i}"), bin(), args)
                .await
                .unwrap()
        }
    };
    let mut a = replica(0).await;
    let b = replica(1).await;
    let addr = |p: &Process| -> SocketAddr { p.ready_str("listen").parse().unwrap() };
    let (addr_a, addr_b) = (addr(&a), addr(&b));
    let lb_dir = dir.path().join("lb");
    std::fs::create_dir(&lb_dir).unwrap();
    let (_nginx, lb) = portway_testkit::tcp_balancer(&lb_dir, &[addr_a, addr_b]);
    let (kc_lb, kc_b) = (
        dir.path().join("lb.kubeconfig"),
        dir.path().join("b.kubeconfig"),
    );
    kubeconfig(&kc_lb, lb, &cert_pem);
    kubeconfig(&kc_b, addr_b, &cert_pem);
    let kubectl = portway_testkit::Kubectl::new(portway_testkit::kubectls()[0].clone(), &kc_lb);
    eventually(
        "kubectl reaches the replicas through the balancer",
        WAIT,
        || async {
            let (ok, out, err) = kubectl.run(&["create", "namespace", "load"], None);
            ensure!(ok || err.contains("AlreadyExists"), "{out}{err}");
            Ok(())
        },
    )
    .await;

    let via_lb = kube_client(&kc_lb).await.unwrap();
    let via_b = kube_client(&kc_b).await.unwrap();

    // A device joins across replicas: the challenge from one, the join at the other, and
    // its credential works at both (join tokens, challenges and credentials are in etcd).
    let kc_a = dir.path().join("a.kubeconfig");
    kubeconfig(&kc_a, addr_a, &cert_pem);
    let via_a = kube_client(&kc_a).await.unwrap();
    let (join_token, _) = portway_agent::join::create_join_token(&via_lb, "load", 600, 1)
        .await
        .unwrap();
    let post = |path: &str, body: serde_json::Value| {
        http::Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string().into_bytes())
            .unwrap()
    };
    let challenge: serde_json::Value = via_a
        .request(post(
            "/portway/v1/join/challenge",
            json!({"joinToken": join_token}),
        ))
        .await
        .unwrap();
    let nonce = challenge["nonce"].as_str().unwrap();
    let key = ring::signature::Ed25519KeyPair::from_seed_unchecked(&[7; 32]).unwrap();
    let node_id = hex(ring::signature::KeyPair::public_key(&key).as_ref());
    let message = portway_agent::join::join_message(nonce, "load", "dev-1", &node_id);
    let signature = hex(key.sign(message.as_bytes()).as_ref());
    let joined: serde_json::Value = via_b
        .request(post(
            "/portway/v1/join",
            json!({"joinToken": join_token, "connector": "dev-1", "nodeId": node_id,
                   "nonce": nonce, "signature": signature}),
        ))
        .await
        .unwrap();
    let credential = joined["token"].as_str().unwrap();
    for (replica, kc) in [("A", &kc_a), ("B", &kc_b)] {
        let device_kc = dir.path().join(format!("device-{replica}.kubeconfig"));
        let text = std::fs::read_to_string(kc)
            .unwrap()
            .replace(TOKEN, credential);
        std::fs::write(&device_kc, text).unwrap();
        let device = kube_client(&device_kc).await.unwrap();
        let connectors: Api<Connector> = Api::namespaced(device, "load");
        let got = connectors.get("dev-1").await;
        assert!(
            got.is_ok(),
            "the credential does not work at replica {replica}: {got:?}"
        );
    }
    let (leases_lb, leases_b): (Api<Lease>, Api<Lease>) = (
        Api::namespaced(via_lb.clone(), "load"),
        Api::namespaced(via_b.clone(), "load"),
    );

    // A watch through the balancer, resumed from the last resourceVersion it saw whenever
    // its replica goes away.
    let start_rv = leases_lb
        .list(&Default::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let seen: Seen = Arc::default();
    let watcher = {
        let (api, seen) = (leases_lb.clone(), seen.clone());
        tokio::spawn(async move {
            let mut rv = start_rv;
            loop {
                let Ok(stream) = api.watch(&WatchParams::default().timeout(30), &rv).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(event)) = stream.next().await {
                    let (kind, l) = match event {
                        WatchEvent::Added(l) => ("ADDED", l),
                        WatchEvent::Modified(l) => ("MODIFIED", l),
                        WatchEvent::Deleted(l) => ("DELETED", l),
                        WatchEvent::Bookmark(b) => {
                            rv = b.metadata.resource_version;
                            continue;
                        }
                        WatchEvent::Error(e) => panic!("the watch was refused: {e:?}"),
                    };
                    rv = l.metadata.resource_version.clone().unwrap();
                    let name = l.metadata.name.clone().unwrap();
                    seen.lock()
                        .push((rv.parse().unwrap(), name, kind, Instant::now()));
                }
            }
        })
    };

    // Writers: one through the balancer, one straight to the replica that stays. A write
    // that fails may still have been committed: asked again, AlreadyExists says so.
    let acknowledged: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    // When each writer's writes were acknowledged, for the failover figures.
    let acked_at: Arc<Mutex<Vec<(&'static str, Instant)>>> = Arc::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = |api: Api<Lease>, prefix: &'static str| {
        let (acknowledged, acked_at, stop) = (acknowledged.clone(), acked_at.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut i, mut failures) = (0, 0);
            while !stop.is_cancelled() {
                let name = format!("{prefix}-{i}");
                match api.create(&PostParams::default(), &lease(&name)).await {
                    Ok(_) => {
                        acknowledged.lock().insert(name);
                        acked_at.lock().push((prefix, Instant::now()));
                        i += 1;
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        acknowledged.lock().insert(name);
                        acked_at.lock().push((prefix, Instant::now()));
                        i += 1;
                    }
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            failures
        })
    };
    let writers = [
        writer(leases_lb.clone(), "lb"),
        writer(leases_b.clone(), "b"),
    ];
    let count = || acknowledged.lock().len();
    eventually("writes are acknowledged", WAIT, || async {
        ensure!(count() >= 100, "{}", count());
        Ok(())
    })
    .await;

    // Lose etcd's leader (the worst member to lose: the others elect a new one first)
    // and an API replica, the balancer's first, mid-load.
    let leader = etcd.leader().await.unwrap();
    let before = count();
    let killed = Instant::now();
    etcd.kill9(leader);
    a.kill9();
    eventually("writes go on after the losses", WAIT, || async {
        ensure!(count() >= before + 100, "{} since", count() - before);
        Ok(())
    })
    .await;
    eprintln!(
        "etcd member and API replica killed: 100 more writes acknowledged within {:?}",
        killed.elapsed()
    );
    // Failover as each client saw it: the longest pause between two acknowledged writes
    // across the kills. Through the balancer it spans the API replica's and the etcd
    // member's loss; straight to the replica that stays, the etcd member's alone.
    for (prefix, what) in [
        ("lb", "API replica + etcd leader (through the balancer)"),
        ("b", "etcd leader (straight to the other replica)"),
    ] {
        let times: Vec<Instant> = acked_at
            .lock()
            .iter()
            .filter(|(p, _)| *p == prefix)
            .map(|(_, t)| *t)
            .collect();
        let first_after = times.iter().find(|t| **t > killed).map(|t| *t - killed);
        let pause = times
            .windows(2)
            .filter(|w| w[1] > killed)
            .map(|w| w[1] - w[0])
            .max();
        eprintln!(
            "failover, {what}: first write acknowledged {first_after:?} after the kills; longest pause between writes {pause:?}"
        );
    }
    let listed = kubectl.ok(&["get", "leases", "-n", "load", "-o", "name"], None);
    assert!(listed.lines().count() >= before, "{listed}");
    stop.cancel();
    let mut failed = 0;
    for w in writers {
        failed += w.await.unwrap();
    }

    // Nothing acknowledged is lost, on the replica that stayed.
    let stored: BTreeSet<String> = leases_b
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|l| l.metadata.name.unwrap())
        .collect();
    let acknowledged = acknowledged.lock().clone();
    let lost: Vec<_> = acknowledged.difference(&stored).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    eprintln!(
        "{} writes acknowledged ({failed} failed and retried), {} stored, none lost",
        acknowledged.len(),
        stored.len()
    );

    // The watch saw each object added once, in resourceVersion order, across replicas.
    eventually("the watch sees every stored object", WAIT, || async {
        let seen = seen.lock();
        let added: BTreeSet<&String> = seen.iter().map(|(_, n, _, _)| n).collect();
        let missing = stored.iter().filter(|n| !added.contains(n)).count();
        ensure!(missing == 0, "{missing} not seen yet");
        Ok(())
    })
    .await;
    watcher.abort();
    let seen = seen.lock();
    let watch_pause = seen
        .windows(2)
        .filter(|w| w[1].3 > killed)
        .map(|w| w[1].3 - w[0].3)
        .max();
    eprintln!(
        "failover, a watch through the balancer: longest pause between events {watch_pause:?}"
    );
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "resourceVersions went back or repeated"
    );
    let mut per_name: BTreeMap<&String, usize> = BTreeMap::new();
    for (_, n, kind, _) in seen.iter() {
        assert_eq!(*kind, "ADDED", "{n}");
        *per_name.entry(n).or_default() += 1;
    }
    assert!(
        per_name.values().all(|n| *n == 1),
        "an object was announced twice"
    );
}

/// Two `portway operator --leader-elect` replicas: one leads (holds the Lease) and
/// reconciles; after `kill -9` of the leader the other takes over within the lease
/// duration and reconciles what was created meanwhile. Two DNS servers and two xDS
/// servers both serve, and the status writer's Lease moves to the survivor likewise.
#[tokio::test]
async fn standbys_take_over_when_the_leader_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let api = Process::start(
        "apiserver",
        bin(),
        [
            "apiserver",
            "--data",
            dir.path().join("api").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
    )
    .await
    .unwrap();
    let kc = PathBuf::from(api.ready_str("kubeconfig"));
    let operator = |name: &'static str| {
        let kc = kc.clone();
        async move {
            let args = [
                "operator",
                "--kubeconfig",
                kc.to_str().unwrap(),
                "--sidecar",
                "127.0.0.1:1",
                "--leader-elect",
                "--leader-elect-lease-seconds",
                "3",
            ];
            Process::start(name, bin(), args).await.unwrap()
        }
    };
    let mut operators = [operator("operator-1").await, operator("operator-2").await];
    let client = kube_client(&kc).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(client.clone(), "portway-system");
    let holder = || async {
        let l = leases.get("portway-operator").await?;
        l.spec
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
            .context("no holder")
    };
    let first = eventually("an operator leads", WAIT, holder).await;
    let leader = operators
        .iter()
        .position(|p| first.contains(&format!("-{}-", p.pid())))
        .unwrap_or_else(|| panic!("{first} is neither operator"));

    let proxies: Api<HttpProxy> = Api::namespaced(client.clone(), "default");
    let proxy = |name: &str| -> HttpProxy {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"hostnames": [format!("{name}.example.com")], "rules": [{"backends": [
                {"endpoint": "https://origin.example.com"}]}]}}))
        .unwrap()
    };
    let reconciled = |name: &'static str| {
        let proxies = proxies.clone();
        async move {
            eventually(&format!("{name} is reconciled"), WAIT, || async {
                let p = proxies.get(name).await?;
                let c = p.status.unwrap_or_default().conditions;
                ensure!(
                    c.iter()
                        .any(|c| c.type_ == "Accepted"
                            && c.observed_generation == p.metadata.generation),
                    "{c:?}"
                );
                Ok(())
            })
            .await
        }
    };
    proxies
        .create(&PostParams::default(), &proxy("before"))
        .await
        .unwrap();
    reconciled("before").await;

    operators[leader].kill9();
    let killed = Instant::now();
    proxies
        .create(&PostParams::default(), &proxy("after"))
        .await
        .unwrap();
    reconciled("after").await;
    let took = killed.elapsed();
    let second = holder().await.unwrap();
    assert_ne!(first, second, "the killed operator still holds the lease");
    let other = &operators[1 - leader];
    assert!(second.contains(&format!("-{}-", other.pid())), "{second}");
    eprintln!(
        "operator failover (lease 3 s): a proxy created at the kill was reconciled by the standby after {took:?}"
    );

    // DNS and xDS servers are active-active: both serve; one writes status, and the
    // other takes that over when it is killed.
    let part = |name: &'static str, args: Vec<String>| {
        let kc = kc.clone();
        async move {
            let mut all = vec![
                args[0].clone(),
                "--kubeconfig".into(),
                kc.display().to_string(),
            ];
            all.extend(args[1..].iter().cloned());
            all.extend(["--leader-elect", "--leader-elect-lease-seconds", "3"].map(String::from));
            Process::start(name, bin(), all).await.unwrap()
        }
    };
    let args = |list: &[&str]| list.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let dns = [
        part("dns-1", args(&["dns", "--listen", "127.0.0.1:0"])).await,
        part("dns-2", args(&["dns", "--listen", "127.0.0.1:0"])).await,
    ];
    for s in &dns {
        let at: SocketAddr = s.ready_str("dns").parse().unwrap();
        let soa = portway_testkit::dig(at, "portway.localhost", "SOA", false).unwrap();
        assert!(!soa.answers.is_empty(), "{at} does not answer");
    }
    let xds = |name| {
        part(
            name,
            args(&[
                "xds",
                "--listen",
                "127.0.0.1:0",
                "--envoy-listen",
                "127.0.0.1:0",
            ]),
        )
    };
    let xds = [xds("xds-1").await, xds("xds-2").await];
    for (lease, mut replicas) in [("portway-dns", dns), ("portway-xds", xds)] {
        let holder = || async {
            let l = leases.get(lease).await?;
            l.spec
                .and_then(|s| s.holder_identity)
                .filter(|h| !h.is_empty())
                .context("no holder")
        };
        let first = eventually(&format!("{lease}: one leads"), WAIT, holder).await;
        let leader = replicas
            .iter()
            .position(|p| first.contains(&format!("-{}-", p.pid())))
            .unwrap_or_else(|| panic!("{first} is neither replica"));
        replicas[leader].kill9();
        let killed = Instant::now();
        let second = eventually(&format!("{lease}: the other leads"), WAIT, || async {
            let h = holder().await?;
            ensure!(h != first, "still {h}");
            Ok(h)
        })
        .await;
        assert!(
            second.contains(&format!("-{}-", replicas[1 - leader].pid())),
            "{second}"
        );
        eprintln!(
            "{lease} status writer failover (lease 3 s): {:?}",
            killed.elapsed()
        );
    }
}
