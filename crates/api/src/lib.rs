//! Portway's resource types, validation rules and protocol constants.
//!
//! Every object of the system is declared here once, as a `kube::CustomResource` (or borrowed
//! from `k8s-openapi` / `gateway-api`), so the API server, the agent, the operator and the
//! gateway agree on one model. Validation lives beside the types; the API server runs it on
//! every write, and clients may run it before sending.
//!
//! ```
//! use portway_api::{Connector, ConnectorSpec, Validate};
//! let c = Connector::new("laptop", ConnectorSpec { connector_class_name: "portway".into(), capabilities: vec![] });
//! assert!(c.validate().is_empty());
//! ```

// kube's `printcolumn(...)` repeats keys such as `type_` once per column.
#![allow(clippy::duplicated_attributes)]

pub mod access;
mod advertisement;
pub mod certificates;
mod condition;
mod connector;
mod crds;
mod envoy;
pub mod filters;
mod httpproxy;
pub mod names;
pub mod origins;
pub mod proxy_status;
mod selector;
mod target;
mod tcpproxy;
pub mod validation;

pub use access::{
    AccessPolicy, AccessPolicySpec, AccessPolicyStatus, BasicAuth, ClaimToHeader, IpRules,
    JwksSource, JwtAuth, Oidc, Period, Rate, RateLimit, RequiredClaim, SecretRef,
};
pub use advertisement::*;
pub use condition::*;
pub use connector::*;
pub use crds::{all_crds, crds_yaml};
pub use envoy::*;
pub use httpproxy::*;
pub use selector::*;
pub use target::Target;
pub use tcpproxy::*;
pub use validation::{FieldError, FieldErrorKind, Validate};

/// Re-exported so dependants use the same versions as the types.
pub use gateway_api;
pub use k8s_openapi;

/// The API group of Portway's own kinds (shared with Datum's so manifests carry over).
pub const GROUP: &str = "networking.datumapis.com";

/// ALPN of the tunnel protocol: HTTP/1.1 CONNECT or absolute-form requests over QUIC streams,
/// as spoken by `iroh-proxy-utils`, Datum Connect and iroh-gateway.
pub const TUNNEL_ALPN: &[u8] = b"iroh-http-proxy/1";

/// A UDP tunnel's framing: each datagram is preceded by its length in this many bytes,
/// big-endian (`tokio_util`'s `LengthDelimitedCodec` with `length_field_length(2)`), so
/// a datagram is at most 65 535 bytes.
pub const UDP_FRAME_LENGTH_BYTES: usize = 2;

/// The ConnectorClass and GatewayClass that Portway serves by default.
pub const DEFAULT_CLASS: &str = "portway";

/// The controller name Portway's operator claims classes with.
pub const CONTROLLER_NAME: &str = "portway.dev/operator";

/// Request headers the operator sets per backend and the sidecar consumes. Public clients
/// must never be able to set them: the edge drops every inbound `datum-*` header first.
pub mod headers {
    pub const PREFIX: &str = "datum-";
    pub const NODE_ID: &str = "datum-node-id";
    pub const TARGET_HOST: &str = "datum-target-host";
    pub const TARGET_PORT: &str = "datum-target-port";
    pub const TARGET_PROTO: &str = "datum-target-proto";
    /// [`NODE_ID`]'s value for a backend without a connector: the sidecar reaches the
    /// origin ([`crate::origins`]) itself.
    pub const DIRECT: &str = "direct";
    /// For an origin over HTTPS: the name its certificate is checked against (and SNI);
    /// `-` for none. Set on every direct route, so no client chooses it.
    pub const TARGET_TLS_NAME: &str = "datum-target-tls-name";
    /// For an origin: the `Host` it is sent; `-` keeps the public one. Set on every direct
    /// route, so no client chooses it.
    pub const TARGET_AUTHORITY: &str = "datum-target-authority";
    /// Written where a value is absent, so the header is still overwritten.
    pub const NONE: &str = "-";
    /// The other ready backends of an Envoy route (`<node-id> <host> <port>`, comma
    /// separated), for the sidecar to fail over to when the chosen device is down.
    pub const FALLBACK: &str = "datum-fallback";
    /// On a layer-4 tunnel (`CONNECT`): the public client's address (`ip:port`), for a
    /// device target that takes the PROXY protocol. Set by the edge, and by Envoy's
    /// tunnelling config; the device trusts it from authorised gateways only.
    pub const CLIENT_ADDRESS: &str = "datum-client-address";
    /// [`TARGET_PROTO`]'s value on a layer-4 tunnel (`CONNECT`) that carries UDP: the
    /// stream carries datagrams, each framed by a 2-byte big-endian length
    /// ([`crate::UDP_FRAME_LENGTH_BYTES`]).
    pub const UDP: &str = "udp";
    /// iroh-proxy-utils' own metadata prefix; stripped from public requests as well.
    pub const IROH_PREFIX: &str = "x-iroh-";
    /// The prefix of Datum's iroh-gateway target headers; stripped from public requests.
    pub const DATUM_X_PREFIX: &str = "x-datum-";

    /// Datum's iroh-gateway names for the routing headers, as its Envoy configuration
    /// sends them: the standalone sidecar takes them in place of the `datum-*` ones.
    pub mod datum_gateway {
        pub const ENDPOINT_ID: &str = "x-iroh-endpoint-id";
        pub const TARGET_HOST: &str = "x-datum-target-host";
        pub const TARGET_PORT: &str = "x-datum-target-port";
        pub const TARGET_PROTO: &str = "x-datum-target-proto";
    }

    /// Headers only Portway sets, on the internal hop: they choose the device and its
    /// target, so no client, user filter or HTTPProxy may name them.
    pub fn is_reserved(name: &str) -> bool {
        let lower = name.to_ascii_lowercase();
        lower.starts_with(PREFIX)
            || lower.starts_with(IROH_PREFIX)
            || lower.starts_with(DATUM_X_PREFIX)
    }
}

/// Label keys Portway sets on objects.
pub mod labels {
    pub const HOSTNAME: &str = "portway.dev/hostname";
    pub const OS: &str = "portway.dev/os";
    pub const AGENT_VERSION: &str = "portway.dev/agent-version";
    pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
    pub const PROXY: &str = "portway.dev/httpproxy";
    /// On the objects the operator generates for a TCPProxy: its name.
    pub const TCP_PROXY: &str = "portway.dev/tcpproxy";
    /// `"true"` on a connector made by `portway http`: once its lease has run out for
    /// the operator's ephemeral TTL it is deleted, its advertisements and proxies with it.
    pub const EPHEMERAL: &str = "portway.dev/ephemeral";
}

/// Annotation keys Portway sets on objects.
pub mod annotations {
    /// On an EndpointSlice the operator generates for a TCPProxy backend: where its
    /// connections go, `<node-id> <host> <port>` (the `datum-fallback` entry format).
    /// TCPRoute backendRefs have no filters to carry it, and only the operator may write
    /// EndpointSlices, so no project chooses a device this way.
    pub const TUNNEL_TARGET: &str = "portway.dev/tunnel-target";

    /// `<node-id> <host> <port>` ([`TUNNEL_TARGET`], and each `datum-fallback` entry).
    pub fn parse_tunnel_target(s: &str) -> Option<(String, crate::Target)> {
        let mut parts = s.split_whitespace();
        let (Some(node), Some(host), Some(port), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        Some((
            node.to_owned(),
            crate::Target {
                host: host.to_owned(),
                port: port.parse().ok()?,
            },
        ))
    }

    /// The value of [`TUNNEL_TARGET`] for a device and a target on it.
    pub fn tunnel_target(node_id: &str, target: &crate::Target) -> String {
        format!("{node_id} {} {}", target.host, target.port)
    }
}

/// Field managers, so server-side apply tells the writers apart.
pub mod managers {
    pub const AGENT: &str = "portway-agent";
    pub const OPERATOR: &str = "portway-operator";
    pub const DNS: &str = "portway-dns";
    pub const EDGE: &str = "portway-edge";
    pub const SIDECAR: &str = "portway-sidecar";
}
