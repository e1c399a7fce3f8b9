//! TLS passthrough (`TCPProxy` with `spec.tls`), on both data planes: the edge's TLS port
//! hands connections whose ClientHello names a passthrough name to the device undecrypted
//! (`openssl s_client` sees the device's certificate, which the edge never had), other
//! names are still terminated by the edge, bytes go both ways by hash, a name belongs to
//! one proxy of either kind, and `portway tls` publishes a local TLS server.

use std::net::SocketAddr;
use std::sync::Arc;

use kube::api::DeleteParams;
use portway_api::TcpProxy;
use tokio::io::AsyncWriteExt;

use super::super::*;
use super::{echo_over, proxy_condition, start_one_liner};

/// The device certificate's subject: `s_client` prints it, and only the device has it.
const DEVICE_CN: &str = "portway-device-test";

/// The device's TLS server: terminates TLS itself and echoes, ending its side once the
/// client's has ended.
fn serve_echo(listener: tokio::net::TcpListener, config: rustls::ServerConfig) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (mut r, mut w) = tokio::io::split(tls);
                if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                    let _ = w.shutdown().await;
                }
            });
        }
    });
}

/// The subject of the certificate `front` presents for `name`, as `openssl s_client`
/// prints it.
async fn subject_seen(front: SocketAddr, name: &str) -> anyhow::Result<String> {
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &front.to_string(),
            "-servername",
            name,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject="))
        .map(|s| s.trim().to_owned())
        .with_context(|| {
            format!(
                "no certificate for {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// `n` bytes of the pattern over TLS to `name` at `front`, verified against `ca`; the hash
/// of what came back.
async fn echo_tls(front: SocketAddr, name: &str, ca: &Path, n: u64) -> anyhow::Result<String> {
    let tcp = tokio::net::TcpStream::connect(front).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config(Some(ca))));
    let tls = connector
        .connect(
            rustls::pki_types::ServerName::try_from(name.to_owned())?,
            tcp,
        )
        .await?;
    echo_over(tls, n).await
}

fn tls_proxy(name: &str, hostnames: &[&str], endpoint: &str, connector: &str) -> TcpProxy {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"tls": {"hostnames": hostnames},
                 "backends": [{"endpoint": endpoint, "connector": {"name": connector}}]},
    }))
    .unwrap()
}

/// Runs on the stack and Envoy of the TCP test (one start for both).
pub(super) async fn passthrough_on_both_planes(stack: &Stack, front: &mut EnvoyFront) {
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let tcp: Api<TcpProxy> = Api::namespaced(admin.clone(), "default");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let device_port = listener.local_addr().unwrap().port();
    let (device, connector) = stack.device_for(device_port, "tlsdev.localhost", 5).await;
    let endpoint = format!("tcp://127.0.0.1:{device_port}");
    tcp.create(
        &PostParams::default(),
        &tls_proxy("db", &["db.localhost"], &endpoint, &connector),
    )
    .await
    .unwrap();
    proxy_condition(&tcp, "db", "Programmed", "True").await;
    let names = tcp.get("db").await.unwrap().status.unwrap().hostnames;
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(names[0], "db.localhost");
    assert!(names[1].ends_with(".portway.localhost"), "{names:?}");
    // The device's certificate is made only now, for the names the proxy was given: the
    // edge never has it.
    let (config, ca_pem) = server_tls(&names, Some(DEVICE_CN));
    let ca = stack.dir.path().join("device-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    serve_echo(listener, config);

    let edge_tls: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    let envoy_tls = envoy_listener(&mut front.envoy, &front.admin_file, "portway_https").await;
    for (plane, at) in [("built-in edge", edge_tls), ("Envoy", envoy_tls)] {
        for name in &names {
            let subject = eventually(&format!("{plane} passes {name} through"), WAIT, || async {
                let s = subject_seen(at, name).await?;
                ensure!(s.contains(DEVICE_CN), "{s}");
                Ok(s)
            })
            .await;
            eprintln!("{plane}: {name} presents {subject}");
        }
        const BULK: u64 = 4 << 20;
        assert_eq!(
            echo_tls(at, "db.localhost", &ca, BULK).await.unwrap(),
            pattern_hash(BULK),
            "{plane}"
        );
        // Another name of the zone is still terminated by the edge, with its certificate.
        let other = eventually(&format!("{plane} terminates other names"), WAIT, || {
            subject_seen(at, "other.portway.localhost")
        })
        .await;
        assert!(!other.contains(DEVICE_CN), "{plane}: {other}");
    }

    // A name belongs to one proxy of either kind: a second passthrough proxy and an HTTP
    // tunnel asking for it are refused, naming the holder.
    tcp.create(
        &PostParams::default(),
        &tls_proxy("db2", &["db.localhost"], &endpoint, &connector),
    )
    .await
    .unwrap();
    let (reason, message, _) = proxy_condition(&tcp, "db2", "Accepted", "False").await;
    assert_eq!(reason, "HostnameInUse", "{message}");
    assert!(message.contains("TCPProxy default/db"), "{message}");
    let data = stack.data();
    let out = tokio::process::Command::new(bin())
        .args(["http", &stack.origin.addr.port().to_string()])
        .args([
            "--hostname",
            "db.localhost",
            "--data",
            data.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("db.localhost is taken"),
        "{err}"
    );
    tcp.delete("db2", &DeleteParams::default()).await.unwrap();

    // `portway tls PORT --hostname H` (like `ngrok tls`): joins, publishes, prints where.
    let one_liner = start_one_liner(
        stack,
        &[
            "tls",
            &device_port.to_string(),
            "--hostname",
            "mail.localhost",
        ],
    )
    .await;
    assert_eq!(
        one_liner.ready_str("url"),
        format!("tls://mail.localhost:{}", edge_tls.port())
    );
    for (plane, at) in [("built-in edge", edge_tls), ("Envoy", envoy_tls)] {
        eventually(&format!("{plane}: portway tls's name"), WAIT, || async {
            let s = subject_seen(at, "mail.localhost").await?;
            ensure!(s.contains(DEVICE_CN), "{s}");
            Ok(())
        })
        .await;
    }
    // Asked for a name another proxy holds: one clear line, non-zero exit.
    let out = tokio::process::Command::new(bin())
        .args([
            "tls",
            &device_port.to_string(),
            "--hostname",
            "db.localhost",
        ])
        .args(["--data", data.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("TLS name is refused") && err.contains("--hostname"),
        "{err}"
    );

    // Deleted: the name is no longer passed through on either plane.
    tcp.delete("db", &DeleteParams::default()).await.unwrap();
    for (plane, at) in [("built-in edge", edge_tls), ("Envoy", envoy_tls)] {
        eventually(
            &format!("{plane} stops passing db through"),
            WAIT,
            || async {
                // No certificate at all (the handshake fails) is as good.
                if let Ok(s) = subject_seen(at, "db.localhost").await {
                    ensure!(!s.contains(DEVICE_CN), "still {s}");
                }
                Ok(())
            },
        )
        .await;
    }
    drop((one_liner, device));
}

/// The device's own certificate (`portway tls --cert-dir`), from ACME (Pebble) over
/// DNS-01 answered by the stack's own DNS server: the key is made on the device and never
/// leaves it (the API holds only the request and the chain), the chain verifies against
/// Pebble's root for the proxy's names, and a TLS server on the device serving it is
/// reached through the edge verified end to end. A request naming a name the proxy does
/// not serve is refused, naming the field.
#[tokio::test]
async fn a_device_gets_its_own_certificate_over_dns01() {
    use portway_testkit::pebble::{Pebble, free_port};
    let dir = tempfile::tempdir().unwrap();
    let dns = SocketAddr::from(([127, 0, 0, 1], free_port().unwrap()));
    let pebble = Pebble::start(dir.path(), dns, None).await.unwrap();
    let (roots, dns) = (
        pebble.directory_roots.display().to_string(),
        dns.to_string(),
    );
    let extra = [
        "--acme-directory",
        &pebble.directory,
        "--acme-directory-roots",
        &roots,
        "--dns",
        &dns,
    ];
    let stack = Stack::start_full(None, &extra, &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let device_port = listener.local_addr().unwrap().port().to_string();
    let cert_dir = stack.dir.path().join("device-cert");
    let started = Instant::now();
    let one_liner = start_one_liner(
        &stack,
        &[
            "tls",
            &device_port,
            "--cert-dir",
            cert_dir.to_str().unwrap(),
        ],
    )
    .await;
    eprintln!(
        "portway tls --cert-dir (ACME DNS-01, Pebble): live with its certificate in {:?}",
        started.elapsed()
    );
    let cert_path = cert_dir.join("cert.pem");
    assert_eq!(
        one_liner.ready_str("certificate"),
        cert_path.display().to_string()
    );
    let names: Vec<String> =
        serde_json::from_value(one_liner.ready()["hostnames"].clone()).unwrap();
    let [name] = names.as_slice() else {
        panic!("{names:?}")
    };

    // The chain is for the device's key and the proxy's name; the API has no key.
    let chain = std::fs::read_to_string(&cert_path).unwrap();
    let key = std::fs::read_to_string(cert_dir.join("key.pem")).unwrap();
    let leaf = portway_tls::csr::leaf(&chain).unwrap();
    assert_eq!(
        leaf.public_key,
        portway_tls::csr::public_key_of(&key).unwrap()
    );
    assert_eq!(leaf.names, names);
    let admin = kube_client(Path::new(&stack.up.ready_str("kubeconfig")))
        .await
        .unwrap();
    let tcp: Api<TcpProxy> = Api::namespaced(admin.clone(), "default");
    let proxy_name = one_liner.ready_str("proxy");
    let stored = serde_json::to_string(&tcp.get(&proxy_name).await.unwrap()).unwrap();
    assert!(stored.contains("BEGIN CERTIFICATE REQUEST"), "{stored}");
    assert!(
        !stored.contains("PRIVATE KEY"),
        "a key reached the API: {stored}"
    );
    let (reason, message, _) = proxy_condition(&tcp, &proxy_name, "CertificateReady", "True").await;
    assert_eq!(reason, "Issued", "{message}");
    assert!(message.contains(&pebble.directory), "{message}");

    // A TLS server on the device with that certificate, verified through the edge
    // against Pebble's root alone.
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let private = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, private)
    .unwrap();
    serve_echo(listener, config);
    let edge_tls: SocketAddr = stack.up.ready_str("https").parse().unwrap();
    const BULK: u64 = 1 << 20;
    let echoed = eventually(
        "the device's certificate verifies through the edge",
        WAIT,
        || echo_tls(edge_tls, name, &pebble.issuing_root, BULK),
    )
    .await;
    assert_eq!(echoed, pattern_hash(BULK));
    let out = tokio::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &edge_tls.to_string(),
            "-servername",
            name,
        ])
        .args([
            "-verify_return_error",
            "-CAfile",
            pebble.issuing_root.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("Verify return code: 0 (ok)"), "{said}");

    // A request for a name the proxy does not serve gets nothing signed.
    let thief_key = portway_tls::csr::new_key().unwrap();
    let request = portway_tls::csr::make(
        &thief_key,
        &[name.clone(), "elsewhere.portway.localhost".to_owned()],
    )
    .unwrap();
    let patch = json!({"spec": {"tls": {"certificateRequest": request}}});
    let pp = kube::api::PatchParams::default();
    tcp.patch(&proxy_name, &pp, &kube::api::Patch::Merge(&patch))
        .await
        .unwrap();
    let (reason, message, _) =
        proxy_condition(&tcp, &proxy_name, "CertificateReady", "False").await;
    assert_eq!(reason, "NameNotServed", "{message}");
    assert!(
        message.contains("spec.tls.certificateRequest")
            && message.contains("elsewhere.portway.localhost"),
        "{message}"
    );
    let status = tcp.get(&proxy_name).await.unwrap().status.unwrap();
    assert_eq!(status.certificate, None, "no chain for a refused request");
    drop((one_liner, stack, pebble));
}
