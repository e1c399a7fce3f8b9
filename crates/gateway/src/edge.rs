//! The built-in edge: public HTTP/1.1 and HTTP/2 (h2c, or h2 over TLS with per-hostname
//! certificates), routed through the route table to the in-process sidecar.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::model::{Table, apply_filter};
use crate::sidecar::{Body, BoxError, ForwardError, Sidecar, strip_internal, text};

#[derive(Clone, Debug)]
pub struct Config {
    /// Plain HTTP (HTTP/1.1 and h2c) listener; default `127.0.0.1:8080`.
    pub http: Option<SocketAddr>,
    /// HTTPS listener (h2 and HTTP/1.1 by ALPN); needs `cert_dir`.
    pub https: Option<SocketAddr>,
    /// `<hostname>.crt` + `<hostname>.key` per hostname (`_.example.com` stands for
    /// `*.example.com`; `default.*` answers unknown names).
    pub cert_dir: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            http: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            https: None,
            cert_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("--https needs a certificate directory")]
    NoCerts,
    #[error("reading certificates from {dir}: {reason}")]
    Certs { dir: PathBuf, reason: String },
}

/// Per-hostname certificates for SNI.
#[derive(Debug, Default)]
struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name().map(|n| n.to_ascii_lowercase()) else {
            return self.default.clone();
        };
        self.exact
            .get(&name)
            .or_else(|| {
                self.wildcard
                    .iter()
                    .find(|(s, _)| name.len() > s.len() && name.ends_with(s.as_str()))
                    .map(|(_, k)| k)
            })
            .cloned()
            .or_else(|| self.default.clone())
    }
}

fn load_certs(dir: &Path) -> Result<Certs, Error> {
    let err = |reason: String| Error::Certs {
        dir: dir.to_owned(),
        reason,
    };
    let provider = rustls::crypto::ring::default_provider();
    let mut certs = Certs::default();
    for entry in std::fs::read_dir(dir).map_err(|e| err(e.to_string()))? {
        let path = entry.map_err(|e| err(e.to_string()))?.path();
        if path.extension().is_none_or(|e| e != "crt") {
            continue;
        }
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        let key_path = path.with_extension("key");
        let chain: Vec<_> = rustls_pemfile::certs(
            &mut std::fs::read(&path)
                .map_err(|e| err(format!("{}: {e}", path.display())))?
                .as_slice(),
        )
        .filter_map(Result::ok)
        .collect();
        let key = rustls_pemfile::private_key(
            &mut std::fs::read(&key_path)
                .map_err(|e| err(format!("{}: {e}", key_path.display())))?
                .as_slice(),
        )
        .ok()
        .flatten()
        .ok_or_else(|| err(format!("{} holds no private key", key_path.display())))?;
        let signer = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| err(format!("{}: {e}", key_path.display())))?;
        let ck = Arc::new(CertifiedKey::new(chain, signer));
        match stem.strip_prefix("_.") {
            _ if stem == "default" => certs.default = Some(ck),
            Some(suffix) => certs.wildcard.push((format!(".{suffix}"), ck)),
            None => {
                certs.exact.insert(stem, ck);
            }
        }
    }
    certs.wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    if certs.exact.is_empty() && certs.wildcard.is_empty() && certs.default.is_none() {
        return Err(err("no <hostname>.crt/.key pairs found".into()));
    }
    Ok(certs)
}

struct State {
    table: Arc<ArcSwap<Table>>,
    sidecar: Arc<Sidecar>,
    metrics: Metrics,
}

/// A running edge.
pub struct Edge {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl Edge {
    /// Binds the listeners and starts serving from `table`.
    ///
    /// # Errors
    /// When a listener cannot be bound or certificates cannot be loaded.
    pub async fn bind(
        config: Config,
        table: Arc<ArcSwap<Table>>,
        sidecar: Arc<Sidecar>,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        let state = Arc::new(State {
            table,
            sidecar,
            metrics,
        });
        let shutdown = CancellationToken::new();
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
                state.clone(),
                shutdown.clone(),
            )));
        }
        let mut https = None;
        if let Some(addr) = config.https {
            let dir = config.cert_dir.as_deref().ok_or(Error::NoCerts)?;
            let certs = load_certs(dir)?;
            let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Certs {
                dir: dir.to_owned(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(certs));
            tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { addr, source })?;
            https = l.local_addr().ok();
            tasks.push(tokio::spawn(serve(
                l,
                Some(TlsAcceptor::from(Arc::new(tls))),
                state,
                shutdown.clone(),
            )));
        }
        Ok(Self {
            http,
            https,
            shutdown,
            tasks,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let scheme = if tls.is_some() { "https" } else { "http" };
    loop {
        let (stream, remote) = tokio::select! {
            () = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (state, tls, shutdown) = (state.clone(), tls.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            state.metrics.active_connections.inc();
            let conn_state = state.clone();
            let service = service_fn(move |req| {
                let state = conn_state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(&state, req, remote, scheme).await)
                }
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            let result: Result<(), BoxError> = match tls {
                Some(tls) => {
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await {
                        Ok(Ok(s)) => drive(&builder, TokioIo::new(s), service, &shutdown).await,
                        Ok(Err(e)) => Err(e.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
                None => drive(&builder, TokioIo::new(stream), service, &shutdown).await,
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "client connection ended with an error");
            }
            state.metrics.active_connections.dec();
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tracker.wait()).await;
}

async fn drive<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    shutdown: &CancellationToken,
) -> Result<(), BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => r,
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// One public request, top to bottom.
async fn handle(
    state: &State,
    mut req: Request<Incoming>,
    remote: SocketAddr,
    scheme: &str,
) -> Response<Body> {
    // A client must never choose the device or the target.
    strip_internal(req.headers_mut());

    // Which published hostname.
    let Some(host_raw) = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
    else {
        return text(StatusCode::BAD_REQUEST, "the request names no host");
    };
    let table = state.table.load();
    let Some(host) = table.lookup(&host_raw) else {
        state.metrics.request("unknown", 404);
        return text(
            StatusCode::NOT_FOUND,
            format!("{host_raw}: no tunnel is published at this hostname"),
        );
    };
    let hostname = host.hostname.clone();
    let done = |resp: Response<Body>| {
        state.metrics.request(&hostname, resp.status().as_u16());
        resp
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

    // Which backend: ready ones in round-robin order; later ones are the failover.
    let backends = route.ready_in_order();
    if backends.is_empty() {
        return done(text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{hostname}: tunnel not online (no connector behind it is ready)"),
        ));
    }

    // What the device's service learns about the client.
    let headers = req.headers_mut();
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {}", remote.ip()),
        None => remote.ip().to_string(),
    };
    for (n, v) in [
        ("x-forwarded-for", xff),
        ("x-forwarded-proto", scheme.to_owned()),
        ("x-forwarded-host", host_raw.clone()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            headers.insert(n, v);
        }
    }

    // Forward through the sidecar, failing over while nothing was sent.
    let on_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let replayable = on_upgrade.is_none() && req.body().is_end_stream();
    let idempotent = matches!(
        *req.method(),
        http::Method::GET | http::Method::HEAD | http::Method::OPTIONS
    );
    let (parts, body) = req.into_parts();
    let metrics = state.metrics.clone();
    let mut body = Some(
        body.map_frame(move |f| {
            if let Some(d) = f.data_ref() {
                metrics.bytes_in.inc_by(d.len() as u64);
            }
            f
        })
        .map_err(|e| Box::new(e) as BoxError)
        .boxed(),
    );
    let mut on_upgrade = on_upgrade;
    let mut last_error = None;
    for backend in &backends {
        let mut attempt = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(parts.version);
        if let Some(h) = attempt.headers_mut() {
            *h = parts.headers.clone();
            // The rule's filter, then the backendRef's (which sets the datum-* headers).
            apply_filter(&route.filter, h);
            apply_filter(&backend.headers, h);
        }
        let b = body.take().unwrap_or_else(crate::sidecar::empty);
        let Ok(attempt) = attempt.body(b) else { break };
        match state.sidecar.forward(attempt, on_upgrade.take()).await {
            Ok(resp) => return done(resp),
            Err(ForwardError::Dial(why)) if replayable => {
                tracing::warn!(host = %hostname, backend = %backend.service, %why, "dial failed; trying the next backend");
                last_error = Some(ForwardError::Dial(why));
            }
            // An idempotent request whose tunnel broke may be tried again elsewhere.
            Err(ForwardError::Upstream(why)) if replayable && idempotent => {
                tracing::warn!(host = %hostname, backend = %backend.service, %why, "tunnel broke; trying the next backend");
                last_error = Some(ForwardError::Upstream(why));
            }
            Err(e) => return done(e.into_response(&hostname)),
        }
    }
    done(
        last_error
            .unwrap_or(ForwardError::Dial("no backend could be dialed".into()))
            .into_response(&hostname),
    )
}
