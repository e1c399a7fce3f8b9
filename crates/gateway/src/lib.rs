//! The edge: the built-in gateway that serves Gateway API routes, the iroh sidecar that
//! dials devices, and the xDS server for Envoy.
//!
//! - [`model`]: Gateway API objects → one immutable route table (both renderers use it).
//! - [`routes`]: watches the objects, swaps the table, writes Gateway/HTTPRoute status
//!   (decided by the pure [`routes::desired`]); shares its Gateway cache.
//! - [`edge`]: public HTTP/1.1, h2c and h2 over TLS (SNI); strips inbound `datum-*` and
//!   `x-iroh-*`, routes, picks a ready backend, adds `X-Forwarded-*`, forwards through
//!   the sidecar in process.
//! - [`http01`]: the ACME HTTP-01 answers every edge serves for the operator's orders.
//! - [`access`]: the edge's access log, one `portway::access` event per request.
//! - [`sidecar`]: dials a NodeID through DNS discovery and the relay, pools CONNECT
//!   tunnels (`iroh-http-proxy/1`), forwards requests and upgrades; registers itself as an
//!   authorised gateway; also serves standalone beside Envoy.
//! - [`origin`]: backends without a connector, which the sidecar reaches itself over
//!   HTTP or HTTPS, each resolved address checked against the origin policy.
//! - [`tunnel`]: the sidecar's dialer: one pooled iroh connection per device, a CONNECT
//!   per tunnel, the devices just lost (answered at once, probed until back).
//! - [`xds`]: the table as Envoy clusters, listener and routes over ADS (gRPC), and the
//!   `XdsAccepted` condition on Gateways; [`xds::Stack`] runs it with its route watcher.
//! - [`EdgeStack`]: the sidecar, the edge and the route watcher started together.
//! - [`metrics`]: requests, bytes, connections, dial times and tunnels, served on
//!   `GET /metrics` by [`serve_metrics`].
//!
//! ```no_run
//! # async fn run(client: kube::Client, setup: portway_gateway::sidecar::Setup) -> Result<(), Box<dyn std::error::Error>> {
//! use portway_gateway::{EdgeStack, EdgeStackConfig, edge};
//! let config = EdgeStackConfig {
//!     sidecar: setup,
//!     edge: edge::Config::default(),
//!     class: "portway".into(),
//!     addresses: Vec::new(),
//!     origins: Default::default(),
//! };
//! let stack = EdgeStack::start(config, client, None).await?;
//! println!("edge on {:?}", stack.http_addr());
//! stack.shutdown();
//! stack.join().await;
//! # Ok(()) }
//! ```

pub mod access;
pub mod certs;
pub mod edge;
pub mod fetch;
pub mod filters;
pub mod http01;
pub mod jwt;
pub mod metrics;
pub mod model;
pub mod oidc;
pub mod origin;
pub mod policy;
pub mod pool;
pub mod routes;
pub mod sidecar;
mod stack;
pub mod tcp;
pub mod tunnel;
pub mod udp;
pub mod xds;

pub use stack::{EdgeStack, EdgeStackConfig, EdgeStackError};

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sidecar::{Body, Sidecar, text};

/// Serves plain-HTTP requests on `listener` with `handler` until `shutdown`.
fn serve_http<F, Fut>(
    listener: TcpListener,
    shutdown: CancellationToken,
    limits: portway_serve::Limits,
    handler: F,
) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
{
    let service = move |_: &portway_serve::Peer| {
        let handler = handler.clone();
        service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, std::convert::Infallible>(handler(req).await) }
        })
    };
    tokio::spawn(portway_serve::serve(
        listener, None, service, shutdown, limits,
    ))
}

/// Serves the standalone sidecar on `listener`.
pub fn serve_sidecar(
    listener: TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    // Envoy keeps idle upstream connections for an hour by default: outlasting that lets
    // Envoy close them first, so it never sends a request on one we are closing.
    let limits = portway_serve::Limits {
        idle_timeout: std::time::Duration::from_secs(65 * 60),
        ..Default::default()
    };
    serve_http(listener, shutdown, limits, move |req| {
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
    let limits = portway_serve::Limits::default();
    let task = serve_http(listener, shutdown, limits, move |req: Request<Incoming>| {
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
