//! The iroh sidecar: takes a request carrying `datum-node-id` and `datum-target-*`
//! headers, dials the device by NodeID (DNS discovery + relay), and forwards the request
//! through a CONNECT tunnel (`iroh-http-proxy/1`) to the target on the device.
//!
//! Tunnels are pooled as keep-alive HTTP/1.1 connections per (node, target), so a
//! steady stream of requests costs one QUIC stream round trip each, not a dial. A device
//! whose connection died is answered for at once (503) until a probe reaches it again
//! (see [`crate::tunnel`]); the edge, and this sidecar behind Envoy, fail over past it.

use std::any::Any;
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use iroh::endpoint::{Connection, SendStream, WeakConnectionHandle};
use iroh::{Endpoint, EndpointId};
use parking_lot::Mutex;
use portway_api::{Target, headers};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::metrics::Metrics;
use crate::pool::{Conn, Pool};
use crate::tunnel::{Dialer, OpenError};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type every handler speaks.
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(text: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(text.into())
        .map_err(|e| match e {})
        .boxed()
}

pub fn empty() -> Body {
    http_body_util::Empty::new().map_err(|e| match e {}).boxed()
}

/// A short plain-text answer, the way the edge and the sidecar report problems.
pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Where one request goes: a target on a device.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    pub node: EndpointId,
    pub target: Target,
    /// For an `https://` endpoint: the name the app's certificate is checked against.
    pub tls: Option<String>,
}

/// Why forwarding failed.
#[derive(Debug)]
pub enum ForwardError {
    /// The request lacks or has malformed `datum-*` headers (a gateway bug, not the
    /// client's).
    BadRoute(String),
    /// The device could not be reached or refused the tunnel; nothing was sent, so the
    /// request may be retried on another backend.
    Dial(String),
    /// The device is down (its connection died, or it could not be dialed); nothing was
    /// sent.
    Offline(String),
    /// The device went away while the request was under way.
    Lost(String),
    /// The device could not reach the app; its own words (status 502). Nothing reached
    /// the app.
    App(String),
    /// An origin (a backend without a connector) could not be reached; nothing was sent.
    Origin(String),
    /// The target did not answer in time.
    Timeout(Duration),
    /// The connection broke after the request was sent.
    Upstream(String),
}

impl ForwardError {
    pub fn into_response(self, host: &str) -> Response<Body> {
        match self {
            Self::BadRoute(why) => text(
                StatusCode::BAD_GATEWAY,
                format!("{host}: misconfigured route: {why}"),
            ),
            Self::Dial(why) => text(
                StatusCode::BAD_GATEWAY,
                format!("{host}: could not reach the device: {why}"),
            ),
            Self::Offline(why) | Self::Lost(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{host}: tunnel not online ({why})"),
            ),
            Self::App(why) => text(StatusCode::BAD_GATEWAY, format!("{host}: {why}")),
            Self::Origin(why) => text(
                StatusCode::BAD_GATEWAY,
                format!("{host}: could not reach the origin: {why}"),
            ),
            Self::Timeout(d) => text(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{host}: the service on the device did not answer within {}s",
                    d.as_secs()
                ),
            ),
            Self::Upstream(why) => text(
                StatusCode::BAD_GATEWAY,
                format!("{host}: the connection to the device failed: {why}"),
            ),
        }
    }

    /// Whether the request may go on to another backend after this error: when nothing
    /// reached the device (and the body can be sent again), or when the tunnel broke under
    /// a request that can be replayed and changes nothing.
    pub fn may_fail_over(&self, replayable: bool, idempotent: bool) -> bool {
        match self {
            Self::Dial(_) | Self::Offline(_) | Self::App(_) | Self::Origin(_) => replayable,
            Self::Upstream(_) | Self::Lost(_) => replayable && idempotent,
            Self::BadRoute(_) | Self::Timeout(_) => false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    /// Time to dial a device and open a tunnel (default 4 s, so a request for a device
    /// that is gone is answered within 5 s even before it is known to be down).
    pub dial_timeout: Duration,
    /// Time for the target to answer with response headers (default 60 s).
    pub response_timeout: Duration,
    /// How long idle tunnels and iroh connections are kept (default 90 s).
    pub idle_timeout: Duration,
    /// A device connection silent this long is dead (default 2 s): keep-alives go every
    /// quarter of it, so only a device that is gone stays silent that long.
    pub dead_after: Duration,
    /// How origins (backends without a connector) are reached.
    pub origins: crate::origin::Config,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            dial_timeout: Duration::from_secs(4),
            response_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(90),
            dead_after: Duration::from_secs(2),
            origins: crate::origin::Config::default(),
        }
    }
}

/// NodeIDs remembered at most; past that the cache starts afresh.
const MAX_NODES: usize = 4096;

/// Parsed NodeIDs by their text: parsing one decompresses a curve point, worth doing once
/// per device, not per request.
#[derive(Default)]
struct Targets {
    ids: Mutex<HashMap<String, EndpointId>>,
}

impl Targets {
    fn node(&self, s: &str) -> Option<EndpointId> {
        if let Some(id) = self.ids.lock().get(s) {
            return Some(*id);
        }
        let id: EndpointId = s.parse().ok()?;
        let mut ids = self.ids.lock();
        if ids.len() >= MAX_NODES {
            ids.clear();
        }
        ids.insert(s.to_owned(), id);
        Some(id)
    }
}

/// Which device answered, and over which iroh connection: hyper puts it in the
/// extensions of every response that came through a tunnel.
#[derive(Clone, Debug)]
pub struct Via {
    pub node: EndpointId,
    /// Weak: a response must not keep a connection the pool has let go.
    conn: WeakConnectionHandle,
}

impl Via {
    fn of(conn: &Connection) -> Self {
        Self {
            node: conn.remote_id(),
            conn: conn.weak_handle(),
        }
    }

    /// The path the connection takes to the device now: `direct` (UDP, holepunched or
    /// on the same network), `relay`, `other` (a custom transport), `none` while no path
    /// is selected, or `closed`.
    pub fn path(&self) -> &'static str {
        let Some(conn) = self.conn.upgrade() else {
            return "closed";
        };
        let paths = conn.paths();
        match paths.iter().find(|p| p.is_selected()) {
            Some(p) if p.is_ip() => "direct",
            Some(p) if p.is_relay() => "relay",
            Some(_) => "other",
            None => "none",
        }
    }
}

/// A CONNECT tunnel as a byte stream.
pub struct TunnelStream {
    send: SendStream,
    recv: Pin<Box<dyn AsyncRead + Send + Sync>>,
    _keep: Box<dyn Any + Send + Sync>,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.recv.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.send)
            .poll_write(cx, buf)
            .map_err(io::Error::other)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.send).poll_shutdown(cx)
    }
}

/// What HTTP runs over to a device: the tunnel, or TLS to the app over it (an `https://`
/// endpoint: the app's certificate checked here, end to end).
pub enum TunnelIo {
    Plain(TunnelStream),
    Tls(Box<tokio_rustls::client::TlsStream<TunnelStream>>),
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Why a dial failed, carried through the HTTP client's error.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("the device is down: {0}")]
    Down(String),
    #[error("{0}")]
    App(String),
    #[error("{0}")]
    Failed(String),
}

impl From<OpenError> for DialError {
    fn from(e: OpenError) -> Self {
        match e {
            OpenError::Down(why) => Self::Down(why),
            OpenError::Refused {
                status: StatusCode::FORBIDDEN,
                ..
            } => Self::Failed("the device refused the tunnel (this gateway is not authorised, or the target is not advertised)".into()),
            // The device itself says the tunnel is not serving now (paused in its UI):
            // unavailable, as for a device that is down.
            OpenError::Refused {
                status: StatusCode::SERVICE_UNAVAILABLE,
                details,
            } => Self::Down(details.unwrap_or_else(|| "the device is not serving this tunnel now".into())),
            OpenError::Refused {
                details: Some(details),
                ..
            } => Self::App(details),
            OpenError::Refused { status, .. } => Self::Failed(format!("the device answered {status}")),
            OpenError::Stream(why) => Self::Failed(why),
        }
    }
}

impl From<DialError> for ForwardError {
    fn from(e: DialError) -> Self {
        match e {
            DialError::Down(why) => Self::Offline(why),
            DialError::App(why) => Self::App(why),
            DialError::Failed(why) => Self::Dial(why),
        }
    }
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// proxy credentials and challenges, which are for the hop they arrive on.
const HOP_BY_HOP: [HeaderName; 11] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-authentication-info"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Removes the hop-by-hop headers and every header `Connection` names, in a request or a
/// response; `TE: trailers` survives. Returns the `Upgrade` value when the message asks to
/// switch protocols (`Connection: upgrade` with `Upgrade`), for the caller to put back
/// with [`set_upgrade`] on the hop that splices the upgrade through.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Option<HeaderValue> {
    let tokens = |name: HeaderName, headers: &HeaderMap| -> Vec<String> {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            // A TE entry may carry parameters (`trailers;q=1` is not valid, but be lenient).
            .filter_map(|t| t.split(';').next())
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let nominated = tokens(header::CONNECTION, headers);
    let upgrade = nominated
        .iter()
        .any(|t| t == "upgrade")
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    let trailers = tokens(header::TE, headers).iter().any(|t| t == "trailers");
    for name in &nominated {
        headers.remove(name.as_str());
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    upgrade
}

/// Puts back the `Connection: upgrade` + `Upgrade` pair [`strip_hop_by_hop`] removed.
pub fn set_upgrade(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, protocol);
}

/// The authority a request is for, `host[:port]` without userinfo: an absolute-form
/// target's (HTTP/2's `:authority`) wins over `Host` (RFC 9112 §3.2.2), so routing, the
/// `Host` the device sees and `X-Forwarded-Host` never disagree.
pub fn request_authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    let authority = match uri.authority() {
        Some(a) => a.clone(),
        None => headers
            .get(header::HOST)?
            .to_str()
            .ok()?
            .parse::<http::uri::Authority>()
            .ok()
            // `Host` is `host[:port]`; userinfo there is malformed, not something to drop.
            .filter(|a| !a.as_str().contains('@'))?,
    };
    Some(match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    })
}

fn datum(headers: &HeaderMap, name: &str) -> Result<String, ForwardError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| ForwardError::BadRoute(format!("missing {name} header")))
}

/// Reads and removes the routing headers; drops every other `datum-*` and `x-iroh-*`.
fn take_target(headers: &mut HeaderMap, targets: &Targets) -> Result<Destination, ForwardError> {
    let node = datum(headers, headers::NODE_ID)?;
    let node = targets
        .node(&node)
        .ok_or_else(|| ForwardError::BadRoute(format!("{node:?} is not a NodeID")))?;
    let host = datum(headers, headers::TARGET_HOST)?;
    let port = datum(headers, headers::TARGET_PORT)?;
    let port: u16 = port
        .parse()
        .map_err(|_| ForwardError::BadRoute(format!("target port {port:?}")))?;
    let proto = headers
        .get(headers::TARGET_PROTO)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("http")
        .to_owned();
    let tls = match proto.as_str() {
        "http" => None,
        // Every https route names the certificate's name; the target's host otherwise.
        "https" => Some(
            headers
                .get(headers::TARGET_TLS_NAME)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty() && *v != headers::NONE)
                .unwrap_or(&host)
                .to_owned(),
        ),
        _ => {
            return Err(ForwardError::BadRoute(format!(
                "target protocol {proto:?} is not supported (http or https)"
            )));
        }
    };
    strip_internal(headers);
    Ok(Destination {
        node,
        target: Target { host, port },
        tls,
    })
}

/// Removes every `datum-*`, `x-iroh-*` and `x-datum-*` header.
pub fn strip_internal(headers: &mut HeaderMap) {
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| headers::is_reserved(k.as_str()))
        .cloned()
        .collect();
    for k in doomed {
        headers.remove(k);
    }
}

/// The sidecar: an iroh endpoint plus a pool of tunnels.
pub struct Sidecar {
    endpoint: Endpoint,
    origins: crate::origin::Connector,
    dialer: Arc<Dialer>,
    pool: Arc<Pool>,
    targets: Arc<Targets>,
    config: Config,
    metrics: Metrics,
}

impl Sidecar {
    /// Wraps an endpoint (built with `portway_discovery::endpoint::bind`, with DNS lookup
    /// so NodeIDs resolve).
    ///
    /// # Errors
    /// When the origins' extra roots do not parse.
    pub fn new(
        endpoint: Endpoint,
        config: Config,
        metrics: Metrics,
    ) -> Result<Self, crate::origin::Error> {
        let dialer = Dialer::new(endpoint.clone(), config.dial_timeout, config.idle_timeout);
        let targets = Arc::new(Targets::default());
        Ok(Self {
            origins: crate::origin::Connector::new(config.origins.clone())?,
            endpoint,
            dialer,
            pool: Pool::new(config.idle_timeout),
            targets,
            config,
            metrics,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub fn id(&self) -> EndpointId {
        self.endpoint.id()
    }

    /// Whether the device with this NodeID is down (its connection just died, or a dial
    /// failed): requests for it are answered at once, so any other backend is better.
    pub fn is_down(&self, node_id: &str) -> bool {
        self.targets
            .node(node_id)
            .is_some_and(|node| self.dialer.down(&node).is_some())
    }

    /// Forwards to the first of `heads` (one request head per backend, each naming its
    /// device and target in `datum-*` headers) that answers: devices that are down go
    /// last, and a failed attempt goes on to the next while
    /// [`ForwardError::may_fail_over`] allows. The built-in edge and, behind Envoy,
    /// [`Sidecar::handle`] both pick backends this way.
    ///
    /// Returns the answering head's index in `heads` with the response.
    ///
    /// # Errors
    /// The last attempt's error.
    pub async fn forward_first(
        &self,
        parts: http::request::Parts,
        body: Body,
        heads: Vec<HeaderMap>,
        mut on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        replayable: bool,
    ) -> Result<(usize, Response<Body>), ForwardError> {
        let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        let mut heads: Vec<(usize, HeaderMap)> = heads.into_iter().enumerate().collect();
        heads.sort_by_key(|(_, h)| {
            h.get(headers::NODE_ID)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|n| self.is_down(n))
        });
        let mut body = Some(body);
        let mut last = None;
        for (i, head) in heads {
            let mut attempt = Request::new(body.take().unwrap_or_else(empty));
            *attempt.method_mut() = parts.method.clone();
            *attempt.uri_mut() = parts.uri.clone();
            *attempt.version_mut() = parts.version;
            *attempt.headers_mut() = head;
            match self.forward(attempt, on_upgrade.take()).await {
                Ok(resp) => return Ok((i, resp)),
                // Per request, so not a warning: the device's loss was logged once.
                Err(e) if e.may_fail_over(replayable, idempotent) => {
                    tracing::debug!(error = ?e, "trying the next backend, if any");
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ForwardError::BadRoute("no backend".into())))
    }

    /// Forwards a request whose `datum-*` headers name the target. Upgrades (WebSocket)
    /// are spliced through once both sides agree.
    ///
    /// # Errors
    /// See [`ForwardError`]; `Dial` means nothing reached the device.
    pub async fn forward(
        &self,
        req: Request<Body>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, ForwardError> {
        let (mut parts, body) = req.into_parts();
        if let Some(origin) = crate::origin::Origin::from_headers(&parts.headers)? {
            strip_internal(&mut parts.headers);
            return self.forward_origin(origin, parts, body, on_upgrade).await;
        }
        let target = take_target(&mut parts.headers, &self.targets)?;
        if let Some(why) = self.dialer.down(&target.node) {
            return Err(ForwardError::Offline(why));
        }
        let node = target.node;
        // Connection-level headers stay on this hop; an upgrade we can splice is asked
        // for again on the next one.
        let upgrade = strip_hop_by_hop(&mut parts.headers).filter(|_| on_upgrade.is_some());
        if let Some(protocol) = &upgrade {
            set_upgrade(&mut parts.headers, protocol.clone());
        }
        if let Some(host) = request_authority(&parts.uri, &parts.headers)
            .and_then(|a| HeaderValue::from_str(&a).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(pq).map_err(|e| ForwardError::BadRoute(e.to_string()))?;
        parts.version = Version::HTTP_11;
        let idempotent = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        // A request without a body can be sent again on a fresh connection when the
        // pooled one turns out to have been closed by the device while idle.
        let mut replay = (upgrade.is_none() && body.is_end_stream()).then(|| {
            (
                parts.method.clone(),
                parts.uri.clone(),
                parts.headers.clone(),
            )
        });
        let mut req = Request::from_parts(parts, body);
        let timeout = self.config.response_timeout;
        if let Some((down, asked)) = on_upgrade.zip(upgrade) {
            let conn = self.dial(&target).await?;
            let via = conn.via.clone();
            let resp = match tokio::time::timeout(timeout, conn.upgrade(req)).await {
                Err(_) => return Err(ForwardError::Timeout(timeout)),
                Ok(Err(e)) => return Err(self.broken(node, Some(e))),
                Ok(Ok(resp)) => resp,
            };
            return self.finish(resp, Some(via), Some((down, asked)));
        }
        loop {
            let mut conn = match self.pool.take(&target) {
                Some(conn) => conn,
                None => self.dial(&target).await?,
            };
            match tokio::time::timeout(timeout, conn.exchange(req)).await {
                Err(_) => return Err(ForwardError::Timeout(timeout)),
                Ok(Ok(resp)) => {
                    let via = conn.via.clone();
                    let resp = self.pool.respond(target, conn, resp);
                    return self.finish(resp, Some(via), None);
                }
                Ok(Err(e)) => {
                    let unsent = e.as_ref().is_some_and(hyper::Error::is_canceled);
                    let closed = e.as_ref().is_none_or(|e| {
                        e.is_canceled() || e.is_incomplete_message() || e.is_closed()
                    });
                    if conn.reused
                        && (unsent || (idempotent && closed))
                        && let Some((method, uri, headers)) = replay.take()
                    {
                        tracing::debug!(
                            "a pooled tunnel was closed while idle; sending again on a fresh one"
                        );
                        let mut again = Request::new(empty());
                        *again.method_mut() = method;
                        *again.uri_mut() = uri;
                        *again.headers_mut() = headers;
                        req = again;
                        // The next take may find another stale one; only fresh ones are
                        // not retried.
                        continue;
                    }
                    return Err(self.broken(node, e));
                }
            }
        }
    }

    /// Forwards to an origin over a connection of its own (HTTP/1.1, TLS for `https`),
    /// with the `Host` its route asks for. Upgrades are spliced through as for devices.
    async fn forward_origin(
        &self,
        origin: crate::origin::Origin,
        mut parts: http::request::Parts,
        body: Body,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Result<Response<Body>, ForwardError> {
        let upgrade = strip_hop_by_hop(&mut parts.headers).filter(|_| on_upgrade.is_some());
        if let Some(protocol) = &upgrade {
            set_upgrade(&mut parts.headers, protocol.clone());
        }
        let host = match &origin.authority {
            Some(a) => HeaderValue::from_str(a).ok(),
            None => request_authority(&parts.uri, &parts.headers)
                .and_then(|a| HeaderValue::from_str(&a).ok()),
        };
        if let Some(host) = host {
            parts.headers.insert(header::HOST, host);
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        parts.uri = Uri::try_from(pq).map_err(|e| ForwardError::BadRoute(e.to_string()))?;
        parts.version = Version::HTTP_11;
        let io = self.origins.connect(&origin).await?;
        let (mut send, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| ForwardError::Origin(error_chain(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "origin connection ended");
            }
        });
        let timeout = self.config.response_timeout;
        let resp = match tokio::time::timeout(
            timeout,
            send.send_request(Request::from_parts(parts, body)),
        )
        .await
        {
            Err(_) => return Err(ForwardError::Timeout(timeout)),
            Ok(Err(e)) => return Err(ForwardError::Upstream(error_chain(&e))),
            Ok(Ok(resp)) => resp,
        };
        self.finish(resp, None, on_upgrade.zip(upgrade))
    }

    /// Opens a tunnel to `dest` as a fresh HTTP/1.1 connection.
    async fn dial(&self, dest: &Destination) -> Result<Conn, ForwardError> {
        let started = Instant::now();
        let tunnel = self
            .dialer
            .open(dest.node, &dest.target, None, false)
            .await
            .map_err(|e| ForwardError::from(DialError::from(e)))?;
        self.metrics
            .dial_latency
            .observe(started.elapsed().as_secs_f64());
        let guard = self.metrics.tunnel_opened(&dest.node.to_string());
        let via = Via::of(&tunnel.conn);
        let stream = TunnelStream {
            send: tunnel.send,
            recv: Box::pin(tunnel.recv),
            _keep: Box::new((tunnel.conn, guard)),
        };
        let io = match &dest.tls {
            None => TunnelIo::Plain(stream),
            Some(name) => TunnelIo::Tls(Box::new(
                self.origins
                    .tls(name, stream)
                    .await
                    .map_err(|why| ForwardError::App(format!("TLS to the app: {why}")))?,
            )),
        };
        Conn::new(io, via)
            .await
            .map_err(|e| ForwardError::Dial(error_chain(&e)))
    }

    /// A tunnel broke under a request: the device went away if its connection died too.
    fn broken(&self, node: EndpointId, e: Option<hyper::Error>) -> ForwardError {
        match self.dialer.down(&node) {
            Some(why) => ForwardError::Lost(why),
            None => ForwardError::Upstream(e.as_ref().map_or_else(
                || "the device closed the tunnel before answering".into(),
                |e| error_chain(e),
            )),
        }
    }

    /// The device's response on its way to the client: connection-level headers dropped,
    /// an agreed upgrade spliced through (and its header pair kept in the 101).
    fn finish<B>(
        &self,
        mut resp: Response<B>,
        via: Option<Via>,
        downstream: Option<(hyper::upgrade::OnUpgrade, HeaderValue)>,
    ) -> Result<Response<Body>, ForwardError>
    where
        B: hyper::body::Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
    {
        if let Some(via) = via {
            resp.extensions_mut().insert(via);
        }
        let switched_to = resp.headers().get(header::UPGRADE).cloned();
        strip_hop_by_hop(resp.headers_mut());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Some((down, asked)) = downstream else {
                return Err(ForwardError::Upstream(
                    "the device switched protocols without being asked to".into(),
                ));
            };
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                match futures::future::try_join(down, up).await {
                    Ok((down, up)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(down),
                            &mut TokioIo::new(up),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(error = %e, "upgrade failed"),
                }
            });
            set_upgrade(resp.headers_mut(), switched_to.unwrap_or(asked));
        }
        // Answer in the client's protocol, whatever the device's server spoke.
        *resp.version_mut() = Version::HTTP_11;
        let metrics = self.metrics.clone();
        Ok(resp.map(|b| {
            b.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    metrics.bytes_out.inc_by(d.len() as u64);
                }
                f
            })
            .map_err(|e| Box::new(e) as BoxError)
            .boxed()
        }))
    }

    /// Opens a raw stream to the first of `choices` (a device's hex NodeID and a target
    /// on it) that accepts: devices that are down go last, and every failure goes on to
    /// the next, since nothing was sent yet. A CONNECT and a public TCP port splice their
    /// client with it; `client` is the public client's address, for targets that take the
    /// PROXY protocol; `udp`: the tunnel carries framed datagrams to a UDP target.
    ///
    /// # Errors
    /// The last attempt's (or `Stream` when `choices` is empty).
    pub async fn open_first(
        &self,
        choices: &[(String, Target)],
        client: Option<std::net::SocketAddr>,
        udp: bool,
    ) -> Result<TunnelStream, OpenError> {
        let mut order: Vec<&(String, Target)> = choices.iter().collect();
        order.sort_by_key(|(node, _)| self.is_down(node));
        let mut last = OpenError::Stream("no backend".into());
        for (node_id, target) in order {
            let Some(node) = self.targets.node(node_id) else {
                last = OpenError::Stream(format!("{node_id:?} is not a NodeID"));
                continue;
            };
            let started = Instant::now();
            match self.dialer.open(node, target, client, udp).await {
                Ok(streams) => {
                    self.metrics
                        .dial_latency
                        .observe(started.elapsed().as_secs_f64());
                    let guard = self.metrics.tunnel_opened(node_id);
                    return Ok(TunnelStream {
                        send: streams.send,
                        recv: Box::pin(streams.recv),
                        _keep: Box::new((streams.conn, guard)),
                    });
                }
                Err(e) => {
                    tracing::debug!(node = %node_id, %target, error = ?e, "trying the next backend, if any");
                    last = e;
                }
            }
        }
        Err(last)
    }

    /// Handles `CONNECT host:port` with `datum-node-id` (and `datum-fallback`, the other
    /// backends, when Envoy sends it): a raw tunnel to the target, spliced with the
    /// client connection once hyper hands it over.
    pub async fn connect(
        &self,
        req: Request<Body>,
        on_upgrade: hyper::upgrade::OnUpgrade,
    ) -> Response<Body> {
        let Some(node) = req
            .headers()
            .get(headers::NODE_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| self.targets.node(v).is_some())
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "CONNECT needs a datum-node-id header naming a device",
            );
        };
        let Some(target) = req.uri().authority().and_then(|a| {
            Some(Target {
                host: a.host().trim_matches(['[', ']']).to_owned(),
                port: a.port_u16()?,
            })
        }) else {
            return text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
        };
        let mut choices = vec![(node.to_owned(), target)];
        choices.extend(fallbacks(req.headers()));
        // Envoy's tunnelling config names the public client (a public port's connection).
        let client = req
            .headers()
            .get(headers::CLIENT_ADDRESS)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut tunnel = match self.open_first(&choices, client, false).await {
            Ok(t) => t,
            Err(OpenError::Refused { status, details }) => {
                let why = details.unwrap_or_else(|| format!("the device answered {status}"));
                return text(status, format!("tunnel failed: {why}"));
            }
            Err(OpenError::Down(why)) => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("tunnel not online ({why})"),
                );
            }
            Err(OpenError::Stream(why)) => {
                return text(StatusCode::BAD_GATEWAY, format!("tunnel failed: {why}"));
            }
        };
        tokio::spawn(async move {
            if let Ok(client) = on_upgrade.await {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut tunnel).await;
            }
        });
        Response::new(empty())
    }

    /// Serves requests as a standalone sidecar (beside Envoy): every request must carry
    /// the `datum-*` headers (and may carry `datum-fallback`: the route's other backends,
    /// tried when this one's device is down); CONNECT carries `datum-node-id`.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<Body> {
        let on_upgrade = hyper::upgrade::on(&mut req);
        let replayable = !req.headers().contains_key(header::UPGRADE) && req.body().is_end_stream();
        let metrics = self.metrics.clone();
        let req = req.map(|b| {
            b.map_frame(move |f| {
                if let Some(d) = f.data_ref() {
                    metrics.bytes_in.inc_by(d.len() as u64);
                }
                f
            })
            .map_err(|e| Box::new(e) as BoxError)
            .boxed()
        });
        let mut req = req;
        from_datum_gateway(req.headers_mut());
        if req.method() == Method::CONNECT {
            return self.connect(req, on_upgrade).await;
        }
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let (parts, body) = req.into_parts();
        let heads = with_fallbacks(&parts.headers);
        match self
            .forward_first(parts, body, heads, Some(on_upgrade), replayable)
            .await
        {
            Ok((_, r)) => r,
            Err(e) => e.into_response(&host),
        }
    }
}

/// Datum's iroh-gateway headers (`x-iroh-endpoint-id`, `x-datum-target-*`), as Datum's
/// Envoy configuration sends them, become the `datum-*` ones, so this sidecar can stand
/// in for that gateway. Only when no `datum-*` routing header is present: Portway's Envoy
/// routes set all of those, and a client's own `x-datum-*` must never override them.
fn from_datum_gateway(h: &mut HeaderMap) {
    use headers::datum_gateway as dg;
    let ours = [
        headers::NODE_ID,
        headers::TARGET_HOST,
        headers::TARGET_PORT,
        headers::TARGET_PROTO,
    ];
    if ours.iter().any(|n| h.contains_key(*n)) {
        return;
    }
    for (theirs, ours) in [
        (dg::ENDPOINT_ID, headers::NODE_ID),
        (dg::TARGET_HOST, headers::TARGET_HOST),
        (dg::TARGET_PORT, headers::TARGET_PORT),
        (dg::TARGET_PROTO, headers::TARGET_PROTO),
    ] {
        if let Some(v) = h.remove(theirs) {
            h.insert(ours, v);
        }
    }
}

/// The request head for the backend Envoy chose, then one per `datum-fallback` entry
/// (`<node-id> <host> <port>`, comma separated) with that device and target.
fn with_fallbacks(headers: &HeaderMap) -> Vec<HeaderMap> {
    let mut heads = vec![headers.clone()];
    for (node, target) in fallbacks(headers) {
        let mut head = headers.clone();
        for (name, value) in [
            (headers::NODE_ID, node),
            (headers::TARGET_HOST, target.host),
            (headers::TARGET_PORT, target.port.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                head.insert(name, v);
            }
        }
        heads.push(head);
    }
    heads
}

/// The `datum-fallback` entries: the route's other backends.
fn fallbacks(headers: &HeaderMap) -> Vec<(String, Target)> {
    headers
        .get_all(headers::FALLBACK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(portway_api::annotations::parse_tunnel_target)
        .collect()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut s = e.source();
    while let Some(x) = s {
        out.push_str(": ");
        out.push_str(&x.to_string());
        s = x.source();
    }
    out
}

/// How a sidecar finds devices and who it says it is.
#[derive(Clone, Debug)]
pub struct Setup {
    /// Where the persistent key lives (the id agents authorise).
    pub key: std::path::PathBuf,
    pub relays: Vec<iroh::RelayUrl>,
    pub dns: portway_discovery::endpoint::DnsLookup,
    pub n0: bool,
    /// The ConnectorClass to register in, and the name of this gateway there.
    pub class: String,
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("sidecar key")]
    Key(#[from] portway_discovery::endpoint::KeyError),
    #[error("sidecar endpoint")]
    Bind(#[from] portway_discovery::endpoint::BindError),
    #[error(transparent)]
    Origins(crate::origin::Error),
    #[error("registering the sidecar in ConnectorClass {class}")]
    Register {
        class: String,
        source: Box<RegisterError>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the ConnectorClass status changed under every one of {0} attempts (409 Conflict)")]
    Conflicts(u32),
}

/// Loads the key, binds the endpoint (DNS lookup and relays only) and registers it as an
/// authorised gateway.
///
/// # Errors
/// When the key, the endpoint or the registration fails.
pub async fn start(
    setup: &Setup,
    client: &kube::Client,
    config: Config,
    metrics: Metrics,
) -> Result<Sidecar, SetupError> {
    let (key, _) = portway_discovery::endpoint::load_or_create_key(&setup.key)?;
    let ep = portway_discovery::endpoint::bind(&portway_discovery::endpoint::Config {
        secret_key: Some(key),
        relays: setup.relays.clone(),
        dns: Some(setup.dns.clone()),
        n0: setup.n0,
        max_streams: Some(16_384),
        // A device gone without a goodbye is noticed within `dead_after`.
        idle_timeout: Some(config.dead_after),
        keep_alive: Some(config.dead_after / 4),
        ..Default::default()
    })
    .await?;
    register(client, &setup.class, &setup.name, ep.id())
        .await
        .map_err(|source| SetupError::Register {
            class: setup.class.clone(),
            source: Box::new(source),
        })?;
    tracing::info!(id = %ep.id(), class = %setup.class, "sidecar registered as an authorised gateway");
    Sidecar::new(ep, config, metrics).map_err(SetupError::Origins)
}

/// Lists this sidecar's endpoint id in the ConnectorClass's `status.gateways`, so agents
/// accept its tunnels. Retries on conflicts; replaces an older entry of the same name.
///
/// # Errors
/// When the class cannot be read or written.
pub async fn register(
    client: &kube::Client,
    class: &str,
    name: &str,
    id: EndpointId,
) -> Result<(), RegisterError> {
    use kube::api::{Api, PostParams};
    use portway_api::{AuthorizedGateway, ConnectorClass};
    const ATTEMPTS: u32 = 10;
    let api: Api<ConnectorClass> = Api::all(client.clone());
    for _ in 0..ATTEMPTS {
        let mut cls = api.get_status(class).await?;
        let status = cls.status.get_or_insert_with(Default::default);
        let entry = AuthorizedGateway {
            name: name.to_owned(),
            endpoint_id: id.to_string(),
        };
        if status.gateways.contains(&entry) {
            return Ok(());
        }
        status.gateways.retain(|g| g.name != name);
        status.gateways.push(entry);
        match api
            .replace_status(class, &PostParams::default(), &cls)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    // Not listed means agents refuse this sidecar's tunnels: say so, never pretend.
    Err(RegisterError::Conflicts(ATTEMPTS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_headers_are_taken_and_all_internal_ones_dropped() {
        let id = iroh::SecretKey::from_bytes(&[3; 32]).public();
        let mut h = HeaderMap::new();
        h.insert("datum-node-id", id.to_string().parse().unwrap());
        h.insert("datum-target-host", "127.0.0.1".parse().unwrap());
        h.insert("datum-target-port", "3000".parse().unwrap());
        h.insert("datum-target-proto", "http".parse().unwrap());
        h.insert("datum-extra", "x".parse().unwrap());
        h.insert("x-iroh-whatever", "x".parse().unwrap());
        h.insert("x-keep", "y".parse().unwrap());
        let targets = Targets::default();
        let t = take_target(&mut h, &targets).unwrap();
        assert_eq!(
            t,
            Destination {
                node: id,
                target: Target {
                    host: "127.0.0.1".into(),
                    port: 3000
                },
                tls: None,
            }
        );
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        let mut bad = HeaderMap::new();
        bad.insert("datum-node-id", "nope".parse().unwrap());
        assert!(matches!(
            take_target(&mut bad, &targets),
            Err(ForwardError::BadRoute(_))
        ));
    }

    #[test]
    fn datum_gateway_headers_stand_in_only_when_no_datum_header_is_there() {
        let mut h = headers(&[
            ("x-iroh-endpoint-id", "abc"),
            ("x-datum-target-host", "127.0.0.1"),
            ("x-datum-target-port", "3000"),
            ("x-datum-target-proto", "http"),
        ]);
        from_datum_gateway(&mut h);
        let mut names: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "datum-node-id",
                "datum-target-host",
                "datum-target-port",
                "datum-target-proto"
            ]
        );
        assert_eq!(h["datum-node-id"], "abc");
        // A Portway route's headers win, and a client's aliases are dropped later.
        let mut h = headers(&[
            ("datum-node-id", "ours"),
            ("datum-target-host", "10.0.0.1"),
            ("datum-target-port", "80"),
            ("x-datum-target-host", "169.254.169.254"),
            ("x-iroh-endpoint-id", "theirs"),
        ]);
        from_datum_gateway(&mut h);
        assert_eq!(h["datum-node-id"], "ours");
        assert_eq!(h["datum-target-host"], "10.0.0.1");
        strip_internal(&mut h);
        assert!(h.is_empty(), "{h:?}");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_dropped() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("proxy-authenticate", "Basic"),
            ("te", "gzip"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x-other", "2"),
            ("authorization", "Bearer end-to-end"),
            ("x-keep", "3"),
        ]);
        assert_eq!(
            strip_hop_by_hop(&mut h),
            None,
            "Upgrade without `Connection: upgrade` asks for nothing"
        );
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["authorization", "x-keep"]);
    }

    #[test]
    fn te_trailers_survives() {
        let mut h = headers(&[("te", "deflate, Trailers"), ("connection", "TE")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn an_upgrade_is_reported_and_its_pair_put_back_normalised() {
        let mut h = headers(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]);
        let protocol = strip_hop_by_hop(&mut h).expect("an upgrade");
        assert_eq!(protocol, "websocket");
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key(header::CONNECTION));
        set_upgrade(&mut h, protocol);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(h.contains_key("sec-websocket-key"));
    }

    #[test]
    fn an_absolute_target_names_the_authority_not_host() {
        let host = |v: &str| headers(&[("host", v)]);
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        assert_eq!(
            request_authority(&uri("http://victim.example/x?y"), &host("app.localhost")).as_deref(),
            Some("victim.example")
        );
        assert_eq!(
            request_authority(&uri("http://user:pw@victim.example:8080/"), &host("a")).as_deref(),
            Some("victim.example:8080"),
            "userinfo is not part of the host"
        );
        assert_eq!(
            request_authority(&uri("/x"), &host("App.localhost:8080")).as_deref(),
            Some("App.localhost:8080")
        );
        assert_eq!(
            request_authority(&uri("/x"), &host("[::1]:80")).as_deref(),
            Some("[::1]:80")
        );
        assert_eq!(
            request_authority(&uri("/x"), &host("user@app.localhost")),
            None
        );
        assert_eq!(request_authority(&uri("/x"), &host("a b")), None);
        assert_eq!(request_authority(&uri("/x"), &HeaderMap::new()), None);
    }

    #[test]
    fn each_fallback_becomes_a_head_of_its_own() {
        let h = headers(&[
            ("datum-node-id", "a"),
            ("datum-target-host", "h"),
            ("datum-target-port", "1"),
            ("datum-fallback", "b 127.0.0.1 2, junk, c ::1 3"),
        ]);
        let heads: Vec<_> = with_fallbacks(&h)
            .iter()
            .map(|h| {
                ["datum-node-id", "datum-target-host", "datum-target-port"]
                    .map(|n| h[n].to_str().unwrap().to_owned())
            })
            .collect();
        assert_eq!(
            heads,
            [["a", "h", "1"], ["b", "127.0.0.1", "2"], ["c", "::1", "3"]]
        );
    }

    #[test]
    fn only_what_did_not_reach_the_app_fails_over() {
        use ForwardError::*;
        let e = |e: ForwardError| {
            [(false, false), (true, false), (true, true)].map(|(r, i)| e.may_fail_over(r, i))
        };
        assert_eq!(e(Offline("x".into())), [false, true, true]);
        assert_eq!(e(Dial("x".into())), [false, true, true]);
        assert_eq!(e(App("x".into())), [false, true, true]);
        assert_eq!(
            e(Lost("x".into())),
            [false, false, true],
            "a POST may have acted"
        );
        assert_eq!(e(Upstream("x".into())), [false, false, true]);
        assert_eq!(e(Timeout(Duration::from_secs(1))), [false; 3]);
    }

    #[test]
    fn node_ids_are_parsed_once_and_the_cache_is_bounded() {
        let t = Targets::default();
        let id = iroh::SecretKey::from_bytes(&[1; 32]).public();
        assert_eq!(t.node(&id.to_string()), Some(id));
        assert_eq!(t.node(&id.to_string()), Some(id));
        assert_eq!(t.node("not-a-node-id"), None);
        for i in 0..(MAX_NODES as u32 + 10) {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            t.node(&iroh::SecretKey::from_bytes(&key).public().to_string());
        }
        assert!(t.ids.lock().len() <= MAX_NODES);
    }
}
