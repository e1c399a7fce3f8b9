//! The edge: the built-in gateway that serves Gateway API routes, the iroh sidecar that
//! dials devices, and the xDS server for Envoy.
//!
//! - [`model`]: Gateway API objects → one immutable route table (both renderers use it).
//! - [`routes`]: watches the objects, swaps the table, writes Gateway/HTTPRoute status.
//! - [`edge`]: public HTTP/1.1, h2c and h2 over TLS (SNI); strips inbound `datum-*` and
//!   `x-iroh-*`, routes, picks a ready backend, adds `X-Forwarded-*`, forwards through
//!   the sidecar in process.
//! - [`sidecar`]: dials a NodeID through DNS discovery and the relay, pools CONNECT
//!   tunnels (`iroh-http-proxy/1`), forwards requests and upgrades; registers itself as an
//!   authorised gateway; also serves standalone beside Envoy.
//!
//! ```no_run
//! # async fn run(client: kube::Client, endpoint: iroh::Endpoint) -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use portway_gateway::{edge, metrics::Metrics, model::Table, routes, sidecar::Sidecar};
//! let metrics = Metrics::default();
//! let table = Arc::new(arc_swap::ArcSwap::from_pointee(Table::default()));
//! let sidecar = Arc::new(Sidecar::new(endpoint, Default::default(), metrics.clone()));
//! let edge = edge::Edge::bind(edge::Config::default(), table.clone(), sidecar, metrics).await?;
//! # Ok(()) }
//! ```

pub mod edge;
pub mod metrics;
pub mod model;
pub mod routes;
pub mod sidecar;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sidecar::{Body, Sidecar, text};

/// Serves plain-HTTP requests on `listener` with `handler` until `shutdown`.
fn serve_http<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    handler: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                () = shutdown.cancelled() => return,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            let handler = handler.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let service = service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    })
}

/// Serves the standalone sidecar on `listener`.
pub fn serve_sidecar(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    serve_http(listener, shutdown, move |req| {
        let sidecar = sidecar.clone();
        async move { sidecar.handle(req).await }
    })
}

/// Serves `GET /metrics` from `registry`.
///
/// # Errors
/// When `addr` cannot be bound.
pub async fn serve_metrics(
    addr: SocketAddr,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = serve_http(listener, shutdown, move |req: Request<Incoming>| {
        let registry = registry.clone();
        async move {
            if req.uri().path() == "/metrics" {
                let mut r = Response::new(sidecar::full(metrics::encode(&registry)));
                if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse()
                {
                    r.headers_mut().insert(http::header::CONTENT_TYPE, v);
                }
                r
            } else {
                text(StatusCode::NOT_FOUND, "try /metrics")
            }
        }
    });
    Ok((bound, task))
}
