//! The limits of `serve`, against a real listener on loopback with short timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use portway_serve::{Limits, Peer, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const HEADER: Duration = Duration::from_millis(300);
/// Generous: how long a test waits for something that should happen much sooner.
const WAIT: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Answers `ok`, or after 1.5 s on `/slow`.
async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let make = |_: &Peer| {
        service_fn(|req: Request<Incoming>| async move {
            if req.uri().path() == "/slow" {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            Ok::<_, Infallible>(Response::new(String::from("ok")))
        })
    };
    let task = tokio::spawn(serve(listener, None, make, shutdown.clone(), limits));
    Server {
        addr,
        shutdown,
        task,
    }
}

fn limits() -> Limits {
    Limits {
        header_read_timeout: HEADER,
        idle_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(1),
        ..Limits::default()
    }
}

/// Reads until the server closes; returns what was read and when it closed.
async fn read_to_close(stream: &mut TcpStream) -> (String, Instant) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(WAIT, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "the server kept the connection open for {WAIT:?}"
    );
    (String::from_utf8_lossy(&got).into_owned(), Instant::now())
}

/// Sends one HTTP/1.1 request and reads its response (a `content-length` body).
async fn request(stream: &mut TcpStream, path: &str) -> String {
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(WAIT, async {
        while !String::from_utf8_lossy(&got).ends_with("\r\n\r\nok") {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap();
    String::from_utf8(got).unwrap()
}

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_header_timeout() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    let (got, closed) = read_to_close(&mut stream).await;
    assert_eq!(got, "");
    let took = closed - start;
    assert!(took >= HEADER - Duration::from_millis(50), "{took:?}");
}

#[tokio::test]
async fn a_trickled_request_head_is_closed_after_the_header_timeout() {
    let server = start(limits()).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let start = Instant::now();
    // A byte every 50 ms never finishes the head; the clock does not restart per byte.
    let head = b"GET / HTTP/1.1\r\nhost: t\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut sent = 0;
    let closed = loop {
        if sent < head.len() && stream.write_all(&head[sent..=sent]).await.is_err() {
            break Instant::now();
        }
        sent += 1;
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => break Instant::now(),
            Ok(Ok(_)) => panic!("answered an unfinished head"),
            Err(_) => assert!(start.elapsed() < WAIT, "still open after {WAIT:?}"),
        }
    };
    let took = closed - start;
    assert!(took >= HEADER - Duration::from_millis(50), "{took:?}");
    assert!(took < HEADER * 4, "{took:?}");
}

#[tokio::test]
async fn a_kept_alive_connection_waits_for_the_idle_timeout_not_the_header_timeout() {
    let server = start(Limits {
        idle_timeout: Duration::from_millis(1500),
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(request(&mut stream, "/").await.starts_with("HTTP/1.1 200"));
    // Idle for twice the header timeout: still served.
    tokio::time::sleep(HEADER * 2).await;
    assert!(request(&mut stream, "/").await.starts_with("HTTP/1.1 200"));
    // A request in flight longer than the idle timeout is not cut.
    assert!(
        request(&mut stream, "/slow")
            .await
            .starts_with("HTTP/1.1 200")
    );
    let idle_from = Instant::now();
    let (got, closed) = read_to_close(&mut stream).await;
    assert_eq!(got, "");
    let took = closed - idle_from;
    assert!(took >= Duration::from_millis(1400), "{took:?}");
}

#[tokio::test]
async fn over_the_connection_limit_a_client_gets_503_then_a_slot_again() {
    let server = start(Limits {
        header_read_timeout: WAIT * 2,
        max_connections: 2,
        ..limits()
    })
    .await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third
        .write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    let (got, _) = read_to_close(&mut third).await;
    assert!(
        got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{got}"
    );
    assert!(got.ends_with("too many connections\n"), "{got}");

    // Held connections are still served, and a closed one frees its slot.
    assert!(request(&mut first, "/").await.starts_with("HTTP/1.1 200"));
    drop(first);
    let deadline = Instant::now() + WAIT;
    loop {
        let mut next = TcpStream::connect(server.addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        next.read_exact(&mut buf).await.unwrap();
        if &buf == b"HTTP/1.1 200" {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn requests_are_served_while_many_idle_connections_are_held() {
    let server = start(Limits {
        header_read_timeout: WAIT * 2,
        max_connections: 300,
        ..limits()
    })
    .await;
    let mut idle = Vec::new();
    for i in 0..250 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        }
        idle.push(s);
    }
    let start = Instant::now();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(request(&mut stream, "/").await.starts_with("HTTP/1.1 200"));
    println!(
        "answered in {:?} with {} idle connections held",
        start.elapsed(),
        idle.len()
    );
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_and_closed_when_idle() {
    let server = start(Limits {
        idle_timeout: Duration::from_millis(500),
        ..limits()
    })
    .await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    let req = Request::get(format!("http://{}/", server.addr))
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.version(), hyper::Version::HTTP_2);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok");
    // The server sends GOAWAY after the idle timeout and the client's connection ends.
    tokio::time::timeout(WAIT, conn)
        .await
        .unwrap()
        .unwrap()
        .ok();
}

#[tokio::test]
async fn shutdown_ends_serve_despite_silent_and_half_sent_clients() {
    let server = start(Limits {
        header_read_timeout: WAIT * 2,
        shutdown_grace: Duration::from_secs(3),
        ..limits()
    })
    .await;
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
        .await
        .unwrap();
    // Let the server take all three before shutting down.
    let mut kept = TcpStream::connect(server.addr).await.unwrap();
    assert!(request(&mut kept, "/").await.starts_with("HTTP/1.1 200"));
    server.shutdown.cancel();
    tokio::time::timeout(WAIT, server.task)
        .await
        .expect("serve did not return")
        .unwrap();
    // The request in flight was answered before the connection closed.
    let (got, _) = read_to_close(&mut slow).await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[test]
fn the_fd_limit_can_be_raised() {
    let limit = portway_serve::raise_fd_limit().unwrap();
    assert!(limit >= 256, "{limit}");
}

/// Answers an `Upgrade` request with 101 and echoes the upgraded stream.
async fn start_echo(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let make = |_: &Peer| {
        service_fn(|mut req: Request<Incoming>| async move {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgrade.await.unwrap());
                let mut buf = [0u8; 64];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => io.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
            let resp = Response::builder()
                .status(101)
                .header("connection", "upgrade")
                .header("upgrade", "echo")
                .body(String::new())
                .unwrap();
            Ok::<_, Infallible>(resp)
        })
    };
    let task = tokio::spawn(serve(listener, None, make, shutdown.clone(), limits));
    Server {
        addr,
        shutdown,
        task,
    }
}

#[tokio::test]
async fn an_upgraded_connection_outlives_the_timeouts_and_keeps_its_slot() {
    let server = start_echo(Limits {
        idle_timeout: HEADER,
        max_connections: 1,
        ..limits()
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    // Quiet for longer than both timeouts, then still echoing.
    tokio::time::sleep(HEADER * 3).await;
    stream.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping");
    // The upgraded stream still holds the only slot.
    let mut over = TcpStream::connect(server.addr).await.unwrap();
    let (got, _) = read_to_close(&mut over).await;
    assert!(got.starts_with("HTTP/1.1 503"), "{got}");
}
