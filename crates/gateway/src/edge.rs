//! The built-in edge: public HTTP/1.1 and HTTP/2 (h2c, or h2 over TLS with per-hostname
//! certificates), routed through the route table to the in-process sidecar.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::certs::Resolver;
use crate::metrics::Metrics;
use crate::model::{Table, apply_filter};
use crate::sidecar::{
    Body, BoxError, Sidecar, request_authority, set_upgrade, strip_hop_by_hop, strip_internal, text,
};

pub use ipnet::IpNet;

#[derive(Clone, Debug)]
pub struct Config {
    /// Plain HTTP (HTTP/1.1 and h2c) listener; default `127.0.0.1:8080`.
    pub http: Option<SocketAddr>,
    /// HTTPS listener (h2 and HTTP/1.1 by ALPN), serving the issued certificates and
    /// those of `cert_dir`.
    pub https: Option<SocketAddr>,
    /// `<hostname>.crt` + `<hostname>.key` per hostname (`_.example.com` stands for
    /// `*.example.com`; `default.*` answers unknown names); served before issued ones.
    pub cert_dir: Option<PathBuf>,
    /// Peers whose `X-Forwarded-*`, `Forwarded` and `X-Real-IP` headers are kept (a load
    /// balancer in front); default none: every client's are replaced by ours.
    pub trusted_proxies: Vec<IpNet>,
    /// TCP load balancers in front that send the PROXY protocol (v1 or v2) on the HTTP and
    /// HTTPS listeners: a connection from them names its client first, which the edge then
    /// takes as the client (`X-Forwarded-For`, the access log, passthrough devices).
    /// Default none.
    pub proxy_protocol_from: Vec<IpNet>,
    /// Log every request on the `portway::access` target ([`crate::access`]); default off.
    pub access_log: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            https: None,
            cert_dir: None,
            trusted_proxies: Vec::new(),
            proxy_protocol_from: Vec::new(),
            access_log: false,
        }
    }
}

/// Parses a `--trusted-proxy` value: a CIDR, or one address.
///
/// # Errors
/// When `s` is neither.
pub fn parse_cidr(s: &str) -> Result<IpNet, ipnet::AddrParseError> {
    s.parse::<IpNet>()
        .or_else(|e| s.parse::<IpAddr>().map(IpNet::from).map_err(|_| e))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Certs(#[from] crate::certs::Error),
    #[error("building the TLS configuration")]
    Tls(#[from] rustls::Error),
}

struct State {
    table: Arc<ArcSwap<Table>>,
    sidecar: Arc<Sidecar>,
    metrics: Metrics,
    trusted_proxies: Vec<IpNet>,
    proxy_protocol_from: Vec<IpNet>,
    access_log: bool,
    /// The HTTPS port and the certificates: plain HTTP to a name an issued certificate
    /// covers is redirected there.
    redirect: Option<(u16, Arc<Resolver>)>,
    /// ACME HTTP-01 answers, served over plain HTTP before any route.
    http01: crate::http01::Answers,
}

/// A running edge.
pub struct Edge {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Edge {
    /// Binds the listeners and starts serving from `table` until `shutdown`.
    ///
    /// # Errors
    /// When a listener cannot be bound or certificates cannot be loaded.
    pub async fn bind(
        config: Config,
        certs: Arc<Resolver>,
        http01: crate::http01::Answers,
        table: Arc<ArcSwap<Table>>,
        sidecar: Arc<Sidecar>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Self, Error> {
        let passthrough: Arc<dyn portway_serve::Passthrough> =
            Arc::new(crate::tcp::Passthrough::new(
                table.clone(),
                sidecar.clone(),
                crate::tcp::Config::default(),
                shutdown.clone(),
            ));
        let https_listener = match config.https {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?,
            ),
            None => None,
        };
        let https_port = https_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port());
        let state = Arc::new(State {
            table,
            sidecar,
            metrics,
            trusted_proxies: config.trusted_proxies.clone(),
            proxy_protocol_from: config.proxy_protocol_from.clone(),
            access_log: config.access_log,
            redirect: https_port.map(|p| (p, certs.clone())),
            http01,
        });
        let mut tasks = Vec::new();
        let mut http = None;
        if let Some(addr) = config.http {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            http = l.local_addr().ok();
            tasks.push(tokio::spawn(serve(
                l,
                None,
                None,
                state.clone(),
                shutdown.clone(),
            )));
        }
        let mut https = None;
        if let Some(l) = https_listener {
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(certs);
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            https = l.local_addr().ok();
            tasks.push(tokio::spawn(serve(
                l,
                Some(TlsAcceptor::from(Arc::new(tls))),
                Some(passthrough),
                state,
                shutdown,
            )));
        }
        Ok(Self { http, https, tasks })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Client connections the edge serves at once; past it, plain HTTP clients get a 503 and
/// TLS ones a closed connection.
const MAX_CONNECTIONS: usize = 50_000;

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    passthrough: Option<Arc<dyn portway_serve::Passthrough>>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let limits = portway_serve::Limits {
        max_connections: MAX_CONNECTIONS,
        proxy_protocol_from: state.proxy_protocol_from.clone(),
        ..Default::default()
    };
    let service = move |peer: &portway_serve::Peer| {
        let (remote, scheme) = (peer.remote, if peer.tls { "https" } else { "http" });
        let open = OpenConnection::new(&state.metrics);
        let state = state.clone();
        service_fn(move |req| {
            let _counted = &open;
            let state = state.clone();
            async move {
                let resp = crate::access::logged(state.access_log, req, remote, |req| {
                    handle(&state, req, remote, scheme)
                });
                Ok::<_, std::convert::Infallible>(resp.await)
            }
        })
    };
    match (tls, passthrough) {
        (Some(tls), Some(p)) => {
            portway_serve::serve_with_passthrough(listener, tls, p, service, shutdown, limits)
                .await;
        }
        (tls, _) => portway_serve::serve(listener, tls, service, shutdown, limits).await,
    }
}

/// Counts a client connection in `active_connections` while its service lives.
struct OpenConnection(Metrics);

impl OpenConnection {
    fn new(metrics: &Metrics) -> Self {
        metrics.active_connections.inc();
        Self(metrics.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.active_connections.dec();
    }
}

/// Where plain HTTP to `authority` goes instead, when an issued certificate covers its
/// name: the same host, path and query over HTTPS (port omitted when 443).
fn https_location(authority: &str, uri: &http::Uri, port: u16, certs: &Resolver) -> Option<String> {
    let name = host_name(authority);
    if !certs.issued_covers(name) {
        return None;
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    Some(if port == 443 {
        format!("https://{name}{path}")
    } else {
        format!("https://{name}:{port}{path}")
    })
}

/// The name in a Host header or authority, without its port.
pub(crate) fn host_name(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((name, p)) if !name.contains(']') && p.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => authority,
    }
}

/// One public request, top to bottom.
async fn handle(
    state: &State,
    mut req: Request<Incoming>,
    remote: SocketAddr,
    scheme: &str,
) -> Response<Body> {
    // A client must never choose the device or the target, and what describes its
    // connection stays on it; only an upgrade is asked for again toward the device.
    let upgrade = {
        let headers = req.headers_mut();
        strip_internal(headers);
        // Only a policy's sign-in sets the caller's identity.
        headers.remove(portway_api::access::IDENTITY_HEADER);
        let upgrade = strip_hop_by_hop(headers);
        if let Some(protocol) = &upgrade {
            set_upgrade(headers, protocol.clone());
        }
        upgrade.filter(|_| req.version() == http::Version::HTTP_11)
    };

    // Which published hostname: an absolute-form target's authority wins over Host, and
    // the device is told the same one.
    let Some(host_raw) = request_authority(req.uri(), req.headers()) else {
        return text(StatusCode::BAD_REQUEST, "the request names no host");
    };
    if let Ok(v) = HeaderValue::from_str(&host_raw) {
        req.headers_mut().insert(header::HOST, v);
    }
    // An ACME server checking a name the operator is ordering a certificate for: answered
    // here, whatever routes or redirects the name has.
    if scheme == "http"
        && req.method() == http::Method::GET
        && let Some(a) = crate::http01::answer(&state.http01.load(), &host_raw, req.uri().path())
    {
        state.metrics.request("acme-http01", 200);
        return text(StatusCode::OK, a.key_authorization.clone());
    }
    let table = state.table.load();
    let Some(host) = table.lookup(&host_raw) else {
        state.metrics.request("unknown", 404);
        return text(
            StatusCode::NOT_FOUND,
            format!("{host_raw}: no tunnel is published at this hostname"),
        );
    };
    let hostname = host.hostname.clone();
    let hsts = host.hsts.as_ref().filter(|_| scheme == "https");
    let done = |mut resp: Response<Body>| {
        if let Some(v) = hsts {
            resp.headers_mut()
                .insert(header::STRICT_TRANSPORT_SECURITY, v.clone());
        }
        state.metrics.request(&hostname, resp.status().as_u16());
        resp
    };
    // A trusted load balancer that ended TLS itself says so; redirecting it would loop.
    let behind_tls = || {
        trusts(&state.trusted_proxies, remote.ip())
            && req
                .headers()
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"))
    };
    if scheme == "http"
        && host.https_redirect
        && let Some((port, certs)) = &state.redirect
        && !behind_tls()
        && let Some(to) = https_location(&host_raw, req.uri(), *port, certs)
    {
        let mut resp = text(StatusCode::PERMANENT_REDIRECT, "");
        if let Ok(v) = HeaderValue::from_str(&to) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return done(resp);
    }

    // The keys the identity header is signed with, for apps to check it.
    if req.uri().path() == portway_api::access::IDENTITY_JWKS_PATH
        && matches!(*req.method(), http::Method::GET | http::Method::HEAD)
    {
        let Some(signer) = &table.identity else {
            return done(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "the identity signing key is not loaded yet",
            ));
        };
        let mut resp = text(StatusCode::OK, signer.jwks().to_owned());
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/jwk-set+json"),
        );
        return done(resp);
    }

    // Behind a trusted balancer that ended TLS, the browser's scheme is https (sign-in's
    // redirect URI and Secure cookies follow it).
    let browser_scheme = if scheme == "http" && behind_tls() {
        "https"
    } else {
        scheme
    };

    // Which route.
    let (method, path, query) = (
        req.method().as_str().to_owned(),
        req.uri().path().to_owned(),
        req.uri().query().map(str::to_owned),
    );
    let Some(route) = host
        .routes
        .iter()
        .find(|r| r.matches(&method, &path, req.headers(), query.as_deref()))
    else {
        return done(text(
            StatusCode::NOT_FOUND,
            format!("{hostname}: no route matches {method} {path}"),
        ));
    };

    if let Some(why) = &route.unsupported {
        return done(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{hostname}: the route uses a filter Portway does not implement: {why}"),
        ));
    }

    // The route's AccessPolicy, in its documented order: the client's address before
    // anything else (a CORS preflight included), then the method and the declared size.
    let policy = route.access.as_deref();
    // Only a route with a policy reads X-Forwarded-For for it.
    let client = match policy {
        Some(_) => crate::policy::client_ip(req.headers(), remote.ip(), &state.trusted_proxies),
        None => None,
    };
    if let Some(p) = policy
        && let Err(d) = p.check_ip(client)
    {
        return done(denied(&state.metrics, &hostname, d));
    }

    // CORS, as Envoy's filter: an allowed origin's preflight is answered here; every
    // other answer to an allowed origin carries the allow headers.
    let cors = route.cors.as_deref().and_then(|c| {
        let origin = req.headers().get(header::ORIGIN)?;
        c.allows(origin.to_str().ok()?).then(|| (c, origin.clone()))
    });
    if let Some((c, origin)) = &cors
        && req.method() == http::Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut resp = text(StatusCode::OK, "");
        for (n, v) in c.preflight(origin) {
            resp.headers_mut().insert(n, v);
        }
        return done(resp);
    }
    let done = |mut resp: Response<Body>| {
        if let Some((c, origin)) = &cors {
            for (n, v) in c.response(origin) {
                resp.headers_mut().insert(n, v);
            }
        }
        done(resp)
    };

    // Boxed once, counting what the client sends (a body held for the size rule is
    // counted as it arrives).
    let metrics = state.metrics.clone();
    let mut req = req.map(|body| {
        body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                metrics.bytes_in.inc_by(d.len() as u64);
            }
            f
        })
        .map_err(|e| Box::new(e) as BoxError)
        .boxed()
    });
    if let Some(p) = policy {
        // A client that cannot be told is counted as the proxy that sent it.
        let who = client.unwrap_or_else(|| remote.ip().to_canonical());
        if p.authenticates() {
            let identity = crate::policy::Identity {
                signer: table.identity.as_deref(),
                host: &host_raw,
                method: req.method(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or("/", http::uri::PathAndQuery::as_str),
                scheme: browser_scheme,
            };
            // Decided first: the request is borrowed for the check, then its headers
            // changed by the grant.
            let decided = p.authenticate(req.headers(), who, identity).await;
            match decided {
                Ok(grant) => grant.apply(req.headers_mut()),
                Err(d) => return done(denied(&state.metrics, &hostname, d)),
            }
        }
        if let Err(d) = p.check_head(req.method(), req.headers()) {
            return done(denied(&state.metrics, &hostname, d));
        }
        // A body of undeclared length is held whole up to the limit, as Envoy's buffer
        // filter does: one over it is refused before any of it reaches the device.
        if let Some(max) = p.max_request_bytes
            && !req.body().is_end_stream()
            && !req.headers().contains_key(header::CONTENT_LENGTH)
        {
            let (parts, body) = req.into_parts();
            match hold(body, usize::try_from(max).unwrap_or(usize::MAX)).await {
                Ok(Some(whole)) => {
                    let body = http_body_util::Full::new(whole)
                        .map_err(|never| match never {})
                        .boxed();
                    req = Request::from_parts(parts, body);
                }
                Ok(None) => {
                    return done(denied(
                        &state.metrics,
                        &hostname,
                        crate::policy::too_large(max),
                    ));
                }
                Err(e) => {
                    return done(text(
                        StatusCode::BAD_REQUEST,
                        format!("reading the request body: {e}"),
                    ));
                }
            }
        }
    }

    if let Some(r) = &route.redirect {
        let location = r.location(scheme, &host_raw, &path, query.as_deref());
        let mut resp = text(
            StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND),
            "",
        );
        match HeaderValue::from_str(&location) {
            Ok(v) => resp.headers_mut().insert(header::LOCATION, v),
            Err(_) => {
                return done(text(
                    StatusCode::BAD_REQUEST,
                    "the redirect target is not a valid URL",
                ));
            }
        };
        apply_filter(&route.response, resp.headers_mut());
        return done(resp);
    }

    // Which backend: ready ones in round-robin order; later ones are the failover.
    let backends = route.ready_in_order();
    if backends.is_empty() {
        return done(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{hostname}: tunnel not online (no connector behind it is ready)"),
        ));
    }

    // What the device's service learns about the client.
    let peer = remote.ip().to_canonical();
    let trusted = trusts(&state.trusted_proxies, peer);
    set_forwarded(req.headers_mut(), peer, trusted, scheme, &host_raw);

    // What the device is asked for: the public host and path, or the rewritten ones.
    if let Some(r) = &route.rewrite {
        if let Some(h) = &r.hostname {
            req.headers_mut().insert(header::HOST, h.clone());
        }
        match http::Uri::try_from(r.path_and_query(&path, query.as_deref())) {
            Ok(uri) => *req.uri_mut() = uri,
            Err(_) => {
                return done(text(
                    StatusCode::BAD_REQUEST,
                    "the rewritten path is not valid",
                ));
            }
        }
    }

    // Forward through the sidecar: one head per backend; the sidecar puts devices it
    // just lost last and fails over while nothing was sent (or a GET broke).
    let on_upgrade = upgrade.map(|_| hyper::upgrade::on(&mut req));
    let replayable = on_upgrade.is_none() && req.body().is_end_stream();
    let (parts, body) = req.into_parts();
    let heads = backends
        .iter()
        .map(|backend| {
            let mut h = parts.headers.clone();
            // The rule's filter, the backendRef's, then — last, so no filter can change
            // them — the device and target the operator chose.
            apply_filter(&route.filter, &mut h);
            apply_filter(&backend.headers, &mut h);
            if let Some(t) = &backend.tunnel {
                t.apply(&mut h);
            }
            h
        })
        .collect();
    match state
        .sidecar
        .forward_first(parts, body, heads, on_upgrade, replayable)
        .await
    {
        Ok((i, mut resp)) => {
            // The rule's response filter, then the backendRef's that answered (composed).
            if let Some(b) = backends.get(i) {
                apply_filter(&b.response, resp.headers_mut());
            }
            done(resp)
        }
        Err(e) => {
            tracing::debug!(host = %hostname, error = ?e, "no backend answered");
            done(e.into_response(&hostname))
        }
    }
}

/// Reads `body` whole, up to `max` bytes; `None` when it is longer.
async fn hold(mut body: Body, max: usize) -> Result<Option<bytes::Bytes>, BoxError> {
    let mut whole = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if whole.len() + data.len() > max {
                return Ok(None);
            }
            whole.extend_from_slice(&data);
        }
    }
    Ok(Some(whole.freeze()))
}

/// The answer an AccessPolicy gives instead of the app, counted and marked for the log.
fn denied(metrics: &Metrics, hostname: &str, d: crate::policy::Denied) -> Response<Body> {
    metrics.denied(hostname, d.rule, d.reason);
    let mut resp = text(d.status, format!("{hostname}: {}", d.message));
    for (name, value) in d.headers {
        resp.headers_mut().append(name, value);
    }
    resp.extensions_mut().insert(crate::access::DeniedBy {
        rule: d.rule,
        reason: d.reason,
    });
    resp
}

/// Whether `peer` (an IPv4-mapped IPv6 address counts as IPv4) is a trusted proxy.
fn trusts(proxies: &[IpNet], peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    proxies.iter().any(|n| n.contains(&peer))
}

const X_FORWARDED_FOR: &str = "x-forwarded-for";
const X_FORWARDED_PROTO: &str = "x-forwarded-proto";
const X_FORWARDED_HOST: &str = "x-forwarded-host";

/// Sets `X-Forwarded-For/-Proto/-Host`. A trusted proxy's values are kept (the peer is
/// appended to its `X-Forwarded-For`; its `Forwarded` and `X-Real-IP` pass); anyone else's
/// are replaced, since a client can claim any address.
fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted: bool,
    scheme: &str,
    authority: &str,
) {
    let mut xff = peer.to_string();
    if trusted {
        let prev: Vec<&str> = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if !prev.is_empty() {
            xff = format!("{}, {xff}", prev.join(", "));
        }
    } else {
        for h in [
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            header::FORWARDED.as_str(),
            "x-real-ip",
        ] {
            headers.remove(h);
        }
    }
    for (name, value) in [
        (X_FORWARDED_FOR, xff.as_str()),
        (X_FORWARDED_PROTO, scheme),
        (X_FORWARDED_HOST, authority),
    ] {
        if (name == X_FORWARDED_FOR || !headers.contains_key(name))
            && let Ok(v) = HeaderValue::from_str(value)
        {
            headers.insert(name, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ] {
            h.append(n, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_clients_forwarding_headers_are_replaced() {
        let mut h = spoofed();
        set_forwarded(
            &mut h,
            "192.0.2.1".parse().unwrap(),
            false,
            "http",
            "app.localhost",
        );
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.localhost");
    }

    #[test]
    fn a_trusted_proxys_forwarding_headers_are_kept_and_extended() {
        let mut h = spoofed();
        set_forwarded(
            &mut h,
            "10.0.0.7".parse().unwrap(),
            true,
            "http",
            "app.localhost",
        );
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 10.0.0.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "bank.example");
        assert_eq!(h["forwarded"], "for=6.6.6.6");
        assert_eq!(h["x-real-ip"], "6.6.6.6");

        // Without headers of its own, a trusted proxy gets ours.
        let mut h = HeaderMap::new();
        set_forwarded(
            &mut h,
            "10.0.0.7".parse().unwrap(),
            true,
            "https",
            "app.localhost",
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "app.localhost");
    }

    #[test]
    fn trusted_proxies_are_cidrs_or_addresses() {
        let proxies: Vec<IpNet> = ["10.0.0.0/8", "2001:db8::1", "192.0.2.9"]
            .into_iter()
            .map(|s| parse_cidr(s).unwrap())
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(trusts(&proxies, ip("10.1.2.3")));
        assert!(trusts(&proxies, ip("::ffff:10.1.2.3")), "IPv4-mapped");
        assert!(trusts(&proxies, ip("2001:db8::1")));
        assert!(trusts(&proxies, ip("192.0.2.9")));
        assert!(!trusts(&proxies, ip("192.0.2.10")));
        assert!(!trusts(&proxies, ip("2001:db8::2")));
        assert!(
            !trusts(&[], ip("127.0.0.1")),
            "nobody is trusted by default"
        );
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("proxy.example").is_err());
    }
}
