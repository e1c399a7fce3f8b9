//! `serve` behind TLS: ALPN, the handshake timeout, and the connection cap.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use portway_serve::{Limits, Peer, serve};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

struct Tls {
    addr: std::net::SocketAddr,
    connector: TlsConnector,
    _shutdown: tokio_util::sync::DropGuard,
}

async fn start(limits: Limits) -> Tls {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let der = CertificateDer::from(cert.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()));
    let mut server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![der.clone()], key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let make = |peer: &Peer| {
        let tls = peer.tls;
        service_fn(move |_: Request<Incoming>| async move {
            Ok::<_, Infallible>(Response::new(format!("tls={tls}")))
        })
    };
    tokio::spawn(serve(
        listener,
        Some(TlsAcceptor::from(Arc::new(server))),
        make,
        shutdown.clone(),
        limits,
    ));
    Tls {
        addr,
        connector: TlsConnector::from(Arc::new(client)),
        _shutdown: shutdown.drop_guard(),
    }
}

async fn closed(stream: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn requests_are_served_over_tls_and_a_stalled_handshake_is_closed() {
    let tls = start(Limits {
        tls_handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let tcp = TcpStream::connect(tls.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = tls.connector.connect(name, tcp).await.unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut got))
        .await
        .unwrap()
        .ok();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("tls=true"), "{got}");

    // A client that connects and never says hello.
    let mut silent = TcpStream::connect(tls.addr).await.unwrap();
    assert!(closed(&mut silent).await, "a silent TLS client was kept");
}

#[tokio::test]
async fn over_the_cap_a_tls_client_is_closed() {
    let tls = start(Limits {
        max_connections: 1,
        ..Limits::default()
    })
    .await;
    // The server takes connections in the order they were made.
    let _held = TcpStream::connect(tls.addr).await.unwrap();
    let mut over = TcpStream::connect(tls.addr).await.unwrap();
    assert!(
        closed(&mut over).await,
        "a connection over the cap was kept"
    );
}
