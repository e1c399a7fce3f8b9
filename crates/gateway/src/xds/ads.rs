//! The Aggregated Discovery Service: one task per Envoy stream, pushing every resource
//! type it subscribed to whenever the table moves, and the registry of connected Envoys
//! with their standing NACKs.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::{CLUSTER_TYPE, LISTENER_TYPE, NodeConfig, ROUTE_TYPE, SECRET_TYPE, resources};
use crate::model::Table;

/// What the server knows of one connected Envoy (by node id).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Envoy {
    /// Open ADS streams from this node id (Envoys sharing an id count together).
    pub streams: usize,
    /// The latest NACK per resource type, cleared when that type is next ACKed.
    pub rejected: BTreeMap<String, String>,
}

/// Every connected Envoy, by node id.
pub type Envoys = BTreeMap<String, Envoy>;

/// Shared by every stream.
struct Shared {
    table: Arc<ArcSwap<Table>>,
    secrets: super::SharedSecrets,
    version: watch::Receiver<u64>,
    defaults: NodeConfig,
    envoys: watch::Sender<Envoys>,
}

/// One stream's membership in [`Shared::envoys`]; leaving is in `Drop` so that every way a
/// stream ends (client gone, server shutting down) forgets its NACKs.
struct Registration {
    shared: Arc<Shared>,
    id: String,
}

impl Registration {
    fn new(shared: Arc<Shared>, id: String) -> Self {
        shared
            .envoys
            .send_modify(|e| e.entry(id.clone()).or_default().streams += 1);
        Self { shared, id }
    }

    fn rejected(&self, type_url: &str, message: Option<&str>) {
        self.shared.envoys.send_if_modified(|e| {
            let Some(envoy) = e.get_mut(&self.id) else {
                return false;
            };
            match message {
                Some(m) => {
                    envoy
                        .rejected
                        .insert(type_url.to_owned(), m.to_owned())
                        .as_deref()
                        != Some(m)
                }
                None => envoy.rejected.remove(type_url).is_some(),
            }
        });
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.envoys.send_modify(|e| {
            if let Some(envoy) = e.get_mut(&self.id) {
                envoy.streams -= 1;
                if envoy.streams == 0 {
                    e.remove(&self.id);
                }
            }
        });
    }
}

pub(super) fn node_config(node: Option<&Node>, defaults: &NodeConfig) -> NodeConfig {
    let field = |k: &str| -> Option<SocketAddr> {
        let v = node?.metadata.as_ref()?.fields.get(k)?;
        match v.kind.as_ref()? {
            envoy_types::pb::google::protobuf::value::Kind::StringValue(s) => s.parse().ok(),
            _ => None,
        }
    };
    NodeConfig {
        sidecar: field("sidecar").unwrap_or(defaults.sidecar),
        listen: field("listen").unwrap_or(defaults.listen),
        listen_tls: field("listen_tls").or(defaults.listen_tls),
    }
}

#[derive(Default)]
struct Subscription {
    sent: Option<u64>,
    nonce: u64,
    /// The names last asked for (empty: all). Envoy asks for a new SDS secret by sending
    /// its new list with the last nonce, which must be answered, not taken as an ACK.
    names: Vec<String>,
}

/// The order Envoy wants updates in: clusters, then the secrets listeners refer to, then
/// listeners, then routes.
const ORDER: [&str; 4] = [CLUSTER_TYPE, SECRET_TYPE, LISTENER_TYPE, ROUTE_TYPE];

pub(super) struct Ads(Arc<Shared>);

/// The ADS service for a tonic server, and the Envoys it will see connect.
pub(super) fn service(
    table: Arc<ArcSwap<Table>>,
    secrets: super::SharedSecrets,
    version: watch::Receiver<u64>,
    defaults: NodeConfig,
) -> (
    AggregatedDiscoveryServiceServer<Ads>,
    watch::Receiver<Envoys>,
) {
    let (envoys_tx, envoys) = watch::channel(Envoys::new());
    let shared = Arc::new(Shared {
        table,
        secrets,
        version,
        defaults,
        envoys: envoys_tx,
    });
    (AggregatedDiscoveryServiceServer::new(Ads(shared)), envoys)
}

type ResponseStream = ReceiverStream<Result<DiscoveryResponse, tonic::Status>>;
/// Delta xDS is refused, so its stream never yields.
type DeltaStream = futures::stream::Empty<Result<DeltaDiscoveryResponse, tonic::Status>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<ResponseStream>, tonic::Status> {
        let mut incoming = request.into_inner();
        let shared = self.0.clone();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, tonic::Status>>(16);
        tokio::spawn(async move {
            let mut node: Option<Node> = None;
            let mut registration: Option<Registration> = None;
            let mut subs: HashMap<String, Subscription> = HashMap::new();
            let mut version = shared.version.clone();
            let mut nonce = 0u64;
            loop {
                let send_all = tokio::select! {
                    msg = incoming.message() => match msg {
                        Ok(Some(req)) => {
                            if node.is_none() {
                                node = req.node.clone();
                            }
                            let registration = registration.get_or_insert_with(|| {
                                let id = node.as_ref().map(|n| n.id.clone()).unwrap_or_default();
                                Registration::new(shared.clone(), id)
                            });
                            let sub = subs.entry(req.type_url.clone()).or_default();
                            let answers_last = !req.response_nonce.is_empty() && req.response_nonce == sub.nonce.to_string();
                            let names_changed = sub.names != req.resource_names;
                            sub.names.clone_from(&req.resource_names);
                            if answers_last && names_changed && req.error_detail.is_none() {
                                registration.rejected(&req.type_url, None);
                                sub.sent = None;
                                vec![req.type_url]
                            } else if !answers_last {
                                // A first request (or one after reconnect): answer this type now.
                                vec![req.type_url]
                            } else if let Some(err) = &req.error_detail {
                                tracing::warn!(node = %registration.id, type_url = %req.type_url, error = %err.message, "Envoy rejected the configuration (NACK)");
                                registration.rejected(&req.type_url, Some(&err.message));
                                continue;
                            } else {
                                registration.rejected(&req.type_url, None);
                                continue;
                            }
                        }
                        _ => return,
                    },
                    changed = version.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        ORDER.iter().filter(|t| subs.contains_key(**t)).map(|t| t.to_string()).collect()
                    }
                };
                let current = *version.borrow_and_update();
                let table = shared.table.load();
                let secrets = shared.secrets.load();
                let cfg = node_config(node.as_ref(), &shared.defaults);
                for type_url in send_all {
                    let Some(sub) = subs.get_mut(&type_url) else {
                        continue;
                    };
                    if sub.sent == Some(current) && sub.nonce != 0 {
                        continue;
                    }
                    nonce += 1;
                    sub.sent = Some(current);
                    sub.nonce = nonce;
                    let resp = DiscoveryResponse {
                        version_info: current.to_string(),
                        resources: resources(&type_url, &table, &secrets, &cfg),
                        type_url: type_url.clone(),
                        nonce: nonce.to_string(),
                        ..Default::default()
                    };
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<DeltaStream>, tonic::Status> {
        Err(tonic::Status::unimplemented(
            "use state-of-the-world ADS (api_type: GRPC)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::Server;
    use crate::xds::tests::{node, table};
    use tokio_util::sync::CancellationToken;

    /// An ADS client speaking as Envoy does: NACKs are remembered per node and type until
    /// that type is ACKed, and forgotten when the stream ends.
    #[tokio::test]
    async fn nacks_are_tracked_per_node_and_type() {
        use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
        use envoy_types::pb::google::rpc::Status;
        use std::time::Duration;

        let table = Arc::new(ArcSwap::from_pointee(table()));
        let (_version_tx, version) = watch::channel(1u64);
        let shutdown = CancellationToken::new();
        let server = Server::bind(
            "127.0.0.1:0".parse().unwrap(),
            table,
            Arc::default(),
            version,
            node(),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let mut envoys = server.envoys();
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://{}", server.local_addr()))
                .await
                .unwrap();
        let (tx, rx) = mpsc::channel::<DiscoveryRequest>(4);
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let request = |type_url: &str, nonce: &str, error: Option<&str>| DiscoveryRequest {
            node: Some(Node {
                id: "envoy-a".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            response_nonce: nonce.into(),
            error_detail: error.map(|m| Status {
                code: 3,
                message: m.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let wait =
            |envoys: &mut watch::Receiver<Envoys>, what: &'static str, f: fn(&Envoys) -> bool| {
                let mut envoys = envoys.clone();
                async move {
                    tokio::time::timeout(Duration::from_secs(10), envoys.wait_for(f))
                        .await
                        .unwrap_or_else(|_| panic!("timed out waiting until {what}"))
                        .unwrap()
                        .clone()
                }
            };

        let mut nonces = HashMap::new();
        for t in [CLUSTER_TYPE, LISTENER_TYPE] {
            tx.send(request(t, "", None)).await.unwrap();
            let resp = responses.message().await.unwrap().unwrap();
            assert_eq!(resp.type_url, t);
            assert!(!resp.resources.is_empty());
            nonces.insert(t, resp.nonce);
        }
        let e = wait(&mut envoys, "envoy-a is connected", |e| {
            e.contains_key("envoy-a")
        })
        .await;
        assert!(e["envoy-a"].rejected.is_empty());

        tx.send(request(
            CLUSTER_TYPE,
            &nonces[CLUSTER_TYPE],
            Some("bad cluster"),
        ))
        .await
        .unwrap();
        let e = wait(&mut envoys, "the NACK is recorded", |e| {
            e.get("envoy-a").is_some_and(|e| !e.rejected.is_empty())
        })
        .await;
        assert_eq!(e["envoy-a"].rejected[CLUSTER_TYPE], "bad cluster");

        // An ACK of another type leaves the cluster NACK standing. The stream is handled in
        // order, so the answer to a new subscription means the ACK before it was seen.
        tx.send(request(LISTENER_TYPE, &nonces[LISTENER_TYPE], None))
            .await
            .unwrap();
        tx.send(request(ROUTE_TYPE, "", None)).await.unwrap();
        let resp = responses.message().await.unwrap().unwrap();
        assert_eq!(resp.type_url, ROUTE_TYPE);
        assert_eq!(
            envoys.borrow()["envoy-a"].rejected[CLUSTER_TYPE],
            "bad cluster"
        );
        // A NACK answering a stale nonce is not about the current configuration.
        tx.send(request(LISTENER_TYPE, "999", Some("stale")))
            .await
            .unwrap();
        tx.send(request(CLUSTER_TYPE, &nonces[CLUSTER_TYPE], None))
            .await
            .unwrap();
        let e = wait(&mut envoys, "the ACK clears the NACK", |e| {
            e.get("envoy-a").is_some_and(|e| e.rejected.is_empty())
        })
        .await;
        assert_eq!(e["envoy-a"].streams, 1);

        tx.send(request(
            CLUSTER_TYPE,
            &nonces[CLUSTER_TYPE],
            Some("bad again"),
        ))
        .await
        .unwrap();
        wait(&mut envoys, "the second NACK is recorded", |e| {
            e.get("envoy-a").is_some_and(|e| !e.rejected.is_empty())
        })
        .await;
        drop(tx);
        drop(responses);
        wait(
            &mut envoys,
            "a closed stream is forgotten",
            Envoys::is_empty,
        )
        .await;
        shutdown.cancel();
        server.join().await;
    }
}
