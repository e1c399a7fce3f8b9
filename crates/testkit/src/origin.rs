//! A fast origin server for end-to-end tests and benchmarks (hyper):
//!
//! - `GET /hello` → `hello from <port>`
//! - `GET /headers` → the request headers, one `name: value` per line
//! - `GET /big?n=BYTES` → a deterministic byte stream ([`pattern`]) of that length
//! - `POST /hash` → `<sha256 hex> <length>` of the streamed request body
//! - `GET /sse` → an event stream: `data: first` at once, `data: second` when
//!   [`Origin::release`] is called, then the end
//! - `GET /ws` → WebSocket echo

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

type Body = BoxBody<Bytes, std::io::Error>;

/// Byte `i` of the deterministic stream `/big` serves.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// The SHA-256 (hex) of the first `n` pattern bytes.
pub fn pattern_hash(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut i = 0;
    while i < n {
        let len = buf.len().min((n - i) as usize);
        for (k, b) in buf[..len].iter_mut().enumerate() {
            *b = pattern(i + k as u64);
        }
        h.update(&buf[..len]);
        i += len as u64;
    }
    hex(&h.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(s: impl Into<String>) -> Response<Body> {
    Response::new(
        http_body_util::Full::new(Bytes::from(s.into()))
            .map_err(|e| match e {})
            .boxed(),
    )
}

fn big(n: u64) -> Body {
    let chunk = 64 * 1024u64;
    let stream = futures::stream::unfold(0u64, move |i| async move {
        (i < n).then(|| {
            let len = chunk.min(n - i);
            let data: Vec<u8> = (i..i + len).map(pattern).collect();
            (
                Ok::<_, std::io::Error>(Frame::data(Bytes::from(data))),
                i + len,
            )
        })
    });
    BodyExt::boxed(StreamBody::new(stream))
}

async fn handle(req: Request<Incoming>, release: Arc<Notify>, port: u16) -> Response<Body> {
    let path = req.uri().path().to_owned();
    match path.as_str() {
        "/hello" => text(format!("hello from {port}")),
        "/headers" => text(
            req.headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}\n", v.to_str().unwrap_or("?")))
                .collect::<String>(),
        ),
        "/big" => {
            let n = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("n="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let mut r = Response::new(big(n));
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/hash" => {
            let mut body = req.into_body();
            let mut h = Sha256::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return text("body error");
                };
                if let Some(d) = frame.data_ref() {
                    h.update(d);
                    len += d.len() as u64;
                }
            }
            text(format!("{} {len}", hex(&h.finalize())))
        }
        "/sse" => {
            let stream = futures::stream::unfold(0, move |step| {
                let release = release.clone();
                async move {
                    match step {
                        0 => Some((
                            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(
                                b"data: first\n\n",
                            ))),
                            1,
                        )),
                        1 => {
                            release.notified().await;
                            Some((Ok(Frame::data(Bytes::from_static(b"data: second\n\n"))), 2))
                        }
                        _ => None,
                    }
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut()
                .insert("content-type", "text/event-stream".parse().expect("static"));
            r
        }
        "/ws" => {
            let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
                let mut r = text("not a websocket request");
                *r.status_mut() = StatusCode::BAD_REQUEST;
                return r;
            };
            let mut req = req;
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(io) = upgrade.await else { return };
                let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                    TokioIo::new(io),
                    tokio_tungstenite::tungstenite::protocol::Role::Server,
                    None,
                )
                .await;
                let (mut tx, mut rx) = ws.split();
                while let Some(Ok(msg)) = rx.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                }
            });
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            let mut r = Response::new(http_body_util::Empty::new().map_err(|e| match e {}).boxed());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("static"));
            r.headers_mut()
                .insert("connection", "Upgrade".parse().expect("static"));
            r.headers_mut()
                .insert("sec-websocket-accept", accept.parse().expect("base64"));
            r
        }
        // What the request looked like on arrival (method, target, host), with two
        // response headers for filters to change.
        p if p.starts_with("/echo") => {
            let host = req
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-");
            let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let mut r = text(format!("{} {target} host={host}", req.method()));
            r.headers_mut()
                .insert("x-origin-keep", "origin".parse().expect("static"));
            r.headers_mut()
                .insert("x-origin-drop", "origin".parse().expect("static"));
            r
        }
        _ => {
            let mut r = text("not found");
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// The origin; stops when dropped.
pub struct Origin {
    pub addr: SocketAddr,
    release: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    /// # Errors
    /// When no loopback port can be bound.
    pub async fn spawn() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let release = Arc::new(Notify::new());
        let r = release.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let r = r.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let r = r.clone();
                        async move { Ok::<_, Infallible>(handle(req, r, addr.port()).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self {
            addr,
            release,
            task,
        })
    }

    /// Lets every waiting `/sse` stream send its second event and end.
    pub fn release(&self) {
        self.release.notify_waiters();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
