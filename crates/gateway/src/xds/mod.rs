//! The Envoy renderer: the route model as Envoy listeners, route configuration and
//! clusters, served over ADS (state of the world, versioned).
//!
//! Design: Envoy forwards each request as plain HTTP/1.1 to the sidecar beside it, with the
//! `datum-*` headers written per route (per backend, on weighted clusters). That keeps
//! WebSocket (HTTP/1.1 upgrade to the sidecar), streaming (`timeout: 0s`) and HTTP/2 from
//! clients (terminated by Envoy) working, and each tunnel change is one route update.
//! The alternative — CONNECT to the sidecar through an internal listener — needs a
//! cluster per target and CDS plus RDS churn for every tunnel (see the notes on Envoy).
//!
//! - `render`: the table → clusters, listeners, routes ([`resources`]).
//! - `ads`: the Aggregated Discovery Service and the connected [`Envoys`].
//! - `report`: the [`CONDITION`] on Gateways ([`spawn_reporter`]).
//! - `bootstrap`: the Envoy bootstrap ([`bootstrap()`]).

mod access;
mod ads;
mod authz;
mod bootstrap;
mod render;
mod report;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::model::Table;

pub use ads::{Envoy, Envoys};
pub use bootstrap::bootstrap;
pub use render::{
    CLUSTER_TYPE, LISTENER_TYPE, ROUTE_TYPE, ROUTES, SECRET_TYPE, UNREADY, clusters, listeners,
    resources, route_configuration, secrets, sidecar_cluster,
};
pub use report::{CONDITION, REPORT_LABEL, condition, merge, spawn_reporter};

/// What one Envoy needs besides the shared routes: where its sidecar and listener are
/// (from the bootstrap's node metadata, else the server's defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub sidecar: SocketAddr,
    pub listen: SocketAddr,
    /// The HTTPS listener (SNI, certificates over SDS); `None`: plain HTTP only.
    pub listen_tls: Option<SocketAddr>,
}

/// What every Envoy serves besides routes, as last watched: the certificate Secrets (over
/// SDS) and the ACME HTTP-01 answers (direct responses on the plain listener).
#[derive(Debug, Default)]
pub struct Secrets {
    pub certificates: Vec<Arc<k8s_openapi::api::core::v1::Secret>>,
    pub http01: Vec<portway_api::certificates::Http01>,
}

pub type SharedSecrets = Arc<ArcSwap<Secrets>>;

/// A running xDS server.
pub struct Server {
    addr: SocketAddr,
    envoys: watch::Receiver<Envoys>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Serves ADS on `listen` from `table`, pushing every time `version` moves.
    ///
    /// # Errors
    /// When the address cannot be bound.
    pub async fn bind(
        listen: SocketAddr,
        table: Arc<ArcSwap<Table>>,
        secrets: SharedSecrets,
        version: watch::Receiver<u64>,
        defaults: NodeConfig,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let authz = authz::service(table.clone());
        let (service, envoys) = ads::service(table, secrets, version, defaults);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(service)
                .add_service(authz)
                .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "xDS server stopped");
            }
        });
        tracing::info!(%addr, "xDS (ADS) listening");
        Ok(Self { addr, envoys, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The connected Envoys and their standing NACKs.
    pub fn envoys(&self) -> watch::Receiver<Envoys> {
        self.envoys.clone()
    }

    pub async fn join(self) {
        let _ = self.task.await;
    }
}

#[derive(Clone, Debug)]
pub struct StackConfig {
    /// Where Envoys connect (gRPC, ADS).
    pub listen: SocketAddr,
    /// For Envoys whose bootstrap names no sidecar or listener of their own.
    pub defaults: NodeConfig,
    /// The GatewayClass served.
    pub class: String,
    /// Addresses published in Gateway status; empty: the IP of `defaults.listen`.
    pub addresses: Vec<String>,
    /// Whether to write Gateway and HTTPRoute status (off when the built-in edge does).
    /// [`CONDITION`] is written either way.
    pub write_status: bool,
    /// With several xDS servers (`--leader-elect`): true while this one leads and writes
    /// route status; all of them serve Envoys.
    pub leading: Option<tokio::sync::watch::Receiver<bool>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("binding {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A running xDS server with its route watcher and [`CONDITION`] reporter.
pub struct Stack {
    server: Server,
    routes: crate::routes::Routes,
    reporter: tokio::task::JoinHandle<()>,
    /// The certificate watch, and the task passing route versions on.
    tasks: Vec<tokio::task::JoinHandle<()>>,
    shutdown: CancellationToken,
}

impl Stack {
    /// Binds the xDS server, then starts the route watcher that feeds it and the reporter
    /// that writes [`CONDITION`] from the watcher's Gateway cache.
    ///
    /// # Errors
    /// When `config.listen` cannot be bound; nothing is left running.
    pub async fn start(config: StackConfig, client: kube::Client) -> Result<Self, StackError> {
        let table = Arc::new(ArcSwap::from_pointee(Table::default()));
        let secrets: SharedSecrets = Arc::default();
        // Envoys are pushed when the routes, the certificates or the HTTP-01 answers
        // change: one version moves for any.
        let (version_tx, version) = watch::channel(0u64);
        let version_tx = Arc::new(version_tx);
        let (routes_tx, mut routes_version) = watch::channel(0u64);
        let shutdown = CancellationToken::new();
        let bump = version_tx.clone();
        let follow_routes = tokio::spawn(async move {
            while routes_version.changed().await.is_ok() {
                bump.send_modify(|v| *v += 1);
            }
        });
        let certs_task = {
            let (secrets, bump) = (secrets.clone(), version_tx.clone());
            crate::certs::watch_secrets(
                client.clone(),
                move |certificates| {
                    secrets.rcu(|s| {
                        Arc::new(Secrets {
                            certificates: certificates.clone(),
                            http01: s.http01.clone(),
                        })
                    });
                    bump.send_modify(|v| *v += 1);
                },
                shutdown.clone(),
            )
        };
        let http01_task = {
            let (secrets, bump) = (secrets.clone(), version_tx.clone());
            crate::http01::watch(
                client.clone(),
                move |http01| {
                    secrets.rcu(|s| {
                        Arc::new(Secrets {
                            certificates: s.certificates.clone(),
                            http01: http01.clone(),
                        })
                    });
                    bump.send_modify(|v| *v += 1);
                },
                shutdown.clone(),
            )
        };
        let server = Server::bind(
            config.listen,
            table.clone(),
            secrets,
            version,
            config.defaults.clone(),
            shutdown.clone(),
        )
        .await
        .map_err(|source| StackError::Bind {
            addr: config.listen,
            source,
        })?;
        let addresses = if config.addresses.is_empty() {
            vec![config.defaults.listen.ip().to_string()]
        } else {
            config.addresses
        };
        let (binds_tx, binds) = watch::channel(crate::tcp::Binds::new());
        let binds_task = tokio::spawn(follow_envoy_binds(
            server.envoys(),
            table.clone(),
            routes_tx.subscribe(),
            version_tx.clone(),
            binds_tx,
            shutdown.clone(),
        ));
        let routes = crate::routes::spawn(
            client.clone(),
            crate::routes::Config {
                class: config.class.clone(),
                controller_name: portway_api::CONTROLLER_NAME.into(),
                addresses,
                write_status: config.write_status,
                // Envoy binds the ports and says so in its NACKs.
                tcp_binds: Some(binds),
                no_tls_port: crate::routes::no_tls_port(config.defaults.listen_tls.is_some()),
                udp_binds: None,
                no_udp: Some(
                    "Envoy does not carry UDP through the tunnel: public UDP ports are served by the built-in edge"
                        .into(),
                ),
                leading: config.leading.clone(),
            },
            table,
            routes_tx,
            shutdown.clone(),
        );
        let reporter = spawn_reporter(
            client,
            config.class,
            server.envoys(),
            routes.gateways(),
            config.leading.clone(),
            shutdown.clone(),
        );
        Ok(Self {
            server,
            routes,
            reporter,
            tasks: vec![follow_routes, certs_task, http01_task, binds_task],
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// The connected Envoys and their standing NACKs.
    pub fn envoys(&self) -> watch::Receiver<Envoys> {
        self.server.envoys()
    }

    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the server, watcher and reporter have stopped; after
    /// [`Stack::shutdown`], for at most 15 s.
    pub async fn join(self) {
        let Self {
            server,
            routes,
            reporter,
            tasks,
            shutdown,
            ..
        } = self;
        crate::stack::join_within("the xDS server", &shutdown, async move {
            server.join().await;
            routes.join().await;
            let _ = reporter.await;
            for t in tasks {
                t.abort();
                let _ = t.await;
            }
        })
        .await;
    }
}

/// How often listeners Envoy could not bind are pushed again: Envoy does not retry a
/// bind by itself (the built-in edge retries as often).
const REBIND: std::time::Duration = std::time::Duration::from_secs(5);

/// Each public TCP port of the table: refused with Envoy's words when a connected Envoy
/// rejected its listener (`portway_tcp_<port>`: Envoy names the listener, then the
/// error, as in `cannot bind '127.0.0.2:20001': Address already in use`), else served.
pub fn envoy_binds(envoys: &Envoys, ports: &[u16]) -> crate::tcp::Binds {
    ports
        .iter()
        .map(|&port| {
            let name = format!("portway_tcp_{port}");
            let why = envoys.iter().find_map(|(node, e)| {
                let message = e.rejected.get(LISTENER_TYPE)?;
                names_listener(message, &name)
                    .then(|| format!("Envoy {node:?} cannot serve the port: {}", message.trim()))
            });
            (port, why.map_or(Ok(()), Err))
        })
        .collect()
}

/// Whether `message` names the listener `name` (not one whose name merely starts so).
fn names_listener(message: &str, name: &str) -> bool {
    message
        .match_indices(name)
        .any(|(i, _)| !message[i + name.len()..].starts_with(|c: char| c.is_ascii_digit()))
}

/// Keeps `binds` as [`envoy_binds`] says, and pushes the listeners again every
/// [`REBIND`] while an Envoy could not bind one.
async fn follow_envoy_binds(
    mut envoys: watch::Receiver<Envoys>,
    table: Arc<ArcSwap<Table>>,
    mut routes: watch::Receiver<u64>,
    push: Arc<watch::Sender<u64>>,
    binds: watch::Sender<crate::tcp::Binds>,
    shutdown: CancellationToken,
) {
    loop {
        let ports: Vec<u16> = table.load().tcp.keys().copied().collect();
        let (now, unbound) = {
            let envoys = envoys.borrow_and_update();
            let unbound = envoys.values().any(|e| {
                e.rejected
                    .get(LISTENER_TYPE)
                    .is_some_and(|m| m.contains("cannot bind"))
            });
            (envoy_binds(&envoys, &ports), unbound)
        };
        binds.send_if_modified(|b| {
            let changed = *b != now;
            if changed {
                *b = now;
            }
            changed
        });
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = envoys.changed() => if r.is_err() { return },
            r = routes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(REBIND), if unbound => push.send_modify(|v| *v += 1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::config::listener::v3::Listener;
    use prost::Message;
    use serde_json::json;

    /// A port whose listener an Envoy could not bind is refused with Envoy's words; a
    /// port whose number merely starts the same is not.
    #[test]
    fn ports_an_envoy_could_not_bind_are_refused() {
        let mut envoys = Envoys::new();
        envoys.insert(
            "edge-1".into(),
            Envoy {
                streams: 1,
                rejected: [(
                    LISTENER_TYPE.to_owned(),
                    "Error adding/updating listener(s) portway_tcp_20001: cannot bind '127.0.0.2:20001': Address already in use\n".to_owned(),
                )]
                .into(),
            },
        );
        envoys.insert("edge-2".into(), Envoy::default());
        let binds = envoy_binds(&envoys, &[2000, 20001, 20002]);
        assert_eq!(binds[&2000], Ok(()));
        assert_eq!(binds[&20002], Ok(()));
        assert_eq!(
            binds[&20001],
            Err("Envoy \"edge-1\" cannot serve the port: Error adding/updating listener(s) portway_tcp_20001: cannot bind '127.0.0.2:20001': Address already in use".to_owned())
        );
        assert!(envoy_binds(&Envoys::new(), &[20001])[&20001].is_ok());
    }

    pub(super) fn table() -> Table {
        let gw: gateway_api::apis::standard::gateways::Gateway = serde_json::from_value(json!({
            "metadata": {"name": "gw", "namespace": "p"}, "spec": {"gatewayClassName": "portway", "listeners": []}})).unwrap();
        let backend = |svc: &str, node: &str| {
            json!({"name": svc, "filters": [{"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [
            {"name": "datum-node-id", "value": node}, {"name": "datum-target-host", "value": "127.0.0.1"},
            {"name": "datum-target-port", "value": "3000"}]}},
            {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "datum-node-id", "value": "victim"}]}}]})
        };
        let route: gateway_api::apis::standard::httproutes::HttpRoute = serde_json::from_value(json!({
            "metadata": {"name": "r", "namespace": "p"},
            "spec": {"parentRefs": [{"name": "gw"}], "hostnames": ["app.example.com", "down.example.com"], "rules": [
                {"backendRefs": [backend("a", "n1"), backend("b", "n2")]},
                {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}, "headers": [{"name": "X-Env", "value": "dev"}], "method": "POST"}], "backendRefs": [backend("a", "n1")]},
                {"matches": [{"path": {"type": "Exact", "value": "/down"}}], "backendRefs": [backend("c", "n3")]},
            ]},
        }))
        .unwrap();
        let slice = |svc: &str, ready: bool| -> k8s_openapi::api::discovery::v1::EndpointSlice {
            serde_json::from_value(json!({"metadata": {"name": svc, "namespace": "p", "labels": {"kubernetes.io/service-name": svc}},
                "addressType": "IPv4", "endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": ready}}]})).unwrap()
        };
        let slices = [slice("a", true), slice("b", true), slice("c", false)];
        crate::model::build(
            "portway",
            &[&gw],
            &[&route],
            &crate::model::Access::default(),
            &crate::model::Layer4Routes::default(),
            &slices.iter().collect::<Vec<_>>(),
        )
        .0
    }

    pub(super) fn node() -> NodeConfig {
        NodeConfig {
            sidecar: "127.0.0.1:4001".parse().unwrap(),
            listen: "0.0.0.0:10080".parse().unwrap(),
            listen_tls: None,
        }
    }

    #[test]
    fn node_metadata_overrides_defaults_and_resources_decode() {
        use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
        let mut meta = Struct::default();
        meta.fields.insert(
            "sidecar".into(),
            Value {
                kind: Some(Kind::StringValue("10.0.0.5:4001".into())),
            },
        );
        let n = Node {
            id: "e1".into(),
            metadata: Some(meta),
            ..Default::default()
        };
        let cfg = ads::node_config(Some(&n), &node());
        assert_eq!(cfg.sidecar, "10.0.0.5:4001".parse().unwrap());
        assert_eq!(cfg.listen, node().listen);
        let l = resources(LISTENER_TYPE, &table(), &Secrets::default(), &cfg);
        let decoded = Listener::decode(l[0].value.as_slice()).unwrap();
        assert_eq!(decoded.name, "portway_http");
        let yaml = bootstrap(
            "127.0.0.1:18000".parse().unwrap(),
            "e1",
            &cfg,
            "127.0.0.1:9901".parse().unwrap(),
        );
        assert!(yaml.contains("port_value: 18000") && yaml.contains("sidecar: \"10.0.0.5:4001\""));
    }
}
