//! Edge and sidecar metrics (prometheus-client), exported at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A request an AccessPolicy refused: at which host, by which rule, and why.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub host: String,
    pub rule: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The routed hostname, or `unknown` (so random Host headers cannot grow the series).
    pub host: String,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// Cheap to clone; clones share the series.
#[derive(Clone)]
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub denials: Family<DenialLabels, Counter>,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub active_connections: Gauge,
    pub dial_latency: Histogram,
    /// Open tunnels per device: 0 means no live connection to it.
    pub tunnels: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            denials: Family::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            active_connections: Gauge::default(),
            dial_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            tunnels: Family::default(),
        }
    }
}

/// Decrements the node's tunnel gauge when the tunnel closes.
pub struct TunnelGuard {
    gauge: Gauge,
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl Metrics {
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("portway_gateway");
        r.register(
            "requests",
            "Public requests by routed host and status code",
            self.requests.clone(),
        );
        r.register(
            "denials",
            "Requests an AccessPolicy refused, by host, rule and reason",
            self.denials.clone(),
        );
        r.register(
            "request_bytes",
            "Request body bytes received from clients",
            self.bytes_in.clone(),
        );
        r.register(
            "response_bytes",
            "Response body bytes sent to clients",
            self.bytes_out.clone(),
        );
        r.register(
            "active_connections",
            "Client connections open now",
            self.active_connections.clone(),
        );
        r.register(
            "dial_seconds",
            "Time to open a tunnel to a device",
            self.dial_latency.clone(),
        );
        r.register(
            "tunnels",
            "Tunnels open per device (NodeID)",
            self.tunnels.clone(),
        );
    }

    pub fn tunnel_opened(&self, node: &str) -> TunnelGuard {
        let gauge = self
            .tunnels
            .get_or_create(&NodeLabels {
                node: node.to_owned(),
            })
            .clone();
        gauge.inc();
        TunnelGuard { gauge }
    }

    pub fn denied(&self, host: &str, rule: &str, reason: &str) {
        self.denials
            .get_or_create(&DenialLabels {
                host: host.to_owned(),
                rule: rule.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn request(&self, host: &str, code: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                host: host.to_owned(),
                code,
            })
            .inc();
    }
}

/// Renders a registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}
