//! The tunnel server: each QUIC stream on `iroh-http-proxy/1` carries one HTTP/1.1
//! `CONNECT host:port` or absolute-form request, served as `iroh-proxy-utils`' upstream
//! proxy serves it, except that when the app cannot be reached the 502 says why: its
//! `Proxy-Status` (RFC 9209) names the app, this device and what happened.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use iroh::EndpointId;
use iroh::endpoint::{Connection, RecvStream, SendStream};
use iroh::protocol::{AcceptError, ProtocolHandler};
use iroh_proxy_utils::{HttpProxyRequestKind, HttpRequest};
use portway_api::proxy_status;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::inspect::{Inspector, Traffic, TunnelTraffic};
use crate::policy::Gatekeeper;
use crate::tap::Conversation;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time for the app to accept a connection: below the gateway's wait for the answer
/// (4 s), so the gateway hears why rather than timing out.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bytes moved per read between the app's connection and the QUIC stream, each way: a
/// stream starts at the small size, and one whose reads fill it (a bulk transfer) moves to
/// the large one. 64 KiB made a bulk download a fifth faster than 8 KiB (fewer, fuller QUIC
/// writes); starting small keeps idle pooled and held connections at 8 KiB a side.
const COPY_SMALL: usize = 8 * 1024;
const COPY_LARGE: usize = 64 * 1024;
/// Streams still open at shutdown get this long before their connection closes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Requests served and under way.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: AtomicU64,
    pub active: AtomicU64,
}

/// The `ProtocolHandler` for the tunnel ALPN.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("device", &self.inner.device)
            .finish_non_exhaustive()
    }
}

struct Inner {
    gate: Gatekeeper,
    /// This device's connector name, for the messages.
    device: String,
    counters: Arc<Counters>,
    traffic: Arc<Traffic>,
    /// Set while the local inspector is on: http tunnels' exchanges are recorded.
    inspector: Option<Arc<Inspector>>,
    /// The gateways' connections open now, for the path each takes.
    connections: parking_lot::Mutex<HashMap<usize, Connection>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl Server {
    pub fn new(
        gate: Gatekeeper,
        device: String,
        traffic: Arc<Traffic>,
        inspector: Option<Arc<Inspector>>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                gate,
                device,
                counters: Arc::default(),
                traffic,
                inspector,
                connections: parking_lot::Mutex::default(),
                tasks: TaskTracker::new(),
                shutdown: CancellationToken::new(),
            }),
        }
    }

    pub fn counters(&self) -> Arc<Counters> {
        self.inner.counters.clone()
    }

    /// The path each gateway's connection takes now.
    pub fn paths(&self) -> Vec<GatewayPath> {
        let connections: Vec<Connection> =
            self.inner.connections.lock().values().cloned().collect();
        let mut out: Vec<GatewayPath> = connections
            .iter()
            .map(|c| {
                let paths = c.paths();
                let selected = paths.iter().find(|p| p.is_selected());
                GatewayPath {
                    gateway: c.remote_id(),
                    path: match &selected {
                        Some(p) if p.is_ip() => "direct",
                        Some(p) if p.is_relay() => "relay",
                        Some(_) => "other",
                        None => "none",
                    },
                    rtt: selected.map(|p| p.rtt()),
                }
            })
            .collect();
        out.sort_by_key(|p| p.gateway);
        out
    }
}

/// One gateway's connection to this device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPath {
    pub gateway: EndpointId,
    /// `direct` (UDP, holepunched or on the same network), `relay`, `other`, or `none`
    /// while no path is selected.
    pub path: &'static str,
    pub rtt: Option<Duration>,
}

impl ProtocolHandler for Server {
    async fn accept(&self, connection: Connection) -> Result<(), AcceptError> {
        let remote = connection.remote_id();
        let key = connection.stable_id();
        self.inner
            .connections
            .lock()
            .insert(key, connection.clone());
        let _forget = Forget(&self.inner, key);
        loop {
            let (send, recv) = tokio::select! {
                () = self.inner.shutdown.cancelled() => return Ok(()),
                streams = connection.accept_bi() => match streams {
                    Ok(streams) => streams,
                    // The gateway went away or closed the connection: nothing to report.
                    Err(_) => return Ok(()),
                },
            };
            let inner = self.inner.clone();
            self.inner.tasks.spawn(async move {
                if let Err(why) = inner.serve(remote, send, recv).await {
                    tracing::debug!(%why, "tunnel stream ended");
                }
            });
        }
    }

    async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.inner.tasks.wait()).await;
    }
}

/// Forgets a gateway's connection when its accept loop ends.
struct Forget<'a>(&'a Inner, usize);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.connections.lock().remove(&self.1);
    }
}

/// Counts a request under way.
struct Active(Arc<Counters>);

impl Active {
    fn new(c: &Arc<Counters>) -> Self {
        c.accepted.fetch_add(1, Ordering::Relaxed);
        c.active.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Inner {
    /// One stream: read the request, check it, reach the app, then splice (CONNECT) or
    /// forward the one request (absolute form).
    async fn serve(
        &self,
        remote: EndpointId,
        mut send: SendStream,
        mut recv: RecvStream,
    ) -> Result<(), String> {
        let (req, rest) = match read_head(&mut recv).await {
            Ok(head) => head,
            Err(why) => {
                answer(&mut send, StatusCode::BAD_REQUEST, None).await;
                return Err(why);
            }
        };
        let Ok(req) = req.try_into_proxy_request() else {
            answer(&mut send, StatusCode::BAD_REQUEST, None).await;
            return Err("not a proxy request".into());
        };
        let Ok(authority) = req.kind.authority() else {
            answer(&mut send, StatusCode::BAD_REQUEST, None).await;
            return Err("no target".into());
        };
        let udp = req
            .headers
            .get(portway_api::headers::TARGET_PROTO)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case(portway_api::headers::UDP));
        // Datagrams need a stream of their own: only a CONNECT gives one.
        if udp && !matches!(req.kind, HttpProxyRequestKind::Tunnel { .. }) {
            answer(&mut send, StatusCode::BAD_REQUEST, None).await;
            return Err("UDP asked for without CONNECT".into());
        }
        let Some(offer) = self
            .gate
            .allows(&remote, &authority.host, authority.port, udp)
        else {
            answer(&mut send, StatusCode::FORBIDDEN, None).await;
            return Ok(());
        };
        let traffic = self.traffic.of(&offer.tunnel);
        // Taken before the check: a pause between the two still ends this stream.
        let stopped = traffic.stopped();
        if traffic.paused() {
            let details = format!(
                "tunnel {} is paused on device {} (in its local UI)",
                offer.tunnel, self.device
            );
            let status = proxy_status::value("destination_unavailable", &details);
            answer(&mut send, StatusCode::SERVICE_UNAVAILABLE, Some(&status)).await;
            return Ok(());
        }
        // An http tunnel's exchanges are counted as the inspector sees them; a stream
        // it does not follow counts as one.
        let tap = match (&self.inspector, offer.http) {
            (Some(inspector), true) => Some(Tap::new(inspector.clone(), offer.tunnel.clone())),
            _ => {
                traffic.requests.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        let _active = Active::new(&self.counters);
        // Every kind of stream ends when its tunnel is paused: TCP, UDP and absolute form.
        let work = async move {
            let target = format!("{}:{}", authority.host, authority.port);
            if udp {
                return self.udp(&target, rest, send, recv).await;
            }
            let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&target)).await
            {
                Ok(Ok(tcp)) => tcp,
                Ok(Err(e)) => {
                    let (error, details) = self.unreachable(&target, &e);
                    tracing::warn!(%details, "tunnel request failed (502)");
                    let status = proxy_status::value(error, &details);
                    answer(&mut send, StatusCode::BAD_GATEWAY, Some(&status)).await;
                    return Ok(());
                }
                Err(_) => {
                    let details = format!(
                        "the app at {target} on device {} did not accept the connection within {}s",
                        self.device,
                        CONNECT_TIMEOUT.as_secs()
                    );
                    tracing::warn!(%details, "tunnel request failed (502)");
                    let status = proxy_status::value("connection_timeout", &details);
                    answer(&mut send, StatusCode::BAD_GATEWAY, Some(&status)).await;
                    return Ok(());
                }
            };
            let _ = tcp.set_nodelay(true);
            match req.kind {
                HttpProxyRequestKind::Tunnel { .. } => {
                    // Before any byte of the client's: the target reads it first.
                    let preface = offer.proxy_protocol.then(|| {
                        let client = req
                            .headers
                            .get(portway_api::headers::CLIENT_ADDRESS)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok());
                        let target = tcp
                            .peer_addr()
                            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], authority.port)));
                        crate::proxy_protocol::header(client, target)
                    });
                    tunnel(tcp, preface, rest, send, recv, &traffic, tap.as_ref()).await
                }
                HttpProxyRequestKind::Absolute { method, target } => {
                    let mut head = Request::new(());
                    *head.method_mut() = method;
                    *head.uri_mut() = target;
                    *head.headers_mut() = req.headers;
                    absolute(tcp, head, rest, send, recv).await
                }
            }
        };
        tokio::select! {
            r = work => r,
            () = stopped.cancelled() => Err("the tunnel was paused".into()),
        }
    }

    /// CONNECT for UDP: a socket connected to the app, then framed datagrams both ways
    /// until the gateway ends the stream, the flow idles out, or shutdown.
    async fn udp(
        &self,
        target: &str,
        rest: Bytes,
        mut send: SendStream,
        recv: RecvStream,
    ) -> Result<(), String> {
        let socket = match tokio::time::timeout(CONNECT_TIMEOUT, udp_socket(target)).await {
            Ok(Ok(socket)) => socket,
            Ok(Err(e)) => {
                let (error, details) = self.unreachable(target, &e);
                tracing::warn!(%details, "UDP tunnel request failed (502)");
                let status = proxy_status::value(error, &details);
                answer(&mut send, StatusCode::BAD_GATEWAY, Some(&status)).await;
                return Ok(());
            }
            Err(_) => {
                let details = format!(
                    "the app at {target} on device {} could not be resolved within {}s",
                    self.device,
                    CONNECT_TIMEOUT.as_secs()
                );
                tracing::warn!(%details, "UDP tunnel request failed (502)");
                let status = proxy_status::value("dns_timeout", &details);
                answer(&mut send, StatusCode::BAD_GATEWAY, Some(&status)).await;
                return Ok(());
            }
        };
        send.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        // The bytes read past the request head are the first frames.
        let from_gateway = std::io::Cursor::new(rest).chain(recv);
        tokio::select! {
            r = crate::udp::relay(socket, from_gateway, send, crate::udp::UDP_IDLE) => {
                r.map_err(|e| e.to_string())
            }
            () = self.shutdown.cancelled() => Ok(()),
        }
    }

    /// What to tell the gateway when the app at `target` could not be reached: an RFC 9209
    /// error type and a sentence.
    fn unreachable(&self, target: &str, e: &io::Error) -> (&'static str, String) {
        let device = &self.device;
        let app = format!("the app at {target} on device {device}");
        match e.kind() {
            io::ErrorKind::ConnectionRefused => (
                "connection_refused",
                format!("{app} refused the connection"),
            ),
            io::ErrorKind::TimedOut => (
                "connection_timeout",
                format!("{app} did not accept the connection in time"),
            ),
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => (
                "destination_ip_unroutable",
                format!("{app} is unreachable from the device: {e}"),
            ),
            _ => (
                "destination_unavailable",
                format!("{app} could not be reached: {e}"),
            ),
        }
    }
}

/// Reads a request head; returns it and the bytes read past it.
async fn read_head(recv: &mut RecvStream) -> Result<(HttpRequest, Bytes), String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        match recv.read(&mut chunk).await {
            Ok(Some(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(None) => return Err("the stream ended before a request head".into()),
            Err(e) => return Err(e.to_string()),
        }
        match HttpRequest::parse_with_len(&buf) {
            Ok(Some((len, req))) => return Ok((req, Bytes::copy_from_slice(&buf[len..]))),
            Ok(None) if buf.len() < MAX_HEAD => {}
            Ok(None) => return Err("oversized request head".into()),
            Err(e) => return Err(format!("not HTTP: {e}")),
        }
    }
}

/// A UDP socket connected to `target`'s first address, bound on the same family.
async fn udp_socket(target: &str) -> io::Result<UdpSocket> {
    let addr = tokio::net::lookup_host(target)
        .await?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
    let any: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(any, 0)).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// Answers with an empty response and ends the stream.
async fn answer(send: &mut SendStream, status: StatusCode, proxy_status: Option<&str>) {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: 0\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    if let Some(v) = proxy_status {
        head.push_str(&format!("{}: {v}\r\n", proxy_status::NAME));
    }
    head.push_str("\r\n");
    let _ = send.write_all(head.as_bytes()).await;
    let _ = send.finish();
}

/// CONNECT: confirms, then splices the stream with the app's connection (after the
/// PROXY protocol `preface`, when the tunnel asks for one).
async fn tunnel(
    mut tcp: TcpStream,
    preface: Option<Vec<u8>>,
    rest: Bytes,
    mut send: SendStream,
    recv: RecvStream,
    traffic: &TunnelTraffic,
    tap: Option<&Tap>,
) -> Result<(), String> {
    send.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    if let Some(preface) = preface {
        tcp.write_all(&preface).await.map_err(|e| e.to_string())?;
    }
    tcp.write_all(&rest).await.map_err(|e| e.to_string())?;
    traffic.count(true, rest.len());
    if let Some(tap) = tap {
        tap.saw(true, &rest, traffic);
    }
    let (tcp_read, tcp_write) = tcp.split();
    let result = tokio::try_join!(
        copy(recv, tcp_write, true, traffic, tap),
        copy(tcp_read, send, false, traffic, tap)
    )
    .map(drop)
    .map_err(|e| e.to_string());
    if let Some(tap) = tap {
        tap.close(traffic);
    }
    result
}

/// Copies until `from` ends, then ends `to`; the buffer grows once a read fills it. Each
/// read is counted, and shown to the inspector's tap when there is one.
async fn copy(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    from_client: bool,
    traffic: &TunnelTraffic,
    tap: Option<&Tap>,
) -> io::Result<()> {
    let mut buf = vec![0u8; COPY_SMALL];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        // Shown before it is passed on: the app's answer can then never be seen before
        // the request it answers.
        traffic.count(from_client, n);
        if let Some(tap) = tap {
            tap.saw(from_client, &buf[..n], traffic);
        }
        to.write_all(&buf[..n]).await?;
        if n == buf.len() && buf.len() < COPY_LARGE {
            buf.resize(COPY_LARGE, 0);
        }
    }
}

/// The inspector's view of one http stream: both directions' bytes go to one
/// conversation, and each exchange it finishes is recorded.
struct Tap {
    conversation: parking_lot::Mutex<Conversation>,
    /// Set once the conversation gave up, so reads no longer take the lock.
    off: std::sync::atomic::AtomicBool,
    inspector: Arc<Inspector>,
    tunnel: String,
}

impl Tap {
    fn new(inspector: Arc<Inspector>, tunnel: String) -> Self {
        Self {
            conversation: parking_lot::Mutex::new(Conversation::new(crate::inspect::BODY_CAP)),
            off: std::sync::atomic::AtomicBool::new(false),
            inspector,
            tunnel,
        }
    }

    fn saw(&self, from_client: bool, data: &[u8], traffic: &TunnelTraffic) {
        if data.is_empty() || self.off.load(Ordering::Relaxed) {
            return;
        }
        let mut done = Vec::new();
        {
            let mut c = self.conversation.lock();
            let now = std::time::Instant::now();
            if from_client {
                c.from_client(data, now, &mut done);
            } else {
                c.from_app(data, now, &mut done);
            }
            if c.is_off() {
                self.off.store(true, Ordering::Relaxed);
            }
        }
        self.recorded(done, traffic);
    }

    fn close(&self, traffic: &TunnelTraffic) {
        let mut done = Vec::new();
        self.conversation
            .lock()
            .close(std::time::Instant::now(), &mut done);
        self.recorded(done, traffic);
    }

    fn recorded(&self, done: Vec<crate::tap::Exchange>, traffic: &TunnelTraffic) {
        for exchange in done {
            traffic.requests.fetch_add(1, Ordering::Relaxed);
            self.inspector.record(&self.tunnel, exchange, None);
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1), dropped both ways; an upgrade keeps its pair.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty() && t != "upgrade")
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if upgrade {
        headers.insert(
            header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// The rest of the stream as a request body.
fn body_of(
    rest: Bytes,
    recv: RecvStream,
) -> StreamBody<impl futures::Stream<Item = Result<Frame<Bytes>, io::Error>> + Send + 'static> {
    let first = (!rest.is_empty()).then(|| Ok(Frame::data(rest)));
    let more = futures::stream::unfold(Some(recv), |recv| async move {
        let mut recv = recv?;
        let mut buf = vec![0u8; 16 * 1024];
        match recv.read(&mut buf).await {
            Ok(Some(n)) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), Some(recv)))
            }
            Ok(None) => None,
            Err(e) => Some((Err(io::Error::other(e)), None)),
        }
    });
    StreamBody::new(futures::stream::iter(first).chain(more))
}

/// An absolute-form request: sent to the app in origin form, the body being the rest of
/// the stream; the answer goes back as a head and the body's bytes, then the stream ends.
/// A WebSocket upgrade the app accepts is spliced.
async fn absolute(
    tcp: TcpStream,
    head: Request<()>,
    rest: Bytes,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), String> {
    let (parts, ()) = head.into_parts();
    let upgrade = parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|p| p.eq_ignore_ascii_case("websocket"));
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers, upgrade);
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = path.parse().map_err(|e| format!("{e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn.with_upgrades());
    // An upgrade carries no body before the switch: the rest of the stream is the new
    // protocol's.
    let (body, leftover): (_, Option<(Bytes, RecvStream)>) = if upgrade {
        (
            BodyExt::boxed(Empty::new().map_err(|e| match e {})),
            Some((rest, recv)),
        )
    } else {
        (BodyExt::boxed(body_of(rest, recv)), None)
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    let result = async {
        let mut resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n",
            resp.status().as_u16(),
            resp.status().canonical_reason().unwrap_or("")
        );
        let mut out = resp.headers().clone();
        strip_hop_by_hop(&mut out, switching);
        for (name, value) in &out {
            head.push_str(name.as_str());
            head.push_str(": ");
            head.push_str(&String::from_utf8_lossy(value.as_bytes()));
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        send.write_all(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        if let (true, Some((rest, recv))) = (switching, leftover) {
            let mut up = TokioIo::new(
                hyper::upgrade::on(&mut resp)
                    .await
                    .map_err(|e| e.to_string())?,
            );
            up.write_all(&rest).await.map_err(|e| e.to_string())?;
            let mut quic = tokio::io::join(recv, send);
            tokio::io::copy_bidirectional(&mut quic, &mut up)
                .await
                .map_err(|e| e.to_string())?;
            return Ok(());
        }
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() {
                send.write_all(&data).await.map_err(|e| e.to_string())?;
            }
        }
        send.finish().map_err(|e| e.to_string())
    }
    .await;
    // The answer is complete (or failed): a request body still streaming is moot.
    conn.abort();
    result
}
