//! The built-in edge with what it needs, started in one call: the sidecar (and its own
//! listener, when given one), the public listeners and the route watcher feeding them.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use iroh::EndpointId;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::certs;
use crate::edge::{self, Edge};
use crate::metrics::Metrics;
use crate::model::Table;
use crate::routes::{self, Routes};
use crate::sidecar::{self, Sidecar};

/// How long a stack's `join()` waits: past the serve grace for requests in flight
/// (`portway_serve::Limits::shutdown_grace`, 10 s), plus closing the iroh endpoint.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits for `parts` to stop: for as long as they run, and once `shutdown` is asked for at
/// most [`JOIN_TIMEOUT`] more; a part stuck past it is left behind with a warning, so that
/// a process shutting down does not hang on it. (Ending early is how a supervisor learns
/// that a part died, so the bound starts only at shutdown.)
pub(crate) async fn join_within(
    what: &str,
    shutdown: &CancellationToken,
    parts: impl Future<Output = ()>,
) {
    let mut parts = std::pin::pin!(parts);
    tokio::select! {
        () = &mut parts => return,
        () = shutdown.cancelled() => {}
    }
    if tokio::time::timeout(JOIN_TIMEOUT, parts).await.is_err() {
        tracing::warn!(what, timeout = ?JOIN_TIMEOUT, "did not stop in time; not waiting longer");
    }
}

#[derive(Clone, Debug)]
pub struct EdgeStackConfig {
    /// How the sidecar finds devices and where it registers.
    pub sidecar: sidecar::Setup,
    /// The public listeners.
    pub edge: edge::Config,
    /// The GatewayClass served.
    pub class: String,
    /// Addresses published in Gateway status; empty: the IPs the edge is bound to.
    pub addresses: Vec<String>,
    /// How the sidecar reaches origins (backends without a connector).
    pub origins: crate::origin::Config,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeStackError {
    #[error("starting the sidecar")]
    Sidecar(#[from] sidecar::SetupError),
    #[error("starting the edge")]
    Edge(#[from] edge::Error),
}

/// A running edge: public listeners, sidecar and route watcher.
pub struct EdgeStack {
    edge: Edge,
    sidecar: Arc<Sidecar>,
    sidecar_addr: Option<SocketAddr>,
    metrics: Metrics,
    routes: Routes,
    sidecar_task: Option<JoinHandle<()>>,
    /// The certificate and HTTP-01 answer watches.
    watches: Vec<JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl EdgeStack {
    /// Starts the sidecar, binds the edge, serves the sidecar on `sidecar_listener` too
    /// (for Envoys and EndpointSlices; the edge itself calls it in process) and starts
    /// the route watcher, writing Gateway and HTTPRoute status. Returns once all listen.
    ///
    /// # Errors
    /// When the sidecar cannot start (key, endpoint, registration) or the edge cannot
    /// bind; nothing is left running.
    pub async fn start(
        config: EdgeStackConfig,
        client: kube::Client,
        sidecar_listener: Option<TcpListener>,
    ) -> Result<Self, EdgeStackError> {
        let metrics = Metrics::default();
        let sidecar = Arc::new(
            sidecar::start(
                &config.sidecar,
                &client,
                sidecar::Config {
                    origins: config.origins.clone(),
                    ..Default::default()
                },
                metrics.clone(),
            )
            .await?,
        );
        let table = Arc::new(ArcSwap::from_pointee(Table::default()));
        // One token stops the whole stack, the edge's listeners included.
        let shutdown = CancellationToken::new();
        let files = match &config.edge.cert_dir {
            Some(dir) => certs::load_dir(dir).map_err(edge::Error::from)?,
            None => certs::Certs::default(),
        };
        let resolver = Arc::new(certs::Resolver::new(files));
        let certs_task = config
            .edge
            .https
            .is_some()
            .then(|| certs::spawn_watch(client.clone(), resolver.clone(), shutdown.clone()));
        // Every edge with a plain listener answers ACME HTTP-01: the CA may reach any.
        let http01 = crate::http01::Answers::default();
        let http01_task = config.edge.http.is_some().then(|| {
            let answers = http01.clone();
            crate::http01::watch(
                client.clone(),
                move |a| answers.store(Arc::new(a)),
                shutdown.clone(),
            )
        });
        let edge = Edge::bind(
            config.edge,
            resolver,
            http01,
            table.clone(),
            sidecar.clone(),
            metrics.clone(),
            shutdown.clone(),
        )
        .await?;
        // Public TCP ports listen where the edge's HTTP does, and follow the table.
        let (version, versions) = watch::channel(0);
        let (binds, tcp_binds) = watch::channel(crate::tcp::Binds::new());
        let public_ip = edge
            .http_addr()
            .or(edge.https_addr())
            .map_or(crate::tcp::Config::default().ip, |a| a.ip());
        let tcp_task = crate::tcp::spawn(
            crate::tcp::Config {
                ip: public_ip,
                ..Default::default()
            },
            table.clone(),
            versions.clone(),
            sidecar.clone(),
            binds,
            shutdown.clone(),
        );
        // Public UDP ports likewise.
        let (binds, udp_binds) = watch::channel(crate::udp::Binds::new());
        let udp_task = crate::udp::spawn(
            crate::udp::Config {
                ip: public_ip,
                ..Default::default()
            },
            table.clone(),
            versions,
            Arc::new(crate::udp::SidecarOpener(sidecar.clone())),
            binds,
            shutdown.clone(),
        );
        let sidecar_addr = sidecar_listener.as_ref().and_then(|l| l.local_addr().ok());
        let sidecar_task =
            sidecar_listener.map(|l| crate::serve_sidecar(l, sidecar.clone(), shutdown.clone()));
        let mut addresses = config.addresses;
        if addresses.is_empty() {
            addresses = edge
                .http_addr()
                .into_iter()
                .chain(edge.https_addr())
                .map(|a| a.ip().to_string())
                .collect();
            addresses.dedup();
        }
        let routes = routes::spawn(
            client,
            routes::Config {
                class: config.class,
                controller_name: portway_api::CONTROLLER_NAME.into(),
                addresses,
                write_status: true,
                tcp_binds: Some(tcp_binds),
                no_tls_port: routes::no_tls_port(edge.https_addr().is_some()),
                udp_binds: Some(udp_binds),
                no_udp: None,
                leading: None,
            },
            table,
            version,
            shutdown.clone(),
        );
        Ok(Self {
            edge,
            sidecar,
            sidecar_addr,
            metrics,
            routes,
            sidecar_task,
            watches: certs_task
                .into_iter()
                .chain(http01_task)
                .chain([tcp_task, udp_task])
                .collect(),
            shutdown,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.edge.http_addr()
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.edge.https_addr()
    }

    /// The sidecar's own listener, when it was given one.
    pub fn sidecar_addr(&self) -> Option<SocketAddr> {
        self.sidecar_addr
    }

    /// The sidecar's iroh id (what agents authorise).
    pub fn sidecar_id(&self) -> EndpointId {
        self.sidecar.id()
    }

    /// The edge's and sidecar's metrics, to register where `/metrics` is served.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting; requests in flight may finish.
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Cancelling it is [`EdgeStack::shutdown`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until everything has stopped and closes the sidecar's endpoint; after
    /// [`EdgeStack::shutdown`], for at most 15 s.
    pub async fn join(self) {
        let Self {
            edge,
            sidecar,
            routes,
            sidecar_task,
            watches,
            shutdown,
            ..
        } = self;
        join_within("the edge", &shutdown, async move {
            edge.join().await;
            for t in sidecar_task.into_iter().chain(watches) {
                let _ = t.await;
            }
            routes.join().await;
            sidecar.endpoint().close().await;
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A supervisor reads the end of `join` as the death of the part: the bound must
    /// start at shutdown, never before.
    #[tokio::test(start_paused = true)]
    async fn join_waits_as_long_as_parts_run_and_is_bounded_only_after_shutdown() {
        let shutdown = CancellationToken::new();
        let join = join_within("never ends", &shutdown, std::future::pending());
        let mut join = std::pin::pin!(join);
        let running = tokio::time::timeout(JOIN_TIMEOUT * 10, &mut join).await;
        assert!(
            running.is_err(),
            "returned while running and not asked to stop"
        );
        shutdown.cancel();
        let started = tokio::time::Instant::now();
        join.await;
        assert_eq!(started.elapsed(), JOIN_TIMEOUT);

        let idle = CancellationToken::new();
        let done = join_within("ends", &idle, async {});
        assert!(
            tokio::time::timeout(Duration::from_secs(1), done)
                .await
                .is_ok()
        );
    }
}
