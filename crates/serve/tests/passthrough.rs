//! `serve_with_passthrough`: claimed server names reach their handler undecrypted, the rest
//! are terminated and served here, within the same limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use portway_serve::{Limits, Passthrough, Peer, Prefixed, serve_with_passthrough};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

/// Generous: how long a test waits for something that should happen much sooner.
const WAIT: Duration = Duration::from_secs(5);
const DEVICE: &str = "device.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `names`, as a server config and a client trusting only it.
fn pair(names: &[&str]) -> (TlsAcceptor, TlsConnector) {
    let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
    let cert = rcgen::generate_simple_self_signed(names).unwrap();
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
    (
        TlsAcceptor::from(Arc::new(server)),
        TlsConnector::from(Arc::new(client)),
    )
}

/// Passes `device.test` through to a "device" that terminates TLS with its own certificate
/// and echoes what it reads.
struct Device {
    active: AtomicBool,
    claims: AtomicUsize,
    tls: TlsAcceptor,
}

impl Passthrough for Device {
    fn active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }

    fn claim(
        &self,
        server_name: &str,
        io: Prefixed<TcpStream>,
        peer: Peer,
    ) -> Result<BoxFuture<'static, ()>, Prefixed<TcpStream>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if server_name != DEVICE {
            return Err(io);
        }
        assert!(
            !peer.tls,
            "a passed-through connection is not terminated here"
        );
        let tls = self.tls.clone();
        Ok(Box::pin(async move {
            let Ok(mut stream) = tls.accept(io).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }))
    }
}

struct Edge {
    addr: SocketAddr,
    /// Trusts only the listener's own certificate (for `localhost` and 127.0.0.1).
    edge: TlsConnector,
    /// Trusts only the device's certificate.
    device: TlsConnector,
    passthrough: Arc<Device>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(limits: Limits) -> Edge {
    let (edge_acceptor, edge) = pair(&["localhost", "127.0.0.1"]);
    let (device_acceptor, device) = pair(&[DEVICE]);
    let passthrough = Arc::new(Device {
        active: AtomicBool::new(true),
        claims: AtomicUsize::new(0),
        tls: device_acceptor,
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let make = |peer: &Peer| {
        let tls = peer.tls;
        service_fn(move |_: Request<Incoming>| async move {
            Ok::<_, Infallible>(Response::new(format!("hello tls={tls}")))
        })
    };
    let task = tokio::spawn(serve_with_passthrough(
        listener,
        edge_acceptor,
        passthrough.clone(),
        make,
        shutdown.clone(),
        limits,
    ));
    Edge {
        addr,
        edge,
        device,
        passthrough,
        shutdown,
        task,
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Sends one HTTP/1.1 request over TLS to `name` and returns the whole answer.
async fn get(connector: &TlsConnector, addr: SocketAddr, name: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let mut stream = tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut got))
        .await
        .unwrap()
        .ok();
    got
}

/// Opens a TLS connection to the device through the edge and checks that it echoes.
async fn device(edge: &Edge) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let name = ServerName::try_from(DEVICE).unwrap();
    // Only the device's certificate is trusted: the handshake succeeds only if the device
    // itself saw the client's ClientHello, byte for byte.
    let mut stream = tokio::time::timeout(WAIT, edge.device.connect(name, tcp))
        .await
        .unwrap()
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"ping");
    stream
}

/// Whether the server closes `stream` within [`WAIT`].
async fn closed(stream: &mut (impl AsyncRead + Unpin)) -> bool {
    let mut buf = [0u8; 256];
    matches!(
        tokio::time::timeout(WAIT, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_claimed_name_reaches_its_handler_undecrypted() {
    let edge = start(Limits::default()).await;
    let _stream = device(&edge).await;
    assert_eq!(edge.passthrough.claims.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn other_names_are_terminated_and_served_here() {
    let edge = start(Limits::default()).await;
    let got = get(&edge.edge, edge.addr, "localhost").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("hello tls=true"), "{got}");
    assert_eq!(edge.passthrough.claims.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_hello_without_a_server_name_is_terminated_without_asking() {
    let edge = start(Limits::default()).await;
    // rustls sends no SNI for an IP address.
    let got = get(&edge.edge, edge.addr, "127.0.0.1").await;
    assert!(got.ends_with("hello tls=true"), "{got}");
    assert_eq!(edge.passthrough.claims.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn while_inactive_nothing_is_sniffed() {
    let edge = start(Limits::default()).await;
    edge.passthrough.active.store(false, Ordering::SeqCst);
    let got = get(&edge.edge, edge.addr, "localhost").await;
    assert!(got.ends_with("hello tls=true"), "{got}");
    // Even the device's name is terminated here, with the edge's certificate.
    let tcp = TcpStream::connect(edge.addr).await.unwrap();
    let name = ServerName::try_from(DEVICE).unwrap();
    assert!(edge.device.connect(name, tcp).await.is_err());
    assert_eq!(edge.passthrough.claims.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let edge = start(Limits {
        tls_handshake_timeout: Duration::from_millis(300),
        ..Limits::default()
    })
    .await;
    let mut silent = TcpStream::connect(edge.addr).await.unwrap();
    assert!(closed(&mut silent).await, "a silent TLS client was kept");
    // Half a hello is no better.
    let mut partial = TcpStream::connect(edge.addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    assert!(closed(&mut partial).await, "a partial ClientHello was kept");
    assert_eq!(edge.passthrough.claims.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_claimed_connection_holds_a_connection_slot() {
    let edge = start(Limits {
        max_connections: 1,
        ..Limits::default()
    })
    .await;
    let held = device(&edge).await;
    let mut over = TcpStream::connect(edge.addr).await.unwrap();
    assert!(
        closed(&mut over).await,
        "a connection over the cap was kept"
    );
    drop(held);
    // The slot comes back once the claimed connection ends.
    let until = tokio::time::Instant::now() + WAIT;
    loop {
        let tcp = TcpStream::connect(edge.addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        if edge.edge.connect(name, tcp).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < until,
            "the slot was not freed"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_claimed_connection_is_dropped_when_the_shutdown_grace_has_passed() {
    let mut edge = start(Limits {
        shutdown_grace: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let mut stream = device(&edge).await;
    edge.shutdown.cancel();
    assert!(
        closed(&mut stream).await,
        "a passed-through connection was kept"
    );
    tokio::time::timeout(WAIT, &mut edge.task)
        .await
        .unwrap()
        .unwrap();
}
